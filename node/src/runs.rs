//! Flow runs on this node: the providers its engine has, and a definition's check against
//! them. The engine itself is `flows::engine`; the API's `/v1/flows/validate` and `/v1/runs`
//! and the CLI's `funcmesh flow` use what is here.

use serde::Serialize;

mod compute_actions;
mod flow;
mod http;
mod transfer_actions;

pub use compute_actions::{COMPUTE_URLS, ComputeProvider, MAX_ACTION_TASKS};
pub use flow::{FLOWS_URL, FlowProvider};
pub use http::HttpProvider;
pub use transfer_actions::{TRANSFER_BASES, TRANSFER_OPS, TransferProvider, root_path};

/// The action providers flow definitions are checked against where no node is at hand
/// (`funcmesh flow validate` without `--node`): the built-ins, and the URLs a node's own
/// providers answer (compute).
pub fn providers() -> flows::provider::Providers {
    let mut p = flows::provider::Providers::builtin();
    let none: std::sync::Arc<dyn flows::provider::Provider> =
        std::sync::Arc::new(flows::provider::ExpressionEval);
    for url in COMPUTE_URLS {
        // Only `knows` is asked of these.
        p.add(url, none.clone());
    }
    p.add_prefix(FLOWS_URL, none.clone());
    for base in TRANSFER_BASES {
        for op in TRANSFER_OPS {
            p.add(&format!("{base}/{op}"), none.clone());
        }
    }
    p
}

/// The external action providers `[flows]` lists, each with its bearer token when one is
/// configured (read from its file now).
pub(crate) fn external_providers(
    flows: &crate::config::FlowsSection,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    flows
        .action_providers
        .iter()
        .map(|url| {
            let token = match flows.action_provider_token_files.get(url) {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "flows.action_provider_token_files: cannot read {} (for \
                                 {url}): {e}",
                                file.display()
                            )
                        })?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            Ok((url.clone(), token))
        })
        .collect()
}

/// The action providers of a node's flow engine: the built-ins, compute on the mesh, and
/// transfer on endpoints' data roots.
pub(crate) fn node_providers(
    mesh: &mesh::Handle,
    own: &mesh::membership::Member,
    tasks: &compute::service::Tasks,
    values: &compute::blobs::Values,
    transfers: &std::sync::Arc<crate::transfers::Transfers>,
    engine: &std::sync::Arc<std::sync::OnceLock<flows::engine::WeakEngine>>,
    external: &[(String, Option<String>)],
) -> flows::provider::Providers {
    let mut p = flows::provider::Providers::builtin();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    for (url, token) in external {
        p.add(
            url,
            std::sync::Arc::new(HttpProvider {
                base: url.trim_end_matches('/').to_string(),
                http: http.clone(),
                token: token.clone(),
            }),
        );
    }
    p.add_prefix(
        FLOWS_URL,
        std::sync::Arc::new(FlowProvider {
            mesh: mesh.clone(),
            own: own.clone(),
            access: tasks.access.clone(),
            engine: engine.clone(),
        }),
    );
    let rights = crate::run_rights::Rights {
        starters: crate::run_rights::Starters::new(transfers.store.clone()),
        access: tasks.access.clone(),
        own: own.clone(),
        me: mesh.peer_id(),
    };
    let compute: std::sync::Arc<dyn flows::provider::Provider> =
        std::sync::Arc::new(ComputeProvider::new(
            mesh.clone(),
            tasks.dispatcher.clone(),
            values.clone(),
            rights.clone(),
        ));
    for url in COMPUTE_URLS {
        p.add(url, compute.clone());
    }
    for op in TRANSFER_OPS {
        let provider: std::sync::Arc<dyn flows::provider::Provider> =
            std::sync::Arc::new(TransferProvider {
                op,
                transfers: transfers.clone(),
                rights: rights.clone(),
                held: Held::default(),
            });
        for base in TRANSFER_BASES {
            p.add(&format!("{base}/{op}"), provider.clone());
        }
    }
    p
}

/// A definition that passed the check.
#[derive(Debug, Clone, Serialize)]
pub struct Validated {
    /// Always true (a definition that fails is an error).
    pub valid: bool,
    /// How many states it has at its top level.
    pub states: usize,
    /// The action URLs it uses.
    pub action_urls: Vec<String>,
}

/// Reads and checks `definition`, its action URLs against `providers`. The error names the
/// state and the field.
pub fn validate(
    definition: &serde_json::Value,
    providers: &flows::provider::Providers,
) -> Result<Validated, String> {
    let def = flows::definition::Definition::parse(definition).map_err(|e| e.to_string())?;
    def.check_actions(&|u| providers.knows(u))
        .map_err(|e| e.to_string())?;
    Ok(Validated {
        valid: true,
        states: def.states.len(),
        action_urls: def.action_urls().into_iter().collect(),
    })
}

/// A deployed flow by id, id prefix (6 characters or more) or title.
pub fn find_flow<'a>(
    view: &'a crdt_registry::View,
    query: &str,
) -> Result<&'a crdt_registry::Flow, String> {
    if let Some(f) = view.flows.get(query) {
        return Ok(f);
    }
    let matches: Vec<&crdt_registry::Flow> = view
        .flows
        .values()
        .filter(|f| (query.len() >= 6 && f.id.starts_with(query)) || f.record.title == query)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "no deployed flow has id or title `{query}` (`funcmesh flow list` shows them)"
        )),
        many => Err(format!(
            "`{query}` names {} flows: give its id ({})",
            many.len(),
            many.iter()
                .map(|f| f.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether this node may run `flow`: a flow of its own institution, or another institution's
/// flow for which this node holds that institution's `flow.run` grant (`funcmesh cap grant
/// --flow`), valid now and not revoked. The run then acts with this node's own rights.
pub fn may_run(
    view: &crdt_registry::View,
    flow: &crdt_registry::Flow,
    own: &mesh::membership::Member,
    access: &compute::access::Access,
) -> Result<(), String> {
    let owner = view.nodes.get(&flow.owner_peer);
    let theirs = owner.and_then(|n| n.institution.clone());
    let their_key = owner.and_then(|n| n.institution_key);
    let our_key = own.institution_key.map(|k| crdt_registry::Key(k.0));
    if their_key.is_some() && their_key == our_key {
        return Ok(());
    }
    let Some(root) = their_key else {
        return Err(format!(
            "flow {} was deployed by a node the registry does not list with an institution: \
             it cannot be run here",
            flow.id
        ));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let req = capability::Request {
        peer: String::new(),
        institution: root,
        time: now,
        endpoint: flow.id.clone(),
        function: None,
        ability: capability::Ability::FlowRun,
        path: None,
    };
    access
        .token_allowing(&flow.id, &root, req)
        .map(|_| ())
        .map_err(|why| {
            format!(
                "flow {} belongs to institution {}: running it needs that institution's \
                 flow.run grant (`funcmesh cap grant --flow {} --to institution:YOURS`, then \
                 `funcmesh cap add`): {why}",
                flow.id,
                theirs.as_deref().unwrap_or("(unknown)"),
                flow.id
            )
        })
}

/// An action waiting for a right its node does not hold: INACTIVE, with what was refused and
/// what to do (the run resumes after `funcmesh cap add` and `funcmesh flow resume`).
fn needs_right(request: &flows::provider::Request, why: &str) -> flows::provider::Action {
    let mut action = flows::provider::Action::done(
        request,
        true,
        serde_json::json!({
            "code": "AuthorizationRequired",
            "description": format!(
                "{why} — add a grant that covers it (`funcmesh cap add TOKEN`), then resume the \
                 run (`funcmesh flow resume RUN`)"
            ),
        }),
    );
    action.status = flows::provider::Status::Inactive;
    action.display_status = Some("INACTIVE".into());
    action.completion_time = None;
    action
}

/// Whether a refusal is about rights (a missing or refused capability), which a grant fixes.
fn about_rights(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("access denied") || m.contains("capabilit") || m.contains("forbidden")
}

/// The actions a provider started and still follows (by action id: its request and what it
/// started, task or job ids), and how often each was resumed: a resumed action starts again
/// under new ids, its refused ones kept as they ended. In memory: after a restart the engine
/// asks again under the same request id and the provider finds what it started by that id.
#[derive(Debug)]
struct Held<T> {
    actions: std::sync::Mutex<std::collections::HashMap<String, (flows::provider::Request, T)>>,
    resumed: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            actions: Default::default(),
            resumed: Default::default(),
        }
    }
}

impl<T: Clone> Held<T> {
    fn hold(&self, request: &flows::provider::Request, started: T) {
        lock(&self.actions).insert(request.request_id.clone(), (request.clone(), started));
    }

    fn get(&self, action_id: &str) -> Option<(flows::provider::Request, T)> {
        lock(&self.actions).get(action_id).cloned()
    }

    /// The request of `action_id` and what it started, or `ActionNotFound` naming the `kind`
    /// of action this provider runs.
    fn known(
        &self,
        action_id: &str,
        kind: &str,
    ) -> Result<(flows::provider::Request, T), flows::provider::Refusal> {
        self.get(action_id).ok_or_else(|| {
            flows::provider::Refusal::not_found(format!(
                "no {kind} action {action_id} on this node"
            ))
        })
    }

    fn forget(&self, action_id: &str) {
        lock(&self.actions).remove(action_id);
    }

    /// Counts a resume of `action_id`.
    fn resume(&self, action_id: &str) {
        *lock(&self.resumed)
            .entry(action_id.to_string())
            .or_default() += 1;
    }

    /// How often `request_id` was resumed (0: never).
    fn generation(&self, request_id: &str) -> u32 {
        lock(&self.resumed).get(request_id).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
