//! The node's task service: composes this node's endpoints (compute) with the mesh's task
//! protocol and dispatcher. Inbound requests from members go to the endpoints (after the access
//! policy check) or, for results, to the dispatcher; finished tasks go back to their submitters
//! and stay in the endpoint's outbox until acknowledged; every endpoint's load is advertised.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compute::task::{Outcome, Record, Status, TaskId};
use crdt_registry::record::Policy;
use futures::future::BoxFuture;
use mesh::PeerId;
use mesh::access::{Access, Presented, Verdict};
use mesh::dispatch::{Dispatcher, Local, Submitted};
use mesh::membership::Member;
use mesh::routing::{ADVERT_TOPIC, ADVERT_VERSION, Advert, EndpointLoad, EnvironmentLoad};
use mesh::tasks::{Answer, TaskRequest, TaskResponse};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// The running task service.
pub(crate) struct Tasks {
    pub(crate) dispatcher: Dispatcher,
    /// Access policies, the directory, and the capability tokens this node holds.
    pub(crate) access: Arc<Access>,
}

/// Answers task requests for this node's endpoints.
pub(crate) struct Service {
    me: PeerId,
    own: Member,
    endpoints: HashMap<String, (compute::Endpoint, Policy)>,
    /// Each endpoint's registry id, by name.
    endpoint_ids: HashMap<String, String>,
    access: Arc<Access>,
    dispatcher: std::sync::OnceLock<Dispatcher>,
    /// Results being delivered right now (the outbox sweep skips them).
    delivering: Mutex<HashSet<TaskId>>,
}

impl Service {
    async fn handle(&self, from: &Member, peer: PeerId, request: TaskRequest) -> TaskResponse {
        match request {
            TaskRequest::Submit { tasks, tokens } => {
                // Each distinct token is decoded and hashed once per batch.
                let tokens: Vec<Result<Presented, capability::Refusal>> =
                    tokens.iter().map(|t| Presented::from_text(t)).collect();
                let mut answers: Vec<Option<Answer>> = vec![None; tasks.len()];
                let mut groups: BTreeMap<String, Vec<(usize, compute::Submission)>> =
                    BTreeMap::new();
                let mut refused: Vec<(usize, String, TaskId, String)> = Vec::new();
                for (i, mut t) in tasks.into_iter().enumerate() {
                    match self.endpoints.get(&t.endpoint) {
                        None => {
                            answers[i] = Some(Answer::Refused(format!(
                                "this node runs no endpoint named `{}`",
                                t.endpoint
                            )))
                        }
                        Some((_, policy)) => match self.admit(from, peer, *policy, &t, &tokens) {
                            Ok(()) => {
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
                // Backpressure: an endpoint that holds its most unfinished tasks takes no more
                // now. The submitter keeps them (stored, pending) and sends them again shortly.
                for (name, items) in &groups {
                    let (ep, _) = &self.endpoints[name];
                    let held = ep.current_load().queued;
                    let most = ep.max_queued();
                    if held > 0 && held + items.len() > most {
                        return TaskResponse::Busy {
                            reason: format!(
                                "endpoint `{name}` holds {held} unfinished tasks and takes at \
                                 most {most}: send these again later"
                            ),
                        };
                    }
                }
                let touched: Vec<String> = groups.keys().cloned().collect();
                for (name, items) in groups {
                    let (ep, _) = &self.endpoints[&name];
                    let (idx, subs): (Vec<usize>, Vec<compute::Submission>) =
                        items.into_iter().unzip();
                    match ep.submit(&peer.to_string(), subs).await {
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
            TaskRequest::Results { records, loads } => match self.dispatcher.get() {
                Some(d) => match d.results(peer, records, loads).await {
                    Ok(()) => TaskResponse::Acknowledged,
                    Err(e) => TaskResponse::Refused {
                        reason: e.to_string(),
                    },
                },
                None => TaskResponse::Busy {
                    reason: "this node is starting".into(),
                },
            },
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

impl Service {
    /// Whether the member `from` (`peer`) may run `t` on an endpoint with `policy`: by policy,
    /// or with the capability token the task carries.
    fn admit(
        &self,
        from: &Member,
        peer: PeerId,
        policy: Policy,
        t: &compute::Submission,
        tokens: &[Result<Presented, capability::Refusal>],
    ) -> Result<(), String> {
        let why = match mesh::access::verdict(
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
            time: compute::task::now_us() / 1_000_000,
            endpoint: self
                .endpoint_ids
                .get(&t.endpoint)
                .cloned()
                .unwrap_or_default(),
            function: Some(t.function_id.clone()),
            ability: capability::Ability::ComputeRun,
        };
        let checked = match mesh::access::presented(token, tokens) {
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

struct LocalService(Arc<Service>);

impl Local for LocalService {
    fn request(&self, request: TaskRequest) -> BoxFuture<'static, TaskResponse> {
        let s = self.0.clone();
        Box::pin(async move {
            let own = s.own.clone();
            let me = s.me;
            s.handle(&own, me, request).await
        })
    }
}

/// Starts the endpoints of `config`, the dispatcher and the loops between them and the mesh.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start(
    mesh: &mesh::Handle,
    store: &store::Store,
    node_key: crdt_registry::Key,
    work_dir: &std::path::Path,
    config: &Config,
    own: &Member,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Tasks> {
    let me = mesh.peer_id();
    let label: String = me.to_string().chars().rev().take(10).collect();
    let access = Access::new(me, own.institution_key.map(|k| crdt_registry::Key(k.0)));
    crate::capabilities::load(store, &access).await?;
    crate::capabilities::refresh_directory(mesh, &access).await;
    {
        // Revocations and admissions reach the verifier within a quarter second of the registry.
        let mesh = mesh.clone();
        let access = access.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => crate::capabilities::refresh_directory(&mesh, &access).await,
                }
            }
        });
    }
    let mut endpoints = HashMap::new();
    let mut endpoint_ids = HashMap::new();
    let mut results = Vec::new();
    for section in &config.endpoint {
        let policy: Policy = section
            .policy
            .parse()
            .map_err(|e: String| anyhow::anyhow!("[[endpoint]] {}: {e}", section.name))?;
        let (ep, rx) = compute::Endpoint::start(
            section.compute(),
            store.clone(),
            work_dir,
            &label,
            cancel.child_token(),
            tracker,
        )
        .await?;
        results.push((ep.clone(), rx));
        endpoint_ids.insert(
            section.name.clone(),
            crdt_registry::record::EndpointRecord::id_for(&node_key, &section.name),
        );
        endpoints.insert(section.name.clone(), (ep, policy));
    }
    let service = Arc::new(Service {
        me,
        own: own.clone(),
        endpoints,
        endpoint_ids,
        access: access.clone(),
        dispatcher: std::sync::OnceLock::new(),
        delivering: Mutex::new(HashSet::new()),
    });
    let dispatcher = Dispatcher::start(
        mesh.clone(),
        store.clone(),
        mesh::dispatch::Config {
            lost_after: config.mesh.endpoint_lost_after,
            retention: config.node.task_retention,
            institution: own.institution.clone(),
            access: access.clone(),
        },
        Arc::new(LocalService(service.clone())),
        cancel.child_token(),
        tracker,
    )
    .await?;
    let _ = service.dispatcher.set(dispatcher.clone());

    // Inbound requests from members.
    if let Some(mut inbound) = mesh.take_task_requests() {
        let service = service.clone();
        let cancel = cancel.clone();
        let t = tracker.clone();
        tracker.spawn(async move {
            loop {
                let req = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = inbound.recv() => match r { Some(r) => r, None => break },
                };
                let service = service.clone();
                t.spawn(async move {
                    let resp = service.handle(&req.from, req.peer, req.request).await;
                    req.responder.respond(resp).await;
                });
            }
        });
    }

    // Finished tasks back to their submitters: at once, and again from the outbox until acknowledged.
    for (ep, mut rx) in results {
        let service = service.clone();
        let mesh = mesh.clone();
        let cancel = cancel.clone();
        let t = tracker.clone();
        tracker.spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_secs(2));
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let batch = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = rx.recv() => match r {
                        Some(first) => {
                            let mut batch = vec![first];
                            while batch.len() < 1024 {
                                match rx.try_recv() { Ok(r) => batch.push(r), Err(_) => break }
                            }
                            batch
                        }
                        None => break,
                    },
                    _ = sweep.tick() => {
                        let busy = service.delivering.lock().expect("not poisoned").clone();
                        ep.unacknowledged(busy).await.unwrap_or_default()
                    }
                };
                deliver(&service, &mesh, &ep, batch, &t);
            }
        });
    }

    // Advertise this node's endpoints' load.
    if !service.endpoints.is_empty() {
        let service = service.clone();
        let mesh = mesh.clone();
        let dispatcher = dispatcher.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<(Vec<EndpointLoad>, Instant)> = None;
            let mut seq = compute::task::now_us();
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let mut loads = Vec::new();
                let mut names: Vec<&String> = service.endpoints.keys().collect();
                names.sort();
                for name in names {
                    let (ep, _) = &service.endpoints[name];
                    loads.push(endpoint_load(name, &ep.current_load()));
                }
                let due = match &last {
                    None => true,
                    Some((prev, at)) => {
                        let age = at.elapsed();
                        (age >= Duration::from_secs(1) && *prev != loads)
                            || age >= Duration::from_secs(2)
                    }
                };
                if !due {
                    continue;
                }
                seq += 1;
                let advert = Advert {
                    v: ADVERT_VERSION,
                    seq,
                    at_ms: compute::task::now_us() / 1000,
                    endpoints: loads.clone(),
                };
                let _ = dispatcher.own_advert(advert.clone()).await;
                // No peers subscribed yet is normal right after start.
                let _ = mesh.publish(ADVERT_TOPIC, advert.encode()).await;
                last = Some((loads, Instant::now()));
            }
        });
    }
    Ok(Tasks { dispatcher, access })
}

fn endpoint_load(name: &str, l: &compute::pool::Load) -> EndpointLoad {
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

fn deliver(
    service: &Arc<Service>,
    mesh: &mesh::Handle,
    ep: &compute::Endpoint,
    batch: Vec<Record>,
    tracker: &TaskTracker,
) {
    let mut by_peer: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for r in batch {
        by_peer.entry(r.submitter.clone()).or_default().push(r);
    }
    // Each message within half of what the task protocol carries (a result may be up to the
    // endpoint's result limit): a batch too large to encode would never be delivered.
    let budget = mesh::tasks::MAX_MESSAGE / 2;
    let mut sends: Vec<(String, Vec<Record>)> = Vec::new();
    for (peer, records) in by_peer {
        let mut part: Vec<Record> = Vec::new();
        let mut bytes = 0;
        for r in records {
            let size = r.size_bound();
            if !part.is_empty() && bytes + size > budget {
                sends.push((peer.clone(), std::mem::take(&mut part)));
                bytes = 0;
            }
            bytes += size;
            part.push(r);
        }
        if !part.is_empty() {
            sends.push((peer, part));
        }
    }
    for (peer, records) in sends {
        let Ok(peer) = peer.parse::<PeerId>() else {
            // A submitter that is not a peer id cannot be answered: drop it from the outbox.
            let ep = ep.clone();
            let ids = records.into_iter().map(|r| r.id).collect();
            tracker.spawn(async move { ep.acknowledge(ids).await });
            continue;
        };
        let ids: Vec<TaskId> = records.iter().map(|r| r.id.clone()).collect();
        service
            .delivering
            .lock()
            .expect("not poisoned")
            .extend(ids.iter().cloned());
        let service = service.clone();
        let ep = ep.clone();
        let loads = vec![endpoint_load(ep.name(), &ep.current_load())];
        // A remote submitter's results are queued for the mesh now, before the wait is spawned.
        let delivered = if peer == service.me {
            let service = service.clone();
            futures::future::Either::Left(async move {
                match service.dispatcher.get() {
                    Some(d) => d.results(peer, records, loads).await.is_ok(),
                    None => false,
                }
            })
        } else {
            let answer = mesh.task_request(peer, TaskRequest::Results { records, loads });
            futures::future::Either::Right(async move {
                matches!(answer.await, Ok(TaskResponse::Acknowledged))
            })
        };
        tracker.spawn(async move {
            let acked = delivered.await;
            if acked {
                let _ = ep.acknowledge(ids.clone()).await;
            }
            let mut d = service.delivering.lock().expect("not poisoned");
            for id in &ids {
                d.remove(id);
            }
        });
    }
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    /// Its id.
    pub id: String,
    /// The function's name.
    pub function: String,
    /// The function's id.
    pub function_id: String,
    /// Status.
    pub status: Status,
    /// The endpoint it was sent to (`name@node`).
    pub endpoint: Option<String>,
    /// The endpoint's node.
    pub endpoint_peer: Option<String>,
    /// Tries so far.
    pub attempts: usize,
    /// Why earlier tries ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<String>,
    /// Phase timestamps, Unix microseconds.
    pub times: compute::task::Times,
    /// Whether a worker had to start for it.
    pub cold_start: bool,
    /// The worker that ran it.
    pub worker: Option<String>,
    /// Its environment.
    pub environment: Option<String>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl From<&Submitted> for TaskView {
    fn from(t: &Submitted) -> TaskView {
        let target = t.target();
        let mut times = t
            .record
            .as_ref()
            .map(|r| r.times.clone())
            .unwrap_or_default();
        times.submitted_us = t.submitted_us;
        if times.finished_us == 0 {
            times.finished_us = t.finished_us;
        }
        TaskView {
            id: t.id.to_string(),
            function: t.function_name.clone(),
            function_id: t.submission.function_id.clone(),
            status: t.status,
            endpoint: target.map(|x| format!("{}@{}", x.endpoint, x.node_name)),
            endpoint_peer: target.map(|x| x.peer.clone()),
            attempts: t.attempts.len(),
            lost: t.attempts.iter().filter_map(|a| a.lost.clone()).collect(),
            times,
            cold_start: t.record.as_ref().is_some_and(|r| r.cold_start),
            worker: t.record.as_ref().and_then(|r| r.worker.clone()),
            environment: t.record.as_ref().map(|r| r.environment.clone()),
            outcome: t.outcome.clone(),
        }
    }
}

/// One task in `POST /v1/tasks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewTask {
    /// The function: id, id prefix (6+ characters) or name.
    pub function: String,
    /// Positional arguments (a JSON array).
    pub args: serde_json::Value,
    /// Keyword arguments (a JSON object).
    pub kwargs: serde_json::Value,
    /// `json` (default) or `pickle`.
    pub encoding: compute::task::Encoding,
    /// An explicit endpoint: id, id prefix, `name` or `name@node`.
    pub endpoint: Option<String>,
    /// Tags the endpoint must have.
    pub require: BTreeMap<String, String>,
    /// The institution the endpoint must belong to.
    pub institution: Option<String>,
    /// `warm-aware` (default), `least-loaded`, `random`, `round-robin`.
    pub strategy: Option<String>,
    /// Retries elsewhere if the endpoint is lost.
    pub retries: u32,
    /// Time limit, milliseconds (0: the endpoint's default).
    pub timeout_ms: u64,
    /// A capability token to present (text form), instead of one this node holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
}

/// `POST /v1/tasks`: one task (the fields of [`NewTask`]) or many (`tasks`), optionally waiting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SubmitBody {
    /// Many tasks.
    pub tasks: Vec<NewTask>,
    /// Wait up to this long for the results.
    pub wait_ms: u64,
}

/// One task's answer in a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted1 {
    /// The task, if accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    /// Why not, if refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Turns API tasks into dispatcher requests, resolving functions in the registry.
pub(crate) fn requests(
    functions: &HashMap<String, Result<crdt_registry::Function, String>>,
    tasks: Vec<NewTask>,
) -> Vec<Result<mesh::dispatch::Request, String>> {
    tasks
        .into_iter()
        .map(|t| {
            let f = functions
                .get(&t.function)
                .cloned()
                .unwrap_or_else(|| Err(format!("function `{}` was not looked up", t.function)))?;
            let strategy = match &t.strategy {
                None => mesh::routing::Strategy::default(),
                Some(s) => mesh::routing::Strategy::parse(s)?,
            };
            if t.encoding == compute::task::Encoding::Json {
                if !(t.args.is_array() || t.args.is_null()) {
                    return Err(format!(
                        "args must be a JSON array of positional arguments, not {}",
                        t.args
                    ));
                }
                if !(t.kwargs.is_object() || t.kwargs.is_null()) {
                    return Err(format!("kwargs must be a JSON object, not {}", t.kwargs));
                }
            }
            Ok(mesh::dispatch::Request {
                function: f,
                args: t.args,
                kwargs: t.kwargs,
                encoding: t.encoding,
                timeout_ms: t.timeout_ms,
                requirements: mesh::routing::Requirements {
                    tags: t.require,
                    endpoint: t.endpoint,
                    institution: t.institution,
                },
                strategy,
                retries: t.retries,
                capability: t.capability.map(|c| c.trim().to_owned()),
            })
        })
        .collect()
}

/// Resolves and submits API tasks: one answer per task, in order (refused ones with the reason).
pub(crate) async fn submit(
    mesh: &mesh::Handle,
    dispatcher: &Dispatcher,
    tasks: Vec<NewTask>,
) -> anyhow::Result<Vec<Result<Submitted, String>>> {
    let (slots, ok) = resolve(mesh, tasks).await?;
    Ok(merge(slots, dispatcher.submit(ok).await?))
}

/// Resolves and submits API tasks, and answers as `POST /v1/tasks` does: each task as it is
/// once accepted, or, with `wait`, once finished (or when `wait` has passed).
pub(crate) async fn submit_views(
    mesh: &mesh::Handle,
    dispatcher: &Dispatcher,
    tasks: Vec<NewTask>,
    wait: Option<Duration>,
) -> anyhow::Result<Vec<Submitted1>> {
    let (slots, ok) = resolve(mesh, tasks).await?;
    let view = |r: Result<&Submitted, String>| match r {
        Ok(t) => Submitted1 {
            task: Some(t.into()),
            error: None,
        },
        Err(e) => Submitted1 {
            task: None,
            error: Some(e),
        },
    };
    Ok(match wait {
        None => merge(slots, dispatcher.submit(ok).await?)
            .into_iter()
            .map(|r| match r {
                Ok(t) => view(Ok(&t)),
                Err(e) => view(Err(e)),
            })
            .collect(),
        Some(d) => merge(slots, dispatcher.submit_and_wait(ok, d).await?)
            .into_iter()
            .map(|r| match r {
                Ok(t) => view(Ok(&t)),
                Err(e) => view(Err(e)),
            })
            .collect(),
    })
}

/// Looks up each task's function (each distinct one once, inside the mesh, without copying the
/// registry): a slot per task, refused ones with the reason, and the requests of the others.
async fn resolve(
    mesh: &mesh::Handle,
    tasks: Vec<NewTask>,
) -> anyhow::Result<(Vec<Result<(), String>>, Vec<mesh::dispatch::Request>)> {
    let queries: std::collections::BTreeSet<String> =
        tasks.iter().map(|t| t.function.clone()).collect();
    let functions: HashMap<String, Result<crdt_registry::Function, String>> = mesh
        .registry_with(move |view| {
            queries
                .into_iter()
                .map(|q| {
                    let found = crate::registry::find_function(view, &q)
                        .cloned()
                        .map_err(|e| format!("{e:#}"));
                    (q, found)
                })
                .collect()
        })
        .await?;
    let mut ok = Vec::new();
    let mut slots = Vec::new();
    for r in requests(&functions, tasks) {
        match r {
            Ok(r) => {
                slots.push(Ok(()));
                ok.push(r);
            }
            Err(e) => slots.push(Err(e)),
        }
    }
    Ok((slots, ok))
}

/// The dispatcher's answers put back in the slots of the tasks that reached it.
fn merge<T>(
    slots: Vec<Result<(), String>>,
    answers: Vec<Result<T, String>>,
) -> Vec<Result<T, String>> {
    let mut answers = answers.into_iter();
    slots
        .into_iter()
        .map(|s| match s {
            Ok(()) => answers
                .next()
                .unwrap_or(Err("no answer from the dispatcher".into())),
            Err(e) => Err(e),
        })
        .collect()
}
