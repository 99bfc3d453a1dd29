//! Paths another user can reach: nothing the relay does by path after creating a file may follow
//! a link planted there, and a file the relay would write through a planted link or into someone
//! else's file is refused at start with one line naming the flag.
//!
//! Run as root (CI is): the relay must not hand root's powers to whoever can rename entries in
//! the socket's directory.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use util::*;

fn assert_root(test: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test} needs root (CI runs the tests as root): the attack it pins is a user steering root's chmod/chown"
    );
}

/// Waits until the relay logs that it listens or exits; then stops it (SIGKILL: the next start
/// meets a stale file, as after a crash).
fn start_and_stop(args: &[String]) {
    let mut r = Relay::spawn(Command::new(BIN).args(args));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if r.log().contains("listening") || r.child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A racer swaps the freshly bound socket with a symlink to a root-owned 0600 file
/// (renameat2 RENAME_EXCHANGE, as fast as it can) while the relay restarts in a loop. Whatever
/// the relay does after bind must act on its own socket or refuse: the victim's mode and group
/// never change.
#[test]
fn a_socket_swapped_for_a_symlink_after_bind_never_chmods_or_chowns_the_target() {
    assert_root("a_socket_swapped_for_a_symlink_after_bind_never_chmods_or_chowns_the_target");
    let d = tmpdir();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"root's secret\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&victim).unwrap();
    let sock = d.path().join("relay.sock");
    let link = d.path().join("link");
    let far = d.path().join("far.sock");

    // The racer is bounded on its own (a deadline and a count), whatever happens to this thread;
    // it yields between swaps so the relay and this loop get the CPU too.
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let racer = {
        let (stop, swaps, sock, link) = (stop.clone(), swaps.clone(), sock.clone(), link.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(8);
            for i in 0..20_000_000u64 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                // Fails while nothing is at `sock` (between starts): no lock needed.
                if renameat2(AT_FDCWD, &sock, AT_FDCWD, &link, RenameFlags::RENAME_EXCHANGE).is_ok() {
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let args: Vec<String> = vec![
        format!("--listen=unix:{}", sock.display()),
        format!("--connect=unix:{}", far.display()),
        "--socket-mode=0660".into(),
        // A group the victim is not in: a chown that follows the link would show.
        "--socket-group=1".into(),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut starts = 0;
    let mut changed = None;
    while Instant::now() < deadline && starts < 2_000 {
        // Between starts: no socket at the path (the racer's exchange fails), the link back.
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        start_and_stop(&args);
        starts += 1;
        let now = std::fs::metadata(&victim).unwrap();
        if (now.mode() & 0o7777, now.gid()) != (before.mode() & 0o7777, before.gid()) {
            changed = Some((starts, now.mode() & 0o7777, now.gid()));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    if let Some((start, mode, gid)) = changed {
        panic!(
            "start {start}: the relay changed the file a planted symlink pointed to: mode {:04o} -> {mode:04o}, \
             group {} -> {gid} (after {} swaps)",
            before.mode() & 0o7777,
            before.gid(),
            swaps.load(Ordering::Relaxed)
        );
    }
    assert!(swaps.load(Ordering::Relaxed) > 0, "the racer never swapped the socket: the test proves nothing");
    assert!(starts > 10, "only {starts} starts in 5 s");
}

/// Runs a start-up that must be refused: exit 2, one line naming `--hist-log`.
fn hist_log_refused(sock: &Path, hist: &Path, why: &str) -> String {
    let mut r = Relay::spawn(Command::new(BIN).args([
        format!("--listen=unix:{}", sock.display()),
        "--connect=unix:/nonexistent-kvmi/far.sock".into(),
        format!("--hist-log={}", hist.display()),
    ]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline || r.log().contains("listening"), "{why}: neither refused nor started");
        if r.log().contains("listening") {
            panic!("{why}: the relay started with --hist-log {}:\n{}", hist.display(), r.log());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, err) = r.wait_exit(Duration::from_secs(1));
    let code = status.code().unwrap_or(-1);
    assert_eq!(code, 2, "{why}: exit code: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("kvmi-relay: ")).collect();
    assert_eq!(errors.len(), 1, "{why}: one error line: {err}");
    let err = errors[0].to_string();
    assert!(err.contains("--hist-log"), "{why}: the flag is named: {err}");
    assert!(!sock.exists(), "{why}: the socket was left behind");
    err
}

#[test]
fn a_hist_log_planted_as_a_symlink_or_owned_by_another_user_is_refused() {
    assert_root("a_hist_log_planted_as_a_symlink_or_owned_by_another_user_is_refused");
    let d = tmpdir();
    let sock = d.path().join("relay.sock");
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"root's file\n").unwrap();
    let hist = d.path().join("relay.hlog");
    std::os::unix::fs::symlink(&victim, &hist).unwrap();
    let err = hist_log_refused(&sock, &hist, "a symlink");
    assert!(err.contains("symbolic link"), "the message says why: {err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file\n", "the link's target was written");

    let foreign = d.path().join("foreign.hlog");
    std::fs::write(&foreign, b"").unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let err = hist_log_refused(&sock, &foreign, "a foreign file");
    assert!(err.contains("owned by uid 65534"), "the message says why: {err}");
    assert_eq!(std::fs::metadata(&foreign).unwrap().len(), 0, "the foreign file was written");
}

/// A socket directory where others may rename entries (group- or world-writable, not sticky) is
/// warned about at start, naming the directory.
#[test]
fn a_socket_directory_others_can_write_is_warned_about() {
    let d = tmpdir();
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = open.join("relay.sock");
    let r = Relay::start(&[&format!("--listen=unix:{}", sock.display()), "--connect=unix:/nonexistent-kvmi/far.sock"]);
    let (_, log) = r.stop();
    let warning =
        log.lines().find(|l| l.contains("writable by others")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains(&open.display().to_string()), "names the directory: {warning}");
    assert!(warning.contains("WARN"), "{warning}");

    // Sticky (like /tmp): others cannot rename what they do not own; no warning.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let r = Relay::start(&[&format!("--listen=unix:{}", sock.display()), "--connect=unix:/nonexistent-kvmi/far.sock"]);
    let (_, log) = r.stop();
    assert!(!log.contains("writable by others"), "a sticky directory is not warned about:\n{log}");
}
