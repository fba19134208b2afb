//! The address book: where to reach members this node is not connected to.
//!
//! With bounded connections a node is connected to a few members only; any other it reaches on
//! demand (a task for its endpoint, a registry sync, a transfer) by dialling it by peer id. The
//! swarm asks every behaviour for the addresses of a peer it dials by id; this one answers from
//! what the event loop told it: addresses the registry's signed node records publish, those
//! peers listed in member exchanges, and those seen on connections. Reaching an address proves
//! nothing: every connection is still verified by the membership protocol.

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::peers::MAX_ADDRS_PER_PEER;

/// Most peers the book holds: a federation's members, with room to spare.
pub(crate) const MAX_PEERS: usize = 100_000;

/// The address book behaviour.
#[derive(Default)]
pub(crate) struct Book {
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

impl Book {
    /// Sets `peer`'s addresses (at most [`MAX_ADDRS_PER_PEER`]); an empty list removes it.
    pub(crate) fn set(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>) {
        addrs.truncate(MAX_ADDRS_PER_PEER);
        if addrs.is_empty() {
            self.addrs.remove(&peer);
        } else if self.addrs.len() < MAX_PEERS || self.addrs.contains_key(&peer) {
            self.addrs.insert(peer, addrs);
        }
    }

    /// The addresses known for `peer`.
    pub(crate) fn get(&self, peer: &PeerId) -> &[Multiaddr] {
        self.addrs.get(peer).map_or(&[], Vec::as_slice)
    }

    /// How many peers it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.addrs.len()
    }
}

impl NetworkBehaviour for Book {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map(|p| self.get(&p).to_vec()).unwrap_or_default())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn a_dial_by_peer_id_gets_the_addresses_the_book_holds() {
        let mut book = Book::default();
        let (known, unknown) = (peer(), peer());
        let addrs: Vec<Multiaddr> = (0..40)
            .map(|p| format!("/ip4/127.0.0.1/tcp/{}", 1000 + p).parse().unwrap())
            .collect();
        book.set(known, addrs.clone());
        let mut dial = |peer: PeerId| {
            book.handle_pending_outbound_connection(
                ConnectionId::new_unchecked(1),
                Some(peer),
                &[],
                Endpoint::Dialer,
            )
            .unwrap()
        };
        assert_eq!(dial(known), addrs[..MAX_ADDRS_PER_PEER].to_vec(), "capped");
        let none = dial(unknown);
        assert!(none.is_empty());
        book.set(known, Vec::new());
        assert_eq!(book.len(), 0, "an empty list removes the peer");
    }
}
