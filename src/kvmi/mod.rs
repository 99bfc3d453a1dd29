//! The KVMi protocol as the relay sees it with `--kvmi`: pure functions and small state
//! machines over bytes, no sockets, no clock (time is passed in), no `unsafe`.
//!
//! - `abi.rs`: the id → (name, class, sizes) tables, one per numbering (`--kvmi-abi`);
//! - `handshake.rs`: QEMU's 96/104-byte handshake and the introspector's answer;
//! - `wire.rs`: the 8-byte header, the framer (where a message ends, bodies uninspected),
//!   the relay's own error reply;
//! - `policy.rs`: what the tenant may do (`--kvmi-policy`, `--kvmi-allow`, `--kvmi-deny`);
//! - `tracker.rs`: commands and events waiting for replies, matched by seq, and how long
//!   each waited;
//! - `session.rs`: one connection's layer at its pumps' destinations (a `store::Side`
//!   wrapper): framing, policy, relay-made replies, whole-message delivery, per-type figures.
//!
//! Only `session.rs` looks outside this folder (the pump's `Side` trait, the metrics'
//! histogram bounds); the pump knows nothing of KVMi.
#![forbid(unsafe_code)]

pub mod abi;
pub mod handshake;
pub mod policy;
pub mod session;
pub mod tracker;
pub mod wire;
