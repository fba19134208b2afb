//! The Globus Compute–compatible API (`[compat] globus_compute = true`): what the unmodified
//! `globus-compute-sdk` sends to the Globus Compute web service and to Globus Auth, answered from
//! this node's registry and task service, on its own listen address (by default
//! `127.0.0.1:5000`, where the SDK's `local` environment points).
//!
//! A Globus Compute function becomes a funcmesh function whose Python source holds the SDK's
//! buffer and runs it with the SDK's own serializer (`wire::function_source`), so it is
//! registered, replicated, routed and run like any other; a task's payload is its one argument.
//! funcmesh's ids are 32 hex characters, shown as dashed UUIDs. Results reach the SDK's
//! `Executor` through a RabbitMQ the node publishes to (`results`).
//!
//! Authentication: the SDK holds a client id and secret (`GLOBUS_COMPUTE_CLIENT_ID`,
//! `GLOBUS_COMPUTE_CLIENT_SECRET`) and trades them at `POST /v2/oauth2/token` for a bearer
//! token. The secret is this API's token (`globus-compute.json` in the data dir, kept across
//! restarts, since the SDK stores the token it gets) or the node's API token; the bearer token
//! handed out is this API's token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::Inner;

mod results;
pub(crate) mod wire;

/// The scope the SDK asks Globus Auth for, and the resource server it expects it under.
const COMPUTE_SCOPE: &str =
    "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all";
const RESOURCE_SERVER: &str = "funcx_service";

/// What this API keeps in the data dir: its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// The client id the SDK names (any id is taken; a UUID keeps SDK 2.x from warning).
    #[serde(default)]
    pub client_id: String,
    /// The client secret and bearer token the SDK presents.
    pub token: String,
    /// Where the API listens (`http://host:port`).
    pub url: String,
}

/// The store's keys (column family [`keys::CF`]).
pub(crate) mod keys {
    /// The column family.
    pub(crate) const CF: &str = store::cf::GLOBUS_COMPUTE;
    /// Tasks that owe a result message: `q/<task id>` → the queue's name.
    pub(crate) const QUEUED_PREFIX: &str = "q/";

    pub(crate) fn queued(task: &str) -> Vec<u8> {
        format!("{QUEUED_PREFIX}{task}").into_bytes()
    }

    /// `g/<group id>/<task id>` → empty: a task group's tasks.
    pub(crate) fn group_prefix(group: &str) -> String {
        format!("g/{group}/")
    }

    /// `t/<task id>` → its group's id.
    pub(crate) fn task(task: &str) -> Vec<u8> {
        format!("t/{task}").into_bytes()
    }
}

/// What the handlers share.
pub(crate) struct Compat {
    pub(crate) api: Arc<Inner>,
    token: String,
    broker: Option<results::Broker>,
    /// The broker's URL as the SDK should dial it.
    client_url: Option<String>,
    queue_prefix: String,
    /// An endpoint whose node has not advertised for this long is offline.
    lost_after: std::time::Duration,
}

type Shared = Arc<Compat>;

/// Starts the API on `listener` (and the publisher of results, if a broker is configured).
pub(crate) fn start(
    listener: tokio::net::TcpListener,
    api: Arc<Inner>,
    config: &crate::config::CompatSection,
    lost_after: std::time::Duration,
    token: String,
    cancel: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> anyhow::Result<()> {
    let broker = config
        .amqp_url
        .as_deref()
        .map(results::Broker::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let compat = Arc::new(Compat {
        api,
        token,
        broker,
        client_url: config.amqp_client_url.clone().or(config.amqp_url.clone()),
        queue_prefix: config.queue_prefix.clone(),
        lost_after,
    });
    tracker.spawn(results::publish_results(
        compat.clone(),
        cancel.child_token(),
    ));
    let app = router(compat);
    let cancel = cancel.child_token();
    tracker.spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the Globus Compute API failed");
        }
    });
    Ok(())
}

fn router(c: Shared) -> Router {
    Router::new()
        .route("/v2/version", get(version))
        .route("/v2/functions", post(register_function))
        .route("/v3/functions", post(register_function))
        .route("/v2/functions/{id}", get(function).delete(delete_function))
        .route("/v2/endpoints", get(endpoints))
        .route("/v2/endpoints/{id}", get(endpoint))
        .route("/v2/endpoints/{id}/status", get(endpoint_status))
        .route("/v3/endpoints/{id}/submit", post(submit))
        .route("/v2/tasks/{id}", get(task))
        .route("/v2/batch_status", post(batch_status))
        .route("/v2/taskgroup/{id}", get(task_group))
        .route("/v2/get_amqp_result_connection_url", get(amqp_url))
        .route_layer(middleware::from_fn_with_state(c.clone(), auth))
        // Globus Auth's token call takes the client's secret, not a bearer token.
        .route("/v2/oauth2/token", post(token))
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_BODY))
        .fallback(|| async {
            Error::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "this route is not part of funcmesh's Globus Compute API",
            )
        })
        .with_state(c)
}

/// An error as the SDK reads it: `{"code", "message"}` with the HTTP status.
#[derive(Debug)]
pub(crate) struct Error(StatusCode, &'static str, String);

impl Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Error {
        Error(status, code, message.into())
    }

    fn bad(message: impl Into<String>) -> Error {
        Error::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    fn not_found(message: impl Into<String>) -> Error {
        Error::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    fn unavailable(message: impl std::fmt::Display) -> Error {
        Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            message.to_string(),
        )
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let Error(status, code, message) = self;
        let body = json!({
            "code": code,
            "message": message,
            "http_status_code": status.as_u16(),
        });
        (status, Json(body)).into_response()
    }
}

impl From<crate::api::ApiError> for Error {
    fn from(e: crate::api::ApiError) -> Error {
        let code = match e.0 {
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::FORBIDDEN => "FORBIDDEN",
            s if s.is_server_error() => "SERVICE_UNAVAILABLE",
            _ => "BAD_REQUEST",
        };
        Error(e.0, code, e.1)
    }
}

/// A JSON body, refused with the SDK's error form when it is not what the route takes.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Error;
    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| Error::bad(format!("cannot read the request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| Error::bad(format!("the body is not what this call takes: {e}")))
    }
}

async fn auth(State(c): State<Shared>, req: Request, next: Next) -> Result<Response, Error> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !c.accepts(presented) {
        return Err(Error::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong token: set GLOBUS_COMPUTE_CLIENT_SECRET to the token in the \
             node's globus-compute.json (`funcmesh compat env` prints the settings)",
        ));
    }
    Ok(next.run(req).await)
}

impl Compat {
    /// Whether `secret` is this API's token or the node's.
    fn accepts(&self, secret: &str) -> bool {
        let eq = |a: &str, b: &str| {
            a.len() == b.len()
                && a.bytes()
                    .zip(b.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        };
        !secret.is_empty() && (eq(secret, &self.token) || eq(secret, &self.api.token))
    }

    /// A finished task's value, fetched (and parsed) when it went by reference.
    async fn value_of(&self, t: &compute::submit::Submitted) -> Result<Option<Value>, String> {
        let Some(compute::Outcome::Succeeded { value, value_ref }) = &t.outcome else {
            return Ok(None);
        };
        let Some(r) = value_ref else {
            return Ok(Some(value.clone()));
        };
        let blobs = &self.api.values.blobs;
        if !blobs.holds(r) {
            let from = t
                .target()
                .and_then(|x| x.peer.parse::<mesh::PeerId>().ok())
                .ok_or("the value is not here, and its endpoint is not known")?;
            blobs
                .fetch(r, from)
                .await
                .map_err(|e| format!("the value (blob {}) cannot be fetched: {e}", r.blake3))?;
        }
        let hash: transfer::Hash = r
            .blake3
            .parse()
            .map_err(|e: transfer::Error| e.to_string())?;
        let path = self
            .api
            .transfers
            .blobs
            .path(&hash)
            .map_err(|e| e.to_string())?;
        let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("the value (blob {}) is not JSON: {e}", r.blake3))
    }

    /// The SDK's documents for tasks `ids` (32 hex each), None for one this node never
    /// submitted.
    async fn task_docs(&self, ids: &[String]) -> Result<Vec<Option<Value>>, Error> {
        let tids = ids
            .iter()
            .map(|id| id.parse::<compute::TaskId>().map_err(Error::bad))
            .collect::<Result<Vec<_>, _>>()?;
        let tasks = self
            .api
            .tasks
            .dispatcher
            .get(tids)
            .await
            .map_err(Error::unavailable)?;
        let mut docs = Vec::with_capacity(ids.len());
        for (id, t) in ids.iter().zip(tasks) {
            docs.push(match t {
                Some(t) => Some(self.doc_of(id, &t).await?),
                None => None,
            });
        }
        Ok(docs)
    }

    async fn doc_of(&self, id: &str, t: &compute::submit::Submitted) -> Result<Value, Error> {
        let value = self
            .value_of(t)
            .await
            .map_err(|e| Error::new(StatusCode::BAD_GATEWAY, "RESULT_UNAVAILABLE", e))?;
        let group = self.group_of(id).await;
        Ok(wire::task_doc(
            &wire::uuid(id),
            t,
            wire::ending(t, value.as_ref()),
            group.as_deref(),
        ))
    }

    async fn group_of(&self, task: &str) -> Option<String> {
        let (store, key) = (self.api.store.clone(), keys::task(task));
        let v = tokio::task::spawn_blocking(move || store.get(keys::CF, &key))
            .await
            .ok()?
            .ok()??;
        String::from_utf8(v).ok()
    }
}

/// `POST /v2/oauth2/token`: Globus Auth's client-credentials grant, for this API's scope.
async fn token(
    State(c): State<Shared>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, Error> {
    use base64::Engine as _;
    let form = form_fields(&String::from_utf8_lossy(&body));
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let secret = match &basic {
        Some(pair) => pair.split_once(':').map_or("", |(_, s)| s).to_owned(),
        None => field("client_secret").unwrap_or_default().to_owned(),
    };
    if field("grant_type") != Some("client_credentials") {
        return Err(Error::bad(
            "only the client_credentials grant is served: set GLOBUS_COMPUTE_CLIENT_ID and \
             GLOBUS_COMPUTE_CLIENT_SECRET",
        ));
    }
    if !c.accepts(&secret) {
        return Err(Error::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "wrong client secret: set GLOBUS_COMPUTE_CLIENT_SECRET to the token in the node's \
             globus-compute.json (`funcmesh compat env` prints the settings)",
        ));
    }
    // One token per resource server asked for: this API's (SDK 4) and, for `openid` and its
    // kin, Globus Auth's own (SDK 2.x asks for both). Nothing asked for: this API's.
    let mut servers: Vec<(&str, Vec<&str>)> = Vec::new();
    for scope in field("scope").unwrap_or(COMPUTE_SCOPE).split_whitespace() {
        let server = if scope == COMPUTE_SCOPE {
            RESOURCE_SERVER
        } else if matches!(scope, "openid" | "profile" | "email")
            || scope.starts_with("urn:globus:auth:scope:auth.globus.org:")
        {
            "auth.globus.org"
        } else {
            return Err(Error::bad(format!(
                "unknown scope `{scope}`: this node serves Globus Compute's ({COMPUTE_SCOPE})"
            )));
        };
        match servers.iter_mut().find(|(s, _)| *s == server) {
            Some((_, scopes)) => {
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
            None => servers.push((server, vec![scope])),
        }
    }
    if servers.is_empty() {
        servers.push((RESOURCE_SERVER, vec![COMPUTE_SCOPE]));
    }
    servers.sort_by_key(|(s, _)| *s != RESOURCE_SERVER);
    let tokens: Vec<Value> = servers
        .iter()
        .map(|(server, scopes)| {
            json!({
                "access_token": c.token,
                "token_type": "Bearer",
                "expires_in": 365 * 24 * 3600,
                "resource_server": server,
                "scope": scopes.join(" "),
            })
        })
        .collect();
    let mut first = tokens[0].clone();
    first["other_tokens"] = Value::Array(tokens[1..].to_vec());
    Ok(Json(first))
}

/// `a=b&c=d` with `+` and `%XX` decoded.
fn form_fields(body: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
                    match (hex(b[i + 1]), hex(b[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push(h << 4 | l);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `GET /v2/version`.
async fn version() -> Json<Value> {
    Json(json!({
        "api": "1.0.0",
        "min_sdk_version": "1.0.0",
        "min_ep_version": "1.0.0",
        "min_endpoint_version": "1.0.0",
        "funcmesh": env!("CARGO_PKG_VERSION"),
    }))
}

/// `POST /v3/functions` (and `/v2/functions`, whose `metadata` is v3's `meta`).
#[derive(Debug, Deserialize)]
struct NewFunction {
    function_name: String,
    function_code: String,
    #[serde(default = "yes")]
    serialized: bool,
    #[serde(default)]
    description: Option<String>,
}

fn yes() -> bool {
    true
}

async fn register_function(
    State(c): State<Shared>,
    Body(f): Body<NewFunction>,
) -> Result<Json<Value>, Error> {
    let code = if f.serialized {
        wire::check_function_code(&f.function_code)
            .map_err(|e| Error::bad(format!("function_code: {e}")))?;
        f.function_code
    } else {
        wire::source_function_code(&f.function_name, &f.function_code)
    };
    let new = crate::registry::NewFunction {
        name: f.function_name,
        python: Some(wire::function_source(&code)),
        entrypoint: Some(wire::ENTRYPOINT.into()),
        payload: None,
        shell: None,
        container: None,
        description: f.description.unwrap_or_default(),
    };
    let written = crate::api::register(&c.api, new).await?;
    Ok(Json(json!({ "function_uuid": wire::uuid(&written.id) })))
}

/// The function named by a UUID.
async fn find_function(c: &Compat, id: &str) -> Result<crdt_registry::Function, Error> {
    let hex = wire::from_uuid(id).map_err(Error::bad)?;
    let view = c.api.mesh.registry().await.map_err(Error::unavailable)?;
    view.functions
        .get(&hex)
        .cloned()
        .ok_or_else(|| Error::not_found(format!("no function {id} in the registry")))
}

/// `GET /v2/functions/{id}`: a funcmesh function as the SDK describes one; a funcmesh Python
/// function that is not a Globus Compute one is given as source (`st`) or as a pickle (`01`).
async fn function(State(c): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, Error> {
    use crdt_registry::record::FunctionSpec;
    let f = find_function(&c, &id).await?;
    let code = match &f.record.spec {
        FunctionSpec::PythonSource { source, entrypoint } => wire::function_code_of(source)
            .unwrap_or_else(|| wire::source_function_code(entrypoint, source)),
        FunctionSpec::PythonPayload { payload } => wire::pack(&[&format!("01\n{payload}")]),
        _ => String::new(),
    };
    Ok(Json(json!({
        "function_uuid": wire::uuid(&f.id),
        "function_name": f.record.name,
        "function_code": code,
        "description": f.record.description,
        "metadata": { "funcmesh_kind": f.record.kind, "owner": f.owner_peer },
    })))
}

async fn delete_function(
    State(c): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let hex = wire::from_uuid(&id).map_err(Error::bad)?;
    crate::api::delete_function_by_id(&c.api, &hex).await?;
    Ok(Json(json!({ "result": 302 })))
}

/// An endpoint as the SDK describes one.
fn endpoint_doc(e: &crdt_registry::Endpoint) -> Value {
    json!({
        "uuid": wire::uuid(&e.id),
        "name": e.record.name,
        "display_name": e.record.name,
        "description": e.record.description,
        "owner": e.peer_id,
        "institution": e.institution,
        "public": e.record.public,
        "multi_user": false,
    })
}

async fn endpoints(State(c): State<Shared>) -> Result<Json<Vec<Value>>, Error> {
    let view = c.api.mesh.registry().await.map_err(Error::unavailable)?;
    Ok(Json(view.endpoints.values().map(endpoint_doc).collect()))
}

async fn find_endpoint(c: &Compat, id: &str) -> Result<crdt_registry::Endpoint, Error> {
    let hex = wire::from_uuid(id).map_err(Error::bad)?;
    let view = c.api.mesh.registry().await.map_err(Error::unavailable)?;
    view.endpoints
        .get(&hex)
        .cloned()
        .ok_or_else(|| Error::not_found(format!("no endpoint {id} in the registry")))
}

async fn endpoint(State(c): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, Error> {
    Ok(Json(endpoint_doc(&find_endpoint(&c, &id).await?)))
}

/// `GET /v2/endpoints/{id}/status`: online while its node advertises it.
async fn endpoint_status(
    State(c): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let e = find_endpoint(&c, &id).await?;
    let adverts = c
        .api
        .tasks
        .dispatcher
        .adverts()
        .await
        .map_err(Error::unavailable)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let load = adverts.iter().find_map(|(peer, a)| {
        (peer.to_string() == e.peer_id
            && now_ms.saturating_sub(a.at_ms) <= c.lost_after.as_millis() as u64)
            .then(|| a.endpoints.iter().find(|l| l.name == e.record.name))
            .flatten()
    });
    Ok(Json(match load {
        Some(l) => json!({
            "status": "online",
            "details": {
                "total_workers": l.max_workers,
                "idle_workers": l.idle,
                "pending_tasks": l.queued,
                "outstanding_tasks": l.queued,
                "managers": 1,
            },
        }),
        None => json!({ "status": "offline" }),
    }))
}

/// `POST /v3/endpoints/{id}/submit`.
#[derive(Debug, Deserialize)]
struct Submit {
    tasks: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    create_queue: bool,
    #[serde(default)]
    task_group_id: Option<String>,
    #[serde(default)]
    result_serializers: Option<Vec<String>>,
}

async fn submit(
    State(c): State<Shared>,
    Path(ep): Path<String>,
    Body(s): Body<Submit>,
) -> Result<Json<Value>, Error> {
    let endpoint = find_endpoint(&c, &ep).await?;
    let group = match &s.task_group_id {
        Some(g) => wire::from_uuid(g).map_err(|e| Error::bad(format!("task_group_id: {e}")))?,
        None => hex::encode(rand::random::<[u8; 16]>()),
    };
    // Everything the request says is checked before anything is submitted.
    let view = c.api.mesh.registry().await.map_err(Error::unavailable)?;
    let mut plan = Vec::new();
    for (fid, payloads) in &s.tasks {
        let hex = wire::from_uuid(fid).map_err(Error::bad)?;
        if !view.functions.contains_key(&hex) {
            return Err(Error::not_found(format!(
                "no function {fid} in the registry: register it first"
            )));
        }
        for (i, p) in payloads.iter().enumerate() {
            wire::check_payload(p)
                .map_err(|e| Error::bad(format!("function {fid}, task {i}: {e}")))?;
            plan.push((
                fid.clone(),
                hex.clone(),
                p.clone(),
                compute::TaskId::random(),
            ));
        }
    }
    drop(view);
    if plan.is_empty() {
        return Err(Error::bad("the request has no tasks"));
    }
    let queue = format!("{}{}", c.queue_prefix, wire::uuid(&group));
    if s.create_queue {
        let Some(broker) = &c.broker else {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                "AMQP_NOT_CONFIGURED",
                "this node has no broker for results, which the SDK's Executor needs: set \
                 [compat] amqp_url to a RabbitMQ (Client.run and get_result work without one)",
            ));
        };
        broker.declare(&queue).await.map_err(Error::unavailable)?;
    }
    // The group and the owed messages are written before the tasks exist, so that no finish
    // can be missed.
    let mut ops = Vec::new();
    for (_, _, _, tid) in &plan {
        let t = tid.as_str();
        let member = format!("{}{t}", keys::group_prefix(&group)).into_bytes();
        ops.push((keys::CF, member, Some(Vec::new())));
        ops.push((keys::CF, keys::task(t), Some(group.clone().into_bytes())));
        if s.create_queue {
            ops.push((keys::CF, keys::queued(t), Some(queue.clone().into_bytes())));
        }
    }
    let store = c.api.store.clone();
    tokio::task::spawn_blocking(move || store.batch(&ops))
        .await
        .map_err(Error::unavailable)?
        .map_err(Error::unavailable)?;
    let tasks: Vec<crate::tasks::NewTask> = plan
        .iter()
        .map(|(_, hex, payload, tid)| {
            let mut args = vec![Value::String(payload.clone())];
            if let Some(r) = &s.result_serializers {
                args.push(json!(r));
            }
            crate::tasks::NewTask {
                function: hex.clone(),
                args: Value::Array(args),
                endpoint: Some(endpoint.id.clone()),
                id: Some(tid.clone()),
                ..Default::default()
            }
        })
        .collect();
    let answers = crate::tasks::submit(&c.api.mesh, &c.api.tasks.dispatcher, &c.api.values, tasks)
        .await
        .map_err(Error::unavailable)?;
    if let Some(refused) = answers.iter().find_map(|a| a.as_ref().err()) {
        // All or nothing, as the SDK expects: the accepted ones are cancelled, and nothing of
        // the request is kept (no group, no messages owed).
        for a in answers.iter().flatten() {
            let _ = c.api.tasks.dispatcher.cancel(a.id.clone()).await;
        }
        let mut forget = Vec::new();
        for (_, _, _, tid) in &plan {
            let t = tid.as_str();
            let member = format!("{}{t}", keys::group_prefix(&group)).into_bytes();
            forget.push((keys::CF, member, None));
            forget.push((keys::CF, keys::task(t), None));
            forget.push((keys::CF, keys::queued(t), None));
        }
        let store = c.api.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.batch(&forget)).await;
        let status = match refused.kind {
            "function" => StatusCode::NOT_FOUND,
            "no_route" => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        return Err(Error::new(
            status,
            "TASK_REFUSED",
            format!("the tasks were not submitted: {}", refused.message),
        ));
    }
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (fid, _, _, tid) in &plan {
        ids.entry(fid.clone())
            .or_default()
            .push(wire::uuid(tid.as_str()));
    }
    Ok(Json(json!({
        "request_id": wire::uuid(&hex::encode(rand::random::<[u8; 16]>())),
        "task_group_id": wire::uuid(&group),
        "endpoint_id": wire::uuid(&endpoint.id),
        "tasks": ids,
    })))
}

async fn task(State(c): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, Error> {
    let hex = wire::from_uuid(&id).map_err(Error::bad)?;
    c.task_docs(&[hex])
        .await?
        .pop()
        .flatten()
        .map(Json)
        .ok_or_else(|| Error::not_found(format!("no task {id} was submitted through this node")))
}

#[derive(Debug, Deserialize)]
struct BatchStatus {
    task_ids: Vec<String>,
}

/// `POST /v2/batch_status`: the documents of the tasks this node knows, by the ids as sent.
async fn batch_status(
    State(c): State<Shared>,
    Body(b): Body<BatchStatus>,
) -> Result<Json<Value>, Error> {
    let hexes = b
        .task_ids
        .iter()
        .map(|id| wire::from_uuid(id).map_err(Error::bad))
        .collect::<Result<Vec<_>, _>>()?;
    let mut results = serde_json::Map::new();
    for (id, doc) in b.task_ids.iter().zip(c.task_docs(&hexes).await?) {
        if let Some(doc) = doc {
            results.insert(id.clone(), doc);
        }
    }
    Ok(Json(json!({ "response": "batch", "results": results })))
}

/// `GET /v2/taskgroup/{id}`: the group's tasks.
async fn task_group(State(c): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, Error> {
    let hex = wire::from_uuid(&id).map_err(Error::bad)?;
    let prefix = keys::group_prefix(&hex);
    let store = c.api.store.clone();
    let p = prefix.clone();
    let keys = tokio::task::spawn_blocking(move || store.scan_keys(keys::CF, p.as_bytes()))
        .await
        .map_err(Error::unavailable)?
        .map_err(Error::unavailable)?;
    if keys.is_empty() {
        return Err(Error::not_found(format!("no task group {id} on this node")));
    }
    let tasks: Vec<Value> = keys
        .iter()
        .filter_map(|k| {
            std::str::from_utf8(k)
                .ok()?
                .strip_prefix(&prefix)
                .map(str::to_owned)
        })
        .map(|t| json!({ "id": wire::uuid(&t) }))
        .collect();
    Ok(Json(
        json!({ "taskgroup_id": wire::uuid(&hex), "tasks": tasks }),
    ))
}

/// `GET /v2/get_amqp_result_connection_url`.
async fn amqp_url(State(c): State<Shared>) -> Result<Json<Value>, Error> {
    match &c.client_url {
        Some(url) => Ok(Json(json!({
            "connection_url": url,
            "queue_prefix": c.queue_prefix,
        }))),
        None => Err(Error::new(
            StatusCode::BAD_REQUEST,
            "AMQP_NOT_CONFIGURED",
            "this node has no broker for results, which the SDK's Executor needs: set [compat] \
             amqp_url to a RabbitMQ (Client.run and get_result work without one)",
        )),
    }
}

/// The environment that points the SDK at this API: `NAME=value` lines. The SDK's `local`
/// environment has the web service at `localhost:5000`, fixed; Globus Auth is wherever
/// `GLOBUS_SDK_SERVICE_URL_AUTH` says (here, this API). (SDK 2.x reads the id and secret from
/// `FUNCX_SDK_CLIENT_ID` and `FUNCX_SDK_CLIENT_SECRET`.)
pub fn environment(c: &Credentials) -> Vec<String> {
    vec![
        "GLOBUS_SDK_ENVIRONMENT=local".into(),
        format!("GLOBUS_SDK_SERVICE_URL_AUTH={}/", c.url),
        format!("GLOBUS_COMPUTE_CLIENT_ID={}", c.client_id),
        format!("GLOBUS_COMPUTE_CLIENT_SECRET={}", c.token),
    ]
}

/// Reads this API's credentials from the data dir, making them on first use.
pub(crate) fn credentials(dir: &crate::DataDir, addr: SocketAddr) -> anyhow::Result<Credentials> {
    let path = dir.root().join("globus-compute.json");
    let fresh_id = || wire::uuid(&hex::encode(rand::random::<[u8; 16]>()));
    let (client_id, token) = match crate::datadir::read_json::<Credentials>(&path) {
        Ok(c) if c.client_id.is_empty() => (fresh_id(), c.token),
        Ok(c) => (c.client_id, c.token),
        Err(_) => (fresh_id(), hex::encode(rand::random::<[u8; 24]>())),
    };
    let c = Credentials {
        client_id,
        token,
        url: format!("http://{addr}"),
    };
    crate::datadir::write_json_atomic(&path, &c, 0o600)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // A token request's body is anyone's text: decoding it never panics.
        #[test]
        fn any_form_body_decodes(s in "\\PC{0,100}") {
            let _ = form_fields(&s);
        }
    }

    #[test]
    fn form_fields_are_decoded() {
        let f = form_fields("grant_type=client_credentials&scope=a%2Fb+c&x&bad=%zz&end=%4");
        assert_eq!(
            f,
            vec![
                ("grant_type".into(), "client_credentials".into()),
                ("scope".into(), "a/b c".into()),
                ("x".into(), String::new()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%4".into()),
            ]
        );
    }
}
