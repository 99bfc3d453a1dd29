//! The libvirt hook (`libvirt/kvmi-relay`, installed as /etc/libvirt/hooks/qemu.d/kvmi-relay) run
//! as libvirt runs it: `kvmi-relay DOMAIN OPERATION SUB-OPERATION -` with the domain XML on
//! stdin. A fake `systemctl` first in PATH records its arguments, the configuration goes to a
//! scratch KVMI_RELAY_RUN_DIR, the shared writer (`libvirt/write-conf`) runs the real relay's
//! `--check`. xmllint missing is a failure, not a skip: `make deps` installs libxml2-utils.

mod util;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

const NS: &str = "urn:kvmi-relay:libvirt:1";
const UUID: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn xmllint_present() {
    let ok = Command::new("xmllint").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        ok,
        "xmllint not found: the libvirt hook parses the domain XML with it; install libxml2-utils \
         (apt-get install libxml2-utils, or `make deps`)"
    );
}

struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// One scratch host: the run directory, the socket directory, a bin directory with the fake
/// systemctl, and its log.
struct Host {
    dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
}

impl Host {
    fn new() -> Host {
        xmllint_present();
        let dir = tmpdir();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("systemctl");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexit \"${{FAKE_SYSTEMCTL_RC:-0}}\"\n",
                dir.path().join("systemctl.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        Host { dir, extra_env: Vec::new() }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run-kvmi-relay")
    }

    fn sock_dir(&self) -> PathBuf {
        self.dir.path().join("run-kvmi")
    }

    fn env(mut self, k: &str, v: &str) -> Host {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    fn hook(&self, args: &[&str], stdin: &[u8]) -> Out {
        self.run(&repo().join("libvirt/kvmi-relay"), args, stdin)
    }

    fn run(&self, script: &Path, args: &[&str], stdin: &[u8]) -> Out {
        let path = format!("{}:{}", self.dir.path().join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(script);
        cmd.args(args)
            .env("PATH", path)
            .env_remove("SYSTEMCTL")
            .env("KVMI_RELAY_RUN_DIR", self.run_dir())
            .env("KVMI_RELAY_SOCKET_DIR", self.sock_dir())
            .env("KVMI_RELAY_WRITE_CONF", repo().join("libvirt/write-conf"))
            .env("KVMI_RELAY_BIN", BIN)
            // This machine has no QEMU user and no group kvm: the relay's --check resolves names.
            .env("QEMU_USER", "0")
            .env("SOCKET_GROUP", "root")
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run the hook");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        // A hook that does not read its stdin must not fail the test with EPIPE here.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// What the fake systemctl was called with, one call per entry.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("systemctl.log"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Every entry of the run directory (temporary files included), sorted.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(self.run_dir()) {
            Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// The file of a domain: named after the domain (the units' %I), not the escaped instance.
    fn conf(&self, domain: &str) -> String {
        std::fs::read_to_string(self.run_dir().join(format!("{domain}.conf"))).unwrap()
    }
}

/// A domain XML as libvirt passes it, with `<kvmi:relay ATTRS/>` in its metadata when given.
fn domain(name: &str, relay: Option<&str>) -> String {
    let metadata = match relay {
        Some(attrs) => format!(
            "  <metadata>\n    <other:thing xmlns:other=\"urn:example:other\">x</other:thing>\n    \
             <kvmi:relay xmlns:kvmi=\"{NS}\" {attrs}/>\n  </metadata>\n"
        ),
        None => String::new(),
    };
    format!(
        "<domain type='kvm' id='3'>\n  <name>{name}</name>\n  <uuid>{UUID}</uuid>\n{metadata}  \
         <memory unit='KiB'>1048576</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n</domain>\n"
    )
}

/// The file prepare writes.
fn expected(name: &str, instance: &str, host: &Host, allow: &str, connect: &str, policy: &str) -> String {
    let listen = format!("unix:{}/{instance}.sock", host.sock_dir().display());
    // A backslash (systemd-escape's \x2d) is kept by systemd only inside single quotes.
    let listen = if listen.contains('\\') { format!("'{listen}'") } else { listen };
    format!(
        "# Generated by the libvirt hook kvmi-relay for domain {name} ({UUID}) on prepare; removed on release.\n\
         KVMI_RELAY_NAME={name}\n\
         KVMI_RELAY_LISTEN={listen}\n\
         KVMI_RELAY_ALLOW_UID={allow}\n\
         KVMI_RELAY_SOCKET_GROUP=root\n\
         KVMI_RELAY_CONNECT={connect}\n\
         KVMI_RELAY_KVMI=true\n\
         KVMI_RELAY_KVMI_VM_UUID={UUID}\n\
         KVMI_RELAY_KVMI_VM_NAME={name}\n\
         KVMI_RELAY_KVMI_POLICY={policy}\n"
    )
}

fn assert_ok_silent(out: &Out, what: &str) {
    assert_eq!(out.code, 0, "{what}: exit {}\nstderr: {}", out.code, out.stderr);
    assert!(out.stdout.is_empty(), "{what}: printed on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stderr.is_empty(), "{what}: stderr: {}", out.stderr);
}

/// prepare for one flavor: exit 0, exactly the expected file (0644, nothing else in the
/// directory), one `systemctl --no-block start` of the socket unit.
fn prepare_writes(name: &str, instance: &str, attrs: &str, allow: &str, connect: &str, policy: &str) {
    let host = Host::new();
    let out = host.hook(&[name, "prepare", "begin", "-"], domain(name, Some(attrs)).as_bytes());
    assert_ok_silent(&out, attrs);
    assert_eq!(host.files(), [format!("{name}.conf")], "{attrs}");
    assert_eq!(host.conf(name), expected(name, instance, &host, allow, connect, policy), "{attrs}");
    let mode = std::fs::metadata(host.run_dir().join(format!("{name}.conf"))).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "{attrs}");
    assert_eq!(host.calls(), [format!("--no-block start kvmi-relay@{instance}.socket")], "{attrs}");
}

#[test]
fn prepare_vsock_writes_the_configuration_and_starts_the_socket_unit() {
    // The dash becomes \x2d in the instance (systemd-escape), in the unit and socket names; the
    // file is the domain's name (no backslash: systemd globs EnvironmentFile= paths).
    prepare_writes(
        "vm-7",
        r"vm\x2d7",
        r#"flavor="vsock" cid="42" port="7" allow-uid="0" policy="read-only""#,
        "0",
        "vsock:42:7",
        "read-only",
    );
}

#[test]
fn prepare_tcp_writes_ipv4_and_ipv6_literals_with_the_defaults() {
    // allow-uid absent: QEMU_USER (0 here); policy absent: read-only.
    prepare_writes(
        "web01",
        "web01",
        r#"flavor="tcp" address="198.51.100.20" port="7""#,
        "0",
        "tcp:198.51.100.20:7",
        "read-only",
    );
    prepare_writes(
        "web01",
        "web01",
        r#"flavor="tcp" address="2001:db8::20" port="65535" allow-uid="root,0" policy="full""#,
        "root,0",
        "tcp:[2001:db8::20]:65535",
        "full",
    );
}

#[test]
fn prepare_unix_dials_the_container_directory_socket() {
    prepare_writes(
        "one_7.a",
        "one_7.a",
        r#"flavor="unix" directory="/srv/vmi/one-7" allow-uid="0" policy="full""#,
        "0",
        "unix:/srv/vmi/one-7/vmi-sock",
        "full",
    );
}

#[test]
fn release_end_stops_both_units_and_removes_the_file() {
    let host = Host::new();
    let xml = domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7" allow-uid="0""#));
    assert_ok_silent(&host.hook(&["vm-7", "prepare", "begin", "-"], xml.as_bytes()), "prepare");
    assert_eq!(host.files(), ["vm-7.conf"]);
    assert_ok_silent(&host.hook(&["vm-7", "release", "end", "-"], xml.as_bytes()), "release");
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(
        host.calls(),
        [
            r"--no-block start kvmi-relay@vm\x2d7.socket",
            r"--no-block stop kvmi-relay@vm\x2d7.socket kvmi-relay@vm\x2d7.service"
        ]
    );
    // Again, or for a domain the hook never prepared: nothing to do, no systemctl.
    assert_ok_silent(&host.hook(&["vm-7", "release", "end", "-"], xml.as_bytes()), "second release");
    assert_ok_silent(&host.hook(&["other", "release", "end", "-"], domain("other", None).as_bytes()), "other");
    assert_eq!(host.calls().len(), 2, "{:?}", host.calls());
}

#[test]
fn migrate_and_restore_give_the_xml_back_byte_for_byte() {
    let host = Host::new();
    let mut inputs: Vec<Vec<u8>> = vec![
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#)).into_bytes(),
        // Broken metadata is not this operation's business either.
        domain("vm-7", Some(r#"flavor="vsock" cid="$(reboot)" port="7""#)).into_bytes(),
        domain("vm-7", None).into_bytes(),
        // No final newline, trailing blanks, CRLF, UTF-8, several trailing newlines.
        b"<domain>\r\n  <name>v\xc3\xa9</name>  \t".to_vec(),
        b"<domain><name>x</name></domain>\n\n\n".to_vec(),
    ];
    let mut big = domain("vm-7", None).into_bytes();
    big.extend(std::iter::repeat_n(b"<!-- filler -->\n".as_slice(), 20_000).flatten());
    inputs.push(big);
    for op in ["migrate", "restore"] {
        for input in &inputs {
            let out = host.hook(&["vm-7", op, "begin", "-"], input);
            assert_eq!(out.code, 0, "{op}: {}", out.stderr);
            assert!(
                out.stdout == *input,
                "{op}: stdout differs from stdin ({} bytes in, {} out)",
                input.len(),
                out.stdout.len()
            );
            assert!(out.stderr.is_empty(), "{op}: {}", out.stderr);
        }
    }
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(host.calls(), Vec::<String>::new());
}

#[test]
fn a_domain_without_the_metadata_is_left_alone() {
    let host = Host::new();
    let in_description = format!(
        "<domain><name>vm-7</name><uuid>{UUID}</uuid><description>see {NS}</description>\
         <metadata><x:relay xmlns:x=\"urn:example:other\" flavor=\"vsock\" cid=\"x\"/></metadata></domain>"
    );
    let no_namespace = "<domain><name>vm-7</name><metadata><relay flavor=\"vsock\" cid=\"$(x)\"/></metadata></domain>";
    for xml in [domain("vm-7", None), in_description, no_namespace.to_string()] {
        for (op, sub) in [("prepare", "begin"), ("reconnect", "begin"), ("release", "end"), ("start", "begin")] {
            let out = host.hook(&["vm-7", op, sub, "-"], xml.as_bytes());
            assert_ok_silent(&out, &format!("{op} {sub} on {xml}"));
        }
    }
    assert!(!host.run_dir().exists(), "the run directory was created");
    assert!(!host.sock_dir().exists(), "the socket directory was created");
    assert_eq!(host.calls(), Vec::<String>::new());
}

#[test]
fn other_operations_do_nothing() {
    let host = Host::new();
    let xml = domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#));
    for args in [
        &["vm-7", "start", "begin", "-"][..],
        &["vm-7", "started", "begin", "-"],
        &["vm-7", "stopped", "end", "-"],
        &["vm-7", "attach", "begin", "-"],
        &["vm-7", "prepare", "end", "-"],
        &["vm-7"],
        &[],
    ] {
        assert_ok_silent(&host.hook(args, xml.as_bytes()), &format!("{args:?}"));
    }
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(host.calls(), Vec::<String>::new());
}

/// Runs prepare and expects a refusal: non-zero, exactly one line on stderr naming `names`
/// and showing `shows` (the escaped value), no control character in it, nothing written,
/// no systemctl call.
fn refused(host: &Host, arg_name: &str, xml: &str, names: &str, shows: &str) {
    let out = host.hook(&[arg_name, "prepare", "begin", "-"], xml.as_bytes());
    let what = format!("{names} / {shows}");
    assert_ne!(out.code, 0, "{what}: accepted");
    assert!(out.stdout.is_empty(), "{what}: stdout {:?}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: not one line:\n{}", out.stderr);
    assert!(out.stderr.ends_with('\n'), "{what}");
    let line = lines[0];
    assert!(line.starts_with("kvmi-relay hook: "), "{what}: {line}");
    assert!(line.contains(names), "{what}: the line does not name {names}: {line}");
    assert!(line.contains(shows), "{what}: the line does not show {shows}: {line}");
    assert!(!line.chars().any(|c| c.is_control()), "{what}: control character in {line:?}");
    assert!(line.contains("the VM is not started"), "{what}: {line}");
    assert_eq!(host.files(), Vec::<String>::new(), "{what}: something was written");
    assert_eq!(host.calls(), Vec::<String>::new(), "{what}: systemctl was called");
}

#[test]
fn hostile_metadata_values_are_refused_with_one_line_naming_the_attribute() {
    let host = Host::new();
    let pwned = host.dir.path().join("pwned");
    let subst = format!("$(touch {})", pwned.display());
    let cases: Vec<(String, &str, String)> = vec![
        (
            r#"flavor="tcp" address="198.51.100.20&#10;KVMI_RELAY_ALLOW_UID=65534" port="7""#.into(),
            "attribute address=",
            r"'198.51.100.20\x0aKVMI_RELAY_ALLOW_UID=65534'".into(),
        ),
        (
            r#"flavor="tcp" address="198.51.100.20;reboot" port="7""#.into(),
            "attribute address=",
            "198.51.100.20;reboot".into(),
        ),
        (r#"flavor="tcp" address="monitor.example" port="7""#.into(), "attribute address=", "monitor.example".into()),
        (r#"flavor="tcp" address="256.1.1.1" port="7""#.into(), "attribute address=", "256.1.1.1".into()),
        (r#"flavor="tcp" address="198.51.100.20" port="65536""#.into(), "attribute port=", "'65536'".into()),
        (format!(r#"flavor="vsock" cid="42" port="{subst}""#), "attribute port=", subst.clone()),
        (format!(r#"flavor="vsock" cid="{subst}" port="7""#), "attribute cid=", subst.clone()),
        (r#"flavor="vsock" cid="forty-two" port="7""#.into(), "attribute cid=", "'forty-two'".into()),
        (r#"flavor="vsock" cid="042" port="7""#.into(), "attribute cid=", "'042'".into()),
        (r#"flavor="vsock" cid="2" port="7""#.into(), "attribute cid=", "'2'".into()),
        // A trailing newline is part of the value, not dropped by the shell.
        (r#"flavor="vsock" cid="42&#10;" port="7""#.into(), "attribute cid=", r"'42\x0a'".into()),
        (
            r#"flavor="vsock" cid="42" port="7" address="198.51.100.20""#.into(),
            "attribute address=",
            "does not belong".into(),
        ),
        (r#"flavor="vsock" port="7""#.into(), "attribute cid=", "needs it".into()),
        (r#"flavor="vsock" cid="42" port="7" allow-uid="0=1""#.into(), "attribute allow-uid=", "'0=1'".into()),
        (
            r#"flavor="vsock" cid="42" port="7" allow-uid="root,$(id)""#.into(),
            "attribute allow-uid=",
            "root,$(id)".into(),
        ),
        (r#"flavor="vsock" cid="42" port="7" allow-uid="""#.into(), "attribute allow-uid=", "''".into()),
        (r#"flavor="vsock" cid="42" port="7" policy="everything""#.into(), "attribute policy=", "everything".into()),
        (r#"flavor="vsock" cid="42" port="7" polcy="full""#.into(), "attribute 'polcy'", "not one of".into()),
        (r#"flavor="ssh" cid="42" port="7""#.into(), "attribute flavor=", "'ssh'".into()),
        (r#"cid="42" port="7""#.into(), "attribute flavor=", "missing".into()),
        (r#"flavor="unix" directory="srv/vmi/one-7""#.into(), "attribute directory=", "not an absolute path".into()),
        (
            r#"flavor="unix" directory="/srv/vmi/../../etc""#.into(),
            "attribute directory=",
            "'/srv/vmi/../../etc'".into(),
        ),
        (r#"flavor="unix" directory="/srv/vmi/one 7""#.into(), "attribute directory=", "'/srv/vmi/one 7'".into()),
        (r#"flavor="unix" directory="/tmp/vmi""#.into(), "attribute directory=", "PrivateTmp".into()),
        (r#"flavor="unix" directory="/srv/vmi/&#9;x""#.into(), "attribute directory=", r"/srv/vmi/\x09x".into()),
    ];
    for (attrs, names, shows) in &cases {
        refused(&host, "vm-7", &domain("vm-7", Some(attrs)), names, shows);
    }
    assert!(!pwned.exists(), "a value was run by a shell");

    // The domain's own values: its name (unit, file and socket names) and uuid (the VM pin).
    let good = r#"flavor="vsock" cid="42" port="7""#;
    for name in ["a/b", "a b", "$(id)", "-x", ".x", "x;y", "vm\u{e9}"] {
        let xml = domain(&xml_escape(name), Some(good));
        refused(&host, name, &xml, "<name> '", "must be 1 to 64");
    }
    refused(&host, &"a".repeat(65), &domain(&"a".repeat(65), Some(good)), "<name> '", "must be 1 to 64");
    // 40 dashes are 160 characters once escaped: too long for the socket path.
    let dashes = format!("a{}", "-".repeat(40));
    refused(&host, &dashes, &domain(&dashes, Some(good)), "<name> '", "once escaped");
    refused(&host, "vm-8", &domain("vm-7", Some(good)), "<name> '", "differs from the hook's argument 'vm-8'");
    let bad_uuid = domain("vm-7", Some(good)).replace(UUID, "4dea22b3-1d52-d8f3-2516-782e98ab3fa0&#10;X=1");
    refused(&host, "vm-7", &bad_uuid, "<uuid> '", r"3fa0\x0aX=1");
    let two =
        domain("vm-7", Some(good)).replace("</metadata>", &format!("<k:relay xmlns:k=\"{NS}\" {good}/></metadata>"));
    refused(&host, "vm-7", &two, "2 <relay> elements", NS);
    refused(&host, "vm-7", &format!("<domain><name>vm-7</name>{NS}"), "does not parse", "the VM is not started");
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;")
}

#[test]
fn a_configuration_the_relay_refuses_is_not_written() {
    // Passes the hook's IPv6 character pattern; the relay's --check parses it and says no.
    let host = Host::new();
    let out = host.hook(
        &["vm-7", "prepare", "begin", "-"],
        domain("vm-7", Some(r#"flavor="tcp" address="1:::::::2" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--connect (KVMI_RELAY_CONNECT)"), "the relay's line is not shown:\n{}", out.stderr);
    assert!(out.stderr.lines().last().unwrap().contains("the VM is not started"), "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new(), "a file (or a temporary one) was left");
    assert_eq!(host.calls(), Vec::<String>::new());

    // An unknown user is the relay's to judge as well.
    let out = host.hook(
        &["vm-7", "prepare", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7" allow-uid="no-such-user-kvmi""#)).as_bytes(),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("KVMI_RELAY_ALLOW_UID"), "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new());
}

#[test]
fn a_failed_systemctl_start_removes_the_configuration() {
    let host = Host::new().env("FAKE_SYSTEMCTL_RC", "1");
    let out = host.hook(
        &["vm-7", "prepare", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("systemctl --no-block start"), "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(host.calls(), [r"--no-block start kvmi-relay@vm\x2d7.socket"]);
}

#[test]
fn reconnect_never_fails() {
    let host = Host::new();
    // Broken metadata: said on stderr, exit 0 (libvirt would kill the running VM otherwise).
    let out = host.hook(
        &["vm-7", "reconnect", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="x" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("attribute cid="), "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(host.calls(), Vec::<String>::new());

    // Neither does a failing systemctl, a missing xmllint, or a name that is no instance.
    let failing = Host::new().env("FAKE_SYSTEMCTL_RC", "1");
    let out = failing.hook(
        &["vm-7", "reconnect", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let no_xmllint = Host::new().env("XMLLINT", "/nonexistent/xmllint");
    let out = no_xmllint.hook(
        &["vm-7", "reconnect", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = host.hook(
        &["a/b", "reconnect", "begin", "-"],
        domain("a/b", Some(r#"flavor="vsock" cid="42" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new());

    // Valid metadata: the file is written if missing, and the socket unit started (again).
    let xml = domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7" allow-uid="0""#));
    assert_ok_silent(&host.hook(&["vm-7", "reconnect", "begin", "-"], xml.as_bytes()), "reconnect without a file");
    let written = host.conf("vm-7");
    assert_eq!(written, expected("vm-7", r"vm\x2d7", &host, "0", "vsock:42:7", "read-only"));
    // With the file there it is kept as it is (the running relay was started from it).
    let changed = domain("vm-7", Some(r#"flavor="vsock" cid="43" port="7" allow-uid="0""#));
    assert_ok_silent(&host.hook(&["vm-7", "reconnect", "begin", "-"], changed.as_bytes()), "reconnect with a file");
    assert_eq!(host.conf("vm-7"), written);
    assert_eq!(
        host.calls(),
        [r"--no-block start kvmi-relay@vm\x2d7.socket", r"--no-block start kvmi-relay@vm\x2d7.socket"]
    );
}

#[test]
fn xmllint_missing_refuses_only_domains_that_declare_the_metadata() {
    let host = Host::new().env("XMLLINT", "/nonexistent/xmllint");
    assert_ok_silent(&host.hook(&["vm-7", "prepare", "begin", "-"], domain("vm-7", None).as_bytes()), "no metadata");
    let out = host.hook(
        &["vm-7", "prepare", "begin", "-"],
        domain("vm-7", Some(r#"flavor="vsock" cid="42" port="7""#)).as_bytes(),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("install libxml2-utils"), "{}", out.stderr);
    assert_eq!(host.files(), Vec::<String>::new());
    assert_eq!(host.calls(), Vec::<String>::new());
}

/// The writer on its own: its own patterns hold whatever the caller passes, and a refused
/// configuration leaves an existing file as it was and no temporary file.
#[test]
fn the_writer_refuses_hostile_arguments_and_keeps_the_old_file() {
    let host = Host::new();
    let writer = repo().join("libvirt/write-conf");
    let dir = host.run_dir();
    let dir_s = dir.to_str().unwrap();
    std::fs::create_dir_all(host.sock_dir()).unwrap();
    let listen = format!("KVMI_RELAY_LISTEN=unix:{}/x.sock", host.sock_dir().display());
    let good = ["KVMI_RELAY_CONNECT=vsock:42:7", "KVMI_RELAY_ALLOW_UID=0"];
    let mut args = vec![dir_s, "x", listen.as_str()];
    args.extend(good);
    let out = host.run(&writer, &args, b"");
    assert_ok_silent(&out, "good");
    let before = std::fs::read_to_string(dir.join("x.conf")).unwrap();
    assert_eq!(before, format!("{}\n{}\n{}\n", listen, good[0], good[1]));

    let newline = format!("{listen}\nKVMI_RELAY_ALLOW_UID=65534");
    let hostile: Vec<(Vec<&str>, &str)> = vec![
        (vec![dir_s, "x", newline.as_str()], r"\x0aKVMI_RELAY_ALLOW_UID"),
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_CONNECT=vsock:42:7 #"], "KVMI_RELAY_CONNECT="),
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_CONNECT='vsock:42:7'"], r"\x27vsock"),
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_CONNECT=a=b"], "KVMI_RELAY_CONNECT="),
        (vec![dir_s, "x", listen.as_str(), "kvmi_relay_connect=vsock:42:7"], "kvmi_relay_connect"),
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_=1"], "KVMI_RELAY_"),
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_ALLOW_UID=0", "KVMI_RELAY_ALLOW_UID=1"], "given twice"),
        (vec![dir_s, "../x", listen.as_str()], "name '../x'"),
        (vec![dir_s, "x/y", listen.as_str()], "name 'x/y'"),
        (vec![dir_s, ".x", listen.as_str()], "name '.x'"),
        // A backslash would escape in systemd's glob of the EnvironmentFile= path.
        (vec![dir_s, r"x\x2dy", listen.as_str()], r"name 'x\x5cx2dy'"),
        (vec!["relative", "x", listen.as_str()], "not an absolute path"),
        (vec!["--comment", "a\nb", dir_s, "x", listen.as_str()], r"a\x0ab"),
        // Passes the patterns, fails the relay's check (vsock:7 has no CID).
        (vec![dir_s, "x", listen.as_str(), "KVMI_RELAY_CONNECT=vsock:7"], "fails kvmi-relay --check"),
    ];
    for (args, shows) in &hostile {
        let out = host.run(&writer, args, b"");
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(shows), "{args:?}: the error does not show {shows}:\n{}", out.stderr);
        assert!(!out.stderr.lines().any(|l| l.chars().any(|c| c.is_control())), "{args:?}: {:?}", out.stderr);
        assert_eq!(host.files(), ["x.conf"], "{args:?}: a temporary file was left");
        assert_eq!(std::fs::read_to_string(dir.join("x.conf")).unwrap(), before, "{args:?}: the old file changed");
    }
}
