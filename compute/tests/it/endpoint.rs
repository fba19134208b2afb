//! A real endpoint with real Python workers on the host.

use std::time::Duration;

use compute::task::{Encoding, FailureKind, Outcome, Record, Status, Submission, TaskId};
use compute::{Endpoint, EndpointConfig, Results, Strategy};
use crdt_registry::Key;
use crdt_registry::record::{Container, FunctionKind, FunctionRecord, FunctionSpec};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Harness {
    endpoint: Endpoint,
    results: Results,
    _dir: tempfile::TempDir,
    cancel: CancellationToken,
    tracker: TaskTracker,
    store: store::Store,
}

fn owner() -> Key {
    Key::of(&ed25519_key())
}

fn ed25519_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

fn python(name: &str, source: &str) -> FunctionRecord {
    FunctionRecord {
        name: name.into(),
        owner: owner(),
        kind: FunctionKind::Python,
        spec: FunctionSpec::PythonSource {
            source: source.into(),
            entrypoint: name.into(),
        },
        container: None,
        description: String::new(),
        created_ms: 0,
    }
}

fn shell(command: &str) -> FunctionRecord {
    FunctionRecord {
        name: "sh".into(),
        owner: owner(),
        kind: FunctionKind::Shell,
        spec: FunctionSpec::Shell {
            command: command.into(),
        },
        container: None,
        description: String::new(),
        created_ms: 0,
    }
}

fn submission(f: &FunctionRecord, args: Value, kwargs: Value) -> Submission {
    Submission {
        capability: None,
        id: TaskId::random(),
        endpoint: "ep".into(),
        function: f.clone(),
        function_id: f.content_id(),
        args,
        kwargs,
        args_ref: None,
        encoding: Encoding::Json,
        timeout_ms: 0,
        submitted_us: 0,
    }
}

async fn start_in(dir: tempfile::TempDir, config: EndpointConfig) -> Harness {
    start_with(dir, config, None).await
}

async fn start_with(
    dir: tempfile::TempDir,
    config: EndpointConfig,
    values: Option<compute::blobs::Values>,
) -> Harness {
    let store = store::Store::open(&dir.path().join("db")).unwrap();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (endpoint, results) = Endpoint::start(
        config,
        values,
        store.clone(),
        &dir.path().join("work"),
        "test",
        cancel.clone(),
        &tracker,
    )
    .await
    .unwrap();
    Harness {
        endpoint,
        results,
        _dir: dir,
        cancel,
        tracker,
        store,
    }
}

async fn start(config: EndpointConfig) -> Harness {
    start_in(tempfile::tempdir().unwrap(), config).await
}

/// [`config`] with a single worker: a task after another one runs in the same worker, or in a
/// new one once that has gone.
fn one_worker() -> EndpointConfig {
    EndpointConfig {
        max_workers: 1,
        ..config()
    }
}

fn config() -> EndpointConfig {
    EndpointConfig {
        name: "ep".into(),
        max_workers: 2,
        result_limit: 4096,
        task_memory_mb: 200,
        // These tests drive the endpoint's mechanics with marker files in the test's own temp
        // dir, which an isolated worker may not touch; isolation has its own test in testnet.
        host_user: compute::config::HostUser::Node,
        ..EndpointConfig::default()
    }
}

impl Harness {
    async fn run(&mut self, sub: Submission) -> Record {
        let id = sub.id.clone();
        let accepted = self
            .endpoint
            .submit("peer", "inst-a", vec![sub])
            .await
            .unwrap();
        assert!(accepted[0].is_ok(), "{accepted:?}");
        self.wait(&id).await
    }

    async fn wait(&mut self, id: &TaskId) -> Record {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let rec = self.results.recv().await.expect("endpoint running");
                if &rec.id == id {
                    return rec;
                }
            }
        })
        .await
        .expect("the task finishes within 30 s")
    }

    /// Waits for the results of all of `ids` (in any order), each within 30 s of the last.
    async fn wait_all(&mut self, ids: &[TaskId]) -> Vec<Record> {
        let mut left: std::collections::HashSet<&TaskId> = ids.iter().collect();
        let mut out = Vec::new();
        while !left.is_empty() {
            let rec = tokio::time::timeout(Duration::from_secs(30), self.results.recv())
                .await
                .expect("results within 30 s")
                .expect("endpoint running");
            if left.remove(&rec.id) {
                out.push(rec);
            }
        }
        out
    }

    /// Waits until the endpoint reports the task running.
    async fn until_running(&self, id: &TaskId) {
        let ep = self.endpoint.clone();
        until("the task to run", || {
            let (ep, id) = (ep.clone(), id.clone());
            async move {
                let r = ep.records(vec![id]).await.unwrap();
                r[0].as_ref().is_some_and(|r| r.status == Status::Running)
            }
        })
        .await;
    }

    /// Acknowledges results, then waits until the outbox no longer offers them and their `s/`
    /// entries have left the store (with the endpoint's next write, or within 100 ms).
    async fn acknowledge_until_gone(&self, ids: &[TaskId]) {
        self.endpoint.acknowledge(ids.to_vec()).await.unwrap();
        let ep = self.endpoint.clone();
        until("the outbox to empty", || {
            let ep = ep.clone();
            async move {
                ep.unacknowledged(Default::default())
                    .await
                    .unwrap()
                    .is_empty()
            }
        })
        .await;
        let store = self.store.clone();
        until("the acknowledged entries to be deleted", || {
            let store = store.clone();
            let ids = ids.to_vec();
            async move {
                ids.iter().all(|id| {
                    store
                        .get(store::cf::TASKS, format!("s/ep/{id}").as_bytes())
                        .unwrap()
                        .is_none()
                })
            }
        })
        .await;
    }

    async fn stop(self) -> (tempfile::TempDir, store::Store) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        (self._dir, self.store)
    }
}

/// Polls `check` until it holds, failing after 20 s: a wait for a condition, not a fixed sleep.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn value(rec: &Record) -> &Value {
    match &rec.outcome {
        Some(Outcome::Succeeded { value, .. }) => value,
        other => panic!("expected success, got {other:?}"),
    }
}

fn error(rec: &Record) -> &compute::TaskError {
    match &rec.outcome {
        Some(Outcome::Failed { error, .. }) => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

const SOURCE: &str = "import os, time\n\
def add(a, b=1):\n    return a + b\n\
def length(s, extra=''):\n    return len(s) + len(extra)\n\
def same(s):\n    return s\n\
def got_size(ref):\n    import funcmesh_blobs\n    return os.path.getsize(funcmesh_blobs.get(ref))\n\
def shout(ref):\n    import funcmesh_blobs, tempfile\n    text = open(funcmesh_blobs.get(ref)).read()\n    \
out = tempfile.NamedTemporaryFile('w', delete=False)\n    out.write(text.upper())\n    out.close()\n    \
return funcmesh_blobs.put(out.name)\n\
def boom(x):\n    return helper(x)\n\
def helper(x):\n    raise ValueError('bad value %r' % x)\n\
def sleep(s):\n    time.sleep(s)\n    return s\n\
def big(n):\n    return 'x' * n\n\
def hog(mb):\n    return len(bytearray(mb << 20))\n\
def die():\n    os._exit(3)\n\
def touch(path):\n    open(path, 'w').close()\n    return path\n\
def pid():\n    return os.getpid()\n\
def noisy(n):\n    import sys\n    sys.stderr.buffer.write(b'not utf-8: \\xff\\n' + b'x' * n)\n    sys.stderr.flush()\n    return n\n\
def pid_sleep(path, s):\n    with open(path + '.tmp', 'w') as f:\n        f.write(str(os.getpid()))\n    os.rename(path + '.tmp', path)\n    time.sleep(s)\n    return s\n\
def garbage():\n    for fd in range(3, 10):\n        try:\n            os.write(fd, b'this is not a frame, it is text on the pipe')\n        except OSError:\n            pass\n    time.sleep(5)\n";

fn f(name: &str) -> FunctionRecord {
    let mut r = python(name, SOURCE);
    r.name = name.into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_function_runs_and_the_second_task_reuses_the_warm_worker() {
    let mut h = start(config()).await;
    let first = h
        .run(submission(&f("add"), json!([2]), json!({"b": 40})))
        .await;
    assert_eq!(value(&first), &json!(42));
    assert!(
        first.cold_start,
        "the first task waited for a worker to start"
    );
    assert!(first.times.waiting_us > 0 && first.times.running_us >= first.times.waiting_us);
    assert!(first.times.finished_us >= first.times.running_us);
    let second = h.run(submission(&f("add"), json!([1, 2]), json!({}))).await;
    assert_eq!(value(&second), &json!(3));
    assert!(!second.cold_start, "{second:?}");
    assert_eq!(second.times.waiting_us, 0);
    assert_eq!(second.worker, first.worker, "the same warm worker ran it");
    let load = h.endpoint.load().await.unwrap();
    assert!(
        load.environments[&compute::Environment::host()]
            .cold_start_ms
            .is_some()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_exception_comes_back_with_type_message_and_traceback() {
    let mut h = start(config()).await;
    let rec = h.run(submission(&f("boom"), json!([7]), json!({}))).await;
    assert_eq!(rec.status, Status::Failed);
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::Exception);
    assert_eq!(e.type_name, "ValueError");
    assert_eq!(e.message, "bad value 7");
    let tb = e.traceback.as_deref().unwrap();
    assert!(tb.contains("in boom") && tb.contains("in helper"), "{tb}");
    assert!(
        tb.contains("raise ValueError"),
        "the source line is shown: {tb}"
    );
    assert!(
        !tb.contains("worker.py"),
        "the worker's own frames are hidden: {tb}"
    );
    h.stop().await;
}

/// An exception carrying 40 MB is delivered, cut: its message keeps its two ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_exception_is_delivered_truncated() {
    let mut h = start(EndpointConfig {
        task_memory_mb: 0,
        ..config()
    })
    .await;
    let huge = python(
        "huge",
        "def huge():\n    raise ValueError('start' + 'x' * 40_000_000 + 'end')\n",
    );
    let rec = h.run(submission(&huge, json!([]), json!({}))).await;
    assert_eq!(rec.status, Status::Failed);
    let e = error(&rec);
    assert_eq!(
        e.kind,
        FailureKind::Exception,
        "{}",
        &e.message[..200.min(e.message.len())]
    );
    assert_eq!(e.type_name, "ValueError");
    assert!(e.message.len() < 100_000, "{} characters", e.message.len());
    assert!(e.message.starts_with("start") && e.message.ends_with("end"));
    assert!(e.message.contains("characters cut"));
    assert!(e.traceback.as_deref().is_some_and(|t| t.len() < 100_000));
    // The worker serves on.
    let ok = h.run(submission(&f("add"), json!([1]), json!({}))).await;
    assert_eq!(value(&ok), &json!(2));
    h.stop().await;
}

/// Whether a process has ended (gone, or a zombie not reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The pid a `pid_sleep` task wrote to `path`, once it has.
async fn pid_in(path: &std::path::Path) -> u32 {
    until("the task to write its pid", || async move { path.exists() }).await;
    std::fs::read_to_string(path).unwrap().parse().unwrap()
}

/// Waits until the worker process `pid` has ended, then checks that the next task runs, in
/// another worker.
async fn worker_ended_and_another_serves(h: &mut Harness, pid: u32) {
    until("the worker to be killed", || async move { ended(pid) }).await;
    let next = h.run(submission(&f("pid"), json!([]), json!({}))).await;
    let other = value(&next).as_u64().unwrap();
    assert_ne!(other, u64::from(pid), "a new worker ran the next task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_stops_the_task_and_the_endpoint_keeps_serving() {
    let mut h = start(one_worker()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pid");
    let mut slow = submission(&f("pid_sleep"), json!([path, 30]), json!({}));
    slow.timeout_ms = 300;
    let rec = h.run(slow).await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::Timeout, "{e:?}");
    assert!(e.message.contains("300ms"), "{}", e.message);
    let pid = pid_in(&path).await;
    worker_ended_and_another_serves(&mut h, pid).await;
    let ok = h.run(submission(&f("add"), json!([1]), json!({}))).await;
    assert_eq!(value(&ok), &json!(2));
    h.stop().await;
}

/// A command that floods its output does not grow its worker: only the tail the cap can show is
/// kept while the rest is read and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_shell_output_does_not_grow_the_worker() {
    let mut h = start(EndpointConfig {
        output_cap: 1000,
        task_memory_mb: 0,
        ..config()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker-pid");
    let rec = h
        .run(submission(
            &shell("echo $PPID > {0}; head -c 300000000 /dev/zero | tr '\\0' a"),
            json!([path]),
            json!({}),
        ))
        .await;
    let out = value(&rec)["stdout"].as_str().unwrap().to_owned();
    assert!(
        out.starts_with("[... 299999000 characters cut]"),
        "{}",
        &out[..80.min(out.len())]
    );
    assert!(out.len() < 1100, "{} characters kept", out.len());
    let pid: u32 = std::fs::read_to_string(&path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kb < 100 << 10,
        "the worker peaked at {peak_kb} kB for 300 MB of output"
    );
    h.stop().await;
}

/// A shell command runs under the task's memory limit, hard as well as soft: it cannot lift it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_command_cannot_lift_its_memory_limit() {
    let mut h = start(config()).await;
    let rec = h
        .run(submission(
            &shell("ulimit -v unlimited 2>/dev/null && echo lifted || echo kept"),
            json!([]),
            json!({}),
        ))
        .await;
    assert_eq!(value(&rec)["stdout"], "kept\n", "{rec:?}");
    h.stop().await;
}

/// Issue 17: a Python task cannot lift the endpoint's memory limit (it is hard as well as
/// soft), so allocating past it still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_task_cannot_lift_its_memory_limit() {
    let mut h = start(one_worker()).await;
    let lift = python(
        "lift",
        "def lift():\n    import resource\n    try:\n        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n        lifted = True\n    except (ValueError, OSError):\n        lifted = False\n    try:\n        blob = bytearray(400 << 20)\n        return [lifted, len(blob)]\n    except MemoryError:\n        return [lifted, 0]\n",
    );
    let rec = h.run(submission(&lift, json!([]), json!({}))).await;
    assert_eq!(value(&rec), &json!([false, 0]), "{rec:?}");
    // The worker keeps serving under its limit.
    let ok = submission(&f("add"), json!([2]), json!({"b": 1}));
    assert_eq!(value(&h.run(ok).await), &json!(3));
    h.stop().await;
}

/// A shell command after a Python task in the same worker: the worker's hard limit is set, and
/// the command's own limit stays under it instead of failing to be set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_command_runs_after_a_python_task_set_the_workers_limit() {
    let mut h = start(one_worker()).await;
    let ok = submission(&f("add"), json!([2]), json!({"b": 1}));
    assert_eq!(value(&h.run(ok).await), &json!(3));
    let rec = h
        .run(submission(&shell("echo fine"), json!([]), json!({})))
        .await;
    assert_eq!(value(&rec)["stdout"], "fine\n", "{rec:?}");
    h.stop().await;
}

/// A submitter cannot ask for more time than the endpoint's operator allows; within it, a
/// task that asks for nothing gets the endpoint's (finite) default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_limit_over_the_operators_maximum_is_refused() {
    assert!(
        !EndpointConfig::default().task_timeout.is_zero(),
        "a finite default"
    );
    let mut h = start(EndpointConfig {
        max_task_timeout: std::time::Duration::from_secs(60),
        ..one_worker()
    })
    .await;
    let mut greedy = submission(&f("add"), json!([1]), json!({}));
    greedy.timeout_ms = 61_000;
    let answer = h
        .endpoint
        .submit("peer", "inst-a", vec![greedy])
        .await
        .unwrap();
    let why = answer[0].as_ref().expect_err("refused");
    assert!(why.contains("allows at most 1m"), "{why}");
    let mut fair = submission(&f("add"), json!([1]), json!({}));
    fair.timeout_ms = 60_000;
    assert_eq!(value(&h.run(fair).await), &json!(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_writing_endless_or_binary_stderr_does_not_stall_its_worker() {
    let mut h = start(one_worker()).await;
    // A line that is not UTF-8, then 4 MiB without a newline: far more than a pipe holds.
    for _ in 0..2 {
        let rec = h
            .run(submission(&f("noisy"), json!([4 << 20]), json!({})))
            .await;
        assert_eq!(value(&rec), &json!(4 << 20));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limit_fails_the_task_with_a_clear_error() {
    let mut h = start(config()).await;
    let rec = h.run(submission(&f("hog"), json!([1024]), json!({}))).await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::MemoryLimit, "{e:?}");
    assert!(e.message.contains("200 MiB"), "{}", e.message);
    let ok = h.run(submission(&f("hog"), json!([10]), json!({}))).await;
    assert_eq!(value(&ok), &json!(10 << 20));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_size_limit_fails_and_says_so() {
    let mut h = start(config()).await;
    let rec = h
        .run(submission(&f("big"), json!([10_000]), json!({})))
        .await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::ResultTooLarge);
    assert!(e.message.contains("limit of 4096 bytes"), "{}", e.message);
    let ok = h.run(submission(&f("big"), json!([10]), json!({}))).await;
    assert_eq!(value(&ok), &json!("xxxxxxxxxx"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_running_task_and_the_next_one_runs() {
    // One worker: the next task can only run once the cancelled one's worker is gone.
    let mut h = start(one_worker()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pid");
    let sub = submission(&f("pid_sleep"), json!([path, 30]), json!({}));
    let id = sub.id.clone();
    h.endpoint
        .submit("peer", "inst-a", vec![sub])
        .await
        .unwrap();
    // Cancel once it runs.
    h.until_running(&id).await;
    let pid = pid_in(&path).await;
    let rec = h.endpoint.cancel(id.clone()).await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    let reported = h.wait(&id).await;
    assert_eq!(reported.status, Status::Cancelled);
    worker_ended_and_another_serves(&mut h, pid).await;
    let ok = h.run(submission(&f("add"), json!([5]), json!({}))).await;
    assert_eq!(value(&ok), &json!(6));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_while_its_batch_runs_is_skipped_by_the_worker() {
    let mut h = start(one_worker()).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let first = submission(&f("sleep"), json!([0.5]), json!({}));
    let second = submission(&f("touch"), json!([marker.to_str().unwrap()]), json!({}));
    let (a, b) = (first.id.clone(), second.id.clone());
    h.endpoint
        .submit("peer", "inst-a", vec![first, second])
        .await
        .unwrap();
    // One worker: both tasks are in its batch, the first one sleeping.
    h.until_running(&a).await;
    h.until_running(&b).await;
    let rec = h.endpoint.cancel(b.clone()).await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    assert_eq!(h.wait(&a).await.status, Status::Succeeded);
    // The worker runs its batch in order: once a later task is done, the skipped one would
    // have run if it was going to.
    let ok = h.run(submission(&f("add"), json!([1]), json!({}))).await;
    assert_eq!(value(&ok), &json!(2));
    assert!(!marker.exists(), "the cancelled task ran");
    h.stop().await;
}

/// Whether a process runs with exactly this command line.
fn running(cmdline: &[&str]) -> bool {
    let want: Vec<u8> = cmdline
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_shell_command_kills_the_command_and_its_children() {
    let mut h = start(config()).await;
    // The shell stays the command's parent (`; echo`), so the sleep is its child: the worker's
    // grandchild, in a process group of its own.
    let secs = format!("600.{}", rand::random::<u32>());
    let sub = submission(&shell("sleep {0}; echo done"), json!([secs]), json!({}));
    let id = sub.id.clone();
    h.endpoint
        .submit("peer", "inst-a", vec![sub])
        .await
        .unwrap();
    until("the command to start", || async {
        running(&["sleep", &secs])
    })
    .await;
    let rec = h.endpoint.cancel(id.clone()).await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    until("the cancelled command to be gone", || async {
        !running(&["sleep", &secs])
    })
    .await;
    let ok = h.run(submission(&f("add"), json!([5]), json!({}))).await;
    assert_eq!(value(&ok), &json!(6));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_worker_or_garbage_on_its_pipe_fails_only_that_task() {
    let mut h = start(config()).await;
    let rec = h.run(submission(&f("die"), json!([]), json!({}))).await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::WorkerLost);
    assert!(e.message.contains("exit status 3"), "{}", e.message);
    let rec = h.run(submission(&f("garbage"), json!([]), json!({}))).await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::WorkerLost);
    assert!(e.message.contains("protocol pipe"), "{}", e.message);
    let ok = h.run(submission(&f("add"), json!([1]), json!({}))).await;
    assert_eq!(value(&ok), &json!(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_functions_capture_output_and_time_out_with_124() {
    let mut h = start(config()).await;
    let rec = h
        .run(submission(
            &shell("echo {0}; echo {who} >&2"),
            json!(["hello; rm -rf /"]),
            json!({"who": "world"}),
        ))
        .await;
    let v = value(&rec);
    assert_eq!(v["returncode"], 0);
    assert_eq!(v["stdout"], "hello; rm -rf /\n", "arguments are quoted");
    assert_eq!(v["stderr"], "world\n");
    let mut slow = submission(&shell("sleep 30"), json!([]), json!({}));
    slow.timeout_ms = 200;
    let rec = h.run(slow).await;
    assert_eq!(error(&rec).kind, FailureKind::Timeout);
    match &rec.outcome {
        Some(Outcome::Failed { value: Some(v), .. }) => assert_eq!(v["returncode"], 124),
        other => panic!("{other:?}"),
    }
    let rec = h
        .run(submission(&shell("exit 5"), json!([]), json!({})))
        .await;
    assert_eq!(error(&rec).kind, FailureKind::Exception);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_are_refused_with_the_reason() {
    let mut h = start(config()).await;
    let mut tampered = submission(&f("add"), json!([1]), json!({}));
    tampered.function_id = "f0000".into();
    let mut bad_args = submission(&f("add"), json!({"not": "a list"}), json!({}));
    bad_args.id = TaskId::random();
    let mut docker = f("add");
    docker.container = Some(Container {
        runtime: "docker".into(),
        image: "x".into(),
    });
    let wrong_runtime = submission(&docker, json!([1]), json!({}));
    let mut elsewhere = submission(&f("add"), json!([1]), json!({}));
    elsewhere.endpoint = "other".into();
    // Same id as a function the endpoint has just checked, other code: still refused (a
    // function is hashed once per id only while its record stays the same).
    let mut swapped = submission(&f("add"), json!([1]), json!({}));
    swapped.function.description = "same code, other words".into();
    if let FunctionSpec::PythonSource { source, .. } = &mut swapped.function.spec {
        source.push_str("\nimport os\n");
    }
    // Past the clock's range: refused, not a panic in the pool's timer.
    let mut forever = submission(&f("add"), json!([1]), json!({}));
    forever.timeout_ms = u64::MAX;
    let answers = h
        .endpoint
        .submit(
            "peer",
            "inst-a",
            vec![
                tampered,
                bad_args,
                wrong_runtime,
                elsewhere,
                swapped,
                forever,
            ],
        )
        .await
        .unwrap();
    let errs: Vec<String> = answers.into_iter().map(|a| a.unwrap_err()).collect();
    assert!(errs[4].contains("does not match its id"), "{}", errs[4]);
    assert!(errs[0].contains("does not match its id"), "{}", errs[0]);
    assert!(errs[1].contains("args must be a JSON array"), "{}", errs[1]);
    assert!(
        errs[2].contains("does not offer the docker runtime"),
        "{}",
        errs[2]
    );
    assert!(errs[3].contains("not `other`"), "{}", errs[3]);
    assert!(
        errs[5].contains("more than a task may ask for (365 days)"),
        "{}",
        errs[5]
    );
    // And the endpoint serves the next task.
    let ok = submission(&f("add"), json!([2]), json!({"b": 1}));
    assert_eq!(value(&h.run(ok).await), &json!(3));
    h.stop().await;
}

/// Issue 17: the outbox sweep rotates. A submitter that is away leaves many unacknowledged
/// results; sweeps that always began at the start of the outbox would send the same first 1,000
/// again and again, and never the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_sweeps_rotate_through_every_unacknowledged_result() {
    let mut h = start(config()).await;
    let subs: Vec<Submission> = (0..1500)
        .map(|i| submission(&f("add"), json!([i]), json!({"b": 1})))
        .collect();
    let ids: std::collections::HashSet<TaskId> = subs.iter().map(|s| s.id.clone()).collect();
    for chunk in subs.chunks(500) {
        let accepted = h
            .endpoint
            .submit("away", "inst-b", chunk.to_vec())
            .await
            .unwrap();
        assert!(accepted.iter().all(Result::is_ok));
    }
    let mut finished = 0;
    while finished < ids.len() {
        let rec = tokio::time::timeout(Duration::from_secs(60), h.results.recv())
            .await
            .expect("all finish")
            .unwrap();
        if ids.contains(&rec.id) {
            finished += 1;
        }
    }
    let mut seen: std::collections::HashSet<TaskId> = Default::default();
    for _ in 0..2 {
        let swept = h.endpoint.unacknowledged(Default::default()).await.unwrap();
        assert_eq!(swept.len(), 1000, "a sweep sends at most 1,000");
        seen.extend(swept.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, ids, "two sweeps cover all 1,500");
    h.stop().await;
}

/// Issue 17: one institution may hold at most half of an endpoint's capacity, in tasks and in
/// bytes, so that another always finds room; beyond it, its submitters are asked to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_institution_cannot_take_an_endpoints_whole_queue() {
    let h = start(EndpointConfig {
        max_queued: 4,
        max_queued_bytes: 1 << 20,
        ..one_worker()
    })
    .await;
    let slow: Vec<Submission> = (0..2)
        .map(|_| submission(&f("sleep"), json!([5]), json!({})))
        .collect();
    assert!(h.endpoint.pushback("inst-a", 2, 100).is_none());
    let accepted = h.endpoint.submit("a1", "inst-a", slow).await.unwrap();
    assert!(accepted.iter().all(Result::is_ok));
    let ep = h.endpoint.clone();
    until("the endpoint's load to count inst-a's tasks", || {
        let ep = ep.clone();
        async move {
            ep.current_load()
                .held_by
                .get("inst-a")
                .is_some_and(|h| h.0 == 2)
        }
    })
    .await;
    let refused = h
        .endpoint
        .pushback("inst-a", 1, 100)
        .expect("over inst-a's share");
    assert!(
        refused.contains("institution inst-a") && refused.contains("half"),
        "{refused}"
    );
    assert!(
        h.endpoint.pushback("inst-b", 2, 100).is_none(),
        "inst-b still has room"
    );
    // Bytes count too: half of 1 MiB.
    assert!(
        h.endpoint.pushback("inst-b", 1, 600 << 10).is_none(),
        "an empty tenant takes one batch"
    );
    let big = h
        .endpoint
        .pushback("inst-a", 0, 600 << 10)
        .expect("over inst-a's byte share");
    assert!(big.contains("bytes"), "{big}");
    h.stop().await;
}

/// Issue 17: an endpoint collects the functions it stored once no stored task names them
/// (at its first sweep after a start, then every ten minutes), and keeps those that are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_functions_no_task_names_are_collected() {
    let cfg = one_worker();
    let mut h = start(cfg.clone()).await;
    let gone = python("gone", "def gone():\n    return 1\n");
    let kept = f("sleep");
    let done = submission(&gone, json!([]), json!({}));
    let done_id = done.id.clone();
    assert_eq!(value(&h.run(done).await), &json!(1));
    h.acknowledge_until_gone(&[done_id]).await;
    // A task that is still running names its function.
    let running = submission(&kept, json!([30]), json!({}));
    let rid = running.id.clone();
    h.endpoint
        .submit("peer", "inst-a", vec![running])
        .await
        .unwrap();
    h.until_running(&rid).await;
    let stored = |store: &store::Store, id: &str| {
        store
            .scan(store::cf::FUNCTIONS)
            .unwrap()
            .iter()
            .any(|(k, _)| k.ends_with(id.as_bytes()))
    };
    assert!(stored(&h.store, &gone.content_id()));
    let (dir, store) = h.stop().await;
    drop(store);
    let h = start_in(dir, cfg).await;
    let store = h.store.clone();
    let (gone_id, kept_id) = (gone.content_id(), kept.content_id());
    until("the first sweep to collect the unnamed function", || {
        let (store, gone_id) = (store.clone(), gone_id.clone());
        async move { !stored(&store, &gone_id) }
    })
    .await;
    assert!(
        stored(&store, &kept_id),
        "the stopped task's function is still named: {:?} {:?}",
        store
            .scan(store::cf::FUNCTIONS)
            .unwrap()
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>(),
        store
            .scan(store::cf::TASKS)
            .unwrap()
            .iter()
            .map(|(k, v)| (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(&v[..v.len().min(200)]).into_owned()
            ))
            .collect::<Vec<_>>()
    );
    h.stop().await;
}

/// Issue 17's third attack, end to end through real workers: institution A's task leaves a hook
/// in its worker's interpreter (here, a patched builtin that would see every later task's
/// arguments); institution B's task never runs in that worker, while A's next task does (warm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_institutions_task_never_runs_in_a_worker_with_hooks_left_by_this_one() {
    let h = start(config()).await;
    let plant = python(
        "plant",
        "def plant():\n    import builtins, os\n    builtins.funcmesh_hook = os.getpid()\n    return os.getpid()\n",
    );
    let look = python(
        "look",
        "def look():\n    import builtins, os\n    return [os.getpid(), getattr(builtins, 'funcmesh_hook', None)]\n",
    );
    let mut results = h.results;
    let mut run_as = async |tenant: &str, f: &FunctionRecord| -> Value {
        let sub = submission(f, json!([]), json!({}));
        let id = sub.id.clone();
        let accepted = h.endpoint.submit("peer", tenant, vec![sub]).await.unwrap();
        assert!(accepted[0].is_ok(), "{accepted:?}");
        let rec = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let rec = results.recv().await.unwrap();
                if rec.id == id {
                    return rec;
                }
            }
        })
        .await
        .unwrap();
        value(&rec).clone()
    };
    let a_pid = run_as("inst-a", &plant).await;
    let b = run_as("inst-b", &look).await;
    assert_ne!(b[0], a_pid, "inst-b ran in inst-a's worker");
    assert_eq!(b[1], Value::Null, "inst-b saw inst-a's hook");
    let a = run_as("inst-a", &look).await;
    assert_eq!(
        a,
        json!([a_pid, a_pid]),
        "inst-a's own warm worker, hook and all"
    );
    h.cancel.cancel();
    h.tracker.close();
    h.tracker.wait().await;
}

/// Workers serve one institution by default; an operator may narrow that to one submitting
/// node (`workers_per = "node"`). A coordinator, which has no institution, is its own tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_one_institution_or_one_node() {
    let h = start(config()).await;
    assert_eq!(h.endpoint.tenant_of(Some("inst-a"), "p1"), "inst-a");
    assert_eq!(h.endpoint.tenant_of(None, "p1"), "peer:p1");
    h.stop().await;
    let h = start(EndpointConfig {
        workers_per: compute::config::WorkersPer::Node,
        ..config()
    })
    .await;
    assert_eq!(h.endpoint.tenant_of(Some("inst-a"), "p1"), "peer:p1");
    h.stop().await;
}

/// Issue 17: an endpoint runs only the container images its operator accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_the_operator_did_not_accept_is_refused() {
    let h = start(EndpointConfig {
        runtimes: vec!["host".into(), "docker".into()],
        ..config()
    })
    .await;
    let mut evil = f("add");
    evil.container = Some(Container {
        runtime: "docker".into(),
        image: "someone/miner:latest".into(),
    });
    let answers = h
        .endpoint
        .submit(
            "peer",
            "inst-b",
            vec![submission(&evil, json!([1]), json!({}))],
        )
        .await
        .unwrap();
    let err = answers[0].as_ref().unwrap_err();
    assert!(
        err.contains("does not run image `someone/miner:latest`") && err.contains("funcmesh/*"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_dropped_once_past_their_retention() {
    let mut cfg = config();
    cfg.retention = Duration::from_secs(1);
    let mut h = start(cfg.clone()).await;
    let task = submission(&f("add"), json!([2]), json!({"b": 1}));
    let id = task.id.clone();
    assert_eq!(value(&h.run(task).await), &json!(3));
    // An id of an older version is random: this one sorts after every horizon.
    let mut old = submission(&f("add"), json!([1]), json!({"b": 1}));
    old.id = "ffffffffffff00000000000000000000".parse().unwrap();
    let old_id = old.id.clone();
    assert_eq!(value(&h.run(old).await), &json!(2));
    let kept = |h: &Harness, id: &TaskId| {
        let (ep, id) = (h.endpoint.clone(), id.clone());
        async move { ep.records(vec![id]).await.unwrap()[0].is_some() }
    };
    assert!(kept(&h, &id).await, "kept while within its retention");
    // The sweeps read the tasks made before their horizon: this one goes a second after it
    // finished...
    until("the finished task to be dropped", || {
        let k = kept(&h, &id);
        async move { !k.await }
    })
    .await;
    // ...while the old id waits for a sweep that reads every record: the first after a start.
    assert!(kept(&h, &old_id).await);
    let (dir, store) = h.stop().await;
    drop(store);
    let h = start_in(dir, cfg).await;
    until("the task with an old id to be dropped", || {
        let k = kept(&h, &old_id);
        async move { !k.await }
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_tasks_survive_a_restart_and_duplicates_run_once() {
    let mut cfg = config();
    cfg.max_workers = 1;
    cfg.strategy = Strategy::Warm;
    let h = start(cfg.clone()).await;
    // One long task occupies the only worker; the second waits in the queue.
    let running = submission(&f("sleep"), json!([30]), json!({}));
    let queued = submission(&f("add"), json!([41]), json!({}));
    let (rid, qid) = (running.id.clone(), queued.id.clone());
    h.endpoint
        .submit("peer", "inst-a", vec![running])
        .await
        .unwrap();
    h.until_running(&rid).await;
    h.endpoint
        .submit("peer", "inst-a", vec![queued.clone()])
        .await
        .unwrap();
    let (dir, store) = h.stop().await;
    drop(store);
    let mut h = start_in(dir, cfg).await;
    let q = h.wait(&qid).await;
    assert_eq!(
        value(&q),
        &json!(42),
        "the queued task ran after the restart"
    );
    let r = h.endpoint.records(vec![rid.clone()]).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(error(&r).kind, FailureKind::EndpointLost, "{r:?}");
    // Submitting the finished task again returns its record and does not run it again.
    let again = h
        .endpoint
        .submit("peer", "inst-a", vec![queued.clone()])
        .await
        .unwrap();
    assert_eq!(again[0].as_ref().unwrap().status, Status::Succeeded);
    // Another submitter presenting the same id gets neither the record nor a new run.
    let other = h
        .endpoint
        .submit("someone-else", "inst-b", vec![queued])
        .await
        .unwrap();
    assert!(
        other[0]
            .as_ref()
            .unwrap_err()
            .contains("already used by another submitter"),
        "{other:?}"
    );
    let unacked = h.endpoint.unacknowledged(Default::default()).await.unwrap();
    assert!(unacked.iter().any(|r| r.id == qid));
    // Results already on their way are left out.
    let except = std::collections::HashSet::from([qid.clone()]);
    let unacked = h.endpoint.unacknowledged(except).await.unwrap();
    assert!(!unacked.iter().any(|r| r.id == qid), "{unacked:?}");
    assert!(unacked.iter().any(|r| r.id == rid), "{unacked:?}");
    h.acknowledge_until_gone(&[qid.clone(), rid.clone()]).await;
    h.stop().await;
}

/// A function's source can be large, and an endpoint may hold many of its tasks: the store
/// keeps the function once, by id, and each task names it; tasks queued across a restart get
/// their function back from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_is_stored_once_and_its_queued_tasks_find_it_after_a_restart() {
    let mut cfg = config();
    cfg.max_workers = 1;
    cfg.strategy = Strategy::Warm;
    let h = start(cfg.clone()).await;
    let filler = format!("# {}\n", "x".repeat(20_000));
    let big = python("inc", &format!("{filler}def inc(x):\n    return x + 1\n"));
    // One long task occupies the only worker; the others wait in the queue.
    let running = submission(&f("sleep"), json!([30]), json!({}));
    let rid = running.id.clone();
    h.endpoint
        .submit("peer", "inst-a", vec![running])
        .await
        .unwrap();
    h.until_running(&rid).await;
    let queued: Vec<Submission> = (0..20)
        .map(|i| submission(&big, json!([i]), json!({})))
        .collect();
    let ids: Vec<TaskId> = queued.iter().map(|s| s.id.clone()).collect();
    for a in h.endpoint.submit("peer", "inst-a", queued).await.unwrap() {
        a.unwrap();
    }
    let (dir, store) = h.stop().await;
    let functions = store.scan(store::cf::FUNCTIONS).unwrap();
    let big_id = big.content_id();
    assert_eq!(
        functions
            .iter()
            .filter(|(k, _)| k.ends_with(big_id.as_bytes()))
            .count(),
        1,
        "the function is stored once"
    );
    let tasks = store.scan(store::cf::TASKS).unwrap();
    let largest = tasks.iter().map(|(_, v)| v.len()).max().unwrap();
    assert!(
        largest < 2_000,
        "a stored task holds no function source ({largest} bytes)"
    );
    drop(store);
    let mut h = start_in(dir, cfg).await;
    // They run in the order the store lists them, which need not be the order sent.
    let mut got = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while got.len() < ids.len() {
            let rec = h.results.recv().await.expect("endpoint running");
            if ids.contains(&rec.id) {
                got.insert(rec.id.clone(), rec);
            }
        }
    })
    .await
    .expect("the queued tasks finish after the restart");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            value(&got[id]),
            &json!(i + 1),
            "task {i} ran after the restart"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickled_function_and_arguments_run_when_cloudpickle_is_there() {
    // What the Python SDK sends: cloudpickle of the function, and of (args, kwargs).
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import base64, cloudpickle\n\
             k = 3\n\
             print(base64.b64encode(cloudpickle.dumps(lambda x, y=0: {'sum': x + y + k})).decode())\n\
             print(base64.b64encode(cloudpickle.dumps(((4,), {'y': 5}))).decode())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let (payload, args) = (lines.next().unwrap(), lines.next().unwrap());
    let f = FunctionRecord {
        name: "lambda".into(),
        owner: owner(),
        kind: FunctionKind::Python,
        spec: FunctionSpec::PythonPayload {
            payload: payload.into(),
        },
        container: None,
        description: String::new(),
        created_ms: 0,
    };
    let mut h = start(config()).await;
    let mut sub = submission(&f, json!(args), json!({}));
    sub.encoding = Encoding::Pickle;
    let rec = h.run(sub).await;
    let pickled = value(&rec)["pickle"].as_str().unwrap().to_owned();
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("import base64, pickle; print(pickle.loads(base64.b64decode('{pickled}')))"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "{'sum': 12}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_the_earlier_layout_keeps_its_outbox_and_queue_after_an_upgrade() {
    // Before: `s/` held a bare submission until the task finished, every phase had an `r/`
    // record, and `o/` marked results not yet acknowledged.
    let dir = tempfile::tempdir().unwrap();
    let finished = submission(&f("add"), json!([1]), json!({}));
    let queued = submission(&f("add"), json!([9]), json!({}));
    let record = |id: &compute::TaskId, status: Status, outcome: Option<Outcome>| Record {
        v: compute::task::RECORD_VERSION,
        id: id.clone(),
        endpoint: "ep".into(),
        submitter: "peer".into(),
        function_id: f("add").content_id(),
        status,
        // Recent: the retention sweep (which runs at start) keeps it.
        times: compute::task::Times {
            submitted_us: compute::task::now_us(),
            received_us: compute::task::now_us(),
            finished_us: compute::task::now_us(),
            ..Default::default()
        },
        worker: None,
        environment: "host".into(),
        cold_start: false,
        outcome,
    };
    {
        let store = store::Store::open(&dir.path().join("db")).unwrap();
        let done = record(
            &finished.id,
            Status::Succeeded,
            Some(Outcome::succeeded(json!(2))),
        );
        let put = |k: String, v: Vec<u8>| (store::cf::TASKS, k.into_bytes(), Some(v));
        store
            .batch(&[
                put(
                    format!("r/ep/{}", finished.id),
                    serde_json::to_vec(&done).unwrap(),
                ),
                put(format!("o/ep/{}", finished.id), Vec::new()),
                put(
                    format!("r/ep/{}", queued.id),
                    serde_json::to_vec(&record(&queued.id, Status::Queued, None)).unwrap(),
                ),
                put(
                    format!("s/ep/{}", queued.id),
                    serde_json::to_vec(&queued).unwrap(),
                ),
            ])
            .unwrap();
    }
    let mut h = start_in(dir, config()).await;
    let q = h.wait(&queued.id).await;
    assert_eq!(
        value(&q),
        &json!(10),
        "the queued task ran after the upgrade"
    );
    assert_eq!(q.submitter, "peer");
    let unacked = h.endpoint.unacknowledged(Default::default()).await.unwrap();
    let ids: Vec<&compute::TaskId> = unacked.iter().map(|r| &r.id).collect();
    assert!(ids.contains(&&finished.id), "{ids:?}");
    assert!(ids.contains(&&queued.id), "{ids:?}");
    h.acknowledge_until_gone(&[finished.id.clone(), queued.id.clone()])
        .await;
    let (_dir, store) = h.stop().await;
    assert!(
        store.scan_keys(store::cf::TASKS, b"o/").unwrap().is_empty(),
        "the old outbox marks are gone"
    );
}

/// Blobs in memory, named by SHA-256 (the node's are BLAKE3 on disk; the endpoint only passes
/// the names on): `held` is this node's, `elsewhere` what fetching from another member finds.
#[derive(Default)]
struct MemBlobs {
    held: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    elsewhere: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

fn name_of(bytes: &[u8]) -> compute::ValueRef {
    use sha2::Digest as _;
    compute::ValueRef {
        blake3: hex::encode(sha2::Sha256::digest(bytes)),
        size: bytes.len() as u64,
    }
}

struct MemSpool(Vec<u8>, std::sync::Arc<MemBlobs>);

impl compute::blobs::Spool for MemSpool {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
    fn finish(
        self: Box<Self>,
    ) -> futures::future::BoxFuture<'static, Result<compute::ValueRef, String>> {
        let r = name_of(&self.0);
        self.1.held.lock().unwrap().insert(r.blake3.clone(), self.0);
        Box::pin(async move { Ok(r) })
    }
}

struct Shared(std::sync::Arc<MemBlobs>);

impl compute::blobs::Blobs for Shared {
    fn put(
        &self,
        bytes: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<compute::ValueRef, String>> {
        let r = name_of(&bytes);
        self.0.held.lock().unwrap().insert(r.blake3.clone(), bytes);
        Box::pin(async move { Ok(r) })
    }
    fn holds(&self, value: &compute::ValueRef) -> bool {
        self.0.held.lock().unwrap().contains_key(&value.blake3)
    }
    fn fetch(
        &self,
        value: &compute::ValueRef,
        _from: mesh::PeerId,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let found = self.holds(value) || {
            let there = self.0.elsewhere.lock().unwrap().get(&value.blake3).cloned();
            there.is_some_and(|b| {
                self.0.held.lock().unwrap().insert(value.blake3.clone(), b);
                true
            })
        };
        Box::pin(async move {
            if found {
                Ok(())
            } else {
                Err("no member holds it".into())
            }
        })
    }
    fn read(
        &self,
        value: &compute::ValueRef,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> {
        let b = self.0.held.lock().unwrap().get(&value.blake3).cloned();
        Box::pin(async move { b.ok_or_else(|| "not held".to_string()) })
    }
    fn reader(&self, value: &compute::ValueRef) -> Result<Box<dyn std::io::Read + Send>, String> {
        let b = self.0.held.lock().unwrap().get(&value.blake3).cloned();
        b.map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn std::io::Read + Send>)
            .ok_or_else(|| "not held".to_string())
    }
    fn spool(&self) -> Result<Box<dyn compute::blobs::Spool>, String> {
        Ok(Box::new(MemSpool(Vec::new(), self.0.clone())))
    }
    fn release(&self, value: &compute::ValueRef) {
        self.0.held.lock().unwrap().remove(&value.blake3);
    }
    fn node(&self) -> String {
        "the-endpoints-node".into()
    }
}

/// Values over 1 MiB go by reference, into `blobs`.
fn mem_values(blobs: &std::sync::Arc<MemBlobs>) -> compute::blobs::Values {
    compute::blobs::Values {
        blobs: std::sync::Arc::new(Shared(blobs.clone())),
        inline_limit: 1 << 20,
    }
}

fn by_reference(f: &FunctionRecord, r: compute::ValueRef) -> Submission {
    Submission {
        args_ref: Some(r),
        ..submission(f, Value::Null, Value::Null)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_arguments_and_results_go_by_reference_and_a_missing_input_fails_the_task() {
    let blobs = std::sync::Arc::new(MemBlobs::default());
    let values = mem_values(&blobs);
    let config = EndpointConfig {
        result_limit: 64 << 20,
        ..config()
    };
    // The submitter's peer id: where the endpoint fetches arguments from.
    let submitter = libp2p_identity_peer();
    let mut h = start_with(tempfile::tempdir().unwrap(), config, Some(values)).await;
    let endpoint = h.endpoint.clone();
    let run = |sub: Submission| {
        let ep = endpoint.clone();
        let submitter = submitter.clone();
        async move {
            let id = sub.id.clone();
            let a = ep.submit(&submitter, "inst-a", vec![sub]).await.unwrap();
            assert!(a[0].is_ok(), "{a:?}");
            id
        }
    };

    // 3 MiB of arguments, held by the submitter: fetched, then run.
    let input =
        serde_json::to_vec(&json!({"args": ["x".repeat(3 << 20)], "kwargs": {"extra": "yz"}}))
            .unwrap();
    let r = name_of(&input);
    blobs
        .elsewhere
        .lock()
        .unwrap()
        .insert(r.blake3.clone(), input);
    let id = run(by_reference(&f("length"), r)).await;
    let rec = h.wait(&id).await;
    assert_eq!(value(&rec), &json!((3 << 20) + 2));

    // A 3 MiB result: spilled by the worker into a blob, the outcome holds its reference.
    let id = run(submission(&f("big"), json!([3 << 20]), json!({}))).await;
    let rec = h.wait(&id).await;
    let Some(Outcome::Succeeded {
        value: inline,
        value_ref: Some(r),
    }) = &rec.outcome
    else {
        panic!("expected a value by reference: {:?}", rec.outcome);
    };
    assert!(inline.is_null());
    assert_eq!(r.size, (3 << 20) + 2, "the JSON string, quotes included");
    let held = blobs.held.lock().unwrap().get(&r.blake3).cloned().unwrap();
    assert_eq!(name_of(&held), *r);
    assert_eq!(
        serde_json::from_slice::<Value>(&held).unwrap(),
        json!("x".repeat(3 << 20))
    );

    // A small result still goes inline.
    let id = run(submission(&f("big"), json!([10]), json!({}))).await;
    let rec = h.wait(&id).await;
    assert_eq!(rec.outcome.as_ref().unwrap().value_ref(), None);
    assert_eq!(value(&rec), &json!("xxxxxxxxxx"));

    // Arguments no member holds: the task fails, and says why.
    let id = run(by_reference(
        &f("length"),
        name_of(b"{\"args\": [\"gone\"]}"),
    ))
    .await;
    let rec = h.wait(&id).await;
    let e = error(&rec);
    assert_eq!(e.kind, FailureKind::InputUnavailable, "{e:?}");
    assert!(
        e.message.contains("could not be fetched") && e.message.contains("no member holds it"),
        "{}",
        e.message
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_gets_and_puts_blobs_itself() {
    let blobs = std::sync::Arc::new(MemBlobs::default());
    let values = mem_values(&blobs);
    // Blobs up to 64 MiB.
    let config = EndpointConfig {
        result_limit: 64 << 20,
        ..config()
    };
    let mut h = start_with(tempfile::tempdir().unwrap(), config, Some(values)).await;
    let submitter = libp2p_identity_peer();
    // A blob only the submitter holds: the function fetches it, and stores a new one.
    let r = name_of(b"hello, blobs");
    blobs
        .elsewhere
        .lock()
        .unwrap()
        .insert(r.blake3.clone(), b"hello, blobs".to_vec());
    let sub = submission(&f("shout"), json!([r]), json!({}));
    let id = sub.id.clone();
    let a = h
        .endpoint
        .submit(&submitter, "inst-a", vec![sub])
        .await
        .unwrap();
    assert!(a[0].is_ok(), "{a:?}");
    let rec = h.wait(&id).await;
    let out = value(&rec).clone();
    let want = name_of(b"HELLO, BLOBS");
    assert_eq!(out["blake3"], want.blake3.as_str(), "{out}");
    assert_eq!(out["size"], 12);
    assert_eq!(out["node"], "the-endpoints-node");
    assert_eq!(blobs.held.lock().unwrap()[&want.blake3], b"HELLO, BLOBS");

    // A larger blob comes down the pipe in pieces, all of it.
    let big: Vec<u8> = (0..(3u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
    let r = name_of(&big);
    blobs
        .elsewhere
        .lock()
        .unwrap()
        .insert(r.blake3.clone(), big);
    let sub = submission(&f("got_size"), json!([r]), json!({}));
    let id = sub.id.clone();
    h.endpoint
        .submit(&submitter, "inst-a", vec![sub])
        .await
        .unwrap();
    assert_eq!(value(&h.wait(&id).await), &json!((3 << 20) + 5));

    // A blob over the endpoint's result_limit is refused before anything is fetched.
    let huge = json!({"blake3": "a".repeat(64), "size": 1u64 << 40});
    let sub = submission(&f("got_size"), json!([huge]), json!({}));
    let id = sub.id.clone();
    h.endpoint
        .submit(&submitter, "inst-a", vec![sub])
        .await
        .unwrap();
    let rec = h.wait(&id).await;
    assert!(
        error(&rec).message.contains("at most 67108864"),
        "{:?}",
        rec.outcome
    );

    // A blob no one holds: the function's `get` raises, with the reason.
    let sub = submission(&f("shout"), json!([name_of(b"nowhere")]), json!({}));
    let id = sub.id.clone();
    h.endpoint
        .submit(&submitter, "inst-a", vec![sub])
        .await
        .unwrap();
    let rec = h.wait(&id).await;
    let e = error(&rec);
    assert_eq!(e.type_name, "RuntimeError", "{e:?}");
    assert!(
        e.message.contains("could not be fetched") && e.message.contains("no member holds it"),
        "{}",
        e.message
    );
    h.stop().await;
}

/// Large arguments going in while large results come out of one worker: neither pipe waits
/// on the other (writing a worker's input while it writes its output once blocked both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_in_and_out_of_one_worker_at_once_all_arrive() {
    let blobs = std::sync::Arc::new(MemBlobs::default());
    let values = mem_values(&blobs);
    let config = EndpointConfig {
        max_workers: 1,
        result_limit: 64 << 20,
        ..config()
    };
    let mut h = start_with(tempfile::tempdir().unwrap(), config, Some(values)).await;
    let submitter = libp2p_identity_peer();
    let mut subs = Vec::new();
    for i in 0..8 {
        let text = format!("{i}{}", "z".repeat(3 << 20));
        let input = serde_json::to_vec(&json!({"args": [text]})).unwrap();
        let r = name_of(&input);
        blobs
            .elsewhere
            .lock()
            .unwrap()
            .insert(r.blake3.clone(), input);
        subs.push(by_reference(&f("same"), r));
    }
    let ids: Vec<TaskId> = subs.iter().map(|s| s.id.clone()).collect();
    let a = h.endpoint.submit(&submitter, "inst-a", subs).await.unwrap();
    assert!(a.iter().all(Result::is_ok), "{a:?}");
    let mut done = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while done.len() < ids.len() {
            let rec = h.results.recv().await.expect("endpoint running");
            done.insert(rec.id.clone(), rec);
        }
    })
    .await
    .expect("every task finishes within 60 s");
    for (i, id) in ids.iter().enumerate() {
        let rec = &done[id];
        let r = rec.outcome.as_ref().and_then(|o| o.value_ref()).cloned();
        let r = r.unwrap_or_else(|| panic!("task {i}: {:?}", rec.outcome));
        let held = blobs.held.lock().unwrap()[&r.blake3].clone();
        let v: Value = serde_json::from_slice(&held).unwrap();
        assert!(v.as_str().unwrap().starts_with(&i.to_string()));
        assert_eq!(r.size, (3 << 20) + 3);
    }
    h.stop().await;
}

fn libp2p_identity_peer() -> String {
    mesh::PeerId::random().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_blobs_refuses_arguments_by_reference() {
    let h = start(config()).await;
    let sub = by_reference(&f("length"), name_of(b"{}"));
    let a = h
        .endpoint
        .submit("peer", "inst-a", vec![sub])
        .await
        .unwrap();
    let e = a[0].as_ref().unwrap_err();
    assert!(e.contains("by reference"), "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_by_reference_past_what_an_endpoint_holds_in_memory_are_refused() {
    let values = mem_values(&std::sync::Arc::new(MemBlobs::default()));
    let config = EndpointConfig {
        result_limit: 1 << 30,
        ..config()
    };
    let h = start_with(tempfile::tempdir().unwrap(), config, Some(values)).await;
    let mut r = name_of(b"{}");
    r.size = compute::blobs::MAX_ARGUMENTS_BY_REFERENCE + 1;
    let a = h
        .endpoint
        .submit("peer", "inst-a", vec![by_reference(&f("length"), r)])
        .await
        .unwrap();
    let e = a[0].as_ref().unwrap_err();
    assert!(
        e.contains("at most 268435456") && e.contains("funcmesh_blobs.get"),
        "{e}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_workers_answer_every_task_with_null_after_their_time_without_a_process() {
    let mut h = start(EndpointConfig {
        max_workers: 4,
        simulate_ms: Some(20),
        // A python that does not exist: no process may be started.
        python: "/nonexistent/python".into(),
        ..config()
    })
    .await;
    let subs: Vec<Submission> = (0..40)
        .map(|i| submission(&f("add"), json!([i]), json!({})))
        .collect();
    let ids: Vec<TaskId> = subs.iter().map(|s| s.id.clone()).collect();
    let started = std::time::Instant::now();
    let accepted = h.endpoint.submit("peer", "inst-a", subs).await.unwrap();
    assert!(accepted.iter().all(Result::is_ok), "{accepted:?}");
    for rec in h.wait_all(&ids).await {
        assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
        assert_eq!(value(&rec), &json!(null));
    }
    // 40 tasks of 20 ms on at most 4 workers: at least 200 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;
}

/// Issue 22: the outbox is kept in memory, read by key, up to `outbox_in_memory` entries; past
/// it, sweeps read the store, and the results are the same either way: every unacknowledged
/// one, none acknowledged, across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_past_its_memory_bound_is_read_from_the_store_with_the_same_results() {
    let cfg = EndpointConfig {
        max_workers: 4,
        simulate_ms: Some(0),
        python: "/nonexistent/python".into(),
        outbox_in_memory: 10,
        ..config()
    };
    let mut h = start(cfg.clone()).await;
    let subs: Vec<Submission> = (0..30)
        .map(|i| submission(&f("add"), json!([i]), json!({})))
        .collect();
    let ids: Vec<TaskId> = subs.iter().map(|s| s.id.clone()).collect();
    let accepted = h.endpoint.submit("away", "inst-b", subs).await.unwrap();
    assert!(accepted.iter().all(Result::is_ok), "{accepted:?}");
    h.wait_all(&ids).await;
    let swept = |h: &Harness| {
        let ep = h.endpoint.clone();
        async move {
            ep.unacknowledged(Default::default())
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<std::collections::HashSet<_>>()
        }
    };
    let all: std::collections::HashSet<TaskId> = ids.iter().cloned().collect();
    assert_eq!(
        swept(&h).await,
        all,
        "30 > 10: every result, from the store"
    );
    // Acknowledge all but five: the sweep offers those five, and again once back in memory.
    let (acked, kept) = ids.split_at(25);
    h.endpoint.acknowledge(acked.to_vec()).await.unwrap();
    let kept: std::collections::HashSet<TaskId> = kept.iter().cloned().collect();
    let (ep, want) = (h.endpoint.clone(), kept.clone());
    until("the sweep to offer only the unacknowledged five", || {
        let (ep, want) = (ep.clone(), want.clone());
        async move {
            let got: std::collections::HashSet<TaskId> = ep
                .unacknowledged(Default::default())
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            got == want
        }
    })
    .await;
    assert_eq!(swept(&h).await, kept);
    // Finishing more past the bound again, and a restart, lose nothing.
    let more: Vec<Submission> = (0..12)
        .map(|i| submission(&f("add"), json!([i]), json!({})))
        .collect();
    let more_ids: Vec<TaskId> = more.iter().map(|s| s.id.clone()).collect();
    let accepted = h.endpoint.submit("away", "inst-b", more).await.unwrap();
    assert!(accepted.iter().all(Result::is_ok), "{accepted:?}");
    h.wait_all(&more_ids).await;
    let mut expected = kept.clone();
    expected.extend(more_ids.iter().cloned());
    assert_eq!(swept(&h).await, expected, "17 > 10: from the store");
    let (dir, store) = h.stop().await;
    drop(store);
    let h = start_in(dir, cfg.clone()).await;
    assert_eq!(swept(&h).await, expected, "after a restart");
    h.acknowledge_until_gone(&expected.iter().cloned().collect::<Vec<_>>())
        .await;
    h.stop().await;
}
