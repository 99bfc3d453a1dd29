//! The project's own fake KVMi peers and test peers.
//!
//! These are a real part of the project: `make demo`, the tests, the benches and the test
//! guest all drive the relay with them. They are plain blocking programs (one thread per
//! direction where they need both at once); only the relay itself is an event loop.
//!
//! - `net.rs`: blocking connect/listen for any endpoint (unix, tcp, vsock).
//! - `data.rs`: the seeded byte stream both ends of a bulk transfer agree on, and its checker.
//! - `bulk.rs`, `pingpong.rs`: bidirectional checksummed transfer; round-trip timing.
//! - `kvmi.rs`: the KVMi wire format and the fake hypervisor / fake introspector pair.
//! - `cli.rs`: the hidden subcommands that expose them.

pub mod bulk;
pub mod cli;
pub mod data;
pub mod kvmi;
pub mod net;
pub mod pingpong;
