//! An endpoint's configuration, as the node's `[[endpoint]]` table gives it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::environment::Environment;

/// How an endpoint keeps workers for an environment between tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A fresh worker (container) per task, stopped after it.
    Cold,
    /// Keep idle workers until the idle timeout (the default).
    #[default]
    Warm,
    /// Keep `prewarm` workers ready at all times, and others as `warm`.
    Prewarm,
}

/// Whom host workers run as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostUser {
    /// A fresh unprivileged uid per worker (no account needed), in a scratch directory outside
    /// the data dir with a cleared environment, when the node runs as root; the node's own
    /// user otherwise.
    #[default]
    Auto,
    /// Always the node's own user (for functions that need its files or software).
    Node,
}

/// Whom a warm worker may serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkersPer {
    /// One institution's tasks (the default): never another institution's code.
    #[default]
    Institution,
    /// One submitting node's tasks: not even another node of the same institution's.
    Node,
}

/// One endpoint's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its name, unique on its node.
    pub name: String,
    /// Most workers running at once, across environments.
    pub max_workers: usize,
    /// Most container workers running at once (LRU idle ones are evicted to make room).
    pub container_cap: usize,
    /// How workers are kept.
    pub strategy: Strategy,
    /// With `prewarm`: how many workers to keep ready per listed environment.
    pub prewarm: usize,
    /// With `prewarm`: the environments to keep ready (`host`, `docker:<image>`).
    pub prewarm_environments: Vec<String>,
    /// How long an idle worker is kept, with `warm` and `prewarm`.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// How long a worker may take to start (a container's image pulled and started, the
    /// interpreter up) before it is given up; 0: no limit.
    #[serde(with = "humantime_serde_compat")]
    pub start_timeout: Duration,
    /// Default time limit per task (0: none).
    #[serde(with = "humantime_serde_compat")]
    pub task_timeout: Duration,
    /// The longest time limit a submitter may ask for; a task asking for more is refused
    /// (0: no maximum).
    #[serde(with = "humantime_serde_compat")]
    pub max_task_timeout: Duration,
    /// Memory limit per task, MiB of address space beyond the worker's own, hard (default
    /// 4096; 0: none).
    pub task_memory_mb: u64,
    /// Largest result, bytes, as JSON (default 10 GiB). Results over the node's inline limit go
    /// by reference, as blobs; on a node without blobs, results go inline, and at most
    /// [`crate::task::MAX_ARGUMENTS_BYTES`].
    pub result_limit: u64,
    /// Cap on captured shell output, characters per stream.
    pub output_cap: u64,
    /// How long finished tasks are kept.
    #[serde(with = "humantime_serde_compat")]
    pub retention: Duration,
    /// Most tasks sent to one worker in one batch.
    pub batch_max: usize,
    /// Most tasks the endpoint holds unfinished (queued or running); submitters beyond it are
    /// told to come back (`Busy`), and keep their tasks until it has room.
    pub max_queued: usize,
    /// Most bytes of arguments the endpoint holds for unfinished tasks. One institution may
    /// hold at most half of this and half of `max_queued`, so that another always finds room.
    pub max_queued_bytes: u64,
    /// The Python interpreter for host workers.
    pub python: String,
    /// Runtimes offered (`host`, `docker`, `podman`, `apptainer`).
    pub runtimes: Vec<String>,
    /// Whom host workers run as.
    pub host_user: HostUser,
    /// Whom a warm worker may serve: one institution's tasks, or one submitting node's.
    pub workers_per: WorkersPer,
    /// Give containers a network (default: none, `--network none`).
    pub container_network: bool,
    /// Most processes in one container (`--pids-limit`).
    pub container_pids: u32,
    /// Container images this endpoint runs: exact names, or prefixes ending in `*`. Empty: the
    /// images of `prewarm_environments` and `funcmesh/*` (what `scripts/build-image.sh`
    /// builds).
    pub images: Vec<String>,
    /// Whether tasks of other institutions may run on the `host` runtime when host workers
    /// run as the node's own user (they could read its key, its API token and its store).
    /// Without isolation and without this, such tasks are refused.
    pub foreign_host_tasks: bool,
    /// Simulated workers, for scale experiments: no process is started; every task returns
    /// `null` after this many milliseconds (`None`: real workers).
    pub simulate_ms: Option<u64>,
    /// Most finished, unacknowledged tasks whose ids the endpoint keeps in memory (about 100
    /// bytes each), so that redelivery sweeps read them by key; past it they scan the store.
    pub outbox_in_memory: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            name: "default".into(),
            max_workers: 2,
            container_cap: 4,
            strategy: Strategy::Warm,
            prewarm: 1,
            prewarm_environments: vec!["host".into()],
            idle_timeout: Duration::from_secs(300),
            start_timeout: Duration::from_secs(120),
            task_timeout: Duration::from_secs(3600),
            max_task_timeout: Duration::from_secs(24 * 3600),
            task_memory_mb: 4096,
            result_limit: 10 << 30,
            output_cap: 64 << 10,
            retention: Duration::from_secs(7 * 24 * 3600),
            batch_max: 64,
            max_queued: 100_000,
            max_queued_bytes: 1 << 30,
            python: "python3".into(),
            runtimes: vec!["host".into()],
            host_user: HostUser::Auto,
            workers_per: WorkersPer::Institution,
            foreign_host_tasks: false,
            simulate_ms: None,
            outbox_in_memory: 100_000,
            container_network: false,
            container_pids: 512,
            images: Vec::new(),
        }
    }
}

/// The largest `result_limit` an endpoint may set.
pub const MAX_RESULT_LIMIT: u64 = 1 << 40;

impl EndpointConfig {
    /// Whether host workers run isolated on this machine: `host_user = "auto"` and the node
    /// runs as root.
    #[allow(unsafe_code)]
    pub fn isolates_host_workers(&self) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        self.host_user == HostUser::Auto && unsafe { libc::geteuid() } == 0
    }

    /// Whether the operator accepts containers of `image`.
    pub fn image_allowed(&self, image: &str) -> bool {
        let matches = |pattern: &str| match pattern.strip_suffix('*') {
            Some(prefix) => image.starts_with(prefix),
            None => image == pattern,
        };
        if self.images.is_empty() {
            matches("funcmesh/*")
                || self
                    .prewarm_environments
                    .iter()
                    .filter_map(|e| Environment::parse(e).ok())
                    .any(|e| e.image.as_deref() == Some(image))
        } else {
            self.images.iter().any(|p| matches(p))
        }
    }

    /// The images accepted, as the refusal of another one names them.
    pub fn images_accepted(&self) -> String {
        if self.images.is_empty() {
            let mut list = vec!["funcmesh/*".to_owned()];
            list.extend(
                self.prewarm_environments
                    .iter()
                    .filter_map(|e| Environment::parse(e).ok())
                    .filter_map(|e| e.image),
            );
            list.join(", ")
        } else {
            self.images.join(", ")
        }
    }

    /// What `funcmesh endpoint show` says about host isolation.
    pub fn host_isolation(&self) -> &'static str {
        match (self.isolates_host_workers(), self.foreign_host_tasks) {
            (true, _) => "uid",
            (false, false) => "node-user",
            (false, true) => "node-user, foreign tasks allowed",
        }
    }

    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let at = format!("[[endpoint]] `{}`", self.name);
        if self.max_workers == 0 {
            return Err(format!("{at}: max_workers must be at least 1"));
        }
        if self.batch_max == 0 {
            return Err(format!("{at}: batch_max must be at least 1"));
        }
        if self.max_queued == 0 {
            return Err(format!("{at}: max_queued must be at least 1"));
        }
        // Results over the node's inline limit go by reference, as blobs: up to this.
        let most = MAX_RESULT_LIMIT;
        if self.result_limit > most {
            return Err(format!(
                "{at}: result_limit is {} bytes; it may be at most {most} (1 TiB)",
                self.result_limit
            ));
        }
        for e in &self.prewarm_environments {
            Environment::parse(e).map_err(|err| format!("{at}: prewarm_environments: {err}"))?;
        }
        for r in &self.runtimes {
            if !["host", "docker", "podman", "apptainer"].contains(&r.as_str()) {
                return Err(format!(
                    "{at}: runtime `{r}` is not one of host, docker, podman, apptainer"
                ));
            }
        }
        Ok(())
    }

    /// The environments kept ready with `prewarm`.
    pub fn prewarmed(&self) -> Vec<Environment> {
        if self.strategy != Strategy::Prewarm {
            return Vec::new();
        }
        self.prewarm_environments
            .iter()
            .filter_map(|e| Environment::parse(e).ok())
            .collect()
    }
}

/// Durations as humantime strings (`"30s"`, `"5m"`), as the node config writes them.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_limit_past_a_tebibyte_is_refused_with_the_most_allowed() {
        let ok = EndpointConfig {
            name: "ep".into(),
            result_limit: MAX_RESULT_LIMIT,
            ..EndpointConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let too_big = EndpointConfig {
            result_limit: ok.result_limit + 1,
            ..ok
        };
        let err = too_big.validate().unwrap_err();
        assert!(
            err.contains("result_limit") && err.contains(&MAX_RESULT_LIMIT.to_string()),
            "{err}"
        );
    }
}
