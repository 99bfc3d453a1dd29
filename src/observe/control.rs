//! The control socket (`--control PATH`) and its client (`kvmi-relay stats PATH`).
//!
//! Two dialects on one socket, told apart by who speaks first:
//! - The relay's own line protocol. The relay speaks first, one greeting line (`GREETING`),
//!   `GREETING_DELAY_MS` after the accept; the client sends nothing until it has read it, so a
//!   client aimed at a data socket by mistake puts no byte into a VM's session: it hears no
//!   greeting, gives up after `GREETING_WAIT_MS` and says the path is not a control socket.
//!   After the greeting the client sends one line — `stats text`, `stats json`,
//!   `stats prometheus` or `reset` — and reads the answer until EOF. A line sent before the
//!   greeting is served the same way (greeting, then answer).
//! - HTTP/1.x, for `curl --unix-socket` and Prometheus's UNIX-socket scraping: an HTTP client
//!   speaks first, so a first line that ends in ` HTTP/1.x` within the delay (or at any time
//!   before the greeting) is a request head; `GET /metrics` (or `HEAD`) is answered with the
//!   Prometheus text and `Connection: close`, anything else with a 4xx status, never the greeting.
//!
//! The socket file is created 0600 and every client is checked with the same peer-credential
//! decision as a UNIX listener (`access::decide`): only the relay's own uid and root. Control
//! connections are tiny state machines like the relayed ones: they never touch the poller, the
//! event loop registers them and calls `on_timer` at `next_deadline`; a slow or silent client
//! is dropped at its deadline and can never stall the data path. Turned-away clients are counted
//! by `Refusal` and logged through a `RateLimit` (at most one line a second per reason).
//!
//! Slots (`slot_for`): one process (SO_PEERCRED pid) holds at most `CONTROL_CONNS_PER_PROCESS_MAX`
//! of the `CONTROL_CONNS_MAX`, so one process that floods the socket always leaves a slot to the
//! others (each `kvmi-relay stats` is a process of its own). Past that, or when every slot is
//! taken, a newcomer is served in the place of a client that has not asked anything yet: same-uid
//! clients that connect and stay silent replace each other instead of keeping the operator out
//! until their deadline. A client whose request is complete (waiting for its answer, or being
//! answered) is never evicted. The victim is taken from the newcomer's own process or from one
//! holding more slots than it, the biggest holder first, then the oldest: a flood evicts its own
//! clients, not the operator's.

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
pub use crate::observe::totals::Refusal;

/// Control clients served at once; past that a newcomer takes the place of one that has not
/// asked yet (`slot_for`), or is closed at accept.
pub const CONTROL_CONNS_MAX: usize = 4;
/// Of those, the most one process holds: one slot is always left to the others.
pub const CONTROL_CONNS_PER_PROCESS_MAX: usize = CONTROL_CONNS_MAX - 1;
/// A control client has this long to send its request and take the answer.
const CONTROL_DEADLINE_MS: u64 = 2000;
/// Longest request line of the line protocol.
const REQUEST_MAX_BYTES: usize = 256;
/// Longest HTTP request head (request line and headers); a longer one is answered 431.
const HTTP_HEAD_MAX_BYTES: usize = 8192;
/// The relay keeps quiet this long after an accept: an HTTP client speaks in that time (it
/// sends its request at once), `kvmi-relay stats` waits for the greeting.
const GREETING_DELAY_MS: u64 = 50;
/// The first line the relay writes to every admitted control client.
pub const GREETING: &[u8] = b"kvmi-relay control 1\n";
/// How long a client waits for the greeting before it says the path is not a control socket.
const GREETING_WAIT_MS: u64 = 1000;
/// The control socket's mode: owner only.
const CONTROL_MODE: u32 = 0o600;
/// What a line-protocol client that is evicted reads before the close (an HTTP one gets it as
/// a 503 page; one that has not been greeted gets nothing, like a refused one).
pub const EVICTED: &str = "error: evicted: the control socket was full and this client had not asked yet; ask again";

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
    /// Clients accepted so far (`ControlConn::serial`).
    accepts: std::cell::Cell<u64>,
}

impl ControlServer {
    pub fn bind(path: &Path) -> Result<ControlServer, StartError> {
        let endpoint = format!("--control {}", path.display());
        let (socket, file) = bind_unix(&endpoint, path, CONTROL_MODE, None)?;
        socket.listen(8).map_err(|source| StartError::Listen { endpoint: endpoint.clone(), source })?;
        socket.set_nonblocking(true).map_err(|source| StartError::Listen { endpoint, source })?;
        let own = nix::unistd::Uid::effective().as_raw();
        let policy = Policy { uids: vec![own, 0], ..Policy::default() };
        Ok(ControlServer { socket, _file: file, policy, path: path.to_path_buf(), accepts: Default::default() })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Accepts one pending client. `Err` is the listener's own failure (nothing was taken from
    /// the queue); a client that cannot be served is `Accepted::Refused`, already closed, and the
    /// listener goes on.
    pub fn accept(&self, now: Instant) -> io::Result<Accepted> {
        let (sock, _) = match self.socket.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Accepted::None),
            Err(e) => return Err(e),
        };
        // Dropping `sock` on every refusal below closes that one client.
        let peer = match unix_peer(&sock) {
            Ok(p) => p,
            Err(e) => return Ok(Accepted::Refused(Refusal::NoIdentity, None, Some(e))),
        };
        if let Verdict::Deny(_) = access::decide(&self.policy, &peer) {
            return Ok(Accepted::Refused(Refusal::Uid, Some(peer), None));
        }
        if let Err(e) = sock.set_nonblocking(true) {
            return Ok(Accepted::Refused(Refusal::Setup, Some(peer), Some(e)));
        }
        Ok(Accepted::Conn(ControlConn {
            sock,
            peer,
            request: Vec::new(),
            phase: Phase::Quiet { greet_at: now + Duration::from_millis(GREETING_DELAY_MS) },
            accepted: now,
            serial: self.accepts.replace(self.accepts.get() + 1),
            deadline: now + Duration::from_millis(CONTROL_DEADLINE_MS),
        }))
    }
}

/// A served control client as `slot_for` sees it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The process that connected (SO_PEERCRED; 0 when it is not visible from the relay's pid
    /// namespace, so all such clients count as one process).
    pub pid: i32,
    /// It has not completed a request (`ControlConn::evictable`).
    pub evictable: bool,
    /// Its place in the order of accepts: the oldest is evicted first.
    pub serial: u64,
}

/// Where a newcomer goes (`slot_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Free(usize),
    /// In the place of the client in this slot, closed for it.
    Evict(usize),
    /// Turned away: no slot it may take and no client it may evict.
    Full,
}

/// The slot for a newcomer of process `pid`, given who holds the slots. A free one while its
/// process holds fewer than `CONTROL_CONNS_PER_PROCESS_MAX`; else the place of a client that
/// has not asked yet, of the newcomer's own process or of one that holds more slots than the
/// newcomer's; among those, the biggest holder's oldest. A flood from one process then evicts
/// itself and never the client of a process holding fewer slots; clients of one process each (a
/// flood of short-lived processes) evict the oldest of each other.
pub fn slot_for(slots: &[Option<Held>], pid: i32) -> Place {
    let holds = |p: i32| slots.iter().flatten().filter(|h| h.pid == p).count();
    let own = holds(pid);
    if own < CONTROL_CONNS_PER_PROCESS_MAX {
        if let Some(i) = slots.iter().position(Option::is_none) {
            return Place::Free(i);
        }
    }
    let victim = slots
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.map(|h| (i, h)))
        .filter(|(_, h)| h.evictable && (h.pid == pid || holds(h.pid) > own))
        .min_by_key(|&(_, h)| (std::cmp::Reverse(holds(h.pid)), h.serial));
    victim.map_or(Place::Full, |(i, _)| Place::Evict(i))
}

/// What one accept on the control socket gave.
pub enum Accepted {
    /// Nobody is waiting.
    None,
    Conn(ControlConn),
    /// Turned away and closed: why, who (when the identity could be read), the error if any.
    Refused(Refusal, Option<Peer>, Option<io::Error>),
}

/// Where a control connection is.
enum Phase {
    /// Accepted, nothing said yet: bytes arriving now may be an HTTP request head; at
    /// `greet_at` the relay greets.
    Quiet { greet_at: Instant },
    /// Greeted: reading one request line of the line protocol.
    Greeted,
    /// Reading the rest of an HTTP request head (its first line said HTTP/1.x).
    HttpHead,
    /// The request is complete and handed to the loop, which has not answered it yet (its
    /// snapshot waits for the turn's budget); `http`: how the answer is framed.
    Asked { http: Option<http::Wanted> },
    /// Writing `answer`; the connection closes when all of it is written.
    Answering { answer: Vec<u8>, written: usize },
}

/// One control client.
pub struct ControlConn {
    sock: Socket,
    /// Who it is (SO_PEERCRED at accept).
    pub peer: Peer,
    /// What the client sent so far (the request line, or the HTTP head).
    request: Vec<u8>,
    phase: Phase,
    /// When it was accepted (for the log), and its place in the order of accepts.
    pub accepted: Instant,
    serial: u64,
    pub deadline: Instant,
}

/// What a control connection needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlStep {
    /// A complete request (None: not one the relay knows): the loop renders it and hands the
    /// text to `answer`.
    Request(Option<Request>),
    Waiting,
    Done,
}

/// What the first line of a client that spoke first says it is.
enum FirstLine {
    /// Not complete yet.
    Partial,
    Http,
    Line,
}

impl ControlConn {
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn interest(&self) -> Interest {
        match self.phase {
            Phase::Answering { .. } => Interest::WRITABLE,
            _ => Interest::READABLE,
        }
    }

    /// The next instant `on_timer` has something to do: the greeting, or the deadline.
    pub fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Quiet { greet_at } => greet_at.min(self.deadline),
            _ => self.deadline,
        }
    }

    /// Timers: Ok(false) once the deadline has passed (the loop closes the connection);
    /// greets a client that has been quiet for `GREETING_DELAY_MS`.
    pub fn on_timer(&mut self, now: Instant) -> io::Result<bool> {
        if now >= self.deadline {
            return Ok(false);
        }
        if matches!(self.phase, Phase::Quiet { greet_at } if now >= greet_at) {
            self.greet()?;
        }
        Ok(true)
    }

    fn greet(&mut self) -> io::Result<()> {
        // A fresh socket's send buffer always takes the short greeting whole.
        let sent = self.sock.send_with_flags(GREETING, libc::MSG_NOSIGNAL)?;
        if sent != GREETING.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "control client: greeting cut short"));
        }
        self.phase = Phase::Greeted;
        Ok(())
    }

    /// What `slot_for` needs to know about it.
    pub fn held(&self) -> Held {
        let pid = match self.peer {
            Peer::Unix { pid, .. } => pid,
            Peer::Tcp(_) | Peer::Vsock { .. } => 0,
        };
        Held { pid, evictable: self.evictable(), serial: self.serial }
    }

    /// Whether it may be evicted for a newcomer: it has not completed a request (nothing said,
    /// or part of a line or head). One that asked is waiting for its answer or being answered.
    pub fn evictable(&self) -> bool {
        matches!(self.phase, Phase::Quiet { .. } | Phase::Greeted | Phase::HttpHead)
    }

    /// Evicted: tells a client that speaks a dialect already why (best effort, the socket is
    /// closed next whatever happens) and says which phase it was in, for the log.
    pub fn evict(&mut self) -> &'static str {
        let (notice, phase) = match self.phase {
            Phase::Quiet { .. } => (None, "quiet"),
            Phase::Greeted => (Some(format!("{EVICTED}\n").into_bytes()), "greeted"),
            Phase::HttpHead => (Some(http::status_page(503, EVICTED)), "http-head"),
            Phase::Asked { .. } | Phase::Answering { .. } => (None, "asked"),
        };
        if let Some(n) = notice {
            // A fresh socket's send buffer takes the short notice whole; a short write is let go.
            let _ = self.sock.send_with_flags(&n, libc::MSG_NOSIGNAL);
        }
        phase
    }

    /// Reads the request (edge-triggered: until WouldBlock) or writes the answer.
    pub fn advance(&mut self) -> io::Result<ControlStep> {
        match self.phase {
            Phase::Answering { .. } => return self.flush(),
            // Nothing more is read from a client that asked: its answer comes from the loop.
            Phase::Asked { .. } => return Ok(ControlStep::Waiting),
            _ => {}
        }
        let mut buf = [0u8; 512];
        loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => return self.at_eof(),
                Ok(n) => {
                    self.request.extend_from_slice(&buf[..n]);
                    if let Some(step) = self.took_bytes()? {
                        return Ok(step);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ControlStep::Waiting),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// After more bytes of the request: Some(step) once there is something to answer.
    fn took_bytes(&mut self) -> io::Result<Option<ControlStep>> {
        if let Phase::Quiet { .. } = self.phase {
            match first_line(&self.request) {
                FirstLine::Partial => return Ok(None),
                FirstLine::Http => self.phase = Phase::HttpHead,
                // A line client that did not wait: greeted first, then answered as usual.
                FirstLine::Line => self.greet()?,
            }
        }
        match self.phase {
            Phase::Greeted => {
                if self.request.contains(&b'\n') || self.request.len() > REQUEST_MAX_BYTES {
                    return Ok(Some(self.asked(Request::from_bytes(&self.request), None)));
                }
                Ok(None)
            }
            Phase::HttpHead => match http::head_end(&self.request) {
                Some(_) => {
                    let verdict = http::parse(&self.request);
                    Ok(Some(self.http_verdict(verdict)?))
                }
                None if self.request.len() > HTTP_HEAD_MAX_BYTES => {
                    self.discard_pending();
                    Ok(Some(self.respond(http::status_page(431, "request head too long"))?))
                }
                None => Ok(None),
            },
            Phase::Quiet { .. } | Phase::Asked { .. } | Phase::Answering { .. } => Ok(None),
        }
    }

    /// A complete request: handed to the loop; the client is no longer evictable.
    fn asked(&mut self, req: Option<Request>, http: Option<http::Wanted>) -> ControlStep {
        self.phase = Phase::Asked { http };
        ControlStep::Request(req)
    }

    /// Reads and drops what the client has already sent past a refused head (at most
    /// `HTTP_HEAD_MAX_BYTES` more), so that closing does not reset the connection and throw
    /// away the response before the client reads it.
    fn discard_pending(&mut self) {
        let mut buf = [0u8; 512];
        let mut dropped = 0;
        while dropped < HTTP_HEAD_MAX_BYTES {
            match (&self.sock).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    }

    /// The client closed its side.
    fn at_eof(&mut self) -> io::Result<ControlStep> {
        match self.phase {
            // Said something and shut down before the delay ran out: a line client.
            Phase::Quiet { .. } if !self.request.is_empty() => {
                self.greet()?;
                Ok(self.asked(Request::from_bytes(&self.request), None))
            }
            Phase::Greeted => Ok(self.asked(Request::from_bytes(&self.request), None)),
            Phase::HttpHead => self.respond(http::status_page(400, "request head cut short")),
            Phase::Quiet { .. } | Phase::Asked { .. } | Phase::Answering { .. } => Ok(ControlStep::Done),
        }
    }

    fn http_verdict(&mut self, verdict: Result<http::Wanted, http::Refusal>) -> io::Result<ControlStep> {
        match verdict {
            Ok(wanted) => Ok(self.asked(Some(Request::Stats(Format::Prometheus)), Some(wanted))),
            Err(r) => self.respond(http::refusal_page(r)),
        }
    }

    /// Queues the answer the loop rendered for the request and starts writing it; over HTTP
    /// it goes out as a response (`GET /metrics`: the Prometheus text; `HEAD`: its headers).
    pub fn answer(&mut self, text: String) -> io::Result<ControlStep> {
        let bytes = match self.phase {
            Phase::Asked { http: Some(wanted) } => {
                http::metrics_response(text.as_bytes(), wanted == http::Wanted::Head)
            }
            _ => text.into_bytes(),
        };
        self.respond(bytes)
    }

    fn respond(&mut self, answer: Vec<u8>) -> io::Result<ControlStep> {
        self.phase = Phase::Answering { answer, written: 0 };
        self.flush()
    }

    fn flush(&mut self) -> io::Result<ControlStep> {
        let Phase::Answering { answer, written } = &mut self.phase else {
            return Ok(ControlStep::Waiting);
        };
        while *written < answer.len() {
            match self.sock.send_with_flags(&answer[*written..], libc::MSG_NOSIGNAL) {
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ControlStep::Waiting),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ControlStep::Done)
    }
}

/// What a client that spoke before the greeting sent first: an HTTP request line ends in
/// ` HTTP/1.x`; anything else that fills a line (or the line cap) is the line protocol.
fn first_line(sent: &[u8]) -> FirstLine {
    let Some(end) = sent.iter().position(|&b| b == b'\n') else {
        return if sent.len() > REQUEST_MAX_BYTES { FirstLine::Line } else { FirstLine::Partial };
    };
    let line = sent[..end].strip_suffix(b"\r").unwrap_or(&sent[..end]);
    match line.rsplit(|&b| b == b' ').next() {
        Some(version) if line.contains(&b' ') && version.starts_with(b"HTTP/1.") => FirstLine::Http,
        _ => FirstLine::Line,
    }
}

/// The few pieces of HTTP/1.x the control socket speaks: one request head in, one response
/// out, then close.
mod http {
    /// What a well-formed request asks for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Wanted {
        Get,
        Head,
    }

    /// Why a request head is not answered with the metrics.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Refusal {
        Malformed,
        Method,
        NotFound,
    }

    /// Where the head ends (after its empty line), if it has.
    pub fn head_end(sent: &[u8]) -> Option<usize> {
        let crlf = sent.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        let lf = sent.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
        match (crlf, lf) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The request line of a complete head.
    pub fn parse(head: &[u8]) -> Result<Wanted, Refusal> {
        let end = head.iter().position(|&b| b == b'\n').ok_or(Refusal::Malformed)?;
        let line = std::str::from_utf8(&head[..end]).map_err(|_| Refusal::Malformed)?.trim_end_matches('\r');
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        if !version.starts_with("HTTP/1.") {
            return Err(Refusal::Malformed);
        }
        let wanted = match method {
            "GET" => Wanted::Get,
            "HEAD" => Wanted::Head,
            _ => return Err(Refusal::Method),
        };
        let path = target.split('?').next().unwrap_or_default();
        if path != "/metrics" {
            return Err(Refusal::NotFound);
        }
        Ok(wanted)
    }

    fn response(status: u16, reason: &str, content_type: &str, body: &[u8], head_only: bool, extra: &str) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(body);
        }
        out
    }

    /// 200 with the Prometheus text exposition format.
    pub fn metrics_response(body: &[u8], head_only: bool) -> Vec<u8> {
        response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, head_only, "")
    }

    pub fn status_page(status: u16, why: &str) -> Vec<u8> {
        let reason = match status {
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "Request Header Fields Too Large",
        };
        let extra = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
        let body = format!("{why}; this control socket serves GET /metrics\n");
        response(status, reason, "text/plain; charset=utf-8", body.as_bytes(), false, extra)
    }

    pub fn refusal_page(r: Refusal) -> Vec<u8> {
        match r {
            Refusal::Malformed => status_page(400, "not an HTTP/1.x request line"),
            Refusal::Method => status_page(405, "only GET and HEAD"),
            Refusal::NotFound => status_page(404, "no such path"),
        }
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
    // An evicted client is told so and closed, maybe before the relay read its request: the
    // write may then fail (EPIPE) and the read end in a reset, after the notice.
    let gone = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE));
    match s.write_all(format!("{line}\n").as_bytes()) {
        Err(e) if !gone(&e) => return Err(e),
        _ => {}
    }
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        // What came before a reset is the answer; none at all says the same as an empty one.
        Err(e) if !gone(&e) => Err(e),
        _ => String::from_utf8(out).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            io::Error::new(io::ErrorKind::InvalidData, format!("the answer is not text: invalid UTF-8 at byte {at}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_holds_at_most_three_slots_and_a_newcomer_evicts_the_biggest_holders_oldest_silent_client() {
        let h = |pid: i32, evictable: bool, serial: u64| Some(Held { pid, evictable, serial });
        // A free slot: anyone's, but a fourth for the same process evicts its own oldest.
        let slots = [h(7, true, 2), h(7, true, 1), None, h(7, false, 0)];
        assert_eq!(slot_for(&slots, 9), Place::Free(2));
        assert_eq!(slot_for(&slots, 7), Place::Evict(1), "its own oldest silent one, never its request");
        let slots = [h(7, false, 2), None, h(7, false, 1), h(7, false, 0)];
        assert_eq!(slot_for(&slots, 7), Place::Full, "the free slot is left to the others");
        // A flood from process 7 holds three slots, the operator's process 9 one.
        let slots = [h(7, true, 0), h(9, true, 1), h(7, true, 2), h(7, false, 3)];
        assert_eq!(slot_for(&slots, 7), Place::Evict(0), "the flood evicts its own oldest silent client");
        assert_eq!(slot_for(&slots, 9), Place::Evict(0), "the operator evicts the flood's, not its own");
        assert_eq!(slot_for(&slots, 5), Place::Evict(0), "a third process: the biggest holder pays");
        // The flood's silent clients gone: nothing of 9's is taken for 7, who holds more.
        let slots = [h(7, false, 0), h(9, true, 1), h(7, false, 2), h(7, false, 3)];
        assert_eq!(slot_for(&slots, 7), Place::Full, "clients that asked are never evicted");
        assert_eq!(slot_for(&slots, 5), Place::Evict(1), "a third process, holding none, may take 9's");
        // One slot per process (short-lived processes): the oldest silent one of any.
        let slots = [h(1, false, 0), h(2, true, 5), h(3, true, 1), h(4, true, 9)];
        assert_eq!(slot_for(&slots, 8), Place::Evict(2));
        assert_eq!(slot_for(&slots, 4), Place::Evict(3), "its own, since no one holds more");
        // Two of process 2's, one of 3's: a newcomer of 3's takes 2's oldest.
        let slots = [h(2, true, 4), h(2, true, 3), h(3, true, 0), h(1, false, 1)];
        assert_eq!(slot_for(&slots, 3), Place::Evict(1));
        assert_eq!(slot_for(&[h(1, false, 0), h(2, false, 1), h(3, false, 2), h(4, false, 3)], 1), Place::Full);
    }

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("stats\n"), Some(Request::Stats(Format::Text)));
        assert_eq!(Request::parse("stats json"), Some(Request::Stats(Format::Json)));
        assert_eq!(Request::parse("stats prometheus"), Some(Request::Stats(Format::Prometheus)));
        assert_eq!(Request::parse("reset"), Some(Request::Reset));
        assert_eq!(Request::parse("rm -rf /"), None);
    }

    #[test]
    fn a_first_line_ending_in_http_1_is_a_request_head_and_anything_else_the_line_protocol() {
        assert!(matches!(first_line(b"GET /metrics HTTP/1.1\r\nHost"), FirstLine::Http));
        assert!(matches!(first_line(b"HEAD /metrics HTTP/1.0\n"), FirstLine::Http));
        assert!(matches!(first_line(b"stats json\n"), FirstLine::Line));
        assert!(matches!(first_line(b"HTTP/1.1\n"), FirstLine::Line));
        assert!(matches!(first_line(b"GET /metrics HTTP/2\r\n"), FirstLine::Line));
        assert!(matches!(first_line(b"GET /metrics HTTP/1.1"), FirstLine::Partial));
        assert!(matches!(first_line(&[b'a'; REQUEST_MAX_BYTES + 1]), FirstLine::Line));
    }

    #[test]
    fn http_heads_parse() {
        use http::{Refusal, Wanted, head_end, parse};
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\n"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\n\r\n"), Ok(Wanted::Get));
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Ok(Wanted::Get));
        assert_eq!(parse(b"HEAD /metrics HTTP/1.0\r\n\r\n"), Ok(Wanted::Head));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        assert_eq!(parse(b"DELETE /metrics HTTP/1.1\r\n\r\n"), Err(Refusal::Method));
        assert_eq!(parse(b"GET  /metrics HTTP/1.1\r\n\r\n"), Err(Refusal::Malformed));
        assert_eq!(parse(b"GET /metrics HTTP/1.1 x\r\n\r\n"), Err(Refusal::Malformed));
        assert_eq!(parse(b"GET /m\xff HTTP/1.1\r\n\r\n"), Err(Refusal::Malformed));
        let page = http::metrics_response(b"a 1\n", false);
        assert_eq!(page.len(), page.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + 4);
        assert!(http::metrics_response(b"a 1\n", true).ends_with(b"Content-Length: 4\r\nConnection: close\r\n\r\n"));
    }
}
