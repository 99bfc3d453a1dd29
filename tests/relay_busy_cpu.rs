//! The relay on a CPU that another thread keeps busy (a guest's vCPU on a KVM host). A test binary
//! of its own: cargo runs test binaries one after another, so the busy thread slows no other test.

mod util;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvmi_relay::net::endpoint::Endpoint;
use kvmi_relay::observe::control::ask;
use kvmi_relay_tools::peers::net;
use util::*;

/// A thread spinning on one CPU until dropped (also when the test fails half-way).
struct Hog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start(cpu: usize) -> Hog {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            kvmi_relay::sys::pin_this_thread(cpu).unwrap();
            while !flag.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Hog { stop, thread: Some(thread) }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread that keeps the relay's CPU busy (a guest's vCPU on a KVM host) would turn every yield
/// of the poll window into a scheduler slice, milliseconds per round trip. The relay must notice,
/// suspend its window (and count that), and keep round trips far below a slice.
#[test]
fn a_thread_hogging_the_relays_cpu_suspends_its_poll_window() {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
    if !precondition(
        cpus.len() >= 2,
        "a_thread_hogging_the_relays_cpu_suspends_its_poll_window",
        &format!("2 CPUs (has {cpus:?})"),
    ) {
        return;
    }
    let (relay_cpu, peers_cpu) = (cpus[0], cpus[1]);
    let d = tmpdir();
    // The client (this thread) and the echo server's threads (spawned from it) on one CPU, the
    // relay and the hog on the other.
    kvmi_relay::sys::pin_this_thread(peers_cpu).unwrap();
    let server = echo_server(d.path());
    let hog = Hog::start(relay_cpu);
    let listen = Endpoint::Unix(d.path().join("relay.sock"));
    let control = d.path().join("control.sock");
    let relay = Relay::start(&[
        &format!("--listen={listen}"),
        &format!("--connect={server}"),
        &format!("--control={}", control.display()),
        &format!("--cpu={relay_cpu}"),
    ]);
    let s = net::connect(&listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rtts = Vec::new();
    let mut msg = [7u8; 64];
    // 600 ms: long enough for suspensions of 10, 20, 40 ... ms to follow each other (window.rs).
    let started = Instant::now();
    for i in 0u32.. {
        if started.elapsed() > Duration::from_millis(600) {
            break;
        }
        msg[..4].copy_from_slice(&i.to_le_bytes());
        let t = Instant::now();
        (&s).write_all(&msg).unwrap();
        let mut back = [0u8; 64];
        (&s).read_exact(&mut back).unwrap();
        rtts.push(t.elapsed());
        assert_eq!(back, msg);
    }
    let stats: serde_json::Value = serde_json::from_str(&ask(&control, "stats json").unwrap()).unwrap();
    let suspended = stats["totals"]["poll_window_suspensions"].as_u64().unwrap();
    drop(hog);
    rtts.sort();
    let p50 = rtts[rtts.len() / 2];
    let p90 = rtts[rtts.len() * 9 / 10];
    let slow = rtts.iter().filter(|&&r| r >= Duration::from_millis(2)).count();
    let n = rtts.len();
    eprintln!("hogged CPU: window suspended {suspended} times; RTT p50 {p50:?} p90 {p90:?}; {slow} of {n} >= 2 ms");
    assert!(suspended >= 1, "the poll window went on while a thread hogged the relay's CPU:\n{}", relay.log());
    // Without the suspension each round trip waits for the hog's slices (p50 8 ms here).
    assert!(p90 < Duration::from_millis(1), "p50 {p50:?} p90 {p90:?}, {slow} of {n} >= 2 ms");
}
