#!/usr/bin/env bash
# The README's demo: back up a running (simulated) ESXi VM twice, list the archives, restore
# the VM to a new directory and register it, and verify the restored disks byte by byte. The
# chunked disks are read on the host by affa-agent, which --send-key installs on the datastore.
# It starts everything it needs itself, on 127.0.0.1, in a temp directory: a vSphere simulator
# (govmomi, with real snapshot delta disks added) and a private sshd serving its datastores.
# Nothing of the machine's own configuration (/etc/affa, /root/.ssh, the system sshd) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

need=(openssh-server openssh-client rsync golang-go golang-github-vmware-govmomi-dev curl file)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "== installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -d /run/sshd ] || { [ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd; } || true

echo "== building affa, its agent and the ESXi simulator"
# The static build the packages ship (scripts/static-env.sh; after scripts/test.sh, only the
# affa crates without the test hooks are compiled).
(. scripts/static-env.sh && cargo build --release --quiet --bin affa)
# The static agent affa installs on the host to read the frozen disks there (chunkTransport).
AGENT=$(./scripts/build-agent.sh --quiet)
(cd harness/esxi-sim && GO111MODULE=off GOPATH=/usr/share/gocode go build -o esxi-sim .)
AFFA=$REPO/target/x86_64-unknown-linux-gnu/release/affa
SIM=$REPO/harness/esxi-sim/esxi-sim

W=$(mktemp -d /tmp/affa-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mkdir -p "$W"/{etc,backup,state,ssh,ds1/demo-vm,ds2/demo-vm}
echo "== working in $W"

# A VM with two disks on two datastores: 512 MiB (sparse, some data) and 32 MiB.
python_free_fill() { # file size seed: write 8 MiB of pseudo-random data at three places
  truncate -s "$2" "$1"
  for off in 0 64 300; do
    head -c 8388608 /dev/urandom | dd of="$1" bs=1M seek="$off" conv=notrunc status=none
  done
}
python_free_fill "$W/ds1/demo-vm/demo-vm-flat.vmdk" $((512*1024*1024))
head -c $((32*1024*1024)) /dev/urandom > "$W/ds2/demo-vm/demo-vm_1-flat.vmdk"

# The simulated ESXi host. It and the sshd run in sessions of their own (setsid), as a real host
# does: a Ctrl-C typed during the demo reaches affa, which removes its snapshot, not the host.
cat > "$W/sim.json" <<JSON
{"user":"affa","password":"demo-Secret1","datastores":[{"name":"datastore1","dir":"$W/ds1"},{"name":"datastore2","dir":"$W/ds2"}],
 "vms":[{"name":"demo-vm","power_on":true,"disks":[{"datastore":"datastore1","size_bytes":$((512*1024*1024))},{"datastore":"datastore2","size_bytes":$((32*1024*1024))}]}]}
JSON
mkfifo "$W/sim.in"
setsid "$SIM" --config "$W/sim.json" < "$W/sim.in" > "$W/sim.out" 2> "$W/sim.log" &
pids+=($!)
exec 9> "$W/sim.in"   # the simulator exits when this closes
for _ in $(seq 100); do [ -s "$W/sim.out" ] && break; sleep 0.1; done
read -r START < "$W/sim.out"
API_PORT=$(sed -E 's/.*"url":"https:\/\/127\.0\.0\.1:([0-9]+)\/sdk".*/\1/' <<<"$START")
CONTROL=$(sed -E 's/.*"control":"([^"]+)".*/\1/' <<<"$START")
echo "== simulated ESXi host: https://127.0.0.1:$API_PORT/sdk"

# A private sshd on a free high port serving the same datastore paths, as an ESXi host does.
port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
SSH_PORT=$((20000 + RANDOM % 30000)); until port_free $SSH_PORT; do SSH_PORT=$((SSH_PORT+1)); done
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/admin"          # stands in for the root password
cp "$W/ssh/admin.pub" "$W/ssh/admin_keys"
cat > "$W/ssh/sshd_config" <<CFG
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $W/ssh/host_key
PidFile $W/ssh/sshd.pid
AuthorizedKeysFile $W/ssh/authorized_keys $W/ssh/admin_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
CFG
setsid /usr/sbin/sshd -D -e -f "$W/ssh/sshd_config" 2> "$W/ssh/sshd.log" &
pids+=($!)
for _ in $(seq 100); do port_free $SSH_PORT || break; sleep 0.1; done
eval "$(ssh-agent -s -a "$W/ssh/agent.sock")" >/dev/null; pids+=("$SSH_AGENT_PID")
ssh-add -q "$W/ssh/admin"

# affa's configuration: an ESXi job, as in /etc/affa, with every state directory in $W.
printf 'demo-Secret1\n' > "$W/etc/esxi.pw"; chmod 600 "$W/etc/esxi.pw"
cat > "$W/etc/demo.conf" <<CONF
[GlobalAffaConfig]
RootDir=$W/backup
agentBinary=$AGENT
lockDir=$W/state/lock
logDir=$W/state/log
sshDir=$W/state/ssh

[esxi-demo]
Description=demo VM on a simulated ESXi host
remoteHostName=127.0.0.1
sshPort=$SSH_PORT
remoteUser=$(id -un)
RemoteAuthorizedKeysFile=$W/ssh/authorized_keys
remoteRsyncBinary=$(command -v rsync)
ESXi=yes
ESXiVMName=demo-vm
ESXiUsername=affa
ESXiPasswordFile=$W/etc/esxi.pw
ESXiPort=$API_PORT
chunkFiles=*-flat.vmdk
scheduledKeep=2
CONF
chmod 600 "$W/etc/demo.conf"
export AFFA_CONFIG_DIR=$W/etc
run() { echo; echo "\$ affa $*"; "$AFFA" "$@"; }

run --configcheck
run --send-key esxi-demo --yes
unset SSH_AUTH_SOCK
# The VM keeps writing while it is backed up: 4 KiB at a random place of the whole 512 MiB disk
# every 5 ms. Between the two runs' snapshots that touches most of disk 0's 512 chunks of 1 MiB
# (n writes touch about 512*(1-e^(-n/512)) of them), so the second run's CBT names most of them:
# scattered writes, not a CBT fault (CBT names exactly the chunks that differ).
curl -fsS -X POST "$CONTROL/writer?vm=demo-vm&on=1&interval_ms=5&disk=0" > /dev/null
run --run esxi-demo
run --run esxi-demo
curl -fsS -X POST "$CONTROL/writer?vm=demo-vm&on=0" > /dev/null
run --list-archives esxi-demo
run --verify esxi-demo --all
run --full-restore esxi-demo scheduled.0 --to-dir demo-vm-restored --register demo-vm-restored --yes

echo
echo "== checking the restored disks against the archive"
"$AFFA" --unchunk esxi-demo scheduled.0 --to "$W/check" > /dev/null
ok=1
for pair in "ds1/demo-vm-restored/demo-vm-flat.vmdk vmfs/volumes/datastore1/demo-vm/demo-vm-flat.vmdk" \
            "ds2/demo-vm-restored/demo-vm_1-flat.vmdk vmfs/volumes/datastore2/demo-vm/demo-vm_1-flat.vmdk"; do
  set -- $pair
  a=$(sha256sum < "$W/$1" | cut -d' ' -f1); b=$(sha256sum < "$W/check/$2" | cut -d' ' -f1)
  if [ "$a" = "$b" ]; then echo "identical: $1"; else echo "DIFFERENT: $1"; ok=0; fi
done
# Ask the host as an administrator would: vim-cmd (the simulator's stand-in) lists snapshots.
vmid=$("$SIM" vim-cmd --control "$CONTROL" vmsvc/getallvms | awk '$2 == "demo-vm" {print $1}')
snaps=$("$SIM" vim-cmd --control "$CONTROL" vmsvc/snapshot.get "$vmid" | grep "Snapshot Name" || true)
[ -z "$snaps" ] && echo "no snapshot left on the VM" || { echo "snapshot left: $snaps"; ok=0; }
[ $ok = 1 ] && echo "== demo OK (files in $W)" || { echo "== demo FAILED (files in $W)"; exit 1; }
