//! Loading and handshakes with certificates made at test time; the handshakes run in memory
//! (two rustls connections trading records through buffers), so each refusal is seen exactly as
//! the verifier made it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConnection};

use super::test_pki::{Leaf, Pki};
use super::*;

fn settings(dir: &Path, leaf: &Leaf, ca_pem: &str, roles: Roles) -> Settings {
    let (cert, key) = leaf.write(dir, "own");
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    Settings { files: Files { cert, key, ca }, pins: Pins::default(), roles }
}

const BOTH: Roles = Roles { listen: true, dial: true };
const LISTEN: Roles = Roles { listen: true, dial: false };
const DIAL: Roles = Roles { listen: false, dial: true };

fn problems(r: Result<Loaded, Vec<FileProblem>>) -> Vec<FileProblem> {
    match r {
        Ok(_) => panic!("loaded although it should not have"),
        Err(p) => p,
    }
}

#[test]
fn good_files_load_for_both_roles_and_show_the_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let s = settings(dir.path(), &pki.leaf("relay-a", &["relay-a.example"]), &pki.ca_pem, BOTH);
    let loaded = load(&s, SystemTime::now()).unwrap();
    assert!(loaded.server.is_some() && loaded.client.is_some());
    assert_eq!(loaded.own.subject, "CN=relay-a");
    assert_eq!(utc_text(loaded.own.not_after), "2099-01-01T00:00:00Z");
    assert!(loaded.warnings.is_empty());
    let only_listen = load(&Settings { roles: LISTEN, ..s }, SystemTime::now()).unwrap();
    assert!(only_listen.server.is_some() && only_listen.client.is_none());
}

#[test]
fn every_unreadable_file_is_reported_with_its_flag() {
    let s = Settings {
        files: Files {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca\n.pem".into(),
        },
        pins: Pins::default(),
        roles: BOTH,
    };
    let p = problems(load(&s, SystemTime::now()));
    let flags: Vec<TlsFlag> = p.iter().map(|p| p.flag).collect();
    assert_eq!(flags, [TlsFlag::Cert, TlsFlag::Key, TlsFlag::Ca]);
    assert_eq!(p[0].to_string(), "/nonexistent/c.pem: cannot read: No such file or directory (os error 2)");
    // An outside value is printed escaped: a newline in a path cannot start a log line.
    assert!(p[2].to_string().starts_with("/nonexistent/ca\\n.pem: cannot read"), "{}", p[2]);
}

#[test]
fn a_file_without_pem_says_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let s = settings(dir.path(), &pki.leaf("a", &["a"]), "not a certificate\n", BOTH);
    std::fs::write(&s.files.key, "nothing\n").unwrap();
    let p = problems(load(&s, SystemTime::now()));
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].flag, TlsFlag::Key);
    assert!(p[0].problem.contains("no usable PEM private key"), "{}", p[0]);
    assert_eq!(p[1].flag, TlsFlag::Ca);
    assert!(p[1].problem.contains("holds no PEM certificate"), "{}", p[1]);
}

#[test]
fn a_key_of_another_certificate_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let s = settings(dir.path(), &pki.leaf("a", &["a"]), &pki.ca_pem, BOTH);
    std::fs::write(&s.files.key, pki.leaf("b", &["b"]).key_pem).unwrap();
    let p = problems(load(&s, SystemTime::now()));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].flag, TlsFlag::Key);
    assert!(p[0].problem.starts_with("is not the private key of the certificate in "), "{}", p[0]);
    assert!(p[0].problem.contains("own.crt (--tls-cert)"), "{}", p[0]);
}

#[test]
fn an_expired_or_not_yet_valid_own_certificate_is_refused_with_its_date() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let expired = pki.leaf_with("a", &["a"], |p| p.not_after = rcgen::date_time_ymd(2021, 1, 1));
    let p = problems(load(&settings(dir.path(), &expired, &pki.ca_pem, BOTH), SystemTime::now()));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].flag, p[0].problem.as_str()), (TlsFlag::Cert, "the certificate expired at 2021-01-01T00:00:00Z"));

    let early = pki.leaf("a", &["a"]);
    let before_2020 = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    let p = problems(load(&settings(dir.path(), &early, &pki.ca_pem, BOTH), before_2020));
    assert_eq!(p[0].problem, "the certificate is not valid before 2020-01-01T00:00:00Z");
}

#[test]
fn a_ca_that_did_not_sign_the_own_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new(), Pki::named("other-ca"));
    let s = settings(dir.path(), &pki.leaf("a", &["a"]), &other.ca_pem, LISTEN);
    let p = problems(load(&s, SystemTime::now()));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].flag, TlsFlag::Cert);
    assert!(
        p[0].problem.starts_with("is not signed by the CA in ") && p[0].problem.ends_with("ca.crt (--tls-ca)"),
        "{}",
        p[0]
    );
}

#[test]
fn a_certificate_not_made_for_client_use_is_refused_for_dialling() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server_only =
        pki.leaf_with("a", &["a"], |p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]);
    let s = settings(dir.path(), &server_only, &pki.ca_pem, LISTEN);
    assert!(load(&s, SystemTime::now()).is_ok());
    let p = problems(load(&Settings { roles: DIAL, ..s }, SystemTime::now()));
    assert!(p[0].problem.contains("for use as a TLS client (dialling TCP)"), "{}", p[0]);
}

#[test]
fn a_key_others_can_read_is_refused_and_a_group_readable_one_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let s = settings(dir.path(), &pki.leaf("a", &["a"]), &pki.ca_pem, BOTH);
    for mode in [0o644, 0o604, 0o620, 0o606] {
        std::fs::set_permissions(&s.files.key, std::fs::Permissions::from_mode(mode)).unwrap();
        let p = problems(load(&s, SystemTime::now()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].flag, TlsFlag::Key);
        assert!(p[0].problem.starts_with(&format!("mode {mode:04o} lets other users read or change")), "{}", p[0]);
    }
    std::fs::set_permissions(&s.files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let loaded = load(&s, SystemTime::now()).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].problem.starts_with("mode 0640: members of group "), "{}", loaded.warnings[0]);
}

#[test]
fn the_expiry_warning_starts_thirty_days_before() {
    let pki = Pki::new();
    let own = Presented::from_der(pki.leaf("a", &["a"]).cert_der.as_ref()).unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(expiry_warning(&own, own.not_after - 31 * day), None);
    assert_eq!(expiry_warning(&own, own.not_after - 29 * day), Some(29 * day));
    assert_eq!(expiry_warning(&own, own.not_after + day), Some(Duration::ZERO));
}

// --- handshakes ---

struct Ends {
    _dir: tempfile::TempDir,
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
}

/// A listener with `server_leaf` and a dialler with `client_leaf`, each trusting its CA, pinned
/// as given; loaded at `valid_at` (so that an expired certificate can be made into a config).
fn ends(server: (&Pki, &Leaf, Pins), client: (&Pki, &Leaf, Pins), valid_at: SystemTime) -> Ends {
    let dir = tempfile::tempdir().unwrap();
    let (sd, cd) = (dir.path().join("s"), dir.path().join("c"));
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::create_dir_all(&cd).unwrap();
    let s = Settings { pins: server.2, ..settings(&sd, server.1, &server.0.ca_pem, LISTEN) };
    let c = Settings { pins: client.2, ..settings(&cd, client.1, &client.0.ca_pem, DIAL) };
    Ends {
        server: load(&s, valid_at).unwrap().server.unwrap(),
        client: load(&c, valid_at).unwrap().client.unwrap(),
        _dir: dir,
    }
}

/// Trades records until both ends finish or fail; returns (server's, client's) outcome.
fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<(), rustls::Error>, Result<(), rustls::Error>) {
    let (s, c, _) = handshake_version(server, client);
    (s, c)
}

type Outcome = Result<(), rustls::Error>;

fn handshake_version(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Outcome, Outcome, Option<rustls::ProtocolVersion>) {
    let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
    let mut c = Connection::Client(ClientConnection::new(client, name).unwrap());
    let mut s = Connection::Server(ServerConnection::new(server).unwrap());
    let (mut se, mut ce) = (Ok(()), Ok(()));
    for _ in 0..10 {
        trade(&mut c, &mut s, &mut se);
        trade(&mut s, &mut c, &mut ce);
        if (se.is_err() || !s.is_handshaking())
            && (ce.is_err() || !c.is_handshaking())
            && !c.wants_write()
            && !s.wants_write()
        {
            break;
        }
    }
    (se, ce, c.protocol_version())
}

fn trade(from: &mut Connection, to: &mut Connection, to_result: &mut Result<(), rustls::Error>) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rest = &buf[..];
    while !rest.is_empty() && to_result.is_ok() {
        to.read_tls(&mut rest).unwrap();
        if let Err(e) = to.process_new_packets() {
            *to_result = Err(e);
        }
    }
}

fn refusal(r: &Result<(), rustls::Error>) -> (Reason, String) {
    let e = r.as_ref().expect_err("the handshake should have failed");
    let presented = Rejected::of(e).and_then(|r| r.presented.as_ref()).map(|p| p.to_string()).unwrap_or_default();
    (Reason::of(e), presented)
}

fn pins(names: &[&str], spki: &[&Leaf]) -> Pins {
    Pins {
        names: names.iter().map(|n| n.to_string()).collect(),
        spki: spki.iter().map(|l| Presented::from_der(l.cert_der.as_ref()).unwrap().spki_sha256).collect(),
    }
}

#[test]
fn a_mutual_handshake_with_matching_pins_succeeds_and_is_tls13() {
    let pki = Pki::new();
    let (monitor, hypervisor) = (pki.leaf("monitor", &["monitor.example"]), pki.leaf("vm-7", &["spiffe://p/vm/7"]));
    let e = ends(
        (&pki, &monitor, pins(&["spiffe://p/vm/7"], &[&hypervisor])),
        (&pki, &hypervisor, pins(&["monitor.example"], &[&monitor])),
        SystemTime::now(),
    );
    let (s, c, version) = handshake_version(e.server, e.client);
    assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
}

#[test]
fn without_pins_the_dialled_address_must_be_in_the_servers_certificate() {
    let pki = Pki::new();
    let (by_ip, by_name, client) =
        (pki.leaf("m", &["127.0.0.1"]), pki.leaf("m", &["monitor.example"]), pki.leaf("c", &["c"]));
    let e = ends((&pki, &by_ip, Pins::default()), (&pki, &client, Pins::default()), SystemTime::now());
    let (s, c) = handshake(e.server, e.client);
    assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
    let e = ends((&pki, &by_name, Pins::default()), (&pki, &client, Pins::default()), SystemTime::now());
    let (_, c) = handshake(e.server, e.client);
    assert_eq!(refusal(&c).0, Reason::WrongAddress);
}

#[test]
fn a_client_from_another_ca_is_refused_with_what_it_presented() {
    let (pki, other) = (Pki::new(), Pki::named("other-ca"));
    let e = ends(
        (&pki, &pki.leaf("m", &["127.0.0.1"]), Pins::default()),
        (&other, &other.leaf("intruder", &["intruder.example"]), pins(&["m"], &[])),
        SystemTime::now(),
    );
    let (s, c) = handshake(e.server, e.client);
    // TLS 1.3 sends the server's certificate first: a dialler of the other CA refuses it.
    assert_eq!(refusal(&c).0, Reason::UnknownCa);
    assert_eq!(refusal(&s).0, Reason::RefusedByPeer);

    // The dialler trusts the listener's CA but holds a certificate of another: the listener refuses.
    let intruder = other.leaf("intruder", &["intruder.example"]);
    let client = mixed_client(&intruder, &pki.ca_pem);
    let e = ends(
        (&pki, &pki.leaf("m", &["127.0.0.1"]), Pins::default()),
        (&pki, &pki.leaf("c", &["c"]), Pins::default()),
        SystemTime::now(),
    );
    let (s, c) = handshake(e.server, client);
    let (reason, presented) = refusal(&s);
    assert_eq!(reason, Reason::UnknownCa);
    assert!(presented.starts_with("subject=\"CN=intruder\" sans=DNS:intruder.example spki=sha256:"), "{presented}");
    assert_eq!(refusal(&c).0, Reason::RefusedByPeer);
}

/// A dialler that trusts `ca_pem` while holding `leaf` (signed by someone else): `load` would
/// refuse such files, a foreign peer has them anyway.
fn mixed_client(leaf: &Leaf, ca_pem: &str) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![leaf.cert_der.clone()], key)
            .unwrap(),
    )
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let e = ends(
        (&pki, &pki.leaf("m", &["127.0.0.1"]), Pins::default()),
        (&pki, &pki.leaf("c", &["c"]), Pins::default()),
        SystemTime::now(),
    );
    let mut roots = RootCertStore::empty();
    roots.add(ca_der(&pki)).unwrap();
    let anonymous = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let (s, _) = handshake(e.server, anonymous);
    assert_eq!(refusal(&s).0, Reason::NoCertificate);
}

fn ca_der(pki: &Pki) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap()
}

#[test]
fn a_wrong_name_or_key_pin_is_refused_after_a_valid_chain() {
    let pki = Pki::new();
    let (monitor, vm7, vm8) = (
        pki.leaf("m", &["monitor.example"]),
        pki.leaf("vm-7", &["spiffe://p/vm/7"]),
        pki.leaf("vm-8", &["spiffe://p/vm/8"]),
    );
    // The listener expects VM 7 and gets VM 8, signed by the same CA.
    let e = ends(
        (&pki, &monitor, pins(&["spiffe://p/vm/7"], &[])),
        (&pki, &vm8, pins(&["monitor.example"], &[])),
        SystemTime::now(),
    );
    let (s, _) = handshake(e.server, e.client);
    let (reason, presented) = refusal(&s);
    assert_eq!(reason, Reason::WrongName);
    assert!(presented.contains("sans=URI:spiffe://p/vm/8"), "{presented}");
    // The dialler pins the monitor's key and meets another key under the right name.
    let impostor = pki.leaf("m", &["monitor.example"]);
    let e = ends(
        (&pki, &impostor, Pins::default()),
        (&pki, &vm7, pins(&["monitor.example"], &[&monitor])),
        SystemTime::now(),
    );
    let (_, c) = handshake(e.server, e.client);
    assert_eq!(refusal(&c).0, Reason::WrongPin);
}

#[test]
fn an_expired_peer_certificate_is_refused() {
    let pki = Pki::new();
    let old = pki.leaf_with("vm-7", &["spiffe://p/vm/7"], |p| p.not_after = rcgen::date_time_ymd(2021, 1, 1));
    let in_2020 = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let e = ends((&pki, &pki.leaf("m", &["127.0.0.1"]), Pins::default()), (&pki, &old, Pins::default()), in_2020);
    let (s, _) = handshake(e.server, e.client);
    assert_eq!(refusal(&s).0, Reason::Expired);
}

#[test]
fn plaintext_at_a_tls_listener_is_not_tls() {
    let pki = Pki::new();
    let e = ends(
        (&pki, &pki.leaf("m", &["127.0.0.1"]), Pins::default()),
        (&pki, &pki.leaf("c", &["c"]), Pins::default()),
        SystemTime::now(),
    );
    let mut s = ServerConnection::new(e.server).unwrap();
    // The start of QEMU's KVMi handshake: a size field, then the VM's UUID.
    let mut hello: &[u8] = &[96, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0];
    s.read_tls(&mut hello).unwrap();
    let e = s.process_new_packets().unwrap_err();
    assert_eq!(Reason::of(&e), Reason::NotTls, "{e}");
}
