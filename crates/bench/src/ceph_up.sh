#!/bin/sh
# A throwaway single-node Ceph (mon, mgr, one bluestore OSD on a sparse file, radosgw) on
# 127.0.0.1 for affa-bench's offsite rows (crates/bench/src/offsite.rs). Copied from the tests'
# fixture (tests/it/common/ceph_up.sh; the bench must not depend on the test crate), changed:
# bluestore on a sparse file in DIR instead of memstore (the benchmark uploads several GiB; RAM
# is not the place), the gateway's usage log on and flushed every second (bytes received and
# sent per bucket), no CephFS, the bench's own S3 keys.
# Usage: ceph_up.sh DIR MON_PORT RGW_PORT FSID OSD_UUID BLOCK_BYTES. Writes DIR/ready (or
# DIR/failed) when set up, then waits for end-of-file on its stdin (the bench ending, however it
# ends), kills every daemon with SIGKILL (the cluster is thrown away) and removes DIR.
D=$1; MON_PORT=$2; RGW_PORT=$3; FSID=$4; UUID=$5; BLOCK=$6
C="ceph -c $D/ceph.conf"
# Every daemon of this cluster: by its pid file, and by its command line naming DIR/ceph.conf.
killall_daemons() {
  for f in "$D"/run/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
  for p in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
    case "$c" in *"$D/ceph.conf"*) kill -9 "${p#/proc/}" 2>/dev/null ;; esac
  done
}
fail() { echo "ceph (bench): $1" >&2; killall_daemons; : > "$D/failed"; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 is missing: apt-get install --no-install-recommends $2"; }
need ceph-mon ceph-mon; need ceph-mgr ceph-mgr; need ceph-osd ceph-osd; need radosgw radosgw
need ceph-authtool ceph-common; need monmaptool ceph-common; need radosgw-admin ceph-common; need ceph ceph-common
mkdir -p "$D"/log "$D"/run "$D"/mon.a "$D"/mgr.x "$D"/osd.0 "$D"/rgw.a
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth allow insecure global id reclaim = false
keyring = $D/keyring
log file = $D/log/\$name.log
admin socket = $D/run/\$name.\$pid.asok
pid file = $D/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon max pg per osd = 1000
mgr initial modules = iostat
paxos propose interval = 0.1
[mon]
mon data = $D/mon.\$id
[mgr]
mgr data = $D/mgr.\$id
[osd]
osd data = $D/osd.\$id
osd objectstore = bluestore
bluestore block path = $D/osd.\$id/block.img
bluestore block create = true
bluestore block size = $BLOCK
bluestore fsck on mount = false
osd memory target = 1073741824
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $D/rgw.a
rgw enable usage log = true
rgw usage log tick interval = 1
rgw usage log flush threshold = 1
CONF
{
  ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null &&
  ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mds 'allow *' --cap mgr 'allow *' >/dev/null &&
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null &&
  ceph-mon -c "$D/ceph.conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring" &&
  ceph-mon -c "$D/ceph.conf" -i a
} >>"$D/log/setup.log" 2>&1 || fail "the mon did not start (see $D/log)"
{
  $C auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' >> "$D/keyring" &&
  ceph-mgr -c "$D/ceph.conf" -i x &&
  KEY=$(ceph-authtool --gen-print-key) &&
  OSD=$(echo "{\"cephx_secret\": \"$KEY\"}" | $C osd new "$UUID" -i -) &&
  printf '[osd.%s]\n\tkey = %s\n' "$OSD" "$KEY" >> "$D/keyring" &&
  ceph-osd -c "$D/ceph.conf" -i "$OSD" --mkfs --osd-uuid "$UUID" &&
  ceph-osd -c "$D/ceph.conf" -i "$OSD" &&
  $C auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' >> "$D/keyring" &&
  for p in index data non-ec; do
    $C osd pool create default.rgw.buckets.$p 8 >/dev/null 2>&1
    $C osd pool application enable default.rgw.buckets.$p rgw >/dev/null || fail "cannot create the rgw pools"
  done &&
  radosgw -c "$D/ceph.conf" -n client.rgw.a &&
  radosgw-admin -c "$D/ceph.conf" user create --uid=bench --display-name=bench \
    --access-key=BENCHACCESS --secret=BENCHSECRET >/dev/null
} >>"$D/log/setup.log" 2>&1 || fail "the cluster did not come up (see $D/log)"
: > "$D/ready"
read -r _
killall_daemons
rm -rf -- "$D"
