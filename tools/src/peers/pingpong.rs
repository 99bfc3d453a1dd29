//! Round trips: a client that sends fixed-size messages and times each echo; an echo server.

use std::io::{Read, Write};
use std::time::Instant;

use hdrhistogram::Histogram;
use socket2::Socket;

/// Echoes everything back until EOF, then half-closes.
pub fn echo(sock: &Socket) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let (mut r, mut w) = (sock, sock);
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
    sock.shutdown(std::net::Shutdown::Write)?;
    Ok(total)
}

/// Sends `count` messages of `request` bytes, each answered by `reply` bytes, strictly one at a
/// time; returns the round-trip histogram in nanoseconds. With an echo server request == reply.
pub fn round_trips(sock: &Socket, request: usize, reply: usize, count: u64) -> std::io::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid");
    let msg = vec![0x5au8; request];
    let mut back = vec![0u8; reply];
    let (mut r, mut w) = (sock, sock);
    for _ in 0..count {
        let t = Instant::now();
        w.write_all(&msg)?;
        r.read_exact(&mut back)?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(hist)
}

/// One line a person and a test both read: `n=... p50_us=... p90_us=... p99_us=... p999_us=... max_us=...`.
pub fn summary(hist: &Histogram<u64>) -> String {
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "n={} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        hist.len(),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        hist.max() as f64 / 1000.0
    )
}
