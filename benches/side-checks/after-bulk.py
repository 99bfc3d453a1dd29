#!/usr/bin/env python3
# System calls a relay makes per KVMi request/answer round trip (24 B -> 4112 B, UNIX -> UNIX)
# after the session has carried 8 MiB of bulk: what copy-then-splice's way back to copies saves
# (docs/DESIGN.md, "Messages copy, bulk splices"). Compare builds in one go, e.g.
#   for b in old=/tmp/kvmi-relay-old new=target/dist/kvmi-relay; do
#       taskset -c 0 benches/side-checks/after-bulk.py "${b#*=}" "${b%%=*}" 3000; done
# Needs perf (Debian: linux-perf) and root or perf_event_paranoid <= 1 for the syscall
# tracepoints. The RTTs include this Python client and server; the counts are exact.
import os, socket, subprocess, sys, time, statistics, threading
relay_bin, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = f"/tmp/after-bulk-{tag}"; os.makedirs(d, exist_ok=True)
for f in ("srv.sock", "relay.sock"):
    try: os.unlink(f"{d}/{f}")
    except FileNotFoundError: pass
ls = socket.socket(socket.AF_UNIX); ls.bind(f"{d}/srv.sock"); ls.listen(1)
r = subprocess.Popen([relay_bin, f"--listen=unix:{d}/relay.sock", f"--connect=unix:{d}/srv.sock", "--log-level=warn"])
while not os.path.exists(f"{d}/relay.sock"): time.sleep(0.01)
c = socket.socket(socket.AF_UNIX); c.connect(f"{d}/relay.sock"); s, _ = ls.accept()
bulk = os.urandom(8 << 20)
t = threading.Thread(target=lambda: s.sendall(bulk)); t.start()
got = 0
while got < len(bulk): got += len(c.recv(1 << 20))
t.join()
req, ans = b"q" * 24, b"a" * 4112
def rounds(k, rtts=None):
    for _ in range(k):
        t0 = time.perf_counter_ns()
        c.sendall(req); x = 0
        while x < 24: x += len(s.recv(24 - x))
        s.sendall(ans); x = 0
        while x < 4112: x += len(c.recv(4112 - x))
        if rtts is not None: rtts.append((time.perf_counter_ns() - t0) / 1000)
rounds(50)  # past the move back, if any
perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_splice,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait", "-p", str(r.pid), "-o", f"{d}/perf.txt"])
time.sleep(0.3)
rtts = []; rounds(n, rtts)
perf.send_signal(2); perf.wait()
c.close(); s.close(); r.terminate(); r.wait()
counts = {l.split(",")[2].split(":")[1]: int(l.split(",")[0]) for l in open(f"{d}/perf.txt") if "sys_enter" in l}
q = statistics.quantiles(rtts, n=10)
print(f"{tag}: p50 {statistics.median(rtts):.1f} us p90 {q[8]:.1f} us; per round: " + " ".join(f"{k.replace('sys_enter_','')}={v/n:.2f}" for k, v in counts.items()))
