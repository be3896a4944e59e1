# affa's %post (RPM): after every install and upgrade, the state directories (created when
# missing) and the cron file (rewritten from the jobs' schedules): `affa --_setup`, the same
# code as the end of `affa --install`. It never changes a configuration file or an archive.
if ! /usr/sbin/affa --_setup; then
    echo "affa: the cron file was not updated; fix the configuration (affa --configcheck), then run affa --make-cronjobs" >&2
fi
exit 0
