//! Where bytes move: one pump, used for both directions of a connection.
//!
//! A pump owns the bytes in flight for one direction: a kernel pipe (splice strategy) or a
//! user-space buffer (copy strategy). It reads from its source while it has room and writes to
//! its destination while it holds data. Either store starts small and doubles, up to its
//! ceiling, each time a read fills all the room it was offered: message traffic keeps the small
//! store, bulk earns big reads and big writes (docs/DESIGN.md, "Stores that grow"). A
//! copy-then-splice direction copies messages and moves to a pipe at the first read that fills
//! its buffer (docs/DESIGN.md, "Messages copy, bulk splices"). It never touches the poller: the
//! caller tells it which of its sockets became ready and reads back what it wants next.
//!
//! Invariants (relied on by `conn.rs` and the event loop):
//! - Edge-triggered: a readiness flag is cleared by `WouldBlock`, so the pump drains until the
//!   kernel says there is nothing more; a spurious event costs one `WouldBlock`. One exception
//!   saves the read that would say it: a copy read that got less than the room it offered has
//!   emptied a stream socket's queue (recv copies across every queued segment until the buffer
//!   is full), and the next byte to arrive raises a new edge. Unless the source has reported
//!   read-closed: then the pump reads on until EOF, because the event carrying the FIN may be
//!   the one already being handled. A short splice proves nothing (the pipe may have run out
//!   of slots), so splice keeps the `WouldBlock` read.
//! - Bytes leave in the order they came, each exactly once: `fill` counts what was taken from
//!   the source and not yet written, and the only way bytes leave the store is to the
//!   destination (or, on fallback, from the pipe into the copy buffer, before anything else).
//! - Fallback from splice to copy happens only when splice is refused (EINVAL, EOPNOTSUPP)
//!   before any byte has moved that way: EINVAL can also mean a real fault later on.
//! - Copy to splice and back (copy-then-splice only): the read that fills the copy buffer stops
//!   further reads; the pipe replaces the buffer once every byte in it reached the destination,
//!   so the pipe starts empty and nothing overtakes what was copied. The way back happens only
//!   on an empty pipe, for the same reason.
//! - Half-close: EOF from the source becomes `shutdown(SHUT_WR)` on the destination once the
//!   store is empty; the other direction's pump keeps running.
//! - Backpressure is per direction: a full store stops reads from this source only.
//! - A store that still holds bytes is dropped with its connection, never reused.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use hdrhistogram::Histogram;
use tracing::{debug, info, warn};

use crate::observe::metrics;
use crate::sys::{self, Pipe};

/// Most read+write rounds one `run` makes before yielding to other connections and the other
/// direction; the caller runs the pump again on its next loop turn when `Run::more` is set.
const PUMP_ROUNDS_MAX: usize = 16;

/// Copy-then-splice: splice reads in a row, each shorter than the copy buffer and than the room
/// it was offered, after which the direction goes back to copies (when its pipe is next empty).
/// Sixteen message-sized reads are messages again; a bulk stream whose reads come in that small
/// gains nothing from splice.
const SHORT_SPLICES_TO_COPY: u32 = 16;

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
    /// to `pipe_max_bytes`; `SHORT_SPLICES_TO_COPY` message-sized splices in a row move it back.
    /// A direction left without a pipe copies for good, its buffer growing up to `copy_max_bytes`.
    CopyThenSplice { copy_bytes: usize, pipe_bytes: usize, pipe_max_bytes: usize, copy_max_bytes: usize },
}

/// What a pump needs from a socket. Implemented by `socket2::Socket`, and by fakes in tests.
pub trait Side {
    /// splice(2) from this socket into `pipe` (its write end).
    fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize>;
    /// splice(2) from `pipe` (its read end) into this socket.
    fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends without raising SIGPIPE.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Side for socket2::Socket {
    fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(self.as_fd(), pipe, len)
    }
    fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(pipe, self.as_fd(), len)
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*self, buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.send_with_flags(buf, libc::MSG_NOSIGNAL)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        match self.shutdown(std::net::Shutdown::Write) {
            // The peer is already gone; the half-close has nowhere to go and nothing to lose.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            other => other,
        }
    }
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

enum Store {
    Pipe(Pipe),
    /// `buf[start..start + fill]` holds the bytes in flight; `buf.len()` is the capacity.
    Copy {
        buf: Vec<u8>,
        start: usize,
    },
}

pub struct Pump {
    store: Store,
    capacity_bytes: usize,
    /// Ceiling for the store's growth (a copy buffer a refused splice falls back to keeps the
    /// pipe's); lowered to the capacity when the kernel refuses to grow a pipe.
    max_bytes: usize,
    /// Bytes taken from the source and not yet written to the destination.
    fill: usize,
    /// The source may have bytes (or EOF) to read: set by events, cleared by WouldBlock.
    pub src_readable: bool,
    /// The destination may take bytes: set by events, cleared by WouldBlock.
    pub dst_writable: bool,
    /// The source reported read-closed (peer's FIN or hang-up): from then on read until EOF.
    pub src_read_closed: bool,
    /// A splice into the pipe said WouldBlock while the pipe held bytes: the pipe may be out of
    /// slots rather than the socket out of data, so read again once the pipe is drained.
    recheck_src_after_drain: bool,
    src_eof: bool,
    dst_shut: bool,
    /// A byte has been spliced in this direction: from then on EINVAL is a fault, not a
    /// refusal of splice. Separate from `stats`, which an operator may reset.
    spliced_any: bool,
    /// Copy-then-splice's sizes and counter; None for the other strategies, and once splice was
    /// refused or no pipe could be made (the direction then copies for good).
    adaptive: Option<Adaptive>,
    /// A read filled the copy buffer: no more reads until it drains, then the pipe replaces it.
    switch_when_drained: bool,
    /// Name of the direction for the one log line a fallback writes.
    direction: &'static str,
    pub stats: DirStats,
    /// Bytes per successful read from the source.
    pub chunk_bytes: Histogram<u64>,
}

/// A copy-then-splice direction's sizes, and what it has seen since it last moved.
struct Adaptive {
    copy_bytes: usize,
    pipe_bytes: usize,
    /// `--copy-buffer-max`: the ceiling once the direction copies for good.
    copy_max_bytes: usize,
    /// Splice reads in a row shorter than `copy_bytes` and than the pipe's room.
    short_splices: u32,
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
        let (store, capacity_bytes, max_bytes) = match strategy {
            Strategy::Splice { pipe_bytes, max_bytes } => {
                let (pipe, cap) = Pipe::new(pipe_bytes)?;
                (Store::Pipe(pipe), cap, max_bytes)
            }
            Strategy::Copy { initial_bytes, max_bytes } => {
                (Store::Copy { buf: vec![0; initial_bytes], start: 0 }, initial_bytes, max_bytes)
            }
            Strategy::CopyThenSplice { copy_bytes, pipe_max_bytes, .. } => {
                (Store::Copy { buf: vec![0; copy_bytes], start: 0 }, copy_bytes, pipe_max_bytes)
            }
        };
        Ok(Pump {
            store,
            capacity_bytes,
            max_bytes,
            fill: 0,
            src_readable: true,
            dst_writable: true,
            src_read_closed: false,
            recheck_src_after_drain: false,
            src_eof: false,
            dst_shut: false,
            spliced_any: false,
            adaptive: match strategy {
                Strategy::CopyThenSplice { copy_bytes, pipe_bytes, copy_max_bytes, .. } => {
                    Some(Adaptive { copy_bytes, pipe_bytes, copy_max_bytes, short_splices: 0 })
                }
                _ => None,
            },
            switch_when_drained: false,
            direction,
            stats: DirStats::default(),
            chunk_bytes: metrics::chunk_histogram(),
        })
    }

    /// Bytes in flight.
    pub fn fill(&self) -> usize {
        self.fill
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Zeroes the counters (`stats reset`); the data path's own state is untouched.
    pub fn reset_stats(&mut self) {
        self.stats = DirStats::default();
        self.chunk_bytes.reset();
    }

    pub fn uses_splice(&self) -> bool {
        matches!(self.store, Store::Pipe(_))
    }

    /// The source said EOF and everything before it reached the destination, which was shut.
    pub fn finished(&self) -> bool {
        self.dst_shut
    }

    /// The source has said EOF.
    pub fn src_eof(&self) -> bool {
        self.src_eof
    }

    /// Waiting for the destination to take bytes: the caller should ask for write readiness.
    pub fn blocked_on_dst(&self) -> bool {
        self.fill > 0 && !self.dst_writable
    }

    /// Moves bytes until both sides would block, the store is full and the destination blocks,
    /// or the round cap is hit. `may_read` false means drain only (shutdown in progress).
    /// An error is fatal for the connection (reset, broken pipe, ...).
    pub fn run(&mut self, src: &impl Side, dst: &impl Side, may_read: bool) -> Result<Run, PumpError> {
        let mut run = Run::default();
        let was_empty = self.fill == 0;
        for _ in 0..PUMP_ROUNDS_MAX {
            let mut progressed = false;

            if may_read
                && !self.src_eof
                && self.src_readable
                && self.fill < self.capacity_bytes
                && !self.switch_when_drained
            {
                match self.read_from(src) {
                    Ok((0, _)) => {
                        self.src_eof = true;
                        progressed = true;
                    }
                    Ok((n, filled)) => {
                        let splicing = self.uses_splice();
                        if let Some(a) = self.adaptive.as_mut().filter(|_| splicing) {
                            // A read that filled the pipe's room is bulk whatever its size (a
                            // pipe the kernel kept small takes little at a time).
                            a.short_splices = if n < a.copy_bytes && !filled { a.short_splices + 1 } else { 0 };
                        }
                        if filled && self.adaptive.is_some() && !splicing {
                            // Bulk: the buffer drains by copies, then the pipe takes over.
                            self.switch_when_drained = true;
                        } else if filled {
                            self.grow_store();
                        } else if !splicing && !self.src_read_closed {
                            // Less than offered: the socket's queue is empty (module docs).
                            self.src_readable = false;
                        }
                        self.fill += n;
                        run.read_bytes += n;
                        self.stats.chunks += 1;
                        self.chunk_bytes.saturating_record(n as u64);
                        self.stats.high_water_bytes = self.stats.high_water_bytes.max(self.fill);
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.src_readable = false;
                        if self.fill > 0 && self.uses_splice() {
                            self.recheck_src_after_drain = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) if splice_refused(&e) && self.uses_splice() && !self.spliced_any && self.fill == 0 => {
                        self.fall_back_to_copy(&e).map_err(PumpError::src)?;
                        progressed = true;
                    }
                    Err(e) => return Err(PumpError::src(e)),
                }
            }

            if self.fill > 0 && self.dst_writable {
                let began = Instant::now();
                match self.write_to(dst) {
                    // Nothing taken of a non-empty offer is no progress, and not WouldBlock
                    // either: counted as progress it would spin until the round cap, every turn.
                    Ok(0) => {
                        return Err(PumpError::dst(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!("the destination took 0 of {} bytes without blocking", self.fill),
                        )));
                    }
                    Ok(n) => {
                        self.fill -= n;
                        if self.fill == 0 {
                            run.last_write_began = Some(began);
                        }
                        run.written_bytes += n;
                        self.stats.bytes += n as u64;
                        if self.uses_splice() {
                            self.spliced_any |= n > 0;
                            self.stats.splice_bytes += n as u64;
                        } else {
                            self.stats.copy_bytes += n as u64;
                        }
                        if self.fill == 0 && self.recheck_src_after_drain {
                            self.recheck_src_after_drain = false;
                            self.src_readable = true;
                        }
                        if self.fill == 0 && self.switch_when_drained {
                            self.switch_to_splice();
                        } else if self.fill == 0
                            && self.uses_splice()
                            && self.adaptive.as_ref().is_some_and(|a| a.short_splices >= SHORT_SPLICES_TO_COPY)
                        {
                            self.switch_to_copy();
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dst_writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) if splice_refused(&e) && self.uses_splice() && !self.spliced_any => {
                        self.fall_back_to_copy(&e).map_err(PumpError::dst)?;
                        progressed = true;
                    }
                    Err(e) => return Err(PumpError::dst(e)),
                }
            }

            if self.src_eof && self.fill == 0 && !self.dst_shut {
                dst.shutdown_write().map_err(PumpError::dst)?;
                self.dst_shut = true;
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
        run.emptied = self.fill == 0 && run.written_bytes > 0;
        run
    }

    /// Reads what fits; also says whether the read took all the room it was offered.
    fn read_from(&mut self, src: &impl Side) -> io::Result<(usize, bool)> {
        let room = self.capacity_bytes - self.fill;
        match &mut self.store {
            Store::Pipe(pipe) => src.splice_to_pipe(pipe.write.as_fd(), room).map(|n| (n, n == room)),
            Store::Copy { buf, start } => {
                if *start + self.fill == buf.len() {
                    buf.copy_within(*start..*start + self.fill, 0);
                    *start = 0;
                }
                let end = *start + self.fill;
                let offered = buf.len() - end;
                src.recv(&mut buf[end..]).map(|n| (n, n == offered))
            }
        }
    }

    /// A read filled the store: double it, up to its ceiling. It never shrinks; it goes with
    /// the connection. Bytes in a pipe stay where they are; a copy buffer's move to the start
    /// of the new one. A pipe the kernel refuses to grow (over fs.pipe-max-size unprivileged, or
    /// over fs.pipe-user-pages-soft, which is counted per user, and every relay under the
    /// systemd unit runs as one user) keeps working at its size.
    fn grow_store(&mut self) {
        if self.capacity_bytes >= self.max_bytes {
            return;
        }
        let wanted = (self.capacity_bytes * 2).min(self.max_bytes);
        match &mut self.store {
            Store::Pipe(pipe) => match pipe.grow(wanted) {
                Ok(cap) => self.capacity_bytes = cap,
                Err(e) => {
                    // Once per direction (the ceiling drops to the capacity): an operator should
                    // know when the per-user pipe budget, shared by every relay of the unit's
                    // user, is spent.
                    info!(
                        direction = self.direction,
                        wanted,
                        error = %e,
                        "pipe not grown: the kernel refused (over fs.pipe-max-size, or the user's \
                         fs.pipe-user-pages-soft budget is spent); it stays at {} bytes",
                        self.capacity_bytes
                    );
                    self.max_bytes = self.capacity_bytes;
                }
            },
            Store::Copy { buf, start } => {
                // Zeroed allocations this size come straight from the kernel's zero pages: the
                // memory becomes resident only as reads fill it.
                let mut bigger = vec![0u8; wanted];
                // The caller adds the bytes just read to `fill` after this: carry them too.
                let held = buf.len() - *start;
                bigger[..held].copy_from_slice(&buf[*start..]);
                *buf = bigger;
                *start = 0;
                self.capacity_bytes = wanted;
            }
        }
    }

    /// Copy-then-splice, at the first drain after a read filled the copy buffer: a pipe replaces
    /// it (the buffer is empty, so no byte is in flight). A pipe the kernel will not give (out
    /// of file descriptors) leaves the direction copying for good, its buffer free to grow as a
    /// copy strategy's would (up to `--copy-buffer-max`).
    fn switch_to_splice(&mut self) {
        self.switch_when_drained = false;
        let Some(a) = self.adaptive.as_mut() else { return };
        match Pipe::new(a.pipe_bytes) {
            Ok((pipe, cap)) => {
                debug!(direction = self.direction, pipe_bytes = cap, "a read filled the copy buffer: splicing");
                a.short_splices = 0;
                self.store = Store::Pipe(pipe);
                self.capacity_bytes = cap;
            }
            // The buffer stays; the next read that fills it grows it.
            Err(e) => self.copy_for_good(&e),
        }
    }

    /// No pipe to be had: this direction copies from now on, with the copy buffer's ceiling.
    fn copy_for_good(&mut self, why: &io::Error) {
        warn!(direction = self.direction, error = %why, "no pipe for splicing; this direction copies from now on");
        if let Some(a) = self.adaptive.take() {
            self.max_bytes = a.copy_max_bytes;
        }
    }

    /// Copy-then-splice, on an empty pipe after `SHORT_SPLICES_TO_COPY` message-sized splices:
    /// back to a copy buffer (nothing is in flight), the pipe and its pages given back.
    fn switch_to_copy(&mut self) {
        let Some(a) = self.adaptive.as_mut() else { return };
        debug!(direction = self.direction, "message-sized reads again: copying");
        a.short_splices = 0;
        self.store = Store::Copy { buf: vec![0; a.copy_bytes], start: 0 };
        self.capacity_bytes = a.copy_bytes;
    }

    fn write_to(&mut self, dst: &impl Side) -> io::Result<usize> {
        match &mut self.store {
            Store::Pipe(pipe) => dst.splice_from_pipe(pipe.read.as_fd(), self.fill),
            Store::Copy { buf, start } => {
                let n = dst.send(&buf[*start..*start + self.fill])?;
                *start = if n == self.fill { 0 } else { *start + n };
                Ok(n)
            }
        }
    }

    /// Switches this direction to copies, carrying over whatever the pipe already holds so that
    /// no byte is lost or reordered.
    fn fall_back_to_copy(&mut self, why: &io::Error) -> io::Result<()> {
        let Store::Pipe(pipe) = &self.store else { return Ok(()) };
        let mut buf = vec![0u8; self.capacity_bytes];
        let mut carried = 0;
        while carried < self.fill {
            match sys::read(pipe.read.as_fd(), &mut buf[carried..self.fill])? {
                0 => break,
                n => carried += n,
            }
        }
        if carried != self.fill {
            warn!(
                direction = self.direction,
                carried,
                fill = self.fill,
                "probable bug: pipe held fewer bytes than counted"
            );
            return Err(io::Error::other("pipe held fewer bytes than counted"));
        }
        info!(direction = self.direction, error = %why, "splice refused; this direction copies from now on");
        self.store = Store::Copy { buf, start: 0 };
        self.adaptive = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The pump against a fake socket that plays back scripted answers.

    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

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
            p.src_read_closed = true;
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
            p.dst_writable = true;
            p.src_readable = true;
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
            p.dst_writable = true;
            p.src_readable = true;
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
            p.dst_writable = true;
            p.src_readable = true;
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
            p.src_readable = true;
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
            p.src_readable = true;
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
        assert!(!p.src_readable, "waits for the next edge");
        assert_eq!(src.reads.borrow().len(), 2, "no read after the short one");
        // The next edge: the rest arrives.
        p.src_readable = true;
        p.run(&src, &dst, true).unwrap();
        assert_eq!(dst.written.borrow().len(), 200);

        // Read-closed reported: read on until EOF or WouldBlock, whatever the sizes.
        let (src, dst) = (Fake::reading(script()), Fake::default());
        let mut p = pump(COPY);
        p.src_read_closed = true;
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
            p.dst_writable = true;
            p.src_readable = true;
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
            p.src_readable = true;
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
        assert!(p.src_readable, "the unread bytes' readiness is kept for after the switch");
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
            p.src_readable = true;
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
        p.src_readable = true;
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
        p.src_readable = true;
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
