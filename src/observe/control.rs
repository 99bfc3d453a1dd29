//! The control socket (`--control PATH`) and its client (`kvmi-relay stats PATH`).
//!
//! Protocol: the relay speaks first, one greeting line (`GREETING`); the client sends nothing
//! until it has read it, so a client aimed at a data socket by mistake puts no byte into a VM's
//! session: it hears no greeting, gives up after `GREETING_WAIT_MS` and says the path is not a
//! control socket. After the greeting the client sends one line — `stats text`, `stats json`,
//! `stats prometheus` or `reset` — and reads the answer until EOF. The socket file is created 0600 and every client is
//! checked with the same peer-credential decision as a UNIX listener (`access::decide`): only
//! the relay's own uid and root. Control connections are tiny state machines like the relayed
//! ones: they never touch the poller, the event loop registers them; a slow or silent client is
//! dropped at its deadline and can never stall the data path.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::Interest;
use socket2::Socket;

use crate::access::{self, Peer, Policy, Verdict};
use crate::error::StartError;
use crate::escape::Escaped;
use crate::net::listener::{SocketFile, bind_unix, unix_peer};

/// Control clients served at once; more are closed at accept.
pub const CONTROL_CONNS_MAX: usize = 4;
/// A control client has this long to send its request and take the answer.
const CONTROL_DEADLINE_MS: u64 = 2000;
/// Longest request line.
const REQUEST_MAX_BYTES: usize = 256;
/// The first line the relay writes to every admitted control client.
pub const GREETING: &[u8] = b"kvmi-relay control 1\n";
/// How long a client waits for the greeting before it says the path is not a control socket.
const GREETING_WAIT_MS: u64 = 1000;
/// The control socket's mode: owner only.
const CONTROL_MODE: u32 = 0o600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Prometheus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stats(Format),
    Reset,
}

impl Request {
    pub fn parse(line: &str) -> Option<Request> {
        match line.trim() {
            "stats" | "stats text" => Some(Request::Stats(Format::Text)),
            "stats json" => Some(Request::Stats(Format::Json)),
            "stats prometheus" => Some(Request::Stats(Format::Prometheus)),
            "reset" => Some(Request::Reset),
            _ => None,
        }
    }

    /// The request in what a client sent: its first line (whatever follows is ignored), or
    /// all of it when no newline came before EOF or the length cap; bytes that are not UTF-8
    /// make it no request.
    pub fn from_bytes(sent: &[u8]) -> Option<Request> {
        let line = String::from_utf8_lossy(&sent[..sent.iter().position(|&b| b == b'\n').unwrap_or(sent.len())]);
        Request::parse(&line)
    }
}

pub struct ControlServer {
    socket: Socket,
    _file: SocketFile,
    policy: Policy,
    pub path: PathBuf,
}

impl ControlServer {
    pub fn bind(path: &Path) -> Result<ControlServer, StartError> {
        let endpoint = format!("--control {}", path.display());
        let (socket, file) = bind_unix(&endpoint, path, CONTROL_MODE, None)?;
        socket.listen(8).map_err(|source| StartError::Listen { endpoint: endpoint.clone(), source })?;
        socket.set_nonblocking(true).map_err(|source| StartError::Listen { endpoint, source })?;
        let own = nix::unistd::Uid::effective().as_raw();
        let policy = Policy { uids: vec![own, 0], ..Policy::default() };
        Ok(ControlServer { socket, _file: file, policy, path: path.to_path_buf() })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Accepts one pending client: Ok(None) when none is pending; Err(peer) when refused.
    pub fn accept(&self, now: Instant) -> io::Result<Option<Result<ControlConn, Peer>>> {
        let (sock, _) = match self.socket.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let peer = unix_peer(&sock)?;
        if let Verdict::Deny(_) = access::decide(&self.policy, &peer) {
            return Ok(Some(Err(peer)));
        }
        sock.set_nonblocking(true)?;
        // A fresh socket's send buffer always takes the short greeting whole.
        let sent = sock.send_with_flags(GREETING, libc::MSG_NOSIGNAL)?;
        if sent != GREETING.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "control client: greeting cut short"));
        }
        Ok(Some(Ok(ControlConn {
            sock,
            request: Vec::new(),
            answer: Vec::new(),
            written: 0,
            answered: false,
            deadline: now + Duration::from_millis(CONTROL_DEADLINE_MS),
        })))
    }
}

/// One control client.
pub struct ControlConn {
    sock: Socket,
    request: Vec<u8>,
    answer: Vec<u8>,
    written: usize,
    answered: bool,
    pub deadline: Instant,
}

/// What a control connection needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlStep {
    /// A complete request: the loop answers it with `answer`.
    Request(Option<Request>),
    Waiting,
    Done,
}

impl ControlConn {
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn interest(&self) -> Interest {
        if self.answered { Interest::WRITABLE } else { Interest::READABLE }
    }

    /// Reads the request (edge-triggered: until WouldBlock) or writes the answer.
    pub fn advance(&mut self) -> io::Result<ControlStep> {
        if self.answered {
            return self.flush();
        }
        let mut buf = [0u8; 128];
        loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => return Ok(ControlStep::Request(self.parsed())),
                Ok(n) => {
                    self.request.extend_from_slice(&buf[..n]);
                    if self.request.contains(&b'\n') || self.request.len() > REQUEST_MAX_BYTES {
                        return Ok(ControlStep::Request(self.parsed()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ControlStep::Waiting),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn parsed(&self) -> Option<Request> {
        Request::from_bytes(&self.request)
    }

    /// Queues the answer and starts writing it.
    pub fn answer(&mut self, text: String) -> io::Result<ControlStep> {
        self.answer = text.into_bytes();
        self.answered = true;
        self.flush()
    }

    fn flush(&mut self) -> io::Result<ControlStep> {
        while self.written < self.answer.len() {
            match self.sock.send_with_flags(&self.answer[self.written..], libc::MSG_NOSIGNAL) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ControlStep::Waiting),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ControlStep::Done)
    }
}

/// What `kvmi-relay stats` asks for (its flags, from `cli::StatsArgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsFormat {
    Text,
    Json,
    Prometheus,
    /// Zero the counters and histograms instead.
    Reset,
}

/// Asks a relay and prints its answer; exit code 0 on an answer, 1 otherwise.
pub fn stats(path: &Path, format: StatsFormat) -> i32 {
    let line = match format {
        StatsFormat::Reset => "reset",
        StatsFormat::Json => "stats json",
        StatsFormat::Prometheus => "stats prometheus",
        StatsFormat::Text => "stats text",
    };
    match ask(path, line) {
        Ok(answer) if answer.is_empty() => {
            eprintln!(
                "kvmi-relay stats: {} closed without an answer (only the relay's own uid and root may ask)",
                Escaped(path.display())
            );
            1
        }
        Ok(answer) if answer.starts_with("error:") => {
            eprintln!("kvmi-relay stats: {}", Escaped(answer.trim_end()));
            1
        }
        Ok(answer) => {
            print!("{answer}");
            0
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            eprintln!("kvmi-relay stats: {}: this is not a kvmi-relay control socket ({e})", Escaped(path.display()));
            1
        }
        Err(e) => {
            eprintln!("kvmi-relay stats: {}: {e}", Escaped(path.display()));
            1
        }
    }
}

/// Reads the relay's greeting: nothing is sent before it. Not a control socket (no greeting
/// within `GREETING_WAIT_MS`, or another first line) is `ErrorKind::InvalidData`.
fn await_greeting(s: &mut std::os::unix::net::UnixStream) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_millis(GREETING_WAIT_MS)))?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let not_control = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    while got.len() < GREETING.len() {
        match s.read(&mut byte) {
            Ok(0) if got.is_empty() => {
                return Err(not_control(
                    "closed without a greeting; a control socket closes only clients other than the relay's own uid and root"
                        .into(),
                ));
            }
            Ok(0) => break,
            Ok(_) => {
                got.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(not_control(format!("no greeting within {GREETING_WAIT_MS} ms")));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                return Err(not_control("reset without a greeting".into()));
            }
            Err(e) => return Err(e),
        }
    }
    if got != GREETING {
        return Err(not_control(format!("its first bytes were \"{}\"", Escaped(String::from_utf8_lossy(&got)))));
    }
    Ok(())
}

/// Waits for the greeting, sends one request line and reads the answer until EOF.
pub fn ask(path: &Path, line: &str) -> io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    await_greeting(&mut s)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    match s.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        // A refused client is closed at once; a reset says the same as an empty answer.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(String::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("stats\n"), Some(Request::Stats(Format::Text)));
        assert_eq!(Request::parse("stats json"), Some(Request::Stats(Format::Json)));
        assert_eq!(Request::parse("stats prometheus"), Some(Request::Stats(Format::Prometheus)));
        assert_eq!(Request::parse("reset"), Some(Request::Reset));
        assert_eq!(Request::parse("rm -rf /"), None);
    }
}
