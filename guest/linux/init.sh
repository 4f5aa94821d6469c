#!/bin/sh
# init of twinrun's Linux test initramfs (busybox). Loads the virtio modules, mounts the
# first virtio disk, brings up the network and runs the workload command, printing its
# output between marker lines on the console, then reboots (with reboot=k the i8042
# reset ends the VM).
#
# Kernel command line knobs (after the kernel's own):
#   twinrun_ip=a.b.c.d/prefix   static address of eth0 (else DHCP is tried once)
#   twinrun_gw=a.b.c.d          default route
#   -- CMD...                   the workload: everything after "--", run with sh -c
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null || mdev -s
exec </dev/console >/dev/console 2>&1
echo "twinrun-init: kernel $(uname -r)"
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "twinrun-init: insmod $m failed"
done </lib/modules/load-order
sleep 1
[ -x /bin/mdev ] && mdev -s
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    echo "twinrun-init: disk $d ($(cat /sys/block/${d#/dev/}/size) sectors)"
done
if [ -b /dev/vda ]; then
    mount /dev/vda /mnt 2>/dev/null && echo "twinrun-init: /dev/vda mounted on /mnt" \
        || echo "twinrun-init: /dev/vda has no mountable file system"
fi
ip link set lo up
for arg in $(cat /proc/cmdline); do
    case $arg in
    twinrun_ip=*) ipaddr=${arg#twinrun_ip=} ;;
    twinrun_gw=*) gw=${arg#twinrun_gw=} ;;
    esac
done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    if [ -n "$ipaddr" ]; then
        ip addr add "$ipaddr" dev eth0
        [ -n "$gw" ] && ip route add default via "$gw"
    else
        udhcpc -i eth0 -n -q -t 3 >/dev/null 2>&1 || echo "twinrun-init: no DHCP answer"
    fi
    echo "twinrun-init: eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}') mac $(cat /sys/class/net/eth0/address)"
fi
cmd="$*"
[ -n "$cmd" ] || cmd="uname -a; cat /proc/cmdline"
echo "TWINRUN-WORKLOAD-BEGIN"
sh -c "$cmd"
echo "TWINRUN-WORKLOAD-END status=$?"
sync
reboot -f
