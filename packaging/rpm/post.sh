# twinrun (rpm %post): state and run directories, daemon-reload; starts, enables and
# restarts nothing (see packaging/debian/postinst).
systemd-tmpfiles --create twinrun.conf >/dev/null 2>&1 || {
    install -d -m 0700 /var/lib/twinrund
    install -d -m 0755 /run/twinrund
}
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
