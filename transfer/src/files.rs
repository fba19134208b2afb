//! Data roots over the data plane: listing, metadata, hashes, verified file streams, `mkdir`
//! and `rm`, each judged by the node that owns the root.
//!
//! The serving node answers a request only after [`Roots::open`] said yes for the calling
//! member, the endpoint, the ability (read or write) and the path; the path is then resolved by
//! [`DataRoot`], which never leaves the root. A file is streamed like a blob: its BLAKE3 hash and
//! outboard are computed when it is first asked for (and kept in memory, keyed by its inode,
//! size and times), and every chunk group is checked against that hash before it goes out, so a
//! file that changes under a transfer is refused rather than sent torn.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;

use crate::blob::{Hash, encode_file, outboard_of};
use crate::root::{DataRoot, RelPath};
use crate::wire::{
    BoxFuture, FileHash, MAX_PATHS, MAX_WALK, Request, Response, VERSION, refuse, write_header,
};

/// What a member asks to do in a data root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// List, stat, hash, read.
    Read,
    /// Make directories, remove, write.
    Write,
}

impl Want {
    /// The capability ability it needs.
    pub fn ability(self) -> &'static str {
        match self {
            Want::Read => "transfer.read",
            Want::Write => "transfer.write",
        }
    }
}

/// One request on a data root, as the owning node judges it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The endpoint's name on this node.
    pub endpoint: &'a str,
    /// Read or write.
    pub want: Want,
    /// The path (checked).
    pub path: &'a RelPath,
    /// The token the member presented.
    pub token: Option<&'a str>,
}

/// The data roots of a node, behind its access rules.
pub trait Roots: Send + Sync + 'static {
    /// The root of `ask.endpoint` if the member `peer` may do what it asks there, or why not.
    fn open(&self, peer: &PeerId, ask: &Ask<'_>) -> Result<Arc<DataRoot>, String>;
    /// Lists or changes the shares of `endpoint`'s data root for `peer`, if it may (as JSON).
    fn shares(
        &self,
        peer: PeerId,
        endpoint: String,
        change: crate::wire::ShareChange,
    ) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        let _ = (peer, change);
        Box::pin(async move { Err(format!("endpoint {endpoint} on this node keeps no shares")) })
    }
}

/// Where copies are asked for: the node that owns a copy's destination runs it for a member
/// that may write there and read the source.
pub trait Desk: Send + Sync + 'static {
    /// Accepts a copy for `peer` (or returns the one it already accepted under `id`).
    fn submit(
        &self,
        peer: PeerId,
        id: String,
        spec: serde_json::Value,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> BoxFuture<'_, Result<serde_json::Value, String>>;
    /// A copy `peer` asked for.
    fn status(&self, peer: PeerId, id: &str) -> Result<serde_json::Value, String>;
    /// Cancels a copy `peer` asked for.
    fn cancel(&self, peer: PeerId, id: &str) -> Result<serde_json::Value, String>;
}

/// The node's other services members may call over the data plane (its flow runs, ...): each
/// judges the calling member itself.
pub trait Services: Send + Sync + 'static {
    /// Answers `peer`'s call to `service`.
    fn call(
        &self,
        peer: PeerId,
        service: String,
        body: serde_json::Value,
    ) -> BoxFuture<'_, Result<serde_json::Value, String>>;
}

/// Where a node's services are, once it serves them.
pub type ServicesSlot = Arc<std::sync::RwLock<Option<Arc<dyn Services>>>>;

/// Where a node's copy desk is, once it runs one.
pub type DeskSlot = Arc<std::sync::RwLock<Option<Arc<dyn Desk>>>>;

/// Where a node's data roots are, once it serves them.
pub type RootsSlot = Arc<std::sync::RwLock<Option<Arc<dyn Roots>>>>;

/// What serving data-root requests needs: the roots, the outboard cache, the test hook.
#[derive(Clone)]
pub(crate) struct Serving {
    pub(crate) roots: RootsSlot,
    pub(crate) desk: DeskSlot,
    pub(crate) services: ServicesSlot,
    pub(crate) outboards: Arc<Outboards>,
    pub(crate) corrupt: Arc<std::sync::atomic::AtomicU64>,
}

/// What identifies one version of a file: if any of it changes, the file is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn version_of(file: &File) -> std::io::Result<(Version, u32)> {
    let st = rustix::fs::fstat(file)?;
    Ok((
        Version {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size.max(0) as u64,
            mtime_ns: st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime.saturating_mul(1_000_000_000) + st.st_ctime_nsec as i64,
        },
        st.st_mode & 0o7777,
    ))
}

/// A file's hash and outboard, the version they are of, and its mode.
type Hashed = (Arc<(Hash, Vec<u8>)>, Version, u32);

/// A data-root request, checked: the endpoint, what it wants, its paths, its token.
pub type Checked<'a> = (&'a str, Want, Vec<RelPath>, Option<&'a str>);

/// Outboards of files this node served, bounded in memory.
#[derive(Debug, Default)]
pub struct Outboards {
    inner: Mutex<OutboardCache>,
}

#[derive(Debug, Default)]
struct OutboardCache {
    map: HashMap<Version, Arc<(Hash, Vec<u8>)>>,
    order: VecDeque<Version>,
    bytes: usize,
}

/// Memory for cached outboards (a 1 GiB file's is 4 MiB).
const OUTBOARD_CACHE: usize = 256 << 20;

impl Outboards {
    /// The hash and outboard of `file` (hashing it unless this version was seen).
    fn of(&self, file: &File) -> Result<Hashed, crate::blob::Error> {
        let (v, mode) = version_of(file)?;
        if let Some(hit) = self.lock().map.get(&v) {
            return Ok((hit.clone(), v, mode));
        }
        let computed = Arc::new(outboard_of(file, v.size)?);
        // Changed while it was read: the hash may be of neither version.
        let (after, _) = version_of(file)?;
        if after != v {
            return Err(crate::blob::Error::Io(std::io::Error::other(
                "the file changed while it was hashed; try again",
            )));
        }
        let mut cache = self.lock();
        cache.bytes += computed.1.len() + 64;
        cache.order.push_back(v);
        cache.map.insert(v, computed.clone());
        while cache.bytes > OUTBOARD_CACHE {
            let Some(old) = cache.order.pop_front() else {
                break;
            };
            if let Some(gone) = cache.map.remove(&old) {
                cache.bytes -= gone.1.len() + 64;
            }
        }
        Ok((computed, v, mode))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboardCache> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Checks the parts of a data-root request every kind shares: version, path(s), counts.
/// Returns the endpoint, what it wants, the paths (checked), and the token.
pub fn check(request: &Request) -> Result<Checked<'_>, String> {
    let v = crate::wire::version(request);
    if v != VERSION {
        return Err(format!(
            "data-plane protocol {v}, this node speaks {VERSION}"
        ));
    }
    let one = |p: &str| {
        RelPath::parse(p)
            .map(|p| vec![p])
            .map_err(|e| e.to_string())
    };
    let (endpoint, want, paths, token) = match request {
        Request::List {
            endpoint,
            path,
            token,
            ..
        }
        | Request::PathStat {
            endpoint,
            path,
            token,
            ..
        }
        | Request::Walk {
            endpoint,
            path,
            token,
            ..
        }
        | Request::GetFile {
            endpoint,
            path,
            token,
            ..
        } => (endpoint, Want::Read, one(path)?, token),
        Request::Mkdir {
            endpoint,
            path,
            token,
            ..
        }
        | Request::Remove {
            endpoint,
            path,
            token,
            ..
        } => (endpoint, Want::Write, one(path)?, token),
        Request::GetFiles {
            endpoint,
            files,
            token,
            ..
        } => {
            if files.len() > crate::wire::MAX_SMALL_FILES {
                return Err(format!(
                    "{} files, at most {}",
                    files.len(),
                    crate::wire::MAX_SMALL_FILES
                ));
            }
            let paths = files
                .iter()
                .map(|(p, _)| RelPath::parse(p).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            (endpoint, Want::Read, paths, token)
        }
        Request::Hashes {
            endpoint,
            paths,
            token,
            ..
        } => {
            if paths.len() > MAX_PATHS {
                return Err(format!("{} paths, at most {MAX_PATHS}", paths.len()));
            }
            let paths = paths
                .iter()
                .map(|p| RelPath::parse(p).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            (endpoint, Want::Read, paths, token)
        }
        Request::Stat { .. }
        | Request::Get { .. }
        | Request::SubmitCopy { .. }
        | Request::CopyStatus { .. }
        | Request::CopyCancel { .. }
        | Request::Shares { .. }
        | Request::Call { .. } => {
            return Err("not a request on a data root".into());
        }
    };
    if endpoint.is_empty() || endpoint.len() > 256 {
        return Err("a data-root request names an endpoint (at most 256 bytes)".into());
    }
    Ok((endpoint, want, paths, token.as_deref()))
}

/// The root a request may use: every path it names is judged on its own.
fn judge(
    server: &Serving,
    peer: PeerId,
    endpoint: &str,
    want: Want,
    paths: &[RelPath],
    token: Option<&str>,
) -> Result<Arc<DataRoot>, String> {
    let roots = server
        .roots
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or_else(|| "this node serves no data roots yet".to_owned())?;
    let mut root = None;
    for path in paths.iter().take(MAX_PATHS) {
        root = Some(roots.open(
            &peer,
            &Ask {
                endpoint,
                want,
                path,
                token,
            },
        )?);
    }
    match root {
        Some(r) => Ok(r),
        None => roots.open(
            &peer,
            &Ask {
                endpoint,
                want,
                path: &RelPath::root(),
                token,
            },
        ),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal error: {e}"))?
}

/// Whether a request speaks this node's protocol version (why not).
fn same_version(request: &Request) -> Result<(), String> {
    let v = crate::wire::version(request);
    if v == VERSION {
        Ok(())
    } else {
        Err(format!(
            "data-plane protocol {v}, this node speaks {VERSION}"
        ))
    }
}

/// The hook in `slot`, or `missing` as the refusal.
fn hook<T: ?Sized>(
    slot: &std::sync::RwLock<Option<Arc<T>>>,
    missing: &str,
) -> Result<Arc<T>, String> {
    slot.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or_else(|| missing.to_owned())
}

/// Sends `answer` (and finishes the stream), or refuses with its reason.
async fn reply(send: &mut quinn::SendStream, answer: Result<Response, String>) {
    match answer {
        Ok(r) => {
            if write_header(send, &r).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(reason) => refuse(send, reason).await,
    }
}

impl Serving {
    /// Serves one request about copy jobs.
    pub(crate) async fn copies(
        &self,
        peer: PeerId,
        send: &mut quinn::SendStream,
        request: Request,
    ) {
        let answer = async {
            same_version(&request)?;
            let desk = hook(&self.desk, "this node runs no copies yet")?;
            let job = match request {
                Request::SubmitCopy {
                    id,
                    spec,
                    write_token,
                    read_token,
                    ..
                } => desk.submit(peer, id, spec, write_token, read_token).await,
                Request::CopyStatus { id, .. } => desk.status(peer, &id),
                Request::CopyCancel { id, .. } => desk.cancel(peer, &id),
                _ => Err("not a request about copies".into()),
            }?;
            Ok(Response::Job { job })
        };
        reply(send, answer.await).await
    }

    /// Serves one call to another of the node's services.
    pub(crate) async fn call(&self, peer: PeerId, send: &mut quinn::SendStream, request: Request) {
        let answer = async {
            same_version(&request)?;
            let Request::Call { service, body, .. } = request else {
                return Err("not a call".to_owned());
            };
            let services = hook(&self.services, "this node serves no calls yet")?;
            let body = services.call(peer, service, body).await?;
            Ok(Response::Answer { body })
        };
        reply(send, answer.await).await
    }

    /// Serves one request about a data root's shares.
    pub(crate) async fn shares(
        &self,
        peer: PeerId,
        send: &mut quinn::SendStream,
        request: Request,
    ) {
        let answer = async {
            same_version(&request)?;
            let Request::Shares {
                endpoint, change, ..
            } = request
            else {
                return Err("not a request about shares".to_owned());
            };
            if endpoint.is_empty() || endpoint.len() > 256 {
                return Err("a shares request names an endpoint (at most 256 bytes)".to_owned());
            }
            let roots = hook(&self.roots, "this node serves no data roots yet")?;
            let shares = roots.shares(peer, endpoint, change).await?;
            Ok(Response::Shares { shares })
        };
        reply(send, answer.await).await
    }

    /// Serves one data-root request.
    pub(crate) async fn handle(
        &self,
        peer: PeerId,
        send: &mut quinn::SendStream,
        request: Request,
    ) {
        handle(self, peer, send, request).await
    }
}

async fn handle(server: &Serving, peer: PeerId, send: &mut quinn::SendStream, request: Request) {
    let (endpoint, want, paths, token) = match check(&request) {
        Ok(c) => c,
        Err(reason) => return refuse(send, reason).await,
    };
    let root = match judge(server, peer, endpoint, want, &paths, token) {
        Ok(r) => r,
        Err(reason) => {
            tracing::info!(%peer, endpoint, want = want.ability(), %reason, "refused a data-root request");
            return refuse(send, reason).await;
        }
    };
    let path = paths.first().cloned().unwrap_or_default();
    let answer: Result<Response, String> = match &request {
        Request::List { .. } => {
            blocking(move || {
                root.list(&path)
                    .map(|entries| Response::Entries { entries })
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Request::PathStat { .. } => {
            blocking(move || {
                root.stat(&path)
                    .map(|entry| Response::Entry { entry })
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Request::Walk { .. } => {
            blocking(move || {
                root.walk(&path, MAX_WALK)
                    .map(|entries| Response::Entries { entries })
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Request::Mkdir { parents, .. } => {
            let parents = *parents;
            blocking(move || {
                root.mkdir(&path, parents)
                    .map(|()| Response::Done)
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Request::Remove { recursive, .. } => {
            let recursive = *recursive;
            blocking(move || {
                root.remove(&path, recursive)
                    .map(|()| Response::Done)
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Request::Hashes { .. } => {
            let outboards = server.outboards.clone();
            blocking(move || {
                let files = paths
                    .iter()
                    .map(|p| hash_one(&root, &outboards, p))
                    .collect();
                Ok(Response::Hashes { files })
            })
            .await
        }
        Request::GetFile { hash, ranges, .. } => {
            return get_file(server, send, root, path, hash, ranges).await;
        }
        Request::GetFiles { files, .. } => {
            let hashes: Vec<String> = files.iter().map(|(_, h)| h.clone()).collect();
            return get_files(server, send, root, paths, hashes).await;
        }
        _ => Err("not a data-root request".into()),
    };
    match answer {
        Ok(response) => {
            if write_header(send, &response).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(reason) => refuse(send, reason).await,
    }
}

fn hash_one(root: &DataRoot, outboards: &Outboards, path: &RelPath) -> FileHash {
    let mut out = FileHash {
        path: path.as_str().to_owned(),
        hash: None,
        size: 0,
        mode: 0,
        mtime_ns: 0,
        error: None,
    };
    let hashed = root
        .open_file(path)
        .map_err(|e| e.to_string())
        .and_then(|f| outboards.of(&f).map_err(|e| e.to_string()));
    match hashed {
        Ok((ob, v, mode)) => {
            out.hash = Some(ob.0.to_string());
            out.size = v.size;
            out.mode = mode;
            out.mtime_ns = v.mtime_ns;
        }
        Err(e) => out.error = Some(e),
    }
    out
}

/// Reads each small file whose hash is still `hashes[i]` (else `None`).
fn read_small(
    root: &DataRoot,
    outboards: &Outboards,
    path: &RelPath,
    hash: &str,
) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let file = root.open_file(path).ok()?;
    let (ob, v, _) = outboards.of(&file).ok()?;
    if v.size > crate::wire::SMALL_WHOLE || ob.0.to_string() != hash {
        return None;
    }
    let mut bytes = Vec::with_capacity(v.size as usize);
    (&file)
        .take(crate::wire::SMALL_WHOLE + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    // Changed between hashing and reading: not this version.
    (bytes.len() as u64 == v.size).then_some(bytes)
}

async fn get_files(
    server: &Serving,
    send: &mut quinn::SendStream,
    root: Arc<DataRoot>,
    paths: Vec<RelPath>,
    hashes: Vec<String>,
) {
    let outboards = server.outboards.clone();
    let read = blocking(move || {
        Ok(paths
            .iter()
            .zip(&hashes)
            .map(|(p, h)| read_small(&root, &outboards, p, h))
            .collect::<Vec<_>>())
    })
    .await;
    let mut files = match read {
        Ok(f) => f,
        Err(reason) => return refuse(send, reason).await,
    };
    // The test hook: one corrupt byte in the first file sent.
    if let Some(first) = files.iter_mut().flatten().find(|f| !f.is_empty()) {
        let take = server
            .corrupt
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if take {
            first[0] ^= 0xff;
        }
    }
    let sizes = files
        .iter()
        .map(|f| f.as_ref().map(|b| b.len() as u64))
        .collect();
    if write_header(send, &Response::Files { sizes })
        .await
        .is_err()
    {
        return;
    }
    for bytes in files.iter().flatten() {
        if send.write_all(bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn get_file(
    server: &Serving,
    send: &mut quinn::SendStream,
    root: Arc<DataRoot>,
    path: RelPath,
    hash: &str,
    ranges: &[(u64, u64)],
) {
    let want: Hash = match hash.parse() {
        Ok(h) => h,
        Err(e) => return refuse(send, format!("{e}")).await,
    };
    let ranges = match crate::wire::chunk_ranges(ranges) {
        Ok(r) => r,
        Err(reason) => return refuse(send, reason).await,
    };
    let outboards = server.outboards.clone();
    let shown = path.to_string();
    let opened = blocking(move || {
        let file = root.open_file(&path).map_err(|e| e.to_string())?;
        let (ob, v, _) = outboards.of(&file).map_err(|e| e.to_string())?;
        Ok((file, ob, v.size))
    })
    .await;
    let (file, ob, size) = match opened {
        Ok(o) => o,
        Err(reason) => return refuse(send, reason).await,
    };
    if ob.0 != want {
        return refuse(
            send,
            format!(
                "`{shown}` changed since it was listed (its hash is now {}): start the copy again",
                ob.0
            ),
        )
        .await;
    }
    if write_header(send, &Response::Found { size }).await.is_err() {
        return;
    }
    let sent = crate::wire::stream(&server.corrupt, send, move |out| {
        encode_file(&file, &ob.0, size, &ob.1, &ranges, out)
    })
    .await;
    match sent {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => tracing::info!(path = %shown, error = %e, "a file stream stopped"),
    }
}
