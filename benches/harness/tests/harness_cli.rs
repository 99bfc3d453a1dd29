//! The harness as its users run it: what a bad flag gets.

use std::process::Command;

const HARNESS: &str = env!("CARGO_BIN_EXE_kvmi-relay-bench");

#[test]
fn a_bad_value_gets_an_error_naming_its_flag_and_exit_2() {
    for (args, flag) in [
        (&["--rounds", "many"][..], "--rounds"),
        (&["--rounds", "0"][..], "--rounds"),
        (&["--bulk-rounds", "-1"][..], "--bulk-rounds"),
        (&["--load", "9999"][..], "--load"),
        (&["--seed", "x"][..], "--seed"),
        (&["--topology", "ring"][..], "--topology"),
        (&["--workload", "idle"][..], "--workload"),
        (&["--pin", "cpu3"][..], "--pin"),
        (&["--variant", "no-equals-sign"][..], "--variant"),
        (&["--build", "old=/nonexistent/kvmi-relay"][..], "--build"),
    ] {
        let out = Command::new(HARNESS).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(first.starts_with("error: ") && first.contains(flag), "{args:?}: first line {first:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
    }
}
