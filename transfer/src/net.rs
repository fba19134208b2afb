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

use bao_tree::{ChunkNum, ChunkRanges};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::blob::{BlobStore, Hash};

/// Largest request header, checked before it is read.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest response header (listings and walks travel in it), checked before it is read.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Most paths one [`Request::Hashes`] may name.
pub const MAX_PATHS: usize = 1024;
/// Most entries a walk returns.
pub const MAX_WALK: usize = 200_000;
/// Most ranges one request may name.
pub const MAX_RANGES: usize = 4096;
/// Protocol version, in every header.
pub const VERSION: u32 = 1;

/// What a member asks of another's data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The size of a blob, if the server holds it complete.
    Stat {
        /// Protocol version.
        v: u32,
        /// The blob.
        hash: String,
    },
    /// The verified stream of these chunk ranges (`[start, end)` in 1 KiB chunks) of a blob.
    Get {
        /// Protocol version.
        v: u32,
        /// The blob.
        hash: String,
        /// Chunk ranges; widened to whole chunk groups by the server.
        ranges: Vec<(u64, u64)>,
    },
    /// The entries of a directory of an endpoint's data root.
    List {
        /// Protocol version.
        v: u32,
        /// The endpoint (its name on the serving node).
        endpoint: String,
        /// The directory, relative to the data root.
        path: String,
        /// The capability token that allows it, if the endpoint's policy wants one.
        #[serde(default)]
        token: Option<String>,
    },
    /// The metadata of one path of a data root.
    PathStat {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The path.
        path: String,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
    /// Every entry below a directory of a data root (at most [`MAX_WALK`]).
    Walk {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The directory.
        path: String,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
    /// The BLAKE3 hashes of files of a data root (at most [`MAX_PATHS`]).
    Hashes {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The files.
        paths: Vec<String>,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
    /// The verified stream of chunk ranges of a file of a data root, which must still have the
    /// hash the requester was told.
    GetFile {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The file.
        path: String,
        /// Its hash, from [`Request::Hashes`].
        hash: String,
        /// Chunk ranges.
        ranges: Vec<(u64, u64)>,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
    /// Makes a directory in a data root.
    Mkdir {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The directory.
        path: String,
        /// Make missing parents too (and accept an existing directory).
        #[serde(default)]
        parents: bool,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
    /// Removes a path of a data root.
    Remove {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// The path.
        path: String,
        /// Remove a directory with everything in it.
        #[serde(default)]
        recursive: bool,
        /// The capability token.
        #[serde(default)]
        token: Option<String>,
    },
}

/// The answer's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The blob is here, of this size (for a `Get`, its stream follows).
    Found {
        /// Bytes.
        size: u64,
    },
    /// Refused, or not here.
    Refused {
        /// Why.
        reason: String,
    },
    /// Directory entries (a listing, or a walk).
    Entries {
        /// The entries, sorted by path.
        entries: Vec<crate::root::Entry>,
    },
    /// One path's metadata.
    Entry {
        /// The metadata.
        entry: crate::root::Entry,
    },
    /// Files' hashes, in the order asked.
    Hashes {
        /// One per path asked.
        files: Vec<crate::files::FileHash>,
    },
    /// Done.
    Done,
}

/// Why a data-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint could not be set up.
    #[error("data plane: {0}")]
    Setup(String),
    /// Connecting to the peer failed (unreachable, or not the peer expected, or it refused us).
    #[error("data plane: cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The peer answered something malformed, or the stream broke.
    #[error("data plane: {0}")]
    Protocol(String),
    /// The peer refused the request, or does not hold the blob.
    #[error("data plane: {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Its reason.
        reason: String,
    },
    /// The blob store failed or the stream did not verify.
    #[error(transparent)]
    Blob(#[from] crate::blob::Error),
}

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
    /// Open connections to peers, reused by every call.
    conns: Arc<std::sync::Mutex<std::collections::HashMap<PeerId, quinn::Connection>>>,
}

pub(crate) type RootsSlot = Arc<std::sync::RwLock<Option<Arc<dyn crate::files::Roots>>>>;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Windows large enough for a loopback or LAN path to stay full.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    Arc::new(t)
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
    provider.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
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
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|e| setup(&e))?;
        let established = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let corrupt = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let roots: RootsSlot = Arc::default();
        let outboards = Arc::new(crate::files::Outboards::default());
        let plane = DataPlane {
            endpoint: endpoint.clone(),
            keypair: keypair.clone(),
            store: store.clone(),
            established: established.clone(),
            corrupt: corrupt.clone(),
            roots: roots.clone(),
            conns: Arc::default(),
        };
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let server = Server {
                    store: store.clone(),
                    corrupt: corrupt.clone(),
                    roots: roots.clone(),
                    outboards: outboards.clone(),
                };
                let admit = admit.clone();
                let established = established.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else {
                        return;
                    };
                    established.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The handshake admitted only members; checked again, in case
                    // membership ended in between.
                    match peer_of(&conn) {
                        Some(peer) if admit(&peer) => server.serve(conn, peer).await,
                        _ => conn.close(quinn::VarInt::from_u32(1), b"not a member"),
                    }
                });
            }
        });
        Ok(plane)
    }

    /// Serves `roots` (this node's endpoints' data roots) to members from now on.
    pub fn serve_roots(&self, roots: Arc<dyn crate::files::Roots>) {
        *self
            .roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(roots);
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

    /// A connection to `peer` at `addr`: the open one if there is one, else a new one.
    pub(crate) async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, Error> {
        let open = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&peer)
            .filter(|c| c.close_reason().is_none() && c.remote_address() == addr)
            .cloned();
        if let Some(conn) = open {
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
        let fail = |reason: String| Error::Connect { peer, reason };
        let tls = libp2p_tls::make_client_config(&self.keypair, Some(peer))
            .map_err(|e| fail(e.to_string()))?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| fail(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport());
        // The server name is not checked (libp2p-tls checks the peer id instead).
        let connecting = self
            .endpoint
            .connect_with(client, addr, "l")
            .map_err(|e| fail(e.to_string()))?;
        connecting.await.map_err(|e| fail(e.to_string()))
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
        for _ in 0..attempts.max(1) {
            let store = self.store.clone();
            let missing = tokio::task::spawn_blocking(move || store.missing(&hash, size))
                .await
                .map_err(|e| Error::Protocol(e.to_string()))??;
            if missing.is_empty() {
                return Ok((size, received));
            }
            let ranges: Vec<(u64, u64)> = ranges_of(&missing, size);
            let (head, recv) = ask(
                &conn,
                &Request::Get {
                    v: VERSION,
                    hash: hash.to_string(),
                    ranges,
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
                Response::Refused { reason } => return Err(Error::Refused { peer, reason }),
                other => {
                    return Err(Error::Protocol(format!(
                        "{peer} answered {other:?} to a blob request"
                    )));
                }
            }
            let store = self.store.clone();
            let (reader, pump) = bridge::reader(recv);
            let outcome =
                tokio::task::spawn_blocking(move || store.receive(&hash, size, &missing, reader))
                    .await
                    .map_err(|e| Error::Protocol(e.to_string()))?;
            pump.abort();
            match outcome {
                Ok(n) => received += n,
                Err(e @ crate::blob::Error::Corrupt { .. }) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        let store = self.store.clone();
        let missing = tokio::task::spawn_blocking(move || store.missing(&hash, size))
            .await
            .map_err(|e| Error::Protocol(e.to_string()))??;
        match (missing.is_empty(), last) {
            (true, _) => Ok((size, received)),
            (false, Some(e)) => Err(e.into()),
            (false, None) => Err(Error::Protocol(format!(
                "blob {hash} still incomplete after {attempts} rounds"
            ))),
        }
    }
}

/// The `[start, end)` chunk ranges of a range set, with an open end closed at the blob's end.
pub(crate) fn ranges_of(set: &ChunkRanges, size: u64) -> Vec<(u64, u64)> {
    let end = size.div_ceil(1024).max(1);
    set.iter()
        .map(|r| {
            let (start, stop) = match r {
                range_collections::range_set::RangeSetRange::Range(r) => (r.start.0, r.end.0),
                range_collections::range_set::RangeSetRange::RangeFrom(r) => (r.start.0, end),
            };
            (start, stop)
        })
        .collect()
}

pub(crate) async fn write_header<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), Error> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::Protocol(e.to_string()))?;
    send.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| Error::Protocol(e.to_string()))
}

/// Reads a length-prefixed JSON header, refusing one over `limit` bytes before reading it.
pub async fn read_header<T: for<'de> Deserialize<'de>>(
    recv: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: usize,
) -> Result<T, Error> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| Error::Protocol(format!("reading a header: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(Error::Protocol(format!(
            "a header of {len} bytes, at most {limit}"
        )));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| Error::Protocol(format!("reading a header: {e}")))?;
    decode_header(&buf)
}

/// Decodes a header's JSON (the part of [`read_header`] that sees peer bytes).
pub fn decode_header<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Protocol(format!("a malformed header: {e}")))
}

pub(crate) async fn ask(
    conn: &quinn::Connection,
    request: &Request,
) -> Result<(Response, quinn::RecvStream), Error> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?;
    write_header(&mut send, request).await?;
    send.finish().map_err(|e| Error::Protocol(e.to_string()))?;
    let head = read_header(&mut recv, MAX_RESPONSE).await?;
    Ok((head, recv))
}

/// The protocol version of any request.
pub fn version(request: &Request) -> u32 {
    match request {
        Request::Stat { v, .. }
        | Request::Get { v, .. }
        | Request::List { v, .. }
        | Request::PathStat { v, .. }
        | Request::Walk { v, .. }
        | Request::Hashes { v, .. }
        | Request::GetFile { v, .. }
        | Request::Mkdir { v, .. }
        | Request::Remove { v, .. } => *v,
    }
}

/// Checks a blob request from a peer: version, hash, range count and order. (Requests on data
/// roots are checked by [`crate::files::check`].)
pub fn check(request: &Request) -> Result<(Hash, Option<ChunkRanges>), String> {
    let v = version(request);
    if v != VERSION {
        return Err(format!(
            "data-plane protocol {v}, this node speaks {VERSION}"
        ));
    }
    let (hash, ranges) = match request {
        Request::Stat { hash, .. } => (hash, None),
        Request::Get { hash, ranges, .. } => (hash, Some(ranges)),
        _ => return Err("not a blob request".into()),
    };
    let hash: Hash = hash
        .parse()
        .map_err(|e: crate::blob::Error| e.to_string())?;
    let Some(ranges) = ranges else {
        return Ok((hash, None));
    };
    Ok((hash, Some(chunk_ranges(ranges)?)))
}

/// A peer's `[start, end)` chunk ranges as a set: bounded in number, none empty or reversed.
pub fn chunk_ranges(ranges: &[(u64, u64)]) -> Result<ChunkRanges, String> {
    if ranges.len() > MAX_RANGES {
        return Err(format!("{} ranges, at most {MAX_RANGES}", ranges.len()));
    }
    let mut set = ChunkRanges::empty();
    for &(start, end) in ranges {
        if start >= end {
            return Err(format!("an empty or reversed range {start}..{end}"));
        }
        set |= ChunkRanges::from(ChunkNum(start)..ChunkNum(end));
    }
    Ok(set)
}

/// The serving side of one node's data plane.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) store: BlobStore,
    pub(crate) corrupt: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) roots: RootsSlot,
    pub(crate) outboards: Arc<crate::files::Outboards>,
}

/// Answers a refusal and finishes the stream.
pub(crate) async fn refuse(send: &mut quinn::SendStream, reason: String) {
    let _ = write_header(send, &Response::Refused { reason }).await;
    let _ = send.finish();
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
                    other => crate::files::handle(&server, peer, &mut send, other).await,
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
        if write_header(send, &Response::Found { size }).await.is_err() {
            return;
        }
        if let Some(ranges) = ranges {
            let store = self.store.clone();
            let sent = self
                .stream(send, move |out| store.encode(&hash, &ranges, out))
                .await;
            if let Err(e) = sent {
                tracing::warn!(%hash, error = %e, "cannot send a blob");
                return;
            }
        }
        let _ = send.finish();
    }

    /// Runs `encode` on a blocking thread and sends what it writes; resets the stream if it
    /// fails (the receiver keeps what verified and asks again).
    pub(crate) async fn stream(
        &self,
        send: &mut quinn::SendStream,
        encode: impl FnOnce(&mut dyn std::io::Write) -> Result<(), crate::blob::Error> + Send + 'static,
    ) -> Result<(), crate::blob::Error> {
        let (writer, mut chunks) = bridge::writer();
        let encoding = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, writer);
            encode(&mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok::<(), crate::blob::Error>(())
        });
        let mut flip = self
            .corrupt
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        while let Some(mut chunk) = chunks.recv().await {
            if flip && chunk.len() > 1024 {
                // Test hook: one byte flipped in the middle of the stream's first chunk.
                let at = chunk.len() / 2;
                chunk[at] ^= 0x20;
                flip = false;
            }
            if send.write_all(&chunk).await.is_err() {
                return Err(crate::blob::Error::Io(std::io::Error::other(
                    "the receiver closed the stream",
                )));
            }
        }
        match encoding.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let _ = send.reset(quinn::VarInt::from_u32(2));
                Err(e)
            }
            Err(e) => {
                let _ = send.reset(quinn::VarInt::from_u32(2));
                Err(crate::blob::Error::Io(std::io::Error::other(e.to_string())))
            }
        }
    }
}

/// Between the async QUIC streams and the blob store's blocking IO.
pub(crate) mod bridge {
    use std::io;

    /// A blocking `Read` fed by a task that reads `recv`; abort the task when done.
    pub(crate) fn reader(
        mut recv: quinn::RecvStream,
    ) -> (ChannelReader, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(64);
        let pump = tokio::spawn(async move {
            loop {
                match recv.read_chunk(1 << 20, true).await {
                    Ok(None) => break,
                    Ok(Some(chunk)) => {
                        if tx.send(Ok(chunk.bytes)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        break;
                    }
                }
            }
        });
        (
            ChannelReader {
                rx,
                buf: bytes::Bytes::new(),
            },
            pump,
        )
    }

    pub(crate) struct ChannelReader {
        rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
        buf: bytes::Bytes,
    }

    impl io::Read for ChannelReader {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            while self.buf.is_empty() {
                match self.rx.blocking_recv() {
                    Some(chunk) => self.buf = chunk?,
                    None => return Ok(0),
                }
            }
            let n = out.len().min(self.buf.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            let _ = self.buf.split_to(n);
            Ok(n)
        }
    }

    /// A blocking `Write` whose chunks an async task sends on.
    pub(super) fn writer() -> (ChannelWriter, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (ChannelWriter { tx }, rx)
    }

    pub(super) struct ChannelWriter {
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    }

    impl io::Write for ChannelWriter {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.tx
                .blocking_send(data.to_vec())
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream closed"))?;
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
