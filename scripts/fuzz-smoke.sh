#!/usr/bin/env bash
# Builds the vmm cargo-fuzz targets and runs each for a bounded time.
# Exits non-zero if a build fails or any target finds a crash.
# Usage: scripts/fuzz-smoke.sh [seconds-per-target]   (default 20)
set -euo pipefail

secs="${1:-20}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/vmm"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=(block_request net_tx console_tx mmio_transport)

cargo +nightly fuzz build

failed=()
for t in "${targets[@]}"; do
    # Corpus and artifacts stay in a throwaway directory per run.
    work="$(mktemp -d)"
    mkdir -p "$work/corpus"
    echo "== fuzz $t for ${secs}s"
    if cargo +nightly fuzz run "$t" "$work/corpus" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -artifact_prefix="$work/" \
        >"$work/log" 2>&1; then
        tail -n 2 "$work/log"
        rm -rf "$work"
    else
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
