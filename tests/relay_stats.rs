//! Latency you can see, checked against traffic whose timing the test controls: a far side
//! that waits 2 ms per reply, a destination that stalls, the interval log read back with the
//! hdrhistogram crate, every `stats` format, the control socket's access check, bounded memory.

mod util;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay::observe::control::ask;
use kvmi_relay_tools::peers::{net, pingpong};
use util::*;

/// A UNIX server that answers every 64-byte message after `delay`.
fn slow_echo(dir: &std::path::Path, delay: Duration) -> Endpoint {
    let ep = Endpoint::Unix(dir.join("slow.sock"));
    let l = net::listen(&ep).unwrap();
    std::thread::spawn(move || {
        while let Ok(s) = net::accept(&l) {
            let mut buf = [0u8; 64];
            while (&s).read_exact(&mut buf).is_ok() {
                std::thread::sleep(delay);
                if (&s).write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
    ep
}

fn start(dir: &std::path::Path, connect: &Endpoint, extra: &[&str]) -> (Relay, Endpoint, std::path::PathBuf) {
    let listen = Endpoint::Unix(dir.join("relay.sock"));
    let control = dir.join("control.sock");
    let mut args =
        vec![format!("--listen={listen}"), format!("--connect={connect}"), format!("--control={}", control.display())];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Relay::start(&args), listen, control)
}
#[test]
fn turnaround_sees_the_far_sides_2ms_and_transit_stays_far_below() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::from_millis(2));
    let (relay, listen, control) = start(d.path(), &server, &[]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 200).unwrap();

    let v = stats_json(&control);
    let conn = &v["connections"][0];
    let c2l = &conn["directions"][1];
    let turnaround_p50_ms = c2l["turnaround_ns"]["p50"].as_u64().unwrap() as f64 / 1e6;
    let transit_p50_ms = conn["directions"][0]["transit_ns"]["p50"].as_u64().unwrap() as f64 / 1e6;
    eprintln!("far side sleeps 2 ms: turnaround p50 {turnaround_p50_ms:.3} ms, transit p50 {transit_p50_ms:.3} ms");
    assert_eq!(c2l["turnaround_ns"]["count"], 200, "one turnaround per reply");
    assert!((2.0..2.6).contains(&turnaround_p50_ms), "turnaround p50 {turnaround_p50_ms} ms for a 2 ms far side");
    assert!(transit_p50_ms < 0.5, "transit p50 {transit_p50_ms} ms must be far below the far side's 2 ms");
    drop(client);
    drop(relay);
}

#[test]
fn a_stalled_destination_shows_up_as_transit() {
    let d = tmpdir();
    let server_ep = Endpoint::Unix(d.path().join("server.sock"));
    let server_listener = net::listen(&server_ep).unwrap();
    let (relay, listen, control) = start(d.path(), &server_ep, &[]);
    let client = net::connect(&listen).unwrap();
    let server = net::accept(&server_listener).unwrap();
    let writer = {
        let c = client.try_clone().unwrap();
        std::thread::spawn(move || (&c).write_all(&vec![3u8; 4 << 20]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(150)); // the destination reads nothing
    let mut got = vec![0u8; 4 << 20];
    (&server).read_exact(&mut got).unwrap();
    writer.join().unwrap();
    let v = stats_json(&control);
    let max_ms = v["connections"][0]["directions"][0]["transit_ns"]["max"].as_u64().unwrap() as f64 / 1e6;
    assert!(max_ms >= 100.0, "bytes waited ~150 ms for the destination; transit max was {max_ms} ms");
    drop(relay);
}

#[test]
fn interval_log_reads_back_with_counts_matching_the_traffic() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let log_path = d.path().join("relay.hlog");
    let (relay, listen, _control) = start(
        d.path(),
        &server,
        &[&format!("--hist-log={}", log_path.display()), "--hist-interval=0.1", "--name=one-7"],
    );
    let client = net::connect(&listen).unwrap();
    const N: u64 = 500;
    pingpong::round_trips(&client, 64, 64, N).unwrap();
    std::thread::sleep(Duration::from_millis(250));
    drop(client);
    let (st, _) = relay.stop();
    assert!(st.success());

    let text = std::fs::read(&log_path).unwrap();
    let head = String::from_utf8_lossy(&text);
    assert!(head.contains("#[StartTime: "), "standard header:\n{head}");
    let mut counts = std::collections::HashMap::<String, u64>::new();
    let mut intervals = 0;
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(&text) {
        if let LogEntry::Interval(h) = entry.expect("every line parses") {
            let bytes = base64_decode(h.encoded_histogram());
            let hist: hdrhistogram::Histogram<u64> = de.deserialize(&mut &bytes[..]).expect("V2 histogram decodes");
            *counts.entry(h.tag().expect("tagged").as_str().to_string()).or_default() += hist.len();
            intervals += 1;
        }
    }
    assert!(intervals >= 8, "at least two intervals of four tags: {intervals}");
    assert_eq!(counts["one-7.l2c.transit"], N, "{counts:?}");
    assert_eq!(counts["one-7.c2l.transit"], N, "{counts:?}");
    assert_eq!(counts["one-7.c2l.turnaround"], N, "every reply answers a forward: {counts:?}");
    assert_eq!(counts["one-7.l2c.turnaround"], N - 1, "every request but the first follows a reply: {counts:?}");
}

/// Standard base64 (the interval log's encoding), for the read-back only.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= (val(c) as u32) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn stats_in_every_format_and_reset() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (relay, listen, control) = start(d.path(), &server, &["--name=one-7"]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 100).unwrap();

    let out = Command::new(BIN).args(["stats", control.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("kvmi-relay one-7") && table.contains("unix pid=") && table.contains("(100)"), "{table}");

    let out = Command::new(BIN).args(["stats", "--json", control.to_str().unwrap()]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["connections"][0]["directions"][0]["bytes"], 6400);
    // Messages into UNIX are copied (`--move auto`; tests/relay_data.rs has the why).
    assert_eq!(v["connections"][0]["directions"][0]["copy_bytes"], 6400);
    assert_eq!(v["connections"][0]["directions"][0]["splice_bytes"], 0);
    assert_eq!(v["all_sessions"][1]["transit_ns"]["count"], 100);

    let out = Command::new(BIN).args(["stats", "--prometheus", control.to_str().unwrap()]).output().unwrap();
    let prom = String::from_utf8_lossy(&out.stdout);
    promtool_check(&prom);
    assert!(prom.contains("kvmi_relay_bytes_total{vm=\"one-7\",direction=\"l2c\",strategy=\"copy\"} 6400"), "{prom}");
    assert!(prom.contains("kvmi_relay_latency_seconds_count{vm=\"one-7\",direction=\"c2l\",figure=\"transit\"} 100"));

    let out = Command::new(BIN).args(["stats", "--reset", control.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let v = stats_json(&control);
    assert_eq!(v["totals"]["admitted"], 0);
    assert_eq!(v["connections"][0]["directions"][0]["bytes"], 0);
    assert_eq!(v["all_sessions"][0]["transit_ns"]["count"], 0);
    // The session itself goes on after a reset.
    pingpong::round_trips(&client, 64, 64, 10).unwrap();
    assert_eq!(stats_json(&control)["connections"][0]["directions"][0]["bytes"], 640);
    drop(relay);
}

/// Polls the control socket until `closed` sessions have closed (and none is live).
fn wait_closed(control: &std::path::Path, closed: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = stats_json(control);
        if v["totals"]["closed"] == closed && v["live"] == 0 {
            return v;
        }
        assert!(Instant::now() < deadline, "{closed} sessions never closed: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The "every session" figures keep the sessions that closed (they are folded into totals the
/// relay allocates at the first close), start again from zero after a reset, and fill again.
#[test]
fn closed_sessions_stay_in_the_every_session_figures() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (relay, listen, control) = start(d.path(), &server, &[]);
    let v = stats_json(&control);
    assert_eq!(v["all_sessions"][0]["transit_ns"]["count"], 0, "nothing closed yet: {v}");
    for (round_trips, closed) in [(30, 1), (20, 2)] {
        let client = net::connect(&listen).unwrap();
        pingpong::round_trips(&client, 64, 64, round_trips).unwrap();
        drop(client);
        wait_closed(&control, closed);
    }
    let v = stats_json(&control);
    for d in 0..2 {
        assert_eq!(v["all_sessions"][d]["transit_ns"]["count"], 50, "{v}");
        assert_eq!(v["all_sessions"][d]["bytes"], 50 * 64, "{v}");
    }
    let out = Command::new(BIN).args(["stats", "--reset", control.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(stats_json(&control)["all_sessions"][1]["transit_ns"]["count"], 0);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 5).unwrap();
    drop(client);
    let v = wait_closed(&control, 1);
    assert_eq!(v["all_sessions"][0]["transit_ns"]["count"], 5, "{v}");
    assert_eq!(v["all_sessions"][1]["bytes"], 5 * 64, "{v}");
    drop(relay);
}

#[test]
fn the_control_socket_refuses_another_uid() {
    let d = tmpdir();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (mut relay, _listen, control) = start(d.path(), &server, &[]);
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let as_nobody =
        || Command::new(BIN).args(["stats", control.to_str().unwrap()]).uid(65534).gid(65534).output().unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1), "file mode keeps nobody out");
    // Even with the file opened up, the peer-credential check refuses.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no stats for nobody");
    let log = relay.wait_log("control socket: refused", Duration::from_secs(5));
    assert!(log.contains("uid=65534"), "{log}");
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_long_lived_sessions_memory_does_not_grow_with_messages() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    // The interval log on (its per-connection samples are what could grow), in a file of its own:
    // the relay refuses anything but a regular file there.
    let hist = format!("--hist-log={}", d.path().join("h.hlog").display());
    let (relay, listen, control) = start(d.path(), &server, &[&hist, "--hist-interval=3600"]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 20_000).unwrap();
    let _ = ask(&control, "stats json");
    let early = rss_kib(relay.pid());
    let t = Instant::now();
    pingpong::round_trips(&client, 64, 64, 180_000).unwrap();
    let _ = ask(&control, "stats json");
    let late = rss_kib(relay.pid());
    eprintln!("relay RSS after 20k messages {early} KiB, after 200k {late} KiB ({:.1} s)", t.elapsed().as_secs_f64());
    assert!(late <= early + 64, "RSS grew from {early} KiB to {late} KiB over 180k messages");
    let v = stats_json(&control);
    assert_eq!(v["connections"][0]["directions"][0]["transit_ns"]["count"], 200_000);
}

#[test]
fn sigusr1_logs_every_live_connections_percentiles() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (mut relay, listen, _control) = start(d.path(), &server, &[]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 50).unwrap();
    relay.signal(nix::sys::signal::Signal::SIGUSR1);
    let log = relay.wait_log(": live l2c_bytes=", Duration::from_secs(5));
    let line = log.lines().find(|l| l.contains(" live ") && l.contains("l2c_transit_us=")).expect("a live line");
    assert!(line.contains("conn{id=1"), "{line}");
    assert!(!line.contains("l2c_transit_us=-"), "percentiles, not a dash: {line}");
}

/// The counters an operator reads while a session is live (SIGUSR1, `stats --json`) count its
/// bytes; both lines are `key=value` (no Rust struct), and the JSON names each direction.
#[test]
fn totals_count_the_live_session_in_key_value_lines_and_labelled_json() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (mut relay, listen, control) = start(d.path(), &server, &[]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 50).unwrap();
    let v = stats_json(&control);
    assert_eq!(v["totals"]["bytes"]["l2c"], 64 * 50, "{}", v["totals"]);
    assert_eq!(v["totals"]["bytes"]["c2l"], 64 * 50, "{}", v["totals"]);
    assert_eq!(
        v["totals"]["copy_bytes"]["l2c"].as_u64().unwrap() + v["totals"]["splice_bytes"]["l2c"].as_u64().unwrap(),
        64 * 50
    );
    relay.signal(nix::sys::signal::Signal::SIGUSR1);
    let log = relay.wait_log("SIGUSR1: totals", Duration::from_secs(5));
    let line = log.lines().find(|l| l.contains("SIGUSR1: totals")).unwrap();
    assert!(!line.contains('{') && !line.contains("Totals"), "key=value, not a struct: {line}");
    assert_eq!(field_u64(line, "live"), 1, "{line}");
    assert_eq!(field_u64(line, "admitted"), 1, "{line}");
    assert_eq!(field_u64(line, "l2c_bytes"), 64 * 50, "the live session's bytes: {line}");
    assert_eq!(field_u64(line, "c2l_bytes"), 64 * 50, "the live session's bytes: {line}");
    drop(client);
    relay.wait_log("closed end=", Duration::from_secs(5));
    let (status, log) = relay.stop();
    assert!(status.success(), "{log}");
    let line = log.lines().find(|l| l.contains(" stopped ")).unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    assert!(!line.contains('{') && !line.contains("Totals"), "key=value, not a struct: {line}");
    assert_eq!(field_u64(line, "closed"), 1, "{line}");
    assert_eq!(field_u64(line, "l2c_bytes"), 64 * 50, "{line}");
}

/// A peer the policy admits is counted admitted even when the far side cannot be reached, and
/// the dial failure reads the same whether the dial failed at once or later; refusals carry the
/// instance's name.
#[test]
fn a_failed_dial_counts_the_peer_admitted_and_refusals_carry_the_name() {
    let d = tmpdir();
    let nowhere = Endpoint::Unix(d.path().join("nobody-listens.sock"));
    let (mut relay, listen, control) = start(d.path(), &nowhere, &["--name=one-7", "--allow-uid=4242"]);
    // Root is refused by the allow-list (uid 4242 only) unless the test runs as 4242.
    let refused = net::connect(&listen).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = (&refused).read(&mut [0u8; 1]);
    let log = relay.wait_log("refused", Duration::from_secs(5));
    let line = log.lines().find(|l| l.contains(" refused ")).unwrap();
    assert_eq!(field(line, "name"), Some("one-7"), "{line}");
    let v = stats_json(&control);
    assert_eq!(v["totals"]["refused_access"], 1, "{}", v["totals"]);
    drop(relay);

    let (mut relay, listen, control) = start(d.path(), &nowhere, &["--name=one-7"]);
    let client = net::connect(&listen).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((&client).read(&mut [0u8; 1]).unwrap_or(0), 0, "the peer is closed");
    let log = relay.wait_log("cannot reach the far side", Duration::from_secs(5));
    let line = log.lines().find(|l| l.contains("cannot reach the far side")).unwrap();
    assert!(line.contains("conn{id=1"), "the session's span, as for a later dial failure: {line}");
    assert!(field(line, "error").is_some(), "{line}");
    let v = stats_json(&control);
    assert_eq!(v["totals"]["admitted"], 1, "{}", v["totals"]);
    assert_eq!(v["totals"]["dial_failed"], 1, "{}", v["totals"]);
}

/// `stats` aimed at a relay's data socket (not its control socket) puts no byte into the VM's
/// session: the relay admits it and dials the far side, the far side reads EOF and nothing else,
/// and `stats` says the path is not a control socket, exits 1, within a few seconds.
#[test]
fn stats_aimed_at_a_data_socket_sends_nothing_and_says_so() {
    let d = tmpdir();
    let server_ep = Endpoint::Unix(d.path().join("server.sock"));
    let server_listener = net::listen(&server_ep).unwrap();
    let (relay, listen, _control) = start(d.path(), &server_ep, &[]);
    let Endpoint::Unix(data) = &listen else { unreachable!() };
    let far = std::thread::spawn(move || {
        let s = net::accept(&server_listener).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = (&s).read_to_end(&mut got);
        got
    });
    let t0 = Instant::now();
    let out = Command::new(BIN).args(["stats", data.to_str().unwrap()]).output().unwrap();
    let took = t0.elapsed();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    let got = far.join().unwrap();
    assert_eq!(got, b"", "the far side of the data session received {:?}", String::from_utf8_lossy(&got));
    assert_eq!(out.status.code(), Some(1), "stats said: {said}");
    assert!(said.contains(&format!("{}: this is not a kvmi-relay control socket", data.display())), "{said}");
    assert!(took < Duration::from_secs(4), "stats took {took:?}");
    drop(relay);
}

/// `--metrics-textfile DIR`: every instance writes its Prometheus text there for node_exporter's
/// textfile collector; the files of two instances carry the same HELP and TYPE lines (the
/// collector merges them), pass `promtool check metrics`, count a session, and go on stop.
#[test]
fn metrics_textfiles_of_two_instances_merge_and_go_on_stop() {
    let d = tmpdir();
    let dir = d.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let echo = echo_server(d.path());
    let start = |name: &str| {
        Relay::start(&[
            &format!("--listen=unix:{}", d.path().join(format!("{name}.sock")).display()),
            &format!("--connect={echo}"),
            &format!("--name={name}"),
            &format!("--metrics-textfile={}", dir.display()),
        ])
    };
    let (a, b) = (start("one-7"), start("one-8"));
    let mut c = std::os::unix::net::UnixStream::connect(d.path().join("one-7.sock")).unwrap();
    std::io::Write::write_all(&mut c, b"ping").unwrap();
    let mut got = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut got).unwrap();
    drop(c);
    let file = |name: &str| dir.join(format!("kvmi-relay-{name}.prom"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Written at start, then every 10 s: wait for the one that counts the session.
    let text_a = loop {
        let t = std::fs::read_to_string(file("one-7")).unwrap_or_default();
        if t.contains("kvmi_relay_bytes_total{vm=\"one-7\",direction=\"l2c\"") && t.contains("strategy=\"copy\"} 4") {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "no counted session in the text file:\n{t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let text_b = std::fs::read_to_string(file("one-8")).unwrap();
    promtool_check(&text_a);
    promtool_check(&text_b);
    let meta = |t: &str| t.lines().filter(|l| l.starts_with("# ")).map(String::from).collect::<Vec<_>>();
    assert_eq!(meta(&text_a), meta(&text_b), "HELP/TYPE differ between instances");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "only the two files, no temporaries: {names:?}");
    let (st, _) = a.stop();
    assert!(st.success());
    assert!(!file("one-7").exists(), "removed on stop");
    assert!(file("one-8").exists(), "the other instance's file stays");
    drop(b);
}

/// Writes `request` at once (as an HTTP client does, before any greeting) and reads until EOF.
fn raw_exchange(control: &std::path::Path, request: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The names of the samples in a Prometheus text, labels and values left out.
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn the_control_socket_answers_get_metrics_over_http_and_the_line_protocol_beside_it() {
    let d = tmpdir();
    let server = slow_echo(d.path(), Duration::ZERO);
    let (relay, listen, control) = start(d.path(), &server, &["--name=one-7"]);
    let client = net::connect(&listen).unwrap();
    pingpong::round_trips(&client, 64, 64, 100).unwrap();

    // curl over the UNIX socket: a 200 with the same text `stats --prometheus` prints.
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "5", "--include", "--unix-socket"])
        .arg(&control)
        .arg("http://localhost/metrics")
        .output()
        .unwrap_or_else(|e| panic!("curl: {e} (install Debian's curl package: make deps)"));
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let response = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
    assert!(!body.contains("kvmi-relay control"), "the greeting must not reach an HTTP client: {body}");
    promtool_check(body);
    assert!(body.contains("kvmi_relay_bytes_total{vm=\"one-7\",direction=\"l2c\",strategy=\"copy\"} 6400"), "{body}");
    let line = Command::new(BIN).args(["stats", "--prometheus", control.to_str().unwrap()]).output().unwrap();
    assert!(line.status.success());
    assert_eq!(sample_names(body), sample_names(&String::from_utf8_lossy(&line.stdout)));

    // HEAD: the same head, no body.
    let head_only = raw_exchange(&control, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n") && head_only.ends_with("\r\n\r\n"), "{head_only}");

    // Other paths, methods and request lines: a status, never the metrics nor the greeting.
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
        (b"GET /metrics extra HTTP/1.1\r\n\r\n", "400 Bad Request"),
    ] {
        let got = raw_exchange(&control, request);
        assert!(got.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{:?}: {got}", String::from_utf8_lossy(request));
        assert!(!got.contains("kvmi_relay_") && !got.contains("kvmi-relay control"), "{got}");
    }
    // A head that never ends within the limit.
    let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'a', 9000));
    assert!(raw_exchange(&control, &long).starts_with("HTTP/1.1 431 "));

    // A line client that does not wait for the greeting is greeted, then answered.
    let got = raw_exchange(&control, b"stats json\n");
    let json_text = got.strip_prefix("kvmi-relay control 1\n").unwrap_or_else(|| panic!("no greeting first: {got}"));
    let v: serde_json::Value = serde_json::from_str(json_text).unwrap();
    assert_eq!(v["connections"][0]["directions"][0]["bytes"], 6400);
    // The session went on untouched by all of it.
    pingpong::round_trips(&client, 64, 64, 10).unwrap();
    assert_eq!(stats_json(&control)["connections"][0]["directions"][0]["bytes"], 7040);
    drop(relay);
}
