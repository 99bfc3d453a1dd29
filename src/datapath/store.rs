//! Where the bytes in flight wait: a user-space buffer or a kernel pipe, and the socket
//! operations (`Side`) they are read from and written to.
//!
//! Invariants (relied on by `pump.rs`):
//! - A store counts what it holds itself: the call that reads bytes in adds them, the call that
//!   writes bytes out takes them off, and nothing else changes the count. Growth carries exactly
//!   the bytes held, so no call order between a read and a growth can drop or double any.
//! - Bytes leave in the order they came. A buffer holds them in `buf[start..start + fill]`; a
//!   pipe keeps its own order.
//! - A store never shrinks; it goes with its connection. Turning a pipe into a buffer (a refused
//!   splice) carries every byte the pipe holds, or fails without losing any.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::sys::{self, Pipe};

/// What a store needs from a socket. Implemented by `socket2::Socket`, by the protocol layers
/// that sit in front of one (`datapath::tls::Io`, `kvmi::session::Gate`), and by fakes in tests.
pub trait Side {
    /// splice(2) from this socket into `pipe` (its write end).
    fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize>;
    /// splice(2) from `pipe` (its read end) into this socket.
    fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends without raising SIGPIPE.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Side for socket2::Socket {
    fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(self.as_fd(), pipe, len)
    }
    fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(pipe, self.as_fd(), len)
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*self, buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.send_with_flags(buf, libc::MSG_NOSIGNAL)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        match self.shutdown(std::net::Shutdown::Write) {
            // The peer is already gone; the half-close has nowhere to go and nothing to lose.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            other => other,
        }
    }
}

/// What one successful read into a store took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub bytes: usize,
    /// The read took all the room it was offered.
    pub filled: bool,
}

/// A user-space copy buffer: `buf[start..start + fill]` holds the bytes in flight.
pub struct Buffer {
    buf: Vec<u8>,
    start: usize,
    fill: usize,
}

impl Buffer {
    pub fn new(capacity_bytes: usize) -> Buffer {
        Buffer { buf: vec![0; capacity_bytes], start: 0, fill: 0 }
    }

    /// recv(2) into the room after the held bytes (moved to the front first when they sit at
    /// the end). The room offered may be less than `capacity - fill` while bytes sit past the
    /// front: `filled` is measured against what was offered.
    fn read(&mut self, src: &impl Side) -> io::Result<Taken> {
        if self.start + self.fill == self.buf.len() {
            self.buf.copy_within(self.start..self.start + self.fill, 0);
            self.start = 0;
        }
        let end = self.start + self.fill;
        let offered = self.buf.len() - end;
        let n = src.recv(&mut self.buf[end..])?;
        self.fill += n;
        Ok(Taken { bytes: n, filled: n == offered })
    }

    fn write(&mut self, dst: &impl Side) -> io::Result<usize> {
        let n = dst.send(&self.buf[self.start..self.start + self.fill])?;
        self.fill -= n;
        self.start = if self.fill == 0 { 0 } else { self.start + n };
        Ok(n)
    }

    /// A bigger buffer, holding the same bytes at its front. Zeroed allocations this size come
    /// straight from the kernel's zero pages: the memory becomes resident only as reads fill it.
    fn grow(&mut self, wanted_bytes: usize) -> usize {
        let mut bigger = vec![0u8; wanted_bytes];
        bigger[..self.fill].copy_from_slice(&self.buf[self.start..self.start + self.fill]);
        self.buf = bigger;
        self.start = 0;
        wanted_bytes
    }
}

/// A kernel pipe that splice(2) moves bytes through, with what it holds counted.
pub struct Spliced {
    pipe: Pipe,
    capacity_bytes: usize,
    fill: usize,
}

impl Spliced {
    /// A pipe of about `wanted_bytes` (what the kernel grants).
    pub fn new(wanted_bytes: usize) -> io::Result<Spliced> {
        let (pipe, capacity_bytes) = Pipe::new(wanted_bytes)?;
        Ok(Spliced { pipe, capacity_bytes, fill: 0 })
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    fn read(&mut self, src: &impl Side) -> io::Result<Taken> {
        let room = self.capacity_bytes - self.fill;
        let n = src.splice_to_pipe(self.pipe.write.as_fd(), room)?;
        self.fill += n;
        Ok(Taken { bytes: n, filled: n == room })
    }

    fn write(&mut self, dst: &impl Side) -> io::Result<usize> {
        let n = dst.splice_from_pipe(self.pipe.read.as_fd(), self.fill)?;
        self.fill -= n;
        Ok(n)
    }

    /// Empties the pipe into a buffer of the pipe's capacity, in order. Err (nothing counted is
    /// lost from the pipe's side, but the direction cannot go on) when the pipe holds fewer bytes
    /// than counted.
    fn into_buffer(self) -> io::Result<Buffer> {
        let mut buf = vec![0u8; self.capacity_bytes];
        let mut carried = 0;
        while carried < self.fill {
            match sys::read(self.pipe.read.as_fd(), &mut buf[carried..self.fill])? {
                0 => break,
                n => carried += n,
            }
        }
        if carried != self.fill {
            return Err(io::Error::other(format!(
                "probable bug: the pipe held {carried} bytes where {} were counted",
                self.fill
            )));
        }
        Ok(Buffer { buf, start: 0, fill: carried })
    }
}

/// The bytes in flight for one direction.
pub enum Store {
    Buffer(Buffer),
    Pipe(Spliced),
}

impl Store {
    pub fn fill(&self) -> usize {
        match self {
            Store::Buffer(b) => b.fill,
            Store::Pipe(p) => p.fill,
        }
    }

    pub fn capacity_bytes(&self) -> usize {
        match self {
            Store::Buffer(b) => b.buf.len(),
            Store::Pipe(p) => p.capacity_bytes,
        }
    }

    pub fn is_pipe(&self) -> bool {
        matches!(self, Store::Pipe(_))
    }

    /// Room for more bytes.
    pub fn has_room(&self) -> bool {
        self.fill() < self.capacity_bytes()
    }

    /// Reads what fits from `src`; the bytes taken are held from then on.
    pub fn read(&mut self, src: &impl Side) -> io::Result<Taken> {
        match self {
            Store::Buffer(b) => b.read(src),
            Store::Pipe(p) => p.read(src),
        }
    }

    /// Writes what `dst` takes, oldest bytes first; those are no longer held.
    pub fn write(&mut self, dst: &impl Side) -> io::Result<usize> {
        match self {
            Store::Buffer(b) => b.write(dst),
            Store::Pipe(p) => p.write(dst),
        }
    }

    /// Asks for `wanted_bytes` of room in all (more than now) and returns the capacity that
    /// resulted. A buffer always grows; a pipe the kernel refuses to grow keeps its size (Err).
    pub fn grow(&mut self, wanted_bytes: usize) -> io::Result<usize> {
        match self {
            Store::Buffer(b) => Ok(b.grow(wanted_bytes)),
            Store::Pipe(p) => {
                p.capacity_bytes = p.pipe.grow(wanted_bytes)?;
                Ok(p.capacity_bytes)
            }
        }
    }

    /// A pipe becomes a buffer holding the same bytes; a buffer stays as it is. On Err the
    /// store is gone with its bytes, and so is the direction.
    pub fn into_buffer(self) -> io::Result<Store> {
        match self {
            Store::Pipe(p) => p.into_buffer().map(Store::Buffer),
            buffer => Ok(buffer),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The stores against a real socket pair and a real pipe.

    use std::io::{Read, Write};

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn pair() -> (Socket, Socket) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// A real socket that takes at most `.1` bytes per send: a short write on demand.
    struct Takes<'a>(&'a Socket, usize);

    impl Side for Takes<'_> {
        fn splice_to_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
            self.0.splice_to_pipe(pipe, len)
        }
        fn splice_from_pipe(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
            self.0.splice_from_pipe(pipe, len.min(self.1))
        }
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            Side::recv(self.0, buf)
        }
        fn send(&self, buf: &[u8]) -> io::Result<usize> {
            Side::send(self.0, &buf[..buf.len().min(self.1)])
        }
        fn shutdown_write(&self) -> io::Result<()> {
            self.0.shutdown_write()
        }
    }

    fn received(sock: &Socket, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        (&mut &*sock).read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn a_buffer_grown_while_its_bytes_sit_past_the_front_keeps_exactly_those_bytes() {
        let (src_far, src) = pair();
        let (dst, dst_far) = pair();
        let mut store = Store::Buffer(Buffer::new(128));
        (&mut &src_far).write_all(&[1; 100]).unwrap();
        assert_eq!(store.read(&src).unwrap(), Taken { bytes: 100, filled: false });
        // Half goes out: the 50 still held sit past the front of the buffer.
        assert_eq!(store.write(&Takes(&dst, 50)).unwrap(), 50);
        assert_eq!(received(&dst_far, 50), vec![1; 50]);
        assert_eq!(store.grow(256).unwrap(), 256);
        assert_eq!((store.fill(), store.capacity_bytes()), (50, 256));
        (&mut &src_far).write_all(&[2; 10]).unwrap();
        assert_eq!(store.read(&src).unwrap(), Taken { bytes: 10, filled: false });
        assert_eq!(store.write(&dst).unwrap(), 60);
        assert_eq!(received(&dst_far, 60), [vec![1; 50], vec![2; 10]].concat(), "the held bytes, then the new ones");
        assert_eq!(store.fill(), 0);
    }

    #[test]
    fn a_buffer_moves_its_bytes_to_the_front_when_they_reach_the_end() {
        let (src_far, src) = pair();
        let (dst, dst_far) = pair();
        let mut store = Store::Buffer(Buffer::new(64));
        let bytes: Vec<u8> = (0..200).map(|i| i as u8).collect();
        (&mut &src_far).write_all(&bytes).unwrap();
        let (mut out, mut taken) = (Vec::new(), 0);
        while out.len() < bytes.len() {
            if taken < bytes.len() && store.has_room() {
                taken += store.read(&src).unwrap().bytes;
                assert!(store.fill() <= 64);
            }
            // Delivered a little at a time, the held bytes reach the end of the buffer.
            let n = store.write(&Takes(&dst, 7)).unwrap();
            out.extend(received(&dst_far, n));
        }
        assert_eq!(out, bytes);
    }

    #[test]
    fn a_pipe_counts_what_it_holds_and_turns_into_a_buffer_with_the_same_bytes() {
        let (src_far, src) = pair();
        let (dst, dst_far) = pair();
        let mut store = Store::Pipe(Spliced::new(4096).unwrap());
        let cap = store.capacity_bytes();
        (&mut &src_far).write_all(b"spliced bytes").unwrap();
        assert_eq!(store.read(&src).unwrap(), Taken { bytes: 13, filled: false });
        assert_eq!(store.fill(), 13);
        let mut store = store.into_buffer().unwrap();
        assert!(!store.is_pipe());
        assert_eq!((store.fill(), store.capacity_bytes()), (13, cap), "the buffer keeps the pipe's capacity");
        assert_eq!(store.write(&dst).unwrap(), 13);
        assert_eq!(received(&dst_far, 13), b"spliced bytes");
    }
}
