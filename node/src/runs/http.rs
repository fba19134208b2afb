//! External action providers over HTTP (the Globus action-provider API).

/// An external action provider, over HTTP: the Globus action-provider API (`POST /run`, `GET
/// /{id}/status`, `POST /{id}/cancel|release|resume`), at a URL the node's configuration lists
/// (`[flows] action_providers`, with a bearer token from `action_provider_token_files`). Another
/// funcmesh node's deployed flows are such providers (`node::api::actions`).
pub struct HttpProvider {
    pub(super) base: String,
    pub(super) http: reqwest::Client,
    /// Sent as `Authorization: Bearer …`, when configured.
    pub(super) token: Option<String>,
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
