//! Start-up: bad input ends with one line naming the flag, exit code 2 and nothing created on
//! disk; stale socket files are replaced, live ones and non-sockets never touched.

mod util;

use std::os::unix::net::UnixListener;
use std::time::Duration;

use util::*;

/// Runs a start-up that must fail; returns stderr after checking exit code 2, a message of
/// exactly one line, and that the listen path was not created.
fn refused(args: &[&str], listen_path: Option<&std::path::Path>) -> String {
    let (code, _out, err) = run(args);
    assert_eq!(code, 2, "exit code for {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line for one problem: {err}");
    assert!(err.starts_with("kvmi-relay: "), "{err}");
    if let Some(p) = listen_path {
        assert!(!p.exists(), "{} was created although start-up failed", p.display());
    }
    err
}

#[test]
fn every_bad_input_is_one_line_exit_2_nothing_created() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let listen = format!("--listen=unix:{}", sock.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![listen.clone(), "--connect=tcp:example.org:7".into()],
            "--connect (KVMI_RELAY_CONNECT): 'example.org' is not an IP address",
        ),
        (vec![listen.clone(), "--connect=udp:1.2.3.4:5".into()], "unknown endpoint kind 'udp'"),
        (
            vec!["--listen=tcp:127.0.0.1:1".into(), "--allow-ip=10.0.0.0/33".into(), "--connect=unix:/x".into()],
            "--allow-ip (KVMI_RELAY_ALLOW_IP): '10.0.0.0/33' is not a CIDR",
        ),
        (
            vec![listen.clone(), "--allow-uid=no-such-user-kvmi".into(), "--connect=unix:/x".into()],
            "--allow-uid (KVMI_RELAY_ALLOW_UID): unknown user 'no-such-user-kvmi'",
        ),
        (vec![listen.clone(), "--socket-group=no-such-group-kvmi".into(), "--connect=unix:/x".into()], "unknown group"),
        (
            vec!["--listen=unix:/nonexistent-kvmi/dir/r.sock".into(), "--connect=unix:/x".into()],
            "parent directory /nonexistent-kvmi/dir of the socket does not exist",
        ),
        (vec![listen.clone(), "--socket-mode=0666".into(), "--connect=unix:/x".into()], "world-writable"),
        (vec![listen.clone(), "--connect=vsock:5".into()], "has no CID"),
        (vec!["--listen=tcp:127.0.0.1:1".into(), "--connect=unix:/x".into()], "a tcp listener needs an allow-list"),
        (vec!["--listen=vsock:5000".into(), "--connect=unix:/x".into()], "a vsock listener needs an allow-list"),
        (
            vec![listen.clone(), "--max-conns=lots".into(), "--connect=unix:/x".into()],
            "--max-conns (KVMI_RELAY_MAX_CONNS): 'lots' is not a valid number",
        ),
        (vec![listen.clone()], "--connect (KVMI_RELAY_CONNECT): missing"),
        (
            vec![listen.clone(), "--connect=unix:/x".into(), "--allow-ip=127.0.0.1".into()],
            "--allow-ip (KVMI_RELAY_ALLOW_IP): only applies to a tcp listener",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = refused(&args, Some(&sock));
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    }
}

/// A relative `unix:` path (or --control/--hist-log file) would be bound, dialled or written
/// relative to whatever the working directory is (/ under systemd): each is refused as one line
/// naming the flag and the value, exit code 2, and nothing appears in the working directory.
#[test]
fn relative_unix_paths_are_refused_and_nothing_is_created() {
    let d = tmpdir();
    let abs = format!("--listen=unix:{}", d.path().join("abs.sock").display());
    let cwd = tmpdir();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--listen=unix:relay.sock".into(), "--connect=unix:/x".into()],
            "--listen (KVMI_RELAY_LISTEN): unix path 'relay.sock' is relative",
        ),
        (
            vec!["--listen=unix:./run/relay.sock".into(), "--connect=unix:/x".into()],
            "--listen (KVMI_RELAY_LISTEN): unix path './run/relay.sock' is relative",
        ),
        (
            vec![abs.clone(), "--connect=unix:run/far.sock".into()],
            "--connect (KVMI_RELAY_CONNECT): unix path 'run/far.sock' is relative",
        ),
        (
            vec![abs.clone(), "--connect=unix:/x".into(), "--control=relay.ctl".into()],
            "--control (KVMI_RELAY_CONTROL): 'relay.ctl' is relative",
        ),
        (
            vec![abs.clone(), "--connect=unix:/x".into(), "--hist-log=one.hlog".into()],
            "--hist-log (KVMI_RELAY_HIST_LOG): 'one.hlog' is relative",
        ),
    ];
    std::fs::create_dir(cwd.path().join("run")).unwrap();
    for (args, needle) in cases {
        for check in [false, true] {
            let mut cmd = std::process::Command::new(BIN);
            cmd.args(&args).current_dir(cwd.path()).env_remove("RUST_LOG");
            if check {
                cmd.arg("--check");
            }
            let (code, err) = run_bounded(&mut cmd, Duration::from_secs(10));
            assert_eq!(code, Some(2), "exit code for {args:?} (check={check}): {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "one line for one problem: {err}");
            assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
            let left: Vec<_> = walk(cwd.path());
            assert_eq!(left, vec![cwd.path().join("run")], "{args:?} created files in the working directory");
        }
    }
}

/// Runs to completion, killing the process if it is still running after `patience`
/// (a relay that accepted its input would serve forever).
fn run_bounded(cmd: &mut std::process::Command, patience: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kvmi-relay");
    let deadline = std::time::Instant::now() + patience;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut err).unwrap();
    match status {
        Some(st) => (st.code(), err),
        None => (None, format!("still running after {patience:?} (killed); stderr: {err}")),
    }
}

/// Every path below `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            all.push(p.clone());
            all.extend(walk(&p));
        } else {
            all.push(p);
        }
    }
    all.sort();
    all
}

#[test]
fn the_environment_configures_an_instance_and_is_named_in_errors() {
    let out = std::process::Command::new(BIN)
        .env("KVMI_RELAY_LISTEN", "tcp:127.0.0.1:7")
        .env("KVMI_RELAY_ALLOW_IP", "10.0.0.0/33")
        .env("KVMI_RELAY_CONNECT", "unix:/run/kvmi/one-7.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KVMI_RELAY_ALLOW_IP"), "{err}");

    let ok = std::process::Command::new(BIN)
        .arg("--check")
        .env("KVMI_RELAY_LISTEN", "tcp:127.0.0.1:7")
        .env("KVMI_RELAY_ALLOW_IP", "198.51.100.4/32, 10.0.0.0/8")
        .env("KVMI_RELAY_CONNECT", "unix:/run/kvmi/one-7.sock")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn check_reports_every_problem_and_binds_nothing() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let (code, _, err) = run(&[
        "--check",
        &format!("--listen=unix:{}", sock.display()),
        "--allow-uid=no-such-user-kvmi",
        "--socket-mode=0777",
        "--connect=tcp:nowhere:1",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 3, "three problems, three lines:\n{err}");
    assert!(!sock.exists());
    let (code, out, _) = run(&["--check", &format!("--listen=unix:{}", sock.display()), "--connect=tcp:127.0.0.1:7"]);
    assert_eq!(code, 0);
    assert!(out.contains("configuration ok"));
    assert!(!sock.exists(), "--check must not bind");
}

/// `--check` refuses what start-up would refuse (checks that take nothing over), and says
/// which peers the relay will admit.
#[test]
fn check_finds_what_start_up_refuses_and_prints_the_access_policy() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let listen = format!("--listen=unix:{}", sock.display());
    let long_dir = d.path().join("y".repeat(100));
    std::fs::create_dir(&long_dir).unwrap();
    let long_control = format!("--control={}/c.ctl", long_dir.display());
    let hist_dir = format!("--hist-log={}", d.path().display());
    let no_file = format!("--listen=unix:{}/nodir/", d.path().display());
    for (args, flag, says) in [
        (vec![listen.as_str(), long_control.as_str()], "--control", "bytes, longer than"),
        (vec![listen.as_str(), hist_dir.as_str()], "--hist-log", "is a directory"),
        (vec![no_file.as_str()], "--listen", "ends in '/'"),
    ] {
        let mut all = vec!["--check", "--connect=unix:/run/vmi/vmi.sock"];
        all.extend(args.iter().copied());
        let err = refused(&all, Some(&sock));
        assert!(err.contains(flag) && err.contains(says), "{all:?}: {err}");
        // And start-up, without --check, refuses the same.
        let err = refused(&all[1..], Some(&sock));
        assert!(err.contains(flag), "{all:?}: {err}");
    }
    let (code, out, err) =
        run(&["--check", &listen, "--allow-uid=0", "--allow-gid=0", "--connect=unix:/run/vmi/vmi.sock"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("admits uid 0 or gid 0"), "{out}");
    let (code, out, err) =
        run(&["--check", "--listen=tcp:127.0.0.1:0", "--allow-ip=10.0.0.0/8,::1", "--connect=unix:/x"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("admits source 10.0.0.0/8, ::1/128"), "{out}");
}

#[test]
fn port_in_use_is_refused_with_the_flag_named() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let err = refused(&[&format!("--listen=tcp:127.0.0.1:{port}"), "--allow-any-ip", "--connect=unix:/x"], None);
    assert!(err.contains(&format!("--listen tcp:127.0.0.1:{port}: cannot bind")), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    drop(UnixListener::bind(&p).unwrap()); // a dead instance's leftover
    assert!(p.exists());
    let relay = Relay::start(&[&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"]);
    std::os::unix::net::UnixStream::connect(&p).expect("the new relay answers on the replaced path");
    let (st, _) = relay.stop();
    assert!(st.success());
}

#[test]
fn a_live_socket_is_never_unlinked() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    let live = UnixListener::bind(&p).unwrap();
    let err = refused(&[&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"], None);
    assert!(err.contains("is a live socket"), "{err}");
    // Still the same, still answering.
    std::os::unix::net::UnixStream::connect(&p).expect("the live listener must survive");
    live.set_nonblocking(true).unwrap();
    assert!(live.accept().is_ok());
}

/// A second instance started on a running instance's path learns that the path is live without
/// connecting to it: the running relay admits nobody, dials nothing, refuses nobody (with
/// `--max-conns 1` a probe would have taken the slot a real hypervisor needs at that moment).
#[test]
fn a_second_instance_on_a_live_path_opens_no_session_on_the_first() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    let far_path = d.path().join("far.sock");
    let far = UnixListener::bind(&far_path).unwrap();
    far.set_nonblocking(true).unwrap();
    let args = [
        format!("--listen=unix:{}", p.display()),
        format!("--connect=unix:{}", far_path.display()),
        "--max-conns=1".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Relay::start(&args);
    let err = refused(&args, None);
    assert!(err.contains("is a live socket"), "{err}");
    // Whatever the first relay would do with a probe (admit and dial, or refuse it), it has
    // logged by the time it answers a real client; this client then shows nothing came before.
    let client = std::os::unix::net::UnixStream::connect(&p).expect("the first relay still answers");
    let (dialled, _) = loop {
        match far.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("accept on the far side: {e}"),
        }
    };
    assert!(
        matches!(far.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the far side was dialled twice: once for the second instance's probe"
    );
    drop((client, dialled));
    let (st, log) = first.stop();
    assert!(st.success(), "{log}");
    assert_eq!(log.matches("admitted; dialling").count(), 1, "one session, the real client's:\n{log}");
    assert!(!log.contains("refused:"), "{log}");
}

#[test]
fn a_regular_file_at_the_path_is_left_alone() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    std::fs::write(&p, b"precious").unwrap();
    let err = refused(&[&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"], None);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
}

#[test]
fn sigterm_and_sigint_exit_0_and_remove_the_socket() {
    for sig in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        let d = tmpdir();
        let p = d.path().join("relay.sock");
        let mut relay = Relay::start(&[&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"]);
        relay.signal(sig);
        let (st, log) = relay.wait_exit(Duration::from_secs(5));
        assert!(st.success(), "{sig}: {st}\n{log}");
        assert!(!p.exists());
    }
}

/// "listening" means SIGTERM is handled: a relay stopped the moment it says it listens exits 0
/// and removes its socket (it once logged before its signal handlers existed, and died of the
/// signal with the file left behind).
#[test]
fn sigterm_the_moment_listening_is_logged_is_a_clean_stop() {
    for round in 0..30 {
        let d = tmpdir();
        let p = d.path().join("relay.sock");
        let mut relay = Relay::spawn(
            std::process::Command::new(BIN)
                .args([&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"]),
        );
        relay.wait_log("listening", Duration::from_secs(10));
        relay.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, log) = relay.wait_exit(Duration::from_secs(5));
        assert!(st.success(), "round {round}: {st}\n{log}");
        assert!(!p.exists(), "round {round}: socket left behind");
    }
}

#[test]
fn under_the_journal_lines_carry_no_timestamp_of_their_own() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    let listen = format!("--listen=unix:{}", p.display());
    let stamped = Relay::start(&[&listen, "--connect=unix:/nonexistent"]);
    let (_, log) = stamped.stop();
    let line = log.lines().find(|l| l.contains(" listening ")).unwrap();
    assert!(line.starts_with("20"), "on a terminal or file a line starts with its time: {line}");

    let journal = Relay::start_with(
        std::process::Command::new(BIN).args([&listen, "--connect=unix:/nonexistent"]).env("JOURNAL_STREAM", "9:123"),
    );
    let (_, log) = journal.stop();
    let line = log.lines().find(|l| l.contains(" listening ")).unwrap();
    assert!(line.trim_start().starts_with("INFO"), "the journal stamps lines itself: {line}");
}

/// The daemon has no test peers, demo or man page: those live in `kvmi-relay-tools`, which
/// `make install` never installs. Both halves are checked so the split cannot drift.
#[test]
fn test_peers_live_in_the_tools_binary_not_in_the_daemon() {
    for tool in ["peer", "fake-hypervisor", "fake-introspector", "demo", "man"] {
        let (code, _out, err) = run(&[tool]);
        assert_eq!(code, 2, "kvmi-relay {tool} should be a usage error: {err}");
        let out = std::process::Command::new(tools()).args([tool, "--help"]).output().unwrap();
        assert!(out.status.success(), "kvmi-relay-tools {tool} --help: {}", String::from_utf8_lossy(&out.stderr));
    }
    let man = std::process::Command::new(tools()).arg("man").output().unwrap();
    assert!(man.status.success());
    assert!(
        String::from_utf8_lossy(&man.stdout).contains("\\-\\-allow\\-uid"),
        "the man page documents the relay's flags"
    );
}

/// Runs `--check` (or a real start) with `vars` set; a start that is accepted serves forever and
/// is killed after 3 s.
fn run_with_env(args: &[&str], vars: &[(&str, &str)], check: bool) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    if check {
        cmd.arg("--check");
    }
    run_bounded(&mut cmd, Duration::from_secs(3))
}

/// A misspelt variable in an EnvironmentFile used to be ignored: `--check` said ok and the
/// allow-list fell back to the relay's own uid. It is refused, naming the variable and the
/// known one it is closest to, with and without `--check`.
#[test]
fn a_misspelt_variable_is_refused_naming_the_closest_known_one() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let listen = format!("--listen=unix:{}", sock.display());
    let args = [listen.as_str(), "--connect=unix:/x"];
    for (var, closest) in [
        ("KVMI_RELAY_ALOW_UID", "KVMI_RELAY_ALLOW_UID"),
        ("KVMI_RELAY_SHUTDOWN_TIMEOUT", "KVMI_RELAY_SHUTDOWN_TIMEOUT_MS"),
        ("kvmi_relay_max_conns", "KVMI_RELAY_MAX_CONNS"),
    ] {
        for check in [true, false] {
            let (code, err) = run_with_env(&args, &[(var, "0")], check);
            assert_eq!(code, Some(2), "{var} (check={check}): {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "one line for one problem: {err}");
            assert!(err.starts_with(&format!("kvmi-relay: {var}: ")), "{err}");
            assert!(err.contains(&format!("did you mean {closest}?")), "{var}: {err}");
            assert!(!sock.exists(), "{var}: bound although start-up failed");
        }
    }
    // A variable's name is an outside value too: it cannot start a line of its own.
    let (code, err) = run_with_env(&args, &[("KVMI_RELAY_X\nkvmi-relay: configuration ok", "1")], true);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("KVMI_RELAY_X\\nkvmi-relay"), "{err}");
}

/// Boolean variables take what systemd users write (1/0, true/false, yes/no, on/off, any case);
/// anything else is refused as one line naming the variable.
#[test]
fn boolean_variables_accept_what_systemd_users_write() {
    let args = ["--listen=tcp:127.0.0.1:0", "--connect=unix:/x"];
    for on in ["1", "true", "yes", "on", "TRUE", "Yes", "On"] {
        let (code, err) = run_with_env(&args, &[("KVMI_RELAY_ALLOW_ANY_IP", on)], true);
        assert_eq!(code, Some(0), "KVMI_RELAY_ALLOW_ANY_IP={on}: {err}");
    }
    for off in ["0", "false", "no", "off", "FALSE", "Off"] {
        let (code, err) = run_with_env(&args, &[("KVMI_RELAY_ALLOW_ANY_IP", off)], true);
        assert_eq!(code, Some(2), "KVMI_RELAY_ALLOW_ANY_IP={off}: {err}");
        assert!(err.contains("a tcp listener needs an allow-list"), "KVMI_RELAY_ALLOW_ANY_IP={off} is off: {err}");
    }
    for check in [true, false] {
        let (code, err) = run_with_env(&args, &[("KVMI_RELAY_ALLOW_ANY_IP", "maybe")], check);
        assert_eq!(code, Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line for one problem: {err}");
        assert!(
            err.contains(
                "--allow-any-ip (KVMI_RELAY_ALLOW_ANY_IP): 'maybe' is not one of 1/0, true/false, yes/no, on/off"
            ),
            "{err}"
        );
    }
    let (code, err) =
        run_with_env(&["--listen=unix:/tmp/kvmi-bool.sock", "--connect=unix:/x"], &[("KVMI_RELAY_KVMI", "yes")], true);
    assert_eq!(code, Some(0), "KVMI_RELAY_KVMI=yes: {err}");
}
