//! Migration on the monitor host's relay: the source hypervisor's session is still open (its
//! QEMU waits for the introspector to close after UNHOOK) when the destination hypervisor
//! dials. With `--replace-after-ms` the destination is served at once and the old session is
//! closed after the grace; without it the destination is refused until the old one ends. The
//! two hypervisor hosts are two loopback addresses (127.0.0.2, 127.0.0.3), the introspector an
//! echo server that never closes a session by itself.

mod util;

use std::io::Read;
use std::time::{Duration, Instant};

use kvmi_relay_tools::peers::pingpong;
use util::*;

const SOURCE: &str = "127.0.0.2";
const DESTINATION: &str = "127.0.0.3";

fn monitor_relay(dir: &std::path::Path, extra: &[&str]) -> Relay {
    let tool = echo_server(dir);
    let connect = format!("--connect={tool}");
    let mut args = vec![
        "--listen=tcp:127.0.0.1:0",
        "--allow-ip=127.0.0.2/32,127.0.0.3/32",
        connect.as_str(),
        "--max-conns=1",
        "--name=one-7",
    ];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Whether `sock` has seen EOF by now (without waiting).
fn at_eof(sock: &socket2::Socket) -> bool {
    sock.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let eof = matches!((&*sock).read(&mut b), Ok(0));
    sock.set_nonblocking(false).unwrap();
    eof
}

/// Reads until EOF; how long it took.
fn wait_eof(sock: &socket2::Socket, patience: Duration) -> Duration {
    let t0 = Instant::now();
    sock.set_read_timeout(Some(patience)).unwrap();
    let mut rest = Vec::new();
    (&*sock).read_to_end(&mut rest).expect("EOF within the patience");
    assert!(rest.is_empty(), "no stray bytes before EOF: {rest:?}");
    t0.elapsed()
}

#[test]
fn the_destination_is_served_while_the_source_session_closes_and_the_source_is_closed_after_the_grace() {
    let d = tmpdir();
    let grace = Duration::from_millis(3000);
    let mut relay = monitor_relay(d.path(), &["--replace-after-ms=3000"]);
    let at = relay.bound_tcp();

    // The VM runs on the source host; introspection goes on mid-stream.
    let source = tcp_from(SOURCE, at).unwrap();
    pingpong::round_trips(&source, 64, 64, 200).unwrap();
    // Migration: the source QEMU unhooks and waits; its session stays open.
    let last_of_old = Instant::now();

    // The destination QEMU dials its own host's relay, which dials here.
    let admitted_after = Instant::now();
    let destination = tcp_from(DESTINATION, at).unwrap();
    pingpong::round_trips(&destination, 64, 64, 1).unwrap();
    let gap = last_of_old.elapsed();
    assert!(!at_eof(&source), "the old session is still open when the new one is served");
    pingpong::round_trips(&destination, 64, 64, 199).unwrap();

    // One handover at a time: another newcomer while it is pending is refused.
    let third = tcp_from(DESTINATION, at).unwrap();
    wait_eof(&third, Duration::from_secs(5));
    relay.wait_log("refused: --max-conns sessions already running", Duration::from_secs(5));

    // The old session is closed when the grace runs out, never before.
    wait_eof(&source, grace + Duration::from_secs(10));
    let closed_after = admitted_after.elapsed();
    assert!(closed_after >= grace, "closed {closed_after:?} after the handover");
    let log = relay.wait_log("end=\"replaced\"", Duration::from_secs(5));
    pingpong::round_trips(&destination, 64, 64, 10).unwrap();

    println!(
        "handover: last round trip of the old session to the first of the new {:.1} ms; old session closed {:.0} ms \
         after the new one dialled (grace {} ms)",
        gap.as_secs_f64() * 1e3,
        closed_after.as_secs_f64() * 1e3,
        grace.as_millis()
    );
    assert!(log.contains("a newer session is admitted over --max-conns"), "{log}");
    let (status, log) = relay.stop();
    assert!(status.success(), "{log}");
    let stopped = log.lines().find(|l| l.contains(" stopped")).expect("a stopped line");
    assert_eq!(field_u64(stopped, "replaced"), 1, "{stopped}");
    assert_eq!(field_u64(stopped, "refused_busy"), 1, "{stopped}");
    assert_eq!(field_u64(stopped, "admitted"), 2, "{stopped}");
}

#[test]
fn without_the_flag_the_destination_is_refused_while_the_source_session_is_open() {
    let d = tmpdir();
    let mut relay = monitor_relay(d.path(), &[]);
    let at = relay.bound_tcp();
    let source = tcp_from(SOURCE, at).unwrap();
    pingpong::round_trips(&source, 64, 64, 10).unwrap();
    let destination = tcp_from(DESTINATION, at).unwrap();
    wait_eof(&destination, Duration::from_secs(5));
    relay.wait_log("refused: --max-conns sessions already running", Duration::from_secs(5));
    // The old session goes on untouched.
    pingpong::round_trips(&source, 64, 64, 10).unwrap();
    assert!(!at_eof(&source));
}

#[test]
fn a_newcomer_that_ends_within_the_grace_leaves_the_old_session_running() {
    let d = tmpdir();
    let mut relay = monitor_relay(d.path(), &["--replace-after-ms=2000"]);
    let at = relay.bound_tcp();
    let source = tcp_from(SOURCE, at).unwrap();
    pingpong::round_trips(&source, 64, 64, 10).unwrap();
    let destination = tcp_from(DESTINATION, at).unwrap();
    pingpong::round_trips(&destination, 64, 64, 1).unwrap();
    drop(destination);
    relay.wait_log("the session replacing this one has ended; this one stays", Duration::from_secs(5));
    // Past the grace the old session is still served.
    std::thread::sleep(Duration::from_millis(2500));
    pingpong::round_trips(&source, 64, 64, 10).unwrap();
    assert!(!at_eof(&source));
    assert!(!relay.log().contains("end=\"replaced\""), "{}", relay.log());
}
