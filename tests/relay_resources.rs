//! Resources and lifecycle: no fd leak over thousands of admitted and refused peers; out of fds
//! the relay neither spins nor dies and recovers; SIGTERM delivers what is in the pipes.

mod util;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay::observe::metrics::{chunk_histogram, time_histogram};
use kvmi_relay_tools::peers::{data, net};
use util::*;

fn wait_fds(relay: &Relay, want: usize, patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    loop {
        let n = relay.fd_count();
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn thousands_of_admitted_and_refused_peers_leak_no_fd() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let relay = Relay::start(&[
        "--listen=tcp:127.0.0.1:0",
        "--allow-ip=127.0.0.2/32",
        &format!("--connect={echo}"),
        // Room for a session that is still closing inside the relay when the client's next
        // one arrives; the busy refusals below fill all four.
        "--max-conns=4",
    ]);
    let to = relay.bound_tcp();
    let baseline = relay.fd_count();

    for i in 0..2000u32 {
        let s = tcp_from("127.0.0.2", to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&s).write_all(&i.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        (&s).read_exact(&mut b).unwrap_or_else(|e| panic!("session {i}: {e}\n{}", relay.log()));
        assert_eq!(b, i.to_le_bytes());
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!((&s).read(&mut b).unwrap(), 0, "EOF travels back");
    }
    for _ in 0..1000 {
        let s = tcp_from("127.0.0.3", to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!((&s).read(&mut b).unwrap_or(0), 0);
    }
    // Over --max-conns: four held sessions, 500 more refused.
    std::thread::sleep(Duration::from_millis(100));
    let held: Vec<_> = (0..4)
        .map(|_| {
            let h = tcp_from("127.0.0.2", to).unwrap();
            (&h).write_all(b"held").unwrap();
            let mut b = [0u8; 4];
            (&h).read_exact(&mut b).unwrap();
            h
        })
        .collect();
    for _ in 0..500 {
        let s = tcp_from("127.0.0.2", to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!((&s).read(&mut b).unwrap_or(0), 0);
    }
    drop(held);
    let after = wait_fds(&relay, baseline, Duration::from_secs(5));
    assert_eq!(after, baseline, "open fds before {baseline}, after 3500 peers {after}");
}

fn cpu_ticks_over(relay: &Relay, window: Duration) -> u64 {
    let before = relay.cpu_ticks();
    std::thread::sleep(window);
    relay.cpu_ticks() - before
}

/// Out of fds with peers queued: the relay must neither spin nor die, must never take a peer it
/// cannot serve (accepted, then closed for want of an fd for the dial, with the far side blamed),
/// and must serve every waiting peer in turn as sessions close. Both parities of the fds left
/// after the sessions that fit (each holds two sockets) are tried: an odd count used to leave
/// one for `accept` and none for the dial. The limit is computed from a probe relay's fds, so an
/// fd inherited from the test runner cannot flip it.
fn out_of_fds(free_fds: usize) {
    const CLIENTS: usize = 40;
    let d = tmpdir();
    let echo = echo_server(d.path());
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let args = [format!("--listen={relay_ep}"), format!("--connect={echo}"), "--max-conns=100".to_string()];
    let probe = Relay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let limit = nofile_leaving(&probe, free_fds);
    drop(probe);
    let mut relay =
        Relay::start_with(Command::new("prlimit").arg(format!("--nofile={limit}:{limit}")).arg(BIN).args(&args));
    let baseline = relay.fd_count();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(net::connect(&relay_ep).expect("the kernel queues the connection"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let ticks = cpu_ticks_over(&relay, Duration::from_secs(1));
    let hz = 100; // USER_HZ on Linux
    assert!(ticks < hz / 5, "relay burned {ticks} ticks in 1 s while out of fds:\n{}", relay.log());

    // Every client is served in turn as the ones before it leave; none sees EOF unserved.
    for (i, s) in clients.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        if let Err(e) = (&s).read_exact(&mut b) {
            panic!("client {i} of {CLIENTS} was not served ({e}):\n{}", relay.log());
        }
        assert_eq!(&b, b"ping");
    }
    relay.wait_log("fds are back", Duration::from_secs(5));
    // Every session it built while out of fds was taken down whole.
    let after = wait_fds(&relay, baseline, Duration::from_secs(5));
    assert_eq!(after, baseline, "open fds before the flood {baseline}, after it {after}");
    let (status, log) = relay.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("cannot reach the far side"), "a peer was taken without an fd for its dial:\n{log}");
    let starts = log.lines().filter(|l| l.contains("out of fds: peers wait in the backlog")).count();
    assert_eq!(starts, 1, "one line when it starts, however long it lasts:\n{log}");
    let back = log.lines().find(|l| l.contains("fds are back")).unwrap();
    assert!(field_u64(back, "waited") >= 1, "{back}");
    let stopped = log.lines().find(|l| l.contains(" stopped")).expect("a stopped line");
    assert_eq!(field_u64(stopped, "dial_failed"), 0, "{stopped}");
    assert_eq!(field_u64(stopped, "admitted"), CLIENTS as u64, "{stopped}");
    assert_eq!(field_u64(stopped, "accept_pauses"), 1, "{stopped}");
}

#[test]
fn out_of_fds_with_an_even_count_left_peers_wait_and_are_served_in_turn() {
    out_of_fds(8);
}

#[test]
fn out_of_fds_with_an_odd_count_left_no_peer_is_taken_without_an_fd_for_its_dial() {
    out_of_fds(9);
}

/// An RLIMIT_NOFILE for a process that holds the fds `relay` holds and may open `more`: a new fd
/// takes the lowest free number, so the limit is one above the `more`-th free number (inherited
/// fds, from a test runner, may leave gaps).
fn nofile_leaving(relay: &Relay, more: usize) -> u32 {
    let used: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", relay.pid()))
        .expect("read relay fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    (0..).filter(|n| !used.contains(n)).nth(more - 1).expect("a free number") + 1
}

/// Under `--move auto` a direction into UNIX makes its pipe when its bulk starts, mid-session. A
/// relay out of fds then keeps that direction on copies and says so; the session goes on.
#[test]
fn bulk_that_finds_no_fd_for_a_pipe_keeps_copying() {
    const BULK_BYTES: usize = 4 << 20;
    let d = tmpdir();
    let probe_ep = Endpoint::Unix(d.path().join("probe.sock"));
    let probe = Relay::start(&[&format!("--listen={probe_ep}"), "--connect=unix:/nonexistent.sock"]);
    // Room for one session's two sockets and not one fd more.
    let limit = nofile_leaving(&probe, 2);
    drop(probe);
    let server_ep = Endpoint::Unix(d.path().join("server.sock"));
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let server_listener = net::listen(&server_ep).unwrap();
    let mut relay = Relay::start_with(Command::new("prlimit").args([
        &format!("--nofile={limit}:{limit}"),
        BIN,
        &format!("--listen={relay_ep}"),
        &format!("--connect={server_ep}"),
    ]));
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    let bulk: Vec<u8> = (0..BULK_BYTES).map(|i| (i % 251) as u8).collect();
    assert!(send_and_half_close(&server, &client, &bulk) == bulk, "bytes lost or changed:\n{}", relay.log());
    drop((client, server));
    let log = relay.wait_log("closed", Duration::from_secs(5));
    assert!(log.contains("no pipe for splicing"), "{log}");
    let line = closed_lines(&log).pop().unwrap();
    assert!(line.contains("end=\"finished\""), "{line}");
    assert_eq!(field_u64(&line, "c2l_copy_bytes"), BULK_BYTES as u64, "{line}");
    assert_eq!(field_u64(&line, "c2l_splice_bytes"), 0, "{line}");
}

#[test]
fn sigterm_delivers_the_bytes_already_in_the_pipes_then_exits_0() {
    let d = tmpdir();
    let server_ep = Endpoint::Unix(d.path().join("server.sock"));
    let server_listener = net::listen(&server_ep).unwrap();
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={server_ep}")]);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();

    // The server reads nothing yet: the client's bytes pile up in socket buffers and the pipe.
    let mut stream = data::Stream::new(5);
    let mut chunk = vec![0u8; 1 << 20];
    stream.fill(&mut chunk);
    client.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    let written = (&client).write(&chunk).unwrap();
    assert!(written > 0);
    std::thread::sleep(Duration::from_millis(200));

    relay.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    // Now the destination drains: everything the relay took must arrive, in order.
    let mut got = Vec::new();
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&server).read_to_end(&mut got).unwrap();
    // The peers end their sides on EOF, as KVMi's do; the relay waits for that before closing
    // (closing with their bytes unread would reset a TCP peer).
    drop((client, server));
    let (st, log) = relay.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "{log}");
    let line = closed_lines(&log).pop().unwrap_or_else(|| panic!("no close line:\n{log}"));
    assert!(line.contains("end=\"drained\""), "{line}");
    assert_eq!(got.len() as u64, field_u64(&line, "l2c_bytes"), "every byte the relay took was delivered: {line}");
    assert!(got[..] == chunk[..got.len()], "delivered bytes are the stream's prefix");
    assert!(field_u64(&line, "l2c_high_water") > 0);
}

#[test]
fn sigterm_with_a_destination_that_never_reads_still_exits_within_the_timeout() {
    let d = tmpdir();
    let server_ep = Endpoint::Unix(d.path().join("server.sock"));
    let server_listener = net::listen(&server_ep).unwrap();
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[
        &format!("--listen={relay_ep}"),
        &format!("--connect={server_ep}"),
        "--shutdown-timeout-ms=500",
    ]);
    let client = net::connect(&relay_ep).unwrap();
    let _server = net::accept(&server_listener).unwrap();
    client.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    let _ = (&client).write(&vec![1u8; 1 << 20]);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    let (st, log) = relay.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "{log}");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(2), "exit after {took:?}");
    assert!(log.contains("shutdown timeout"), "{log}");
}

/// One "Name:   N kB" line of /proc/PID/status, KiB.
fn status_kib(pid: i32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} line"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A relay from a UNIX socket into a TCP sink that reads everything, for bulk sessions into TCP
/// (the sessions whose copy buffers grow to --copy-buffer-max).
struct BulkIntoTcp {
    _dir: tempfile::TempDir,
    front: std::path::PathBuf,
    relay: Relay,
}

impl BulkIntoTcp {
    fn start() -> BulkIntoTcp {
        let dir = tmpdir();
        let (sink, at) = tcp_listener("127.0.0.1");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(s) = net::accept(&sink) {
                while matches!((&s).read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        let front = path_in(dir.path(), "relay.sock");
        let relay = Relay::start(&[&format!("--listen=unix:{}", front.display()), &format!("--connect=tcp:{at}")]);
        BulkIntoTcp { _dir: dir, front, relay }
    }

    /// One session of `chunks` × 128 KiB, ended by a half-close; returns its close line once
    /// the relay has logged it as its `n`-th.
    fn session(&mut self, chunks: usize, n: usize) -> String {
        let s = net::connect(&Endpoint::Unix(self.front.clone())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![0x5au8; 128 * 1024];
        for _ in 0..chunks {
            (&s).write_all(&chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        assert_eq!((&s).read(&mut b).unwrap(), 0, "the sink's EOF travels back");
        let log = self.relay.wait_log_count("closed", n, Duration::from_secs(10));
        let line = closed_lines(&log).pop().unwrap();
        assert!(field_u64(&line, "l2c_high_water") > 128 * 1024, "the buffer never grew, nothing tested: {line}");
        line
    }

    /// A /proc/PID/status figure once the loop turn that closed the last session has ended (it
    /// logs the close, then hands the session's heap back: reading between the two would catch
    /// the heap still held).
    fn settled_kib(&self, name: &str) -> u64 {
        std::thread::sleep(Duration::from_millis(50));
        status_kib(self.relay.pid(), name)
    }

    fn rss_kib(&self) -> u64 {
        self.settled_kib("VmRSS:")
    }

    /// RssAnon: heap, anonymous mappings, stack.
    fn anon_kib(&self) -> u64 {
        self.settled_kib("RssAnon:")
    }
}

#[test]
fn bulk_sessions_do_not_ratchet_the_relays_memory_up() {
    // Bulk into TCP grows a copy buffer to --copy-buffer-max (256 KiB) for its session. A relay
    // serves one VM for months: session after session, its resident memory must come back to
    // the same level, not climb by a buffer each time.
    let mut r = BulkIntoTcp::start();
    // The first bulk sessions leave a one-time step (measured: +128 KiB after the second, then
    // flat): histogram pages that now hold 256 KiB chunks, and the allocator keeping a freed
    // buffer's worth for reuse. Measure from after them: what must not happen is growth per session.
    const WARM_UP: usize = 2;
    for n in 1..=WARM_UP {
        r.session(128, n);
    }
    let settled = r.rss_kib();
    for n in WARM_UP + 1..=WARM_UP + 8 {
        r.session(128, n);
        let rss = r.rss_kib();
        assert!(
            // A buffer kept per session would add 256 KiB each time (2 MiB over 8); one-off
            // allocator steps stay under 512 (seen: +352 KiB once under a parallel test run).
            rss <= settled + 512,
            "after bulk session {n} the relay holds {rss} KiB, {} KiB more than after {WARM_UP}",
            rss - settled
        );
    }
}

#[test]
fn an_idle_relay_gives_a_finished_sessions_memory_back() {
    // A VM's relay spends most of its life idle between introspection sessions. Once the last
    // session has closed, the heap it used (buffers, histograms) goes back to the kernel.
    // Anonymous memory only: code pages a session runs for the first time (libc, and libm's
    // log2 in this test build) stay mapped and are no leak. What may stay is the relay's
    // lifetime totals of closed sessions, allocated at the first close: four time histograms
    // of 34,816 B and two size histograms of 19,456 B (174 KiB). Measured: +184 KiB with the
    // heap handed back, +364 KiB without (the session's histograms and first copy buffer).
    let counts = |h: hdrhistogram::Histogram<u64>| h.distinct_values() as u64 * 8;
    let totals_kib = (4 * counts(time_histogram()) + 2 * counts(chunk_histogram())) / 1024;
    assert_eq!(totals_kib, 174, "the histograms' size changed: update the figures above");
    let mut r = BulkIntoTcp::start();
    let idle = r.anon_kib();
    r.session(256, 1);
    let anon = r.anon_kib();
    eprintln!("anonymous memory: idle {idle} KiB, after one 32 MiB bulk session {anon} KiB");
    assert!(
        anon <= idle + totals_kib + 80,
        "idle again, the relay holds {anon} KiB of anonymous memory, {} KiB more than before its \
         session (the closed-session totals account for {totals_kib})",
        anon - idle
    );
}

#[test]
fn a_relay_that_never_served_holds_no_session_state() {
    // One relay per VM, and a VM's hypervisor usually keeps a single session open for the VM's
    // life: the closed-session totals (174 KiB of histograms) are made at the first close, not
    // at start-up. Measured: 280–284 KiB of anonymous memory at idle (heap, stack, tracing and
    // clap's leftovers) in this test build; 456 KiB with the totals made at start-up.
    let r = BulkIntoTcp::start();
    let idle = r.anon_kib();
    eprintln!("anonymous memory of an idle relay that never served: {idle} KiB");
    assert!(idle <= 384, "an idle relay holds {idle} KiB of anonymous memory");
}
