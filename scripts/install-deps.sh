#!/usr/bin/env bash
# Installs the system packages twinrun's demo and tests need, only those missing.
# Idempotent: when every tool is present it does nothing (no apt-get update).
set -euo pipefail

# tool -> Debian package
declare -A NEED=(
    [ip]=iproute2            # network namespaces, veth, bridge, TAP
    [ping]=iputils-ping      # ping the guest
    [redis-cli]=redis-tools  # the kv workload's real client
    [cc]=gcc                 # linker for Rust binaries and the guest
    [iasl]=acpica-tools [lz4]=lz4 [zstd]=zstd  # ACPI table test; guest/linux/build.sh
    [etcd]=etcd-server       # the quorum etcd backend's tests run a real etcd
    [protoc]=protobuf-compiler  # the etcd-client crate compiles etcd's protos when built
    [systemd-analyze]=systemd  # twinrund: the unit files are checked offline
    [openssl]=openssl          # twinrund: a test certificate for the API over TLS; the etcd TLS test
    [rpm]=rpm                  # scripts/package-test.sh: the .rpm's file list (rpm -qlp)
)
# file -> Debian package, for what has no command of its own
declare -A NEED_FILE=(
    # protoc's well-known types (only a Recommends of protobuf-compiler)
    [/usr/include/google/protobuf/descriptor.proto]=libprotobuf-dev
)

missing=()
for tool in "${!NEED[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${NEED[$tool]}")
done
for f in "${!NEED_FILE[@]}"; do
    [[ -e $f ]] || missing+=("${NEED_FILE[$f]}")
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all system dependencies present"
else
    echo "install-deps: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to install packages (tests also need root for KVM and namespaces)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo (Rust stable) is required but not on PATH" >&2
    exit 1
fi
# The packaging tools (scripts/package.sh, run by the suite's package test). Pinned:
# compiled once per machine (a few minutes each), then found in ~/.cargo/bin.
declare -A CARGO_TOOLS=([cargo-deb]=3.8.0 [cargo-generate-rpm]=0.21.1)
for tool in "${!CARGO_TOOLS[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-deps: cargo install $tool ${CARGO_TOOLS[$tool]}"
        cargo install --locked --version "${CARGO_TOOLS[$tool]}" "$tool"
    fi
done
if [[ ! -c /dev/kvm ]]; then
    echo "install-deps: warning: /dev/kvm is missing; VMs cannot run here" >&2
fi
