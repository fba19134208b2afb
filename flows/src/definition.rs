//! A flow definition, read and checked: the Globus Flows dialect of the Amazon States Language.
//!
//! [`Definition::parse`] reads a definition's JSON into typed states, compiling every path,
//! template and expression on the way, then checks the whole: `StartAt` and every `Next`,
//! `Default` and `Catch` target name a state, every state can be reached, and every branch can
//! end. Any problem is an [`Error`] naming the state and the field, so that a definition is
//! refused before anything runs. Action URLs are checked against the providers a node has by
//! [`Definition::check_actions`].
//!
//! ```
//! use serde_json::json;
//! use flows::definition::Definition;
//!
//! let ok = Definition::parse(&json!({
//!     "StartAt": "Hello",
//!     "States": {"Hello": {"Type": "Pass", "Result": {"greeting": "hi"}, "End": true}}
//! }));
//! assert!(ok.is_ok());
//!
//! let bad = Definition::parse(&json!({
//!     "StartAt": "Hello",
//!     "States": {"Hello": {"Type": "Pass", "Nxet": "Hello"}}
//! }))
//! .unwrap_err();
//! assert_eq!(bad.to_string(), "state `Hello`, field `Nxet`: unknown field for a Pass state");
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::choice::Rule;
use crate::path::{Path, RefPath};
use crate::template::Template;

/// Most states one definition may have (nested branches and iterators included).
pub const MAX_STATES: usize = 10_000;

/// How deep `Parallel` branches and `Map` iterators may nest.
pub const MAX_NESTING: usize = 16;

/// Longest `Wait` in seconds (a year, Globus' longest run).
pub const MAX_WAIT_SECONDS: f64 = 31_536_000.0;

/// What is wrong with a definition: where (the state, if any, and the field) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The state, with the states it is nested in (`Outer/branch 0/Inner`); `None` for a
    /// top-level field.
    pub state: Option<String>,
    /// The field.
    pub field: String,
    /// What is wrong, and what to do.
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            Some(s) => write!(f, "state `{s}`, field `{}`: {}", self.field, self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for Error {}

/// A checked flow definition.
#[derive(Debug, Clone)]
pub struct Definition {
    /// `Comment`.
    pub comment: Option<String>,
    /// `StartAt`.
    pub start_at: String,
    /// `States`, by name.
    pub states: BTreeMap<String, State>,
}

/// Where a state goes when it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// `Next`: another state.
    To(String),
    /// `End: true`: the flow (or branch) ends with this state's output.
    End,
}

/// A state's input and output processing: `InputPath` or `Parameters`, then `ResultPath`.
#[derive(Debug, Clone)]
pub struct Io {
    /// `InputPath`: the part of the state's input it works on (the whole input if absent).
    pub input_path: Option<Path>,
    /// `Parameters`: the state's effective input, built from the (selected) input.
    pub parameters: Option<Template>,
    /// `ResultPath`: where the result goes in the state's input to make its output. `None`
    /// (`"ResultPath": null`) discards the result and passes the input on.
    pub result_path: Option<RefPath>,
}

/// `Retry`: run a failed step again.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrier {
    /// `ErrorEquals`: the error names it applies to (`States.ALL`: any).
    pub errors: Vec<String>,
    /// `IntervalSeconds` (default 1): the wait before the first retry.
    pub interval_seconds: f64,
    /// `MaxAttempts` (default 3): retries at most (0: none).
    pub max_attempts: u32,
    /// `BackoffRate` (default 2.0): each wait is the previous one times this.
    pub backoff_rate: f64,
    /// `MaxDelaySeconds`: no wait is longer.
    pub max_delay_seconds: Option<f64>,
}

/// `Catch`: go to another state when a step fails.
#[derive(Debug, Clone)]
pub struct Catcher {
    /// `ErrorEquals`.
    pub errors: Vec<String>,
    /// `Next`.
    pub next: String,
    /// `ResultPath` (default `$`): where the error object goes.
    pub result_path: Option<RefPath>,
}

/// A string given as is, or taken from the input at a path.
#[derive(Debug, Clone)]
pub enum Text {
    /// As written.
    Fixed(String),
    /// The string at a path of the state's input.
    Path(Path),
}

/// How long a `Wait` state waits.
#[derive(Debug, Clone)]
pub enum WaitFor {
    /// `Seconds`.
    Seconds(f64),
    /// `SecondsPath`.
    SecondsPath(Path),
    /// `Timestamp` (RFC 3339).
    Timestamp(String),
    /// `TimestampPath`.
    TimestampPath(Path),
}

/// An `Action` state: run an action provider's action and wait for it.
#[derive(Debug, Clone)]
pub struct Action {
    /// `ActionUrl`.
    pub url: String,
    /// `InputPath`, `Parameters`, `ResultPath`.
    pub io: Io,
    /// `WaitTime` (default 300 s): how long the action may take.
    pub wait_time: f64,
    /// `ExceptionOnActionFailure` (default true): a failed action is an error the state's
    /// `Catch` sees; otherwise its status is the result and the flow goes on.
    pub exception_on_action_failure: bool,
    /// `RunAs`: whose rights the action uses (a role the run's starter delegated).
    pub run_as: Option<String>,
    /// `Retry`.
    pub retry: Vec<Retrier>,
    /// `Catch`.
    pub catch: Vec<Catcher>,
    /// `Next` or `End`.
    pub next: Next,
}

/// The kinds of state.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `Pass`: its input (or `Result`, or `Parameters`) at `ResultPath`.
    Pass {
        /// `InputPath`, `Parameters`, `ResultPath`.
        io: Io,
        /// `Result`: a constant result.
        result: Option<Value>,
        /// `Next` or `End`.
        next: Next,
    },
    /// `Action`.
    Action(Box<Action>),
    /// `ExpressionEval`: `Parameters` evaluated, at `ResultPath`.
    ExpressionEval {
        /// `InputPath`, `Parameters` (required), `ResultPath`.
        io: Io,
        /// `Next` or `End`.
        next: Next,
    },
    /// `Choice`: the first rule that matches names the next state, else `Default`.
    Choice {
        /// `Choices`, each with its `Next`.
        choices: Vec<(Rule, String)>,
        /// `Default`.
        default: Option<String>,
    },
    /// `Wait`.
    Wait {
        /// How long.
        wait: WaitFor,
        /// `InputPath`, `ResultPath` are not used; the input passes through.
        next: Next,
    },
    /// `Fail`: the flow fails.
    Fail {
        /// `Error` or `ErrorPath`.
        error: Option<Text>,
        /// `Cause` or `CausePath`.
        cause: Option<Text>,
    },
    /// `Succeed`: the flow (or branch) ends successfully with its input.
    Succeed {
        /// `InputPath`: the part of the input that is the output.
        input_path: Option<Path>,
    },
    /// `Parallel`: each branch runs on the input; the result is the list of their outputs.
    Parallel {
        /// `Branches`.
        branches: Vec<Definition>,
        /// `InputPath`, `Parameters`, `ResultPath`.
        io: Io,
        /// `Retry`.
        retry: Vec<Retrier>,
        /// `Catch`.
        catch: Vec<Catcher>,
        /// `Next` or `End`.
        next: Next,
    },
    /// `Map`: the iterator runs once per item of a list; the result is the list of outputs.
    Map {
        /// `ItemsPath` (default `$`): the list.
        items_path: Path,
        /// `Iterator` (or `ItemProcessor`).
        iterator: Box<Definition>,
        /// `MaxConcurrency` (0 or absent: no limit).
        max_concurrency: u32,
        /// `InputPath`, `Parameters` (each item's input, with `$$.Map.Item.Value`), `ResultPath`.
        io: Io,
        /// `Retry`.
        retry: Vec<Retrier>,
        /// `Catch`.
        catch: Vec<Catcher>,
        /// `Next` or `End`.
        next: Next,
    },
}

/// One state of a definition.
#[derive(Debug, Clone)]
pub struct State {
    /// `Comment`.
    pub comment: Option<String>,
    /// What it does.
    pub kind: Kind,
}

impl State {
    /// The states this one may go to next.
    pub fn targets(&self) -> Vec<&str> {
        fn next(n: &Next) -> Option<&str> {
            match n {
                Next::To(s) => Some(s.as_str()),
                Next::End => None,
            }
        }
        let mut out = Vec::new();
        match &self.kind {
            Kind::Pass { next: n, .. }
            | Kind::ExpressionEval { next: n, .. }
            | Kind::Wait { next: n, .. } => out.extend(next(n)),
            Kind::Action(a) => {
                out.extend(next(&a.next));
                out.extend(a.catch.iter().map(|c| c.next.as_str()));
            }
            Kind::Parallel { next: n, catch, .. } | Kind::Map { next: n, catch, .. } => {
                out.extend(next(n));
                out.extend(catch.iter().map(|c| c.next.as_str()));
            }
            Kind::Choice { choices, default } => {
                out.extend(choices.iter().map(|(_, n)| n.as_str()));
                out.extend(default.as_deref());
            }
            Kind::Fail { .. } | Kind::Succeed { .. } => {}
        }
        out
    }

    /// Whether a run can end at this state.
    pub fn is_terminal(&self) -> bool {
        match &self.kind {
            Kind::Pass { next, .. }
            | Kind::ExpressionEval { next, .. }
            | Kind::Wait { next, .. }
            | Kind::Parallel { next, .. }
            | Kind::Map { next, .. } => *next == Next::End,
            Kind::Action(a) => a.next == Next::End,
            Kind::Fail { .. } | Kind::Succeed { .. } => true,
            Kind::Choice { .. } => false,
        }
    }
}

impl Definition {
    /// Reads and checks a definition.
    pub fn parse(doc: &Value) -> Result<Definition, Error> {
        let mut count = 0;
        parse_definition(doc, "", 0, &mut count)
    }

    /// Checks that every `Action` state's `ActionUrl` is one `known` accepts (nested branches
    /// and iterators included).
    pub fn check_actions(&self, known: &dyn Fn(&str) -> bool) -> Result<(), Error> {
        self.check_actions_in("", known)
    }

    fn check_actions_in(&self, prefix: &str, known: &dyn Fn(&str) -> bool) -> Result<(), Error> {
        for (name, state) in &self.states {
            let here = format!("{prefix}{name}");
            match &state.kind {
                Kind::Action(a) if !known(&a.url) => {
                    return Err(Error {
                        state: Some(here),
                        field: "ActionUrl".into(),
                        message: format!(
                            "no action provider is known at `{}`: use one of this node's \
                             providers (`funcmesh flow providers`) or a flow's URL",
                            a.url
                        ),
                    });
                }
                Kind::Parallel { branches, .. } => {
                    for (i, b) in branches.iter().enumerate() {
                        b.check_actions_in(&format!("{here}/branch {i}/"), known)?;
                    }
                }
                Kind::Map { iterator, .. } => {
                    iterator.check_actions_in(&format!("{here}/iterator/"), known)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every action URL the definition uses, nested ones included.
    pub fn action_urls(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for state in self.states.values() {
            match &state.kind {
                Kind::Action(a) => {
                    out.insert(a.url.clone());
                }
                Kind::Parallel { branches, .. } => {
                    for b in branches {
                        out.extend(b.action_urls());
                    }
                }
                Kind::Map { iterator, .. } => out.extend(iterator.action_urls()),
                _ => {}
            }
        }
        out
    }
}

/// Reads fields off one JSON object, remembering which were read so that the rest can be
/// reported as unknown.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    state: Option<String>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error {
            state: self.state.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn get(&mut self, field: &'static str) -> Option<&'a Value> {
        self.used.insert(field);
        self.map.get(field)
    }

    fn string(&mut self, field: &'static str) -> Result<Option<String>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(field, "must be a string")),
        }
    }

    fn required_string(&mut self, field: &'static str, what: &str) -> Result<String, Error> {
        self.string(field)?
            .ok_or_else(|| self.err(field, format!("missing: {what}")))
    }

    fn number(&mut self, field: &'static str) -> Result<Option<f64>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
                _ => Err(self.err(field, "must be a number that is not negative")),
            },
            Some(_) => Err(self.err(field, "must be a number")),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<Option<bool>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(field, "must be true or false")),
        }
    }

    fn path(&mut self, field: &'static str) -> Result<Option<Path>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Path::parse(s).map(Some).map_err(|e| self.err(field, e)),
            Some(_) => Err(self.err(field, "must be a JSONPath string such as `$.data`")),
        }
    }

    /// `ResultPath`: absent is `default`, `null` discards the result.
    fn result_path(
        &mut self,
        field: &'static str,
        default: &str,
    ) -> Result<Option<RefPath>, Error> {
        match self.get(field) {
            None => Ok(Some(
                RefPath::parse(default).map_err(|e| self.err(field, e))?,
            )),
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let p = RefPath::parse(s).map_err(|e| self.err(field, e))?;
                if p.steps().first() == Some(&crate::path::Step::Name("_context".into())) {
                    return Err(self.err(
                        field,
                        "`$._context` is the run's context: it cannot be written",
                    ));
                }
                Ok(Some(p))
            }
            Some(_) => Err(self.err(field, "must be a path string such as `$.result`, or null")),
        }
    }

    fn template(&mut self, field: &'static str) -> Result<Option<Template>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => Template::compile(v)
                .map(Some)
                .map_err(|e| self.err(field, e)),
        }
    }

    fn io(&mut self, result_default: &str) -> Result<Io, Error> {
        let input_path = self.path("InputPath")?;
        let parameters = self.template("Parameters")?;
        let result_path = self.result_path("ResultPath", result_default)?;
        Ok(Io {
            input_path,
            parameters,
            result_path,
        })
    }

    fn next(&mut self) -> Result<Next, Error> {
        let next = self.string("Next")?;
        let end = self.bool("End")?;
        match (next, end) {
            (Some(_), Some(true)) => {
                Err(self.err("End", "a state has `Next` or `End: true`, not both"))
            }
            (Some(n), _) => Ok(Next::To(n)),
            (None, Some(true)) => Ok(Next::End),
            (None, _) => Err(self.err(
                "Next",
                "missing: name the next state, or say `\"End\": true`",
            )),
        }
    }

    fn retry(&mut self) -> Result<Vec<Retrier>, Error> {
        let Some(v) = self.get("Retry") else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v else {
            return Err(self.err("Retry", "must be a list of retriers"));
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("Retry[{i}]");
            let Value::Object(map) = item else {
                return Err(self.err(&field, "must be an object"));
            };
            let mut f = Fields {
                map,
                state: self.state.clone(),
                used: BTreeSet::new(),
            };
            let errors = error_names(&mut f)?;
            let interval_seconds = f.number("IntervalSeconds")?.unwrap_or(1.0);
            let max_attempts = match f.number("MaxAttempts")? {
                None => 3,
                Some(n) if n.fract() == 0.0 && n <= 1_000.0 => n as u32,
                Some(_) => {
                    return Err(f.err("MaxAttempts", "must be a whole number of at most 1000"));
                }
            };
            let backoff_rate = f.number("BackoffRate")?.unwrap_or(2.0);
            if backoff_rate < 1.0 {
                return Err(f.err("BackoffRate", "must be at least 1.0"));
            }
            let max_delay_seconds = f.number("MaxDelaySeconds")?;
            f.only(&[], "a retrier").map_err(|e| prefix(e, &field))?;
            out.push(Retrier {
                errors,
                interval_seconds,
                max_attempts,
                backoff_rate,
                max_delay_seconds,
            });
        }
        Ok(out)
    }

    fn catch(&mut self) -> Result<Vec<Catcher>, Error> {
        let Some(v) = self.get("Catch") else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v else {
            return Err(self.err("Catch", "must be a list of catchers"));
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("Catch[{i}]");
            let Value::Object(map) = item else {
                return Err(self.err(&field, "must be an object"));
            };
            let mut f = Fields {
                map,
                state: self.state.clone(),
                used: BTreeSet::new(),
            };
            let errors = error_names(&mut f).map_err(|e| prefix(e, &field))?;
            let next = f
                .required_string("Next", "the state to go to when the error is caught")
                .map_err(|e| prefix(e, &field))?;
            let result_path = f
                .result_path("ResultPath", "$")
                .map_err(|e| prefix(e, &field))?;
            f.only(&[], "a catcher").map_err(|e| prefix(e, &field))?;
            out.push(Catcher {
                errors,
                next,
                result_path,
            });
        }
        Ok(out)
    }

    /// Fails on the first field that was not read (or in `ignored`).
    fn only(&self, ignored: &[&str], what: &str) -> Result<(), Error> {
        for key in self.map.keys() {
            if !self.used.contains(key.as_str()) && !ignored.contains(&key.as_str()) {
                return Err(self.err(key, format!("unknown field for {what}")));
            }
        }
        Ok(())
    }
}

fn prefix(mut e: Error, field: &str) -> Error {
    e.field = format!("{field}.{}", e.field);
    e
}

fn error_names(f: &mut Fields<'_>) -> Result<Vec<String>, Error> {
    match f.get("ErrorEquals") {
        Some(Value::Array(names)) if !names.is_empty() => {
            let mut out = Vec::new();
            for n in names {
                match n {
                    Value::String(s) => out.push(s.clone()),
                    _ => return Err(f.err("ErrorEquals", "must list error names (strings)")),
                }
            }
            if out.iter().any(|n| n == "States.ALL") && out.len() > 1 {
                return Err(f.err("ErrorEquals", "`States.ALL` must appear alone"));
            }
            Ok(out)
        }
        Some(_) => Err(f.err("ErrorEquals", "must be a non-empty list of error names")),
        None => Err(f.err("ErrorEquals", "missing: the error names this applies to")),
    }
}

fn parse_definition(
    doc: &Value,
    prefix: &str,
    depth: usize,
    count: &mut usize,
) -> Result<Definition, Error> {
    let top = |field: &str, message: String| Error {
        state: (!prefix.is_empty()).then(|| prefix.trim_end_matches('/').to_string()),
        field: field.to_string(),
        message,
    };
    if depth > MAX_NESTING {
        return Err(top(
            "States",
            format!("branches and iterators nest more than {MAX_NESTING} deep"),
        ));
    }
    let Value::Object(map) = doc else {
        return Err(top(
            "definition",
            "a flow definition is a JSON object".into(),
        ));
    };
    let mut f = Fields {
        map,
        state: (!prefix.is_empty()).then(|| prefix.trim_end_matches('/').to_string()),
        used: BTreeSet::new(),
    };
    let comment = f.string("Comment")?;
    let start_at = f.required_string("StartAt", "the name of the first state")?;
    let Some(states_v) = f.get("States") else {
        return Err(f.err("States", "missing: the flow's states, by name"));
    };
    let Value::Object(states_map) = states_v else {
        return Err(f.err("States", "must be an object of states by name"));
    };
    if states_map.is_empty() {
        return Err(f.err("States", "a flow needs at least one state"));
    }
    f.only(&[], "a flow definition")?;
    let mut states = BTreeMap::new();
    for (name, v) in states_map {
        *count += 1;
        if *count > MAX_STATES {
            return Err(top(
                "States",
                format!("a flow may have at most {MAX_STATES} states"),
            ));
        }
        let here = format!("{prefix}{name}");
        if name.is_empty() || name.len() > 128 {
            return Err(Error {
                state: Some(here),
                field: "States".into(),
                message: "a state's name must be 1 to 128 characters".into(),
            });
        }
        states.insert(name.clone(), parse_state(v, &here, depth, count)?);
    }
    let def = Definition {
        comment,
        start_at,
        states,
    };
    check_graph(&def, prefix)?;
    Ok(def)
}

fn parse_state(v: &Value, here: &str, depth: usize, count: &mut usize) -> Result<State, Error> {
    let Value::Object(map) = v else {
        return Err(Error {
            state: Some(here.to_string()),
            field: "Type".into(),
            message: "a state is a JSON object".into(),
        });
    };
    let mut f = Fields {
        map,
        state: Some(here.to_string()),
        used: BTreeSet::new(),
    };
    let ty = f.required_string(
        "Type",
        "one of Action, Pass, Choice, Wait, Fail, Succeed, ExpressionEval, Parallel, Map",
    )?;
    let comment = f.string("Comment")?;
    // Unknown fields first: a misspelt `Next` is reported as such, not as a missing `Next`.
    if let Some(known) = fields_of(&ty) {
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(f.err(
                key,
                format!("unknown field for {} {ty} state", article(&ty)),
            ));
        }
    }
    let kind = match ty.as_str() {
        "Pass" => {
            let io = f.io("$")?;
            // `Result`, when given, is the result whatever `Parameters` says (as in ASL).
            let result = f.get("Result").cloned();
            Kind::Pass {
                io,
                result,
                next: f.next()?,
            }
        }
        "Action" => {
            if map.contains_key("Resource") {
                return Err(f.err(
                    "Resource",
                    "a field of an old dialect: name the action provider with `ActionUrl`",
                ));
            }
            let url = f.required_string("ActionUrl", "the URL of the action provider to run")?;
            let io = f.io("$")?;
            match (&io.input_path, &io.parameters) {
                (Some(_), Some(_)) => {
                    return Err(f.err(
                        "InputPath",
                        "an Action state has `InputPath` or `Parameters`, not both",
                    ));
                }
                (None, None) => {
                    return Err(f.err(
                        "Parameters",
                        "missing: an Action state sends its `Parameters`, or the part of its \
                         input `InputPath` selects",
                    ));
                }
                _ => {}
            }
            let _scope = f.string("ActionScope")?;
            let wait_time = f.number("WaitTime")?.unwrap_or(300.0);
            let exception_on_action_failure = f.bool("ExceptionOnActionFailure")?.unwrap_or(true);
            let run_as = f.string("RunAs")?;
            let retry = f.retry()?;
            let catch = f.catch()?;
            Kind::Action(Box::new(Action {
                url,
                io,
                wait_time,
                exception_on_action_failure,
                run_as,
                retry,
                catch,
                next: f.next()?,
            }))
        }
        "ExpressionEval" => {
            let parameters = f.template("Parameters")?;
            if parameters.is_none() {
                return Err(f.err("Parameters", "missing: the values to compute"));
            }
            if !map.contains_key("ResultPath") {
                return Err(f.err(
                    "ResultPath",
                    "missing: where the computed values go, such as `$.computed`",
                ));
            }
            let io = Io {
                input_path: None,
                parameters,
                result_path: f.result_path("ResultPath", "$")?,
            };
            Kind::ExpressionEval {
                io,
                next: f.next()?,
            }
        }
        "Choice" => {
            let Some(Value::Array(items)) = f.get("Choices") else {
                return Err(f.err("Choices", "missing or not a list: the rules to choose by"));
            };
            if items.is_empty() {
                return Err(f.err("Choices", "a Choice state needs at least one rule"));
            }
            let mut choices = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let (rule, next) = Rule::parse_top(item)
                    .map_err(|(field, message)| f.err(&format!("Choices[{i}]{field}"), message))?;
                choices.push((rule, next));
            }
            let default = f.string("Default")?;
            Kind::Choice { choices, default }
        }
        "Wait" => {
            let seconds = f.number("Seconds")?;
            let seconds_path = f.path("SecondsPath")?;
            let timestamp = f.string("Timestamp")?;
            let timestamp_path = f.path("TimestampPath")?;
            if let Some(s) = seconds {
                if s.fract() != 0.0 || s > MAX_WAIT_SECONDS {
                    return Err(f.err(
                        "Seconds",
                        format!(
                            "must be a whole number of seconds, at most {MAX_WAIT_SECONDS} (a year)"
                        ),
                    ));
                }
            }
            let wait = match (seconds, seconds_path, timestamp, timestamp_path) {
                (Some(s), None, None, None) => WaitFor::Seconds(s),
                (None, Some(p), None, None) => WaitFor::SecondsPath(p),
                (None, None, Some(t), None) => {
                    if crate::time::parse_rfc3339(&t).is_none() {
                        return Err(f.err(
                            "Timestamp",
                            "must be an RFC 3339 time such as `2026-12-24T18:00:00Z`",
                        ));
                    }
                    WaitFor::Timestamp(t)
                }
                (None, None, None, Some(p)) => WaitFor::TimestampPath(p),
                _ => {
                    return Err(f.err(
                        "Seconds",
                        "a Wait state has exactly one of `Seconds`, `SecondsPath`, \
                         `Timestamp`, `TimestampPath`",
                    ));
                }
            };
            Kind::Wait {
                wait,
                next: f.next()?,
            }
        }
        "Fail" => {
            let error = match (f.string("Error")?, f.path("ErrorPath")?) {
                (Some(_), Some(_)) => {
                    return Err(f.err("ErrorPath", "give `Error` or `ErrorPath`, not both"));
                }
                (Some(e), None) => Some(Text::Fixed(e)),
                (None, Some(p)) => Some(Text::Path(p)),
                (None, None) => None,
            };
            let cause = match (f.string("Cause")?, f.path("CausePath")?) {
                (Some(_), Some(_)) => {
                    return Err(f.err("CausePath", "give `Cause` or `CausePath`, not both"));
                }
                (Some(c), None) => Some(Text::Fixed(c)),
                (None, Some(p)) => Some(Text::Path(p)),
                (None, None) => None,
            };
            Kind::Fail { error, cause }
        }
        "Succeed" => Kind::Succeed {
            input_path: f.path("InputPath")?,
        },
        "Parallel" => {
            let Some(Value::Array(items)) = f.get("Branches") else {
                return Err(f.err(
                    "Branches",
                    "missing or not a list: the flows to run at once",
                ));
            };
            if items.is_empty() {
                return Err(f.err("Branches", "a Parallel state needs at least one branch"));
            }
            let mut branches = Vec::new();
            for (i, b) in items.iter().enumerate() {
                branches.push(parse_definition(
                    b,
                    &format!("{here}/branch {i}/"),
                    depth + 1,
                    count,
                )?);
            }
            let io = f.io("$")?;
            Kind::Parallel {
                branches,
                io,
                retry: f.retry()?,
                catch: f.catch()?,
                next: f.next()?,
            }
        }
        "Map" => {
            let items_path = f.path("ItemsPath")?;
            let items_path = match items_path {
                Some(p) => p,
                None => Path::parse("$").map_err(|e| f.err("ItemsPath", e))?,
            };
            let iterator = match (f.get("Iterator"), f.get("ItemProcessor")) {
                (Some(it), None) | (None, Some(it)) => {
                    parse_definition(it, &format!("{here}/iterator/"), depth + 1, count)?
                }
                (Some(_), Some(_)) => {
                    return Err(f.err("Iterator", "give `Iterator` or `ItemProcessor`, not both"));
                }
                (None, None) => {
                    return Err(f.err("Iterator", "missing: the flow to run for each item"));
                }
            };
            let max_concurrency = match f.number("MaxConcurrency")? {
                None => 0,
                Some(n) if n.fract() == 0.0 && n <= f64::from(u32::MAX) => n as u32,
                Some(_) => return Err(f.err("MaxConcurrency", "must be a whole number")),
            };
            let io = f.io("$")?;
            if let Some(p) = f.template("ItemSelector")? {
                if io.parameters.is_some() {
                    return Err(f.err(
                        "ItemSelector",
                        "give `ItemSelector` or `Parameters`, not both",
                    ));
                }
                let io = Io {
                    parameters: Some(p),
                    ..io
                };
                Kind::Map {
                    items_path,
                    iterator: Box::new(iterator),
                    max_concurrency,
                    io,
                    retry: f.retry()?,
                    catch: f.catch()?,
                    next: f.next()?,
                }
            } else {
                Kind::Map {
                    items_path,
                    iterator: Box::new(iterator),
                    max_concurrency,
                    io,
                    retry: f.retry()?,
                    catch: f.catch()?,
                    next: f.next()?,
                }
            }
        }
        other => {
            let hint = match other {
                "ActionWait" => {
                    ": an old dialect's state; an Action state waits for its action itself"
                }
                "Task" => ": use an Action state with an ActionUrl",
                _ => "",
            };
            return Err(f.err(
                "Type",
                format!(
                    "unknown state type `{other}`{hint} (known: Action, Pass, Choice, Wait, \
                     Fail, Succeed, ExpressionEval, Parallel, Map)"
                ),
            ));
        }
    };
    f.only(&[], &format!("{} {ty} state", article(&ty)))?;
    Ok(State { comment, kind })
}

/// The fields a state of type `ty` may have (`None`: not a known type).
fn fields_of(ty: &str) -> Option<&'static [&'static str]> {
    const IO: [&str; 3] = ["InputPath", "Parameters", "ResultPath"];
    Some(match ty {
        "Pass" => &[
            "Type", "Comment", IO[0], IO[1], IO[2], "Result", "Next", "End",
        ],
        "Action" => &[
            "Type",
            "Comment",
            "ActionUrl",
            "ActionScope",
            "RunAs",
            "ExceptionOnActionFailure",
            "WaitTime",
            IO[0],
            IO[1],
            IO[2],
            "Retry",
            "Catch",
            "Next",
            "End",
            // Old dialect, refused by name below.
            "Resource",
        ],
        "ExpressionEval" => &["Type", "Comment", "Parameters", "ResultPath", "Next", "End"],
        "Choice" => &["Type", "Comment", "Choices", "Default"],
        "Wait" => &[
            "Type",
            "Comment",
            "Seconds",
            "SecondsPath",
            "Timestamp",
            "TimestampPath",
            "Next",
            "End",
        ],
        "Fail" => &[
            "Type",
            "Comment",
            "Error",
            "ErrorPath",
            "Cause",
            "CausePath",
        ],
        "Succeed" => &["Type", "Comment", "InputPath"],
        "Parallel" => &[
            "Type", "Comment", "Branches", IO[0], IO[1], IO[2], "Retry", "Catch", "Next", "End",
        ],
        "Map" => &[
            "Type",
            "Comment",
            "ItemsPath",
            "Iterator",
            "ItemProcessor",
            "ItemSelector",
            "MaxConcurrency",
            IO[0],
            IO[1],
            IO[2],
            "Retry",
            "Catch",
            "Next",
            "End",
        ],
        _ => return None,
    })
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}

/// `StartAt` and every target name a state; every state is reachable; some state ends.
fn check_graph(def: &Definition, prefix: &str) -> Result<(), Error> {
    let at = |name: &str| format!("{prefix}{name}");
    if !def.states.contains_key(&def.start_at) {
        return Err(Error {
            state: (!prefix.is_empty()).then(|| prefix.trim_end_matches('/').to_string()),
            field: "StartAt".into(),
            message: format!("no state is named `{}`", def.start_at),
        });
    }
    for (name, state) in &def.states {
        for target in state.targets() {
            if !def.states.contains_key(target) {
                return Err(Error {
                    state: Some(at(name)),
                    field: field_of(state, target).into(),
                    message: format!("no state is named `{target}`"),
                });
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![def.start_at.as_str()];
    while let Some(s) = todo.pop() {
        if !seen.insert(s) {
            continue;
        }
        if let Some(state) = def.states.get(s) {
            todo.extend(state.targets());
        }
    }
    if let Some(lost) = def.states.keys().find(|k| !seen.contains(k.as_str())) {
        return Err(Error {
            state: Some(at(lost)),
            field: "Type".into(),
            message: format!(
                "this state cannot be reached from `{}`: remove it or make a state go to it",
                def.start_at
            ),
        });
    }
    if !def.states.values().any(State::is_terminal) {
        return Err(Error {
            state: (!prefix.is_empty()).then(|| prefix.trim_end_matches('/').to_string()),
            field: "States".into(),
            message: "no state ends the flow: give one `\"End\": true`, or add a Succeed or \
                      Fail state"
                .into(),
        });
    }
    Ok(())
}

/// The field of `state` that names `target` (for an error message).
fn field_of(state: &State, target: &str) -> &'static str {
    match &state.kind {
        Kind::Choice { choices, default } => {
            if default.as_deref() == Some(target) && !choices.iter().any(|(_, n)| n == target) {
                "Default"
            } else {
                "Choices"
            }
        }
        Kind::Action(a) if a.next != Next::To(target.to_string()) => "Catch",
        Kind::Parallel { next, .. } | Kind::Map { next, .. }
            if *next != Next::To(target.to_string()) =>
        {
            "Catch"
        }
        _ => "Next",
    }
}
