# twinrun (rpm %postun): $1 is 0 on erase, >= 1 on upgrade. State is never deleted:
# empty state and run directories go on erase. Nothing is stopped.
if [ "$1" = 0 ]; then
    rmdir /run/twinrund /var/lib/twinrund /var/lib/twinrun-witness 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
