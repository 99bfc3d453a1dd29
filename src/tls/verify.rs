//! Who gets in over TLS: the CA's chain first (rustls' WebPKI verifiers), then the pins.
//!
//! Both verifiers wrap the WebPKI ones and never replace their checks: chain, validity period,
//! key usage and the handshake signatures stay rustls'. After a valid chain they apply `Pins`
//! (`pin.rs`). Every refusal carries what the peer presented (`Presented`) and why (`Reason`),
//! inside rustls' `CertificateError::Other`, so that the handshake's error alone tells the log
//! line and the refusal counter everything; the peer sees a `bad_certificate` alert.
//!
//! The dialler checks the server's name only where no pin says who it must be: without pins
//! the certificate must be valid for the dialled IP address (an IP SAN), as WebPKI checks; with
//! a name or SPKI pin the pin replaces that check (a VM's monitor is named, not addressed).

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore, SignatureScheme,
};

use super::pin::{Mismatch, Pins};
use super::presented::Presented;

/// Why a TLS peer was refused (a counter per reason in `stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The peer sent no certificate (a listener requires one).
    NoCertificate,
    /// The chain does not lead to `--tls-ca`.
    UnknownCa,
    Expired,
    NotYetValid,
    /// The dialled server's certificate is not valid for the dialled address.
    WrongAddress,
    /// `--tls-peer-name` did not match.
    WrongName,
    /// `--tls-peer-spki` did not match.
    WrongPin,
    /// Anything else wrong with the certificate (unparsable, bad signature, wrong key usage).
    BadCertificate,
    /// The far side refused us (it sent an alert), e.g. it does not accept our certificate.
    RefusedByPeer,
    /// What arrived is not TLS 1.3 (a plaintext peer, an older TLS version, garbage).
    NotTls,
    /// The handshake did not finish within the handshake timeout.
    HandshakeTimeout,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::NoCertificate,
        Reason::UnknownCa,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongAddress,
        Reason::WrongName,
        Reason::WrongPin,
        Reason::BadCertificate,
        Reason::RefusedByPeer,
        Reason::NotTls,
        Reason::HandshakeTimeout,
    ];

    /// The reason's name in logs, `stats` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoCertificate => "no_certificate",
            Reason::UnknownCa => "unknown_ca",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongAddress => "wrong_address",
            Reason::WrongName => "wrong_name",
            Reason::WrongPin => "wrong_pin",
            Reason::BadCertificate => "bad_certificate",
            Reason::RefusedByPeer => "refused_by_peer",
            Reason::NotTls => "not_tls",
            Reason::HandshakeTimeout => "handshake_timeout",
        }
    }

    /// Sorts a failed handshake's error into a reason.
    pub fn of(e: &Error) -> Reason {
        if let Some(r) = Rejected::of(e) {
            return r.reason;
        }
        match e {
            Error::NoCertificatesPresented => Reason::NoCertificate,
            Error::InvalidCertificate(c) => Reason::of_certificate(c),
            Error::AlertReceived(_) => Reason::RefusedByPeer,
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. }
            | Error::PeerIncompatible(_)
            | Error::PeerMisbehaved(_)
            | Error::DecryptError => Reason::NotTls,
            _ => Reason::BadCertificate,
        }
    }

    fn of_certificate(c: &CertificateError) -> Reason {
        match c {
            CertificateError::UnknownIssuer => Reason::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Reason::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => Reason::NotYetValid,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => Reason::WrongAddress,
            _ => Reason::BadCertificate,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A peer certificate refused by a verifier here: why, what it presented, and rustls' own
/// error where the chain check failed.
#[derive(Debug)]
pub struct Rejected {
    pub reason: Reason,
    pub presented: Option<Presented>,
    pub detail: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejected {}

impl Rejected {
    /// The refusal inside a handshake error, if a verifier here made it.
    pub fn of(e: &Error) -> Option<&Rejected> {
        match e {
            Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref::<Rejected>(),
            _ => None,
        }
    }

    fn into_error(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// Reads the certificate, runs the chain check, then the pins; every failure a `Rejected`.
fn decide(
    pins: &Pins,
    end_entity: &CertificateDer<'_>,
    chain: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    let presented = match Presented::from_der(end_entity.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            return Err(
                Rejected { reason: Reason::BadCertificate, presented: None, detail: e.to_string() }.into_error()
            );
        }
    };
    if let Err(e) = chain() {
        let reason = Reason::of(&e);
        return Err(Rejected { reason, presented: Some(presented), detail: e.to_string() }.into_error());
    }
    match pins.check(&presented) {
        Ok(()) => Ok(()),
        Err(m) => {
            let (reason, detail) = match m {
                Mismatch::Name => (Reason::WrongName, "no subject alternative name matches --tls-peer-name"),
                Mismatch::Spki => (Reason::WrongPin, "the public key's SHA-256 matches no --tls-peer-spki"),
            };
            Err(Rejected { reason, presented: Some(presented), detail: detail.into() }.into_error())
        }
    }
}

/// The listener's verifier: a client certificate is mandatory, signed by `--tls-ca`, pinned.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    pins: Pins,
}

impl ClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, pins: Pins) -> ClientVerifier {
        ClientVerifier { inner, pins }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        decide(&self.pins, end_entity, || self.inner.verify_client_cert(end_entity, intermediates, now).map(|_| ()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The dialler's verifier: the server's chain must lead to `--tls-ca`; then the pins, or
/// without pins the dialled address.
#[derive(Debug)]
pub struct ServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    pins: Pins,
}

impl ServerVerifier {
    pub fn new(
        inner: Arc<WebPkiServerVerifier>,
        roots: Arc<RootCertStore>,
        algorithms: WebPkiSupportedAlgorithms,
        pins: Pins,
    ) -> ServerVerifier {
        ServerVerifier { inner, roots, algorithms, pins }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        decide(&self.pins, end_entity, || {
            if self.pins.is_empty() {
                self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).map(|_| ())
            } else {
                let cert = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            }
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
