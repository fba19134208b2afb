//! The peer table, sans-IO: who this node is waiting on for a proof, whom it refused, which
//! members it knows and redials, which peers it was told about (introductions), and their
//! addresses.
//!
//! The event loop ([`crate::network`]) tells the table what happened — a connection, a verdict,
//! a list of members from a peer — with the time, and asks it on every tick what is due: which
//! peers to dial, which to cut for never proving their membership, which refused peers to cut
//! now that their answer is out. Whether a peer is connected is the swarm's to say, so the
//! caller passes it in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::seq::SliceRandom as _;

/// Most members a `Hello` or `Welcome` may list, and most introductions kept.
pub(crate) const MAX_LISTED_MEMBERS: usize = 1024;
/// Most addresses kept per peer.
pub(crate) const MAX_ADDRS_PER_PEER: usize = 16;
/// How many times a peer we were told about (but never reached) is dialled before we give up on
/// it until someone mentions it again. With backoff doubling from the redial interval, six
/// attempts span about 60 redial intervals.
pub(crate) const MAX_INTRODUCTION_DIALS: u32 = 6;
/// Most dials one member list (one peer's hello) starts at once, and most dials one tick starts:
/// the rest of the introductions wait for later ticks, so a list of a thousand made-up peers
/// cannot make this node open a thousand connections at once.
pub(crate) const MAX_DIALS_AT_ONCE: usize = 16;
/// How long a refused peer stays connected at most, to receive the reason.
pub(crate) const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// When to dial a peer we are not connected to again, with exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Redial {
    next: Instant,
    failures: u32,
}

impl Redial {
    fn now(now: Instant) -> Redial {
        Redial {
            next: now,
            failures: 0,
        }
    }

    /// One more try is under way: the next waits twice as long, up to 16 times `base`.
    fn tried(&mut self, base: Duration, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.next = now + base * (1u32 << self.failures.min(4));
    }
}

/// What a tick found due.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Due {
    /// Peers to dial, with the addresses to try.
    pub(crate) dials: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Connected peers that did not prove their membership in time: cut them.
    pub(crate) unproven: Vec<PeerId>,
    /// Refused peers whose grace is over: cut them.
    pub(crate) refused: Vec<PeerId>,
}

/// The peer table.
#[derive(Debug)]
pub(crate) struct PeerTable {
    redial_interval: Duration,
    proof_timeout: Duration,
    /// Peers connected but not yet verified, with their deadline.
    pending: HashMap<PeerId, Instant>,
    /// Peers refused and due for disconnection once our reply is out (or at the deadline).
    refused: HashMap<PeerId, Instant>,
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Members verified once: redialled for good.
    known: HashMap<PeerId, Redial>,
    /// Peers other members told us about and we never verified, dialled with backoff until
    /// verified or given up on (`failures` counts the dials).
    introduced: HashMap<PeerId, Redial>,
}

impl PeerTable {
    pub(crate) fn new(redial_interval: Duration, proof_timeout: Duration) -> PeerTable {
        PeerTable {
            redial_interval,
            proof_timeout,
            pending: HashMap::new(),
            refused: HashMap::new(),
            addrs: HashMap::new(),
            known: HashMap::new(),
            introduced: HashMap::new(),
        }
    }

    /// A known member not connected now, at random, with its addresses: the connection a node
    /// adds now and then for the mesh's health (it mixes the graph of bounded connections and
    /// heals a partition once the network does).
    pub(crate) fn random_known(
        &self,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Option<(PeerId, Vec<Multiaddr>)> {
        use rand::seq::IteratorRandom as _;
        let peer = self
            .known
            .keys()
            .filter(|p| !connected(p) && !self.addrs(p).is_empty())
            .choose(&mut rand::thread_rng())?;
        Some((*peer, self.addrs(peer).to_vec()))
    }

    /// A member remembered from an earlier run: dialled at once.
    pub(crate) fn load_known(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) {
        self.addrs.insert(peer, addrs);
        self.known.insert(peer, Redial::now(now));
    }

    /// A peer's first connection opened and it is not a member yet: it has until the proof
    /// timeout to prove its membership.
    pub(crate) fn awaiting_proof(&mut self, peer: PeerId, now: Instant) {
        self.pending
            .entry(peer)
            .or_insert_with(|| now + self.proof_timeout);
    }

    /// A peer's last connection closed.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) {
        self.pending.remove(peer);
        self.refused.remove(peer);
    }

    /// A peer's proof verified: it is known from now on.
    pub(crate) fn verified(&mut self, peer: PeerId, now: Instant) {
        self.pending.remove(&peer);
        self.introduced.remove(&peer);
        self.known.insert(peer, Redial::now(now));
    }

    /// A peer's proof was refused. `cut_later`: an answer is on its way to it, so it is cut
    /// once its grace is over rather than now (the caller cuts it now otherwise).
    pub(crate) fn refused(&mut self, peer: PeerId, cut_later: bool, now: Instant) {
        self.pending.remove(&peer);
        self.introduced.remove(&peer);
        if cut_later {
            self.refused.insert(peer, now + REFUSAL_GRACE);
        }
    }

    /// A known member was unblocked: try it again now.
    pub(crate) fn unblocked(&mut self, peer: &PeerId, now: Instant) {
        if let Some(r) = self.known.get_mut(peer) {
            *r = Redial::now(now);
        }
    }

    /// Whether `peer` is a member this node has verified once.
    #[cfg(test)]
    pub(crate) fn is_known(&self, peer: &PeerId) -> bool {
        self.known.contains_key(peer)
    }

    /// Adds an address of `peer` (without its own trailing `/p2p/` part; a relayed address
    /// keeps its relay's), keeping at most [`MAX_ADDRS_PER_PEER`], the oldest dropped first.
    pub(crate) fn remember_addr(&mut self, peer: PeerId, mut addr: Multiaddr) {
        if let Some(Protocol::P2p(id)) = addr.iter().last() {
            if id != peer {
                // Another peer's address: not one to reach `peer` at.
                return;
            }
            addr.pop();
        }
        let list = self.addrs.entry(peer).or_default();
        if !list.contains(&addr) {
            if list.len() >= MAX_ADDRS_PER_PEER {
                list.remove(0);
            }
            list.push(addr);
        }
    }

    /// The addresses kept for `peer`.
    pub(crate) fn addrs(&self, peer: &PeerId) -> &[Multiaddr] {
        self.addrs.get(peer).map_or(&[], Vec::as_slice)
    }

    /// A member listed other members (peer exchange): returns whom to dial now, at most
    /// `room` (bounded connections: the others are only remembered, for a later tick or a dial
    /// on demand). One neither known nor connected becomes an introduction, dialled again with
    /// backoff if a dial fails; addresses are kept only for peers kept track of, so lists of
    /// made-up peer ids cannot grow the table without bound.
    pub(crate) fn introduce(
        &mut self,
        listed: Vec<(PeerId, Vec<Multiaddr>)>,
        me: &PeerId,
        connected: impl Fn(&PeerId) -> bool,
        now: Instant,
        room: usize,
    ) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut dials = Vec::new();
        for (other, addrs) in listed.into_iter().take(MAX_LISTED_MEMBERS) {
            if other == *me || connected(&other) {
                continue;
            }
            let addrs: Vec<Multiaddr> = addrs.into_iter().take(MAX_ADDRS_PER_PEER).collect();
            if !self.known.contains_key(&other) && self.introduced.len() < MAX_LISTED_MEMBERS {
                // New, or mentioned again: a fresh budget, the next dial now.
                self.introduced.insert(other, Redial::now(now));
            }
            if self.known.contains_key(&other) || self.introduced.contains_key(&other) {
                for a in &addrs {
                    self.remember_addr(other, a.clone());
                }
            }
            if dials.len() >= MAX_DIALS_AT_ONCE.min(room) {
                // Tracked (as an introduction or a known member): a later tick dials it.
                continue;
            }
            if let Some(r) = self.introduced.get_mut(&other) {
                r.tried(self.redial_interval, now);
            }
            dials.push((other, addrs));
        }
        dials
    }

    /// What is due at `now`: introductions and known members to dial (those not connected,
    /// with backoff; at most `room` of them, picked at random so that members spread their
    /// connections, but every one that is `always` kept connected), introductions given up on
    /// after [`MAX_INTRODUCTION_DIALS`] (their addresses dropped unless `is_member`), peers that
    /// did not prove their membership in time, and refused peers whose grace is over.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        connected: impl Fn(&PeerId) -> bool,
        is_member: impl Fn(&PeerId) -> bool,
        room: usize,
        always: impl Fn(&PeerId) -> bool,
    ) -> Due {
        let mut due = Due::default();
        let mut given_up = Vec::new();
        self.introduced.retain(|p, r| {
            let keep = r.next > now || r.failures < MAX_INTRODUCTION_DIALS;
            if !keep {
                given_up.push(*p);
            }
            keep
        });
        for p in given_up {
            if !self.known.contains_key(&p) && !is_member(&p) {
                self.addrs.remove(&p);
            }
        }
        due.unproven = take_due(&mut self.pending, now);
        due.refused = take_due(&mut self.refused, now);
        // Known members and introductions not connected whose backoff is over.
        let mut candidates: Vec<PeerId> = self
            .known
            .iter()
            .chain(self.introduced.iter())
            .filter(|(p, r)| r.next <= now && !connected(p))
            .map(|(p, _)| *p)
            .collect();
        candidates.sort();
        candidates.dedup();
        let (mut kept, mut others): (Vec<PeerId>, Vec<PeerId>) =
            candidates.into_iter().partition(|p| always(p));
        others.shuffle(&mut rand::thread_rng());
        kept.extend(others.into_iter().take(room.min(MAX_DIALS_AT_ONCE)));
        for peer in kept {
            let addrs = self.addrs(&peer).to_vec();
            if let Some(r) = self.introduced.get_mut(&peer) {
                r.tried(self.redial_interval, now);
            } else if let Some(r) = self.known.get_mut(&peer) {
                r.tried(self.redial_interval, now);
                if addrs.is_empty() {
                    continue;
                }
            }
            due.dials.push((peer, addrs));
        }
        due
    }
}

/// Removes and returns the peers whose deadline has come, in a stable order.
fn take_due(deadlines: &mut HashMap<PeerId, Instant>, now: Instant) -> Vec<PeerId> {
    let mut due: Vec<PeerId> = deadlines
        .iter()
        .filter(|(_, d)| **d <= now)
        .map(|(p, _)| *p)
        .collect();
    due.sort();
    for p in &due {
        deadlines.remove(p);
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIAL: Duration = Duration::from_millis(500);
    const PROOF: Duration = Duration::from_secs(5);
    /// Room for any number of dials (the bounded-connections test sets its own).
    const ROOM: usize = usize::MAX;

    fn peer(n: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .expect("32 bytes are an ed25519 secret")
            .public()
            .to_peer_id()
    }

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}")
            .parse()
            .expect("a multiaddr")
    }

    fn nobody(_: &PeerId) -> bool {
        false
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_peer_that_never_proves_its_membership_is_cut_at_its_deadline() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        t.awaiting_proof(peer(1), t0);
        // A second connection does not move the deadline.
        t.awaiting_proof(peer(1), ms(t0, 4_000));
        assert!(
            t.tick(ms(t0, 4_999), nobody, nobody, ROOM, nobody)
                .unproven
                .is_empty()
        );
        assert_eq!(
            t.tick(ms(t0, 5_000), nobody, nobody, ROOM, nobody).unproven,
            vec![peer(1)]
        );
        assert!(
            t.tick(ms(t0, 9_000), nobody, nobody, ROOM, nobody)
                .unproven
                .is_empty(),
            "once"
        );
        // One that proves it in time is not cut, and is known from then on.
        t.awaiting_proof(peer(2), t0);
        t.verified(peer(2), ms(t0, 100));
        assert!(
            t.tick(ms(t0, 6_000), nobody, nobody, ROOM, nobody)
                .unproven
                .is_empty()
        );
        assert!(t.is_known(&peer(2)));
    }

    #[test]
    fn a_refused_peer_is_cut_after_its_grace_or_at_once() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        t.awaiting_proof(peer(1), t0);
        t.refused(peer(1), true, t0);
        let due = t.tick(ms(t0, 10), nobody, nobody, ROOM, nobody);
        assert!(due.refused.is_empty() && due.unproven.is_empty());
        assert_eq!(
            t.tick(t0 + REFUSAL_GRACE, nobody, nobody, ROOM, nobody)
                .refused,
            vec![peer(1)]
        );
        // Without an answer owed, the caller cuts it at once: nothing is left due.
        t.awaiting_proof(peer(2), t0);
        t.refused(peer(2), false, t0);
        assert_eq!(
            t.tick(ms(t0, 60_000), nobody, nobody, ROOM, nobody),
            Due::default()
        );
    }

    #[test]
    fn an_introduction_is_dialled_with_backoff_then_given_up_and_forgotten() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        let me = peer(0);
        let dials = t.introduce(
            vec![(peer(1), vec![addr(1)]), (me, vec![addr(2)])],
            &me,
            nobody,
            t0,
            ROOM,
        );
        assert_eq!(dials, vec![(peer(1), vec![addr(1)])], "never itself");
        assert_eq!(t.addrs(&peer(1)), &[addr(1)]);
        // The dial failed: tried again at 2x, 4x, 8x, 16x, 16x the interval, then given up.
        let mut now = t0;
        let mut times = Vec::new();
        for _ in 0..400 {
            now += Duration::from_millis(100);
            let due = t.tick(now, nobody, nobody, ROOM, nobody);
            if !due.dials.is_empty() {
                times.push(now.duration_since(t0).as_millis());
            }
        }
        assert_eq!(times, vec![1_000, 3_000, 7_000, 15_000, 23_000]);
        assert!(t.addrs(&peer(1)).is_empty(), "its addresses left with it");
        // Mentioned again: a fresh budget.
        let dials = t.introduce(vec![(peer(1), vec![addr(1)])], &me, nobody, now, ROOM);
        assert_eq!(dials.len(), 1);
        assert_eq!(
            t.tick(now + REDIAL * 2, nobody, nobody, ROOM, nobody)
                .dials
                .len(),
            1
        );
    }

    #[test]
    fn known_members_are_redialled_for_good_with_capped_backoff() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        t.load_known(peer(1), vec![addr(1)], t0);
        assert_eq!(
            t.tick(t0, nobody, nobody, ROOM, nobody).dials,
            vec![(peer(1), vec![addr(1)])]
        );
        let connected = |p: &PeerId| *p == peer(1);
        assert!(
            t.tick(ms(t0, 60_000), connected, nobody, ROOM, nobody)
                .dials
                .is_empty(),
            "connected"
        );
        // Down: redialled at most every 16 intervals, never given up.
        let mut now = ms(t0, 60_000);
        let mut n = 0;
        for _ in 0..600 {
            now += Duration::from_millis(100);
            n += t.tick(now, nobody, nobody, ROOM, nobody).dials.len();
        }
        assert!(n >= 60_000 / 8_000, "{n} dials in a minute");
        assert!(n <= 60_000 / 8_000 + 3, "{n} dials in a minute");
        // Unblocked: tried at once.
        t.unblocked(&peer(1), now);
        assert_eq!(t.tick(now, nobody, nobody, ROOM, nobody).dials.len(), 1);
        // A known member is never an introduction: no budget runs out.
        let dials = t.introduce(vec![(peer(1), vec![addr(9)])], &peer(0), nobody, now, ROOM);
        assert_eq!(dials.len(), 1);
        assert!(t.addrs(&peer(1)).contains(&addr(9)));
    }

    #[test]
    fn a_relayed_address_keeps_its_relay_and_loses_only_the_peers_own_id() {
        let mut t = PeerTable::new(Duration::from_millis(500), Duration::from_secs(5));
        let (me, relay) = (peer(1), peer(2));
        let circuit: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{me}")
            .parse()
            .unwrap();
        t.remember_addr(me, circuit);
        let direct: Multiaddr = format!("/ip4/10.0.0.2/tcp/4001/p2p/{me}").parse().unwrap();
        t.remember_addr(me, direct);
        // Someone else's address is not kept for `me`.
        let other: Multiaddr = format!("/ip4/10.0.0.3/tcp/4001/p2p/{relay}")
            .parse()
            .unwrap();
        t.remember_addr(me, other);
        let kept: Vec<String> = t.addrs(&me).iter().map(|a| a.to_string()).collect();
        assert_eq!(
            kept,
            vec![
                format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit"),
                "/ip4/10.0.0.2/tcp/4001".to_string(),
            ]
        );
    }

    #[test]
    fn addresses_are_capped_and_lists_of_made_up_peers_are_bounded() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        for port in 0..40 {
            let a = addr(port).with(Protocol::P2p(peer(1)));
            t.remember_addr(peer(1), a);
        }
        assert_eq!(t.addrs(&peer(1)).len(), MAX_ADDRS_PER_PEER);
        assert_eq!(t.addrs(&peer(1))[0], addr(40 - MAX_ADDRS_PER_PEER as u16));
        let listed: Vec<(PeerId, Vec<Multiaddr>)> = (0..3000u32)
            .map(|i| {
                let p = libp2p::identity::Keypair::generate_ed25519()
                    .public()
                    .to_peer_id();
                (p, vec![addr((i % 60000) as u16)])
            })
            .collect();
        let dials = t.introduce(listed, &peer(0), nobody, t0, ROOM);
        assert_eq!(
            dials.len(),
            MAX_DIALS_AT_ONCE,
            "a list starts a few dials at once"
        );
        assert_eq!(
            t.introduced.len(),
            MAX_LISTED_MEMBERS,
            "a list is read up to its cap"
        );
        // The others are dialled by later ticks, a few at a time.
        let mut dialled = dials.len();
        for i in 1..200 {
            let due = t.tick(
                t0 + Duration::from_millis(10 * i),
                nobody,
                nobody,
                ROOM,
                nobody,
            );
            assert!(due.dials.len() <= MAX_DIALS_AT_ONCE, "{}", due.dials.len());
            dialled += due.dials.len();
        }
        assert!(dialled >= MAX_LISTED_MEMBERS, "{dialled} dials");
        assert!(t.introduced.len() <= MAX_LISTED_MEMBERS);
        assert!(t.addrs.len() <= MAX_LISTED_MEMBERS + 1);
    }

    #[test]
    fn with_bounded_connections_only_the_room_is_dialled_and_coordinators_always() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        for n in 1..=30 {
            t.load_known(peer(n), vec![addr(n as u16)], t0);
        }
        let coordinator = |p: &PeerId| *p == peer(30);
        let due = t.tick(t0, nobody, nobody, 3, coordinator);
        assert_eq!(due.dials.len(), 4, "three members and the coordinator");
        assert!(due.dials.iter().any(|(p, _)| *p == peer(30)));
        // No room: only the coordinator is redialled (after its backoff).
        let due = t.tick(ms(t0, 60_000), nobody, nobody, 0, coordinator);
        let dialled: Vec<PeerId> = due.dials.iter().map(|(p, _)| *p).collect();
        assert_eq!(dialled, vec![peer(30)]);
        // Introductions wait for room as well, and are remembered meanwhile.
        let me = peer(0);
        let listed: Vec<(PeerId, Vec<Multiaddr>)> =
            (40..50).map(|n| (peer(n), vec![addr(n as u16)])).collect();
        let dials = t.introduce(listed, &me, nobody, t0, 0);
        assert!(dials.is_empty());
        assert_eq!(t.addrs(&peer(45)), &[addr(45)]);
        // Picked at random: two tables with the same peers do not all dial the same ones.
        let picks: std::collections::HashSet<PeerId> = (0..20)
            .flat_map(|_| {
                let mut t = PeerTable::new(REDIAL, PROOF);
                for n in 1..=30 {
                    t.load_known(peer(n), vec![addr(n as u16)], t0);
                }
                t.tick(t0, nobody, nobody, 2, nobody)
                    .dials
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(picks.len() > 4, "{} distinct peers picked", picks.len());
    }

    #[test]
    fn a_random_known_member_is_one_not_connected_with_addresses() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(REDIAL, PROOF);
        assert!(t.random_known(nobody).is_none());
        t.load_known(peer(1), vec![addr(1)], t0);
        t.load_known(peer(2), vec![addr(2)], t0);
        t.load_known(peer(3), Vec::new(), t0);
        let connected = |p: &PeerId| *p == peer(1);
        for _ in 0..20 {
            assert_eq!(t.random_known(connected), Some((peer(2), vec![addr(2)])));
        }
    }
}
