#!/bin/sh
# vsock cases, run INSIDE the busybox test guest (never on the host): AF_VSOCK on CID 1
# (vsock_loopback) against the real, statically linked relay.
#
# Output contract, read by tests/guest/guest.sh on the serial console:
#   CASE <name> PASS|FAIL [detail]     one line per case in vsock-cases.txt
#   FIGURE <name> <value>              measurements (emulated CPU: recorded, never gated)
#   GUEST_RC=<n>                       written by the init script after this one returns
#
# Usage: vsock-cases.sh [case ...]   (no argument: every case)
# Each case starts its own relays on its own ports and stops them with SIGTERM; the relay's
# stderr goes to /tmp/<case>.relay*.log and is shown on the console when the case fails.

R=/bin/kvmi-relay
T=/bin/kvmi-relay-tools   # the test peers and fake KVMi peers
BULK_BYTES=${BULK_BYTES:-33554432}   # 32 MiB each way: long enough to cross many pipe refills under TCG
PINGPONG_COUNT=${PINGPONG_COUNT:-2000}
STEP_TIMEOUT_S=120
FAILED=0
PIDS=""

log() { echo "guest: $*"; }

# --- process helpers -------------------------------------------------------------------------

# relay LOG ARGS...: starts a relay in the background, its pid in $RELAY_PID.
relay() {
    _log=$1; shift
    $R --log-level info "$@" 2>"$_log" &
    RELAY_PID=$!
    RELAY_LOG=$_log
    PIDS="$PIDS $RELAY_PID"
}

# stop PID: SIGTERM and the exit status (the relay must exit 0 on SIGTERM).
stop() {
    kill -TERM "$1" 2>/dev/null
    wait "$1"
}

# bg OUT CMD...: a peer in the background (output to OUT), pid in $BG_PID.
bg() {
    _out=$1; shift
    timeout $STEP_TIMEOUT_S "$@" >"$_out" 2>&1 &
    BG_PID=$!
    PIDS="$PIDS $BG_PID"
}

# wait_file PATH: until a UNIX socket exists (listener bound), 10 s at most.
wait_file() {
    for _i in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    return 1
}

# settle: until the relay just started has logged "listening" (it has bound and listens), 10 s
# at most. A vsock listener cannot be probed without making a session, so the log is the signal.
settle() {
    for _i in $(seq 200); do grep -q ' listening ' "$RELAY_LOG" 2>/dev/null && return 0; sleep 0.05; done
    bad "relay never logged 'listening'"
}

reap() {
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null; done
    for p in $PIDS; do wait "$p" 2>/dev/null; done
    PIDS=""
}

# --- log helpers -----------------------------------------------------------------------------

# closed_line LOG [N]: the N-th (default last) "closed end=" line of a relay log.
closed_line() {
    if [ -n "$2" ]; then grep 'closed end=' "$1" | sed -n "${2}p"; else grep 'closed end=' "$1" | tail -1; fi
}

# field LINE NAME: value of NAME=value in a log line.
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | tr -d '"' | head -1; }

# --- result helpers --------------------------------------------------------------------------

CASE_NAME=""
CASE_WHY=""
begin() { CASE_NAME=$1; CASE_WHY=""; log "--- $1"; }
# check COND_TEXT: records a failed expectation (case continues, so the detail lists all).
bad() { CASE_WHY="${CASE_WHY:+$CASE_WHY; }$*"; }
end() {
    # $@: files to dump on failure
    if [ -z "$CASE_WHY" ]; then
        echo "CASE $CASE_NAME PASS ${DETAIL:-}"
    else
        echo "CASE $CASE_NAME FAIL $CASE_WHY"
        FAILED=$((FAILED + 1))
        for f in "$@"; do [ -f "$f" ] && { echo "guest: ==> $f"; tail -20 "$f" | sed 's/^/guest:   /'; }; done
    fi
    DETAIL=""
    reap
}

# expect_ok OUT WHAT: a peer's output file must say "<what> ok".
expect_ok() { grep -q "^$2 ok" "$1" || bad "$2 peer: $(head -1 "$1" 2>/dev/null)"; }

# expect_closed LINE END L2C C2L: a close line with this end and these byte counts.
expect_closed() {
    [ -n "$1" ] || { bad "no 'closed' line in the relay log"; return; }
    [ "$(field "$1" end)" = "$2" ] || bad "end=$(field "$1" end) (want $2)"
    [ "$(field "$1" l2c_bytes)" = "$3" ] || bad "l2c_bytes=$(field "$1" l2c_bytes) (want $3)"
    [ "$(field "$1" c2l_bytes)" = "$4" ] || bad "c2l_bytes=$(field "$1" c2l_bytes) (want $4)"
}

# expect_strategy LINE splice|copy|copy-then-splice: every byte moved by that strategy, both
# ways; copy-then-splice (--move auto into UNIX and vsock): bulk copied until the first read fills
# the 16 KiB message buffer, spliced from then on (at most 1 MiB copied, the rest spliced).
expect_strategy() {
    _l=$1
    for d in l2c c2l; do
        _s=$(field "$_l" ${d}_splice_bytes)
        _c=$(field "$_l" ${d}_copy_bytes)
        _b=$(field "$_l" ${d}_bytes)
        case $2 in
        splice) [ "$_s" = "$_b" ] && [ "$_s" -gt 0 ] && [ "$_c" = 0 ] || bad "$d: splice=$_s copy=$_c bytes=$_b (want all spliced)" ;;
        copy) [ "$_c" = "$_b" ] && [ "$_c" -gt 0 ] && [ "$_s" = 0 ] || bad "$d: splice=$_s copy=$_c bytes=$_b (want all copied)" ;;
        copy-then-splice) [ $((_s + _c)) = "$_b" ] && [ "$_c" -gt 0 ] && [ "$_c" -le 1048576 ] && [ "$_s" -gt 0 ] ||
            bad "$d: splice=$_s copy=$_c bytes=$_b (want the first buffer copied, the rest spliced)" ;;
        esac
    done
    DETAIL="l2c_splice=$(field "$_l" l2c_splice_bytes) l2c_copy=$(field "$_l" l2c_copy_bytes) c2l_splice=$(field "$_l" c2l_splice_bytes) c2l_copy=$(field "$_l" c2l_copy_bytes)"
}

# bulk_through LISTEN_EP CONNECT_EP UP DOWN: far peer listens on CONNECT_EP, near peer dials
# LISTEN_EP; UP bytes go near→far (l2c), DOWN bytes far→near (c2l). Results in near.out/far.out.
bulk_through() {
    rm -f /tmp/far.out
    # a socket file left by the previous far peer would make wait_file return before this one binds
    case $2 in unix:*) rm -f "${2#unix:}" ;; esac
    bg /tmp/far.out $T peer bulk --listen "$2" --send-bytes "$4" --expect-bytes "$3"
    _far=$BG_PID
    # the relay dials once per session: the far side must listen before the near side dials
    case $2 in unix:*) wait_file "${2#unix:}" || bad "far peer did not bind $2" ;; *) sleep 0.5 ;; esac
    timeout $STEP_TIMEOUT_S $T peer bulk --connect "$1" --send-bytes "$3" --expect-bytes "$4" >/tmp/near.out 2>&1
    wait $_far
    expect_ok /tmp/near.out bulk
    expect_ok /tmp/far.out bulk
}

# --- the cases -------------------------------------------------------------------------------

case_start_refused_without_allow_cid() {
    begin start-refused-without-allow-cid
    timeout 20 $R --listen vsock:1:5100 --connect unix:/tmp/none.sock >/tmp/noacl.out 2>&1
    rc=$?
    [ $rc = 2 ] || bad "exit $rc (want 2)"
    grep -q -- '--allow-cid' /tmp/noacl.out || bad "message does not name --allow-cid: $(head -1 /tmp/noacl.out)"
    DETAIL="exit=$rc msg=\"$(head -1 /tmp/noacl.out)\""
    end /tmp/noacl.out
}

# One relay session unix → vsock carries both the bulk and the splice case.
case_unix_to_vsock() {
    begin unix-to-vsock-bulk
    relay /tmp/u2v.relay.log --listen unix:/tmp/u2v.sock --connect vsock:1:5101
    wait_file /tmp/u2v.sock || bad "relay did not bind /tmp/u2v.sock"
    bulk_through unix:/tmp/u2v.sock vsock:1:5101 $BULK_BYTES $BULK_BYTES
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    U2V=$(closed_line /tmp/u2v.relay.log)
    expect_closed "$U2V" finished $BULK_BYTES $BULK_BYTES
    DETAIL="bytes=$BULK_BYTES each way; $(cat /tmp/near.out)"
    end /tmp/u2v.relay.log /tmp/near.out /tmp/far.out

    begin unix-to-vsock-splice
    [ -n "$U2V" ] || bad "no close line (bulk case failed)"
    expect_strategy "$U2V" copy-then-splice
    end
}

case_vsock_to_unix() {
    begin vsock-to-unix-bulk
    relay /tmp/v2u.relay.log --listen vsock:1:5102 --allow-cid 1 --connect unix:/tmp/v2u-far.sock
    settle
    bulk_through vsock:1:5102 unix:/tmp/v2u-far.sock $BULK_BYTES $BULK_BYTES
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    V2U=$(closed_line /tmp/v2u.relay.log)
    expect_closed "$V2U" finished $BULK_BYTES $BULK_BYTES
    DETAIL="bytes=$BULK_BYTES each way; $(cat /tmp/near.out)"
    end /tmp/v2u.relay.log /tmp/near.out /tmp/far.out

    begin vsock-to-unix-splice
    [ -n "$V2U" ] || bad "no close line (bulk case failed)"
    expect_strategy "$V2U" copy-then-splice
    end

    begin vsock-allow-cid-1-admits
    adm=$(grep 'admitted;' /tmp/v2u.relay.log | head -1)
    [ -n "$adm" ] || bad "no 'admitted' line"
    echo "$adm" | grep -q 'cid=1[^0-9]' || bad "admitted line does not name cid=1: $adm"
    grep -q 'WARN refused' /tmp/v2u.relay.log && bad "a 'refused' line appeared"
    DETAIL="$(echo "$adm" | sed 's/.*\(peer=[^}]*\).*/\1/')"
    end /tmp/v2u.relay.log
}

case_allow_cid_7_refuses() {
    begin vsock-allow-cid-7-refuses
    # A far side that would show any admitted session: it counts connections it serves.
    bg /tmp/ref-far.out $T peer echo --listen unix:/tmp/ref-far.sock --count 1
    far=$BG_PID
    relay /tmp/ref.relay.log --listen vsock:1:5103 --allow-cid 7 --connect unix:/tmp/ref-far.sock
    settle
    timeout 20 $T peer expect-refused --connect vsock:1:5103 >/tmp/ref.out 2>&1 || bad "expect-refused: $(cat /tmp/ref.out)"
    sleep 0.2
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    line=$(grep 'WARN refused' /tmp/ref.relay.log | head -1)
    [ -n "$line" ] || bad "no 'refused' line in the relay log"
    echo "$line" | grep -q 'cid=1[^0-9]' || bad "refused line does not name cid=1: $line"
    grep -q 'admitted;' /tmp/ref.relay.log && bad "the peer was admitted"
    grep -q 'closed end=' /tmp/ref.relay.log && bad "a session was relayed"
    kill -0 $far 2>/dev/null || bad "the far side was dialled (echo served a connection)"
    DETAIL="$(cat /tmp/ref.out); $(echo "$line" | sed 's/.*\(peer=.*\)/\1/')"
    end /tmp/ref.relay.log /tmp/ref.out
}

case_half_close() {
    begin half-close-unix-to-vsock
    relay /tmp/hc1.relay.log --listen unix:/tmp/hc1.sock --connect vsock:1:5104
    wait_file /tmp/hc1.sock || bad "relay did not bind"
    # the dialler sends and half-closes; the far side sends nothing and must still see EOF
    bulk_through unix:/tmp/hc1.sock vsock:1:5104 1048576 0
    # the other way round on the same relay: only the far (vsock) side sends
    bulk_through unix:/tmp/hc1.sock vsock:1:5104 0 1048576
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    expect_closed "$(closed_line /tmp/hc1.relay.log 1)" finished 1048576 0
    expect_closed "$(closed_line /tmp/hc1.relay.log 2)" finished 0 1048576
    end /tmp/hc1.relay.log /tmp/near.out /tmp/far.out

    begin half-close-vsock-to-unix
    relay /tmp/hc2.relay.log --listen vsock:1:5105 --allow-cid 1 --connect unix:/tmp/hc2-far.sock
    settle
    bulk_through vsock:1:5105 unix:/tmp/hc2-far.sock 1048576 0
    bulk_through vsock:1:5105 unix:/tmp/hc2-far.sock 0 1048576
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    expect_closed "$(closed_line /tmp/hc2.relay.log 1)" finished 1048576 0
    expect_closed "$(closed_line /tmp/hc2.relay.log 2)" finished 0 1048576
    end /tmp/hc2.relay.log /tmp/near.out /tmp/far.out
}

# reset_case NAME LISTEN FAR_ECHO_EP LOG BYTES [relay flags]: a client sends BYTES to an echo
# server through the relay and closes with unread echoed bytes (SO_LINGER 0): within 15 s the
# relay must tear that pair down (a non-"finished" end, or a reset noted) and then serve the next
# session normally (--max-conns 1: a session left hanging refuses the next one).
reset_case() {
    begin "$1"
    _listen=$2 _far=$3 _log=$4 _bytes=$5; shift 5
    bg /tmp/rst-far.out $T peer echo --listen "$_far" --count 2
    far=$BG_PID
    case $_far in unix:*) wait_file "${_far#unix:}" ;; *) sleep 0.5 ;; esac
    relay "$_log" --listen "$_listen" "$@" --connect "$_far"
    case $_listen in unix:*) wait_file "${_listen#unix:}" ;; *) settle ;; esac
    timeout 10 $T peer reset --connect "$_listen" --bytes $_bytes >/tmp/rst.out 2>&1 || bad "reset peer: $(cat /tmp/rst.out)"
    # the torn-down pair must be closed before the next session is judged
    for _i in $(seq 150); do grep -q 'closed end=' "$_log" && break; sleep 0.1; done
    first=$(closed_line "$_log" 1)
    [ -n "$first" ] || bad "the reset session was never closed"
    timeout 60 $T peer pingpong --connect "$_listen" --count 200 >/tmp/rst-next.out 2>&1
    expect_ok /tmp/rst-next.out pingpong
    sleep 0.2
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    second=$(closed_line "$_log" 2)
    [ "$(field "$second" end)" = finished ] || bad "next session end=$(field "$second" end) (want finished)"
    e1=$(field "$first" end)
    if [ "$e1" = finished ] && ! grep -q 'reset\|tearing' "$_log"; then
        bad "the reset session ended 'finished' with no reset seen"
    fi
    DETAIL="reset session end=$e1 l2c_bytes=$(field "$first" l2c_bytes) c2l_bytes=$(field "$first" c2l_bytes); next session ok"
    end "$_log" /tmp/rst.out /tmp/rst-next.out /tmp/rst-far.out
}

case_copy_mode() {
    begin copy-mode-vsock
    relay /tmp/copy.relay.log --listen vsock:1:5108 --allow-cid 1 --move copy --connect unix:/tmp/copy-far.sock
    settle
    bulk_through vsock:1:5108 unix:/tmp/copy-far.sock 4194304 4194304
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    l=$(closed_line /tmp/copy.relay.log)
    expect_closed "$l" finished 4194304 4194304
    [ -n "$l" ] && expect_strategy "$l" copy
    end /tmp/copy.relay.log /tmp/near.out /tmp/far.out
}

case_kvmi_session() {
    begin kvmi-session-over-vsock
    bg /tmp/intro.out $T fake-introspector --listen vsock:1:5109 --reads 300 --events 200
    intro=$BG_PID
    sleep 0.5
    relay /tmp/kvmi.relay.log --listen unix:/tmp/vmi-sock --connect vsock:1:5109
    wait_file /tmp/vmi-sock || bad "relay did not bind"
    settle
    timeout 60 $T fake-hypervisor --connect unix:/tmp/vmi-sock >/tmp/hv.out 2>&1
    wait $intro
    expect_ok /tmp/hv.out fake-hypervisor
    expect_ok /tmp/intro.out fake-introspector
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    [ "$(field "$(closed_line /tmp/kvmi.relay.log)" end)" = finished ] || bad "session did not end finished"
    DETAIL="$(cat /tmp/intro.out)"
    end /tmp/kvmi.relay.log /tmp/hv.out /tmp/intro.out
}

# A --kvmi read-only session over real vsock, the relay on the hypervisor side (UNIX, where QEMU
# dials) pinned to the VM by name, the introspector behind vsock: reads and events pass, a
# WRITE_PHYSICAL is answered by the relay (EPERM) and never reaches the hypervisor, and the close
# line counts every message type.
case_kvmi_read_only() {
    begin kvmi-read-only-over-vsock
    bg /tmp/kro-intro.out $T fake-introspector --listen vsock:1:5113 --reads 300 --events 200 --try-write
    intro=$BG_PID
    sleep 0.5
    relay /tmp/kro.relay.log --listen unix:/tmp/kro-vmi-sock --connect vsock:1:5113 \
        --kvmi --kvmi-vm-name one-7 --kvmi-policy read-only --kvmi-unknown pass
    wait_file /tmp/kro-vmi-sock || bad "relay did not bind"
    settle
    timeout 60 $T fake-hypervisor --connect unix:/tmp/kro-vmi-sock --name one-7 >/tmp/kro-hv.out 2>&1
    wait $intro
    expect_ok /tmp/kro-hv.out fake-hypervisor
    expect_ok /tmp/kro-intro.out fake-introspector
    grep -q ' write_err=-1' /tmp/kro-intro.out || bad "WRITE_PHYSICAL not answered with EPERM: $(cat /tmp/kro-intro.out)"
    grep -q ' writes=0 ' /tmp/kro-hv.out || bad "a write reached the hypervisor: $(cat /tmp/kro-hv.out)"
    stop $RELAY_PID || bad "relay exit $? on SIGTERM"
    _l=$(closed_line /tmp/kro.relay.log)
    [ "$(field "$_l" end)" = finished ] || bad "session did not end finished"
    [ "$(field "$_l" vm_name)" = one-7 ] || bad "vm_name=$(field "$_l" vm_name)"
    _m=$(field "$_l" kvmi_messages)
    for want in "READ_PHYSICAL:300:0:" "EVENT_PAUSE_VCPU:200:0:" "WRITE_PHYSICAL:0:1:" "GET_VERSION:1:0:"; do
        case ";$_m" in *";$want"*) ;; *) bad "kvmi_messages lacks $want: $_m" ;; esac
    done
    grep -q 'kvmi: denied' /tmp/kro.relay.log || bad "no denial logged"
    DETAIL="kvmi_messages=$_m"
    end /tmp/kro.relay.log /tmp/kro-hv.out /tmp/kro-intro.out
}

# figure PREFIX OUTFILE: FIGURE lines from a "pingpong ok ..." line.
figures() {
    _l=$(head -1 "$2")
    for k in p50_us p90_us p99_us max_us; do
        echo "FIGURE $1_$k $(field "$_l" $k)"
    done
}

case_pingpong() {
    begin pingpong-latency
    bg /tmp/echo.out $T peer echo --listen unix:/tmp/echo.sock --count 2
    wait_file /tmp/echo.sock || bad "echo did not bind"
    # direct: client → unix → echo
    timeout 120 $T peer pingpong --connect unix:/tmp/echo.sock --size 64 --count $PINGPONG_COUNT >/tmp/pp-direct.out 2>&1
    expect_ok /tmp/pp-direct.out pingpong
    # relayed: client → unix → relay A → vsock → relay B → unix → echo
    relay /tmp/ppb.relay.log --listen vsock:1:5110 --allow-cid 1 --connect unix:/tmp/echo.sock
    b=$RELAY_PID
    settle
    relay /tmp/ppa.relay.log --listen unix:/tmp/pp.sock --connect vsock:1:5110
    a=$RELAY_PID
    wait_file /tmp/pp.sock || bad "relay A did not bind"
    settle
    timeout 120 $T peer pingpong --connect unix:/tmp/pp.sock --size 64 --count $PINGPONG_COUNT >/tmp/pp-relay.out 2>&1
    expect_ok /tmp/pp-relay.out pingpong
    stop $a || bad "relay A exit $? on SIGTERM"
    stop $b || bad "relay B exit $? on SIGTERM"
    figures pingpong_direct_unix /tmp/pp-direct.out
    figures pingpong_relayed_unix_vsock_unix /tmp/pp-relay.out
    DETAIL="count=$PINGPONG_COUNT direct p50=$(field "$(cat /tmp/pp-direct.out)" p50_us)us relayed p50=$(field "$(cat /tmp/pp-relay.out)" p50_us)us (TCG: recorded, not gated)"
    end /tmp/pp-direct.out /tmp/pp-relay.out /tmp/ppa.relay.log /tmp/ppb.relay.log
}

# The relay must exit 0 on SIGTERM with a session open (bytes in flight are delivered first).
case_sigterm() {
    begin sigterm-clean-exit
    bg /tmp/st-echo.out $T peer echo --listen vsock:1:5111 --count 1
    sleep 0.5
    relay /tmp/st.relay.log --listen unix:/tmp/st.sock --connect vsock:1:5111
    wait_file /tmp/st.sock || bad "relay did not bind"
    settle
    # a session that stays open while SIGTERM arrives
    (timeout 60 $T peer pingpong --connect unix:/tmp/st.sock --count 100000 >/tmp/st-pp.out 2>&1) &
    PIDS="$PIDS $!"
    sleep 1
    kill -TERM $RELAY_PID
    rc=0
    wait $RELAY_PID || rc=$?
    [ $rc = 0 ] || bad "relay exit $rc on SIGTERM (want 0)"
    grep -q 'stopping' /tmp/st.relay.log || bad "no 'stopping' line"
    grep -q 'closed end=' /tmp/st.relay.log || bad "the open session was not closed and logged"
    DETAIL="exit=$rc end=$(field "$(closed_line /tmp/st.relay.log)" end)"
    end /tmp/st.relay.log /tmp/st-pp.out
}

# --- driver ----------------------------------------------------------------------------------

ALL="start-refused-without-allow-cid unix-to-vsock-bulk unix-to-vsock-splice vsock-to-unix-bulk
vsock-to-unix-splice vsock-allow-cid-1-admits vsock-allow-cid-7-refuses half-close-unix-to-vsock
half-close-vsock-to-unix reset-unix-client reset-vsock-client copy-mode-vsock kvmi-session-over-vsock
kvmi-read-only-over-vsock
pingpong-latency sigterm-clean-exit vsock-peer-gone-with-full-pipes"
WANT=${*:-$ALL}
want() { for w in $WANT; do [ "$w" = "$1" ] && return 0; done; return 1; }

log "kernel $(uname -r), cpus $(grep -c ^processor /proc/cpuinfo), relay $($R --version)"
want start-refused-without-allow-cid && case_start_refused_without_allow_cid
{ want unix-to-vsock-bulk || want unix-to-vsock-splice; } && case_unix_to_vsock
{ want vsock-to-unix-bulk || want vsock-to-unix-splice || want vsock-allow-cid-1-admits; } && case_vsock_to_unix
want vsock-allow-cid-7-refuses && case_allow_cid_7_refuses
{ want half-close-unix-to-vsock || want half-close-vsock-to-unix; } && case_half_close
want reset-unix-client && reset_case reset-unix-client unix:/tmp/rst1.sock vsock:1:5106 /tmp/rst1.relay.log 65536
want reset-vsock-client && reset_case reset-vsock-client vsock:1:5107 unix:/tmp/rst2-far.sock /tmp/rst2.relay.log 65536 --allow-cid 1
# The same with 1 MiB: the client's close finds both of the relay's pipes full (it is not
# reading the echo, the echo is blocked writing to it), so the relay has neither read nor write
# interest that fires on the vsock side when the peer's SHUTDOWN arrives.
want vsock-peer-gone-with-full-pipes && reset_case vsock-peer-gone-with-full-pipes vsock:1:5112 unix:/tmp/rst3-far.sock /tmp/rst3.relay.log 1048576 --allow-cid 1
want copy-mode-vsock && case_copy_mode
want kvmi-session-over-vsock && case_kvmi_session
want kvmi-read-only-over-vsock && case_kvmi_read_only
want pingpong-latency && case_pingpong
want sigterm-clean-exit && case_sigterm
reap
log "cases failed: $FAILED"
[ $FAILED = 0 ]
