//! Helpers shared by the integration tests: run the real binary, read its log, talk to it over
//! real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kvmi-relay");

/// The test peers, fake KVMi peers, demo and man page: the `kvmi-relay-tools` binary of the
/// `tools/` package, built beside the daemon (same target directory and profile). Cargo builds
/// it with `cargo test` at the top of the workspace, and `make quick`/`make test` build it first;
/// `cargo test -p kvmi-relay` alone does not.
pub fn tools() -> PathBuf {
    let tools = Path::new(BIN).with_file_name("kvmi-relay-tools");
    assert!(
        tools.is_file(),
        "{} not found: the tests run the tools binary beside the daemon; build it with \
         `cargo build --release -p kvmi-relay-tools` (or run `make quick`)",
        tools.display()
    );
    tools
}

/// A relay process whose stderr is collected line by line.
pub struct Relay {
    pub child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay and waits until it logs that it listens.
    pub fn start(args: &[&str]) -> Relay {
        Relay::start_with(Command::new(BIN).args(args))
    }

    pub fn start_with(cmd: &mut Command) -> Relay {
        let mut r = Relay::spawn(cmd);
        r.wait_log("listening", Duration::from_secs(10));
        r
    }

    /// Starts without waiting for anything.
    pub fn spawn(cmd: &mut Command) -> Relay {
        let mut child = cmd
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvmi-relay");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Relay { child, log, reader: Some(reader) }
    }

    /// The TCP address the relay bound (start it with port 0 to avoid port races).
    pub fn bound_tcp(&self) -> SocketAddr {
        let log = self.log();
        let line = log.lines().find(|l| l.contains(" listening ")).expect("listening line");
        let ep = field(line, "bound").expect("bound= field");
        ep.strip_prefix("tcp:").expect("a tcp listener").parse().expect("socket address")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle` (panics with the log after `patience`).
    pub fn wait_log(&mut self, needle: &str, patience: Duration) -> String {
        self.wait_log_count(needle, 1, patience)
    }

    /// Waits until `needle` appears `n` times.
    pub fn wait_log_count(&mut self, needle: &str, n: usize, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Give the reader a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let log = self.log();
                if log.matches(needle).count() >= n {
                    return log;
                }
                panic!("relay exited ({st}) before logging {needle:?} x{n}:\n{log}");
            }
            if Instant::now() > deadline {
                panic!("relay did not log {needle:?} x{n} within {patience:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal relay");
    }

    /// SIGTERM, then waits (at most `patience`) for the exit; returns status and full log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    pub fn wait_exit(&mut self, patience: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + patience;
        let st = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("relay did not exit within {patience:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (st, self.log())
    }

    /// Open fds of the relay process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("read relay fds").count()
    }

    /// User + system CPU time of the relay, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read stat");
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion (for bad-input and `--check` cases).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_remove("RUST_LOG").output().expect("run kvmi-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP listener on an ephemeral port of `ip` (no window for another test to take the port).
pub fn tcp_listener(ip: &str) -> (socket2::Socket, SocketAddr) {
    let l = TcpListener::bind(format!("{ip}:0")).expect("bind an ephemeral port");
    let addr = l.local_addr().unwrap();
    (socket2::Socket::from(std::os::fd::OwnedFd::from(l)), addr)
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kvmi-relay-test-").tempdir().expect("tempdir")
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A field `name=VALUE` from a log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    let rest = &line[at..];
    Some(rest.split_whitespace().next().unwrap_or("").trim_matches('"'))
}

pub fn field_u64(line: &str, name: &str) -> u64 {
    field(line, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {name} in {line}"))
}

/// The session close lines in a log.
pub fn closed_lines(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains(" closed ")).map(str::to_string).collect()
}

/// Dials a TCP address from a chosen source address (127.x.y.z works for allow-list tests).
pub fn tcp_from(source: &str, to: SocketAddr) -> std::io::Result<socket2::Socket> {
    let src: SocketAddr = format!("{source}:0").parse().expect("source address");
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    s.bind(&src.into())?;
    s.connect(&to.into())?;
    Ok(s)
}

/// An echo server on a UNIX socket in `dir`, serving connections (one thread each) until the
/// test ends.
pub fn echo_server(dir: &Path) -> kvmi_relay::net::endpoint::Endpoint {
    let ep = kvmi_relay::net::endpoint::Endpoint::Unix(dir.join("echo.sock"));
    let l = kvmi_relay_tools::peers::net::listen(&ep).unwrap();
    std::thread::spawn(move || {
        while let Ok(s) = kvmi_relay_tools::peers::net::accept(&l) {
            std::thread::spawn(move || {
                let _ = kvmi_relay_tools::peers::pingpong::echo(&s);
            });
        }
    });
    ep
}

/// Writes `bytes` on `from` (from a thread, so the relay's stores may fill) and half-closes it;
/// returns everything `to` reads up to EOF.
pub fn send_and_half_close(from: &socket2::Socket, to: &socket2::Socket, bytes: &[u8]) -> Vec<u8> {
    let writer = {
        let (s, b) = (from.try_clone().unwrap(), bytes.to_vec());
        std::thread::spawn(move || {
            (&s).write_all(&b).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    (&*to).read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

/// An HdrHistogram interval log read back: samples per tag, summed over its intervals, and
/// how many intervals each tag had.
pub fn hlog_counts(text: &[u8]) -> std::collections::BTreeMap<String, (u64, usize)> {
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let mut counts = std::collections::BTreeMap::<String, (u64, usize)>::new();
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(text) {
        if let LogEntry::Interval(h) = entry.expect("every line parses") {
            let bytes = base64_decode(h.encoded_histogram());
            let hist: hdrhistogram::Histogram<u64> = de.deserialize(&mut &bytes[..]).expect("V2 histogram decodes");
            let e = counts.entry(h.tag().expect("tagged").as_str().to_string()).or_default();
            e.0 += hist.len();
            e.1 += 1;
        }
    }
    counts
}

/// Standard base64 (the interval log's encoding), for read-backs only.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= (val(c) as u32) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A test whose precondition is missing (root, two CPUs) fails: CI has them, and a skip that
/// passes would hide the test there. A developer without them may set
/// `KVMI_RELAY_TEST_ALLOW_SKIP=1` to skip instead; the skip is printed. True: run the test.
pub fn precondition(met: bool, test: &str, needs: &str) -> bool {
    if met {
        return true;
    }
    if std::env::var_os("KVMI_RELAY_TEST_ALLOW_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIP {test}: needs {needs} (KVMI_RELAY_TEST_ALLOW_SKIP=1)");
        return false;
    }
    panic!("{test} needs {needs}; set KVMI_RELAY_TEST_ALLOW_SKIP=1 to skip it on this machine");
}

/// `promtool check metrics` (Debian's prometheus package, `make deps`) on `text`.
pub fn promtool_check(text: &str) {
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool: {e} (install Debian's prometheus package: make deps)"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
}

/// `count` round trips of 64 bytes whose content changes every time, each checked; the
/// round-trip times in microseconds.
pub fn checked_round_trips(s: &socket2::Socket, count: u32, from: u32) -> Vec<u64> {
    let mut times = Vec::with_capacity(count as usize);
    let mut back = [0u8; 64];
    for i in from..from + count {
        let msg: Vec<u8> = (0..64u32).map(|k| (i.wrapping_mul(31) ^ k) as u8).collect();
        let t = Instant::now();
        (&*s).write_all(&msg).unwrap();
        (&*s).read_exact(&mut back).unwrap_or_else(|e| panic!("round trip {i}: {e}"));
        times.push(t.elapsed().as_micros() as u64);
        assert_eq!(&back[..], &msg[..], "round trip {i} came back changed");
    }
    times
}

/// The `p`-quantile (0..=1) of `times`, nearest rank below.
pub fn pct(times: &mut [u64], p: f64) -> u64 {
    times.sort_unstable();
    times[((times.len() as f64 - 1.0) * p) as usize]
}

/// A relay's `stats json` answer from its control socket.
pub fn stats_json(control: &Path) -> serde_json::Value {
    serde_json::from_str(&kvmi_relay::observe::control::ask(control, "stats json").expect("control answers"))
        .expect("valid JSON")
}
