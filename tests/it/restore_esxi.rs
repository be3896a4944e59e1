//! `--full-restore` of ESXi jobs end to end: a real backup of a VM of the simulator harness
//! (two disks, disk 0 chunked), then restores: to the original place under a new name, beside
//! the original with --to-dir, to a second simulated host, and the refusals.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::esx::{fill, sha256_file, Esx, MB};
use common::sim::{Sim, VmSpec, PASS, USER};
use common::*;

/// A backed-up ESXi job and the hashes of vm1's disks at that backup's snapshot.
struct Backed {
    e: Esx,
    /// SHA-256 of the two flat disks at the backup's snapshot.
    frozen: Vec<String>,
}

impl std::ops::Deref for Backed {
    type Target = Esx;
    fn deref(&self) -> &Esx {
        &self.e
    }
}

impl std::ops::DerefMut for Backed {
    fn deref_mut(&mut self) -> &mut Esx {
        &mut self.e
    }
}

/// vm1: disk 0 (24 MiB, sparse, chunked) on datastore1, disk 1 (4 MiB, plain) on ds2; one
/// backup done.
fn esx() -> Backed {
    let e =
        Esx::start(24 * MB, &[(MB, 2 * MB)], "chunkFiles=*/vm1-flat.vmdk\nchunkSize=1M\nchunkTransport=rsync\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    let s0 = e.affa.job_dir("esx").join("scheduled.0");
    assert!(s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk.affa-manifest").exists(), "disk 0 is not chunked");
    assert!(s0.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk").exists(), "disk 1 is not plain");
    assert!(s0.join(".affa-esxi.ini").exists());
    Backed { e, frozen }
}

fn vm_names(sim: &Sim) -> Vec<String> {
    sim.state()["vms"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

fn vm_state(sim: &Sim, name: &str) -> serde_json::Value {
    sim.state()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VM {name}"))
        .clone()
}

fn client(sim: &Sim) -> affa::esxi::Client {
    let mut o = affa::esxi::ConnectOptions::new("127.0.0.1");
    o.port = sim.port;
    o.thumbprint = Some(sim.thumbprint.clone());
    let mut c = affa::esxi::Client::connect(o).unwrap();
    c.login(USER, &affa::esxi::Password::new(PASS)).unwrap();
    c
}

fn unregister(sim: &Sim, name: &str) {
    let c = client(sim);
    let vm = c.find_vm(name).unwrap();
    c.call("UnregisterVM", &affa::esxi::soap::moref_elem("_this", &vm.kind, &vm.value)).unwrap();
    assert!(!vm_names(sim).contains(&name.to_string()));
}

fn say(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn a_removed_vm_is_restored_in_place_and_registered_under_a_new_name() {
    let e = esx();
    e.sim.post("/power?vm=vm1&state=off");
    unregister(&e.sim, "vm1");
    fs::remove_dir_all(e.ds1.join("vm1")).unwrap();
    fs::remove_dir_all(e.ds2.join("vm1")).unwrap();

    let o = e.affa.affa(&["--full-restore", "esx", "--register", "vm1-back", "--yes"]);
    let text = ok(&o);
    assert!(text.contains("registered") && text.contains("vm1-back"), "{text}");
    assert!(text.contains("verified") && text.contains("match"), "{text}");
    let d0 = e.ds1.join("vm1/vm1-flat.vmdk");
    assert_eq!(sha256_file(&d0), e.frozen[0], "disk 0 differs from the archive");
    assert_eq!(sha256_file(&e.ds2.join("vm1/vm1_1-flat.vmdk")), e.frozen[1], "disk 1 differs from the archive");
    assert!(fs::metadata(&d0).unwrap().blocks() * 512 < 12 * MB, "the restored disk is not sparse");
    assert!(e.ds1.join("vm1/vm1.vmx").exists() && e.ds1.join("vm1/vm1.vmdk").exists());
    assert!(vm_names(&e.sim).contains(&"vm1-back".to_string()), "{:?}", vm_names(&e.sim));
    assert!(e.sim.snapshots("vm1-back").is_empty());
    let vm = vm_state(&e.sim, "vm1-back");
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2, "{vm}");
    // affa's own files stay in the archive.
    assert!(!e.ds1.join("vm1/.affa-esxi.ini").exists() && !e.ds1.join("vm1/vm1-flat.vmdk.affa-manifest").exists());

    assert_eq!(vm_state(&e.sim, "vm1-back")["power_state"], "poweredOff");

    // An older copy on the host: only the changed blocks cross the network. vm1-back is
    // registered with these files and off, so restoring over them is allowed (no --register).
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&d0).unwrap();
        f.write_all_at(&vec![0xa5u8; 64 << 10], 13 * MB).unwrap();
    }
    let text = ok(&e.affa.affa(&["--full-restore", "esx", "--yes"]));
    assert!(text.contains("registered as VM vm1-back"), "{text}");
    assert_eq!(sha256_file(&d0), e.frozen[0]);
    let sent: u64 = text.split(" bytes sent").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(sent < 2 * MB, "{sent} bytes sent for 64 KiB changed:\n{text}");
}

#[test]
fn refusals_dry_run_to_dir_and_a_damaged_chunk() {
    let e = esx();
    // Suspended: refused (its memory state would resume onto disks of another time).
    e.sim.post("/power?vm=vm1&state=suspended");
    assert_eq!(vm_state(&e.sim, "vm1")["power_state"], "suspended");
    let suspended = tree_hashes(&e.ds1);
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--yes"]));
    assert!(err.contains("is suspended") && err.contains("vm1") && err.contains("nothing was changed"), "{err}");
    assert_eq!(tree_hashes(&e.ds1), suspended);
    e.sim.post("/power?vm=vm1&state=on");
    let before1 = tree_hashes(&e.ds1);
    // The VM runs: restoring over its files is refused.
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--yes"]));
    assert!(err.contains("powered on") && err.contains("vm1") && err.contains("nothing was changed"), "{err}");
    // A name in use.
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "other", "--yes"]));
    assert!(err.contains("VM named other already exists"), "{err}");
    // A missing archive lists those that exist.
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "daily.0", "--yes"]));
    assert!(err.contains("no archive 'daily.0'") && err.contains("scheduled.0"), "{err}");
    // --dry-run shows where things go and changes nothing.
    let text =
        ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-copy", "--dry-run"]));
    assert!(
        text.contains("vm1-copy/vm1-flat.vmdk") && text.contains("rebuilt from chunks") && text.contains("dry run"),
        "{text}"
    );
    // Without --yes and a terminal: refused.
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy"]));
    assert!(err.contains("refusing without confirmation"), "{err}");
    assert_eq!(tree_hashes(&e.ds1), before1);
    assert!(!e.ds2.join("vm1-copy").exists());

    // Beside the running original. Its .vmx is in windows-1252 (a byte that is not UTF-8): its
    // paths are rewritten all the same, and that byte kept.
    let archived_vmx = e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes/datastore1/vm1/vm1.vmx");
    let mut bytes = fs::read(&archived_vmx).unwrap();
    bytes.extend_from_slice(b"annotation = \"caf\xe9\"\n");
    fs::write(&archived_vmx, &bytes).unwrap();
    let text = ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-copy", "--yes"]));
    assert!(text.contains("registered"), "{text}");
    assert_eq!(sha256_file(&e.ds1.join("vm1-copy/vm1-flat.vmdk")), e.frozen[0]);
    assert_eq!(sha256_file(&e.ds2.join("vm1-copy/vm1_1-flat.vmdk")), e.frozen[1]);
    let vmx = fs::read(e.ds1.join("vm1-copy/vm1.vmx")).unwrap();
    assert!(vmx.windows(6).any(|w| w == b"caf\xe9\"\n"), "the annotation's byte was not kept");
    let vmx = String::from_utf8_lossy(&vmx);
    assert!(
        vmx.contains(&format!("{}/vm1-copy/vm1_1.vmdk", e.ds2.display())),
        "the second disk still points at the original:\n{vmx}"
    );
    assert!(!vmx.contains(&format!("{}/vm1/", e.ds2.display())), "{vmx}");
    let copy = vm_state(&e.sim, "vm1-copy");
    assert!(copy.to_string().contains("vm1-copy/vm1_1-flat.vmdk"), "{copy}");
    assert!(e.sim.snapshots("vm1-copy").is_empty());
    assert_eq!(vm_state(&e.sim, "vm1")["power_state"], "poweredOn");

    // Registered again under the same .vmx: refused.
    let err =
        fail(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-again", "--yes"]));
    assert!(err.contains("already registered as VM vm1-copy"), "{err}");

    // Onto one other datastore: every directory of the VM lands on ds2.
    let text = ok(&e.affa.affa(&[
        "--full-restore",
        "esx",
        "--to-datastore",
        "ds2",
        "--to-dir",
        "vm1-moved",
        "--register",
        "vm1-moved",
        "--yes",
    ]));
    assert!(text.contains("registered"), "{text}");
    assert_eq!(sha256_file(&e.ds2.join("vm1-moved/vm1-flat.vmdk")), e.frozen[0]);
    assert_eq!(sha256_file(&e.ds2.join("vm1-moved/vm1_1-flat.vmdk")), e.frozen[1]);
    assert!(!e.ds1.join("vm1-moved").exists(), "--to-datastore ds2 wrote to datastore1");
    assert!(e.sim.snapshots("vm1-moved").is_empty());
    // Both directories merged into one: the .vmx's absolute path of disk 1 follows it.
    let moved = vm_state(&e.sim, "vm1-moved");
    assert!(moved.to_string().contains("vm1-moved/vm1_1-flat.vmdk"), "disk 1 still points at the original: {moved}");

    // A damaged chunk: the restore stops naming it, before anything is written.
    let chunks = e.affa.job_dir("esx").join("scheduled.0/.affa-chunks");
    let mut victim = None;
    for d in fs::read_dir(&chunks).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if fs::metadata(&p).unwrap().len() > 10_000 {
                victim = Some(p);
            }
        }
    }
    let victim = victim.expect("no stored chunk");
    let id = victim.file_name().unwrap().to_string_lossy().into_owned();
    let pool_entry = e.affa.root.join(".affa-pool").join(&id[..2]).join(&id);
    assert_eq!(inode(&pool_entry), inode(&victim));
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().read(true).write(true).open(&pool_entry).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 5000).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], 5000).unwrap();
    }
    // The copy's VM is off; change its disk so "untouched" is visible.
    fs::write(e.ds2.join("vm1-copy/vm1_1-flat.vmdk"), b"changed by the admin").unwrap();
    let before = (tree_hashes(&e.ds1), tree_hashes(&e.ds2));
    // The mark of the restores above gone (as after the job's next full pass): a refused
    // restore makes none, the next backup keeps its CBT.
    let mark = e.affa.job_dir("esx").join(".affa-esxi-restored");
    fs::remove_file(&mark).expect("the restores above marked the job");
    let o = e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--yes"]);
    let err = fail(&o);
    assert!(err.contains(&id) && err.contains("damaged"), "{}", say(&o));
    assert!(err.contains("before anything was sent"), "{err}");
    assert_eq!((tree_hashes(&e.ds1), tree_hashes(&e.ds2)), before, "the target was changed");
    assert!(!mark.exists(), "a restore refused for a damaged chunk marked the job for a full pass");
}

#[test]
fn restore_to_a_second_host() {
    let mut e = esx();
    // Host 2: its own datastores (other directories, same names), its own certificate.
    let h2 = e.work.path().join("host2");
    let (a1, a2) = (h2.join("vmfs-a1"), h2.join("vmfs-a2"));
    fill(&a1.join("placeholder/placeholder-flat.vmdk"), MB, &[], 1);
    let sim2 = Sim::start(
        &h2.join("sim"),
        &[("datastore1", &a1), ("ds2", &a2)],
        &[VmSpec { name: "placeholder".into(), power_on: false, disks: vec![("datastore1".into(), MB)] }],
        "",
    );
    assert_ne!(sim2.thumbprint, e.sim.thumbprint);
    let conf = e.affa.ssh_job(
        "esx2",
        &e.sshd,
        &format!(
            "ESXi=yes\nESXiVMName=placeholder\nESXiUsername={USER}\nESXiPasswordFile={}\nESXiHost=127.0.0.1\nESXiPort={}\nremoteRsyncBinary=/usr/bin/rsync\nstatus=disabled\n",
            e.pwfile.display(),
            sim2.port
        ),
    );
    e.affa.write_conf("esx2.conf", &conf);
    let sock = e.sshd.agent_socket();
    ok(&e.affa.cmd().env("SSH_AUTH_SOCK", sock).args(["--send-key", "esx2", "--yes"]).output().unwrap());

    let text = ok(&e.affa.affa(&["--full-restore", "esx", "--to-host", "esx2", "--register", "vm1", "--yes"]));
    assert!(text.contains("registered") && text.contains("vm1"), "{text}");
    assert_eq!(sha256_file(&a1.join("vm1/vm1-flat.vmdk")), e.frozen[0]);
    assert_eq!(sha256_file(&a2.join("vm1/vm1_1-flat.vmdk")), e.frozen[1]);
    let vmx = fs::read_to_string(a1.join("vm1/vm1.vmx")).unwrap();
    assert!(
        vmx.contains(&format!("{}/vm1/vm1_1.vmdk", a2.display())),
        "the .vmx still points at host 1's datastore:\n{vmx}"
    );
    assert!(vm_names(&sim2).contains(&"vm1".to_string()));
    assert!(sim2.snapshots("vm1").is_empty());
    assert_eq!(vm_state(&sim2, "vm1")["disks"].as_array().unwrap().len(), 2);
    // Host 1 was not touched.
    assert_eq!(vm_state(&e.sim, "vm1")["power_state"], "poweredOn");

    // A host given by name needs its fingerprint (and an unknown ssh host key is not accepted).
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--to-host", "127.0.0.2", "--yes"]));
    assert!(err.contains("--to-thumbprint"), "{err}");
}

/// Whether any regular file below `dir` holds `needle` (links are not followed).
fn holds(dir: &Path, needle: &[u8]) -> bool {
    fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            holds(&p, needle)
        } else {
            md.is_file() && fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle)
        }
    })
}

/// A copy of the directories and regular files below `from`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let md = fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else if md.is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `--full-restore esx --to-dir vm1-copy` with `extra`: refused with one line that names
/// `path` and holds `kind`, before the plan is shown; the datastores are as `before`.
fn refused_naming(
    e: &Esx,
    extra: &[&str],
    path: &Path,
    kind: &str,
    before: &(BTreeMap<String, String>, BTreeMap<String, String>),
) {
    let mut args = vec!["--full-restore", "esx", "--to-dir", "vm1-copy"];
    args.extend_from_slice(extra);
    let o = e.affa.affa(&args);
    let err = fail(&o);
    let shown = path.display().to_string();
    assert!(err.contains(&shown) && err.contains(kind), "{shown} ({kind}), {extra:?}: {}", say(&o));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Restore of VM"), "the plan was shown: {}", say(&o));
    assert_eq!(&(tree_hashes(&e.ds1), tree_hashes(&e.ds2)), before, "{shown}, {extra:?}: the target was changed");
}

/// The archive's `vmfs`, `vmfs/volumes`, a VM directory or a datastore directory made a link to
/// the backup server's files (a copy of the VM's files with the server's key beside them, outside
/// RootDir: a planted archive, or a host's link): rsync, the check's hash and the reference walk
/// were given paths through it. The restore is refused with one line naming the link, before
/// the host is contacted, also as a dry run; nothing reaches the datastores.
#[test]
fn a_link_on_the_way_to_the_vm_files_in_the_archive_is_refused_and_nothing_outside_is_sent() {
    let e = esx();
    let arch = e.affa.job_dir("esx").join("scheduled.0");
    let secret = b"SECRET-of-the-backup-server-3e5c1f";
    let outside = e.affa.tmp.path().join("server-files");
    copy_tree(&arch.join("vmfs"), &outside.join("vmfs"));
    for d in ["datastore1/vm1", "ds2/vm1"] {
        fs::write(outside.join("vmfs/volumes").join(d).join("id_ed25519"), secret).unwrap();
    }
    let before = (tree_hashes(&e.ds1), tree_hashes(&e.ds2));
    let aside = e.affa.tmp.path().join("aside");
    for rel in ["vmfs", "vmfs/volumes", "vmfs/volumes/datastore1/vm1", "vmfs/volumes/ds2"] {
        let link = arch.join(rel);
        fs::rename(&link, &aside).unwrap();
        std::os::unix::fs::symlink(outside.join(rel), &link).unwrap();
        for extra in [&["--yes"][..], &["--dry-run"]] {
            refused_naming(&e, extra, &link, "symlink", &before);
        }
        fs::remove_file(&link).unwrap();
        fs::rename(&aside, &link).unwrap();
    }
    assert!(!holds(&e.ds1, secret) && !holds(&e.ds2, secret), "a backup server file reached the host");
    // The archive as it was restores.
    ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--yes"]));
    assert_eq!(sha256_file(&e.ds1.join("vm1-copy/vm1-flat.vmdk")), e.frozen[0]);
    assert!(!holds(&e.ds1, secret) && !holds(&e.ds2, secret), "a backup server file reached the host");
}

/// A file of the VM in the archive that is no regular file: its `.vmx`, its plain disk, the
/// chunked disk's manifest or a file nothing names made a link to the backup server's files, a
/// fifo (a read would block) or, as root, a device among its files. Such a file was passed over
/// (a VM restored without it, or refused as missing): now the restore is refused with one line
/// naming it and its kind, before the host is contacted; nothing reaches the datastores.
#[test]
fn a_file_of_the_vm_that_is_a_link_or_a_special_file_in_the_archive_is_refused() {
    let e = esx();
    let arch = e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes");
    let secret = b"SECRET-of-the-backup-server-9b07aa";
    let outside = e.affa.tmp.path().join("server-files");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("id_ed25519"), secret).unwrap();
    // A .vmx and a manifest that would pass, with the secret beside them.
    let mut vmx = fs::read(arch.join("datastore1/vm1/vm1.vmx")).unwrap();
    vmx.extend_from_slice(b"annotation = \"");
    vmx.extend_from_slice(secret);
    vmx.extend_from_slice(b"\"\n");
    fs::write(outside.join("vm1.vmx"), &vmx).unwrap();
    fs::copy(arch.join("datastore1/vm1/vm1-flat.vmdk.affa-manifest"), outside.join("manifest")).unwrap();
    let before = (tree_hashes(&e.ds1), tree_hashes(&e.ds2));
    let aside = e.affa.tmp.path().join("aside");
    let mut planted: Vec<(&str, &str)> = vec![
        ("datastore1/vm1/notes.txt", "id_ed25519"),
        ("datastore1/vm1/vm1.vmx", "vm1.vmx"),
        ("ds2/vm1/vm1_1-flat.vmdk", "id_ed25519"),
        ("datastore1/vm1/vm1-flat.vmdk.affa-manifest", "manifest"),
        ("datastore1/vm1/vm1.log", "fifo"),
    ];
    if is_root() {
        planted.push(("datastore1/vm1/vm1.nvram", "device"));
    }
    for (rel, what) in planted {
        let p = arch.join(rel);
        let had = p.exists();
        if had {
            fs::rename(&p, &aside).unwrap();
        }
        let kind = match what {
            "fifo" => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap();
                "fifo"
            }
            "device" => {
                let rdev = fs::metadata("/dev/null").unwrap().rdev();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rdev,
                )
                .unwrap();
                "device"
            }
            target => {
                std::os::unix::fs::symlink(outside.join(target), &p).unwrap();
                "symlink"
            }
        };
        refused_naming(&e, &["--yes"], &p, kind, &before);
        fs::remove_file(&p).unwrap();
        if had {
            fs::rename(&aside, &p).unwrap();
        }
    }
    assert!(!holds(&e.ds1, secret) && !holds(&e.ds2, secret), "a backup server file reached the host");
}

/// `chunkFiles=*.vmdk` chunks the descriptors too. A host pads its descriptor past the 1 MiB
/// the check reads, then names another VM's disk as an extent: the chunked descriptor was taken
/// for a disk, neither checked nor rewritten, and restored naming the other VM's disk. Now it
/// is refused as too big to check, naming it and who names it; nothing is written.
#[test]
fn a_chunked_descriptor_padded_past_the_limit_is_refused_not_taken_for_a_disk() {
    let e = Esx::start(8 * MB, &[(0, MB)], "chunkFiles=*.vmdk\nchunkSize=256K\nchunkTransport=rsync\n", "");
    let desc = e.ds1.join("vm1/vm1.vmdk");
    let mut text = fs::read_to_string(&desc).unwrap();
    assert!(text.contains("createType") && text.contains("vm1-flat.vmdk"), "{text}");
    assert!(e.ds1.join("other/other-flat.vmdk").exists());
    text.push('#');
    text.push_str(&" ".repeat(MB as usize));
    text.push_str(&format!("\nRW 2048 VMFS \"{}/other/other-flat.vmdk\"\n", e.ds1.display()));
    fs::write(&desc, &text).unwrap();
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let a1 = e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes/datastore1/vm1");
    let m = affa::chunk::read_manifest(&a1.join("vm1.vmdk.affa-manifest")).unwrap();
    assert_eq!(m.size, text.len() as u64, "the padded descriptor was not archived as a chunked file");

    let before = (tree_hashes(&e.ds1), tree_hashes(&e.ds2));
    let o = e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-copy", "--yes"]);
    let err = fail(&o);
    assert!(
        err.contains("vm1.vmdk is a chunked file larger than 1048576 bytes")
            && err.contains("named by vm1.vmx as scsi0:0.fileName"),
        "{}",
        say(&o)
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!((tree_hashes(&e.ds1), tree_hashes(&e.ds2)), before, "the target was changed");
    assert!(!vm_names(&e.sim).contains(&"vm1-copy".to_string()));
    // A refused restore marks nothing: the job's next backup keeps its CBT.
    assert!(!e.affa.job_dir("esx").join(".affa-esxi-restored").exists(), "a refused restore marked the job");
}
