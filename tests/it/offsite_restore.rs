//! `--full-restore JOB [ARCHIVE] --from-offsite` against the real Ceph RADOS Gateway
//! (common::ceph): an ESXi VM (chunked disks) uploaded, its archive and the whole job directory
//! and pool removed, then restored straight from the bucket through affa-agent on the simulated
//! host, byte-identical and registered; a damaged chunk object, a missing one (of a disk and of a
//! plain file) and a wrong key refused before anything is written. And an ordinary job restored
//! from the bucket to its (local) host through the staging path, and extracted from the bucket to
//! a directory (`--unchunk --from-offsite`).

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::ceph::{Ceph, ACCESS, SECRET};
use common::esx::{sha256_file, Esx, MB};
use common::sim::{PASS, USER};
use common::*;

const PREFIX: &str = "vm/box1";

/// A credentials file (mode 0600) for the test gateway, in `dir`.
fn credentials(dir: &Path) -> PathBuf {
    let creds = dir.join("offsite.credentials");
    fs::write(&creds, format!("accessKey={ACCESS}\nsecretKey={SECRET}\n")).unwrap();
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
    creds
}

fn offsite_conf(ceph: &Ceph, bucket: &str, keys: &Path) -> String {
    format!(
        "offsiteTarget=s3://{bucket}/{PREFIX}\noffsiteEndpoint={}\noffsiteCredentialsFile={}\noffsiteKeyFile={}\n",
        ceph.endpoint,
        credentials(keys).display(),
        keys.join("offsite.key").display()
    )
}

/// The object name of chunk `id` under the key file `key_file` (docs/FORMAT.md "Object names"),
/// computed here from the key as a reader of the format would.
fn object_of(key_file: &Path, id: &[u8; 32]) -> String {
    let text = fs::read_to_string(key_file).unwrap();
    let hex = text.lines().find_map(|l| l.strip_prefix("key ")).unwrap();
    let master = affa::chunk::parse_id(hex).unwrap();
    let names = blake3::derive_key("affa offsite v1 object names", &master);
    let mut h = blake3::Hasher::new_keyed(&names);
    h.update(b"c");
    h.update(id);
    format!("c/{}", h.finalize().to_hex())
}

fn vm_names(e: &Esx) -> Vec<String> {
    e.sim.state()["vms"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

/// The entries of a job directory (a restore from the bucket leaves no staging behind).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn an_esxi_vm_is_restored_straight_from_the_bucket_and_damage_or_a_wrong_key_is_refused_before_writing() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let keys = tempfile::Builder::new().prefix("affa-offsite-keys").tempdir().unwrap();
    let conf = format!("chunkFiles=*.vmdk\nchunkSize=1M\n{}", offsite_conf(ceph, &bucket, keys.path()));
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], &conf, "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    ok(&e.affa.affa(&["--offsite", "esx"]));
    let key_file = keys.path().join("offsite.key");

    // What the archive held, before it goes: a chunk of disk 0, the .vmx (a plain file) and
    // every plain file's hash.
    let jd = e.affa.job_dir("esx");
    let s0 = jd.join("scheduled.0");
    let vmdir = s0.join("vmfs/volumes/datastore1/vm1");
    let m = affa::chunk::read_manifest(&vmdir.join("vm1-flat.vmdk.affa-manifest")).unwrap();
    let disk_ids: Vec<[u8; 32]> = m
        .chunks
        .iter()
        .filter_map(|c| if let affa::chunk::ChunkRef::Stored(id) = c { Some(*id) } else { None })
        .collect();
    assert!(disk_ids.len() >= 4, "{}", disk_ids.len());
    let vmx_id = *blake3::hash(&fs::read(vmdir.join("vm1.vmx")).unwrap()).as_bytes();
    let mut plain: BTreeMap<String, String> = BTreeMap::new();
    for ds in ["datastore1", "ds2"] {
        for f in fs::read_dir(s0.join("vmfs/volumes").join(ds).join("vm1")).unwrap() {
            let p = f.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            if !n.ends_with(".vmdk") && !n.ends_with(".affa-manifest") {
                plain.insert(format!("{ds}/{n}"), sha256_file(&p));
            }
        }
    }
    assert!(plain.contains_key("datastore1/vm1.vmx"), "{plain:?}");

    // The VM is gone from the host, and the archive, the job directory and the pool from the
    // backup server.
    e.sim.post("/power?vm=vm1&state=off");
    {
        let mut o = affa::esxi::ConnectOptions::new("127.0.0.1");
        o.port = e.sim.port;
        o.thumbprint = Some(e.sim.thumbprint.clone());
        let mut c = affa::esxi::Client::connect(o).unwrap();
        c.login(USER, &affa::esxi::Password::new(PASS)).unwrap();
        let vm = c.find_vm("vm1").unwrap();
        c.call("UnregisterVM", &affa::esxi::soap::moref_elem("_this", &vm.kind, &vm.value)).unwrap();
    }
    fs::remove_dir_all(e.ds1.join("vm1")).unwrap();
    fs::remove_dir_all(e.ds2.join("vm1")).unwrap();
    fs::remove_dir_all(&jd).unwrap();
    fs::remove_dir_all(e.affa.root.join(".affa-pool")).unwrap();
    let untouched = |what: &str| {
        assert!(!e.ds1.join("vm1").exists() && !e.ds2.join("vm1").exists(), "{what}: the target was written");
        assert!(!vm_names(&e).contains(&"vm1-back".to_string()), "{what}: the VM was registered");
        assert!(
            entries(&jd).iter().all(|n| !n.starts_with(".offsite-restore")),
            "{what}: staging left: {:?}",
            entries(&jd)
        );
    };
    let restore = ["--full-restore", "esx", "--from-offsite", "--register", "vm1-back", "--yes"];

    // A damaged chunk object of the disk: refused, naming object, chunk and file.
    let obj = |id: &[u8; 32]| object_of(&key_file, id);
    let key = |o: &str| format!("{PREFIX}/{o}");
    let bent = obj(&disk_ids[2]);
    let good = ceph.get(&bucket, &key(&bent));
    let mut data = good.clone();
    let mid = data.len() / 2;
    data[mid] ^= 0x20;
    ceph.put(&bucket, &key(&bent), &data);
    let o = e.affa.affa(&restore);
    let err = fail(&o);
    assert!(
        err.contains(&bent)
            && err.contains(&affa::chunk::id_hex(&disk_ids[2]))
            && err.contains("vm1-flat.vmdk")
            && err.contains("damaged")
            && err.contains("before anything was sent"),
        "{err}"
    );
    untouched("a damaged object");
    ceph.put(&bucket, &key(&bent), &good);

    // A missing chunk object of the disk.
    let gone = obj(&disk_ids[3]);
    let kept = ceph.get(&bucket, &key(&gone));
    ceph.delete(&bucket, &key(&gone));
    let err = fail(&e.affa.affa(&restore));
    assert!(err.contains(&gone) && err.contains("missing") && err.contains("vm1-flat.vmdk"), "{err}");
    untouched("a missing object");
    ceph.put(&bucket, &key(&gone), &kept);

    // A missing object of a plain file (the .vmx).
    let vmx_obj = obj(&vmx_id);
    let kept = ceph.get(&bucket, &key(&vmx_obj));
    ceph.delete(&bucket, &key(&vmx_obj));
    let err = fail(&e.affa.affa(&restore));
    assert!(err.contains(&vmx_obj) && err.contains("missing") && err.contains("vm1.vmx"), "{err}");
    untouched("a missing plain file object");
    ceph.put(&bucket, &key(&vmx_obj), &kept);

    // A wrong key: refused, one line.
    let right = fs::read_to_string(&key_file).unwrap();
    fs::write(&key_file, format!("affa-offsite-key 1\ncreated 2026-12-01T00:00:00\nkey {}\n", "5a".repeat(32)))
        .unwrap();
    let err = fail(&e.affa.affa(&restore));
    assert!(err.contains("does not open") && err.contains(&key_file.display().to_string()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    untouched("a wrong key");
    fs::write(&key_file, &right).unwrap();

    // An archive the bucket does not have: the offsite archives are listed.
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "daily.3", "--from-offsite", "--yes"]));
    assert!(err.contains("no offsite archive 'daily.3'") && err.contains("scheduled.0 (Date 202605042100)"), "{err}");

    // The restore, the archive named by its Date: through the agent, chunks from the bucket.
    let text = ok(&e.affa.affa(&[
        "--full-restore",
        "esx",
        "202605042100",
        "--from-offsite",
        "--register",
        "vm1-back",
        "--yes",
    ]));
    assert!(text.contains("chunked disks through affa-agent"), "{text}");
    assert!(text.contains("registered") && text.contains("vm1-back"), "{text}");
    assert_eq!(sha256_file(&e.ds1.join("vm1/vm1-flat.vmdk")), frozen[0], "disk 0 differs from the source");
    assert_eq!(sha256_file(&e.ds2.join("vm1/vm1_1-flat.vmdk")), frozen[1], "disk 1 differs from the source");
    for (f, h) in &plain {
        let (ds, n) = f.split_once('/').unwrap();
        let dir = if ds == "datastore1" { &e.ds1 } else { &e.ds2 };
        assert_eq!(&sha256_file(&dir.join("vm1").join(n)), h, "{f} differs from the archive");
    }
    assert!(e.ds1.join("vm1/vm1.vmdk").exists());
    assert!(!e.ds1.join("vm1/.affa-esxi.ini").exists() && !e.ds1.join("vm1/vm1-flat.vmdk.affa-manifest").exists());
    assert!(vm_names(&e).contains(&"vm1-back".to_string()), "{:?}", vm_names(&e));
    let vm = e.vm_state("vm1-back");
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2, "{vm}");
    // Nothing of the archive was left in RootDir: no archive, no staging, no pool entry.
    assert!(
        entries(&jd).iter().all(|n| n.starts_with('.') && !n.starts_with(".offsite-restore")),
        "{:?}",
        entries(&jd)
    );
    assert!(entries(&e.affa.root.join(".affa-pool"))
        .iter()
        .all(|d| entries(&e.affa.root.join(".affa-pool").join(d)).is_empty()));
}

/// An ordinary job (a chunked image, a small file, a link) restored from the bucket to its host
/// (remoteHostName=localhost: the staging path, each chunked file rebuilt from the bucket's
/// chunks and checked before rsync writes it), its job directory removed first.
#[test]
fn an_ordinary_job_is_restored_from_the_bucket_to_its_host() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = tempfile::Builder::new().prefix("affa-offsite-src").tempdir().unwrap();
    let d = src.path().join("data");
    fs::create_dir_all(d.join("sub")).unwrap();
    let mut img = vec![0u8; 6 << 18];
    blake3::Hasher::new().update(b"img").finalize_xof().fill(&mut img[..3 << 18]);
    fs::write(d.join("disk.img"), &img).unwrap();
    fs::write(d.join("sub/notes.txt"), "a small file\n").unwrap();
    fs::set_permissions(d.join("sub/notes.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("sub/notes.txt", d.join("link")).unwrap();
    let a = Affa::new();
    a.write_conf(
        "job.conf",
        &format!(
            "[web]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\n{}",
            d.display(),
            offsite_conf(ceph, &bucket, &a.conf)
        ),
    );
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", "web"]));
    ok(&a.affa(&["--offsite", "web"]));
    let before = tree_hashes(&d);
    fs::remove_dir_all(&d).unwrap();
    fs::remove_dir_all(a.job_dir("web")).unwrap();
    // The archive as files, straight from the bucket: the image rebuilt, no manifest left.
    let x = a.tmp.path().join("extracted");
    let text = ok(&a.affa(&["--unchunk", "web", "202612010100", "--from-offsite", "--to", x.to_str().unwrap()]));
    let rel = d.strip_prefix("/").unwrap();
    assert!(text.contains("disk.img") && text.contains("verified"), "{text}");
    assert_eq!(tree_hashes(&x.join(rel)), before, "{text}");
    assert!(!x.join(rel).join("disk.img.affa-manifest").exists() && !x.join(".affa-manifests").exists());
    let e = fail(&a.affa(&["--unchunk", "web", "202612010100", "--from-offsite", "--to", x.to_str().unwrap()]));
    assert!(e.contains("exists; expected a new directory"), "{e}");

    let text = ok(&a.affa(&["--full-restore", "web", "--from-offsite", "--yes"]));
    assert!(text.contains("verified") && text.contains("match"), "{text}");
    assert_eq!(tree_hashes(&d), before, "{text}");
    assert_eq!(fs::read(d.join("disk.img")).unwrap(), img);
    assert_eq!(fs::read_link(d.join("link")).unwrap(), Path::new("sub/notes.txt"));
    assert_eq!(fs::metadata(d.join("sub/notes.txt")).unwrap().permissions().mode() & 0o777, 0o640);
    assert!(
        entries(&a.job_dir("web")).iter().all(|n| !n.starts_with(".offsite-restore")),
        "{:?}",
        entries(&a.job_dir("web"))
    );
}

/// The chunk GETs a command made (`AFFA_TEST_OFFSITE_GETS`, feature test-hooks): object name ->
/// (times fetched, the most GETs in flight seen when one of them started).
fn gets(log: &Path) -> BTreeMap<String, (usize, usize)> {
    let mut m: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for l in fs::read_to_string(log).unwrap_or_default().lines() {
        let (name, n) = l.rsplit_once(' ').unwrap();
        let e = m.entry(name.to_string()).or_default();
        e.0 += 1;
        e.1 = e.1.max(n.parse().unwrap());
    }
    m
}

/// The stored chunk ids of a manifest.
fn stored(manifest: &Path) -> Vec<[u8; 32]> {
    affa::chunk::read_manifest(manifest)
        .unwrap()
        .chunks
        .iter()
        .filter_map(|c| if let affa::chunk::ChunkRef::Stored(id) = c { Some(*id) } else { None })
        .collect()
}

/// offsiteParallel=4: the chunks of the disks are fetched 4 at a time (GETs counted in flight,
/// not timed), and through affa-agent each chunk object is downloaded once (the check before
/// sending keeps what it downloaded); the disks are byte-identical. A damaged object in the
/// middle of the parallel fetch stops the restore before the target is touched, naming it.
#[test]
fn an_agent_restore_from_the_bucket_fetches_in_parallel_and_downloads_each_chunk_once() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let keys = tempfile::Builder::new().prefix("affa-offsite-keys").tempdir().unwrap();
    let conf =
        format!("chunkFiles=*.vmdk\nchunkSize=1M\noffsiteParallel=4\n{}", offsite_conf(ceph, &bucket, keys.path()));
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], &conf, "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    ok(&e.affa.affa(&["--offsite", "esx"]));
    let key_file = keys.path().join("offsite.key");
    let jd = e.affa.job_dir("esx");
    let s0 = jd.join("scheduled.0");
    let d0 = stored(&s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk.affa-manifest"));
    let d1 = stored(&s0.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk.affa-manifest"));
    let disk_objects: std::collections::BTreeSet<String> =
        d0.iter().chain(&d1).map(|id| object_of(&key_file, id)).collect();
    // The simulated disks repeat some chunks: a chunk used twice is fetched once too.
    assert!(
        d0.len() >= 6 && d1.len() >= 4 && disk_objects.len() >= 6,
        "{} {} {}",
        d0.len(),
        d1.len(),
        disk_objects.len()
    );

    e.sim.post("/power?vm=vm1&state=off");
    {
        let mut o = affa::esxi::ConnectOptions::new("127.0.0.1");
        o.port = e.sim.port;
        o.thumbprint = Some(e.sim.thumbprint.clone());
        let mut c = affa::esxi::Client::connect(o).unwrap();
        c.login(USER, &affa::esxi::Password::new(PASS)).unwrap();
        let vm = c.find_vm("vm1").unwrap();
        c.call("UnregisterVM", &affa::esxi::soap::moref_elem("_this", &vm.kind, &vm.value)).unwrap();
    }
    fs::remove_dir_all(e.ds1.join("vm1")).unwrap();
    fs::remove_dir_all(e.ds2.join("vm1")).unwrap();
    fs::remove_dir_all(&jd).unwrap();
    fs::remove_dir_all(e.affa.root.join(".affa-pool")).unwrap();
    let restore = ["--full-restore", "esx", "--from-offsite", "--register", "vm1-back", "--yes"];
    let log = e.affa.tmp.path().join("gets.log");
    let run = || {
        let _ = fs::remove_file(&log);
        let o = e.affa.cmd().env("AFFA_TEST_OFFSITE_GETS", &log).args(restore).output().unwrap();
        (o, gets(&log))
    };

    // A damaged object in the middle of disk 0, fetched in parallel: refused, naming it, the
    // target untouched, no staging left.
    let key = |o: &str| format!("{PREFIX}/{o}");
    let bent = object_of(&key_file, &d0[d0.len() / 2]);
    let good = ceph.get(&bucket, &key(&bent));
    let mut data = good.clone();
    let mid = data.len() / 2;
    data[mid] ^= 0x01;
    ceph.put(&bucket, &key(&bent), &data);
    let (o, seen) = run();
    let err = fail(&o);
    assert!(
        err.contains(&bent)
            && err.contains("vm1-flat.vmdk")
            && err.contains("damaged")
            && err.contains("before anything was sent"),
        "{err}"
    );
    assert!(seen.contains_key(&bent), "{seen:?}");
    assert!(!e.ds1.join("vm1").exists() && !e.ds2.join("vm1").exists(), "the target was written");
    assert!(!vm_names(&e).contains(&"vm1-back".to_string()));
    assert!(entries(&jd).iter().all(|n| !n.starts_with(".offsite-restore")), "{:?}", entries(&jd));
    ceph.put(&bucket, &key(&bent), &good);

    // The staging a killed restore left (its kept chunks too) is removed by the next one.
    fs::create_dir_all(jd.join(".offsite-restore.4194999/checked-chunks")).unwrap();
    fs::write(jd.join(".offsite-restore.4194999/checked-chunks/x"), "left").unwrap();

    // The restore: every chunk object of the disks fetched exactly once, several at a time.
    let (o, seen) = run();
    let text = ok(&o);
    assert!(text.contains("chunked disks through affa-agent"), "{text}");
    let disk_gets: BTreeMap<&String, &(usize, usize)> =
        seen.iter().filter(|(n, _)| disk_objects.contains(*n)).collect();
    assert_eq!(disk_gets.len(), disk_objects.len(), "every disk chunk object fetched: {seen:?}");
    assert!(disk_gets.values().all(|(n, _)| *n == 1), "each disk chunk object fetched once: {disk_gets:?}");
    let most = disk_gets.values().map(|(_, m)| *m).max().unwrap();
    // offsiteParallel readers: not the store's default (the cores: 2 here, 8 on a bigger box).
    assert!((3..=4).contains(&most), "GETs in flight at most {most}, expected 3..=4 (offsiteParallel=4)");
    assert_eq!(sha256_file(&e.ds1.join("vm1/vm1-flat.vmdk")), frozen[0], "disk 0 differs from the source");
    assert_eq!(sha256_file(&e.ds2.join("vm1/vm1_1-flat.vmdk")), frozen[1], "disk 1 differs from the source");
    assert!(vm_names(&e).contains(&"vm1-back".to_string()), "{:?}", vm_names(&e));
    assert!(entries(&jd).iter().all(|n| !n.starts_with(".offsite-restore")), "{:?}", entries(&jd));
}

/// offsiteParallel=4 on the staging path (an ordinary job, a local target) and for
/// `--unchunk --from-offsite`: the image's chunks are fetched several at a time, never more than
/// 4, and the files are byte-identical.
#[test]
fn the_staging_path_and_unchunk_fetch_the_chunks_from_the_bucket_in_parallel() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = tempfile::Builder::new().prefix("affa-offsite-src").tempdir().unwrap();
    let d = src.path().join("data");
    fs::create_dir_all(&d).unwrap();
    let mut img = vec![0u8; 24 << 18];
    blake3::Hasher::new().update(b"par").finalize_xof().fill(&mut img[..20 << 18]);
    fs::write(d.join("disk.img"), &img).unwrap();
    let a = Affa::new();
    a.write_conf(
        "job.conf",
        &format!(
            "[web]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\noffsiteParallel=4\n{}",
            d.display(),
            offsite_conf(ceph, &bucket, &a.conf)
        ),
    );
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", "web"]));
    ok(&a.affa(&["--offsite", "web"]));
    let rel = d.strip_prefix("/").unwrap();
    let m = a.job_dir("web").join("scheduled.0").join(rel).join("disk.img.affa-manifest");
    let objects: std::collections::BTreeSet<String> =
        stored(&m).iter().map(|id| object_of(&a.conf.join("offsite.key"), id)).collect();
    assert_eq!(objects.len(), 20);
    fs::remove_dir_all(&d).unwrap();
    fs::remove_dir_all(a.job_dir("web")).unwrap();
    let log = a.tmp.path().join("gets.log");
    let most = |args: &[&str]| {
        let _ = fs::remove_file(&log);
        let text = ok(&a.cmd().env("AFFA_TEST_OFFSITE_GETS", &log).args(args).output().unwrap());
        let seen = gets(&log);
        let mine: Vec<&(usize, usize)> = seen.iter().filter(|(n, _)| objects.contains(*n)).map(|(_, v)| v).collect();
        assert_eq!(mine.len(), objects.len(), "{text}: {seen:?}");
        mine.iter().map(|(_, m)| *m).max().unwrap()
    };
    let x = a.tmp.path().join("extracted");
    let n = most(&["--unchunk", "web", "202612010100", "--from-offsite", "--to", x.to_str().unwrap()]);
    assert!((3..=4).contains(&n), "--unchunk: {n} GETs in flight at most, expected 3..=4");
    assert_eq!(fs::read(x.join(rel).join("disk.img")).unwrap(), img);
    let n = most(&["--full-restore", "web", "--from-offsite", "--yes"]);
    assert!((3..=4).contains(&n), "--full-restore: {n} GETs in flight at most, expected 3..=4");
    assert_eq!(fs::read(d.join("disk.img")).unwrap(), img);
}
