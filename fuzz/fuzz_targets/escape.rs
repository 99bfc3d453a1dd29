//! The one escaping rule every outside value is printed through: the output holds no control
//! character (no value can start or overwrite a line), `escape` and `Escaped` agree, and the
//! output reads back to exactly the input (backslash is escaped too, so nothing is ambiguous).
//! The handshake's name escaping for log lines yields printable ASCII only.
#![no_main]
use kvmi_relay::escape::{Escaped, escape};
use kvmi_relay::kvmi::handshake::escape_bytes;
use libfuzzer_sys::fuzz_target;

/// Reads back `char::escape_debug`'s escapes: `\t \r \n \\ \' \" \0` and `\u{HEX}`.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next()? {
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'n' => out.push('\n'),
            '0' => out.push('\0'),
            c @ ('\\' | '\'' | '"') => out.push(c),
            'u' => {
                if it.next()? != '{' {
                    return None;
                }
                let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let printable = escape_bytes(data);
    assert!(printable.bytes().all(|c| (0x20..0x7f).contains(&c)), "{printable:?}");
    let Ok(text) = std::str::from_utf8(data) else { return };
    let e = Escaped(text).to_string();
    assert_eq!(escape(text), e.as_str());
    assert!(!e.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'), "{text:?} escaped as {e:?}");
    assert_eq!(unescape(&e).as_deref(), Some(text), "{text:?} escaped as {e:?}");
});
