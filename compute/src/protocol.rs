//! The worker protocol, version 1: frames over a worker's stdin and stdout.
//!
//! A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. The worker speaks
//! first (`hello`, with its protocol version); the endpoint then sends batches of tasks (`run`),
//! cancellations of tasks not yet started (`cancel`) and `exit`; the worker answers each task
//! with one `result`, in the order it received them, and flushes results at least every
//! millisecond while busy and at once when idle. A result larger than the task's
//! `inline_limit` is spilled: its frame says `spill: N`, and the value's JSON follows as N raw
//! bytes, which the endpoint streams into a blob. `worker.py` is the Python side.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this endpoint speaks.
pub const VERSION: u32 = 1;

/// Largest frame accepted from a worker when no result limit says otherwise.
pub const MAX_FRAME: usize = 64 << 20;

/// What a worker sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum FromWorker {
    /// The first frame.
    Hello {
        /// Its protocol version.
        v: u32,
        /// Its process id, inside its environment.
        #[serde(default)]
        pid: u64,
        /// Its Python version.
        #[serde(default)]
        python: String,
        /// Whether it can run pickled functions.
        #[serde(default)]
        cloudpickle: bool,
    },
    /// One task's result.
    Result(WorkerResult),
    /// A running function stores a file as a blob: its bytes, `spill` of them, follow raw.
    Put {
        /// The task.
        id: String,
        /// The file's size.
        spill: u64,
    },
    /// A running function asks for a blob (fetched from the task's submitter unless held).
    Get {
        /// The task.
        id: String,
        /// The blob.
        #[serde(rename = "ref")]
        value: crate::task::ValueRef,
        /// The member to fetch it from (a peer id; default: the task's submitter).
        #[serde(default)]
        from: Option<String>,
    },
}

/// One task's result from a worker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkerResult {
    /// The task.
    pub id: String,
    /// Whether it returned.
    pub ok: bool,
    /// The value, when it returned.
    #[serde(default)]
    pub value: Option<Value>,
    /// The error, when it did not.
    #[serde(default)]
    pub error: Option<WorkerError>,
    /// How long it ran, microseconds.
    #[serde(default)]
    pub run_us: u64,
    /// The worker exits after this result (it ran out of memory, or the function exited).
    #[serde(default)]
    pub recycle: bool,
    /// The value is larger than the task's inline limit: its JSON, this many bytes, follows
    /// this frame on the pipe, raw, and goes into a blob.
    #[serde(default)]
    pub spill: Option<u64>,
    /// Where the endpoint stored a spilled value (set by the endpoint, never sent).
    #[serde(skip)]
    pub value_ref: Option<crate::task::ValueRef>,
}

/// A task's error as a worker reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkerError {
    /// Exception type, or the worker's name for the failure.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Message.
    #[serde(default)]
    pub message: String,
    /// Remote traceback.
    #[serde(default)]
    pub traceback: Option<String>,
    /// Output of a failed shell command.
    #[serde(default)]
    pub value: Option<Value>,
}

/// One task as a worker receives it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerTask<'a> {
    /// The task id.
    pub id: &'a str,
    /// The function id (the worker caches loaded functions by it).
    pub fid: &'a str,
    /// The function spec, the first time this worker sees `fid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#fn: Option<&'a crdt_registry::record::FunctionSpec>,
    /// Positional arguments.
    pub args: &'a Value,
    /// Keyword arguments.
    pub kwargs: &'a Value,
    /// `json` or `pickle`.
    pub encoding: crate::task::Encoding,
    /// Time limit (the shell worker enforces it itself, exiting 124).
    pub timeout_ms: u64,
    /// Memory limit, MiB (0: none).
    pub memory_mb: u64,
    /// Result size limit, bytes (0: none).
    pub result_limit: u64,
    /// Results whose JSON is larger than this are spilled (0: never; all go inline).
    pub inline_limit: u64,
    /// Cap on captured shell output, characters per stream.
    pub output_cap: u64,
}

/// What the endpoint sends a worker.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ToWorker<'a> {
    /// A batch of tasks, run in order.
    Run {
        /// The tasks.
        tasks: Vec<WorkerTask<'a>>,
    },
    /// Skip these tasks if they have not started.
    Cancel {
        /// Their ids.
        ids: Vec<&'a str>,
    },
    /// Finish and exit.
    Exit,
    /// The answer to a function's `put` (the reference, and the node that holds it) or `get`
    /// (the size of the bytes that follow raw), or why there is none.
    Blob {
        /// The stored blob.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        value: Option<&'a crate::task::ValueRef>,
        /// The node that holds it (peer id).
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<&'a str>,
        /// The bytes that follow.
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// Why not.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
    },
}

/// The answer to a `put` or `get` that failed.
pub fn blob_error(why: &str) -> Vec<u8> {
    encode(&ToWorker::Blob {
        value: None,
        node: None,
        size: None,
        error: Some(why),
    })
}

/// Encodes one frame.
pub fn encode(msg: &ToWorker<'_>) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("worker messages always serialise");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Why a worker's output is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the limit (often: the worker printed text on the pipe).
    #[error(
        "the worker announced a frame of {len} bytes, over the limit of {limit} (did something \
         print to the worker's protocol pipe?)"
    )]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The body is not a valid message.
    #[error("the worker sent a malformed frame: {0}")]
    Malformed(String),
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if more bytes are needed, else the message
/// and how many bytes it used.
pub fn decode(buf: &[u8], limit: usize) -> Result<Option<(FromWorker, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[4..4 + len])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(Some((msg, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_decode_whole_and_wait_for_the_rest() {
        let f = frame(br#"{"op":"result","id":"a","ok":true,"value":3,"run_us":5}"#);
        assert_eq!(decode(&f[..f.len() - 1], MAX_FRAME).unwrap(), None);
        let (msg, used) = decode(&f, MAX_FRAME).unwrap().unwrap();
        assert_eq!(used, f.len());
        match msg {
            FromWorker::Result(r) => assert_eq!(r.value, Some(Value::from(3))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn text_on_the_pipe_is_a_clear_error() {
        let err = decode(b"Traceback (most recent call last)", MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("print"));
        let err = decode(&frame(b"{not json"), MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 1024);
            let _ = decode(&frame(&bytes), 1024);
        }
    }
}
