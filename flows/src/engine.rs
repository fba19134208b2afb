//! The durable run engine. A run is an event log in the node's store (column family
//! `flows`): every transition is written, synced, before its effect, and a run is a function
//! of its log, so that after a crash or `kill -9` [`Engine::open`] folds each unfinished run's
//! log back into where it was and goes on. An action in flight is re-attached through its
//! `request_id` (the provider answers the action that id started, not a new one); a `Wait`
//! resumes for what is left of it; a retry's wait likewise.
//!
//! One task drives each run. A state's step is: render its input, do its work, write the
//! transition (`Exited` with the output and the next state, in one synced batch with the run's
//! summary), go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::definition::{Catcher, Definition, Io, Kind, Next, Retrier, Text};
use crate::provider::{Providers, Request, Status};

mod children;
mod log;
mod state_io;

use log::Cursor;
pub use log::{Event, Failure, Run, RunStatus};
use state_io::{action_doc, fold, input_of, output_of, strip_context, wait_until, with_context};

struct Live {
    wake: tokio::sync::Notify,
    cancel: std::sync::atomic::AtomicBool,
}

struct Inner {
    store: store::Store,
    providers: Providers,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Sends a run's id whenever its summary changes.
    changes: tokio::sync::broadcast::Sender<String>,
    /// Set by [`Engine::close`]: the node is stopping, so what its providers now answer (their
    /// services stopping) says nothing about the runs, and nothing more is written.
    closing: std::sync::atomic::AtomicBool,
}

/// The engine of one node.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// An engine that does not keep the engine alive (for a provider that runs flows, which the
/// engine itself holds).
#[derive(Clone, Default)]
pub struct WeakEngine {
    inner: std::sync::Weak<Inner>,
}

impl WeakEngine {
    /// The engine, while it lives.
    pub fn upgrade(&self) -> Option<Engine> {
        self.inner.upgrade().map(|inner| Engine { inner })
    }
}

impl std::fmt::Debug for WeakEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakEngine")
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("providers", &self.inner.providers)
            .finish()
    }
}

fn run_key(id: &str) -> Vec<u8> {
    format!("run/{id}").into_bytes()
}

fn event_key(id: &str, seq: u64) -> Vec<u8> {
    format!("ev/{id}/{seq:016x}").into_bytes()
}

/// What may be in a run id (it is part of store keys and of request ids).
pub fn check_run_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("a run id has 1 to 128 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "run id `{id}` may hold only letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// The `url` a `Parallel` or `Map` state's `ActionStarted` names: its children, not a provider.
const CHILDREN: &str = "funcmesh:children";

/// Most items one `Map` state runs.
pub const MAX_ITEMS: usize = 10_000;

/// The longest a provider is left without a status check while an action runs.
const POLL_MAX: Duration = Duration::from_secs(600);

impl Engine {
    /// Opens the engine on `store` with `providers`, and resumes every run that had not
    /// ended (from its log). Call within a tokio runtime.
    pub fn open(store: store::Store, providers: Providers) -> Result<Engine, String> {
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                providers,
                live: Mutex::new(HashMap::new()),
                changes,
                closing: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        for run in engine.list()? {
            if !run.status.is_final() {
                engine.spawn(&run.run_id);
            }
        }
        Ok(engine)
    }

    /// Stops driving runs before the node stops its services: a run keeps the state its log
    /// has, as if the node had been killed there, and the next start resumes it (an action is
    /// asked again under the same `request_id`). Without this, a provider answering "stopped"
    /// during the shutdown would fail the run.
    pub fn close(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for live in self
            .inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            live.wake.notify_one();
        }
    }

    /// How many runs the engine is driving now.
    pub fn driving(&self) -> usize {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn closing(&self) -> bool {
        self.inner.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A handle that does not keep the engine alive.
    pub fn downgrade(&self) -> WeakEngine {
        WeakEngine {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The providers.
    pub fn providers(&self) -> &Providers {
        &self.inner.providers
    }

    /// Ids of runs whose summary changed, from now on.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    /// Starts a run of `definition` (checked, its actions known) on `input`. Idempotent by
    /// `run_id`: starting an id again answers the run it names.
    pub fn start(
        &self,
        run_id: &str,
        flow_id: &str,
        definition: &Value,
        input: Value,
        user: &str,
        label: Option<String>,
    ) -> Result<Run, String> {
        check_run_id(run_id)?;
        let context = json!({
            "run_id": run_id,
            "flow_id": flow_id,
            "username": user,
            "user_id": user,
            "identities": [user],
            "label": label,
        });
        self.start_with(
            run_id, flow_id, definition, input, user, label, context, None,
        )
    }

    /// Starts a run with its context given: a branch or an iteration of `parent`.
    #[allow(clippy::too_many_arguments)]
    fn start_with(
        &self,
        run_id: &str,
        flow_id: &str,
        definition: &Value,
        input: Value,
        user: &str,
        label: Option<String>,
        context: Value,
        parent: Option<String>,
    ) -> Result<Run, String> {
        if let Some(run) = self.get(run_id)? {
            return Ok(run);
        }
        let def = Definition::parse(definition).map_err(|e| e.to_string())?;
        def.check_actions(&|u| self.inner.providers.knows(u))
            .map_err(|e| e.to_string())?;
        let now = crate::time::format_rfc3339(crate::time::now_ms());
        let run = Run {
            parent,
            run_id: run_id.to_string(),
            flow_id: flow_id.to_string(),
            user: user.to_string(),
            label,
            status: RunStatus::Active,
            state: Some(def.start_at.clone()),
            start_time: now.clone(),
            completion_time: None,
            details: Value::Null,
            events: 1,
        };
        let started = Event::FlowStarted {
            definition: definition.clone(),
            input,
            context,
            time: now,
        };
        self.write(&run, 0, &[started])?;
        self.spawn(run_id);
        Ok(run)
    }

    /// A run's summary.
    pub fn get(&self, run_id: &str) -> Result<Option<Run>, String> {
        let raw = self
            .inner
            .store
            .get(store::cf::FLOWS, &run_key(run_id))
            .map_err(|e| e.to_string())?;
        raw.map(|b| serde_json::from_slice(&b).map_err(|e| format!("run {run_id}: {e}")))
            .transpose()
    }

    /// Every run this node hosts.
    pub fn list(&self) -> Result<Vec<Run>, String> {
        self.inner
            .store
            .scan_prefix(store::cf::FLOWS, b"run/")
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| e.to_string()))
            .collect()
    }

    /// A run's log.
    pub fn log(&self, run_id: &str) -> Result<Vec<Event>, String> {
        self.inner
            .store
            .scan_prefix(store::cf::FLOWS, format!("ev/{run_id}/").as_bytes())
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| e.to_string()))
            .collect()
    }

    /// Cancels a run: it ends as ENDED at its next step (an action in flight is asked to
    /// cancel).
    pub fn cancel(&self, run_id: &str) -> Result<Run, String> {
        let run = self
            .get(run_id)?
            .ok_or_else(|| format!("no run {run_id} on this node"))?;
        if run.status.is_final() {
            return Ok(run);
        }
        if let Some(live) = self.live(run_id) {
            live.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            live.wake.notify_one();
        }
        Ok(run)
    }

    /// Tells a run waiting on an INACTIVE action to look again (after a right was granted).
    pub fn resume(&self, run_id: &str) -> Result<Run, String> {
        let run = self
            .get(run_id)?
            .ok_or_else(|| format!("no run {run_id} on this node"))?;
        if let Some(live) = self.live(run_id) {
            live.wake.notify_one();
        } else if !run.status.is_final() {
            self.spawn(run_id);
        }
        Ok(run)
    }

    /// Waits until the run is final or `within` has passed; answers its summary.
    pub async fn wait(&self, run_id: &str, within: Duration) -> Result<Run, String> {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let run = self
                .get(run_id)?
                .ok_or_else(|| format!("no run {run_id} on this node"))?;
            if run.status.is_final() {
                return Ok(run);
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => return Ok(run),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(run),
                Ok(_) => {}
            }
        }
    }

    fn live(&self, run_id: &str) -> Option<Arc<Live>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(run_id)
            .cloned()
    }

    fn spawn(&self, run_id: &str) {
        let live = Arc::new(Live {
            wake: tokio::sync::Notify::new(),
            cancel: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut map = self.inner.live.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(run_id) {
                return;
            }
            map.insert(run_id.to_string(), live.clone());
        }
        let engine = self.clone();
        let id = run_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = engine.drive(&id, &live).await {
                tracing::warn!(run = %id, error = %e, "a flow run stopped");
            }
            engine
                .inner
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// Writes `events` (numbered from `seq`) and the run's summary in one synced batch.
    fn write(&self, run: &Run, seq: u64, events: &[Event]) -> Result<(), String> {
        let mut ops: Vec<store::Op> = Vec::with_capacity(events.len() + 1);
        for (i, e) in events.iter().enumerate() {
            let v = serde_json::to_vec(e).map_err(|e| e.to_string())?;
            ops.push((
                store::cf::FLOWS,
                event_key(&run.run_id, seq + i as u64),
                Some(v),
            ));
        }
        let v = serde_json::to_vec(run).map_err(|e| e.to_string())?;
        ops.push((store::cf::FLOWS, run_key(&run.run_id), Some(v)));
        self.inner.store.batch(&ops).map_err(|e| e.to_string())?;
        let _ = self.inner.changes.send(run.run_id.clone());
        Ok(())
    }

    /// Runs `run_id` from where its log says it is until it ends (or the engine goes).
    async fn drive(&self, run_id: &str, live: &Live) -> Result<(), String> {
        let log = self.log(run_id)?;
        let Some(mut run) = self.get(run_id)? else {
            return Err(format!("run {run_id} has no summary"));
        };
        if run.status.is_final() {
            return Ok(());
        }
        let Some(Event::FlowStarted {
            definition,
            input,
            context,
            ..
        }) = log.first().cloned()
        else {
            return Err(format!(
                "run {run_id}'s log does not start with FlowStarted"
            ));
        };
        let def = Definition::parse(&definition).map_err(|e| e.to_string())?;
        let mut seq = log.len() as u64;
        let mut cur = fold(&def, input, &log);
        loop {
            if self.closing() {
                return Ok(());
            }
            if live.cancel.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some((request_id, url, body, _)) = &cur.pending {
                    if url == CHILDREN {
                        let n = body["inputs"].as_array().map_or(0, Vec::len);
                        for i in 0..n {
                            let _ = self.cancel(&format!("{request_id}.{i}"));
                        }
                    } else if let Some(p) = self.inner.providers.get(url) {
                        let _ = p.cancel(request_id).await;
                    }
                }
                let now = crate::time::format_rfc3339(crate::time::now_ms());
                run.status = RunStatus::Ended;
                run.completion_time = Some(now.clone());
                run.events = seq + 1;
                return self.write(&run, seq, &[Event::FlowCancelled { time: now }]);
            }
            let Some(state) = def.states.get(&cur.state) else {
                return Err(format!("run {run_id} is at unknown state {}", cur.state));
            };
            let step = self
                .step(run_id, &run, &context, &definition, &cur, state, live, seq)
                .await;
            if self.closing() {
                // Whatever the step saw while the node stops is not recorded.
                return Ok(());
            }
            let events = match step {
                Step::Events(events) => events,
                Step::Again => continue,
                Step::Inactive(action) => {
                    if !cur.inactive {
                        cur.inactive = true;
                        run.status = RunStatus::Inactive;
                        run.details = action.clone();
                        run.events = seq + 1;
                        self.write(
                            &run,
                            seq,
                            &[Event::ActionInactive {
                                state: cur.state.clone(),
                                action,
                            }],
                        )?;
                        seq += 1;
                    }
                    // Until `resume` (or cancel), or a minute: providers may recover alone.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), live.wake.notified()).await;
                    continue;
                }
                Step::Fail(failure) => match self.handle(state, &cur, failure) {
                    Ok(events) => events,
                    Err(failure) => {
                        let now = crate::time::format_rfc3339(crate::time::now_ms());
                        run.status = RunStatus::Failed;
                        run.details = serde_json::to_value(&failure).unwrap_or(Value::Null);
                        run.completion_time = Some(now.clone());
                        run.state = Some(cur.state.clone());
                        run.events = seq + 1;
                        return self.write(
                            &run,
                            seq,
                            &[Event::FlowFailed {
                                error: failure,
                                time: now,
                            }],
                        );
                    }
                },
            };
            // Apply and persist the step's events.
            let mut done = false;
            for e in &events {
                match e {
                    Event::ActionStarted {
                        request_id,
                        url,
                        body,
                        at_ms,
                        ..
                    } => {
                        cur.pending = Some((request_id.clone(), url.clone(), body.clone(), *at_ms))
                    }
                    Event::Waiting { until_ms, .. } | Event::Retrying { until_ms, .. } => {
                        cur.waiting = Some(*until_ms);
                        if let Event::Retrying {
                            retrier, attempt, ..
                        } = e
                        {
                            cur.retries.insert(*retrier, *attempt);
                            cur.pending = None;
                        }
                    }
                    Event::StateExited { output, next, .. } => {
                        cur.doc = output.clone();
                        cur.pending = None;
                        cur.waiting = None;
                        cur.retries.clear();
                        cur.inactive = false;
                        match next {
                            Some(n) => cur.state = n.clone(),
                            None => done = true,
                        }
                    }
                    _ => {}
                }
            }
            run.events = seq + events.len() as u64;
            run.status = RunStatus::Active;
            run.state = Some(cur.state.clone());
            let mut all = events;
            if done {
                let now = crate::time::format_rfc3339(crate::time::now_ms());
                run.status = RunStatus::Succeeded;
                run.details = json!({ "output": cur.doc });
                run.completion_time = Some(now);
                run.state = None;
            } else if cur.inactive {
                run.details = Value::Null;
            }
            let n = all.len() as u64;
            self.write(&run, seq, &all)?;
            all.clear();
            seq += n;
            if done {
                return Ok(());
            }
        }
    }

    /// One step of `state`: the events to write, or a failure.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        run_id: &str,
        run: &Run,
        context: &Value,
        definition: &Value,
        cur: &Cursor,
        state: &crate::definition::State,
        live: &Live,
        seq: u64,
    ) -> Step {
        let name = cur.state.clone();
        // A timer of this state runs out first.
        if let Some(until) = cur.waiting {
            let left = until - crate::time::now_ms();
            if left > 0 {
                let _ =
                    tokio::time::timeout(Duration::from_millis(left as u64), live.wake.notified())
                        .await;
                return Step::Again;
            }
        }
        let exit = |output: Value, next: &Next| {
            Step::Events(vec![Event::StateExited {
                state: name.clone(),
                output,
                next: match next {
                    Next::To(s) => Some(s.clone()),
                    Next::End => None,
                },
                caught: None,
            }])
        };
        let scope = with_context(&cur.doc, context);
        match &state.kind {
            Kind::Pass { io, result, next } => {
                let effective = match input_of(io, &scope) {
                    Ok(v) => v,
                    Err(f) => return Step::Fail(f),
                };
                let result = result.clone().unwrap_or(effective);
                match output_of(io, &cur.doc, result) {
                    Ok(out) => exit(out, next),
                    Err(f) => Step::Fail(f),
                }
            }
            Kind::ExpressionEval { io, next } => {
                match input_of(io, &scope).and_then(|r| output_of(io, &cur.doc, r)) {
                    Ok(out) => exit(out, next),
                    Err(f) => Step::Fail(f),
                }
            }
            Kind::Choice { choices, default } => {
                for (rule, target) in choices {
                    match rule.matches(&scope) {
                        Ok(true) => return exit(cur.doc.clone(), &Next::To(target.clone())),
                        Ok(false) => {}
                        Err(e) => return Step::Fail(Failure::runtime(e)),
                    }
                }
                match default {
                    Some(d) => exit(cur.doc.clone(), &Next::To(d.clone())),
                    None => Step::Fail(Failure {
                        error: "States.NoChoiceMatched".into(),
                        cause: format!(
                            "no rule of Choice state `{name}` matched, and it has no Default"
                        ),
                        details: Value::Null,
                    }),
                }
            }
            Kind::Wait { wait, next } => {
                if cur.waiting.is_some() {
                    // The timer ran out (checked above).
                    return exit(cur.doc.clone(), next);
                }
                let until = match wait_until(wait, &scope) {
                    Ok(t) => t,
                    Err(f) => return Step::Fail(f),
                };
                Step::Events(vec![Event::Waiting {
                    state: name,
                    until_ms: until,
                }])
            }
            Kind::Fail { error, cause } => {
                let text = |t: &Option<Text>| -> String {
                    match t {
                        None => String::new(),
                        Some(Text::Fixed(s)) => s.clone(),
                        Some(Text::Path(p)) => match p.select(&scope) {
                            Ok(Value::String(s)) => s,
                            Ok(other) => other.to_string(),
                            Err(e) => e,
                        },
                    }
                };
                Step::Fail(Failure {
                    error: match text(error) {
                        e if e.is_empty() => "States.Fail".into(),
                        e => e,
                    },
                    cause: text(cause),
                    details: Value::Null,
                })
            }
            Kind::Succeed { input_path } => {
                let out = match input_path {
                    Some(p) => match p.select(&scope) {
                        Ok(v) => v,
                        Err(e) => return Step::Fail(Failure::runtime(e)),
                    },
                    None => cur.doc.clone(),
                };
                exit(out, &Next::End)
            }
            Kind::Action(action) => {
                self.action(run_id, run, cur, &scope, action, live, seq)
                    .await
            }
            Kind::Parallel { io, next, .. } | Kind::Map { io, next, .. } => {
                let raw = &definition["States"][name.as_str()];
                self.children(
                    run_id, run, context, cur, &scope, state, raw, io, next, live, seq,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn action(
        &self,
        run_id: &str,
        run: &Run,
        cur: &Cursor,
        scope: &Value,
        action: &crate::definition::Action,
        live: &Live,
        seq: u64,
    ) -> Step {
        let Some(provider) = self.inner.providers.get(&action.url) else {
            return Step::Fail(Failure {
                error: "ActionUnableToRun".into(),
                cause: format!("no action provider at {} on this node", action.url),
                details: Value::Null,
            });
        };
        let Some((request_id, _, body, at_ms)) = cur.pending.clone() else {
            // Not asked yet: write that it is asked, with its idempotency key, then ask.
            let body = match input_of(&action.io, scope) {
                Ok(b) => b,
                Err(f) => return Step::Fail(f),
            };
            return Step::Events(vec![Event::ActionStarted {
                state: cur.state.clone(),
                request_id: format!("{run_id}-{seq}"),
                url: action.url.clone(),
                body,
                at_ms: crate::time::now_ms(),
            }]);
        };
        let request = Request {
            request_id: request_id.clone(),
            body,
            label: run.label.clone(),
            user: run.user.clone(),
            run_as: action.run_as.clone(),
            run_id: run_id.to_string(),
            url: action.url.clone(),
            at_ms,
        };
        // Resumed after INACTIVE: tell the action first (the right it waited for may be there).
        if cur.inactive {
            let _ = provider.resume(&request_id).await;
        }
        // Asking again with the same key re-attaches to the action it started.
        let mut status = match provider.run(request).await {
            Ok(a) => a,
            Err(refusal) => {
                return Step::Fail(Failure {
                    error: "ActionUnableToRun".into(),
                    cause: refusal.to_string(),
                    details: json!({"code": refusal.code, "description": refusal.description}),
                });
            }
        };
        let deadline = at_ms + (action.wait_time * 1_000.0) as i64;
        let mut poll = Duration::from_millis(500);
        while !status.status.is_final() {
            if status.status == Status::Inactive {
                return Step::Inactive(action_doc(&status, &cur.state));
            }
            if live.cancel.load(std::sync::atomic::Ordering::SeqCst) {
                return Step::Again;
            }
            let now = crate::time::now_ms();
            if now >= deadline {
                let _ = provider.cancel(&status.action_id).await;
                return Step::Fail(Failure {
                    error: "ActionTimeout".into(),
                    cause: format!(
                        "the action did not finish within its WaitTime of {} s",
                        action.wait_time
                    ),
                    details: action_doc(&status, &cur.state),
                });
            }
            let left = Duration::from_millis((deadline - now) as u64);
            tokio::select! {
                () = provider.changed(&status.action_id, poll.min(left)) => {}
                () = live.wake.notified() => {}
            }
            if self.closing() {
                return Step::Again;
            }
            poll = (poll * 2).min(POLL_MAX);
            status = match provider.status(&status.action_id).await {
                Ok(a) => a,
                Err(refusal) => {
                    return Step::Fail(Failure {
                        error: "ActionUnableToRun".into(),
                        cause: format!("the action's status is lost: {refusal}"),
                        details: Value::Null,
                    });
                }
            };
        }
        let doc = action_doc(&status, &cur.state);
        let _ = provider.release(&status.action_id).await;
        if status.status == Status::Failed && action.exception_on_action_failure {
            return Step::Fail(Failure {
                error: "ActionFailedException".into(),
                cause: format!("the action at {} failed: {}", action.url, status.details),
                details: doc,
            });
        }
        match output_of(&action.io, &cur.doc, doc) {
            Ok(out) => Step::Events(vec![Event::StateExited {
                state: cur.state.clone(),
                output: out,
                next: match &action.next {
                    Next::To(s) => Some(s.clone()),
                    Next::End => None,
                },
                caught: None,
            }]),
            Err(f) => Step::Fail(f),
        }
    }

    /// A failed step: retried by its `Retry`, caught by its `Catch`, or the run's failure.
    fn handle(
        &self,
        state: &crate::definition::State,
        cur: &Cursor,
        failure: Failure,
    ) -> Result<Vec<Event>, Failure> {
        let (retry, catch): (&[Retrier], &[Catcher]) = match &state.kind {
            Kind::Action(a) => (&a.retry, &a.catch),
            Kind::Parallel { retry, catch, .. } | Kind::Map { retry, catch, .. } => (retry, catch),
            _ => (&[], &[]),
        };
        let matches = |names: &[String]| {
            names.iter().any(|n| {
                n == &failure.error || (n == "States.ALL" && failure.error != "States.Runtime")
            })
        };
        if let Some((i, r)) = retry.iter().enumerate().find(|(_, r)| matches(&r.errors)) {
            let used = cur.retries.get(&i).copied().unwrap_or(0);
            if used < r.max_attempts {
                let mut wait = r.interval_seconds * r.backoff_rate.powi(used as i32);
                if let Some(max) = r.max_delay_seconds {
                    wait = wait.min(max);
                }
                return Ok(vec![Event::Retrying {
                    state: cur.state.clone(),
                    error: failure,
                    retrier: i,
                    attempt: used + 1,
                    until_ms: crate::time::now_ms() + (wait * 1_000.0) as i64,
                }]);
            }
        }
        if let Some(c) = catch.iter().find(|c| matches(&c.errors)) {
            let error = serde_json::to_value(&failure).unwrap_or(Value::Null);
            let mut out = cur.doc.clone();
            if let Some(p) = &c.result_path {
                p.set(&mut out, error).map_err(Failure::runtime)?;
            }
            return Ok(vec![Event::StateExited {
                state: cur.state.clone(),
                output: out,
                next: Some(c.next.clone()),
                caught: Some(failure),
            }]);
        }
        Err(failure)
    }
}

enum Step {
    Events(Vec<Event>),
    Again,
    Inactive(Value),
    Fail(Failure),
}
