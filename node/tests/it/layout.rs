//! The workspace's shape, checked: which crate may depend on which, and no import cycles
//! between files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ sits in the workspace")
        .to_path_buf()
}

/// Each workspace crate's declared dependencies on other workspace crates, from
/// `cargo metadata`.
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("a name").to_owned())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                // Normal dependencies only: a test may use anything.
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|d| names.contains(*d))
                .map(str::to_owned)
                .collect();
            (p["name"].as_str().expect("a name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn mesh_is_the_network_and_nothing_else() {
    let deps = workspace_dependencies();
    let mesh = &deps["mesh"];
    for forbidden in ["compute", "capability", "node", "testnet"] {
        assert!(
            !mesh.contains(forbidden),
            "mesh depends on {forbidden}: it must not know about tasks or tokens ({mesh:?})"
        );
    }
    // The sans-IO crates do no IO and know nothing of the network.
    for pure in ["crdt-registry", "capability"] {
        for forbidden in ["mesh", "store", "compute", "node"] {
            assert!(
                !deps[pure].contains(forbidden),
                "{pure} depends on {forbidden} ({:?})",
                deps[pure]
            );
        }
    }
    assert!(
        !deps["compute"].contains("node"),
        "compute depends on the binary's crate"
    );
}

/// The `.rs` files of one crate's `src/`, by module path (`submit::machine`).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("src is readable") {
            let p = e.expect("an entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).expect("under src");
                let path: Vec<String> = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.insert(path.join("::"), p);
            }
        }
    }
    out
}

/// The module paths a file's code names through `crate::` (comments and a trailing
/// `#[cfg(test)]` module left out), each as written: `a::b::C`.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        // `foo_crate::x` or `$crate::x` are other things.
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        paths_at(rest, &mut Vec::new(), &mut out);
    }
    out
}

/// Reads a path (or a `{...}` group of paths) at the start of `s`, after `prefix`.
fn paths_at(s: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    paths_at(&group[start..i], &mut prefix.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    paths_at(&group[start..i], &mut prefix.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let ident: String = s
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if ident.is_empty() {
        out.push(prefix.clone());
        return;
    }
    prefix.push(ident.clone());
    let after = &s[ident.len()..];
    match after.strip_prefix("::") {
        Some(next) => paths_at(next, prefix, out),
        None => out.push(prefix.clone()),
    }
}

/// One crate's file graph: module → the modules it names (the deepest file each path reaches).
fn file_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut graph = BTreeMap::new();
    for (name, path) in &mods {
        // The table of contents and the binary's entry point name everything.
        if name == "lib" || name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("a source file");
        let mut edges = BTreeSet::new();
        for p in crate_paths(&text) {
            for n in (1..=p.len()).rev() {
                let m = p[..n].join("::");
                if mods.contains_key(&m) {
                    // A submodule naming its own parent's items counts; naming itself does not.
                    if &m != name {
                        edges.insert(m);
                    }
                    break;
                }
            }
        }
        graph.insert(name.clone(), edges);
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).expect("on the stack");
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_file_imports_from_a_file_that_imports_it() {
    let root = workspace_root();
    let mut cycles = Vec::new();
    for krate in workspace_dependencies().keys() {
        let src = root.join(krate).join("src");
        if !src.is_dir() {
            continue;
        }
        if let Some(cycle) = find_cycle(&file_graph(&src)) {
            cycles.push(format!("{krate}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.get_mut("c").expect("c").clear();
    assert_eq!(find_cycle(&graph), None);
    let paths = crate_paths("use crate::{a::X, b::{c::Y, Z}};\nlet q = crate::d::e(1);");
    assert_eq!(
        paths,
        vec![
            vec!["a".to_owned(), "X".to_owned()],
            vec!["b".to_owned(), "c".to_owned(), "Y".to_owned()],
            vec!["b".to_owned(), "Z".to_owned()],
            vec!["d".to_owned(), "e".to_owned()],
        ]
    );
}
