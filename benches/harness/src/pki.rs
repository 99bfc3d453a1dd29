//! The certificates of the TLS contenders, made when the bench starts (rcgen): one CA and one
//! leaf that every hop presents, as a server to the dialler and as a client to the listener. The
//! leaf names 127.0.0.1, the address every hop dials, so each tool's default check of the dialled
//! name passes with verification on; the listener requires the leaf as client certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// Where a hop finds its identity and the CA it checks its peer against (PEM files).
#[derive(Debug, Clone)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the CA and the hops' leaf under `dir` (the key mode 0600, as kvmi-relay requires).
pub fn make(dir: &Path) -> Result<Files, String> {
    let bad = |what: &str, e: rcgen::Error| format!("make the bench's {what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(|e| bad("CA key", e))?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "kvmi-relay bench CA");
    let ca_pem = ca.self_signed(&ca_key).map_err(|e| bad("CA", e))?.pem();

    let key = KeyPair::generate().map_err(|e| bad("hop key", e))?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, "kvmi-relay-bench-hop");
    leaf.subject_alt_names = vec![
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        SanType::DnsName("kvmi-relay-bench-hop".try_into().map_err(|e| bad("hop name", e))?),
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let issuer = Issuer::from_params(&ca, &ca_key);
    let cert_pem = leaf.signed_by(&key, &issuer).map_err(|e| bad("hop certificate", e))?.pem();

    let files = Files { ca: dir.join("ca.pem"), cert: dir.join("hop.crt"), key: dir.join("hop.key") };
    let write = |p: &Path, text: &str| std::fs::write(p, text).map_err(|e| format!("write {}: {e}", p.display()));
    write(&files.ca, &ca_pem)?;
    write(&files.cert, &cert_pem)?;
    write(&files.key, &key.serialize_pem())?;
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 0600 {}: {e}", files.key.display()))?;
    Ok(files)
}
