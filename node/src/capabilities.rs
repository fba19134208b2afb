//! The node's capability tokens: the ones it holds (`funcmesh cap add`, kept in RocksDB), the
//! registry's directory the verifier reads, and the offline side of `funcmesh cap`: grants,
//! delegations and revocation entries made with an institution's key file.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use capability::{Audience, Delegation, Directory, Grant, Key};
use compute::access::{Access, Held};
use crdt_registry::Entry;
use crdt_registry::entry::Payload;
use crdt_registry::record::{Body, RevocationRecord, Target};
use serde::{Deserialize, Serialize};

/// Loads the tokens this node holds into `access`.
/// The node's verifier and the tokens it holds: loaded from the store, its directory refreshed
/// from the registry every 250 ms (revocations and admissions reach it that soon) until `cancel`.
pub(crate) async fn start(
    mesh: &mesh::Handle,
    store: &store::Store,
    own: &mesh::membership::Member,
    cancel: &tokio_util::sync::CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> anyhow::Result<std::sync::Arc<Access>> {
    let access = Access::new(
        mesh.peer_id(),
        own.institution_key.map(|k| crdt_registry::Key(k.0)),
    );
    load(store, &access).await?;
    refresh_directory(mesh, &access).await;
    let mesh = mesh.clone();
    let a = access.clone();
    let cancel = cancel.clone();
    // Rebuilt when the registry changes, at most every 250 ms (a burst of changes, one
    // rebuild): never while nothing changes, whatever the federation's size.
    let mut changes = mesh.registry_changes();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    refresh_directory(&mesh, &a).await;
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
    });
    Ok(access)
}

pub(crate) async fn load(store: &store::Store, access: &Access) -> anyhow::Result<()> {
    let rows = store
        .blocking(|s| s.scan(store::cf::CAPABILITIES))
        .await
        .context("reading the capability tokens held")?;
    let mut held = Vec::new();
    for (key, value) in rows {
        match std::str::from_utf8(&value)
            .ok()
            .and_then(|t| Held::parse(t).ok())
        {
            Some(h) => held.push(h),
            None => tracing::warn!(
                key = %String::from_utf8_lossy(&key),
                "a stored capability token cannot be read; ignoring it"
            ),
        }
    }
    access.set_held(held);
    Ok(())
}

/// Rebuilds the verifier's directory from the registry.
pub(crate) async fn refresh_directory(mesh: &mesh::Handle, access: &Access) {
    if let Ok(d) = mesh.registry_with(Directory::from_view).await {
        access.set_directory(d);
    }
}

/// A held token as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapabilityView {
    /// Its id: the last block's revocation id, shortened.
    pub id: String,
    /// The endpoint it is for (registry id).
    pub endpoint: String,
    /// That endpoint's `name@node`, when the registry lists it.
    pub endpoint_name: Option<String>,
    /// The chain in plain words.
    pub chain: Vec<String>,
    /// `usable`, or why this node cannot use it now.
    pub status: String,
    /// The token.
    pub token: String,
}

/// What `POST /v1/capabilities` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCapability {
    /// The token's text form.
    pub token: String,
}

fn store_key(h: &Held) -> anyhow::Result<String> {
    let chain = capability::inspect(h.bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(chain
        .blocks
        .last()
        .map(|b| b.revocation_id.clone())
        .unwrap_or_default())
}

/// Stores a token this node will present; refuses text that is not a token.
pub(crate) async fn add(store: &store::Store, access: &Access, text: &str) -> anyhow::Result<Held> {
    let held = Held::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if held.endpoint.is_empty() {
        bail!("the token names no endpoint: it was not made by `funcmesh cap grant`");
    }
    let key = store_key(&held)?;
    let value = held.text.clone();
    store
        .blocking(move |s| s.put(store::cf::CAPABILITIES, key.as_bytes(), value.as_bytes()))
        .await?;
    load(store, access).await?;
    Ok(held)
}

/// Removes the held token whose id (as `cap list` shows it: a prefix of its last revocation id,
/// 8 characters or more) is `id`; returns its text.
pub(crate) async fn remove(
    store: &store::Store,
    access: &Access,
    id: &str,
) -> anyhow::Result<String> {
    let id = id.trim();
    if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{id:?} is not a token id: use the id `funcmesh cap list` shows (8+ hex characters)");
    }
    let mut found: Vec<(String, String)> = Vec::new();
    for h in access.held().iter() {
        let key = store_key(h)?;
        if key.starts_with(id) {
            found.push((key, h.text.clone()));
        }
    }
    let (key, text) = match found.as_slice() {
        [one] => one.clone(),
        [] => bail!("this node holds no token {id} (see `funcmesh cap list`)"),
        _ => bail!(
            "{} tokens start with {id}: give more of the id",
            found.len()
        ),
    };
    store
        .blocking(move |s| s.delete(store::cf::CAPABILITIES, key.as_bytes()))
        .await?;
    load(store, access).await?;
    Ok(text)
}

/// The tokens this node holds, described with the registry's names.
pub(crate) fn views(access: &Access, view: &crdt_registry::View, me: &str) -> Vec<CapabilityView> {
    let dir = access.directory();
    let now = unix_now();
    access
        .held()
        .iter()
        .map(|h| {
            let chain = capability::inspect(h.bytes());
            let ep = view.endpoints.get(&h.endpoint);
            let root = ep
                .and_then(|e| view.nodes.get(&e.peer_id))
                .and_then(|n| n.institution_key);
            let status = match (&chain, root, access.institution()) {
                (Err(e), _, _) => e.to_string(),
                (_, None, _) => "its endpoint is not in the registry (yet)".into(),
                (_, _, None) => "this node belongs to no institution".into(),
                (Ok(chain), Some(root), Some(mine)) => {
                    match capability::verify(h.bytes(), &dir, &root) {
                        Err(e) => e.to_string(),
                        Ok(v) => match capability::check_revocations(&v, &dir) {
                            Err(e) => e.to_string(),
                            Ok(()) if !v.holders.contains(&mine) => {
                                capability::Refusal::WrongAudience.to_string()
                            }
                            Ok(()) if chain.expires().is_some_and(|t| t < now) => "expired".into(),
                            Ok(()) => {
                                let nodes: Vec<&str> = chain
                                    .blocks
                                    .iter()
                                    .flat_map(|b| &b.statements)
                                    .filter_map(|s| match s {
                                        capability::Statement::Node(p) => Some(p.as_str()),
                                        _ => None,
                                    })
                                    .collect();
                                if nodes.iter().all(|p| *p == me) {
                                    "usable".into()
                                } else {
                                    capability::Refusal::WrongAudience.to_string()
                                }
                            }
                        },
                    }
                }
            };
            let name = |k: &Key| dir.name_or_key(k);
            CapabilityView {
                id: store_key(h).unwrap_or_default().chars().take(16).collect(),
                endpoint: h.endpoint.clone(),
                endpoint_name: ep.map(|e| {
                    let node = view
                        .nodes
                        .get(&e.peer_id)
                        .map_or_else(|| e.peer_id.clone(), |n| n.name.clone());
                    format!("{}@{node}", e.record.name)
                }),
                chain: chain.map(|c| c.describe(&name)).unwrap_or_default(),
                status,
                token: h.text.clone(),
            }
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An expiry from `--expires DATE` (RFC 3339, or a plain date meaning its end) or `--ttl`.
pub fn expiry(expires: Option<&str>, ttl: Option<Duration>) -> anyhow::Result<Option<u64>> {
    match (expires, ttl) {
        (Some(_), Some(_)) => bail!("give --expires or --ttl, not both"),
        (Some(d), None) => Ok(Some(parse_date(d)?)),
        (None, Some(ttl)) => Ok(Some(unix_now() + ttl.as_secs())),
        (None, None) => Ok(None),
    }
}

/// Parses an RFC 3339 time, or a date (`2027-01-31`, meaning its last second, UTC).
pub fn parse_date(d: &str) -> anyhow::Result<u64> {
    let d = d.trim();
    let t = if d.len() == 10 {
        humantime::parse_rfc3339(&format!("{d}T23:59:59Z"))
    } else {
        humantime::parse_rfc3339_weak(d)
    }
    .with_context(|| {
        format!("{d:?} is not a date: use 2027-01-31 or 2027-01-31T12:00:00Z (UTC)")
    })?;
    Ok(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Reads an institution key file: its name and 32-byte seed.
pub fn institution_key(path: &std::path::Path) -> anyhow::Result<(String, [u8; 32], Key)> {
    let (name, key) = mesh::keys::read_signing_key(path, mesh::keys::KeyKind::Institution)
        .with_context(|| format!("cannot read the institution key {}", path.display()))?;
    let seed = key.secret();
    let public = Key(key.public().0);
    Ok((name, seed, public))
}

/// Reads a token argument: the token itself, or a file holding it.
pub fn token_arg(arg: &str) -> anyhow::Result<Vec<u8>> {
    let text = if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("cannot read {arg}"))?
    } else {
        arg.to_owned()
    };
    capability::from_text(&text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A grant, as `cap grant` makes it.
pub fn grant(seed: &[u8; 32], g: &Grant) -> anyhow::Result<String> {
    Ok(capability::to_text(&capability::grant(seed, g)?))
}

/// A delegation, as `cap delegate` makes it.
pub fn delegate(token: &[u8], seed: &[u8; 32], d: &Delegation) -> anyhow::Result<String> {
    Ok(capability::to_text(&capability::delegate(token, seed, d)?))
}

/// Parses `--to node:PEER_ID` or `--to institution:KEY` (a key, or a name resolved by
/// `resolve`).
pub fn audience(
    to: &str,
    resolve: &dyn Fn(&str) -> anyhow::Result<Key>,
) -> anyhow::Result<Audience> {
    if let Some(peer) = to.strip_prefix("node:") {
        peer.parse::<mesh::PeerId>()
            .with_context(|| format!("{peer:?} is not a peer id"))?;
        return Ok(Audience::Node(peer.to_owned()));
    }
    if let Some(inst) = to.strip_prefix("institution:") {
        return Ok(Audience::Institution(match inst.parse::<Key>() {
            Ok(k) => k,
            Err(_) => resolve(inst)?,
        }));
    }
    bail!("--to takes node:PEER_ID or institution:NAME_OR_KEY, not {to:?}")
}

/// Which block `cap revoke` revokes for the key `by`: block 0 for the issuer, otherwise the last
/// block `by` signed; `block` overrides.
pub fn block_to_revoke(
    chain: &capability::Chain,
    by: &Key,
    issuer: Option<&Key>,
    block: Option<usize>,
) -> anyhow::Result<usize> {
    if let Some(b) = block {
        if b >= chain.blocks.len() {
            bail!(
                "the token has {} blocks (0 to {})",
                chain.blocks.len(),
                chain.blocks.len() - 1
            );
        }
        return Ok(b);
    }
    if issuer == Some(by) {
        return Ok(0);
    }
    chain
        .blocks
        .iter()
        .rev()
        .find(|b| b.signer.as_ref() == Some(by))
        .map(|b| b.index)
        .with_context(|| {
            format!(
                "the key {by} signed no block of this token: only its issuer or a delegator can \
                 revoke it (or name a block with --block)"
            )
        })
}

/// The signed registry entry revoking one block.
pub fn revocation_entry(
    federation: &str,
    signing: &mesh::membership::SigningKey,
    revocation_id: &str,
    reason: &str,
) -> Entry {
    let author = Key(signing.public().0);
    let target = Target::Token {
        revocation_id: revocation_id.to_owned(),
    };
    let payload = Payload {
        federation: federation.to_owned(),
        id: target.id(),
        seq: 1,
        author,
        at_ms: unix_now() * 1000,
        body: Body::Revocation(RevocationRecord {
            target,
            reason: reason.to_owned(),
        }),
    };
    let dalek = ed25519_dalek::SigningKey::from_bytes(&signing.secret());
    Entry::sign(&dalek, payload)
}
