//! The dispatcher's sans-IO core: which tasks are live, where each was sent, what to send next,
//! and what an answer, a result or the passing of time does to them.
//!
//! [`Machine`] owns no channel, socket, store or clock. The driver ([`super`]) feeds it events —
//! a submission, a peer's answer to a batch, a result, an advert, a tick — each with the time
//! ([`Now`]), and acts on what it hands back: the requests to send ([`Machine::sends`]), the
//! tasks to store ([`Machine::take_dirty`], [`Machine::done`]) and the waiters to answer
//! ([`Machine::ready_waiters`]). The router's randomness comes from a seed. So the same events
//! always give the same actions, which is what the simulation test (`tests/it/sim.rs`) relies on
//! to run thousands of lossy, reordering, crashing schedules and replay any one of them.
//!
//! Invariants kept here:
//! * a task is live until it is concluded, exactly once ([`Machine::done`] lists it once);
//! * an answer or a result speaks only for the attempt it was about: a Submit batch's answers
//!   pair with the tasks actually sent in it, and a peer that is no longer a task's current
//!   endpoint (the task was retried elsewhere) no longer acts on it;
//! * a task whose endpoint was lost is retried elsewhere while it has retries left; when no
//!   endpoint can take it yet (say, right after this node restarts, before any endpoint has
//!   advertised) it waits for a route until its deadline instead of failing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh::PeerId;
use serde_json::Value;

use serde::{Deserialize, Serialize};

use crate::Environment;
use crate::access::{Access, Verdict};
use crate::routing::{Advert, Candidate, EndpointLoad, Requirements, Router, Strategy};
use crate::task::{Encoding, FailureKind, Outcome, Record, Status, Submission, TaskError, TaskId};
use crate::wire::{Answer, MAX_BATCH, MAX_MESSAGE, TaskRequest, TaskResponse};

/// The most one batch of tasks to an endpoint may carry, by [`Submission::arguments_size_bound`]:
/// half of what one task-protocol message can.
const BATCH_BYTES: usize = MAX_MESSAGE / 2;
/// How long a peer that answered `Busy` (or could not be reached) is left alone.
const BACKOFF: Duration = Duration::from_millis(250);

/// Stored format version of [`Submitted`].
pub const SUBMITTED_VERSION: u32 = 1;

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
    /// The arguments by reference (a blob this node holds), instead of `args` and `kwargs`.
    pub args_ref: Option<crate::task::ValueRef>,
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
    /// The task's id, chosen by the caller (a flow's action derives it from its idempotency
    /// key), instead of a fresh one. A task this node already holds under that id is answered
    /// as it is, not submitted again.
    pub id: Option<TaskId>,
}

/// Why a task was not accepted. Its text is what the user reads; [`Refusal::kind`] is what a
/// program matches on (the API sends both).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its arguments are malformed or too large.
    #[error("{0}")]
    Arguments(String),
    /// Its function names a container this node cannot run anything in (say, an unknown
    /// runtime).
    #[error("{0}")]
    Environment(String),
    /// No endpoint can run it: the reason for each endpoint considered.
    #[error("{0}")]
    NoRoute(#[from] crate::routing::NoRoute),
    /// Accepted, then not found in the store (its write failed: the node's log says why).
    #[error("task {0} was accepted but is not stored: see the node's log")]
    Unstored(TaskId),
}

impl Refusal {
    /// A stable name for the kind of refusal: `arguments`, `environment`, `no_route`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Arguments(_) => "arguments",
            Refusal::Environment(_) => "environment",
            Refusal::NoRoute(_) => "no_route",
            Refusal::Unstored(_) => "internal",
        }
    }
}

/// The time, as the machine sees it: a monotonic instant for deadlines, and Unix microseconds
/// for what is stored and shown.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Wall-clock time, Unix microseconds.
    pub unix_us: u64,
}

impl Now {
    /// The current time.
    pub fn current() -> Now {
        Now {
            at: Instant::now(),
            unix_us: crate::task::now_us(),
        }
    }
}

/// What the machine is told once.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node.
    pub me: PeerId,
    /// An endpoint whose node has not advertised for this long is lost.
    pub lost_after: Duration,
    /// How long a task with retries left waits for an endpoint that can take its retry (when
    /// its own time limit is not longer).
    pub route_wait: Duration,
    /// This node's institution.
    pub institution: Option<String>,
    /// Access policies and the tokens this node holds.
    pub access: Arc<Access>,
    /// Seeds the router's random choices.
    pub seed: u64,
}

/// A request for the driver to send.
#[derive(Debug)]
pub struct Outgoing {
    /// To whom.
    pub peer: PeerId,
    /// The tasks it carries, in the order of its answers (give them back to
    /// [`Machine::answered`]).
    pub ids: Vec<TaskId>,
    /// The request.
    pub request: TaskRequest,
}

/// A caller waiting for a set of tasks to finish.
#[derive(Debug)]
struct Waiter {
    ids: Vec<TaskId>,
    remaining: HashSet<TaskId>,
    found: HashMap<TaskId, Arc<Submitted>>,
}

/// The submitting side's state.
#[derive(Debug)]
pub struct Machine {
    settings: Settings,
    router: Router,
    candidates: Vec<Candidate>,
    live: HashMap<TaskId, Submitted>,
    /// The id an endpoint knows → the task.
    by_wire: HashMap<TaskId, TaskId>,
    /// Live tasks changed since the driver last stored them.
    dirty: HashSet<TaskId>,
    /// Tasks concluded since the driver last ended a turn.
    done: Vec<Arc<Submitted>>,
    /// Tasks waiting to be sent, per peer.
    unsent: BTreeMap<PeerId, Vec<TaskId>>,
    /// Peers not to send to before then (they were unreachable or busy).
    backoff: HashMap<PeerId, Instant>,
    /// Tasks whose endpoint was lost, with retries left, that no endpoint could take yet: until
    /// when each waits for one.
    awaiting_route: BTreeMap<TaskId, Instant>,
    started: Instant,
    waiters: HashMap<u64, Waiter>,
    waiting_on: HashMap<TaskId, Vec<u64>>,
}

/// The id an endpoint knows attempt `n` of task `id` by: the task id itself first, then a hash,
/// so that a retry on the same endpoint is a new task there.
fn wire_id(id: &TaskId, n: usize) -> TaskId {
    if n == 0 {
        return id.clone();
    }
    id.derived(n)
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

impl Machine {
    /// A machine with no tasks, started at `now`.
    pub fn new(settings: Settings, now: Instant) -> Machine {
        let mut router = Router::new(settings.seed, settings.lost_after);
        router.set_local(settings.me);
        Machine {
            settings,
            router,
            candidates: Vec::new(),
            live: HashMap::new(),
            by_wire: HashMap::new(),
            dirty: HashSet::new(),
            done: Vec::new(),
            unsent: BTreeMap::new(),
            backoff: HashMap::new(),
            awaiting_route: BTreeMap::new(),
            started: now,
            waiters: HashMap::new(),
            waiting_on: HashMap::new(),
        }
    }

    /// Takes back the unfinished tasks of an earlier run (from the store): each is sent again
    /// to its endpoint, which answers with what it knows, or, if its endpoint was lost and it
    /// was waiting for another, waits again.
    pub fn resume(&mut self, tasks: Vec<Submitted>, now: Instant) {
        for t in tasks {
            if t.status.is_terminal() {
                continue;
            }
            let Some(a) = t.attempts.last() else {
                continue;
            };
            self.by_wire.insert(a.wire_id.clone(), t.id.clone());
            if a.lost.is_some() {
                self.awaiting_route
                    .insert(t.id.clone(), now + self.route_wait(&t));
            } else if let Ok(peer) = a.target.peer.parse::<PeerId>() {
                self.unsent.entry(peer).or_default().push(t.id.clone());
            }
            self.live.insert(t.id.clone(), t);
        }
    }

    /// How long `t` may wait for a route.
    fn route_wait(&self, t: &Submitted) -> Duration {
        Duration::from_millis(t.submission.timeout_ms).max(self.settings.route_wait)
    }

    // --- what the mesh and the registry say --------------------------------------------------

    /// The endpoints the registry lists now.
    pub fn set_candidates(&mut self, candidates: Vec<Candidate>) {
        let nodes: HashSet<&PeerId> = candidates.iter().map(|c| &c.peer).collect();
        self.router.set_endpoint_nodes(nodes.len());
        self.candidates = candidates;
        self.router.invalidate();
    }

    /// A member connected or went away.
    pub fn connected(&mut self, peer: PeerId, up: bool) {
        self.router.connected(peer, up);
    }

    /// An endpoint node's advert (this node's own too).
    pub fn advert(&mut self, peer: PeerId, advert: Advert, now: Instant) {
        self.router.advert(peer, advert, now);
    }

    /// A round-trip time measured to a peer.
    pub fn rtt(&mut self, peer: PeerId, rtt: Duration) {
        self.router.rtt(peer, rtt);
    }

    /// The latest advert of every node heard from.
    pub fn adverts(&self) -> Vec<(PeerId, Advert)> {
        self.router.adverts()
    }

    // --- reading -----------------------------------------------------------------------------

    /// A live task.
    pub fn live(&self, id: &TaskId) -> Option<&Submitted> {
        self.live.get(id)
    }

    /// How many tasks are live.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// How many live tasks wait for an endpoint to take their retry.
    pub fn awaiting_route(&self) -> usize {
        self.awaiting_route.len()
    }

    /// A task concluded in this turn.
    pub fn done_task(&self, id: &TaskId) -> Option<&Arc<Submitted>> {
        self.done.iter().find(|t| &t.id == id)
    }

    /// The tasks concluded since the last [`Machine::end_turn`].
    pub fn done(&self) -> &[Arc<Submitted>] {
        &self.done
    }

    /// The live tasks changed since the last call, to store.
    pub fn take_dirty(&mut self) -> Vec<TaskId> {
        self.dirty.drain().collect()
    }

    /// Ends a turn: the concluded tasks are stored and announced. Returns how many there were.
    pub fn end_turn(&mut self) -> usize {
        let n = self.done.len();
        self.done.clear();
        n
    }

    // --- submitting --------------------------------------------------------------------------

    /// Routes a task and takes it on under `id` (to be stored in this turn's write, and sent to
    /// its endpoint): its id, or why no endpoint can run it.
    pub fn accept(&mut self, r: Request, id: TaskId, now: Now) -> Result<TaskId, Refusal> {
        let env =
            Environment::of(r.function.record.container.as_ref()).map_err(Refusal::Environment)?;
        // A token is attached when the task is sent (`sends`), once per batch; it is not
        // stored with the task.
        let c = self.route(
            &env,
            &r.requirements,
            r.strategy,
            &r.function.id,
            r.capability.as_deref(),
            &HashSet::new(),
            now,
        )?;
        let submitted_us = now.unix_us;
        let submission = Submission {
            id: id.clone(),
            endpoint: c.name.clone(),
            function: crdt_registry::record::FunctionRecord::clone(&r.function.record),
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
            args_ref: r.args_ref,
            encoding: r.encoding,
            timeout_ms: r.timeout_ms,
            submitted_us,
            capability: None,
        };
        // The function comes from the registry view, which lists a function only under its
        // content id: only the arguments need checking here.
        submission.check_args().map_err(Refusal::Arguments)?;
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
        tracing::debug!(task = %id, to = %c, peer = %c.peer, "task accepted");
        self.router.dispatched(c.peer, &c.name, &env);
        self.by_wire.insert(id.clone(), id.clone());
        self.unsent.entry(c.peer).or_default().push(id.clone());
        self.dirty.insert(id.clone());
        self.live.insert(id.clone(), t);
        Ok(id)
    }

    /// Chooses an endpoint among those this node may use (by policy, or with a capability
    /// token: `explicit`, or one it holds). The token itself is attached when the task is sent.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        env: &Environment,
        requirements: &Requirements,
        strategy: Strategy,
        function_id: &str,
        explicit: Option<&str>,
        exclude: &HashSet<String>,
        now: Now,
    ) -> Result<Candidate, crate::routing::NoRoute> {
        let access = self.settings.access.clone();
        let institution = self.settings.institution.clone();
        let unix = now.unix_us / 1_000_000;
        let check = |c: &Candidate| -> Result<(), String> {
            match crate::access::verdict(c.policy, c.institution.as_deref(), institution.as_deref())
            {
                Verdict::Admitted => Ok(()),
                Verdict::NeedsToken(_) if explicit.is_some() => Ok(()),
                Verdict::NeedsToken(why) => access
                    .token_for(&c.id, c.institution_key.as_ref(), function_id, unix)
                    .map(|_| ())
                    .map_err(|e| format!("{why}; {e}")),
                Verdict::Refused(why) => Err(why),
            }
        };
        let kind = format!("{function_id}\0{}", explicit.is_some());
        self.router.choose_memo(
            &kind,
            env,
            requirements,
            &check,
            strategy,
            &self.candidates,
            exclude,
            now.at,
        )
    }

    /// The token a task for `function` presents at the endpoint `endpoint` (registry id): the
    /// one its submitter gave, or one this node holds when the endpoint's policy asks for one.
    fn token_to_present(
        &self,
        endpoint: &str,
        function: &str,
        explicit: Option<&str>,
        now: Now,
    ) -> Option<String> {
        if let Some(t) = explicit {
            return Some(t.to_owned());
        }
        let c = self.candidates.iter().find(|c| c.id == endpoint)?;
        match crate::access::verdict(
            c.policy,
            c.institution.as_deref(),
            self.settings.institution.as_deref(),
        ) {
            Verdict::NeedsToken(_) => self
                .settings
                .access
                .token_for(
                    endpoint,
                    c.institution_key.as_ref(),
                    function,
                    now.unix_us / 1_000_000,
                )
                .ok(),
            _ => None,
        }
    }

    /// The requests that send the tasks waiting for their endpoint: to every peer not backing
    /// off, or to `only` (it just connected) whatever its backoff.
    pub fn sends(&mut self, only: Option<PeerId>, now: Now) -> Vec<Outgoing> {
        let peers: Vec<PeerId> = match only {
            Some(p) => vec![p],
            None => self.unsent.keys().copied().collect(),
        };
        let mut out = Vec::new();
        for peer in peers {
            if only.is_none() && self.backoff.get(&peer).is_some_and(|t| now.at < *t) {
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
                let mut sent: Vec<TaskId> = Vec::with_capacity(chunk.len());
                for id in chunk {
                    let Some(t) = self.live.get(id) else {
                        continue;
                    };
                    // Queued here before it was retried elsewhere (or while its endpoint is
                    // lost): it is not this peer's now.
                    if self.awaiting_route.contains_key(id)
                        || !t.target().is_some_and(|x| is_peer(&x.peer, &peer_s, &peer))
                    {
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
                            let i = self
                                .token_to_present(&key.0, &key.1, key.2.as_deref(), now)
                                .map(|text| match tokens.iter().position(|x| *x == text) {
                                    Some(i) => i,
                                    None => {
                                        tokens.push(text);
                                        tokens.len() - 1
                                    }
                                });
                            refs.insert(key, i);
                            i
                        }
                    };
                    let mut sub = t.submission.clone();
                    sub.capability = index.map(crate::access::token_ref);
                    tasks.push(sub);
                    sent.push(id.clone());
                }
                if tasks.is_empty() {
                    continue;
                }
                tracing::debug!(%peer, tasks = sent.len(), "sending tasks");
                tracing::trace!(%peer, tasks = ?sent, "sending tasks");
                out.push(Outgoing {
                    peer,
                    ids: sent,
                    request: TaskRequest::Submit { tasks, tokens },
                });
            }
        }
        out
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

    // --- answers and results -----------------------------------------------------------------

    /// Whether `peer` is the current endpoint node of the live task `id`.
    fn here(&self, id: &TaskId, peer: &PeerId, peer_s: &str) -> bool {
        !self.awaiting_route.contains_key(id)
            && self
                .live
                .get(id)
                .and_then(|t| t.target())
                .is_some_and(|x| is_peer(&x.peer, peer_s, peer))
    }

    /// A peer's answer to a request from [`Machine::sends`] (`ids` as it gave them), or why
    /// there was none.
    pub fn answered(
        &mut self,
        peer: PeerId,
        ids: Vec<TaskId>,
        res: Result<TaskResponse, String>,
        now: Now,
    ) {
        // A task may have moved on since it was sent here (its endpoint was lost, and it was
        // retried elsewhere): this peer's answer no longer speaks for it. (Answers pair with
        // `ids` by position, so `ids` itself stays whole.)
        let peer_s = peer.to_string();
        match res {
            Ok(TaskResponse::Submitted { answers, loads }) => {
                for l in loads {
                    self.router.fresh_load(peer, l);
                }
                for (id, answer) in ids.into_iter().zip(answers) {
                    match answer {
                        Answer::Accepted(rec) if rec.status.is_terminal() => {
                            self.record(rec, Some(&peer_s), now);
                        }
                        Answer::Accepted(Record { status, .. }) | Answer::Queued(status) => {
                            if self.here(&id, &peer, &peer_s) {
                                if let Some(t) = self.live.get_mut(&id) {
                                    // Kept in memory only: after a restart every unfinished
                                    // task is sent again and its endpoint answers afresh, so
                                    // storing this would cost a write per task for nothing.
                                    t.status = status;
                                }
                            }
                        }
                        Answer::Refused(_) if !self.here(&id, &peer, &peer_s) => {}
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
                                now,
                            );
                        }
                    }
                }
            }
            Ok(TaskResponse::Busy { reason }) => {
                tracing::debug!(%peer, %reason, "endpoint node busy; will send again");
                let still: Vec<TaskId> = ids
                    .into_iter()
                    .filter(|id| self.here(id, &peer, &peer_s))
                    .collect();
                self.backoff.insert(peer, now.at + BACKOFF);
                self.unsent.entry(peer).or_default().extend(still);
            }
            Ok(other) => {
                let why = match other {
                    TaskResponse::Refused { reason } => reason,
                    o => format!("unexpected answer {o:?}"),
                };
                let still: Vec<TaskId> = ids
                    .into_iter()
                    .filter(|id| self.here(id, &peer, &peer_s))
                    .collect();
                for id in still {
                    self.conclude(
                        &id,
                        Outcome::failed(
                            FailureKind::Refused,
                            format!("the endpoint's node refused the tasks: {why}"),
                        ),
                        None,
                        now,
                    );
                }
            }
            Err(e) => {
                // Unreachable for now: keep them; the loss check decides if it lasts.
                tracing::debug!(%peer, error = %e, "cannot send tasks; will retry");
                let still: Vec<TaskId> = ids
                    .into_iter()
                    .filter(|id| self.here(id, &peer, &peer_s))
                    .collect();
                if !still.is_empty() {
                    self.unsent.entry(peer).or_default().extend(still);
                }
            }
        }
    }

    /// Results from an endpoint's node, with its endpoints' load.
    pub fn results(
        &mut self,
        from: PeerId,
        records: Vec<Record>,
        loads: Vec<EndpointLoad>,
        now: Now,
    ) {
        for l in loads {
            self.router.fresh_load(from, l);
        }
        let from_s = from.to_string();
        for rec in records {
            self.record(rec, Some(&from_s), now);
        }
    }

    /// An endpoint's record of a task (`from`: the node that sent it, when it came from one):
    /// finishes the task if it is terminal and about its current attempt.
    pub fn record(&mut self, mut rec: Record, from: Option<&str>, now: Now) {
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
        if !current || !rec.status.is_terminal() {
            return;
        }
        // The outcome moves to the task (`Submitted::outcome`): kept, and stored, once.
        if let Some(outcome) = rec.outcome.take() {
            self.conclude(&id, outcome, Some(rec), now);
        }
    }

    /// The request that cancels a live task at its endpoint, if it has one to ask.
    pub fn cancel_request(&self, id: &TaskId) -> Option<(Option<PeerId>, TaskRequest)> {
        let t = self.live.get(id)?;
        let a = t.attempts.last()?;
        Some((
            a.target.peer.parse::<PeerId>().ok(),
            TaskRequest::Cancel {
                endpoint: a.target.endpoint.clone(),
                id: a.wire_id.clone(),
            },
        ))
    }

    /// The endpoint's answer to a cancel of `id` (or why there was none): the task ends
    /// cancelled, unless it had already finished there.
    pub fn cancelled(&mut self, id: &TaskId, res: Result<TaskResponse, String>, now: Now) {
        if !self.live.contains_key(id) {
            return;
        }
        match res {
            Ok(TaskResponse::Cancelled { record: Some(rec) }) if rec.status.is_terminal() => {
                self.record(rec, None, now)
            }
            Ok(other) => {
                let why = match other {
                    TaskResponse::Refused { reason } => {
                        format!(" (the endpoint said: {reason})")
                    }
                    _ => String::new(),
                };
                self.conclude(
                    id,
                    Outcome::Cancelled {
                        reason: format!("cancelled by the submitter{why}"),
                    },
                    None,
                    now,
                );
            }
            Err(e) => self.conclude(
                id,
                Outcome::Cancelled {
                    reason: format!(
                        "cancelled by the submitter; the endpoint could not be told ({e})"
                    ),
                },
                None,
                now,
            ),
        }
    }

    // --- endings and retries -----------------------------------------------------------------

    /// Ends a task, or retries it elsewhere if the failure was the endpoint's and retries
    /// remain (or lets it wait for an endpoint that can take it).
    fn conclude(&mut self, id: &TaskId, outcome: Outcome, record: Option<Record>, now: Now) {
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
            if let Some(a) = t.attempts.last_mut() {
                if a.lost.is_none() {
                    a.lost = Some(error.message.clone());
                }
            }
            if let Some(record) = record {
                t.record = Some(record);
            }
            self.dirty.insert(t.id.clone());
            self.live.insert(t.id.clone(), t);
            let deadline = self
                .awaiting_route
                .get(id)
                .copied()
                .unwrap_or_else(|| now.at + self.route_wait(&self.live[id]));
            self.awaiting_route.insert(id.clone(), deadline);
            self.retry(id, error.kind, now);
            return;
        }
        self.awaiting_route.remove(id);
        t.status = outcome.status();
        t.outcome = Some(outcome);
        if record.is_some() {
            t.record = record;
        }
        t.finished_us = now.unix_us;
        self.finish(t);
    }

    /// Tries to route a task waiting for a retry: sends it to a new endpoint, leaves it waiting,
    /// or, past its deadline, fails it saying why no endpoint could take it.
    fn retry(&mut self, id: &TaskId, kind: FailureKind, now: Now) {
        let Some(t) = self.live.get(id) else {
            self.awaiting_route.remove(id);
            return;
        };
        let mut exclude: HashSet<String> = HashSet::new();
        for a in &t.attempts {
            if kind == FailureKind::EndpointLost || a.lost.is_some() {
                exclude.insert(a.target.endpoint_id.clone());
            }
        }
        let env = Environment::of(t.submission.function.container.as_ref());
        let (requirements, strategy, function_id, capability) = (
            t.requirements.clone(),
            t.strategy,
            t.submission.function_id.clone(),
            t.capability.clone(),
        );
        let choice = env.and_then(|env| {
            self.route(
                &env,
                &requirements,
                strategy,
                &function_id,
                capability.as_deref(),
                &exclude,
                now,
            )
            .map(|c| (c, env))
            .map_err(|e| e.to_string())
        });
        let Some(mut t) = self.live.remove(id) else {
            return;
        };
        match choice {
            Ok((c, env)) => {
                self.awaiting_route.remove(id);
                t.retries_left -= 1;
                let wire = wire_id(&t.id, t.attempts.len());
                t.attempts.push(Attempt {
                    target: target(&c),
                    wire_id: wire.clone(),
                    at_us: now.unix_us,
                    lost: None,
                });
                t.submission.id = wire.clone();
                t.submission.endpoint = c.name.clone();
                t.status = Status::Pending;
                t.record = None;
                tracing::info!(task = %t.id, to = %c, "retrying a task whose endpoint was lost");
                self.router.dispatched(c.peer, &c.name, &env);
                self.by_wire.insert(wire, t.id.clone());
                self.unsent.entry(c.peer).or_default().push(t.id.clone());
                self.dirty.insert(t.id.clone());
                self.live.insert(t.id.clone(), t);
            }
            Err(why) => {
                let deadline = self.awaiting_route.get(id).copied().unwrap_or(now.at);
                if now.at < deadline {
                    tracing::debug!(task = %t.id, %why, "a retry waits for an endpoint");
                    t.status = Status::Pending;
                    self.live.insert(t.id.clone(), t);
                    return;
                }
                self.awaiting_route.remove(id);
                let lost = t
                    .attempts
                    .last()
                    .and_then(|a| a.lost.clone())
                    .unwrap_or_else(|| "its endpoint was lost".into());
                t.status = Status::Failed;
                t.outcome = Some(Outcome::Failed {
                    error: TaskError::new(
                        kind,
                        format!("{lost}; no other endpoint could take the retry: {why}"),
                    ),
                    value: None,
                });
                t.finished_us = now.unix_us;
                self.finish(t);
            }
        }
    }

    fn finish(&mut self, t: Submitted) {
        tracing::debug!(
            task = %t.id,
            status = %t.status,
            attempts = t.attempts.len(),
            endpoint = t.target().map(|x| x.endpoint.as_str()),
            "task concluded"
        );
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

    /// Time passes: endpoints not heard from for `lost_after` are lost (their tasks retried or
    /// failed), tasks waiting for a route try again.
    pub fn tick(&mut self, now: Now) {
        // Right after a start nothing has advertised yet: give the mesh time before calling
        // endpoints lost.
        if now.at < self.started + self.router.lost_after() {
            return;
        }
        let lost: Vec<(TaskId, Target)> = self
            .live
            .values()
            .filter(|t| !self.awaiting_route.contains_key(&t.id))
            .filter_map(|t| {
                let target = t.target()?;
                let peer = target.peer.parse::<PeerId>().ok()?;
                (peer != self.settings.me && !self.router.is_alive(&peer, now.at))
                    .then(|| (t.id.clone(), target.clone()))
            })
            .collect();
        for (id, target) in lost {
            let Some(t) = self.live.get(&id) else {
                continue;
            };
            let (status, retries_left) = (t.status, t.retries_left);
            self.conclude(
                &id,
                Outcome::failed(
                    FailureKind::EndpointLost,
                    format!(
                        "endpoint {} on {} was lost while the task was {status}: its node has not \
                         been heard from for {}{}",
                        target.endpoint,
                        target.node_name,
                        humantime::format_duration(self.router.lost_after()),
                        if retries_left == 0 {
                            " (submit with --retries N to retry elsewhere)"
                        } else {
                            ""
                        }
                    ),
                ),
                None,
                now,
            );
        }
        let waiting: Vec<TaskId> = self.awaiting_route.keys().cloned().collect();
        for id in waiting {
            self.retry(&id, FailureKind::EndpointLost, now);
        }
    }

    // --- waiters -----------------------------------------------------------------------------

    /// Registers waiter `w` for `ids`: it is ready once every one of them that is live now has
    /// finished (`found` holds the others).
    pub fn add_waiter(&mut self, w: u64, ids: Vec<TaskId>, found: HashMap<TaskId, Arc<Submitted>>) {
        let remaining: HashSet<TaskId> = ids
            .iter()
            .filter(|id| self.live.contains_key(*id))
            .cloned()
            .collect();
        for id in &remaining {
            self.waiting_on.entry(id.clone()).or_default().push(w);
        }
        self.waiters.insert(
            w,
            Waiter {
                ids,
                remaining,
                found,
            },
        );
    }

    /// The waiters whose tasks have all finished, or that `gone` says nobody listens to any
    /// more, with their tasks in the order asked (`None`: not found).
    #[allow(clippy::type_complexity)]
    pub fn ready_waiters(
        &mut self,
        gone: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Vec<Option<Arc<Submitted>>>)> {
        let ready: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(k, w)| w.remaining.is_empty() || gone(**k))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(ready.len());
        for k in ready {
            let Some(mut w) = self.waiters.remove(&k) else {
                continue;
            };
            for id in &w.remaining {
                if let Some(list) = self.waiting_on.get_mut(id) {
                    list.retain(|x| *x != k);
                    if list.is_empty() {
                        self.waiting_on.remove(id);
                    }
                }
            }
            let tasks = w.ids.iter().map(|id| w.found.remove(id)).collect();
            out.push((k, tasks));
        }
        out
    }
}

#[cfg(test)]
mod tests;
