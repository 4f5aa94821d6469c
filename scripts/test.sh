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
step "packages (.deb and .rpm: build from the debug build, install, check, purge)"
# Installing cargo-deb and cargo-generate-rpm compiles them (~10 min each on a loaded
# 2-core machine): the suite runs this step when they are installed (package.sh
# installs them), or when TWINRUN_PACKAGE_TEST=1 asks for the install.
if { command -v cargo-deb && command -v cargo-generate-rpm; } >/dev/null 2>&1 \
    || [[ ${TWINRUN_PACKAGE_TEST:-} == 1 ]]; then
    ./scripts/package-test.sh
else
    echo "SKIPPED: cargo-deb/cargo-generate-rpm not installed; run ./scripts/package-test.sh"
fi

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
