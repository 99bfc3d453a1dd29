#!/usr/bin/env python3
# How much of a relay's CPU per GiB into loopback TCP is the sending alone (docs/BENCHMARKS.md,
# "What the figures mean", bulk). Per round, in a shuffled order, one session of GIB GiB each:
#   kvmi-relay  source -> UNIX -> kvmi-relay -> TCP -> sink   (CPU: the relay process)
#   socat       the same through socat as the harness runs it (CPU: socat and its session child)
#   copy loop   the same through the harness's blocking read/write loop
#   send only   a process that writes GIB from one 256 KiB buffer into TCP -> sink (no reading)
#   recv only   source -> UNIX -> a process that reads into one 256 KiB buffer (no sending)
# Source and sink are the same Python processes for every row (CHUNK_KIB writes / recv_into).
# The relays' CPU comes from wait4() after SIGTERM (their start-up, ~1 ms, included); the two
# floors measure their loop with getrusage() (interpreter start-up excluded; the interpreter's
# own cost is ~4096 calls per GiB, a few ms).
#   benches/side-checks/tcp-send-floor.py ROUNDS GIB [SEED]
# CHUNK_KIB (default 256) sets the write and read size of the Python processes.
import os, random, resource, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.abspath(__file__)) + "/../.."
RELAY = f"{ROOT}/target/dist/kvmi-relay"
HARNESS = f"{ROOT}/target/bench-harness/release/kvmi-relay-bench"
D = "/tmp/tcp-send-floor"
CHUNK = int(os.environ.get("CHUNK_KIB", "256")) << 10
PY = sys.executable

# The helper processes: this same script with a role as its first argument.
def role_source(path, n):  # writes n bytes into a UNIX socket it dials
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.002)
    buf, left = memoryview(b"\0" * CHUNK), n
    while left:
        left -= s.send(buf[: min(left, CHUNK)])
    s.close()


def role_sink(port_file, n):  # accepts one TCP connection and reads n bytes
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    drain(ls.accept()[0], n, "sink")


def drain(c, n, who):  # reads n bytes from c into one CHUNK buffer
    buf, got = bytearray(CHUNK), 0
    while got < n:
        r = c.recv_into(buf)
        if not r:
            sys.exit(f"{who}: EOF after {got} of {n} bytes")
        got += r


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def role_send_only(port, n):  # the floor of sending into TCP: no reading at all
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, left = memoryview(b"\0" * CHUNK), n
    t = cpu_self()
    while left:
        left -= s.send(buf[: min(left, CHUNK)])
    print(cpu_self() - t)


def role_recv_only(path, n):  # the floor of reading from UNIX: no sending at all
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    c, _ = ls.accept()
    t = cpu_self()
    drain(c, n, "recv only")
    print(cpu_self() - t)


def clean():
    os.makedirs(D, exist_ok=True)
    for f in os.listdir(D):
        os.unlink(f"{D}/{f}")


def start_sink(n):
    sink = subprocess.Popen([PY, __file__, "sink", f"{D}/port", str(n)])
    while not os.path.exists(f"{D}/port"):
        time.sleep(0.002)
    return sink, int(open(f"{D}/port").read())


def wait_listening(path):
    while path not in open("/proc/net/unix").read():
        time.sleep(0.002)


def through_hop(name, n):
    clean()
    sink, port = start_sink(n)
    front = f"{D}/front.sock"
    if name == "kvmi-relay":
        cmd = [RELAY, f"--listen=unix:{front}", f"--connect=tcp:127.0.0.1:{port}", "--log-level=warn"]
    elif name == "socat":
        cmd = ["socat", f"UNIX-LISTEN:{front},unlink-early,fork", f"TCP:127.0.0.1:{port},end-close"]
    else:
        cmd = [HARNESS, "copy-loop", f"unix:{front}", f"tcp:127.0.0.1:{port}"]
    hop = subprocess.Popen(cmd)
    wait_listening(front)
    t0 = time.monotonic()
    src = subprocess.Popen([PY, __file__, "source", front, str(n)])
    src.wait()
    sink.wait()
    secs = time.monotonic() - t0
    if sink.returncode != 0:
        sys.exit(f"{name}: the sink failed")
    time.sleep(0.05)  # socat's session child exits and is reaped by its parent
    hop.send_signal(signal.SIGTERM)
    _, _, ru = os.wait4(hop.pid, 0)
    hop.returncode = 0
    return ru.ru_utime + ru.ru_stime, secs


def floor(name, n):
    # The measuring process prints its loop's CPU seconds; its stderr goes to ours.
    clean()
    t0 = time.monotonic()
    if name == "send only":
        sink, port = start_sink(n)
        p = subprocess.Popen([PY, __file__, "send-only", str(port), str(n)], stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate()
        sink.wait()
    else:
        path = f"{D}/recv.sock"
        p = subprocess.Popen([PY, __file__, "recv-only", path, str(n)], stdout=subprocess.PIPE, text=True)
        wait_listening(path)
        subprocess.run([PY, __file__, "source", path, str(n)], check=True)
        out, _ = p.communicate()
    if p.returncode != 0:
        sys.exit(f"{name}: exited with {p.returncode}")
    return float(out), time.monotonic() - t0


def main():
    rounds, gib = int(sys.argv[1]), float(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else int(time.time())
    n = int(gib * (1 << 30))
    rng = random.Random(seed)
    names = ["kvmi-relay", "socat", "copy loop", "send only", "recv only"]
    cpu = {k: [] for k in names}
    speed = {k: [] for k in names}
    print(f"{rounds} rounds of {gib} GiB, seed {seed}, order shuffled each round")
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            c, s = floor(name, n) if name.endswith("only") else through_hop(name, n)
            cpu[name].append(c / gib)
            speed[name].append(gib / s)
        print(f"round {r + 1}: " + ", ".join(f"{k} {cpu[k][-1]:.3f}" for k in names), flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    print("\n| process | CPU s/GiB, median | min | max | × socat (median) | GiB/s, median |")
    print("|---|---|---|---|---|---|")
    for k in names:
        sp = sorted(speed[k])[len(speed[k]) // 2]
        print(f"| {k} | {med[k]:.3f} | {min(cpu[k]):.3f} | {max(cpu[k]):.3f} | {med[k] / med['socat']:.2f} | {sp:.2f} |")
    print(f"\nhalf of socat's median: {med['socat'] / 2:.3f} s/GiB; send only + recv only: "
          f"{med['send only'] + med['recv only']:.3f}")


if __name__ == "__main__":
    roles = {"source": role_source, "sink": role_sink, "send-only": role_send_only, "recv-only": role_recv_only}
    if len(sys.argv) > 1 and sys.argv[1] in roles:
        a = sys.argv[2:]
        roles[sys.argv[1]](a[0] if sys.argv[1] in ("source", "sink", "recv-only") else int(a[0]), int(a[1]))
    else:
        main()
