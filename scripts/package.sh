#!/usr/bin/env bash
# Builds twinrun's packages from one build: a .deb (cargo-deb) for Debian-class PMs and
# an .rpm (cargo-generate-rpm) for CentOS-class PMs, with the same files (the lists
# are in Cargo.toml, [package.metadata.deb] and [package.metadata.generate-rpm]).
#
#   scripts/package.sh [--debug] [--out DIR]
#
# Default: a release build of twinrun and twinrund. --debug packages the debug build
# as it is (built only if a binary is missing), so the suite's test reuses the build it
# already made. Prints the two package paths. Installs cargo-deb and
# cargo-generate-rpm with `cargo install --locked` when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=release
out="$ROOT/target/packages"
while (($#)); do
    case "$1" in
        --debug) profile=debug ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "package.sh: installing $tool" >&2
        cargo install --locked "$tool" >&2
    fi
done

target="${CARGO_TARGET_DIR:-$ROOT/target}"
bins=("$target/$profile/twinrun" "$target/$profile/twinrund")
if [[ $profile == release ]]; then
    cargo build --release -p twinrun -p twinrund --bins >&2
else
    for b in "${bins[@]}"; do
        [[ -x $b ]] || { cargo build -p twinrun -p twinrund --bins >&2; break; }
    done
fi
./scripts/build-guest.sh >/dev/null

# The metadata names target/release; a debug build or another target dir is staged
# there under a private directory so neither tool needs path rewriting.
stage="$(mktemp -d "$target/package-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/target/release" "$out"
for b in "${bins[@]}"; do
    # Stripped copies: the debug build's symbols would make the packages ~10x larger.
    strip --strip-debug -o "$stage/target/release/$(basename "$b")" "$b"
done
# Everything else (the workspace, the files the metadata names) from the repository.
for f in "$ROOT"/*; do
    [[ $(basename "$f") == target ]] || ln -s "$f" "$stage/"
done

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
rm -f "$out"/twinrun_*.deb "$out"/twinrun-*.rpm
(
    cd "$stage"
    unset CARGO_TARGET_DIR
    cargo deb --no-build --no-strip --fast --manifest-path "$stage/Cargo.toml" \
        -p twinrun --output "$out" >&2
    cargo generate-rpm --target-dir "$stage/target" --output "$out" >&2
)
deb="$(ls "$out"/twinrun_"$version"*.deb)"
rpm="$(ls "$out"/twinrun-"$version"*.rpm)"
echo "$deb"
echo "$rpm"
