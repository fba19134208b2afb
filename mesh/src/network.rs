//! The libp2p swarm and its event loop. Nothing outside this module touches the `Swarm`: the rest
//! of funcmesh talks to it through a cheap-clone [`Handle`] whose requests carry a `oneshot` for
//! the reply.
//!
//! Admission works like this: on every new connection both sides send a `Hello` carrying their
//! membership proof over `/funcmesh/membership/1`. A peer whose proof verifies becomes a member and
//! is told about the other members so that it can connect to them directly; a peer whose proof does
//! not verify is told why and disconnected; a peer that says nothing is disconnected when
//! `proof_timeout` runs out. Only members enter the Kademlia routing table, and gossip is accepted
//! only when both its author and the peer that forwarded it are members.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, autonat, connection_limits, dcutr,
    gossipsub, identify, identity::Keypair, kad, noise, ping, relay, request_response, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::book::Book;
use crate::links::{self, Activity, Links, Verified};
use crate::membership::{Federation, Member, Proof, Receipt, Refusal, Role, unix_now};
use crate::peers::{MAX_ADDRS_PER_PEER, MAX_LISTED_MEMBERS, PeerTable};
use crate::registry::{self, Out, Replica, StoreOp, Strikes, SyncRequest, SyncResponse};

/// Protocol name of the membership exchange.
pub const MEMBERSHIP_PROTOCOL: &str = "/funcmesh/membership/1";
/// Largest membership message accepted, checked by the codec before decoding.
const MAX_MEMBERSHIP_MESSAGE: u64 = 64 * 1024;
/// Most members a hello or welcome lists, and addresses of each.
const LISTED_IN_HELLO: usize = 64;
const ADDRS_IN_HELLO: usize = 4;
/// How often the address book takes the registry's node records.
const BOOK_REFRESH: Duration = Duration::from_secs(2);
/// Members by peer id.
type Directory = std::sync::Arc<std::sync::RwLock<HashMap<PeerId, Member>>>;

/// Capacity of the command queue: callers wait (backpressure) when the loop is this far behind.
const COMMAND_QUEUE: usize = 256;
/// Capacity of the event broadcast: slow subscribers lose the oldest events (and are told so).
const EVENT_QUEUE: usize = 1024;
/// Largest gossip message.
const MAX_GOSSIP_BYTES: usize = 256 * 1024;
/// Largest registry sync message on the wire (the registry checks its own, smaller limit).
const MAX_SYNC_WIRE_BYTES: u64 = crdt_registry::MAX_SYNC_MESSAGE_BYTES as u64 + 1024;
/// Capacity of the persistence queue.
const PERSIST_QUEUE: usize = 256;
/// Persistence jobs waiting beyond the queue before this node stops taking registry changes
/// from peers (gossip is ignored, sync requests refused and responses dropped) until the
/// store catches up; peers send them again with their next sync.
const MAX_PERSIST_BACKLOG: usize = 1024;
/// Most registry gossip messages held while no peer can take them (a starting node writes a
/// handful: its institution, node and endpoint records).
const MAX_UNSENT_GOSSIP: usize = 256;
/// A connected peer's gossipsub score until its membership proof verifies: below every
/// threshold that lets gossip reach it.
const UNVERIFIED_SCORE: f64 = -10_000.0;
/// How many other members a node syncs with when a sync brought it changes gossip did not.
const SPREAD_FANOUT: usize = 3;
/// The shortest time between two rounds of passing news on.
const SPREAD_EVERY: Duration = Duration::from_secs(1);
/// Member-list swaps and mixing dials the whole federation makes per second, about: each node
/// makes one every `listed / MIX_BUDGET` seconds (never more often than every `anti_entropy`),
/// so a node's share of the churn — a handshake, a proof, a registry sync, a hello at both ends
/// of every new connection — shrinks as the federation grows, while a healed partition still
/// gets its first link across within about `2 / MIX_BUDGET` seconds.
const MIX_BUDGET: f64 = 5.0;
/// The longest time between one node's member-list swaps (and between its mixing dials).
const MIX_AT_MOST: Duration = Duration::from_secs(300);

/// Mesh configuration, resolved by the node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's identity.
    pub keypair: Keypair,
    /// The federation, verified from its genesis.
    pub federation: Federation,
    /// This node's membership proof.
    pub proof: Proof,
    /// Addresses to listen on (port 0 picks a free port).
    pub listen: Vec<Multiaddr>,
    /// Addresses to dial at start (the coordinator).
    pub bootstrap: Vec<Multiaddr>,
    /// Serve as a relay for members behind NAT (coordinators do).
    pub relay_server: bool,
    /// Hold a reservation on the relay of every coordinator this node is connected to, so that
    /// members that cannot dial it (it is behind NAT or a firewall) still reach it through the
    /// relay, and DCUtR can then try a direct connection. Relays themselves never reserve.
    pub reserve_relay: bool,
    /// How long a new peer has to present its proof.
    pub proof_timeout: Duration,
    /// How often to retry known members that are not connected (doubles per failure, up to 16x).
    pub redial_interval: Duration,
    /// How often to run a registry sync round with a random member, and to swap member lists with
    /// another random member (so that a missed introduction heals).
    pub anti_entropy: Duration,
    /// Member connections kept at rest (bounded connections): while it has fewer than half
    /// of them the node dials more members it knows of; while it has more, it closes those idle
    /// for `idle_after` (never a coordinator's). Any other member is dialled on demand.
    pub max_connections: usize,
    /// How long a member connection carries no link request (and exists) before it counts as
    /// idle.
    pub idle_after: Duration,
    /// The node's store, for the known-peers table.
    pub store: store::Store,
    /// Write registry checkpoints (a coordinator holding the federation key); `None` for every
    /// other node, which crosses the checkpoints it receives.
    pub checkpoint: Option<registry::CheckpointPolicy>,
}

/// How often a checkpoint writer checks whether the next checkpoint is due.
const CHECKPOINT_CHECK: Duration = Duration::from_secs(5);

/// Default of [`Config::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 24;
/// Default of the entries outside the last base after which a coordinator writes the next
/// registry checkpoint ([`registry::CheckpointPolicy::every`]): the document's actors are then
/// at most about this many, its clock cache a few MB.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 4096;
/// Default of [`Config::idle_after`].
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(60);

/// Why the mesh (or a protocol's links) did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The swarm could not be built.
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// Why joining a federation through a member failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The peer refused this node's membership proof.
    #[error("refused by {peer}: {reason}")]
    Refused {
        /// The refusing peer.
        peer: PeerId,
        /// Its reason.
        reason: String,
    },
    /// The address could not be dialled.
    #[error(transparent)]
    Dial(Error),
    /// No verdict in time.
    #[error("no answer from the member within {0:?}")]
    Timeout(Duration),
    /// The mesh has shut down.
    #[error("the mesh is shut down")]
    Closed,
}

/// Why a request to the running mesh failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dial failed.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A publish failed.
    #[error("cannot publish on {topic}: {reason}")]
    Publish {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The mesh has shut down.
    #[error("the mesh is shut down")]
    Closed,
    /// A registry write failed.
    #[error("registry: {0}")]
    Registry(String),
}

/// What the mesh tells its subscribers.
#[derive(Debug, Clone)]
pub enum Event {
    /// A peer proved its membership.
    MemberConnected(Member),
    /// A member's last connection closed.
    MemberDisconnected(PeerId),
    /// A peer's proof was refused by this node.
    Refused {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: Refusal,
    },
    /// A peer accepted this node's proof (and this node accepted theirs).
    AcceptedBy(Member),
    /// A coordinator admitted this joining node: its proof, now with the coordinator's
    /// receipt, is what it presents from now on and what `join` stores.
    Admitted(Box<Proof>),
    /// A blocked or banned peer tried to connect and was turned away.
    TurnedAway(PeerId),
    /// A peer refused this node's proof.
    RefusedBy {
        /// The peer.
        peer: PeerId,
        /// Its reason.
        reason: String,
    },
    /// A peer sent registry data no honest node sends; at three strikes within ten minutes it is
    /// cut off for ten minutes.
    Penalised {
        /// The peer.
        peer: PeerId,
        /// What it sent.
        reason: String,
        /// Its strikes so far.
        strikes: u32,
    },
    /// Gossip from a member (on topics other than the registry's).
    Gossip {
        /// Topic name.
        topic: String,
        /// The author.
        source: PeerId,
        /// Payload.
        data: Vec<u8>,
    },
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer id.
    pub peer_id: String,
    /// Institution (none for coordinators).
    pub institution: Option<String>,
    /// Role.
    pub role: Role,
    /// Addresses it listens on, as it told us.
    pub addrs: Vec<String>,
    /// Seconds since the current connection was verified.
    pub connected_for_secs: u64,
    /// The open connections to it: their remote addresses, or for one it opened through a relay,
    /// our relayed listen address. An address with `/p2p-circuit` goes through a relay, any
    /// other is direct.
    #[serde(default)]
    pub connections: Vec<String>,
    /// This node opened a connection to it (it dialled), rather than only being dialled.
    #[serde(default)]
    pub dialled: bool,
}

/// A peer remembered across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KnownPeer {
    version: u32,
    addrs: Vec<String>,
    last_seen: u64,
}

enum Command {
    Members(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), Error>>),
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Subscribe {
        topic: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    RegistryView(oneshot::Sender<crdt_registry::View>),
    RegistryWith(Box<dyn FnOnce(&crdt_registry::View) + Send>),
    RegistryStatus(oneshot::Sender<registry::Status>),
    RegistryWrite {
        id: String,
        body: Box<crdt_registry::record::Body>,
        reply: oneshot::Sender<Result<crdt_registry::Entry, Error>>,
    },
    RegistryInsert {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<crdt_registry::Entry, Error>>,
    },
    RegistrySyncRaw {
        peer: PeerId,
        msg: Vec<u8>,
        reply: oneshot::Sender<()>,
    },
    Block(Vec<PeerId>, bool, oneshot::Sender<()>),
    Rtts(oneshot::Sender<HashMap<PeerId, Duration>>),
}

/// A batch of store writes, and who to tell when it is durable.
struct PersistJob {
    ops: Vec<StoreOp>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// A cheap-clone handle to the running mesh.
#[derive(Clone, Debug)]
pub struct Handle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    streams: Streams,
    /// Counts the change sets the registry replica has taken (see [`Handle::registry_changes`]).
    registry_changes: watch::Receiver<u64>,
}

/// What [`Handle::links`] needs to start a protocol's links.
#[derive(Clone)]
struct Streams {
    control: libp2p_stream::Control,
    verified: Verified,
    activity: Activity,
    /// The members the registry lists (their proofs verified by its view), connected or not.
    directory: Directory,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

impl Handle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Starts serving protocol `P` on links ([`crate::links`]): the returned [`Links`] send
    /// requests to members, and the receiver yields the requests members send (only verified
    /// members get through; when the receiver falls [`links::INBOUND_QUEUE`] behind, senders
    /// are answered [`links::Protocol::busy`]). Once per protocol: a second call fails.
    pub fn links<P: links::Protocol>(
        &self,
    ) -> Result<(Links<P>, mpsc::Receiver<links::Inbound<P>>), StartError> {
        let (tx, rx) = mpsc::channel(links::INBOUND_QUEUE);
        let s = self.streams.clone();
        let links = Links::start(s.control, s.verified, s.activity, tx, s.cancel, s.tracker)
            .map_err(StartError::Build)?;
        Ok((links, rx))
    }

    /// Starts serving raw streams of `protocol` ([`crate::raw`]): the returned opener opens
    /// them to members, and the receiver yields those that members open. Once per protocol.
    pub fn raw_streams(
        &self,
        protocol: &'static str,
    ) -> Result<
        (
            crate::raw::RawStreams,
            mpsc::Receiver<(PeerId, crate::raw::RawStream)>,
        ),
        StartError,
    > {
        let s = self.streams.clone();
        crate::raw::RawStreams::start(s.control, protocol, s.verified, s.cancel, &s.tracker)
            .map_err(StartError::Build)
    }

    /// Round-trip times to connected peers, from ping.
    pub async fn rtts(&self) -> Result<HashMap<PeerId, Duration>, Error> {
        self.ask(Command::Rtts).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// The verified members currently connected, sorted by peer id.
    pub async fn members(&self) -> Result<Vec<PeerInfo>, Error> {
        self.ask(Command::Members).await
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.ask(Command::ListenAddrs).await
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), Error> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Publishes on a federation-scoped gossip topic.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), Error> {
        let topic = topic.to_string();
        self.ask(|reply| Command::Publish { topic, data, reply })
            .await?
    }

    /// Subscribes to a federation-scoped gossip topic; its messages arrive as [`Event::Gossip`].
    pub async fn subscribe_topic(&self, topic: &str) -> Result<(), Error> {
        let topic = topic.to_string();
        self.ask(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    /// The registry's typed view, as this node sees it now.
    pub async fn registry(&self) -> Result<crdt_registry::View, Error> {
        self.ask(Command::RegistryView).await
    }

    /// Runs `f` on the registry's typed view inside the mesh and returns what it returns: a
    /// lookup without copying the whole view (keep `f` short, the mesh waits for it).
    pub async fn registry_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crdt_registry::View) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn FnOnce(&crdt_registry::View) + Send> = Box::new(move |view| {
            let _ = tx.send(f(view));
        });
        self.commands
            .send(Command::RegistryWith(job))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Marks every change the registry replica takes (a local write, gossip, a sync): wait on
    /// it to rebuild what is derived from the registry only when the registry changed, rather
    /// than polling a view whose size grows with the federation.
    pub fn registry_changes(&self) -> watch::Receiver<u64> {
        self.registry_changes.clone()
    }

    /// Counts and heads of the local registry replica.
    pub async fn registry_status(&self) -> Result<registry::Status, Error> {
        self.ask(Command::RegistryStatus).await
    }

    /// Signs a record with the node key and writes it to the registry; returns once the change
    /// is on disk (and on its way to the other members).
    pub async fn registry_write(
        &self,
        id: String,
        body: crdt_registry::record::Body,
    ) -> Result<crdt_registry::Entry, Error> {
        let body = Box::new(body);
        self.ask(|reply| Command::RegistryWrite { id, body, reply })
            .await?
    }

    /// Writes an entry signed elsewhere (a revocation signed with an institution key, say).
    pub async fn registry_insert(&self, bytes: Vec<u8>) -> Result<crdt_registry::Entry, Error> {
        self.ask(|reply| Command::RegistryInsert { bytes, reply })
            .await?
    }

    /// Sends `msg` to `peer` as a registry sync message, unchecked: a diagnostic for testing
    /// how peers treat bad input.
    pub async fn registry_sync_raw(&self, peer: PeerId, msg: Vec<u8>) -> Result<(), Error> {
        self.ask(|reply| Command::RegistrySyncRaw { peer, msg, reply })
            .await
    }

    /// Cuts `peer` off (`true`) or lets it back (`false`). Used for bans, and by tests to
    /// partition a federation.
    pub async fn block(&self, peer: PeerId, blocked: bool) -> Result<(), Error> {
        self.block_all(vec![peer], blocked).await
    }

    /// [`Handle::block`] for many peers in one command (a test cutting a federation in two
    /// sends one per node, not one per pair).
    pub async fn block_all(&self, peers: Vec<PeerId>, blocked: bool) -> Result<(), Error> {
        self.ask(|reply| Command::Block(peers, blocked, reply))
            .await
    }

    /// Whether `peer` is a member: connected now with a proof that verified on this node, or
    /// listed by the registry (whose view verifies every node's proof), connected or not.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.member(peer).is_some()
    }

    /// The verified membership of `peer`: from its connection's proof, or from its node record
    /// in the registry (bounded connections: most members are not connected at a given time).
    pub fn member(&self, peer: &PeerId) -> Option<Member> {
        let connected = self
            .streams
            .verified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned();
        connected.or_else(|| {
            self.streams
                .directory
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(peer)
                .cloned()
        })
    }

    /// Subscribes to mesh events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Dials `addr` and waits until the peer there admits this node (returns its member record)
    /// or refuses it (returns its reason).
    pub async fn join(&self, addr: Multiaddr, timeout: Duration) -> Result<Member, JoinError> {
        self.join_inner(addr, timeout).await.map(|(m, _)| m)
    }

    /// For a node still joining: dials the coordinator at `addr` and waits until it admits this
    /// node. Returns the proof with the coordinator's receipt, which the node stores.
    pub async fn join_as_new(
        &self,
        addr: Multiaddr,
        timeout: Duration,
    ) -> Result<Proof, JoinError> {
        match self.join_inner(addr, timeout).await? {
            (_, Some(proof)) => Ok(proof),
            (member, None) => Err(JoinError::Refused {
                peer: member.peer_id.parse().unwrap_or(self.peer_id),
                reason: format!(
                    "{} is a member ({}), not a coordinator: only a coordinator admits new \
                     nodes; join through the coordinator's address",
                    member.peer_id, member.role
                ),
            }),
        }
    }

    async fn join_inner(
        &self,
        addr: Multiaddr,
        timeout: Duration,
    ) -> Result<(Member, Option<Proof>), JoinError> {
        let mut events = self.subscribe();
        let expected = addr.iter().find_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        // Already a member (a known peer redialled at start, before this call subscribed).
        if let Some(peer) = expected
            && let Some(m) = self
                .members()
                .await
                .map_err(|_| JoinError::Closed)?
                .into_iter()
                .find(|m| m.peer_id == peer.to_string())
        {
            let member = Member {
                peer_id: m.peer_id,
                institution: m.institution,
                institution_key: None,
                role: m.role,
                joined_at: 0,
                invite: None,
            };
            return Ok((member, None));
        }
        self.dial(addr).await.map_err(JoinError::Dial)?;
        let wait = async {
            let mut admitted = None;
            loop {
                match events.recv().await {
                    // The coordinator's receipt comes with its welcome, just before it.
                    Ok(Event::Admitted(proof)) => admitted = Some(*proof),
                    Ok(Event::AcceptedBy(m))
                        if expected.is_none_or(|p| p.to_string() == m.peer_id) =>
                    {
                        return Ok((m, admitted));
                    }
                    Ok(Event::RefusedBy { peer, reason }) if expected.is_none_or(|p| p == peer) => {
                        return Err(JoinError::Refused { peer, reason });
                    }
                    // We may refuse them first (a peer of another federation, say).
                    Ok(Event::Refused { peer, reason }) if expected.is_none_or(|p| p == peer) => {
                        return Err(JoinError::Refused {
                            peer,
                            reason: format!("it is not a member of our federation: {reason}"),
                        });
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(JoinError::Closed),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| JoinError::Timeout(timeout))?
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    proof: Vec<u8>,
    members: Vec<PeerAddrs>,
    /// The sender does not count the receiver as a member (yet): a first hello. From a peer the
    /// receiver does count, it means the peer restarted (or lost every connection) while the
    /// receiver kept an old one. Absent from older nodes: false.
    #[serde(default)]
    first: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum HelloReply {
    Welcome {
        proof: Vec<u8>,
        members: Vec<PeerAddrs>,
        /// A coordinator's receipt, for a peer that presented a joining proof.
        #[serde(default)]
        receipt: Option<Vec<u8>>,
    },
    Refused {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PeerAddrs {
    peer_id: String,
    addrs: Vec<String>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    limits: connection_limits::Behaviour,
    book: Book,
    registry_sync: request_response::cbor::Behaviour<SyncRequest, SyncResponse>,
    streams: libp2p_stream::Behaviour,
    membership: request_response::cbor::Behaviour<Hello, HelloReply>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
}

struct MemberState {
    member: Member,
    since: Instant,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<Event>,
    federation: Federation,
    /// This node's proof, and its encoding as sent.
    own_proof: Proof,
    proof: Vec<u8>,
    /// Invites this coordinator issued receipts for, and to whom (the registry learns them a
    /// moment later).
    receipts: HashMap<String, PeerId>,
    /// Members' proofs verified before (a proof is re-presented at every connection).
    proofs: crate::membership::VerifiedProofs,
    /// When connected members' invites were last checked against the registry.
    last_invite_check: Instant,
    members: HashMap<PeerId, MemberState>,
    /// Pending proofs, refusals, known members, introductions and their addresses (sans-IO).
    peers: PeerTable,
    /// When member lists were last swapped with a random member.
    last_exchange: Instant,
    /// When connections were last bounded (idle ones closed) and the address book refreshed
    /// from the registry.
    last_bound: Instant,
    last_book: Instant,
    last_checkpoint_check: Instant,
    /// When a random member was last dialled for the mesh's health.
    last_mix: Instant,
    /// Coordinators (the bootstrap addresses' peers): always kept connected.
    coordinators: std::collections::HashSet<PeerId>,
    /// When each member's links last carried a request.
    activity: Activity,
    /// The members the registry lists, for [`Handle::member`].
    directory: Directory,
    /// The addresses the registry's node records publish (parsed), and what the registry's
    /// nodes looked like when they were read.
    published: HashMap<PeerId, Vec<Multiaddr>>,
    book_seen: Option<(usize, u64, usize)>,
    /// DHT lookups under way, by peer, and when they started.
    lookups: HashMap<PeerId, Instant>,
    /// This node's institution's key (from its own proof).
    own_institution: Option<crate::membership::Key>,
    bootstrap: Vec<Multiaddr>,
    /// Relay reservations held (or asked for), by relay.
    relay_listening: HashMap<PeerId, libp2p::core::transport::ListenerId>,
    config: Config,
    topic_prefix: String,
    registry_topic: gossipsub::TopicHash,
    tracker: TaskTracker,
    replica: Replica,
    strikes: Strikes,
    persist: mpsc::Sender<PersistJob>,
    /// Jobs waiting for room in the persister's queue, in order.
    persist_backlog: std::collections::VecDeque<PersistJob>,
    /// The members in `members`, for the task streams' access checks.
    verified: Verified,
    rtt: HashMap<PeerId, Duration>,
    /// Open connections per peer and their remote addresses.
    connections: HashMap<PeerId, Vec<(libp2p::swarm::ConnectionId, Multiaddr)>>,
    /// When our topics were last announced again because of a peer coming back.
    announced_again: HashMap<PeerId, Instant>,
    /// Peers with a connection that opened while another was open: gossipsub did not greet them
    /// on it (it greets a peer on its first connection only).
    overlapped: std::collections::HashSet<PeerId>,
    /// Peers with a connection this node dialled: it starts the registry sync when one is
    /// verified (see `admit`).
    dialed: std::collections::HashSet<PeerId>,
    /// Peers that came back: announce our topics again once only this connection is left.
    announce_when_alone: HashMap<PeerId, libp2p::swarm::ConnectionId>,
    /// Registry gossip of local writes that had no peer to go to (a node that has just started
    /// writes its records before it has a gossip peer); published as soon as a peer subscribes
    /// to the registry topic, so that a new member is listed by gossip's speed, not sync's.
    unsent_gossip: std::collections::VecDeque<Vec<u8>>,
    /// Bumped whenever the replica takes changes ([`Handle::registry_changes`]).
    registry_changed: watch::Sender<u64>,
    /// When news learned by sync was last passed on, and whether more waits for the next round.
    last_spread: Instant,
    spread_pending: bool,
    /// Peers whose registry gossip or sync this node turned away while its store was behind
    /// (`MAX_PERSIST_BACKLOG`): it syncs with them once the store has caught up, so that what
    /// it turned away comes back at once rather than with a random anti-entropy round.
    owed_syncs: HashSet<PeerId>,
}

/// Starts the mesh: builds the swarm, listens, dials the bootstrap addresses and every known peer,
/// and runs until `cancel` fires. The event loop is spawned on `tracker`.
pub async fn spawn(
    config: Config,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Handle, StartError> {
    let peer_id = config.keypair.public().to_peer_id();
    let mut swarm = build_swarm(&config)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let topic_prefix = format!("funcmesh/{}/", config.federation.id);
    let announce = gossipsub::IdentTopic::new(format!("{topic_prefix}mesh/1"));
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&announce)
        .map_err(|e| StartError::Build(format!("gossipsub subscribe: {e}")))?;

    let registry_topic = gossipsub::IdentTopic::new(format!("{topic_prefix}{}", registry::TOPIC));
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&registry_topic)
        .map_err(|e| StartError::Build(format!("gossipsub subscribe: {e}")))?;
    let signer = registry::signing_key(&config.keypair)
        .ok_or_else(|| StartError::Build("the node key is not an ed25519 key".into()))?;
    let replica = {
        let store = config.store.clone();
        let federation = config.federation.clone();
        tokio::task::spawn_blocking(move || registry::load(&store, &federation, signer))
            .await
            .map_err(|e| StartError::Build(format!("registry load: {e}")))?
            .map_err(|e| StartError::Build(format!("registry load: {e}")))?
    };
    let (persist_tx, persist_rx) = mpsc::channel(PERSIST_QUEUE);
    tracker.spawn(persister(config.store.clone(), persist_rx));

    let known = load_known(&config.store).await;
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, _) = broadcast::channel(EVENT_QUEUE);
    let (changes_tx, changes_rx) = watch::channel(0u64);
    let verified = Verified::default();
    let activity = Activity::default();
    let directory = Directory::default();
    let streams = Streams {
        control: swarm.behaviour().streams.new_control(),
        verified: verified.clone(),
        activity: activity.clone(),
        directory: directory.clone(),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    };
    let mut event_loop = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx.clone(),
        federation: config.federation.clone(),
        own_proof: config.proof.clone(),
        proof: config.proof.to_bytes(),
        receipts: HashMap::new(),
        proofs: Default::default(),
        last_invite_check: Instant::now(),
        members: HashMap::new(),
        peers: PeerTable::new(config.redial_interval, config.proof_timeout),
        last_exchange: Instant::now(),
        last_bound: Instant::now(),
        last_mix: Instant::now(),
        last_checkpoint_check: Instant::now(),
        last_book: Instant::now()
            .checked_sub(BOOK_REFRESH)
            .unwrap_or_else(Instant::now),
        coordinators: config
            .bootstrap
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(peer)) => Some(peer),
                _ => None,
            })
            .collect(),
        activity,
        directory,
        lookups: HashMap::new(),
        published: HashMap::new(),
        book_seen: None,
        own_institution: config
            .proof
            .verify(&config.federation, &peer_id, unix_now())
            .ok()
            .and_then(|m| m.institution_key),
        bootstrap: config.bootstrap.clone(),
        relay_listening: HashMap::new(),
        config,
        topic_prefix,
        registry_topic: registry_topic.hash(),
        tracker: tracker.clone(),
        replica,
        strikes: Strikes::default(),
        persist: persist_tx,
        persist_backlog: std::collections::VecDeque::new(),
        verified: verified.clone(),
        rtt: HashMap::new(),
        connections: HashMap::new(),
        announced_again: HashMap::new(),
        overlapped: std::collections::HashSet::new(),
        dialed: std::collections::HashSet::new(),
        announce_when_alone: HashMap::new(),
        unsent_gossip: std::collections::VecDeque::new(),
        registry_changed: changes_tx,
        last_spread: Instant::now()
            .checked_sub(SPREAD_EVERY)
            .unwrap_or_else(Instant::now),
        spread_pending: false,
        owed_syncs: HashSet::new(),
    };
    let now = Instant::now();
    for (peer, addrs) in known {
        event_loop.peers.load_known(peer, addrs, now);
        event_loop.book_update(peer);
    }
    for addr in event_loop.bootstrap.clone() {
        if let Err(e) = event_loop.swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap address");
        }
    }
    // Every line the event loop logs names its node (the peer id's tail): a federation of
    // in-process nodes logs into one stream.
    let node = peer_id.to_string();
    let span = tracing::debug_span!("node", id = &node[node.len().saturating_sub(6)..]);
    tracker.spawn(tracing::Instrument::instrument(
        event_loop.run(cancel),
        span,
    ));
    Ok(Handle {
        peer_id,
        commands: cmd_tx,
        events: ev_tx,
        streams,
        registry_changes: changes_rx,
    })
}

/// The relay a coordinator serves: for the federation's members, whose relayed connections
/// carry their tasks and registry syncs for as long as no direct one exists (libp2p's defaults,
/// 128 reservations, 2 minutes and 128 KiB per circuit, are for short hole-punching hops).
/// Strangers get no further than the membership check, which cuts them within the proof timeout.
fn federation_relay() -> relay::Config {
    relay::Config {
        max_reservations: 4096,
        max_reservations_per_peer: 4,
        max_circuits: 1024,
        max_circuits_per_peer: 64,
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: 1 << 30,
        ..relay::Config::default()
    }
}

fn build_swarm(config: &Config) -> Result<Swarm<Behaviour>, StartError> {
    let fed = config.federation.id.clone();
    let relay_server = config.relay_server;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| StartError::Build(e.to_string()))?
        // A dead peer's QUIC connection lingers until the idle timeout (libp2p's default is 10 s);
        // endpoint loss and membership both want to know sooner.
        .with_quic_config(|mut c| {
            c.max_idle_timeout = 5_000;
            c.keep_alive_interval = Duration::from_millis(1_500);
            c
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_behaviour(|key, relay_client| behaviour(key, relay_client, &fed, relay_server))
        .map_err(|e| StartError::Build(e.to_string()))?
        // Members stay connected; non-members are cut explicitly. Every task, result and
        // registry sync opens a stream proposing exactly one protocol: `V1Lazy` sends the
        // proposal and the first message together instead of waiting a round trip for the
        // listener's confirmation (wire-compatible with `V1`; no nested negotiations here).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(24 * 3600))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn behaviour(
    key: &Keypair,
    relay_client: relay::client::Behaviour,
    fed: &crate::membership::FederationId,
    relay_server: bool,
) -> Result<Behaviour, BoxError> {
    let peer_id = key.public().to_peer_id();
    let membership = request_response::cbor::Behaviour::with_codec(
        request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(MAX_MEMBERSHIP_MESSAGE)
            .set_response_size_maximum(MAX_MEMBERSHIP_MESSAGE),
        [(
            StreamProtocol::new(MEMBERSHIP_PROTOCOL),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new("/funcmesh/1".into(), key.public())
            .with_agent_version(format!("funcmesh/{}", env!("CARGO_PKG_VERSION")))
            // A new address (a relay reservation) reaches the peers at once, and through their
            // member lists everyone else.
            .with_push_listen_addr_updates(true),
    );
    let kad_protocol = StreamProtocol::try_from_owned(format!("/funcmesh/{fed}/kad/1"))
        .expect("federation ids are ASCII and start the protocol with /");
    let mut kad_config = kad::Config::new(kad_protocol);
    // Only verified members enter the routing table; we add them ourselves.
    kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
    // No bootstrap walks: a walk queries (and so dials) dozens of members to refresh buckets the
    // mesh fills itself (every verified member is added), and each dial became one more member
    // connection over the bound — at 100 members, 50–70 connections per node instead of ~25.
    // Addresses come from the registry's address book; the DHT answers `look_up` only.
    kad_config.set_periodic_bootstrap_interval(None);
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    kad.set_mode(Some(kad::Mode::Server));
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            // Bounded connections: a message goes to the topic's mesh (six peers), which
            // forwards it, rather than to every connected peer, each of which would receive
            // and verify it again from the mesh; and the mesh's upkeep runs once a second.
            .flood_publish(false)
            .heartbeat_interval(Duration::from_secs(1))
            // A topic's mesh of four peers (gossipsub's default is six): every message reaches
            // a node about as many times as its mesh has peers, and each copy's signature is
            // checked before duplicates are dropped, so the mesh's size is most of a node's
            // gossip cost at rest; four keep the mesh connected with bounded connections.
            .mesh_n(4)
            .mesh_n_low(3)
            .mesh_n_high(8)
            .mesh_outbound_min(2)
            .gossip_lazy(4)
            // A graft a peer refuses (it has not verified this node yet: see the scores below)
            // keeps the two out of each other's mesh only this long (gossipsub's default is a
            // minute, which left young meshes sparse).
            .prune_backoff(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?,
    )?;
    // Gossip goes to verified members only. A connected peer is scored far below gossipsub's
    // thresholds until its proof verifies (`UNVERIFIED_SCORE`, set when it connects): below
    // them it is never grafted into a topic's mesh, offered message ids or answered when it asks
    // for messages, and never published to. Only this application score counts (a federation on
    // one host shares an IP; its peers' pace is not misbehaviour).
    gossipsub.with_peer_score(
        gossipsub::PeerScoreParams {
            app_specific_weight: 1.0,
            ip_colocation_factor_weight: 0.0,
            behaviour_penalty_weight: 0.0,
            slow_peer_weight: 0.0,
            ..Default::default()
        },
        gossipsub::PeerScoreThresholds {
            gossip_threshold: -100.0,
            publish_threshold: -100.0,
            // Above the unverified score: a peer's subscriptions are still read before its
            // proof verifies (they are what it is grafted by once it has).
            graylist_threshold: -1_000_000.0,
            ..Default::default()
        },
    )?;
    let relay_server =
        Toggle::from(relay_server.then(|| relay::Behaviour::new(peer_id, federation_relay())));
    let autonat = autonat::Behaviour::new(
        peer_id,
        // Loopback and private testnets are legitimate deployments here.
        autonat::Config {
            only_global_ips: false,
            ..Default::default()
        },
    );
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(128))
            .with_max_established_incoming(Some(1024))
            .with_max_established_per_peer(Some(4)),
    );
    let registry_sync = request_response::cbor::Behaviour::with_codec(
        request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(MAX_SYNC_WIRE_BYTES)
            .set_response_size_maximum(MAX_SYNC_WIRE_BYTES),
        [(
            StreamProtocol::new(registry::SYNC_PROTOCOL),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
    );
    // Links (other crates' protocols) are frames on long-lived streams of their own.
    let streams = libp2p_stream::Behaviour::new();
    Ok(Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        limits,
        book: Book::default(),
        registry_sync,
        streams,
        membership,
        identify,
        // Every 10 s, failing after 10 s without an answer (libp2p's defaults: 15 s and 20 s):
        // a dead connection is closed within 20 s.
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(Duration::from_secs(10))
                .with_timeout(Duration::from_secs(10)),
        ),
        kad,
        gossipsub,
        relay_server,
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        autonat,
    })
}

async fn load_known(store: &store::Store) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let rows = match store.blocking(|s| s.scan(store::cf::PEERS)).await {
        Ok(rows) => rows,
        Err(e) => {
            warn!(error = %e, "cannot read known peers; starting from the bootstrap list");
            return Vec::new();
        }
    };
    rows.into_iter()
        .filter_map(|(k, v)| {
            let peer: PeerId = std::str::from_utf8(&k).ok()?.parse().ok()?;
            let known: KnownPeer = serde_json::from_slice(&v).ok()?;
            let addrs = known.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            Some((peer, addrs))
        })
        .collect()
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        // Persist what the replica knows, after every write already queued.
        while let Some(job) = self.persist_backlog.pop_front() {
            if self.persist.send(job).await.is_err() {
                break;
            }
        }
        let ops = self.replica.shutdown_ops();
        let (done, wait) = oneshot::channel();
        if self
            .persist
            .send(PersistJob {
                ops,
                done: Some(done),
            })
            .await
            .is_ok()
        {
            if let Ok(Err(e)) = wait.await {
                warn!(error = %e, "cannot persist the registry at shutdown");
            }
        }
        debug!("mesh event loop stopped");
    }

    /// Carries out what the replica asked for.
    fn registry_out(&mut self, out: Vec<Out>) {
        for o in out {
            match o {
                Out::Sync(peer, msg, fresh) => {
                    self.swarm.behaviour_mut().registry_sync.send_request(
                        &peer,
                        SyncRequest {
                            version: 1,
                            fresh,
                            msg,
                        },
                    );
                }
                Out::Gossip(data) => self.registry_gossip(data),
                Out::Strike(peer, reason) => {
                    let (strikes, banned) = self.strikes.add(peer, Instant::now());
                    warn!(%peer, %reason, strikes, "peer penalised");
                    self.emit(Event::Penalised {
                        peer,
                        reason,
                        strikes,
                    });
                    if banned {
                        warn!(
                            %peer,
                            minutes = registry::STRIKE_MEMORY.as_secs() / 60,
                            "peer cut off after repeated bad registry data"
                        );
                        self.swarm.behaviour_mut().blocked.block_peer(peer);
                    }
                }
            }
        }
    }

    /// Publishes registry gossip of a local write. With no gossip peer yet it waits for the first
    /// subscriber (bounded: the oldest go first; sync brings whatever was dropped).
    fn registry_gossip(&mut self, data: Vec<u8>) {
        let topic = self.registry_topic.clone();
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, data.clone())
        {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                if self.unsent_gossip.len() >= MAX_UNSENT_GOSSIP {
                    self.unsent_gossip.pop_front();
                }
                self.unsent_gossip.push_back(data);
            }
            Err(e) => debug!(error = %e, "registry gossip not sent"),
        }
    }

    /// Changes this node learned by sync, not by gossip, are news that gossip did not carry: a
    /// side of a healed partition, a member that was away, a joiner's records. Pass them on by
    /// syncing with a few other connected members, each of which does the same if it learns
    /// something: an epidemic that stops where replicas already agree (a sync with nothing new
    /// is one exchange of heads), so that news reaches everyone in a few round trips rather
    /// than a few anti-entropy periods. At most once per [`SPREAD_EVERY`]: news learned
    /// meanwhile goes out with the next round (a busy node does not multiply its syncs).
    fn spread_learned(&mut self, from: Option<PeerId>) {
        use rand::seq::SliceRandom as _;
        if self.last_spread.elapsed() < SPREAD_EVERY {
            self.spread_pending = true;
            return;
        }
        self.last_spread = Instant::now();
        self.spread_pending = false;
        let mut others: Vec<PeerId> = self
            .members
            .keys()
            .filter(|p| Some(**p) != from)
            .copied()
            .collect();
        others.shuffle(&mut rand::thread_rng());
        others.truncate(SPREAD_FANOUT);
        debug!(
            to = others.len(),
            "registry news learned by sync: passing it on"
        );
        for peer in others {
            if let Some(out) = self.replica.start_sync(peer) {
                self.registry_out(vec![out]);
            }
        }
    }

    /// Once the store has caught up (its backlog is under half the bound), syncs with the
    /// peers whose registry messages were turned away meanwhile (those still connected).
    fn pay_owed_syncs(&mut self) {
        if self.owed_syncs.is_empty() || self.persist_backlog.len() >= MAX_PERSIST_BACKLOG / 2 {
            return;
        }
        let owed = std::mem::take(&mut self.owed_syncs);
        debug!(
            peers = owed.len(),
            "the store caught up: syncing with whoever it turned away"
        );
        for peer in owed {
            if self.members.contains_key(&peer)
                && let Some(out) = self.replica.start_sync(peer)
            {
                self.registry_out(vec![out]);
            }
        }
    }

    /// Publishes the gossip held for want of peers, once a verified member has subscribed (on
    /// its subscription, or on its verification if the subscription came first): a peer that
    /// has not verified this node yet would drop it.
    fn flush_unsent_gossip(&mut self) {
        if self.unsent_gossip.is_empty() {
            return;
        }
        let unsent = std::mem::take(&mut self.unsent_gossip);
        debug!(
            messages = unsent.len(),
            "registry gossip held for want of peers: publishing it now"
        );
        for data in unsent {
            self.registry_gossip(data);
        }
    }

    /// Writes the next registry checkpoint if this node writes them and one is due.
    fn checkpoint_if_due(&mut self) {
        let Some(policy) = self.config.checkpoint.clone() else {
            return;
        };
        if let Some((change, out)) = self.replica.checkpoint_if_due(&policy) {
            self.registry_persist(vec![change], None);
            self.registry_out(out);
        }
    }

    /// Queues changes for the store (in order, off the event loop).
    fn registry_persist(
        &mut self,
        changes: Vec<Vec<u8>>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) {
        if !changes.is_empty() {
            self.registry_changed.send_modify(|n| *n += 1);
        }
        if changes.is_empty() && done.is_none() && !self.replica.crossed() {
            return;
        }
        let ops = self.replica.persist_ops(&changes);
        self.persist_backlog.push_back(PersistJob { ops, done });
        self.flush_persist_backlog();
    }

    /// Hands queued jobs to the persister in order; what does not fit waits here (in order)
    /// for the next tick rather than stalling the loop.
    fn flush_persist_backlog(&mut self) {
        while let Some(job) = self.persist_backlog.pop_front() {
            match self.persist.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    self.persist_backlog.push_front(job);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    warn!("the registry persister stopped; changes are no longer stored");
                    return;
                }
            }
        }
    }

    fn on_registry_sync(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                if !self.members.contains_key(&peer) {
                    let _ = self.swarm.behaviour_mut().registry_sync.send_response(
                        channel,
                        SyncResponse::Refused("only members sync the registry".into()),
                    );
                    return;
                }
                if self.persist_backlog.len() >= MAX_PERSIST_BACKLOG {
                    self.owed_syncs.insert(peer);
                    let _ = self.swarm.behaviour_mut().registry_sync.send_response(
                        channel,
                        SyncResponse::Refused(
                            "busy storing earlier registry changes: sync again later".into(),
                        ),
                    );
                    return;
                }
                let (resp, changes, out) = self.replica.on_sync_request(peer, request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .registry_sync
                    .send_response(channel, resp);
                let learned = !changes.is_empty();
                self.registry_persist(changes, None);
                self.registry_out(out);
                if learned {
                    self.spread_learned(Some(peer));
                }
            }
            E::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => {
                if self.persist_backlog.len() >= MAX_PERSIST_BACKLOG {
                    debug!(%peer, "registry sync response dropped: the store is behind");
                    self.owed_syncs.insert(peer);
                    let out = self.replica.on_sync_failure(peer);
                    self.registry_out(out);
                    return;
                }
                let (changes, out) = self.replica.on_sync_response(peer, response);
                let learned = !changes.is_empty();
                self.registry_persist(changes, None);
                self.registry_out(out);
                if learned {
                    self.spread_learned(Some(peer));
                }
            }
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "registry sync request failed");
                let out = self.replica.on_sync_failure(peer);
                self.registry_out(out);
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "registry sync request from peer failed");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Rtts(reply) => {
                let _ = reply.send(self.rtt.clone());
            }
            Command::Members(reply) => {
                let mut list: Vec<PeerInfo> = self
                    .members
                    .iter()
                    .map(|(peer, st)| PeerInfo {
                        peer_id: peer.to_string(),
                        institution: st.member.institution.clone(),
                        role: st.member.role,
                        addrs: self
                            .peers
                            .addrs(peer)
                            .iter()
                            .map(|a| a.to_string())
                            .collect(),
                        connected_for_secs: st.since.elapsed().as_secs(),
                        connections: self
                            .connections
                            .get(peer)
                            .map(|c| c.iter().map(|(_, a)| a.to_string()).collect())
                            .unwrap_or_default(),
                        dialled: self.dialed.contains(peer),
                    })
                    .collect();
                list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = reply.send(list);
            }
            Command::ListenAddrs(reply) => {
                // Direct addresses first: a relayed one is the way in only when they fail.
                let mut addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                addrs.sort_by_key(is_circuit);
                let _ = reply.send(addrs);
            }
            Command::Dial(addr, reply) => {
                let r = self.swarm.dial(addr.clone()).map_err(|e| Error::Dial {
                    addr,
                    reason: e.to_string(),
                });
                let _ = reply.send(r);
            }
            Command::Subscribe { topic, reply } => {
                let full = gossipsub::IdentTopic::new(format!("{}{topic}", self.topic_prefix));
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&full)
                    .map(|_| ())
                    .map_err(|e| Error::Publish {
                        topic,
                        reason: e.to_string(),
                    });
                let _ = reply.send(r);
            }
            Command::RegistryView(reply) => {
                let _ = reply.send(self.replica.view().clone());
            }
            Command::RegistryWith(job) => job(self.replica.view()),
            Command::RegistryStatus(reply) => {
                let _ = reply.send(self.replica.status());
            }
            Command::RegistryWrite { id, body, reply } => {
                let r = self.replica.write(id, *body);
                self.registry_written(r, reply);
            }
            Command::RegistryInsert { bytes, reply } => {
                let r = self.replica.insert_signed(&bytes);
                self.registry_written(r, reply);
            }
            Command::RegistrySyncRaw { peer, msg, reply } => {
                self.registry_out(vec![Out::Sync(peer, msg, true)]);
                let _ = reply.send(());
            }
            Command::Block(peers, blocked, reply) => {
                let now = Instant::now();
                for peer in peers {
                    let b = &mut self.swarm.behaviour_mut().blocked;
                    if blocked {
                        b.block_peer(peer);
                    } else {
                        b.unblock_peer(peer);
                        self.peers.unblocked(&peer, now);
                    }
                }
                let _ = reply.send(());
            }
            Command::Publish { topic, data, reply } => {
                let full = gossipsub::IdentTopic::new(format!("{}{topic}", self.topic_prefix));
                let gs = &mut self.swarm.behaviour_mut().gossipsub;
                let r = gs
                    .subscribe(&full)
                    .map_err(|e| e.to_string())
                    .and_then(|_| {
                        gs.publish(full, data)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|reason| Error::Publish { topic, reason });
                let _ = reply.send(r);
            }
        }
    }

    /// Persists a local write, answers the writer once it is durable, then gossips it.
    fn registry_written(
        &mut self,
        r: Result<(crdt_registry::Entry, Vec<u8>, Vec<Out>), String>,
        reply: oneshot::Sender<Result<crdt_registry::Entry, Error>>,
    ) {
        match r {
            Ok((entry, change, out)) => {
                let (done, wait) = oneshot::channel();
                self.registry_persist(vec![change], Some(done));
                self.tracker.spawn(async move {
                    let r = match wait.await {
                        Ok(Ok(())) => Ok(entry),
                        Ok(Err(e)) => Err(Error::Registry(format!("cannot store the change: {e}"))),
                        Err(_) => Err(Error::Closed),
                    };
                    let _ = reply.send(r);
                });
                self.registry_out(out);
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Registry(e)));
            }
        }
    }

    fn on_tick(&mut self) {
        self.flush_persist_backlog();
        self.pay_owed_syncs();
        if self.spread_pending {
            self.spread_learned(None);
        }
        for peer in self.strikes.expired(Instant::now()) {
            info!(%peer, "ban over; the peer may reconnect");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        let now = Instant::now();
        let members: Vec<PeerId> = self.members.keys().copied().collect();
        if let Some(out) = self
            .replica
            .anti_entropy(&members, self.config.anti_entropy)
        {
            self.registry_out(vec![out]);
        }
        let overdue = self.replica.catch_up_overdue();
        self.registry_out(overdue);
        // Swap member lists with a random member now and then: whoever missed an introduction
        // (a dial that failed, a peer that joined while we were away) finds the rest this way.
        let mix_every = self.mix_every();
        if self.last_exchange.elapsed() >= mix_every && !members.is_empty() {
            self.last_exchange = now;
            let peer = members[rand::Rng::gen_range(&mut rand::thread_rng(), 0..members.len())];
            let hello = self.hello(&peer);
            self.swarm
                .behaviour_mut()
                .membership
                .send_request(&peer, hello);
        }
        if self.last_invite_check.elapsed() >= Duration::from_secs(2) {
            self.last_invite_check = now;
            self.cut_reused_invites();
            self.cut_revoked();
        }
        if self.last_bound.elapsed() >= Duration::from_secs(1) {
            self.last_bound = now;
            self.close_idle(now);
        }
        // For the mesh's health, one more member now and then, at random, even when this node
        // has enough: the graph of bounded connections keeps mixing, and a healed partition
        // gets links across within about `2 / MIX_BUDGET` seconds (idle ones close again).
        if self.last_mix.elapsed() >= mix_every {
            self.last_mix = now;
            let swarm = &self.swarm;
            if let Some((peer, addrs)) = self.peers.random_known(|p| swarm.is_connected(p)) {
                self.dial(peer, addrs);
            }
        }
        if self.last_checkpoint_check.elapsed() >= CHECKPOINT_CHECK {
            self.last_checkpoint_check = now;
            self.checkpoint_if_due();
        }
        if self.last_book.elapsed() >= BOOK_REFRESH {
            self.last_book = now;
            self.refresh_book();
        }
        let room = self.room();
        let swarm = &self.swarm;
        let members = &self.members;
        let coordinators = &self.coordinators;
        let due = self.peers.tick(
            now,
            |p| swarm.is_connected(p),
            |p| members.contains_key(p),
            room,
            |p| coordinators.contains(p),
        );
        for peer in due.unproven {
            let reason = Refusal::NoProof(self.config.proof_timeout);
            warn!(%peer, %reason, "disconnecting peer");
            self.emit(Event::Refused { peer, reason });
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        for peer in due.refused {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        // Introductions and known members we are not connected to, with exponential backoff.
        for (peer, addrs) in due.dials {
            self.dial(peer, addrs);
        }
    }

    fn emit(&self, event: Event) {
        // No subscribers is fine: nobody is waiting for this event.
        let _ = self.events.send(event);
    }

    /// The hello for `peer`: this node's proof, and the member list only if `peer` has proven
    /// its own membership (a stranger learns nobody).
    fn hello(&self, peer: &PeerId) -> Hello {
        let member = self.members.contains_key(peer);
        Hello {
            version: 1,
            proof: self.proof.clone(),
            members: if member {
                self.member_list(peer)
            } else {
                Vec::new()
            },
            first: !member,
        }
    }

    /// The members a hello or welcome lists: at most [`LISTED_IN_HELLO`] connected ones, at
    /// random, each with its first few addresses. With bounded connections a peer dials only
    /// a few of them, and the registry lists everyone; and a coordinator connected to a
    /// thousand members must still fit its welcome in a membership message (64 KiB).
    fn member_list(&self, except: &PeerId) -> Vec<PeerAddrs> {
        use rand::seq::IteratorRandom as _;
        self.members
            .keys()
            .filter(|p| *p != except)
            .choose_multiple(&mut rand::thread_rng(), LISTED_IN_HELLO)
            .into_iter()
            .map(|p| PeerAddrs {
                peer_id: p.to_string(),
                addrs: self
                    .peers
                    .addrs(p)
                    .iter()
                    .take(ADDRS_IN_HELLO)
                    .map(|a| a.to_string())
                    .collect(),
            })
            .collect()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            ..
        } = &event
            && let Some(open) = self.connections.get_mut(peer_id)
        {
            open.retain(|(c, _)| c != connection_id);
            let alone = self
                .announce_when_alone
                .get(peer_id)
                .is_some_and(|current| open.len() == 1 && open[0].0 == *current);
            if open.is_empty() {
                self.connections.remove(peer_id);
                self.announced_again.remove(peer_id);
                self.overlapped.remove(peer_id);
                self.dialed.remove(peer_id);
                self.announce_when_alone.remove(peer_id);
            }
            if alone {
                let peer = *peer_id;
                self.announce_when_alone.remove(&peer);
                self.announce_subscriptions_again(peer);
            }
        }
        match event {
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                // A reservation ends with its relay's connection: taken again on reconnect.
                let before = self.relay_listening.len();
                self.relay_listening.retain(|_, id| *id != listener_id);
                if self.relay_listening.len() < before {
                    info!(?reason, "relay reservation closed");
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !is_circuit(&address) {
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                // A connection the peer opened through a relay has no address of its own: it
                // is known by our relayed listen address, which says which relay it came by.
                let seen = match &endpoint {
                    ConnectedPoint::Listener { local_addr, .. } if is_circuit(local_addr) => {
                        local_addr.clone()
                    }
                    other => other.get_remote_address().clone(),
                };
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .push((connection_id, seen));
                if !self.members.contains_key(&peer_id) {
                    // No gossip to or from it until its proof verifies (see `build_swarm`).
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .set_application_score(&peer_id, UNVERIFIED_SCORE);
                }
                if num_established.get() > 1 {
                    self.overlapped.insert(peer_id);
                }
                if endpoint.is_dialer() {
                    self.dialed.insert(peer_id);
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !is_circuit(address)
                {
                    self.remember_addr(peer_id, address.clone());
                }
                if !self.members.contains_key(&peer_id) {
                    if num_established.get() == 1 {
                        self.peers.awaiting_proof(peer_id, Instant::now());
                    }
                    // Whoever dials proves first: a stranger that connects to us gets nothing
                    // until it has proven itself, and then it gets our proof in the answer.
                    // (Two crossing connections: each side dialled one, so both send.)
                    if endpoint.is_dialer() {
                        let hello = self.hello(&peer_id);
                        self.swarm
                            .behaviour_mut()
                            .membership
                            .send_request(&peer_id, hello);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.peers.disconnected(&peer_id);
                if self.members.remove(&peer_id).is_some() {
                    self.set_verified(peer_id, None);
                    info!(peer = %peer_id, "member disconnected");
                    self.emit(Event::MemberDisconnected(peer_id));
                }
                if let Some(op) = self.replica.on_disconnect(peer_id) {
                    self.persist_backlog.push_back(PersistJob {
                        ops: vec![op],
                        done: None,
                    });
                    self.flush_persist_backlog();
                }
                let out = self.replica.resume_queued();
                self.registry_out(out);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "dial failed");
                // Dialled by id (on demand) with no address known: ask the DHT where it is.
                if let (Some(peer), libp2p::swarm::DialError::NoAddresses) = (peer_id, &error) {
                    self.look_up(peer);
                }
            }
            SwarmEvent::IncomingConnectionError {
                peer_id: Some(peer),
                error: libp2p::swarm::ListenError::Denied { .. },
                ..
            } => {
                debug!(%peer, "turned away a blocked peer");
                self.emit(Event::TurnedAway(peer));
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Membership(ev) => self.on_membership(ev),
            BehaviourEvent::RegistrySync(ev) => self.on_registry_sync(ev),
            BehaviourEvent::Streams(()) => {}
            BehaviourEvent::Book(never) => match never {},
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtt.insert(peer, rtt);
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) if !matches!(e, ping::Failure::Unsupported) => {
                // A connection that no longer carries a ping is dead, even if its transport has
                // not noticed: a TCP connection whose path went away (a network change, a NAT
                // that forgot it) would otherwise stay "connected" for the kernel's ~15 minutes,
                // swallowing gossip and keeping the peer from being dialled again.
                debug!(%peer, error = %e, "ping failed: closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // A peer listening on every interface lists its loopback addresses too: of use
                // only to a peer on the same host (one that reaches it over loopback itself).
                let local = self
                    .connections
                    .get(&peer_id)
                    .is_some_and(|c| c.iter().any(|(_, a)| is_loopback(a)));
                let addrs = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| local || !is_loopback(a))
                    .take(MAX_ADDRS_PER_PEER);
                for addr in addrs {
                    self.remember_addr(peer_id, addr);
                }
                if self.members.contains_key(&peer_id) {
                    self.admit_to_routing(peer_id);
                    self.persist(peer_id);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                // The peer that passed it on must be a member connected now. Its author must be
                // a member too: connected, or listed by the registry (bounded connections: most
                // authors are further away). Registry changes are exempt from the author rule —
                // their entries carry their own signatures, which the replica checks, and a new
                // member's own node record is how the others learn it is one.
                let relay_ok = self.members.contains_key(&propagation_source);
                let author_ok = message.source.is_some_and(|s| {
                    self.members.contains_key(&s)
                        || self.listed(&s)
                        || message.topic == self.registry_topic
                });
                if author_ok
                    && relay_ok
                    && message.topic == self.registry_topic
                    && self.persist_backlog.len() >= MAX_PERSIST_BACKLOG
                {
                    // Saturated: neither accept nor blame; a sync with the forwarder once the
                    // store has caught up brings it again (`owed_syncs`).
                    debug!(peer = %propagation_source, "registry gossip ignored: the store is behind");
                    self.owed_syncs.insert(propagation_source);
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Ignore,
                        );
                } else if author_ok && relay_ok && message.topic == self.registry_topic {
                    // Forward registry gossip only if it checks out, and blame whoever sent it
                    // to us if not: an honest peer never forwards what fails these checks.
                    let (valid, changes, out) =
                        self.replica.on_gossip(propagation_source, &message.data);
                    let acceptance = if valid {
                        gossipsub::MessageAcceptance::Accept
                    } else {
                        gossipsub::MessageAcceptance::Reject
                    };
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            acceptance,
                        );
                    self.registry_persist(changes, None);
                    self.registry_out(out);
                    return;
                }
                let acceptance = if author_ok && relay_ok {
                    gossipsub::MessageAcceptance::Accept
                } else {
                    gossipsub::MessageAcceptance::Reject
                };
                let accepted = matches!(acceptance, gossipsub::MessageAcceptance::Accept);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                if !accepted {
                    debug!(peer = %propagation_source, "ignored gossip from a non-member");
                    return;
                }
                let topic = message.topic.as_str();
                if let (Some(source), Some(topic)) =
                    (message.source, topic.strip_prefix(&self.topic_prefix))
                {
                    self.emit(Event::Gossip {
                        topic: topic.to_string(),
                        source,
                        data: message.data,
                    });
                }
            }
            // A member's subscription: held gossip can go (see `flush_unsent_gossip`).
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.registry_topic && self.members.contains_key(&peer_id) =>
            {
                self.flush_unsent_gossip();
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(found)),
                ..
            }) => {
                let Ok(wanted) = PeerId::from_bytes(&found.key) else {
                    return;
                };
                for info in found.peers.into_iter().filter(|i| i.peer_id == wanted) {
                    debug!(peer = %wanted, addrs = info.addrs.len(), "found through the DHT");
                    for addr in info.addrs.into_iter().take(MAX_ADDRS_PER_PEER) {
                        self.remember_addr(wanted, addr);
                    }
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                info!(status = ?new, "NAT status");
                if matches!(new, autonat::NatStatus::Private) {
                    let relays: Vec<PeerId> = self
                        .members
                        .iter()
                        .filter(|(_, st)| st.member.role == Role::Coordinator)
                        .map(|(p, _)| *p)
                        .collect();
                    for relay in relays {
                        self.listen_via_relay(relay, true);
                    }
                }
            }
            _ => {}
        }
    }

    /// Takes a reservation on `relay` (a coordinator we are connected to), so that peers can
    /// reach this node through it (and DCUtR can upgrade to a direct connection): always when
    /// `reserve_relay` is set, else once AutoNAT finds this node private (`nat_private`).
    fn listen_via_relay(&mut self, relay: PeerId, nat_private: bool) {
        if !(self.config.reserve_relay || nat_private)
            || self.swarm.behaviour().relay_server.is_enabled()
            || self.relay_listening.contains_key(&relay)
        {
            return;
        }
        // The address we reach it at now: an address it merely listed may not be reachable.
        let addr = self
            .connections
            .get(&relay)
            .and_then(|c| c.iter().map(|(_, a)| a).find(|a| !is_circuit(a)).cloned())
            .or_else(|| self.peers.addrs(&relay).first().cloned());
        let Some(addr) = addr else {
            return;
        };
        let addr: Multiaddr = addr
            .into_iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                info!(%circuit, "listening through relay");
                self.relay_listening.insert(relay, id);
            }
            Err(e) => warn!(%circuit, error = %e, "cannot listen through relay"),
        }
    }

    fn on_membership(&mut self, event: request_response::Event<Hello, HelloReply>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                connection_id,
                message: M::Request {
                    request, channel, ..
                },
            } => {
                let verdict = self.judge(&peer, request.version, &request.proof);
                // Only if a connection to it opened while another was open (gossipsub greeted
                // that one with nothing), and at most every 10 s per peer: a member cannot make
                // us flood our topics.
                let came_back = request.first
                    && self.members.contains_key(&peer)
                    && self.overlapped.contains(&peer)
                    && self
                        .announced_again
                        .get(&peer)
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
                let reply = match &verdict {
                    Ok((_, receipt)) => HelloReply::Welcome {
                        proof: self.proof.clone(),
                        members: self.member_list(&peer),
                        receipt: receipt.as_ref().map(Receipt::to_bytes),
                    },
                    Err(reason) => HelloReply::Refused {
                        reason: reason.to_string(),
                    },
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .membership
                    .send_response(channel, reply);
                let ok = verdict.is_ok();
                self.on_verdict(peer, verdict.map(|(m, _)| m), request.members, true);
                if came_back && ok {
                    self.came_back(peer, connection_id);
                }
            }
            E::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => match response {
                HelloReply::Welcome {
                    proof,
                    members,
                    receipt,
                } => {
                    if let Some(receipt) = receipt {
                        self.take_receipt(&peer, &receipt);
                    }
                    let verdict = self.judge(&peer, 1, &proof).map(|(m, _)| m);
                    let newly = verdict.is_ok() && !self.members.contains_key(&peer);
                    if let Ok(member) = &verdict {
                        self.emit(Event::AcceptedBy(member.clone()));
                    }
                    self.on_verdict(peer, verdict, members, false);
                    // Our first hello to a peer not yet proven carried no member list: now that
                    // it has proven itself, swap lists.
                    if newly {
                        let hello = self.hello(&peer);
                        self.swarm
                            .behaviour_mut()
                            .membership
                            .send_request(&peer, hello);
                    }
                }
                HelloReply::Refused { reason } => {
                    warn!(%peer, %reason, "peer refused our membership proof");
                    self.emit(Event::RefusedBy { peer, reason });
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            },
            // A refused peer is cut at its deadline, not as soon as our answer is flushed:
            // closing right away can reset the stream before the peer has read the reason.
            E::ResponseSent { .. } => {}
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "membership request failed");
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "membership request from peer failed");
            }
        }
    }

    /// Judges a peer's proof. A coordinator admits a joining proof (fresh binding, invite
    /// valid now, not used by another node) and returns the receipt it signed for it.
    fn judge(
        &mut self,
        peer: &PeerId,
        version: u32,
        proof: &[u8],
    ) -> Result<(Member, Option<Receipt>), Refusal> {
        if version != 1 {
            return Err(Refusal::Malformed {
                what: "hello".into(),
                reason: format!("membership protocol version {version}, this node speaks 1"),
            });
        }
        let key = crate::membership::VerifiedProofs::key(peer, proof);
        if let Some(member) = self.proofs.get(&key).cloned() {
            if let Some(invite) = &member.invite {
                self.invite_free(invite, peer)?;
            }
            self.not_revoked(peer, &member)?;
            return Ok((member, None));
        }
        let proof = Proof::from_bytes(proof)?;
        let now = unix_now();
        if proof.is_joining() {
            let Some(joining) = self
                .own_proof
                .is_coordinator()
                .then(|| proof.verify_joining(&self.federation, peer, now))
                .transpose()?
            else {
                return Err(Refusal::NoReceipt);
            };
            self.invite_free(&joining.invite, peer)?;
            let receipt = Receipt::issue(&self.own_proof, &self.config.keypair, &joining, now)
                .ok_or(Refusal::NoReceipt)?;
            let member = proof
                .with_receipt(receipt.clone())
                .verify(&self.federation, peer, now)?;
            self.not_revoked(peer, &member)?;
            self.receipts.insert(joining.invite, *peer);
            info!(%peer, institution = %joining.institution, role = %joining.role, "admitted a new member");
            return Ok((member, Some(receipt)));
        }
        let member = proof.verify(&self.federation, peer, now)?;
        self.proofs.insert(key, member.clone());
        if let Some(invite) = &member.invite {
            self.invite_free(invite, peer)?;
        }
        self.not_revoked(peer, &member)?;
        Ok((member, None))
    }

    /// Refuses `peer` if the registry revokes its node key or its institution, as this node's
    /// replica knows (a proof stays valid after a revocation: only the registry says so).
    fn not_revoked(&mut self, peer: &PeerId, member: &Member) -> Result<(), Refusal> {
        let view = self.replica.view();
        if view.revocations.is_empty() {
            return Ok(());
        }
        if let Some(inst) = &member.institution_key
            && view.is_revoked_key(inst)
        {
            return Err(Refusal::Revoked {
                what: format!(
                    "institution {}",
                    member.institution.as_deref().unwrap_or("(unnamed)")
                ),
            });
        }
        if crate::registry::key_of_peer(peer).is_some_and(|k| view.is_revoked_key(&k)) {
            return Err(Refusal::Revoked {
                what: format!("node {peer}"),
            });
        }
        Ok(())
    }

    /// Cuts connected members the registry now revokes (the node or its institution): checked
    /// with the invites, every 2 s.
    fn cut_revoked(&mut self) {
        if self.replica.view().revocations.is_empty() {
            return;
        }
        let members: Vec<(PeerId, Member)> = self
            .members
            .iter()
            .map(|(p, st)| (*p, st.member.clone()))
            .collect();
        for (peer, member) in members {
            if let Err(reason) = self.not_revoked(&peer, &member) {
                self.on_verdict(peer, Err(reason), vec![], false);
            }
        }
    }

    /// Refuses `peer` if another node used `invite` first, as this node knows.
    fn invite_free(&mut self, invite: &str, peer: &PeerId) -> Result<(), Refusal> {
        if let Some(other) = self.receipts.get(invite).filter(|p| *p != peer) {
            return Err(Refusal::InviteUsed {
                by: other.to_string(),
            });
        }
        let me = peer.to_string();
        if let Some(first) = self
            .replica
            .view()
            .used_invites
            .get(invite)
            .filter(|p| **p != me)
        {
            return Err(Refusal::InviteUsed { by: first.clone() });
        }
        Ok(())
    }

    /// A coordinator's receipt for this joining node: from now on the node presents the proof
    /// with it.
    fn take_receipt(&mut self, from: &PeerId, receipt: &[u8]) {
        if !self.own_proof.is_joining() {
            return;
        }
        let me = self.config.keypair.public().to_peer_id();
        let admitted = Receipt::from_bytes(receipt).and_then(|r| {
            let proof = self.own_proof.clone().with_receipt(r);
            proof.verify(&self.federation, &me, unix_now())?;
            Ok(proof)
        });
        match admitted {
            Ok(proof) => {
                info!(coordinator = %from, "admitted to the federation");
                self.proof = proof.to_bytes();
                self.own_proof = proof.clone();
                self.emit(Event::Admitted(Box::new(proof)));
            }
            Err(reason) => warn!(peer = %from, %reason, "ignoring an invalid receipt"),
        }
    }

    /// Cuts connected members whose invite the registry now says another node used first (two
    /// nodes that joined with one invite at once, through two coordinators).
    fn cut_reused_invites(&mut self) {
        let used = &self.replica.view().used_invites;
        let reused: Vec<(PeerId, String)> = self
            .members
            .iter()
            .filter_map(|(peer, state)| {
                let first = used.get(state.member.invite.as_ref()?)?;
                (*first != peer.to_string()).then(|| (*peer, first.clone()))
            })
            .collect();
        for (peer, first) in reused {
            self.on_verdict(peer, Err(Refusal::InviteUsed { by: first }), vec![], false);
        }
    }

    /// Acts on a proof's verdict. `reply_owed`: the proof came in a request we just answered, so a
    /// refused peer is cut once the answer is out rather than now.
    fn on_verdict(
        &mut self,
        peer: PeerId,
        verdict: Result<Member, Refusal>,
        listed: Vec<PeerAddrs>,
        reply_owed: bool,
    ) {
        match verdict {
            Ok(member) => {
                if !self.members.contains_key(&peer) {
                    self.admit(peer, member);
                }
                // Peer exchange, on every hello (the first one and the periodic swaps): connect
                // directly to the members it knows, so that the mesh does not depend on whoever
                // introduced us, nor on that first introduction going through.
                self.introduce(listed);
            }
            Err(reason) => {
                self.peers.refused(peer, reply_owed, Instant::now());
                warn!(%peer, %reason, "refusing peer");
                self.emit(Event::Refused { peer, reason });
                if self.members.remove(&peer).is_some() {
                    self.set_verified(peer, None);
                    self.emit(Event::MemberDisconnected(peer));
                }
                if !reply_owed {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    /// Tells the task streams who is a verified member.
    fn set_verified(&self, peer: PeerId, member: Option<Member>) {
        let mut verified = self.verified.write().unwrap_or_else(|e| e.into_inner());
        match member {
            Some(m) => verified.insert(peer, m),
            None => verified.remove(&peer),
        };
    }

    /// `peer` came back (a new process under the same identity, or after losing every
    /// connection to us) on connection `current` while we still held older ones to it. Those
    /// lead to what is gone: they are closed. And gossipsub tells a peer our subscriptions only
    /// on the first connection to it, so the new one never learnt them and would never send us
    /// its gossip (adverts, registry changes): once only `current` is left (gossipsub would
    /// otherwise hand the announcement to a dying connection), our topics are announced again.
    fn came_back(&mut self, peer: PeerId, current: libp2p::swarm::ConnectionId) {
        self.announced_again.insert(peer, Instant::now());
        self.overlapped.remove(&peer);
        let old: Vec<libp2p::swarm::ConnectionId> = self
            .connections
            .get(&peer)
            .map(|c| {
                c.iter()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != current)
                    .collect()
            })
            .unwrap_or_default();
        info!(%peer, old = old.len(), "a member came back while old connections lingered: closing them");
        if old.is_empty() {
            self.announce_subscriptions_again(peer);
            return;
        }
        self.announce_when_alone.insert(peer, current);
        for id in old {
            self.swarm.close_connection(id);
        }
    }

    /// Subscribing again tells every peer our topics, `peer` included.
    fn announce_subscriptions_again(&mut self, peer: PeerId) {
        info!(%peer, "announcing our topics again for a member that came back");
        let topics: Vec<gossipsub::TopicHash> =
            self.swarm.behaviour().gossipsub.topics().cloned().collect();
        for hash in topics {
            let topic = gossipsub::IdentTopic::new(hash.into_string());
            let gossip = &mut self.swarm.behaviour_mut().gossipsub;
            gossip.unsubscribe(&topic);
            if let Err(e) = gossip.subscribe(&topic) {
                warn!(error = %e, "cannot subscribe again");
            }
        }
    }

    /// A newly verified member: remembered, routed to, synced with.
    fn admit(&mut self, peer: PeerId, member: Member) {
        info!(%peer, institution = ?member.institution, role = %member.role, "member connected");
        self.members.insert(
            peer,
            MemberState {
                member: member.clone(),
                since: Instant::now(),
            },
        );
        self.set_verified(peer, Some(member.clone()));
        self.peers.verified(peer, Instant::now());
        self.admit_to_routing(peer);
        self.persist(peer);
        if member.role == Role::Coordinator {
            self.coordinators.insert(peer);
        }
        if member.role == Role::Coordinator {
            self.listen_via_relay(peer, false);
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, 0.0);
        self.emit(Event::MemberConnected(member));
        // One sync session per new connection, the dialler's: a session carries changes both
        // ways, and the listener starting one too doubled the work of every connection — at a
        // join, every member the new node dialled built the whole registry for it twice over.
        if self.dialed.contains(&peer)
            && let Some(out) = self.replica.start_sync(peer)
        {
            self.registry_out(vec![out]);
        }
        self.flush_unsent_gossip();
    }

    /// Dials the listed peers we are not connected to. One never verified becomes an
    /// introduction, dialled again with backoff if this attempt fails.
    fn introduce(&mut self, listed: Vec<PeerAddrs>) {
        let listed: Vec<(PeerId, Vec<Multiaddr>)> = listed
            .into_iter()
            .take(MAX_LISTED_MEMBERS)
            .filter_map(|pa| {
                let peer = pa.peer_id.parse::<PeerId>().ok()?;
                let addrs = pa
                    .addrs
                    .iter()
                    .take(MAX_ADDRS_PER_PEER)
                    .filter_map(|a| a.parse().ok())
                    .collect();
                Some((peer, addrs))
            })
            .collect();
        let me = *self.swarm.local_peer_id();
        let room = self.room();
        let swarm = &self.swarm;
        let peers: Vec<PeerId> = listed.iter().map(|(p, _)| *p).collect();
        let dials =
            self.peers
                .introduce(listed, &me, |p| swarm.is_connected(p), Instant::now(), room);
        for peer in peers {
            self.book_update(peer);
        }
        for (peer, addrs) in dials {
            self.dial(peer, addrs);
        }
    }

    /// How many more members to dial now: up to half of `max_connections` (then peers that
    /// dial this node, and the members it dials on demand, fill the rest). Dials under way and
    /// peers dialled but not verified yet count: a joining node hears a member list in every
    /// welcome, and counting only verified members let it dial again at each one — 60
    /// connections within a second of joining a federation of 100, instead of 12. (Only our
    /// own dials: strangers connecting to us cannot use up the room.)
    fn room(&self) -> usize {
        let unverified = self
            .dialed
            .iter()
            .filter(|p| !self.members.contains_key(p))
            .count();
        let pending = self
            .swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing() as usize;
        let occupied = self.members.len() + unverified + pending;
        (self.config.max_connections / 2)
            .max(1)
            .saturating_sub(occupied)
    }

    /// Bounded connections: while more than `max_connections` members are connected, closes
    /// idle connections (no link request within `idle_after`, connected for at least that
    /// long), other institutions' first, never one to a coordinator; a coordinator closes none.
    fn close_idle(&mut self, now: Instant) {
        // A coordinator seeds the mesh and relays for every member: it keeps them all.
        if self.own_proof.is_coordinator() {
            return;
        }
        let over = self
            .members
            .len()
            .saturating_sub(self.config.max_connections);
        if over == 0 {
            if let Some(before) = now.checked_sub(self.config.idle_after) {
                self.activity.forget_before(before);
            }
            return;
        }
        let idle_after = self.config.idle_after;
        let mine = self.own_institution.as_ref();
        let mut idle: Vec<(bool, Instant, PeerId)> = self
            .members
            .iter()
            .filter(|(p, st)| {
                !self.coordinators.contains(p)
                    && st.member.role != Role::Coordinator
                    && now.duration_since(st.since) >= idle_after
                    && self
                        .activity
                        .last(p)
                        .is_none_or(|t| now.duration_since(t) >= idle_after)
            })
            .map(|(p, st)| {
                let same = mine.is_some() && st.member.institution_key.as_ref() == mine;
                (same, self.activity.last(p).unwrap_or(st.since), *p)
            })
            .collect();
        idle.sort();
        for (_, _, peer) in idle.into_iter().take(over) {
            debug!(%peer, "closing an idle member connection (bounded connections)");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Tells the address book everything known of every node the registry lists, and the
    /// directory who they are.
    fn refresh_book(&mut self) {
        let me = *self.swarm.local_peer_id();
        let view = self.replica.view();
        // Only when the registry's nodes changed (one more, one gone, one republished).
        let seen = (
            view.nodes.len(),
            view.nodes.values().map(|n| n.updated_ms).max().unwrap_or(0),
            view.revocations.len(),
        );
        if self.book_seen == Some(seen) {
            return;
        }
        self.book_seen = Some(seen);
        let mut listed: HashMap<PeerId, Member> = HashMap::with_capacity(view.nodes.len());
        let mut published: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for n in view.nodes.values() {
            let (Ok(peer), Ok(role)) = (n.peer_id.parse::<PeerId>(), n.role.parse()) else {
                continue;
            };
            let addrs = n
                .addrs
                .iter()
                .take(MAX_ADDRS_PER_PEER)
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .map(|mut a| {
                    if matches!(a.iter().last(), Some(Protocol::P2p(id)) if id == peer) {
                        a.pop();
                    }
                    a
                })
                .collect();
            published.insert(peer, addrs);
            listed.insert(
                peer,
                Member {
                    peer_id: n.peer_id.clone(),
                    institution: n.institution.clone(),
                    institution_key: n.institution_key,
                    role,
                    joined_at: 0,
                    invite: None,
                },
            );
        }
        *self.directory.write().unwrap_or_else(|e| e.into_inner()) = listed;
        self.published = published;
        let peers: Vec<PeerId> = self
            .published
            .keys()
            .filter(|p| **p != me)
            .copied()
            .collect();
        for peer in peers {
            self.book_update(peer);
        }
    }

    /// Asks the DHT for a member's addresses (at most every 5 s per peer): the next dial by id
    /// finds them in the address book.
    fn look_up(&mut self, peer: PeerId) {
        let now = Instant::now();
        if peer == *self.swarm.local_peer_id()
            || !self.listed(&peer)
            || self
                .lookups
                .get(&peer)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(5))
        {
            return;
        }
        if self.lookups.len() >= 1024 {
            self.lookups
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(5));
        }
        self.lookups.insert(peer, now);
        self.swarm.behaviour_mut().kad.get_closest_peers(peer);
    }

    /// How often this node swaps member lists with a random member, and dials one more at
    /// random: see [`MIX_BUDGET`].
    fn mix_every(&self) -> Duration {
        let listed = self
            .directory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        Duration::from_secs_f64(listed as f64 / MIX_BUDGET)
            .min(MIX_AT_MOST)
            .max(self.config.anti_entropy)
    }

    /// Whether the registry lists `peer` as a member node.
    fn listed(&self, peer: &PeerId) -> bool {
        self.directory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(peer)
    }

    /// Sets `peer`'s entry of the address book: the addresses seen and heard of first, then
    /// those its node record in the registry publishes.
    fn book_update(&mut self, peer: PeerId) {
        let mut addrs: Vec<Multiaddr> = self.peers.addrs(&peer).to_vec();
        for a in self.published.get(&peer).into_iter().flatten() {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
        self.swarm.behaviour_mut().book.set(peer, addrs);
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "dial failed");
        }
    }

    fn remember_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        self.peers.remember_addr(peer, addr);
        self.book_update(peer);
    }

    fn admit_to_routing(&mut self, peer: PeerId) {
        for addr in self.peers.addrs(&peer).to_vec() {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
    }

    /// Remembers `peer` and its addresses across restarts. Through the ordered persister: an
    /// older record (say, from before identify told us its addresses) must never land last.
    fn persist(&mut self, peer: PeerId) {
        let known = KnownPeer {
            version: 1,
            addrs: self
                .peers
                .addrs(&peer)
                .iter()
                .filter(|a| !is_circuit(a))
                .map(|a| a.to_string())
                .collect(),
            last_seen: unix_now(),
        };
        let value = serde_json::to_vec(&known).expect("known peers always serialise");
        self.persist_backlog.push_back(PersistJob {
            ops: vec![(store::cf::PEERS, peer.to_string().into_bytes(), Some(value))],
            done: None,
        });
        self.flush_persist_backlog();
    }
}

/// Most persistence jobs written in one synced batch.
const PERSIST_GROUP: usize = 64;

/// Writes persistence jobs in order, synced, off the event loop. Jobs that queued up while a
/// write was under way go together, in order, in one batch with one sync (group commit): a
/// node taking a burst of registry gossip pays one fsync per burst, not one per message, and
/// each job is as durable as before when its `done` is told.
async fn persister(store: store::Store, mut jobs: mpsc::Receiver<PersistJob>) {
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        while group.len() < PERSIST_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut ops = Vec::new();
        let mut done = Vec::new();
        for job in group {
            ops.extend(job.ops);
            done.extend(job.done);
        }
        let r = if ops.is_empty() {
            Ok(())
        } else {
            store
                .blocking(move |s| s.batch(&ops))
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = &r {
            warn!(error = %e, "cannot persist registry changes or known peers");
        }
        for d in done {
            let _ = d.send(r.clone());
        }
    }
}

/// Removes and returns the peers whose deadline has passed.
/// Whether `addr` starts at a loopback address (a relayed one: its relay's).
fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The `/p2p/<peer>` component for a dialable address.
pub fn p2p(peer: PeerId) -> Protocol<'static> {
    Protocol::P2p(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs that queue up while a write is under way are written together: in order (a later
    /// job's put of a key wins over an earlier one's), all of them, and each job's waiter is
    /// told only once its changes are stored.
    #[tokio::test]
    async fn queued_persistence_jobs_are_written_together_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel(PERSIST_QUEUE);
        let cf = store::cf::REGISTRY_SYNC;
        let mut waiters = Vec::new();
        for i in 0..(PERSIST_GROUP * 3 + 5) {
            let (done, waiter) = oneshot::channel();
            let ops = vec![
                (cf, b"last".to_vec(), Some(i.to_string().into_bytes())),
                (cf, format!("job-{i}").into_bytes(), Some(vec![1])),
            ];
            // Every other job is fire-and-forget, as gossip's are.
            let done = (i % 2 == 0).then_some(done);
            tx.send(PersistJob { ops, done }).await.unwrap();
            waiters.push((i, waiter));
        }
        // A deletion queued behind the puts removes what they wrote.
        let (done, deleted) = oneshot::channel();
        tx.send(PersistJob {
            ops: vec![(cf, b"job-0".to_vec(), None)],
            done: Some(done),
        })
        .await
        .unwrap();
        drop(tx);
        let writer = tokio::spawn(persister(store.clone(), rx));
        for (i, waiter) in waiters {
            if i % 2 == 0 {
                waiter.await.unwrap().unwrap();
                let key = format!("job-{i}").into_bytes();
                if i > 0 {
                    assert_eq!(store.get(cf, &key).unwrap(), Some(vec![1]), "job {i}");
                }
            }
        }
        deleted.await.unwrap().unwrap();
        writer.await.unwrap();
        let last = PERSIST_GROUP * 3 + 4;
        assert_eq!(
            store.get(cf, b"last").unwrap(),
            Some(last.to_string().into_bytes()),
            "the last job's put wins"
        );
        assert_eq!(
            store.get(cf, b"job-0").unwrap(),
            None,
            "the deletion came last"
        );
        for i in 1..=last {
            assert!(
                store
                    .get(cf, format!("job-{i}").as_bytes())
                    .unwrap()
                    .is_some()
            );
        }
    }
}
