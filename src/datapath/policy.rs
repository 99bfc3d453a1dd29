//! When a direction copies and when it splices, and when its store grows: a pure function of
//! what the reads saw. No system calls; the pump carries out what it decides.
//!
//! - Splice and copy strategies never change the kind of their store; a read that took all the
//!   room it was offered grows it (up to its ceiling).
//! - Copy-then-splice copies messages. The first read that fills the copy buffer is bulk: no more
//!   reads until the buffer drains, then a pipe replaces it. `SHORT_SPLICES_TO_COPY` splices in
//!   a row, each shorter than the copy buffer and than the room it was offered, are messages
//!   again: at the next empty pipe a copy buffer replaces it. A store changes kind only when
//!   empty, so nothing overtakes what the other kind still holds (docs/DESIGN.md, "Messages
//!   copy, bulk splices").
//! - A copy read that got less than the room it offered has emptied a stream socket's queue
//!   (recv copies across every queued segment until the buffer is full): the next byte raises a
//!   new edge, so the pump spares the read that would say `WouldBlock`. Not once the source
//!   reported read-closed (the event carrying the FIN may be the one being handled), and never
//!   for a splice (a short splice may be a pipe out of slots).

/// Copy-then-splice: splice reads in a row, each shorter than the copy buffer and than the room
/// it was offered, after which the direction goes back to copies (when its pipe is next empty).
/// Sixteen message-sized reads are messages again; a bulk stream whose reads come in that small
/// gains nothing from splice.
pub const SHORT_SPLICES_TO_COPY: u32 = 16;

/// What a copy-then-splice direction is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Copying messages through the copy buffer.
    Messages,
    /// A read filled the copy buffer: it drains by copies and nothing is read; then a pipe.
    ToSplice,
    /// Splicing; `short` message-sized splices in a row so far.
    Bulk { short: u32 },
}

/// A copy-then-splice direction's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The copy buffer messages go through.
    pub copy_bytes: usize,
    /// What a new pipe asks for.
    pub pipe_bytes: usize,
    /// `--copy-buffer-max`: the ceiling once the direction copies for good.
    pub copy_max_bytes: usize,
}

/// A direction's place in the copy↔splice policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The store keeps its kind: `--move splice` or `copy`, or a copy-then-splice direction left
    /// without a pipe.
    Fixed,
    /// Copy-then-splice.
    Adaptive { sizes: Sizes, leg: Leg },
}

/// One successful, non-empty read, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub bytes: usize,
    /// It took all the room it was offered.
    pub filled: bool,
    /// It went into a pipe (splice), not a buffer.
    pub spliced: bool,
    /// The source has reported read-closed: read on until EOF whatever the sizes.
    pub source_closing: bool,
}

/// What the pump does after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read again while the source stays ready.
    ReadOn,
    /// The read took all the room: double the store (up to its ceiling) and read on.
    Grow,
    /// The socket's queue is empty: no read until the next readiness event.
    AwaitEdge,
    /// Read nothing until the store is empty; then `on_drained` says what replaces it.
    Drain,
}

/// What replaces an empty store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// A pipe of about `pipe_bytes` replaces the copy buffer.
    ToPipe { pipe_bytes: usize },
    /// A copy buffer of `copy_bytes` replaces the pipe.
    ToBuffer { copy_bytes: usize },
}

impl Policy {
    /// Whether the direction may read now (it may not while a full copy buffer waits to drain).
    pub fn may_read(&self) -> bool {
        !matches!(self, Policy::Adaptive { leg: Leg::ToSplice, .. })
    }

    /// Takes in one read and says what follows it.
    pub fn on_read(&mut self, read: Read) -> Action {
        if let Policy::Adaptive { sizes, leg } = self {
            match leg {
                Leg::Messages if read.filled => {
                    *leg = Leg::ToSplice;
                    return Action::Drain;
                }
                // A read that filled the pipe's room is bulk whatever its size (a pipe the kernel
                // kept small takes little at a time).
                Leg::Bulk { short } => {
                    *short = if read.bytes < sizes.copy_bytes && !read.filled { *short + 1 } else { 0 };
                }
                Leg::Messages | Leg::ToSplice => {}
            }
        }
        if read.filled {
            Action::Grow
        } else if !read.spliced && !read.source_closing {
            Action::AwaitEdge
        } else {
            Action::ReadOn
        }
    }

    /// The store just became empty: what replaces it, if anything. The leg moves on as if the
    /// switch was made; `without_pipe` is for when it could not be.
    pub fn on_drained(&mut self) -> Option<Switch> {
        let Policy::Adaptive { sizes, leg } = self else { return None };
        match *leg {
            Leg::ToSplice => {
                *leg = Leg::Bulk { short: 0 };
                Some(Switch::ToPipe { pipe_bytes: sizes.pipe_bytes })
            }
            Leg::Bulk { short } if short >= SHORT_SPLICES_TO_COPY => {
                *leg = Leg::Messages;
                Some(Switch::ToBuffer { copy_bytes: sizes.copy_bytes })
            }
            Leg::Messages | Leg::Bulk { .. } => None,
        }
    }

    /// No pipe to be had, or splice refused: the direction copies for good. Returns the copy
    /// buffer's ceiling from now on when it changes (`--copy-buffer-max`, for a direction that
    /// was copy-then-splice).
    pub fn without_pipe(&mut self) -> Option<usize> {
        let ceiling = match self {
            Policy::Adaptive { sizes, .. } => Some(sizes.copy_max_bytes),
            Policy::Fixed => None,
        };
        *self = Policy::Fixed;
        ceiling
    }
}

#[cfg(test)]
mod tests {
    //! The policy alone: reads in, actions out; no sockets, no fakes.

    use super::*;

    const COPY_BYTES: usize = 1024;
    const SIZES: Sizes = Sizes { copy_bytes: COPY_BYTES, pipe_bytes: 65536, copy_max_bytes: 8192 };

    fn adaptive() -> Policy {
        Policy::Adaptive { sizes: SIZES, leg: Leg::Messages }
    }

    fn bulk(short: u32) -> Policy {
        Policy::Adaptive { sizes: SIZES, leg: Leg::Bulk { short } }
    }

    fn copied(bytes: usize, filled: bool) -> Read {
        Read { bytes, filled, spliced: false, source_closing: false }
    }

    fn spliced(bytes: usize, filled: bool) -> Read {
        Read { bytes, filled, spliced: true, source_closing: false }
    }

    #[test]
    fn a_fixed_store_grows_on_a_full_read_and_waits_for_an_edge_after_a_short_copy() {
        let mut p = Policy::Fixed;
        assert_eq!(p.on_read(copied(4096, true)), Action::Grow);
        assert_eq!(p.on_read(copied(100, false)), Action::AwaitEdge);
        assert_eq!(p.on_read(Read { source_closing: true, ..copied(100, false) }), Action::ReadOn);
        assert_eq!(p.on_read(spliced(100, false)), Action::ReadOn, "a short splice proves nothing");
        assert_eq!(p.on_read(spliced(4096, true)), Action::Grow);
        assert_eq!(p.on_drained(), None);
        assert!(p.may_read());
    }

    #[test]
    fn messages_copy_and_the_first_full_buffer_drains_then_splices() {
        let mut p = adaptive();
        for _ in 0..100 {
            assert_eq!(p.on_read(copied(552, false)), Action::AwaitEdge);
            assert_eq!(p.on_drained(), None, "messages never switch");
        }
        assert_eq!(p.on_read(copied(COPY_BYTES, true)), Action::Drain);
        assert!(!p.may_read(), "nothing is read while the full buffer drains");
        assert_eq!(p.on_drained(), Some(Switch::ToPipe { pipe_bytes: 65536 }));
        assert_eq!(p, bulk(0));
        assert!(p.may_read());
    }

    #[test]
    fn message_sized_splices_in_a_row_go_back_to_copies_at_the_next_empty_pipe() {
        let mut p = bulk(0);
        for i in 1..SHORT_SPLICES_TO_COPY {
            assert_eq!(p.on_read(spliced(100, false)), Action::ReadOn);
            assert_eq!(p.on_drained(), None, "after {i} short splices");
        }
        assert_eq!(p.on_read(spliced(100, false)), Action::ReadOn);
        assert_eq!(p.on_drained(), Some(Switch::ToBuffer { copy_bytes: COPY_BYTES }));
        assert_eq!(p, adaptive());
    }

    #[test]
    fn a_bulk_read_resets_the_count_of_short_splices() {
        let mut p = bulk(0);
        for _ in 1..SHORT_SPLICES_TO_COPY {
            p.on_read(spliced(100, false));
        }
        // As big as the copy buffer, or all the room a small pipe offered: bulk.
        assert_eq!(p.on_read(spliced(COPY_BYTES, false)), Action::ReadOn);
        assert_eq!(p, bulk(0));
        for _ in 1..SHORT_SPLICES_TO_COPY {
            p.on_read(spliced(100, false));
        }
        assert_eq!(p.on_read(spliced(300, true)), Action::Grow);
        assert_eq!(p, bulk(0));
        assert_eq!(p.on_drained(), None);
    }

    #[test]
    fn a_direction_without_a_pipe_is_fixed_for_good() {
        let mut p = adaptive();
        assert_eq!(p.on_read(copied(COPY_BYTES, true)), Action::Drain);
        assert_eq!(p.without_pipe(), Some(8192), "the copy ceiling from now on");
        assert_eq!(p, Policy::Fixed);
        assert_eq!(p.without_pipe(), None);
        assert!(p.may_read());
        assert_eq!(p.on_read(copied(COPY_BYTES, true)), Action::Grow, "its buffer grows like a copy strategy's");
    }
}
