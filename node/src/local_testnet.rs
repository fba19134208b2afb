//! `funcmesh testnet`: a local multi-process federation on loopback. Every node is a real
//! `funcmesh` process, and every step (federation create, institution create, admit, invite, join)
//! runs the same commands a user would type.
//!
//! `DIR/testnet.json` lists the coordinator and the nodes (name, institution, role, data dir,
//! peer id, API address, listen addresses, process id) and the institutions' key files.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh::membership::Role;
use serde::{Deserialize, Serialize};

use clap::Subcommand;

use crate::client::Client;
use crate::datadir::{DataDir, read_json, write_json_atomic};
use crate::ops;
use crate::ops::parse_member_role;

/// `testnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Testnet {
    /// Format version.
    pub version: u32,
    /// The federation's id.
    pub federation_id: String,
    /// The coordinator.
    pub coordinator: NodeEntry,
    /// The member nodes.
    pub nodes: Vec<NodeEntry>,
    /// The institutions and their key files, so scripts can act as their admins.
    pub institutions: Vec<InstitutionEntry>,
}

/// One node of the testnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Name (`coordinator`, `a1`, `a2`, `b1`, …).
    pub name: String,
    /// Institution (none for the coordinator).
    pub institution: Option<String>,
    /// Role.
    pub role: Role,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Peer id.
    pub peer_id: String,
    /// API URL.
    pub api: String,
    /// Mesh addresses.
    pub listen_addrs: Vec<String>,
    /// Process id.
    pub pid: u32,
}

/// One institution of the testnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstitutionEntry {
    /// Name.
    pub name: String,
    /// Secret key file.
    pub key: PathBuf,
    /// Public key file.
    pub public_key: PathBuf,
    /// Admission certificate.
    pub admission: PathBuf,
}

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a `testnet` subcommand.
pub async fn run(cmd: TestnetCommand) -> anyhow::Result<()> {
    match cmd {
        TestnetCommand::Up {
            dir,
            institutions,
            nodes_per_institution,
            role,
            endpoint_policy,
            runtimes,
        } => {
            let endpoint = ops::TestnetEndpoint {
                policy: endpoint_policy,
                runtimes: runtimes
                    .split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect(),
            };
            let net = up(&dir, institutions, nodes_per_institution, role, &endpoint).await?;
            print_table(&net, &dir).await;
            println!(
                "testnet up: {}/testnet.json; stop it with `funcmesh testnet down --dir {}`",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        TestnetCommand::Status { dir, json } => {
            let net = load(&dir)?;
            if json {
                let mut rows = Vec::new();
                for n in all_nodes(&net) {
                    let members = members_of(n).await.ok();
                    rows.push(serde_json::json!({
                        "name": n.name, "running": alive(n.pid), "pid": n.pid,
                        "peer_id": n.peer_id, "members": members,
                    }));
                }
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&net, &dir).await;
            }
            Ok(())
        }
        TestnetCommand::Down { dir } => {
            let net = load(&dir)?;
            let stopped = down(&net).await;
            println!("stopped {stopped} node(s)");
            Ok(())
        }
        TestnetCommand::Kill { node, dir } => {
            let net = load(&dir)?;
            let n = find(&net, &node)?;
            kill(n.pid, libc::SIGKILL);
            wait_dead(n.pid, Duration::from_secs(10)).await?;
            println!("killed {} (pid {})", n.name, n.pid);
            Ok(())
        }
        TestnetCommand::Restart { node, dir } => {
            let net = restart(&dir, &node).await?;
            let n = find(&net, &node)?;
            println!("restarted {} (pid {})", n.name, n.pid);
            Ok(())
        }
    }
}

/// Reads `DIR/testnet.json`.
pub fn load(dir: &Path) -> anyhow::Result<Testnet> {
    let path = dir.join("testnet.json");
    if !path.exists() {
        bail!(
            "no testnet in {}: start one with `funcmesh testnet up --dir {0}`",
            dir.display()
        );
    }
    read_json(&path)
}

fn all_nodes(net: &Testnet) -> impl Iterator<Item = &NodeEntry> {
    std::iter::once(&net.coordinator).chain(net.nodes.iter())
}

fn find<'a>(net: &'a Testnet, name: &str) -> anyhow::Result<&'a NodeEntry> {
    all_nodes(net).find(|n| n.name == name).with_context(|| {
        let names: Vec<&str> = all_nodes(net).map(|n| n.name.as_str()).collect();
        format!(
            "no node `{name}` in this testnet (nodes: {})",
            names.join(", ")
        )
    })
}

/// The `funcmesh` executable: `FUNCMESH_BIN` if set (benchmarks and examples), else this one.
fn exe() -> anyhow::Result<PathBuf> {
    match std::env::var_os("FUNCMESH_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().context("cannot find the funcmesh executable"),
    }
}

/// Runs a short `funcmesh` command and returns its stdout.
fn funcmesh(args: &[&str]) -> anyhow::Result<String> {
    let out = Proc::new(exe()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run funcmesh {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`funcmesh {}` failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Spawns a long-running `funcmesh` process in its own process group, logging to `log`.
fn spawn_daemon(args: &[&str], log: &Path) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = file.try_clone().context("log file")?;
    Proc::new(exe()?)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start funcmesh {}", args.join(" ")))
}

/// Waits until the daemon of `dir` (process `child`) has written `api.json` (and, when asked,
/// `membership.json`), and returns its entry.
async fn wait_started(
    child: &mut std::process::Child,
    dir: &DataDir,
    needs_membership: bool,
    log: &Path,
) -> anyhow::Result<(String, String, Vec<String>)> {
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for node")? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            bail!("node {} exited ({status}): {last}", dir.root().display());
        }
        let ready = dir.api().exists() && (!needs_membership || dir.membership().exists());
        if ready {
            if let Ok(info) = dir.read_api() {
                if info.pid == pid {
                    let client = Client::for_node(dir)?;
                    if let Ok(st) = client.status().await {
                        if !st.listen_addrs.is_empty() {
                            return Ok((st.peer_id, info.url, st.listen_addrs));
                        }
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not start within {START_TIMEOUT:?}; see {}",
                dir.root().display(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Brings a testnet up.
pub async fn up(
    dir: &Path,
    institutions: usize,
    per: usize,
    role: Role,
    endpoint: &ops::TestnetEndpoint,
) -> anyhow::Result<Testnet> {
    if institutions == 0 || institutions > 26 {
        bail!("--institutions must be between 1 and 26");
    }
    if let Ok(net) = load(dir) {
        if all_nodes(&net).any(|n| alive(n.pid)) {
            bail!(
                "a testnet is already running in {0}; stop it with `funcmesh testnet down --dir {0}`",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize().context("testnet dir")?;
    let mut started: Vec<u32> = Vec::new();
    let result = build(&dir, institutions, per, role, endpoint, &mut started).await;
    if result.is_err() {
        for pid in started {
            kill(pid, libc::SIGKILL);
        }
    }
    result
}

async fn build(
    dir: &Path,
    institutions: usize,
    per: usize,
    role: Role,
    endpoint: &ops::TestnetEndpoint,
    started: &mut Vec<u32>,
) -> anyhow::Result<Testnet> {
    let coord_dir = DataDir::new(dir.join("coordinator"));
    funcmesh(&[
        "federation",
        "create",
        "--name",
        "testnet",
        "--data-dir",
        s(coord_dir.root()),
    ])?;
    let log = coord_dir.root().join("node.log");
    let mut child = spawn_daemon(&["start", "--data-dir", s(coord_dir.root())], &log)?;
    started.push(child.id());
    let (peer_id, api, listen_addrs) = wait_started(&mut child, &coord_dir, false, &log).await?;
    let federation_id = coord_dir
        .read_federation()?
        .map(|f| f.id.to_string())
        .unwrap_or_default();
    let coord_addr = listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .or(listen_addrs.first())
        .cloned()
        .context("the coordinator has no listen address")?;
    let coordinator = NodeEntry {
        name: "coordinator".into(),
        institution: None,
        role: Role::Coordinator,
        data_dir: coord_dir.root().to_path_buf(),
        peer_id,
        api,
        listen_addrs,
        pid: child.id(),
    };
    let inst_dir = dir.join("institutions");
    std::fs::create_dir_all(&inst_dir).context("institutions dir")?;
    let mut insts = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..institutions {
        let letter = (b'a' + i as u8) as char;
        let name = format!("inst-{letter}");
        let key = inst_dir.join(format!("{name}.key"));
        let admission = inst_dir.join(format!("{name}.admission.json"));
        funcmesh(&["institution", "create", "--name", &name, "--out", s(&key)])?;
        let public_key = mesh::keys::pub_path(&key);
        funcmesh(&[
            "federation",
            "admit",
            "--federation-key",
            s(&coord_dir.federation_key()),
            "--institution",
            s(&public_key),
            "--out",
            s(&admission),
        ])?;
        for j in 1..=per {
            let node_name = format!("{letter}{j}");
            let invite = funcmesh(&[
                "invite",
                "create",
                "--institution-key",
                s(&key),
                "--admission",
                s(&admission),
                "--role",
                &role.to_string(),
                "--ttl",
                "10m",
            ])?;
            let ndir = DataDir::new(dir.join(&node_name));
            std::fs::create_dir_all(ndir.root()).context("node dir")?;
            let mut config = ops::testnet_config(&node_name, &name, role, endpoint);
            // Each endpoint exposes `<node dir>/data` to transfers.
            for e in &mut config.endpoint {
                let data = ndir.root().join("data");
                std::fs::create_dir_all(&data).context("data root")?;
                e.data_root = Some(data);
            }
            ops::write_config(&ndir, &config)?;
            let log = ndir.root().join("node.log");
            let mut child = spawn_daemon(
                &[
                    "join",
                    &coord_addr,
                    "--invite",
                    &invite,
                    "--data-dir",
                    s(ndir.root()),
                ],
                &log,
            )?;
            started.push(child.id());
            let (peer_id, api, listen_addrs) = wait_started(&mut child, &ndir, true, &log).await?;
            nodes.push(NodeEntry {
                name: node_name,
                institution: Some(name.clone()),
                role,
                data_dir: ndir.root().to_path_buf(),
                peer_id,
                api,
                listen_addrs,
                pid: child.id(),
            });
        }
        insts.push(InstitutionEntry {
            name,
            key,
            public_key,
            admission,
        });
    }
    let net = Testnet {
        version: 1,
        federation_id,
        coordinator,
        nodes,
        institutions: insts,
    };
    write_json_atomic(&dir.join("testnet.json"), &net, 0o644)?;
    wait_converged(&net, START_TIMEOUT).await?;
    Ok(net)
}

async fn members_of(n: &NodeEntry) -> anyhow::Result<Vec<String>> {
    let client = Client::for_node(&DataDir::new(&n.data_dir))?;
    Ok(client
        .peers()
        .await?
        .into_iter()
        .map(|p| p.peer_id)
        .collect())
}

/// Waits until every running node lists every other running node as a member.
pub async fn wait_converged(net: &Testnet, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let running: Vec<&NodeEntry> = all_nodes(net).filter(|n| alive(n.pid)).collect();
        let mut missing = None;
        for n in &running {
            let members = members_of(n).await.unwrap_or_default();
            if let Some(m) = running
                .iter()
                .find(|o| o.name != n.name && !members.contains(&o.peer_id))
            {
                missing = Some((n.name.clone(), m.name.clone()));
                break;
            }
        }
        let Some((who, whom)) = missing else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!("the testnet did not converge within {timeout:?}: {who} does not list {whom}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops every node: SIGTERM, then SIGKILL after 10 s. Returns how many were running.
pub async fn down(net: &Testnet) -> usize {
    let running: Vec<u32> = all_nodes(net)
        .map(|n| n.pid)
        .filter(|p| alive(*p))
        .collect();
    for pid in &running {
        kill(*pid, libc::SIGTERM);
    }
    for pid in &running {
        if wait_dead(*pid, Duration::from_secs(10)).await.is_err() {
            kill(*pid, libc::SIGKILL);
            let _ = wait_dead(*pid, Duration::from_secs(5)).await;
        }
    }
    running.len()
}

/// Restarts one node from its data dir and records its new process in `testnet.json`.
pub async fn restart(dir: &Path, name: &str) -> anyhow::Result<Testnet> {
    let mut net = load(dir)?;
    let entry = find(&net, name)?.clone();
    if alive(entry.pid) {
        kill(entry.pid, libc::SIGTERM);
        if wait_dead(entry.pid, Duration::from_secs(10)).await.is_err() {
            kill(entry.pid, libc::SIGKILL);
            wait_dead(entry.pid, Duration::from_secs(5)).await?;
        }
    }
    let ndir = DataDir::new(&entry.data_dir);
    let _ = std::fs::remove_file(ndir.api());
    let log = ndir.root().join("node.log");
    let mut child = spawn_daemon(&["start", "--data-dir", s(ndir.root())], &log)?;
    let (peer_id, api, listen_addrs) = wait_started(&mut child, &ndir, false, &log).await?;
    let updated = NodeEntry {
        peer_id,
        api,
        listen_addrs,
        pid: child.id(),
        ..entry
    };
    if updated.name == "coordinator" {
        net.coordinator = updated;
    } else if let Some(n) = net.nodes.iter_mut().find(|n| n.name == name) {
        *n = updated;
    }
    write_json_atomic(&dir.join("testnet.json"), &net, 0o644)?;
    Ok(net)
}

async fn print_table(net: &Testnet, _dir: &Path) {
    println!("federation {}", net.federation_id);
    println!(
        "{:<12} {:<12} {:<12} {:>8} {:>8}  PEER",
        "NODE", "ROLE", "INSTITUTION", "PID", "MEMBERS"
    );
    for n in all_nodes(net) {
        let members = if alive(n.pid) {
            members_of(n)
                .await
                .map(|m| m.len().to_string())
                .unwrap_or_else(|_| "?".into())
        } else {
            "down".into()
        };
        println!(
            "{:<12} {:<12} {:<12} {:>8} {:>8}  {}",
            n.name,
            n.role.to_string(),
            n.institution.as_deref().unwrap_or("-"),
            n.pid,
            members,
            n.peer_id
        );
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Sends a signal to a process.
pub fn kill(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, signal);
    }
}

async fn wait_dead(pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} still runs after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `funcmesh testnet …`.
#[derive(Debug, Subcommand)]
pub enum TestnetCommand {
    /// Start a coordinator and the members of N institutions as local processes.
    Up {
        /// The testnet's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Number of institutions.
        #[arg(long, default_value_t = 2)]
        institutions: usize,
        /// Member nodes per institution.
        #[arg(long, default_value_t = 2)]
        nodes_per_institution: usize,
        /// Role of the member nodes.
        #[arg(long, default_value = "endpoint", value_parser = parse_member_role)]
        role: Role,
        /// Access policy of each node's endpoint: institution-and-capability, institution,
        /// federation or capability.
        #[arg(long, default_value = "institution-and-capability")]
        endpoint_policy: String,
        /// Runtimes each endpoint offers, comma-separated (host, docker, podman, apptainer).
        #[arg(long, default_value = "host")]
        runtimes: String,
    },
    /// Show the testnet's nodes and whether they run.
    Status {
        /// The testnet's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop every node of the testnet.
    Down {
        /// The testnet's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// SIGKILL one node.
    Kill {
        /// Node name (`coordinator`, `a1`, …).
        node: String,
        /// The testnet's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Restart one node (killed or not) from its data dir.
    Restart {
        /// Node name.
        node: String,
        /// The testnet's directory.
        #[arg(long)]
        dir: PathBuf,
    },
}
