//! Checkpoints: the changes a new epoch's document is made of, derived the same way on every
//! member (`docs/design/registry-checkpoints.md`).
//!
//! * The **base**: the entries that counted at the checkpoint's heads, sorted by key, put by a
//!   chain of changes of one actor derived from the checkpoint ([`base_actor`]), at time 0. The
//!   same entries give the same change hashes everywhere; the checkpoint entry names the last
//!   one, and a member that derives another refuses the checkpoint.
//! * **Canonical re-puts**: every entry outside the base (written after the heads, or arriving
//!   late from the old epoch) is put again by one change that depends only on the base's last
//!   change, with the actor derived from its content as every registry change has. Two members
//!   that re-put the same entry make the same change.
//!
//! Also here: the framing that tells peers which epoch a gossip or sync message belongs to.

use std::num::NonZeroU64;

use automerge::legacy::{Key as OpKey, ObjectId, Op, OpType, SortedVec};
use automerge::{ActorId, Change, ChangeHash, ExpandedChange, ScalarValue};

use crate::entry::{Entry, EntryKey};
use crate::registry::MAX_CHANGE_BYTES;

/// Entry bytes put by one base change, at most: with the keys and Automerge's columns the change
/// stays under [`MAX_CHANGE_BYTES`] (an entry is at most 256 KiB, so a change holds at least
/// three).
const BASE_CHANGE_ENTRY_BYTES: usize = MAX_CHANGE_BYTES - 256 * 1024;

/// The actor of every change of the base for `epoch` made at `heads` (sorted).
pub(crate) fn base_actor(epoch: u64, heads: &[ChangeHash]) -> ActorId {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"funcmesh/registry/base/v1\0");
    h.update(epoch.to_be_bytes());
    for d in heads {
        h.update(d.0);
    }
    ActorId::from(&h.finalize()[..16])
}

fn put(key: String, bytes: Vec<u8>) -> Op {
    Op {
        action: OpType::Put(ScalarValue::Bytes(bytes)),
        obj: ObjectId::Root,
        key: OpKey::Map(key.into()),
        pred: SortedVec::new(),
        insert: false,
    }
}

/// The base's chain of changes for `kept` (entry key and signed bytes, sorted by key).
pub(crate) fn base(
    epoch: u64,
    heads: &[ChangeHash],
    kept: impl Iterator<Item = (EntryKey, Vec<u8>)>,
) -> Vec<Change> {
    let actor = base_actor(epoch, heads);
    let mut changes: Vec<Change> = Vec::new();
    let mut ops = Vec::new();
    let mut size = 0;
    let mut start_op = 1u64;
    let seal = |ops: &mut Vec<Op>, changes: &mut Vec<Change>, start_op: &mut u64| {
        let n = ops.len() as u64;
        let change: Change = ExpandedChange {
            operations: std::mem::take(ops),
            actor_id: actor.clone(),
            hash: None,
            seq: changes.len() as u64 + 1,
            start_op: NonZeroU64::new(*start_op).expect("starts at 1"),
            time: 0,
            message: None,
            deps: changes.last().map(|c| vec![c.hash()]).unwrap_or_default(),
            extra_bytes: Vec::new(),
        }
        .into();
        *start_op += n;
        changes.push(change);
    };
    for (key, bytes) in kept {
        if size + bytes.len() > BASE_CHANGE_ENTRY_BYTES && !ops.is_empty() {
            seal(&mut ops, &mut changes, &mut start_op);
            size = 0;
        }
        size += bytes.len();
        ops.push(put(key.to_string(), bytes));
    }
    if !ops.is_empty() || changes.is_empty() {
        seal(&mut ops, &mut changes, &mut start_op);
    }
    changes
}

/// The one change that puts `entry` on top of the base whose last change is `base_last`, with
/// its highest op counter `base_max_op`.
pub(crate) fn canonical(entry: &Entry, base_last: ChangeHash, base_max_op: u64) -> Change {
    let deps = vec![base_last];
    let start_op = base_max_op + 1;
    let actor = crate::registry::change_actor(entry.bytes(), &deps, 0, start_op);
    ExpandedChange {
        operations: vec![put(entry.doc_key().to_string(), entry.bytes().to_vec())],
        actor_id: ActorId::from(actor),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::new(start_op).expect("one more than a counter"),
        time: 0,
        message: None,
        deps,
        extra_bytes: Vec::new(),
    }
    .into()
}

/// Checks that `chain` is the base a checkpoint for `epoch` at `heads` names by `last`: one
/// actor, sequences 1..k, each change on the one before, time 0, nothing but puts of entries
/// under their own keys. Returns the entries it puts. Anything else is refused by name.
pub(crate) fn check_base(
    chain: &[Change],
    epoch: u64,
    heads: &[ChangeHash],
    last: ChangeHash,
    federation: &str,
) -> Result<Vec<Entry>, String> {
    let actor = base_actor(epoch, heads);
    let mut entries = Vec::new();
    let mut start_op = 1;
    let mut prev: Option<ChangeHash> = None;
    for (i, change) in chain.iter().enumerate() {
        let raw = change.raw_bytes();
        if raw.len() > MAX_CHANGE_BYTES {
            return Err(format!("base change {i} is {} bytes", raw.len()));
        }
        if raw.get(4..8) != Some(&change.hash().0[..4]) {
            return Err(format!("base change {i}: checksum mismatch"));
        }
        let deps: Vec<ChangeHash> = prev.into_iter().collect();
        if change.actor_id() != &actor
            || change.seq() != i as u64 + 1
            || change.start_op().get() != start_op
            || change.timestamp() != 0
            || change.deps() != deps.as_slice()
            || !change.other_actor_ids().is_empty()
            || change.message().is_some_and(|m| !m.is_empty())
            || !change.extra_bytes().is_empty()
        {
            return Err(format!(
                "base change {i} is not the base of epoch {epoch} (actor, sequence, ops, time or deps)"
            ));
        }
        let expanded = change.decode();
        for op in &expanded.operations {
            let (ObjectId::Root, OpKey::Map(key), OpType::Put(ScalarValue::Bytes(bytes)), false) =
                (&op.obj, &op.key, &op.action, op.insert)
            else {
                return Err(format!(
                    "base change {i} does something other than put entries"
                ));
            };
            if !op.pred.is_empty() {
                return Err(format!("base change {i} overwrites a value"));
            }
            let entry = Entry::open(bytes, federation)
                .map_err(|e| format!("base change {i} carries an invalid entry: {e}"))?;
            if entry.doc_key() != key.as_str() {
                return Err(format!("base change {i} puts an entry under another key"));
            }
            entries.push(entry);
        }
        start_op += expanded.operations.len() as u64;
        prev = Some(change.hash());
    }
    if prev != Some(last) {
        return Err(format!(
            "the base ends at {}, the checkpoint names {last}",
            prev.map_or("nothing".into(), |h| h.to_string())
        ));
    }
    Ok(entries)
}

/// Sync message: an Automerge sync message of an epoch after the first (epoch 0's are sent bare).
pub(crate) const SYNC_EPOCH: u8 = 0xF1;
/// Sync message: "I am at a later epoch; this checkpoint entry took me there."
pub(crate) const SYNC_NOTICE: u8 = 0xF2;
/// Sync message: "I am behind you; send me the checkpoint (0) or the base (1)."
pub(crate) const SYNC_ASK: u8 = 0xF3;
/// Sync message: the checkpoint's canonical change and the base, for a member that cannot derive
/// it.
pub(crate) const SYNC_BASE: u8 = 0xF4;

/// Prefixes a tagged message with `tag` and `epoch`.
pub(crate) fn framed(tag: u8, epoch: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + body.len());
    out.push(tag);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits a tagged message into its epoch and body.
pub(crate) fn unframe(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (epoch, body) = bytes.get(1..)?.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*epoch), body))
}

/// Length-prefixed changes, one after another.
pub(crate) fn encode_changes(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in changes {
        out.extend_from_slice(&(c.raw_bytes().len() as u32).to_be_bytes());
        out.extend_from_slice(c.raw_bytes());
    }
    out
}

/// Reads [`encode_changes`] back: raw chunks, each at most [`MAX_CHANGE_BYTES`].
pub(crate) fn decode_changes(mut rest: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or("truncated length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_CHANGE_BYTES {
            return Err(format!("a change of {len} bytes"));
        }
        if len > tail.len() {
            return Err("truncated change".into());
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}
