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
//! A TLS side (`--tls-*` on a tcp: endpoint) adds a `Handshaking` phase with its own deadline:
//! on the listen side right after admission (nothing is dialled before the peer's certificate
//! and pins passed), on the connect side once connected (nothing is read from the listen side
//! before the server's passed). A failed or timed-out handshake is `TlsRefused`; one that passed
//! leaves its time, from the phase's start to the peer verified, for the loop to take.
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
use crate::config::{Config, MoveMode, TcpLiveness};
use crate::datapath::pump::{Pump, Strategy};
use crate::datapath::tls::{HandshakeError, Io, TlsStream};
use crate::kvmi::session::{Gate, Session};
use crate::kvmi::wire::Flow;
use crate::net::dial;
use crate::net::endpoint::Endpoint;
use crate::observe::metrics::DirMetrics;

pub use crate::datapath::side::{CONNECT_SIDE, DIRECTION_NAMES, LISTEN_SIDE};

/// How long QEMU's handshake may take to arrive (QEMU's own handshake timeout).
pub const KVMI_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// The copy buffer of a direction that copies messages and splices bulk (`--move auto` into
/// UNIX and vsock): twice libkvmi's largest message (8192 bytes with its header), so that one
/// message never fills it; a read that does is bulk (or a batch) and moves the direction to
/// splice. Smaller than `--pipe-size` because every session touches it before it knows which
/// traffic it carries.
const MESSAGE_BUFFER_BYTES: usize = 16 << 10;

/// How one direction moves its bytes under `--move`, given whether its destination is a TCP
/// socket (docs/DESIGN.md, "Messages copy, bulk splices").
fn strategy(mode: MoveMode, into_tcp: bool, cfg: &Config) -> Strategy {
    let copy = Strategy::Copy {
        initial_bytes: cfg.pipe_size_bytes.min(cfg.copy_buffer_max_bytes),
        max_bytes: cfg.copy_buffer_max_bytes,
    };
    match mode {
        MoveMode::Auto if into_tcp => copy,
        MoveMode::Auto => Strategy::CopyThenSplice {
            copy_bytes: cfg.pipe_size_bytes.min(MESSAGE_BUFFER_BYTES),
            pipe_bytes: cfg.pipe_size_bytes,
            pipe_max_bytes: cfg.pipe_size_max_bytes,
            copy_max_bytes: cfg.copy_buffer_max_bytes,
        },
        MoveMode::Splice => Strategy::Splice { pipe_bytes: cfg.pipe_size_bytes, max_bytes: cfg.pipe_size_max_bytes },
        MoveMode::Copy => copy,
    }
}

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
    /// TLS on `side`: the handshake runs; the other side is not read (and, on the listen side,
    /// not dialled yet). `began`: the loop's wake-up that entered the phase.
    Handshaking {
        side: usize,
        began: Instant,
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
    /// `--replace-after-ms`: a newer session (`by`) took this one's place and the grace ran
    /// out; both sides are closed (EOF where nothing is left unread).
    Replaced {
        by: u64,
    },
    /// The far side could not be dialled.
    DialFailed(io::Error),
    DialTimeout(Duration),
    /// `--kvmi`: the VM's handshake was refused (wrong pin, bad size, none in time); nothing
    /// was dialled. The text says what was seen and what was expected, escaped.
    Refused(String),
    /// `--kvmi`: a malformed stream (the reason names the message); nothing of it was forwarded.
    Protocol(String),
    /// The TLS handshake on `side` failed or timed out; nothing was forwarded (and on the listen
    /// side nothing dialled). `presented`: what the peer's certificate said, escaped.
    TlsRefused {
        side: usize,
        reason: crate::tls::Reason,
        detail: String,
        presented: Option<String>,
    },
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
    #[error("cannot start a TLS session: {0}")]
    Tls(String),
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
    /// Each side's TLS session, when that side speaks TLS (the connect side's from dialling on).
    tls: [Option<TlsStream>; 2],
    /// What the dialled side's TLS client needs: the configuration and the dialled address.
    tls_dial: Option<(std::sync::Arc<rustls::ClientConfig>, std::net::IpAddr)>,
    /// `--tls-handshake-timeout-ms`.
    tls_timeout: Duration,
    /// Whether the VM's handshake is read before dialling (`--kvmi`, QEMU on the listen side).
    greet: bool,
    /// What each TLS peer presented once its handshake passed (subject, SANs, SPKI), escaped.
    pub tls_peer: [Option<String>; 2],
    /// How long each side's TLS handshake took, from the phase's start to the peer verified,
    /// once it passed and until the event loop takes it for the totals (`take_handshake_time`).
    handshake_time: [Option<Duration>; 2],
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
        let tls_cfg = cfg.tls.as_ref();
        let listen_tls = match tls_cfg.and_then(|t| t.loaded.server.clone()).filter(|_| peer_is_tcp(&peer)) {
            Some(server) => Some(TlsStream::server(server).map_err(|e| SetupError::Tls(e.to_string()))?),
            None => None,
        };
        let tls_dial = match (&cfg.connect, tls_cfg.and_then(|t| t.loaded.client.clone())) {
            (Endpoint::Tcp(addr), Some(client)) => Some((client, addr.ip())),
            _ => None,
        };
        let tls_timeout = tls_cfg.map_or(Duration::ZERO, |t| t.handshake_timeout);
        let mut socks = vec![accepted];
        let phase = if listen_tls.is_some() {
            Phase::Handshaking { side: LISTEN_SIDE, began: now, deadline: now + tls_timeout }
        } else if greet {
            Phase::Greeting { deadline: now + Duration::from_millis(KVMI_HANDSHAKE_TIMEOUT_MS), got: Vec::new() }
        } else {
            socks.push(Self::dial(cfg)?);
            Phase::Dialling { deadline: now + cfg.connect_timeout }
        };
        // Direction 0 writes to the dialled side, direction 1 back to the peer.
        let into_tcp = [matches!(cfg.connect, Endpoint::Tcp(_)), peer_is_tcp(&peer)];
        // A direction with TLS at either end moves plaintext through rustls: copies only.
        let tls_at = [listen_tls.is_some(), tls_dial.is_some()];
        let pump = |d: usize| {
            let mode = if tls_at[0] || tls_at[1] { MoveMode::Copy } else { cfg.move_mode };
            let strategy = strategy(mode, into_tcp[d], cfg);
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
            tls: [listen_tls, None],
            tls_dial,
            tls_timeout,
            greet,
            tls_peer: [None, None],
            handshake_time: [None, None],
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

    /// Whether the listen side's TLS handshake runs (nothing dialled yet).
    pub fn is_tls_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshaking { side: LISTEN_SIDE, .. })
    }

    /// The time `side`'s TLS handshake took, once, after it passed (the totals' histogram takes
    /// it right after `advance`).
    pub fn take_handshake_time(&mut self, side: usize) -> Option<Duration> {
        self.handshake_time[side].take()
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
            Phase::Greeting { deadline, .. } | Phase::Dialling { deadline } | Phase::Handshaking { deadline, .. } => {
                Some(deadline)
            }
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
            Phase::Handshaking { side: hs, .. } if hs == side => Some(self.tls_interest(side, Interest::READABLE)),
            Phase::Handshaking { .. } => None,
            Phase::Closing { .. } => Some(self.tls_interest(side, Interest::READABLE)),
            Phase::Relaying if self.tls[side].as_ref().is_some_and(TlsStream::wants_write) => {
                // Records rustls holds for this socket (the pump's store may be empty).
                Some(Interest::READABLE | Interest::WRITABLE)
            }
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

    /// `base`, plus write interest while `side`'s TLS session holds records for the socket.
    fn tls_interest(&self, side: usize, base: Interest) -> Interest {
        if self.tls[side].as_ref().is_some_and(TlsStream::wants_write) { base | Interest::WRITABLE } else { base }
    }

    /// One end of direction `d` as the pump sees it (socket `side`, through TLS when it has it).
    fn io(&self, side: usize) -> Io<'_> {
        match &self.tls[side] {
            Some(t) => Io::Tls(&self.socks[side], t),
            None => Io::Plain(&self.socks[side]),
        }
    }

    /// Sends what each TLS session holds for its socket, and completes pending half-closes.
    fn flush_tls(&self) -> Result<(), End> {
        for (side, t) in self.tls.iter().enumerate() {
            if let (Some(t), Some(s)) = (t, self.socks.get(side)) {
                t.flush(s).map_err(|error| End::Failed { side, error })?;
            }
        }
        Ok(())
    }

    /// Runs the handshake on `side`; Ok(true) once it passed (what the peer presented and the
    /// time since `began` are kept).
    fn handshake(&mut self, side: usize, now: Instant, began: Instant, deadline: Instant) -> Result<bool, End> {
        let t = self.tls[side].as_ref().expect("a handshaking side has a TLS session");
        let refused = |reason: crate::tls::Reason, detail: String, presented: Option<String>| End::TlsRefused {
            side,
            reason,
            detail,
            presented,
        };
        match t.handshake(&self.socks[side]) {
            Ok(true) => {
                let took = Instant::now().saturating_duration_since(began);
                self.handshake_time[side] = Some(took);
                self.tls_peer[side] = t
                    .peer_certificate()
                    .and_then(|der| crate::tls::Presented::from_der(&der).ok())
                    .map(|p| p.to_string());
                let who = if side == LISTEN_SIDE { "listen side" } else { "connect side" };
                tracing::info!(
                    side = who,
                    presented = self.tls_peer[side].as_deref().unwrap_or("-"),
                    handshake_us = took.as_micros() as u64,
                    "tls: peer verified"
                );
                Ok(true)
            }
            Ok(false) if now >= deadline => Err(refused(
                crate::tls::Reason::HandshakeTimeout,
                format!("no complete TLS handshake within {} ms", self.tls_timeout.as_millis()),
                None,
            )),
            Ok(false) => Ok(false),
            Err(HandshakeError::Tls(e)) => {
                let presented = crate::tls::Rejected::of(&e).and_then(|r| r.presented.as_ref()).map(|p| p.to_string());
                let detail = crate::tls::Rejected::of(&e).map_or_else(|| e.to_string(), |r| r.detail.clone());
                Err(refused(crate::tls::Reason::of(&e), detail, presented))
            }
            Err(HandshakeError::Closed) => Err(refused(
                crate::tls::Reason::RefusedByPeer,
                "the peer closed the connection during the TLS handshake".into(),
                None,
            )),
            Err(HandshakeError::Io(e)) => Err(End::Failed { side, error: e }),
        }
    }

    /// Dials the far side (after the listen side's TLS handshake or the VM's handshake).
    fn start_dial(&mut self, now: Instant) -> Result<(), End> {
        match Self::dial_to(&self.connect, &self.tcp, self.busy_poll_us) {
            Ok(s) => self.socks.push(s),
            Err(SetupError::Dial(e)) | Err(SetupError::Socket(e)) | Err(SetupError::Pipe(e)) => {
                return Err(End::DialFailed(e));
            }
            Err(SetupError::Tls(e)) => return Err(End::DialFailed(io::Error::other(e))),
        }
        self.phase = Phase::Dialling { deadline: now + self.connect_timeout };
        Ok(())
    }

    /// Records readiness reported for `side`.
    ///
    /// `read_closed`: the peer on `side` stopped sending, and may have gone entirely. vsock
    /// reports a vanished peer this way only (EPOLLIN|EPOLLRDHUP: no EPOLLHUP, no EPOLLOUT), so a
    /// pump blocked on writing to that peer probes once and meets EPIPE, or WouldBlock if the
    /// peer only half-closed, instead of waiting forever.
    pub fn on_ready(&mut self, side: usize, readable: bool, writable: bool, read_closed: bool) {
        if readable || read_closed {
            self.pumps[side].source_ready();
        }
        if read_closed {
            self.pumps[side].source_closing();
        }
        if writable || read_closed {
            self.pumps[1 - side].destination_ready();
        }
    }

    /// Moves the connection forward. `now` is when the loop woke for the events being handled;
    /// `draining` stops all reads (shutdown).
    pub fn advance(&mut self, now: Instant, draining: bool) -> Step {
        if let Phase::Closing { eof } = &mut self.phase {
            return read_to_end_dropping(&self.socks, eof);
        }
        if let Phase::Handshaking { side, began, deadline } = self.phase {
            if draining {
                return Step::Close(End::Drained);
            }
            match self.handshake(side, now, began, deadline) {
                Err(end) => return Step::Close(end),
                Ok(false) => return Step::Continue { more: false },
                Ok(true) if side == LISTEN_SIDE && self.greet => {
                    self.phase = Phase::Greeting {
                        deadline: now + Duration::from_millis(KVMI_HANDSHAKE_TIMEOUT_MS),
                        got: Vec::new(),
                    };
                }
                Ok(true) if side == LISTEN_SIDE => {
                    if let Err(end) = self.start_dial(now) {
                        return Step::Close(end);
                    }
                    return Step::Continue { more: false };
                }
                Ok(true) => {
                    self.phase = Phase::Relaying;
                    // rustls may hold plaintext that arrived with the handshake: no new edge
                    // will say so.
                    self.pumps[side].source_ready();
                    self.pumps[1 - side].source_ready();
                }
            }
        }
        if let Phase::Greeting { deadline, got } = &mut self.phase {
            if draining {
                return Step::Close(End::Drained);
            }
            let src = match &self.tls[LISTEN_SIDE] {
                Some(t) => Io::Tls(&self.socks[LISTEN_SIDE], t),
                None => Io::Plain(&self.socks[LISTEN_SIDE]),
            };
            match read_handshake(&src, got) {
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
                    if let Err(end) = self.start_dial(now) {
                        return Step::Close(end);
                    }
                    return Step::Continue { more: false };
                }
            }
        }
        if let Phase::Dialling { deadline } = self.phase {
            match dial::finish(&self.socks[CONNECT_SIDE]) {
                Ok(true) if self.tls_dial.is_some() => {
                    let (client, addr) = self.tls_dial.clone().expect("checked");
                    match TlsStream::client(client, addr) {
                        Ok(t) => self.tls[CONNECT_SIDE] = Some(t),
                        Err(e) => return Step::Close(End::DialFailed(io::Error::other(e.to_string()))),
                    }
                    let deadline = now + self.tls_timeout;
                    self.phase = Phase::Handshaking { side: CONNECT_SIDE, began: now, deadline };
                    if draining {
                        return Step::Close(End::Drained);
                    }
                    return self.advance(now, draining);
                }
                Ok(true) => {
                    self.phase = Phase::Relaying;
                    if self.tls[LISTEN_SIDE].is_some() {
                        // Plaintext rustls took with the handshake's last records.
                        self.pumps[LISTEN_SIDE].source_ready();
                    }
                }
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

        if let Err(end) = self.flush_tls() {
            return Step::Close(end);
        }
        if !self.preface.is_empty() {
            match send_some(&self.io(CONNECT_SIDE), &self.preface) {
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
            let ended_unseen = self.pumps[d].source_open();
            if ended_unseen && self.tls[d].as_ref().is_some_and(TlsStream::peer_ended) {
                // The peer's close_notify came with its last records: that short read was not
                // the queue running dry, and no edge will bring the end. Read again, as for a
                // peer the socket reported closed (once: from then on short reads do not stop
                // the pump reading).
                self.pumps[d].source_closing();
                self.pumps[d].source_ready();
                more = true;
            }
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
                let dst = match &self.tls[1 - d] {
                    Some(t) => Io::Tls(&self.socks[1 - d], t),
                    None => Io::Plain(&self.socks[1 - d]),
                };
                if let Err(e) = k.flush(flows[d], &dst) {
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

        if self.tls.iter().flatten().any(TlsStream::wants_write) {
            // Records (data, close_notify) still on their way out: write interest brings us back.
            return Step::Continue { more };
        }
        if self.pumps[0].finished() && self.pumps[1].finished() {
            return Step::Close(End::Finished);
        }
        if draining && self.pumps[0].fill() == 0 && self.pumps[1].fill() == 0 {
            for (side, s) in self.socks.iter().enumerate() {
                // A side already half-closed (its source's EOF) or a peer already gone says so
                // again here; reading below tells which.
                match &self.tls[side] {
                    Some(t) => {
                        let _ = t.close_notify(s);
                    }
                    None => {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                }
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
        let io = |side: usize| match &self.tls[side] {
            Some(t) => Io::Tls(&self.socks[side], t),
            None => Io::Plain(&self.socks[side]),
        };
        let (src, dst) = (io(d), io(1 - d));
        let Some((k, flows)) = &self.kvmi else {
            return self.pumps[d].run(&src, &dst, !draining);
        };
        let gate = Gate { sock: &dst, session: k, flow: flows[d] };
        let mut total = self.pumps[d].run(&src, &gate, !draining)?;
        for _ in 0..4 {
            if !k.borrow().is_stuck(flows[d]) {
                break;
            }
            self.pumps[d].destination_ready();
            if total.read_bytes == 0 && !self.pumps[d].src_eof() {
                break;
            }
            let again = self.pumps[d].run(&src, &gate, !draining)?;
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
fn read_handshake(sock: &Io<'_>, got: &mut Vec<u8>) -> Result<Option<crate::kvmi::handshake::Handshake>, String> {
    use crate::kvmi::handshake::{Parse, QEMU_HANDSHAKE_MAX_GPA_BYTES, parse_qemu};
    let mut buf = [0u8; QEMU_HANDSHAKE_MAX_GPA_BYTES];
    loop {
        let needed = match parse_qemu(got).map_err(|r| r.to_string())? {
            Parse::Complete(h) => return Ok(Some(h)),
            Parse::Partial { needed } => needed,
        };
        match crate::datapath::store::Side::recv(sock, &mut buf[..needed - got.len()]) {
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
fn send_some(sock: &Io<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < bytes.len() {
        match crate::datapath::store::Side::send(sock, &bytes[n..]) {
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
