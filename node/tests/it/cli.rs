//! CLI journeys against the real binary: federation → institution → admit → invite → join →
//! peers; the local testnet; and bad input.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_funcmesh");

pub(crate) fn funcmesh(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run funcmesh")
}

pub(crate) fn ok(args: &[&str]) -> String {
    let out = funcmesh(args);
    assert!(
        out.status.success(),
        "funcmesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A daemon process, SIGKILLed on drop if still running.
struct Daemon(Child);

impl Daemon {
    fn spawn(args: &[&str], log: &Path) -> Daemon {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Daemon(child)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        node::local_testnet::kill(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            wait_a_little();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The polling interval of `wait_until` and friends: they wait for a condition, with a timeout.
pub(crate) fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(20));
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        wait_a_little();
    }
}

pub(crate) fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn peers(dir: &Path) -> Vec<serde_json::Value> {
    let out = funcmesh(&["peers", "--node", p(dir), "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn lists(dir: &Path, peer: &str) -> bool {
    peers(dir).iter().any(|m| m["peer_id"] == peer)
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["status", "--node", p(dir), "--json"])).unwrap()
}

fn wait_api(dir: &Path) {
    wait_until("the node's API", Duration::from_secs(20), || {
        funcmesh(&["status", "--node", p(dir), "--json"])
            .status
            .success()
    });
}

#[test]
fn the_whole_cli_journey_runs_multi_process_on_loopback() {
    let t = tempfile::tempdir().unwrap();
    let coord = t.path().join("coord");
    ok(&[
        "federation",
        "create",
        "--name",
        "physics",
        "--data-dir",
        p(&coord),
    ]);
    let mut coord_d = Daemon::spawn(
        &["start", "--data-dir", p(&coord)],
        &t.path().join("coord.log"),
    );
    wait_api(&coord);
    let st = status(&coord);
    assert_eq!(st["role"], "coordinator");
    assert_eq!(st["federation_name"], "physics");
    let coord_peer = st["peer_id"].as_str().unwrap().to_string();
    let addr = st["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .find(|a| a.contains("/tcp/"))
        .unwrap();

    let key = t.path().join("uni-a.key");
    ok(&["institution", "create", "--name", "uni-a", "--out", p(&key)]);
    let adm = t.path().join("uni-a.admission.json");
    ok(&[
        "federation",
        "admit",
        "--federation-key",
        p(&coord.join("federation.key")),
        "--institution",
        &format!("{}.pub", p(&key)),
        "--out",
        p(&adm),
    ]);
    let invite = |role: &str| {
        ok(&[
            "invite",
            "create",
            "--institution-key",
            p(&key),
            "--admission",
            p(&adm),
            "--role",
            role,
            "--ttl",
            "1h",
        ])
    };

    // n1 joins and exits, then starts as a daemon from what it stored.
    // The invite from stdin (`--invite -`): on the command line other local users could read it.
    let n1 = t.path().join("n1");
    let out = {
        use std::io::Write as _;
        let mut child = Command::new(BIN)
            .args([
                "join",
                &addr,
                "--invite",
                "-",
                "--data-dir",
                p(&n1),
                "--no-start",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(invite("endpoint").as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(out.contains("joined federation physics"), "{out}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(n1.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The data dir is its owner's only, and so is the membership proof.
    let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode_of(&n1), 0o700);
    assert_eq!(mode_of(&n1.join("membership.json")), 0o600);
    let mut n1_d = Daemon::spawn(&["start", "--data-dir", p(&n1)], &t.path().join("n1.log"));
    wait_api(&n1);
    // n2 joins and keeps running.
    let n2 = t.path().join("n2");
    let _n2_d = Daemon::spawn(
        &[
            "join",
            &addr,
            "--invite",
            &invite("client"),
            "--data-dir",
            p(&n2),
        ],
        &t.path().join("n2.log"),
    );
    wait_api(&n2);
    let n1_peer = status(&n1)["peer_id"].as_str().unwrap().to_string();
    let n2_peer = status(&n2)["peer_id"].as_str().unwrap().to_string();
    wait_until("everyone to list everyone", Duration::from_secs(10), || {
        lists(&coord, &n1_peer)
            && lists(&coord, &n2_peer)
            && lists(&n1, &coord_peer)
            && lists(&n1, &n2_peer)
            && lists(&n2, &n1_peer)
    });
    let table = ok(&["peers", "--node", p(&n2)]);
    assert!(
        table.contains(&n1_peer) && table.contains("uni-a") && table.contains("endpoint"),
        "{table}"
    );
    let n2_status = status(&n2);
    assert_eq!(
        (
            n2_status["role"].as_str(),
            n2_status["institution"].as_str()
        ),
        (Some("client"), Some("uni-a"))
    );

    // The client finds the node through FUNCMESH_NODE too.
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .env("FUNCMESH_NODE", &n1)
        .output()
        .unwrap();
    assert!(out.status.success());

    // Graceful shutdown on SIGTERM removes the API file.
    assert!(n1_d.terminate().success());
    assert!(!n1.join("api.json").exists());
    assert!(coord_d.terminate().success());
}

#[test]
fn start_resolves_config_from_file_then_env_then_flags() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("n");
    ok(&["init", "--data-dir", p(&d), "--name", "from-init"]);
    let out = Command::new(BIN)
        .args([
            "start",
            "--data-dir",
            p(&d),
            "--dump-config",
            "--set",
            "mesh.proof_timeout=7s",
        ])
        .env("FUNCMESH_API_LISTEN", "127.0.0.1:9999")
        .env("FUNCMESH_NODE_NAME", "from-env")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("name = \"from-env\""), "{text}");
    assert!(text.contains("proof_timeout = \"7s\""), "{text}");
    let out = Command::new(BIN)
        .args([
            "start",
            "--data-dir",
            p(&d),
            "--dump-config",
            "--api-listen",
            "127.0.0.1:1234",
        ])
        .env("FUNCMESH_API_LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("127.0.0.1:1234"),
        "flags beat env"
    );
}

fn pids_under(root: &Path) -> Vec<u32> {
    let needle = p(root).to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        !s.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(false)
        })
        .collect()
}

#[test]
fn testnet_up_kill_restart_down_leave_no_process_behind() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("net");
    let out = ok(&[
        "testnet",
        "up",
        "--dir",
        p(&dir),
        "--institutions",
        "2",
        "--nodes-per-institution",
        "1",
    ]);
    assert!(out.contains("testnet up"), "{out}");
    let net: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("testnet.json")).unwrap()).unwrap();
    assert_eq!(net["coordinator"]["name"], "coordinator");
    let nodes = net["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for n in nodes {
        for field in [
            "name",
            "institution",
            "role",
            "data_dir",
            "peer_id",
            "api",
            "listen_addrs",
            "pid",
        ] {
            assert!(!n[field].is_null(), "testnet.json lacks {field}");
        }
        assert_eq!(n["role"], "endpoint");
    }
    assert_eq!(pids_under(&dir).len(), 3, "coordinator and two members run");
    let a1 = nodes.iter().find(|n| n["name"] == "a1").unwrap();
    let a1_pid = a1["pid"].as_u64().unwrap() as u32;
    let a1_dir = PathBuf::from(a1["data_dir"].as_str().unwrap());
    let b1_dir = PathBuf::from(
        nodes.iter().find(|n| n["name"] == "b1").unwrap()["data_dir"]
            .as_str()
            .unwrap(),
    );
    let a1_peer = a1["peer_id"].as_str().unwrap().to_string();

    // The registry through the CLI: register on a1 (inst-a), find it on b1 (inst-b).
    let src = t.path().join("double.py");
    std::fs::write(&src, "def double(x):\n    return 2 * x\n").unwrap();
    let py_id = ok(&[
        "function",
        "register",
        "--name",
        "double",
        "--python",
        p(&src),
        "--entrypoint",
        "double",
        "--node",
        p(&a1_dir),
    ])
    .trim()
    .to_string();
    assert_eq!(py_id.len(), 32, "{py_id}");
    let sh_id = ok(&[
        "function",
        "register",
        "--name",
        "greet",
        "--shell",
        "echo hello {name}",
        "--container",
        "docker:debian:bookworm",
        "--description",
        "says hello",
        "--node",
        p(&a1_dir),
    ])
    .trim()
    .to_string();
    // Registering the same function again gives the same id.
    let again = ok(&[
        "function",
        "register",
        "--name",
        "double",
        "--python",
        p(&src),
        "--entrypoint",
        "double",
        "--node",
        p(&a1_dir),
    ]);
    assert_eq!(again.trim(), py_id);
    wait_until("b1 to list both functions", Duration::from_secs(5), || {
        let out = funcmesh(&["function", "list", "--node", p(&b1_dir), "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.iter().any(|f| f["id"] == py_id.as_str())
            && list.iter().any(|f| f["id"] == sh_id.as_str())
    });
    let table = ok(&["function", "list", "--node", p(&b1_dir)]);
    assert!(
        table.contains("double") && table.contains("docker:debian:bookworm"),
        "{table}"
    );
    let shown = ok(&["function", "show", "greet", "--node", p(&b1_dir)]);
    assert!(
        shown.contains("echo hello {name}") && shown.contains("inst-a"),
        "{shown}"
    );
    let shown = ok(&["function", "show", &py_id[..8], "--node", p(&b1_dir)]);
    assert!(shown.contains("return 2 * x"), "{shown}");
    let eps: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["endpoint", "list", "--node", p(&b1_dir), "--json"])).unwrap();
    assert_eq!(eps.len(), 2, "one endpoint per endpoint node: {eps:?}");
    let table = ok(&["endpoint", "list", "--node", p(&b1_dir)]);
    assert!(
        table.contains("host") && table.contains("institution=inst-a"),
        "{table}"
    );
    let shown = ok(&["endpoint", "show", "a1", "--node", p(&b1_dir)]);
    assert!(
        shown.contains("inst-a") && shown.contains(&a1_peer),
        "{shown}"
    );
    fails_with(
        &["function", "show", "nope", "--node", p(&b1_dir)],
        "no function \"nope\"",
    );
    fails_with(
        &[
            "function",
            "register",
            "--name",
            "x",
            "--shell",
            "ls",
            "--container",
            "vm:img",
            "--node",
            p(&a1_dir),
        ],
        "unknown runtime",
    );
    fails_with(
        &[
            "function",
            "register",
            "--name",
            "x",
            "--python",
            p(&src),
            "--entrypoint",
            "triple",
            "--node",
            p(&a1_dir),
        ],
        "defines no function",
    );
    // Only the owner deletes; the deletion reaches everyone.
    fails_with(
        &["function", "delete", "greet", "--node", p(&b1_dir)],
        "only its owner can delete it",
    );
    ok(&["function", "delete", "greet", "--node", p(&a1_dir)]);
    wait_until(
        "b1 to drop the deleted function",
        Duration::from_secs(5),
        || {
            let out = funcmesh(&["function", "list", "--node", p(&b1_dir), "--json"]);
            let list: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            !list.is_empty() && !list.iter().any(|f| f["id"] == sh_id.as_str())
        },
    );
    let reg: serde_json::Value =
        serde_json::from_str(&ok(&["registry", "--node", p(&b1_dir), "--json"])).unwrap();
    assert!(reg["entries"].as_u64().unwrap() >= 9, "{reg}");

    ok(&["testnet", "kill", "a1", "--dir", p(&dir)]);
    assert!(
        !std::path::Path::new(&format!("/proc/{a1_pid}/cmdline")).exists()
            || !pids_under(&dir).contains(&a1_pid)
    );
    // TCP notices at once; a QUIC connection only at its 5 s idle timeout, which a loaded
    // machine running other tests can stretch.
    wait_until("b1 to notice a1 is gone", Duration::from_secs(20), || {
        !lists(&b1_dir, &a1_peer)
    });

    ok(&["testnet", "restart", "a1", "--dir", p(&dir)]);
    wait_until("a1 back in b1's list", Duration::from_secs(15), || {
        lists(&b1_dir, &a1_peer)
    });
    assert!(lists(&a1_dir, status(&b1_dir)["peer_id"].as_str().unwrap()));
    // a1 came back from disk with the functions it had.
    let mine = ok(&["function", "list", "--node", p(&a1_dir), "--json"]);
    assert!(mine.contains(&py_id) && !mine.contains(&sh_id), "{mine}");
    let st = ok(&["testnet", "status", "--dir", p(&dir), "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&st).unwrap();
    assert!(rows.iter().all(|r| r["running"] == true), "{st}");

    ok(&["testnet", "down", "--dir", p(&dir)]);
    assert!(pids_under(&dir).is_empty(), "no process left behind");
}

/// Runs a command that must fail with one line on stderr naming `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = funcmesh(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "funcmesh {args:?} succeeded");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "funcmesh {args:?} printed more than one line:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(
        err.contains(needle),
        "funcmesh {args:?}: expected `{needle}` in: {err}"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let t = tempfile::tempdir().unwrap();
    let x = t.path().join("x");
    fails_with(&["--bogus"], "unexpected argument '--bogus'");
    // Capability tokens, offline.
    fails_with(
        &["cap", "inspect", "garbage"],
        "truncated or malformed token",
    );
    fails_with(
        &[
            "cap",
            "grant",
            "--issuer-key",
            p(&x),
            "--to",
            "institution:b",
            "--endpoint",
            "e",
        ],
        "<--expires <EXPIRES>|--ttl <TTL>>",
    );
    fails_with(
        &[
            "cap",
            "grant",
            "--issuer-key",
            p(&x),
            "--to",
            "b",
            "--endpoint",
            "e",
            "--ttl",
            "1h",
        ],
        "cannot read the institution key",
    );
    fails_with(
        &["peers", "--node", p(&x), "--frobnicate"],
        "unexpected argument",
    );
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite",
            "garbage",
            "--data-dir",
            p(&x),
        ],
        "malformed invite",
    );
    let invite_file = x.with_extension("invite");
    std::fs::write(&invite_file, "garbage\n").unwrap();
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite-file",
            p(&invite_file),
            "--data-dir",
            p(&x),
        ],
        "malformed invite",
    );
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite-file",
            "/nonexistent/invite",
            "--data-dir",
            p(&x),
        ],
        "cannot read the invite file",
    );
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite",
            "fminvite2.eyJnZW5l",
            "--data-dir",
            p(&x),
        ],
        "truncated",
    );
    // An invite of the first format (whose proofs could be reused as invites) says what to do.
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite",
            "fminvite1.eyJnZW5l",
            "--data-dir",
            p(&x),
        ],
        "ask your institution for a new invite",
    );
    fails_with(
        &[
            "join",
            "not-an-address",
            "--invite",
            "x",
            "--data-dir",
            p(&x),
        ],
        "is not a multiaddr",
    );
    fails_with(
        &["status", "--node", p(&t.path().join("nothing"))],
        "no node data dir",
    );
    fails_with(
        &["start", "--data-dir", p(&t.path().join("empty"))],
        "not a node data dir",
    );
    fails_with(
        &["start", "--data-dir", p(&x), "--set", "api.nope=1"],
        "not a node data dir",
    );
    fails_with(&["testnet", "status", "--dir", p(&x)], "no testnet");

    // A data dir of another federation.
    let fed1 = t.path().join("fed1");
    ok(&[
        "federation",
        "create",
        "--name",
        "one",
        "--data-dir",
        p(&fed1),
    ]);
    fails_with(&["peers", "--node", p(&fed1)], "no node is running");
    let fed2 = t.path().join("fed2");
    ok(&[
        "federation",
        "create",
        "--name",
        "two",
        "--data-dir",
        p(&fed2),
    ]);
    let key = t.path().join("u.key");
    ok(&["institution", "create", "--name", "u", "--out", p(&key)]);
    let adm = t.path().join("u.adm");
    ok(&[
        "federation",
        "admit",
        "--federation-key",
        p(&fed2.join("federation.key")),
        "--institution",
        &format!("{}.pub", p(&key)),
        "--out",
        p(&adm),
    ]);
    let invite = ok(&[
        "invite",
        "create",
        "--institution-key",
        p(&key),
        "--admission",
        p(&adm),
        "--role",
        "endpoint",
    ]);
    fails_with(
        &[
            "join",
            "/ip4/127.0.0.1/tcp/1",
            "--invite",
            &invite,
            "--data-dir",
            p(&fed1),
        ],
        "belongs to federation one",
    );
    fails_with(
        &[
            "federation",
            "create",
            "--name",
            "again",
            "--data-dir",
            p(&fed1),
        ],
        "already belongs",
    );
    fails_with(
        &[
            "invite",
            "create",
            "--institution-key",
            p(&key),
            "--admission",
            p(&adm),
            "--role",
            "coordinator",
        ],
        "coordinators are created",
    );
    fails_with(
        &[
            "federation",
            "admit",
            "--federation-key",
            p(&fed1.join("federation.key")),
            "--institution",
            &format!("{}.pub", p(&key)),
            "--genesis",
            p(&fed2.join("federation.json")),
        ],
        "is not the key of federation two",
    );
    fails_with(
        &["institution", "create", "--name", "u", "--out", p(&key)],
        "already exists",
    );
}

/// A multi-process testnet made by `funcmesh testnet up` in a temp dir, stopped on drop: the one
/// helper every CLI test that needs a federation uses.
pub(crate) struct Net {
    _tmp: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    /// `testnet.json`: its nodes and institutions.
    json: serde_json::Value,
}

impl Net {
    /// `institutions` × `per` endpoint nodes and a coordinator; `extra` are more `testnet up`
    /// flags.
    pub(crate) fn up(institutions: &str, per: &str, extra: &[&str]) -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net");
        let mut args = vec![
            "testnet",
            "up",
            "--dir",
            p(&dir),
            "--institutions",
            institutions,
            "--nodes-per-institution",
            per,
        ];
        args.extend_from_slice(extra);
        ok(&args);
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("testnet.json")).unwrap())
                .unwrap();
        Net {
            _tmp: tmp,
            dir,
            json,
        }
    }

    /// A node's data dir.
    pub(crate) fn node(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A node's peer id.
    pub(crate) fn peer(&self, name: &str) -> String {
        self.json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["peer_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// An institution's key file.
    pub(crate) fn key(&self, institution: &str) -> PathBuf {
        PathBuf::from(
            self.json["institutions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == institution)
                .unwrap()["key"]
                .as_str()
                .unwrap(),
        )
    }

    /// SIGKILLs a node.
    pub(crate) fn kill(&self, name: &str) {
        ok(&["testnet", "kill", name, "--dir", p(&self.dir)]);
    }

    /// Restarts a node from its data dir.
    pub(crate) fn restart(&self, name: &str) {
        ok(&["testnet", "restart", name, "--dir", p(&self.dir)]);
    }

    /// Waits until `node` lists `n` endpoints.
    pub(crate) fn wait_endpoints(&self, node: &Path, n: usize) {
        wait_until(
            "every endpoint in the registry",
            Duration::from_secs(20),
            || {
                let out = funcmesh(&["endpoint", "list", "--node", p(node), "--json"]);
                serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                    .is_ok_and(|l| l.len() == n)
            },
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = funcmesh(&["testnet", "down", "--dir", p(&self.dir)]);
    }
}
