//! The test plays the service manager for real: it binds the NOTIFY_SOCKET datagram socket and
//! reads what the relay says (READY=1, STATUS=, WATCHDOG=1, STOPPING=1), and it passes a
//! listening socket it created as fd 3 with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, as systemd
//! does for kvmi-relay@.socket.

mod util;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use util::*;

/// First fd of socket activation (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;
/// WATCHDOG_USEC given to the relay: it must ping every half of it.
const WATCHDOG_USEC: u64 = 200_000;

/// The service manager's end of NOTIFY_SOCKET.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Manager { socket, path, seen: Vec::new() }
    }

    /// Reads datagrams until one satisfies `pred`, returning it (panics after `patience`).
    fn until(&mut self, what: &str, patience: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(m) = self.recv() {
                if pred(&m) {
                    return m;
                }
            }
            assert!(Instant::now() < deadline, "no {what} within {patience:?}; got {:?}", self.seen);
        }
    }

    /// Collects every datagram arriving during `window`.
    fn during(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv() {
                got.push(m);
            }
        }
        got
    }

    fn recv(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                Some(m)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("recv on NOTIFY_SOCKET: {e}"),
        }
    }
}

fn has_line(datagram: &str, line: &str) -> bool {
    datagram.lines().any(|l| l == line)
}

fn status_of(datagram: &str) -> Option<&str> {
    datagram.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// An echo server standing in for the introspector, at `dir/target.sock`.
fn echo_target(dir: &Path) -> String {
    let ep = Endpoint::Unix(dir.join("target.sock"));
    let l = net::listen(&ep).unwrap();
    std::thread::spawn(move || {
        while let Ok(s) = net::accept(&l) {
            std::thread::spawn(move || {
                let _ = kvmi_relay_tools::peers::pingpong::echo(&s);
            });
        }
    });
    format!("unix:{}", dir.join("target.sock").display())
}

fn round_trip(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect to the relay's socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("the echo comes back through the relay");
    assert_eq!(&b, b"ping");
    s
}

/// The relay's command with the manager's environment and nothing inherited from ours.
fn relay_cmd(program: &str, m: &Manager) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("KVMI_RELAY_") || k.starts_with("LISTEN_") || k.starts_with("WATCHDOG_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NOTIFY_SOCKET", &m.path).env("WATCHDOG_USEC", WATCHDOG_USEC.to_string());
    cmd
}

/// Makes the child see `fds` as 3, 4, ... (what systemd does for LISTEN_FDS).
fn pass_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and fcntl,
    // which are async-signal-safe; the fds are the test's own listening sockets, open in the
    // parent for the whole spawn, and the child's copies become its own to keep across exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in fds.iter().enumerate() {
                let target = LISTEN_FDS_START + i as RawFd;
                if fd == target {
                    // dup2 onto itself keeps FD_CLOEXEC: clear it so the fd survives exec.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A command that runs the relay with LISTEN_PID set to the relay's own pid: `sh` learns its pid
/// as `$$` and `exec` keeps it, which is how the pid can be known before the process exists.
fn activated_cmd(m: &Manager, fds: Vec<RawFd>, names: &str, args: &[&str]) -> Command {
    let mut cmd = relay_cmd("sh", m);
    cmd.arg("-c").arg("LISTEN_PID=$$ exec \"$0\" \"$@\"").arg(BIN).args(args);
    cmd.env("LISTEN_FDS", fds.len().to_string()).env("LISTEN_FDNAMES", names);
    pass_fds(&mut cmd, fds);
    cmd
}

fn unix(path: &Path) -> String {
    format!("unix:{}", path.display())
}

#[test]
fn ready_comes_once_listening_then_status_on_change_watchdog_and_stopping() {
    let dir = tmpdir();
    let mut m = Manager::new(dir.path());
    let target = echo_target(dir.path());
    let sock = dir.path().join("relay.sock");
    let started = Instant::now();
    let mut relay = Relay::spawn(relay_cmd(BIN, &m).args(["--listen", &unix(&sock), "--connect", &target]));

    let ready = m.until("READY=1", Duration::from_secs(10), |d| has_line(d, "READY=1"));
    let ready_ms = started.elapsed().as_millis();
    // READY=1 is the first thing said, and by then the socket is there and serves.
    assert_eq!(m.seen.len(), 1, "READY=1 must come first: {:?}", m.seen);
    assert_eq!(status_of(&ready), Some("0/1 sessions live; 0 admitted, 0 refused since start"));
    let client = round_trip(&sock);
    let live = m.until("STATUS with one live session", Duration::from_secs(5), |d| {
        status_of(d).is_some_and(|s| s.starts_with("1/1 sessions live"))
    });
    assert_eq!(status_of(&live), Some("1/1 sessions live; 1 admitted, 0 refused since start"));
    drop(client);
    m.until("STATUS back to none live", Duration::from_secs(5), |d| {
        status_of(d) == Some("0/1 sessions live; 1 admitted, 0 refused since start")
    });

    // Idle: the watchdog keeps coming every WATCHDOG_USEC/2, the status is not repeated.
    let window = Duration::from_millis(1000);
    let idle = m.during(window);
    let pings = idle.iter().filter(|d| has_line(d, "WATCHDOG=1")).count();
    let expected = (window.as_micros() as u64 / (WATCHDOG_USEC / 2)) as usize;
    assert!(pings + 2 >= expected && pings <= expected + 1, "{pings} pings in {window:?}, expected ~{expected}");
    assert!(idle.iter().all(|d| status_of(d).is_none()), "STATUS repeated while nothing changed: {idle:?}");

    relay.signal(nix::sys::signal::Signal::SIGTERM);
    m.until("STOPPING=1", Duration::from_secs(5), |d| has_line(d, "STOPPING=1"));
    let (st, log) = relay.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}\n{log}");
    assert!(!sock.exists(), "a socket the relay bound itself is removed on exit");
    eprintln!("READY=1 after {ready_ms} ms; {pings} watchdog pings in {window:?}");
}

#[test]
fn inherited_socket_is_served_never_rebound_nor_removed_and_survives_a_restart() {
    let dir = tmpdir();
    let mut m = Manager::new(dir.path());
    let target = echo_target(dir.path());
    let sock = dir.path().join("one-7.sock");
    let held = UnixListener::bind(&sock).expect("the manager's listening socket");
    let inode = std::fs::metadata(&sock).unwrap().ino();
    let files_before = listing(dir.path());
    let args = ["--listen", &unix(&sock), "--connect", &target];
    let name = "kvmi-relay@one-7.socket";

    let mut relay = Relay::spawn(&mut activated_cmd(&m, vec![held.as_raw_fd()], name, &args));
    m.until("READY=1", Duration::from_secs(10), |d| has_line(d, "READY=1"));
    drop(round_trip(&sock));
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), inode, "the socket file was replaced");
    assert_eq!(listing(dir.path()), files_before, "the relay created a file");

    relay.signal(nix::sys::signal::Signal::SIGTERM);
    m.until("STOPPING=1", Duration::from_secs(5), |d| has_line(d, "STOPPING=1"));
    let (st, log) = relay.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}\n{log}");
    assert!(log.contains(name), "the log names the socket unit's fd:\n{log}");
    assert_eq!(std::fs::metadata(&sock).map(|m| m.ino()).ok(), Some(inode), "the relay removed the socket file");

    // While no relay runs, QEMU dials (reconnect=N): the manager's socket queues it, and the
    // next relay serves that very connection.
    let mut early = UnixStream::connect(&sock).expect("the held socket still takes connections");
    early.write_all(b"ping").unwrap();
    let relay = Relay::spawn(&mut activated_cmd(&m, vec![held.as_raw_fd()], name, &args));
    early.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4];
    early.read_exact(&mut b).expect("the connection made during the restart is served");
    assert_eq!(&b, b"ping");
    drop(early);
    let (st, log) = relay.stop();
    assert!(st.success(), "{st}\n{log}");
}

#[test]
fn inherited_socket_other_than_listen_is_refused_naming_both() {
    let dir = tmpdir();
    let m = Manager::new(dir.path());
    let held = UnixListener::bind(dir.path().join("a.sock")).unwrap();
    let want = dir.path().join("b.sock");
    let out = activated_cmd(
        &m,
        vec![held.as_raw_fd()],
        "kvmi-relay@a.socket",
        &["--listen", &unix(&want), "--connect", "unix:/nonexistent/target"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--listen") && err.contains("KVMI_RELAY_LISTEN"), "{err}");
    assert!(err.contains("kvmi-relay@a.socket") && err.contains("a.sock"), "{err}");
    assert!(!want.exists(), "nothing may be bound when the handed-over socket is refused");
}

#[test]
fn more_than_one_inherited_socket_is_refused() {
    let dir = tmpdir();
    let m = Manager::new(dir.path());
    let a = UnixListener::bind(dir.path().join("a.sock")).unwrap();
    let b = UnixListener::bind(dir.path().join("b.sock")).unwrap();
    let out = activated_cmd(
        &m,
        vec![a.as_raw_fd(), b.as_raw_fd()],
        "x.socket:y.socket",
        &["--listen", &unix(&dir.path().join("a.sock")), "--connect", "unix:/nonexistent/target"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("passed 2 sockets"), "{err}");
}

#[test]
fn listen_fds_meant_for_another_pid_are_ignored() {
    let dir = tmpdir();
    let mut m = Manager::new(dir.path());
    let target = echo_target(dir.path());
    let other = UnixListener::bind(dir.path().join("other.sock")).unwrap();
    let own = dir.path().join("own.sock");
    let mut cmd = relay_cmd(BIN, &m);
    cmd.args(["--listen", &unix(&own), "--connect", &target]).env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    pass_fds(&mut cmd, vec![other.as_raw_fd()]);
    let relay = Relay::spawn(&mut cmd);
    m.until("READY=1", Duration::from_secs(10), |d| has_line(d, "READY=1"));
    drop(round_trip(&own));
    let (st, log) = relay.stop();
    assert!(st.success(), "{st}\n{log}");
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}
