#!/usr/bin/env bash
# Rolling upgrade across two real builds (issue 16 item 3): builds `twinrun` and
# `twinrund` with TWINRUN_PROTO_PREV=1 (they announce the previous daemon, control
# and A-Link protocol versions) into target/proto-prev, then runs
# node/tests/rolling_upgrade.rs with node 2's daemon and VMMs from that build and node
# 1's from the normal one. The suite runs the same test with node 2 announcing N-1 at
# run time (TWINRUND_PROTOCOL); this script is the slower, whole-build variant (a
# second debug build of both binaries).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
prev="${TWINRUN_PREV_TARGET:-$ROOT/target/proto-prev}"
TWINRUN_PROTO_PREV=1 CARGO_TARGET_DIR="$prev" cargo build -p twinrun -p twinrund --bins
env -u TWINRUN_PROTO_PREV TWINRUN_PREV_DIR="$prev/debug" \
    cargo nextest run -p twinrund --config-file scripts/nextest.toml \
    --test rolling_upgrade --no-capture
