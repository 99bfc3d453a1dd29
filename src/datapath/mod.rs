//! Where bytes move: one session's state machine (`conn`) and the pump it runs once per
//! direction (`pump`: splice through a pipe or copy through a buffer). A protocol layer (the KVMi
//! gate in `kvmi::session`, a TLS store) sits between them as a `pump::Side`, so the pump never
//! learns either protocol. Connections never touch the poller: `relay` owns it.

pub mod conn;
pub mod pump;
