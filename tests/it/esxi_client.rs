//! Integration tests of the vSphere SOAP client (`affa::esxi`) against the ESXi simulator harness
//! in `harness/esxi-sim` (govmomi's simulator plus delta disks, faults and a control API).
//!
//! Owns: checking the client end to end against the simulator (the fixture in
//! tests/it/common/sim.rs builds it first if needed; a build failure fails the test with the
//! reason): one per test that changes it or counts its requests, one shared by the tests that
//! only read from it. Must never: skip a test silently, leave a simulator running (each one exits
//! when its stdin closes, the shared one when the test process ends), or touch anything outside
//! its temporary directory.

use affa::esxi::{self, Client, ConnectOptions, MoRef, Password, PowerState};
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use crate::common;

use common::sim::{VmSpec, PASS, USER};

/// The shared simulator fixture (tests/common/sim.rs) with what these tests need on top.
struct Sim {
    inner: common::sim::Sim,
    dir: tempfile::TempDir,
    port: u16,
    thumbprint: String,
    plain: bool,
}

impl Sim {
    fn start() -> Sim {
        Sim::start_with(false, "")
    }

    /// The simulator of the tests that only read from it (log in, look up): one per test
    /// process; its directory is removed when the process ends.
    fn shared() -> &'static Sim {
        static SHARED: LazyLock<Sim> = LazyLock::new(|| {
            let s = Sim::start();
            common::remove_at_exit(s.dir.path());
            s
        });
        &SHARED
    }

    /// Two VMs: vm1 (powered on, disks on datastore1 and ds2) and vm2 (off, one disk).
    fn start_with(plain_http: bool, extra: &str) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let (ds1, ds2) = (dir.path().join("ds1"), dir.path().join("ds2"));
        let inner = common::sim::Sim::start(
            &dir.path().join("sim"),
            &[("datastore1", &ds1), ("ds2", &ds2)],
            &[
                VmSpec {
                    name: "vm1".into(),
                    power_on: true,
                    disks: vec![("datastore1".into(), 1048576), ("ds2".into(), 524288)],
                },
                VmSpec { name: "vm2".into(), power_on: false, disks: vec![("datastore1".into(), 524288)] },
            ],
            &format!(r#","plain_http":{plain_http}{extra}"#),
        );
        let thumbprint = if plain_http { String::new() } else { inner.thumbprint.clone() };
        Sim { port: inner.port, thumbprint, inner, dir, plain: plain_http }
    }

    fn opts(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new("127.0.0.1");
        o.port = self.port;
        o.plain_http = self.plain;
        o.thumbprint = if self.plain { None } else { Some(self.thumbprint.clone()) };
        o.timeout = Duration::from_secs(20);
        o.task_timeout = Duration::from_secs(60);
        o
    }

    fn client(&self) -> Client {
        let mut c = Client::connect(self.opts()).expect("connect");
        c.login(USER, &Password::new(PASS)).expect("login");
        c
    }

    fn control_post(&self, path_query: &str) -> String {
        self.inner.post(path_query)
    }

    fn state(&self) -> String {
        self.inner.state().to_string()
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[test]
fn login_good_and_bad_password_and_logout() {
    let sim = Sim::shared();
    let mut c = Client::connect(sim.opts()).unwrap();
    assert!(c.about().full_name.contains("ESXi"), "{:?}", c.about());
    let e = c.login(USER, &Password::new("wrong")).unwrap_err();
    eprintln!("error seen: {e}");
    assert_eq!(e.message(), format!("wrong user or password for ESXi host {}", sim.host()));
    assert!(!e.message().contains("wrong\""));
    let e = c.login("root", &Password::new(PASS)).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().starts_with("wrong user or password"), "{e}");
    assert!(!e.message().contains(PASS));
    c.login(USER, &Password::new(PASS)).unwrap();
    assert!(c.is_logged_in());
    assert_eq!(c.list_vm_names().unwrap(), vec!["vm1", "vm2"]);
    c.logout().unwrap();
    assert!(!c.is_logged_in());
    // After logout the session is gone on the host too.
    let e = c.list_vm_names().unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains("NotAuthenticated"), "{e}");
    assert!(!format!("{c:?}").contains(PASS));
}

#[test]
fn thumbprint_pinning() {
    let sim = Sim::start();
    // A wrong pin first, while the host has seen no SOAP request at all.
    let wrong = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF";
    let mut o = sim.opts();
    o.thumbprint = Some(wrong.to_lowercase());
    let e = Client::connect(o).unwrap_err();
    eprintln!("error seen: {e}");
    assert_eq!(
        e.message(),
        format!(
            "certificate of ESXi host {} has fingerprint {}, expected {wrong} (job config key ESXiThumbprint)",
            sim.host(),
            sim.thumbprint
        )
    );
    // Nothing reached the SOAP handler.
    let counters = |s: &str| {
        let i = s.find("\"counters\":").expect("counters in /state");
        let j = s[i..].find('}').unwrap() + i;
        s[i..=j].to_string()
    };
    let c0 = counters(&sim.state());
    assert!(!c0.contains("soap:"), "a request got through a wrong pin: {c0}");

    // What --send-key shows is what the harness says; it sends no request either.
    let tp = esxi::fetch_thumbprint("127.0.0.1", sim.port, Duration::from_secs(10)).unwrap();
    assert_eq!(tp, sim.thumbprint);
    assert_eq!(counters(&sim.state()), c0);

    // Pinning is case-insensitive.
    let mut o = sim.opts();
    o.thumbprint = Some(sim.thumbprint.to_lowercase());
    Client::connect(o).unwrap();
    assert!(counters(&sim.state()).contains("soap:RetrieveServiceContent"));

    let mut o = sim.opts();
    o.thumbprint = None;
    let e = Client::connect(o).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains("affa --send-key JOB"), "{e}");
}

#[test]
fn find_vm_found_and_not_found() {
    let sim = Sim::shared();
    let c = sim.client();
    let vm = c.find_vm("vm1").unwrap();
    assert_eq!(vm.kind, "VirtualMachine");
    assert_eq!(c.power_state(&vm).unwrap(), PowerState::PoweredOn);
    let vm2 = c.find_vm("vm2").unwrap();
    assert_ne!(vm, vm2);
    assert_eq!(c.power_state(&vm2).unwrap(), PowerState::PoweredOff);
    let e = c.find_vm("nosuch").unwrap_err();
    eprintln!("error seen: {e}");
    assert_eq!(e.message(), format!("no VM named nosuch on ESXi host {}; VMs there: vm1, vm2", sim.host()));
}

#[test]
fn snapshot_create_makes_delta_and_remove_restores_base() {
    let sim = Sim::start();
    let c = sim.client();
    let vm = c.find_vm("vm1").unwrap();
    let before = c.vm_layout(&vm).unwrap();
    assert_eq!(before.name, "vm1");
    assert_eq!(before.vmx_path(), "[datastore1] vm1/vm1.vmx");
    assert_eq!(before.power_state, PowerState::PoweredOn);
    assert!(before.snapshots.is_empty() && before.current_snapshot.is_none());
    assert_eq!(before.disks.len(), 2);
    assert_eq!(before.disks[0].current().file_name, "[datastore1] vm1/vm1.vmdk");
    assert_eq!(before.disks[1].current().file_name, "[ds2] vm1/vm1_1.vmdk");
    assert!(before.disks.iter().all(|d| !d.has_parent()));
    assert_eq!(before.disks[0].capacity_bytes, 1048576);
    let vmx_host = before.host_path(before.vmx_path()).unwrap();
    assert_eq!(vmx_host, format!("{}/ds1/vm1/vm1.vmx", sim.dir.path().display()));
    assert!(Path::new(&vmx_host).is_file());
    assert!(before.layout_files.iter().any(|f| f.kind == "config" && f.name == before.vmx_path()));
    assert_eq!(before.datastores.len(), 2);

    let t = chrono::NaiveDate::from_ymd_opt(2024, 5, 6).unwrap().and_hms_opt(7, 8, 9).unwrap();
    let name = esxi::snapshot_name("esxi-vm1", t);
    assert_eq!(name, "BEXI-esxi-vm1-20240506070809");
    let snap = c.create_snapshot(&vm, &name, "affa backup", false, false).unwrap();
    assert_eq!(snap.kind, "VirtualMachineSnapshot");

    let during = c.vm_layout(&vm).unwrap();
    assert_eq!(during.current_snapshot.as_ref(), Some(&snap));
    let bexi = during.snapshots_named_like(esxi::SNAPSHOT_PREFIX);
    assert_eq!(bexi.len(), 1);
    assert_eq!(bexi[0].name, name);
    assert_eq!(bexi[0].snapshot, snap);
    assert!(bexi[0].created.is_some());
    for (d, b) in during.disks.iter().zip(&before.disks) {
        assert!(d.has_parent(), "disk {} has no delta after the snapshot", d.label);
        assert_ne!(d.current().file_name, b.current().file_name);
        assert!(d.current().file_name.ends_with("-000001.vmdk"), "{}", d.current().file_name);
        assert_eq!(d.base().file_name, b.current().file_name, "the base is the old backing");
        assert_eq!(d.chain.len(), 2);
        let base_path = during.host_path(&d.base().file_name).unwrap();
        assert!(Path::new(&base_path).is_file(), "{base_path}");
        let delta_path = during.host_path(&d.current().file_name).unwrap();
        assert!(Path::new(&delta_path).is_file(), "{delta_path}");
    }
    assert!(during.layout_files.iter().any(|f| f.name.ends_with(".vmsn")));

    c.remove_snapshot(&snap).unwrap();
    let after = c.vm_layout(&vm).unwrap();
    assert!(after.snapshots.is_empty(), "{:?}", after.snapshots);
    assert!(after.current_snapshot.is_none());
    for (d, b) in after.disks.iter().zip(&before.disks) {
        assert!(!d.has_parent());
        assert_eq!(d.current().file_name, b.current().file_name);
    }
}

#[test]
fn task_hang_times_out_and_task_failure_is_reported() {
    let sim = Sim::start();
    let mut c = sim.client();
    let vm = c.find_vm("vm2").unwrap();

    sim.control_post("/fault?op=create&mode=fail&msg=disk%20full");
    let e = c.create_snapshot(&vm, "BEXI-x-1", "", false, false).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains("CreateSnapshot_Task"), "{e}");
    assert!(e.message().contains("GenericVmConfigFault") && e.message().contains("disk full"), "{e}");
    assert!(e.message().contains(&sim.host()), "{e}");

    sim.control_post("/fault?op=create&mode=hang");
    c.set_task_timeout(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    let e = c.create_snapshot(&vm, "BEXI-x-2", "", false, false).unwrap_err();
    eprintln!("error seen: {e}");
    let took = t0.elapsed();
    assert!(e.message().contains("CreateSnapshot_Task BEXI-x-2"), "{e}");
    assert!(e.message().contains("within 2 s"), "{e}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn register_vm_from_copied_files() {
    let sim = Sim::start();
    let c = sim.client();
    // A "restore to another directory": copy vm2's files to ds1/restored/.
    let src = sim.dir.path().join("ds1/vm2");
    let dst = sim.dir.path().join("ds1/restored");
    std::fs::create_dir(&dst).unwrap();
    for f in ["vm2.vmdk", "vm2-flat.vmdk"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    std::fs::copy(src.join("vm2.vmx"), dst.join("restored.vmx")).unwrap();

    let names = c.list_vm_names().unwrap();
    assert!(!names.contains(&"restored".to_string()));
    let new_vm = c.register_vm("[datastore1] restored/restored.vmx", Some("restored")).unwrap();
    assert_eq!(new_vm.kind, "VirtualMachine");
    assert_eq!(c.find_vm("restored").unwrap(), new_vm);
    assert_eq!(c.list_vm_names().unwrap(), vec!["restored", "vm1", "vm2"]);
    assert_eq!(c.power_state(&new_vm).unwrap(), PowerState::PoweredOff);
    let l = c.vm_layout(&new_vm).unwrap();
    assert_eq!(l.vmx_path(), "[datastore1] restored/restored.vmx");
    assert_eq!(l.disks.len(), 1);
    assert_eq!(l.disks[0].current().file_name, "[datastore1] restored/vm2.vmdk");
    let e = c.register_vm("[datastore1] nosuch/nosuch.vmx", Some("nosuch")).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains(&sim.host()), "{e}");
    assert!(!e.message().contains('\n'), "{e}");
}

#[test]
fn http_503_refused_connection_and_readonly_licence() {
    let sim = Sim::start_with(true, "");
    let c = sim.client(); // plain_http: no thumbprint needed
    let vm = c.find_vm("vm1").unwrap();

    sim.control_post("/fault?op=readonly&mode=fail");
    let e = c.create_snapshot(&vm, "BEXI-x-1", "", false, false).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains("RestrictedVersion") && e.message().contains("free"), "{e}");
    sim.control_post("/fault?op=clear");

    sim.control_post("/fault?op=all503&mode=fail");
    let e = c.power_state(&vm).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains("HTTP 503") && e.message().contains(&sim.host()), "{e}");
    sim.control_post("/fault?op=clear");
    assert_eq!(c.power_state(&vm).unwrap(), PowerState::PoweredOn);

    let port = sim.port;
    drop(c);
    drop(sim);
    let mut o = ConnectOptions::new("127.0.0.1");
    o.port = port;
    o.plain_http = true;
    o.timeout = Duration::from_secs(5);
    let e = Client::connect(o).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().starts_with(&format!("cannot connect to ESXi host 127.0.0.1:{port}")), "{e}");
}

#[test]
fn unknown_moref_is_a_one_line_fault() {
    let sim = Sim::shared();
    let c = sim.client();
    let e = c.power_state(&MoRef::new("VirtualMachine", "vm-999999")).unwrap_err();
    eprintln!("error seen: {e}");
    assert!(e.message().contains(&sim.host()), "{e}");
    assert!(!e.message().contains('\n'), "{e}");
}
