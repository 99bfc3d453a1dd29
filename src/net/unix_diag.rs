//! Is a UNIX socket file live? Asked of the kernel, not of the socket.
//!
//! Connecting to find out would be a visit: a running relay admits the probe, dials the far
//! side for an empty session, or spends its one `--max-conns` slot refusing it while a real
//! hypervisor dials. Instead the kernel's socket diagnostics (NETLINK_SOCK_DIAG, `unix_diag`)
//! list every listening UNIX socket of this network namespace with the device and inode of the
//! file it is bound to; a file is live when a listener holds exactly that inode.
//!
//! The answer covers this network namespace only: a listener in another one (a container
//! sharing the directory) is not in the list. The caller therefore still connects when the
//! kernel lists no listener, which is a visit only in that rare case and otherwise meets
//! ECONNREFUSED on a dead file.
//!
//! Wire layout (linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h), all native-endian:
//! a request is `nlmsghdr` (16 bytes) and `unix_diag_req` (24 bytes); each answer is
//! `nlmsghdr`, `unix_diag_msg` (16 bytes) and attributes (`rtattr`: u16 length, u16 type,
//! 4-byte aligned).
//! `UNIX_DIAG_VFS` carries `{ u32 inode, u32 device }`, the device in the kernel's own encoding
//! (major << 20 | minor), not the one `stat` returns.

use std::io::{self, Read};

use socket2::{Domain, Protocol, Socket, Type};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR_BYTES: usize = 16;
const UNIX_DIAG_MSG_BYTES: usize = 16;
/// `TCP_LISTEN` in the kernel's state numbering, which unix_diag shares.
const STATE_LISTEN: u32 = 10;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UNIX_DIAG_VFS: u16 = 1;
/// One receive: the kernel fills a dump in pages; 32 KiB holds many of them.
const RECV_BUFFER_BYTES: usize = 32 * 1024;

/// Whether a listening UNIX socket in this network namespace is bound to the file with device
/// `dev` (as `stat` returns it) and inode `ino`.
pub fn is_listening(dev: u64, ino: u64) -> io::Result<bool> {
    let want = (libc::major(dev) as u64, libc::minor(dev) as u64, ino);
    let mut found = false;
    for_each_listener(|kernel_dev, vfs_ino| {
        let (major, minor) = ((kernel_dev >> 20) as u64, (kernel_dev & 0xf_ffff) as u64);
        found |= (major, minor, u64::from(vfs_ino)) == want;
    })?;
    Ok(found)
}

/// Calls `each(kernel_dev, inode)` for every listening UNIX socket bound to a file.
fn for_each_listener(mut each: impl FnMut(u32, u32)) -> io::Result<()> {
    let sock =
        Socket::new(Domain::from(libc::AF_NETLINK), Type::DGRAM.cloexec(), Some(Protocol::from(NETLINK_SOCK_DIAG)))?;
    sock.send(&request())?;
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    loop {
        let n = (&sock).read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag: the dump ended without NLMSG_DONE"));
        }
        if parse(&buf[..n], &mut each)? {
            return Ok(());
        }
    }
}

fn request() -> Vec<u8> {
    let mut r = Vec::with_capacity(NLMSG_HDR_BYTES + 24);
    r.extend_from_slice(&((NLMSG_HDR_BYTES + 24) as u32).to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    r.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    r.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    r.push(libc::AF_UNIX as u8); // sdiag_family
    r.push(0); // sdiag_protocol
    r.extend_from_slice(&0u16.to_ne_bytes()); // pad
    r.extend_from_slice(&(1u32 << STATE_LISTEN).to_ne_bytes()); // udiag_states
    r.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino: all
    r.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes()); // udiag_show
    r.extend_from_slice(&[0xff; 8]); // udiag_cookie: none
    r
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: malformed answer ({what})"))
}

/// Walks one datagram of netlink messages; true once NLMSG_DONE is seen.
fn parse(mut b: &[u8], each: &mut impl FnMut(u32, u32)) -> io::Result<bool> {
    while !b.is_empty() {
        let len = u32_at(b, 0).ok_or_else(|| malformed("short header"))? as usize;
        let kind = u16_at(b, 4).ok_or_else(|| malformed("short header"))?;
        if len < NLMSG_HDR_BYTES || len > b.len() {
            return Err(malformed("message length"));
        }
        let body = &b[NLMSG_HDR_BYTES..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).ok_or_else(|| malformed("short error"))? as i32;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => {
                let mut at = UNIX_DIAG_MSG_BYTES;
                while at + 4 <= body.len() {
                    let alen = u16_at(body, at).unwrap_or(0) as usize;
                    let atype = u16_at(body, at + 2).unwrap_or(0);
                    if alen < 4 || at + alen > body.len() {
                        return Err(malformed("attribute length"));
                    }
                    if atype == UNIX_DIAG_VFS && alen >= 12 {
                        let ino = u32_at(body, at + 4).ok_or_else(|| malformed("vfs"))?;
                        let dev = u32_at(body, at + 8).ok_or_else(|| malformed("vfs"))?;
                        each(dev, ino);
                    }
                    at += align4(alen);
                }
            }
            _ => {}
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_bound_listener_is_listed_and_a_dead_file_is_not() {
        let dir = std::env::temp_dir().join(format!("kvmi-relay-diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live_path = dir.join("live.sock");
        let dead_path = dir.join("dead.sock");
        let _ = std::fs::remove_file(&live_path);
        let _ = std::fs::remove_file(&dead_path);
        let live = std::os::unix::net::UnixListener::bind(&live_path).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&dead_path).unwrap());
        let m = std::fs::metadata(&live_path).unwrap();
        assert!(is_listening(m.dev(), m.ino()).unwrap(), "a listener bound to the file");
        let m = std::fs::metadata(&dead_path).unwrap();
        assert!(!is_listening(m.dev(), m.ino()).unwrap(), "the file of a closed listener");
        drop(live);
        let m = std::fs::metadata(&live_path).unwrap();
        assert!(!is_listening(m.dev(), m.ino()).unwrap(), "closed since");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_answer_is_an_error_not_a_verdict() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&64u32.to_ne_bytes()); // claims 64 bytes, 8 present
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        assert!(parse(&msg, &mut |_, _| {}).is_err());
    }
}
