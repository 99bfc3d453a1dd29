//! The unit files as systemd reads them: `systemd-analyze verify` passes on both, the service's
//! offline security exposure is at most 1.5, the IPAddressAllow= drop-in lowers it, the
//! ExecStartPre= check turns a broken configuration into one line per problem, and every
//! example configuration passes that check. systemd-analyze missing is a failure, not a skip:
//! `make deps` installs it (package systemd).

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// Highest overall exposure `systemd-analyze security` may report for the service.
const EXPOSURE_MAX_TENTHS: u32 = 15;
const SERVICE: &str = "kvmi-relay@.service";
const SOCKET: &str = "kvmi-relay@.socket";
/// The path the units name for the binary (the packaged location).
const UNIT_BIN: &str = "/usr/bin/kvmi-relay";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The units as shipped, with ExecStart= pointing at the binary under test (verify checks
/// that the command exists and is executable).
fn units_in(dir: &Path) {
    for unit in [SERVICE, SOCKET] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        std::fs::write(dir.join(unit), text.replace(UNIT_BIN, BIN)).unwrap();
    }
}

fn analyze(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("systemd-analyze must be installed (make deps installs the systemd package)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The overall exposure in tenths, from "→ Overall exposure level for X: 1.3 OK".
fn exposure_tenths(report: &str) -> u32 {
    let line = report.lines().find(|l| l.contains("Overall exposure level")).expect("an overall exposure line");
    let figure = line.rsplit(": ").next().unwrap().split_whitespace().next().unwrap();
    let (whole, tenth) = figure.split_once('.').expect("a figure like 1.3");
    whole.parse::<u32>().unwrap() * 10 + tenth.parse::<u32>().unwrap()
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    let dir = tmpdir();
    units_in(dir.path());
    // --man=no: Documentation=man:kvmi-relay(1) is installed by `make install`, not present here.
    let (ok, text) = analyze(&["verify", "--man=no", &format!("./{SERVICE}"), &format!("./{SOCKET}")], dir.path());
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(text.trim().is_empty(), "systemd-analyze verify complained:\n{text}");
}

#[test]
fn service_exposure_is_at_most_1_5_and_the_ip_pinning_drop_in_lowers_it() {
    let dir = tmpdir();
    units_in(dir.path());
    let (ok, report) = analyze(&["security", "--offline=true", &format!("./{SERVICE}")], dir.path());
    assert!(ok, "{report}");
    let base = exposure_tenths(&report);
    assert!(base <= EXPOSURE_MAX_TENTHS, "exposure {}.{} > 1.5:\n{report}", base / 10, base % 10);

    // The documented drop-in, applied to one instance.
    let instance = "kvmi-relay@one-7.service";
    std::fs::copy(dir.path().join(SERVICE), dir.path().join(instance)).unwrap();
    let dropins = dir.path().join(format!("{instance}.d"));
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(repo().join("docs/examples/pin-monitor-ip.dropin.conf"), dropins.join("pin.conf")).unwrap();
    let (ok, pinned_report) = analyze(&["security", "--offline=true", &format!("./{instance}")], dir.path());
    assert!(ok, "{pinned_report}");
    let pinned = exposure_tenths(&pinned_report);
    assert!(pinned < base, "the IPAddressAllow= drop-in did not lower the exposure:\n{pinned_report}");
    eprintln!(
        "exposure: unit {}.{}, with the IP pinning drop-in {}.{}",
        base / 10,
        base % 10,
        pinned / 10,
        pinned % 10
    );
}

/// The busy-host drop-in (SCHED_FIFO 1, poll window off) verifies, and keeps the sandbox: the
/// exposure stays within the unit's bound and RestrictRealtime= stays on (systemd sets the
/// policy before the sandbox closes; the systemd guest checks the relay runs SCHED_FIFO).
#[test]
fn the_realtime_drop_in_verifies_and_keeps_the_sandbox() {
    let dir = tmpdir();
    units_in(dir.path());
    let instance = "kvmi-relay@one-7.service";
    std::fs::copy(dir.path().join(SERVICE), dir.path().join(instance)).unwrap();
    let dropins = dir.path().join(format!("{instance}.d"));
    std::fs::create_dir(&dropins).unwrap();
    let example = repo().join("docs/examples/realtime.dropin.conf");
    std::fs::copy(&example, dropins.join("realtime.conf")).unwrap();
    let text = std::fs::read_to_string(&example).unwrap();
    for line in ["CPUSchedulingPolicy=fifo", "Environment=KVMI_RELAY_POLL_WINDOW_US=0"] {
        assert!(text.lines().any(|l| l == line), "the drop-in lost {line}:\n{text}");
    }
    let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        !settings.iter().any(|l| l.starts_with("RestrictRealtime=")),
        "the drop-in must not open the sandbox:\n{text}"
    );
    let (ok, text) = analyze(&["verify", "--man=no", &format!("./{instance}")], dir.path());
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify with the drop-in:\n{text}");
    let (ok, report) = analyze(&["security", "--offline=true", &format!("./{instance}")], dir.path());
    assert!(ok, "{report}");
    let exposure = exposure_tenths(&report);
    assert!(
        exposure <= EXPOSURE_MAX_TENTHS,
        "exposure {}.{} > 1.5 with the drop-in:\n{report}",
        exposure / 10,
        exposure % 10
    );
}

/// `KEY=value` lines of an EnvironmentFile= (comments and blank lines skipped).
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{}: not KEY=value: {l}", path.display()));
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

/// Runs the unit's ExecStartPre= command with `vars` as its environment.
fn exec_start_pre(vars: &[(String, String)]) -> (i32, String) {
    let unit = std::fs::read_to_string(repo().join("systemd").join(SERVICE)).unwrap();
    let pre = unit.lines().find_map(|l| l.strip_prefix("ExecStartPre=")).expect("the service has ExecStartPre=");
    let mut words = pre.split_whitespace();
    assert_eq!(words.next(), Some(UNIT_BIN), "ExecStartPre= runs the relay itself");
    let mut cmd = Command::new(BIN);
    cmd.args(words).env_clear().env("PATH", "/usr/bin:/bin");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn exec_start_pre_fails_a_broken_file_with_one_line_per_variable() {
    let dir = tmpdir();
    let conf = dir.path().join("one-7.conf");
    std::fs::write(
        &conf,
        "KVMI_RELAY_LISTEN=unix:/nonexistent-kvmi/one-7.sock\nKVMI_RELAY_CONNECT=vsock:7\nKVMI_RELAY_MAX_CONNS=zero\n",
    )
    .unwrap();
    let (code, err) = exec_start_pre(&env_file(&conf));
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem:\n{err}");
    for var in ["KVMI_RELAY_LISTEN", "KVMI_RELAY_CONNECT", "KVMI_RELAY_MAX_CONNS"] {
        assert!(lines.iter().any(|l| l.contains(var)), "no line names {var}:\n{err}");
    }
    assert!(!Path::new("/nonexistent-kvmi").exists());
}

#[test]
fn every_example_configuration_passes_the_check() {
    let dir = tmpdir();
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(".conf"))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().ends_with(".dropin.conf"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 4, "the three flavors (TCP on both hosts) need at least 4 examples: {examples:?}");
    for example in examples {
        let vars: Vec<(String, String)> = env_file(&example)
            .into_iter()
            .map(|(k, v)| {
                assert!(k.starts_with("KVMI_RELAY_"), "{}: {k} is not a kvmi-relay variable", example.display());
                // This machine has neither the per-VM directories nor QEMU's users and groups:
                // the paths move into a scratch directory and the names become root, so that
                // everything else in the file is checked exactly as start-up would.
                let v = v.replace("/run/kvmi", &dir.path().display().to_string());
                let v = match k.as_str() {
                    "KVMI_RELAY_ALLOW_UID" | "KVMI_RELAY_ALLOW_GID" | "KVMI_RELAY_SOCKET_GROUP" => "0".to_string(),
                    _ => v,
                };
                (k, v)
            })
            .collect();
        for (_, v) in &vars {
            if let Some(path) = v.strip_prefix("unix:").filter(|p| p.starts_with(&*dir.path().to_string_lossy())) {
                std::fs::create_dir_all(Path::new(path).parent().unwrap()).unwrap();
            }
        }
        let (code, err) = exec_start_pre(&vars);
        assert_eq!(code, 0, "{} fails the check:\n{err}", example.display());
    }
}

/// Every `Key=value` line of a unit file with this key, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
    text.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string).collect()
}

/// Both units start with either configuration, the operator's in /etc or the libvirt hook's in
/// /run (triggering conditions: one of them suffices); the service reads both, /etc last so that
/// its lines override the hook's. The hook's file is named by the unescaped instance (%I):
/// systemd reads EnvironmentFile= paths as glob patterns, and the backslash of an escaped
/// instance (vm\x2d7) would escape the next character there (seen in the systemd test guest).
#[test]
fn both_units_take_the_etc_or_the_run_configuration() {
    let either = ["|/etc/kvmi-relay/%i.conf", "|/run/kvmi-relay/%I.conf"];
    for unit in [SERVICE, SOCKET] {
        assert_eq!(unit_values(unit, "ConditionPathExists"), either, "{unit}");
    }
    assert_eq!(
        unit_values(SERVICE, "EnvironmentFile"),
        ["-/run/kvmi-relay/%I.conf", "-/etc/kvmi-relay/%i.conf"],
        "{SERVICE}: both files optional, /etc last"
    );
}

/// With both files optional, a service started without either (removed after the condition
/// passed) still fails visibly: ExecStartPre= --check names what is missing.
#[test]
fn exec_start_pre_fails_when_no_configuration_was_read() {
    let (code, err) = exec_start_pre(&[]);
    assert_eq!(code, 2, "{err}");
    for var in ["KVMI_RELAY_LISTEN", "KVMI_RELAY_CONNECT"] {
        assert!(err.lines().any(|l| l.contains(var) && l.contains("missing")), "no line says {var} is missing:\n{err}");
    }
}
