//! The relay's life counters (since start or the last `stats --reset`): what became of each
//! peer, how sessions ended, the bytes they moved. The event loop adds to them; `stats`, the
//! service status, SIGUSR1 and the `stopped` line read them.
//!
//! Invariant: a closed session's bytes are added here when it closes; whoever reports totals
//! while sessions are live adds theirs to a copy (`Relay::totals_now`), never to these. A TLS
//! handshake's time is added when it passes, whatever becomes of its session.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::datapath::side::DIRECTION_NAMES;
use crate::observe::metrics::time_histogram;

/// Counters over the relay's whole life (since start or the last `stats --reset`).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Totals {
    pub accepted: u64,
    pub admitted: u64,
    /// Refused by the access policy.
    pub refused_access: u64,
    /// Refused because `--max-conns` sessions were already running.
    pub refused_busy: u64,
    pub dial_failed: u64,
    /// `--kvmi`: handshakes refused (wrong VM, bad size, none in time); nothing was dialled.
    pub refused_handshake: u64,
    /// `--kvmi`: sessions closed for a malformed stream.
    pub kvmi_malformed: u64,
    pub failed: u64,
    /// Sessions the shutdown timeout cut (bytes still held, or a peer that did not end its side).
    pub aborted: u64,
    /// `--replace-after-ms`: handovers, a session admitted over `--max-conns` to take the
    /// oldest one's place.
    pub replaced: u64,
    pub closed: u64,
    /// Times the relay ran out of fds and left peers waiting in the backlog (episodes, from
    /// the first peer left waiting to the last one taken).
    pub accept_pauses: u64,
    /// Control-socket clients turned away (another uid, no slot, identity unreadable, set-up
    /// failed); by reason in `control_refusals`.
    pub control_refused: u64,
    /// Control-socket clients turned away, by reason (indexed as `control::Refusal::ALL`).
    #[serde(serialize_with = "by_refusal")]
    pub control_refusals: [u64; Refusal::ALL.len()],
    /// Control-socket clients closed, before they had asked anything, to serve a newcomer while
    /// every slot was taken (`control::eviction_victim`).
    pub control_evicted: u64,
    /// Times the control socket's accept hit EMFILE/ENFILE (or ENOBUFS/ENOMEM) and paused.
    pub control_accept_pauses: u64,
    /// Times the poll window was suspended: yields kept losing the CPU to another thread for a
    /// scheduler slice (a busy CPU; `window`).
    pub poll_window_suspensions: u64,
    /// Bytes delivered per direction (`DIRECTION_NAMES`; JSON labels them so), by closed and
    /// live sessions: the relay adds them up when the totals are read (`Relay::totals_now`);
    /// its running counters leave them at zero.
    #[serde(serialize_with = "by_direction")]
    pub bytes: [u64; 2],
    #[serde(serialize_with = "by_direction")]
    pub splice_bytes: [u64; 2],
    #[serde(serialize_with = "by_direction")]
    pub copy_bytes: [u64; 2],
    /// TLS handshakes refused, by reason (indexed as `tls::Reason::ALL`); the snapshot names
    /// them in its `tls` part.
    #[serde(skip)]
    pub tls_refusals: [u64; crate::tls::Reason::ALL.len()],
    /// TLS handshakes that passed, per side (`LISTEN_SIDE`, `CONNECT_SIDE`): nanoseconds from
    /// the start of the handshake phase to the peer verified. Made by the first one, so a relay
    /// without TLS never holds the two histograms (~70 KiB); the snapshot shows them in its
    /// `tls` part.
    #[serde(skip)]
    pub tls_handshakes: Option<Box<[Histogram<u64>; 2]>>,
}

/// `[l2c, c2l]` as `{"l2c": .., "c2l": ..}`.
fn by_direction<S: serde::Serializer>(v: &[u64; 2], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(2))?;
    for (name, n) in DIRECTION_NAMES.iter().zip(v) {
        m.serialize_entry(name, n)?;
    }
    m.end()
}

/// Why a control client was turned away (counted per reason, logged at most once a second per
/// reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the relay's own uid nor root.
    Uid,
    /// No slot for it: all `control::CONTROL_CONNS_MAX` taken (or its process held
    /// `CONTROL_CONNS_PER_PROCESS_MAX`) by clients it could not evict (`control::slot_for`).
    Busy,
    /// SO_PEERCRED failed: the identity could not be read.
    NoIdentity,
    /// The accepted socket could not be set up (non-blocking mode, registration).
    Setup,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [Refusal::Uid, Refusal::Busy, Refusal::NoIdentity, Refusal::Setup];

    /// The label in `stats` and Prometheus.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Uid => "uid",
            Refusal::Busy => "busy",
            Refusal::NoIdentity => "no_identity",
            Refusal::Setup => "setup",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The control refusals as `{"uid": .., "busy": .., ..}`.
fn by_refusal<S: serde::Serializer>(v: &[u64; Refusal::ALL.len()], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (r, n) in Refusal::ALL.iter().zip(v) {
        m.serialize_entry(r.as_str(), n)?;
    }
    m.end()
}

impl Totals {
    /// One control client turned away for `why`.
    pub fn control_refusal(&mut self, why: Refusal) {
        self.control_refused += 1;
        self.control_refusals[why.index()] += 1;
    }

    /// One TLS handshake on `side` passed after `took`.
    pub fn tls_handshake(&mut self, side: usize, took: Duration) {
        let h = self.tls_handshakes.get_or_insert_with(|| Box::new([time_histogram(), time_histogram()]));
        h[side].saturating_record(took.as_nanos() as u64);
    }

    /// One line of `key=value` counters with `live` sessions running (`stopped`, SIGUSR1).
    pub fn log(&self, live: usize, message: &str) {
        let t = self;
        tracing::info!(
            live,
            accepted = t.accepted,
            admitted = t.admitted,
            refused_access = t.refused_access,
            refused_busy = t.refused_busy,
            refused_handshake = t.refused_handshake,
            dial_failed = t.dial_failed,
            failed = t.failed,
            aborted = t.aborted,
            replaced = t.replaced,
            kvmi_malformed = t.kvmi_malformed,
            closed = t.closed,
            accept_pauses = t.accept_pauses,
            control_refused = t.control_refused,
            control_evicted = t.control_evicted,
            control_accept_pauses = t.control_accept_pauses,
            poll_window_suspensions = t.poll_window_suspensions,
            tls_refused = t.tls_refusals.iter().sum::<u64>(),
            tls_handshakes = t.tls_handshakes.as_ref().map_or(0, |h| h[0].len() + h[1].len()),
            l2c_bytes = t.bytes[0],
            l2c_splice_bytes = t.splice_bytes[0],
            l2c_copy_bytes = t.copy_bytes[0],
            c2l_bytes = t.bytes[1],
            c2l_splice_bytes = t.splice_bytes[1],
            c2l_copy_bytes = t.copy_bytes[1],
            "{message}"
        );
    }
}
