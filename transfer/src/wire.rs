//! The data plane's wire format: one request per bidirectional QUIC stream. The requester
//! writes a length-prefixed JSON [`Request`] and finishes its side; the server answers a
//! length-prefixed JSON [`Response`] and, for `Get` and `GetFile`, the verified stream of the
//! chunk groups asked for. Everything a peer sends is size-checked before it is read and
//! decoded by [`decode_header`] (fuzzed), then checked ([`check`], and `files::check` for data roots).

use bao_tree::{ChunkNum, ChunkRanges};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::blob::Hash;

/// Largest request header, checked before it is read.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest response header (listings and walks travel in it), checked before it is read.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Most paths one [`Request::Hashes`] may name.
pub const MAX_PATHS: usize = 1024;
/// The largest file sent whole in a [`Request::GetFiles`] answer (one BLAKE3 chunk group's
/// worth of verification is then one hash of the whole file).
pub const SMALL_WHOLE: u64 = 64 << 10;
/// Most files one [`Request::GetFiles`] asks for.
pub const MAX_SMALL_FILES: usize = 256;
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
        /// Check the ranges against the root hash before sending them: asked after a stream
        /// that did not verify, to tell a copy corrupt on the server's disk from a corrupt
        /// stream. Absent (false) otherwise: the receiver checks every group anyway.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        check: bool,
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
    /// Small files whole, in one answer (each of at most [`SMALL_WHOLE`] bytes): the files
    /// whose hash is still the one asked come after the header, in order.
    GetFiles {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// Each file's path and the hash it was listed with.
        files: Vec<(String, String)>,
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
    /// Asks the node of a copy's destination to run it (the asking node orchestrates).
    SubmitCopy {
        /// Protocol version.
        v: u32,
        /// The request id.
        id: String,
        /// The copy (`copy::Spec` as JSON; its `requester` is set by the receiving node).
        spec: serde_json::Value,
        /// The token allowing the asking node to write at the destination.
        #[serde(default)]
        write_token: Option<String>,
        /// The token allowing the asking node to read the source.
        #[serde(default)]
        read_token: Option<String>,
    },
    /// A copy job this node asked another to run.
    CopyStatus {
        /// Protocol version.
        v: u32,
        /// The request id.
        id: String,
    },
    /// Cancels a copy job this node asked another to run.
    CopyCancel {
        /// Protocol version.
        v: u32,
        /// The request id.
        id: String,
    },
    /// A call to another of the node's services (its flow runs, ...), answered as JSON.
    Call {
        /// Protocol version.
        v: u32,
        /// The service's name.
        service: String,
        /// What is asked.
        body: serde_json::Value,
    },
    /// Lists or changes the shares of an endpoint's data root (asked by a member of the
    /// endpoint's own institution).
    Shares {
        /// Protocol version.
        v: u32,
        /// The endpoint.
        endpoint: String,
        /// What to do.
        change: ShareChange,
    },
}

/// A change to a data root's shares (Globus' access rules on a guest collection): a share lets
/// one institution, or one node, read (or read and write) below a path without a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShareChange {
    /// The shares.
    List,
    /// Adds a share (or answers the same one already there).
    Add {
        /// The directory or file shared, relative to the data root.
        path: String,
        /// `institution:<key>` or `node:<peer id>`.
        principal: String,
        /// Writing too, not only reading.
        #[serde(default)]
        write: bool,
    },
    /// Removes a share by id.
    Remove {
        /// Its id.
        id: String,
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
        files: Vec<FileHash>,
    },
    /// Small files, in the order asked: each one's size, or `None` when it is not sent (it
    /// changed since it was listed, grew past [`SMALL_WHOLE`], or cannot be read). The bytes
    /// of those sent follow, one file after the other.
    Files {
        /// Per file asked.
        sizes: Vec<Option<u64>>,
    },
    /// Done.
    Done,
    /// A copy job (`copy::Job` as JSON).
    Job {
        /// The job.
        job: serde_json::Value,
    },
    /// A service's answer to a `Call`.
    Answer {
        /// The answer.
        body: serde_json::Value,
    },
    /// A data root's shares (a list, or the one added or removed), as JSON.
    Shares {
        /// The answer.
        shares: serde_json::Value,
    },
}

/// A boxed future: what the node's hooks return, so that they stay trait objects.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

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

/// A file's hash and metadata, as [`Request::Hashes`] answers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    /// The path asked.
    pub path: String,
    /// Its BLAKE3 hash (hex), unless `error`.
    #[serde(default)]
    pub hash: Option<String>,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// Permission bits.
    #[serde(default)]
    pub mode: u32,
    /// Modification time, ns since the epoch.
    #[serde(default)]
    pub mtime_ns: i64,
    /// Why it could not be hashed.
    #[serde(default)]
    pub error: Option<String>,
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
        .map_err(|e| Error::Protocol(format!("reading a header: {}", read_failure(&e))))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(Error::Protocol(format!(
            "a header of {len} bytes, at most {limit}"
        )));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| Error::Protocol(format!("reading a header: {}", read_failure(&e))))?;
    decode_header(&buf)
}

/// Why a read failed, with the peer's reason when it closed the connection.
fn read_failure(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<quinn::ReadError>())
    {
        Some(quinn::ReadError::ConnectionLost(c)) => format!("connection lost: {c}"),
        _ => e.to_string(),
    }
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
        | Request::GetFiles { v, .. }
        | Request::Mkdir { v, .. }
        | Request::Remove { v, .. }
        | Request::SubmitCopy { v, .. }
        | Request::CopyStatus { v, .. }
        | Request::CopyCancel { v, .. }
        | Request::Shares { v, .. }
        | Request::Call { v, .. } => *v,
    }
}

/// Checks a blob request from a peer: version, hash, range count and order. (Requests on data
/// roots are checked by `files::check`.)
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

/// Answers a refusal and finishes the stream.
pub(crate) async fn refuse(send: &mut quinn::SendStream, reason: String) {
    let _ = write_header(send, &Response::Refused { reason }).await;
    let _ = send.finish();
}

/// Runs `encode` on a blocking thread and sends what it writes; resets the stream if it
/// fails (the receiver keeps what verified and asks again).
pub(crate) async fn stream(
    corrupt: &std::sync::atomic::AtomicU64,
    send: &mut quinn::SendStream,
    encode: impl FnOnce(&mut dyn std::io::Write) -> Result<(), crate::blob::Error> + Send + 'static,
) -> Result<(), crate::blob::Error> {
    let (mut writer, mut chunks) = bridge::writer();
    let encoding = tokio::task::spawn_blocking(move || {
        encode(&mut writer)?;
        std::io::Write::flush(&mut writer)?;
        Ok::<(), crate::blob::Error>(())
    });
    let mut flip = corrupt
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        )
        .is_ok();
    while let Some(mut chunk) = chunks.recv().await {
        if flip && chunk.len() > 1024 {
            // Test hook: one byte flipped in the middle of the stream's first chunk.
            let mut bytes = chunk.to_vec();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x20;
            chunk = bytes.into();
            flip = false;
        }
        // Handed to QUIC as it is: no copy into its send buffer.
        if send.write_chunk(chunk).await.is_err() {
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

    /// How much a [`ChannelWriter`] gathers before it hands a chunk over.
    const CHUNK: usize = 1 << 20;

    /// A blocking `Write` whose chunks an async task sends on: what is written is gathered
    /// into chunks of [`CHUNK`] bytes, each handed over whole (moved, not copied again).
    pub(super) fn writer() -> (ChannelWriter, tokio::sync::mpsc::Receiver<bytes::Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (
            ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            },
            rx,
        )
    }

    pub(super) struct ChannelWriter {
        tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
        buf: Vec<u8>,
    }

    impl ChannelWriter {
        fn hand_over(&mut self) -> io::Result<()> {
            if self.buf.is_empty() {
                return Ok(());
            }
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx
                .blocking_send(full.into())
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream closed"))
        }
    }

    impl io::Write for ChannelWriter {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = data.len().min(CHUNK - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            if self.buf.len() == CHUNK {
                self.hand_over()?;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.hand_over()
        }
    }
}
