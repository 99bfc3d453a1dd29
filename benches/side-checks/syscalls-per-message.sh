#!/bin/sh
# System calls and context switches the relay makes per message, counted by the kernel's
# tracepoints (perf stat -p: no ptrace, so the timing that decides how often a poll window spins
# stays as it is). One relay, UNIX → TCP, the project's fake KVMi peers: a passive burst
# (READ_PHYSICAL, 24 B → 4112 B) and an active burst (PAUSE_VCPU, 552 B → 24 B), each timed by
# perf from the relay's side. Each relay binary given runs both, in the order given.
#
#   benches/side-checks/syscalls-per-message.sh [NAME=BINARY[,FLAG...]]...
#   (default: target/dist/kvmi-relay and the same with --poll-window-us=0; NAME without "=")
#
# Needs perf with tracepoints (linux-perf), root or perf_event_paranoid <= 1, and
# target/dist/kvmi-relay-tools (make build). Prints one markdown row per relay and burst.
set -eu
cd "$(dirname "$0")/../.."
TOOLS=target/dist/kvmi-relay-tools
OPS=${OPS:-20000}
[ $# -gt 0 ] || set -- "default=target/dist/kvmi-relay" "nopoll=target/dist/kvmi-relay,--poll-window-us=0"
dir=$(mktemp -d)
# Every child is killed on the way out, however the script ends: one left behind (a peer waiting
# for a connection) would keep whatever it inherited open, a lock file included.
intro= relay= perfpid=
trap 'kill $intro $relay $perfpid 2>/dev/null || true; rm -rf "$dir"' EXIT
events=raw_syscalls:sys_enter,context-switches,cpu-migrations
for s in epoll_wait epoll_pwait sched_yield read write recvfrom sendto splice; do
    events="$events,syscalls:sys_enter_$s"
done
echo "| relay | burst | ops | syscalls/op | ctx switches/op | epoll_wait/op | sched_yield/op | recv/op | send/op | read+write/op | splice/op | CPU µs/op |"
echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
port=$((20000 + $$ % 20000))
for spec in "$@"; do
    name=${spec%%=*}
    rest=${spec#*=}
    bin=${rest%%,*}
    flags=$(echo "$rest" | cut -s -d, -f2- | tr ',' ' ')
    for burst in passive active; do
        port=$((port + 1))
        if [ $burst = passive ]; then reads=$OPS; evs=0; else reads=0; evs=$OPS; fi
        $TOOLS fake-introspector --listen "tcp:127.0.0.1:$port" --reads $reads --events $evs >"$dir/intro.log" 2>&1 &
        intro=$!
        # shellcheck disable=SC2086
        "$bin" --listen "unix:$dir/relay.sock" --connect "tcp:127.0.0.1:$port" --log-level=warn $flags 2>"$dir/relay.log" &
        relay=$!
        while [ ! -S "$dir/relay.sock" ]; do
            kill -0 $relay 2>/dev/null || { cat "$dir/relay.log"; exit 1; }
            sleep 0.05
        done
        perf stat -x, -e "$events" -p $relay -o "$dir/perf.csv" &
        perfpid=$!
        sleep 0.3
        t0=$(cut -d' ' -f1 /proc/$relay/schedstat)
        $TOOLS fake-hypervisor --connect "unix:$dir/relay.sock" >"$dir/hv.log" 2>&1
        t1=$(cut -d' ' -f1 /proc/$relay/schedstat)
        kill -INT $perfpid
        wait $perfpid 2>/dev/null || true
        wait $intro || { cat "$dir/intro.log"; intro=; exit 1; }
        intro= perfpid=
        kill $relay
        wait $relay 2>/dev/null || true
        relay=
        rm -f "$dir/relay.sock"
        awk -F, -v name="$name" -v burst=$burst -v ops=$OPS -v ns=$((t1 - t0)) '
            /^[0-9]/ { c[$3] = $1 }
            END {
                p = "syscalls:sys_enter_"
                printf "| %s | %s | %d | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f |\n", name, burst, ops,
                    c["raw_syscalls:sys_enter"] / ops, c["context-switches"] / ops,
                    (c[p "epoll_wait"] + c[p "epoll_pwait"]) / ops, c[p "sched_yield"] / ops,
                    c[p "recvfrom"] / ops, c[p "sendto"] / ops, (c[p "read"] + c[p "write"]) / ops,
                    c[p "splice"] / ops, ns / 1e3 / ops
            }' "$dir/perf.csv"
    done
done
