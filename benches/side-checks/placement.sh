#!/bin/bash
# Where 64-byte round-trip time goes on this machine: the same ping-pong with every process
# pinned (taskset) to chosen vCPUs. Direct client <-> echo server, then UNIX -> TCP through
# kvmi-relay, socat (as KVMIveggur ran it) and the harness's copy loop, all on one vCPU, then
# the relay and socat with one party on the other vCPU. docs/BENCHMARKS.md, "Why latency is bimodal".
#
# Usage: benches/side-checks/placement.sh [ROUND_TRIPS]   (after `make build` and `make bench`
# has built the harness; needs socat and 2 CPUs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RELAY=$ROOT/target/dist/kvmi-relay
TOOLS=$ROOT/target/dist/kvmi-relay-tools
HARNESS=$ROOT/target/bench-harness/release/kvmi-relay-bench
N=${1:-5000}
for b in "$RELAY" "$TOOLS" "$HARNESS"; do
    [ -x "$b" ] || { echo "placement.sh: $b is missing (make build; make bench-quick)" >&2; exit 2; }
done
command -v socat >/dev/null || { echo "placement.sh: socat is missing (make deps)" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "placement.sh: needs 2 CPUs, this machine has $(nproc)" >&2; exit 2; }

DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
PORT=$((47100 + $$ % 500))

wait_path() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.02; done; echo "no socket at $1" >&2; exit 1; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.02; done; echo "nothing listens on $1" >&2; exit 1; }

# pingpong LABEL CLIENT_CPU ENDPOINT: one client run, its percentiles line labelled.
pingpong() { echo "$1: $(taskset -c "$2" "$TOOLS" peer pingpong --connect "$3" --count "$N")"; }

# direct ECHO_CPU CLIENT_CPU
direct() {
    local s=$DIR/echo-$1$2.sock
    taskset -c "$1" "$TOOLS" peer echo --listen "unix:$s" --count 1 & PIDS+=($!)
    wait_path "$s"
    pingpong "direct          echo@cpu$1 client@cpu$2" "$2" "unix:$s"
    wait "${PIDS[-1]}"
}

# hop NAME ECHO_CPU HOP_CPU CLIENT_CPU: UNIX -> TCP through one hop, then stop it.
hop() {
    local name=$1 e=$2 h=$3 c=$4 s=$DIR/hop.sock hp ep
    PORT=$((PORT + 1))
    rm -f "$s"
    # Serves until killed: wait_port's probe is a connection too.
    taskset -c "$e" "$TOOLS" peer echo --listen "tcp:127.0.0.1:$PORT" --count 0 & ep=$!; PIDS+=($ep)
    wait_port "$PORT"
    case $name in
        kvmi-relay) taskset -c "$h" "$RELAY" --listen "unix:$s" --connect "tcp:127.0.0.1:$PORT" --allow-uid "$(id -u)" --log-level warn & ;;
        socat) taskset -c "$h" socat "UNIX-LISTEN:$s,fork" "TCP:127.0.0.1:$PORT" & ;;
        copy-loop) taskset -c "$h" "$HARNESS" copy-loop "unix:$s" "tcp:127.0.0.1:$PORT" & ;;
    esac
    hp=$!; PIDS+=($hp)
    wait_path "$s"
    pingpong "$(printf '%-15s' "$name") echo@cpu$e hop@cpu$h client@cpu$c" "$c" "unix:$s"
    kill "$hp" "$ep" 2>/dev/null || true
    wait "$hp" "$ep" 2>/dev/null || true
}

echo "# $N round trips of 64 B each; kernel $(uname -r); $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
for _round in 1 2; do
    direct 0 0
    direct 0 1
    for name in kvmi-relay socat copy-loop; do hop "$name" 0 0 0; done
    for name in kvmi-relay socat; do
        hop "$name" 0 1 0
        hop "$name" 0 0 1
        hop "$name" 1 0 0
    done
done
