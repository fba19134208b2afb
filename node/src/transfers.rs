//! Transfers on a node: its endpoints' data roots behind their access policies (what the data
//! plane serves to members), the copy jobs it runs as a destination, and the operations the
//! API offers on any member's data roots (`/v1/transfers`, `/v1/blobs`).
//!
//! Who decides: the node that owns a data root judges every request on it, with the endpoint's
//! policy and, where the policy wants one, a capability token allowing `transfer.read` or
//! `transfer.write` on that path. The asking node picks the token from those it holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use capability::Ability;
use compute::access::{Access, Verdict};
use crdt_registry::record::Policy;
use mesh::PeerId;
use mesh::membership::Member;
use serde::{Deserialize, Serialize};
use transfer::copy::{BoxFuture, Jobs};
use transfer::files::{Ask, Desk, Roots, Want};
use transfer::net::{DataPlane, Remote};
use transfer::root::{DataRoot, RelPath};

/// One endpoint's data root on this node.
struct Root {
    root: Arc<DataRoot>,
    policy: Policy,
    /// The endpoint's registry id.
    id: String,
}

/// This node's data roots, judged by their endpoints' policies.
pub(crate) struct NodeRoots {
    me: PeerId,
    own: Member,
    roots: HashMap<String, Root>,
    mesh: mesh::Handle,
    access: Arc<Access>,
}

fn ability(want: Want) -> Ability {
    match want {
        Want::Read => Ability::TransferRead,
        Want::Write => Ability::TransferWrite,
    }
}

impl NodeRoots {
    /// The data root of this node's endpoint `name`.
    pub(crate) fn local(&self, name: &str) -> Result<Arc<DataRoot>, String> {
        self.roots.get(name).map(|r| r.root.clone()).ok_or_else(|| {
            format!(
                "endpoint {name} on this node has no data root (set data_root in its \
                 [[endpoint]] table)"
            )
        })
    }
}

impl Roots for NodeRoots {
    fn open(&self, peer: &PeerId, ask: &Ask<'_>) -> Result<Arc<DataRoot>, String> {
        let r = self
            .roots
            .get(ask.endpoint)
            .ok_or_else(|| format!("endpoint {} on this node has no data root", ask.endpoint))?;
        if *peer == self.me {
            return Ok(r.root.clone());
        }
        let member = self
            .mesh
            .member(peer)
            .ok_or_else(|| format!("{peer} is not a member connected to this node"))?;
        let why = match compute::access::verdict(
            r.policy,
            self.own.institution.as_deref(),
            member.institution.as_deref(),
        ) {
            Verdict::Admitted => return Ok(r.root.clone()),
            Verdict::Refused(why) => return Err(why),
            Verdict::NeedsToken(why) => why,
        };
        let Some(token) = ask.token else {
            return Err(format!(
                "{why}, and the request carries no token: an admin of {} grants one with \
                 `funcmesh cap grant --ability {}` (narrowed with --path), and the asking \
                 node adds it with `funcmesh cap add`",
                self.own
                    .institution
                    .as_deref()
                    .unwrap_or("this institution"),
                ability(ask.want)
            ));
        };
        let (Some(root), Some(institution)) = (self.access.institution(), member.institution_key)
        else {
            return Err(format!(
                "{why}; a capability token needs a member of an institution on both sides"
            ));
        };
        let req = capability::Request {
            peer: peer.to_string(),
            institution: crdt_registry::Key(institution.0),
            time: mesh::membership::unix_now(),
            endpoint: r.id.clone(),
            function: None,
            ability: ability(ask.want),
            path: Some(ask.path.as_str().to_owned()),
        };
        self.access
            .check(token, &root, &req)
            .map(|()| r.root.clone())
            .map_err(|refusal| format!("capability refused: {refusal}"))
    }
}

/// Where a path of some member's data root is: `ENDPOINT:PATH`, resolved in the registry.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    /// The node that runs the endpoint.
    pub(crate) peer: PeerId,
    /// Its data plane.
    pub(crate) addr: Option<SocketAddr>,
    /// The endpoint's name on that node.
    pub(crate) endpoint: String,
    /// The endpoint's registry id.
    pub(crate) id: String,
    /// Its institution's key and name.
    pub(crate) institution: Option<(crdt_registry::Key, String)>,
    /// Its policy.
    pub(crate) policy: Policy,
    /// The path (checked).
    pub(crate) path: RelPath,
}

/// Splits `ENDPOINT:PATH` (the path may be empty: the root).
pub(crate) fn split_place(text: &str) -> anyhow::Result<(&str, RelPath)> {
    let (ep, path) = text
        .split_once(':')
        .ok_or_else(|| anyhow!("{text:?} is not ENDPOINT:PATH (for example `ep-a:data/run1`)"))?;
    if ep.is_empty() {
        bail!("{text:?} names no endpoint before the `:`");
    }
    Ok((ep, RelPath::parse(path)?))
}

/// The transfer side of a node.
pub(crate) struct Transfers {
    pub(crate) jobs: Jobs,
    store: store::Store,
    pub(crate) plane: DataPlane,
    pub(crate) blobs: transfer::BlobStore,
    pub(crate) roots: Arc<NodeRoots>,
    mesh: mesh::Handle,
    access: Arc<Access>,
}

/// What copy jobs need from the node.
struct JobContext {
    plane: DataPlane,
    mesh: mesh::Handle,
    access: Arc<Access>,
    roots: Arc<NodeRoots>,
}

impl transfer::copy::Context for JobContext {
    fn source<'a>(
        &'a self,
        node: &'a str,
        endpoint: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<(Remote, Option<String>), String>> {
        Box::pin(async move {
            let peer: PeerId = node
                .parse()
                .map_err(|e| format!("the source node {node:?} is not a peer id: {e}"))?;
            let place = resolve_node_endpoint(&self.mesh, peer, endpoint, path)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let token = token_for(&self.access, &self.roots.own, &place, Want::Read)?;
            let addr = place.addr.ok_or_else(|| {
                format!("node {peer} publishes no data-plane address (is it older than transfers?)")
            })?;
            Ok((self.plane.remote(peer, addr), token))
        })
    }

    fn destination(&self, endpoint: &str) -> Result<Arc<DataRoot>, String> {
        self.roots.local(endpoint)
    }
}

/// The token to present for `want` at `place`: none when the policy admits this node's
/// institution, a held token otherwise.
fn token_for(
    access: &Access,
    own: &Member,
    place: &Place,
    want: Want,
) -> Result<Option<String>, String> {
    match compute::access::verdict(
        place.policy,
        place.institution.as_ref().map(|(_, n)| n.as_str()),
        own.institution.as_deref(),
    ) {
        Verdict::Admitted => Ok(None),
        Verdict::Refused(why) => Err(format!("endpoint {}: {why}", place.endpoint)),
        Verdict::NeedsToken(why) => {
            let Some((root, _)) = &place.institution else {
                return Err(format!("endpoint {}: {why}", place.endpoint));
            };
            access
                .token_allowing(
                    &place.id,
                    root,
                    capability::Request {
                        peer: String::new(),
                        institution: crdt_registry::Key([0; 32]),
                        time: mesh::membership::unix_now(),
                        endpoint: place.id.clone(),
                        function: None,
                        ability: ability(want),
                        path: Some(place.path.as_str().to_owned()),
                    },
                )
                .map(Some)
                .map_err(|e| format!("endpoint {} ({why}): {e}", place.endpoint))
        }
    }
}

fn place_of(
    view: &crdt_registry::View,
    ep: &crdt_registry::Endpoint,
    path: RelPath,
) -> anyhow::Result<Place> {
    let peer: PeerId = ep
        .peer_id
        .parse()
        .with_context(|| format!("endpoint {} has a bad node id", ep.record.name))?;
    let node = view.nodes.values().find(|n| n.peer_id == ep.peer_id);
    Ok(Place {
        peer,
        addr: node
            .and_then(|n| n.data_addr.as_deref())
            .and_then(|a| a.parse().ok()),
        endpoint: ep.record.name.clone(),
        id: ep.id.clone(),
        institution: node.and_then(|n| n.institution_key.zip(n.institution.clone())),
        policy: ep.record.policy,
        path,
    })
}

/// Resolves `ENDPOINT:PATH` in the registry.
pub(crate) async fn resolve(mesh: &mesh::Handle, text: &str) -> anyhow::Result<Place> {
    let (ep, path) = split_place(text)?;
    let ep = ep.to_owned();
    mesh.registry_with(move |view| {
        let e = crate::registry::find_endpoint(view, &ep)?;
        place_of(view, e, path)
    })
    .await?
}

async fn resolve_node_endpoint(
    mesh: &mesh::Handle,
    peer: PeerId,
    endpoint: &str,
    path: &str,
) -> anyhow::Result<Place> {
    let path = RelPath::parse(path)?;
    let (peer_s, endpoint) = (peer.to_string(), endpoint.to_owned());
    mesh.registry_with(move |view| {
        let e = view
            .endpoints
            .values()
            .find(|e| e.peer_id == peer_s && e.record.name == endpoint)
            .ok_or_else(|| anyhow!("no endpoint {endpoint} of node {peer_s} in the registry"))?;
        place_of(view, e, path)
    })
    .await?
}

/// Copies other members ask this node to run, into its endpoints' data roots.
struct NodeDesk {
    jobs: Jobs,
    roots: Arc<NodeRoots>,
    mesh: mesh::Handle,
    access: Arc<Access>,
}

impl NodeDesk {
    fn own_job(&self, peer: PeerId, id: &str) -> Result<transfer::copy::Job, String> {
        let job = self
            .jobs
            .get(id)
            .ok_or_else(|| format!("no transfer {id} runs on this node"))?;
        if job.spec.requester != peer.to_string() {
            return Err(format!("transfer {id} was asked for by another member"));
        }
        Ok(job)
    }
}

fn as_json(job: &transfer::copy::Job) -> Result<serde_json::Value, String> {
    serde_json::to_value(job).map_err(|e| e.to_string())
}

impl Desk for NodeDesk {
    fn submit(
        &self,
        peer: PeerId,
        id: String,
        spec: serde_json::Value,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let mut spec: transfer::copy::Spec =
                serde_json::from_value(spec).map_err(|e| format!("not a copy: {e}"))?;
            spec.requester = peer.to_string();
            let dst_path = RelPath::parse(&spec.dst_path).map_err(|e| e.to_string())?;
            self.roots.open(
                &peer,
                &Ask {
                    endpoint: &spec.dst_endpoint,
                    want: Want::Write,
                    path: &dst_path,
                    token: write_token.as_deref(),
                },
            )?;
            // This node reads the source with its own rights; it lends them to nobody: the
            // asking member must be able to read the source itself.
            let src: PeerId = spec
                .src_node
                .parse()
                .map_err(|e| format!("the source node is not a peer id: {e}"))?;
            let place = resolve_node_endpoint(&self.mesh, src, &spec.src_endpoint, &spec.src_path)
                .await
                .map_err(|e| format!("{e:#}"))?;
            may_read(
                &self.access,
                &self.mesh,
                peer,
                &place,
                read_token.as_deref(),
            )?;
            let jobs = self.jobs.clone();
            let job = tokio::task::spawn_blocking(move || jobs.submit(&id, spec))
                .await
                .map_err(|e| e.to_string())??;
            as_json(&job)
        })
    }

    fn status(&self, peer: PeerId, id: &str) -> Result<serde_json::Value, String> {
        as_json(&self.own_job(peer, id)?)
    }

    fn cancel(&self, peer: PeerId, id: &str) -> Result<serde_json::Value, String> {
        self.own_job(peer, id)?;
        as_json(&self.jobs.cancel(id)?)
    }
}

/// Whether the member `peer` may read `place` (its endpoint's policy, or `token`): judged here,
/// offline, as the source's node would judge it.
fn may_read(
    access: &Access,
    mesh: &mesh::Handle,
    peer: PeerId,
    place: &Place,
    token: Option<&str>,
) -> Result<(), String> {
    if place.peer == peer {
        return Ok(());
    }
    let member = mesh
        .member(&peer)
        .ok_or_else(|| format!("{peer} is not a member connected to this node"))?;
    let why = match compute::access::verdict(
        place.policy,
        place.institution.as_ref().map(|(_, n)| n.as_str()),
        member.institution.as_deref(),
    ) {
        Verdict::Admitted => return Ok(()),
        Verdict::Refused(why) => {
            return Err(format!("the source endpoint {}: {why}", place.endpoint));
        }
        Verdict::NeedsToken(why) => why,
    };
    let (Some(token), Some((root, _)), Some(institution)) =
        (token, &place.institution, member.institution_key)
    else {
        return Err(format!(
            "the source endpoint {} ({why}): the asking member presents no token to read it",
            place.endpoint
        ));
    };
    access
        .check(
            token,
            root,
            &capability::Request {
                peer: peer.to_string(),
                institution: crdt_registry::Key(institution.0),
                time: mesh::membership::unix_now(),
                endpoint: place.id.clone(),
                function: None,
                ability: Ability::TransferRead,
                path: Some(place.path.as_str().to_owned()),
            },
        )
        .map_err(|r| format!("reading the source: capability refused: {r}"))
}

/// Starts the transfer side: serves the data roots of `sections` on `plane` and resumes the
/// copy jobs stored in `store`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    sections: &[crate::config::EndpointSection],
    node_key: &crdt_registry::Key,
    own: &Member,
    mesh: &mesh::Handle,
    access: Arc<Access>,
    plane: DataPlane,
    blobs: transfer::BlobStore,
    store: store::Store,
    data_dir: &std::path::Path,
    patience: std::time::Duration,
) -> anyhow::Result<Arc<Transfers>> {
    let mut roots = HashMap::new();
    for s in sections {
        let Some(dir) = &s.data_root else { continue };
        let policy: Policy = s
            .policy
            .parse()
            .map_err(|e: String| anyhow!("[[endpoint]] {}: {e}", s.name))?;
        let root = DataRoot::open(dir).with_context(|| {
            format!(
                "[[endpoint]] {}: cannot open its data_root {}",
                s.name,
                dir.display()
            )
        })?;
        roots.insert(
            s.name.clone(),
            Root {
                root: Arc::new(root),
                policy,
                id: crdt_registry::record::EndpointRecord::id_for(node_key, &s.name),
            },
        );
    }
    let roots = Arc::new(NodeRoots {
        me: mesh.peer_id(),
        own: own.clone(),
        roots,
        mesh: mesh.clone(),
        access: access.clone(),
    });
    plane.serve_roots(roots.clone());
    let jobs = Jobs::start(
        store.clone(),
        Arc::new(JobContext {
            plane: plane.clone(),
            mesh: mesh.clone(),
            access: access.clone(),
            roots: roots.clone(),
        }),
        data_dir.join("transfer").join("parts"),
        patience,
    )
    .map_err(|e| anyhow!("cannot start the transfer jobs: {e}"))?;
    plane.serve_desk(Arc::new(NodeDesk {
        jobs: jobs.clone(),
        roots: roots.clone(),
        mesh: mesh.clone(),
        access: access.clone(),
    }));
    Ok(Arc::new(Transfers {
        jobs,
        store,
        plane,
        blobs,
        roots,
        mesh: mesh.clone(),
        access,
    }))
}

/// `POST /v1/transfers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTransfer {
    /// Makes submitting twice harmless: the same id is the same transfer (default: a new id).
    #[serde(default)]
    pub request_id: Option<String>,
    /// `ENDPOINT:PATH` to copy from.
    pub source: String,
    /// `ENDPOINT:PATH` to copy to (an endpoint of this node).
    pub destination: String,
    /// Copy a directory and everything below it.
    #[serde(default)]
    pub recursive: bool,
    /// Skip files already there: `exists`, `size`, `mtime` or `checksum`.
    #[serde(default)]
    pub sync: Option<String>,
    /// Remove what the source does not have (with `recursive`).
    #[serde(default)]
    pub delete: bool,
}

/// `POST /v1/transfers/mkdir` and `/rm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathOp {
    /// `ENDPOINT:PATH`.
    pub path: String,
    /// For `mkdir`: make parents (and accept an existing directory). For `rm`: remove a
    /// directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// What the API's transfer calls fail with: a status and a message.
pub(crate) type Failure = (axum::http::StatusCode, String);

fn bad(e: impl std::fmt::Display) -> Failure {
    (axum::http::StatusCode::BAD_REQUEST, e.to_string())
}

fn remote_failure(e: transfer::net::Error) -> Failure {
    use axum::http::StatusCode;
    match e {
        transfer::net::Error::Refused { .. } => (StatusCode::FORBIDDEN, e.to_string()),
        _ => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

impl Transfers {
    /// Accepts a copy: run here if the destination is one of this node's endpoints, else
    /// asked of the destination's node (which pulls from the source itself).
    pub(crate) async fn copy(&self, t: NewTransfer) -> Result<transfer::copy::Job, Failure> {
        use axum::http::StatusCode;
        let src = resolve(&self.mesh, &t.source)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let dst = resolve(&self.mesh, &t.destination)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let sync = t.sync.as_deref().map(str::parse).transpose().map_err(bad)?;
        let id = match t.request_id {
            Some(id) => id,
            None => hex::encode(rand::random::<[u8; 12]>()),
        };
        transfer::copy::check_id(&id).map_err(bad)?;
        let me = self.mesh.peer_id();
        let spec = transfer::copy::Spec {
            src_node: src.peer.to_string(),
            src_endpoint: src.endpoint.clone(),
            src_path: src.path.as_str().to_owned(),
            dst_endpoint: dst.endpoint.clone(),
            dst_path: dst.path.as_str().to_owned(),
            recursive: t.recursive,
            sync,
            delete: t.delete,
            requester: me.to_string(),
        };
        if dst.peer == me {
            let jobs = self.jobs.clone();
            return tokio::task::spawn_blocking(move || jobs.submit(&id, spec))
                .await
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| (StatusCode::CONFLICT, e));
        }
        // A third-party copy: the destination's node runs it; this node asks with its own
        // rights to write there and to read the source (both checked by that node).
        let write_token = self.token(&dst, Want::Write)?;
        let read_token = self.token(&src, Want::Read)?;
        let spec = serde_json::to_value(&spec)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let job = self
            .remote_of(&dst)?
            .submit_copy(&id, spec, write_token, read_token)
            .await
            .map_err(remote_failure)?;
        let job: transfer::copy::Job = serde_json::from_value(job).map_err(|e| {
            (
                StatusCode::BAD_GATEWAY,
                format!("{} answered a job that does not parse: {e}", dst.peer),
            )
        })?;
        let key = [transfer::copy::FORWARDED, id.as_bytes()].concat();
        let peer = dst.peer.to_string();
        self.store
            .blocking(move |s| s.put(store::cf::TRANSFERS, &key, peer.as_bytes()))
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(job)
    }

    /// A copy job: run here, or asked of another node by this one.
    pub(crate) async fn status(
        &self,
        id: &str,
        cancel: bool,
    ) -> Result<transfer::copy::Job, Failure> {
        use axum::http::StatusCode;
        let jobs = self.jobs.clone();
        let local = {
            let id = id.to_owned();
            tokio::task::spawn_blocking(move || {
                if cancel {
                    jobs.get(&id).map(|_| jobs.cancel(&id))
                } else {
                    jobs.get(&id).map(Ok)
                }
            })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        };
        if let Some(job) = local {
            return job.map_err(|e| (StatusCode::CONFLICT, e));
        }
        let key = [transfer::copy::FORWARDED, id.as_bytes()].concat();
        let peer = self
            .store
            .blocking(move |s| s.get(store::cf::TRANSFERS, &key))
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|p| p.parse::<PeerId>().ok())
            .ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!("no transfer {id} runs on this node or was asked for by it"),
                )
            })?;
        let addr = self
            .mesh
            .registry_with({
                let p = peer.to_string();
                move |view| view.nodes.get(&p).and_then(|n| n.data_addr.clone())
            })
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                (
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "node {peer}, which runs transfer {id}, publishes no data-plane address"
                    ),
                )
            })?;
        let job = self
            .plane
            .remote(peer, addr)
            .copy_status(id, cancel)
            .await
            .map_err(remote_failure)?;
        serde_json::from_value(job).map_err(|e| {
            (
                StatusCode::BAD_GATEWAY,
                format!("{peer} answered a job that does not parse: {e}"),
            )
        })
    }

    fn remote_of(&self, place: &Place) -> Result<Remote, Failure> {
        let addr = place.addr.ok_or_else(|| {
            (
                axum::http::StatusCode::BAD_GATEWAY,
                format!("node {} publishes no data-plane address", place.peer),
            )
        })?;
        Ok(self.plane.remote(place.peer, addr))
    }

    fn token(&self, place: &Place, want: Want) -> Result<Option<String>, Failure> {
        token_for(&self.access, &self.roots.own, place, want)
            .map_err(|e| (axum::http::StatusCode::FORBIDDEN, e))
    }

    /// `ls ENDPOINT:PATH`: a directory's entries, or a file's own.
    pub(crate) async fn ls(&self, text: &str) -> Result<Vec<transfer::root::Entry>, Failure> {
        let place = resolve(&self.mesh, text)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token(&place, Want::Read)?;
        let remote = self.remote_of(&place)?;
        let entry = remote
            .stat(&place.endpoint, place.path.as_str(), token.clone())
            .await
            .map_err(remote_failure)?;
        if entry.kind != transfer::root::Kind::Dir {
            return Ok(vec![entry]);
        }
        remote
            .list(&place.endpoint, place.path.as_str(), token)
            .await
            .map_err(remote_failure)
    }

    /// `mkdir ENDPOINT:PATH`.
    /// What is at `ENDPOINT:PATH` (a file, a directory, ...).
    pub(crate) async fn stat(&self, text: &str) -> Result<transfer::root::Entry, Failure> {
        let place = resolve(&self.mesh, text)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token(&place, Want::Read)?;
        self.remote_of(&place)?
            .stat(&place.endpoint, place.path.as_str(), token)
            .await
            .map_err(remote_failure)
    }

    pub(crate) async fn mkdir(&self, op: &PathOp) -> Result<(), Failure> {
        let place = resolve(&self.mesh, &op.path)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token(&place, Want::Write)?;
        self.remote_of(&place)?
            .mkdir(&place.endpoint, place.path.as_str(), op.recursive, token)
            .await
            .map_err(remote_failure)
    }

    /// `rm ENDPOINT:PATH`.
    pub(crate) async fn rm(&self, op: &PathOp) -> Result<(), Failure> {
        let place = resolve(&self.mesh, &op.path)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token(&place, Want::Write)?;
        self.remote_of(&place)?
            .remove(&place.endpoint, place.path.as_str(), op.recursive, token)
            .await
            .map_err(remote_failure)
    }
}
