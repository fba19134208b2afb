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

/// This node's data roots, judged by their endpoints' policies and shares.
pub(crate) struct NodeRoots {
    me: PeerId,
    own: Member,
    roots: HashMap<String, Root>,
    mesh: mesh::Handle,
    access: Arc<Access>,
    store: store::Store,
    /// The shares of every root, as stored.
    shares: std::sync::RwLock<Vec<Share>>,
}

/// A share of a data root (Globus' access rule on a guest collection): one institution, or one
/// node, may read — or read and write — below a path, without a token, whatever the endpoint's
/// policy. Made and removed by members of the endpoint's own institution only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Its id (16 hex digits).
    pub id: String,
    /// The endpoint (its name on this node).
    pub endpoint: String,
    /// The path shared, relative to the data root (`""`: all of it).
    pub path: String,
    /// `institution:<key>` or `node:<peer id>`.
    pub principal: String,
    /// Writing too.
    pub write: bool,
    /// The node that made it.
    pub created_by: String,
    /// When, Unix seconds.
    pub created_at: u64,
}

/// Most shares one data root keeps.
pub const MAX_SHARES: usize = 1000;

fn share_key(endpoint: &str, id: &str) -> Vec<u8> {
    let mut k = transfer::copy::SHARES.to_vec();
    k.extend_from_slice(format!("{endpoint}/{id}").as_bytes());
    k
}

/// Checks a share's principal: `institution:<key>` or `node:<peer id>`.
fn check_principal(principal: &str) -> Result<(), String> {
    if let Some(peer) = principal.strip_prefix("node:") {
        return peer
            .parse::<PeerId>()
            .map(|_| ())
            .map_err(|e| format!("{peer:?} is not a peer id: {e}"));
    }
    if capability::institution_of_term(principal).is_some() {
        return Ok(());
    }
    Err(format!(
        "a share's principal is institution:<key> or node:<peer id>, not {principal:?}"
    ))
}

fn ability(want: Want) -> Ability {
    match want {
        Want::Read => Ability::TransferRead,
        Want::Write => Ability::TransferWrite,
    }
}

impl NodeRoots {
    /// Whether a share of `endpoint` lets `peer` (of `member`'s institution) do `want` at
    /// `path`.
    fn shared(
        &self,
        endpoint: &str,
        peer: &PeerId,
        member: &Member,
        want: Want,
        path: &str,
    ) -> bool {
        let node = format!("node:{peer}");
        let institution = member
            .institution_key
            .map(|k| capability::institution_term(&crdt_registry::Key(k.0)));
        self.shares
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|s| {
                s.endpoint == endpoint
                    && (s.principal == node || Some(&s.principal) == institution.as_ref())
                    && (want == Want::Read || s.write)
                    && capability::under(path, &s.path)
            })
    }

    /// Whether `peer` may manage this node's shares: this node, or a member of its institution.
    fn may_manage(&self, peer: &PeerId) -> Result<(), String> {
        if *peer == self.me {
            return Ok(());
        }
        let theirs = self.mesh.member(peer).and_then(|m| m.institution_key);
        match (theirs, self.access.institution()) {
            (Some(t), Some(o)) if crdt_registry::Key(t.0) == o => Ok(()),
            _ => Err(format!(
                "only members of {} manage the shares of its endpoints",
                self.own
                    .institution
                    .as_deref()
                    .unwrap_or("this node's institution")
            )),
        }
    }

    /// Loads the stored shares.
    fn load_shares(&self) -> anyhow::Result<()> {
        let rows = self
            .store
            .scan_prefix(store::cf::TRANSFERS, transfer::copy::SHARES)
            .context("reading the data-root shares")?;
        let mut shares = Vec::new();
        for (key, value) in rows {
            match serde_json::from_slice::<Share>(&value) {
                Ok(s) => shares.push(s),
                Err(e) => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    error = %e,
                    "an unreadable share record: ignored"
                ),
            }
        }
        *self
            .shares
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = shares;
        Ok(())
    }

    /// Lists or changes the shares of `endpoint` (the caller may manage them).
    async fn change_shares(
        &self,
        endpoint: String,
        created_by: &PeerId,
        change: transfer::wire::ShareChange,
    ) -> Result<serde_json::Value, String> {
        use transfer::wire::ShareChange;
        if !self.roots.contains_key(&endpoint) {
            return Err(format!("endpoint {endpoint} on this node has no data root"));
        }
        let current: Vec<Share> = self
            .shares
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.endpoint == endpoint)
            .cloned()
            .collect();
        match change {
            ShareChange::List => Ok(serde_json::to_value(current).unwrap_or_default()),
            ShareChange::Add {
                path,
                principal,
                write,
            } => {
                let path = RelPath::parse(&path).map_err(|e| e.to_string())?;
                check_principal(&principal)?;
                if let Some(same) = current.iter().find(|s| {
                    s.path == path.as_str() && s.principal == principal && s.write == write
                }) {
                    return Ok(serde_json::to_value(same).unwrap_or_default());
                }
                if current.len() >= MAX_SHARES {
                    return Err(format!(
                        "endpoint {endpoint} has {MAX_SHARES} shares, the most it keeps: remove                          some first"
                    ));
                }
                let share = Share {
                    id: hex::encode(rand::random::<[u8; 8]>()),
                    endpoint,
                    path: path.as_str().to_owned(),
                    principal,
                    write,
                    created_by: created_by.to_string(),
                    created_at: mesh::membership::unix_now(),
                };
                let bytes = serde_json::to_vec(&share).map_err(|e| e.to_string())?;
                let key = share_key(&share.endpoint, &share.id);
                self.store
                    .blocking(move |s| s.put(store::cf::TRANSFERS, &key, &bytes))
                    .await
                    .map_err(|e| format!("cannot store the share: {e}"))?;
                self.shares
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(share.clone());
                Ok(serde_json::to_value(share).unwrap_or_default())
            }
            ShareChange::Remove { id } => {
                let share = current
                    .into_iter()
                    .find(|s| s.id == id)
                    .ok_or_else(|| format!("endpoint {endpoint} has no share {id}"))?;
                let key = share_key(&share.endpoint, &share.id);
                self.store
                    .blocking(move |s| s.delete(store::cf::TRANSFERS, &key))
                    .await
                    .map_err(|e| format!("cannot remove the share: {e}"))?;
                self.shares
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|s| s.id != share.id);
                Ok(serde_json::to_value(share).unwrap_or_default())
            }
        }
    }

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
        if self.shared(ask.endpoint, peer, &member, ask.want, ask.path.as_str()) {
            return Ok(r.root.clone());
        }
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

    fn shares(
        &self,
        peer: PeerId,
        endpoint: String,
        change: transfer::wire::ShareChange,
    ) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(async move {
            self.may_manage(&peer)?;
            self.change_shares(endpoint, &peer, change).await
        })
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
    pub(crate) store: store::Store,
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
/// institution; else a held token that allows it, or — when none does — one held for that
/// endpoint anyway (or none at all): the endpoint's node decides, since a share of its data
/// root may admit this node without a token, and its refusal says why.
fn token_for(
    access: &Access,
    own: &Member,
    place: &Place,
    want: Want,
) -> Result<Option<String>, String> {
    if let Verdict::Admitted = compute::access::verdict(
        place.policy,
        place.institution.as_ref().map(|(_, n)| n.as_str()),
        own.institution.as_deref(),
    ) {
        return Ok(None);
    }
    let Some((root, _)) = &place.institution else {
        return Ok(None);
    };
    let allowing = access.token_allowing(
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
    );
    Ok(match allowing {
        Ok(token) => Some(token),
        Err(_) => access
            .held()
            .iter()
            .find(|h| h.endpoint == place.id)
            .map(|h| h.text.clone()),
    })
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
            // This node reads the source with its own rights, never with a token the asking
            // member put in the spec.
            spec.read_token = None;
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
        store: store.clone(),
        shares: std::sync::RwLock::new(Vec::new()),
    });
    roots.load_shares()?;
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

/// Tokens lent for one operation, presented instead of the node's own (a run started by
/// another institution's node acts with what its starter delegated): for reading the source
/// and for writing the destination; `None` presents no token.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lent {
    /// For reading.
    pub(crate) read: Option<String>,
    /// For writing.
    pub(crate) write: Option<String>,
}

/// `POST /v1/transfers/shares`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewShare {
    /// `ENDPOINT:PATH` to share.
    pub path: String,
    /// With whom: `institution:NAME_OR_KEY` or `node:NAME_OR_PEER_ID`.
    pub to: String,
    /// Writing too, not only reading.
    #[serde(default)]
    pub write: bool,
}

/// `POST /v1/transfers/unshare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unshare {
    /// The endpoint.
    pub endpoint: String,
    /// The share's id.
    pub id: String,
}

/// A principal as shares name it (`institution:<key>`, `node:<peer id>`), from a name or key.
pub(crate) fn principal_of(view: &crdt_registry::View, to: &str) -> anyhow::Result<String> {
    if let Some(q) = to.strip_prefix("institution:") {
        if let Ok(key) = q.parse::<crdt_registry::Key>() {
            return Ok(capability::institution_term(&key));
        }
        let found: Vec<_> = view.institutions.values().filter(|i| i.name == q).collect();
        return match found.as_slice() {
            [one] => Ok(capability::institution_term(&one.key)),
            [] => bail!("no institution {q:?} in the registry"),
            _ => bail!("several institutions are named {q:?}: give its key"),
        };
    }
    if let Some(q) = to.strip_prefix("node:") {
        if q.parse::<PeerId>().is_ok() {
            return Ok(format!("node:{q}"));
        }
        let found: Vec<_> = view.nodes.values().filter(|n| n.name == q).collect();
        return match found.as_slice() {
            [one] => Ok(format!("node:{}", one.peer_id)),
            [] => bail!("no node {q:?} in the registry"),
            _ => bail!("several nodes are named {q:?}: give its peer id"),
        };
    }
    bail!("share with institution:NAME_OR_KEY or node:NAME_OR_PEER_ID, not {to:?}")
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
        self.copy_as(t, None).await
    }

    /// [`Transfers::copy`] with the tokens `lent` for it (none: this node's own).
    pub(crate) async fn copy_as(
        &self,
        t: NewTransfer,
        lent: Option<&Lent>,
    ) -> Result<transfer::copy::Job, Failure> {
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
            read_token: lent.and_then(|l| l.read.clone()),
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
        let write_token = self.token_as(&dst, Want::Write, lent)?;
        let read_token = self.token_as(&src, Want::Read, lent)?;
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

    /// The token to present: the one lent for the operation when there is a loan (none if it
    /// lends none for `want`), else this node's.
    fn token_as(
        &self,
        place: &Place,
        want: Want,
        lent: Option<&Lent>,
    ) -> Result<Option<String>, Failure> {
        match lent {
            Some(l) => Ok(match want {
                Want::Read => l.read.clone(),
                Want::Write => l.write.clone(),
            }),
            None => self.token(place, want),
        }
    }

    /// Lists or changes the shares of the data root of `endpoint` (any member's: asked of its
    /// node, which lets only members of its own institution do it).
    pub(crate) async fn shares(
        &self,
        endpoint: &str,
        change: transfer::wire::ShareChange,
    ) -> Result<serde_json::Value, Failure> {
        let place = resolve(&self.mesh, &format!("{endpoint}:"))
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        if place.peer == self.mesh.peer_id() {
            return Roots::shares(&*self.roots, place.peer, place.endpoint.clone(), change)
                .await
                .map_err(bad);
        }
        self.remote_of(&place)?
            .shares(&place.endpoint, change)
            .await
            .map_err(remote_failure)
    }

    /// The registry as it is now.
    pub(crate) async fn registry(&self) -> Result<crdt_registry::View, String> {
        self.mesh.registry().await.map_err(|e| e.to_string())
    }

    /// What Globus' `collection_info` says of a collection, for an endpoint: every funcmesh
    /// data root is what Globus calls a guest collection (one storage, access by rules:
    /// shares and tokens).
    pub(crate) async fn collection_info(
        &self,
        endpoint: &str,
    ) -> Result<serde_json::Value, Failure> {
        let place = resolve(&self.mesh, &format!("{endpoint}:"))
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        if place.addr.is_none() {
            return Err((
                axum::http::StatusCode::NOT_FOUND,
                format!("endpoint {endpoint}'s node publishes no data plane: it is no collection"),
            ));
        }
        Ok(serde_json::json!({
            "DATA_TYPE": "collection",
            "id": place.id,
            "display_name": place.endpoint,
            "entity_type": "GCSv5_guest_collection",
            "node": place.peer.to_string(),
            "institution": place.institution.as_ref().map(|(_, n)| n.clone()),
            "policy": place.policy,
        }))
    }

    /// Shares `ENDPOINT:PATH` with a principal named by name or key.
    pub(crate) async fn share(&self, new: &NewShare) -> Result<serde_json::Value, Failure> {
        let (endpoint, path) = split_place(&new.path).map_err(|e| bad(format!("{e:#}")))?;
        let to = new.to.clone();
        let principal = self
            .mesh
            .registry_with(move |view| principal_of(view, &to))
            .await
            .map_err(|e| (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .map_err(|e| bad(format!("{e:#}")))?;
        let change = transfer::wire::ShareChange::Add {
            path: path.as_str().to_owned(),
            principal,
            write: new.write,
        };
        self.shares(endpoint, change).await
    }

    /// `ls ENDPOINT:PATH`: a directory's entries, or a file's own.
    pub(crate) async fn ls(&self, text: &str) -> Result<Vec<transfer::root::Entry>, Failure> {
        self.ls_as(text, None).await
    }

    /// [`Transfers::ls`] with the tokens `lent` for it.
    pub(crate) async fn ls_as(
        &self,
        text: &str,
        lent: Option<&Lent>,
    ) -> Result<Vec<transfer::root::Entry>, Failure> {
        let place = resolve(&self.mesh, text)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token_as(&place, Want::Read, lent)?;
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

    /// What is at `ENDPOINT:PATH` (a file, a directory, ...), with the tokens `lent` for it.
    pub(crate) async fn stat_as(
        &self,
        text: &str,
        lent: Option<&Lent>,
    ) -> Result<transfer::root::Entry, Failure> {
        let place = resolve(&self.mesh, text)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token_as(&place, Want::Read, lent)?;
        self.remote_of(&place)?
            .stat(&place.endpoint, place.path.as_str(), token)
            .await
            .map_err(remote_failure)
    }

    /// `mkdir ENDPOINT:PATH`.
    pub(crate) async fn mkdir(&self, op: &PathOp) -> Result<(), Failure> {
        self.mkdir_as(op, None).await
    }

    /// [`Transfers::mkdir`] with the tokens `lent` for it.
    pub(crate) async fn mkdir_as(&self, op: &PathOp, lent: Option<&Lent>) -> Result<(), Failure> {
        let place = resolve(&self.mesh, &op.path)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token_as(&place, Want::Write, lent)?;
        self.remote_of(&place)?
            .mkdir(&place.endpoint, place.path.as_str(), op.recursive, token)
            .await
            .map_err(remote_failure)
    }

    /// `rm ENDPOINT:PATH`.
    pub(crate) async fn rm(&self, op: &PathOp) -> Result<(), Failure> {
        self.rm_as(op, None).await
    }

    /// [`Transfers::rm`] with the tokens `lent` for it.
    pub(crate) async fn rm_as(&self, op: &PathOp, lent: Option<&Lent>) -> Result<(), Failure> {
        let place = resolve(&self.mesh, &op.path)
            .await
            .map_err(|e| bad(format!("{e:#}")))?;
        let token = self.token_as(&place, Want::Write, lent)?;
        self.remote_of(&place)?
            .remove(&place.endpoint, place.path.as_str(), op.recursive, token)
            .await
            .map_err(remote_failure)
    }
}

/// The protocol of the data plane's tunnel through the mesh.
const TUNNEL_PROTOCOL: &str = "/funcmesh/data-tunnel/1";

/// The mesh's raw streams, as the data plane's tunnel.
struct MeshTunnel(Arc<mesh::raw::RawStreams>);

impl transfer::tunnel::Tunnel for MeshTunnel {
    fn open(
        &self,
        peer: PeerId,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<transfer::tunnel::BoxStream, String>> + Send>,
    > {
        let streams = self.0.clone();
        Box::pin(async move {
            streams
                .open(peer)
                .await
                .map(|s| Box::new(s) as transfer::tunnel::BoxStream)
        })
    }
}

/// Carries the data plane through the mesh for peers whose data address cannot be reached (a
/// member behind NAT or a firewall, reached over the coordinator's relay): the mesh's raw
/// streams become the data plane's tunnel, both ways.
pub(crate) fn tunnel_through_mesh(
    mesh: &mesh::Handle,
    plane: &transfer::net::DataPlane,
    cancel: &tokio_util::sync::CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> anyhow::Result<()> {
    let (streams, mut incoming) = mesh.raw_streams(TUNNEL_PROTOCOL)?;
    plane.use_tunnel(Arc::new(MeshTunnel(Arc::new(streams))))?;
    let plane = plane.clone();
    let cancel = cancel.clone();
    tracker.spawn(async move {
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = incoming.recv() => next,
            };
            let Some((peer, stream)) = next else { return };
            plane.tunnel_stream(peer, Box::new(stream));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A share change from a peer, whatever its text: decoded or refused, its principal and
        /// path checked or refused, never a panic; a principal let through is one of the two
        /// forms shares match.
        #[test]
        fn share_changes_from_peers_are_checked_without_panic(
            principal in "(institution:|node:|)[A-Za-z0-9+/=_-]{0,60}",
            path in "(/|\\.\\.|[a-z]{0,3}|\\.){0,8}",
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let _ = serde_json::from_slice::<transfer::wire::ShareChange>(&raw);
            let change = transfer::wire::ShareChange::Add { path: path.clone(), principal: principal.clone(), write: false };
            let bytes = serde_json::to_vec(&change).unwrap();
            let back: transfer::wire::ShareChange = serde_json::from_slice(&bytes).unwrap();
            proptest::prop_assert_eq!(&back, &change);
            if check_principal(&principal).is_ok() {
                proptest::prop_assert!(
                    principal.starts_with("node:")
                        || capability::institution_of_term(&principal).is_some()
                );
            }
            if let Ok(p) = RelPath::parse(&path) {
                proptest::prop_assert!(p.as_str().split('/').all(|c| c != ".."));
                proptest::prop_assert!(capability::under(p.as_str(), ""));
            }
        }
    }

    #[test]
    fn a_principal_is_an_institution_key_or_a_peer_id() {
        let key = crdt_registry::Key([7; 32]);
        assert!(check_principal(&capability::institution_term(&key)).is_ok());
        let peer = PeerId::random();
        assert!(check_principal(&format!("node:{peer}")).is_ok());
        for bad in [
            "institution:inst-b",
            "node:b1",
            "inst-b",
            "identity:46bd0f56",
            "",
        ] {
            assert!(check_principal(bad).is_err(), "{bad}");
        }
    }
}
