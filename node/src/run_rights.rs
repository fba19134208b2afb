//! Who started a flow run and what it may do: the host's record of each run's starter (with its
//! monitors, managers and delegated tokens, `who/<run id>` in the `flows` column family), and
//! the rights a run started by another institution's node acts with — only what its starter
//! delegated, never the host's own. Read by the flow providers (`runs`) and written by the run
//! desk (`remote_runs`) and the API.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Most monitors, managers or delegated tokens one run records.
pub const MAX_PRINCIPALS: usize = 32;

/// Who started a run, as its host records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Starter {
    /// The starting node's peer id.
    pub peer: String,
    /// Its institution's name.
    pub institution: Option<String>,
    /// Its institution as principals name it (`institution:<key>`).
    pub institution_term: Option<String>,
    /// Principals who may see the run (`institution:<key>`, `node:<peer id>`).
    #[serde(default)]
    pub monitors: Vec<String>,
    /// Principals who may see, cancel and resume it.
    #[serde(default)]
    pub managers: Vec<String>,
    /// Capability tokens the starter delegated to the host for this run (text form).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Whether the starter belongs to the host's institution.
    pub own_institution: bool,
}

impl Starter {
    /// The run's user: the host's own (`urn:funcmesh:node:NAME`), or, for another
    /// institution's starter, one that names the run whose record holds its rights.
    pub fn user(&self, host_name: &str, run_id: &str) -> String {
        if self.own_institution {
            format!("urn:funcmesh:node:{host_name}")
        } else {
            format!("urn:funcmesh:peer:{}#{run_id}", self.peer)
        }
    }

    /// Whether `peer` (of institution `term`) may see the run.
    pub fn may_see(&self, peer: &str, term: Option<&str>) -> bool {
        self.may_manage(peer, term) || names(&self.monitors, peer, term)
    }

    /// Whether `peer` (of institution `term`) may cancel or resume the run.
    pub fn may_manage(&self, peer: &str, term: Option<&str>) -> bool {
        peer == self.peer
            || (term.is_some() && term == self.institution_term.as_deref())
            || names(&self.managers, peer, term)
    }
}

fn names(principals: &[String], peer: &str, term: Option<&str>) -> bool {
    principals
        .iter()
        .any(|p| p.strip_prefix("node:") == Some(peer) || Some(p.as_str()) == term)
}

/// The run whose rights a run user names: `urn:funcmesh:peer:<peer>#<run id>` → the run id.
pub fn foreign_run(user: &str) -> Option<&str> {
    user.strip_prefix("urn:funcmesh:peer:")?
        .split_once('#')
        .map(|(_, run)| run)
}

fn who_key(run_id: &str) -> Vec<u8> {
    format!("who/{run_id}").into_bytes()
}

/// The host's records of who started its runs.
#[derive(Clone)]
pub struct Starters {
    store: store::Store,
}

impl Starters {
    /// Records kept in `store`.
    pub fn new(store: store::Store) -> Starters {
        Starters { store }
    }

    /// Who started `run_id` (none for a run started here without monitors or managers).
    pub async fn get(&self, run_id: &str) -> Result<Option<Starter>, String> {
        let key = who_key(run_id);
        let bytes = self
            .store
            .blocking(move |s| s.get(store::cf::FLOWS, &key))
            .await
            .map_err(|e| e.to_string())?;
        match bytes {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("run {run_id}'s starter record does not read: {e}")),
        }
    }

    /// Records who starts `run_id` (before the run starts: its actions look it up).
    pub async fn put(&self, run_id: &str, starter: &Starter) -> Result<(), String> {
        let key = who_key(run_id);
        let bytes = serde_json::to_vec(starter).map_err(|e| e.to_string())?;
        self.store
            .blocking(move |s| s.put(store::cf::FLOWS, &key, &bytes))
            .await
            .map_err(|e| e.to_string())
    }

    /// The rights of a run user that names another institution's run: its starter's record.
    pub async fn of_user(&self, user: &str) -> Result<Option<Starter>, String> {
        match foreign_run(user) {
            None => Ok(None),
            Some(run) => match self.get(run).await? {
                Some(s) => Ok(Some(s)),
                None => Err(format!(
                    "run {run} names a starter of another node that its host has no record of"
                )),
            },
        }
    }
}

/// What the flow engine's providers need to judge a run's actions as its starter's: a run
/// started by another institution's node acts only with what its starter delegated.
#[derive(Clone)]
pub struct Rights {
    /// Who started which run.
    pub starters: Starters,
    /// This node's verifier.
    pub access: Arc<compute::access::Access>,
    /// This node's membership.
    pub own: mesh::membership::Member,
    /// This node.
    pub me: mesh::PeerId,
}

impl Rights {
    fn endpoint_institution(
        view: &crdt_registry::View,
        ep: &crdt_registry::Endpoint,
    ) -> (Option<String>, Option<crdt_registry::Key>) {
        let node = view.nodes.get(&ep.peer_id);
        (
            node.and_then(|n| n.institution.clone()),
            node.and_then(|n| n.institution_key),
        )
    }

    /// Whether the endpoint's policy admits both the starter and this node without a token.
    fn both_admitted(
        &self,
        starter: &Starter,
        ep: &crdt_registry::Endpoint,
        theirs: Option<&str>,
    ) -> bool {
        use compute::access::{Verdict, verdict};
        matches!(
            verdict(ep.record.policy, theirs, starter.institution.as_deref()),
            Verdict::Admitted
        ) && matches!(
            verdict(ep.record.policy, theirs, self.own.institution.as_deref()),
            Verdict::Admitted
        )
    }

    /// The token `starter`'s run presents at endpoint `ep` for `ability` (with the function
    /// or path of the request `what` names): none when the endpoint's policy admits both the
    /// starter and this node; else a token the starter delegated that allows this node; else
    /// why not, naming `doing`.
    fn delegated(
        &self,
        starter: &Starter,
        view: &crdt_registry::View,
        ep: &crdt_registry::Endpoint,
        what: (capability::Ability, Option<String>, Option<String>),
        doing: &str,
    ) -> Result<Option<String>, String> {
        let (theirs, root) = Rights::endpoint_institution(view, ep);
        if self.both_admitted(starter, ep, theirs.as_deref()) {
            return Ok(None);
        }
        let (Some(root), Some(institution)) = (root, self.access.institution()) else {
            return Err(format!(
                "endpoint {} belongs to no institution",
                ep.record.name
            ));
        };
        let (ability, function, path) = what;
        let req = capability::Request {
            peer: self.me.to_string(),
            institution,
            time: mesh::membership::unix_now(),
            endpoint: ep.id.clone(),
            function,
            ability,
            path,
        };
        starter
            .capabilities
            .iter()
            .find(|t| self.access.check(t, &root, &req).is_ok())
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "access denied: the run's starter ({}) delegated no capability token that \
                     lets this node ({}) {doing} — delegate one (`funcmesh cap delegate TOKEN \
                     --to node:{}`) and start the run with it",
                    starter
                        .institution
                        .as_deref()
                        .unwrap_or("another institution"),
                    self.me,
                    self.me
                )
            })
    }

    /// The token a task of `starter`'s run presents to run `function` on `endpoint` (none when
    /// the endpoint's policy admits both the starter and this node), or why it may not run.
    pub fn compute_token(
        &self,
        starter: &Starter,
        view: &crdt_registry::View,
        endpoint: Option<&str>,
        function: &str,
    ) -> Result<Option<String>, String> {
        let endpoint = endpoint.ok_or_else(|| {
            format!(
                "a run started by {}'s node names the endpoint of each task (`endpoint_id`): it \
                 acts only with the rights its starter delegated",
                starter
                    .institution
                    .as_deref()
                    .unwrap_or("another institution")
            )
        })?;
        let ep = crate::registry::find_endpoint(view, endpoint).map_err(|e| format!("{e:#}"))?;
        let f = crate::registry::find_function(view, function).map_err(|e| format!("{e:#}"))?;
        let what = (capability::Ability::ComputeRun, Some(f.id.clone()), None);
        self.delegated(
            starter,
            view,
            ep,
            what,
            &format!("run {} on {endpoint}", f.record.name),
        )
    }

    /// The token a transfer action of `starter`'s run presents to do `want` at `path` of
    /// `endpoint` (none when the endpoint's policy admits both the starter and this node), or
    /// why it may not.
    pub fn transfer_token(
        &self,
        starter: &Starter,
        view: &crdt_registry::View,
        endpoint: &str,
        path: &str,
        want: transfer::files::Want,
    ) -> Result<Option<String>, String> {
        let ep = crate::registry::find_endpoint(view, endpoint).map_err(|e| format!("{e:#}"))?;
        let ability = match want {
            transfer::files::Want::Read => capability::Ability::TransferRead,
            transfer::files::Want::Write => capability::Ability::TransferWrite,
        };
        let path = transfer::root::RelPath::parse(path).map_err(|e| e.to_string())?;
        let what = (ability, None, Some(path.as_str().to_owned()));
        self.delegated(
            starter,
            view,
            ep,
            what,
            &format!("{ability} {endpoint}:{}", path.as_str()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starter() -> Starter {
        Starter {
            peer: "P1".into(),
            institution: Some("inst-b".into()),
            institution_term: Some("institution:B".into()),
            monitors: vec!["institution:C".into(), "node:P9".into()],
            managers: vec!["node:P5".into()],
            capabilities: Vec::new(),
            own_institution: false,
        }
    }

    #[test]
    fn monitors_see_managers_manage_and_others_neither() {
        let s = starter();
        // The starter and its institution.
        assert!(s.may_manage("P1", None) && s.may_manage("P2", Some("institution:B")));
        // Monitors see, and do not manage.
        assert!(
            s.may_see("P3", Some("institution:C")) && !s.may_manage("P3", Some("institution:C"))
        );
        assert!(s.may_see("P9", Some("institution:X")) && !s.may_manage("P9", None));
        // Managers do both.
        assert!(
            s.may_see("P5", Some("institution:X")) && s.may_manage("P5", Some("institution:X"))
        );
        // Anyone else neither.
        assert!(!s.may_see("P7", Some("institution:A")) && !s.may_see("P7", None));
    }

    #[test]
    fn a_foreign_runs_user_names_its_run_and_the_hosts_own_does_not() {
        let s = starter();
        let user = s.user("a1", "r-1");
        assert_eq!(foreign_run(&user), Some("r-1"));
        let own = Starter {
            own_institution: true,
            ..starter()
        };
        assert_eq!(foreign_run(&own.user("a1", "r-1")), None);
        assert_eq!(foreign_run("urn:funcmesh:node:a1"), None);
    }
}
