//! Definitions: every definition of the Globus Flows corpus is read, the old-dialect one is
//! refused naming its state and field, and each kind of mistake is refused the same way.

use std::path::PathBuf;

use flows::definition::{Definition, Kind};
use serde_json::{Value, json};

/// The corpus of real definitions (`../shared/corpus/globus-flows` beside the repository, or
/// `FUNCMESH_FLOWS_CORPUS`).
pub(crate) fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FUNCMESH_FLOWS_CORPUS") {
        return dir.into();
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/globus-flows");
    if beside.is_dir() {
        return beside;
    }
    let here = PathBuf::from("/work/shared/corpus/globus-flows");
    assert!(
        here.is_dir(),
        "the Globus Flows corpus is not at {} nor /work/shared/corpus/globus-flows: set \
         FUNCMESH_FLOWS_CORPUS",
        beside.display()
    );
    here
}

/// Every definition file of the corpus, by path relative to it.
pub(crate) fn corpus_definitions() -> Vec<(String, Value)> {
    let root = corpus_dir();
    let mut out = Vec::new();
    let mut todo = vec![root.clone()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the corpus") {
            let path = entry.expect("corpus entry").path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with("definition.json") || name == "defintion.json" {
                let text = std::fs::read_to_string(&path).expect("read a definition");
                let doc: Value = serde_json::from_str(&text).expect("corpus JSON");
                let rel = path
                    .strip_prefix(&root)
                    .expect("inside the corpus")
                    .display()
                    .to_string();
                out.push((rel, doc));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_corpus_definition_validates_but_the_old_dialect() {
    let defs = corpus_definitions();
    assert!(defs.len() >= 15, "found only {} definitions", defs.len());
    for (name, doc) in defs {
        let parsed = Definition::parse(&doc);
        if name.contains("sync-via-intermediate-with-identifier") {
            let e = parsed.expect_err("the old dialect must be refused");
            let shown = e.to_string();
            // States are read in name order: the first is an old-style Action (`Resource`
            // instead of `ActionUrl`).
            let state = e.state.clone().expect("names the state");
            assert!(doc["States"].get(&state).is_some(), "{shown}");
            assert!(
                ["ActionUrl", "Resource", "Type"].contains(&e.field.as_str()),
                "names the field: {shown}"
            );
            continue;
        }
        let def = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(def.states.contains_key(&def.start_at), "{name}");
    }
}

#[test]
fn the_old_dialects_wait_state_is_refused_by_name() {
    let doc = json!({
        "StartAt": "A",
        "States": {
            "A": {"Type": "Pass", "Next": "B"},
            "B": {"Type": "ActionWait", "ResultPath": "$.x", "End": true}
        }
    });
    let e = Definition::parse(&doc).unwrap_err();
    assert_eq!(e.state.as_deref(), Some("B"));
    assert_eq!(e.field, "Type");
    assert!(e.message.contains("ActionWait"), "{e}");
}

/// (definition, state, field, words the message must contain).
fn refused() -> Vec<(Value, Option<&'static str>, &'static str, &'static str)> {
    let pass_end = json!({"Type": "Pass", "End": true});
    vec![
        (
            json!({"States": {"A": pass_end}}),
            None,
            "StartAt",
            "missing",
        ),
        (json!({"StartAt": "A"}), None, "States", "missing"),
        (
            json!({"StartAt": "A", "States": {}}),
            None,
            "States",
            "at least one",
        ),
        (
            json!({"StartAt": "Z", "States": {"A": pass_end}}),
            None,
            "StartAt",
            "no state is named `Z`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": pass_end}, "Version": "1.0"}),
            None,
            "Version",
            "unknown field",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass"}}}),
            Some("A"),
            "Next",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "Q"}}}),
            Some("A"),
            "Next",
            "no state is named `Q`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "A", "End": true}}}),
            Some("A"),
            "End",
            "not both",
        ),
        (
            json!({"StartAt": "A", "States": {"A": pass_end, "B": pass_end}}),
            Some("B"),
            "Type",
            "cannot be reached",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "A"}}}),
            None,
            "States",
            "no state ends",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Task", "End": true}}}),
            Some("A"),
            "Type",
            "unknown state type",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "OutputPath": "$", "End": true}}}),
            Some("A"),
            "OutputPath",
            "unknown field for a Pass state",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "InputPath": "x", "End": true}}}),
            Some("A"),
            "InputPath",
            "must start with `$`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "InputPath": "$.a[", "End": true}}}),
            Some("A"),
            "InputPath",
            "not a valid JSONPath",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "ResultPath": "$.a[*]", "End": true}}}),
            Some("A"),
            "ResultPath",
            "must name one place",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "ResultPath": "$._context.x", "End": true}}}),
            Some("A"),
            "ResultPath",
            "cannot be written",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Parameters": {"x.$": "nope"}, "End": true}}}),
            Some("A"),
            "Parameters",
            "`x.$`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Parameters": {"x.=": "1 +"}, "End": true}}}),
            Some("A"),
            "Parameters",
            "`x.=`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Parameters": {"x.$": 3}, "End": true}}}),
            Some("A"),
            "Parameters",
            "path string",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Pass", "Parameters": {"x": 1, "x.$": "$.a"}, "End": true}}}),
            Some("A"),
            "Parameters",
            "twice",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "Parameters": {}, "End": true}}}),
            Some("A"),
            "ActionUrl",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "End": true}}}),
            Some("A"),
            "Parameters",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "Parameters": {}, "InputPath": "$", "End": true}}}),
            Some("A"),
            "InputPath",
            "not both",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "Parameters": {}, "WaitTime": "long", "End": true}}}),
            Some("A"),
            "WaitTime",
            "number",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "Parameters": {}, "Catch": [{"Next": "A"}], "End": true}}}),
            Some("A"),
            "Catch[0].ErrorEquals",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "Parameters": {}, "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Nowhere"}], "End": true}}}),
            Some("A"),
            "Catch",
            "no state is named `Nowhere`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Action", "ActionUrl": "u", "Parameters": {}, "Retry": [{"ErrorEquals": ["X"], "BackoffRate": 0.5}], "End": true}}}),
            Some("A"),
            "BackoffRate",
            "at least 1.0",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "ExpressionEval", "ResultPath": "$.x", "End": true}}}),
            Some("A"),
            "Parameters",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "ExpressionEval", "Parameters": {"a": 1}, "End": true}}}),
            Some("A"),
            "ResultPath",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "ExpressionEval", "InputPath": "$", "Parameters": {"a": 1}, "ResultPath": "$.x", "End": true}}}),
            Some("A"),
            "InputPath",
            "unknown field",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Wait", "End": true}}}),
            Some("A"),
            "Seconds",
            "exactly one",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Wait", "Seconds": 1, "Timestamp": "2026-01-01T00:00:00Z", "End": true}}}),
            Some("A"),
            "Seconds",
            "exactly one",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Wait", "Timestamp": "tomorrow", "End": true}}}),
            Some("A"),
            "Timestamp",
            "RFC 3339",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Wait", "Seconds": 1.5, "End": true}}}),
            Some("A"),
            "Seconds",
            "whole number",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Fail", "Error": "E", "ErrorPath": "$.e"}}}),
            Some("A"),
            "ErrorPath",
            "not both",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Fail", "Next": "A"}}}),
            Some("A"),
            "Next",
            "unknown field for a Fail state",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Default": "B"}, "B": pass_end}}),
            Some("A"),
            "Choices",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"Variable": "$.x", "BooleanEquals": true}]}}}),
            Some("A"),
            "Choices[0].Next",
            "missing",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"Variable": "$.x", "BooleanEquals": "yes", "Next": "B"}]}, "B": pass_end}}),
            Some("A"),
            "Choices[0].BooleanEquals",
            "true or false",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"Variable": "$.x", "NumericEqual": 1, "Next": "B"}]}, "B": pass_end}}),
            Some("A"),
            "Choices[0].NumericEqual",
            "unknown field",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"Variable": "$.x", "NumericEquals": 1, "StringEquals": "1", "Next": "B"}]}, "B": pass_end}}),
            Some("A"),
            "Choices[0].StringEquals",
            "exactly one",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"And": [{"Variable": "$.x", "IsNull": true, "Next": "B"}], "Next": "B"}]}, "B": pass_end}}),
            Some("A"),
            "Choices[0].And[0].Next",
            "only a top-level rule",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [{"Variable": "$.x", "IsNull": true, "Next": "B"}], "Next": "B"}, "B": pass_end}}),
            Some("A"),
            "Next",
            "unknown field for a Choice state",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Parallel", "Branches": [{"StartAt": "X", "States": {"X": {"Type": "Pass", "Next": "Y"}}}], "End": true}}}),
            Some("A/branch 0/X"),
            "Next",
            "no state is named `Y`",
        ),
        (
            json!({"StartAt": "A", "States": {"A": {"Type": "Map", "End": true}}}),
            Some("A"),
            "Iterator",
            "missing",
        ),
    ]
}

#[test]
fn each_mistake_is_refused_naming_the_state_and_the_field() {
    for (doc, state, field, words) in refused() {
        let e = match Definition::parse(&doc) {
            Ok(_) => panic!("accepted: {doc}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert_eq!(e.state.as_deref(), state, "{doc}: {shown}");
        assert_eq!(e.field, field, "{doc}: {shown}");
        assert!(shown.contains(words), "{doc}: `{shown}` lacks `{words}`");
    }
}

#[test]
fn unknown_action_urls_are_refused_by_state() {
    let doc = json!({
        "StartAt": "P",
        "States": {
            "P": {
                "Type": "Parallel",
                "Branches": [{"StartAt": "Run", "States": {"Run": {
                    "Type": "Action", "ActionUrl": "https://example.org/nothing",
                    "Parameters": {}, "End": true
                }}}],
                "End": true
            }
        }
    });
    let def = Definition::parse(&doc).unwrap();
    let e = def
        .check_actions(&|url| url.starts_with("https://actions.globus.org/"))
        .unwrap_err();
    assert_eq!(e.state.as_deref(), Some("P/branch 0/Run"));
    assert_eq!(e.field, "ActionUrl");
    assert!(e.message.contains("https://example.org/nothing"));
}

#[test]
fn the_ast_extensions_parse() {
    let doc = json!({
        "StartAt": "Each",
        "States": {
            "Each": {
                "Type": "Map",
                "ItemsPath": "$.items",
                "MaxConcurrency": 2,
                "ItemSelector": {"value.$": "$$.Map.Item.Value", "i.$": "$$.Map.Item.Index"},
                "ItemProcessor": {"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}},
                "ResultPath": "$.mapped",
                "Retry": [{"ErrorEquals": ["States.ALL"], "MaxAttempts": 2}],
                "Next": "Both"
            },
            "Both": {
                "Type": "Parallel",
                "Branches": [
                    {"StartAt": "One", "States": {"One": {"Type": "Pass", "Result": 1, "End": true}}},
                    {"StartAt": "Two", "States": {"Two": {"Type": "Pass", "Result": 2, "End": true}}}
                ],
                "ResultPath": null,
                "End": true
            }
        }
    });
    let def = Definition::parse(&doc).unwrap();
    match &def.states["Each"].kind {
        Kind::Map {
            max_concurrency,
            retry,
            ..
        } => {
            assert_eq!(*max_concurrency, 2);
            assert_eq!(retry[0].max_attempts, 2);
            assert_eq!(retry[0].interval_seconds, 1.0);
            assert_eq!(retry[0].backoff_rate, 2.0);
        }
        other => panic!("{other:?}"),
    }
    match &def.states["Both"].kind {
        Kind::Parallel { branches, io, .. } => {
            assert_eq!(branches.len(), 2);
            assert!(io.result_path.is_none(), "null discards the result");
        }
        other => panic!("{other:?}"),
    }
}

/// Arbitrary JSON, biased towards the words of the language.
fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let words = prop::sample::select(vec![
        "Type",
        "Pass",
        "Action",
        "Choice",
        "Wait",
        "Fail",
        "Succeed",
        "Map",
        "Parallel",
        "ExpressionEval",
        "Next",
        "End",
        "StartAt",
        "States",
        "Parameters",
        "ResultPath",
        "InputPath",
        "Choices",
        "Variable",
        "And",
        "Not",
        "Branches",
        "Iterator",
        "Catch",
        "Retry",
        "ErrorEquals",
        "ActionUrl",
        "Seconds",
        "x.$",
        "y.=",
        "$",
        "$.a",
        "$[*]",
        "$..b",
        "a + 1",
        "A",
        "B",
        "$$.Map.Item.Value",
        "States.ALL",
        "NumericEquals",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        words.clone().prop_map(|w| json!(w)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((words.clone(), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Any JSON gives a definition or an error naming a field; nothing panics.
    #[test]
    fn any_json_is_read_or_refused_without_panic(doc in arb_json()) {
        if let Err(e) = Definition::parse(&doc) {
            proptest::prop_assert!(!e.field.is_empty());
            proptest::prop_assert!(!e.message.is_empty());
        }
    }

    /// A corpus definition with one value replaced anywhere is read or refused, never a panic.
    #[test]
    fn mutated_corpus_definitions_are_read_or_refused(
        pick in 0usize..64, at in 0usize..4096, with in arb_json()
    ) {
        let defs = corpus_definitions();
        let (_, mut doc) = defs[pick % defs.len()].clone();
        let mut n = at;
        replace_nth(&mut doc, &mut n, &with);
        let _ = Definition::parse(&doc);
    }
}

/// Replaces the `n`th value (depth first) of `doc` by `with`.
fn replace_nth(doc: &mut Value, n: &mut usize, with: &Value) -> bool {
    if *n == 0 {
        *doc = with.clone();
        return true;
    }
    *n -= 1;
    match doc {
        Value::Array(items) => items.iter_mut().any(|v| replace_nth(v, n, with)),
        Value::Object(map) => map.values_mut().any(|v| replace_nth(v, n, with)),
        _ => false,
    }
}

proptest::proptest! {
    /// Any string is a path or an error; a path selects from any document without panic,
    /// and a reference path writes where it names.
    #[test]
    fn paths_parse_select_and_write_without_panic(
        text in "\\$[\\[\\]\\.a-c0-9'\"*:?@,\\-$ ]{0,24}", doc in arb_json()
    ) {
        if let Ok(p) = flows::path::Path::parse(&text) {
            let _ = p.select(&doc);
            let _ = p.is_present(&doc);
        }
        if let Ok(r) = flows::path::RefPath::parse(&text) {
            let mut d = json!({});
            if r.set(&mut d, json!("here")).is_ok() {
                proptest::prop_assert_eq!(flows::path::get(&d, r.steps()), Some(&json!("here")));
            }
        }
    }
}

#[test]
fn input_schemas_check_run_inputs_and_never_fetch() {
    let path = corpus_dir()
        .join("globus-flows-examples/compute_transfer_examples/tar_and_transfer/compute_transfer_example_1_schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    flows::schema::check_schema(&schema).unwrap();
    let ok = json!({"source_paths": ["/a"], "destination_endpoint_id": "b1"});
    flows::schema::check_input(&schema, &ok).unwrap();
    let e = flows::schema::check_input(&schema, &json!({"source_paths": "/a", "extra": 1}))
        .unwrap_err();
    assert!(e.contains("/source_paths"), "{e}");
    assert!(
        e.contains("destination_endpoint_id"),
        "names what is missing: {e}"
    );
    // Any input when there is no schema.
    flows::schema::check_input(&Value::Null, &json!([1, 2])).unwrap();
    // Not a schema; a reference elsewhere is not fetched.
    assert!(flows::schema::check_schema(&json!({"type": 7})).is_err());
    let remote = json!({"$ref": "http://127.0.0.1:9/schema.json"});
    assert!(flows::schema::check_schema(&remote).is_err());
}
