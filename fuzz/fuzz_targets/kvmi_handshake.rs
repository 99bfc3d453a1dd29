//! QEMU's handshake and the introspector's answer, as a relay reads them from a socket: for
//! every cut of the same bytes the parser says "partial" (asking for more than it has, and
//! never for more than the size field says), refuses with the same size, or completes with the
//! same handshake; it never looks past `size` bytes. A complete handshake's name holds no NUL
//! and at most 64 bytes, its log form is printable ASCII, it passes a pin made from itself, and
//! a handshake built from its fields parses back to them.
#![no_main]
use kvmi_relay::kvmi::handshake::{
    INTROSPECTOR_ANSWER_BYTES, INTROSPECTOR_ANSWER_MAX_BYTES, NAME_BYTES, Parse, Pin, answer_bytes, build_qemu,
    parse_qemu,
};
use libfuzzer_sys::fuzz_target;

/// Cuts to try: every one up to 128 bytes, then the whole.
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    (0..=len.min(128)).chain(std::iter::once(len))
}

fuzz_target!(|data: &[u8]| {
    let whole = parse_qemu(data);
    if let Ok(Parse::Complete(h)) = &whole {
        assert!(h.size == 96 || h.size == 104);
        assert_eq!(h.max_gpa.is_some(), h.size == 104);
        assert!(h.name.len() <= NAME_BYTES && !h.name.contains(&0));
        assert!(h.name_text().bytes().all(|c| (0x20..0x7f).contains(&c)), "{:?}", h.name_text());
        assert_eq!(parse_qemu(&data[..h.size]), whole, "looked past its {} bytes", h.size);
        let pin = Pin { uuid: Some(h.uuid), name: Some(h.name.clone()) };
        assert_eq!(pin.check(h), Ok(()));
        if h.name.len() < NAME_BYTES {
            let rebuilt = build_qemu(h.uuid, h.start_time, &h.name, h.max_gpa);
            assert_eq!(parse_qemu(&rebuilt).as_ref(), Ok(&Parse::Complete(h.clone())));
        }
        let mut other = h.clone();
        other.name.push(b'x');
        other.uuid[0] ^= 1;
        let refusal = pin.check(&other).unwrap_err();
        assert!(!refusal.chars().any(char::is_control), "{refusal:?}");
    }
    for cut in cuts(data.len()) {
        let got = parse_qemu(&data[..cut]);
        match (&whole, &got) {
            (_, Ok(Parse::Partial { needed })) => {
                assert!(*needed > cut, "cut {cut}: asks for {needed}");
                assert!(*needed == 4 || *needed == 96 || *needed == 104, "cut {cut}: asks for {needed}");
            }
            (Ok(Parse::Complete(h)), got) => assert_eq!(got, &whole, "cut {cut} of a {}-byte handshake", h.size),
            (Err(_), got) => assert_eq!(got, &whole, "cut {cut}"),
            (Ok(Parse::Partial { .. }), got) => panic!("cut {cut}: {got:?}, but the whole is partial"),
        }
    }

    let answer = answer_bytes(data);
    if let Ok(Some(n)) = answer {
        assert!((INTROSPECTOR_ANSWER_BYTES..=INTROSPECTOR_ANSWER_MAX_BYTES).contains(&n));
    }
    for cut in cuts(data.len()) {
        let got = answer_bytes(&data[..cut]);
        if cut < 4 {
            assert_eq!(got, Ok(None), "cut {cut}");
        } else {
            assert_eq!(got, answer, "cut {cut}");
        }
    }
});
