//! Registry entries: the signed, immutable unit the document is made of.
//!
//! An entry is `[FORMAT][ed25519 signature (64 bytes)][payload JSON]`. The payload names its
//! author's key, the federation, the record kind and id, a sequence number for updates, and the
//! record itself (or a deletion). The document stores each entry under a key derived from its
//! bytes ([`Entry::doc_key`]), so an entry can never be overwritten by different bytes: an update
//! is a new entry with a higher `seq`, and which entry wins is decided by the typed view.

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use std::sync::Arc;

use crate::key::Key;
use crate::record::{
    Body, CheckpointRecord, EndpointRecord, FlowRecord, FunctionRecord, InstitutionRecord, Kind,
    NodeRecord, RevocationRecord,
};

/// Version byte that starts every entry.
pub const FORMAT: u8 = 1;
/// Largest entry accepted (a function with its source, say).
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;
/// Domain separation for entry signatures.
const DOMAIN: &[u8] = b"funcmesh/registry/entry/v1\0";

/// What an entry says, signed by `author`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The federation the entry belongs to (entries do not replay across federations).
    pub federation: String,
    /// The record's id, unique per kind.
    pub id: String,
    /// Update counter: among valid entries for one record, the highest `seq` wins.
    pub seq: u64,
    /// The signing key.
    pub author: Key,
    /// When it was written, Unix milliseconds (the author's clock; informational).
    pub at_ms: u64,
    /// The record, or its deletion.
    pub body: Body,
}

/// Why bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Too large.
    #[error("entry of {0} bytes, at most {MAX_ENTRY_BYTES}")]
    TooLarge(usize),
    /// Too short or of an unknown format.
    #[error("not a registry entry: {0}")]
    Malformed(String),
    /// The signature does not verify under the named author.
    #[error("the signature does not verify under the author's key {0}")]
    BadSignature(Key),
    /// Signed for another federation.
    #[error("written for federation {theirs}, this is {ours}")]
    WrongFederation {
        /// This registry's federation.
        ours: String,
        /// The entry's.
        theirs: String,
    },
}

/// A signed entry whose signature has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    bytes: Vec<u8>,
    payload: Payload,
    key: String,
}

impl Entry {
    /// Signs `payload` with `signer`; the payload's author must be the signer's public key.
    pub fn sign(signer: &ed25519_dalek::SigningKey, payload: Payload) -> Entry {
        let json = serde_json::to_vec(&payload).expect("payloads always serialise");
        let sig = signer.sign(&signing_input(&json));
        Entry::assemble(&sig.to_bytes(), &json, payload)
    }

    /// Assembles an entry from parts without checking anything: for forgery tests.
    pub fn forge(sig: [u8; 64], payload: Payload) -> Entry {
        let json = serde_json::to_vec(&payload).expect("payloads always serialise");
        Entry::assemble(&sig, &json, payload)
    }

    fn assemble(sig: &[u8; 64], json: &[u8], payload: Payload) -> Entry {
        let mut bytes = Vec::with_capacity(1 + 64 + json.len());
        bytes.push(FORMAT);
        bytes.extend_from_slice(sig);
        bytes.extend_from_slice(json);
        let key = doc_key(&bytes);
        Entry {
            bytes,
            payload,
            key,
        }
    }

    /// Checks size, format, federation and signature; the size is checked before anything else.
    pub fn open(bytes: &[u8], federation: &str) -> Result<Entry, Invalid> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(Invalid::TooLarge(bytes.len()));
        }
        if bytes.len() < 1 + 64 + 2 || bytes[0] != FORMAT {
            return Err(Invalid::Malformed(format!(
                "{} bytes starting with {:?}; expected format {FORMAT}",
                bytes.len(),
                bytes.first()
            )));
        }
        let sig: [u8; 64] = bytes[1..65].try_into().expect("length checked above");
        let json = &bytes[65..];
        let payload: Payload =
            serde_json::from_slice(json).map_err(|e| Invalid::Malformed(e.to_string()))?;
        if payload.federation != federation {
            return Err(Invalid::WrongFederation {
                ours: federation.to_string(),
                theirs: payload.federation,
            });
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&payload.author.0)
            .map_err(|_| Invalid::BadSignature(payload.author))?;
        key.verify_strict(
            &signing_input(json),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .map_err(|_| Invalid::BadSignature(payload.author))?;
        Ok(Entry {
            bytes: bytes.to_vec(),
            payload,
            key: doc_key(bytes),
        })
    }

    /// The signed bytes, as stored in the document.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What it says.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Its key in the document: derived from its bytes.
    pub fn doc_key(&self) -> &str {
        &self.key
    }
}

/// The document key for entry bytes: `e` and 128 bits of their SHA-256, in hex.
pub fn doc_key(bytes: &[u8]) -> String {
    EntryKey::of(bytes).to_string()
}

/// An entry's document key as the registry holds it: the 128 bits of [`doc_key`] without the
/// text. Ordered as the text is (lowercase hex keeps byte order).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryKey([u8; 16]);

impl EntryKey {
    /// The key of entry bytes.
    pub(crate) fn of(bytes: &[u8]) -> EntryKey {
        let mut key = [0; 16];
        key.copy_from_slice(&Sha256::digest(bytes)[..16]);
        EntryKey(key)
    }

    /// Reads a document key back; `None` for anything [`doc_key`] does not make.
    pub(crate) fn parse(text: &str) -> Option<EntryKey> {
        let hex = text.strip_prefix('e')?;
        if hex.len() != 32 || hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut key = [0; 16];
        hex::decode_to_slice(hex, &mut key).ok()?;
        Some(EntryKey(key))
    }
}

impl std::fmt::Display for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "e{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// A checked entry as the registry keeps it: what it says, without the signed bytes (the
/// document holds those) or the federation (the registry's own). Every entry of the document is
/// held like this, so it is kept small.
#[derive(Debug)]
pub(crate) struct Held {
    /// Its document key.
    pub(crate) key: EntryKey,
    /// The record's id.
    pub(crate) id: String,
    /// Its update counter.
    pub(crate) seq: u64,
    /// Its author.
    pub(crate) author: Key,
    /// When it was written, Unix milliseconds (the author's clock).
    pub(crate) at_ms: u64,
    /// The record, or its deletion.
    pub(crate) body: HeldBody,
    /// Whether `id` is the one an endpoint, function or flow record derives from its author and
    /// content (always true for other kinds, whose ids the view checks otherwise). Worked out
    /// once: the view is rebuilt after every change, and hashing every function each time cost
    /// more than the rest of it.
    pub(crate) id_derived: bool,
}

/// A held entry's record, behind a pointer: a held entry is small whatever its kind, and the
/// typed view shares a function's one decoded copy instead of cloning it.
#[derive(Debug)]
pub(crate) enum HeldBody {
    Institution(Arc<InstitutionRecord>),
    Node(Arc<NodeRecord>),
    Endpoint(Arc<EndpointRecord>),
    Function(Arc<FunctionRecord>),
    Flow(Arc<FlowRecord>),
    Revocation(Arc<RevocationRecord>),
    Checkpoint(Arc<CheckpointRecord>),
    Deleted { of: Kind },
}

impl HeldBody {
    /// The kind of record the entry is about.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            HeldBody::Institution(_) => Kind::Institution,
            HeldBody::Node(_) => Kind::Node,
            HeldBody::Endpoint(_) => Kind::Endpoint,
            HeldBody::Function(_) => Kind::Function,
            HeldBody::Flow(_) => Kind::Flow,
            HeldBody::Revocation(_) => Kind::Revocation,
            HeldBody::Checkpoint(_) => Kind::Checkpoint,
            HeldBody::Deleted { of } => *of,
        }
    }
}

impl From<Body> for HeldBody {
    fn from(body: Body) -> HeldBody {
        match body {
            Body::Institution(r) => HeldBody::Institution(Arc::new(r)),
            Body::Node(r) => HeldBody::Node(Arc::new(r)),
            Body::Endpoint(r) => HeldBody::Endpoint(Arc::new(r)),
            Body::Function(r) => HeldBody::Function(Arc::new(r)),
            Body::Flow(r) => HeldBody::Flow(Arc::new(r)),
            Body::Revocation(r) => HeldBody::Revocation(Arc::new(r)),
            Body::Checkpoint(r) => HeldBody::Checkpoint(Arc::new(r)),
            Body::Deleted { of } => HeldBody::Deleted { of },
        }
    }
}

impl Entry {
    /// What the registry keeps of a checked entry.
    pub(crate) fn held(self) -> Held {
        let Payload {
            id,
            seq,
            author,
            at_ms,
            body,
            ..
        } = self.payload;
        let id_derived = match &body {
            Body::Endpoint(rec) => EndpointRecord::id_for(&author, &rec.name) == id,
            Body::Function(rec) => rec.content_id() == id,
            Body::Flow(rec) => FlowRecord::id_for(&author, &rec.nonce) == id,
            _ => true,
        };
        Held {
            key: EntryKey::of(&self.bytes),
            id,
            seq,
            author,
            at_ms,
            body: body.into(),
            id_derived,
        }
    }
}

fn signing_input(json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DOMAIN.len() + json.len());
    v.extend_from_slice(DOMAIN);
    v.extend_from_slice(json);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload(author: Key) -> Payload {
        Payload {
            federation: "fedx".into(),
            id: "x".into(),
            seq: 1,
            author,
            at_ms: 5,
            body: Body::Deleted { of: Kind::Function },
        }
    }

    #[test]
    fn a_signed_entry_opens_and_keeps_its_key() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let e = Entry::sign(&k, payload(Key::of(&k)));
        let back = Entry::open(e.bytes(), "fedx").expect("valid");
        assert_eq!(back, e);
        assert_eq!(
            Entry::open(e.bytes(), "fedy"),
            Err(Invalid::WrongFederation {
                ours: "fedy".into(),
                theirs: "fedx".into()
            })
        );
    }

    #[test]
    fn an_entry_signed_by_another_key_does_not_open() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let e = Entry::sign(&other, payload(Key::of(&k)));
        assert_eq!(
            Entry::open(e.bytes(), "fedx"),
            Err(Invalid::BadSignature(Key::of(&k)))
        );
    }

    #[test]
    fn an_entry_key_reads_back_from_its_text_and_keeps_its_order() {
        let keys: Vec<EntryKey> = (0u8..50).map(|i| EntryKey::of(&[i])).collect();
        for (i, k) in (0u8..).zip(&keys) {
            assert_eq!(k.to_string(), doc_key(&[i]));
            assert_eq!(EntryKey::parse(&k.to_string()), Some(*k));
        }
        let mut by_bytes = keys.clone();
        by_bytes.sort();
        let mut by_text: Vec<String> = keys.iter().map(ToString::to_string).collect();
        by_text.sort();
        let texts: Vec<String> = by_bytes.iter().map(ToString::to_string).collect();
        assert_eq!(texts, by_text);
        for bad in ["", "e", "x0123", &format!("E{}", &keys[0].to_string()[1..])] {
            assert_eq!(EntryKey::parse(bad), None, "{bad:?}");
        }
        let upper = format!("e{}", keys[0].to_string()[1..].to_uppercase());
        if upper != keys[0].to_string() {
            assert_eq!(EntryKey::parse(&upper), None);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Entry::open(&bytes, "fedx");
        }

        #[test]
        fn any_bit_flip_breaks_a_valid_entry(pos in 0usize..1000, bit in 0u8..8) {
            let k = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
            let e = Entry::sign(&k, payload(Key::of(&k)));
            let mut bytes = e.bytes().to_vec();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            prop_assert!(Entry::open(&bytes, "fedx").is_err());
        }
    }
}
