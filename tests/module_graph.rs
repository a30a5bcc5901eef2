//! The top-level modules of `src/` form no cycles: every `crate::module`
//! path outside comments is a dependency edge from the file's top-level
//! module, and the graph must have no strongly connected component larger
//! than one module. A cycle means two modules cannot be understood, tested
//! or changed alone; give the shared piece one home instead (as `meta`,
//! `logging` and `config::network` are).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles tolerated, each with its way out. None today: an entry that no
/// longer matches a cycle fails the test.
const ALLOWED_CYCLES: &[(&[&str], &str)] = &[];

/// Generated code and the crate roots are not modules of their own.
const IGNORED: &[&str] = &["pb", "lib", "main"];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// `src/net/dhcp.rs` → `net`, `src/meta.rs` → `meta`.
fn top_module(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative
        .components()
        .next()
        .expect("non-empty path")
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The modules a line names as `crate::module`, ignoring `//` comments.
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or_default();
    code.match_indices("crate::")
        .filter(|(index, _)| {
            // `nomad_driver_virt::crate::` does not occur; `$crate::` in macros would.
            !code[..*index].ends_with('$')
        })
        .map(|(index, matched)| {
            code[index + matched.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|module| !module.is_empty())
        .collect()
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let from = top_module(&src, &file);
        if IGNORED.contains(&from.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let edges = graph.entry(from.clone()).or_default();
        for line in text.lines() {
            for to in crate_paths(line) {
                if to != from && !IGNORED.contains(&to.as_str()) {
                    edges.insert(to);
                }
            }
        }
    }
    graph
}

/// Tarjan's strongly connected components with more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let next = state.index.len();
        state.index.insert(node, next);
        state.low.insert(node, next);
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        for to in graph.get(node).into_iter().flatten() {
            let to = to.as_str();
            if !state.index.contains_key(to) {
                visit(state, to);
                let low = state.low[node].min(state.low[to]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(to) {
                let low = state.low[node].min(state.index[to]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = BTreeSet::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.insert(member.to_string());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}

#[test]
fn top_level_modules_have_no_cycles() {
    let graph = dependency_graph();
    assert!(
        graph.contains_key("config") && graph.contains_key("driver"),
        "scanned the wrong tree: {graph:?}"
    );
    let allowed: Vec<BTreeSet<String>> = ALLOWED_CYCLES
        .iter()
        .map(|(modules, _)| modules.iter().map(ToString::to_string).collect())
        .collect();
    let found = cycles(&graph);
    let unexpected: Vec<&BTreeSet<String>> = found
        .iter()
        .filter(|cycle| !allowed.contains(cycle))
        .collect();
    assert!(
        unexpected.is_empty(),
        "module cycles: {unexpected:?}\nedges: {graph:#?}"
    );
    for (cycle, (_, reason)) in allowed.iter().zip(ALLOWED_CYCLES) {
        assert!(
            found.contains(cycle),
            "the allowed cycle {cycle:?} is gone ({reason}); remove it from ALLOWED_CYCLES"
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"]),
        ("c", &["a"]),
        ("d", &["a"]),
        ("e", &[]),
    ]
    .into_iter()
    .map(|(from, to)| {
        (
            from.to_string(),
            to.iter().map(ToString::to_string).collect(),
        )
    })
    .collect();
    let expected: BTreeSet<String> = ["a", "b", "c"].into_iter().map(String::from).collect();
    assert_eq!(cycles(&graph), vec![expected]);
    assert_eq!(
        crate_paths("use crate::config::task; // crate::driver"),
        vec!["config".to_string()]
    );
    assert_eq!(
        crate_paths("let x = crate::meta::PLUGIN_NAME + crate::net::y;"),
        vec!["meta".to_string(), "net".to_string()]
    );
}
