// esxi-sim: a vSphere (ESXi) endpoint for affa's tests, built on govmomi's
// simulator, with the host behaviour that a backup depends on added on top:
// delta disks on snapshot, writes of a "running VM", consolidation on
// snapshot removal, faults on demand, and a vim-cmd stand-in.
// See README.md.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// Spec is the JSON start-up description (see README.md).
type Spec struct {
	Listen         string   `json:"listen"`
	ControlListen  string   `json:"control_listen"`
	User           string   `json:"user"`
	Password       string   `json:"password"`
	PlainHTTP      bool     `json:"plain_http"`
	CertFile       string   `json:"cert_file"`
	Datastores     []DSSpec `json:"datastores"`
	VMs            []VMSpec `json:"vms"`
	FreeLicense    bool     `json:"free_license"`
	TaskMillis     int      `json:"task_ms"`
	HashOnSnapshot *bool    `json:"hash_on_snapshot"`
	StdinEOFExit   *bool    `json:"stdin_eof_exit"`
	LogFile        string   `json:"log_file"`
	Trace          bool     `json:"trace"`
	CbtBlockBytes  int64    `json:"cbt_block_bytes"`
	CbtPageExtents int      `json:"cbt_page_extents"`
	// A session idle longer than this is dropped (the simulator's SessionIdleTimeout; ESXi's
	// hostd drops one after 30 minutes by default); 0: sessions never expire.
	SessionIdleMillis int `json:"session_idle_ms"`
}

type DSSpec struct {
	Name string `json:"name"`
	Dir  string `json:"dir"`
}

type VMSpec struct {
	Name       string     `json:"name"`
	PowerOn    bool       `json:"power_on"`
	Disks      []DiskSpec `json:"disks"`
	GuestID    string     `json:"guest_id"`
	MemoryMB   int32      `json:"memory_mb"`
	NoTools    bool       `json:"no_tools"`
	Annotation string     `json:"annotation"`
}

type DiskSpec struct {
	Datastore string `json:"datastore"`
	SizeBytes int64  `json:"size_bytes"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "vim-cmd" {
		os.Exit(vimCmdMain(os.Args[2:]))
	}
	var (
		config  = flag.String("config", "", "JSON spec file (see README.md)")
		noStdin = flag.Bool("no-stdin-exit", false, "do not exit when stdin reaches EOF")
	)
	flag.Parse()
	if *config == "" {
		fmt.Fprintln(os.Stderr, "usage: esxi-sim --config spec.json [--no-stdin-exit] | esxi-sim vim-cmd --control URL vmsvc/...")
		os.Exit(2)
	}
	raw, err := ioutil.ReadFile(*config)
	if err != nil {
		log.Fatal(err)
	}
	var spec Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		log.Fatalf("spec %s: %v", *config, err)
	}
	if *noStdin {
		f := false
		spec.StdinEOFExit = &f
	}
	if spec.LogFile != "" {
		f, err := os.OpenFile(spec.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0644)
		if err != nil {
			log.Fatal(err)
		}
		log.SetOutput(f)
	} else {
		log.SetOutput(os.Stderr)
	}
	if err := run(&spec); err != nil {
		log.Printf("esxi-sim: %v", err)
		fmt.Fprintf(os.Stderr, "esxi-sim: %v\n", err)
		os.Exit(1)
	}
}

func run(spec *Spec) error {
	if spec.Listen == "" {
		spec.Listen = "127.0.0.1:0"
	}
	if spec.ControlListen == "" {
		spec.ControlListen = "127.0.0.1:0"
	}
	if spec.User == "" || spec.Password == "" {
		return fmt.Errorf("spec needs user and password")
	}
	if spec.User == simulator.DefaultLogin.Username() {
		return fmt.Errorf("user %q is the simulator default, whose password is not checked: choose another", spec.User)
	}
	simulator.Trace = spec.Trace
	if spec.SessionIdleMillis > 0 {
		simulator.SessionIdleTimeout = time.Duration(spec.SessionIdleMillis) * time.Millisecond
	}

	model := simulator.ESX()
	model.Datastore = 0
	model.Machine = 0
	model.Autostart = false
	if err := model.Create(); err != nil {
		return fmt.Errorf("model: %v", err)
	}
	// Throw-away server: NewServer registers the /sdk, /folder ... handlers
	// on Service.ServeMux; we serve that mux ourselves behind our own handler.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(spec.User, spec.Password)}
	tmp := model.Service.NewServer()
	tmp.Close()

	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return err
	}
	h := newHarness(spec, model, client)

	if err := h.setupDatastores(ctx); err != nil {
		return err
	}
	for _, vs := range spec.VMs {
		if err := h.createVM(ctx, vs); err != nil {
			return fmt.Errorf("vm %s: %v", vs.Name, err)
		}
	}

	// SOAP listener
	ln, err := net.Listen("tcp", spec.Listen)
	if err != nil {
		return err
	}
	scheme := "http"
	thumb := ""
	if !spec.PlainHTTP {
		cert, der, err := makeCert()
		if err != nil {
			return err
		}
		if spec.CertFile != "" {
			p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
			if err := ioutil.WriteFile(spec.CertFile, p, 0644); err != nil {
				return err
			}
		}
		sum := sha256.Sum256(der)
		parts := make([]string, len(sum))
		for i, b := range sum {
			parts[i] = fmt.Sprintf("%02X", b)
		}
		thumb = strings.Join(parts, ":")
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		scheme = "https"
	}
	host := ln.Addr().String()
	simulator.Map.SessionManager().ServiceHostName = host
	soapSrv := &http.Server{Handler: h, ErrorLog: log.New(ioutil.Discard, "", 0)}
	go func() { _ = soapSrv.Serve(ln) }()

	cln, err := net.Listen("tcp", spec.ControlListen)
	if err != nil {
		return err
	}
	ctlSrv := &http.Server{Handler: h.controlMux()}
	go func() { _ = ctlSrv.Serve(cln) }()

	out := map[string]string{
		"url":        fmt.Sprintf("%s://%s/sdk", scheme, host),
		"thumbprint": thumb,
		"control":    "http://" + cln.Addr().String(),
	}
	line, _ := json.Marshal(out)
	os.Stdout.Write(append(line, '\n'))
	log.Printf("esxi-sim ready: %s", line)

	done := make(chan string, 2)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { s := <-sig; done <- "signal " + s.String() }()
	if spec.StdinEOFExit == nil || *spec.StdinEOFExit {
		go func() { _, _ = io.Copy(ioutil.Discard, os.Stdin); done <- "stdin EOF" }()
	}
	why := <-done
	log.Printf("esxi-sim exiting: %s", why)
	h.stopAllWriters()
	return nil
}

func makeCert() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost.localdomain", Organization: []string{"VMware Installer"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, nil
}

func (h *Harness) setupDatastores(ctx context.Context) error {
	hs := simulator.Map.Any("HostSystem").(*simulator.HostSystem)
	host := object.NewHostSystem(h.client, hs.Reference())
	dss, err := host.ConfigManager().DatastoreSystem(ctx)
	if err != nil {
		return err
	}
	for _, d := range h.spec.Datastores {
		dir, err := filepath.Abs(d.Dir)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(dir, 0755); err != nil {
			return err
		}
		if _, err := dss.CreateLocalDatastore(ctx, d.Name, dir); err != nil {
			return fmt.Errorf("datastore %s: %v", d.Name, err)
		}
		h.dsDir[d.Name] = dir
	}
	return nil
}

func (h *Harness) createVM(ctx context.Context, vs VMSpec) error {
	if len(vs.Disks) == 0 {
		return fmt.Errorf("no disks")
	}
	ds0 := vs.Disks[0].Datastore
	dir0, ok := h.dsDir[ds0]
	if !ok {
		return fmt.Errorf("unknown datastore %q", ds0)
	}
	if err := os.MkdirAll(filepath.Join(dir0, vs.Name), 0755); err != nil {
		return err
	}
	for _, f := range []string{vs.Name + ".vmx", vs.Name + ".nvram", "vmware.log"} {
		if _, err := os.Stat(filepath.Join(dir0, vs.Name, f)); err == nil {
			return fmt.Errorf("%s already exists in %s (the simulator refuses to create over it)", f, filepath.Join(dir0, vs.Name))
		}
	}
	guest := vs.GuestID
	if guest == "" {
		guest = "otherLinux64Guest"
	}
	mem := vs.MemoryMB
	if mem == 0 {
		mem = 256
	}
	ctrl := &types.VirtualLsiLogicController{VirtualSCSIController: types.VirtualSCSIController{
		SharedBus: types.VirtualSCSISharingNoSharing,
		VirtualController: types.VirtualController{
			BusNumber:     0,
			VirtualDevice: types.VirtualDevice{Key: 1000},
		}}}
	changes := []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: ctrl},
	}
	var disks []*Disk
	for i, d := range vs.Disks {
		dir, ok := h.dsDir[d.Datastore]
		if !ok {
			return fmt.Errorf("unknown datastore %q", d.Datastore)
		}
		if d.SizeBytes <= 0 || d.SizeBytes%512 != 0 {
			return fmt.Errorf("disk %d: size_bytes must be a positive multiple of 512", i)
		}
		base := vs.Name
		if i > 0 {
			base = fmt.Sprintf("%s_%d", vs.Name, i)
		}
		vmdir := filepath.Join(dir, vs.Name)
		if err := os.MkdirAll(vmdir, 0755); err != nil {
			return err
		}
		flat := filepath.Join(vmdir, base+"-flat.vmdk")
		if _, err := os.Stat(flat); os.IsNotExist(err) {
			f, err := os.Create(flat)
			if err != nil {
				return err
			}
			if err := f.Truncate(d.SizeBytes); err != nil {
				f.Close()
				return err
			}
			f.Close()
		}
		desc := filepath.Join(vmdir, base+".vmdk")
		cid := randHex(4)
		if old, err := ioutil.ReadFile(desc); err == nil {
			if c := descriptorField(string(old), "CID"); c != "" {
				cid = c
			}
		} else {
			if err := ioutil.WriteFile(desc, []byte(baseDescriptor(base, d.SizeBytes, cid)), 0644); err != nil {
				return err
			}
		}
		unit := int32(i)
		if unit >= 7 {
			unit++
		}
		dsPath := fmt.Sprintf("[%s] %s/%s.vmdk", d.Datastore, vs.Name, base)
		dsRef := h.dsRef(d.Datastore)
		uuid := vmdkUUID()
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(2000 + i),
				ControllerKey: 1000,
				UnitNumber:    types.NewInt32(unit),
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: dsPath, Datastore: &dsRef},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(true),
					Uuid:                         uuid,
				},
			},
			CapacityInKB:    d.SizeBytes / 1024,
			CapacityInBytes: d.SizeBytes,
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: disk})
		disks = append(disks, &Disk{
			Index: i, Key: int32(2000 + i), Unit: unit, Datastore: d.Datastore, Dir: vmdir, RelDir: vs.Name, Size: d.SizeBytes,
			Layers: []*Layer{{Base: base, DsPath: dsPath, Descriptor: desc, Data: flat, CID: cid, Uuid: uuid}},
		})
	}
	spec := types.VirtualMachineConfigSpec{
		Name:         vs.Name,
		GuestId:      guest,
		MemoryMB:     int64(mem),
		NumCPUs:      1,
		Version:      "vmx-13",
		Annotation:   vs.Annotation,
		Files:        &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s] %s/%s.vmx", ds0, vs.Name, vs.Name)},
		DeviceChange: changes,
	}
	folders, err := object.NewDatacenter(h.client, simulator.Map.Any("Datacenter").Reference()).Folders(ctx)
	if err != nil {
		return err
	}
	pool := simulator.Map.Any("ResourcePool")
	hs := simulator.Map.Any("HostSystem")
	hostObj := object.NewHostSystem(h.client, hs.Reference())
	task, err := folders.VmFolder.CreateVM(ctx, spec, object.NewResourcePool(h.client, pool.Reference()), hostObj)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	ref := info.Result.(types.ManagedObjectReference)
	vm := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	st := &VMState{Name: vs.Name, Ref: ref, vm: vm, Disks: disks, Tools: !vs.NoTools,
		VmxLocal: filepath.Join(dir0, vs.Name, vs.Name+".vmx"), VmxDs: spec.Files.VmPathName, GuestID: guest, Annotation: vs.Annotation}
	// The simulator wrote an empty .vmx; write a realistic one.
	if err := ioutil.WriteFile(st.VmxLocal, []byte(h.vmxText(st, mem)), 0644); err != nil {
		return err
	}
	_ = ioutil.WriteFile(filepath.Join(dir0, vs.Name, vs.Name+".vmsd"), []byte(".encoding = \"UTF-8\"\n"), 0644)
	_ = ioutil.WriteFile(filepath.Join(dir0, vs.Name, vs.Name+".vmxf"), []byte(vmxfText(vs.Name)), 0644)
	h.mu.Lock()
	h.vms[ref] = st
	h.mu.Unlock()
	simulator.Map.WithLock(vm, func() { h.refreshLayoutLocked(st); h.cbtSetCapabilityLocked(st) })
	if vs.PowerOn {
		if err := h.setPower(ctx, st, true); err != nil {
			return err
		}
	}
	return nil
}

func (h *Harness) dsRef(name string) types.ManagedObjectReference {
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == name {
			return ds.Self
		}
	}
	return types.ManagedObjectReference{}
}

// suspend suspends a powered-on VM (govmomi's SuspendVM_Task: the power state becomes
// suspended; no memory file is written).
func (h *Harness) suspend(ctx context.Context, st *VMState) error {
	t, err := object.NewVirtualMachine(h.client, st.Ref).Suspend(ctx)
	if err != nil {
		return err
	}
	return t.Wait(ctx)
}

func (h *Harness) setPower(ctx context.Context, st *VMState, on bool) error {
	vm := object.NewVirtualMachine(h.client, st.Ref)
	var t *object.Task
	var err error
	if on {
		t, err = vm.PowerOn(ctx)
	} else {
		t, err = vm.PowerOff(ctx)
	}
	if err != nil {
		return err
	}
	return t.Wait(ctx)
}
