//! What the tenant may do to the guest: a pure function of (policy, message).
//!
//! `--kvmi-policy full` forwards every known command; `read-only` forwards what reads and
//! what controls execution, and answers what writes with the relay's own error reply.
//! `--kvmi-allow` and `--kvmi-deny` (command names) refine either: deny wins, and a name in
//! both is refused at start-up.
//!
//! What `read-only` decides, and why:
//! - **Reads** (GET_*, READ_PHYSICAL, QUERY_PHYSICAL, VCPU_TRANSLATE_GVA, ...): forwarded.
//! - **Writes** (WRITE_PHYSICAL, SET_REGISTERS, INJECT_EXCEPTION, SET_PAGE_ACCESS, EPT views,
//!   ...): denied with `-KVM_EPERM`, never forwarded.
//! - **Execution control** (PAUSE_VCPU, CONTROL_EVENTS, CONTROL_VM_EVENTS, CONTROL_CR,
//!   CONTROL_MSR, CONTROL_CMD_RESPONSE, VCPU_CONTROL_SINGLESTEP): forwarded. They change no
//!   guest state, and monitoring needs them (events are how a tool sees a process start).
//!   So a read-only tenant can still stop vCPUs for as long as it takes to answer an event,
//!   and it can learn about the guest through timing (covert channels): read-only is about
//!   the guest's memory and registers, not its availability.
//! - **GET_MAP_TOKEN**: denied. The token lets its holder map guest memory read-write outside
//!   this socket, where no relay sees it.
//! - **Event replies** are a write path too. Forwarded when they change nothing: the action is
//!   CONTINUE (or RETRY where the event accepts it), a CR/MSR reply's `new_val` is the value
//!   the guest itself is writing, a page-fault reply carries no context data (`ctx_size` 0)
//!   and no `rep_complete`. Anything else (CRASH, another value, context data) is refused:
//!   the relay sends KVM a plain CONTINUE in its place (the guest's own value for CR/MSR), so
//!   the vCPU goes on as if nobody had looked; the tenant's reply never reaches KVM.
//!
//! Invariants: no socket, no clock, no allocation on the per-message path except the
//! replacement reply; a command id the table does not know is never judged by class.

use std::collections::BTreeSet;

use super::abi::{Class, EVENT_REPLY_COMMON_BYTES, ID_EVENT_REPLY, ReplyData, Table};
use super::tracker::PendingEvent;
use super::wire::{HDR_BYTES, Hdr};

/// `--kvmi-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Full,
    ReadOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::ReadOnly => "read-only",
        }
    }
}

/// `--kvmi-unknown`: what to do with a command id the table does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unknown {
    /// Close the connection (a later numbering, or a tool that is not what it claims).
    #[default]
    Refuse,
    /// Forward it (and its reply) uninspected, as `full` would.
    Pass,
}

/// Event reply actions (`KVMI_EVENT_ACTION_*`).
pub const ACTION_CONTINUE: u8 = 0;
pub const ACTION_RETRY: u8 = 1;
pub const ACTION_CRASH: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Ids forwarded whatever the mode says (`--kvmi-allow`).
    pub allow: BTreeSet<u16>,
    /// Ids denied whatever the mode says (`--kvmi-deny`).
    pub deny: BTreeSet<u16>,
    pub unknown: Unknown,
}

/// Why a command is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// `--kvmi-deny` names it.
    Listed,
    /// `read-only` and the command's class.
    ReadOnly(Class),
}

impl Denied {
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Listed => "--kvmi-deny",
            Denied::ReadOnly(Class::Write) => "read-only: writes guest state",
            Denied::ReadOnly(Class::Privileged) => "read-only: GET_MAP_TOKEN maps guest memory outside the socket",
            Denied::ReadOnly(_) => "read-only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandVerdict {
    Forward,
    /// Answered by the relay with `-KVM_EPERM`.
    Deny(Denied),
    /// Not in the table and `--kvmi-unknown refuse`.
    Unknown,
}

/// Why an event reply is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    Crash,
    /// An action the event does not accept, or no action at all.
    Action(u8),
    /// A CR/MSR `new_val` other than the guest's own (or the guest's value unknown).
    NewValue,
    /// Page-fault context data or `rep_complete`.
    PageFaultData,
    /// Shorter than the common part: nothing to judge.
    Short,
}

impl Replaced {
    pub fn as_str(self) -> &'static str {
        match self {
            Replaced::Crash => "read-only: CRASH action",
            Replaced::Action(_) => "read-only: action the event does not accept",
            Replaced::NewValue => "read-only: new_val differs from the guest's own",
            Replaced::PageFaultData => "read-only: page-fault context data",
            Replaced::Short => "read-only: reply shorter than its common part",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyVerdict {
    Forward,
    Replace(Replaced),
}

impl Policy {
    /// Builds a policy from command names; every unknown name, and every name both allowed
    /// and denied, is one error line (without the flag: the caller names it).
    pub fn from_names(
        table: &Table,
        mode: Mode,
        allow: &[String],
        deny: &[String],
        unknown: Unknown,
    ) -> Result<Policy, Vec<String>> {
        let mut problems = Vec::new();
        let mut ids = |names: &[String], flag: &str| -> BTreeSet<u16> {
            let mut set = BTreeSet::new();
            for n in names.iter().filter(|n| !n.trim().is_empty()) {
                match table.command_by_name(n) {
                    Some(c) => {
                        set.insert(c.id);
                    }
                    None => problems.push(format!(
                        "{flag}: \"{}\" is not a command of KVMi {} (names as in libkvmi, e.g. READ_PHYSICAL)",
                        super::handshake::escape_bytes(n.as_bytes()),
                        table.name
                    )),
                }
            }
            set
        };
        let allow = ids(allow, "--kvmi-allow");
        let deny = ids(deny, "--kvmi-deny");
        for id in allow.intersection(&deny) {
            problems
                .push(format!("--kvmi-allow and --kvmi-deny both name {}", table.command(*id).map_or("?", |c| c.name)));
        }
        if problems.is_empty() { Ok(Policy { mode, allow, deny, unknown }) } else { Err(problems) }
    }

    /// Whether a command from the introspector may reach the hypervisor.
    pub fn command(&self, table: &Table, id: u16) -> CommandVerdict {
        if self.deny.contains(&id) {
            return CommandVerdict::Deny(Denied::Listed);
        }
        let Some(cmd) = table.command(id) else {
            return match self.unknown {
                Unknown::Refuse => CommandVerdict::Unknown,
                Unknown::Pass => CommandVerdict::Forward,
            };
        };
        if self.allow.contains(&id) {
            return CommandVerdict::Forward;
        }
        match (self.mode, cmd.class) {
            (Mode::Full, _) | (Mode::ReadOnly, Class::Read | Class::ExecControl) => CommandVerdict::Forward,
            (Mode::ReadOnly, class) => CommandVerdict::Deny(Denied::ReadOnly(class)),
        }
    }

    /// Whether an event reply may reach the hypervisor as the tenant wrote it.
    pub fn event_reply(&self, table: &Table, event: &PendingEvent, body: &[u8]) -> ReplyVerdict {
        if self.mode == Mode::Full {
            return ReplyVerdict::Forward;
        }
        if body.len() < usize::from(EVENT_REPLY_COMMON_BYTES) {
            return ReplyVerdict::Replace(Replaced::Short);
        }
        let info = table.event(event.event);
        let action = body[8];
        match action {
            ACTION_CONTINUE => {}
            ACTION_RETRY if info.is_some_and(|e| e.accepts_retry) => {}
            ACTION_CRASH => return ReplyVerdict::Replace(Replaced::Crash),
            other => return ReplyVerdict::Replace(Replaced::Action(other)),
        }
        match info.map(|e| e.reply) {
            Some(ReplyData::NewValue) if action == ACTION_CONTINUE => {
                let new_val = body.get(16..24).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                match (new_val, event.guest_new_value) {
                    (Some(v), Some(g)) if v == g => ReplyVerdict::Forward,
                    _ => ReplyVerdict::Replace(Replaced::NewValue),
                }
            }
            Some(ReplyData::PageFault) => {
                // { u64 ctx_addr; u32 ctx_size; u8 singlestep; u8 rep_complete; ... }
                let ctx_size = body.get(24..28).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                let rep_complete = body.get(29).copied().unwrap_or(0);
                if ctx_size != 0 || rep_complete != 0 {
                    ReplyVerdict::Replace(Replaced::PageFaultData)
                } else {
                    ReplyVerdict::Forward
                }
            }
            _ => ReplyVerdict::Forward,
        }
    }
}

/// The reply the relay sends KVM in place of a refused event reply: CONTINUE for the event's
/// vCPU, with the guest's own value for CR/MSR and no context data for a page fault; the
/// size is libkvmi's for that event, the seq the event's.
pub fn plain_continue(table: &Table, seq: u32, event: &PendingEvent) -> Vec<u8> {
    let info = table.event(event.event);
    let body = info.map_or(EVENT_REPLY_COMMON_BYTES, |e| e.reply_bytes.max(EVENT_REPLY_COMMON_BYTES));
    let mut m = vec![0u8; HDR_BYTES + usize::from(body)];
    m[..HDR_BYTES].copy_from_slice(&Hdr { id: ID_EVENT_REPLY, size: body, seq }.to_bytes());
    let b = &mut m[HDR_BYTES..];
    b[0..2].copy_from_slice(&event.vcpu.to_le_bytes());
    b[8] = ACTION_CONTINUE;
    b[9] = event.event;
    if let (Some(ReplyData::NewValue), Some(v)) = (info.map(|e| e.reply), event.guest_new_value) {
        b[16..24].copy_from_slice(&v.to_le_bytes());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::super::abi::{V7, v7};
    use super::*;
    use std::time::Instant;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy(mode: Mode, allow: &[&str], deny: &[&str]) -> Policy {
        Policy::from_names(&V7, mode, &names(allow), &names(deny), Unknown::Refuse).unwrap()
    }

    fn pending(event: u8, guest_new_value: Option<u64>) -> PendingEvent {
        PendingEvent { event, vcpu: 2, guest_new_value, since: Instant::now() }
    }

    /// An event reply body: common part with `action`, then `specific`.
    fn reply(event: u8, action: u8, specific: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[0..2].copy_from_slice(&2u16.to_le_bytes());
        b[8] = action;
        b[9] = event;
        b.extend_from_slice(specific);
        b
    }

    #[test]
    fn full_forwards_every_known_command() {
        let p = policy(Mode::Full, &[], &[]);
        for c in V7.commands {
            assert_eq!(p.command(&V7, c.id), CommandVerdict::Forward, "{}", c.name);
        }
    }

    #[test]
    fn read_only_forwards_reads_and_execution_control_and_denies_the_rest() {
        let p = policy(Mode::ReadOnly, &[], &[]);
        for c in V7.commands {
            let want = match c.class {
                Class::Read | Class::ExecControl => CommandVerdict::Forward,
                class => CommandVerdict::Deny(Denied::ReadOnly(class)),
            };
            assert_eq!(p.command(&V7, c.id), want, "{}", c.name);
        }
        assert_eq!(p.command(&V7, v7::WRITE_PHYSICAL), CommandVerdict::Deny(Denied::ReadOnly(Class::Write)));
        assert_eq!(p.command(&V7, v7::SET_REGISTERS), CommandVerdict::Deny(Denied::ReadOnly(Class::Write)));
        assert_eq!(p.command(&V7, v7::GET_MAP_TOKEN), CommandVerdict::Deny(Denied::ReadOnly(Class::Privileged)));
        assert_eq!(p.command(&V7, v7::READ_PHYSICAL), CommandVerdict::Forward);
        assert_eq!(p.command(&V7, v7::GET_REGISTERS), CommandVerdict::Forward);
        assert_eq!(p.command(&V7, v7::PAUSE_VCPU), CommandVerdict::Forward);
    }

    #[test]
    fn allow_and_deny_refine_either_mode() {
        let p = policy(Mode::ReadOnly, &["set_registers"], &["READ_PHYSICAL"]);
        assert_eq!(p.command(&V7, v7::SET_REGISTERS), CommandVerdict::Forward);
        assert_eq!(p.command(&V7, v7::READ_PHYSICAL), CommandVerdict::Deny(Denied::Listed));
        assert_eq!(p.command(&V7, v7::WRITE_PHYSICAL), CommandVerdict::Deny(Denied::ReadOnly(Class::Write)));
        let p = policy(Mode::Full, &[], &["KVMI_PAUSE_VCPU"]);
        assert_eq!(p.command(&V7, v7::PAUSE_VCPU), CommandVerdict::Deny(Denied::Listed));
        assert_eq!(p.command(&V7, v7::WRITE_PHYSICAL), CommandVerdict::Forward);
    }

    #[test]
    fn bad_names_and_contradictions_are_each_reported() {
        let e = Policy::from_names(
            &V7,
            Mode::Full,
            &names(&["READ_PHYSICAL", "READ_PHYS\n"]),
            &names(&["read_physical", "NOPE"]),
            Unknown::Refuse,
        )
        .unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("--kvmi-allow") && e[0].contains("READ_PHYS\\x0a"), "{}", e[0]);
        assert!(e[1].contains("--kvmi-deny") && e[1].contains("NOPE"), "{}", e[1]);
        assert!(e[2].contains("both") && e[2].contains("READ_PHYSICAL"), "{}", e[2]);
    }

    #[test]
    fn unknown_ids_follow_kvmi_unknown_and_deny_still_wins() {
        let mut p = policy(Mode::ReadOnly, &[], &[]);
        assert_eq!(p.command(&V7, 40), CommandVerdict::Unknown);
        assert_eq!(p.command(&V7, 0x7f00), CommandVerdict::Unknown);
        p.unknown = Unknown::Pass;
        assert_eq!(p.command(&V7, 40), CommandVerdict::Forward);
    }

    #[test]
    fn full_forwards_every_event_reply() {
        let p = policy(Mode::Full, &[], &[]);
        let body = reply(v7::EVENT_CR, ACTION_CRASH, &[9; 8]);
        assert_eq!(p.event_reply(&V7, &pending(v7::EVENT_CR, Some(1)), &body), ReplyVerdict::Forward);
    }

    #[test]
    fn read_only_forwards_replies_that_change_nothing() {
        let p = policy(Mode::ReadOnly, &[], &[]);
        let pause = pending(v7::EVENT_PAUSE_VCPU, None);
        assert_eq!(p.event_reply(&V7, &pause, &reply(10, ACTION_CONTINUE, &[])), ReplyVerdict::Forward);
        let cr = pending(v7::EVENT_CR, Some(0x2000));
        let same = reply(1, ACTION_CONTINUE, &0x2000u64.to_le_bytes());
        assert_eq!(p.event_reply(&V7, &cr, &same), ReplyVerdict::Forward);
        let pf = pending(v7::EVENT_PF, None);
        let mut plain_pf = vec![0u8; 272];
        plain_pf[12] = 1; // singlestep: execution control, allowed
        assert_eq!(p.event_reply(&V7, &pf, &reply(6, ACTION_CONTINUE, &plain_pf)), ReplyVerdict::Forward);
        assert_eq!(p.event_reply(&V7, &pf, &reply(6, ACTION_RETRY, &[0; 272])), ReplyVerdict::Forward);
    }

    #[test]
    fn read_only_replaces_replies_that_change_state() {
        let p = policy(Mode::ReadOnly, &[], &[]);
        let cr = pending(v7::EVENT_CR, Some(0x2000));
        let other = reply(1, ACTION_CONTINUE, &0x6666u64.to_le_bytes());
        assert_eq!(p.event_reply(&V7, &cr, &other), ReplyVerdict::Replace(Replaced::NewValue));
        let unknown_guest = pending(v7::EVENT_MSR, None);
        let same = reply(2, ACTION_CONTINUE, &0x2000u64.to_le_bytes());
        assert_eq!(p.event_reply(&V7, &unknown_guest, &same), ReplyVerdict::Replace(Replaced::NewValue));
        let cut = reply(1, ACTION_CONTINUE, &[]);
        assert_eq!(p.event_reply(&V7, &cr, &cut), ReplyVerdict::Replace(Replaced::NewValue));
        let pause = pending(v7::EVENT_PAUSE_VCPU, None);
        assert_eq!(p.event_reply(&V7, &pause, &reply(10, ACTION_CRASH, &[])), ReplyVerdict::Replace(Replaced::Crash));
        assert_eq!(
            p.event_reply(&V7, &pause, &reply(10, ACTION_RETRY, &[])),
            ReplyVerdict::Replace(Replaced::Action(1))
        );
        assert_eq!(p.event_reply(&V7, &pause, &reply(10, 7, &[])), ReplyVerdict::Replace(Replaced::Action(7)));
        assert_eq!(p.event_reply(&V7, &pause, &[0; 15]), ReplyVerdict::Replace(Replaced::Short));
        let pf = pending(v7::EVENT_PF, None);
        let mut ctx = vec![0u8; 272];
        ctx[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(
            p.event_reply(&V7, &pf, &reply(6, ACTION_CONTINUE, &ctx)),
            ReplyVerdict::Replace(Replaced::PageFaultData)
        );
        let mut rep = vec![0u8; 272];
        rep[13] = 1;
        assert_eq!(
            p.event_reply(&V7, &pf, &reply(6, ACTION_CONTINUE, &rep)),
            ReplyVerdict::Replace(Replaced::PageFaultData)
        );
    }

    #[test]
    fn the_replacement_is_a_plain_continue_the_policy_itself_forwards() {
        let p = policy(Mode::ReadOnly, &[], &[]);
        for (event, value, total) in
            [(v7::EVENT_CR, Some(0x2000u64), 32), (v7::EVENT_PAUSE_VCPU, None, 24), (v7::EVENT_PF, None, 296)]
        {
            let ev = pending(event, value);
            let m = plain_continue(&V7, 77, &ev);
            assert_eq!(m.len(), total);
            let hdr = Hdr::parse(&m).unwrap();
            assert_eq!((hdr.id, hdr.seq, usize::from(hdr.size)), (0, 77, total - 8));
            let body = &m[8..];
            assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2, "the event's vCPU");
            assert_eq!((body[8], body[9]), (ACTION_CONTINUE, event));
            assert_eq!(p.event_reply(&V7, &ev, body), ReplyVerdict::Forward);
        }
    }
}
