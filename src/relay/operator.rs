//! What operators see, served from the event loop: control-socket clients (`stats`, `reset`),
//! snapshots of every live and closed session, and the interval log's ticks.
//!
//! Invariants:
//! - Reading only: a snapshot or an interval tick reads connections and never changes the data
//!   path; `reset` zeroes counters and histograms and touches nothing else.
//! - Control clients are registered, re-registered and removed here with the loop's poller, like
//!   relayed connections; a client that fails or overstays its deadline is closed, never waited on.

use std::time::Instant;

use mio::Token;
use mio::unix::SourceFd;
use tracing::{error, info, warn};

use super::{CONTROL_CONN_BASE, ClosedDir, Relay};
use crate::datapath::pump::DirStats;
use crate::datapath::side::DIRECTION_NAMES;
use crate::kvmi::session::FiguresByType;
use crate::observe::control::{CONTROL_CONNS_MAX, ControlStep, Format, Request};
use crate::observe::export::{self, ConnSnap, DirSnap, HistSnap, KvmiSnap, MessageSnap, Snapshot};
use crate::observe::totals::Totals;

impl Relay {
    pub(super) fn accept_control(&mut self, now: Instant) {
        loop {
            let Some(server) = &self.control else { return };
            match server.accept(now) {
                Ok(None) => return,
                Ok(Some(Err(peer))) => warn!(%peer, "control socket: refused"),
                Ok(Some(Ok(conn))) => {
                    let Some(i) = self.control_conns.iter().position(Option::is_none) else {
                        warn!(max = CONTROL_CONNS_MAX, "control socket: too many clients; closing one");
                        continue;
                    };
                    let token = Token(CONTROL_CONN_BASE + i);
                    let interest = conn.interest();
                    if let Err(e) = self.poll.registry().register(&mut SourceFd(&conn.raw_fd()), token, interest) {
                        warn!(error = %e, "control socket: cannot register a client");
                        continue;
                    }
                    self.control_conns[i] = Some((conn, interest));
                    self.advance_control(i, now);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    warn!(error = %e, "control socket: out of fds");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    return;
                }
            }
        }
    }

    pub(super) fn advance_control(&mut self, i: usize, now: Instant) {
        let Some(Some((conn, _))) = self.control_conns.get_mut(i) else { return };
        let step = match conn.advance() {
            Ok(ControlStep::Request(req)) => {
                let answer = self.answer(req, now);
                let Some(Some((conn, _))) = self.control_conns.get_mut(i) else { return };
                conn.answer(answer)
            }
            other => other,
        };
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
        let closed = |d: usize| self.closed.as_ref().map_or_else(ClosedDir::default, |c| c[d].clone());
        let mut all: [(ClosedDir, DirStats); 2] = [0, 1].map(|d| (closed(d), self.closed_stats(d)));
        let mut connections = Vec::new();
        for s in self.slots.iter().flatten() {
            let c = &s.conn;
            let dirs = [0, 1].map(|d| {
                let p = c.pump(d);
                // The figures come from `agg`, the counts from `stats` (closed counts live partly
                // in `totals`, see `closed_stats`).
                let (agg, stats) = &mut all[d];
                agg.absorb(&c.metrics[d], p);
                stats.add(&p.stats);
                dir_snap(d, &p.stats, &c.metrics[d].transit_ns, &c.metrics[d].turnaround_ns, &p.chunk_bytes)
            });
            let kvmi = c.kvmi.as_ref().map(|(k, _)| {
                let (vm_name, vm_uuid) = c.vm_identity();
                KvmiSnap { vm_name, vm_uuid, messages: message_snaps(&k.borrow().figures) }
            });
            connections.push(ConnSnap {
                id: c.id,
                peer: c.peer.to_string(),
                age_s: now.saturating_duration_since(c.opened).as_secs_f64(),
                directions: dirs,
                kvmi,
            });
        }
        let all_sessions = [0, 1].map(|d| {
            let (agg, stats) = &all[d];
            dir_snap(d, stats, &agg.figures.transit_ns, &agg.figures.turnaround_ns, &agg.chunk_bytes)
        });
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

    fn closed_stats(&self, d: usize) -> DirStats {
        DirStats {
            bytes: self.totals.bytes[d],
            splice_bytes: self.totals.splice_bytes[d],
            copy_bytes: self.totals.copy_bytes[d],
            chunks: self.closed.as_ref().map_or(0, |c| c[d].chunks),
            high_water_bytes: self.closed.as_ref().map_or(0, |c| c[d].high_water_bytes),
        }
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

fn dir_snap(
    d: usize,
    stats: &DirStats,
    transit: &hdrhistogram::Histogram<u64>,
    turnaround: &hdrhistogram::Histogram<u64>,
    chunks: &hdrhistogram::Histogram<u64>,
) -> DirSnap {
    DirSnap {
        direction: DIRECTION_NAMES[d],
        bytes: stats.bytes,
        splice_bytes: stats.splice_bytes,
        copy_bytes: stats.copy_bytes,
        chunks: stats.chunks,
        high_water_bytes: stats.high_water_bytes,
        transit_ns: HistSnap::of_time(transit),
        turnaround_ns: HistSnap::of_time(turnaround),
        chunk_bytes: HistSnap::of(chunks),
    }
}
