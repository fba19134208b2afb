//! The worker pool's scheduler, sans-IO: tasks, worker events and `now` go in; actions (spawn,
//! send, kill, finish) come out. The endpoint's driver does the IO. Keeping it pure is what lets
//! the warm-pool strategies, eviction and the timeout rules be tested deterministically.
//!
//! Rules:
//! * Tasks queue per *lane*: environment and tenant (the submitting institution). A worker only
//!   ever runs one tenant's code: it is bound to the tenant of its first batch, and prewarmed
//!   workers start unbound and are bound when first used (a new spare is started in their place).
//!   What follows says "environment" for a lane.
//! * An idle worker of the task's environment takes a batch
//!   (`ceil(queued / idle workers)`, at most `batch_max`); otherwise a worker is started if the
//!   pool has room (`max_workers`, and `container_cap` for containers). When it has none, the
//!   least recently used idle worker of another environment is evicted, but only for an
//!   environment with no worker at all: one that has workers queues for them instead of paying a
//!   cold start. Likewise a task that a busy worker of its environment will take next starts no
//!   worker, unless it has waited longer than that environment's measured cold start.
//! * `cold`: a worker runs one task and is stopped. `warm`: idle workers stay until
//!   `idle_timeout`. `prewarm`: as `warm`, and `prewarm` workers per listed environment are kept
//!   running at all times.
//! * A worker runs its batch in order and answers in order, so the task it is running is the
//!   first unanswered one, and that task started no later than the previous answer arrived.
//!   Its deadline counts from then, so a timeout never fires early. An answer for any other task
//!   (user code writing to the protocol pipe) is refused and the worker stopped.
//! * Killing a worker for a timeout or a cancel fails (or cancels) only the task it is running;
//!   the rest of its batch goes back to the front of the queue.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::{EndpointConfig, Strategy};
use crate::environment::Environment;
use crate::task::{FailureKind, Outcome, Status, TaskId};

/// A worker's id within its endpoint.
pub type WorkerId = u64;

/// Whose code a worker runs: the submitting institution (or, for tasks reloaded after a restart,
/// the submitting peer). Workers are never shared between tenants.
pub type Tenant = String;

/// Where a task waits: its environment and its tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Lane {
    env: Environment,
    tenant: Tenant,
}

/// A task waiting for a worker.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The task.
    pub id: TaskId,
    /// Its environment.
    pub env: Environment,
    /// Whose code it is.
    pub tenant: Tenant,
    /// How many bytes its arguments take (an upper bound), for the endpoint's byte limit.
    pub bytes: u64,
    /// Its time limit (zero: none).
    pub timeout: Duration,
    /// Extra time before the pool kills the worker, for workers that enforce the limit themselves
    /// (shell commands exit 124).
    pub grace: Duration,
}

/// Why the pool stops a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Idle past the idle timeout.
    Idle,
    /// Evicted to make room for another environment.
    Evicted,
    /// Its task ran past its time limit.
    Timeout,
    /// Its task was cancelled.
    Cancelled,
    /// `cold` strategy: its one task is done.
    Done,
    /// It asked to be replaced (it ran out of memory, or the function exited the interpreter).
    Recycle,
    /// The endpoint is shutting down.
    Shutdown,
    /// It did not start within the start timeout.
    StartTimeout,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a worker in `env`; report [`Pool::ready`] or [`Pool::exited`].
    Spawn {
        /// Its id.
        worker: WorkerId,
        /// Where.
        env: Environment,
    },
    /// Send these tasks to the worker, in order.
    Send {
        /// The worker.
        worker: WorkerId,
        /// The tasks.
        tasks: Vec<TaskId>,
        /// Whether the worker was started for them (a cold start).
        cold: bool,
    },
    /// Tell the worker to skip these tasks if it has not started them.
    Skip {
        /// The worker.
        worker: WorkerId,
        /// The tasks.
        tasks: Vec<TaskId>,
    },
    /// Kill the worker; report [`Pool::exited`] when it is gone.
    Kill {
        /// The worker.
        worker: WorkerId,
        /// Why.
        why: Stop,
    },
    /// The task entered a phase.
    Phase {
        /// The task.
        task: TaskId,
        /// `Queued` or `WaitingForWorker`.
        status: Status,
    },
    /// The task is over, without a result from a worker.
    Finish {
        /// The task.
        task: TaskId,
        /// How.
        outcome: Outcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Idle,
    Busy,
}

#[derive(Debug)]
struct Worker {
    env: Environment,
    /// The tenant it runs code for; `None` for a prewarmed worker not used yet.
    tenant: Option<Tenant>,
    state: State,
    spawned: Instant,
    last_used: Instant,
    runs: u64,
    outstanding: VecDeque<TaskId>,
    /// When the first outstanding task became first: it started no later than this.
    front_since: Instant,
    stopping: bool,
}

#[derive(Debug)]
struct Task {
    lane: Lane,
    bytes: u64,
    timeout: Duration,
    grace: Duration,
    queued_at: Instant,
    worker: Option<WorkerId>,
    cancelled: bool,
}

/// An environment's load, for advertisements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvLoad {
    /// Idle workers.
    pub idle: usize,
    /// Busy workers.
    pub busy: usize,
    /// Workers starting.
    pub starting: usize,
    /// Tasks queued.
    pub queued: usize,
    /// Measured cold start, milliseconds (exponentially weighted), if measured.
    pub cold_start_ms: Option<u64>,
}

/// The pool's load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    /// `max_workers`.
    pub max_workers: usize,
    /// Workers running (any state).
    pub workers: usize,
    /// Idle workers.
    pub idle: usize,
    /// Tasks queued or running.
    pub queued: usize,
    /// Their arguments' bytes (an upper bound).
    pub queued_bytes: u64,
    /// Tasks and argument bytes held per tenant.
    pub held_by: BTreeMap<Tenant, (usize, u64)>,
    /// Per environment.
    pub environments: BTreeMap<Environment, EnvLoad>,
}

/// The scheduler.
#[derive(Debug)]
pub struct Pool {
    max_workers: usize,
    container_cap: usize,
    strategy: Strategy,
    idle_timeout: Duration,
    start_timeout: Duration,
    batch_max: usize,
    prewarm: Vec<(Environment, usize)>,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker: WorkerId,
    queues: BTreeMap<Lane, VecDeque<TaskId>>,
    tasks: HashMap<TaskId, Task>,
    /// Tasks and argument bytes held per tenant.
    held: HashMap<Tenant, (usize, u64)>,
    held_bytes: u64,
    cold_ms: HashMap<Environment, f64>,
    actions: Vec<Action>,
}

impl Pool {
    /// A pool for `config`.
    pub fn new(config: &EndpointConfig) -> Pool {
        Pool {
            max_workers: config.max_workers.max(1),
            container_cap: config.container_cap,
            strategy: config.strategy,
            idle_timeout: config.idle_timeout,
            start_timeout: config.start_timeout,
            batch_max: config.batch_max.max(1),
            prewarm: config
                .prewarmed()
                .into_iter()
                .map(|e| (e, config.prewarm))
                .collect(),
            workers: BTreeMap::new(),
            next_worker: 1,
            queues: BTreeMap::new(),
            tasks: HashMap::new(),
            held: HashMap::new(),
            held_bytes: 0,
            cold_ms: HashMap::new(),
            actions: Vec::new(),
        }
    }

    /// Takes the actions produced so far.
    pub fn actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Whether the pool knows the task (queued or on a worker).
    pub fn has(&self, id: &TaskId) -> bool {
        self.tasks.contains_key(id)
    }

    /// Queues a task.
    pub fn submit(&mut self, q: Queued, now: Instant) {
        if self.tasks.contains_key(&q.id) {
            return;
        }
        let lane = Lane {
            env: q.env,
            tenant: q.tenant,
        };
        self.queues
            .entry(lane.clone())
            .or_default()
            .push_back(q.id.clone());
        let held = self.held.entry(lane.tenant.clone()).or_default();
        held.0 += 1;
        held.1 += q.bytes;
        self.held_bytes += q.bytes;
        self.actions.push(Action::Phase {
            task: q.id.clone(),
            status: Status::Queued,
        });
        self.tasks.insert(
            q.id,
            Task {
                lane,
                bytes: q.bytes,
                timeout: q.timeout,
                grace: q.grace,
                queued_at: now,
                worker: None,
                cancelled: false,
            },
        );
        self.schedule(now);
    }

    /// A worker said hello.
    pub fn ready(&mut self, worker: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if w.state != State::Starting {
            return;
        }
        w.state = State::Idle;
        w.last_used = now;
        let ms = now.saturating_duration_since(w.spawned).as_secs_f64() * 1000.0;
        let est = self.cold_ms.entry(w.env.clone()).or_insert(ms);
        *est = 0.7 * *est + 0.3 * ms;
        self.schedule(now);
    }

    /// A worker answered `task`. Returns whether the answer counts (the task was not cancelled
    /// or timed out meanwhile). `recycle`: the worker exits after this answer.
    pub fn result(&mut self, worker: WorkerId, task: &TaskId, recycle: bool, now: Instant) -> bool {
        let Some(w) = self.workers.get_mut(&worker) else {
            return false;
        };
        let Some(pos) = w.outstanding.iter().position(|t| t == task) else {
            return false;
        };
        if pos != 0 {
            // Only the running task may be answered. Another answer is forged (user code
            // writing to the protocol pipe) or comes from a broken worker: stop it.
            let front = w.outstanding.front().cloned();
            self.kill_running(worker, Stop::Recycle);
            if let Some(front) = front
                && self.forget(&front).is_some_and(|t| !t.cancelled)
            {
                self.actions.push(Action::Finish {
                    task: front,
                    outcome: Outcome::failed(
                        FailureKind::WorkerLost,
                        "the worker answered for a task other than the one it was running (a \
                         task writing to the worker's protocol pipe?); it was stopped",
                    ),
                });
            }
            self.schedule(now);
            return false;
        }
        w.outstanding.remove(pos);
        w.front_since = now;
        w.runs += 1;
        w.last_used = now;
        let now_idle = w.outstanding.is_empty() && !w.stopping;
        if now_idle {
            w.state = State::Idle;
        }
        let counts = self.forget(task).is_some_and(|t| !t.cancelled);
        if now_idle && self.strategy == Strategy::Cold {
            self.stop(worker, Stop::Done);
        }
        if recycle {
            self.stop(worker, Stop::Recycle);
        }
        self.schedule(now);
        counts
    }

    /// A worker is gone (it exited, was killed, or its pipe broke), with a reason for the user.
    pub fn exited(&mut self, worker: WorkerId, reason: &str, now: Instant) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        let mut rest = w.outstanding;
        if w.state == State::Starting && !w.stopping {
            self.start_failed(&w.env, reason);
        } else if let Some(front) = rest.pop_front() {
            if !w.stopping {
                if let Some(t) = self.forget(&front) {
                    if !t.cancelled {
                        self.actions.push(Action::Finish {
                            task: front,
                            outcome: Outcome::failed(
                                FailureKind::WorkerLost,
                                format!("the worker running this task died: {reason}"),
                            ),
                        });
                    }
                }
            } else {
                rest.push_front(front);
            }
        }
        self.requeue(rest);
        self.schedule(now);
    }

    /// A worker for `env` could not start (a missing image, no python3, a start that hangs):
    /// every task waiting for the environment would wait forever, so they fail now with the
    /// reason, unless a worker of it did start.
    fn start_failed(&mut self, env: &Environment, reason: &str) {
        // Only a worker that did start proves the environment works; other starting ones
        // would most likely fail the same way.
        let others_alive = self
            .workers
            .values()
            .any(|o| o.env == *env && !o.stopping && o.state != State::Starting);
        if others_alive {
            return;
        }
        let lanes: Vec<Lane> = self
            .queues
            .keys()
            .filter(|l| l.env == *env)
            .cloned()
            .collect();
        let waiting: Vec<TaskId> = lanes
            .iter()
            .flat_map(|l| self.queues.remove(l).unwrap_or_default())
            .collect();
        for id in waiting {
            self.forget(&id);
            self.actions.push(Action::Finish {
                task: id,
                outcome: Outcome::failed(
                    FailureKind::WorkerStart,
                    format!("no worker could start in environment {env}: {reason}"),
                ),
            });
        }
    }

    /// Cancels a task. Returns false if the pool does not have it.
    pub fn cancel(&mut self, task: &TaskId, now: Instant) -> bool {
        let Some(t) = self.tasks.get_mut(task) else {
            return false;
        };
        match t.worker {
            None => {
                if let Some(q) = self.queues.get_mut(&t.lane) {
                    q.retain(|x| x != task);
                }
                self.forget(task);
            }
            Some(worker) => {
                t.cancelled = true;
                let front = self
                    .workers
                    .get(&worker)
                    .and_then(|w| w.outstanding.front())
                    == Some(task);
                if front {
                    self.forget(task);
                    self.kill_running(worker, Stop::Cancelled);
                } else {
                    self.actions.push(Action::Skip {
                        worker,
                        tasks: vec![task.clone()],
                    });
                }
            }
        }
        self.actions.push(Action::Finish {
            task: task.clone(),
            outcome: Outcome::Cancelled {
                reason: "cancelled by the submitter".into(),
            },
        });
        self.schedule(now);
        true
    }

    /// Enforces time limits and idle timeouts, and keeps prewarmed workers.
    pub fn tick(&mut self, now: Instant) {
        if !self.start_timeout.is_zero() {
            let stuck: Vec<(WorkerId, Environment)> = self
                .workers
                .iter()
                .filter(|(_, w)| w.state == State::Starting && !w.stopping)
                .filter(|(_, w)| {
                    w.spawned
                        .checked_add(self.start_timeout)
                        .is_some_and(|due| now >= due)
                })
                .map(|(id, w)| (*id, w.env.clone()))
                .collect();
            for (id, env) in stuck {
                self.stop(id, Stop::StartTimeout);
                let why = format!(
                    "its worker did not start within {}",
                    humantime::format_duration(self.start_timeout)
                );
                self.start_failed(&env, &why);
            }
        }
        let mut overdue = Vec::new();
        for (id, w) in &self.workers {
            if w.stopping {
                continue;
            }
            if let Some(front) = w.outstanding.front() {
                if let Some(t) = self.tasks.get(front) {
                    // A submitter may ask for any limit: one past the clock's range never fires.
                    let due = w.front_since.checked_add(t.timeout.saturating_add(t.grace));
                    if !t.timeout.is_zero() && due.is_some_and(|due| now >= due) {
                        overdue.push((*id, front.clone(), t.timeout));
                    }
                }
            }
        }
        for (worker, task, limit) in overdue {
            self.forget(&task);
            self.kill_running(worker, Stop::Timeout);
            self.actions.push(Action::Finish {
                task,
                outcome: Outcome::failed(
                    FailureKind::Timeout,
                    format!(
                        "the task ran past its time limit of {}; the worker running it was stopped",
                        humantime::format_duration(limit)
                    ),
                ),
            });
        }
        if self.strategy != Strategy::Cold {
            let keep: HashMap<Environment, usize> = self.prewarm.iter().cloned().collect();
            let mut idle: Vec<(WorkerId, Instant, Environment, bool)> = self
                .workers
                .iter()
                .filter(|(_, w)| w.state == State::Idle && !w.stopping)
                .filter(|(_, w)| now >= w.last_used + self.idle_timeout)
                .map(|(id, w)| (*id, w.last_used, w.env.clone(), w.tenant.is_some()))
                .collect();
            idle.sort_by_key(|(_, at, _, _)| *at);
            // Prewarming keeps unbound spares; a bound worker idles out like any other.
            for (id, _, env, bound) in idle {
                if bound || self.spares(&env) > keep.get(&env).copied().unwrap_or(0) {
                    self.stop(id, Stop::Idle);
                }
            }
        }
        self.schedule(now);
    }

    /// Stops every worker, for shutdown.
    pub fn shutdown(&mut self) {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop(id, Stop::Shutdown);
        }
    }

    /// The current load.
    pub fn load(&self) -> Load {
        let mut envs: BTreeMap<Environment, EnvLoad> = BTreeMap::new();
        for w in self.workers.values().filter(|w| !w.stopping) {
            let e = envs.entry(w.env.clone()).or_default();
            match w.state {
                State::Starting => e.starting += 1,
                State::Idle => e.idle += 1,
                State::Busy => e.busy += 1,
            }
        }
        for (lane, q) in &self.queues {
            if !q.is_empty() {
                envs.entry(lane.env.clone()).or_default().queued += q.len();
            }
        }
        for (env, ms) in &self.cold_ms {
            envs.entry(env.clone()).or_default().cold_start_ms = Some(ms.round() as u64);
        }
        Load {
            max_workers: self.max_workers,
            workers: self.workers.values().filter(|w| !w.stopping).count(),
            idle: envs.values().map(|e| e.idle).sum(),
            queued: self.tasks.len(),
            queued_bytes: self.held_bytes,
            held_by: self.held.iter().map(|(t, h)| (t.clone(), *h)).collect(),
            environments: envs,
        }
    }

    /// Live workers that can take `lane`'s tasks.
    fn alive(&self, lane: &Lane) -> usize {
        self.workers
            .values()
            .filter(|w| serves(w, lane) && !w.stopping)
            .count()
    }

    /// Live prewarmed workers of `env` not bound to a tenant yet.
    fn spares(&self, env: &Environment) -> usize {
        self.workers
            .values()
            .filter(|w| &w.env == env && w.tenant.is_none() && !w.stopping)
            .count()
    }

    /// Removes a task, keeping the per-tenant counts.
    fn forget(&mut self, id: &TaskId) -> Option<Task> {
        let t = self.tasks.remove(id)?;
        self.held_bytes -= t.bytes;
        if let Some(held) = self.held.get_mut(&t.lane.tenant) {
            held.0 -= 1;
            held.1 -= t.bytes;
            if held.0 == 0 {
                self.held.remove(&t.lane.tenant);
            }
        }
        Some(t)
    }

    /// Puts tasks back at the front of their queues, in order.
    fn requeue(&mut self, tasks: VecDeque<TaskId>) {
        for id in tasks.into_iter().rev() {
            if let Some(t) = self.tasks.get_mut(&id) {
                if t.cancelled {
                    self.forget(&id);
                    continue;
                }
                t.worker = None;
                self.queues
                    .entry(t.lane.clone())
                    .or_default()
                    .push_front(id);
            }
        }
    }

    /// Kills a busy worker over its running task; the rest of its batch is requeued.
    fn kill_running(&mut self, worker: WorkerId, why: Stop) {
        if let Some(w) = self.workers.get_mut(&worker) {
            let mut rest = std::mem::take(&mut w.outstanding);
            rest.pop_front();
            self.stop(worker, why);
            self.requeue(rest);
        }
    }

    fn stop(&mut self, worker: WorkerId, why: Stop) {
        if let Some(w) = self.workers.get_mut(&worker) {
            if !w.stopping {
                w.stopping = true;
                self.actions.push(Action::Kill { worker, why });
            }
        }
    }

    fn room_for(&self, env: &Environment) -> bool {
        let live = self.workers.values().filter(|w| !w.stopping);
        let (total, containers) = live.fold((0, 0), |(t, c), w| {
            (t + 1, c + usize::from(w.env.is_container()))
        });
        total < self.max_workers && (!env.is_container() || containers < self.container_cap)
    }

    /// The least recently used idle worker that could make room for `lane`.
    fn victim(&self, lane: &Lane) -> Option<WorkerId> {
        let live = self.workers.values().filter(|w| !w.stopping).count();
        self.workers
            .iter()
            .filter(|(_, w)| w.state == State::Idle && !w.stopping && !serves(w, lane))
            // Evicting a host worker frees no container slot; it only helps under max_workers.
            .filter(|(_, w)| w.env.is_container() || live >= self.max_workers)
            .min_by_key(|(_, w)| w.last_used)
            .map(|(id, _)| *id)
    }

    fn spawn(&mut self, env: &Environment, tenant: Option<Tenant>, now: Instant) {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(
            id,
            Worker {
                env: env.clone(),
                tenant,
                state: State::Starting,
                spawned: now,
                last_used: now,
                runs: 0,
                outstanding: VecDeque::new(),
                front_since: now,
                stopping: false,
            },
        );
        self.actions.push(Action::Spawn {
            worker: id,
            env: env.clone(),
        });
    }

    fn schedule(&mut self, now: Instant) {
        // Oldest waiting task first, across lanes.
        let mut lanes: Vec<(Instant, Lane)> = self
            .queues
            .iter()
            .filter_map(|(lane, q)| {
                q.front()
                    .and_then(|id| self.tasks.get(id))
                    .map(|t| (t.queued_at, lane.clone()))
            })
            .collect();
        lanes.sort();
        for (_, lane) in lanes {
            let env = lane.env.clone();
            self.assign(&lane, now);
            // Start workers for what is still waiting, beyond those already starting.
            let starting = self
                .workers
                .values()
                .filter(|w| serves(w, &lane) && w.state == State::Starting && !w.stopping)
                .count();
            let waiting = self.queues.get(&lane).map_or(0, VecDeque::len);
            let busy = self
                .workers
                .values()
                .filter(|w| serves(w, &lane) && w.state == State::Busy && !w.stopping)
                .count();
            // Each busy worker will take one waiting task when it is done; start more only for
            // the rest, or once the oldest task has waited longer than a cold start would take
            // (then waiting costs more than starting).
            let mut needed = waiting.saturating_sub(starting + busy);
            if needed == 0 && waiting > starting {
                let cold = self
                    .cold_ms
                    .get(&env)
                    .map_or(Duration::from_millis(200), |ms| {
                        Duration::from_secs_f64(ms / 1000.0)
                    });
                let oldest = self
                    .queues
                    .get(&lane)
                    .and_then(|q| q.front())
                    .and_then(|id| self.tasks.get(id))
                    .map(|t| t.queued_at);
                if oldest.is_some_and(|at| now.saturating_duration_since(at) >= cold) {
                    needed = 1;
                }
            }
            // Evict only to give an environment its first worker: one that already has workers
            // waits for them rather than cold-start another in someone else's place.
            let present = self.alive(&lane) > 0;
            while needed > 0 {
                if !self.room_for(&env) {
                    if present {
                        break;
                    }
                    match self.victim(&lane) {
                        Some(v) => self.stop(v, Stop::Evicted),
                        None => break,
                    }
                    if !self.room_for(&env) {
                        continue;
                    }
                }
                self.spawn(&env, Some(lane.tenant.clone()), now);
                needed -= 1;
            }
            // Mark the tasks that wait for a starting worker: their cold start.
            let starting = self
                .workers
                .values()
                .filter(|w| serves(w, &lane) && w.state == State::Starting && !w.stopping)
                .count();
            if let Some(q) = self.queues.get(&lane) {
                for id in q.iter().take(starting) {
                    self.actions.push(Action::Phase {
                        task: id.clone(),
                        status: Status::WaitingForWorker,
                    });
                }
            }
        }
        // Keep prewarmed environments stocked.
        for (env, n) in self.prewarm.clone() {
            while self.spares(&env) < n && self.room_for(&env) {
                self.spawn(&env, None, now);
            }
        }
    }

    fn assign(&mut self, lane: &Lane, now: Instant) {
        // Workers already bound to the tenant first, so that spares stay spare.
        let mut idle: Vec<(bool, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| serves(w, lane) && w.state == State::Idle && !w.stopping)
            .map(|(id, w)| (w.tenant.is_none(), *id))
            .collect();
        idle.sort();
        let idle: Vec<WorkerId> = idle.into_iter().map(|(_, id)| id).collect();
        // Workers still starting for this lane will take their share when ready.
        let starting = self
            .workers
            .values()
            .filter(|w| serves(w, lane) && w.state == State::Starting && !w.stopping)
            .count();
        let Some(queue) = self.queues.get_mut(lane) else {
            return;
        };
        let mut left = idle.len() + starting;
        for worker in idle {
            if queue.is_empty() {
                break;
            }
            let per = if self.strategy == Strategy::Cold {
                1
            } else {
                queue.len().div_ceil(left).min(self.batch_max)
            };
            left -= 1;
            let batch: Vec<TaskId> = queue.drain(..per.min(queue.len())).collect();
            let w = self.workers.get_mut(&worker).expect("listed above");
            // A worker that never ran anything and started after the task queued was started
            // for it: that task waited for a cold start.
            let first = &batch[0];
            let cold = w.runs == 0
                && self
                    .tasks
                    .get(first)
                    .is_some_and(|t| t.queued_at <= w.spawned);
            w.tenant = Some(lane.tenant.clone());
            w.state = State::Busy;
            w.front_since = now;
            w.last_used = now;
            w.outstanding.extend(batch.iter().cloned());
            for id in &batch {
                if let Some(t) = self.tasks.get_mut(id) {
                    t.worker = Some(worker);
                }
            }
            self.actions.push(Action::Send {
                worker,
                tasks: batch,
                cold,
            });
        }
        if queue.is_empty() {
            self.queues.remove(lane);
        }
    }
}

/// Whether `w` may run `lane`'s tasks: same environment, and bound to the same tenant or not yet
/// bound.
fn serves(w: &Worker, lane: &Lane) -> bool {
    w.env == lane.env && w.tenant.as_ref().is_none_or(|t| *t == lane.tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: Strategy, max: usize) -> EndpointConfig {
        EndpointConfig {
            strategy,
            max_workers: max,
            container_cap: 2,
            idle_timeout: Duration::from_secs(10),
            prewarm: 1,
            prewarm_environments: vec!["host".into()],
            ..EndpointConfig::default()
        }
    }

    fn task(n: u8, env: &Environment) -> Queued {
        Queued {
            id: TaskId::try_from(format!("{n:032x}")).unwrap(),
            env: env.clone(),
            tenant: "inst-a".into(),
            bytes: 10,
            timeout: Duration::from_secs(5),
            grace: Duration::ZERO,
        }
    }

    fn spawned(actions: &[Action]) -> Vec<WorkerId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { worker, .. } => Some(*worker),
                _ => None,
            })
            .collect()
    }

    fn sent(actions: &[Action]) -> Vec<(WorkerId, Vec<TaskId>, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    worker,
                    tasks,
                    cold,
                } => Some((*worker, tasks.clone(), *cold)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_task_starts_a_worker_then_reuses_it_warm() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 2));
        p.submit(task(1, &host), t0);
        let a = p.actions();
        let w = spawned(&a);
        assert_eq!(w.len(), 1);
        assert!(a.contains(&Action::Phase {
            task: task(1, &host).id,
            status: Status::WaitingForWorker
        }));
        p.ready(w[0], t0 + Duration::from_millis(40));
        let s = sent(&p.actions());
        assert_eq!(s, vec![(w[0], vec![task(1, &host).id], true)]);
        assert!(p.result(
            w[0],
            &task(1, &host).id,
            false,
            t0 + Duration::from_millis(50)
        ));
        p.submit(task(2, &host), t0 + Duration::from_millis(60));
        let a = p.actions();
        assert!(spawned(&a).is_empty(), "the warm worker is reused");
        assert_eq!(sent(&a), vec![(w[0], vec![task(2, &host).id], false)]);
        assert_eq!(
            p.load().environments[&host].cold_start_ms,
            Some(40),
            "the cold start was measured"
        );
    }

    #[test]
    fn cold_strategy_uses_a_fresh_worker_per_task() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Cold, 2));
        p.submit(task(1, &host), t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0);
        p.actions();
        assert!(p.result(w, &task(1, &host).id, false, t0));
        let a = p.actions();
        assert!(a.contains(&Action::Kill {
            worker: w,
            why: Stop::Done
        }));
        p.submit(task(2, &host), t0);
        assert_eq!(spawned(&p.actions()).len(), 1);
    }

    #[test]
    fn many_tasks_are_split_in_batches_over_idle_workers() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 2));
        p.submit(task(0, &host), t0);
        p.submit(task(1, &host), t0);
        let ws = spawned(&p.actions());
        assert_eq!(ws.len(), 2);
        for w in &ws {
            p.ready(*w, t0);
        }
        let s = sent(&p.actions());
        assert_eq!(s.len(), 2);
        for (w, tasks, _) in s {
            for t in tasks {
                assert!(p.result(w, &t, false, t0));
            }
        }
        p.actions();
        for n in 10..110 {
            p.submit(task(n, &host), t0);
        }
        // The first submission went straight to an idle worker; the rest queue behind.
        let total: usize = sent(&p.actions()).iter().map(|(_, t, _)| t.len()).sum();
        assert!(total >= 2, "{total}");
    }

    #[test]
    fn a_worker_that_never_starts_is_given_up_and_its_tasks_fail_with_the_reason() {
        let t0 = Instant::now();
        let img = Environment::parse("docker:hangs").unwrap();
        let mut p = Pool::new(&EndpointConfig {
            start_timeout: Duration::from_secs(60),
            ..config(Strategy::Warm, 2)
        });
        p.submit(task(1, &img), t0);
        p.submit(task(2, &img), t0);
        let w = spawned(&p.actions());
        assert_eq!(w.len(), 2, "{w:?}");
        p.tick(t0 + Duration::from_secs(59));
        let early = p.actions();
        assert!(
            early
                .iter()
                .all(|a| !matches!(a, Action::Kill { .. } | Action::Finish { .. })),
            "not yet: {early:?}"
        );
        p.tick(t0 + Duration::from_secs(60));
        let a = p.actions();
        for w in &w {
            assert!(a.contains(&Action::Kill {
                worker: *w,
                why: Stop::StartTimeout
            }));
        }
        let failed: Vec<&Outcome> = a
            .iter()
            .filter_map(|x| match x {
                Action::Finish { outcome, .. } => Some(outcome),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 2, "{a:?}");
        for o in failed {
            let Outcome::Failed { error, .. } = o else {
                panic!("{o:?}")
            };
            assert_eq!(error.kind, FailureKind::WorkerStart);
            assert!(
                error.message.contains("did not start within 1m"),
                "{}",
                error.message
            );
        }
        // Their slots are free again once they are gone: a later task starts a new worker.
        for w in w {
            p.exited(w, "killed", t0 + Duration::from_secs(61));
        }
        let after = p.actions();
        assert!(
            after
                .iter()
                .all(|a| !matches!(a, Action::Spawn { .. } | Action::Finish { .. })),
            "nothing else fails or starts: {after:?}"
        );
        p.submit(task(3, &img), t0 + Duration::from_secs(62));
        assert_eq!(spawned(&p.actions()).len(), 1);
    }

    #[test]
    fn a_time_limit_past_the_clocks_range_never_fires() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 1));
        let mut t = task(0, &host);
        t.timeout = Duration::from_millis(u64::MAX);
        t.grace = Duration::from_secs(2);
        p.submit(t, t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0);
        assert_eq!(sent(&p.actions()).len(), 1);
        p.tick(t0 + Duration::from_secs(3600));
        assert!(
            p.actions()
                .iter()
                .all(|a| !matches!(a, Action::Kill { .. } | Action::Finish { .. }))
        );
    }

    #[test]
    fn a_timeout_kills_only_the_running_task_and_requeues_the_rest() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 1));
        p.submit(task(0, &host), t0);
        let w = spawned(&p.actions())[0];
        p.submit(task(1, &host), t0);
        p.submit(task(2, &host), t0);
        p.ready(w, t0);
        let s = sent(&p.actions());
        assert_eq!(s[0].1.len(), 3);
        p.tick(t0 + Duration::from_secs(4));
        assert!(
            p.actions()
                .iter()
                .all(|a| !matches!(a, Action::Kill { .. }))
        );
        p.tick(t0 + Duration::from_secs(6));
        let a = p.actions();
        assert!(a.contains(&Action::Kill {
            worker: w,
            why: Stop::Timeout
        }));
        assert!(a.iter().any(|x| matches!(x, Action::Finish { task, outcome: Outcome::Failed { error, .. } } if *task == task_id(0) && error.kind == FailureKind::Timeout)));
        let w2 = spawned(&a);
        assert_eq!(w2.len(), 1, "a new worker starts for the requeued tasks");
        p.exited(w, "killed", t0 + Duration::from_secs(6));
        assert!(spawned(&p.actions()).is_empty());
        p.ready(w2[0], t0 + Duration::from_secs(7));
        let s = sent(&p.actions());
        assert_eq!(s[0].1, vec![task_id(1), task_id(2)]);
    }

    fn task_id(n: u8) -> TaskId {
        task(n, &Environment::host()).id
    }

    #[test]
    fn cancelling_the_running_task_kills_its_worker_and_a_queued_one_skips() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 1));
        p.submit(task(0, &host), t0);
        p.submit(task(1, &host), t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0);
        p.actions();
        assert!(p.cancel(&task_id(1), t0));
        let a = p.actions();
        assert!(a.contains(&Action::Skip {
            worker: w,
            tasks: vec![task_id(1)]
        }));
        assert!(p.cancel(&task_id(0), t0));
        let a = p.actions();
        assert!(a.contains(&Action::Kill {
            worker: w,
            why: Stop::Cancelled
        }));
        assert!(!p.cancel(&task_id(0), t0), "already gone");
        assert!(
            !p.result(w, &task_id(1), false, t0),
            "a skipped task's answer does not count"
        );
    }

    /// Issue 17: user code that writes to the protocol pipe answers for a later task of its
    /// worker's batch. The pool takes answers only for the task the worker is running.
    #[test]
    fn an_answer_for_a_task_the_worker_is_not_running_is_refused_and_stops_it() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Warm, 1));
        p.submit(task(0, &host), t0);
        p.submit(task(1, &host), t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0);
        let a = p.actions();
        assert!(a.contains(&Action::Send {
            worker: w,
            tasks: vec![task_id(0), task_id(1)],
            cold: true
        }));
        assert!(!p.result(w, &task_id(1), false, t0), "forged");
        let a = p.actions();
        assert!(a.contains(&Action::Kill {
            worker: w,
            why: Stop::Recycle
        }));
        assert!(a.iter().any(|x| matches!(x, Action::Finish { task, outcome: Outcome::Failed { error, .. } } if *task == task_id(0) && error.kind == FailureKind::WorkerLost)));
        assert!(
            p.has(&task_id(1)),
            "the forged task is requeued, to run for real"
        );
        assert!(
            !p.result(w, &task_id(0), false, t0),
            "the stopped worker counts no more"
        );
    }

    /// Issue 17: a worker runs one institution's code only; a prewarmed spare is bound to the
    /// first institution that uses it and replaced.
    #[test]
    fn workers_are_never_shared_between_institutions() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Prewarm, 4));
        p.tick(t0);
        let spare = spawned(&p.actions())[0];
        p.ready(spare, t0);
        p.actions();
        let t1 = t0 + Duration::from_secs(1);
        let mut a_task = task(0, &host);
        a_task.tenant = "inst-a".into();
        p.submit(a_task, t1);
        let a = p.actions();
        assert!(a.contains(&Action::Send {
            worker: spare,
            tasks: vec![task_id(0)],
            cold: false
        }));
        let replacement = spawned(&a);
        assert_eq!(
            replacement.len(),
            1,
            "a new spare replaces the bound one: {a:?}"
        );
        assert!(p.result(spare, &task_id(0), false, t1));
        p.actions();
        // inst-b's task does not go to inst-a's idle worker: the spare takes it.
        let mut b_task = task(1, &host);
        b_task.tenant = "inst-b".into();
        p.submit(b_task, t1);
        let a = p.actions();
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::Send { worker, .. } if *worker == spare)),
            "{a:?}"
        );
        p.ready(replacement[0], t1);
        let a = p.actions();
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Send { worker, tasks, .. }
                if *worker == replacement[0] && *tasks == vec![task_id(1)])),
            "{a:?}"
        );
        // inst-a's next task reuses its own warm worker.
        let mut again = task(2, &host);
        again.tenant = "inst-a".into();
        p.submit(again, t1);
        let a = p.actions();
        assert!(
            a.contains(&Action::Send {
                worker: spare,
                tasks: vec![task_id(2)],
                cold: false
            }),
            "{a:?}"
        );
    }

    #[test]
    fn a_crashed_worker_fails_its_task_and_an_unstartable_environment_fails_its_queue() {
        let t0 = Instant::now();
        let host = Environment::host();
        let img = Environment::parse("docker:missing").unwrap();
        let mut p = Pool::new(&config(Strategy::Warm, 2));
        p.submit(task(0, &host), t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0);
        p.actions();
        p.exited(w, "exit status 1", t0);
        let a = p.actions();
        assert!(a.iter().any(|x| matches!(x, Action::Finish { outcome: Outcome::Failed { error, .. }, .. } if error.kind == FailureKind::WorkerLost)));
        p.submit(task(1, &img), t0);
        p.submit(task(2, &img), t0);
        let ws = spawned(&p.actions());
        for w in ws {
            p.exited(w, "Unable to find image", t0);
        }
        let fails = p
            .actions()
            .into_iter()
            .filter(|x| matches!(x, Action::Finish { outcome: Outcome::Failed { error, .. }, .. } if error.kind == FailureKind::WorkerStart && error.message.contains("Unable to find image")))
            .count();
        assert_eq!(fails, 2);
        assert_eq!(p.load().queued, 0);
    }

    #[test]
    fn the_least_recently_used_idle_container_is_evicted_under_the_cap() {
        let t0 = Instant::now();
        let a_img = Environment::parse("docker:a").unwrap();
        let b_img = Environment::parse("docker:b").unwrap();
        let c_img = Environment::parse("docker:c").unwrap();
        let mut p = Pool::new(&config(Strategy::Warm, 8));
        let run = |p: &mut Pool, n: u8, env: &Environment, at: Instant| -> WorkerId {
            p.submit(task(n, env), at);
            let w = spawned(&p.actions())[0];
            p.ready(w, at);
            p.actions();
            assert!(p.result(w, &task(n, env).id, false, at));
            p.actions();
            w
        };
        let wa = run(&mut p, 1, &a_img, t0);
        let _wb = run(&mut p, 2, &b_img, t0 + Duration::from_secs(1));
        p.submit(task(3, &c_img), t0 + Duration::from_secs(2));
        let acts = p.actions();
        assert!(acts.contains(&Action::Kill {
            worker: wa,
            why: Stop::Evicted
        }));
        assert_eq!(spawned(&acts).len(), 1);
    }

    #[test]
    fn a_busy_environment_waits_for_its_worker_instead_of_evicting_another() {
        let t0 = Instant::now();
        let a = Environment::parse("docker:a").unwrap();
        let b = Environment::parse("docker:b").unwrap();
        let mut p = Pool::new(&config(Strategy::Warm, 2));
        p.submit(task(1, &a), t0);
        p.submit(task(2, &b), t0);
        let ws = spawned(&p.actions());
        assert_eq!(ws.len(), 2);
        for w in &ws {
            p.ready(*w, t0);
        }
        p.actions();
        // b's worker finishes and idles; a's is still busy when another task for a arrives.
        assert!(p.result(ws[1], &task(2, &b).id, false, t0));
        p.actions();
        p.submit(task(3, &a), t0);
        let acts = p.actions();
        assert!(
            spawned(&acts).is_empty() && !acts.iter().any(|x| matches!(x, Action::Kill { .. })),
            "{acts:?}"
        );
        // When a's worker is done, it takes the queued task, warm.
        assert!(p.result(ws[0], &task(1, &a).id, false, t0));
        assert_eq!(
            sent(&p.actions()),
            vec![(ws[0], vec![task(3, &a).id], false)]
        );
    }

    #[test]
    fn a_task_behind_a_long_one_gets_its_own_worker_after_a_cold_start_time() {
        let t0 = Instant::now();
        let host = Environment::host();
        let ms = Duration::from_millis;
        let mut p = Pool::new(&config(Strategy::Warm, 2));
        p.submit(task(1, &host), t0);
        let w = spawned(&p.actions())[0];
        p.ready(w, t0 + ms(100)); // a cold start of 100 ms
        p.actions();
        p.submit(task(2, &host), t0 + ms(100));
        assert!(
            spawned(&p.actions()).is_empty(),
            "it may be done in a moment"
        );
        p.tick(t0 + ms(150));
        assert!(spawned(&p.actions()).is_empty());
        p.tick(t0 + ms(210));
        assert_eq!(
            spawned(&p.actions()).len(),
            1,
            "waiting now costs more than starting"
        );
    }

    #[test]
    fn idle_workers_expire_but_prewarmed_ones_stay() {
        let t0 = Instant::now();
        let host = Environment::host();
        let mut p = Pool::new(&config(Strategy::Prewarm, 2));
        p.tick(t0);
        let w = spawned(&p.actions());
        assert_eq!(w.len(), 1, "one host worker is kept ready");
        p.ready(w[0], t0);
        p.tick(t0 + Duration::from_secs(60));
        assert!(p.actions().is_empty(), "the prewarmed worker stays");
        let mut warm = Pool::new(&config(Strategy::Warm, 2));
        warm.submit(task(1, &host), t0);
        let w = spawned(&warm.actions())[0];
        warm.ready(w, t0);
        warm.actions();
        warm.result(w, &task_id(1), false, t0);
        warm.tick(t0 + Duration::from_secs(9));
        assert!(warm.actions().is_empty());
        warm.tick(t0 + Duration::from_secs(11));
        assert_eq!(
            warm.actions(),
            vec![Action::Kill {
                worker: w,
                why: Stop::Idle
            }]
        );
    }
}
