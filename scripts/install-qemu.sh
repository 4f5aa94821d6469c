#!/usr/bin/env bash
# Installs Debian's QEMU (qemu-system-x86) for the benchmark's peer section
# (`twinrun-bench --peers`, which runs this script when qemu-system-x86_64 is missing).
# Idempotent: nothing is done when QEMU is already installed.
#
# Why backports on bookworm: these machines ship qemu-utils 10.0.2 from
# bookworm-backports, and bookworm's own qemu-system-x86 7.2 refuses to install beside
# it (qemu-utils Breaks qemu-system-common << 8.0). So on bookworm the
# bookworm-backports suite is added as an apt source (when no source names it yet) and
# QEMU comes from there; on other releases the release's own package is installed.
# See /work/shared/REFERENCES.md, "QEMU as a peer on these machines".
#
# Exit status: 0 when qemu-system-x86_64 is on PATH afterwards; 1 with a message
# saying why otherwise (not root, apt failed, ...).
set -euo pipefail

say() { echo "install-qemu: $*"; }
fail() {
    echo "install-qemu: $*" >&2
    exit 1
}

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    say "present: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || fail "qemu-system-x86_64 is missing and installing it needs root"
command -v apt-get >/dev/null 2>&1 || fail "qemu-system-x86_64 is missing and this is not a Debian system (no apt-get): install QEMU by hand"

codename=""
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
export DEBIAN_FRONTEND=noninteractive

target=()
if [[ $codename == bookworm ]]; then
    suite=bookworm-backports
    if grep -rqsw -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "apt source for $suite already present"
    else
        src=/etc/apt/sources.list.d/twinrun-bookworm-backports.sources
        say "adding $suite as an apt source ($src)"
        cat >"$src" <<EOF
# Added by twinrun's scripts/install-qemu.sh: QEMU for the benchmark's peer section.
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    target=(-t "$suite")
fi

say "apt-get update"
apt-get update -q || fail "apt-get update failed (is the Debian mirror reachable?)"
say "installing qemu-system-x86 ${target[*]}"
apt-get install -y -q --no-install-recommends "${target[@]}" qemu-system-x86 ||
    fail "apt-get install ${target[*]} qemu-system-x86 failed (see above)"
command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    fail "qemu-system-x86 installed but qemu-system-x86_64 is not on PATH"
say "installed: $(qemu-system-x86_64 --version | head -n 1)"
