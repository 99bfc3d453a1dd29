//! Dialling the far side without blocking the loop: `start` begins a non-blocking connect,
//! `finish` tells whether it completed. TCP goes only to the address pinned at start-up (the
//! endpoint holds an IP literal; no name is resolved here).

use std::io;

use socket2::{Socket, Type};

use crate::config::TcpLiveness;
use crate::net::endpoint::Endpoint;

/// Starts connecting to `ep`. Ok means connected or in progress; check with `finish`.
pub fn start(ep: &Endpoint, tcp: &TcpLiveness) -> io::Result<Socket> {
    let (domain, addr) = ep.sockaddr();
    let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
    if matches!(ep, Endpoint::Tcp(_)) {
        crate::net::tcp::tune(&s, tcp)?;
    }
    match s.connect(&addr) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        // A UNIX listener whose backlog is full answers EAGAIN; there is no pending
        // connection to wait for, so this is a failure like any other.
        Err(e) => Err(e),
    }
}

/// Ok(true) once connected, Ok(false) while still in progress, Err when it failed.
pub fn finish(s: &Socket) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}
