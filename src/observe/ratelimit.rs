//! At most one log line per interval for one kind of event (`RateLimit`): a flood of refused
//! peers or control clients writes a line a second, not a line per peer, and each line says
//! how many it left out since the last (`suppressed`). Every event is still counted by its
//! caller; only the lines are limited.
//!
//! Invariant: pure state; time comes from the caller, so tests inject `Instant`s.

use std::time::{Duration, Instant};

/// At most one log line per `every` for one kind of event; the ones in between are only
/// counted, and the next line that may go out carries how many were left out since the last.
/// The state is the type's own; time comes from the caller (tests inject `Instant`s).
#[derive(Debug, Clone)]
pub struct RateLimit {
    every: Duration,
    /// No line before then (None: one may go out now).
    quiet_until: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit { every, quiet_until: None, suppressed: 0 }
    }

    /// One more event at `now`: Some(left out since the last line) when this one is to be
    /// logged, None when it is only counted.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.quiet_until {
            Some(t) if now < t => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.quiet_until = Some(now + self.every);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Events left out since the last line.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut r = RateLimit::new(Duration::from_secs(1));
        assert_eq!(r.hit(t0), Some(0), "the first one is logged");
        assert_eq!(r.hit(ms(1)), None);
        assert_eq!(r.hit(ms(999)), None);
        assert_eq!(r.suppressed(), 2);
        assert_eq!(r.hit(ms(1000)), Some(2), "a second later: logged, with the two left out");
        assert_eq!(r.suppressed(), 0);
        assert_eq!(r.hit(ms(1500)), None);
        // A long silence: the next one goes out at once and says one was left out.
        assert_eq!(r.hit(ms(60_000)), Some(1));
        assert_eq!(r.hit(ms(60_000)), None);
        // 25,000 events in 5 s: five lines.
        let mut r = RateLimit::new(Duration::from_secs(1));
        let lines: Vec<u64> = (0..25_000u64).filter_map(|i| r.hit(ms(i / 5))).collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines.iter().sum::<u64>() + r.suppressed() + lines.len() as u64, 25_000);
    }
}
