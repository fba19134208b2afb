//! The local HTTP API (`/v1`), bound to loopback by default and protected by the bearer token the
//! node writes into `api.json`. The CLI, the SDK and the dashboard all use it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::daemon::Inner;

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

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type Shared = Arc<Inner>;

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    inner: Shared,
    cancel: CancellationToken,
) {
    let app = router(inner);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "API server failed");
    }
}

fn router(inner: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        // Everything above needs the token; the OpenAPI document below does not.
        .route_layer(middleware::from_fn_with_state(inner.clone(), auth))
        .route("/v1/openapi.json", get(openapi))
        .with_state(inner)
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

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
