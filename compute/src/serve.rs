//! The serving side of tasks: this node's endpoints answering `/funcmesh/task/4` requests.
//!
//! A `Submit` from a member goes to the named endpoint after the access check (the endpoint's
//! policy, then the task's capability token), unless the endpoint is full (`Busy`); `Results`
//! from an endpoint's node go to the dispatcher; `Cancel` and `Records` are answered for the
//! task's submitter only. Finished tasks go back to their submitters (the service's delivery
//! loop) and stay in the endpoint's outbox until acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crdt_registry::record::Policy;
use mesh::PeerId;
use mesh::membership::Member;

use crate::access::{Access, Presented, Verdict};
use crate::routing::{EndpointLoad, EnvironmentLoad};
use crate::submit::Dispatcher;
use crate::task::TaskId;
use crate::wire::{Answer, TaskRequest, TaskResponse};

/// Answers task requests for this node's endpoints.
pub(crate) struct Server {
    pub(crate) own: Member,
    pub(crate) endpoints: HashMap<String, (crate::Endpoint, Policy)>,
    /// Each endpoint's registry id, by name.
    pub(crate) endpoint_ids: HashMap<String, String>,
    pub(crate) access: Arc<Access>,
    pub(crate) dispatcher: Dispatcher,
    /// Results being delivered right now (the outbox sweep skips them).
    pub(crate) delivering: Mutex<HashSet<TaskId>>,
}

impl Server {
    /// Answers one request from the member `from` (`peer`; this node itself for its own tasks).
    pub(crate) async fn handle(
        &self,
        from: &Member,
        peer: PeerId,
        request: TaskRequest,
    ) -> TaskResponse {
        match request {
            TaskRequest::Submit { tasks, tokens } => {
                // Each distinct token is decoded and hashed once per batch.
                let tokens: Vec<Result<Presented, capability::Refusal>> =
                    tokens.iter().map(|t| Presented::from_text(t)).collect();
                let mut answers: Vec<Option<Answer>> = vec![None; tasks.len()];
                let mut groups: BTreeMap<String, Vec<(usize, crate::Submission)>> = BTreeMap::new();
                let mut refused: Vec<(usize, String, TaskId, String)> = Vec::new();
                for (i, mut t) in tasks.into_iter().enumerate() {
                    match self.endpoints.get(&t.endpoint) {
                        None => {
                            answers[i] = Some(Answer::Refused(format!(
                                "this node runs no endpoint named `{}`",
                                t.endpoint
                            )))
                        }
                        Some((ep, _))
                            if ep.refuses_foreign_host_tasks()
                                && from.institution != self.own.institution
                                && crate::environment::Environment::of(
                                    t.function.container.as_ref(),
                                )
                                .is_ok_and(|env| !env.is_container()) =>
                        {
                            answers[i] = Some(Answer::Refused(format!(
                                "endpoint `{}` runs host tasks as its node's own user, so it \
                                 takes host tasks from its own institution only: run the \
                                 function in a container, or ask the operator to run the node \
                                 as root (each worker then gets a uid of its own) or to set \
                                 foreign_host_tasks = true",
                                t.endpoint
                            )))
                        }
                        Some((_, policy)) => match self.admit(from, peer, *policy, &t, &tokens) {
                            Ok(()) => {
                                tracing::debug!(task = %t.id, %peer, endpoint = %t.endpoint, "task taken");
                                // Checked: the endpoint keeps no copy of the token.
                                t.capability = None;
                                groups.entry(t.endpoint.clone()).or_default().push((i, t))
                            }
                            Err(why) => refused.push((
                                i,
                                t.endpoint.clone(),
                                t.id.clone(),
                                format!("access denied to endpoint `{}`: {why}", t.endpoint),
                            )),
                        },
                    }
                }
                // A task accepted earlier and sent again (after a restart of its submitter) keeps
                // its answer even if its token has been revoked since: accepted work is never
                // dropped.
                for (i, endpoint, id, why) in refused {
                    let (ep, _) = &self.endpoints[&endpoint];
                    answers[i] = Some(match ep.records(vec![id]).await {
                        Ok(mut r)
                            if r[0]
                                .as_ref()
                                .is_some_and(|r| r.submitter == peer.to_string()) =>
                        {
                            Answer::of(r.remove(0).expect("checked above"))
                        }
                        _ => Answer::Refused(why),
                    });
                }
                // Backpressure: an endpoint that holds its most unfinished tasks (or bytes), or
                // this institution's share of them, takes no more now. The submitter keeps them
                // (stored, pending) and sends them again shortly.
                let submitter = peer.to_string();
                for (name, items) in &groups {
                    let (ep, _) = &self.endpoints[name];
                    let tenant = ep.tenant_of(from.institution.as_deref(), &submitter);
                    let bytes = items
                        .iter()
                        .map(|(_, t)| t.arguments_size_bound() as u64)
                        .sum();
                    if let Some(reason) = ep.pushback(&tenant, items.len(), bytes) {
                        return TaskResponse::Busy { reason };
                    }
                }
                let touched: Vec<String> = groups.keys().cloned().collect();
                for (name, items) in groups {
                    let (ep, _) = &self.endpoints[&name];
                    let (idx, subs): (Vec<usize>, Vec<crate::Submission>) =
                        items.into_iter().unzip();
                    let tenant = ep.tenant_of(from.institution.as_deref(), &submitter);
                    match ep.submit(&submitter, &tenant, subs).await {
                        Ok(results) => {
                            for (i, r) in idx.into_iter().zip(results) {
                                answers[i] = Some(match r {
                                    Ok(rec) => Answer::of(rec),
                                    Err(why) => Answer::Refused(why),
                                });
                            }
                        }
                        Err(e) => {
                            for i in idx {
                                answers[i] =
                                    Some(Answer::Refused(format!("endpoint `{name}`: {e}")));
                            }
                        }
                    }
                }
                let loads = touched
                    .iter()
                    .map(|name| endpoint_load(name, &self.endpoints[name].0.current_load()))
                    .collect();
                TaskResponse::Submitted {
                    loads,
                    answers: answers
                        .into_iter()
                        .map(|a| a.unwrap_or(Answer::Refused("not handled".into())))
                        .collect(),
                }
            }
            TaskRequest::Results { records, loads } => {
                match self.dispatcher.results(peer, records, loads).await {
                    Ok(()) => TaskResponse::Acknowledged,
                    Err(e) => TaskResponse::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            TaskRequest::Cancel { endpoint, id } => {
                let Some((ep, _)) = self.endpoints.get(&endpoint) else {
                    return TaskResponse::Refused {
                        reason: format!("this node runs no endpoint named `{endpoint}`"),
                    };
                };
                match ep.records(vec![id.clone()]).await {
                    Ok(r)
                        if r[0]
                            .as_ref()
                            .is_some_and(|r| r.submitter != peer.to_string()) =>
                    {
                        TaskResponse::Refused {
                            reason: "only the task's submitter may cancel it".into(),
                        }
                    }
                    _ => match ep.cancel(id).await {
                        Ok(record) => TaskResponse::Cancelled { record },
                        Err(e) => TaskResponse::Refused {
                            reason: e.to_string(),
                        },
                    },
                }
            }
            TaskRequest::Records { endpoint, ids } => {
                let Some((ep, _)) = self.endpoints.get(&endpoint) else {
                    return TaskResponse::Refused {
                        reason: format!("this node runs no endpoint named `{endpoint}`"),
                    };
                };
                match ep.records(ids).await {
                    Ok(records) => TaskResponse::Records {
                        records: records
                            .into_iter()
                            .map(|r| r.filter(|r| r.submitter == peer.to_string()))
                            .collect(),
                    },
                    Err(e) => TaskResponse::Refused {
                        reason: e.to_string(),
                    },
                }
            }
        }
    }
}

impl Server {
    /// Whether the member `from` (`peer`) may run `t` on an endpoint with `policy`: by policy,
    /// or with the capability token the task carries.
    fn admit(
        &self,
        from: &Member,
        peer: PeerId,
        policy: Policy,
        t: &crate::Submission,
        tokens: &[Result<Presented, capability::Refusal>],
    ) -> Result<(), String> {
        let why = match crate::access::verdict(
            policy,
            self.own.institution.as_deref(),
            from.institution.as_deref(),
        ) {
            Verdict::Admitted => return Ok(()),
            Verdict::NeedsToken(why) => why,
            Verdict::Refused(why) => {
                tracing::info!(%peer, endpoint = %t.endpoint, %why, "refused a task");
                return Err(why);
            }
        };
        let Some(token) = &t.capability else {
            return Err(format!(
                "{why}, and the task carries no token: an admin of {} grants one with `funcmesh \
                 cap grant`, and the submitting node adds it with `funcmesh cap add`",
                self.own
                    .institution
                    .as_deref()
                    .unwrap_or("this institution")
            ));
        };
        let (Some(root), Some(institution)) = (self.access.institution(), from.institution_key)
        else {
            return Err(format!(
                "{why}; a capability token needs a member of an institution on both sides"
            ));
        };
        let req = capability::Request {
            peer: peer.to_string(),
            institution: crdt_registry::Key(institution.0),
            time: crate::task::now_us() / 1_000_000,
            endpoint: self
                .endpoint_ids
                .get(&t.endpoint)
                .cloned()
                .unwrap_or_default(),
            function: Some(t.function_id.clone()),
            ability: capability::Ability::ComputeRun,
            path: None,
        };
        let checked = match crate::access::presented(token, tokens) {
            Ok(p) => self
                .access
                .check_presented(&p, &root, &req)
                .map_err(|r| (r, Some(p.text.clone()))),
            Err(r) => Err((r, None)),
        };
        checked.map_err(|(refusal, text)| {
            let reason = refusal.to_string();
            if self
                .access
                .first_refusal(text.as_deref().unwrap_or(token), &reason)
            {
                tracing::info!(%peer, endpoint = %t.endpoint, %reason, "refused a capability token");
            }
            format!("capability refused: {reason}")
        })
    }
}

/// An endpoint's load as adverts and answers carry it.
pub(crate) fn endpoint_load(name: &str, l: &crate::pool::Load) -> EndpointLoad {
    EndpointLoad {
        name: name.to_owned(),
        max_workers: l.max_workers as u32,
        workers: l.workers as u32,
        idle: l.idle as u32,
        queued: l.queued as u32,
        environments: l
            .environments
            .iter()
            .map(|(env, e)| EnvironmentLoad {
                env: env.to_string(),
                idle: e.idle as u32,
                busy: e.busy as u32,
                starting: e.starting as u32,
                cold_start_ms: e.cold_start_ms,
            })
            .collect(),
    }
}
