//! The KVMi framer over a stream cut at arbitrary places, the way reads deliver it: the
//! messages found one read at a time are exactly those found in the whole stream at once, each
//! exactly as long as its header says (never a byte of the next one), nothing is lost or
//! duplicated (messages + the unframed rest == the stream), an oversized header is refused as
//! soon as it is in, at the same message either way, and a partial answer asks for more than
//! the window holds and no more than a message can be.
#![no_main]
use kvmi_relay::kvmi::wire::{Flow, Frame, HDR_BYTES, Hdr, MESSAGE_MAX_BYTES, Oversized, frame};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct Framed {
    messages: Vec<Vec<u8>>,
    refused: Option<Oversized>,
    rest: Vec<u8>,
}

/// Frames what the window holds: whole messages off the front until a partial or a refusal.
fn drain(flow: Flow, window: &mut Vec<u8>, out: &mut Framed) -> bool {
    loop {
        match frame(flow, window) {
            Ok(Frame::Whole(hdr)) => {
                let n = hdr.total_bytes();
                assert!(n <= window.len(), "whole message of {n} bytes in a window of {}", window.len());
                assert_eq!(Hdr::parse(window), Some(hdr));
                assert!(usize::from(hdr.size) <= flow.body_limit(hdr.id));
                out.messages.push(window.drain(..n).collect());
            }
            Ok(Frame::Partial { hdr, needed }) => {
                assert!(needed > window.len() && needed <= MESSAGE_MAX_BYTES, "needed {needed}, have {}", window.len());
                match hdr {
                    None => assert!(window.len() < HDR_BYTES && needed == HDR_BYTES),
                    Some(h) => {
                        assert_eq!(Hdr::parse(window), Some(h));
                        assert_eq!(needed, h.total_bytes());
                    }
                }
                return true;
            }
            Err(o) => {
                // Refused as soon as the header is in: its body is never needed.
                assert_eq!(Hdr::parse(window), Some(o.hdr));
                assert_eq!(frame(flow, &window[..HDR_BYTES]), Err(o));
                out.refused = Some(o);
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let flow = if control & 1 == 0 { Flow::ToHypervisor } else { Flow::ToIntrospector };
    // Cut lengths come from the front, the stream is what follows them.
    let ncuts = usize::from(control >> 1).min(rest.len() / 2);
    let (cut_bytes, stream) = rest.split_at(ncuts * 2);
    let cuts: Vec<usize> = cut_bytes.chunks(2).map(|c| usize::from(u16::from_le_bytes([c[0], c[1]]) % 600)).collect();

    let mut at_once = Framed { messages: vec![], refused: None, rest: vec![] };
    let mut window = stream.to_vec();
    drain(flow, &mut window, &mut at_once);
    at_once.rest = window;

    let mut by_reads = Framed { messages: vec![], refused: None, rest: vec![] };
    let mut window = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().copied().cycle();
    while at < stream.len() {
        let n = if cuts.is_empty() { 1 } else { cut.next().unwrap().max(1) }.min(stream.len() - at);
        window.extend_from_slice(&stream[at..at + n]);
        at += n;
        if !drain(flow, &mut window, &mut by_reads) {
            break;
        }
    }
    window.extend_from_slice(&stream[at..]);
    by_reads.rest = window;
    assert_eq!(by_reads, at_once);

    let mut joined: Vec<u8> = at_once.messages.concat();
    joined.extend_from_slice(&at_once.rest);
    assert_eq!(joined, stream, "bytes lost or duplicated");
});
