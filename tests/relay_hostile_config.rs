//! Hostile configuration against the real binary: random and mutated command lines and
//! environments, drawn from every relay flag and its `KVMI_RELAY_*` variable with values meant
//! to break them (control characters, huge numbers, paths that go nowhere, 5000-byte names).
//! Each run must end: exit 2 with one escaped line per problem and nothing left in its
//! directory, or exit 0 (`--check`, or a relay that started, logged `listening`, and stopped on
//! SIGTERM leaving nothing behind but its interval log). Never a hang, a panic or a signal death.
//!
//! Listening addresses are drawn from loopback and the run's own directory only: the test never
//! listens on vsock or a non-loopback address, and nothing is dialled (no peer ever connects).
//! `KVMI_RELAY_TEST_SEED` replays one seed; the runs are the same for a seed on every machine.

mod util;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use kvmi_relay::cli::Cli;
use util::*;

const RUNS: usize = 1000;

/// xorshift64*: the test's own, so a seed means the same runs everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, from: &'a [String]) -> &'a String {
        &from[self.below(from.len())]
    }
}

/// Every relay flag with its variable and its default value (from the clap definition).
type Flag = (String, Option<String>, Option<String>);

fn flags() -> Vec<Flag> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| {
            let var = a.get_env().and_then(|e| e.to_str()).map(String::from);
            let default = a.get_default_values().first().and_then(|v| v.to_str()).map(String::from);
            Some((a.get_long()?.to_string(), var, default))
        })
        .filter(|(long, _, _)| !["help", "version"].contains(&long.as_str()))
        .collect()
}

/// Where a relay may listen in this test: its directory or loopback, never vsock.
fn listen_values(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        // The first four can work.
        format!("unix:{d}/l.sock"),
        "tcp:127.0.0.1:0".into(),
        format!("unix:{d}/a\nb.sock"),
        format!("unix:{d}/\u{1b}[2J.sock"),
        format!("unix:{d}/missing/l.sock"),
        format!("unix:{d}/"),
        format!("unix:{d}/{}", "n".repeat(120)),
        "unix:relative.sock".into(),
        "unix:".into(),
        "tcp:[::1]:0".into(),
        "tcp:127.0.0.1:99999".into(),
        "tcp:localhost:0".into(),
        "".into(),
    ]
}

/// Values for every other flag: meant to be wrong in as many ways as possible.
fn other_values(dir: &Path) -> Vec<String> {
    let d = dir.display();
    let mut v: Vec<String> = [
        "",
        "0",
        "1",
        "-1",
        "7",
        "65536",
        "4294967296",
        "18446744073709551616",
        "1e3",
        " 5",
        "0x10",
        "yes",
        "maybe",
        "true",
        "off",
        "root",
        "nobody",
        "no-such-user-x",
        "4242",
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/33",
        "1.2.3.4/0",
        "::ffff:127.0.0.1/104",
        "3",
        "2",
        "4294967295",
        "auto",
        "splice",
        "copy",
        "full",
        "read-only",
        "listen",
        "connect",
        "refuse",
        "pass",
        "v7",
        "WRITE_PHYSICAL",
        "READ_PHYSICAL,bogus",
        "6b766d69-2d72-656c-6179-2d66616b6521",
        "+6b766d69-2d72-656c-6179-2d66616b652",
        "sha256:AAAA",
        "spiffe://x/y",
        "%n%s%x",
        "$(id)",
        "debug",
        "trace,kvmi_relay=off",
        "tcp:127.0.0.1:1",
        "vsock:3:9",
        "unix:/nonexistent/x.sock",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend([
        format!("{d}/ctl"),
        format!("{d}/h.hlog"),
        format!("{d}/missing/x"),
        format!("{d}"),
        format!("{d}/a\nkvmi-relay: configuration ok"),
        format!("unix:{d}/far.sock"),
        "x\nkvmi-relay: configuration ok".into(),
        "\r\u{1b}[2J\u{7}".into(),
        "\u{202e}evil".into(),
        "A".repeat(5000),
    ]);
    v
}

/// One character a mutation may put anywhere in a value.
const NASTY: [char; 8] = ['\n', '\r', '\u{1b}', '\t', '\u{7f}', ',', '=', ' '];

fn mutate(rng: &mut Rng, value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    match rng.below(3) {
        0 => chars.insert(rng.below(chars.len() + 1), NASTY[rng.below(NASTY.len())]),
        1 if !chars.is_empty() => {
            chars.remove(rng.below(chars.len()));
        }
        _ => chars.extend(value.chars()),
    }
    chars.into_iter().collect()
}

struct Case {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

fn case(rng: &mut Rng, flags: &[Flag], listen: &[String], other: &[String]) -> Case {
    let mut c = Case { args: Vec::new(), env: Vec::new() };
    // Mostly a listen and a connect endpoint, so that runs get past the first check.
    if rng.below(8) > 0 {
        let at = if rng.below(2) == 0 { rng.below(4) } else { rng.below(listen.len()) };
        c.args.push(format!("--listen={}", listen[at]));
        if listen[at].starts_with("tcp:") && rng.below(4) > 0 {
            c.args.push("--allow-ip=127.0.0.0/8,::1/128".into());
        }
    }
    if rng.below(8) > 0 {
        let good = ["unix:/nonexistent/far.sock".to_string(), "tcp:127.0.0.1:1".into(), "vsock:3:9".into()];
        let to = if rng.below(4) > 0 { rng.pick(&good).clone() } else { rng.pick(other).clone() };
        c.args.push(format!("--connect={to}"));
    }
    if rng.below(2) == 0 {
        c.args.push("--check".into());
    }
    for _ in 0..rng.below(5) {
        let (long, var, default) = &flags[rng.below(flags.len())];
        if long == "check" {
            continue;
        }
        let value = if long == "listen" {
            rng.pick(listen).clone()
        } else if let Some(default) = default.as_ref().filter(|_| rng.below(2) == 0) {
            default.clone()
        } else {
            let v = rng.pick(other).clone();
            if rng.below(3) == 0 { mutate(rng, &v) } else { v }
        };
        match (var, rng.below(12)) {
            (Some(var), 0..=3) => c.env.push((var.clone(), value)),
            (_, 4) => c.args.push(format!("--{long}")),
            _ => c.args.push(format!("--{long}={value}")),
        }
    }
    if rng.below(20) == 0 {
        c.env.push(("KVMI_RELAY_ALOW_UID".into(), "0".into()));
    }
    // A mutated variable or flag name.
    if rng.below(20) == 0 {
        let (long, _, _) = &flags[rng.below(flags.len())];
        c.args.push(format!("--{}", mutate(rng, long)));
    }
    c
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Runs one case to its end; returns (exit code, stderr, whether it served).
fn run_case(c: &Case, cwd: &Path) -> (i32, String, bool) {
    let mut cmd = Command::new(BIN);
    cmd.args(&c.args).current_dir(cwd).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("KVMI_RELAY_") || k == "RUST_LOG" || k.starts_with("LISTEN_") || k == "NOTIFY_SOCKET" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(c.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn().expect("spawn kvmi-relay");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut err = String::new();
    let mut served = false;
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            if line.contains(" listening ") && !served {
                served = true;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .unwrap();
            }
            err.push_str(&line);
            err.push('\n');
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hung: {:?} env {:?}\n{err}", c.args, c.env);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    reader.join().unwrap();
    while let Ok(line) = rx.try_recv() {
        err.push_str(&line);
        err.push('\n');
    }
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        panic!("killed by signal {sig}: {:?} env {:?}\n{err}", c.args, c.env);
    }
    (status.code().unwrap(), err, served)
}

#[test]
fn random_and_mutated_configurations_end_cleanly_and_leave_nothing_behind() {
    let seed: u64 = std::env::var("KVMI_RELAY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6b76_6d69);
    eprintln!("seed {seed} (KVMI_RELAY_TEST_SEED replays it)");
    let mut rng = Rng(seed | 1);
    let flags = flags();
    assert!(flags.len() > 30, "read the flags off the clap definition: {flags:?}");
    let (mut refused, mut checked, mut served) = (0, 0, 0);
    let mut shown = Vec::new();
    for i in 0..RUNS {
        let d = tmpdir();
        let cwd = d.path().join("cwd");
        std::fs::create_dir(&cwd).unwrap();
        let before = listing(d.path());
        let c = case(&mut rng, &flags, &listen_values(d.path()), &other_values(d.path()));
        let (code, err, did_serve) = run_case(&c, &cwd);
        let what = format!("run {i}: {:?} env {:?}", c.args, c.env);
        shown.push(format!("{code} {}", err.lines().next().unwrap_or("")));
        for line in err.lines() {
            assert!(!line.chars().any(char::is_control), "{what}: a control character in {line:?}");
        }
        assert!(!err.contains("panicked"), "{what}: {err}");
        let mut after = listing(d.path());
        match (code, did_serve) {
            (2, false) => {
                refused += 1;
                assert!(!err.is_empty(), "{what}: refused without a word");
                for line in err.lines() {
                    assert!(line.starts_with("kvmi-relay: "), "{what}: one `kvmi-relay: ` line per problem: {err}");
                }
            }
            (0, false) => {
                checked += 1;
                assert!(c.args.iter().any(|a| a == "--check"), "{what}: exit 0 without --check or serving: {err}");
            }
            (0, true) => {
                served += 1;
                // The interval log is the one file a relay keeps after it stops.
                after.retain(|p| !p.ends_with(".hlog"));
            }
            (code, _) => panic!("{what}: exit {code} (served: {did_serve})\n{err}"),
        }
        assert_eq!(after, before, "{what}: left on disk:\n{err}");
    }
    if std::env::var_os("KVMI_RELAY_TEST_SHOW").is_some() {
        eprintln!("{}", shown.join("\n"));
    }
    eprintln!("{RUNS} runs: {refused} refused (exit 2), {checked} passed --check, {served} served and stopped");
    // The draw reaches all three outcomes; otherwise it tests less than it says.
    assert!(refused > 0 && checked > 0 && served > 0, "refused {refused}, checked {checked}, served {served}");
}
