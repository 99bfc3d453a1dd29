//! Certificates made at test time (rcgen): one CA, leaves signed by it, and ways to get them
//! wrong (expired, another CA, no client-auth usage).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PublicKeyData, SanType,
};
use rustls::pki_types::CertificateDer;

pub struct Pki {
    params: CertificateParams,
    key: KeyPair,
    pub ca_pem: String,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// DER SubjectPublicKeyInfo of the leaf's key.
    pub spki_der: Vec<u8>,
}

/// Names with `://` become URI SANs, IP literals IP SANs, the rest DNS SANs.
fn sans(names: &[&str]) -> Vec<SanType> {
    names
        .iter()
        .map(|n| {
            if let Ok(ip) = n.parse() {
                SanType::IpAddress(ip)
            } else if n.contains("://") {
                SanType::URI((*n).try_into().unwrap())
            } else {
                SanType::DnsName((*n).try_into().unwrap())
            }
        })
        .collect()
}

impl Pki {
    pub fn new() -> Pki {
        Pki::named("test-ca")
    }

    pub fn named(cn: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki { params, key, ca_pem }
    }

    /// A leaf valid from 2020 to 2099 for both server and client use.
    pub fn leaf(&self, cn: &str, names: &[&str]) -> Leaf {
        self.leaf_with(cn, names, |_| {})
    }

    pub fn leaf_with(&self, cn: &str, names: &[&str], tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans(names);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        tweak(&mut params);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            spki_der: key.subject_public_key_info(),
        }
    }
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` (mode 0600) into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }
}
