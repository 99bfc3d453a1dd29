//! Where bytes move: one pump, used for both directions of a connection.
//!
//! A pump owns the bytes in flight for one direction, in a store (`store.rs`: a kernel pipe for
//! splice, a user-space buffer for copies). It reads from its source while it has room and
//! writes to its destination while it holds data; after each read, `policy.rs` (pure) says
//! whether to read on, grow the store (it starts small and doubles up to its ceiling each time
//! a read fills all the room it was offered: docs/DESIGN.md, "Stores that grow"), wait for the
//! next edge, or drain it so that a store of the other kind replaces it (copy-then-splice:
//! docs/DESIGN.md, "Messages copy, bulk splices"). It never touches the poller: the caller
//! tells it which of its sockets became ready and reads back what it wants next.
//!
//! Invariants (relied on by `conn.rs` and the event loop):
//! - Edge-triggered: a readiness flag is cleared by `WouldBlock`, so the pump drains until the
//!   kernel says there is nothing more; a spurious event costs one `WouldBlock`. One exception
//!   saves the read that would say it: a copy read that got less than the room it offered
//!   (`Action::AwaitEdge`, the policy's module says why). A splice that says `WouldBlock` while
//!   the pipe holds bytes may mean a pipe out of slots, so the source is read again once the
//!   pipe is drained.
//! - Bytes leave in the order they came, each exactly once: only the store counts them (the read
//!   that takes them adds them, the write that delivers them takes them off), and the only way
//!   bytes leave a store is to the destination (or, on fallback, from the pipe into the copy
//!   buffer, before anything else).
//! - Fallback from splice to copy happens only when splice is refused (EINVAL, EOPNOTSUPP)
//!   before any byte has moved that way: EINVAL can also mean a real fault later on.
//! - A store changes kind (copy to splice and back) only when empty, so nothing overtakes what
//!   the other one held.
//! - Half-close: EOF from the source becomes `shutdown(SHUT_WR)` on the destination once the
//!   store is empty; the other direction's pump keeps running.
//! - Backpressure is per direction: a full store stops reads from this source only.
//! - A store that still holds bytes is dropped with its connection, never reused.

use std::io;
use std::time::Instant;

use hdrhistogram::Histogram;
use tracing::{debug, info, warn};

use crate::datapath::policy::{Action, Leg, Policy, Read, Sizes, Switch};
use crate::datapath::store::{Buffer, Side, Spliced, Store, Taken};
use crate::observe::metrics;

/// Most read+write rounds one `run` makes before yielding to other connections and the other
/// direction; the caller runs the pump again on its next loop turn when `Run::more` is set.
const PUMP_ROUNDS_MAX: usize = 16;

/// How one direction moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// splice(2) through a kernel pipe that starts at `pipe_bytes` and may grow to `max_bytes`;
    /// copies if the sockets refuse splice.
    Splice { pipe_bytes: usize, max_bytes: usize },
    /// read/write through a buffer that starts at `initial_bytes` and may grow to `max_bytes`.
    Copy { initial_bytes: usize, max_bytes: usize },
    /// Copies through a `copy_bytes` buffer while reads come in shorter than it: messages,
    /// where a short read proves the socket's queue empty and spares the read that would say
    /// `WouldBlock` (a short splice proves nothing). The first read that fills the buffer (bulk)
    /// moves the direction to splice, through a pipe that starts at `pipe_bytes` and may grow
    /// to `pipe_max_bytes`; `SHORT_SPLICES_TO_COPY` message-sized splices in a row move it back
    /// (`datapath::policy`). A direction left without a pipe copies for good, its buffer growing
    /// up to `copy_max_bytes`.
    CopyThenSplice { copy_bytes: usize, pipe_bytes: usize, pipe_max_bytes: usize, copy_max_bytes: usize },
}

/// Per-direction counters, kept for the life of the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Bytes written to the destination.
    pub bytes: u64,
    /// Of those, bytes that went through splice.
    pub splice_bytes: u64,
    /// Of those, bytes that went through a user-space copy.
    pub copy_bytes: u64,
    /// Successful reads from the source (chunks).
    pub chunks: u64,
    /// Most bytes held in the store at once.
    pub high_water_bytes: usize,
}

impl DirStats {
    /// Folds `other` in: counts add up, the high-water mark is the larger one.
    pub fn add(&mut self, other: &DirStats) {
        self.bytes += other.bytes;
        self.splice_bytes += other.splice_bytes;
        self.copy_bytes += other.copy_bytes;
        self.chunks += other.chunks;
        self.high_water_bytes = self.high_water_bytes.max(other.high_water_bytes);
    }
}

/// What one `run` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    pub read_bytes: usize,
    pub written_bytes: usize,
    /// The store went from empty to holding bytes during this run.
    pub started: bool,
    /// The store held bytes at some point and is empty at the end of this run.
    pub emptied: bool,
    /// Stopped at the round cap with work left: run again without waiting for an event.
    pub more: bool,
    /// When the write that emptied the store began. Writing to a local socket can wake its
    /// reader on this CPU and let it run before the write returns, so "after the write" may
    /// already be after the peer answered: turnaround is timed from here.
    pub last_write_began: Option<Instant>,
}

/// How far the stream in this direction has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Open,
    /// The source reported read-closed (peer's FIN or hang-up): read on until EOF.
    Closing,
    /// The source said EOF; what is held still goes out, then the half-close.
    Ended,
    /// Everything reached the destination and it was half-closed (`shutdown(SHUT_WR)`).
    Finished,
}

/// Whether the source may have bytes (or EOF) to read: set by events, cleared by WouldBlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Ready,
    Idle,
    /// A splice into the pipe said WouldBlock while the pipe held bytes: the pipe may be out of
    /// slots rather than the socket out of data, so read again once the pipe is drained.
    ReadyWhenDrained,
}

pub struct Pump {
    store: Store,
    /// Ceiling for the store's growth (a copy buffer a refused splice falls back to keeps the
    /// pipe's); lowered to the capacity when the kernel refuses to grow a pipe.
    max_bytes: usize,
    policy: Policy,
    flow: Flow,
    source: Source,
    /// The destination may take bytes: set by events, cleared by WouldBlock.
    dst_ready: bool,
    /// A byte has been spliced in this direction: from then on EINVAL is a fault, not a
    /// refusal of splice. Separate from `stats`, which an operator may reset.
    spliced_any: bool,
    /// Name of the direction for the log lines a change of store writes.
    direction: &'static str,
    pub stats: DirStats,
    /// Bytes per successful read from the source.
    pub chunk_bytes: Histogram<u64>,
}

/// A fatal error, and which socket it came from.
#[derive(Debug)]
pub struct PumpError {
    /// True when reading the source failed, false when writing (or half-closing) the destination.
    pub at_source: bool,
    pub error: io::Error,
}

impl PumpError {
    fn src(error: io::Error) -> PumpError {
        PumpError { at_source: true, error }
    }
    fn dst(error: io::Error) -> PumpError {
        PumpError { at_source: false, error }
    }
}

fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP))
}

impl Pump {
    pub fn new(strategy: Strategy, direction: &'static str) -> io::Result<Pump> {
        let (store, max_bytes, policy) = match strategy {
            Strategy::Splice { pipe_bytes, max_bytes } => {
                (Store::Pipe(Spliced::new(pipe_bytes)?), max_bytes, Policy::Fixed)
            }
            Strategy::Copy { initial_bytes, max_bytes } => {
                (Store::Buffer(Buffer::new(initial_bytes)), max_bytes, Policy::Fixed)
            }
            Strategy::CopyThenSplice { copy_bytes, pipe_bytes, pipe_max_bytes, copy_max_bytes } => (
                Store::Buffer(Buffer::new(copy_bytes)),
                pipe_max_bytes,
                Policy::Adaptive { sizes: Sizes { copy_bytes, pipe_bytes, copy_max_bytes }, leg: Leg::Messages },
            ),
        };
        Ok(Pump {
            store,
            max_bytes,
            policy,
            flow: Flow::Open,
            source: Source::Ready,
            dst_ready: true,
            spliced_any: false,
            direction,
            stats: DirStats::default(),
            chunk_bytes: metrics::chunk_histogram(),
        })
    }

    /// The source may have bytes to read (a readiness event, or bytes a protocol layer holds).
    pub fn source_ready(&mut self) {
        self.source = Source::Ready;
    }

    /// The source reported read-closed: from now on the pump reads until EOF.
    pub fn source_closing(&mut self) {
        if self.flow == Flow::Open {
            self.flow = Flow::Closing;
        }
    }

    /// The destination may take bytes.
    pub fn destination_ready(&mut self) {
        self.dst_ready = true;
    }

    /// Bytes in flight.
    pub fn fill(&self) -> usize {
        self.store.fill()
    }

    pub fn capacity_bytes(&self) -> usize {
        self.store.capacity_bytes()
    }

    /// Zeroes the counters (`stats reset`); the data path's own state is untouched.
    pub fn reset_stats(&mut self) {
        self.stats = DirStats::default();
        self.chunk_bytes.reset();
    }

    pub fn uses_splice(&self) -> bool {
        self.store.is_pipe()
    }

    /// The source said EOF and everything before it reached the destination, which was shut.
    pub fn finished(&self) -> bool {
        self.flow == Flow::Finished
    }

    /// The source has neither said EOF nor been reported read-closed.
    pub fn source_open(&self) -> bool {
        self.flow == Flow::Open
    }

    /// The source has said EOF.
    pub fn src_eof(&self) -> bool {
        matches!(self.flow, Flow::Ended | Flow::Finished)
    }

    /// Waiting for the destination to take bytes: the caller should ask for write readiness.
    pub fn blocked_on_dst(&self) -> bool {
        self.fill() > 0 && !self.dst_ready
    }

    fn may_read(&self) -> bool {
        matches!(self.flow, Flow::Open | Flow::Closing)
            && self.source == Source::Ready
            && self.store.has_room()
            && self.policy.may_read()
    }

    /// Moves bytes until both sides would block, the store is full and the destination blocks,
    /// or the round cap is hit. `may_read` false means drain only (shutdown in progress).
    /// An error is fatal for the connection (reset, broken pipe, ...).
    pub fn run(&mut self, src: &impl Side, dst: &impl Side, may_read: bool) -> Result<Run, PumpError> {
        let mut run = Run::default();
        let was_empty = self.fill() == 0;
        for _ in 0..PUMP_ROUNDS_MAX {
            let mut progressed = false;

            if may_read && self.may_read() {
                match self.store.read(src) {
                    Ok(Taken { bytes: 0, .. }) => {
                        self.flow = Flow::Ended;
                        progressed = true;
                    }
                    Ok(Taken { bytes, filled }) => {
                        run.read_bytes += bytes;
                        self.stats.chunks += 1;
                        self.chunk_bytes.saturating_record(bytes as u64);
                        self.stats.high_water_bytes = self.stats.high_water_bytes.max(self.fill());
                        let read = Read {
                            bytes,
                            filled,
                            spliced: self.store.is_pipe(),
                            source_closing: self.flow == Flow::Closing,
                        };
                        match self.policy.on_read(read) {
                            Action::ReadOn | Action::Drain => {}
                            Action::Grow => self.grow_store(),
                            Action::AwaitEdge => self.source = Source::Idle,
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let pipe_holds_bytes = self.store.is_pipe() && self.fill() > 0;
                        self.source = if pipe_holds_bytes { Source::ReadyWhenDrained } else { Source::Idle };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) if splice_refused(&e) && self.store.is_pipe() && !self.spliced_any && self.fill() == 0 => {
                        self.fall_back_to_copy(&e).map_err(PumpError::src)?;
                        progressed = true;
                    }
                    Err(e) => return Err(PumpError::src(e)),
                }
            }

            if self.fill() > 0 && self.dst_ready {
                let began = Instant::now();
                let offered = self.fill();
                let spliced = self.store.is_pipe();
                match self.store.write(dst) {
                    // Nothing taken of a non-empty offer is no progress, and not WouldBlock
                    // either: counted as progress it would spin until the round cap, every turn.
                    Ok(0) => {
                        return Err(PumpError::dst(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!("the destination took 0 of {offered} bytes without blocking"),
                        )));
                    }
                    Ok(n) => {
                        run.written_bytes += n;
                        self.stats.bytes += n as u64;
                        if spliced {
                            self.spliced_any = true;
                            self.stats.splice_bytes += n as u64;
                        } else {
                            self.stats.copy_bytes += n as u64;
                        }
                        if self.fill() == 0 {
                            run.last_write_began = Some(began);
                            self.on_drained();
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dst_ready = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) if splice_refused(&e) && spliced && !self.spliced_any => {
                        self.fall_back_to_copy(&e).map_err(PumpError::dst)?;
                        progressed = true;
                    }
                    Err(e) => return Err(PumpError::dst(e)),
                }
            }

            if self.flow == Flow::Ended && self.fill() == 0 {
                dst.shutdown_write().map_err(PumpError::dst)?;
                self.flow = Flow::Finished;
            }

            if !progressed {
                return Ok(self.summarize(run, was_empty));
            }
        }
        run.more = true;
        Ok(self.summarize(run, was_empty))
    }

    fn summarize(&self, mut run: Run, was_empty: bool) -> Run {
        run.started = was_empty && run.read_bytes > 0;
        run.emptied = self.fill() == 0 && run.written_bytes > 0;
        run
    }

    /// The store just became empty: a source that was waiting for the drain may be read again,
    /// and the policy may replace the store (it is empty, so no byte is in flight).
    fn on_drained(&mut self) {
        if self.source == Source::ReadyWhenDrained {
            self.source = Source::Ready;
        }
        match self.policy.on_drained() {
            None => {}
            Some(Switch::ToPipe { pipe_bytes }) => match Spliced::new(pipe_bytes) {
                Ok(pipe) => {
                    debug!(
                        direction = self.direction,
                        pipe_bytes = pipe.capacity_bytes(),
                        "a read filled the copy buffer: splicing"
                    );
                    self.store = Store::Pipe(pipe);
                }
                // The buffer stays; the next read that fills it grows it.
                Err(e) => self.copy_for_good(&e),
            },
            Some(Switch::ToBuffer { copy_bytes }) => {
                debug!(direction = self.direction, "message-sized reads again: copying");
                self.store = Store::Buffer(Buffer::new(copy_bytes));
            }
        }
    }

    /// A read filled the store: double it, up to its ceiling. It never shrinks; it goes with
    /// the connection. A pipe the kernel refuses to grow (over fs.pipe-max-size unprivileged, or
    /// over fs.pipe-user-pages-soft, which is counted per user, and every relay under the
    /// systemd unit runs as one user) keeps working at its size.
    fn grow_store(&mut self) {
        let capacity = self.store.capacity_bytes();
        if capacity >= self.max_bytes {
            return;
        }
        let wanted = (capacity * 2).min(self.max_bytes);
        if let Err(e) = self.store.grow(wanted) {
            // Once per direction (the ceiling drops to the capacity): an operator should know
            // when the per-user pipe budget, shared by every relay of the unit's user, is spent.
            info!(
                direction = self.direction,
                wanted,
                error = %e,
                "pipe not grown: the kernel refused (over fs.pipe-max-size, or the user's \
                 fs.pipe-user-pages-soft budget is spent); it stays at {capacity} bytes"
            );
            self.max_bytes = capacity;
        }
    }

    /// No pipe to be had (out of file descriptors): this direction copies from now on, with the
    /// copy buffer's ceiling.
    fn copy_for_good(&mut self, why: &io::Error) {
        warn!(direction = self.direction, error = %why, "no pipe for splicing; this direction copies from now on");
        if let Some(ceiling) = self.policy.without_pipe() {
            self.max_bytes = ceiling;
        }
    }

    /// Switches this direction to copies, carrying over whatever the pipe already holds so that
    /// no byte is lost or reordered. The buffer keeps the pipe's capacity and ceiling.
    fn fall_back_to_copy(&mut self, why: &io::Error) -> io::Result<()> {
        let store = std::mem::replace(&mut self.store, Store::Buffer(Buffer::new(0)));
        self.store = store.into_buffer().inspect_err(
            |e| warn!(direction = self.direction, error = %e, "splice refused and the pipe could not be emptied"),
        )?;
        info!(direction = self.direction, error = %why, "splice refused; this direction copies from now on");
        self.policy.without_pipe();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The pump against a fake socket that plays back scripted answers.

    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;
    use crate::datapath::policy::SHORT_SPLICES_TO_COPY;
    use crate::sys;
    use std::os::fd::BorrowedFd;

    /// One scripted answer to a read or a write.
    #[derive(Debug, Clone)]
    enum Step {
        Data(Vec<u8>),
        Take(usize),
        WouldBlock,
        Eof,
        Err(i32),
    }

    #[derive(Default)]
    struct Fake {
        reads: RefCell<VecDeque<Step>>,
        writes: RefCell<VecDeque<Step>>,
        /// What splice-to-pipe answers before falling through to the scripted reads.
        splice_err: Option<i32>,
        written: RefCell<Vec<u8>>,
        shut: RefCell<bool>,
    }

    impl Fake {
        fn reading(steps: Vec<Step>) -> Fake {
            Fake { reads: RefCell::new(steps.into()), ..Fake::default() }
        }
        fn writing(steps: Vec<Step>) -> Fake {
            Fake { writes: RefCell::new(steps.into()), ..Fake::default() }
        }
        fn next_read(&self, max: usize) -> io::Result<Vec<u8>> {
            let step = self.reads.borrow_mut().pop_front().unwrap_or(Step::WouldBlock);
            match step {
                Step::Data(mut d) => {
                    if d.len() > max {
                        let rest = d.split_off(max);
                        self.reads.borrow_mut().push_front(Step::Data(rest));
                    }
                    Ok(d)
                }
                Step::Eof => Ok(Vec::new()),
                Step::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
                Step::Err(e) => Err(io::Error::from_raw_os_error(e)),
                Step::Take(_) => unreachable!(),
            }
        }
        fn next_write(&self, offered: usize) -> io::Result<usize> {
            let step = self.writes.borrow_mut().pop_front().unwrap_or(Step::Take(usize::MAX));
            match step {
                Step::Take(n) => Ok(n.min(offered)),
                Step::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
                Step::Err(e) => Err(io::Error::from_raw_os_error(e)),
                other => unreachable!("{other:?}"),
            }
        }
    }

    impl Side for Fake {
        fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
            if let Some(e) = self.splice_err {
                return Err(io::Error::from_raw_os_error(e));
            }
            let d = self.next_read(len)?;
            if d.is_empty() {
                return Ok(0);
            }
            // Like a socket, bytes the pipe cannot take stay in the source.
            let n = match sys::write(pipe, &d) {
                Ok(n) => n,
                Err(e) => {
                    self.reads.borrow_mut().push_front(Step::Data(d));
                    return Err(e);
                }
            };
            if n < d.len() {
                self.reads.borrow_mut().push_front(Step::Data(d[n..].to_vec()));
            }
            Ok(n)
        }
        fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
            if let Some(e) = self.splice_err {
                return Err(io::Error::from_raw_os_error(e));
            }
            let n = self.next_write(len)?;
            let mut b = vec![0; n];
            let got = sys::read(pipe, &mut b)?;
            self.written.borrow_mut().extend_from_slice(&b[..got]);
            Ok(got)
        }
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            let d = self.next_read(buf.len())?;
            buf[..d.len()].copy_from_slice(&d);
            Ok(d.len())
        }
        fn send(&self, buf: &[u8]) -> io::Result<usize> {
            let n = self.next_write(buf.len())?;
            self.written.borrow_mut().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn shutdown_write(&self) -> io::Result<()> {
            *self.shut.borrow_mut() = true;
            Ok(())
        }
    }

    const SPLICE: Strategy = Strategy::Splice { pipe_bytes: 4096, max_bytes: 4096 };
    const COPY: Strategy = Strategy::Copy { initial_bytes: 4096, max_bytes: 4096 };

    fn pump(strategy: Strategy) -> Pump {
        Pump::new(strategy, "test").unwrap()
    }

    #[test]
    fn forwards_in_order_and_half_closes_after_draining() {
        for mode in [SPLICE, COPY] {
            let src = Fake::reading(vec![Step::Data(b"hello ".to_vec()), Step::Data(b"world".to_vec()), Step::Eof]);
            let dst = Fake::default();
            let mut p = pump(mode);
            // The FIN is already queued: the kernel reports read-closed with the data.
            p.source_closing();
            let run = p.run(&src, &dst, true).unwrap();
            assert_eq!(&*dst.written.borrow(), b"hello world");
            assert!(*dst.shut.borrow(), "EOF must travel as a half-close");
            assert!(p.finished());
            assert!(run.started && run.emptied);
            assert_eq!(p.stats.bytes, 11);
            assert_eq!(p.stats.splice_bytes + p.stats.copy_bytes, 11);
            assert_eq!(p.uses_splice(), mode == SPLICE);
        }
    }

    #[test]
    fn slow_destination_blocks_only_this_direction_and_keeps_bytes() {
        for mode in [SPLICE, COPY] {
            let src = Fake::reading(vec![Step::Data(vec![7; 3000]), Step::Data(vec![8; 3000]), Step::WouldBlock]);
            let dst = Fake::writing(vec![Step::Take(1000), Step::WouldBlock]);
            let mut p = pump(mode);
            p.run(&src, &dst, true).unwrap();
            assert!(p.blocked_on_dst());
            assert_eq!(dst.written.borrow().len(), 1000);
            // The pump never holds more than its store can (a one-page pipe may also run out of
            // slots before it runs out of bytes: the pump then waits for the drain).
            assert!(p.fill() <= p.capacity_bytes() && p.fill() >= 2000);
            // Destination drains: every byte arrives, in order, exactly once.
            p.destination_ready();
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
            let w = dst.written.borrow();
            assert_eq!(w.len(), 6000);
            assert!(w[..3000].iter().all(|&b| b == 7) && w[3000..].iter().all(|&b| b == 8));
            assert!(!*dst.shut.borrow());
        }
    }

    /// Bytes 0, 1, 2, ... wrapping: order and completeness are checked by regenerating them.
    fn counting(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn copy_buffer_doubles_while_reads_fill_it_and_stops_at_its_ceiling() {
        let total = 100_000;
        let src = Fake::reading(vec![Step::Data(counting(0, total)), Step::Eof]);
        // The destination takes little at a time, so the buffer grows while holding bytes.
        let dst = Fake::writing((0..200).flat_map(|_| [Step::Take(700), Step::WouldBlock]).collect());
        let mut p = Pump::new(Strategy::Copy { initial_bytes: 1024, max_bytes: 8192 }, "test").unwrap();
        while !p.finished() {
            p.destination_ready();
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
        }
        assert_eq!(p.capacity_bytes(), 8192, "doubled from 1 KiB up to the ceiling, no further");
        assert_eq!(*dst.written.borrow(), counting(0, total), "every byte once, in order, across each growth");
        assert!(p.stats.high_water_bytes > 4096, "the grown buffer was used: {:?}", p.stats);
    }

    #[test]
    fn pipe_doubles_while_splices_fill_it_and_stops_at_its_ceiling() {
        let total = 300_000;
        let src = Fake::reading(vec![Step::Data(counting(0, total)), Step::Eof]);
        // The destination takes all: a splice into a part-drained pipe can run out of slots
        // before it runs out of room, and only a splice that fills the room grows the pipe.
        let dst = Fake::default();
        let mut p = Pump::new(Strategy::Splice { pipe_bytes: 4096, max_bytes: 65536 }, "test").unwrap();
        assert_eq!(p.capacity_bytes(), 4096);
        while !p.finished() {
            p.destination_ready();
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
        }
        assert!(p.uses_splice());
        assert_eq!(p.capacity_bytes(), 65536, "doubled from 4 KiB up to the ceiling, no further");
        assert_eq!(*dst.written.borrow(), counting(0, total), "every byte once, in order, across each growth");
        assert_eq!(p.stats.high_water_bytes, 65536, "the grown pipe was used: {:?}", p.stats);
    }

    #[test]
    fn a_write_that_takes_nothing_without_blocking_is_an_error_not_progress() {
        let src = Fake::reading(vec![Step::Data(vec![7; 100]), Step::WouldBlock]);
        let dst = Fake::writing(vec![Step::Take(0)]);
        let mut p = pump(COPY);
        let e = p.run(&src, &dst, true).expect_err("Ok(0) from a write must end the session");
        assert!(!e.at_source);
        assert_eq!(e.error.kind(), io::ErrorKind::WriteZero, "{}", e.error);
    }

    #[test]
    fn without_a_pipe_copy_then_splice_grows_its_buffer_to_the_copy_ceiling() {
        let mut p = Pump::new(COPY_THEN_SPLICE, "test").unwrap();
        p.copy_for_good(&io::Error::from_raw_os_error(libc::EMFILE));
        // Reads that fill the buffer now grow it, and stop at --copy-buffer-max (8 KiB), not at
        // --pipe-size-max (64 KiB).
        let big = counting(0, 1 << 20);
        let src = Fake::reading(big.chunks(512).map(|c| Step::Data(c.to_vec())).collect());
        let dst = Fake::writing(vec![Step::WouldBlock]);
        for _ in 0..64 {
            p.source_ready();
            let _ = p.run(&src, &dst, true);
        }
        assert_eq!(p.capacity_bytes(), 8192, "the copy buffer's ceiling, not the pipe's");
    }

    #[test]
    fn copy_buffer_stays_small_for_messages() {
        // One message per readiness event.
        let src = Fake::reading((0..50).map(|i| Step::Data(counting(i * 552, 552))).collect());
        let dst = Fake::default();
        let mut p = Pump::new(Strategy::Copy { initial_bytes: 1024, max_bytes: 8192 }, "test").unwrap();
        for _ in 0..50 {
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
        }
        assert_eq!(*dst.written.borrow(), counting(0, 50 * 552));
        assert_eq!(p.capacity_bytes(), 1024, "no read filled the buffer, so it never grew");
    }

    #[test]
    fn a_short_copy_read_waits_for_the_next_edge_unless_the_source_is_closing() {
        let script = || vec![Step::Data(vec![1; 100]), Step::Data(vec![2; 100]), Step::WouldBlock];
        // Copy: 100 bytes where 4096 were offered means the queue is empty; no second read.
        let (src, dst) = (Fake::reading(script()), Fake::default());
        let mut p = pump(COPY);
        p.run(&src, &dst, true).unwrap();
        assert_eq!(dst.written.borrow().len(), 100);
        assert_eq!(p.source, Source::Idle, "waits for the next edge");
        assert_eq!(src.reads.borrow().len(), 2, "no read after the short one");
        // The next edge: the rest arrives.
        p.source_ready();
        p.run(&src, &dst, true).unwrap();
        assert_eq!(dst.written.borrow().len(), 200);

        // Read-closed reported: read on until EOF or WouldBlock, whatever the sizes.
        let (src, dst) = (Fake::reading(script()), Fake::default());
        let mut p = pump(COPY);
        p.source_closing();
        p.run(&src, &dst, true).unwrap();
        assert_eq!(dst.written.borrow().len(), 200);
        assert!(src.reads.borrow().is_empty(), "read until WouldBlock");

        // Splice: a short splice may be a pipe out of slots, so it reads until WouldBlock.
        let (src, dst) = (Fake::reading(script()), Fake::default());
        let mut p = pump(SPLICE);
        p.run(&src, &dst, true).unwrap();
        assert_eq!(dst.written.borrow().len(), 200);
        assert!(src.reads.borrow().is_empty());
    }

    const COPY_THEN_SPLICE: Strategy =
        Strategy::CopyThenSplice { copy_bytes: 1024, pipe_bytes: 4096, pipe_max_bytes: 65536, copy_max_bytes: 8192 };

    /// Runs `p` until it finishes, every socket ready on each turn.
    fn run_to_end(p: &mut Pump, src: &Fake, dst: &Fake) {
        for _ in 0..10_000 {
            if p.finished() {
                return;
            }
            p.destination_ready();
            p.source_ready();
            p.run(src, dst, true).unwrap();
        }
        panic!("pump never finished");
    }

    #[test]
    fn copy_then_splice_copies_messages_without_a_would_block_read_and_splices_bulk() {
        let mut script: Vec<Step> = (0..5).map(|i| Step::Data(counting(i * 100, 100))).collect();
        script.push(Step::Data(counting(500, 100_000)));
        script.push(Step::Eof);
        let (src, dst) = (Fake::reading(script), Fake::default());
        let mut p = pump(COPY_THEN_SPLICE);
        // Messages: one read each, and the short read ends the turn without a WouldBlock read.
        for i in 0..5 {
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
            assert_eq!(src.reads.borrow().len(), 7 - (i + 1), "message {i}: one read, no more");
            assert!(!p.uses_splice(), "message {i} moved the direction to splice");
        }
        assert_eq!(p.stats.copy_bytes, 500);
        // Bulk: the read that fills the 1 KiB buffer moves the direction to a pipe.
        run_to_end(&mut p, &src, &dst);
        assert!(p.uses_splice());
        assert_eq!(*dst.written.borrow(), counting(0, 100_500), "every byte once, in order, across the switch");
        assert_eq!(p.stats.copy_bytes, 500 + 1024, "the messages and the one full buffer were copied");
        assert_eq!(p.stats.splice_bytes, 100_500 - 1524);
        assert_eq!(p.capacity_bytes(), 65536, "the pipe grew to its ceiling");
        assert!(*dst.shut.borrow());
    }

    #[test]
    fn copy_then_splice_reads_nothing_more_until_the_full_buffer_drained() {
        let (src, dst) = (
            Fake::reading(vec![Step::Data(counting(0, 5000)), Step::Eof]),
            Fake::writing(vec![Step::Take(300), Step::WouldBlock]),
        );
        let mut p = pump(COPY_THEN_SPLICE);
        p.run(&src, &dst, true).unwrap();
        assert!(p.blocked_on_dst() && !p.uses_splice());
        assert_eq!(p.fill(), 1024 - 300, "one read, into the copy buffer only");
        assert_eq!(src.reads.borrow().len(), 2, "no read while the full buffer waits to drain");
        assert_eq!(p.source, Source::Ready, "the unread bytes' readiness is kept for after the switch");
        run_to_end(&mut p, &src, &dst);
        assert!(p.uses_splice());
        assert_eq!(*dst.written.borrow(), counting(0, 5000));
        assert_eq!((p.stats.copy_bytes, p.stats.splice_bytes), (1024, 5000 - 1024));
    }

    #[test]
    fn copy_then_splice_goes_back_to_copies_after_message_sized_splices() {
        let bulk = 10_000;
        let messages = SHORT_SPLICES_TO_COPY as usize + 4;
        let (src, dst) = (Fake::reading(vec![Step::Data(counting(0, bulk))]), Fake::default());
        let mut p = pump(COPY_THEN_SPLICE);
        // The bulk: copied until the buffer filled, then spliced; one event per message after it.
        p.run(&src, &dst, true).unwrap();
        assert!(p.uses_splice());
        let mut went_back_after = None;
        for i in 0..messages {
            // An empty script reads as WouldBlock: each message arrives on its own edge.
            src.reads.borrow_mut().push_back(Step::Data(counting(bulk + i * 100, 100)));
            p.source_ready();
            p.run(&src, &dst, true).unwrap();
            if went_back_after.is_none() && !p.uses_splice() {
                went_back_after = Some(i + 1);
            }
        }
        assert_eq!(went_back_after, Some(SHORT_SPLICES_TO_COPY as usize), "back to copies after that many messages");
        assert_eq!(*dst.written.borrow(), counting(0, bulk + messages * 100), "every byte once, in order, both ways");
        assert_eq!(p.stats.copy_bytes, 1024 + 4 * 100, "the first buffer and the messages after the move back");
        assert_eq!(p.capacity_bytes(), 1024);
        // And a new bulk moves it to splice again.
        src.reads.borrow_mut().push_back(Step::Data(counting(0, 5000)));
        p.source_ready();
        p.run(&src, &dst, true).unwrap();
        assert!(p.uses_splice());
    }

    #[test]
    fn copy_then_splice_refused_after_the_switch_copies_for_good() {
        let mut src = Fake::reading(vec![Step::Data(counting(0, 50_000)), Step::Eof]);
        src.splice_err = Some(libc::EINVAL);
        let dst = Fake::default();
        let mut p = pump(COPY_THEN_SPLICE);
        run_to_end(&mut p, &src, &dst);
        assert!(!p.uses_splice(), "a refused splice is a fallback, not an error, even after copies");
        assert_eq!(*dst.written.borrow(), counting(0, 50_000));
        assert_eq!((p.stats.copy_bytes, p.stats.splice_bytes), (50_000, 0));
        assert!(p.capacity_bytes() > 2048, "the fallen-back buffer grows again: {}", p.capacity_bytes());
    }

    #[test]
    fn splice_refused_before_any_byte_falls_back_to_copy() {
        let mut src = Fake::reading(vec![Step::Data(b"abc".to_vec()), Step::Eof]);
        src.splice_err = Some(libc::EINVAL);
        let dst = Fake::default();
        let mut p = pump(SPLICE);
        p.run(&src, &dst, true).unwrap();
        assert!(!p.uses_splice());
        assert_eq!(&*dst.written.borrow(), b"abc");
        assert_eq!(p.stats.copy_bytes, 3);
        assert_eq!(p.stats.splice_bytes, 0);
    }

    #[test]
    fn splice_refused_on_the_write_side_carries_the_pipe_over() {
        let src = Fake::reading(vec![Step::Data(b"xyz".to_vec()), Step::Eof]);
        let dst = Fake { splice_err: Some(libc::EINVAL), ..Fake::default() };
        let mut p = pump(SPLICE);
        p.run(&src, &dst, true).unwrap();
        assert!(!p.uses_splice());
        assert_eq!(&*dst.written.borrow(), b"xyz", "bytes already in the pipe must not be lost");
    }

    #[test]
    fn einval_after_bytes_moved_is_an_error_not_a_fallback() {
        let src = Fake::reading(vec![Step::Data(b"abc".to_vec()), Step::WouldBlock]);
        let dst = Fake::default();
        let mut p = pump(SPLICE);
        p.run(&src, &dst, true).unwrap();
        let src2 = Fake::reading(vec![Step::Err(libc::EINVAL)]);
        p.source_ready();
        let err = p.run(&src2, &dst, true).unwrap_err();
        assert!(err.at_source);
        assert_eq!(err.error.raw_os_error(), Some(libc::EINVAL));
        assert!(p.uses_splice());
    }

    #[test]
    fn reset_is_reported() {
        let src = Fake::reading(vec![Step::Err(libc::ECONNRESET)]);
        let mut p = pump(SPLICE);
        let err = p.run(&src, &Fake::default(), true).unwrap_err();
        assert!(err.at_source);
        assert_eq!(err.error.raw_os_error(), Some(libc::ECONNRESET));
    }

    #[test]
    fn drain_only_mode_reads_nothing() {
        let src = Fake::reading(vec![Step::Data(b"late".to_vec())]);
        let dst = Fake::default();
        let mut p = pump(COPY);
        let run = p.run(&src, &dst, false).unwrap();
        assert_eq!(run.read_bytes, 0);
        assert!(dst.written.borrow().is_empty());
    }

    #[test]
    fn a_busy_source_yields_at_the_round_cap() {
        let src = Fake::reading((0..100).map(|_| Step::Data(vec![1; 100])).collect());
        let dst = Fake::default();
        let mut p = pump(SPLICE);
        let run = p.run(&src, &dst, true).unwrap();
        assert!(run.more, "a pump with work left must say so instead of starving the loop");
        assert_eq!(run.written_bytes, PUMP_ROUNDS_MAX * 100);
    }
}
