//! The funcmesh mesh: who may be part of a federation, and the libp2p network its members form.
//!
//! * [`membership`] is the sans-IO core: the signed chain genesis → admission → invite →
//!   endorsed binding → coordinator's receipt that any peer verifies offline with nothing but
//!   the federation's public key.
//! * [`keys`] reads and writes key files.
//! * [`network`] runs the libp2p swarm (QUIC and TCP with noise and yamux, identify, ping,
//!   Kademlia, gossipsub, request-response, streams, relay, DCUtR, AutoNAT) behind a [`Handle`]; no other
//!   crate touches the swarm.
//! * `peers` (private) is the sans-IO peer table: proofs awaited, refusals, known members and
//!   introductions redialled with backoff, addresses.
//! * [`registry`] keeps this node's replica of the federation registry converged: pairwise
//!   Automerge sync, gossip of changes, persistence, and strikes against peers that send bad data.
//! * [`links`] is the small generic service other crates talk to peers through: framed
//!   request streams to members, one long-lived stream per peer and protocol, outside the
//!   swarm's event loop. The mesh does not know what the requests mean.
//!
//! ```
//! use mesh::membership::{Admission, Genesis, Invite, Proof, Receipt, Role, SigningKey};
//! let fed_key = SigningKey::generate();
//! let federation = Genesis::create("demo", &fed_key, 1_800_000_000).verify()?;
//! let inst = SigningKey::generate();
//! let admission = Admission::issue(&federation, &fed_key, "uni-a", inst.public(), 1_800_000_000);
//! let invite = Invite::issue(&admission, &inst, Role::Endpoint,
//!     std::time::Duration::from_secs(3600), 1_800_000_000)?;
//! let node = libp2p::identity::Keypair::generate_ed25519();
//! let (_, joining) = Proof::bind(&invite, &node, 1_800_000_100)?;
//! // A coordinator admits the binding and signs a receipt with its own clock.
//! let coordinator = libp2p::identity::Keypair::generate_ed25519();
//! let cert = Proof::coordinator(&federation, &fed_key, coordinator.public().to_peer_id(), 1_800_000_000);
//! let admitted = joining.verify_joining(&federation, &node.public().to_peer_id(), 1_800_000_150)?;
//! let receipt = Receipt::issue(&cert, &coordinator, &admitted, 1_800_000_150).unwrap();
//! let proof = joining.with_receipt(receipt);
//! let member = proof.verify(&federation, &node.public().to_peer_id(), 1_800_000_200)?;
//! assert_eq!(member.institution.as_deref(), Some("uni-a"));
//! # Ok::<(), mesh::membership::Refusal>(())
//! ```

mod book;
pub mod keys;
pub mod links;
pub mod membership;
pub mod network;
mod peers;
pub mod raw;
pub mod registry;

pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use links::{Links, Protocol};
pub use network::{Config, Event, Handle, PeerInfo};
