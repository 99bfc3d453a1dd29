//! `--kvmi` against the real binary: VM pinning from QEMU's handshake, before anything is
//! dialled. QEMU is played by a test thread (the handshake bytes), the introspector by a UNIX
//! listener that counts the connections it sees.

mod util;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use kvmi_relay::kvmi::handshake::{build_qemu, format_uuid};
use kvmi_relay_tools::peers::kvmi as fake;
use util::*;

const UUID: [u8; 16] = *b"kvmi-relay-fake!";

struct Setup {
    _dir: tempfile::TempDir,
    relay_path: std::path::PathBuf,
    intro: UnixListener,
    relay: Relay,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tmpdir();
    let relay_path = path_in(dir.path(), "vmi-sock");
    let intro_path = path_in(dir.path(), "introspector.sock");
    let intro = UnixListener::bind(&intro_path).unwrap();
    intro.set_nonblocking(true).unwrap();
    let mut args = vec![
        format!("--listen=unix:{}", relay_path.display()),
        format!("--connect=unix:{}", intro_path.display()),
        "--kvmi".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start(&args);
    Setup { _dir: dir, relay_path, intro, relay }
}

/// QEMU's side: sends `hs`, then waits for the relay to close (refused) or for `patience`.
fn qemu_sends(path: &std::path::Path, hs: &[u8]) -> bool {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hs).unwrap();
    let mut b = [0u8; 1];
    // A refused peer may have left bytes unread: closed or reset, both mean refused.
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn assert_no_connection(l: &UnixListener) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the introspector's socket saw a connection: {other:?}"),
    }
}

#[test]
fn a_wrong_uuid_is_refused_before_dialling() {
    let mut s = setup(&["--kvmi-vm-uuid=00000000-0000-0000-0000-000000000001"]);
    assert!(qemu_sends(&s.relay_path, &build_qemu(UUID, 1, b"one-7", None)), "the relay must close");
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains(&format_uuid(&UUID)) && log.contains("00000000-0000-0000-0000-000000000001"), "{log}");
    assert_no_connection(&s.intro);
}

#[test]
fn a_wrong_name_is_refused_before_dialling_and_escaped_in_the_log() {
    let mut s = setup(&["--kvmi-vm-name=one-7"]);
    assert!(qemu_sends(&s.relay_path, &build_qemu(UUID, 1, b"one-8\x1b[2J", None)));
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains("one-8\\") && log.contains("x1b[2J") && log.contains("one-7"), "{log}");
    assert!(!log.contains('\x1b'), "an escape sequence reached the log: {log}");
    assert_no_connection(&s.intro);
}

#[test]
fn a_handshake_of_another_size_is_refused_with_the_size_seen() {
    let mut s = setup(&[]);
    let mut hs = build_qemu(UUID, 1, b"one-7", None);
    hs[0..4].copy_from_slice(&100u32.to_le_bytes());
    assert!(qemu_sends(&s.relay_path, &hs));
    let log = s.relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains("struct_size 100"), "{log}");
    assert_no_connection(&s.intro);
}

#[test]
fn the_pinned_vm_is_admitted_and_its_handshake_forwarded_unchanged_in_both_sizes() {
    for max_gpa in [None, Some(0x1_0000_0000u64)] {
        let s = setup(&[&format!("--kvmi-vm-uuid={}", format_uuid(&UUID)), "--kvmi-vm-name=one-7"]);
        s.intro.set_nonblocking(false).unwrap();
        let hs = build_qemu(UUID, 42, b"one-7", max_gpa);
        let mut q = UnixStream::connect(&s.relay_path).unwrap();
        q.write_all(&hs).unwrap();
        let (mut i, _) = s.intro.accept().unwrap();
        i.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; hs.len()];
        i.read_exact(&mut got).unwrap();
        assert_eq!(got, hs);
    }
}

#[test]
fn the_fake_pair_runs_a_whole_session_through_a_pinned_relay() {
    // The demo's DEMO_RAISE_EVENTS is not a KVMi command: passed.
    let s = setup(&[&format!("--kvmi-vm-uuid={}", format_uuid(&UUID)), "--kvmi-unknown=pass"]);
    s.intro.set_nonblocking(false).unwrap();
    let relay_path = s.relay_path.clone();
    let hv = std::thread::spawn(move || {
        let mut q = UnixStream::connect(&relay_path).unwrap();
        fake::serve_hypervisor(&mut q, "one-7").unwrap()
    });
    let (mut i, _) = s.intro.accept().unwrap();
    i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rep = fake::run_introspector(&mut i, 50, 10).unwrap();
    drop(i);
    let hv = hv.join().unwrap();
    assert_eq!(rep.vm_name, "one-7");
    assert_eq!((rep.reads, hv.events), (50, 10));
}

// ---- the KVMi layer: policy, relay-made replies, whole messages, per-type figures ----

use fake::{HypervisorOptions, HypervisorReport, Tool};
use std::thread::JoinHandle;

struct Live {
    relay: Relay,
    tool: Tool<UnixStream>,
    hv: JoinHandle<std::io::Result<HypervisorReport>>,
    _dir: tempfile::TempDir,
}

fn live(extra: &[&str], opts: HypervisorOptions) -> Live {
    let s = setup(extra);
    s.intro.set_nonblocking(false).unwrap();
    let relay_path = s.relay_path.clone();
    let hv = std::thread::spawn(move || {
        let mut q = UnixStream::connect(&relay_path).unwrap();
        q.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        fake::serve_hypervisor_with(&mut q, "one-7", &opts)
    });
    let (i, _) = s.intro.accept().unwrap();
    i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tool = Tool::accept(i).unwrap();
    let (err, v) = tool.call(fake::ID_GET_VERSION, &[]).unwrap();
    assert_eq!((err, v.len()), (0, 16));
    Live { relay: s.relay, tool, hv, _dir: s._dir }
}

impl Live {
    /// Closes the introspector (the unhook signal) and returns the hypervisor's report and the
    /// relay's close line.
    fn finish(mut self) -> (HypervisorReport, String) {
        drop(self.tool);
        let hv = self.hv.join().unwrap().expect("the fake hypervisor saw a clean session");
        let log = self.relay.wait_log("closed", Duration::from_secs(5));
        let line = closed_lines(&log).pop().unwrap_or_default();
        (hv, line)
    }
}

fn read_req(gpa: u64, len: u64) -> Vec<u8> {
    [gpa.to_le_bytes(), len.to_le_bytes()].concat()
}

#[test]
fn read_only_answers_writes_itself_and_lets_reads_through() {
    let mut l = live(&["--kvmi-policy=read-only"], HypervisorOptions::default());
    let (err, page) = l.tool.call(fake::ID_READ_PHYSICAL, &read_req(0x5000, 4096)).unwrap();
    let mut want = vec![0u8; 4096];
    fake::page(0x5000, &mut want);
    assert_eq!((err, page == want), (0, true));
    let (err, regs) = l.tool.call(fake::ID_GET_REGISTERS, &[0u8; 16]).unwrap();
    assert_eq!((err, regs.len()), (0, 136));
    let mut write = read_req(0x5000, 8);
    write.extend_from_slice(b"pwned!!!");
    // The relay's reply: same id and seq, -KVM_EPERM, nothing after the error code.
    assert_eq!(l.tool.call(fake::ID_WRITE_PHYSICAL, &write).unwrap(), (-1, vec![]));
    assert_eq!(l.tool.call(fake::ID_SET_REGISTERS, &[0u8; 152]).unwrap(), (-1, vec![]));
    // The session goes on after a denial.
    assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(0, 4096)).unwrap().0, 0);
    // The denial's log line is written by the relay after its reply went out: wait for it.
    let log = l.relay.wait_log("kvmi: denied", Duration::from_secs(10));
    assert!(log.contains("kvmi: denied") && log.contains("WRITE_PHYSICAL"), "{log}");
    let (hv, line) = l.finish();
    assert_eq!(hv.writes, 0, "a write reached the hypervisor");
    let msgs = field(&line, "kvmi_messages").unwrap_or_default().to_string();
    assert!(msgs.contains("WRITE_PHYSICAL:0:1:") && msgs.contains("SET_REGISTERS:0:1:"), "{line}");
    assert!(msgs.contains("READ_PHYSICAL:2:0:") && msgs.contains("GET_REGISTERS:1:0:"), "{line}");
}

#[test]
fn full_lets_writes_through() {
    let mut l = live(&[], HypervisorOptions::default());
    assert_eq!(l.tool.call(fake::ID_WRITE_PHYSICAL, &read_req(0, 0)).unwrap().0, 0);
    assert_eq!(l.tool.call(fake::ID_SET_REGISTERS, &[0u8; 152]).unwrap().0, 0);
    let (hv, _) = l.finish();
    assert_eq!(hv.writes, 2);
}

#[test]
fn kvmi_deny_read_physical_denies_reads() {
    let mut l = live(&["--kvmi-deny=READ_PHYSICAL"], HypervisorOptions::default());
    assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(0, 4096)).unwrap(), (-1, vec![]));
    assert_eq!(l.tool.call(fake::ID_GET_REGISTERS, &[0u8; 16]).unwrap().0, 0);
    let (hv, _) = l.finish();
    assert_eq!(hv.commands, 2, "GET_VERSION and GET_REGISTERS only");
}

/// Raises a CR event whose guest value is 0x2000 and answers it with CONTINUE and `new_val`.
fn cr_round(l: &mut Live, new_val: u64) {
    assert_eq!(l.tool.call(fake::ID_DEMO_RAISE_CR, &0x2000u64.to_le_bytes()).unwrap().0, 0);
    let (hdr, body) = l.tool.next_message().unwrap();
    assert_eq!((hdr.id, body.len(), body[4]), (fake::ID_EVENT, fake::CR_EVENT_BYTES - 8, fake::EVENT_CR));
    l.tool.reply_event(hdr.seq, &fake::event_reply_body(fake::EVENT_CR, 0, &new_val.to_le_bytes())).unwrap();
}

#[test]
fn read_only_replaces_a_cr_reply_that_sets_another_value_with_the_guests_own() {
    let mut l = live(&["--kvmi-policy=read-only", "--kvmi-unknown=pass"], HypervisorOptions::default());
    cr_round(&mut l, 0x6666);
    cr_round(&mut l, 0x2000);
    // The session still works: the replaced reply kept the stream in step.
    assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(0, 4096)).unwrap().0, 0);
    let (hv, line) = l.finish();
    assert_eq!(hv.cr_values, vec![0x2000, 0x2000], "the vCPU went on with the guest's own value");
    assert!(field(&line, "kvmi_messages").unwrap_or_default().contains("EVENT_CR:2:1:"), "{line}");

    let mut l = live(&["--kvmi-unknown=pass"], HypervisorOptions::default());
    cr_round(&mut l, 0x6666);
    let (hv, _) = l.finish();
    assert_eq!(hv.cr_values, vec![0x6666], "full: the tenant's value applies");
}

#[test]
fn per_message_figures_count_exactly_what_was_sent() {
    let s = setup(&["--kvmi-unknown=pass"]);
    s.intro.set_nonblocking(false).unwrap();
    let relay_path = s.relay_path.clone();
    let hv = std::thread::spawn(move || {
        let mut q = UnixStream::connect(&relay_path).unwrap();
        fake::serve_hypervisor(&mut q, "one-7").unwrap()
    });
    let (mut i, _) = s.intro.accept().unwrap();
    i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rep = fake::run_introspector(&mut i, 37, 11).unwrap();
    drop(i);
    hv.join().unwrap();
    assert_eq!(rep.reads, 37);
    let mut relay = s.relay;
    let log = relay.wait_log("closed", Duration::from_secs(5));
    let line = closed_lines(&log).pop().unwrap();
    let msgs = field(&line, "kvmi_messages").unwrap().to_string();
    let count = |name: &str| -> u64 {
        msgs.split(';')
            .find(|m| m.starts_with(&format!("{name}:")))
            .and_then(|m| m.split(':').nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(count("GET_VERSION"), 1, "{line}");
    assert_eq!(count("READ_PHYSICAL"), 37, "{line}");
    assert_eq!(count("EVENT_PAUSE_VCPU"), 11, "{line}");
    assert_eq!(count("unknown"), 1, "the demo's own command, passed: {line}");
    assert_eq!(field(&line, "vm_name"), Some("one-7"), "{line}");
}

/// The introspector's first look at an event: it waits for a byte, then takes what is there
/// without waiting (as libkvmi's kvmi_wait_event does).
fn first_look(sock: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    nix::sys::socket::recv(sock.as_raw_fd(), &mut b, nix::sys::socket::MsgFlags::MSG_PEEK).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 8192];
    let n = (&*sock).read(&mut buf).unwrap();
    sock.set_nonblocking(false).unwrap();
    n
}

#[test]
fn an_event_split_by_the_far_side_reaches_the_introspector_whole() {
    let split = HypervisorOptions { split_events: Some(Duration::from_millis(150)), ..Default::default() };
    for (kvmi, whole) in [(true, true), (false, false)] {
        let dir = tmpdir();
        let relay_path = path_in(dir.path(), "vmi-sock");
        let intro_path = path_in(dir.path(), "introspector.sock");
        let intro = UnixListener::bind(&intro_path).unwrap();
        let mut args =
            vec![format!("--listen=unix:{}", relay_path.display()), format!("--connect=unix:{}", intro_path.display())];
        if kvmi {
            args.extend(["--kvmi".to_string(), "--kvmi-unknown=pass".to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _relay = Relay::start(&args);
        let opts = split.clone();
        let hv = std::thread::spawn(move || {
            let mut q = UnixStream::connect(&relay_path).unwrap();
            q.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = fake::serve_hypervisor_with(&mut q, "one-7", &opts);
        });
        let (i, _) = intro.accept().unwrap();
        i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tool = Tool::accept(i).unwrap();
        assert_eq!(tool.call(fake::ID_GET_VERSION, &[]).unwrap().0, 0);
        assert_eq!(tool.call(fake::ID_DEMO_RAISE_EVENTS, &1u32.to_le_bytes()).unwrap().0, 0);
        let n = first_look(&tool.sock);
        if whole {
            assert_eq!(n, fake::PAUSE_EVENT_BYTES, "--kvmi delivers the event whole");
        } else {
            // The control: without --kvmi the first piece arrives alone, so the test can fail.
            assert!(n < fake::PAUSE_EVENT_BYTES, "the transparent relay forwarded {n} bytes at once");
        }
        drop(tool);
        hv.join().unwrap();
    }
}

// ---- malformed input: closed with the reason, nothing of the message forwarded ----

fn raw_msg(id: u16, size: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut m = kvmi_relay::kvmi::wire::Hdr { id, size, seq }.to_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// Sends `bytes` from the introspector after GET_VERSION; returns the close reason logged and
/// the hypervisor's command count.
fn malformed_from_tool(extra: &[&str], bytes: &[u8], half_close: bool) -> (String, u64) {
    let mut l = live(extra, HypervisorOptions::default());
    l.tool.sock.write_all(bytes).unwrap();
    if half_close {
        l.tool.sock.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let log = l.relay.wait_log("kvmi: malformed stream", Duration::from_secs(5));
    let mut rest = Vec::new();
    let _ = l.tool.sock.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the introspector got {} bytes after the bad message", rest.len());
    let hv = l.hv.join().unwrap();
    let commands = hv.map(|r| r.commands).unwrap_or(u64::MAX);
    (log, commands)
}

#[test]
fn an_oversized_command_closes_the_session_before_any_byte_of_it_moves() {
    let (log, commands) = malformed_from_tool(&[], &raw_msg(18, 9000, 5, &[0u8; 100]), false);
    assert!(log.contains("claims 9000 body bytes"), "{log}");
    assert_eq!(commands, 1, "only GET_VERSION reached the hypervisor");
}

#[test]
fn an_unknown_id_closes_the_session_under_kvmi_unknown_refuse() {
    let (log, commands) = malformed_from_tool(&[], &raw_msg(40, 0, 6, &[]), false);
    assert!(log.contains("command id 40") && log.contains("--kvmi-unknown refuse"), "{log}");
    assert_eq!(commands, 1);
}

#[test]
fn a_message_cut_by_eof_closes_the_session_with_that_reason() {
    let (log, commands) = malformed_from_tool(&[], &raw_msg(17, 16, 7, &[0u8; 6]), true);
    assert!(log.contains("cut by the end of the stream"), "{log}");
    assert_eq!(commands, 1);
}

#[test]
fn a_reply_whose_seq_matches_no_command_closes_the_session() {
    let s = setup(&[]);
    s.intro.set_nonblocking(false).unwrap();
    let relay_path = s.relay_path.clone();
    let hv = std::thread::spawn(move || {
        let mut q = UnixStream::connect(&relay_path).unwrap();
        q.write_all(&fake::qemu_handshake("one-7")).unwrap();
        let mut answer = [0u8; 24];
        q.read_exact(&mut answer).unwrap();
        q.write_all(&raw_msg(17, 8, 999, &[0u8; 8])).unwrap();
        let mut rest = Vec::new();
        let _ = q.read_to_end(&mut rest);
    });
    let (i, _) = s.intro.accept().unwrap();
    i.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tool = Tool::accept(i).unwrap();
    let mut relay = s.relay;
    let log = relay.wait_log("kvmi: malformed stream", Duration::from_secs(5));
    assert!(log.contains("reply id 17 seq 999 matches no command"), "{log}");
    let mut rest = Vec::new();
    let _ = tool.sock.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the stray reply reached the introspector");
    hv.join().unwrap();
}

#[test]
fn stats_show_per_message_figures_in_every_format_with_a_bounded_message_label() {
    let control_dir = tmpdir();
    let control = path_in(control_dir.path(), "control.sock");
    let ctl = format!("--control={}", control.display());
    let mut l =
        live(&[&ctl, "--name=one-7", "--kvmi-policy=read-only", "--kvmi-unknown=pass"], HypervisorOptions::default());
    for gpa in 0..3 {
        assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(gpa << 12, 4096)).unwrap().0, 0);
    }
    for _ in 0..2 {
        assert_eq!(l.tool.call(fake::ID_WRITE_PHYSICAL, &read_req(0, 0)).unwrap(), (-1, vec![]));
    }
    cr_round(&mut l, 0x2000);

    let prom = kvmi_relay::observe::control::ask(&control, "stats prometheus").unwrap();
    promtool_check(&prom);
    let uuid = format_uuid(b"kvmi-relay-fake!");
    let series = |family: &str, kind: &str, message: &str| -> Option<u64> {
        let want = format!(
            "{family}{{vm=\"one-7\",vm_name=\"one-7\",vm_uuid=\"{uuid}\",kind=\"{kind}\",message=\"{message}\"}} "
        );
        prom.lines().find_map(|l| l.strip_prefix(&want)).map(|v| v.parse().unwrap())
    };
    assert_eq!(series("kvmi_relay_kvmi_messages_total", "command", "READ_PHYSICAL"), Some(3), "{prom}");
    assert_eq!(series("kvmi_relay_kvmi_denied_total", "command", "WRITE_PHYSICAL"), Some(2), "{prom}");
    assert_eq!(series("kvmi_relay_kvmi_messages_total", "command", "WRITE_PHYSICAL"), Some(0), "{prom}");
    assert_eq!(series("kvmi_relay_kvmi_messages_total", "event", "CR"), Some(1), "{prom}");
    assert_eq!(series("kvmi_relay_kvmi_latency_seconds_count", "command", "READ_PHYSICAL"), Some(3), "{prom}");
    assert_eq!(
        series("kvmi_relay_kvmi_messages_total", "command", "unknown"),
        Some(1),
        "the demo's own command: {prom}"
    );
    // Bounded: every `message` value is a name of the table or `unknown`.
    let table = kvmi_relay::kvmi::abi::Abi::V7.table();
    for line in prom.lines().filter(|l| l.contains("message=\"")) {
        let v = line.split("message=\"").nth(1).unwrap().split('"').next().unwrap();
        let known =
            v == "unknown" || table.commands.iter().any(|c| c.name == v) || table.events.iter().any(|e| e.name == v);
        assert!(known, "message label {v:?} is not in the table: {line}");
    }

    let text = kvmi_relay::observe::control::ask(&control, "stats text").unwrap();
    assert!(text.contains("KVMi: vm one-7") && text.contains(&uuid), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("command")
            && l.contains("WRITE_PHYSICAL")
            && l.split_whitespace().nth(3) == Some("2")),
        "{text}"
    );

    // The live session's own figures, beside every session's.
    let v: serde_json::Value =
        serde_json::from_str(&kvmi_relay::observe::control::ask(&control, "stats json").unwrap()).unwrap();
    let conn = &v["connections"][0]["kvmi"];
    assert_eq!(conn["vm_uuid"], uuid.as_str(), "{v}");
    assert_eq!(conn["vm_name"], "one-7", "{v}");
    let of = |name: &str| conn["messages"].as_array().unwrap().iter().find(|m| m["message"] == name).cloned();
    let read = of("READ_PHYSICAL").unwrap_or_else(|| panic!("the live session's reads: {v}"));
    assert_eq!((read["count"].as_u64(), read["latency_ns"]["count"].as_u64()), (Some(3), Some(3)), "{v}");
    assert_eq!(of("WRITE_PHYSICAL").unwrap()["denied"], 2, "{v}");
    assert!(text.contains(&format!("KVMi: vm one-7 ({uuid}); session {}", v["connections"][0]["id"])), "{text}");

    // After the session closed, the figures stay (every session since start or reset).
    let Live { mut relay, tool, hv, _dir } = l;
    drop(tool);
    hv.join().unwrap().unwrap();
    relay.wait_log("closed", Duration::from_secs(5));
    let v: serde_json::Value =
        serde_json::from_str(&kvmi_relay::observe::control::ask(&control, "stats json").unwrap()).unwrap();
    let msgs = v["kvmi"]["messages"].as_array().unwrap();
    let read = msgs.iter().find(|m| m["message"] == "READ_PHYSICAL").unwrap();
    assert_eq!(
        (read["kind"].as_str(), read["count"].as_u64(), read["latency_ns"]["count"].as_u64()),
        (Some("command"), Some(3), Some(3))
    );
    assert_eq!(v["kvmi"]["vm_uuid"], uuid.as_str());
    assert_eq!(kvmi_relay::observe::control::ask(&control, "reset").unwrap(), "reset\n");
    let v: serde_json::Value =
        serde_json::from_str(&kvmi_relay::observe::control::ask(&control, "stats json").unwrap()).unwrap();
    assert_eq!(v["kvmi"]["messages"].as_array().map(Vec::len), Some(0), "reset zeroes them: {v}");
}

#[test]
fn the_interval_log_has_a_tag_per_message_type_in_use_with_exact_counts() {
    let log_dir = tmpdir();
    let log_path = path_in(log_dir.path(), "one-7.hlog");
    let hist = format!("--hist-log={}", log_path.display());
    let mut l =
        live(&[&hist, "--hist-interval=0.1", "--name=one-7", "--kvmi-unknown=pass"], HypervisorOptions::default());
    for gpa in 0..25 {
        assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(gpa << 12, 4096)).unwrap().0, 0);
    }
    // A few intervals pass while the session is live: its samples are taken at each tick.
    std::thread::sleep(Duration::from_millis(350));
    for gpa in 0..5 {
        assert_eq!(l.tool.call(fake::ID_READ_PHYSICAL, &read_req(gpa << 12, 4096)).unwrap().0, 0);
    }
    assert_eq!(l.tool.call(fake::ID_GET_REGISTERS, &[0u8; 16]).unwrap().0, 0);
    cr_round(&mut l, 0x2000);
    let Live { mut relay, tool, hv, _dir } = l;
    drop(tool);
    hv.join().unwrap().unwrap();
    relay.wait_log("closed", Duration::from_secs(5));
    let (st, _) = relay.stop();
    assert!(st.success());

    let text = std::fs::read(&log_path).unwrap();
    let head = String::from_utf8_lossy(&text);
    assert!(head.contains("<vm>.kvmi.<MESSAGE>"), "the header names the tags:\n{head}");
    let counts = hlog_counts(&text);
    assert_eq!(counts["one-7.kvmi.READ_PHYSICAL"].0, 30, "{counts:?}");
    assert_eq!(counts["one-7.kvmi.GET_VERSION"].0, 1, "{counts:?}");
    assert_eq!(counts["one-7.kvmi.GET_REGISTERS"].0, 1, "{counts:?}");
    assert_eq!(counts["one-7.kvmi.EVENT_CR"].0, 1, "{counts:?}");
    assert_eq!(counts["one-7.kvmi.unknown"].0, 1, "the demo's own command: {counts:?}");
    // Only the types in use, and each written in every interval from its first on.
    let kvmi_tags: Vec<&String> = counts.keys().filter(|t| t.contains(".kvmi.")).collect();
    assert_eq!(kvmi_tags.len(), 5, "{counts:?}");
    // The 350 ms pause spans at least two 100 ms intervals without a read: the tag is written
    // in them too (empty), so READ_PHYSICAL has at least 3 intervals.
    let intervals = counts["one-7.l2c.transit"].1;
    let reads = counts["one-7.kvmi.READ_PHYSICAL"].1;
    assert!(reads >= 3 && reads <= intervals, "{counts:?}");
}

/// QEMU on the connect side (`--kvmi-hypervisor-side connect`): its handshake comes through the
/// session. An introspector that writes its answer and a WRITE_PHYSICAL the moment it connects,
/// before QEMU's handshake was checked against the pin, must not reach that QEMU: it may be
/// another VM. QEMU here waits before it sends a handshake of the wrong name.
#[test]
fn nothing_reaches_a_connect_side_qemu_before_its_handshake_passed_the_pin() {
    let dir = tmpdir();
    let relay_path = path_in(dir.path(), "vmi-sock");
    let qemu_path = path_in(dir.path(), "qemu.sock");
    let qemu = UnixListener::bind(&qemu_path).unwrap();
    let relay = Relay::start(&[
        &format!("--listen=unix:{}", relay_path.display()),
        &format!("--connect=unix:{}", qemu_path.display()),
        "--kvmi",
        "--kvmi-hypervisor-side=connect",
        "--kvmi-vm-name=one-7",
    ]);
    let mut intro = UnixStream::connect(&relay_path).unwrap();
    let mut early = vec![24, 0, 0, 0];
    early.extend([0u8; 20]);
    early.extend(raw_msg(18, 24, 1, &[0u8; 24]));
    intro.write_all(&early).unwrap();

    let (mut q, _) = qemu.accept().unwrap();
    q.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut got = [0u8; 64];
    let before = match q.read(&mut got) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => 0,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(before, 0, "{before} bytes of the introspector's reached QEMU before its handshake was checked");
    q.write_all(&build_qemu(UUID, 1, b"other-vm", None)).unwrap();
    q.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let after = match q.read(&mut got) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(after, 0, "the wrong VM received {after} bytes");
    let mut relay = relay;
    relay.wait_log("is not the pinned", Duration::from_secs(5));

    // The pinned VM: what the introspector wrote early reaches it once its handshake passed,
    // with nothing else happening on either socket.
    let mut intro = UnixStream::connect(&relay_path).unwrap();
    intro.write_all(&early).unwrap();
    let (mut q, _) = qemu.accept().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    q.write_all(&build_qemu(UUID, 1, b"one-7", None)).unwrap();
    q.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut held = vec![0u8; early.len()];
    q.read_exact(&mut held).expect("the held bytes reach the pinned VM");
    assert_eq!(held, early);
}

/// A TLS client at a plaintext `--kvmi` listener (the far relay has `--tls-*`, this one not):
/// refused before dialling, and the log says the peer speaks TLS instead of quoting a size.
#[test]
fn a_tls_client_at_a_plaintext_kvmi_listener_is_refused_as_tls_before_dialling() {
    let dir = tmpdir();
    let intro_path = path_in(dir.path(), "introspector.sock");
    let intro = UnixListener::bind(&intro_path).unwrap();
    intro.set_nonblocking(true).unwrap();
    let mut relay = Relay::start(&[
        "--listen=tcp:127.0.0.1:0",
        "--allow-ip=127.0.0.1",
        &format!("--connect=unix:{}", intro_path.display()),
        "--kvmi",
    ]);
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(relay.bound_tcp()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The ClientHello, as a TLS client sends it first.
    conn.write_tls(&mut tcp).unwrap();
    let mut b = [0u8; 1];
    let closed = match tcp.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed, "the relay must close the TLS client");
    let log = relay.wait_log("handshake refused", Duration::from_secs(5));
    assert!(log.contains("the peer speaks TLS") && log.contains("--tls-cert"), "{log}");
    assert!(!log.contains("struct_size"), "a size is no help to whoever reads it: {log}");
    assert_no_connection(&intro);
    let (_, log) = relay.stop();
    let stopped = log.lines().find(|l| l.contains(" stopped ")).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(field_u64(stopped, "refused_handshake"), 1, "{stopped}");
}
