//! Blocking sockets for the fake peers: dial or listen on any endpoint.

use std::io;
use std::time::Duration;

use socket2::{Socket, Type};

use kvmi_relay::net::endpoint::Endpoint;

/// Dials `ep` (blocking), with TCP_NODELAY on TCP.
pub fn connect(ep: &Endpoint) -> io::Result<Socket> {
    let (domain, addr) = ep.sockaddr();
    let s = Socket::new(domain, Type::STREAM, None)?;
    s.connect(&addr)?;
    if matches!(ep, Endpoint::Tcp(_)) {
        s.set_tcp_nodelay(true)?;
    }
    Ok(s)
}

/// Dials `ep`, retrying for up to `patience` while nobody listens yet.
pub fn connect_retrying(ep: &Endpoint, patience: Duration) -> io::Result<Socket> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match connect(ep) {
            Ok(s) => return Ok(s),
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(e.raw_os_error(), Some(libc::ECONNREFUSED) | Some(libc::ENOENT)) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Binds and listens on `ep` (unlinking a stale UNIX path first, as libkvmi does).
pub fn listen(ep: &Endpoint) -> io::Result<Socket> {
    let (domain, addr) = ep.sockaddr();
    if let Endpoint::Unix(p) = ep {
        let _ = std::fs::remove_file(p);
    }
    let s = Socket::new(domain, Type::STREAM, None)?;
    if matches!(ep, Endpoint::Tcp(_)) {
        s.set_reuse_address(true)?;
    }
    s.bind(&addr)?;
    s.listen(16)?;
    Ok(s)
}

/// Accepts one connection (TCP_NODELAY on TCP).
pub fn accept(listener: &Socket) -> io::Result<Socket> {
    let (s, addr) = listener.accept()?;
    if addr.as_socket().is_some() {
        s.set_tcp_nodelay(true)?;
    }
    Ok(s)
}
