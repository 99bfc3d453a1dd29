//! The tools binary as its callers use it (the daemon's integration tests, the test guests, the
//! benches, `make demo` and `make man`): every subcommand they run exists, and `man` writes a
//! page. Testing the binary here also makes `cargo test` build it, beside the daemon, where the
//! daemon's integration tests look for it.

use std::process::Command;

const TOOLS: &str = env!("CARGO_BIN_EXE_kvmi-relay-tools");

#[test]
fn every_subcommand_its_callers_run_answers_help() {
    let subcommands: [&[&str]; 9] = [
        &["fake-hypervisor"],
        &["fake-introspector"],
        &["peer", "bulk"],
        &["peer", "echo"],
        &["peer", "pingpong"],
        &["peer", "expect-refused"],
        &["peer", "reset"],
        &["demo"],
        &["man"],
    ];
    for words in subcommands {
        let out = Command::new(TOOLS).args(words).arg("--help").output().expect("run kvmi-relay-tools");
        assert!(
            out.status.success(),
            "kvmi-relay-tools {} --help: {}",
            words.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(TOOLS).arg("no-such-tool").output().expect("run kvmi-relay-tools");
    assert_eq!(out.status.code(), Some(2), "an unknown subcommand is a usage error");
}

#[test]
fn man_writes_the_relays_page() {
    let out = Command::new(TOOLS).arg("man").output().expect("run kvmi-relay-tools man");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains("\n.TH kvmi-relay 1 ") && page.contains("\\-\\-listen"), "{page}");
}
