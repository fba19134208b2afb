//! Deployed flows as action providers over HTTP: the Globus action-provider API under
//! `/v1/actions/flows/{flow}` (`GET` the description, `POST /run`, `GET /{action}/status`,
//! `GET /{action}/log`, `POST /{action}/cancel|release|resume`). An action is a run on this
//! node whose id is the caller's `request_id` (so asking again answers the same run); another
//! flow, here or on a node that lists this URL in its `[flows] action_providers`, can use it as
//! an `Action` state. Callers hold the node's API token, as for every other call; running
//! another institution's flow needs its `flow.run` grant, as `/v1/runs` does.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{Body, Shared};

/// An error as the action-provider API answers it: `code` and `description` (and `error`, as
/// the rest of this API answers).
pub(super) struct ApError(StatusCode, flows::provider::Refusal);

impl IntoResponse for ApError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(serde_json::json!({
                "code": self.1.code,
                "description": self.1.description,
                "error": self.1.to_string(),
            })),
        )
            .into_response()
    }
}

impl From<flows::provider::Refusal> for ApError {
    fn from(r: flows::provider::Refusal) -> ApError {
        let status = match r.code.as_str() {
            "BadActionRequest" => StatusCode::BAD_REQUEST,
            "ActionNotFound" => StatusCode::NOT_FOUND,
            "UnauthorizedRequest" | "AuthorizationRequired" => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApError(status, r)
    }
}

/// What `POST …/run` takes (Globus' run request; the fields this provider has no use for —
/// `monitor_by`, `manage_by`, `release_after`, `tags`, `deadline` — are accepted and ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
// The fields after `label` are read so that Globus clients' requests parse, and not used.
#[allow(dead_code)]
pub(super) struct RunRequest {
    request_id: String,
    body: serde_json::Value,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    monitor_by: Option<Vec<String>>,
    #[serde(default)]
    manage_by: Option<Vec<String>>,
    #[serde(default)]
    release_after: Option<serde_json::Value>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    deadline: Option<String>,
}

/// The deployed flow `query` (id, id prefix or title) and its provider.
async fn provider(
    inner: &Shared,
    query: &str,
) -> Result<
    (
        crdt_registry::Flow,
        std::sync::Arc<dyn flows::provider::Provider>,
    ),
    ApError,
> {
    let view = inner.mesh.registry().await.map_err(|e| {
        ApError(
            StatusCode::SERVICE_UNAVAILABLE,
            flows::provider::Refusal::provider(e.to_string()),
        )
    })?;
    let flow = crate::runs::find_flow(&view, query)
        .map_err(flows::provider::Refusal::not_found)?
        .clone();
    let url = format!("{}{}", crate::runs::FLOWS_URL, flow.id);
    let provider = inner.runs.providers().get(&url).ok_or_else(|| {
        flows::provider::Refusal::provider("this node's flow provider is not running")
    })?;
    Ok((flow, provider))
}

/// `GET /v1/actions/flows/{flow}`: the provider's description.
pub(super) async fn describe(
    State(inner): State<Shared>,
    Path(query): Path<String>,
) -> Result<Json<serde_json::Value>, ApError> {
    let (flow, _) = provider(&inner, &query).await?;
    let schema = if flow.record.input_schema.is_null() {
        serde_json::json!({"type": "object"})
    } else {
        flow.record.input_schema.clone()
    };
    Ok(Json(serde_json::json!({
        "api_version": "1.0",
        "title": flow.record.title,
        "subtitle": format!("funcmesh flow {}", flow.id),
        "description": flow.record.description,
        "synchronous": false,
        "log_supported": true,
        "types": ["Action"],
        "input_schema": schema,
        "keywords": ["funcmesh", "flow"],
    })))
}

/// `POST /v1/actions/flows/{flow}/run`.
pub(super) async fn run(
    State(inner): State<Shared>,
    Path(query): Path<String>,
    Body(req): Body<RunRequest>,
) -> Result<(StatusCode, Json<flows::provider::Action>), ApError> {
    let RunRequest {
        request_id,
        body,
        label,
        ..
    } = req;
    if request_id.is_empty() || request_id.len() > 128 {
        return Err(flows::provider::Refusal::bad("request_id has 1 to 128 characters").into());
    }
    let (flow, provider) = provider(&inner, &query).await?;
    let request = flows::provider::Request {
        request_id,
        body,
        label,
        user: format!("urn:funcmesh:node:{}", inner.name),
        run_as: None,
        run_id: String::new(),
        url: format!("{}{}", crate::runs::FLOWS_URL, flow.id),
        at_ms: flows::time::now_ms(),
    };
    let action = provider.run(request).await?;
    Ok((StatusCode::CREATED, Json(action)))
}

/// The run `action` of flow `query`, through its provider (404 when the run is of another flow).
async fn of_flow(
    inner: &Shared,
    query: &str,
    action: &str,
) -> Result<std::sync::Arc<dyn flows::provider::Provider>, ApError> {
    let (flow, provider) = provider(inner, query).await?;
    match inner.runs.get(action) {
        Ok(Some(run)) if run.flow_id == flow.id => Ok(provider),
        Ok(_) => Err(flows::provider::Refusal::not_found(format!(
            "flow {} has no action {action} on this node",
            flow.id
        ))
        .into()),
        Err(e) => Err(flows::provider::Refusal::provider(e).into()),
    }
}

/// `GET /v1/actions/flows/{flow}/{action}/status`.
pub(super) async fn status(
    State(inner): State<Shared>,
    Path((query, action)): Path<(String, String)>,
) -> Result<Json<flows::provider::Action>, ApError> {
    let p = of_flow(&inner, &query, &action).await?;
    Ok(Json(p.status(&action).await?))
}

/// `POST /v1/actions/flows/{flow}/{action}/cancel`.
pub(super) async fn cancel(
    State(inner): State<Shared>,
    Path((query, action)): Path<(String, String)>,
) -> Result<Json<flows::provider::Action>, ApError> {
    let p = of_flow(&inner, &query, &action).await?;
    Ok(Json(p.cancel(&action).await?))
}

/// `POST /v1/actions/flows/{flow}/{action}/resume`.
pub(super) async fn resume(
    State(inner): State<Shared>,
    Path((query, action)): Path<(String, String)>,
) -> Result<Json<flows::provider::Action>, ApError> {
    let p = of_flow(&inner, &query, &action).await?;
    Ok(Json(p.resume(&action).await?))
}

/// `POST /v1/actions/flows/{flow}/{action}/release`: releases a finished action (its run stays
/// in the node's history, `funcmesh flow runs`); the status it had is the answer.
pub(super) async fn release(
    State(inner): State<Shared>,
    Path((query, action)): Path<(String, String)>,
) -> Result<Json<flows::provider::Action>, ApError> {
    let p = of_flow(&inner, &query, &action).await?;
    let last = p.status(&action).await?;
    if !last.status.is_final() {
        return Err(ApError(
            StatusCode::CONFLICT,
            flows::provider::Refusal {
                code: "ActionConflict".into(),
                description: format!(
                    "action {action} is still {:?}: cancel it, or wait for it to end, before \
                     releasing it",
                    last.status
                ),
            },
        ));
    }
    p.release(&action).await?;
    Ok(Json(last))
}

/// `GET /v1/actions/flows/{flow}/{action}/log`: the run's events, in Globus' log shape.
pub(super) async fn log(
    State(inner): State<Shared>,
    Path((query, action)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApError> {
    let p = of_flow(&inner, &query, &action).await?;
    let entries = p.log(&action).await?;
    Ok(Json(serde_json::json!({
        "action_id": action,
        "count": entries.len(),
        "has_next_page": false,
        "entries": entries,
    })))
}
