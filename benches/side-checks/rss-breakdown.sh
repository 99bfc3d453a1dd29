#!/bin/bash
# Where a relay's resident memory is, mapping by mapping (/proc/PID/smaps): idle, then halfway
# through one bulk session UNIX -> TCP (4 GiB one way, copies into TCP grow to 256 KiB), then
# idle again after it closed. docs/BENCHMARKS.md, "What the figures mean" (memory).
#
# Usage: benches/side-checks/rss-breakdown.sh [RELAY_BINARY]   (default target/dist/kvmi-relay;
# after `make build`). Extra relay flags go in RELAY_FLAGS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RELAY=${1:-$ROOT/target/dist/kvmi-relay}
TOOLS=$ROOT/target/dist/kvmi-relay-tools
BYTES=$((4 << 30))
for b in "$RELAY" "$TOOLS"; do
    [ -x "$b" ] || { echo "rss-breakdown.sh: $b is missing (make build)" >&2; exit 2; }
done

DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
PORT=$((47600 + $$ % 300))

# show LABEL: RSS by mapping (KiB, mappings with any resident page), then the totals.
show() {
    echo "== $1"
    awk '/^[0-9a-f]+-[0-9a-f]+ /{name=($6 == "" ? "[anon]" : $6)} /^Rss:/{if ($2 > 0) rss[name] += $2}
         END {for (n in rss) printf "  %6d KiB  %s\n", rss[n], n}' "/proc/$RP/smaps" | sort -rn
    grep -E '^(Rss|Anonymous|Private_Dirty|Shared_Clean):' "/proc/$RP/smaps_rollup" | awk '{printf "  %s %s KiB", $1, $2} END {print ""}'
    grep VmHWM "/proc/$RP/status" | sed 's/^/  /'
}

"$TOOLS" peer bulk --listen "tcp:127.0.0.1:$PORT" --send-bytes 0 --expect-bytes $BYTES --expect-seed 1 >"$DIR/sink.out" &
PIDS+=($!)
sleep 0.2
# shellcheck disable=SC2086  # RELAY_FLAGS is a list of flags
"$RELAY" --listen "unix:$DIR/r.sock" --connect "tcp:127.0.0.1:$PORT" --allow-uid "$(id -u)" --log-level warn ${RELAY_FLAGS:-} &
RP=$!; PIDS+=($RP)
for _ in $(seq 100); do [ -S "$DIR/r.sock" ] && break; sleep 0.02; done
[ -S "$DIR/r.sock" ] || { echo "rss-breakdown.sh: the relay did not listen" >&2; exit 1; }
echo "# $RELAY; kernel $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
show "idle, after start-up"
echo 5 >"/proc/$RP/clear_refs"   # VmHWM from here on is this session's peak
"$TOOLS" peer bulk --connect "unix:$DIR/r.sock" --send-bytes $BYTES --expect-bytes 0 --max-write 262144 >"$DIR/src.out" &
SRC=$!; PIDS+=($SRC)
sleep 0.5
show "one bulk session UNIX -> TCP, halfway"
wait "$SRC"
sleep 0.2
show "idle again, the session closed"
