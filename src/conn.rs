//! One relayed session: the accepted peer, the dialled peer, and a pump per direction.
//!
//! States:
//!
//! ```text
//!   accept ──admit──▶ Dialling ──connected──▶ Relaying ──both directions finished──▶ closed
//!                        │ dial error/timeout        │ reset / error ──────────────▶ closed
//!                        └──────────────▶ closed     │ shutdown: stop reading, drain ▶ closed
//! ```
//!
//! A connection never touches the poller: it says which readiness it wants on each socket
//! (`interest`), takes the readiness that happened (`on_ready`) and moves bytes (`advance`);
//! the event loop registers, re-registers and removes. Close rules (checked in `advance`):
//! 1. `finished`: each direction saw EOF, delivered everything and half-closed its destination;
//! 2. `failed`: any error on either socket (reset, broken pipe) tears the pair down at once;
//! 3. `drained`: during shutdown, both stores are empty.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use socket2::Socket;

use crate::access::Peer;
use crate::config::Config;
use crate::dial;
use crate::endpoint::Endpoint;
use crate::metrics::DirMetrics;
use crate::pump::Pump;

/// Socket index of the accepted peer (the listen side).
pub const LISTEN_SIDE: usize = 0;
/// Socket index of the dialled peer (the connect side).
pub const CONNECT_SIDE: usize = 1;
/// Direction names: pump `d` moves bytes from socket `d` to socket `1 - d`.
/// In every KVMi deployment the listen side faces the hypervisor, so l2c is hypervisor →
/// monitor and c2l is monitor → hypervisor.
pub const DIRECTION_NAMES: [&str; 2] = ["l2c", "c2l"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Dialling { deadline: Instant },
    Relaying,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions saw EOF and delivered everything.
    Finished,
    /// Shutdown: the stores are empty.
    Drained,
    /// The far side could not be dialled.
    DialFailed(io::Error),
    DialTimeout(Duration),
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
    socks: [Socket; 2],
    pumps: [Pump; 2],
    phase: Phase,
    pub opened: Instant,
    pub metrics: [DirMetrics; 2],
    /// When bytes of each direction were first seen since its store was last empty.
    arrived: [Option<Instant>; 2],
    /// When each direction last finished forwarding (store emptied), awaiting the answer.
    forwarded: [Option<Instant>; 2],
}

impl Conn {
    /// Takes an admitted peer and starts dialling the far side.
    pub fn new(id: u64, peer: Peer, accepted: Socket, cfg: &Config, now: Instant) -> Result<Conn, SetupError> {
        if peer_is_tcp(&peer) {
            accepted.set_tcp_nodelay(true).map_err(SetupError::Socket)?;
        }
        let dialled = dial::start(&cfg.connect).map_err(SetupError::Dial)?;
        if cfg.busy_poll_us > 0 {
            for s in [&accepted, &dialled] {
                // Best effort: SO_BUSY_POLL is refused on some socket families.
                let _ = s.set_busy_poll(cfg.busy_poll_us);
            }
        }
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
            socks: [accepted, dialled],
            pumps,
            phase: Phase::Dialling { deadline: now + cfg.connect_timeout },
            opened: now,
            metrics: [DirMetrics::new(cfg.hist_log.is_some()), DirMetrics::new(cfg.hist_log.is_some())],
            arrived: [None, None],
            forwarded: [None, None],
        })
    }

    pub fn raw_fd(&self, side: usize) -> RawFd {
        self.socks[side].as_raw_fd()
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
            Phase::Dialling { deadline } => Some(deadline),
            Phase::Relaying => None,
        }
    }

    /// The readiness wanted on `side`; None = not registered at all.
    ///
    /// Read interest stays on for the whole session (it also brings hang-ups and errors);
    /// write interest only while this side's incoming pump waits for room, so a relay whose
    /// writes complete at once is never woken by send-buffer space.
    pub fn interest(&self, side: usize) -> Option<Interest> {
        match self.phase {
            Phase::Dialling { .. } => (side == CONNECT_SIDE).then_some(Interest::WRITABLE),
            Phase::Relaying => {
                if self.pumps[1 - side].blocked_on_dst() {
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

        let mut more = false;
        for d in 0..2 {
            let (src, dst) = (&self.socks[d], &self.socks[1 - d]);
            let run = match self.pumps[d].run(src, dst, !draining) {
                Ok(run) => run,
                Err(e) => {
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

        if self.pumps[0].finished() && self.pumps[1].finished() {
            return Step::Close(End::Finished);
        }
        if draining && self.pumps[0].fill() == 0 && self.pumps[1].fill() == 0 {
            return Step::Close(End::Drained);
        }
        Step::Continue { more }
    }

    /// Closes both sockets so that the peers see a reset rather than an orderly EOF (used when
    /// the other side reset: an EOF would claim the stream ended cleanly).
    pub fn abort(&self) {
        for s in &self.socks {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
    }
}

fn peer_is_tcp(p: &Peer) -> bool {
    matches!(p, Peer::Tcp(_))
}
