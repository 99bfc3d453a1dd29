//! Who the peer must be beyond "signed by our CA": `--tls-peer-name` and `--tls-peer-spki`.
//!
//! A pure decision over what the peer presented (`Presented`), unit-tested without sockets; the
//! verifiers in `verify.rs` call it only after the chain has been validated, so a pin can narrow
//! who the CA admits but never admit someone the CA did not sign.
//!
//! Rules:
//! - a name pin matches a DNS SAN (ASCII case-insensitive, exact: a wildcard SAN does not match
//!   a pinned name) or a URI SAN (byte-exact, e.g. a SPIFFE id). The subject's CN is not a name.
//! - an SPKI pin is the SHA-256 of the peer's DER SubjectPublicKeyInfo (RFC 7469), written
//!   `sha256:BASE64`.
//! - several values of one flag: any one of them suffices (a new name or key can be added
//!   before the peer switches to it); both flags given: both must match.

use base64::Engine as _;

use super::presented::{Presented, SPKI_SHA256_BYTES, San, escape};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// DNS or URI SANs, any of which the peer must carry (empty: no name pin).
    pub names: Vec<String>,
    /// SPKI SHA-256 hashes, one of which the peer's key must have (empty: no key pin).
    pub spki: Vec<[u8; SPKI_SHA256_BYTES]>,
}

/// Which pin the peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Name,
    Spki,
}

impl Pins {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.spki.is_empty()
    }

    /// Whether `peer` satisfies every pin given.
    pub fn check(&self, peer: &Presented) -> Result<(), Mismatch> {
        if !self.names.is_empty() && !self.names.iter().any(|n| carries_name(peer, n)) {
            return Err(Mismatch::Name);
        }
        if !self.spki.is_empty() && !self.spki.contains(&peer.spki_sha256) {
            return Err(Mismatch::Spki);
        }
        Ok(())
    }
}

fn carries_name(peer: &Presented, name: &str) -> bool {
    peer.sans.iter().any(|san| match san {
        San::Dns(d) => d.eq_ignore_ascii_case(name),
        San::Uri(u) => u == name,
        San::Ip(_) | San::Other(_) => false,
    })
}

/// Checks one `--tls-peer-name` value: a DNS name or a URI, printable ASCII without spaces.
pub fn parse_name(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("an empty name pins nothing".into());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("'{}' is not a DNS name or URI (printable ASCII, no spaces)", escape(t)));
    }
    if t.contains('*') {
        return Err(format!("'{}': a pin names one peer, wildcards are not accepted", escape(t)));
    }
    Ok(t.to_string())
}

/// Parses one `--tls-peer-spki` value: `sha256:` and the base64 of 32 bytes.
pub fn parse_spki(text: &str) -> Result<[u8; SPKI_SHA256_BYTES], String> {
    let t = text.trim();
    let Some(b64) = t.strip_prefix("sha256:") else {
        return Err(format!("'{}' is not sha256:BASE64 (the SHA-256 of the peer's SubjectPublicKeyInfo)", escape(t)));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("'{}' is not base64: {e}", escape(t)))?;
    <[u8; SPKI_SHA256_BYTES]>::try_from(bytes.as_slice())
        .map_err(|_| format!("'{}' holds {} bytes, a SHA-256 has {SPKI_SHA256_BYTES}", escape(t), bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn peer(sans: Vec<San>, spki: u8) -> Presented {
        Presented {
            subject: "CN=vm-7".into(),
            sans,
            spki_sha256: [spki; SPKI_SHA256_BYTES],
            not_before: UNIX_EPOCH,
            not_after: UNIX_EPOCH,
        }
    }

    #[test]
    fn no_pins_admit_whoever_the_ca_signed() {
        assert_eq!(Pins::default().check(&peer(vec![], 1)), Ok(()));
    }

    #[test]
    fn a_name_pin_matches_a_dns_or_uri_san_and_nothing_else() {
        let pins = Pins { names: vec!["vm-7.example".into(), "spiffe://p/vm/7".into()], spki: vec![] };
        assert_eq!(pins.check(&peer(vec![San::Dns("VM-7.example".into())], 1)), Ok(()));
        assert_eq!(pins.check(&peer(vec![San::Uri("spiffe://p/vm/7".into())], 1)), Ok(()));
        assert_eq!(pins.check(&peer(vec![San::Uri("spiffe://p/vm/70".into())], 1)), Err(Mismatch::Name));
        assert_eq!(pins.check(&peer(vec![San::Dns("*.example".into())], 1)), Err(Mismatch::Name));
        assert_eq!(pins.check(&peer(vec![San::Other("vm-7.example".into())], 1)), Err(Mismatch::Name));
        // The subject CN says vm-7 too, and counts for nothing.
        assert_eq!(pins.check(&peer(vec![], 1)), Err(Mismatch::Name));
    }

    #[test]
    fn an_spki_pin_matches_one_of_the_hashes_and_both_pins_must_pass() {
        let pins = Pins { names: vec!["vm-7.example".into()], spki: vec![[2; 32], [3; 32]] };
        let named = |spki| peer(vec![San::Dns("vm-7.example".into())], spki);
        assert_eq!(pins.check(&named(3)), Ok(()));
        assert_eq!(pins.check(&named(1)), Err(Mismatch::Spki));
        assert_eq!(pins.check(&peer(vec![], 2)), Err(Mismatch::Name));
    }

    #[test]
    fn pin_syntax_is_checked_with_the_value_escaped() {
        let pin = format!("sha256:{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
        assert_eq!(parse_spki(&pin), Ok([7; 32]));
        assert!(parse_spki("sha1:AAAA").unwrap_err().contains("sha256:BASE64"));
        assert!(parse_spki("sha256:!!").unwrap_err().contains("not base64"));
        assert!(parse_spki("sha256:AAAA").unwrap_err().contains("holds 3 bytes"));
        assert!(parse_name("a\nb").unwrap_err().contains("a\\nb"));
        assert!(parse_name("*.example").is_err());
        assert_eq!(parse_name(" spiffe://p/vm/7 "), Ok("spiffe://p/vm/7".into()));
    }
}
