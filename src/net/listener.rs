//! The listening socket: created (or inherited) at start-up, accepted from by the event loop.
//!
//! Access is not decided here: `accept` only gathers the peer's identity (SO_PEERCRED on
//! UNIX, the peer CID on vsock, the source address on TCP) for `access::decide`.
//!
//! UNIX socket files: created with the operator's mode and group, never world-writable and
//! never briefly more open than asked (the umask is narrowed around bind, and is all that sets
//! the mode: nothing after bind goes by path, see `files`). A stale file left by
//! a dead instance is replaced; a live one is refused, found without connecting to it
//! (`unix_diag`: the kernel lists listeners by inode; a probe would be a session on a running
//! relay); anything that is not a socket is never touched. The file is removed when the
//! `Listener` is dropped, only if it is still the one this process bound.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{Mode, umask};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::access::Peer;
use crate::config::Config;
use crate::error::StartError;
use crate::net::endpoint::Endpoint;

/// Pending connections the kernel queues for us.
const LISTEN_BACKLOG: i32 = 64;

pub struct Listener {
    socket: Socket,
    /// The socket file to remove on drop (only for sockets this process bound).
    /// Held for its Drop: removes the file this process created.
    _file: Option<SocketFile>,
}

/// A UNIX socket file this process created, identified by device and inode.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only remove the file if it is still ours: an operator may have started another
        // instance that replaced it.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Listener {
    /// Binds the listener `cfg.listen` names.
    pub fn bind(cfg: &Config) -> Result<Listener, StartError> {
        let endpoint = format!("--listen {}", cfg.listen);
        match &cfg.listen {
            Endpoint::Unix(path) => {
                let (s, file) = bind_unix(&endpoint, path, cfg.socket_mode, cfg.socket_gid)?;
                Listener::finish(s, Some(file), endpoint)
            }
            tcp_or_vsock => {
                let socket_err = |source| StartError::Socket { endpoint: endpoint.clone(), source };
                let (domain, addr) = tcp_or_vsock.sockaddr();
                let s = Socket::new(domain, Type::STREAM, None).map_err(socket_err)?;
                if let Endpoint::Tcp(a) = tcp_or_vsock {
                    s.set_reuse_address(true).map_err(socket_err)?;
                    if a.is_ipv6() && a.ip().is_unspecified() {
                        // [::] serves IPv4 too; mapped sources are judged as the IPv4 they carry.
                        s.set_only_v6(false).map_err(socket_err)?;
                    }
                }
                s.bind(&addr).map_err(|source| StartError::Bind { endpoint: endpoint.clone(), source })?;
                Listener::finish(s, None, endpoint)
            }
        }
    }

    /// Adopts a listening socket handed over by the service manager (socket activation).
    /// The file belongs to the socket unit: it is never removed by the relay.
    pub fn adopt(socket: Socket) -> io::Result<Listener> {
        socket.set_nonblocking(true)?;
        Ok(Listener { socket, _file: None })
    }

    fn finish(s: Socket, file: Option<SocketFile>, endpoint: String) -> Result<Listener, StartError> {
        s.listen(LISTEN_BACKLOG).map_err(|source| StartError::Listen { endpoint: endpoint.clone(), source })?;
        s.set_nonblocking(true).map_err(|source| StartError::Listen { endpoint, source })?;
        Ok(Listener { socket: s, _file: file })
    }

    /// The address actually bound, as an endpoint (tells the port chosen for `tcp:IP:0`).
    pub fn bound(&self) -> String {
        match self.socket.local_addr() {
            Ok(a) => match (a.as_socket(), a.as_vsock_address(), a.as_pathname()) {
                (Some(s), _, _) => Endpoint::Tcp(s).to_string(),
                (_, Some((cid, port)), _) => Endpoint::Vsock { cid, port }.to_string(),
                (_, _, Some(p)) => Endpoint::Unix(p.to_path_buf()).to_string(),
                _ => "unknown".into(),
            },
            Err(e) => format!("unknown ({e})"),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Accepts one pending connection, non-blocking, and says who it is.
    /// One pending peer and who it is. The outer error is the accept's (nothing was taken);
    /// the inner one says the peer was taken but its identity could not be read: the caller
    /// closes that peer alone and goes on accepting.
    pub fn accept(&self) -> io::Result<(Socket, io::Result<Peer>)> {
        let (sock, addr) = self.socket.accept()?;
        let peer = sock.set_nonblocking(true).and_then(|()| identify(&sock, &addr));
        Ok((sock, peer))
    }
}

fn identify(sock: &Socket, addr: &SockAddr) -> io::Result<Peer> {
    if let Some(a) = addr.as_socket() {
        return Ok(Peer::Tcp(a));
    }
    if let Some((cid, port)) = addr.as_vsock_address() {
        return Ok(Peer::Vsock { cid, port });
    }
    if addr.domain() == Domain::UNIX {
        return unix_peer(sock);
    }
    Err(io::Error::other(format!("peer of unknown address family {:?}", addr.domain())))
}

/// A UNIX peer's identity as the kernel recorded it at connect (SO_PEERCRED): the data and the
/// control listeners both judge it.
pub fn unix_peer(sock: &Socket) -> io::Result<Peer> {
    let cred = getsockopt(&sock.as_fd(), sockopt::PeerCredentials).map_err(io::Error::from)?;
    Ok(Peer::Unix { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

/// Creates a UNIX socket file at `path` with exactly `mode` (and group `gid`): replaces a stale
/// file, refuses a live socket or a non-socket. `endpoint` names the flag for errors. The file is
/// removed again when the returned `SocketFile` is dropped.
pub fn bind_unix(endpoint: &str, path: &Path, mode: u32, gid: Option<u32>) -> Result<(Socket, SocketFile), StartError> {
    let err_path = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(StartError::NotASocket { endpoint: endpoint.into(), path: err_path() });
            }
            // Asked of the kernel first: a connect would be a session on a running relay.
            match crate::net::unix_diag::is_listening(m.dev(), m.ino()) {
                Ok(true) => return Err(StartError::LiveSocket { endpoint: endpoint.into(), path: err_path() }),
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "socket diagnostics unavailable; probing by connect"),
            }
            // No listener in this network namespace: a dead file meets ECONNREFUSED; a listener
            // in another namespace sharing the directory answers (the one case a probe visits).
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(StartError::LiveSocket { endpoint: endpoint.into(), path: err_path() }),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).map_err(|source| StartError::RemoveStale {
                        endpoint: endpoint.into(),
                        path: err_path(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(StartError::ProbeSocket { endpoint: endpoint.into(), path: err_path(), source });
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(StartError::ProbeSocket { endpoint: endpoint.into(), path: err_path(), source }),
    }

    let s = Socket::new(Domain::UNIX, Type::STREAM, None)
        .map_err(|source| StartError::Socket { endpoint: endpoint.into(), source })?;
    let addr = SockAddr::unix(path).map_err(|source| StartError::Socket { endpoint: endpoint.into(), source })?;
    // The file is born with at most the operator's mode: no window where it is more open.
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = s.bind(&addr);
    umask(old);
    bound.map_err(|source| StartError::Bind { endpoint: endpoint.into(), source })?;
    // Nothing from here on goes by path: whoever can rename entries in the directory may have
    // swapped the socket for a link by now (files.rs). The inode the name holds is checked
    // (a socket of ours) and changed through an fd.
    let inode = crate::files::own_socket(path).map_err(|source| StartError::Replaced {
        endpoint: endpoint.into(),
        path: err_path(),
        source,
    })?;
    // From here on the file is ours and removed again if anything below fails.
    let file = SocketFile { path: path.to_path_buf(), dev: inode.dev, ino: inode.ino };
    if inode.mode & 0o777 & !mode != 0 {
        // The umask is ignored where the directory has a default ACL.
        return Err(StartError::Mode { endpoint: endpoint.into(), mode, got: inode.mode, path: err_path() });
    }
    if let Some(gid) = gid {
        inode.chgrp(gid).map_err(|source| StartError::Chown {
            endpoint: endpoint.into(),
            gid,
            path: err_path(),
            source,
        })?;
    }
    crate::files::warn_if_others_can_write(endpoint, path);
    Ok((s, file))
}
