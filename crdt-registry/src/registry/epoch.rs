//! Crossing checkpoints: the registry's epochs (`docs/design/registry-checkpoints.md`).
//!
//! A checkpoint entry, written with the federation key on top of heads H, starts epoch e + 1.
//! Every member that holds it (and so H's history, which its change depends on) derives the same
//! base from the entries that counted at H ([`crate::checkpoint`]), compares the base's last
//! hash with the one the entry names, and rebuilds its document as the base plus every other
//! entry it holds put again canonically. Superseded entries stay behind. A member that cannot
//! derive the base (it joined later, or was away) is sent it by a peer and checks it against the
//! signed hash. Until every member has crossed, messages from the old epoch are taken apart and
//! their entries put on the new base.

use std::collections::HashSet;

use automerge::legacy::{Key as OpKey, ObjectId, OpType};
use automerge::{Automerge, Change, ChangeHash, ROOT, ReadDoc as _, ScalarValue, Value};

use super::{Applied, Registry, Rejected, WriteError};
use crate::checkpoint::{self, SYNC_ASK, SYNC_BASE, SYNC_NOTICE};
use crate::entry::{Entry, EntryKey, Held, HeldBody};
use crate::record::{Body, CheckpointRecord};
use crate::view::{self, Authority};

/// The current epoch's base.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    /// The base's last change.
    pub(crate) last: ChangeHash,
    /// Its highest op counter: canonical changes start above it.
    pub(crate) max_op: u64,
    /// The checkpoint entry that started the epoch.
    pub(crate) checkpoint: EntryKey,
    /// Entries in the base.
    pub(crate) len: usize,
}

/// What a replica owes a peer in a sync session, before any Automerge message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owe {
    /// The peer is behind: send the checkpoint entry of this epoch.
    Notice,
    /// The peer cannot derive the base: send it.
    Bundle,
    /// This replica is behind: ask for the checkpoint.
    Ask,
}

/// What [`Registry::cross`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crossing {
    /// Nothing to cross.
    Nothing,
    /// The document is now in this epoch: persist it whole ([`Registry::save`]) in place of
    /// everything stored before, and start every sync state afresh.
    Crossed(u64),
    /// A later epoch exists whose base this replica cannot derive: the next sync message to a
    /// peer in it asks for the base.
    NeedBase,
    /// The checkpoint was refused (the base derived here differs from the one it names, say):
    /// the replica stays in its epoch and loses nothing.
    Refused(String),
}

/// A checkpoint record with its hashes parsed.
struct Named {
    record: CheckpointRecord,
    heads: Vec<ChangeHash>,
    base: ChangeHash,
}

fn named(record: &CheckpointRecord) -> Result<Named, String> {
    let parse = |h: &str| -> Result<ChangeHash, String> {
        h.parse().map_err(|_| format!("{h:?} is not a change hash"))
    };
    let mut heads = record
        .heads
        .iter()
        .map(|h| parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    heads.sort();
    Ok(Named {
        record: record.clone(),
        heads,
        base: parse(&record.base)?,
    })
}

/// What a checkpoint at the current heads would keep.
pub(crate) struct Plan {
    pub(crate) heads: Vec<ChangeHash>,
    pub(crate) base: Vec<Change>,
    /// The keys of the entries in the base, in its order.
    pub(crate) kept: Vec<EntryKey>,
    pub(crate) pruned: usize,
    winners: view::Winners,
    in_h: HashSet<EntryKey>,
}

impl Registry {
    /// How many checkpoints the document has crossed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Entries outside the current base (all of them before the first checkpoint): each has its
    /// own actor, and the document's memory grows with their square. A coordinator writes the
    /// next checkpoint when these are many.
    pub fn outside_base(&self) -> usize {
        self.entries.len()
            - self
                .base
                .as_ref()
                .map_or(0, |b| b.len.min(self.entries.len()))
    }

    /// The last checkpoint this replica refused, and why.
    pub fn refused_checkpoint(&self) -> Option<&str> {
        self.refused.as_ref().map(|(_, why)| why.as_str())
    }

    /// Names the federation key, so that checkpoints can be judged before the first view.
    pub fn set_federation_key(&mut self, key: crate::Key) {
        self.federation_key = Some(key);
    }

    /// Whether `key` is a checkpoint entry for a later epoch than this document's.
    pub(super) fn is_next_checkpoint(&self, key: &EntryKey) -> bool {
        self.entries.get(key).is_some_and(|e| {
            matches!(&e.body, HeldBody::Checkpoint(r) if r.epoch > self.epoch)
                && self.federation_key.is_none_or(|k| k == e.author)
                && self.refused.as_ref().is_none_or(|(k, _)| k != key)
        })
    }

    /// The signed bytes of a held entry, from the document.
    fn entry_bytes(&self, key: &EntryKey) -> Option<Vec<u8>> {
        let (value, _) = self.doc.get(ROOT, key.to_string()).ok()??;
        match value {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Bytes(b) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// After a load: the epoch the document is in, from the checkpoint entries whose base it
    /// holds (a base is made only by the actor its checkpoint names).
    pub(super) fn find_base(&mut self) {
        let mut best: Option<(u64, Base)> = None;
        for e in self.entries.values() {
            let HeldBody::Checkpoint(rec) = &e.body else {
                continue;
            };
            let Ok(n) = named(rec) else { continue };
            let Some(last) = self.doc.get_change_by_hash(&n.base) else {
                continue;
            };
            if *last.actor_id() != checkpoint::base_actor(rec.epoch, &n.heads) {
                continue;
            }
            if best.as_ref().is_none_or(|(epoch, _)| rec.epoch > *epoch) {
                let base = Base {
                    last: n.base,
                    max_op: last.max_op(),
                    checkpoint: e.key,
                    len: 0,
                };
                best = Some((rec.epoch, base));
            }
        }
        if let Some((epoch, base)) = best {
            self.epoch = epoch;
            self.base = Some(base);
            self.winners = None;
            let len = self.base_chain().iter().map(Change::len).sum();
            if let Some(base) = &mut self.base {
                base.len = len;
            }
        }
    }

    /// The changes of the current base, first to last.
    fn base_chain(&self) -> Vec<Change> {
        let Some(base) = &self.base else {
            return Vec::new();
        };
        let mut chain = Vec::new();
        let mut next = Some(base.last);
        while let Some(hash) = next {
            let Some(change) = self.doc.get_change_by_hash(&hash) else {
                break;
            };
            next = change.deps().first().copied();
            chain.push(change.clone());
        }
        chain.reverse();
        chain
    }

    /// What counted among the base's entries.
    pub(super) fn base_winners(&mut self, authority: &dyn Authority) -> view::Winners {
        let keys: HashSet<EntryKey> = self.base_chain().iter().flat_map(keys_put).collect();
        let entries: Vec<&Held> = keys.iter().filter_map(|k| self.entries.get(k)).collect();
        view::winners(entries.iter().copied(), authority, &mut self.verdicts)
    }

    /// Puts the entries of old-epoch changes (checked as any change from a peer) on this
    /// epoch's base, leaving out what the checkpoint superseded.
    pub(super) fn absorb(&mut self, changes: &[Vec<u8>]) -> Result<Applied, Rejected> {
        // An old epoch's message may carry that epoch's base changes too: any change whose
        // operations all put signed entries under their own keys gives its entries; anything
        // else rejects the message, as at the door.
        let mut entries = Vec::new();
        for bytes in changes {
            entries.extend(self.entries_of_old_change(bytes)?);
        }
        let received = changes.len();
        let before = self.entries.len();
        let changes = self.put_canonically(entries)?;
        Ok(Applied {
            new_entries: self.entries.len() - before,
            changes: changes.iter().map(|c| c.raw_bytes().to_vec()).collect(),
            received,
            known: received - changes.len().min(received),
            ..Applied::default()
        })
    }

    /// The entries an older epoch's change puts, checked one by one (the change's shape does
    /// not matter: they are put again canonically).
    fn entries_of_old_change(&self, bytes: &[u8]) -> Result<Vec<Entry>, Rejected> {
        let malformed = |reason: String| Rejected::Malformed {
            what: "change",
            reason,
        };
        if bytes.len() > super::MAX_CHANGE_BYTES {
            return Err(Rejected::TooLarge {
                what: "change",
                size: bytes.len(),
                limit: super::MAX_CHANGE_BYTES,
            });
        }
        if bytes.get(8) != Some(&super::CHANGE_CHUNK) {
            return Err(malformed(
                "not an uncompressed Automerge change chunk".into(),
            ));
        }
        let change = Change::from_bytes(bytes.to_vec()).map_err(|e| malformed(e.to_string()))?;
        if bytes.get(4..8) != Some(&change.hash().0[..4]) {
            return Err(malformed("checksum mismatch".into()));
        }
        let hash = change.hash().to_string();
        let mut out = Vec::new();
        for op in change.decode().operations {
            let (ObjectId::Root, OpKey::Map(key), OpType::Put(ScalarValue::Bytes(b)), false) =
                (&op.obj, &op.key, &op.action, op.insert)
            else {
                return Err(Rejected::ForeignOp {
                    change: hash,
                    reason: "it does something other than put entries".into(),
                });
            };
            let entry = Entry::open(b, &self.federation).map_err(|reason| Rejected::BadEntry {
                change: hash.clone(),
                reason,
            })?;
            if entry.doc_key() != key.as_str() {
                return Err(Rejected::ForeignOp {
                    change: hash,
                    reason: "it puts an entry under another key".into(),
                });
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Puts entries new here on the base, each by its canonical change; returns the changes.
    fn put_canonically(&mut self, entries: Vec<Entry>) -> Result<Vec<Change>, Rejected> {
        let Some(base) = self.base.clone() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries {
            let key = EntryKey::of(entry.bytes());
            if self.entries.contains_key(&key) {
                continue;
            }
            let held = entry.clone().held();
            if self
                .winners
                .as_ref()
                .is_some_and(|w| view::superseded(w, &held))
            {
                continue;
            }
            let change = checkpoint::canonical(&entry, base.last, base.max_op);
            self.guarded(|doc| doc.apply_changes([change.clone()]))?;
            self.entries.insert(key, held);
            self.entry_added(key);
            out.push(change);
        }
        Ok(out)
    }

    /// The message owed to a peer, if this replica can make it.
    pub(super) fn owed(&self, owe: Owe) -> Option<Vec<u8>> {
        match owe {
            Owe::Ask => Some(checkpoint::framed(SYNC_ASK, self.epoch, &[0])),
            Owe::Notice => {
                let base = self.base.as_ref()?;
                let bytes = self.entry_bytes(&base.checkpoint)?;
                Some(checkpoint::framed(SYNC_NOTICE, self.epoch, &bytes))
            }
            Owe::Bundle => {
                let base = self.base.as_ref()?;
                let entry =
                    Entry::open(&self.entry_bytes(&base.checkpoint)?, &self.federation).ok()?;
                let mut bundle = vec![checkpoint::canonical(&entry, base.last, base.max_op)];
                bundle.extend(self.base_chain());
                Some(checkpoint::framed(
                    SYNC_BASE,
                    self.epoch,
                    &checkpoint::encode_changes(&bundle),
                ))
            }
        }
    }

    /// A sync message about epochs (see [`crate::checkpoint`]'s tags).
    pub(super) fn receive_epoch_message(
        &mut self,
        state: &mut super::SyncState,
        tag: u8,
        epoch: u64,
        body: &[u8],
    ) -> Result<Applied, Rejected> {
        let malformed = |reason: String| Rejected::Malformed {
            what: "sync message",
            reason,
        };
        match tag {
            SYNC_NOTICE => {
                if epoch <= self.epoch {
                    return Ok(Applied::default());
                }
                let entry =
                    Entry::open(body, &self.federation).map_err(|reason| Rejected::BadEntry {
                        change: "(checkpoint notice)".into(),
                        reason,
                    })?;
                if !matches!(&entry.payload().body, Body::Checkpoint(r) if r.epoch == epoch) {
                    return Err(malformed(format!(
                        "a notice of epoch {epoch} that carries no checkpoint of it"
                    )));
                }
                if self
                    .refused
                    .as_ref()
                    .is_some_and(|(k, _)| *k == EntryKey::of(entry.bytes()))
                {
                    // Refused already: say nothing more in this session (the peer would only
                    // send the notice again).
                    state.stalled = true;
                    return Ok(Applied::default());
                }
                state.peer_ahead = true;
                self.offered_checkpoint = Some(entry);
                Ok(Applied {
                    checkpoint: true,
                    ..Applied::default()
                })
            }
            SYNC_ASK => {
                if epoch < self.epoch {
                    state.owe = Some(if body == [1] {
                        Owe::Bundle
                    } else {
                        Owe::Notice
                    });
                }
                Ok(Applied::default())
            }
            SYNC_BASE => {
                if epoch <= self.epoch {
                    return Ok(Applied::default());
                }
                let chunks = checkpoint::decode_changes(body).map_err(malformed)?;
                if chunks.len() < 2 {
                    return Err(malformed("a base without its checkpoint".into()));
                }
                let changes = chunks
                    .into_iter()
                    .map(|c| {
                        Change::from_bytes(c).map_err(|e| malformed(format!("base change: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                state.peer_ahead = true;
                self.offered_base = Some(changes);
                Ok(Applied {
                    checkpoint: true,
                    ..Applied::default()
                })
            }
            _ => Err(malformed(format!("unknown message type {tag}"))),
        }
    }

    /// Works out the base of a checkpoint at `heads` (which the document holds): the entries
    /// in their history that counted or may yet count, without the superseded ones.
    fn plan(
        &mut self,
        epoch: u64,
        heads: Vec<ChangeHash>,
        authority: &dyn Authority,
    ) -> Result<Plan, String> {
        if let Some(h) = heads.iter().find(|h| !self.has_change(h)) {
            return Err(format!("the document does not hold head {h}"));
        }
        let in_h = self.keys_at(&heads);
        let mut at_h: Vec<&Held> = in_h.iter().filter_map(|k| self.entries.get(k)).collect();
        at_h.sort_by_key(|e| e.key);
        let winners = view::winners(at_h.iter().copied(), authority, &mut self.verdicts);
        let kept: Vec<EntryKey> = at_h
            .iter()
            .filter(|e| !view::superseded(&winners, e))
            .map(|e| e.key)
            .collect();
        let pruned = at_h.len() - kept.len();
        let mut bytes = Vec::with_capacity(kept.len());
        for k in &kept {
            let b = self
                .entry_bytes(k)
                .ok_or_else(|| format!("entry {k} is not in the document"))?;
            bytes.push((*k, b));
        }
        let base = checkpoint::base(epoch, &heads, bytes.into_iter());
        Ok(Plan {
            heads,
            base,
            kept,
            pruned,
            winners,
            in_h,
        })
    }

    /// The keys of the entries put in the history of `heads` (which the document holds). Read
    /// from the changes after the heads, which are few when a checkpoint is made or crossed:
    /// every key no such change puts is in the history, and a key one of them puts is too if
    /// some change of the history also puts it (the same entry can be put by two changes).
    fn keys_at(&self, heads: &[ChangeHash]) -> HashSet<EntryKey> {
        let after = self.doc.get_changes(heads);
        let mut only_after: HashSet<EntryKey> = after.iter().flat_map(keys_put).collect();
        let mut in_h: HashSet<EntryKey> = self.entries.keys().copied().collect();
        if only_after.is_empty() {
            return in_h;
        }
        let twice: Vec<EntryKey> = only_after
            .iter()
            .filter(|k| {
                self.doc
                    .get_all(ROOT, k.to_string())
                    .is_ok_and(|values| values.len() > 1)
            })
            .copied()
            .collect();
        if !twice.is_empty() {
            // Rare: decide those keys from the history itself.
            let after: HashSet<ChangeHash> = after.iter().map(Change::hash).collect();
            let history: HashSet<EntryKey> = self
                .doc
                .get_changes(&[])
                .iter()
                .filter(|c| !after.contains(&c.hash()))
                .flat_map(keys_put)
                .collect();
            only_after.retain(|k| !history.contains(k));
        }
        in_h.retain(|k| !only_after.contains(k));
        in_h
    }

    /// How many entries a checkpoint now would leave out: what a coordinator weighs before
    /// writing one.
    pub fn prunable(&mut self, authority: &dyn Authority) -> usize {
        let winners = view::winners(self.entries.values(), authority, &mut self.verdicts);
        self.entries
            .values()
            .filter(|e| view::superseded(&winners, e))
            .count()
    }

    /// Writes the checkpoint that starts the next epoch, signed with the federation key, on top
    /// of the current heads. Gossip the change, then [`Registry::cross`] it like any other.
    pub fn write_checkpoint(
        &mut self,
        federation_key: &ed25519_dalek::SigningKey,
        authority: &dyn Authority,
        now_ms: u64,
    ) -> Result<(Entry, Vec<u8>), WriteError> {
        if crate::Key::of(federation_key) != authority.federation_key() {
            return Err(WriteError::Refused(
                "a checkpoint is signed with the federation key, and this is another key".into(),
            ));
        }
        let epoch = self.epoch + 1;
        // One checkpoint per epoch, ever: a second would split the federation by base.
        let fed = authority.federation_key();
        if self.entries.values().any(|e| {
            e.author == fed && matches!(&e.body, HeldBody::Checkpoint(r) if r.epoch >= epoch)
        }) {
            return Err(WriteError::Refused(format!(
                "a checkpoint for epoch {epoch} exists already: this replica must cross it, not \
                 write another"
            )));
        }
        let mut heads = self.doc.get_heads();
        heads.sort();
        let plan = self
            .plan(epoch, heads, authority)
            .map_err(WriteError::Refused)?;
        let record = CheckpointRecord {
            epoch,
            heads: plan.heads.iter().map(ToString::to_string).collect(),
            base: plan
                .base
                .last()
                .expect("a base has a change")
                .hash()
                .to_string(),
            kept: plan.kept.len() as u64,
            pruned: plan.pruned as u64,
        };
        self.write(
            federation_key,
            CheckpointRecord::id_for(epoch),
            Body::Checkpoint(record),
            now_ms,
        )
    }

    /// Crosses into a later epoch if there is one to cross into: a checkpoint entry held or
    /// offered whose base this replica derives (or a base a peer sent). Call it when
    /// [`Applied::checkpoint`] says so.
    pub fn cross(&mut self, authority: &dyn Authority) -> Crossing {
        let fed = authority.federation_key();
        self.federation_key = Some(fed);
        if let Some(bundle) = self.offered_base.take() {
            return match self.adopt(bundle, authority) {
                Ok(epoch) => Crossing::Crossed(epoch),
                Err(why) => Crossing::Refused(why),
            };
        }
        // The checkpoints for later epochs, by the federation key: the next one first.
        let offered = self.offered_checkpoint.take();
        let mut candidates: Vec<(u64, Entry)> = self
            .entries
            .values()
            .filter(|e| e.author == fed)
            .filter_map(|e| match &e.body {
                HeldBody::Checkpoint(r) if r.epoch > self.epoch => Some((r.epoch, e.key)),
                _ => None,
            })
            .filter(|(_, k)| self.refused.as_ref().is_none_or(|(r, _)| r != k))
            .filter_map(|(epoch, k)| {
                let bytes = self.entry_bytes(&k)?;
                Some((epoch, Entry::open(&bytes, &self.federation).ok()?))
            })
            .collect();
        if let Some(entry) = offered {
            if let Body::Checkpoint(r) = &entry.payload().body {
                let refused = self
                    .refused
                    .as_ref()
                    .is_some_and(|(k, _)| *k == EntryKey::of(entry.bytes()));
                if entry.payload().author == fed && r.epoch > self.epoch && !refused {
                    candidates.push((r.epoch, entry));
                }
            }
        }
        candidates.sort_by_key(|(epoch, e)| (*epoch, e.doc_key().to_string()));
        let Some((epoch, entry)) = candidates.into_iter().next() else {
            return Crossing::Nothing;
        };
        let Body::Checkpoint(record) = &entry.payload().body else {
            return Crossing::Nothing;
        };
        let named = match named(record) {
            Ok(n) => n,
            Err(why) => return self.refuse(&entry, why),
        };
        if epoch != self.epoch + 1 || named.heads.iter().any(|h| !self.has_change(h)) {
            // A later epoch than the next, or heads whose history this replica lacks.
            self.want_base = true;
            return Crossing::NeedBase;
        }
        match self.cross_with(&entry, named, authority) {
            Ok(()) => Crossing::Crossed(epoch),
            Err(why) => self.refuse(&entry, why),
        }
    }

    fn refuse(&mut self, entry: &Entry, why: String) -> Crossing {
        let why = format!(
            "checkpoint {} refused: {why}; staying in epoch {}",
            entry.payload().id,
            self.epoch
        );
        self.refused = Some((EntryKey::of(entry.bytes()), why.clone()));
        Crossing::Refused(why)
    }

    /// Derives the base of `entry`'s checkpoint here and rebuilds the document on it.
    fn cross_with(
        &mut self,
        entry: &Entry,
        named: Named,
        authority: &dyn Authority,
    ) -> Result<(), String> {
        let plan = self.plan(named.record.epoch, named.heads, authority)?;
        let last = plan.base.last().expect("a base has a change").hash();
        if last != named.base {
            return Err(format!(
                "the base derived here ends at {last}, the checkpoint names {} \
                 (it keeps {} entries and prunes {}; the checkpoint says {} and {})",
                named.base,
                plan.kept.len(),
                plan.pruned,
                named.record.kept,
                named.record.pruned
            ));
        }
        // Everything outside the base goes on top of it: what came after the heads, the
        // checkpoint itself, and changes still waiting for their dependencies.
        let carry = self.carried(entry, |k| !plan.in_h.contains(k));
        let base_held: Vec<Held> = plan
            .kept
            .iter()
            .filter_map(|k| self.entries.remove(k))
            .collect();
        self.rebuild(
            named.record.epoch,
            plan.base,
            base_held,
            EntryKey::of(entry.bytes()),
            plan.winners,
            carry,
        )
    }

    /// Checks a base a peer sent (the checkpoint's canonical change first) and rebuilds the
    /// document on it.
    fn adopt(&mut self, bundle: Vec<Change>, authority: &dyn Authority) -> Result<u64, String> {
        let mut bundle = bundle.into_iter();
        let cp_change = bundle.next().ok_or("an empty base")?;
        self.check_change(&cp_change).map_err(|e| e.to_string())?;
        let entry = entries_put(&cp_change, &self.federation)
            .into_iter()
            .next()
            .ok_or("the checkpoint change carries no entry")?;
        let Body::Checkpoint(record) = &entry.payload().body else {
            return Err("the base's first change is not a checkpoint".into());
        };
        if entry.payload().author != authority.federation_key() {
            return Err(format!(
                "the checkpoint is signed by {}, not the federation key",
                entry.payload().author
            ));
        }
        if record.epoch <= self.epoch
            || entry.payload().id != CheckpointRecord::id_for(record.epoch)
        {
            return Err(format!(
                "a base for epoch {}, and this replica is in epoch {}",
                record.epoch, self.epoch
            ));
        }
        let named = named(record)?;
        if cp_change.deps() != [named.base] {
            return Err("the checkpoint's change does not stand on its base".into());
        }
        let chain: Vec<Change> = bundle.collect();
        let base_entries = checkpoint::check_base(
            &chain,
            record.epoch,
            &named.heads,
            named.base,
            &self.federation,
        )?;
        let base_held: Vec<Held> = base_entries.into_iter().map(Entry::held).collect();
        let winners = view::winners(base_held.iter(), authority, &mut self.verdicts);
        // Everything this replica holds goes on top (what the base has is skipped, what it
        // superseded is dropped).
        let carry = self.carried(&entry, |_| true);
        let epoch = record.epoch;
        self.rebuild(
            epoch,
            chain,
            base_held,
            EntryKey::of(entry.bytes()),
            winners,
            carry,
        )?;
        Ok(epoch)
    }

    /// What goes on top of a new base: the checkpoint entry, the held entries `which` picks
    /// (their signed bytes, from the document), and the entries of changes still waiting.
    fn carried(&self, checkpoint: &Entry, which: impl Fn(&EntryKey) -> bool) -> Vec<Entry> {
        let mut carry = vec![checkpoint.clone()];
        for key in self.entries.keys().filter(|k| which(k)) {
            if let Some(bytes) = self.entry_bytes(key) {
                carry.extend(Entry::open(&bytes, &self.federation).ok());
            }
        }
        carry.extend(
            self.pending
                .iter()
                .flat_map(|c| entries_put(c, &self.federation)),
        );
        carry
    }

    /// Replaces the document with `base` and `carry` put canonically on it.
    fn rebuild(
        &mut self,
        epoch: u64,
        base: Vec<Change>,
        base_held: Vec<Held>,
        checkpoint: EntryKey,
        winners: view::Winners,
        carry: Vec<Entry>,
    ) -> Result<(), String> {
        let last = base.last().ok_or("an empty base")?;
        let base_info = Base {
            last: last.hash(),
            max_op: last.max_op(),
            checkpoint,
            len: base_held.len(),
        };
        let mut doc = Automerge::new();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(base)))
            .map_err(|_| "the document crashed on the base".to_string())?
            .map_err(|e| format!("the document refused the base: {e}"))?;
        self.doc = doc;
        self.entries = base_held.into_iter().map(|h| (h.key, h)).collect();
        self.pending.clear();
        self.epoch = epoch;
        self.base = Some(base_info);
        self.winners = Some(winners);
        self.offered_checkpoint = None;
        self.offered_base = None;
        self.want_base = false;
        self.view = None;
        self.fresh.clear();
        self.put_canonically(carry).map_err(|e| e.to_string())?;
        self.view = None;
        self.fresh.clear();
        Ok(())
    }
}

/// The entry keys a change puts.
fn keys_put(change: &Change) -> Vec<EntryKey> {
    change
        .decode()
        .operations
        .iter()
        .filter_map(|op| match (&op.obj, &op.key) {
            (ObjectId::Root, OpKey::Map(k)) => EntryKey::parse(k),
            _ => None,
        })
        .collect()
}

/// The entries a change puts (checked again: the signature is verified).
fn entries_put(change: &Change, federation: &str) -> Vec<Entry> {
    change
        .decode()
        .operations
        .into_iter()
        .filter_map(|op| match (op.obj, op.key, op.action) {
            (ObjectId::Root, OpKey::Map(_), OpType::Put(ScalarValue::Bytes(b))) => {
                Entry::open(&b, federation).ok()
            }
            _ => None,
        })
        .collect()
}
