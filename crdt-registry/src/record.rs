//! The record kinds an entry carries: the document schema, version 1.
//!
//! These are wire and storage types: they change only by adding a new format. The typed view
//! ([`crate::View`]) turns the valid ones into the structures callers read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::key::{Key, owned_id};

/// The kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An admitted institution.
    Institution,
    /// A member node.
    Node,
    /// An endpoint that runs functions.
    Endpoint,
    /// A registered function.
    Function,
    /// A flow definition.
    Flow,
    /// A revocation.
    Revocation,
    /// A registry checkpoint: where superseded entries were pruned.
    Checkpoint,
}

impl Kind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Institution => "institution",
            Kind::Node => "node",
            Kind::Endpoint => "endpoint",
            Kind::Function => "function",
            Kind::Flow => "flow",
            Kind::Revocation => "revocation",
            Kind::Checkpoint => "checkpoint",
        }
    }
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Body {
    /// An institution, proven by its admission.
    Institution(InstitutionRecord),
    /// A node, proven by its membership proof.
    Node(NodeRecord),
    /// An endpoint of the author's node.
    Endpoint(EndpointRecord),
    /// A function owned by the author.
    Function(FunctionRecord),
    /// A flow owned by the author.
    Flow(FlowRecord),
    /// A revocation issued by the author.
    Revocation(RevocationRecord),
    /// A checkpoint of the registry, written with the federation key.
    Checkpoint(CheckpointRecord),
    /// The owner deleted the record `(of, id)`.
    Deleted {
        /// The kind deleted.
        of: Kind,
    },
}

impl Body {
    /// The kind of record this entry is about.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Institution(_) => Kind::Institution,
            Body::Node(_) => Kind::Node,
            Body::Endpoint(_) => Kind::Endpoint,
            Body::Function(_) => Kind::Function,
            Body::Flow(_) => Kind::Flow,
            Body::Revocation(_) => Kind::Revocation,
            Body::Checkpoint(_) => Kind::Checkpoint,
            Body::Deleted { of } => *of,
        }
    }
}

/// A checkpoint: the federation key's statement that the registry's next epoch starts from the
/// entries that counted at `heads`, written as a base that every member derives the same way
/// (see `docs/design/registry-checkpoints.md`). Its entry id is [`CheckpointRecord::id_for`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecord {
    /// The epoch it starts: one more than the document's.
    pub epoch: u64,
    /// The document's heads it was made at, hex, sorted.
    pub heads: Vec<String>,
    /// The hash of the base's last change, hex: a member that derives another base refuses the
    /// checkpoint.
    pub base: String,
    /// Entries in the base.
    pub kept: u64,
    /// Superseded entries left out of it.
    pub pruned: u64,
}

impl CheckpointRecord {
    /// The id of the checkpoint entry that starts `epoch`.
    pub fn id_for(epoch: u64) -> String {
        format!("epoch-{epoch}")
    }
}

/// An institution: the federation key's admission, as issued by `funcmesh federation admit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstitutionRecord {
    /// The admission document (JSON), verified by [`crate::Authority::admission`].
    pub admission: String,
}

/// A node of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// Its human name.
    pub name: String,
    /// Its membership proof (JSON), verified by [`crate::Authority::membership`].
    pub proof: String,
    /// Addresses it listens on for the mesh.
    pub addrs: Vec<String>,
    /// Where its data plane listens, once it has one.
    pub data_addr: Option<String>,
}

/// What an endpoint offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// CPU cores.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// GPUs.
    pub gpus: u32,
    /// Free-form tags (`site=uni-a`, `arch=x86_64`, ...).
    pub tags: BTreeMap<String, String>,
}

/// Who may use an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Members of the endpoint's institution, and holders of a capability token (the default).
    #[default]
    InstitutionAndCapability,
    /// Members of the endpoint's institution only.
    Institution,
    /// Any member of the federation.
    Federation,
    /// Holders of a valid capability token only.
    Capability,
}

impl Policy {
    /// Name as written in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::InstitutionAndCapability => "institution-and-capability",
            Policy::Institution => "institution",
            Policy::Federation => "federation",
            Policy::Capability => "capability",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "institution-and-capability" | "default" => Policy::InstitutionAndCapability,
            "institution" => Policy::Institution,
            "federation" => Policy::Federation,
            "capability" => Policy::Capability,
            other => {
                return Err(format!(
                    "unknown policy {other:?}: use institution, federation, capability or \
                     institution-and-capability"
                ));
            }
        })
    }
}

/// An endpoint of the author's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRecord {
    /// Its name, unique on its node.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// The node running it: must be the author.
    pub node: Key,
    /// What it offers.
    pub capabilities: Capabilities,
    /// Runtimes it can run functions in: `host`, `docker`, `podman`, `apptainer`.
    pub runtimes: Vec<String>,
    /// Who may use it.
    pub policy: Policy,
    /// Listed for everyone in the federation to see.
    pub public: bool,
    /// How its host workers are isolated: `uid` (a uid of their own each, outside the data
    /// dir), `node-user` (as the node's user; other institutions' host tasks are refused) or
    /// `node-user, foreign tasks allowed`. Empty when not said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_isolation: String,
}

impl EndpointRecord {
    /// The id of the endpoint `name` on the node with key `node`.
    pub fn id_for(node: &Key, name: &str) -> String {
        owned_id("endpoint", node, name.as_bytes())
    }
}

/// A function's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// Python.
    Python,
    /// A shell command template.
    Shell,
}

/// What runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum FunctionSpec {
    /// Python source and the function in it to call.
    PythonSource {
        /// The module source.
        source: String,
        /// The function to call.
        entrypoint: String,
    },
    /// A serialized (cloudpickle) Python function from the SDK, base64.
    PythonPayload {
        /// The payload, base64.
        payload: String,
    },
    /// A command template: `{name}` placeholders are filled from the task's arguments.
    Shell {
        /// The template.
        command: String,
    },
}

/// Where a function runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// `docker`, `podman` or `apptainer`.
    pub runtime: String,
    /// The image.
    pub image: String,
}

/// A function owned by the author. Its id is derived from its content and owner
/// ([`FunctionRecord::content_id`]), so an endpoint can check that the code it runs is the code
/// that was registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    /// Its name (names need not be unique; ids are).
    pub name: String,
    /// The owner: must be the author.
    pub owner: Key,
    /// Python or shell.
    pub kind: FunctionKind,
    /// What runs.
    pub spec: FunctionSpec,
    /// The container it runs in, if any.
    pub container: Option<Container>,
    /// What it does.
    pub description: String,
    /// When it was registered, Unix milliseconds.
    pub created_ms: u64,
}

#[derive(Serialize)]
struct FunctionContent<'a> {
    name: &'a str,
    kind: FunctionKind,
    spec: &'a FunctionSpec,
    container: &'a Option<Container>,
}

impl FunctionRecord {
    /// The content-derived id: hash of owner, name, kind, spec and container (not the
    /// description or time, which may change without changing what runs).
    pub fn content_id(&self) -> String {
        let content = FunctionContent {
            name: &self.name,
            kind: self.kind,
            spec: &self.spec,
            container: &self.container,
        };
        let canonical = serde_json::to_vec(&content).expect("function content always serialises");
        owned_id("function", &self.owner, &canonical)
    }
}

/// A flow owned by the author (run by the flows engine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRecord {
    /// Its title.
    pub title: String,
    /// The owner: must be the author.
    pub owner: Key,
    /// The definition (Globus Flows dialect).
    pub definition: serde_json::Value,
    /// JSON schema of its input.
    pub input_schema: serde_json::Value,
    /// What it does.
    pub description: String,
    /// Chosen at creation; with the owner it makes the id ([`FlowRecord::id_for`]).
    pub nonce: String,
}

impl FlowRecord {
    /// The id of the flow created by `owner` with `nonce`.
    pub fn id_for(owner: &Key, nonce: &str) -> String {
        owned_id("flow", owner, nonce.as_bytes())
    }
}

/// What a revocation revokes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "lowercase")]
pub enum Target {
    /// A node key: by its institution's key or the federation key.
    Node {
        /// The node's key.
        key: Key,
    },
    /// An institution: by the federation key.
    Institution {
        /// The institution's key.
        key: Key,
    },
    /// A capability token block, by its revocation id: by the key that signed the block.
    Token {
        /// The revocation id (hex).
        revocation_id: String,
    },
}

impl Target {
    /// The revocation's id: the target in words.
    pub fn id(&self) -> String {
        match self {
            Target::Node { key } => format!("node:{key}"),
            Target::Institution { key } => format!("institution:{key}"),
            Target::Token { revocation_id } => format!("token:{revocation_id}"),
        }
    }
}

/// A revocation, issued by the author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRecord {
    /// What is revoked.
    pub target: Target,
    /// Why, in words.
    pub reason: String,
}
