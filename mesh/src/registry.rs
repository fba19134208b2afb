//! The mesh's side of the registry: the replica this node holds, how it is persisted, and the
//! sync and gossip traffic that keeps it converged. The swarm event loop owns one `Replica`
//! and carries out the `Out` actions it returns; nothing here touches the swarm.
//!
//! * Local writes are signed with the node key, persisted (synced) before the caller hears back,
//!   and gossiped on `registry/1`.
//! * Gossip from a peer is applied; a change whose dependencies are missing starts a pairwise
//!   sync with the peer that forwarded it.
//! * Pairwise sync runs over `/funcmesh/registry-sync/1` when a member connects, after missing
//!   dependencies, and every `anti_entropy` with a random member. Per-peer sync states are
//!   persisted when a peer disconnects and at shutdown.
//! * Anything a peer sends that no honest node sends is a strike against it; three strikes cut
//!   the peer off.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crdt_registry::{
    Authority, Crossing, Entry, InstitutionFacts, Key, NodeFacts, Registry, SyncState, View,
};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::membership::{Admission, Federation, Proof};

/// Protocol name of registry sync.
pub const SYNC_PROTOCOL: &str = "/funcmesh/registry-sync/1";
/// Gossip topic (federation-scoped) of registry changes.
pub const TOPIC: &str = "registry/1";
/// Compact the stored document after this many stored changes.
const COMPACT_EVERY: usize = 1000;
/// Strikes before a peer is cut off.
pub(crate) const STRIKES_TO_BAN: u32 = 3;
/// Strikes older than this are forgiven, and a ban lasts this long: a peer that sent bad data
/// once in a while (a bug, since fixed by an upgrade) is not cut off for good.
pub(crate) const STRIKE_MEMORY: Duration = Duration::from_secs(600);
/// Longest a fresh replica's other sessions wait for its first (see `Replica::caught_up`).
pub(crate) const CATCH_UP_PATIENCE: Duration = Duration::from_secs(10);

/// A sync request: one Automerge sync message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncRequest {
    pub(crate) version: u32,
    /// The first message of a session: the responder forgets what it thought was in flight.
    pub(crate) fresh: bool,
    #[serde(with = "serde_bytes")]
    pub(crate) msg: Vec<u8>,
}

/// A sync response: the next message, none when there is nothing to say, or why the request was
/// refused.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SyncResponse {
    Message(#[serde(with = "serde_bytes")] Vec<u8>),
    Done,
    Refused(String),
}

/// What the event loop must do on the replica's behalf.
#[derive(Debug)]
pub(crate) enum Out {
    /// Send a sync request to a peer (`true`: the first of a session).
    Sync(PeerId, Vec<u8>, bool),
    /// Publish on the registry topic.
    Gossip(Vec<u8>),
    /// The peer sent something no honest node sends.
    Strike(PeerId, String),
}

/// Counts and facts about the local replica, for `/v1/registry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Entries in the document.
    pub entries: usize,
    /// Entries the typed view ignores.
    pub ignored: usize,
    /// Document heads.
    pub heads: Vec<String>,
    /// Changes stored since the last compaction.
    pub uncompacted_changes: usize,
    /// Whether changes wait for missing dependencies.
    pub missing_deps: bool,
    /// Sync sessions in flight.
    pub syncing: usize,
    /// Checkpoints the document has crossed.
    #[serde(default)]
    pub epoch: u64,
    /// Entries outside the current checkpoint's base (each costs more memory the more there
    /// are: see `docs/design/registry-checkpoints.md`).
    #[serde(default)]
    pub outside_base: usize,
    /// The last checkpoint this replica refused, and why.
    #[serde(default)]
    pub refused_checkpoint: Option<String>,
}

/// Who writes registry checkpoints, and when: a coordinator that holds the federation key.
#[derive(Clone)]
pub struct CheckpointPolicy {
    /// The federation key: a checkpoint counts only signed with it.
    pub key: ed25519_dalek::SigningKey,
    /// Write the next checkpoint once this many entries lie outside the current base.
    pub every: usize,
}

impl std::fmt::Debug for CheckpointPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointPolicy")
            .field("key", &Key::of(&self.key))
            .field("every", &self.every)
            .finish()
    }
}

/// Verifies registry entries against the federation's membership chain.
#[derive(Debug, Clone)]
pub struct MeshAuthority {
    federation: Federation,
}

impl MeshAuthority {
    /// For `federation`.
    pub fn new(federation: Federation) -> MeshAuthority {
        MeshAuthority { federation }
    }
}

impl Authority for MeshAuthority {
    fn federation_key(&self) -> Key {
        Key(self.federation.key.0)
    }

    fn admission(&self, admission: &str) -> Result<InstitutionFacts, String> {
        if admission.len() > 64 * 1024 {
            return Err("the admission is over 64 KiB".into());
        }
        let a: Admission = serde_json::from_str(admission).map_err(|e| e.to_string())?;
        let body = a.verify(&self.federation).map_err(|e| e.to_string())?;
        Ok(InstitutionFacts {
            name: body.institution,
            key: Key(body.institution_key.0),
            admitted_at: body.admitted_at,
        })
    }

    fn membership(&self, proof: &str, node_key: &Key) -> Result<NodeFacts, String> {
        let peer = peer_of(node_key).ok_or("the author key is not an ed25519 key")?;
        let proof = Proof::from_bytes(proof.as_bytes()).map_err(|e| e.to_string())?;
        // Verdicts are cached and must agree across replicas, so they may not depend on when
        // they are made: judge as if at the end of time (invites are checked against the
        // coordinator's receipt; only "admitted in the future" would depend on the clock).
        let member = proof
            .verify(&self.federation, &peer, u64::MAX / 2)
            .map_err(|e| e.to_string())?;
        let institution = match (&proof, member.institution) {
            (Proof::Member { admission, .. }, Some(name)) => {
                let body = admission
                    .verify(&self.federation)
                    .map_err(|e| e.to_string())?;
                Some((name, Key(body.institution_key.0)))
            }
            _ => None,
        };
        Ok(NodeFacts {
            peer_id: member.peer_id,
            institution,
            role: member.role.to_string(),
            invite: member.invite.map(|invite| (invite, member.joined_at)),
        })
    }
}

/// The peer id of the node whose registry key is `key`.
pub fn peer_of(key: &Key) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// The registry key of a node identity (its ed25519 key).
pub fn signing_key(keypair: &libp2p::identity::Keypair) -> Option<ed25519_dalek::SigningKey> {
    let ed = keypair.clone().try_into_ed25519().ok()?;
    let secret: [u8; 32] = ed.secret().as_ref().try_into().ok()?;
    Some(ed25519_dalek::SigningKey::from_bytes(&secret))
}

/// The registry key of the node with this peer id: the same ed25519 key (`None` for a peer id
/// that does not inline an ed25519 key).
pub(crate) fn key_of_peer(peer: &libp2p::PeerId) -> Option<Key> {
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if hash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    Some(Key(key.try_into_ed25519().ok()?.to_bytes()))
}

/// Per-peer strike counts, forgotten after [`STRIKE_MEMORY`] without a new strike, and the
/// bans in force.
#[derive(Debug, Default)]
pub(crate) struct Strikes {
    counts: HashMap<PeerId, (u32, Instant)>,
    bans: HashMap<PeerId, Instant>,
}

impl Strikes {
    /// Adds a strike at `now`; returns the count, and whether the peer is now banned.
    pub(crate) fn add(&mut self, peer: PeerId, now: Instant) -> (u32, bool) {
        let entry = self.counts.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) > STRIKE_MEMORY {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        let n = entry.0;
        let banned = n >= STRIKES_TO_BAN;
        if banned {
            self.bans.insert(peer, now + STRIKE_MEMORY);
            self.counts.remove(&peer);
        }
        (n, banned)
    }

    /// The bans that ran out by `now`; they are forgotten.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<PeerId> {
        let done: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &done {
            self.bans.remove(p);
        }
        self.counts
            .retain(|_, (_, last)| now.duration_since(*last) <= STRIKE_MEMORY);
        done
    }
}

/// Message rounds of one sync session, at most: each carries at most `SYNC_BATCH_BYTES` of
/// changes, so a replica this far behind catches up over several sessions.
const MAX_SYNC_ROUNDS: u32 = 256;

/// A sync session of ours in flight.
#[derive(Debug, Default)]
struct Session {
    /// Another session was asked for meanwhile.
    again: bool,
    /// Answers received so far.
    rounds: u32,
    /// The session brought changes new to this replica.
    learned: bool,
}

/// The local replica and its persistence.
pub(crate) struct Replica {
    reg: Registry,
    authority: MeshAuthority,
    signer: ed25519_dalek::SigningKey,
    store: store::Store,
    /// Per peer, the state of the sessions this node starts (persisted: what the peer has).
    sync: HashMap<PeerId, SyncState>,
    /// Per peer, the state of the sessions the peer starts. Apart from `sync`, so that sessions
    /// each side started at once are two clean exchanges rather than one state reset and
    /// advanced by both. (The storm of syncs at rest that saturated federations of 40–100 was
    /// Automerge 0.7.0 caching vector clocks that missed part of the history: see
    /// `replicas_with_the_same_wide_history_agree_without_sending_anything`.)
    sync_in: HashMap<PeerId, SyncState>,
    /// Peers with a session of ours in flight.
    in_flight: HashMap<PeerId, Session>,
    /// Whether one of our sessions has ended since this replica loaded. Until then it runs one
    /// session at a time and the others wait in `queued`: a joining node (or one back from a
    /// long absence) connects to a dozen members within a second, and each session would carry
    /// the whole registry (or all it missed) to it — a dozen copies, built by a dozen peers'
    /// event loops. After the first, the rest find it caught up and carry nothing.
    caught_up: bool,
    /// Peers whose session waits for the first one to end.
    queued: Vec<PeerId>,
    /// When the first session started: a peer that drags it out (slow answers, up to the round
    /// bound) holds the others back for [`CATCH_UP_PATIENCE`] at most.
    first_started: Option<Instant>,
    /// Keys of the changes stored since the last compaction.
    stored: Vec<Vec<u8>>,
    last_anti_entropy: Instant,
    /// The document crossed a checkpoint since it was last stored whole: the next store
    /// operations replace everything with it.
    crossed: bool,
}

/// Loads the replica from the store. A document that does not load is set aside (renamed) and
/// the node starts from an empty registry, which its peers refill.
pub(crate) fn load(
    store: &store::Store,
    federation: &Federation,
    signer: ed25519_dalek::SigningKey,
) -> Result<Replica, store::Error> {
    let rows = store.scan(store::cf::REGISTRY)?;
    let mut snapshot = None;
    let mut changes = Vec::new();
    let mut stored = Vec::new();
    for (k, v) in rows {
        if k == b"doc" {
            snapshot = Some(v);
        } else if k.starts_with(b"chg/") {
            stored.push(k);
            changes.push(v);
        }
    }
    let started = Instant::now();
    let reg = match Registry::load(&federation.id.0, snapshot.as_deref(), &changes) {
        Ok((reg, skipped)) => {
            if skipped > 0 {
                warn!(
                    skipped,
                    "stored registry changes that fail their checks were skipped"
                );
            }
            reg
        }
        Err(e) => {
            warn!(error = %e, "the stored registry does not load; starting empty, peers will refill it");
            if let Some(bytes) = &snapshot {
                store.put(store::cf::REGISTRY, b"doc.unreadable", bytes)?;
            }
            Registry::new(&federation.id.0)
        }
    };
    info!(
        entries = reg.len(),
        ms = started.elapsed().as_millis() as u64,
        "registry loaded"
    );
    let mut sync = HashMap::new();
    for (k, v) in store.scan(store::cf::REGISTRY_SYNC)? {
        if let Some(peer) = std::str::from_utf8(&k).ok().and_then(|s| s.parse().ok()) {
            sync.insert(peer, SyncState::decode(&v));
        }
    }
    let mut replica = Replica {
        reg,
        authority: MeshAuthority::new(federation.clone()),
        signer,
        store: store.clone(),
        sync,
        sync_in: HashMap::new(),
        in_flight: HashMap::new(),
        caught_up: false,
        queued: Vec::new(),
        first_started: None,
        stored,
        last_anti_entropy: Instant::now(),
        crossed: false,
    };
    replica.reg.set_federation_key(federation.key);
    if replica.stored.len() >= COMPACT_EVERY {
        replica.compact()?;
    }
    Ok(replica)
}

/// A write's outcome.
pub type WriteResult = Result<Entry, String>;

impl Replica {
    pub(crate) fn view(&mut self) -> &View {
        self.reg.view(&self.authority)
    }

    pub(crate) fn status(&mut self) -> Status {
        let ignored = self.view().ignored.len();
        Status {
            entries: self.reg.len(),
            ignored,
            heads: self.reg.heads_hex(),
            uncompacted_changes: self.stored.len(),
            missing_deps: self.reg.has_missing_deps(),
            syncing: self.in_flight.len(),
            epoch: self.reg.epoch(),
            outside_base: self.reg.outside_base(),
            refused_checkpoint: self.reg.refused_checkpoint().map(str::to_string),
        }
    }

    /// Whether the document crossed a checkpoint and waits to be stored whole.
    pub(crate) fn crossed(&self) -> bool {
        self.crossed
    }

    /// After a message that brought a checkpoint (or a base): cross it if this replica can.
    fn cross_if(&mut self, checkpoint: bool) {
        if !checkpoint {
            return;
        }
        let from = self.reg.epoch();
        match self.reg.cross(&self.authority) {
            Crossing::Crossed(epoch) => {
                info!(
                    from,
                    epoch,
                    entries = self.reg.len(),
                    "registry crossed a checkpoint: superseded entries pruned"
                );
                self.crossed = true;
            }
            Crossing::NeedBase => {
                debug!(from, "a later registry epoch: asking a peer for its base");
            }
            Crossing::Refused(why) => warn!("{why}"),
            Crossing::Nothing => {}
        }
    }

    /// Writes the next checkpoint if `policy` says it is due, and crosses it. Returns the
    /// change to persist and the gossip announcing it (in the epoch it was written in).
    pub(crate) fn checkpoint_if_due(
        &mut self,
        policy: &CheckpointPolicy,
    ) -> Option<(Vec<u8>, Vec<Out>)> {
        if policy.every == 0 || self.reg.outside_base() < policy.every {
            return None;
        }
        let started = Instant::now();
        let (entry, change) =
            match self
                .reg
                .write_checkpoint(&policy.key, &self.authority, now_ms())
            {
                Ok(written) => written,
                Err(e) => {
                    warn!(error = %e, "cannot write a registry checkpoint");
                    return None;
                }
            };
        let out = vec![Out::Gossip(self.reg.gossip_for(&change))];
        if let crdt_registry::record::Body::Checkpoint(r) = &entry.payload().body {
            info!(
                epoch = r.epoch,
                kept = r.kept,
                pruned = r.pruned,
                ms = started.elapsed().as_millis() as u64,
                "registry checkpoint written"
            );
        }
        self.cross_if(true);
        Some((change, out))
    }

    /// Signs and writes a record with the node key. The returned closure persists the change;
    /// the caller runs it off the event loop and answers the writer when it is done.
    pub(crate) fn write(
        &mut self,
        id: String,
        body: crdt_registry::record::Body,
    ) -> Result<(Entry, Vec<u8>, Vec<Out>), String> {
        let signer = self.signer.clone();
        let (entry, change) = self
            .reg
            .write(&signer, id, body, now_ms())
            .map_err(|e| e.to_string())?;
        let out = vec![Out::Gossip(self.reg.gossip_for(&change))];
        Ok((entry, change, out))
    }

    /// Writes an entry signed elsewhere (by an institution key, say).
    pub(crate) fn insert_signed(
        &mut self,
        bytes: &[u8],
    ) -> Result<(Entry, Vec<u8>, Vec<Out>), String> {
        let (entry, change) = self
            .reg
            .insert_signed(bytes, now_ms())
            .map_err(|e| e.to_string())?;
        let out = vec![Out::Gossip(self.reg.gossip_for(&change))];
        Ok((entry, change, out))
    }

    /// The store operations that persist `changes`, and the compaction if one is due.
    pub(crate) fn persist_ops(&mut self, changes: &[Vec<u8>]) -> Vec<StoreOp> {
        let mut ops = Vec::new();
        for c in changes {
            let key = change_key(c);
            self.stored.push(key.clone());
            ops.push((store::cf::REGISTRY, key, Some(c.clone())));
        }
        if self.stored.len() >= COMPACT_EVERY || self.crossed {
            ops.extend(self.compaction_ops());
        }
        ops
    }

    fn compaction_ops(&mut self) -> Vec<StoreOp> {
        let started = Instant::now();
        let doc = match self.reg.save() {
            Ok(doc) => doc,
            Err(e) => {
                warn!(error = %e, "cannot compact the registry; keeping its changes as they are");
                return Vec::new();
            }
        };
        self.crossed = false;
        let mut ops: Vec<StoreOp> = vec![(store::cf::REGISTRY, b"doc".to_vec(), Some(doc))];
        for k in self.stored.drain(..) {
            ops.push((store::cf::REGISTRY, k, None));
        }
        debug!(
            ms = started.elapsed().as_millis() as u64,
            "registry compacted"
        );
        ops
    }

    /// Compacts now, synchronously (at load and shutdown).
    pub(crate) fn compact(&mut self) -> Result<(), store::Error> {
        let ops = self.compaction_ops();
        self.store.batch(&ops)
    }

    /// Applies gossip from `from` (the peer that forwarded it). Returns whether it was valid, the
    /// changes to persist and the actions to take.
    pub(crate) fn on_gossip(
        &mut self,
        from: PeerId,
        data: &[u8],
    ) -> (bool, Vec<Vec<u8>>, Vec<Out>) {
        match self.reg.receive_gossip(data) {
            Ok(applied) => {
                debug!(
                    %from,
                    new = applied.changes.len(),
                    missing_deps = applied.missing_deps,
                    "registry gossip"
                );
                self.cross_if(applied.checkpoint);
                let mut out = Vec::new();
                if applied.missing_deps {
                    out.extend(self.start_sync(from));
                }
                (true, applied.changes, out)
            }
            Err(e) => {
                self.recover_if_poisoned();
                (
                    false,
                    Vec::new(),
                    vec![Out::Strike(from, format!("registry gossip: {e}"))],
                )
            }
        }
    }

    /// A sync session with `peer`, unless one is in flight (then another follows it).
    pub(crate) fn start_sync(&mut self, peer: PeerId) -> Option<Out> {
        if let Some(session) = self.in_flight.get_mut(&peer) {
            session.again = true;
            return None;
        }
        if !self.caught_up && !self.in_flight.is_empty() {
            if !self.queued.contains(&peer) {
                self.queued.push(peer);
            }
            return None;
        }
        if !self.caught_up {
            self.first_started = Some(Instant::now());
        }
        let state = self.sync.entry(peer).or_default();
        state.reset();
        let msg = self.reg.generate_sync(state)?;
        self.in_flight.insert(peer, Session::default());
        Some(Out::Sync(peer, msg, true))
    }

    /// Answers a sync request.
    pub(crate) fn on_sync_request(
        &mut self,
        peer: PeerId,
        req: SyncRequest,
    ) -> (SyncResponse, Vec<Vec<u8>>, Vec<Out>) {
        if req.version != 1 {
            return (
                SyncResponse::Refused(format!(
                    "registry sync version {}, this node speaks 1",
                    req.version
                )),
                Vec::new(),
                Vec::new(),
            );
        }
        // A peer's first session here starts from what our own sessions know it has.
        let state = match self.sync_in.entry(peer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                self.sync
                    .get(&peer)
                    .map(|s| SyncState::decode(&s.encode()))
                    .unwrap_or_default(),
            ),
        };
        if req.fresh {
            state.reset();
        }
        match self.reg.receive_sync(state, &req.msg) {
            Ok(applied) => {
                trace_sync(peer, &applied);
                self.cross_if(applied.checkpoint);
                let state = self.sync_in.entry(peer).or_default();
                let resp = match self.reg.generate_sync(state) {
                    Some(m) => SyncResponse::Message(m),
                    None => SyncResponse::Done,
                };
                (resp, applied.changes, Vec::new())
            }
            Err(e) => {
                self.recover_if_poisoned();
                let reason = format!("registry sync: {e}");
                (
                    SyncResponse::Refused(reason.clone()),
                    Vec::new(),
                    vec![Out::Strike(peer, reason)],
                )
            }
        }
    }

    /// Handles the answer to our sync request.
    pub(crate) fn on_sync_response(
        &mut self,
        peer: PeerId,
        resp: SyncResponse,
    ) -> (Vec<Vec<u8>>, Vec<Out>) {
        let mut session = self.in_flight.remove(&peer).unwrap_or_default();
        session.rounds += 1;
        let mut persist = Vec::new();
        let mut out = Vec::new();
        match resp {
            SyncResponse::Message(msg) => {
                let state = self.sync.entry(peer).or_default();
                if session.rounds + 4 > MAX_SYNC_ROUNDS && tracing::enabled!(tracing::Level::DEBUG)
                {
                    // The last rounds of a session that does not end, for whoever debugs it.
                    let seen = self.reg.describe_sync(state, &msg);
                    tracing::debug!(%peer, rounds = session.rounds, "registry sync near its round cap: {seen}");
                }
                match self.reg.receive_sync(state, &msg) {
                    Ok(applied) => {
                        trace_sync(peer, &applied);
                        self.cross_if(applied.checkpoint);
                        persist = applied.changes
                    }
                    Err(e) => {
                        self.recover_if_poisoned();
                        out.push(Out::Strike(peer, format!("registry sync: {e}")));
                        out.extend(self.next_queued(false));
                        return (persist, out);
                    }
                }
            }
            SyncResponse::Done => {}
            SyncResponse::Refused(reason) => {
                warn!(%peer, %reason, "peer refused our registry sync");
                if let Some(s) = self.sync.get_mut(&peer) {
                    s.reset();
                }
                out.extend(self.next_queued(false));
                return (persist, out);
            }
        }
        session.learned |= !persist.is_empty();
        let state = self.sync.entry(peer).or_default();
        if session.rounds >= MAX_SYNC_ROUNDS {
            // A session that does not end is a bug or a peer that never agrees: stop here;
            // anti-entropy comes back to this peer later.
            warn!(
                %peer,
                rounds = session.rounds,
                "registry sync session ended after its last allowed round"
            );
            state.reset();
            out.extend(self.next_queued(true));
            return (persist, out);
        }
        if let Some(msg) = self.reg.generate_sync(state) {
            self.in_flight.insert(peer, session);
            out.push(Out::Sync(peer, msg, false));
            return (persist, out);
        }
        // The session is over: whatever waited for the first one can start.
        out.extend(self.next_queued(true));
        if session.again || (session.learned && self.reg.has_missing_deps()) {
            // Another session only when one was asked for meanwhile, or when this one brought
            // changes and some still wait for theirs; a session that learned nothing and still
            // misses dependencies leaves them to gossip and anti-entropy (it would only repeat).
            out.extend(self.start_sync(peer));
        }
        (persist, out)
    }

    /// A sync request failed (timeout, disconnect): forget what was in flight; a session that
    /// waited for it starts.
    pub(crate) fn on_sync_failure(&mut self, peer: PeerId) -> Vec<Out> {
        self.in_flight.remove(&peer);
        if let Some(s) = self.sync.get_mut(&peer) {
            s.reset();
        }
        self.next_queued(false)
    }

    /// Starts every waiting session once the first has run for [`CATCH_UP_PATIENCE`] (called
    /// on the event loop's tick).
    pub(crate) fn catch_up_overdue(&mut self) -> Vec<Out> {
        if self.caught_up
            || self
                .first_started
                .is_none_or(|t| t.elapsed() < CATCH_UP_PATIENCE)
        {
            return Vec::new();
        }
        debug!(
            waiting = self.queued.len(),
            "the first registry sync is taking long: syncing with the others too"
        );
        self.next_queued(true)
    }

    /// Starts a session that waited for one that has gone (its peer disconnected).
    pub(crate) fn resume_queued(&mut self) -> Vec<Out> {
        self.next_queued(false)
    }

    /// Starts the sessions that waited for the first one: all of them once one ended
    /// (`caught_up`), else (it failed) the next alone.
    fn next_queued(&mut self, caught_up: bool) -> Vec<Out> {
        self.caught_up |= caught_up;
        let mut out = Vec::new();
        while !self.queued.is_empty() {
            if !self.caught_up && !self.in_flight.is_empty() {
                break;
            }
            let peer = self.queued.remove(0);
            out.extend(self.start_sync(peer));
        }
        out
    }

    /// The peer's last connection closed: keep what we know it has.
    pub(crate) fn on_disconnect(&mut self, peer: PeerId) -> Option<StoreOp> {
        self.in_flight.remove(&peer);
        self.queued.retain(|p| *p != peer);
        self.sync_in.remove(&peer);
        let state = self.sync.get(&peer)?;
        Some((
            store::cf::REGISTRY_SYNC,
            peer.to_string().into_bytes(),
            Some(state.encode()),
        ))
    }

    /// Anti-entropy: a sync round with a random member, every `every`.
    pub(crate) fn anti_entropy(&mut self, members: &[PeerId], every: Duration) -> Option<Out> {
        if self.last_anti_entropy.elapsed() < every || members.is_empty() {
            return None;
        }
        self.last_anti_entropy = Instant::now();
        let peer = members[rand::Rng::gen_range(&mut rand::thread_rng(), 0..members.len())];
        self.start_sync(peer)
    }

    /// Sync states and a compacted document, for shutdown.
    pub(crate) fn shutdown_ops(&mut self) -> Vec<StoreOp> {
        let mut ops: Vec<StoreOp> = self
            .sync
            .iter()
            .map(|(p, s)| {
                (
                    store::cf::REGISTRY_SYNC,
                    p.to_string().into_bytes(),
                    Some(s.encode()),
                )
            })
            .collect();
        if !self.stored.is_empty() || self.crossed {
            ops.extend(self.compaction_ops());
        }
        ops
    }

    /// After a contained panic, reload the replica from the store, which holds only changes that
    /// applied cleanly. This reads the store on the event loop: it happens only under attack,
    /// and a consistent document matters more than a few milliseconds of latency then.
    fn recover_if_poisoned(&mut self) {
        if !self.reg.is_poisoned() {
            return;
        }
        warn!("the registry document crashed on peer input; reloading it from disk");
        let federation = self.authority.federation.clone();
        match load(&self.store, &federation, self.signer.clone()) {
            Ok(fresh) => {
                self.reg = fresh.reg;
                self.stored = fresh.stored;
            }
            Err(e) => warn!(error = %e, "cannot reload the registry"),
        }
    }
}

/// One store operation: column family, key, value (`None` deletes).
pub(crate) type StoreOp = store::Op;

fn change_key(change: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let mut k = b"chg/".to_vec();
    k.extend_from_slice(hex::encode(sha2::Sha256::digest(change)).as_bytes());
    k
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a sync message brought, at debug level: changes carried, already known, new.
fn trace_sync(peer: PeerId, applied: &crdt_registry::Applied) {
    if applied.received > 0 {
        tracing::debug!(
            %peer,
            received = applied.received,
            known = applied.known,
            new = applied.changes.len(),
            "registry sync message"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn federation() -> Federation {
        let fed_key = crate::membership::SigningKey::generate();
        crate::membership::Genesis::create("test", &fed_key, 1_800_000_000)
            .verify()
            .unwrap()
    }

    /// A replica of `federation` in a fresh store, signing with the key made of `seed`.
    fn fresh_replica(federation: &Federation, seed: u8) -> (tempfile::TempDir, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(dir.path()).unwrap();
        let signer = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let replica = load(&store, federation, signer).unwrap();
        (dir, replica)
    }

    /// A peer's registry holding one institution entry.
    fn peer_registry(federation: &Federation) -> Registry {
        let author = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let mut theirs = Registry::new(&federation.id.0);
        theirs
            .write(
                &author,
                Key::of(&author).to_string(),
                crdt_registry::record::Body::Institution(
                    crdt_registry::record::InstitutionRecord {
                        admission: "{}".into(),
                    },
                ),
                1,
            )
            .unwrap();
        theirs
    }

    #[test]
    fn a_peer_ids_registry_key_is_its_node_key() {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let key = Key::of(&signing_key(&keypair).unwrap());
        assert_eq!(key_of_peer(&peer), Some(key));
        assert_eq!(key_of_peer(&PeerId::random()), None);
    }

    /// A peer that never agrees — it answers every round with the same first message, heads
    /// this node does not have and never the changes behind them — holds a session for
    /// `MAX_SYNC_ROUNDS` answers, not forever, and the session does not start itself again.
    #[test]
    fn a_sync_session_with_a_peer_that_never_agrees_ends_at_the_round_bound() {
        let federation = federation();
        let (_dir, mut replica) = fresh_replica(&federation, 1);
        // The peer's document holds one change this node never gets.
        let theirs = peer_registry(&federation);
        let peer = PeerId::random();
        assert!(matches!(
            replica.start_sync(peer),
            Some(Out::Sync(p, _, true)) if p == peer
        ));
        let mut answers = 0;
        loop {
            let stubborn = theirs.generate_sync(&mut SyncState::new()).unwrap();
            let (_, out) = replica.on_sync_response(peer, SyncResponse::Message(stubborn));
            answers += 1;
            assert!(
                out.iter().all(|o| !matches!(o, Out::Strike(..))),
                "a stubborn peer is not a dishonest one: {out:?}"
            );
            if !out.iter().any(|o| matches!(o, Out::Sync(..))) {
                break;
            }
            assert!(answers < 10 * MAX_SYNC_ROUNDS, "the session did not end");
        }
        assert_eq!(answers, MAX_SYNC_ROUNDS);
        assert!(replica.in_flight.is_empty(), "the session is over");
    }

    /// A fresh replica runs one sync session at a time until one has ended: the others wait,
    /// then all start, and each finds nothing left to carry. A failed first session lets the
    /// next one alone start.
    #[test]
    fn a_fresh_replica_catches_up_from_one_peer_before_syncing_with_the_rest() {
        let federation = federation();
        let (_dir, mut replica) = fresh_replica(&federation, 1);
        let mut theirs = peer_registry(&federation);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let Some(Out::Sync(_, mut msg, true)) = replica.start_sync(a) else {
            panic!("the first session starts at once");
        };
        assert!(
            replica.start_sync(b).is_none(),
            "b waits for the first session"
        );
        assert!(
            replica.start_sync(c).is_none(),
            "c waits for the first session"
        );
        assert!(
            replica.start_sync(b).is_none(),
            "asked twice, still one wait"
        );
        // Peer a answers until the session ends; then b and c start.
        let mut state = SyncState::new();
        let started = loop {
            theirs.receive_sync(&mut state, &msg).unwrap();
            let resp = match theirs.generate_sync(&mut state) {
                Some(m) => SyncResponse::Message(m),
                None => SyncResponse::Done,
            };
            let (_, out) = replica.on_sync_response(a, resp);
            match out.iter().find_map(|o| match o {
                Out::Sync(p, m, _) if *p == a => Some(m.clone()),
                _ => None,
            }) {
                Some(next) => msg = next,
                None => break out,
            }
        };
        let mut peers: Vec<PeerId> = started
            .iter()
            .filter_map(|o| match o {
                Out::Sync(p, _, true) => Some(*p),
                _ => None,
            })
            .collect();
        peers.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(
            peers, want,
            "both waiting sessions start once the first ended"
        );
        assert_eq!(replica.reg.len(), theirs.len(), "caught up from a");
        // Caught up: sessions start at once from now on.
        let d = PeerId::random();
        assert!(replica.start_sync(d).is_some());

        // Another fresh replica whose first session fails: the next waiting one starts alone.
        let (_fresh_dir, mut fresh) = fresh_replica(&federation, 3);
        assert!(fresh.start_sync(a).is_some());
        assert!(fresh.start_sync(b).is_none());
        assert!(fresh.start_sync(c).is_none());
        let out = fresh.on_sync_failure(a);
        assert!(
            matches!(out.as_slice(), [Out::Sync(p, _, true)] if *p == b),
            "only b starts: {out:?}"
        );
        // b's peer disconnects: c starts.
        fresh.on_disconnect(b);
        let out = fresh.resume_queued();
        assert!(matches!(out.as_slice(), [Out::Sync(p, _, true)] if *p == c));

        // A first session that drags on holds the others back for `CATCH_UP_PATIENCE` only.
        let (_slow_dir, mut slow) = fresh_replica(&federation, 4);
        assert!(slow.start_sync(a).is_some());
        assert!(slow.start_sync(b).is_none());
        assert!(slow.start_sync(c).is_none());
        assert!(slow.catch_up_overdue().is_empty(), "not overdue yet");
        slow.first_started = Instant::now().checked_sub(CATCH_UP_PATIENCE);
        assert_eq!(slow.catch_up_overdue().len(), 2, "b and c start");
        assert!(slow.start_sync(d).is_some(), "and the rest at once");
    }

    #[test]
    fn three_strikes_ban_old_strikes_are_forgiven_and_bans_end() {
        let peer = PeerId::random();
        let t0 = Instant::now();
        let mut s = Strikes::default();
        assert_eq!(s.add(peer, t0), (1, false));
        // Forgiven after the memory runs out.
        let t1 = t0 + STRIKE_MEMORY + Duration::from_secs(1);
        assert_eq!(s.add(peer, t1), (1, false));
        assert_eq!(s.add(peer, t1), (2, false));
        assert_eq!(s.add(peer, t1), (3, true));
        assert!(s.expired(t1).is_empty());
        assert_eq!(s.expired(t1 + STRIKE_MEMORY), vec![peer]);
        assert!(s.expired(t1 + STRIKE_MEMORY).is_empty());
    }
}
