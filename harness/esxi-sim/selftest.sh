#!/bin/bash
# Self-test of esxi-sim by hand: builds it, starts it on a temp dir, and
# drives it with curl (raw SOAP) + openssl s_client + the control API.
# Usage: ./selftest.sh            (exit 0 = all checks passed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
GO111MODULE=off GOPATH=/usr/share/gocode go build -o esxi-sim .

tmp=$(mktemp -d)
trap 'kill $simpid 2>/dev/null || true; rm -rf "$tmp"' EXIT
mkdir -p "$tmp/ds1" "$tmp/ds2" "$tmp/ds1/vm1"
# pre-filled base disk: 4 MiB of a known pattern
python3 -c "import sys; sys.stdout.buffer.write(bytes(range(256))*16384)" > "$tmp/ds1/vm1/vm1-flat.vmdk"
cat > "$tmp/spec.json" <<EOF
{"user":"affa","password":"s3cret","cert_file":"$tmp/cert.pem",
 "datastores":[{"name":"datastore1","dir":"$tmp/ds1"},{"name":"ds2","dir":"$tmp/ds2"}],
 "vms":[{"name":"vm1","power_on":true,"disks":[{"datastore":"datastore1","size_bytes":4194304},{"datastore":"ds2","size_bytes":1048576}]},
        {"name":"vm2","disks":[{"datastore":"ds2","size_bytes":1048576}]}]}
EOF
mkfifo "$tmp/in"
./esxi-sim --config "$tmp/spec.json" < "$tmp/in" > "$tmp/out" 2> "$tmp/log" &
simpid=$!
exec 9> "$tmp/in"          # keep stdin open; closing fd 9 makes it exit
for i in $(seq 50); do [ -s "$tmp/out" ] && break; sleep 0.1; done
line=$(head -1 "$tmp/out")
echo "start line: $line"
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
URL=$(echo "$line" | j 'd["url"]'); CTL=$(echo "$line" | j 'd["control"]'); TP=$(echo "$line" | j 'd["thumbprint"]')
hostport=${URL#https://}; hostport=${hostport%/sdk}
fail() { echo "FAIL: $*"; echo "--- log"; cat "$tmp/log"; exit 1; }
ok() { echo "ok: $*"; }

# TLS: the served certificate's SHA-256 is the announced thumbprint
fp=$(echo | openssl s_client -connect "$hostport" 2>/dev/null | openssl x509 -noout -fingerprint -sha256 | sed 's/.*=//')
[ "$fp" = "$TP" ] || fail "thumbprint $fp != $TP"; ok "thumbprint matches ($fp)"
openssl x509 -in "$tmp/cert.pem" -noout -text | grep -q "IP Address:127.0.0.1" || fail "no SAN 127.0.0.1"; ok "SAN IP 127.0.0.1"

env() { printf '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>' "$1"; }
soap() { curl -s --cacert "$tmp/cert.pem" -b "$tmp/jar" -c "$tmp/jar" -H 'Content-Type: text/xml; charset=utf-8' -H 'SOAPAction: "urn:vim25/6.5"' --data-binary "$(env "$1")" "$URL"; }
val() { sed -n "s/.*<$1[^>]*>\([^<]*\)<\/$1>.*/\1/p" | head -1; }

sc=$(soap '<RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></RetrieveServiceContent>')
echo "$sc" | grep -q "VMware ESXi" || fail "RetrieveServiceContent: $sc"; ok "RetrieveServiceContent"
bad=$(soap '<Login xmlns="urn:vim25"><_this type="SessionManager">ha-sessionmgr</_this><userName>affa</userName><password>wrong</password></Login>')
echo "$bad" | grep -q InvalidLogin || fail "wrong password accepted: $bad"; ok "wrong password refused"
good=$(soap '<Login xmlns="urn:vim25"><_this type="SessionManager">ha-sessionmgr</_this><userName>affa</userName><password>s3cret</password></Login>')
echo "$good" | grep -q "<userName>affa</userName>" || fail "login: $good"
grep -q vmware_soap_session "$tmp/jar" || fail "no vmware_soap_session cookie"; ok "login, cookie vmware_soap_session"

st() { curl -s "$CTL/state"; }
VMREF=$(st | j '[v for v in d["vms"] if v["name"]=="vm1"][0]["ref"]')
VMID=$(st | j '[v for v in d["vms"] if v["name"]=="vm1"][0]["vmid"]')

cv=$(soap '<CreateContainerView xmlns="urn:vim25"><_this type="ViewManager">ViewManager</_this><container type="Folder">ha-folder-root</container><type>VirtualMachine</type><recursive>true</recursive></CreateContainerView>')
view=$(echo "$cv" | val returnval)
props=$(soap "<RetrievePropertiesEx xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">ha-property-collector</_this><specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet><pathSet>config.files.vmPathName</pathSet><pathSet>config.hardware.device</pathSet><pathSet>layoutEx.file</pathSet><pathSet>snapshot</pathSet><pathSet>runtime.powerState</pathSet><pathSet>datastore</pathSet></propSet><objectSet><obj type=\"ContainerView\">$view</obj><skip>true</skip><selectSet xsi:type=\"TraversalSpec\"><name>v</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet></specSet><options></options></RetrievePropertiesEx>")
echo "$props" | grep -q '\[datastore1\] vm1/vm1.vmx' || fail "RetrievePropertiesEx: $props"; ok "ContainerView + RetrievePropertiesEx (VMs)"

# snapshot via the API
t=$(soap "<CreateSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">$VMREF</_this><name>BEXI-self</name><description>x</description><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>" | val returnval)
ti=$(soap "<RetrievePropertiesEx xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">ha-property-collector</_this><specSet><propSet><type>Task</type><pathSet>info</pathSet></propSet><objectSet><obj type=\"Task\">$t</obj></objectSet></specSet><options></options></RetrievePropertiesEx>")
echo "$ti" | grep -q "<state>success</state>" || fail "task info: $ti"; ok "CreateSnapshot_Task -> $t success"
[ -f "$tmp/ds1/vm1/vm1-000001.vmdk" ] && [ -f "$tmp/ds1/vm1/vm1-000001-delta.vmdk" ] && [ -f "$tmp/ds2/vm1/vm1_1-000001-delta.vmdk" ] || fail "delta files missing"
grep -q 'parentFileNameHint="vm1.vmdk"' "$tmp/ds1/vm1/vm1-000001.vmdk" || fail "delta descriptor"
grep -q 'scsi0:0.fileName = "vm1-000001.vmdk"' "$tmp/ds1/vm1/vm1.vmx" || fail ".vmx not rewritten"; ok "delta files, descriptor, .vmx"
[ "$(st | j '[v for v in d["vms"] if v["name"]=="vm1"][0]["current_backing"][0]')" = "[datastore1] vm1/vm1-000001.vmdk" ] || fail "backing"
frozen=$(sha256sum "$tmp/ds1/vm1/vm1-flat.vmdk" | cut -d' ' -f1)
[ "$(st | j '[v for v in d["vms"] if v["name"]=="vm1"][0]["last_snapshot_disk_sha256"][0]')" = "$frozen" ] || fail "recorded hash"; ok "backing switched, frozen hash recorded"

# writes while the snapshot exists go to the delta
printf 'HELLO-DELTA' | curl -s -X POST --data-binary @- "$CTL/write?vm=vm1&disk=0&offset=1000" | grep -q delta || fail "write not to delta"
[ "$(sha256sum "$tmp/ds1/vm1/vm1-flat.vmdk" | cut -d' ' -f1)" = "$frozen" ] || fail "base changed during snapshot"
curl -s -X POST "$CTL/writer?vm=vm1&on=1&interval_ms=2" > /dev/null; sleep 0.5; curl -s -X POST "$CTL/writer?vm=vm1&on=0" > /dev/null
[ "$(sha256sum "$tmp/ds1/vm1/vm1-flat.vmdk" | cut -d' ' -f1)" = "$frozen" ] || fail "base changed during snapshot (writer)"; ok "writes + writer hit the delta, base frozen"
want=$(curl -s "$CTL/hash?vm=vm1" | j 'd["current_sha256"][0]')

# vim-cmd view of it
./esxi-sim vim-cmd --control "$CTL" vmsvc/getallvms
./esxi-sim vim-cmd --control "$CTL" vmsvc/snapshot.get "$VMID"
./esxi-sim vim-cmd --control "$CTL" vmsvc/get.filelayout "$VMID" | grep -q 'vm1-000001.vmdk' || fail "filelayout"

# remove -> merge
SNAP=$(st | j '[v for v in d["vms"] if v["name"]=="vm1"][0]["snapshots"][0]["ref"]')
t=$(soap "<RemoveSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachineSnapshot\">$SNAP</_this><removeChildren>false</removeChildren></RemoveSnapshot_Task>" | val returnval)
[ -n "$t" ] || fail "RemoveSnapshot_Task"
[ ! -e "$tmp/ds1/vm1/vm1-000001-delta.vmdk" ] || fail "delta not deleted"
[ "$(sha256sum "$tmp/ds1/vm1/vm1-flat.vmdk" | cut -d' ' -f1)" = "$want" ] || fail "merge wrong"
dd if="$tmp/ds1/vm1/vm1-flat.vmdk" bs=1 skip=1000 count=11 2>/dev/null | grep -q HELLO-DELTA || fail "write lost"
grep -q 'scsi0:0.fileName = "vm1.vmdk"' "$tmp/ds1/vm1/vm1.vmx" || fail ".vmx not restored"; ok "RemoveSnapshot_Task merged the delta into the base"

# faults
curl -s -X POST "$CTL/fault?op=create&mode=fail&msg=boom" > /dev/null
t=$(soap "<CreateSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">$VMREF</_this><name>BEXI-f</name><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>" | val returnval)
ti=$(soap "<RetrievePropertiesEx xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">ha-property-collector</_this><specSet><propSet><type>Task</type><pathSet>info.state</pathSet><pathSet>info.error</pathSet></propSet><objectSet><obj type=\"Task\">$t</obj></objectSet></specSet><options></options></RetrievePropertiesEx>")
echo "$ti" | grep -q ">error<" && echo "$ti" | grep -q boom || fail "fail fault: $ti"; ok "injected create failure"
curl -s -X POST "$CTL/fault?op=create&mode=hang" > /dev/null
t=$(soap "<CreateSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">$VMREF</_this><name>BEXI-h</name><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>" | val returnval)
ti=$(soap "<RetrievePropertiesEx xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">ha-property-collector</_this><specSet><propSet><type>Task</type><pathSet>info.state</pathSet></propSet><objectSet><obj type=\"Task\">$t</obj></objectSet></specSet><options></options></RetrievePropertiesEx>")
echo "$ti" | grep -q ">running<" || fail "hang: $ti"; ok "injected create hang (task stays running)"
curl -s -X POST "$CTL/fault?op=all503&mode=fail" > /dev/null
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$tmp/cert.pem" --data-binary x "$URL")
[ "$code" = 503 ] || fail "503: $code"; ok "all503"
curl -s -X POST "$CTL/fault?op=clear" > /dev/null

# vim-cmd snapshots behave the same
./esxi-sim vim-cmd --control "$CTL" vmsvc/snapshot.create "$VMID" BEXI-vc desc 0 0
[ -f "$tmp/ds1/vm1/vm1-000001-delta.vmdk" ] || fail "vim-cmd snapshot made no delta"
printf 'VIMCMD' | curl -s -X POST --data-binary @- "$CTL/write?vm=vm1&disk=1&offset=0" > /dev/null
./esxi-sim vim-cmd --control "$CTL" vmsvc/snapshot.get "$VMID" | tee "$tmp/sg"
sid=$(sed -n 's/.*Snapshot Id *: *//p' "$tmp/sg" | head -1)
./esxi-sim vim-cmd --control "$CTL" vmsvc/snapshot.remove "$VMID" "$sid"
head -c 6 "$tmp/ds2/vm1/vm1_1-flat.vmdk" | grep -q VIMCMD || fail "vim-cmd remove did not merge"; ok "vim-cmd snapshot.create/get/remove"

# RegisterVM_Task of a copy
mkdir -p "$tmp/ds2/copy"
cp "$tmp/ds1/vm1/vm1.vmx" "$tmp/ds1/vm1/vm1.vmdk" "$tmp/ds1/vm1/vm1-flat.vmdk" "$tmp/ds1/vm1/vm1.nvram" "$tmp/ds2/copy/"
sed -i '/scsi0:1\./d' "$tmp/ds2/copy/vm1.vmx"
t=$(soap "<RegisterVM_Task xmlns=\"urn:vim25\"><_this type=\"Folder\">ha-folder-vm</_this><path>[ds2] copy/vm1.vmx</path><name>copy</name><asTemplate>false</asTemplate><pool type=\"ResourcePool\">ha-root-pool</pool></RegisterVM_Task>" | val returnval)
[ -n "$t" ] || fail "RegisterVM_Task"
[ "$(st | j '[v for v in d["vms"] if v["name"]=="copy"][0]["current_backing"][0]')" = "[ds2] copy/vm1.vmdk" ] || fail "registered VM has no disk"; ok "RegisterVM_Task, disks from .vmx"

# snapshots of the user's own: VMFSSPARSE deltas that a real reader (qemu-img) combines
VC="./esxi-sim vim-cmd --control $CTL"
$VC vmsvc/snapshot.create "$VMID" user1 "" 0 0 > /dev/null
printf 'AFTER-ONE' | curl -s -X POST --data-binary @- "$CTL/write?vm=vm1&disk=0&offset=5000" > /dev/null
$VC vmsvc/snapshot.create "$VMID" user2 "" 0 0 > /dev/null
printf 'AFTER-TWO-CROSSES-A-GRAIN' | curl -s -X POST --data-binary @- "$CTL/write?vm=vm1&disk=0&offset=2097140" > /dev/null
d=$tmp/ds1/vm1
[ "$(head -c 4 "$d/vm1-000002-delta.vmdk")" = COWD ] || fail "delta is not VMFSSPARSE (COWD)"
want=$(curl -s "$CTL/hash?vm=vm1" | j 'd["current_sha256"][0]')
qemu-img convert -f vmdk -O raw "$d/vm1-000002.vmdk" "$tmp/combined.raw" || fail "qemu-img cannot read the chain"
[ "$(sha256sum "$tmp/combined.raw" | cut -d' ' -f1)" = "$want" ] || fail "qemu-img's combined chain differs from the running disk"
grep -q 'snapshot1.displayName = "user2"' "$d/vm1.vmsd" || fail ".vmsd"
ok "user snapshots: COWD deltas, qemu-img reads the chain as the VM sees it"
mkdir -p "$tmp/ds1/chaincopy"
cp "$d"/vm1.vmx "$d"/vm1.vmsd "$d"/vm1-Snapshot*.vmsn "$d"/vm1.vmdk "$d"/vm1-flat.vmdk "$d"/vm1-00000[12]*.vmdk "$tmp/ds1/chaincopy/"
sed -i '/scsi0:1\./d' "$tmp/ds1/chaincopy/vm1.vmx"
t=$(soap "<RegisterVM_Task xmlns=\"urn:vim25\"><_this type=\"Folder\">ha-folder-vm</_this><path>[datastore1] chaincopy/vm1.vmx</path><name>chaincopy</name><asTemplate>false</asTemplate><pool type=\"ResourcePool\">ha-root-pool</pool></RegisterVM_Task>" | val returnval)
[ -n "$t" ] || fail "RegisterVM_Task of the chain copy"
[ "$(st | j '[v for v in d["vms"] if v["name"]=="chaincopy"][0]["current_backing"][0]')" = "[datastore1] chaincopy/vm1-000002.vmdk" ] || fail "registered chain: backing"
[ "$(st | j '" ".join(s["name"] for s in [v for v in d["vms"] if v["name"]=="chaincopy"][0]["snapshots"])')" = "user1 user2" ] || fail "registered chain: snapshots"
[ "$(curl -s "$CTL/hash?vm=chaincopy" | j 'd["current_sha256"][0]')" = "$want" ] || fail "registered chain: content"
ok "RegisterVM_Task of a VM with a chain: disks through the chain, snapshots from the .vmsd"
$VC vmsvc/snapshot.removeall "$VMID" > /dev/null
[ "$(sha256sum "$d/vm1-flat.vmdk" | cut -d' ' -f1)" = "$want" ] || fail "removeall did not merge the chain"
ok "removing the snapshots merges the chain into the base"

# Changed Block Tracking on vm2: enable, first stun starts tracking, a write, the next
# snapshot's QueryChangedDiskAreas reports the written 64 KiB block
VM2=$(st | j '[v for v in d["vms"] if v["name"]=="vm2"][0]["ref"]')
VM2ID=$(st | j '[v for v in d["vms"] if v["name"]=="vm2"][0]["vmid"]')
soap "<ReconfigVM_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">$VM2</_this><spec><changeTrackingEnabled>true</changeTrackingEnabled></spec></ReconfigVM_Task>" | grep -q returnval || fail "ReconfigVM_Task"
[ "$(curl -s "$CTL/cbt?vm=vm2" | j 'd["enabled"] and d["disks"][0]["change_id"]==""')" = True ] || fail "CBT on, not started"
$VC vmsvc/snapshot.create "$VM2ID" cbt1 "" 0 0 > /dev/null
id1=$(st | j '[v for v in d["vms"] if v["name"]=="vm2"][0]["snapshots"][0]["change_ids"][0]')
echo "$id1" | grep -Eq '^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/0$' || fail "changeId $id1"
printf 'CBT' | curl -s -X POST --data-binary @- "$CTL/write?vm=vm2&disk=0&offset=131082" > /dev/null
$VC vmsvc/snapshot.removeall "$VM2ID" > /dev/null
$VC vmsvc/snapshot.create "$VM2ID" cbt2 "" 0 0 > /dev/null
S2=$(st | j '[v for v in d["vms"] if v["name"]=="vm2"][0]["snapshots"][0]["ref"]')
q() { soap "<QueryChangedDiskAreas xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">$VM2</_this><snapshot type=\"VirtualMachineSnapshot\">$S2</snapshot><deviceKey>2000</deviceKey><startOffset>0</startOffset><changeId>$1</changeId></QueryChangedDiskAreas>"; }
q "$id1" | grep -q '<length>1048576</length><changedArea><start>131072</start><length>65536</length></changedArea></returnval>' || fail "QueryChangedDiskAreas: $(q "$id1")"
q "${id1%/0}/9" | grep -q 'FileFault' || fail "a changeId from after the snapshot: $(q "${id1%/0}/9")"
q "*" | grep -q '<changedArea><start>131072</start><length>65536</length></changedArea>' || fail "changeId *"
$VC vmsvc/snapshot.removeall "$VM2ID" > /dev/null
ok "CBT: changeId at the first stun, QueryChangedDiskAreas reports the written block"

soap '<Logout xmlns="urn:vim25"><_this type="SessionManager">ha-sessionmgr</_this></Logout>' > /dev/null
exec 9>&-                   # stdin EOF -> the simulator exits
for i in $(seq 50); do kill -0 $simpid 2>/dev/null || break; sleep 0.1; done
kill -0 $simpid 2>/dev/null && fail "did not exit on stdin EOF"
ok "exit on stdin EOF"
echo "ALL OK"
