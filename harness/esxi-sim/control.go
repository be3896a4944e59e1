package main

// Control endpoint (plain HTTP, JSON) and the vim-cmd stand-in.

import (
	"context"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func writeJSON(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func jsonErr(w http.ResponseWriter, code int, format string, a ...interface{}) {
	writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, a...)})
}

func (h *Harness) vmArg(w http.ResponseWriter, r *http.Request) *VMState {
	name := r.URL.Query().Get("vm")
	st := h.stateByName(name)
	if st == nil {
		jsonErr(w, http.StatusNotFound, "no vm %q", name)
	}
	return st
}

// postVMArg is vmArg for a POST-only call (405 otherwise).
func (h *Harness) postVMArg(w http.ResponseWriter, r *http.Request) *VMState {
	if r.Method != http.MethodPost {
		jsonErr(w, 405, "POST")
		return nil
	}
	return h.vmArg(w, r)
}

// setFault changes the fault settings and answers them.
func (h *Harness) setFault(w http.ResponseWriter, set func(*Faults)) {
	h.mu.Lock()
	set(&h.faults)
	out := h.faults
	h.mu.Unlock()
	writeJSON(w, 200, out)
}

type diskJSON struct {
	Index       int      `json:"index"`
	Key         int32    `json:"key"`
	Node        string   `json:"node"`
	Datastore   string   `json:"datastore"`
	SizeBytes   int64    `json:"size_bytes"`
	Base        string   `json:"base"`
	BaseFlat    string   `json:"base_flat_path"`
	Current     string   `json:"current"`
	CurrentData string   `json:"current_data_path"`
	Chain       []string `json:"chain"`
	DeltaBytes  []int64  `json:"delta_written_bytes"`
}

type snapJSON struct {
	ID          int32     `json:"id"`
	Ref         string    `json:"ref"`
	Name        string    `json:"name"`
	Description string    `json:"description"`
	Created     time.Time `json:"created"`
	State       string    `json:"state"`
	Quiesced    bool      `json:"quiesced"`
	DiskSha256  []string  `json:"disk_sha256"`
	FlatSha256  []string  `json:"base_flat_sha256"`
	ChangeIDs   []string  `json:"change_ids"`
}

type vmJSON struct {
	Name                   string     `json:"name"`
	Ref                    string     `json:"ref"`
	Vmid                   int        `json:"vmid"`
	Power                  string     `json:"power_state"`
	Vmx                    string     `json:"vmx"`
	VmxPath                string     `json:"vmx_path"`
	Disks                  []diskJSON `json:"disks"`
	Backing                []string   `json:"current_backing"`
	Snapshots              []snapJSON `json:"snapshots"`
	LastSnapshotHashes     []string   `json:"last_snapshot_disk_sha256"`
	LastSnapshotFlatHashes []string   `json:"last_snapshot_base_flat_sha256"`
	Writer                 bool       `json:"writer_on"`
	WriterWrites           int64      `json:"writer_writes"`
	WriterErrors           int64      `json:"writer_errors"`
	WriterLastError        string     `json:"writer_last_error,omitempty"`
	Writes                 int64      `json:"writes"`
	WritesDuringSnapshot   int64      `json:"writes_during_snapshot"`
	AdoptErrors            []string   `json:"adopt_errors"`
}

func (h *Harness) vmToJSON(st *VMState) vmJSON {
	st.mu.Lock()
	defer st.mu.Unlock()
	v := vmJSON{Name: st.Name, Ref: st.Ref.Value, Vmid: vmid(st.Ref), Vmx: st.VmxDs, VmxPath: st.VmxLocal,
		LastSnapshotHashes: st.LastSnapshotHashes, LastSnapshotFlatHashes: st.LastSnapshotFlatHashes,
		Writes: st.Writes, WritesDuringSnapshot: st.WritesDuringSnapshot, AdoptErrors: st.AdoptErrors}
	simulator.Map.WithLock(st.vm, func() {
		v.Power = string(st.vm.Runtime.PowerState)
		for _, dev := range st.vm.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok {
				if b, ok := vd.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
					v.Backing = append(v.Backing, b.GetVirtualDeviceFileBackingInfo().FileName)
				}
			}
		}
	})
	for _, d := range st.Disks {
		top := d.Layers[len(d.Layers)-1]
		dj := diskJSON{Index: d.Index, Key: d.Key, Node: fmt.Sprintf("scsi0:%d", d.Unit), Datastore: d.Datastore, SizeBytes: d.Size,
			Base: d.Layers[0].DsPath, BaseFlat: d.Layers[0].Data, Current: top.DsPath, CurrentData: top.Data}
		for _, l := range d.Layers {
			dj.Chain = append(dj.Chain, l.DsPath)
			if l != d.Layers[0] {
				dj.DeltaBytes = append(dj.DeltaBytes, l.deltaBytes())
			}
		}
		v.Disks = append(v.Disks, dj)
	}
	for _, s := range st.Snaps {
		v.Snapshots = append(v.Snapshots, snapJSON{ID: s.ID, Ref: s.Ref.Value, Name: s.Name, Description: s.Description,
			Created: s.Created, State: string(s.State), Quiesced: s.Quiesced, DiskSha256: s.DiskSha256, FlatSha256: s.FlatSha256, ChangeIDs: s.ChangeIDs})
	}
	if st.writer != nil {
		v.Writer = true
		v.WriterWrites = st.writer.count
		v.WriterErrors = st.writer.errors
		v.WriterLastError = st.writer.lastErr
	}
	return v
}

func (h *Harness) controlMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/state", func(w http.ResponseWriter, r *http.Request) {
		var vms []vmJSON
		for _, st := range h.allStates() {
			vms = append(vms, h.vmToJSON(st))
		}
		h.mu.Lock()
		out := map[string]interface{}{"vms": vms, "faults": h.faults, "counters": h.count, "events": h.events,
			"datastores": h.dsDir}
		b, _ := json.Marshal(out)
		h.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
	mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		st := h.postVMArg(w, r)
		if st == nil {
			return
		}
		q := r.URL.Query()
		di, _ := strconv.Atoi(q.Get("disk"))
		off, err := strconv.ParseInt(q.Get("offset"), 10, 64)
		if err != nil {
			jsonErr(w, 400, "offset: %v", err)
			return
		}
		data, _ := ioutil.ReadAll(r.Body)
		file, err := h.writeDisk(st, di, off, data)
		if err != nil {
			jsonErr(w, 400, "%v", err)
			return
		}
		writeJSON(w, 200, map[string]interface{}{"written": len(data), "file": file})
	})
	mux.HandleFunc("/read", func(w http.ResponseWriter, r *http.Request) {
		st := h.vmArg(w, r)
		if st == nil {
			return
		}
		q := r.URL.Query()
		di, _ := strconv.Atoi(q.Get("disk"))
		off, _ := strconv.ParseInt(q.Get("offset"), 10, 64)
		n, _ := strconv.ParseInt(q.Get("length"), 10, 64)
		st.mu.Lock()
		defer st.mu.Unlock()
		if di < 0 || di >= len(st.Disks) || off < 0 || n < 0 || off+n > st.Disks[di].Size || n > 64<<20 {
			jsonErr(w, 400, "bad disk/offset/length")
			return
		}
		buf := make([]byte, n)
		if err := readLogical(st.Disks[di], len(st.Disks[di].Layers), off, buf); err != nil {
			jsonErr(w, 500, "%v", err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(buf)
	})
	mux.HandleFunc("/hash", func(w http.ResponseWriter, r *http.Request) {
		st := h.vmArg(w, r)
		if st == nil {
			return
		}
		st.mu.Lock()
		defer st.mu.Unlock()
		var cur, flat []string
		for _, d := range st.Disks {
			c, err := hashLogical(d, len(d.Layers))
			if err != nil {
				jsonErr(w, 500, "%v", err)
				return
			}
			f, err := hashFile(d.Layers[0].Data)
			if err != nil {
				jsonErr(w, 500, "%v", err)
				return
			}
			cur = append(cur, c)
			flat = append(flat, f)
		}
		writeJSON(w, 200, map[string]interface{}{"current_sha256": cur, "base_flat_sha256": flat})
	})
	mux.HandleFunc("/writer", func(w http.ResponseWriter, r *http.Request) {
		st := h.vmArg(w, r)
		if st == nil {
			return
		}
		q := r.URL.Query()
		if q.Get("on") == "1" || q.Get("on") == "true" {
			iv, err := strconv.ParseFloat(q.Get("interval_ms"), 64)
			if err != nil || iv <= 0 {
				iv = 3
			}
			disk := -1
			if s := q.Get("disk"); s != "" {
				disk, _ = strconv.Atoi(s)
			}
			if disk >= len(st.Disks) {
				jsonErr(w, 400, "no disk %d", disk)
				return
			}
			block := 4096
			if s := q.Get("block"); s != "" {
				block, _ = strconv.Atoi(s)
			}
			h.startWriter(st, time.Duration(iv*float64(time.Millisecond)), disk, block)
		} else {
			h.stopWriter(st)
		}
		writeJSON(w, 200, h.vmToJSON(st))
	})
	mux.HandleFunc("/power", func(w http.ResponseWriter, r *http.Request) {
		st := h.vmArg(w, r)
		if st == nil {
			return
		}
		state := r.URL.Query().Get("state")
		var err error
		if state == "suspended" {
			err = h.suspend(context.Background(), st)
		} else {
			err = h.setPower(context.Background(), st, state == "on")
		}
		if err != nil {
			jsonErr(w, 409, "%v", err)
			return
		}
		writeJSON(w, 200, h.vmToJSON(st))
	})
	mux.HandleFunc("/fault", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		op, mode := q.Get("op"), q.Get("mode")
		if op == "cbt" {
			f := CbtFault{Mode: mode, Count: 1}
			if f.Mode == "none" || f.Mode == "off" {
				f.Mode = ""
			}
			if s := q.Get("count"); s == "inf" {
				f.Count = -1
			} else if s != "" {
				f.Count, _ = strconv.Atoi(s)
			}
			switch f.Mode {
			case "", "forget", "outside", "unsorted", "stall", "wrongstart":
			default:
				jsonErr(w, 400, "cbt: mode must be forget, outside, unsorted, stall, wrongstart or none")
				return
			}
			h.setFault(w, func(fs *Faults) { fs.Cbt = f })
			return
		}
		if op == "intrude" {
			f := IntrudeFault{Action: q.Get("action"), Name: q.Get("name")}
			f.Seconds, _ = strconv.ParseFloat(q.Get("seconds"), 64)
			if (f.Action != "create" && f.Action != "remove" && f.Action != "") || (f.Action != "" && f.Name == "") {
				jsonErr(w, 400, "intrude: action must be create or remove (or empty to clear), with a name")
				return
			}
			h.setFault(w, func(fs *Faults) { fs.Intrude = f })
			return
		}
		if mode == "none" || mode == "off" {
			mode = ""
		}
		f := OpFault{Mode: mode, Then: q.Get("then"), Msg: q.Get("msg"), Count: 1}
		if s := q.Get("seconds"); s != "" {
			f.Seconds, _ = strconv.ParseFloat(s, 64)
		}
		if s := q.Get("count"); s != "" {
			if s == "inf" {
				f.Count = -1
			} else {
				f.Count, _ = strconv.Atoi(s)
			}
		}
		if mode != "" && mode != "fail" && mode != "hang" {
			jsonErr(w, 400, "mode must be fail, hang or none")
			return
		}
		h.mu.Lock()
		switch op {
		case "create":
			h.faults.Create = f
		case "remove":
			h.faults.Remove = f
		case "all503":
			h.faults.All503 = mode != ""
		case "readonly":
			h.faults.ReadOnly = mode != ""
		case "clear", "all":
			h.faults = Faults{}
		default:
			h.mu.Unlock()
			jsonErr(w, 400, "op must be create, remove, all503, readonly, intrude, cbt or clear")
			return
		}
		out := h.faults
		h.mu.Unlock()
		writeJSON(w, 200, out)
	})
	mux.HandleFunc("/cbt", h.handleCbt)
	mux.HandleFunc("/resize", h.handleResize)
	mux.HandleFunc("/vimcmd", func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		stdout, stderr, code := h.vimCmd(r.Form["arg"])
		writeJSON(w, 200, map[string]interface{}{"stdout": stdout, "stderr": stderr, "exit": code})
	})
	return mux
}

// ---- vim-cmd ----

func powerWords(s types.VirtualMachinePowerState) string {
	switch s {
	case types.VirtualMachinePowerStatePoweredOn:
		return "powered on"
	case types.VirtualMachinePowerStateSuspended:
		return "suspended"
	}
	return "powered off"
}

func vimTime(t time.Time) string {
	t = t.Local()
	return fmt.Sprintf("%d/%d/%d %d:%d:%d", int(t.Month()), t.Day(), t.Year(), t.Hour(), t.Minute(), t.Second())
}

func (h *Harness) snapshotTreeText(st *VMState) string {
	st.mu.Lock()
	defer st.mu.Unlock()
	var b strings.Builder
	if len(st.Snaps) == 0 {
		return ""
	}
	b.WriteString("|-ROOT\n")
	for i, s := range st.Snaps {
		p := strings.Repeat("--", i+1)
		if i > 0 {
			b.WriteString(strings.Repeat("--", i) + "|-CHILD\n")
		}
		fmt.Fprintf(&b, "%sSnapshot Name        : %s\n", p, s.Name)
		fmt.Fprintf(&b, "%sSnapshot Id        : %d\n", p, s.ID)
		fmt.Fprintf(&b, "%s\n", strings.TrimRight(fmt.Sprintf("%sSnapshot Desciption  : %s", p, s.Description), " "))
		fmt.Fprintf(&b, "%sSnapshot Created On  : %s\n", p, vimTime(s.Created))
		fmt.Fprintf(&b, "%sSnapshot State       : %s\n", p, powerWords(s.State))
	}
	return b.String()
}

func vimFault(kind, msg string) string {
	return fmt.Sprintf("(vim.fault.%s) {\n   faultCause = (vmodl.MethodFault) null, \n   faultMessage = <unset>, \n   msg = \"%s\"\n}\n", kind, msg)
}

func centerPad(label string, width int) string {
	if width < len(label) {
		width = len(label)
	}
	left := (width - len(label)) / 2
	return strings.Repeat(" ", left) + label + strings.Repeat(" ", width-len(label)-left)
}

func (h *Harness) getAllVMs() string {
	type row struct{ id, name, file, guest, ver, ann string }
	var rows []row
	for _, st := range h.allStates() {
		var ver string
		simulator.Map.WithLock(st.vm, func() { ver = st.vm.Config.Version })
		if ver == "" {
			ver = "vmx-13"
		}
		rows = append(rows, row{strconv.Itoa(vmid(st.Ref)), st.Name, st.VmxDs, st.GuestID, ver, st.Annotation})
	}
	wName, wFile, wGuest, wVer := len("Name"), len("File"), len("Guest OS"), len("Version")
	for _, r := range rows {
		if len(r.name) > wName {
			wName = len(r.name)
		}
		if len(r.file) > wFile {
			wFile = len(r.file)
		}
		if len(r.guest) > wGuest {
			wGuest = len(r.guest)
		}
		if len(r.ver) > wVer {
			wVer = len(r.ver)
		}
	}
	var b strings.Builder
	b.WriteString(fixHeader(wName, wFile, wGuest, wVer))
	for _, r := range rows {
		fmt.Fprintf(&b, "%-7s%-*s   %-*s   %-*s   %-*s   %s\n", r.id, wName, r.name, wFile, r.file, wGuest, r.guest, wVer, r.ver, r.ann)
	}
	return b.String()
}

// fixHeader: "Vmid" at 0, every other label centred over its column, where
// the columns are Vmid (7 wide), then name/file/guest/version each followed by 3 spaces.
func fixHeader(wName, wFile, wGuest, wVer int) string {
	line := []byte(strings.Repeat(" ", 7+wName+3+wFile+3+wGuest+3+wVer+3))
	put := func(pos int, s string) { copy(line[pos:], s) }
	put(0, "Vmid")
	col := 7
	put(col+(wName-4)/2, "Name")
	col += wName + 3
	put(col+(wFile-4)/2, "File")
	col += wFile + 3
	put(col+(wGuest-8)/2, "Guest OS")
	col += wGuest + 3
	put(col, "Version")
	return string(line) + "Annotation\n"
}

func (h *Harness) vmByVmid(s string) *VMState {
	n, err := strconv.Atoi(s)
	if err != nil {
		return nil
	}
	return h.stateByRef(types.ManagedObjectReference{Type: "VirtualMachine", Value: fmt.Sprintf("vm-%d", n)})
}

func boolArg(args []string, i int) bool {
	if i >= len(args) {
		return false
	}
	a := strings.ToLower(args[i])
	return a == "1" || a == "true"
}

func (h *Harness) vimCmd(args []string) (string, string, int) {
	if len(args) == 0 {
		return "", "Commands available under /:\nhbrsvc/       internalsvc/  solo/         vmsvc/\nhostsvc/      proxysvc/     vimsvc/       help\n", 0
	}
	h.bump("vimcmd:" + args[0])
	cmd := strings.TrimPrefix(args[0], "/")
	rest := args[1:]
	needVM := func() (*VMState, string, int, bool) {
		if len(rest) < 1 {
			return nil, "Insufficient arguments.\nUsage: " + cmd + " vmid\n", 1, false
		}
		st := h.vmByVmid(rest[0])
		if st == nil {
			return nil, vimFault("NotFound", fmt.Sprintf("Unable to find a VM corresponding to \\\"%s\\\"", rest[0])), 1, false
		}
		return st, "", 0, true
	}
	switch cmd {
	case "vmsvc/getallvms":
		return h.getAllVMs(), "", 0
	case "vmsvc/power.getstate":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		var ps types.VirtualMachinePowerState
		simulator.Map.WithLock(st.vm, func() { ps = st.vm.Runtime.PowerState })
		return "Retrieved runtime info\n" + strings.Title(powerWords(ps))[:1] + powerWords(ps)[1:] + "\n", "", 0
	case "vmsvc/snapshot.get":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		return "Get Snapshot:\n" + h.snapshotTreeText(st), "", 0
	case "vmsvc/snapshot.create":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		name, desc := "", ""
		if len(rest) > 1 {
			name = rest[1]
		}
		if len(rest) > 2 {
			desc = rest[2]
		}
		t, done := h.doCreate(st, name, desc, boolArg(rest, 3), boolArg(rest, 4), "vim-cmd")
		<-done
		out := "Create Snapshot:\n"
		if t.Info.Error != nil {
			return out + vimTaskFault(t.Info.Error), "", 1
		}
		return out, "", 0
	case "vmsvc/snapshot.remove":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		if len(rest) < 2 {
			return "Insufficient arguments.\nUsage: snapshot.remove vmid snapshotId [removeChildren]\n", "", 1
		}
		id, _ := strconv.Atoi(rest[1])
		var ref types.ManagedObjectReference
		found := false
		st.mu.Lock()
		for _, s := range st.Snaps {
			if int(s.ID) == id {
				ref, found = s.Ref, true
			}
		}
		st.mu.Unlock()
		if !found {
			return vimFault("NotFound", "The object or item referred to could not be found."), "", 1
		}
		t, done := h.doRemove(st, ref, boolArg(rest, 2), "vim-cmd", "RemoveSnapshot_Task", "vm.Snapshot.remove")
		<-done
		out := "Remove Snapshot:\n"
		if t.Info.Error != nil {
			return out + vimTaskFault(t.Info.Error), "", 1
		}
		return out + h.snapshotTreeText(st), "", 0
	case "vmsvc/snapshot.removeall":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		st.mu.Lock()
		has := len(st.Snaps) > 0
		var ref types.ManagedObjectReference
		if has {
			ref = st.Snaps[0].Ref
		}
		st.mu.Unlock()
		if has {
			t, done := h.doRemove(st, ref, true, "vim-cmd", "RemoveAllSnapshots_Task", "VirtualMachine.removeAllSnapshots")
			<-done
			if t.Info.Error != nil {
				return "Remove All Snapshots:\n" + vimTaskFault(t.Info.Error), "", 1
			}
		}
		return "Remove All Snapshots:\n", "", 0
	case "vmsvc/get.filelayout":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		return h.fileLayoutText(st), "", 0
	case "vmsvc/power.on", "vmsvc/power.off":
		st, e, c, ok := needVM()
		if !ok {
			return e, "", c
		}
		if err := h.setPower(context.Background(), st, cmd == "vmsvc/power.on"); err != nil {
			return vimFault("InvalidPowerState", err.Error()), "", 1
		}
		return "Powering " + strings.TrimPrefix(cmd, "vmsvc/power.") + " VM:\n", "", 0
	}
	return "", fmt.Sprintf("Unknown command: '%s'\n", args[0]), 1
}

func vimTaskFault(e *types.LocalizedMethodFault) string {
	kind := fmt.Sprintf("%T", e.Fault)
	kind = strings.TrimPrefix(kind, "*types.")
	return vimFault(kind, e.LocalizedMessage)
}

func quoteList(items []string, indent string) string {
	if len(items) == 0 {
		return "(string) []"
	}
	var b strings.Builder
	b.WriteString("(string) [\n")
	for i, s := range items {
		b.WriteString(indent + "   \"" + s + "\"")
		if i < len(items)-1 {
			b.WriteString(", ")
		}
		b.WriteString("\n")
	}
	b.WriteString(indent + "]")
	return b.String()
}

func (h *Harness) fileLayoutText(st *VMState) string {
	var l *types.VirtualMachineFileLayout
	simulator.Map.WithLock(st.vm, func() {
		if st.vm.Layout != nil {
			c := *st.vm.Layout
			l = &c
		}
	})
	if l == nil {
		l = &types.VirtualMachineFileLayout{}
	}
	var b strings.Builder
	b.WriteString("VM File Layout:\n(vim.vm.FileLayout) {\n")
	b.WriteString("   configFile = " + quoteList(l.ConfigFile, "   ") + ", \n")
	b.WriteString("   logFile = " + quoteList(l.LogFile, "   ") + ", \n")
	b.WriteString("   disk = (vim.vm.FileLayout.DiskLayout) [\n")
	for i, d := range l.Disk {
		fmt.Fprintf(&b, "      (vim.vm.FileLayout.DiskLayout) {\n         key = %d, \n         diskFile = %s\n      }", d.Key, quoteList(d.DiskFile, "         "))
		if i < len(l.Disk)-1 {
			b.WriteString(", ")
		}
		b.WriteString("\n")
	}
	b.WriteString("   ], \n")
	if len(l.Snapshot) == 0 {
		b.WriteString("   snapshot = (vim.vm.FileLayout.SnapshotLayout) [], \n")
	} else {
		b.WriteString("   snapshot = (vim.vm.FileLayout.SnapshotLayout) [\n")
		for i, s := range l.Snapshot {
			fmt.Fprintf(&b, "      (vim.vm.FileLayout.SnapshotLayout) {\n         key = 'vim.vm.Snapshot:%s', \n         snapshotFile = %s\n      }", s.Key.Value, quoteList(s.SnapshotFile, "         "))
			if i < len(l.Snapshot)-1 {
				b.WriteString(", ")
			}
			b.WriteString("\n")
		}
		b.WriteString("   ], \n")
	}
	if l.SwapFile == "" {
		b.WriteString("   swapFile = <unset>\n")
	} else {
		b.WriteString("   swapFile = \"" + l.SwapFile + "\"\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// vimCmdMain is the client side: esxi-sim vim-cmd --control URL args...
func vimCmdMain(args []string) int {
	control := os.Getenv("ESXI_SIM_CONTROL")
	var rest []string
	for i := 0; i < len(args); i++ {
		if args[i] == "--control" && i+1 < len(args) {
			control = args[i+1]
			i++
			continue
		}
		if strings.HasPrefix(args[i], "--control=") {
			control = strings.TrimPrefix(args[i], "--control=")
			continue
		}
		rest = append(rest, args[i])
	}
	if control == "" {
		fmt.Fprintln(os.Stderr, "esxi-sim vim-cmd: --control URL (or ESXI_SIM_CONTROL) is required")
		return 2
	}
	form := url.Values{"arg": rest}
	cl := &http.Client{Timeout: 0}
	resp, err := cl.PostForm(strings.TrimRight(control, "/")+"/vimcmd", form)
	if err != nil {
		fmt.Fprintf(os.Stderr, "esxi-sim vim-cmd: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	var out struct {
		Stdout string `json:"stdout"`
		Stderr string `json:"stderr"`
		Exit   int    `json:"exit"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		fmt.Fprintf(os.Stderr, "esxi-sim vim-cmd: %v\n", err)
		return 1
	}
	os.Stdout.WriteString(out.Stdout)
	os.Stderr.WriteString(out.Stderr)
	return out.Exit
}
