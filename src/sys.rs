//! Where `unsafe` lives: thin syscall wrappers returning `io::Result` and `OwnedFd`.
//!
//! Everything else in the crate is safe code. Each block says who owns the fds it touches.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A kernel pipe: both ends non-blocking and close-on-exec. Its capacity is the kernel's
/// answer to each request; the owner keeps it (one copy, so it cannot go stale).
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// Creates a pipe and asks for `wanted_bytes`; returns it with the capacity the kernel
    /// granted (F_GETPIPE_SZ after F_SETPIPE_SZ). Asking for more than
    /// /proc/sys/fs/pipe-max-size fails for unprivileged users: the pipe then keeps the size it
    /// has, which is still correct, only smaller.
    pub fn new(wanted_bytes: usize) -> io::Result<(Pipe, usize)> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io_err)?;
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted_bytes as libc::c_int));
        let capacity_bytes = fcntl(&write, FcntlArg::F_GETPIPE_SZ).map_err(io_err)? as usize;
        Ok((Pipe { read, write }, capacity_bytes))
    }

    /// Asks for `wanted_bytes` (more than now; bytes in the pipe stay) and returns the capacity
    /// the kernel granted. Err when the kernel refuses: above pipe-max-size, or the user is over
    /// fs.pipe-user-pages-soft.
    pub fn grow(&mut self, wanted_bytes: usize) -> io::Result<usize> {
        fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(wanted_bytes as libc::c_int)).map_err(io_err)?;
        Ok(fcntl(&self.write, FcntlArg::F_GETPIPE_SZ).map_err(io_err)? as usize)
    }
}

/// Moves up to `len` bytes between two fds, one of which is a pipe, without copying them
/// through user space. Never blocks on the pipe; the socket side must itself be O_NONBLOCK
/// (SPLICE_F_NONBLOCK alone does not make a socket read non-blocking on every kernel).
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    nix::fcntl::splice(from, None, to, None, len, SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_err(io_err)
}

/// read(2) on any fd.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd, buf).map_err(io_err)
}

/// write(2) on any fd. Writes to sockets go through `send` in the socket code instead so they
/// carry MSG_NOSIGNAL; this is for pipes.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    nix::unistd::write(fd, buf).map_err(io_err)
}

/// Pins the calling thread (the whole relay: it has one) to `cpu`.
pub fn pin_this_thread(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io_err)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io_err)
}

/// Ignores SIGPIPE process-wide: splice(2) into a closed socket has no MSG_NOSIGNAL, and a
/// signal must never kill the relay where an EPIPE would do.
pub fn ignore_sigpipe() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing SIG_IGN runs no handler code, so no async-signal-safety concern;
    // it only replaces the disposition of SIGPIPE for this process.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }.map(|_| ()).map_err(io_err)
}

/// Allocations this size and larger get their own mapping, returned to the kernel when freed.
const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// Pins glibc's mmap threshold so that copy buffers grown for bulk (128 KiB and up) are mapped
/// on their own and unmapped when their connection closes. Left alone, glibc raises the
/// threshold after the first such free; later buffers then come from the heap, and freed ones
/// may stay resident.
pub fn return_big_buffers_to_the_kernel() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes a tuning parameter of the allocator; called once at
        // start-up on the only thread, before the event loop allocates any buffer.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; freed copy buffers may stay resident");
        }
    }
}

/// Hands the heap's free pages back to the kernel (glibc `malloc_trim`): memory that start-up or
/// a closed session freed stops counting in the relay's RSS until it is used again.
pub fn give_back_free_heap_pages() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only returns free memory to the kernel (madvise on free chunks,
        // sbrk for the top); it never touches allocated memory. The relay has one thread.
        unsafe { libc::malloc_trim(0) };
    }
}

/// Takes ownership of an fd handed over by the service manager (LISTEN_FDS).
///
/// Returns an error unless `fd` is open. The caller must be the only owner of `fd`: the
/// service-manager protocol passes each fd once and nothing else in this process holds it.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    fcntl_check_open(fd)?;
    // SAFETY: the fd is open (checked above) and was passed to this process by the service
    // manager for it to own; nothing else in the process refers to it, so making it an
    // OwnedFd transfers the one ownership there is.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fcntl_check_open(fd: RawFd) -> io::Result<()> {
    // No BorrowedFd here: making one asserts the fd is open, which is the question.
    // SAFETY: F_GETFD on a plain number reads the descriptor flags, touches no memory and no
    // fd state; a closed fd answers EBADF, which is what we want to learn.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID): what a piece of work cost it,
/// without the time it waited for a CPU. None if the clock cannot be read.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32))
}

/// Counts this process's open fds (for leak tests and the stats).
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// Borrow helper so callers can pass `&OwnedFd` or `&Socket` uniformly.
pub fn fd<T: AsFd>(t: &T) -> BorrowedFd<'_> {
    t.as_fd()
}
