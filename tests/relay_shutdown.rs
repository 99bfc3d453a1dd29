//! SIGTERM under load, bytes compared: every byte the relay logs as written reaches the reader,
//! and a session the shutdown timeout cuts ends as `aborted` (counted apart), its TCP peer seeing
//! a reset rather than a clean end of stream.
//!
//! Every loop here is bounded by a deadline and a count.

mod util;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use util::*;

const CHUNK: usize = 64 * 1024;

/// Writes chunks on `s` until `stop`, an error or `patience`; returns the bytes written.
fn keep_sending(s: socket2::Socket, stop: Arc<AtomicBool>, patience: Duration) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        s.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
        let chunk = vec![0x5au8; CHUNK];
        let deadline = Instant::now() + patience;
        let mut sent = 0u64;
        for _ in 0..1_000_000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            match (&s).write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        sent
    })
}

/// How a reader's stream ended.
#[derive(Debug, PartialEq)]
enum Ending {
    Eof,
    Error(std::io::ErrorKind),
    OutOfTime,
}

/// Reads `s` until EOF, an error or `patience`, pausing `pause` after every read of at most
/// `step` bytes (a slow reader); counts into `got`.
fn read_until_end(s: &socket2::Socket, step: usize, pause: Duration, got: &AtomicU64, patience: Duration) -> Ending {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; step];
    let deadline = Instant::now() + patience;
    for _ in 0..10_000_000 {
        if Instant::now() > deadline {
            return Ending::OutOfTime;
        }
        match (&*s).read(&mut buf) {
            Ok(0) => return Ending::Eof,
            Ok(n) => {
                got.fetch_add(n as u64, Ordering::Relaxed);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Ending::Error(e.kind()),
        }
    }
    Ending::OutOfTime
}

/// A peer that sends without pause and reads slowly; once its reads end it stops sending and
/// closes. Returns (how its reads ended, bytes read, bytes sent).
fn chatty_slow_reader(s: socket2::Socket, step: usize, pause: Duration) -> JoinHandle<(Ending, u64, u64)> {
    std::thread::spawn(move || {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = keep_sending(s.try_clone().unwrap(), stop.clone(), Duration::from_secs(30));
        let got = AtomicU64::new(0);
        let ending = read_until_end(&s, step, pause, &got, Duration::from_secs(30));
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap();
        (ending, got.load(Ordering::Relaxed), sent)
    })
}

#[test]
fn sigterm_into_tcp_delivers_every_byte_the_relay_logged_written() {
    let d = tmpdir();
    let (far_listener, far_at) = tcp_listener("127.0.0.1");
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[
        &format!("--listen={relay_ep}"),
        &format!("--connect=tcp:{far_at}"),
        "--shutdown-timeout-ms=20000",
    ]);
    let client = net::connect(&relay_ep).unwrap();
    let far = net::accept(&far_listener).unwrap();
    // Both peers keep sending; the far side reads 16 KiB a millisecond (about 16 MB/s), the
    // client as fast as it can.
    let far_side = chatty_slow_reader(far, 16 * 1024, Duration::from_millis(1));
    let client_side = chatty_slow_reader(client, CHUNK, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1500));

    relay.signal(nix::sys::signal::Signal::SIGTERM);
    let (far_ending, far_got, _) = far_side.join().unwrap();
    let (client_ending, client_got, _) = client_side.join().unwrap();
    let (st, log) = relay.wait_exit(Duration::from_secs(25));
    assert!(st.success(), "{log}");
    let line = closed_lines(&log).pop().unwrap_or_else(|| panic!("no close line:\n{log}"));
    let (l2c, c2l) = (field_u64(&line, "l2c_bytes"), field_u64(&line, "c2l_bytes"));
    eprintln!(
        "far side read {far_got} of l2c {l2c} ({far_ending:?}); client read {client_got} of c2l {c2l} ({client_ending:?})"
    );
    assert!(l2c > 4 << 20, "too little traffic to prove anything: {line}");
    assert_eq!(
        far_got, l2c,
        "every byte the relay logged written into TCP reached the reader ({far_ending:?}): {line}"
    );
    assert_eq!(far_ending, Ending::Eof, "the TCP reader's stream ends cleanly");
    assert_eq!(client_got, c2l, "every byte the relay logged written into UNIX reached the client: {line}");
    assert_eq!(client_ending, Ending::Eof);
    assert!(line.contains("end=\"drained\""), "{line}");
}

#[test]
fn a_session_cut_by_the_shutdown_timeout_ends_aborted_and_its_tcp_peer_sees_a_reset() {
    let d = tmpdir();
    let (far_listener, far_at) = tcp_listener("127.0.0.1");
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[
        &format!("--listen={relay_ep}"),
        &format!("--connect=tcp:{far_at}"),
        "--shutdown-timeout-ms=500",
    ]);
    let client = net::connect(&relay_ep).unwrap();
    let far = net::accept(&far_listener).unwrap();
    // The far side reads nothing until the relay gave up: bytes stay in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = keep_sending(client.try_clone().unwrap(), stop.clone(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    let (st, log) = relay.wait_exit(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(st.success(), "{log}");
    let line = closed_lines(&log).pop().unwrap_or_else(|| panic!("no close line:\n{log}"));
    assert!(line.contains("end=\"aborted\""), "a session cut by the timeout is not drained: {line}");
    let stopped = log.lines().find(|l| l.contains(" stopped")).unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    assert_eq!(field_u64(stopped, "aborted"), 1, "counted apart: {stopped}");
    let got = AtomicU64::new(0);
    let ending = read_until_end(&far, CHUNK, Duration::ZERO, &got, Duration::from_secs(5));
    assert_eq!(
        ending,
        Ending::Error(std::io::ErrorKind::ConnectionReset),
        "the TCP peer of an aborted session sees a reset, not a clean end ({} bytes read)",
        got.load(Ordering::Relaxed)
    );
}
