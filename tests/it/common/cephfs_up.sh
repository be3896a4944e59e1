#!/bin/sh
# CephFS on the test cluster of ceph_up.sh: an MDS, the file system `cephfs`, and one ceph-fuse
# mount (its own client session: one "backup server") per name given, at MNT/NAME.
# Usage: cephfs_up.sh DIR MNT NAME... Ends 0 when every mount answers; ceph_up.sh's teardown
# unmounts them and kills the MDS and the ceph-fuse clients (their command lines name
# DIR/ceph.conf). A client that dies (a test kills its ceph-fuse) is evicted by the MDS after
# session_autoclose, here 30 s, the least Ceph accepts (its default is 300 s).
set -e
D=$1; MNT=$2; shift 2
C="ceph -c $D/ceph.conf"
for p in ceph-mds ceph-fuse; do
  command -v $p >/dev/null || { echo "ceph fixture: $p is missing: apt-get install --no-install-recommends $p" >&2; exit 1; }
done
if [ ! -e "$D/mds.a/keyring" ]; then
  mkdir -p "$D/mds.a"
  $C auth get-or-create mds.a mon 'allow profile mds' osd 'allow rw' mds 'allow' mgr 'allow profile mds' > "$D/mds.a/keyring"
  cat "$D/mds.a/keyring" >> "$D/keyring"
  $C osd pool create cephfs_meta 8 >/dev/null
  $C osd pool create cephfs_data 8 >/dev/null
  $C fs new cephfs cephfs_meta cephfs_data >/dev/null
  $C fs set cephfs session_timeout 30 >/dev/null
  $C fs set cephfs session_autoclose 30 >/dev/null
  ceph-mds -c "$D/ceph.conf" -i a
fi
i=0
until $C fs status cephfs 2>/dev/null | grep -q active; do
  i=$((i + 1)); [ $i -lt 240 ] || { echo "ceph fixture: the MDS did not become active" >&2; exit 1; }
  sleep 0.25
done
for n in "$@"; do
  mkdir -p "$MNT/$n"
  ceph-fuse -c "$D/ceph.conf" --pid-file "$D/run/ceph-fuse.$n.pid" "$MNT/$n" >>"$D/log/ceph-fuse.log" 2>&1
  mountpoint -q "$MNT/$n" || { echo "ceph fixture: ceph-fuse did not mount $MNT/$n (see $D/log)" >&2; exit 1; }
done
