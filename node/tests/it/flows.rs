//! Flows through the CLI: a definition checked without a node, a corpus flow run on a node of a
//! multi-process testnet, and a run whose node is SIGKILLed in the middle of an action that
//! finishes after the restart without starting the action again.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{Net, funcmesh, ok, p, wait_until};

fn corpus(rel: &str) -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/globus-flows")
        .join(rel);
    if beside.exists() {
        return beside;
    }
    PathBuf::from("/work/shared/corpus/globus-flows").join(rel)
}

#[test]
fn a_definition_is_checked_without_a_node_and_errors_name_the_state_and_field() {
    let good = corpus("globus-automate-client/loop-a-set-number-of-times/definition.json");
    let out = ok(&["flow", "validate", p(&good)]);
    assert!(out.contains("valid (4 states; action URLs: none)"), "{out}");

    let old = corpus("globus-automate-client/sync-via-intermediate-with-identifier/defintion.json");
    let out = funcmesh(&["flow", "validate", p(&old)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state `") && err.contains("field `"), "{err}");
}

#[test]
fn a_flow_runs_on_a_node_and_survives_its_sigkill_mid_action() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();

    // The corpus' counting loop, run to its end.
    let looped = corpus("globus-automate-client/loop-a-set-number-of-times/definition.json");
    let out = ok(&[
        "flow",
        "run",
        p(&looped),
        "--wait",
        "--json",
        "--node",
        p(&a1),
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(run["details"]["output"]["state_manager"]["counter"], 10);

    // A run inside a 3 s action when its node is SIGKILLed.
    let def = dir.path().join("hello.json");
    std::fs::write(
        &def,
        serde_json::json!({
            "StartAt": "Hello",
            "States": {"Hello": {
                "Type": "Action", "ActionUrl": "https://actions.globus.org/hello_world",
                "Parameters": {"echo_string.$": "$.who", "sleep_time": 3},
                "ResultPath": "$.said", "End": true}}
        })
        .to_string(),
    )
    .unwrap();
    ok(&[
        "flow",
        "run",
        p(&def),
        "--input",
        r#"{"who": "after"}"#,
        "--id",
        "crash-1",
        "--node",
        p(&a1),
    ]);
    wait_until("the action to start", Duration::from_secs(20), || {
        let out = funcmesh(&["flow", "log", "crash-1", "--json", "--node", p(&a1)]);
        String::from_utf8_lossy(&out.stdout).contains("ActionStarted")
    });
    net.kill("a1");
    net.restart("a1");
    let mut run = serde_json::Value::Null;
    wait_until(
        "the run to finish after the restart",
        Duration::from_secs(60),
        || {
            let out = funcmesh(&["flow", "status", "crash-1", "--json", "--node", p(&a1)]);
            if !out.status.success() {
                return false;
            }
            run = serde_json::from_slice(&out.stdout).unwrap();
            run["status"] == "SUCCEEDED"
        },
    );
    assert_eq!(
        run["details"]["output"]["said"]["details"]["hello"],
        "after"
    );
    let log = ok(&["flow", "log", "crash-1", "--json", "--node", p(&a1)]);
    let log: Vec<serde_json::Value> = serde_json::from_str(&log).unwrap();
    let started: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e["code"] == "ActionStarted")
        .collect();
    assert_eq!(started.len(), 1, "one request id across the crash: {log:?}");
}
