//! The client side of the local API, used by client commands (`status`, `peers`, …).

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;

use crate::api::{ErrorBody, Status};
use crate::datadir::{ApiInfo, DataDir};

/// A client for one node's API.
#[derive(Debug, Clone)]
pub struct Client {
    info: ApiInfo,
    dir: DataDir,
    http: reqwest::Client,
}

impl Client {
    /// Finds the node of `dir` through its `api.json`.
    pub fn for_node(dir: &DataDir) -> anyhow::Result<Client> {
        let info = dir.read_api()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("HTTP client")?;
        Ok(Client {
            info,
            dir: dir.clone(),
            http,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.info.url);
        let resp = self.http.get(&url).bearer_auth(&self.info.token).send().await.map_err(|e| {
            let hint = if e.is_connect() {
                format!(
                    "no node answers at {} (api.json of pid {} in {} may be stale): is the node running?",
                    self.info.url,
                    self.info.pid,
                    self.dir.root().display()
                )
            } else {
                format!("request to {url} failed: {e}")
            };
            anyhow::anyhow!(hint)
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body: Option<ErrorBody> = resp.json().await.ok();
            bail!(
                "node answered {status}: {}",
                body.map(|b| b.error).unwrap_or_else(|| "no details".into())
            );
        }
        resp.json()
            .await
            .with_context(|| format!("unexpected answer from {url}"))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> anyhow::Result<Status> {
        self.get("/v1/status").await
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> anyhow::Result<Vec<mesh::PeerInfo>> {
        self.get("/v1/peers").await
    }
}
