//! funcmesh's data plane.
//!
//! [`blob`] is the content-addressed blob store every node keeps in its data dir. Blobs are
//! named by their BLAKE3 hash and travel as BLAKE3 *verified streams* (`bao-tree`): the sender
//! encodes the chunk groups asked for together with the tree hashes that prove them, and the
//! receiver checks every 16 KiB chunk group against the root hash as it arrives, before a byte
//! of it is written. A corrupt group stops the stream; everything before it is kept, and what is
//! still missing is asked for again (from the same member or another). A partial blob survives
//! restarts: [`blob::BlobStore::missing`] says what to ask for to resume.
//!
//! [`net`] is the QUIC endpoint members reach each other's data with, authenticated by their
//! libp2p identities ([`wire`] its messages, [`tunnel`] the fallback through the mesh). [`root`]
//! is an endpoint's data root, which no path leaves; [`files`] serves data roots to members;
//! [`copy`] runs durable copy jobs. A file's hash and outboard are computed on several threads
//! (`outboard`).

pub mod blob;
pub mod copy;
pub mod files;
pub mod net;
mod outboard;
pub mod root;
pub mod tunnel;
pub mod wire;

pub use blob::{BlobStore, Error, Hash};
