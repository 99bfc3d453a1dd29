#!/usr/bin/env bash
# tests/guest/guest.sh - the project's test guests: real AF_VSOCK (CID 1 loopback) and a real
# systemd PID 1, under QEMU with software emulation (-accel tcg; KVM hangs on these machines).
# Nothing here touches the host's own /dev/vsock: every vsock socket lives inside the guest.
#
#   tests/guest/guest.sh vsock   [case ...]   busybox initramfs guest, vsock cases (vsock-cases.sh)
#   tests/guest/guest.sh systemd [case ...]   debootstrap+systemd guest, unit cases (systemd-cases.sh)
#   tests/guest/guest.sh all                  both
#   tests/guest/guest.sh fetch                kernel + static relay + systemd root only (no boot)
#
# The guest reports on its serial console: "CASE <name> PASS|FAIL|NOTRUN [detail]",
# "FIGURE <name> <value>", and finally "GUEST_RC=<n>". This script fails when QEMU cannot start
# or times out, when the guest's rc marker is missing or non-zero, when any case FAILs, and when
# any expected case did not report (no silent skips). NOTRUN is printed as not run, never as pass.
#
# Everything fetched or built is cached under target/guest-cache (kernel package, root file
# system, image) and target/guest (the static relay build).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/tests/guest
CACHE=${GUEST_CACHE:-$ROOT/target/guest-cache}
QEMU_TIMEOUT_S=${QEMU_TIMEOUT_S:-600}
SMP=${GUEST_SMP:-2}
CARGO=${CARGO:-cargo}
mkdir -p "$CACHE"

say() { echo "guest-test: $*"; }
die() {
    echo "guest-test: FAILED: $*" >&2
    exit 1
}

# --- fetch: kernel, static relay -----------------------------------------------------------

# Debian's own kernel package (the version linux-image-amd64 points at), unpacked once.
kernel() {
    local k
    k=$(cd "$CACHE" && ls -d kpkg/lib/modules/*/ 2>/dev/null | head -1 | xargs -r basename)
    if [ -z "$k" ] || [ ! -f "$CACHE/kpkg/boot/vmlinuz-$k" ]; then
        k=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1)
        if [ -z "$k" ]; then
            apt-get update -qq
            k=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1)
        fi
        [ -n "$k" ] || die "apt knows no linux-image-amd64 package"
        say "fetching kernel package linux-image-$k (apt-get download)"
        rm -rf "$CACHE/kpkg" "$CACHE"/linux-image-*.deb
        (cd "$CACHE" && { apt-get download -qq "linux-image-$k" 2>/dev/null ||
            { apt-get update -qq && apt-get download -qq "linux-image-$k"; }; }) ||
            die "apt-get download linux-image-$k failed"
        dpkg-deb -x "$CACHE"/linux-image-"$k"_*.deb "$CACHE/kpkg"
        rm -f "$CACHE"/linux-image-*.deb
    fi
    KVER=$k
    VMLINUZ=$CACHE/kpkg/boot/vmlinuz-$k
    KMOD=$CACHE/kpkg/lib/modules/$k/kernel
}

# The relay and its tools (the test peers), statically linked (glibc, crt-static) so they run
# in a bare initramfs; their own target dir so the shared target/release is not rebuilt with
# other flags.
relay_static() {
    say "building the static relay and tools (target/guest)"
    RUSTFLAGS="-C target-feature=+crt-static" $CARGO build --release --locked --quiet --workspace \
        --target x86_64-unknown-linux-gnu --target-dir "$ROOT/target/guest"
    local name bin
    for name in kvmi-relay kvmi-relay-tools; do
        bin=$ROOT/target/guest/x86_64-unknown-linux-gnu/release/$name
        if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
            die "$bin is dynamically linked; the initramfs has no libc"
        fi
        strip -o "$CACHE/$name.static" "$bin"
    done
    RELAY=$CACHE/kvmi-relay.static
    TOOLS=$CACHE/kvmi-relay-tools.static
}

need() {
    local missing=""
    for c in "$@"; do command -v "$c" >/dev/null || missing="$missing $c"; done
    [ -z "$missing" ] || die "missing host tools:$missing (run: make deps)"
}

# --- boot and judge --------------------------------------------------------------------------

# The console as text, a line as soon as it is complete: carriage returns and terminal control
# sequences dropped (SeaBIOS and the guest send ESC c, ESC[2J and the like, which would reset or
# clear the terminal of whoever runs the suite). Every stage is unbuffered (`sed -u`): a
# buffering stage (tr, writing into a pipe) held the systemd guest's few lines back until its
# buffer filled or the guest ended, so they arrived in one burst.
console_text() {
    LC_ALL=C sed -u -e 's#\r##g' \
        -e 's#\x1b\[[0-?]*[ -/]*[@-~]##g' \
        -e 's#\x1b\][^\x07\x1b]*\(\x07\|\x1b\\\)##g' \
        -e 's#\x1b[ -/]*[0-~]##g' \
        -e 's#[\x01-\x08\x0b-\x1f\x7f]##g'
}

# boot SUITE LOG INITRD APPEND [qemu args...]: runs the guest with a hard timeout, the console
# (as text: console_text) both streamed (prefixed) and kept in LOG. Sets QEMU_RC.
boot() {
    local suite=$1 log=$2 initrd=$3 append=$4
    shift 4
    local qerr=$log.qemu-stderr
    say "booting the $suite guest (qemu -accel tcg, -smp $SMP, timeout ${QEMU_TIMEOUT_S}s)"
    set +e
    timeout --kill-after=10 "$QEMU_TIMEOUT_S" qemu-system-x86_64 -accel tcg -cpu max -smp "$SMP" -m "${GUEST_MEM:-1024}" \
        -M pc -nographic -nodefaults -serial stdio -display none -no-reboot \
        -kernel "$VMLINUZ" -initrd "$initrd" -append "$append" "$@" 2>"$qerr" </dev/null |
        console_text | tee "$log" | sed -u "s/^/  $suite| /"
    QEMU_RC=${PIPESTATUS[0]}
    set -e
}

# judge SUITE LOG EXPECTED...: prints which cases ran in the guest and their results; returns
# non-zero on any failure, missing case or missing rc marker.
judge() {
    local suite=$1 log=$2
    shift 2
    local res=$CACHE/results-$suite.txt fail=0 pass=0 notrun=0 missing=0 xfail=0 rc
    rc=$(sed -n 's/.*GUEST_RC=\([0-9]*\).*/\1/p' "$log" | tail -1)
    {
        echo "== guest $suite: results (console: $log)"
        for c in "$@"; do
            local line
            line=$(grep -o "CASE $c \(PASS\|FAIL\|NOTRUN\).*" "$log" | tail -1 || true)
            if [ -z "$line" ]; then
                echo "  MISSING $c   (the guest never reported this case)"
                missing=$((missing + 1))
                continue
            fi
            local verdict=${line#CASE $c }
            verdict=${verdict%% *}
            local detail=${line#CASE $c $verdict}
            local known
            known=$(sed -n "s/^$c //p" "$HERE/known-failures.txt")
            if [ -n "$known" ] && [ "$verdict" = FAIL ]; then
                verdict=XFAIL
                detail="$detail  [known bug: $known]"
            elif [ -n "$known" ] && [ "$verdict" = PASS ]; then
                detail="$detail  [XPASS: listed in known-failures.txt but passed; remove it there]"
            fi
            printf '  %-7s %-34s%s\n' "$verdict" "$c" "$detail"
            case $verdict in
            PASS) pass=$((pass + 1)) ;;
            FAIL) fail=$((fail + 1)) ;;
            NOTRUN) notrun=$((notrun + 1)) ;;
            XFAIL) xfail=$((xfail + 1)) ;;
            esac
        done
        grep -o 'FIGURE [^ ]* [^ ]*' "$log" | sed 's/^/  /' || true
        echo "== guest $suite: $# expected, $((pass + fail + notrun + xfail)) reported: $pass passed, $fail failed," \
            "$xfail known failures, $notrun not run, $missing missing; guest rc=${rc:-none}; qemu rc=$QEMU_RC"
    } >"$res"
    cat "$res"
    if [ -z "$rc" ]; then
        if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
            say "$suite: QEMU hit the ${QEMU_TIMEOUT_S}s timeout before the guest finished"
        elif ! grep -q . "$log"; then
            say "$suite: QEMU did not start (rc $QEMU_RC): $(tail -5 "$log.qemu-stderr" | tr '\n' ' ')"
        else
            say "$suite: the guest stopped without its rc marker (crash/panic?); console tail:"
            tail -15 "$log" | sed 's/^/    /'
        fi
        return 1
    fi
    # the guest's rc counts known failures too; the verdicts above are what is judged
    [ "$fail" = 0 ] && [ "$missing" = 0 ] || return 1
    if [ "$rc" != 0 ] && [ "$xfail" = 0 ]; then
        say "$suite: guest rc=$rc with no failed case: the case script itself went wrong"
        return 1
    fi
    if [ "$notrun" != 0 ] && [ -n "${GUEST_STRICT:-}" ]; then
        say "$suite: GUEST_STRICT is set and $notrun case(s) did not run"
        return 1
    fi
}

expected_cases() { grep -v '^#' "$HERE/$1" | grep .; }

# --- the busybox vsock guest -------------------------------------------------------------------

vsock() {
    need qemu-system-x86_64 busybox cpio gzip readelf strip
    kernel
    relay_static
    local ird=$CACHE/ird-vsock
    rm -rf "$ird" && mkdir -p "$ird"/{bin,proc,sys,dev,tmp,lib/modules}
    cp "$(command -v busybox)" "$ird/bin/busybox"
    cp "$RELAY" "$ird/bin/kvmi-relay"
    cp "$TOOLS" "$ird/bin/kvmi-relay-tools"
    cp "$HERE/vsock-cases.sh" "$ird/bin/vsock-cases.sh"
    local m
    for m in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
        cp "$KMOD/net/vmw_vsock/$m.ko" "$ird/lib/modules/"
    done
    cat >"$ird/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
ip link set lo up 2>/dev/null
for m in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
  insmod /lib/modules/$m.ko || { echo "guest: insmod $m failed"; echo GUEST_RC=97; echo o >/proc/sysrq-trigger; sleep 10; }
done
cases=$(sed -n 's/.*kvmi_cases=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
timeout 900 sh /bin/vsock-cases.sh $cases
echo "GUEST_RC=$?"
echo o > /proc/sysrq-trigger; sleep 10
EOF
    chmod +x "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$CACHE/initrd-vsock.gz"

    local want=("$@")
    [ ${#want[@]} -gt 0 ] || mapfile -t want < <(expected_cases vsock-cases.txt)
    local cmdline="console=ttyS0 quiet panic=-1"
    [ $# = 0 ] || cmdline="$cmdline kvmi_cases=$(
        IFS=,
        echo "$*"
    )"
    local t0=$SECONDS
    GUEST_MEM=${GUEST_MEM:-512} boot vsock "$CACHE/console-vsock.log" "$CACHE/initrd-vsock.gz" "$cmdline"
    say "vsock guest ran for $((SECONDS - t0))s"
    judge vsock "$CACHE/console-vsock.log" "${want[@]}"
}

# --- the systemd guest -------------------------------------------------------------------------

# shellcheck source=tests/guest/systemd-image.sh
. "$HERE/systemd-image.sh"

main() {
    # one guest run at a time per checkout: the cache and its consoles are shared
    exec 9>"$CACHE/.lock"
    flock -w 1200 9 || die "another guest run holds $CACHE/.lock"
    local what=${1:-all}
    [ $# = 0 ] || shift
    local t0=$SECONDS rc=0
    case $what in
    vsock) vsock "$@" || rc=1 ;;
    systemd) systemd "$@" || rc=1 ;;
    all)
        vsock || rc=1
        systemd || rc=1
        ;;
    fetch)
        kernel
        relay_static
        systemd_root
        ;;
    *) die "usage: $0 vsock|systemd|all|fetch [case ...]" ;;
    esac
    say "$what: $((SECONDS - t0))s in all; $([ $rc = 0 ] && echo ok || echo FAILED)"
    return $rc
}

main "$@"
