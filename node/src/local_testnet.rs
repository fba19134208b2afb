//! `funcmesh testnet`: a local federation whose nodes run as processes on loopback, or with
//! `--docker` as containers on private docker networks. Both take one setup path: every step
//! (federation create, institution create, admit, invite, join and, with `--grants`, a capability
//! grant from each institution to every other) runs the same commands a user would type, and both
//! record the same `DIR/testnet.json`; only how a node is started and stopped differs
//! (`local_testnet/process.rs`, [`docker`]).
//!
//! `DIR/testnet.json` lists the coordinator and the nodes (name, institution, role, data dir,
//! peer id, API address, listen addresses, process id and, for containers, the container), the
//! institutions' key files and the grants.

pub mod docker;
mod process;

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh::membership::Role;
use serde::{Deserialize, Serialize};

use clap::Subcommand;

use crate::client::Client;
use crate::config::Config;
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
    /// Capability grants made at setup (`--grants`).
    #[serde(default)]
    pub grants: Vec<GrantEntry>,
    /// Set when the nodes are containers (`--docker`): the compose project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<docker::ComposeEntry>,
}

/// A capability grant made at setup: `from` lets `to` use `endpoint`, and every node of `to`
/// holds the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantEntry {
    /// The granting institution.
    pub from: String,
    /// The receiving institution.
    pub to: String,
    /// The endpoint (its name).
    pub endpoint: String,
    /// What it allows.
    pub abilities: Vec<String>,
    /// The token's file.
    pub token: PathBuf,
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
    /// Process id (on this machine: for a container, its init process).
    pub pid: u32,
    /// The container, when the node runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
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

/// Where `funcmesh testnet` keeps a testnet when no `--dir` is given (in the current directory).
const DEFAULT_DIR: &str = "funcmesh-testnet";

/// What a testnet is made of: institutions, each a list of its nodes' roles; what each endpoint
/// offers; whether each institution grants every other the use of its endpoints.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One entry per institution (`inst-a`, `inst-b`, …): its nodes' roles (`a1`, `a2`, …).
    pub institutions: Vec<Vec<Role>>,
    /// What each endpoint node's endpoint offers.
    pub endpoint: ops::TestnetEndpoint,
    /// Each institution grants every other `compute.run`, `transfer.read` and `transfer.write`
    /// on each of its endpoints, and every node of the receiver holds the token.
    pub grants: bool,
}

impl Plan {
    /// `institutions` institutions of `per` nodes of one role.
    pub fn uniform(
        institutions: usize,
        per: usize,
        role: Role,
        endpoint: &ops::TestnetEndpoint,
    ) -> Plan {
        Plan {
            institutions: vec![vec![role; per]; institutions],
            endpoint: endpoint.clone(),
            grants: false,
        }
    }
}

/// Runs a `testnet` subcommand.
pub async fn run(cmd: TestnetCommand) -> anyhow::Result<()> {
    match cmd {
        TestnetCommand::Up {
            dir,
            docker,
            institutions,
            nodes_per_institution,
            role,
            endpoint_policy,
            runtimes,
            grants,
        } => {
            let endpoint = ops::TestnetEndpoint {
                policy: endpoint_policy,
                runtimes: runtimes
                    .split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect(),
            };
            let net = if docker {
                if institutions != 2 || nodes_per_institution != 2 || role != Role::Endpoint {
                    bail!(
                        "the container testnet has a fixed layout (inst-a: a1, a2 endpoints; \
                         inst-b: b1 endpoint, b2 client); drop --institutions, \
                         --nodes-per-institution and --role"
                    );
                }
                up_docker(&dir, &endpoint).await?
            } else {
                let mut plan = Plan::uniform(institutions, nodes_per_institution, role, &endpoint);
                plan.grants = grants;
                up_with(&dir, &plan, Launcher::Process).await?
            };
            print_table(&net).await;
            let docker = if docker { " --docker" } else { "" };
            println!(
                "testnet up: {}/testnet.json; stop it with `funcmesh testnet down{docker} --dir {}`",
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
                        "container": n.container,
                        "peer_id": n.peer_id, "members": members,
                    }));
                }
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&net).await;
            }
            Ok(())
        }
        TestnetCommand::Down { dir, docker } => {
            if docker {
                docker::down(&dir).await?;
                println!("removed the container testnet's containers and networks");
                return Ok(());
            }
            let net = load(&dir)?;
            if net.docker.is_some() {
                bail!(
                    "{} is a container testnet: stop it with `funcmesh testnet down --docker --dir {0}`",
                    dir.display()
                );
            }
            let stopped = down(&net).await;
            println!("stopped {stopped} node(s)");
            Ok(())
        }
        TestnetCommand::Kill { node, dir } => {
            let net = load(&dir)?;
            let n = find(&net, &node)?;
            Launcher::of(&net).stop(n, true).await?;
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

/// The coordinator, then the members.
pub fn all_nodes(net: &Testnet) -> impl Iterator<Item = &NodeEntry> {
    std::iter::once(&net.coordinator).chain(net.nodes.iter())
}

/// The node called `name`.
pub fn find<'a>(net: &'a Testnet, name: &str) -> anyhow::Result<&'a NodeEntry> {
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
            args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// How the nodes of a testnet run.
pub(crate) enum Launcher {
    /// Local processes on loopback.
    Process,
    /// Containers of the compose project in the testnet's directory.
    Docker(docker::Compose),
}

/// How a node starts.
enum Start<'a> {
    /// From its data dir (the coordinator after `federation create`, or a restart).
    Start,
    /// `funcmesh join ADDR --invite INVITE`.
    Join { addr: &'a str, invite: &'a str },
}

/// A node just started: its process and, for a container, the container.
struct Started {
    pid: u32,
    container: Option<String>,
    /// The process that owns the node's `api.json` (a container's node has a pid of its own
    /// namespace, so any fresh `api.json` counts).
    api_pid: Option<u32>,
    child: Option<std::process::Child>,
}

impl Started {
    /// Why the node is gone, if it is.
    fn exited(&mut self) -> Option<String> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            },
            None => (!alive(self.pid)).then(|| "its container stopped".to_string()),
        }
    }
}

impl Launcher {
    fn of(net: &Testnet) -> Launcher {
        match &net.docker {
            Some(entry) => Launcher::Docker(docker::Compose::from_entry(entry)),
            None => Launcher::Process,
        }
    }

    /// Sets what a node's configuration needs to run this way (its listen addresses).
    fn configure(&self, name: &str, config: &mut Config) -> anyhow::Result<()> {
        match self {
            Launcher::Process => Ok(()),
            Launcher::Docker(c) => c.configure(name, config),
        }
    }

    /// The coordinator's address as the node `name` should dial it.
    fn coordinator_addr(&self, name: &str, coordinator: &NodeEntry) -> anyhow::Result<String> {
        match self {
            Launcher::Process => coordinator
                .listen_addrs
                .iter()
                .find(|a| a.contains("/tcp/"))
                .or(coordinator.listen_addrs.first())
                .cloned()
                .context("the coordinator has no listen address"),
            Launcher::Docker(c) => c.coordinator_addr(name, coordinator),
        }
    }

    async fn start(&self, name: &str, dir: &DataDir, how: Start<'_>) -> anyhow::Result<Started> {
        let _ = std::fs::remove_file(dir.api());
        match self {
            Launcher::Process => process::start(dir, how),
            Launcher::Docker(c) => c.start(name, dir, how).await,
        }
    }

    /// Stops a node: gracefully (SIGTERM, then SIGKILL after 10 s) or, with `kill`, at once.
    pub(crate) async fn stop(&self, node: &NodeEntry, kill_now: bool) -> anyhow::Result<()> {
        match (self, &node.container) {
            (Launcher::Docker(c), Some(container)) => c.stop(container, kill_now).await,
            _ => process::stop(node.pid, kill_now).await,
        }
    }
}

/// Waits until the node of `dir` has written `api.json` (and, when asked, `membership.json`) and
/// answers on its API, and returns its peer id, API URL and listen addresses.
async fn wait_started(
    started: &mut Started,
    dir: &DataDir,
    needs_membership: bool,
) -> anyhow::Result<(String, String, Vec<String>)> {
    let log = dir.root().join("node.log");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = started.exited() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
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
                if started.api_pid.is_none_or(|p| p == info.pid) {
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

/// Brings a testnet of local processes up.
pub async fn up(
    dir: &Path,
    institutions: usize,
    per: usize,
    role: Role,
    endpoint: &ops::TestnetEndpoint,
) -> anyhow::Result<Testnet> {
    up_with(
        dir,
        &Plan::uniform(institutions, per, role, endpoint),
        Launcher::Process,
    )
    .await
}

/// Brings the container testnet up: builds its image, writes its compose project to `dir` and
/// sets the federation up with the same steps as the process testnet, with grants.
pub async fn up_docker(dir: &Path, endpoint: &ops::TestnetEndpoint) -> anyhow::Result<Testnet> {
    let plan = Plan {
        institutions: vec![
            vec![Role::Endpoint, Role::Endpoint],
            vec![Role::Endpoint, Role::Client],
        ],
        endpoint: endpoint.clone(),
        grants: true,
    };
    prepare_dir(dir, true).await?;
    let dir = dir.canonicalize().context("testnet dir")?;
    let compose = docker::Compose::prepare(&dir, &exe()?).await?;
    up_with(&dir, &plan, Launcher::Docker(compose)).await
}

async fn prepare_dir(dir: &Path, docker: bool) -> anyhow::Result<()> {
    if let Ok(net) = load(dir) {
        if net.docker.is_some() && !docker {
            bail!(
                "{0} holds a container testnet; remove it with `funcmesh testnet down --docker --dir {0}`",
                dir.display()
            );
        }
        if net.docker.is_none() && all_nodes(&net).any(|n| alive(n.pid)) {
            bail!(
                "a testnet is already running in {0}; stop it with `funcmesh testnet down --dir {0}`",
                dir.display()
            );
        }
        if net.docker.is_some() {
            docker::down(dir).await?;
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Brings a testnet up with `launcher`.
pub(crate) async fn up_with(
    dir: &Path,
    plan: &Plan,
    launcher: Launcher,
) -> anyhow::Result<Testnet> {
    let n = plan.institutions.len();
    if n == 0 || n > 26 {
        bail!("--institutions must be between 1 and 26");
    }
    if matches!(launcher, Launcher::Process) {
        prepare_dir(dir, false).await?;
    }
    let dir = dir.canonicalize().context("testnet dir")?;
    let mut started: Vec<NodeEntry> = Vec::new();
    let result = build(&dir, plan, &launcher, &mut started).await;
    if result.is_err() {
        for node in &started {
            let _ = launcher.stop(node, true).await;
        }
    }
    result
}

async fn build(
    dir: &Path,
    plan: &Plan,
    launcher: &Launcher,
    started: &mut Vec<NodeEntry>,
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
    if let Launcher::Docker(_) = launcher {
        let mut config = Config::resolve(Some(&coord_dir.config()), std::iter::empty(), &[])?;
        launcher.configure("coordinator", &mut config)?;
        ops::write_config(&coord_dir, &config)?;
    }
    let coordinator = start_node(
        launcher,
        "coordinator",
        None,
        Role::Coordinator,
        &coord_dir,
        Start::Start,
        started,
    )
    .await?;
    let federation_id = coord_dir
        .read_federation()?
        .map(|f| f.id.to_string())
        .unwrap_or_default();
    let inst_dir = dir.join("institutions");
    std::fs::create_dir_all(&inst_dir).context("institutions dir")?;
    let mut insts = Vec::new();
    let mut nodes = Vec::new();
    for (i, roles) in plan.institutions.iter().enumerate() {
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
        for (j, role) in roles.iter().enumerate() {
            let node_name = format!("{letter}{}", j + 1);
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
            let mut config = ops::testnet_config(&node_name, &name, *role, &plan.endpoint);
            // Each endpoint exposes `<node dir>/data` to transfers.
            for e in &mut config.endpoint {
                let data = ndir.root().join("data");
                std::fs::create_dir_all(&data).context("data root")?;
                e.data_root = Some(data);
            }
            launcher.configure(&node_name, &mut config)?;
            ops::write_config(&ndir, &config)?;
            let addr = launcher.coordinator_addr(&node_name, &coordinator)?;
            let entry = start_node(
                launcher,
                &node_name,
                Some(&name),
                *role,
                &ndir,
                Start::Join {
                    addr: &addr,
                    invite: &invite,
                },
                started,
            )
            .await?;
            nodes.push(entry);
        }
        insts.push(InstitutionEntry {
            name,
            key,
            public_key,
            admission,
        });
    }
    let mut net = Testnet {
        version: 1,
        federation_id,
        coordinator,
        nodes,
        institutions: insts,
        grants: Vec::new(),
        docker: match launcher {
            Launcher::Docker(c) => Some(c.entry()),
            Launcher::Process => None,
        },
    };
    write_json_atomic(&dir.join("testnet.json"), &net, 0o644)?;
    wait_converged(&net, START_TIMEOUT).await?;
    wait_routable(&net, START_TIMEOUT).await?;
    if plan.grants {
        net.grants = grant_partners(dir, &net).await?;
        write_json_atomic(&dir.join("testnet.json"), &net, 0o644)?;
    }
    Ok(net)
}

async fn start_node(
    launcher: &Launcher,
    name: &str,
    institution: Option<&str>,
    role: Role,
    dir: &DataDir,
    how: Start<'_>,
    started: &mut Vec<NodeEntry>,
) -> anyhow::Result<NodeEntry> {
    let needs_membership = matches!(how, Start::Join { .. });
    let mut run = launcher.start(name, dir, how).await?;
    let mut entry = NodeEntry {
        name: name.to_string(),
        institution: institution.map(str::to_string),
        role,
        data_dir: dir.root().to_path_buf(),
        peer_id: String::new(),
        api: String::new(),
        listen_addrs: Vec::new(),
        pid: run.pid,
        container: run.container.clone(),
    };
    started.push(entry.clone());
    let (peer_id, api, listen_addrs) = wait_started(&mut run, dir, needs_membership).await?;
    entry.peer_id = peer_id;
    entry.api = api;
    entry.listen_addrs = listen_addrs;
    Ok(entry)
}

/// Each institution grants every other the use of each of its endpoints, through the CLI:
/// `cap grant` (names resolved through the endpoint's own node), then `cap add` on every node of
/// the receiver.
async fn grant_partners(dir: &Path, net: &Testnet) -> anyhow::Result<Vec<GrantEntry>> {
    let grants_dir = dir.join("grants");
    std::fs::create_dir_all(&grants_dir).context("grants dir")?;
    let abilities = ["compute.run", "transfer.read", "transfer.write"];
    let mut out = Vec::new();
    for from in &net.institutions {
        let endpoints = net
            .nodes
            .iter()
            .filter(|n| n.institution.as_deref() == Some(&from.name) && n.role == Role::Endpoint);
        for endpoint in endpoints {
            for to in net.institutions.iter().filter(|t| t.name != from.name) {
                let node = s(&endpoint.data_dir);
                // The grant names the receiver and the endpoint as the registry knows them.
                wait_registry_knows(endpoint, &to.name, &endpoint.name).await?;
                let mut args = vec![
                    "cap",
                    "grant",
                    "--issuer-key",
                    s(&from.key),
                    "--node",
                    node,
                    "--endpoint",
                    &endpoint.name,
                    "--ttl",
                    "30d",
                ];
                let to_arg = format!("institution:{}", to.name);
                args.extend(["--to", &to_arg]);
                for a in abilities {
                    args.extend(["--ability", a]);
                }
                let token = funcmesh(&args)?;
                let file = grants_dir.join(format!(
                    "{}-to-{}-{}.token",
                    from.name, to.name, endpoint.name
                ));
                std::fs::write(&file, format!("{token}\n"))
                    .with_context(|| format!("cannot write {}", file.display()))?;
                for holder in net
                    .nodes
                    .iter()
                    .filter(|n| n.institution.as_deref() == Some(&to.name))
                {
                    funcmesh(&["cap", "add", s(&file), "--node", s(&holder.data_dir)])?;
                }
                out.push(GrantEntry {
                    from: from.name.clone(),
                    to: to.name.clone(),
                    endpoint: endpoint.name.clone(),
                    abilities: abilities.iter().map(|a| a.to_string()).collect(),
                    token: file,
                });
            }
        }
    }
    Ok(out)
}

/// Waits until `node`'s registry lists the institution and the endpoint.
async fn wait_registry_knows(
    node: &NodeEntry,
    institution: &str,
    endpoint: &str,
) -> anyhow::Result<()> {
    let client = Client::for_node(&DataDir::new(&node.data_dir))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let insts = client.institutions().await.unwrap_or_default();
        let eps = client.endpoints().await.unwrap_or_default();
        if insts.iter().any(|i| i.name == institution)
            && eps.iter().any(|e| e.record.name == endpoint)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not list institution {institution} and endpoint {endpoint} after {START_TIMEOUT:?}",
                node.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The peer ids `n` lists as members.
pub async fn members_of(n: &NodeEntry) -> anyhow::Result<Vec<String>> {
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

/// Waits until every running node can route to every endpoint node: it lists their endpoints in
/// its registry and has heard their adverts (what a task needs to be accepted), so that the
/// testnet takes work the moment `up` returns.
pub async fn wait_routable(net: &Testnet, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let running: Vec<&NodeEntry> = all_nodes(net).filter(|n| alive(n.pid)).collect();
        let serving: Vec<&str> = running
            .iter()
            .filter(|n| n.role == Role::Endpoint)
            .map(|n| n.peer_id.as_str())
            .collect();
        let mut missing = None;
        for n in &running {
            let client = Client::for_node(&DataDir::new(&n.data_dir))?;
            let listed = client.endpoints().await.unwrap_or_default();
            let heard = client.adverts().await.unwrap_or_default();
            if let Some(m) = serving.iter().find(|p| {
                !listed.iter().any(|e| e.peer_id == **p) || !heard.iter().any(|a| a.peer_id == **p)
            }) {
                missing = Some((n.name.clone(), m.to_string()));
                break;
            }
        }
        let Some((who, whom)) = missing else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!(
                "the testnet's endpoints were not routable within {timeout:?}: {who} has not \
                 heard endpoint node {whom}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops every node of a process testnet: SIGTERM, then SIGKILL after 10 s. Returns how many
/// were running.
pub async fn down(net: &Testnet) -> usize {
    let running: Vec<u32> = all_nodes(net)
        .map(|n| n.pid)
        .filter(|p| alive(*p))
        .collect();
    for pid in &running {
        kill(*pid, libc::SIGTERM);
    }
    for pid in &running {
        if process::wait_dead(*pid, Duration::from_secs(10))
            .await
            .is_err()
        {
            kill(*pid, libc::SIGKILL);
            let _ = process::wait_dead(*pid, Duration::from_secs(5)).await;
        }
    }
    running.len()
}

/// Stops one node (SIGTERM, or SIGKILL with `kill_now`) and waits until it is gone.
pub async fn stop(dir: &Path, name: &str, kill_now: bool) -> anyhow::Result<()> {
    let net = load(dir)?;
    let entry = find(&net, name)?;
    Launcher::of(&net).stop(entry, kill_now).await
}

/// Restarts one node from its data dir and records its new process in `testnet.json`.
pub async fn restart(dir: &Path, name: &str) -> anyhow::Result<Testnet> {
    let mut net = load(dir)?;
    let entry = find(&net, name)?.clone();
    let launcher = Launcher::of(&net);
    launcher.stop(&entry, false).await?;
    let ndir = DataDir::new(&entry.data_dir);
    let mut run = launcher.start(name, &ndir, Start::Start).await?;
    let (peer_id, api, listen_addrs) = wait_started(&mut run, &ndir, false).await?;
    let updated = NodeEntry {
        peer_id,
        api,
        listen_addrs,
        pid: run.pid,
        container: run.container,
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

async fn print_table(net: &Testnet) {
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
    for g in &net.grants {
        println!(
            "grant: {} lets {} use endpoint {} ({}): {}",
            g.from,
            g.to,
            g.endpoint,
            g.abilities.join(", "),
            g.token.display()
        );
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    // Any of its threads still running. A killed process's first thread can be a zombie while
    // the others are still exiting, and the files they share (a store's lock among them) stay
    // open until the last is gone: the first thread's state alone says "dead" too soon.
    let running = |stat: &str| {
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z') | Some('X') | None)
    };
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| running(&stat))
        }),
        Err(_) => std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| running(&s)),
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

/// `funcmesh testnet …`.
#[derive(Debug, Subcommand)]
pub enum TestnetCommand {
    /// Start a coordinator and the members of N institutions as local processes or, with
    /// --docker, the container testnet (inst-a: a1, a2; inst-b: b1, b2) on docker networks.
    Up {
        /// The testnet's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Run the nodes as containers of a docker-compose project built locally (needs
        /// docker and docker-compose; the first build takes a few minutes).
        #[arg(long)]
        docker: bool,
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
        /// Each institution grants every other compute.run, transfer.read and transfer.write
        /// on its endpoints (always on with --docker).
        #[arg(long)]
        grants: bool,
    },
    /// Show the testnet's nodes and whether they run.
    Status {
        /// The testnet's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop every node of the testnet; with --docker, remove its containers and networks.
    Down {
        /// The testnet's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// The container testnet.
        #[arg(long)]
        docker: bool,
    },
    /// SIGKILL one node.
    Kill {
        /// Node name (`coordinator`, `a1`, …).
        node: String,
        /// The testnet's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Restart one node (killed or not) from its data dir.
    Restart {
        /// Node name.
        node: String,
        /// The testnet's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}
