package main

// The SOAP front: every request goes through ServeHTTP; the few methods where
// the simulator lacks a real host's behaviour are answered here, the rest go
// to the simulator's own handlers (model.Service.ServeMux).

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const envStart = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const envEnd = `</soapenv:Body></soapenv:Envelope>`

func (h *Harness) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	inner := h.model.Service.ServeMux
	isSDK := r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService"
	if !isSDK {
		inner.ServeHTTP(w, r)
		return
	}
	h.mu.Lock()
	all503 := h.faults.All503
	readOnly := h.faults.ReadOnly || h.spec.FreeLicense
	h.mu.Unlock()
	if all503 {
		h.bump("http503")
		http.Error(w, "503 Service Unavailable", http.StatusServiceUnavailable)
		return
	}
	if r.Method != http.MethodPost {
		inner.ServeHTTP(w, r)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		inner.ServeHTTP(w, r)
		return
	}
	h.bump("soap:" + method.Name)
	switch req := method.Body.(type) {
	case *types.CreateSnapshot_Task:
		st := h.stateByRef(req.This)
		if st == nil || !h.sessionValid(r) {
			break
		}
		if readOnly {
			h.restricted(w)
			return
		}
		h.soapCreateSnapshot(w, st, req)
		return
	case *types.RemoveSnapshot_Task:
		st := h.stateBySnapshot(req.This)
		if st == nil || !h.sessionValid(r) {
			break
		}
		if readOnly {
			h.restricted(w)
			return
		}
		h.soapRemoveSnapshot(w, st, req.This, req.RemoveChildren, "RemoveSnapshot_Task", "vm.Snapshot.remove")
		return
	case *types.RemoveAllSnapshots_Task:
		st := h.stateByRef(req.This)
		if st == nil || !h.sessionValid(r) {
			break
		}
		if readOnly {
			h.restricted(w)
			return
		}
		st.mu.Lock()
		var root types.ManagedObjectReference
		has := len(st.Snaps) > 0
		if has {
			root = st.Snaps[0].Ref
		}
		st.mu.Unlock()
		if !has {
			t := simulator.CreateTask(st.vm, "removeAllSnapshotsTask", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, nil })
			t.Run()
			taskResponse(w, "RemoveAllSnapshots_Task", t.Self)
			return
		}
		h.soapRemoveSnapshot(w, st, root, true, "RemoveAllSnapshots_Task", "VirtualMachine.removeAllSnapshots")
		return
	case *types.RevertToSnapshot_Task, *types.RevertToCurrentSnapshot_Task, *types.ConsolidateVMDisks_Task:
		if h.sessionValid(r) {
			soapFault(w, "esxi-sim does not implement "+method.Name, "NotSupported", "")
			return
		}
	case *types.ReconfigVM_Task:
		st := h.stateByRef(req.This)
		if st == nil || !h.sessionValid(r) || req.Spec.ChangeTrackingEnabled == nil {
			break
		}
		if readOnly {
			h.restricted(w)
			return
		}
		if h.soapReconfig(w, r, st, req) {
			return
		}
	case *types.QueryChangedDiskAreas:
		st := h.stateByRef(req.This)
		if st == nil || !h.sessionValid(r) {
			break
		}
		h.soapQueryChangedDiskAreas(w, st, req)
		return
	case *types.RegisterVM_Task:
		if h.sessionValid(r) {
			h.soapRegisterVM(w, r, req)
			return
		}
	case *types.RetrieveProperties, *types.RetrievePropertiesEx:
		// The simulator answers these without a session (its "TODO: authz"); a real host
		// faults NotAuthenticated, e.g. after dropping an idle session (session_idle_ms).
		if !h.sessionValid(r) {
			h.bump("not_authenticated")
			soapFault(w, "The session is not authenticated.", "NotAuthenticated", "")
			return
		}
	}
	inner.ServeHTTP(w, r)
}

func (h *Harness) bump(k string) {
	h.mu.Lock()
	h.count[k]++
	h.mu.Unlock()
}

func (h *Harness) event(op, vm, name, via, result string) {
	h.mu.Lock()
	h.events = append(h.events, Event{Time: time.Now(), Op: op, VM: vm, Name: name, Via: via, Result: result})
	h.mu.Unlock()
}

// sessionValid asks the simulator whether the request's session cookie is
// logged in, with a harmless CurrentTime call.
func (h *Harness) sessionValid(r *http.Request) bool {
	body := envStart + `<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` + envEnd
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
	for _, c := range r.Cookies() {
		req.AddCookie(c)
	}
	rec := httptest.NewRecorder()
	h.model.Service.ServeMux.ServeHTTP(rec, req)
	return rec.Code == http.StatusOK
}

func (h *Harness) stateBySnapshot(ref types.ManagedObjectReference) *VMState {
	so, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return nil
	}
	return h.stateByRef(so.Vm)
}

func xmlEscape(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func taskResponse(w http.ResponseWriter, method string, task types.ManagedObjectReference) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, `%s<%sResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></%sResponse>%s`,
		envStart, method, task.Value, method, envEnd)
}

func soapFault(w http.ResponseWriter, msg, kind, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>%s`,
		envStart, xmlEscape(msg), kind, kind, inner, kind, envEnd)
}

func (h *Harness) restricted(w http.ResponseWriter) {
	h.bump("restricted")
	soapFault(w, "Current license or ESXi version prohibits execution of the requested operation.", "RestrictedVersion", "")
}

// takeFault returns the fault setting to apply to this call (and consumes one count).
func (h *Harness) takeFault(op string) OpFault {
	h.mu.Lock()
	defer h.mu.Unlock()
	f := &h.faults.Create
	if op == "remove" {
		f = &h.faults.Remove
	}
	if f.Mode == "" || f.Count == 0 {
		return OpFault{}
	}
	out := *f
	if f.Count > 0 {
		f.Count--
		if f.Count == 0 {
			*f = OpFault{}
		}
	}
	return out
}

// asyncTask makes a task that clients see as running until fn returns.
// delay: extra time before fn runs; forever: never completes.
func (h *Harness) runTask(t *simulator.Task, delay time.Duration, forever bool, fn func() (types.AnyType, types.BaseMethodFault, string)) chan struct{} {
	done := make(chan struct{})
	simulator.Map.WithLock(t, func() {
		simulator.Map.Update(t, []types.PropertyChange{
			{Name: "info.startTime", Val: time.Now()},
			{Name: "info.state", Val: types.TaskInfoStateRunning},
			{Name: "info.progress", Val: int32(0)},
		})
	})
	finish := func() {
		res, fault, msg := fn()
		state := types.TaskInfoStateSuccess
		var lf *types.LocalizedMethodFault
		if fault != nil {
			state = types.TaskInfoStateError
			if msg == "" {
				msg = fmt.Sprintf("%T", fault)
			}
			lf = &types.LocalizedMethodFault{Fault: fault, LocalizedMessage: msg}
		}
		simulator.Map.WithLock(t, func() {
			changes := []types.PropertyChange{
				{Name: "info.completeTime", Val: time.Now()},
				{Name: "info.state", Val: state},
				{Name: "info.progress", Val: int32(100)},
			}
			if res != nil {
				changes = append(changes, types.PropertyChange{Name: "info.result", Val: res})
			}
			if lf != nil {
				changes = append(changes, types.PropertyChange{Name: "info.error", Val: lf})
			}
			simulator.Map.Update(t, changes)
		})
		close(done)
	}
	if forever {
		return done // stays running
	}
	if delay <= 0 {
		finish()
		return done
	}
	go func() {
		time.Sleep(delay)
		finish()
	}()
	return done
}

func faultMsg(f OpFault, def string) string {
	if f.Msg != "" {
		return f.Msg
	}
	return def
}

// doCreate runs CreateSnapshot with faults applied; returns the task and a
// channel closed on completion.
func (h *Harness) doCreate(st *VMState, name, desc string, memory, quiesce bool, via string) (*simulator.Task, chan struct{}) {
	h.bump("create_snapshot")
	f := h.takeFault("create")
	t := simulator.CreateTask(st.vm, "createSnapshotTask", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, nil })
	t.Info.EntityName = st.Name
	t.Info.DescriptionId = "VirtualMachine.createSnapshot"
	delay := time.Duration(h.spec.TaskMillis) * time.Millisecond
	forever := false
	fail := f.Mode == "fail"
	if f.Mode == "hang" {
		if f.Seconds <= 0 {
			forever = true
		} else {
			delay += time.Duration(f.Seconds * float64(time.Second))
		}
		fail = f.Then == "fail"
	}
	if f.Mode != "" {
		h.event("create", st.Name, name, via, "fault:"+f.Mode)
	}
	done := h.runTask(t, delay, forever, func() (types.AnyType, types.BaseMethodFault, string) {
		if fail {
			h.event("create", st.Name, name, via, "failed (injected)")
			return nil, &types.GenericVmConfigFault{Reason: faultMsg(f, "injected failure")},
				faultMsg(f, "An error occurred while saving the snapshot: injected failure (esxi-sim).")
		}
		snap, fault, msg := h.createSnapshot(st, name, desc, memory, quiesce)
		if fault != nil {
			h.event("create", st.Name, name, via, "failed: "+msg)
			return nil, fault, msg
		}
		h.event("create", st.Name, name, via, "ok "+snap.Ref.Value)
		h.intrude(st)
		return snap.Ref, nil, ""
	})
	return t, done
}

func (h *Harness) doRemove(st *VMState, ref types.ManagedObjectReference, removeChildren bool, via, method, descID string) (*simulator.Task, chan struct{}) {
	h.bump("remove_snapshot")
	f := h.takeFault("remove")
	t := simulator.CreateTask(st.vm, "removeSnapshotTask", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, nil })
	t.Info.Name = method
	t.Info.EntityName = st.Name
	t.Info.DescriptionId = descID
	name := ""
	st.mu.Lock()
	for _, s := range st.Snaps {
		if s.Ref == ref {
			name = s.Name
		}
	}
	st.mu.Unlock()
	delay := time.Duration(h.spec.TaskMillis) * time.Millisecond
	forever := false
	fail := f.Mode == "fail"
	if f.Mode == "hang" {
		if f.Seconds <= 0 {
			forever = true
		} else {
			delay += time.Duration(f.Seconds * float64(time.Second))
		}
		fail = f.Then == "fail"
	}
	if f.Mode != "" {
		h.event("remove", st.Name, name, via, "fault:"+f.Mode)
	}
	done := h.runTask(t, delay, forever, func() (types.AnyType, types.BaseMethodFault, string) {
		if fail {
			h.event("remove", st.Name, name, via, "failed (injected)")
			return nil, &types.GenericVmConfigFault{Reason: faultMsg(f, "injected failure")},
				faultMsg(f, "An error occurred while consolidating disks: injected failure (esxi-sim).")
		}
		fault, msg := h.removeSnapshot(st, ref, removeChildren)
		if fault != nil {
			h.event("remove", st.Name, name, via, "failed: "+msg)
			return nil, fault, msg
		}
		h.event("remove", st.Name, name, via, "ok")
		return nil, nil, ""
	})
	return t, done
}

// intrude carries out a pending IntrudeFault on st, in the background (once).
func (h *Harness) intrude(st *VMState) {
	h.mu.Lock()
	f := h.faults.Intrude
	h.faults.Intrude = IntrudeFault{}
	h.mu.Unlock()
	if f.Action == "" {
		return
	}
	go func() {
		time.Sleep(time.Duration(f.Seconds * float64(time.Second)))
		switch f.Action {
		case "create":
			_, done := h.doCreate(st, f.Name, "taken by someone else during a backup (esxi-sim intruder)", false, false, "intruder")
			<-done
		case "remove":
			var ref *types.ManagedObjectReference
			st.mu.Lock()
			for _, s := range st.Snaps {
				if s.Name == f.Name {
					r := s.Ref
					ref = &r
				}
			}
			st.mu.Unlock()
			if ref == nil {
				h.event("remove", st.Name, f.Name, "intruder", "failed: no such snapshot")
				return
			}
			_, done := h.doRemove(st, *ref, false, "intruder", "RemoveSnapshot_Task", "vm.Snapshot.remove")
			<-done
		}
	}()
}

func (h *Harness) soapCreateSnapshot(w http.ResponseWriter, st *VMState, req *types.CreateSnapshot_Task) {
	t, _ := h.doCreate(st, req.Name, req.Description, req.Memory, req.Quiesce, "api")
	taskResponse(w, "CreateSnapshot_Task", t.Self)
}

func (h *Harness) soapRemoveSnapshot(w http.ResponseWriter, st *VMState, ref types.ManagedObjectReference, removeChildren bool, method, descID string) {
	t, _ := h.doRemove(st, ref, removeChildren, "api", method, descID)
	taskResponse(w, method, t.Self)
}

// ---- RegisterVM_Task: create the files the simulator insists on, then give
// the new VM the disks named in its .vmx. ----

var vmxLineRe = regexp.MustCompile(`^\s*([A-Za-z0-9_.:]+)\s*=\s*"(.*)"\s*$`)

func parseVmx(text string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		if sm := vmxLineRe.FindStringSubmatch(strings.TrimRight(line, "\r")); sm != nil {
			m[strings.ToLower(sm[1])] = sm[2]
		}
	}
	return m
}

func (h *Harness) soapRegisterVM(w http.ResponseWriter, r *http.Request, req *types.RegisterVM_Task) {
	ds, rel, ok := parseDsPath(req.Path)
	dir, ok2 := h.dsDir[ds]
	var created []string
	if ok && ok2 {
		vmxLocal := filepath.Join(dir, rel)
		name := req.Name
		if name == "" {
			name = filepath.Dir(rel)
		}
		for _, f := range []string{name + ".nvram", "vmware.log"} {
			p := filepath.Join(filepath.Dir(vmxLocal), f)
			if _, err := os.Stat(vmxLocal); err == nil {
				if _, err := os.Stat(p); os.IsNotExist(err) {
					if ioutil.WriteFile(p, nil, 0644) == nil {
						created = append(created, p)
					}
				}
			}
		}
	}
	rec := httptest.NewRecorder()
	h.model.Service.ServeMux.ServeHTTP(rec, r)
	// Find the task and its result.
	var resp struct {
		Body struct {
			Res struct {
				Returnval types.ManagedObjectReference `xml:"returnval"`
			} `xml:"RegisterVM_TaskResponse"`
		} `xml:"Body"`
	}
	_ = xml.Unmarshal(rec.Body.Bytes(), &resp)
	if t, ok := simulator.Map.Get(resp.Body.Res.Returnval).(*simulator.Task); ok && t.Info.State == types.TaskInfoStateSuccess {
		if ref, ok := t.Info.Result.(types.ManagedObjectReference); ok {
			if err := h.attachVmxDisks(ref); err != nil {
				log.Printf("RegisterVM %s: attaching disks: %v", req.Path, err)
			}
		}
	} else {
		for _, p := range created {
			os.Remove(p)
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

func (h *Harness) attachVmxDisks(ref types.ManagedObjectReference) error {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return fmt.Errorf("no vm %v", ref)
	}
	var vmxDs string
	simulator.Map.WithLock(vm, func() { vmxDs = vm.Config.Files.VmPathName })
	ds, rel, _ := parseDsPath(vmxDs)
	vmxLocal := filepath.Join(h.dsDir[ds], rel)
	raw, err := ioutil.ReadFile(vmxLocal)
	if err != nil {
		return err
	}
	kv := parseVmx(string(raw))
	ctrl := &types.VirtualLsiLogicController{VirtualSCSIController: types.VirtualSCSIController{
		SharedBus:         types.VirtualSCSISharingNoSharing,
		VirtualController: types.VirtualController{BusNumber: 0, VirtualDevice: types.VirtualDevice{Key: 1000}}}}
	changes := []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: ctrl}}
	n := 0
	tops := map[int32]string{}
	for unit := int32(0); unit < 16; unit++ {
		key := fmt.Sprintf("scsi0:%d", unit)
		fn, ok := kv[key+".filename"]
		if !ok || strings.EqualFold(kv[key+".present"], "FALSE") {
			continue
		}
		local := fn
		if !filepath.IsAbs(fn) {
			local = filepath.Join(filepath.Dir(vmxLocal), fn)
		}
		dsPath := h.dsPathOf(local)
		if dsPath == "" {
			log.Printf("RegisterVM: %s is on no datastore", local)
			continue
		}
		size := int64(0)
		attach := dsPath
		if chain, err := descriptorChain(local); err == nil && chain[0].Sectors > 0 {
			size = chain[0].Sectors * 512 // the base's size, whatever link the .vmx names
			if len(chain) > 1 {
				// The simulator attaches only flat disks: attach the base, then point the
				// backing at the link the .vmx names (the VM's state reads the chain from it).
				if bp := h.dsPathOf(chain[0].Descriptor); bp != "" {
					attach = bp
					tops[int32(2000+n)] = dsPath
				}
			}
		} else if fi, err := os.Stat(strings.TrimSuffix(local, ".vmdk") + "-flat.vmdk"); err == nil {
			size = fi.Size()
		}
		dsRef := h.dsRef(strings.TrimPrefix(strings.SplitN(dsPath, "]", 2)[0], "["))
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key: int32(2000 + n), ControllerKey: 1000, UnitNumber: types.NewInt32(unit),
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: attach, Datastore: &dsRef},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(true),
					Uuid:                         vmdkUUID(),
				},
			},
			CapacityInKB: size / 1024, CapacityInBytes: size,
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: disk})
		n++
	}
	if n == 0 {
		return nil
	}
	task, err := object.NewVirtualMachine(h.client, ref).Reconfigure(context.Background(), types.VirtualMachineConfigSpec{DeviceChange: changes})
	if err != nil {
		return err
	}
	if err := task.Wait(context.Background()); err != nil {
		return err
	}
	simulator.Map.WithLock(vm, func() {
		for _, dev := range vm.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok && tops[vd.Key] != "" {
				if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					b.FileName = tops[vd.Key]
				}
			}
		}
	})
	// Layout the way the harness computes it.
	if st := h.stateByRef(ref); st != nil {
		simulator.Map.WithLock(vm, func() { h.syncVMLocked(st) })
	}
	return nil
}
