//! The daemon carries only the daemon: no crate that only the tools or the tests need is in the
//! dependency tree of `kvmi-relay` (what `make install` ships). Checked on the real tree, with
//! `cargo tree -e normal -p kvmi-relay`, so that a dependency that sneaks in through another one
//! is caught too.
//!
//! "Only the tools or the tests need it": a normal dependency of `kvmi-relay-tools` or a
//! dev-dependency of `kvmi-relay` that the daemon does not declare itself, read from
//! `cargo metadata`; and, whatever the manifests say, the crates below, which no daemon needs.

use std::collections::BTreeSet;
use std::process::Command;

/// Crates the daemon must never link, even if someone declares them there: the tools package
/// itself, the man-page generator (and its roff writer), the test peers' random streams, and
/// the tests' scratch directories.
const NEVER_IN_THE_DAEMON: [&str; 5] = ["kvmi-relay-tools", "clap_mangen", "roff", "fastrand", "tempfile"];

fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(&cargo)
        .args(args)
        .args(["--offline", "--manifest-path", manifest])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(out.status.success(), "{cargo} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("cargo writes UTF-8")
}

/// (normal, dev) dependency names of `package`, from `cargo metadata`.
fn declared(metadata: &serde_json::Value, package: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let p = metadata["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == package))
        .unwrap_or_else(|| panic!("no package {package} in the workspace"));
    let (mut normal, mut dev) = (BTreeSet::new(), BTreeSet::new());
    for d in p["dependencies"].as_array().expect("dependencies") {
        let name = d["name"].as_str().expect("a dependency has a name").to_string();
        match d["kind"].as_str() {
            None => normal.insert(name),
            Some("dev") => dev.insert(name),
            Some(_) => false,
        };
    }
    (normal, dev)
}

#[test]
fn the_daemon_links_no_crate_only_the_tools_or_tests_need() {
    let metadata: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--format-version", "1", "--no-deps"])).expect("metadata JSON");
    let (daemon, daemon_dev) = declared(&metadata, "kvmi-relay");
    let (tools, _) = declared(&metadata, "kvmi-relay-tools");
    let mut forbidden: BTreeSet<String> =
        tools.union(&daemon_dev).filter(|c| !daemon.contains(*c) && *c != "kvmi-relay").cloned().collect();
    forbidden.extend(NEVER_IN_THE_DAEMON.map(String::from));

    let tree = cargo(&["tree", "-e", "normal", "-p", "kvmi-relay", "--prefix", "none", "--format", "{p}"]);
    let linked: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(linked.contains("kvmi-relay") && linked.contains("mio"), "cargo tree said something else:\n{tree}");
    let offending: Vec<&str> = linked.iter().copied().filter(|c| forbidden.contains(*c)).collect();
    assert!(
        offending.is_empty(),
        "the daemon's dependency tree (cargo tree -e normal -p kvmi-relay) holds crates only the tools or the \
         tests need: {}; move them to tools/Cargo.toml or [dev-dependencies]",
        offending.join(", ")
    );
}
