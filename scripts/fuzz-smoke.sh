#!/usr/bin/env bash
# Builds the cargo-fuzz targets (vmm/fuzz, alink/fuzz, quorum/fuzz, checkpoint/fuzz,
# storage-mirror/fuzz) and runs each for a bounded time.
# Exits non-zero if a build fails or any target finds a crash.
# Usage: scripts/fuzz-smoke.sh [seconds-per-target]   (default 20)
set -euo pipefail

secs="${1:-20}"
root="$(cd "$(dirname "$0")/.." && pwd)"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# "crate-dir:target" pairs; each crate dir has its own fuzz/ workspace.
targets=(vmm:block_request vmm:net_tx vmm:console_tx vmm:mmio_transport alink:frame_decoder
    quorum:witness_decoder checkpoint:checkpoint_messages storage-mirror:disk_messages
    storage-mirror:meta_parser storage-mirror:bitmap_parser storage-mirror:apply_journal_parser)

for d in vmm alink quorum checkpoint storage-mirror; do
    (cd "$root/$d" && cargo +nightly fuzz build)
done

failed=()
for dt in "${targets[@]}"; do
    d="${dt%%:*}"
    t="${dt#*:}"
    cd "$root/$d"
    # Corpus and artifacts stay in a throwaway directory per run.
    work="$(mktemp -d)"
    mkdir -p "$work/corpus"
    echo "== fuzz $t for ${secs}s"
    # Targets that read files (the storage-mirror parsers) write them in a scratch
    # directory of their own, on tmpfs when there is one (they fsync).
    scratch="$(mktemp -d -p "$([ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")")"
    if TWINRUN_FUZZ_SCRATCH="$scratch" cargo +nightly fuzz run "$t" "$work/corpus" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -artifact_prefix="$work/" \
        >"$work/log" 2>&1; then
        tail -n 2 "$work/log"
        rm -rf "$work" "$scratch"
    else
        rm -rf "$scratch"
        echo "!! $t failed; log and crash input kept in $work"
        tail -n 40 "$work/log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz-smoke: crashes in: ${failed[*]}"
    exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} targets ran ${secs}s without a crash"
