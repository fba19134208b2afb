//! Runs for other nodes: a member starts a deployed flow on another node (one of the flow's
//! institution, or of its own), watches it and manages it, over the data plane's calls
//! (`transfer::files::Services`, service [`SERVICE`]). The host records who started each run,
//! with the principals its starter named as monitors and managers and the capability tokens it
//! delegated to the host, in the `flows` column family (`who/<run id>`), before the run starts.
//!
//! Who may do what, judged by the host with the caller's verified membership:
//! * start: a member of the host's institution; or of another institution, with that
//!   institution's `flow.run` grant for the flow (the flow must be the host institution's);
//! * status and log: the starter's institution, and the run's monitors and managers;
//! * cancel and resume: the starter's institution, and the run's managers.
//!
//! A run started by another institution's node acts with the rights its starter delegated,
//! never with the host's own: its actions are judged as that starter's
//! ([`crate::run_rights::Rights`], used by `runs::ComputeProvider` and `runs::TransferProvider`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::run_rights::{MAX_PRINCIPALS, Starter, Starters};

/// The service name runs are called under.
pub const SERVICE: &str = "runs";

/// What a call to [`SERVICE`] asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    /// Start a deployed flow.
    Start {
        /// The run's id (the same id from the same starter is the same run).
        run_id: String,
        /// The flow: id, id prefix or title.
        flow: String,
        /// The run's input.
        input: serde_json::Value,
        /// Its label.
        #[serde(default)]
        label: Option<String>,
        /// Who may see it (`institution:<key>`, `node:<peer id>`).
        #[serde(default)]
        monitors: Vec<String>,
        /// Who may see and manage it.
        #[serde(default)]
        managers: Vec<String>,
        /// Tokens delegated to the host for the run's actions.
        #[serde(default)]
        capabilities: Vec<String>,
        /// The starter's `flow.run` grant, when the flow is not its institution's.
        #[serde(default)]
        flow_token: Option<String>,
    },
    /// The run's summary.
    Status {
        /// The run.
        run_id: String,
    },
    /// The run's events.
    Log {
        /// The run.
        run_id: String,
    },
    /// Cancel it.
    Cancel {
        /// The run.
        run_id: String,
    },
    /// Resume it.
    Resume {
        /// The run.
        run_id: String,
    },
}

/// The host side: answers other members' calls about runs.
pub struct RunDesk {
    pub(crate) mesh: mesh::Handle,
    pub(crate) own: mesh::membership::Member,
    pub(crate) name: String,
    pub(crate) access: Arc<compute::access::Access>,
    pub(crate) runs: flows::engine::Engine,
    pub(crate) starters: Starters,
}

fn check_principals(what: &str, list: &[String]) -> Result<(), String> {
    if list.len() > MAX_PRINCIPALS {
        return Err(format!("at most {MAX_PRINCIPALS} {what}"));
    }
    for p in list {
        let ok = match p.strip_prefix("node:") {
            Some(peer) => peer.parse::<mesh::PeerId>().is_ok(),
            None => capability::institution_of_term(p).is_some(),
        };
        if !ok {
            return Err(format!(
                "{what}: {p:?} is not institution:<key> or node:<peer id>"
            ));
        }
    }
    Ok(())
}

impl RunDesk {
    fn institution_term(&self) -> Option<String> {
        self.own
            .institution_key
            .map(|k| capability::institution_term(&crdt_registry::Key(k.0)))
    }

    /// Starts a run of a deployed flow for `peer` (this node, or a member calling in).
    pub(crate) async fn start(
        &self,
        peer: &mesh::PeerId,
        call: Call,
    ) -> Result<serde_json::Value, String> {
        let Call::Start {
            run_id,
            flow,
            input,
            label,
            monitors,
            managers,
            capabilities,
            flow_token,
        } = call
        else {
            return Err("not a start".into());
        };
        check_principals("monitors", &monitors)?;
        check_principals("managers", &managers)?;
        if capabilities.len() > MAX_PRINCIPALS {
            return Err(format!("at most {MAX_PRINCIPALS} delegated tokens"));
        }
        for t in &capabilities {
            capability::from_text(t)
                .map_err(|e| format!("a delegated token does not read: {e}"))?;
        }
        let (term, name) = if *peer == self.mesh.peer_id() {
            (self.institution_term(), self.own.institution.clone())
        } else {
            let m = self
                .mesh
                .member(peer)
                .ok_or_else(|| format!("{peer} is not a member connected to this node"))?;
            (
                m.institution_key
                    .map(|k| capability::institution_term(&crdt_registry::Key(k.0))),
                m.institution.clone(),
            )
        };
        let own_institution = term.is_some() && term == self.institution_term();
        let view = self.mesh.registry().await.map_err(|e| e.to_string())?;
        let found = crate::runs::find_flow(&view, &flow)?.clone();
        if !own_institution {
            // Another institution's node runs here only this institution's flows, with its
            // flow.run grant for that flow.
            let owner = view
                .nodes
                .get(&found.owner_peer)
                .and_then(|n| n.institution_key)
                .map(|k| capability::institution_term(&k));
            if owner != self.institution_term() {
                return Err(format!(
                    "flow {} is not {}'s: run it on a node of its institution, or your own",
                    found.id,
                    self.own
                        .institution
                        .as_deref()
                        .unwrap_or("this institution")
                ));
            }
            let token = flow_token.ok_or_else(|| {
                format!(
                    "running flow {} here takes {}'s flow.run grant for it (`funcmesh cap grant \
                     --flow`), held by the starting node",
                    found.id,
                    self.own
                        .institution
                        .as_deref()
                        .unwrap_or("this institution")
                )
            })?;
            let (Some(root), Some(key)) = (
                self.access.institution(),
                term.as_deref().and_then(capability::institution_of_term),
            ) else {
                return Err("a flow.run grant needs members of institutions on both sides".into());
            };
            let req = capability::Request {
                peer: peer.to_string(),
                institution: key,
                time: mesh::membership::unix_now(),
                endpoint: found.id.clone(),
                function: None,
                ability: capability::Ability::FlowRun,
                path: None,
            };
            self.access
                .check(&token, &root, &req)
                .map_err(|r| format!("the flow.run grant is refused: {r}"))?;
        }
        flows::schema::check_input(&found.record.input_schema, &input)?;
        crate::runs::validate(&found.record.definition, self.runs.providers())?;
        let starter = Starter {
            peer: peer.to_string(),
            institution: name,
            institution_term: term,
            monitors,
            managers,
            capabilities,
            own_institution,
        };
        match self.starters.get(&run_id).await? {
            Some(s) if s.peer != starter.peer => {
                return Err(format!(
                    "run id {run_id} is taken on this node: choose another"
                ));
            }
            Some(_) => {}
            None => {
                if self.runs.get(&run_id)?.is_some() {
                    return Err(format!(
                        "run id {run_id} is taken on this node: choose another"
                    ));
                }
                self.starters.put(&run_id, &starter).await?;
            }
        }
        let user = starter.user(&self.name, &run_id);
        let runs = self.runs.clone();
        let (definition, flow_id) = (found.record.definition.clone(), found.id.clone());
        let run = tokio::task::spawn_blocking(move || {
            runs.start(&run_id, &flow_id, &definition, input, &user, label)
        })
        .await
        .map_err(|e| e.to_string())??;
        serde_json::to_value(run).map_err(|e| e.to_string())
    }

    /// Answers one call of `peer`.
    async fn answer(&self, peer: mesh::PeerId, call: Call) -> Result<serde_json::Value, String> {
        let run_id = match &call {
            Call::Start { .. } => return self.start(&peer, call).await,
            Call::Status { run_id }
            | Call::Log { run_id }
            | Call::Cancel { run_id }
            | Call::Resume { run_id } => run_id.clone(),
        };
        let member = self
            .mesh
            .member(&peer)
            .ok_or_else(|| format!("{peer} is not a member connected to this node"))?;
        let term = member
            .institution_key
            .map(|k| capability::institution_term(&crdt_registry::Key(k.0)));
        let hidden = || format!("no run {run_id} on this node that you may see");
        // A run started here without a record is this institution's own.
        let starter = self
            .starters
            .get(&run_id)
            .await?
            .unwrap_or_else(|| Starter {
                peer: self.mesh.peer_id().to_string(),
                institution: self.own.institution.clone(),
                institution_term: self.institution_term(),
                monitors: Vec::new(),
                managers: Vec::new(),
                capabilities: Vec::new(),
                own_institution: true,
            });
        let peer_s = peer.to_string();
        let (see, manage) = (
            starter.may_see(&peer_s, term.as_deref()),
            starter.may_manage(&peer_s, term.as_deref()),
        );
        if !see {
            return Err(hidden());
        }
        let value = match call {
            Call::Status { .. } => self.runs.get(&run_id)?.map(serde_json::to_value),
            Call::Log { .. } => {
                if self.runs.get(&run_id)?.is_none() {
                    return Err(hidden());
                }
                Some(serde_json::to_value(self.runs.log(&run_id)?))
            }
            Call::Cancel { .. } | Call::Resume { .. } if !manage => {
                return Err(format!(
                    "run {run_id} is managed by its starter's institution and its managers only"
                ));
            }
            Call::Cancel { .. } => Some(serde_json::to_value(
                self.runs.cancel(&run_id).map_err(|_| hidden())?,
            )),
            Call::Resume { .. } => Some(serde_json::to_value(
                self.runs.resume(&run_id).map_err(|_| hidden())?,
            )),
            Call::Start { .. } => None,
        };
        value.ok_or_else(hidden)?.map_err(|e| e.to_string())
    }
}

impl transfer::files::Services for RunDesk {
    fn call(
        &self,
        peer: mesh::PeerId,
        service: String,
        body: serde_json::Value,
    ) -> transfer::wire::BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(async move {
            if service != SERVICE {
                return Err(format!("this node has no service {service:?}"));
            }
            let call: Call =
                serde_json::from_value(body).map_err(|e| format!("not a call about runs: {e}"))?;
            self.answer(peer, call).await
        })
    }
}

/// The asking side: `node` (a name or peer id) and its data plane, from the registry.
pub(crate) async fn node_at(
    mesh: &mesh::Handle,
    plane: &transfer::net::DataPlane,
    node: &str,
) -> Result<(mesh::PeerId, transfer::net::Remote), String> {
    let q = node.to_owned();
    let found = mesh
        .registry_with(move |view| {
            let hits: Vec<_> = view
                .nodes
                .values()
                .filter(|n| n.peer_id == q || n.name == q)
                .map(|n| (n.peer_id.clone(), n.data_addr.clone()))
                .collect();
            hits
        })
        .await
        .map_err(|e| e.to_string())?;
    let (peer, addr) = match found.as_slice() {
        [one] => one.clone(),
        [] => return Err(format!("no node {node:?} in the registry")),
        _ => {
            return Err(format!(
                "several nodes are named {node:?}: give its peer id"
            ));
        }
    };
    let peer: mesh::PeerId = peer.parse().map_err(|e| format!("{e}"))?;
    let addr = addr
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("node {node} publishes no data-plane address"))?;
    Ok((peer, plane.remote(peer, addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a member sends as a call about runs: decoded or refused, never a panic; a
        /// decoded one's principals are checked without panicking.
        #[test]
        fn calls_from_members_decode_or_are_refused(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            principal in "(institution:|node:)?[A-Za-z0-9+/=]{0,50}",
        ) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) {
                let _ = serde_json::from_value::<Call>(v);
            }
            let _ = check_principals("monitors", &[principal]);
        }
    }
}
