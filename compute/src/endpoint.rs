//! The endpoint: a handle and the driver task that owns its pool, its workers and its tasks.
//!
//! Storage, in the `tasks` column family, batched per turn of the driver's loop:
//!
//! * `s/<endpoint>/<id>`: the submission, with its submitter and receipt time, stored before the
//!   task is acknowledged and kept until the submitter acknowledges the result. A finished task
//!   whose `s/` entry remains is in the *outbox*.
//! * `r/<endpoint>/<id>`: the task's record, written when it starts running and when it
//!   finishes (a queued task's record lives in memory only: its `s/` entry says all a restart
//!   needs).
//!
//! After a crash, tasks that had not started are queued again, and tasks that were running fail
//! with [`FailureKind::EndpointLost`]: they are never run twice by the endpoint itself (the
//! submitter decides about retries).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EndpointConfig;
use crate::environment::{self, Environment, Runtime};
use crate::isolation::HostIsolation;
use crate::pool::{Action, Load, Pool, Queued, WorkerId};
use crate::protocol::{self, ToWorker, WorkerResult, WorkerTask};
use crate::task::{
    FailureKind, Outcome, RECORD_VERSION, Record, Status, Submission, TaskError, TaskId, Times,
    now_us,
};
use crate::worker::{self, Launch, Report};

const WORKER_PY: &str = include_str!("worker.py");

/// Endpoint errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint has stopped.
    #[error("the endpoint has stopped")]
    Closed,
    /// Its configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Its working directory cannot be prepared.
    #[error("cannot prepare the endpoint's working directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

enum Cmd {
    Submit {
        submitter: String,
        tenant: String,
        tasks: Vec<Submission>,
        reply: oneshot::Sender<Vec<Result<Record, String>>>,
    },
    Cancel {
        id: TaskId,
        reply: oneshot::Sender<Option<Record>>,
    },
    Records {
        ids: Vec<TaskId>,
        reply: oneshot::Sender<Vec<Option<Record>>>,
    },
    Load(oneshot::Sender<Load>),
    Acknowledge(Vec<TaskId>),
    Unacknowledged(HashSet<TaskId>, oneshot::Sender<Vec<Record>>),
}

/// A cheap-clone handle to a running endpoint.
#[derive(Clone, Debug)]
pub struct Endpoint {
    name: String,
    workers_per: crate::config::WorkersPer,
    max_queued: usize,
    max_queued_bytes: u64,
    foreign_host_refused: bool,
    tx: mpsc::Sender<Cmd>,
    load: tokio::sync::watch::Receiver<Load>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

/// Finished tasks, as the endpoint reports them (the fast path; the outbox is the durable one).
pub type Results = mpsc::Receiver<Record>;

impl Endpoint {
    /// Starts the endpoint `config.name`: writes the worker script into `work_dir`, recovers
    /// stored tasks, and starts its driver under `tracker`. `label` names this node in container
    /// labels. Finished tasks arrive on the returned receiver.
    pub async fn start(
        config: EndpointConfig,
        values: Option<crate::blobs::Values>,
        store: store::Store,
        work_dir: &Path,
        label: &str,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(Endpoint, Results), Error> {
        config.validate().map_err(Error::Config)?;
        if !config
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || config.name.is_empty()
        {
            return Err(Error::Config(format!(
                "endpoint name `{}` may only use letters, digits, `-`, `_` and `.`",
                config.name
            )));
        }
        let work_dir = work_dir.join(&config.name);
        let wd = work_dir.clone();
        let worker_py = tokio::task::spawn_blocking(move || -> std::io::Result<PathBuf> {
            std::fs::create_dir_all(&wd)?;
            let path = wd.join("worker.py");
            let tmp = wd.join(".worker.py.tmp");
            std::fs::write(&tmp, WORKER_PY)?;
            std::fs::rename(&tmp, &path)?;
            Ok(path)
        })
        .await
        .map_err(|e| Error::WorkDir {
            path: work_dir.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| Error::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
        let mut config = config;
        config.python = resolve_python(&config.python).await;
        let isolation = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || HostIsolation::prepare(&config, WORKER_PY))
                .await
                .map_err(|e| Error::WorkDir {
                    path: std::env::temp_dir(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| Error::WorkDir {
                    path: std::env::temp_dir(),
                    source,
                })?
        };
        let label = format!("funcmesh.endpoint={label}.{}", config.name);
        for runtime in [Runtime::Docker, Runtime::Podman] {
            if config.runtimes.iter().any(|r| r == runtime.as_str()) {
                worker::remove_stale_containers(runtime, &label).await;
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let (results_tx, results_rx) = mpsc::channel(8192);
        let (reports_tx, reports_rx) = mpsc::channel(1024);
        let (load_tx, load_rx) = tokio::sync::watch::channel(Load::default());
        let mut driver = Driver {
            pool: Pool::new(&config),
            config: config.clone(),
            store,
            worker_py,
            work_dir,
            isolation,
            label,
            live: HashMap::new(),
            workers: HashMap::new(),
            reports_tx,
            results_tx,
            dirty: HashSet::new(),
            new_subs: Vec::new(),
            finished: Vec::new(),
            acks: Vec::new(),
            acks_since: None,
            closing: false,
            replies: Vec::new(),
            tracker: tracker.clone(),
            load_tx,
            verified: HashMap::new(),
            stored_functions: crate::task::stored::StoredFunctions::for_endpoint(&config.name),
            outbox_cursor: Vec::new(),
            outbox: Some(BTreeSet::new()),
            values,
            fetching: HashMap::new(),
        };
        driver.recover().await?;
        tracker.spawn(driver.run(rx, reports_rx, cancel));
        Ok((
            Endpoint {
                workers_per: config.workers_per,
                foreign_host_refused: !crate::isolation::available(&config)
                    && !config.foreign_host_tasks,
                max_queued: config.max_queued,
                max_queued_bytes: config.max_queued_bytes,
                name: config.name,
                tx,
                load: load_rx,
            },
            results_rx,
        ))
    }

    /// Whose tasks `from`'s are, for its workers and its shares: `from`'s institution (a
    /// coordinator, which has none, is its own), or with `workers_per = "node"` the node.
    pub fn tenant_of(&self, institution: Option<&str>, peer: &str) -> String {
        match (self.workers_per, institution) {
            (crate::config::WorkersPer::Institution, Some(i)) => i.to_owned(),
            _ => format!("peer:{peer}"),
        }
    }

    /// Whether it refuses host tasks of other institutions: its host workers run as the node's
    /// own user and the operator did not set `foreign_host_tasks`.
    pub fn refuses_foreign_host_tasks(&self) -> bool {
        self.foreign_host_refused
    }

    /// Why it cannot take `tasks` more tasks with `bytes` bytes of arguments from `tenant` now
    /// (the submitter keeps them and sends them again later), or `None`: it holds at most
    /// `max_queued` tasks and `max_queued_bytes`, and one institution at most half of each,
    /// so that another always finds room. An empty endpoint (or tenant) takes any one batch.
    pub fn pushback(&self, tenant: &str, tasks: usize, bytes: u64) -> Option<String> {
        let load = self.current_load();
        let name = &self.name;
        let (most, most_bytes) = (self.max_queued, self.max_queued_bytes);
        if load.queued > 0 && load.queued + tasks > most {
            return Some(format!(
                "endpoint `{name}` holds {} unfinished tasks and takes at most {most}: send \
                 these again later",
                load.queued
            ));
        }
        if load.queued_bytes > 0 && load.queued_bytes + bytes > most_bytes {
            return Some(format!(
                "endpoint `{name}` holds {} bytes of arguments and takes at most {most_bytes}: \
                 send these again later",
                load.queued_bytes
            ));
        }
        let (held, held_bytes) = load.held_by.get(tenant).copied().unwrap_or_default();
        let (share, share_bytes) = ((most / 2).max(1), (most_bytes / 2).max(1));
        if held > 0 && (held + tasks > share || held_bytes + bytes > share_bytes) {
            return Some(format!(
                "endpoint `{name}` holds {held} unfinished tasks ({held_bytes} bytes) of \
                 institution {tenant}, and one institution may hold at most half of its \
                 capacity ({share} tasks, {share_bytes} bytes): send these again later"
            ));
        }
        None
    }

    /// Most unfinished tasks it holds ([`EndpointConfig::max_queued`]).
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Accepts tasks from `submitter` (a peer id) of institution `tenant`: each is stored before
    /// this returns, or refused with the reason. A task id seen before returns its current record
    /// instead of running again. Workers never run two tenants' code.
    pub async fn submit(
        &self,
        submitter: &str,
        tenant: &str,
        tasks: Vec<Submission>,
    ) -> Result<Vec<Result<Record, String>>, Error> {
        let submitter = submitter.to_owned();
        let tenant = tenant.to_owned();
        self.ask(|reply| Cmd::Submit {
            submitter,
            tenant,
            tasks,
            reply,
        })
        .await
    }

    /// Cancels a task; returns its record (unchanged if it had already finished), or `None` if
    /// this endpoint does not know it.
    pub async fn cancel(&self, id: TaskId) -> Result<Option<Record>, Error> {
        self.ask(|reply| Cmd::Cancel { id, reply }).await
    }

    /// The records of these tasks.
    pub async fn records(&self, ids: Vec<TaskId>) -> Result<Vec<Option<Record>>, Error> {
        self.ask(|reply| Cmd::Records { ids, reply }).await
    }

    /// The pool's load.
    pub async fn load(&self) -> Result<Load, Error> {
        self.ask(Cmd::Load).await
    }

    /// The pool's load as of the driver's last turn, without asking it (for answers on the hot
    /// path).
    pub fn current_load(&self) -> Load {
        self.load.borrow().clone()
    }

    /// The submitter has these results: drop them from the outbox.
    pub async fn acknowledge(&self, ids: Vec<TaskId>) -> Result<(), Error> {
        self.tx
            .send(Cmd::Acknowledge(ids))
            .await
            .map_err(|_| Error::Closed)
    }

    /// Finished tasks whose results no submitter acknowledged yet (at most 1,000), except
    /// those in `except` (results on their way already).
    pub async fn unacknowledged(&self, except: HashSet<TaskId>) -> Result<Vec<Record>, Error> {
        self.ask(|reply| Cmd::Unacknowledged(except, reply)).await
    }
}

/// The interpreter behind `python` (a pyenv or conda shim costs a quarter of a second per
/// start; asking once saves it on every cold start). Falls back to `python` as given.
async fn resolve_python(python: &str) -> String {
    let out = tokio::process::Command::new(python)
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {
            let path = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if path.is_empty() {
                python.to_owned()
            } else {
                path
            }
        }
        _ => python.to_owned(),
    }
}

/// A stored value's JSON, written in one go into a buffer of about its size.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, v).expect("tasks and records serialise");
    out
}

fn rkey(endpoint: &str, id: &TaskId) -> Vec<u8> {
    task_key(b"r/", endpoint, id)
}
fn skey(endpoint: &str, id: &TaskId) -> Vec<u8> {
    task_key(b"s/", endpoint, id)
}
/// `<kind><endpoint>/<id>`, without `format!`'s machinery (a few of these per task).
fn task_key(kind: &[u8], endpoint: &str, id: &TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.len() + endpoint.len() + 1 + id.as_str().len());
    k.extend_from_slice(kind);
    k.extend_from_slice(endpoint.as_bytes());
    k.push(b'/');
    k.extend_from_slice(id.as_str().as_bytes());
    k
}
/// Outbox marks of stores written before `s/` entries doubled as the outbox; migrated on start.
fn legacy_okey_prefix(endpoint: &str) -> Vec<u8> {
    format!("o/{endpoint}/").into_bytes()
}

/// A submission as stored under `s/`: with what a restart needs to rebuild its record.
#[derive(serde::Serialize)]
struct PendingRef<'a> {
    submitter: &'a str,
    received_us: u64,
    sub: crate::task::stored::SansFunction<'a>,
}

#[derive(serde::Deserialize)]
struct StoredPending {
    submitter: String,
    received_us: u64,
    sub: crate::task::stored::StoredSubmission,
}

struct Pending {
    submitter: String,
    received_us: u64,
    sub: Submission,
}

struct Live {
    sub: Submission,
    rec: Record,
    /// Its arguments, fetched (the submission has them by reference).
    inputs: Option<Box<crate::blobs::Arguments>>,
}

struct WorkerHandle {
    orders: mpsc::Sender<Vec<u8>>,
    /// Answers to the worker's own requests (a function's `get`), beside the orders.
    answers: mpsc::Sender<worker::Answer>,
    kill: CancellationToken,
    loaded: HashSet<String>,
    name: String,
}

type Reply = Box<dyn FnOnce(&Driver) + Send + Sync>;

struct Driver {
    config: EndpointConfig,
    store: store::Store,
    pool: Pool,
    worker_py: PathBuf,
    work_dir: PathBuf,
    /// Where and as whom isolated host workers run (`None`: as the node, in `work_dir`).
    isolation: Option<HostIsolation>,
    label: String,
    live: HashMap<TaskId, Live>,
    workers: HashMap<WorkerId, WorkerHandle>,
    reports_tx: mpsc::Sender<Report>,
    results_tx: mpsc::Sender<Record>,
    /// Live tasks whose record changed this turn.
    dirty: HashSet<TaskId>,
    /// Submissions to store this turn.
    new_subs: Vec<TaskId>,
    /// Tasks that finished this turn.
    finished: Vec<Record>,
    /// Results the submitters acknowledged, whose `s/` entries (their place in the outbox) are
    /// not deleted yet: with the next write, or once the oldest has waited `ACK_DELAY`.
    acks: Vec<TaskId>,
    acks_since: Option<Instant>,
    /// Set for the last turn: everything is written.
    closing: bool,
    /// Answers to send once this turn's writes are stored.
    replies: Vec<Reply>,
    tracker: TaskTracker,
    load_tx: tokio::sync::watch::Sender<Load>,
    /// Functions whose content id checked out, by id.
    verified: HashMap<String, crdt_registry::record::FunctionRecord>,
    /// The functions this endpoint has put in the store.
    stored_functions: crate::task::stored::StoredFunctions,
    /// Where the next outbox sweep starts (a task id; empty: the beginning). Sweeps rotate
    /// through the outbox, so that one submitter's many unacknowledged results (a submitter
    /// that is away) cannot keep the others' from being sent again.
    outbox_cursor: Vec<u8>,
    /// The outbox in memory: finished tasks whose results are not acknowledged, those the start
    /// found in the store and those finished since. Sweeps read these records by key and never
    /// scan the store, whose acknowledged entries a scan steps over one deleted key at a time
    /// (at a few hundred thousand tasks, most of a node's time). `None` past `outbox_in_memory`
    /// entries (submitters long away): sweeps scan the store, until one pass finds it small.
    outbox: Option<BTreeSet<TaskId>>,
    /// How this node passes large values (`None`: all inline).
    values: Option<crate::blobs::Values>,
    /// Tasks whose arguments are being fetched, with their place in the queue once they are.
    fetching: HashMap<TaskId, Queued>,
}

/// How many checked functions the endpoint remembers.
const MAX_VERIFIED_FUNCTIONS: usize = 1024;
/// How often an endpoint collects the functions no stored task names (and at its first sweep
/// after a start).
const FUNCTION_GC_EVERY: Duration = Duration::from_secs(600);
/// Most finished tasks one outbox sweep sends again.
const OUTBOX_SWEEP: usize = 1000;
/// The longest an acknowledgement waits for a write to ride on (the loop turns at least every
/// 100 ms).
const ACK_DELAY: Duration = Duration::from_millis(100);

impl Driver {
    /// Reads these functions from the store (those it has), and remembers them as stored.
    async fn read_functions(
        &mut self,
        ids: HashSet<String>,
    ) -> Result<HashMap<String, crdt_registry::record::FunctionRecord>, Error> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let name = self.config.name.clone();
        let found = self
            .store
            .blocking(move |s| {
                let mut out = HashMap::new();
                for id in ids {
                    if let Some(f) = crate::task::stored::read_endpoint_function(s, &name, &id)? {
                        out.insert(id, f);
                    }
                }
                Ok(out)
            })
            .await?;
        self.stored_functions.found(found.keys());
        Ok(found)
    }

    async fn recover(&mut self) -> Result<(), Error> {
        let name = self.config.name.clone();
        // Stores of earlier versions marked the outbox with `o/` keys and deleted `s/` at finish:
        // turn each mark into an (empty) `s/` entry, which is what marks the outbox now.
        let migrate = name.clone();
        self.store
            .blocking(move |s| {
                let prefix = legacy_okey_prefix(&migrate);
                let mut ops = Vec::new();
                for (k, _) in s.scan_prefix(store::cf::TASKS, &prefix)? {
                    let id = &k[prefix.len()..];
                    let mut skey = format!("s/{migrate}/").into_bytes();
                    skey.extend_from_slice(id);
                    if s.get(store::cf::TASKS, &skey)?.is_none() {
                        ops.push((store::cf::TASKS, skey, Some(Vec::new())));
                    }
                    ops.push((store::cf::TASKS, k, None));
                }
                if !ops.is_empty() {
                    s.batch(&ops)?;
                }
                Ok(())
            })
            .await?;
        let scan = name.clone();
        let rows = self
            .store
            .blocking(move |s| {
                let prefix = format!("s/{scan}/").into_bytes();
                let mut out = Vec::new();
                for (k, v) in s.scan_prefix(store::cf::TASKS, &prefix)? {
                    let mut rkey = format!("r/{scan}/").into_bytes();
                    rkey.extend_from_slice(&k[prefix.len()..]);
                    let rec = s.get(store::cf::TASKS, &rkey)?;
                    out.push((k[prefix.len()..].to_vec(), v, rec));
                }
                Ok(out)
            })
            .await?;
        let now = Instant::now();
        let mut outbox = BTreeSet::new();
        let rows: Vec<_> = rows
            .into_iter()
            .filter_map(|(id, value, rec)| {
                let rec = rec.and_then(|v| serde_json::from_slice::<Record>(&v).ok());
                if let Some(r) = rec.as_ref().filter(|r| r.status.is_terminal()) {
                    outbox.insert(r.id.clone()); // In the outbox.
                    return None;
                }
                let stored = serde_json::from_slice::<StoredPending>(&value).ok();
                Some((id, value, rec, stored))
            })
            .collect();
        // The functions the stored submissions name (current entries name them by id).
        let wanted: HashSet<String> = rows
            .iter()
            .filter_map(|(_, _, _, p)| p.as_ref())
            .filter(|p| p.sub.needs_function())
            .map(|p| p.sub.function_id().to_owned())
            .collect();
        let functions = self.read_functions(wanted).await?;
        let (mut requeued, mut lost, mut dropped) = (0, 0, Vec::new());
        for (id, value, rec, stored) in rows {
            // Current entries carry the submitter; earlier ones were a bare submission, with the
            // submitter in the record written at receipt.
            let pending = match stored {
                Some(p) => p
                    .sub
                    .join(|id| functions.get(id).cloned())
                    .map(|sub| Pending {
                        submitter: p.submitter,
                        received_us: p.received_us,
                        sub,
                    }),
                None => serde_json::from_slice::<Submission>(&value)
                    .ok()
                    .and_then(|sub| {
                        let r = rec.as_ref()?;
                        Some(Pending {
                            submitter: r.submitter.clone(),
                            received_us: r.times.received_us,
                            sub,
                        })
                    }),
            };
            let env = pending
                .as_ref()
                .and_then(|p| Environment::of(p.sub.function.container.as_ref()).ok());
            let (Some(p), Some(env)) = (pending, env) else {
                match rec {
                    Some(mut rec) => {
                        lost += 1;
                        rec.status = Status::Failed;
                        self.finish_record(
                            rec,
                            Outcome::failed(
                                FailureKind::EndpointLost,
                                "the endpoint stopped with this task and could not read it back",
                            ),
                        );
                    }
                    None => dropped.push(id),
                }
                continue;
            };
            let rec = rec.unwrap_or_else(|| Record {
                v: RECORD_VERSION,
                id: p.sub.id.clone(),
                endpoint: name.clone(),
                submitter: p.submitter.clone(),
                function_id: p.sub.function_id.clone(),
                status: Status::Queued,
                times: Times {
                    submitted_us: p.sub.submitted_us,
                    received_us: p.received_us,
                    queued_us: p.received_us,
                    ..Times::default()
                },
                worker: None,
                environment: env.to_string(),
                cold_start: false,
                outcome: None,
            });
            let sub = p.sub;
            if rec.status == Status::Running {
                lost += 1;
                self.live.insert(
                    rec.id.clone(),
                    Live {
                        sub,
                        rec: rec.clone(),
                        inputs: None,
                    },
                );
                self.finish_record(
                    rec,
                    Outcome::failed(
                        FailureKind::EndpointLost,
                        "the endpoint stopped while this task was running; it was not run again",
                    ),
                );
            } else {
                requeued += 1;
                // The submitter's institution is not stored: after a restart its tasks form a
                // lane of their own (still never sharing a worker with another institution).
                let q = self.queued(&sub, &env, &format!("peer:{}", rec.submitter));
                self.admit(sub, rec, q, now);
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(endpoint = %name, n = dropped.len(), "dropping stored submissions that cannot be read");
            let ops: Vec<store::Op> = dropped
                .into_iter()
                .map(|id| {
                    let mut k = format!("s/{name}/").into_bytes();
                    k.extend_from_slice(&id);
                    (store::cf::TASKS, k, None)
                })
                .collect();
            self.store.blocking(move |s| s.batch(&ops)).await?;
        }
        if requeued + lost > 0 {
            tracing::info!(endpoint = %name, requeued, lost, "recovered tasks from the store");
        }
        self.outbox = (outbox.len() <= self.config.outbox_in_memory).then_some(outbox);
        self.apply().await;
        Ok(())
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut reports: mpsc::Receiver<Report>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A quarter of the retention, between 250 ms and a minute.
        let mut sweep = tokio::time::interval(
            (self.config.retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
        );
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_full: Option<Instant> = None;
        let mut last_gc: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => break,
                },
                Some(report) = reports.recv() => self.on_report(report),
                _ = tick.tick() => self.pool.tick(Instant::now()),
                _ = sweep.tick() => {
                    // The first sweep after a start, and then one a day, reads every record.
                    let full = last_full.is_none_or(|t| t.elapsed() >= crate::task::FULL_SWEEP_EVERY);
                    if full {
                        last_full = Some(Instant::now());
                    }
                    self.sweep(full).await;
                    if last_gc.is_none_or(|t| t.elapsed() >= FUNCTION_GC_EVERY) {
                        last_gc = Some(Instant::now());
                        self.collect_functions().await;
                    }
                }
            }
            // Take whatever else is waiting, so that one store write covers it all.
            for _ in 0..256 {
                match reports.try_recv() {
                    Ok(r) => self.on_report(r),
                    Err(_) => break,
                }
            }
            for _ in 0..256 {
                match cmds.try_recv() {
                    Ok(c) => self.on_cmd(c).await,
                    Err(_) => break,
                }
            }
            self.apply().await;
        }
        self.pool.shutdown();
        self.closing = true;
        self.apply().await;
        // Wait (bounded) for the workers to go, so that containers are removed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(Report::Exited(id, _))) => {
                    self.workers.remove(&id);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }

    /// Takes on a stored task: into the queue, or, when its arguments come by reference, first
    /// to fetch them from its submitter (it fails with the reason if they cannot be fetched).
    fn admit(&mut self, sub: Submission, rec: Record, q: Queued, now: Instant) {
        let id = sub.id.clone();
        let wanted = sub.args_ref.clone().zip(self.values.clone());
        let submitter = rec.submitter.clone();
        self.live.insert(
            id.clone(),
            Live {
                sub,
                rec,
                inputs: None,
            },
        );
        let Some((value, values)) = wanted else {
            self.pool.submit(q, now);
            return;
        };
        let Ok(from) = submitter.parse::<mesh::PeerId>() else {
            self.finish(
                &id,
                Outcome::failed(
                    FailureKind::InputUnavailable,
                    format!("the task's submitter {submitter:?} is not a peer id to fetch its arguments from"),
                ),
            );
            return;
        };
        self.fetching.insert(id.clone(), q);
        let reports = self.reports_tx.clone();
        self.tracker.spawn(async move {
            let got = crate::blobs::fetch_arguments(values.blobs, value, from).await;
            let _ = reports.send(Report::Inputs(id, got.map(Box::new))).await;
        });
    }

    /// A running function asks for a blob: fetched from its task's submitter unless this node
    /// holds it, then sent down the worker's pipe (or why not).
    fn on_get(
        &mut self,
        worker: WorkerId,
        task: String,
        value: crate::task::ValueRef,
        from: Option<String>,
    ) {
        let Some(handle) = self.workers.get(&worker) else {
            return;
        };
        let answers = handle.answers.clone();
        let kill = handle.kill.clone();
        let refuse = |why: &str| {
            let _ = answers.try_send(worker::Answer::Frame(protocol::blob_error(why)));
        };
        let running = TaskId::try_from(task)
            .ok()
            .and_then(|id| self.live.get(&id))
            .filter(|l| {
                l.rec.status == Status::Running
                    && l.rec.worker.as_deref() == Some(handle.name.as_str())
            });
        let Some(l) = running else {
            refuse("the task asking is not running on this worker");
            return;
        };
        let Some(values) = self.values.clone() else {
            refuse("this endpoint keeps no blobs");
            return;
        };
        if value.size > self.config.result_limit {
            refuse(&format!(
                "the blob is {} bytes; this endpoint hands functions at most {} (its result_limit)",
                value.size, self.config.result_limit
            ));
            return;
        }
        // A blob's hash is what lets a member fetch it from any other: the function names the
        // member, or its task's submitter is asked.
        let from = from
            .unwrap_or_else(|| l.rec.submitter.clone())
            .parse::<mesh::PeerId>();
        self.tracker.spawn(async move {
            let got = async {
                value.check()?;
                if !values.blobs.holds(&value) {
                    let from = from
                        .map_err(|e| format!("the member to fetch from is not a peer id: {e}"))?;
                    values.blobs.fetch(&value, from).await.map_err(|e| {
                        format!(
                            "blob {} could not be fetched from {from}: {e}",
                            value.blake3
                        )
                    })?;
                }
                values.blobs.reader(&value)
            }
            .await;
            let reader = match got {
                Ok(r) => r,
                Err(e) => {
                    let _ = answers
                        .send(worker::Answer::Frame(protocol::blob_error(&e)))
                        .await;
                    return;
                }
            };
            let head = protocol::encode(&ToWorker::Blob {
                value: None,
                node: None,
                size: Some(value.size),
                error: None,
            });
            let (pieces, stream) = mpsc::channel(4);
            if answers
                .send(worker::Answer::Stream(head, stream))
                .await
                .is_err()
            {
                return;
            }
            // The bytes follow in pieces, as the worker takes them: a blob is never held in
            // memory whole.
            let size = value.size;
            let sent = tokio::task::spawn_blocking(move || {
                let mut reader = reader;
                let mut left = size;
                while left > 0 {
                    let mut piece = vec![0u8; (256 << 10).min(left) as usize];
                    std::io::Read::read_exact(&mut reader, &mut piece)?;
                    left -= piece.len() as u64;
                    if pieces.blocking_send(piece).is_err() {
                        break;
                    }
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                // The worker was promised bytes that cannot come: its pipe is out of step.
                kill.cancel();
            }
        });
    }

    /// A task's arguments arrived, or could not be fetched.
    fn on_inputs(
        &mut self,
        id: TaskId,
        got: Result<Box<crate::blobs::Arguments>, String>,
        now: Instant,
    ) {
        let Some(q) = self.fetching.remove(&id) else {
            return; // cancelled meanwhile
        };
        match got {
            Ok(inputs) => {
                if let Some(l) = self.live.get_mut(&id) {
                    l.inputs = Some(inputs);
                    self.pool.submit(q, now);
                }
            }
            Err(e) => self.finish(&id, Outcome::failed(FailureKind::InputUnavailable, e)),
        }
    }

    fn queued(&self, sub: &Submission, env: &Environment, tenant: &str) -> Queued {
        let timeout = if sub.timeout_ms > 0 {
            Duration::from_millis(sub.timeout_ms)
        } else {
            self.config.task_timeout
        };
        let shell = matches!(
            sub.function.spec,
            crdt_registry::record::FunctionSpec::Shell { .. }
        );
        Queued {
            id: sub.id.clone(),
            env: env.clone(),
            tenant: tenant.to_owned(),
            bytes: sub.arguments_size_bound() as u64 + sub.args_ref.as_ref().map_or(0, |r| r.size),
            timeout,
            // Shell commands are timed out by the worker itself (exit 124); the pool steps in
            // only if that fails.
            grace: if shell {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            },
        }
    }

    fn check(&mut self, sub: &Submission) -> Result<Environment, String> {
        if sub.endpoint != self.config.name {
            return Err(format!(
                "this is endpoint `{}`, not `{}`",
                self.config.name, sub.endpoint
            ));
        }
        // Hashing the function to check its id costs more than comparing it with one that
        // already checked out: remember those (a few, by id).
        if self
            .verified
            .get(&sub.function_id)
            .is_some_and(|f| *f == sub.function)
        {
            sub.check_args()?;
        } else {
            sub.check()?;
            if self.verified.len() >= MAX_VERIFIED_FUNCTIONS {
                self.verified.clear();
            }
            self.verified
                .insert(sub.function_id.clone(), sub.function.clone());
        }
        let most = self.config.max_task_timeout;
        if !most.is_zero() && Duration::from_millis(sub.timeout_ms) > most {
            return Err(format!(
                "the task asks for a time limit of {}; endpoint `{}` allows at most {} (ask for \
                 less, or ask its operator to raise max_task_timeout)",
                humantime::format_duration(Duration::from_millis(sub.timeout_ms)),
                self.config.name,
                humantime::format_duration(most)
            ));
        }
        if let Some(r) = &sub.args_ref {
            if self.values.is_none() {
                return Err(format!(
                    "endpoint `{}` takes no arguments by reference (its node keeps no blobs): \
                     send them inline",
                    self.config.name
                ));
            }
            let most = self
                .config
                .result_limit
                .min(crate::blobs::MAX_ARGUMENTS_BY_REFERENCE);
            if r.size > most {
                return Err(format!(
                    "the arguments are {} bytes; endpoint `{}` takes arguments of at most {most} \
                     bytes (they are held in memory while the task waits): pass a larger input \
                     as a blob the function fetches itself (funcmesh_blobs.get) or a file in a \
                     data root",
                    r.size, self.config.name
                ));
            }
        }
        let env = Environment::of(sub.function.container.as_ref())?;
        if !self
            .config
            .runtimes
            .iter()
            .any(|r| r == env.runtime.as_str())
        {
            return Err(format!(
                "endpoint `{}` does not offer the {} runtime this function needs (it offers {})",
                self.config.name,
                env.runtime.as_str(),
                self.config.runtimes.join(", ")
            ));
        }
        if let Some(image) = &env.image
            && !self.config.image_allowed(image)
        {
            return Err(format!(
                "endpoint `{}` does not run image `{image}`: its operator accepts {} (ask for the \
                 image to be added to the endpoint's `images`)",
                self.config.name,
                self.config.images_accepted()
            ));
        }
        Ok(env)
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit {
                submitter,
                tenant,
                tasks,
                reply,
            } => {
                // Ids this endpoint does not hold live may still be stored (a retry). Almost
                // all are new: the bloom filters rule those out here, without a trip through
                // the blocking pool before the task can run.
                let name = &self.config.name;
                let unknown: Vec<TaskId> = tasks
                    .iter()
                    .filter(|t| {
                        !self.live.contains_key(&t.id)
                            && self.store.may_hold(store::cf::TASKS, &rkey(name, &t.id))
                    })
                    .map(|t| t.id.clone())
                    .collect();
                let stored = self.stored(unknown).await;
                let now = Instant::now();
                let mut answers = Vec::with_capacity(tasks.len());
                // A task id belongs to its submitter: another member presenting it learns
                // nothing and changes nothing.
                let taken = |rec: &Record| {
                    (rec.submitter != submitter).then(|| {
                        format!(
                            "task id {} is already used by another submitter: choose a fresh id",
                            rec.id
                        )
                    })
                };
                for sub in tasks {
                    if let Some(l) = self.live.get(&sub.id) {
                        answers.push(match taken(&l.rec) {
                            Some(e) => Err(e),
                            None => Ok(l.rec.clone()),
                        });
                        continue;
                    }
                    if let Some(rec) = stored.get(&sub.id) {
                        if let Some(e) = taken(rec) {
                            answers.push(Err(e));
                            continue;
                        }
                        if rec.status.is_terminal() {
                            // The submitter may have missed it: send it again.
                            let _ = self.results_tx.try_send(rec.clone());
                        }
                        answers.push(Ok(rec.clone()));
                        continue;
                    }
                    let env = match self.check(&sub) {
                        Ok(env) => env,
                        Err(e) => {
                            answers.push(Err(e));
                            continue;
                        }
                    };
                    let rec = Record {
                        v: RECORD_VERSION,
                        id: sub.id.clone(),
                        endpoint: self.config.name.clone(),
                        submitter: submitter.clone(),
                        function_id: sub.function_id.clone(),
                        status: Status::Received,
                        times: Times {
                            submitted_us: sub.submitted_us,
                            received_us: now_us(),
                            ..Times::default()
                        },
                        worker: None,
                        environment: env.to_string(),
                        cold_start: false,
                        outcome: None,
                    };
                    answers.push(Ok(rec.clone()));
                    let q = self.queued(&sub, &env, &tenant);
                    self.new_subs.push(sub.id.clone());
                    self.dirty.insert(sub.id.clone());
                    self.admit(sub, rec, q, now);
                }
                self.replies.push(Box::new(move |_| {
                    let _ = reply.send(answers);
                }));
            }
            Cmd::Cancel { id, reply } => {
                if self.fetching.remove(&id).is_some() {
                    self.finish(
                        &id,
                        Outcome::Cancelled {
                            reason: "cancelled by the submitter".into(),
                        },
                    );
                    let rec = self.finished.iter().find(|r| r.id == id).cloned();
                    let _ = reply.send(rec);
                } else if self.live.contains_key(&id) {
                    self.pool.cancel(&id, Instant::now());
                    self.replies.push(Box::new(move |d: &Driver| {
                        let rec = d.finished.iter().find(|r| r.id == id).cloned();
                        let _ = reply.send(rec);
                    }));
                } else {
                    let rec = self.stored(vec![id.clone()]).await.remove(&id);
                    let _ = reply.send(rec);
                }
            }
            Cmd::Records { ids, reply } => {
                let unknown = ids
                    .iter()
                    .filter(|id| !self.live.contains_key(id))
                    .cloned()
                    .collect();
                let stored = self.stored(unknown).await;
                let out = ids
                    .iter()
                    .map(|id| {
                        self.live
                            .get(id)
                            .map(|l| l.rec.clone())
                            .or_else(|| stored.get(id).cloned())
                    })
                    .collect();
                let _ = reply.send(out);
            }
            Cmd::Load(reply) => {
                let _ = reply.send(self.pool.load());
            }
            Cmd::Acknowledge(ids) => {
                if self.acks.is_empty() {
                    self.acks_since = Some(Instant::now());
                }
                if let Some(outbox) = &mut self.outbox {
                    for id in &ids {
                        outbox.remove(id);
                    }
                }
                self.acks.extend(ids);
            }
            Cmd::Unacknowledged(except, reply) => {
                let found = match self.outbox.is_some() {
                    true => self.outbox_from_memory(&except).await,
                    false => self.outbox_from_store(except).await,
                };
                let _ = reply.send(found);
            }
        }
    }

    /// Up to `OUTBOX_SWEEP` results of the in-memory outbox but `except`, from where the last
    /// sweep stopped, read by key.
    async fn outbox_from_memory(&mut self, except: &HashSet<TaskId>) -> Vec<Record> {
        let Some(outbox) = &self.outbox else {
            return Vec::new();
        };
        let cursor = std::str::from_utf8(&self.outbox_cursor)
            .ok()
            .and_then(|c| c.parse::<TaskId>().ok());
        use std::ops::Bound;
        let start = cursor.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
        // From the cursor to the end, then from the beginning up to it.
        let wrapped = cursor
            .as_ref()
            .map(|c| outbox.range(..=c))
            .into_iter()
            .flatten();
        let ids: Vec<TaskId> = outbox
            .range((start, Bound::Unbounded))
            .chain(wrapped)
            .filter(|id| !except.contains(*id))
            .take(OUTBOX_SWEEP)
            .cloned()
            .collect();
        self.outbox_cursor = match ids.len() < OUTBOX_SWEEP {
            true => Vec::new(),
            false => ids
                .last()
                .map(|l| l.as_str().as_bytes().to_vec())
                .unwrap_or_default(),
        };
        let mut stored = self.stored(ids.clone()).await;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match stored.remove(&id) {
                Some(rec) if rec.status.is_terminal() => out.push(rec),
                // Gone (past its retention) or not final after all: not the outbox's.
                _ => {
                    if let Some(outbox) = &mut self.outbox {
                        outbox.remove(&id);
                    }
                }
            }
        }
        out
    }

    /// The outbox read from the store: `s/` entries whose record is final, up to
    /// `OUTBOX_SWEEP` results but `except`, from where the last sweep stopped. A pass over the
    /// whole outbox that finds it small puts it back in memory.
    async fn outbox_from_store(&mut self, busy: HashSet<TaskId>) -> Vec<Record> {
        let name = self.config.name.clone();
        // Tasks still live are not finished: their `s/` entries are not the outbox's. Nor are
        // acknowledged ones whose entries are still to be deleted.
        let mut except: HashSet<TaskId> = self.live.keys().cloned().collect();
        except.extend(self.acks.iter().cloned());
        let cursor = std::mem::take(&mut self.outbox_cursor);
        let whole = cursor.is_empty();
        let found = self
            .store
            .blocking(move |s| {
                // The outbox: `s/` entries whose record is final. Reads stop at 1,000 results,
                // and skip the entries known not to be wanted without a read. A sweep starts
                // where the last one stopped and wraps around.
                let prefix = format!("s/{name}/").into_bytes();
                let rprefix = format!("r/{name}/").into_bytes();
                let mut out = Vec::new();
                // Skipped because they are being delivered: still in the outbox.
                let mut delivering = Vec::new();
                let mut last: Option<Vec<u8>> = None;
                let mut sweep = |from: &[u8],
                                 until: Option<&[u8]>,
                                 out: &mut Vec<Record>,
                                 last: &mut Option<Vec<u8>>| {
                    s.visit_keys_from(store::cf::TASKS, &prefix, from, |k| {
                        let id = &k[prefix.len()..];
                        if until.is_some_and(|u| id >= u) {
                            return Ok(false);
                        }
                        *last = Some(id.to_vec());
                        let Some(t) = std::str::from_utf8(id)
                            .ok()
                            .and_then(|t| t.parse::<TaskId>().ok())
                        else {
                            return Ok(true);
                        };
                        if except.contains(&t) {
                            return Ok(true);
                        }
                        if busy.contains(&t) {
                            delivering.push(t);
                            return Ok(true);
                        }
                        let mut key = rprefix.clone();
                        key.extend_from_slice(id);
                        if let Some(v) = s.get(store::cf::TASKS, &key)? {
                            if let Ok(rec) = serde_json::from_slice::<Record>(&v) {
                                if rec.status.is_terminal() {
                                    out.push(rec);
                                }
                            }
                        }
                        Ok(out.len() < OUTBOX_SWEEP)
                    })
                };
                let mut from = prefix.clone();
                from.extend_from_slice(&cursor);
                sweep(&from, None, &mut out, &mut last)?;
                if out.len() < OUTBOX_SWEEP && !cursor.is_empty() {
                    // Reached the end: go on from the beginning up to where this began.
                    sweep(&prefix, Some(&cursor), &mut out, &mut last)?;
                }
                let next = if out.len() < OUTBOX_SWEEP {
                    Vec::new()
                } else {
                    // Just after the last entry read.
                    let mut next = last.unwrap_or_default();
                    next.push(0);
                    next
                };
                Ok((out, delivering, next))
            })
            .await;
        match found {
            Ok((found, delivering, next)) => {
                // One sweep read the whole outbox, and it is small again: back to memory.
                if whole && next.is_empty() {
                    let mut outbox: BTreeSet<TaskId> = delivering.into_iter().collect();
                    outbox.extend(found.iter().map(|r| r.id.clone()));
                    self.outbox = Some(outbox);
                }
                self.outbox_cursor = next;
                found
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    async fn stored(&self, ids: Vec<TaskId>) -> HashMap<TaskId, Record> {
        if ids.is_empty() {
            return HashMap::new();
        }
        let name = self.config.name.clone();
        let found = self
            .store
            .blocking(move |s| {
                let mut out = HashMap::new();
                for id in ids {
                    if let Some(v) = s.get(store::cf::TASKS, &rkey(&name, &id))? {
                        if let Ok(rec) = serde_json::from_slice::<Record>(&v) {
                            out.insert(id, rec);
                        }
                    }
                }
                Ok(out)
            })
            .await;
        found.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read stored tasks");
            HashMap::new()
        })
    }

    fn on_report(&mut self, report: Report) {
        let now = Instant::now();
        match report {
            Report::Ready(w) => self.pool.ready(w, now),
            Report::Results(w, results) => {
                for r in results {
                    self.on_result(w, r, now);
                }
            }
            Report::Inputs(id, got) => self.on_inputs(id, got, now),
            Report::Get(w, task, value, from) => self.on_get(w, task, value, from),
            Report::Exited(w, reason) => {
                self.workers.remove(&w);
                tracing::debug!(endpoint = %self.config.name, worker = w, %reason, "worker gone");
                self.pool.exited(w, &reason, now);
            }
        }
    }

    fn on_result(&mut self, worker: WorkerId, r: WorkerResult, now: Instant) {
        let Ok(id) = TaskId::try_from(r.id.clone()) else {
            return;
        };
        if !self.pool.result(worker, &id, r.recycle, now) {
            return;
        }
        let finished = now_us();
        if let Some(l) = self.live.get_mut(&id) {
            let ran_from = finished.saturating_sub(r.run_us);
            l.rec.times.running_us = l.rec.times.running_us.max(ran_from);
        }
        let limit = self.config.task_memory_mb;
        let outcome = if r.ok {
            Outcome::Succeeded {
                value: r.value.unwrap_or(serde_json::Value::Null),
                value_ref: r.value_ref,
            }
        } else {
            let e = r.error.unwrap_or(protocol::WorkerError {
                type_name: "WorkerError".into(),
                message: "the worker reported a failure without an error".into(),
                traceback: None,
                value: None,
            });
            let kind = match e.type_name.as_str() {
                "MemoryError" if limit > 0 => FailureKind::MemoryLimit,
                "ResultTooLarge" => FailureKind::ResultTooLarge,
                "Timeout" => FailureKind::Timeout,
                "UnknownFunction" | "UnknownEntrypoint" | "UnknownForm" | "BadArguments"
                | "CloudpickleMissing" => FailureKind::BadInput,
                "Cancelled" => {
                    self.finish(
                        &id,
                        Outcome::Cancelled {
                            reason: "cancelled by the submitter".into(),
                        },
                    );
                    return;
                }
                _ => FailureKind::Exception,
            };
            Outcome::Failed {
                error: TaskError {
                    kind,
                    type_name: e.type_name,
                    message: e.message,
                    traceback: e.traceback,
                },
                value: e.value,
            }
        };
        self.finish(&id, outcome);
    }

    fn finish(&mut self, id: &TaskId, outcome: Outcome) {
        if let Some(l) = self.live.get(id) {
            let rec = l.rec.clone();
            self.finish_record(rec, outcome);
        }
    }

    fn finish_record(&mut self, mut rec: Record, outcome: Outcome) {
        self.live.remove(&rec.id);
        self.dirty.remove(&rec.id);
        rec.status = outcome.status();
        rec.times.finished_us = now_us();
        tracing::debug!(
            task = %rec.id,
            endpoint = %self.config.name,
            submitter = %rec.submitter,
            worker = rec.worker.as_deref(),
            status = %rec.status,
            "task finished"
        );
        rec.outcome = Some(outcome);
        self.finished.push(rec);
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Phase { task, status } => {
                if let Some(l) = self.live.get_mut(&task) {
                    let now = now_us();
                    match status {
                        Status::Queued => {
                            l.rec.status = Status::Queued;
                            l.rec.times.queued_us = now;
                        }
                        Status::WaitingForWorker => {
                            if l.rec.times.waiting_us == 0 {
                                l.rec.times.waiting_us = now;
                            }
                            l.rec.status = Status::WaitingForWorker;
                            l.rec.cold_start = true;
                        }
                        _ => {}
                    }
                    self.dirty.insert(task);
                }
            }
            Action::Spawn { worker, env } => self.spawn(worker, &env),
            Action::Send {
                worker,
                tasks,
                cold,
            } => self.send(worker, tasks, cold),
            Action::Skip { worker, tasks } => {
                if let Some(w) = self.workers.get(&worker) {
                    let ids: Vec<&str> = tasks.iter().map(TaskId::as_str).collect();
                    let _ = w
                        .orders
                        .try_send(protocol::encode(&ToWorker::Cancel { ids }));
                }
            }
            Action::Kill { worker, why } => {
                tracing::debug!(endpoint = %self.config.name, worker, ?why, "stopping worker");
                if let Some(w) = self.workers.get(&worker) {
                    w.kill.cancel();
                }
            }
            Action::Finish { task, outcome } => self.finish(&task, outcome),
        }
    }

    fn spawn(&mut self, worker: WorkerId, env: &Environment) {
        if let Some(ms) = self.config.simulate_ms {
            let (orders_tx, orders_rx) = mpsc::channel(256);
            let (answers_tx, _) = mpsc::channel(1);
            let kill = CancellationToken::new();
            self.workers.insert(
                worker,
                WorkerHandle {
                    orders: orders_tx,
                    answers: answers_tx,
                    kill: kill.clone(),
                    loaded: HashSet::new(),
                    name: format!("sim{worker}"),
                },
            );
            self.tracker.spawn(worker::simulate(
                worker,
                std::time::Duration::from_millis(ms),
                orders_rx,
                self.reports_tx.clone(),
                kill,
            ));
            return;
        }
        let name = format!(
            "fm-{}-{}-w{worker}-{}",
            self.config.name,
            std::process::id(),
            hex::encode(rand::random::<[u8; 3]>())
        );
        let labels = vec![(
            self.label.split_once('=').map_or("", |p| p.0).to_owned(),
            self.label.split_once('=').map_or("", |p| p.1).to_owned(),
        )];
        let isolated = self.isolation.as_ref().filter(|_| !env.is_container());
        let scratch = isolated.and_then(|iso| match iso.scratch(worker) {
            Ok(dir) => Some((iso, dir)),
            Err(e) => {
                tracing::warn!(endpoint = %self.config.name, error = %e, "cannot make a worker's scratch dir");
                None
            }
        });
        if isolated.is_some() && scratch.is_none() {
            // Never fall back to running as the node.
            let _ = self.reports_tx.try_send(Report::Exited(
                worker,
                "cannot prepare the worker's isolated scratch directory".into(),
            ));
            return;
        }
        let (program, args) = environment::worker_command(
            env,
            scratch
                .as_ref()
                .map_or(&self.config.python, |(iso, _)| &iso.python),
            scratch
                .as_ref()
                .map_or(&self.worker_py, |(iso, _)| &iso.worker_py),
            crate::shell_worker::program(),
            &name,
            &labels,
            &environment::Sandbox {
                network: self.config.container_network,
                pids: self.config.container_pids,
                memory_mb: self.config.task_memory_mb,
            },
        );
        let (orders_tx, orders_rx) = mpsc::channel(256);
        let (answers_tx, answers_rx) = mpsc::channel(16);
        // Not a child of the endpoint's token: at shutdown the pool stops workers itself, after
        // the loop has stopped reading their exits (which would otherwise fail their tasks).
        let kill = CancellationToken::new();
        let launch = Launch {
            id: worker,
            env: env.clone(),
            program,
            args,
            container: env.is_container().then(|| name.clone()),
            cwd: scratch
                .as_ref()
                .map_or_else(|| self.work_dir.clone(), |(_, dir)| dir.clone()),
            run_as: scratch.as_ref().map(|(iso, _)| iso.uid(worker)),
            frame_limit: (self.inline_result_limit() as usize + (1 << 20)).max(protocol::MAX_FRAME),
            values: self.values.clone(),
            spill_limit: self.config.result_limit,
            kill: kill.clone(),
        };
        self.workers.insert(
            worker,
            WorkerHandle {
                orders: orders_tx,
                answers: answers_tx.clone(),
                kill,
                loaded: HashSet::new(),
                name: if env.is_container() {
                    name
                } else {
                    format!("w{worker}")
                },
            },
        );
        self.tracker.spawn(worker::run(
            launch,
            orders_rx,
            (answers_tx, answers_rx),
            self.reports_tx.clone(),
        ));
    }

    fn send(&mut self, worker: WorkerId, tasks: Vec<TaskId>, cold: bool) {
        let (result_limit, inline_limit) = match &self.values {
            Some(v) => (self.config.result_limit, v.inline_limit),
            None => (self.inline_result_limit(), 0),
        };
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let now = now_us();
        // The function's spec goes to a worker once; it caches it by id.
        let mut first = Vec::with_capacity(tasks.len());
        for id in &tasks {
            let Some(l) = self.live.get_mut(id) else {
                first.push(false);
                continue;
            };
            l.rec.status = Status::Running;
            l.rec.times.running_us = now;
            l.rec.worker = Some(w.name.clone());
            l.rec.cold_start = cold;
            self.dirty.insert(id.clone());
            first.push(w.loaded.insert(l.sub.function_id.clone()));
        }
        let timeout_default = self.config.task_timeout.as_millis() as u64;
        let mut items: Vec<WorkerTask<'_>> = Vec::with_capacity(tasks.len());
        // Tasks with fetched (large) arguments go in frames of their own, so that no frame
        // carries more than one large value.
        let mut large: Vec<WorkerTask<'_>> = Vec::new();
        for (l, first) in tasks
            .iter()
            .zip(first)
            .filter_map(|(id, first)| self.live.get(id).map(|l| (l, first)))
        {
            let sub = &l.sub;
            let (args, kwargs) = match &l.inputs {
                Some(i) => (&i.args, &i.kwargs),
                None => (&sub.args, &sub.kwargs),
            };
            let item = WorkerTask {
                id: sub.id.as_str(),
                fid: &sub.function_id,
                r#fn: first.then_some(&sub.function.spec),
                args,
                kwargs,
                encoding: sub.encoding,
                timeout_ms: if sub.timeout_ms > 0 {
                    sub.timeout_ms
                } else {
                    timeout_default
                },
                memory_mb: self.config.task_memory_mb,
                result_limit,
                inline_limit,
                output_cap: self.config.output_cap,
            };
            if l.inputs.is_some() {
                large.push(item);
            } else {
                items.push(item);
            }
        }
        let mut frames = Vec::new();
        if !items.is_empty() {
            frames.push(protocol::encode(&ToWorker::Run { tasks: items }));
        }
        for item in large {
            frames.push(protocol::encode(&ToWorker::Run { tasks: vec![item] }));
        }
        for frame in frames {
            if w.orders.try_send(frame).is_err() {
                tracing::warn!(endpoint = %self.config.name, worker, "worker's queue is full; stopping it");
                w.kill.cancel();
                break;
            }
        }
    }

    /// The largest result a worker may send inline: the endpoint's limit, within what one
    /// task-protocol message carries.
    fn inline_result_limit(&self) -> u64 {
        self.config
            .result_limit
            .min(crate::task::MAX_ARGUMENTS_BYTES as u64)
    }

    /// Runs the pool's actions, stores this turn's changes, then answers and reports.
    async fn apply(&mut self) {
        loop {
            let actions = self.pool.actions();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                self.on_action(a);
            }
        }
        let name = &self.config.name;
        let mut ops: Vec<store::Op> = Vec::new();
        for id in self.new_subs.drain(..) {
            if let Some(l) = self.live.get(&id) {
                ops.extend(self.stored_functions.op_for(&l.sub));
                let v = json(&PendingRef {
                    submitter: &l.rec.submitter,
                    received_us: l.rec.times.received_us,
                    sub: crate::task::stored::SansFunction(&l.sub),
                });
                ops.push((store::cf::TASKS, skey(name, &id), Some(v)));
            }
        }
        for id in self.dirty.drain() {
            if let Some(l) = self.live.get(&id) {
                // Received, queued or waiting for a worker: the `s/` entry is enough to queue it
                // again after a restart; the record is stored from the moment it runs.
                if matches!(
                    l.rec.status,
                    Status::Received | Status::Queued | Status::WaitingForWorker
                ) {
                    continue;
                }
                let v = json(&l.rec);
                ops.push((store::cf::TASKS, rkey(name, &id), Some(v)));
            }
        }
        // A finished task keeps its `s/` entry: that is its place in the outbox.
        for rec in &self.finished {
            let v = json(rec);
            ops.push((store::cf::TASKS, rkey(name, &rec.id), Some(v)));
        }
        // Acknowledgements ride on a write the turn makes anyway. A lone one waits (for
        // `ACK_DELAY` at most): deleting an `s/` entry is not on any task's path, and each write
        // of its own costs two thread wake-ups. Lost in a crash, it only means the result is
        // sent again, and acknowledged again.
        let due = self.acks_since.is_some_and(|t| t.elapsed() >= ACK_DELAY);
        if !ops.is_empty() || due || self.closing {
            for id in self.acks.drain(..) {
                ops.push((store::cf::TASKS, skey(name, &id), None));
            }
            self.acks_since = None;
        }
        // Results go out before the write: the submitter stores what it receives, and until it
        // acknowledges, the outbox (written below) keeps the result for redelivery.
        self.load_tx.send_replace(self.pool.load());
        for rec in &self.finished {
            if self.results_tx.try_send(rec.clone()).is_err() {
                // The outbox has it; the node's redelivery sweep will send it.
            }
        }
        if !ops.is_empty() {
            if let Err(e) = self.store.blocking(move |s| s.batch_unsynced(&ops)).await {
                // Nothing is accepted that is not stored: the submitter retries.
                tracing::error!(endpoint = %self.config.name, error = %e, "cannot store tasks");
                self.replies.clear();
                self.finished.clear();
                // Functions first written in this batch are not stored either.
                self.stored_functions.forget();
                return;
            }
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.extend(self.finished.iter().map(|r| r.id.clone()));
            if outbox.len() > self.config.outbox_in_memory {
                self.outbox = None;
                self.outbox_cursor.clear();
            }
        }
        for reply in std::mem::take(&mut self.replies) {
            reply(self);
        }
        self.finished.clear();
    }

    /// Deletes this endpoint's stored functions that neither a live task nor a stored
    /// submission (`s/`: queued, running, or finished and not yet acknowledged) names.
    async fn collect_functions(&mut self) {
        let name = self.config.name.clone();
        let live: HashSet<String> = self
            .live
            .values()
            .map(|l| l.sub.function_id.clone())
            .collect();
        let res = self
            .store
            .blocking(move |s| {
                #[derive(serde::Deserialize)]
                struct Names {
                    function_id: String,
                }
                // An `s/` entry holds the submission under `sub`; older versions stored the
                // submission itself.
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum Entry {
                    Wrapped { sub: Names },
                    Bare(Names),
                }
                let mut named = live;
                let mut unreadable = false;
                let tasks = format!("s/{name}/").into_bytes();
                s.visit_keys(store::cf::TASKS, &tasks, |k| {
                    if let Some(v) = s.get(store::cf::TASKS, k)? {
                        match serde_json::from_slice::<Entry>(&v) {
                            Ok(Entry::Wrapped { sub: n } | Entry::Bare(n)) => {
                                named.insert(n.function_id);
                            }
                            Err(_) => unreadable = true,
                        }
                    }
                    Ok(true)
                })?;
                if unreadable {
                    // Never collect what an unreadable entry might name.
                    return Ok(Vec::new());
                }
                let scope = crate::task::stored::function_scope(&name);
                let mut dropped = Vec::new();
                let mut ops = Vec::new();
                s.visit_keys(store::cf::FUNCTIONS, &scope, |k| {
                    let id = String::from_utf8_lossy(&k[scope.len()..]).into_owned();
                    if !named.contains(&id) {
                        ops.push((store::cf::FUNCTIONS, k.to_vec(), None));
                        dropped.push(id);
                    }
                    Ok(true)
                })?;
                if !ops.is_empty() {
                    s.batch_unsynced(&ops)?;
                }
                Ok(dropped)
            })
            .await;
        match res {
            Ok(dropped) => {
                self.stored_functions.dropped(&dropped);
                if !dropped.is_empty() {
                    tracing::info!(endpoint = %self.config.name, n = dropped.len(), "collected stored functions no task names");
                }
            }
            Err(e) => tracing::warn!(error = %e, "collecting stored functions failed"),
        }
    }

    /// Drops finished tasks older than the retention. `full`: every record is read; otherwise
    /// only those of tasks whose id was made before the horizon (a task cannot finish before it
    /// was made), which misses only ids of older versions, without their time.
    async fn sweep(&mut self, full: bool) {
        let name = self.config.name.clone();
        let horizon = now_us().saturating_sub(self.config.retention.as_micros() as u64);
        let res = self
            .store
            .blocking(move |s| {
                let prefix = format!("r/{name}/").into_bytes();
                let mut ops = Vec::new();
                let mut dropped = Vec::new();
                let rows = if full {
                    s.scan_prefix(store::cf::TASKS, &prefix)?
                } else {
                    let mut until = prefix.clone();
                    until.extend_from_slice(TaskId::lower_bound_at(horizon / 1000).as_bytes());
                    s.scan_range(store::cf::TASKS, &prefix, &until)?
                };
                for (k, v) in rows {
                    let Ok(rec) = serde_json::from_slice::<Record>(&v) else {
                        continue;
                    };
                    if rec.status.is_terminal() && rec.times.finished_us < horizon {
                        ops.push((store::cf::TASKS, k, None));
                        ops.push((store::cf::TASKS, skey(&name, &rec.id), None));
                        dropped.push(rec.id);
                    }
                }
                if !ops.is_empty() {
                    s.batch_unsynced(&ops)?;
                }
                Ok(dropped)
            })
            .await;
        match res {
            Ok(dropped) if dropped.is_empty() => {}
            Ok(dropped) => {
                let n = dropped.len();
                if let Some(outbox) = &mut self.outbox {
                    for id in &dropped {
                        outbox.remove(id);
                    }
                }
                tracing::info!(endpoint = %self.config.name, dropped = n, "dropped tasks past their retention")
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
        }
    }
}
