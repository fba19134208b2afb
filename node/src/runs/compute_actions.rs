//! The compute action: functions run on the mesh, in Globus compute action shapes.

use super::{Held, about_rights, needs_right};

/// The URLs of Globus' compute action provider (all versions); funcmesh's compute provider
/// answers under each.
pub const COMPUTE_URLS: &[&str] = &[
    "https://compute.actions.globus.org",
    "https://compute.actions.globus.org/fxap",
    "https://compute.actions.globus.org/v3",
    "https://automate.funcx.org",
];

/// Most tasks one compute action runs.
pub const MAX_ACTION_TASKS: usize = 1_000;

/// Runs functions on the mesh for a flow's `Action` state, in the Globus compute action's
/// shapes: `{"endpoint_id" | "endpoint", "function_id" | "function", "args", "kwargs" |
/// "payload"}` for one task, or `"tasks": [...]` (each may name its own endpoint and function;
/// the top level's are the defaults). Functions and endpoints are named as `funcmesh run` names
/// them (id, id prefix, name; `name@node`). Results in `details.result` (a list, in task
/// order) and `details.results` (`task_id`, `output`).
///
/// Idempotent by `request_id`: each task's id is derived from the request's id and the time the
/// engine first asked, so that asking again (after the node restarted) finds the tasks it
/// submitted instead of submitting them again.
pub struct ComputeProvider {
    mesh: mesh::Handle,
    dispatcher: compute::submit::Dispatcher,
    values: compute::blobs::Values,
    rights: crate::run_rights::Rights,
    held: Held<Vec<compute::TaskId>>,
}

impl ComputeProvider {
    /// A provider that submits through `dispatcher`, judging runs started elsewhere by
    /// `rights`.
    pub fn new(
        mesh: mesh::Handle,
        dispatcher: compute::submit::Dispatcher,
        values: compute::blobs::Values,
        rights: crate::run_rights::Rights,
    ) -> ComputeProvider {
        ComputeProvider {
            mesh,
            dispatcher,
            values,
            rights,
            held: Held::default(),
        }
    }

    /// The tasks of a compute action's body.
    fn tasks(body: &serde_json::Value) -> Result<Vec<crate::tasks::NewTask>, String> {
        let pick = |v: &serde_json::Value, a: &str, b: &str| -> Option<String> {
            v.get(a)
                .or_else(|| v.get(b))
                .and_then(|x| x.as_str())
                .map(str::to_string)
        };
        let top_endpoint = pick(body, "endpoint_id", "endpoint");
        let top_function = pick(body, "function_id", "function");
        let one = |t: &serde_json::Value| -> Result<crate::tasks::NewTask, String> {
            let function = pick(t, "function_id", "function")
                .or_else(|| top_function.clone())
                .ok_or("a task names no function (`function_id` or `function`)")?;
            let endpoint = pick(t, "endpoint_id", "endpoint").or_else(|| top_endpoint.clone());
            let args = match t.get("args") {
                None | Some(serde_json::Value::Null) => serde_json::json!([]),
                Some(serde_json::Value::Array(a)) => serde_json::Value::Array(a.clone()),
                // A single argument, as the v2 provider took it.
                Some(other) => serde_json::json!([other]),
            };
            let kwargs = match t.get("kwargs").or_else(|| t.get("payload")) {
                None | Some(serde_json::Value::Null) => serde_json::json!({}),
                Some(serde_json::Value::Object(m)) => serde_json::Value::Object(m.clone()),
                Some(other) => return Err(format!("`kwargs` must be an object, not {other}")),
            };
            Ok(crate::tasks::NewTask {
                function,
                args,
                kwargs,
                endpoint,
                ..Default::default()
            })
        };
        let tasks = match body.get("tasks") {
            Some(serde_json::Value::Array(items)) => {
                items.iter().map(one).collect::<Result<Vec<_>, _>>()?
            }
            Some(_) => return Err("`tasks` must be a list".into()),
            None => vec![one(body)?],
        };
        if tasks.is_empty() || tasks.len() > MAX_ACTION_TASKS {
            return Err(format!(
                "a compute action runs 1 to {MAX_ACTION_TASKS} tasks, not {}",
                tasks.len()
            ));
        }
        Ok(tasks)
    }

    /// The action as its tasks are now.
    async fn answer(
        &self,
        request: &flows::provider::Request,
        ids: &[compute::TaskId],
    ) -> Result<flows::provider::Action, flows::provider::Refusal> {
        use flows::provider::{Action, Refusal, Status};
        let got = self
            .dispatcher
            .get(ids.to_vec())
            .await
            .map_err(|e| Refusal::provider(e.to_string()))?;
        let mut result = Vec::new();
        let mut results = Vec::new();
        let mut failed = None;
        let mut running = false;
        let mut refused = None;
        for (id, t) in ids.iter().zip(got) {
            let Some(t) = t else {
                return Err(Refusal::not_found(format!("task {id} is not on this node")));
            };
            match &t.outcome {
                Some(compute::Outcome::Succeeded { value, value_ref }) => {
                    let output = match value_ref {
                        Some(r) => serde_json::json!({"value_ref": r}),
                        None => value.clone(),
                    };
                    result.push(output.clone());
                    results.push(serde_json::json!({"task_id": id.to_string(), "output": output}));
                }
                Some(compute::Outcome::Failed { error, .. }) => {
                    if error.kind == compute::FailureKind::Refused && about_rights(&error.message) {
                        refused.get_or_insert_with(|| error.to_string());
                    }
                    failed.get_or_insert_with(|| error.to_string());
                    result.push(serde_json::Value::Null);
                    results.push(serde_json::json!({"task_id": id.to_string(), "exception": error.to_string(), "traceback": error.traceback}));
                }
                Some(compute::Outcome::Cancelled { reason }) => {
                    failed.get_or_insert_with(|| format!("cancelled: {reason}"));
                    result.push(serde_json::Value::Null);
                    results.push(serde_json::json!({"task_id": id.to_string(), "exception": format!("cancelled: {reason}")}));
                }
                None => running = true,
            }
        }
        if let (Some(why), false) = (&refused, running) {
            return Ok(needs_right(request, why));
        }
        let mut action = Action::done(
            request,
            failed.is_none(),
            serde_json::json!({"result": result, "results": results}),
        );
        if running {
            action.status = Status::Active;
            action.display_status = Some("ACTIVE".into());
            action.completion_time = None;
        } else if let Some(description) = failed {
            action.details["code"] = "TaskExecutionFailed".into();
            action.details["description"] = description.into();
        }
        Ok(action)
    }
}

impl flows::provider::Provider for ComputeProvider {
    fn run(
        &self,
        request: flows::provider::Request,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        Box::pin(async move {
            use flows::provider::Refusal;
            let mut tasks = ComputeProvider::tasks(&request.body).map_err(Refusal::bad)?;
            // A run started by another institution's node: each task with its starter's
            // delegated token, or not at all.
            if let Some(starter) = self
                .rights
                .starters
                .of_user(&request.user)
                .await
                .map_err(Refusal::provider)?
            {
                let view = self
                    .mesh
                    .registry()
                    .await
                    .map_err(|e| Refusal::provider(e.to_string()))?;
                for task in &mut tasks {
                    match self.rights.compute_token(
                        &starter,
                        &view,
                        task.endpoint.as_deref(),
                        &task.function,
                    ) {
                        Ok(token) => task.capability = token,
                        Err(why) => return Ok(needs_right(&request, &why)),
                    }
                }
            }
            let at = u64::try_from(request.at_ms).unwrap_or(0);
            let generation = self.held.generation(&request.request_id);
            let ids: Vec<compute::TaskId> = (0..tasks.len())
                .map(|i| {
                    let key = match generation {
                        0 => format!("{}/{i}", request.request_id),
                        g => format!("{}/{i}/resumed-{g}", request.request_id),
                    };
                    compute::TaskId::keyed(at, &key)
                })
                .collect();
            // Tasks submitted before (the node asked again after a restart) are not again.
            let held = self
                .dispatcher
                .get(ids.clone())
                .await
                .map_err(|e| Refusal::provider(e.to_string()))?;
            let mut fresh = Vec::new();
            for ((task, id), held) in tasks.drain(..).zip(&ids).zip(held) {
                if held.is_none() {
                    fresh.push(crate::tasks::NewTask {
                        id: Some(id.clone()),
                        ..task
                    });
                }
            }
            if !fresh.is_empty() {
                let answers =
                    crate::tasks::submit(&self.mesh, &self.dispatcher, &self.values, fresh)
                        .await
                        .map_err(|e| Refusal::provider(format!("{e:#}")))?;
                if let Some(Err(refused)) = answers.into_iter().find(|a| a.is_err()) {
                    if about_rights(&refused.message) {
                        return Ok(needs_right(&request, &refused.message));
                    }
                    return Err(Refusal::bad(refused.message));
                }
            }
            self.held.hold(&request, ids.clone());
            self.answer(&request, &ids).await
        })
    }

    fn status(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.held.known(action_id, "compute");
        Box::pin(async move {
            let (request, ids) = known?;
            self.answer(&request, &ids).await
        })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.held.known(action_id, "compute");
        Box::pin(async move {
            let (request, ids) = known?;
            for t in &ids {
                let _ = self.dispatcher.cancel(t.clone()).await;
            }
            self.answer(&request, &ids).await
        })
    }

    fn resume(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        // The next ask runs the action's tasks again, under new ids.
        self.held.resume(action_id);
        self.status(action_id)
    }

    fn release(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<(), flows::provider::Refusal>> {
        self.held.forget(action_id);
        Box::pin(async { Ok(()) })
    }

    fn changed(
        &self,
        action_id: &str,
        at_most: std::time::Duration,
    ) -> flows::provider::BoxFuture<'_, ()> {
        // The dispatcher answers as soon as every task is finished.
        let ids = self
            .held
            .get(action_id)
            .map(|(_, ids)| ids)
            .unwrap_or_default();
        Box::pin(async move {
            if ids.is_empty() {
                tokio::time::sleep(at_most).await;
            } else {
                let _ = self.dispatcher.wait(ids, at_most).await;
            }
        })
    }
}
