//! A node's task service: both sides of the task lifecycle wired to the mesh.
//!
//! [`start`] starts this node's endpoints, the serving side (`serve.rs`) and the submitting
//! side ([`crate::submit`]), and the loops between them and the mesh: inbound requests from
//! members, results back to their submitters, this node's advert. Both sides send requests
//! through `Peers`: to another member over the mesh's links, or to this node's own server
//! without the wire, so a task for a local endpoint takes the same path minus the network.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crdt_registry::record::Policy;
use futures::future::BoxFuture;
use mesh::membership::Member;
use mesh::{Links, PeerId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::routing::{ADVERT_TOPIC, ADVERT_VERSION, Advert, EndpointLoad};
use crate::serve::{Server, endpoint_load};
use crate::submit::{Dispatcher, Transport};
use crate::task::{Record, TaskId};
use crate::wire::{TaskProtocol, TaskRequest, TaskResponse};

/// What the task service runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's endpoints, with their access policies.
    pub endpoints: Vec<(crate::EndpointConfig, Policy)>,
    /// An endpoint whose node has not advertised for this long is lost.
    pub lost_after: Duration,
    /// Finished tasks are kept this long.
    pub retention: Duration,
    /// How long a task with retries left waits for an endpoint that can take its retry.
    pub route_wait: Duration,
    /// Where both sides count what they do.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// How large values pass between this node and others (`None`: all inline).
    pub values: Option<crate::blobs::Values>,
}

/// Why the task service did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An endpoint did not start.
    #[error("endpoint `{name}`: {source}")]
    Endpoint {
        /// The endpoint.
        name: String,
        /// Why.
        source: crate::Error,
    },
    /// The mesh would not serve the task protocol.
    #[error("cannot serve the task protocol: {0}")]
    Mesh(#[from] mesh::network::StartError),
    /// The dispatcher could not read its stored tasks.
    #[error(transparent)]
    Dispatcher(#[from] crate::submit::Error),
}

/// The running task service.
#[derive(Debug, Clone)]
pub struct Tasks {
    /// The submitting side.
    pub dispatcher: Dispatcher,
    /// Access policies, the directory, and the capability tokens this node holds.
    pub access: Arc<Access>,
    /// This node's links of the task protocol (what the dispatcher sends on).
    pub links: Links<TaskProtocol>,
}

/// Requests of one peer handled at once; more are answered "busy".
const HANDLERS_PER_PEER: usize = 256;

/// Counts the requests being handled per peer, up to a bound.
#[derive(Clone)]
struct InFlight {
    most: usize,
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One request being handled; dropping it frees its place.
struct Slot {
    peer: PeerId,
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl InFlight {
    fn new(most: usize) -> InFlight {
        InFlight {
            most,
            per_peer: Arc::default(),
        }
    }

    /// A place for one more request of `peer`, if it has fewer than the bound in flight.
    fn enter(&self, peer: PeerId) -> Option<Slot> {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= self.most {
            return None;
        }
        *n += 1;
        Some(Slot {
            peer,
            per_peer: self.per_peer.clone(),
        })
    }
}

impl Drop for Slot {
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

/// Sends task requests: to another member over the mesh's links, to this node's own server
/// directly.
#[derive(Clone)]
pub(crate) struct Peers {
    me: PeerId,
    links: Links<TaskProtocol>,
    server: Arc<Server>,
}

impl Transport for Peers {
    fn request(
        &self,
        peer: PeerId,
        request: TaskRequest,
    ) -> BoxFuture<'static, Result<TaskResponse, String>> {
        if peer == self.me {
            let server = self.server.clone();
            Box::pin(async move {
                let own = server.own.clone();
                Ok(server.handle(&own, peer, request).await)
            })
        } else {
            let answer = self.links.request(peer, &request);
            Box::pin(async move { answer.await.map_err(|e| e.to_string()) })
        }
    }
}

/// Starts the endpoints of `config`, the dispatcher, and the loops between them and the mesh.
/// `node_key` names this node's endpoints in the registry; `access` is the node's verifier and
/// the tokens it holds (kept fresh by the caller).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    mesh: &mesh::Handle,
    store: &store::Store,
    node_key: crdt_registry::Key,
    work_dir: &Path,
    config: &Config,
    own: &Member,
    access: Arc<Access>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Tasks, Error> {
    let me = mesh.peer_id();
    let label: String = me.to_string().chars().rev().take(10).collect();
    let mut endpoints = HashMap::new();
    let mut endpoint_ids = HashMap::new();
    let mut results = Vec::new();
    for (section, policy) in &config.endpoints {
        let (ep, rx) = crate::Endpoint::start(
            section.clone(),
            config.values.clone(),
            store.clone(),
            work_dir,
            &label,
            cancel.child_token(),
            tracker,
        )
        .await
        .map_err(|source| Error::Endpoint {
            name: section.name.clone(),
            source,
        })?;
        results.push((ep.clone(), rx));
        endpoint_ids.insert(
            section.name.clone(),
            crdt_registry::record::EndpointRecord::id_for(&node_key, &section.name),
        );
        endpoints.insert(section.name.clone(), (ep, *policy));
    }
    let (links, mut inbound) = mesh.links::<TaskProtocol>()?;
    let (dispatcher, inbox) = crate::submit::channel();
    let server = Arc::new(Server {
        own: own.clone(),
        endpoints,
        endpoint_ids,
        access: access.clone(),
        dispatcher: dispatcher.clone(),
        delivering: Mutex::new(HashSet::new()),
    });
    let peers = Peers {
        me,
        links: links.clone(),
        server: server.clone(),
    };
    crate::submit::start(
        inbox,
        mesh.clone(),
        store.clone(),
        crate::submit::Config {
            lost_after: config.lost_after,
            retention: config.retention,
            route_wait: config.route_wait,
            institution: own.institution.clone(),
            metrics: config.metrics.clone(),
            access: access.clone(),
            values: config.values.clone(),
        },
        Arc::new(peers.clone()),
        cancel.child_token(),
        tracker,
    )
    .await?;

    // Inbound requests from members, each handled by a task of its own, at most
    // `HANDLERS_PER_PEER` at once per peer: past that a peer is told to come back later.
    {
        let server = server.clone();
        let cancel = cancel.clone();
        let t = tracker.clone();
        let in_flight = InFlight::new(HANDLERS_PER_PEER);
        tracker.spawn(async move {
            loop {
                let req = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = inbound.recv() => match r { Some(r) => r, None => break },
                };
                let Some(slot) = in_flight.enter(req.peer) else {
                    let busy = TaskResponse::Busy {
                        reason: format!(
                            "this node is handling {HANDLERS_PER_PEER} requests of yours already"
                        ),
                    };
                    t.spawn(req.responder.respond(busy));
                    continue;
                };
                let server = server.clone();
                let span = tracing::debug_span!("task_request", peer = %req.peer);
                t.spawn(tracing::Instrument::instrument(
                    async move {
                        let _slot = slot;
                        let resp = server.handle(&req.from, req.peer, req.request).await;
                        req.responder.respond(resp).await;
                    },
                    span,
                ));
            }
        });
    }

    // Finished tasks back to their submitters: at once, and again from the outbox until
    // acknowledged.
    for (ep, mut rx) in results {
        let server = server.clone();
        let peers = peers.clone();
        let cancel = cancel.clone();
        let t = tracker.clone();
        tracker.spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_secs(2));
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let batch = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = rx.recv() => match r {
                        Some(first) => {
                            let mut batch = vec![first];
                            while batch.len() < 1024 {
                                match rx.try_recv() { Ok(r) => batch.push(r), Err(_) => break }
                            }
                            batch
                        }
                        None => break,
                    },
                    _ = sweep.tick() => {
                        let busy = server.delivering.lock().expect("not poisoned").clone();
                        ep.unacknowledged(busy).await.unwrap_or_default()
                    }
                };
                deliver(&server, &peers, &ep, batch, &t);
            }
        });
    }

    // Advertise this node's endpoints' load.
    if !server.endpoints.is_empty() {
        let server = server.clone();
        let metrics = config.metrics.clone();
        let mesh = mesh.clone();
        let dispatcher = dispatcher.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<(Vec<EndpointLoad>, Instant)> = None;
            let mut seq = crate::task::now_us();
            // The heartbeat stretches with the federation (`advert_heartbeat`), from the
            // registry's count of nodes with endpoints, looked at every 10 s.
            let mut heartbeat = crate::routing::advert_heartbeat(0);
            let mut counted: Option<Instant> = None;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if counted.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    counted = Some(Instant::now());
                    let nodes = mesh
                        .registry_with(|v| {
                            v.endpoints
                                .values()
                                .map(|e| e.peer_id.as_str())
                                .collect::<std::collections::HashSet<_>>()
                                .len()
                        })
                        .await;
                    if let Ok(n) = nodes {
                        heartbeat = crate::routing::advert_heartbeat(n);
                    }
                }
                let mut loads = Vec::new();
                let mut names: Vec<&String> = server.endpoints.keys().collect();
                names.sort();
                for name in names {
                    let (ep, _) = &server.endpoints[name];
                    loads.push(endpoint_load(name, &ep.current_load()));
                }
                metrics.loads(&loads);
                let due = match &last {
                    None => true,
                    Some((prev, at)) => {
                        let age = at.elapsed();
                        (age >= Duration::from_secs(1) && *prev != loads) || age >= heartbeat
                    }
                };
                if !due {
                    continue;
                }
                seq += 1;
                let advert = Advert {
                    v: ADVERT_VERSION,
                    seq,
                    at_ms: crate::task::now_us() / 1000,
                    endpoints: loads.clone(),
                };
                let _ = dispatcher.own_advert(advert.clone()).await;
                // No peers subscribed yet is normal right after start.
                let _ = mesh.publish(ADVERT_TOPIC, advert.encode()).await;
                last = Some((loads, Instant::now()));
            }
        });
    }
    Ok(Tasks {
        dispatcher,
        access,
        links,
    })
}

/// Sends finished tasks back to their submitters (this node's own through its dispatcher,
/// without the wire); acknowledged ones leave the endpoint's outbox.
fn deliver(
    service: &Arc<Server>,
    peers: &Peers,
    ep: &crate::Endpoint,
    batch: Vec<Record>,
    tracker: &TaskTracker,
) {
    let mut by_peer: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for r in batch {
        by_peer.entry(r.submitter.clone()).or_default().push(r);
    }
    // Each message within half of what the task protocol carries (a result may be up to the
    // endpoint's result limit): a batch too large to encode would never be delivered.
    let budget = crate::wire::MAX_MESSAGE / 2;
    let mut sends: Vec<(String, Vec<Record>)> = Vec::new();
    for (peer, records) in by_peer {
        let mut part: Vec<Record> = Vec::new();
        let mut bytes = 0;
        for r in records {
            let size = r.size_bound();
            if !part.is_empty() && bytes + size > budget {
                sends.push((peer.clone(), std::mem::take(&mut part)));
                bytes = 0;
            }
            bytes += size;
            part.push(r);
        }
        if !part.is_empty() {
            sends.push((peer, part));
        }
    }
    for (peer, records) in sends {
        let Ok(peer) = peer.parse::<PeerId>() else {
            // A submitter that is not a peer id cannot be answered: drop it from the outbox.
            let ep = ep.clone();
            let ids = records.into_iter().map(|r| r.id).collect();
            tracker.spawn(async move { ep.acknowledge(ids).await });
            continue;
        };
        let ids: Vec<TaskId> = records.iter().map(|r| r.id.clone()).collect();
        tracing::debug!(%peer, results = ids.len(), "sending results");
        tracing::trace!(%peer, tasks = ?ids, "sending results");
        service
            .delivering
            .lock()
            .expect("not poisoned")
            .extend(ids.iter().cloned());
        let service = service.clone();
        let ep = ep.clone();
        let loads = vec![endpoint_load(ep.name(), &ep.current_load())];
        // A remote submitter's results are queued for the mesh now, before the wait is spawned.
        let answer = peers.request(peer, TaskRequest::Results { records, loads });
        tracker.spawn(async move {
            let acked = matches!(answer.await, Ok(TaskResponse::Acknowledged));
            if acked {
                let _ = ep.acknowledge(ids.clone()).await;
            }
            let mut d = service.delivering.lock().expect("not poisoned");
            for id in &ids {
                d.remove(id);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        mesh::Keypair::ed25519_from_bytes([n; 32])
            .expect("32 bytes are an ed25519 secret")
            .public()
            .to_peer_id()
    }

    #[test]
    fn a_peer_gets_at_most_its_share_of_request_handlers() {
        let f = InFlight::new(2);
        let a1 = f.enter(peer(1)).expect("first");
        let a2 = f.enter(peer(1)).expect("second");
        assert!(f.enter(peer(1)).is_none(), "a third of the same peer waits");
        let b = f.enter(peer(2)).expect("another peer is not held up");
        drop(a1);
        let a3 = f.enter(peer(1)).expect("a place was freed");
        drop((a2, a3, b));
        assert!(
            f.per_peer.lock().expect("not poisoned").is_empty(),
            "idle peers leave no entry"
        );
    }
}
