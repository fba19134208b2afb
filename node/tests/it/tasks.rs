//! Tasks through the CLI on a multi-process testnet: submit on one node, run on another's
//! endpoint, results back; remote errors; bad input; endpoint and submitter crashes.

use std::path::Path;
use std::time::Duration;

use crate::cli::{Net, funcmesh, ok, p, wait_until};

const SOURCE: &str = "import time\n\
def double(x):\n    return 2 * x\n\
def boom(x):\n    raise ValueError('bad value %r' % x)\n\
def slow(s):\n    time.sleep(s)\n    return s\n\
def echo(x):\n    return x\n";

fn register(node: &Path, dir: &Path) {
    let src = dir.join("fns.py");
    std::fs::write(&src, SOURCE).unwrap();
    for f in ["double", "boom", "slow", "echo"] {
        ok(&[
            "function",
            "register",
            "--name",
            f,
            "--python",
            p(&src),
            "--entrypoint",
            f,
            "--node",
            p(node),
        ]);
    }
    ok(&[
        "function",
        "register",
        "--name",
        "greet",
        "--shell",
        "echo hello {name}",
        "--node",
        p(node),
    ]);
}

fn task(node: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["task", "status", id, "--node", p(node), "--json"])).unwrap()
}

/// Runs `funcmesh run … --wait` until routing can reach the endpoint (the first adverts take a
/// moment after start), then returns the output.
fn run_wait(node: &Path, args: &[&str]) -> std::process::Output {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--wait", "--node", p(node)]);
    let mut last = None;
    wait_until(
        "the endpoint to be routable",
        Duration::from_secs(20),
        || {
            let out = funcmesh(&full);
            let routable = !String::from_utf8_lossy(&out.stderr).contains("no endpoint can run");
            last = Some(out);
            routable
        },
    );
    last.unwrap()
}

#[test]
fn tasks_run_on_another_nodes_endpoint_and_bad_input_gets_clear_errors() {
    let net = Net::up("1", "2", &[]);
    let a1 = net.node("a1");
    register(&a1, &net.dir);
    net.wait_endpoints(&a1, 2);

    // Python: submitted on a1, run on a2's endpoint, result back on a1.
    let out = run_wait(&a1, &["double", "21", "--endpoint", "a2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    // JSON values cross the mesh unchanged, nulls included, both ways.
    for value in ["null", r#"{"a":null,"b":[null,1.5,-2,"x"]}"#] {
        let out = run_wait(&a1, &["echo", value, "--endpoint", "a2"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), value);
    }
    // Shell, with keyword arguments.
    let out = run_wait(
        &a1,
        &[
            "greet",
            "--kwargs",
            r#"{"name": "mesh"}"#,
            "--endpoint",
            "a2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello mesh");

    // Without --wait: an id, then status, wait and result.
    let id = ok(&["run", "double", "4", "--endpoint", "a2", "--node", p(&a1)]);
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(ok(&["task", "wait", &id, "--node", p(&a1)]), "8");
    assert_eq!(ok(&["task", "result", &id, "--node", p(&a1)]), "8");
    let t = task(&a1, &id);
    assert_eq!(t["status"], "succeeded");
    assert_eq!(t["endpoint"], "a2@a2");
    let times = &t["times"];
    for phase in [
        "submitted_us",
        "received_us",
        "queued_us",
        "running_us",
        "finished_us",
    ] {
        assert!(times[phase].as_u64().unwrap() > 0, "{phase} missing: {t}");
    }
    assert!(times["finished_us"].as_u64() >= times["running_us"].as_u64());

    // A remote exception: type, message and traceback, and a failing exit status.
    let out = run_wait(&a1, &["boom", "7", "--endpoint", "a2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Traceback"), "{err}");
    assert!(err.contains("ValueError: bad value 7"), "{err}");
    assert!(err.contains("in boom"), "{err}");

    // Bad input: each a one-line error naming the problem, and the node keeps serving.
    let fails = |args: &[&str], needle: &str| {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--node", p(&a1)]);
        let out = funcmesh(&full);
        assert!(!out.status.success(), "{full:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{full:?}: expected `{needle}` in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    fails(&["run", "nope", "1", "--wait"], "no function");
    fails(
        &["run", "double", "--kwargs", "{not json", "--wait"],
        "--kwargs",
    );
    fails(
        &["run", "double", "--kwargs", "[1]", "--wait"],
        "JSON object",
    );
    fails(
        &["run", "double", "1", "--endpoint", "nowhere", "--wait"],
        "no endpoint is named `nowhere`",
    );
    fails(
        &["run", "double", "1", "--strategy", "fastest"],
        "not one of warm-aware",
    );
    fails(&["task", "status", "xyz"], "not a task id");
    fails(&["task", "status", &"0".repeat(32)], "no task");
    // A function that needs a runtime no endpoint offers.
    ok(&[
        "function",
        "register",
        "--name",
        "boxed",
        "--shell",
        "true",
        "--container",
        "docker:funcmesh/python:bookworm",
        "--node",
        p(&a1),
    ]);
    fails(&["run", "boxed", "--wait"], "the function needs docker");
    // Wrong argument count: the Python error comes back; the endpoint still serves.
    let out = run_wait(&a1, &["double", "1", "2", "--endpoint", "a2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("TypeError"));
    let out = run_wait(&a1, &["double", "5", "--endpoint", "a2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");

    // Cancel: the running task's worker is stopped, and the endpoint goes on serving.
    let id = ok(&["run", "slow", "60", "--endpoint", "a2", "--node", p(&a1)]);
    // Its status is the endpoint's, live: it shows running while it runs.
    wait_until("the slow task to run", Duration::from_secs(20), || {
        task(&a1, &id)["status"] == "running"
    });
    assert!(task(&a1, &id)["times"]["running_us"].as_u64().unwrap() > 0);
    let out = ok(&["task", "cancel", &id, "--node", p(&a1)]);
    assert!(out.ends_with("cancelled"), "{out}");
    assert_eq!(task(&a1, &id)["status"], "cancelled");
    let out = funcmesh(&["task", "result", &id, "--node", p(&a1)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    let out = run_wait(&a1, &["double", "6", "--endpoint", "a2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "12");

    // A batch from a JSON Lines file, run across both endpoints.
    let batch = net.dir.join("batch.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"function": "double", "args": [{i}], "strategy": "round-robin"}}"#))
        .collect();
    std::fs::write(&batch, lines.join("\n")).unwrap();
    let out = ok(&[
        "run",
        "--batch",
        p(&batch),
        "--wait",
        "--node",
        p(&a1),
        "--json",
    ]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 20);
    let mut endpoints = std::collections::BTreeSet::new();
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t["task"]["outcome"]["value"], 2 * i as u64, "{t}");
        endpoints.insert(t["task"]["endpoint"].as_str().unwrap().to_string());
    }
    assert_eq!(
        endpoints.len(),
        2,
        "round-robin used both endpoints: {endpoints:?}"
    );
}

#[test]
fn a_lost_endpoint_retries_or_fails_and_a_killed_submitter_keeps_its_results() {
    let net = Net::up("2", "2", &["--endpoint-policy", "federation"]);
    let a1 = net.node("a1");
    register(&a1, &net.dir);
    net.wait_endpoints(&a1, 4);
    // Make sure inst-b's endpoints are routable before the real tasks.
    let out = run_wait(&a1, &["double", "1", "--institution", "inst-b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A retryable and a non-retryable task on the same endpoint of inst-b.
    let retryable = ok(&[
        "run",
        "slow",
        "3",
        "--institution",
        "inst-b",
        "--retries",
        "1",
        "--node",
        p(&a1),
    ]);
    let first = task(&a1, &retryable)["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = first.split('@').next().unwrap().to_string();
    let survivor = if victim == "b1" { "b2" } else { "b1" };
    let single = ok(&["run", "slow", "3", "--endpoint", &victim, "--node", p(&a1)]);
    // Killed mid-task: both are running (the endpoint has two workers, the tasks take 3 s).
    wait_until("both tasks to run", Duration::from_secs(20), || {
        task(&a1, &retryable)["status"] == "running" && task(&a1, &single)["status"] == "running"
    });
    net.kill(&victim);

    assert_eq!(
        ok(&[
            "task",
            "wait",
            &retryable,
            "--timeout",
            "60s",
            "--node",
            p(&a1)
        ]),
        "3"
    );
    let t = task(&a1, &retryable);
    assert_eq!(t["attempts"], 2, "{t}");
    assert_eq!(t["endpoint"], format!("{survivor}@{survivor}"), "{t}");
    assert!(t["lost"][0].as_str().unwrap().contains("was lost"), "{t}");

    let out = funcmesh(&[
        "task",
        "wait",
        &single,
        "--timeout",
        "60s",
        "--node",
        p(&a1),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("EndpointLost") && err.contains("was lost"),
        "{err}"
    );
    assert_eq!(task(&a1, &single)["status"], "failed");

    // kill -9 of the submitter while its task runs: after a restart the result is there.
    let id = ok(&["run", "slow", "2", "--endpoint", survivor, "--node", p(&a1)]);
    wait_until(
        "the task to reach its endpoint",
        Duration::from_secs(20),
        || task(&a1, &id)["status"] != "pending",
    );
    net.kill("a1");
    net.restart("a1");
    assert_eq!(
        ok(&["task", "wait", &id, "--timeout", "60s", "--node", p(&a1)]),
        "2"
    );
    // Tasks accepted before the crash are still there, with their results.
    assert_eq!(task(&a1, &retryable)["status"], "succeeded");
    assert_eq!(ok(&["task", "result", &retryable, "--node", p(&a1)]), "3");
}

/// A submitter killed (-9) with 300 tasks out, some of them running on its own endpoint, and
/// restarted: every task succeeds. Those that ran on its own endpoint are lost with the crash
/// (they are never run twice) and retried on another endpoint once the restarted node has
/// learned the endpoints again: a retry with no route yet waits for one instead of failing.
/// Flags given with --batch are every line's defaults (`--retries 3` here).
#[test]
fn every_task_survives_a_kill_and_restart_of_its_submitter() {
    let net = Net::up("1", "3", &[]);
    let a1 = net.node("a1");
    register(&a1, &net.dir);
    net.wait_endpoints(&a1, 3);
    for ep in ["a1", "a2", "a3"] {
        let out = run_wait(&a1, &["double", "1", "--endpoint", ep]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let batch = net.dir.join("tasks.jsonl");
    let lines: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"function": "slow", "args": [0.{}]}}"#, 1 + i % 3))
        .collect();
    std::fs::write(&batch, lines.join("\n")).unwrap();
    let ids: Vec<String> = ok(&[
        "run",
        "--batch",
        p(&batch),
        "--retries",
        "3",
        "--strategy",
        "round-robin",
        "--node",
        p(&a1),
    ])
    .lines()
    .map(str::to_owned)
    .collect();
    assert_eq!(ids.len(), 300);
    let t = task(&a1, &ids[0]);
    assert_eq!(t["attempts"], 1, "{t}");
    // Some are running on a1's own endpoint when it is killed.
    wait_until("a task to run on a1", Duration::from_secs(30), || {
        ids.iter().take(12).any(|id| {
            let t = task(&a1, id);
            t["status"] == "running" && t["endpoint"] == "a1@a1"
        })
    });
    net.kill("a1");
    net.restart("a1");
    let mut args = vec!["task", "wait"];
    args.extend(ids.iter().map(String::as_str));
    args.extend(["--timeout", "240s", "--node", p(&a1)]);
    let out = funcmesh(&args);
    assert!(
        out.status.success(),
        "not every task succeeded: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 300, "{stdout}");
    // The batch's flags reached every task: some were retried after the crash.
    let retried = ids
        .iter()
        .filter(|id| task(&a1, id)["attempts"].as_u64() > Some(1))
        .count();
    assert!(retried > 0, "no task needed a retry: the crash hit nothing");
}

/// Builds one of the project's images (cached), as `.ci/run` does: `python` or `base` (Debian
/// without python3).
fn image(kind: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-image.sh");
    let out = std::process::Command::new(script)
        .arg(kind)
        .output()
        .expect("run scripts/build-image.sh");
    assert!(
        out.status.success(),
        "scripts/build-image.sh {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

fn python_image() -> String {
    image("python")
}

#[test]
fn shell_functions_run_in_an_image_without_python3_and_python_ones_say_why_they_cannot() {
    let base = image("base");
    let net = Net::up("1", "2", &["--runtimes", "host,docker"]);
    let a1 = net.node("a1");
    let container = format!("docker:{base}");
    for (name, command) in [
        (
            "probe",
            "command -v python3 || echo no python3 here; cat /etc/debian_version",
        ),
        ("shout", "echo {} | tr a-z A-Z"),
    ] {
        ok(&[
            "function",
            "register",
            "--name",
            name,
            "--shell",
            command,
            "--container",
            &container,
            "--node",
            p(&a1),
        ]);
    }
    let src = net.dir.join("py.py");
    std::fs::write(&src, "def f(x):\n    return x\n").unwrap();
    ok(&[
        "function",
        "register",
        "--name",
        "py",
        "--python",
        p(&src),
        "--entrypoint",
        "f",
        "--container",
        &container,
        "--node",
        p(&a1),
    ]);
    net.wait_endpoints(&a1, 2);

    // The image has no python3: the shell worker runs the command.
    let out = run_wait(&a1, &["probe", "--endpoint", "a2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &listed["tasks"][0]["task"];
    let stdout = t["outcome"]["value"]["stdout"].as_str().unwrap_or_default();
    assert!(stdout.starts_with("no python3 here\n12."), "{t}");
    assert_eq!(t["environment"], container.as_str(), "{t}");
    let worker = t["worker"].as_str().unwrap().to_string();

    // A Python function there fails with the reason, and the same worker goes on serving.
    let out = run_wait(&a1, &["py", "1", "--endpoint", "a2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PythonMissing") && err.contains("python3"),
        "{err}"
    );
    let id = ok(&[
        "run",
        "shout",
        r#""it's quiet""#,
        "--endpoint",
        "a2",
        "--node",
        p(&a1),
    ]);
    assert_eq!(ok(&["task", "wait", &id, "--node", p(&a1)]), "IT'S QUIET");
    let t = task(&a1, &id);
    assert_eq!(t["worker"], worker.as_str(), "{t}");
    assert_eq!(t["cold_start"], false, "{t}");
}

#[test]
fn a_python_function_runs_in_a_warm_docker_container_and_warm_aware_routing_finds_it() {
    let image = python_image();
    let net = Net::up("1", "3", &["--runtimes", "host,docker"]);
    let a1 = net.node("a1");
    let src = net.dir.join("where.py");
    std::fs::write(
        &src,
        "import platform\ndef where(x):\n    \
         return [open('/etc/os-release').read().split('\\n')[0], platform.python_version(), x]\n\
         def confined():\n    \
         import os, socket\n    \
         out = {'uid': os.getuid()}\n    \
         try:\n        open('/etc/evil', 'w'); out['root_writable'] = True\n    \
         except OSError:\n        out['root_writable'] = False\n    \
         ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n    \
         out['interfaces'] = ifaces\n    \
         return out\n",
    )
    .unwrap();
    let container = format!("docker:{image}");
    ok(&[
        "function",
        "register",
        "--name",
        "where",
        "--python",
        p(&src),
        "--entrypoint",
        "where",
        "--container",
        &container,
        "--node",
        p(&a1),
    ]);
    net.wait_endpoints(&a1, 3);

    // First task: a2 starts a container for it (a cold start).
    let out = run_wait(&a1, &["where", "1", "--endpoint", "a2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &first["tasks"][0]["task"];
    assert_eq!(
        first["outcome"]["value"][0], "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"",
        "{first}"
    );
    assert_eq!(first["environment"], container.as_str());
    assert_eq!(first["cold_start"], true, "{first}");
    assert!(first["times"]["waiting_us"].as_u64().unwrap() > 0);
    let worker = first["worker"].as_str().unwrap().to_string();
    assert!(
        worker.starts_with("fm-a2-"),
        "the worker is a named container: {worker}"
    );

    // Second task to the same image: the same warm container, no cold start.
    let id = ok(&["run", "where", "2", "--endpoint", "a2", "--node", p(&a1)]);
    ok(&["task", "wait", &id, "--node", p(&a1)]);
    let second = task(&a1, &id);
    assert_eq!(second["cold_start"], false, "{second}");
    assert_eq!(second["times"]["waiting_us"], 0, "{second}");
    assert_eq!(second["worker"], worker.as_str(), "{second}");

    // a2 now advertises a warm container for the image; a1 (local, zero RTT) and a3 have none.
    wait_until(
        "a2's advert of its warm container",
        Duration::from_secs(10),
        || {
            let out = funcmesh(&["endpoint", "load", "--node", p(&a1), "--json"]);
            let ads: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            ads.iter().any(|a| {
                a["advert"]["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| {
                        e["name"] == "a2"
                            && e["environments"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|v| v["env"] == container.as_str() && v["idle"] == 1)
                    })
            })
        },
    );
    let table = ok(&["endpoint", "load", "--node", p(&a1)]);
    assert!(table.contains(&container), "{table}");

    // Issue 17: the container is confined: not root, a read-only root, no network but loopback.
    ok(&[
        "function",
        "register",
        "--name",
        "confined",
        "--python",
        p(&src),
        "--entrypoint",
        "confined",
        "--container",
        &container,
        "--node",
        p(&a1),
    ]);
    let out = run_wait(&a1, &["confined", "--endpoint", "a2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = &probe["tasks"][0]["task"]["outcome"]["value"];
    assert_eq!(value["uid"], 65534, "{value}");
    assert_eq!(value["root_writable"], false, "{value}");
    assert_eq!(value["interfaces"], serde_json::json!(["lo"]), "{value}");
    let id = ok(&["run", "where", "3", "--node", p(&a1)]);
    ok(&["task", "wait", &id, "--node", p(&a1)]);
    let routed = task(&a1, &id);
    assert_eq!(
        routed["endpoint"], "a2@a2",
        "warm-aware picked the warm endpoint: {routed}"
    );
    assert_eq!(routed["cold_start"], false);
    drop(net);
    // Stopping the nodes removed their containers.
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "name=fm-a2-",
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "containers left behind"
    );
}

/// The value of the sample `name{labels}` in Prometheus' text format (0 when absent).
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `GET /metrics` (`funcmesh metrics`) counts what the task path did: on the submitting node,
/// tasks submitted, finished by outcome and kind; on the endpoint node, its queue and workers;
/// on both, members and registry entries. Every metric has a help text.
#[test]
fn metrics_count_what_the_task_path_did() {
    let net = Net::up("1", "2", &[]);
    let a1 = net.node("a1");
    register(&a1, &net.dir);
    net.wait_endpoints(&a1, 2);
    let out = run_wait(&a1, &["double", "2", "--endpoint", "a2"]);
    assert!(out.status.success());
    for x in ["3", "4"] {
        assert_eq!(
            ok(&[
                "run",
                "double",
                x,
                "--endpoint",
                "a2",
                "--wait",
                "--node",
                p(&a1)
            ]),
            (2 * x.parse::<i32>().unwrap()).to_string()
        );
    }
    let failed = funcmesh(&[
        "run",
        "boom",
        "1",
        "--endpoint",
        "a2",
        "--wait",
        "--node",
        p(&a1),
    ]);
    assert!(!failed.status.success());
    let m = ok(&["metrics", "--node", p(&a1)]);
    assert!(sample(&m, "funcmesh_tasks_submitted_total") >= 4.0, "{m}");
    assert!(
        sample(
            &m,
            "funcmesh_tasks_finished_total{outcome=\"succeeded\",kind=\"\"}"
        ) >= 3.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "funcmesh_tasks_finished_total{outcome=\"failed\",kind=\"Exception\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "funcmesh_tasks_live"), 0.0, "{m}");
    assert!(sample(&m, "funcmesh_members") >= 1.0, "{m}");
    assert!(sample(&m, "funcmesh_registry_entries") >= 4.0, "{m}");
    // Every metric family is declared with a help text.
    let families = m.lines().filter(|l| l.starts_with("# TYPE")).count();
    let helps = m.lines().filter(|l| l.starts_with("# HELP")).count();
    assert!(families >= 8 && helps == families, "{m}");
    // The endpoint's node reports its endpoint's queue.
    let m2 = ok(&["metrics", "--node", p(&net.node("a2"))]);
    assert!(
        m2.contains("funcmesh_endpoint_queued{endpoint=\"a2\"}"),
        "{m2}"
    );
    assert_eq!(sample(&m2, "funcmesh_tasks_submitted_total"), 0.0, "{m2}");
}

/// A task the node does not accept gets a reason for people and a kind for programs.
#[test]
fn a_refused_task_says_why_and_what_kind_of_refusal_it_is() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    register(&a1, &net.dir);
    net.wait_endpoints(&a1, 1);
    let kind_of = |args: &[&str]| {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--json", "--node", p(&a1)]);
        let out = funcmesh(&full);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let t = &list["tasks"][0];
        assert!(t["error"].as_str().is_some_and(|e| !e.is_empty()), "{list}");
        t["error_kind"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(kind_of(&["no-such-function", "1"]), "function");
    assert_eq!(
        kind_of(&["double", "1", "--endpoint", "nowhere"]),
        "no_route"
    );
    assert_eq!(
        kind_of(&["double", "1", "--institution", "no-such-institution"]),
        "no_route"
    );
}

/// The API answers a body larger than it takes with a JSON 413, before reading it, and an
/// unknown route with a JSON 404.
#[test]
fn an_oversized_api_body_gets_a_json_413() {
    use std::io::{Read as _, Write as _};
    let net = Net::up("1", "1", &[]);
    let api: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(net.node("a1").join("api.json")).unwrap())
            .unwrap();
    let addr = api["url"].as_str().unwrap().trim_start_matches("http://");
    let token = api["token"].as_str().unwrap();
    let ask = |head: String| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let out = ask(format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        40 << 20
    ));
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.contains("application/json") && out.contains("\"error\""),
        "{out}"
    );
    let out = ask(format!(
        "GET /v1/nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    ));
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("\"error\""), "{out}");
}

/// Reads one server-sent event (its `event:` and `data:` lines) from `r`.
fn next_event(r: &mut impl std::io::BufRead) -> (String, String) {
    let (mut event, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).expect("read the event stream");
        assert!(n > 0, "the event stream ended");
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !event.is_empty() || !data.is_empty() {
                return (event, data);
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
}

#[test]
fn finished_tasks_are_pushed_as_server_sent_events() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();
    register(&a1, dir.path());
    // Routable first, so that the tasks below are accepted at once.
    run_wait(&a1, &["double", "1"]);
    let api: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a1.join("api.json")).unwrap()).unwrap();
    let addr = api["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let token = api["token"].as_str().unwrap();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    use std::io::{BufRead as _, Write as _};
    write!(
        stream,
        "GET /v1/tasks/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.contains(" 200 "), "{status}");
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header.trim().is_empty() {
            break;
        }
    }
    // Three tasks, one failing: each arrives as an event once it finished.
    let mut ids = Vec::new();
    for (f, x) in [("double", "20"), ("boom", "3"), ("double", "21")] {
        let out: serde_json::Value =
            serde_json::from_str(&ok(&["run", f, x, "--node", p(&a1), "--json"])).unwrap();
        ids.push(out["tasks"][0]["task"]["id"].as_str().unwrap().to_string());
    }
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < ids.len() {
        // Chunked transfer encoding: size lines interleave with the event's lines.
        let (event, data) = next_event(&mut reader);
        if event != "task" {
            continue;
        }
        let view: serde_json::Value = serde_json::from_str(&data).unwrap();
        seen.insert(view["id"].as_str().unwrap().to_string(), view);
    }
    for id in &ids {
        assert!(seen.contains_key(id), "task {id} was pushed");
    }
    assert_eq!(seen[&ids[0]]["status"], "succeeded");
    assert_eq!(seen[&ids[1]]["status"], "failed");
    assert_eq!(seen[&ids[2]]["status"], "succeeded");
}

#[test]
fn task_wait_prints_each_result_in_order_as_soon_as_it_is_pushed() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();
    register(&a1, dir.path());
    run_wait(&a1, &["double", "1"]);
    let quick = ok(&["run", "double", "21", "--node", p(&a1)]);
    let slow = ok(&["run", "slow", "4", "--node", p(&a1)]);
    let mut child = std::process::Command::new(crate::cli::BIN)
        .args(["task", "wait", &quick, &slow, "--node", p(&a1)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead as _;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The first result is printed while the second task still runs.
    assert_eq!(lines.next().unwrap().unwrap(), format!("{quick}  42"));
    assert_ne!(task(&a1, &slow)["status"], "succeeded");
    assert_eq!(lines.next().unwrap().unwrap(), format!("{slow}  4"));
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_running_node_ignores_sigpipe() {
    // The binary restores SIGPIPE's default for the CLI (`funcmesh … | head`). A node that kept
    // it died, without a word in its log, when it wrote to the pipe of a worker that had just
    // exited (seen under a Python Executor's maps: killed by SIGPIPE, under strace).
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let api: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a1.join("api.json")).unwrap()).unwrap();
    let pid = api["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SigIgn {ignored:x}"
    );
}
