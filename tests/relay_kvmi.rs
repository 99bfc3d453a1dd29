//! `--kvmi` against the real binary: VM pinning from QEMU's handshake, before anything is
//! dialled. QEMU is played by a test thread (the handshake bytes), the introspector by a UNIX
//! listener that counts the connections it sees.

mod util;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use kvmi_relay::kvmi::handshake::{build_qemu, format_uuid};
use kvmi_relay_tools::peers::kvmi as fake;
use util::*;

const UUID: [u8; 16] = *b"kvmi-relay-fake!";

struct Setup {
    _dir: tempfile::TempDir,
    relay_path: std::path::PathBuf,
    intro: UnixListener,
    relay: Relay,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tmpdir();
    let relay_path = path_in(dir.path(), "vmi-sock");
    let intro_path = path_in(dir.path(), "introspector.sock");
    let intro = UnixListener::bind(&intro_path).unwrap();
    intro.set_nonblocking(true).unwrap();
    let mut args = vec![
        format!("--listen=unix:{}", relay_path.display()),
        format!("--connect=unix:{}", intro_path.display()),
        "--kvmi".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start(&args);
    Setup { _dir: dir, relay_path, intro, relay }
}

/// QEMU's side: sends `hs`, then waits for the relay to close (refused) or for `patience`.
fn qemu_sends(path: &std::path::Path, hs: &[u8]) -> bool {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hs).unwrap();
    let mut b = [0u8; 1];
    // A refused peer may have left bytes unread: closed or reset, both mean refused.
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn assert_no_connection(l: &UnixListener) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the introspector's socket saw a connection: {other:?}"),
    }
}

#[test]
fn a_wrong_uuid_is_refused_before_dialling() {
    let mut s = setup(&["--kvmi-vm-uuid=00000000-0000-0000-0000-000000000001"]);
    assert!(qemu_sends(&s.relay_path, &build_qemu(UUID, 1, b"one-7", None)), "the relay must close");
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains(&format_uuid(&UUID)) && log.contains("00000000-0000-0000-0000-000000000001"), "{log}");
    assert_no_connection(&s.intro);
}

#[test]
fn a_wrong_name_is_refused_before_dialling_and_escaped_in_the_log() {
    let mut s = setup(&["--kvmi-vm-name=one-7"]);
    assert!(qemu_sends(&s.relay_path, &build_qemu(UUID, 1, b"one-8\x1b[2J", None)));
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains("one-8\\") && log.contains("x1b[2J") && log.contains("one-7"), "{log}");
    assert!(!log.contains('\x1b'), "an escape sequence reached the log: {log}");
    assert_no_connection(&s.intro);
}

#[test]
fn a_handshake_of_another_size_is_refused_with_the_size_seen() {
    let mut s = setup(&[]);
    let mut hs = build_qemu(UUID, 1, b"one-7", None);
    hs[0..4].copy_from_slice(&100u32.to_le_bytes());
    assert!(qemu_sends(&s.relay_path, &hs));
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains("struct_size 100"), "{log}");
    assert_no_connection(&s.intro);
}

#[test]
fn the_pinned_vm_is_admitted_and_its_handshake_forwarded_unchanged_in_both_sizes() {
    for max_gpa in [None, Some(0x1_0000_0000u64)] {
        let s = setup(&[&format!("--kvmi-vm-uuid={}", format_uuid(&UUID)), "--kvmi-vm-name=one-7"]);
        s.intro.set_nonblocking(false).unwrap();
        let hs = build_qemu(UUID, 42, b"one-7", max_gpa);
        let mut q = UnixStream::connect(&s.relay_path).unwrap();
        q.write_all(&hs).unwrap();
        let (mut i, _) = s.intro.accept().unwrap();
        i.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; hs.len()];
        i.read_exact(&mut got).unwrap();
        assert_eq!(got, hs);
    }
}

#[test]
fn the_fake_pair_runs_a_whole_session_through_a_pinned_relay() {
    let s = setup(&[&format!("--kvmi-vm-uuid={}", format_uuid(&UUID))]);
    s.intro.set_nonblocking(false).unwrap();
    let relay_path = s.relay_path.clone();
    let hv = std::thread::spawn(move || {
        let mut q = UnixStream::connect(&relay_path).unwrap();
        fake::serve_hypervisor(&mut q, "one-7").unwrap()
    });
    let (mut i, _) = s.intro.accept().unwrap();
    i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rep = fake::run_introspector(&mut i, 50, 10).unwrap();
    drop(i);
    let hv = hv.join().unwrap();
    assert_eq!(rep.vm_name, "one-7");
    assert_eq!((rep.reads, hv.events), (50, 10));
}
