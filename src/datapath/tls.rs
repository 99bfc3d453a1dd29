//! The TLS store: a rustls session between a TCP socket and the pump, so the pump never learns
//! TLS. Decrypts what comes from the socket into the plaintext the pump reads; encrypts what the
//! pump writes and sends it.
//!
//! Driven from the event loop like any socket: non-blocking, no thread, no runtime. The
//! connection runs the handshake (`handshake`) before any byte moves; after it, the pump sees
//! `Io::Tls` as a `store::Side`.
//!
//! Invariants (relied on by `conn.rs` and `pump.rs`):
//! - The pump's short-read rule holds: `recv` returns less than it was offered only when the
//!   socket said `WouldBlock` (or ended), never while rustls still holds plaintext or the
//!   socket still holds records; so an edge-triggered source is drained like a plain one.
//! - `send` takes plaintext only once every earlier record left for the socket; what it could
//!   not send at once stays queued in rustls (`wants_write`): the connection asks for write
//!   interest and calls `flush` until it is gone, and no session closes with records queued.
//! - A half-close is `close_notify`, then `shutdown(SHUT_WR)` once it is out. An end of stream
//!   without `close_notify` from the peer is an error (a truncation), not an EOF.
//! - The peer's `close_notify` can arrive with its last records; `recv` then returns those
//!   bytes short, and no edge will come for the end that follows (a peer that waits for our
//!   `close_notify` before it closes TCP sends nothing more). `peer_ended` says so: the
//!   connection reads that source again as if the socket had reported its peer's end.
//! - Never spliced: the strategy of a direction touching a TLS socket is copy.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use socket2::Socket;

use crate::datapath::store::Side;

/// One side's TLS session.
pub struct TlsStream {
    /// The rustls session (a server on the listen side, a client on the dialled side).
    conn: RefCell<rustls::Connection>,
    /// `close_notify` was queued; the socket is half-closed once it is out.
    shut_pending: Cell<bool>,
    /// The peer's `close_notify` was reached in the plaintext (`recv` said or will say EOF).
    peer_ended: Cell<bool>,
}

/// Why a handshake failed: rustls' error (the reason and what the peer presented are in it),
/// or the socket's.
#[derive(Debug)]
pub enum HandshakeError {
    Tls(rustls::Error),
    /// The peer closed before the handshake finished.
    Closed,
    Io(io::Error),
}

impl TlsStream {
    pub fn server(cfg: Arc<rustls::ServerConfig>) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream::wrap(rustls::ServerConnection::new(cfg)?.into()))
    }

    pub fn client(cfg: Arc<rustls::ClientConfig>, addr: std::net::IpAddr) -> Result<TlsStream, rustls::Error> {
        let name = ServerName::IpAddress(addr.into());
        Ok(TlsStream::wrap(rustls::ClientConnection::new(cfg, name)?.into()))
    }

    fn wrap(conn: rustls::Connection) -> TlsStream {
        TlsStream { conn: RefCell::new(conn), shut_pending: Cell::new(false), peer_ended: Cell::new(false) }
    }

    /// Moves the handshake on as far as the socket allows: Ok(true) once it is complete and
    /// every handshake record is out. On a failure the alert is sent if the socket takes it.
    pub fn handshake(&self, sock: &Socket) -> Result<bool, HandshakeError> {
        let mut c = self.conn.borrow_mut();
        loop {
            write_out(&mut c, sock).map_err(HandshakeError::Io)?;
            if !c.is_handshaking() {
                return Ok(!c.wants_write());
            }
            if c.wants_write() {
                return Ok(false);
            }
            match c.read_tls(&mut SockIo(sock)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {
                    if let Err(e) = c.process_new_packets() {
                        let _ = write_out(&mut c, sock);
                        return Err(HandshakeError::Tls(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }

    /// The certificate the peer presented, once the handshake passed.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let c = self.conn.borrow();
        c.peer_certificates().and_then(|certs| certs.first()).map(|d| d.as_ref().to_vec())
    }

    /// The peer's `close_notify` was reached after everything it sent before it.
    pub fn peer_ended(&self) -> bool {
        self.peer_ended.get()
    }

    /// Records are queued for the socket (write interest wanted).
    pub fn wants_write(&self) -> bool {
        self.conn.borrow().wants_write()
    }

    /// Sends what is queued as far as the socket takes it; completes a pending half-close.
    pub fn flush(&self, sock: &Socket) -> io::Result<()> {
        let mut c = self.conn.borrow_mut();
        write_out(&mut c, sock)?;
        if self.shut_pending.get() && !c.wants_write() {
            self.shut_pending.set(false);
            shutdown_socket(sock)?;
        }
        Ok(())
    }

    /// Queues `close_notify` and half-closes once it is out.
    pub fn close_notify(&self, sock: &Socket) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.shut_pending.set(true);
        self.flush(sock)
    }

    fn recv(&self, sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
        let mut c = self.conn.borrow_mut();
        let mut filled = 0;
        while filled < buf.len() {
            match c.reader().read(&mut buf[filled..]) {
                Ok(0) => {
                    // close_notify: the end of the stream, after `filled`.
                    self.peer_ended.set(true);
                    return Ok(filled);
                }
                Ok(n) => {
                    filled += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && filled > 0 => return Ok(filled),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the TLS peer ended the connection without close_notify (truncated)",
                    ));
                }
                Err(e) => return Err(e),
            }
            match c.read_tls(&mut SockIo(sock)) {
                // TCP's end: rustls now says whether close_notify came first.
                Ok(0) => {}
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if filled > 0 { Ok(filled) } else { Err(e) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = c.process_new_packets() {
                let _ = write_out(&mut c, sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            // A key update or an alert may want an answer; what the socket does not take now
            // goes out with the next flush.
            write_out(&mut c, sock)?;
        }
        Ok(filled)
    }

    fn send(&self, sock: &Socket, buf: &[u8]) -> io::Result<usize> {
        let mut c = self.conn.borrow_mut();
        write_out(&mut c, sock)?;
        if c.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = c.writer().write(buf)?;
        write_out(&mut c, sock)?;
        Ok(n)
    }
}

/// Writes queued records until rustls has none or the socket would block.
fn write_out(c: &mut rustls::Connection, sock: &Socket) -> io::Result<()> {
    while c.wants_write() {
        match c.write_tls(&mut SockIo(sock)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_socket(sock: &Socket) -> io::Result<()> {
    match sock.shutdown(std::net::Shutdown::Write) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => other,
    }
}

/// The socket as rustls reads and writes it (sends without SIGPIPE).
struct SockIo<'a>(&'a Socket);

impl Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*self.0, buf)
    }
}

impl Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send_with_flags(buf, libc::MSG_NOSIGNAL)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One end of a direction as the pump sees it: the socket itself, or the socket through TLS.
pub enum Io<'a> {
    Plain(&'a Socket),
    Tls(&'a Socket, &'a TlsStream),
}

fn no_splice() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

impl Side for Io<'_> {
    fn splice_to_pipe(&self, pipe: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.splice_to_pipe(pipe, len),
            Io::Tls(..) => Err(no_splice()),
        }
    }
    fn splice_from_pipe(&self, pipe: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.splice_from_pipe(pipe, len),
            Io::Tls(..) => Err(no_splice()),
        }
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => Side::recv(*s, buf),
            Io::Tls(s, t) => t.recv(s, buf),
        }
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => Side::send(*s, buf),
            Io::Tls(s, t) => t.send(s, buf),
        }
    }
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.shutdown_write(),
            Io::Tls(s, t) => t.close_notify(s),
        }
    }
}
