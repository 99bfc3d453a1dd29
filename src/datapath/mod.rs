//! Where bytes move: one session's state machine (`conn`) and the pump it runs once per
//! direction (`pump`: splice through a pipe or copy through a buffer). A protocol layer (the KVMi
//! gate in `kvmi::session`, a TLS store) sits between them as a `store::Side`, so the pump never
//! learns either protocol. Connections never touch the poller: `relay` owns it. `side` numbers
//! the two sockets and directions for everyone (it depends on nothing).

pub mod conn;
pub mod policy;
pub mod pump;
pub mod side;
pub mod store;
pub mod tls;
