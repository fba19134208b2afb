//! The node's use of the registry: publishing its own records on start, registering functions,
//! and finding records by id, id prefix or name.

use anyhow::{Context as _, bail};
use crdt_registry::record::{
    Body, Capabilities, Container, EndpointRecord, FunctionKind, FunctionRecord, FunctionSpec,
    InstitutionRecord, Kind, NodeRecord, Policy,
};
use crdt_registry::{Endpoint, Function, Key, View};
use mesh::membership::Proof;
use serde::{Deserialize, Serialize};

use crate::config::EndpointSection;

/// What `POST /v1/functions` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFunction {
    /// Its name.
    pub name: String,
    /// Python source, with `entrypoint`.
    #[serde(default)]
    pub python: Option<String>,
    /// The Python function to call.
    #[serde(default)]
    pub entrypoint: Option<String>,
    /// A serialized (cloudpickle, base64) Python function from the SDK.
    #[serde(default)]
    pub payload: Option<String>,
    /// A shell command template.
    #[serde(default)]
    pub shell: Option<String>,
    /// `RUNTIME:IMAGE`, e.g. `docker:python:3.12-slim`.
    #[serde(default)]
    pub container: Option<String>,
    /// What it does.
    #[serde(default)]
    pub description: String,
}

/// Largest Python source accepted (the entry, with everything else, must stay under the
/// registry's 256 KiB entry limit).
const MAX_SOURCE_BYTES: usize = 200 * 1024;

impl NewFunction {
    /// The function record owned by `owner`, or what is wrong with the request.
    pub fn record(&self, owner: Key, now_ms: u64) -> anyhow::Result<FunctionRecord> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 200 {
            bail!("a function needs a name of 1 to 200 characters");
        }
        let (kind, spec) = match (&self.python, &self.payload, &self.shell) {
            (Some(source), None, None) => {
                let Some(entrypoint) = self.entrypoint.as_deref().map(str::trim) else {
                    bail!("a Python function needs --entrypoint: the function in the file to call");
                };
                if !is_identifier(entrypoint) {
                    bail!("--entrypoint {entrypoint:?} is not a Python identifier");
                }
                if source.len() > MAX_SOURCE_BYTES {
                    bail!(
                        "the Python source is {} bytes, at most {MAX_SOURCE_BYTES}: ship large \
                         code in a container image instead",
                        source.len()
                    );
                }
                if !source.contains(&format!("def {entrypoint}")) {
                    bail!("the Python source defines no function {entrypoint:?}");
                }
                (
                    FunctionKind::Python,
                    FunctionSpec::PythonSource {
                        source: source.clone(),
                        entrypoint: entrypoint.to_string(),
                    },
                )
            }
            (None, Some(payload), None) => (
                FunctionKind::Python,
                FunctionSpec::PythonPayload {
                    payload: payload.clone(),
                },
            ),
            (None, None, Some(command)) => {
                if command.trim().is_empty() {
                    bail!("the shell command is empty");
                }
                (
                    FunctionKind::Shell,
                    FunctionSpec::Shell {
                        command: command.clone(),
                    },
                )
            }
            _ => bail!(
                "give exactly one of --python FILE (with --entrypoint), --shell 'COMMAND {{arg}}' \
                 or a serialized payload"
            ),
        };
        let container = self.container.as_deref().map(parse_container).transpose()?;
        Ok(FunctionRecord {
            name: name.to_string(),
            owner,
            kind,
            spec,
            container,
            description: self.description.clone(),
            created_ms: now_ms,
        })
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `RUNTIME:IMAGE`.
pub fn parse_container(s: &str) -> anyhow::Result<Container> {
    let Some((runtime, image)) = s.split_once(':') else {
        bail!("--container {s:?}: expected RUNTIME:IMAGE, e.g. docker:python:3.12-slim");
    };
    if !["docker", "podman", "apptainer"].contains(&runtime) {
        bail!("--container {s:?}: unknown runtime {runtime:?}: use docker, podman or apptainer");
    }
    if image.trim().is_empty() {
        bail!("--container {s:?}: the image is empty");
    }
    Ok(Container {
        runtime: runtime.into(),
        image: image.into(),
    })
}

/// The endpoint record for a config table.
pub fn endpoint_record(e: &EndpointSection, node: Key) -> EndpointRecord {
    let cores = if e.cores == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        e.cores
    };
    let memory_mb = if e.memory_mb == 0 {
        machine_memory_mb()
    } else {
        e.memory_mb
    };
    EndpointRecord {
        host_isolation: e.compute().host_isolation().to_owned(),
        name: e.name.clone(),
        description: e.description.clone(),
        node,
        capabilities: Capabilities {
            cores,
            memory_mb,
            gpus: e.gpus,
            tags: e.tags.clone(),
        },
        runtimes: e.runtimes.clone(),
        policy: e.policy.parse().unwrap_or(Policy::default()),
        public: e.public,
    }
}

fn machine_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Publishes this node's institution, node and endpoint records, writing only what differs
/// from what the registry already says; endpoints no longer configured are deleted.
pub async fn publish_own(
    mesh: &mesh::Handle,
    keypair_key: Key,
    name: &str,
    proof: &Proof,
    addrs: Vec<String>,
    data_addr: Option<String>,
    endpoints: &[EndpointSection],
) -> anyhow::Result<()> {
    let view = mesh.registry().await?;
    if let Proof::Member { admission, .. } = proof {
        let inst_key = admission
            .verify(&admission.genesis.verify()?)
            .map(|b| Key(b.institution_key.0))?;
        if !view.institutions.contains_key(&inst_key) {
            let admission = serde_json::to_string(admission).context("admission")?;
            mesh.registry_write(
                inst_key.to_string(),
                Body::Institution(InstitutionRecord { admission }),
            )
            .await?;
        }
    }
    let proof_json = String::from_utf8(proof.to_bytes()).context("proof")?;
    let current = view.node_by_key(&keypair_key);
    let same =
        current.is_some_and(|n| n.name == name && n.addrs == addrs && n.data_addr == data_addr);
    if !same {
        mesh.registry_write(
            keypair_key.to_string(),
            Body::Node(NodeRecord {
                name: name.to_string(),
                proof: proof_json,
                addrs,
                data_addr,
            }),
        )
        .await?;
    }
    let mut wanted = std::collections::HashSet::new();
    for e in endpoints {
        let rec = endpoint_record(e, keypair_key);
        let id = EndpointRecord::id_for(&keypair_key, &rec.name);
        wanted.insert(id.clone());
        if view.endpoints.get(&id).is_some_and(|cur| cur.record == rec) {
            continue;
        }
        mesh.registry_write(id, Body::Endpoint(rec)).await?;
    }
    for (id, ep) in &view.endpoints {
        if ep.record.node == keypair_key && !wanted.contains(id) {
            mesh.registry_write(id.clone(), Body::Deleted { of: Kind::Endpoint })
                .await?;
        }
    }
    Ok(())
}

/// Finds one record by exact id, unique id prefix (6+ characters) or unique name.
pub fn find<'a, T>(
    what: &str,
    items: impl Iterator<Item = (&'a String, &'a T)> + Clone,
    name_of: impl Fn(&T) -> &str,
    query: &str,
) -> anyhow::Result<&'a T> {
    if let Some((_, t)) = items.clone().find(|(id, _)| id.as_str() == query) {
        return Ok(t);
    }
    let by_name: Vec<_> = items.clone().filter(|(_, t)| name_of(t) == query).collect();
    let by_prefix: Vec<_> = if query.len() >= 6 {
        items.filter(|(id, _)| id.starts_with(query)).collect()
    } else {
        Vec::new()
    };
    match (by_name.as_slice(), by_prefix.as_slice()) {
        ([(_, t)], _) | ([], [(_, t)]) => Ok(t),
        ([], []) => bail!(
            "no {what} {query:?} in the registry: list them with `funcmesh {what} list` (a new \
             registration reaches every node within seconds)"
        ),
        (many, _) if !many.is_empty() => bail!(
            "{} {what}s are named {query:?}: use an id ({})",
            many.len(),
            many.iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (_, many) => bail!(
            "{query:?} is the start of {} {what} ids: give more of it",
            many.len()
        ),
    }
}

/// Finds a function.
pub fn find_function<'a>(view: &'a View, query: &str) -> anyhow::Result<&'a Function> {
    find(
        "function",
        view.functions.iter(),
        |f: &Function| f.record.name.as_str(),
        query,
    )
}

/// Finds an endpoint.
pub fn find_endpoint<'a>(view: &'a View, query: &str) -> anyhow::Result<&'a Endpoint> {
    find(
        "endpoint",
        view.endpoints.iter(),
        |e: &Endpoint| e.record.name.as_str(),
        query,
    )
}
