//! The data plane through a relay. A member that cannot be reached directly (behind NAT, or a
//! firewall that lets out only the coordinator) is still connected to the others through the
//! mesh, perhaps over the coordinator's relay. [`TunnelSocket`] is a UDP socket for quinn whose
//! datagrams travel as frames (a 2-byte length, then the datagram) on one byte stream per peer,
//! opened through the mesh; peers get made-up addresses ([`tunnel_addr`]) that mean something
//! only to this socket. Everything above it is the data plane as it is: QUIC, TLS with the
//! libp2p identity checked on both sides, the same requests. Slower than a direct path (every
//! byte crosses the relay and two stream layers), but it works wherever the mesh does.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use libp2p::PeerId;
use quinn::udp::{RecvMeta, Transmit};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// A byte stream to a peer, as the mesh opens or accepts it.
pub trait TunnelStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> TunnelStream for T {}

/// A boxed [`TunnelStream`].
pub type BoxStream = Box<dyn TunnelStream>;

/// Opens streams to peers (the node gives the mesh's).
pub trait Tunnel: Send + Sync + 'static {
    /// A new stream to `peer`.
    fn open(
        &self,
        peer: PeerId,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<BoxStream, String>> + Send>>;
}

/// Datagrams waiting to be written to one peer's stream; more are dropped (QUIC sends again).
const SEND_QUEUE: usize = 1024;
/// Datagrams received and not yet taken by quinn.
const RECV_QUEUE: usize = 4096;

/// The made-up address of `peer` on the tunnel: an address in `fd00::/8` from its peer id.
pub fn tunnel_addr(peer: &PeerId) -> SocketAddr {
    // The last bytes of a peer id are its public key's: distinct for distinct peers.
    let id = peer.to_bytes();
    let tail = &id[id.len().saturating_sub(15)..];
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[16 - tail.len()..].copy_from_slice(tail);
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(octets), 1, 0, 0))
}

/// quinn's socket for the tunnel.
pub struct TunnelSocket {
    me: SocketAddr,
    this: Weak<TunnelSocket>,
    tunnel: Arc<dyn Tunnel>,
    /// Tunnel address → peer, for every peer dialled or heard from.
    peers: Mutex<HashMap<SocketAddr, PeerId>>,
    /// Per peer: the queue of its stream's writer (the latest stream, when there are two).
    senders: Mutex<HashMap<PeerId, mpsc::Sender<Bytes>>>,
    incoming: mpsc::Sender<(SocketAddr, Bytes)>,
    received: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
}

impl std::fmt::Debug for TunnelSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSocket")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl TunnelSocket {
    /// The socket of node `me`, opening streams with `tunnel`.
    pub fn new(me: PeerId, tunnel: Arc<dyn Tunnel>) -> Arc<TunnelSocket> {
        let (incoming, received) = mpsc::channel(RECV_QUEUE);
        Arc::new_cyclic(|this| TunnelSocket {
            me: tunnel_addr(&me),
            this: this.clone(),
            tunnel,
            peers: Mutex::default(),
            senders: Mutex::default(),
            incoming,
            received: Mutex::new(received),
        })
    }

    /// Makes `peer` reachable at [`tunnel_addr`]`(peer)`; returns that address.
    pub fn knows(&self, peer: PeerId) -> SocketAddr {
        let addr = tunnel_addr(&peer);
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, peer);
        addr
    }

    /// Takes a stream `peer` opened: its frames are datagrams from `peer`, and datagrams to
    /// `peer` go out on it.
    pub fn accept(&self, peer: PeerId, stream: BoxStream) {
        self.knows(peer);
        self.attach(peer, stream);
    }

    fn attach(&self, peer: PeerId, stream: BoxStream) {
        let (tx, rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, tx.clone());
        self.run(peer, stream, tx, rx);
    }

    /// Reads `peer`'s datagrams from `stream` and writes those queued in `rx` to it.
    fn run(
        &self,
        peer: PeerId,
        stream: BoxStream,
        tx: mpsc::Sender<Bytes>,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let from = tunnel_addr(&peer);
        let incoming = self.incoming.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            loop {
                if reader.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut datagram = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if reader.read_exact(&mut datagram).await.is_err() {
                    return;
                }
                if incoming.send((from, Bytes::from(datagram))).await.is_err() {
                    return;
                }
            }
        });
        let this = self.this.clone();
        tokio::spawn(async move {
            while let Some(datagram) = rx.recv().await {
                let Ok(len) = u16::try_from(datagram.len()) else {
                    continue;
                };
                let mut failed = writer.write_all(&len.to_be_bytes()).await.is_err()
                    || writer.write_all(&datagram).await.is_err();
                if !failed && rx.is_empty() {
                    failed = writer.flush().await.is_err();
                }
                if failed {
                    break;
                }
            }
            // The stream broke: forget its queue (unless a newer stream replaced it), so that
            // the next datagram opens another.
            if let Some(socket) = this.upgrade() {
                let mut senders = socket.senders.lock().unwrap_or_else(|e| e.into_inner());
                if senders.get(&peer).is_some_and(|s| s.same_channel(&tx)) {
                    senders.remove(&peer);
                }
            }
        });
    }

    /// Opens a stream to `peer` in the background, queueing `first` and what follows until it
    /// is open (QUIC's first handshake packets would otherwise wait out a retransmission).
    fn open(&self, peer: PeerId, first: Bytes) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        let (tx, rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        let _ = tx.try_send(first);
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, tx.clone());
        tokio::spawn(async move {
            let opened = this.tunnel.open(peer).await;
            match opened {
                Ok(stream) => this.run(peer, stream, tx, rx),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no tunnel stream");
                    let mut senders = this.senders.lock().unwrap_or_else(|e| e.into_inner());
                    if senders.get(&peer).is_some_and(|s| s.same_channel(&tx)) {
                        senders.remove(&peer);
                    }
                }
            }
        });
    }
}

/// Always writable: a full queue drops the datagram instead of waiting.
#[derive(Debug)]
struct Writable;

impl quinn::UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let peer = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&transmit.destination)
            .copied();
        let Some(peer) = peer else {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no peer at this tunnel address",
            ));
        };
        let sender = self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .cloned();
        match sender {
            Some(tx) => {
                // One datagram per transmit (no segmentation offload on this socket).
                let _ = tx.try_send(Bytes::copy_from_slice(transmit.contents));
            }
            None => self.open(peer, Bytes::copy_from_slice(transmit.contents)),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        match received.poll_recv(cx) {
            Poll::Ready(Some((from, datagram))) => {
                let len = datagram.len().min(buf.len());
                buf[..len].copy_from_slice(&datagram[..len]);
                *m = RecvMeta {
                    addr: from,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                Poll::Ready(Ok(1))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnel socket is closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.me)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
