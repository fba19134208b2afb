//! The data plane's QUIC endpoint: blobs between members, directly.
//!
//! Every node binds one `quinn` endpoint on a UDP port of its own. Both sides of a connection
//! present their libp2p identity in the TLS handshake (`libp2p-tls` certificates): the client
//! checks that the server is the peer it meant to reach, and the server's certificate verifier
//! accepts a client only if `admit` says its peer id is a verified member, so that anyone else
//! fails the handshake itself.
//!
//! The protocol, one request per bidirectional stream: the requester writes a length-prefixed
//! JSON [`Request`] and finishes its side; the server answers a length-prefixed JSON
//! [`Response`] and, for a `Get`, the verified stream of the chunk groups asked for
//! ([`BlobStore::encode`]). The requester checks every group as it arrives
//! ([`BlobStore::receive`]) and asks again for whatever is still missing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::blob::{BlobStore, Hash, Partial};
use crate::files::RootsSlot;
use crate::root::Entry;
pub use crate::wire::{
    Error, FileHash, MAX_HEADER, MAX_PATHS, MAX_RANGES, MAX_RESPONSE, MAX_WALK, Request, Response,
    VERSION, check, chunk_ranges, decode_header, read_header, version,
};
use crate::wire::{ask, bridge, ranges_of, refuse, write_header};

/// Decides whether a peer that completed the handshake may use this node's data plane.
pub type Admit = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// A node's data-plane endpoint.
#[derive(Clone)]
pub struct DataPlane {
    endpoint: quinn::Endpoint,
    keypair: Keypair,
    store: BlobStore,
    /// Connections that completed the handshake on the server side.
    established: Arc<std::sync::atomic::AtomicU64>,
    /// Test hook: blob streams still to corrupt on the way out.
    corrupt: Arc<std::sync::atomic::AtomicU64>,
    /// This node's data roots, once the node serves them.
    roots: RootsSlot,
    /// This node's copy desk, once it runs one.
    desk: crate::files::DeskSlot,
    /// This node's other services, once it serves them.
    services: crate::files::ServicesSlot,
    /// Open connections to peers, reused by every call.
    conns: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, quinn::Connection>>>,
    /// One connection attempt per peer at a time: callers that find none open wait for the
    /// first attempt and share its connection.
    dialing: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>>,
    /// One fetch of a blob at a time: a second waits for the first, then finds what it left.
    fetching: Arc<std::sync::Mutex<std::collections::HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>>,
    /// What serving a connection needs (for the tunnel's endpoint too).
    serve: Serve,
    /// The data plane through the mesh ([`crate::tunnel`]), once the node gives it a tunnel.
    tunnel: Arc<std::sync::OnceLock<Tunneled>>,
    /// Open connections to peers through the tunnel.
    tunneled: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, quinn::Connection>>>,
    /// One tunnel connection attempt per peer at a time (apart from direct ones: they race).
    tunnel_dialing:
        Arc<std::sync::Mutex<std::collections::HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>>,
}

/// The tunnel's endpoint and socket.
struct Tunneled {
    endpoint: quinn::Endpoint,
    socket: Arc<crate::tunnel::TunnelSocket>,
}

/// What the accept loop of an endpoint needs.
#[derive(Clone)]
struct Serve {
    store: BlobStore,
    corrupt: Arc<std::sync::atomic::AtomicU64>,
    roots: RootsSlot,
    desk: crate::files::DeskSlot,
    services: crate::files::ServicesSlot,
    outboards: Arc<crate::files::Outboards>,
    admit: Admit,
    established: Arc<std::sync::atomic::AtomicU64>,
    per_peer: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, usize>>>,
    /// The server configuration for loopback and tunnel paths (no segmentation offload, the
    /// largest datagrams).
    local: Arc<quinn::ServerConfig>,
}

/// How long a connection's handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a direct connection has before one through the mesh's tunnel races it (a LAN or
/// internet handshake takes a round trip or two; an address behind NAT never answers).
const TUNNEL_AFTER: Duration = Duration::from_millis(1500);

/// Largest UDP payload the data plane accepts, and sends on a loopback path.
const MAX_DATAGRAM: u16 = 65_000;

/// Largest UDP payload sent on any other path. quinn hands the kernel up to 10 datagrams in one
/// segmentation-offload (GSO) write, and Linux refuses a write past 64 KiB: with larger
/// datagrams every batch would be dropped, counted as loss, and the path MTU reset to 1,200
/// bytes. A 1,500-byte path settles at 1,452 as before; jumbo frames go up to this.
const MAX_GSO_DATAGRAM: u16 = 6_500;

/// The QUIC transport for a path to a peer. On `loopback` (two nodes on one machine: testnets,
/// benchmarks) datagrams of up to 65,000 bytes, one per system call; elsewhere
/// segmentation offload with datagrams of at most [`MAX_GSO_DATAGRAM`].
fn transport(loopback: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Windows large enough for a loopback or LAN path to stay full.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // Path MTU discovery past Ethernet's 1,452 bytes where the path allows: fewer, larger
    // datagrams cost fewer system calls and less per-packet work.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    if loopback {
        mtu.upper_bound(MAX_DATAGRAM);
        t.enable_segmentation_offload(false);
    } else {
        mtu.upper_bound(MAX_GSO_DATAGRAM);
    }
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// How much a data plane's UDP socket buffers in each direction.
const SOCKET_BUFFER: usize = 64 << 20;

/// Sizes the socket's buffers for large datagrams: the kernel's default (about 208 KiB) holds
/// three 65,000-byte datagrams, so a burst overflows it, the datagrams are dropped and the
/// congestion controller slows down. Forced past `net.core.rmem_max` where the process may
/// (CAP_NET_ADMIN), else as large as that limit allows.
fn socket_buffers(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER);
    }
}

/// Splits `set` into at most `n` parts of about equal size, on chunk-group boundaries.
fn split(set: &bao_tree::ChunkRanges, size: u64, n: usize) -> Vec<bao_tree::ChunkRanges> {
    use bao_tree::{ChunkNum, ChunkRanges};
    let group = 1u64 << crate::blob::BLOCK_SIZE.chunk_log();
    let spans = ranges_of(set, size);
    let total: u64 = spans.iter().map(|(a, b)| b - a).sum();
    let per = total.div_ceil(n.max(1) as u64).div_ceil(group).max(1) * group;
    let mut parts = Vec::new();
    let mut cur = ChunkRanges::empty();
    let mut room = per;
    for (mut a, b) in spans {
        while a < b {
            let take = (b - a).min(room);
            cur |= ChunkRanges::from(ChunkNum(a)..ChunkNum(a + take));
            a += take;
            room -= take;
            if room == 0 {
                parts.push(std::mem::replace(&mut cur, ChunkRanges::empty()));
                room = per;
            }
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

/// The server's check of a client's certificate: a valid libp2p certificate (self-signed,
/// carrying the peer's identity key and its signature) of a peer `admit` accepts. Anyone else
/// fails the TLS handshake itself.
struct MembersOnly {
    admit: Admit,
}

impl std::fmt::Debug for MembersOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MembersOnly")
    }
}

fn tls_error(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

impl rustls::server::danger::ClientCertVerifier for MembersOnly {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(tls_error(
                "a libp2p client presents exactly one certificate",
            ));
        }
        let cert = libp2p_tls::certificate::parse(end_entity).map_err(tls_error)?;
        if !(self.admit)(&cert.peer_id()) {
            return Err(tls_error(format!(
                "{} is not a member of this federation",
                cert.peer_id()
            )));
        }
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(tls_error("only TLS 1.3 is offered"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        libp2p_tls::certificate::parse(cert)
            .map_err(tls_error)?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(tls_error)?;
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![
            rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            rustls::SignatureScheme::ED25519,
        ]
    }
}

/// The server's TLS: libp2p's certificate for this node, TLS 1.3 only, ALPN `libp2p`, and
/// clients checked by [`MembersOnly`].
fn server_tls(keypair: &Keypair, admit: Admit) -> Result<rustls::ServerConfig, Error> {
    let setup = |e: &dyn std::fmt::Display| Error::Setup(e.to_string());
    let (cert, key) = libp2p_tls::certificate::generate(keypair).map_err(|e| setup(&e))?;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // AES-GCM first, and the server's order wins: with AES-NI it costs a fraction of
    // ChaCha20-Poly1305 per byte (a profile of a 1 GiB fetch spent 16 % of its time in ChaCha).
    provider.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    // The certificate carries libp2p's critical extension, which webpki's checks of
    // `with_single_cert` refuse: resolve it directly.
    let signing =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| setup(&e))?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signing));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(&e))?
        .with_client_cert_verifier(Arc::new(MembersOnly { admit }))
        .with_cert_resolver(Arc::new(OwnCert(certified)));
    tls.alpn_protocols = vec![b"libp2p".to_vec()];
    tls.ignore_client_order = true;
    Ok(tls)
}

/// Always this node's libp2p certificate.
#[derive(Debug)]
struct OwnCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The peer id a connection's client presented in its certificate.
fn peer_of(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = certs.first()?;
    libp2p_tls::certificate::parse(cert)
        .ok()
        .map(|c| c.peer_id())
}

/// Accepts `endpoint`'s connections from members and serves them, until it closes.
fn accept_loop(endpoint: quinn::Endpoint, serve: Serve) {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let server = Server {
                    store: serve.store.clone(),
                    corrupt: serve.corrupt.clone(),
                    serving: crate::files::Serving {
                        roots: serve.roots.clone(),
                        desk: serve.desk.clone(),
                        services: serve.services.clone(),
                        outboards: serve.outboards.clone(),
                        corrupt: serve.corrupt.clone(),
                    },
                };
                let accepted = if incoming.remote_address().ip().is_loopback() {
                    incoming.accept_with(serve.local.clone())
                } else {
                    incoming.accept()
                };
                let Ok(conn) = (match accepted {
                    Ok(connecting) => connecting.await,
                    Err(e) => Err(e),
                }) else {
                    return;
                };
                serve
                    .established
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The handshake admitted only members; checked again, in case membership
                // ended in between.
                let peer = match peer_of(&conn) {
                    Some(peer) if (serve.admit)(&peer) => peer,
                    _ => return conn.close(quinn::VarInt::from_u32(1), b"not a member"),
                };
                // A member's requests are bounded per connection (streams); its connections are
                // bounded here.
                let Some(_slot) = ConnSlot::take(&serve.per_peer, peer) else {
                    return conn.close(
                        quinn::VarInt::from_u32(3),
                        b"too many connections from this member",
                    );
                };
                server.serve(conn, peer).await;
            });
        }
    });
}

impl DataPlane {
    /// Binds the endpoint on `addr` (port 0: any) and serves `store` to the peers `admit`
    /// accepts, until the endpoint is dropped.
    pub fn bind(
        keypair: &Keypair,
        addr: SocketAddr,
        store: BlobStore,
        admit: Admit,
    ) -> Result<DataPlane, Error> {
        let setup = |e: &dyn std::fmt::Display| Error::Setup(e.to_string());
        let tls = server_tls(keypair, admit.clone())?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| setup(&e))?;
        let crypto: Arc<dyn quinn::crypto::ServerConfig> = Arc::new(crypto);
        let mut server = quinn::ServerConfig::with_crypto(crypto.clone());
        server.transport_config(transport(false));
        // The same, for peers on loopback (see `transport`).
        let mut local = quinn::ServerConfig::with_crypto(crypto);
        local.transport_config(transport(true));
        let local = Arc::new(local);
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(MAX_DATAGRAM)
            .map_err(|e| setup(&e))?;
        let socket = std::net::UdpSocket::bind(addr).map_err(|e| setup(&e))?;
        socket_buffers(&socket);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::Setup("no async runtime for the data plane".into()))?;
        let endpoint =
            quinn::Endpoint::new(config, Some(server), socket, runtime).map_err(|e| setup(&e))?;
        let established = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let corrupt = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let roots: RootsSlot = Arc::default();
        let desk: crate::files::DeskSlot = Arc::default();
        let services: crate::files::ServicesSlot = Arc::default();
        let serve = Serve {
            store: store.clone(),
            corrupt: corrupt.clone(),
            roots: roots.clone(),
            desk: desk.clone(),
            services: services.clone(),
            outboards: Arc::new(crate::files::Outboards::default()),
            admit,
            established: established.clone(),
            per_peer: Arc::default(),
            local,
        };
        let plane = DataPlane {
            endpoint: endpoint.clone(),
            keypair: keypair.clone(),
            store,
            established,
            corrupt,
            roots,
            desk,
            services,
            conns: Arc::default(),
            dialing: Arc::default(),
            fetching: Arc::default(),
            serve: serve.clone(),
            tunnel: Arc::default(),
            tunneled: Arc::default(),
            tunnel_dialing: Arc::default(),
        };
        accept_loop(endpoint, serve);
        Ok(plane)
    }

    /// Carries the data plane through `tunnel` (the mesh's streams, perhaps over a relay) to a
    /// peer whose data address cannot be reached: a connection that fails directly is tried
    /// again through it, and streams peers open through it are served like direct connections.
    pub fn use_tunnel(&self, tunnel: Arc<dyn crate::tunnel::Tunnel>) -> Result<(), Error> {
        let setup = |e: &dyn std::fmt::Display| Error::Setup(e.to_string());
        let me = self.keypair.public().to_peer_id();
        let socket = crate::tunnel::TunnelSocket::new(me, tunnel);
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(MAX_DATAGRAM)
            .map_err(|e| setup(&e))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::Setup("no async runtime for the data plane".into()))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            config,
            Some((*self.serve.local).clone()),
            socket.clone(),
            runtime,
        )
        .map_err(|e| setup(&e))?;
        if self
            .tunnel
            .set(Tunneled {
                endpoint: endpoint.clone(),
                socket,
            })
            .is_err()
        {
            return Err(Error::Setup("the data plane already has a tunnel".into()));
        }
        accept_loop(endpoint, self.serve.clone());
        Ok(())
    }

    /// A stream `peer` opened through the tunnel.
    pub fn tunnel_stream(&self, peer: PeerId, stream: crate::tunnel::BoxStream) {
        if let Some(t) = self.tunnel.get() {
            t.socket.accept(peer, stream);
        }
    }

    /// Serves `roots` (this node's endpoints' data roots) to members from now on.
    pub fn serve_roots(&self, roots: Arc<dyn crate::files::Roots>) {
        *self
            .roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(roots);
    }

    /// Answers members' calls to other services through `services` from now on.
    pub fn serve_services(&self, services: Arc<dyn crate::files::Services>) {
        *self
            .services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(services);
    }

    /// Runs copies other members ask for through `desk` from now on.
    pub fn serve_desk(&self, desk: Arc<dyn crate::files::Desk>) {
        *self
            .desk
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(desk);
    }

    /// Test hook: corrupt one byte in each of the next `n` blob streams this node sends (to
    /// show that receivers detect it and ask again).
    #[doc(hidden)]
    pub fn corrupt_next_sends(&self, n: u64) {
        self.corrupt.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
        if let Some(t) = self.tunnel.get() {
            t.endpoint
                .close(quinn::VarInt::from_u32(0), b"node stopping");
        }
        self.tunneled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        // The hooks hold the node's jobs and through them its store; the jobs hold this plane.
        *self
            .roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        *self
            .desk
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        *self
            .services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// How many connections completed the handshake on this node's server side.
    pub fn established(&self) -> u64 {
        self.established.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::Setup(e.to_string()))
    }

    /// The open connection to `peer` at `addr`, if there is one.
    fn open(&self, peer: PeerId, addr: SocketAddr) -> Option<quinn::Connection> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&peer)
            .filter(|c| c.close_reason().is_none() && c.remote_address() == addr)
            .cloned()
    }

    /// A connection to `peer` at `addr`: the open one if there is one, else a new one.
    pub(crate) async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, Error> {
        if let Some(conn) = self.open(peer, addr) {
            return Ok(conn);
        }
        if let Some(conn) = self.open_tunneled(peer) {
            return Ok(conn);
        }
        if self.tunnel.get().is_none() {
            return self.dial(peer, addr).await;
        }
        // Directly if the address answers; through the mesh if it does not answer soon (NAT, a
        // firewall): the tunnel joins the race after TUNNEL_AFTER, the first connection wins.
        let direct = self.dial(peer, addr);
        tokio::pin!(direct);
        let direct_failed = tokio::select! {
            r = &mut direct => match r {
                Ok(conn) => return Ok(conn),
                Err(e) => Some(e),
            },
            () = tokio::time::sleep(TUNNEL_AFTER) => None,
        };
        let through = self.dial_tunneled(peer);
        tokio::pin!(through);
        let (direct, through) = match direct_failed {
            Some(e) => (e, through.await),
            None => tokio::select! {
                r = &mut direct => match r {
                    Ok(conn) => return Ok(conn),
                    Err(e) => (e, through.await),
                },
                r = &mut through => match r {
                    Ok(conn) => return Ok(conn),
                    Err(t) => match direct.await {
                        Ok(conn) => return Ok(conn),
                        Err(e) => (e, Err(t)),
                    },
                },
            },
        };
        through.map_err(|t| Error::Connect {
            peer,
            reason: format!("{direct}; through the mesh: {t}"),
        })
    }

    fn open_tunneled(&self, peer: PeerId) -> Option<quinn::Connection> {
        self.tunneled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn dial_tunneled(&self, peer: PeerId) -> Result<quinn::Connection, Error> {
        let Some(tunnel) = self.tunnel.get() else {
            return Err(Error::Connect {
                peer,
                reason: "no tunnel".into(),
            });
        };
        let lock = {
            let mut m = self
                .tunnel_dialing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            m.retain(|_, l| Arc::strong_count(l) > 1);
            m.entry(peer).or_default().clone()
        };
        let _one = lock.lock().await;
        if let Some(conn) = self.open_tunneled(peer) {
            return Ok(conn);
        }
        let addr = tunnel.socket.knows(peer);
        let conn = self.handshake(&tunnel.endpoint, peer, addr, true).await?;
        self.tunneled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, conn.clone());
        Ok(conn)
    }

    /// Opens a connection to `peer`, one attempt at a time per peer.
    async fn dial(&self, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection, Error> {
        let lock = {
            let mut m = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, l| Arc::strong_count(l) > 1);
            m.entry(peer).or_default().clone()
        };
        let _one = lock.lock().await;
        if let Some(conn) = self.open(peer, addr) {
            return Ok(conn);
        }
        let conn = self.connect_new(peer, addr).await?;
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, conn.clone());
        Ok(conn)
    }

    async fn connect_new(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, Error> {
        self.handshake(&self.endpoint, peer, addr, addr.ip().is_loopback())
            .await
    }

    /// A new connection to `peer` at `addr` through `endpoint`; `local`: a loopback or tunnel
    /// path (the largest datagrams, no segmentation offload).
    async fn handshake(
        &self,
        endpoint: &quinn::Endpoint,
        peer: PeerId,
        addr: SocketAddr,
        local: bool,
    ) -> Result<quinn::Connection, Error> {
        let fail = |reason: String| Error::Connect { peer, reason };
        let tls = libp2p_tls::make_client_config(&self.keypair, Some(peer))
            .map_err(|e| fail(e.to_string()))?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| fail(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport(local));
        // The server name is not checked (libp2p-tls checks the peer id instead).
        let connecting = endpoint
            .connect_with(client, addr, "l")
            .map_err(|e| fail(e.to_string()))?;
        // A handshake takes a round trip or two: an address where nothing answers (a node that
        // restarted elsewhere) fails in seconds, not at the idle timeout.
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(r) => r.map_err(|e| fail(e.to_string())),
            Err(_) => Err(fail(format!(
                "no answer from {addr} within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The lock that keeps fetches of `hash` from running at once (both would write its partial
    /// files); locks no one holds are dropped on the way.
    fn blob_lock(&self, hash: Hash) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(hash).or_default().clone()
    }

    /// Fetches blob `hash` from several members that hold it at once: the missing chunk groups
    /// are split among the sources that answer, each part on its own stream; a part whose
    /// source fails goes to the next source (up to `attempts` rounds). Returns the blob's size
    /// and the bytes of data received.
    pub async fn fetch_many(
        &self,
        sources: &[(PeerId, SocketAddr)],
        hash: Hash,
        attempts: usize,
    ) -> Result<(u64, u64), Error> {
        let lock = self.blob_lock(hash);
        let _one = lock.lock().await;
        // Who holds it, and its size (sources that disagree on the size are left out).
        let mut live = Vec::new();
        let mut size = None;
        let mut last_err = None;
        for &(peer, addr) in sources {
            let stat = async {
                let conn = self.connect(peer, addr).await?;
                ask(
                    &conn,
                    &Request::Stat {
                        v: VERSION,
                        hash: hash.to_string(),
                    },
                )
                .await
            };
            match stat.await {
                Ok((Response::Found { size: s }, _)) if size.is_none_or(|z| z == s) => {
                    size = Some(s);
                    live.push((peer, addr));
                }
                Ok((Response::Refused { reason }, _)) => {
                    last_err = Some(Error::Refused { peer, reason })
                }
                Ok((other, _)) => {
                    last_err = Some(Error::Protocol(format!(
                        "{peer} answered {other:?} to a blob request"
                    )))
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some(size) = size else {
            return Err(last_err.unwrap_or_else(|| Error::Setup("no source to fetch from".into())));
        };
        let mut received = 0u64;
        for round in 0..attempts.max(1) {
            let store = self.store.clone();
            let missing = tokio::task::spawn_blocking(move || store.finish(&hash, size))
                .await
                .map_err(|e| Error::Protocol(e.to_string()))??;
            if missing.is_empty() {
                return Ok((size, received));
            }
            if live.is_empty() {
                break;
            }
            let parts = split(&missing, size, live.len());
            let fetches = parts.into_iter().enumerate().map(|(i, part)| {
                // Each round shifts the assignment, so that a part whose source failed goes
                // to another one.
                let (peer, addr) = live[(i + round) % live.len()];
                let store = self.store.clone();
                async move {
                    let conn = self.connect(peer, addr).await?;
                    let ranges = ranges_of(&part, size);
                    let (head, recv) = ask(
                        &conn,
                        &Request::Get {
                            v: VERSION,
                            hash: hash.to_string(),
                            ranges,
                            // After a failed round: the source checks its copy first.
                            check: round > 0,
                        },
                    )
                    .await?;
                    match head {
                        Response::Found { size: s } if s == size => {}
                        Response::Refused { reason } => {
                            return Err(Error::Refused { peer, reason });
                        }
                        other => {
                            return Err(Error::Protocol(format!(
                                "{peer} answered {other:?} to a blob request"
                            )));
                        }
                    }
                    let (reader, pump) = bridge::reader(recv);
                    let got = tokio::task::spawn_blocking(move || {
                        store.receive_part(&hash, size, &part, reader)
                    })
                    .await
                    .map_err(|e| Error::Protocol(e.to_string()));
                    pump.abort();
                    Ok::<u64, Error>(got??)
                }
            });
            for outcome in futures::future::join_all(fetches).await {
                match outcome {
                    Ok(n) => received += n,
                    Err(e) => {
                        tracing::debug!(%hash, error = %e, "one source of a blob failed");
                        last_err = Some(e);
                    }
                }
            }
        }
        let store = self.store.clone();
        let missing = tokio::task::spawn_blocking(move || store.finish(&hash, size))
            .await
            .map_err(|e| Error::Protocol(e.to_string()))??;
        if missing.is_empty() {
            return Ok((size, received));
        }
        Err(last_err.unwrap_or_else(|| {
            Error::Protocol(format!(
                "blob {hash} still incomplete after {attempts} rounds"
            ))
        }))
    }

    /// Fetches blob `hash` from `peer` at `addr` into this node's store, asking only for what
    /// the store is missing and asking again after a chunk group that does not verify (up to
    /// `attempts` rounds). Returns the blob's size and the bytes of data received.
    pub async fn fetch(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        hash: Hash,
        attempts: usize,
    ) -> Result<(u64, u64), Error> {
        let lock = self.blob_lock(hash);
        let _one = lock.lock().await;
        let conn = self.connect(peer, addr).await?;
        let size = match ask(
            &conn,
            &Request::Stat {
                v: VERSION,
                hash: hash.to_string(),
            },
        )
        .await?
        {
            (Response::Found { size }, _) => size,
            (Response::Refused { reason }, _) => return Err(Error::Refused { peer, reason }),
            (other, _) => {
                return Err(Error::Protocol(format!(
                    "{peer} answered {other:?} to a blob request"
                )));
            }
        };
        let mut received = 0;
        let mut last = None;
        let store = self.store.clone();
        let mut missing = tokio::task::spawn_blocking(move || store.missing(&hash, size))
            .await
            .map_err(|e| Error::Protocol(e.to_string()))??;
        for round in 0..attempts.max(1) {
            if missing.is_empty() {
                break;
            }
            // Several streams at once, each with its own blocking receiver: verifying and
            // writing a large blob then uses more than one core at each end.
            let parts = split(&missing, size, streams_for(size));
            let fetches = parts.into_iter().map(|part| {
                let store = self.store.clone();
                let conn = conn.clone();
                async move {
                    let (head, recv) = ask(
                        &conn,
                        &Request::Get {
                            v: VERSION,
                            hash: hash.to_string(),
                            ranges: ranges_of(&part, size),
                            // After a round that did not verify: the source checks its copy
                            // first, and refuses by name if its disk is the cause.
                            check: round > 0,
                        },
                    )
                    .await?;
                    match head {
                        Response::Found { size: s } if s == size => {}
                        Response::Found { size: s } => {
                            return Err(Error::Protocol(format!(
                                "{peer} says blob {hash} has {s} bytes, then {size}"
                            )));
                        }
                        Response::Refused { reason } => {
                            return Err(Error::Refused { peer, reason });
                        }
                        other => {
                            return Err(Error::Protocol(format!(
                                "{peer} answered {other:?} to a blob request"
                            )));
                        }
                    }
                    let (reader, pump) = bridge::reader(recv);
                    let got = tokio::task::spawn_blocking(move || {
                        store.receive_part(&hash, size, &part, reader)
                    })
                    .await
                    .map_err(|e| Error::Protocol(e.to_string()));
                    pump.abort();
                    got
                }
            });
            let mut verified = true;
            for outcome in futures::future::join_all(fetches).await {
                match outcome? {
                    Ok(n) => received += n,
                    Err(e @ crate::blob::Error::Corrupt { .. }) => {
                        verified = false;
                        last = Some(e);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let store = self.store.clone();
            missing = tokio::task::spawn_blocking(move || {
                if verified {
                    // Every part asked for arrived verified: nothing is missing, and the blob
                    // is complete without hashing it again.
                    store
                        .complete_verified(&hash, size)
                        .map(|()| bao_tree::ChunkRanges::empty())
                } else {
                    store.missing(&hash, size)
                }
            })
            .await
            .map_err(|e| Error::Protocol(e.to_string()))??;
        }
        match (missing.is_empty(), last) {
            (true, _) => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.complete_verified(&hash, size))
                    .await
                    .map_err(|e| Error::Protocol(e.to_string()))??;
                Ok((size, received))
            }
            (false, Some(e)) => Err(e.into()),
            (false, None) => Err(Error::Protocol(format!(
                "blob {hash} still incomplete after {attempts} rounds"
            ))),
        }
    }
}

/// How many streams fetch a blob of `size` bytes from one source: one below 8 MiB, else one
/// part of at least 4 MiB per core, two to four. Each stream has its own verifying receiver
/// thread; beyond the cores they only contend (on two cores, with both ends on the machine,
/// four streams ran 5 % slower than two, and into `/dev/shm` they queued on the file's lock).
fn streams_for(size: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    (size / (4 << 20)).clamp(1, cores.clamp(2, 4)) as usize
}

/// The most connections one member may hold open to a node's data plane at once (each carries
/// at most 64 requests at a time).
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// One of a member's connections, counted while it is served.
struct ConnSlot {
    peer: PeerId,
    per_peer: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, usize>>>,
}

impl ConnSlot {
    fn take(
        per_peer: &Arc<std::sync::Mutex<std::collections::HashMap<PeerId, usize>>>,
        peer: PeerId,
    ) -> Option<ConnSlot> {
        let mut m = per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            peer,
            per_peer: per_peer.clone(),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// The serving side of one node's data plane.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) store: BlobStore,
    pub(crate) corrupt: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) serving: crate::files::Serving,
}

impl Server {
    async fn serve(self, conn: quinn::Connection, peer: PeerId) {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let server = self.clone();
            tokio::spawn(async move {
                let request: Request = match read_header(&mut recv, MAX_HEADER).await {
                    Ok(r) => r,
                    Err(e) => return refuse(&mut send, e.to_string()).await,
                };
                match request {
                    Request::Stat { .. } | Request::Get { .. } => {
                        server.blob(&mut send, &request).await
                    }
                    Request::SubmitCopy { .. }
                    | Request::CopyStatus { .. }
                    | Request::CopyCancel { .. } => {
                        server.serving.copies(peer, &mut send, request).await
                    }
                    Request::Shares { .. } => server.serving.shares(peer, &mut send, request).await,
                    Request::Call { .. } => server.serving.call(peer, &mut send, request).await,
                    other => server.serving.handle(peer, &mut send, other).await,
                }
            });
        }
    }

    async fn blob(&self, send: &mut quinn::SendStream, request: &Request) {
        let (hash, ranges) = match check(request) {
            Ok(ok) => ok,
            Err(reason) => return refuse(send, reason).await,
        };
        let Some(size) = self.store.size(&hash) else {
            return refuse(send, format!("this node does not hold blob {hash}")).await;
        };
        self.store.touch(&hash);
        if let (Some(ranges), Request::Get { check: true, .. }) = (&ranges, request) {
            // Asked again after a stream that did not verify: this node's copy is checked
            // before a byte is sent, and a corrupt one is refused by name (and no longer
            // served).
            let store = self.store.clone();
            let ranges = ranges.clone();
            let checked = tokio::task::spawn_blocking(move || store.check(&hash, &ranges)).await;
            let failure = match checked {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(reason) = failure {
                tracing::warn!(%hash, %reason, "this node's copy of a blob failed its check");
                return refuse(send, format!("{reason}: fetch it from another member")).await;
            }
        }
        if write_header(send, &Response::Found { size }).await.is_err() {
            return;
        }
        if let Some(ranges) = ranges {
            let store = self.store.clone();
            let sent = crate::wire::stream(&self.corrupt, send, move |out| {
                store.send(&hash, &ranges, out)
            })
            .await;
            if let Err(e) = sent {
                tracing::warn!(%hash, error = %e, "cannot send a blob");
                return;
            }
        }
        let _ = send.finish();
    }
}

/// A peer's data roots, through one connection.
#[derive(Clone)]
pub struct Remote {
    plane: DataPlane,
    peer: PeerId,
    addr: SocketAddr,
}

fn refused(peer: PeerId, reason: String) -> Error {
    Error::Refused { peer, reason }
}

fn unexpected(peer: PeerId, r: &Response) -> Error {
    Error::Protocol(format!(
        "{peer} answered {r:?}, which does not fit the request"
    ))
}

impl DataPlane {
    /// The data roots of `peer`, whose data plane listens at `addr`.
    pub fn remote(&self, peer: PeerId, addr: SocketAddr) -> Remote {
        Remote {
            plane: self.clone(),
            peer,
            addr,
        }
    }
}

impl Remote {
    /// The peer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    async fn call(&self, request: &Request) -> Result<(Response, quinn::RecvStream), Error> {
        let conn = self.plane.connect(self.peer, self.addr).await?;
        match ask(&conn, request).await {
            Ok((Response::Refused { reason }, _)) => Err(refused(self.peer, reason)),
            other => other,
        }
    }

    /// Sends `request` and takes the answer `pick` accepts; anything else is a protocol error.
    async fn answer<T>(
        &self,
        request: &Request,
        pick: impl FnOnce(Response) -> Result<T, Response>,
    ) -> Result<T, Error> {
        let (response, _) = self.call(request).await?;
        pick(response).map_err(|other| unexpected(self.peer, &other))
    }

    async fn done(&self, request: &Request) -> Result<(), Error> {
        self.answer(request, |a| match a {
            Response::Done => Ok(()),
            other => Err(other),
        })
        .await
    }

    /// The entries of a directory.
    pub async fn list(
        &self,
        endpoint: &str,
        path: &str,
        token: Option<String>,
    ) -> Result<Vec<Entry>, Error> {
        let r = Request::List {
            v: VERSION,
            endpoint: endpoint.into(),
            path: path.into(),
            token,
        };
        self.answer(&r, |a| match a {
            Response::Entries { entries } => Ok(entries),
            other => Err(other),
        })
        .await
    }

    /// Every entry below a directory.
    pub async fn walk(
        &self,
        endpoint: &str,
        path: &str,
        token: Option<String>,
    ) -> Result<Vec<Entry>, Error> {
        let r = Request::Walk {
            v: VERSION,
            endpoint: endpoint.into(),
            path: path.into(),
            token,
        };
        self.answer(&r, |a| match a {
            Response::Entries { entries } => Ok(entries),
            other => Err(other),
        })
        .await
    }

    /// One path's metadata.
    pub async fn stat(
        &self,
        endpoint: &str,
        path: &str,
        token: Option<String>,
    ) -> Result<Entry, Error> {
        let r = Request::PathStat {
            v: VERSION,
            endpoint: endpoint.into(),
            path: path.into(),
            token,
        };
        self.answer(&r, |a| match a {
            Response::Entry { entry } => Ok(entry),
            other => Err(other),
        })
        .await
    }

    /// Makes a directory.
    pub async fn mkdir(
        &self,
        endpoint: &str,
        path: &str,
        parents: bool,
        token: Option<String>,
    ) -> Result<(), Error> {
        let r = Request::Mkdir {
            v: VERSION,
            endpoint: endpoint.into(),
            path: path.into(),
            parents,
            token,
        };
        self.done(&r).await
    }

    /// Removes a path.
    pub async fn remove(
        &self,
        endpoint: &str,
        path: &str,
        recursive: bool,
        token: Option<String>,
    ) -> Result<(), Error> {
        let r = Request::Remove {
            v: VERSION,
            endpoint: endpoint.into(),
            path: path.into(),
            recursive,
            token,
        };
        self.done(&r).await
    }

    /// The hashes of files (any number: asked [`MAX_PATHS`] at a time).
    pub async fn hashes(
        &self,
        endpoint: &str,
        paths: &[String],
        token: Option<String>,
    ) -> Result<Vec<FileHash>, Error> {
        let mut out = Vec::with_capacity(paths.len());
        for batch in paths.chunks(MAX_PATHS) {
            let r = Request::Hashes {
                v: VERSION,
                endpoint: endpoint.into(),
                paths: batch.to_vec(),
                token: token.clone(),
            };
            match self.call(&r).await?.0 {
                Response::Hashes { files } if files.len() == batch.len() => out.extend(files),
                other => return Err(unexpected(self.peer, &other)),
            }
        }
        Ok(out)
    }

    /// Asks the peer to run a copy to one of its endpoints; returns the job (as JSON).
    pub async fn submit_copy(
        &self,
        id: &str,
        spec: serde_json::Value,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> Result<serde_json::Value, Error> {
        let r = Request::SubmitCopy {
            v: VERSION,
            id: id.into(),
            spec,
            write_token,
            read_token,
        };
        self.answer(&r, |a| match a {
            Response::Job { job } => Ok(job),
            other => Err(other),
        })
        .await
    }

    /// Small files whole (each of at most [`crate::wire::SMALL_WHOLE`] bytes), as the peer
    /// has them now: per file, its bytes, or `None` when the peer did not send it (changed,
    /// grown, unreadable). The caller verifies each against the hash it asked with.
    pub async fn get_files(
        &self,
        endpoint: &str,
        files: Vec<(String, String)>,
        token: Option<String>,
        received: &std::sync::atomic::AtomicU64,
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let asked = files.len();
        let r = Request::GetFiles {
            v: VERSION,
            endpoint: endpoint.into(),
            files,
            token,
        };
        let (sizes, mut recv) = match self.call(&r).await? {
            (Response::Files { sizes }, recv) if sizes.len() == asked => (sizes, recv),
            (other, _) => return Err(unexpected(self.peer, &other)),
        };
        let mut out = Vec::with_capacity(asked);
        for size in sizes {
            let Some(n) = size else {
                out.push(None);
                continue;
            };
            if n > crate::wire::SMALL_WHOLE {
                return Err(Error::Protocol(format!(
                    "{} sent a small file of {n} bytes, more than {}",
                    self.peer,
                    crate::wire::SMALL_WHOLE
                )));
            }
            let mut bytes = vec![0u8; n as usize];
            recv.read_exact(&mut bytes)
                .await
                .map_err(|e| Error::Protocol(format!("{}: {e}", self.peer)))?;
            received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            out.push(Some(bytes));
        }
        Ok(out)
    }

    /// Calls the peer's service `service` with `body`; its answer.
    pub async fn call_service(
        &self,
        service: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        let r = Request::Call {
            v: VERSION,
            service: service.into(),
            body,
        };
        self.answer(&r, |a| match a {
            Response::Answer { body } => Ok(body),
            other => Err(other),
        })
        .await
    }

    /// Lists or changes the shares of the peer's endpoint `endpoint` (as JSON).
    pub async fn shares(
        &self,
        endpoint: &str,
        change: crate::wire::ShareChange,
    ) -> Result<serde_json::Value, Error> {
        let r = Request::Shares {
            v: VERSION,
            endpoint: endpoint.into(),
            change,
        };
        self.answer(&r, |a| match a {
            Response::Shares { shares } => Ok(shares),
            other => Err(other),
        })
        .await
    }

    /// A copy this node asked the peer to run.
    pub async fn copy_status(&self, id: &str, cancel: bool) -> Result<serde_json::Value, Error> {
        let r = if cancel {
            Request::CopyCancel {
                v: VERSION,
                id: id.into(),
            }
        } else {
            Request::CopyStatus {
                v: VERSION,
                id: id.into(),
            }
        };
        self.answer(&r, |a| match a {
            Response::Job { job } => Ok(job),
            other => Err(other),
        })
        .await
    }

    /// Receives into `partial` what it is missing of the file `path` (which must still have
    /// the partial's hash), asking again after a chunk group that does not verify (up to
    /// `attempts` rounds). Returns the partial and the bytes of data received; complete when
    /// its `missing()` is empty.
    pub async fn fetch_file(
        &self,
        endpoint: &str,
        path: &str,
        token: Option<String>,
        mut partial: Partial,
        attempts: usize,
        received: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Partial, (Partial, Error)> {
        let mut last = None;
        for _ in 0..attempts.max(1) {
            let (p, missing) = match tokio::task::spawn_blocking(move || {
                let m = partial.missing_known();
                (partial, m)
            })
            .await
            {
                Ok((p, Ok(m))) => (p, m),
                Ok((p, Err(e))) => return Err((p, e.into())),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            partial = p;
            if missing.is_empty() {
                return Ok(partial);
            }
            // A large file comes on several streams at once, each part received by its own
            // handle on the part file (and its own thread), as a blob does.
            let size = partial.size();
            let mut handles = Vec::new();
            for part in split(&missing, size, streams_for(size)) {
                match partial.another() {
                    Ok(h) => handles.push((part, h)),
                    Err(e) => return Err((partial, e.into())),
                }
            }
            let parts = handles.into_iter().map(|(part, mut handle)| {
                let r = Request::GetFile {
                    v: VERSION,
                    endpoint: endpoint.into(),
                    path: path.into(),
                    hash: handle.hash().to_string(),
                    ranges: ranges_of(&part, size),
                    token: token.clone(),
                };
                let received = received.clone();
                async move {
                    let recv = match self.call(&r).await {
                        Ok((Response::Found { size: s }, recv)) if s == size => recv,
                        Ok((other, _)) => return Err(unexpected(self.peer, &other)),
                        Err(e) => return Err(e),
                    };
                    let (reader, pump) = bridge::reader(recv);
                    let counter = Counting {
                        inner: reader,
                        n: received,
                    };
                    let outcome =
                        tokio::task::spawn_blocking(move || handle.receive(&part, counter)).await;
                    pump.abort();
                    match outcome {
                        Ok(o) => Ok(o),
                        Err(e) => std::panic::resume_unwind(e.into_panic()),
                    }
                }
            });
            let mut verified = true;
            let mut failed = None;
            for outcome in futures::future::join_all(parts).await {
                match outcome {
                    Ok(Ok(_)) => {}
                    Ok(Err(e @ crate::blob::Error::Corrupt { .. })) => {
                        verified = false;
                        last = Some(e);
                    }
                    Ok(Err(e)) => {
                        verified = false;
                        failed.get_or_insert(Error::from(e));
                    }
                    Err(e) => {
                        verified = false;
                        failed.get_or_insert(e);
                    }
                }
            }
            partial.received(verified.then_some(&missing));
            if let Some(e) = failed {
                return Err((partial, e));
            }
        }
        Err((
            partial,
            match last {
                Some(e) => e.into(),
                None => Error::Protocol(format!("still incomplete after {attempts} rounds")),
            },
        ))
    }
}

/// Counts the bytes read through it (the job's "bytes received", which includes what was sent
/// twice).
struct Counting<R> {
    inner: R,
    n: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}
