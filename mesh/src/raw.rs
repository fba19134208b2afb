//! Raw byte streams to members, for a protocol of a crate's own that is not request/response
//! (the data plane's tunnel through a relay). Like [`crate::links`], only verified members get
//! through: a stream from a peer whose membership this node has not verified is dropped.

use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::links::Verified;

/// A byte stream to or from a member (tokio's `AsyncRead + AsyncWrite`).
pub type RawStream = Compat<libp2p::Stream>;

/// How many inbound streams wait for their consumer before more are dropped.
const INBOUND_QUEUE: usize = 64;

/// Opens raw streams of one protocol to members.
pub struct RawStreams {
    control: tokio::sync::Mutex<libp2p_stream::Control>,
    protocol: StreamProtocol,
    verified: Verified,
}

impl std::fmt::Debug for RawStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStreams")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl RawStreams {
    pub(crate) fn start(
        mut control: libp2p_stream::Control,
        protocol: &'static str,
        verified: Verified,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(RawStreams, mpsc::Receiver<(PeerId, RawStream)>), String> {
        let protocol = StreamProtocol::new(protocol);
        let mut incoming = control
            .accept(protocol.clone())
            .map_err(|e| format!("cannot serve {protocol}: {e}"))?;
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        let members = verified.clone();
        tracker.spawn(async move {
            use futures::StreamExt as _;
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    next = incoming.next() => next,
                };
                let Some((peer, stream)) = next else { return };
                let member = members
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&peer);
                if !member {
                    debug!(%peer, "raw stream from a peer not verified: dropped");
                    continue;
                }
                if tx.try_send((peer, stream.compat())).is_err() {
                    debug!(%peer, "raw stream dropped: its consumer is behind or gone");
                }
            }
        });
        Ok((
            RawStreams {
                control: tokio::sync::Mutex::new(control),
                protocol,
                verified,
            },
            rx,
        ))
    }

    /// Opens a stream to `peer`, which must be a verified member this node is connected to
    /// (directly or through a relay).
    pub async fn open(&self, peer: PeerId) -> Result<RawStream, String> {
        let member = self
            .verified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&peer);
        if !member {
            return Err(format!("{peer} is not a connected member"));
        }
        let mut control = self.control.lock().await.clone();
        control
            .open_stream(peer, self.protocol.clone())
            .await
            .map(|s| s.compat())
            .map_err(|e| format!("cannot open {} to {peer}: {e}", self.protocol))
    }
}
