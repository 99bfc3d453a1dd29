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
}

impl Default for DirMetrics {
    fn default() -> Self {
        DirMetrics { transit_ns: time_histogram(), turnaround_ns: time_histogram() }
    }
}

impl DirMetrics {
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
