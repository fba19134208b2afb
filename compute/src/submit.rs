//! The submitting side of tasks: route, store, send, follow, retry.
//!
//! [`Dispatcher`] is the handle of an actor that drives a sans-IO [`machine::Machine`]: the
//! machine decides, the actor stores, sends and answers callers. A submitted task is routed ([`crate::routing::Router`]), stored in
//! RocksDB (`submitted`), acknowledged to the caller, then sent to its endpoint on
//! `/funcmesh/task/4` (batched per endpoint). The endpoint's answer and, later, its result update
//! the stored task. If the endpoint's node stops advertising (or the endpoint reports it lost the
//! task), a task with retries left is sent again, elsewhere; one without fails with a reason that
//! says the endpoint was lost. After a restart every unfinished task is sent again to its endpoint,
//! which answers with what it knows (ids are idempotency keys), so nothing is lost either way.
//! A task whose endpoint was lost and that no endpoint can take yet waits for one (until its
//! time limit or [`Config::route_wait`]) instead of failing.

pub mod machine;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh::{Event, Handle, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::routing::{ADVERT_TOPIC, Advert, Candidate, Requirements, Strategy};
use crate::task::{FULL_SWEEP_EVERY, Outcome, Record, Status, TaskId, now_us};
use crate::wire::{TaskRequest, TaskResponse};
pub use machine::{Attempt, Refusal, Request, SUBMITTED_VERSION, Submitted, Target};
use machine::{Machine, Now, Settings};

/// How the dispatcher reaches endpoint nodes: another member over the mesh's links, this
/// node's own endpoints directly (the service wires it).
pub(crate) trait Transport: Send + Sync + 'static {
    /// Sends `request` to `peer`; the future is its answer, or why there was none. The request
    /// is on its way when this returns; only the answer is awaited later.
    fn request(
        &self,
        peer: PeerId,
        request: TaskRequest,
    ) -> futures::future::BoxFuture<'static, Result<TaskResponse, String>>;
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// An endpoint whose node has not advertised for this long is lost.
    pub lost_after: Duration,
    /// Finished tasks are kept this long.
    pub retention: Duration,
    /// How long a task with retries left waits for an endpoint that can take its retry.
    pub route_wait: Duration,
    /// This node's institution.
    pub institution: Option<String>,
    /// Where the dispatcher counts what it does.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Access policies and the capability tokens this node holds.
    pub access: Arc<Access>,
    /// How large values pass (`None`: all inline). Results by reference are fetched from the
    /// endpoint's node as they arrive; the blobs of a task go with it at the end of its
    /// retention.
    pub values: Option<crate::blobs::Values>,
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
    Submit(Vec<Request>, Reply<Vec<Result<Submitted, Refusal>>>),
    /// Submit, answer with the ids once stored, then with the tasks once all have finished.
    SubmitWait(
        Vec<Request>,
        Reply<Vec<Result<TaskId, Refusal>>>,
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

/// A task's stored form (JSON), written in one go into a buffer of about its size.
/// A [`Submitted`] as stored: its submission without the function, which is stored once, by
/// id, in `functions`.
#[derive(Serialize)]
struct StoredRef<'a> {
    v: u32,
    id: &'a TaskId,
    function_name: &'a str,
    submission: crate::task::stored::SansFunction<'a>,
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
    submission: crate::task::stored::StoredSubmission,
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
            submission: crate::task::stored::SansFunction(submission),
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
            .or_insert_with(|| crate::task::stored::read_function(s, fid).ok().flatten())
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
    /// Every task submitted here, as it finishes.
    finished_tasks: tokio::sync::broadcast::Sender<Arc<Submitted>>,
}

/// How many finished tasks a slow [`Dispatcher::finished_tasks`] subscriber may fall behind
/// before it is told it lagged (and should ask for the tasks it waits on).
pub const FINISHED_BACKLOG: usize = 16_384;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dispatcher")
    }
}

/// The dispatcher's side of its channels, until [`start`] runs it: a handle exists before the
/// actor does, so that the serve side can be built with it and the actor with the serve side.
pub(crate) struct Inbox {
    tx: mpsc::Sender<Cmd>,
    rx: mpsc::Receiver<Cmd>,
    finished_tx: watch::Sender<u64>,
    finished_tasks: tokio::sync::broadcast::Sender<Arc<Submitted>>,
}

/// A dispatcher's handle and the inbox its actor will read.
pub(crate) fn channel() -> (Dispatcher, Inbox) {
    let (tx, rx) = mpsc::channel(1024);
    let (finished_tx, finished) = watch::channel(0);
    let (finished_tasks, _) = tokio::sync::broadcast::channel(FINISHED_BACKLOG);
    (
        Dispatcher {
            tx: tx.clone(),
            finished,
            finished_tasks: finished_tasks.clone(),
        },
        Inbox {
            tx,
            rx,
            finished_tx,
            finished_tasks,
        },
    )
}

/// Starts the dispatcher behind `inbox`: loads unfinished tasks and sends them again.
pub(crate) async fn start(
    inbox: Inbox,
    mesh: Handle,
    store: store::Store,
    config: Config,
    peers: Arc<dyn Transport>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), Error> {
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
    let Inbox {
        tx,
        rx,
        finished_tx,
        finished_tasks,
    } = inbox;
    let events = mesh.subscribe();
    let _ = mesh.subscribe_topic(ADVERT_TOPIC).await;
    let now = Instant::now();
    let mut machine = Machine::new(
        Settings {
            me: mesh.peer_id(),
            lost_after: config.lost_after,
            route_wait: config.route_wait,
            institution: config.institution.clone(),
            access: config.access.clone(),
            seed: rand::random(),
        },
        now,
    );
    if let Ok(members) = mesh.members().await {
        for m in members {
            if let Ok(p) = m.peer_id.parse::<PeerId>() {
                machine.connected(p, true);
            }
        }
    }
    let n = unfinished.len();
    machine.resume(unfinished, now);
    if n > 0 {
        tracing::info!(tasks = n, "resuming unfinished tasks");
    }
    let actor = Actor {
        mesh,
        store,
        config,
        peers,
        machine,
        candidates_at: None,
        stored_functions: Default::default(),
        finished_tx,
        finished_tasks,
        tx,
        tracker: tracker.clone(),
        replies_to_waiters: HashMap::new(),
        next_waiter: 0,
    };
    tracker.spawn(actor.run(rx, events, cancel));
    Ok(())
}

impl Dispatcher {
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
    ) -> Result<Vec<Result<Submitted, Refusal>>, Error> {
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
    ) -> Result<Vec<Result<Arc<Submitted>, Refusal>>, Error> {
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
                tasks.next().flatten().ok_or(Refusal::Unstored(id))
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

    /// Every task submitted here from now on, as it finishes (a subscriber that falls
    /// [`FINISHED_BACKLOG`] behind gets `Lagged` and should ask for the tasks it waits on).
    pub fn finished_tasks(&self) -> tokio::sync::broadcast::Receiver<Arc<Submitted>> {
        self.finished_tasks.subscribe()
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
    mesh: Handle,
    store: store::Store,
    config: Config,
    peers: Arc<dyn Transport>,
    machine: Machine,
    candidates_at: Option<Instant>,
    /// The functions this node has put in the store.
    stored_functions: crate::task::stored::StoredFunctions,
    finished_tx: watch::Sender<u64>,
    finished_tasks: tokio::sync::broadcast::Sender<Arc<Submitted>>,
    tx: mpsc::Sender<Cmd>,
    tracker: TaskTracker,
    /// The callers waiting for tasks to finish, by waiter number ([`Machine::add_waiter`]).
    replies_to_waiters: HashMap<u64, Reply<Vec<Option<Arc<Submitted>>>>>,
    next_waiter: u64,
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
                _ = tick.tick() => {
                    // A task waiting for a route needs to know the endpoints listed now.
                    if self.machine.awaiting_route() > 0 {
                        self.refresh_candidates(false).await;
                    }
                    self.machine.tick(Now::current());
                }
                _ = slow.tick() => {
                    if let Ok(rtts) = self.mesh.rtts().await {
                        for (p, d) in rtts {
                            self.machine.rtt(p, d);
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

    /// Sends what the machine has to send.
    fn send(&mut self, only: Option<PeerId>) {
        for out in self.machine.sends(only, Now::current()) {
            let fut = self.peers.request(out.peer, out.request);
            let tx = self.tx.clone();
            let (peer, ids) = (out.peer, out.ids);
            self.tracker.spawn(async move {
                let res = fut.await;
                let _ = tx.send(Cmd::Answered(peer, ids, res)).await;
            });
        }
    }

    async fn flush(&mut self, replies: &mut Replies) {
        // Two things need not wait for this turn's write, and each would cost a trip through
        // the blocking pool on every task's path: local waiters (a finished result is in
        // memory, and its endpoint keeps it until we acknowledge it, which waits), and sending
        // new tasks to their endpoints (the caller is answered only after the write; if we crash
        // first, the caller never had an id, and the endpoint's result is acknowledged and
        // dropped as unknown).
        let waiters = &self.replies_to_waiters;
        for (w, tasks) in self
            .machine
            .ready_waiters(|w| waiters.get(&w).is_none_or(|r| r.is_closed()))
        {
            if let Some(reply) = self.replies_to_waiters.remove(&w) {
                let _ = reply.send(tasks);
            }
        }
        self.send(None);
        let mut ops: Vec<store::Op> = Vec::new();
        for id in self.machine.take_dirty() {
            if let Some(t) = self.machine.live(&id) {
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
        for t in self.machine.done() {
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
        for t in self.machine.done() {
            self.config.metrics.finished(t);
            // No subscriber is fine: nobody streams finished tasks now.
            let _ = self.finished_tasks.send(t.clone());
        }
        self.config
            .metrics
            .live(self.machine.live_count(), self.machine.awaiting_route());
        if self.machine.end_turn() > 0 {
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
        self.machine.set_candidates(listed);
        self.candidates_at = Some(Instant::now());
    }

    async fn on_cmd(&mut self, cmd: Cmd, replies: &mut Replies) {
        match cmd {
            Cmd::Submit(requests, reply) => {
                self.refresh_candidates(false).await;
                let now = Now::current();
                let answers: Vec<Result<Submitted, Refusal>> = requests
                    .into_iter()
                    .map(|r| {
                        if let Some(known) = r.id.as_ref().and_then(|id| self.machine.live(id)) {
                            // Asked again under its id: the task as it is.
                            return Ok(known.clone());
                        }
                        let fresh = r.id.clone().unwrap_or_else(TaskId::random);
                        let id = self.machine.accept(r, fresh, now);
                        self.config.metrics.submitted(id.is_ok());
                        let id = id?;
                        Ok(self
                            .machine
                            .live(&id)
                            .expect("an accepted task is live")
                            .clone())
                    })
                    .collect();
                replies.push(Box::new(move |_| {
                    let _ = reply.send(answers);
                }));
            }
            Cmd::SubmitWait(requests, accepted, done) => {
                self.refresh_candidates(false).await;
                let now = Now::current();
                let answers: Vec<Result<TaskId, Refusal>> = requests
                    .into_iter()
                    .map(|r| {
                        if let Some(id) = r.id.as_ref().filter(|id| self.machine.live(id).is_some())
                        {
                            return Ok(id.clone());
                        }
                        let fresh = r.id.clone().unwrap_or_else(TaskId::random);
                        let id = self.machine.accept(r, fresh, now);
                        self.config.metrics.submitted(id.is_ok());
                        id
                    })
                    .collect();
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
                    match self.machine.live(id) {
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
                let Some((peer, request)) = self.machine.cancel_request(&id) else {
                    let _ = reply.send(self.stored_one(&id).await);
                    return;
                };
                let tx = self.tx.clone();
                let fut = peer.map(|p| self.peers.request(p, request));
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
                if self.machine.live(&id).is_none() && self.machine.done_task(&id).is_none() {
                    let _ = reply.send(self.stored_one(&id).await);
                    return;
                }
                self.machine.cancelled(&id, res, Now::current());
                replies.push(Box::new(move |a: &Actor| {
                    let t = a
                        .machine
                        .live(&id)
                        .cloned()
                        .or_else(|| a.machine.done_task(&id).map(|t| (**t).clone()));
                    let _ = reply.send(t);
                }));
            }
            Cmd::Results(from, records, loads, reply) => {
                if let Some(values) = &self.config.values {
                    // Large results are fetched now, while their endpoint surely holds them.
                    for value in records
                        .iter()
                        .filter_map(|r| r.outcome.as_ref()?.value_ref().cloned())
                    {
                        let blobs = values.blobs.clone();
                        self.tracker.spawn(async move {
                            if let Err(e) = blobs.fetch(&value, from).await {
                                tracing::warn!(blob = %value.blake3, %from, error = %e, "cannot fetch a task's result; it is fetched again when asked for");
                            }
                        });
                    }
                }
                self.machine.results(from, records, loads, Now::current());
                replies.push(Box::new(move |_| {
                    let _ = reply.send(());
                }));
            }
            Cmd::Answered(peer, ids, res) => self.machine.answered(peer, ids, res, Now::current()),
            Cmd::Adverts(reply) => {
                let _ = reply.send(self.machine.adverts());
            }
            Cmd::OwnAdvert(a) => {
                let me = self.mesh.peer_id();
                self.machine.advert(me, a, Instant::now())
            }
            Cmd::Live(id, reply) => {
                let Some(t) = self.machine.live(&id).cloned() else {
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
                let fut = self.peers.request(
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
                let mut found = HashMap::new();
                let mut stored = Vec::new();
                for id in &ids {
                    if self.machine.live(id).is_some() {
                        continue;
                    }
                    match self.machine.done_task(id) {
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
        let w = self.next_waiter;
        self.next_waiter += 1;
        self.machine.add_waiter(w, ids, found);
        self.replies_to_waiters.insert(w, reply);
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

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Gossip {
                topic,
                source,
                data,
            } if topic == ADVERT_TOPIC => match Advert::decode(&data) {
                Ok(a) => self.machine.advert(source, a, Instant::now()),
                Err(e) => tracing::debug!(peer = %source, error = %e, "ignored a malformed advert"),
            },
            Event::MemberConnected(m) => {
                if let Ok(peer) = m.peer_id.parse::<PeerId>() {
                    self.machine.connected(peer, true);
                    self.send(Some(peer));
                }
            }
            Event::MemberDisconnected(peer) => self.machine.connected(peer, false),
            _ => {}
        }
    }

    /// Drops finished tasks older than the retention. `full`: every stored task is read;
    /// otherwise only those whose id was made before the horizon (a task cannot have finished
    /// before it was made), which misses only ids of older versions, without their time.
    async fn sweep(&mut self, full: bool) {
        let horizon = now_us().saturating_sub(self.config.retention.as_micros() as u64);
        let gone = self
            .store
            .blocking(move |s| {
                let mut ops = Vec::new();
                let mut values = Vec::new();
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
                            values.extend(t.submission.args_ref().cloned());
                            values.extend(t.outcome.as_ref().and_then(|o| o.value_ref()).cloned());
                        }
                    }
                }
                if !ops.is_empty() {
                    s.batch_unsynced(&ops)?;
                }
                Ok(values)
            })
            .await;
        // The task's large values go with it.
        if let (Ok(gone), Some(v)) = (gone, &self.config.values) {
            for value in gone {
                v.blobs.release(&value);
            }
        }
    }
}
