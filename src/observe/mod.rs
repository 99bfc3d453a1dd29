//! What is observed: per-direction and per-session figures (`metrics`), the snapshot rendered as
//! text, JSON and Prometheus (`export`), the HdrHistogram interval log (`histlog`) and the control
//! socket's protocol (`control`), the Prometheus text file for node_exporter (`textfile`), the life counters (`totals`),
//! and the limit on repeated log lines (`ratelimit`).
//! The event loop feeds these; they feed nothing back into it.

pub mod control;
pub mod export;
pub mod histlog;
pub mod metrics;
pub mod ratelimit;
pub mod textfile;
pub mod totals;
