//! QEMU's handshake (`kvmi_qemu2introspector`) and the introspector's answer, parsed.
//!
//! QEMU sends, as soon as the socket opens: `u32 struct_size; u8 uuid[16]; u32 padding;
//! i64 start_time; char name[64]` (96 bytes); a newer QEMU branch appends `u64 max_gpa`
//! (104 bytes). The introspector answers `u32 struct_size; u8 cookie_hash[20]` (24 bytes).
//!
//! Invariants:
//! - only the two sizes QEMU sends are accepted; anything else is refused with the size seen,
//!   as soon as the 4-byte size field is in (libkvmi itself accepts 32..64 KiB, but a relay
//!   that pins a VM must know where the name is and where the messages begin);
//! - the parser never asks for more than the size field says, so the bytes after the handshake
//!   (the first messages) are not consumed;
//! - the parsed handshake is for checks and logs only: the relay forwards the original bytes.

use std::fmt;

/// The original handshake.
pub const QEMU_HANDSHAKE_BYTES: usize = 96;
/// The newer form with `max_gpa`.
pub const QEMU_HANDSHAKE_MAX_GPA_BYTES: usize = 104;
/// The introspector's answer as libkvmi sends it.
pub const INTROSPECTOR_ANSWER_BYTES: usize = 24;
/// The largest answer accepted: an answer a later introspector extends stays framed.
pub const INTROSPECTOR_ANSWER_MAX_BYTES: usize = 4096;
/// `char name[64]`.
pub const NAME_BYTES: usize = 64;

const UUID_AT: usize = 4;
const START_TIME_AT: usize = 24;
const NAME_AT: usize = 32;
const MAX_GPA_AT: usize = 96;

/// What QEMU said about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// 96 or 104: the bytes the handshake occupies on the wire.
    pub size: usize,
    pub uuid: [u8; 16],
    /// Seconds since the epoch at which the VM started (QEMU's clock).
    pub start_time: i64,
    /// The name's bytes up to the first NUL (QEMU's `-name`), not necessarily UTF-8.
    pub name: Vec<u8>,
    /// Only in the 104-byte form.
    pub max_gpa: Option<u64>,
}

impl Handshake {
    /// The uuid in its canonical text form (8-4-4-4-12 lower-case hex).
    pub fn uuid_text(&self) -> String {
        format_uuid(&self.uuid)
    }

    /// The name with anything outside printable ASCII escaped (safe for a log line).
    pub fn name_text(&self) -> String {
        escape_bytes(&self.name)
    }
}

/// The VM a `--kvmi` relay admits (`--kvmi-vm-uuid`, `--kvmi-vm-name`); None = any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub uuid: Option<[u8; 16]>,
    pub name: Option<Vec<u8>>,
}

impl Pin {
    /// Why this handshake is not the pinned VM's, if it is not: what was seen and what was
    /// expected, escaped.
    pub fn check(&self, h: &Handshake) -> Result<(), String> {
        if let Some(u) = self.uuid.filter(|u| *u != h.uuid) {
            return Err(format!("VM uuid {} is not the pinned {} (--kvmi-vm-uuid)", h.uuid_text(), format_uuid(&u)));
        }
        if let Some(n) = self.name.as_ref().filter(|n| **n != h.name) {
            return Err(format!(
                "VM name \"{}\" is not the pinned \"{}\" (--kvmi-vm-name)",
                h.name_text(),
                escape_bytes(n)
            ));
        }
        Ok(())
    }
}

/// Why a handshake is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The size field is neither 96 nor 104.
    Size(u32),
    /// The bytes are a TLS handshake record (content type 22, version 3.x): a TLS client
    /// at an endpoint without `--tls-*`.
    Tls,
}

/// Whether `b` opens with a TLS handshake record's header: content type 22 (handshake), then
/// protocol version 3.0 to 3.4 (SSL 3.0 to TLS 1.3's legacy field, which ClientHellos keep at 3.1).
fn is_tls_record(b: &[u8]) -> bool {
    matches!(b, [0x16, 0x03, minor, ..] if *minor <= 0x04)
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Size(n) => write!(
                f,
                "handshake struct_size {n}, expected {QEMU_HANDSHAKE_BYTES} or {QEMU_HANDSHAKE_MAX_GPA_BYTES}"
            ),
            Refused::Tls => f.write_str(
                "a TLS handshake where QEMU's KVMi handshake was expected: the peer speaks TLS and this \
                 endpoint has no --tls-cert/--tls-key/--tls-ca (give it those, or point the peer at a \
                 plaintext endpoint)",
            ),
        }
    }
}

/// The state of a handshake being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// `needed` bytes in total are required.
    Partial {
        needed: usize,
    },
    Complete(Handshake),
}

/// Parses the bytes received so far (only the front `size` bytes are ever looked at).
pub fn parse_qemu(b: &[u8]) -> Result<Parse, Refused> {
    let Some(size) = b.get(..4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])) else {
        return Ok(Parse::Partial { needed: 4 });
    };
    let size_bytes = match size as usize {
        n @ (QEMU_HANDSHAKE_BYTES | QEMU_HANDSHAKE_MAX_GPA_BYTES) => n,
        _ if is_tls_record(b) => return Err(Refused::Tls),
        _ => return Err(Refused::Size(size)),
    };
    let Some(h) = b.get(..size_bytes) else {
        return Ok(Parse::Partial { needed: size_bytes });
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&h[UUID_AT..UUID_AT + 16]);
    let start_time = i64::from_le_bytes(h[START_TIME_AT..START_TIME_AT + 8].try_into().expect("8 bytes"));
    let raw_name = &h[NAME_AT..NAME_AT + NAME_BYTES];
    let name = raw_name.split(|&c| c == 0).next().unwrap_or(&[]).to_vec();
    let max_gpa = (size_bytes == QEMU_HANDSHAKE_MAX_GPA_BYTES)
        .then(|| u64::from_le_bytes(h[MAX_GPA_AT..MAX_GPA_AT + 8].try_into().expect("8 bytes")));
    Ok(Parse::Complete(Handshake { size: size_bytes, uuid, start_time, name, max_gpa }))
}

/// Builds a handshake (for tests and the fake peers): `max_gpa` selects the 104-byte form.
pub fn build_qemu(uuid: [u8; 16], start_time: i64, name: &[u8], max_gpa: Option<u64>) -> Vec<u8> {
    let size = if max_gpa.is_some() { QEMU_HANDSHAKE_MAX_GPA_BYTES } else { QEMU_HANDSHAKE_BYTES };
    let mut h = vec![0u8; size];
    h[0..4].copy_from_slice(&(size as u32).to_le_bytes());
    h[UUID_AT..UUID_AT + 16].copy_from_slice(&uuid);
    h[START_TIME_AT..START_TIME_AT + 8].copy_from_slice(&start_time.to_le_bytes());
    let n = name.len().min(NAME_BYTES - 1);
    h[NAME_AT..NAME_AT + n].copy_from_slice(&name[..n]);
    if let Some(g) = max_gpa {
        h[MAX_GPA_AT..MAX_GPA_AT + 8].copy_from_slice(&g.to_le_bytes());
    }
    h
}

/// The introspector's answer: how many bytes it occupies, once its size field is in.
pub fn answer_bytes(b: &[u8]) -> Result<Option<usize>, u32> {
    let Some(s) = b.get(..4) else { return Ok(None) };
    let size = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    if (INTROSPECTOR_ANSWER_BYTES..=INTROSPECTOR_ANSWER_MAX_BYTES).contains(&(size as usize)) {
        Ok(Some(size as usize))
    } else {
        Err(size)
    }
}

/// Parses a uuid written as 32 hex digits, with or without the four dashes of the canonical form.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&c| c != b'-').collect();
    let dashes = text.bytes().filter(|&c| c == b'-').count();
    // Digits only: `from_str_radix` alone would also take a sign ("+6" as 0x06).
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    if !(dashes == 0 || (dashes == 4 && canonical_dashes(text))) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).expect("a hex digit") as u8;
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    Some(out)
}

fn canonical_dashes(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36 && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
}

/// QEMU stores the uuid in the byte order of its text form (RFC 4122 big-endian fields).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Printable ASCII as is (backslash and double quote escaped), anything else as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] =
        [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];

    #[test]
    fn the_96_byte_form_parses_every_field() {
        let b = build_qemu(UUID, 1_700_000_000, b"one-7", None);
        assert_eq!(b.len(), 96);
        let Parse::Complete(h) = parse_qemu(&b).unwrap() else { panic!("complete") };
        assert_eq!(h.size, 96);
        assert_eq!(h.uuid, UUID);
        assert_eq!(h.start_time, 1_700_000_000);
        assert_eq!(h.name, b"one-7");
        assert_eq!(h.max_gpa, None);
        assert_eq!(h.uuid_text(), "12345678-9abc-def0-0123-456789abcdef");
    }

    #[test]
    fn the_104_byte_form_carries_max_gpa() {
        let b = build_qemu(UUID, -5, b"one-8", Some(0x1_0000_0000));
        assert_eq!(b.len(), 104);
        let Parse::Complete(h) = parse_qemu(&b).unwrap() else { panic!("complete") };
        assert_eq!((h.size, h.start_time, h.max_gpa), (104, -5, Some(0x1_0000_0000)));
        assert_eq!(h.name, b"one-8");
    }

    #[test]
    fn every_cut_is_partial_and_bytes_after_it_are_not_taken() {
        let b = build_qemu(UUID, 1, b"vm", None);
        for cut in 0..b.len() {
            let want = if cut < 4 { 4 } else { 96 };
            assert_eq!(parse_qemu(&b[..cut]), Ok(Parse::Partial { needed: want }), "cut {cut}");
        }
        let mut more = b.clone();
        more.extend([2, 0, 0, 0, 1, 0, 0, 0]);
        let Parse::Complete(h) = parse_qemu(&more).unwrap() else { panic!("complete") };
        assert_eq!(h.size, 96);
    }

    #[test]
    fn other_sizes_are_refused_with_what_was_seen() {
        for size in [0u32, 32, 95, 97, 100, 103, 105, 4096, 64 * 1024, u32::MAX] {
            let mut b = build_qemu(UUID, 1, b"vm", None);
            b[0..4].copy_from_slice(&size.to_le_bytes());
            assert_eq!(parse_qemu(&b), Err(Refused::Size(size)));
            assert!(Refused::Size(size).to_string().contains(&size.to_string()));
        }
        // Refused as soon as the size field is in.
        assert_eq!(parse_qemu(&[0x47, 0x45, 0x54, 0x20]), Err(Refused::Size(0x2054_4547)));
        // A ClientHello's record header (TLS 1.0 as the legacy version, then the length).
        assert_eq!(parse_qemu(&[0x16, 0x03, 0x01, 0x02, 0x00]), Err(Refused::Tls));
        assert!(Refused::Tls.to_string().contains("--tls-cert"));
        // Content type 22 with a version no TLS has is just a wrong size.
        assert_eq!(parse_qemu(&[0x16, 0x03, 0x07, 0x00]), Err(Refused::Size(0x0007_0316)));
    }

    #[test]
    fn a_name_of_64_bytes_without_nul_is_taken_whole_and_escaped_for_logs() {
        let mut b = build_qemu(UUID, 1, b"", None);
        b[32..96].fill(b'a');
        b[40] = b'\n';
        b[41] = 0xff;
        let Parse::Complete(h) = parse_qemu(&b).unwrap() else { panic!("complete") };
        assert_eq!(h.name.len(), 64);
        let t = h.name_text();
        assert!(t.contains("\\x0a\\xff") && !t.contains('\n'), "{t}");
        assert_eq!(escape_bytes(b"a\"b\\"), "a\\\"b\\\\");
    }

    #[test]
    fn uuids_parse_in_canonical_or_bare_form_only() {
        assert_eq!(parse_uuid("12345678-9abc-def0-0123-456789abcdef"), Some(UUID));
        assert_eq!(parse_uuid("123456789ABCDEF00123456789ABCDEF"), Some(UUID));
        assert_eq!(parse_uuid("12345678-9abc-def0-0123-456789abcde"), None);
        assert_eq!(parse_uuid("1234567-89abc-def0-0123-456789abcdef"), None);
        assert_eq!(parse_uuid("12345678-9abc-def0-0123-456789abcdeg"), None);
        assert_eq!(parse_uuid("12-345678-9abc-def0-0123456789abcdef"), None);
        assert_eq!(parse_uuid(""), None);
        assert_eq!(format_uuid(&UUID), "12345678-9abc-def0-0123-456789abcdef");
    }

    #[test]
    fn a_uuid_with_signs_among_its_digits_is_refused() {
        // from_str_radix takes a leading '+': "+6" read as a hex pair pinned byte 0x06.
        assert_eq!(parse_uuid("66+66666666666666666666666666666"), None);
        assert_eq!(parse_uuid("+2345678-9abc-def0-0123-456789abcdef"), None);
        assert_eq!(parse_uuid("12345678-9abc-def0-0123-456789abcd+f"), None);
        assert_eq!(format_uuid(&UUID), "12345678-9abc-def0-0123-456789abcdef");
    }

    #[test]
    fn the_answer_is_framed_by_its_size_field() {
        let mut a = [0u8; 24];
        a[0] = 24;
        assert_eq!(answer_bytes(&a[..3]), Ok(None));
        assert_eq!(answer_bytes(&a), Ok(Some(24)));
        assert_eq!(answer_bytes(&[23, 0, 0, 0]), Err(23));
        assert_eq!(answer_bytes(&[0, 0x10, 0, 0]), Ok(Some(4096)));
        assert_eq!(answer_bytes(&[1, 0x10, 0, 0]), Err(4097));
    }
}
