//! The event loop: one thread, mio, edge-triggered. It alone registers, re-registers and
//! removes fds; connections only say what they want (`Conn::interest`).
//!
//! Invariants:
//! - Edge-triggered readiness: every handler drains until `WouldBlock` and tolerates spurious
//!   events. Pumps and the listener do it in bounded steps: a pump yields after its round cap,
//!   the listener after `ACCEPTS_PER_TURN_MAX` peers, both with the poll timeout at zero until
//!   they said `WouldBlock` (`Backlog`). Peers are accepted after the turn's data-path work.
//! - Access is decided (`access::decide`) right after accept, before the far side is dialled
//!   and before any byte moves; a refused peer is closed at once and counted, and logged at
//!   most once a second per kind of refusal (`PeerRefusal`, `RateLimit`).
//! - Per-connection failures end in "log with the connection's identity, close it, count it,
//!   keep serving"; only start-up errors leave `run`.
//! - Out of fds a peer waits in the backlog: the loop holds spare fds (`fds::FdReserve`) for
//!   the next peer's socket and dial, lets them go just before each accept and takes them back
//!   after; when it cannot, it stops accepting until a session closes or `ACCEPT_PAUSE_MS`
//!   passes, instead of accepting a peer it cannot serve or spinning on a readable listener.
//!   One log line when that starts, one when the last waiting peer is taken.
//! - Timeouts (dial deadlines, control clients' deadlines, the interval-log tick, the watchdog
//!   ping, the accept pause, the shutdown deadline) are swept once per loop turn; there is no
//!   timer thread.
//! - Bounded polling: for `--poll-window-us` after any event the loop polls with a zero timeout,
//!   yielding the CPU before each poll, and only then sleeps; yields that keep losing the CPU
//!   for a scheduler slice suspend it for a while (`window`; docs/DESIGN.md, invariant 14).
//! - The control socket's clients and the interval log are served from this loop too; building
//!   a snapshot reads the connections, it never changes the data path. Control work comes after
//!   the data path's events in each turn and is bounded per turn (`operator::serve_control`:
//!   accepts, at most one snapshot, a time share for snapshots).

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::access::{self, Verdict};
use crate::config::Config;
use crate::datapath::conn::{CONNECT_SIDE, Conn, End, LISTEN_SIDE, SetupError, Step};
use crate::datapath::pump::{DirStats, Pump};
use crate::error::StartError;
use crate::kvmi::session::FiguresByType;
use crate::net::listener::Listener;
use crate::observe::control::{CONTROL_CONNS_MAX, ControlConn, ControlServer};
use crate::observe::export::{Closed, DirSnap, Directions};
use crate::observe::histlog::HistLog;
use crate::observe::metrics::{self, DirMetrics, Figures};
use crate::observe::ratelimit::RateLimit;
use crate::observe::textfile::MetricsFile;
use crate::observe::totals::Totals;
use crate::relay::service::{Notifier, Status};
use crate::sys;
use window::{PollWindow, RUN_DELAY_SAMPLE, SchedStat};

mod fds;
mod operator;
pub mod service;
mod window;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const CONTROL: Token = Token(2);
/// Control clients: `CONTROL_CONN_BASE + index`, below `CONN_TOKEN_BASE`.
const CONTROL_CONN_BASE: usize = 4;
/// Connection tokens: `CONN_TOKEN_BASE + slot * 2 + side`.
const CONN_TOKEN_BASE: usize = 16;
/// How long accepting pauses after EMFILE/ENFILE.
const ACCEPT_PAUSE_MS: u64 = 100;
/// Most peers taken from the listener's backlog per loop turn, after the data path's work: a
/// flood of connections then costs each live session at most this many accepts of waiting per
/// turn, and the rest of the backlog waits for the next turn (which does not sleep).
const ACCEPTS_PER_TURN_MAX: usize = 16;
/// At most one warning per kind of refusal in this time (data listener and control socket);
/// the next carries how many were left out.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
const EVENTS_CAPACITY: usize = 256;
// The token ranges never overlap: the fixed tokens, the control clients, then the sessions.
const _: () = assert!(
    LISTENER.0 < CONTROL_CONN_BASE
        && SIGNALS.0 < CONTROL_CONN_BASE
        && CONTROL.0 < CONTROL_CONN_BASE
        && CONTROL_CONN_BASE + CONTROL_CONNS_MAX <= CONN_TOKEN_BASE
);

/// Why the data listener turned a peer away; each kind has its own `RateLimit`.
#[derive(Debug, Clone, Copy)]
enum PeerRefusal {
    /// Its identity could not be read (counted in `refused_access`).
    NoIdentity,
    /// The access policy said no (`refused_access`).
    Access,
    /// `--max-conns` sessions were running (`refused_busy`).
    Busy,
}

impl PeerRefusal {
    const COUNT: usize = 3;
}

struct Slot {
    conn: Conn,
    /// The connection's log span: its id and the peer's identity on every line.
    span: tracing::Span,
    /// What is registered with the poller for each side.
    registered: [Option<Interest>; 2],
    /// `--replace-after-ms`: a newer session was admitted over the limit; this one closes at
    /// `at` unless it ends first (or the newer one does, which cancels it).
    replaced: Option<Replacement>,
}

#[derive(Debug, Clone, Copy)]
struct Replacement {
    /// The session that takes this one's place.
    by: u64,
    at: Instant,
}

pub struct Relay {
    cfg: Config,
    poll: Poll,
    listener: Option<Listener>,
    signals: Signals,
    slots: Vec<Option<Slot>>,
    live: usize,
    next_id: u64,
    pub totals: Totals,
    /// Whether peers may be waiting in the listener's backlog.
    backlog: Backlog,
    /// Refusal warnings of the data listener, one limit per `PeerRefusal`: a flood of refused
    /// peers writes a line a second per kind, every peer still counted in `totals`.
    refusal_logs: [RateLimit; PeerRefusal::COUNT],
    /// Spare fds for the next peer (`fds`), and the episode of running out, while it lasts.
    fds: fds::FdReserve,
    starved: Option<fds::Starvation>,
    shutdown_deadline: Option<Instant>,
    /// Connections to advance again on the next turn without waiting for an event.
    rerun: VecDeque<usize>,
    /// Bounded polling (`--poll-window-us`).
    window: PollWindow,
    /// The relay's own run delay, which tells the window when the CPUs are crowded.
    sched: Option<SchedStat>,
    /// No run-delay sample before then.
    next_sched_sample: Instant,
    /// The service manager's side: readiness, status, watchdog pings from this loop.
    service: Notifier,
    /// The address the listener actually bound (shows the port chosen for `tcp:IP:0`).
    bound: String,
    started: Instant,
    control: Option<ControlServer>,
    control_conns: Vec<Option<(ControlConn, Interest)>>,
    /// The control socket's share of each turn (`operator`): bounded accepts and snapshots.
    ctl: operator::ControlTurn,
    hist_log: Option<HistLog>,
    /// `--metrics-textfile`: the Prometheus text rewritten every interval, removed on drop.
    metrics_file: Option<MetricsFile>,
    /// Figures of the sessions that have closed (since start or the last reset), per direction.
    /// Allocated when a session closes for the first time: a relay whose VM keeps one session open for its
    /// whole life never holds these six histograms (~175 KiB).
    closed: Option<Box<[ClosedDir; 2]>>,
    /// `--kvmi`: figures per message type of the sessions that have closed (since start or the
    /// last reset), and the VM's name and uuid from the last handshake of a closed session.
    kvmi_closed: FiguresByType,
    kvmi_last_vm: Option<(String, String)>,
}

/// One direction's figures over every closed session: its counts (bytes by strategy, chunks,
/// high water) and its histograms, together.
#[derive(Debug, Clone)]
struct ClosedDir {
    stats: DirStats,
    figures: Figures,
    chunk_bytes: hdrhistogram::Histogram<u64>,
}

impl ClosedDir {
    /// Folds one session's direction in.
    fn absorb(&mut self, metrics: &DirMetrics, pump: &Pump) {
        self.stats.add(&pump.stats);
        self.figures.add(&metrics.transit_ns, &metrics.turnaround_ns);
        let _ = self.chunk_bytes.add(&pump.chunk_bytes);
    }

    fn snap(&self, d: usize) -> DirSnap {
        DirSnap::of(d, &self.stats, &self.figures.transit_ns, &self.figures.turnaround_ns, &self.chunk_bytes)
    }
}

impl Default for ClosedDir {
    fn default() -> Self {
        ClosedDir { stats: DirStats::default(), figures: Figures::default(), chunk_bytes: metrics::chunk_histogram() }
    }
}

/// One live or closing session's direction, as `stats` and the log lines show it.
fn session_dir(conn: &Conn, d: usize) -> DirSnap {
    let (p, m) = (conn.pump(d), &conn.metrics[d]);
    DirSnap::of(d, &p.stats, &m.transit_ns, &m.turnaround_ns, &p.chunk_bytes)
}

/// The listener's backlog as the loop knows it. Edge-triggered: an event says peers may wait,
/// and only an accept that says `WouldBlock` says none does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    /// The last accept said `WouldBlock`: nothing to do until the next event.
    Empty,
    /// Peers may wait: accept on this turn, after the data path.
    Pending,
    /// Out of fds (or an accept error that may repeat): leave peers waiting until then, or
    /// until a session closes.
    PausedUntil(Instant),
}

impl Backlog {
    /// A listener event: peers arrived. A pause stands (they wait for it).
    fn on_event(&mut self) {
        if *self == Backlog::Empty {
            *self = Backlog::Pending;
        }
    }

    fn is_due(&self, now: Instant) -> bool {
        match *self {
            Backlog::Empty => false,
            Backlog::Pending => true,
            Backlog::PausedUntil(t) => now >= t,
        }
    }

    fn paused_until(&self) -> Option<Instant> {
        match *self {
            Backlog::PausedUntil(t) => Some(t),
            Backlog::Empty | Backlog::Pending => None,
        }
    }
}

impl Relay {
    pub fn new(cfg: Config, listener: Listener) -> Result<Relay, StartError> {
        let bound = listener.bound();
        let poll = Poll::new().map_err(StartError::Poll)?;
        poll.registry()
            .register(&mut SourceFd(&listener.raw_fd()), LISTENER, Interest::READABLE)
            .map_err(StartError::Poll)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1]).map_err(StartError::Signals)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(StartError::Signals)?;
        let now = Instant::now();
        // Everything created from here on is removed again if a later step fails (drop order).
        let control = match &cfg.control {
            Some(path) => {
                let c = ControlServer::bind(path)?;
                poll.registry()
                    .register(&mut SourceFd(&c.raw_fd()), CONTROL, Interest::READABLE)
                    .map_err(StartError::Poll)?;
                Some(c)
            }
            None => None,
        };
        let hist_log = match &cfg.hist_log {
            Some(path) => {
                let log = HistLog::open(path, cfg.hist_interval, &cfg.name, cfg.kvmi.is_some(), now)
                    .map_err(|source| StartError::HistLog { path: path.clone(), source })?;
                crate::files::warn_if_others_can_write("--hist-log", path);
                Some(log)
            }
            None => None,
        };
        let cfg_metrics_file = cfg.metrics_textfile.as_deref().map(|d| MetricsFile::new(d, &cfg.name, now));
        let window = PollWindow::new(cfg.poll_window);
        Ok(Relay {
            cfg,
            poll,
            listener: Some(listener),
            signals,
            slots: Vec::new(),
            live: 0,
            next_id: 1,
            totals: Totals::default(),
            backlog: Backlog::Pending,
            refusal_logs: std::array::from_fn(|_| RateLimit::new(REFUSAL_LOG_EVERY)),
            fds: fds::FdReserve::new(),
            starved: None,
            shutdown_deadline: None,
            rerun: VecDeque::new(),
            sched: if window.is_enabled() { SchedStat::open() } else { None },
            next_sched_sample: now,
            window,
            service: Notifier::from_env(),
            bound,
            started: now,
            control,
            control_conns: (0..CONTROL_CONNS_MAX).map(|_| None).collect(),
            ctl: operator::ControlTurn::new(),
            hist_log,
            metrics_file: cfg_metrics_file,
            closed: None,
            kvmi_closed: FiguresByType::new(),
            kvmi_last_vm: None,
        })
    }

    /// Runs until SIGTERM/SIGINT and the drain that follows; Ok on a clean stop.
    pub fn run(&mut self) -> Result<(), StartError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut touched: Vec<usize> = Vec::with_capacity(8);
        self.service.ready(Instant::now(), Status::new(self.live, self.cfg.max_conns, &self.totals));
        sys::give_back_free_heap_pages();
        loop {
            let live_before = self.live;
            let now = Instant::now();
            let timeout = self.next_timeout(now);
            let yielded = timeout == Some(Duration::ZERO) && self.rerun.is_empty() && self.window.is_open(now);
            if yielded {
                // Polling inside the window: give the CPU to anything runnable first. On a machine
                // with as many busy threads as CPUs (the peers, another relay) a spinner that does
                // not yield holds its CPU for a whole slice while the peer it waits for cannot run.
                std::thread::yield_now();
            }
            let polled = self.poll.poll(&mut events, timeout);
            let (before, now) = (now, Instant::now());
            if yielded && self.window.after_yield(now, now - before) {
                self.totals.poll_window_suspensions += 1;
                let yield_us = (now - before).as_micros() as u64;
                debug!(yield_us, "poll window suspended: yields keep losing this CPU to another thread");
            }
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StartError::Loop(e));
            }
            if !events.is_empty() {
                self.sample_run_delay(now);
                self.window.on_events(now);
            }

            for ev in events.iter() {
                match ev.token() {
                    // Peers are taken after the data path's work, a few per turn (`accept_some`).
                    LISTENER => self.backlog.on_event(),
                    SIGNALS => self.handle_signals(now),
                    // Control work waits for `serve_control`, after the data path's.
                    CONTROL => self.ctl.on_listener_event(),
                    Token(t) if (CONTROL_CONN_BASE..CONTROL_CONN_BASE + CONTROL_CONNS_MAX).contains(&t) => {
                        self.ctl.on_client_event(t - CONTROL_CONN_BASE)
                    }
                    Token(t) if t >= CONN_TOKEN_BASE => {
                        let slot = (t - CONN_TOKEN_BASE) / 2;
                        let side = (t - CONN_TOKEN_BASE) % 2;
                        if let Some(Some(s)) = self.slots.get_mut(slot) {
                            // Hang-ups and errors show up as readable/writable so the pump's next
                            // read or write meets them and reports them with their errno.
                            let readable = ev.is_readable() || ev.is_error();
                            let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                            s.conn.on_ready(side, readable, writable, ev.is_read_closed());
                            if !touched.contains(&slot) {
                                touched.push(slot);
                            }
                        }
                    }
                    Token(_) => debug!("event for an unknown token"),
                }
            }

            let reruns = self.rerun.len();
            for _ in 0..reruns {
                if let Some(slot) = self.rerun.pop_front() {
                    if !touched.contains(&slot) {
                        touched.push(slot);
                    }
                }
            }
            for slot in touched.drain(..) {
                self.advance(slot, now);
            }
            self.accept_some(now);
            self.serve_control(now);

            self.sweep_timeouts(now);
            if self.live == 0 && live_before > 0 {
                // This turn closed the last session (by its pumps or by a deadline): its buffers
                // and histograms are free now, and a VM's relay may sit idle for hours.
                sys::give_back_free_heap_pages();
            }
            // Watchdog pings come from here, so a loop that stops turning stops pinging.
            self.service.turn(now, Status::new(self.live, self.cfg.max_conns, &self.totals));
            if self.shutdown_deadline.is_some() && self.live == 0 {
                // The last, partial interval too: a run shorter than one interval still logs.
                self.write_intervals(Instant::now());
                self.totals_now().log(self.live, "stopped");
                return Ok(());
            }
        }
    }

    /// At most every `RUN_DELAY_SAMPLE` while events come: tells the window whether the CPUs
    /// are crowded (`window`).
    fn sample_run_delay(&mut self, now: Instant) {
        if now < self.next_sched_sample {
            return;
        }
        self.next_sched_sample = now + RUN_DELAY_SAMPLE;
        let Some((waited, runs)) = self.sched.as_mut().and_then(SchedStat::sample) else { return };
        if self.window.on_run_delay(waited, runs) {
            let waited_us = waited.as_micros() as u64;
            debug!(waited_us, runs, crowded = self.window.is_crowded(), "poll window: CPUs crowded or free again");
        }
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.rerun.is_empty() || self.backlog.is_due(now) {
            return Some(Duration::ZERO);
        }
        if self.window.is_open(now) || self.ctl.due(now) {
            return Some(Duration::ZERO);
        }
        let dial = self.slots.iter().flatten().filter_map(|s| s.conn.deadline());
        let replaced = self.slots.iter().flatten().filter_map(|s| s.replaced.map(|r| r.at));
        let control = self.control_conns.iter().flatten().map(|(c, _)| c.next_deadline());
        let soonest = dial
            .chain(replaced)
            .chain(control)
            .chain(self.hist_log.as_ref().map(HistLog::next_tick))
            .chain(self.metrics_file.as_ref().map(MetricsFile::next_tick))
            .chain(self.backlog.paused_until())
            .chain(self.ctl.next_deadline())
            .chain(self.shutdown_deadline)
            .chain(self.service.next_deadline())
            .min()?;
        // Round up so that a wake-up lands at or after the deadline, not a hair before it.
        Some(soonest.saturating_duration_since(now) + Duration::from_millis(1))
    }

    /// Takes up to `ACCEPTS_PER_TURN_MAX` waiting peers, when the backlog is due.
    fn accept_some(&mut self, now: Instant) {
        if self.listener.is_none() {
            self.backlog = Backlog::Empty;
        }
        if !self.backlog.is_due(now) {
            return;
        }
        // Until an accept says otherwise, more may wait (the bound below ends a turn early).
        self.backlog = Backlog::Pending;
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let Some(listener) = &self.listener else { return };
            // After every peer the spares are taken back; without them the next one waits.
            if !self.fds.refill() {
                self.starve(now, "no fd free for the next peer's socket and dial");
                return;
            }
            self.fds.release();
            let accepted = listener.accept();
            let (sock, peer) = match accepted {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fds.refill();
                    self.backlog = Backlog::Empty;
                    if let Some(s) = self.starved.take() {
                        info!(
                            lasted_ms = s.lasted(now).as_millis() as u64,
                            waited = s.waited,
                            "fds are back: every peer that waited in the backlog has been taken"
                        );
                    }
                    return;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) =>
                {
                    // Something else took the fds the spares left (or the kernel is short of
                    // memory): the pending peer stays in the backlog.
                    self.starve(now, &e.to_string());
                    return;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO)
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Anything else may repeat on every call: pause rather than spin.
                    error!(error = %e, pause_ms = ACCEPT_PAUSE_MS, "accept failed; pausing accept");
                    self.backlog = Backlog::PausedUntil(now + Duration::from_millis(ACCEPT_PAUSE_MS));
                    return;
                }
            };
            if let Some(s) = &mut self.starved {
                s.waited += 1;
            }
            let peer = match peer {
                Ok(p) => p,
                Err(e) => {
                    // That peer alone is closed (dropped here); the listener goes on.
                    self.totals.accepted += 1;
                    self.totals.refused_access += 1;
                    if let Some(suppressed) = self.refusal_logs[PeerRefusal::NoIdentity as usize].hit(now) {
                        warn!(name = %self.cfg.name, error = %e, suppressed, "refused: cannot read the peer's identity");
                    }
                    continue;
                }
            };
            self.totals.accepted += 1;
            if let Verdict::Deny(why) = access::decide(&self.cfg.policy, &peer) {
                self.totals.refused_access += 1;
                if let Some(suppressed) = self.refusal_logs[PeerRefusal::Access as usize].hit(now) {
                    warn!(name = %self.cfg.name, %peer, reason = why, suppressed, "refused");
                }
                continue;
            }
            let replaces = match self.cfg.replace_after {
                Some(grace) if self.live >= self.cfg.max_conns => self.oldest_unreplaced().map(|slot| (slot, grace)),
                _ => None,
            };
            if self.live >= self.cfg.max_conns && replaces.is_none() {
                self.totals.refused_busy += 1;
                if let Some(suppressed) = self.refusal_logs[PeerRefusal::Busy as usize].hit(now) {
                    warn!(
                        name = %self.cfg.name,
                        %peer,
                        max_conns = self.cfg.max_conns,
                        suppressed,
                        "refused: --max-conns sessions already running"
                    );
                }
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if let Some((old, grace)) = replaces {
                if let Some(Some(s)) = self.slots.get_mut(old) {
                    s.replaced = Some(Replacement { by: id, at: now + grace });
                    self.totals.replaced += 1;
                    let _e = s.span.enter();
                    info!(
                        by = id,
                        %peer,
                        grace_ms = grace.as_millis() as u64,
                        "a newer session is admitted over --max-conns; this one closes after the grace unless it ends first"
                    );
                }
            }
            // Past the policy and the limit the peer is admitted, whatever the dial does next.
            self.totals.admitted += 1;
            let span = tracing::info_span!("conn", id, peer = %peer, to = %self.cfg.connect);
            let conn = match Conn::new(id, peer, sock, &self.cfg, now) {
                Ok(c) => c,
                Err(e) => {
                    self.cancel_replacement(id);
                    let _e = span.enter();
                    match e {
                        // The same line as a dial that fails later (`close`).
                        SetupError::Dial(e) => {
                            self.totals.dial_failed += 1;
                            warn!(target = %self.cfg.connect, error = %e, "cannot reach the far side; closing the peer");
                        }
                        e => {
                            self.totals.failed += 1;
                            warn!(error = %e, "cannot set the session up; closing the peer");
                        }
                    }
                    continue;
                }
            };
            span.in_scope(|| {
                if conn.is_tls_handshaking() {
                    info!("admitted; TLS handshake before dialling")
                } else if conn.is_greeting() {
                    info!("admitted; reading the VM's handshake before dialling")
                } else {
                    info!("admitted; dialling")
                }
            });
            let slot = match self.slots.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            self.slots[slot] = Some(Slot { conn, span, registered: [None, None], replaced: None });
            self.live += 1;
            self.advance(slot, now);
        }
    }

    /// Out of fds: the next peer waits in the backlog; accepting resumes when a session closes
    /// or the pause runs out. Logged once per episode.
    fn starve(&mut self, now: Instant, why: &str) {
        self.backlog = Backlog::PausedUntil(now + Duration::from_millis(ACCEPT_PAUSE_MS));
        if self.starved.is_none() {
            self.starved = Some(fds::Starvation::new(now));
            self.totals.accept_pauses += 1;
            warn!(
                reason = why,
                retry_ms = ACCEPT_PAUSE_MS,
                "out of fds: peers wait in the backlog until a session closes"
            );
        }
    }

    /// The oldest live session that no newer one is replacing yet (at most one handover at a
    /// time: a second newcomer while one is pending is refused).
    fn oldest_unreplaced(&self) -> Option<usize> {
        if self.slots.iter().flatten().any(|s| s.replaced.is_some()) {
            return None;
        }
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .min_by_key(|&i| self.slots[i].as_ref().map(|s| s.conn.id))
    }

    /// The newer session `by` has ended before the grace ran out: the one it was replacing stays.
    fn cancel_replacement(&mut self, by: u64) {
        for other in self.slots.iter_mut().flatten() {
            if other.replaced.is_some_and(|r| r.by == by) {
                other.replaced = None;
                let _e = other.span.enter();
                info!(by, "the session replacing this one has ended; this one stays");
            }
        }
    }

    fn advance(&mut self, slot: usize, now: Instant) {
        let draining = self.shutdown_deadline.is_some();
        let Some(Some(s)) = self.slots.get_mut(slot) else { return };
        let step = {
            let _entered = s.span.enter();
            s.conn.advance(now, draining)
        };
        for side in [LISTEN_SIDE, CONNECT_SIDE] {
            if let Some(took) = s.conn.take_handshake_time(side) {
                self.totals.tls_handshake(side, took);
            }
        }
        match step {
            Step::Continue { more } => {
                if let Err(e) = self.sync_interest(slot) {
                    self.close(slot, End::Failed { side: LISTEN_SIDE, error: e });
                    return;
                }
                if more && !self.rerun.contains(&slot) {
                    self.rerun.push_back(slot);
                }
            }
            Step::Close(end) => self.close(slot, end),
        }
    }

    /// Brings the poller in line with what the connection wants, touching only what changed.
    fn sync_interest(&mut self, slot: usize) -> io::Result<()> {
        let Some(Some(s)) = self.slots.get_mut(slot) else { return Ok(()) };
        for side in [LISTEN_SIDE, CONNECT_SIDE] {
            let want = s.conn.interest(side);
            if want == s.registered[side] {
                continue;
            }
            let fd = s.conn.raw_fd(side);
            let token = Token(CONN_TOKEN_BASE + slot * 2 + side);
            let registry = self.poll.registry();
            match (s.registered[side], want) {
                (None, Some(i)) => registry.register(&mut SourceFd(&fd), token, i)?,
                (Some(_), Some(i)) => registry.reregister(&mut SourceFd(&fd), token, i)?,
                (Some(_), None) => registry.deregister(&mut SourceFd(&fd))?,
                (None, None) => {}
            }
            s.registered[side] = want;
        }
        Ok(())
    }

    fn close(&mut self, slot: usize, end: End) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else { return };
        self.live -= 1;
        self.cancel_replacement(s.conn.id);
        if self.starved.is_some() {
            // Its fds are free once it is gone: a waiting peer is taken on the next turn.
            self.backlog = Backlog::Pending;
        }
        self.rerun.retain(|&x| x != slot);
        for side in [LISTEN_SIDE, CONNECT_SIDE] {
            if s.registered[side].is_some() {
                let _ = self.poll.registry().deregister(&mut SourceFd(&s.conn.raw_fd(side)));
            }
        }
        let conn = s.conn;
        let _entered = s.span.enter();
        match &end {
            End::Finished | End::Drained => {}
            End::Aborted => {
                self.totals.aborted += 1;
                conn.abort();
            }
            End::Replaced { by } => {
                info!(by, "replaced by a newer session (--replace-after-ms); closing both sides");
            }
            End::DialFailed(e) => {
                self.totals.dial_failed += 1;
                warn!(target = %self.cfg.connect, error = %e, "cannot reach the far side; closing the peer");
            }
            End::DialTimeout(d) => {
                self.totals.dial_failed += 1;
                warn!(target = %self.cfg.connect, after_ms = d.as_millis() as u64, "dial timed out; closing the peer");
            }
            End::Protocol(why) => {
                self.totals.kvmi_malformed += 1;
                warn!(reason = %why, "kvmi: malformed stream; closing both sides");
            }
            End::TlsRefused { side, reason, detail, presented } => {
                if let Some(i) = crate::tls::Reason::ALL.iter().position(|r| r == reason) {
                    self.totals.tls_refusals[i] += 1;
                }
                let who = if *side == LISTEN_SIDE { "listen side" } else { "connect side" };
                warn!(
                    side = who,
                    reason = reason.as_str(),
                    detail = %crate::tls::escape(detail),
                    presented = presented.as_deref().unwrap_or("-"),
                    "tls: handshake refused; nothing forwarded, closing the pair"
                );
            }
            End::Refused(why) => {
                self.totals.refused_handshake += 1;
                warn!(reason = %why, "handshake refused; nothing dialled, closing the peer");
            }
            End::Failed { side, error } => {
                self.totals.failed += 1;
                let who = if *side == LISTEN_SIDE { "listen side" } else { "connect side" };
                // A peer going away is routine; anything else deserves attention.
                match error.raw_os_error() {
                    Some(libc::ECONNRESET) | Some(libc::EPIPE) => {
                        info!(side = who, error = %error, "peer reset; tearing the pair down")
                    }
                    Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => {
                        warn!(side = who, error = %error, "tearing the pair down")
                    }
                    // A TLS peer that ended TCP without close_notify: gone, or a truncation
                    // attempt; the peer's doing, not the relay's.
                    None if error.kind() == io::ErrorKind::UnexpectedEof => {
                        warn!(side = who, error = %error, "tearing the pair down")
                    }
                    _ => error!(side = who, error = %error, "tearing the pair down"),
                }
                conn.abort();
            }
        }
        if matches!(end, End::DialFailed(_) | End::DialTimeout(_) | End::Refused(_) | End::TlsRefused { .. }) {
            return;
        }
        self.totals.closed += 1;
        let (vm_name, vm_uuid) = conn.vm_identity();
        let kvmi_messages = conn.kvmi.as_ref().map_or_else(|| "-".to_string(), |(k, _)| k.borrow().summary());
        if let Some((k, _)) = &conn.kvmi {
            for (t, f) in &k.borrow().figures {
                self.kvmi_closed.entry(*t).or_default().add(f);
            }
            if vm_uuid != "-" {
                self.kvmi_last_vm = Some((vm_name.clone(), vm_uuid.clone()));
            }
        }
        let closed = self.closed.get_or_insert_with(Default::default);
        for (d, c) in closed.iter_mut().enumerate() {
            c.absorb(&conn.metrics[d], conn.pump(d));
        }
        if let Some(h) = &mut self.hist_log {
            h.absorb(&conn.metrics);
            if let Some((k, _)) = &conn.kvmi {
                h.take_kvmi(&mut k.borrow_mut().figures);
            }
        }
        let closed = Closed {
            end: end_name(&end),
            duration_ms: conn.opened.elapsed().as_millis() as u64,
            directions: &[0, 1].map(|d| session_dir(&conn, d)),
            vm_name: &vm_name,
            vm_uuid: &vm_uuid,
            kvmi_messages: &kvmi_messages,
        };
        info!("closed {closed}");
    }

    fn sweep_timeouts(&mut self, now: Instant) {
        for i in 0..self.control_conns.len() {
            let Some((c, _)) = &mut self.control_conns[i] else { continue };
            match c.on_timer(now) {
                Ok(true) => {}
                Ok(false) => {
                    debug!("control client timed out");
                    self.close_control(i);
                }
                Err(e) => {
                    debug!(error = %e, "control client: cannot greet");
                    self.close_control(i);
                }
            }
        }
        if self.hist_log.as_ref().is_some_and(|h| now >= h.next_tick()) {
            self.write_intervals(now);
        }
        if self.metrics_file.as_ref().is_some_and(|m| now >= m.next_tick()) {
            self.write_metrics_file(now);
        }
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().and_then(|s| s.conn.deadline()).filter(|&d| now >= d).map(|_| i))
            .collect();
        for slot in expired {
            self.advance(slot, now);
        }
        let replaced: Vec<(usize, u64)> = (0..self.slots.len())
            .filter_map(|i| self.slots[i].as_ref().and_then(|s| s.replaced).filter(|r| now >= r.at).map(|r| (i, r.by)))
            .collect();
        for (slot, by) in replaced {
            self.close(slot, End::Replaced { by });
        }
        if self.shutdown_deadline.is_some_and(|t| now >= t) {
            let left: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_some()).collect();
            if !left.is_empty() {
                warn!(
                    connections = left.len(),
                    "shutdown timeout: aborting sessions that still hold bytes or whose peers did not end their side"
                );
            }
            for slot in left {
                self.close(slot, End::Aborted);
            }
        }
    }

    fn handle_signals(&mut self, now: Instant) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGTERM | SIGINT => self.begin_shutdown(now, sig),
                SIGUSR1 => self.log_live(),
                SIGHUP => {
                    match &mut self.hist_log {
                        Some(h) => match h.reopen() {
                            Ok(()) => info!(path = %h.path().display(), "SIGHUP: reopened the histogram log"),
                            Err(e) => {
                                error!(path = %h.path().display(), error = %e, "SIGHUP: cannot reopen the histogram log")
                            }
                        },
                        None if self.cfg.tls.is_none() => info!("SIGHUP: nothing to reopen"),
                        None => {}
                    }
                    self.reload_tls();
                }
                _ => {}
            }
        }
    }

    /// SIGHUP: re-reads `--tls-cert`, `--tls-key` and `--tls-ca` with the checks of start-up.
    /// New sessions use what was read; live ones keep the session they have. A file that no
    /// longer passes keeps the configuration in force, and the log says why.
    fn reload_tls(&mut self) {
        let Some(t) = &mut self.cfg.tls else { return };
        match crate::tls::load(&t.settings, std::time::SystemTime::now()) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    warn!(file = %w, "SIGHUP: tls: accepted with a warning");
                }
                info!(
                    own = %loaded.own,
                    not_after = %crate::tls::utc_text(loaded.own.not_after),
                    "SIGHUP: tls: reloaded; new sessions use it"
                );
                t.loaded = loaded;
            }
            Err(problems) => {
                for p in &problems {
                    error!(file = %p, "SIGHUP: tls: not reloaded, the configuration in force stays");
                }
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant, sig: i32) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!(signal = sig, live = self.live, "stopping: no new peers, delivering bytes in flight");
        self.service.stopping(self.live);
        if let Some(l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.raw_fd()));
            // Dropping the listener closes it and removes the socket file it created.
        }
        self.shutdown_deadline = Some(now + self.cfg.shutdown_timeout);
        let slots: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_some()).collect();
        for slot in slots {
            self.advance(slot, now);
        }
    }

    /// The life counters, with the bytes of the closed and the live sessions: what `stats` and
    /// the totals line show.
    fn totals_now(&self) -> Totals {
        let mut t = self.totals.clone();
        let mut add = |d: usize, stats: &DirStats| {
            t.bytes[d] += stats.bytes;
            t.splice_bytes[d] += stats.splice_bytes;
            t.copy_bytes[d] += stats.copy_bytes;
        };
        for d in 0..2 {
            if let Some(c) = &self.closed {
                add(d, &c[d].stats);
            }
            for s in self.slots.iter().flatten() {
                add(d, &s.conn.pump(d).stats);
            }
        }
        t
    }

    fn log_live(&self) {
        self.totals_now().log(self.live, "SIGUSR1: totals, then the live connections");
        for s in self.slots.iter().flatten() {
            let c = &s.conn;
            let _e = s.span.enter();
            info!("live {}", Directions(&[0, 1].map(|d| session_dir(c, d))));
        }
    }
}

fn end_name(end: &End) -> &'static str {
    match end {
        End::Finished => "finished",
        End::Drained => "drained",
        End::Aborted => "aborted",
        End::Replaced { .. } => "replaced",
        End::DialFailed(_) => "dial-failed",
        End::DialTimeout(_) => "dial-timeout",
        End::Refused(_) => "refused-handshake",
        End::TlsRefused { .. } => "tls-refused",
        End::Protocol(_) => "kvmi-malformed",
        End::Failed { .. } => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_due_after_an_event_and_a_pause_outlasts_new_events() {
        let now = Instant::now();
        let mut b = Backlog::Empty;
        assert!(!b.is_due(now), "nothing waits until the listener says so");
        b.on_event();
        assert_eq!(b, Backlog::Pending);
        assert!(b.is_due(now));
        let until = now + Duration::from_millis(ACCEPT_PAUSE_MS);
        b = Backlog::PausedUntil(until);
        b.on_event();
        assert_eq!(b, Backlog::PausedUntil(until), "peers that arrive during a pause wait for it");
        assert!(!b.is_due(now) && b.is_due(until));
        assert_eq!(b.paused_until(), Some(until));
    }
}
