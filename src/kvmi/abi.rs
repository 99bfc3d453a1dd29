//! The KVMi message and event tables, one per numbering (`--kvmi-abi`), kept as data.
//!
//! Three numberings of the same protocol exist and `KVMI_VERSION` is 1 in all of them, so the
//! relay must be told which one it speaks. Only the libkvmi / kvmi-v7 numbering (`v7`) is
//! implemented; another numbering is another [`Table`] (a slice of [`Command`] and one of
//! [`Event`]), nothing else changes.
//!
//! Invariants:
//! - ids are unique within a table, names are unique and upper case without the `KVMI_`
//!   prefix (the names libkvmi's `include/linux/kvmi.h` uses);
//! - ids 0 (event reply) and 1 (event) are not commands and never appear in `commands`;
//! - sizes are body sizes (after the 8-byte header); a reply size includes its 8-byte
//!   `kvmi_error_code`.

use std::fmt;

/// Message id of an event reply (introspector → hypervisor).
pub const ID_EVENT_REPLY: u16 = 0;
/// Message id of an event (hypervisor → introspector).
pub const ID_EVENT: u16 = 1;

/// What a command does to the guest: the policy's unit of decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Reads guest or host state only.
    Read,
    /// Changes guest state (memory, registers, page access, EPT views, ...).
    Write,
    /// Writes nothing, but stops, starts or perturbs vCPUs (pause, events, single-step).
    ExecControl,
    /// Hands out a capability beyond the socket: GET_MAP_TOKEN lets the holder map guest
    /// memory read-write outside this connection.
    Privileged,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::ExecControl => "exec-control",
            Class::Privileged => "privileged",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A body size as the protocol defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Exactly this many bytes (newer kernels accept longer, older shorter: informative).
    Fixed(u16),
    /// At least this many bytes, the rest variable (arrays, pages, register sets).
    AtLeast(u16),
}

/// One command of a numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub id: u16,
    pub name: &'static str,
    pub class: Class,
    /// Request body.
    pub request: Size,
    /// Reply body on success (error code included).
    pub reply: Size,
}

/// What an event's reply may carry besides the common part, for the read-only policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyData {
    /// Nothing: the common `kvmi_vcpu_hdr` + `kvmi_event_reply` (16 bytes).
    None,
    /// A `u64 new_val` applied on CONTINUE (CR, MSR): the event carries `old_value, new_value`
    /// as two u64 at offset 8 of its specific part; a reply whose `new_val` differs from the
    /// guest's own `new_value` changes guest state.
    NewValue,
    /// The page-fault reply: `ctx_addr, ctx_size, singlestep, rep_complete, ctx_data[256]`;
    /// context data or `rep_complete` change what the guest's instruction sees.
    PageFault,
    /// The event has no reply (UNHOOK, CMD_ERROR).
    NoReply,
}

/// One event of a numbering (the `event` byte of `struct kvmi_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub id: u8,
    pub name: &'static str,
    pub reply: ReplyData,
    /// Reply body size libkvmi sends for this event.
    pub reply_bytes: u16,
    /// Whether the event accepts the RETRY action (re-enter the guest without completing the
    /// instruction); CONTINUE and CRASH are accepted by every event that has a reply.
    pub accepts_retry: bool,
}

/// A numbering: its commands and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub commands: &'static [Command],
    pub events: &'static [Event],
}

/// The numberings the relay knows (`--kvmi-abi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Abi {
    /// libkvmi and the kvmi-v7 kernel branch / QEMU fork (what LibVMI speaks).
    #[default]
    V7,
}

impl Abi {
    pub fn table(self) -> &'static Table {
        match self {
            Abi::V7 => &V7,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.table().name
    }
}

/// Size of `kvmi_vcpu_hdr` (a vCPU command's and an event reply's first 8 bytes).
pub const VCPU_HDR_BYTES: u16 = 8;
/// `kvmi_vcpu_hdr` + `kvmi_event_reply`: the body every event reply starts with.
pub const EVENT_REPLY_COMMON_BYTES: u16 = 16;
/// `kvmi_error_code`: what every command reply starts with.
pub const ERROR_CODE_BYTES: u16 = 8;

impl Table {
    /// The command with this id.
    pub fn command(&self, id: u16) -> Option<&'static Command> {
        self.commands.iter().find(|c| c.id == id)
    }

    /// The command with this name: upper or lower case, with or without `KVMI_`.
    pub fn command_by_name(&self, name: &str) -> Option<&'static Command> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("KVMI_").unwrap_or(&upper);
        self.commands.iter().find(|c| c.name == bare)
    }

    pub fn event(&self, id: u8) -> Option<&'static Event> {
        self.events.iter().find(|e| e.id == id)
    }

    /// A name for any message id (commands, the two event ids, or "unknown").
    pub fn message_name(&self, id: u16) -> &'static str {
        match id {
            ID_EVENT_REPLY => "EVENT_REPLY",
            ID_EVENT => "EVENT",
            _ => self.command(id).map_or("unknown", |c| c.name),
        }
    }
}

use Class::{ExecControl, Privileged, Read, Write};
use Size::{AtLeast, Fixed};

const fn cmd(id: u16, name: &'static str, class: Class, request: Size, reply: Size) -> Command {
    Command { id, name, class, request, reply }
}

/// Error code only.
const EC: Size = Fixed(ERROR_CODE_BYTES);

/// libkvmi / kvmi-v7 (`include/linux/kvmi.h` of libkvmi, the kvmi-v7 kernel branch's
/// `Documentation/virt/kvm/kvmi.rst`). vCPU commands start with an 8-byte `kvmi_vcpu_hdr`.
static V7_COMMANDS: [Command; 44] = [
    cmd(2, "GET_VERSION", Read, Fixed(0), AtLeast(16)),
    cmd(3, "CHECK_COMMAND", Read, Fixed(8), EC),
    cmd(4, "CHECK_EVENT", Read, Fixed(8), EC),
    cmd(5, "GET_GUEST_INFO", Read, Fixed(0), Fixed(24)),
    cmd(6, "GET_VCPU_INFO", Read, Fixed(8), Fixed(16)),
    cmd(7, "PAUSE_VCPU", ExecControl, Fixed(16), EC),
    cmd(8, "CONTROL_VM_EVENTS", ExecControl, Fixed(8), EC),
    cmd(9, "CONTROL_EVENTS", ExecControl, Fixed(16), EC),
    cmd(10, "CONTROL_CR", ExecControl, Fixed(16), EC),
    cmd(11, "CONTROL_MSR", ExecControl, Fixed(16), EC),
    cmd(12, "CONTROL_VE", Write, AtLeast(8), EC),
    cmd(13, "GET_REGISTERS", Read, AtLeast(16), AtLeast(8)),
    cmd(14, "SET_REGISTERS", Write, AtLeast(8), EC),
    cmd(15, "GET_CPUID", Read, Fixed(16), Fixed(24)),
    cmd(16, "GET_XSAVE", Read, Fixed(8), AtLeast(8)),
    cmd(17, "READ_PHYSICAL", Read, Fixed(16), AtLeast(8)),
    cmd(18, "WRITE_PHYSICAL", Write, AtLeast(16), EC),
    cmd(19, "INJECT_EXCEPTION", Write, Fixed(24), EC),
    cmd(20, "GET_PAGE_ACCESS", Read, AtLeast(8), AtLeast(8)),
    cmd(21, "SET_PAGE_ACCESS", Write, AtLeast(8), EC),
    cmd(22, "GET_MAP_TOKEN", Privileged, Fixed(0), Fixed(40)),
    cmd(23, "GET_MTRR_TYPE", Read, Fixed(16), Fixed(16)),
    cmd(24, "CONTROL_SPP", Write, Fixed(8), EC),
    cmd(25, "GET_PAGE_WRITE_BITMAP", Read, AtLeast(8), AtLeast(8)),
    cmd(26, "SET_PAGE_WRITE_BITMAP", Write, AtLeast(8), EC),
    cmd(27, "CONTROL_CMD_RESPONSE", ExecControl, Fixed(8), EC),
    cmd(28, "SET_VE_INFO_PAGE", Write, Fixed(24), EC),
    cmd(29, "GET_MAX_GFN", Read, Fixed(0), Fixed(16)),
    cmd(30, "SET_PAGE_SVE", Write, Fixed(16), EC),
    cmd(31, "GET_NEXT_AVAILABLE_GFN", Read, Fixed(0), Fixed(16)),
    cmd(32, "SWITCH_EPT_VIEW", Write, Fixed(16), EC),
    cmd(33, "DISABLE_VE", Write, Fixed(8), EC),
    cmd(34, "GET_EPT_VIEW", Read, Fixed(8), Fixed(16)),
    cmd(35, "VCPU_TRANSLATE_GVA", Read, Fixed(16), Fixed(16)),
    cmd(36, "CONTROL_EPT_VIEW", Write, Fixed(16), EC),
    cmd(37, "VCPU_GET_XCR", Read, Fixed(16), Fixed(16)),
    cmd(38, "VCPU_SET_XSAVE", Write, AtLeast(8), EC),
    cmd(39, "QUERY_PHYSICAL", Read, AtLeast(8), AtLeast(8)),
    cmd(41, "VCPU_ALLOC_GFN", Write, AtLeast(8), EC),
    cmd(42, "VCPU_FREE_GFN", Write, AtLeast(8), EC),
    cmd(43, "CREATE_EPT_VIEW", Write, AtLeast(0), AtLeast(8)),
    cmd(44, "DESTROY_EPT_VIEW", Write, AtLeast(0), EC),
    cmd(60, "VCPU_CHANGE_GFN", Write, Fixed(24), EC),
    cmd(63, "VCPU_CONTROL_SINGLESTEP", ExecControl, Fixed(16), EC),
];

const fn ev(id: u8, name: &'static str, reply: ReplyData, reply_bytes: u16) -> Event {
    Event { id, name, reply, reply_bytes, accepts_retry: false }
}

const fn ev_retry(id: u8, name: &'static str, reply: ReplyData, reply_bytes: u16) -> Event {
    Event { id, name, reply, reply_bytes, accepts_retry: true }
}

/// Reply sizes: 16 common bytes, + 8 (`new_val`) for CR/MSR, + 272 for a page fault.
static V7_EVENTS: [Event; 14] = [
    ev(0, "UNHOOK", ReplyData::NoReply, 0),
    ev(1, "CR", ReplyData::NewValue, 24),
    ev(2, "MSR", ReplyData::NewValue, 24),
    ev(3, "XSETBV", ReplyData::None, 16),
    ev_retry(4, "BREAKPOINT", ReplyData::None, 16),
    ev(5, "HYPERCALL", ReplyData::None, 16),
    ev_retry(6, "PF", ReplyData::PageFault, 288),
    ev(7, "TRAP", ReplyData::None, 16),
    ev_retry(8, "DESCRIPTOR", ReplyData::None, 16),
    ev(9, "CREATE_VCPU", ReplyData::None, 16),
    ev(10, "PAUSE_VCPU", ReplyData::None, 16),
    ev(11, "SINGLESTEP", ReplyData::None, 16),
    ev(12, "CMD_ERROR", ReplyData::NoReply, 0),
    ev(13, "CPUID", ReplyData::None, 16),
];

pub static V7: Table = Table { name: "v7", commands: &V7_COMMANDS, events: &V7_EVENTS };

/// Ids the policy and the tracker look at by number (v7 numbering).
pub mod v7 {
    pub const GET_VERSION: u16 = 2;
    pub const PAUSE_VCPU: u16 = 7;
    pub const SET_REGISTERS: u16 = 14;
    pub const GET_REGISTERS: u16 = 13;
    pub const READ_PHYSICAL: u16 = 17;
    pub const WRITE_PHYSICAL: u16 = 18;
    pub const GET_MAP_TOKEN: u16 = 22;
    pub const CONTROL_CMD_RESPONSE: u16 = 27;
    pub const EVENT_UNHOOK: u8 = 0;
    pub const EVENT_CR: u8 = 1;
    pub const EVENT_MSR: u8 = 2;
    pub const EVENT_PF: u8 = 6;
    pub const EVENT_PAUSE_VCPU: u8 = 10;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_and_names_are_unique_and_commands_start_at_two() {
        let t = Abi::V7.table();
        let ids: HashSet<u16> = t.commands.iter().map(|c| c.id).collect();
        let names: HashSet<&str> = t.commands.iter().map(|c| c.name).collect();
        assert_eq!(ids.len(), t.commands.len());
        assert_eq!(names.len(), t.commands.len());
        assert!(t.commands.iter().all(|c| c.id >= 2));
        assert!(t.commands.iter().all(|c| c.name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')));
        let ev: HashSet<u8> = t.events.iter().map(|e| e.id).collect();
        assert_eq!(ev.len(), t.events.len());
    }

    #[test]
    fn the_v7_ids_are_libkvmis() {
        let t = Abi::V7.table();
        for (name, id) in [
            ("GET_VERSION", 2),
            ("PAUSE_VCPU", 7),
            ("CONTROL_EVENTS", 9),
            ("GET_REGISTERS", 13),
            ("SET_REGISTERS", 14),
            ("READ_PHYSICAL", 17),
            ("WRITE_PHYSICAL", 18),
            ("GET_MAP_TOKEN", 22),
            ("CONTROL_CMD_RESPONSE", 27),
            ("VCPU_CHANGE_GFN", 60),
            ("VCPU_CONTROL_SINGLESTEP", 63),
        ] {
            assert_eq!(t.command_by_name(name).map(|c| c.id), Some(id), "{name}");
        }
        assert_eq!(t.event(v7::EVENT_CR).map(|e| e.name), Some("CR"));
        assert_eq!(t.event(v7::EVENT_PAUSE_VCPU).map(|e| e.name), Some("PAUSE_VCPU"));
        assert_eq!(t.event(13).map(|e| e.name), Some("CPUID"));
    }

    #[test]
    fn classes_follow_what_each_command_does() {
        let t = Abi::V7.table();
        let class = |n: &str| t.command_by_name(n).unwrap().class;
        for n in ["GET_VERSION", "READ_PHYSICAL", "GET_REGISTERS", "VCPU_TRANSLATE_GVA", "QUERY_PHYSICAL"] {
            assert_eq!(class(n), Class::Read, "{n}");
        }
        for n in ["WRITE_PHYSICAL", "SET_REGISTERS", "INJECT_EXCEPTION", "SET_PAGE_ACCESS", "VCPU_SET_XSAVE"] {
            assert_eq!(class(n), Class::Write, "{n}");
        }
        for n in ["PAUSE_VCPU", "CONTROL_EVENTS", "CONTROL_CR", "VCPU_CONTROL_SINGLESTEP", "CONTROL_CMD_RESPONSE"] {
            assert_eq!(class(n), Class::ExecControl, "{n}");
        }
        assert_eq!(class("GET_MAP_TOKEN"), Class::Privileged);
    }

    #[test]
    fn names_are_found_in_any_case_with_or_without_the_prefix() {
        let t = Abi::V7.table();
        assert_eq!(t.command_by_name("read_physical").map(|c| c.id), Some(17));
        assert_eq!(t.command_by_name("KVMI_WRITE_PHYSICAL").map(|c| c.id), Some(18));
        assert_eq!(t.command_by_name(" kvmi_set_registers ").map(|c| c.id), Some(14));
        assert!(t.command_by_name("EVENT").is_none());
        assert!(t.command_by_name("READ_PHYS").is_none());
        assert_eq!(t.message_name(0), "EVENT_REPLY");
        assert_eq!(t.message_name(1), "EVENT");
        assert_eq!(t.message_name(40), "unknown");
    }

    #[test]
    fn event_reply_sizes_match_the_wire() {
        // The totals on the wire (header included): PAUSE_VCPU 24, CR/MSR 32, page fault 296.
        let t = Abi::V7.table();
        assert_eq!(8 + t.event(v7::EVENT_PAUSE_VCPU).unwrap().reply_bytes, 24);
        assert_eq!(8 + t.event(v7::EVENT_CR).unwrap().reply_bytes, 32);
        assert_eq!(8 + t.event(v7::EVENT_MSR).unwrap().reply_bytes, 32);
        assert_eq!(8 + t.event(v7::EVENT_PF).unwrap().reply_bytes, 296);
        assert_eq!(t.event(v7::EVENT_UNHOOK).unwrap().reply, ReplyData::NoReply);
    }
}
