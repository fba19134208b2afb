//! In-process federations for tests: a coordinator and member nodes with ephemeral identities,
//! temp data dirs and port 0, all built through the same operations a user's CLI runs
//! (`federation create`, `institution create`, `federation admit`, `invite create`, `join`).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let net = testnet::Federation::start(2, 2).await?;
//! testnet::wait_for("full mesh", Duration::from_secs(5), || net.fully_connected()).await?;
//! net.shutdown().await;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh::membership::Role;
use node::{Config, DataDir, Node, ops};

/// Waits until `check` returns true, polling every 20 ms, or fails after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An institution of the test federation.
#[derive(Debug, Clone)]
pub struct Institution {
    /// Its name.
    pub name: String,
    /// Its secret key file.
    pub key: PathBuf,
    /// Its admission certificate.
    pub admission: PathBuf,
}

/// A member slot: the node (when running) and where it lives.
pub struct Slot {
    /// Name (`a1`, `b2`, …).
    pub name: String,
    /// Institution index.
    pub institution: usize,
    /// Data dir.
    pub dir: DataDir,
    /// The running node, if any.
    pub node: Option<Node>,
}

/// An in-process federation.
pub struct Federation {
    tmp: tempfile::TempDir,
    coordinator_dir: DataDir,
    coordinator: Option<Node>,
    coordinator_addr: String,
    /// Institutions.
    pub institutions: Vec<Institution>,
    /// Member slots, in creation order.
    pub members: Vec<Slot>,
    /// Settings every joining member gets after the test configuration's (`section.key=value`,
    /// as `funcmesh join --set` takes them).
    pub join_overrides: Vec<String>,
    /// Changes to a joining member's configuration file before it joins (its name and
    /// institution given): its endpoints, say.
    pub member_config: Option<MemberConfig>,
    /// Per institution, the names given to joins so far, failed ones included: a failed join's
    /// node may still be shutting down in this process, holding its store.
    named: std::collections::HashMap<usize, usize>,
}

/// See [`Federation::member_config`].
pub type MemberConfig = std::sync::Arc<dyn Fn(&str, &str, &mut Config) + Send + Sync>;

/// Test configuration: quick proof timeouts and redials, loopback, port 0.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.mesh.proof_timeout = Duration::from_secs(2);
    c.mesh.redial_interval = Duration::from_millis(200);
    c.mesh.anti_entropy = Duration::from_secs(2);
    // Loopback: every node can dial every other; no relay reservations (their circuit
    // addresses would sit among the direct ones a test dials).
    c.mesh.reserve_relay = false;
    c
}

impl Federation {
    /// A coordinator and `per` endpoint nodes of each of `institutions` institutions.
    pub async fn start(institutions: usize, per: usize) -> anyhow::Result<Federation> {
        Federation::start_with(institutions, per, &[]).await
    }

    /// [`Federation::start`] with settings every member gets after the test configuration's
    /// (`mesh.anti_entropy=10s`, …): the simulation harness runs members with the defaults.
    pub async fn start_with(
        institutions: usize,
        per: usize,
        join_overrides: &[String],
    ) -> anyhow::Result<Federation> {
        // `RUST_LOG=mesh=debug cargo test …` shows the nodes' logs with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let tmp = tempfile::Builder::new()
            .prefix("funcmesh-testnet-")
            .tempdir()?;
        let coordinator_dir = DataDir::new(tmp.path().join("coordinator"));
        ops::federation_create(&coordinator_dir, "test", &[])?;
        let coordinator_config = if join_overrides.is_empty() {
            test_config()
        } else {
            Config::resolve(None, Vec::new(), &test_overrides(join_overrides))?
        };
        let coordinator = Node::start(&coordinator_dir, &coordinator_config).await?;
        let coordinator_addr = coordinator
            .dial_addrs()
            .await?
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .context("coordinator has no TCP address")?
            .to_string();
        let mut net = Federation {
            tmp,
            coordinator_dir,
            coordinator: Some(coordinator),
            coordinator_addr,
            institutions: Vec::new(),
            members: Vec::new(),
            join_overrides: join_overrides.to_vec(),
            member_config: None,
            named: Default::default(),
        };
        for i in 0..institutions {
            net.add_institution(&format!("inst-{}", (b'a' + i as u8) as char))?;
        }
        for i in 0..institutions {
            for _ in 0..per {
                net.add_member(i).await?;
            }
        }
        Ok(net)
    }

    /// The temp dir everything lives in.
    pub fn path(&self) -> &std::path::Path {
        self.tmp.path()
    }

    /// The federation's secret key file (the coordinator's): what signs admissions and
    /// revokes institutions.
    pub fn federation_key(&self) -> PathBuf {
        self.coordinator_dir.federation_key()
    }

    /// Creates and admits an institution; returns its index.
    pub fn add_institution(&mut self, name: &str) -> anyhow::Result<usize> {
        let key = self.tmp.path().join(format!("{name}.key"));
        ops::institution_create(name, &key)?;
        let admission = ops::federation_admit(
            &self.coordinator_dir.federation_key(),
            None,
            &mesh::keys::pub_path(&key),
        )?;
        let adm_path = self.tmp.path().join(format!("{name}.admission.json"));
        ops::write_admission(&adm_path, &admission)?;
        self.institutions.push(Institution {
            name: name.into(),
            key,
            admission: adm_path,
        });
        Ok(self.institutions.len() - 1)
    }

    /// An invite of institution `i`.
    pub fn invite(&self, i: usize, role: Role, ttl: Duration) -> anyhow::Result<String> {
        let inst = &self.institutions[i];
        ops::invite_create(&inst.key, &inst.admission, role, ttl)
    }

    /// The coordinator's dialable address.
    pub fn coordinator_addr(&self) -> &str {
        &self.coordinator_addr
    }

    /// The coordinator, if running.
    pub fn coordinator(&self) -> Option<&Node> {
        self.coordinator.as_ref()
    }

    /// A fresh data dir inside the federation's temp dir.
    pub fn new_dir(&self, name: &str) -> DataDir {
        DataDir::new(self.tmp.path().join(name))
    }

    /// Joins a new endpoint node of institution `i` through the coordinator; returns its index.
    pub async fn add_member(&mut self, i: usize) -> anyhow::Result<usize> {
        self.add_members(&[i])
            .await
            .pop()
            .expect("one join asked, one answered")
    }

    /// Joins one new endpoint node for each institution index in `which`, all at once (the
    /// coordinator admits them concurrently, as it would a wave of operators); returns each
    /// join's outcome in order: the new member's index, or why it failed. Every join gets a
    /// name of its own (a failed one's is not given again).
    pub async fn add_members(&mut self, which: &[usize]) -> Vec<anyhow::Result<usize>> {
        let mut joins = Vec::new();
        for &i in which {
            let n = self.named.entry(i).or_default();
            *n += 1;
            let n = *n;
            joins.push(
                self.prepare_member(i, n)
                    .map(|(name, dir, invite)| (i, name, dir, invite)),
            );
        }
        let coordinator = self.coordinator_addr.clone();
        let overrides = self.join_overrides.clone();
        let started = futures::future::join_all(joins.into_iter().map(|prepared| {
            let (coordinator, overrides) = (&coordinator, &overrides);
            async move {
                let (i, name, dir, invite) = prepared?;
                let node = join_with_overrides(&dir, coordinator, &invite, overrides).await?;
                Ok::<_, anyhow::Error>(Slot {
                    name,
                    institution: i,
                    dir,
                    node: Some(node),
                })
            }
        }))
        .await;
        started
            .into_iter()
            .map(|slot| {
                self.members.push(slot?);
                Ok(self.members.len() - 1)
            })
            .collect()
    }

    /// The data dir, configuration and invite of institution `i`'s `n`th endpoint node.
    fn prepare_member(&self, i: usize, n: usize) -> anyhow::Result<(String, DataDir, String)> {
        let name = format!("{}{n}", (b'a' + i as u8) as char);
        let invite = self.invite(i, Role::Endpoint, Duration::from_secs(600))?;
        let dir = self.new_dir(&name);
        let inst = self.institutions[i].name.clone();
        let mut config = ops::testnet_config(
            &name,
            &inst,
            Role::Endpoint,
            &ops::TestnetEndpoint::default(),
        );
        if let Some(change) = &self.member_config {
            change(&name, &inst, &mut config);
        }
        ops::write_config(&dir, &config)?;
        Ok((name, dir, invite))
    }

    /// Member `i`'s node (panics if it is stopped: a test bug).
    pub fn node(&self, i: usize) -> &Node {
        self.members[i].node.as_ref().expect("member is running")
    }

    /// Every running node, coordinator first.
    pub fn running(&self) -> Vec<&Node> {
        self.coordinator
            .iter()
            .chain(self.members.iter().filter_map(|s| s.node.as_ref()))
            .collect()
    }

    /// Whether every running node lists every other running node as a member.
    pub async fn fully_connected(&self) -> bool {
        let nodes = self.running();
        for n in &nodes {
            let Ok(members) = n.mesh().members().await else {
                return false;
            };
            for other in &nodes {
                if other.peer_id() != n.peer_id()
                    && !members
                        .iter()
                        .any(|m| m.peer_id == other.peer_id().to_string())
                {
                    return false;
                }
            }
        }
        true
    }

    /// Whether any running node lists `peer`.
    pub async fn anyone_lists(&self, peer: &mesh::PeerId) -> bool {
        for n in self.running() {
            if let Ok(members) = n.mesh().members().await {
                if members.iter().any(|m| m.peer_id == peer.to_string()) {
                    return true;
                }
            }
        }
        false
    }

    /// Stops the coordinator gracefully.
    pub async fn stop_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.coordinator.take() {
            c.shutdown().await?;
        }
        Ok(())
    }

    /// Restarts the coordinator from its data dir (on a new port: see `coordinator_addr`).
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.stop_coordinator().await?;
        let coordinator = Node::start(&self.coordinator_dir, &test_config()).await?;
        self.coordinator_addr = coordinator
            .dial_addrs()
            .await?
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .context("coordinator has no TCP address")?
            .to_string();
        self.coordinator = Some(coordinator);
        Ok(())
    }

    /// Stops member `i` gracefully.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(n) = self.members[i].node.take() {
            n.shutdown().await?;
        }
        Ok(())
    }

    /// Restarts member `i` from its data dir.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_with(i, |_| {}).await
    }

    /// Restarts member `i` from its data dir, with `change` applied to its configuration.
    pub async fn restart_with(
        &mut self,
        i: usize,
        change: impl FnOnce(&mut Config),
    ) -> anyhow::Result<()> {
        self.stop(i).await?;
        let dir = &self.members[i].dir;
        let mut config = Config::resolve(Some(&dir.config()), Vec::new(), &[])?;
        let t = test_config();
        config.mesh.proof_timeout = t.mesh.proof_timeout;
        config.mesh.redial_interval = t.mesh.redial_interval;
        config.mesh.anti_entropy = t.mesh.anti_entropy;
        config.mesh.reserve_relay = t.mesh.reserve_relay;
        change(&mut config);
        let node = Node::start(dir, &config).await?;
        self.members[i].node = Some(node);
        Ok(())
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        for slot in &mut self.members {
            if let Some(n) = slot.node.take() {
                let _ = n.shutdown().await;
            }
        }
        let _ = self.stop_coordinator().await;
    }
}

impl Federation {
    /// Whether every running node's registry lists function `id`.
    pub async fn everyone_has_function(&self, id: &str) -> bool {
        for n in self.running() {
            match n.mesh().registry().await {
                Ok(v) if v.functions.contains_key(id) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A shell function named `name` (its id depends on the name and the owner).
pub fn shell_function(name: &str) -> node::registry::NewFunction {
    node::registry::NewFunction {
        name: name.to_string(),
        python: None,
        entrypoint: None,
        payload: None,
        shell: Some(format!("echo {name} {{x}}")),
        container: None,
        description: String::new(),
    }
}

/// `ops::join` with the test configuration.
pub async fn join_with_test_config(
    dir: &DataDir,
    coordinator: &str,
    invite: &str,
) -> anyhow::Result<Node> {
    join_with_overrides(dir, coordinator, invite, &[]).await
}

/// `ops::join` with the test configuration, then `extra` settings.
pub async fn join_with_overrides(
    dir: &DataDir,
    coordinator: &str,
    invite: &str,
    extra: &[String],
) -> anyhow::Result<Node> {
    let overrides = test_overrides(extra);
    ops::join(
        dir,
        coordinator,
        invite,
        &overrides,
        Duration::from_secs(10),
    )
    .await
}

/// The test configuration's mesh settings as overrides, then `extra`.
fn test_overrides(extra: &[String]) -> Vec<String> {
    let c = test_config();
    let mut overrides = vec![
        format!(
            "mesh.proof_timeout={}",
            humantime_secs(c.mesh.proof_timeout)
        ),
        format!(
            "mesh.redial_interval={}ms",
            c.mesh.redial_interval.as_millis()
        ),
        format!("mesh.anti_entropy={}s", c.mesh.anti_entropy.as_secs()),
        format!("mesh.reserve_relay={}", c.mesh.reserve_relay),
    ];
    overrides.extend(extra.iter().cloned());
    overrides
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// A node outside the federation's rules: runs the real mesh with whatever proof it is given
/// (forged, expired, foreign…), for refusal tests. Returns its handle and a guard that stops it.
pub async fn rogue(
    dir: &std::path::Path,
    federation: mesh::membership::Federation,
    keypair: mesh::Keypair,
    proof: mesh::membership::Proof,
) -> anyhow::Result<(mesh::Handle, RogueGuard)> {
    let db = dir.join("rogue-db");
    let store = tokio::task::spawn_blocking(move || store::Store::open(&db)).await??;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let config = mesh::Config {
        keypair,
        federation,
        proof,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap: vec![],
        relay_server: false,
        // In-process loopback federations: everyone can dial everyone.
        reserve_relay: false,
        proof_timeout: Duration::from_secs(2),
        redial_interval: Duration::from_millis(200),
        anti_entropy: Duration::from_secs(2),
        max_connections: mesh::network::DEFAULT_MAX_CONNECTIONS,
        idle_after: mesh::network::DEFAULT_IDLE_AFTER,
        store,
        checkpoint: None,
    };
    let handle = mesh::network::spawn(config, cancel.child_token(), &tracker).await?;
    Ok((handle, RogueGuard { cancel, tracker }))
}

/// Stops a rogue node when dropped or awaited.
pub struct RogueGuard {
    cancel: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
}

impl RogueGuard {
    /// Stops it and waits.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for RogueGuard {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
