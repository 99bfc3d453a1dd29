//! Out of fds, a peer waits in the listener's backlog rather than being accepted and dropped.
//!
//! The relay holds `SESSION_FDS` spare descriptors (opened on /dev/null) whenever it is not in
//! the middle of taking a peer. Before each accept it lets them go, so the accept and the dial
//! behind it always find their fds; afterwards it takes them back. When it cannot take them all
//! back, the process is out of fds: the next peer stays in the backlog (its connect has
//! succeeded, it just waits) until a session closes or the pause runs out and the spares can be
//! taken again. A session's pipes come later and are not reserved: without an fd for one, that
//! direction keeps copying (`Pump::copy_for_good`).
//!
//! `Starvation` is what the log says about it: one line when the relay runs out, one when
//! every waiting peer has been taken (how long it lasted, how many peers waited).

use std::fs::File;
use std::time::{Duration, Instant};

/// What one admitted peer needs before its session can run: its own socket and the dial.
pub const SESSION_FDS: usize = 2;

/// Spare descriptors held for the next peer.
pub struct FdReserve {
    spares: Vec<File>,
}

impl FdReserve {
    /// Holds as many spares as it can get now; the first accept tries again for the rest.
    pub fn new() -> FdReserve {
        let mut r = FdReserve { spares: Vec::with_capacity(SESSION_FDS) };
        r.refill();
        r
    }

    /// Takes the spares back; false while the process has fewer than `SESSION_FDS` fds free.
    pub fn refill(&mut self) -> bool {
        while self.spares.len() < SESSION_FDS {
            match File::open("/dev/null") {
                Ok(f) => self.spares.push(f),
                Err(_) => return false,
            }
        }
        true
    }

    /// Lets the spares go, for the accept and the dial that follow.
    pub fn release(&mut self) {
        self.spares.clear();
    }
}

/// An episode of running out of fds, from the first peer left waiting to the last one taken.
#[derive(Debug, Clone, Copy)]
pub struct Starvation {
    pub since: Instant,
    /// Peers taken from the backlog during the episode, each once fds came back.
    pub waited: u64,
}

impl Starvation {
    pub fn new(now: Instant) -> Starvation {
        Starvation { since: now, waited: 0 }
    }

    pub fn lasted(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_holds_its_spares_and_gives_them_back() {
        let mut r = FdReserve::new();
        assert_eq!(r.spares.len(), SESSION_FDS);
        r.release();
        assert!(r.spares.is_empty());
        assert!(r.refill());
        assert_eq!(r.spares.len(), SESSION_FDS);
    }
}
