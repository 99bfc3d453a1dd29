//! Outside values cannot forge output: a newline, carriage return or escape sequence that comes
//! from the command line, the environment or a file is printed escaped (`\n`, `\r`, `\u{1b}`),
//! in errors, in `--check`'s answer and in every log line.

mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

/// What an attacker who can set one value would like the operator to read.
const FORGED: &str = "kvmi-relay: configuration ok: listen unix:/run/kvmi/one-7.sock";

/// No control character reaches the terminal: none but the line ends themselves.
fn assert_no_control_chars(text: &str) {
    for line in text.lines() {
        assert!(!line.chars().any(char::is_control), "a control character got through: {line:?}");
    }
}

#[test]
fn a_newline_in_an_allow_uid_cannot_forge_a_second_error_line() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let (code, out, err) = run(&[
        &format!("--listen=unix:{}", sock.display()),
        "--connect=unix:/nonexistent",
        &format!("--allow-uid=x\n{FORGED}"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty(), "nothing on stdout: {out:?}");
    assert_eq!(err.lines().count(), 1, "one problem, one line: {err:?}");
    assert!(err.contains(&format!("unknown user 'x\\n{FORGED}'")), "{err:?}");
    assert!(!sock.exists());
}

#[test]
fn the_environment_cannot_forge_an_error_line_either() {
    let out = Command::new(BIN)
        .env_remove("RUST_LOG")
        .env("KVMI_RELAY_LISTEN", "tcp:127.0.0.1:7")
        .env("KVMI_RELAY_ALLOW_IP", format!("10.0.0.0/33\r\x1b[2K{FORGED}"))
        .env("KVMI_RELAY_CONNECT", "unix:/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert_no_control_chars(&err);
    assert!(err.contains("'10.0.0.0/33\\r\\u{1b}[2Kkvmi-relay: configuration ok"), "{err:?}");
}

#[test]
fn a_path_with_control_characters_is_escaped_in_start_up_errors() {
    let d = tmpdir();
    // A regular file where the socket should go: start-up refuses it and names the path.
    let name = "a\nkvmi-relay: fake\r\x1b[31m.sock";
    let p = d.path().join(name);
    std::fs::write(&p, b"precious").unwrap();
    let (code, _, err) = run(&[&format!("--listen=unix:{}", p.display()), "--connect=unix:/nonexistent"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert_no_control_chars(&err);
    assert!(err.contains("a\\nkvmi-relay: fake\\r\\u{1b}[31m.sock"), "{err:?}");
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
}

#[test]
fn check_prints_one_line_whatever_the_name() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let (code, out, err) = run(&[
        "--check",
        &format!("--listen=unix:{}", sock.display()),
        "--connect=unix:/nonexistent",
        "--name=vm\nfake\x1b[2J",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert_no_control_chars(&out);
    assert!(out.contains("vm\\nfake\\u{1b}[2J"), "{out:?}");
}

#[test]
fn a_name_with_a_newline_never_splits_a_log_line() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let far = "/nonexistent\nfar\r\x1b[0m";
    let mut relay = Relay::start_with(Command::new(BIN).args([
        &format!("--listen=unix:{}", sock.display()),
        &format!("--connect=unix:{far}"),
        "--name=vm\nfake\r\x1b[2J",
    ]));
    // A peer whose far side cannot be reached: the dial failure logs the connect endpoint, inside
    // the connection's span.
    let _peer = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    relay.wait_log("cannot reach the far side", Duration::from_secs(10));
    let (st, log) = relay.stop();
    assert!(st.success(), "{log}");
    for line in log.lines() {
        assert!(line.starts_with("20"), "every line starts with its time, none is a fragment: {line:?}\n{log}");
    }
    assert_no_control_chars(&log);
    assert!(log.contains("name=vm\\nfake\\r\\u{1b}[2J"), "{log}");
    assert!(log.contains("unix:/nonexistent\\nfar\\r\\u{1b}[0m"), "{log}");
}

/// clap's own usage errors quote what was typed verbatim and over several lines; the relay
/// prints each as one escaped line, exit 2, so a value or a flag name cannot forge a line there
/// either. --help and --version still print clap's text.
#[test]
fn usage_errors_are_one_escaped_line() {
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let listen = format!("--listen=unix:{}", sock.display());
    for (args, needle) in [
        (vec![listen.as_str(), "--connect=unix:/x", &format!("--move=x\n{FORGED}")], "--move"),
        (vec![listen.as_str(), "--connect=unix:/x", &format!("--bogus\n{FORGED}")], "--bogus\\n"),
        (vec![listen.as_str(), "--connect=unix:/x", "--check", "--check"], "--check"),
        (vec!["stats", &format!("/x\n{FORGED}"), "--json", "--reset"], "--json"),
        (vec![&format!("stat\x1b[2J\n{FORGED}")], "stat\\u{1b}"),
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one problem, one line: {err:?}");
        assert!(err.starts_with("kvmi-relay: "), "{args:?}: {err:?}");
        assert!(err.contains(needle), "{args:?}: {needle:?} in {err:?}");
        assert_no_control_chars(&err);
        assert!(!sock.exists());
    }
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.lines().count() > 20 && out.contains("--listen"), "{out}");
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("kvmi-relay "), "{out}");
}
