//! Who gets in over TCP, by certificate: mutual TLS 1.3 with rustls.
//!
//! - `load.rs`: `--tls-cert/--tls-key/--tls-ca` into rustls configurations, every problem named
//!   by flag and file, checked before anything is bound;
//! - `verify.rs`: the verifiers (WebPKI's chain check, then the pins), and why a peer was
//!   refused (`Reason`), with what it presented;
//! - `pin.rs`: `--tls-peer-name` / `--tls-peer-spki`, a pure decision over what a peer presented;
//! - `presented.rs`: reading a certificate for pins and logs (subject, SANs, SPKI hash, validity).
//!
//! Invariants: TLS 1.3 only; always mutual (a listener requires a client certificate signed by
//! the CA, a dialler verifies the server's); pins only narrow what the chain check admitted; no
//! session resumption (every session is verified against the configuration in force).
//! This module depends on nothing above it (no configuration, no connection types).

mod load;
mod pin;
mod presented;
#[cfg(test)]
pub(crate) mod test_pki;
mod verify;

use std::time::{Duration, SystemTime};

pub use load::{FileProblem, Files, Loaded, Roles, Settings, TlsFlag, load, provider, shown};
pub use pin::{Mismatch, Pins, parse_name, parse_spki};
pub use presented::{Presented, San, escape, spki_pin_text, unix_secs, utc_text};
pub use verify::{Reason, Rejected};

/// How long before its own certificate expires the relay starts warning in its log.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// Time left on the own certificate, when it is less than `EXPIRY_WARNING_DAYS` (zero once it
/// has expired).
pub fn expiry_warning(own: &Presented, now: SystemTime) -> Option<Duration> {
    let left = own.not_after.duration_since(now).unwrap_or(Duration::ZERO);
    (left < Duration::from_secs(EXPIRY_WARNING_DAYS * 86_400)).then_some(left)
}

#[cfg(test)]
mod tests;
