//! The tree's promises about itself, read off the source: the daemon's modules depend on each
//! other in one direction (no cycle, at file granularity), clap stops at the command-line border
//! (`cli.rs`, `config.rs` reading the definition's names, `main.rs`), and `unsafe` blocks are in
//! `sys.rs` alone (the compiler enforces that too: the crate denies `unsafe_code`).
//!
//! A module's dependencies are the `crate::`, `super::` and `self::` paths in its code outside
//! `#[cfg(test)]`, resolved to the longest path that is a module file, plus each submodule it
//! declares: a submodule that reaches up into its parent closes a cycle.

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

/// The code with each `#[cfg(test)]` item taken out: up to its `;` (`mod x;`) or through its
/// braces (`mod tests { .. }`).
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(brace)) if semi < brace => semi + 1,
            (Some(semi), None) => semi + 1,
            (_, Some(brace)) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (i, c) in item[brace..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = brace + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
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
        let code: String = text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
        let code = without_test_items(&code);
        out.insert(name, code);
    }
    // Modules declared only under `#[cfg(test)]` (test fixtures) are not the daemon's.
    let declared = |name: &str| {
        let (parent, me) = name.rsplit_once("::").unwrap_or(("lib", name));
        let parent = out.get(parent).map_or("", String::as_str);
        ["mod ", "pub mod ", "pub(crate) mod "].iter().any(|m| parent.contains(&format!("{m}{me};")))
    };
    let live: Vec<String> =
        out.keys().filter(|n| ["lib", "main"].contains(&n.as_str()) || declared(n)).cloned().collect();
    out.retain(|n, _| live.contains(n));
    out
}

/// Files that only add methods to their parent's type (`impl Relay` split by concern): one node
/// with the parent, since a type's methods cannot live apart from it.
const PARTS_OF_THEIR_PARENT: [&str; 1] = ["relay::operator"];

fn node(module: &str) -> String {
    match PARTS_OF_THEIR_PARENT.contains(&module) {
        true => module.rsplit_once("::").map_or(module, |(parent, _)| parent).to_string(),
        false => module.to_string(),
    }
}

/// Module → the modules it uses. A path is `crate::a::b`, `super::b` or `self::b`, resolved to
/// the longest prefix that is a module file; a parent uses each of its submodules (it declares
/// them), so a submodule reaching up into its parent closes a cycle.
fn dependencies(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, code) in mods {
        let me = node(name);
        let mut to = BTreeSet::new();
        // The module a `super::` path starts from: a mod.rs-less file's parent.
        let parent = name.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        // In the crate root a top-level module is named bare (`relay::Relay`).
        // The binary names the library's modules through the crate's name.
        let bare: Vec<(String, String)> = match name.as_str() {
            "lib" => mods.keys().filter(|m| !m.contains("::")).map(|m| (format!("{m}::"), m.clone())).collect(),
            "main" => vec![("kvmi_relay::".into(), String::new())],
            _ => Vec::new(),
        };
        let prefixes = [
            ("crate::".to_string(), String::new()),
            ("super::".into(), parent.clone()),
            ("self::".into(), name.clone()),
        ];
        for (prefix, base) in prefixes.into_iter().chain(bare) {
            for (at, _) in code.match_indices(prefix.as_str()) {
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let path: String = code[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':' || *c == '{')
                    .collect();
                // `use super::{a, b}` names the base itself.
                let path = path.split('{').next().unwrap();
                let mut parts: Vec<&str> = base.split("::").filter(|p| !p.is_empty()).collect();
                parts.extend(path.split("::").filter(|p| !p.is_empty()));
                for k in (0..=parts.len()).rev() {
                    // An item of the crate root is the library's (`lib.rs`).
                    let cand = if k == 0 { "lib".to_string() } else { parts[..k].join("::") };
                    if mods.contains_key(&cand) {
                        let cand = node(&cand);
                        if cand != me {
                            to.insert(cand);
                        }
                        break;
                    }
                }
            }
        }
        if let Some((p, _)) = name.rsplit_once("::") {
            if node(name) != p && mods.contains_key(p) {
                deps.entry(p.to_string()).or_default().insert(node(name));
            }
        }
        deps.entry(me).or_default().extend(to);
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
    // So does a submodule reaching up into the module that declares it.
    let mut planted = deps.clone();
    planted.get_mut("net::listener").unwrap().insert("net".into());
    assert!(find_cycle(&planted).is_some(), "net declares net::listener: listener -> net must close a cycle");
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

/// The tree in layers, as docs/DESIGN.md prints it: layer 0 uses no other module, and each
/// module sits one layer above the highest one it uses, so every dependency points down the page.
fn layer_map() -> String {
    let deps = dependencies(&modules());
    let mut layer: BTreeMap<String, usize> = BTreeMap::new();
    while layer.len() < deps.len() {
        let before = layer.len();
        for (m, to) in &deps {
            if !layer.contains_key(m) && to.iter().all(|t| layer.contains_key(t)) {
                let l = to.iter().map(|t| layer[t] + 1).max().unwrap_or(0);
                layer.insert(m.clone(), l);
            }
        }
        assert!(
            layer.len() > before,
            "a cycle: no layer for {:?}",
            deps.keys().filter(|m| !layer.contains_key(*m)).collect::<Vec<_>>()
        );
    }
    let top = layer.values().copied().max().unwrap_or(0);
    // A mod.rs that only declares its submodules is its folder, not a layer of its own.
    let mods = modules();
    let declares_only = |m: &str| {
        mods[m].lines().map(str::trim).all(|l| l.is_empty() || l.starts_with("pub mod ") || l.starts_with("mod "))
    };
    let mut out = String::new();
    for l in (0..=top).rev() {
        let names: Vec<&str> =
            layer.iter().filter(|(m, n)| **n == l && !declares_only(m)).map(|(m, _)| m.as_str()).collect();
        out += &format!("{l:>2}  {}\n", names.join("  "));
    }
    out
}

#[test]
fn the_design_documents_map_is_the_trees() {
    let map = layer_map();
    let design = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/DESIGN.md")).unwrap();
    assert!(
        design.contains(&format!("```text\n{map}```\n")),
        "docs/DESIGN.md's dependency map is stale; the tree's is:\n```text\n{map}```"
    );
}
