//! Flows and runs: `/v1/flows` (deploy, list, validate) and `/v1/runs` (start here or at
//! another node, status, log, cancel, resume; `?at=NODE` asks the node hosting the run).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiError, Body, Params, Shared, Written, unavailable};

/// `POST /v1/flows/validate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ValidateBody {
    definition: serde_json::Value,
}

pub(super) async fn validate_flow(
    State(inner): State<Shared>,
    Body(body): Body<ValidateBody>,
) -> Result<Json<crate::runs::Validated>, ApiError> {
    crate::runs::validate(&body.definition, inner.runs.providers())
        .map(Json)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

/// `POST /v1/flows`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewFlow {
    definition: serde_json::Value,
    title: String,
    #[serde(default)]
    input_schema: Option<serde_json::Value>,
    #[serde(default)]
    description: Option<String>,
}

pub(super) async fn deploy_flow(
    State(inner): State<Shared>,
    Body(body): Body<NewFlow>,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let bad = |e: String| ApiError(StatusCode::BAD_REQUEST, e);
    if body.title.is_empty() || body.title.len() > 128 {
        return Err(bad("a flow's title has 1 to 128 characters".into()));
    }
    crate::runs::validate(&body.definition, inner.runs.providers()).map_err(bad)?;
    let input_schema = body.input_schema.unwrap_or(serde_json::Value::Null);
    flows::schema::check_schema(&input_schema).map_err(bad)?;
    let record = crdt_registry::record::FlowRecord {
        title: body.title,
        owner: inner.key,
        definition: body.definition,
        input_schema,
        description: body.description.unwrap_or_default(),
        nonce: hex::encode(rand::random::<[u8; 12]>()),
    };
    let id = crdt_registry::record::FlowRecord::id_for(&inner.key, &record.nonce);
    inner
        .mesh
        .registry_write(id.clone(), crdt_registry::record::Body::Flow(record))
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(Written { id, created: true })))
}

pub(super) async fn flows_list(
    State(inner): State<Shared>,
) -> Result<Json<Vec<crdt_registry::Flow>>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    Ok(Json(view.flows.values().cloned().collect()))
}

pub(super) async fn flow(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crdt_registry::Flow>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    crate::runs::find_flow(&view, &id)
        .cloned()
        .map(Json)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e))
}

/// `POST /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewRun {
    #[serde(default)]
    definition: Option<serde_json::Value>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    flow_id: Option<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    monitors: Vec<String>,
    #[serde(default)]
    managers: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
}

/// Principals named by name or key (`institution:NAME`, `node:NAME`) as runs record them.
async fn principals(inner: &Shared, list: Vec<String>) -> Result<Vec<String>, ApiError> {
    if list.len() > crate::run_rights::MAX_PRINCIPALS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "at most {} monitors or managers",
                crate::run_rights::MAX_PRINCIPALS
            ),
        ));
    }
    inner
        .mesh
        .registry_with(move |view| {
            list.iter()
                .map(|p| crate::transfers::principal_of(view, p).map_err(|e| format!("{e:#}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(unavailable)?
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

/// Whether `at` names another node than this one.
fn elsewhere<'a>(inner: &Shared, at: Option<&'a str>) -> Option<&'a str> {
    let me = inner.mesh.peer_id().to_string();
    at.filter(|a| *a != me && *a != inner.name)
}

/// Calls the run service of node `at`.
async fn call_runs(
    inner: &Shared,
    at: &str,
    call: crate::remote_runs::Call,
) -> Result<serde_json::Value, ApiError> {
    let (_, remote) = crate::remote_runs::node_at(&inner.mesh, &inner.transfers.plane, at)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let body = serde_json::to_value(call)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    remote
        .call_service(crate::remote_runs::SERVICE, body)
        .await
        .map_err(|e| match e {
            transfer::net::Error::Refused { .. } => ApiError(StatusCode::FORBIDDEN, e.to_string()),
            _ => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
        })
}

fn as_run<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<Json<T>, ApiError> {
    serde_json::from_value(v).map(Json).map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the hosting node answered what does not read: {e}"),
        )
    })
}

/// A deployed flow started at another node.
async fn start_run_at(
    inner: &Shared,
    at: &str,
    run_id: String,
    body: NewRun,
) -> Result<(StatusCode, Json<flows::engine::Run>), ApiError> {
    if body.definition.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a run at another node is of a deployed flow: name it in `flow_id`".into(),
        ));
    }
    let query = body.flow_id.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "name the deployed flow to run in `flow_id`".into(),
        )
    })?;
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    let flow =
        crate::runs::find_flow(&view, &query).map_err(|e| ApiError(StatusCode::NOT_FOUND, e))?;
    // The flow.run grant to show the host, when the flow is not this node's institution's.
    let owner = view
        .nodes
        .get(&flow.owner_peer)
        .and_then(|n| n.institution_key);
    let ours = inner.own.institution_key.map(|k| crdt_registry::Key(k.0));
    let flow_token = match owner {
        Some(root) if Some(root) != ours => inner
            .tasks
            .access
            .token_allowing(
                &flow.id,
                &root,
                capability::Request {
                    peer: String::new(),
                    institution: root,
                    time: mesh::membership::unix_now(),
                    endpoint: flow.id.clone(),
                    function: None,
                    ability: capability::Ability::FlowRun,
                    path: None,
                },
            )
            .ok(),
        _ => None,
    };
    let flow_id = flow.id.clone();
    drop(view);
    let call = crate::remote_runs::Call::Start {
        run_id,
        flow: flow_id,
        input: body.input.unwrap_or_else(|| serde_json::json!({})),
        label: body.label,
        monitors: principals(inner, body.monitors).await?,
        managers: principals(inner, body.managers).await?,
        capabilities: body.capabilities,
        flow_token,
    };
    let run = call_runs(inner, at, call).await?;
    Ok((StatusCode::CREATED, as_run(run)?))
}

pub(super) async fn start_run(
    State(inner): State<Shared>,
    Body(mut body): Body<NewRun>,
) -> Result<(StatusCode, Json<flows::engine::Run>), ApiError> {
    let run_id = match body.run_id.take() {
        Some(id) => {
            flows::engine::check_run_id(&id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
            id
        }
        None => hex::encode(rand::random::<[u8; 12]>()),
    };
    if let Some(label) = &body.label {
        if label.is_empty() || label.len() > 128 {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "a run's label has 1 to 128 characters".into(),
            ));
        }
    }
    if let Some(at) = elsewhere(&inner, body.at.as_deref()).map(str::to_owned) {
        return start_run_at(&inner, &at, run_id, body).await;
    }
    if !body.capabilities.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a run on this node acts with this node's rights: `capabilities` are delegated to \
             another node's run (`at`)"
                .into(),
        ));
    }
    let monitors = principals(&inner, body.monitors).await?;
    let managers = principals(&inner, body.managers).await?;
    let input = body.input.unwrap_or_else(|| serde_json::json!({}));
    // A definition given inline, or a deployed flow by id, id prefix or title.
    let (definition, flow_id) = match (body.definition, body.flow_id) {
        (Some(d), flow_id) => (d, flow_id.unwrap_or_else(|| "inline".into())),
        (None, Some(query)) => {
            let view = inner.mesh.registry().await.map_err(unavailable)?;
            let flow = crate::runs::find_flow(&view, &query)
                .map_err(|e| ApiError(StatusCode::NOT_FOUND, e))?;
            crate::runs::may_run(&view, flow, &inner.own, &inner.tasks.access)
                .map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
            flows::schema::check_input(&flow.record.input_schema, &input)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
            (flow.record.definition.clone(), flow.id.clone())
        }
        (None, None) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give a `definition`, or a deployed flow's id or title as `flow_id`".into(),
            ));
        }
    };
    crate::runs::validate(&definition, inner.runs.providers())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let user = format!("urn:funcmesh:node:{}", inner.name);
    if !monitors.is_empty() || !managers.is_empty() {
        // Who else may see and manage it from their own nodes.
        let term = inner
            .own
            .institution_key
            .map(|k| capability::institution_term(&crdt_registry::Key(k.0)));
        let starter = crate::run_rights::Starter {
            peer: inner.mesh.peer_id().to_string(),
            institution: inner.own.institution.clone(),
            institution_term: term,
            monitors,
            managers,
            capabilities: Vec::new(),
            own_institution: true,
        };
        let starters = crate::run_rights::Starters::new(inner.store.clone());
        if starters
            .get(&run_id)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?
            .is_none()
        {
            starters
                .put(&run_id, &starter)
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        }
    }
    let runs = inner.runs.clone();
    let label = body.label;
    let run = tokio::task::spawn_blocking(move || {
        runs.start(&run_id, &flow_id, &definition, input, &user, label)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    Ok((StatusCode::CREATED, Json(run)))
}

pub(super) async fn runs(
    State(inner): State<Shared>,
) -> Result<Json<Vec<flows::engine::Run>>, ApiError> {
    let engine = inner.runs.clone();
    tokio::task::spawn_blocking(move || engine.list())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
}

fn no_run(id: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no run {id} on this node (`funcmesh flow runs` lists the runs it hosts)"),
    )
}

pub(super) async fn run(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(q): Params,
) -> Result<Json<flows::engine::Run>, ApiError> {
    if let Some(at) = elsewhere(&inner, q.get("at").map(String::as_str)) {
        let call = crate::remote_runs::Call::Status { run_id: id };
        return as_run(call_runs(&inner, at, call).await?);
    }
    match inner.runs.get(&id) {
        Ok(Some(run)) => Ok(Json(run)),
        Ok(None) => Err(no_run(&id)),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

pub(super) async fn run_log(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(q): Params,
) -> Result<Json<Vec<flows::engine::Event>>, ApiError> {
    if let Some(at) = elsewhere(&inner, q.get("at").map(String::as_str)) {
        let call = crate::remote_runs::Call::Log { run_id: id };
        return as_run(call_runs(&inner, at, call).await?);
    }
    if inner
        .runs
        .get(&id)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .is_none()
    {
        return Err(no_run(&id));
    }
    inner
        .runs
        .log(&id)
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
}

pub(super) async fn cancel_run(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(q): Params,
) -> Result<Json<flows::engine::Run>, ApiError> {
    if let Some(at) = elsewhere(&inner, q.get("at").map(String::as_str)) {
        let call = crate::remote_runs::Call::Cancel { run_id: id };
        return as_run(call_runs(&inner, at, call).await?);
    }
    inner.runs.cancel(&id).map(Json).map_err(|_| no_run(&id))
}

pub(super) async fn resume_run(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(q): Params,
) -> Result<Json<flows::engine::Run>, ApiError> {
    if let Some(at) = elsewhere(&inner, q.get("at").map(String::as_str)) {
        let call = crate::remote_runs::Call::Resume { run_id: id };
        return as_run(call_runs(&inner, at, call).await?);
    }
    inner.runs.resume(&id).map(Json).map_err(|_| no_run(&id))
}
