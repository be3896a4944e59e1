package main

// Changed Block Tracking as a host does it, closely enough for a backup's correctness:
// per VM capability.changeTrackingSupported and config.changeTrackingEnabled (ReconfigVM_Task),
// tracking that starts at the next stun (snapshot create or remove), per disk a changeId
// "52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx/N" (epoch UUID / stun sequence number), a
// tracking map of every block written per stun generation, and QueryChangedDiskAreas in pages.
// Faults on demand: an extent forgotten, and hostile answers.

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// CbtFault: hostile or buggy QueryChangedDiskAreas answers on demand.
type CbtFault struct {
	Mode  string `json:"mode"`  // "", forget, outside, unsorted, stall, wrongstart
	Count int    `json:"count"` // answers it still applies to; -1 = until cleared
}

// cbtDisk is one disk's tracking: Gens[k] holds the blocks written between stun k and stun
// k+1 of the epoch; the disk's current changeId is Epoch/len(Gens)-1.
type cbtDisk struct {
	Epoch string
	Gens  []map[int64]struct{}
}

func (c *cbtDisk) seq() int { return len(c.Gens) - 1 }

func (c *cbtDisk) changeID() string { return fmt.Sprintf("%s/%d", c.Epoch, c.seq()) }

func newCbtDisk() *cbtDisk {
	return &cbtDisk{Epoch: "52" + vmdkUUID()[2:], Gens: []map[int64]struct{}{{}}}
}

var changeIDRe = regexp.MustCompile(`^([0-9a-f]{2}(?: [0-9a-f]{2}){7}-[0-9a-f]{2}(?: [0-9a-f]{2}){7})/([0-9]{1,9})$`)

func (h *Harness) cbtBlock() int64 {
	if h.spec.CbtBlockBytes > 0 {
		return h.spec.CbtBlockBytes
	}
	return 65536
}

func (h *Harness) cbtPage() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cbtPageExtents > 0 {
		return h.cbtPageExtents
	}
	return 4
}

// cbtSetCapabilityLocked publishes capability.changeTrackingSupported (VM's Map lock held).
func (h *Harness) cbtSetCapabilityLocked(st *VMState) {
	st.vm.Capability.ChangeTrackingSupported = types.NewBool(!st.CbtUnsupported)
	simulator.Map.Update(st.vm, []types.PropertyChange{{Name: "capability", Val: st.vm.Capability}})
}

// cbtRecordLocked marks the blocks of a guest write (st.mu held).
func (h *Harness) cbtRecordLocked(st *VMState, d *Disk, off, n int64) {
	if d.Cbt == nil || n <= 0 {
		return
	}
	bs := h.cbtBlock()
	g := d.Cbt.Gens[len(d.Cbt.Gens)-1]
	for b := off / bs; b <= (off+n-1)/bs; b++ {
		g[b] = struct{}{}
	}
}

// cbtStunLocked: a stun (snapshot create/remove) starts tracking if it was enabled since,
// else begins a new generation on every disk (st.mu held).
func (h *Harness) cbtStunLocked(st *VMState) {
	if !st.CbtEnabled {
		return
	}
	for _, d := range st.Disks {
		if d.Cbt == nil {
			d.Cbt = newCbtDisk()
		} else {
			d.Cbt.Gens = append(d.Cbt.Gens, map[int64]struct{}{})
		}
	}
}

// cbtChangeIDs is each disk's changeId now ("" where not tracked).
func (st *VMState) cbtChangeIDs() []string {
	var out []string
	for _, d := range st.Disks {
		id := ""
		if d.Cbt != nil {
			id = d.Cbt.changeID()
		}
		out = append(out, id)
	}
	return out
}

// cbtReconfig applies changeTrackingEnabled from a ReconfigVM_Task; a fault when refused.
func (h *Harness) cbtReconfig(st *VMState, on bool) (types.BaseMethodFault, string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if on && st.CbtUnsupported {
		return &types.NotSupported{}, "The operation is not supported on the object."
	}
	if on == st.CbtEnabled {
		return nil, ""
	}
	st.CbtEnabled = on
	if !on {
		for _, d := range st.Disks {
			d.Cbt = nil // off: no changeId; on again: a new epoch at the next stun
		}
	}
	h.event("cbt", st.Name, fmt.Sprintf("changeTrackingEnabled=%v", on), "api", "ok")
	simulator.Map.WithLock(st.vm, func() {
		st.vm.Config.ChangeTrackingEnabled = types.NewBool(on)
		h.syncVMLocked(st)
	})
	return nil, ""
}

// soapReconfig intercepts ReconfigVM_Task when it sets changeTrackingEnabled: refused on a
// host without CBT support (the task fails with NotSupported), otherwise the tracking state is
// updated and the simulator does the rest of the reconfiguration.
func (h *Harness) soapReconfig(w http.ResponseWriter, r *http.Request, st *VMState, req *types.ReconfigVM_Task) bool {
	if req.Spec.ChangeTrackingEnabled == nil {
		return false
	}
	fault, msg := h.cbtReconfig(st, *req.Spec.ChangeTrackingEnabled)
	if fault == nil {
		return false // the simulator stores the setting and answers with its task
	}
	h.event("cbt", st.Name, "changeTrackingEnabled=true", "api", "refused: "+msg)
	t := simulator.CreateTask(st.vm, "reconfigVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, nil })
	t.Info.DescriptionId = "VirtualMachine.reconfigure"
	h.runTask(t, 0, false, func() (types.AnyType, types.BaseMethodFault, string) { return nil, fault, msg })
	taskResponse(w, "ReconfigVM_Task", t.Self)
	return true
}

// resizeDisk grows a disk (refused while snapshots exist, as a host refuses to extend a disk
// with snapshots); resets the disk's tracking (a new epoch, old changeIds become foreign).
func (h *Harness) resizeDisk(st *VMState, di int, size int64) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if di < 0 || di >= len(st.Disks) {
		return fmt.Errorf("no disk %d", di)
	}
	d := st.Disks[di]
	if len(st.Snaps) > 0 {
		return fmt.Errorf("the VM has snapshots: a disk with snapshots cannot be extended")
	}
	if size%512 != 0 || size < d.Size {
		return fmt.Errorf("bytes must be a multiple of 512 and at least the current size %d", d.Size)
	}
	if err := os.Truncate(d.Layers[0].Data, size); err != nil {
		return err
	}
	d.Size = size
	if old, err := os.ReadFile(d.Layers[0].Descriptor); err == nil {
		re := regexp.MustCompile(`(?m)^RW \d+ `)
		_ = writeFileAtomic(d.Layers[0].Descriptor, []byte(re.ReplaceAllString(string(old), fmt.Sprintf("RW %d ", size/512))))
	}
	if d.Cbt != nil {
		d.Cbt = newCbtDisk()
	}
	h.event("resize", st.Name, fmt.Sprintf("disk %d to %d bytes", di, size), "control", "ok")
	simulator.Map.WithLock(st.vm, func() {
		for _, dev := range st.vm.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok && vd.Key == d.Key {
				vd.CapacityInBytes = size
				vd.CapacityInKB = size / 1024
			}
		}
		h.syncVMLocked(st)
	})
	return nil
}

// dataRanges: the allocated ranges of a sparse file (SEEK_DATA/SEEK_HOLE); the whole size
// where the file system cannot say.
func dataRanges(path string, size int64) ([][2]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out [][2]int64
	for off := int64(0); off < size; {
		d, err := f.Seek(off, 3) // SEEK_DATA
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			return [][2]int64{{0, size}}, nil
		}
		e, err := f.Seek(d, 4) // SEEK_HOLE
		if err != nil || e > size {
			e = size
		}
		if d >= size {
			break
		}
		out = append(out, [2]int64{d, e})
		off = e
	}
	_, _ = f.Seek(0, io.SeekStart)
	return out, nil
}

// cbtBlocks: the blocks the query reports (sorted): for "*" the allocated blocks of the frozen
// disk (layers [0, upto)), else the blocks written in generations [from, to).
func (h *Harness) cbtBlocks(d *Disk, upto int, star bool, from, to int) ([]int64, error) {
	bs := h.cbtBlock()
	set := map[int64]struct{}{}
	if star {
		rs, err := dataRanges(d.Layers[0].Data, d.Size)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			for b := r[0] / bs; b <= (r[1]-1)/bs; b++ {
				set[b] = struct{}{}
			}
		}
		for k := 1; k < upto && k < len(d.Layers); k++ {
			c, err := d.Layers[k].cow()
			if err != nil {
				return nil, err
			}
			gs, err := c.allocated()
			if err != nil {
				return nil, err
			}
			for _, g := range gs {
				off := g * c.grainBytes()
				for b := off / bs; b <= (off+c.grainBytes()-1)/bs; b++ {
					set[b] = struct{}{}
				}
			}
		}
	} else {
		for k := from; k < to; k++ {
			for b := range d.Cbt.Gens[k] {
				set[b] = struct{}{}
			}
		}
	}
	out := make([]int64, 0, len(set))
	for b := range set {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, nil
}

// extentsOf merges sorted blocks into (start, length) byte extents clipped to size.
func extentsOf(blocks []int64, bs, size int64) []types.DiskChangeExtent {
	var out []types.DiskChangeExtent
	for _, b := range blocks {
		s, e := b*bs, (b+1)*bs
		if e > size {
			e = size
		}
		if s >= e {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Length == s {
			out[n-1].Length += e - s
			continue
		}
		out = append(out, types.DiskChangeExtent{Start: s, Length: e - s})
	}
	return out
}

// takeCbtFault returns the fault mode to apply to this answer and consumes one count; a
// "forget" waits for an answer that has an extent to forget (hasExtents).
func (h *Harness) takeCbtFault(hasExtents bool) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	f := &h.faults.Cbt
	if f.Mode == "" || f.Count == 0 || (f.Mode == "forget" && !hasExtents) {
		return ""
	}
	m := f.Mode
	if f.Count > 0 {
		f.Count--
		if f.Count == 0 {
			*f = CbtFault{}
		}
	}
	return m
}

// queryChangedDiskAreas answers one QueryChangedDiskAreas call: a page of at most cbtPage()
// extents from startOffset, or a fault (kind, message, inner detail XML).
func (h *Harness) queryChangedDiskAreas(st *VMState, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, string, string) {
	page := h.cbtPage()
	st.mu.Lock()
	defer st.mu.Unlock()
	if req.Snapshot == nil {
		return nil, "InvalidArgument", "A specified parameter was not correct: snapshot", "<invalidProperty>snapshot</invalidProperty>"
	}
	k := -1
	for i, s := range st.Snaps {
		if s.Ref == *req.Snapshot {
			k = i
		}
	}
	if k < 0 {
		return nil, "ManagedObjectNotFound", "The object has already been deleted or has not been completely created",
			fmt.Sprintf(`<obj type="VirtualMachineSnapshot">%s</obj>`, xmlEscape(req.Snapshot.Value))
	}
	snap := st.Snaps[k]
	var d *Disk
	di := -1
	for i, x := range st.Disks {
		if x.Key == req.DeviceKey {
			d, di = x, i
		}
	}
	if d == nil {
		return nil, "NotFound", "The object or item referred to could not be found.", ""
	}
	if req.StartOffset < 0 || req.StartOffset >= d.Size {
		return nil, "InvalidArgument", "A specified parameter was not correct: startOffset", "<invalidProperty>startOffset</invalidProperty>"
	}
	fileFault := func() (*types.DiskChangeInfo, string, string, string) {
		p := "/vmfs/volumes/" + d.Datastore + "/" + d.RelDir + "/" + d.Layers[0].Base + ".vmdk"
		return nil, "FileFault", "Error caused by file " + p, "<file>" + xmlEscape(p) + "</file>"
	}
	star := req.ChangeId == "*"
	from, to := 0, 0
	if !star {
		m := changeIDRe.FindStringSubmatch(req.ChangeId)
		if m == nil {
			return nil, "InvalidArgument", "A specified parameter was not correct: changeId", "<invalidProperty>changeId</invalidProperty>"
		}
		frozen := ""
		if di < len(snap.ChangeIDs) {
			frozen = snap.ChangeIDs[di]
		}
		fm := changeIDRe.FindStringSubmatch(frozen)
		// Tracking off, never started for this snapshot, reset since, or a changeId of
		// another epoch or from after the snapshot: the host cannot answer.
		if d.Cbt == nil || fm == nil || fm[1] != d.Cbt.Epoch || m[1] != d.Cbt.Epoch {
			return fileFault()
		}
		from, _ = strconv.Atoi(m[2])
		to, _ = strconv.Atoi(fm[2])
		if from > to || to > d.Cbt.seq() {
			return fileFault()
		}
	} else if !st.CbtEnabled || d.Cbt == nil {
		return fileFault()
	}
	blocks, err := h.cbtBlocks(d, k+1, star, from, to)
	if err != nil {
		return fileFault()
	}
	all := extentsOf(blocks, h.cbtBlock(), d.Size)
	start := req.StartOffset
	var ext []types.DiskChangeExtent
	for _, e := range all {
		if e.Start+e.Length <= start {
			continue
		}
		if e.Start < start {
			e.Length -= start - e.Start
			e.Start = start
		}
		ext = append(ext, e)
	}
	info := &types.DiskChangeInfo{StartOffset: start, Length: d.Size - start}
	if len(ext) > page {
		last := ext[page-1]
		info.Length = last.Start + last.Length - start
		ext = ext[:page]
	}
	info.ChangedArea = ext
	switch h.takeCbtFault(len(ext) > 0) {
	case "forget":
		mid := len(ext) / 2
		info.ChangedArea = append(append([]types.DiskChangeExtent{}, ext[:mid]...), ext[mid+1:]...)
		h.event("cbt-fault", st.Name, fmt.Sprintf("forgot %d+%d", ext[mid].Start, ext[mid].Length), "api", "ok")
	case "outside":
		info.Length = d.Size - start + 1<<20
		info.ChangedArea = append(ext, types.DiskChangeExtent{Start: d.Size, Length: h.cbtBlock()})
	case "unsorted":
		if len(ext) >= 2 {
			info.ChangedArea = []types.DiskChangeExtent{ext[1], ext[0]}
		} else {
			e := types.DiskChangeExtent{Start: start, Length: 512}
			info.ChangedArea = []types.DiskChangeExtent{e, e}
		}
	case "stall":
		info.Length = 0
		info.ChangedArea = nil
	case "wrongstart":
		info.StartOffset = 0
	}
	return info, "", "", ""
}

func (h *Harness) soapQueryChangedDiskAreas(w http.ResponseWriter, st *VMState, req *types.QueryChangedDiskAreas) {
	info, kind, msg, inner := h.queryChangedDiskAreas(st, req)
	if kind != "" {
		h.bump("cbt_fault:" + kind)
		soapFault(w, msg, kind, inner)
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s<QueryChangedDiskAreasResponse xmlns=\"urn:vim25\"><returnval><startOffset>%d</startOffset><length>%d</length>",
		envStart, info.StartOffset, info.Length)
	for _, e := range info.ChangedArea {
		fmt.Fprintf(&b, "<changedArea><start>%d</start><length>%d</length></changedArea>", e.Start, e.Length)
	}
	b.WriteString("</returnval></QueryChangedDiskAreasResponse>" + envEnd)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, b.String())
}

// ---- control API ----

type cbtDiskJSON struct {
	Key      int32  `json:"key"`
	ChangeID string `json:"change_id"`
	Blocks   []int  `json:"blocks_per_generation"`
}

type cbtJSON struct {
	VM        string        `json:"vm"`
	Supported bool          `json:"supported"`
	Enabled   bool          `json:"enabled"`
	BlockSize int64         `json:"block_bytes"`
	Page      int           `json:"page_extents"`
	Disks     []cbtDiskJSON `json:"disks"`
}

func (h *Harness) cbtToJSON(st *VMState) cbtJSON {
	page := h.cbtPage()
	st.mu.Lock()
	defer st.mu.Unlock()
	out := cbtJSON{VM: st.Name, Supported: !st.CbtUnsupported, Enabled: st.CbtEnabled, BlockSize: h.cbtBlock(), Page: page}
	for _, d := range st.Disks {
		dj := cbtDiskJSON{Key: d.Key}
		if d.Cbt != nil {
			dj.ChangeID = d.Cbt.changeID()
			for _, g := range d.Cbt.Gens {
				dj.Blocks = append(dj.Blocks, len(g))
			}
		}
		out.Disks = append(out.Disks, dj)
	}
	return out
}

// handleCbt: GET/POST /cbt?vm=NAME[&supported=0|1][&page=N]
func (h *Harness) handleCbt(w http.ResponseWriter, r *http.Request) {
	st := h.vmArg(w, r)
	if st == nil {
		return
	}
	q := r.URL.Query()
	if s := q.Get("page"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			jsonErr(w, 400, "page must be a positive number of extents")
			return
		}
		h.mu.Lock()
		h.cbtPageExtents = n
		h.mu.Unlock()
	}
	if s := q.Get("supported"); s != "" {
		st.mu.Lock()
		st.CbtUnsupported = !(s == "1" || s == "true")
		st.mu.Unlock()
		simulator.Map.WithLock(st.vm, func() { h.cbtSetCapabilityLocked(st) })
	}
	writeJSON(w, 200, h.cbtToJSON(st))
}

// handleResize: POST /resize?vm=NAME&disk=I&bytes=N
func (h *Harness) handleResize(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		jsonErr(w, 405, "POST")
		return
	}
	st := h.vmArg(w, r)
	if st == nil {
		return
	}
	q := r.URL.Query()
	di, err := strconv.Atoi(q.Get("disk"))
	if err != nil {
		jsonErr(w, 400, "disk: %v", err)
		return
	}
	n, err := strconv.ParseInt(q.Get("bytes"), 10, 64)
	if err != nil {
		jsonErr(w, 400, "bytes: %v", err)
		return
	}
	if err := h.resizeDisk(st, di, n); err != nil {
		jsonErr(w, 409, "%v", err)
		return
	}
	writeJSON(w, 200, h.cbtToJSON(st))
}
