//! Endpoints (`--listen`, `--connect`): whatever parses prints back to text that parses to the
//! same endpoint, and its socket address can be built (the UNIX path fits `sockaddr_un`).
#![no_main]
use kvmi_relay::net::endpoint::Endpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(ep) = Endpoint::parse(text) else { return };
    let printed = ep.to_string();
    assert_eq!(Endpoint::parse(&printed).as_ref(), Ok(&ep), "{text:?} printed as {printed:?}");
    let _ = ep.sockaddr();
});
