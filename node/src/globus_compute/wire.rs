//! The Globus Compute SDK's forms, and funcmesh's for them: dashed UUIDs for funcmesh's 32-hex
//! ids, the SDK's packed buffers, the Python that runs a Globus Compute function on a funcmesh
//! worker, and the task documents the SDK reads.

use compute::submit::Submitted;
use compute::task::{Outcome, Status};
use serde_json::{Value, json};

/// A funcmesh id (32 lowercase hex characters: task, function, endpoint) as the dashed UUID the
/// SDK sends and expects.
pub(crate) fn uuid(hex: &str) -> String {
    if hex.len() != 32 || !hex.is_ascii() {
        return hex.to_owned();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The funcmesh id behind a UUID the SDK sent: dashed or not, any case.
pub(crate) fn from_uuid(s: &str) -> Result<String, String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let dashes_fit = s.len() == 32
        || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
    if hex.len() == 32 && dashes_fit && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "`{}` is not a UUID",
            s.chars().take(40).collect::<String>()
        ))
    }
}

/// Splits the SDK's packed buffers: each is its length in characters (Unicode code points, not
/// bytes), a newline, and that many characters.
pub(crate) fn unpack(mut s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (len, rest) = s
            .split_once('\n')
            .ok_or("a packed buffer has no length line")?;
        let n: usize = len
            .parse()
            .map_err(|_| format!("`{}` is not a buffer length", clip(len)))?;
        let end = rest.char_indices().nth(n).map_or(rest.len(), |(i, _)| i);
        if rest[..end].chars().count() != n {
            return Err(format!(
                "a packed buffer says it holds {n} characters, and fewer follow"
            ));
        }
        out.push(&rest[..end]);
        s = &rest[end..];
    }
    Ok(out)
}

/// Packs buffers as the SDK does.
pub(crate) fn pack(buffers: &[&str]) -> String {
    buffers
        .iter()
        .map(|b| format!("{}\n{b}", b.chars().count()))
        .collect()
}

/// The SDK's serialization strategies, by their two-character header.
const STRATEGIES: &[&str] = &[
    "00", "01", "02", "03", "04", "10", "11", "12", "13", "st", "sd",
];

/// Checks that `buffer` is one serialized value: a known strategy header, a newline, the data.
pub(crate) fn check_serialized(buffer: &str) -> Result<(), String> {
    let head = buffer.get(..3).unwrap_or(buffer);
    match head.strip_suffix('\n') {
        Some(h) if STRATEGIES.contains(&h) => Ok(()),
        _ => Err(format!(
            "`{}` is not a Globus Compute serialization header",
            clip(head)
        )),
    }
}

/// Checks one function buffer as `POST /v3/functions` sends it (`function_code`): one packed,
/// serialized buffer.
pub(crate) fn check_function_code(code: &str) -> Result<(), String> {
    match unpack(code)?.as_slice() {
        [one] => check_serialized(one),
        other => Err(format!(
            "function_code holds {} packed buffers, not 1",
            other.len()
        )),
    }
}

/// Checks one task's payload as a submit sends it: the packed arguments and keyword arguments.
pub(crate) fn check_payload(payload: &str) -> Result<(), String> {
    match unpack(payload)?.as_slice() {
        [args, kwargs] => check_serialized(args).and_then(|()| check_serialized(kwargs)),
        other => Err(format!(
            "a task payload holds {} packed buffers, not 2 (arguments, keyword arguments)",
            other.len()
        )),
    }
}

/// The function buffer for source text sent with `serialized: false`
/// (`Client.register_source_code`): the SDK's source strategy, `st`, naming the function.
pub(crate) fn source_function_code(name: &str, source: &str) -> String {
    pack(&[&format!("st\n{name}:{source}")])
}

/// The entry point of every Globus Compute function's funcmesh source.
pub(crate) const ENTRYPOINT: &str = "globus_compute_task";

/// The first line of that source, which marks it.
const MARKER: &str =
    "# A Globus Compute function, registered through funcmesh's Globus Compute API.";

/// The Python source of the funcmesh function that runs a Globus Compute function: the SDK's
/// buffer, deserialized and called by the SDK's own serializer in the worker (which must have
/// `globus-compute-sdk`), the result serialized the same way.
pub(crate) fn function_source(function_code: &str) -> String {
    // A JSON string is a Python string literal.
    let literal = Value::String(function_code.to_owned()).to_string();
    format!(
        r#"{MARKER}
# Its code, as the SDK packed it; it runs where globus-compute-sdk is installed.
FUNCTION_CODE = {literal}


def {ENTRYPOINT}(payload, result_serializers=None):
    # The remote traceback starts in the user's function, as Globus Compute's does.
    __tracebackhide__ = True
    import sys

    try:
        from globus_compute_sdk.serialize import ComputeSerializer
    except ImportError:
        raise RuntimeError(
            "this worker's Python (%s) cannot import globus_compute_sdk: install it there "
            "(pip install globus-compute-sdk), or set the endpoint's `python` to an "
            "environment that has it" % sys.executable
        ) from None
    serde = ComputeSerializer()
    fn, args, kwargs = serde.unpack_and_deserialize(FUNCTION_CODE + payload)
    result = fn(*args, **kwargs)
    if hasattr(serde, "serialize_from_list"):
        return serde.serialize_from_list(result, result_serializers or [])
    return serde.serialize(result)  # an SDK older than its result serializers
"#
    )
}

/// The SDK's buffer inside a funcmesh function's source, if it is one [`function_source`] made.
pub(crate) fn function_code_of(source: &str) -> Option<String> {
    let mut lines = source.lines();
    if lines.next()? != MARKER {
        return None;
    }
    let literal = lines.find_map(|l| l.strip_prefix("FUNCTION_CODE = "))?;
    serde_json::from_str(literal).ok()
}

/// Whether a function record is a Globus Compute function.
pub(crate) fn is_globus_function(f: &crdt_registry::record::FunctionRecord) -> bool {
    matches!(&f.spec, crdt_registry::record::FunctionSpec::PythonSource { source, entrypoint }
        if entrypoint == ENTRYPOINT && source.starts_with(MARKER))
}

/// The SDK's status name for an unfinished task.
fn pending_status(s: Status) -> &'static str {
    match s {
        Status::Pending | Status::Received => "waiting-for-ep",
        Status::Queued => "waiting-for-nodes",
        Status::WaitingForWorker => "waiting-for-launch",
        _ => "running",
    }
}

/// How a finished task ended, as the SDK takes it.
pub(crate) enum Ending {
    /// A serialized value (`00\n…`).
    Result(String),
    /// The remote traceback, or what went wrong.
    Exception(String),
}

/// How `t` ended, its value given as `value` (the inline one, or the one fetched by reference).
/// A Globus Compute function's value is the serialized string it returned; any other function's
/// JSON value is given in the SDK's JSON strategy (`11`), a pickled one in its dill strategy
/// (`00`, which loads a pickle).
pub(crate) fn ending(t: &Submitted, value: Option<&Value>) -> Option<Ending> {
    match t.outcome.as_ref()? {
        Outcome::Succeeded { .. } => {
            let value = value.unwrap_or(&Value::Null);
            Some(Ending::Result(match value {
                Value::String(s) if is_globus_function(&t.submission.function) => s.clone(),
                Value::Object(m)
                    if t.submission.encoding == compute::task::Encoding::Pickle && m.len() == 1 =>
                {
                    match m.get("pickle") {
                        Some(Value::String(b64)) => format!("00\n{b64}\n"),
                        _ => format!("11\n{value}"),
                    }
                }
                other => format!("11\n{other}"),
            }))
        }
        Outcome::Failed { error, .. } => Some(Ending::Exception(match &error.traceback {
            Some(tb) if !tb.is_empty() => tb.clone(),
            _ => format!("{}: {}", error.type_name, error.message),
        })),
        Outcome::Cancelled { reason } => Some(Ending::Exception(format!(
            "TaskCancelled: the task was cancelled: {reason}"
        ))),
    }
}

/// Seconds since the epoch, as the SDK's `completion_t`.
pub(crate) fn seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// `GET /v2/tasks/{id}`'s document for `t`; `ending` as [`ending`] gave it.
pub(crate) fn task_doc(
    task_uuid: &str,
    t: &Submitted,
    ending: Option<Ending>,
    group: Option<&str>,
) -> Value {
    let mut doc = json!({ "task_id": task_uuid });
    match ending {
        Some(e) => {
            let finished = if t.finished_us > 0 {
                t.finished_us
            } else {
                t.submitted_us
            };
            doc["completion_t"] = seconds(finished).into();
            match e {
                Ending::Result(r) => {
                    doc["status"] = "success".into();
                    doc["result"] = r.into();
                }
                Ending::Exception(x) => {
                    doc["status"] = "failed".into();
                    doc["exception"] = x.into();
                }
            }
        }
        None => doc["status"] = pending_status(t.status).into(),
    }
    if let Some(g) = group {
        doc["task_group_id"] = uuid(g).into();
    }
    doc
}

/// The message the SDK's Executor takes from its result queue: protocol version 1, then the
/// JSON of a `result` message.
pub(crate) fn result_message(task_uuid: &str, ending: &Ending) -> Vec<u8> {
    let data = match ending {
        Ending::Result(r) => json!({ "task_id": task_uuid, "data": r }),
        Ending::Exception(x) => json!({
            "task_id": task_uuid,
            "data": x,
            "error_details": {
                "code": "RemoteExecutionError",
                "user_message": "An error occurred during the execution of this task",
            },
        }),
    };
    let mut out = vec![1u8];
    out.extend_from_slice(
        json!({ "message_type": "result", "data": data })
            .to_string()
            .as_bytes(),
    );
    out
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_map_to_uuids_and_back() {
        let hex = "0123456789abcdef0123456789abcdef";
        let u = uuid(hex);
        assert_eq!(u, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(from_uuid(&u).unwrap(), hex);
        assert_eq!(from_uuid(&u.to_uppercase()).unwrap(), hex);
        assert_eq!(from_uuid(hex).unwrap(), hex);
        for bad in [
            "",
            "0123",
            "01234567-89ab-cdef-0123-456789abcdeg",
            "0123456789ab-cdef-0123-456789abcdef",
            "0-1-2-3-4567-89ab-cdef-0123-456789abcdef",
            "01234567-89ab-cdef-0123-456789abcdef0",
        ] {
            assert!(from_uuid(bad).is_err(), "{bad} taken");
        }
    }

    #[test]
    fn packed_buffers_count_characters_not_bytes() {
        let packed = pack(&["00\nabc", "11\n\"é€\""]);
        assert_eq!(packed, "6\n00\nabc7\n11\n\"é€\"");
        assert_eq!(unpack(&packed).unwrap(), vec!["00\nabc", "11\n\"é€\""]);
        assert!(check_payload(&packed).is_ok());
        assert!(check_function_code(&pack(&["01\nxyz"])).is_ok());
        // Too short, no length, not a number, an unknown header, the wrong count.
        assert!(unpack("9\n00\nabc").is_err());
        assert!(unpack("00\nabc").is_err());
        assert!(unpack("abc").is_err());
        assert!(check_function_code(&pack(&["zz\nxyz"])).is_err());
        assert!(check_function_code(&pack(&["01\nx", "01\ny"])).is_err());
        assert!(check_payload(&pack(&["00\nx"])).is_err());
    }

    #[test]
    fn source_round_trips_its_function_code() {
        let code = pack(&["01\ngASV\"quoted\" \\ back\nslash é\n"]);
        let src = function_source(&code);
        assert_eq!(function_code_of(&src).unwrap(), code);
        assert!(src.contains(&format!("def {ENTRYPOINT}(")));
        assert_eq!(function_code_of("def f(): pass"), None);
        assert_eq!(
            source_function_code("add", "def add(a, b):\n    return a + b\n"),
            "39\nst\nadd:def add(a, b):\n    return a + b\n"
        );
    }

    #[test]
    fn a_result_message_is_version_1_then_json() {
        let m = result_message("t", &Ending::Exception("Traceback".into()));
        assert_eq!(m[0], 1);
        let v: Value = serde_json::from_slice(&m[1..]).unwrap();
        assert_eq!(v["message_type"], "result");
        assert_eq!(v["data"]["data"], "Traceback");
        assert_eq!(v["data"]["error_details"]["code"], "RemoteExecutionError");
        let m = result_message("t", &Ending::Result("00\nx\n".into()));
        let v: Value = serde_json::from_slice(&m[1..]).unwrap();
        assert!(v["data"].get("error_details").is_none());
    }

    proptest! {
        // The decoders of what the SDK sends never panic, and packing round-trips.
        #[test]
        fn unpack_takes_any_text(s in ".{0,200}") {
            let _ = unpack(&s);
            let _ = check_payload(&s);
            let _ = check_function_code(&s);
            let _ = from_uuid(&s);
        }

        #[test]
        fn pack_then_unpack_is_identity(bufs in proptest::collection::vec(".{0,50}", 0..5)) {
            let refs: Vec<&str> = bufs.iter().map(String::as_str).collect();
            let packed = pack(&refs);
            prop_assert_eq!(unpack(&packed).unwrap(), refs);
        }
    }
}
