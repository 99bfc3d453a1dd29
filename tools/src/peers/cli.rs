//! Hidden subcommands exposing the fake peers, for tests, benches, the demo and the test guest.
//! Each prints one summary line a person and a script can both read, and exits non-zero on any
//! mismatch.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::{bulk, kvmi, net, pingpong};
use kvmi_relay::net::endpoint::Endpoint;

fn endpoint(text: &str) -> Result<Endpoint, String> {
    Endpoint::parse(text)
}

#[derive(Debug, Clone, Args)]
pub struct FakeHypervisorArgs {
    /// Where the relay (or the introspector) listens.
    #[arg(long, value_parser = endpoint)]
    pub connect: Endpoint,
    /// VM name sent in the handshake.
    #[arg(long, default_value = "one-7")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct FakeIntrospectorArgs {
    #[arg(long, value_parser = endpoint)]
    pub listen: Endpoint,
    /// Sequential 4 KiB READ_PHYSICAL requests (passive VMI).
    #[arg(long, default_value = "5000")]
    pub reads: u64,
    /// PAUSE_VCPU events answered one by one (active VMI).
    #[arg(long, default_value = "2000")]
    pub events: u32,
    /// After the bursts, one WRITE_PHYSICAL (8 bytes at 0x1000); its error code is printed as
    /// `write_err=N` (-1 = EPERM: a read-only relay answered it).
    #[arg(long)]
    pub try_write: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    pub what: PeerCommand,
}

#[derive(Debug, Clone, Args)]
pub struct Side {
    /// Dial this endpoint...
    #[arg(long, value_parser = endpoint, conflicts_with = "listen", required_unless_present = "listen")]
    pub connect: Option<Endpoint>,
    /// ...or listen here and take one connection.
    #[arg(long, value_parser = endpoint)]
    pub listen: Option<Endpoint>,
}

impl Side {
    fn open(&self) -> std::io::Result<socket2::Socket> {
        match (&self.connect, &self.listen) {
            (Some(ep), _) => net::connect_retrying(ep, Duration::from_secs(5)),
            (None, Some(ep)) => net::accept(&net::listen(ep)?),
            (None, None) => unreachable!("clap requires one of them"),
        }
    }
    fn is_listener(&self) -> bool {
        self.connect.is_none()
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum PeerCommand {
    /// Send N seeded bytes (random write sizes) and half-close, while checking M received bytes
    /// and EOF. Seeds default to 1 (dialler sends) and 2 (listener sends).
    Bulk {
        #[command(flatten)]
        side: Side,
        #[arg(long)]
        send_bytes: u64,
        #[arg(long)]
        expect_bytes: u64,
        #[arg(long)]
        send_seed: Option<u64>,
        #[arg(long)]
        expect_seed: Option<u64>,
        #[arg(long, default_value = "65536")]
        max_write: usize,
    },
    /// Echo server: echoes each connection until EOF; serves `count` connections (0 = forever).
    Echo {
        #[arg(long, value_parser = endpoint)]
        listen: Endpoint,
        #[arg(long, default_value = "0")]
        count: u64,
    },
    /// Round trips of `size` bytes against an echo server; prints percentiles.
    Pingpong {
        #[arg(long, value_parser = endpoint)]
        connect: Endpoint,
        #[arg(long, default_value = "64")]
        size: usize,
        #[arg(long, default_value = "10000")]
        count: u64,
    },
    /// Dial, send one byte, and succeed only if the far side closes without a byte back
    /// (a refused peer); exit 1 if anything comes back or nothing happens within 5 s.
    ExpectRefused {
        #[arg(long, value_parser = endpoint)]
        connect: Endpoint,
    },
    /// Dial, send up to `bytes` bytes (fewer if the far side stops taking them for 1 s: every
    /// buffer on the way is then full), then close with a reset (SO_LINGER 0).
    Reset {
        #[arg(long, value_parser = endpoint)]
        connect: Endpoint,
        #[arg(long, default_value = "4096")]
        bytes: usize,
    },
}

fn fail(what: &str, e: impl std::fmt::Display) -> i32 {
    println!("{what} FAIL: {e}");
    1
}

pub fn fake_hypervisor(a: FakeHypervisorArgs) -> i32 {
    let mut sock = match net::connect_retrying(&a.connect, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return fail("fake-hypervisor", format!("dial {}: {e}", a.connect)),
    };
    match kvmi::serve_hypervisor(&mut sock, &a.name) {
        Ok(r) => {
            println!(
                "fake-hypervisor ok commands={} events={} writes={} event_rtt {}",
                r.commands,
                r.events,
                r.writes,
                pingpong::summary(&r.event_rtt)
            );
            0
        }
        Err(e) => fail("fake-hypervisor", e),
    }
}

pub fn fake_introspector(a: FakeIntrospectorArgs) -> i32 {
    let mut sock = match net::listen(&a.listen).and_then(|l| net::accept(&l)) {
        Ok(s) => s,
        Err(e) => return fail("fake-introspector", format!("listen {}: {e}", a.listen)),
    };
    match kvmi::run_introspector(&mut sock, a.reads, a.events) {
        Ok(r) => {
            let write = if a.try_write {
                match try_write(&mut sock) {
                    Ok(err) => format!(" write_err={err}"),
                    Err(e) => return fail("fake-introspector", format!("WRITE_PHYSICAL: {e}")),
                }
            } else {
                String::new()
            };
            let ops = r.reads as f64 / r.passive_elapsed.as_secs_f64().max(1e-9);
            println!(
                "fake-introspector ok vm={} reads={} ops_per_s={ops:.0} read_rtt {} events={}{write}",
                r.vm_name,
                r.reads,
                pingpong::summary(&r.read_rtt),
                r.events
            );
            0
        }
        Err(e) => fail("fake-introspector", e),
    }
}

/// One WRITE_PHYSICAL on a session past its handshake; its reply's error code.
fn try_write(sock: &mut socket2::Socket) -> std::io::Result<i32> {
    // A seq the bursts never use.
    const SEQ: u32 = 0xffff_0000;
    let mut req = Vec::new();
    req.extend_from_slice(&0x1000u64.to_le_bytes());
    req.extend_from_slice(&8u64.to_le_bytes());
    req.extend_from_slice(b"tampered");
    kvmi::write_msg(sock, kvmi::ID_WRITE_PHYSICAL, SEQ, &req)?;
    let mut body = Vec::new();
    let hdr = kvmi::read_msg(sock, &mut body)?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "EOF before the reply"))?;
    if hdr.id != kvmi::ID_WRITE_PHYSICAL || hdr.seq != SEQ || body.len() < 8 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reply id {} seq {} with {} bytes", hdr.id, hdr.seq, body.len()),
        ));
    }
    Ok(i32::from_le_bytes(body[0..4].try_into().expect("4 bytes")))
}

pub fn peer(a: PeerArgs) -> i32 {
    match a.what {
        PeerCommand::Bulk { side, send_bytes, expect_bytes, send_seed, expect_seed, max_write } => {
            let (s, e) = if side.is_listener() { (2, 1) } else { (1, 2) };
            let spec = bulk::BulkSpec {
                send_bytes,
                expect_bytes,
                send_seed: send_seed.unwrap_or(s),
                expect_seed: expect_seed.unwrap_or(e),
                max_write_bytes: max_write,
            };
            let sock = match side.open() {
                Ok(s) => s,
                Err(e) => return fail("bulk", e),
            };
            match bulk::run(sock, spec) {
                Ok(r) => {
                    println!("bulk ok sent={} received={} seconds={:.3}", r.sent, r.received, r.elapsed.as_secs_f64());
                    0
                }
                Err(e) => fail("bulk", e),
            }
        }
        PeerCommand::Echo { listen, count } => {
            let l = match net::listen(&listen) {
                Ok(l) => l,
                Err(e) => return fail("echo", format!("listen {listen}: {e}")),
            };
            let mut served = 0;
            while count == 0 || served < count {
                match net::accept(&l) {
                    Ok(s) => {
                        let _ = pingpong::echo(&s);
                        served += 1;
                    }
                    Err(e) => return fail("echo", e),
                }
            }
            0
        }
        PeerCommand::Pingpong { connect, size, count } => {
            let sock = match net::connect_retrying(&connect, Duration::from_secs(5)) {
                Ok(s) => s,
                Err(e) => return fail("pingpong", e),
            };
            match pingpong::round_trips(&sock, size, size, count) {
                Ok(h) => {
                    println!("pingpong ok size={size} {}", pingpong::summary(&h));
                    0
                }
                Err(e) => fail("pingpong", e),
            }
        }
        PeerCommand::ExpectRefused { connect } => match expect_refused(&connect) {
            Ok(()) => {
                println!("refused ok");
                0
            }
            Err(e) => fail("expect-refused", e),
        },
        PeerCommand::Reset { connect, bytes } => match reset(&connect, bytes) {
            Ok(sent) => {
                println!("reset ok sent={sent}");
                0
            }
            Err(e) => fail("reset", e),
        },
    }
}

/// Sends up to `bytes` (stopping once writes stall for 1 s), then resets; returns what was sent.
fn reset(ep: &Endpoint, bytes: usize) -> std::io::Result<usize> {
    let s = net::connect(ep)?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        match std::io::Write::write(&mut &s, &chunk[..chunk.len().min(bytes - sent)]) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    s.set_linger(Some(Duration::ZERO))?;
    Ok(sent)
}

/// The relay closes a refused peer without sending it a byte.
pub fn expect_refused(ep: &Endpoint) -> Result<(), String> {
    let s = net::connect(ep).map_err(|e| format!("dial {ep}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    // The write may fail if the relay already closed us: that is a refusal too.
    let _ = std::io::Write::write_all(&mut &s, b"x");
    let mut b = [0u8; 1];
    match std::io::Read::read(&mut &s, &mut b) {
        Ok(0) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE)) => Ok(()),
        Ok(_) => Err("a byte came back: the peer was admitted".into()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err("nothing happened within 5 s: not refused".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}
