#!/usr/bin/env bash
# Builds the freestanding test guest into guest/target (its own workspace and target
# dir; the outer CARGO_TARGET_DIR and RUSTFLAGS must not apply) and prints its path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(
    cd "$ROOT/guest"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS CARGO_TARGET_DIR="$ROOT/guest/target" \
        cargo build --release >&2
)
echo "$ROOT/guest/target/x86_64-unknown-linux-gnu/release/twinrun-guest"
