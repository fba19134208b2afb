//! Large values by reference: what the task service needs of its node's blob store and data
//! plane. Arguments over the inline limit are stored as a blob by the submitter and fetched by
//! the endpoint; results over it are streamed by the worker into a blob on the endpoint's node
//! and fetched by the submitter. The node implements [`Blobs`] (the `transfer` crate holds the
//! store and the data plane); an endpoint without it sends everything inline.

use std::sync::Arc;

use futures::future::BoxFuture;
use mesh::PeerId;
use serde_json::Value;

use crate::task::ValueRef;

/// The largest arguments a task may pass by reference: an endpoint holds them in memory from
/// their fetch until the task runs, and sends them to the worker in one frame.
pub const MAX_ARGUMENTS_BY_REFERENCE: u64 = 256 << 20;

/// A node's blob store and data plane, as the task service uses them.
pub trait Blobs: Send + Sync + 'static {
    /// Stores `bytes`; returns their reference.
    fn put(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<ValueRef, String>>;
    /// Whether this node holds `value` whole.
    fn holds(&self, value: &ValueRef) -> bool;
    /// Makes `value` held here, fetching it over the data plane from `from` unless it already is.
    fn fetch(&self, value: &ValueRef, from: PeerId) -> BoxFuture<'static, Result<(), String>>;
    /// The bytes of a value held here.
    fn read(&self, value: &ValueRef) -> BoxFuture<'static, Result<Vec<u8>, String>>;
    /// A value held here, to read as a stream (blocking reads).
    fn reader(&self, value: &ValueRef) -> Result<Box<dyn std::io::Read + Send>, String>;
    /// A spool to write a new value into as it arrives (a worker's result).
    fn spool(&self) -> Result<Box<dyn Spool>, String>;
    /// This node no longer needs `value` (the task that held it is gone).
    fn release(&self, value: &ValueRef);
    /// This node's peer id (where others fetch what it holds).
    fn node(&self) -> String;
}

/// A value being written; dropped unfinished, it leaves nothing behind.
pub trait Spool: Send {
    /// Appends bytes.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Stores what was written; its reference.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<ValueRef, String>>;
}

/// How a node passes large values: its blobs, and the size past which a value goes by
/// reference.
#[derive(Clone)]
pub struct Values {
    /// The node's blobs.
    pub blobs: Arc<dyn Blobs>,
    /// Values whose JSON is larger than this go by reference.
    pub inline_limit: u64,
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Values")
            .field("inline_limit", &self.inline_limit)
            .finish_non_exhaustive()
    }
}

/// Arguments as a blob holds them.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arguments {
    /// Positional arguments (a JSON array, or pickled: a base64 string).
    #[serde(default)]
    pub args: Value,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Value,
}

/// Stores `args` and `kwargs` as one blob: the reference to put in a submission.
pub async fn put_arguments(
    blobs: &dyn Blobs,
    args: Value,
    kwargs: Value,
) -> Result<ValueRef, String> {
    let bytes =
        tokio::task::spawn_blocking(move || serde_json::to_vec(&Arguments { args, kwargs }))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    blobs.put(bytes).await
}

/// Fetches a task's arguments from `from` (its submitter) and reads them. The error says what
/// failed, for the task's failure.
pub async fn fetch_arguments(
    blobs: Arc<dyn Blobs>,
    value: ValueRef,
    from: PeerId,
) -> Result<Arguments, String> {
    blobs.fetch(&value, from).await.map_err(|e| {
        format!(
            "the task's arguments (blob {}, {} bytes) could not be fetched from its submitter \
             {from}: {e}",
            value.blake3, value.size
        )
    })?;
    let bytes = blobs.read(&value).await?;
    if bytes.len() as u64 != value.size {
        return Err(format!(
            "the arguments' blob {} holds {} bytes, not the {} its reference says",
            value.blake3,
            bytes.len(),
            value.size
        ));
    }
    tokio::task::spawn_blocking(move || serde_json::from_slice::<Arguments>(&bytes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "the arguments' blob {} is not {{\"args\": […], \"kwargs\": {{…}}}} JSON: {e}",
                value.blake3
            )
        })
}
