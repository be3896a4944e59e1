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

// ---- Changed Block Tracking (issue 14) ----

/// The harness tracks changes in blocks of this size (its `cbt_block_bytes` default): a guest
/// write is reported as the whole 64 KiB blocks it touches, as a host reports whole tracking
/// blocks.
const CBT_BLOCK: u64 = 65536;

/// Guest writes (offset, length) rounded out to whole CBT blocks, merged, sorted.
fn rounded(writes: &[(u64, u64)], capacity: u64) -> Vec<(u64, u64)> {
    let mut blocks: Vec<u64> =
        writes.iter().flat_map(|&(o, l)| (o / CBT_BLOCK..=(o + l - 1) / CBT_BLOCK).collect::<Vec<_>>()).collect();
    blocks.sort();
    blocks.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        let (s, e) = (b * CBT_BLOCK, ((b + 1) * CBT_BLOCK).min(capacity));
        match out.last_mut() {
            Some(l) if l.0 + l.1 == s => l.1 += e - s,
            _ => out.push((s, e - s)),
        }
    }
    out
}

impl Sim {
    /// A guest write of `len` bytes of `byte` at `off` on disk `disk` of `vm` (to the running
    /// delta while a snapshot exists).
    fn write(&self, vm: &str, disk: usize, off: u64, len: u64, byte: u8) {
        self.inner.post_bytes(&format!("/write?vm={vm}&disk={disk}&offset={off}"), &vec![byte; len as usize]);
    }

    fn counter(&self, name: &str) -> u64 {
        self.inner.state()["counters"][name].as_u64().unwrap_or(0)
    }
}

/// (epoch, sequence) of a changeId `52 xx .. xx/N`.
fn change_id_parts(id: &str) -> (String, u64) {
    let (epoch, seq) = id.rsplit_once('/').unwrap_or_else(|| panic!("changeId {id:?} has no '/'"));
    assert!(epoch.starts_with("52 ") && epoch.len() == 47, "changeId {id:?}");
    (epoch.to_string(), seq.parse().unwrap_or_else(|_| panic!("changeId {id:?}")))
}

/// CBT switched on for `vm` and started by a first snapshot (a first backup's): that snapshot and
/// its frozen disks (with their first changeIds).
fn cbt_first_snapshot(c: &Client, vm: &MoRef) -> (MoRef, Vec<esxi::FrozenDisk>) {
    c.enable_cbt(vm).unwrap();
    let s1 = c.create_snapshot(vm, "BEXI-cbt-1", "", false, false).unwrap();
    let disks = c.snapshot_disks(&s1).unwrap();
    (s1, disks)
}

/// The fault type of a host fault; panics (with the error) on anything else.
fn fault_kind(e: &affa::error::Error) -> String {
    assert_eq!(e.kind(), affa::error::ErrorKind::Remote, "{e}");
    esxi::fault_of(e).unwrap_or_else(|| panic!("not a host fault: {e}")).kind.clone()
}

#[test]
fn cbt_state_on_supported_and_unsupported_hosts_and_enable() {
    let sim = Sim::start();
    let c = sim.client();
    let (vm1, vm2) = (c.find_vm("vm1").unwrap(), c.find_vm("vm2").unwrap());
    assert_eq!(c.cbt_state(&vm1).unwrap(), esxi::CbtState { supported: true, enabled: false });

    // A host (licence, hardware) without CBT: the capability says so and enabling is refused.
    sim.control_post("/cbt?vm=vm2&supported=0");
    assert_eq!(c.cbt_state(&vm2).unwrap(), esxi::CbtState { supported: false, enabled: false });
    let e = c.enable_cbt(&vm2).unwrap_err();
    eprintln!("error seen: {e}");
    assert_eq!(fault_kind(&e), "NotSupported");
    assert_eq!(c.cbt_state(&vm2).unwrap(), esxi::CbtState { supported: false, enabled: false });

    // A free licence: the API is read-only.
    sim.control_post("/fault?op=readonly&mode=fail");
    let e = c.enable_cbt(&vm1).unwrap_err();
    assert_eq!(fault_kind(&e), "RestrictedVersion", "{e}");
    sim.control_post("/fault?op=clear");
    assert_eq!(c.cbt_state(&vm1).unwrap(), esxi::CbtState { supported: true, enabled: false });

    c.enable_cbt(&vm1).unwrap();
    assert_eq!(c.cbt_state(&vm1).unwrap(), esxi::CbtState { supported: true, enabled: true });
    // Tracking starts at the next stun: no changeId yet.
    assert!(c.vm_layout(&vm1).unwrap().disks.iter().all(|d| d.current().change_id.is_none()));

    let s1 = c.create_snapshot(&vm1, "BEXI-cbt-1", "", false, false).unwrap();
    let d1 = c.snapshot_disks(&s1).unwrap();
    assert_eq!(d1.len(), 2);
    assert_eq!(
        (d1[0].device_key, d1[0].file.as_str(), d1[0].capacity_bytes),
        (2000, "[datastore1] vm1/vm1.vmdk", 1048576)
    );
    assert_eq!((d1[1].device_key, d1[1].file.as_str(), d1[1].capacity_bytes), (2001, "[ds2] vm1/vm1_1.vmdk", 524288));
    assert!(d1.iter().all(|d| d.uuid.is_some()), "{d1:?}");
    let ids1: Vec<_> = d1.iter().map(|d| change_id_parts(d.change_id.as_deref().expect("a changeId"))).collect();
    assert_ne!(ids1[0].0, ids1[1].0, "each disk has its own tracking epoch");
    // The snapshot froze the base disk, while the VM now runs on the delta.
    let during = c.vm_layout(&vm1).unwrap();
    assert!(during.disks[0].current().file_name.ends_with("-000001.vmdk"));
    c.remove_snapshot(&s1).unwrap();

    let s2 = c.create_snapshot(&vm1, "BEXI-cbt-2", "", false, false).unwrap();
    let d2 = c.snapshot_disks(&s2).unwrap();
    for (a, b) in ids1.iter().zip(&d2) {
        let (epoch, seq) = change_id_parts(b.change_id.as_deref().unwrap());
        assert_eq!(epoch, a.0, "same tracking epoch");
        assert!(seq > a.1, "the later snapshot has a later changeId: {seq} after {}", a.1);
    }
    c.remove_snapshot(&s2).unwrap();

    // A VM where CBT is off has snapshots without changeIds.
    let s = c.create_snapshot(&vm2, "BEXI-nocbt-1", "", false, false).unwrap();
    assert!(c.snapshot_disks(&s).unwrap().iter().all(|d| d.change_id.is_none()));
    c.remove_snapshot(&s).unwrap();
}

#[test]
fn cbt_changed_areas_are_the_guest_writes_over_several_pages() {
    let sim = Sim::start();
    let c = sim.client();
    let vm = c.find_vm("vm1").unwrap();
    let (s1, base) = cbt_first_snapshot(&c, &vm);
    // Writes during the backup window (they land in the delta and belong to the next run)...
    let mut writes = vec![(0u64, 512u64), (3 * CBT_BLOCK + 100, 10), (5 * CBT_BLOCK - 1, 2)];
    for &(o, l) in &writes {
        sim.write("vm1", 0, o, l, 0xa5);
    }
    c.remove_snapshot(&s1).unwrap();
    // ... and after it: 5 extents after rounding in all, more than one answer of 4 holds.
    for k in [8u64, 10, 12, 13, 14] {
        writes.push((k * CBT_BLOCK + 4096, 4096));
    }
    writes.push((15 * CBT_BLOCK, 1)); // touches the neighbour of 14: merged
    writes.push((1048576 - 512, 512)); // the last sector
    for &(o, l) in &writes[3..] {
        sim.write("vm1", 0, o, l, 0x5a);
    }
    sim.write("vm1", 1, 0, 4096, 1); // another disk: not in disk 0's answer
    let s2 = c.create_snapshot(&vm, "BEXI-cbt-2", "", false, false).unwrap();
    let disks = c.snapshot_disks(&s2).unwrap();
    let want = rounded(&writes, 1048576);
    assert_eq!(
        want,
        vec![
            (0, CBT_BLOCK),
            (3 * CBT_BLOCK, CBT_BLOCK),
            (4 * CBT_BLOCK, 2 * CBT_BLOCK),
            (8 * CBT_BLOCK, CBT_BLOCK),
            (10 * CBT_BLOCK, CBT_BLOCK),
            (12 * CBT_BLOCK, 4 * CBT_BLOCK),
        ]
        .into_iter()
        .fold(Vec::<(u64, u64)>::new(), |mut v, e| {
            match v.last_mut() {
                Some(l) if l.0 + l.1 == e.0 => l.1 += e.1,
                _ => v.push(e),
            }
            v
        })
    );
    let before = sim.counter("soap:QueryChangedDiskAreas");
    let got = c.changed_areas(&vm, &s2, &disks[0], base[0].change_id.as_deref().unwrap()).unwrap();
    assert_eq!(got, want);
    let calls = sim.counter("soap:QueryChangedDiskAreas") - before;
    assert!(calls >= 2, "the answer came in {calls} page(s): paging was not exercised");

    // More extents than a page before merging: 1-extent pages still add up to the same answer.
    sim.control_post("/cbt?vm=vm1&page=1");
    let before = sim.counter("soap:QueryChangedDiskAreas");
    assert_eq!(c.changed_areas(&vm, &s2, &disks[0], base[0].change_id.as_deref().unwrap()).unwrap(), want);
    assert!(sim.counter("soap:QueryChangedDiskAreas") - before >= 5);

    // The other disk: only its own write.
    assert_eq!(
        c.changed_areas(&vm, &s2, &disks[1], base[1].change_id.as_deref().unwrap()).unwrap(),
        vec![(0, CBT_BLOCK)]
    );
    // From the snapshot's own changeId: nothing changed.
    assert_eq!(
        c.changed_areas(&vm, &s2, &disks[0], disks[0].change_id.as_deref().unwrap()).unwrap(),
        Vec::<(u64, u64)>::new()
    );
    // "*": every allocated area of the frozen disk (only written blocks: the disk is thin).
    assert_eq!(c.changed_areas(&vm, &s2, &disks[0], "*").unwrap(), want);

    // The "forgotten extent" fault (VMware's CBT bugs): one extent is missing from the answer.
    sim.control_post("/fault?op=cbt&mode=forget");
    let forgot = c.changed_areas(&vm, &s2, &disks[0], base[0].change_id.as_deref().unwrap()).unwrap();
    assert_eq!(forgot.len(), want.len() - 1, "{forgot:?}");
    assert!(forgot.iter().all(|e| want.contains(e)), "{forgot:?}");
    assert_eq!(c.changed_areas(&vm, &s2, &disks[0], base[0].change_id.as_deref().unwrap()).unwrap(), want);
    c.remove_snapshot(&s2).unwrap();
}

#[test]
fn cbt_foreign_reset_and_resized_change_ids_are_host_faults() {
    let sim = Sim::start_with(true, "");
    let c = sim.client();
    let vm = c.find_vm("vm1").unwrap();
    let (s1, first) = cbt_first_snapshot(&c, &vm);
    let old = first[0].change_id.clone().unwrap();
    c.remove_snapshot(&s1).unwrap();
    let s2 = c.create_snapshot(&vm, "BEXI-cbt-2", "", false, false).unwrap();
    let d = c.snapshot_disks(&s2).unwrap().remove(0);
    let (epoch, seq) = change_id_parts(d.change_id.as_deref().unwrap());
    assert!(c.changed_areas(&vm, &s2, &d, &old).is_ok());

    let foreign = format!("52 00 11 22 33 44 55 66-77 88 99 aa bb cc dd ee/{seq}");
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s2, &d, &foreign).unwrap_err()), "FileFault");
    // A changeId from after the snapshot.
    let later = format!("{epoch}/{}", seq + 1);
    let e = c.changed_areas(&vm, &s2, &d, &later).unwrap_err();
    eprintln!("error seen: {e}");
    assert_eq!(fault_kind(&e), "FileFault");
    assert!(e.message().contains("Error caused by file") && e.message().contains(&sim.host()), "{e}");
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s2, &d, "not a change id").unwrap_err()), "InvalidArgument");
    let mut other = d.clone();
    other.device_key = 2999;
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s2, &other, &old).unwrap_err()), "NotFound");

    // Not reaching the host is no host fault: another kind.
    sim.control_post("/fault?op=all503&mode=fail");
    let e = c.changed_areas(&vm, &s2, &d, &old).unwrap_err();
    assert!(matches!(e.kind(), affa::error::ErrorKind::Io(_)), "{e}: {:?}", e.kind());
    assert!(esxi::fault_of(&e).is_none());
    sim.control_post("/fault?op=clear");
    c.remove_snapshot(&s2).unwrap();

    // CBT toggled off and on: a new epoch, the old changeId is refused.
    let reconfig = |on: bool| {
        let inner = format!(
            "<_this type=\"VirtualMachine\">{}</_this><spec><changeTrackingEnabled>{on}</changeTrackingEnabled></spec>",
            vm.value
        );
        let r = c.call("ReconfigVM_Task", &inner).unwrap();
        let task = esxi::MoRef::from_node(r.child("returnval").unwrap()).unwrap();
        c.wait_for_task(&task, "ReconfigVM_Task", Duration::from_secs(30)).unwrap();
    };
    reconfig(false);
    assert_eq!(c.cbt_state(&vm).unwrap(), esxi::CbtState { supported: true, enabled: false });
    let s3 = c.create_snapshot(&vm, "BEXI-cbt-3", "", false, false).unwrap();
    let d3 = c.snapshot_disks(&s3).unwrap().remove(0);
    assert_eq!(d3.change_id, None, "CBT off: no changeId");
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s3, &d3, &old).unwrap_err()), "FileFault");
    c.remove_snapshot(&s3).unwrap();
    reconfig(true);
    let s4 = c.create_snapshot(&vm, "BEXI-cbt-4", "", false, false).unwrap();
    let d4 = c.snapshot_disks(&s4).unwrap().remove(0);
    let (epoch4, _) = change_id_parts(d4.change_id.as_deref().unwrap());
    assert_ne!(epoch4, epoch, "a reset gives a new epoch");
    let latest_old = d.change_id.clone().unwrap();
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s4, &d4, &latest_old).unwrap_err()), "FileFault");
    c.remove_snapshot(&s4).unwrap();

    // A resize resets tracking too (refused while a snapshot exists, as on a host).
    let s5 = c.create_snapshot(&vm, "BEXI-cbt-5", "", false, false).unwrap();
    let before_resize = c.snapshot_disks(&s5).unwrap()[0].change_id.clone().unwrap();
    let e = ureq::post(&format!("{}/resize?vm=vm1&disk=0&bytes=2097152", sim.inner.control)).call().unwrap_err();
    assert!(matches!(e, ureq::Error::Status(409, _)), "{e}");
    c.remove_snapshot(&s5).unwrap();
    sim.control_post("/resize?vm=vm1&disk=0&bytes=2097152");
    sim.write("vm1", 0, 2097152 - 4096, 4096, 7);
    let s6 = c.create_snapshot(&vm, "BEXI-cbt-6", "", false, false).unwrap();
    let d6 = c.snapshot_disks(&s6).unwrap().remove(0);
    assert_eq!(d6.capacity_bytes, 2097152);
    assert_ne!(change_id_parts(d6.change_id.as_deref().unwrap()).0, epoch4);
    assert_eq!(fault_kind(&c.changed_areas(&vm, &s6, &d6, &before_resize).unwrap_err()), "FileFault");
    assert_eq!(c.changed_areas(&vm, &s6, &d6, "*").unwrap(), vec![(2097152 - CBT_BLOCK, CBT_BLOCK)]);
    c.remove_snapshot(&s6).unwrap();
}

#[test]
fn cbt_hostile_answers_are_errors_never_loops() {
    let sim = Sim::start_with(true, "");
    let c = sim.client();
    let vm = c.find_vm("vm1").unwrap();
    let (s1, first) = cbt_first_snapshot(&c, &vm);
    let from = first[0].change_id.clone().unwrap();
    c.remove_snapshot(&s1).unwrap();
    for k in [1u64, 3, 5, 7, 9, 11] {
        sim.write("vm1", 0, k * CBT_BLOCK, 512, 9);
    }
    let s2 = c.create_snapshot(&vm, "BEXI-cbt-2", "", false, false).unwrap();
    let d = c.snapshot_disks(&s2).unwrap().remove(0);
    assert_eq!(c.changed_areas(&vm, &s2, &d, &from).unwrap().len(), 6);
    for (mode, says) in [
        ("outside", "beyond the capacity of 1048576 bytes"),
        ("unsorted", "out of order or overlaps"),
        ("stall", "covers 0 bytes (no progress)"),
        ("wrongstart", "answer starts at byte 0 although it was asked from byte"),
    ] {
        sim.control_post(&format!("/fault?op=cbt&mode={mode}&count=inf"));
        let e = c.changed_areas(&vm, &s2, &d, &from).unwrap_err();
        eprintln!("error seen ({mode}): {e}");
        assert_eq!(e.kind(), affa::error::ErrorKind::Remote, "{mode}: {e}");
        assert!(esxi::fault_of(&e).is_none(), "{mode}: {e}");
        assert!(e.message().contains(says), "{mode}: {e}");
        assert!(e.message().contains(&format!("VM {} disk 2000", vm.value)) && e.message().contains("vm1.vmdk"), "{e}");
        assert!(!e.message().contains('\n'));
    }
    sim.control_post("/fault?op=clear");
    assert_eq!(c.changed_areas(&vm, &s2, &d, &from).unwrap().len(), 6);
    c.remove_snapshot(&s2).unwrap();
}
