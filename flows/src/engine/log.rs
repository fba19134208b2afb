//! What a run is made of: its status and summary, the events of its log, the errors its
//! steps fail with, and where a run is once its log is folded.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Running.
    Active,
    /// Waiting on something outside it (an action that needs a right): `resume` goes on.
    Inactive,
    /// Ended at a terminal state.
    Succeeded,
    /// Ended by an error nothing caught, or a `Fail` state.
    Failed,
    /// Cancelled.
    Ended,
}

impl RunStatus {
    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Ended
        )
    }
}

/// A run's summary, kept beside its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id.
    pub run_id: String,
    /// The flow it runs.
    pub flow_id: String,
    /// Who started it.
    pub user: String,
    /// Its label.
    #[serde(default)]
    pub label: Option<String>,
    /// Where it is.
    pub status: RunStatus,
    /// The state it is in (while not final).
    #[serde(default)]
    pub state: Option<String>,
    /// When it started and ended (RFC 3339).
    pub start_time: String,
    /// When it ended.
    #[serde(default)]
    pub completion_time: Option<String>,
    /// Its output when it succeeded; the error when it failed; why when it is inactive.
    #[serde(default)]
    pub details: Value,
    /// How many events its log holds.
    pub events: u64,
    /// The run this one is a branch or an iteration of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// An error of a step: a name `Catch` and `Retry` match, and what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The error's name (`ActionFailedException`, `States.Runtime`, a `Fail` state's `Error`).
    #[serde(rename = "Error")]
    pub error: String,
    /// What happened.
    #[serde(rename = "Cause")]
    pub cause: String,
    /// More (an action's status document).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl Failure {
    pub(super) fn runtime(cause: impl Into<String>) -> Failure {
        Failure {
            error: "States.Runtime".into(),
            cause: cause.into(),
            details: Value::Null,
        }
    }
}

/// One entry of a run's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "code")]
pub enum Event {
    /// The run started: the definition it pins, its input and context.
    FlowStarted {
        /// The definition, as deployed.
        definition: Value,
        /// The run's input.
        input: Value,
        /// `$._context`.
        context: Value,
        /// When.
        time: String,
    },
    /// A state's action was asked for, with the idempotency key that re-attaches to it.
    ActionStarted {
        /// The state.
        state: String,
        /// The action's `request_id`.
        request_id: String,
        /// The action URL.
        url: String,
        /// What was sent.
        body: Value,
        /// When (milliseconds since the epoch).
        at_ms: i64,
    },
    /// The action went INACTIVE (the run waits for `resume`).
    ActionInactive {
        /// The state.
        state: String,
        /// The action's status document.
        action: Value,
    },
    /// A timer: a `Wait` state or a retry's wait, until then.
    Waiting {
        /// The state.
        state: String,
        /// Until (milliseconds since the epoch).
        until_ms: i64,
    },
    /// A step failed and will run again.
    Retrying {
        /// The state.
        state: String,
        /// The error.
        error: Failure,
        /// Which retrier, and how many times it has retried now.
        retrier: usize,
        /// Its count.
        attempt: u32,
        /// When to run again.
        until_ms: i64,
    },
    /// A state is done: its output, and where the run goes.
    StateExited {
        /// The state.
        state: String,
        /// Its output (the next state's input).
        output: Value,
        /// The next state (none: the run succeeded with `output`).
        next: Option<String>,
        /// The error a `Catch` caught on the way, if that is how it left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caught: Option<Failure>,
    },
    /// The run failed.
    FlowFailed {
        /// Why.
        error: Failure,
        /// When.
        time: String,
    },
    /// The run was cancelled.
    FlowCancelled {
        /// When.
        time: String,
    },
}

/// Where a run is, folded from its log.
#[derive(Debug, Clone)]
pub(super) struct Cursor {
    pub(super) state: String,
    pub(super) doc: Value,
    /// An action asked for in this state and not yet answered: its request id, URL, body and
    /// start time.
    pub(super) pending: Option<(String, String, Value, i64)>,
    /// A timer in this state.
    pub(super) waiting: Option<i64>,
    /// Retries used, by retrier, in this state's current visit.
    pub(super) retries: HashMap<usize, u32>,
    /// Whether the run is waiting for `resume`.
    pub(super) inactive: bool,
}
