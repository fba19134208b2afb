//! Flows through the CLI on multi-process testnets: a definition checked without a node; every
//! runnable definition of the corpus run on a testnet, one test each, asserting its output and
//! the files that moved; a run whose node is SIGKILLed in the middle of an action, finishing
//! after the restart without starting the action again; deployed flows, their grants, their
//! HTTP action-provider face, and runs started at another institution's node.

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
fn corpus_loop_a_set_number_of_times_counts_to_ten() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    // The corpus' counting loop (no input in the corpus: an empty one), run to its end.
    let run = run_corpus(
        &a1,
        "globus-automate-client/loop-a-set-number-of-times/definition.json",
        &serde_json::json!({}),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(run["details"]["output"]["state_manager"]["counter"], 10);
}

#[test]
fn a_flow_runs_on_a_node_and_survives_its_sigkill_mid_action() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();

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

#[test]
fn a_compute_action_runs_functions_on_the_mesh_and_is_not_run_twice_after_a_sigkill() {
    let net = Net::up("1", "2", &[]);
    let a1 = net.node("a1");
    net.wait_endpoints(&a1, 2);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fns.py");
    std::fs::write(
        &src,
        "import time\ndef double(x):\n    return 2 * x\n\
         def slow(s, mark):\n    open(mark, 'a').write('ran\\n')\n    time.sleep(s)\n    return s\n",
    )
    .unwrap();
    for f in ["double", "slow"] {
        ok(&[
            "function",
            "register",
            "--name",
            f,
            "--python",
            p(&src),
            "--entrypoint",
            f,
            "--node",
            p(&a1),
        ]);
    }
    // Globus' compute action shapes: one task per list item, results in order.
    let def = dir.path().join("compute.json");
    std::fs::write(
        &def,
        serde_json::json!({
            "StartAt": "Double",
            "States": {"Double": {
                "Type": "Action", "ActionUrl": "https://compute.actions.globus.org/v3",
                "Parameters": {"tasks": [
                    {"function_id": "double", "args.$": "$.a"},
                    {"function_id": "double", "args": [100]}
                ]},
                "ResultPath": "$.doubled", "End": true}}
        })
        .to_string(),
    )
    .unwrap();
    let mut run = serde_json::Value::Null;
    // The first adverts take a moment after start: retried until routable.
    wait_until(
        "the compute flow to succeed",
        Duration::from_secs(60),
        || {
            let out = funcmesh(&[
                "flow",
                "run",
                p(&def),
                "--input",
                r#"{"a": [21]}"#,
                "--wait",
                "--json",
                "--node",
                p(&a1),
            ]);
            run = serde_json::from_slice(&out.stdout).unwrap_or_default();
            run["status"] == "SUCCEEDED"
        },
    );
    assert_eq!(
        run["details"]["output"]["doubled"]["details"]["result"],
        serde_json::json!([42, 200])
    );

    // The node hosting the run dies while its task runs; after the restart the run re-attaches
    // to the same task (its id derives from the action's request id) and finishes.
    let slow = dir.path().join("slow.json");
    std::fs::write(
        &slow,
        serde_json::json!({
            "StartAt": "Slow",
            "States": {"Slow": {
                "Type": "Action", "ActionUrl": "https://compute.actions.globus.org",
                "Parameters": {"function": "slow", "args": [3], "kwargs": {"mark.$": "$.mark"}, "endpoint": "a2"},
                "ResultPath": "$.slept", "End": true}}
        })
        .to_string(),
    )
    .unwrap();
    // Each run of the function leaves a line here (workers run as other users: open to all).
    let marks = tempfile::tempdir_in("/tmp").unwrap();
    let mark = marks.path().join("ran");
    std::fs::set_permissions(
        marks.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let input = serde_json::json!({"mark": p(&mark)}).to_string();
    ok(&[
        "flow",
        "run",
        p(&slow),
        "--input",
        &input,
        "--id",
        "slow-1",
        "--node",
        p(&a1),
    ]);
    wait_until("the function to start", Duration::from_secs(30), || {
        mark.exists()
    });
    net.kill("a1");
    net.restart("a1");
    wait_until(
        "the slow run to finish after the restart",
        Duration::from_secs(60),
        || {
            let out = funcmesh(&["flow", "status", "slow-1", "--json", "--node", p(&a1)]);
            run = serde_json::from_slice(&out.stdout).unwrap_or_default();
            run["status"] == "SUCCEEDED"
        },
    );
    let results = &run["details"]["output"]["slept"]["details"]["results"];
    assert_eq!(results.as_array().unwrap().len(), 1, "{run}");
    assert_eq!(results[0]["output"], 3);
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap(),
        "ran\n",
        "the function ran once across the crash"
    );
}

/// A testnet of one institution's two endpoints, with `source-directory` (two files, one in a
/// subdirectory) on a1: the transfer examples' sample input, filled in.
fn transfer_examples() -> (Net, PathBuf, PathBuf) {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    net.wait_endpoints(&a1, 2);
    let src = a1.join("data/source-directory");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("one.txt"), b"first file\n").unwrap();
    std::fs::write(src.join("sub/two.bin"), vec![7u8; 100_000]).unwrap();
    (net, a1, a2)
}

fn source_to(dst: &str) -> serde_json::Value {
    serde_json::json!({
        "source": {"id": "a1", "path": "/~/source-directory"},
        "destination": {"id": "a2", "path": format!("/~/{dst}")}
    })
}

#[test]
fn corpus_simple_transfer_copies_a_directory() {
    let (_net, _a1, a2) = transfer_examples();
    // simple: one transfer, a directory (recursive worked out from the source).
    let done = run_corpus(
        &a2,
        "globus-flows-examples/transfer_examples/simple/definition.json",
        &source_to("copied"),
    );
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let dst = a2.join("data/copied");
    assert_eq!(std::fs::read(dst.join("one.txt")).unwrap(), b"first file\n");
    assert_eq!(
        std::fs::read(dst.join("sub/two.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    // No ResultPath: the action's status is the run's output, as at Globus.
    assert_eq!(
        done["details"]["output"]["details"]["files_transferred"], 2,
        "{done}"
    );
}

#[test]
fn corpus_move_copies_then_deletes_the_source() {
    let (_net, a1, a2) = transfer_examples();
    // move: stat both sides (the destination is missing: NotFound is an answer, not an
    // error), choose, transfer, delete the source.
    let moved = run_corpus(
        &a2,
        "globus-flows-examples/transfer_examples/move/definition.json",
        &source_to("moved"),
    );
    assert_eq!(moved["status"], "SUCCEEDED", "{moved}");
    let out = &moved["details"]["output"];
    assert_eq!(out["PathTypes"]["dest_exists"], false, "{moved}");
    assert_eq!(out["PathTypes"]["source_is_dir"], true);
    assert_eq!(
        std::fs::read(a2.join("data/moved/sub/two.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    assert!(
        !a1.join("data/source-directory").exists(),
        "the source was deleted after the copy"
    );
}

/// Runs a corpus definition on `node` with `input` until it reaches a final status (retrying
/// while the first adverts make endpoints routable); returns the run.
fn run_corpus(node: &std::path::Path, def: &str, input: &serde_json::Value) -> serde_json::Value {
    run_file(node, &corpus(def), input)
}

/// Runs the definition in file `def` on `node` as [`run_corpus`] does.
fn run_file(
    node: &std::path::Path,
    def: &std::path::Path,
    input: &serde_json::Value,
) -> serde_json::Value {
    let input = input.to_string();
    let mut run = serde_json::Value::Null;
    wait_until("the flow to end", Duration::from_secs(90), || {
        let out = funcmesh(&[
            "flow",
            "run",
            p(def),
            "--input",
            &input,
            "--wait",
            "--json",
            "--node",
            p(node),
        ]);
        run = serde_json::from_slice(&out.stdout).unwrap_or_default();
        matches!(run["status"].as_str(), Some("SUCCEEDED" | "FAILED"))
    });
    run
}

#[test]
fn corpus_hello_world_runs_with_its_sample_input() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    // hello-world: its sample input, with a one-second sleep instead of twenty.
    let run = run_corpus(
        &a1,
        "globus-automate-client/hello-world/definition.json",
        &serde_json::json!({"input": {"echo_string": "From automate cli", "sleep_time": 1}}),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        run["details"]["output"]["HelloResult"]["details"]["hello"],
        "From automate cli"
    );
}

#[test]
fn corpus_complex_hello_world_loops_over_its_input() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    // complex-hello-world: a loop over its input's list through hello-world and
    // expression-eval, ended by a JSONPath slice that selects [].
    let input: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(corpus(
            "globus-automate-client/complex-hello-world/input.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let run = run_corpus(
        &a1,
        "globus-automate-client/complex-hello-world/definition.json",
        &input,
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    let out = &run["details"]["output"];
    assert_eq!(out["input"]["Hellos"], serde_json::json!([]));
    assert_eq!(
        out["HelloOutput"]["details"]["hello"], "Second",
        "the last one said"
    );
    assert_eq!(out["ComputeCompletionOut"]["details"]["loop_done"], true);
}

#[test]
fn corpus_pass_with_parameters_passes_its_parameters() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    // pass-with-parameters (no input in the corpus: an empty one).
    let run = run_corpus(
        &a1,
        "globus-automate-client/pass-with-parameters/definition.json",
        &serde_json::json!({}),
    );
    assert_eq!(
        run["details"]["output"],
        serde_json::json!({"PassResult": {"foo": "bar", "value_5": 5}})
    );
}

#[test]
fn corpus_failed_consent_waits_inactive_then_fails_as_written() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let def = corpus("globus-automate-client/failed-consent/definition.json");
    ok(&[
        "flow",
        "run",
        p(&def),
        "--id",
        "consent-1",
        "--node",
        p(&a1),
    ]);
    wait_until("the run to go INACTIVE", Duration::from_secs(30), || {
        let out = funcmesh(&["flow", "status", "consent-1", "--json", "--node", p(&a1)]);
        let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        run["status"] == "INACTIVE" && run["details"]["details"]["code"] == "ConsentRequired"
    });
    ok(&["flow", "resume", "consent-1", "--node", p(&a1)]);
    let mut run = serde_json::Value::Null;
    wait_until(
        "the run to fail at its Fail state",
        Duration::from_secs(30),
        || {
            let out = funcmesh(&["flow", "status", "consent-1", "--json", "--node", p(&a1)]);
            run = serde_json::from_slice(&out.stdout).unwrap_or_default();
            run["status"] == "FAILED"
        },
    );
    assert_eq!(run["details"]["Error"], "YourErrorCode", "{run}");
}

#[test]
fn corpus_hello_plus_transfer_moves_a_file() {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    net.wait_endpoints(&a1, 2);
    std::fs::write(a1.join("data/flows_testing"), b"hello plus transfer\n").unwrap();
    // hello-plus-transfer: its input with go#ep1 and go#ep2 as a1 and a2.
    let run = run_corpus(
        &a2,
        "globus-automate-client/hello-plus-transfer/definition.json",
        &serde_json::json!({
            "HelloInput": {"echo_string": "Hello plus Transfer test case"},
            "TransferInput": {
                "destination_endpoint_id": "a2", "source_endpoint_id": "a1",
                "destination_path": "/~/flows_testing", "recursive": false,
                "source_path": "/~/flows_testing"
            }
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        std::fs::read(a2.join("data/flows_testing")).unwrap(),
        b"hello plus transfer\n"
    );
}

#[test]
fn corpus_single_transfer_moves_a_file_named_by_a_relative_path() {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    net.wait_endpoints(&a1, 2);
    std::fs::write(a1.join("data/file1.txt"), b"single transfer\n").unwrap();
    // single-transfer: the old schema's transfer_items, a relative source path.
    let run = run_corpus(
        &a2,
        "globus-automate-client/single-transfer/definition.json",
        &serde_json::json!({
            "source_endpoint_id": "a1", "destination_endpoint_id": "a2",
            "transfer_items": [{"source_path": "file1.txt", "destination_path": "/~/copied_file1.txt"}]
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        std::fs::read(a2.join("data/copied_file1.txt")).unwrap(),
        b"single transfer\n"
    );
}

#[test]
fn corpus_two_hop_moves_files_through_an_intermediate_endpoint() {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    net.wait_endpoints(&a1, 2);
    let src = a1.join("data/ep1-example-directory");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("a.txt"), b"a\n").unwrap();
    std::fs::write(src.join("d/b.txt"), b"b\n").unwrap();
    // two_hop: a1 → a2 (intermediate) → a1 again, as its sample input has it; the flow wants
    // its intermediate directory to exist.
    std::fs::create_dir_all(a2.join("data/ep2-intermediate-directory")).unwrap();
    let run = run_corpus(
        &a1,
        "globus-flows-examples/transfer_examples/two_hop/definition.json",
        &serde_json::json!({
            "source": {"id": "a1", "path": "/~/ep1-example-directory/"},
            "intermediate": {"id": "a2", "path": "/~/ep2-intermediate-directory/"},
            "destination": {"id": "a1", "path": "/~/ep1-duplicate-example-directory/"}
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        std::fs::read(a1.join("data/ep1-duplicate-example-directory/d/b.txt")).unwrap(),
        b"b\n"
    );
}

#[test]
fn corpus_looping_batched_move_moves_files_until_the_source_is_empty() {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    net.wait_endpoints(&a1, 2);
    // looping_batched_move: list, move what is listed, delete it, until the source is empty.
    let many = a1.join("data/source-directory");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..5 {
        std::fs::write(many.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    let run = run_corpus(
        &a2,
        "globus-flows-examples/transfer_examples/looping_batched_move/definition.json",
        &serde_json::json!({
            "source": {"id": "a1", "path": "/~/source-directory"},
            "destination": {"id": "a2", "path": "/~/destination-directory"}
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    for i in 0..5 {
        assert_eq!(
            std::fs::read_to_string(a2.join(format!("data/destination-directory/f{i}"))).unwrap(),
            format!("{i}\n")
        );
    }
    assert_eq!(
        std::fs::read_dir(&many).unwrap().count(),
        0,
        "the source emptied"
    );
}

#[test]
fn a_deployed_flow_runs_by_title_and_its_input_schema_is_enforced() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}"#,
    )
    .unwrap();
    let def = dir.path().join("double.json");
    std::fs::write(
        &def,
        r#"{"StartAt": "D", "States": {"D": {"Type": "ExpressionEval",
            "Parameters": {"doubled.=": "n * 2"}, "ResultPath": "$.out", "End": true}}}"#,
    )
    .unwrap();
    let id = ok(&[
        "flow",
        "deploy",
        p(&def),
        "--title",
        "doubler",
        "--input-schema",
        p(&schema),
        "--node",
        p(&a1),
    ]);
    assert!(
        id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let listed = ok(&["flow", "list", "--node", p(&a1)]);
    assert!(
        listed.contains("doubler") && listed.contains(&id),
        "{listed}"
    );
    let out = ok(&[
        "flow",
        "run",
        "doubler",
        "--input",
        r#"{"n": 21}"#,
        "--wait",
        "--json",
        "--node",
        p(&a1),
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["details"]["output"]["out"]["doubled"], 42, "{run}");
    assert_eq!(run["flow_id"], id.as_str());
    // A flow as an action of another: the child is a run of its own, its output the
    // action's details.
    let parent = dir.path().join("parent.json");
    std::fs::write(
        &parent,
        r#"{"StartAt": "Child", "States": {"Child": {"Type": "Action",
            "ActionUrl": "https://flows.globus.org/flows/doubler",
            "Parameters": {"n.$": "$.x"}, "ResultPath": "$.child", "End": true}}}"#,
    )
    .unwrap();
    let out = ok(&[
        "flow",
        "run",
        p(&parent),
        "--input",
        r#"{"x": 5}"#,
        "--wait",
        "--json",
        "--node",
        p(&a1),
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        run["details"]["output"]["child"]["details"]["out"]["doubled"], 10,
        "{run}"
    );
    let runs = ok(&["flow", "runs", "--json", "--node", p(&a1)]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&runs).unwrap();
    let child = run["details"]["output"]["child"]["action_id"]
        .as_str()
        .unwrap();
    assert!(
        runs.iter()
            .any(|r| r["run_id"] == child && r["flow_id"] == id.as_str()),
        "the child is a run of the deployed flow: {runs:?}"
    );
    let bad = funcmesh(&[
        "flow",
        "run",
        "doubler",
        "--input",
        r#"{"n": "many"}"#,
        "--node",
        p(&a1),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("input schema") && err.contains("/n"), "{err}");
}

#[test]
fn a_run_without_a_right_waits_inactive_and_completes_after_cap_add_and_resume() {
    let net = Net::up("2", "1", &[]);
    let (a1, b1) = (net.node("a1"), net.node("b1"));
    net.wait_endpoints(&b1, 2);
    let shared = a1.join("data/shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("result.csv"), b"x,y\n1,2\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("pull.json");
    std::fs::write(
        &def,
        serde_json::json!({
            "StartAt": "Pull",
            "States": {"Pull": {
                "Type": "Action", "ActionUrl": "https://transfer.actions.globus.org/transfer",
                "Parameters": {"source_endpoint": "a1", "destination_endpoint": "b1",
                    "DATA": [{"source_path": "/~/shared", "destination_path": "/~/from-a", "recursive": true}]},
                "ResultPath": "$.pulled", "End": true}}
        })
        .to_string(),
    )
    .unwrap();
    // inst-b's node holds no grant for a1's data root: the run waits, saying what it needs.
    ok(&["flow", "run", p(&def), "--id", "pull-1", "--node", p(&b1)]);
    let mut run = serde_json::Value::Null;
    wait_until(
        "the run to wait for a right",
        Duration::from_secs(30),
        || {
            let out = funcmesh(&["flow", "status", "pull-1", "--json", "--node", p(&b1)]);
            run = serde_json::from_slice(&out.stdout).unwrap_or_default();
            run["status"] == "INACTIVE"
        },
    );
    let why = run["details"]["details"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("cap add") && why.contains("flow resume"),
        "{run}"
    );
    assert!(!b1.join("data/from-a").exists());

    // inst-a grants inst-b reading `shared`; b1 holds the grant; the run is resumed.
    let token = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--ability",
        "transfer.read",
        "--path",
        "shared",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    ok(&["cap", "add", token.trim(), "--node", p(&b1)]);
    wait_until("b1 may list a1:shared", Duration::from_secs(20), || {
        funcmesh(&["transfer", "ls", "a1:shared", "--node", p(&b1)])
            .status
            .success()
    });
    ok(&["flow", "resume", "pull-1", "--node", p(&b1)]);
    wait_until("the resumed run to finish", Duration::from_secs(60), || {
        let out = funcmesh(&["flow", "status", "pull-1", "--json", "--node", p(&b1)]);
        run = serde_json::from_slice(&out.stdout).unwrap_or_default();
        run["status"] == "SUCCEEDED"
    });
    assert_eq!(
        std::fs::read(b1.join("data/from-a/result.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
}

/// A small external action provider speaking the Globus action-provider API: an action is
/// ACTIVE for its first two status checks, then SUCCEEDED with its body echoed; `/run` is
/// idempotent by `request_id`. Returns its base URL and how many actions it started.
fn action_provider(
    rt: &tokio::runtime::Runtime,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::{Path as UrlPath, State};
    use axum::routing::{get, post};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    type Actions = Arc<Mutex<HashMap<String, (serde_json::Value, u32)>>>;
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let actions: Actions = Arc::default();
    fn doc(id: &str, body: &serde_json::Value, polls: u32) -> serde_json::Value {
        serde_json::json!({
            "action_id": id, "creator_id": "urn:test", "details": {"echo": body},
            "status": if polls >= 2 { "SUCCEEDED" } else { "ACTIVE" },
        })
    }
    let run = {
        let started = started.clone();
        move |State(a): State<Actions>, axum::Json(req): axum::Json<serde_json::Value>| {
            let started = started.clone();
            async move {
                let id = req["request_id"].as_str().unwrap_or("").to_string();
                let mut a = a.lock().unwrap();
                let entry = a.entry(id.clone()).or_insert_with(|| {
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (req["body"].clone(), 0)
                });
                axum::Json(doc(&id, &entry.0, entry.1))
            }
        }
    };
    let status = |State(a): State<Actions>, UrlPath(id): UrlPath<String>| async move {
        let mut a = a.lock().unwrap();
        let entry = a.get_mut(&id).unwrap();
        entry.1 += 1;
        axum::Json(doc(&id, &entry.0, entry.1))
    };
    let other = |State(a): State<Actions>, UrlPath((id, _op)): UrlPath<(String, String)>| async move {
        let a = a.lock().unwrap();
        let entry = a.get(&id).unwrap();
        axum::Json(doc(&id, &entry.0, entry.1))
    };
    let app = axum::Router::new()
        .route("/ap/run", post(run))
        .route("/ap/{id}/status", get(status))
        .route("/ap/{id}/{op}", post(other))
        .with_state(actions);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/ap"), started)
}

#[test]
fn an_external_action_provider_is_called_over_http_only_when_configured() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, started) = action_provider(&rt);
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("external.json");
    std::fs::write(
        &def,
        serde_json::json!({"StartAt": "Ext", "States": {"Ext": {
            "Type": "Action", "ActionUrl": url, "Parameters": {"x.$": "$.x"},
            "ResultPath": "$.ext", "End": true}}})
        .to_string(),
    )
    .unwrap();
    // Not in the node's configuration: refused before anything runs.
    let out = funcmesh(&["flow", "run", p(&def), "--node", p(&a1)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("field `ActionUrl`"), "{err}");
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Listed in [flows] action_providers: called, polled until it succeeds.
    let config = a1.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("action_providers = []"), "{text}");
    let text = text.replace(
        "action_providers = []",
        &format!("action_providers = [\"{url}\"]"),
    );
    std::fs::write(&config, text).unwrap();
    net.restart("a1");
    let out = ok(&[
        "flow",
        "run",
        p(&def),
        "--input",
        r#"{"x": 7}"#,
        "--wait",
        "--json",
        "--node",
        p(&a1),
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        run["details"]["output"]["ext"]["details"]["echo"],
        serde_json::json!({"x": 7})
    );
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn another_institutions_flow_runs_here_only_with_its_flow_run_grant() {
    let net = Net::up("2", "1", &[]);
    let (a1, b1) = (net.node("a1"), net.node("b1"));
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("pass.json");
    std::fs::write(
        &def,
        r#"{"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}"#,
    )
    .unwrap();
    let id = ok(&[
        "flow",
        "deploy",
        p(&def),
        "--title",
        "a-only",
        "--node",
        p(&a1),
    ]);
    wait_until("b1 to see inst-a's flow", Duration::from_secs(20), || {
        ok(&["flow", "list", "--node", p(&b1)]).contains(&id)
    });
    // Listed everywhere, run only by its own institution: inst-b is refused, saying why.
    let out = funcmesh(&["flow", "run", "a-only", "--node", p(&b1)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inst-a") && err.contains("flow.run"), "{err}");
    assert!(ok(&["flow", "runs", "--json", "--node", p(&b1)]) == "[]");
    // As an action of inst-b's own flow: refused the same way, so the run fails.
    let parent = dir.path().join("parent.json");
    std::fs::write(
        &parent,
        format!(
            r#"{{"StartAt": "C", "States": {{"C": {{"Type": "Action",
                "ActionUrl": "https://flows.globus.org/flows/{id}", "Parameters": {{}},
                "End": true}}}}}}"#
        ),
    )
    .unwrap();
    let out = funcmesh(&[
        "flow",
        "run",
        p(&parent),
        "--wait",
        "--json",
        "--node",
        p(&b1),
    ]);
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["status"], "FAILED", "{run}");
    assert_eq!(run["details"]["Error"], "ActionUnableToRun", "{run}");
    assert!(
        run["details"]["Cause"]
            .as_str()
            .unwrap()
            .contains("flow.run"),
        "{run}"
    );
    // inst-a runs it.
    let out = ok(&[
        "flow",
        "run",
        "a-only",
        "--wait",
        "--json",
        "--node",
        p(&a1),
    ]);
    assert!(out.contains("SUCCEEDED"), "{out}");

    // inst-a grants inst-b flow.run on this flow, and on no other.
    let other = ok(&[
        "flow",
        "deploy",
        p(&def),
        "--title",
        "a-other",
        "--node",
        p(&a1),
    ]);
    let token = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--flow",
        "a-only",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    ok(&["cap", "add", token.trim(), "--node", p(&b1)]);
    let mut out = String::new();
    wait_until("b1 to run inst-a's flow", Duration::from_secs(20), || {
        let o = funcmesh(&[
            "flow",
            "run",
            "a-only",
            "--wait",
            "--json",
            "--node",
            p(&b1),
        ]);
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        o.status.success()
    });
    assert!(out.contains("SUCCEEDED"), "{out}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["flow_id"], id.trim(), "{run}");
    // As an action too.
    let out = ok(&[
        "flow",
        "run",
        p(&parent),
        "--wait",
        "--json",
        "--node",
        p(&b1),
    ]);
    assert!(out.contains("SUCCEEDED"), "{out}");
    // The other flow stays refused.
    wait_until("b1 to see the other flow", Duration::from_secs(20), || {
        ok(&["flow", "list", "--node", p(&b1)]).contains(other.trim())
    });
    let out = funcmesh(&["flow", "run", "a-other", "--node", p(&b1)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flow.run"), "{err}");
    // A flow grant cannot carry another ability.
    let out = funcmesh(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--flow",
        "a-only",
        "--ability",
        "compute.run",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    assert!(!out.status.success());
}

/// A function that works on an endpoint's data root, as the corpus' `do_tar` works on a Globus
/// collection's storage: collection paths (`/x`, `/~/x`) under `gcs_base_path` on disk.
const TAR_PATHS: &str = r#"import os, tarfile, uuid
def tar_paths(src_paths, dest_path, gcs_base_path='/'):
    def real(p):
        p = p[2:] if p.startswith('/~') else p
        return os.path.join(gcs_base_path, p.lstrip('/'))
    if isinstance(src_paths, str):
        src_paths = [src_paths]
    dest = real(dest_path)
    if os.path.isdir(dest):
        dest = os.path.join(dest, uuid.uuid4().hex + '.tar.gz')
    with tarfile.open(dest, 'w:gz') as tar:
        for s in src_paths:
            tar.add(real(s), arcname=os.path.basename(real(s).rstrip('/')))
    return '/' + os.path.relpath(dest, gcs_base_path)
"#;

/// A corpus definition with its placeholders filled in, written to `dir`.
fn filled(dir: &std::path::Path, def: &str, fill: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(corpus(def)).unwrap();
    for (from, to) in fill {
        assert!(text.contains(from), "{def} has no {from}");
        text = text.replace(from, to);
    }
    let out = dir.join(std::path::Path::new(def).file_name().unwrap());
    std::fs::write(&out, text).unwrap();
    out
}

/// The names in a `.tar.gz` file.
fn tar_names(file: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("tar")
        .arg("tzf")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    names.sort();
    names
}

/// The tar-and-transfer examples' setting: a1 is both the "GCS" and the compute endpoint, its
/// workers running as the node's user so that a function reaches the data root on disk (as a
/// Compute endpoint reaches its collection's storage at Globus); `tar_paths` registered. Gives
/// the net, a1, a2, a scratch dir, and a definition of the corpus with its placeholders filled.
fn tar_examples(example: u32) -> (Net, PathBuf, PathBuf, tempfile::TempDir, PathBuf) {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    // a1 is both the "GCS" and the compute endpoint: its workers run as the node's user, so a
    // function reaches the data root on disk, as a Compute endpoint reaches its collection's
    // storage at Globus.
    let config = a1.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("host_user = \"auto\""), "{text}");
    std::fs::write(
        &config,
        text.replacen("host_user = \"auto\"", "host_user = \"node\"", 1),
    )
    .unwrap();
    net.kill("a1");
    net.restart("a1");
    net.wait_endpoints(&a2, 2);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tar.py");
    std::fs::write(&src, TAR_PATHS).unwrap();
    ok(&[
        "function",
        "register",
        "--name",
        "tar_paths",
        "--python",
        p(&src),
        "--entrypoint",
        "tar_paths",
        "--node",
        p(&a2),
    ]);
    let root = std::fs::canonicalize(a1.join("data")).unwrap();
    let fill = [
        ("<INSERT YOUR GCS ENDPOINT ID HERE>", "a1"),
        ("<INSERT YOUR COMPUTE ENDPOINT ID HERE>", "a1"),
        ("<INSERT YOUR COMPUTE FUNCTION ID HERE>", "tar_paths"),
        (
            "\"gcs_base_path\": \"/\"",
            &format!("\"gcs_base_path\": \"{}/\"", root.display()),
        ),
    ];
    let def = filled(
        dir.path(),
        &format!(
            "globus-flows-examples/compute_transfer_examples/tar_and_transfer/\
             compute_transfer_example_{example}_definition.json"
        ),
        &fill,
    );
    (net, a1, a2, dir, def)
}

#[test]
fn corpus_tar_and_transfer_1_tars_on_the_compute_endpoint_and_moves_the_archive() {
    let (_net, a1, a2, _dir, def) = tar_examples(1);
    // The data is already on the compute endpoint's storage.
    std::fs::create_dir_all(a1.join("data/results/sub")).unwrap();
    std::fs::write(a1.join("data/results/a.txt"), b"alpha\n").unwrap();
    std::fs::write(a1.join("data/results/sub/b.txt"), b"beta\n").unwrap();
    let run = run_file(
        &a2,
        &def,
        &serde_json::json!({
            "source_paths": ["/results/a.txt", "/results/sub/"],
            "destination_endpoint_id": "a2",
            "destination_path": "/~/archive1.tar.gz"
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    let out = &run["details"]["output"];
    let run_id = run["run_id"].as_str().unwrap();
    let made = out["compute_func_result"]["details"]["result"][0]
        .as_str()
        .unwrap();
    assert!(made.starts_with(&format!("/{run_id}/")), "{made}");
    assert_eq!(
        tar_names(&a2.join("data/archive1.tar.gz")),
        ["a.txt", "sub", "sub/b.txt"]
    );
    assert!(
        !a1.join("data").join(run_id).exists(),
        "the working directory on the compute endpoint was cleaned up"
    );
}

#[test]
fn corpus_tar_and_transfer_2_gathers_tars_and_moves_the_archive() {
    let (_net, a1, a2, _dir, def) = tar_examples(2);
    // The data comes from another endpoint first; the archive's name is the function's, the
    // destination the default `/~/<name>`.
    std::fs::create_dir_all(a2.join("data/raw/run7")).unwrap();
    std::fs::write(a2.join("data/raw/run7/c.dat"), vec![3u8; 50_000]).unwrap();
    std::fs::write(a2.join("data/raw/notes.txt"), b"notes\n").unwrap();
    let run = run_file(
        &a2,
        &def,
        &serde_json::json!({
            "source_endpoint": "a2",
            "source_paths": ["/raw/run7/", "/raw/notes.txt"],
            "destination_endpoint_id": "a2"
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    let out = &run["details"]["output"];
    let dest = out["destination"]["details"]["result"]["path"]
        .as_str()
        .or(out["destination"]["path"].as_str())
        .unwrap_or_else(|| panic!("{run}"))
        .to_owned();
    let name = dest.strip_prefix("/~/").unwrap();
    assert!(name.ends_with(".tar.gz"), "{dest}");
    assert_eq!(
        tar_names(&a2.join("data").join(name)),
        ["notes.txt", "run7", "run7/c.dat"]
    );
    let run_id = run["run_id"].as_str().unwrap();
    assert!(!a1.join("data").join(run_id).exists());
}

#[test]
fn a_deployed_flow_is_an_action_provider_over_http_for_clients_and_other_nodes() {
    let net = Net::up("1", "2", &[]);
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("twice.json");
    std::fs::write(
        &def,
        r#"{"StartAt": "E", "States": {"E": {"Type": "ExpressionEval",
            "Parameters": {"y.=": "x * 2"}, "ResultPath": "$.out", "End": true}}}"#,
    )
    .unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}"#,
    )
    .unwrap();
    let id = ok(&[
        "flow",
        "deploy",
        p(&def),
        "--title",
        "twice",
        "--input-schema",
        p(&schema),
        "--node",
        p(&a1),
    ]);
    let id = id.trim().to_owned();
    let api: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a1.join("api.json")).unwrap()).unwrap();
    let (url, token) = (
        api["url"].as_str().unwrap().to_owned(),
        api["token"].as_str().unwrap().to_owned(),
    );
    let base = format!("{url}/v1/actions/flows/{id}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        })
    };

    // Its description carries the flow's input schema.
    let (code, about) = call(reqwest::Method::GET, "", None);
    assert_eq!(code, 200, "{about}");
    assert_eq!(about["title"], "twice");
    assert_eq!(about["input_schema"]["required"][0], "x");
    // Run, then run again under the same request_id: one run.
    let run = serde_json::json!({"request_id": "ap-1", "body": {"x": 21}});
    let (code, action) = call(reqwest::Method::POST, "/run", Some(run.clone()));
    assert_eq!(code, 201, "{action}");
    assert_eq!(action["action_id"], "ap-1");
    let mut done = serde_json::Value::Null;
    wait_until("the action to succeed", Duration::from_secs(20), || {
        let (_, a) = call(reqwest::Method::GET, "/ap-1/status", None);
        done = a;
        done["status"] == "SUCCEEDED"
    });
    assert_eq!(done["details"]["out"]["y"], 42, "{done}");
    let (code, again) = call(reqwest::Method::POST, "/run", Some(run));
    assert_eq!((code, &again["action_id"]), (201, &"ap-1".into()));
    let runs: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["flow", "runs", "--json", "--node", p(&a1)])).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (code, log) = call(reqwest::Method::GET, "/ap-1/log", None);
    assert_eq!(code, 200);
    assert!(log["count"].as_u64().unwrap() >= 2, "{log}");
    let (code, released) = call(reqwest::Method::POST, "/ap-1/release", None);
    assert_eq!((code, &released["status"]), (200, &"SUCCEEDED".into()));
    // Input against the schema, unknown actions, and callers without the token are refused.
    let (code, err) = call(
        reqwest::Method::POST,
        "/run",
        Some(serde_json::json!({"request_id": "ap-2", "body": {"x": "no"}})),
    );
    assert_eq!(
        (code, &err["code"]),
        (400, &"BadActionRequest".into()),
        "{err}"
    );
    let (code, err) = call(reqwest::Method::GET, "/nope/status", None);
    assert_eq!(
        (code, &err["code"]),
        (404, &"ActionNotFound".into()),
        "{err}"
    );
    let anon = rt
        .block_on(http.get(&base).send())
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(anon, 401);

    // Another node calls it as an external provider of one of its flows, with a1's token.
    let token_file = a2.join("a1-token");
    std::fs::write(&token_file, &token).unwrap();
    let config = a2.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("action_providers = []"), "{text}");
    let header = "[flows.action_provider_token_files]\n";
    let entry = format!("\"{base}\" = \"{}\"\n", token_file.display());
    let mut text = text.replace(
        "action_providers = []",
        &format!("action_providers = [\"{base}\"]"),
    );
    if text.contains(header) {
        text = text.replace(header, &format!("{header}{entry}"));
    } else {
        text.push_str(&format!("\n{header}{entry}"));
    }
    std::fs::write(&config, text).unwrap();
    net.restart("a2");
    let outer = dir.path().join("outer.json");
    std::fs::write(
        &outer,
        serde_json::json!({"StartAt": "Remote", "States": {"Remote": {
            "Type": "Action", "ActionUrl": base, "Parameters": {"x.$": "$.n"},
            "ResultPath": "$.remote", "End": true}}})
        .to_string(),
    )
    .unwrap();
    let out = ok(&[
        "flow",
        "run",
        p(&outer),
        "--input",
        r#"{"n": 5}"#,
        "--wait",
        "--json",
        "--node",
        p(&a2),
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(
        run["details"]["output"]["remote"]["details"]["out"]["y"],
        10
    );
}

#[test]
fn corpus_transfer_share_copies_to_a_guest_collection_and_shares_it() {
    let net = Net::up("2", "1", &[]);
    let (a1, b1) = (net.node("a1"), net.node("b1"));
    net.wait_endpoints(&a1, 2);
    let src = a1.join("data/source-directory");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("observations.csv"), b"t,v\n0,1\n").unwrap();
    // Its sample input, with a1 as both collections and inst-b as the principal.
    let run = run_corpus(
        &a1,
        "globus-flows-examples/transfer_examples/transfer_share/definition.json",
        &serde_json::json!({
            "source": {"id": "a1", "path": "/~/source-directory"},
            "destination": {"id": "a1", "path": "/~/destination-directory"},
            "principal": {"type": "institution", "id": "inst-b"}
        }),
    );
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    let out = &run["details"]["output"];
    assert_eq!(
        out["DestinationInfo"]["details"]["entity_type"],
        "GCSv5_guest_collection"
    );
    assert_eq!(out["SetPermission"]["details"]["code"], "Created", "{run}");
    assert_eq!(
        std::fs::read(a1.join("data/destination-directory/observations.csv")).unwrap(),
        b"t,v\n0,1\n"
    );
    // inst-b reads what was shared with it, and only that.
    let listed = ok(&[
        "transfer",
        "ls",
        "a1:destination-directory",
        "--node",
        p(&b1),
    ]);
    assert!(listed.contains("observations.csv"), "{listed}");
    let out = funcmesh(&["transfer", "ls", "a1:source-directory", "--node", p(&b1)]);
    assert!(!out.status.success());
    // Globus identities are not funcmesh principals: the run fails, saying so.
    let run = run_corpus(
        &a1,
        "globus-flows-examples/transfer_examples/transfer_share/definition.json",
        &serde_json::json!({
            "source": {"id": "a1", "path": "/~/source-directory"},
            "destination": {"id": "a1", "path": "/~/destination-directory"},
            "principal": {"type": "identity", "id": "46bd0f56-e24f-11e5-a510-131bef46955c"}
        }),
    );
    assert_eq!(run["status"], "FAILED", "{run}");
    assert!(run.to_string().contains("institutions and nodes"), "{run}");
}

/// `flow status|log|cancel RUN --at NODE`, as seen from `node`: its JSON, or the error text.
fn at(
    node: &std::path::Path,
    op: &str,
    run: &str,
    host: &str,
) -> Result<serde_json::Value, String> {
    let out = funcmesh(&["flow", op, run, "--at", host, "--json", "--node", p(node)]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_run_started_at_another_institutions_node_acts_only_with_the_rights_its_starter_delegated() {
    let net = Net::up("2", "2", &[]);
    let (a1, a2, b1, b2) = (
        net.node("a1"),
        net.node("a2"),
        net.node("b1"),
        net.node("b2"),
    );
    net.wait_endpoints(&b1, 4);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("double.py");
    std::fs::write(&src, "def double(x):\n    return 2 * x\n").unwrap();
    ok(&[
        "function",
        "register",
        "--name",
        "double",
        "--python",
        p(&src),
        "--entrypoint",
        "double",
        "--node",
        p(&a1),
    ]);
    let def = dir.path().join("calc.json");
    std::fs::write(
        &def,
        r#"{"StartAt": "D", "States": {"D": {"Type": "Action",
            "ActionUrl": "https://compute.actions.globus.org/v3",
            "Parameters": {"endpoint_id.$": "$.ep", "tasks": [{"function_id": "double", "args.$": "$.x"}]},
            "ResultPath": "$.r", "End": true}}}"#,
    )
    .unwrap();
    let flow = ok(&[
        "flow",
        "deploy",
        p(&def),
        "--title",
        "calc",
        "--node",
        p(&a1),
    ]);
    wait_until("b1 to see the flow", Duration::from_secs(20), || {
        ok(&["flow", "list", "--node", p(&b1)]).contains(flow.trim())
    });
    let start = |id: &str, input: &str, extra: &[&str]| {
        let mut args = vec![
            "flow",
            "run",
            "calc",
            "--at",
            "a1",
            "--id",
            id,
            "--input",
            input,
            "--node",
            p(&b1),
        ];
        args.extend_from_slice(extra);
        funcmesh(&args)
    };
    // Without inst-a's flow.run grant, a1 runs nothing for inst-b.
    let out = start("r0", r#"{"ep": "a2", "x": [1]}"#, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("flow.run"));
    let grant = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--flow",
        "calc",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    ok(&["cap", "add", grant.trim(), "--node", p(&b1)]);

    // A task on a2, which admits a1 (its own institution) but not inst-b: a1 does not lend
    // its own rights, so the run waits INACTIVE. a2 manages it; only managers cancel.
    let out = start("r1", r#"{"ep": "a2", "x": [1]}"#, &["--manager", "node:a2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = serde_json::Value::Null;
    wait_until("r1 to wait for a right", Duration::from_secs(30), || {
        run = at(&b1, "status", "r1", "a1").unwrap();
        run["status"] == "INACTIVE"
    });
    assert!(
        run.to_string().contains("delegated no capability token"),
        "{run}"
    );
    assert!(
        at(&b2, "status", "r1", "a1").is_ok(),
        "the starter's institution sees it"
    );
    let run = at(&a2, "cancel", "r1", "a1").unwrap();
    assert!(
        run["status"] == "ENDED" || run["status"] == "INACTIVE",
        "{run}"
    );

    // A task on b2 (inst-b's): with a token inst-b delegates for this run, it runs; a1 itself
    // holds no such token.
    let token = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-b")),
        "--to",
        "institution:inst-a",
        "--endpoint",
        "b2",
        "--function",
        "double",
        "--ttl",
        "1h",
        "--node",
        p(&b1),
    ]);
    let out = start(
        "r2",
        r#"{"ep": "b2", "x": [21]}"#,
        &[
            "--capability",
            token.trim(),
            "--monitor",
            "node:a2",
            "--wait",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(run["details"]["output"]["r"]["details"]["result"][0], 42);
    assert_eq!(
        ok(&["cap", "list", "--json", "--node", p(&a1)]).trim(),
        "[]"
    );
    // Without it, the same task waits INACTIVE.
    let out = start("r3", r#"{"ep": "b2", "x": [1]}"#, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("r3 to wait for a right", Duration::from_secs(30), || {
        at(&b1, "status", "r3", "a1").unwrap()["status"] == "INACTIVE"
    });

    // Monitors see, and do not manage; others see nothing.
    assert!(at(&a2, "log", "r2", "a1").is_ok());
    let err = at(&a2, "cancel", "r2", "a1").unwrap_err();
    assert!(err.contains("managed by"), "{err}");
    let err = at(&a2, "status", "r3", "a1").unwrap_err();
    assert!(err.contains("no run r3"), "{err}");

    // Transfers too: pulling inst-b's data into a1 takes a read token inst-b lends; pulling
    // a2's (which admits a1, not inst-b) is not done with a1's own rights.
    std::fs::create_dir_all(b2.join("data/results")).unwrap();
    std::fs::write(b2.join("data/results/r.txt"), b"inst-b's result\n").unwrap();
    std::fs::create_dir_all(a2.join("data/results")).unwrap();
    std::fs::write(a2.join("data/results/r.txt"), b"inst-a's result\n").unwrap();
    let pull = dir.path().join("pull.json");
    std::fs::write(
        &pull,
        r#"{"StartAt": "T", "States": {"T": {"Type": "Action",
            "ActionUrl": "https://transfer.actions.globus.org/transfer",
            "Parameters": {"source_endpoint.$": "$.src", "destination_endpoint": "a1",
                "DATA": [{"source_path": "/~/results/r.txt", "destination_path.$": "$.to"}]},
            "ResultPath": "$.t", "End": true}}}"#,
    )
    .unwrap();
    let flow = ok(&[
        "flow",
        "deploy",
        p(&pull),
        "--title",
        "pull",
        "--node",
        p(&a1),
    ]);
    wait_until("b1 to see pull", Duration::from_secs(20), || {
        ok(&["flow", "list", "--node", p(&b1)]).contains(flow.trim())
    });
    let grant = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--flow",
        "pull",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    ok(&["cap", "add", grant.trim(), "--node", p(&b1)]);
    let read = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-b")),
        "--to",
        "institution:inst-a",
        "--endpoint",
        "b2",
        "--ability",
        "transfer.read",
        "--path",
        "results",
        "--ttl",
        "1h",
        "--node",
        p(&b1),
    ]);
    // Writing into a1 for inst-b takes inst-a's grant to inst-b, which inst-b lends back.
    let write = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-a")),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--ability",
        "transfer.write",
        "--path",
        "from-b",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    let write = ok(&[
        "cap",
        "delegate",
        write.trim(),
        "--issuer-key",
        p(&net.key("inst-b")),
        "--to",
        "institution:inst-a",
        "--ttl",
        "30m",
        "--node",
        p(&b1),
    ]);
    let run_pull = |id: &str, input: &str, extra: &[&str]| {
        let mut args = vec![
            "flow",
            "run",
            "pull",
            "--at",
            "a1",
            "--id",
            id,
            "--input",
            input,
            "--node",
            p(&b1),
        ];
        args.extend_from_slice(extra);
        funcmesh(&args)
    };
    let out = run_pull(
        "t1",
        r#"{"src": "b2", "to": "/~/from-b/r.txt"}"#,
        &[
            "--capability",
            read.trim(),
            "--capability",
            write.trim(),
            "--wait",
            "--json",
            "--timeout",
            "60s",
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(a1.join("data/from-b/r.txt")).unwrap(),
        b"inst-b's result\n"
    );
    for (id, src) in [("t2", "b2"), ("t3", "a2")] {
        let input = format!(r#"{{"src": "{src}", "to": "/~/{id}.txt"}}"#);
        let out = run_pull(id, &input, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut run = serde_json::Value::Null;
        wait_until(
            "the pull to wait for a right",
            Duration::from_secs(30),
            || {
                run = at(&b1, "status", id, "a1").unwrap();
                run["status"] == "INACTIVE"
            },
        );
        assert!(
            run.to_string().contains("delegated no capability token"),
            "{run}"
        );
        assert!(!a1.join(format!("data/{id}.txt")).exists());
    }
}
