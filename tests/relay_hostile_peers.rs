//! Peers that misbehave on purpose, against the real binary: a flood of connections over
//! `--max-conns` while a session runs, a flood of peers the access policy refuses, and a peer
//! process stopped (SIGSTOP) in the middle of a transfer. The live session's bytes are checked, not its timing: figures are printed for
//! the reader, never asserted (the machine may be busy).

mod util;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvmi_relay_tools::peers::net;
use util::*;
#[test]
fn a_flood_of_connections_over_max_conns_leaves_the_live_session_intact() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let control = d.path().join("control.sock");
    let relay = Relay::start(&[
        "--listen=tcp:127.0.0.1:0",
        "--allow-ip=127.0.0.0/8",
        &format!("--connect={echo}"),
        "--max-conns=1",
        &format!("--control={}", control.display()),
    ]);
    let to = relay.bound_tcp();
    let live = tcp_from("127.0.0.2", to).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut quiet = checked_round_trips(&live, 2000, 0);
    let baseline = relay.fd_count();

    // The same flood aimed at an unrelated listener first: what the flood costs the machine,
    // beside what it costs the relay's session.
    let (dummy, dummy_at) = tcp_listener("127.0.0.1");
    std::thread::spawn(move || while dummy.accept().is_ok() {});
    let (_, mut elsewhere) = flood(dummy_at, "127.0.0.3", &live, 2000);
    let (flooded, mut during) = flood(to, "127.0.0.4", &live, 2000 + 200_000);
    let n = 2000 + 200_000 + during.len() as u32;

    // Every flooder the relay accepted was refused, none admitted. A few may never reach
    // accept: a client that gave up while the kernel's backlog was full is dropped there.
    let mut v = stats_json(&control);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = stats_json(&control);
        if now["totals"]["accepted"] == v["totals"]["accepted"] {
            break;
        }
        v = now;
    }
    let accepted = v["totals"]["accepted"].as_u64().unwrap();
    assert!(accepted <= flooded + 1 && accepted * 10 >= flooded * 9, "{flooded} flooders, {}", v["totals"]);
    assert_eq!(v["totals"]["refused_busy"].as_u64(), Some(accepted - 1), "{}", v["totals"]);
    assert_eq!(v["totals"]["admitted"], 1, "{}", v["totals"]);
    assert_eq!(v["live"], 1);
    let after = wait_fds(&relay, baseline, Duration::from_secs(5));
    assert_eq!(after, baseline, "open fds before the flood {baseline}, after {flooded} flooders {after}");
    checked_round_trips(&live, 100, n);
    eprintln!(
        "{flooded} connections in 3 s over --max-conns 1 ({} accepted and refused): live session {} round \
         trips intact; p50/p99 µs quiet {}/{}, the flood aimed elsewhere {}/{}, at the relay {}/{}",
        accepted - 1,
        during.len(),
        pct(&mut quiet, 0.5),
        pct(&mut quiet, 0.99),
        pct(&mut elsewhere, 0.5),
        pct(&mut elsewhere, 0.99),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99)
    );

    // The slot is the next peer's once the live session ends.
    drop(live);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_json(&control)["live"] != 0 {
        assert!(Instant::now() < deadline, "the live session did not close:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let next = tcp_from("127.0.0.2", to).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    checked_round_trips(&next, 10, 0);
}

/// A flood of peers the access policy refuses (their source outside `--allow-ip`): each one is
/// counted, and the log has a warning a second that says how many it left out, not a line per
/// peer.
#[test]
fn a_flood_of_refused_peers_is_counted_peer_by_peer_and_logged_once_a_second() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let control = d.path().join("control.sock");
    let relay = Relay::start(&[
        "--listen=tcp:127.0.0.1:0",
        "--allow-ip=10.0.0.0/8",
        &format!("--connect={echo}"),
        &format!("--control={}", control.display()),
    ]);
    let to = relay.bound_tcp();
    let t0 = Instant::now();
    // Four flooders for 2 s: connect and close; the relay accepts each, finds 127.0.0.1 outside
    // the list and closes it.
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while t0.elapsed() < Duration::from_secs(2) {
                    if std::net::TcpStream::connect(to).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let flooded: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    let v = settled_stats(&control);
    let secs = t0.elapsed().as_secs_f64();
    let accepted = v["totals"]["accepted"].as_u64().unwrap();
    // A few may never reach accept (a client done before the kernel queued it for the relay).
    assert!(accepted <= flooded && accepted * 10 >= flooded * 9, "{flooded} peers, {}", v["totals"]);
    assert_eq!(v["totals"]["refused_access"].as_u64(), Some(accepted), "every one refused: {}", v["totals"]);
    assert_eq!(v["totals"]["admitted"], 0, "{}", v["totals"]);
    let log = relay.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") && l.contains(" refused")).collect();
    let bound = secs.ceil() as usize + 1;
    assert!(accepted >= 10 * bound as u64, "too few peers ({accepted}) to tell a line per peer from a line a second");
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} refusal warnings for {accepted} refused peers in {secs:.1} s, bound {bound}; the first:\n{}",
        lines.len(),
        lines[..3.min(lines.len())].join("\n")
    );
    assert!(lines[0].contains("peer=") && lines[0].contains("127.0.0.1"), "the line names the peer: {}", lines[0]);
    let said: u64 = lines.iter().map(|l| field_u64(l, "suppressed") + 1).sum();
    assert!(said <= accepted, "the lines account for {said} refusals of {accepted}");
    eprintln!("{flooded} refused peers in {secs:.1} s: {accepted} accepted and refused, {} warnings", lines.len());
}

/// The stats once `accepted` has stopped moving (the relay has taken every queued peer).
fn settled_stats(control: &std::path::Path) -> serde_json::Value {
    let mut v = stats_json(control);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = stats_json(control);
        if now["totals"]["accepted"] == v["totals"]["accepted"] {
            return now;
        }
        v = now;
    }
}

/// Two flooders for 3 s at `to` from `source` (its own address: the ports a flood leaves in
/// TIME_WAIT are not the next one's) (connect and close at once, reset, or send a byte and vanish)
/// while `live` does checked round trips; how many connections, and the round-trip times.
fn flood(to: std::net::SocketAddr, source: &'static str, live: &socket2::Socket, from: u32) -> (u64, Vec<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..2)
        .map(|f| {
            let (stop, flooded) = (stop.clone(), flooded.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(s) = tcp_from(source, to) else { continue };
                    match (i + f) % 3 {
                        0 => {}
                        1 => s.set_linger(Some(Duration::ZERO)).unwrap(),
                        _ => {
                            let _ = (&s).write_all(b"x");
                        }
                    }
                    drop(s);
                    flooded.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    let t = Instant::now();
    let mut during = Vec::new();
    let mut n = from;
    while t.elapsed() < Duration::from_secs(3) {
        during.extend(checked_round_trips(live, 200, n));
        n += 200;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    (flooded.load(Ordering::Relaxed), during)
}

fn wait_fds(relay: &Relay, want: usize, patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    loop {
        let n = relay.fd_count();
        if n <= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A peer process stopped (SIGSTOP) early in a 2 GiB echo holds its own session only:
/// another session keeps its round trips, the relay's memory stays put while the stopped peer's
/// bytes back up, and after SIGCONT every byte arrives in order.
#[test]
fn a_stopped_peer_holds_only_its_own_session() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let listen = unix_ep(&d, "relay.sock");
    let mut relay = Relay::start(&[&format!("--listen={listen}"), &format!("--connect={echo}"), "--max-conns=2"]);
    // More than a loaded machine moves in the moment before the stop.
    const BYTES: u64 = 2 << 30;
    let mut bulk = Command::new(tools())
        .args(["peer", "bulk", &format!("--connect={listen}")])
        .args([format!("--send-bytes={BYTES}"), format!("--expect-bytes={BYTES}")])
        .args(["--send-seed=7", "--expect-seed=7"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(bulk.id() as i32);
    // Let it get going, then stop it mid-stream.
    relay.wait_log("admitted", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    assert!(bulk.try_wait().unwrap().is_none(), "the bulk peer finished before it could be stopped");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rss_stopped = rss_kib(relay.pid());

    let other = net::connect(&listen).unwrap();
    other.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut times = checked_round_trips(&other, 3000, 0);
    std::thread::sleep(Duration::from_secs(2));
    let rss_later = rss_kib(relay.pid());
    assert!(bulk.try_wait().unwrap().is_none(), "the stopped peer is still there");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    let out = bulk.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the bulk peer after SIGCONT: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    assert!(rss_later <= rss_stopped + 1024, "relay RSS {rss_stopped} KiB when stopped, {rss_later} KiB 2 s later");
    eprintln!(
        "peer stopped early in {} MiB: the other session's 3000 round trips intact \
         (p50/p99 µs {}/{}); relay RSS {rss_stopped} -> {rss_later} KiB while stopped; all bytes after SIGCONT",
        BYTES >> 20,
        pct(&mut times, 0.5),
        pct(&mut times, 0.99)
    );
}

fn unix_ep(d: &tempfile::TempDir, name: &str) -> kvmi_relay::net::endpoint::Endpoint {
    kvmi_relay::net::endpoint::Endpoint::Unix(d.path().join(name))
}
