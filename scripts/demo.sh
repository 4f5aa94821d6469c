#!/usr/bin/env bash
# twinrun demo: installs what is missing, builds everything, then runs `twinrun demo`:
# the whole system on one machine (two twinrund daemons in PM namespaces, a witness,
# FT, HA and unprotected VMs under kv load), PM1 killed, and a report of what the
# outside saw per VM (extra arguments go to `twinrun demo`: --json, --keep to explore
# the survivor's API until Ctrl-C, --pair for the single-pair FT demo).
#
#   ./scripts/demo.sh --tour   instead runs the tour of the test guest's workloads
#                              under one unprotected VMM:
#   1. counter  - paced console lines, clean guest exit
#   2. dirty    - rewrites and verifies guest memory pages (self-check)
#   3. disk     - durable records on a virtio-blk image, surviving a VM restart
#   4. kv       - a Redis-protocol server in the guest on virtio-net; redis-cli and
#                 ping from a client network namespace
# Every namespace, interface, process and temp file it creates is removed on exit,
# including on Ctrl-C. Needs root (KVM, network namespaces).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
guest_out() { sed -u 's/^/    guest| /'; }

say "installing system dependencies (only what is missing)"
./scripts/install-deps.sh

say "building twinrun and the test guest"
cargo build --workspace
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TWINRUN="$TARGET_DIR/debug/twinrun"
GUEST="$(./scripts/build-guest.sh)"
echo "twinrun: $TWINRUN"
echo "guest:   $GUEST"

if [[ "${1:-}" != "--tour" ]]; then
    say "demo: twinrun demo $*"
    # twinrun demo cleans up its namespaces, processes and files itself (also on Ctrl-C).
    TWINRUN_GUEST="$GUEST" exec "$TWINRUN" demo "$@"
fi
shift

WORK="$(mktemp -d /tmp/twinrun-demo.XXXXXX)"
P="twd$(($$ % 10000))"          # unique, short: interface names stay <= 15 bytes
VM_NS="$P-vm" CL_NS="$P-cl"
VM_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$VM_PID" ]] && kill -0 "$VM_PID" 2>/dev/null; then
        kill -TERM "$VM_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$VM_PID" 2>/dev/null || true
        wait "$VM_PID" 2>/dev/null || true
    fi
    ip netns del "$VM_NS" 2>/dev/null || true
    ip netns del "$CL_NS" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "interrupted: cleaning up"; exit 130' INT TERM

run_vm() { "$TWINRUN" vm run --guest "$GUEST" --mem-mib 64 "$@"; }

say "1/4 counter: 10 lines at 20/s, then the guest exits"
run_vm --workload counter --counter-rate 20 --counter-limit 10 2>"$WORK/counter.log" | guest_out
echo "    exit code ${PIPESTATUS[0]}; VMM log: $(tail -n1 "$WORK/counter.log")"

say "2/4 dirty: 3 passes over 4096 pages, each page verified when rewritten"
run_vm --workload dirty --dirty-pages 4096 --dirty-passes 3 --dirty-rate 0 2>"$WORK/dirty.log" | guest_out

say "3/4 disk: 20 records, restart the VM on the same image, 20 more"
IMG="$WORK/disk.img"
truncate -s 8M "$IMG"
for boot in 1 2; do
    echo "  boot $boot:"
    run_vm --workload disk --disk "$IMG" --disk-limit 20 --disk-rate 100 2>"$WORK/disk$boot.log" \
        | grep -E '^(BOOT|DISK|DONE|W (1|20|21|40)$)' | guest_out
done

say "4/4 kv: Redis protocol over virtio-net, TAP in namespace $VM_NS, client in $CL_NS"
# netns $VM_NS: twinrun + TAP ${P}t + bridge ${P}b + veth ${P}v
# netns $CL_NS: veth peer ${P}c 10.77.0.1/24     guest: 10.77.0.2/24
ip netns add "$VM_NS"
ip netns add "$CL_NS"
ip -n "$VM_NS" link set lo up
ip -n "$CL_NS" link set lo up
ip -n "$VM_NS" tuntap add dev "${P}t" mode tap vnet_hdr
ip -n "$VM_NS" link add "${P}b" type bridge
ip -n "$VM_NS" link add "${P}v" type veth peer name "${P}c" netns "$CL_NS"
ip -n "$VM_NS" link set "${P}t" master "${P}b"
ip -n "$VM_NS" link set "${P}v" master "${P}b"
for dev in "${P}t" "${P}b" "${P}v"; do ip -n "$VM_NS" link set "$dev" up; done
ip -n "$CL_NS" addr add 10.77.0.1/24 dev "${P}c"
ip -n "$CL_NS" link set "${P}c" up

CONSOLE="$WORK/kv.console"
ip netns exec "$VM_NS" "$TWINRUN" vm run --guest "$GUEST" --mem-mib 64 --workload kv \
    --net "${P}t,02:00:00:77:00:02" --kv-addr 10.77.0.2/24 \
    --console "file:$CONSOLE" 2>"$WORK/kv.log" &
VM_PID=$!
echo "  VMM pid $VM_PID; waiting for the guest's server"
for _ in $(seq 600); do
    grep -q '^KV listening' "$CONSOLE" 2>/dev/null && break
    kill -0 "$VM_PID" 2>/dev/null || { echo "VMM exited early:"; cat "$WORK/kv.log"; exit 1; }
    sleep 0.1
done
grep '^\(BOOT\|KV\)' "$CONSOLE" | guest_out || { echo "no KV line:"; cat "$WORK/kv.log"; exit 1; }

client() { ip netns exec "$CL_NS" "$@"; }
echo "  \$ ping -c 3 10.77.0.2"
client ping -c 3 -i 0.2 -W 2 10.77.0.2 | sed 's/^/    /'
for cmd in "SET greeting hello-from-twinrun" "GET greeting" "INCR visits" "INCR visits" "DBSIZE"; do
    # shellcheck disable=SC2086 # word splitting of the command is intended
    printf '  $ redis-cli %-34s -> %s\n' "$cmd" "$(client redis-cli -h 10.77.0.2 -p 6379 $cmd)"
done

echo "  stopping the VM with SIGTERM"
kill -TERM "$VM_PID"
rc=0; wait "$VM_PID" || rc=$?
VM_PID=""
echo "  VMM exit code $rc; last log line: $(tail -n1 "$WORK/kv.log")"

say "demo finished"
