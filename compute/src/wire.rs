//! `/funcmesh/task/4`: task dispatch and results between a submitting node and an endpoint's
//! node, over direct streams (never gossip).
//!
//! * submitter → endpoint: [`TaskRequest::Submit`] (a batch; each task is stored by the endpoint
//!   before it answers), [`TaskRequest::Cancel`], [`TaskRequest::Records`] (live status).
//! * endpoint → submitter: [`TaskRequest::Results`] (a batch of finished tasks), answered with
//!   [`TaskResponse::Acknowledged`] once the submitter has stored them; until then the endpoint
//!   keeps them in its outbox and sends them again.
//!
//! Submitting a task id twice is harmless: the endpoint answers with the task's current record.
//!
//! On the wire (the mesh's [`mesh::links`]) a node keeps one long-lived stream to each peer it
//! sends requests to; requests go out on it tagged with an id, and the answers come back on the
//! same stream, tagged with the id they answer, in whatever order they are ready.

use serde::{Deserialize, Serialize};

use crate::routing::EndpointLoad;
use crate::task::{Record, Status, Submission, TaskId};

/// The protocol name.
/// Version 2: JSON on the wire (version 1 was CBOR, which turned every JSON `null` in task
/// arguments and results into `[]`). Version 3: `Answer::Queued`. Version 4: one long-lived
/// stream per peer with id-tagged frames ([`mesh::links::frame`]), instead of a stream per request.
pub const PROTOCOL: &str = "/funcmesh/task/4";
/// Largest request or response on the wire.
pub const MAX_MESSAGE: usize = 32 << 20;
/// Most tasks in one request.
pub const MAX_BATCH: usize = 4096;

/// The task protocol, as the mesh's links carry it.
#[derive(Debug, Clone, Copy)]
pub struct TaskProtocol;

impl mesh::Protocol for TaskProtocol {
    const NAME: &'static str = PROTOCOL;
    const LABEL: &'static str = "task";
    const MAX_MESSAGE: usize = MAX_MESSAGE;
    type Request = TaskRequest;
    type Response = TaskResponse;

    fn busy(reason: String) -> TaskResponse {
        TaskResponse::Busy { reason }
    }

    fn refused(reason: String) -> TaskResponse {
        TaskResponse::Refused { reason }
    }

    fn check(request: &TaskRequest) -> Result<(), String> {
        request.check()
    }
}

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskRequest {
    /// Run these tasks.
    Submit {
        /// The tasks. A task's `capability` is `@<index>` into `tokens`. On the wire each
        /// distinct function goes once per batch ([`function_table`]).
        #[serde(with = "function_table")]
        tasks: Vec<Submission>,
        /// The capability tokens the tasks present, each once.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tokens: Vec<String>,
    },
    /// These tasks finished.
    Results {
        /// Their records.
        records: Vec<Record>,
        /// The sending endpoints' load right now, fresher than their last advert.
        #[serde(default)]
        loads: Vec<EndpointLoad>,
    },
    /// Cancel a task.
    Cancel {
        /// The endpoint's name.
        endpoint: String,
        /// The task.
        id: TaskId,
    },
    /// Where these tasks are.
    Records {
        /// The endpoint's name.
        endpoint: String,
        /// The tasks.
        ids: Vec<TaskId>,
    },
}

/// The wire form of a `Submit` batch's tasks: `{"functions": [record, ...], "tasks": [...]}`,
/// each task naming its function by index, so that a batch of a thousand calls of one function
/// carries its source once, not a thousand times.
pub mod function_table {
    use std::collections::HashMap;

    use crate::task::{Encoding, Submission, TaskId};
    use crdt_registry::record::FunctionRecord;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    #[derive(Serialize)]
    struct TableRef<'a> {
        functions: Vec<&'a FunctionRecord>,
        tasks: Vec<TaskRef<'a>>,
    }

    #[derive(Serialize)]
    struct TaskRef<'a> {
        id: &'a TaskId,
        endpoint: &'a str,
        function: usize,
        function_id: &'a str,
        args: &'a Value,
        kwargs: &'a Value,
        encoding: Encoding,
        timeout_ms: u64,
        submitted_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        capability: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        args_ref: &'a Option<crate::task::ValueRef>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Table {
        functions: Vec<FunctionRecord>,
        tasks: Vec<Task>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Task {
        id: TaskId,
        endpoint: String,
        function: usize,
        function_id: String,
        #[serde(default)]
        args: Value,
        #[serde(default)]
        kwargs: Value,
        #[serde(default)]
        encoding: Encoding,
        #[serde(default)]
        timeout_ms: u64,
        #[serde(default)]
        submitted_us: u64,
        #[serde(default)]
        capability: Option<String>,
        #[serde(default)]
        args_ref: Option<crate::task::ValueRef>,
    }

    /// Writes the tasks with their functions in a table.
    pub fn serialize<S: Serializer>(tasks: &[Submission], s: S) -> Result<S::Ok, S::Error> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut functions = Vec::new();
        let tasks = tasks
            .iter()
            .map(|t| {
                // Every field named: a new field of `Submission` does not compile until the
                // wire form has it too.
                let Submission {
                    id,
                    endpoint,
                    function,
                    function_id,
                    args,
                    kwargs,
                    args_ref,
                    encoding,
                    timeout_ms,
                    submitted_us,
                    capability,
                } = t;
                let function = *index.entry(function_id.as_str()).or_insert_with(|| {
                    functions.push(function);
                    functions.len() - 1
                });
                TaskRef {
                    id,
                    endpoint,
                    function,
                    function_id,
                    args,
                    kwargs,
                    encoding: *encoding,
                    timeout_ms: *timeout_ms,
                    submitted_us: *submitted_us,
                    capability,
                    args_ref,
                }
            })
            .collect();
        TableRef { functions, tasks }.serialize(s)
    }

    /// Reads the tasks back, each with its function; an index outside the table is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Submission>, D::Error> {
        let table = Table::deserialize(d)?;
        table
            .tasks
            .into_iter()
            .map(|t| {
                let function = table.functions.get(t.function).cloned().ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "task {} names function {} of a table of {}",
                        t.id,
                        t.function,
                        table.functions.len()
                    ))
                })?;
                Ok(Submission {
                    id: t.id,
                    endpoint: t.endpoint,
                    function,
                    function_id: t.function_id,
                    args: t.args,
                    kwargs: t.kwargs,
                    args_ref: t.args_ref,
                    encoding: t.encoding,
                    timeout_ms: t.timeout_ms,
                    submitted_us: t.submitted_us,
                    capability: t.capability,
                })
            })
            .collect()
    }
}

/// One submitted task's answer.
// Wire enums: boxing the record would only move the allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Stored, and already finished (a task sent again): its record.
    Accepted(Record),
    /// Stored, not finished: its status. The record comes with the result (a `Records` request
    /// asks for it sooner); sending it here would double the bytes of every task's answer.
    Queued(Status),
    /// Refused, and why.
    Refused(String),
}

impl Answer {
    /// The answer for an endpoint's record of a task it stored.
    pub fn of(record: Record) -> Answer {
        if record.status.is_terminal() {
            Answer::Accepted(record)
        } else {
            Answer::Queued(record.status)
        }
    }
}

/// A response.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskResponse {
    /// One answer per submitted task, in order.
    Submitted {
        /// The answers.
        answers: Vec<Answer>,
        /// The endpoints' load after taking them, fresher than their last advert.
        #[serde(default)]
        loads: Vec<EndpointLoad>,
    },
    /// The results are stored.
    Acknowledged,
    /// The task's record after the cancel (`None`: unknown there).
    Cancelled {
        /// The record.
        record: Option<Record>,
    },
    /// One record per asked id.
    Records {
        /// The records.
        records: Vec<Option<Record>>,
    },
    /// Not now (the sender's membership is still being verified, or the node is overloaded):
    /// send it again later.
    Busy {
        /// Why.
        reason: String,
    },
    /// The whole request was refused.
    Refused {
        /// Why.
        reason: String,
    },
}

impl TaskRequest {
    /// Checks the batch bounds.
    pub fn check(&self) -> Result<(), String> {
        let n = match self {
            TaskRequest::Submit { tasks, tokens } => tasks.len().max(tokens.len()),
            TaskRequest::Results { records, .. } => records.len(),
            TaskRequest::Records { ids, .. } => ids.len(),
            TaskRequest::Cancel { .. } => 1,
        };
        if n > MAX_BATCH {
            return Err(format!(
                "{n} items in one request; the limit is {MAX_BATCH}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task protocol's frames, as the mesh's links write and read them.
    mod frame {
        use super::super::{MAX_MESSAGE, TaskProtocol, TaskRequest, TaskResponse};
        use mesh::links::frame as f;
        pub(super) use mesh::links::frame::READ_STEP;

        pub(super) fn request(id: u64, r: &TaskRequest) -> Result<Vec<u8>, String> {
            f::request::<TaskProtocol>(id, r)
        }
        pub(super) fn response(id: u64, r: &TaskResponse) -> Result<Vec<u8>, String> {
            f::response::<TaskProtocol>(id, r)
        }
        #[allow(clippy::type_complexity)]
        pub(super) fn read_request(
            body: &[u8],
        ) -> Result<(u64, Result<TaskRequest, String>), String> {
            f::read_request::<TaskProtocol>(body)
        }
        #[allow(clippy::type_complexity)]
        pub(super) fn read_response(
            body: &[u8],
        ) -> Result<(u64, Result<TaskResponse, String>), String> {
            f::read_response::<TaskProtocol>(body)
        }
        pub(super) async fn read<R: futures::AsyncRead + Unpin>(
            io: &mut R,
            body: &mut Vec<u8>,
        ) -> std::io::Result<bool> {
            f::read(io, body, MAX_MESSAGE).await
        }
    }
    use futures::executor::block_on;
    use proptest::prelude::{any, proptest};

    /// The body of the first frame in `bytes`.
    fn first_body(bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut io = futures::io::Cursor::new(bytes.to_vec());
        let mut body = Vec::new();
        match block_on(frame::read(&mut io, &mut body)) {
            Ok(true) => Ok(body),
            Ok(false) => Err("no frame".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads one frame from `bytes` and decodes it as a request.
    fn read_request(bytes: &[u8]) -> Result<TaskRequest, String> {
        frame::read_request(&first_body(bytes)?)?.1
    }

    fn read_response(bytes: &[u8]) -> Result<TaskResponse, String> {
        frame::read_response(&first_body(bytes)?)?.1
    }

    fn encode(req: TaskRequest) -> Vec<u8> {
        frame::request(7, &req).unwrap()
    }

    #[test]
    fn requests_round_trip_through_the_wire_codec() {
        let req = TaskRequest::Records {
            endpoint: "ep".into(),
            ids: vec![TaskId::random(), TaskId::random()],
        };
        assert_eq!(read_request(&encode(req.clone())).unwrap(), req);
    }

    #[test]
    fn frames_carry_their_ids_and_follow_one_another_on_a_stream() {
        let a = TaskRequest::Cancel {
            endpoint: "ep".into(),
            id: TaskId::random(),
        };
        let mut bytes = frame::request(42, &a).unwrap();
        bytes.extend(frame::response(43, &TaskResponse::Acknowledged).unwrap());
        let mut io = futures::io::Cursor::new(bytes);
        let mut body = Vec::new();
        assert!(block_on(frame::read(&mut io, &mut body)).unwrap());
        assert_eq!(frame::read_request(&body).unwrap(), (42, Ok(a)));
        assert!(block_on(frame::read(&mut io, &mut body)).unwrap());
        assert_eq!(
            frame::read_response(&body).unwrap(),
            (43, Ok(TaskResponse::Acknowledged))
        );
        // The end of the stream between frames is a clean end.
        assert!(!block_on(frame::read(&mut io, &mut body)).unwrap());
    }

    #[test]
    fn a_frame_longer_than_one_read_step_arrives_whole() {
        let body: Vec<u8> = (0..frame::READ_STEP * 2 + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend(&body);
        assert_eq!(first_body(&bytes).unwrap(), body);
    }

    #[test]
    fn a_claimed_length_costs_no_memory_until_the_bytes_arrive() {
        // The largest frame allowed is announced, and ten bytes follow.
        let mut bytes = (MAX_MESSAGE as u32).to_be_bytes().to_vec();
        bytes.extend([1u8; 10]);
        let mut io = futures::io::Cursor::new(bytes);
        let mut body = Vec::new();
        let err = block_on(frame::read(&mut io, &mut body)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(
            body.capacity() <= 2 * frame::READ_STEP,
            "{} bytes held for a frame that sent ten",
            body.capacity()
        );
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_an_error() {
        let bytes = frame::response(1, &TaskResponse::Acknowledged).unwrap();
        for cut in [2, 4, bytes.len() - 1] {
            let mut io = futures::io::Cursor::new(bytes[..cut].to_vec());
            let err = block_on(frame::read(&mut io, &mut Vec::new())).unwrap_err();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::UnexpectedEof,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut bytes = ((MAX_MESSAGE + 1) as u32).to_be_bytes().to_vec();
        bytes.extend(b"{}");
        let mut io = futures::io::Cursor::new(bytes);
        let mut body = Vec::new();
        let err = block_on(frame::read(&mut io, &mut body)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(
            body.capacity() < 1024,
            "the body was allocated: {}",
            body.capacity()
        );
    }

    #[test]
    fn a_malformed_request_with_an_id_is_answered_and_one_without_is_not_a_frame() {
        let (id, request) =
            frame::read_request(br#"{"id": 5, "request": {"Explode": {}}}"#).unwrap();
        assert_eq!(id, 5);
        let why = request.unwrap_err();
        assert!(why.starts_with("malformed task request"), "{why}");
        let why = frame::read_request(br#"{"request": {"Cancel": {}}}"#).unwrap_err();
        assert!(why.starts_with("not a task-protocol frame"), "{why}");
        let (id, response) = frame::read_response(br#"{"id": 6, "response": 3}"#).unwrap();
        assert_eq!(id, 6);
        assert!(response.is_err());
    }

    #[test]
    fn a_malformed_task_id_is_refused_by_the_decoder() {
        let id = TaskId::random();
        let good = encode(TaskRequest::Cancel {
            endpoint: "ep".into(),
            id: id.clone(),
        });
        assert!(read_request(&good).is_ok());
        // Replace the id's text with uppercase hex: same length, not a task id.
        let text = id.to_string();
        let at = good
            .windows(text.len())
            .position(|w| w == text.as_bytes())
            .expect("the id is on the wire as text");
        let mut bad = good.clone();
        bad[at..at + text.len()].make_ascii_uppercase();
        assert_ne!(bad, good, "the id has letters to uppercase");
        let err = read_request(&bad).unwrap_err();
        assert!(err.starts_with("malformed task request"), "{err}");
    }

    fn encode_response(resp: TaskResponse) -> Vec<u8> {
        frame::response(9, &resp).unwrap()
    }

    /// Any JSON value: nulls, nesting, numbers of every kind, awkward strings.
    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn submission(args: serde_json::Value, kwargs: serde_json::Value) -> Submission {
        use crdt_registry::record::{FunctionKind, FunctionRecord, FunctionSpec};
        let function = FunctionRecord {
            name: "echo".into(),
            owner: crdt_registry::Key([7; 32]),
            kind: FunctionKind::Python,
            spec: FunctionSpec::PythonSource {
                source: "def echo(*a, **k):\n    return a, k\n".into(),
                entrypoint: "echo".into(),
            },
            container: None,
            description: String::new(),
            created_ms: 1,
        };
        Submission {
            id: TaskId::random(),
            endpoint: "ep".into(),
            function_id: function.content_id(),
            function,
            args,
            kwargs,
            args_ref: None,
            encoding: crate::task::Encoding::Json,
            timeout_ms: 0,
            submitted_us: 1,
            capability: None,
        }
    }

    fn record(outcome: crate::task::Outcome) -> Record {
        Record {
            v: crate::task::RECORD_VERSION,
            id: TaskId::random(),
            endpoint: "ep".into(),
            submitter: "peer".into(),
            function_id: "f".into(),
            status: outcome.status(),
            times: crate::task::Times::default(),
            worker: None,
            environment: "host".into(),
            cold_start: false,
            outcome: Some(outcome),
        }
    }

    #[test]
    fn a_batch_carries_each_function_once() {
        let one = submission(serde_json::json!([1]), serde_json::Value::Null);
        let mut other = submission(serde_json::json!([2]), serde_json::Value::Null);
        other.function.name = "other".into();
        other.function_id = other.function.content_id();
        let tasks = vec![one.clone(), other.clone(), one.clone(), one];
        let req = TaskRequest::Submit {
            tasks,
            tokens: Vec::new(),
        };
        let bytes = encode(req.clone());
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("def echo").count(), 2, "{text}");
        assert_eq!(read_request(&bytes).unwrap(), req);
    }

    #[test]
    fn a_function_index_outside_the_table_is_refused() {
        let req = TaskRequest::Submit {
            tasks: vec![submission(serde_json::json!([1]), serde_json::Value::Null)],
            tokens: Vec::new(),
        };
        let bytes = encode(req);
        let text = String::from_utf8(bytes[4..].to_vec()).unwrap();
        let bad = text.replace("\"function\":0", "\"function\":7");
        assert_ne!(bad, text);
        let mut bad_frame = bytes[..4].to_vec();
        bad_frame.extend(bad.as_bytes());
        let err = read_request(&bad_frame).unwrap_err().to_string();
        assert!(err.contains("names function 7 of a table of 1"), "{err}");
    }

    #[test]
    fn a_null_crosses_the_wire_as_null() {
        use serde_json::{Value, json};
        let req = TaskRequest::Submit {
            tasks: vec![submission(json!([null, [null], {"a": null}]), Value::Null)],
            tokens: Vec::new(),
        };
        assert_eq!(read_request(&encode(req.clone())).unwrap(), req);
        let resp = TaskResponse::Submitted {
            answers: vec![
                Answer::Accepted(record(crate::task::Outcome::succeeded(Value::Null))),
                Answer::Queued(crate::task::Status::Queued),
                Answer::Refused("no".into()),
            ],
            loads: Vec::new(),
        };
        assert_eq!(read_response(&encode_response(resp.clone())).unwrap(), resp);
    }

    proptest! {
        /// Arguments and results are the user's JSON values: the wire gives back exactly what
        /// was sent, whatever the value.
        #[test]
        fn task_values_cross_the_wire_unchanged(
            args in proptest::collection::vec(json_value(), 0..4),
            kwargs in json_value(),
            value in json_value(),
            failed in proptest::option::of(json_value()),
        ) {
            let req = TaskRequest::Submit {
                tasks: vec![submission(serde_json::Value::Array(args), kwargs)],
                tokens: Vec::new(),
            };
            proptest::prop_assert_eq!(read_request(&encode(req.clone())).unwrap(), req);
            let mut records = vec![record(crate::task::Outcome::succeeded(value))];
            records.push(record(crate::task::Outcome::Failed {
                error: crate::task::TaskError::new(crate::task::FailureKind::Exception, "x"),
                // `Some(null)` and `None` are one value here: a failure without output.
                value: failed.filter(|v| !v.is_null()),
            }));
            let req = TaskRequest::Results { records, loads: Vec::new() };
            proptest::prop_assert_eq!(read_request(&encode(req.clone())).unwrap(), req);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_task_codec(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_request(&bytes);
            let _ = read_response(&bytes);
            // Bodies straight to the decoders, and a stream of frames read to its end.
            let _ = frame::read_request(&bytes);
            let _ = frame::read_response(&bytes);
            let mut io = futures::io::Cursor::new(bytes);
            let mut body = Vec::new();
            while let Ok(true) = block_on(frame::read(&mut io, &mut body)) {
                let _ = frame::read_request(&body);
            }
        }

        #[test]
        fn mutated_requests_never_panic_the_task_codec(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = encode(TaskRequest::Results { records: Vec::new(), loads: Vec::new() });
            bytes.extend(encode(TaskRequest::Cancel { endpoint: "ep".into(), id: TaskId::random() }));
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] ^= v;
            }
            let _ = read_request(&bytes);
        }
    }
}
