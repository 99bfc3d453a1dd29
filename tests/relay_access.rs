//! Who gets in, against real sockets: SO_PEERCRED on UNIX (a client really running as another
//! uid), source addresses on TCP (127.0.0.2 vs 127.0.0.3, and the same through a dual-stack
//! listener as ::ffff:127.0.0.3), --max-conns, and the socket file's mode and group.

mod util;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use util::*;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// A directory others may traverse, so that a client running as nobody reaches the socket and
/// the relay's own peer check is what stops it.
fn open_dir() -> tempfile::TempDir {
    let d = tmpdir();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn as_nobody(args: &[&str]) -> (i32, String) {
    let out = Command::new(tools()).args(args).uid(NOBODY).gid(NOGROUP).output().expect("run client as nobody");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn echo_once(ep: &Endpoint) -> Vec<u8> {
    let s = net::connect(ep).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    (&s).read_exact(&mut b).unwrap();
    b.to_vec()
}

#[test]
fn unix_peer_under_another_uid_is_refused_by_peer_credentials() {
    let d = open_dir();
    let echo = echo_server(d.path());
    let relay_ep = format!("unix:{}", d.path().join("relay.sock").display());
    // The group lets nobody open the socket file; only SO_PEERCRED can stop it.
    let mut relay =
        Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={echo}"), "--socket-group=nogroup"]);
    let (code, out) = as_nobody(&["peer", "expect-refused", &format!("--connect={relay_ep}")]);
    assert_eq!(code, 0, "nobody must be refused: {out}\n{}", relay.log());
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("peer=unix pid=") && log.contains("uid=65534 gid=65534"), "{log}");
    // The relay's own uid (root here) is admitted by default.
    assert_eq!(echo_once(&Endpoint::parse(&relay_ep).unwrap()), b"ping");
}

#[test]
fn allow_gid_admits_a_member_of_the_group() {
    let d = open_dir();
    let echo = echo_server(d.path());
    let relay_ep = format!("unix:{}", d.path().join("relay.sock").display());
    let relay = Relay::start(&[
        &format!("--listen={relay_ep}"),
        &format!("--connect={echo}"),
        "--socket-group=nogroup",
        "--allow-gid=nogroup",
    ]);
    let (code, out) = as_nobody(&["peer", "pingpong", &format!("--connect={relay_ep}"), "--count=10"]);
    assert_eq!(code, 0, "nogroup member must be admitted: {out}\n{}", relay.log());
    assert!(out.starts_with("pingpong ok"), "{out}");
}

#[test]
fn tcp_allow_list_admits_127_0_0_2_and_refuses_127_0_0_3() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let mut relay =
        Relay::start(&["--listen=tcp:127.0.0.1:0", "--allow-ip=127.0.0.2/32", &format!("--connect={echo}")]);
    let to = relay.bound_tcp();

    let ok = tcp_from("127.0.0.2", to).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&ok).write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    (&ok).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    drop(ok);
    relay.wait_log("closed", Duration::from_secs(5));

    let bad = tcp_from("127.0.0.3", to).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = (&bad).write_all(b"ping");
    let mut b = [0u8; 4];
    assert_eq!((&bad).read(&mut b).unwrap_or(0), 0, "127.0.0.3 must get nothing back");
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("peer=tcp 127.0.0.3:"), "{log}");
    // Exactly one session was ever dialled onward: the refused peer never reached the far side.
    assert_eq!(log.matches("admitted; dialling").count(), 1, "{log}");
}

#[test]
fn mapped_ipv4_on_a_dual_stack_listener_is_judged_as_ipv4() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let mut relay = Relay::start(&["--listen=tcp:[::]:0", "--allow-ip=127.0.0.2/32", &format!("--connect={echo}")]);
    let to = format!("127.0.0.1:{}", relay.bound_tcp().port()).parse().unwrap();
    let bad = tcp_from("127.0.0.3", to).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = (&bad).write_all(b"x");
    let mut b = [0u8; 1];
    assert_eq!((&bad).read(&mut b).unwrap_or(0), 0);
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("::ffff:127.0.0.3"), "the dual-stack listener saw a mapped address: {log}");

    let ok = tcp_from("127.0.0.2", to).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&ok).write_all(b"y").unwrap();
    (&ok).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y", "::ffff:127.0.0.2 is 127.0.0.2 and must be admitted");
}

#[test]
fn second_session_over_max_conns_is_refused_and_the_first_is_undisturbed() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={echo}")]);
    let first = net::connect(&relay_ep).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&first).write_all(b"one").unwrap();
    let mut b = [0u8; 3];
    (&first).read_exact(&mut b).unwrap();

    kvmi_relay_tools::peers::cli::expect_refused(&relay_ep).expect("one session more than --max-conns must be refused");
    let log = relay.wait_log("--max-conns", Duration::from_secs(5));
    assert!(log.contains("refused"), "{log}");

    // The session already running still works...
    (&first).write_all(b"two").unwrap();
    (&first).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");
    drop(first);
    relay.wait_log("closed", Duration::from_secs(5));
    // ...and once it ended, a new one is admitted (QEMU reconnecting after a migration).
    assert_eq!(echo_once(&relay_ep), b"ping");
}

#[test]
fn socket_file_gets_the_operators_mode_and_group() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    let relay = Relay::start(&[
        &format!("--listen=unix:{}", p.display()),
        "--connect=unix:/nonexistent",
        "--socket-mode=0640",
        "--socket-group=nogroup",
    ]);
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.gid(), NOGROUP);
    let (st, _) = relay.stop();
    assert!(st.success());
    assert!(!p.exists(), "removed on clean exit");

    let q = d.path().join("default.sock");
    let relay = Relay::start(&[&format!("--listen=unix:{}", q.display()), "--connect=unix:/nonexistent"]);
    assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o777, 0o660, "default mode is 0660");
    drop(relay);
}
