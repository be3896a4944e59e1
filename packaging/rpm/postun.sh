# affa's %postun (RPM): on erase ($1 = 0, not an upgrade) the generated cron file goes (left
# behind it would start a missing /usr/sbin/affa every 15 minutes). The configuration (edited
# samples are kept as .rpmsave), the logs, the keys and the archives stay.
if [ "$1" = 0 ]; then
    rm -f /etc/cron.d/affa
fi
exit 0
