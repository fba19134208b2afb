//! The task protocol's streams ([`crate::tasks::frame`]).
//!
//! A node sends its task requests to a peer over one long-lived stream, its *link* to that
//! peer, opened on first use and opened again after it breaks. Requests are tagged with an id;
//! the peer answers on the same stream, tagged with the id answered, in any order. Streams are
//! read and written by their own tasks, outside the swarm's event loop: a task message costs a
//! frame on a stream, not a new stream and two trips through the event loop on each side.
//!
//! Inbound streams are served the same way. Every request on them is checked against the
//! members this node has verified, as it arrives (a peer may open a stream while its proof is
//! still being checked: it is told to come back, [`TaskResponse::Busy`]).
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
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::membership::Member;
use crate::network::{Error, Inbound, Responder};
use crate::tasks::{PROTOCOL, TaskRequest, TaskResponse, frame};

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
/// Inbound task streams one peer may hold open at once: its link, its bulk streams, and room
/// for streams it has finished with that this side has not seen end yet.
const INBOUND_PER_PEER: usize = 8;
/// A request frame larger than this goes on a stream of its own.
pub const BULK_FRAME: usize = 256 << 10;
/// Bulk streams open to one peer at once.
const BULK_PER_PEER: usize = 2;

/// Members whose proofs this node has verified, as the event loop last saw them.
pub(crate) type Verified = Arc<RwLock<HashMap<PeerId, Member>>>;

type Reply = oneshot::Sender<Result<TaskResponse, Error>>;

/// The requests waiting for answers on one link.
#[derive(Default)]
struct Pending {
    replies: HashMap<u64, Reply>,
    /// Set once the link is broken: no request joins it after that.
    broken: Option<String>,
}

/// One outbound stream to a peer.
struct Link {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
}

impl Link {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
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
            let _ = reply.send(Err(Error::Request(why.to_owned())));
        }
    }

    fn answer(&self, id: u64, answer: Result<TaskResponse, Error>) {
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
enum Sent {
    /// On the peer's link, under `id`.
    Link {
        link: Arc<Link>,
        id: u64,
        answer: oneshot::Receiver<Result<TaskResponse, Error>>,
        /// The frame still to be sent, when the link's queue was full.
        queued: Option<(mpsc::Sender<Vec<u8>>, Vec<u8>)>,
    },
    /// Too large for the link: for a stream of its own.
    Bulk(Vec<u8>),
}

/// The task streams of one node: its links to peers and the service of inbound streams.
#[derive(Clone)]
pub(crate) struct Links {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").finish_non_exhaustive()
    }
}

struct Inner {
    control: Mutex<libp2p_stream::Control>,
    links: Mutex<HashMap<PeerId, Arc<Link>>>,
    /// Per peer: permits for bulk streams.
    bulk: Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Links {
    /// Starts serving inbound task streams (requests from verified members go to `inbound`).
    pub(crate) fn start(
        mut control: libp2p_stream::Control,
        verified: Verified,
        inbound: mpsc::Sender<Inbound>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Links, Error> {
        let incoming = control
            .accept(StreamProtocol::new(PROTOCOL))
            .map_err(|e| Error::Build(format!("cannot serve {PROTOCOL}: {e}")))?;
        let server = Server {
            verified,
            inbound,
            open: Arc::new(Mutex::new(HashMap::new())),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        };
        tracker.spawn(server.accept(incoming));
        Ok(Links {
            inner: Arc::new(Inner {
                control: Mutex::new(control),
                links: Mutex::new(HashMap::new()),
                bulk: Mutex::new(HashMap::new()),
                cancel,
                tracker,
            }),
        })
    }

    /// Sends a request to `peer` now; the future is its answer.
    pub(crate) fn request(
        &self,
        peer: PeerId,
        request: &TaskRequest,
    ) -> impl Future<Output = Result<TaskResponse, Error>> + Send + 'static + use<> {
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
                        Err(Error::Request(format!("the task stream to {peer} closed"))),
                    );
                }
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => {
                    link.pending().replies.remove(&id);
                    Err(Error::Request(format!(
                        "{peer} did not answer a task request within {REQUEST_TIMEOUT:?}"
                    )))
                }
            }
        }
    }

    /// Sends one large request on a stream of its own and reads its answer.
    async fn bulk(&self, peer: PeerId, frame: Vec<u8>) -> Result<TaskResponse, Error> {
        let permits = self
            .inner
            .bulk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(BULK_PER_PEER)))
            .clone();
        let failed = |why: String| Error::Request(format!("the bulk task stream to {peer} {why}"));
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
                control.open_stream(peer, StreamProtocol::new(PROTOCOL)),
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
            next_frame(&mut reader, &mut body).await.map_err(failed)?;
            let _ = writer.close().await;
            match frame::read_response(&body) {
                Ok((_, answer)) => answer.map_err(Error::Request),
                Err(why) => Err(failed(format!("was garbled by the peer: {why}"))),
            }
        };
        tokio::select! {
            _ = self.inner.cancel.cancelled() => Err(Error::Closed),
            answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange) => answer.unwrap_or_else(|_| {
                Err(Error::Request(format!(
                    "{peer} did not answer a task request within {REQUEST_TIMEOUT:?}"
                )))
            }),
        }
    }

    /// Registers and queues a request on the peer's link (`queued` is the frame still to be
    /// sent when the link's queue was full), or hands back a large one for a stream of its own.
    fn send(&self, peer: PeerId, request: &TaskRequest) -> Result<Sent, Error> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        // A link found broken is replaced once; a second broken one is a real failure.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let link = self.link(peer);
            let id = link.next_id.fetch_add(1, Ordering::Relaxed);
            let frame = frame::request(id, request).map_err(Error::Request)?;
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
                    return Err(Error::Request(why.clone()));
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
    fn link(&self, peer: PeerId) -> Arc<Link> {
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
            debug!(%peer, %why, "task stream ended");
            opened.break_with(&format!("the task stream to {peer} {why}"));
            this.forget(peer, &opened);
        });
        link
    }

    /// Drops the peer's link if it is still `link`.
    fn forget(&self, peer: PeerId, link: &Arc<Link>) {
        let mut links = self.inner.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(&peer).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(&peer);
        }
    }
}

/// Opens the link's stream and runs it until it breaks; returns why it ended.
async fn drive(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    link: &Link,
    frames: mpsc::Receiver<Vec<u8>>,
) -> String {
    let stream = match tokio::time::timeout(
        OPEN_TIMEOUT,
        control.open_stream(peer, StreamProtocol::new(PROTOCOL)),
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
            if let Err(why) = next_frame(&mut reader, &mut body).await {
                return why;
            }
            match frame::read_response(&body) {
                Ok((id, answer)) => link.answer(id, answer.map_err(Error::Request)),
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
async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    match frame::read(reader, body).await {
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

/// Serves inbound task streams.
#[derive(Clone)]
struct Server {
    verified: Verified,
    inbound: mpsc::Sender<Inbound>,
    /// Inbound streams open per peer.
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Server {
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
                    debug!(%peer, "refusing another task stream: {INBOUND_PER_PEER} are open");
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
                debug!(%peer, %why, "inbound task stream ended");
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

    /// Reads requests from one stream and hands them to the task service; answers go back on
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
                if let Err(why) = next_frame(&mut reader, &mut body).await {
                    return why;
                }
                let (id, request) = match frame::read_request(&body) {
                    Ok(r) => r,
                    Err(why) => return format!("was garbled by the peer: {why}"),
                };
                let responder = Responder::new(id, tx.clone());
                if let Some(response) = self.take(peer, request, responder) {
                    let Ok(frame) = frame::response(id, &response) else {
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

    /// Passes a request to the task service; otherwise returns the answer that says why not.
    fn take(
        &self,
        peer: PeerId,
        request: Result<TaskRequest, String>,
        responder: Responder,
    ) -> Option<TaskResponse> {
        let request = match request {
            Ok(r) => r,
            Err(reason) => return Some(TaskResponse::Refused { reason }),
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
            return Some(TaskResponse::Busy {
                reason: "this node takes tasks from verified members only, and has not \
                         verified yours (yet)"
                    .into(),
            });
        };
        if let Err(reason) = request.check() {
            return Some(TaskResponse::Refused { reason });
        }
        let inbound = Inbound {
            from: member,
            peer,
            request,
            responder,
        };
        self.inbound
            .try_send(inbound)
            .err()
            .map(|_| TaskResponse::Busy {
                reason: "this node is overloaded with task requests".into(),
            })
    }
}
