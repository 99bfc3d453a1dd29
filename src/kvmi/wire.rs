//! The KVMi message header, the incremental framer and the replies the relay writes itself.
//!
//! Every message after the handshake is `struct kvmi_msg_hdr { u16 id; u16 size; u32 seq }`
//! (8 bytes, little-endian) followed by `size` body bytes. The framer looks at headers only:
//! it says where the message at the front of a window ends, and never reads a body byte.
//!
//! Invariants:
//! - [`frame`] is a pure function of (limits, window): no state, so a caller may call it again
//!   on the same bytes after more arrived, and a refused window is refused again;
//! - a header whose size exceeds the direction's limit is refused as soon as the header is
//!   complete, before any of its body is needed;
//! - an error reply has the same id and seq as the command and a body of exactly
//!   `{ s32 err = -KVM_EPERM; u32 padding = 0 }`.

use std::fmt;

use super::abi::ID_EVENT;

pub const HDR_BYTES: usize = 8;
/// `KVMI_MSG_SIZE`: the largest body the kernel accepts and libkvmi accepts for an event
/// (8192 − 8). A command above it makes the kernel drop the connection.
pub const MSG_BODY_MAX_BYTES: usize = 8192 - HDR_BYTES;
/// The largest body a 16-bit size field can say: replies are not capped by libkvmi.
pub const REPLY_BODY_MAX_BYTES: usize = u16::MAX as usize;
/// The largest message on the wire (header included); a buffer this big holds any message.
pub const MESSAGE_MAX_BYTES: usize = HDR_BYTES + REPLY_BODY_MAX_BYTES;

/// `KVM_EPERM` is the host's `EPERM` (1); KVM answers a disallowed command with `-KVM_EPERM`
/// and libkvmi turns that into `errno = EPERM`.
pub const ERR_NOT_PERMITTED: i32 = -1;
/// Bytes of a relay-made error reply: header plus `kvmi_error_code`.
pub const ERROR_REPLY_BYTES: usize = HDR_BYTES + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub id: u16,
    /// Body bytes after the header.
    pub size: u16,
    pub seq: u32,
}

impl Hdr {
    /// Reads a header from the first 8 bytes; `None` if fewer are given.
    pub fn parse(b: &[u8]) -> Option<Hdr> {
        let h = b.get(..HDR_BYTES)?;
        Some(Hdr {
            id: u16::from_le_bytes([h[0], h[1]]),
            size: u16::from_le_bytes([h[2], h[3]]),
            seq: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_BYTES] {
        let mut h = [0u8; HDR_BYTES];
        h[0..2].copy_from_slice(&self.id.to_le_bytes());
        h[2..4].copy_from_slice(&self.size.to_le_bytes());
        h[4..8].copy_from_slice(&self.seq.to_le_bytes());
        h
    }

    /// Header plus body.
    pub fn total_bytes(self) -> usize {
        HDR_BYTES + usize::from(self.size)
    }
}

/// Which way a stream flows, for its size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Introspector → hypervisor: commands and event replies, each at most `KVMI_MSG_SIZE`.
    ToHypervisor,
    /// Hypervisor → introspector: events (at most `KVMI_MSG_SIZE`) and command replies
    /// (any size the header can say).
    ToIntrospector,
}

impl Flow {
    /// The largest body a message with this id may carry in this flow.
    pub fn body_limit(self, id: u16) -> usize {
        match self {
            Flow::ToHypervisor => MSG_BODY_MAX_BYTES,
            Flow::ToIntrospector if id == ID_EVENT => MSG_BODY_MAX_BYTES,
            Flow::ToIntrospector => REPLY_BODY_MAX_BYTES,
        }
    }
}

/// What is at the front of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole message: `hdr.total_bytes()` bytes at the front of the window.
    Whole(Hdr),
    /// Not yet a whole message: `needed` bytes in total make the next step (the header, or
    /// the whole message once the header is known); `hdr` when the header is complete.
    Partial { hdr: Option<Hdr>, needed: usize },
}

/// A message the framer refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    pub hdr: Hdr,
    pub limit: usize,
}

impl fmt::Display for Oversized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "message id {} seq {} claims {} body bytes, more than the protocol's {}",
            self.hdr.id, self.hdr.seq, self.hdr.size, self.limit
        )
    }
}

/// Where the message at the front of `window` ends. Looks at the header only.
pub fn frame(flow: Flow, window: &[u8]) -> Result<Frame, Oversized> {
    let Some(hdr) = Hdr::parse(window) else {
        return Ok(Frame::Partial { hdr: None, needed: HDR_BYTES });
    };
    let limit = flow.body_limit(hdr.id);
    if usize::from(hdr.size) > limit {
        return Err(Oversized { hdr, limit });
    }
    if window.len() >= hdr.total_bytes() {
        Ok(Frame::Whole(hdr))
    } else {
        Ok(Frame::Partial { hdr: Some(hdr), needed: hdr.total_bytes() })
    }
}

/// The reply the relay sends instead of forwarding a denied command: same id and seq,
/// error code `-KVM_EPERM` ("not permitted"), as KVM itself answers a disallowed command.
pub fn error_reply(cmd: Hdr) -> [u8; ERROR_REPLY_BYTES] {
    let mut m = [0u8; ERROR_REPLY_BYTES];
    let hdr = Hdr { id: cmd.id, size: 8, seq: cmd.seq };
    m[..HDR_BYTES].copy_from_slice(&hdr.to_bytes());
    m[HDR_BYTES..HDR_BYTES + 4].copy_from_slice(&ERR_NOT_PERMITTED.to_le_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u16, seq: u32, body: usize) -> Vec<u8> {
        let mut m = Hdr { id, size: body as u16, seq }.to_bytes().to_vec();
        m.extend(std::iter::repeat_n(0xa5, body));
        m
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = Hdr { id: 0x1122, size: 0x3344, seq: 0x5566_7788 };
        assert_eq!(h.to_bytes(), [0x22, 0x11, 0x44, 0x33, 0x88, 0x77, 0x66, 0x55]);
        assert_eq!(Hdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(Hdr::parse(&[0; 7]), None);
    }

    #[test]
    fn a_whole_message_is_found_at_the_front_and_only_there() {
        let mut w = msg(17, 9, 16);
        w.extend(msg(2, 10, 0));
        assert_eq!(frame(Flow::ToHypervisor, &w), Ok(Frame::Whole(Hdr { id: 17, size: 16, seq: 9 })));
        assert_eq!(frame(Flow::ToHypervisor, &w[24..]), Ok(Frame::Whole(Hdr { id: 2, size: 0, seq: 10 })));
    }

    #[test]
    fn every_cut_of_a_message_is_partial_and_says_what_completes_it() {
        let m = msg(1, 3, 544);
        for cut in 0..m.len() {
            let f = frame(Flow::ToIntrospector, &m[..cut]).unwrap();
            if cut < HDR_BYTES {
                assert_eq!(f, Frame::Partial { hdr: None, needed: 8 }, "cut {cut}");
            } else {
                assert_eq!(f, Frame::Partial { hdr: Hdr::parse(&m), needed: 552 }, "cut {cut}");
            }
        }
        assert_eq!(frame(Flow::ToIntrospector, &m), Ok(Frame::Whole(Hdr::parse(&m).unwrap())));
    }

    #[test]
    fn limits_follow_the_direction_and_the_id() {
        // Commands and events: at most KVMI_MSG_SIZE; replies may say any size.
        let at = |id, size| Hdr { id, size, seq: 1 }.to_bytes();
        assert!(frame(Flow::ToHypervisor, &at(18, 8184)).is_ok());
        assert_eq!(
            frame(Flow::ToHypervisor, &at(18, 8185)),
            Err(Oversized { hdr: Hdr { id: 18, size: 8185, seq: 1 }, limit: 8184 })
        );
        assert!(frame(Flow::ToHypervisor, &at(0, 8185)).is_err());
        assert!(frame(Flow::ToIntrospector, &at(1, 8184)).is_ok());
        assert!(frame(Flow::ToIntrospector, &at(1, 8185)).is_err());
        assert!(frame(Flow::ToIntrospector, &at(17, u16::MAX)).is_ok());
    }

    #[test]
    fn oversized_is_refused_before_its_body_arrives() {
        let h = Hdr { id: 14, size: 9000, seq: 4 }.to_bytes();
        assert!(frame(Flow::ToHypervisor, &h).is_err());
        let text = frame(Flow::ToHypervisor, &h).unwrap_err().to_string();
        assert!(text.contains("9000") && text.contains("8184"), "{text}");
    }

    #[test]
    fn the_error_reply_echoes_id_and_seq_and_says_eperm() {
        let r = error_reply(Hdr { id: 18, size: 4112, seq: 0xdead_beef });
        assert_eq!(Hdr::parse(&r), Some(Hdr { id: 18, size: 8, seq: 0xdead_beef }));
        assert_eq!(i32::from_le_bytes(r[8..12].try_into().unwrap()), -1);
        assert_eq!(&r[12..16], &[0, 0, 0, 0]);
        assert_eq!(r.len(), 16);
    }
}
