//! Mutual TLS between two relays, against real sockets: the network flavor's chain (relay A:
//! UNIX listen → TLS dial; relay B: TLS listen → UNIX dial) carries bulk both ways intact, and
//! every wrong peer is refused before a byte reaches the other side, its reason in the log.

mod util;

#[path = "../src/tls/test_pki.rs"]
#[allow(dead_code)]
mod test_pki;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use test_pki::{Leaf, Pki};
use util::{Relay, tmpdir};

const BULK_BYTES: usize = 256 << 20;

struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn files(dir: &Path, name: &str, pki: &Pki, leaf: &Leaf) -> Files {
    let (cert, key) = leaf.write(dir, name);
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    Files { cert, key, ca }
}

fn tls_args(f: &Files) -> Vec<String> {
    vec![
        format!("--tls-cert={}", f.cert.display()),
        format!("--tls-key={}", f.key.display()),
        format!("--tls-ca={}", f.ca.display()),
    ]
}

fn start(args: Vec<String>) -> Relay {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start(&a)
}

/// Relay B: TLS on 127.0.0.1 → `sink` (a UNIX path), with `extra` flags.
fn relay_b(f: &Files, sink: &Path, extra: &[String]) -> Relay {
    let mut args = vec!["--listen=tcp:127.0.0.1:0".to_string(), "--allow-ip=127.0.0.1".into()];
    args.push(format!("--connect=unix:{}", sink.display()));
    args.extend(tls_args(f));
    args.extend(extra.iter().cloned());
    start(args)
}

/// Relay A: `entry` (a UNIX path) → TLS to `b`, with `extra` flags.
/// Relay B (certificate for 127.0.0.1) in `dir`, dialling a UNIX introspector socket there
/// that the test holds (non-blocking: `accept` says whether B dialled).
fn relay_b_with_sink(dir: &Path, pki: &Pki, extra: &[String]) -> (Relay, UnixListener) {
    let b_files = files(dir, "b", pki, &pki.leaf("relay-b", &["127.0.0.1"]));
    let sink_path = dir.join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    sink.set_nonblocking(true).unwrap();
    (relay_b(&b_files, &sink_path, extra), sink)
}

fn relay_a(f: &Files, entry: &Path, b: std::net::SocketAddr, extra: &[String]) -> Relay {
    let mut args = vec![format!("--listen=unix:{}", entry.display()), format!("--connect=tcp:{b}")];
    args.extend(tls_args(f));
    args.extend(extra.iter().cloned());
    start(args)
}

/// A deterministic byte stream (xorshift), so each end checks what it got without a copy.
fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `bytes` on `s` from a thread and half-closes; returns what `s` reads to EOF.
fn exchange(s: UnixStream, bytes: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            (&w).write_all(&bytes).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&s).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back
    })
}

#[test]
fn tls_chain_carries_bulk_both_ways_intact_and_ends_with_close_notify() {
    let dir = tmpdir();
    let pki = Pki::new();
    let a_files = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let b_files = files(dir.path(), "b", &pki, &pki.leaf("relay-b", &["127.0.0.1", "relay-b.example"]));
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    let b = relay_b(&b_files, &sink_path, &["--tls-peer-name=relay-a.example".into()]);
    let entry = dir.path().join("vmi-sock");
    let mut a = relay_a(&a_files, &entry, b.bound_tcp(), &["--tls-peer-name=relay-b.example".into()]);

    let client = UnixStream::connect(&entry).unwrap();
    let (server, _) = sink.accept().unwrap();
    // No copy of what is sent is kept: each end's bytes are made again for the check.
    let at_server = exchange(server, stream(2, BULK_BYTES));
    let at_client = exchange(client, stream(1, BULK_BYTES));
    let got_up = at_server.join().unwrap();
    let got_down = at_client.join().unwrap();
    assert!(
        got_up.len() == BULK_BYTES && got_up == stream(1, BULK_BYTES),
        "hypervisor → introspector: {} of {BULK_BYTES} bytes, or changed",
        got_up.len()
    );
    drop(got_up);
    assert!(
        got_down.len() == BULK_BYTES && got_down == stream(2, BULK_BYTES),
        "introspector → hypervisor: {} of {BULK_BYTES} bytes, or changed",
        got_down.len()
    );
    let log_a = a.wait_log(" closed ", Duration::from_secs(10));
    assert!(log_a.contains("tls: peer verified"), "{log_a}");
    assert!(log_a.contains("relay-b.example"), "A logs whom it verified: {log_a}");
    assert!(log_a.contains("end=\"finished\""), "{log_a}");
    let mut b = b;
    let log_b = b.wait_log(" closed ", Duration::from_secs(10));
    assert!(log_b.contains("end=\"finished\""), "B ends cleanly (close_notify, not a truncation): {log_b}");
}

/// Every handshake that passed is timed on its side: N sessions through the chain show N
/// connect-side handshakes in A's stats and N listen-side ones in B's, in JSON and Prometheus;
/// a refused handshake is counted by reason, not timed; `stats reset` zeroes the times.
#[test]
fn passed_handshakes_are_timed_per_side_in_stats() {
    const SESSIONS: u64 = 6;
    let dir = tmpdir();
    let pki = Pki::new();
    let a_files = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let b_files = files(dir.path(), "b", &pki, &pki.leaf("relay-b", &["127.0.0.1"]));
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    let (control_a, control_b) = (dir.path().join("a.control"), dir.path().join("b.control"));
    // Room for every session: one may still be closing when the next arrives.
    let max = format!("--max-conns={SESSIONS}");
    let b = relay_b(&b_files, &sink_path, &[format!("--control={}", control_b.display()), max.clone()]);
    let entry = dir.path().join("vmi-sock");
    let a = relay_a(&a_files, &entry, b.bound_tcp(), &[format!("--control={}", control_a.display()), max]);
    sink.set_nonblocking(true).unwrap();

    let began = std::time::Instant::now();
    for i in 0..SESSIONS {
        let client = UnixStream::connect(&entry).unwrap();
        // B dials the sink only after its handshake passed; A forwards only after its own.
        let server = accept_within(&sink, Duration::from_secs(10), &[&a, &b]);
        let msg = format!("session {i}");
        (&client).write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        (&server).read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes(), "session {i} relays");
    }
    let elapsed_ns = began.elapsed().as_nanos() as f64;
    // A plaintext peer at B: refused, so not timed.
    let mut plain = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    let _ = plain.write_all(&[0u8; 96]);
    let mut b = b;
    b.wait_log("reason=\"not_tls\"", Duration::from_secs(10));

    for (control, side, relay) in [(&control_a, "connect", "A"), (&control_b, "listen", "B")] {
        let v = util::stats_json(control);
        let passed = v["tls"]["handshakes"].as_array().unwrap_or_else(|| panic!("{relay}: no tls.handshakes: {v}"));
        assert_eq!(passed.len(), 1, "{relay} speaks TLS on one side only: {v}");
        assert_eq!(passed[0]["side"], side, "{relay}: {v}");
        let t = &passed[0]["time_ns"];
        assert_eq!(t["count"].as_u64(), Some(SESSIONS), "{relay}: one timed handshake per session: {v}");
        let (min, max) = (t["min"].as_u64().unwrap(), t["max"].as_u64().unwrap());
        let mean = t["mean"].as_f64().unwrap();
        // A handshake signs and checks a signature: far more than 10 µs of work, however
        // fast the machine. None can have taken longer than the sessions the test timed
        // around it (the same monotonic clock; 2 % for the histograms' rounding).
        assert!(min >= 10_000 && min <= t["p50"].as_u64().unwrap() && mean > 0.0, "{relay}: {t}");
        assert!(max as f64 <= elapsed_ns * 1.02, "{relay}: max {max} ns in a run of {elapsed_ns} ns");
        assert!(
            mean * SESSIONS as f64 <= elapsed_ns * 1.02,
            "{relay}: sum {} ns in {elapsed_ns} ns",
            mean * SESSIONS as f64
        );

        let prom = kvmi_relay::observe::control::ask(control, "stats prometheus").unwrap();
        util::promtool_check(&prom);
        let count = prom
            .lines()
            .find(|l| {
                l.starts_with("kvmi_relay_tls_handshake_seconds_count{") && l.contains(&format!("side=\"{side}\""))
            })
            .unwrap_or_else(|| panic!("{relay}: no handshake count: {prom}"));
        assert!(count.ends_with(&format!(" {SESSIONS}")), "{relay}: {count}");
        let other = if side == "listen" { "connect" } else { "listen" };
        assert!(!prom.contains(&format!("side=\"{other}\"")), "{relay} has no TLS on its {other} side: {prom}");
    }
    let v = util::stats_json(&control_b);
    let refused = v["tls"]["refused"].as_array().unwrap();
    assert!(refused.contains(&serde_json::json!(["not_tls", 1])), "the refusal is counted by reason: {v}");

    assert_eq!(kvmi_relay::observe::control::ask(&control_b, "reset").unwrap(), "reset\n");
    let v = util::stats_json(&control_b);
    assert_eq!(v["tls"]["handshakes"][0]["time_ns"]["count"], 0, "reset zeroes the times: {v}");
    drop(plain);
}

/// A TLS peer that sends its last bytes and close_notify together and keeps TCP open until it
/// hears the relay's close_notify (OpenSSL's SSL_shutdown does this): the end still travels.
/// The relay used to take the bytes as a short read (the queue empty) and wait for an edge
/// that never came, so the far side never saw its end of stream.
#[test]
fn a_close_notify_that_comes_with_the_last_bytes_ends_the_stream() {
    let dir = tmpdir();
    let pki = Pki::new();
    let (b, sink) = relay_b_with_sink(dir.path(), &pki, &[]);
    let peer = pki.leaf("client", &["client.example"]);
    let mut conn = test_client(&pki, Some(&peer));
    let mut tcp = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    let far = accept_within(&sink, Duration::from_secs(10), &[&b]);
    // Both in one write: the relay finds them in one read.
    conn.writer().write_all(b"the last bytes").unwrap();
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut tcp).unwrap();
    }
    far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let read = (&far).read_to_end(&mut got);
    assert!(read.is_ok(), "no end of stream after {:?}: {read:?}\n{}", String::from_utf8_lossy(&got), b.log());
    assert_eq!(got, b"the last bytes");
    // And the relay's close_notify comes back once the far side ends too.
    far.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = [0u8; 16];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("unexpected {n} bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                conn.read_tls(&mut tcp).expect("the relay's close_notify");
                conn.process_new_packets().unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The next connection on a non-blocking `sink`, as a blocking stream; panics with the relays'
/// logs when none comes within `patience`.
fn accept_within(sink: &UnixListener, patience: Duration, relays: &[&Relay]) -> UnixStream {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match sink.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
            panic!("no connection reached the sink within {patience:?}; the relays' logs:\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One TLS peer of the key-update test, driven without blocking so that it reads and writes at
/// once (a relay that stops reading while its destination is full would deadlock a peer that
/// blocks on writing): sends `send` as plaintext, asking for a key update (`refresh_traffic_keys`:
/// KeyUpdate with update_requested, so both directions' keys roll) before the bytes at each of
/// `updates_at`, then close_notify; returns what it read up to the relay's close_notify.
fn key_update_peer(
    mut conn: rustls::Connection,
    tcp: std::net::TcpStream,
    send: Vec<u8>,
    mut updates_at: Vec<usize>,
    who: &'static str,
) -> std::thread::JoinHandle<(Vec<u8>, usize)> {
    use nix::poll::{PollFd, PollFlags, poll};
    use std::os::fd::AsFd;
    std::thread::spawn(move || {
        tcp.set_nonblocking(true).unwrap();
        let mut io = &tcp;
        let (mut sent, mut updated, mut shut, mut got, mut ended) = (0, 0, false, Vec::new(), false);
        let mut tcp_eof = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // Poll only after a round that moved nothing: no spinning beside the relay.
            let mut progressed = false;
            if !conn.is_handshaking() && !conn.wants_write() {
                if updates_at.first().is_some_and(|&at| sent >= at) {
                    updates_at.remove(0);
                    conn.refresh_traffic_keys().unwrap_or_else(|e| panic!("{who}: refresh_traffic_keys: {e}"));
                    updated += 1;
                }
                let end = updates_at.first().map_or(send.len(), |&at| at.min(send.len()));
                if sent < end {
                    let n = conn.writer().write(&send[sent..end.min(sent + (16 << 10))]).unwrap();
                    sent += n;
                    progressed |= n > 0;
                } else if sent == send.len() && !shut {
                    conn.send_close_notify();
                    shut = true;
                }
            }
            while conn.wants_write() {
                match conn.write_tls(&mut io) {
                    Ok(n) => progressed |= n > 0,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{who}: write: {e}"),
                }
            }
            if shut && !conn.wants_write() && ended {
                return (got, updated);
            }
            match if tcp_eof { Ok(0) } else { conn.read_tls(&mut io) } {
                Ok(0) => {
                    assert!(ended, "{who}: TCP closed before close_notify ({} bytes read)", got.len());
                    tcp_eof = true;
                }
                Ok(_) => {
                    progressed = true;
                    conn.process_new_packets().unwrap_or_else(|e| panic!("{who}: TLS error: {e}"));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{who}: read: {e}"),
            }
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => {
                        ended = true;
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{who}: {e} after {} bytes", got.len()),
                }
            }
            assert!(std::time::Instant::now() < deadline, "{who}: stuck: sent {sent}, read {}", got.len());
            if !progressed {
                let mut events = if tcp_eof { PollFlags::empty() } else { PollFlags::POLLIN };
                if conn.wants_write() {
                    events |= PollFlags::POLLOUT;
                }
                let mut fds = [PollFd::new(tcp.as_fd(), events)];
                let _ = poll(&mut fds, 100u16);
            }
        }
    })
}

/// A TLS 1.3 KeyUpdate in the middle of the stream, asked for by the relay's peers on both of
/// its TLS sides (its client asks the relay as server, its server asks the relay as client),
/// each several times while bulk flows both ways: every byte arrives, in order, and the session
/// ends cleanly.
#[test]
fn key_updates_mid_stream_keep_both_directions_intact() {
    const BYTES: usize = 16 << 20;
    let dir = tmpdir();
    let pki = Pki::new();
    let relay_files = files(dir.path(), "relay", &pki, &pki.leaf("relay", &["127.0.0.1"]));
    let peer_leaf = pki.leaf("peer", &["127.0.0.1", "peer.example"]);
    let far = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut args = vec![
        "--listen=tcp:127.0.0.1:0".to_string(),
        "--allow-ip=127.0.0.1".into(),
        format!("--connect=tcp:{}", far.local_addr().unwrap()),
    ];
    args.extend(tls_args(&relay_files));
    let mut relay = start(args);

    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(peer_leaf.key_pem.as_bytes()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots(&pki)), provider())
            .build()
            .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![peer_leaf.cert_der.clone()], key)
        .unwrap();

    let client = test_client(&pki, Some(&peer_leaf));
    let near = std::net::TcpStream::connect(relay.bound_tcp()).unwrap();
    let (up, down) = (stream(11, BYTES), stream(12, BYTES));
    // Right after the handshake (before any data), then a third and two thirds of the way.
    let at = vec![0, BYTES / 3, 2 * BYTES / 3];
    let at_client = key_update_peer(client.into(), near, up.clone(), at.clone(), "client");
    // The relay dials once the client's handshake with it passed.
    let (far_tcp, _) = far.accept().unwrap();
    let server = rustls::ServerConnection::new(std::sync::Arc::new(server_cfg)).unwrap();
    let at_server = key_update_peer(server.into(), far_tcp, down.clone(), at, "server");
    let (got_up, server_updates) =
        at_server.join().unwrap_or_else(|_| panic!("server peer failed; relay: {}", relay.log()));
    let (got_down, client_updates) =
        at_client.join().unwrap_or_else(|_| panic!("client peer failed; relay: {}", relay.log()));
    assert_eq!((client_updates, server_updates), (3, 3), "each peer asked for its key updates");
    assert!(
        got_up.len() == up.len() && got_up == up,
        "client → server: {} of {} bytes, or changed",
        got_up.len(),
        up.len()
    );
    assert!(
        got_down.len() == down.len() && got_down == down,
        "server → client: {} of {} bytes, or changed",
        got_down.len(),
        down.len()
    );
    let log = relay.wait_log(" closed ", Duration::from_secs(10));
    assert!(log.contains("end=\"finished\""), "{log}");
}

/// Runs the chain with a wrong party and checks that the introspector's side never saw a
/// connection, and that `refuser`'s log names `reason`.
fn refused(
    a_leaf: (&Pki, Leaf),
    b_leaf: (&Pki, Leaf),
    a_extra: &[String],
    b_extra: &[String],
    reason: &str,
    refuser: char,
) {
    let dir = tmpdir();
    let a_files = files(dir.path(), "a", a_leaf.0, &a_leaf.1);
    let b_files = files(dir.path(), "b", b_leaf.0, &b_leaf.1);
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    sink.set_nonblocking(true).unwrap();
    let mut b = relay_b(&b_files, &sink_path, b_extra);
    let entry = dir.path().join("vmi-sock");
    let mut a = relay_a(&a_files, &entry, b.bound_tcp(), a_extra);
    let client = UnixStream::connect(&entry).unwrap();
    (&client).write_all(b"a KVMi handshake that must not arrive").unwrap();
    let who = if refuser == 'a' { &mut a } else { &mut b };
    let log = who.wait_log("tls: handshake refused", Duration::from_secs(10));
    assert!(log.contains(&format!("reason=\"{reason}\"")), "{log}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(sink.accept().is_err(), "the introspector's side was dialled despite a refused peer");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_before_dialling() {
    let (pki, other) = (Pki::new(), Pki::named("other-ca"));
    let a = other.leaf("relay-a", &["relay-a.example"]);
    let b = pki.leaf("relay-b", &["127.0.0.1"]);
    // A trusts B's CA (so A completes its side), B does not know A's.
    let dir = tmpdir();
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    sink.set_nonblocking(true).unwrap();
    let b_files = files(dir.path(), "b", &pki, &b);
    let mut rb = relay_b(&b_files, &sink_path, &[]);
    // A's CA file holds both CAs: its own certificate checks out at start-up, and it trusts B.
    let (cert, key) = a.write(dir.path(), "a");
    let ca = dir.path().join("a-ca.pem");
    std::fs::write(&ca, format!("{}{}", other.ca_pem, pki.ca_pem)).unwrap();
    let a_files = Files { cert, key, ca };
    let entry = dir.path().join("vmi-sock");
    let _ra = relay_a(&a_files, &entry, rb.bound_tcp(), &[]);
    let client = UnixStream::connect(&entry).unwrap();
    let _ = (&client).write_all(b"must not arrive");
    let log = rb.wait_log("tls: handshake refused", Duration::from_secs(10));
    assert!(log.contains("reason=\"unknown_ca\""), "{log}");
    assert!(log.contains("relay-a"), "the log says what the peer presented: {log}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(sink.accept().is_err(), "the introspector's side was dialled");
}

#[test]
fn a_server_with_the_wrong_name_is_refused_by_the_dialler() {
    let pki = Pki::new();
    let (a, b) = (pki.leaf("relay-a", &["relay-a.example"]), pki.leaf("relay-b", &["127.0.0.1", "impostor.example"]));
    refused((&pki, a), (&pki, b), &["--tls-peer-name=relay-b.example".into()], &[], "wrong_name", 'a');
}

#[test]
fn a_client_with_the_wrong_spki_pin_is_refused_by_the_listener() {
    let pki = Pki::new();
    let (a, b) = (pki.leaf("relay-a", &["relay-a.example"]), pki.leaf("relay-b", &["127.0.0.1"]));
    let pin = format!("--tls-peer-spki=sha256:{}", "A".repeat(43) + "=");
    refused((&pki, a), (&pki, b), &[], &[pin], "wrong_pin", 'b');
}

#[test]
fn a_plaintext_client_at_a_tls_listener_is_refused_before_dialling() {
    let dir = tmpdir();
    let pki = Pki::new();
    let control = dir.path().join("control.sock");
    let (mut b, sink) = relay_b_with_sink(dir.path(), &pki, &[format!("--control={}", control.display())]);
    let mut c = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    let _ = c.write_all(&[0u8; 96]);
    let log = b.wait_log("tls: handshake refused", Duration::from_secs(10));
    assert!(log.contains("reason=\"not_tls\""), "{log}");
    assert!(sink.accept().is_err(), "the introspector's side was dialled");
    // Counted by reason, with the own certificate's expiry beside it.
    let stats = |format: &[&str]| {
        let out = std::process::Command::new(util::BIN).arg("stats").args(format).arg(&control).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = stats(&[]);
    assert!(text.contains("refused handshakes: 1 not_tls") && text.contains("valid until 2099-01-01"), "{text}");
    let prom = stats(&["--prometheus"]);
    assert!(prom.contains("kvmi_relay_tls_refused_total{vm=\"tcp:127.0.0.1:0\",reason=\"not_tls\"} 1"), "{prom}");
    assert!(prom.contains("kvmi_relay_tls_cert_not_after_seconds{vm=\"tcp:127.0.0.1:0\"} 4070908800"), "{prom}");
}

#[test]
fn a_silent_peer_at_a_tls_listener_is_closed_at_the_handshake_timeout() {
    let dir = tmpdir();
    let pki = Pki::new();
    let (mut b, sink) = relay_b_with_sink(dir.path(), &pki, &["--tls-handshake-timeout-ms=300".into()]);
    let c = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    let log = b.wait_log("tls: handshake refused", Duration::from_secs(5));
    assert!(log.contains("reason=\"handshake_timeout\""), "{log}");
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!((&c).read(&mut buf).unwrap(), 0, "the silent peer was closed");
    assert!(sink.accept().is_err(), "the introspector's side was dialled");
}

#[test]
fn a_client_without_a_certificate_is_refused_before_dialling() {
    let dir = tmpdir();
    let pki = Pki::new();
    let (mut b, sink) = relay_b_with_sink(dir.path(), &pki, &[]);
    let mut conn = test_client(&pki, None);
    let mut tcp = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::Stream::new(&mut conn, &mut tcp);
    let _ = s.write_all(b"must not arrive");
    let mut buf = [0u8; 16];
    let _ = s.read(&mut buf);
    let log = b.wait_log("tls: handshake refused", Duration::from_secs(10));
    assert!(log.contains("reason=\"no_certificate\""), "{log}");
    assert!(sink.accept().is_err(), "the introspector's side was dialled");
}

#[test]
fn an_expired_client_certificate_is_refused_before_dialling() {
    let dir = tmpdir();
    let pki = Pki::new();
    let (mut b, sink) = relay_b_with_sink(dir.path(), &pki, &[]);
    // A relay would refuse to start with it: the client here is rustls in the test.
    let expired = pki.leaf_with("old-client", &["old.example"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let mut conn = test_client(&pki, Some(&expired));
    let mut tcp = std::net::TcpStream::connect(b.bound_tcp()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::Stream::new(&mut conn, &mut tcp);
    let _ = s.write_all(b"must not arrive");
    let mut buf = [0u8; 16];
    let _ = s.read(&mut buf);
    let log = b.wait_log("tls: handshake refused", Duration::from_secs(10));
    assert!(log.contains("reason=\"expired\""), "{log}");
    assert!(log.contains("CN=old-client"), "the log says what the peer presented: {log}");
    assert!(sink.accept().is_err(), "the introspector's side was dialled");
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap).collect()
}

/// The PKI's CA as a rustls root store.
fn roots(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&pki.ca_pem) {
        roots.add(c).unwrap();
    }
    roots
}

#[allow(deprecated)]
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// The test's own TLS 1.3 client toward 127.0.0.1, trusting the PKI's CA, presenting `cert`
/// (None: no client certificate).
fn test_client(pki: &Pki, cert: Option<&Leaf>) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(pki));
    let cfg = match cert {
        Some(leaf) => {
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(vec![leaf.cert_der.clone()], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap()
}

#[test]
fn tls_flags_without_a_tcp_endpoint_are_refused_naming_the_flag() {
    let dir = tmpdir();
    let pki = Pki::new();
    let f = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let sock = dir.path().join("in.sock");
    let mut args =
        vec![format!("--listen=unix:{}", sock.display()), format!("--connect=unix:{}", dir.path().join("o").display())];
    args.extend(tls_args(&f));
    args.push("--check".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = util::run(&a);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-cert") && err.contains("tcp:"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn a_key_that_does_not_belong_to_the_certificate_is_refused_naming_flag_and_file() {
    let dir = tmpdir();
    let pki = Pki::new();
    let f = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let (_, other_key) = pki.leaf("x", &["x.example"]).write(dir.path(), "x");
    let args = [
        "--listen=tcp:127.0.0.1:0".to_string(),
        "--allow-ip=127.0.0.1".into(),
        format!("--connect=unix:{}", dir.path().join("o").display()),
        format!("--tls-cert={}", f.cert.display()),
        format!("--tls-key={}", other_key.display()),
        format!("--tls-ca={}", f.ca.display()),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = util::run(&a);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--tls-key") && err.contains("x.key"), "{err}");
}

/// Interop: a standard TLS client (`openssl s_client`) with a certificate from the same CA gets
/// through a kvmi-relay listener; kvmi-relay dialling a standard server (`openssl s_server`) gets
/// through too. So an operator can run kvmi-relay on one side only.
#[test]
fn openssl_at_either_end_interoperates() {
    if !util::precondition(which("openssl"), "openssl_at_either_end_interoperates", "the openssl CLI") {
        return;
    }
    let dir = tmpdir();
    let pki = Pki::new();
    let b_files = files(dir.path(), "b", &pki, &pki.leaf("relay-b", &["127.0.0.1"]));
    let c_files = files(dir.path(), "c", &pki, &pki.leaf("client", &["client.example"]));
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    let mut b = relay_b(&b_files, &sink_path, &["--tls-peer-name=client.example".into()]);
    let port = b.bound_tcp().port();
    let mut client = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-tls1_3", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&c_files.cert)
        .arg("-key")
        .arg(&c_files.key)
        .arg("-CAfile")
        .arg(&c_files.ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (server, _) = sink.accept().unwrap();
    client.stdin.as_mut().unwrap().write_all(b"from s_client\n").unwrap();
    let mut got = [0u8; 14];
    (&server).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from s_client\n");
    (&server).write_all(b"to s_client\n").unwrap();
    let mut back = [0u8; 12];
    client.stdout.as_mut().unwrap().read_exact(&mut back).unwrap();
    assert_eq!(&back, b"to s_client\n");
    let log = b.wait_log("tls: peer verified", Duration::from_secs(5));
    assert!(log.contains("client.example"), "{log}");
    let _ = client.kill();
    let _ = client.wait();

    // kvmi-relay dials openssl s_server, which requires a client certificate.
    let (_, addr) = util::tcp_listener("127.0.0.1");
    let port = addr.port(); // free again once the listener above is dropped
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-tls1_3", "-Verify", "1", "-verify_return_error", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&b_files.cert)
        .arg("-key")
        .arg(&b_files.key)
        .arg("-CAfile")
        .arg(&b_files.ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let entry = dir.path().join("vmi-sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // s_server serves one connection at a time and goes on accepting after that probe.
    let mut a = relay_a(&c_files, &entry, format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let hv = UnixStream::connect(&entry).unwrap();
    (&hv).write_all(b"to s_server\n").unwrap();
    let mut got = [0u8; 12];
    server.stdout.as_mut().unwrap().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to s_server\n");
    server.stdin.as_mut().unwrap().write_all(b"from s_server\n").unwrap();
    let mut back = [0u8; 14];
    (&hv).read_exact(&mut back).unwrap();
    assert_eq!(&back, b"from s_server\n");
    let log = a.wait_log("tls: peer verified", Duration::from_secs(5));
    assert!(log.contains("CN=relay-b"), "{log}");
    let _ = server.kill();
    let _ = server.wait();
}

fn which(tool: &str) -> bool {
    std::process::Command::new(tool).arg("version").output().is_ok_and(|o| o.status.success())
}

/// SIGHUP re-reads the files: a live session carries on, the next one meets the new
/// certificate; a broken file keeps what is in force and says why.
#[test]
fn sighup_reloads_the_certificate_for_new_sessions_and_keeps_live_ones() {
    let dir = tmpdir();
    let pki = Pki::new();
    let a_files = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let b_files = files(dir.path(), "b", &pki, &pki.leaf("relay-b-old", &["127.0.0.1"]));
    let sink_path = dir.path().join("introspector.sock");
    let sink = UnixListener::bind(&sink_path).unwrap();
    let mut b = relay_b(&b_files, &sink_path, &["--max-conns=2".into()]);
    let entry = dir.path().join("vmi-sock");
    let mut a = relay_a(&a_files, &entry, b.bound_tcp(), &["--max-conns=2".into()]);
    let first = UnixStream::connect(&entry).unwrap();
    let (first_far, _) = sink.accept().unwrap();
    a.wait_log("CN=relay-b-old", Duration::from_secs(5));

    // A new certificate and key for B, from the same CA, written over the old files.
    let new = pki.leaf("relay-b-new", &["127.0.0.1"]);
    std::fs::write(&b_files.cert, &new.cert_pem).unwrap();
    std::fs::write(&b_files.key, &new.key_pem).unwrap();
    b.signal(nix::sys::signal::Signal::SIGHUP);
    b.wait_log("SIGHUP: tls: reloaded", Duration::from_secs(5));

    let second = UnixStream::connect(&entry).unwrap();
    let (second_far, _) = sink.accept().unwrap();
    a.wait_log("CN=relay-b-new", Duration::from_secs(5));
    for (near, far) in [(&first, &first_far), (&second, &second_far)] {
        (&*near).write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        (&*far).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping", "both sessions carry bytes after the reload");
    }

    // A key that does not match: refused, the new pair stays in force.
    let (_, stray) = pki.leaf("x", &["x.example"]).write(dir.path(), "x");
    std::fs::copy(&stray, &b_files.key).unwrap();
    b.signal(nix::sys::signal::Signal::SIGHUP);
    let log = b.wait_log("SIGHUP: tls: not reloaded", Duration::from_secs(5));
    assert!(log.contains("b.key"), "the log names the file: {log}");
    drop((first, first_far, second, second_far));
}

/// `--kvmi` on both relays of a TLS chain: B reads the VM's handshake through TLS before it
/// dials, A's KVMi gate writes into TLS; the fake introspector's passive and active bursts pass.
#[test]
fn kvmi_sessions_run_over_the_tls_chain() {
    let dir = tmpdir();
    let pki = Pki::new();
    let a_files = files(dir.path(), "a", &pki, &pki.leaf("relay-a", &["relay-a.example"]));
    let b_files = files(dir.path(), "b", &pki, &pki.leaf("relay-b", &["127.0.0.1"]));
    let sink_path = dir.path().join("introspector.sock");
    let introspector = std::process::Command::new(util::tools())
        .args(["fake-introspector", "--reads=300", "--events=100"])
        .arg(format!("--listen=unix:{}", sink_path.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !sink_path.exists() {
        assert!(std::time::Instant::now() < deadline, "the fake introspector did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The fake peers' event trigger is a command outside the v7 table: passed, as in the demo.
    let kvmi = ["--kvmi".to_string(), "--kvmi-unknown=pass".into()];
    let mut b = relay_b(&b_files, &sink_path, &kvmi);
    let entry = dir.path().join("vmi-sock");
    let a = relay_a(&a_files, &entry, b.bound_tcp(), &kvmi);
    let mut hv = std::process::Command::new(util::tools())
        .arg("fake-hypervisor")
        .arg(format!("--connect=unix:{}", entry.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = introspector.wait_with_output().unwrap();
    let _ = hv.kill();
    let _ = hv.wait();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fake introspector: {text}\nA: {}\nB: {}", a.log(), b.log());
    let log_b = b.wait_log("tls: peer verified", Duration::from_secs(5));
    assert!(log_b.contains("relay-a.example"), "{log_b}");
    assert!(!a.log().contains("tls: handshake refused") && !log_b.contains("kvmi-malformed"), "{log_b}");
}
