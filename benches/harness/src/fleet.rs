//! Fleet mode (`--fleet N`): N instances of each contender at once, UNIX → TCP, the way one host
//! runs one relay per VM.
//!
//! For each N: every contender's N instances are started (each relay as its unit starts it: a
//! name, a control socket, `NOTIFY_SOCKET` and a 10 s watchdog, so its idle wake-ups are the
//! ones a real instance makes), each dialling a server of its own on loopback TCP. Then, all of
//! them idle at once, the CPU ticks and the times each was scheduled in over `--fleet-idle-s`
//! are read from /proc, and its PSS from smaps_rollup. Then rounds: per round every contender
//! once, in a shuffled order; its turn is N passive-VMI sessions at once (a fake hypervisor
//! client per instance, a fake introspector behind each), released together. Per turn: all the
//! reads over the wall time from release to the last session's end (aggregate ops/s), each
//! session's own p99, and the instances' CPU.
//!
//! Invariants:
//! - `direct` has no instances: its N clients dial the N servers themselves (the floor).
//! - Only one contender's sessions run at a time; the servers are shared by all contenders.
//! - Nothing connects to an instance but its own client (readiness comes from /proc/net).

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;

use crate::procs::{self, Contender, Hop, Kind};
use crate::work::{self, Sizes, Workload};

/// The unit's `WatchdogSec=10s`: the relay pings every 5 s, its one idle wake-up.
const UNIT_WATCHDOG_USEC: &str = "10000000";
/// After start-up, before the idle reading: start-up's own work is not idle cost.
const SETTLE_MS: u64 = 1000;

pub struct FleetOpts {
    /// Instance counts, in order (`--fleet`).
    pub sizes: Vec<usize>,
    /// Seconds of idle reading per N (`--fleet-idle-s`).
    pub idle_s: u64,
    /// Reads per session (`--fleet-reads`).
    pub reads: u64,
    pub rounds: u32,
    pub seed: u64,
}

/// One contender's N instances, idle.
pub struct Idle {
    pub n: usize,
    pub contender: String,
    /// utime + stime of all N over the idle time, clock ticks.
    pub ticks: u64,
    /// Times any of their threads was scheduled in, per instance per second.
    pub wakeups_per_s: f64,
    /// Mean PSS of one instance, KiB.
    pub pss_kib: f64,
}

/// One contender's N instances busy at once, over all rounds.
pub struct Busy {
    pub n: usize,
    pub contender: String,
    pub reads: u64,
    pub wall: Duration,
    /// Every session's own p99, µs.
    pub session_p99_us: Vec<f64>,
    pub merged: Option<Histogram<u64>>,
    pub cpu_s: f64,
    /// The instances' run delay (s) and times scheduled in (not for socat: its forks exit).
    pub wait_s: f64,
    pub runs: u64,
}

impl Busy {
    pub fn rate(&self) -> f64 {
        self.reads as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    pub fn median_p99_us(&self) -> f64 {
        let mut v = self.session_p99_us.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() { 0.0 } else { v[v.len() / 2] }
    }
    pub fn cpu_us_per_op(&self) -> f64 {
        self.cpu_s * 1e6 / self.reads.max(1) as f64
    }
}

/// Times any thread of `pid` was scheduled in (the third field of /proc/PID/task/*/schedstat).
fn sched_runs(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// utime + stime of `pid` (its own, not its children's), clock ticks.
fn ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3; utime, stime are fields 14, 15 → indices 11, 12.
    (11..13).filter_map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

/// Proportional set size of `pid`, KiB (smaps_rollup).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

struct Deployed<'a> {
    contender: &'a Contender,
    hops: Vec<Hop>,
    dials: Vec<Endpoint>,
}

/// Runs every `--fleet` size; returns the idle and busy rows.
pub fn run(fo: &FleetOpts, all: &[Contender], relay_bin: &Path, base: &Path) -> Result<(Vec<Idle>, Vec<Busy>), String> {
    for c in all {
        if c.tls || !matches!(c.kind, Kind::Direct | Kind::Relay { .. } | Kind::Socat { .. }) {
            return Err(format!("--fleet: {} cannot run as a fleet (direct, kvmi-relay and socat can)", c.name));
        }
    }
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    for &n in &fo.sizes {
        let dir = base.join(format!("fleet-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // The units' notifications land here and are read away: a full queue would block them.
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).map_err(|e| format!("bind {}: {e}", notify_path.display()))?;
        let drain = notify.try_clone().map_err(|e| format!("clone the notify socket: {e}"))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while drain.recv(&mut buf).is_ok() {}
        });
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            let ep = Endpoint::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            let l = net::listen(&ep).map_err(|e| format!("listen on loopback TCP: {e}"))?;
            let addr = l.local_addr().ok().and_then(|a| a.as_socket()).ok_or("read a listener's port")?;
            servers.push((l, Endpoint::Tcp(addr)));
        }
        let started = Instant::now();
        let mut fleet: Vec<Deployed> = Vec::new();
        for c in all {
            let mut d = Deployed { contender: c, hops: Vec::new(), dials: Vec::new() };
            let slug: String = c.name.chars().map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' }).collect();
            for (i, (_, server)) in servers.iter().enumerate() {
                if c.kind == Kind::Direct {
                    d.dials.push(server.clone());
                    continue;
                }
                let front = Endpoint::Unix(dir.join(format!("{slug}-{i}.sock")));
                let env = match c.kind {
                    Kind::Relay { .. } => vec![
                        ("KVMI_RELAY_NAME".to_string(), format!("vm-{i}")),
                        (
                            "KVMI_RELAY_CONTROL".to_string(),
                            dir.join(format!("{slug}-{i}.control")).display().to_string(),
                        ),
                        ("NOTIFY_SOCKET".to_string(), notify_path.display().to_string()),
                        ("WATCHDOG_USEC".to_string(), UNIT_WATCHDOG_USEC.to_string()),
                    ],
                    _ => Vec::new(),
                };
                let log = dir.join(format!("{slug}-{i}.log"));
                let hop = procs::spawn_hop_with_env(&c.kind, relay_bin, &front, server, &log, None, &env)
                    .map_err(|e| format!("--fleet {n}: {} instance {i}: {e}", c.name))?;
                d.hops.push(hop);
                d.dials.push(front);
            }
            fleet.push(d);
        }
        eprintln!(
            "  fleet {n}: {} instances started in {:.1} s",
            fleet.iter().map(|d| d.hops.len()).sum::<usize>(),
            started.elapsed().as_secs_f64()
        );

        std::thread::sleep(Duration::from_millis(SETTLE_MS));
        let read = |d: &Deployed| -> (u64, u64) {
            d.hops
                .iter()
                .map(|h| (ticks(h.child.id()), sched_runs(h.child.id())))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let before: Vec<(u64, u64)> = fleet.iter().map(read).collect();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(fo.idle_s));
        let secs = t0.elapsed().as_secs_f64();
        for (d, b) in fleet.iter().zip(&before) {
            if d.hops.is_empty() {
                continue;
            }
            let a = read(d);
            let pss: u64 = d.hops.iter().map(|h| pss_kib(h.child.id())).sum();
            idle.push(Idle {
                n,
                contender: d.contender.name.clone(),
                ticks: a.0 - b.0,
                wakeups_per_s: (a.1 - b.1) as f64 / secs / n as f64,
                pss_kib: pss as f64 / n as f64,
            });
        }
        eprintln!("  fleet {n}: idle for {secs:.1} s");

        let mut rows: Vec<Busy> = fleet
            .iter()
            .map(|d| Busy {
                n,
                contender: d.contender.name.clone(),
                reads: 0,
                wall: Duration::ZERO,
                session_p99_us: Vec::new(),
                merged: None,
                cpu_s: 0.0,
                wait_s: 0.0,
                runs: 0,
            })
            .collect();
        let mut rng = fastrand::Rng::with_seed(fo.seed ^ (n as u64) << 32);
        let sizes = Sizes { round_trips: 0, reads: fo.reads, events: 0, bulk_bytes: 0 };
        let t0 = Instant::now();
        for _ in 0..fo.rounds {
            let mut order: Vec<usize> = (0..fleet.len()).collect();
            rng.shuffle(&mut order);
            for k in order {
                let d = &fleet[k];
                let (cpu0, wait0) = (procs::total_cpu_seconds(&d.hops), procs::total_sched_wait(&d.hops));
                let (outcomes, wall) =
                    burst(&servers, &d.dials, sizes).map_err(|e| format!("--fleet {n} / {}: {e}", d.contender.name))?;
                let wait1 = procs::total_sched_wait(&d.hops);
                procs::settle(&d.hops);
                let row = &mut rows[k];
                if !matches!(d.contender.kind, Kind::Socat { .. }) {
                    // socat's forks exit and take their schedstat with them.
                    row.wait_s += wait1.0 - wait0.0;
                    row.runs += wait1.1 - wait0.1;
                }
                row.cpu_s += procs::total_cpu_seconds(&d.hops) - cpu0;
                row.wall += wall;
                for o in outcomes {
                    row.reads += o.ops;
                    if let Some(h) = o.rtt {
                        row.session_p99_us.push(crate::us(&h, 0.99));
                        match &mut row.merged {
                            Some(m) => m.add(&h).map_err(|e| format!("merge histograms: {e}"))?,
                            None => row.merged = Some(h),
                        }
                    }
                }
            }
        }
        eprintln!("  fleet {n}: {} rounds busy in {:.1} s", fo.rounds, t0.elapsed().as_secs_f64());
        busy.extend(rows);
        drop(fleet);
        drop(notify);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((idle, busy))
}

/// One passive-VMI session through each of `dials` at once; returns the outcomes and the wall
/// time from their common start to the last one's end.
fn burst(
    servers: &[(socket2::Socket, Endpoint)],
    dials: &[Endpoint],
    sizes: Sizes,
) -> Result<(Vec<work::Outcome>, Duration), String> {
    let gate = Arc::new(Barrier::new(dials.len() + 1));
    let mut threads = Vec::with_capacity(dials.len());
    for ((listener, _), dial) in servers.iter().zip(dials) {
        let l = listener.try_clone().map_err(|e| format!("clone a listener: {e}"))?;
        let (dial, gate) = (dial.clone(), gate.clone());
        threads.push(std::thread::spawn(move || {
            gate.wait();
            work::session(Workload::Passive, sizes, &l, &dial, &|| 0)
        }));
    }
    gate.wait();
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(threads.len());
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(o)) => out.push(o),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a session thread panicked".to_string());
            }
        }
    }
    let wall = t0.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok((out, wall)),
    }
}

/// The fleet tables, markdown.
pub fn markdown(fo: &FleetOpts, idle: &[Idle], busy: &[Busy]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Fleet: N instances at once, UNIX → TCP\n\n### Idle ({} s, all instances of every contender idle at once)\n",
        fo.idle_s
    );
    s.push_str(
        "| N | contender | CPU ticks, all N | wake-ups/s per instance | PSS KiB per instance | PSS MiB, all N |\n",
    );
    s.push_str("|--:|---|--:|--:|--:|--:|\n");
    for r in idle {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.0} | {:.1} |",
            r.n,
            r.contender,
            r.ticks,
            r.wakeups_per_s,
            r.pss_kib,
            r.pss_kib * r.n as f64 / 1024.0
        );
    }
    let _ = writeln!(
        s,
        "\n### Busy: N passive-VMI sessions at once ({} reads each, {} rounds, contenders shuffled per round)\n",
        fo.reads, fo.rounds
    );
    s.push_str("| N | contender | reads/s, all N | ×socat | ×direct | median session p99 µs | ×socat | p50 µs | CPU µs/read | wait µs/read | runs/read |\n");
    s.push_str("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in busy {
        let find = |name: &str| busy.iter().find(|o| o.n == r.n && o.contender == name);
        let ratio = |o: Option<&Busy>, f: fn(&Busy) -> f64| o.map_or(String::new(), |o| format!("{:.2}", f(r) / f(o)));
        let p50 = r.merged.as_ref().map_or(0.0, |h| crate::us(h, 0.5));
        let cpu =
            if r.contender == crate::report::DIRECT { String::new() } else { format!("{:.1}", r.cpu_us_per_op()) };
        let per_read = |x: f64| if r.runs == 0 { String::new() } else { format!("{:.2}", x / r.reads.max(1) as f64) };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {:.0} | {} | {:.1} | {} | {} | {} |",
            r.n,
            r.contender,
            r.rate(),
            ratio(find(crate::report::SOCAT), Busy::rate),
            ratio(find(crate::report::DIRECT), Busy::rate),
            r.median_p99_us(),
            ratio(find(crate::report::SOCAT), Busy::median_p99_us),
            p50,
            cpu,
            per_read(r.wait_s * 1e6),
            per_read(r.runs as f64)
        );
    }
    s
}

/// The same rows as CSV.
pub fn csv(idle: &[Idle], busy: &[Busy]) -> String {
    let mut s = String::from(
        "phase,n,contender,reads,wall_s,reads_per_s,median_session_p99_us,p50_us,cpu_s,ticks,wakeups_per_s_per_instance,pss_kib_per_instance\n",
    );
    for r in idle {
        let _ = writeln!(s, "idle,{},{},,,,,,,{},{:.3},{:.0}", r.n, r.contender, r.ticks, r.wakeups_per_s, r.pss_kib);
    }
    for r in busy {
        let p50 = r.merged.as_ref().map_or(0.0, |h| crate::us(h, 0.5));
        let _ = writeln!(
            s,
            "busy,{},{},{},{:.3},{:.0},{:.1},{:.1},{:.4},,,",
            r.n,
            r.contender,
            r.reads,
            r.wall.as_secs_f64(),
            r.rate(),
            r.median_p99_us(),
            p50,
            r.cpu_s
        );
    }
    s
}
