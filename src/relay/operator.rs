//! What operators see, served from the event loop: control-socket clients (`stats`, `reset`),
//! snapshots of every live and closed session, and the interval log's ticks.
//!
//! Invariants:
//! - Reading only: a snapshot or an interval tick reads connections and never changes the data
//!   path; `reset` zeroes counters and histograms and touches nothing else.
//! - Control clients are registered, re-registered and removed here with the loop's poller, like
//!   relayed connections; a client that fails or overstays its deadline is closed, never waited on.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use mio::Token;
use mio::unix::SourceFd;
use tracing::{error, info, warn};

use super::{CONTROL_CONN_BASE, Relay, session_dir};
use crate::access::Peer;
use crate::escape::Escaped;
use crate::kvmi::session::FiguresByType;
use crate::observe::control::{
    Accepted, CONTROL_CONNS_MAX, CONTROL_CONNS_PER_PROCESS_MAX, ControlConn, ControlStep, Format, Place, Refusal,
    Request, slot_for,
};
use crate::observe::export::{self, ConnSnap, HistSnap, KvmiSnap, MessageSnap, Snapshot};
use crate::observe::ratelimit::RateLimit;
use crate::observe::totals::Totals;

/// Accepts taken from the control socket in one loop turn; the rest wait for the next turn
/// (a zero poll timeout: edge-triggered epoll says nothing more about clients already queued).
const CONTROL_ACCEPTS_PER_TURN: usize = CONTROL_CONNS_MAX + 12;
/// How long the control socket stops accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM (or another
/// failure of the listener itself) before it tries again.
const CONTROL_PAUSE_MS: u64 = 100;
/// After a snapshot is rendered for a control client, the next waits `RENDER_SPACING` times as
/// long as that one took: answers take at most 1/(1+RENDER_SPACING) of the loop's time (~2 %),
/// however many clients ask. "Took" is the loop thread's CPU time: in wall time a render the
/// scheduler preempted (a busy CPU) would count the wait, and one preempted for 40 ms would
/// hold the next back for 2 s, past the deadline of every request waiting for it.
const RENDER_SPACING: u32 = 49;
use super::REFUSAL_LOG_EVERY;

/// The control socket's share of each loop turn: what is due, what waits for the next turn.
pub(super) struct ControlTurn {
    /// The listener said readable, or the last turn stopped at `CONTROL_ACCEPTS_PER_TURN`.
    accept_due: bool,
    /// Clients with an event this turn, served after the data path's.
    ready: [bool; CONTROL_CONNS_MAX],
    /// Clients whose request needs a snapshot that this turn's budget did not allow, oldest first.
    waiting: VecDeque<(usize, Option<Request>)>,
    /// No accept before then (out of fds, or the listener failed).
    paused_until: Option<Instant>,
    /// Out of fds since then, and how many pauses so far: logged when it starts and ends.
    out_of_fds: Option<(Instant, u64)>,
    /// A snapshot was rendered this turn.
    rendered: bool,
    /// No snapshot before then (`RENDER_SPACING`).
    render_at: Option<Instant>,
    /// Refusal warnings, one limit per reason (`Refusal::ALL`), and one for listener failures.
    refusal_logs: [RateLimit; Refusal::ALL.len()],
    failure_log: RateLimit,
    /// Eviction lines (`evict_control`).
    eviction_log: RateLimit,
}

impl ControlTurn {
    pub(super) fn new() -> ControlTurn {
        ControlTurn {
            accept_due: false,
            ready: [false; CONTROL_CONNS_MAX],
            waiting: VecDeque::new(),
            paused_until: None,
            out_of_fds: None,
            rendered: false,
            render_at: None,
            refusal_logs: Refusal::ALL.map(|_| RateLimit::new(REFUSAL_LOG_EVERY)),
            failure_log: RateLimit::new(REFUSAL_LOG_EVERY),
            eviction_log: RateLimit::new(REFUSAL_LOG_EVERY),
        }
    }

    /// The listener is readable.
    pub(super) fn on_listener_event(&mut self) {
        self.accept_due = true;
    }

    /// Client `i` has an event.
    pub(super) fn on_client_event(&mut self, i: usize) {
        if let Some(r) = self.ready.get_mut(i) {
            *r = true;
        }
    }

    fn may_render(&self, now: Instant) -> bool {
        !self.rendered && self.render_at.is_none_or(|t| now >= t)
    }

    /// Control work that can be done right now: the loop polls with a zero timeout.
    pub(super) fn due(&self, now: Instant) -> bool {
        (self.accept_due && self.paused_until.is_none())
            || self.ready.contains(&true)
            || (!self.waiting.is_empty() && self.render_at.is_none_or(|t| now >= t))
    }

    /// The next instant control work becomes due by itself: the accept pause ends, a waiting
    /// request may be rendered.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let render = if self.waiting.is_empty() { None } else { self.render_at };
        match (self.paused_until, render) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Whether answering `req` renders a snapshot (the costly part of an answer).
fn renders(req: Option<Request>) -> bool {
    matches!(req, Some(Request::Stats(_)))
}

impl Relay {
    /// Once per loop turn, after the data path's events: at most one snapshot rendered (and
    /// none while `RENDER_SPACING` says wait), the clients with events advanced, and at most
    /// `CONTROL_ACCEPTS_PER_TURN` accepts.
    pub(super) fn serve_control(&mut self, now: Instant) {
        self.ctl.rendered = false;
        if self.ctl.may_render(now) {
            if let Some((i, req)) = self.ctl.waiting.pop_front() {
                let step = self.answer_control(i, req, now);
                self.after_control_step(i, step);
            }
        }
        for i in 0..CONTROL_CONNS_MAX {
            if std::mem::take(&mut self.ctl.ready[i]) {
                self.advance_control(i, now);
            }
        }
        if self.ctl.paused_until.is_some_and(|t| now >= t) {
            self.ctl.paused_until = None;
            // Clients may have queued during the pause without a new edge: try now.
            self.ctl.accept_due = true;
        }
        if self.ctl.accept_due && self.ctl.paused_until.is_none() {
            self.ctl.accept_due = false;
            self.accept_control(now);
        }
    }

    fn accept_control(&mut self, now: Instant) {
        for _ in 0..CONTROL_ACCEPTS_PER_TURN {
            let Some(server) = &self.control else { return };
            match server.accept(now) {
                Ok(Accepted::None) => {
                    self.control_fds_back(now);
                    return;
                }
                Ok(Accepted::Refused(why, peer, error)) => {
                    self.control_fds_back(now);
                    self.refuse_control(why, peer, error, now);
                }
                Ok(Accepted::Conn(conn)) => {
                    self.control_fds_back(now);
                    let held: Vec<_> = self.control_conns.iter().map(|c| c.as_ref().map(|(c, _)| c.held())).collect();
                    let i = match slot_for(&held, conn.held().pid) {
                        Place::Free(i) => i,
                        Place::Evict(i) => {
                            self.evict_control(i, &conn, now);
                            i
                        }
                        Place::Full => {
                            // Dropping it closes it.
                            self.refuse_control(Refusal::Busy, Some(conn.peer), None, now);
                            continue;
                        }
                    };
                    let token = Token(CONTROL_CONN_BASE + i);
                    let interest = conn.interest();
                    if let Err(e) = self.poll.registry().register(&mut SourceFd(&conn.raw_fd()), token, interest) {
                        self.refuse_control(Refusal::Setup, Some(conn.peer), Some(e), now);
                        continue;
                    }
                    self.control_conns[i] = Some((conn, interest));
                    self.advance_control(i, now);
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) =>
                {
                    // The client stays queued; `serve_control` accepts again when the pause ends.
                    self.totals.control_accept_pauses += 1;
                    self.ctl.paused_until = Some(now + Duration::from_millis(CONTROL_PAUSE_MS));
                    match &mut self.ctl.out_of_fds {
                        Some((_, pauses)) => *pauses += 1,
                        None => {
                            warn!(
                                error = %e,
                                pause_ms = CONTROL_PAUSE_MS,
                                "control socket: cannot accept: out of resources; pausing accept, retrying until it passes"
                            );
                            self.ctl.out_of_fds = Some((now, 1));
                        }
                    }
                    return;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO)
                    ) => {}
                Err(e) => {
                    // May repeat on every call: pause rather than spin.
                    if let Some(suppressed) = self.ctl.failure_log.hit(now) {
                        warn!(error = %e, pause_ms = CONTROL_PAUSE_MS, suppressed, "control socket: accept failed; pausing accept");
                    }
                    self.ctl.paused_until = Some(now + Duration::from_millis(CONTROL_PAUSE_MS));
                    return;
                }
            }
        }
        // More may be queued: the next turn takes them (a zero poll timeout, `ControlTurn::due`).
        self.ctl.accept_due = true;
    }

    /// An accept went through: an out-of-fds episode, if one was on, is over.
    fn control_fds_back(&mut self, now: Instant) {
        if let Some((since, pauses)) = self.ctl.out_of_fds.take() {
            let paused_ms = now.saturating_duration_since(since).as_millis() as u64;
            info!(paused_ms, pauses, "control socket: accepting again");
        }
    }

    /// Closes the client in slot `i` (one that has not asked yet, `slot_for`) to serve
    /// `newcomer` in its place. Counted; logged at most once a second.
    fn evict_control(&mut self, i: usize, newcomer: &ControlConn, now: Instant) {
        let Some((victim, _)) = self.control_conns[i].as_mut() else { return };
        let phase = victim.evict();
        let (peer, age_ms) = (victim.peer, now.saturating_duration_since(victim.accepted).as_millis() as u64);
        self.close_control(i);
        self.totals.control_evicted += 1;
        if let Some(suppressed) = self.ctl.eviction_log.hit(now) {
            warn!(
                %peer,
                phase,
                age_ms,
                newcomer = %newcomer.peer,
                max = CONTROL_CONNS_MAX,
                suppressed,
                "control socket: evicted a client that had not asked yet, to serve a newcomer"
            );
        }
    }

    /// Counts a turned-away control client and logs it, at most once a second per reason.
    fn refuse_control(&mut self, why: Refusal, peer: Option<Peer>, error: Option<io::Error>, now: Instant) {
        self.totals.control_refusal(why);
        let Some(suppressed) = self.ctl.refusal_logs[why.index()].hit(now) else { return };
        let peer = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
        let error = error.map_or_else(|| "-".to_string(), |e| e.to_string());
        match why {
            Refusal::Uid => warn!(%peer, suppressed, "control socket: refused: only the relay's own uid and root"),
            Refusal::Busy => warn!(
                %peer,
                max = CONTROL_CONNS_MAX,
                per_process = CONTROL_CONNS_PER_PROCESS_MAX,
                suppressed,
                "control socket: refused: too many clients at once, none of them evictable for this one; closing the newcomer"
            ),
            Refusal::NoIdentity => warn!(
                error = %Escaped(&error),
                suppressed,
                "control socket: refused: cannot read the client's identity; closed it, the others are served"
            ),
            Refusal::Setup => {
                warn!(%peer, error = %Escaped(&error), suppressed, "control socket: refused: cannot set the client up")
            }
        }
    }

    pub(super) fn advance_control(&mut self, i: usize, now: Instant) {
        if self.ctl.waiting.iter().any(|&(w, _)| w == i) {
            // Its request is answered when the snapshot budget allows; nothing else to read.
            return;
        }
        let Some(Some((conn, _))) = self.control_conns.get_mut(i) else { return };
        let step = match conn.advance() {
            Ok(ControlStep::Request(req)) if renders(req) && !self.ctl.may_render(now) => {
                self.ctl.waiting.push_back((i, req));
                return;
            }
            Ok(ControlStep::Request(req)) => self.answer_control(i, req, now),
            other => other,
        };
        self.after_control_step(i, step);
    }

    /// Renders the answer to client `i`'s request and starts writing it.
    fn answer_control(&mut self, i: usize, req: Option<Request>, now: Instant) -> io::Result<ControlStep> {
        let (started, cpu_started) = (Instant::now(), crate::sys::thread_cpu_time());
        let answer = self.answer(req, now);
        if renders(req) {
            let done = Instant::now();
            let took = match (cpu_started, crate::sys::thread_cpu_time()) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => done - started,
            };
            self.ctl.rendered = true;
            self.ctl.render_at = Some(done + took * RENDER_SPACING);
        }
        let Some(Some((conn, _))) = self.control_conns.get_mut(i) else { return Ok(ControlStep::Done) };
        conn.answer(answer)
    }

    fn after_control_step(&mut self, i: usize, step: io::Result<ControlStep>) {
        match step {
            Ok(ControlStep::Done) | Err(_) => self.close_control(i),
            Ok(ControlStep::Waiting) | Ok(ControlStep::Request(_)) => {
                let Some(Some((conn, registered))) = self.control_conns.get_mut(i) else { return };
                let want = conn.interest();
                if want != *registered {
                    let token = Token(CONTROL_CONN_BASE + i);
                    if self.poll.registry().reregister(&mut SourceFd(&conn.raw_fd()), token, want).is_err() {
                        self.close_control(i);
                        return;
                    }
                    *registered = want;
                }
            }
        }
    }

    pub(super) fn close_control(&mut self, i: usize) {
        if let Some((conn, _)) = self.control_conns.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&conn.raw_fd()));
        }
        self.ctl.waiting.retain(|&(w, _)| w != i);
        if let Some(r) = self.ctl.ready.get_mut(i) {
            *r = false;
        }
    }

    fn answer(&mut self, req: Option<Request>, now: Instant) -> String {
        match req {
            Some(Request::Stats(Format::Text)) => export::text(&self.snapshot(now)),
            Some(Request::Stats(Format::Json)) => export::json(&self.snapshot(now)),
            Some(Request::Stats(Format::Prometheus)) => export::prometheus(&self.snapshot(now)),
            Some(Request::Reset) => {
                self.reset();
                info!("control socket: counters and histograms reset");
                "reset\n".into()
            }
            None => "error: unknown request (stats text|json|prometheus, reset)\n".into(),
        }
    }

    /// Zeroes every counter and histogram; sessions and the data path go on untouched.
    fn reset(&mut self) {
        self.totals = Totals::default();
        self.closed = None;
        self.kvmi_closed.clear();
        for s in self.slots.iter_mut().flatten() {
            for d in 0..2 {
                s.conn.pump_mut(d).reset_stats();
                s.conn.metrics[d].reset();
            }
            if let Some((k, _)) = &s.conn.kvmi {
                // The interval samples belong to the log: it takes them first.
                if let Some(h) = &mut self.hist_log {
                    h.take_kvmi(&mut k.borrow_mut().figures);
                }
                k.borrow_mut().reset_figures();
            }
        }
    }

    /// `--metrics-textfile`: the snapshot's Prometheus text, replacing the file.
    pub(super) fn write_metrics_file(&mut self, now: Instant) {
        let text = crate::observe::export::prometheus(&self.snapshot(now));
        let Some(m) = &mut self.metrics_file else { return };
        if let Err(e) = m.write(&text, now) {
            error!(path = %crate::escape::Escaped(m.path().display()), error = %e, "cannot write the metrics text file");
        }
    }

    pub(super) fn write_intervals(&mut self, now: Instant) {
        let Some(h) = &mut self.hist_log else { return };
        for s in self.slots.iter().flatten() {
            if let Some((k, _)) = &s.conn.kvmi {
                h.take_kvmi(&mut k.borrow_mut().figures);
            }
        }
        let live = self.slots.iter_mut().flatten().map(|s| &mut s.conn.metrics);
        if let Err(e) = h.tick(now, live) {
            error!(path = %h.path().display(), error = %e, "cannot write the histogram log");
        }
    }

    /// Everything `stats` shows, as of `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut all = self.closed.as_deref().cloned().unwrap_or_default();
        let mut connections = Vec::new();
        for s in self.slots.iter().flatten() {
            let c = &s.conn;
            for (d, agg) in all.iter_mut().enumerate() {
                agg.absorb(&c.metrics[d], c.pump(d));
            }
            let kvmi = c.kvmi.as_ref().map(|(k, _)| {
                let (vm_name, vm_uuid) = c.vm_identity();
                KvmiSnap { vm_name, vm_uuid, messages: message_snaps(&k.borrow().figures) }
            });
            connections.push(ConnSnap {
                id: c.id,
                peer: c.peer.to_string(),
                age_s: now.saturating_duration_since(c.opened).as_secs_f64(),
                directions: [0, 1].map(|d| session_dir(c, d)),
                kvmi,
            });
        }
        let all_sessions = [0, 1].map(|d| all[d].snap(d));
        Snapshot {
            name: self.cfg.name.clone(),
            pid: std::process::id(),
            uptime_s: now.saturating_duration_since(self.started).as_secs_f64(),
            listen: self.bound.clone(),
            connect: self.cfg.connect.to_string(),
            live: self.live,
            max_conns: self.cfg.max_conns,
            totals: self.totals_now(),
            connections,
            all_sessions,
            kvmi: self.cfg.kvmi.is_some().then(|| self.kvmi_snapshot()),
            tls: self.cfg.tls.as_ref().map(|t| crate::observe::export::TlsSnap {
                cert_not_after_unix: crate::tls::unix_secs(t.loaded.own.not_after),
                cert_not_after: crate::tls::utc_text(t.loaded.own.not_after),
                refused: crate::tls::Reason::ALL
                    .iter()
                    .zip(self.totals.tls_refusals)
                    .map(|(r, n)| (r.as_str().to_string(), n))
                    .collect(),
                handshakes: crate::observe::export::HandshakeSnap::of(
                    [t.settings.roles.listen, t.settings.roles.dial],
                    self.totals.tls_handshakes.as_deref(),
                ),
            }),
        }
    }

    /// The VM (the live session's handshake, else the last closed one's) and the per-type
    /// figures of every session since start or reset.
    fn kvmi_snapshot(&self) -> KvmiSnap {
        let mut all = self.kvmi_closed.clone();
        let mut vm = self.kvmi_last_vm.clone();
        for s in self.slots.iter().flatten() {
            let Some((k, _)) = &s.conn.kvmi else { continue };
            for (t, f) in &k.borrow().figures {
                all.entry(*t).or_default().add(f);
            }
            let (name, uuid) = s.conn.vm_identity();
            if uuid != "-" {
                vm = Some((name, uuid));
            }
        }
        let (vm_name, vm_uuid) = vm.unwrap_or_else(|| ("-".into(), "-".into()));
        KvmiSnap { vm_name, vm_uuid, messages: message_snaps(&all) }
    }
}

/// One entry per message type seen, in the figures' order (commands first).
fn message_snaps(figures: &FiguresByType) -> Vec<MessageSnap> {
    figures
        .iter()
        .map(|(t, f)| MessageSnap {
            kind: t.kind.as_str(),
            message: t.name,
            count: f.count,
            bytes: f.bytes,
            denied: f.denied,
            latency_ns: HistSnap::of_time(&f.latency_ns),
        })
        .collect()
}
