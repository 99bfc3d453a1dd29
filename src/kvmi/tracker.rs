//! Which commands and events are waiting for their replies, matched by seq.
//!
//! A command forwarded to the hypervisor waits for a reply with the same id and seq; an event
//! forwarded to the introspector waits for an event reply (id 0) with the same seq. The two
//! seq spaces are apart (libkvmi numbers commands, KVM numbers events). The time each waited,
//! as the caller saw it (forwarded → first byte of the reply), is what the per-message
//! latency figures record. Time is passed in, never read here.
//!
//! `CONTROL_CMD_RESPONSE` turns command replies off and on (libkvmi's batches: off for the
//! batch, on again with the last message); the tracker follows it so that commands sent while
//! replies are off are not waited for, and says whether a command expects a reply.
//!
//! Invariants:
//! - at most `MAX_PENDING_COMMANDS` commands and `MAX_PENDING_EVENTS` events wait at once;
//!   more is refused (a peer cannot grow the relay's memory);
//! - a reply or event reply that matches nothing waiting is refused, never guessed at;
//! - UNHOOK and CMD_ERROR events have no reply and are never waited for.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use super::abi::{ReplyData, Table, v7};
use super::wire::Hdr;

/// libkvmi keeps one command in flight per connection (batches wait for none but the last);
/// a generous bound all the same.
pub const MAX_PENDING_COMMANDS: usize = 1024;
/// One event in flight per vCPU; KVM's vCPU limit is of this order.
pub const MAX_PENDING_EVENTS: usize = 4096;

/// `struct kvmi_event { u16 size; u16 vcpu; u8 event; ... }` at the front of an event body.
pub const EVENT_COMMON_MIN_BYTES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCommand {
    pub id: u16,
    pub since: Instant,
}

/// An event waiting for its reply, with what the read-only policy needs to judge the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingEvent {
    pub event: u8,
    pub vcpu: u16,
    /// CR and MSR events: the value the guest is writing (the reply's `new_val` that changes
    /// nothing).
    pub guest_new_value: Option<u64>,
    pub since: Instant,
}

/// What was wrong with a message, for the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A reply (id, seq) for no command waiting.
    UnmatchedReply {
        id: u16,
        seq: u32,
    },
    /// An event reply for no event waiting.
    UnmatchedEventReply {
        seq: u32,
    },
    /// A command whose seq is already waiting.
    DuplicateCommand {
        id: u16,
        seq: u32,
    },
    DuplicateEvent {
        seq: u32,
    },
    TooManyCommands,
    TooManyEvents,
    /// An event body too short for `struct kvmi_event`'s size, vcpu and event fields.
    ShortEvent {
        seq: u32,
        size: u16,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::UnmatchedReply { id, seq } => write!(f, "reply id {id} seq {seq} matches no command"),
            Mismatch::UnmatchedEventReply { seq } => write!(f, "event reply seq {seq} matches no event"),
            Mismatch::DuplicateCommand { id, seq } => write!(f, "command id {id} reuses seq {seq} still waiting"),
            Mismatch::DuplicateEvent { seq } => write!(f, "event reuses seq {seq} still waiting"),
            Mismatch::TooManyCommands => write!(f, "more than {MAX_PENDING_COMMANDS} commands waiting"),
            Mismatch::TooManyEvents => write!(f, "more than {MAX_PENDING_EVENTS} events waiting"),
            Mismatch::ShortEvent { seq, size } => {
                write!(f, "event seq {seq} of {size} body bytes, too short for its common header")
            }
        }
    }
}

#[derive(Debug)]
pub struct Tracker {
    table: &'static Table,
    commands: HashMap<u32, PendingCommand>,
    events: HashMap<u32, PendingEvent>,
    /// Whether KVM replies to commands (`CONTROL_CMD_RESPONSE`); on at the start.
    replies_on: bool,
}

impl Tracker {
    pub fn new(table: &'static Table) -> Tracker {
        Tracker { table, commands: HashMap::new(), events: HashMap::new(), replies_on: true }
    }

    /// Whether KVM will reply to this command. `body_front` is the start of its body (two
    /// bytes are looked at, and only for `CONTROL_CMD_RESPONSE`: `enable`, `now`).
    pub fn expects_reply(&self, hdr: Hdr, body_front: &[u8]) -> bool {
        match cmd_response(hdr, body_front) {
            Some((enable, true)) => enable,
            _ => self.replies_on,
        }
    }

    /// Records a command forwarded to the hypervisor at `now`.
    pub fn forwarded_command(&mut self, hdr: Hdr, body_front: &[u8], now: Instant) -> Result<(), Mismatch> {
        let expects = self.expects_reply(hdr, body_front);
        if let Some((enable, _)) = cmd_response(hdr, body_front) {
            self.replies_on = enable;
        }
        if !expects {
            return Ok(());
        }
        if self.commands.contains_key(&hdr.seq) {
            return Err(Mismatch::DuplicateCommand { id: hdr.id, seq: hdr.seq });
        }
        if self.commands.len() >= MAX_PENDING_COMMANDS {
            return Err(Mismatch::TooManyCommands);
        }
        self.commands.insert(hdr.seq, PendingCommand { id: hdr.id, since: now });
        Ok(())
    }

    /// A reply from the hypervisor whose first byte arrived at `now`: the command it answers
    /// and how long it waited.
    pub fn reply(&mut self, hdr: Hdr, now: Instant) -> Result<(u16, Duration), Mismatch> {
        match self.commands.get(&hdr.seq) {
            Some(p) if p.id == hdr.id => {
                let p = self.commands.remove(&hdr.seq).expect("just found");
                Ok((p.id, now.saturating_duration_since(p.since)))
            }
            _ => Err(Mismatch::UnmatchedReply { id: hdr.id, seq: hdr.seq }),
        }
    }

    /// Reads an event's common header: (event id, vcpu, guest_new_value).
    pub fn describe_event(&self, hdr: Hdr, body: &[u8]) -> Result<(u8, u16, Option<u64>), Mismatch> {
        if body.len() < EVENT_COMMON_MIN_BYTES {
            return Err(Mismatch::ShortEvent { seq: hdr.seq, size: hdr.size });
        }
        let common = usize::from(u16::from_le_bytes([body[0], body[1]]));
        let vcpu = u16::from_le_bytes([body[2], body[3]]);
        let event = body[4];
        let kind = self.table.event(event).map(|e| e.reply);
        // CR: { u16 cr; u16 pad[3]; u64 old; u64 new }, MSR: { u32 msr; u32 pad; u64 old;
        // u64 new }: the new value 16 bytes into the specific part, after `size` common bytes.
        let guest_new_value = match kind {
            Some(ReplyData::NewValue) => common
                .checked_add(16)
                .and_then(|at| body.get(at..at + 8))
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
            _ => None,
        };
        Ok((event, vcpu, guest_new_value))
    }

    /// Records an event forwarded to the introspector (its first byte seen at `now`). Returns
    /// its event id.
    pub fn forwarded_event(&mut self, hdr: Hdr, body: &[u8], now: Instant) -> Result<u8, Mismatch> {
        let (event, vcpu, guest_new_value) = self.describe_event(hdr, body)?;
        if matches!(self.table.event(event).map(|e| e.reply), Some(ReplyData::NoReply)) {
            return Ok(event);
        }
        if self.events.contains_key(&hdr.seq) {
            return Err(Mismatch::DuplicateEvent { seq: hdr.seq });
        }
        if self.events.len() >= MAX_PENDING_EVENTS {
            return Err(Mismatch::TooManyEvents);
        }
        self.events.insert(hdr.seq, PendingEvent { event, vcpu, guest_new_value, since: now });
        Ok(event)
    }

    /// The event an event reply answers, without taking it (the policy judges first).
    pub fn event_for_reply(&self, hdr: Hdr) -> Result<PendingEvent, Mismatch> {
        self.events.get(&hdr.seq).copied().ok_or(Mismatch::UnmatchedEventReply { seq: hdr.seq })
    }

    /// An event reply forwarded (as sent or replaced) at `now`: the event and how long the
    /// vCPU stood still as the relay saw it.
    pub fn event_replied(&mut self, hdr: Hdr, now: Instant) -> Result<(PendingEvent, Duration), Mismatch> {
        let p = self.events.remove(&hdr.seq).ok_or(Mismatch::UnmatchedEventReply { seq: hdr.seq })?;
        Ok((p, now.saturating_duration_since(p.since)))
    }

    pub fn waiting_commands(&self) -> usize {
        self.commands.len()
    }

    pub fn waiting_events(&self) -> usize {
        self.events.len()
    }

    pub fn replies_on(&self) -> bool {
        self.replies_on
    }
}

/// `CONTROL_CMD_RESPONSE { u8 enable; u8 now; ... }`: (enable, now).
fn cmd_response(hdr: Hdr, body_front: &[u8]) -> Option<(bool, bool)> {
    if hdr.id != v7::CONTROL_CMD_RESPONSE {
        return None;
    }
    Some((body_front.first().is_some_and(|&b| b != 0), body_front.get(1).is_some_and(|&b| b != 0)))
}

#[cfg(test)]
mod tests {
    use super::super::abi::V7;
    use super::*;

    fn h(id: u16, seq: u32, size: u16) -> Hdr {
        Hdr { id, size, seq }
    }

    /// An event body: common part of `common` bytes, then `specific`.
    pub(crate) fn event_body(event: u8, vcpu: u16, common: u16, specific: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; usize::from(common)];
        b[0..2].copy_from_slice(&common.to_le_bytes());
        b[2..4].copy_from_slice(&vcpu.to_le_bytes());
        b[4] = event;
        b.extend_from_slice(specific);
        b
    }

    #[test]
    fn a_reply_is_matched_by_id_and_seq_and_timed_from_the_forward() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        t.forwarded_command(h(17, 5, 16), &[], t0).unwrap();
        t.forwarded_command(h(13, 6, 16), &[], t0 + Duration::from_micros(1)).unwrap();
        assert_eq!(t.waiting_commands(), 2);
        // Out of order (two vCPUs) is fine.
        assert_eq!(t.reply(h(13, 6, 8), t0 + Duration::from_micros(11)), Ok((13, Duration::from_micros(10))));
        assert_eq!(t.reply(h(17, 5, 4104), t0 + Duration::from_micros(30)), Ok((17, Duration::from_micros(30))));
        assert_eq!(t.waiting_commands(), 0);
    }

    #[test]
    fn a_reply_for_nothing_waiting_or_with_the_wrong_id_is_refused() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        assert_eq!(t.reply(h(17, 1, 8), t0), Err(Mismatch::UnmatchedReply { id: 17, seq: 1 }));
        t.forwarded_command(h(17, 1, 16), &[], t0).unwrap();
        assert_eq!(t.reply(h(18, 1, 8), t0), Err(Mismatch::UnmatchedReply { id: 18, seq: 1 }));
        // Still waiting: the wrong reply took nothing.
        assert!(t.reply(h(17, 1, 8), t0).is_ok());
        assert!(t.reply(h(17, 1, 8), t0).is_err(), "a second reply to the same command");
    }

    #[test]
    fn duplicates_and_floods_are_refused() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        t.forwarded_command(h(2, 1, 0), &[], t0).unwrap();
        assert_eq!(t.forwarded_command(h(2, 1, 0), &[], t0), Err(Mismatch::DuplicateCommand { id: 2, seq: 1 }));
        for seq in 2..=MAX_PENDING_COMMANDS as u32 {
            t.forwarded_command(h(2, seq, 0), &[], t0).unwrap();
        }
        assert_eq!(t.forwarded_command(h(2, 99_999, 0), &[], t0), Err(Mismatch::TooManyCommands));
    }

    #[test]
    fn a_batch_with_replies_off_waits_only_for_its_last_message() {
        // libkvmi's batch: CONTROL_CMD_RESPONSE enable=0 now=1, the commands, then
        // CONTROL_CMD_RESPONSE enable=1 now=1 (wait) or now=0 (no wait).
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        let off = h(27, 10, 8);
        assert!(!t.expects_reply(off, &[0, 1]));
        t.forwarded_command(off, &[0, 1, 0, 0, 0, 0, 0, 0], t0).unwrap();
        assert!(!t.replies_on());
        for seq in 11..14 {
            assert!(!t.expects_reply(h(7, seq, 16), &[]));
            t.forwarded_command(h(7, seq, 16), &[], t0).unwrap();
        }
        assert_eq!(t.waiting_commands(), 0);
        let on = h(27, 14, 8);
        assert!(t.expects_reply(on, &[1, 1]));
        t.forwarded_command(on, &[1, 1], t0).unwrap();
        assert_eq!(t.waiting_commands(), 1);
        assert!(t.reply(h(27, 14, 8), t0).is_ok());
        assert!(t.replies_on());

        // enable=1 now=0: this one goes unanswered, the next ones are answered.
        t.forwarded_command(h(27, 20, 8), &[0, 1], t0).unwrap();
        assert!(!t.expects_reply(h(27, 21, 8), &[1, 0]));
        t.forwarded_command(h(27, 21, 8), &[1, 0], t0).unwrap();
        assert_eq!(t.waiting_commands(), 0);
        assert!(t.expects_reply(h(17, 22, 16), &[]));
        // enable=0 now=0: answered itself, the next ones not.
        assert!(t.expects_reply(h(27, 23, 8), &[0, 0]));
        t.forwarded_command(h(27, 23, 8), &[0, 0], t0).unwrap();
        assert_eq!(t.waiting_commands(), 1);
        assert!(!t.expects_reply(h(17, 24, 16), &[]));
    }

    #[test]
    fn events_wait_for_their_reply_and_say_how_long_the_vcpu_stood() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        let body = event_body(v7::EVENT_PAUSE_VCPU, 3, 536, &[]);
        assert_eq!(t.forwarded_event(h(1, 7, 544), &body, t0), Ok(v7::EVENT_PAUSE_VCPU));
        // Command seqs and event seqs are apart.
        assert!(t.reply(h(17, 7, 8), t0).is_err());
        let p = t.event_for_reply(h(0, 7, 16)).unwrap();
        assert_eq!((p.event, p.vcpu, p.guest_new_value), (10, 3, None));
        let (p, waited) = t.event_replied(h(0, 7, 16), t0 + Duration::from_micros(42)).unwrap();
        assert_eq!((p.event, waited), (10, Duration::from_micros(42)));
        assert_eq!(t.event_replied(h(0, 7, 16), t0), Err(Mismatch::UnmatchedEventReply { seq: 7 }));
    }

    #[test]
    fn cr_and_msr_events_carry_the_guests_new_value() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        let mut cr = vec![0u8; 24];
        cr[0..2].copy_from_slice(&3u16.to_le_bytes());
        cr[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        cr[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
        let body = event_body(v7::EVENT_CR, 0, 536, &cr);
        t.forwarded_event(h(1, 1, body.len() as u16), &body, t0).unwrap();
        assert_eq!(t.event_for_reply(h(0, 1, 24)).unwrap().guest_new_value, Some(0x2000));
        // An event cut before its new value: known event, value unknown.
        let short = event_body(v7::EVENT_MSR, 0, 536, &[0; 12]);
        t.forwarded_event(h(1, 2, short.len() as u16), &short, t0).unwrap();
        assert_eq!(t.event_for_reply(h(0, 2, 24)).unwrap().guest_new_value, None);
    }

    #[test]
    fn events_without_replies_are_not_waited_for_and_short_events_are_refused() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&V7);
        let unhook = event_body(v7::EVENT_UNHOOK, 0, 536, &[]);
        assert_eq!(t.forwarded_event(h(1, 1, 536), &unhook, t0), Ok(0));
        assert_eq!(t.waiting_events(), 0);
        assert_eq!(t.forwarded_event(h(1, 2, 4), &[0; 4], t0), Err(Mismatch::ShortEvent { seq: 2, size: 4 }));
        let b = event_body(v7::EVENT_PAUSE_VCPU, 0, 536, &[]);
        t.forwarded_event(h(1, 3, 536), &b, t0).unwrap();
        assert_eq!(t.forwarded_event(h(1, 3, 536), &b, t0), Err(Mismatch::DuplicateEvent { seq: 3 }));
    }
}
