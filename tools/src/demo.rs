//! `make demo`: the network flavor end to end on one machine, with nothing set up by hand.
//!
//! ```text
//! fake hypervisor ─unix─▶ relay A (hypervisor host) ─tcp 127.0.0.1─▶ relay B (monitor host) ─unix─▶ fake introspector
//! ```
//!
//! The same passive burst (sequential 24-byte READ_PHYSICAL → 4112-byte page) and active burst
//! (552-byte PAUSE_VCPU event → 24-byte reply) runs first directly (no relay) and then through
//! both relays; every byte is checked; the figures are printed side by side.
//!
//! Relay A, on the hypervisor host, runs with `--kvmi`: the VM is pinned by uuid and name and
//! the tenant is read-only. A second session then tries a WRITE_PHYSICAL, which relay A answers
//! itself with EPERM, and relay A's per-message table is printed from its close lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::peers::kvmi::{self, HypervisorReport, IntrospectorReport};
use crate::peers::{net, pingpong};
use kvmi_relay::net::endpoint::Endpoint;

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
    let uuid = kvmi_relay::kvmi::handshake::format_uuid(&kvmi::FAKE_VM_UUID);
    let relay_a = spawn_relay(
        relay,
        &[
            format!("--listen=unix:{}", vm_sock.display()),
            format!("--connect=tcp:127.0.0.1:{port}"),
            "--name=one-7".into(),
            format!("--control={}", a_ctl.display()),
            // The provider's side of the trust boundary: pin the VM, the tenant reads only.
            "--kvmi".into(),
            format!("--kvmi-vm-uuid={uuid}"),
            "--kvmi-vm-name=one-7".into(),
            "--kvmi-policy=read-only".into(),
            // The demo's own DEMO_RAISE_EVENTS (standing in for a guest's activity) is no KVMi
            // command: let it pass.
            "--kvmi-unknown=pass".into(),
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
    println!("  relay A: --kvmi, VM pinned to uuid {uuid} and name one-7, --kvmi-policy read-only");
    let relayed = match wait_for_socket(&vm_sock, &mut relay_a) {
        Ok(()) => session(&intro_ep, &Endpoint::Unix(vm_sock.clone()), a),
        Err(e) => Err(e),
    };
    let denied = match &relayed {
        Ok(_) => {
            // Relay A serves one session at a time (--max-conns 1): wait for the first to close.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !std::fs::read_to_string(&a_log).unwrap_or_default().contains(" closed ")
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            denied_write(&intro_ep, &Endpoint::Unix(vm_sock.clone()))
        }
        Err(e) => Err(e.clone()),
    };
    // The relays' own view of the same traffic, from their control sockets, before they stop.
    std::thread::sleep(Duration::from_millis(50));
    let tables: Vec<(String, String)> = [("A (hypervisor host)", &a_ctl), ("B (monitor host)", &b_ctl)]
        .iter()
        .map(|(n, p)| {
            (
                n.to_string(),
                kvmi_relay::observe::control::ask(p, "stats text").unwrap_or_else(|e| format!("no stats: {e}\n")),
            )
        })
        .collect();
    stop(relay_a);
    stop(relay_b);
    let logs = || {
        let tail = |p: &Path| {
            std::fs::read_to_string(p).unwrap_or_default().lines().rev().take(5).collect::<Vec<_>>().join("\n  ")
        };
        format!("\n relay A said:\n  {}\n relay B said:\n  {}", tail(&a_log), tail(&b_log))
    };
    let relayed = relayed.map_err(|e| format!("{e}{}", logs()))?;
    let (err, writes) = denied.map_err(|e| format!("{e}{}", logs()))?;
    let a_text = std::fs::read_to_string(&a_log).unwrap_or_default();

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
    println!("\n== relay A (--kvmi read-only): a tenant's WRITE_PHYSICAL");
    println!(
        "  answered by relay A with err {err} ({}), never forwarded: the hypervisor saw {writes} writes",
        if err == -1 { "-KVM_EPERM, EPERM in libkvmi" } else { "NOT the relay's EPERM" }
    );
    if err != -1 || writes != 0 {
        return Err("relay A let a write through".into());
    }
    println!("\n== relay A: per message type, each session (command → reply, event → reply, at relay A)");
    for (n, l) in a_text.lines().filter(|l| l.contains(" closed ")).enumerate() {
        let msgs = l.split_whitespace().find_map(|w| w.strip_prefix("kvmi_messages=")).unwrap_or("-");
        println!("  session {}:", n + 1);
        println!("    {:<24} {:>7} {:>7}  latency µs p50/p90/p99/p99.9/max", "message", "count", "denied");
        for m in msgs.split(';').filter(|m| *m != "-") {
            let mut f = m.splitn(4, ':');
            let (name, count, denied, lat) =
                (f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""));
            println!("    {name:<24} {count:>7} {denied:>7}  {lat}");
        }
    }
    Ok(())
}

/// A tenant tries to write guest memory through relay A: returns the error code it got and how
/// many writes reached the fake hypervisor.
fn denied_write(listen: &Endpoint, dial: &Endpoint) -> Result<(i32, u64), String> {
    let listener = net::listen(listen).map_err(|e| format!("listen {listen}: {e}"))?;
    let tool = std::thread::spawn(move || -> Result<i32, String> {
        let s = net::accept(&listener).map_err(|e| format!("accept: {e}"))?;
        let mut t = kvmi::Tool::accept(s).map_err(|e| format!("fake introspector: {e}"))?;
        t.call(kvmi::ID_GET_VERSION, &[]).map_err(|e| format!("GET_VERSION: {e}"))?;
        let mut req = Vec::new();
        req.extend_from_slice(&0x1000u64.to_le_bytes());
        req.extend_from_slice(&8u64.to_le_bytes());
        req.extend_from_slice(b"tampered");
        let (err, _) = t.call(kvmi::ID_WRITE_PHYSICAL, &req).map_err(|e| format!("WRITE_PHYSICAL: {e}"))?;
        Ok(err)
    });
    let mut s = net::connect_retrying(dial, Duration::from_secs(5)).map_err(|e| format!("dial {dial}: {e}"))?;
    let hv = kvmi::serve_hypervisor(&mut s, "one-7").map_err(|e| format!("fake hypervisor: {e}"))?;
    let err = tool.join().map_err(|_| "introspector thread panicked".to_string())??;
    // Relay A logs the session's close line once both sides are gone.
    std::thread::sleep(Duration::from_millis(100));
    Ok((err, hv.writes))
}
