//! One relayed session: the accepted peer, the dialled peer, and a pump per direction.
//!
//! States:
//!
//! ```text
//!   accept ──admit──▶ Dialling ──connected──▶ Relaying ──both directions finished──▶ closed
//!                        │ dial error/timeout        │ reset / error ──────────────▶ closed
//!                        └──────────────▶ closed     │ shutdown: stop reading, drain ──▶ Closing
//!                                                                    │ both peers' EOF ──▶ closed
//! ```
//!
//! A connection never touches the poller: it says which readiness it wants on each socket
//! (`interest`), takes the readiness that happened (`on_ready`) and moves bytes (`advance`);
//! the event loop registers, re-registers and removes. Close rules (checked in `advance`):
//! 1. `finished`: each direction saw EOF, delivered everything and half-closed its destination;
//! 2. `failed`: any error on either socket (reset, broken pipe) tears the pair down at once;
//! 3. `drained`: during shutdown, both stores are empty, both sockets were half-closed
//!    (`shutdown(SHUT_WR)`: the peers see every byte, then EOF) and both peers ended their side.
//!    Until then (`Closing`) what they still send is read and dropped: closing a socket with
//!    unread input makes TCP send a reset, and the kernel throws away its unsent queue with it
//!    (bytes the relay counted as written would never arrive). The loop's shutdown deadline
//!    cuts what is left as `aborted` (`abort`).
//!
//! What a peer sees at teardown, by family: `abort` sets SO_LINGER 0, so a TCP peer gets a
//! reset (ECONNRESET; unread bytes toward it are dropped). SO_LINGER means nothing to AF_UNIX and
//! vsock: there close is all there is. A UNIX peer reads what was already queued to it, then EOF
//! (ECONNRESET instead when the relay closed with bytes from that peer unread); a vsock peer
//! gets EOF (the transport sends its shutdown/reset message; queued bytes may be lost).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use socket2::Socket;

use crate::access::Peer;
use crate::config::{Config, TcpLiveness};
use crate::datapath::pump::Pump;
use crate::kvmi::session::{Gate, Session};
use crate::kvmi::wire::Flow;
use crate::net::dial;
use crate::net::endpoint::Endpoint;
use crate::observe::metrics::DirMetrics;

pub use crate::datapath::side::{CONNECT_SIDE, DIRECTION_NAMES, LISTEN_SIDE};

/// How long QEMU's handshake may take to arrive (QEMU's own handshake timeout).
pub const KVMI_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// `--kvmi` with QEMU on the listen side: reading its handshake; nothing dialled yet.
    Greeting {
        deadline: Instant,
        got: Vec<u8>,
    },
    Dialling {
        deadline: Instant,
    },
    Relaying,
    /// Shutdown: everything delivered and both sockets half-closed; reading (and dropping)
    /// until each peer ends its side. `eof[side]`: that peer did.
    Closing {
        eof: [bool; 2],
    },
}

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions saw EOF and delivered everything.
    Finished,
    /// Shutdown: the stores are empty, both peers saw EOF after every byte and ended their side.
    Drained,
    /// Shutdown: the deadline came first (bytes still held, or a peer that did not end its
    /// side); closed with a reset where the family has one.
    Aborted,
    /// The far side could not be dialled.
    DialFailed(io::Error),
    DialTimeout(Duration),
    /// `--kvmi`: the VM's handshake was refused (wrong pin, bad size, none in time); nothing
    /// was dialled. The text says what was seen and what was expected, escaped.
    Refused(String),
    /// `--kvmi`: a malformed stream (the reason names the message); nothing of it was forwarded.
    Protocol(String),
    /// A socket failed mid-session (reset, broken pipe, ...).
    Failed {
        side: usize,
        error: io::Error,
    },
}

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot configure the accepted socket: {0}")]
    Socket(io::Error),
    #[error("cannot reach the far side: {0}")]
    Dial(io::Error),
    #[error("cannot create a pipe: {0}")]
    Pipe(io::Error),
}

/// What `advance` concluded.
#[derive(Debug)]
pub enum Step {
    /// Keep going; `more` asks to be advanced again without waiting for an event.
    Continue {
        more: bool,
    },
    Close(End),
}

pub struct Conn {
    pub id: u64,
    pub peer: Peer,
    /// The accepted socket, then the dialled one once dialling began.
    socks: Vec<Socket>,
    pumps: [Pump; 2],
    /// Bytes the connection took from the listen side before the pumps ran (QEMU's handshake),
    /// still to be written to the connect side ahead of everything else.
    preface: Vec<u8>,
    /// What `--kvmi` pins the VM to, when it does (copied from the configuration).
    pin: Option<crate::kvmi::handshake::Pin>,
    /// The VM's handshake, once read before dialling (`--kvmi`, QEMU on the listen side).
    pub vm: Option<crate::kvmi::handshake::Handshake>,
    /// `--kvmi`: the KVMi layer at both pumps' destinations, and the flow each direction is.
    pub kvmi: Option<(RefCell<Session>, [Flow; 2])>,
    phase: Phase,
    pub opened: Instant,
    pub metrics: [DirMetrics; 2],
    /// When bytes of each direction were first seen since its store was last empty.
    arrived: [Option<Instant>; 2],
    /// When each direction last finished forwarding (store emptied), awaiting the answer.
    forwarded: [Option<Instant>; 2],
    connect: Endpoint,
    connect_timeout: Duration,
    tcp: TcpLiveness,
    busy_poll_us: u32,
}

impl Conn {
    /// Takes an admitted peer and starts dialling the far side.
    pub fn new(id: u64, peer: Peer, accepted: Socket, cfg: &Config, now: Instant) -> Result<Conn, SetupError> {
        if peer_is_tcp(&peer) {
            crate::net::tcp::tune(&accepted, &cfg.tcp).map_err(SetupError::Socket)?;
        }
        if cfg.busy_poll_us > 0 {
            // Best effort: SO_BUSY_POLL is refused on some socket families.
            let _ = accepted.set_busy_poll(cfg.busy_poll_us);
        }
        let greet = cfg.kvmi.as_ref().is_some_and(|k| k.hypervisor_side == LISTEN_SIDE);
        let mut socks = vec![accepted];
        let phase = if greet {
            Phase::Greeting { deadline: now + Duration::from_millis(KVMI_HANDSHAKE_TIMEOUT_MS), got: Vec::new() }
        } else {
            socks.push(Self::dial(cfg)?);
            Phase::Dialling { deadline: now + cfg.connect_timeout }
        };
        // Direction 0 writes to the dialled side, direction 1 back to the peer.
        let into_tcp = [matches!(cfg.connect, Endpoint::Tcp(_)), peer_is_tcp(&peer)];
        let pump = |d: usize| {
            let strategy = cfg.move_mode.strategy(into_tcp[d], cfg);
            Pump::new(strategy, DIRECTION_NAMES[d]).map_err(SetupError::Pipe)
        };
        let pumps = [pump(0)?, pump(1)?];
        Ok(Conn {
            id,
            peer,
            socks,
            pumps,
            preface: Vec::new(),
            pin: cfg.kvmi.as_ref().map(|k| crate::kvmi::handshake::Pin { uuid: k.vm_uuid, name: k.vm_name.clone() }),
            vm: None,
            kvmi: cfg.kvmi.as_ref().map(|k| {
                let qemu_in_stream = k.hypervisor_side == CONNECT_SIDE;
                let pin =
                    qemu_in_stream.then(|| crate::kvmi::handshake::Pin { uuid: k.vm_uuid, name: k.vm_name.clone() });
                let session = Session::new(k.abi.table(), k.policy.clone(), pin, qemu_in_stream, now)
                    .with_intervals(cfg.hist_log.is_some());
                // Direction d moves bytes from socket d: from the hypervisor's socket they go
                // toward the introspector.
                let flows = if k.hypervisor_side == LISTEN_SIDE {
                    [Flow::ToIntrospector, Flow::ToHypervisor]
                } else {
                    [Flow::ToHypervisor, Flow::ToIntrospector]
                };
                (RefCell::new(session), flows)
            }),
            connect: cfg.connect.clone(),
            connect_timeout: cfg.connect_timeout,
            tcp: cfg.tcp,
            busy_poll_us: cfg.busy_poll_us,
            phase,
            opened: now,
            metrics: [DirMetrics::new(cfg.hist_log.is_some()), DirMetrics::new(cfg.hist_log.is_some())],
            arrived: [None, None],
            forwarded: [None, None],
        })
    }

    fn dial(cfg: &Config) -> Result<Socket, SetupError> {
        Self::dial_to(&cfg.connect, &cfg.tcp, cfg.busy_poll_us)
    }

    fn dial_to(connect: &Endpoint, tcp: &TcpLiveness, busy_poll_us: u32) -> Result<Socket, SetupError> {
        let dialled = dial::start(connect, tcp).map_err(SetupError::Dial)?;
        if busy_poll_us > 0 {
            let _ = dialled.set_busy_poll(busy_poll_us);
        }
        Ok(dialled)
    }

    /// The socket's fd; -1 for the connect side before it was dialled (never registered then).
    pub fn raw_fd(&self, side: usize) -> RawFd {
        self.socks.get(side).map_or(-1, |s| s.as_raw_fd())
    }

    /// The VM's name and uuid as its handshake said (`-` without `--kvmi` or before it came).
    pub fn vm_identity(&self) -> (String, String) {
        let in_stream = self.kvmi.as_ref().and_then(|(k, _)| k.borrow().vm.clone());
        match self.vm.clone().or(in_stream) {
            Some(h) => (h.name_text(), h.uuid_text()),
            None => ("-".into(), "-".into()),
        }
    }

    /// Whether the connection is still reading the VM's handshake (nothing dialled yet).
    pub fn is_greeting(&self) -> bool {
        matches!(self.phase, Phase::Greeting { .. })
    }

    pub fn pump(&self, direction: usize) -> &Pump {
        &self.pumps[direction]
    }

    pub fn pump_mut(&mut self, direction: usize) -> &mut Pump {
        &mut self.pumps[direction]
    }

    pub fn is_dialling(&self) -> bool {
        matches!(self.phase, Phase::Dialling { .. })
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Greeting { deadline, .. } | Phase::Dialling { deadline } => Some(deadline),
            Phase::Relaying | Phase::Closing { .. } => None,
        }
    }

    /// The readiness wanted on `side`; None = not registered at all.
    ///
    /// Read interest stays on for the whole session (it also brings hang-ups and errors);
    /// write interest only while this side's incoming pump waits for room, so a relay whose
    /// writes complete at once is never woken by send-buffer space.
    pub fn interest(&self, side: usize) -> Option<Interest> {
        match self.phase {
            Phase::Greeting { .. } => (side == LISTEN_SIDE).then_some(Interest::READABLE),
            Phase::Dialling { .. } => (side == CONNECT_SIDE).then_some(Interest::WRITABLE),
            Phase::Closing { .. } => Some(Interest::READABLE),
            Phase::Relaying => {
                // Direction 1 - side writes to `side`.
                let outbox = self.kvmi.as_ref().is_some_and(|(k, flows)| k.borrow().outbox_waiting(flows[1 - side]));
                if self.pumps[1 - side].blocked_on_dst() || (side == CONNECT_SIDE && !self.preface.is_empty()) || outbox
                {
                    Some(Interest::READABLE | Interest::WRITABLE)
                } else {
                    Some(Interest::READABLE)
                }
            }
        }
    }

    /// Records readiness reported for `side`.
    ///
    /// `read_closed`: the peer on `side` stopped sending, and may have gone entirely. vsock
    /// reports a vanished peer this way only (EPOLLIN|EPOLLRDHUP: no EPOLLHUP, no EPOLLOUT), so a
    /// pump blocked on writing to that peer probes once and meets EPIPE, or WouldBlock if the
    /// peer only half-closed, instead of waiting forever.
    pub fn on_ready(&mut self, side: usize, readable: bool, writable: bool, read_closed: bool) {
        if readable || read_closed {
            self.pumps[side].src_readable = true;
        }
        self.pumps[side].src_read_closed |= read_closed;
        if writable || read_closed {
            self.pumps[1 - side].dst_writable = true;
        }
    }

    /// Moves the connection forward. `now` is when the loop woke for the events being handled;
    /// `draining` stops all reads (shutdown).
    pub fn advance(&mut self, now: Instant, draining: bool) -> Step {
        if let Phase::Closing { eof } = &mut self.phase {
            return read_to_end_dropping(&self.socks, eof);
        }
        if let Phase::Greeting { deadline, got } = &mut self.phase {
            if draining {
                return Step::Close(End::Drained);
            }
            match read_handshake(&self.socks[LISTEN_SIDE], got) {
                Err(why) => return Step::Close(End::Refused(why)),
                Ok(None) if now >= *deadline => {
                    return Step::Close(End::Refused(format!(
                        "no complete handshake within {KVMI_HANDSHAKE_TIMEOUT_MS} ms ({} bytes seen)",
                        got.len()
                    )));
                }
                Ok(None) => return Step::Continue { more: false },
                Ok(Some(h)) => {
                    if let Some(why) = self.pin.as_ref().and_then(|p| p.check(&h).err()) {
                        return Step::Close(End::Refused(why));
                    }
                    self.preface = std::mem::take(got);
                    self.vm = Some(h);
                    match Self::dial_to(&self.connect, &self.tcp, self.busy_poll_us) {
                        Ok(s) => self.socks.push(s),
                        Err(SetupError::Dial(e)) | Err(SetupError::Socket(e)) | Err(SetupError::Pipe(e)) => {
                            return Step::Close(End::DialFailed(e));
                        }
                    }
                    self.phase = Phase::Dialling { deadline: now + self.connect_timeout };
                    return Step::Continue { more: false };
                }
            }
        }
        if let Phase::Dialling { deadline } = self.phase {
            match dial::finish(&self.socks[CONNECT_SIDE]) {
                Ok(true) => self.phase = Phase::Relaying,
                Ok(false) if now >= deadline => {
                    return Step::Close(End::DialTimeout(deadline.saturating_duration_since(self.opened)));
                }
                Ok(false) => return Step::Continue { more: false },
                Err(e) => return Step::Close(End::DialFailed(e)),
            }
            if draining {
                return Step::Close(End::Drained);
            }
        }

        if !self.preface.is_empty() {
            match send_some(&self.socks[CONNECT_SIDE], &self.preface) {
                Ok(n) => {
                    self.preface.drain(..n);
                }
                Err(e) => return Step::Close(End::Failed { side: CONNECT_SIDE, error: e }),
            }
        }

        if let Some((k, _)) = &self.kvmi {
            k.borrow_mut().now = now;
        }
        let mut more = false;
        // The direction toward the hypervisor may run before the handshake that releases it
        // passes in the other direction, in the same turn: then it runs again on the next one.
        let awaited_handshake = self.kvmi.as_ref().is_some_and(|(k, _)| k.borrow().awaits_handshake());
        for d in 0..2 {
            if d == 0 && !self.preface.is_empty() {
                // The handshake goes first; l2c waits until it is out.
                continue;
            }
            let run = match self.run_pump(d, draining) {
                Ok(run) => run,
                Err(e) => {
                    if let Some(why) = self.kvmi.as_ref().and_then(|(k, _)| k.borrow_mut().malformed.take()) {
                        return Step::Close(End::Protocol(why));
                    }
                    let side = if e.at_source { d } else { 1 - d };
                    return Step::Close(End::Failed { side, error: e.error });
                }
            };
            more |= run.more;
            if run.started {
                // Bytes found in the same turn the other direction finished forwarding arrived
                // after `now`: time them from when they were found instead.
                let arrived = match self.forwarded[1 - d] {
                    Some(t) if t > now => Instant::now(),
                    _ => now,
                };
                self.arrived[d] = Some(arrived);
                if let Some(t) = self.forwarded[1 - d].take() {
                    self.metrics[d].record_turnaround(arrived.saturating_duration_since(t).as_nanos() as u64);
                }
            }
            if run.emptied {
                let done = Instant::now();
                if let Some(t) = self.arrived[d].take() {
                    self.metrics[d].record_transit(done.saturating_duration_since(t).as_nanos() as u64);
                }
                self.forwarded[d] = Some(run.last_write_began.unwrap_or(done));
            }
        }
        if let Some((k, flows)) = &self.kvmi {
            let mut k = k.borrow_mut();
            more |= awaited_handshake && !k.awaits_handshake();
            for d in 0..2 {
                if let Err(e) = k.flush(flows[d], &self.socks[1 - d]) {
                    return Step::Close(End::Failed { side: 1 - d, error: e });
                }
                if self.pumps[d].src_eof() && self.pumps[d].fill() > 0 && k.is_stuck(flows[d]) {
                    return Step::Close(End::Protocol(format!(
                        "{} bytes of a message cut by the end of the stream ({})",
                        self.pumps[d].fill(),
                        DIRECTION_NAMES[d]
                    )));
                }
            }
            if (0..2).any(|d| k.outbox_waiting(flows[d])) {
                // Not finished while relay-made replies wait.
                return Step::Continue { more };
            }
        }

        if self.pumps[0].finished() && self.pumps[1].finished() {
            return Step::Close(End::Finished);
        }
        if draining && self.pumps[0].fill() == 0 && self.pumps[1].fill() == 0 {
            for s in &self.socks {
                // A side already half-closed (its source's EOF) or a peer already gone says so
                // again here; reading below tells which.
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            let mut eof = [false; 2];
            let step = read_to_end_dropping(&self.socks, &mut eof);
            self.phase = Phase::Closing { eof };
            return step;
        }
        Step::Continue { more }
    }

    /// Runs direction `d`'s pump, through the KVMi layer when there is one. A direction whose
    /// destination was offered only part of a message did not block on that socket: its flag
    /// is cleared, and the pump runs again while reads brought more (the rest may be in).
    fn run_pump(
        &mut self,
        d: usize,
        draining: bool,
    ) -> Result<crate::datapath::pump::Run, crate::datapath::pump::PumpError> {
        let (src, dst) = (&self.socks[d], &self.socks[1 - d]);
        let Some((k, flows)) = &self.kvmi else {
            return self.pumps[d].run(src, dst, !draining);
        };
        let gate = Gate { sock: dst, session: k, flow: flows[d] };
        let mut total = self.pumps[d].run(src, &gate, !draining)?;
        for _ in 0..4 {
            if !k.borrow().is_stuck(flows[d]) {
                break;
            }
            self.pumps[d].dst_writable = true;
            if total.read_bytes == 0 && !self.pumps[d].src_eof() {
                break;
            }
            let again = self.pumps[d].run(src, &gate, !draining)?;
            total.read_bytes = again.read_bytes;
            total.written_bytes += again.written_bytes;
            total.emptied = again.emptied || (total.emptied && again.written_bytes == 0);
            total.more |= again.more;
            if again.last_write_began.is_some() {
                total.last_write_began = again.last_write_began;
            }
            if again.read_bytes == 0 && again.written_bytes == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Closes both sockets so that the peers see a reset rather than an orderly EOF (used when
    /// the other side reset: an EOF would claim the stream ended cleanly; and for a session the
    /// shutdown timeout cut). What each family makes of it: the module header.
    pub fn abort(&self) {
        for s in &self.socks {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
    }
}

/// `Closing`: reads each socket whose peer has not ended its side until it would block, dropping
/// the bytes; Close(Drained) once both did, Failed when one breaks off instead.
fn read_to_end_dropping(socks: &[Socket], eof: &mut [bool; 2]) -> Step {
    let mut scratch = [0u8; 16 * 1024];
    let mut more = false;
    for (side, s) in socks.iter().enumerate() {
        // Bounded per turn like a pump's round: a side that did not reach WouldBlock asks to
        // be advanced again (edge-triggered: no new event would come for what is queued).
        let mut blocked = false;
        for _ in 0..64 {
            if eof[side] {
                blocked = true;
                break;
            }
            match io::Read::read(&mut &*s, &mut scratch) {
                Ok(0) => eof[side] = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Step::Close(End::Failed { side, error }),
            }
        }
        more |= !blocked;
    }
    if eof.iter().all(|&e| e) { Step::Close(End::Drained) } else { Step::Continue { more } }
}

/// Reads what is missing of QEMU's handshake, never a byte beyond it. Ok(None): not complete
/// yet (the socket would block); Err: refused, with what was seen.
fn read_handshake(sock: &Socket, got: &mut Vec<u8>) -> Result<Option<crate::kvmi::handshake::Handshake>, String> {
    use crate::kvmi::handshake::{Parse, QEMU_HANDSHAKE_MAX_GPA_BYTES, parse_qemu};
    let mut buf = [0u8; QEMU_HANDSHAKE_MAX_GPA_BYTES];
    loop {
        let needed = match parse_qemu(got).map_err(|r| r.to_string())? {
            Parse::Complete(h) => return Ok(Some(h)),
            Parse::Partial { needed } => needed,
        };
        match io::Read::read(&mut &*sock, &mut buf[..needed - got.len()]) {
            Ok(0) => {
                return Err(format!("the hypervisor side closed after {} of {needed} handshake bytes", got.len()));
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the handshake failed: {e}")),
        }
    }
}

/// Writes what the socket takes now (0 when it would block).
fn send_some(sock: &Socket, bytes: &[u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < bytes.len() {
        match sock.send_with_flags(&bytes[n..], libc::MSG_NOSIGNAL) {
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn peer_is_tcp(p: &Peer) -> bool {
    matches!(p, Peer::Tcp(_))
}
