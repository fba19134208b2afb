//! Tasks: what a submitter asks an endpoint to run, the lifecycle it goes through there, and how
//! it ends. These types are the versioned contract between submitters and endpoints: the mesh
//! carries them on `/funcmesh/task/3`, and the store keeps them as JSON.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crdt_registry::record::{FunctionKind, FunctionRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task's id: 32 lowercase hex characters, chosen at random by the submitter. Ids are
/// idempotency keys: an endpoint that receives the same id twice runs it once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// A fresh id: 48 bits of Unix milliseconds, then 80 random bits (the layout of a UUIDv7,
    /// without its version bits). Ids sort by submission time, so a node's stores insert them
    /// near each other rather than all over its key space.
    pub fn random() -> TaskId {
        let mut b: [u8; 16] = rand::random();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        TaskId(hex::encode(b))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The smallest id made at `unix_ms` or later, as text: every id below it (in byte order,
    /// which is the order of a store's keys) was made earlier. Ids of versions before ids carried
    /// their time are random, and fall on either side.
    pub fn lower_bound_at(unix_ms: u64) -> String {
        format!("{:012x}{}", unix_ms.min((1 << 48) - 1), "0".repeat(20))
    }

    /// The id of the task a caller names by `key` (an idempotency key) and a time it fixed
    /// (Unix milliseconds): the same key and time give the same id, which sorts with the tasks
    /// of that time.
    pub fn keyed(unix_ms: u64, key: &str) -> TaskId {
        use sha2::Digest;
        let h = sha2::Sha256::digest(key.as_bytes());
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&unix_ms.min((1 << 48) - 1).to_be_bytes()[2..]);
        b[6..].copy_from_slice(&h[..10]);
        TaskId(hex::encode(b))
    }

    /// An id derived from this one for attempt `n` (n ≥ 1): a hash of both, behind this id's
    /// time, so that it sorts with the tasks of its time.
    pub fn derived(&self, n: usize) -> TaskId {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{self}/{n}").as_bytes());
        TaskId(format!("{}{}", &self.0[..12], &hex::encode(h)[..20]))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TaskId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(TaskId(s))
        } else {
            Err(format!(
                "`{}` is not a task id (32 lowercase hex characters)",
                s.chars().take(40).collect::<String>()
            ))
        }
    }
}

impl std::str::FromStr for TaskId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskId::try_from(s.to_owned())
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.0
    }
}

/// How arguments and results are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// JSON values (the CLI and the API).
    #[default]
    Json,
    /// `args` is base64 of a pickled `(args, kwargs)` pair and the value is `{"pickle": base64}`
    /// (the Python SDK; needs `cloudpickle` in the worker's environment).
    Pickle,
}

/// The most a task's arguments (positional and keyword together) may take, JSON-encoded: half
/// of what one task-protocol message carries, so that any accepted task can be sent. Larger
/// values go by reference (a file or a URL the function reads).
pub const MAX_ARGUMENTS_BYTES: usize = 16 << 20;

/// An upper bound on `v`'s size in compact JSON, found without encoding it (every number is
/// counted at the longest a number prints, every string byte as it would be escaped).
pub fn json_size_bound(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => string_size_bound(s),
        Value::Array(items) => 2 + items.iter().map(|i| json_size_bound(i) + 1).sum::<usize>(),
        Value::Object(map) => {
            2 + map
                .iter()
                .map(|(k, v)| string_size_bound(k) + 1 + json_size_bound(v) + 1)
                .sum::<usize>()
        }
    }
}

fn string_size_bound(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// A value kept apart from its task, as a blob on the data plane: the BLAKE3 hash and the size of
/// its bytes. For arguments the blob holds `{"args": …, "kwargs": …}` as JSON; for a result, the
/// value's JSON. Whoever needs the value fetches it from the node that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRef {
    /// The blob's BLAKE3 hash, 64 lowercase hex characters.
    pub blake3: String,
    /// Its size in bytes.
    pub size: u64,
}

impl ValueRef {
    /// Checks the hash's form.
    pub fn check(&self) -> Result<(), String> {
        if self.blake3.len() == 64
            && self
                .blake3
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(())
        } else {
            Err(format!(
                "`{}` is not a BLAKE3 hash (64 lowercase hex characters)",
                self.blake3.chars().take(70).collect::<String>()
            ))
        }
    }
}

/// The longest time limit a task may ask for: a year.
pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// What a submitter sends an endpoint: one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The task's id (idempotency key).
    pub id: TaskId,
    /// The endpoint's name on its node.
    pub endpoint: String,
    /// The function, as registered; the endpoint checks it against `function_id`.
    pub function: FunctionRecord,
    /// The function's content id.
    pub function_id: String,
    /// Positional arguments: a JSON array (or, pickled, a base64 string).
    #[serde(default)]
    pub args: Value,
    /// Keyword arguments: a JSON object.
    #[serde(default)]
    pub kwargs: Value,
    /// The arguments by reference, when they are too large to travel with the task: a blob
    /// (`{"args": …, "kwargs": …}`) the endpoint fetches from the submitter. `args` and `kwargs`
    /// are then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_ref: Option<ValueRef>,
    /// Argument and result encoding.
    #[serde(default)]
    pub encoding: Encoding,
    /// Time limit, milliseconds (0: the endpoint's default).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Unix microseconds when the submitter accepted it.
    #[serde(default)]
    pub submitted_us: u64,
    /// The capability token (text form) that lets the submitter use the endpoint, when its
    /// access policy asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
}

impl Submission {
    /// An upper bound on the encoded size of its arguments ([`json_size_bound`]).
    pub fn arguments_size_bound(&self) -> usize {
        json_size_bound(&self.args) + json_size_bound(&self.kwargs)
    }

    /// Checks what an endpoint can check without running anything: the function matches its id,
    /// and the arguments have the right shape.
    pub fn check(&self) -> Result<(), String> {
        let id = self.function.content_id();
        if id != self.function_id {
            return Err(format!(
                "the function sent does not match its id {} (it hashes to {id}): the submitter's \
                 registry is corrupt or the message was tampered with",
                self.function_id
            ));
        }
        self.check_args()
    }

    /// Checks the arguments' shape and the time limit (what [`Submission::check`] checks
    /// besides the function).
    pub fn check_args(&self) -> Result<(), String> {
        if let Some(r) = &self.args_ref {
            r.check().map_err(|e| format!("args_ref: {e}"))?;
            let empty = |v: &Value| {
                v.is_null()
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(serde_json::Map::is_empty)
            };
            if !empty(&self.args) || !empty(&self.kwargs) {
                return Err(
                    "a task with args_ref carries its arguments in that blob: leave args and \
                     kwargs empty"
                        .into(),
                );
            }
        }
        let size = self.arguments_size_bound();
        if size > MAX_ARGUMENTS_BYTES {
            return Err(format!(
                "the arguments take up to {size} bytes encoded; a task carries at most \
                 {MAX_ARGUMENTS_BYTES}: pass large values by reference (a file or a URL the \
                 function reads)"
            ));
        }
        if u128::from(self.timeout_ms) > MAX_TIMEOUT.as_millis() {
            return Err(format!(
                "a time limit of {} ms is more than a task may ask for ({} days): give a \
                 shorter timeout, or none for the endpoint's default",
                self.timeout_ms,
                MAX_TIMEOUT.as_secs() / 86_400
            ));
        }
        match self.encoding {
            Encoding::Json => {
                if !(self.args.is_array() || self.args.is_null()) {
                    return Err("args must be a JSON array, e.g. [1, \"two\"]".into());
                }
                if !(self.kwargs.is_object() || self.kwargs.is_null()) {
                    return Err("kwargs must be a JSON object, e.g. {\"x\": 1}".into());
                }
            }
            Encoding::Pickle => {
                if !self.args.is_string() && self.args_ref.is_none() {
                    return Err("pickled args must be a base64 string".into());
                }
                if self.function.kind != FunctionKind::Python {
                    return Err("only Python functions take pickled arguments".into());
                }
            }
        }
        Ok(())
    }
}

/// The stored form of a [`Submission`]: everything but the function, which is stored once,
/// by id, apart from the tasks that run it (a function's source can be large, and a node may
/// store millions of tasks of one function).
pub mod stored {
    use crdt_registry::record::FunctionRecord;
    use serde::{Deserialize, Serialize, Serializer};
    use serde_json::Value;

    use super::{Encoding, Submission, TaskId};

    /// Writes a submission without its function.
    #[derive(Debug, Clone, Copy)]
    pub struct SansFunction<'a>(pub &'a Submission);

    #[derive(Serialize)]
    struct Ref<'a> {
        id: &'a TaskId,
        endpoint: &'a str,
        function_id: &'a str,
        args: &'a Value,
        kwargs: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        args_ref: &'a Option<super::ValueRef>,
        encoding: Encoding,
        timeout_ms: u64,
        submitted_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        capability: &'a Option<String>,
    }

    impl Serialize for SansFunction<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            // Every field named: a new field of `Submission` does not compile until the stored
            // form has it too.
            let Submission {
                id,
                endpoint,
                function: _,
                function_id,
                args,
                kwargs,
                args_ref,
                encoding,
                timeout_ms,
                submitted_us,
                capability,
            } = self.0;
            Ref {
                id,
                endpoint,
                function_id,
                args,
                kwargs,
                args_ref,
                encoding: *encoding,
                timeout_ms: *timeout_ms,
                submitted_us: *submitted_us,
                capability,
            }
            .serialize(s)
        }
    }

    /// Which functions a node has put in the store's `functions`, so that each is written
    /// once: with the first stored task that names it. An endpoint keeps its own copies under
    /// its scope (`ep:<name>/<id>`), which it collects once no stored task names them; the
    /// submitting side's are unscoped (`<id>`).
    #[derive(Debug, Default)]
    pub struct StoredFunctions {
        ids: std::collections::HashSet<String>,
        scope: Vec<u8>,
    }

    /// The key prefix of endpoint `name`'s functions.
    pub fn function_scope(endpoint: &str) -> Vec<u8> {
        format!("ep:{endpoint}/").into_bytes()
    }

    impl StoredFunctions {
        /// For endpoint `name`: its functions go under its scope.
        pub fn for_endpoint(name: &str) -> StoredFunctions {
            StoredFunctions {
                ids: Default::default(),
                scope: function_scope(name),
            }
        }

        /// Ids remembered at most (past that all are forgotten, and each function is written
        /// again with its next task: harmless, an entry never changes).
        const MAX: usize = 65_536;

        /// The write that stores `sub`'s function, unless it is stored already; to go in the
        /// same batch as the task.
        pub fn op_for(&mut self, sub: &Submission) -> Option<store::Op> {
            if self.ids.len() > Self::MAX {
                self.ids.clear();
            }
            if !self.ids.insert(sub.function_id.clone()) {
                return None;
            }
            let mut v = Vec::with_capacity(512);
            serde_json::to_writer(&mut v, &sub.function).expect("functions serialise");
            let mut key = self.scope.clone();
            key.extend_from_slice(sub.function_id.as_bytes());
            Some((store::cf::FUNCTIONS, key, Some(v)))
        }

        /// These functions were collected from the store.
        pub fn dropped<'a>(&mut self, ids: impl IntoIterator<Item = &'a String>) {
            for id in ids {
                self.ids.remove(id);
            }
        }

        /// Remembers functions found in the store.
        pub fn found<'a>(&mut self, ids: impl IntoIterator<Item = &'a String>) {
            self.ids.extend(ids.into_iter().cloned());
        }

        /// A batch with function writes failed: none of them is known to be stored any more.
        pub fn forget(&mut self) {
            self.ids.clear();
        }
    }

    /// A function from the store's `functions` (`None`: not there, or unreadable).
    pub fn read_function(
        s: &store::Store,
        id: &str,
    ) -> Result<Option<FunctionRecord>, store::Error> {
        Ok(s.get(store::cf::FUNCTIONS, id.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Endpoint `name`'s copy of a function, or the unscoped one (stores of older versions).
    pub fn read_endpoint_function(
        s: &store::Store,
        name: &str,
        id: &str,
    ) -> Result<Option<FunctionRecord>, store::Error> {
        let mut key = function_scope(name);
        key.extend_from_slice(id.as_bytes());
        match s.get(store::cf::FUNCTIONS, &key)? {
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => read_function(s, id),
        }
    }

    /// A stored submission as read back: with its function when an earlier version stored it
    /// inline, otherwise to be joined with it ([`StoredSubmission::join`]).
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StoredSubmission {
        id: TaskId,
        endpoint: String,
        #[serde(default)]
        function: Option<FunctionRecord>,
        function_id: String,
        #[serde(default)]
        args: Value,
        #[serde(default)]
        kwargs: Value,
        #[serde(default)]
        args_ref: Option<super::ValueRef>,
        #[serde(default)]
        encoding: Encoding,
        #[serde(default)]
        timeout_ms: u64,
        #[serde(default)]
        submitted_us: u64,
        #[serde(default)]
        capability: Option<String>,
    }

    impl StoredSubmission {
        /// The function id it names.
        pub fn function_id(&self) -> &str {
            &self.function_id
        }

        /// Its arguments' reference, when they went by reference.
        pub fn args_ref(&self) -> Option<&super::ValueRef> {
            self.args_ref.as_ref()
        }

        /// Whether it still needs its function ([`StoredSubmission::join`]).
        pub fn needs_function(&self) -> bool {
            self.function.is_none()
        }

        /// The submission, with its function: the inline one, else the one `lookup` finds for
        /// its id. `None` when neither has it, or the record found is not the function named.
        pub fn join(
            self,
            lookup: impl FnOnce(&str) -> Option<FunctionRecord>,
        ) -> Option<Submission> {
            let function = match self.function {
                Some(f) => f,
                None => lookup(&self.function_id)?,
            };
            if function.content_id() != self.function_id {
                return None;
            }
            Some(Submission {
                id: self.id,
                endpoint: self.endpoint,
                function,
                function_id: self.function_id,
                args: self.args,
                kwargs: self.kwargs,
                args_ref: self.args_ref,
                encoding: self.encoding,
                timeout_ms: self.timeout_ms,
                submitted_us: self.submitted_us,
                capability: self.capability,
            })
        }
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Accepted by the submitting node, not yet accepted by an endpoint.
    Pending,
    /// Accepted (and stored) by the endpoint.
    Received,
    /// Waiting in the endpoint's queue for a worker.
    Queued,
    /// Waiting for a worker to start for it (a cold start).
    WaitingForWorker,
    /// Running on a worker.
    Running,
    /// Finished, with a value.
    Succeeded,
    /// Finished, with an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl Status {
    /// Finished one way or another.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    /// Name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Received => "received",
            Status::Queued => "queued",
            Status::WaitingForWorker => "waiting-for-worker",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a task reached each phase, Unix microseconds (0: not reached).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Times {
    /// Accepted by the submitting node.
    pub submitted_us: u64,
    /// Accepted by the endpoint.
    pub received_us: u64,
    /// Entered the endpoint's queue.
    pub queued_us: u64,
    /// A worker started for it (cold start), if one had to.
    pub waiting_us: u64,
    /// Began running on a worker.
    pub running_us: u64,
    /// Finished.
    pub finished_us: u64,
}

/// Why a task failed, in a form a program can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The function raised (Python) or exited non-zero (shell).
    Exception,
    /// It ran past its time limit.
    Timeout,
    /// It ran past its memory limit.
    MemoryLimit,
    /// Its result is over the endpoint's size limit.
    ResultTooLarge,
    /// The worker died or broke the protocol while running it.
    WorkerLost,
    /// The endpoint could not start a worker for it.
    WorkerStart,
    /// The endpoint was lost (killed, or unreachable too long) while the task was there.
    EndpointLost,
    /// The endpoint refused it.
    Refused,
    /// The task itself is malformed.
    BadInput,
    /// Its arguments, passed by reference, could not be fetched.
    InputUnavailable,
}

/// A failed task's error: the remote exception's type, message and traceback, or the reason
/// funcmesh gave up on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The exception's type (`ZeroDivisionError`), or funcmesh's name for the failure.
    #[serde(rename = "type")]
    pub type_name: String,
    /// The message.
    pub message: String,
    /// The remote traceback, for Python exceptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl TaskError {
    /// An error of `kind` with funcmesh's own type name for it.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> TaskError {
        let type_name = match kind {
            FailureKind::Exception => "Exception",
            FailureKind::Timeout => "Timeout",
            FailureKind::MemoryLimit => "MemoryError",
            FailureKind::ResultTooLarge => "ResultTooLarge",
            FailureKind::WorkerLost => "WorkerLost",
            FailureKind::WorkerStart => "WorkerStartFailed",
            FailureKind::EndpointLost => "EndpointLost",
            FailureKind::Refused => "Refused",
            FailureKind::BadInput => "BadInput",
            FailureKind::InputUnavailable => "InputUnavailable",
        };
        TaskError {
            kind,
            type_name: type_name.into(),
            message: message.into(),
            traceback: None,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

/// How a finished task ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// It returned a value (for shell functions: the return code and captured output).
    Succeeded {
        /// The value (null when it went by reference).
        value: Value,
        /// The value by reference, when it was larger than the endpoint sends inline: a blob
        /// (the value's JSON) held by the endpoint's node, and by the submitter's once fetched.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value_ref: Option<ValueRef>,
    },
    /// It failed.
    Failed {
        /// Why.
        error: TaskError,
        /// What it produced anyway (a failed shell command's output).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<Value>,
    },
    /// It was cancelled.
    Cancelled {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// A success with `value`, inline.
    pub fn succeeded(value: Value) -> Outcome {
        Outcome::Succeeded {
            value,
            value_ref: None,
        }
    }

    /// The value's reference, when it went by reference.
    pub fn value_ref(&self) -> Option<&ValueRef> {
        match self {
            Outcome::Succeeded { value_ref, .. } => value_ref.as_ref(),
            _ => None,
        }
    }

    /// A failure with no value.
    pub fn failed(kind: FailureKind, message: impl Into<String>) -> Outcome {
        Outcome::Failed {
            error: TaskError::new(kind, message),
            value: None,
        }
    }

    /// The status it ends in.
    pub fn status(&self) -> Status {
        match self {
            Outcome::Succeeded { .. } => Status::Succeeded,
            Outcome::Failed { .. } => Status::Failed,
            Outcome::Cancelled { .. } => Status::Cancelled,
        }
    }
}

/// A task as its endpoint records it: what was asked, where it is, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Record format version.
    pub v: u32,
    /// The task's id.
    pub id: TaskId,
    /// The endpoint's name on its node.
    pub endpoint: String,
    /// The submitting peer.
    pub submitter: String,
    /// The function's id.
    pub function_id: String,
    /// Current status.
    pub status: Status,
    /// Phase timestamps.
    pub times: Times,
    /// The worker that ran it: its id on the endpoint and, for containers, the container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The environment it ran in (`host`, `docker:<image>`).
    #[serde(default)]
    pub environment: String,
    /// Whether a worker had to start for it (a cold start).
    #[serde(default)]
    pub cold_start: bool,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Record {
    /// An upper bound on its encoded size: its outcome's values and texts by
    /// [`json_size_bound`], and room for the rest.
    pub fn size_bound(&self) -> usize {
        let text = |s: &str| string_size_bound(s);
        let outcome = match &self.outcome {
            None => 0,
            Some(Outcome::Succeeded { value, value_ref }) => {
                json_size_bound(value) + value_ref.as_ref().map_or(0, |_| 128)
            }
            Some(Outcome::Failed { error, value }) => {
                text(&error.type_name)
                    + text(&error.message)
                    + error.traceback.as_deref().map_or(0, text)
                    + value.as_ref().map_or(0, json_size_bound)
            }
            Some(Outcome::Cancelled { reason }) => text(reason),
        };
        outcome
            + text(&self.endpoint)
            + text(&self.submitter)
            + text(&self.function_id)
            + self.worker.as_deref().map_or(0, text)
            + text(&self.environment)
            + 1024
    }
}

/// The current record format version.
pub const RECORD_VERSION: u32 = 1;

/// How often a retention sweep reads every stored task, not only those made before its horizon
/// (which misses the ids of older versions, without their time).
pub const FULL_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Now, Unix microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_size_bound_is_never_below_the_encoded_size() {
        let values = [
            serde_json::json!(null),
            serde_json::json!([1, -2.5e300, u64::MAX, i64::MIN, true, "plain"]),
            serde_json::json!({"quote\"": "back\\slash", "ctl": "\u{1}\n\t", "é": ["ünï", {}]}),
            serde_json::json!("x".repeat(10_000)),
        ];
        for v in values {
            let exact = serde_json::to_vec(&v).unwrap().len();
            let bound = json_size_bound(&v);
            assert!(bound >= exact, "{v}: bound {bound} < {exact}");
            assert!(
                bound <= exact * 6 + 64,
                "{v}: bound {bound} far above {exact}"
            );
        }
    }

    #[test]
    fn a_records_size_bound_is_never_below_its_encoded_size() {
        let mut rec = Record {
            v: RECORD_VERSION,
            id: TaskId::random(),
            endpoint: "ep\"".into(),
            submitter: "12D3KooW".into(),
            function_id: "f".repeat(64),
            status: Status::Failed,
            times: Times {
                submitted_us: u64::MAX,
                received_us: u64::MAX,
                queued_us: u64::MAX,
                waiting_us: u64::MAX,
                running_us: u64::MAX,
                finished_us: u64::MAX,
            },
            worker: Some("w1\n".into()),
            environment: "docker:img".into(),
            cold_start: true,
            outcome: Some(Outcome::Failed {
                error: TaskError {
                    kind: FailureKind::Exception,
                    type_name: "ValueError".into(),
                    message: "\u{0}\u{1f}".repeat(100),
                    traceback: Some("line\n".repeat(100)),
                },
                value: Some(serde_json::json!({"stdout": "x".repeat(5000)})),
            }),
        };
        for _ in 0..2 {
            let exact = serde_json::to_vec(&rec).unwrap().len();
            assert!(rec.size_bound() >= exact, "{} < {exact}", rec.size_bound());
            rec.outcome = Some(Outcome::Succeeded {
                value: serde_json::json!([1.5, "é", null]),
                value_ref: Some(ValueRef {
                    blake3: "a".repeat(64),
                    size: u64::MAX,
                }),
            });
        }
    }

    proptest::proptest! {
        #[test]
        fn the_json_size_bound_holds_for_any_string(s in ".*", n in proptest::prelude::any::<f64>()) {
            let v = serde_json::json!([s, {"k": n}]);
            proptest::prop_assert!(json_size_bound(&v) >= serde_json::to_vec(&v).unwrap().len());
        }
    }

    #[test]
    fn task_ids_are_checked_when_parsed() {
        let id = TaskId::random();
        assert_eq!(id.as_str().parse::<TaskId>().unwrap(), id);
        assert!("xyz".parse::<TaskId>().is_err());
        assert!(serde_json::from_str::<TaskId>("\"ABCDEF0123456789ABCDEF0123456789\"").is_err());
    }

    #[test]
    fn task_ids_start_with_their_creation_time_and_differ() {
        let ms = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = ms();
        let (a, b) = (TaskId::random(), TaskId::random());
        let after = ms();
        for id in [&a, &b] {
            let at = u64::from_str_radix(&id.as_str()[..12], 16).unwrap();
            assert!(
                (before..=after).contains(&at),
                "{id}: {at} not in {before}..={after}"
            );
        }
        assert_ne!(a, b);
        assert_ne!(a.as_str()[12..], b.as_str()[12..]);
    }

    #[test]
    fn ids_made_before_a_time_sort_below_its_bound_and_derived_ids_keep_their_time() {
        let now_ms = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = TaskId::random();
        let bound = TaskId::lower_bound_at(now_ms() + 1);
        assert!(before.as_str() < bound.as_str(), "{before} < {bound}");
        assert!(bound.parse::<TaskId>().is_ok());
        let earlier = TaskId::lower_bound_at(now_ms().saturating_sub(60_000));
        assert!(before.as_str() >= earlier.as_str());
        let retry = before.derived(1);
        assert_eq!(retry.as_str()[..12], before.as_str()[..12]);
        assert_ne!(retry, before);
        assert_ne!(retry, before.derived(2));
        assert_eq!(retry, before.derived(1), "derivation is deterministic");
        assert!(retry.as_str().parse::<TaskId>().is_ok());
    }

    #[test]
    fn outcomes_serialise_with_their_status() {
        let o = Outcome::failed(FailureKind::Timeout, "too slow");
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["kind"], "timeout");
        assert_eq!(serde_json::from_value::<Outcome>(v).unwrap(), o);
    }
}
