#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/: real inputs, as the relay meets them.

Text targets get command-line values and control lines; the KVMi targets get the byte streams
of real sessions (QEMU's handshake in both sizes, libkvmi's answer, GET_VERSION, READ_PHYSICAL
with its 4 KiB page, WRITE_PHYSICAL, a CR event and its reply, a PAUSE_VCPU event, a
CONTROL_CMD_RESPONSE batch) laid out as each target reads its input (see its header). Run it
from anywhere; it rewrites the seeds it owns and leaves other corpus files alone.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
UUID = bytes.fromhex("123456789abcdef0" "0123456789abcdef")


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def qemu(name=b"one-7", max_gpa=None):
    size = 104 if max_gpa is not None else 96
    h = struct.pack("<I", size) + UUID + b"\0" * 4 + struct.pack("<q", 1_700_000_000)
    h += name.ljust(64, b"\0")
    if max_gpa is not None:
        h += struct.pack("<Q", max_gpa)
    return h


ANSWER = struct.pack("<I", 24) + bytes(range(20))


def msg(id, seq, body):
    return struct.pack("<HHI", id, len(body), seq) + body


def vcpu(n=0):
    return struct.pack("<HHI", n, 0, 0)


def event(seq, ev, specific=b"", n=0):
    common = struct.pack("<HHBBH", 24, n, ev, 0, 0) + bytes(16)  # size, vcpu, event, pad; arch
    return msg(1, seq, common + specific)


def event_reply(seq, ev, extra=b"", n=0):
    return msg(0, seq, vcpu(n) + struct.pack("<BBHI", 0, ev, 0, 0) + extra)  # CONTINUE


GET_VERSION = msg(2, 1, b"")
VERSION_REPLY = msg(2, 1, struct.pack("<iI", 0, 0) + struct.pack("<II", 7, 0))
READ = msg(17, 2, struct.pack("<QHHI", 0x1000, 4096, 0, 0))
PAGE = msg(17, 2, struct.pack("<iI", 0, 0) + bytes(4096))
WRITE = msg(18, 3, struct.pack("<QHHI", 0x2000, 8, 0, 0) + bytes(8))
WRITE_REPLY = msg(18, 3, struct.pack("<iI", 0, 0))
CR = event(7, 1, struct.pack("<HHHHQQ", 3, 0, 0, 0, 0x1000, 0x2000))
CR_REPLY = event_reply(7, 1, struct.pack("<Q", 0x2000))
CR_REPLY_CHANGED = event_reply(7, 1, struct.pack("<Q", 0x3000))
PAUSE = event(8, 10)
PAUSE_REPLY = event_reply(8, 10)
BATCH_OFF = msg(27, 4, struct.pack("<BBHI", 0, 0, 0, 0))
BATCH_ON = msg(27, 5, struct.pack("<BBHI", 1, 1, 0, 0))
BATCH_ON_REPLY = msg(27, 5, struct.pack("<iI", 0, 0))
GET_REGS = msg(13, 6, vcpu() + struct.pack("<HHI", 0, 0, 0))
SET_REGS = msg(14, 9, vcpu() + bytes(144))

to_hv = ANSWER + GET_VERSION + READ + WRITE + CR_REPLY + PAUSE_REPLY
to_in = VERSION_REPLY + PAGE + WRITE_REPLY + CR + PAUSE


def session(flags, to_hypervisor, to_introspector, schedule):
    return (bytes([flags]) + struct.pack("<H", len(to_hypervisor)) + to_hypervisor
            + struct.pack("<H", len(to_introspector)) + to_introspector + schedule)


# The schedule's bytes: which stream's message comes next (low bit), then cuts and write sizes.
INTERLEAVE = bytes([0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1])
write("kvmi_session", "full-session", session(0, to_hv, to_in, INTERLEAVE))
write("kvmi_session", "read-only-session", session(2, to_hv, to_in, INTERLEAVE + bytes([200, 130, 3, 100, 255] * 8)))
write("kvmi_session", "read-only-cr-reply-changed",
      session(2, ANSWER + GET_VERSION + CR_REPLY_CHANGED, VERSION_REPLY + CR, bytes([0, 0, 1, 1, 0])))
write("kvmi_session", "qemu-in-stream-pinned",
      session(1 | 0x10, ANSWER + GET_VERSION + GET_REGS, qemu() + VERSION_REPLY + msg(13, 6, bytes(16)),
              bytes([1, 0, 0, 1, 0, 1])))
write("kvmi_session", "qemu-in-stream-pin-mismatch",
      session(1 | 0x20, ANSWER + WRITE, qemu(b"other-vm", 1 << 40) + WRITE_REPLY, bytes([1, 0, 0, 1])))
write("kvmi_session", "batch-and-deny",
      session(8 | 2, ANSWER + BATCH_OFF + READ + SET_REGS + BATCH_ON, BATCH_ON_REPLY, bytes([0] * 5 + [1])))

write("kvmi_handshake", "qemu-96", qemu() + GET_VERSION)
write("kvmi_handshake", "qemu-104", qemu(b"vm-with-max-gpa", 1 << 36))
write("kvmi_handshake", "answer", ANSWER + GET_VERSION)
write("kvmi_handshake", "http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def framer(flow, cuts, stream):
    return bytes([flow | (len(cuts) << 1)]) + b"".join(struct.pack("<H", c) for c in cuts) + stream


write("kvmi_framer", "to-hypervisor", framer(0, [3, 8, 100], GET_VERSION + READ + WRITE + CR_REPLY + PAUSE_REPLY))
write("kvmi_framer", "to-introspector", framer(1, [1, 7, 4000], VERSION_REPLY + PAGE + WRITE_REPLY + CR + PAUSE))
write("kvmi_framer", "oversized-command", framer(0, [5], READ + struct.pack("<HHI", 18, 9000, 4)))

for i, t in enumerate(["unix:/run/kvmi/one-7.sock", "tcp:127.0.0.1:7", "tcp:[::1]:7", "tcp:[2001:db8::9]:4444",
                       "vsock:3:1", "vsock:9999", "tcp:0.0.0.0:7", "vsock:4294967295:1", "tcp:[::ffff:10.0.0.9]:80"]):
    write("endpoint", f"seed-{i}", t)

ADDRS = [bytes([10, 0, 0, 9]) + bytes(12), bytes([192, 0, 2, 1]) + bytes(12),
         bytes.fromhex("20010db8000000000000000000000009"), bytes.fromhex("00000000000000000000ffff0a000009")]
for i, t in enumerate(["192.0.2.0/24", "2001:db8::/32", "127.0.0.2", "::1", "::ffff:10.0.0.0/104", "10.1.2.3/8",
                       "0.0.0.0/0", "::/0"]):
    write("allow_rule", f"seed-{i}", ADDRS[i % len(ADDRS)] + struct.pack("<H", 7000 + i) + t.encode())

for i, t in enumerate(["12345678-9abc-def0-0123-456789abcdef", "123456789ABCDEF00123456789ABCDEF",
                       "00000000-0000-0000-0000-000000000000"]):
    write("uuid", f"seed-{i}", t)

for i, t in enumerate(["/run/kvmi/one-7.sock", "vm\nfake", "x\r\x1b[2Kkvmi-relay: configuration ok",
                       "naïve \\ \"quoted\" \u200b\u2028end", "\0tab\there"]):
    write("escape", f"seed-{i}", t)

for i, t in enumerate(["stats\n", "stats text\n", "stats json\n", "stats prometheus\n", "reset\n",
                       "GET / HTTP/1.0\r\n\r\n", "  stats json  \nextra"]):
    write("control_request", f"seed-{i}", t)

CONFIGS = [
    "--listen\nunix:/tmp/one-7.sock\n--connect\ntcp:203.0.113.9:7\n--allow-uid\n0",
    "--listen\ntcp:0.0.0.0:7\n--allow-ip\n198.51.100.4/32,2001:db8::/32\n--connect\nunix:/tmp/x.sock",
    "--listen\nvsock:5000\n--allow-cid\n3,4\n--connect\nunix:/run/kvmi/one-7.sock\n--check",
    "KVMI_RELAY_LISTEN=unix:/tmp/a.sock\nKVMI_RELAY_CONNECT=vsock:2:5000\nKVMI_RELAY_ALLOW_GID=root",
    "--listen=unix:/tmp/one-7.sock\n--connect=tcp:[::1]:7\n--kvmi\n--kvmi-policy\nread-only\n--kvmi-vm-uuid\n"
    "12345678-9abc-def0-0123-456789abcdef\n--kvmi-vm-name\none-7\n--kvmi-deny\nREAD_PHYSICAL",
    "KVMI_RELAY_KVMI=true\nKVMI_RELAY_KVMI_HYPERVISOR_SIDE=connect\n--listen\ntcp:[::]:7\n--allow-any-ip\n"
    "--connect\nunix:/tmp/qemu.sock\n--move\ncopy\n--hist-log\n/tmp/h.log\n--hist-interval\n0.5",
    "--listen\ntcp:127.0.0.1:7\n--allow-ip\n10.0.0.0/33\n--connect\nvsock:9\n--socket-mode\n0666\n--max-conns\n0",
    "--listen\nunix:/tmp/a.sock\n--connect\nunix:/tmp/b.sock\n--log-level\nkvmi_relay=debug,warn\n--name\nvm\nfake"
    "\n--control\n/tmp/ctl.sock\n--pipe-size\n4096\n--cpu\n0",
    "stats\n/run/kvmi/one-7.ctl\n--json",
]
for i, t in enumerate(CONFIGS):
    write("config", f"seed-{i}", t)

GREETING = b"kvmi-relay control 1\n"
for i, t in enumerate([GREETING + b'{"connections":[],"totals":{"sessions":0}}\n', GREETING + b"error: unknown request\n",
                       GREETING, qemu(), b"HTTP/1.1 200 OK\r\n\r\n", b"kvmi-relay control 2\n", b"",
                       GREETING + b"error: unknown request\xff\xff\xff\n"]):
    write("control_client", f"seed-{i}", t)
