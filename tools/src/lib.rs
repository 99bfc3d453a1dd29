//! kvmi-relay-tools: everything the project runs besides the daemon, kept out of it so that the
//! process holding a VM's introspection socket carries no test code (and maps ~200 KiB less of
//! it; docs/BENCHMARKS.md). Never installed.
//!
//! - `peers/`: the fake KVMi peers (hypervisor, introspector) and the test peers (bulk, echo,
//!   ping-pong) that `make demo`, the tests, the benches and the test guests drive the relay with;
//! - `demo.rs`: `make demo`, the network flavor end to end on one machine;
//! - `manpage.rs`: kvmi-relay(1), generated from the daemon's clap definition (`make man`).
//!
//! It depends on the daemon's library (endpoints, the command line, the control client); the
//! daemon never depends on it.

#![deny(unsafe_code)]

pub mod demo;
pub mod manpage;
pub mod peers;
