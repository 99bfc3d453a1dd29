//! A TCP peer that vanishes without FIN or reset (power loss, a partition) does not hold its
//! session, or the `--max-conns` slot, for hours: every TCP socket the relay owns has
//! keepalive and a user timeout. The vanishing is real: a peer in a network namespace this test
//! makes, behind a veth whose link goes down before the peer dies, so no FIN or reset can reach
//! the relay. Needs root (CI runs as root): without it the test fails, it does not skip.

mod util;

use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace with one veth to this one: 10.201.N.1 here, 10.201.N.2 inside.
struct Netns {
    name: String,
    outer: String,
    inner: String,
    here: String,
    there: String,
}

impl Netns {
    fn new() -> Netns {
        let n = std::process::id() % 250 + 1;
        let name = format!("kvmi-relay-test-{}", std::process::id());
        let (outer, inner) = (format!("krt{n}a"), format!("krt{n}b"));
        let (here, there) = (format!("10.201.{n}.1"), format!("10.201.{n}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &outer]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name, outer, inner, here, there };
        sh(&["ip", "link", "add", &ns.outer, "type", "veth", "peer", "name", &ns.inner]);
        sh(&["ip", "link", "set", &ns.inner, "netns", &ns.name]);
        sh(&["ip", "addr", "add", &format!("{}/30", ns.here), "dev", &ns.outer]);
        sh(&["ip", "link", "set", &ns.outer, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{}/30", ns.there), "dev", &ns.inner]);
        ns.exec(&["ip", "link", "set", &ns.inner, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// An idle TCP client inside the namespace (socat, stdin held open by the test).
    fn idle_client(&self, to: &str) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "socat", "-", &format!("TCP:{to}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (make deps installs it)")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = Command::new("ip").args(["link", "del", &self.outer]).output();
    }
}

#[test]
fn a_vanished_tcp_peer_frees_its_slot_for_the_next_one() {
    let ns = Netns::new();
    let d = tmpdir();
    let far_path = d.path().join("introspector.sock");
    let far = UnixListener::bind(&far_path).unwrap();
    // The values go in through the environment: the same test then runs (and fails by
    // timing out) against a build that has no such settings.
    let mut relay = Relay::start_with(
        Command::new(BIN)
            .args([
                &format!("--listen=tcp:{}:0", ns.here),
                &format!("--allow-ip={}", ns.there),
                &format!("--connect=unix:{}", far_path.display()),
                "--max-conns=1",
            ])
            .env("KVMI_RELAY_TCP_KEEPALIVE_S", "1")
            .env("KVMI_RELAY_TCP_USER_TIMEOUT_MS", "3000"),
    );
    let at = relay.bound_tcp().to_string();
    let mut first = ns.idle_client(&at);
    relay.wait_log("admitted; dialling", Duration::from_secs(10));
    let (_introspector, _) = far.accept().unwrap();

    // The hypervisor host loses power: its link goes first, then the process, so neither a FIN
    // nor a reset leaves the namespace.
    ns.exec(&["ip", "link", "set", &ns.inner, "down"]);
    first.kill().unwrap();
    first.wait().unwrap();
    let vanished = Instant::now();
    let log = relay.wait_log("closed end=", Duration::from_secs(30));
    let freed_after = vanished.elapsed();
    eprintln!("session of the vanished peer closed {freed_after:?} after it vanished");
    assert!(log.contains("conn{id=1"), "{log}");

    // The next hypervisor (after a restart or a migration) gets the slot.
    ns.exec(&["ip", "link", "set", &ns.inner, "up"]);
    let mut second = ns.idle_client(&at);
    relay.wait_log_count("admitted; dialling", 2, Duration::from_secs(10));
    let (_introspector2, _) = far.accept().unwrap();
    let _ = second.kill();
    let _ = second.wait();
    let (_, log) = relay.stop();
    assert!(!log.contains("refused: --max-conns"), "{log}");
}

/// `ss` shows the relay's own sockets with a keepalive timer armed, with no flag given: the
/// defaults, on the accepted socket and on the dialled one.
#[test]
fn keepalive_is_on_by_default_on_accepted_and_dialled_tcp_sockets() {
    let d = tmpdir();
    let (far, far_addr) = tcp_listener("127.0.0.1");
    let inner_path = d.path().join("inner.sock");
    // Relay 1: UNIX in, TCP out (the dialled socket). Relay 2: TCP in (the accepted one).
    let outer =
        Relay::start(&[&format!("--listen=unix:{}", inner_path.display()), &format!("--connect=tcp:{far_addr}")]);
    let _client = std::os::unix::net::UnixStream::connect(&inner_path).unwrap();
    let (_accepted_by_test, _) = far.accept().unwrap();

    let echo = echo_server(d.path());
    let tcp_in = Relay::start(&["--listen=tcp:127.0.0.1:0", "--allow-ip=127.0.0.1", &format!("--connect={echo}")]);
    let in_addr = tcp_in.bound_tcp();
    let _tcp_client = std::net::TcpStream::connect(in_addr).unwrap();
    let mut tcp_in = tcp_in;
    tcp_in.wait_log("admitted; dialling", Duration::from_secs(10));

    let ss = |filter: String| {
        let out = Command::new("ss").args(["-tnoH", "state", "established", &filter]).output().expect("ss (iproute2)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The dialled socket: the relay's end has the far side's port as its destination.
    let dialled = ss(format!("( dport = :{} )", far_addr.port()));
    assert!(dialled.contains("timer:(keepalive"), "dialled socket without keepalive:\n{dialled}");
    let accepted = ss(format!("( sport = :{} )", in_addr.port()));
    assert!(accepted.contains("timer:(keepalive"), "accepted socket without keepalive:\n{accepted}");
    drop(outer);
    drop(tcp_in);
}
