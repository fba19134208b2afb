//! The run engine: corpus flows run to completion, a run survives its engine's death in the
//! middle of an action without starting the action twice, Retry, Catch, Wait, and an INACTIVE
//! action resumed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use flows::engine::{Engine, Event, RunStatus};
use flows::provider::{
    Action, BoxFuture, HelloWorld, Provider, Providers, Refusal, Request, Status,
};
use serde_json::{Value, json};

use crate::definition::corpus_dir;

fn corpus(rel: &str) -> Value {
    let text = std::fs::read_to_string(corpus_dir().join(rel)).expect("corpus file");
    serde_json::from_str(&text).expect("corpus JSON")
}

fn open(dir: &std::path::Path, providers: Providers) -> Engine {
    let store = store::Store::open(&dir.join("db")).expect("store");
    Engine::open(store, providers).expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_counting_loop_runs_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = corpus("globus-automate-client/loop-a-set-number-of-times/definition.json");
    engine
        .start("loop-1", "flow-loop", &def, json!({}), "alice", None)
        .unwrap();
    let run = engine
        .wait("loop-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.details,
        json!({"output": {"state_manager": {"counter": 10}}})
    );
    // Test, Initialize, then ten rounds of Test and Increment, then Test and Success.
    let exits = engine
        .log("loop-1")
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::StateExited { .. }))
        .count();
    assert_eq!(exits, 2 + 2 * 10 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_hello_world_runs_with_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = corpus("globus-automate-client/hello-world/definition.json");
    // The corpus input sleeps 20 s; the same flow with a short sleep.
    let input = json!({"input": {"echo_string": "From automate cli", "sleep_time": 0.2}});
    engine
        .start(
            "hello-1",
            "flow-hello",
            &def,
            input.clone(),
            "alice",
            Some("hi".into()),
        )
        .unwrap();
    let run = engine
        .wait("hello-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let out = &run.details["output"];
    assert_eq!(out["input"], input["input"]);
    assert_eq!(out["HelloResult"]["status"], "SUCCEEDED");
    assert_eq!(out["HelloResult"]["state_name"], "RunHelloWorld");
    assert_eq!(
        out["HelloResult"]["details"],
        json!({"Hello": "World", "hello": "From automate cli"})
    );
    assert_eq!(out["HelloResult"]["label"], "hi");
}

#[test]
fn a_run_killed_in_the_middle_of_an_action_resumes_without_starting_it_again() {
    let dir = tempfile::tempdir().unwrap();
    // The provider outlives the node, as a remote provider would.
    let hello = Arc::new(HelloWorld::default());
    let providers = || {
        let mut p = Providers::builtin();
        p.add("https://actions.globus.org/hello_world", hello.clone());
        p
    };
    let def = json!({
        "StartAt": "Hello",
        "States": {
            "Hello": {
                "Type": "Action",
                "ActionUrl": "https://actions.globus.org/hello_world",
                "Parameters": {"echo_string.$": "$.who", "sleep_time": 1.5},
                "ResultPath": "$.said",
                "Next": "Done"
            },
            "Done": {"Type": "Pass", "End": true}
        }
    });
    // First life: the run starts its action; the runtime is torn down while it runs.
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let engine = open(dir.path(), providers());
        engine
            .start(
                "crash-1",
                "flow",
                &def,
                json!({"who": "you"}),
                "alice",
                None,
            )
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while hello.started() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the action never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let log = engine.log("crash-1").unwrap();
        assert!(log.iter().any(|e| matches!(e, Event::ActionStarted { .. })));
        assert_eq!(
            engine.get("crash-1").unwrap().unwrap().status,
            RunStatus::Active
        );
    });
    // Every task of the first life is dropped with its runtime (the store closes with them).
    drop(first);
    // Second life: the same store; the run goes on from its log.
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let engine = open(dir.path(), providers());
        let run = engine
            .wait("crash-1", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.details["output"]["said"]["details"]["hello"], "you");
        let started: Vec<String> = engine
            .log("crash-1")
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Event::ActionStarted { request_id, .. } => Some(request_id),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1, "one request id: {started:?}");
    });
    assert_eq!(hello.started(), 1, "the action was started once");
}

/// An action that stays ACTIVE until `done`; while `stopped`, its status cannot be read (the
/// service behind it is stopping with the node).
#[derive(Default)]
struct Stopping {
    stopped: AtomicBool,
    done: AtomicBool,
    runs: AtomicU32,
    request: std::sync::Mutex<Option<Request>>,
}

impl Stopping {
    fn answer(&self, request: &Request) -> Action {
        let mut a = Action::done(request, true, json!({"ok": true}));
        if !self.done.load(Ordering::SeqCst) {
            a.status = Status::Active;
            a.completion_time = None;
        }
        a
    }
}

impl Provider for Stopping {
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        *self.request.lock().expect("lock") = Some(request.clone());
        Box::pin(async move { Ok(self.answer(&request)) })
    }
    fn status(&self, _: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async move {
            let request = self.request.lock().expect("lock").clone();
            match request {
                Some(r) if !self.stopped.load(Ordering::SeqCst) => Ok(self.answer(&r)),
                _ => Err(Refusal {
                    code: "ServiceUnavailable".into(),
                    description: "the task dispatcher has stopped".into(),
                }),
            }
        })
    }
    fn cancel(&self, id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.status(id)
    }
}

#[test]
fn a_run_is_not_failed_by_its_node_stopping_and_resumes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Stopping::default());
    let providers = || {
        let mut p = Providers::builtin();
        p.add("https://example.org/stopping", provider.clone());
        p
    };
    let def = json!({
        "StartAt": "Long",
        "States": {"Long": {
            "Type": "Action", "ActionUrl": "https://example.org/stopping",
            "Parameters": {}, "ResultPath": "$.long", "End": true}}
    });
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let engine = open(dir.path(), providers());
        engine
            .start("stop-1", "flow", &def, json!({}), "alice", None)
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while provider.runs.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The node stops: the engine closes, then the services behind the providers stop.
        engine.close();
        provider.stopped.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while engine.driving() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the run was still driven after close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let run = engine.get("stop-1").unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Active, "{run:?}");
        assert!(
            !engine
                .log("stop-1")
                .unwrap()
                .iter()
                .any(|e| matches!(e, Event::FlowFailed { .. })),
            "nothing is recorded while the node stops"
        );
    });
    drop(first);
    // The next start: the services are back and the action has finished meanwhile.
    provider.stopped.store(false, Ordering::SeqCst);
    provider.done.store(true, Ordering::SeqCst);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let engine = open(dir.path(), providers());
        let run = engine
            .wait("stop-1", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    });
}

/// Fails its first `fails` actions (FAILED status), then succeeds; or INACTIVE until `open`.
struct Flaky {
    fails: u32,
    calls: AtomicU32,
    gate: Option<Arc<AtomicBool>>,
}

impl Provider for Flaky {
    fn run(&self, request: Request) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async move {
            if let Some(gate) = &self.gate {
                let mut a = Action::done(&request, true, json!({"ok": true}));
                if !gate.load(Ordering::SeqCst) {
                    a.status = Status::Inactive;
                    a.details = json!({"code": "ConsentRequired", "description": "grant it"});
                }
                return Ok(a);
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(if n < self.fails {
                Action::done(&request, false, json!({"attempt": n}))
            } else {
                Action::done(&request, true, json!({"attempt": n}))
            })
        })
    }
    fn status(&self, _: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        Box::pin(async {
            Err(Refusal {
                code: "ActionNotFound".into(),
                description: "synchronous".into(),
            })
        })
    }
    fn cancel(&self, id: &str) -> BoxFuture<'_, Result<Action, Refusal>> {
        self.status(id)
    }
}

fn with(url: &str, p: Flaky) -> Providers {
    let mut providers = Providers::builtin();
    providers.add(url, Arc::new(p));
    providers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_a_failed_action_again_and_catch_takes_what_retry_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = "https://flaky.example/run";
    let engine = open(
        dir.path(),
        with(
            url,
            Flaky {
                fails: 2,
                calls: AtomicU32::new(0),
                gate: None,
            },
        ),
    );
    let def = |attempts: u32| {
        json!({
            "StartAt": "Try",
            "States": {
                "Try": {
                    "Type": "Action", "ActionUrl": url, "Parameters": {},
                    "ResultPath": "$.result",
                    "Retry": [{"ErrorEquals": ["ActionFailedException"], "IntervalSeconds": 0.05, "MaxAttempts": attempts}],
                    "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Caught"}],
                    "End": true
                },
                "Caught": {"Type": "Pass", "End": true}
            }
        })
    };
    // Two failures, two retries: the third attempt succeeds.
    engine
        .start("retry-1", "f", &def(2), json!({}), "alice", None)
        .unwrap();
    let run = engine
        .wait("retry-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.details["output"]["result"]["details"]["attempt"], 2);
    let retries = engine
        .log("retry-1")
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Retrying { .. }))
        .count();
    assert_eq!(retries, 2);

    // One retry is not enough for the next flaky provider: Catch takes the error.
    let dir2 = tempfile::tempdir().unwrap();
    let engine = open(
        dir2.path(),
        with(
            url,
            Flaky {
                fails: 5,
                calls: AtomicU32::new(0),
                gate: None,
            },
        ),
    );
    engine
        .start("retry-2", "f", &def(1), json!({"kept": 1}), "alice", None)
        .unwrap();
    let run = engine
        .wait("retry-2", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let out = &run.details["output"];
    assert_eq!(out["kept"], 1);
    assert_eq!(out["error"]["Error"], "ActionFailedException");
    assert_eq!(out["error"]["details"]["details"]["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncaught_failure_fails_the_run_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({
        "StartAt": "Check",
        "States": {
            "Check": {
                "Type": "Choice",
                "Choices": [{"Variable": "$.n", "NumericGreaterThan": 3, "Next": "Big"}],
                "Default": "Small"
            },
            "Big": {"Type": "Pass", "End": true},
            "Small": {"Type": "Fail", "Error": "TooSmall", "CausePath": "$.why"}
        }
    });
    engine
        .start(
            "fail-1",
            "f",
            &def,
            json!({"n": 2, "why": "n is 2"}),
            "alice",
            None,
        )
        .unwrap();
    let run = engine
        .wait("fail-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.details["Error"], "TooSmall");
    assert_eq!(run.details["Cause"], "n is 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_state_waits_and_its_timer_is_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({
        "StartAt": "Nap",
        "States": {"Nap": {"Type": "Wait", "SecondsPath": "$.s", "Next": "Up"},
                   "Up": {"Type": "Pass", "Result": "awake", "ResultPath": "$.state", "End": true}}
    });
    engine
        .start("wait-1", "f", &def, json!({"s": 1}), "alice", None)
        .unwrap();
    let run = engine
        .wait("wait-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.details["output"], json!({"s": 1, "state": "awake"}));
    let log = engine.log("wait-1").unwrap();
    let until = log
        .iter()
        .find_map(|e| match e {
            Event::Waiting { until_ms, .. } => Some(*until_ms),
            _ => None,
        })
        .expect("a Waiting event");
    let started = flows::time::parse_rfc3339(&run.start_time).unwrap();
    let ended = flows::time::parse_rfc3339(run.completion_time.as_deref().unwrap()).unwrap();
    assert!(until >= started + 1_000, "waits a second from its start");
    assert!(ended >= until, "ends after its timer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inactive_action_makes_the_run_inactive_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let url = "https://gated.example/run";
    let gate = Arc::new(AtomicBool::new(false));
    let engine = open(
        dir.path(),
        with(
            url,
            Flaky {
                fails: 0,
                calls: AtomicU32::new(0),
                gate: Some(gate.clone()),
            },
        ),
    );
    let def = json!({
        "StartAt": "Gated",
        "States": {"Gated": {"Type": "Action", "ActionUrl": url, "Parameters": {}, "ResultPath": "$.r", "End": true}}
    });
    engine
        .start("gate-1", "f", &def, json!({}), "alice", None)
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let run = engine.get("gate-1").unwrap().unwrap();
        if run.status == RunStatus::Inactive {
            assert_eq!(run.details["details"]["code"], "ConsentRequired");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never inactive: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.store(true, Ordering::SeqCst);
    engine.resume("gate-1").unwrap();
    let run = engine
        .wait("gate-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.details["output"]["r"]["details"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_with_an_unknown_action_url_is_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "https://nowhere.example", "Parameters": {}, "End": true}}});
    let e = engine
        .start("x-1", "f", &def, json!({}), "alice", None)
        .unwrap_err();
    assert!(e.contains("state `A`, field `ActionUrl`"), "{e}");
    assert!(engine.get("x-1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_branches_run_as_runs_of_their_own_and_gather_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({
        "StartAt": "Both",
        "States": {
            "Both": {
                "Type": "Parallel",
                "Parameters": {"n.$": "$.n"},
                "Branches": [
                    {"StartAt": "Double", "States": {"Double": {
                        "Type": "ExpressionEval", "Parameters": {"v.=": "n * 2"},
                        "ResultPath": "$", "End": true}}},
                    {"StartAt": "Hello", "States": {"Hello": {
                        "Type": "Action", "ActionUrl": "https://actions.globus.org/hello_world",
                        "Parameters": {"echo_string": "branch", "sleep_time": 0.1},
                        "ResultPath": "$.said", "End": true}}}
                ],
                "ResultPath": "$.both",
                "End": true
            }
        }
    });
    engine
        .start("par-1", "f", &def, json!({"n": 21}), "alice", None)
        .unwrap();
    let run = engine.wait("par-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let both = &run.details["output"]["both"];
    assert_eq!(both[0], json!({"v": 42}));
    assert_eq!(both[1]["n"], 21);
    assert_eq!(both[1]["said"]["details"]["hello"], "branch");
    let children: Vec<String> = engine
        .list()
        .unwrap()
        .into_iter()
        .filter(|r| r.parent.as_deref() == Some("par-1"))
        .map(|r| r.run_id)
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_runs_its_iterator_per_item_within_its_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({
        "StartAt": "Each",
        "States": {
            "Each": {
                "Type": "Map",
                "ItemsPath": "$.files",
                "MaxConcurrency": 2,
                "ItemSelector": {"name.$": "$$.Map.Item.Value", "index.$": "$$.Map.Item.Index", "dir.$": "$.dir"},
                "ItemProcessor": {"StartAt": "Path", "States": {"Path": {
                    "Type": "ExpressionEval",
                    "Parameters": {"path.=": "dir + '/' + name", "i.$": "$.index"},
                    "ResultPath": "$", "End": true}}},
                "ResultPath": "$.paths",
                "End": true
            }
        }
    });
    let files: Vec<String> = (0..7).map(|i| format!("f{i}")).collect();
    engine
        .start(
            "map-1",
            "f",
            &def,
            json!({"dir": "/data", "files": files}),
            "alice",
            None,
        )
        .unwrap();
    let run = engine.wait("map-1", Duration::from_secs(60)).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let paths = run.details["output"]["paths"].as_array().unwrap().clone();
    assert_eq!(paths.len(), 7);
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(p, &json!({"path": format!("/data/f{i}"), "i": i}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_fails_the_parallel_state_and_catch_takes_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let def = json!({
        "StartAt": "Both",
        "States": {
            "Both": {
                "Type": "Parallel",
                "Branches": [
                    {"StartAt": "Ok", "States": {"Ok": {"Type": "Pass", "End": true}}},
                    {"StartAt": "No", "States": {"No": {"Type": "Fail", "Error": "Broken", "Cause": "on purpose"}}}
                ],
                "Catch": [{"ErrorEquals": ["Broken"], "ResultPath": "$.why", "Next": "After"}],
                "End": true
            },
            "After": {"Type": "Pass", "End": true}
        }
    });
    engine
        .start("par-2", "f", &def, json!({}), "alice", None)
        .unwrap();
    let run = engine.wait("par-2", Duration::from_secs(30)).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.details["output"]["why"]["Error"], "Broken");
    assert!(
        run.details["output"]["why"]["Cause"]
            .as_str()
            .unwrap()
            .contains("on purpose")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_parallel_and_map_runs_complete() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    let inner = json!({"StartAt": "Each", "States": {"Each": {
        "Type": "Map", "ItemsPath": "$.xs",
        "Iterator": {"StartAt": "Sq", "States": {"Sq": {
            "Type": "ExpressionEval", "Parameters": {"v.=": "x * x"}, "ResultPath": "$", "End": true}}},
        "ItemSelector": {"x.$": "$$.Map.Item.Value"},
        "ResultPath": "$.squares", "End": true}}});
    let def = json!({"StartAt": "Outer", "States": {"Outer": {
        "Type": "Parallel", "Branches": [inner.clone(), inner], "ResultPath": "$.out", "End": true}}});
    engine
        .start("nest-1", "f", &def, json!({"xs": [1, 2, 3]}), "alice", None)
        .unwrap();
    let run = engine
        .wait("nest-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let squares = json!([{"v": 1}, {"v": 4}, {"v": 9}]);
    assert_eq!(run.details["output"]["out"][0]["squares"], squares);
    assert_eq!(run.details["output"]["out"][1]["squares"], squares);
}

/// The wait provider, in a run that dies in the middle of its wait: a new engine (and a new
/// provider, which remembers nothing) ends the wait when it was due, not a whole wait later.
#[test]
fn a_wait_action_keeps_its_deadline_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let def = json!({
        "StartAt": "Nap",
        "States": {"Nap": {
            "Type": "Action", "ActionUrl": flows::provider::WAIT_URL,
            "Parameters": {"seconds": 2}, "ResultPath": "$.nap", "End": true
        }}
    });
    let started = std::time::Instant::now();
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let engine = open(dir.path(), Providers::builtin());
        engine
            .start("nap-1", "flow", &def, json!({}), "alice", None)
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !engine
            .log("nap-1")
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::ActionStarted { .. }))
        {
            assert!(tokio::time::Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Most of the wait passes before the engine dies: waiting all of it again after the
        // restart would end at 3.8 s or later.
        tokio::time::sleep(Duration::from_millis(1_800)).await;
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let engine = open(dir.path(), Providers::builtin());
        let run = engine.wait("nap-1", Duration::from_secs(30)).await.unwrap();
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_millis(3_500),
            "the wait ended {took:?} after it began"
        );
        assert!(run.details["output"]["nap"]["details"]["waited_until"].is_string());
        let started: Vec<_> = engine
            .log("nap-1")
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e, Event::ActionStarted { .. }))
            .collect();
        assert_eq!(started.len(), 1, "re-attached by its request id");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_action_refuses_what_is_not_a_wait() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Providers::builtin());
    for (i, body) in [
        json!({}),
        json!({"seconds": -1}),
        json!({"seconds": "soon"}),
        json!({"until": "tomorrow"}),
        json!({"seconds": 1, "until": "2030-01-01T00:00:00Z"}),
        json!({"until": "2999-01-01T00:00:00Z"}),
    ]
    .into_iter()
    .enumerate()
    {
        let def = json!({"StartAt": "W", "States": {"W": {
            "Type": "Action", "ActionUrl": flows::provider::WAIT_URL,
            "Parameters": body, "End": true}}});
        let id = format!("bad-{i}");
        engine
            .start(&id, "flow", &def, json!({}), "alice", None)
            .unwrap();
        let run = engine.wait(&id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(run.status, RunStatus::Failed, "{body}: {run:?}");
        assert!(
            run.details.to_string().contains("BadActionRequest")
                || run.details.to_string().contains("ActionUnableToRun"),
            "{run:?}"
        );
    }
}
