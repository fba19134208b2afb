//! The run engine's overhead, as the flows issue's acceptance 7 asks: per state on a chain of
//! 1,000 `Pass` states, per step on a chain of built-in actions (hello-world, which answers at
//! once), 1,000 concurrent runs of a small flow, and how long recovery takes after the engine
//! dies with those runs in flight. A real RocksDB store in `--dir` (default: a temporary
//! directory under /var/tmp), every transition synced. Prints one JSON line.
//!
//! ```sh
//! cargo run --release -p flows --example bench_engine
//! ```

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use flows::engine::{Engine, RunStatus};
use flows::provider::Providers;
use serde_json::{Value, json};

fn chain(n: usize, state: impl Fn(usize) -> Value) -> Value {
    let mut states = serde_json::Map::new();
    for i in 0..n {
        let mut s = state(i);
        if i + 1 < n {
            s["Next"] = json!(format!("S{}", i + 1));
        } else {
            s["End"] = json!(true);
        }
        states.insert(format!("S{i}"), s);
    }
    json!({"StartAt": "S0", "States": states})
}

fn open(dir: &std::path::Path) -> Engine {
    let store = store::Store::open(&dir.join("db")).unwrap();
    Engine::open(store, Providers::builtin()).unwrap()
}

async fn run_one(engine: &Engine, id: &str, def: &Value) -> Duration {
    let t = Instant::now();
    engine
        .start(id, "bench", def, json!({"x": 1}), "bench", None)
        .unwrap();
    let run = engine.wait(id, Duration::from_secs(600)).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    t.elapsed()
}

fn main() {
    let base = std::env::args()
        .skip_while(|a| a != "--dir")
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp"));
    let dir = tempfile::tempdir_in(base).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let (pass_ms, action_ms, concurrent_s) = rt.block_on(async {
        let engine = open(dir.path());
        let passes = chain(1_000, |_| json!({"Type": "Pass"}));
        let pass = run_one(&engine, "pass-chain", &passes).await;
        let actions = chain(200, |_| {
            json!({"Type": "Action", "ActionUrl": "https://actions.globus.org/hello_world",
                   "Parameters": {"echo_string.$": "$.x"}, "ResultPath": "$.r"})
        });
        let action = run_one(&engine, "action-chain", &actions).await;
        let small = chain(3, |i| {
            if i == 1 {
                json!({"Type": "Action", "ActionUrl": "https://actions.globus.org/hello_world",
                       "Parameters": {"echo_string": "hi"}, "ResultPath": "$.r"})
            } else {
                json!({"Type": "ExpressionEval", "Parameters": {"y.=": "x + 1"}, "ResultPath": "$.e"})
            }
        });
        let t = Instant::now();
        for i in 0..1_000 {
            engine
                .start(&format!("small-{i}"), "bench", &small, json!({"x": i}), "bench", None)
                .unwrap();
        }
        for i in 0..1_000 {
            let run = engine
                .wait(&format!("small-{i}"), Duration::from_secs(600))
                .await
                .unwrap();
            assert_eq!(run.status, RunStatus::Succeeded);
        }
        (
            pass.as_secs_f64() * 1e3 / 1_000.0,
            action.as_secs_f64() * 1e3 / 200.0,
            t.elapsed().as_secs_f64(),
        )
    });
    drop(rt);

    // Recovery: 200 runs each in a 2 s hello-world action when the engine dies; a new engine
    // on the same store finishes them.
    let dir2 = tempfile::tempdir_in(dir.path()).unwrap();
    let slow = chain(2, |i| {
        if i == 0 {
            json!({"Type": "Action", "ActionUrl": "https://actions.globus.org/hello_world",
                   "Parameters": {"sleep_time": 2}, "ResultPath": "$.r"})
        } else {
            json!({"Type": "Pass"})
        }
    });
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let engine = open(dir2.path());
        for i in 0..200 {
            engine
                .start(&format!("r-{i}"), "bench", &slow, json!({}), "bench", None)
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    let (reopen_ms, finish_s) = second.block_on(async {
        let t = Instant::now();
        let engine = open(dir2.path());
        let reopen = t.elapsed().as_secs_f64() * 1e3;
        for i in 0..200 {
            let run = engine
                .wait(&format!("r-{i}"), Duration::from_secs(600))
                .await
                .unwrap();
            assert_eq!(run.status, RunStatus::Succeeded);
        }
        (reopen, t.elapsed().as_secs_f64())
    });
    println!(
        "{}",
        json!({
            "pass_chain_ms_per_state": (pass_ms * 1000.0).round() / 1000.0,
            "action_chain_ms_per_step": (action_ms * 1000.0).round() / 1000.0,
            "concurrent_1000_runs_s": (concurrent_s * 1000.0).round() / 1000.0,
            "recovery_reopen_200_runs_ms": (reopen_ms * 10.0).round() / 10.0,
            "recovery_finish_200_runs_s": (finish_s * 1000.0).round() / 1000.0,
        })
    );
}
