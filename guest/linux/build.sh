#!/usr/bin/env bash
# Builds what a stock Linux guest of twinrun needs, from Debian packages:
#   out/vmlinux          the Debian cloud kernel, uncompressed (ELF, 64-bit boot protocol)
#   out/bzImage          the same kernel as shipped (compressed)
#   out/initramfs.cpio   busybox-static + the virtio modules + init (see init.sh)
#   out/KERNEL_VERSION   the kernel release (e.g. 6.1.0-56-cloud-amd64)
#
# Nothing is installed on the host: packages are fetched with `apt-get download` and
# unpacked with dpkg-deb. Idempotent: every step is skipped when its output is present
# and newer than its inputs; delete out/ (or pass --clean) to start over.
#
# Environment: OUT (default: guest/linux/out), KERNEL_PKG (a full package name, default:
# the unsigned package of what linux-image-cloud-amd64 depends on).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$here/out}
if [[ ${1:-} == --clean ]]; then rm -rf "$OUT"; fi
mkdir -p "$OUT/debs"

die() { echo "guest/linux/build.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is missing (Debian package: $2; scripts/install-deps.sh installs it)"; }
need apt-get apt
need dpkg-deb dpkg
need lz4 lz4
need xz xz-utils
need zstd zstd

# --- which kernel ---------------------------------------------------------------------
if [[ -z ${KERNEL_PKG:-} ]]; then
    # The cloud meta package names the current ABI; its -unsigned twin has the same image.
    signed=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -n $signed ]] && apt-cache show "$signed-unsigned" >/dev/null 2>&1; then
        KERNEL_PKG="$signed-unsigned"
    else
        KERNEL_PKG=$(apt-cache search --names-only '^linux-image-.*-cloud-amd64-unsigned$' \
            | awk '{print $1}' | sort -V | tail -n1)
    fi
    [[ -n $KERNEL_PKG ]] || die "no linux-image-*-cloud-amd64-unsigned package is known to apt (run apt-get update?)"
fi
echo "kernel package: $KERNEL_PKG"

# fetch PKG: downloads PKG's .deb into out/debs once; prints its path.
fetch() {
    local pkg=$1 deb
    deb=$(ls "$OUT/debs/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        (cd "$OUT/debs" && apt-get download -q "$pkg" >&2) \
            || die "cannot fetch package '$pkg' with apt-get download (network? apt sources? try apt-get update)"
        deb=$(ls "$OUT/debs/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        [[ -n $deb ]] || die "apt-get download '$pkg' left no .deb in $OUT/debs"
    fi
    echo "$deb"
}

kdeb=$(fetch "$KERNEL_PKG")
bdeb=$(fetch busybox-static)

# --- unpack the kernel package -------------------------------------------------------
kroot=$OUT/kernel-root
if [[ ! -f $kroot/.done || $kdeb -nt $kroot/.done ]]; then
    rm -rf "$kroot"
    mkdir -p "$kroot"
    dpkg-deb -x "$kdeb" "$kroot"
    touch "$kroot/.done"
fi
bz=$(ls "$kroot"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[[ -n $bz ]] || die "$kdeb has no /boot/vmlinuz-*"
kver=${bz##*/vmlinuz-}
echo "$kver" >"$OUT/KERNEL_VERSION"
cp -p "$bz" "$OUT/bzImage"

# --- vmlinux: the LZ4 payload of the bzImage -----------------------------------------
# Like the kernel's scripts/extract-vmlinux: find the LZ4 legacy-frame magic
# (02 21 4c 18) in the bzImage, decompress from each candidate offset, keep the first
# result that is an ELF file.
if [[ ! -f $OUT/vmlinux || $bz -nt $OUT/vmlinux ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    found=
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bz" | cut -d: -f1); do
        tail -c +"$((off + 1))" "$bz" | lz4 -dc >"$tmp/vmlinux" 2>/dev/null || true
        if [[ $(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
            found=$off
            break
        fi
    done
    [[ -n $found ]] || die "no LZ4 payload that decompresses to an ELF in $bz (is the kernel compressed with something else?)"
    mv "$tmp/vmlinux" "$OUT/vmlinux"
    echo "vmlinux: LZ4 payload at offset $found of $(basename "$bz")"
fi

# --- initramfs -----------------------------------------------------------------------
modules=(virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net)
ird=$OUT/initramfs.cpio
if [[ ! -f $ird || $kdeb -nt $ird || $bdeb -nt $ird || $here/init.sh -nt $ird || $0 -nt $ird ]]; then
    broot=$OUT/busybox-root
    rm -rf "$broot"
    mkdir -p "$broot"
    dpkg-deb -x "$bdeb" "$broot"
    [[ -x $broot/bin/busybox ]] || die "$bdeb has no /bin/busybox"

    stage=$OUT/initramfs-root
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,mnt,tmp,run,etc,lib/modules}
    cp "$broot/bin/busybox" "$stage/bin/busybox"
    for app in $("$stage/bin/busybox" --list); do
        [[ -e $stage/bin/$app ]] || ln -s busybox "$stage/bin/$app"
    done
    cp "$here/init.sh" "$stage/init"
    chmod 755 "$stage/init"

    mdir=$kroot/lib/modules/$kver
    builtin=$mdir/modules.builtin
    : >"$stage/lib/modules/load-order"
    for m in "${modules[@]}"; do
        f=$(find "$mdir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
        if [[ -z $f ]]; then
            if [[ -f $builtin ]] && grep -q "/$m.ko\$" "$builtin"; then
                echo "module $m: built into the kernel"
                continue
            fi
            die "module $m is neither in $kdeb nor built in"
        fi
        case $f in
        *.ko.xz) xz -dc "$f" >"$stage/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$stage/lib/modules/$m.ko" ;;
        *) cp "$f" "$stage/lib/modules/$m.ko" ;;
        esac
        echo "$m" >>"$stage/lib/modules/load-order"
    done
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$stage/bin/busybox" cpio -o -H newc -R 0:0 >"$ird.tmp" 2>/dev/null)
    mv "$ird.tmp" "$ird"
    echo "initramfs: $(wc -c <"$ird") bytes, modules: $(tr '\n' ' ' <"$stage/lib/modules/load-order")"
fi
echo "built: $OUT/vmlinux $OUT/bzImage $OUT/initramfs.cpio (kernel $kver)"
