//! The workloads: one session each, client on this thread, server on a thread of its own that
//! accepts exactly one connection. The KVMi workloads are the project's fake pair (every byte
//! checked); ping-pong is the project's echo; bulk is a byte counter (its payload is not checked
//! here: tests/relay_data.rs does that, and a checker would cap the rate below the relay's).
//! Only the KVMi pair ends a session with EOF (the unhook signal, which every contender passes
//! on); the others count bytes, because half-closes fare differently through socat and proxyd.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::{kvmi, net, pingpong};
use socket2::Socket;

/// A session that takes longer than this has hung: fail instead of waiting forever.
const IO_TIMEOUT_S: u64 = 60;
const BULK_WRITE_BYTES: usize = 128 * 1024;
const BULK_READ_BYTES: usize = 256 * 1024;
pub const PINGPONG_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 64-byte messages echoed back: round-trip time.
    PingPong,
    /// Sequential READ_PHYSICAL: 24 B request → 4112 B page.
    Passive,
    /// PAUSE_VCPU events: 552 B event → 24 B reply.
    Active,
    /// Bytes one way (client → server), then EOF.
    BulkOne,
    /// Bytes both ways at once.
    BulkBoth,
}

impl Workload {
    pub const ALL: [Workload; 5] =
        [Workload::PingPong, Workload::Passive, Workload::Active, Workload::BulkOne, Workload::BulkBoth];
    pub fn name(self) -> &'static str {
        match self {
            Workload::PingPong => "pingpong-64B",
            Workload::Passive => "passive-vmi",
            Workload::Active => "active-vmi",
            Workload::BulkOne => "bulk-one-way",
            Workload::BulkBoth => "bulk-both-ways",
        }
    }
    pub fn is_bulk(self) -> bool {
        matches!(self, Workload::BulkOne | Workload::BulkBoth)
    }

    /// Speaks KVMi end to end (the fake hypervisor and introspector).
    pub fn is_kvmi(self) -> bool {
        matches!(self, Workload::Passive | Workload::Active)
    }
}

/// Operations per session.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub round_trips: u64,
    pub reads: u64,
    pub events: u32,
    /// Per direction.
    pub bulk_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    /// Round-trip times in ns (latency workloads).
    pub rtt: Option<Histogram<u64>>,
    /// Round trips, reads, events or bytes (both directions added for BulkBoth).
    pub ops: u64,
    pub elapsed: Duration,
    /// Peak RSS (VmHWM) of the serving process(es) during the session, read before it closes.
    pub peak_rss_kib: u64,
    /// From the client's connect to the server's accept: every hop's accept and dial on the way,
    /// and the TLS handshake where the chain's link is TLS (each hop dials on accept).
    pub setup: Duration,
}

fn timeouts(s: &Socket) -> Result<(), String> {
    let t = Some(Duration::from_secs(IO_TIMEOUT_S));
    s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).map_err(|e| format!("socket timeouts: {e}"))
}

enum Served {
    Nothing,
    Introspector(Box<kvmi::IntrospectorReport>),
    Bytes(u64),
}

/// Serves one session; returns when it accepted, and what it served.
fn serve(w: Workload, sizes: Sizes, listener: Socket) -> Result<(Instant, Served), String> {
    // A client that fails before its relay dials must not leave this thread in accept forever.
    listener.set_read_timeout(Some(Duration::from_secs(IO_TIMEOUT_S))).map_err(|e| format!("accept timeout: {e}"))?;
    let mut s = net::accept(&listener).map_err(|e| format!("accept: {e}"))?;
    let accepted = Instant::now();
    timeouts(&s)?;
    serve_accepted(w, sizes, &mut s).map(|served| (accepted, served))
}

fn serve_accepted(w: Workload, sizes: Sizes, s: &mut Socket) -> Result<Served, String> {
    match w {
        Workload::PingPong => echo(s, sizes.round_trips * PINGPONG_BYTES as u64).map(|()| Served::Nothing),
        Workload::Passive | Workload::Active => {
            let (reads, events) = if w == Workload::Passive { (sizes.reads, 0) } else { (0, sizes.events) };
            kvmi::run_introspector(s, reads, events)
                .map(|r| Served::Introspector(Box::new(r)))
                .map_err(|e| format!("fake introspector: {e}"))
        }
        Workload::BulkOne => {
            let n = take(s, sizes.bulk_bytes)?;
            // One byte back says "all here": the client's clock stops on it.
            (&*s).write_all(b"!").map_err(|e| format!("ack: {e}"))?;
            Ok(Served::Bytes(n))
        }
        Workload::BulkBoth => {
            let n = both_ways(s, sizes.bulk_bytes)?;
            Ok(Served::Bytes(n))
        }
    }
}

/// Echoes exactly `bytes`, then closes: the session's end never waits on a half-close, which
/// socat with KVMIveggur's `end-close` does not pass on.
fn echo(s: &Socket, bytes: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    let (mut r, mut w) = (s, s);
    while done < bytes {
        let want = buf.len().min((bytes - done) as usize);
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("echo: EOF after {done} of {bytes} bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("echo: read after {done} bytes: {e}")),
        };
        w.write_all(&buf[..n]).map_err(|e| format!("echo: write: {e}"))?;
        done += n as u64;
    }
    Ok(())
}

/// Reads exactly `bytes` (bulk ends are counted, not signalled by EOF: systemd-socket-proxyd
/// closes both ways on the first EOF, so a half-close would cut its other direction short).
fn take(s: &Socket, bytes: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; BULK_READ_BYTES];
    let mut total = 0u64;
    let mut r = s;
    while total < bytes {
        let want = buf.len().min((bytes - total) as usize);
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("EOF after {total} of {bytes} bytes")),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        }
    }
    Ok(total)
}

/// Writes `bytes`.
fn pour(s: &Socket, bytes: u64) -> Result<(), String> {
    let buf = vec![0xa5u8; BULK_WRITE_BYTES];
    let mut left = bytes;
    let mut w = s;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        w.write_all(&buf[..n]).map_err(|e| format!("write with {left} bytes left: {e}"))?;
        left -= n as u64;
    }
    Ok(())
}

/// Sends `bytes` while receiving `bytes`; returns the bytes received.
fn both_ways(s: &Socket, bytes: u64) -> Result<u64, String> {
    let w = s.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    let writer = std::thread::spawn(move || pour(&w, bytes));
    let got = take(s, bytes);
    writer.join().map_err(|_| "writer thread panicked".to_string())??;
    got
}

/// Runs one session of `w` through `dial` against a server accepting on `listener`.
/// `sample_rss` is called while the session is still open.
pub fn session(
    w: Workload,
    sizes: Sizes,
    listener: &Socket,
    dial: &Endpoint,
    sample_rss: &dyn Fn() -> u64,
) -> Result<Outcome, String> {
    let l = listener.try_clone().map_err(|e| format!("clone listener: {e}"))?;
    let server = std::thread::spawn(move || serve(w, sizes, l));
    let client = client(w, sizes, dial, sample_rss);
    let served = server.join().map_err(|_| "server thread panicked".to_string())?;
    let ((dialled, mut out), (accepted, served)) = match (client, served) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) => return Err(format!("client: {e}")),
        (_, Err(e)) => return Err(format!("server: {e}")),
    };
    out.setup = accepted.saturating_duration_since(dialled);
    match (w, served) {
        (Workload::Passive, Served::Introspector(r)) => {
            out.ops = r.reads;
            out.elapsed = r.passive_elapsed;
            out.rtt = Some(r.read_rtt);
        }
        (Workload::Active, Served::Introspector(r)) => {
            if r.events != u64::from(sizes.events) {
                return Err(format!("{} events answered, {} raised", r.events, sizes.events));
            }
            out.elapsed = r.active_elapsed;
        }
        (Workload::BulkOne, Served::Bytes(n)) | (Workload::BulkBoth, Served::Bytes(n)) => {
            if n != sizes.bulk_bytes {
                return Err(format!("server received {n} of {} bytes", sizes.bulk_bytes));
            }
        }
        (Workload::PingPong, Served::Nothing) => {}
        _ => return Err("server and client disagree on the workload".into()),
    }
    Ok(out)
}

/// The client's side of one session; returns when it began to dial, and what it measured.
fn client(
    w: Workload,
    sizes: Sizes,
    dial: &Endpoint,
    sample_rss: &dyn Fn() -> u64,
) -> Result<(Instant, Outcome), String> {
    let dialled = Instant::now();
    let mut sock = net::connect_retrying(dial, Duration::from_secs(5)).map_err(|e| format!("dial {dial}: {e}"))?;
    timeouts(&sock)?;
    let mut out = Outcome { rtt: None, ops: 0, elapsed: Duration::ZERO, peak_rss_kib: 0, setup: Duration::ZERO };
    match w {
        Workload::PingPong => {
            let t = Instant::now();
            let h = pingpong::round_trips(&sock, PINGPONG_BYTES, PINGPONG_BYTES, sizes.round_trips)
                .map_err(|e| format!("ping-pong: {e}"))?;
            out.elapsed = t.elapsed();
            out.ops = sizes.round_trips;
            out.rtt = Some(h);
            out.peak_rss_kib = sample_rss();
        }
        Workload::Passive | Workload::Active => {
            let hv = kvmi::serve_hypervisor(&mut sock, "one-7").map_err(|e| format!("fake hypervisor: {e}"))?;
            out.peak_rss_kib = sample_rss();
            if w == Workload::Active {
                out.ops = hv.events;
                out.rtt = Some(hv.event_rtt);
            }
        }
        Workload::BulkOne => {
            let t = Instant::now();
            pour(&sock, sizes.bulk_bytes)?;
            take(&sock, 1)?;
            out.elapsed = t.elapsed();
            out.ops = sizes.bulk_bytes;
            out.peak_rss_kib = sample_rss();
        }
        Workload::BulkBoth => {
            let t = Instant::now();
            let got = both_ways(&sock, sizes.bulk_bytes)?;
            out.elapsed = t.elapsed();
            out.peak_rss_kib = sample_rss();
            if got != sizes.bulk_bytes {
                return Err(format!("client received {got} of {} bytes", sizes.bulk_bytes));
            }
            out.ops = 2 * sizes.bulk_bytes;
        }
    }
    Ok((dialled, out))
}
