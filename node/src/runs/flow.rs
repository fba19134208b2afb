//! Deployed flows as actions of other flows: each a run of its own on this node.

use super::{find_flow, may_run};

/// Where a deployed flow is an action provider: `<FLOWS_URL><flow id or title>`, Globus Flows'
/// own address for a flow's runs, so that a flow can be an `Action` of another.
pub const FLOWS_URL: &str = "https://flows.globus.org/flows/";

/// Runs deployed flows as actions of other flows: the action is a run of its own on this node
/// (its id the action's request id, so asking again re-attaches), its output the action's
/// `details`.
pub struct FlowProvider {
    pub(super) mesh: mesh::Handle,
    pub(super) own: mesh::membership::Member,
    pub(super) access: std::sync::Arc<compute::access::Access>,
    pub(super) engine: std::sync::Arc<std::sync::OnceLock<flows::engine::WeakEngine>>,
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
