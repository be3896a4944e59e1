package main

// Disks, snapshots (delta files), writes of the "running VM", consolidation.

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	mrand "math/rand"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

type Harness struct {
	spec   *Spec
	model  *simulator.Model
	client *vim25.Client

	mu     sync.Mutex // guards vms, faults, events, counters
	vms    map[types.ManagedObjectReference]*VMState
	dsDir  map[string]string
	faults Faults
	events []Event
	count  map[string]int

	cbtPageExtents int // most extents per QueryChangedDiskAreas answer (control /cbt?page=)
}

// Fault settings for one operation.
type OpFault struct {
	Mode    string  `json:"mode"`    // "", "fail", "hang"
	Seconds float64 `json:"seconds"` // hang: 0 = forever
	Then    string  `json:"then"`    // hang: "success" (default) or "fail" after Seconds
	Count   int     `json:"count"`   // how many more calls it applies to; -1 = until cleared
	Msg     string  `json:"msg"`
}

type Faults struct {
	Create   OpFault      `json:"create"`
	Remove   OpFault      `json:"remove"`
	All503   bool         `json:"all503"`
	ReadOnly bool         `json:"api_readonly"`
	Intrude  IntrudeFault `json:"intrude"`
	Cbt      CbtFault     `json:"cbt"`
}

// IntrudeFault: someone else changes the snapshot tree while a backup's snapshot exists.
// Seconds after the next successful snapshot creation on a VM, a snapshot Name is taken on
// that VM (Action "create") or the snapshot Name is removed (Action "remove").
type IntrudeFault struct {
	Action  string  `json:"action"`
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

type Event struct {
	Time   time.Time `json:"time"`
	Op     string    `json:"op"`
	VM     string    `json:"vm"`
	Name   string    `json:"name,omitempty"`
	Via    string    `json:"via"`
	Result string    `json:"result"`
}

type VMState struct {
	mu         sync.Mutex // guards disks data/layers and snapshots
	Name       string
	Ref        types.ManagedObjectReference
	vm         *simulator.VirtualMachine
	Disks      []*Disk
	Snaps      []*Snap
	nextSnapID int32
	Tools      bool
	VmxLocal   string
	VmxDs      string
	GuestID    string
	Annotation string

	AdoptErrors            []string // what did not fit when a registered VM was read from its files
	LastSnapshotHashes     []string // logical content of each disk frozen by the last snapshot created
	LastSnapshotFlatHashes []string // base -flat.vmdk files at that moment
	writer                 *writer
	Writes                 int64
	WritesDuringSnapshot   int64

	CbtEnabled     bool // config.changeTrackingEnabled; tracking starts at the next stun
	CbtUnsupported bool // capability.changeTrackingSupported = false (control /cbt?supported=0)
}

type Disk struct {
	Index     int
	Key       int32
	Unit      int32
	Datastore string
	Dir       string // local directory holding the files
	RelDir    string // directory relative to the datastore
	Size      int64
	Layers    []*Layer // [0] = base (flat), [k] = delta created by snapshot k
	Cbt       *cbtDisk // nil: not tracked (CBT off, or not started yet), see cbt.go
}

type Layer struct {
	Base       string // file base name without .vmdk, e.g. "vm1" or "vm1-000001"
	DsPath     string // "[ds] vm1/vm1.vmdk"
	Descriptor string // local path
	Data       string // local path of -flat.vmdk / -delta.vmdk (VMFSSPARSE, see cowd.go)
	CID        string
	Uuid       string
	cow_       *cowd // the open delta extent (deltas only), see cow()
}

// cow opens the layer's delta extent once (call with the VM's lock held).
func (l *Layer) cow() (*cowd, error) {
	if l.cow_ == nil {
		c, err := openCOWD(l.Data)
		if err != nil {
			return nil, err
		}
		l.cow_ = c
	}
	return l.cow_, nil
}

// deltaBytes is what a delta layer holds (allocated grains), 0 for a base.
func (l *Layer) deltaBytes() int64 {
	c, err := l.cow()
	if err != nil {
		return 0
	}
	g, err := c.allocated()
	if err != nil {
		return 0
	}
	return int64(len(g)) * c.grainBytes()
}

type Snap struct {
	ID          int32
	Ref         types.ManagedObjectReference
	Name        string
	Description string
	Created     time.Time
	State       types.VirtualMachinePowerState
	Quiesced    bool
	Vmsn        string // local path
	Vmem        string
	DiskSha256  []string
	FlatSha256  []string
	ChangeIDs   []string // per disk, the changeId the snapshot froze ("" = not tracked)
}

func newHarness(spec *Spec, model *simulator.Model, client *vim25.Client) *Harness {
	return &Harness{spec: spec, model: model, client: client, cbtPageExtents: spec.CbtPageExtents,
		vms: map[types.ManagedObjectReference]*VMState{}, dsDir: map[string]string{}, count: map[string]int{}}
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func vmdkUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	var parts []string
	for _, x := range b {
		parts = append(parts, fmt.Sprintf("%02x", x))
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

func descriptorField(text, key string) string {
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, key+"=") {
			return strings.Trim(strings.TrimPrefix(line, key+"="), "\"")
		}
	}
	return ""
}

func baseDescriptor(base string, size int64, cid string) string {
	sectors := size / 512
	cyl := sectors / (255 * 63)
	if cyl < 1 {
		cyl = 1
	}
	return fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%s
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.deletable = "true"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "%s"
ddb.thinProvisioned = "1"
ddb.uuid = "%s"
ddb.virtualHWVersion = "13"
`, cid, sectors, base, cyl, randHex(16), vmdkUUID())
}

func deltaDescriptor(base string, size int64, cid, parentCID, parentHint string) string {
	return fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%s
parentCID=%s
createType="vmfsSparse"
parentFileNameHint="%s"
# Extent description
RW %d VMFSSPARSE "%s-delta.vmdk"

# The Disk Data Base
#DDB

ddb.grain = "1"
ddb.longContentID = "%s"
`, cid, parentCID, parentHint, size/512, base, randHex(16))
}

func vmxfText(name string) string {
	return fmt.Sprintf(`<?xml version="1.0"?>
<Foundry>
<VM>
<VMId type="string">52 %s</VMId>
<ClientMetaData>
<clientMetaDataAttributes/>
<HistoryEventList/></ClientMetaData>
<vmxPathName type="string">%s.vmx</vmxPathName></VM></Foundry>
`, randHex(7), name)
}

// vmxFileName is the value of scsi0:N.fileName for a layer of a disk.
func (st *VMState) vmxFileName(d *Disk, l *Layer) string {
	if filepath.Dir(st.VmxLocal) == d.Dir {
		return l.Base + ".vmdk"
	}
	return filepath.Join(d.Dir, l.Base+".vmdk")
}

func (h *Harness) vmxText(st *VMState, memMB int32) string {
	var b strings.Builder
	w := func(k, v string) { fmt.Fprintf(&b, "%s = \"%s\"\n", k, v) }
	w(".encoding", "UTF-8")
	w("config.version", "8")
	w("virtualHW.version", "13")
	w("nvram", st.Name+".nvram")
	w("pciBridge0.present", "TRUE")
	w("svga.present", "TRUE")
	w("displayName", st.Name)
	gos := strings.TrimSuffix(strings.ToLower(st.GuestID), "guest")
	if strings.HasSuffix(gos, "64") && !strings.HasSuffix(gos, "-64") && !strings.HasSuffix(gos, "_64") {
		gos = strings.TrimSuffix(gos, "64") + "-64"
	}
	w("guestOS", gos)
	w("memSize", strconv.Itoa(int(memMB)))
	w("numvcpus", "1")
	w("scsi0.virtualDev", "lsilogic")
	w("scsi0.present", "TRUE")
	for _, d := range st.Disks {
		n := fmt.Sprintf("scsi0:%d", d.Unit)
		w(n+".deviceType", "scsi-hardDisk")
		w(n+".fileName", st.vmxFileName(d, d.Layers[len(d.Layers)-1]))
		w(n+".present", "TRUE")
	}
	if st.Annotation != "" {
		w("annotation", st.Annotation)
	}
	w("uuid.bios", vmdkUUID())
	w("vc.uuid", vmdkUUID())
	w("tools.syncTime", "FALSE")
	return b.String()
}

var vmxFileNameRe = regexp.MustCompile(`^(\s*)(scsi\d+:\d+)\.fileName\s*=`)

// rewriteVmx points scsiX:Y.fileName at each disk's current layer.
func (h *Harness) rewriteVmx(st *VMState) {
	raw, err := ioutil.ReadFile(st.VmxLocal)
	if err != nil {
		return
	}
	lines := strings.Split(string(raw), "\n")
	for i, line := range lines {
		m := vmxFileNameRe.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		for _, d := range st.Disks {
			if m[2] == fmt.Sprintf("scsi0:%d", d.Unit) {
				lines[i] = fmt.Sprintf("%s%s.fileName = \"%s\"", m[1], m[2], st.vmxFileName(d, d.Layers[len(d.Layers)-1]))
			}
		}
	}
	_ = writeFileAtomic(st.VmxLocal, []byte(strings.Join(lines, "\n")))
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".esxi-sim-tmp"
	if err := ioutil.WriteFile(tmp, data, 0644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func (h *Harness) rewriteVmsd(st *VMState) {
	p := strings.TrimSuffix(st.VmxLocal, ".vmx") + ".vmsd"
	var b strings.Builder
	w := func(k, v string) { fmt.Fprintf(&b, "%s = \"%s\"\n", k, v) }
	w(".encoding", "UTF-8")
	if len(st.Snaps) > 0 {
		w("snapshot.lastUID", strconv.Itoa(int(st.nextSnapID)))
		w("snapshot.current", strconv.Itoa(int(st.Snaps[len(st.Snaps)-1].ID)))
		for i, s := range st.Snaps {
			p := fmt.Sprintf("snapshot%d", i)
			w(p+".uid", strconv.Itoa(int(s.ID)))
			w(p+".filename", filepath.Base(s.Vmsn))
			if i > 0 {
				w(p+".parent", strconv.Itoa(int(st.Snaps[i-1].ID)))
			}
			w(p+".displayName", s.Name)
			w(p+".description", s.Description)
			us := s.Created.UnixNano() / 1000
			w(p+".createTimeHigh", strconv.FormatInt(us>>32, 10))
			w(p+".createTimeLow", strconv.FormatInt(int64(int32(us)), 10))
			w(p+".numDisks", strconv.Itoa(len(st.Disks)))
			for j, d := range st.Disks {
				w(fmt.Sprintf("%s.disk%d.fileName", p, j), st.vmxFileName(d, d.Layers[i]))
				w(fmt.Sprintf("%s.disk%d.node", p, j), fmt.Sprintf("scsi0:%d", d.Unit))
			}
		}
		w("snapshot.numSnapshots", strconv.Itoa(len(st.Snaps)))
	}
	_ = writeFileAtomic(p, []byte(b.String()))
}

// ---- data path ----

func (h *Harness) writeDisk(st *VMState, di int, off int64, data []byte) (string, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if di < 0 || di >= len(st.Disks) {
		return "", fmt.Errorf("no disk %d", di)
	}
	d := st.Disks[di]
	if off < 0 || off+int64(len(data)) > d.Size {
		return "", fmt.Errorf("write [%d,+%d) outside disk of %d bytes", off, len(data), d.Size)
	}
	top := d.Layers[len(d.Layers)-1]
	if len(d.Layers) == 1 {
		f, err := os.OpenFile(top.Data, os.O_WRONLY, 0)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if _, err := f.WriteAt(data, off); err != nil {
			return "", err
		}
	} else {
		if err := writeDelta(d, off, data); err != nil {
			return "", err
		}
		st.WritesDuringSnapshot++
	}
	h.cbtRecordLocked(st, d, off, int64(len(data)))
	st.Writes++
	return filepath.Base(top.Data), nil
}

// writeDelta writes to the top (delta) layer of d: whole grains as they are, the grains a write
// covers only in part completed from the layers below first (copy on write).
func writeDelta(d *Disk, off int64, data []byte) error {
	L := len(d.Layers) - 1
	c, err := d.Layers[L].cow()
	if err != nil {
		return err
	}
	gb := c.grainBytes()
	g0 := off / gb
	g1 := (off + int64(len(data)) + gb - 1) / gb
	buf := make([]byte, (g1-g0)*gb)
	head, tail := off-g0*gb, g1*gb-(off+int64(len(data)))
	if head > 0 || tail > 0 {
		// Only the first and last grain can be partial: read what they hold now.
		for _, g := range []int64{g0, g1 - 1} {
			part := buf[(g-g0)*gb : (g-g0+1)*gb]
			if err := readLogical(d, L+1, g*gb, part); err != nil {
				return err
			}
		}
	}
	copy(buf[head:], data)
	return c.writeGrains(g0, buf)
}

// readLogical reads the disk content as seen through layers [0, upto).
func readLogical(d *Disk, upto int, off int64, buf []byte) error {
	base, err := os.Open(d.Layers[0].Data)
	if err != nil {
		return err
	}
	defer base.Close()
	n, err := base.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	for k := 1; k < upto && k < len(d.Layers); k++ {
		c, err := d.Layers[k].cow()
		if err != nil {
			return err
		}
		if err := c.overlay(off, buf); err != nil {
			return err
		}
	}
	return nil
}

func hashLogical(d *Disk, upto int) (string, error) {
	hsh := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < d.Size; off += int64(len(buf)) {
		b := buf
		if rem := d.Size - off; rem < int64(len(b)) {
			b = b[:rem]
		}
		if err := readLogical(d, upto, off, b); err != nil {
			return "", err
		}
		hsh.Write(b)
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hsh := sha256.New()
	if _, err := io.Copy(hsh, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

// ---- snapshot create / remove (shared by the SOAP path and vim-cmd) ----

func (h *Harness) hashOnSnapshot() bool {
	return h.spec.HashOnSnapshot == nil || *h.spec.HashOnSnapshot
}

// createSnapshot does the host's work of CreateSnapshot_Task.
func (h *Harness) createSnapshot(st *VMState, name, desc string, memory, quiesce bool) (*Snap, types.BaseMethodFault, string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	power := st.vm.Runtime.PowerState
	if quiesce && power == types.VirtualMachinePowerStatePoweredOn && !st.Tools {
		msg := "Cannot create a quiesced snapshot because the create snapshot operation exceeded the time limit for holding off I/O in the frozen virtual machine."
		return nil, &types.ToolsUnavailable{}, msg
	}
	if len(st.Snaps) >= 31 {
		return nil, &types.SnapshotFault{}, "Exceeded the maximum number of permitted snapshots."
	}
	snap := &Snap{Name: name, Description: desc, Created: time.Now(), State: power, Quiesced: quiesce && power == types.VirtualMachinePowerStatePoweredOn}
	// Frozen content, before anything is switched.
	if h.hashOnSnapshot() {
		for _, d := range st.Disks {
			lh, err := hashLogical(d, len(d.Layers))
			if err != nil {
				return nil, &types.FileFault{File: d.Layers[0].Data}, err.Error()
			}
			fh := lh
			if len(d.Layers) > 1 {
				if fh, err = hashFile(d.Layers[0].Data); err != nil {
					return nil, &types.FileFault{File: d.Layers[0].Data}, err.Error()
				}
			}
			snap.DiskSha256 = append(snap.DiskSha256, lh)
			snap.FlatSha256 = append(snap.FlatSha256, fh)
		}
	}
	// Delta per disk, next to its parent.
	var created []string
	undo := func() {
		for _, p := range created {
			os.Remove(p)
		}
	}
	var newLayers []*Layer
	for _, d := range st.Disks {
		parent := d.Layers[len(d.Layers)-1]
		root := d.Layers[0].Base
		var base string
		for n := 1; ; n++ {
			base = fmt.Sprintf("%s-%06d", root, n)
			if _, err := os.Stat(filepath.Join(d.Dir, base+".vmdk")); os.IsNotExist(err) {
				if _, err := os.Stat(filepath.Join(d.Dir, base+"-delta.vmdk")); os.IsNotExist(err) {
					break
				}
			}
		}
		l := &Layer{Base: base, DsPath: fmt.Sprintf("[%s] %s/%s.vmdk", d.Datastore, d.RelDir, base),
			Descriptor: filepath.Join(d.Dir, base+".vmdk"), Data: filepath.Join(d.Dir, base+"-delta.vmdk"), CID: randHex(4), Uuid: vmdkUUID()}
		if err := createCOWD(l.Data, d.Size, parent.Base+".vmdk"); err != nil {
			undo()
			return nil, &types.FileFault{File: l.Data}, err.Error()
		}
		created = append(created, l.Data)
		if err := ioutil.WriteFile(l.Descriptor, []byte(deltaDescriptor(base, d.Size, l.CID, parent.CID, parent.Base+".vmdk")), 0644); err != nil {
			undo()
			return nil, &types.FileFault{File: l.Descriptor}, err.Error()
		}
		created = append(created, l.Descriptor)
		newLayers = append(newLayers, l)
	}
	st.nextSnapID++
	snap.ID = st.nextSnapID
	vmdir := filepath.Dir(st.VmxLocal)
	snap.Vmsn = filepath.Join(vmdir, fmt.Sprintf("%s-Snapshot%d.vmsn", st.Name, snap.ID))
	// A host keeps the VM's configuration at the snapshot in the .vmsn (with more state).
	vmx, _ := ioutil.ReadFile(st.VmxLocal)
	_ = ioutil.WriteFile(snap.Vmsn, append([]byte("esxi-sim snapshot state "+name+"\n"), vmx...), 0644)
	if memory && power == types.VirtualMachinePowerStatePoweredOn {
		snap.Vmem = filepath.Join(vmdir, fmt.Sprintf("%s-Snapshot%d.vmem", st.Name, snap.ID))
		_ = ioutil.WriteFile(snap.Vmem, []byte("esxi-sim memory image\n"), 0644)
	}
	// A stun: CBT starts here if enabled since, or begins a new generation; the snapshot keeps
	// the frozen disks (backing and changeId as they are now) in its configuration.
	h.cbtStunLocked(st)
	snap.ChangeIDs = st.cbtChangeIDs()
	frozen := map[int32]*types.VirtualDiskFlatVer2BackingInfo{}
	for i, d := range st.Disks {
		frozen[d.Key] = h.backingFor(d, len(d.Layers), snap.ChangeIDs[i])
		d.Layers = append(d.Layers, newLayers[i])
	}
	st.Snaps = append(st.Snaps, snap)
	st.LastSnapshotHashes = snap.DiskSha256
	st.LastSnapshotFlatHashes = snap.FlatSha256

	// Managed object side.
	so := &simulator.VirtualMachineSnapshot{}
	so.Vm = st.Ref
	simulator.Map.WithLock(st.vm, func() {
		cfg := *st.vm.Config
		cfg.Hardware.Device = nil
		for _, dev := range st.vm.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok && frozen[vd.Key] != nil {
				c := *vd
				c.Backing = frozen[vd.Key]
				dev = &c
			}
			cfg.Hardware.Device = append(cfg.Hardware.Device, dev)
		}
		so.Config = cfg
	})
	simulator.Map.Put(so)
	snap.Ref = so.Self
	h.rewriteVmx(st)
	h.rewriteVmsd(st)
	simulator.Map.WithLock(st.vm, func() { h.syncVMLocked(st) })
	return snap, nil, ""
}

// removeSnapshot does the host's work of RemoveSnapshot_Task: the delta of
// the removed snapshot is merged into its parent layer.
func (h *Harness) removeSnapshot(st *VMState, ref types.ManagedObjectReference, removeChildren bool) (types.BaseMethodFault, string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	k := -1
	for i, s := range st.Snaps {
		if s.Ref == ref {
			k = i
		}
	}
	if k < 0 {
		return &types.NotFound{}, "The object or item referred to could not be found."
	}
	// snapshot index k (0-based) created layer k+1.
	last := k
	if removeChildren {
		last = len(st.Snaps) - 1
	}
	for j := last; j >= k; j-- {
		if err := h.mergeLayerDown(st, j+1); err != nil {
			return &types.FileFault{}, err.Error()
		}
		s := st.Snaps[j]
		os.Remove(s.Vmsn)
		if s.Vmem != "" {
			os.Remove(s.Vmem)
		}
		st.Snaps = append(st.Snaps[:j], st.Snaps[j+1:]...)
		simulator.Map.Remove(s.Ref)
	}
	h.cbtStunLocked(st)
	h.rewriteVmx(st)
	h.rewriteVmsd(st)
	simulator.Map.WithLock(st.vm, func() { h.syncVMLocked(st) })
	return nil, ""
}

// mergeLayerDown merges layer L (>=1) of every disk into layer L-1 and drops it.
func (h *Harness) mergeLayerDown(st *VMState, L int) error {
	for _, d := range st.Disks {
		if L >= len(d.Layers) || L < 1 {
			return fmt.Errorf("disk %d has no layer %d", d.Index, L)
		}
		src, dst := d.Layers[L], d.Layers[L-1]
		if err := mergeInto(src, dst, L-1 == 0); err != nil {
			return err
		}
		src.cow_.Close()
		os.Remove(src.Data)
		os.Remove(src.Descriptor)
		d.Layers = append(d.Layers[:L], d.Layers[L+1:]...)
		// The layer above (if any) now has dst as parent.
		if L < len(d.Layers) {
			up := d.Layers[L]
			_ = ioutil.WriteFile(up.Descriptor, []byte(deltaDescriptor(up.Base, d.Size, up.CID, dst.CID, dst.Base+".vmdk")), 0644)
		}
	}
	return nil
}

// mergeInto copies every grain of the delta src into dst (the base flat file, or a delta).
func mergeInto(src, dst *Layer, dstFlat bool) error {
	c, err := src.cow()
	if err != nil {
		return err
	}
	grains, err := c.allocated()
	if err != nil {
		return err
	}
	gb := c.grainBytes()
	var out *os.File
	var dc *cowd
	if dstFlat {
		if out, err = os.OpenFile(dst.Data, os.O_WRONLY, 0); err != nil {
			return err
		}
		defer out.Close()
	} else if dc, err = dst.cow(); err != nil {
		return err
	}
	buf := make([]byte, 0, 1<<20)
	flush := func(first int64) error {
		if len(buf) == 0 {
			return nil
		}
		var err error
		if dstFlat {
			_, err = out.WriteAt(buf, first*gb)
		} else {
			err = dc.writeGrains(first, buf)
		}
		buf = buf[:0]
		return err
	}
	first := int64(-1)
	for i, g := range grains {
		if i == 0 || g != grains[i-1]+1 || int64(len(buf))+gb > int64(cap(buf)) {
			if err := flush(first); err != nil {
				return err
			}
			first = g
		}
		n := len(buf)
		buf = buf[:n+int(gb)]
		if err := c.overlay(g*gb, buf[n:]); err != nil {
			return err
		}
	}
	if err := flush(first); err != nil {
		return err
	}
	if dstFlat {
		return out.Sync()
	}
	return dc.sync()
}

// ---- managed object sync (call with the VM's Map lock held) ----

// backingFor is the backing chain of layers [0, upto); the top one carries changeID.
func (h *Harness) backingFor(d *Disk, upto int, changeID string) *types.VirtualDiskFlatVer2BackingInfo {
	var b *types.VirtualDiskFlatVer2BackingInfo
	ds := h.dsRef(d.Datastore)
	for k := 0; k < upto; k++ {
		l := d.Layers[k]
		nb := &types.VirtualDiskFlatVer2BackingInfo{
			VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: l.DsPath, Datastore: &ds},
			DiskMode:                     string(types.VirtualDiskModePersistent),
			ThinProvisioned:              types.NewBool(true),
			EagerlyScrub:                 types.NewBool(false),
			WriteThrough:                 types.NewBool(false),
			Split:                        types.NewBool(false),
			DigestEnabled:                types.NewBool(false),
			Uuid:                         l.Uuid,
			ContentId:                    l.CID,
			Parent:                       b,
		}
		if k == upto-1 {
			nb.ChangeId = changeID
		}
		if k > 0 {
			nb.DeltaDiskFormat = string(types.VirtualDiskDeltaDiskFormatRedoLogFormat)
			nb.DeltaGrainSize = 512
		}
		b = nb
	}
	return b
}

func (h *Harness) syncVMLocked(st *VMState) {
	vm := st.vm
	devs := vm.Config.Hardware.Device
	for _, dev := range devs {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		for _, d := range st.Disks {
			if d.Key == vd.Key {
				id := ""
				if d.Cbt != nil {
					id = d.Cbt.changeID()
				}
				vd.Backing = h.backingFor(d, len(d.Layers), id)
			}
		}
	}
	var info *types.VirtualMachineSnapshotInfo
	if len(st.Snaps) > 0 {
		var tree []types.VirtualMachineSnapshotTree
		for i := len(st.Snaps) - 1; i >= 0; i-- {
			s := st.Snaps[i]
			t := types.VirtualMachineSnapshotTree{
				Snapshot: s.Ref, Vm: st.Ref, Name: s.Name, Description: s.Description, Id: s.ID,
				CreateTime: s.Created, State: s.State, Quiesced: s.Quiesced, ReplaySupported: types.NewBool(false),
				ChildSnapshotList: tree,
			}
			tree = []types.VirtualMachineSnapshotTree{t}
		}
		cur := st.Snaps[len(st.Snaps)-1].Ref
		info = &types.VirtualMachineSnapshotInfo{CurrentSnapshot: &cur, RootSnapshotList: tree}
	}
	vm.Snapshot = info
	// Child refs on the snapshot objects.
	for i, s := range st.Snaps {
		if so, ok := simulator.Map.Get(s.Ref).(*simulator.VirtualMachineSnapshot); ok {
			so.ChildSnapshot = nil
			if i+1 < len(st.Snaps) {
				so.ChildSnapshot = []types.ManagedObjectReference{st.Snaps[i+1].Ref}
			}
		}
	}
	h.refreshLayoutLocked(st)
	changes := []types.PropertyChange{
		{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
		{Name: "layout", Val: vm.Layout},
		{Name: "layoutEx", Val: vm.LayoutEx},
	}
	if info == nil {
		changes = append(changes, types.PropertyChange{Name: "snapshot", Val: nil})
	} else {
		changes = append(changes, types.PropertyChange{Name: "snapshot", Val: info},
			types.PropertyChange{Name: "rootSnapshot", Val: st.snapRefs()})
	}
	simulator.Map.Update(vm, changes)
	if info == nil {
		vm.RootSnapshot = nil
		vm.Snapshot = nil
	}
}

func (st *VMState) snapRefs() []types.ManagedObjectReference {
	if len(st.Snaps) == 0 {
		return nil
	}
	return []types.ManagedObjectReference{st.Snaps[0].Ref}
}

func fileType(name string) string {
	ext := filepath.Ext(name)
	stem := strings.TrimSuffix(name, ext)
	switch ext {
	case ".vmx":
		return "config"
	case ".vmxf":
		return "extendedConfig"
	case ".vmsd":
		return "snapshotList"
	case ".vmsn":
		return "snapshotData"
	case ".vmem":
		return "snapshotMemory"
	case ".nvram":
		return "nvram"
	case ".log":
		return "log"
	case ".vswp":
		return "swap"
	case ".vmdk":
		for _, s := range []string{"-flat", "-delta", "-sesparse", "-s", "-rdm", "-rdmp"} {
			if strings.HasSuffix(stem, s) {
				return "diskExtent"
			}
		}
		return "diskDescriptor"
	}
	return ""
}

// refreshLayoutLocked rebuilds layout and layoutEx from the files on disk and
// the disk chains, the way hostd reports them.
func (h *Harness) refreshLayoutLocked(st *VMState) {
	vm := st.vm
	vmdir := filepath.Dir(st.VmxLocal)
	vmxDs := st.VmxDs
	dsName := strings.TrimPrefix(strings.SplitN(vmxDs, "]", 2)[0], "[")
	relDir := filepath.Dir(strings.TrimSpace(strings.SplitN(vmxDs, "]", 2)[1]))
	var files []types.VirtualMachineFileLayoutExFileInfo
	keyOf := map[string]int32{}
	add := func(dsPath, local string) int32 {
		if k, ok := keyOf[dsPath]; ok {
			return k
		}
		fi, err := os.Stat(local)
		if err != nil {
			return -1
		}
		k := int32(len(files))
		files = append(files, types.VirtualMachineFileLayoutExFileInfo{
			Key: k, Name: dsPath, Type: fileType(filepath.Base(local)), Size: fi.Size(), UniqueSize: fi.Size(), Accessible: types.NewBool(true),
		})
		keyOf[dsPath] = k
		return k
	}
	// Config-ish files of the VM directory (not the disks, added below).
	ents, _ := ioutil.ReadDir(vmdir)
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || strings.HasSuffix(n, ".vmdk") || strings.HasSuffix(n, ".esxi-sim-tmp") || strings.HasSuffix(n, ".lck") {
			continue
		}
		if fileType(n) == "" {
			continue
		}
		add(fmt.Sprintf("[%s] %s/%s", dsName, relDir, n), filepath.Join(vmdir, n))
	}
	var diskEx []types.VirtualMachineFileLayoutExDiskLayout
	var diskL []types.VirtualMachineFileLayoutDiskLayout
	chainKeys := map[int32][]types.VirtualMachineFileLayoutExDiskUnit{}
	for _, d := range st.Disks {
		var chain []types.VirtualMachineFileLayoutExDiskUnit
		var names []string
		for _, l := range d.Layers {
			dk := add(l.DsPath, l.Descriptor)
			ek := add(dsDirPrefix(l.DsPath)+filepath.Base(l.Data), l.Data)
			var keys []int32
			for _, k := range []int32{dk, ek} {
				if k >= 0 {
					keys = append(keys, k)
				}
			}
			chain = append(chain, types.VirtualMachineFileLayoutExDiskUnit{FileKey: keys})
			names = append([]string{l.DsPath}, names...)
		}
		chainKeys[d.Key] = chain
		diskEx = append(diskEx, types.VirtualMachineFileLayoutExDiskLayout{Key: d.Key, Chain: chain})
		diskL = append(diskL, types.VirtualMachineFileLayoutDiskLayout{Key: d.Key, DiskFile: names})
	}
	var snapEx []types.VirtualMachineFileLayoutExSnapshotLayout
	var snapL []types.VirtualMachineFileLayoutSnapshotLayout
	for i, s := range st.Snaps {
		vmsn := fmt.Sprintf("[%s] %s/%s", dsName, relDir, filepath.Base(s.Vmsn))
		dk := add(vmsn, s.Vmsn)
		mk := int32(-1)
		if s.Vmem != "" {
			mk = add(fmt.Sprintf("[%s] %s/%s", dsName, relDir, filepath.Base(s.Vmem)), s.Vmem)
		}
		var dl []types.VirtualMachineFileLayoutExDiskLayout
		sfiles := []string{vmsn}
		for _, d := range st.Disks {
			dl = append(dl, types.VirtualMachineFileLayoutExDiskLayout{Key: d.Key, Chain: chainKeys[d.Key][:i+1]})
			for k := i; k >= 0; k-- {
				sfiles = append(sfiles, d.Layers[k].DsPath)
			}
		}
		snapEx = append(snapEx, types.VirtualMachineFileLayoutExSnapshotLayout{Key: s.Ref, DataKey: dk, MemoryKey: mk, Disk: dl})
		snapL = append(snapL, types.VirtualMachineFileLayoutSnapshotLayout{Key: s.Ref, SnapshotFile: sfiles})
	}
	var cfg, logs []string
	for _, f := range files {
		base := strings.SplitN(f.Name, "/", 2)
		short := base[len(base)-1]
		switch f.Type {
		case "nvram", "snapshotList", "extendedConfig":
			cfg = append(cfg, short)
		case "log":
			logs = append(logs, short)
		}
	}
	vm.LayoutEx = &types.VirtualMachineFileLayoutEx{File: files, Disk: diskEx, Snapshot: snapEx, Timestamp: time.Now()}
	vm.Layout = &types.VirtualMachineFileLayout{ConfigFile: cfg, LogFile: logs, Disk: diskL, Snapshot: snapL}
}

// ---- writer ----

type writer struct {
	stop     chan struct{}
	done     chan struct{}
	interval time.Duration
	disk     int
	count    int64
	errors   int64
	lastErr  string
}

func (h *Harness) startWriter(st *VMState, interval time.Duration, disk int, block int) {
	h.stopWriter(st)
	w := &writer{stop: make(chan struct{}), done: make(chan struct{}), interval: interval, disk: disk}
	st.mu.Lock()
	st.writer = w
	st.mu.Unlock()
	go func() {
		defer close(w.done)
		rng := mrand.New(mrand.NewSource(time.Now().UnixNano()))
		buf := make([]byte, block)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
			}
			di := disk
			if di < 0 {
				di = rng.Intn(len(st.Disks))
			}
			size := st.Disks[di].Size
			if size < int64(block) {
				continue
			}
			off := rng.Int63n((size-int64(block))/512+1) * 512
			rng.Read(buf)
			if _, err := h.writeDisk(st, di, off, buf); err != nil {
				w.errors++
				w.lastErr = err.Error()
			} else {
				w.count++
			}
		}
	}()
}

func (h *Harness) stopWriter(st *VMState) {
	st.mu.Lock()
	w := st.writer
	st.writer = nil
	st.mu.Unlock()
	if w != nil {
		close(w.stop)
		<-w.done
	}
}

func (h *Harness) stopAllWriters() {
	h.mu.Lock()
	var all []*VMState
	for _, st := range h.vms {
		all = append(all, st)
	}
	h.mu.Unlock()
	for _, st := range all {
		h.stopWriter(st)
	}
}

// ---- VM lookup; VMs the harness did not create (RegisterVM) get a state on demand ----

func (h *Harness) stateByRef(ref types.ManagedObjectReference) *VMState {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil
	}
	h.mu.Lock()
	st := h.vms[ref]
	h.mu.Unlock()
	if st != nil {
		return st
	}
	st = h.adoptVM(vm)
	if st == nil {
		return nil
	}
	h.mu.Lock()
	if old := h.vms[ref]; old != nil {
		st = old
	} else {
		h.vms[ref] = st
	}
	h.mu.Unlock()
	return st
}

func (h *Harness) stateByName(name string) *VMState {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok && vm.Name == name {
			return h.stateByRef(vm.Self)
		}
	}
	return nil
}

func (h *Harness) allStates() []*VMState {
	var out []*VMState
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok {
			if st := h.stateByRef(vm.Self); st != nil {
				out = append(out, st)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return vmid(out[i].Ref) < vmid(out[j].Ref) })
	return out
}

func vmid(ref types.ManagedObjectReference) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(ref.Value, "vm-"))
	return n
}

// parseDsPath splits "[ds] a/b.vmdk".
func parseDsPath(p string) (string, string, bool) {
	var dp object.DatastorePath
	if !dp.FromString(p) {
		return "", "", false
	}
	return dp.Datastore, dp.Path, true
}

func (h *Harness) adoptVM(vm *simulator.VirtualMachine) *VMState {
	var st *VMState
	var snaps []*Snap
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		ds, rel, ok := parseDsPath(vm.Config.Files.VmPathName)
		dir, ok2 := h.dsDir[ds]
		if !ok || !ok2 {
			return
		}
		st = &VMState{Name: vm.Name, Ref: vm.Self, vm: vm, Tools: true, VmxLocal: filepath.Join(dir, rel),
			VmxDs: vm.Config.Files.VmPathName, GuestID: vm.Config.GuestId, Annotation: vm.Config.Annotation}
		for _, dev := range vm.Config.Hardware.Device {
			vd, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			dds, drel, ok := parseDsPath(b.FileName)
			ddir, ok2 := h.dsDir[dds]
			if !ok || !ok2 {
				continue
			}
			unit := int32(0)
			if vd.UnitNumber != nil {
				unit = *vd.UnitNumber
			}
			desc := filepath.Join(ddir, drel)
			// The chain the descriptors name (parentFileNameHint), base first, as a host opens it.
			chain, err := descriptorChain(desc)
			if err != nil {
				st.AdoptErrors = append(st.AdoptErrors, err.Error())
				base := strings.TrimSuffix(filepath.Base(drel), ".vmdk")
				chain = []chainLink{{Base: base, Descriptor: desc, Data: filepath.Join(filepath.Dir(desc), base+"-flat.vmdk")}}
			}
			var layers []*Layer
			for i, c := range chain {
				l := &Layer{Base: c.Base, DsPath: h.dsPathOf(c.Descriptor), Descriptor: c.Descriptor, Data: c.Data, CID: c.CID, Uuid: vmdkUUID()}
				if i == len(chain)-1 {
					l.Uuid = b.Uuid
				}
				layers = append(layers, l)
			}
			size := vd.CapacityInBytes
			if size == 0 && chain[0].Sectors > 0 {
				size = chain[0].Sectors * 512
			}
			if fi, err := os.Stat(chain[0].Data); err == nil && size == 0 {
				size = fi.Size()
			}
			// New deltas go next to the base, like the harness's own VMs.
			bds, brel, ok := parseDsPath(layers[0].DsPath)
			if !ok {
				bds, brel = dds, drel
			}
			st.Disks = append(st.Disks, &Disk{Index: len(st.Disks), Key: vd.Key, Unit: unit, Datastore: bds,
				Dir: filepath.Dir(chain[0].Descriptor), RelDir: filepath.Dir(brel), Size: size, Layers: layers})
		}
		// The snapshot tree the .vmsd lists; each snapshot froze one more layer of every disk.
		var lastUID int32
		var err error
		snaps, lastUID, err = readVmsd(strings.TrimSuffix(st.VmxLocal, ".vmx") + ".vmsd")
		if err != nil {
			st.AdoptErrors = append(st.AdoptErrors, err.Error())
			snaps = nil
		}
		for _, d := range st.Disks {
			if len(snaps) > 0 && len(d.Layers) != len(snaps)+1 {
				st.AdoptErrors = append(st.AdoptErrors, fmt.Sprintf("%s lists %d snapshots but disk %s has a chain of %d",
					filepath.Base(st.VmxLocal), len(snaps), d.Layers[len(d.Layers)-1].DsPath, len(d.Layers)))
				snaps = nil
				break
			}
		}
		st.nextSnapID = lastUID
		for _, sn := range snaps {
			if sn.ID > st.nextSnapID {
				st.nextSnapID = sn.ID
			}
		}
	})
	if st == nil {
		return nil
	}
	for _, sn := range snaps {
		so := &simulator.VirtualMachineSnapshot{}
		so.Vm = st.Ref
		simulator.Map.WithLock(vm, func() { so.Config = *vm.Config })
		simulator.Map.Put(so)
		sn.Ref = so.Self
	}
	st.Snaps = snaps
	for _, e := range st.AdoptErrors {
		log.Printf("adopting VM %s: %s", st.Name, e)
	}
	chained := len(snaps) > 0
	for _, d := range st.Disks {
		chained = chained || len(d.Layers) > 1
	}
	if chained {
		simulator.Map.WithLock(vm, func() { h.syncVMLocked(st) })
	}
	simulator.Map.WithLock(vm, func() { h.cbtSetCapabilityLocked(st) })
	return st
}

// A link of a disk chain as its descriptor says.
type chainLink struct {
	Base       string // file name without .vmdk
	Descriptor string // local path
	Data       string // local path of the extent
	CID        string
	Sectors    int64
	Delta      bool
}

var extentLineRe = regexp.MustCompile(`^RW\s+(\d+)\s+(\w+)\s+"([^"]+)"`)

// descriptorChain follows parentFileNameHint from the descriptor at local down to the base;
// base first. Every descriptor and extent must exist.
func descriptorChain(local string) ([]chainLink, error) {
	var out []chainLink
	seen := map[string]bool{}
	for p := local; ; {
		if seen[p] || len(out) > 64 {
			return nil, fmt.Errorf("the chain of %s loops", local)
		}
		seen[p] = true
		raw, err := ioutil.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("chain of %s: %v", local, err)
		}
		text := string(raw)
		l := chainLink{Base: strings.TrimSuffix(filepath.Base(p), ".vmdk"), Descriptor: p, CID: descriptorField(text, "CID")}
		for _, line := range strings.Split(text, "\n") {
			m := extentLineRe.FindStringSubmatch(strings.TrimSpace(line))
			if m == nil {
				continue
			}
			l.Sectors, _ = strconv.ParseInt(m[1], 10, 64)
			l.Delta = m[2] == "VMFSSPARSE"
			l.Data = m[3]
			if !filepath.IsAbs(l.Data) {
				l.Data = filepath.Join(filepath.Dir(p), l.Data)
			}
			break
		}
		if l.Data == "" {
			return nil, fmt.Errorf("chain of %s: %s names no extent", local, p)
		}
		if _, err := os.Stat(l.Data); err != nil {
			return nil, fmt.Errorf("chain of %s: %v", local, err)
		}
		out = append([]chainLink{l}, out...)
		hint := descriptorField(text, "parentFileNameHint")
		if hint == "" {
			break
		}
		if !filepath.IsAbs(hint) {
			hint = filepath.Join(filepath.Dir(p), hint)
		}
		p = hint
	}
	if out[0].Delta {
		return nil, fmt.Errorf("chain of %s: %s is a delta without a parent", local, out[0].Descriptor)
	}
	return out, nil
}

// readVmsd reads a .vmsd: the snapshots as a line from the root to the newest (the harness
// models no branches), and snapshot.lastUID. A missing file is no snapshots.
func readVmsd(path string) ([]*Snap, int32, error) {
	raw, err := ioutil.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	kv := parseVmx(string(raw))
	n, _ := strconv.Atoi(kv["snapshot.numsnapshots"])
	last, _ := strconv.Atoi(kv["snapshot.lastuid"])
	type ent struct {
		snap   *Snap
		parent string
	}
	var all []ent
	for i := 0; i < n; i++ {
		p := fmt.Sprintf("snapshot%d.", i)
		uid, err := strconv.Atoi(kv[p+"uid"])
		if err != nil {
			return nil, 0, fmt.Errorf("%s: snapshot%d has no uid", path, i)
		}
		hi, _ := strconv.ParseInt(kv[p+"createtimehigh"], 10, 64)
		lo, _ := strconv.ParseInt(kv[p+"createtimelow"], 10, 64)
		us := hi<<32 + int64(uint32(lo))
		sn := &Snap{ID: int32(uid), Name: kv[p+"displayname"], Description: kv[p+"description"],
			Created: time.Unix(0, us*1000), State: types.VirtualMachinePowerStatePoweredOff,
			Vmsn: filepath.Join(filepath.Dir(path), filepath.Base(kv[p+"filename"]))}
		if vmem := strings.TrimSuffix(sn.Vmsn, ".vmsn") + ".vmem"; fileExists(vmem) {
			sn.Vmem = vmem
		}
		all = append(all, ent{sn, kv[p+"parent"]})
	}
	var line []*Snap
	parent := ""
	for len(line) < len(all) {
		var next *Snap
		for _, e := range all {
			if e.parent == parent {
				if next != nil {
					return nil, 0, fmt.Errorf("%s: the snapshot tree branches (esxi-sim models a line)", path)
				}
				next = e.snap
			}
		}
		if next == nil {
			return nil, 0, fmt.Errorf("%s: snapshot %s has no child listed and %d are left", path, parent, len(all)-len(line))
		}
		line = append(line, next)
		parent = strconv.Itoa(int(next.ID))
	}
	return line, int32(last), nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// dsPathOf gives "[ds] rel" of a local path on one of the datastores ("" if on none).
func (h *Harness) dsPathOf(local string) string {
	for name, d := range h.dsDir {
		if strings.HasPrefix(local, d+"/") {
			return fmt.Sprintf("[%s] %s", name, strings.TrimPrefix(local, d+"/"))
		}
	}
	return ""
}

// dsDirPrefix returns "[ds] dir/" of "[ds] dir/file.vmdk" (or "[ds] " for a file at the root).
func dsDirPrefix(p string) string {
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[:i+1]
	}
	if i := strings.Index(p, "] "); i >= 0 {
		return p[:i+2]
	}
	return ""
}
