//! Copy jobs: a file or a tree pulled from another member's data root into one of this node's,
//! durably.
//!
//! A job runs on the node that owns the destination (the requesting node only orchestrates).
//! Its record lives in RocksDB (`transfers` column family) from the moment it is accepted,
//! under a client-chosen request id that makes submitting it again harmless. Running it: list
//! the source (a walk for `--recursive`), make the directories, decide per file whether it must
//! move (by the `--sync` level, or by size and hash), ask the source for the hashes of those
//! files, then pull each into a part file next to its destination, verifying every 16 KiB group
//! against the hash as it arrives. A finished file gets the source's mode and modification time
//! and is renamed into place. A part file and its outboard survive a crash or `kill -9` of
//! either side: the job is resumed (at start, for this node; by retrying with backoff, for the
//! source) and asks only for the groups it does not hold verified.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::blob::{Hash, Partial};
use crate::net::Remote;
use crate::root::{DataRoot, Entry, Kind, RelPath};
use crate::wire::FileHash;

/// Key prefix, in the `transfers` column family, of copies this node asked another to run.
pub const FORWARDED: &[u8] = b"fwd/";
/// Key prefix, in the `transfers` column family, of the node's data-root shares (kept by the
/// node, not by the jobs).
pub const SHARES: &[u8] = b"share/";

/// Files pulled at once.
const CONCURRENT_FILES: usize = 8;
/// Files pulled at once when they are small (a mean of at most [`SMALL_FILE`] bytes): their
/// cost is round trips and task hops, not bytes, so more of them overlap.
const CONCURRENT_SMALL_FILES: usize = 32;
/// What counts as a small file, for [`CONCURRENT_SMALL_FILES`].
const SMALL_FILE: u64 = 256 << 10;
/// Per-file errors kept in a job's record.
const MAX_ERRORS: usize = 100;
/// Rounds of asking again after corrupt groups, per connection attempt.
const CORRUPT_ROUNDS: usize = 8;

/// When a file at the destination counts as already there (Globus's sync levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncLevel {
    /// It exists.
    Exists,
    /// It exists with the same size.
    Size,
    /// It exists with the same size and is not older than the source.
    Mtime,
    /// It has the same BLAKE3 hash.
    Checksum,
}

impl std::str::FromStr for SyncLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<SyncLevel, String> {
        match s {
            "exists" => Ok(SyncLevel::Exists),
            "size" => Ok(SyncLevel::Size),
            "mtime" => Ok(SyncLevel::Mtime),
            "checksum" => Ok(SyncLevel::Checksum),
            other => Err(format!(
                "unknown sync level `{other}`: use exists, size, mtime or checksum"
            )),
        }
    }
}

/// What to copy where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The source node's peer id.
    pub src_node: String,
    /// The source endpoint's name on that node.
    pub src_endpoint: String,
    /// The source path in its data root.
    pub src_path: String,
    /// The destination endpoint's name on this node.
    pub dst_endpoint: String,
    /// The destination path in its data root.
    pub dst_path: String,
    /// Copy a directory and everything below it.
    #[serde(default)]
    pub recursive: bool,
    /// Skip files already at the destination by this rule (default: same size and hash).
    #[serde(default)]
    pub sync: Option<SyncLevel>,
    /// Remove files and directories at the destination that the source does not have.
    #[serde(default)]
    pub delete: bool,
    /// The member that asked for it.
    #[serde(default)]
    pub requester: String,
    /// The token to present to the source instead of the one this node would pick: one lent
    /// for this copy (by the starter of a flow run that asked for it on another's behalf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_token: Option<String>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted, running or waiting to resume.
    Active,
    /// Every file arrived and verified.
    Succeeded,
    /// Stopped with errors (see `error` and `errors`).
    Failed,
    /// Cancelled.
    Cancelled,
}

/// Counters of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Progress {
    /// Files the source has (below the path).
    pub files_total: u64,
    /// Files that arrived and verified.
    pub files_done: u64,
    /// Files skipped as already there.
    pub files_skipped: u64,
    /// Files that failed.
    pub files_failed: u64,
    /// Bytes of all the source's files.
    pub bytes_total: u64,
    /// Bytes of the files that arrived.
    pub bytes_done: u64,
    /// Bytes of the files skipped.
    pub bytes_skipped: u64,
    /// Bytes received from the source, counting what was sent twice (resumes, refetches).
    pub bytes_received: u64,
    /// Directories made.
    pub dirs_made: u64,
    /// Paths removed at the destination (`delete`).
    pub deleted: u64,
    /// Receive rate over the job's running time, bytes per second.
    pub rate_bps: u64,
    /// Seconds left at that rate, while active.
    pub eta_s: Option<u64>,
}

/// One file's failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileError {
    /// The path, relative to the copy's source.
    pub path: String,
    /// What went wrong.
    pub error: String,
}

/// A copy job, as stored and as shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Its id: the request id it was submitted with.
    pub id: String,
    /// What it copies.
    pub spec: Spec,
    /// Where it is.
    pub state: State,
    /// Its counters.
    pub progress: Progress,
    /// Per-file errors (the first hundred).
    #[serde(default)]
    pub errors: Vec<FileError>,
    /// Why it failed as a whole.
    #[serde(default)]
    pub error: Option<String>,
    /// BLAKE3 over the sorted `(path, hash)` list of the source's files, once every file is
    /// known.
    #[serde(default)]
    pub tree_hash: Option<String>,
    /// Times, Unix ms.
    pub created_ms: u64,
    /// Last change.
    pub updated_ms: u64,
    /// When it ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Times it was started (1, plus one per resume).
    #[serde(default)]
    pub runs: u32,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use crate::wire::BoxFuture;

/// What the node provides to jobs.
pub trait Context: Send + Sync + 'static {
    /// The source's data roots (its node's data plane) and the token to present for reading
    /// `path` of `endpoint` there.
    fn source<'a>(
        &'a self,
        node: &'a str,
        endpoint: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<(Remote, Option<String>), String>>;
    /// This node's data root of `endpoint`.
    fn destination(&self, endpoint: &str) -> Result<Arc<DataRoot>, String>;
}

/// Checks a request id: what a client may choose.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "request id {:?} is not 1 to 128 of A-Z a-z 0-9 - _ .",
            id.chars().take(140).collect::<String>()
        ));
    }
    Ok(())
}

struct Live {
    cancel: AtomicBool,
    wake: tokio::sync::Notify,
    received: Arc<AtomicU64>,
    progress: Mutex<Progress>,
    started: Instant,
}

/// The copy jobs of one node.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: store::Store,
    ctx: Arc<dyn Context>,
    parts: PathBuf,
    jobs: Mutex<BTreeMap<String, Job>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// How long a source may stay unreachable before a job gives up on it.
    patience: Duration,
    /// Set when the node stops: running jobs end without a verdict, to resume at the next start.
    stopping: AtomicBool,
}

impl Jobs {
    /// Loads the stored jobs and resumes the active ones. `parts` holds the outboards of files
    /// being received.
    pub fn start(
        store: store::Store,
        ctx: Arc<dyn Context>,
        parts: PathBuf,
        patience: Duration,
    ) -> Result<Jobs, String> {
        std::fs::create_dir_all(&parts)
            .map_err(|e| format!("cannot make {}: {e}", parts.display()))?;
        let mut jobs = BTreeMap::new();
        for (key, value) in store
            .scan(store::cf::TRANSFERS)
            .map_err(|e| e.to_string())?
        {
            if key.starts_with(FORWARDED) || key.starts_with(SHARES) {
                continue;
            }
            match serde_json::from_slice::<Job>(&value) {
                Ok(job) => {
                    jobs.insert(job.id.clone(), job);
                }
                Err(e) => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    error = %e,
                    "an unreadable transfer job record: left alone"
                ),
            }
        }
        let active: Vec<String> = jobs
            .values()
            .filter(|j| j.state == State::Active)
            .map(|j| j.id.clone())
            .collect();
        let this = Jobs {
            inner: Arc::new(Inner {
                store,
                ctx,
                parts,
                jobs: Mutex::new(jobs),
                live: Mutex::new(HashMap::new()),
                patience,
                stopping: AtomicBool::new(false),
            }),
        };
        for id in active {
            tracing::info!(job = %id, "resuming a transfer");
            this.launch(&id);
        }
        Ok(this)
    }

    /// Accepts a job (or returns the one already accepted under this id, if it asks the same).
    pub fn submit(&self, id: &str, spec: Spec) -> Result<Job, String> {
        check_id(id)?;
        RelPath::parse(&spec.src_path).map_err(|e| e.to_string())?;
        RelPath::parse(&spec.dst_path).map_err(|e| e.to_string())?;
        if spec.delete && !spec.recursive {
            return Err("--delete applies to a recursive copy: add --recursive".into());
        }
        {
            let jobs = self.lock_jobs();
            if let Some(old) = jobs.get(id) {
                if old.spec != spec {
                    return Err(format!(
                        "request id {id} was already used for another transfer: choose a new one"
                    ));
                }
                return Ok(self.snapshot(old.clone()));
            }
        }
        self.inner.ctx.destination(&spec.dst_endpoint)?;
        let now = now_ms();
        let job = Job {
            id: id.to_owned(),
            spec,
            state: State::Active,
            progress: Progress::default(),
            errors: Vec::new(),
            error: None,
            tree_hash: None,
            created_ms: now,
            updated_ms: now,
            finished_ms: None,
            runs: 0,
        };
        self.save(&job)?;
        self.lock_jobs().insert(id.to_owned(), job.clone());
        self.launch(id);
        Ok(job)
    }

    /// Stops every running job without ending it (each stays active in the store and resumes
    /// at the next start; part files are kept), and waits up to `within` for them to let go.
    pub async fn stop(&self, within: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        for live in self.lock_live().values() {
            live.cancel.store(true, Ordering::SeqCst);
            live.wake.notify_waiters();
        }
        let deadline = Instant::now() + within;
        while !self.lock_live().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// A job, with its live counters.
    pub fn get(&self, id: &str) -> Option<Job> {
        let job = self.lock_jobs().get(id).cloned()?;
        Some(self.snapshot(job))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Job> {
        let jobs: Vec<Job> = self.lock_jobs().values().cloned().collect();
        let mut out: Vec<Job> = jobs.into_iter().map(|j| self.snapshot(j)).collect();
        out.sort_by_key(|j| std::cmp::Reverse(j.created_ms));
        out
    }

    /// Cancels an active job (its part files are removed); an ended job stays as it ended.
    pub fn cancel(&self, id: &str) -> Result<Job, String> {
        let job = self
            .lock_jobs()
            .get(id)
            .cloned()
            .ok_or_else(|| format!("no transfer {id} on this node"))?;
        if job.state != State::Active {
            return Ok(job);
        }
        if let Some(live) = self.lock_live().get(id) {
            live.cancel.store(true, Ordering::SeqCst);
            live.wake.notify_waiters();
        }
        let mut job = self.snapshot(job);
        job.state = State::Cancelled;
        job.finished_ms = Some(now_ms());
        job.updated_ms = now_ms();
        job.progress.eta_s = None;
        self.save(&job)?;
        self.lock_jobs().insert(id.to_owned(), job.clone());
        Ok(job)
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot(&self, mut job: Job) -> Job {
        if job.state != State::Active {
            return job;
        }
        if let Some(live) = self.lock_live().get(&job.id) {
            let mut p = live
                .progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            p.bytes_received = live.received.load(Ordering::Relaxed);
            let secs = live.started.elapsed().as_secs_f64().max(0.001);
            p.rate_bps = ((p
                .bytes_received
                .saturating_sub(job.progress.bytes_received.min(p.bytes_received)))
                as f64
                / secs) as u64;
            let left = p.bytes_total.saturating_sub(p.bytes_done + p.bytes_skipped);
            p.eta_s = (p.rate_bps > 0).then(|| left / p.rate_bps.max(1));
            job.progress = p;
        }
        job
    }

    fn save(&self, job: &Job) -> Result<(), String> {
        let bytes = serde_json::to_vec(job).map_err(|e| e.to_string())?;
        self.inner
            .store
            .put(store::cf::TRANSFERS, job.id.as_bytes(), &bytes)
            .map_err(|e| format!("cannot store transfer {}: {e}", job.id))
    }

    fn launch(&self, id: &str) {
        if self.stopping() {
            return;
        }
        let Some(mut job) = self.lock_jobs().get(id).cloned() else {
            return;
        };
        job.runs += 1;
        if let Err(e) = self.save(&job) {
            tracing::warn!(job = %job.id, error = %e, "cannot store a transfer's start");
        }
        self.lock_jobs().insert(job.id.clone(), job.clone());
        let live = Arc::new(Live {
            cancel: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            received: Arc::new(AtomicU64::new(job.progress.bytes_received)),
            progress: Mutex::new(Progress {
                bytes_received: job.progress.bytes_received,
                ..Progress::default()
            }),
            started: Instant::now(),
        });
        self.lock_live().insert(id.to_owned(), live.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let saver = {
                let this = this.clone();
                let id = job.id.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let Some(j) = this.get(&id) else { break };
                        if j.state != State::Active {
                            break;
                        }
                        let _ = this.save(&j);
                    }
                })
            };
            let outcome = this.run(&job, &live).await;
            saver.abort();
            if this.stopping() {
                // Left active in the store: it resumes when the node starts again.
                this.lock_live().remove(&job.id);
                return;
            }
            let mut done = this.snapshot(
                this.lock_jobs()
                    .get(&job.id)
                    .cloned()
                    .unwrap_or_else(|| job.clone()),
            );
            if done.state == State::Active {
                match outcome {
                    Ok(run) => {
                        done.errors = run.errors;
                        done.tree_hash = run.tree_hash;
                        done.state = if done.progress.files_failed == 0 {
                            State::Succeeded
                        } else {
                            done.error = Some(format!(
                                "{} of {} files failed (see errors)",
                                done.progress.files_failed, done.progress.files_total
                            ));
                            State::Failed
                        };
                    }
                    Err(Stop::Cancelled) => done.state = State::Cancelled,
                    Err(Stop::Failed(why)) => {
                        done.state = State::Failed;
                        done.error = Some(why);
                    }
                }
                done.progress.eta_s = None;
                done.finished_ms = Some(now_ms());
                done.updated_ms = now_ms();
                done.runs = done.runs.max(1);
                if let Err(e) = this.save(&done) {
                    tracing::warn!(job = %done.id, error = %e, "cannot store a finished transfer");
                }
                tracing::info!(job = %done.id, state = ?done.state, files = done.progress.files_done, bytes = done.progress.bytes_done, "transfer ended");
                this.lock_jobs().insert(done.id.clone(), done);
            }
            this.lock_live().remove(&job.id);
        });
    }

    async fn run(&self, job: &Job, live: &Arc<Live>) -> Result<RunOutcome, Stop> {
        let spec = &job.spec;
        let dst = self
            .inner
            .ctx
            .destination(&spec.dst_endpoint)
            .map_err(Stop::Failed)?;
        let first = self
            .inner
            .ctx
            .source(&spec.src_node, &spec.src_endpoint, &spec.src_path)
            .await
            .map(|(remote, token)| (remote, spec.read_token.clone().or(token)))
            .map_err(Stop::Failed)?;
        let source = Source {
            ctx: self.inner.ctx.clone(),
            spec: spec.clone(),
            now: tokio::sync::Mutex::new(first),
        };
        let src_root = RelPath::parse(&spec.src_path).map_err(|e| Stop::Failed(e.to_string()))?;
        let dst_base = RelPath::parse(&spec.dst_path).map_err(|e| Stop::Failed(e.to_string()))?;

        // What the source has, relative to its path ("" for a single file).
        let src_text = src_root.as_str();
        let top = self
            .patient(live, &source, |remote, token| async move {
                remote.stat(&spec.src_endpoint, src_text, token).await
            })
            .await?;
        let entries: Vec<Entry> = match (top.kind, spec.recursive) {
            (Kind::File, _) => vec![Entry {
                path: String::new(),
                ..top
            }],
            (Kind::Dir, true) => {
                self.patient(live, &source, |remote, token| async move {
                    remote.walk(&spec.src_endpoint, src_text, token).await
                })
                .await?
            }
            (Kind::Dir, false) => {
                return Err(Stop::Failed(format!(
                    "{} is a directory: copy it with --recursive",
                    src_root
                )));
            }
            (k, _) => {
                return Err(Stop::Failed(format!(
                    "{src_root} is a {k:?}, not a file or a directory"
                )));
            }
        };
        // A single file copied onto an existing directory goes inside it.
        let dst_base = if top.kind == Kind::File {
            let d = dst.clone();
            let b = dst_base.clone();
            let is_dir =
                blocking(move || Ok(d.stat(&b).map(|e| e.kind == Kind::Dir).unwrap_or(false)))
                    .await?;
            match (is_dir, src_root.split_last()) {
                (true, Some((_, name))) => dst_base.join(name),
                _ => dst_base,
            }
        } else {
            dst_base
        };
        let target = |rel: &str| -> Result<RelPath, Stop> {
            let r = RelPath::parse(rel)
                .map_err(|e| Stop::Failed(format!("the source listed {rel:?}: {e}")))?;
            Ok(dst_base.join_rel(&r))
        };
        let source_of = |rel: &str| -> Result<String, Stop> {
            let r = RelPath::parse(rel).map_err(|e| Stop::Failed(e.to_string()))?;
            Ok(src_root.join_rel(&r).as_str().to_owned())
        };

        let mut errors = Vec::new();
        let files: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::File).collect();
        {
            let mut p = lock(&live.progress);
            p.files_total = files.len() as u64;
            p.bytes_total = files.iter().map(|e| e.size).sum();
        }

        // Directories first (and the destination's top for a tree).
        let mut dirs: Vec<RelPath> = Vec::new();
        if top.kind == Kind::Dir {
            dirs.push(dst_base.clone());
        }
        for e in entries.iter().filter(|e| e.kind == Kind::Dir) {
            dirs.push(target(&e.path)?);
        }
        let made = {
            let dst = dst.clone();
            blocking(move || {
                let mut made = 0u64;
                for d in &dirs {
                    match dst.stat(d) {
                        Ok(e) if e.kind == Kind::Dir => {}
                        _ => {
                            dst.mkdir(d, true).map_err(|e| e.to_string())?;
                            made += 1;
                        }
                    }
                }
                Ok(made)
            })
            .await?
        };
        lock(&live.progress).dirs_made = made;
        for e in entries
            .iter()
            .filter(|e| !matches!(e.kind, Kind::File | Kind::Dir))
        {
            errors.push(FileError {
                path: e.path.clone(),
                error: format!(
                    "a {:?} is not copied (only files and directories are)",
                    e.kind
                ),
            });
        }

        // Which files must move: the cheap rules need only metadata; the others need hashes.
        let mut plan: Vec<(&Entry, RelPath)> = Vec::new();
        for e in &files {
            plan.push((e, target(&e.path)?));
        }
        let local: Vec<Option<Entry>> = {
            let dst = dst.clone();
            let paths: Vec<RelPath> = plan.iter().map(|(_, d)| d.clone()).collect();
            blocking(move || Ok(paths.iter().map(|p| dst.stat(p).ok()).collect())).await?
        };
        let mut need_hash = Vec::new();
        let mut skip = vec![false; plan.len()];
        for (i, ((src, _), here)) in plan.iter().zip(&local).enumerate() {
            let Some(here) = here.as_ref().filter(|h| h.kind == Kind::File) else {
                need_hash.push(i);
                continue;
            };
            match spec.sync {
                Some(SyncLevel::Exists) => skip[i] = true,
                Some(SyncLevel::Size) => skip[i] = here.size == src.size,
                Some(SyncLevel::Mtime) => {
                    skip[i] = here.size == src.size && here.mtime_ns >= src.mtime_ns
                }
                Some(SyncLevel::Checksum) | None => {}
            }
            if !skip[i] {
                need_hash.push(i);
            }
        }
        let hashes: Vec<FileHash> = {
            let paths: Vec<String> = need_hash
                .iter()
                .map(|&i| source_of(&plan[i].0.path))
                .collect::<Result<_, _>>()?;
            let paths = &paths;
            self.patient(live, &source, |remote, token| async move {
                remote.hashes(&spec.src_endpoint, paths, token).await
            })
            .await?
        };
        // Same size at the destination: compare hashes (it may be there already).
        let mut work: Vec<(usize, Hash, u64, u32, i64)> = Vec::new();
        let mut compare = Vec::new();
        for (&i, h) in need_hash.iter().zip(&hashes) {
            let Some(hash) = h.hash.as_deref().and_then(|s| s.parse::<Hash>().ok()) else {
                errors.push(FileError {
                    path: plan[i].0.path.clone(),
                    error: h
                        .error
                        .clone()
                        .unwrap_or_else(|| "the source sent no hash".into()),
                });
                lock(&live.progress).files_failed += 1;
                continue;
            };
            let same_size = local[i]
                .as_ref()
                .is_some_and(|l| l.kind == Kind::File && l.size == h.size);
            if same_size {
                compare.push((i, hash, h.size, h.mode, h.mtime_ns));
            } else {
                work.push((i, hash, h.size, h.mode, h.mtime_ns));
            }
        }
        let compared: Vec<bool> = {
            let dst = dst.clone();
            let items: Vec<(RelPath, Hash)> = compare
                .iter()
                .map(|(i, h, ..)| (plan[*i].1.clone(), *h))
                .collect();
            blocking(move || {
                Ok(items
                    .iter()
                    .map(|(p, h)| local_hash(&dst, p).is_ok_and(|mine| mine == *h))
                    .collect())
            })
            .await?
        };
        for (c, same) in compare.into_iter().zip(compared) {
            if same {
                skip[c.0] = true;
            } else {
                work.push(c);
            }
        }
        {
            let mut p = lock(&live.progress);
            for (i, s) in skip.iter().enumerate() {
                if *s {
                    p.files_skipped += 1;
                    p.bytes_skipped += plan[i].0.size;
                }
            }
        }
        let tree_hash = (errors.is_empty() && need_hash.len() == plan.len()).then(|| {
            let mut h = blake3_tree::Hasher::new();
            let mut items: Vec<(&str, &FileHash)> = plan
                .iter()
                .map(|(e, _)| e.path.as_str())
                .zip(&hashes)
                .collect();
            items.sort_by(|a, b| a.0.cmp(b.0));
            for (p, fh) in items {
                h.update(p.as_bytes());
                h.update(b"\0");
                h.update(fh.hash.as_deref().unwrap_or("").as_bytes());
                h.update(b"\n");
            }
            h.finalize().to_hex().to_string()
        });

        // Small files go whole, many to a request, written in one blocking task per batch;
        // what does not arrive that way (changed at the source, corrupt, refused) goes the
        // per-file way below, which retries and resumes.
        let (small, mut work): (Vec<_>, Vec<_>) = work
            .into_iter()
            .partition(|w| w.2 > 0 && w.2 <= crate::wire::SMALL_WHOLE);
        let mut results: Vec<(String, Result<u64, String>)> = Vec::new();
        for batch in small.chunks(crate::wire::MAX_SMALL_FILES) {
            if live.cancel.load(Ordering::SeqCst) {
                return Err(Stop::Cancelled);
            }
            let mut asked = Vec::new();
            let mut paths = Vec::new();
            for w in batch {
                match source_of(&plan[w.0].0.path) {
                    Ok(from) => {
                        paths.push((from, w.1.to_string()));
                        asked.push(*w);
                    }
                    Err(_) => work.push(*w),
                }
            }
            let (remote, token) = source.now().await;
            let got = match remote
                .get_files(&spec.src_endpoint, paths, token, &live.received)
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(error = %e, "small files by the batch failed; one by one");
                    work.extend(asked);
                    continue;
                }
            };
            let mut write = Vec::new();
            for (w, bytes) in asked.into_iter().zip(got) {
                match bytes {
                    Some(b) if Hash::of(&b) == w.1 => write.push((
                        plan[w.0].0.path.clone(),
                        plan[w.0].1.clone(),
                        part_tag(&job.id, &plan[w.0].1, &w.1),
                        w.3,
                        w.4,
                        b,
                    )),
                    _ => work.push(w),
                }
            }
            let dst = dst.clone();
            let parts = self.inner.parts.clone();
            let written = blocking(move || {
                use std::io::Write as _;
                Ok(write
                    .into_iter()
                    .map(|(path, to, tag, mode, mtime_ns, bytes)| {
                        let r = dst
                            .part_file(&to, &tag)
                            .map_err(|e| e.to_string())
                            .and_then(|(mut file, dir, part)| {
                                file.write_all(&bytes).map_err(|e| e.to_string())?;
                                dst.commit(&file, &dir, &part, &to, mode, mtime_ns)
                                    .map_err(|e| e.to_string())
                            })
                            .map(|()| bytes.len() as u64);
                        // An earlier attempt of this file one by one may have left its
                        // outboard (files of one chunk group never have one).
                        if r.is_ok() && crate::blob::outboard_size(bytes.len() as u64) > 0 {
                            let _ = std::fs::remove_file(parts.join(format!("{tag}.obao")));
                        }
                        (path, r)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
            results.extend(written);
        }

        // Pull.
        let mean = work.iter().map(|w| w.2).sum::<u64>() / work.len().max(1) as u64;
        let concurrent = if mean <= SMALL_FILE {
            CONCURRENT_SMALL_FILES
        } else {
            CONCURRENT_FILES
        };
        let one_by_one: Vec<(String, Result<u64, String>)> = futures::stream::iter(work)
            .map(|(i, hash, size, mode, mtime_ns)| {
                let (entry, to) = (&plan[i].0, plan[i].1.clone());
                let from = source_of(&entry.path);
                let source = &source;
                let dst = dst.clone();
                let live = live.clone();
                let job_id = job.id.clone();
                async move {
                    let from = match from {
                        Ok(f) => f,
                        Err(Stop::Failed(e)) => return (entry.path.clone(), Err(e)),
                        Err(Stop::Cancelled) => {
                            return (entry.path.clone(), Err("cancelled".into()));
                        }
                    };
                    let r = self
                        .pull(
                            &job_id,
                            source,
                            &spec.src_endpoint,
                            &from,
                            &dst,
                            &to,
                            hash,
                            size,
                            mode,
                            mtime_ns,
                            &live,
                        )
                        .await;
                    (entry.path.clone(), r)
                }
            })
            .buffer_unordered(concurrent)
            .collect()
            .await;
        results.extend(one_by_one);
        if live.cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        for (path, r) in results {
            let mut p = lock(&live.progress);
            match r {
                Ok(size) => {
                    p.files_done += 1;
                    p.bytes_done += size;
                }
                Err(error) => {
                    p.files_failed += 1;
                    errors.push(FileError { path, error });
                }
            }
        }

        // Extra files at the destination.
        if spec.delete && top.kind == Kind::Dir {
            let keep: HashSet<String> = entries.iter().map(|e| e.path.clone()).collect();
            let dst = dst.clone();
            let base = dst_base.clone();
            let deleted = blocking(move || {
                let here = dst
                    .walk(&base, crate::net::MAX_WALK)
                    .map_err(|e| e.to_string())?;
                let mut n = 0u64;
                // Deepest first, so that a directory is emptied before it goes.
                for e in here.iter().rev() {
                    if keep.contains(&e.path) {
                        continue;
                    }
                    let p = base.join_rel(&RelPath::parse(&e.path).map_err(|e| e.to_string())?);
                    match dst.remove(&p, true) {
                        Ok(()) => n += 1,
                        Err(crate::root::PathError::NotFound(_)) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(n)
            })
            .await?;
            lock(&live.progress).deleted = deleted;
        }
        // Everything in place reaches the disk before the job counts as done.
        {
            let dst = dst.clone();
            blocking(move || dst.sync().map_err(|e| e.to_string())).await?;
        }
        errors.truncate(MAX_ERRORS);
        Ok(RunOutcome { errors, tree_hash })
    }

    /// Runs `call` until it succeeds, retrying (with backoff) while the source is unreachable,
    /// for up to the job's patience; a refusal ends it at once.
    async fn patient<T, F, Fut>(&self, live: &Live, source: &Source, mut call: F) -> Result<T, Stop>
    where
        F: FnMut(Remote, Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::net::Error>>,
    {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            if live.cancel.load(Ordering::SeqCst) {
                return Err(Stop::Cancelled);
            }
            let (remote, token) = source.now().await;
            match call(remote, token).await {
                Ok(t) => return Ok(t),
                Err(crate::net::Error::Refused { reason, .. }) => return Err(Stop::Failed(reason)),
                Err(e) if started.elapsed() > self.inner.patience => {
                    return Err(Stop::Failed(format!(
                        "the source stayed unreachable for {} s: {e}",
                        self.inner.patience.as_secs()
                    )));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "transfer source unreachable; retrying");
                    let _ = tokio::time::timeout(wait, live.wake.notified()).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                    source.refresh().await;
                }
            }
        }
    }

    /// Pulls one file into place; returns its size.
    #[allow(clippy::too_many_arguments)]
    async fn pull(
        &self,
        job: &str,
        source: &Source,
        endpoint: &str,
        from: &str,
        dst: &Arc<DataRoot>,
        to: &RelPath,
        hash: Hash,
        size: u64,
        mode: u32,
        mtime_ns: i64,
        live: &Arc<Live>,
    ) -> Result<u64, String> {
        let tag = part_tag(job, to, &hash);
        let obao_path = self.inner.parts.join(format!("{tag}.obao"));
        let opened = {
            let dst = dst.clone();
            let to = to.clone();
            let obao_path = obao_path.clone();
            blocking(move || {
                let (file, dir, part) = dst.part_file(&to, &tag).map_err(|e| e.to_string())?;
                // A file of one chunk group has an empty outboard: no file for it (creating
                // and removing one per small file cost more than the file itself).
                let obao = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(if crate::blob::outboard_size(size) == 0 {
                        std::path::Path::new("/dev/null")
                    } else {
                        obao_path.as_path()
                    })
                    .map_err(|e| format!("{}: {e}", obao_path.display()))?;
                let mut partial =
                    Partial::open(hash, size, file, obao).map_err(|e| e.to_string())?;
                // The copy ends with a sync: the disk starts on each mebibyte as it lands.
                partial.write_behind();
                Ok((partial, dir, part))
            })
            .await
        };
        let (mut partial, dir, part) = opened.map_err(|s| match s {
            Stop::Failed(e) => e,
            Stop::Cancelled => "cancelled".into(),
        })?;
        if size > 0 {
            let started = Instant::now();
            let mut wait = Duration::from_millis(200);
            loop {
                if live.cancel.load(Ordering::SeqCst) {
                    if self.stopping() {
                        return Err("the node is stopping".into());
                    }
                    let dst = dst.clone();
                    let _ = blocking(move || {
                        dst.remove_part(&dir, &part);
                        let _ = std::fs::remove_file(&obao_path);
                        Ok(())
                    })
                    .await;
                    return Err("cancelled".into());
                }
                let (remote, token) = source.now().await;
                let fetched = tokio::select! {
                    r = remote.fetch_file(endpoint, from, token, partial, CORRUPT_ROUNDS, live.received.clone()) => r,
                    () = cancelled(live) => {
                        if self.stopping() {
                            return Err("the node is stopping".into());
                        }
                        let dst = dst.clone();
                        let _ = blocking(move || {
                            dst.remove_part(&dir, &part);
                            let _ = std::fs::remove_file(&obao_path);
                            Ok(())
                        })
                        .await;
                        return Err("cancelled".into());
                    }
                };
                match fetched {
                    Ok(p) => {
                        partial = p;
                        break;
                    }
                    Err((p, crate::net::Error::Refused { reason, .. })) => {
                        drop(p);
                        return Err(reason);
                    }
                    Err((p, e)) => {
                        partial = p;
                        if started.elapsed() > self.inner.patience {
                            return Err(format!(
                                "gave up after {} s: {e}",
                                self.inner.patience.as_secs()
                            ));
                        }
                        tracing::debug!(path = %from, error = %e, "file transfer interrupted; resuming");
                        let _ = tokio::time::timeout(wait, live.wake.notified()).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                        source.refresh().await;
                    }
                }
            }
        }
        let dst = dst.clone();
        let to = to.clone();
        blocking(move || {
            // Every group of the file verified against its hash: as it arrived, or (what an
            // earlier attempt left) hashed again when this one resumed. Reading it all back to
            // hash it once more cost a fifth of a 1 GiB copy and checked only the page cache.
            if size == 0 {
                if hash != Hash::of(&[]) {
                    return Err(format!("an empty file cannot have hash {hash}"));
                }
            } else if !partial
                .missing_known()
                .map_err(|e| e.to_string())?
                .is_empty()
            {
                return Err("the file did not verify after it arrived".into());
            }
            let file = partial.into_data();
            dst.commit(&file, &dir, &part, &to, mode, mtime_ns)
                .map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&obao_path);
            Ok(size)
        })
        .await
        .map_err(|s| match s {
            Stop::Failed(e) => e,
            Stop::Cancelled => "cancelled".into(),
        })
    }
}

/// The source of a running job: its node's data plane, looked up again after a failure (a
/// restarted node may listen on another port).
struct Source {
    ctx: Arc<dyn Context>,
    spec: Spec,
    now: tokio::sync::Mutex<(Remote, Option<String>)>,
}

impl Source {
    async fn now(&self) -> (Remote, Option<String>) {
        self.now.lock().await.clone()
    }

    async fn refresh(&self) {
        let s = &self.spec;
        match self
            .ctx
            .source(&s.src_node, &s.src_endpoint, &s.src_path)
            .await
        {
            Ok((remote, token)) => {
                *self.now.lock().await = (remote, s.read_token.clone().or(token))
            }
            Err(e) => tracing::debug!(error = %e, "cannot look the transfer source up again"),
        }
    }
}

struct RunOutcome {
    errors: Vec<FileError>,
    tree_hash: Option<String>,
}

enum Stop {
    Cancelled,
    Failed(String),
}

/// Resolves once the job is cancelled.
async fn cancelled(live: &Live) {
    while !live.cancel.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The name a file's part file (and outboard) takes while it arrives: the same for the same
/// job, path and content, so that a resumed job finds it.
fn part_tag(job: &str, to: &RelPath, hash: &Hash) -> String {
    let mut h = blake3_tree::Hasher::new();
    h.update(job.as_bytes());
    h.update(b"\0");
    h.update(to.as_str().as_bytes());
    h.update(hash.to_string().as_bytes());
    h.finalize().to_hex()[..24].to_string()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Stop::Failed),
        Err(e) => Err(Stop::Failed(format!("internal error: {e}"))),
    }
}

/// The hash of a file at the destination.
fn local_hash(root: &DataRoot, path: &RelPath) -> Result<Hash, String> {
    let file = root.open_file(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    crate::blob::outboard_of(&file, size)
        .map(|(h, _)| h)
        .map_err(|e| e.to_string())
}

mod blake3_tree {
    pub(super) use bao_tree::blake3::Hasher;
}
