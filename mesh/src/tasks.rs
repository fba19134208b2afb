//! `/funcmesh/task/1`: task dispatch and results between a submitting node and an endpoint's
//! node, over direct request-response streams (never gossip).
//!
//! * submitter → endpoint: [`TaskRequest::Submit`] (a batch; each task is stored by the endpoint
//!   before it answers), [`TaskRequest::Cancel`], [`TaskRequest::Records`] (live status).
//! * endpoint → submitter: [`TaskRequest::Results`] (a batch of finished tasks), answered with
//!   [`TaskResponse::Acknowledged`] once the submitter has stored them; until then the endpoint
//!   keeps them in its outbox and sends them again.
//!
//! Submitting a task id twice is harmless: the endpoint answers with the task's current record.

use compute::task::{Record, Submission, TaskId};
use serde::{Deserialize, Serialize};

/// The protocol name.
pub const PROTOCOL: &str = "/funcmesh/task/1";
/// Largest request or response on the wire.
pub const MAX_MESSAGE: usize = 32 << 20;
/// Most tasks in one request.
pub const MAX_BATCH: usize = 4096;

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskRequest {
    /// Run these tasks.
    Submit {
        /// The tasks.
        tasks: Vec<Submission>,
    },
    /// These tasks finished.
    Results {
        /// Their records.
        records: Vec<Record>,
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

/// One submitted task's answer.
// Wire enums: boxing the record would only move the allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Stored; its record as it is now.
    Accepted(Record),
    /// Refused, and why.
    Refused(String),
}

/// A response.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskResponse {
    /// One answer per submitted task, in order.
    Submitted {
        /// The answers.
        answers: Vec<Answer>,
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
            TaskRequest::Submit { tasks } => tasks.len(),
            TaskRequest::Results { records } => records.len(),
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
