#!/usr/bin/env python3
# One long 64 B ping-pong session through one relay while busy processes keep every CPU loaded
# (docs/BENCHMARKS.md, "The poll window on a busy machine"). Unlike the harness, which starts a
# relay per 500-operation session, the relay here lives for the whole session, and the client and
# echo server are Python threads (slower peers). Builds and flags are compared interleaved:
#   benches/side-checks/loaded-long-session.py 5 3 base=/tmp/kvmi-relay-old \
#       new=target/dist/kvmi-relay 'pw0=target/dist/kvmi-relay --poll-window-us=0'
# arguments: seconds per session, rounds, then NAME=BINARY [FLAGS...] per contender.
# Prints round trips per session, RTT percentiles, round trips of 2 ms or more, and the relay's
# poll window suspensions (stats JSON; "-" for builds without the counter).
import json, os, shlex, socket, subprocess, sys, threading, time

secs, rounds = float(sys.argv[1]), int(sys.argv[2])
contenders = []
for spec in sys.argv[3:]:
    name, cmd = spec.split("=", 1)
    contenders.append((name, shlex.split(cmd)))
d = "/tmp/loaded-long-session"
os.makedirs(d, exist_ok=True)


def session(cmd):
    for f in ("echo.sock", "relay.sock", "ctl.sock"):
        try:
            os.unlink(f"{d}/{f}")
        except FileNotFoundError:
            pass
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(f"{d}/echo.sock")
    ls.listen(1)

    def echo():
        c, _ = ls.accept()
        while b := c.recv(65536):
            c.sendall(b)

    threading.Thread(target=echo, daemon=True).start()
    relay = subprocess.Popen(cmd[:1] + [f"--listen=unix:{d}/relay.sock", f"--connect=unix:{d}/echo.sock",
                                        f"--control={d}/ctl.sock", "--log-level=warn"] + cmd[1:])
    while not os.path.exists(f"{d}/ctl.sock"):
        time.sleep(0.01)
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{d}/relay.sock")
    msg, rtts = b"x" * 64, []
    end = time.monotonic() + secs
    while time.monotonic() < end:
        t = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < 64:
            got += len(s.recv(64 - got))
        rtts.append((time.perf_counter_ns() - t) / 1000)
    out = subprocess.run([cmd[0], "stats", "--json", f"{d}/ctl.sock"], capture_output=True, text=True).stdout
    suspensions = json.loads(out)["totals"].get("poll_window_suspensions", "-")
    s.close()
    relay.terminate()
    relay.wait()
    ls.close()
    rtts.sort()
    n = len(rtts)
    return n, rtts[n // 2], rtts[n * 9 // 10], rtts[n * 99 // 100], sum(r >= 2000 for r in rtts), suspensions


hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(os.cpu_count())]
try:
    print(f"{len(hogs)} busy processes; {secs} s sessions; 64 B ping-pong UNIX -> relay -> UNIX echo")
    print("| round | contender | round trips | p50 µs | p90 µs | p99 µs | ≥ 2 ms | suspensions |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|")
    for r in range(rounds):
        for name, cmd in contenders:
            n, p50, p90, p99, slow, susp = session(cmd)
            print(f"| {r + 1} | {name} | {n} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {slow} | {susp} |", flush=True)
finally:
    for h in hogs:
        h.kill()
