//! `copy loop`: the least a copying relay can cost, as a contender. One blocking `read` →
//! `write_all` loop per direction through a 256 KiB buffer (the relay's largest copy buffer),
//! TCP_NODELAY on TCP, no poller, no access checks, no histograms, one session at a time.
//!
//! It answers one question for the CPU targets: how much of a relay's CPU per GiB is the kernel's
//! (copy in, copy out, TCP, on loopback also the receiver's softirq work) and how much is the
//! relay's own. It is not a relay anyone should deploy.
//!
//! Invariants:
//! - Both directions run on threads that live as long as the process, so every nanosecond they
//!   spend stays in /proc/PID/task/*/schedstat, where the harness reads CPU (an exited thread's
//!   time would vanish from there).
//! - EOF on one side becomes shutdown(SHUT_WR) on the other; the session ends when both
//!   directions have ended, and only then is the next connection accepted.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use socket2::Socket;

const BUFFER_BYTES: usize = 256 * 1024;

/// `kvmi-relay-bench copy-loop LISTEN CONNECT`: serves sessions until killed.
pub fn main(args: &[String]) -> Result<(), String> {
    let [listen, connect] = args else {
        return Err("usage: kvmi-relay-bench copy-loop LISTEN CONNECT".into());
    };
    let listen = Endpoint::parse(listen).map_err(|e| format!("copy-loop LISTEN: {e}"))?;
    let connect = Endpoint::parse(connect).map_err(|e| format!("copy-loop CONNECT: {e}"))?;
    let listener = net::listen(&listen).map_err(|e| format!("listen {listen}: {e}"))?;

    // The second direction's thread, fed one session at a time.
    let (to_worker, work) = mpsc::channel::<(Socket, Socket)>();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for (from, to) in work {
            pump(&from, &to);
            if done.send(()).is_err() {
                return;
            }
        }
    });

    loop {
        let client = net::accept(&listener).map_err(|e| format!("accept on {listen}: {e}"))?;
        let Ok(server) = net::connect(&connect) else { continue };
        let clone = |s: &Socket| s.try_clone().map_err(|e| format!("dup a session socket: {e}"));
        to_worker.send((clone(&server)?, clone(&client)?)).map_err(|_| "the copy thread is gone")?;
        pump(&client, &server);
        finished.recv().map_err(|_| "the copy thread is gone")?;
    }
}

/// Copies `from` → `to` until EOF or an error, then shuts `to` for writing.
fn pump(mut from: &Socket, mut to: &Socket) {
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
