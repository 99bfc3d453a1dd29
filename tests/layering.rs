//! The tree's promises about itself, read off the source: the daemon's modules depend on each
//! other in one direction (no cycle, at file granularity), clap stops at the command-line border
//! (`cli.rs`, `config.rs` reading the definition's names, `main.rs`), and `unsafe` blocks are in
//! `sys.rs` alone (the compiler enforces that too: the crate denies `unsafe_code`).
//!
//! A module's dependencies are the `crate::...` paths in its code outside `#[cfg(test)]`,
//! resolved to the longest path that is a module file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module name (`net::listener`) → the file's code without its test module and comments.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let rel = rel.to_string_lossy().replace('/', "::");
        let name = rel.strip_suffix("::mod").unwrap_or(&rel).to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let code: String = code.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
        out.insert(name, code);
    }
    out
}

fn dependencies(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps = BTreeMap::new();
    for (name, code) in mods {
        let mut to = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let path: String =
                code[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            for k in (1..=parts.len()).rev() {
                let cand = parts[..k].join("::");
                if mods.contains_key(&cand) {
                    // A module may use its own submodules and its parents' items.
                    if cand != *name && !name.starts_with(&format!("{cand}::")) {
                        to.insert(cand);
                    }
                    break;
                }
            }
        }
        deps.insert(name.clone(), to);
    }
    deps
}

/// The first cycle found, as the path around it.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        if let Some(c) = visit(m, deps, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_daemons_modules_depend_on_each_other_in_one_direction() {
    let mods = modules();
    assert!(mods.len() > 20, "found the source tree: {:?}", mods.keys());
    let deps = dependencies(&mods);
    // The checker itself finds a cycle where there is one.
    let mut planted = deps.clone();
    planted.get_mut("access").unwrap().insert("config".into());
    assert!(find_cycle(&planted).is_some(), "config uses access; access -> config must close a cycle");
    if let Some(c) = find_cycle(&deps) {
        panic!("module cycle: {}", c.join(" -> "));
    }
}

#[test]
fn clap_stops_at_the_command_line_border() {
    let border = ["cli", "config", "main"];
    let users: Vec<String> = modules()
        .into_iter()
        .filter(|(name, code)| code.contains("clap") && !border.contains(&name.as_str()))
        .map(|(n, _)| n)
        .collect();
    assert!(users.is_empty(), "clap used past the border in {users:?}");
}

#[test]
fn unsafe_blocks_live_in_sys_alone() {
    let users: Vec<String> = modules()
        .into_iter()
        .filter(|(name, code)| {
            name != "sys" && (code.contains("unsafe {") || code.contains("unsafe fn") || code.contains("unsafe impl"))
        })
        .map(|(n, _)| n)
        .collect();
    assert!(users.is_empty(), "unsafe outside sys.rs in {users:?}");
}
