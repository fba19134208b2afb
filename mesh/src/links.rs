//! Links: framed request streams to members, offered to other crates as a small generic
//! service ("send this request to that member", "serve requests of this protocol").
//!
//! A crate describes its protocol with [`Protocol`] (a name, its request and response types, and
//! the answers for "not now" and "refused"), then asks the mesh for its [`Links`] and the
//! [`Inbound`] requests of that protocol once ([`crate::Handle::links`]). The mesh knows nothing
//! of what the requests mean.
//!
//! A node sends its requests to a peer over one long-lived stream per protocol, its *link* to
//! that peer, opened on first use and opened again after it breaks. Requests are tagged with an
//! id; the peer answers on the same stream, tagged with the id answered, in any order. Streams are
//! read and written by their own tasks, outside the swarm's event loop: a message costs a frame on
//! a stream, not a new stream and two trips through the event loop on each side.
//!
//! Inbound streams are served the same way. Every request on them is checked against the
//! members this node has verified, as it arrives (a peer may open a stream while its proof is
//! still being checked: it is told to come back, [`Protocol::busy`]).
//!
//! A large request (over [`BULK_FRAME`], say a task with a big argument) does not queue on the
//! link, where every small request behind it would wait until its last byte is written: it goes
//! on a stream of its own, opened for it and closed once it is answered (a few at a time per
//! peer, within what the peer serves).
//!
//! Failure is never silent: a request whose link breaks, or that gets no answer within
//! [`REQUEST_TIMEOUT`], fails with a reason naming the peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, StreamProtocol};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::membership::Member;

/// A request-response protocol carried on links.
pub trait Protocol: Send + Sync + 'static {
    /// The protocol name on the wire, e.g. `/funcmesh/task/4`.
    const NAME: &'static str;
    /// What its messages are about, for errors (`"task"`: "the task stream to … broke").
    const LABEL: &'static str;
    /// The largest frame body, either way.
    const MAX_MESSAGE: usize;
    /// What the opener of a stream sends.
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What comes back.
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// The answer for "not now, send it again later" (the sender is not verified yet, or the
    /// consumer's queue is full).
    fn busy(reason: String) -> Self::Response;
    /// The answer for a request refused whole (malformed, or over the protocol's bounds).
    fn refused(reason: String) -> Self::Response;
    /// Checks a decoded request's bounds before it is handed on.
    fn check(request: &Self::Request) -> Result<(), String>;
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The stream to the peer could not be opened, broke, was garbled, or the peer did not
    /// answer in time; the text names the peer and the reason.
    #[error("{0}")]
    Failed(String),
    /// The request cannot be encoded within the protocol's bounds.
    #[error("{0}")]
    Encode(String),
    /// The mesh has shut down.
    #[error("the mesh is shut down")]
    Closed,
}

/// A request from a verified member, to be answered through its [`Responder`].
#[derive(Debug)]
pub struct Inbound<P: Protocol> {
    /// The member that sent it.
    pub from: Member,
    /// Its peer id.
    pub peer: PeerId,
    /// The request.
    pub request: P::Request,
    /// Where the answer goes.
    pub responder: Responder<P>,
}

/// Answers one inbound request, on the stream it came in on.
#[derive(Debug)]
pub struct Responder<P: Protocol> {
    id: u64,
    frames: mpsc::Sender<Vec<u8>>,
    protocol: std::marker::PhantomData<fn() -> P>,
}

impl<P: Protocol> Responder<P> {
    fn new(id: u64, frames: mpsc::Sender<Vec<u8>>) -> Responder<P> {
        Responder {
            id,
            frames,
            protocol: std::marker::PhantomData,
        }
    }

    /// Sends the answer (dropped silently if the mesh stopped or the peer went away).
    pub async fn respond(self, response: P::Response) {
        match frame::response::<P>(self.id, &response) {
            Ok(frame) => {
                let _ = self.frames.send(frame).await;
            }
            Err(why) => warn!(%why, protocol = P::NAME, "cannot answer a request"),
        }
    }
}

/// Inbound requests waiting for their consumer; when full, new ones are answered busy.
pub const INBOUND_QUEUE: usize = 1024;

/// How long a request waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a link may take (a dial included).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for a stream's writer.
const WRITE_QUEUE: usize = 1024;
/// At most this many frames' bytes are gathered into one write.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes read from a stream at a time.
const READ_BUFFER: usize = 64 << 10;
/// Inbound streams of one protocol one peer may hold open at once: its link, its bulk streams, and room
/// for streams it has finished with that this side has not seen end yet.
const INBOUND_PER_PEER: usize = 8;
/// A request frame larger than this goes on a stream of its own.
pub const BULK_FRAME: usize = 256 << 10;
/// Bulk streams open to one peer at once.
const BULK_PER_PEER: usize = 2;
/// The largest frame read from a peer whose membership is not verified (yet): enough for a small
/// request, which is answered "busy" without being handed on. A larger one waits up to
/// `VERIFY_WAIT` (2 s) for the peer's proof to check out (a member may open its link while its
/// proof is being checked), and cuts the stream if it does not: a stranger never makes this
/// node read, let alone parse, more than this.
pub const UNVERIFIED_FRAME: usize = 4 << 10;
/// How long a large frame from a peer being verified waits for the verdict.
const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// Members whose proofs this node has verified, as the event loop last saw them.
pub(crate) type Verified = Arc<RwLock<HashMap<PeerId, Member>>>;

/// When each peer's links last carried a request, either way. The mesh keeps a bounded set of
/// connections and closes idle ones; a connection whose links carried a request within
/// `mesh.idle_after` (longer than [`REQUEST_TIMEOUT`], so no request is waiting on it) is not
/// idle.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity(Arc<Mutex<HashMap<PeerId, std::time::Instant>>>);

impl Activity {
    /// `peer`'s links carried a request now.
    pub(crate) fn touch(&self, peer: PeerId) {
        let now = std::time::Instant::now();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, now);
    }

    /// When `peer`'s links last carried a request, if ever.
    pub(crate) fn last(&self, peer: &PeerId) -> Option<std::time::Instant> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .copied()
    }

    /// Forgets peers not heard from since `before`.
    pub(crate) fn forget_before(&self, before: std::time::Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| *t >= before);
    }
}

type Reply<P> = oneshot::Sender<Result<<P as Protocol>::Response, Error>>;

/// The requests waiting for answers on one link.
struct Pending<P: Protocol> {
    replies: HashMap<u64, Reply<P>>,
    /// Set once the link is broken: no request joins it after that.
    broken: Option<String>,
}

impl<P: Protocol> Default for Pending<P> {
    fn default() -> Self {
        Pending {
            replies: HashMap::new(),
            broken: None,
        }
    }
}

/// One outbound stream to a peer.
struct Link<P: Protocol> {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<Pending<P>>,
    next_id: AtomicU64,
}

impl<P: Protocol> Link<P> {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending<P>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every request waiting on the link, and every later one.
    fn break_with(&self, why: &str) {
        let replies = {
            let mut p = self.pending();
            p.broken.get_or_insert_with(|| why.to_owned());
            std::mem::take(&mut p.replies)
        };
        for (_, reply) in replies {
            let _ = reply.send(Err(Error::Failed(why.to_owned())));
        }
    }

    fn answer(&self, id: u64, answer: Result<P::Response, Error>) {
        let reply = self.pending().replies.remove(&id);
        match reply {
            Some(reply) => {
                let _ = reply.send(answer);
            }
            // Timed out here already, or an id this node never sent.
            None => debug!(id, "an answer nobody waits for"),
        }
    }
}

/// Where [`Links::send`] put a request.
enum Sent<P: Protocol> {
    /// On the peer's link, under `id`.
    Link {
        link: Arc<Link<P>>,
        id: u64,
        answer: oneshot::Receiver<Result<P::Response, Error>>,
        /// The frame still to be sent, when the link's queue was full.
        queued: Option<(mpsc::Sender<Vec<u8>>, Vec<u8>)>,
    },
    /// Too large for the link: for a stream of its own.
    Bulk(Vec<u8>),
}

/// One protocol's streams on this node: its links to peers and the service of inbound streams.
pub struct Links<P: Protocol> {
    inner: Arc<Inner<P>>,
}

impl<P: Protocol> Clone for Links<P> {
    fn clone(&self) -> Self {
        Links {
            inner: self.inner.clone(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for Links<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("protocol", &P::NAME)
            .finish_non_exhaustive()
    }
}

struct Inner<P: Protocol> {
    control: Mutex<libp2p_stream::Control>,
    activity: Activity,
    links: Mutex<HashMap<PeerId, Arc<Link<P>>>>,
    /// Per peer: permits for bulk streams.
    bulk: Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl<P: Protocol> Links<P> {
    /// Starts serving inbound streams of `P` (requests from verified members go to `inbound`).
    pub(crate) fn start(
        mut control: libp2p_stream::Control,
        verified: Verified,
        activity: Activity,
        inbound: mpsc::Sender<Inbound<P>>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Links<P>, String> {
        let incoming = control
            .accept(StreamProtocol::new(P::NAME))
            .map_err(|e| format!("cannot serve {}: {e}", P::NAME))?;
        let server = Server {
            verified,
            activity: activity.clone(),
            inbound,
            open: Arc::new(Mutex::new(HashMap::new())),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        };
        tracker.spawn(server.accept(incoming));
        Ok(Links {
            inner: Arc::new(Inner {
                control: Mutex::new(control),
                activity,
                links: Mutex::new(HashMap::new()),
                bulk: Mutex::new(HashMap::new()),
                cancel,
                tracker,
            }),
        })
    }

    /// Sends a request to `peer`; the future is its answer. The request is on its way when this
    /// returns, not when the future is first polled, so a caller that spawns the wait adds no
    /// scheduling round to the request's path (a full queue is waited for in the future
    /// instead). It fails, saying why, if the stream to the peer breaks or the peer does not
    /// answer within [`REQUEST_TIMEOUT`].
    pub fn request(
        &self,
        peer: PeerId,
        request: &P::Request,
    ) -> impl Future<Output = Result<P::Response, Error>> + Send + 'static + use<P> {
        let sent = self.send(peer, request);
        let this = self.clone();
        async move {
            let (link, id, answer, queued) = match sent? {
                Sent::Link {
                    link,
                    id,
                    answer,
                    queued,
                } => (link, id, answer, queued),
                Sent::Bulk(frame) => return this.bulk(peer, frame).await,
            };
            if let Some((frames, frame)) = queued {
                if frames.send(frame).await.is_err() {
                    link.answer(
                        id,
                        Err(Error::Failed(format!(
                            "the {} stream to {peer} closed",
                            P::LABEL
                        ))),
                    );
                }
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => {
                    link.pending().replies.remove(&id);
                    Err(Error::Failed(format!(
                        "{peer} did not answer a {} request within {REQUEST_TIMEOUT:?}",
                        P::LABEL
                    )))
                }
            }
        }
    }

    /// Sends one large request on a stream of its own and reads its answer.
    async fn bulk(&self, peer: PeerId, frame: Vec<u8>) -> Result<P::Response, Error> {
        let permits = self
            .inner
            .bulk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(BULK_PER_PEER)))
            .clone();
        let failed =
            |why: String| Error::Failed(format!("the bulk {} stream to {peer} {why}", P::LABEL));
        let exchange = async {
            let _permit = permits.acquire_owned().await.map_err(|_| Error::Closed)?;
            let mut control = self
                .inner
                .control
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let stream = match tokio::time::timeout(
                OPEN_TIMEOUT,
                control.open_stream(peer, StreamProtocol::new(P::NAME)),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(failed(format!("could not be opened: {e}"))),
                Err(_) => {
                    return Err(failed(format!(
                        "could not be opened within {OPEN_TIMEOUT:?}"
                    )));
                }
            };
            let (mut reader, mut writer) = split(stream);
            writer
                .write_all(&frame)
                .await
                .map_err(|e| failed(format!("broke: {e}")))?;
            writer
                .flush()
                .await
                .map_err(|e| failed(format!("broke: {e}")))?;
            drop(frame);
            let mut body = Vec::new();
            next_frame::<P, _>(&mut reader, &mut body)
                .await
                .map_err(failed)?;
            let _ = writer.close().await;
            match frame::read_response::<P>(&body) {
                Ok((_, answer)) => answer.map_err(Error::Failed),
                Err(why) => Err(failed(format!("was garbled by the peer: {why}"))),
            }
        };
        tokio::select! {
            _ = self.inner.cancel.cancelled() => Err(Error::Closed),
            answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange) => answer.unwrap_or_else(|_| {
                Err(Error::Failed(format!(
                    "{peer} did not answer a {} request within {REQUEST_TIMEOUT:?}",
                    P::LABEL
                )))
            }),
        }
    }

    /// Registers and queues a request on the peer's link (`queued` is the frame still to be
    /// sent when the link's queue was full), or hands back a large one for a stream of its own.
    fn send(&self, peer: PeerId, request: &P::Request) -> Result<Sent<P>, Error> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        self.inner.activity.touch(peer);
        // A link found broken is replaced once; a second broken one is a real failure.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let link = self.link(peer);
            let id = link.next_id.fetch_add(1, Ordering::Relaxed);
            let frame = frame::request::<P>(id, request).map_err(Error::Encode)?;
            if frame.len() > BULK_FRAME {
                return Ok(Sent::Bulk(frame));
            }
            let (reply, answer) = oneshot::channel();
            {
                let mut p = link.pending();
                if let Some(why) = &p.broken {
                    if attempts < 2 {
                        drop(p);
                        self.forget(peer, &link);
                        continue;
                    }
                    return Err(Error::Failed(why.clone()));
                }
                p.replies.insert(id, reply);
            }
            let queued = match link.frames.try_send(frame) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(frame)) => Some((link.frames.clone(), frame)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // Its writer ended; the link's failure reaches this reply.
                    None
                }
            };
            return Ok(Sent::Link {
                link,
                id,
                answer,
                queued,
            });
        }
    }

    /// The peer's link, opened if there is none.
    fn link(&self, peer: PeerId) -> Arc<Link<P>> {
        let mut links = self.inner.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = links.get(&peer) {
            return link.clone();
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let link = Arc::new(Link {
            frames: tx,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
        });
        links.insert(peer, link.clone());
        drop(links);
        let control = self
            .inner
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let this = self.clone();
        let opened = link.clone();
        self.inner.tracker.spawn(async move {
            let why = tokio::select! {
                _ = this.inner.cancel.cancelled() => "closed: the mesh is shut down".to_owned(),
                why = drive(peer, control, &opened, rx) => why,
            };
            debug!(%peer, %why, protocol = P::NAME, "link ended");
            opened.break_with(&format!("the {} stream to {peer} {why}", P::LABEL));
            this.forget(peer, &opened);
        });
        link
    }

    /// Drops the peer's link if it is still `link`.
    fn forget(&self, peer: PeerId, link: &Arc<Link<P>>) {
        let mut links = self.inner.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(&peer).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(&peer);
        }
    }
}

/// Opens the link's stream and runs it until it breaks; returns why it ended.
async fn drive<P: Protocol>(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    link: &Link<P>,
    frames: mpsc::Receiver<Vec<u8>>,
) -> String {
    let stream = match tokio::time::timeout(
        OPEN_TIMEOUT,
        control.open_stream(peer, StreamProtocol::new(P::NAME)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return format!("could not be opened: {e}"),
        Err(_) => return format!("could not be opened within {OPEN_TIMEOUT:?}"),
    };
    let (mut reader, writer) = split(stream);
    let read = async {
        let mut body = Vec::new();
        loop {
            if let Err(why) = next_frame::<P, _>(&mut reader, &mut body).await {
                return why;
            }
            match frame::read_response::<P>(&body) {
                Ok((id, answer)) => link.answer(id, answer.map_err(Error::Failed)),
                Err(why) => return format!("was garbled by the peer: {why}"),
            }
        }
    };
    tokio::select! {
        why = read => why,
        why = write(writer, frames) => why,
    }
}

/// A stream's halves: its reader buffered (many small frames arrive together).
fn split<S: AsyncRead + AsyncWrite>(
    stream: S,
) -> (
    futures::io::BufReader<futures::io::ReadHalf<S>>,
    futures::io::WriteHalf<S>,
) {
    let (reader, writer) = futures::AsyncReadExt::split(stream);
    (
        futures::io::BufReader::with_capacity(READ_BUFFER, reader),
        writer,
    )
}

/// Reads the next frame into `body`; `Err` says why the stream ended.
async fn next_frame<P: Protocol, R: AsyncRead + Unpin>(
    reader: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    match frame::read(reader, body, P::MAX_MESSAGE).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("was closed by the peer".to_owned()),
        Err(e) => Err(format!("broke: {e}")),
    }
}

/// Writes queued frames, gathered while more are waiting, until the queue closes or a write
/// fails; returns why it stopped.
async fn write<W: AsyncWrite + Unpin>(mut io: W, mut frames: mpsc::Receiver<Vec<u8>>) -> String {
    while let Some(mut buf) = frames.recv().await {
        while buf.len() < WRITE_BATCH {
            match frames.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = io.write_all(&buf).await {
            return format!("broke: {e}");
        }
        if let Err(e) = io.flush().await {
            return format!("broke: {e}");
        }
    }
    let _ = io.close().await;
    "was closed".to_owned()
}

/// Serves inbound streams of one protocol.
struct Server<P: Protocol> {
    verified: Verified,
    activity: Activity,
    inbound: mpsc::Sender<Inbound<P>>,
    /// Inbound streams open per peer.
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<P: Protocol> Clone for Server<P> {
    fn clone(&self) -> Self {
        Server {
            verified: self.verified.clone(),
            activity: self.activity.clone(),
            inbound: self.inbound.clone(),
            open: self.open.clone(),
            tracker: self.tracker.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

impl<P: Protocol> Server<P> {
    async fn accept(self, mut incoming: libp2p_stream::IncomingStreams) {
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return,
                next = incoming.next() => next,
            };
            let Some((peer, stream)) = next else { return };
            {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                let n = open.entry(peer).or_default();
                if *n >= INBOUND_PER_PEER {
                    debug!(%peer, protocol = P::NAME, "refusing another stream: {INBOUND_PER_PEER} are open");
                    continue;
                }
                *n += 1;
            }
            let server = self.clone();
            self.tracker.spawn(async move {
                let why = tokio::select! {
                    _ = server.cancel.cancelled() => "the mesh is shut down".to_owned(),
                    why = server.serve(peer, stream) => why,
                };
                debug!(%peer, %why, protocol = P::NAME, "inbound stream ended");
                let mut open = server.open.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = open.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        open.remove(&peer);
                    }
                }
            });
        }
    }

    /// Reads requests from one stream and hands them to the protocol's consumer; answers go back on
    /// the stream as they are ready. Returns why the stream ended.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        peer: PeerId,
        stream: S,
    ) -> String {
        let (mut reader, writer) = split(stream);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let read = async {
            let mut body = Vec::new();
            loop {
                let len = match frame::read_len(&mut reader).await {
                    Ok(Some(len)) => len,
                    Ok(None) => return "was closed by the peer".to_owned(),
                    Err(e) => return format!("broke: {e}"),
                };
                if len > P::MAX_MESSAGE {
                    return format!(
                        "carried a frame of {len} bytes; the {} protocol carries at most {}",
                        P::LABEL,
                        P::MAX_MESSAGE
                    );
                }
                if len > UNVERIFIED_FRAME && !self.verified_within(&peer, VERIFY_WAIT).await {
                    return format!(
                        "carried a frame of {len} bytes from a peer that has not proven its \
                         membership (at most {UNVERIFIED_FRAME} are read from such a peer)"
                    );
                }
                if let Err(e) = frame::read_body(&mut reader, &mut body, len).await {
                    return format!("broke: {e}");
                }
                let (id, request) = match frame::read_request::<P>(&body) {
                    Ok(r) => r,
                    Err(why) => return format!("was garbled by the peer: {why}"),
                };
                let responder = Responder::new(id, tx.clone());
                if let Some(response) = self.take(peer, request, responder) {
                    let Ok(frame) = frame::response::<P>(id, &response) else {
                        continue;
                    };
                    if tx.send(frame).await.is_err() {
                        return "was closed".to_owned();
                    }
                }
            }
        };
        tokio::select! {
            why = read => why,
            why = write(writer, rx) => why,
        }
    }

    /// Whether `peer` is a verified member now, or becomes one within `wait`.
    async fn verified_within(&self, peer: &PeerId, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self
                .verified
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(peer)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // The event loop verifies proofs; this only waits to hear its verdict.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Passes a request to the protocol's consumer; otherwise returns the answer that says why
    /// not.
    fn take(
        &self,
        peer: PeerId,
        request: Result<P::Request, String>,
        responder: Responder<P>,
    ) -> Option<P::Response> {
        let request = match request {
            Ok(r) => r,
            Err(reason) => return Some(P::refused(reason)),
        };
        let member = self
            .verified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .cloned();
        let Some(member) = member else {
            // Often a member whose proof this node is still checking on a new connection: it
            // sends again; a non-member never gets further than this.
            return Some(P::busy(format!(
                "this node takes {} requests from verified members only, and has not verified \
                 yours (yet)",
                P::LABEL
            )));
        };
        if let Err(reason) = P::check(&request) {
            return Some(P::refused(reason));
        }
        self.activity.touch(peer);
        let inbound = Inbound {
            from: member,
            peer,
            request,
            responder,
        };
        self.inbound.try_send(inbound).err().map(|_| {
            P::busy(format!(
                "this node is overloaded with {} requests",
                P::LABEL
            ))
        })
    }
}

/// Frames on a link: a 4-byte big-endian length, then that many bytes of JSON —
/// `{"id": N, "request": ...}` from the stream's opener, `{"id": N, "response": ...}` back.
pub mod frame {
    use futures::{AsyncRead, AsyncReadExt as _};
    use serde::{Deserialize, Serialize};

    use super::Protocol;

    /// A frame's body is read this much at a time (and its buffer grown as it arrives).
    pub const READ_STEP: usize = 256 << 10;

    #[derive(Serialize)]
    struct RequestOut<'a, T> {
        id: u64,
        request: &'a T,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RequestIn<T> {
        id: u64,
        request: T,
    }

    #[derive(Serialize)]
    struct ResponseOut<'a, T> {
        id: u64,
        response: &'a T,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ResponseIn<T> {
        id: u64,
        response: T,
    }

    /// A frame whose body did not parse, read again for its id alone.
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }

    fn encode<P: Protocol, T: Serialize>(body: &T) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut out, body).map_err(|e| format!("cannot encode: {e}"))?;
        let len = out.len() - 4;
        if len > P::MAX_MESSAGE {
            return Err(format!(
                "the message is {len} bytes; the {} protocol carries at most {} (send fewer \
                 items per batch)",
                P::LABEL,
                P::MAX_MESSAGE
            ));
        }
        out[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(out)
    }

    /// A request frame, length prefix included.
    pub fn request<P: Protocol>(id: u64, request: &P::Request) -> Result<Vec<u8>, String> {
        encode::<P, _>(&RequestOut { id, request })
    }

    /// A response frame, length prefix included.
    pub fn response<P: Protocol>(id: u64, response: &P::Response) -> Result<Vec<u8>, String> {
        encode::<P, _>(&ResponseOut { id, response })
    }

    /// Reads a request frame's body. `Err`: not a frame at all (the stream is garbled);
    /// `Ok((id, Err(why)))`: a frame with an id whose request is malformed, to be refused.
    #[allow(clippy::type_complexity)]
    pub fn read_request<P: Protocol>(
        body: &[u8],
    ) -> Result<(u64, Result<P::Request, String>), String> {
        match serde_json::from_slice::<RequestIn<P::Request>>(body) {
            Ok(f) => Ok((f.id, Ok(f.request))),
            Err(e) => match serde_json::from_slice::<IdOnly>(body) {
                Ok(f) => Ok((f.id, Err(format!("malformed {} request: {e}", P::LABEL)))),
                Err(_) => Err(format!("not a {}-protocol frame: {e}", P::LABEL)),
            },
        }
    }

    /// Reads a response frame's body, like [`read_request`].
    #[allow(clippy::type_complexity)]
    pub fn read_response<P: Protocol>(
        body: &[u8],
    ) -> Result<(u64, Result<P::Response, String>), String> {
        match serde_json::from_slice::<ResponseIn<P::Response>>(body) {
            Ok(f) => Ok((f.id, Ok(f.response))),
            Err(e) => match serde_json::from_slice::<IdOnly>(body) {
                Ok(f) => Ok((f.id, Err(format!("malformed {} response: {e}", P::LABEL)))),
                Err(_) => Err(format!("not a {}-protocol frame: {e}", P::LABEL)),
            },
        }
    }

    /// Reads the next frame's body (at most `max` bytes) into `body`. `Ok(false)`: the stream
    /// ended cleanly between frames.
    pub async fn read<R: AsyncRead + Unpin>(
        io: &mut R,
        body: &mut Vec<u8>,
        max: usize,
    ) -> std::io::Result<bool> {
        let Some(len) = read_len(io).await? else {
            return Ok(false);
        };
        if len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes; the protocol carries at most {max}"),
            ));
        }
        read_body(io, body, len).await?;
        Ok(true)
    }

    /// Reads the next frame's length; `None`: the stream ended cleanly between frames.
    pub async fn read_len<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<Option<usize>> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match io.read(&mut len[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        Ok(Some(u32::from_be_bytes(len) as usize))
    }

    /// Reads a frame's body of `len` bytes (its length already read, and checked by the caller)
    /// into `body`.
    pub async fn read_body<R: AsyncRead + Unpin>(
        io: &mut R,
        body: &mut Vec<u8>,
        len: usize,
    ) -> std::io::Result<()> {
        // The buffer grows with the bytes that arrive, not with what the header claims: a peer
        // cannot make this node hold more memory than it sends.
        body.clear();
        let mut rest = len;
        while rest > 0 {
            let start = body.len();
            let step = rest.min(READ_STEP);
            body.resize(start + step, 0);
            io.read_exact(&mut body[start..]).await?;
            rest -= step;
        }
        Ok(())
    }
}
