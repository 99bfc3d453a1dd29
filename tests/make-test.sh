#!/usr/bin/env bash
# tests/make-test.sh - runs the given make targets in order (what `make test` runs) and ends with
# exactly one line: what ran, how many checks passed and failed, how long it took.
#
#   tests/make-test.sh NAME TARGET... (NAME heads the last line: `make test`)
#
# Each target's output goes to the terminal as it happens and to target/test-logs/<target>.log,
# which is where the counts come from: cargo's "test result:" lines (the relay's tests and the
# bench harness's), the test guests' "== guest <suite>: ..." summaries, and one check each for
# the targets that report no count of their own (fmt, clippy, bench-quick, fuzz: one check per
# target). The first target
# that fails stops the run, as make would; the last line then names it and its log.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOGS=$ROOT/target/test-logs
MAKE=${MAKE:-make}
name=$1
shift
mkdir -p "$LOGS"

passed=0 failed=0 notrun=0 xfail=0 ignored=0
ran=() failed_at=""
t0=$SECONDS

# count TARGET LOG: adds what LOG reports to the totals; sets PART, this target's part of the
# last line ("" when the target reports no count of its own).
count() {
    local target=$1 log=$2 p f i parts=()
    read -r p f i < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log" |
        awk '{p += $1; f += $2; i += $3} END {print p + 0, f + 0, i + 0}')
    if [ "$((p + f))" -gt 0 ]; then
        passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + i))
        parts+=("$p/$((p + f)) tests$([ "$f" = 0 ] || echo " ($f failed)")$([ "$i" = 0 ] || echo ", $i ignored")")
    fi
    # bench-quick's own line: its runs are one check
    local b
    b=$(sed -n 's/^bench-quick: ok in [0-9]* s: \([0-9]* rows, [0-9]* sessions\).*/\1/p' "$log")
    if [ -n "$b" ]; then
        passed=$((passed + 1))
        parts+=("quick bench ok ($b)")
    fi
    # fuzz's own line: each target's bounded run is one check
    local z
    z=$(sed -n 's/^fuzz: ok in [0-9]* s: \([0-9]*\) targets, \([0-9]*\) s each.*/\1 \2/p' "$log")
    if [ -n "$z" ]; then
        read -r zn zs <<<"$z"
        passed=$((passed + zn))
        parts+=("$zn fuzz targets, ${zs} s each, no crash")
    fi
    local suite gp gf gx gn gm
    while read -r suite gp gf gx gn gm; do
        [ -n "$suite" ] || continue
        passed=$((passed + gp)) failed=$((failed + gf + gm)) xfail=$((xfail + gx)) notrun=$((notrun + gn))
        local g="$suite $gp/$((gp + gf + gx + gn + gm)) cases"
        [ "$gf" = 0 ] || g="$g, $gf failed"
        [ "$gm" = 0 ] || g="$g, $gm missing"
        [ "$gx" = 0 ] || g="$g, $gx known failures"
        [ "$gn" = 0 ] || g="$g, $gn not run"
        parts+=("$g")
    done < <(sed -n 's/^== guest \([a-z]*\): .* reported: \([0-9]*\) passed, \([0-9]*\) failed, \([0-9]*\) known failures, \([0-9]*\) not run, \([0-9]*\) missing.*/\1 \2 \3 \4 \5 \6/p' "$log")
    PART=$(IFS='|'; echo "${parts[*]}" | sed 's/|/, /g')
}

for target in "$@"; do
    log=$LOGS/$target.log
    "$MAKE" --no-print-directory "$target" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    count "$target" "$log"
    part=$target
    if [ "$rc" != 0 ]; then
        # a target that failed without a count of its own (fmt, clippy, a build) is one failure
        [ -n "$PART" ] || failed=$((failed + 1))
        ran+=("$target FAILED${PART:+ ($PART)}")
        failed_at=$target
        break
    fi
    if [ -z "$PART" ]; then
        # deps installs, it checks nothing
        [ "$target" = deps ] || passed=$((passed + 1))
        part="$target ok"
    else
        part="$target: $PART"
    fi
    if grep -q '^bench-quick: .*SKIP' "$log"; then part="$part, with a SKIP (see $log)"; fi
    ran+=("$part")
done

elapsed=$((SECONDS - t0))
took="$((elapsed / 60))m$(printf '%02d' $((elapsed % 60)))s"
extra=""
[ "$xfail" = 0 ] || extra="$extra, $xfail known failures"
[ "$notrun" = 0 ] || extra="$extra, $notrun not run"
[ "$ignored" = 0 ] || extra="$extra, $ignored ignored"
summary=$(IFS='|'; echo "${ran[*]}" | sed 's/|/; /g')
if [ -z "$failed_at" ]; then
    echo "$name: ok in $took, $passed passed, $failed failed$extra: $summary"
else
    echo "$name: FAILED at $failed_at after $took (log: target/test-logs/$failed_at.log), $passed passed, $failed failed$extra: $summary"
    exit 1
fi
