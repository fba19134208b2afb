//! The task types of the local API (`POST /v1/tasks`, `GET /v1/tasks/{id}`) and the step that
//! turns them into the dispatcher's requests, resolving functions in the registry.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use compute::submit::{Dispatcher, Submitted};
use compute::task::{Outcome, Status};
use serde::{Deserialize, Serialize};

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    /// Its id.
    pub id: String,
    /// The function's name.
    pub function: String,
    /// The function's id.
    pub function_id: String,
    /// Status.
    pub status: Status,
    /// The endpoint it was sent to (`name@node`).
    pub endpoint: Option<String>,
    /// The endpoint's node.
    pub endpoint_peer: Option<String>,
    /// Tries so far.
    pub attempts: usize,
    /// Why earlier tries ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<String>,
    /// Phase timestamps, Unix microseconds.
    pub times: compute::task::Times,
    /// Whether a worker had to start for it.
    pub cold_start: bool,
    /// The worker that ran it.
    pub worker: Option<String>,
    /// Its environment.
    pub environment: Option<String>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl From<&Submitted> for TaskView {
    fn from(t: &Submitted) -> TaskView {
        let target = t.target();
        let mut times = t
            .record
            .as_ref()
            .map(|r| r.times.clone())
            .unwrap_or_default();
        times.submitted_us = t.submitted_us;
        if times.finished_us == 0 {
            times.finished_us = t.finished_us;
        }
        TaskView {
            id: t.id.to_string(),
            function: t.function_name.clone(),
            function_id: t.submission.function_id.clone(),
            status: t.status,
            endpoint: target.map(|x| format!("{}@{}", x.endpoint, x.node_name)),
            endpoint_peer: target.map(|x| x.peer.clone()),
            attempts: t.attempts.len(),
            lost: t.attempts.iter().filter_map(|a| a.lost.clone()).collect(),
            times,
            cold_start: t.record.as_ref().is_some_and(|r| r.cold_start),
            worker: t.record.as_ref().and_then(|r| r.worker.clone()),
            environment: t.record.as_ref().map(|r| r.environment.clone()),
            outcome: t.outcome.clone(),
        }
    }
}

/// One task in `POST /v1/tasks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewTask {
    /// The function: id, id prefix (6+ characters) or name.
    pub function: String,
    /// Positional arguments (a JSON array).
    pub args: serde_json::Value,
    /// Keyword arguments (a JSON object).
    pub kwargs: serde_json::Value,
    /// The arguments by reference: a blob this node holds (`POST /v1/blobs`) with
    /// `{"args": […], "kwargs": {…}}` as JSON; `args` and `kwargs` are then left out. Arguments
    /// larger than the node's inline limit go by reference without this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_ref: Option<compute::task::ValueRef>,
    /// `json` (default) or `pickle`.
    pub encoding: compute::task::Encoding,
    /// An explicit endpoint: id, id prefix, `name` or `name@node`.
    pub endpoint: Option<String>,
    /// Tags the endpoint must have.
    pub require: BTreeMap<String, String>,
    /// The institution the endpoint must belong to.
    pub institution: Option<String>,
    /// `warm-aware` (default), `least-loaded`, `random`, `round-robin`.
    pub strategy: Option<String>,
    /// Retries elsewhere if the endpoint is lost.
    pub retries: u32,
    /// Time limit, milliseconds (0: the endpoint's default).
    pub timeout_ms: u64,
    /// A capability token to present (text form), instead of one this node holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// The task's id, chosen by the node itself (a flow's compute action); not in the API.
    #[serde(skip)]
    pub id: Option<compute::TaskId>,
}

/// `POST /v1/tasks`: one task (the fields of [`NewTask`]) or many (`tasks`), optionally waiting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SubmitBody {
    /// Many tasks.
    pub tasks: Vec<NewTask>,
    /// Wait up to this long for the results.
    pub wait_ms: u64,
}

/// One task's answer in a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted1 {
    /// The task, if accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    /// Why not, if refused: what the user reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind of refusal, for programs: `function` (not in the registry), `arguments`,
    /// `environment`, `no_route`, `internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
}

/// Why a task of the API was not accepted. Every refusal on the way — the node's lookup of the
/// function and the dispatcher's ([`compute::submit::Refusal`]) — becomes one of these, here,
/// and the API sends its message and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// A stable name for the kind (see [`Submitted1::error_kind`]).
    pub kind: &'static str,
    /// What the user reads.
    pub message: String,
}

impl Refused {
    fn new(kind: &'static str, message: impl Into<String>) -> Refused {
        Refused {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<compute::submit::Refusal> for Refused {
    fn from(r: compute::submit::Refusal) -> Refused {
        Refused::new(r.kind(), r.to_string())
    }
}

impl Submitted1 {
    fn refused(r: Refused) -> Submitted1 {
        Submitted1 {
            task: None,
            error: Some(r.message),
            error_kind: Some(r.kind.to_owned()),
        }
    }
}

/// Turns API tasks into dispatcher requests, resolving functions in the registry.
pub(crate) fn requests(
    functions: &HashMap<String, Result<crdt_registry::Function, String>>,
    tasks: Vec<NewTask>,
) -> Vec<Result<compute::submit::Request, Refused>> {
    tasks
        .into_iter()
        .map(|t| {
            let f = functions
                .get(&t.function)
                .cloned()
                .unwrap_or_else(|| Err(format!("function `{}` was not looked up", t.function)))
                .map_err(|e| Refused::new("function", e))?;
            let strategy = match &t.strategy {
                None => compute::routing::Strategy::default(),
                Some(s) => compute::routing::Strategy::parse(s)
                    .map_err(|e| Refused::new("arguments", e))?,
            };
            if t.encoding == compute::task::Encoding::Json {
                if !(t.args.is_array() || t.args.is_null()) {
                    return Err(Refused::new(
                        "arguments",
                        format!(
                            "args must be a JSON array of positional arguments, not {}",
                            t.args
                        ),
                    ));
                }
                if !(t.kwargs.is_object() || t.kwargs.is_null()) {
                    return Err(Refused::new(
                        "arguments",
                        format!("kwargs must be a JSON object, not {}", t.kwargs),
                    ));
                }
            }
            Ok(compute::submit::Request {
                function: f,
                args: t.args,
                kwargs: t.kwargs,
                args_ref: t.args_ref,
                encoding: t.encoding,
                timeout_ms: t.timeout_ms,
                requirements: compute::routing::Requirements {
                    tags: t.require,
                    endpoint: t.endpoint,
                    institution: t.institution,
                },
                strategy,
                retries: t.retries,
                capability: t.capability.map(|c| c.trim().to_owned()),
                id: t.id,
            })
        })
        .collect()
}

/// Resolves and submits API tasks: one answer per task, in order (refused ones with the reason).
pub(crate) async fn submit(
    mesh: &mesh::Handle,
    dispatcher: &Dispatcher,
    values: &compute::blobs::Values,
    tasks: Vec<NewTask>,
) -> anyhow::Result<Vec<Result<Submitted, Refused>>> {
    let (slots, ok) = resolve(mesh, values, tasks).await?;
    Ok(merge(slots, dispatcher.submit(ok).await?))
}

/// Resolves and submits API tasks, and answers as `POST /v1/tasks` does: each task as it is
/// once accepted, or, with `wait`, once finished (or when `wait` has passed).
pub(crate) async fn submit_views(
    mesh: &mesh::Handle,
    dispatcher: &Dispatcher,
    values: &compute::blobs::Values,
    tasks: Vec<NewTask>,
    wait: Option<Duration>,
) -> anyhow::Result<Vec<Submitted1>> {
    let (slots, ok) = resolve(mesh, values, tasks).await?;
    let view = |r: Result<&Submitted, Refused>| match r {
        Ok(t) => Submitted1 {
            task: Some(t.into()),
            error: None,
            error_kind: None,
        },
        Err(e) => Submitted1::refused(e),
    };
    Ok(match wait {
        None => merge(slots, dispatcher.submit(ok).await?)
            .into_iter()
            .map(|r| match r {
                Ok(t) => view(Ok(&t)),
                Err(e) => view(Err(e)),
            })
            .collect(),
        Some(d) => merge(slots, dispatcher.submit_and_wait(ok, d).await?)
            .into_iter()
            .map(|r| match r {
                Ok(t) => view(Ok(&t)),
                Err(e) => view(Err(e)),
            })
            .collect(),
    })
}

/// Looks up each task's function (each distinct one once, inside the mesh, without copying the
/// registry): a slot per task, refused ones with the reason, and the requests of the others.
async fn resolve(
    mesh: &mesh::Handle,
    values: &compute::blobs::Values,
    tasks: Vec<NewTask>,
) -> anyhow::Result<(Vec<Result<(), Refused>>, Vec<compute::submit::Request>)> {
    let queries: std::collections::BTreeSet<String> =
        tasks.iter().map(|t| t.function.clone()).collect();
    let functions: HashMap<String, Result<crdt_registry::Function, String>> = mesh
        .registry_with(move |view| {
            queries
                .into_iter()
                .map(|q| {
                    let found = crate::registry::find_function(view, &q)
                        .cloned()
                        .map_err(|e| format!("{e:#}"));
                    (q, found)
                })
                .collect()
        })
        .await?;
    let mut ok = Vec::new();
    let mut slots = Vec::new();
    for r in requests(&functions, tasks) {
        match r {
            Ok(mut r) => {
                // Large arguments go by reference, as a blob the endpoint fetches from here.
                if let Err(e) = crate::values::by_reference(values, &mut r).await {
                    slots.push(Err(Refused::new("arguments", e)));
                    continue;
                }
                slots.push(Ok(()));
                ok.push(r);
            }
            Err(e) => slots.push(Err(e)),
        }
    }
    Ok((slots, ok))
}

/// The dispatcher's answers put back in the slots of the tasks that reached it.
fn merge<T>(
    slots: Vec<Result<(), Refused>>,
    answers: Vec<Result<T, compute::submit::Refusal>>,
) -> Vec<Result<T, Refused>> {
    let mut answers = answers.into_iter();
    slots
        .into_iter()
        .map(|s| match s {
            Ok(()) => answers.next().map_or_else(
                || Err(Refused::new("internal", "no answer from the dispatcher")),
                |a| a.map_err(Refused::from),
            ),
            Err(e) => Err(e),
        })
        .collect()
}
