//! Large task values on a node: the compute side's [`compute::blobs::Blobs`] on this node's blob
//! store and data plane, and the step that puts a submission's large arguments in a blob.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use compute::blobs::{Blobs, Spool, Values};
use compute::task::ValueRef;
use futures::future::BoxFuture;
use mesh::PeerId;
use transfer::net::DataPlane;
use transfer::{BlobStore, Hash};

/// Rounds of refetching a blob whose chunk groups do not verify.
const ATTEMPTS: usize = 8;
/// How long a value's fetch keeps trying a member it cannot reach (one that restarted listens
/// elsewhere until the registry says where).
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// This node's blobs, as tasks use them.
pub(crate) struct NodeBlobs {
    store: BlobStore,
    plane: DataPlane,
    mesh: mesh::Handle,
}

/// The task service's view of this node's blobs: values over `inline_limit` go by reference.
pub(crate) fn values(
    store: BlobStore,
    plane: DataPlane,
    mesh: mesh::Handle,
    inline_limit: u64,
) -> Values {
    Values {
        blobs: Arc::new(NodeBlobs { store, plane, mesh }),
        inline_limit,
    }
}

fn hash_of(value: &ValueRef) -> Result<Hash, String> {
    value
        .blake3
        .parse()
        .map_err(|e: transfer::Error| e.to_string())
}

fn reference(hash: Hash, size: u64) -> ValueRef {
    ValueRef {
        blake3: hash.to_string(),
        size,
    }
}

/// The data-plane address `peer` publishes in the registry.
pub(crate) async fn data_addr(mesh: &mesh::Handle, peer: PeerId) -> Result<SocketAddr, String> {
    let p = peer.to_string();
    mesh.registry_with(move |view| view.nodes.get(&p).and_then(|n| n.data_addr.clone()))
        .await
        .map_err(|e| e.to_string())?
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("node {peer} publishes no data-plane address in the registry"))
}

impl Blobs for NodeBlobs {
    fn put(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<ValueRef, String>> {
        let store = self.store.clone();
        Box::pin(async move {
            let (hash, size) =
                tokio::task::spawn_blocking(move || store.import(std::io::Cursor::new(bytes)))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot store the value: {e}"))?;
            Ok(reference(hash, size))
        })
    }

    fn holds(&self, value: &ValueRef) -> bool {
        hash_of(value).is_ok_and(|h| self.store.size(&h) == Some(value.size))
    }

    fn fetch(&self, value: &ValueRef, from: PeerId) -> BoxFuture<'static, Result<(), String>> {
        let (store, plane, mesh) = (self.store.clone(), self.plane.clone(), self.mesh.clone());
        let value = value.clone();
        Box::pin(async move {
            let hash = hash_of(&value)?;
            if let Some(size) = store.size(&hash) {
                store.touch(&hash);
                return if size == value.size {
                    Ok(())
                } else {
                    Err(format!(
                        "blob {hash} holds {size} bytes, not the {} its reference says",
                        value.size
                    ))
                };
            }
            if from == mesh.peer_id() {
                return Err(format!("this node no longer holds blob {hash}"));
            }
            // A member that just restarted listens elsewhere, and the registry may still say
            // where it was: ask again, looking its address up each time, for a while.
            let started = std::time::Instant::now();
            let mut wait = std::time::Duration::from_millis(200);
            let size = loop {
                let got = match data_addr(&mesh, from).await {
                    Ok(addr) => {
                        tracing::debug!(%hash, %from, %addr, "fetching a task's value");
                        plane.fetch(from, addr, hash, ATTEMPTS).await.map_err(|e| {
                            (
                                matches!(e, transfer::net::Error::Refused { .. }),
                                e.to_string(),
                            )
                        })
                    }
                    Err(e) => Err((false, e)),
                };
                match got {
                    Ok((size, _)) => break size,
                    // The member answered: it does not have it. Asking again changes nothing.
                    Err((true, e)) => return Err(e),
                    Err((false, e)) if started.elapsed() + wait > PATIENCE => {
                        return Err(format!(
                            "{e} (still failing after {} s)",
                            started.elapsed().as_secs()
                        ));
                    }
                    Err((false, e)) => {
                        tracing::debug!(%hash, %from, error = %e, "fetching a task's value failed; trying again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            };
            if size != value.size {
                store.remove(&hash);
                return Err(format!(
                    "blob {hash} holds {size} bytes, not the {} its reference says",
                    value.size
                ));
            }
            Ok(())
        })
    }

    fn read(&self, value: &ValueRef) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let store = self.store.clone();
        let value = value.clone();
        Box::pin(async move {
            let hash = hash_of(&value)?;
            let path = store.path(&hash).map_err(|e| e.to_string())?;
            tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read blob {hash}: {e}"))
        })
    }

    fn reader(&self, value: &ValueRef) -> Result<Box<dyn std::io::Read + Send>, String> {
        let hash = hash_of(value)?;
        let path = self.store.path(&hash).map_err(|e| e.to_string())?;
        let file =
            std::fs::File::open(&path).map_err(|e| format!("cannot read blob {hash}: {e}"))?;
        Ok(Box::new(file))
    }

    fn spool(&self) -> Result<Box<dyn Spool>, String> {
        let file = tempfile::NamedTempFile::with_prefix_in(".spool-", self.store.dir())
            .map_err(|e| format!("cannot make a spool file in the blob store: {e}"))?;
        Ok(Box::new(NodeSpool {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            store: self.store.clone(),
        }))
    }

    fn release(&self, value: &ValueRef) {
        if let Ok(h) = hash_of(value) {
            self.store.remove(&h);
        }
    }

    fn node(&self) -> String {
        self.mesh.peer_id().to_string()
    }
}

/// A value being written into the blob store.
struct NodeSpool {
    out: std::io::BufWriter<tempfile::NamedTempFile>,
    store: BlobStore,
}

impl Spool for NodeSpool {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<ValueRef, String>> {
        let NodeSpool { out, store } = *self;
        Box::pin(async move {
            let file = out
                .into_inner()
                .map_err(|e| format!("cannot write the value: {}", e.error()))?;
            let (hash, size) = tokio::task::spawn_blocking(move || {
                store.adopt(file, transfer::blob::Durability::Written)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot store the value: {e}"))?;
            Ok(reference(hash, size))
        })
    }
}

/// Puts large arguments in blobs: a request whose arguments' JSON may exceed the inline limit
/// gets them by reference. A request that names a blob must name one this node holds.
pub(crate) async fn by_reference(
    values: &Values,
    request: &mut compute::submit::Request,
) -> Result<(), String> {
    if let Some(r) = &request.args_ref {
        r.check().map_err(|e| format!("args_ref: {e}"))?;
        if !values.blobs.holds(r) {
            return Err(format!(
                "args_ref names blob {} ({} bytes), which this node does not hold: upload it \
                 first (POST /v1/blobs, or `funcmesh transfer put FILE`)",
                r.blake3, r.size
            ));
        }
        return Ok(());
    }
    let bound = compute::task::json_size_bound(&request.args)
        + compute::task::json_size_bound(&request.kwargs);
    if bound as u64 <= values.inline_limit {
        return Ok(());
    }
    let args = std::mem::take(&mut request.args);
    let kwargs = std::mem::take(&mut request.kwargs);
    request.args_ref =
        Some(compute::blobs::put_arguments(values.blobs.as_ref(), args, kwargs).await?);
    Ok(())
}
