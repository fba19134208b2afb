//! One worker process and the task that talks to it: spawns the command, reads frames from its
//! stdout, writes frames to its stdin, keeps the tail of its stderr for error messages, and
//! reports to the endpoint's driver. Containers are stopped by name, since killing the
//! `docker run` client would leave the container running.

use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::environment::{Environment, Runtime};
use crate::pool::WorkerId;
use crate::protocol::{self, FromWorker, WorkerResult};

/// What a worker task reports to the driver.
#[derive(Debug)]
pub(crate) enum Report {
    Ready(WorkerId),
    Results(WorkerId, Vec<WorkerResult>),
    Exited(WorkerId, String),
    /// A running function asks for a blob.
    Get(WorkerId, String, crate::task::ValueRef, Option<String>),
    /// A task's arguments, fetched by reference (or why they could not be).
    Inputs(
        crate::task::TaskId,
        Result<Box<crate::blobs::Arguments>, String>,
    ),
}

/// How to start one worker.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) id: WorkerId,
    pub(crate) env: Environment,
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    pub(crate) container: Option<String>,
    pub(crate) cwd: std::path::PathBuf,
    /// Run as this uid (and gid), with a cleared environment, in `cwd` (the worker's own scratch
    /// directory, removed when it exits).
    pub(crate) run_as: Option<u32>,
    pub(crate) frame_limit: usize,
    /// Where spilled results go (`None`: the worker is never told to spill).
    pub(crate) values: Option<crate::blobs::Values>,
    /// The largest result the worker may spill.
    pub(crate) spill_limit: u64,
    pub(crate) kill: tokio_util::sync::CancellationToken,
}

const STDERR_TAIL: usize = 2048;

/// Runs one worker until it exits or is killed; always ends with `Report::Exited`.
pub(crate) async fn run(
    launch: Launch,
    orders: mpsc::Receiver<Vec<u8>>,
    answers: (mpsc::Sender<Answer>, mpsc::Receiver<Answer>),
    reports: mpsc::Sender<Report>,
) {
    let id = launch.id;
    let reason = drive(&launch, orders, answers, &reports).await;
    if let Some(name) = &launch.container {
        stop_container(launch.env.runtime, name).await;
    }
    if launch.run_as.is_some() {
        let scratch = launch.cwd.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(scratch)).await;
    }
    let _ = reports.send(Report::Exited(id, reason)).await;
}

async fn drive(
    launch: &Launch,
    orders: mpsc::Receiver<Vec<u8>>,
    (to_stdin, answers_rx): (mpsc::Sender<Answer>, mpsc::Receiver<Answer>),
    reports: &mpsc::Sender<Report>,
) -> String {
    let id = launch.id;
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .current_dir(&launch.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let host = launch.container.is_none();
    if host {
        new_session(&mut command);
    }
    if let Some(uid) = launch.run_as {
        // Nothing of the node's environment (tokens, paths to its data) reaches the task.
        command
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &launch.cwd)
            .env("TMPDIR", &launch.cwd)
            .env("LANG", "C.UTF-8")
            .uid(uid)
            .gid(uid);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return format!("cannot run `{}`: {e}", launch.program),
    };
    let pid = child.id();
    let stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tail_tx, mut tail_rx) = tokio::sync::watch::channel(String::new());
    // Everything the worker writes to stderr (the functions' own output included) is drained
    // as bytes, whatever they are: a line that never ends, or is not UTF-8, must neither grow
    // without bound here nor stop the draining (the worker would block on a full pipe).
    let stderr_task = tokio::spawn(async move {
        let mut stderr = stderr;
        let mut chunk = vec![0u8; 8 << 10];
        let mut tail: Vec<u8> = Vec::new();
        while let Ok(n) = stderr.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&chunk[..n]);
            tracing::debug!(worker = id, "{}", text.trim_end());
            tail.extend_from_slice(&chunk[..n]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
            let _ = tail_tx.send(String::from_utf8_lossy(&tail).into_owned());
        }
    });
    // Orders go to the worker from a task of their own, so that reading its output never waits
    // on writing its input: a worker writing a large result while the endpoint writes it large
    // arguments would otherwise block both on full pipes.
    let mut writer = tokio::spawn(write_orders(stdin, orders, answers_rx));
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 256 << 10];
    let mut hello = false;
    // Raw bytes being received: for a spilled result (`Some`) or a function's `put` (`None`),
    // the bytes still to come, and where they go.
    let mut spill: Option<(Option<WorkerResult>, u64, Box<dyn crate::blobs::Spool>)> = None;
    // Answers to `put`s, written to the worker once its output is read.
    let mut answers: Vec<Vec<u8>> = Vec::new();
    let reason = loop {
        tokio::select! {
            read = stdout.read(&mut chunk) => {
                match read {
                    Ok(0) | Err(_) => break String::new(),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let mut results = Vec::new();
                let mut used = 0;
                let failure = loop {
                    if let Some((_, left, sink)) = &mut spill {
                        let n = (*left).min((buf.len() - used) as u64) as usize;
                        if let Err(e) = sink.write(&buf[used..used + n]) {
                            break Some(format!("cannot store the worker's result: {e}"));
                        }
                        used += n;
                        *left -= n as u64;
                        if *left > 0 {
                            break None;
                        }
                        let (result, _, sink) = spill.take().expect("a spill is in progress");
                        let stored = sink.finish().await;
                        let Some(mut r) = result else {
                            let node = launch.values.as_ref().map(|v| v.blobs.node());
                            answers.push(match &stored {
                                Ok(value) => protocol::encode(&protocol::ToWorker::Blob {
                                    value: Some(value),
                                    node: node.as_deref(),
                                    size: None,
                                    error: None,
                                }),
                                Err(e) => protocol::blob_error(&format!("the endpoint could not store the file: {e}")),
                            });
                            continue;
                        };
                        match stored {
                            Ok(value) => r.value_ref = Some(value),
                            Err(e) => {
                                r.ok = false;
                                r.error = Some(protocol::WorkerError {
                                    type_name: "ResultNotStored".into(),
                                    message: format!(
                                        "the endpoint could not store the task's large result: {e}"
                                    ),
                                    traceback: None,
                                    value: None,
                                });
                            }
                        }
                        results.push(r);
                        continue;
                    }
                    match protocol::decode(&buf[used..], launch.frame_limit) {
                        Ok(None) => break None,
                        Ok(Some((msg, n))) => {
                            used += n;
                            match msg {
                                FromWorker::Hello { v, .. } if !hello => {
                                    if v != protocol::VERSION {
                                        break Some(format!(
                                            "the worker speaks protocol version {v}, this endpoint {}",
                                            protocol::VERSION
                                        ));
                                    }
                                    hello = true;
                                    if reports.send(Report::Ready(id)).await.is_err() {
                                        break Some("the endpoint stopped".into());
                                    }
                                }
                                FromWorker::Result(r) if hello && r.spill.is_some() => {
                                    let size = r.spill.unwrap_or(0);
                                    if size > launch.spill_limit {
                                        break Some(format!(
                                            "the worker spilled a result of {size} bytes, over the limit of {}",
                                            launch.spill_limit
                                        ));
                                    }
                                    let Some(values) = &launch.values else {
                                        break Some("the worker spilled a result, and this endpoint keeps no blobs".into());
                                    };
                                    match values.blobs.spool() {
                                        Ok(sink) => spill = Some((Some(r), size, sink)),
                                        Err(e) => break Some(format!("cannot store the worker's result: {e}")),
                                    }
                                }
                                FromWorker::Put { spill: size, .. } if hello => {
                                    // The bytes follow whatever the answer: they are taken in
                                    // (or dropped) before the pipe is read as frames again.
                                    if size > launch.spill_limit {
                                        break Some(format!(
                                            "a function stored a file of {size} bytes, over the limit of {}",
                                            launch.spill_limit
                                        ));
                                    }
                                    let Some(values) = &launch.values else {
                                        break Some("a function stored a file, and this endpoint keeps no blobs".into());
                                    };
                                    match values.blobs.spool() {
                                        Ok(sink) => spill = Some((None, size, sink)),
                                        Err(e) => break Some(format!("cannot store a function's file: {e}")),
                                    }
                                }
                                FromWorker::Get { id: task, value, from } if hello => {
                                    if reports.send(Report::Get(id, task, value, from)).await.is_err() {
                                        break Some("the endpoint stopped".into());
                                    }
                                }
                                FromWorker::Result(r) if hello => results.push(r),
                                other => {
                                    break Some(format!("the worker sent an unexpected {other:?}"));
                                }
                            }
                        }
                        Err(e) => break Some(e.to_string()),
                    }
                };
                buf.drain(..used);
                for answer in answers.drain(..) {
                    if to_stdin.send(Answer::Frame(answer)).await.is_err() {
                        break;
                    }
                }
                if !results.is_empty() && reports.send(Report::Results(id, results)).await.is_err() {
                    break "the endpoint stopped".into();
                }
                if let Some(f) = failure {
                    break f;
                }
            }
            ended = &mut writer => {
                break ended.unwrap_or_else(|e| format!("the worker's writer failed: {e}"));
            }
            () = launch.kill.cancelled() => break "stopped by the endpoint".into(),
        }
    };
    writer.abort();
    let _ = child.start_kill();
    let status = child.wait().await;
    if let (true, Some(pid)) = (host, pid) {
        // What the worker started (a shell command, a function's subprocess) dies with it.
        kill_session(pid);
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stderr_task).await;
    let _ = tail_rx.borrow_and_update();
    let tail = tail_rx.borrow().trim().to_owned();
    let status = match status {
        Ok(s) => describe(s),
        Err(e) => format!("unknown exit ({e})"),
    };
    let mut out = if reason.is_empty() {
        format!("the worker exited ({status})")
    } else {
        format!("{reason} ({status})")
    };
    if !tail.is_empty() {
        let last: Vec<&str> = tail.lines().rev().take(6).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        out.push_str(&format!("; its last output: {}", last.join(" | ")));
    }
    out
}

/// Writes the endpoint's orders and the answers to the worker's requests to its stdin, until
/// the endpoint stops sending orders; returns why it ended.
async fn write_orders(
    mut stdin: tokio::process::ChildStdin,
    mut orders: mpsc::Receiver<Vec<u8>>,
    mut answers: mpsc::Receiver<Answer>,
) -> String {
    let fail = |e: std::io::Error| format!("cannot write to the worker: {e}");
    loop {
        let answer = tokio::select! {
            order = orders.recv() => match order {
                Some(b) => Answer::Frame(b),
                None => return "stopped by the endpoint".into(),
            },
            Some(a) = answers.recv() => a,
        };
        match answer {
            Answer::Frame(bytes) => {
                if let Err(e) = stdin.write_all(&bytes).await {
                    return fail(e);
                }
            }
            // A frame and the raw bytes it announces, with nothing between them.
            Answer::Stream(head, mut pieces) => {
                if let Err(e) = stdin.write_all(&head).await {
                    return fail(e);
                }
                while let Some(piece) = pieces.recv().await {
                    if let Err(e) = stdin.write_all(&piece).await {
                        return fail(e);
                    }
                }
            }
        }
    }
}

/// What goes to a worker besides the endpoint's orders: an answer to one of its requests.
pub(crate) enum Answer {
    /// One whole frame.
    Frame(Vec<u8>),
    /// A frame, then the raw bytes it announces, as they come.
    Stream(Vec<u8>, mpsc::Receiver<Vec<u8>>),
}

/// Starts a host worker as the leader of a new session. Its commands run in process groups of
/// their own (so that a timeout can kill one command's whole tree), but stay in this session, so
/// that when the worker ends, [`kill_session`] finds everything it left running.
#[allow(unsafe_code)]
fn new_session(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only setsid, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Kills every process still in session `sid` (a host worker's, after the worker has ended): a
/// cancelled task's command, or whatever a function started and left behind. Linux's `/proc`.
pub(crate) fn kill_session(sid: u32) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name in parentheses: state, ppid, pgrp, session.
        let session = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(3))
            .and_then(|f| f.parse::<u32>().ok());
        if session == Some(sid) && pid as u32 != std::process::id() {
            signal_kill(pid);
        }
    }
}

#[allow(unsafe_code)]
fn signal_kill(pid: i32) {
    // SAFETY: kill only sends a signal; `pid` is a process of the session being ended.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(9)) => "killed by SIGKILL".into(),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown exit".into(),
    }
}

/// Removes a worker's container (it may already be gone).
pub(crate) async fn stop_container(runtime: Runtime, name: &str) {
    let program = match runtime {
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
        _ => return,
    };
    let _ = Command::new(program)
        .args(["rm", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Removes containers a previous run of this endpoint left behind (after a crash).
pub(crate) async fn remove_stale_containers(runtime: Runtime, label: &str) {
    let program = match runtime {
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
        _ => return,
    };
    let Ok(out) = Command::new(program)
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .stderr(Stdio::null())
        .output()
        .await
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        tracing::info!(
            count = ids.len(),
            "removing containers left by a previous run"
        );
        let _ = Command::new(program)
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
}

/// A simulated worker, for scale experiments (`simulate_ms` on the endpoint): no process; it
/// answers every task of every `run` order with `null` after `delay`, in order, as a worker
/// would, and exits when told to or killed. Everything around it — the endpoint's store, pool,
/// batching and results — is the real thing.
pub(crate) async fn simulate(
    id: WorkerId,
    delay: std::time::Duration,
    mut orders: mpsc::Receiver<Vec<u8>>,
    reports: mpsc::Sender<Report>,
    kill: tokio_util::sync::CancellationToken,
) {
    #[derive(serde::Deserialize)]
    struct Order {
        op: String,
        #[serde(default)]
        tasks: Vec<OrderTask>,
    }
    #[derive(serde::Deserialize)]
    struct OrderTask {
        id: String,
    }
    let reason = async {
        if reports.send(Report::Ready(id)).await.is_err() {
            return "the endpoint stopped".to_owned();
        }
        loop {
            let frame = tokio::select! {
                () = kill.cancelled() => return "killed".to_owned(),
                f = orders.recv() => match f {
                    Some(f) => f,
                    None => return "its orders ended".to_owned(),
                },
            };
            let Some(order) = frame
                .get(4..)
                .and_then(|body| serde_json::from_slice::<Order>(body).ok())
            else {
                continue;
            };
            match order.op.as_str() {
                "run" => {}
                "exit" => return "exited".to_owned(),
                _ => continue,
            }
            let mut results = Vec::with_capacity(order.tasks.len());
            for t in order.tasks {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                results.push(WorkerResult {
                    id: t.id,
                    ok: true,
                    value: Some(serde_json::Value::Null),
                    error: None,
                    run_us: delay.as_micros() as u64,
                    recycle: false,
                    spill: None,
                    value_ref: None,
                });
            }
            if reports.send(Report::Results(id, results)).await.is_err() {
                return "the endpoint stopped".to_owned();
            }
        }
    }
    .await;
    let _ = reports.send(Report::Exited(id, reason)).await;
}
