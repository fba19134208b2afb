//! The shell worker: protocol 1 (see [`crate::protocol`]) spoken by the `funcmesh` binary itself
//! (`funcmesh shell-worker`), for environments without python3.
//!
//! A worker starts as `python3 worker.py` when the environment has python3, and as this worker
//! when it has not (the launcher in [`crate::environment::worker_command`] decides, inside the
//! environment). So a shell function needs nothing in its image but `/bin/sh` and the C
//! libraries of a glibc system; a Python function sent to this worker fails with an error that
//! says the environment lacks python3. The shell semantics match `worker.py`'s `run_shell`: the
//! command template is filled in as Python's `str.format` would (each argument shell-quoted, JSON
//! values as Python's `json.dumps` writes them), stdout and stderr are captured and capped, a
//! timeout kills the command's process group and ends with exit code 124, and the memory limit
//! bounds the command's address space (`ulimit -v`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::{MAX_FRAME, VERSION};

/// The program that serves `shell-worker`, set once by the `funcmesh` binary at start.
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Records the binary that runs `<program> shell-worker` (the `funcmesh` binary calls this with
/// its own path). Endpoints started without it have no fallback for environments without python3.
pub fn set_program(path: PathBuf) {
    let _ = PROGRAM.set(path);
}

/// The binary that serves `shell-worker`, when one was recorded.
pub fn program() -> Option<&'static Path> {
    PROGRAM.get().map(PathBuf::as_path)
}

/// A task as the endpoint sends it (the fields this worker uses).
#[derive(Debug, Deserialize)]
struct Task {
    id: String,
    #[serde(default)]
    fid: String,
    #[serde(default, rename = "fn")]
    spec: Option<Value>,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    kwargs: Value,
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    memory_mb: u64,
    #[serde(default)]
    result_limit: u64,
    #[serde(default)]
    output_cap: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Order {
    Run { tasks: Vec<Task> },
    Cancel { ids: Vec<String> },
    Exit,
}

/// What the reader thread hands over.
enum Inbox {
    Order(Order),
    /// The end of input, or a frame that cannot be read: finish the batch, then stop.
    End(Option<String>),
}

/// A function as this worker knows it.
#[derive(Debug, Clone)]
enum Function {
    Shell(String),
    /// Any Python form: this worker cannot run it.
    Python,
}

/// Serves protocol 1 on `input` and `output` until `exit` or the end of input.
pub fn serve(input: impl Read + Send + 'static, mut output: impl Write) -> io::Result<()> {
    // Bounded: a reader far ahead of the tasks waits (the endpoint's pipe then fills up).
    let (tx, rx) = mpsc::sync_channel(64);
    std::thread::Builder::new()
        .name("shell-worker-reader".into())
        .spawn(move || read_frames(input, &tx))?;
    write_frame(
        &mut output,
        &json!({"op": "hello", "v": VERSION, "pid": std::process::id(), "python": "", "cloudpickle": false}),
    )?;
    let mut functions: HashMap<String, Function> = HashMap::new();
    let mut cancelled: HashSet<String> = HashSet::new();
    let mut batch: VecDeque<Task> = VecDeque::new();
    let mut ending = false;
    loop {
        // Take in what has arrived; wait only when there is nothing to run.
        loop {
            if ending {
                break;
            }
            let next = if batch.is_empty() {
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(Inbox::Order(Order::Run { tasks })) => batch.extend(tasks),
                Some(Inbox::Order(Order::Cancel { ids })) => cancelled.extend(ids),
                Some(Inbox::Order(Order::Exit)) | Some(Inbox::End(None)) | None => {
                    ending = true;
                    break;
                }
                Some(Inbox::End(Some(why))) => {
                    eprintln!("funcmesh shell worker: reading the pipe failed: {why}");
                    ending = true;
                    break;
                }
            }
        }
        let Some(task) = batch.pop_front() else {
            if ending {
                return Ok(());
            }
            continue;
        };
        let result = if cancelled.remove(&task.id) {
            json!({"op": "result", "id": task.id, "ok": false, "run_us": 0,
                   "error": error("Cancelled", "cancelled before it started")})
        } else {
            run(&mut functions, &task)
        };
        write_frame(&mut output, &result)?;
    }
}

fn read_frames(mut input: impl Read, tx: &mpsc::SyncSender<Inbox>) {
    loop {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let _ = tx.send(Inbox::End(None));
                return;
            }
            Err(e) => {
                let _ = tx.send(Inbox::End(Some(e.to_string())));
                return;
            }
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            let _ = tx.send(Inbox::End(Some(format!(
                "a frame of {n} bytes is over the limit of {MAX_FRAME}"
            ))));
            return;
        }
        let mut body = vec![0u8; n];
        if let Err(e) = input.read_exact(&mut body) {
            let _ = tx.send(Inbox::End(Some(e.to_string())));
            return;
        }
        let item = match serde_json::from_slice::<Order>(&body) {
            Ok(order) => Inbox::Order(order),
            Err(e) => Inbox::End(Some(format!("a malformed frame: {e}"))),
        };
        let end = matches!(item, Inbox::End(_));
        if tx.send(item).is_err() || end {
            return;
        }
    }
}

fn write_frame(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    out.write_all(&(body.len() as u32).to_be_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

fn error(type_name: &str, message: &str) -> Value {
    json!({"type": type_name, "message": message})
}

/// Runs one task: its result frame.
fn run(functions: &mut HashMap<String, Function>, task: &Task) -> Value {
    let start = Instant::now();
    let outcome = function(functions, task).and_then(|f| match f {
        Function::Shell(template) => run_shell(&template, task),
        Function::Python => Err(error(
            "PythonMissing",
            "this environment has no python3, so it runs shell functions only: run Python \
             functions in an image that has python3",
        )),
    });
    let run_us = start.elapsed().as_micros() as u64;
    let mut out = match outcome {
        Ok(value) => {
            let size = serde_json::to_string(&value).map_or(0, |s| s.len()) as u64;
            // This worker sends every result inline: within one task message.
            let limit = match task.result_limit {
                0 => crate::task::MAX_ARGUMENTS_BYTES as u64,
                l => l.min(crate::task::MAX_ARGUMENTS_BYTES as u64),
            };
            if size > limit {
                json!({"ok": false, "error": error("ResultTooLarge", &format!(
                    "the command's output is {size} bytes, over the {limit} bytes a shell \
                     function returns: write large output to a file in the endpoint's data \
                     root, and return its path"
                ))})
            } else {
                json!({"ok": true, "value": value})
            }
        }
        Err(e) => json!({"ok": false, "error": e}),
    };
    out["op"] = json!("result");
    out["id"] = json!(task.id);
    out["run_us"] = json!(run_us);
    out
}

fn function(functions: &mut HashMap<String, Function>, task: &Task) -> Result<Function, Value> {
    if let Some(f) = functions.get(&task.fid) {
        return Ok(f.clone());
    }
    let Some(spec) = &task.spec else {
        return Err(error(
            "UnknownFunction",
            &format!("function {} was never sent to this worker", task.fid),
        ));
    };
    let f = match spec.get("form").and_then(Value::as_str) {
        Some("shell") => match spec.get("command").and_then(Value::as_str) {
            Some(c) => Function::Shell(c.to_owned()),
            None => return Err(error("UnknownForm", "a shell function without a command")),
        },
        Some("python_source" | "python_payload") => Function::Python,
        other => {
            return Err(error(
                "UnknownForm",
                &format!("functions of form {other:?} are not supported"),
            ));
        }
    };
    functions.insert(task.fid.clone(), f.clone());
    Ok(f)
}

/// Runs a shell command template with the task's arguments, as `worker.py` does.
fn run_shell(template: &str, task: &Task) -> Result<Value, Value> {
    let (Value::Array(args), Value::Object(kwargs)) = (
        normalise(&task.args, Value::Array(vec![])),
        normalise(&task.kwargs, Value::Object(Default::default())),
    ) else {
        return Err(error(
            "BadArguments",
            "args must be a JSON array and kwargs a JSON object",
        ));
    };
    let cmd = fill(template, &args, &kwargs).map_err(|missing| {
        error(
            "BadArguments",
            &format!(
                "the command template '{template}' needs the argument {missing}: pass it with --kwargs"
            ),
        )
    })?;
    let script = if task.memory_mb > 0 {
        // The limit applies to the command's shell and whatever it runs.
        format!("ulimit -v {} 2>/dev/null\n{cmd}", task.memory_mb * 1024)
    } else {
        cmd.clone()
    };
    let timeout = (task.timeout_ms > 0).then(|| Duration::from_millis(task.timeout_ms));
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| error("OSError", &format!("cannot start /bin/sh: {e}")))?
    };
    let pid = child.id();
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = match timeout {
        Some(t) => match done_rx.recv_timeout(t) {
            Ok(s) => Some(s),
            Err(_) => {
                kill_group(pid);
                let _ = done_rx.recv();
                None
            }
        },
        None => done_rx.recv().ok(),
    };
    let code = match status {
        None => 124, // as coreutils timeout(1) and Globus Compute's ShellFunction
        Some(Ok(s)) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|n| -n)).unwrap_or(-1)
        }
        Some(Err(e)) => return Err(error("OSError", &format!("waiting for /bin/sh: {e}"))),
    };
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    let (out, err) = (collect(stdout), collect(stderr));
    let value = json!({
        "returncode": code,
        "stdout": cap(&out, task.output_cap),
        "stderr": cap(&err, task.output_cap),
        "cmd": cmd,
    });
    if code == 0 {
        return Ok(value);
    }
    let (kind, what) = match timeout {
        Some(t) if code == 124 => ("Timeout", format!("timed out after {}s", t.as_secs_f64())),
        _ => ("CommandFailed", format!("exited with {code}")),
    };
    let mut e = error(kind, &format!("the command {what}"));
    e["value"] = value;
    Err(e)
}

/// `null` as the empty default, as `task.get("args") or []` reads it.
fn normalise(v: &Value, empty: Value) -> Value {
    if v.is_null() { empty } else { v.clone() }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

#[allow(unsafe_code)]
fn kill_group(pid: u32) {
    // SAFETY: killpg only sends a signal; the group is the command's own (process_group(0)).
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The captured output as text, keeping the last `limit` characters (0: all).
fn cap(data: &[u8], limit: u64) -> String {
    let text = String::from_utf8_lossy(data);
    let n = text.chars().count();
    let limit = limit as usize;
    if limit == 0 || n <= limit {
        return text.into_owned();
    }
    let cut = n - limit;
    let tail: String = text.chars().skip(cut).collect();
    format!("[... {cut} characters cut]\n{tail}")
}

/// Fills `{}`, `{0}` and `{name}` in `template` as Python's `str.format` does, each value
/// shell-quoted; `{{` and `}}` are literal braces. The error names the missing argument.
fn fill(
    template: &str,
    args: &[Value],
    kwargs: &serde_json::Map<String, Value>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    let mut auto = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '{' => {
                let mut field = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    field.push(c);
                }
                if !closed {
                    return Err("(a single '{' in the template: write '{{' for a brace)".into());
                }
                if field.contains([':', '!', '.', '[']) {
                    return Err(format!(
                        "{{{field}}} (format specs and conversions need the Python worker)"
                    ));
                }
                let value = if field.is_empty() {
                    auto += 1;
                    args.get(auto - 1).ok_or_else(|| {
                        format!(
                            "Replacement index {} out of range for positional args tuple",
                            auto - 1
                        )
                    })?
                } else if let Ok(i) = field.parse::<usize>() {
                    args.get(i).ok_or_else(|| {
                        format!("Replacement index {i} out of range for positional args tuple")
                    })?
                } else {
                    kwargs.get(&field).ok_or_else(|| format!("'{field}'"))?
                };
                out.push_str(&quote(&match value {
                    Value::String(s) => s.clone(),
                    other => py_json(other),
                }));
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return Err("(a single '}' in the template: write '}}' for a brace)".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Python's `shlex.quote`.
fn quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if s.chars().all(safe) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// A JSON value as Python's `json.dumps` writes it by default: `, ` and `: ` separators, and
/// non-ASCII characters escaped.
fn py_json(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{u:04x}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(py_json).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", py_json(&Value::String(k.clone())), py_json(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_as_python_format_with_shell_quoting() {
        let args = vec![json!("a b"), json!(3), json!([1, "x"])];
        let kwargs = json!({"name": "it's", "o": {"k": "é"}});
        let kwargs = kwargs.as_object().unwrap();
        assert_eq!(
            fill("echo {} {} {}", &args, kwargs).unwrap(),
            r#"echo 'a b' 3 '[1, "x"]'"#
        );
        assert_eq!(fill("echo {1}{{}}", &args, kwargs).unwrap(), "echo 3{}");
        assert_eq!(
            fill("echo {name} {o}", &args, kwargs).unwrap(),
            r#"echo 'it'"'"'s' '{"k": "\u00e9"}'"#
        );
        assert!(
            fill("echo {5}", &args, kwargs)
                .unwrap_err()
                .contains("index 5")
        );
        assert_eq!(fill("echo {who}", &args, kwargs).unwrap_err(), "'who'");
        assert!(fill("echo {", &args, kwargs).is_err());
        assert!(fill("echo {0:>4}", &args, kwargs).is_err());
        assert_eq!(quote(""), "''");
        assert_eq!(quote("plain-word_1.txt"), "plain-word_1.txt");
    }

    /// A worker on one end of a socket pair; frames in and out on the other.
    struct Peer(std::os::unix::net::UnixStream);

    impl Peer {
        fn start() -> (Peer, std::thread::JoinHandle<io::Result<()>>) {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let out = theirs.try_clone().unwrap();
            let worker = std::thread::spawn(move || serve(theirs, out));
            let mut peer = Peer(ours);
            assert_eq!(peer.recv()["op"], "hello", "the worker speaks first");
            (peer, worker)
        }

        fn send(&mut self, v: Value) {
            write_frame(&mut self.0, &v).unwrap();
        }

        fn recv(&mut self) -> Value {
            let mut len = [0u8; 4];
            self.0.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            self.0.read_exact(&mut body).unwrap();
            serde_json::from_slice(&body).unwrap()
        }
    }

    #[test]
    fn the_worker_serves_batch_after_batch_until_exit() {
        let (mut peer, worker) = Peer::start();
        let shell = json!({"form": "shell", "command": "echo {}"});
        peer.send(
            json!({"op": "run", "tasks": [{"id": "t1", "fid": "f", "fn": shell, "args": ["one"]}]}),
        );
        assert_eq!(peer.recv()["value"]["stdout"], "one\n");
        // Still there for the next batch, which names the function by id only.
        peer.send(json!({"op": "run", "tasks": [
            {"id": "t2", "fid": "f", "args": ["two"]},
            {"id": "t3", "fid": "py", "fn": {"form": "python_source", "source": "", "entrypoint": "f"}},
            {"id": "t4", "fid": "nope"},
            {"id": "t5", "fid": "f", "args": [], "kwargs": {}},
        ]}));
        assert_eq!(peer.recv()["value"]["stdout"], "two\n");
        assert_eq!(peer.recv()["error"]["type"], "PythonMissing");
        assert_eq!(peer.recv()["error"]["type"], "UnknownFunction");
        let missing = peer.recv();
        assert_eq!(missing["error"]["type"], "BadArguments", "{missing}");
        peer.send(
            json!({"op": "run", "tasks": [{"id": "t6", "fid": "s", "timeout_ms": 200,
            "fn": {"form": "shell", "command": "sleep 30"}}]}),
        );
        let slow = peer.recv();
        assert_eq!(slow["error"]["type"], "Timeout", "{slow}");
        assert_eq!(slow["error"]["value"]["returncode"], 124, "{slow}");
        peer.send(json!({"op": "exit"}));
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn the_memory_limit_bounds_the_command() {
        let (mut peer, worker) = Peer::start();
        // The shell holds a 48 MB string: fine without a limit, refused under 16 MiB.
        let hog = json!({"form": "shell",
            "command": "x=$(head -c 48000000 /dev/zero | tr '\\0' a); echo ${{#x}}"});
        peer.send(json!({"op": "run", "tasks": [
            {"id": "free", "fid": "hog", "fn": hog},
            {"id": "capped", "fid": "hog", "memory_mb": 16},
        ]}));
        let free = peer.recv();
        assert_eq!(free["value"]["stdout"], "48000000\n", "{free}");
        let capped = peer.recv();
        assert_eq!(capped["ok"], false, "{capped}");
        assert_eq!(capped["error"]["type"], "CommandFailed", "{capped}");
        peer.send(json!({"op": "exit"}));
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn a_garbled_frame_ends_the_worker_without_a_panic() {
        let (mut peer, worker) = Peer::start();
        peer.0.write_all(&5u32.to_be_bytes()).unwrap();
        peer.0.write_all(b"{nope").unwrap();
        worker.join().unwrap().unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics_the_worker(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            // Whatever arrives, the worker answers what it can and ends at the end of input.
            let mut out = Vec::new();
            serve(std::io::Cursor::new(bytes), &mut out).unwrap();
            proptest::prop_assert!(out.len() >= 4);
        }
    }

    #[test]
    fn long_output_keeps_its_tail() {
        assert_eq!(cap(b"abcdef", 0), "abcdef");
        assert_eq!(cap("héllo".as_bytes(), 3), "[... 2 characters cut]\nllo");
    }
}
