//! Latency figures kept per connection and direction (definitions in docs/DESIGN.md).
//!
//! - transit: from the readiness event that made bytes readable to the moment the store
//!   (pipe or buffer) was empty again with all of them written: the relay's own cost.
//! - turnaround: from the moment one direction finished forwarding to the first byte arriving
//!   in the other: the far side's response time as the relay sees it. Recorded under the
//!   direction whose bytes answer (c2l = the connect side's turnaround).
//! - chunk sizes (kept by the pump): bytes per successful read from the source.
//!
//! Histograms have a fixed range and precision, so a connection's memory stays bounded no
//! matter how long it lives: values are nanoseconds from 1 ns to 10 minutes (larger values are
//! clamped to the top), two significant digits (1 % resolution), ~35 KiB per time histogram.

use hdrhistogram::Histogram;

/// Time histograms: 1 ns ..= 10 min.
pub const TIME_HIGH_NS: u64 = 600_000_000_000;
/// Chunk sizes: 1 B ..= 16 MiB.
pub const CHUNK_HIGH_BYTES: u64 = 16 << 20;
/// Significant digits kept.
pub const HIST_SIGFIG: u8 = 2;

pub fn time_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, TIME_HIGH_NS, HIST_SIGFIG).expect("static bounds are valid")
}

pub fn chunk_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, CHUNK_HIGH_BYTES, HIST_SIGFIG).expect("static bounds are valid")
}

/// One direction's figures.
#[derive(Debug, Clone)]
pub struct DirMetrics {
    pub transit_ns: Histogram<u64>,
    pub turnaround_ns: Histogram<u64>,
    /// The same samples again, since the last interval-log tick (only with `--hist-log`).
    pub interval: Option<Figures>,
}

/// A pair of time histograms: one per figure.
#[derive(Debug, Clone)]
pub struct Figures {
    pub transit_ns: Histogram<u64>,
    pub turnaround_ns: Histogram<u64>,
}

impl Default for Figures {
    fn default() -> Self {
        Figures { transit_ns: time_histogram(), turnaround_ns: time_histogram() }
    }
}

impl Figures {
    /// Adds `other`'s samples (same bounds by construction, so this cannot fail).
    pub fn add(&mut self, transit: &Histogram<u64>, turnaround: &Histogram<u64>) {
        let _ = self.transit_ns.add(transit);
        let _ = self.turnaround_ns.add(turnaround);
    }

    pub fn reset(&mut self) {
        self.transit_ns.reset();
        self.turnaround_ns.reset();
    }
}

impl DirMetrics {
    pub fn new(with_interval: bool) -> DirMetrics {
        DirMetrics {
            transit_ns: time_histogram(),
            turnaround_ns: time_histogram(),
            interval: with_interval.then(Figures::default),
        }
    }

    pub fn record_transit(&mut self, ns: u64) {
        self.transit_ns.saturating_record(ns);
        if let Some(i) = &mut self.interval {
            i.transit_ns.saturating_record(ns);
        }
    }

    pub fn record_turnaround(&mut self, ns: u64) {
        self.turnaround_ns.saturating_record(ns);
        if let Some(i) = &mut self.interval {
            i.turnaround_ns.saturating_record(ns);
        }
    }

    /// Zeroes the cumulative figures (`stats reset`); the interval ones belong to the log.
    pub fn reset(&mut self) {
        self.transit_ns.reset();
        self.turnaround_ns.reset();
    }
}

/// `p50/p90/p99/p99.9/max` in microseconds, for log lines.
pub fn percentiles_us(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    let us = |v: u64| v as f64 / 1000.0;
    format!(
        "{:.1}/{:.1}/{:.1}/{:.1}/{:.1}",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.9)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// What timestamping adds per forwarded chunk: one clock read before the write, one after
    /// the store empties, and two histogram records (four with --hist-log). Printed for the docs
    /// (`cargo test --release --lib timestamp_cost -- --nocapture`); the bound only catches a
    /// regression by an order of magnitude.
    #[test]
    fn timestamp_cost_per_chunk() {
        const N: u64 = 1_000_000;
        let mut m = DirMetrics::new(true);
        let start = Instant::now();
        let mut sink = 0u64;
        for i in 0..N {
            let a = Instant::now();
            let b = Instant::now();
            let d = b.saturating_duration_since(a).as_nanos() as u64 + (i & 1023) * 1000;
            m.record_transit(d);
            m.record_turnaround(d + 7);
            sink = sink.wrapping_add(d);
        }
        let per_chunk_ns = start.elapsed().as_nanos() as f64 / N as f64;
        eprintln!("timestamping cost: {per_chunk_ns:.1} ns per chunk (2 clock reads + 4 records), sink {sink}");
        assert_eq!(m.transit_ns.len(), N);
        assert!(per_chunk_ns < 2_000.0, "{per_chunk_ns} ns per chunk");
    }

    #[test]
    fn histogram_memory_is_fixed() {
        let mut h = time_histogram();
        let before = h.distinct_values();
        for v in [1, 1_000, 1_000_000, TIME_HIGH_NS, u64::MAX] {
            h.saturating_record(v);
        }
        // saturating_record clamps instead of growing the histogram.
        assert_eq!(h.distinct_values(), before);
        assert_eq!(h.len(), 5);
        assert_eq!(h.max(), h.highest_equivalent(TIME_HIGH_NS));
    }
}
