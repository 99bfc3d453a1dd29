//! The KVMi wire format (x86_64, little-endian) and a fake hypervisor / fake introspector pair.
//!
//! Primer (docs/DESIGN.md, "Deployment facts it is built on"): QEMU dials the introspector and
//! sends a 96-byte `kvmi_qemu2introspector` handshake; the introspector answers with a 24-byte
//! `kvmi_introspector2qemu`; from then on KVM itself speaks `kvmi_msg_hdr {u16 id; u16 size;
//! u32 seq}` messages. Replies echo id and seq and start with `{s32 err; u32 pad}`.
//! Sizes on the wire: GET_VERSION 8 → 32, READ_PHYSICAL 24 → 4112 (one 4 KiB page),
//! PAUSE_VCPU event 552 → reply 24.
//!
//! The fake pair follows those sizes exactly. One thing is the demo's own: the command
//! `DEMO_RAISE_EVENTS` (id 0x7f00) asks the fake hypervisor to raise N PAUSE_VCPU events,
//! standing in for the vCPU activity a real guest produces.
//!
//! Every page the fake hypervisor serves is a pure function of its address and every event a
//! pure function of its sequence number, so the far side checks every byte it gets.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub const HDR_BYTES: usize = 8;
pub const QEMU2INTROSPECTOR_BYTES: usize = 96;
pub const INTROSPECTOR2QEMU_BYTES: usize = 24;
pub const PAGE_BYTES: usize = 4096;

pub const ID_EVENT_REPLY: u16 = 0;
pub const ID_EVENT: u16 = 1;
pub const ID_GET_VERSION: u16 = 2;
pub const ID_READ_PHYSICAL: u16 = 17;
/// The demo's own command: raise N PAUSE_VCPU events (not a KVMi message).
pub const ID_DEMO_RAISE_EVENTS: u16 = 0x7f00;

pub const GET_VERSION_REPLY_BYTES: usize = 32;
pub const READ_PHYSICAL_REQUEST_BYTES: usize = 24;
pub const READ_PHYSICAL_REPLY_BYTES: usize = HDR_BYTES + 8 + PAGE_BYTES;
pub const PAUSE_EVENT_BYTES: usize = 552;
pub const PAUSE_EVENT_REPLY_BYTES: usize = 24;

/// Largest body the fake peers accept (libkvmi: 8192 − 8).
const MAX_BODY_BYTES: usize = 8192 - HDR_BYTES;
/// libkvmi accepts handshake struct sizes in this range.
const HANDSHAKE_MIN_BYTES: u32 = 32;
const HANDSHAKE_MAX_BYTES: u32 = 64 * 1024;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid")
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub id: u16,
    pub size: u16,
    pub seq: u32,
}

pub fn write_msg(w: &mut impl Write, id: u16, seq: u32, body: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(HDR_BYTES + body.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(body);
    w.write_all(&m)
}

/// Reads one message; `None` at a clean EOF between messages.
pub fn read_msg(r: &mut impl Read, body: &mut Vec<u8>) -> io::Result<Option<Hdr>> {
    let mut h = [0u8; HDR_BYTES];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let hdr = Hdr {
        id: u16::from_le_bytes([h[0], h[1]]),
        size: u16::from_le_bytes([h[2], h[3]]),
        seq: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    };
    if hdr.size as usize > MAX_BODY_BYTES {
        return Err(bad(format!("message id {} claims {} body bytes, more than {MAX_BODY_BYTES}", hdr.id, hdr.size)));
    }
    body.resize(hdr.size as usize, 0);
    r.read_exact(body)?;
    Ok(Some(hdr))
}

/// The page the fake guest holds at `gpa`.
pub fn page(gpa: u64, out: &mut [u8]) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// `struct kvmi_event`'s size (the common part every event body starts with, x86_64).
pub const EVENT_COMMON_BYTES: usize = 544;
pub const EVENT_PAUSE_VCPU: u8 = 10;
pub const EVENT_CR: u8 = 1;
pub const ID_GET_REGISTERS: u16 = 13;
pub const ID_SET_REGISTERS: u16 = 14;
pub const ID_WRITE_PHYSICAL: u16 = 18;
/// The demo's own command: raise one CR event for CR3 with the `u64` new value in the body.
pub const ID_DEMO_RAISE_CR: u16 = 0x7f01;
pub const CR_EVENT_BYTES: usize = HDR_BYTES + EVENT_COMMON_BYTES + 24;
pub const CR_EVENT_REPLY_BYTES: usize = HDR_BYTES + 24;

/// An event body: `struct kvmi_event { u16 size; u16 vcpu; u8 event; ... }` for vCPU 0, the
/// rest of the common part a pattern of `seq`.
fn event_body(seq: u32, out: &mut [u8]) {
    page(u64::from(seq) | 1 << 63, out);
    out[0..2].copy_from_slice(&(EVENT_COMMON_BYTES as u16).to_le_bytes());
    out[2..4].fill(0);
    out[4] = EVENT_PAUSE_VCPU;
    out[5..8].fill(0);
}

/// A CR event body: common part, then `{ u16 cr; u16 pad[3]; u64 old; u64 new }`.
pub fn cr_event_body(seq: u32, old: u64, new: u64) -> Vec<u8> {
    let mut b = vec![0u8; EVENT_COMMON_BYTES + 24];
    event_body(seq, &mut b[..EVENT_COMMON_BYTES]);
    b[4] = EVENT_CR;
    b[EVENT_COMMON_BYTES..EVENT_COMMON_BYTES + 2].copy_from_slice(&3u16.to_le_bytes());
    b[EVENT_COMMON_BYTES + 8..EVENT_COMMON_BYTES + 16].copy_from_slice(&old.to_le_bytes());
    b[EVENT_COMMON_BYTES + 16..EVENT_COMMON_BYTES + 24].copy_from_slice(&new.to_le_bytes());
    b
}

/// An event reply body: `kvmi_vcpu_hdr` (vCPU 0), `{ u8 action; u8 event; ... }`, then `extra`.
pub fn event_reply_body(event: u8, action: u8, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[8] = action;
    b[9] = event;
    b.extend_from_slice(extra);
    b
}

/// The uuid the fake hypervisor's handshake carries.
pub const FAKE_VM_UUID: [u8; 16] = *b"kvmi-relay-fake!";

/// QEMU's side of the handshake: 96 bytes, as `kvmi_qemu2introspector`.
pub fn qemu_handshake(name: &str) -> [u8; QEMU2INTROSPECTOR_BYTES] {
    let mut h = [0u8; QEMU2INTROSPECTOR_BYTES];
    h[0..4].copy_from_slice(&(QEMU2INTROSPECTOR_BYTES as u32).to_le_bytes());
    h[4..20].copy_from_slice(&FAKE_VM_UUID);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    h[24..32].copy_from_slice(&now.to_le_bytes());
    let n = name.len().min(63);
    h[32..32 + n].copy_from_slice(&name.as_bytes()[..n]);
    h
}

/// How the fake hypervisor behaves beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct HypervisorOptions {
    /// Write every event in two pieces with this gap between them (a far side that splits).
    pub split_events: Option<Duration>,
    /// Send the 104-byte handshake with this `max_gpa`.
    pub max_gpa: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct HypervisorReport {
    pub commands: u64,
    pub events: u64,
    /// Commands that write guest state that reached the hypervisor (WRITE_PHYSICAL,
    /// SET_REGISTERS): a read-only relay must keep this at zero.
    pub writes: u64,
    /// The `new_val` of each CR event reply, as applied on CONTINUE.
    pub cr_values: Vec<u64>,
    /// Event sent → reply received, nanoseconds: how long the guest vCPU stood still.
    pub event_rtt: Histogram<u64>,
}

/// The fake hypervisor: sends the handshake, checks the answer, then serves commands until
/// the introspector closes (the unhook signal).
pub fn serve_hypervisor(sock: &mut impl ReadWrite, name: &str) -> io::Result<HypervisorReport> {
    serve_hypervisor_with(sock, name, &HypervisorOptions::default())
}

fn send_event(sock: &mut impl ReadWrite, seq: u32, body: &[u8], opts: &HypervisorOptions) -> io::Result<()> {
    let mut m = Vec::with_capacity(HDR_BYTES + body.len());
    write_msg(&mut m, ID_EVENT, seq, body)?;
    match opts.split_events {
        None => sock.write_all(&m),
        Some(gap) => {
            let half = m.len() / 2;
            sock.write_all(&m[..half])?;
            sock.flush()?;
            std::thread::sleep(gap);
            sock.write_all(&m[half..])
        }
    }
}

/// [`serve_hypervisor`] with options.
pub fn serve_hypervisor_with(
    sock: &mut impl ReadWrite,
    name: &str,
    opts: &HypervisorOptions,
) -> io::Result<HypervisorReport> {
    let hs = match opts.max_gpa {
        None => qemu_handshake(name).to_vec(),
        Some(g) => {
            let mut h = qemu_handshake(name).to_vec();
            h[0..4].copy_from_slice(&104u32.to_le_bytes());
            h.extend_from_slice(&g.to_le_bytes());
            h
        }
    };
    sock.write_all(&hs)?;
    let mut answer = [0u8; INTROSPECTOR2QEMU_BYTES];
    sock.read_exact(&mut answer)?;
    let size = u32::from_le_bytes([answer[0], answer[1], answer[2], answer[3]]);
    if size as usize != INTROSPECTOR2QEMU_BYTES {
        return Err(bad(format!("introspector handshake struct_size {size}, expected {INTROSPECTOR2QEMU_BYTES}")));
    }
    let mut report =
        HypervisorReport { commands: 0, events: 0, writes: 0, cr_values: Vec::new(), event_rtt: new_histogram() };
    let mut body = Vec::with_capacity(MAX_BODY_BYTES);
    let mut reply = vec![0u8; 8 + PAGE_BYTES];
    let mut event = vec![0u8; PAUSE_EVENT_BYTES - HDR_BYTES];
    while let Some(hdr) = read_msg(sock, &mut body)? {
        report.commands += 1;
        reply[..8].fill(0); // { s32 err = 0; u32 pad }
        match hdr.id {
            ID_GET_VERSION => {
                reply[8..12].copy_from_slice(&1u32.to_le_bytes());
                reply[12..16].copy_from_slice(&((MAX_BODY_BYTES + HDR_BYTES) as u32).to_le_bytes());
                reply[16..24].fill(0);
                write_msg(sock, hdr.id, hdr.seq, &reply[..GET_VERSION_REPLY_BYTES - HDR_BYTES])?;
            }
            ID_READ_PHYSICAL => {
                if body.len() != 16 {
                    return Err(bad(format!("READ_PHYSICAL body of {} bytes, expected 16", body.len())));
                }
                let gpa = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) as usize;
                if len > PAGE_BYTES {
                    return Err(bad(format!("READ_PHYSICAL of {len} bytes, at most {PAGE_BYTES}")));
                }
                page(gpa, &mut reply[8..8 + len]);
                write_msg(sock, hdr.id, hdr.seq, &reply[..8 + len])?;
            }
            ID_DEMO_RAISE_EVENTS => {
                let n = u32::from_le_bytes(
                    body.get(0..4).ok_or_else(|| bad("short DEMO_RAISE_EVENTS"))?.try_into().expect("4"),
                );
                write_msg(sock, hdr.id, hdr.seq, &reply[..8])?;
                for seq in 0..n {
                    event_body(seq, &mut event);
                    let t = Instant::now();
                    send_event(sock, seq, &event, opts)?;
                    let r = read_msg(sock, &mut body)?.ok_or_else(|| bad("EOF while an event waits for its reply"))?;
                    report.event_rtt.saturating_record(t.elapsed().as_nanos() as u64);
                    if r.id != ID_EVENT_REPLY || r.seq != seq || body.len() != PAUSE_EVENT_REPLY_BYTES - HDR_BYTES {
                        return Err(bad(format!(
                            "bad event reply: id {} seq {} ({} bytes) for event {seq}",
                            r.id,
                            r.seq,
                            body.len()
                        )));
                    }
                    report.events += 1;
                }
            }
            ID_GET_REGISTERS => {
                // kvmi_error_code, then a register file (a pattern here).
                page(0x7e9, &mut reply[8..8 + 136]);
                write_msg(sock, hdr.id, hdr.seq, &reply[..8 + 136])?;
            }
            ID_SET_REGISTERS | ID_WRITE_PHYSICAL => {
                report.writes += 1;
                write_msg(sock, hdr.id, hdr.seq, &reply[..8])?;
            }
            ID_DEMO_RAISE_CR => {
                let new = u64::from_le_bytes(
                    body.get(0..8).ok_or_else(|| bad("short DEMO_RAISE_CR"))?.try_into().expect("8"),
                );
                write_msg(sock, hdr.id, hdr.seq, &reply[..8])?;
                let seq = 1_000_000 + report.cr_values.len() as u32;
                send_event(sock, seq, &cr_event_body(seq, 0x1000, new), opts)?;
                let r = read_msg(sock, &mut body)?.ok_or_else(|| bad("EOF while a CR event waits for its reply"))?;
                if r.id != ID_EVENT_REPLY || r.seq != seq || body.len() != CR_EVENT_REPLY_BYTES - HDR_BYTES {
                    return Err(bad(format!("bad CR event reply: id {} seq {} ({} bytes)", r.id, r.seq, body.len())));
                }
                report.cr_values.push(u64::from_le_bytes(body[16..24].try_into().expect("8")));
                report.events += 1;
            }
            other => return Err(bad(format!("fake hypervisor got unknown command id {other}"))),
        }
    }
    Ok(report)
}

#[derive(Debug, Clone)]
pub struct IntrospectorReport {
    pub vm_name: String,
    pub reads: u64,
    /// READ_PHYSICAL request sent → page received, nanoseconds.
    pub read_rtt: Histogram<u64>,
    pub passive_elapsed: Duration,
    pub events: u64,
    pub active_elapsed: Duration,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Sockets the fake peers can talk over.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The fake introspector, on an accepted connection: handshake, GET_VERSION, `reads`
/// sequential 4 KiB READ_PHYSICALs (every byte checked), then `events` PAUSE_VCPU events
/// answered one by one, then close.
pub fn run_introspector(sock: &mut impl ReadWrite, reads: u64, events: u32) -> io::Result<IntrospectorReport> {
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut first = [0u8; 4];
    sock.read_exact(&mut first)?;
    let size = u32::from_le_bytes(first);
    if !(HANDSHAKE_MIN_BYTES..=HANDSHAKE_MAX_BYTES).contains(&size) {
        return Err(bad(format!(
            "QEMU handshake struct_size {size} outside {HANDSHAKE_MIN_BYTES}..={HANDSHAKE_MAX_BYTES}"
        )));
    }
    let mut rest = vec![0u8; size as usize - 4];
    sock.read_exact(&mut rest)?;
    received += u64::from(size);
    let name_bytes = rest.get(28..92).unwrap_or(&[]);
    let vm_name = String::from_utf8_lossy(name_bytes.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    let mut answer = [0u8; INTROSPECTOR2QEMU_BYTES];
    answer[0..4].copy_from_slice(&(INTROSPECTOR2QEMU_BYTES as u32).to_le_bytes());
    sock.write_all(&answer)?;
    sent += INTROSPECTOR2QEMU_BYTES as u64;

    let mut body = Vec::with_capacity(MAX_BODY_BYTES);
    let mut seq = 0u32;
    let call = |sock: &mut dyn ReadWrite, id: u16, req: &[u8], body: &mut Vec<u8>, seq: &mut u32| -> io::Result<()> {
        *seq = seq.wrapping_add(1);
        let mut w: &mut dyn ReadWrite = sock;
        write_msg(&mut w, id, *seq, req)?;
        let hdr = read_msg(&mut w, body)?.ok_or_else(|| bad(format!("EOF while waiting for the reply to id {id}")))?;
        if hdr.id != id || hdr.seq != *seq {
            return Err(bad(format!(
                "reply id {} seq {} does not match request id {id} seq {}",
                hdr.id, hdr.seq, *seq
            )));
        }
        if body.len() < 8 || i32::from_le_bytes(body[0..4].try_into().expect("4")) != 0 {
            return Err(bad(format!("command id {id} failed")));
        }
        Ok(())
    };

    call(sock, ID_GET_VERSION, &[], &mut body, &mut seq)?;
    sent += HDR_BYTES as u64;
    received += (HDR_BYTES + body.len()) as u64;
    if body.len() + HDR_BYTES != GET_VERSION_REPLY_BYTES || u32::from_le_bytes(body[8..12].try_into().expect("4")) < 1 {
        return Err(bad("GET_VERSION reply is not a version >= 1"));
    }

    let mut read_rtt = new_histogram();
    let mut want = vec![0u8; PAGE_BYTES];
    let passive_start = Instant::now();
    for i in 0..reads {
        let gpa = (i % 262_144) * PAGE_BYTES as u64;
        let mut req = [0u8; 16];
        req[0..8].copy_from_slice(&gpa.to_le_bytes());
        req[8..16].copy_from_slice(&(PAGE_BYTES as u64).to_le_bytes());
        let t = Instant::now();
        call(sock, ID_READ_PHYSICAL, &req, &mut body, &mut seq)?;
        read_rtt.saturating_record(t.elapsed().as_nanos() as u64);
        page(gpa, &mut want);
        if body.len() != 8 + PAGE_BYTES || body[8..] != want[..] {
            return Err(bad(format!("page at gpa {gpa:#x} arrived corrupted ({} bytes)", body.len())));
        }
        sent += READ_PHYSICAL_REQUEST_BYTES as u64;
        received += READ_PHYSICAL_REPLY_BYTES as u64;
    }
    let passive_elapsed = passive_start.elapsed();

    let active_start = Instant::now();
    if events > 0 {
        call(sock, ID_DEMO_RAISE_EVENTS, &events.to_le_bytes(), &mut body, &mut seq)?;
        sent += (HDR_BYTES + 4) as u64;
        received += (HDR_BYTES + body.len()) as u64;
        let mut want_event = vec![0u8; PAUSE_EVENT_BYTES - HDR_BYTES];
        let reply = event_reply_body(EVENT_PAUSE_VCPU, 0, &[]);
        for n in 0..events {
            let hdr = read_msg(sock, &mut body)?.ok_or_else(|| bad(format!("EOF while waiting for event {n}")))?;
            event_body(n, &mut want_event);
            if hdr.id != ID_EVENT || hdr.seq != n || body[..] != want_event[..] {
                return Err(bad(format!(
                    "event {n} arrived corrupted (id {} seq {} {} bytes)",
                    hdr.id,
                    hdr.seq,
                    body.len()
                )));
            }
            write_msg(sock, ID_EVENT_REPLY, n, &reply)?;
            received += PAUSE_EVENT_BYTES as u64;
            sent += PAUSE_EVENT_REPLY_BYTES as u64;
        }
    }
    let active_elapsed = active_start.elapsed();
    Ok(IntrospectorReport {
        vm_name,
        reads,
        read_rtt,
        passive_elapsed,
        events: u64::from(events),
        active_elapsed,
        bytes_sent: sent,
        bytes_received: received,
    })
}

/// A scripted introspector for tests: the handshake, then one call at a time.
pub struct Tool<S: ReadWrite> {
    pub sock: S,
    seq: u32,
    pub vm_handshake: Vec<u8>,
}

impl<S: ReadWrite> Tool<S> {
    /// Reads QEMU's handshake (its own size field says how long) and answers it.
    pub fn accept(mut sock: S) -> io::Result<Tool<S>> {
        let mut first = [0u8; 4];
        sock.read_exact(&mut first)?;
        let size = u32::from_le_bytes(first) as usize;
        if !(32..=65536).contains(&size) {
            return Err(bad(format!("handshake struct_size {size}")));
        }
        let mut hs = first.to_vec();
        hs.resize(size, 0);
        sock.read_exact(&mut hs[4..])?;
        let mut answer = [0u8; INTROSPECTOR2QEMU_BYTES];
        answer[0..4].copy_from_slice(&(INTROSPECTOR2QEMU_BYTES as u32).to_le_bytes());
        sock.write_all(&answer)?;
        Ok(Tool { sock, seq: 0, vm_handshake: hs })
    }

    /// Sends a command and returns its reply: (err, data after the error code).
    pub fn call(&mut self, id: u16, req: &[u8]) -> io::Result<(i32, Vec<u8>)> {
        self.seq += 1;
        let seq = self.seq;
        write_msg(&mut self.sock, id, seq, req)?;
        let mut body = Vec::new();
        let hdr =
            read_msg(&mut self.sock, &mut body)?.ok_or_else(|| bad(format!("EOF waiting for the reply to {id}")))?;
        if hdr.id != id || hdr.seq != seq || body.len() < 8 {
            return Err(bad(format!(
                "reply id {} seq {} ({} bytes) to id {id} seq {seq}",
                hdr.id,
                hdr.seq,
                body.len()
            )));
        }
        Ok((i32::from_le_bytes(body[0..4].try_into().expect("4")), body[8..].to_vec()))
    }

    /// The next message (an event).
    pub fn next_message(&mut self) -> io::Result<(Hdr, Vec<u8>)> {
        let mut body = Vec::new();
        let hdr = read_msg(&mut self.sock, &mut body)?.ok_or_else(|| bad("EOF waiting for a message"))?;
        Ok((hdr, body))
    }

    pub fn reply_event(&mut self, seq: u32, body: &[u8]) -> io::Result<()> {
        write_msg(&mut self.sock, ID_EVENT_REPLY, seq, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_fake_pair_agrees_over_a_socketpair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let hv = std::thread::spawn(move || serve_hypervisor(&mut a, "one-7").unwrap());
        let rep = run_introspector(&mut b, 100, 20).unwrap();
        drop(b);
        let hv = hv.join().unwrap();
        assert_eq!(rep.vm_name, "one-7");
        assert_eq!(rep.reads, 100);
        assert_eq!(hv.events, 20);
        // GET_VERSION, the reads and DEMO_RAISE_EVENTS; event replies are not commands.
        assert_eq!(hv.commands, 1 + 100 + 1);
        assert_eq!(rep.read_rtt.len(), 100);
        assert_eq!(rep.bytes_received, 96 + 32 + 100 * 4112 + 16 + 20 * 552);
    }

    #[test]
    fn message_sizes_match_kvmi() {
        assert_eq!(qemu_handshake("x").len(), 96);
        assert_eq!(READ_PHYSICAL_REPLY_BYTES, 4112);
        let mut v = Vec::new();
        write_msg(&mut v, ID_READ_PHYSICAL, 1, &[0; 16]).unwrap();
        assert_eq!(v.len(), READ_PHYSICAL_REQUEST_BYTES);
    }
}
