//! A running node: store, mesh and local API wired together, with structured shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh::membership::{Federation, Member, Proof, Role, unix_now};
use mesh::{Multiaddr, PeerId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::api::{self, Inner};
use crate::config::Config;
use crate::datadir::{ApiInfo, DataDir, write_json_atomic};

/// A running node. Dropping it without [`Node::shutdown`] still stops its tasks (the cancel token
/// is cancelled on drop) but does not wait for them.
pub struct Node {
    inner: Arc<Inner>,
    blobs: transfer::BlobStore,
    data_plane: transfer::net::DataPlane,
    cancel: CancellationToken,
    tracker: TaskTracker,
    store: store::Store,
    api_addr: SocketAddr,
    compat_addr: Option<SocketAddr>,
    data_dir: DataDir,
}

impl Node {
    /// Starts the node of `dir` with its stored membership.
    pub async fn start(dir: &DataDir, config: &Config) -> anyhow::Result<Node> {
        let (federation, proof) = dir.read_membership()?;
        Node::start_with(dir, config, federation, proof).await
    }

    /// Starts the node of `dir` with the given membership (used by `join` before it is stored).
    pub async fn start_with(
        dir: &DataDir,
        config: &Config,
        federation: Federation,
        proof: Proof,
    ) -> anyhow::Result<Node> {
        // The binary restores SIGPIPE's default for the CLI's sake (`| head`); a node must
        // never die of it: a worker that exits while the node writes to its pipe is an error to
        // handle (the worker is lost), not the node's end.
        ignore_sigpipe();
        // A data dir made by an older version may be readable by others: tighten it.
        dir.create()?;
        let keypair = mesh::keys::read_node_key(&dir.node_key())
            .with_context(|| format!("cannot read the node key of {}", dir.root().display()))?;
        let peer_id = keypair.public().to_peer_id();
        let key = mesh::registry::signing_key(&keypair)
            .map(|k| crdt_registry::Key::of(&k))
            .context("the node key is not an ed25519 key")?;
        let own = proof
            .verify(&federation, &peer_id, unix_now())
            .with_context(|| {
                format!(
                    "the membership stored in {} is not valid",
                    dir.root().display()
                )
            })?;
        let db = dir.db();
        let store = tokio::task::spawn_blocking(move || store::Store::open(&db))
            .await
            .context("store task")?
            .map_err(|e| {
                anyhow::anyhow!("{e} (is another node already running on this data dir?)")
            })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let listen = parse_addrs(&config.mesh.listen, "mesh.listen")?;
        let bootstrap = parse_addrs(&config.mesh.bootstrap, "mesh.bootstrap")?;
        let mesh_config = mesh::Config {
            keypair,
            federation: federation.clone(),
            proof,
            listen,
            bootstrap,
            relay_server: config.mesh.relay_server || own.role == Role::Coordinator,
            reserve_relay: config.mesh.reserve_relay,
            proof_timeout: config.mesh.proof_timeout,
            redial_interval: config.mesh.redial_interval,
            anti_entropy: config.mesh.anti_entropy,
            max_connections: config.mesh.max_connections,
            idle_after: config.mesh.idle_after,
            store: store.clone(),
            checkpoint: checkpoint_policy(dir, own.role, config.mesh.checkpoint_every)?,
        };
        let own_proof = mesh_config.proof.clone();
        let data_keypair = mesh_config.keypair.clone();
        let mesh = mesh::network::spawn(mesh_config, cancel.child_token(), &tracker).await?;
        // Return only once the listeners have their ports: callers dial us right away, and the
        // node record we publish carries the addresses.
        let deadline = Instant::now() + Duration::from_secs(5);
        let addrs = loop {
            let addrs = mesh.listen_addrs().await?;
            if !addrs.is_empty() || Instant::now() > deadline {
                break addrs;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if addrs.is_empty() {
            anyhow::bail!("the mesh did not start listening within 5 s: check mesh.listen");
        }
        let blobs = transfer::BlobStore::open(dir.root().join("blobs"))
            .context("cannot open the blob store")?;
        let data_plane = {
            let mesh = mesh.clone();
            transfer::net::DataPlane::bind(
                &data_keypair,
                config.transfer.listen,
                blobs.clone(),
                // Members, and this node itself (its API reaches its own roots the same way).
                Arc::new(move |peer| *peer == peer_id || mesh.is_member(peer)),
            )
            .with_context(|| {
                format!(
                    "cannot start the data plane on {} (set transfer.listen)",
                    config.transfer.listen
                )
            })?
        };
        crate::transfers::tunnel_through_mesh(&mesh, &data_plane, &cancel, &tracker)
            .context("cannot carry the data plane through the mesh")?;
        let data_addr = data_plane.local_addr()?.to_string();
        {
            let mesh = mesh.clone();
            let name = config.node.name.clone();
            let endpoints = config.endpoint.clone();
            tracker.spawn(async move {
                let addrs = addrs
                    .into_iter()
                    .map(|a| a.with(mesh::network::p2p(peer_id)).to_string())
                    .collect();
                if let Err(e) =
                    crate::registry::publish_own(
                        &mesh,
                        key,
                        &name,
                        &own_proof,
                        addrs,
                        Some(data_addr),
                        &endpoints,
                    )
                    .await
                {
                    tracing::warn!(error = %format!("{e:#}"), "cannot publish this node's records in the registry");
                }
            });
        }
        let access = crate::capabilities::start(&mesh, &store, &own, &cancel, &tracker)
            .await
            .context("cannot load the capability tokens this node holds")?;
        let mut endpoints = Vec::new();
        for section in &config.endpoint {
            let policy: crdt_registry::record::Policy = section
                .policy
                .parse()
                .map_err(|e: String| anyhow::anyhow!("[[endpoint]] {}: {e}", section.name))?;
            endpoints.push((section.compute(), policy));
        }
        let most_inline = compute::task::MAX_ARGUMENTS_BYTES as u64;
        if config.transfer.inline_limit > most_inline {
            anyhow::bail!(
                "transfer.inline_limit is {} bytes; values up to it travel with their task, \
                 in one message, so it may be at most {most_inline}",
                config.transfer.inline_limit
            );
        }
        let values = crate::values::values(
            blobs.clone(),
            data_plane.clone(),
            mesh.clone(),
            config.transfer.inline_limit,
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let task_metrics = compute::metrics::Metrics::register(&mut registry);
        let tasks = compute::service::start(
            &mesh,
            &store,
            key,
            &dir.root().join("endpoints"),
            &compute::service::Config {
                endpoints,
                lost_after: config.mesh.endpoint_lost_after,
                retention: config.node.task_retention,
                route_wait: config.mesh.route_wait,
                metrics: task_metrics,
                values: Some(values.clone()),
            },
            &own,
            access,
            &cancel,
            &tracker,
        )
        .await
        .context("cannot start the task service")?;
        let transfers = crate::transfers::start(
            &config.endpoint,
            &key,
            &own,
            &mesh,
            tasks.access.clone(),
            data_plane.clone(),
            blobs.clone(),
            store.clone(),
            dir.root(),
            config.transfer.patience,
        )?;
        {
            // Unused blobs go after `blob_retention`: swept at start, then hourly.
            let (blobs, keep, cancel) = (
                blobs.clone(),
                config.transfer.blob_retention,
                cancel.child_token(),
            );
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = cancel.cancelled() => break,
                    }
                    let b = blobs.clone();
                    match tokio::task::spawn_blocking(move || b.collect(keep)).await {
                        Ok(Ok((0, _))) => {}
                        Ok(Ok((n, bytes))) => info!(blobs = n, bytes, "removed unused blobs"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep the blob store"),
                        Err(_) => break,
                    }
                }
            });
        }
        // Flow runs: the engine resumes the runs this node hosted before it stopped.
        let engine_slot = std::sync::Arc::new(std::sync::OnceLock::new());
        let runs = flows::engine::Engine::open(
            store.clone(),
            crate::runs::node_providers(
                &mesh,
                &own,
                &tasks,
                &values,
                &transfers,
                &engine_slot,
                &crate::runs::external_providers(&config.flows)?,
            ),
        )
        .map_err(|e| anyhow::anyhow!("cannot open the flow runs: {e}"))?;
        // Flows that run flows reach the engine through this.
        let _ = engine_slot.set(runs.downgrade());
        // Other members start, watch and manage runs here over the data plane.
        transfers
            .plane
            .serve_services(Arc::new(crate::remote_runs::RunDesk {
                mesh: mesh.clone(),
                own: own.clone(),
                name: config.node.name.clone(),
                access: tasks.access.clone(),
                runs: runs.clone(),
                starters: crate::run_rights::Starters::new(store.clone()),
            }));
        let token = hex::encode(rand::random::<[u8; 24]>());
        let inner = Arc::new(Inner {
            runs,
            transfers,
            mesh,
            federation,
            own,
            name: config.node.name.clone(),
            started: Instant::now(),
            token: token.clone(),
            key,
            tasks,
            values,
            store: store.clone(),
            metrics: api::Exported::new(registry),
        });
        if !config.api.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.api.listen,
                "the API listens on an address other hosts may reach: whoever reaches it with the \
                 token in api.json controls this node (set api.listen to 127.0.0.1 unless you \
                 mean it)"
            );
        }
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .with_context(|| format!("cannot bind the API on {}", config.api.listen))?;
        let api_addr = listener.local_addr().context("API address")?;
        tracker.spawn(api::serve(listener, inner.clone(), cancel.child_token()));
        let compat_addr = if config.compat.globus_compute {
            let listener = tokio::net::TcpListener::bind(config.compat.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot bind the Globus Compute API on {} (compat.listen)",
                        config.compat.listen
                    )
                })?;
            let addr = listener
                .local_addr()
                .context("Globus Compute API address")?;
            let credentials = crate::globus_compute::credentials(dir, addr)?;
            crate::globus_compute::start(
                listener,
                inner.clone(),
                &config.compat,
                config.mesh.endpoint_lost_after,
                credentials.token,
                &cancel,
                &tracker,
            )?;
            info!(%addr, "serving the Globus Compute API");
            Some(addr)
        } else {
            None
        };
        let info = ApiInfo {
            version: 1,
            url: format!("http://{api_addr}"),
            token,
            pid: std::process::id(),
            peer_id: peer_id.to_string(),
        };
        write_json_atomic(&dir.api(), &info, 0o600)?;
        info!(%peer_id, federation = %inner.federation.id, api = %api_addr, "node started");
        Ok(Node {
            inner,
            blobs,
            data_plane,
            cancel,
            tracker,
            store,
            api_addr,
            compat_addr,
            data_dir: dir.clone(),
        })
    }

    /// The mesh handle.
    pub fn mesh(&self) -> &mesh::Handle {
        &self.inner.mesh
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.mesh.peer_id()
    }

    /// This node's registry key (the ed25519 key behind its peer id).
    pub fn registry_key(&self) -> crdt_registry::Key {
        self.inner.key
    }

    /// Registers a function owned by this node (what `POST /v1/functions` does); returns its id.
    pub async fn register_function(
        &self,
        f: &crate::registry::NewFunction,
    ) -> anyhow::Result<String> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let record = f.record(self.inner.key, now_ms)?;
        let id = record.content_id();
        self.mesh()
            .registry_write(id.clone(), crdt_registry::record::Body::Function(record))
            .await?;
        Ok(id)
    }

    /// Submits tasks (what `POST /v1/tasks` does).
    pub async fn submit(
        &self,
        tasks: Vec<crate::tasks::NewTask>,
    ) -> anyhow::Result<Vec<Result<compute::submit::Submitted, crate::tasks::Refused>>> {
        crate::tasks::submit(
            self.mesh(),
            &self.inner.tasks.dispatcher,
            &self.inner.values,
            tasks,
        )
        .await
    }

    /// The dispatcher (tasks this node submits).
    pub fn dispatcher(&self) -> &compute::submit::Dispatcher {
        &self.inner.tasks.dispatcher
    }

    /// This node's links of the task protocol.
    pub fn task_links(&self) -> &mesh::Links<compute::wire::TaskProtocol> {
        &self.inner.tasks.links
    }

    /// This node's own verified membership.
    pub fn member(&self) -> &Member {
        &self.inner.own
    }

    /// The federation.
    pub fn federation(&self) -> &Federation {
        &self.inner.federation
    }

    /// Address of the local API.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The Globus Compute API's address, if the node serves it.
    pub fn globus_compute_addr(&self) -> Option<SocketAddr> {
        self.compat_addr
    }

    /// This node's blob store.
    pub fn blobs(&self) -> &transfer::BlobStore {
        &self.blobs
    }

    /// This node's data-plane endpoint (members only).
    pub fn data_plane(&self) -> &transfer::net::DataPlane {
        &self.data_plane
    }

    /// The data dir.
    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// Mesh listen addresses with `/p2p/<peer id>` appended: what others dial.
    pub async fn dial_addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        let peer = self.peer_id();
        Ok(self
            .mesh()
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| a.with(mesh::network::p2p(peer)))
            .collect())
    }

    /// Stops accepting, stops the mesh and the API, waits for every task, flushes the store and
    /// removes `api.json`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // Runs first: they must not read the services stopping below as their actions failing.
        self.inner.runs.close();
        self.cancel.cancel();
        self.inner
            .transfers
            .jobs
            .stop(Duration::from_secs(10))
            .await;
        self.data_plane.close();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10s");
        }
        let _ = std::fs::remove_file(self.data_dir.api());
        let store = self.store.clone();
        store.blocking(|s| s.flush()).await?;
        info!("node stopped");
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn parse_addrs(list: &[String], what: &str) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|s| {
            s.parse()
                .with_context(|| format!("{what}: `{s}` is not a multiaddr"))
        })
        .collect()
}

/// Ignores SIGPIPE: writes to a closed pipe or socket then fail with `EPIPE`.
#[allow(unsafe_code)]
fn ignore_sigpipe() {
    // SAFETY: changing a signal's disposition is process-wide and thread-safe (sigaction);
    // SIG_IGN is a valid disposition, and no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// A coordinator whose data dir holds the federation key writes the registry's checkpoints.
fn checkpoint_policy(
    dir: &DataDir,
    role: Role,
    every: usize,
) -> anyhow::Result<Option<mesh::registry::CheckpointPolicy>> {
    let path = dir.federation_key();
    if role != Role::Coordinator || every == 0 || !path.exists() {
        return Ok(None);
    }
    let (_, key) = mesh::keys::read_signing_key(&path, mesh::keys::KeyKind::Federation)
        .with_context(|| format!("cannot read the federation key {}", path.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&key.secret());
    Ok(Some(mesh::registry::CheckpointPolicy { key, every }))
}
