//! The harness as its users run it: what a bad flag gets, and what a killed harness leaves.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HARNESS: &str = env!("CARGO_BIN_EXE_kvmi-relay-bench");

/// The relay the Makefile built (`BENCH_RELAY_BIN`, else target/dist/kvmi-relay).
fn relay_bin() -> PathBuf {
    let bin = std::env::var_os("BENCH_RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/dist/kvmi-relay"));
    assert!(bin.is_file(), "{} not found: run `make build` first (or set BENCH_RELAY_BIN)", bin.display());
    bin
}

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
        (&["--fleet", "0"][..], "--fleet"),
        (&["--fleet-idle-s", "0"][..], "--fleet-idle-s"),
    ] {
        let out = Command::new(HARNESS).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(first.starts_with("error: ") && first.contains(flag), "{args:?}: first line {first:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
    }
}

/// The harness's child processes (pid, comm), read from /proc.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let comm = head.split_once(" (").map_or("", |(_, c)| c).to_string();
        if rest.split(' ').nth(1).and_then(|s| s.parse::<u32>().ok()) == Some(pid) {
            v.push((p, comm));
        }
    }
    v
}

/// Alive and not a zombie waiting for a reaper.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Killed and reaped however the test ends (a failed assertion must not leave the harness running
/// its 100 000 rounds).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A harness killed with SIGKILL (a timeout, an impatient user) used to leave its relays running
/// and listening; now every hop dies with it, and so does its `--load` process.
#[test]
fn a_harness_killed_with_sigkill_leaves_no_hop_running() {
    let out = std::env::temp_dir().join(format!("harness-cli-kill-{}", std::process::id()));
    let mut harness = Reaped(
        Command::new(HARNESS)
            .args(["--relay"])
            .arg(relay_bin())
            .args(["--out"])
            .arg(&out)
            .args(["--topology", "chain", "--workload", "pingpong-64B", "--rounds", "100000"])
            .args(["--contender", "kvmi-relay", "--contender", "copy loop", "--load", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let harness = &mut harness.0;
    // One busy process, then both contenders' two hops of the chain: five children.
    let deadline = Instant::now() + Duration::from_secs(30);
    let hops = loop {
        let c = children_of(harness.id());
        if c.len() >= 5 {
            break c;
        }
        assert!(Instant::now() < deadline, "the harness started only {c:?}");
        assert!(harness.try_wait().unwrap().is_none(), "the harness exited early");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(hops.iter().any(|(_, comm)| comm == "kvmi-relay"), "no relay among {hops:?}");
    harness.kill().unwrap();
    harness.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hops.iter().any(|&(p, _)| running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<_> = hops.iter().filter(|&&(p, _)| running(p)).collect();
    for &(p, _) in &left {
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
    }
    let _ = std::fs::remove_dir_all(&out);
    // Its sockets' directory, which only a harness that exits itself removes.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("kvmi-relay-bench-{}", harness.id())));
    assert!(left.is_empty(), "still running 5 s after the harness was killed: {left:?}");
}
