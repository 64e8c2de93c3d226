//! The crate's floors: which module may use which (ARCHITECTURE.md,
//! "Architecture invariants"), checked over the source text.
//!
//! Every path a file names (`crate::a::b`, `super::c`, `self::d`, grouped
//! `use crate::{a, b::c}` included; comments and `#[cfg(test)]` modules
//! left out) is resolved to the deepest module file it reaches. Two checks
//! follow:
//!
//! - **Floors.** Each top-level module has a floor ([`FLOORS`]); a module may
//!   use modules on floors strictly below its own, never one beside or
//!   above it.
//! - **No cycles.** The file-level graph has no cycle, leaving out a parent
//!   module naming its own children (a facade re-exporting them).
//!
//! Run it alone with `cargo test --test tests floors -- --nocapture`; it
//! prints the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest floor first. A module may use only modules
/// on lower floors. `lib` and `main` (the crate root) may use anything.
const FLOORS: &[&[&str]] = &[
    &["prompt", "cron"],
    &["model"],
    &["tokenizer", "sampling"],
    &["generate", "safety", "ranking", "training", "serving"],
    &["pool"],
    &["settings", "remote"],
    &["telemetry"],
    &["context", "collect", "personas"],
    &["jobs"],
    &["pipeline"],
    &["daemon"],
    &["cli"],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|floor| floor.contains(&module))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → `["a", "b"]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts == ["lib"] || parts == ["main"] {
        Vec::new()
    } else {
        parts
    }
}

/// The source without comments and without `#[cfg(test)]` modules (whose
/// `super` is the file itself).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod ")) {
            break;
        }
        let line = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads a path tail after `crate::`, `super::` or `self::` at `at`,
/// expanding groups: `a::b`, `{a, b::{c, d}}`. Pushes each full path.
fn read_paths(code: &[char], mut at: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        while at < code.len() && code[at].is_whitespace() {
            at += 1;
        }
        if at < code.len() && code[at] == '{' {
            at += 1;
            loop {
                at = read_paths(code, at, path.clone(), out);
                while at < code.len() && code[at].is_whitespace() {
                    at += 1;
                }
                if at < code.len() && code[at] == ',' {
                    at += 1;
                    continue;
                }
                if at < code.len() && code[at] == '}' {
                    at += 1;
                }
                return at;
            }
        }
        let start = at;
        while at < code.len() && is_ident(code[at]) {
            at += 1;
        }
        if at > start {
            path.push(code[start..at].iter().collect());
        }
        if at + 1 < code.len() && code[at] == ':' && code[at + 1] == ':' {
            at += 2;
            continue;
        }
        if !path.is_empty() {
            out.push(path);
        }
        return at;
    }
}

/// The module paths a file's code names, absolute.
fn named_paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        if at > 0 && (is_ident(chars[at - 1]) || chars[at - 1] == ':') {
            at += 1;
            continue;
        }
        let rest: String = chars[at..chars.len().min(at + 7)].iter().collect();
        let (skip, base) = if rest.starts_with("crate::") {
            (7, Vec::new())
        } else if rest.starts_with("super::") {
            (7, module[..module.len().saturating_sub(1)].to_vec())
        } else if rest.starts_with("self::") {
            (6, module.to_vec())
        } else {
            at += 1;
            continue;
        };
        let mut found = Vec::new();
        at = read_paths(&chars, at + skip, Vec::new(), &mut found);
        for mut tail in found {
            // `super::super::x`
            let mut base = base.clone();
            while tail.first().is_some_and(|s| s == "super") {
                tail.remove(0);
                base.pop();
            }
            base.extend(tail);
            out.push(base);
        }
    }
    out
}

#[test]
fn floors_hold_and_the_graph_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let resolve = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains(p))
    };

    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for path in named_paths(&code, &module) {
            let Some(target) = resolve(&path) else { continue };
            if target == module || target.starts_with(&module) {
                continue; // itself, or its own children
            }
            edges.insert(target.clone());
            let (Some(from), Some(to)) = (module.first(), target.first()) else { continue };
            if from == to {
                continue;
            }
            match (floor_of(from), floor_of(to)) {
                (Some(a), Some(b)) if b < a => {}
                (Some(a), Some(b)) => wrong.push(format!(
                    "{} (floor {a}) uses {} (floor {b}) — a module may use only lower floors",
                    file.strip_prefix(&src).unwrap().display(),
                    path.join("::")
                )),
                _ => wrong.push(format!("{} or {} has no floor in tests/floors.rs", from, to)),
            }
        }
    }

    // Cycles: depth-first search, reporting each back edge's loop.
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                0 => visit(next, graph, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let names: Vec<String> = stack[from..].iter().chain([next]).map(|m| m.join("::")).collect();
                    cycles.push(names.join(" → "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            visit(node, &graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }

    // The top-level graph, for the reader.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &graph {
        let Some(from) = from.first() else { continue };
        for to in tos {
            if to[0] != *from {
                top.entry(from.clone()).or_default().insert(to[0].clone());
            }
        }
    }
    for (floor, names) in FLOORS.iter().enumerate() {
        for name in names.iter() {
            let uses: Vec<&str> = top.get(*name).into_iter().flatten().map(String::as_str).collect();
            println!("floor {floor:>2} {name:<10} uses {}", if uses.is_empty() { "-".into() } else { uses.join(", ") });
        }
    }
    assert!(
        wrong.is_empty() && cycles.is_empty(),
        "imports that break the floors:\n{}\nimport cycles:\n{}",
        wrong.join("\n"),
        cycles.join("\n")
    );
}

#[test]
fn the_path_reader_expands_groups_and_relative_paths() {
    let module = vec!["jobs".to_string(), "runner".to_string()];
    let code = code_of(
        "use crate::{model::{Gpt2, lora}, pool::PoolHandle};\nuse super::store::JobStore;\n// crate::cli::load\nlet x = crate::prompt::build(1);\n#[cfg(test)]\nmod tests {\n use crate::daemon;\n}\n",
    );
    let paths: Vec<String> = named_paths(&code, &module).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["model::Gpt2", "model::lora", "pool::PoolHandle", "jobs::store::JobStore", "prompt::build"]);
}
