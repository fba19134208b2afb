//! The replicated document and everything that changes it: local writes, changes from gossip,
//! pairwise sync messages, loading and compaction.
//!
//! The document's root map holds the entries, each under a key derived from its bytes. Every
//! change from a peer is checked before Automerge sees it ([`Registry::check_change`]): it may only
//! put well-formed, correctly signed entries of this federation under their own keys, and it must
//! fit the size limits. Anything else (a deletion, a nested object, a forged signature, an
//! oversize change) rejects the whole message and the peer is told why. Authority — who may write
//! what — depends on the rest of the registry and is decided later by the typed view, so that
//! every replica holds the same document whatever order it learned things in.

mod epoch;

use std::collections::BTreeMap;

use automerge::legacy::{Key as OpKey, ObjectId, OpType};
use automerge::sync::{self, SyncDoc as _};
use automerge::transaction::{CommitOptions, Transactable as _};
use automerge::{ActorId, Automerge, Change, ChangeHash, ROOT, ReadDoc as _, ScalarValue, Value};

use crate::checkpoint::{self, SYNC_ASK, SYNC_BASE, SYNC_EPOCH, SYNC_NOTICE};
use crate::entry::{Entry, EntryKey, Held, Invalid, MAX_ENTRY_BYTES, Payload};
use crate::key::Key;
use crate::record::Body;
use crate::view::{self, Authority, View};
pub use epoch::Crossing;
use epoch::{Base, Owe};

/// Largest change accepted from a peer or written locally.
pub const MAX_CHANGE_BYTES: usize = 1024 * 1024;
/// Largest change sent whole on gossip; bigger ones are announced by hash and fetched by sync.
pub const MAX_GOSSIP_CHANGE_BYTES: usize = 60 * 1024;
/// Largest sync message accepted or produced (a catch-up of many changes is split in rounds).
pub const MAX_SYNC_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The most change bytes one sync message this replica sends carries: far under
/// [`MAX_SYNC_MESSAGE_BYTES`], so that a replica however far behind catches up, batch by batch.
pub const SYNC_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most changes or heads in one gossip message.
const MAX_GOSSIP_ITEMS: usize = 64;
/// Most checked changes held back for missing dependencies; the oldest go first (sync fetches
/// them again).
const MAX_PENDING: usize = 4096;

/// Automerge's chunk type byte for an uncompressed change.
pub(crate) const CHANGE_CHUNK: u8 = 1;

/// The actor of the change that puts `entry`: its start op (big-endian, so that new actors sort
/// after old ones and Automerge appends to its actor table rather than re-indexing it), then 64
/// bits of a hash of everything else the change holds.
pub(crate) fn change_actor(
    entry: &[u8],
    sorted_deps: &[ChangeHash],
    time: i64,
    start_op: u64,
) -> [u8; 16] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"funcmesh/registry/actor/v1\0");
    h.update((entry.len() as u64).to_be_bytes());
    h.update(entry);
    for d in sorted_deps {
        h.update(d.0);
    }
    h.update(time.to_be_bytes());
    h.update(start_op.to_be_bytes());
    let mut out = [0; 16];
    out[..8].copy_from_slice(&start_op.to_be_bytes());
    out[8..].copy_from_slice(&h.finalize()[..8]);
    out
}

/// Gossip message: one or more changes, each length-prefixed.
const GOSSIP_CHANGES: u8 = 1;
/// Gossip message: heads only (the changes were too big to gossip).
const GOSSIP_HEADS: u8 = 2;
/// Gossip message of an epoch after the first: the epoch, then one of the above.
const GOSSIP_EPOCH: u8 = 3;

/// Why a message from a peer was rejected. The peer sent something no honest funcmesh node
/// sends, so the caller penalises it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Over a size limit.
    #[error("{what} of {size} bytes, at most {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not decodable.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A change does something entries never do.
    #[error("change {change} is not a registry change: {reason}")]
    ForeignOp {
        /// The change hash.
        change: String,
        /// What it does.
        reason: String,
    },
    /// A change carries an entry that is not valid.
    #[error("change {change} carries an invalid entry: {reason}")]
    BadEntry {
        /// The change hash.
        change: String,
        /// Why the entry is invalid.
        reason: Invalid,
    },
    /// Automerge refused the change (a duplicate sequence number, say).
    #[error("the document refused the change: {0}")]
    Refused(String),
    /// Automerge panicked on the input. The document may be inconsistent: the registry is
    /// poisoned and must be reloaded from the store ([`Registry::is_poisoned`]).
    #[error("the document crashed on the input and must be reloaded from disk")]
    Crashed,
}

/// Why a local write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The entry is over [`MAX_ENTRY_BYTES`].
    #[error("the {kind} entry is {size} bytes, at most {MAX_ENTRY_BYTES}: make it smaller")]
    TooLarge {
        /// Kind.
        kind: &'static str,
        /// Size.
        size: usize,
    },
    /// A pre-signed entry does not verify.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The registry already holds this very entry.
    #[error("the registry already holds entry {0}")]
    Exists(String),
    /// The document refused it.
    #[error("the document refused the write: {0}")]
    Refused(String),
}

/// What applying changes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Entries new to this replica.
    pub new_entries: usize,
    /// The document is missing changes these depend on: sync with the sender.
    pub missing_deps: bool,
    /// Changes that are now part of the document, to persist.
    pub changes: Vec<Vec<u8>>,
    /// Changes the message carried.
    pub received: usize,
    /// Of those, changes the document already had (not checked again: see
    /// [`Registry::check_change`]).
    pub known: usize,
    /// A checkpoint to cross with (or a base a peer sent) arrived: call [`Registry::cross`].
    pub checkpoint: bool,
}

/// A peer's sync state: what we believe it has. Persist [`SyncState::encode`] between sessions.
#[derive(Debug)]
pub struct SyncState {
    inner: sync::State,
    /// The epoch `inner` belongs to: a state from another epoch starts afresh.
    epoch: u64,
    /// What this replica owes the peer before its next Automerge message.
    owe: Option<Owe>,
    /// The peer said it is at a later epoch.
    peer_ahead: bool,
    /// The peer's epoch starts with a checkpoint this replica refused: the session ends.
    stalled: bool,
}

impl Default for SyncState {
    fn default() -> Self {
        SyncState {
            inner: sync::State::new(),
            epoch: 0,
            owe: None,
            peer_ahead: false,
            stalled: false,
        }
    }
}

impl SyncState {
    /// A fresh state for a peer never synced with.
    pub fn new() -> Self {
        SyncState::default()
    }
    /// Decodes a persisted state; a state that does not decode starts afresh (it only costs a
    /// longer first round).
    pub fn decode(bytes: &[u8]) -> Self {
        match bytes.split_first() {
            Some((&SYNC_EPOCH, _)) => match checkpoint::unframe(bytes) {
                Some((epoch, inner)) => SyncState {
                    epoch,
                    ..SyncState::decode(inner)
                },
                None => SyncState::default(),
            },
            _ => sync::State::decode(bytes)
                .map(|inner| SyncState {
                    inner,
                    ..SyncState::default()
                })
                .unwrap_or_default(),
        }
    }
    /// The part worth persisting (the heads we share, and their epoch).
    pub fn encode(&self) -> Vec<u8> {
        if self.epoch == 0 {
            self.inner.encode()
        } else {
            checkpoint::framed(SYNC_EPOCH, self.epoch, &self.inner.encode())
        }
    }
    /// Forgets in-flight bookkeeping after a lost message or a reconnect.
    pub fn reset(&mut self) {
        *self = SyncState::decode(&self.encode());
    }
}

/// The replicated registry document with its entries decoded.
#[derive(Debug)]
pub struct Registry {
    federation: String,
    doc: Automerge,
    /// Every entry in the document, by document key, as the view reads it (the signed bytes
    /// stay in the document alone).
    entries: BTreeMap<EntryKey, Held>,
    verdicts: view::Verdicts,
    view: Option<View>,
    /// What the view's build concluded about the members, for placing new entries in it.
    basis: view::Basis,
    /// Entries new since the view was built (only while there is one).
    fresh: Vec<EntryKey>,
    poisoned: bool,
    /// Checked changes waiting for their dependencies. Kept here rather than in Automerge's own
    /// queue, which sync cannot see into: two peers each holding queued changes the other
    /// needs would stall.
    pending: Vec<Change>,
    /// How many checkpoints the document has crossed.
    epoch: u64,
    /// The current epoch's base (from epoch 1 on).
    base: Option<Base>,
    /// The federation key, once an authority has named it: only its checkpoints count.
    federation_key: Option<Key>,
    /// What counted at the last checkpoint, for dropping old copies of what it pruned (worked
    /// out again, after a load, the first time an authority is at hand).
    winners: Option<view::Winners>,
    /// A later epoch's checkpoint entry a peer sent, to cross with.
    offered_checkpoint: Option<Entry>,
    /// A later epoch's base a peer sent (the checkpoint's change first), to adopt.
    offered_base: Option<Vec<Change>>,
    /// A peer is at a later epoch whose base this replica cannot derive: ask for it.
    want_base: bool,
    /// The last checkpoint refused, and why.
    refused: Option<(EntryKey, String)>,
}

impl Registry {
    /// An empty registry for `federation`.
    pub fn new(federation: &str) -> Registry {
        Registry {
            federation: federation.to_string(),
            doc: Automerge::new(),
            entries: BTreeMap::new(),
            verdicts: view::Verdicts::default(),
            view: None,
            basis: view::Basis::default(),
            fresh: Vec::new(),
            poisoned: false,
            pending: Vec::new(),
            epoch: 0,
            base: None,
            federation_key: None,
            winners: None,
            offered_checkpoint: None,
            offered_base: None,
            want_base: false,
            refused: None,
        }
    }

    /// Loads a registry saved with [`Registry::save`], then the changes persisted since. Changes
    /// that fail their checks are skipped and counted (the store holds only checked changes, so
    /// this means disk corruption).
    pub fn load(
        federation: &str,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
    ) -> Result<(Registry, usize), Rejected> {
        let mut reg = Registry::new(federation);
        if let Some(bytes) = snapshot {
            let loaded = std::panic::catch_unwind(|| Automerge::load(bytes));
            reg.doc = match loaded {
                Ok(Ok(doc)) => doc,
                Ok(Err(e)) => {
                    return Err(Rejected::Malformed {
                        what: "saved registry",
                        reason: e.to_string(),
                    });
                }
                Err(_) => return Err(Rejected::Crashed),
            };
        }
        let mut skipped = 0;
        let mut ok = Vec::new();
        for bytes in changes {
            match reg.decode_checked(bytes) {
                Ok(c) => ok.push(c),
                Err(_) => skipped += 1,
            }
        }
        reg.integrate(ok)?;
        reg.read_all_entries();
        reg.find_base();
        Ok((reg, skipped))
    }

    /// Runs a document mutation on peer input. Automerge can panic on crafted input that passes
    /// its parser; the panic is contained here and the registry marked poisoned.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Automerge) -> Result<T, automerge::AutomergeError>,
    ) -> Result<T, Rejected> {
        let doc = &mut self.doc;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(doc))) {
            Ok(r) => r.map_err(|e| Rejected::Refused(e.to_string())),
            Err(_) => {
                self.poisoned = true;
                self.view = None;
                Err(Rejected::Crashed)
            }
        }
    }

    /// Whether a contained panic left the document unusable: reload it from the store.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether the document holds the change `hash`.
    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    /// Whether changes are waiting for dependencies this replica does not have.
    pub fn has_missing_deps(&self) -> bool {
        !self.pending.is_empty() || !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// Applies the causally ready changes among `incoming` and those held back, and holds back
    /// the rest. Linear in the number of changes (Kahn's algorithm over the held-back set), so
    /// loading or catching up on ten thousand changes is one pass.
    fn integrate(&mut self, incoming: Vec<Change>) -> Result<(), Rejected> {
        use std::collections::{HashMap, HashSet, VecDeque};
        let mut all: Vec<Change> = std::mem::take(&mut self.pending);
        all.extend(incoming);
        let mut seen = HashSet::new();
        all.retain(|c| seen.insert(c.hash()) && !self.has_change(&c.hash()));
        let index: HashMap<ChangeHash, usize> =
            all.iter().enumerate().map(|(i, c)| (c.hash(), i)).collect();
        let mut waiting_on = vec![0usize; all.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); all.len()];
        let mut queue = VecDeque::new();
        for (i, c) in all.iter().enumerate() {
            let mut blocked = false;
            for d in c.deps() {
                match index.get(d) {
                    Some(&j) => {
                        waiting_on[i] += 1;
                        dependents[j].push(i);
                    }
                    None if self.has_change(d) => {}
                    None => blocked = true,
                }
            }
            if blocked {
                // Never reaches zero: it and its dependents wait for the missing change.
                waiting_on[i] = usize::MAX;
            } else if waiting_on[i] == 0 {
                queue.push_back(i);
            }
        }
        let mut order = Vec::new();
        while let Some(i) = queue.pop_front() {
            order.push(i);
            for &k in &dependents[i] {
                if waiting_on[k] != usize::MAX {
                    waiting_on[k] -= 1;
                    if waiting_on[k] == 0 {
                        queue.push_back(k);
                    }
                }
            }
        }
        let ready_set: HashSet<usize> = order.iter().copied().collect();
        let mut slots: Vec<Option<Change>> = all.into_iter().map(Some).collect();
        let ready: Vec<Change> = order.iter().filter_map(|&i| slots[i].take()).collect();
        self.pending = slots
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !ready_set.contains(i))
            .filter_map(|(_, c)| c)
            .collect();
        if self.pending.len() > MAX_PENDING {
            let excess = self.pending.len() - MAX_PENDING;
            self.pending.drain(..excess);
        }
        if !ready.is_empty() {
            self.guarded(|doc| doc.apply_changes(ready))?;
        }
        Ok(())
    }

    /// The federation id.
    pub fn federation(&self) -> &str {
        &self.federation
    }

    /// Number of entries in the document (valid or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the document has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The document's heads, hex.
    pub fn heads_hex(&self) -> Vec<String> {
        self.doc.get_heads().iter().map(|h| h.to_string()).collect()
    }

    /// The whole document, compacted into one chunk. Guarded like every other operation on a
    /// document peers have written to.
    pub fn save(&self) -> Result<Vec<u8>, Rejected> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.doc.save()))
            .map_err(|_| Rejected::Crashed)
    }

    /// Every change in the document (for tests and benchmarks).
    pub fn all_changes(&self) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(&[])
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// The typed view. Built once, then kept up to date: new endpoints, functions and flows are
    /// placed in it (`view::extend`); any other new entry — a node, an institution, a
    /// revocation, a deletion — has it rebuilt.
    pub fn view(&mut self, authority: &dyn Authority) -> &View {
        self.federation_key = Some(authority.federation_key());
        if self.base.is_some() && self.winners.is_none() {
            self.winners = Some(self.base_winners(authority));
        }
        if let Some(view) = &mut self.view {
            if !self.fresh.is_empty() {
                let fresh: Vec<&Held> = self
                    .fresh
                    .iter()
                    .filter_map(|k| self.entries.get(k))
                    .collect();
                if !view::extend(view, &mut self.basis, &fresh) {
                    self.view = None;
                }
                self.fresh.clear();
            }
        }
        if self.view.is_none() {
            let (view, basis) = view::build(self.entries.values(), authority, &mut self.verdicts);
            self.view = Some(view);
            self.basis = basis;
            self.fresh.clear();
        }
        self.view.as_ref().expect("built above")
    }

    /// Notes a new entry for the view.
    fn entry_added(&mut self, key: EntryKey) {
        if self.view.is_some() {
            self.fresh.push(key);
        }
    }

    /// Signs and writes a record. Returns the entry and the change to persist and gossip.
    pub fn write(
        &mut self,
        signer: &ed25519_dalek::SigningKey,
        id: String,
        body: Body,
        now_ms: u64,
    ) -> Result<(Entry, Vec<u8>), WriteError> {
        let author = Key::of(signer);
        // Above every earlier entry of ours for this record, and at least the time: a node whose
        // store was lost still writes above what its peers hold from before.
        let seq = self
            .entries
            .values()
            .filter(|e| e.author == author && e.id == id && e.body.kind() == body.kind())
            .map(|e| e.seq.saturating_add(1))
            .max()
            .unwrap_or(1)
            .max(now_ms);
        let kind = body.kind().as_str();
        let entry = Entry::sign(
            signer,
            Payload {
                federation: self.federation.clone(),
                id,
                seq,
                author,
                at_ms: now_ms,
                body,
            },
        );
        if entry.bytes().len() > MAX_ENTRY_BYTES {
            return Err(WriteError::TooLarge {
                kind,
                size: entry.bytes().len(),
            });
        }
        // What we write must be what every peer can read back.
        Entry::open(entry.bytes(), &self.federation)?;
        let change = self.insert_unchecked(&entry, now_ms)?;
        Ok((entry, change))
    }

    /// Writes an entry signed elsewhere (a revocation signed with an institution key by the
    /// CLI, say). The signature is checked; authority is the view's business.
    pub fn insert_signed(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(Entry, Vec<u8>), WriteError> {
        let entry = Entry::open(bytes, &self.federation)?;
        let change = self.insert_unchecked(&entry, now_ms)?;
        Ok((entry, change))
    }

    /// Puts an entry's bytes into the document as they are: the primitive under every write,
    /// public so that tests can make changes a dishonest member would make.
    pub fn insert_unchecked(&mut self, entry: &Entry, now_ms: u64) -> Result<Vec<u8>, WriteError> {
        let key = EntryKey::of(entry.bytes());
        if self.entries.contains_key(&key) {
            return Err(WriteError::Exists(entry.doc_key().to_string()));
        }
        // One change per entry, by an actor derived from everything in the change: no two
        // different changes can share an actor and sequence number (see `check_change`).
        let mut deps = self.doc.get_heads();
        deps.sort();
        let start_op = deps
            .iter()
            .filter_map(|h| self.doc.get_change_meta_by_hash(h))
            .map(|m| m.max_op)
            .max()
            .unwrap_or(0)
            + 1;
        let time = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let actor = change_actor(entry.bytes(), &deps, time, start_op);
        self.doc.set_actor(ActorId::from(actor));
        let mut tx = self.doc.transaction();
        tx.put(
            ROOT,
            entry.doc_key(),
            ScalarValue::Bytes(entry.bytes().to_vec()),
        )
        .map_err(|e| WriteError::Refused(e.to_string()))?;
        tx.commit_with(CommitOptions::default().with_time(time));
        let change = self
            .doc
            .get_last_local_change()
            .expect("a change was just committed")
            .raw_bytes()
            .to_vec();
        self.entries.insert(key, entry.clone().held());
        self.entry_added(key);
        Ok(change)
    }

    /// Checks one change from a peer without applying it: see the module docs for the rules.
    pub fn check_change(&self, change: &Change) -> Result<(), Rejected> {
        let hash = change.hash().to_string();
        let raw = change.raw_bytes();
        let foreign = |reason: String| Rejected::ForeignOp {
            change: hash.clone(),
            reason,
        };
        if raw.len() > MAX_CHANGE_BYTES {
            return Err(Rejected::TooLarge {
                what: "change",
                size: raw.len(),
                limit: MAX_CHANGE_BYTES,
            });
        }
        // Automerge parses a chunk without checking its checksum (the first four bytes of the
        // change hash); a corrupted chunk can parse into a different, nonsensical change.
        if raw.get(4..8) != Some(&change.hash().0[..4]) {
            return Err(Rejected::Malformed {
                what: "change",
                reason: "checksum mismatch".into(),
            });
        }
        // A registry change is one put by an actor derived from the whole change, at sequence 1:
        // a member cannot make a second, different change under an honest change's actor and
        // sequence number, which Automerge would refuse as a duplicate and replicas would then
        // disagree on.
        let expanded = change.decode();
        if expanded.operations.len() != 1 {
            return Err(foreign(format!(
                "it has {} operations, registry changes have one",
                expanded.operations.len()
            )));
        }
        if change.seq() != 1
            || !change.other_actor_ids().is_empty()
            || change.message().is_some_and(|m| !m.is_empty())
            || !change.extra_bytes().is_empty()
        {
            return Err(foreign(
                "its metadata is not that of a registry change".into(),
            ));
        }
        if let Some(op) = expanded.operations.first() {
            if !op.pred.is_empty() {
                return Err(foreign("it overwrites an existing value".into()));
            }
            if let OpType::Put(ScalarValue::Bytes(bytes)) = &op.action {
                let mut deps = change.deps().to_vec();
                deps.sort();
                let actor = change_actor(bytes, &deps, change.timestamp(), change.start_op().get());
                if change.actor_id().to_bytes() != actor {
                    return Err(foreign("its actor is not derived from its content".into()));
                }
            }
        }
        for op in expanded.operations {
            if op.obj != ObjectId::Root || op.insert {
                return Err(foreign("it writes outside the root map".into()));
            }
            let OpKey::Map(key) = &op.key else {
                return Err(foreign("it writes a list position".into()));
            };
            let OpType::Put(ScalarValue::Bytes(bytes)) = &op.action else {
                return Err(foreign(format!("it does {:?} on {key}", op.action)));
            };
            let entry =
                Entry::open(bytes, &self.federation).map_err(|reason| Rejected::BadEntry {
                    change: hash.clone(),
                    reason,
                })?;
            if entry.doc_key() != key.as_str() {
                return Err(foreign(format!(
                    "it puts an entry under {key}, not under its own key {}",
                    entry.doc_key()
                )));
            }
        }
        Ok(())
    }

    fn decode_checked(&self, bytes: &[u8]) -> Result<Change, Rejected> {
        if bytes.len() > MAX_CHANGE_BYTES {
            return Err(Rejected::TooLarge {
                what: "change",
                size: bytes.len(),
                limit: MAX_CHANGE_BYTES,
            });
        }
        // Only plain change chunks: a compressed one would be inflated, without bound, before
        // anything else could be checked. Our replicas never send compressed changes.
        if bytes.get(8) != Some(&CHANGE_CHUNK) {
            return Err(Rejected::Malformed {
                what: "change",
                reason: "not an uncompressed Automerge change chunk".into(),
            });
        }
        let change = Change::from_bytes(bytes.to_vec()).map_err(|e| Rejected::Malformed {
            what: "change",
            reason: e.to_string(),
        })?;
        // A change the document already has was checked when it came in (or was written
        // here): the same hash is the same bytes, so its signature is not verified again. A
        // sync with a peer whose state was reset resends what it cannot rule out.
        if !self.has_change(&change.hash()) {
            self.check_change(&change)?;
        }
        Ok(change)
    }

    /// Applies changes from a peer (all are checked first; one bad change rejects them all).
    pub fn apply_changes(&mut self, changes: &[Vec<u8>]) -> Result<Applied, Rejected> {
        let checked = changes
            .iter()
            .map(|c| self.decode_checked(c))
            .collect::<Result<Vec<_>, _>>()?;
        let before_heads = self.doc.get_heads();
        self.integrate(checked)?;
        Ok(self.applied(&before_heads))
    }

    /// What the document gained since `before_heads`, with the entries it gained decoded: the
    /// new changes are read once, for both, so that a change costs the same however large the
    /// registry is (no scan of every key).
    fn applied(&mut self, before_heads: &[ChangeHash]) -> Applied {
        let before = self.entries.len();
        let mut changes = Vec::new();
        let mut checkpoint = false;
        if self.doc.get_heads() != before_heads {
            let new = self.doc.get_changes(before_heads);
            for change in &new {
                if let Some(key) = self.read_entry(change) {
                    checkpoint |= self.is_next_checkpoint(&key);
                }
            }
            changes = new.into_iter().map(|c| c.raw_bytes().to_vec()).collect();
        }
        Applied {
            new_entries: self.entries.len() - before,
            missing_deps: self.has_missing_deps(),
            changes,
            checkpoint,
            ..Applied::default()
        }
    }

    /// Decodes the entry a change of the document puts, if it is new here, and returns its key.
    /// The value is what the document holds, checked again here.
    fn read_entry(&mut self, change: &Change) -> Option<EntryKey> {
        let mut added = None;
        for op in change.decode().operations {
            let (ObjectId::Root, OpKey::Map(key), OpType::Put(ScalarValue::Bytes(bytes))) =
                (&op.obj, &op.key, &op.action)
            else {
                continue;
            };
            if EntryKey::parse(key).is_some_and(|k| self.entries.contains_key(&k)) {
                continue;
            }
            if let Ok(entry) = Entry::open(bytes, &self.federation) {
                if entry.doc_key() == key.as_str() {
                    let held = entry.held();
                    let key = held.key;
                    self.entries.insert(key, held);
                    self.entry_added(key);
                    added = Some(key);
                }
            }
        }
        added
    }

    /// Decodes every entry of the document (on load). Values come straight from the document:
    /// the view reads what Automerge holds, checked again here.
    fn read_all_entries(&mut self) {
        let keys: Vec<String> = self
            .doc
            .keys(ROOT)
            .filter(|k| EntryKey::parse(k).is_none_or(|k| !self.entries.contains_key(&k)))
            .collect();
        if keys.is_empty() {
            return;
        }
        for key in keys {
            // Concurrent puts of the same key hold the same bytes; any of them will do.
            let Ok(values) = self.doc.get_all(ROOT, key.as_str()) else {
                continue;
            };
            for (value, _) in values {
                if let Value::Scalar(s) = value {
                    if let ScalarValue::Bytes(b) = s.as_ref() {
                        if let Ok(entry) = Entry::open(b, &self.federation) {
                            if entry.doc_key() == key {
                                let held = entry.held();
                                self.entries.insert(held.key, held);
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.view = None;
    }

    /// The gossip message announcing a local change: the change itself if small enough,
    /// otherwise the heads, which peers fetch by sync.
    pub fn gossip_for(&self, change: &[u8]) -> Vec<u8> {
        let inner = if change.len() + 8 <= MAX_GOSSIP_CHANGE_BYTES {
            let mut out = Vec::with_capacity(change.len() + 5);
            out.push(GOSSIP_CHANGES);
            out.extend_from_slice(&(change.len() as u32).to_be_bytes());
            out.extend_from_slice(change);
            out
        } else {
            let mut out = vec![GOSSIP_HEADS];
            for h in self.doc.get_heads().iter().take(MAX_GOSSIP_ITEMS) {
                out.extend_from_slice(&h.0);
            }
            out
        };
        if self.epoch == 0 {
            inner
        } else {
            checkpoint::framed(GOSSIP_EPOCH, self.epoch, &inner)
        }
    }

    /// Applies a gossip message. `Ok` with `missing_deps` (or heads we lack) means: sync with the
    /// sender.
    pub fn receive_gossip(&mut self, bytes: &[u8]) -> Result<Applied, Rejected> {
        let malformed = |reason: &str| Rejected::Malformed {
            what: "registry gossip",
            reason: reason.to_string(),
        };
        if bytes.len() > MAX_GOSSIP_CHANGE_BYTES + 1024 {
            return Err(Rejected::TooLarge {
                what: "registry gossip",
                size: bytes.len(),
                limit: MAX_GOSSIP_CHANGE_BYTES,
            });
        }
        let (epoch, bytes) = match bytes.first() {
            Some(&GOSSIP_EPOCH) => {
                checkpoint::unframe(bytes).ok_or_else(|| malformed("truncated epoch"))?
            }
            _ => (0, bytes),
        };
        let (&tag, mut rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if epoch > self.epoch {
            // The sender crossed a checkpoint this replica has not: a sync with it brings the
            // checkpoint. Nothing of this message applies here.
            if ![GOSSIP_CHANGES, GOSSIP_HEADS].contains(&tag) {
                return Err(malformed(&format!("unknown message type {tag}")));
            }
            return Ok(Applied {
                missing_deps: true,
                ..Applied::default()
            });
        }
        match tag {
            GOSSIP_CHANGES => {
                let mut changes = Vec::new();
                while !rest.is_empty() {
                    if changes.len() == MAX_GOSSIP_ITEMS {
                        return Err(malformed("too many changes"));
                    }
                    let (len, tail) = rest
                        .split_first_chunk::<4>()
                        .ok_or_else(|| malformed("truncated length"))?;
                    let len = u32::from_be_bytes(*len) as usize;
                    if len > tail.len() {
                        return Err(malformed("truncated change"));
                    }
                    changes.push(tail[..len].to_vec());
                    rest = &tail[len..];
                }
                if changes.is_empty() {
                    return Err(malformed("no change"));
                }
                if epoch < self.epoch {
                    // From a member that has not crossed yet: keep its entries, on our base.
                    // No sync with the forwarder (it has most likely crossed too, and every
                    // replica absorbs the same message into the same change): the author learns
                    // of the checkpoint from the next gossip or sync it takes part in.
                    return self.absorb(&changes);
                }
                self.apply_changes(&changes)
            }
            GOSSIP_HEADS => {
                if rest.is_empty() || rest.len() % 32 != 0 || rest.len() / 32 > MAX_GOSSIP_ITEMS {
                    return Err(malformed("heads are 32-byte hashes, 1 to 64 of them"));
                }
                // Heads of an older epoch: the sender is behind, and learns it by itself.
                let missing = epoch == self.epoch
                    && rest.chunks(32).any(|h| {
                        let hash = ChangeHash(h.try_into().expect("chunks of 32"));
                        !self.has_change(&hash)
                    });
                Ok(Applied {
                    missing_deps: missing,
                    ..Applied::default()
                })
            }
            other => Err(malformed(&format!("unknown message type {other}"))),
        }
    }

    /// The next sync message for a peer, if there is anything to say: at most
    /// [`SYNC_BATCH_BYTES`] of changes (a peer further behind gets the rest in the next rounds
    /// of the session).
    pub fn generate_sync(&self, state: &mut SyncState) -> Option<Vec<u8>> {
        self.generate_sync_within(state, SYNC_BATCH_BYTES)
    }

    /// [`Registry::generate_sync`] with at most `budget` bytes of changes per message (always at
    /// least one change, whatever its size). The changes left out are taken off the state's
    /// record of what was sent, so that the peer's next answer — its new heads and what it has —
    /// makes the next message carry them.
    pub fn generate_sync_within(&self, state: &mut SyncState, budget: usize) -> Option<Vec<u8>> {
        self.align(state);
        if std::mem::take(&mut state.stalled) {
            return None;
        }
        if let Some(owe) = state.owe.take() {
            if let Some(msg) = self.owed(owe) {
                return Some(msg);
            }
        }
        if self.want_base && state.peer_ahead {
            state.peer_ahead = false;
            return Some(checkpoint::framed(SYNC_ASK, self.epoch, &[1]));
        }
        let msg = self.automerge_sync(state, budget)?;
        Some(if self.epoch == 0 {
            msg
        } else {
            checkpoint::framed(SYNC_EPOCH, self.epoch, &msg)
        })
    }

    /// A state kept from another epoch describes another document: start it afresh.
    fn align(&self, state: &mut SyncState) {
        if state.epoch != self.epoch {
            state.inner = sync::State::new();
            state.epoch = self.epoch;
        }
    }

    fn automerge_sync(&self, state: &mut SyncState, budget: usize) -> Option<Vec<u8>> {
        let mut msg = self.doc.generate_sync_message(&mut state.inner)?;
        let chunks: Vec<&[u8]> = msg.changes.iter().collect();
        let mut size = 0;
        let keep = chunks
            .iter()
            .position(|c| {
                size += c.len();
                size > budget
            })
            .map_or(chunks.len(), |i| i.max(1));
        if keep < chunks.len() {
            let kept: Vec<Vec<u8>> = chunks[..keep].iter().map(|c| c.to_vec()).collect();
            for c in &chunks[keep..] {
                if let Ok(change) = Change::from_bytes(c.to_vec()) {
                    state.inner.sent_hashes.remove(&change.hash());
                }
            }
            msg.changes = kept.into();
        }
        Some(msg.encode())
    }

    /// A one-line account of a sync message from a peer and of what this replica holds of it,
    /// with the state kept for that peer: for debugging sessions that do not end. Hashes are
    /// shortened to their first four bytes; `+` marks one this document holds, `-` one it lacks.
    pub fn describe_sync(&self, state: &SyncState, bytes: &[u8]) -> String {
        let short = |h: &ChangeHash| {
            let mark = if self.has_change(h) { '+' } else { '-' };
            format!("{mark}{}", hex::encode(&h.0[..4]))
        };
        let list = |hs: &[ChangeHash]| hs.iter().map(short).collect::<Vec<_>>().join(",");
        let ours = list(&self.doc.get_heads());
        let missing = list(&self.doc.get_missing_deps(&[]));
        let s = &state.inner;
        let mine = format!(
            "shared=[{}] last_sent=[{}] their_heads=[{}] sent={} in_flight={} responded={}",
            list(&s.shared_heads),
            list(&s.last_sent_heads),
            s.their_heads.as_deref().map_or("?".into(), list),
            s.sent_hashes.len(),
            s.in_flight,
            s.have_responded,
        );
        let bytes = match bytes.first() {
            Some(&SYNC_EPOCH) => checkpoint::unframe(bytes).map_or(bytes, |(_, b)| b),
            _ => bytes,
        };
        let Ok(msg) = sync::Message::decode(bytes) else {
            return format!("undecodable message; ours=[{ours}] missing=[{missing}] {mine}");
        };
        let changes: Vec<String> = msg
            .changes
            .iter()
            .map(|c| match Change::from_bytes(c.to_vec()) {
                Ok(change) => format!("{}<{}>", short(&change.hash()), list(change.deps())),
                Err(_) => "?".into(),
            })
            .collect();
        let have: Vec<String> = msg
            .have
            .iter()
            .map(|h| format!("[{}]", list(&h.last_sync)))
            .collect();
        format!(
            "msg heads=[{}] need=[{}] have={} changes=[{}]; ours=[{ours}] missing=[{missing}] pending={} {mine}",
            list(&msg.heads),
            list(&msg.need),
            have.join(""),
            changes.join(" "),
            self.pending.len(),
        )
    }

    /// Applies a sync message from a peer. Every change in it is checked first; version-2
    /// messages (whole-document chunks that cannot be checked change by change) are refused,
    /// and we never advertise them.
    pub fn receive_sync(
        &mut self,
        state: &mut SyncState,
        bytes: &[u8],
    ) -> Result<Applied, Rejected> {
        if bytes.len() > MAX_SYNC_MESSAGE_BYTES {
            return Err(Rejected::TooLarge {
                what: "sync message",
                size: bytes.len(),
                limit: MAX_SYNC_MESSAGE_BYTES,
            });
        }
        let malformed = |reason: String| Rejected::Malformed {
            what: "sync message",
            reason,
        };
        self.align(state);
        let (epoch, bytes) = match bytes.first() {
            Some(&tag @ (SYNC_EPOCH | SYNC_NOTICE | SYNC_ASK | SYNC_BASE)) => {
                let (epoch, body) = checkpoint::unframe(bytes)
                    .ok_or_else(|| malformed("truncated epoch".into()))?;
                if tag != SYNC_EPOCH {
                    return self.receive_epoch_message(state, tag, epoch, body);
                }
                (epoch, body)
            }
            _ => (0, bytes),
        };
        if epoch > self.epoch {
            // The peer crossed a checkpoint this replica has not: ask for it.
            state.peer_ahead = true;
            state.owe = Some(Owe::Ask);
            return Ok(Applied::default());
        }
        let mut msg = sync::Message::decode(bytes).map_err(|e| malformed(e.to_string()))?;
        if msg.version != sync::MessageVersion::V1 {
            return Err(Rejected::Malformed {
                what: "sync message",
                reason: "version 2 sync messages are not accepted; send changes one by one".into(),
            });
        }
        if msg.supported_capabilities.is_some() {
            msg.supported_capabilities = Some(vec![sync::Capability::MessageV1]);
        }
        if epoch < self.epoch {
            // The peer has not crossed the checkpoint yet: keep what it sent, on our base, and
            // tell it about the checkpoint.
            let chunks: Vec<Vec<u8>> = msg.changes.iter().map(<[u8]>::to_vec).collect();
            let applied = self.absorb(&chunks)?;
            state.owe = Some(Owe::Notice);
            return Ok(applied);
        }
        let received = msg.changes.len();
        let mut known = 0;
        for chunk in msg.changes.iter() {
            let change = self.decode_checked(chunk)?;
            known += usize::from(self.has_change(&change.hash()));
        }
        let before_heads = self.doc.get_heads();
        self.guarded(|doc| doc.receive_sync_message(&mut state.inner, msg))?;
        // What arrived may be what held-back changes were waiting for.
        if !self.pending.is_empty() {
            self.integrate(Vec::new())?;
        }
        Ok(Applied {
            received,
            known,
            ..self.applied(&before_heads)
        })
    }
}
