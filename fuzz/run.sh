#!/usr/bin/env bash
# fuzz/run.sh - `make fuzz`: builds every fuzz target (cargo-fuzz, libFuzzer without a
# sanitizer, on the stable toolchain) and runs each for a bounded time, starting from the seeds
# in fuzz/corpus/<target>/ (read only) and what earlier runs found (target/fuzz/corpus/<target>/).
# One line per target (runs, execs/s, coverage), then exactly one summary line; the first crash,
# failed assertion, timeout or memory blow-up stops the run with its input saved and the command
# that replays it.
#
#   fuzz/run.sh [TARGET...]      (all targets when none is named)
#   FUZZ_SECONDS=20              time per target
#   CARGO_FUZZ_VERSION=0.13.2    installed from crates.io (--locked) when cargo-fuzz is missing
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
CARGO=${CARGO:-cargo}
SECONDS_EACH=${FUZZ_SECONDS:-20}
VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
OUT=target/fuzz
BIN=$OUT/x86_64-unknown-linux-gnu/release
t0=$SECONDS

if ! "$CARGO" fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $VERSION"; then
    echo "fuzz: installing cargo-fuzz $VERSION"
    "$CARGO" install --locked --version "$VERSION" cargo-fuzz || { echo "fuzz: FAILED: cannot install cargo-fuzz"; exit 1; }
fi
# cargo fuzz build has no --locked: check the fuzz crate's lock file first.
"$CARGO" metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null ||
    { echo "fuzz: FAILED: fuzz/Cargo.lock is out of date"; exit 1; }

mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | tail -n +2)
targets=("${@:-${all[@]}}")

# -O with -a: optimised, with overflow checks and debug assertions on (they find bugs too).
"$CARGO" fuzz build --sanitizer none -O -a --target-dir "$OUT" || { echo "fuzz: FAILED: build"; exit 1; }

summary=()
for t in "${targets[@]}"; do
    mkdir -p "$OUT/corpus/$t" "$OUT/artifacts/$t" "fuzz/corpus/$t"
    log=$OUT/$t.log
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
    "$BIN/$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$OUT/artifacts/$t/" "${dict[@]}" "$OUT/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    if [ "$rc" != 0 ]; then
        grep -E -A8 "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | head -30
        input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        echo "fuzz: FAILED: $t (exit $rc); input ${input:-not saved}; whole log $log; replay: $BIN/$t ${input:-}"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 | sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 \2 \3/p')
    read -r edges features units <<<"$cov"
    echo "fuzz $t: ok, ${runs:-?} runs in ${SECONDS_EACH} s (${rate:-?} exec/s), coverage ${edges:-?} edges, ${features:-?} features, corpus ${units:-?} inputs"
    summary+=("$t ${rate:-?}/s cov ${edges:-?}")
done
echo "fuzz: ok in $((SECONDS - t0)) s: ${#targets[@]} targets, ${SECONDS_EACH} s each, no crash ($(IFS='|'; echo "${summary[*]}" | sed 's/|/, /g'))"
