//! The submitting side of tasks: route, store, send, follow, retry.
//!
//! [`Dispatcher`] is an actor. A submitted task is routed ([`crate::routing::Router`]), stored in
//! RocksDB (`submitted`), acknowledged to the caller, then sent to its endpoint on
//! `/funcmesh/task/4` (batched per endpoint). The endpoint's answer and, later, its result update
//! the stored task. If the endpoint's node stops advertising (or the endpoint reports it lost the
//! task), a task with retries left is sent again, elsewhere; one without fails with a reason that
//! says the endpoint was lost. After a restart every unfinished task is sent again to its endpoint,
//! which answers with what it knows (ids are idempotency keys), so nothing is lost either way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compute::Environment;
use compute::task::{
    Encoding, FULL_SWEEP_EVERY, FailureKind, Outcome, Record, Status, Submission, TaskError,
    TaskId, now_us,
};
use futures::future::BoxFuture;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{Access, Verdict};
use crate::network::{Event, Handle};
use crate::routing::{ADVERT_TOPIC, Advert, Candidate, Requirements, Router, Strategy};
use crate::tasks::{Answer, MAX_BATCH, TaskRequest, TaskResponse};

/// Stored format version of [`Submitted`].
pub const SUBMITTED_VERSION: u32 = 1;
/// The most one batch of tasks to an endpoint may carry, by [`Submission::arguments_size_bound`]:
/// half of what one task-protocol message can.
const BATCH_BYTES: usize = crate::tasks::MAX_MESSAGE / 2;

/// Where a task was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The endpoint's node.
    pub peer: String,
    /// The node's name.
    pub node_name: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// The endpoint's registry id.
    pub endpoint_id: String,
}

/// One try of a task on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Where.
    pub target: Target,
    /// The id the endpoint knows it by.
    pub wire_id: TaskId,
    /// When it was routed there, Unix microseconds.
    pub at_us: u64,
    /// Why it ended without a result, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

/// A task as its submitting node keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    /// Format version.
    pub v: u32,
    /// The task's id.
    pub id: TaskId,
    /// The function's name.
    pub function_name: String,
    /// What was sent (its `id` and `endpoint` are the current attempt's).
    pub submission: Submission,
    /// How it was routed.
    pub strategy: Strategy,
    /// What it needs.
    pub requirements: Requirements,
    /// Retries left after an endpoint is lost.
    pub retries_left: u32,
    /// Tries so far; the last is the current one.
    pub attempts: Vec<Attempt>,
    /// Status.
    pub status: Status,
    /// The endpoint's record, as last heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Accepted here, Unix microseconds.
    pub submitted_us: u64,
    /// Finished, Unix microseconds.
    #[serde(default)]
    pub finished_us: u64,
    /// The capability token the submitter asked to present, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
}

impl Submitted {
    /// The current attempt's target.
    pub fn target(&self) -> Option<&Target> {
        self.attempts.last().map(|a| &a.target)
    }
}

/// A task to submit.
#[derive(Debug, Clone)]
pub struct Request {
    /// The function, from the registry.
    pub function: crdt_registry::Function,
    /// Positional arguments.
    pub args: Value,
    /// Keyword arguments.
    pub kwargs: Value,
    /// Encoding.
    pub encoding: Encoding,
    /// Time limit, ms (0: the endpoint's default).
    pub timeout_ms: u64,
    /// What it needs.
    pub requirements: Requirements,
    /// How to route it.
    pub strategy: Strategy,
    /// Retries after an endpoint is lost.
    pub retries: u32,
    /// A capability token to present (text form) instead of one this node holds: the router
    /// then offers endpoints whose policy admits tokens without checking it, and the endpoint
    /// decides.
    pub capability: Option<String>,
}

/// Answers task requests addressed to this node's own endpoints (the mesh cannot dial itself).
pub trait Local: Send + Sync + 'static {
    /// Handles a request as if it came from this node over the mesh.
    fn request(&self, request: TaskRequest) -> BoxFuture<'static, TaskResponse>;
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// An endpoint whose node has not advertised for this long is lost.
    pub lost_after: Duration,
    /// Finished tasks are kept this long.
    pub retention: Duration,
    /// This node's institution.
    pub institution: Option<String>,
    /// Access policies and the capability tokens this node holds.
    pub access: Arc<Access>,
}

/// Dispatcher errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It stopped.
    #[error("the task dispatcher has stopped")]
    Closed,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

type Reply<T> = oneshot::Sender<T>;

/// Answers to send once this turn's writes are stored.
type Replies = Vec<Box<dyn FnOnce(&Actor) + Send>>;

enum Cmd {
    Submit(Vec<Request>, Reply<Vec<Result<Submitted, String>>>),
    /// Submit, answer with the ids once stored, then with the tasks once all have finished.
    SubmitWait(
        Vec<Request>,
        Reply<Vec<Result<TaskId, String>>>,
        Reply<Vec<Option<Arc<Submitted>>>>,
    ),
    Get(Vec<TaskId>, Reply<Vec<Option<Submitted>>>),
    Cancel(TaskId, Reply<Option<Submitted>>),
    Results(
        PeerId,
        Vec<Record>,
        Vec<crate::routing::EndpointLoad>,
        Reply<()>,
    ),
    Answered(PeerId, Vec<TaskId>, Result<TaskResponse, String>),
    CancelAnswered(
        TaskId,
        Result<TaskResponse, String>,
        Reply<Option<Submitted>>,
    ),
    Adverts(Reply<Vec<(PeerId, Advert)>>),
    OwnAdvert(Advert),
    Wait(Vec<TaskId>, Reply<Vec<Option<Arc<Submitted>>>>),
    Live(TaskId, Reply<Option<Submitted>>),
}

/// A caller waiting for a set of tasks to finish.
struct Waiter {
    ids: Vec<TaskId>,
    remaining: HashSet<TaskId>,
    found: HashMap<TaskId, Arc<Submitted>>,
    reply: Reply<Vec<Option<Arc<Submitted>>>>,
}

/// A task's stored form (JSON), written in one go into a buffer of about its size.
/// A [`Submitted`] as stored: its submission without the function, which is stored once, by
/// id, in `functions`.
#[derive(Serialize)]
struct StoredRef<'a> {
    v: u32,
    id: &'a TaskId,
    function_name: &'a str,
    submission: compute::task::stored::SansFunction<'a>,
    strategy: Strategy,
    requirements: &'a Requirements,
    retries_left: u32,
    attempts: &'a [Attempt],
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: &'a Option<Record>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: &'a Option<Outcome>,
    submitted_us: u64,
    finished_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    capability: &'a Option<String>,
}

/// A stored [`Submitted`] as read back (earlier versions stored the function inline).
#[derive(Deserialize)]
struct StoredSubmitted {
    v: u32,
    id: TaskId,
    function_name: String,
    submission: compute::task::stored::StoredSubmission,
    strategy: Strategy,
    requirements: Requirements,
    retries_left: u32,
    attempts: Vec<Attempt>,
    status: Status,
    #[serde(default)]
    record: Option<Record>,
    #[serde(default)]
    outcome: Option<Outcome>,
    submitted_us: u64,
    #[serde(default)]
    finished_us: u64,
    #[serde(default)]
    capability: Option<String>,
}

fn stored_form(t: &Submitted) -> Vec<u8> {
    // Every field named: a new field of `Submitted` does not compile until it is stored too.
    let Submitted {
        v,
        id,
        function_name,
        submission,
        strategy,
        requirements,
        retries_left,
        attempts,
        status,
        record,
        outcome,
        submitted_us,
        finished_us,
        capability,
    } = t;
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(
        &mut out,
        &StoredRef {
            v: *v,
            id,
            function_name,
            submission: compute::task::stored::SansFunction(submission),
            strategy: *strategy,
            requirements,
            retries_left: *retries_left,
            attempts,
            status: *status,
            record,
            outcome,
            submitted_us: *submitted_us,
            finished_us: *finished_us,
            capability,
        },
    )
    .expect("tasks serialise");
    out
}

/// Functions read from the store while reading tasks back: each id once.
type FunctionCache = HashMap<String, Option<crdt_registry::record::FunctionRecord>>;

/// Reads a stored task back, with its function (from `functions`, through `cache`). `None`:
/// unreadable, or its function is not in the store.
fn read_stored(s: &store::Store, v: &[u8], cache: &mut FunctionCache) -> Option<Submitted> {
    let t: StoredSubmitted = serde_json::from_slice(v).ok()?;
    join_stored(s, t, cache)
}

fn join_stored(
    s: &store::Store,
    t: StoredSubmitted,
    cache: &mut FunctionCache,
) -> Option<Submitted> {
    let StoredSubmitted {
        v,
        id,
        function_name,
        submission,
        strategy,
        requirements,
        retries_left,
        attempts,
        status,
        record,
        outcome,
        submitted_us,
        finished_us,
        capability,
    } = t;
    let submission = submission.join(|fid| {
        cache
            .entry(fid.to_owned())
            .or_insert_with(|| compute::task::stored::read_function(s, fid).ok().flatten())
            .clone()
    });
    let Some(submission) = submission else {
        tracing::warn!(task = %id, "a stored task's function is not in the store; skipping it");
        return None;
    };
    Some(Submitted {
        v,
        id,
        function_name,
        submission,
        strategy,
        requirements,
        retries_left,
        attempts,
        status,
        record,
        outcome,
        submitted_us,
        finished_us,
        capability,
    })
}

/// A cheap-clone handle to the dispatcher.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Cmd>,
    finished: watch::Receiver<u64>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dispatcher")
    }
}

impl Dispatcher {
    /// Starts the dispatcher: loads unfinished tasks and sends them again.
    pub async fn start(
        mesh: Handle,
        store: store::Store,
        config: Config,
        local: Arc<dyn Local>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Dispatcher, Error> {
        let unfinished = store
            .blocking(|s| {
                let mut cache = FunctionCache::new();
                let mut out = Vec::new();
                for (_, v) in s.scan(store::cf::SUBMITTED)? {
                    let Ok(t) = serde_json::from_slice::<StoredSubmitted>(&v) else {
                        continue;
                    };
                    if t.status.is_terminal() {
                        continue;
                    }
                    out.extend(join_stored(s, t, &mut cache));
                }
                Ok(out)
            })
            .await?;
        let mut live = HashMap::new();
        for t in unfinished {
            live.insert(t.id.clone(), t);
        }
        let (tx, rx) = mpsc::channel(1024);
        let (finished_tx, finished) = watch::channel(0);
        let events = mesh.subscribe();
        let topic = ADVERT_TOPIC.to_string();
        let _ = mesh.subscribe_topic(&topic).await;
        let mut actor = Actor {
            me: mesh.peer_id(),
            mesh,
            store,
            router: Router::new(rand::random(), config.lost_after),
            config,
            local,
            live: HashMap::new(),
            by_wire: HashMap::new(),
            candidates: Vec::new(),
            candidates_at: None,
            dirty: HashSet::new(),
            stored_functions: Default::default(),
            done: Vec::new(),
            unsent: BTreeMap::new(),
            backoff: HashMap::new(),
            finished_tx,
            tx: tx.clone(),
            tracker: tracker.clone(),
            started: Instant::now(),
            waiters: HashMap::new(),
            waiting_on: HashMap::new(),
            next_waiter: 0,
        };
        actor.router.set_local(actor.me);
        if let Ok(members) = actor.mesh.members().await {
            for m in members {
                if let Ok(p) = m.peer_id.parse::<PeerId>() {
                    actor.router.connected(p, true);
                }
            }
        }
        let n = live.len();
        for (id, t) in live {
            if let Some(a) = t.attempts.last() {
                actor.by_wire.insert(a.wire_id.clone(), id.clone());
                if let Ok(peer) = a.target.peer.parse::<PeerId>() {
                    actor.unsent.entry(peer).or_default().push(id.clone());
                }
            }
            actor.live.insert(id, t);
        }
        if n > 0 {
            tracing::info!(tasks = n, "resuming unfinished tasks");
        }
        tracker.spawn(actor.run(rx, events, cancel));
        Ok(Dispatcher { tx, finished })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Routes and stores tasks; each is accepted (stored, and being sent) or refused with the
    /// reason (no endpoint can run it, and why).
    pub async fn submit(
        &self,
        requests: Vec<Request>,
    ) -> Result<Vec<Result<Submitted, String>>, Error> {
        self.ask(|r| Cmd::Submit(requests, r)).await
    }

    /// A task as stored here, with its endpoint's live record if it is unfinished (asked with a
    /// 2 s limit; the stored view if the endpoint does not answer).
    pub async fn live(&self, id: TaskId) -> Result<Option<Submitted>, Error> {
        self.ask(|r| Cmd::Live(id, r)).await
    }

    /// The tasks as stored here.
    pub async fn get(&self, ids: Vec<TaskId>) -> Result<Vec<Option<Submitted>>, Error> {
        self.ask(|r| Cmd::Get(ids, r)).await
    }

    /// Waits until every task is finished or `timeout` passes; returns them as they are then.
    pub async fn wait(
        &self,
        ids: Vec<TaskId>,
        timeout: Duration,
    ) -> Result<Vec<Option<Arc<Submitted>>>, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Wait(ids.clone(), tx))
            .await
            .map_err(|_| Error::Closed)?;
        self.finished_within(ids, timeout, rx).await
    }

    /// [`Dispatcher::submit`], then [`Dispatcher::wait`] for the accepted tasks, in one trip
    /// through the dispatcher: what a caller that wants results (`POST /v1/tasks` with
    /// `wait_ms`) needs, without a copy of each task at submission.
    pub async fn submit_and_wait(
        &self,
        requests: Vec<Request>,
        timeout: Duration,
    ) -> Result<Vec<Result<Arc<Submitted>, String>>, Error> {
        let (accepted_tx, accepted_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        self.tx
            .send(Cmd::SubmitWait(requests, accepted_tx, done_tx))
            .await
            .map_err(|_| Error::Closed)?;
        let accepted = accepted_rx.await.map_err(|_| Error::Closed)?;
        let ids: Vec<TaskId> = accepted
            .iter()
            .filter_map(|a| a.as_ref().ok().cloned())
            .collect();
        let mut tasks = self
            .finished_within(ids, timeout, done_rx)
            .await?
            .into_iter();
        Ok(accepted
            .into_iter()
            .map(|a| {
                let id = a?;
                tasks
                    .next()
                    .flatten()
                    .ok_or_else(|| format!("task {id} was accepted but is not stored"))
            })
            .collect())
    }

    async fn finished_within(
        &self,
        ids: Vec<TaskId>,
        timeout: Duration,
        rx: oneshot::Receiver<Vec<Option<Arc<Submitted>>>>,
    ) -> Result<Vec<Option<Arc<Submitted>>>, Error> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(tasks)) => Ok(tasks),
            Ok(Err(_)) => Err(Error::Closed),
            // Not all finished in time: say where each is now.
            Err(_) => Ok(self
                .get(ids)
                .await?
                .into_iter()
                .map(|t| t.map(Arc::new))
                .collect()),
        }
    }

    /// Resolves when any task submitted here finishes (for pollers).
    pub async fn changed(&self) -> Result<(), Error> {
        let mut f = self.finished.clone();
        f.changed().await.map_err(|_| Error::Closed)
    }

    /// Cancels a task: tells its endpoint, which stops it if it runs.
    pub async fn cancel(&self, id: TaskId) -> Result<Option<Submitted>, Error> {
        self.ask(|r| Cmd::Cancel(id, r)).await
    }

    /// Takes results from an endpoint's node; returns once they are stored (then acknowledge).
    pub async fn results(
        &self,
        from: PeerId,
        records: Vec<Record>,
        loads: Vec<crate::routing::EndpointLoad>,
    ) -> Result<(), Error> {
        self.ask(|r| Cmd::Results(from, records, loads, r)).await
    }

    /// This node's own advert (gossip does not deliver a node's messages to itself).
    pub async fn own_advert(&self, advert: Advert) -> Result<(), Error> {
        self.tx
            .send(Cmd::OwnAdvert(advert))
            .await
            .map_err(|_| Error::Closed)
    }

    /// The latest advert of every node heard from.
    pub async fn adverts(&self) -> Result<Vec<(PeerId, Advert)>, Error> {
        self.ask(Cmd::Adverts).await
    }
}

struct Actor {
    me: PeerId,
    mesh: Handle,
    store: store::Store,
    router: Router,
    config: Config,
    local: Arc<dyn Local>,
    live: HashMap<TaskId, Submitted>,
    /// The id an endpoint knows → the task.
    by_wire: HashMap<TaskId, TaskId>,
    candidates: Vec<Candidate>,
    candidates_at: Option<Instant>,
    dirty: HashSet<TaskId>,
    /// The functions this node has put in the store.
    stored_functions: compute::task::stored::StoredFunctions,
    /// Tasks finished this turn (stored with the rest, then announced); shared with the
    /// waiters they answer.
    done: Vec<Arc<Submitted>>,
    unsent: BTreeMap<PeerId, Vec<TaskId>>,
    /// Peers not to send to before then (they were unreachable or busy).
    backoff: HashMap<PeerId, Instant>,
    finished_tx: watch::Sender<u64>,
    tx: mpsc::Sender<Cmd>,
    tracker: TaskTracker,
    started: Instant,
    waiters: HashMap<u64, Waiter>,
    waiting_on: HashMap<TaskId, Vec<u64>>,
    next_waiter: u64,
}

/// The id an endpoint knows attempt `n` of task `id` by: the task id itself first, then a hash,
/// so that a retry on the same endpoint is a new task there.
fn wire_id(id: &TaskId, n: usize) -> TaskId {
    if n == 0 {
        return id.clone();
    }
    id.derived(n)
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut events: tokio::sync::broadcast::Receiver<Event>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slow = tokio::time::interval(Duration::from_secs(5));
        let (mut last_sweep, mut last_full): (Option<Instant>, Option<Instant>) = (None, None);
        let mut replies: Replies = Vec::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.on_cmd(c, &mut replies).await,
                    None => break,
                },
                ev = events.recv() => match ev {
                    Ok(ev) => self.on_event(ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = tick.tick() => self.on_tick(),
                _ = slow.tick() => {
                    if let Ok(rtts) = self.mesh.rtts().await {
                        for (p, d) in rtts {
                            self.router.rtt(p, d);
                        }
                    }
                    // Every quarter of the retention (at most every ten minutes), the retention
                    // sweep reads the tasks made before its horizon; the first after a start,
                    // and then one a day, reads them all.
                    let every = (self.config.retention / 4).min(Duration::from_secs(600));
                    if last_sweep.is_none_or(|t| t.elapsed() >= every) {
                        last_sweep = Some(Instant::now());
                        let full = last_full.is_none_or(|t| t.elapsed() >= FULL_SWEEP_EVERY);
                        if full {
                            last_full = Some(Instant::now());
                        }
                        self.sweep(full).await;
                    }
                }
            }
            for _ in 0..256 {
                match cmds.try_recv() {
                    Ok(c) => self.on_cmd(c, &mut replies).await,
                    Err(_) => break,
                }
            }
            self.flush(&mut replies).await;
        }
        self.flush(&mut replies).await;
    }

    async fn flush(&mut self, replies: &mut Replies) {
        // Two things need not wait for this turn's write, and each would cost a trip through
        // the blocking pool on every task's path: local waiters (a finished result is in
        // memory, and its endpoint keeps it until we acknowledge it, which waits), and sending
        // new tasks to their endpoints (the caller is answered only after the write; if we crash
        // first, the caller never had an id, and the endpoint's result is acknowledged and
        // dropped as unknown).
        let mut early: Replies = Vec::new();
        self.wake_waiters(&mut early);
        for r in early {
            r(self);
        }
        self.send_unsent(None);
        let mut ops: Vec<store::Op> = Vec::new();
        for id in self.dirty.drain() {
            if let Some(t) = self.live.get(&id) {
                // The function once, in the same batch as the first task that names it.
                ops.extend(self.stored_functions.op_for(&t.submission));
                let v = stored_form(t);
                ops.push((
                    store::cf::SUBMITTED,
                    id.as_str().as_bytes().to_vec(),
                    Some(v),
                ));
            }
        }
        for t in &self.done {
            let v = stored_form(t);
            ops.push((
                store::cf::SUBMITTED,
                t.id.as_str().as_bytes().to_vec(),
                Some(v),
            ));
        }
        if !ops.is_empty() {
            if let Err(e) = self.store.blocking(move |s| s.batch_unsynced(&ops)).await {
                tracing::error!(error = %e, "cannot store submitted tasks");
                // Functions first written in this batch are not stored either.
                self.stored_functions.forget();
                // Unanswered callers see the dispatcher as failed and retry.
                replies.clear();
                return;
            }
        }
        for r in replies.drain(..) {
            r(self);
        }
        if !self.done.is_empty() {
            self.done.clear();
            self.finished_tx.send_modify(|n| *n += 1);
        }
    }

    /// A task as stored, when it is no longer live.
    async fn stored_one(&self, id: &TaskId) -> Option<Submitted> {
        let k = id.as_str().as_bytes().to_vec();
        self.store
            .blocking(move |s| {
                Ok(s.get(store::cf::SUBMITTED, &k)?
                    .and_then(|v| read_stored(s, &v, &mut FunctionCache::new())))
            })
            .await
            .ok()
            .flatten()
    }

    async fn refresh_candidates(&mut self, force: bool) {
        let fresh = self
            .candidates_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if fresh && !force {
            return;
        }
        let listed = self
            .mesh
            .registry_with(|view| {
                view.endpoints
                    .values()
                    .filter_map(|e| {
                        let peer = e.peer_id.parse::<PeerId>().ok()?;
                        let node_name = view.nodes.get(&e.peer_id).map_or_else(
                            || e.peer_id.chars().take(12).collect(),
                            |n| n.name.clone(),
                        );
                        Some(Candidate {
                            id: e.id.clone(),
                            name: e.record.name.clone(),
                            peer,
                            peer_text: e.peer_id.clone(),
                            node_name,
                            institution: e.institution.clone(),
                            institution_key: view
                                .nodes
                                .get(&e.peer_id)
                                .and_then(|n| n.institution_key),
                            runtimes: e.record.runtimes.clone(),
                            tags: e.record.capabilities.tags.clone(),
                            policy: e.record.policy,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let Ok(listed) = listed else {
            return;
        };
        self.candidates = listed;
        self.candidates_at = Some(Instant::now());
    }

    async fn on_cmd(&mut self, cmd: Cmd, replies: &mut Replies) {
        match cmd {
            Cmd::Submit(requests, reply) => {
                self.refresh_candidates(false).await;
                let now = Instant::now();
                let answers: Vec<Result<Submitted, String>> = requests
                    .into_iter()
                    .map(|r| {
                        let id = self.accept(r, now)?;
                        Ok(self.live[&id].clone())
                    })
                    .collect();
                replies.push(Box::new(move |_| {
                    let _ = reply.send(answers);
                }));
            }
            Cmd::SubmitWait(requests, accepted, done) => {
                self.refresh_candidates(false).await;
                let now = Instant::now();
                let answers: Vec<Result<TaskId, String>> =
                    requests.into_iter().map(|r| self.accept(r, now)).collect();
                let ids: Vec<TaskId> = answers.iter().filter_map(|a| a.clone().ok()).collect();
                // Their results come in later turns, after this turn's write.
                self.add_waiter(ids, HashMap::new(), done);
                replies.push(Box::new(move |_| {
                    let _ = accepted.send(answers);
                }));
            }
            Cmd::Get(ids, reply) => {
                let mut out = Vec::with_capacity(ids.len());
                let mut missing = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    match self.live.get(id) {
                        Some(t) => out.push(Some(t.clone())),
                        None => {
                            out.push(None);
                            missing.push(i);
                        }
                    }
                }
                if !missing.is_empty() {
                    let keys: Vec<(usize, Vec<u8>)> = missing
                        .iter()
                        .map(|i| (*i, ids[*i].as_str().as_bytes().to_vec()))
                        .collect();
                    let found = self
                        .store
                        .blocking(move |s| {
                            let mut cache = FunctionCache::new();
                            let mut f = Vec::new();
                            for (i, k) in keys {
                                if let Some(v) = s.get(store::cf::SUBMITTED, &k)? {
                                    f.push((i, read_stored(s, &v, &mut cache)));
                                }
                            }
                            Ok(f)
                        })
                        .await
                        .unwrap_or_default();
                    for (i, t) in found {
                        out[i] = t;
                    }
                }
                let _ = reply.send(out);
            }
            Cmd::Cancel(id, reply) => {
                let Some(t) = self.live.get(&id) else {
                    let _ = reply.send(self.stored_one(&id).await);
                    return;
                };
                let Some(a) = t.attempts.last() else {
                    return;
                };
                let request = TaskRequest::Cancel {
                    endpoint: a.target.endpoint.clone(),
                    id: a.wire_id.clone(),
                };
                let peer = a.target.peer.parse::<PeerId>().ok();
                let tx = self.tx.clone();
                let fut = peer.map(|p| self.send_request(p, request));
                self.tracker.spawn(async move {
                    let res = match fut {
                        Some(f) => f.await,
                        None => Err("the endpoint's peer id is invalid".into()),
                    };
                    let _ = tx.send(Cmd::CancelAnswered(id, res, reply)).await;
                });
            }
            Cmd::CancelAnswered(id, res, reply) => {
                // Its result may have arrived first and concluded it in an earlier turn (the
                // endpoint sends a finished task at once): answer with what is stored.
                if !self.live.contains_key(&id) && !self.done.iter().any(|t| t.id == id) {
                    let _ = reply.send(self.stored_one(&id).await);
                    return;
                }
                match res {
                    Ok(TaskResponse::Cancelled { record: Some(rec) })
                        if rec.status.is_terminal() =>
                    {
                        self.on_record(rec, None)
                    }
                    Ok(other) => {
                        let why = match other {
                            TaskResponse::Refused { reason } => {
                                format!(" (the endpoint said: {reason})")
                            }
                            _ => String::new(),
                        };
                        self.conclude(
                            &id,
                            Outcome::Cancelled {
                                reason: format!("cancelled by the submitter{why}"),
                            },
                            None,
                        );
                    }
                    Err(e) => self.conclude(
                        &id,
                        Outcome::Cancelled {
                            reason: format!(
                                "cancelled by the submitter; the endpoint could not be told ({e})"
                            ),
                        },
                        None,
                    ),
                }
                replies.push(Box::new(move |a: &Actor| {
                    let t = a
                        .live
                        .get(&id)
                        .cloned()
                        .or_else(|| a.done.iter().find(|t| t.id == id).map(|t| (**t).clone()));
                    let _ = reply.send(t);
                }));
            }
            Cmd::Results(from, records, loads, reply) => {
                for l in loads {
                    self.router.fresh_load(from, l);
                }
                let from_s = from.to_string();
                for rec in records {
                    self.on_record_from(rec, Some(&from_s));
                }
                replies.push(Box::new(move |_| {
                    let _ = reply.send(());
                }));
            }
            Cmd::Answered(peer, ids, res) => self.on_answered(peer, ids, res),
            Cmd::Adverts(reply) => {
                let _ = reply.send(self.router.adverts());
            }
            Cmd::OwnAdvert(a) => self.router.advert(self.me, a, Instant::now()),
            Cmd::Live(id, reply) => {
                let Some(t) = self.live.get(&id).cloned() else {
                    let found = self.load_stored(vec![id.clone()]).await.remove(&id);
                    let _ = reply.send(found);
                    return;
                };
                let (Some(a), Ok(peer)) = (
                    t.attempts.last().cloned(),
                    t.target()
                        .map_or(Err(()), |x| x.peer.parse::<PeerId>().map_err(|_| ())),
                ) else {
                    let _ = reply.send(Some(t));
                    return;
                };
                let fut = self.send_request(
                    peer,
                    TaskRequest::Records {
                        endpoint: a.target.endpoint.clone(),
                        ids: vec![a.wire_id.clone()],
                    },
                );
                self.tracker.spawn(async move {
                    let mut t = t;
                    if let Ok(Ok(TaskResponse::Records { records })) =
                        tokio::time::timeout(Duration::from_secs(2), fut).await
                    {
                        if let Some(Some(rec)) = records.into_iter().next() {
                            if !t.status.is_terminal() {
                                t.status = rec.status;
                                t.record = Some(rec);
                            }
                        }
                    }
                    let _ = reply.send(Some(t));
                });
            }
            Cmd::Wait(ids, reply) => {
                let remaining: HashSet<TaskId> = ids
                    .iter()
                    .filter(|id| self.live.contains_key(*id))
                    .cloned()
                    .collect();
                let mut found = HashMap::new();
                let mut stored = Vec::new();
                for id in &ids {
                    if remaining.contains(id) {
                        continue;
                    }
                    match self.done.iter().find(|t| &t.id == id) {
                        Some(t) => {
                            found.insert(id.clone(), t.clone());
                        }
                        None => stored.push(id.clone()),
                    }
                }
                found.extend(
                    self.load_stored(stored)
                        .await
                        .into_iter()
                        .map(|(id, t)| (id, Arc::new(t))),
                );
                self.add_waiter(ids, found, reply);
            }
        }
    }

    /// Answers `reply` once every task of `ids` that is live now has finished (`found` holds
    /// the others).
    fn add_waiter(
        &mut self,
        ids: Vec<TaskId>,
        found: HashMap<TaskId, Arc<Submitted>>,
        reply: Reply<Vec<Option<Arc<Submitted>>>>,
    ) {
        let remaining: HashSet<TaskId> = ids
            .iter()
            .filter(|id| self.live.contains_key(*id))
            .cloned()
            .collect();
        let w = self.next_waiter;
        self.next_waiter += 1;
        for id in &remaining {
            self.waiting_on.entry(id.clone()).or_default().push(w);
        }
        self.waiters.insert(
            w,
            Waiter {
                ids,
                remaining,
                found,
                reply,
            },
        );
    }

    async fn load_stored(&self, ids: Vec<TaskId>) -> HashMap<TaskId, Submitted> {
        if ids.is_empty() {
            return HashMap::new();
        }
        self.store
            .blocking(move |s| {
                let mut cache = FunctionCache::new();
                let mut f = HashMap::new();
                for id in ids {
                    if let Some(v) = s.get(store::cf::SUBMITTED, id.as_str().as_bytes())? {
                        if let Some(t) = read_stored(s, &v, &mut cache) {
                            f.insert(id, t);
                        }
                    }
                }
                Ok(f)
            })
            .await
            .unwrap_or_default()
    }

    /// Chooses an endpoint among those this node may use (by policy, or with a capability
    /// token: `explicit`, or one it holds). The token itself is attached when the task is sent
    /// ([`Actor::token_to_present`]).
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        env: &Environment,
        requirements: &Requirements,
        strategy: Strategy,
        function_id: &str,
        explicit: Option<&str>,
        exclude: &HashSet<String>,
        now: Instant,
    ) -> Result<Candidate, String> {
        let access = self.config.access.clone();
        let institution = self.config.institution.clone();
        let unix = now_us() / 1_000_000;
        let verdict = |c: &Candidate| {
            crate::access::verdict(c.policy, c.institution.as_deref(), institution.as_deref())
        };
        let check = |c: &Candidate| -> Result<(), String> {
            match verdict(c) {
                Verdict::Admitted => Ok(()),
                Verdict::NeedsToken(_) if explicit.is_some() => Ok(()),
                Verdict::NeedsToken(why) => access
                    .token_for(&c.id, c.institution_key.as_ref(), function_id, unix)
                    .map(|_| ())
                    .map_err(|e| format!("{why}; {e}")),
                Verdict::Refused(why) => Err(why),
            }
        };
        self.router
            .choose(
                env,
                requirements,
                &check,
                strategy,
                &self.candidates,
                exclude,
                now,
            )
            .map_err(|e| e.to_string())
    }

    /// Routes a task and takes it on (stored in this turn's write, sent to its endpoint).
    fn accept(&mut self, r: Request, now: Instant) -> Result<TaskId, String> {
        let env = Environment::of(r.function.record.container.as_ref())?;
        // A token is attached when the task is sent (`send_unsent`), once per batch; it is
        // not stored with the task.
        let c = self.route(
            &env,
            &r.requirements,
            r.strategy,
            &r.function.id,
            r.capability.as_deref(),
            &HashSet::new(),
            now,
        )?;
        let id = TaskId::random();
        let submitted_us = now_us();
        let submission = Submission {
            id: id.clone(),
            endpoint: c.name.clone(),
            function: r.function.record.clone(),
            function_id: r.function.id.clone(),
            args: if r.args.is_null() {
                Value::Array(vec![])
            } else {
                r.args
            },
            kwargs: if r.kwargs.is_null() {
                Value::Object(Default::default())
            } else {
                r.kwargs
            },
            encoding: r.encoding,
            timeout_ms: r.timeout_ms,
            submitted_us,
            capability: None,
        };
        // The function comes from the registry view, which lists a function only under its
        // content id: only the arguments need checking here.
        submission.check_args()?;
        let t = Submitted {
            v: SUBMITTED_VERSION,
            id: id.clone(),
            function_name: r.function.record.name.clone(),
            submission,
            strategy: r.strategy,
            requirements: r.requirements,
            retries_left: r.retries,
            attempts: vec![Attempt {
                target: target(&c),
                wire_id: id.clone(),
                at_us: submitted_us,
                lost: None,
            }],
            status: Status::Pending,
            record: None,
            outcome: None,
            submitted_us,
            finished_us: 0,
            capability: r.capability,
        };
        self.router.dispatched(c.peer, &c.name, &env);
        self.by_wire.insert(id.clone(), id.clone());
        self.unsent.entry(c.peer).or_default().push(id.clone());
        self.dirty.insert(id.clone());
        self.live.insert(id.clone(), t);
        Ok(id)
    }

    fn send_request(
        &self,
        peer: PeerId,
        request: TaskRequest,
    ) -> BoxFuture<'static, Result<TaskResponse, String>> {
        if peer == self.me {
            let fut = self.local.request(request);
            Box::pin(async move { Ok(fut.await) })
        } else {
            // Queued for the mesh now; only the answer is awaited later.
            let answer = self.mesh.task_request(peer, request);
            Box::pin(async move { answer.await.map_err(|e| e.to_string()) })
        }
    }

    /// The token a task for `function` presents at the endpoint `endpoint` (registry id): the
    /// one its submitter gave, or one this node holds when the endpoint's policy asks for one.
    fn token_to_present(
        &self,
        endpoint: &str,
        function: &str,
        explicit: Option<&str>,
    ) -> Option<String> {
        if let Some(t) = explicit {
            return Some(t.to_owned());
        }
        let c = self.candidates.iter().find(|c| c.id == endpoint)?;
        match crate::access::verdict(
            c.policy,
            c.institution.as_deref(),
            self.config.institution.as_deref(),
        ) {
            Verdict::NeedsToken(_) => self
                .config
                .access
                .token_for(
                    endpoint,
                    c.institution_key.as_ref(),
                    function,
                    now_us() / 1_000_000,
                )
                .ok(),
            _ => None,
        }
    }

    /// Sends the tasks waiting for their endpoint (all, or one peer's).
    fn send_unsent(&mut self, only: Option<PeerId>) {
        let now = Instant::now();
        let peers: Vec<PeerId> = match only {
            Some(p) => vec![p],
            None => self.unsent.keys().copied().collect(),
        };
        for peer in peers {
            if only.is_none() && self.backoff.get(&peer).is_some_and(|t| now < *t) {
                continue;
            }
            self.backoff.remove(&peer);
            let Some(ids) = self.unsent.remove(&peer) else {
                continue;
            };
            let peer_s = peer.to_string();
            for chunk in self.batches(&ids) {
                let mut tokens: Vec<String> = Vec::new();
                // Per (endpoint, function, explicit token): the index in `tokens`, if any.
                let mut refs: HashMap<(String, String, Option<String>), Option<usize>> =
                    HashMap::new();
                let mut tasks: Vec<Submission> = Vec::with_capacity(chunk.len());
                // The ids of `tasks`, in order: answers come back in this order.
                let mut ids: Vec<TaskId> = Vec::with_capacity(chunk.len());
                for id in chunk {
                    let Some(t) = self.live.get(id) else {
                        continue;
                    };
                    // Queued here before it was retried elsewhere: it is the other peer's now.
                    if !t.target().is_some_and(|x| is_peer(&x.peer, &peer_s, &peer)) {
                        continue;
                    }
                    let endpoint = t
                        .target()
                        .map(|x| x.endpoint_id.clone())
                        .unwrap_or_default();
                    let key = (
                        endpoint,
                        t.submission.function_id.clone(),
                        t.capability.clone(),
                    );
                    let index = match refs.get(&key) {
                        Some(i) => *i,
                        None => {
                            let i = self.token_to_present(&key.0, &key.1, key.2.as_deref()).map(
                                |text| match tokens.iter().position(|x| *x == text) {
                                    Some(i) => i,
                                    None => {
                                        tokens.push(text);
                                        tokens.len() - 1
                                    }
                                },
                            );
                            refs.insert(key, i);
                            i
                        }
                    };
                    let mut sub = t.submission.clone();
                    sub.capability = index.map(crate::access::token_ref);
                    tasks.push(sub);
                    ids.push(id.clone());
                }
                if tasks.is_empty() {
                    continue;
                }
                let fut = self.send_request(peer, TaskRequest::Submit { tasks, tokens });
                let tx = self.tx.clone();
                self.tracker.spawn(async move {
                    let res = fut.await;
                    let _ = tx.send(Cmd::Answered(peer, ids, res)).await;
                });
            }
        }
    }

    /// Splits tasks to send into batches that fit one message: at most 1,024 tasks, and at
    /// most [`BATCH_BYTES`] of arguments (and a registry entry's worth per function).
    fn batches<'a>(&self, ids: &'a [TaskId]) -> Vec<&'a [TaskId]> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        // A function travels once per batch, in its table: counted at twice an entry's limit
        // (its record, escaped once more).
        const FUNCTION_BYTES: usize = 2 * crdt_registry::entry::MAX_ENTRY_BYTES;
        let mut functions: HashSet<&str> = HashSet::new();
        let mut last: Option<&str> = None;
        for (i, id) in ids.iter().enumerate() {
            let Some(t) = self.live.get(id) else {
                continue;
            };
            let fid = t.submission.function_id.as_str();
            let args = t.submission.arguments_size_bound() + 1024;
            let full = i - start >= MAX_BATCH.min(1024)
                || bytes + args + FUNCTION_BYTES > BATCH_BYTES && !functions.contains(fid)
                || bytes + args > BATCH_BYTES;
            if i > start && full {
                out.push(&ids[start..i]);
                start = i;
                bytes = 0;
                functions.clear();
                last = None;
            }
            if last != Some(fid) && functions.insert(fid) {
                bytes += FUNCTION_BYTES;
            }
            last = Some(fid);
            bytes += args;
        }
        if start < ids.len() {
            out.push(&ids[start..]);
        }
        out
    }

    fn on_answered(&mut self, peer: PeerId, ids: Vec<TaskId>, res: Result<TaskResponse, String>) {
        // A task may have moved on since it was sent here (its endpoint was lost, and it was
        // retried elsewhere): this peer's answer no longer speaks for it. (Answers pair with
        // `ids` by position, so `ids` itself stays whole.)
        let peer_s = peer.to_string();
        let here = |a: &Actor, id: &TaskId| {
            a.live
                .get(id)
                .and_then(|t| t.target())
                .is_some_and(|x| is_peer(&x.peer, &peer_s, &peer))
        };
        match res {
            Ok(TaskResponse::Submitted { answers, loads }) => {
                for l in loads {
                    self.router.fresh_load(peer, l);
                }
                for (id, answer) in ids.into_iter().zip(answers) {
                    match answer {
                        Answer::Accepted(rec) if rec.status.is_terminal() => {
                            self.on_record(rec, Some(peer));
                        }
                        Answer::Accepted(Record { status, .. }) | Answer::Queued(status) => {
                            if let Some(t) = self.live.get_mut(&id) {
                                if t.target().is_some_and(|x| x.peer == peer_s) {
                                    // Kept in memory only: after a restart every unfinished task
                                    // is sent again and its endpoint answers afresh, so storing
                                    // this would cost a write per task for nothing.
                                    t.status = status;
                                }
                            }
                        }
                        Answer::Refused(_) if !here(self, &id) => {}
                        Answer::Refused(why) => {
                            let ep = self
                                .live
                                .get(&id)
                                .and_then(|t| t.target().cloned())
                                .map_or_else(String::new, |t| {
                                    format!("{} on {}", t.endpoint, t.node_name)
                                });
                            self.conclude(
                                &id,
                                Outcome::Failed {
                                    error: TaskError::new(
                                        FailureKind::Refused,
                                        format!("endpoint {ep} refused the task: {why}"),
                                    ),
                                    value: None,
                                },
                                None,
                            );
                        }
                    }
                }
            }
            Ok(TaskResponse::Busy { reason }) => {
                tracing::debug!(%peer, %reason, "endpoint node busy; will send again");
                let still: Vec<TaskId> = ids.into_iter().filter(|id| here(self, id)).collect();
                self.backoff
                    .insert(peer, Instant::now() + Duration::from_millis(250));
                self.unsent.entry(peer).or_default().extend(still);
            }
            Ok(other) => {
                let why = match other {
                    TaskResponse::Refused { reason } => reason,
                    o => format!("unexpected answer {o:?}"),
                };
                let still: Vec<TaskId> = ids.into_iter().filter(|id| here(self, id)).collect();
                for id in still {
                    self.conclude(
                        &id,
                        Outcome::failed(
                            FailureKind::Refused,
                            format!("the endpoint's node refused the tasks: {why}"),
                        ),
                        None,
                    );
                }
            }
            Err(e) => {
                // Unreachable for now: keep them; the loss check decides if it lasts.
                tracing::debug!(%peer, error = %e, "cannot send tasks; will retry");
                let still: Vec<TaskId> = ids.into_iter().filter(|id| here(self, id)).collect();
                if !still.is_empty() {
                    self.unsent.entry(peer).or_default().extend(still);
                }
            }
        }
    }

    /// An endpoint's record of a task: finishes it if it is terminal.
    fn on_record(&mut self, rec: Record, from: Option<PeerId>) {
        self.on_record_from(rec, from.map(|p| p.to_string()).as_deref());
    }

    fn on_record_from(&mut self, mut rec: Record, from: Option<&str>) {
        let Some(id) = self.by_wire.get(&rec.id).cloned() else {
            return;
        };
        let Some(t) = self.live.get(&id) else {
            return;
        };
        let current = t
            .attempts
            .last()
            .is_some_and(|a| a.wire_id == rec.id && from.is_none_or(|p| a.target.peer == p));
        if !current {
            return;
        }
        if !rec.status.is_terminal() {
            return;
        }
        // The outcome moves to the task (`Submitted::outcome`): kept, and stored, once.
        if let Some(outcome) = rec.outcome.take() {
            self.conclude(&id, outcome, Some(rec));
        }
    }

    /// Ends a task, or retries it elsewhere if the failure was the endpoint's and retries remain.
    fn conclude(&mut self, id: &TaskId, outcome: Outcome, record: Option<Record>) {
        let Some(mut t) = self.live.remove(id) else {
            return;
        };
        let lost = match &outcome {
            Outcome::Failed { error, .. } => matches!(
                error.kind,
                FailureKind::EndpointLost | FailureKind::WorkerLost
            )
            .then(|| error.clone()),
            _ => None,
        };
        if let (Some(error), true) = (&lost, t.retries_left > 0) {
            let mut exclude: HashSet<String> = HashSet::new();
            for a in &t.attempts {
                if error.kind == FailureKind::EndpointLost || a.lost.is_some() {
                    exclude.insert(a.target.endpoint_id.clone());
                }
            }
            if let Some(a) = t.attempts.last_mut() {
                a.lost = Some(error.message.clone());
            }
            let env = Environment::of(t.submission.function.container.as_ref());
            let choice = env.and_then(|env| {
                self.route(
                    &env,
                    &t.requirements.clone(),
                    t.strategy,
                    &t.submission.function_id.clone(),
                    t.capability.clone().as_deref(),
                    &exclude,
                    Instant::now(),
                )
            });
            match choice {
                Ok(c) => {
                    t.retries_left -= 1;
                    let wire = wire_id(&t.id, t.attempts.len());
                    t.attempts.push(Attempt {
                        target: target(&c),
                        wire_id: wire.clone(),
                        at_us: now_us(),
                        lost: None,
                    });
                    t.submission.id = wire.clone();
                    t.submission.endpoint = c.name.clone();
                    t.status = Status::Pending;
                    t.record = None;
                    tracing::info!(task = %t.id, to = %c, "retrying a task whose endpoint was lost");
                    if let Ok(env) = Environment::of(t.submission.function.container.as_ref()) {
                        self.router.dispatched(c.peer, &c.name, &env);
                    }
                    self.by_wire.insert(wire, t.id.clone());
                    self.unsent.entry(c.peer).or_default().push(t.id.clone());
                    self.dirty.insert(t.id.clone());
                    self.live.insert(t.id.clone(), t);
                    return;
                }
                Err(why) => {
                    t.status = Status::Failed;
                    t.outcome = Some(Outcome::Failed {
                        error: TaskError::new(
                            error.kind,
                            format!(
                                "{}; no other endpoint could take the retry: {why}",
                                error.message
                            ),
                        ),
                        value: None,
                    });
                    t.record = record.or(t.record);
                    t.finished_us = now_us();
                    self.finish(t);
                    return;
                }
            }
        }
        t.status = outcome.status();
        t.outcome = Some(outcome);
        if record.is_some() {
            t.record = record;
        }
        t.finished_us = now_us();
        self.finish(t);
    }

    fn finish(&mut self, t: Submitted) {
        let t = Arc::new(t);
        for a in &t.attempts {
            self.by_wire.remove(&a.wire_id);
        }
        self.dirty.remove(&t.id);
        if let Some(ws) = self.waiting_on.remove(&t.id) {
            for w in ws {
                if let Some(waiter) = self.waiters.get_mut(&w) {
                    waiter.remaining.remove(&t.id);
                    waiter.found.insert(t.id.clone(), t.clone());
                }
            }
        }
        self.done.push(t);
    }

    /// Answers the waiters whose tasks have all finished (after this turn's writes).
    fn wake_waiters(&mut self, replies: &mut Replies) {
        let ready: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.remaining.is_empty() || w.reply.is_closed())
            .map(|(k, _)| *k)
            .collect();
        for k in ready {
            let Some(mut w) = self.waiters.remove(&k) else {
                continue;
            };
            for id in &w.remaining {
                if let Some(list) = self.waiting_on.get_mut(id) {
                    list.retain(|x| *x != k);
                }
            }
            replies.push(Box::new(move |_| {
                let out = w.ids.iter().map(|id| w.found.remove(id)).collect();
                let _ = w.reply.send(out);
            }));
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Gossip {
                topic,
                source,
                data,
            } if topic == ADVERT_TOPIC => match Advert::decode(&data) {
                Ok(a) => self.router.advert(source, a, Instant::now()),
                Err(e) => tracing::debug!(peer = %source, error = %e, "ignored a malformed advert"),
            },
            Event::MemberConnected(m) => {
                if let Ok(peer) = m.peer_id.parse::<PeerId>() {
                    self.router.connected(peer, true);
                    self.send_unsent(Some(peer));
                }
            }
            Event::MemberDisconnected(peer) => self.router.connected(peer, false),
            _ => {}
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Right after a start nothing has advertised yet: give the mesh time before calling
        // endpoints lost.
        if now < self.started + self.config.lost_after {
            self.send_unsent(None);
            return;
        }
        let lost: Vec<(TaskId, Target)> = self
            .live
            .values()
            .filter_map(|t| {
                let target = t.target()?;
                let peer = target.peer.parse::<PeerId>().ok()?;
                (peer != self.me && !self.router.is_alive(&peer, now))
                    .then(|| (t.id.clone(), target.clone()))
            })
            .collect();
        for (id, target) in lost {
            let status = self.live.get(&id).map_or(Status::Pending, |t| t.status);
            self.conclude(
                &id,
                Outcome::failed(
                    FailureKind::EndpointLost,
                    format!(
                        "endpoint {} on {} was lost while the task was {status}: its node has not \
                         been heard from for {}{}",
                        target.endpoint,
                        target.node_name,
                        humantime::format_duration(self.config.lost_after),
                        if self.live.get(&id).is_some_and(|t| t.retries_left == 0) {
                            " (submit with --retries N to retry elsewhere)"
                        } else {
                            ""
                        }
                    ),
                ),
                None,
            );
        }
        self.send_unsent(None);
    }

    /// Drops finished tasks older than the retention. `full`: every stored task is read;
    /// otherwise only those whose id was made before the horizon (a task cannot have finished
    /// before it was made), which misses only ids of older versions, without their time.
    async fn sweep(&mut self, full: bool) {
        let horizon = now_us().saturating_sub(self.config.retention.as_micros() as u64);
        let _ = self
            .store
            .blocking(move |s| {
                let mut ops = Vec::new();
                let rows = if full {
                    s.scan(store::cf::SUBMITTED)?
                } else {
                    let until = TaskId::lower_bound_at(horizon / 1000);
                    s.scan_range(store::cf::SUBMITTED, b"", until.as_bytes())?
                };
                for (k, v) in rows {
                    if let Ok(t) = serde_json::from_slice::<StoredSubmitted>(&v) {
                        if t.status.is_terminal() && t.finished_us < horizon {
                            ops.push((store::cf::SUBMITTED, k, None));
                        }
                    }
                }
                if !ops.is_empty() {
                    s.batch_unsynced(&ops)?;
                }
                Ok(())
            })
            .await;
    }
}

/// Whether a target's peer (as the registry wrote it) is `peer` (whose text is `text`).
fn is_peer(target: &str, text: &str, peer: &PeerId) -> bool {
    target == text || target.parse::<PeerId>().is_ok_and(|p| p == *peer)
}

fn target(c: &Candidate) -> Target {
    Target {
        peer: c.peer_text.clone(),
        node_name: c.node_name.clone(),
        endpoint: c.name.clone(),
        endpoint_id: c.id.clone(),
    }
}
