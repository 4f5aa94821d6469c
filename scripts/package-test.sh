#!/usr/bin/env bash
# Tests the packages (issue 16 item 4), as root on this Debian machine:
# - builds both from the debug build (scripts/package.sh --debug);
# - the .rpm's file list (`rpm -qlp`) is the .deb's (`dpkg-deb -c`), and neither
#   package's install scripts enable, start or restart a service;
# - `dpkg -i` installs the .deb: the files are in place, the state and run
#   directories exist, no unit is enabled; the installed units pass
#   `systemd-analyze verify`;
# - the installed `twinrund --check-config` against the installed default config
#   names the missing cluster secret, then, with a secret and a tokens file written as
#   the README's install steps do, says OK;
# - `dpkg -r` removes the package's files and keeps only its config files; `dpkg -P`
#   leaves nothing of it.
# The install runs this machine's dpkg on this machine's root file system, seen through
# a copy-on-write overlay in a private mount namespace (writes land in a tmpfs that
# goes with the namespace): the real root, its dpkg database and lock are never
# touched, so the test leaves nothing behind even when it fails or is killed, and runs
# beside other tests (and other runs of itself).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/package-test.sh"
cd "$ROOT"

fail() { echo "package-test: FAIL: $*" >&2; exit 1; }

# Phase 3 (in the overlay's chroot): install, check, remove, purge.
installed_checks() {
    local deb="$1" f
    local deb_files
    deb_files="$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\./|/|' | sort)"
    # (Outputs are captured before grep -q: under pipefail, grep quitting early would
    # fail the pipeline with the writer's SIGPIPE.)
    local status
    status="$(dpkg-query -W -f='${Status}' twinrun 2>/dev/null || true)"
    if grep -q 'installed\|config-files' <<<"$status"; then
        fail "a twinrun package is installed on this machine; the test needs a root without it"
    fi
    dpkg -i "$deb" >/dev/null
    while read -r f; do
        [[ -e $f ]] || fail "$f is missing after dpkg -i"
    done <<<"$deb_files"
    [[ $(stat -c %a /var/lib/twinrund) == 700 ]] || fail "/var/lib/twinrund is not a 0700 directory"
    [[ -d /run/twinrund ]] || fail "/run/twinrund was not made"
    if ls /etc/systemd/system/*.wants/twinrun* 2>/dev/null; then
        fail "a unit was enabled by the install"
    fi
    for u in twinrund.service twinrun-witness.service; do
        err="$(systemd-analyze verify "/usr/lib/systemd/system/$u" 2>&1)" \
            || fail "systemd-analyze verify $u: $err"
    done
    /usr/bin/twinrun --version >/dev/null || fail "the installed twinrun does not run"

    # The installed daemon checks the installed default config (ExecStartPre does the same).
    set +e
    msg="$(/usr/bin/twinrund --check-config 2>&1)"
    rc=$?
    set -e
    [[ $rc == 2 && $msg == *"/etc/twinrun/cluster.secret"* ]] \
        || fail "check-config without a secret: rc $rc: $msg"
    umask 077
    head -c 32 /dev/urandom | base64 >/etc/twinrun/cluster.secret
    printf 'admin %s\nread-only %s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
        "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/etc/twinrun/api-tokens
    umask 022
    msg="$(/usr/bin/twinrund --check-config 2>&1)" || fail "check-config: $msg"
    [[ $msg == "/etc/twinrun/node.toml: OK: node pm1 of cluster plant-a"* ]] || fail "check-config said: $msg"
    echo "package-test: installed twinrund --check-config: $msg"
    # The operator's files go first (dpkg -P removes only what the package owns).
    rm -f /etc/twinrun/cluster.secret /etc/twinrun/api-tokens

    # Remove: the files go, the config files stay (policy); purge: nothing stays.
    dpkg -r twinrun >/dev/null
    while read -r f; do
        case "$f" in
            /etc/*) [[ -e $f ]] || fail "dpkg -r removed the config file $f" ;;
            *) [[ ! -e $f ]] || fail "$f is left after dpkg -r" ;;
        esac
    done <<<"$deb_files"
    dpkg -P twinrun >/dev/null
    while read -r f; do
        [[ ! -e $f ]] || fail "$f is left after dpkg -P"
    done <<<"$deb_files"
    for d in /etc/twinrun /usr/lib/twinrun /usr/share/doc/twinrun /var/lib/twinrund /run/twinrund; do
        [[ ! -e $d ]] || fail "$d is left after dpkg -P"
    done
    if dpkg-query -W twinrun >/dev/null 2>&1; then
        fail "dpkg still knows twinrun after dpkg -P"
    fi
}

# Phase 2 (in a private mount namespace): this machine's root as a copy-on-write
# overlay over a tmpfs in directory $2, with /proc, /sys and /dev bound in and a fresh
# /run (as at boot); phase 3 runs chrooted into it.
overlay_root() {
    local deb="$1" t="$2"
    mount -t tmpfs -o size=2g twinrun-pkgtest "$t"
    mkdir "$t/upper" "$t/work" "$t/root"
    mount -t overlay twinrun-pkgtest -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/root"
    for d in proc sys dev; do
        mount --rbind "/$d" "$t/root/$d"
    done
    mount -t tmpfs -o mode=0755 tmpfs "$t/root/run"
    mkdir -p "$t/root/run/lock"
    # The package and this script are copied in: their directories may be on another
    # file system than /, which the overlay does not show.
    local inner="$t/root/tmp/twinrun-package-test"
    mkdir -p "$inner"
    cp "$deb" "$SELF" "$inner/"
    chroot "$t/root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        /bin/bash /tmp/twinrun-package-test/package-test.sh --installed \
        "/tmp/twinrun-package-test/$(basename "$deb")"
}

case "${1:-}" in
    --installed) installed_checks "$2"; exit 0 ;;
    --overlay) overlay_root "$2" "$3"; exit 0 ;;
    "") ;;
    *) echo "package-test: unknown argument $1" >&2; exit 2 ;;
esac

# Phase 1 (on the machine): build both packages and compare them.
[[ $(id -u) -eq 0 ]] || fail "needs root (dpkg -i, mount namespaces)"
command -v rpm >/dev/null || fail "rpm is missing (scripts/install-deps.sh installs it)"
out="$(mktemp -d)"
ovl="$(mktemp -d)"
trap 'rm -rf "$out"; rmdir "$ovl" 2>/dev/null || true' EXIT

mapfile -t pkgs < <(./scripts/package.sh --debug --out "$out")
deb="${pkgs[0]}"
rpmf="${pkgs[1]}"
[[ -f $deb && -f $rpmf ]] || fail "package.sh printed ${pkgs[*]}"
echo "package-test: $(basename "$deb") $(du -h "$deb" | cut -f1), $(basename "$rpmf") $(du -h "$rpmf" | cut -f1)"

# Same files in both (directories aside: each format lists them its own way).
deb_files="$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\./|/|' | sort)"
rpm_files="$(rpm -qlp "$rpmf" 2>/dev/null | sort)"
# Debian policy's copyright file is generated by cargo-deb; the rpm has its License tag.
deb_cmp="$(grep -vx '/usr/share/doc/twinrun/copyright' <<<"$deb_files")"
if [[ $deb_cmp != "$rpm_files" ]]; then
    diff <(echo "$deb_cmp") <(echo "$rpm_files") >&2 || true
    fail "the .deb (<) and the .rpm (>) hold different files"
fi
for f in /usr/bin/twinrun /usr/bin/twinrund /usr/lib/twinrun/twinrun-guest \
    /usr/lib/systemd/system/twinrund.service /usr/lib/systemd/system/twinrun-witness.service \
    /usr/lib/tmpfiles.d/twinrun.conf /etc/twinrun/node.toml /etc/twinrun/witness.toml; do
    grep -qx "$f" <<<"$rpm_files" || fail "$f is not in the packages"
done
# (Outputs are captured before grep -q: under pipefail, grep quitting early would fail
# the pipeline with the writer's SIGPIPE.)
rpm_conf="$(rpm -qp --configfiles "$rpmf" 2>/dev/null)"
grep -qx /etc/twinrun/node.toml <<<"$rpm_conf" \
    || fail "the rpm does not mark /etc/twinrun/node.toml as a config file"

# Install scripts: daemon-reload only.
scripts="$(rpm -qp --scripts "$rpmf" 2>/dev/null; dpkg-deb -I "$deb" postinst; dpkg-deb -I "$deb" postrm)"
grep -q 'daemon-reload' <<<"$scripts" || fail "no daemon-reload in the install scripts"
if grep -E '^[^#]*systemctl +(enable|start|restart|try-restart|reload-or-restart)' <<<"$scripts"; then
    fail "an install script enables or starts a service"
fi
deb_conf="$(dpkg-deb -I "$deb" conffiles)"
grep -qx /etc/twinrun/node.toml <<<"$deb_conf" \
    || fail "the deb does not mark /etc/twinrun/node.toml as a conffile"

# Phase 2 and 3: install, check and purge the .deb in a throwaway copy of this root.
unshare --mount --propagation private -- /bin/bash "$SELF" --overlay "$deb" "$ovl"
echo "package-test: all checks passed"
