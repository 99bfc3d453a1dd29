//! The contenders as processes: how each one is started for a hop, how we know it listens, and
//! what /proc says about the CPU and memory it used.
//!
//! Invariants:
//! - No probe connection ever reaches a contender: readiness is read from /proc/net (a probe
//!   would be relayed on and meet the benchmark's server).
//! - socat serves each session in a forked child; its CPU reaches the parent's cutime/cstime only
//!   once the parent has reaped the child, so `settle` waits for that before CPU is read.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;
use socket2::Socket;

use crate::pki::Files;

pub const PROXYD: &str = "/lib/systemd/systemd-socket-proxyd";
pub const STUNNEL: &str = "/usr/bin/stunnel4";
/// Longest wait for a contender to listen before the bench gives up on it.
const READY_TIMEOUT_MS: u64 = 5000;

/// What stands between the client and the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// No relay: the physical floor.
    Direct,
    /// kvmi-relay with these extra flags; `bin` replaces `--relay` (another build to compare).
    Relay { flags: Vec<String>, bin: Option<PathBuf> },
    /// socat as KVMIveggur ran it (`nodelay: false`), or with TCP_NODELAY on its TCP sockets.
    Socat { nodelay: bool },
    /// The harness itself as a blocking read/write loop (`copy-loop`): the cost floor of any
    /// copying relay (see copyloop.rs).
    CopyLoop,
    /// systemd-socket-proxyd, handed its listening socket as systemd would (LISTEN_FDS).
    Proxyd,
    /// stunnel4 (Debian's), one process per hop from a config file: TLS on its TCP side only,
    /// so it runs in the chain with `Tls` files and nowhere else.
    Stunnel,
}

#[derive(Debug, Clone)]
pub struct Contender {
    pub name: String,
    pub kind: Kind,
    /// Takes part in the bulk workloads too (the poll-window variants only matter for latency).
    pub bulk: bool,
    /// Takes part in the KVMi workloads only (passive and active VMI): a relay with `--kvmi`
    /// (ping-pong and bulk bytes are not KVMi and it refuses them at the handshake), or the
    /// transparent relay's second run that is its yardstick.
    pub kvmi: bool,
    /// The link between its hops is mutual TLS 1.3 with verification on both sides: it runs in
    /// the chain only, where that link is TCP (kvmi-relay's `--tls-*`, socat's OPENSSL, stunnel).
    pub tls: bool,
    /// Carries each direction's end on its own (a half-close): needed for bulk both ways, where
    /// one direction ends while the other still moves. Not stunnel: it ended a connection with
    /// 200 KB of one direction undelivered (EOF after 268235840 of 268435456 bytes) when the
    /// other direction's end reached it first, and a contender that loses bytes has no
    /// throughput to report (docs/BENCHMARKS.md, "Mutual TLS between the relays").
    pub half_close: bool,
}

impl Contender {
    /// Whether this contender runs workload `w`.
    pub fn runs(&self, w: crate::work::Workload) -> bool {
        (!w.is_bulk() || self.bulk)
            && (!self.kvmi || w.is_kvmi())
            && (w != crate::work::Workload::BulkBoth || self.half_close)
    }

    /// Whether this contender runs in topology `t`.
    pub fn serves(&self, t: crate::Topology) -> bool {
        !self.tls || t == crate::Topology::Chain
    }
}

/// One running hop process.
pub struct Hop {
    pub child: Child,
    /// Serves each connection on a thread that exits with it (stunnel): its CPU survives only
    /// in the process's totals (clock ticks), not in the live threads' schedstat.
    threads_exit: bool,
    /// Kept open in the bench only so proxyd's inherited copy is the one that matters.
    _listener: Option<Socket>,
}

impl Drop for Hop {
    fn drop(&mut self) {
        // SIGKILL, as KVMIveggur tore socat down; the bench has nothing to drain.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins every thread `pid` has now to `cpu` (`--pin`); threads and children made later inherit
/// the mask of the thread that makes them.
pub fn pin_process(pid: u32, cpu: usize) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("--pin: CPU {cpu}: {e}"))?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("--pin: threads of {pid}: {e}"))?;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
            .map_err(|e| format!("--pin: pin thread {tid} of {pid} to CPU {cpu}: {e}"))?;
    }
    Ok(())
}

/// Starts one hop of `kind` listening on `listen` and dialling `connect`; with `tls`, its TCP
/// side (the one of the two that is TCP) speaks mutual TLS with those files.
pub fn spawn_hop(
    kind: &Kind,
    relay_bin: &Path,
    listen: &Endpoint,
    connect: &Endpoint,
    log: &Path,
    tls: Option<&Files>,
) -> Result<Hop, String> {
    spawn_hop_with_env(kind, relay_bin, listen, connect, log, tls, &[])
}

/// `spawn_hop` with extra environment variables (the fleet's relays get what their unit sets).
pub fn spawn_hop_with_env(
    kind: &Kind,
    relay_bin: &Path,
    listen: &Endpoint,
    connect: &Endpoint,
    log: &Path,
    tls: Option<&Files>,
    env: &[(String, String)],
) -> Result<Hop, String> {
    if tls.is_some() && !matches!(kind, Kind::Relay { .. } | Kind::Socat { .. } | Kind::Stunnel) {
        return Err(format!("{kind:?} has no TLS form"));
    }
    let tcp_sides = [listen, connect].iter().filter(|e| matches!(e, Endpoint::Tcp(_))).count();
    if tls.is_some() && tcp_sides != 1 {
        return Err(format!("a TLS hop needs one TCP side, not {tcp_sides} ({listen} → {connect})"));
    }
    let err = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let mut listener = None;
    let mut cmd = match kind {
        Kind::Direct => return Err("direct has no hop".into()),
        Kind::Relay { flags, bin } => {
            let mut c = Command::new(bin.as_deref().unwrap_or(relay_bin));
            c.arg(format!("--listen={listen}")).arg(format!("--connect={connect}")).arg("--log-level=warn");
            // Sessions run one after another, but the relay may see a session's last close a
            // moment after the harness's next client connects; with the default --max-conns 1
            // that client would be refused (seen when one contender runs alone, back to back).
            c.arg("--max-conns=4");
            if matches!(listen, Endpoint::Tcp(_)) {
                c.arg("--allow-ip=127.0.0.1/32");
            }
            if let Some(f) = tls {
                c.arg(format!("--tls-cert={}", f.cert.display()))
                    .arg(format!("--tls-key={}", f.key.display()))
                    .arg(format!("--tls-ca={}", f.ca.display()));
            }
            c.args(flags.iter().filter(|f| !f.starts_with('@')));
            c
        }
        Kind::Socat { nodelay } => {
            let nd = if *nodelay { ",nodelay" } else { "" };
            // OPENSSL with verify=1: the listener requires and checks the client's certificate,
            // the dialler checks the server's against the CA and the dialled address.
            let ossl = tls.map(|f| {
                format!(",cert={},key={},cafile={},verify=1", f.cert.display(), f.key.display(), f.ca.display())
            });
            let l = match (listen, &ossl) {
                (Endpoint::Unix(p), _) => format!("UNIX-LISTEN:{},unlink-early,fork", p.display()),
                (Endpoint::Tcp(a), None) => format!("TCP-LISTEN:{},bind={},reuseaddr,fork{nd}", a.port(), a.ip()),
                (Endpoint::Tcp(a), Some(o)) => {
                    format!("OPENSSL-LISTEN:{},bind={},reuseaddr,fork{nd}{o}", a.port(), a.ip())
                }
                (Endpoint::Vsock { .. }, _) => return Err("no vsock on the host".into()),
            };
            // KVMIveggur wrote `TCP:ip:port,fork,end-close`. The `fork` there makes socat 1.7.4
            // re-dial the monitor again and again after a session ends (each new connection sees
            // the finished UNIX side at EOF and closes, and the child dials once more) until a
            // connect fails: a stream of empty connections that would be taken for the next
            // session here. The bytes move in the same transfer loop without it, so it is left out.
            let c = match (connect, &ossl) {
                (Endpoint::Unix(p), _) => format!("UNIX-CONNECT:{}", p.display()),
                (Endpoint::Tcp(a), None) => format!("TCP:{}:{},end-close{nd}", a.ip(), a.port()),
                (Endpoint::Tcp(a), Some(o)) => format!("OPENSSL:{}:{}{nd}{o}", a.ip(), a.port()),
                (Endpoint::Vsock { .. }, _) => return Err("no vsock on the host".into()),
            };
            let mut cmd = Command::new("socat");
            cmd.arg(l).arg(c);
            cmd
        }
        Kind::CopyLoop => {
            let me = std::env::current_exe().map_err(|e| format!("find the harness binary: {e}"))?;
            let mut c = Command::new(me);
            c.arg("copy-loop").arg(listen.to_string()).arg(connect.to_string());
            c
        }
        Kind::Proxyd => {
            let sock = net::listen(listen).map_err(|e| format!("listen {listen} for proxyd: {e}"))?;
            let target = match connect {
                Endpoint::Unix(p) => p.display().to_string(),
                Endpoint::Tcp(a) => a.to_string(),
                Endpoint::Vsock { .. } => return Err("no vsock on the host".into()),
            };
            // sd_listen_fds() wants LISTEN_PID to be its own pid: let the shell set it and exec.
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(format!("LISTEN_FDS=1 LISTEN_PID=$$ exec {PROXYD} \"$0\"")).arg(target);
            let fd: RawFd = sock.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open in the parent (owned
            // by `sock`, kept in the Hop) until after the spawn returns. dup2 onto itself keeps
            // FD_CLOEXEC, hence the explicit clear.
            unsafe {
                c.pre_exec(move || {
                    let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
                    if ok < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
                });
            }
            listener = Some(sock);
            c
        }
        Kind::Stunnel => {
            let f = tls.ok_or("stunnel runs only with TLS files")?;
            let conf = log.with_extension("conf");
            std::fs::write(&conf, stunnel_conf(listen, connect, f)?)
                .map_err(|e| format!("write {}: {e}", conf.display()))?;
            let mut c = Command::new(STUNNEL);
            c.arg(&conf);
            c
        }
    };
    die_with_harness(&mut cmd);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {kind:?}: {e}"))?;
    let mut hop = Hop { child, threads_exit: *kind == Kind::Stunnel, _listener: listener };
    wait_listening(listen, &mut hop.child)?;
    if let Kind::Relay { flags, .. } = kind {
        for f in flags.iter().filter(|f| f.starts_with('@')) {
            set_scheduling(hop.child.id(), f)?;
        }
    }
    Ok(hop)
}

/// One stunnel hop: in the foreground (so the Hop's kill ends it), TLS 1.3 only, the peer's
/// chain verified both ways and, on the dialling side, the dialled address checked against the
/// server's certificate; TCP_NODELAY on both sockets, as Debian's example configuration sets it.
fn stunnel_conf(listen: &Endpoint, connect: &Endpoint, f: &Files) -> Result<String, String> {
    let addr = |e: &Endpoint| match e {
        Endpoint::Unix(p) => Ok(p.display().to_string()),
        Endpoint::Tcp(a) => Ok(a.to_string()),
        Endpoint::Vsock { .. } => Err("no vsock on the host".to_string()),
    };
    let client = matches!(connect, Endpoint::Tcp(_));
    let mut conf = format!(
        "foreground = yes\npid =\ndebug = warning\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\n[hop]\n\
         client = {}\naccept = {}\nconnect = {}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\n",
        if client { "yes" } else { "no" },
        addr(listen)?,
        addr(connect)?,
        f.cert.display(),
        f.key.display(),
        f.ca.display()
    );
    if let Endpoint::Tcp(a) = connect {
        conf.push_str(&format!("checkIP = {}\n", a.ip()));
    }
    Ok(conf)
}

/// The scheduling attributes a unit (or the relay itself) could give, set from outside on every
/// thread of `pid`: `@nice=N` (`Nice=`), `@fifo=PRIO` (`CPUSchedulingPolicy=fifo`,
/// `CPUSchedulingPriority=`), `@slice-us=N` (EEVDF's custom slice, `sched_setattr` with
/// `sched_runtime` on a normal task; Linux 6.12 and later clamp it to 0.1–100 ms), `@cpu=N`
/// (`CPUAffinity=N`: the relay's threads pinned to CPU N).
pub fn set_scheduling(pid: u32, flag: &str) -> Result<(), String> {
    let (what, value) = flag[1..].split_once('=').ok_or_else(|| format!("{flag}: expected @WHAT=N"))?;
    let v: i64 = value.parse().map_err(|e| format!("{flag}: {e}"))?;
    if what == "cpu" {
        // CPUAffinity= in the unit: every instance's relay on one (housekeeping) CPU.
        let cpu = usize::try_from(v).map_err(|_| format!("{flag}: not a CPU number"))?;
        return pin_process(pid, cpu);
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{flag}: threads of {pid}: {e}"))?;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let mut attr = SchedAttr { size: std::mem::size_of::<SchedAttr>() as u32, ..SchedAttr::default() };
        match what {
            "nice" => attr.nice = v as i32,
            "fifo" => {
                attr.policy = libc::SCHED_FIFO as u32;
                attr.priority = v as u32;
            }
            "slice-us" => attr.runtime_ns = (v as u64) * 1000,
            _ => return Err(format!("{flag}: one of @nice=, @fifo=, @slice-us=, @cpu=")),
        }
        // SAFETY: sched_setattr reads `attr`, a live, fully initialised struct of the size it is
        // told; it touches no memory of ours beyond that.
        let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0u32) };
        if rc != 0 {
            return Err(format!("{flag}: sched_setattr on thread {tid}: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `struct sched_attr` (sched_setattr(2)), version 1.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime_ns: u64,
    deadline_ns: u64,
    period_ns: u64,
    util_min: u32,
    util_max: u32,
}

/// Makes a hop or a `--load` process die with the harness (PR_SET_PDEATHSIG), so that a harness
/// killed by SIGKILL or a crash leaves no relay or socat behind listening on its sockets and no
/// CPU spinning; `Hop`'s and `Load`'s drops cover every other exit. The signal follows the
/// thread that forks, so these are started from the main thread only, which lives as long as
/// the harness. (Not for the start-up measurement: a pre_exec hook
/// turns the spawn into a full fork, whose time that measurement would include.)
fn die_with_harness(cmd: &mut Command) {
    let harness = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The harness died between the fork and the prctl: the signal will never come.
            if libc::getppid() != harness {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Waits until something listens on `ep`, judged from /proc/net (no probe connection).
pub fn wait_listening(ep: &Endpoint, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        if is_listening(ep) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("contender for {ep} exited before listening ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {ep} after {READY_TIMEOUT_MS} ms"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn is_listening(ep: &Endpoint) -> bool {
    match ep {
        Endpoint::Unix(p) => {
            // Columns: Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
            let want = p.display().to_string();
            std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
                t.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() >= 8 && f[3] == "00010000" && f[7] == want
                })
            })
        }
        Endpoint::Tcp(a) => {
            let file = if a.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
            let port = format!(":{:04X}", a.port());
            std::fs::read_to_string(file).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&port) && f[3] == "0A"
                })
            })
        }
        Endpoint::Vsock { .. } => false,
    }
}

/// Children of `pid` (socat's per-session forks).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|t| t.split_whitespace().filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default()
}

/// CPU seconds `pid` has used: its live threads' run time from /proc/PID/task/*/schedstat
/// (nanoseconds), plus its reaped children's cutime + cstime (clock ticks: the only record an
/// exited socat fork leaves).
pub fn cpu_seconds(pid: u32) -> f64 {
    let own_ns: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // cutime and cstime: the reaped children's CPU.
    own_ns as f64 / 1e9 + stat_ticks(pid, 16..18) as f64 / clock_ticks_per_s()
}

/// The sum of /proc/PID/stat's fields `fields` (numbered from 1 as in proc(5)), in clock ticks;
/// 0 for a process that is gone.
fn stat_ticks(pid: u32, fields: std::ops::Range<usize>) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name may hold spaces; the fields after its closing paren are well formed.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0 };
    // `rest` starts at field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    fields.filter_map(|n| f.get(n - 3)?.parse::<u64>().ok()).sum()
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory effects; it only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Peak resident set (VmHWM) of `pid` since it started or since `reset_peak_rss`, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Largest peak RSS among the hops and their live children during the session now open (read
/// before it closes: socat's fork takes its figure with it when it exits).
pub fn serving_peak_rss_kib(hops: &[Hop]) -> u64 {
    hops.iter()
        .flat_map(|h| {
            let pid = h.child.id();
            std::iter::once(pid).chain(children(pid))
        })
        .map(peak_rss_kib)
        .max()
        .unwrap_or(0)
}

/// Starts a new peak for every hop process: writing 5 to /proc/PID/clear_refs sets VmHWM to
/// the current RSS (proc(5)), so the next reading is the peak of the session about to run, not
/// of the process's whole life (an earlier bulk workload's buffers would otherwise stay in it).
pub fn reset_peak_rss(hops: &[Hop]) -> Result<(), String> {
    for h in hops {
        let path = format!("/proc/{}/clear_refs", h.child.id());
        std::fs::write(&path, "5").map_err(|e| format!("reset the peak RSS through {path}: {e}"))?;
    }
    Ok(())
}

/// Waits (up to a second) until no hop has a live child, so that CPU reads include every session.
pub fn settle(hops: &[Hop]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while hops.iter().any(|h| !children(h.child.id()).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// What the scheduler says about the live threads of `pid` (/proc/PID/task/*/schedstat): time
/// spent runnable but waiting for a CPU (run delay, ns) and times scheduled in. Exited children
/// (socat's forks) leave no trace here.
pub fn sched_wait(pid: u32) -> (u64, u64) {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| {
                    let mut f = s.split_whitespace().skip(1).map(|w| w.parse::<u64>().ok());
                    Some((f.next()??, f.next()??))
                })
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
        .unwrap_or((0, 0))
}

/// `sched_wait` over every hop: (run delay s, times scheduled in).
pub fn total_sched_wait(hops: &[Hop]) -> (f64, u64) {
    hops.iter().map(|h| sched_wait(h.child.id())).fold((0.0, 0), |a, b| (a.0 + b.0 as f64 / 1e9, a.1 + b.1))
}

pub fn total_cpu_seconds(hops: &[Hop]) -> f64 {
    hops.iter().map(|h| if h.threads_exit { cpu_seconds_ticks(h.child.id()) } else { cpu_seconds(h.child.id()) }).sum()
}

/// CPU seconds of `pid` from /proc/PID/stat alone (utime, stime, cutime, cstime): in clock
/// ticks, but with the threads that have exited.
pub fn cpu_seconds_ticks(pid: u32) -> f64 {
    // utime, stime, cutime, cstime.
    stat_ticks(pid, 14..18) as f64 / clock_ticks_per_s()
}

/// Time from spawning `kind` until a UNIX connect to its listener succeeds, `reps` times.
pub fn startup_times(kind: &Kind, relay_bin: &Path, dir: &Path, reps: usize) -> Result<Vec<Duration>, String> {
    let listen_path: PathBuf = dir.join("startup.sock");
    let target = Endpoint::Unix(dir.join("startup-target.sock"));
    let _target_listener = net::listen(&target).map_err(|e| format!("listen {target}: {e}"))?;
    let listen = Endpoint::Unix(listen_path.clone());
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let _ = std::fs::remove_file(&listen_path);
        let log = dir.join("startup.log");
        let err = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let mut cmd = match kind {
            Kind::Relay { flags, bin } => {
                let mut c = Command::new(bin.as_deref().unwrap_or(relay_bin));
                c.arg(format!("--listen={listen}"))
                    .arg(format!("--connect={target}"))
                    .arg("--log-level=warn")
                    .args(flags);
                c
            }
            Kind::Socat { .. } => {
                let mut c = Command::new("socat");
                c.arg(format!("UNIX-LISTEN:{},unlink-early,fork", listen_path.display()))
                    .arg(format!("UNIX-CONNECT:{}", dir.join("startup-target.sock").display()));
                c
            }
            _ => return Err("startup time is measured for kvmi-relay and socat only".into()),
        };
        let t0 = Instant::now();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().map_err(|e| e.to_string())?;
        let mut hop = Hop { child, threads_exit: false, _listener: None };
        let took = loop {
            if net::connect(&listen).is_ok() {
                break t0.elapsed();
            }
            if let Ok(Some(status)) = hop.child.try_wait() {
                return Err(format!("{kind:?} exited during start-up ({status})"));
            }
            if t0.elapsed() > Duration::from_millis(READY_TIMEOUT_MS) {
                return Err(format!("{kind:?} did not accept within {READY_TIMEOUT_MS} ms"));
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        out.push(took);
        drop(hop);
    }
    Ok(out)
}

/// `--load N`: N copies of this binary spinning (`hog`) for the whole run, the way a loaded
/// host's guest vCPUs keep its CPUs busy. Killed when dropped; each also dies with the harness.
pub struct Load(Vec<Child>);

impl Load {
    /// CPU seconds the busy processes have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.0.iter().map(|c| cpu_seconds(c.id())).sum()
    }

    pub fn start(n: usize) -> Result<Load, String> {
        let exe = std::env::current_exe().map_err(|e| format!("--load: find this binary: {e}"))?;
        let mut hogs = Load(Vec::new());
        for _ in 0..n {
            let mut cmd = Command::new(&exe);
            cmd.arg("hog").stdin(Stdio::null()).stdout(Stdio::null());
            die_with_harness(&mut cmd);
            let child = cmd.spawn().map_err(|e| format!("--load: start a busy process: {e}"))?;
            hogs.0.push(child);
        }
        Ok(hogs)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The body of one `--load` process: spin until killed (by `Load`'s drop, or with the harness).
pub fn hog() -> ! {
    loop {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `@cpu=N` pins every thread of a live process, as `CPUAffinity=N` would; a word that is not
    /// one of the attributes is refused by name.
    #[test]
    fn at_cpu_pins_a_process_and_unknown_attributes_are_refused() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("start sleep");
        let pid = child.id();
        let result = set_scheduling(pid, "@cpu=0");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let bad = set_scheduling(pid, "@cpus=0");
        let _ = child.kill();
        let _ = child.wait();
        result.expect("@cpu=0");
        let allowed = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap_or_default();
        assert_eq!(allowed.split_whitespace().nth(1), Some("0"), "{allowed}");
        assert!(bad.expect_err("@cpus accepted").contains("@cpu="));
    }
}
