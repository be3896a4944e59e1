//! ESXi hot backup end to end: the simulator harness (with delta disks after a snapshot, as a
//! real host), a real sshd serving its datastores, real rsync, the affa binary.

use crate::common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::esx::{sha256_file, Esx, MB};
use common::sim::PASS;
use common::*;

fn esx(big: u64, extra_conf: &str, sim_extra: &str) -> Esx {
    Esx::start(big, &[(0, 4 * MB)], extra_conf, sim_extra)
}

fn arch(e: &Esx, archive: &str) -> PathBuf {
    e.affa.job_dir("esx").join(archive)
}

fn counter(e: &Esx, name: &str) -> u64 {
    e.sim.state()["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn hot_backup_copies_the_frozen_disks_and_removes_the_snapshot() {
    let e = esx(320 * MB, "scheduledKeep=2\n", "");
    // The "running VM" keeps writing to disk 0 during the whole backup.
    e.sim.post("/writer?vm=vm1&on=1&interval_ms=2&disk=0&block=4096");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let st = e.sim.state();
    let vm = st["vms"].as_array().unwrap().iter().find(|v| v["name"] == "vm1").unwrap().clone();
    assert!(
        vm["writes_during_snapshot"].as_u64().unwrap() > 0,
        "the writer did not write during the snapshot: the test proves nothing"
    );
    let frozen: Vec<String> = vm["last_snapshot_base_flat_sha256"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let s0 = arch(&e, "scheduled.0");
    let d0 = s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk");
    let d1 = s0.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk");
    assert_eq!(sha256_file(&d0), frozen[0], "archived disk 0 differs from the disk at the snapshot");
    assert_eq!(sha256_file(&d1), frozen[1]);
    // Sparse stays sparse: far fewer blocks than the size.
    assert!(fs::metadata(&d0).unwrap().blocks() * 512 < 64 * MB, "disk 0 was not stored sparse");
    for f in ["vm1.vmx", "vm1.vmxf", "vm1.vmsd", "vm1.nvram", "vm1.vmdk"] {
        assert!(s0.join("vmfs/volumes/datastore1/vm1").join(f).exists(), "{f} missing");
    }
    assert!(s0.join("vmfs/volumes/ds2/vm1/vm1_1.vmdk").exists());
    let vmx = fs::read_to_string(s0.join("vmfs/volumes/datastore1/vm1/vm1.vmx")).unwrap();
    assert!(!vmx.contains("-000001"), "the archived .vmx still points at the snapshot delta:\n{vmx}");
    let all = tree_hashes(&s0);
    assert!(!all.keys().any(|k| k.contains("-delta") || k.contains("-000001")), "a delta was archived: {all:?}");
    assert!(e.sim.snapshots("vm1").is_empty(), "snapshot left: {:?}", e.sim.snapshots("vm1"));
    let report = fs::read_to_string(s0.join(".AFFA3-REPORT")).unwrap();
    assert!(report.contains("ESXiVM=vm1") && report.contains("ESXiSnapshot=BEXI-esx-20260504210000"), "{report}");
    assert!(report.contains("ESXiSnapshotRemoved="), "{report}");
    // Both times come from the injected clock (AFFA_FAKE_NOW), as every time of a run does.
    assert!(report.contains("\nESXiSnapshotCreated=2026-05-04 21:00:00\n"), "{report}");
    assert!(report.contains("\nESXiSnapshotRemoved=2026-05-04 21:00:00\n"), "{report}");
    assert!(report.contains("ESXiDisk0=") && report.contains("ESXiDisk1="), "{report}");
    assert!(s0.join(".affa-esxi.ini").exists());

    // Second run: the unchanged disk is linked to the first archive, the written one is not.
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    e.sim.post("/writer?vm=vm1&on=0");
    let s1 = arch(&e, "scheduled.1");
    assert_eq!(
        inode(&s1.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk")),
        inode(&arch(&e, "scheduled.0").join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk"))
    );
    assert_ne!(
        inode(&s1.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")),
        inode(&arch(&e, "scheduled.0").join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk"))
    );
    assert_eq!(
        sha256_file(&s1.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")),
        frozen[0],
        "the first archive changed"
    );
    let frozen2 = e.sim.state()["vms"].as_array().unwrap().iter().find(|v| v["name"] == "vm1").unwrap()
        ["last_snapshot_base_flat_sha256"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sha256_file(&arch(&e, "scheduled.0").join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen2);
    assert!(e.sim.snapshots("vm1").is_empty());
    let list = ok(&e.affa.affa(&["--list-archives", "esx"]));
    assert!(list.contains("ESXi VM vm1") && list.contains("S 1") && list.contains("S 0"), "{list}");
}

/// The host drops an API session idle longer than its timeout (ESXi: 30 minutes by default),
/// and a disk copy makes no API call: a copy longer than that found the session gone when it
/// came to remove the snapshot, and the VM stayed on its delta. Here the simulator drops a
/// session idle for 0.5 s and the copy takes seconds (BandwidthLimit): affa logs in again, the
/// snapshot is removed and the archive is the frozen disk.
#[test]
fn a_session_that_expires_during_the_copy_does_not_leave_the_snapshot() {
    let e = esx(8 * MB, "BandwidthLimit=4000\n", r#","session_idle_ms":500"#);
    let t = std::time::Instant::now();
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    assert!(t.elapsed() > std::time::Duration::from_secs(2), "the copy was too quick to outlive the session");
    assert!(e.sim.snapshots("vm1").is_empty(), "snapshot left: {:?}", e.sim.snapshots("vm1"));
    let log = fs::read_to_string(e.affa.state.join("log/esx.log")).unwrap();
    assert!(
        log.contains("ESXi: the API session had expired"),
        "the session did not expire: the test proves nothing\n{log}"
    );
    let frozen = e.frozen();
    let s0 = arch(&e, "scheduled.0");
    assert_eq!(sha256_file(&s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&s0.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk")), frozen[1]);
}

#[test]
fn chunked_disks_end_to_end() {
    let e = esx(64 * MB, "scheduledKeep=3\nchunkFiles=*-flat.vmdk\nchunkSize=1M\nchunkTransport=rsync\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen: Vec<String> = e.sim.state()["vms"][0]["last_snapshot_base_flat_sha256"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let s0 = arch(&e, "scheduled.0");
    assert!(s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk.affa-manifest").exists());
    assert!(!s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk").exists());
    let pool = e.affa.root.join(".affa-pool");
    let du = |p: &Path| -> u64 { walk_size(p) };
    let pool1 = du(&pool);
    // Change 1 MiB of the 64 MiB disk, back up again: the pool grows by about that.
    e.sim.post_bytes("/write?vm=vm1&disk=0&offset=8388608", &vec![0x5au8; MB as usize]);
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    let growth = du(&pool) - pool1;
    assert!(growth < 2 * MB, "pool grew by {growth} bytes for 1 MiB changed");
    assert!(growth > 0, "the changed chunk was not stored");
    let report = fs::read_to_string(arch(&e, "scheduled.0").join(".AFFA3-REPORT")).unwrap();
    assert!(report.contains("ChunkPoolBytesAdded=") && report.contains("DedupRatio="), "{report}");
    // The first archive still rebuilds to the disk as it was at its snapshot.
    let out = e.work.path().join("unchunked");
    ok(&e.affa.affa(&["--unchunk", "esx", "scheduled.1", "--to", out.to_str().unwrap()]));
    assert_eq!(sha256_file(&out.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&out.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk")), frozen[1]);
    ok(&e.affa.affa(&["--verify", "esx", "--all"]));
    // The staging copy is kept for the next delta transfer, and it is sparse like the disk.
    let staged = e.affa.job_dir("esx").join(".staging/vmfs/volumes/datastore1/vm1/vm1-flat.vmdk");
    assert!(fs::metadata(&staged).unwrap().blocks() * 512 < 32 * MB, "the staging copy is not sparse");
    assert!(e.sim.snapshots("vm1").is_empty());
}

fn walk_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                total += walk_size(&e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

#[test]
fn wrong_password_wrong_thumbprint_and_unknown_vm_are_clear_errors() {
    let e = esx(8 * MB, "", "");
    let conf = fs::read_to_string(e.affa.conf.join("esx.conf")).unwrap();
    // Wrong password.
    fs::write(e.affa.state.join("esx.pw"), "nope\n").unwrap();
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(err.contains("wrong user or password for ESXi host 127.0.0.1"), "{err}");
    assert!(!err.contains("nope"), "the password leaked into the error: {err}");
    fs::write(e.affa.state.join("esx.pw"), format!("{PASS}\n")).unwrap();
    // A password file others can read is refused, with the chmod.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(e.affa.state.join("esx.pw"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(err.contains("chmod 600"), "{err}");
    fs::set_permissions(e.affa.state.join("esx.pw"), fs::Permissions::from_mode(0o600)).unwrap();
    // Wrong thumbprint: stops before the password is sent.
    let logins = counter(&e, "soap:Login");
    let bad = conf.replace(&e.sim.thumbprint, &"AB:".repeat(31).to_string().add_last("CD"));
    e.affa.write_conf("esx.conf", &bad);
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(err.contains("has fingerprint") && err.contains("ESXiThumbprint"), "{err}");
    assert_eq!(counter(&e, "soap:Login"), logins, "credentials were sent to a host with the wrong certificate");
    // Unknown VM: the error lists the VMs that exist.
    e.affa.write_conf("esx.conf", &conf.replace("ESXiVMName=vm1", "ESXiVMName=vm9"));
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(err.contains("no VM named vm9") && err.contains("other") && err.contains("vm1"), "{err}");
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
}

trait AddLast {
    fn add_last(self, s: &str) -> String;
}
impl AddLast for String {
    fn add_last(mut self, s: &str) -> String {
        self.push_str(s);
        self
    }
}

#[test]
fn snapshot_failure_rotates_nothing_and_copy_failure_still_removes_the_snapshot() {
    let e = esx(8 * MB, "scheduledKeep=2\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let before = tree_hashes(&e.affa.job_dir("esx"));
    // Snapshot creation fails: nothing copied, nothing rotated.
    e.sim.post("/fault?op=create&mode=fail&msg=disk%20full");
    let err = fail(&e.affa.affa_at("2026-05-05T21:00:00", &["--run", "esx"]));
    assert!(err.contains("creating snapshot BEXI-esx-") && err.contains("disk full"), "{err}");
    assert_eq!(tree_hashes(&e.affa.job_dir("esx")), before);
    assert_eq!(archive_names(&e.affa.job_dir("esx")), ["scheduled.0"]);
    // rsync fails after the snapshot was made: the snapshot is removed anyway.
    let conf = fs::read_to_string(e.affa.conf.join("esx.conf")).unwrap();
    e.affa.write_conf("esx.conf", &conf.replace("remoteRsyncBinary=/usr/bin/rsync", "remoteRsyncBinary=/no/rsync"));
    let creates = counter(&e, "create_snapshot");
    let err = fail(&e.affa.affa_at("2026-05-05T21:10:00", &["--run", "esx"]));
    assert!(err.contains("rsync failed"), "{err}");
    assert_eq!(counter(&e, "create_snapshot"), creates + 1, "no snapshot was made: the test proves nothing");
    assert!(e.sim.snapshots("vm1").is_empty(), "snapshot left after a failed copy");
    assert_eq!(archive_names(&e.affa.job_dir("esx")), ["scheduled.0"]);
    e.affa.write_conf("esx.conf", &conf);
    ok(&e.affa.affa_at("2026-05-05T21:20:00", &["--run", "esx"]));
}

#[test]
fn sigterm_during_the_copy_removes_the_snapshot() {
    let e = esx(48 * MB, "BandwidthLimit=4000\n", "");
    let child = e
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-05-04T21:00:00")
        .args(["--run", "esx"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the snapshot", || !e.sim.snapshots("vm1").is_empty());
    wait_until(Duration::from_secs(30), "the copy to be under way (2 MiB received over ssh)", || {
        bytes_read_by(child.id(), "ssh") > 2 * MB
    });
    signal(child.id(), rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(e.sim.snapshots("vm1").is_empty(), "snapshot left after SIGTERM: {err}");
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
}

#[test]
fn failed_removal_fails_the_run_and_the_next_run_cleans_up() {
    let e = esx(8 * MB, "", "");
    e.sim.post("/fault?op=remove&mode=fail&msg=locked");
    let err = fail(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    assert!(err.contains("removing snapshot BEXI-esx-20260504210000 FAILED") && err.contains("locked"), "{err}");
    assert_eq!(e.sim.snapshots("vm1"), ["BEXI-esx-20260504210000"]);
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    assert!(e.sim.snapshots("vm1").is_empty());
    let report = fs::read_to_string(arch(&e, "scheduled.0").join(".AFFA3-REPORT")).unwrap();
    assert!(report.contains("ESXiLeftoverSnapshotsRemoved=BEXI-esx-20260504210000"), "{report}");
    let log = ok(&e.affa.affa(&["--log-tail", "esx"]));
    assert!(log.contains("removing snapshot BEXI-esx-20260504210000 left by an earlier run"), "{log}");
}

#[test]
fn vim_cmd_mode_on_a_free_licence_host() {
    let work = tempfile::tempdir().unwrap();
    let standin = work.path().join("vim-cmd");
    let e = esx(
        8 * MB,
        &format!("ESXiSnapshotMode=vim-cmd\nESXiVimCmd={}\n", standin.display()),
        r#","free_license":true"#,
    );
    fs::write(
        &standin,
        format!("#!/bin/sh\nexec {} vim-cmd --control {} \"$@\"\n", common::sim::sim_binary().display(), e.sim.control),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&standin, fs::Permissions::from_mode(0o755)).unwrap();
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    assert!(counter(&e, "vimcmd:vmsvc/snapshot.create") >= 1, "{}", e.sim.state()["counters"]);
    assert!(counter(&e, "vimcmd:vmsvc/snapshot.remove") >= 1);
    assert!(e.sim.snapshots("vm1").is_empty());
    let frozen = e.sim.state()["vms"][0]["last_snapshot_base_flat_sha256"][0].as_str().unwrap().to_string();
    assert_eq!(sha256_file(&arch(&e, "scheduled.0").join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen);
}
