//! Turning `--tls-cert`, `--tls-key` and `--tls-ca` into rustls configurations, refusing bad
//! input before anything is bound: every problem names the flag and the file.
//!
//! Checked, in this order, all of it reported at once (`--check` prints the lot):
//! - each file readable and holding what it should (PEM certificates; one private key);
//! - the key's permissions: refused if anyone but the owner and its group can read it, or
//!   anyone but the owner can write it; a group-readable key is accepted with a warning (a
//!   key shared with the relay's service group, root:kvmi-relay 0640, is a usual layout);
//! - the key belongs to the certificate (their SubjectPublicKeyInfo match);
//! - the own certificate is inside its validity period now;
//! - the CA signed the own certificate, for the use this relay makes of it (server when it
//!   listens on TCP, client when it dials TCP): one CA per provider signs both ends.
//!
//! The configurations are TLS 1.3 only and always mutual. Session resumption is off both ways:
//! a resumed session would skip the certificate checks, also after a reload changed the CA or
//! the pins; KVMi sessions are long, so a full handshake per session costs nothing that matters.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::pin::Pins;
use super::presented::{Presented, escape, utc_text};
use super::verify::{ClientVerifier, ServerVerifier};

/// Which flag a problem belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFlag {
    Cert,
    Key,
    Ca,
}

/// The three files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Which TCP ends use TLS: the listener (TLS server) and/or the dialler (TLS client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub listen: bool,
    pub dial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub files: Files,
    pub pins: Pins,
    pub roles: Roles,
}

/// A problem (or a warning) with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub flag: TlsFlag,
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", shown(&self.path), self.problem)
    }
}

/// A path as printed in messages: escaped.
pub fn shown(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// What loading produced: the configurations for the roles asked for, and the own certificate.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub server: Option<Arc<ServerConfig>>,
    pub client: Option<Arc<ClientConfig>>,
    /// The own certificate, as a peer sees it (subject, SANs, SPKI pin, expiry).
    pub own: Presented,
    /// Accepted, but worth a warning at start-up and reload (a group-readable key).
    pub warnings: Vec<FileProblem>,
}

/// The crypto provider: ring, which builds with a C compiler alone (aws-lc-rs, rustls' default,
/// also needs cmake, and nasm for some targets). rustls marks ring's provider deprecated
/// because it has no post-quantum key exchange (X25519MLKEM768): a recorded session could be
/// decrypted by a future quantum computer (docs/deployment.md, "What TLS does not protect").
pub fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Problems(Vec<FileProblem>);

impl Problems {
    fn add(&mut self, flag: TlsFlag, path: &Path, problem: impl Into<String>) {
        self.0.push(FileProblem { flag, path: path.to_path_buf(), problem: problem.into() });
    }
}

fn read(p: &mut Problems, flag: TlsFlag, path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            p.add(flag, path, format!("cannot read: {e}"));
            None
        }
    }
}

fn certificates(p: &mut Problems, flag: TlsFlag, path: &Path, pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if certs.is_empty() => {
            p.add(flag, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
            None
        }
        Ok(certs) => Some(certs),
        Err(e) => {
            p.add(flag, path, format!("is not valid PEM: {e}"));
            None
        }
    }
}

/// Refuses a key others can read or change; warns when its group can read it.
fn key_mode(p: &mut Problems, warnings: &mut Vec<FileProblem>, path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        p.add(
            TlsFlag::Key,
            path,
            format!("mode {mode:04o} lets other users read or change the private key; chmod 600 (or 640 for a group)"),
        );
    } else if mode & 0o040 != 0 {
        warnings.push(FileProblem {
            flag: TlsFlag::Key,
            path: path.to_path_buf(),
            problem: format!("mode {mode:04o}: members of group {} can read the private key", meta_gid(&meta)),
        });
    }
}

fn meta_gid(meta: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::MetadataExt::gid(meta)
}

/// Loads and checks the files for `s.roles`, as of `now`.
pub fn load(s: &Settings, now: SystemTime) -> Result<Loaded, Vec<FileProblem>> {
    let f = &s.files;
    let mut p = Problems(Vec::new());
    let mut warnings = Vec::new();
    let provider = provider();

    let chain = read(&mut p, TlsFlag::Cert, &f.cert).and_then(|pem| certificates(&mut p, TlsFlag::Cert, &f.cert, &pem));

    let key = read(&mut p, TlsFlag::Key, &f.key).and_then(|pem| {
        key_mode(&mut p, &mut warnings, &f.key);
        match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(k) => Some(k),
            Err(e) => {
                p.add(TlsFlag::Key, &f.key, format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"));
                None
            }
        }
    });

    let roots = read(&mut p, TlsFlag::Ca, &f.ca)
        .and_then(|pem| certificates(&mut p, TlsFlag::Ca, &f.ca, &pem))
        .and_then(|cas| {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                if let Err(e) = roots.add(ca) {
                    p.add(TlsFlag::Ca, &f.ca, format!("holds a certificate that cannot be a trust anchor: {e}"));
                    return None;
                }
            }
            Some(Arc::new(roots))
        });

    let own = chain.as_ref().and_then(|chain| match Presented::from_der(chain[0].as_ref()) {
        Ok(own) => Some(own),
        Err(e) => {
            p.add(TlsFlag::Cert, &f.cert, format!("its first certificate is {e}"));
            None
        }
    });
    let mut in_validity = false;
    if let Some(own) = &own {
        if own.not_after <= now {
            p.add(TlsFlag::Cert, &f.cert, format!("the certificate expired at {}", utc_text(own.not_after)));
        } else if own.not_before > now {
            p.add(TlsFlag::Cert, &f.cert, format!("the certificate is not valid before {}", utc_text(own.not_before)));
        } else {
            in_validity = true;
        }
    }

    let certified = match (&chain, &key) {
        (Some(chain), Some(key)) => match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
            Ok(_) => true,
            Err(rustls::Error::InconsistentKeys(_)) => {
                let cert = shown(&f.cert);
                p.add(
                    TlsFlag::Key,
                    &f.key,
                    format!("is not the private key of the certificate in {cert} (--tls-cert)"),
                );
                false
            }
            Err(e) => {
                p.add(TlsFlag::Key, &f.key, format!("cannot be used as a signing key: {e}"));
                false
            }
        },
        _ => false,
    };

    if let (Some(chain), Some(roots), true) = (&chain, &roots, in_validity) {
        signed_by_ca(&mut p, s, chain, roots, &provider, now);
    }

    if !p.0.is_empty() {
        return Err(p.0);
    }
    let (Some(chain), Some(key), Some(roots), Some(own), true) = (chain, key, roots, own, certified) else {
        unreachable!("every missing piece was reported as a problem");
    };
    let (server, client) = configs(s, chain, key, roots, provider).map_err(|e| {
        vec![FileProblem {
            flag: TlsFlag::Key,
            path: f.key.clone(),
            problem: format!("cannot set up TLS with it: {e}"),
        }]
    })?;
    Ok(Loaded { server, client, own, warnings })
}

/// The CA must have signed the own certificate for each use this relay makes of it.
fn signed_by_ca(
    p: &mut Problems,
    s: &Settings,
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) {
    let f = &s.files;
    let now = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let (leaf, intermediates) = (&chain[0], &chain[1..]);
    let mut uses: Vec<(&str, Result<(), rustls::Error>)> = Vec::new();
    if s.roles.listen {
        let r = ParsedCertificate::try_from(leaf).and_then(|c| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &c,
                roots,
                intermediates,
                now,
                provider.signature_verification_algorithms.all,
            )
        });
        uses.push(("server (the TCP listener)", r));
    }
    if s.roles.dial {
        let r = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
            .and_then(|v| v.verify_client_cert(leaf, intermediates, now).map(|_| ()));
        uses.push(("client (dialling TCP)", r));
    }
    for (what, r) in uses {
        match r {
            Ok(()) => {}
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                p.add(TlsFlag::Cert, &f.cert, format!("is not signed by the CA in {} (--tls-ca)", shown(&f.ca)));
            }
            Err(e) => p.add(
                TlsFlag::Cert,
                &f.cert,
                format!("does not verify against the CA in {} (--tls-ca) for use as a TLS {what}: {e}", shown(&f.ca)),
            ),
        }
    }
}

type Configs = (Option<Arc<ServerConfig>>, Option<Arc<ClientConfig>>);

fn configs(
    s: &Settings,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Configs, rustls::Error> {
    let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let verifier_error = |e: rustls::server::VerifierBuilderError| rustls::Error::General(e.to_string());
    let server = if s.roles.listen {
        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(verifier_error)?;
        let mut c = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)?
            .with_client_cert_verifier(Arc::new(ClientVerifier::new(inner, s.pins.clone())))
            .with_single_cert(chain.clone(), key.clone_key())?;
        c.session_storage = Arc::new(NoServerSessionStorage {});
        c.send_tls13_tickets = 0;
        Some(Arc::new(c))
    } else {
        None
    };
    let client = if s.roles.dial {
        let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(verifier_error)?;
        let verifier = ServerVerifier::new(inner, roots, provider.signature_verification_algorithms, s.pins.clone());
        let mut c = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)?;
        c.resumption = Resumption::disabled();
        Some(Arc::new(c))
    } else {
        None
    };
    Ok((server, client))
}
