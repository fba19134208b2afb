//! Flow runs on this node: the providers its engine has, and a definition's check against
//! them. The engine itself is `flows::engine`; the API's `/v1/flows/validate` and `/v1/runs`
//! and the CLI's `funcmesh flow` use what is here.

use serde::Serialize;

/// The action providers flow definitions are checked against where no node is at hand
/// (`funcmesh flow validate` without `--node`): the built-ins, and the URLs a node's own
/// providers answer (compute).
pub fn providers() -> flows::provider::Providers {
    let mut p = flows::provider::Providers::builtin();
    let none: std::sync::Arc<dyn flows::provider::Provider> =
        std::sync::Arc::new(flows::provider::ExpressionEval);
    for url in COMPUTE_URLS {
        // Only `knows` is asked of these.
        p.add(url, none.clone());
    }
    p.add_prefix(FLOWS_URL, none.clone());
    for base in TRANSFER_BASES {
        for op in TRANSFER_OPS {
            p.add(&format!("{base}/{op}"), none.clone());
        }
    }
    p
}

/// The external action providers `[flows]` lists, each with its bearer token when one is
/// configured (read from its file now).
pub(crate) fn external_providers(
    flows: &crate::config::FlowsSection,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    flows
        .action_providers
        .iter()
        .map(|url| {
            let token = match flows.action_provider_token_files.get(url) {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "flows.action_provider_token_files: cannot read {} (for \
                                 {url}): {e}",
                                file.display()
                            )
                        })?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            Ok((url.clone(), token))
        })
        .collect()
}

/// The action providers of a node's flow engine: the built-ins, compute on the mesh, and
/// transfer on endpoints' data roots.
pub(crate) fn node_providers(
    mesh: &mesh::Handle,
    own: &mesh::membership::Member,
    tasks: &compute::service::Tasks,
    values: &compute::blobs::Values,
    transfers: &std::sync::Arc<crate::transfers::Transfers>,
    engine: &std::sync::Arc<std::sync::OnceLock<flows::engine::WeakEngine>>,
    external: &[(String, Option<String>)],
) -> flows::provider::Providers {
    let mut p = flows::provider::Providers::builtin();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    for (url, token) in external {
        p.add(
            url,
            std::sync::Arc::new(HttpProvider {
                base: url.trim_end_matches('/').to_string(),
                http: http.clone(),
                token: token.clone(),
            }),
        );
    }
    p.add_prefix(
        FLOWS_URL,
        std::sync::Arc::new(FlowProvider {
            mesh: mesh.clone(),
            own: own.clone(),
            access: tasks.access.clone(),
            engine: engine.clone(),
        }),
    );
    let rights = crate::run_rights::Rights {
        starters: crate::run_rights::Starters::new(transfers.store.clone()),
        access: tasks.access.clone(),
        own: own.clone(),
        me: mesh.peer_id(),
    };
    let compute: std::sync::Arc<dyn flows::provider::Provider> =
        std::sync::Arc::new(ComputeProvider::new(
            mesh.clone(),
            tasks.dispatcher.clone(),
            values.clone(),
            rights.clone(),
        ));
    for url in COMPUTE_URLS {
        p.add(url, compute.clone());
    }
    for op in TRANSFER_OPS {
        let provider: std::sync::Arc<dyn flows::provider::Provider> =
            std::sync::Arc::new(TransferProvider {
                op,
                transfers: transfers.clone(),
                rights: rights.clone(),
                held: Held::default(),
            });
        for base in TRANSFER_BASES {
            p.add(&format!("{base}/{op}"), provider.clone());
        }
    }
    p
}

/// A definition that passed the check.
#[derive(Debug, Clone, Serialize)]
pub struct Validated {
    /// Always true (a definition that fails is an error).
    pub valid: bool,
    /// How many states it has at its top level.
    pub states: usize,
    /// The action URLs it uses.
    pub action_urls: Vec<String>,
}

/// Reads and checks `definition`, its action URLs against `providers`. The error names the
/// state and the field.
pub fn validate(
    definition: &serde_json::Value,
    providers: &flows::provider::Providers,
) -> Result<Validated, String> {
    let def = flows::definition::Definition::parse(definition).map_err(|e| e.to_string())?;
    def.check_actions(&|u| providers.knows(u))
        .map_err(|e| e.to_string())?;
    Ok(Validated {
        valid: true,
        states: def.states.len(),
        action_urls: def.action_urls().into_iter().collect(),
    })
}

/// A deployed flow by id, id prefix (6 characters or more) or title.
pub fn find_flow<'a>(
    view: &'a crdt_registry::View,
    query: &str,
) -> Result<&'a crdt_registry::Flow, String> {
    if let Some(f) = view.flows.get(query) {
        return Ok(f);
    }
    let matches: Vec<&crdt_registry::Flow> = view
        .flows
        .values()
        .filter(|f| (query.len() >= 6 && f.id.starts_with(query)) || f.record.title == query)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "no deployed flow has id or title `{query}` (`funcmesh flow list` shows them)"
        )),
        many => Err(format!(
            "`{query}` names {} flows: give its id ({})",
            many.len(),
            many.iter()
                .map(|f| f.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether this node may run `flow`: a flow of its own institution, or another institution's
/// flow for which this node holds that institution's `flow.run` grant (`funcmesh cap grant
/// --flow`), valid now and not revoked. The run then acts with this node's own rights.
pub fn may_run(
    view: &crdt_registry::View,
    flow: &crdt_registry::Flow,
    own: &mesh::membership::Member,
    access: &compute::access::Access,
) -> Result<(), String> {
    let owner = view.nodes.get(&flow.owner_peer);
    let theirs = owner.and_then(|n| n.institution.clone());
    let their_key = owner.and_then(|n| n.institution_key);
    let our_key = own.institution_key.map(|k| crdt_registry::Key(k.0));
    if their_key.is_some() && their_key == our_key {
        return Ok(());
    }
    let Some(root) = their_key else {
        return Err(format!(
            "flow {} was deployed by a node the registry does not list with an institution: \
             it cannot be run here",
            flow.id
        ));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let req = capability::Request {
        peer: String::new(),
        institution: root,
        time: now,
        endpoint: flow.id.clone(),
        function: None,
        ability: capability::Ability::FlowRun,
        path: None,
    };
    access
        .token_allowing(&flow.id, &root, req)
        .map(|_| ())
        .map_err(|why| {
            format!(
                "flow {} belongs to institution {}: running it needs that institution's \
                 flow.run grant (`funcmesh cap grant --flow {} --to institution:YOURS`, then \
                 `funcmesh cap add`): {why}",
                flow.id,
                theirs.as_deref().unwrap_or("(unknown)"),
                flow.id
            )
        })
}

/// An action waiting for a right its node does not hold: INACTIVE, with what was refused and
/// what to do (the run resumes after `funcmesh cap add` and `funcmesh flow resume`).
fn needs_right(request: &flows::provider::Request, why: &str) -> flows::provider::Action {
    let mut action = flows::provider::Action::done(
        request,
        true,
        serde_json::json!({
            "code": "AuthorizationRequired",
            "description": format!(
                "{why} — add a grant that covers it (`funcmesh cap add TOKEN`), then resume the \
                 run (`funcmesh flow resume RUN`)"
            ),
        }),
    );
    action.status = flows::provider::Status::Inactive;
    action.display_status = Some("INACTIVE".into());
    action.completion_time = None;
    action
}

/// Whether a refusal is about rights (a missing or refused capability), which a grant fixes.
fn about_rights(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("access denied") || m.contains("capabilit") || m.contains("forbidden")
}

/// The URLs of Globus' compute action provider (all versions); funcmesh's compute provider
/// answers under each.
pub const COMPUTE_URLS: &[&str] = &[
    "https://compute.actions.globus.org",
    "https://compute.actions.globus.org/fxap",
    "https://compute.actions.globus.org/v3",
    "https://automate.funcx.org",
];

/// The actions a provider started and still follows (by action id: its request and what it
/// started, task or job ids), and how often each was resumed: a resumed action starts again
/// under new ids, its refused ones kept as they ended. In memory: after a restart the engine
/// asks again under the same request id and the provider finds what it started by that id.
#[derive(Debug)]
struct Held<T> {
    actions: std::sync::Mutex<std::collections::HashMap<String, (flows::provider::Request, T)>>,
    resumed: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            actions: Default::default(),
            resumed: Default::default(),
        }
    }
}

impl<T: Clone> Held<T> {
    fn hold(&self, request: &flows::provider::Request, started: T) {
        lock(&self.actions).insert(request.request_id.clone(), (request.clone(), started));
    }

    fn get(&self, action_id: &str) -> Option<(flows::provider::Request, T)> {
        lock(&self.actions).get(action_id).cloned()
    }

    fn forget(&self, action_id: &str) {
        lock(&self.actions).remove(action_id);
    }

    /// Counts a resume of `action_id`.
    fn resume(&self, action_id: &str) {
        *lock(&self.resumed)
            .entry(action_id.to_string())
            .or_default() += 1;
    }

    /// How often `request_id` was resumed (0: never).
    fn generation(&self, request_id: &str) -> u32 {
        lock(&self.resumed).get(request_id).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

    fn known(&self, action_id: &str) -> Option<(flows::provider::Request, Vec<compute::TaskId>)> {
        self.held.get(action_id)
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
        let known = self.known(action_id);
        let id = action_id.to_string();
        Box::pin(async move {
            match known {
                Some((request, ids)) => self.answer(&request, &ids).await,
                None => Err(flows::provider::Refusal::not_found(format!(
                    "no compute action {id} on this node"
                ))),
            }
        })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.known(action_id);
        let id = action_id.to_string();
        Box::pin(async move {
            let Some((request, ids)) = known else {
                return Err(flows::provider::Refusal::not_found(format!(
                    "no compute action {id} on this node"
                )));
            };
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
            .known(action_id)
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

/// The hosts Globus' transfer action providers were and are at; funcmesh's transfer provider
/// answers `…/transfer`, `…/ls`, `…/stat`, `…/mkdir` and `…/delete` under each.
pub const TRANSFER_BASES: &[&str] = &[
    "https://transfer.actions.globus.org",
    "https://actions.globus.org/transfer",
    "https://actions.automate.globus.org/transfer",
];

/// The operations of the transfer provider.
pub const TRANSFER_OPS: &[&str] = &[
    "transfer",
    "ls",
    "stat",
    "mkdir",
    "delete",
    "collection_info",
    "manage_permission",
];

/// A Globus path (`/~/data/x`, `/data/x`) as a path in an endpoint's data root (`data/x`): a
/// data root is the whole of what a funcmesh endpoint exposes, its home and its root at once.
pub fn root_path(globus: &str) -> String {
    let p = globus.strip_prefix("/~").unwrap_or(globus);
    p.trim_start_matches('/').to_string()
}

/// Moves and inspects data on endpoints' data roots for a flow's `Action` state, in the
/// Globus transfer action providers' shapes (endpoints named as `funcmesh transfer` names
/// them). A transfer is one durable copy job per `DATA` item, run by the destination's node,
/// idempotent by the action's request id; `ls`, `stat`, `mkdir` and `delete` answer at once.
pub struct TransferProvider {
    op: &'static str,
    transfers: std::sync::Arc<crate::transfers::Transfers>,
    rights: crate::run_rights::Rights,
    held: Held<Vec<String>>,
}

fn refusal((status, message): crate::transfers::Failure) -> flows::provider::Refusal {
    flows::provider::Refusal {
        code: match status.as_u16() {
            400 => "BadActionRequest",
            403 => "UnauthorizedRequest",
            404 => "ActionNotFound",
            _ => "ActionProviderError",
        }
        .into(),
        description: message,
    }
}

impl TransferProvider {
    /// For a run started by another institution's node: its starter and the registry, to
    /// judge each place the action touches as the starter's (none for this node's own runs).
    async fn foreign(
        &self,
        request: &flows::provider::Request,
    ) -> Result<Option<(crate::run_rights::Starter, crdt_registry::View)>, flows::provider::Refusal>
    {
        use flows::provider::Refusal;
        let Some(starter) = self
            .rights
            .starters
            .of_user(&request.user)
            .await
            .map_err(Refusal::provider)?
        else {
            return Ok(None);
        };
        if self.op == "manage_permission" {
            return Err(Refusal {
                code: "UnauthorizedRequest".into(),
                description: format!(
                    "access denied: a run started by {}'s node does not manage shares",
                    starter
                        .institution
                        .as_deref()
                        .unwrap_or("another institution")
                ),
            });
        }
        let view = self.transfers.registry().await.map_err(Refusal::provider)?;
        Ok(Some((starter, view)))
    }

    /// What a run started elsewhere lends for touching `endpoint`:`path` (`want`): its
    /// starter's delegated token (or none where the policy admits both institutions); `None`
    /// for this node's own runs, which act with the node's tokens.
    fn lend(
        &self,
        foreign: Option<&(crate::run_rights::Starter, crdt_registry::View)>,
        endpoint: &str,
        path: &str,
        want: transfer::files::Want,
    ) -> Result<Option<crate::transfers::Lent>, flows::provider::Refusal> {
        let Some((starter, view)) = foreign else {
            return Ok(None);
        };
        let token = self
            .rights
            .transfer_token(starter, view, endpoint, &root_path(path), want)
            .map_err(|why| flows::provider::Refusal {
                code: "UnauthorizedRequest".into(),
                description: why,
            })?;
        Ok(Some(match want {
            transfer::files::Want::Read => crate::transfers::Lent {
                read: token,
                write: None,
            },
            transfer::files::Want::Write => crate::transfers::Lent {
                read: None,
                write: token,
            },
        }))
    }

    fn field<'a>(body: &'a serde_json::Value, names: &[&str]) -> Option<&'a str> {
        names
            .iter()
            .find_map(|n| body.get(*n).and_then(|v| v.as_str()))
    }

    fn place(endpoint: &str, path: &str) -> String {
        format!("{endpoint}:{}", root_path(path))
    }

    fn entry(e: &transfer::root::Entry) -> serde_json::Value {
        let name = e.path.rsplit('/').next().unwrap_or(&e.path).to_string();
        let kind = match e.kind {
            transfer::root::Kind::File => "file",
            transfer::root::Kind::Dir => "dir",
            transfer::root::Kind::Symlink => "invalid_symlink",
            transfer::root::Kind::Other => "other",
        };
        serde_json::json!({
            "DATA_TYPE": "file",
            "name": name,
            "type": kind,
            "size": e.size,
            "permissions": format!("{:04o}", e.mode),
            "last_modified": flows::time::format_rfc3339(e.mtime_ns / 1_000_000),
        })
    }

    async fn once(
        &self,
        request: &flows::provider::Request,
    ) -> Result<serde_json::Value, flows::provider::Refusal> {
        use flows::provider::Refusal;
        use transfer::files::Want;
        let body = &request.body;
        let endpoint = TransferProvider::field(body, &["endpoint_id", "endpoint"])
            .ok_or_else(|| Refusal::bad("name the endpoint (`endpoint_id`)"))?;
        let foreign = self.foreign(request).await?;
        let foreign = foreign.as_ref();
        match self.op {
            "ls" | "stat" => {
                let path = TransferProvider::field(body, &["path"]).unwrap_or("/");
                let place = TransferProvider::place(endpoint, path);
                let lent = self.lend(foreign, endpoint, path, Want::Read)?;
                if self.op == "stat" {
                    return match self.transfers.stat_as(&place, lent.as_ref()).await {
                        Ok(e) => Ok(TransferProvider::entry(&e)),
                        // A missing path is an answer, as Globus' stat gives it.
                        Err((_, m)) if m.contains("does not exist") => Ok(serde_json::json!({
                            "code": "NotFound",
                            "message": m,
                        })),
                        Err(f) => Err(refusal(f)),
                    };
                }
                let entries = self
                    .transfers
                    .ls_as(&place, lent.as_ref())
                    .await
                    .map_err(refusal)?;
                let offset = body.get("offset").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                let limit = body
                    .get("limit")
                    .and_then(|v| v.as_u64())
                    .map_or(usize::MAX, |l| l as usize);
                let data: Vec<serde_json::Value> = entries
                    .iter()
                    .skip(offset)
                    .take(limit)
                    .map(TransferProvider::entry)
                    .collect();
                Ok(serde_json::json!({
                    "DATA_TYPE": "file_list",
                    "DATA": data,
                    "endpoint": endpoint,
                    "path": path,
                    "offset": offset,
                    "length": data.len(),
                    "total": entries.len(),
                }))
            }
            "mkdir" => {
                let path = TransferProvider::field(body, &["path"])
                    .ok_or_else(|| Refusal::bad("name the directory to make (`path`)"))?;
                let op = crate::transfers::PathOp {
                    path: TransferProvider::place(endpoint, path),
                    recursive: false,
                };
                let lent = self.lend(foreign, endpoint, path, Want::Write)?;
                self.transfers
                    .mkdir_as(&op, lent.as_ref())
                    .await
                    .map_err(refusal)?;
                Ok(serde_json::json!({
                    "DATA_TYPE": "mkdir_result",
                    "code": "DirectoryCreated",
                    "message": "The directory was created successfully",
                }))
            }
            "delete" => {
                let recursive = body
                    .get("recursive")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                let ignore_missing = body
                    .get("ignore_missing")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                let paths: Vec<String> = match (body.get("DATA"), body.get("items")) {
                    (Some(serde_json::Value::Array(items)), _) => items
                        .iter()
                        .filter_map(|i| i.get("path").and_then(|p| p.as_str()).map(str::to_string))
                        .collect(),
                    (_, Some(serde_json::Value::Array(items))) => items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_string))
                        .collect(),
                    _ => {
                        return Err(Refusal::bad(
                            "list what to delete (`DATA`: [{\"path\": ...}])",
                        ));
                    }
                };
                let mut deleted = 0;
                for p in &paths {
                    let op = crate::transfers::PathOp {
                        path: TransferProvider::place(endpoint, p),
                        recursive,
                    };
                    let lent = self.lend(foreign, endpoint, p, Want::Write)?;
                    match self.transfers.rm_as(&op, lent.as_ref()).await {
                        Ok(()) => deleted += 1,
                        Err((_, m)) if ignore_missing && m.contains("does not exist") => {}
                        Err(f) => return Err(refusal(f)),
                    }
                }
                Ok(serde_json::json!({
                    "DATA_TYPE": "task", "type": "DELETE", "status": "SUCCEEDED",
                    "files": paths.len(), "deleted": deleted,
                }))
            }
            "collection_info" => self
                .transfers
                .collection_info(endpoint)
                .await
                .map_err(refusal),
            "manage_permission" => self.manage_permission(endpoint, body).await,
            _ => Err(Refusal::bad(format!("no operation `{}`", self.op))),
        }
    }

    /// Globus' `manage_permission` (an access rule on a guest collection) as a share of the
    /// endpoint's data root: `CREATE` with `path`, `permissions` (`r` or `rw`), `principal_type`
    /// (`institution` or `node`) and `principal` (a name, key or peer id); `DELETE` with
    /// `rule_id` (or `access_id`).
    async fn manage_permission(
        &self,
        endpoint: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, flows::provider::Refusal> {
        use flows::provider::Refusal;
        let operation = TransferProvider::field(body, &["operation"]).unwrap_or("CREATE");
        match operation {
            "CREATE" => {
                let path = TransferProvider::field(body, &["path"])
                    .ok_or_else(|| Refusal::bad("name the path to share (`path`)"))?;
                let write = match TransferProvider::field(body, &["permissions"]).unwrap_or("r") {
                    "r" => false,
                    "rw" => true,
                    other => {
                        return Err(Refusal::bad(format!(
                            "`permissions` is `r` or `rw`, not {other:?}"
                        )));
                    }
                };
                let principal = TransferProvider::field(body, &["principal"])
                    .ok_or_else(|| Refusal::bad("name whom to share with (`principal`)"))?;
                let to = match TransferProvider::field(body, &["principal_type"]) {
                    _ if principal.starts_with("institution:")
                        || principal.starts_with("node:") =>
                    {
                        principal.to_string()
                    }
                    Some("institution") => format!("institution:{principal}"),
                    Some("node") => format!("node:{principal}"),
                    other => {
                        return Err(Refusal::bad(format!(
                            "`principal_type` {other:?}: funcmesh shares with institutions and \
                             nodes (`institution` or `node`), not Globus identities or groups"
                        )));
                    }
                };
                let share = self
                    .transfers
                    .share(&crate::transfers::NewShare {
                        path: TransferProvider::place(endpoint, path),
                        to,
                        write,
                    })
                    .await
                    .map_err(refusal)?;
                Ok(serde_json::json!({
                    "DATA_TYPE": "access_create_result",
                    "code": "Created",
                    "message": "Access rule created successfully.",
                    "access_id": share["id"],
                    "rule": share,
                }))
            }
            "DELETE" => {
                let id = TransferProvider::field(body, &["rule_id", "access_id"])
                    .ok_or_else(|| Refusal::bad("name the rule to delete (`rule_id`)"))?;
                let share = self
                    .transfers
                    .shares(
                        endpoint,
                        transfer::wire::ShareChange::Remove { id: id.to_string() },
                    )
                    .await
                    .map_err(refusal)?;
                Ok(serde_json::json!({
                    "DATA_TYPE": "result",
                    "code": "Deleted",
                    "message": "Access rule deleted successfully.",
                    "rule": share,
                }))
            }
            other => Err(Refusal::bad(format!(
                "`operation` is CREATE or DELETE, not {other:?}"
            ))),
        }
    }

    /// The copy jobs of a transfer action's body, submitted under ids derived from the
    /// request's (submitting again is harmless: the same id is the same job).
    async fn submit(
        &self,
        request: &flows::provider::Request,
    ) -> Result<Vec<String>, flows::provider::Refusal> {
        use flows::provider::Refusal;
        let body = &request.body;
        let src = TransferProvider::field(body, &["source_endpoint", "source_endpoint_id"])
            .ok_or_else(|| Refusal::bad("name the source endpoint (`source_endpoint`)"))?;
        let dst =
            TransferProvider::field(body, &["destination_endpoint", "destination_endpoint_id"])
                .ok_or_else(|| {
                    Refusal::bad("name the destination endpoint (`destination_endpoint`)")
                })?;
        let items = match body.get("DATA").or_else(|| body.get("transfer_items")) {
            Some(serde_json::Value::Array(items)) if !items.is_empty() => items.clone(),
            _ => {
                return Err(Refusal::bad(
                    "list what to move (`DATA`: [{\"source_path\", \"destination_path\"}])",
                ));
            }
        };
        let sync = match body.get("sync_level") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(
                ["exists", "size", "mtime", "checksum"]
                    .get(n.as_u64().unwrap_or(9) as usize)
                    .ok_or_else(|| Refusal::bad("`sync_level` is 0 to 3"))?
                    .to_string(),
            ),
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(Refusal::bad(
                    "`sync_level` is 0 to 3 or exists|size|mtime|checksum",
                ));
            }
        };
        let delete = body
            .get("delete_destination_extra")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let generation = self.held.generation(&request.request_id);
        let foreign = self.foreign(request).await?;
        let mut ids = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let from = item
                .get("source_path")
                .and_then(|v| v.as_str())
                .ok_or_else(|| Refusal::bad(format!("DATA[{i}] has no `source_path`")))?;
            let to = item
                .get("destination_path")
                .and_then(|v| v.as_str())
                .ok_or_else(|| Refusal::bad(format!("DATA[{i}] has no `destination_path`")))?;
            let source = TransferProvider::place(src, from);
            let read = self.lend(foreign.as_ref(), src, from, transfer::files::Want::Read)?;
            let write = self.lend(foreign.as_ref(), dst, to, transfer::files::Want::Write)?;
            let lent = read.zip(write).map(|(r, w)| crate::transfers::Lent {
                read: r.read,
                write: w.write,
            });
            let recursive = match item.get("recursive").and_then(|v| v.as_bool()) {
                Some(r) => r,
                // Not said: as the source is (Globus works it out too).
                None => {
                    self.transfers
                        .stat_as(&source, lent.as_ref())
                        .await
                        .map_err(refusal)?
                        .kind
                        == transfer::root::Kind::Dir
                }
            };
            let id = match generation {
                0 => format!("{}.{i}", request.request_id),
                g => format!("{}.{i}.r{g}", request.request_id),
            };
            self.transfers
                .copy_as(
                    crate::transfers::NewTransfer {
                        request_id: Some(id.clone()),
                        source,
                        destination: TransferProvider::place(dst, to),
                        recursive,
                        sync: sync.clone(),
                        delete,
                    },
                    lent.as_ref(),
                )
                .await
                .map_err(refusal)?;
            ids.push(id);
        }
        Ok(ids)
    }

    async fn jobs(
        &self,
        request: &flows::provider::Request,
        ids: &[String],
    ) -> Result<flows::provider::Action, flows::provider::Refusal> {
        use flows::provider::{Action, Status};
        let mut jobs = Vec::new();
        for id in ids {
            jobs.push(self.transfers.status(id, false).await.map_err(refusal)?);
        }
        let active = jobs
            .iter()
            .any(|j| j.state == transfer::copy::State::Active);
        if !active {
            if let Some(why) = jobs
                .iter()
                .filter(|j| j.state == transfer::copy::State::Failed)
                .filter_map(|j| j.error.as_deref())
                .find(|e| about_rights(e))
            {
                return Ok(needs_right(request, why));
            }
        }
        let failed = jobs.iter().find(|j| {
            matches!(
                j.state,
                transfer::copy::State::Failed | transfer::copy::State::Cancelled
            )
        });
        let sum = |f: fn(&transfer::copy::Progress) -> u64| {
            jobs.iter().map(|j| f(&j.progress)).sum::<u64>()
        };
        let status = if active {
            "ACTIVE"
        } else if failed.is_some() {
            "FAILED"
        } else {
            "SUCCEEDED"
        };
        let details = serde_json::json!({
            "DATA_TYPE": "task",
            "type": "TRANSFER",
            "task_id": request.request_id,
            "status": status,
            "label": request.label,
            "source_endpoint_id": TransferProvider::field(&request.body, &["source_endpoint", "source_endpoint_id"]),
            "destination_endpoint_id": TransferProvider::field(&request.body, &["destination_endpoint", "destination_endpoint_id"]),
            "files": sum(|p| p.files_total),
            "files_transferred": sum(|p| p.files_done),
            "files_skipped": sum(|p| p.files_skipped),
            "bytes_transferred": sum(|p| p.bytes_done),
            "faults": jobs.iter().map(|j| j.errors.len()).sum::<usize>(),
            "fatal_error": failed.map(|j| serde_json::json!({
                "code": "TransferFailed",
                "description": j.error.clone().unwrap_or_else(|| format!("{:?}", j.state)),
            })),
            "jobs": jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        });
        let mut action = Action::done(request, failed.is_none(), details);
        if active {
            action.status = Status::Active;
            action.display_status = Some("ACTIVE".into());
            action.completion_time = None;
        }
        Ok(action)
    }

    fn known(&self, action_id: &str) -> Option<(flows::provider::Request, Vec<String>)> {
        self.held.get(action_id)
    }
}

impl flows::provider::Provider for TransferProvider {
    fn run(
        &self,
        request: flows::provider::Request,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        Box::pin(async move {
            if self.op != "transfer" {
                return Ok(match self.once(&request).await {
                    Ok(details) => flows::provider::Action::done(&request, true, details),
                    Err(r) if r.code == "UnauthorizedRequest" => {
                        needs_right(&request, &r.description)
                    }
                    Err(r) if r.code == "BadActionRequest" => return Err(r),
                    Err(r) => flows::provider::Action::done(
                        &request,
                        false,
                        serde_json::json!({"code": r.code, "description": r.description}),
                    ),
                });
            }
            let ids = match self.submit(&request).await {
                Ok(ids) => ids,
                Err(r) if r.code == "UnauthorizedRequest" => {
                    return Ok(needs_right(&request, &r.description));
                }
                Err(r) => return Err(r),
            };
            self.held.hold(&request, ids.clone());
            self.jobs(&request, &ids).await
        })
    }

    fn status(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.known(action_id);
        let id = action_id.to_string();
        Box::pin(async move {
            match known {
                Some((request, ids)) => self.jobs(&request, &ids).await,
                None => Err(flows::provider::Refusal::not_found(format!(
                    "no transfer action {id} on this node"
                ))),
            }
        })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.known(action_id);
        let id = action_id.to_string();
        Box::pin(async move {
            let Some((request, ids)) = known else {
                return Err(flows::provider::Refusal::not_found(format!(
                    "no transfer action {id} on this node"
                )));
            };
            for j in &ids {
                let _ = self.transfers.status(j, true).await;
            }
            self.jobs(&request, &ids).await
        })
    }

    fn resume(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        // The next ask submits the action's copy jobs again, under new ids.
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
        _action_id: &str,
        at_most: std::time::Duration,
    ) -> flows::provider::BoxFuture<'_, ()> {
        // Copy jobs have no completion hook here: look again soon.
        Box::pin(tokio::time::sleep(
            at_most.min(std::time::Duration::from_millis(100)),
        ))
    }
}

/// Where a deployed flow is an action provider: `<FLOWS_URL><flow id or title>`, Globus Flows'
/// own address for a flow's runs, so that a flow can be an `Action` of another.
pub const FLOWS_URL: &str = "https://flows.globus.org/flows/";

/// Runs deployed flows as actions of other flows: the action is a run of its own on this node
/// (its id the action's request id, so asking again re-attaches), its output the action's
/// `details`.
pub struct FlowProvider {
    mesh: mesh::Handle,
    own: mesh::membership::Member,
    access: std::sync::Arc<compute::access::Access>,
    engine: std::sync::Arc<std::sync::OnceLock<flows::engine::WeakEngine>>,
}

impl FlowProvider {
    /// The engine (set right after it opens: runs it resumes at once may ask a moment
    /// before).
    fn engine(&self) -> Result<flows::engine::Engine, flows::provider::Refusal> {
        for _ in 0..500 {
            if let Some(weak) = self.engine.get() {
                return weak
                    .upgrade()
                    .ok_or_else(|| flows::provider::Refusal::provider("the node is stopping"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(flows::provider::Refusal::provider(
            "the flow engine did not start",
        ))
    }

    fn answer(
        request: &flows::provider::Request,
        run: &flows::engine::Run,
    ) -> flows::provider::Action {
        use flows::engine::RunStatus;
        use flows::provider::{Action, Status};
        let ok = run.status == RunStatus::Succeeded;
        let details = if ok {
            run.details["output"].clone()
        } else {
            run.details.clone()
        };
        let mut action = Action::done(request, ok, details);
        action.action_id = run.run_id.clone();
        match run.status {
            RunStatus::Active => action.status = Status::Active,
            RunStatus::Inactive => action.status = Status::Inactive,
            _ => {}
        }
        if !action.status.is_final() {
            action.display_status = Some(format!("{:?}", run.status).to_uppercase());
            action.completion_time = None;
        }
        action
    }

    fn get(&self, action_id: &str) -> Result<flows::provider::Action, flows::provider::Refusal> {
        let engine = self.engine()?;
        let run = engine
            .get(action_id)
            .map_err(flows::provider::Refusal::provider)?
            .ok_or_else(|| {
                flows::provider::Refusal::not_found(format!("no run {action_id} on this node"))
            })?;
        let request = flows::provider::Request {
            request_id: run.run_id.clone(),
            body: serde_json::Value::Null,
            label: run.label.clone(),
            user: run.user.clone(),
            run_as: None,
            run_id: run.run_id.clone(),
            url: String::new(),
            at_ms: 0,
        };
        Ok(FlowProvider::answer(&request, &run))
    }
}

impl flows::provider::Provider for FlowProvider {
    fn run(
        &self,
        request: flows::provider::Request,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        Box::pin(async move {
            use flows::provider::Refusal;
            let engine = self.engine()?;
            let query = request
                .url
                .strip_prefix(FLOWS_URL)
                .map(|q| q.trim_end_matches('/').trim_end_matches("/run"))
                .unwrap_or_default()
                .to_string();
            let view = self
                .mesh
                .registry()
                .await
                .map_err(|e| Refusal::provider(e.to_string()))?;
            let flow = find_flow(&view, &query).map_err(Refusal::bad)?;
            may_run(&view, flow, &self.own, &self.access).map_err(|e| Refusal {
                code: "UnauthorizedRequest".into(),
                description: e,
            })?;
            flows::schema::check_input(&flow.record.input_schema, &request.body)
                .map_err(Refusal::bad)?;
            let (definition, flow_id) = (flow.record.definition.clone(), flow.id.clone());
            let run = tokio::task::spawn_blocking(move || {
                engine
                    .start(
                        &request.request_id,
                        &flow_id,
                        &definition,
                        request.body.clone(),
                        &request.user,
                        request.label.clone(),
                    )
                    .map(|run| (request, run))
            })
            .await
            .map_err(|e| Refusal::provider(e.to_string()))?
            .map_err(Refusal::bad);
            let (request, run) = run?;
            Ok(FlowProvider::answer(&request, &run))
        })
    }

    fn status(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let answer = self.get(action_id);
        Box::pin(async move { answer })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        if let Ok(engine) = self.engine() {
            let _ = engine.cancel(action_id);
        }
        let answer = self.get(action_id);
        Box::pin(async move { answer })
    }

    fn resume(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        if let Ok(engine) = self.engine() {
            let _ = engine.resume(action_id);
        }
        let answer = self.get(action_id);
        Box::pin(async move { answer })
    }

    fn log(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<Vec<serde_json::Value>, flows::provider::Refusal>>
    {
        let id = action_id.to_string();
        Box::pin(async move {
            let engine = self.engine()?;
            if engine
                .get(&id)
                .map_err(flows::provider::Refusal::provider)?
                .is_none()
            {
                return Err(flows::provider::Refusal::not_found(format!(
                    "no run {id} on this node"
                )));
            }
            let events = engine
                .log(&id)
                .map_err(flows::provider::Refusal::provider)?;
            Ok(events
                .iter()
                .map(|e| serde_json::to_value(e).unwrap_or_default())
                .collect())
        })
    }

    fn changed(
        &self,
        action_id: &str,
        at_most: std::time::Duration,
    ) -> flows::provider::BoxFuture<'_, ()> {
        let engine = self
            .engine
            .get()
            .and_then(flows::engine::WeakEngine::upgrade);
        let id = action_id.to_string();
        Box::pin(async move {
            match engine {
                Some(e) => {
                    let _ = e.wait(&id, at_most).await;
                }
                None => tokio::time::sleep(at_most).await,
            }
        })
    }
}

/// An external action provider, over HTTP: the Globus action-provider API (`POST /run`, `GET
/// /{id}/status`, `POST /{id}/cancel|release|resume`), at a URL the node's configuration lists
/// (`[flows] action_providers`, with a bearer token from `action_provider_token_files`). Another
/// funcmesh node's deployed flows are such providers (`node::api::actions`).
pub struct HttpProvider {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …`, when configured.
    token: Option<String>,
}

impl HttpProvider {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<flows::provider::Action, flows::provider::Refusal> {
        use flows::provider::Refusal;
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Refusal {
            code: "Unreachable".into(),
            description: format!("{url}: {e}"),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| Refusal {
            code: "Unreachable".into(),
            description: format!("{url}: {e}"),
        })?;
        if !status.is_success() {
            // The API's error body: {"code", "description"}.
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            return Err(Refusal {
                code: v["code"]
                    .as_str()
                    .unwrap_or("ActionProviderError")
                    .to_string(),
                description: format!(
                    "{url} answered {status}: {}",
                    v["description"]
                        .as_str()
                        .unwrap_or(text.chars().take(300).collect::<String>().as_str())
                ),
            });
        }
        serde_json::from_str(&text).map_err(|e| {
            Refusal::provider(format!("{url} answered what is not an action status: {e}"))
        })
    }
}

impl flows::provider::Provider for HttpProvider {
    fn run(
        &self,
        request: flows::provider::Request,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        Box::pin(async move {
            if crate::run_rights::foreign_run(&request.user).is_some() {
                return Err(flows::provider::Refusal {
                    code: "UnauthorizedRequest".into(),
                    description: "an external provider is called with this node's credentials: \
                                  not for a run started by another institution's node"
                        .into(),
                });
            }
            let mut body = serde_json::json!({
                "request_id": request.request_id,
                "body": request.body,
            });
            if let Some(l) = &request.label {
                body["label"] = l.clone().into();
            }
            self.call(reqwest::Method::POST, "/run", Some(body)).await
        })
    }

    fn status(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let path = format!("/{action_id}/status");
        Box::pin(async move { self.call(reqwest::Method::GET, &path, None).await })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let path = format!("/{action_id}/cancel");
        Box::pin(async move { self.call(reqwest::Method::POST, &path, None).await })
    }

    fn release(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<(), flows::provider::Refusal>> {
        let path = format!("/{action_id}/release");
        Box::pin(async move {
            self.call(reqwest::Method::POST, &path, None)
                .await
                .map(|_| ())
        })
    }

    fn log(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<Vec<serde_json::Value>, flows::provider::Refusal>>
    {
        let url = format!("{}/{action_id}/log", self.base);
        Box::pin(async move {
            use flows::provider::Refusal;
            let mut req = self.http.get(&url);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.map_err(|e| Refusal {
                code: "Unreachable".into(),
                description: format!("{url}: {e}"),
            })?;
            if !resp.status().is_success() {
                return Err(Refusal::provider(format!(
                    "{url} answered {}",
                    resp.status()
                )));
            }
            let v: serde_json::Value = resp
                .json()
                .await
                .map_err(|e| Refusal::provider(format!("{url}: {e}")))?;
            // Globus answers {"entries": [...], ...}.
            match v.get("entries") {
                Some(serde_json::Value::Array(entries)) => Ok(entries.clone()),
                _ => Err(Refusal::provider(format!(
                    "{url} answered no `entries` list"
                ))),
            }
        })
    }

    fn resume(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let path = format!("/{action_id}/resume");
        Box::pin(async move { self.call(reqwest::Method::POST, &path, None).await })
    }
}
