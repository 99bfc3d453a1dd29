//! Who gets in, against real sockets: SO_PEERCRED on UNIX (a client really running as another
//! uid), source addresses on TCP (127.0.0.2 vs 127.0.0.3, and the same through a dual-stack
//! listener as ::ffff:127.0.0.3), --max-conns, the socket file's mode and group, and a peer
//! whose identity cannot be read (SO_PEERCRED failed once by a seccomp filter in the relay).

mod util;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use util::*;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// A directory others may traverse, so that a client running as nobody reaches the socket and
/// the relay's own peer check is what stops it.
fn open_dir() -> tempfile::TempDir {
    let d = tmpdir();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn as_nobody(args: &[&str]) -> (i32, String) {
    let out = Command::new(tools()).args(args).uid(NOBODY).gid(NOGROUP).output().expect("run client as nobody");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn echo_once(ep: &Endpoint) -> Vec<u8> {
    let s = net::connect(ep).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    (&s).read_exact(&mut b).unwrap();
    b.to_vec()
}

#[test]
fn unix_peer_under_another_uid_is_refused_by_peer_credentials() {
    let d = open_dir();
    let echo = echo_server(d.path());
    let relay_ep = format!("unix:{}", d.path().join("relay.sock").display());
    // The group lets nobody open the socket file; only SO_PEERCRED can stop it.
    let mut relay =
        Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={echo}"), "--socket-group=nogroup"]);
    let (code, out) = as_nobody(&["peer", "expect-refused", &format!("--connect={relay_ep}")]);
    assert_eq!(code, 0, "nobody must be refused: {out}\n{}", relay.log());
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("peer=unix pid=") && log.contains("uid=65534 gid=65534"), "{log}");
    // The relay's own uid (root here) is admitted by default.
    assert_eq!(echo_once(&Endpoint::parse(&relay_ep).unwrap()), b"ping");
}

#[test]
fn allow_gid_admits_a_member_of_the_group() {
    let d = open_dir();
    let echo = echo_server(d.path());
    let relay_ep = format!("unix:{}", d.path().join("relay.sock").display());
    let relay = Relay::start(&[
        &format!("--listen={relay_ep}"),
        &format!("--connect={echo}"),
        "--socket-group=nogroup",
        "--allow-gid=nogroup",
    ]);
    let (code, out) = as_nobody(&["peer", "pingpong", &format!("--connect={relay_ep}"), "--count=10"]);
    assert_eq!(code, 0, "nogroup member must be admitted: {out}\n{}", relay.log());
    assert!(out.starts_with("pingpong ok"), "{out}");
}

#[test]
fn tcp_allow_list_admits_127_0_0_2_and_refuses_127_0_0_3() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let mut relay =
        Relay::start(&["--listen=tcp:127.0.0.1:0", "--allow-ip=127.0.0.2/32", &format!("--connect={echo}")]);
    let to = relay.bound_tcp();

    let ok = tcp_from("127.0.0.2", to).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&ok).write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    (&ok).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    drop(ok);
    relay.wait_log("closed", Duration::from_secs(5));

    let bad = tcp_from("127.0.0.3", to).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = (&bad).write_all(b"ping");
    let mut b = [0u8; 4];
    assert_eq!((&bad).read(&mut b).unwrap_or(0), 0, "127.0.0.3 must get nothing back");
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("peer=tcp 127.0.0.3:"), "{log}");
    // Exactly one session was ever dialled onward: the refused peer never reached the far side.
    assert_eq!(log.matches("admitted; dialling").count(), 1, "{log}");
}

#[test]
fn mapped_ipv4_on_a_dual_stack_listener_is_judged_as_ipv4() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let mut relay = Relay::start(&["--listen=tcp:[::]:0", "--allow-ip=127.0.0.2/32", &format!("--connect={echo}")]);
    let to = format!("127.0.0.1:{}", relay.bound_tcp().port()).parse().unwrap();
    let bad = tcp_from("127.0.0.3", to).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = (&bad).write_all(b"x");
    let mut b = [0u8; 1];
    assert_eq!((&bad).read(&mut b).unwrap_or(0), 0);
    let log = relay.wait_log("refused", Duration::from_secs(5));
    assert!(log.contains("::ffff:127.0.0.3"), "the dual-stack listener saw a mapped address: {log}");

    let ok = tcp_from("127.0.0.2", to).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&ok).write_all(b"y").unwrap();
    (&ok).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y", "::ffff:127.0.0.2 is 127.0.0.2 and must be admitted");
}

#[test]
fn second_session_over_max_conns_is_refused_and_the_first_is_undisturbed() {
    let d = tmpdir();
    let echo = echo_server(d.path());
    let relay_ep = Endpoint::Unix(d.path().join("relay.sock"));
    let mut relay = Relay::start(&[&format!("--listen={relay_ep}"), &format!("--connect={echo}")]);
    let first = net::connect(&relay_ep).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&first).write_all(b"one").unwrap();
    let mut b = [0u8; 3];
    (&first).read_exact(&mut b).unwrap();

    kvmi_relay_tools::peers::cli::expect_refused(&relay_ep).expect("one session more than --max-conns must be refused");
    let log = relay.wait_log("--max-conns", Duration::from_secs(5));
    assert!(log.contains("refused"), "{log}");

    // The session already running still works...
    (&first).write_all(b"two").unwrap();
    (&first).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");
    drop(first);
    relay.wait_log("closed", Duration::from_secs(5));
    // ...and once it ended, a new one is admitted (QEMU reconnecting after a migration).
    assert_eq!(echo_once(&relay_ep), b"ping");
}

#[test]
fn socket_file_gets_the_operators_mode_and_group() {
    let d = tmpdir();
    let p = d.path().join("relay.sock");
    let relay = Relay::start(&[
        &format!("--listen=unix:{}", p.display()),
        "--connect=unix:/nonexistent",
        "--socket-mode=0640",
        "--socket-group=nogroup",
    ]);
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.gid(), NOGROUP);
    let (st, _) = relay.stop();
    assert!(st.success());
    assert!(!p.exists(), "removed on clean exit");

    let q = d.path().join("default.sock");
    let relay = Relay::start(&[&format!("--listen=unix:{}", q.display()), "--connect=unix:/nonexistent"]);
    assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o777, 0o660, "default mode is 0660");
    drop(relay);
}

/// The kernel's SO_PEERCRED answer, failed once on purpose: a seccomp filter installed in the
/// relay before exec hands every `getsockopt(SOL_SOCKET, SO_PEERCRED)` to this test (a user
/// notification), which fails the first with ENOTCONN and lets the later ones run.
mod peercred_once {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Where the child keeps the notification fd across exec, for the test to take.
    pub const NOTIFY_FD: RawFd = 200;

    #[repr(C)]
    struct SeccompData {
        nr: i32,
        arch: u32,
        instruction_pointer: u64,
        args: [u64; 6],
    }
    #[repr(C)]
    struct Notif {
        id: u64,
        pid: u32,
        flags: u32,
        data: SeccompData,
    }
    #[repr(C)]
    struct NotifResp {
        id: u64,
        val: i64,
        error: i32,
        flags: u32,
    }
    const NOTIF_RECV: libc::c_ulong = 0xc050_2100; // _IOWR('!', 0, struct seccomp_notif)
    const NOTIF_SEND: libc::c_ulong = 0xc018_2101; // _IOWR('!', 1, struct seccomp_notif_resp)
    const RET_USER_NOTIF: u32 = 0x7fc0_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const FLAG_NEW_LISTENER: libc::c_ulong = 1 << 3;
    const USER_NOTIF_FLAG_CONTINUE: u32 = 1;

    /// The filter: getsockopt with level SOL_SOCKET and optname SO_PEERCRED goes to the
    /// listener, everything else is allowed. (x86_64 syscall numbers; the test is gated on it.)
    pub fn program() -> Vec<libc::sock_filter> {
        let ld = |k: u32| libc::sock_filter { code: 0x20, jt: 0, jf: 0, k }; // BPF_LD|BPF_W|BPF_ABS
        let jeq = |k: u32, jf: u8| libc::sock_filter { code: 0x15, jt: 0, jf, k }; // BPF_JMP|BPF_JEQ|BPF_K
        let ret = |k: u32| libc::sock_filter { code: 0x06, jt: 0, jf: 0, k }; // BPF_RET|BPF_K
        vec![
            ld(0),                               // nr
            jeq(libc::SYS_getsockopt as u32, 5), // else allow
            ld(16 + 8),                          // args[1], low half: level
            jeq(libc::SOL_SOCKET as u32, 3),     // else allow
            ld(16 + 16),                         // args[2], low half: optname
            jeq(libc::SO_PEERCRED as u32, 1),    // else allow
            ret(RET_USER_NOTIF),
            ret(RET_ALLOW),
        ]
    }

    /// In the forked child before exec: no new privileges, the filter, its listener at
    /// `NOTIFY_FD` without close-on-exec.
    ///
    /// # Safety
    /// Only async-signal-safe calls (prctl, seccomp, dup2); `prog` was built before the fork.
    pub unsafe fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
        let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut _ };
        // SAFETY: plain syscalls on this process; `fprog` points at `prog`, alive for the call.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::syscall(libc::SYS_seccomp, 1 /* SET_MODE_FILTER */, FLAG_NEW_LISTENER, &fprog);
            if fd < 0 || libc::dup2(fd as RawFd, NOTIFY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Takes the listener from process `pid` and answers its notifications from a thread: the
    /// first fails with ENOTCONN, the rest run as asked. Returns (failed, let through).
    pub fn supervise(pid: i32) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        // SAFETY: pidfd_open and pidfd_getfd return new fds this test owns (or -1).
        let fd = unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
            assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
            let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, NOTIFY_FD, 0);
            assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
            libc::close(pidfd as RawFd);
            OwnedFd::from_raw_fd(fd as RawFd)
        };
        let (failed, through) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (f, t) = (failed.clone(), through.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            loop {
                // SAFETY: `req`/`resp` are zeroed structs of the kernel's layout, owned here; the
                // ioctls only read or write them.
                unsafe {
                    let mut req: Notif = std::mem::zeroed();
                    if libc::ioctl(fd.as_raw_fd(), NOTIF_RECV, &mut req) != 0 {
                        return; // the relay is gone
                    }
                    let mut resp = NotifResp { id: req.id, val: 0, error: 0, flags: 0 };
                    if f.load(Ordering::SeqCst) == 0 {
                        resp.error = -libc::ENOTCONN;
                        f.fetch_add(1, Ordering::SeqCst);
                    } else {
                        resp.flags = USER_NOTIF_FLAG_CONTINUE;
                        t.fetch_add(1, Ordering::SeqCst);
                    }
                    libc::ioctl(fd.as_raw_fd(), NOTIF_SEND, &resp);
                }
            }
        });
        (failed, through)
    }
}

/// A peer whose identity cannot be read (SO_PEERCRED fails) is refused alone: logged with the
/// reason, counted, closed; the next peer is admitted and served.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_peer_whose_identity_cannot_be_read_is_refused_alone_and_the_next_is_served() {
    use std::sync::atomic::Ordering;
    let d = tmpdir();
    let echo = echo_server(d.path());
    let listen = Endpoint::Unix(d.path().join("relay.sock"));
    let prog = peercred_once::program();
    let mut cmd = Command::new(BIN);
    cmd.args([format!("--listen={listen}"), format!("--connect={echo}")]);
    // SAFETY: `install` makes only async-signal-safe calls; `prog` lives in the parent, copied
    // into the child by the fork.
    unsafe {
        cmd.pre_exec(move || peercred_once::install(&prog));
    }
    let relay = Relay::start_with(&mut cmd);
    let (failed, through) = peercred_once::supervise(relay.pid());

    let mut first = net::connect(&listen).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    let got = first.read(&mut buf);
    assert!(matches!(got, Ok(0)) || got.is_err(), "the first peer is closed: {got:?}");
    assert_eq!(failed.load(Ordering::SeqCst), 1, "the relay asked for the first peer's identity:\n{}", relay.log());

    let next = net::connect(&listen).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    checked_round_trips(&next, 100, 0);
    drop(next);
    assert!(through.load(Ordering::SeqCst) >= 1);

    let (status, log) = relay.stop();
    assert!(status.success(), "{log}");
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused: cannot read the peer's identity")).collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains("Transport endpoint is not connected"), "the line names the reason: {}", refused[0]);
    let stopped = log.lines().find(|l| l.contains(" stopped ")).expect("a stopped line");
    assert_eq!(
        (field_u64(stopped, "accepted"), field_u64(stopped, "refused_access"), field_u64(stopped, "admitted")),
        (2, 1, 1),
        "{stopped}"
    );
}
