//! The federation operations behind the CLI verbs, as library functions so that tests and the
//! in-process testnet take exactly the path a user takes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh::keys::{self, KeyKind};
use mesh::membership::{Admission, Federation, Genesis, Invite, Proof, Role, SigningKey, unix_now};
use mesh::{Multiaddr, PeerId};

use crate::config::Config;
use crate::daemon::Node;
use crate::datadir::{DataDir, read_json, write_atomic, write_json_atomic};

/// Initialises a data dir: node key (mode 0600) and a default `config.toml`. Idempotent: an
/// existing key is kept.
pub fn init(dir: &DataDir, name: Option<&str>) -> anyhow::Result<PeerId> {
    dir.create()?;
    let key = if dir.node_key().exists() {
        keys::read_node_key(&dir.node_key())?
    } else {
        keys::create_node_key(&dir.node_key())?
    };
    if !dir.config().exists() {
        let mut config = Config::default();
        if let Some(name) = name {
            config.node.name = name.to_string();
        }
        write_atomic(&dir.config(), config.to_toml().as_bytes(), 0o644)?;
    }
    Ok(key.public().to_peer_id())
}

/// Writes a node's `config.toml` (creating the data dir), replacing any there.
pub fn write_config(dir: &DataDir, config: &Config) -> anyhow::Result<()> {
    dir.create()?;
    write_atomic(&dir.config(), config.to_toml().as_bytes(), 0o644)
}

/// The configuration testnets give a node: its name and, for endpoint nodes, one endpoint
/// named after it and tagged with its institution.
pub fn testnet_config(
    node_name: &str,
    institution: &str,
    role: mesh::membership::Role,
    endpoint: &TestnetEndpoint,
) -> Config {
    let mut config = Config::default();
    config.node.name = node_name.to_string();
    // Local testnets lose nodes on purpose; notice it quickly.
    config.mesh.endpoint_lost_after = std::time::Duration::from_secs(3);
    if role == mesh::membership::Role::Endpoint {
        config.endpoint.push(crate::config::EndpointSection {
            name: node_name.to_string(),
            description: format!("testnet endpoint of {node_name} ({institution})"),
            tags: [("institution".to_string(), institution.to_string())].into(),
            policy: endpoint.policy.clone(),
            runtimes: endpoint.runtimes.clone(),
            // A local testnet's "institutions" are one person's processes: when its workers
            // cannot get uids of their own (not root), its endpoints still take each other's
            // host tasks, and `endpoint show` says so.
            foreign_host_tasks: true,
            ..Default::default()
        });
    }
    config
}

/// What a testnet gives each endpoint node's endpoint.
#[derive(Debug, Clone)]
pub struct TestnetEndpoint {
    /// Access policy.
    pub policy: String,
    /// Runtimes offered.
    pub runtimes: Vec<String>,
}

impl Default for TestnetEndpoint {
    fn default() -> Self {
        TestnetEndpoint {
            policy: "institution-and-capability".into(),
            runtimes: vec!["host".into()],
        }
    }
}

/// Sets one `[mesh]` list in the data dir's `config.toml`, keeping everything else.
pub fn set_config_list(dir: &DataDir, key: &str, values: &[String]) -> anyhow::Result<()> {
    let path = dir.config();
    let mut table: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{} is not valid TOML", path.display()))?,
        Err(_) => toml::Table::new(),
    };
    let mesh = table
        .entry("mesh")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .with_context(|| format!("{}: [mesh] is not a table", path.display()))?;
    mesh.insert(
        key.to_string(),
        toml::Value::Array(
            values
                .iter()
                .map(|v| toml::Value::String(v.clone()))
                .collect(),
        ),
    );
    write_atomic(&path, toml::to_string_pretty(&table)?.as_bytes(), 0o644)
}

/// Creates a federation whose coordinator is the node of `dir`: the root key at
/// `dir/federation.key`, the genesis, and the coordinator's certificate.
pub fn federation_create(
    dir: &DataDir,
    name: &str,
    listen: &[String],
) -> anyhow::Result<Federation> {
    if let Some(existing) = dir.read_federation()? {
        bail!(
            "{} already belongs to federation {} ({}); use another --data-dir",
            dir.root().display(),
            existing.name,
            existing.id
        );
    }
    let peer = init(dir, Some("coordinator"))?;
    if !listen.is_empty() {
        set_config_list(dir, "listen", listen)?;
    }
    let key = SigningKey::generate();
    let now = unix_now();
    let federation = Genesis::create(name, &key, now)
        .verify()
        .context("fresh genesis")?;
    keys::write_signing_key(&dir.federation_key(), KeyKind::Federation, name, &key)?;
    let proof = Proof::coordinator(&federation, &key, peer, now);
    dir.write_membership(&federation, &proof)?;
    Ok(federation)
}

/// Creates an institution key pair at `out` (secret, 0600) and `out.pub`.
pub fn institution_create(name: &str, out: &Path) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        bail!("an institution needs a non-empty --name");
    }
    keys::write_signing_key(out, KeyKind::Institution, name, &SigningKey::generate())?;
    Ok(())
}

/// Signs an institution's admission with the federation key. The genesis is read from `genesis`,
/// or from `federation.json` next to the key (where `federation create` puts both).
pub fn federation_admit(
    federation_key: &Path,
    genesis: Option<&Path>,
    institution_pub: &Path,
) -> anyhow::Result<Admission> {
    let (_, key) = keys::read_signing_key(federation_key, KeyKind::Federation)?;
    let genesis_path = match genesis {
        Some(p) => p.to_path_buf(),
        None => federation_key.with_file_name("federation.json"),
    };
    let genesis: Genesis = read_json(&genesis_path)
        .with_context(|| "the federation's genesis is needed; pass it with --genesis")?;
    let federation = genesis.verify()?;
    if federation.key != key.public() {
        bail!(
            "{} is not the key of federation {} ({})",
            federation_key.display(),
            federation.name,
            federation.id
        );
    }
    let inst = keys::read_public_key(institution_pub, KeyKind::Institution)?;
    Ok(Admission::issue(
        &federation,
        &key,
        &inst.name,
        inst.public_key,
        unix_now(),
    ))
}

/// Writes an admission certificate.
pub fn write_admission(path: &Path, admission: &Admission) -> anyhow::Result<()> {
    write_json_atomic(path, admission, 0o644)
}

/// Issues an invite string with an institution key and its admission certificate.
pub fn invite_create(
    institution_key: &Path,
    admission: &Path,
    role: Role,
    ttl: Duration,
) -> anyhow::Result<String> {
    let (_, key) = keys::read_signing_key(institution_key, KeyKind::Institution)?;
    let admission: Admission = read_json(admission)?;
    let invite = Invite::issue(&admission, &key, role, ttl, unix_now())
        .with_context(|| format!("cannot invite with {}", institution_key.display()))?;
    Ok(invite.encode())
}

/// Joins `dir` to the federation of `invite` through the coordinator at `coordinator`: checks the
/// invite, binds it to the node's identity, proves membership to the coordinator, and only then
/// stores the federation, the proof and the coordinator's address. Returns the running node.
pub async fn join(
    dir: &DataDir,
    coordinator: &str,
    invite: &str,
    overrides: &[String],
    timeout: Duration,
) -> anyhow::Result<Node> {
    let addr: Multiaddr = coordinator.parse().map_err(|e| {
        anyhow::anyhow!(
            "`{coordinator}` is not a multiaddr ({e}); use the coordinator's address as \
             `funcmesh status` prints it, e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo…"
        )
    })?;
    let invite = Invite::decode(invite).context("cannot use this invite")?;
    let federation = invite.federation().context("cannot use this invite")?;
    if let Some(existing) = dir.read_federation()? {
        if existing.id != federation.id {
            bail!(
                "{} belongs to federation {} ({}), but the invite is for {} ({}); use a new --data-dir",
                dir.root().display(),
                existing.name,
                existing.id,
                federation.name,
                federation.id
            );
        }
        if dir.membership().exists() {
            bail!(
                "{0} is already a member of federation {1}; start it with `funcmesh start --data-dir {0}`",
                dir.root().display(),
                federation.name
            );
        }
    }
    init(dir, None)?;
    let keypair = keys::read_node_key(&dir.node_key())?;
    let (federation, joining) =
        Proof::bind(&invite, &keypair, unix_now()).context("cannot use this invite")?;
    let config = Config::resolve(Some(&dir.config()), std::env::vars(), overrides)?;
    let proof =
        admitted_by_coordinator(dir, &config, &federation, keypair, joining, &addr, timeout)
            .await
            .with_context(|| format!("joining through {addr} failed"))?;
    dir.write_membership(&federation, &proof)?;
    let node = Node::start_with(dir, &config, federation.clone(), proof.clone()).await?;
    if let Err(e) = node.mesh().join(addr.clone(), timeout).await {
        let _ = node.shutdown().await;
        return Err(anyhow::anyhow!("joining through {addr} failed: {e}"));
    }
    set_config_list(dir, "bootstrap", &[addr.to_string()])?;
    Ok(node)
}

/// The first step of joining: a bare mesh presents the joining proof to the coordinator, which
/// checks it (fresh, invite valid by its clock and unused) and answers with its receipt. The node
/// itself starts only with the admitted proof, so that everything it publishes counts.
async fn admitted_by_coordinator(
    dir: &DataDir,
    config: &Config,
    federation: &Federation,
    keypair: mesh::Keypair,
    joining: Proof,
    coordinator: &Multiaddr,
    timeout: Duration,
) -> anyhow::Result<Proof> {
    let db = dir.db();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&db))
        .await
        .context("store task")?
        .map_err(|e| anyhow::anyhow!("{e} (is a node already running on this data dir?)"))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let mesh_config = mesh::Config {
        keypair,
        federation: federation.clone(),
        proof: joining,
        listen: vec![],
        bootstrap: vec![],
        relay_server: false,
        reserve_relay: false,
        proof_timeout: config.mesh.proof_timeout,
        redial_interval: config.mesh.redial_interval,
        anti_entropy: config.mesh.anti_entropy,
        max_connections: config.mesh.max_connections,
        idle_after: config.mesh.idle_after,
        store,
        checkpoint: None,
    };
    let outcome = match mesh::network::spawn(mesh_config, cancel.child_token(), &tracker).await {
        Ok(mesh) => mesh
            .join_as_new(coordinator.clone(), timeout)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    outcome
}

pub(crate) fn parse_member_role(s: &str) -> Result<Role, String> {
    match s.parse()? {
        Role::Coordinator => Err("coordinators are created by `federation create`".into()),
        r => Ok(r),
    }
}
