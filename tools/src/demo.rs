//! `make demo`: the network flavor end to end on one machine, with nothing set up by hand.
//!
//! ```text
//! fake hypervisor ─unix─▶ relay A (hypervisor host) ─tcp 127.0.0.1─▶ relay B (monitor host) ─unix─▶ fake introspector
//! ```
//!
//! The same passive burst (sequential 24-byte READ_PHYSICAL → 4112-byte page) and active burst
//! (552-byte PAUSE_VCPU event → 24-byte reply) runs first directly (no relay) and then through
//! both relays; every byte is checked; the figures are printed side by side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::peers::kvmi::{self, HypervisorReport, IntrospectorReport};
use crate::peers::{net, pingpong};
use kvmi_relay::endpoint::Endpoint;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Sequential 4 KiB READ_PHYSICAL round trips per run.
    #[arg(long, default_value = "5000")]
    pub reads: u64,
    /// PAUSE_VCPU events per run.
    #[arg(long, default_value = "2000")]
    pub events: u32,
}

struct Session {
    intro: IntrospectorReport,
    hv: HypervisorReport,
}

/// One session between the fake pair: the introspector listens at `listen`, the hypervisor
/// dials `dial` (the same path when direct, the relay's socket otherwise).
fn session(listen: &Endpoint, dial: &Endpoint, a: &DemoArgs) -> Result<Session, String> {
    let listener = net::listen(listen).map_err(|e| format!("listen {listen}: {e}"))?;
    let (reads, events) = (a.reads, a.events);
    let intro = std::thread::spawn(move || -> Result<IntrospectorReport, String> {
        let mut s = net::accept(&listener).map_err(|e| format!("accept: {e}"))?;
        kvmi::run_introspector(&mut s, reads, events).map_err(|e| format!("fake introspector: {e}"))
    });
    let mut s = net::connect_retrying(dial, Duration::from_secs(5)).map_err(|e| format!("dial {dial}: {e}"))?;
    let hv = kvmi::serve_hypervisor(&mut s, "one-7").map_err(|e| format!("fake hypervisor: {e}"))?;
    let intro = intro.join().map_err(|_| "introspector thread panicked".to_string())??;
    Ok(Session { intro, hv })
}

/// Reads the port a relay bound from the `bound=tcp:IP:PORT` field of its "listening" line.
fn wait_for_bound_port(log: &Path, child: &mut Child) -> Result<u16, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(" listening ")) {
            let port = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("bound=tcp:"))
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok());
            return port.ok_or_else(|| format!("no bound port in: {line}"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("relay B exited early ({status}): {text}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err("relay B did not listen within 5 s".into())
}

/// The relay the demo runs: the `kvmi-relay` built beside this binary (same cargo profile).
fn relay_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let relay = me.with_file_name("kvmi-relay");
    if relay.is_file() {
        Ok(relay)
    } else {
        Err(format!("no relay at {} (the demo runs the kvmi-relay built beside it: make build)", relay.display()))
    }
}

fn spawn_relay(relay: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let err = std::fs::File::create(log)?;
    Command::new(relay).args(args).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn()
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("relay exited early ({status})"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("relay did not create {} within 5 s", path.display()))
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

fn line(label: &str, s: &Session) {
    let ops = s.intro.reads as f64 / s.intro.passive_elapsed.as_secs_f64().max(1e-9);
    let evs = s.hv.events as f64 / s.intro.active_elapsed.as_secs_f64().max(1e-9);
    println!(
        "  {label:<14} passive {ops:>8.0} reads/s  RTT {}\n  {:<14} active  {evs:>8.0} events/s RTT {}",
        pingpong::summary(&s.intro.read_rtt),
        "",
        pingpong::summary(&s.hv.event_rtt)
    );
}

pub fn run(a: DemoArgs) -> i32 {
    match demo(&a) {
        Ok(()) => 0,
        Err(e) => {
            println!("demo FAIL: {e}");
            1
        }
    }
}

fn demo(a: &DemoArgs) -> Result<(), String> {
    let relay = relay_binary()?;
    let dir: PathBuf = std::env::temp_dir().join(format!("kvmi-relay-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let result = demo_in(a, &relay, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(a: &DemoArgs, relay: &Path, dir: &Path) -> Result<(), String> {
    let intro_sock = dir.join("introspector.sock");
    let vm_sock = dir.join("one-7.sock");
    let intro_ep = Endpoint::Unix(intro_sock.clone());

    println!("kvmi-relay demo: the network flavor, both hosts on this machine");
    println!("  fake hypervisor → unix:{} → relay A → tcp:127.0.0.1 → relay B", vm_sock.display());
    println!("  → unix:{} → fake introspector", intro_sock.display());
    println!(
        "  workload: {} sequential READ_PHYSICAL (24 B → 4112 B), {} PAUSE_VCPU events (552 B → 24 B)\n",
        a.reads, a.events
    );

    let direct = session(&intro_ep, &intro_ep, a)?;

    let b_log = dir.join("relay-b.log");
    let a_log = dir.join("relay-a.log");
    let (a_ctl, b_ctl) = (dir.join("relay-a.control"), dir.join("relay-b.control"));
    // Relay B picks its own port (tcp:127.0.0.1:0) and says which in its "listening" line.
    let mut relay_b = spawn_relay(
        relay,
        &[
            "--listen=tcp:127.0.0.1:0".into(),
            "--allow-ip=127.0.0.1/32".into(),
            format!("--connect=unix:{}", intro_sock.display()),
            "--name=one-7-monitor".into(),
            format!("--control={}", b_ctl.display()),
        ],
        &b_log,
    )
    .map_err(|e| format!("start relay B: {e}"))?;
    let port = match wait_for_bound_port(&b_log, &mut relay_b) {
        Ok(p) => p,
        Err(e) => {
            stop(relay_b);
            return Err(e);
        }
    };
    println!("  relay B listens on tcp:127.0.0.1:{port} (allow-list 127.0.0.1/32)");
    let relay_a = spawn_relay(
        relay,
        &[
            format!("--listen=unix:{}", vm_sock.display()),
            format!("--connect=tcp:127.0.0.1:{port}"),
            "--name=one-7".into(),
            format!("--control={}", a_ctl.display()),
        ],
        &a_log,
    );
    let mut relay_a = match relay_a {
        Ok(c) => c,
        Err(e) => {
            stop(relay_b);
            return Err(format!("start relay A: {e}"));
        }
    };
    let relayed = match wait_for_socket(&vm_sock, &mut relay_a) {
        Ok(()) => session(&intro_ep, &Endpoint::Unix(vm_sock.clone()), a),
        Err(e) => Err(e),
    };
    // The relays' own view of the same traffic, from their control sockets, before they stop.
    std::thread::sleep(Duration::from_millis(50));
    let tables: Vec<(String, String)> = [("A (hypervisor host)", &a_ctl), ("B (monitor host)", &b_ctl)]
        .iter()
        .map(|(n, p)| {
            (n.to_string(), kvmi_relay::control::ask(p, "stats text").unwrap_or_else(|e| format!("no stats: {e}\n")))
        })
        .collect();
    stop(relay_a);
    stop(relay_b);
    let relayed = relayed?;

    println!(
        "every byte checked both ways: handshake (96 B → 24 B, vm \"{}\"), GET_VERSION, pages, events\n",
        relayed.intro.vm_name
    );
    line("direct", &direct);
    line("through relays", &relayed);
    let ratio = |d: &IntrospectorReport, r: &IntrospectorReport| {
        (r.reads as f64 / r.passive_elapsed.as_secs_f64()) / (d.reads as f64 / d.passive_elapsed.as_secs_f64())
    };
    println!(
        "\n  passive throughput through two relays: {:.0} % of direct; active RTT p50 {:+.1} µs against direct",
        100.0 * ratio(&direct.intro, &relayed.intro),
        (relayed.hv.event_rtt.value_at_quantile(0.5) as f64 - direct.hv.event_rtt.value_at_quantile(0.5) as f64)
            / 1000.0
    );
    println!(
        "  (one run each, not interleaved: on an idle machine the direct pair can pay deep wake-ups that the\n   \
         relays' 50 µs polling window avoids, so relayed may even beat direct; `make bench` compares properly)"
    );
    println!("\nwhat each relay measured (`kvmi-relay stats`): transit = time bytes spent in that relay,");
    println!("turnaround = how long the far side took to answer, as that relay saw it; l2c = towards the monitor");
    for (name, table) in &tables {
        println!("\n== relay {name}\n{table}");
    }
    Ok(())
}
