//! The control protocol's request: what a client sent before EOF, its first newline or the
//! length cap. A request is recognised exactly when its first line, trimmed, is one of the
//! four the protocol has; what follows the first line never changes the answer.
#![no_main]
use kvmi_relay::observe::control::{Format, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = Request::from_bytes(data);
    let first = &data[..data.iter().position(|&b| b == b'\n').unwrap_or(data.len())];
    let want = std::str::from_utf8(first).ok().and_then(|l| match l.trim() {
        "stats" | "stats text" => Some(Request::Stats(Format::Text)),
        "stats json" => Some(Request::Stats(Format::Json)),
        "stats prometheus" => Some(Request::Stats(Format::Prometheus)),
        "reset" => Some(Request::Reset),
        _ => None,
    });
    assert_eq!(got, want, "{:?}", String::from_utf8_lossy(data));
    // The lines `kvmi-relay stats` sends are understood whatever comes after them.
    for (line, r) in [
        ("stats text", Request::Stats(Format::Text)),
        ("stats json", Request::Stats(Format::Json)),
        ("stats prometheus", Request::Stats(Format::Prometheus)),
        ("reset", Request::Reset),
    ] {
        let mut sent = format!("{line}\n").into_bytes();
        sent.extend_from_slice(data);
        assert_eq!(Request::from_bytes(&sent), Some(r));
    }
});
