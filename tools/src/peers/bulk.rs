//! Bidirectional checksummed transfer: send N seeded bytes in random-size writes and a
//! half-close, while receiving and checking exactly M bytes and then EOF.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use socket2::Socket;

use super::data::Stream;

#[derive(Debug, Clone, Copy)]
pub struct BulkSpec {
    pub send_bytes: u64,
    pub expect_bytes: u64,
    pub send_seed: u64,
    pub expect_seed: u64,
    /// Largest single write; sizes are drawn uniformly from 1..=max_write_bytes.
    pub max_write_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct BulkReport {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
}

/// Runs the transfer on `sock` (blocking). Err says what went wrong, with the offset of the
/// first wrong byte where there is one.
pub fn run(sock: Socket, spec: BulkSpec) -> Result<BulkReport, String> {
    let start = Instant::now();
    let writer = sock.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let mut stream = Stream::new(spec.send_seed);
        let mut rng = fastrand::Rng::with_seed(spec.send_seed ^ 0x9e37_79b9);
        let mut buf = vec![0u8; spec.max_write_bytes.max(1)];
        let mut sent = 0u64;
        let mut w = &writer;
        while sent < spec.send_bytes {
            let n = rng.usize(1..=buf.len()).min((spec.send_bytes - sent) as usize);
            stream.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).map_err(|e| format!("write at offset {sent}: {e}"))?;
            sent += n as u64;
        }
        writer.shutdown(Shutdown::Write).map_err(|e| format!("shutdown(SHUT_WR): {e}"))?;
        Ok(sent)
    });

    let mut check = Stream::new(spec.expect_seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    let mut r = &sock;
    let recv_result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if received + n as u64 > spec.expect_bytes {
                    break Err(format!("received more than the {} bytes expected", spec.expect_bytes));
                }
                if let Err(off) = check.check(&buf[..n]) {
                    break Err(format!("byte {off} differs from what was sent (lost, duplicated or reordered)"));
                }
                received += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(format!("read at offset {received}: {e}")),
        }
    };
    let sent = sender.join().map_err(|_| "sender thread panicked".to_string())?;
    recv_result?;
    let sent = sent?;
    if received != spec.expect_bytes {
        return Err(format!("EOF after {received} of {} expected bytes", spec.expect_bytes));
    }
    Ok(BulkReport { sent, received, elapsed: start.elapsed() })
}
