//! Action providers: what an `Action` state's `ActionUrl` names. The trait mirrors the Globus
//! action-provider API (run, status, cancel, release, resume; ACTIVE, INACTIVE, SUCCEEDED,
//! FAILED; `request_id` idempotency), so that a built-in and a provider reached over HTTP look
//! the same to the engine. The node injects the providers that need the network (compute,
//! transfer); this module has the ones that do not: hello-world and expression-eval.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A boxed future, as providers return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An action's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Making progress.
    Active,
    /// Paused until something outside it happens (a right granted, then `resume`).
    Inactive,
    /// Done.
    Succeeded,
    /// Done, and failed.
    Failed,
}

impl Status {
    /// Whether the action is over.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed)
    }
}

/// An action's status document, as the Globus action-provider API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// The provider's id for the action.
    pub action_id: String,
    /// Where it is.
    pub status: Status,
    /// Its result when it succeeded, the reason when it failed or is inactive.
    pub details: Value,
    /// A short word for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_status: Option<String>,
    /// Who started it.
    #[serde(default)]
    pub creator_id: String,
    /// The run's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
}

impl Action {
    /// A finished action.
    pub fn done(request: &Request, ok: bool, details: Value) -> Action {
        let now = crate::time::format_rfc3339(crate::time::now_ms());
        Action {
            action_id: request.request_id.clone(),
            status: if ok {
                Status::Succeeded
            } else {
                Status::Failed
            },
            details,
            display_status: Some(if ok { "SUCCEEDED" } else { "FAILED" }.into()),
            creator_id: request.user.clone(),
            label: request.label.clone(),
            start_time: Some(now.clone()),
            completion_time: Some(now),
        }
    }
}

/// What the engine asks a provider to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The idempotency key: the same key runs one action however often it is sent.
    pub request_id: String,
    /// The action's input (the state's `Parameters`).
    pub body: Value,
    /// The run's label.
    #[serde(default)]
    pub label: Option<String>,
    /// Who started the run (the identity the action acts for).
    #[serde(default)]
    pub user: String,
    /// The state's `RunAs`.
    #[serde(default)]
    pub run_as: Option<String>,
    /// The run that asks, and its state.
    #[serde(default)]
    pub run_id: String,
    /// The action URL it was asked at (a flow provider reads the flow from it).
    #[serde(default)]
    pub url: String,
    /// When the engine first asked for this action (Unix milliseconds; the same on every ask
    /// under this `request_id`, so that a provider can derive stable ids from both).
    #[serde(default)]
    pub at_ms: i64,
}

/// Why a provider could not start or report an action (the engine's `ActionUnableToRun`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A Globus-style code: `BadActionRequest`, `ActionNotFound`, `Unreachable`, ...
    pub code: String,
    /// What is wrong and what to do.
    pub description: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.description)
    }
}

impl Refusal {
    /// A request the provider cannot run as given.
    pub fn bad(description: impl Into<String>) -> Refusal {
        Refusal {
            code: "BadActionRequest".into(),
            description: description.into(),
        }
    }

    /// An action the provider does not know (or no longer keeps).
    pub fn not_found(description: impl Into<String>) -> Refusal {
        Refusal {
            code: "ActionNotFound".into(),
            description: description.into(),
        }
    }

    /// The provider itself failed (what it depends on is down or answered nonsense).
    pub fn provider(description: impl Into<String>) -> Refusal {
        Refusal {
            code: "ActionProviderError".into(),
            description: description.into(),
        }
    }
}

/// An action provider.
pub trait Provider: Send + Sync {
    /// Starts the action of `request`, or, for a `request_id` seen before, answers the action
    /// that one started (without starting another).
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>>;
    /// The action's status.
    fn status(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>>;
    /// Asks the action to stop.
    fn cancel(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>>;
    /// Forgets a finished action.
    fn release(&self, action_id: &str) -> BoxFuture<'_, Result<(), Refusal>> {
        let _ = action_id;
        Box::pin(async { Ok(()) })
    }
    /// Tells an INACTIVE action that what it waited for may be there now.
    fn resume(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.status(action_id)
    }
    /// The action's log entries (Globus' `GET /{id}/log`), oldest first. By default one entry:
    /// the status as it is now.
    fn log(&self, action_id: &str) -> BoxFuture<'_, Result<Vec<Value>, Refusal>> {
        let status = self.status(action_id);
        Box::pin(async move {
            let action = status.await?;
            Ok(vec![json!({
                "code": "ActionStatus",
                "time": crate::time::format_rfc3339(crate::time::now_ms()),
                "description": action.display_status.clone().unwrap_or_default(),
                "details": action,
            })])
        })
    }
    /// Resolves when the action's status may have changed, or after `at_most` (polling
    /// providers sleep; built-ins wake at once).
    fn changed(&self, action_id: &str, at_most: std::time::Duration) -> BoxFuture<'_, ()> {
        let _ = action_id;
        Box::pin(tokio::time::sleep(at_most))
    }
}

/// The providers a node has, by action URL.
#[derive(Clone, Default)]
pub struct Providers {
    by_url: HashMap<String, Arc<dyn Provider>>,
    /// Providers of every URL under a prefix (a flow's URL names the flow).
    by_prefix: Vec<(String, Arc<dyn Provider>)>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut urls: Vec<&String> = self.by_url.keys().collect();
        urls.sort();
        f.debug_struct("Providers").field("urls", &urls).finish()
    }
}

/// The URLs of Globus' hello-world provider.
pub const HELLO_WORLD_URLS: &[&str] = &[
    "https://actions.globus.org/hello_world",
    "https://actions.automate.globus.org/hello_world",
];

/// The URL of funcmesh's wait provider (Globus has a `Wait` state, and no provider).
pub const WAIT_URL: &str = "urn:funcmesh:actions:wait";

/// Waits, as an action: `{"seconds": N}` or `{"until": RFC 3339}` (at most a year). The
/// deadline counts from when the engine first asked (`Request::at_ms`, the same on every ask
/// under one `request_id`), so a wait survives a restart of its node exactly; it needs no
/// memory of its own. Useful where the `Wait` state is not: inside a `Parallel` branch beside
/// other actions, or as a deadline a `Catch` can act on.
#[derive(Debug, Default)]
pub struct WaitProvider {
    deadlines: Mutex<HashMap<String, (Request, i64)>>,
}

/// The longest wait.
const MAX_WAIT_MS: i64 = 366 * 24 * 3600 * 1000;

impl WaitProvider {
    fn deadline(request: &Request) -> Result<i64, Refusal> {
        let body = &request.body;
        match (body.get("seconds"), body.get("until")) {
            (Some(s), None) => {
                let s = s
                    .as_f64()
                    .filter(|s| (0.0..=(MAX_WAIT_MS / 1000) as f64).contains(s))
                    .ok_or_else(|| Refusal::bad("`seconds` is a number from 0 to 31622400"))?;
                Ok(request.at_ms + (s * 1000.0) as i64)
            }
            (None, Some(u)) => {
                let at = u
                    .as_str()
                    .and_then(crate::time::parse_rfc3339)
                    .ok_or_else(|| Refusal::bad("`until` is an RFC 3339 time"))?;
                if at - request.at_ms > MAX_WAIT_MS {
                    return Err(Refusal::bad("`until` is at most a year away"));
                }
                Ok(at)
            }
            _ => Err(Refusal::bad("give `seconds` or `until` (one of them)")),
        }
    }

    fn answer(request: &Request, deadline: i64) -> Action {
        let mut action = Action::done(
            request,
            true,
            json!({"waited_until": crate::time::format_rfc3339(deadline)}),
        );
        action.start_time = Some(crate::time::format_rfc3339(request.at_ms));
        if crate::time::now_ms() < deadline {
            action.status = Status::Active;
            action.display_status = Some("ACTIVE".into());
            action.completion_time = None;
        } else {
            action.completion_time = Some(crate::time::format_rfc3339(deadline));
        }
        action
    }

    fn known(&self, action_id: &str) -> Result<(Request, i64), Refusal> {
        self.deadlines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(action_id)
            .cloned()
            .ok_or_else(|| Refusal::not_found(format!("no wait {action_id}")))
    }
}

impl Provider for WaitProvider {
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async move {
            let deadline = WaitProvider::deadline(&request)?;
            self.deadlines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request.request_id.clone(), (request.clone(), deadline));
            Ok(WaitProvider::answer(&request, deadline))
        })
    }

    fn status(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        let known = self.known(action_id);
        Box::pin(async move {
            let (request, deadline) = known?;
            Ok(WaitProvider::answer(&request, deadline))
        })
    }

    fn cancel(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        let known = self.known(action_id);
        let id = action_id.to_string();
        Box::pin(async move {
            let (request, deadline) = known?;
            let mut action = WaitProvider::answer(&request, deadline);
            if !action.status.is_final() {
                self.deadlines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                action = Action::done(&request, false, json!({"code": "Cancelled"}));
            }
            Ok(action)
        })
    }

    fn release(&self, action_id: &str) -> BoxFuture<'_, Result<(), Refusal>> {
        self.deadlines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(action_id);
        Box::pin(async { Ok(()) })
    }

    fn changed(&self, action_id: &str, at_most: std::time::Duration) -> BoxFuture<'_, ()> {
        let left = self
            .known(action_id)
            .map_or(0, |(_, deadline)| (deadline - crate::time::now_ms()).max(0));
        let wait = std::time::Duration::from_millis(left as u64).min(at_most);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// The URLs of Globus' expression-eval provider.
pub const EXPRESSION_EVAL_URLS: &[&str] = &[
    "https://actions.globus.org/expression_eval",
    "https://actions.automate.globus.org/expression_eval",
];

impl Providers {
    /// The built-ins that need nothing from the node: hello-world and expression-eval, under
    /// the URLs Globus gives them, and wait ([`WAIT_URL`]).
    pub fn builtin() -> Providers {
        let mut p = Providers::default();
        let hello: Arc<dyn Provider> = Arc::new(HelloWorld::default());
        for url in HELLO_WORLD_URLS {
            p.add(url, hello.clone());
        }
        let eval: Arc<dyn Provider> = Arc::new(ExpressionEval);
        for url in EXPRESSION_EVAL_URLS {
            p.add(url, eval.clone());
        }
        p.add(WAIT_URL, Arc::new(WaitProvider::default()));
        p
    }

    /// Adds (or replaces) the provider at `url` (without a trailing `/`).
    pub fn add(&mut self, url: &str, provider: Arc<dyn Provider>) {
        self.by_url
            .insert(url.trim_end_matches('/').to_string(), provider);
    }

    /// Adds the provider of every URL that starts with `prefix` and names something after it.
    pub fn add_prefix(&mut self, prefix: &str, provider: Arc<dyn Provider>) {
        self.by_prefix.push((prefix.to_string(), provider));
    }

    /// The provider at `url`.
    pub fn get(&self, url: &str) -> Option<Arc<dyn Provider>> {
        let url = url.trim_end_matches('/');
        self.by_url.get(url).cloned().or_else(|| {
            self.by_prefix
                .iter()
                .find(|(p, _)| url.len() > p.len() && url.starts_with(p.as_str()))
                .map(|(_, provider)| provider.clone())
        })
    }

    /// Whether a provider is at `url`.
    pub fn knows(&self, url: &str) -> bool {
        self.get(url).is_some()
    }

    /// Every URL, sorted.
    pub fn urls(&self) -> Vec<String> {
        let mut out: Vec<String> = self.by_url.keys().cloned().collect();
        out.sort();
        out
    }
}

/// Globus' hello-world: `{"echo_string", "sleep_time"}` → `{"Hello": "World", "hello":
/// echo_string}`, at once, or ACTIVE for `sleep_time` seconds first. Counts the actions it
/// started, so that tests can tell a re-attached action from a second one.
#[derive(Debug, Default)]
pub struct HelloWorld {
    actions: Mutex<HashMap<String, (Request, i64)>>,
    started: std::sync::atomic::AtomicU64,
    /// Actions that asked for a `required_dependent_scope` and were resumed since (consent,
    /// in Globus' terms, was given).
    consented: Mutex<std::collections::HashSet<String>>,
}

impl HelloWorld {
    /// How many actions it started (requests with a `request_id` seen before not counted).
    pub fn started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn answer_now(&self, request: &Request, started_ms: i64) -> Action {
        let mut action = HelloWorld::answer(request, started_ms);
        if let Some(scope) = request.body.get("required_dependent_scope") {
            let consented = self
                .consented
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&request.request_id);
            if !consented {
                action.status = Status::Inactive;
                action.display_status = Some("INACTIVE".into());
                action.completion_time = None;
                action.details = json!({
                    "code": "ConsentRequired",
                    "description": "the action needs a right it was not given: grant it, then resume the run",
                    "required_scope": scope,
                });
            }
        }
        action
    }

    fn answer(request: &Request, started_ms: i64) -> Action {
        let sleep_ms = request
            .body
            .get("sleep_time")
            .and_then(Value::as_f64)
            .map_or(0, |s| (s * 1_000.0) as i64);
        let mut details = json!({"Hello": "World"});
        if let Some(echo) = request.body.get("echo_string") {
            details["hello"] = echo.clone();
        }
        let mut action = Action::done(request, true, details);
        action.start_time = Some(crate::time::format_rfc3339(started_ms));
        if crate::time::now_ms() < started_ms + sleep_ms {
            action.status = Status::Active;
            action.display_status = Some("ACTIVE".into());
            action.completion_time = None;
        }
        action
    }
}

impl Provider for HelloWorld {
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async move {
            if let Some(s) = request.body.get("sleep_time") {
                if !s.as_f64().is_some_and(|s| (0.0..=86_400.0).contains(&s)) {
                    return Err(Refusal::bad("`sleep_time` must be 0 to 86400 seconds"));
                }
            }
            let mut actions = self.actions.lock().unwrap_or_else(|e| e.into_inner());
            let (request, started) = actions
                .entry(request.request_id.clone())
                .or_insert_with(|| {
                    self.started
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (request, crate::time::now_ms())
                })
                .clone();
            Ok(self.answer_now(&request, started))
        })
    }

    fn status(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        let found = self
            .actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(action_id)
            .cloned();
        let id = action_id.to_string();
        Box::pin(async move {
            match found {
                Some((request, started)) => Ok(self.answer_now(&request, started)),
                None => Err(Refusal::not_found(format!("no action {id}"))),
            }
        })
    }

    fn cancel(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.status(action_id)
    }

    fn resume(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.consented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(action_id.to_string());
        self.status(action_id)
    }

    fn changed(&self, action_id: &str, at_most: std::time::Duration) -> BoxFuture<'_, ()> {
        // Wakes exactly when the sleep ends.
        let left = self
            .actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(action_id)
            .map(|(r, started)| {
                let sleep_ms = r
                    .body
                    .get("sleep_time")
                    .and_then(Value::as_f64)
                    .map_or(0, |s| (s * 1_000.0) as i64);
                (started + sleep_ms - crate::time::now_ms()).max(0)
            })
            .unwrap_or(0);
        let wait = std::time::Duration::from_millis(left as u64).min(at_most);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// Globus' expression-eval: `{"expression", "arguments", "result_path"}` (or a list of them
/// under `expressions`) → the values, in `details` at their `result_path` (default
/// `result`). Synchronous.
#[derive(Debug, Default)]
pub struct ExpressionEval;

impl ExpressionEval {
    fn evaluate(body: &Value) -> Result<Value, String> {
        let one = |item: &Value, details: &mut Value| -> Result<(), String> {
            let text = item
                .get("expression")
                .and_then(Value::as_str)
                .ok_or("`expression` is missing or not a string")?;
            let args = item.get("arguments").cloned().unwrap_or_else(|| json!({}));
            let value = crate::expr::evaluate(text, &args).map_err(|e| format!("`{text}`: {e}"))?;
            let at = item
                .get("result_path")
                .and_then(Value::as_str)
                .unwrap_or("result");
            let path = if at.starts_with('$') {
                at.to_string()
            } else {
                format!("$.{at}")
            };
            crate::path::RefPath::parse(&path)?.set(details, value)
        };
        let mut details = json!({});
        match body.get("expressions") {
            Some(Value::Array(items)) => {
                for item in items {
                    one(item, &mut details)?;
                }
            }
            Some(_) => return Err("`expressions` must be a list".into()),
            None => one(body, &mut details)?,
        }
        Ok(details)
    }
}

impl Provider for ExpressionEval {
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async move {
            Ok(match ExpressionEval::evaluate(&request.body) {
                Ok(details) => Action::done(&request, true, details),
                Err(e) => Action::done(
                    &request,
                    false,
                    json!({"code": "ExpressionEvaluationError", "description": e}),
                ),
            })
        })
    }

    fn status(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        let id = action_id.to_string();
        Box::pin(async move {
            Err(Refusal::not_found(format!(
                "expression-eval keeps no actions ({id}): it answers at once"
            )))
        })
    }

    fn cancel(&self, action_id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.status(action_id)
    }
}
