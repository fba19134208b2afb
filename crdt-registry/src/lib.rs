//! The federation's registry: one Automerge document that every member replicates, holding the
//! signed catalogue of institutions, nodes, endpoints, functions, flows and revocations.
//!
//! This crate is sans-IO: bytes and `now` go in, bytes and views come out. The mesh drives sync
//! and gossip; the node persists what [`Registry`] hands it.
//!
//! * [`key`]: the ed25519 public key type (authors, institutions, the federation) and ids bound
//!   to an owner.
//! * [`entry`]: the signed, immutable entry, stored in the document under a key derived from its
//!   bytes.
//! * [`record`]: the schema of what entries say.
//! * [`Registry`]: the document, local writes, checked changes from peers, sync, save/load.
//! * [`View`]: the typed view, which counts an entry only if its author may write it.
//!
//! ```
//! use crdt_registry::{Registry, record::{Body, Kind}};
//! let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
//! let mut a = Registry::new("fed1");
//! let mut b = Registry::new("fed1");
//! let (_, change) = a.write(&key, "x".into(), Body::Deleted { of: Kind::Function }, 0)?;
//! let gossip = a.gossip_for(&change);
//! assert_eq!(b.receive_gossip(&gossip)?.new_entries, 1);
//! assert_eq!(a.heads(), b.heads());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod checkpoint;
pub mod entry;
pub mod key;
pub mod record;
mod registry;
mod view;

pub use entry::Entry;
pub use key::Key;
pub use registry::{
    Applied, Crossing, MAX_CHANGE_BYTES, MAX_GOSSIP_CHANGE_BYTES, MAX_SYNC_MESSAGE_BYTES, Registry,
    Rejected, SYNC_BATCH_BYTES, SyncState, WriteError,
};
pub use view::{
    Authority, Endpoint, Flow, Function, Ignored, Institution, InstitutionFacts, Node, NodeFacts,
    Revocation, View,
};
