//! kvmi-relay's benchmark: every contender, interleaved in one run, on this machine.
//!
//! `make bench` runs the full mode, `make bench-quick` (also part of `make test`) the quick one.
//! For each topology the bench starts every contender once, then for each workload runs rounds
//! of one session per contender in an order shuffled afresh every round (seeded: `--seed` repeats
//! a run's orders), so that whatever else the machine does hits all of them alike and no
//! contender keeps a place or a neighbour: with a fixed or rotated list the contender after
//! `direct` inherited what direct's session left behind in every round. Histograms and counts are
//! merged over the rounds; the relay's
//! CPU is read from /proc before and after each workload. Results: a markdown table on stdout,
//! CSV and JSON and a PNG plot under the output directory (target/bench by default).
//! docs/BENCHMARKS.md says how to read them.

mod copyloop;
mod fleet;
mod pki;
mod plot;
mod procs;
mod report;
mod work;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay_tools::peers::net;

use procs::{Contender, Hop, Kind};
use work::{Sizes, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Container flavor: UNIX → relay → UNIX.
    UnixUnix,
    /// One hop to a server on TCP: UNIX → relay → TCP.
    UnixTcp,
    /// Network flavor: UNIX → relay → TCP → relay → UNIX (two relays, as in the paper).
    Chain,
}

impl Topology {
    pub const ALL: [Topology; 3] = [Topology::UnixUnix, Topology::UnixTcp, Topology::Chain];
    pub fn name(self) -> &'static str {
        match self {
            Topology::UnixUnix => "unix-unix",
            Topology::UnixTcp => "unix-tcp",
            Topology::Chain => "chain",
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            Topology::UnixUnix => "UNIX → relay → UNIX (container flavor)",
            Topology::UnixTcp => "UNIX → relay → TCP (one hop; direct = client on TCP)",
            Topology::Chain => "UNIX → relay → TCP → relay → UNIX (network flavor; direct = UNIX)",
        }
    }
}

pub struct Opts {
    pub quick: bool,
    pub relay_bin: PathBuf,
    pub out_dir: PathBuf,
    pub latency_rounds: u32,
    pub bulk_rounds: u32,
    pub sizes: Sizes,
    pub startup_reps: usize,
    /// Focused runs (`--topology`, `--workload`, `--contender`): empty means all.
    pub topologies: Vec<Topology>,
    pub workloads: Vec<Workload>,
    pub only: Vec<String>,
    /// Extra relay contenders from `--variant NAME=FLAG,FLAG` and `--build NAME=PATH`.
    pub variants: Vec<(String, Vec<String>, Option<PathBuf>)>,
    /// Seeds the per-round order of the contenders (`--seed`; by default from the clock).
    pub seed: u64,
    /// `--pin`: where client, server and hops run (default: wherever the scheduler puts them).
    pub pin: Option<Placement>,
    /// `--load N`: busy processes that spin on every CPU for the whole run (a loaded host: its
    /// guests' vCPUs), 0 for none.
    pub load: usize,
    /// `--fleet`: run fleet mode instead of the topologies.
    pub fleet: Option<fleet::FleetOpts>,
}

/// A fixed placement of every process and thread (`--pin`), for latency figures that repeat:
/// on this machine a wake-up across vCPUs costs tens of microseconds (docs/BENCHMARKS.md, "Why
/// latency is bimodal"), and the scheduler picks the placement anew for each session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Client, server and every hop on CPU 0: no wake-up crosses vCPUs, so each hop shows what
    /// it costs by itself.
    OneCpu,
    /// Client and server on CPU 0, every hop on CPU 1: each message crosses vCPUs on its way
    /// into and out of the hops.
    HopsApart,
}

impl Placement {
    pub const ALL: [Placement; 2] = [Placement::OneCpu, Placement::HopsApart];
    pub fn name(self) -> &'static str {
        match self {
            Placement::OneCpu => "one-cpu",
            Placement::HopsApart => "hops-apart",
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            Placement::OneCpu => "client, server and every hop pinned to CPU 0",
            Placement::HopsApart => "client and server pinned to CPU 0, every hop to CPU 1",
        }
    }
}

/// One contender × topology × workload, merged over its rounds.
pub struct Row {
    pub topology: Topology,
    pub workload: Workload,
    pub contender: String,
    pub rtt: Option<Histogram<u64>>,
    /// Each session's own p50 RTT in µs, in the order run: the merged histogram hides whether
    /// sessions agreed or fell into two regimes (docs/BENCHMARKS.md, "Why latency is bimodal").
    pub session_p50_us: Vec<f64>,
    /// Each session's CPU µs per operation (the contender's processes, from just before the
    /// session until it settled), in the same order: what the paired CPU figures compare.
    pub session_cpu_us_per_op: Vec<f64>,
    pub ops: u64,
    pub elapsed: Duration,
    pub sessions: u32,
    /// CPU seconds the contender's processes used during this workload (0 for direct).
    pub cpu_s: f64,
    /// Largest peak RSS (VmHWM, reset before each session) of one serving process over this
    /// workload's sessions, KiB (0 for direct).
    pub rss_kib: u64,
    /// Run delay of the contender's live processes (runnable, waiting for a CPU), seconds, and
    /// the times they were scheduled in (schedstat; not for socat, whose forks exit).
    pub wait_s: f64,
    pub runs: u64,
    /// CPU seconds the `--load` processes got during this contender's sessions, and those
    /// sessions' wall time: what the contender and its peers left the neighbours.
    pub load_cpu_s: f64,
    pub wall_s: f64,
    /// Each session's set-up: the client's connect to the server's accept.
    pub setups: Vec<Duration>,
}

pub struct Startup {
    pub contender: String,
    pub times: Vec<Duration>,
}

/// The command line (the `hog` and `copy-loop` subcommands are the harness's own children and
/// are dispatched before this).
#[derive(clap::Parser, Debug)]
#[command(
    name = "kvmi-relay-bench",
    about = "Runs every contender interleaved on this machine; see docs/BENCHMARKS.md",
    disable_version_flag = true,
    // `--rounds -1` is a bad value for --rounds, not an unknown flag `-1`.
    allow_negative_numbers = true
)]
struct Args {
    /// Seconds, not minutes (`make bench-quick`); numbers not for judging.
    #[arg(long)]
    quick: bool,
    /// The relay binary under test [default: target/release/kvmi-relay].
    #[arg(long, value_name = "PATH")]
    relay: Option<PathBuf>,
    /// Where results.{md,csv,json} and the plot go [default: target/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Latency rounds: one session per contender each [default: 40, quick 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Bulk rounds [default: 8, quick 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    bulk_rounds: Option<u32>,
    /// Only these topologies (repeatable) [default: all].
    #[arg(long = "topology", value_name = "T", value_parser = parse_topology)]
    topologies: Vec<Topology>,
    /// Only these workloads (repeatable) [default: all].
    #[arg(long = "workload", value_name = "W", value_parser = parse_workload)]
    workloads: Vec<Workload>,
    /// Only these contenders, by name (repeatable) [default: all].
    #[arg(long = "contender", value_name = "NAME")]
    only: Vec<String>,
    /// A relay contender `kvmi-relay NAME` with extra flags (repeatable). `@nice=N`, `@fifo=PRIO`,
    /// `@slice-us=N` and `@cpu=N` are not relay flags: the harness sets that scheduling on the
    /// relay's threads (what `Nice=`, `CPUSchedulingPolicy=fifo`, an EEVDF custom slice or
    /// `CPUAffinity=N` would give).
    #[arg(long = "variant", value_name = "NAME=--flag=v,--flag2=v", value_parser = parse_variant)]
    variants: Vec<(String, Vec<String>)>,
    /// Another build of the relay, `kvmi-relay NAME` (repeatable): an A/B in one run.
    #[arg(long = "build", value_name = "NAME=PATH", value_parser = parse_build)]
    builds: Vec<(String, PathBuf)>,
    /// Seeds the per-round order of the contenders [default: from the clock].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// A fixed CPU placement of client, server and hops.
    #[arg(long, value_name = "one-cpu|hops-apart", value_parser = parse_pin)]
    pin: Option<Placement>,
    /// Busy processes spinning for the whole run.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    load: u32,
    /// Fleet mode: N instances of each contender at once, UNIX → TCP, idle then busy (repeatable:
    /// one pass per N). Contenders: direct, kvmi-relay, kvmi-relay pw=0, socat, the --variant and
    /// --build ones [--contender narrows].
    #[arg(long = "fleet", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=512))]
    fleet: Vec<u16>,
    /// Fleet mode: seconds of the idle reading per N [default: 10, quick 1].
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=600))]
    fleet_idle_s: Option<u64>,
    /// Fleet mode: reads per passive-VMI session [default: 400, quick 50].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    fleet_reads: Option<u64>,
    /// `cargo bench` passes this to harness = false targets.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The one of `all` called `s`, for a flag's value parser; the error lists the names there are.
fn by_name<T: Copy>(all: &[T], name: fn(T) -> &'static str, what: &str, s: &str) -> Result<T, String> {
    all.iter().copied().find(|&t| name(t) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
        format!("no {what} named {s:?} (one of {})", names.join(", "))
    })
}

fn parse_topology(s: &str) -> Result<Topology, String> {
    by_name(&Topology::ALL, Topology::name, "topology", s)
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    by_name(&Workload::ALL, Workload::name, "workload", s)
}

fn parse_pin(s: &str) -> Result<Placement, String> {
    by_name(&Placement::ALL, Placement::name, "placement", s)
}

fn parse_variant(s: &str) -> Result<(String, Vec<String>), String> {
    let (name, flags) = s.split_once('=').filter(|(n, _)| !n.is_empty()).ok_or("expected NAME=FLAGS")?;
    Ok((name.to_string(), flags.split(',').filter(|f| !f.is_empty()).map(str::to_string).collect()))
}

fn parse_build(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').filter(|(n, _)| !n.is_empty()).ok_or("expected NAME=PATH")?;
    if !Path::new(path).is_file() {
        return Err(format!("{path} is not a file"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

fn parse_args() -> Opts {
    let a = <Args as clap::Parser>::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let quick = a.quick;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let fleet = (!a.fleet.is_empty()).then(|| fleet::FleetOpts {
        sizes: a.fleet.iter().map(|&n| usize::from(n)).collect(),
        idle_s: a.fleet_idle_s.unwrap_or(if quick { 1 } else { 10 }),
        reads: a.fleet_reads.unwrap_or(if quick { 50 } else { 400 }),
        rounds: a.rounds.unwrap_or(if quick { 1 } else { 3 }),
        seed,
    });
    let mut variants: Vec<(String, Vec<String>, Option<PathBuf>)> =
        a.variants.into_iter().map(|(name, flags)| (format!("kvmi-relay {name}"), flags, None)).collect();
    variants.extend(a.builds.into_iter().map(|(name, path)| (format!("kvmi-relay {name}"), Vec::new(), Some(path))));
    let sizes = if quick {
        Sizes { round_trips: 500, reads: 400, events: 400, bulk_bytes: 8 << 20 }
    } else {
        // Short sessions, many rounds: on these machines wake-up cost flips between a fast and a
        // slow regime every fraction of a second (other load, the host's vCPU scheduling), so
        // the finer the interleaving, the more evenly each contender meets both.
        Sizes { round_trips: 500, reads: 500, events: 500, bulk_bytes: 256 << 20 }
    };
    Opts {
        quick,
        relay_bin: a.relay.unwrap_or_else(|| root.join("target/release/kvmi-relay")),
        out_dir: a.out.unwrap_or_else(|| root.join("target/bench")),
        latency_rounds: a.rounds.unwrap_or(if quick { 2 } else { 40 }),
        bulk_rounds: a.bulk_rounds.unwrap_or(if quick { 1 } else { 8 }),
        sizes,
        startup_reps: if quick { 3 } else { 20 },
        topologies: a.topologies,
        workloads: a.workloads,
        only: a.only,
        variants,
        seed,
        pin: a.pin,
        load: a.load as usize,
        fleet,
    }
}

/// The contenders `opts` selects: the standard set plus `--variant`s, narrowed by `--contender`.
pub fn contenders(opts: &Opts) -> Result<Vec<Contender>, String> {
    let mut v = standard_contenders();
    for (name, flags, bin) in &opts.variants {
        // Contenders are told apart by name everywhere (socket paths, rows, `--contender`): two
        // of one name would share sockets and fail in ways that say nothing about the relay.
        if v.iter().any(|c| &c.name == name) {
            return Err(format!("--variant/--build: a contender named {name:?} exists already; pick another NAME"));
        }
        v.push(Contender {
            name: name.clone(),
            kind: Kind::Relay { flags: flags.clone(), bin: bin.clone() },
            bulk: true,
            kvmi: flags.iter().any(|f| f == "--kvmi" || f.starts_with("--kvmi=")),
            tls: false,
            half_close: true,
        });
    }
    if opts.fleet.is_some() && opts.only.is_empty() {
        // What a fleet compares: the floor, the relay with and without its poll window, socat,
        // and whatever the command line added.
        let added: Vec<&str> = opts.variants.iter().map(|(n, _, _)| n.as_str()).collect();
        v.retain(|c| {
            ["direct", "kvmi-relay", "kvmi-relay pw=0", "socat"].contains(&c.name.as_str())
                || added.contains(&c.name.as_str())
        });
    }
    if let Some(missing) = opts.only.iter().find(|n| !v.iter().any(|c| &c.name == *n)) {
        return Err(format!("--contender: no contender named {missing:?}"));
    }
    if !opts.only.is_empty() {
        v.retain(|c| opts.only.contains(&c.name));
    }
    Ok(v)
}

fn standard_contenders() -> Vec<Contender> {
    let relay = |name: &str, flags: &[&str], bulk: bool| Contender {
        name: name.into(),
        kind: Kind::Relay { flags: flags.iter().map(|s| s.to_string()).collect(), bin: None },
        bulk,
        kvmi: flags.contains(&"--kvmi"),
        tls: false,
        half_close: true,
    };
    let other = |name: &str, kind: Kind| Contender {
        name: name.into(),
        kind,
        bulk: true,
        kvmi: false,
        tls: false,
        half_close: true,
    };
    // The chain's middle link as mutual TLS 1.3, verification on in every one of them.
    let tls = |name: &str, kind: Kind| Contender { tls: true, ..other(name, kind) };
    let mut v = vec![
        other("direct", Kind::Direct),
        relay("kvmi-relay", &[], true),
        relay("kvmi-relay pw=0", &["--poll-window-us=0"], false),
        relay("kvmi-relay pw=100", &["--poll-window-us=100"], false),
        relay("kvmi-relay pw=200", &["--poll-window-us=200"], false),
        relay("kvmi-relay splice", &["--move=splice"], true),
        relay("kvmi-relay copy", &["--move=copy"], true),
        relay("kvmi-relay pipe=1M", &["--pipe-size=1048576"], true),
        // KVMi-aware: headers framed, policy judged, whole messages toward the introspector,
        // per-type figures. The fake introspector's event trigger is not a KVMi command: pass it.
        relay("kvmi-relay kvmi", &["--kvmi", "--kvmi-unknown=pass"], false),
        relay("kvmi-relay kvmi ro", &["--kvmi", "--kvmi-unknown=pass", "--kvmi-policy=read-only"], false),
        // The transparent relay a second time, in the KVMi workloads: what two runs of one
        // binary differ by in the same rounds, the yardstick for what `--kvmi` adds.
        Contender { kvmi: true, ..relay(report::RELAY_AGAIN, &[], false) },
        other(report::COPY_LOOP, Kind::CopyLoop),
        other(report::SOCAT, Kind::Socat { nodelay: false }),
        other("socat nodelay", Kind::Socat { nodelay: true }),
        tls(report::RELAY_TLS, Kind::Relay { flags: Vec::new(), bin: None }),
        // With nodelay: a TLS record written behind another one still unacknowledged would
        // otherwise wait for the peer's delayed ACK (Nagle), which is socat's setting, not TLS's.
        tls(report::SOCAT_TLS, Kind::Socat { nodelay: true }),
    ];
    for (path, c) in [
        (procs::PROXYD, other("proxyd", Kind::Proxyd)),
        (procs::STUNNEL, Contender { half_close: false, ..tls("stunnel", Kind::Stunnel) }),
    ] {
        if Path::new(path).exists() {
            v.push(c);
        } else {
            eprintln!("note: {path} not found, {} left out", c.name);
        }
    }
    v
}

fn free_tcp_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("find a free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn tcp(port: u16) -> Endpoint {
    Endpoint::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Starts `c`'s hops for topology `t`; returns them and the endpoint the client dials.
fn deploy(
    c: &Contender,
    t: Topology,
    server: &Endpoint,
    dir: &Path,
    opts: &Opts,
    pki: Option<&pki::Files>,
) -> Result<(Vec<Hop>, Endpoint), String> {
    if c.kind == Kind::Direct {
        return Ok((Vec::new(), server.clone()));
    }
    let slug: String = c.name.chars().map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' }).collect();
    let front = Endpoint::Unix(dir.join(format!("{slug}.sock")));
    let spawn = |listen: &Endpoint, connect: &Endpoint, tag: &str| {
        let tls = if c.tls { Some(pki.ok_or("no certificates made for a TLS contender")?) } else { None };
        let log = dir.join(format!("{slug}-{tag}.log"));
        let hop = procs::spawn_hop(&c.kind, &opts.relay_bin, listen, connect, &log, tls)?;
        if opts.pin == Some(Placement::HopsApart) {
            // Every thread it has now; children it forks later (socat) inherit from them.
            procs::pin_process(hop.child.id(), 1)?;
        }
        Ok::<Hop, String>(hop)
    };
    match t {
        Topology::UnixUnix | Topology::UnixTcp => Ok((vec![spawn(&front, server, "hop")?], front)),
        Topology::Chain => {
            let middle = tcp(free_tcp_port()?);
            let b = spawn(&middle, server, "b")?;
            let a = spawn(&front, &middle, "a")?;
            Ok((vec![a, b], front))
        }
    }
}

fn run_topology(
    t: Topology,
    all: &[Contender],
    opts: &Opts,
    dir: &Path,
    load: &procs::Load,
    pki: Option<&pki::Files>,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let server = match t {
        Topology::UnixTcp => tcp(free_tcp_port()?),
        _ => Endpoint::Unix(dir.join("server.sock")),
    };
    let listener = net::listen(&server).map_err(|e| format!("listen {server}: {e}"))?;
    let mut deployed = Vec::new();
    for c in all.iter().filter(|c| c.serves(t)) {
        let (hops, dial) =
            deploy(c, t, &server, dir, opts, pki).map_err(|e| format!("{} on {}: {e}", c.name, t.name()))?;
        deployed.push((c, hops, dial));
    }
    for w in Workload::ALL.into_iter().filter(|w| opts.workloads.is_empty() || opts.workloads.contains(w)) {
        let rounds = if w.is_bulk() { opts.bulk_rounds } else { opts.latency_rounds };
        let entrants: Vec<usize> = (0..deployed.len()).filter(|&i| deployed[i].0.runs(w)).collect();
        let cpu_before: Vec<f64> = entrants.iter().map(|&i| procs::total_cpu_seconds(&deployed[i].1)).collect();
        let mut merged: Vec<Row> = entrants
            .iter()
            .map(|&i| Row {
                topology: t,
                workload: w,
                contender: deployed[i].0.name.clone(),
                rtt: None,
                session_p50_us: Vec::new(),
                session_cpu_us_per_op: Vec::new(),
                ops: 0,
                elapsed: Duration::ZERO,
                sessions: 0,
                cpu_s: 0.0,
                rss_kib: 0,
                wait_s: 0.0,
                runs: 0,
                load_cpu_s: 0.0,
                wall_s: 0.0,
                setups: Vec::new(),
            })
            .collect();
        let started = Instant::now();
        let n = entrants.len();
        // One stream per topology and workload, so that a focused run (`--topology`,
        // `--workload`) with the same seed orders its rounds as the full run did.
        let mut rng = fastrand::Rng::with_seed(opts.seed ^ ((t as u64) << 40) ^ ((w as u64) << 32));
        for _ in 0..rounds {
            // Every contender once per round, in a fresh order.
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            for k in order {
                let i = entrants[k];
                let (c, hops, dial) = &deployed[i];
                procs::reset_peak_rss(hops)?;
                let sample = || procs::serving_peak_rss_kib(hops);
                let (wait0, load0, wall0) = (procs::total_sched_wait(hops), load.cpu_seconds(), Instant::now());
                let cpu0 = procs::total_cpu_seconds(hops);
                let o = work::session(w, opts.sizes, &listener, dial, &sample)
                    .map_err(|e| format!("{} / {} / {}: {e}", t.name(), w.name(), c.name))?;
                let (wall, load1, wait1) = (wall0.elapsed(), load.cpu_seconds(), procs::total_sched_wait(hops));
                procs::settle(hops);
                let session_cpu_s = procs::total_cpu_seconds(hops) - cpu0;
                let row = &mut merged[k];
                if !matches!(c.kind, Kind::Socat { .. } | Kind::Stunnel) {
                    // socat's forks and stunnel's threads exit and take their schedstat with
                    // them: only the parent's accepts would be left.
                    row.wait_s += wait1.0 - wait0.0;
                    row.runs += wait1.1 - wait0.1;
                }
                row.load_cpu_s += load1 - load0;
                row.wall_s += wall.as_secs_f64();
                row.ops += o.ops;
                row.setups.push(o.setup);
                row.elapsed += o.elapsed;
                row.sessions += 1;
                row.rss_kib = row.rss_kib.max(o.peak_rss_kib);
                if let Some(h) = o.rtt {
                    row.session_p50_us.push(us(&h, 0.5));
                    row.session_cpu_us_per_op.push(1e6 * session_cpu_s / o.ops.max(1) as f64);
                    match &mut row.rtt {
                        Some(m) => m.add(&h).map_err(|e| format!("merge histograms: {e}"))?,
                        None => row.rtt = Some(h),
                    }
                }
            }
        }
        for (k, &i) in entrants.iter().enumerate() {
            merged[k].cpu_s = procs::total_cpu_seconds(&deployed[i].1) - cpu_before[k];
        }
        eprintln!("  {} / {}: {} rounds in {:.1} s", t.name(), w.name(), rounds, started.elapsed().as_secs_f64());
        rows.extend(merged);
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("hog") {
        // One `--load` process: spins until the harness goes away.
        procs::hog();
    }
    if args.get(1).map(String::as_str) == Some("copy-loop") {
        // The `copy loop` contender's hop: this binary, started again by the harness.
        if let Err(e) = copyloop::main(&args[2..]) {
            eprintln!("copy-loop: {e}");
            std::process::exit(1);
        }
        return;
    }
    let opts = parse_args();
    if let Err(e) = run(&opts) {
        eprintln!("bench FAIL: {e}");
        std::process::exit(1);
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    if !opts.relay_bin.exists() {
        return Err(format!("{} not found: run `make build` first", opts.relay_bin.display()));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| format!("create {}: {e}", opts.out_dir.display()))?;
    // Before `--pin` narrows this process: the hogs may run on every CPU.
    let load = procs::Load::start(opts.load)?;
    if let Some(p) = opts.pin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if p == Placement::HopsApart && cpus < 2 {
            return Err(format!("--pin hops-apart needs 2 CPUs; this process may use {cpus}"));
        }
        // Before any thread or hop exists: they all inherit CPU 0 from here.
        procs::pin_process(std::process::id(), 0)?;
    }
    let machine_before = report::Machine::read();
    let base = std::env::temp_dir().join(format!("kvmi-relay-bench-{}", std::process::id()));
    let all = contenders(opts)?;
    if let Some(fo) = &opts.fleet {
        return run_fleet(opts, fo, &all, &base, machine_before);
    }
    let topologies: Vec<Topology> =
        Topology::ALL.into_iter().filter(|t| opts.topologies.is_empty() || opts.topologies.contains(t)).collect();
    eprintln!(
        "kvmi-relay bench ({} mode): {} contenders interleaved, {} topologies; load before: {}",
        if opts.quick { "quick" } else { "full" },
        all.len(),
        topologies.len(),
        machine_before.loadavg
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut result = Ok(());
    let tls_run = all.iter().any(|c| c.tls) && topologies.contains(&Topology::Chain);
    let pki = if tls_run { Some(pki::make(&base.join("pki"))?) } else { None };
    for t in topologies {
        result = run_topology(t, &all, opts, &base.join(t.name()), &load, pki.as_ref(), &mut rows);
        if result.is_err() {
            break;
        }
    }
    let startup = if result.is_ok() { startup_all(opts, &base) } else { Ok(Vec::new()) };
    let _ = std::fs::remove_dir_all(&base);
    result?;
    let startup = startup?;
    let mut machine = machine_before;
    machine.loadavg_after = report::Machine::read().loadavg;
    machine.wall_s = started.elapsed().as_secs_f64();
    let rep = report::Report { opts, machine, rows: &rows, startup: &startup };
    let md = rep.markdown();
    println!("{md}");
    rep.write_files().map_err(|e| format!("write results under {}: {e}", opts.out_dir.display()))?;
    let png = opts.out_dir.join("rtt-percentiles.png");
    match plot::draw(&png, &rows) {
        Ok(()) => eprintln!("plot: {}", png.display()),
        Err(e) => eprintln!("note: no plot ({e})"),
    }
    eprintln!("results: {}/results.{{md,csv,json}}", opts.out_dir.display());
    // A sanity check the quick mode relies on: every session moved what it had to (checked per
    // session above) and every latency row has a histogram with every operation in it.
    for r in &rows {
        if let Some(h) = &r.rtt {
            let want = match r.workload {
                Workload::Passive => u64::from(r.sessions) * opts.sizes.reads,
                Workload::Active => u64::from(r.sessions) * u64::from(opts.sizes.events),
                _ => u64::from(r.sessions) * opts.sizes.round_trips,
            };
            if h.len() != want {
                return Err(format!(
                    "{} {} {}: {} samples, expected {want}",
                    r.topology.name(),
                    r.workload.name(),
                    r.contender,
                    h.len()
                ));
            }
        }
    }
    Ok(())
}

fn run_fleet(
    opts: &Opts,
    fo: &fleet::FleetOpts,
    all: &[Contender],
    base: &Path,
    machine: report::Machine,
) -> Result<(), String> {
    let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
    eprintln!(
        "kvmi-relay bench, fleet mode: N = {:?}, contenders {}; load before: {}",
        fo.sizes,
        names.join(", "),
        machine.loadavg
    );
    let started = Instant::now();
    let result = fleet::run(fo, all, &opts.relay_bin, base);
    let _ = std::fs::remove_dir_all(base);
    let (idle, busy) = result?;
    let md = format!(
        "{}\n{} CPUs, kernel {}, commit {}, {}; load {} before, {} after; {:.0} s; --seed {}\n",
        fleet::markdown(fo, &idle, &busy),
        machine.cpus,
        machine.kernel,
        machine.commit,
        machine.date,
        machine.loadavg,
        report::Machine::read().loadavg,
        started.elapsed().as_secs_f64(),
        opts.seed
    );
    println!("{md}");
    let write = |name: &str, text: &str| {
        let p = opts.out_dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("write {}: {e}", p.display()))
    };
    write("fleet.md", &md)?;
    write("fleet.csv", &fleet::csv(&idle, &busy))?;
    eprintln!("results: {}/fleet.{{md,csv}}", opts.out_dir.display());
    Ok(())
}

fn startup_all(opts: &Opts, base: &Path) -> Result<Vec<Startup>, String> {
    let dir = base.join("startup");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (name, kind) in
        [("kvmi-relay", Kind::Relay { flags: vec![], bin: None }), ("socat", Kind::Socat { nodelay: false })]
    {
        let times = procs::startup_times(&kind, &opts.relay_bin, &dir, opts.startup_reps)?;
        out.push(Startup { contender: name.into(), times });
    }
    Ok(out)
}

/// Percentile in µs.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(variants: Vec<(String, Vec<String>, Option<PathBuf>)>) -> Opts {
        Opts {
            quick: true,
            relay_bin: PathBuf::from("kvmi-relay"),
            out_dir: PathBuf::from("out"),
            latency_rounds: 1,
            bulk_rounds: 1,
            sizes: Sizes { round_trips: 1, reads: 1, events: 1, bulk_bytes: 1 },
            startup_reps: 1,
            topologies: Vec::new(),
            workloads: Vec::new(),
            only: Vec::new(),
            variants,
            seed: 0,
            pin: None,
            load: 0,
            fleet: None,
        }
    }

    /// Two contenders of one name shared socket paths, and the run failed with a client's EAGAIN
    /// that pointed at the relay (`--variant 'copy=--move=copy'` beside the standard
    /// `kvmi-relay copy`).
    #[test]
    fn a_variant_may_not_take_a_contenders_name() {
        let v = |name: &str| (format!("kvmi-relay {name}"), vec!["--move=copy".to_string()], None);
        let err = contenders(&opts(vec![v("copy")])).expect_err("duplicate name accepted");
        assert!(err.contains("\"kvmi-relay copy\" exists already"), "{err}");
        let err = contenders(&opts(vec![v("mine"), v("mine")])).expect_err("duplicate name accepted");
        assert!(err.contains("kvmi-relay mine"), "{err}");
        let all = contenders(&opts(vec![v("mine")])).unwrap();
        assert_eq!(all.iter().filter(|c| c.name == "kvmi-relay mine").count(), 1);
    }

    /// The TLS contenders' link is the chain's TCP middle: they serve the chain and nothing else,
    /// the plain ones every topology; a fleet refuses them.
    #[test]
    fn tls_contenders_serve_the_chain_only() {
        let all = contenders(&opts(Vec::new())).unwrap();
        let tls: Vec<&str> = all.iter().filter(|c| c.tls).map(|c| c.name.as_str()).collect();
        assert!(tls.contains(&report::RELAY_TLS) && tls.contains(&report::SOCAT_TLS), "{tls:?}");
        for c in &all {
            assert!(c.serves(Topology::Chain), "{}", c.name);
            for t in [Topology::UnixUnix, Topology::UnixTcp] {
                assert_eq!(c.serves(t), !c.tls, "{} on {}", c.name, t.name());
            }
        }
        let fo = fleet::FleetOpts { sizes: vec![1], idle_s: 1, reads: 1, rounds: 1, seed: 0 };
        let relay_tls: Vec<Contender> = all.into_iter().filter(|c| c.name == report::RELAY_TLS).collect();
        let err = fleet::run(&fo, &relay_tls, Path::new("kvmi-relay"), Path::new("/nonexistent")).err().unwrap();
        assert!(err.contains("cannot run as a fleet"), "{err}");
    }

    /// stunnel sits out bulk both ways and runs bulk one way; every other bulk contender runs
    /// both (stunnel is in the standard set only where Debian's stunnel4 is installed).
    #[test]
    fn stunnel_sits_out_bulk_both_ways_only() {
        let all = contenders(&opts(Vec::new())).unwrap();
        if let Some(stunnel) = all.iter().find(|c| c.kind == Kind::Stunnel) {
            assert!(stunnel.runs(Workload::BulkOne) && !stunnel.runs(Workload::BulkBoth), "{stunnel:?}");
        } else {
            assert!(!Path::new(procs::STUNNEL).exists(), "stunnel4 installed but not a contender");
        }
        for c in all.iter().filter(|c| c.bulk && c.kind != Kind::Stunnel) {
            assert!(c.runs(Workload::BulkBoth), "{}", c.name);
        }
    }
}
