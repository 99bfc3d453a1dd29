//! One connection's KVMi layer: it stands at both destinations of a connection's pumps and
//! decides, message by message, what the destination gets.
//!
//! The pump stays a byte mover that knows nothing of KVMi: with `--kvmi` each direction
//! copies, and its destination socket is wrapped in a [`Gate`] (a `store::Side`). When the
//! pump offers the bytes it holds, the gate frames them (headers only; bodies are not read,
//! except the few bytes a policy decision needs: an event's common header and a CR/MSR value,
//! an event reply's action and value, CONTROL_CMD_RESPONSE's two flags) and:
//! - writes whole messages it forwards, and says it took them;
//! - takes a denied command without writing it, and queues the relay's `-KVM_EPERM` reply
//!   toward the introspector (the other flow's outbox);
//! - takes a refused event reply, and queues a plain CONTINUE toward the hypervisor in its
//!   place (this flow's outbox, written before anything after it);
//! - leaves a partial message in the pump (it says it would block), so no destination ever
//!   receives part of a message the relay holds the rest of; the connection then clears the
//!   pump's "destination blocked" flag, since the destination was not what blocked.
//! - holds everything toward the hypervisor while QEMU's handshake, when it comes through this
//!   layer, has not passed the pin: the VM behind the socket may not be the pinned one;
//! - refuses a malformed stream (size beyond the limit, a reply or event reply for nothing
//!   waiting, an unknown id under `--kvmi-unknown refuse`, a denied command while command
//!   replies are off) with an error before any byte of the offending message is written.
//!
//! Invariants:
//! - the bytes a pump offers start at a message boundary, except for `raw_left` bytes of
//!   messages already judged and partly taken by the socket: the gate returns exactly what it
//!   took (written or dropped), and the pump offers the rest again from there;
//! - relay-made messages (outboxes) go only between messages, never inside one;
//! - a message is judged once: its bookkeeping (seq matching, counts) happens when it is judged,
//!   and from then on its bytes are `raw_left`.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::abi::{ID_EVENT, ID_EVENT_REPLY, Table};
use super::handshake::{self, Parse, Pin};
use super::policy::{CommandVerdict, Policy, ReplyVerdict, plain_continue};
use super::tracker::Tracker;
use super::wire::{Flow, Frame, HDR_BYTES, Hdr, error_reply, frame};
use crate::datapath::store::Side;
use crate::observe::metrics;

/// At most one denial log line per this many milliseconds per connection; the rest are counted.
pub const DENIAL_LOG_INTERVAL_MS: u64 = 1000;

const TO_INTROSPECTOR: usize = 0;
const TO_HYPERVISOR: usize = 1;

fn index(flow: Flow) -> usize {
    match flow {
        Flow::ToIntrospector => TO_INTROSPECTOR,
        Flow::ToHypervisor => TO_HYPERVISOR,
    }
}

/// What comes before the messages of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preamble {
    None,
    /// QEMU's handshake, when it was not read before dialling (QEMU on the connect side).
    Qemu,
    /// The introspector's answer to the handshake.
    Answer,
}

#[derive(Debug)]
struct FlowState {
    preamble: Preamble,
    /// Bytes of judged messages (or the preamble) the socket has not taken yet.
    raw_left: usize,
    /// Relay-made messages for this flow's destination.
    outbox: Vec<u8>,
    /// The last offer ended in part of a message (or of the preamble).
    stuck_partial: bool,
}

/// Whether a message type is a command (named by the table's command) or an event (named by
/// the table's event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Command,
    Event,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
        }
    }
}

/// A message type: its kind and its name in the ABI table, or [`UNKNOWN`]. The set of values
/// is bounded by the table (one per command, one per event, one `unknown` per kind), so it may
/// label metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageType {
    pub kind: Kind,
    pub name: &'static str,
}

/// The name of every id the table does not know.
pub const UNKNOWN: &str = "unknown";

impl std::fmt::Display for MessageType {
    /// Commands as their name, events as `EVENT_` and theirs (the close line's keys).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Command => f.write_str(self.name),
            Kind::Event => write!(f, "EVENT_{}", self.name),
        }
    }
}

/// Per message type: what passed and how long its answer took.
#[derive(Debug, Clone)]
pub struct MessageFigures {
    /// Commands forwarded, or events forwarded.
    pub count: u64,
    /// Bytes of the requests and their replies (commands), of the events and their replies.
    pub bytes: u64,
    /// Commands the relay answered itself, or event replies it replaced.
    pub denied: u64,
    /// Command → first byte of its reply, or event → its reply, nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// The same samples again, since the interval log last took them (only with `--hist-log`).
    pub interval_ns: Option<Histogram<u64>>,
}

impl Default for MessageFigures {
    fn default() -> Self {
        MessageFigures { count: 0, bytes: 0, denied: 0, latency_ns: metrics::time_histogram(), interval_ns: None }
    }
}

impl MessageFigures {
    /// Adds `other`'s counts and cumulative samples (same histogram bounds by construction);
    /// interval samples belong to the interval log.
    pub fn add(&mut self, other: &MessageFigures) {
        self.count += other.count;
        self.bytes += other.bytes;
        self.denied += other.denied;
        let _ = self.latency_ns.add(&other.latency_ns);
    }

    fn record_latency(&mut self, ns: u64) {
        self.latency_ns.saturating_record(ns);
        if let Some(i) = &mut self.interval_ns {
            i.saturating_record(ns);
        }
    }
}

/// Per-type figures, in a stable order.
pub type FiguresByType = BTreeMap<MessageType, MessageFigures>;

pub struct Session {
    table: &'static Table,
    policy: Policy,
    pin: Option<Pin>,
    tracker: Tracker,
    flows: [FlowState; 2],
    /// When the loop woke for the events being handled (set by the connection).
    pub now: Instant,
    /// Why the stream was refused, once it was.
    pub malformed: Option<String>,
    /// The VM's handshake, when this layer read it (QEMU on the connect side).
    pub vm: Option<handshake::Handshake>,
    /// Per message type.
    pub figures: FiguresByType,
    last_denial_log: Option<Instant>,
    denials_unlogged: u64,
    /// Keep interval samples per type for the interval log (`--hist-log`).
    intervals: bool,
}

impl Session {
    /// `qemu_in_stream`: QEMU's handshake comes through this layer (QEMU on the connect side)
    /// and is checked against `pin` here.
    pub fn new(table: &'static Table, policy: Policy, pin: Option<Pin>, qemu_in_stream: bool, now: Instant) -> Session {
        let flow = |preamble| FlowState { preamble, raw_left: 0, outbox: Vec::new(), stuck_partial: false };
        Session {
            table,
            policy,
            pin,
            tracker: Tracker::new(table),
            flows: [flow(if qemu_in_stream { Preamble::Qemu } else { Preamble::None }), flow(Preamble::Answer)],
            now,
            malformed: None,
            vm: None,
            figures: BTreeMap::new(),
            last_denial_log: None,
            denials_unlogged: 0,
            intervals: false,
        }
    }

    /// Keeps each type's samples a second time for the interval log (`--hist-log`).
    pub fn with_intervals(mut self, on: bool) -> Session {
        self.intervals = on;
        self
    }

    /// QEMU's handshake comes through this layer and has not passed yet: the flow toward the
    /// hypervisor is held until it has.
    pub fn awaits_handshake(&self) -> bool {
        self.flows[TO_INTROSPECTOR].preamble == Preamble::Qemu
    }

    /// The last offer in `flow` ended in part of a message (the destination did not block).
    pub fn is_stuck(&self, flow: Flow) -> bool {
        self.flows[index(flow)].stuck_partial
    }

    /// Whether relay-made messages wait for `flow`'s destination.
    pub fn outbox_waiting(&self, flow: Flow) -> bool {
        !self.flows[index(flow)].outbox.is_empty()
    }

    /// Writes relay-made messages for `flow` when its destination is between messages.
    pub fn flush(&mut self, flow: Flow, sock: &impl Side) -> io::Result<()> {
        let f = &mut self.flows[index(flow)];
        if f.raw_left == 0 && !f.outbox.is_empty() {
            flush_outbox(&mut f.outbox, sock)?;
        }
        Ok(())
    }

    fn fail(&mut self, why: String) -> io::Error {
        let e = io::Error::new(io::ErrorKind::InvalidData, why.clone());
        self.malformed.get_or_insert(why);
        e
    }

    fn figures(&mut self, t: MessageType) -> &mut MessageFigures {
        let intervals = self.intervals;
        self.figures.entry(t).or_insert_with(|| MessageFigures {
            interval_ns: intervals.then(metrics::time_histogram),
            ..MessageFigures::default()
        })
    }

    /// Bounded: one type per event of the table, one for all others.
    fn event_type(&self, event: u8) -> MessageType {
        MessageType { kind: Kind::Event, name: self.table.event(event).map_or(UNKNOWN, |e| e.name) }
    }

    /// Bounded: one type per command of the table, one for all others.
    fn command_type(&self, id: u16) -> MessageType {
        MessageType { kind: Kind::Command, name: self.table.command(id).map_or(UNKNOWN, |c| c.name) }
    }

    /// Offered the bytes a pump holds for `flow`'s destination `sock`: writes or drops what it
    /// may, returns how many bytes it took (module docs).
    pub fn send(&mut self, flow: Flow, sock: &impl Side, buf: &[u8]) -> io::Result<usize> {
        let f = index(flow);
        self.flows[f].stuck_partial = false;
        if flow == Flow::ToHypervisor && self.awaits_handshake() {
            // The VM behind the socket is not known to be the pinned one until its handshake
            // passed: not a byte of the introspector's goes its way before (held in the pump).
            self.flows[f].stuck_partial = true;
            return done(0);
        }
        let mut taken = 0usize;
        loop {
            if self.flows[f].raw_left > 0 {
                let want = self.flows[f].raw_left.min(buf.len() - taken);
                if want == 0 {
                    return done(taken);
                }
                match sock.send(&buf[taken..taken + want]) {
                    Ok(n) => {
                        self.flows[f].raw_left -= n;
                        taken += n;
                        if n < want {
                            return done(taken);
                        }
                    }
                    Err(e) if taken > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                    Err(e) => return Err(e),
                }
                continue;
            }
            if !self.flows[f].outbox.is_empty() && !flush_outbox(&mut self.flows[f].outbox, sock)? {
                return done(taken);
            }
            if taken == buf.len() {
                return Ok(taken);
            }
            let window = &buf[taken..];
            match self.flows[f].preamble {
                Preamble::None => {}
                Preamble::Qemu => match handshake::parse_qemu(window) {
                    Err(r) => return Err(self.fail(format!("handshake refused: {r}"))),
                    Ok(Parse::Partial { .. }) => {
                        self.flows[f].stuck_partial = true;
                        return done(taken);
                    }
                    Ok(Parse::Complete(h)) => {
                        if let Some(why) = self.pin.as_ref().and_then(|p| p.check(&h).err()) {
                            return Err(self.fail(format!("handshake refused: {why}")));
                        }
                        self.flows[f].raw_left = h.size;
                        self.flows[f].preamble = Preamble::None;
                        self.vm = Some(h);
                        continue;
                    }
                },
                Preamble::Answer => match handshake::answer_bytes(window) {
                    Err(size) => {
                        return Err(self.fail(format!(
                            "introspector's handshake answer claims {size} bytes, expected {}..={}",
                            handshake::INTROSPECTOR_ANSWER_BYTES,
                            handshake::INTROSPECTOR_ANSWER_MAX_BYTES
                        )));
                    }
                    Ok(Some(n)) if window.len() >= n => {
                        self.flows[f].raw_left = n;
                        self.flows[f].preamble = Preamble::None;
                        continue;
                    }
                    Ok(_) => {
                        self.flows[f].stuck_partial = true;
                        return done(taken);
                    }
                },
            }
            let hdr = match frame(flow, window) {
                Err(o) => return Err(self.fail(o.to_string())),
                Ok(Frame::Partial { .. }) => {
                    self.flows[f].stuck_partial = true;
                    return done(taken);
                }
                Ok(Frame::Whole(hdr)) => hdr,
            };
            let total = hdr.total_bytes();
            let body = &window[HDR_BYTES..total];
            match self.judge(flow, hdr, body)? {
                Judged::Forward => self.flows[f].raw_left = total,
                Judged::Dropped => taken += total,
            }
        }
    }

    /// Decides one whole message and does its bookkeeping.
    fn judge(&mut self, flow: Flow, hdr: Hdr, body: &[u8]) -> io::Result<Judged> {
        let now = self.now;
        let total = hdr.total_bytes() as u64;
        match (flow, hdr.id) {
            (Flow::ToHypervisor, ID_EVENT) => {
                Err(self.fail(format!("an event (seq {}) from the introspector side", hdr.seq)))
            }
            (Flow::ToIntrospector, ID_EVENT_REPLY) => {
                Err(self.fail(format!("an event reply (seq {}) from the hypervisor side", hdr.seq)))
            }
            (Flow::ToIntrospector, ID_EVENT) => {
                let event = self.tracker.forwarded_event(hdr, body, now).map_err(|m| self.fail(m.to_string()))?;
                let t = self.event_type(event);
                let fig = self.figures(t);
                fig.count += 1;
                fig.bytes += total;
                Ok(Judged::Forward)
            }
            (Flow::ToIntrospector, _) => {
                let (id, waited) = self.tracker.reply(hdr, now).map_err(|m| self.fail(m.to_string()))?;
                let t = self.command_type(id);
                let fig = self.figures(t);
                fig.bytes += total;
                fig.record_latency(waited.as_nanos() as u64);
                Ok(Judged::Forward)
            }
            (Flow::ToHypervisor, ID_EVENT_REPLY) => {
                let pending = self.tracker.event_for_reply(hdr).map_err(|m| self.fail(m.to_string()))?;
                let verdict = self.policy.event_reply(self.table, &pending, body);
                let (_, waited) = self.tracker.event_replied(hdr, now).map_err(|m| self.fail(m.to_string()))?;
                let t = self.event_type(pending.event);
                let table = self.table;
                let fig = self.figures(t);
                fig.record_latency(waited.as_nanos() as u64);
                match verdict {
                    ReplyVerdict::Forward => {
                        fig.bytes += total;
                        Ok(Judged::Forward)
                    }
                    ReplyVerdict::Replace(why) => {
                        fig.denied += 1;
                        let plain = plain_continue(table, hdr.seq, &pending);
                        fig.bytes += plain.len() as u64;
                        self.flows[TO_HYPERVISOR].outbox.extend_from_slice(&plain);
                        self.log_denial(t, hdr.seq, why.as_str());
                        Ok(Judged::Dropped)
                    }
                }
            }
            (Flow::ToHypervisor, id) => match self.policy.command(self.table, id) {
                CommandVerdict::Forward => {
                    self.tracker.forwarded_command(hdr, body, now).map_err(|m| self.fail(m.to_string()))?;
                    let t = self.command_type(id);
                    let fig = self.figures(t);
                    fig.count += 1;
                    fig.bytes += total;
                    Ok(Judged::Forward)
                }
                CommandVerdict::Unknown => Err(self.fail(format!(
                    "command id {id} (seq {}) is not in the KVMi {} table (--kvmi-unknown refuse)",
                    hdr.seq, self.table.name
                ))),
                CommandVerdict::Deny(why) => {
                    let t = self.command_type(id);
                    if !self.tracker.expects_reply(hdr, body) {
                        return Err(self.fail(format!(
                            "{t} (seq {}) denied ({}) while command replies are off: KVM would close the socket",
                            hdr.seq,
                            why.as_str()
                        )));
                    }
                    let fig = self.figures(t);
                    fig.denied += 1;
                    self.flows[TO_INTROSPECTOR].outbox.extend_from_slice(&error_reply(hdr));
                    self.log_denial(t, hdr.seq, why.as_str());
                    Ok(Judged::Dropped)
                }
            },
        }
    }

    fn log_denial(&mut self, t: MessageType, seq: u32, why: &str) {
        let now = self.now;
        let quiet = self
            .last_denial_log
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(DENIAL_LOG_INTERVAL_MS));
        if quiet {
            self.denials_unlogged += 1;
            return;
        }
        self.last_denial_log = Some(now);
        let before = std::mem::take(&mut self.denials_unlogged);
        tracing::warn!(message_type = %t, seq, reason = why, unlogged_before = before, "kvmi: denied");
    }

    /// Zeroes the per-type figures (`stats reset`); the stream's state is untouched.
    pub fn reset_figures(&mut self) {
        self.figures.clear();
    }

    /// The per-message figures in one log value: `NAME:count:denied:p50/p90/p99/p99.9/max_us`,
    /// `;`-separated, or `-`.
    pub fn summary(&self) -> String {
        if self.figures.is_empty() {
            return "-".into();
        }
        self.figures
            .iter()
            .map(|(t, f)| format!("{t}:{}:{}:{}", f.count, f.denied, metrics::percentiles_us(&f.latency_ns)))
            .collect::<Vec<_>>()
            .join(";")
    }
}

enum Judged {
    /// Its bytes go to the destination as they are.
    Forward,
    /// Taken without writing (answered or replaced by the relay).
    Dropped,
}

/// Nothing taken: would block; something taken: that much.
fn done(taken: usize) -> io::Result<usize> {
    if taken > 0 { Ok(taken) } else { Err(io::ErrorKind::WouldBlock.into()) }
}

/// Writes the outbox's front; true when it is empty.
fn flush_outbox(outbox: &mut Vec<u8>, sock: &impl Side) -> io::Result<bool> {
    while !outbox.is_empty() {
        match sock.send(outbox) {
            Ok(n) => {
                outbox.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A pump's destination socket behind the KVMi layer.
pub struct Gate<'a, S: Side> {
    pub sock: &'a S,
    pub session: &'a std::cell::RefCell<Session>,
    pub flow: Flow,
}

impl<S: Side> Side for Gate<'_, S> {
    fn splice_to_pipe(&self, pipe: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        self.sock.splice_to_pipe(pipe, len)
    }
    fn splice_from_pipe(&self, _pipe: std::os::fd::BorrowedFd<'_>, _len: usize) -> io::Result<usize> {
        // KVMi sessions copy (the configuration forces it); splicing would bypass the framer.
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.session.borrow_mut().send(self.flow, self.sock, buf)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        // Relay-made messages still waiting go out before the end of stream.
        let mut s = self.session.borrow_mut();
        let _ = s.flush(self.flow, self.sock);
        self.sock.shutdown_write()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::super::abi::V7;
    use super::super::policy::{Mode, Unknown};
    use super::*;

    /// A destination that takes everything and counts it.
    #[derive(Default)]
    struct Sink {
        bytes: Cell<usize>,
    }

    impl Side for Sink {
        fn splice_to_pipe(&self, _: std::os::fd::BorrowedFd<'_>, _: usize) -> io::Result<usize> {
            unreachable!()
        }
        fn splice_from_pipe(&self, _: std::os::fd::BorrowedFd<'_>, _: usize) -> io::Result<usize> {
            unreachable!()
        }
        fn recv(&self, _: &mut [u8]) -> io::Result<usize> {
            unreachable!()
        }
        fn send(&self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.set(self.bytes.get() + buf.len());
            Ok(buf.len())
        }
        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn msg(id: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Hdr { id, size: body.len() as u16, seq }.to_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    fn session(mode: Mode) -> Session {
        let policy = Policy::from_names(&V7, mode, &[], &[], Unknown::Refuse).unwrap();
        let mut s = Session::new(&V7, policy, None, false, Instant::now());
        // Past the introspector's handshake answer.
        s.flows[TO_HYPERVISOR].preamble = Preamble::None;
        s
    }

    /// QEMU on the connect side: its handshake comes through this layer. An introspector that
    /// writes its answer and a command before that handshake was checked must not reach the
    /// hypervisor: the VM behind the socket may not be the pinned one.
    #[test]
    fn nothing_reaches_the_hypervisor_before_qemus_handshake_passed_the_pin() {
        let policy = Policy::from_names(&V7, Mode::Full, &[], &[], Unknown::Refuse).unwrap();
        let pin = Pin { uuid: None, name: Some(b"one-7".to_vec()) };
        let mut s = Session::new(&V7, policy, Some(pin), true, Instant::now());
        let (to_hypervisor, to_introspector) = (Sink::default(), Sink::default());
        let mut early = vec![24, 0, 0, 0];
        early.extend([0u8; 20]);
        early.extend(msg(18, 1, &[0u8; 24]));
        let r = s.send(Flow::ToHypervisor, &to_hypervisor, &early);
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock), "took bytes before the handshake");
        assert_eq!(to_hypervisor.bytes.get(), 0, "bytes reached the hypervisor before its handshake was checked");
        assert!(s.is_stuck(Flow::ToHypervisor), "held, not blocked on the socket");
        // The wrong VM's handshake: refused, and still nothing went its way.
        let other = handshake::build_qemu([7; 16], 1, b"other-vm", None);
        assert!(s.send(Flow::ToIntrospector, &to_introspector, &other).is_err());
        assert_eq!((to_hypervisor.bytes.get(), to_introspector.bytes.get()), (0, 0));

        // The pinned VM's handshake lets the held bytes through.
        let policy = Policy::from_names(&V7, Mode::Full, &[], &[], Unknown::Refuse).unwrap();
        let pin = Pin { uuid: None, name: Some(b"one-7".to_vec()) };
        let mut s = Session::new(&V7, policy, Some(pin), true, Instant::now());
        let (to_hypervisor, to_introspector) = (Sink::default(), Sink::default());
        assert!(s.send(Flow::ToHypervisor, &to_hypervisor, &early).is_err());
        let right = handshake::build_qemu([7; 16], 1, b"one-7", None);
        assert_eq!(s.send(Flow::ToIntrospector, &to_introspector, &right).unwrap(), right.len());
        assert_eq!(s.send(Flow::ToHypervisor, &to_hypervisor, &early).unwrap(), early.len());
    }

    /// What the KVMi layer costs per message, on top of the write it makes anyway: framing,
    /// policy, seq matching, per-type figures. Passive: a READ_PHYSICAL request (24 B) and its
    /// 4 KiB page (4112 B); active: a PAUSE_VCPU event (552 B) and its reply (24 B). Printed for
    /// docs/BENCHMARKS.md (`cargo test --release --lib kvmi_layer_cost -- --nocapture`). The test
    /// judges what was counted, never the time: a busy machine makes any time bound flaky, and the
    /// speed target lives in the benchmark beside its baseline.
    #[test]
    fn kvmi_layer_cost_per_round_trip() {
        const N: u32 = 200_000;
        let sink = Sink::default();
        let mut page = vec![0u8; 4104];
        page[..8].copy_from_slice(&[0; 8]);
        let mut event = vec![0u8; 544];
        event[0..2].copy_from_slice(&24u16.to_le_bytes());
        event[4] = 10; // PAUSE_VCPU
        let mut reply = vec![0u8; 16];
        reply[9] = 10;
        for mode in [Mode::Full, Mode::ReadOnly] {
            let mut s = session(mode);
            let t = Instant::now();
            for seq in 0..N {
                let req = msg(17, seq, &[0u8; 16]);
                assert_eq!(s.send(Flow::ToHypervisor, &sink, &req).unwrap(), req.len());
                let rep = msg(17, seq, &page);
                assert_eq!(s.send(Flow::ToIntrospector, &sink, &rep).unwrap(), rep.len());
            }
            let passive_ns = t.elapsed().as_nanos() as f64 / f64::from(N);
            let t = Instant::now();
            for seq in 0..N {
                let ev = msg(1, seq, &event);
                assert_eq!(s.send(Flow::ToIntrospector, &sink, &ev).unwrap(), ev.len());
                let rep = msg(0, seq, &reply);
                assert_eq!(s.send(Flow::ToHypervisor, &sink, &rep).unwrap(), rep.len());
            }
            let active_ns = t.elapsed().as_nanos() as f64 / f64::from(N);
            eprintln!(
                "kvmi layer ({mode:?}): {passive_ns:.0} ns per passive round trip, {active_ns:.0} ns per active one \
                 (two messages each, message building included)"
            );
            let read = s.figures[&MessageType { kind: Kind::Command, name: "READ_PHYSICAL" }].count;
            let paused = s.figures[&MessageType { kind: Kind::Event, name: "PAUSE_VCPU" }].count;
            assert_eq!((read, paused), (u64::from(N), u64::from(N)));
        }
    }
}
