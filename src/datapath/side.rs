//! A session's two sockets and two directions, by number: the one vocabulary the data path,
//! the configuration and what is observed share. Depends on nothing.

/// Socket index of the accepted peer (the listen side).
pub const LISTEN_SIDE: usize = 0;
/// Socket index of the dialled peer (the connect side).
pub const CONNECT_SIDE: usize = 1;
/// Side names, as `stats` and Prometheus label the sides (`side="listen"`).
pub const SIDE_NAMES: [&str; 2] = ["listen", "connect"];
/// Direction names: pump `d` moves bytes from socket `d` to socket `1 - d`.
/// In every KVMi deployment the listen side faces the hypervisor, so l2c is hypervisor →
/// monitor and c2l is monitor → hypervisor.
pub const DIRECTION_NAMES: [&str; 2] = ["l2c", "c2l"];
