//! What a certificate says about its holder, read for pins and for logs: subject, subject
//! alternative names, the SHA-256 of its SubjectPublicKeyInfo (RFC 7469's pin) and validity.
//!
//! Everything here comes from outside (a peer, or a file an operator pointed at) and is printed
//! escaped: a subject or SAN can hold any byte, and none may forge a log line.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Length of a SHA-256 digest, the only pin hash accepted.
pub const SPKI_SHA256_BYTES: usize = 32;

/// One subject alternative name, as far as pins and logs care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Dns(String),
    Uri(String),
    Ip(std::net::IpAddr),
    /// Any other kind (e-mail, directory name, ...): shown, never matched.
    Other(String),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(d) => write!(f, "DNS:{}", escape(d)),
            San::Uri(u) => write!(f, "URI:{}", escape(u)),
            San::Ip(ip) => write!(f, "IP:{ip}"),
            San::Other(o) => write!(f, "{}", escape(o)),
        }
    }
}

/// What an end-entity certificate presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The subject's distinguished name, RFC 4514-like (as x509-parser prints it).
    pub subject: String,
    pub sans: Vec<San>,
    /// SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: [u8; SPKI_SHA256_BYTES],
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The certificate could not be parsed as X.509.
#[derive(Debug, thiserror::Error)]
#[error("not a parsable X.509 certificate: {0}")]
pub struct Unparsable(String);

impl Presented {
    pub fn from_der(der: &[u8]) -> Result<Presented, Unparsable> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| Unparsable(e.to_string()))?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                sans.push(match name {
                    GeneralName::DNSName(d) => San::Dns((*d).to_string()),
                    GeneralName::URI(u) => San::Uri((*u).to_string()),
                    GeneralName::IPAddress(b) => match ip_from_bytes(b) {
                        Some(ip) => San::Ip(ip),
                        None => San::Other(format!("IP:{b:02x?}")),
                    },
                    other => San::Other(other.to_string()),
                });
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        let mut spki_sha256 = [0u8; SPKI_SHA256_BYTES];
        spki_sha256.copy_from_slice(digest.as_ref());
        let validity = cert.validity();
        Ok(Presented {
            subject: cert.subject().to_string(),
            sans,
            spki_sha256,
            not_before: unix_to_system(validity.not_before.timestamp()),
            not_after: unix_to_system(validity.not_after.timestamp()),
        })
    }

    /// The pin as `--tls-peer-spki` takes it: `sha256:BASE64`.
    pub fn spki_pin(&self) -> String {
        spki_pin_text(&self.spki_sha256)
    }

    /// The SANs, comma-separated and escaped, for one log field.
    pub fn sans_text(&self) -> String {
        if self.sans.is_empty() {
            return "none".into();
        }
        self.sans.iter().map(San::to_string).collect::<Vec<_>>().join(",")
    }
}

/// `key=value` fields for a log line: `subject="..." sans=... spki=sha256:...`.
impl fmt::Display for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subject=\"{}\" sans={} spki={}", escape(&self.subject), self.sans_text(), self.spki_pin())
    }
}

pub fn spki_pin_text(hash: &[u8; SPKI_SHA256_BYTES]) -> String {
    format!("sha256:{}", base64::engine::general_purpose::STANDARD.encode(hash))
}

/// Seconds since the epoch as a `SystemTime` (certificates before 1970 clamp to the epoch).
fn unix_to_system(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// Seconds since the epoch, for stats and metrics.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages about validity.
pub fn utc_text(t: SystemTime) -> String {
    let secs = unix_secs(t);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// A value from outside, made safe to print inside a quoted log field: the project's escaping
/// rule (`crate::escape`), and double quotes escaped too, so a subject cannot close its field.
pub fn escape(s: &str) -> String {
    crate::escape::escape(s).replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_a_value_on_one_line_and_unforgeable() {
        assert_eq!(escape("vm-7.example"), "vm-7.example");
        assert_eq!(escape("a\nlevel=error b"), "a\\nlevel=error b");
        assert_eq!(escape("x\"y\\z"), "x\\\"y\\\\z");
        assert_eq!(escape("\u{202e}evil"), "\\u{202e}evil");
    }

    #[test]
    fn a_certificate_shows_its_subject_sans_and_spki_pin() {
        let pki = crate::tls::test_pki::Pki::new();
        let leaf = pki.leaf("vm-7", &["vm-7.example", "spiffe://provider/vm/7", "127.0.0.1"]);
        let p = Presented::from_der(leaf.cert_der.as_ref()).unwrap();
        assert!(p.subject.contains("CN=vm-7"), "{}", p.subject);
        assert_eq!(
            p.sans,
            vec![
                San::Dns("vm-7.example".into()),
                San::Uri("spiffe://provider/vm/7".into()),
                San::Ip("127.0.0.1".parse().unwrap())
            ]
        );
        // The pin is what `openssl pkey -pubout | openssl dgst -sha256 -binary | base64` says:
        // the hash of the DER SubjectPublicKeyInfo of the leaf's key.
        let spki = ring::digest::digest(&ring::digest::SHA256, &leaf.spki_der);
        assert_eq!(p.spki_pin(), spki_pin_text(spki.as_ref().try_into().unwrap()));
        assert!(p.to_string().starts_with(
            "subject=\"CN=vm-7\" sans=DNS:vm-7.example,URI:spiffe://provider/vm/7,IP:127.0.0.1 spki=sha256:"
        ));
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc_text(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(UNIX_EPOCH + Duration::from_secs(951_825_599)), "2000-02-29T11:59:59Z");
        assert_eq!(utc_text(UNIX_EPOCH + Duration::from_secs(4_070_908_800)), "2099-01-01T00:00:00Z");
    }

    #[test]
    fn garbage_is_unparsable_not_a_panic() {
        assert!(Presented::from_der(b"\x30\x03abc").is_err());
    }
}
