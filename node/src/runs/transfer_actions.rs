//! The transfer actions: copies, listings and other operations on endpoints' data roots, in
//! Globus transfer action shapes; `collection_info` and `manage_permission` (shares).

use super::{Held, about_rights, needs_right};

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
    pub(super) op: &'static str,
    pub(super) transfers: std::sync::Arc<crate::transfers::Transfers>,
    pub(super) rights: crate::run_rights::Rights,
    pub(super) held: Held<Vec<String>>,
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
        let known = self.held.known(action_id, "transfer");
        Box::pin(async move {
            let (request, ids) = known?;
            self.jobs(&request, &ids).await
        })
    }

    fn cancel(
        &self,
        action_id: &str,
    ) -> flows::provider::BoxFuture<'_, Result<flows::provider::Action, flows::provider::Refusal>>
    {
        let known = self.held.known(action_id, "transfer");
        Box::pin(async move {
            let (request, ids) = known?;
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
