//! Node configuration: defaults, then the TOML file, then `FUNCMESH_*` environment variables,
//! then command-line flags; each layer overrides the one before.
//!
//! Every key can be set from the environment as `FUNCMESH_<SECTION>_<KEY>` (for example
//! `FUNCMESH_API_LISTEN=127.0.0.1:8080`) and from the command line as `--set section.key=value`.
//! Values are TOML (`5`, `true`, `["a", "b"]`); anything that does not parse as TOML is a string,
//! and a comma-separated string sets a list.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The resolved node configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// About the node itself.
    pub node: NodeSection,
    /// The local HTTP API.
    pub api: ApiSection,
    /// The libp2p mesh.
    pub mesh: MeshSection,
    /// The data plane.
    pub transfer: TransferSection,
    /// Flows.
    pub flows: FlowsSection,
    /// Compatibility APIs.
    pub compat: CompatSection,
    /// Endpoints this node runs, published in the registry on start (`[[endpoint]]` tables;
    /// set them in the TOML file).
    pub endpoint: Vec<EndpointSection>,
}

/// `[flows]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsSection {
    /// External action providers (Globus action-provider API over HTTP) that flows run on this
    /// node may call, by their action URL. Only these: a flow definition is someone else's
    /// document, and must not make the node send requests anywhere it names.
    pub action_providers: Vec<String>,
    /// Bearer tokens for some of them: action URL → a file holding the token (read at start).
    /// Another funcmesh node's flows (`…/v1/actions/flows/FLOW`) take that node's API token.
    pub action_provider_token_files: std::collections::BTreeMap<String, std::path::PathBuf>,
}

/// One `[[endpoint]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointSection {
    /// Its name, unique on this node.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Runtimes it offers: `host`, `docker`, `podman`, `apptainer`.
    pub runtimes: Vec<String>,
    /// CPU cores offered (0: all of this machine's).
    pub cores: u32,
    /// Memory offered, MiB (0: all of this machine's).
    pub memory_mb: u64,
    /// GPUs offered.
    pub gpus: u32,
    /// Free-form tags, matched by `--require key=value`.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Who may use it: `institution`, `federation`, `capability`, or the default
    /// `institution-and-capability`.
    pub policy: String,
    /// Listed for the whole federation.
    pub public: bool,
    /// Most workers running at once.
    pub max_workers: usize,
    /// Most container workers at once; the least recently used idle one is evicted for room.
    pub container_cap: usize,
    /// How workers are kept: `cold` (one per task), `warm` (until `idle_timeout`), `prewarm`.
    pub strategy: compute::Strategy,
    /// With `prewarm`: workers kept ready per environment in `prewarm_environments`.
    pub prewarm: usize,
    /// With `prewarm`: environments kept ready (`host`, `docker:<image>`).
    pub prewarm_environments: Vec<String>,
    /// How long an idle worker is kept.
    #[serde(with = "humantime_serde_str")]
    pub idle_timeout: Duration,
    /// Most tasks held unfinished; submitters beyond it are asked to come back later.
    pub max_queued: usize,
    /// Most bytes of arguments held for unfinished tasks (one institution: at most half of
    /// this and of `max_queued`).
    pub max_queued_bytes: u64,
    /// How long a worker may take to start before it is given up (`0s`: no limit).
    #[serde(with = "humantime_serde_str")]
    pub start_timeout: Duration,
    /// Default time limit per task (`0s`: none; default 1h).
    #[serde(with = "humantime_serde_str")]
    pub task_timeout: Duration,
    /// The longest time limit a submitter may ask for; a task asking for more is refused
    /// (`0s`: no maximum; default 24h).
    #[serde(with = "humantime_serde_str")]
    pub max_task_timeout: Duration,
    /// Memory limit per task, MiB of address space beyond the worker's own, hard (default
    /// 4096; 0: none).
    pub task_memory_mb: u64,
    /// Largest result, bytes of JSON.
    pub result_limit: u64,
    /// Cap on captured shell output, characters per stream.
    pub output_cap: u64,
    /// How long finished tasks are kept.
    #[serde(with = "humantime_serde_str")]
    pub retention: Duration,
    /// The Python interpreter for host workers.
    pub python: String,
    /// Whom host workers run as: `auto` (a uid of its own per worker, outside the data dir,
    /// when the node runs as root; the node's user otherwise) or `node`.
    pub host_user: compute::config::HostUser,
    /// Whom a warm worker may serve: `institution` (default) or `node` (one submitting node).
    pub workers_per: compute::config::WorkersPer,
    /// Let other institutions' tasks run on `host` even when host workers run as the node's
    /// own user (they could then read its key, API token and store).
    pub foreign_host_tasks: bool,
    /// Give containers a network (default: none).
    pub container_network: bool,
    /// Most processes in one container.
    pub container_pids: u32,
    /// Container images accepted: names, or prefixes ending in `*` (default: the images of
    /// `prewarm_environments` and `funcmesh/*`).
    pub images: Vec<String>,
    /// The directory this endpoint exposes to transfers (`ls`, `copy`, ...): paths are
    /// relative to it and never leave it. None: no data root.
    pub data_root: Option<std::path::PathBuf>,
    /// Simulated workers, for scale experiments: no process; every task returns `null` after
    /// this many milliseconds. Unset: real workers.
    pub simulate_ms: Option<u64>,
}

impl EndpointSection {
    /// The compute engine's view of this table.
    pub fn compute(&self) -> compute::EndpointConfig {
        compute::EndpointConfig {
            name: self.name.clone(),
            max_workers: self.max_workers,
            container_cap: self.container_cap,
            strategy: self.strategy,
            prewarm: self.prewarm,
            prewarm_environments: self.prewarm_environments.clone(),
            idle_timeout: self.idle_timeout,
            max_queued: self.max_queued,
            max_queued_bytes: self.max_queued_bytes,
            start_timeout: self.start_timeout,
            task_timeout: self.task_timeout,
            max_task_timeout: self.max_task_timeout,
            task_memory_mb: self.task_memory_mb,
            result_limit: self.result_limit,
            output_cap: self.output_cap,
            retention: self.retention,
            python: self.python.clone(),
            runtimes: self.runtimes.clone(),
            host_user: self.host_user,
            workers_per: self.workers_per,
            foreign_host_tasks: self.foreign_host_tasks,
            container_network: self.container_network,
            container_pids: self.container_pids,
            images: self.images.clone(),
            simulate_ms: self.simulate_ms,
            ..compute::EndpointConfig::default()
        }
    }
}

impl Default for EndpointSection {
    fn default() -> Self {
        // The compute defaults are the engine's own.
        let c = compute::EndpointConfig::default();
        EndpointSection {
            name: "default".into(),
            description: String::new(),
            runtimes: vec!["host".into()],
            cores: 0,
            memory_mb: 0,
            gpus: 0,
            tags: Default::default(),
            policy: "institution-and-capability".into(),
            public: true,
            max_workers: c.max_workers,
            container_cap: c.container_cap,
            strategy: c.strategy,
            prewarm: c.prewarm,
            prewarm_environments: c.prewarm_environments,
            idle_timeout: c.idle_timeout,
            max_queued: c.max_queued,
            max_queued_bytes: c.max_queued_bytes,
            start_timeout: c.start_timeout,
            task_timeout: c.task_timeout,
            max_task_timeout: c.max_task_timeout,
            task_memory_mb: c.task_memory_mb,
            result_limit: c.result_limit,
            output_cap: c.output_cap,
            retention: c.retention,
            python: c.python,
            host_user: c.host_user,
            workers_per: c.workers_per,
            foreign_host_tasks: c.foreign_host_tasks,
            container_network: c.container_network,
            container_pids: c.container_pids,
            images: c.images,
            data_root: None,
            simulate_ms: None,
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// A human name shown by `status`.
    pub name: String,
    /// Log filter (tracing `EnvFilter` syntax), used by `funcmesh start`.
    pub log: String,
    /// How long this node keeps the tasks it submitted once they finished (each endpoint has its
    /// own `retention` for the tasks it ran).
    #[serde(with = "humantime_serde_str")]
    pub task_retention: Duration,
}

/// `[transfer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferSection {
    /// UDP address of the data plane's QUIC endpoint (published as the node's `data_addr`);
    /// port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long a copy keeps trying to reach a source that went away before it fails.
    #[serde(with = "humantime_serde_str")]
    pub patience: Duration,
    /// Blobs not used (stored, fetched, served) for this long are removed.
    #[serde(with = "humantime_serde_str")]
    pub blob_retention: Duration,
    /// Task arguments and results whose JSON is larger than this many bytes go by reference,
    /// as blobs fetched over the data plane (default 1 MiB; at most 16 MiB).
    pub inline_limit: u64,
}

impl Default for TransferSection {
    fn default() -> Self {
        TransferSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            patience: Duration::from_secs(3600),
            blob_retention: Duration::from_secs(7 * 24 * 3600),
            inline_limit: 1 << 20,
        }
    }
}

/// `[compat]`: APIs of other systems the node serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompatSection {
    /// Serve the Globus Compute web service's API, so that the unmodified `globus-compute-sdk`
    /// runs against this node.
    pub globus_compute: bool,
    /// Its address: the SDK's `local` environment expects `localhost:5000`.
    pub listen: SocketAddr,
    /// The RabbitMQ the node publishes task results to for the SDK's `Executor`
    /// (`amqp://user:password@host:port/vhost`); without one, `Client` works and the
    /// `Executor` is told to configure one.
    pub amqp_url: Option<String>,
    /// The broker's URL as the SDK should dial it, if not `amqp_url`.
    pub amqp_client_url: Option<String>,
    /// The result queues' names: this, then the task group's UUID.
    pub queue_prefix: String,
}

impl Default for CompatSection {
    fn default() -> Self {
        CompatSection {
            globus_compute: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            amqp_url: None,
            amqp_client_url: None,
            queue_prefix: "funcmesh_results_".into(),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address of the local HTTP API; port 0 picks a free port. Loopback unless you mean it.
    pub listen: SocketAddr,
}

/// `[mesh]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSection {
    /// libp2p listen addresses; port 0 picks a free port.
    pub listen: Vec<String>,
    /// Addresses dialed at start: the coordinator's, written by `join`.
    pub bootstrap: Vec<String>,
    /// Serve as a relay for NATed members (coordinators always do).
    pub relay_server: bool,
    /// Hold a reservation on the coordinators' relays, so that members that cannot dial this
    /// node (NAT, firewall) reach it through them; DCUtR then tries a direct connection.
    pub reserve_relay: bool,
    /// How long a new peer has to prove its membership before it is cut.
    #[serde(with = "humantime_serde_str")]
    pub proof_timeout: Duration,
    /// Base interval for re-dialing known members.
    #[serde(with = "humantime_serde_str")]
    pub redial_interval: Duration,
    /// How often to sync the registry with a random member (anti-entropy).
    #[serde(with = "humantime_serde_str")]
    pub anti_entropy: Duration,
    /// An endpoint whose node has not advertised for this long is lost: its unfinished tasks are
    /// retried elsewhere (`--retries`) or fail with that reason.
    #[serde(with = "humantime_serde_str")]
    pub endpoint_lost_after: Duration,
    /// How long a task with retries left whose endpoint was lost waits for another endpoint that
    /// can take it (say, while this node restarts and learns the endpoints again) before it
    /// fails; a task with a longer time limit waits that long.
    #[serde(with = "humantime_serde_str")]
    pub route_wait: Duration,
    /// Member connections kept at rest (bounded connections): below half of it the node dials
    /// more members; above it, it closes connections idle for `idle_after` (never a
    /// coordinator's). Any other member is dialled when needed (a task, a sync, a transfer).
    pub max_connections: usize,
    /// How long a member connection goes without a task request before it counts as idle.
    #[serde(with = "humantime_serde_str")]
    pub idle_after: Duration,
    /// On a coordinator that holds the federation key: write a registry checkpoint (which prunes
    /// superseded entries and keeps the document's memory linear) once this many entries lie
    /// outside the last one. 0 never writes one. Other nodes ignore it.
    pub checkpoint_every: usize,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            name: "funcmesh-node".into(),
            log: "info".into(),
            task_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

impl Default for MeshSection {
    fn default() -> Self {
        MeshSection {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".into(),
                "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            relay_server: false,
            reserve_relay: true,
            proof_timeout: Duration::from_secs(5),
            redial_interval: Duration::from_millis(500),
            anti_entropy: Duration::from_secs(10),
            endpoint_lost_after: Duration::from_secs(6),
            route_wait: Duration::from_secs(300),
            max_connections: mesh::network::DEFAULT_MAX_CONNECTIONS,
            idle_after: mesh::network::DEFAULT_IDLE_AFTER,
            checkpoint_every: mesh::network::DEFAULT_CHECKPOINT_EVERY,
        }
    }
}

mod humantime_serde_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Resolves the layers: defaults, `file` (if it exists), `env` (`FUNCMESH_*` pairs), then
    /// `overrides` (`section.key=value`).
    pub fn resolve(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> anyhow::Result<Config> {
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
        let mut table = defaults.clone();
        if let Some(path) = file.filter(|p| p.exists()) {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            let file: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string()))
            })?;
            merge(&mut table, file);
        }
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        for (section, keys) in &defaults {
            let Some(keys) = keys.as_table() else {
                continue;
            };
            for (key, default) in keys {
                let var = format!("FUNCMESH_{}_{}", section, key).to_uppercase();
                if let Some(value) = env.get(&var) {
                    set(&mut table, section, key, value, default)
                        .with_context(|| format!("in {var}"))?;
                }
            }
        }
        for o in overrides {
            let Some((path, value)) = o.split_once('=') else {
                bail!("--set {o}: expected section.key=value");
            };
            let Some((section, key)) = path.split_once('.') else {
                bail!("--set {o}: expected section.key=value");
            };
            let Some(default) = defaults.get(section).and_then(|s| s.get(key)) else {
                bail!("--set {o}: unknown setting `{path}` (see `funcmesh start --dump-config`)");
            };
            set(&mut table, section, key, value, default)
                .with_context(|| format!("in --set {o}"))?;
        }
        let config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("invalid configuration: {}", one_line(&e.to_string())))?;
        config.check_endpoints()?;
        for url in &config.flows.action_providers {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("flows.action_providers: {url:?} is not an http:// or https:// URL");
            }
        }
        for url in config.flows.action_provider_token_files.keys() {
            if !config.flows.action_providers.contains(url) {
                bail!(
                    "flows.action_provider_token_files: {url:?} is not one of \
                     flows.action_providers: list it there too"
                );
            }
        }
        Ok(config)
    }

    fn check_endpoints(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for e in &self.endpoint {
            if e.name.trim().is_empty() {
                bail!("an [[endpoint]] has an empty name: give each endpoint a name");
            }
            if !names.insert(e.name.as_str()) {
                bail!(
                    "two [[endpoint]] tables are named {:?}: names must be unique",
                    e.name
                );
            }
            if let Err(reason) = e.policy.parse::<crdt_registry::record::Policy>() {
                bail!("[[endpoint]] {:?}: {reason}", e.name);
            }
            for r in &e.runtimes {
                if !["host", "docker", "podman", "apptainer"].contains(&r.as_str()) {
                    bail!(
                        "[[endpoint]] {:?}: unknown runtime {r:?}: use host, docker, podman or apptainer",
                        e.name
                    );
                }
            }
            if let Err(reason) = e.compute().validate() {
                bail!("{reason}");
            }
            if !e
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                bail!(
                    "[[endpoint]] {:?}: names may only use letters, digits, `-`, `_` and `.`",
                    e.name
                );
            }
        }
        Ok(())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    raw: &str,
    default: &toml::Value,
) -> anyhow::Result<()> {
    let value = match default {
        toml::Value::Array(_) if !raw.trim_start().starts_with('[') => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        _ => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
    };
    let section = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section.as_table_mut() {
        Some(t) => {
            t.insert(key.to_string(), value);
            Ok(())
        }
        None => bail!("`{section}` is not a table"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[api]\nlisten = \"127.0.0.1:7000\"\n[node]\nname = \"file\"\n",
        )
        .unwrap();
        let env = vec![
            ("FUNCMESH_NODE_NAME".to_string(), "env".to_string()),
            (
                "FUNCMESH_MESH_BOOTSTRAP".to_string(),
                "/ip4/1.2.3.4/tcp/1,/ip4/1.2.3.4/tcp/2".to_string(),
            ),
            ("FUNCMESH_MESH_PROOF_TIMEOUT".to_string(), "2s".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::resolve(Some(&path), env, &["api.listen=127.0.0.1:7001".into()]).unwrap();
        assert_eq!(c.node.name, "env");
        assert_eq!(c.api.listen.port(), 7001);
        assert_eq!(c.mesh.bootstrap.len(), 2);
        assert_eq!(c.mesh.proof_timeout, Duration::from_secs(2));
        let back = Config::resolve(None, vec![], &[]).unwrap();
        assert_eq!(back, Config::default());
    }

    #[test]
    fn bad_settings_name_the_problem() {
        let err = Config::resolve(None, vec![], &["api.nope=1".into()]).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting `api.nope`"),
            "{err}"
        );
        let env = vec![(
            "FUNCMESH_API_LISTEN".to_string(),
            "not an address".to_string(),
        )];
        let err = format!("{:#}", Config::resolve(None, env, &[]).unwrap_err());
        assert!(err.contains("invalid"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[api]\nlisten = \"127.0.0.1:7000\"\ntypo = 1\n").unwrap();
        let err = Config::resolve(Some(&path), vec![], &[]).unwrap_err();
        assert!(err.to_string().contains("typo"), "{err}");
        std::fs::write(&path, "[[endpoint]]\nname = \"a\"\npolicy = \"everyone\"\n").unwrap();
        let err = Config::resolve(Some(&path), vec![], &[]).unwrap_err();
        assert!(err.to_string().contains("unknown policy"), "{err}");
        std::fs::write(
            &path,
            "[[endpoint]]\nname = \"a\"\n[[endpoint]]\nname = \"a\"\n",
        )
        .unwrap();
        let err = Config::resolve(Some(&path), vec![], &[]).unwrap_err();
        assert!(err.to_string().contains("unique"), "{err}");
    }

    #[test]
    fn endpoints_come_from_toml_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[[endpoint]]\nname = \"gpu\"\nruntimes = [\"host\", \"docker\"]\ngpus = 2\n\
             [endpoint.tags]\nsite = \"a\"\n[[endpoint]]\nname = \"cpu\"\npolicy = \"federation\"\n",
        )
        .unwrap();
        let c = Config::resolve(Some(&path), vec![], &[]).unwrap();
        assert_eq!(c.endpoint.len(), 2);
        assert_eq!(c.endpoint[0].gpus, 2);
        assert_eq!(c.endpoint[0].tags["site"], "a");
        assert_eq!(c.endpoint[1].runtimes, vec!["host".to_string()]);
        assert_eq!(c.endpoint[1].policy, "federation");
    }
}
