//! The expression language: every expression of the Globus Flows corpus, each feature, each
//! error, the bounds, and properties over arbitrary input.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

use flows::expr::{self, Error, MAX_DEPTH, MAX_SOURCE_LEN};
use proptest::prelude::*;
use serde_json::{Value, json};

/// `src` for a failure message: generated sources can be long.
fn short(src: &str) -> String {
    let mut shown: String = src.chars().take(120).collect();
    if shown.len() < src.len() {
        shown.push_str("...");
    }
    shown
}

#[track_caller]
fn eval(src: &str, ctx: &Value) -> Value {
    match expr::evaluate(src, ctx) {
        Ok(value) => value,
        Err(e) => panic!("{:?} failed: {e}", short(src)),
    }
}

#[track_caller]
fn fails(src: &str, ctx: &Value) -> Error {
    match expr::evaluate(src, ctx) {
        Ok(value) => panic!("{:?} gave {value} instead of an error", short(src)),
        Err(e) => e,
    }
}

#[track_caller]
fn message(src: &str, ctx: &Value) -> String {
    fails(src, ctx).to_string()
}

/// A context with one value of each type, for the feature tests.
fn ctx() -> Value {
    json!({
        "a": {"b": {"c": 3}},
        "xs": [10, 20, 30, 40],
        "s": "hello",
        "u": "héllo",
        "d": {"a": 1, "b": 2},
        "n": null,
        "t": true,
        "f": 1.5,
        "big": 18_446_744_073_709_551_615_u64,
        "empty": {},
        "source_path": "outer",
        "_context": {"run_id": "run-1"},
    })
}

// ---------------------------------------------------------------------------------------------
// The corpus: every `"key.=": "..."` of /work/shared/corpus/globus-flows, copied verbatim,
// with the state the flow has when it evaluates it.
// ---------------------------------------------------------------------------------------------

/// (definition, parameter, expression) for each distinct expression of the corpus.
const CORPUS: &[(&str, &str, &str)] = &[
    (
        "compute_transfer_example_{1,2}",
        "compute_output_directory",
        "'/' + _context.run_id + '/'",
    ),
    (
        "compute_transfer_example_{1,2}",
        "input_data_valid",
        "['~' in source_path or source_path == '/' for source_path in source_paths] == [False] * len(source_paths)",
    ),
    (
        "compute_transfer_example_2",
        "src_paths",
        "[run_vars.compute_output_directory + pathsplit(source_path.rstrip('/'))[1] + '/' if source_path.endswith('/') else run_vars.compute_output_directory + pathsplit(source_path)[1] for source_path in source_paths]",
    ),
    (
        "compute_transfer_example_2",
        "src_to_intermediate_transfer_data",
        "[{'source_path': source_path, 'destination_path': run_vars.compute_output_directory + pathsplit(source_path.rstrip('/'))[1] + '/' if source_path.endswith('/') else run_vars.compute_output_directory + pathsplit(source_path)[1], 'recursive': True if source_path.endswith('/') else False} for source_path in source_paths]",
    ),
    (
        "compute_transfer_example_{1,2}",
        "path",
        "getattr('destination_path', '/~/' + pathsplit(compute_func_result.details.result[0])[1])",
    ),
    (
        "compute_transfer_example_{1,2}",
        "source_path",
        "compute_func_result.details.result[0]",
    ),
    (
        "move, two_hop",
        "source_is_dir",
        "SourceStat.details.type == 'dir'",
    ),
    (
        "move, two_hop",
        "dest_is_dir",
        "'type' in DestinationStat.details and DestinationStat.details.type == 'dir'",
    ),
    (
        "move, two_hop",
        "dest_exists",
        "'code' not in DestinationStat.details or DestinationStat.details.code != 'NotFound'",
    ),
    (
        "move",
        "path",
        "destination.path + source.path.rpartition('/')[2]",
    ),
    (
        "two_hop",
        "intermediate_is_dir",
        "'type' in IntermediateStat.details and IntermediateStat.details.type == 'dir'",
    ),
    ("two_hop", "source_is_default_dir", "source.path == '/~/'"),
    ("two_hop", "source_is_root", "source.path == '/'"),
    (
        "two_hop",
        "basename",
        "source.path.rpartition('/')[2] if not PathTypes.source_is_dir else 'DEFAULT' if PathTypes.source_is_default_dir else 'ROOT' if PathTypes.source_is_root else source.path.split('/')[-2]",
    ),
    (
        "two_hop",
        "intermediate_dir",
        "intermediate.path.rstrip('/') + '/' + _context.run_id + '/'",
    ),
    (
        "two_hop",
        "intermediate_path",
        "intermediate.path.rstrip('/') + '/' + _context.run_id + '/' + ComputedIntermediatePath.basename",
    ),
    (
        "two_hop",
        "source_path",
        "ComputedTaskData.intermediate_path",
    ),
    (
        "looping_batched_move",
        "transfer_DATA",
        "[{'source_path': source.path.rstrip('/') + '/' + item.name, 'destination_path': destination.path.rstrip('/') + '/' + item.name} for item in ls_results.details.DATA]",
    ),
    (
        "looping_batched_move",
        "delete_DATA",
        "[{'path': source.path.rstrip('/') + '/' + item.name} for item in ls_results.details.DATA]",
    ),
    (
        "loop-a-set-number-of-times",
        "counter",
        "state_manager.counter + 1",
    ),
    (
        "complex-hello-world (expression_eval action)",
        "expression",
        "Hellos == Hellos[0:0]",
    ),
];

#[track_caller]
fn corpus(parameter: &str, nth: usize) -> &'static str {
    CORPUS
        .iter()
        .filter(|(_, p, _)| *p == parameter)
        .nth(nth)
        .map(|(_, _, src)| *src)
        .unwrap()
}

#[test]
fn every_corpus_expression_parses() {
    for (definition, parameter, src) in CORPUS {
        if let Err(e) = expr::parse(src) {
            panic!("{definition} {parameter}: {e}");
        }
    }
}

#[test]
fn tar_and_transfer_run_variables() {
    let state = json!({
        "source_paths": ["/data/run7/a.txt", "/data/run7/images/"],
        "destination_endpoint_id": "6c54cade",
        "_context": {"run_id": "0a1b2c3d-run", "username": "someone@example.org"},
    });
    assert_eq!(
        eval(corpus("compute_output_directory", 0), &state),
        json!("/0a1b2c3d-run/")
    );
    let valid = corpus("input_data_valid", 0);
    assert_eq!(eval(valid, &state), json!(true));
    for bad in [json!(["/data/a", "/~/b"]), json!(["/"]), json!(["~x"])] {
        let state = json!({"source_paths": bad});
        assert_eq!(eval(valid, &state), json!(false), "{bad}");
    }
    assert_eq!(eval(valid, &json!({"source_paths": []})), json!(true));
}

#[test]
fn tar_and_transfer_input_data() {
    let state = json!({
        "source_paths": ["/data/run7/a.txt", "/data/run7/images/"],
        "run_vars": {"compute_output_directory": "/0a1b2c3d-run/"},
    });
    assert_eq!(
        eval(corpus("src_paths", 0), &state),
        json!(["/0a1b2c3d-run/a.txt", "/0a1b2c3d-run/images/"])
    );
    assert_eq!(
        eval(corpus("src_to_intermediate_transfer_data", 0), &state),
        json!([
            {
                "source_path": "/data/run7/a.txt",
                "destination_path": "/0a1b2c3d-run/a.txt",
                "recursive": false,
            },
            {
                "source_path": "/data/run7/images/",
                "destination_path": "/0a1b2c3d-run/images/",
                "recursive": true,
            },
        ])
    );
}

#[test]
fn tar_and_transfer_destination() {
    let mut state = json!({
        "compute_func_result": {
            "status": "SUCCEEDED",
            "details": {"result": ["/0a1b2c3d-run/a.tar.gz"]},
        },
    });
    let path = corpus("path", 0);
    assert_eq!(eval(path, &state), json!("/~/a.tar.gz"));
    assert_eq!(
        eval(corpus("source_path", 0), &state),
        json!("/0a1b2c3d-run/a.tar.gz")
    );
    state["destination_path"] = json!("/~/archives/run7.tar.gz");
    assert_eq!(eval(path, &state), json!("/~/archives/run7.tar.gz"));
}

/// The `stat` results the transfer provider gives for a directory, a file, and a missing path.
fn stat_dir() -> Value {
    json!({"details": {"name": "d", "type": "dir", "size": 4096}, "status": "SUCCEEDED"})
}
fn stat_file() -> Value {
    json!({"details": {"name": "f.txt", "type": "file", "size": 12}, "status": "SUCCEEDED"})
}
fn stat_missing() -> Value {
    json!({"details": {"code": "NotFound", "message": "no such path"}, "status": "SUCCEEDED"})
}

#[test]
fn move_path_types() {
    let (source_is_dir, dest_is_dir, dest_exists) = (
        corpus("source_is_dir", 0),
        corpus("dest_is_dir", 0),
        corpus("dest_exists", 0),
    );
    let state = json!({"SourceStat": stat_dir(), "DestinationStat": stat_missing()});
    assert_eq!(eval(source_is_dir, &state), json!(true));
    assert_eq!(eval(dest_is_dir, &state), json!(false));
    assert_eq!(eval(dest_exists, &state), json!(false));

    let state = json!({"SourceStat": stat_file(), "DestinationStat": stat_dir()});
    assert_eq!(eval(source_is_dir, &state), json!(false));
    assert_eq!(eval(dest_is_dir, &state), json!(true));
    assert_eq!(eval(dest_exists, &state), json!(true));

    let state = json!({"SourceStat": stat_file(), "DestinationStat": stat_file()});
    assert_eq!(eval(dest_is_dir, &state), json!(false));
    assert_eq!(eval(dest_exists, &state), json!(true));

    let state = json!({
        "source": {"path": "/~/source-directory/f.txt"},
        "destination": {"path": "/~/destination-directory/"},
    });
    assert_eq!(
        eval(corpus("path", 1), &state),
        json!("/~/destination-directory/f.txt")
    );
}

#[test]
fn two_hop_paths() {
    let state = json!({
        "source": {"id": "6c54cade", "path": "/~/ep1-example-directory/"},
        "intermediate": {"id": "31ce9ba0", "path": "/~/ep2-intermediate-directory/"},
        "IntermediateStat": stat_dir(),
        "PathTypes": {"source_is_dir": true, "source_is_default_dir": false, "source_is_root": false},
        "ComputedIntermediatePath": {"basename": "ep1-example-directory"},
        "ComputedTaskData": {"intermediate_path": "/~/ep2-intermediate-directory/r9/ep1-example-directory"},
        "_context": {"run_id": "r9"},
    });
    assert_eq!(eval(corpus("intermediate_is_dir", 0), &state), json!(true));
    assert_eq!(
        eval(corpus("source_is_default_dir", 0), &state),
        json!(false)
    );
    assert_eq!(eval(corpus("source_is_root", 0), &state), json!(false));
    assert_eq!(
        eval(corpus("basename", 0), &state),
        json!("ep1-example-directory")
    );
    assert_eq!(
        eval(corpus("intermediate_dir", 0), &state),
        json!("/~/ep2-intermediate-directory/r9/")
    );
    assert_eq!(
        eval(corpus("intermediate_path", 0), &state),
        json!("/~/ep2-intermediate-directory/r9/ep1-example-directory")
    );
    assert_eq!(
        eval(corpus("source_path", 1), &state),
        json!("/~/ep2-intermediate-directory/r9/ep1-example-directory")
    );
}

#[test]
fn two_hop_basename_cases() {
    let basename = corpus("basename", 0);
    let case = |path: &str, dir: bool, default: bool, root: bool| {
        let state = json!({
            "source": {"path": path},
            "PathTypes": {"source_is_dir": dir, "source_is_default_dir": default, "source_is_root": root},
        });
        eval(basename, &state)
    };
    assert_eq!(
        case("/~/ep1/file.txt", false, false, false),
        json!("file.txt")
    );
    assert_eq!(case("/~/ep1/sub/", true, false, false), json!("sub"));
    assert_eq!(case("/~/", true, true, false), json!("DEFAULT"));
    assert_eq!(case("/", true, false, true), json!("ROOT"));
    for (source, expected) in [("/~/", true), ("/", false), ("/~/x/", false)] {
        let state = json!({"source": {"path": source}});
        assert_eq!(
            eval(corpus("source_is_default_dir", 0), &state),
            json!(expected)
        );
        assert_eq!(
            eval(corpus("source_is_root", 0), &state),
            json!(source == "/")
        );
    }
}

#[test]
fn looping_batched_move_data() {
    let state = json!({
        "source": {"id": "6c54cade", "path": "/~/source-directory"},
        "destination": {"id": "31ce9ba0", "path": "/~/destination-directory/"},
        "ls_results": {"details": {"DATA": [
            {"name": "a.txt", "type": "file", "size": 3},
            {"name": "sub", "type": "dir", "size": 4096},
        ], "total": 2}},
    });
    assert_eq!(
        eval(corpus("transfer_DATA", 0), &state),
        json!([
            {"source_path": "/~/source-directory/a.txt", "destination_path": "/~/destination-directory/a.txt"},
            {"source_path": "/~/source-directory/sub", "destination_path": "/~/destination-directory/sub"},
        ])
    );
    assert_eq!(
        eval(corpus("delete_DATA", 0), &state),
        json!([{"path": "/~/source-directory/a.txt"}, {"path": "/~/source-directory/sub"}])
    );
    let mut empty = state;
    empty["ls_results"]["details"]["DATA"] = json!([]);
    assert_eq!(eval(corpus("delete_DATA", 0), &empty), json!([]));
}

#[test]
fn counter_and_hello_loop() {
    let counter = corpus("counter", 0);
    assert_eq!(
        eval(counter, &json!({"state_manager": {"counter": 0}})),
        json!(1)
    );
    assert_eq!(
        eval(counter, &json!({"state_manager": {"counter": 9}})),
        json!(10)
    );
    let done = corpus("expression", 0);
    assert_eq!(
        eval(done, &json!({"Hellos": ["First", "Second"]})),
        json!(false)
    );
    assert_eq!(eval(done, &json!({"Hellos": ["Second"]})), json!(false));
    assert_eq!(eval(done, &json!({"Hellos": []})), json!(true));
}

/// The examples of the Globus documentation of expressions and of the expression-eval action.
#[test]
fn documentation_examples() {
    let state = json!({
        "foo": "bar",
        "list_val": [1, 2, 3],
        "object_val": {"sub_val1": "embedded", "sub_val2": "also_embedded"},
        "x": 6,
        "Path": {"To": {"SuffixString": "suffix"}},
    });
    assert_eq!(
        eval("foo + ' ' + object_val.sub_val1", &state),
        json!("bar embedded")
    );
    assert_eq!(eval("x + 5", &state), json!(11));
    assert_eq!(
        eval("'Constant string ' + Path.To.SuffixString", &state),
        json!("Constant string suffix")
    );
    assert_eq!(
        eval("pathsplit(\"/foo/bar/blech\")", &state),
        json!(["/foo/bar", "blech"])
    );
    assert_eq!(
        eval("pathsplit(\"/~/path\")", &state),
        json!(["/~/", "path"])
    );
    assert_eq!(eval("x if is_present('x') else 10", &state), json!(6));
    assert_eq!(eval("y if is_present('y') else 10", &state), json!(10));
    assert_eq!(eval("getattr('x', 10)", &state), json!(6));
    assert_eq!(eval("getattr('y', 10)", &state), json!(10));
    assert_eq!(eval("getattr('missing_property')", &state), json!(null));
    assert_eq!(eval("list_val[1] + list_val[-1]", &state), json!(5));
}

// ---------------------------------------------------------------------------------------------
// Features
// ---------------------------------------------------------------------------------------------

#[test]
fn literals() {
    let c = ctx();
    for (src, expected) in [
        ("1", json!(1)),
        ("-1", json!(-1)),
        ("1.5", json!(1.5)),
        ("1e3", json!(1000.0)),
        ("1.E-2", json!(0.01)),
        (".5", json!(0.5)),
        ("5.", json!(5.0)),
        ("1_000", json!(1000)),
        ("0x1F", json!(31)),
        ("0o17", json!(15)),
        ("0b101", json!(5)),
        ("0x_ff", json!(255)),
        ("00", json!(0)),
        ("9223372036854775807", json!(i64::MAX)),
        ("True", json!(true)),
        ("False", json!(false)),
        ("None", json!(null)),
        ("'a' \"b\"", json!("ab")),
        (r"'it\'s'", json!("it's")),
        (r#""say \"hi\"""#, json!("say \"hi\"")),
        (r"'\n\t\\'", json!("\n\t\\")),
        (r"'\x41\u00e9\U0001F600\101'", json!("Aé😀A")),
        (r"'\d'", json!("\\d")),
        (r"r'\d\''", json!("\\d\\'")),
        ("u'x'", json!("x")),
        ("''", json!("")),
        ("[1, 'a', None]", json!([1, "a", null])),
        ("[1, 2,]", json!([1, 2])),
        ("[]", json!([])),
        ("(1, 2)", json!([1, 2])),
        ("(1,)", json!([1])),
        ("()", json!([])),
        ("(1)", json!(1)),
        (
            "{'a': 1, \"b\": [2], 'c': {}}",
            json!({"a": 1, "b": [2], "c": {}}),
        ),
        ("{'a': 1, 'a': 2}", json!({"a": 2})),
        ("{}", json!({})),
        ("  1\n +\t2  ", json!(3)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
    // `/` always gives a float, which JSON keeps as one.
    assert_eq!(eval("4 / 2", &c).to_string(), "2.0");
}

#[test]
fn names_attributes_indexing_slicing() {
    let c = ctx();
    for (src, expected) in [
        ("a.b.c", json!(3)),
        ("a['b']['c']", json!(3)),
        ("a.b", json!({"c": 3})),
        ("_context.run_id", json!("run-1")),
        ("xs[0]", json!(10)),
        ("xs[-1]", json!(40)),
        ("xs[True]", json!(20)),
        ("xs[1:3]", json!([20, 30])),
        ("xs[::-1]", json!([40, 30, 20, 10])),
        ("xs[::2]", json!([10, 30])),
        ("xs[-2:]", json!([30, 40])),
        ("xs[:100]", json!([10, 20, 30, 40])),
        ("xs[-100:1]", json!([10])),
        ("xs[3:1]", json!([])),
        ("xs[3:1:-1]", json!([40, 30])),
        ("xs[None:2]", json!([10, 20])),
        ("xs[:]", json!([10, 20, 30, 40])),
        ("xs[-1:-5:-2]", json!([40, 20])),
        ("s[1]", json!("e")),
        ("s[-1]", json!("o")),
        ("s[1:4]", json!("ell")),
        ("s[::-1]", json!("olleh")),
        ("u[1]", json!("é")),
        ("u[1:3]", json!("él")),
        ("[[1, 2], [3]][0][1]", json!(2)),
        ("{'k': [5]}['k'][0]", json!(5)),
        ("{'k': {'j': 7}}.k.j", json!(7)),
        ("d['a'] + d.b", json!(3)),
        ("big", json!(18_446_744_073_709_551_615_u64)),
        ("big == big", json!(true)),
        ("f * 2", json!(3.0)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn arithmetic_follows_python() {
    let c = ctx();
    for (src, expected) in [
        ("1 + 2 * 3", json!(7)),
        ("(1 + 2) * 3", json!(9)),
        ("7 // 2", json!(3)),
        ("-7 // 2", json!(-4)),
        ("7 // -2", json!(-4)),
        ("7 % 3", json!(1)),
        ("-7 % 3", json!(2)),
        ("7 % -3", json!(-2)),
        ("7 / 2", json!(3.5)),
        ("2 ** 10", json!(1024)),
        ("2 ** -1", json!(0.5)),
        ("-2 ** 2", json!(-4)),
        ("(-2) ** 2", json!(4)),
        ("2 ** 3 ** 2", json!(512)),
        ("0 ** 0", json!(1)),
        ("(-1) ** 99999999999", json!(-1)),
        ("4 ** 0.5", json!(2.0)),
        ("7.5 // 2", json!(3.0)),
        ("-7.5 // 2", json!(-4.0)),
        ("-7.5 % 2", json!(0.5)),
        ("7.5 % -2", json!(-0.5)),
        ("10 - 2.5", json!(7.5)),
        ("1 + 1.5", json!(2.5)),
        ("0.1 + 0.2", json!(0.30000000000000004)),
        ("True + True", json!(2)),
        ("-True", json!(-1)),
        ("+3", json!(3)),
        ("- - 3", json!(3)),
        ("'ab' * 3", json!("ababab")),
        ("3 * 'ab'", json!("ababab")),
        ("'ab' * 0", json!("")),
        ("'ab' * -2", json!("")),
        ("'ab' * True", json!("ab")),
        ("[0] * 3", json!([0, 0, 0])),
        ("2 * [1, 2]", json!([1, 2, 1, 2])),
        ("[1] + [2, 3]", json!([1, 2, 3])),
        ("xs + [50]", json!([10, 20, 30, 40, 50])),
        ("'a' + 'b' + s", json!("abhello")),
        ("-9223372036854775807 - 1", json!(i64::MIN)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn equality_and_comparisons_follow_python() {
    let c = ctx();
    for (src, expected) in [
        ("1 == 1.0", true),
        ("True == 1", true),
        ("False == 0.0", true),
        ("[1, 2] == [1.0, 2]", true),
        ("{'a': 1} == {'a': 1.0}", true),
        ("{'a': 1} == {'a': 1, 'b': 2}", false),
        ("'1' == 1", false),
        ("None == None", true),
        ("None == 0", false),
        ("[] == {}", false),
        ("1 != 2", true),
        ("1 < 2 < 3", true),
        ("1 < 3 < 2", false),
        ("3 > 2 > 1 > 0", true),
        ("2 >= 2", true),
        ("2 <= 1", false),
        ("1 < 1.5", true),
        ("9007199254740993 > 9007199254740992.0", true),
        ("'a' < 'b'", true),
        ("'B' < 'a'", true),
        ("'ab' < 'abc'", true),
        ("[1, 2] < [1, 3]", true),
        ("[1] < [1, 0]", true),
        ("['b'] > ['a', 'z']", true),
        ("'ell' in 'hello'", true),
        ("'' in 'hello'", true),
        ("2 in [1, 2]", true),
        ("1.0 in [1]", true),
        ("[1] in [[1], [2]]", true),
        ("'a' in {'a': 1}", true),
        ("'b' not in {'a': 1}", true),
        ("1 in {'1': 1}", false),
        ("None is None", true),
        ("n is None", true),
        ("t is True", true),
        ("1 is 1.0", false),
        ("s is not None", true),
        ("not 1 == 2", true),
        ("1 > 2 < 1 / 0", false),
    ] {
        assert_eq!(eval(src, &c), json!(expected), "{src}");
    }
}

#[test]
fn logic_short_circuits_and_returns_operands() {
    let c = ctx();
    for (src, expected) in [
        ("0 or 'x'", json!("x")),
        ("'' or [] or None", json!(null)),
        ("'' or [] or {}", json!({})),
        ("1 and 2", json!(2)),
        ("1 and 0 and 3", json!(0)),
        ("0 and 1 / 0", json!(0)),
        ("1 or 1 / 0", json!(1)),
        ("not []", json!(true)),
        ("not 'a'", json!(false)),
        ("not not 0.0", json!(false)),
        ("n or d.a", json!(1)),
        ("1 if True else 1 / 0", json!(1)),
        ("'y' if xs else 'n'", json!("y")),
        ("'y' if empty else 'n'", json!("n")),
        ("'a' if False else 'b' if False else 'c'", json!("c")),
        ("(1 if False else 2) + 1", json!(3)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn comprehensions() {
    let c = ctx();
    for (src, expected) in [
        ("[x * 2 for x in xs if x > 15]", json!([40, 60, 80])),
        ("[x for x in xs if x > 15 if x < 35]", json!([20, 30])),
        (
            "[a + b for a in ['x', 'y'] for b in ['1', '2']]",
            json!(["x1", "x2", "y1", "y2"]),
        ),
        (
            "[[y for y in range(x)] for x in range(3)]",
            json!([[], [0], [0, 1]]),
        ),
        ("[y for x in [[1, 2], [3]] for y in x]", json!([1, 2, 3])),
        ("[c for c in 'abc']", json!(["a", "b", "c"])),
        ("[k for k in d]", json!(["a", "b"])),
        ("[a + b for a, b in [[1, 2], [3, 4]]]", json!([3, 7])),
        ("[a for (a, b) in [[1, 2]]]", json!([1])),
        ("[x for x, in [[5]]]", json!([5])),
        ("[k + str(v) for k, v in d.items()]", json!(["a1", "b2"])),
        (
            "{k: v * 10 for k, v in d.items()}",
            json!({"a": 10, "b": 20}),
        ),
        ("{str(x): x for x in range(2)}", json!({"0": 0, "1": 1})),
        ("sum(x for x in xs)", json!(100)),
        ("max(len(w) for w in ['a', 'abc'])", json!(3)),
        ("(x for x in [1, 2])", json!([1, 2])),
        (
            "[source_path for source_path in ['in']] + [source_path]",
            json!(["in", "outer"]),
        ),
        ("[x for x in []]", json!([])),
        ("[xs for x in [1]]", json!([[10, 20, 30, 40]])),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn functions() {
    let c = ctx();
    for (src, expected) in [
        ("len('héllo')", json!(5)),
        ("len(xs)", json!(4)),
        ("len(d)", json!(2)),
        ("len('')", json!(0)),
        ("pathsplit('/foo/bar/blech')", json!(["/foo/bar", "blech"])),
        ("pathsplit('/~/path')", json!(["/~/", "path"])),
        ("pathsplit('/~/')", json!(["/~/", ""])),
        ("pathsplit('/~/a/b')", json!(["/~/a", "b"])),
        ("pathsplit('file')", json!(["", "file"])),
        ("pathsplit('/file')", json!(["/", "file"])),
        ("pathsplit('/a/b/')", json!(["/a/b", ""])),
        ("pathsplit('//a')", json!(["//", "a"])),
        ("pathsplit('a//b')", json!(["a", "b"])),
        ("pathsplit('')", json!(["", ""])),
        ("str(1)", json!("1")),
        ("str(-1.5)", json!("-1.5")),
        ("str(2.0)", json!("2.0")),
        ("str(1e16)", json!("1e+16")),
        ("str(1e15)", json!("1000000000000000.0")),
        ("str(1e-5)", json!("1e-05")),
        ("str(0.0001)", json!("0.0001")),
        ("str(123456789012345678.0)", json!("1.2345678901234568e+17")),
        ("str(1 / 3)", json!("0.3333333333333333")),
        ("str(True)", json!("True")),
        ("str(None)", json!("None")),
        ("str([1, 'a', None, 2.5])", json!("[1, 'a', None, 2.5]")),
        ("str({'a': \"it's\"})", json!("{'a': \"it's\"}")),
        ("str('a\\nb')", json!("a\nb")),
        ("str(['a\\nb'])", json!("['a\\nb']")),
        ("str()", json!("")),
        ("str(big)", json!("18446744073709551615")),
        ("int('42')", json!(42)),
        ("int(' -7 ')", json!(-7)),
        ("int('+1_000')", json!(1000)),
        ("int(3.9)", json!(3)),
        ("int(-3.9)", json!(-3)),
        ("int(True)", json!(1)),
        ("int('ff', 16)", json!(255)),
        ("int('0x1f', 16)", json!(31)),
        ("int(x='101', base=2)", json!(5)),
        ("int('-9223372036854775808')", json!(i64::MIN)),
        ("int()", json!(0)),
        ("float('1.5')", json!(1.5)),
        ("float(' 1e3 ')", json!(1000.0)),
        ("float('1_0.5')", json!(10.5)),
        ("float(2)", json!(2.0)),
        ("float()", json!(0.0)),
        ("bool([])", json!(false)),
        ("bool('x')", json!(true)),
        ("bool(0.0)", json!(false)),
        ("bool()", json!(false)),
        ("abs(-3)", json!(3)),
        ("abs(-2.5)", json!(2.5)),
        ("abs(False)", json!(0)),
        ("max(3, 1, 2)", json!(3)),
        ("min([3, 1, 2])", json!(1)),
        ("max('abc')", json!("c")),
        ("max([], default=0)", json!(0)),
        ("min(1, 1.0)", json!(1)),
        ("max(1.0, 1)", json!(1.0)),
        ("max([1, 2.5])", json!(2.5)),
        ("max(xs)", json!(40)),
        ("sum([1, 2, 3])", json!(6)),
        ("sum([0.5, 0.25])", json!(0.75)),
        ("sum([[1], [2]], [])", json!([1, 2])),
        ("sum([], 10)", json!(10)),
        ("sum(xs, start=1)", json!(101)),
        ("sorted([3, 1, 2])", json!([1, 2, 3])),
        ("sorted(['b', 'a', 'C'])", json!(["C", "a", "b"])),
        ("sorted([3, 1, 2], reverse=True)", json!([3, 2, 1])),
        ("sorted('cab')", json!(["a", "b", "c"])),
        ("sorted([2, 1.5, True])", json!([true, 1.5, 2])),
        (
            "sorted([[1, 'b'], [0, 'z'], [1, 'a']])",
            json!([[0, "z"], [1, "a"], [1, "b"]]),
        ),
        // Stable, in both directions.
        ("sorted([1, 1.0, True])", json!([1, 1.0, true])),
        ("sorted([1, 2, 1.0], reverse=True)", json!([2, 1, 1.0])),
        ("sorted(d)", json!(["a", "b"])),
        ("range(3)", json!([0, 1, 2])),
        ("range(1, 4)", json!([1, 2, 3])),
        ("range(10, 0, -3)", json!([10, 7, 4, 1])),
        ("range(0)", json!([])),
        ("range(5, 1)", json!([])),
        ("is_present('a.b.c')", json!(true)),
        ("is_present('a.b.x')", json!(false)),
        ("is_present('a.b.c.d')", json!(false)),
        ("is_present('$.a.b')", json!(true)),
        ("is_present('$')", json!(true)),
        ("is_present('xs[1]')", json!(true)),
        ("is_present('xs[-1]')", json!(true)),
        ("is_present('xs[9]')", json!(false)),
        ("is_present('n')", json!(true)),
        ("is_present('nope')", json!(false)),
        ("[is_present('x') for x in [1]]", json!([true])),
        ("getattr('a.b.c')", json!(3)),
        ("getattr('nope')", json!(null)),
        ("getattr('nope', 10)", json!(10)),
        ("getattr('xs[-1]', 0)", json!(40)),
        ("getattr(name='d.a', default=0)", json!(1)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn methods() {
    let c = ctx();
    for (src, expected) in [
        ("'a,b,,c'.split(',')", json!(["a", "b", "", "c"])),
        ("' a  b '.split()", json!(["a", "b"])),
        ("''.split()", json!([])),
        ("''.split(',')", json!([""])),
        ("'a b c'.split(None, 1)", json!(["a", "b c"])),
        ("'a b  '.split(maxsplit=1)", json!(["a", "b  "])),
        ("'a,b,c'.split(',', maxsplit=1)", json!(["a", "b,c"])),
        ("'a,b,c'.split(',', -1)", json!(["a", "b", "c"])),
        ("'a,b,c'.rsplit(',', 1)", json!(["a,b", "c"])),
        ("' a b c '.rsplit(None, 1)", json!([" a b", "c"])),
        ("'a b'.rsplit()", json!(["a", "b"])),
        ("'/a/b/'.rstrip('/')", json!("/a/b")),
        ("'  x \\n'.strip()", json!("x")),
        ("'xxaxx'.lstrip('x')", json!("axx")),
        ("'xyaxy'.strip('yx')", json!("a")),
        ("'a/b/c'.rpartition('/')", json!(["a/b", "/", "c"])),
        ("'abc'.rpartition('/')", json!(["", "", "abc"])),
        ("'a/b/c'.partition('/')", json!(["a", "/", "b/c"])),
        ("'abc'.partition('/')", json!(["abc", "", ""])),
        ("'hello'.startswith('he')", json!(true)),
        ("'hello'.startswith('lo')", json!(false)),
        ("'hello'.endswith(('x', 'lo'))", json!(true)),
        ("'hello'.endswith(['x', 'y'])", json!(false)),
        ("'hello'.startswith('l', 2)", json!(true)),
        ("'hello'.endswith('l', 0, 4)", json!(true)),
        ("'hello'.startswith('', 5)", json!(true)),
        ("'hello'.startswith('', 6)", json!(false)),
        ("'héllo'.startswith('hé')", json!(true)),
        ("'Hello World'.lower()", json!("hello world")),
        ("'straße'.upper()", json!("STRASSE")),
        ("'aaa'.replace('a', 'b')", json!("bbb")),
        ("'aaa'.replace('a', 'b', 2)", json!("bba")),
        ("'abc'.replace('', '-')", json!("-a-b-c-")),
        ("'abc'.replace('x', 'y')", json!("abc")),
        ("'-'.join(['a', 'b', 'c'])", json!("a-b-c")),
        ("''.join('abc')", json!("abc")),
        ("', '.join([])", json!("")),
        ("'/'.join(d)", json!("a/b")),
        ("'hello'.find('l')", json!(2)),
        ("'hello'.find('z')", json!(-1)),
        ("'hello'.find('l', 3)", json!(3)),
        ("'hello'.find('l', -2)", json!(3)),
        ("'hello'.find('lo', 0, 4)", json!(-1)),
        ("'héllo'.find('l')", json!(2)),
        ("'abc'.find('', 3)", json!(3)),
        ("'abc'.find('', 4)", json!(-1)),
        ("s.upper().lower()[1:]", json!("ello")),
        ("[1, 2, 1].count(1)", json!(2)),
        ("[1, 2, 1].count(1.0)", json!(2)),
        ("['a', 'b'].index('b')", json!(1)),
        ("d.get('a')", json!(1)),
        ("d.get('z')", json!(null)),
        ("d.get('z', 0)", json!(0)),
        ("d.get(1, 'no')", json!("no")),
        ("d.keys()", json!(["a", "b"])),
        ("d.values()", json!([1, 2])),
        ("d.items()", json!([["a", 1], ["b", 2]])),
        ("a.get('b').get('c')", json!(3)),
    ] {
        assert_eq!(eval(src, &c), expected, "{src}");
    }
}

#[test]
fn format() {
    let c = ctx();
    for (src, expected) in [
        ("'{} + {} = {}'.format(1, 2, 3)", "1 + 2 = 3"),
        ("'{0}{1}{0}'.format('a', 'b')", "aba"),
        ("'{name}!'.format(name='x')", "x!"),
        ("'{}'.format(None)", "None"),
        ("'{}'.format([1, 'a'])", "[1, 'a']"),
        ("'{}'.format(2.5)", "2.5"),
        ("'{:>5}'.format('ab')", "   ab"),
        ("'{:<5}|'.format('ab')", "ab   |"),
        ("'{:^6}'.format('ab')", "  ab  "),
        ("'{:*^7}'.format('x')", "***x***"),
        ("'{:5}|'.format('ab')", "ab   |"),
        ("'{:5}|'.format(42)", "   42|"),
        ("'{:05d}'.format(42)", "00042"),
        ("'{:05d}'.format(-42)", "-0042"),
        ("'{:+d}'.format(5)", "+5"),
        ("'{: d}'.format(5)", " 5"),
        (
            "'{:x}/{:X}/{:o}/{:b}'.format(255, 255, 8, 5)",
            "ff/FF/10/101",
        ),
        ("'{:.2f}'.format(3.14159)", "3.14"),
        ("'{:f}'.format(1)", "1.000000"),
        ("'{:8.3f}|'.format(-2.5)", "  -2.500|"),
        ("'{:.1%}'.format(0.25)", "25.0%"),
        ("'{:e}'.format(1234.5)", "1.234500e+03"),
        ("'{:.2E}'.format(0.000123)", "1.23E-04"),
        ("'{:.3}'.format('abcdef')", "abc"),
        ("'{!r}'.format('a')", "'a'"),
        ("'{!s:>3}'.format(1)", "  1"),
        ("'{{}}'.format()", "{}"),
        ("'{{{}}}'.format(1)", "{1}"),
    ] {
        assert_eq!(eval(src, &c), json!(expected), "{src}");
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: each names the problem, the column and what was expected.
// ---------------------------------------------------------------------------------------------

#[test]
fn syntax_errors() {
    let c = ctx();
    for (src, expected) in [
        (
            "len(x",
            "unexpected end of expression at column 6: expected ',' or ')' to close '(' at column 4",
        ),
        (
            "(1 + )",
            "unexpected ')' at column 6: expected an expression",
        ),
        (
            "1 +",
            "unexpected end of expression at column 4: expected an expression",
        ),
        (
            "",
            "unexpected end of expression at column 1: expected an expression",
        ),
        (
            "a b",
            "unexpected name 'b' at column 3: expected an operator or the end of the expression",
        ),
        (
            "[1, 2",
            "unexpected end of expression at column 6: expected ',' or ']' to close the bracket at column 1",
        ),
        (
            "[1 2]",
            "unexpected number 2 at column 4: expected ',' or ']' to close '[' at column 1",
        ),
        (
            "xs[1",
            "unexpected end of expression at column 5: expected ']' to close '[' at column 3",
        ),
        (
            "{'a' 1}",
            "unexpected number 1 at column 6: expected ':' after a dict key",
        ),
        (
            "{'a': 1",
            "unexpected end of expression at column 8: expected ',' or '}' to close '{' at column 1",
        ),
        (
            "1 if 2",
            "unexpected end of expression at column 7: expected 'else' to complete the conditional expression at column 3",
        ),
        (
            "a.",
            "unexpected end of expression at column 3: expected an attribute name after '.'",
        ),
        (
            "a.in",
            "unexpected keyword 'in' at column 3: expected an attribute name after '.'",
        ),
        (
            "[x for in xs]",
            "unexpected keyword 'in' at column 8: expected a variable name in a 'for' clause",
        ),
        (
            "[x for x xs]",
            "unexpected name 'xs' at column 10: expected 'in' after the names of a 'for' clause",
        ),
        (
            "f(x for x in xs, 1)",
            "unexpected ',' at column 16: expected ')' to close '(' at column 2: a generator expression must be the only argument",
        ),
        ("'abc", "unterminated string at column 1"),
        ("'ab\nc'", "unterminated string at column 1"),
        (
            "'\\x4'",
            "truncated escape: expected 2 hex digits at column 2",
        ),
        (
            "'\\N{DASH}'",
            "\\N{...} escapes are not supported at column 2",
        ),
        ("1 & 2", "bitwise operators are not supported at column 3"),
        ("1 << 2", "bitwise operators are not supported at column 3"),
        ("~1", "bitwise operators are not supported at column 1"),
        ("a $ b", "unexpected character '$' at column 3"),
        ("a ! b", "unexpected character '!' at column 3"),
        ("`$.a`", "unexpected character '`' at column 1"),
        (
            "lambda x: x",
            "lambda expressions are not supported at column 1",
        ),
        ("{1, 2}", "sets are not supported at column 1"),
        ("f'x'", "f-strings are not supported at column 1"),
        ("b'x'", "bytes literals are not supported at column 1"),
        (
            "xs[0](1)",
            "only functions and methods can be called at column 6",
        ),
        (
            "len(1)(2)",
            "only functions and methods can be called at column 7",
        ),
        (
            "f(a=1, 2)",
            "positional argument follows keyword argument at column 8",
        ),
        ("f(a=1, a=2)", "keyword argument 'a' repeated at column 8"),
        ("1abc", "invalid number literal at column 1"),
        ("1j", "invalid number literal at column 1"),
        (
            "012",
            "leading zeros in decimal integer literals are not permitted at column 1",
        ),
        ("1__0", "invalid underscore in number literal at column 1"),
        ("1_", "invalid underscore in number literal at column 1"),
        ("0x", "invalid integer literal at column 1"),
        (
            "99999999999999999999",
            "integer literal is too large for 64 bits at column 1",
        ),
        ("1e999", "float literal is out of range at column 1"),
        (
            "1 + 2 3",
            "unexpected number 3 at column 7: expected an operator or the end of the expression",
        ),
        (
            "not",
            "unexpected end of expression at column 4: expected an expression",
        ),
        (
            "a == not b",
            "unexpected keyword 'not' at column 6: expected an expression",
        ),
        (
            "x = 1",
            "unexpected '=' at column 3: expected an operator or the end of the expression",
        ),
        ("*xs", "unexpected '*' at column 1: expected an expression"),
        (
            "'é' é",
            "unexpected name 'é' at column 5: expected an operator or the end of the expression",
        ),
    ] {
        assert_eq!(message(src, &c), expected, "{src}");
        // A syntax error is found by parsing alone.
        assert!(expr::parse(src).is_err(), "{src}");
    }
}

#[test]
fn evaluation_errors() {
    let c = ctx();
    for (src, expected) in [
        (
            "nope",
            "unknown name 'nope' at column 1: the context has no such key",
        ),
        (
            "[x for x in [1]] + [x]",
            "unknown name 'x' at column 21: the context has no such key",
        ),
        ("a.b.x", "no key 'x' at column 4 (the object has 'c')"),
        ("empty.x", "no key 'x' at column 6: the object is empty"),
        ("d['z']", "no key 'z' at column 2 (the object has 'a', 'b')"),
        ("d[1]", "no key '1' at column 2 (the object has 'a', 'b')"),
        (
            "d.keys",
            "the dict has no key 'keys'; to call the method, write x.keys() at column 2",
        ),
        (
            "xs[10]",
            "index 10 is out of range for a list of length 4 at column 3",
        ),
        (
            "xs[-5]",
            "index -5 is out of range for a list of length 4 at column 3",
        ),
        (
            "s[5]",
            "index 5 is out of range for a str of length 5 at column 2",
        ),
        (
            "xs['a']",
            "a list index must be an integer, not 'str' at column 3",
        ),
        (
            "xs[1.0]",
            "a list index must be an integer, not 'float' at column 3",
        ),
        (
            "xs[1.5:]",
            "a slice index must be an integer, not 'float' at column 4",
        ),
        ("xs[::0]", "slice step cannot be zero at column 3"),
        ("d[:1]", "'dict' object cannot be sliced at column 2"),
        ("n[0]", "'NoneType' object is not subscriptable at column 2"),
        ("n.x", "'NoneType' object has no attribute 'x' at column 2"),
        ("s.x", "'str' object has no attribute 'x' at column 2"),
        (
            "s.upper",
            "'str' method 'upper' must be called, as in x.upper(...) at column 2",
        ),
        (
            "s.nope()",
            "'str' object has no method 'nope' (its methods are endswith, find, format, join, lower, lstrip, partition, replace, rpartition, rsplit, rstrip, split, startswith, strip, upper) at column 2",
        ),
        (
            "xs.append(1)",
            "'list' object has no method 'append' (its methods are count, index) at column 3",
        ),
        ("t.x()", "'bool' object has no method 'x' at column 2"),
        (
            "len",
            "'len' is a function: call it, as in len(...) at column 1",
        ),
        (
            "foo(1)",
            "unknown function 'foo' at column 1 (the functions are abs, bool, float, getattr, int, is_present, len, max, min, pathsplit, range, sorted, str, sum)",
        ),
        (
            "'a' + 1",
            "unsupported operand types for +: 'str' and 'int' at column 5",
        ),
        (
            "1 - 'a'",
            "unsupported operand types for -: 'int' and 'str' at column 3",
        ),
        (
            "[1] * [2]",
            "unsupported operand types for *: 'list' and 'list' at column 5",
        ),
        (
            "'a' * 1.5",
            "can't multiply sequence by non-int of type 'float' at column 5",
        ),
        (
            "d + d",
            "unsupported operand types for +: 'dict' and 'dict' at column 3",
        ),
        ("-'a'", "bad operand type for unary -: 'str' at column 1"),
        ("+n", "bad operand type for unary +: 'NoneType' at column 1"),
        ("1 / 0", "division by zero at column 3"),
        ("1 // 0", "division by zero at column 3"),
        ("1 % 0", "division by zero at column 3"),
        ("1.0 / 0.0", "division by zero at column 5"),
        ("0 ** -1", "division by zero at column 3"),
        (
            "(-8) ** 0.5",
            "a negative number cannot be raised to a fractional power at column 6",
        ),
        (
            "9223372036854775807 + 1",
            "numeric overflow at column 21: integers are limited to 64 bits",
        ),
        (
            "-9223372036854775807 - 2",
            "numeric overflow at column 22: integers are limited to 64 bits",
        ),
        (
            "(-9223372036854775807 - 1) // -1",
            "numeric overflow at column 28: integers are limited to 64 bits",
        ),
        (
            "-(-9223372036854775807 - 1)",
            "numeric overflow at column 1: integers are limited to 64 bits",
        ),
        (
            "2 ** 64",
            "numeric overflow at column 3: integers are limited to 64 bits",
        ),
        (
            "10.0 ** 400",
            "numeric overflow at column 6: the result is not a finite floating-point number",
        ),
        (
            "1e308 * 10",
            "numeric overflow at column 7: the result is not a finite floating-point number",
        ),
        (
            "'a' < 1",
            "'<' not supported between instances of 'str' and 'int' at column 5",
        ),
        (
            "[1] < ['a']",
            "'<' not supported between instances of 'int' and 'str' at column 5",
        ),
        (
            "d >= d",
            "'>=' not supported between instances of 'dict' and 'dict' at column 3",
        ),
        (
            "None < 1",
            "'<' not supported between instances of 'NoneType' and 'int' at column 6",
        ),
        (
            "1 in 'abc'",
            "'in <string>' requires string as left operand, not int at column 3",
        ),
        (
            "1 in 5",
            "argument of type 'int' is not iterable at column 3",
        ),
        ("[1] in d", "unhashable type: 'list' at column 5"),
        (
            "{1: 2}",
            "dict keys must be strings (JSON has no other keys), not 'int' at column 2",
        ),
        (
            "[x for x in 5]",
            "'int' object is not iterable at column 13",
        ),
        (
            "[a for a, b in [[1]]]",
            "cannot unpack 1 values into 2 names at column 16",
        ),
        (
            "[a for a, b in [1]]",
            "cannot unpack non-iterable 'int' object at column 16",
        ),
        ("len(1)", "object of type 'int' has no len() at column 1"),
        ("len()", "len() missing required argument 'obj' at column 1"),
        (
            "len(1, 2)",
            "len() takes at most 1 argument (2 given) at column 1",
        ),
        (
            "len(x=1)",
            "len() got an unexpected keyword argument 'x' at column 1",
        ),
        (
            "len('a', obj='b')",
            "len() got multiple values for argument 'obj' at column 1",
        ),
        (
            "sorted([1], key=1)",
            "sorted() got an unexpected keyword argument 'key' at column 1",
        ),
        (
            "sorted([1, 'a'])",
            "'<' not supported between instances of 'str' and 'int' at column 1",
        ),
        ("sorted(1)", "'int' object is not iterable at column 1"),
        ("max([])", "max() arg is an empty sequence at column 1"),
        (
            "min()",
            "min() expected at least 1 argument, got 0 at column 1",
        ),
        (
            "max(1, 2, default=0)",
            "cannot specify a default for max() with multiple positional arguments at column 1",
        ),
        (
            "sum(['a'])",
            "unsupported operand types for +: 'int' and 'str' at column 1",
        ),
        (
            "sum([], '')",
            "sum() can't sum strings (use ''.join(seq) instead) at column 1",
        ),
        (
            "range()",
            "range() takes 1 to 3 arguments (0 given) at column 1",
        ),
        (
            "range(1, 2, 0)",
            "range() arg 3 must not be zero at column 1",
        ),
        (
            "range(1.5)",
            "range() argument must be an integer, not 'float' at column 1",
        ),
        (
            "range(stop=1)",
            "range() got an unexpected keyword argument 'stop' at column 1",
        ),
        (
            "int('x')",
            "invalid literal for int() with base 10: 'x' at column 1",
        ),
        (
            "int('1.5')",
            "invalid literal for int() with base 10: '1.5' at column 1",
        ),
        (
            "int('')",
            "invalid literal for int() with base 10: '' at column 1",
        ),
        (
            "int('_1')",
            "invalid literal for int() with base 10: '_1' at column 1",
        ),
        (
            "int('12', 1)",
            "int() base must be from 2 to 36 at column 1",
        ),
        (
            "int(1, 10)",
            "int() can't convert non-string with explicit base at column 1",
        ),
        (
            "int([])",
            "int() argument must be a string or a number, not 'list' at column 1",
        ),
        (
            "int('9223372036854775808')",
            "numeric overflow at column 1: integers are limited to 64 bits",
        ),
        (
            "int(1e19)",
            "numeric overflow at column 1: integers are limited to 64 bits",
        ),
        (
            "float('x')",
            "could not convert string to float: 'x' at column 1",
        ),
        (
            "float('inf')",
            "numeric overflow at column 1: the result is not a finite floating-point number",
        ),
        (
            "float(None)",
            "float() argument must be a string or a number, not 'NoneType' at column 1",
        ),
        ("abs('a')", "bad operand type for abs(): 'str' at column 1"),
        (
            "pathsplit(1)",
            "pathsplit() argument must be str, not 'int' at column 1",
        ),
        (
            "is_present(1)",
            "is_present() takes the name of a value as a string, not 'int' at column 1",
        ),
        (
            "is_present('a..b')",
            "is_present(): invalid path 'a..b': expected names separated by '.', each optionally followed by [index] at column 1",
        ),
        (
            "getattr('xs[x]')",
            "getattr(): invalid path 'xs[x]': expected names separated by '.', each optionally followed by [index] at column 1",
        ),
        ("''.split('')", "empty separator at column 3"),
        ("'a'.partition('')", "empty separator at column 4"),
        (
            "'a'.startswith(1)",
            "startswith first arg must be str or a list of str, not 'int' at column 4",
        ),
        (
            "'a'.strip(1)",
            "strip arg must be None or str, not 'int' at column 4",
        ),
        (
            "','.join([1])",
            "sequence item 0: expected str instance, int found at column 4",
        ),
        (
            "'a'.replace('a')",
            "replace() missing required argument 'new' at column 4",
        ),
        (
            "'a'.lower(1)",
            "lower() takes at most 0 arguments (1 given) at column 4",
        ),
        ("[1].index(2)", "2 is not in list at column 4"),
        (
            "'{}{}'.format(1)",
            "replacement index 1 out of range for 1 positional arguments at column 7",
        ),
        (
            "'{0}{}'.format(1, 2)",
            "cannot switch from manual field numbering to automatic field numbering at column 8",
        ),
        (
            "'{x}'.format()",
            "format() has no keyword argument 'x' at column 6",
        ),
        (
            "'{a.b}'.format(a=1)",
            "format field 'a.b' is not supported: use a position or a keyword argument name at column 8",
        ),
        (
            "'{'.format()",
            "expected '}' before end of string at column 4",
        ),
        (
            "'}'.format()",
            "single '}' encountered in format string at column 4",
        ),
        (
            "'{:d}'.format('a')",
            "unknown format code 'd' for object of type 'str' at column 7",
        ),
        (
            "'{:d}'.format(1.5)",
            "unknown format code 'd' for object of type 'float' at column 7",
        ),
        (
            "'{:.2d}'.format(1)",
            "precision not allowed in integer format specifier at column 9",
        ),
        (
            "'{:,}'.format(1000)",
            "digit grouping in format specifiers is not supported at column 7",
        ),
        (
            "'{:5}'.format([])",
            "unsupported format string passed to list.__format__ at column 7",
        ),
        (
            "'{!x}'.format(1)",
            "unknown conversion specifier 'x' at column 7",
        ),
    ] {
        assert_eq!(message(src, &c), expected, "{src}");
        // These are all found only when evaluating.
        assert!(expr::parse(src).is_ok(), "{src}");
    }
}

#[test]
fn errors_are_structured() {
    let c = ctx();
    assert_eq!(
        fails("(1 + )", &c),
        Error::Unexpected {
            found: "')'".to_owned(),
            expected: "an expression".to_owned(),
            column: 6,
        }
    );
    assert_eq!(
        fails("1 + nope", &c),
        Error::UnknownName {
            name: "nope".to_owned(),
            column: 5,
        }
    );
    assert!(matches!(
        fails("a.b.x", &c),
        Error::MissingKey { ref key, ref available, column: 4 } if key == "x" && available == &["c"]
    ));
    assert_eq!(fails("1 // 0", &c).column(), Some(3));
    assert_eq!(fails("xs[9]", &c).column(), Some(3));
    let too_long = "1".repeat(MAX_SOURCE_LEN + 1);
    assert_eq!(
        fails(&too_long, &c),
        Error::TooLong {
            len: MAX_SOURCE_LEN + 1,
            limit: MAX_SOURCE_LEN
        }
    );
    assert_eq!(fails(&too_long, &c).column(), None);
    // Columns count characters, not bytes.
    assert_eq!(fails("'éé' + 1", &c).column(), Some(6));
}

#[test]
fn context_that_is_not_an_object_has_no_names() {
    assert_eq!(eval("1 + 1", &json!([1])), json!(2));
    assert!(matches!(fails("x", &json!("x")), Error::UnknownName { .. }));
    assert_eq!(eval("is_present('x')", &json!(null)), json!(false));
}

#[test]
fn parsed_expressions_evaluate_again() {
    let parsed: expr::Expr = "state_manager.counter + 1".parse().unwrap();
    for n in 0..3 {
        let state = json!({"state_manager": {"counter": n}});
        assert_eq!(parsed.eval(&state).unwrap(), json!(n + 1));
    }
}

// ---------------------------------------------------------------------------------------------
// Bounds: expressions come from untrusted flow definitions.
// ---------------------------------------------------------------------------------------------

#[test]
fn huge_values_are_refused_before_they_are_built() {
    let c = ctx();
    for src in [
        "'a' * 10**12",
        "10**12 * 'a'",
        "[0] * 10**12",
        "[xs] * 10**9",
        "range(10**12)",
        "range(-10**18, 10**18)",
        "'{:1000000000}'.format(1)",
        "'{:.1000000000f}'.format(1)",
        "'ab' * 2**62",
    ] {
        let error = fails(src, &c);
        assert!(
            matches!(error, Error::Limit { .. }),
            "{src}: {error} is not a limit error"
        );
    }
    assert_eq!(
        message("'a' * 10**12", &c),
        "building a string of 1000000000000 bytes exceeds the 16777216 bytes one expression \
         may build at column 5"
    );
    assert_eq!(
        message("range(10**12)", &c),
        "building a range of 32000000000000 bytes exceeds the 16777216 bytes one expression \
         may build at column 1"
    );
}

#[test]
fn repeating_nothing_is_quick() {
    let c = ctx();
    assert_eq!(eval("[] * 10**18", &c), json!([]));
    assert_eq!(eval("'' * 10**18", &c), json!(""));
    assert_eq!(eval("10**18 * []", &c), json!([]));
}

#[test]
fn values_nested_too_deep_are_refused_not_recursed_into() {
    // Deeper than serde_json parses, but a context built in code can be anything.
    let mut deep = json!(1);
    for _ in 0..300 {
        deep = json!([deep]);
    }
    let state = json!({"deep": deep});
    assert_eq!(eval("len(deep)", &state), json!(1));
    for src in [
        "deep == deep",
        "deep < deep",
        "str(deep)",
        "[deep]",
        "deep in [deep]",
    ] {
        let error = fails(src, &state);
        assert!(
            error
                .to_string()
                .starts_with("a value nested deeper than 256 levels"),
            "{src}: {error}"
        );
    }
}

#[test]
fn growth_by_doubling_hits_the_budget() {
    // Each step stays small, the total does not.
    let src = "[s * 100000 for s in ['x'] * 1000]";
    assert!(matches!(fails(src, &ctx()), Error::Limit { .. }));
    let src = "[[xs] * 50000 for x in range(100)]";
    assert!(matches!(fails(src, &ctx()), Error::Limit { .. }));
}

#[test]
fn long_loops_hit_the_step_limit() {
    // Loops over a context list allocate nothing: only the step limit stops them.
    let state = json!({"l": vec![0; 3000]});
    let src = "[1 for x in l for y in l for z in l if False]";
    let error = fails(src, &state);
    assert!(matches!(error, Error::Limit { .. }));
    assert!(
        error
            .to_string()
            .starts_with("evaluation takes more than the 10000000 steps one expression may take"),
        "{error}"
    );
}

#[test]
fn copies_of_big_context_values_are_charged() {
    let big: Vec<String> = (0..20_000).map(|i| format!("{i:0>100}")).collect();
    let state = json!({"big": big});
    // Reading it is free; copying it a hundred times is not.
    assert_eq!(eval("len(big)", &state), json!(20_000));
    assert_eq!(eval("big[-1][-3:]", &state), json!("999"));
    assert!(matches!(
        fails("[big for i in range(100)]", &state),
        Error::Limit { .. }
    ));
    assert!(matches!(
        fails("[big == big for i in range(100000)]", &state),
        Error::Limit { .. }
    ));
}

fn nested(open: &str, inner: &str, close: &str, n: usize) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

#[test]
fn nesting_is_bounded() {
    let c = ctx();
    // The whole expression is one level; each bracket adds one.
    let ok = MAX_DEPTH - 1;
    assert_eq!(eval(&nested("(", "1", ")", ok), &c), json!(1));
    assert_eq!(
        fails(&nested("(", "1", ")", ok + 1), &c),
        Error::TooDeep {
            limit: MAX_DEPTH,
            column: MAX_DEPTH + 1
        }
    );
    // (prefix, innermost, suffix, levels each repetition nests)
    for (open, inner, close, levels) in [
        ("[", "1", "]", 1),
        ("{'k': ", "1", "}", 1),
        ("str(", "'a'", ")", 1),
        ("len([", "1", "])", 2),
        ("[0, 1][", "0", "]", 1),
        ("not ", "1", "", 1),
        ("-", "1", "", 1),
        ("1 ** ", "1", "", 1),
        ("1 if True else ", "1", "", 1),
        ("[x for x in ", "[1]", "]", 2),
    ] {
        let deepest = nested(open, inner, close, ok / levels);
        if let Err(e) = expr::evaluate(&deepest, &c) {
            panic!("{}: {e}", short(&deepest));
        }
        let error = fails(&nested(open, inner, close, MAX_DEPTH + 5), &c);
        assert!(
            matches!(error, Error::TooDeep { .. }),
            "{open}: {error} is not a depth error"
        );
    }
    // Comprehension clauses count too: each one nests the rest of the evaluation.
    let clauses = " for x in [1]".repeat(MAX_DEPTH + 1);
    assert!(matches!(
        fails(&format!("[1{clauses}]"), &c),
        Error::TooDeep { .. }
    ));
    // Hostile input far past the limit fails fast, without overflowing the stack.
    for hostile in [
        nested("(", "1", ")", 30_000),
        nested("[", "", "]", 30_000),
        "not ".repeat(16_000),
        "-".repeat(60_000),
        "1 if 1 else ".repeat(5_000),
    ] {
        assert!(hostile.len() <= MAX_SOURCE_LEN);
        assert!(matches!(fails(&hostile, &c), Error::TooDeep { .. }));
    }
}

#[test]
fn the_deepest_accepted_expressions_evaluate_on_a_small_stack() {
    // Mixes every kind of node at every level, at the depth limit, and runs it on a thread
    // with a 512 KiB stack, a quarter of what test threads get.
    let level = "(1 if not 0 and 1 < 2 + 3 * -xs[0] ** 1 else {'k': [x for x in [";
    let close = "]]})";
    let depth = (MAX_DEPTH - 1) / 5;
    let src = format!("{}1{}", level.repeat(depth), close.repeat(depth));
    assert!(
        expr::parse(&src).is_ok(),
        "the expression should be within the limit"
    );
    let c = ctx();
    let handle = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            let clauses = " for x in [1]".repeat(MAX_DEPTH - 2);
            let comprehension = format!("[x{clauses}]");
            // A comprehension's element is evaluated inside all its clauses.
            let element = nested("[", "x", "]", MAX_DEPTH - 3);
            let deep_element = format!("[{element}{clauses}]");
            (
                expr::evaluate(&src, &c).map(|_| ()),
                expr::evaluate(&comprehension, &c),
                expr::evaluate(&nested("[", "1", "]", MAX_DEPTH - 1), &c).map(|_| ()),
                expr::evaluate(&deep_element, &c).map(|_| ()),
            )
        })
        .unwrap();
    let (mixed, comprehension, lists, deep_element) = handle.join().unwrap();
    mixed.unwrap();
    assert_eq!(comprehension.unwrap(), json!([1]));
    lists.unwrap();
    deep_element.unwrap();
}

#[test]
fn long_flat_chains_are_fine() {
    let c = ctx();
    let sum = vec!["1"; 15_000].join(" + ");
    assert_eq!(eval(&sum, &c), json!(15_000));
    let mut deep = json!(1);
    for _ in 0..200 {
        deep = json!({"a": deep});
    }
    let attrs = format!("a{}", ".a".repeat(199));
    assert_eq!(eval(&attrs, &deep), json!(1));
    let items = format!("[{}]", vec!["xs"; 10_000].join(", "));
    assert_eq!(eval(&format!("len({items})"), &c), json!(10_000));
    let chained = vec!["1"; 5_000].join(" < ");
    assert_eq!(eval(&chained, &c), json!(false));
    let ors = vec!["0"; 5_000].join(" or ");
    assert_eq!(eval(&ors, &c), json!(0));
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// Tokens of the grammar, names of the test context, and some of everything else.
const TOKENS: &[&str] = &[
    "a",
    "b",
    "c",
    "xs",
    "s",
    "u",
    "d",
    "n",
    "t",
    "f",
    "big",
    "empty",
    "x",
    "y",
    "_context",
    "run_id",
    "len",
    "range",
    "sorted",
    "str",
    "int",
    "float",
    "bool",
    "abs",
    "min",
    "max",
    "sum",
    "pathsplit",
    "getattr",
    "is_present",
    "split",
    "rsplit",
    "join",
    "format",
    "rstrip",
    "strip",
    "partition",
    "rpartition",
    "find",
    "replace",
    "startswith",
    "items",
    "keys",
    "values",
    "get",
    "index",
    "count",
    "upper",
    "0",
    "1",
    "-1",
    "2",
    "3",
    "10**6",
    "10**12",
    "2**63",
    "1.5",
    "1e308",
    "0.0",
    "'a'",
    "'/'",
    "'{}'",
    "'{:>9}'",
    "\"b\"",
    "''",
    "'/~/x/'",
    "True",
    "False",
    "None",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    ".",
    "+",
    "-",
    "*",
    "/",
    "//",
    "%",
    "**",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "and",
    "or",
    "not",
    "in",
    "is",
    "if",
    "else",
    "for",
    "lambda",
    "=",
    "'",
    "\\",
    "é",
    "$",
    "#",
];

/// Evaluates `src`; whatever happens, it must be a value or a well-formed error.
fn never_panics(src: &str) -> Result<(), TestCaseError> {
    let c = ctx();
    if let Err(error) = expr::evaluate(src, &c) {
        let text = error.to_string();
        prop_assert!(!text.is_empty());
        if let Some(column) = error.column() {
            prop_assert!(
                column >= 1 && column <= src.chars().count() + 1,
                "{src:?}: column {column} of {text}"
            );
        }
    }
    Ok(())
}

/// Random expressions of the supported grammar, over the names of [`ctx`] and `x`.
fn expression() -> impl Strategy<Value = String> {
    const NAMES: &[&str] = &[
        "a", "a.b", "xs", "s", "u", "d", "n", "t", "f", "big", "empty", "_context", "x",
    ];
    const BINARY: &[&str] = &[
        "+", "-", "*", "/", "//", "%", "**", "==", "!=", "<", "<=", ">", ">=", "in", "not in",
        "is", "is not", "and", "or",
    ];
    const FUNCTIONS: &[&str] = &[
        "len",
        "str",
        "int",
        "float",
        "bool",
        "abs",
        "min",
        "max",
        "sum",
        "sorted",
        "range",
        "pathsplit",
        "is_present",
        "getattr",
    ];
    const METHODS: &[&str] = &[
        "split",
        "rsplit",
        "strip",
        "rstrip",
        "lstrip",
        "startswith",
        "endswith",
        "partition",
        "rpartition",
        "lower",
        "upper",
        "replace",
        "join",
        "find",
        "format",
        "index",
        "count",
        "get",
        "keys",
        "values",
        "items",
    ];
    let leaf = prop_oneof![
        prop::sample::select(NAMES).prop_map(String::from),
        any::<i16>().prop_map(|i| i.to_string()),
        (-1e6f64..1e6).prop_map(|x| format!("{x:?}")),
        "[a-z/~.{} ]{0,6}".prop_map(|s| format!("'{s}'")),
        prop::sample::select(&["True", "False", "None", "[]", "{}"][..]).prop_map(String::from),
    ];
    leaf.prop_recursive(4, 48, 3, |inner| {
        let opt = || prop::option::of(inner.clone()).prop_map(Option::unwrap_or_default);
        prop_oneof![
            (inner.clone(), prop::sample::select(BINARY), inner.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (prop::sample::select(&["-", "+", "not "][..]), inner.clone())
                .prop_map(|(op, a)| format!("({op}{a})")),
            (
                prop::sample::select(FUNCTIONS),
                prop::collection::vec(inner.clone(), 0..3)
            )
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (
                inner.clone(),
                prop::sample::select(METHODS),
                prop::collection::vec(inner.clone(), 0..3)
            )
                .prop_map(|(r, m, args)| format!("({r}).{m}({})", args.join(", "))),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("({a})[{i}]")),
            (inner.clone(), opt(), opt(), opt())
                .prop_map(|(a, l, u, st)| format!("({a})[{l}:{u}:{st}]")),
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec((inner.clone(), inner.clone()), 0..3).prop_map(|entries| {
                let entries: Vec<String> =
                    entries.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", entries.join(", "))
            }),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, c, b)| format!("({a} if {c} else {b})")),
            (
                inner.clone(),
                inner.clone(),
                prop::option::of(inner.clone())
            )
                .prop_map(|(e, it, c)| {
                    let condition = c.map(|c| format!(" if {c}")).unwrap_or_default();
                    format!("[{e} for x in {it}{condition}]")
                }),
            inner.clone().prop_map(|a| format!("({a}).b")),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn generated_expressions_parse_and_evaluate_without_panicking(src in expression()) {
        if let Err(e) = expr::parse(&src) {
            return Err(TestCaseError::fail(format!("{src}: {e}")));
        }
        match expr::evaluate(&src, &ctx()) {
            Ok(_) => {}
            Err(e @ (Error::Syntax { .. } | Error::Unexpected { .. } | Error::TooDeep { .. } | Error::TooLong { .. })) => {
                return Err(TestCaseError::fail(format!("{src}: a syntax error when evaluating: {e}")));
            }
            Err(_) => {}
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(src in any::<String>()) {
        never_panics(&src)?;
    }

    #[test]
    fn strings_of_grammar_characters_never_panic(
        src in "[a-z0-9_ '\"()\\[\\]{}.,:+*/%<>=!~&-]{0,60}"
    ) {
        never_panics(&src)?;
    }

    #[test]
    fn token_soups_never_panic(
        tokens in prop::collection::vec(prop::sample::select(TOKENS), 0..40),
        spaced in any::<bool>(),
    ) {
        never_panics(&tokens.join(if spaced { " " } else { "" }))?;
    }

    #[test]
    fn floor_division_and_modulo_agree(a in any::<i64>(), b in any::<i64>()) {
        prop_assume!(b != 0 && !(a == i64::MIN && b == -1));
        let c = json!({"a": a, "b": b});
        let q = eval("a // b", &c).as_i64().unwrap();
        let r = eval("a % b", &c).as_i64().unwrap();
        prop_assert_eq!(i128::from(q) * i128::from(b) + i128::from(r), i128::from(a));
        // The remainder has the divisor's sign, and is smaller than it.
        prop_assert!(r == 0 || (r < 0) == (b < 0));
        prop_assert!(i128::from(r).abs() < i128::from(b).abs());
    }

    #[test]
    fn slices_select_what_python_does(
        items in prop::collection::vec(0i64..100, 0..12),
        lower in prop::option::of(-15i64..15),
        upper in prop::option::of(-15i64..15),
        step in prop::option::of(prop_oneof![-4i64..0, 1i64..5]),
    ) {
        let show = |b: Option<i64>| b.map_or(String::new(), |b| b.to_string());
        let src = format!("xs[{}:{}:{}]", show(lower), show(upper), show(step));
        let got = eval(&src, &json!({"xs": items}));
        // Python's definition, directly: walk from the adjusted start by step while inside.
        let len = items.len() as i64;
        let step = step.unwrap_or(1);
        let adjust = |b: i64, low: i64, high: i64| {
            let b = if b < 0 { b + len } else { b };
            b.clamp(low, high)
        };
        let (start, stop) = if step > 0 {
            (lower.map_or(0, |b| adjust(b, 0, len)), upper.map_or(len, |b| adjust(b, 0, len)))
        } else {
            (lower.map_or(len - 1, |b| adjust(b, -1, len - 1)), upper.map_or(-1, |b| adjust(b, -1, len - 1)))
        };
        let mut expected = Vec::new();
        let mut i = start;
        while (step > 0 && i < stop) || (step < 0 && i > stop) {
            expected.push(items[i as usize]);
            i += step;
        }
        prop_assert_eq!(got, json!(expected), "{}", src);
    }

    #[test]
    fn int_and_str_round_trip(i in any::<i64>()) {
        let c = json!({"i": i});
        prop_assert_eq!(eval("int(str(i))", &c), json!(i));
    }

    #[test]
    fn float_repr_reads_back(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
        let c = json!({"x": x});
        let shown = eval("str(x)", &c);
        let back: f64 = shown.as_str().unwrap().parse().unwrap();
        prop_assert_eq!(back, x);
        prop_assert_eq!(eval("float(str(x)) == x", &c), json!(true));
    }
}
