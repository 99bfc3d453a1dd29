//! The poll window (`--poll-window-us`): after any event the loop keeps polling without sleeping,
//! yielding the CPU before each poll, so that an answer arriving within the window is picked up
//! with no wake-up (docs/DESIGN.md, invariant 14).
//!
//! The yield is cheap while the threads that want this CPU are the relay's peers: they run a few
//! microseconds and block again. A thread that wants the CPU for longer (a guest's vCPU, a build)
//! can turn a yield into a whole scheduler slice, milliseconds during which the relay is runnable
//! but not running. Now and then that is the price of staying awake (a relay that sleeps on a busy
//! CPU may wait as long for its wake-up); on every message it is ruin (with two busy processes on
//! this 2-CPU machine a chain of two relays took 4–8 ms per round trip, twenty times socat's; see
//! docs/BENCHMARKS.md, "The poll window on a busy machine"). So a yield that comes back later than
//! `SLOW_YIELD` (and than two windows: another relay on this CPU may spin through its own window
//! before it yields back) is remembered, and a second one within `SLOW_YIELD_SPAN` suspends the
//! window: no new one opens for a cool-down of `COOL_DOWN_MIN`, doubling up to `COOL_DOWN_MAX`
//! while suspensions follow each other within `COOL_DOWN_MAX`.
//!
//! Many relays on few CPUs (one per VM, all busy) meet a quieter problem: no single yield is slow,
//! but every CPU has a queue, so each window spins on a CPU that a peer (another relay's client,
//! a guest's vCPU) is waiting for, and the answer it waits for is queued behind the spinners
//! (measured with 32 busy relays on 2 CPUs: median session p99 8.5× socat's with the window,
//! 1.0× without; docs/BENCHMARKS.md, "Many instances"). The scheduler tells the relay when that
//! is so: its own run delay, the time it spent runnable but waiting for a CPU, per time it was
//! scheduled in (/proc/thread-self/schedstat, read at most every `RUN_DELAY_SAMPLE` while
//! events come). When a wake-up waits longer for a CPU than a window lasts, the CPUs are
//! crowded and no window opens (`CrowdedCpus`), until a later sample says otherwise.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A yield that ran others for longer than this met a thread that wanted a scheduler slice: shorter
/// than any slice (EEVDF's base slice is 0.75 ms at least), longer than peers answering a message.
pub const SLOW_YIELD: Duration = Duration::from_micros(500);
/// Two slow yields this close together suspend the window: the yields lose more than a few per
/// cent of the relay's time.
pub const SLOW_YIELD_SPAN: Duration = Duration::from_millis(100);
/// The first suspension: a stray pair of slow yields costs the window for this long.
pub const COOL_DOWN_MIN: Duration = Duration::from_millis(10);
/// The longest suspension: on a CPU that stays busy, two slices lost per this long.
pub const COOL_DOWN_MAX: Duration = Duration::from_secs(1);

/// How often, at most, the relay reads its own run delay while events come (none while idle).
pub const RUN_DELAY_SAMPLE: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct PollWindow {
    len: Duration,
    /// A yield longer than this is a slow one.
    slow_yield: Duration,
    /// Poll without sleeping until then.
    until: Option<Instant>,
    /// When the last slow yield (not yet part of a suspension) came back.
    slow_yield_at: Option<Instant>,
    /// The end of the current or last suspension: no new window before then.
    suspended_until: Option<Instant>,
    /// The length of the current or last suspension.
    cool_down: Duration,
    /// The last run-delay sample said the CPUs are crowded: no window opens.
    crowded: bool,
}

impl PollWindow {
    /// A window of `len`; zero turns polling off.
    pub fn new(len: Duration) -> PollWindow {
        PollWindow {
            len,
            slow_yield: SLOW_YIELD.max(len * 2),
            until: None,
            slow_yield_at: None,
            suspended_until: None,
            cool_down: COOL_DOWN_MIN,
            crowded: false,
        }
    }

    /// Whether the window is on at all: run-delay samples are taken only then.
    pub fn is_enabled(&self) -> bool {
        !self.len.is_zero()
    }

    /// A turn brought events: open the window for another `len`, unless suspended or the CPUs
    /// are crowded.
    pub fn on_events(&mut self, now: Instant) {
        if self.len.is_zero() || self.crowded || self.suspended_until.is_some_and(|t| now < t) {
            return;
        }
        self.until = Some(now + self.len);
    }

    /// Since the last sample the relay waited `waited` for a CPU over `runs` times it was
    /// scheduled in. Returns true when that changed whether the CPUs count as crowded.
    pub fn on_run_delay(&mut self, waited: Duration, runs: u64) -> bool {
        // No run at all while waiting: one long wait (a CPU held by others the whole time).
        let crowded = waited > self.len * runs.max(1) as u32;
        let changed = crowded != self.crowded;
        self.crowded = crowded;
        if crowded {
            self.until = None;
        }
        changed
    }

    pub fn is_crowded(&self) -> bool {
        self.crowded
    }

    /// Whether the loop should poll with a zero timeout (and yield first) at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now < t)
    }

    /// A yield inside the window took `took` (measured up to `now`). Returns true when that
    /// suspended the window: the second slow yield within `SLOW_YIELD_SPAN`.
    pub fn after_yield(&mut self, now: Instant, took: Duration) -> bool {
        if took <= self.slow_yield {
            return false;
        }
        let previous = self.slow_yield_at.replace(now);
        if previous.is_none_or(|t| now - t > SLOW_YIELD_SPAN) {
            return false;
        }
        let follows_the_last = self.suspended_until.is_some_and(|end| now - end <= COOL_DOWN_MAX);
        self.cool_down = if follows_the_last { (self.cool_down * 2).min(COOL_DOWN_MAX) } else { COOL_DOWN_MIN };
        self.suspended_until = Some(now + self.cool_down);
        self.slow_yield_at = None;
        self.until = None;
        true
    }
}

/// The relay's own scheduler figures, /proc/thread-self/schedstat: run time, run delay (both
/// ns) and times scheduled in. The file stays open (procfs regenerates it on every read at
/// offset 0), so a sample is one pread.
#[derive(Debug)]
pub struct SchedStat {
    file: File,
    last: Option<(u64, u64)>,
}

impl SchedStat {
    /// None where the kernel keeps no schedstat (CONFIG_SCHED_INFO off): the window then never
    /// counts the CPUs as crowded.
    pub fn open() -> Option<SchedStat> {
        let file = File::open("/proc/thread-self/schedstat").ok()?;
        let mut s = SchedStat { file, last: None };
        s.last = Some(s.read()?);
        Some(s)
    }

    fn read(&self) -> Option<(u64, u64)> {
        let mut buf = [0u8; 96];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let mut f = std::str::from_utf8(&buf[..n]).ok()?.split_whitespace().skip(1).map(|w| w.parse::<u64>().ok());
        Some((f.next()??, f.next()??))
    }

    /// Run delay and runs since the last sample.
    pub fn sample(&mut self) -> Option<(Duration, u64)> {
        let (wait_ns, runs) = self.read()?;
        let (w0, r0) = self.last.replace((wait_ns, runs))?;
        Some((Duration::from_nanos(wait_ns.saturating_sub(w0)), runs.saturating_sub(r0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: Duration = Duration::from_micros(50);
    const US: Duration = Duration::from_micros(1);
    const MS: Duration = Duration::from_millis(1);
    /// A yield that ran a busy thread's whole slice.
    const SLICE: Duration = Duration::from_millis(4);

    #[test]
    fn zero_length_never_opens() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(Duration::ZERO);
        w.on_events(t0);
        assert!(!w.is_open(t0));
    }

    #[test]
    fn events_open_it_for_its_length_and_quick_yields_keep_it() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(LEN);
        w.on_events(t0);
        assert!(w.is_open(t0 + 49 * US));
        assert!(!w.after_yield(t0 + 10 * US, 8 * US));
        // Another relay on this CPU spun through its own window first.
        assert!(!w.after_yield(t0 + 20 * US, 2 * LEN));
        assert!(!w.after_yield(t0 + 30 * US, SLOW_YIELD));
        assert!(!w.after_yield(t0 + 40 * US, SLOW_YIELD));
        assert!(w.is_open(t0 + 40 * US));
        assert!(!w.is_open(t0 + LEN));
        w.on_events(t0 + 40 * US);
        assert!(w.is_open(t0 + 80 * US), "each event extends it");
    }

    #[test]
    fn one_slow_yield_is_tolerated_a_second_soon_after_suspends() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(LEN);
        w.on_events(t0);
        let t1 = t0 + SLICE;
        assert!(!w.after_yield(t1, SLICE));
        w.on_events(t1);
        assert!(w.is_open(t1));
        let t2 = t1 + 50 * MS + SLICE;
        assert!(w.after_yield(t2, SLICE));
        assert!(!w.is_open(t2));
        w.on_events(t2 + 9 * MS);
        assert!(!w.is_open(t2 + 9 * MS), "no window inside the 10 ms suspension");
        w.on_events(t2 + 10 * MS);
        assert!(w.is_open(t2 + 10 * MS));
    }

    #[test]
    fn slow_yields_far_apart_never_suspend() {
        let mut t = Instant::now();
        let mut w = PollWindow::new(LEN);
        for _ in 0..10 {
            w.on_events(t);
            t += SLICE;
            assert!(!w.after_yield(t, SLICE));
            t += SLOW_YIELD_SPAN + MS;
        }
    }

    #[test]
    fn suspensions_in_a_row_double_up_to_the_maximum_then_start_over() {
        let mut t = Instant::now();
        let mut w = PollWindow::new(LEN);
        let mut cool_downs = Vec::new();
        for _ in 0..10 {
            w.on_events(t);
            assert!(w.is_open(t));
            t += SLICE;
            assert!(!w.after_yield(t, SLICE));
            t += SLICE;
            assert!(w.after_yield(t, SLICE));
            // Measure the suspension: the first millisecond at which a window opens again.
            let start = t;
            while {
                w.on_events(t);
                !w.is_open(t)
            } {
                t += MS;
            }
            cool_downs.push((t - start).as_millis());
        }
        assert_eq!(cool_downs, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        // A quiet second after the last one ends: the next suspension is short again.
        t += COOL_DOWN_MAX + MS;
        assert!(!w.after_yield(t, SLICE));
        t += SLICE;
        assert!(w.after_yield(t, SLICE));
        w.on_events(t + 10 * MS);
        assert!(w.is_open(t + 10 * MS));
    }

    /// 32 busy relays on 2 CPUs: each wake-up waited 136 µs for a CPU on average.
    #[test]
    fn crowded_cpus_close_the_window_until_a_sample_says_otherwise() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(LEN);
        w.on_events(t0);
        assert!(!w.on_run_delay(3 * US * 100, 100), "3 µs per run (one relay, idle machine) is not crowded");
        assert!(w.is_open(t0));
        assert!(w.on_run_delay(136 * US * 100, 100));
        assert!(w.is_crowded());
        assert!(!w.is_open(t0), "the open window closes at once");
        w.on_events(t0 + MS);
        assert!(!w.is_open(t0 + MS));
        assert!(!w.on_run_delay(136 * US * 50, 50), "still crowded: nothing changes");
        assert!(w.on_run_delay(LEN * 100, 100), "a wait as long as the window is not crowded");
        w.on_events(t0 + 2 * MS);
        assert!(w.is_open(t0 + 2 * MS));
        assert!(w.on_run_delay(2 * LEN, 0), "waiting without ever running counts as one long wait");
    }

    #[test]
    fn its_own_schedstat_reads_and_counts_up() {
        let mut s = SchedStat::open().expect("/proc/thread-self/schedstat: the kernel keeps schedstat");
        std::thread::sleep(Duration::from_millis(2));
        let (_, runs) = s.sample().expect("a second sample");
        assert!(runs >= 1, "sleeping and waking again is a run: {runs}");
    }

    #[test]
    fn a_long_window_needs_a_longer_yield_to_be_slow() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(MS);
        w.on_events(t0);
        assert!(!w.after_yield(t0 + 2 * MS, 2 * MS));
        assert!(!w.after_yield(t0 + 4 * MS, 2 * MS));
        assert!(!w.after_yield(t0 + 7 * MS, 3 * MS));
        assert!(w.after_yield(t0 + 10 * MS, 3 * MS));
    }
}
