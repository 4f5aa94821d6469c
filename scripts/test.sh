#!/usr/bin/env bash
# The project's checks, as CI runs them (`bash .ci/run` on a clean clone as root):
# system deps, guest build, formatting, clippy, every test, fuzz smoke.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "system dependencies"
./scripts/install-deps.sh

step "build the test guest"
GUEST="$(./scripts/build-guest.sh)"
export TWINRUN_GUEST="$GUEST"   # tests use it instead of rebuilding
echo "guest: $GUEST"

guest_cargo() {
    (cd guest && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        CARGO_TARGET_DIR="$ROOT/guest/target" cargo "$@")
}

step "cargo fmt --check"
cargo fmt --all --check
guest_cargo fmt --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
guest_cargo clippy --release --all-targets -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --config-file scripts/nextest.toml
else
    echo "cargo-nextest not installed; using cargo test"
    timeout 1800 cargo test --workspace --no-fail-fast
fi
step "packages (.deb and .rpm from the debug build; the .deb installed, checked and purged in an overlay of this root)"
./scripts/package-test.sh

step "guest host-side unit tests"
guest_cargo test --release --lib

if [[ -x scripts/fuzz-smoke.sh ]]; then
    step "fuzz smoke"
    ./scripts/fuzz-smoke.sh
elif [[ -f scripts/fuzz-smoke.sh ]]; then
    step "fuzz smoke"
    bash scripts/fuzz-smoke.sh
fi

step "all checks passed"
