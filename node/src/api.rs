//! The local HTTP API (`/v1`), bound to loopback by default and protected by the bearer token the
//! node writes into `api.json`. The CLI, the SDK and the dashboard all use it.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod actions;
mod flows_api;

/// What the API serves from; shared by the handlers.
pub(crate) struct Inner {
    pub(crate) mesh: mesh::Handle,
    pub(crate) federation: mesh::membership::Federation,
    pub(crate) own: mesh::membership::Member,
    pub(crate) name: String,
    pub(crate) started: std::time::Instant,
    pub(crate) token: String,
    /// This node's registry key (its ed25519 identity).
    pub(crate) key: crdt_registry::Key,
    /// Tasks: this node's endpoints and its dispatcher.
    pub(crate) tasks: compute::service::Tasks,
    /// How large task values pass, as blobs.
    pub(crate) values: compute::blobs::Values,
    /// The node's store.
    pub(crate) store: store::Store,
    /// What `GET /metrics` exports.
    pub(crate) metrics: Exported,
    /// Data roots, copy jobs, blobs.
    pub(crate) transfers: Arc<crate::transfers::Transfers>,
    /// Flow runs this node hosts.
    pub(crate) runs: flows::engine::Engine,
}

/// The node's metrics: the task path's (declared in `compute::metrics`) and the mesh's figures,
/// read when scraped.
pub(crate) struct Exported {
    registry: prometheus_client::registry::Registry,
    members: prometheus_client::metrics::gauge::Gauge,
    registry_entries: prometheus_client::metrics::gauge::Gauge,
    registry_ignored: prometheus_client::metrics::gauge::Gauge,
    registry_syncing: prometheus_client::metrics::gauge::Gauge,
}

impl Exported {
    pub(crate) fn new(mut registry: prometheus_client::registry::Registry) -> Exported {
        let e = Exported {
            registry: Default::default(),
            members: Default::default(),
            registry_entries: Default::default(),
            registry_ignored: Default::default(),
            registry_syncing: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("funcmesh");
        r.register(
            "members",
            "Verified members this node is connected to",
            e.members.clone(),
        );
        r.register(
            "registry_entries",
            "Entries in this node's replica of the registry",
            e.registry_entries.clone(),
        );
        r.register(
            "registry_ignored_entries",
            "Registry entries the typed view ignores (bad signature or authority, revoked author)",
            e.registry_ignored.clone(),
        );
        r.register(
            "registry_sync_sessions",
            "Registry sync sessions in flight",
            e.registry_syncing.clone(),
        );
        Exported { registry, ..e }
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// funcmesh version.
    pub version: String,
    /// Node name from config.
    pub name: String,
    /// Peer id.
    pub peer_id: String,
    /// Federation id.
    pub federation_id: String,
    /// Federation name.
    pub federation_name: String,
    /// Role.
    pub role: String,
    /// Institution (none for coordinators).
    pub institution: Option<String>,
    /// Mesh addresses to dial this node at.
    pub listen_addrs: Vec<String>,
    /// Members currently connected.
    pub members: usize,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// An API error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type Shared = Arc<Inner>;

/// A JSON request body. Unlike axum's `Json`, what it refuses is answered as every other error
/// of the API is, `{"error": …}`: 415 for a body not sent as JSON, 400 for one that does not
/// parse or does not have the call's shape.
struct Body<T>(T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON, with the header Content-Type: application/json".into(),
            )),
            Err(other) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not what this call takes: {} (see /v1/openapi.json)",
                    other.body_text()
                ),
            )),
        }
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    inner: Shared,
    cancel: CancellationToken,
) {
    use axum::serve::ListenerExt as _;
    let app = router(inner);
    // Small JSON answers: without TCP_NODELAY, Nagle and delayed ACKs add tens of milliseconds.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "API server failed");
    }
}

fn router(inner: Shared) -> Router {
    // A blob is streamed to disk: no body limit.
    let put_blob_route = post(put_blob).layer(axum::extract::DefaultBodyLimit::disable());
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/registry", get(registry_status))
        .route("/v1/registry/entries", post(insert_entry))
        .route("/v1/institutions", get(institutions))
        .route("/v1/nodes", get(nodes))
        .route("/v1/functions", get(functions).post(register_function))
        .route("/v1/functions/{id}", get(function).delete(delete_function))
        .route("/v1/endpoints", get(endpoints))
        .route("/v1/endpoints/{id}", get(endpoint))
        .route("/v1/adverts", get(adverts))
        .route("/v1/capabilities", get(capabilities).post(add_capability))
        .route("/v1/capabilities/{id}", delete(remove_capability))
        .route("/v1/tasks", post(submit_tasks))
        .route("/v1/tasks/wait", post(wait_tasks))
        .route("/v1/tasks/events", get(task_events))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/tasks/{id}/value", get(task_value))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/transfers", get(transfers).post(new_transfer))
        .route("/v1/transfers/ls", get(transfer_ls))
        .route("/v1/transfers/mkdir", post(transfer_mkdir))
        .route("/v1/transfers/rm", post(transfer_rm))
        .route(
            "/v1/transfers/shares",
            get(transfer_shares).post(transfer_share),
        )
        .route("/v1/transfers/unshare", post(transfer_unshare))
        .route("/v1/transfers/{id}", get(transfer))
        .route("/v1/transfers/{id}/cancel", post(cancel_transfer))
        .route("/v1/blobs", put_blob_route)
        .route("/v1/blobs/{hash}", get(get_blob))
        .route(
            "/v1/flows",
            get(flows_api::flows_list).post(flows_api::deploy_flow),
        )
        .route("/v1/flows/validate", post(flows_api::validate_flow))
        .route("/v1/flows/{id}", get(flows_api::flow))
        .route("/v1/runs", get(flows_api::runs).post(flows_api::start_run))
        .route("/v1/runs/{id}", get(flows_api::run))
        .route("/v1/runs/{id}/log", get(flows_api::run_log))
        .route("/v1/runs/{id}/cancel", post(flows_api::cancel_run))
        .route("/v1/runs/{id}/resume", post(flows_api::resume_run))
        .route("/v1/actions/flows/{flow}", get(actions::describe))
        .route("/v1/actions/flows/{flow}/run", post(actions::run))
        .route(
            "/v1/actions/flows/{flow}/{action}/status",
            get(actions::status),
        )
        .route("/v1/actions/flows/{flow}/{action}/log", get(actions::log))
        .route(
            "/v1/actions/flows/{flow}/{action}/cancel",
            post(actions::cancel),
        )
        .route(
            "/v1/actions/flows/{flow}/{action}/release",
            post(actions::release),
        )
        .route(
            "/v1/actions/flows/{flow}/{action}/resume",
            post(actions::resume),
        )
        .route("/metrics", get(metrics))
        // Everything above needs the token; the OpenAPI document below does not.
        .route_layer(middleware::from_fn_with_state(inner.clone(), auth))
        .route("/v1/openapi.json", get(openapi))
        // Bodies up to what one task-protocol message carries (a batch of tasks); larger ones
        // are refused with 413 before they are read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(announced_length))
        .layer(middleware::map_response(json_errors))
        .with_state(inner)
}

/// The largest request body the API reads.
pub const MAX_BODY: usize = compute::wire::MAX_MESSAGE;

/// A body whose announced length is over [`MAX_BODY`] is refused before a byte of it is read
/// (a chunked one is cut once it passes the limit, by the extractors' `DefaultBodyLimit`).
async fn announced_length(req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A blob is streamed to disk, whatever its size.
    let streamed = req.uri().path() == "/v1/blobs";
    if announced.is_some_and(|n| n > MAX_BODY as u64) && !streamed {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    next.run(req).await
}

/// Every error is answered as the API's JSON error, `{"error": …}`, including those axum
/// answers itself in plain text (a body over [`MAX_BODY`]: 413, an unknown route: 404, a wrong
/// method: 405).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than the {MAX_BODY} bytes the API takes: send fewer \
             tasks per request, or pass large data by reference"
        ),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned(),
        _ => text,
    };
    let mut out = (status, Json(ErrorBody { error })).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

async fn auth(State(inner): State<Shared>, req: Request, next: Next) -> Result<Response, ApiError> {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), inner.token.as_bytes()));
    if !ok {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token: read it from api.json in the node's data dir".into(),
        ));
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(inner): State<Shared>) -> Result<Json<Status>, ApiError> {
    let mesh = &inner.mesh;
    let unavailable =
        |e: mesh::network::Error| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let peer = mesh.peer_id();
    let listen_addrs = mesh
        .listen_addrs()
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|a| a.with(mesh::network::p2p(peer)).to_string())
        .collect();
    let members = mesh.members().await.map_err(unavailable)?.len();
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        name: inner.name.clone(),
        peer_id: peer.to_string(),
        federation_id: inner.federation.id.to_string(),
        federation_name: inner.federation.name.clone(),
        role: inner.own.role.to_string(),
        institution: inner.own.institution.clone(),
        listen_addrs,
        members,
        uptime_secs: inner.started.elapsed().as_secs(),
    }))
}

async fn peers(State(inner): State<Shared>) -> Result<Json<Vec<mesh::PeerInfo>>, ApiError> {
    inner
        .mesh
        .members()
        .await
        .map(Json)
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

fn unavailable(e: mesh::network::Error) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn not_found(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{e:#}"))
}

async fn registry_status(
    State(inner): State<Shared>,
) -> Result<Json<mesh::registry::Status>, ApiError> {
    inner
        .mesh
        .registry_status()
        .await
        .map(Json)
        .map_err(unavailable)
}

/// `POST /v1/registry/entries`: an entry signed elsewhere (base64).
#[derive(Debug, Serialize, Deserialize)]
pub struct SignedEntry {
    /// The entry bytes, base64.
    pub entry: String,
}

/// The answer to a registry write.
#[derive(Debug, Serialize, Deserialize)]
pub struct Written {
    /// The record's id.
    pub id: String,
    /// Whether a new entry was written (false: the registry already had it).
    pub created: bool,
}

async fn insert_entry(
    State(inner): State<Shared>,
    Body(req): Body<SignedEntry>,
) -> Result<Json<Written>, ApiError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(req.entry.trim())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("entry is not base64: {e}")))?;
    let entry = inner
        .mesh
        .registry_insert(bytes)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(Written {
        id: entry.payload().id.clone(),
        created: true,
    }))
}

async fn institutions(
    State(inner): State<Shared>,
) -> Result<Json<Vec<crdt_registry::Institution>>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    Ok(Json(view.institutions.into_values().collect()))
}

async fn nodes(State(inner): State<Shared>) -> Result<Json<Vec<crdt_registry::Node>>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    Ok(Json(view.nodes.into_values().collect()))
}

async fn functions(
    State(inner): State<Shared>,
) -> Result<Json<Vec<crdt_registry::Function>>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    Ok(Json(view.functions.into_values().collect()))
}

async fn function(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crdt_registry::Function>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    crate::registry::find_function(&view, &id)
        .cloned()
        .map(Json)
        .map_err(not_found)
}

async fn register_function(
    State(inner): State<Shared>,
    Body(req): Body<crate::registry::NewFunction>,
) -> Result<Json<Written>, ApiError> {
    register(&inner, req).await.map(Json)
}

/// Writes a function into the registry (unless it is there already, as it is).
pub(crate) async fn register(
    inner: &Inner,
    req: crate::registry::NewFunction,
) -> Result<Written, ApiError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let record = req
        .record(inner.key, now_ms)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let id = record.content_id();
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    if let Some(existing) = view.functions.get(&id) {
        if existing.record.description == record.description {
            return Ok(Written { id, created: false });
        }
    }
    inner
        .mesh
        .registry_write(id.clone(), crdt_registry::record::Body::Function(record))
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Written { id, created: true })
}

async fn delete_function(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Written>, ApiError> {
    delete_function_by_id(&inner, &id).await.map(Json)
}

/// Deletes a function this node owns from the registry.
pub(crate) async fn delete_function_by_id(inner: &Inner, id: &str) -> Result<Written, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    let f = crate::registry::find_function(&view, id).map_err(not_found)?;
    if f.record.owner != inner.key {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "function {} is owned by node {}; only its owner can delete it",
                f.id, f.owner_peer
            ),
        ));
    }
    let id = f.id.clone();
    inner
        .mesh
        .registry_write(
            id.clone(),
            crdt_registry::record::Body::Deleted {
                of: crdt_registry::record::Kind::Function,
            },
        )
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Written { id, created: true })
}

async fn endpoints(
    State(inner): State<Shared>,
) -> Result<Json<Vec<crdt_registry::Endpoint>>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    Ok(Json(view.endpoints.into_values().collect()))
}

async fn endpoint(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crdt_registry::Endpoint>, ApiError> {
    let view = inner.mesh.registry().await.map_err(unavailable)?;
    crate::registry::find_endpoint(&view, &id)
        .cloned()
        .map(Json)
        .map_err(not_found)
}

/// One node's latest advertisement, as this node heard it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeAdvert {
    /// The advertising node.
    pub peer_id: String,
    /// What it said.
    pub advert: compute::routing::Advert,
}

async fn adverts(State(inner): State<Shared>) -> Result<Json<Vec<NodeAdvert>>, ApiError> {
    let mut list: Vec<NodeAdvert> = inner
        .tasks
        .dispatcher
        .adverts()
        .await
        .map_err(dispatch_error)?
        .into_iter()
        .map(|(peer, advert)| NodeAdvert {
            peer_id: peer.to_string(),
            advert,
        })
        .collect();
    list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    Ok(Json(list))
}

/// The answer to `POST /v1/tasks` and `POST /v1/tasks/wait`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskList {
    /// One entry per task, in order.
    pub tasks: Vec<crate::tasks::Submitted1>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SubmitForm {
    Many(crate::tasks::SubmitBody),
    One {
        #[serde(flatten)]
        task: Box<crate::tasks::NewTask>,
        #[serde(default)]
        wait_ms: u64,
    },
}

fn dispatch_error(e: compute::submit::Error) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn views(
    tasks: Vec<Option<std::sync::Arc<compute::submit::Submitted>>>,
    ids: &[String],
) -> Vec<crate::tasks::Submitted1> {
    tasks
        .into_iter()
        .zip(ids)
        .map(|(t, id)| match t {
            Some(t) => crate::tasks::Submitted1 {
                task: Some((&*t).into()),
                error: None,
                error_kind: None,
            },
            None => crate::tasks::Submitted1 {
                task: None,
                error: Some(format!("no task {id} was submitted from this node")),
                error_kind: Some("unknown_task".into()),
            },
        })
        .collect()
}

async fn submit_tasks(
    State(inner): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Json<TaskList>, ApiError> {
    let form: SubmitForm = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the request is not a task or a list of tasks: {e}"),
        )
    })?;
    let (tasks, wait_ms) = match form {
        SubmitForm::Many(b) if !b.tasks.is_empty() => (b.tasks, b.wait_ms),
        SubmitForm::One { task, wait_ms } if !task.function.is_empty() => (vec![*task], wait_ms),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "name a function (`function`) or give a list of tasks (`tasks`)".into(),
            ));
        }
    };
    // What the document constrains is refused whole, before anything is submitted; what only
    // the registry or the router can judge is answered per task.
    for (i, t) in tasks.iter().enumerate() {
        let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, format!("task {i}: {why}"));
        if t.function.is_empty() {
            return Err(bad("name its function (`function`)".into()));
        }
        if let Some(s) = &t.strategy {
            compute::routing::Strategy::parse(s).map_err(bad)?;
        }
        if let Some(r) = &t.args_ref {
            r.check().map_err(|e| bad(format!("args_ref: {e}")))?;
        }
        if !(t.kwargs.is_object() || t.kwargs.is_null()) {
            return Err(bad(format!(
                "kwargs must be a JSON object, not {}",
                t.kwargs
            )));
        }
        if t.encoding == compute::task::Encoding::Json && !(t.args.is_array() || t.args.is_null()) {
            return Err(bad(format!(
                "args must be a JSON array of positional arguments, not {}",
                t.args
            )));
        }
    }
    let dispatcher = &inner.tasks.dispatcher;
    let wait = (wait_ms > 0).then(|| std::time::Duration::from_millis(wait_ms));
    let out = crate::tasks::submit_views(&inner.mesh, dispatcher, &inner.values, tasks, wait)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    Ok(Json(TaskList { tasks: out }))
}

/// `POST /v1/tasks/wait`.
#[derive(Debug, Serialize, Deserialize)]
pub struct WaitBody {
    /// Task ids.
    pub ids: Vec<String>,
    /// Longest wait, milliseconds.
    #[serde(default)]
    pub timeout_ms: u64,
}

fn parse_ids(ids: &[String]) -> Result<Vec<compute::TaskId>, ApiError> {
    ids.iter()
        .map(|s| {
            s.parse()
                .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))
        })
        .collect()
}

async fn wait_tasks(
    State(inner): State<Shared>,
    Body(body): Body<WaitBody>,
) -> Result<Json<TaskList>, ApiError> {
    let ids = parse_ids(&body.ids)?;
    let tasks = inner
        .tasks
        .dispatcher
        .wait(ids, std::time::Duration::from_millis(body.timeout_ms))
        .await
        .map_err(dispatch_error)?;
    Ok(Json(TaskList {
        tasks: views(tasks, &body.ids),
    }))
}

/// `GET /v1/tasks/events`: server-sent events, one `task` event (the task's view as JSON) for
/// every task submitted on this node as it finishes, from the moment of the request on. A
/// client that fell behind gets a `lagged` event (`{"missed": N}`) and should ask for the tasks
/// it waits on (`POST /v1/tasks/wait`); so should a client that subscribes after submitting.
async fn task_events(
    State(inner): State<Shared>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = inner.tasks.dispatcher.finished_tasks();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(t) => {
                let view: crate::tasks::TaskView = (&*t).into();
                Event::default()
                    .event("task")
                    .data(serde_json::to_string(&view).unwrap_or_default())
            }
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(serde_json::json!({ "missed": n }).to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn task(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crate::tasks::TaskView>, ApiError> {
    let tid = parse_ids(std::slice::from_ref(&id))?.remove(0);
    let t = inner
        .tasks
        .dispatcher
        .live(tid)
        .await
        .map_err(dispatch_error)?;
    match t {
        Some(t) => Ok(Json((&t).into())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no task {id} was submitted from this node (tasks are kept by their submitting node)"
            ),
        )),
    }
}

/// `GET /v1/tasks/{id}/value`: a succeeded task's value as JSON, whether it came inline or by
/// reference (then streamed from this node's blob store, fetched from the endpoint's node first
/// if need be).
async fn task_value(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let internal =
        |e: &dyn std::fmt::Display| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let tid = parse_ids(std::slice::from_ref(&id))?.remove(0);
    let t = inner
        .tasks
        .dispatcher
        .get(vec![tid])
        .await
        .map_err(dispatch_error)?
        .pop()
        .flatten()
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no task {id} was submitted from this node"),
            )
        })?;
    let (value, value_ref) = match &t.outcome {
        Some(compute::Outcome::Succeeded { value, value_ref }) => (value, value_ref),
        _ => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "task {id} has no value: it is {} (GET /v1/tasks/{id} says why)",
                    t.status
                ),
            ));
        }
    };
    let Some(r) = value_ref else {
        let body = serde_json::to_vec(value).map_err(|e| internal(&e))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    };
    let blobs = &inner.values.blobs;
    if !blobs.holds(r) {
        let from = t
            .target()
            .and_then(|x| x.peer.parse::<mesh::PeerId>().ok())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("task {id}'s value is not here, and its endpoint is not known"),
                )
            })?;
        blobs.fetch(r, from).await.map_err(|e| {
            ApiError(
                StatusCode::BAD_GATEWAY,
                format!(
                    "task {id}'s value (blob {}) could not be fetched: {e}",
                    r.blake3
                ),
            )
        })?;
    }
    let hash: transfer::Hash = r
        .blake3
        .parse()
        .map_err(|e: transfer::Error| internal(&e))?;
    blob_body(&inner.transfers.blobs, &hash, "application/json").await
}

async fn cancel_task(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crate::tasks::TaskView>, ApiError> {
    let tid = parse_ids(std::slice::from_ref(&id))?.remove(0);
    match inner
        .tasks
        .dispatcher
        .cancel(tid)
        .await
        .map_err(dispatch_error)?
    {
        Some(t) => Ok(Json((&t).into())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no task {id} was submitted from this node"),
        )),
    }
}

async fn capabilities(
    State(inner): State<Shared>,
) -> Result<Json<Vec<crate::capabilities::CapabilityView>>, ApiError> {
    let access = inner.tasks.access.clone();
    let me = inner.mesh.peer_id().to_string();
    inner
        .mesh
        .registry_with(move |view| crate::capabilities::views(&access, view, &me))
        .await
        .map(Json)
        .map_err(unavailable)
}

async fn add_capability(
    State(inner): State<Shared>,
    Body(req): Body<crate::capabilities::NewCapability>,
) -> Result<Json<crate::capabilities::CapabilityView>, ApiError> {
    let held = crate::capabilities::add(&inner.store, &inner.tasks.access, &req.token)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let access = inner.tasks.access.clone();
    let me = inner.mesh.peer_id().to_string();
    let all = inner
        .mesh
        .registry_with(move |view| crate::capabilities::views(&access, view, &me))
        .await
        .map_err(unavailable)?;
    all.into_iter()
        .find(|v| v.token == held.text)
        .map(Json)
        .ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored, then not found".into(),
            )
        })
}

async fn remove_capability(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<crate::capabilities::NewCapability>, ApiError> {
    crate::capabilities::remove(&inner.store, &inner.tasks.access, &id)
        .await
        .map(|token| Json(crate::capabilities::NewCapability { token }))
        .map_err(|e| {
            let msg = format!("{e:#}");
            let code = if msg.contains("holds no token") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError(code, msg)
        })
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(State(inner): State<Shared>) -> Result<Response, ApiError> {
    let m = &inner.metrics;
    let members = inner.mesh.members().await.map_err(unavailable)?.len();
    let status = inner.mesh.registry_status().await.map_err(unavailable)?;
    m.members.set(members as i64);
    m.registry_entries.set(status.entries as i64);
    m.registry_ignored.set(status.ignored as i64);
    m.registry_syncing.set(status.syncing as i64);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn failed((status, message): crate::transfers::Failure) -> ApiError {
    ApiError(status, message)
}

async fn transfers(State(inner): State<Shared>) -> Json<Vec<transfer::copy::Job>> {
    let jobs = inner.transfers.jobs.clone();
    Json(
        tokio::task::spawn_blocking(move || jobs.list())
            .await
            .unwrap_or_default(),
    )
}

async fn new_transfer(
    State(inner): State<Shared>,
    Body(t): Body<crate::transfers::NewTransfer>,
) -> Result<(StatusCode, Json<transfer::copy::Job>), ApiError> {
    let job = inner.transfers.copy(t).await.map_err(failed)?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn transfer(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<transfer::copy::Job>, ApiError> {
    inner
        .transfers
        .status(&id, false)
        .await
        .map(Json)
        .map_err(failed)
}

async fn cancel_transfer(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<transfer::copy::Job>, ApiError> {
    inner
        .transfers
        .status(&id, true)
        .await
        .map(Json)
        .map_err(failed)
}

/// Query parameters, read by hand so that a missing one is answered like every other error.
pub(super) type Params = axum::extract::Query<std::collections::HashMap<String, String>>;

async fn transfer_ls(
    State(inner): State<Shared>,
    axum::extract::Query(q): Params,
) -> Result<Json<Vec<transfer::root::Entry>>, ApiError> {
    let path = q.get("path").ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "name what to list: ?path=ENDPOINT:PATH".into(),
        )
    })?;
    inner.transfers.ls(path).await.map(Json).map_err(failed)
}

async fn transfer_mkdir(
    State(inner): State<Shared>,
    Body(op): Body<crate::transfers::PathOp>,
) -> Result<Json<serde_json::Value>, ApiError> {
    inner.transfers.mkdir(&op).await.map_err(failed)?;
    Ok(Json(serde_json::json!({})))
}

async fn transfer_shares(
    State(inner): State<Shared>,
    axum::extract::Query(q): Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let endpoint = q.get("endpoint").ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "name the endpoint: ?endpoint=ENDPOINT".into(),
        )
    })?;
    inner
        .transfers
        .shares(endpoint, transfer::wire::ShareChange::List)
        .await
        .map(Json)
        .map_err(failed)
}

async fn transfer_share(
    State(inner): State<Shared>,
    Body(new): Body<crate::transfers::NewShare>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let share = inner.transfers.share(&new).await.map_err(failed)?;
    Ok((StatusCode::CREATED, Json(share)))
}

async fn transfer_unshare(
    State(inner): State<Shared>,
    Body(u): Body<crate::transfers::Unshare>,
) -> Result<Json<serde_json::Value>, ApiError> {
    inner
        .transfers
        .shares(
            &u.endpoint,
            transfer::wire::ShareChange::Remove { id: u.id },
        )
        .await
        .map(Json)
        .map_err(failed)
}

async fn transfer_rm(
    State(inner): State<Shared>,
    Body(op): Body<crate::transfers::PathOp>,
) -> Result<Json<serde_json::Value>, ApiError> {
    inner.transfers.rm(&op).await.map_err(failed)?;
    Ok(Json(serde_json::json!({})))
}

/// `POST /v1/blobs`: the blob's hash and size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRef {
    /// BLAKE3, hex.
    pub hash: String,
    /// Bytes.
    pub size: u64,
}

async fn put_blob(
    State(inner): State<Shared>,
    body: axum::body::Body,
) -> Result<Json<BlobRef>, ApiError> {
    use futures::StreamExt as _;
    use std::io::Write as _;
    let internal =
        |e: &dyn std::fmt::Display| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let spool =
        tempfile::NamedTempFile::new_in(inner.transfers.blobs.dir()).map_err(|e| internal(&e))?;
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, spool.reopen().map_err(|e| internal(&e))?);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        file.write_all(&chunk).map_err(|e| internal(&e))?;
    }
    file.flush().map_err(|e| internal(&e))?;
    drop(file);
    let blobs = inner.transfers.blobs.clone();
    let (hash, size) = tokio::task::spawn_blocking(move || {
        let f = spool.reopen()?;
        blobs.import(f)
    })
    .await
    .map_err(|e| internal(&e))?
    .map_err(|e| internal(&e))?;
    Ok(Json(BlobRef {
        hash: hash.to_string(),
        size,
    }))
}

async fn get_blob(
    State(inner): State<Shared>,
    Path(hash): Path<String>,
    axum::extract::Query(q): Params,
) -> Result<Response, ApiError> {
    let t = &inner.transfers;
    let hash: transfer::Hash = hash
        .parse()
        .map_err(|e: transfer::Error| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if t.blobs.size(&hash).is_none() {
        let Some(from) = q.get("from").cloned() else {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "this node does not hold blob {hash}: name a member that does with \
                     ?from=PEER_ID (`funcmesh transfer get HASH --from PEER_ID`)"
                ),
            ));
        };
        // One member or several (comma-separated): the blob is split among them.
        let peers = from
            .split(',')
            .map(|p| p.trim().parse::<PeerIdText>().map(|p| p.0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("?from: {e}")))?;
        let wanted: Vec<String> = peers.iter().map(ToString::to_string).collect();
        let addrs = inner
            .mesh
            .registry_with(move |view| {
                wanted
                    .iter()
                    .map(|p| {
                        view.nodes
                            .get(p)
                            .and_then(|n| n.data_addr.clone())
                            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(unavailable)?;
        let sources: Vec<_> = peers
            .into_iter()
            .zip(addrs)
            .filter_map(|(p, a)| a.map(|a| (p, a)))
            .collect();
        if sources.is_empty() {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no data-plane address for {from} in the registry"),
            ));
        }
        t.plane
            .fetch_many(&sources, hash, 8)
            .await
            .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    }
    blob_body(&t.blobs, &hash, "application/octet-stream").await
}

/// A response streaming a blob this node holds, as `content_type`.
async fn blob_body(
    blobs: &transfer::BlobStore,
    hash: &transfer::Hash,
    content_type: &'static str,
) -> Result<Response, ApiError> {
    let path = blobs
        .path(hash)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// A peer id from a query string.
struct PeerIdText(mesh::PeerId);

impl std::str::FromStr for PeerIdText {
    type Err = String;
    fn from_str(s: &str) -> Result<PeerIdText, String> {
        s.parse()
            .map(PeerIdText)
            .map_err(|e| format!("{s:?} is not a peer id: {e}"))
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

#[cfg(test)]
mod tests {
    /// Every route the router serves is documented in the OpenAPI file, and nothing else is.
    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("openapi.json")).expect("valid JSON");
        let documented: std::collections::BTreeSet<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .cloned()
            .collect();
        let source = include_str!("api.rs");
        let served: std::collections::BTreeSet<String> = source
            .split(".route(")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix("\"/")?.split('"').next())
            .map(|route| format!("/{route}"))
            .collect();
        assert_eq!(documented, served);
    }
}
