//! What a state reads and writes: a run folded back from its log, a state's input (`InputPath`,
//! `Parameters`, with the run context at `_context`), its output (`ResultPath`), a `Wait`'s
//! deadline, and an action's status as a state stores it.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::log::{Cursor, Event, Failure};
use crate::definition::{Definition, Io, WaitFor};
use crate::provider::Action;

/// Where a run is, from its log.
pub(super) fn fold(def: &Definition, input: Value, log: &[Event]) -> Cursor {
    let mut cur = Cursor {
        state: def.start_at.clone(),
        doc: input,
        pending: None,
        waiting: None,
        retries: HashMap::new(),
        inactive: false,
    };
    for e in log {
        match e {
            Event::ActionStarted {
                request_id,
                url,
                body,
                at_ms,
                ..
            } => cur.pending = Some((request_id.clone(), url.clone(), body.clone(), *at_ms)),
            Event::ActionInactive { .. } => cur.inactive = true,
            Event::Waiting { until_ms, .. } => cur.waiting = Some(*until_ms),
            Event::Retrying {
                retrier,
                attempt,
                until_ms,
                ..
            } => {
                cur.retries.insert(*retrier, *attempt);
                cur.waiting = Some(*until_ms);
                cur.pending = None;
            }
            Event::StateExited { output, next, .. } => {
                cur.doc = output.clone();
                cur.pending = None;
                cur.waiting = None;
                cur.retries.clear();
                cur.inactive = false;
                if let Some(n) = next {
                    cur.state = n.clone();
                }
            }
            Event::FlowStarted { .. } | Event::FlowFailed { .. } | Event::FlowCancelled { .. } => {}
        }
    }
    cur
}

/// The state's document with the run context at `_context` (read-only: it is never stored).
pub(super) fn with_context(doc: &Value, context: &Value) -> Value {
    match doc {
        Value::Object(map) => {
            let mut m = map.clone();
            m.insert("_context".into(), context.clone());
            Value::Object(m)
        }
        other => other.clone(),
    }
}

/// `InputPath`, then `Parameters`.
pub(super) fn input_of(io: &Io, scope: &Value) -> Result<Value, Failure> {
    let selected = match &io.input_path {
        Some(p) => p.select(scope).map_err(Failure::runtime)?,
        None => scope.clone(),
    };
    match &io.parameters {
        Some(t) => t.render(&selected).map_err(Failure::runtime),
        None => Ok(strip_context(selected)),
    }
}

pub(super) fn strip_context(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            m.remove("_context");
            Value::Object(m)
        }
        other => other,
    }
}

/// `ResultPath`: the result put into the state's input.
pub(super) fn output_of(io: &Io, input: &Value, result: Value) -> Result<Value, Failure> {
    match &io.result_path {
        None => Ok(input.clone()),
        Some(p) => {
            let mut out = input.clone();
            p.set(&mut out, result).map_err(|e| Failure {
                error: "States.ResultPathMatchFailure".into(),
                cause: e,
                details: Value::Null,
            })?;
            Ok(out)
        }
    }
}

pub(super) fn wait_until(wait: &WaitFor, scope: &Value) -> Result<i64, Failure> {
    let now = crate::time::now_ms();
    let secs = |v: &Value| -> Result<i64, Failure> {
        v.as_f64()
            .filter(|s| *s >= 0.0 && *s <= crate::definition::MAX_WAIT_SECONDS)
            .map(|s| now + (s * 1_000.0) as i64)
            .ok_or_else(|| Failure::runtime(format!("{v} is not a number of seconds")))
    };
    let stamp = |s: &str| {
        crate::time::parse_rfc3339(s)
            .ok_or_else(|| Failure::runtime(format!("`{s}` is not an RFC 3339 time")))
    };
    match wait {
        WaitFor::Seconds(s) => secs(&json!(s)),
        WaitFor::SecondsPath(p) => secs(&p.select(scope).map_err(Failure::runtime)?),
        WaitFor::Timestamp(t) => stamp(t),
        WaitFor::TimestampPath(p) => match p.select(scope).map_err(Failure::runtime)? {
            Value::String(s) => stamp(&s),
            other => Err(Failure::runtime(format!("{other} is not a timestamp"))),
        },
    }
}

/// An action's status document as a state stores it (with `state_name`, as Globus does).
pub(super) fn action_doc(action: &Action, state: &str) -> Value {
    let mut v = serde_json::to_value(action).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("state_name".into(), Value::String(state.to_string()));
    }
    v
}
