//! One `--kvmi` connection's layer (`kvmi::session`, with the tracker and the policy behind it)
//! driven the way a connection drives it, against a reference run of the same two streams.
//!
//! Input: a flags byte (QEMU's handshake in the stream, read-only, unknown ids passed, READ_PHYSICAL
//! denied, a uuid or name pin), the stream toward the hypervisor (the introspector's answer, then
//! commands and event replies), the stream toward the introspector (QEMU's handshake when it is
//! in the stream, then replies and events), each behind a u16 length, then a schedule: in which
//! order the two streams' messages arrive, where each is cut, how much each write may take.
//!
//! The reference delivers each message whole into a destination that takes everything. The run
//! under test delivers the same messages in the same order, each cut into reads, part of the next
//! message of the same stream arriving with the end of one, into destinations that take a few
//! bytes, nothing (would block) or everything, and then lets the destinations drain. Checked:
//! - after every message, both destinations hold exactly what the reference's hold (no byte lost,
//!   duplicated or reordered across partial writes and cuts), and the session refuses at the same
//!   message with the same reason, or at none; the per-type figures agree at the end; once
//!   refused, what went out is a prefix of what the reference wrote (the rest was in flight);
//! - message-atomic delivery: after every call, a destination holding part of a message has the
//!   rest of it waiting in the relay (the pump's bytes or the relay's own replies), and when every
//!   write was taken whole no destination ever holds part of a message;
//! - with QEMU's handshake in the stream, not a byte reaches the hypervisor before it passed;
//! - a send takes no more than it is offered, and says "would block" only when it took nothing.
#![no_main]
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;
use std::time::Instant;

use kvmi_relay::datapath::store::Side;
use kvmi_relay::kvmi::abi::{ID_EVENT, V7};
use kvmi_relay::kvmi::handshake::Pin;
use kvmi_relay::kvmi::policy::{Mode, Policy, Unknown};
use kvmi_relay::kvmi::session::Session;
use kvmi_relay::kvmi::wire::Flow;
use libfuzzer_sys::fuzz_target;

const FLOWS: [Flow; 2] = [Flow::ToHypervisor, Flow::ToIntrospector];
const UUID: [u8; 16] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];

/// A destination socket: takes at most `budget` bytes until the harness gives it more, then
/// says it would block.
struct Sink {
    out: RefCell<Vec<u8>>,
    budget: Cell<usize>,
}

impl Sink {
    fn new() -> Sink {
        Sink { out: RefCell::new(Vec::new()), budget: Cell::new(usize::MAX) }
    }
}

impl Side for Sink {
    fn splice_to_pipe(&self, _: BorrowedFd<'_>, _: usize) -> io::Result<usize> {
        unreachable!("a KVMi session copies")
    }
    fn splice_from_pipe(&self, _: BorrowedFd<'_>, _: usize) -> io::Result<usize> {
        unreachable!("a KVMi session copies")
    }
    fn recv(&self, _: &mut [u8]) -> io::Result<usize> {
        unreachable!("the session only writes")
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.budget.get());
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.budget.set(self.budget.get() - n);
        self.out.borrow_mut().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        Ok(())
    }
}

/// What comes before a stream's messages.
#[derive(Clone, Copy, PartialEq)]
enum Preamble {
    None,
    Qemu,
    Answer,
}

/// One unit of a stream, framed here by the protocol's rules (independently of the code under
/// test): `end` is where it ends in its stream (capped at the stream's end), `decisive` how many
/// of its bytes decide a refusal (its size field) when it is one the relay refuses as soon as
/// that much is in, else its length.
#[derive(Clone, Copy, Debug)]
struct Item {
    flow: usize,
    start: usize,
    end: usize,
    decisive: usize,
}

fn frame_stream(flow: usize, s: &[u8], preamble: Preamble) -> Vec<Item> {
    let mut items = Vec::new();
    let mut at = 0;
    let u32_at = |at: usize| s.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    if preamble != Preamble::None && at < s.len() {
        let (ok, refuse_at) = match (preamble, u32_at(0)) {
            (_, None) => (None, 4),
            (Preamble::Qemu, Some(n)) => ((n == 96 || n == 104).then_some(n), 4),
            (_, Some(n)) => ((24..=4096).contains(&n).then_some(n), 4),
        };
        match ok {
            Some(n) => {
                items.push(Item { flow, start: 0, end: n.min(s.len()), decisive: n });
                at = n;
            }
            None => {
                items.push(Item { flow, start: 0, end: s.len(), decisive: refuse_at.min(s.len()) });
                return items;
            }
        }
    }
    while at < s.len() {
        let Some(h) = s.get(at..at + 8) else {
            items.push(Item { flow, start: at, end: s.len(), decisive: s.len() - at });
            break;
        };
        let id = u16::from_le_bytes([h[0], h[1]]);
        let size = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let limit = if flow == 0 || id == ID_EVENT { 8192 - 8 } else { usize::from(u16::MAX) };
        if size > limit {
            items.push(Item { flow, start: at, end: s.len(), decisive: 8 });
            break;
        }
        let end = (at + 8 + size).min(s.len());
        items.push(Item { flow, start: at, end, decisive: end - at });
        at = end;
    }
    items
}

/// Whether `out`, framed like the stream it copies, ends between two messages.
fn at_boundary(flow: usize, out: &[u8], preamble: Preamble) -> bool {
    let items = frame_stream(flow, out, preamble);
    items.last().is_none_or(|i| {
        let whole = if i.start == 0 && preamble != Preamble::None {
            out.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        } else {
            out.get(i.start + 2..i.start + 4).map(|b| 8 + usize::from(u16::from_le_bytes([b[0], b[1]])))
        };
        whole == Some(i.end - i.start)
    })
}

/// The schedule: bytes read in turn, zeros once they run out.
struct Schedule<'a>(&'a [u8]);

impl Schedule<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
}

struct Setup {
    qemu_in_stream: bool,
    policy: Policy,
    pin: Option<Pin>,
    preambles: [Preamble; 2],
}

impl Setup {
    fn session(&self) -> Session {
        static NOW: OnceLock<Instant> = OnceLock::new();
        Session::new(&V7, self.policy.clone(), self.pin.clone(), self.qemu_in_stream, *NOW.get_or_init(Instant::now))
    }
}

/// What a run saw: after each item both destinations' lengths, and where and why it stopped.
#[derive(Debug, PartialEq)]
struct Seen {
    after_item: Vec<[usize; 2]>,
    refused: Option<(usize, String)>,
}

type Figures = Vec<(String, u64, u64, u64)>;

fn figures(s: &Session) -> Figures {
    s.figures.iter().map(|(t, f)| (t.to_string(), f.count, f.bytes, f.denied)).collect()
}

fn check_send(r: &io::Result<usize>, offered: usize) {
    match r {
        Ok(n) => assert!(*n > 0 && *n <= offered, "took {n} of {offered}"),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}"),
    }
}

/// Every message whole into destinations that take everything.
fn reference(setup: &Setup, streams: &[&[u8]; 2], order: &[Item]) -> (Seen, [Vec<u8>; 2], Figures) {
    let mut s = setup.session();
    let sinks = [Sink::new(), Sink::new()];
    let mut pending: [Vec<u8>; 2] = [vec![], vec![]];
    let mut seen = Seen { after_item: vec![], refused: None };
    for (i, it) in order.iter().enumerate() {
        let f = it.flow;
        pending[f].extend_from_slice(&streams[f][it.start..it.end]);
        let r = s.send(FLOWS[f], &sinks[f], &pending[f]);
        if let Some(why) = s.malformed.clone() {
            seen.refused = Some((i, why));
            break;
        }
        check_send(&r, pending[f].len());
        if let Ok(n) = r {
            pending[f].drain(..n);
        }
        for g in 0..2 {
            // What the other direction held (toward the hypervisor until QEMU's handshake
            // passed) is offered again, as the connection does on its next turn.
            if g != f && !pending[g].is_empty() {
                let r = s.send(FLOWS[g], &sinks[g], &pending[g]);
                if let Some(why) = s.malformed.clone() {
                    seen.refused = Some((i, why));
                    break;
                }
                check_send(&r, pending[g].len());
                if let Ok(n) = r {
                    pending[g].drain(..n);
                }
            }
            s.flush(FLOWS[g], &sinks[g]).expect("a sink only blocks");
            let out = sinks[g].out.borrow();
            assert!(at_boundary(g, &out, setup.preambles[g]), "reference: part of a message written to flow {g}");
        }
        if seen.refused.is_some() {
            break;
        }
        seen.after_item.push([0, 1].map(|g| sinks[g].out.borrow().len()));
    }
    (seen, sinks.map(|k| k.out.into_inner()), figures(&s))
}

fn budget(sched: &mut Schedule) -> usize {
    match sched.byte() {
        0..=95 => usize::MAX,
        96..=127 => 0,
        b => usize::from(b & 31),
    }
}

/// The same messages, cut, merged and written in pieces.
fn cut_run(setup: &Setup, streams: &[&[u8]; 2], order: &[Item], sched: &mut Schedule) -> (Seen, [Vec<u8>; 2], Figures) {
    let mut s = setup.session();
    let sinks = [Sink::new(), Sink::new()];
    let mut pending: [Vec<u8>; 2] = [vec![], vec![]];
    let mut delivered = [0usize; 2];
    let mut seen = Seen { after_item: vec![], refused: None };
    // The part of a message some destination holds must have the rest of it waiting here.
    let atomic = |s: &Session, pending: &[Vec<u8>; 2], whole_writes: bool| {
        if s.awaits_handshake() {
            assert!(sinks[0].out.borrow().is_empty(), "bytes reached the hypervisor before its handshake passed");
        }
        for g in 0..2 {
            let out = sinks[g].out.borrow();
            if !at_boundary(g, &out, setup.preambles[g]) {
                assert!(!whole_writes, "part of a message written to flow {g} though every write was taken whole");
                assert!(
                    s.outbox_waiting(FLOWS[g]) || !pending[g].is_empty(),
                    "flow {g} holds part of a message and nothing of its rest is waiting"
                );
            }
        }
    };
    'items: for (i, it) in order.iter().enumerate() {
        let f = it.flow;
        let next = order[i + 1..].iter().find(|n| n.flow == f);
        let mut whole_writes = true;
        while delivered[f] < it.end {
            let left = it.end - delivered[f];
            let n = match sched.byte() {
                0..=127 => left,
                b => (usize::from(b & 127) + 1).min(left),
            };
            pending[f].extend_from_slice(&streams[f][delivered[f]..delivered[f] + n]);
            delivered[f] += n;
            if delivered[f] == it.end {
                // Part of the next message of this stream may come with the end of this one,
                // never enough of it to complete it or to decide a refusal.
                if let Some(nx) = next {
                    let most = nx.decisive.min(nx.end - nx.start).saturating_sub(1);
                    let head = usize::from(sched.byte()) % (most + 1);
                    pending[f].extend_from_slice(&streams[f][nx.start..nx.start + head]);
                    delivered[f] += head;
                }
            }
            let b = budget(sched);
            whole_writes &= b == usize::MAX;
            sinks[f].budget.set(b);
            let r = s.send(FLOWS[f], &sinks[f], &pending[f]);
            if let Some(why) = s.malformed.clone() {
                seen.refused = Some((i, why));
                break 'items;
            }
            check_send(&r, pending[f].len());
            if let Ok(n) = r {
                pending[f].drain(..n);
            }
            for g in 0..2 {
                let b = budget(sched);
                whole_writes &= b == usize::MAX;
                sinks[g].budget.set(b);
                s.flush(FLOWS[g], &sinks[g]).expect("a sink only blocks");
            }
            atomic(&s, &pending, whole_writes);
        }
        // The destinations drain: whatever the pumps hold is offered again, taken whole, this
        // message's stream first (as the reference writes it), until nothing moves (a command
        // released in one stream may queue the relay's reply in the other).
        for _ in 0..3 {
            for g in [f, 1 - f] {
                sinks[g].budget.set(usize::MAX);
                if !pending[g].is_empty() {
                    let r = s.send(FLOWS[g], &sinks[g], &pending[g]);
                    if let Some(why) = s.malformed.clone() {
                        seen.refused = Some((i, why));
                        break 'items;
                    }
                    check_send(&r, pending[g].len());
                    if let Ok(n) = r {
                        pending[g].drain(..n);
                    }
                }
                s.flush(FLOWS[g], &sinks[g]).expect("a sink only blocks");
            }
        }
        for g in 0..2 {
            assert!(!s.outbox_waiting(FLOWS[g]), "flow {g}: relay-made messages left after a drain");
        }
        atomic(&s, &pending, true);
        seen.after_item.push([0, 1].map(|g| sinks[g].out.borrow().len()));
    }
    (seen, sinks.map(|k| k.out.into_inner()), figures(&s))
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let n = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    let rest = data.get(2..).unwrap_or(&[]);
    let (s, rest) = rest.split_at(n.min(rest.len()));
    *data = rest;
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut data)) = data.split_first() else { return };
    let to_hypervisor = take(&mut data);
    let to_introspector = take(&mut data);
    let mut sched = Schedule(data);

    let qemu_in_stream = flags & 1 != 0;
    let mode = if flags & 2 != 0 { Mode::ReadOnly } else { Mode::Full };
    let unknown = if flags & 4 != 0 { Unknown::Pass } else { Unknown::Refuse };
    let deny = if flags & 8 != 0 { vec!["READ_PHYSICAL".to_string()] } else { vec![] };
    let policy = Policy::from_names(&V7, mode, &[], &deny, unknown).expect("known names");
    let pin = match (flags >> 4) & 3 {
        1 => Some(Pin { uuid: Some(UUID), name: None }),
        2 => Some(Pin { uuid: None, name: Some(b"one-7".to_vec()) }),
        _ => None,
    };
    let preambles = [Preamble::Answer, if qemu_in_stream { Preamble::Qemu } else { Preamble::None }];
    let setup = Setup { qemu_in_stream, policy, pin, preambles };

    let streams = [to_hypervisor, to_introspector];
    let mut queues = [0, 1].map(|f| frame_stream(f, streams[f], preambles[f]).into_iter().peekable());
    let mut order = Vec::new();
    loop {
        let pick = (sched.byte() & 1) as usize;
        let f = if queues[pick].peek().is_some() { pick } else { 1 - pick };
        match queues[f].next() {
            Some(it) => order.push(it),
            None => break,
        }
    }

    let (want, want_out, want_fig) = reference(&setup, &streams, &order);
    let (got, got_out, got_fig) = cut_run(&setup, &streams, &order, &mut sched);
    assert_eq!(got, want, "order {order:?}");
    if want.refused.is_none() {
        assert_eq!(got_out, want_out);
        assert_eq!(got_fig, want_fig);
    } else {
        // Refused: the connection closes, and what was still on its way is dropped; what did
        // go out is what the reference wrote.
        for g in 0..2 {
            assert!(
                want_out[g].starts_with(&got_out[g]),
                "flow {g}: {:?} is not a prefix of {:?}",
                got_out[g],
                want_out[g]
            );
        }
    }
});
