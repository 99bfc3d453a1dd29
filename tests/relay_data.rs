//! The data path against real sockets: every pair of endpoint kinds this host can run, 256 MiB
//! each way at once with random write sizes, checked byte for byte at both ends; which
//! strategy moved each direction (splice, or copies into TCP) proven by the relay's own
//! per-strategy counters; half-close, reset, backpressure, far side down.

mod util;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::bulk::{self, BulkSpec};
use kvmi_relay_tools::peers::net;
use util::*;

const BULK_BYTES: u64 = 256 << 20;

fn allow_args(listen: &Endpoint) -> Vec<String> {
    match listen {
        Endpoint::Tcp(_) => vec!["--allow-ip=127.0.0.1/32,::1/128".into()],
        _ => vec![],
    }
}

/// Runs a full bidirectional transfer client → relay → server and returns the relay's close line.
/// TCP endpoints may say port 0: the server's listener and the relay pick ephemeral ports.
fn bulk_through(listen: Endpoint, connect: Endpoint, extra: &[&str], bytes: u64) -> String {
    let server_listener = net::listen(&connect).expect("server listens");
    let connect = match connect {
        Endpoint::Tcp(_) => Endpoint::Tcp(server_listener.local_addr().unwrap().as_socket().unwrap()),
        other => other,
    };
    let server = std::thread::spawn(move || {
        let sock = net::accept(&server_listener).expect("server accepts");
        bulk::run(
            sock,
            BulkSpec { send_bytes: bytes, expect_bytes: bytes, send_seed: 2, expect_seed: 1, max_write_bytes: 100_000 },
        )
    });
    let mut args = vec![format!("--listen={listen}"), format!("--connect={connect}")];
    args.extend(allow_args(&listen));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = Relay::start(&args);
    let listen = match listen {
        Endpoint::Tcp(_) => Endpoint::Tcp(relay.bound_tcp()),
        other => other,
    };

    let client = net::connect(&listen).expect("client dials the relay");
    let started = Instant::now();
    let mine = bulk::run(
        client,
        BulkSpec { send_bytes: bytes, expect_bytes: bytes, send_seed: 1, expect_seed: 2, max_write_bytes: 100_000 },
    );
    let theirs = server.join().expect("server thread");
    let mine = mine.unwrap_or_else(|e| panic!("client side: {e}\n{}", relay.log()));
    let theirs = theirs.unwrap_or_else(|e| panic!("server side: {e}\n{}", relay.log()));
    assert_eq!((mine.sent, mine.received, theirs.sent, theirs.received), (bytes, bytes, bytes, bytes));
    eprintln!("{listen} -> {connect}: {} MiB each way in {:.2} s", bytes >> 20, started.elapsed().as_secs_f64());

    let log = relay.wait_log("closed", Duration::from_secs(10));
    let (status, _) = relay.stop();
    assert!(status.success(), "relay exit {status}:\n{log}");
    if let Endpoint::Unix(p) = &listen {
        assert!(!p.exists(), "the listening socket file must be removed on a clean exit");
    }
    let closed = closed_lines(&log);
    assert_eq!(closed.len(), 1, "one session, one close line:\n{log}");
    let line = closed[0].clone();
    assert!(line.contains("end=\"finished\""), "{line}");
    assert_eq!(field_u64(&line, "l2c_bytes"), bytes, "{line}");
    assert_eq!(field_u64(&line, "c2l_bytes"), bytes, "{line}");
    line
}

fn unix(dir: &tempfile::TempDir, name: &str) -> Endpoint {
    Endpoint::Unix(dir.path().join(name))
}

fn tcp4() -> Endpoint {
    Endpoint::Tcp("127.0.0.1:0".parse().unwrap())
}

fn tcp6() -> Endpoint {
    Endpoint::Tcp("[::1]:0".parse().unwrap())
}

/// How the relay's counters say a direction moved its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    Spliced,
    Copied,
    /// `--move auto` into UNIX (copy-then-splice): copies until the first read fills the copy
    /// buffer, splice from then on. Bulk fills it at once; short reads before that are copied
    /// too, so up to `COPIED_BEFORE_SPLICE_MAX_BYTES` may be.
    CopiedThenSpliced,
}

/// Of a bulk transfer into UNIX under `--move auto`, most bytes copied before the direction
/// moves to splice (the first buffer is 16 KiB, at most `--pipe-size`).
const COPIED_BEFORE_SPLICE_MAX_BYTES: u64 = 1 << 20;

/// The bytes of `dir` ("l2c" or "c2l") a close line counts as copied and as spliced; they must
/// add up to all its bytes.
fn copied_and_spliced(line: &str, dir: &str) -> (u64, u64) {
    let all = field_u64(line, &format!("{dir}_bytes"));
    let spliced = field_u64(line, &format!("{dir}_splice_bytes"));
    let copied = field_u64(line, &format!("{dir}_copy_bytes"));
    assert_eq!(spliced + copied, all, "{dir}: splice + copy must add up to every byte: {line}");
    (copied, spliced)
}

/// Every byte of `dir` ("l2c" or "c2l") went the way `how` says.
fn assert_moved(line: &str, dir: &str, how: Moved) {
    let (copied, spliced) = copied_and_spliced(line, dir);
    let ok = match how {
        Moved::Spliced => copied == 0,
        Moved::Copied => spliced == 0,
        Moved::CopiedThenSpliced => copied > 0 && copied <= COPIED_BEFORE_SPLICE_MAX_BYTES && spliced > 0,
    };
    assert!(ok, "{dir} should be {how:?}: {line}");
}

/// Most bytes `dir` held at once: above its store's 64 KiB start only if the store grew.
fn high_water(line: &str, dir: &str) -> u64 {
    field_u64(line, &format!("{dir}_high_water"))
}

/// Bulk grew `dir`'s store (pipe or copy buffer) past its 64 KiB start.
fn assert_store_grew(line: &str, dir: &str) {
    let hw = high_water(line, dir);
    assert!(hw > 64 * 1024, "{dir} held at most {hw} bytes: its store never grew: {line}");
}

/// `dir` never held more than `ceiling` bytes.
fn assert_held_at_most(line: &str, dir: &str, ceiling: u64) {
    let hw = high_water(line, dir);
    assert!(hw <= ceiling, "{dir} held {hw} bytes, over its ceiling {ceiling}: {line}");
}

// Default (`--move auto`): into TCP copies through a growing buffer, which makes bigger segments
// (docs/DESIGN.md, "Into TCP: copies"); into UNIX, copies until a read fills the buffer, then
// splice ("Messages copy, bulk splices"). l2c writes to the --connect side, c2l back to the peer.

#[test]
fn unix_to_unix_256mib_each_way_copied_then_spliced() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), unix(&d, "server.sock"), &[], BULK_BYTES);
    assert_moved(&line, "l2c", Moved::CopiedThenSpliced);
    assert_moved(&line, "c2l", Moved::CopiedThenSpliced);
    // Bulk grows the pipes past their 64 KiB start (up to --pipe-size-max, 1 MiB).
    assert_store_grew(&line, "l2c");
    assert_store_grew(&line, "c2l");
}

#[test]
fn pipe_ceiling_is_kept() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), unix(&d, "server.sock"), &["--pipe-size-max=65536"], 64 << 20);
    assert_held_at_most(&line, "l2c", 65536);
    assert_held_at_most(&line, "c2l", 65536);
}

#[test]
fn unix_to_tcp4_256mib_each_way_copied_into_tcp_spliced_into_unix() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), tcp4(), &[], BULK_BYTES);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_store_grew(&line, "l2c");
    assert_moved(&line, "c2l", Moved::CopiedThenSpliced);
}

#[test]
fn tcp4_to_unix_256mib_each_way_spliced_into_unix_copied_into_tcp() {
    let d = tmpdir();
    let line = bulk_through(tcp4(), unix(&d, "server.sock"), &[], BULK_BYTES);
    assert_moved(&line, "l2c", Moved::CopiedThenSpliced);
    assert_moved(&line, "c2l", Moved::Copied);
    assert_store_grew(&line, "c2l");
}

#[test]
fn tcp6_to_tcp4_256mib_each_way_copied() {
    let line = bulk_through(tcp6(), tcp4(), &[], BULK_BYTES);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_moved(&line, "c2l", Moved::Copied);
}

#[test]
fn tcp4_to_tcp6_256mib_each_way_copied() {
    let line = bulk_through(tcp4(), tcp6(), &[], BULK_BYTES);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_moved(&line, "c2l", Moved::Copied);
}

#[test]
fn forced_splice_mode_splices_into_tcp_too() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), tcp4(), &["--move=splice"], 64 << 20);
    assert_moved(&line, "l2c", Moved::Spliced);
    assert_moved(&line, "c2l", Moved::Spliced);
}

#[test]
fn copy_buffer_ceiling_is_kept() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), tcp4(), &["--copy-buffer-max=131072"], 64 << 20);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_held_at_most(&line, "l2c", 131072);
}

#[test]
fn forced_copy_mode_moves_everything_by_copy() {
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), tcp4(), &["--move=copy"], 32 << 20);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_moved(&line, "c2l", Moved::Copied);
}

#[test]
fn pipe_growth_the_kernel_refuses_keeps_relaying() {
    // An unprivileged relay (every instance of the unit runs as one unprivileged user) may not
    // grow a pipe past fs.pipe-max-size, nor past its user's fs.pipe-user-pages-soft budget:
    // F_SETPIPE_SZ fails with EPERM. Asked for twice pipe-max-size, the relay as uid 65534 must
    // stop at pipe-max-size, log the refusal once per direction and still deliver every byte.
    // (Root may exceed both limits, so the relay under test must not be root.)
    if !precondition(
        nix::unistd::geteuid().is_root(),
        "pipe_growth_the_kernel_refuses_keeps_relaying",
        "root (to start the relay as uid 65534)",
    ) {
        return;
    }
    const NOBODY: u32 = 65534;
    const BYTES: usize = 64 << 20;
    /// How long both readers hold off: a pipe grows only when a splice fills it, i.e. while its
    /// destination lags. With readers that keep up (a loaded machine, where the relay runs
    /// seldom and the readers drain everything) no pipe ever asked to grow in 2 of 10 runs.
    const READERS_WAIT_MS: u64 = 300;
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size").unwrap().trim().parse().unwrap();
    let d = tmpdir();
    nix::unistd::chown(d.path(), Some(NOBODY.into()), Some(NOBODY.into())).expect("chown the test directory");
    let (relay_ep, server_ep) = (unix(&d, "relay.sock"), unix(&d, "server.sock"));
    let server_listener = net::listen(&server_ep).expect("server listens");
    if let Endpoint::Unix(p) = &server_ep {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).expect("chmod the server's socket");
    }
    let mut relay = Relay::start_with(
        std::process::Command::new(BIN)
            .args([
                &format!("--listen={relay_ep}"),
                &format!("--connect={server_ep}"),
                "--allow-uid=0",
                &format!("--pipe-size-max={}", 2 * max),
            ])
            .uid(NOBODY)
            .gid(NOBODY),
    );
    let client = net::connect(&relay_ep).expect("client dials the relay");
    let server = net::accept(&server_listener).expect("server accepts");
    let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
    let writers: Vec<_> = [&client, &server]
        .map(|sock| {
            let (s, b) = (sock.try_clone().unwrap(), data.clone());
            std::thread::spawn(move || {
                (&s).write_all(&b).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            })
        })
        .into();
    std::thread::sleep(Duration::from_millis(READERS_WAIT_MS));
    let server_reader = {
        let s = server.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            (&s).read_to_end(&mut got).map(|_| got)
        })
    };
    let mut at_client = Vec::new();
    (&client).read_to_end(&mut at_client).unwrap_or_else(|e| panic!("client reads: {e}\n{}", relay.log()));
    let at_server = server_reader.join().unwrap().unwrap_or_else(|e| panic!("server reads: {e}\n{}", relay.log()));
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert!(at_client == data && at_server == data, "bytes lost or changed:\n{}", relay.log());
    drop((client, server));
    let log = relay.wait_log("closed", Duration::from_secs(10));
    let line = closed_lines(&log).pop().unwrap_or_else(|| panic!("no close line:\n{log}"));
    assert_moved(&line, "l2c", Moved::CopiedThenSpliced);
    assert_moved(&line, "c2l", Moved::CopiedThenSpliced);
    // Grown up to the kernel's limit, refused there once per direction, and no further.
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("pipe not grown")).collect();
    assert_eq!(refusals.len(), 2, "one refusal per direction:\n{log}");
    for dir in ["l2c", "c2l"] {
        assert!(refusals.iter().any(|l| l.contains(&format!("direction=\"{dir}\""))), "{dir} refusal:\n{log}");
        assert_eq!(high_water(&line, dir), max, "{dir} stops at fs.pipe-max-size: {line}");
    }
}

#[test]
fn small_pipe_and_tiny_writes_still_deliver_in_order() {
    // A one-page pipe runs out of slots long before it runs out of bytes: the pump must wait for
    // the drain and never lose track of bytes still in the socket.
    let d = tmpdir();
    // The ceiling keeps it one page: pipes grow under bulk otherwise.
    let line = bulk_through(
        unix(&d, "relay.sock"),
        unix(&d, "server.sock"),
        &["--pipe-size=4096", "--pipe-size-max=4096"],
        16 << 20,
    );
    assert_moved(&line, "l2c", Moved::CopiedThenSpliced);
    assert_moved(&line, "c2l", Moved::CopiedThenSpliced);
    assert_held_at_most(&line, "l2c", 4096);
    assert_held_at_most(&line, "c2l", 4096);
}

#[test]
fn copy_buffer_growing_from_one_page_still_delivers_in_order() {
    // Into TCP the copy buffer starts at --pipe-size and doubles while reads fill it, moving the
    // bytes it holds each time: 4 KiB → 256 KiB is six moves, all under random write sizes.
    let d = tmpdir();
    let line = bulk_through(unix(&d, "relay.sock"), tcp4(), &["--pipe-size=4096"], 16 << 20);
    assert_moved(&line, "l2c", Moved::Copied);
    assert_store_grew(&line, "l2c");
}

/// Relay unix:relay.sock → unix:server.sock with a server listener the test drives by hand.
fn manual_pair(d: &tempfile::TempDir) -> (Relay, socket2::Socket, Endpoint) {
    let server_ep = unix(d, "server.sock");
    let server_listener = net::listen(&server_ep).unwrap();
    let relay_ep = unix(d, "relay.sock");
    let relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={server_ep}")]);
    (relay, server_listener, relay_ep)
}

/// `--move auto` into UNIX: KVMi's request/answer messages are copied (a short read proves the
/// socket empty, so each costs one system call fewer than a splice, which must read on until
/// `WouldBlock`); the first burst that fills the 16 KiB buffer moves the direction to splice,
/// and message-sized reads after it move it back to copies.
#[test]
fn kvmi_sized_messages_into_unix_are_copied_bulk_between_them_spliced() {
    const ROUNDS: u64 = 200;
    const REQUEST_BYTES: usize = 24;
    const ANSWER_BYTES: u64 = 4112;
    const BULK_BYTES: usize = 8 << 20;
    /// Answers after the bulk that may still be spliced: the pump's SHORT_SPLICES_TO_COPY.
    const SPLICED_ANSWERS_MAX: u64 = 16;
    let d = tmpdir();
    let (mut relay, server_listener, relay_ep) = manual_pair(&d);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    let request_answer = |rounds: u64| {
        let (request, answer) = (vec![0x11u8; REQUEST_BYTES], vec![0x22u8; ANSWER_BYTES as usize]);
        let (mut got_request, mut got_answer) = (request.clone(), answer.clone());
        for _ in 0..rounds {
            (&client).write_all(&request).unwrap();
            (&server).read_exact(&mut got_request).unwrap();
            (&server).write_all(&answer).unwrap();
            (&client).read_exact(&mut got_answer).unwrap();
            assert!(got_request == request && got_answer == answer);
        }
    };
    request_answer(ROUNDS);
    let bulk: Vec<u8> = (0..BULK_BYTES).map(|i| (i % 251) as u8).collect();
    let writer = {
        let (s, b) = (server.try_clone().unwrap(), bulk.clone());
        std::thread::spawn(move || (&s).write_all(&b).unwrap())
    };
    let mut back = vec![0u8; BULK_BYTES];
    (&client).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == bulk, "the bulk between the messages lost or changed bytes");
    request_answer(ROUNDS);
    drop((client, server));
    let log = relay.wait_log("closed", Duration::from_secs(5));
    let line = closed_lines(&log).pop().unwrap_or_else(|| panic!("no close line:\n{log}"));
    assert_moved(&line, "l2c", Moved::Copied);
    assert_eq!(field_u64(&line, "l2c_bytes"), 2 * ROUNDS * REQUEST_BYTES as u64, "{line}");
    let (copied, spliced) = copied_and_spliced(&line, "c2l");
    assert!(spliced >= BULK_BYTES as u64 - COPIED_BEFORE_SPLICE_MAX_BYTES, "the bulk spliced: {line}");
    let answers = 2 * ROUNDS * ANSWER_BYTES;
    assert!(copied >= answers - SPLICED_ANSWERS_MAX * ANSWER_BYTES, "answers before and after the bulk copied: {line}");
    assert!(copied <= answers + COPIED_BEFORE_SPLICE_MAX_BYTES, "the bulk copied at most its start: {line}");
}

#[test]
fn half_close_travels_and_the_other_direction_keeps_flowing() {
    let d = tmpdir();
    let (mut relay, server_listener, relay_ep) = manual_pair(&d);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();

    // Client says its piece and half-closes.
    (&client).write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The server sees the bytes, then EOF...
    let mut got = Vec::new();
    (&server).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    // ...and only then answers with 8 MiB: the reverse direction must still flow.
    let answer: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
    assert!(
        send_and_half_close(&server, &client, &answer) == answer,
        "reverse direction after a half-close lost or changed bytes"
    );
    let log = relay.wait_log("closed", Duration::from_secs(5));
    assert!(log.contains("end=\"finished\""), "{log}");
}

#[test]
fn half_close_from_the_far_side_travels_back() {
    let d = tmpdir();
    let (mut relay, server_listener, relay_ep) = manual_pair(&d);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    (&server).write_all(b"event").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    (&client).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"event");
    (&client).write_all(b"reply after EOF").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut r = Vec::new();
    (&server).read_to_end(&mut r).unwrap();
    assert_eq!(r, b"reply after EOF");
    relay.wait_log("end=\"finished\"", Duration::from_secs(5));
}

#[test]
fn reset_mid_stream_tears_the_pair_down_and_the_next_session_works() {
    let d = tmpdir();
    let (mut relay, server_listener, relay_ep) = manual_pair(&d);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    (&client).write_all(&[1u8; 1000]).unwrap();
    let mut buf = [0u8; 1000];
    (&server).read_exact(&mut buf).unwrap();
    // A UNIX socket closed with unread data resets its peer.
    (&server).write_all(&[2u8; 5000]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(client);
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    // The far side is a UNIX peer: it cannot be sent a reset, and learns of the teardown as the
    // end of its stream, at once (a timeout here would mean the pair was left standing).
    let r = (&server).read_to_end(&mut rest);
    assert!(r.is_ok(), "a UNIX far side sees its stream end, not {r:?}");
    assert!(rest.is_empty(), "no byte may arrive after the reset: {}", rest.len());
    relay.wait_log("closed end=\"failed\"", Duration::from_secs(5));

    // The relay keeps serving.
    let client2 = net::connect(&relay_ep).unwrap();
    let server2 = net::accept(&server_listener).unwrap();
    (&client2).write_all(b"again").unwrap();
    let mut b = [0u8; 5];
    (&server2).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"again");
}

/// A reset from the far side is passed on as a reset where the peer's family has one: both
/// peers TCP, the client's read fails with ECONNRESET (a clean EOF would tell it the session
/// ended normally).
#[test]
fn tcp_reset_reaches_the_other_side_as_a_reset() {
    let (server_listener, addr) = tcp_listener("127.0.0.1");
    let relay = Relay::start(&["--listen=tcp:127.0.0.1:0", "--allow-ip=127.0.0.1", &format!("--connect=tcp:{addr}")]);
    let client = std::net::TcpStream::connect(relay.bound_tcp()).unwrap();
    let server = net::accept(&server_listener).unwrap();
    let mut relay = relay;
    (&client).write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    (&server).read_exact(&mut b).unwrap();
    server.set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let r = (&client).read_to_end(&mut rest);
    let e = r.expect_err("the client must see a reset, not a clean end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(rest.is_empty());
    relay.wait_log("end=\"failed\"", Duration::from_secs(5));
}

/// A UNIX peer cannot be sent a reset: when the TCP far side resets, it sees its stream end at
/// once, and the session is counted as failed.
#[test]
fn tcp_reset_ends_a_unix_peers_session_at_once() {
    let (server_listener, addr) = tcp_listener("127.0.0.1");
    let server_ep = Endpoint::Tcp(addr);
    let d = tmpdir();
    let relay_ep = unix(&d, "relay.sock");
    let mut relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={server_ep}")]);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    (&client).write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    (&server).read_exact(&mut b).unwrap();
    server.set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let r = (&client).read_to_end(&mut rest);
    assert!(r.is_ok(), "the end of the stream, not a timeout: {r:?}");
    assert!(rest.is_empty());
    relay.wait_log("end=\"failed\"", Duration::from_secs(5));
}

/// A TCP peer's urgent byte (MSG_OOB) is a byte of the stream like any other: it arrives, in
/// its place (without SO_OOBINLINE the kernel would hold it out of band and the relay, reading
/// the stream, would drop it).
#[test]
fn urgent_data_from_a_tcp_peer_arrives_in_order() {
    let d = tmpdir();
    let server_ep = unix(&d, "server.sock");
    let server_listener = net::listen(&server_ep).unwrap();
    let mut relay =
        Relay::start(&["--listen=tcp:127.0.0.1:0", "--allow-ip=127.0.0.1", &format!("--connect={server_ep}")]);
    let client = tcp_from("127.0.0.1", relay.bound_tcp()).unwrap();
    let server = net::accept(&server_listener).unwrap();
    client.send(b"ab").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    client.send_out_of_band(b"c").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    client.send(b"de").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    (&server).read_to_end(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "abcde");
    drop((server, client));
    relay.wait_log("closed end=", Duration::from_secs(5));
}

#[test]
fn a_stalled_reader_blocks_only_its_own_direction() {
    let d = tmpdir();
    let (mut relay, server_listener, relay_ep) = manual_pair(&d);
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    // The client floods the server, which reads nothing: buffers and the pipe fill up.
    let flooder = {
        let c = client.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 16];
            let mut sent = 0usize;
            c.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
            while (&c).write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile the server → client direction must keep flowing: 16 MiB of events.
    let events = vec![9u8; 16 << 20];
    let sender = {
        let s = server.try_clone().unwrap();
        let e = events.clone();
        std::thread::spawn(move || (&s).write_all(&e).unwrap())
    };
    let mut got = vec![0u8; events.len()];
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&client).read_exact(&mut got).expect("the reverse direction must not stall");
    sender.join().unwrap();
    assert!(got == events);
    let flooded = flooder.join().unwrap();
    // Now the server reads: everything the flooder got into the relay arrives, nothing lost.
    client.shutdown(Shutdown::Write).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match (&server).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == 7));
                total += n;
            }
            Err(e) => panic!("server read: {e}"),
        }
    }
    assert!(total >= flooded, "the server got {total} bytes but the client wrote {flooded}");
    drop(server);
    relay.wait_log("closed", Duration::from_secs(5));
}

#[test]
fn far_side_down_at_dial_time_closes_the_peer_and_keeps_serving() {
    let d = tmpdir();
    let server_ep = unix(&d, "server.sock");
    let relay_ep = unix(&d, "relay.sock");
    let mut relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={server_ep}")]);
    let client = net::connect(&relay_ep).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!((&client).read(&mut b).unwrap_or(0), 0, "the peer must be closed when the far side is down");
    relay.wait_log("cannot reach the far side", Duration::from_secs(5));

    // The far side comes up (as QEMU's reconnect=10 would find it): the next dial works.
    let server_listener = net::listen(&server_ep).unwrap();
    let client = net::connect(&relay_ep).unwrap();
    let server = net::accept(&server_listener).unwrap();
    (&client).write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    (&server).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
}

#[test]
fn dial_timeout_closes_the_peer() {
    // A loopback TCP listener whose accept queue is full drops further SYNs, so the relay's
    // connect stays pending until its timeout (no address off this host is ever dialled).
    let d = tmpdir();
    let blackhole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    blackhole.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    blackhole.listen(0).unwrap();
    let addr = blackhole.local_addr().unwrap().as_socket().unwrap();
    // Fill the backlog (SYNs beyond it are dropped, so the relay's connect stays pending).
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    let relay_ep = unix(&d, "relay.sock");
    let mut relay =
        Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect=tcp:{addr}"), "--connect-timeout-ms=300"]);
    let client = net::connect(&relay_ep).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 1];
    let n = (&client).read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    relay.wait_log("dial timed out", Duration::from_secs(2));
    assert!(t.elapsed() >= Duration::from_millis(250), "closed before the timeout");
}

/// `sessions` short sessions through a relay from `listen` to `connect`: the client sends a
/// message and its FIN back to back, the server answers with a message and closes at once. In
/// each direction the data and the FIN usually reach the relay in one readiness event, which is
/// what a reader that stops after a short read must not lose.
fn message_then_fin_sessions(listen: Endpoint, connect: Endpoint, sessions: usize) {
    let server_listener = net::listen(&connect).expect("server listens");
    let connect = match connect {
        Endpoint::Tcp(_) => Endpoint::Tcp(server_listener.local_addr().unwrap().as_socket().unwrap()),
        other => other,
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(s) = net::accept(&server_listener) {
            let mut got = 0;
            while let Ok(n) = (&s).read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            // Answer with the count, then close: data and FIN leave together.
            let _ = (&s).write_all(&(got as u32).to_le_bytes());
        }
    });
    let mut args = vec![format!("--listen={listen}"), format!("--connect={connect}"), "--max-conns=4".into()];
    args.extend(allow_args(&listen));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start(&args);
    let listen = match listen {
        Endpoint::Tcp(_) => Endpoint::Tcp(relay.bound_tcp()),
        other => other,
    };
    for i in 0..sessions {
        let c = net::connect(&listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = vec![0x42u8; 24 + i % 4089];
        (&c).write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        (&c).read_to_end(&mut answer).unwrap_or_else(|e| panic!("session {i}: {e}\n{}", relay.log()));
        assert_eq!(
            answer,
            (msg.len() as u32).to_le_bytes(),
            "session {i}: the message, its FIN, the answer and its FIN"
        );
    }
}

#[test]
fn message_and_fin_together_through_copies_into_tcp() {
    let d = tmpdir();
    // l2c copies into TCP; the answer comes back spliced into UNIX.
    message_then_fin_sessions(unix(&d, "relay.sock"), tcp4(), 300);
    // c2l copies into TCP; the request goes spliced into UNIX.
    message_then_fin_sessions(tcp4(), unix(&d, "server.sock"), 300);
    // Both directions copy.
    message_then_fin_sessions(tcp4(), tcp6(), 300);
}
