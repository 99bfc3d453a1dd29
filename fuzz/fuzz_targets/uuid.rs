//! `--kvmi-vm-uuid` and the uuid QEMU's handshake carries: text that parses is 32 hex digits,
//! bare or dashed 8-4-4-4-12 (checked here by a rule of its own), and its canonical form parses
//! back to the same bytes; any 16 bytes print to a canonical form that parses back to them.
#![no_main]
use kvmi_relay::kvmi::handshake::{format_uuid, parse_uuid};
use libfuzzer_sys::fuzz_target;

fn well_formed(t: &str) -> bool {
    let b = t.as_bytes();
    let hex = |c: &u8| c.is_ascii_hexdigit();
    (b.len() == 32 && b.iter().all(hex))
        || (b.len() == 36
            && b.iter().enumerate().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { *c == b'-' } else { hex(c) }))
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..16) {
        let bytes: [u8; 16] = bytes.try_into().unwrap();
        let text = format_uuid(&bytes);
        assert!(well_formed(&text) && text.len() == 36 && !text.bytes().any(|c| c.is_ascii_uppercase()), "{text}");
        assert_eq!(parse_uuid(&text), Some(bytes));
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = parse_uuid(text);
    assert_eq!(parsed.is_some(), well_formed(text), "{text:?}: {parsed:?}");
    if let Some(u) = parsed {
        let canonical = format_uuid(&u);
        assert_eq!(
            canonical,
            text.to_ascii_lowercase().replace('-', "").chars().enumerate().fold(String::new(), |mut s, (i, c)| {
                if [8, 12, 16, 20].contains(&i) {
                    s.push('-');
                }
                s.push(c);
                s
            })
        );
        assert_eq!(parse_uuid(&canonical), Some(u));
    }
});
