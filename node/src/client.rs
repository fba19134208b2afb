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
        let http = reqwest::Client::builder().build().context("HTTP client")?;
        Ok(Client {
            info,
            dir: dir.clone(),
            http,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn call<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        self.call_within(method, path, body, Duration::from_secs(10))
            .await
    }

    async fn call_within<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.info.url);
        let mut req = self
            .http
            .request(method, &url)
            .timeout(timeout)
            .bearer_auth(&self.info.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
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
        checked(resp)
            .await?
            .json()
            .await
            .with_context(|| format!("unexpected answer from {url}"))
    }

    /// `GET /metrics`: the node's metrics, Prometheus' text format.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.info.url);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .bearer_auth(&self.info.token)
            .send()
            .await
            .with_context(|| format!("request to {url} failed: is the node running?"))?;
        checked(resp)
            .await?
            .text()
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

    /// `GET /v1/registry`.
    pub async fn registry_status(&self) -> anyhow::Result<mesh::registry::Status> {
        self.get("/v1/registry").await
    }

    /// `GET /v1/functions`.
    pub async fn functions(&self) -> anyhow::Result<Vec<crdt_registry::Function>> {
        self.get("/v1/functions").await
    }

    /// `GET /v1/functions/{id}` (id, id prefix or name).
    pub async fn function(&self, query: &str) -> anyhow::Result<crdt_registry::Function> {
        self.get(&format!("/v1/functions/{}", encode(query))).await
    }

    /// `DELETE /v1/functions/{id}`.
    pub async fn delete_function(&self, query: &str) -> anyhow::Result<crate::api::Written> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/functions/{}", encode(query)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/functions`.
    pub async fn register_function(
        &self,
        f: &crate::registry::NewFunction,
    ) -> anyhow::Result<crate::api::Written> {
        self.post("/v1/functions", f).await
    }

    /// `GET /v1/endpoints`.
    pub async fn endpoints(&self) -> anyhow::Result<Vec<crdt_registry::Endpoint>> {
        self.get("/v1/endpoints").await
    }

    /// `GET /v1/endpoints/{id}` (id, id prefix or name).
    pub async fn endpoint(&self, query: &str) -> anyhow::Result<crdt_registry::Endpoint> {
        self.get(&format!("/v1/endpoints/{}", encode(query))).await
    }

    /// `POST /v1/tasks`: submits tasks; with `wait`, waits that long for their results.
    pub async fn submit_tasks(
        &self,
        tasks: Vec<crate::tasks::NewTask>,
        wait: Duration,
    ) -> anyhow::Result<crate::api::TaskList> {
        let body = crate::tasks::SubmitBody {
            tasks,
            wait_ms: wait.as_millis() as u64,
        };
        self.call_within(
            reqwest::Method::POST,
            "/v1/tasks",
            Some(&body),
            wait + Duration::from_secs(30),
        )
        .await
    }

    /// `GET /v1/adverts`.
    pub async fn adverts(&self) -> anyhow::Result<Vec<crate::api::NodeAdvert>> {
        self.get("/v1/adverts").await
    }

    /// `POST /v1/tasks/wait`.
    pub async fn wait_tasks(
        &self,
        ids: Vec<String>,
        wait: Duration,
    ) -> anyhow::Result<crate::api::TaskList> {
        let body = crate::api::WaitBody {
            ids,
            timeout_ms: wait.as_millis() as u64,
        };
        self.call_within(
            reqwest::Method::POST,
            "/v1/tasks/wait",
            Some(&body),
            wait + Duration::from_secs(30),
        )
        .await
    }

    /// `GET /v1/tasks/events`: the tasks submitted on the node, pushed as they finish, from now on.
    pub async fn task_events(&self) -> anyhow::Result<TaskEvents> {
        let url = format!("{}/v1/tasks/events", self.info.url);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.info.token)
            .send()
            .await
            .with_context(|| format!("request to {url} failed: is the node running?"))?;
        Ok(TaskEvents {
            body: Box::pin(checked(resp).await?.bytes_stream()),
            buf: Vec::new(),
        })
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn task(&self, id: &str) -> anyhow::Result<crate::tasks::TaskView> {
        self.get(&format!("/v1/tasks/{}", encode(id))).await
    }

    /// `POST /v1/tasks/{id}/cancel`.
    pub async fn cancel_task(&self, id: &str) -> anyhow::Result<crate::tasks::TaskView> {
        self.post(&format!("/v1/tasks/{}/cancel", encode(id)), &())
            .await
    }

    /// `GET /v1/transfers`.
    pub async fn transfers(&self) -> anyhow::Result<Vec<transfer::copy::Job>> {
        self.get("/v1/transfers").await
    }

    /// `GET /v1/transfers/{id}`.
    pub async fn transfer(&self, id: &str) -> anyhow::Result<transfer::copy::Job> {
        self.get(&format!("/v1/transfers/{}", encode(id))).await
    }

    /// `POST /v1/transfers`.
    pub async fn new_transfer(
        &self,
        t: &crate::transfers::NewTransfer,
    ) -> anyhow::Result<transfer::copy::Job> {
        self.call_within(
            reqwest::Method::POST,
            "/v1/transfers",
            Some(t),
            Duration::from_secs(120),
        )
        .await
    }

    /// `POST /v1/transfers/{id}/cancel`.
    pub async fn cancel_transfer(&self, id: &str) -> anyhow::Result<transfer::copy::Job> {
        self.post(&format!("/v1/transfers/{}/cancel", encode(id)), &())
            .await
    }

    /// `GET /v1/transfers/ls?path=`.
    pub async fn ls(&self, path: &str) -> anyhow::Result<Vec<transfer::root::Entry>> {
        self.get(&format!("/v1/transfers/ls?path={}", encode(path)))
            .await
    }

    /// `GET /v1/transfers/shares`.
    pub async fn shares(&self, endpoint: &str) -> anyhow::Result<Vec<crate::transfers::Share>> {
        self.get(&format!(
            "/v1/transfers/shares?endpoint={}",
            encode(endpoint)
        ))
        .await
    }

    /// `POST /v1/transfers/shares`.
    pub async fn share(
        &self,
        new: &crate::transfers::NewShare,
    ) -> anyhow::Result<crate::transfers::Share> {
        self.post("/v1/transfers/shares", new).await
    }

    /// `POST /v1/transfers/unshare`.
    pub async fn unshare(
        &self,
        endpoint: &str,
        id: &str,
    ) -> anyhow::Result<crate::transfers::Share> {
        self.post(
            "/v1/transfers/unshare",
            &crate::transfers::Unshare {
                endpoint: endpoint.to_owned(),
                id: id.to_owned(),
            },
        )
        .await
    }

    /// `POST /v1/transfers/mkdir` or `/rm`.
    pub async fn path_op(
        &self,
        op: &str,
        path: &str,
        recursive: bool,
    ) -> anyhow::Result<serde_json::Value> {
        self.post(
            &format!("/v1/transfers/{op}"),
            &crate::transfers::PathOp {
                path: path.to_owned(),
                recursive,
            },
        )
        .await
    }

    /// `POST /v1/blobs` with the file at `path` as the body.
    pub async fn put_blob(&self, path: &std::path::Path) -> anyhow::Result<crate::api::BlobRef> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        let url = format!("{}/v1/blobs", self.info.url);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.info.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
            ))
            .send()
            .await
            .with_context(|| format!("request to {url} failed: is the node running?"))?;
        checked(resp)
            .await?
            .json()
            .await
            .with_context(|| format!("unexpected answer from {url}"))
    }

    /// `GET /v1/blobs/{hash}` into `out` (written to a temporary name, then renamed); returns
    /// the bytes written.
    pub async fn get_blob(
        &self,
        hash: &str,
        from: Option<&str>,
        out: &std::path::Path,
    ) -> anyhow::Result<u64> {
        let mut url = format!("{}/v1/blobs/{}", self.info.url, encode(hash));
        if let Some(f) = from {
            url.push_str(&format!("?from={}", encode(f)));
        }
        self.download(&url, Some(out)).await
    }

    /// `GET /v1/tasks/{id}/value` into `out`, or to stdout; returns the bytes written.
    pub async fn task_value(&self, id: &str, out: Option<&std::path::Path>) -> anyhow::Result<u64> {
        let url = format!("{}/v1/tasks/{}/value", self.info.url, encode(id));
        self.download(&url, out).await
    }

    /// The body of `GET url` into `out` (a temporary name, then renamed), or to stdout.
    async fn download(&self, url: &str, out: Option<&std::path::Path>) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt as _;
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.info.token)
            .send()
            .await
            .with_context(|| format!("request to {url} failed: is the node running?"))?;
        let mut resp = checked(resp).await?;
        let mut n = 0u64;
        let Some(out) = out else {
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = resp.chunk().await.context("reading the answer")? {
                stdout.write_all(&chunk).await?;
                n += chunk.len() as u64;
            }
            stdout.write_all(b"\n").await?;
            stdout.flush().await?;
            return Ok(n);
        };
        let tmp = out.with_extension("funcmesh-part");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        while let Some(chunk) = resp.chunk().await.context("reading the answer")? {
            file.write_all(&chunk).await?;
            n += chunk.len() as u64;
        }
        file.sync_all().await?;
        tokio::fs::rename(&tmp, out).await?;
        Ok(n)
    }

    /// `POST /v1/flows/validate`.
    pub async fn validate_flow(
        &self,
        definition: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.post(
            "/v1/flows/validate",
            &serde_json::json!({ "definition": definition }),
        )
        .await
    }

    /// `POST /v1/flows`.
    pub async fn deploy_flow(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.post("/v1/flows", body).await
    }

    /// `GET /v1/flows`.
    pub async fn flows(&self) -> anyhow::Result<Vec<crdt_registry::Flow>> {
        self.get("/v1/flows").await
    }

    /// `GET /v1/flows/{id}`: a deployed flow by id, id prefix or title.
    pub async fn flow(&self, query: &str) -> anyhow::Result<crdt_registry::Flow> {
        self.get(&format!("/v1/flows/{}", encode(query))).await
    }

    /// `POST /v1/runs`.
    pub async fn start_run(&self, body: &serde_json::Value) -> anyhow::Result<flows::engine::Run> {
        self.post("/v1/runs", body).await
    }

    /// `GET /v1/runs`.
    pub async fn runs(&self) -> anyhow::Result<Vec<flows::engine::Run>> {
        self.get("/v1/runs").await
    }

    /// `GET /v1/runs/{id}`.
    pub async fn run(&self, id: &str) -> anyhow::Result<flows::engine::Run> {
        self.get(&format!("/v1/runs/{id}")).await
    }

    /// `GET /v1/runs/{id}/log`.
    pub async fn run_log(&self, id: &str) -> anyhow::Result<Vec<flows::engine::Event>> {
        self.get(&format!("/v1/runs/{id}/log")).await
    }

    /// `GET /v1/runs/{id}?at=NODE`: a run here, or hosted by node `at`.
    pub async fn run_at(&self, id: &str, at: Option<&str>) -> anyhow::Result<flows::engine::Run> {
        self.get(&format!("/v1/runs/{}{}", encode(id), at_query(at)))
            .await
    }

    /// `GET /v1/runs/{id}/log?at=NODE`.
    pub async fn run_log_at(
        &self,
        id: &str,
        at: Option<&str>,
    ) -> anyhow::Result<Vec<flows::engine::Event>> {
        self.get(&format!("/v1/runs/{}/log{}", encode(id), at_query(at)))
            .await
    }

    /// `POST /v1/runs/{id}/cancel?at=NODE` or `/resume`.
    pub async fn run_op_at(
        &self,
        id: &str,
        op: &str,
        at: Option<&str>,
    ) -> anyhow::Result<flows::engine::Run> {
        self.post(
            &format!("/v1/runs/{}/{op}{}", encode(id), at_query(at)),
            &serde_json::json!({}),
        )
        .await
    }

    /// `POST /v1/runs/{id}/cancel` or `/resume`.
    pub async fn run_op(&self, id: &str, op: &str) -> anyhow::Result<flows::engine::Run> {
        self.post(&format!("/v1/runs/{id}/{op}"), &serde_json::json!({}))
            .await
    }

    /// `GET /v1/institutions`.
    pub async fn institutions(&self) -> anyhow::Result<Vec<crdt_registry::Institution>> {
        self.get("/v1/institutions").await
    }

    /// `GET /v1/capabilities`.
    pub async fn capabilities(&self) -> anyhow::Result<Vec<crate::capabilities::CapabilityView>> {
        self.get("/v1/capabilities").await
    }

    /// `POST /v1/capabilities`.
    pub async fn add_capability(
        &self,
        token: &str,
    ) -> anyhow::Result<crate::capabilities::CapabilityView> {
        self.post(
            "/v1/capabilities",
            &crate::capabilities::NewCapability {
                token: token.to_owned(),
            },
        )
        .await
    }

    /// `DELETE /v1/capabilities/{id}`.
    pub async fn remove_capability(
        &self,
        id: &str,
    ) -> anyhow::Result<crate::capabilities::NewCapability> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/capabilities/{}", encode(id)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/registry/entries`: an entry signed elsewhere.
    pub async fn insert_entry(&self, entry: &[u8]) -> anyhow::Result<crate::api::Written> {
        use base64::Engine as _;
        self.post(
            "/v1/registry/entries",
            &crate::api::SignedEntry {
                entry: base64::engine::general_purpose::STANDARD.encode(entry),
            },
        )
        .await
    }
}

/// Percent-encodes a path segment.
/// What `GET /v1/tasks/events` pushes.
#[derive(Debug)]
pub enum TaskEvent {
    /// A task finished.
    Finished(Box<crate::tasks::TaskView>),
    /// The stream fell behind and missed this many: ask for the tasks waited on.
    Lagged(u64),
}

/// The stream of [`Client::task_events`].
pub struct TaskEvents {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl TaskEvents {
    /// The next event; None when the node closed the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<TaskEvent>> {
        use futures::StreamExt as _;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let mut event = "message";
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = if e.trim() == "task" {
                            "task"
                        } else if e.trim() == "lagged" {
                            "lagged"
                        } else {
                            "other"
                        };
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                match event {
                    "task" => {
                        let view = serde_json::from_str(&data)
                            .context("the node pushed a task that does not parse")?;
                        return Ok(Some(TaskEvent::Finished(Box::new(view))));
                    }
                    "lagged" => {
                        let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                        return Ok(Some(TaskEvent::Lagged(v["missed"].as_u64().unwrap_or(0))));
                    }
                    // Keep-alive comments and anything newer than this client.
                    _ => continue,
                }
            }
            match self.body.next().await {
                Some(chunk) => self
                    .buf
                    .extend_from_slice(&chunk.context("the node's task events stream broke")?),
                None => return Ok(None),
            }
        }
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The response if the node accepted the call; otherwise the error it gave.
async fn checked(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body: Option<ErrorBody> = resp.json().await.ok();
    bail!(
        "node answered {status}: {}",
        body.map(|b| b.error).unwrap_or_else(|| "no details".into())
    )
}

/// `?at=NODE`, or nothing.
fn at_query(at: Option<&str>) -> String {
    at.map(|a| format!("?at={}", encode(a))).unwrap_or_default()
}
