//! Hostile and bad input (issue 8): the parsers fuzzed with proptest (bounded, in every
//! `cargo test`; fuzz/ holds the cargo-fuzz targets for long runs), path tricks in job names,
//! archive names, manifests and remote file names, secrets that must never show, and the ssh
//! host key / TLS certificate pins. docs/RELIABILITY.md lists what each test checks.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use affa::chunk::{ChunkRef, Compression, Manifest};
use common::host_input;
use common::hostile_esx::{xml, Answer, Hostile, Rewrite};
use common::sim::{Sim, VmSpec, PASS, USER};
use common::*;
use proptest::prelude::*;

const MB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Fuzzing (proptest over arbitrary bytes and over mutations of valid inputs).

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Valid inputs the mutations start from.
fn sample_config() -> Vec<u8> {
    b"[GlobalAffaConfig]\nRootDir=/var/affa\nlockDir=/tmp/l\n\n# comment\n[web]\nremoteHostName=h.example\nInclude=/etc\nInclude=/home\nscheduledKeep=3\nchunkFiles=*.img\nESXiThumbprint=AB:CD\n[esx]\nESXi=yes\nESXiVMName=vm1\n".to_vec()
}
fn sample_manifest() -> Vec<u8> {
    let id = *blake3::hash(b"x").as_bytes();
    Manifest {
        size: 3 * 262144 + 5,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: (1700000000, 5),
        atime: Some((1700000001, 0)),
        chunk_size: 262144,
        compression: Compression::Zstd(1),
        file_hash: Some(id),
        added_bytes: 10,
        chunks: vec![ChunkRef::Stored(id), ChunkRef::Zero, ChunkRef::Stored(id), ChunkRef::Zero],
        stored_lens: Some(vec![100, 0, 100, 0]),
    }
    .to_bytes()
}
fn sample_report() -> Vec<u8> {
    b"[Report]\nDate=202601010000\nExecutionTime=12\nExitStatus=0\nTotalFileSize=1234\n; x\n[Other]\nDate=1\n".to_vec()
}
fn sample_soap() -> Vec<u8> {
    br#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="VirtualMachine">vm-10</obj><propSet><name>name</name><val xsi:type="xsd:string">vm1 &amp; co</val></propSet></objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#.to_vec()
}
fn sample_fault() -> Vec<u8> {
    br#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#.to_vec()
}
fn sample_stats() -> Vec<u8> {
    b"\nNumber of files: 1,234 (reg: 1,000, dir: 234)\nNumber of created files: 0\nTotal file size: 12,345,678 bytes\nTotal transferred file size: 0 bytes\nLiteral data: 0 bytes\nFile list generation time: 0.001 seconds\nTotal bytes sent: 20\n\nsent 20 bytes  received 30 bytes  100.00 bytes/sec\ntotal size is 12,345,678  speedup is 246,913.56\n".to_vec()
}

/// A sample with random byte edits, insertions and a truncation.
fn mutated(sample: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = sample.len();
    (prop::collection::vec((0..n, any::<u8>(), 0u8..3), 0..8), 0..=n).prop_map(move |(edits, cut)| {
        let mut v = sample.clone();
        for (pos, b, op) in edits {
            let pos = pos.min(v.len().saturating_sub(1));
            match op {
                0 if !v.is_empty() => v[pos] = b,
                1 => v.insert(pos, b),
                _ if !v.is_empty() => {
                    v.remove(pos);
                }
                _ => {}
            }
        }
        if cut < v.len() && cut % 3 == 0 {
            v.truncate(cut);
        }
        v
    })
}

fn input(sample: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..2048), mutated(sample)]
}

fn parse_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Ok(c) =
        affa::config::Config::parse(Path::new("/nonexistent"), &[(PathBuf::from("/nonexistent/x.conf"), text)])
    {
        for (name, j) in &c.jobs {
            assert!(affa::config::valid_job_name(name), "accepted job name {name:?}");
            let _ = j.to_ini();
            let _ = &j.sources;
            // A job dir never leaves RootDir.
            assert_eq!(j.job_dir().parent(), Some(j.root_dir().as_path()), "{name:?}");
        }
    }
}

fn parse_manifest(data: &[u8]) {
    if let Ok(m) = Manifest::parse(data) {
        // Whatever parses is self-consistent and serializes back to the same manifest.
        assert_eq!(m.chunks.len() as u64, Manifest::chunk_count(m.size, m.chunk_size));
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }
}

fn parse_soap(data: &[u8]) {
    let _ = affa::esxi::soap::parse(data);
    let _ = affa::esxi::soap::parse_reply(data);
}

fn parse_report(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let r = affa::report::Report::parse(&text);
    let _ = r.date();
    let _ = affa::report::Report::parse(&r.to_text());
}

fn parse_stats(data: &[u8]) {
    for (k, v) in affa::report::parse_rsync_stats(&String::from_utf8_lossy(data)) {
        assert!(!k.is_empty() && k.bytes().all(|b| b.is_ascii_alphabetic()), "{k:?}");
        assert!(!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'), "{v:?}");
    }
}

fn sample_ini() -> Vec<u8> {
    b"[VM]\nName=vm1\nVmxPath=[datastore1] vm1/vm1.vmx\nHost=h\nSnapshot=BEXI-esx-20260101000000\n\n[Datastore.0]\nName=datastore1\nUrl=/vmfs/volumes/a/\n\n[Disk.0]\nLabel=Hard disk 1\nDatastore=datastore1\nDescriptor=vmfs/volumes/datastore1/vm1/vm1.vmdk\nExtent=vmfs/volumes/datastore1/vm1/vm1-flat.vmdk\nChunked=yes\nSize=4194304\n".to_vec()
}
fn sample_index() -> Vec<u8> {
    b"affa-manifest-index 1\nvmfs/volumes/datastore1/vm1/vm1-flat.vmdk\0home/u/new\nline.img\0".to_vec()
}
fn sample_layout() -> Vec<u8> {
    br#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="VirtualMachine">42</obj><propSet><name>config.files</name><val xsi:type="VirtualMachineFileInfo"><vmPathName>[datastore1] vm1/vm1.vmx</vmPathName></val></propSet><propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice"><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] vm1/vm1-000001.vmdk</fileName><datastore type="Datastore">ds1</datastore><parent xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] vm1/vm1.vmdk</fileName></parent></backing><capacityInBytes>4194304</capacityInBytes></VirtualDevice></val></propSet><propSet><name>snapshot</name><val xsi:type="VirtualMachineSnapshotInfo"><rootSnapshotList><snapshot type="VirtualMachineSnapshot">s1</snapshot><name>BEXI-esx-20260101000000</name><id>1</id><createTime>2026-01-01T00:00:00Z</createTime></rootSnapshotList></val></propSet><propSet><name>layoutEx.file</name><val><VirtualMachineFileLayoutExFileInfo><key>0</key><name>[datastore1] vm1/vm1.vmx</name><type>config</type><size>10</size></VirtualMachineFileLayoutExFileInfo></val></propSet><propSet><name>name</name><val xsi:type="xsd:string">vm1</val></propSet></objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#.to_vec()
}

proptest! {
    #![proptest_config(cfg(1500))]
    #[test]
    fn fuzz_esxi_ini_parser(data in input(sample_ini())) { host_input::esxi_ini(&data) }
    #[test]
    fn fuzz_manifest_index_parser(data in input(sample_index())) { host_input::manifest_index(&data) }
    #[test]
    fn fuzz_host_names(data in input(b"[datastore1] vm1/x-flat.vmdk".to_vec())) { host_input::host_names(&data) }
    #[test]
    fn fuzz_vm_layout_parsers(data in mutated(sample_layout())) { host_input::vm_layout(&data) }
}

proptest! {
    #![proptest_config(cfg(1500))]
    #[test]
    fn fuzz_config_parser(data in input(sample_config())) { parse_config(&data) }
    #[test]
    fn fuzz_manifest_parser(data in input(sample_manifest())) { parse_manifest(&data) }
    #[test]
    fn fuzz_soap_parser(data in input(sample_soap())) { parse_soap(&data) }
    #[test]
    fn fuzz_soap_fault_parser(data in mutated(sample_fault())) { parse_soap(&data) }
    #[test]
    fn fuzz_report_parser(data in input(sample_report())) { parse_report(&data) }
    #[test]
    fn fuzz_rsync_stats_parser(data in input(sample_stats())) { parse_stats(&data) }
}

#[test]
fn parsers_stay_bounded_on_huge_and_deep_inputs() {
    let t = Instant::now();
    // A manifest announcing 2^40 chunks in a few bytes: refused without allocating them.
    let m = String::from_utf8(sample_manifest()).unwrap();
    let big = m.replace("chunks 4\n", "chunks 1099511627776\n").replace("size 786437\n", "size 288230376151711744\n");
    assert!(Manifest::parse(big.as_bytes()).is_err());
    // XML nested a million deep, a million siblings, a billion-laughs DTD.
    let deep = format!("{}{}", "<a>".repeat(1_000_000), "</a>".repeat(1_000_000));
    assert!(affa::esxi::soap::parse(deep.as_bytes()).is_err());
    // More siblings than soap::MAX_NODES (2 million): refused, so memory stays bounded.
    let wide = format!("<a>{}</a>", "<b/>".repeat(2_100_000));
    assert!(affa::esxi::soap::parse(wide.as_bytes()).is_err());
    let lol = r#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><l>&c;&c;&c;&c;</l>"#;
    assert!(affa::esxi::soap::parse(lol.as_bytes()).is_err());
    // 16 MB lines for the line-based parsers.
    let long = "x".repeat(16 << 20);
    parse_report(long.as_bytes());
    parse_stats(format!("Total file size: {long}\n").as_bytes());
    parse_config(format!("[web]\nInclude=/{long}\n").as_bytes());
    assert!(Manifest::parse(long.as_bytes()).is_err());
    assert!(t.elapsed() < Duration::from_secs(60), "a parser is too slow: {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Paths.

#[test]
fn job_and_archive_names_cannot_leave_rootdir() {
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::create_dir_all(src.path().join("d")).unwrap();
    fs::write(src.path().join("d/f"), "x").unwrap();
    for bad in ["..", "../etc", "a/b", "/abs", ".hidden", "-rf", "a\u{0}b", &"n".repeat(300), "a b", "a\\b"] {
        affa.write_conf("bad.conf", &format!("[{bad}]\nremoteHostName=localhost\nInclude={}\n", src.path().display()));
        let err = fail(&affa.affa(&["--configcheck"]));
        assert!(err.contains("not valid"), "{bad:?}: {err}");
        if bad.contains('\0') {
            continue; // not passable as a command-line argument
        }
        let err = fail(&affa.affa(&["--run", bad]));
        assert!(err.contains("not valid") || err.contains("no job named") || err.contains("error"), "{bad:?}: {err}");
        assert!(!err.contains("panicked"));
    }
    fs::remove_file(affa.conf.join("bad.conf")).unwrap();
    affa.write_conf(
        "web.conf",
        &format!("[web]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\n", src.path().display()),
    );
    // Job names on the command line that are no job.
    for bad in ["../web", "web/..", "..", "/etc", "web/", "-"] {
        let o = affa.affa(&["--verify", bad, "--all"]);
        assert!(!o.status.success(), "{bad:?}");
    }
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let outside = affa.tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::create_dir_all(affa.root.join("web/../outside-archive")).unwrap();
    for bad in [
        "../scheduled.0",
        "scheduled.0/..",
        "../../outside",
        "/etc",
        "scheduled.00",
        "scheduled.-1",
        "scheduled.running",
        "../outside-archive",
        &format!("scheduled.{}", "9".repeat(100)),
    ] {
        let e = fail(&affa.affa(&["--verify", "web", bad]));
        assert!(e.contains("has no archive"), "{bad:?}: {e}");
        let e = fail(&affa.affa(&["--unchunk", "web", bad, "--to", outside.to_str().unwrap()]));
        assert!(e.contains("has no archive"), "{bad:?}: {e}");
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn a_malicious_manifest_cannot_read_or_write_outside() {
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::write(src.path().join("disk.img"), vec![5u8; 600_000]).unwrap();
    affa.write_conf(
        "web.conf",
        &format!(
            "[web]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\nscheduledKeep=5\n",
            src.path().display()
        ),
    );
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let s0 = affa.job_dir("web").join("scheduled.0");
    let rel = src.path().strip_prefix("/").unwrap().join("disk.img.affa-manifest");
    let good = fs::read_to_string(s0.join(&rel)).unwrap();
    // A chunk line: the id, then (manifest version 3) its stored length.
    let id = good.lines().filter_map(|l| l.split(' ').next()).find(|w| w.len() == 64).unwrap().to_string();
    let secret = affa.tmp.path().join("secret");
    fs::write(&secret, "top secret").unwrap();
    let restore_to = affa.tmp.path().join("restore");
    let unchunk = || affa.affa(&["--unchunk", "web", "scheduled.0", "--to", restore_to.to_str().unwrap()]);
    // 1. Chunk ids that are paths.
    for evil in ["../../../../etc/passwd", "../../secret", "/etc/shadow", &format!("{}/../{}", &id[..30], &id[..31])] {
        fs::write(s0.join(&rel), good.replace(&id, evil)).unwrap();
        let e = fail(&unchunk());
        assert!(e.contains("manifest"), "{evil}: {e}");
        assert!(!restore_to.join(src.path().strip_prefix("/").unwrap()).join("disk.img").exists());
    }
    // 2. The chunk link is a symlink to a file outside: it is read (a symlink is not trusted
    //    more than a file) and refused, since it does not hash right.
    fs::write(s0.join(&rel), &good).unwrap();
    let link = s0.join(".affa-chunks").join(&id[..2]).join(&id);
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let e = fail(&unchunk());
    assert!(e.contains(&id), "{e}");
    assert!(!e.contains("top secret"), "{e}");
    assert_eq!(fs::read_to_string(&secret).unwrap(), "top secret");
    // 3. A manifest reached through a symlinked directory is not followed.
    let evil_dir = affa.tmp.path().join("evil");
    fs::create_dir_all(&evil_dir).unwrap();
    fs::write(evil_dir.join("x.affa-manifest"), &good).unwrap();
    std::os::unix::fs::symlink(&evil_dir, s0.join("sneaky")).unwrap();
    let manifests = affa::chunk::list_manifests(&s0).unwrap();
    assert!(manifests.iter().all(|m| !m.starts_with(s0.join("sneaky"))), "{manifests:?}");
    // Nothing was written outside the restore target and RootDir.
    assert_eq!(fs::read_dir(&evil_dir).unwrap().count(), 1);
}

#[test]
fn remote_file_names_with_newlines_and_leading_dashes_are_data() {
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let d = src.path().join("data");
    fs::create_dir_all(d.join("-rf")).unwrap();
    let names = [
        "-rf/x",
        "--delete",
        "-e sh -c id",
        "new\nline",
        "new\nline.img",
        "--link-dest=..",
        "..\n..",
        " space ",
        "tab\there",
        "back\\slash",
        "quote'\"",
        "*glob?[x]",
        "-.img",
    ];
    for (i, n) in names.iter().enumerate() {
        fs::write(d.join(n), format!("file {i}\n").repeat(1000)).unwrap();
    }
    let tag = format!("affa-pwned-{}", std::process::id());
    for n in [format!("$(touch {tag})"), format!("`touch {tag}`"), format!(";touch {tag};")] {
        fs::write(d.join(n), "x").unwrap();
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or("/root".into()));
    let markers = [
        home.join(&tag),
        std::env::current_dir().unwrap().join(&tag),
        d.join(&tag),
        PathBuf::from("/").join(&tag),
        PathBuf::from("/tmp").join(&tag),
    ];
    let job = affa.ssh_job(
        "web",
        &sshd,
        &format!("Include={}\nchunkFiles=*.img\nchunkSize=256K\nchunkTransport=rsync\n", d.display()),
    );
    affa.write_conf("web.conf", &job);
    ok(&affa.send_key(&mut sshd, "web"));
    let before_root: Vec<_> = fs::read_dir(affa.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    let a = affa.job_dir("web").join("scheduled.0").join(d.strip_prefix("/").unwrap());
    for (i, n) in names.iter().enumerate() {
        if n.ends_with(".img") {
            assert!(a.join(format!("{n}.affa-manifest")).is_file(), "{n:?} not chunked");
        } else {
            assert_eq!(fs::read_to_string(a.join(n)).unwrap(), format!("file {i}\n").repeat(1000), "{n:?}");
        }
    }
    for m in &markers {
        assert!(!m.exists(), "a file name was run as a command: {} exists", m.display());
    }
    assert!(a.join(format!("$(touch {tag})")).is_file());
    let after_root: Vec<_> = fs::read_dir(affa.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before_root, after_root, "something was created outside RootDir");
    let restore_to = affa.tmp.path().join("restore");
    ok(&affa.affa(&["--unchunk", "web", "scheduled.0", "--to", restore_to.to_str().unwrap()]));
    let r = restore_to.join(d.strip_prefix("/").unwrap());
    assert!(fs::read(r.join("new\nline.img")).unwrap() == fs::read(d.join("new\nline.img")).unwrap());
    assert!(fs::read(r.join("-.img")).unwrap() == fs::read(d.join("-.img")).unwrap());
    ok(&affa.affa(&["--verify", "web", "--all"]));
}

// ---------------------------------------------------------------------------------------------
// Secrets and pins.

fn fill(path: &Path, size: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0x42u8; MB as usize], 0).unwrap();
}

struct Esx {
    sshd: Sshd,
    affa: Affa,
    sim: Sim,
    work: tempfile::TempDir,
    conf: String,
}

fn esx(extra_conf: &str) -> Esx {
    let (sshd, affa, sim, work, conf) = esx_with("", extra_conf, |s| s.port);
    // Mails go to a sendmail stand-in that keeps them (state/mail/N.msg).
    keep_mails(&affa);
    Esx { sshd, affa, sim, work, conf }
}

/// vm1 (a 4 MiB disk, powered on) on the simulator (`sim_extra` added to its spec), a private
/// sshd serving its datastore, and job `esx` whose API endpoint is the port `endpoint` gives
/// (the simulator's, or a hostile one in front of it), its key installed and the endpoint's
/// certificate pinned by `--send-key`. Returns the job's configuration as pinned.
fn esx_with(
    sim_extra: &str,
    extra_conf: &str,
    endpoint: impl FnOnce(&Sim) -> u16,
) -> (Sshd, Affa, Sim, tempfile::TempDir, String) {
    let work = tempfile::Builder::new().prefix("affa-hostile").tempdir().unwrap();
    let ds1 = work.path().join("vmfs-ds1");
    fill(&ds1.join("vm1/vm1-flat.vmdk"), 4 * MB);
    let sim = Sim::start(
        &work.path().join("sim"),
        &[("datastore1", &ds1)],
        &[VmSpec { name: "vm1".into(), power_on: true, disks: vec![("datastore1".into(), 4 * MB)] }],
        sim_extra,
    );
    let port = endpoint(&sim);
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let conf = affa.ssh_job(
        "esx",
        &sshd,
        &format!("ESXi=yes\nESXiVMName=vm1\nESXiUsername={USER}\nESXiPassword={PASS}\nESXiHost=127.0.0.1\nESXiPort={port}\nremoteRsyncBinary=/usr/bin/rsync\nESXiTaskTimeout=20\n{extra_conf}"),
    );
    affa.write_conf("esx.conf", &conf);
    let sock = sshd.agent_socket();
    ok(&affa.cmd().env("SSH_AUTH_SOCK", sock).args(["--send-key", "esx", "--yes"]).output().unwrap());
    let conf = fs::read_to_string(affa.conf.join("esx.conf")).unwrap();
    (sshd, affa, sim, work, conf)
}

fn counter(e: &Esx, name: &str) -> u64 {
    e.sim.state()["counters"][name].as_u64().unwrap_or(0)
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(data) = fs::read(e.path()) {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        out.push(e.path());
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_esxi_password_never_shows() {
    let e = esx("Debug=yes\nchunkFiles=*-flat.vmdk\nchunkSize=256K\nchunkTransport=rsync\nBandwidthLimit=2000\nchattyOnSuccess=3\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(e.affa.conf.join("esx.conf")).unwrap().permissions().mode() & 0o777, 0o600);
    // While the run goes on: every process of the run, its command line and environment.
    let c = e
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-05-04T21:00:00")
        .args(["--run", "esx"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = c.id();
    let mut seen = std::collections::BTreeSet::new();
    let out = {
        let mut c = c;
        // Every 5 ms while it runs: the run's ssh and rsync live for a moment only.
        sample_until(Duration::from_secs(240), Duration::from_millis(5), "the run to end", || {
            for p in descendants(pid) {
                let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let env = fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
                if !cmd.is_empty() {
                    seen.insert(String::from_utf8_lossy(&cmd).split('\0').next().unwrap_or("").to_string());
                }
                for (what, data) in [("command line", &cmd), ("environment", &env)] {
                    assert!(
                        !data.windows(PASS.len()).any(|w| w == PASS.as_bytes()),
                        "the password is in the {what} of pid {p}: {}",
                        String::from_utf8_lossy(data).replace('\0', " ")
                    );
                }
            }
            c.try_wait().unwrap().is_some()
        });
        c.wait_with_output().unwrap()
    };
    ok(&out);
    assert!(
        seen.iter().any(|s| s.ends_with("rsync")) && seen.iter().any(|s| s.ends_with("ssh")),
        "the run's children were not seen: {seen:?}"
    );
    let all_out = [out.stdout.clone(), out.stderr.clone()].concat();
    assert!(!all_out.windows(PASS.len()).any(|w| w == PASS.as_bytes()));
    // Wrong password and unreachable host: the errors do not quote it.
    e.affa.write_conf("esx.conf", &e.conf.replace(&format!("ESXiPassword={PASS}"), "ESXiPassword=Wr0ng-s3cret-Pw"));
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(!err.contains("Wr0ng-s3cret-Pw"), "{err}");
    e.affa.write_conf("esx.conf", &e.conf);
    // logDir, every file of RootDir (reports, .esx-setup.ini, .affa-esxi.ini), the state dirs,
    // and what the status and log commands print.
    // (Also its XML-escaped form, as it travels in the SOAP Login body.)
    let escaped = PASS.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    for dir in [&e.affa.root, &e.affa.state] {
        for needle in [PASS, escaped.as_str()] {
            let hits = files_containing(dir, needle.as_bytes());
            assert!(hits.is_empty(), "the password is in {hits:?}");
        }
    }
    // The mails (a success mail and a failure mail) were sent, without it.
    let mails = fs::read_dir(e.affa.state.join("mail")).unwrap().count();
    assert!(mails >= 2, "expected a success and a failure mail, got {mails}");
    assert!(files_containing(&e.affa.state.join("log"), b"Wr0ng-s3cret-Pw").is_empty());
    let setup = fs::read_to_string(e.affa.job_dir("esx").join("scheduled.0/.esx-setup.ini")).unwrap();
    assert!(setup.contains("ESXiPassword=<hidden>"), "{setup}");
    for args in [
        &["--status"][..],
        &["--log-tail", "esx"],
        &["--list-archives", "esx"],
        &["--disk-usage"],
        &["--configcheck"],
        &["--metrics"],
    ] {
        let o = e.affa.affa(args);
        let t = [o.stdout, o.stderr].concat();
        assert!(!t.windows(PASS.len()).any(|w| w == PASS.as_bytes()), "{args:?} prints the password");
    }
    // A config file holding the password that others may read is refused.
    fs::set_permissions(e.affa.conf.join("esx.conf"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = fail(&e.affa.affa(&["--run", "esx"]));
    assert!(err.contains("chmod 600") && !err.contains(PASS), "{err}");
    let _ = (&e.sshd, &e.work);
}

#[test]
fn a_changed_certificate_stops_the_job_before_any_credential() {
    let e = esx("");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    // The "host" is replaced: same address and datastores, a new certificate.
    let ds1 = e.work.path().join("vmfs-ds1");
    let sim2 = Sim::start(
        &e.work.path().join("sim2"),
        &[("datastore1", &ds1)],
        &[VmSpec { name: "vm2".into(), power_on: false, disks: vec![("datastore1".into(), MB)] }],
        "",
    );
    assert_ne!(sim2.thumbprint, e.sim.thumbprint);
    e.affa.write_conf(
        "esx.conf",
        &e.conf.replace(&format!("ESXiPort={}", e.sim.port), &format!("ESXiPort={}", sim2.port)),
    );
    let err = fail(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    assert!(err.contains("fingerprint") && err.contains("ESXiThumbprint"), "{err}");
    assert!(!err.contains(PASS));
    let st = sim2.state();
    let calls: u64 = st["counters"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.starts_with("soap:")).map(|(_, v)| v.as_u64().unwrap_or(0)).sum())
        .unwrap_or(0);
    assert_eq!(calls, 0, "SOAP calls reached the impostor: {}", st["counters"]);
    // The real host saw --send-key's Changed Block Tracking check and the first run, nothing more.
    assert_eq!(counter(&e, "soap:Login"), 2);
    assert_eq!(archive_names(&e.affa.job_dir("esx")), ["scheduled.0"]);
}

#[test]
fn a_changed_ssh_host_key_stops_the_job_before_anything_is_sent() {
    let mut sshd = Sshd::start();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::write(src.path().join("f"), "x").unwrap();
    affa.write_conf("web.conf", &affa.ssh_job("web", &sshd, &format!("Include={}\n", src.path().display())));
    ok(&affa.send_key(&mut sshd, "web"));
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let before = tree_hashes(&affa.job_dir("web"));
    sshd.change_host_key();
    fs::write(src.path().join("f"), "changed").unwrap();
    let o = affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]);
    let err = fail(&o);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("affa: error: ") && (last.contains("host key") || last.contains("HOST IDENTIFICATION")),
        "{err}"
    );
    assert_eq!(tree_hashes(&affa.job_dir("web")), before);
    assert!(!affa.job_dir("web").join("scheduled.running").exists());
    // --send-key does not silently accept the new key either.
    let o = affa.send_key(&mut sshd, "web");
    assert!(!o.status.success(), "send-key accepted a changed host key: {}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn no_source_disables_host_key_or_certificate_checks() {
    // Every crate of the workspace: the root crate's src/ and crates/*/src.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    let forbidden = [
        "StrictHostKeyChecking=no",
        "StrictHostKeyChecking no",
        "UserKnownHostsFile=/dev/null",
        "danger_accept_invalid",
        "accept_invalid_certs",
        "NoCertificateVerification",
        "NoVerifier",
        "InsecureSkipVerify",
    ];
    let mut stack = vec![root.join("src"), root.join("crates")];
    let mut dangerous = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = fs::read_to_string(&p).unwrap_or_default();
            // Code only: comments may say what must never be done.
            let code: String =
                text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            for f in forbidden {
                assert!(!code.contains(f), "{} contains {f}", p.display());
            }
            for (i, l) in text.lines().enumerate() {
                if l.contains(".dangerous()") || l.contains("builder_dangerous") {
                    dangerous.push(format!("{}:{}", p.strip_prefix(&root).unwrap().display(), i + 1));
                }
            }
        }
    }
    // The only custom verifier is the pinning one (tls.rs); lettre's builder_dangerous only
    // means "no default TLS", notify.rs passes its own verifying TlsParameters.
    for d in &dangerous {
        assert!(
            d.starts_with("crates/vsphere/src/tls.rs:") || d.starts_with("src/notify.rs:"),
            "unexpected TLS override at {d}"
        );
    }
    let tls = fs::read_to_string(root.join("crates/vsphere/src/tls.rs")).unwrap();
    assert!(tls.contains("impl ServerCertVerifier for PinnedVerifier"));
}

// ---------------------------------------------------------------------------------------------
// Hostile hosts (issue 11): a compromised ESXi host (tests/common/hostile_esx.rs: a TLS endpoint
// holding the pinned certificate, in front of the simulator) and a hostile source host (the
// real sshd, a tree holding planted files). docs/SECURITY.md maps each finding to its test.

/// An ESXi job whose API endpoint is the hostile one (pinned by `--send-key`).
struct HEsx {
    sshd: Sshd,
    affa: Affa,
    sim: Sim,
    host: Hostile,
    work: tempfile::TempDir,
}

fn hostile_esx(extra_conf: &str, answer: Answer, rewrite: Rewrite) -> HEsx {
    let mut front = None;
    let (sshd, affa, sim, work, conf) = esx_with(r#","plain_http":true"#, extra_conf, |s| {
        let h = Hostile::start(s.port, answer, rewrite);
        let port = h.port;
        front = Some(h);
        port
    });
    let host = front.unwrap();
    assert!(conf.contains(&format!("ESXiThumbprint={}", host.thumbprint)), "{conf}");
    HEsx { sshd, affa, sim, host, work }
}

fn no_answer() -> Answer {
    Arc::new(|_: &str, _: &str| None)
}

/// Names of the entries of a directory (empty when it does not exist).
fn entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_datastore_name_from_the_host_cannot_leave_rootdir() {
    // Finding 1: the datastore name went into vmfs/volumes/<ds> unchecked.
    let outside_abs = std::env::temp_dir().join(format!("affa-abs-ds-{}", std::process::id()));
    let names = [
        "../../../../../outside-ds".to_string(),
        outside_abs.display().to_string(),
        "..".to_string(),
        "a\nb".to_string(),
        "a/../../../../../../outside-ds2".to_string(),
    ];
    let bad = Arc::new(std::sync::Mutex::new(String::new()));
    let b2 = bad.clone();
    let rewrite: Rewrite = Arc::new(move |_: &str, _: &str, resp: String| {
        let b = b2.lock().unwrap().clone();
        if b.is_empty() {
            resp
        } else {
            resp.replace("datastore1", &xml(&b))
        }
    });
    let e = hostile_esx("", no_answer(), rewrite);
    let around = e.affa.tmp.path().to_path_buf();
    let before = entries(&around);
    for name in &names {
        *bad.lock().unwrap() = name.clone();
        let creates = e.host.count("CreateSnapshot_Task");
        let err = fail(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
        let last = err.lines().last().unwrap_or("");
        assert!(last.contains("datastore name") && last.contains("refusing"), "{name:?}: {err}");
        assert!(!err.contains('\u{1b}'), "{err}");
        // Nothing outside RootDir, no archive, no snapshot made or left.
        assert_eq!(entries(&around), before, "{name:?}: something was written next to RootDir");
        assert!(!outside_abs.exists(), "{name:?}: written to {}", outside_abs.display());
        assert!(!e.work.path().join("outside-ds").exists() && !e.work.path().join("outside-ds2").exists());
        assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
        assert_eq!(e.host.count("CreateSnapshot_Task"), creates, "{name:?}: a snapshot was made");
        assert!(e.sim.snapshots("vm1").is_empty());
    }
    let _ = fs::remove_dir_all(&outside_abs);
    // The same host with honest names: the backup works.
    bad.lock().unwrap().clear();
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    assert!(e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes/datastore1/vm1/vm1-flat.vmdk").is_file());
    let _ = (&e.sshd, &e.work);
}

#[test]
fn host_names_with_control_characters_never_reach_the_ini_or_the_terminal() {
    // Finding 11: a newline in the VM name injected keys into .affa-esxi.ini, escape sequences
    // went to the terminal and the log.
    let hostile = "vm1\n[Datastore.9]\nName=planted\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let h = hostile.to_string();
    let rewrite: Rewrite = Arc::new(move |_: &str, req: &str, resp: String| {
        if req.contains("layoutEx.file") {
            resp.replace(">vm1</val>", &format!(">{}</val>", xml(&h)))
        } else {
            resp
        }
    });
    let e = hostile_esx("", no_answer(), rewrite);
    let o = e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]);
    let err = fail(&o);
    assert!(err.contains("VM name") && err.contains("control character"), "{err}");
    assert!(!o.stderr.contains(&0x1b) && !o.stdout.contains(&0x1b), "an escape sequence reached the terminal: {err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert_eq!(e.host.count("CreateSnapshot_Task"), 0, "refused only after the snapshot");
    assert!(files_containing(&e.affa.root, b"planted").is_empty(), "the name reached RootDir");
    for f in fs::read_dir(e.affa.state.join("log")).unwrap().flatten() {
        let t = fs::read(f.path()).unwrap();
        assert!(!t.contains(&0x1b), "{} holds an escape sequence", f.path().display());
        assert!(!String::from_utf8_lossy(&t).lines().any(|l| l.starts_with("[Datastore.9]")), "a forged log line");
    }
    let _ = (&e.sshd, &e.sim, &e.work);
}

#[test]
fn a_symlinked_disk_extent_does_not_bring_a_backup_server_file_into_the_archive() {
    // Finding 3: rsync -a copied the host's symlink into staging and chunking followed it.
    let e = esx("chunkFiles=*-flat.vmdk\nchunkSize=256K\nchunkCompression=none\nchunkTransport=rsync\n");
    let key = e.affa.state.join("ssh/id_ed25519_affa");
    let secret = fs::read(&key).unwrap();
    let flat = e.work.path().join("vmfs-ds1/vm1/vm1-flat.vmdk");
    fs::remove_file(&flat).unwrap();
    std::os::unix::fs::symlink(&key, &flat).unwrap();
    let err = fail(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    assert!(err.contains("vm1-flat.vmdk") && err.contains("not a regular file"), "{err}");
    assert!(files_containing(&e.affa.root, &secret).is_empty(), "affa's private key is in RootDir");
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
    assert!(e.sim.snapshots("vm1").is_empty(), "the snapshot was left");
    let _ = (&e.sshd, &e.conf);
}

/// A VM file the host makes a symlink (to a file of the host, or to one whose path is a file
/// of the backup server) is left out of the archive with a warning: before, rsync archived the
/// link, and the ESXi restore (which takes regular files only) refused the whole archive.
#[test]
fn a_symlinked_vm_file_is_left_out_with_a_warning_and_the_archive_stays_restorable() {
    let e = esx("");
    let key = e.affa.state.join("ssh/id_ed25519_affa");
    let secret = fs::read(&key).unwrap();
    let nvram = e.work.path().join("vmfs-ds1/vm1/vm1.nvram");
    fs::remove_file(&nvram).unwrap();
    std::os::unix::fs::symlink(&key, &nvram).unwrap();
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let log = fs::read_to_string(e.affa.state.join("log/esx.log")).unwrap();
    assert!(log.contains("vm1/vm1.nvram on the host is not a regular file") && log.contains("not archived"), "{log}");
    let vm_dir = e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes/datastore1/vm1");
    assert!(fs::symlink_metadata(vm_dir.join("vm1.nvram")).is_err(), "the link was archived");
    assert!(vm_dir.join("vm1.vmx").is_file() && vm_dir.join("vm1-flat.vmdk").is_file());
    assert!(files_containing(&e.affa.root, &secret).is_empty(), "affa's private key is in RootDir");
    // The archive is restorable (the restore refuses an archive that holds a link).
    ok(&e.affa.affa(&["--full-restore", "esx", "--dry-run", "--to-dir", "copy"]));
    let _ = (&e.sshd, &e.sim, &e.conf);
}

#[test]
fn restore_refuses_archived_names_the_one_rule_refuses() {
    // Archive contents are not trusted: a name that could not have come from an honest backup
    // is not sent to the host.
    let e = esx("");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let vm_dir = e.affa.job_dir("esx").join("scheduled.0/vmfs/volumes/datastore1/vm1");
    fs::write(vm_dir.join("evil\nname.vmx"), "x").unwrap();
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--dry-run", "--to-dir", "copy"]));
    assert!(err.contains("archived file name") && err.contains("control character"), "{err}");
    fs::remove_file(vm_dir.join("evil\nname.vmx")).unwrap();
    let err = fail(&e.affa.affa(&["--full-restore", "esx", "--dry-run", "--to-datastore", "../x"]));
    assert!(err.contains("--to-datastore"), "{err}");
    ok(&e.affa.affa(&["--full-restore", "esx", "--dry-run", "--to-dir", "copy"]));
    let _ = (&e.sshd, &e.sim, &e.work, &e.conf);
}

#[test]
fn cleanup_of_leftovers_removes_only_the_jobs_own_snapshots() {
    // Finding 6: every BEXI- snapshot was removed, also another job's.
    let e = esx("");
    let mut o = affa::esxi::ConnectOptions::new("127.0.0.1");
    o.port = e.sim.port;
    o.thumbprint = Some(e.sim.thumbprint.clone());
    let mut c = affa::esxi::Client::connect(o).unwrap();
    c.login(USER, &affa::esxi::Password::new(PASS)).unwrap();
    let vm = c.find_vm("vm1").unwrap();
    let others = ["BEXI-other-20260504200000", "BEXI-esx-2-20260504200000", "BEXI-esx-manual", "BEXI-esx-2026050420"];
    for n in others.iter().take(2) {
        c.create_snapshot(&vm, n, "", false, false).unwrap();
    }
    c.create_snapshot(&vm, "BEXI-esx-20260504200000", "", false, false).unwrap(); // this job's leftover
    for n in others.iter().skip(2) {
        c.create_snapshot(&vm, n, "", false, false).unwrap();
    }
    c.logout().unwrap();
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let mut left = e.sim.snapshots("vm1");
    left.sort();
    let mut want: Vec<String> = others.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(left, want, "another job's snapshot was removed, or this job's leftover was kept");
    let report = fs::read_to_string(e.affa.job_dir("esx").join("scheduled.0/.AFFA3-REPORT")).unwrap();
    assert!(report.contains("ESXiLeftoverSnapshotsRemoved=BEXI-esx-20260504200000\n"), "{report}");
    let _ = (&e.sshd, &e.work, &e.conf);
}

#[test]
fn http_with_a_password_or_a_pinned_thumbprint_is_refused() {
    // Finding 8: ESXiProtocol=http sent the password in clear and ignored ESXiThumbprint.
    let work = tempfile::Builder::new().prefix("affa-http").tempdir().unwrap();
    let ds1 = work.path().join("ds1");
    fill(&ds1.join("vm1/vm1-flat.vmdk"), MB);
    let sim = Sim::start(
        &work.path().join("sim"),
        &[("datastore1", &ds1)],
        &[VmSpec { name: "vm1".into(), power_on: false, disks: vec![("datastore1".into(), MB)] }],
        r#","plain_http":true"#,
    );
    let affa = Affa::new();
    let base = format!(
        "[esx]\nremoteHostName=127.0.0.1\nESXi=yes\nESXiVMName=vm1\nESXiUsername={USER}\nESXiPassword={PASS}\nESXiProtocol=http\nESXiPort={}\n",
        sim.port
    );
    let conf_file = affa.conf.join("esx.conf").display().to_string();
    affa.write_conf("esx.conf", &base);
    for args in [&["--configcheck"][..], &["--run", "esx"]] {
        let err = fail(&affa.affa(args));
        let line = err.trim_end();
        assert_eq!(line.lines().count(), 1, "{err}");
        assert!(
            line.contains(&conf_file) && line.contains("ESXiProtocol=http") && line.contains("ESXiInsecureHttp=yes"),
            "{err}"
        );
        assert!(!err.contains(PASS));
    }
    let tp = "AB:".repeat(31) + "AB";
    affa.write_conf("esx.conf", &format!("{base}ESXiInsecureHttp=yes\nESXiThumbprint={tp}\n"));
    let err = fail(&affa.affa(&["--configcheck"]));
    assert!(err.contains("ESXiThumbprint") && err.contains("ESXiProtocol=http") && err.contains(&conf_file), "{err}");
    let calls: u64 = sim.state()["counters"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.starts_with("soap:")).map(|(_, v)| v.as_u64().unwrap_or(0)).sum())
        .unwrap_or(0);
    assert_eq!(calls, 0, "something reached the host over http");
    // The documented opt-in for a test host.
    affa.write_conf("esx.conf", &format!("{base}ESXiInsecureHttp=yes\n"));
    ok(&affa.affa(&["--configcheck"]));
}

#[test]
fn a_report_planted_by_the_source_is_never_trusted() {
    // Finding 4: the source's own /.AFFA3-REPORT landed in scheduled.running, and after a failed
    // transfer the next run promoted it as a complete archive dated 2099.
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let s = src.path();
    fs::write(s.join("data.txt"), "real data").unwrap();
    fs::write(s.join(".AFFA3-REPORT"), "[Report]\nDate=209912312359\nExitStatus=0\n").unwrap();
    fs::write(s.join(".web-setup.ini"), "; planted\nInclude=/etc\n").unwrap();
    fs::write(s.join(".affa-esxi.ini"), "[VM]\nName=planted\n").unwrap();
    fs::write(s.join(".affa-manifests"), "affa-manifest-index 1\ndata.txt\0").unwrap();
    fs::create_dir_all(s.join(".affa-chunks/ab")).unwrap();
    fs::write(s.join(".affa-chunks/ab/planted"), "x").unwrap();
    fs::write(s.join("..AFFA3-REPORT.tmp-1"), "x").unwrap();
    // `SRC/./` makes SRC the root of the transfer, exactly as `/` is for Include=/.
    let base = affa.ssh_job("web", &sshd, &format!("Include={}/./\nscheduledKeep=3\n", s.display()));
    affa.write_conf("web.conf", &format!("{base}Include=/nonexistent-affa-{}\n", std::process::id()));
    ok(&affa.send_key(&mut sshd, "web"));
    let err = fail(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    assert!(err.contains("rsync failed"), "{err}");
    let running = affa.job_dir("web").join("scheduled.running");
    assert!(running.join("data.txt").is_file(), "the transfer did not get far enough: the test proves nothing");
    for n in
        [".AFFA3-REPORT", ".web-setup.ini", ".affa-esxi.ini", ".affa-manifests", ".affa-chunks", "..AFFA3-REPORT.tmp-1"]
    {
        assert!(fs::symlink_metadata(running.join(n)).is_err(), "the source's {n} landed at the archive root");
    }
    // A report in scheduled.running that affa did not record as complete is not believed,
    // however it got there.
    fs::write(running.join(".AFFA3-REPORT"), "[Report]\nDate=209912312359\nExitStatus=0\n").unwrap();
    // An Include pattern that matches every dot file (rsync applies the first rule that
    // matches: affa's own names are excluded before any of the job's patterns).
    affa.write_conf("web.conf", &format!("{base}Include=.*\n"));
    ok(&affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    let job = affa.job_dir("web");
    assert_eq!(archive_names(&job), ["scheduled.0"], "the incomplete transfer became an archive");
    let s0 = job.join("scheduled.0");
    let report = fs::read_to_string(s0.join(".AFFA3-REPORT")).unwrap();
    assert!(report.contains("Date=202603021100"), "{report}");
    assert!(files_containing(&job, b"209912312359").is_empty());
    let setup = fs::read_to_string(s0.join(".web-setup.ini")).unwrap();
    assert!(setup.starts_with("; Created on") && !setup.contains("Include=/etc"), "{setup}");
    assert!(!s0.join(".affa-esxi.ini").exists() && !s0.join(".affa-chunks").exists());
    assert_eq!(fs::read(s0.join(".affa-manifests")).unwrap(), b"affa-manifest-index 1\n");
    assert_eq!(fs::read_to_string(s0.join("data.txt")).unwrap(), "real data");
    assert!(!ok(&affa.affa(&["--list-archives", "web"])).contains("2099"));
    // The host's rsync prints a line on the client's stdout among the statistics (its
    // messages reach it there): it never becomes a report value. Modelled by a wrapper around
    // the local rsync that prints it first (the bytes affa reads are the same).
    let wrapper = src.path().parent().unwrap().join(format!("affa-rsync-date-{}", std::process::id()));
    fs::write(
        &wrapper,
        "#!/bin/sh\necho 'Date: 209912312359'\necho 'Execution Time: 987654'\necho 'Exit Status: 0'\nexec rsync \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    affa.write_conf("web.conf", &format!("{base}localRsyncBinary={}\n", wrapper.display()));
    ok(&affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    let _ = fs::remove_file(&wrapper);
    let report = fs::read_to_string(job.join("scheduled.0/.AFFA3-REPORT")).unwrap();
    assert!(report.contains("Date=202603021200\n") && !report.contains("987654"), "{report}");
    assert!(files_containing(&job, b"209912312359").is_empty());
}

#[test]
fn source_files_that_look_like_store_internals_are_backed_up_and_restored_as_files() {
    // Finding 5: a source holding affa archives (x.affa-manifest files, .affa-chunks dirs)
    // broke --verify and made --full-restore refuse everything.
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let s = src.path();
    fs::write(s.join("disk.img"), vec![9u8; 600_000]).unwrap();
    fs::write(s.join("notes.affa-manifest"), "not a manifest\n").unwrap();
    // A real affa archive on the source: a manifest whose chunks are in its own .affa-chunks.
    let other = Affa::new();
    let inner = tempfile::Builder::new().prefix("affa-inner").tempdir().unwrap();
    fs::write(inner.path().join("vm.img"), vec![3u8; 300_000]).unwrap();
    other.write_conf(
        "v.conf",
        &format!(
            "[v]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\n",
            inner.path().display()
        ),
    );
    ok(&other.affa_at("2026-03-01T10:00:00", &["--run", "v"]));
    let held = s.join("var/affa");
    fs::create_dir_all(&held).unwrap();
    assert!(std::process::Command::new("cp").arg("-a").arg(other.job_dir("v")).arg(&held).status().unwrap().success());
    let job = affa.ssh_job(
        "web",
        &sshd,
        &format!("Include={}\nchunkFiles=*.img\nchunkSize=256K\nchunkTransport=rsync\n", s.display()),
    );
    affa.write_conf("web.conf", &job);
    ok(&affa.send_key(&mut sshd, "web"));
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&affa.affa(&["--verify", "web", "--all"]));
    let before = tree_hashes(s);
    assert!(before.keys().any(|k| k.ends_with(".affa-manifest") && k.starts_with("var/affa/")), "{before:?}");
    assert!(before.keys().any(|k| k.contains("/.affa-chunks/")), "{before:?}");
    // The source loses everything; the restore brings every file back, byte for byte.
    for e in fs::read_dir(s).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    ok(&affa.affa(&["--full-restore", "web", "--yes"]));
    assert_eq!(tree_hashes(s), before);
    let _ = &inner;
}

/// A sendmail stand-in that keeps each mail as state/mail/N.msg.
fn keep_mails(affa: &Affa) -> PathBuf {
    let mail = affa.state.join("mail");
    fs::create_dir_all(&mail).unwrap();
    let sm = affa.state.join("sendmail.sh");
    fs::write(&sm, format!("#!/bin/sh\nn=$(ls {o} | wc -l)\ncat > {o}/$n.msg\n", o = mail.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&sm, fs::Permissions::from_mode(0o755)).unwrap();
    let global = fs::read_to_string(affa.conf.join("00-global.conf")).unwrap();
    affa.write_conf("00-global.conf", &format!("{global}sendmailBinary={}\n", sm.display()));
    mail
}

#[test]
fn a_flood_on_rsync_stderr_keeps_memory_and_the_mail_small() {
    // Finding 7: every stderr line was kept twice and the error mail quoted the whole log.
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let mails = keep_mails(&affa);
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::write(src.path().join("f"), "x").unwrap();
    let noisy = src.path().join("noisy-rsync");
    let lines = 300_000;
    fs::write(
        &noisy,
        format!(
            "#!/bin/sh\nawk 'BEGIN {{ for (i = 0; i < {lines}; i++) printf \"rsync: [sender] send_files failed to open \\\"/srv/data/file%07d\\\": Permission denied (13) xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\\n\", i }}' >&2\nexec /usr/bin/rsync \"$@\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&noisy, fs::Permissions::from_mode(0o755)).unwrap();
    let job = affa.ssh_job(
        "web",
        &sshd,
        &format!(
            "Include={}\nInclude=/nonexistent-affa-{}\nremoteRsyncBinary={}\nRetryAttempts=0\n",
            src.path().display(),
            std::process::id(),
            noisy.display()
        ),
    );
    affa.write_conf("web.conf", &job);
    ok(&affa.send_key(&mut sshd, "web"));
    let t = Instant::now();
    let child = affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T10:00:00")
        .args(["--run", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kib = 0u64;
    let out = {
        let mut child = child;
        // Its peak memory, read every 10 ms while it runs.
        sample_until(Duration::from_secs(120), Duration::from_millis(10), "the flooded run to end", || {
            if let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(v) = st.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                    peak_kib = peak_kib.max(v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
                }
            }
            child.try_wait().unwrap().is_some()
        });
        child.wait_with_output().unwrap()
    };
    let err = fail(&out);
    assert!(err.contains("rsync failed"), "{err}");
    let log = fs::read_to_string(affa.state.join("log/web.log")).unwrap();
    assert!(log.contains("file0299999"), "the log must hold every line");
    assert!(peak_kib < 64 * 1024, "affa kept the flood in memory: peak {peak_kib} KiB");
    let mail: Vec<PathBuf> = fs::read_dir(&mails).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(mail.len(), 1, "one error mail");
    let m = fs::read_to_string(&mail[0]).unwrap();
    assert!(m.len() < 1 << 20, "the error mail is {} bytes", m.len());
    assert!(m.contains("left out"), "the mail does not say that lines were left out");
    assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
}

#[test]
fn remote_scripts_run_in_a_private_directory_and_end_in_time() {
    // Finding 11: remote scripts went to the predictable /tmp/affa-JOB-PID on the host.
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::write(src.path().join("f"), "x").unwrap();
    let scripts = affa.state.join("scripts");
    fs::create_dir_all(&scripts).unwrap();
    let marker = src.path().join("ran");
    fs::write(
        scripts.join("pre.sh"),
        format!(
            "#!/bin/sh\necho \"$0 $1 $2\" > {m}\nstat -c '%a' \"$(dirname \"$0\")\" >> {m}\n",
            m = marker.display()
        ),
    )
    .unwrap();
    let victim = src.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    let job = "scriptjob";
    let conf = affa.ssh_job(job, &sshd, &format!("Include={}\npreJobCommandRemote=pre.sh\n", src.path().display()));
    affa.write_conf("s.conf", &conf);
    ok(&affa.send_key(&mut sshd, job));
    // A user of the host plants a symlink at the name the script would get.
    let child = affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T10:00:00")
        .args(["--run", job])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let planted = PathBuf::from(format!("/tmp/affa-{job}-{}", child.id()));
    let _ = fs::remove_file(&planted);
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = fs::remove_file(&planted);
    ok(&out);
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the script was written through the planted symlink"
    );
    let ran = fs::read_to_string(&marker).unwrap();
    let mut l = ran.lines();
    let (path, mode) = (l.next().unwrap(), l.next().unwrap());
    let script = Path::new(path.split(' ').next().unwrap());
    assert!(path.ends_with(&format!(" 127.0.0.1 {job}")), "{ran}");
    assert_ne!(script, planted.as_path());
    assert_ne!(script.parent(), Some(Path::new("/tmp")), "{ran}");
    assert_eq!(mode, "700", "{ran}");
    assert!(!script.parent().unwrap().exists(), "the private directory was not removed");
    // A script that hangs is stopped at scriptTimeout, and the job's lock is free again.
    fs::write(scripts.join("pre.sh"), "#!/bin/sh\nsleep 40\n").unwrap();
    affa.write_conf("s.conf", &format!("{conf}scriptTimeout=2\n"));
    let t = Instant::now();
    let err = fail(&affa.affa_at("2026-03-02T11:00:00", &["--run", job]));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(err.contains("did not finish within 2 s") && err.contains("scriptTimeout"), "{err}");
    // The next run takes the lock (with the default scriptTimeout again: 2 s is not always
    // enough for a script over ssh on a busy machine, and the lock is what is checked here).
    fs::write(scripts.join("pre.sh"), "#!/bin/sh\ntrue\n").unwrap();
    affa.write_conf("s.conf", &conf);
    ok(&affa.affa_at("2026-03-02T12:00:00", &["--run", job]));
}

#[test]
fn a_wedged_host_cannot_hold_the_job_or_keep_the_vm_on_its_snapshot() {
    // Finding 11: ssh remote commands (vim-cmd) had no time limit.
    let e = esx("");
    let standin = e.work.path().join("vim-cmd");
    let wedge = e.work.path().join("wedge");
    fs::write(
        &standin,
        format!(
            "#!/bin/sh\n{} vim-cmd --control {} \"$@\"\nrc=$?\nif [ \"$1\" = vmsvc/snapshot.create ] && [ -e {} ]; then sleep 40; fi\nexit $rc\n",
            common::sim::sim_binary().display(),
            e.sim.control,
            wedge.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&standin, fs::Permissions::from_mode(0o755)).unwrap();
    let conf = e
        .conf
        .replace("ESXiTaskTimeout=20", "ESXiTaskTimeout=3")
        .replace("ConnectionCheckTimeout=10", "ConnectionCheckTimeout=2")
        + &format!("ESXiSnapshotMode=vim-cmd\nESXiVimCmd={}\n", standin.display());
    e.affa.write_conf("esx.conf", &conf);
    fs::write(&wedge, "").unwrap();
    let t = Instant::now();
    let err = fail(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    assert!(t.elapsed() < Duration::from_secs(30), "the run waited on the wedged host: {:?}", t.elapsed());
    assert!(err.contains("did not finish within 5 s") && err.contains("ESXiTaskTimeout"), "{err}");
    assert!(e.sim.snapshots("vm1").is_empty(), "the VM was left on its snapshot: {:?}", e.sim.snapshots("vm1"));
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
    // The lock is free: the next run goes.
    fs::remove_file(&wedge).unwrap();
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    assert!(e.sim.snapshots("vm1").is_empty());
    let _ = &e.sshd;
}

#[test]
fn property_retrieval_is_bounded_in_bytes_and_pages() {
    // Finding 11: retrieve() followed up to 10000 continuation pages of up to 64 MiB.
    let mode = Arc::new(AtomicUsize::new(0)); // 0: honest, 1: 4 MiB pages, 2: tiny pages
    let served = Arc::new(AtomicUsize::new(0));
    let (m2, s2) = (mode.clone(), served.clone());
    let page = move |token: Option<usize>, payload: &str, resp: &str| {
        let t = token.map(|t| format!("<token>t{t}</token>")).unwrap_or_default();
        common::hostile_esx::envelope(&format!(
            r#"<{resp} xmlns="urn:vim25"><returnval>{t}<objects><obj type="VirtualMachine">vm-9</obj><propSet><name>name</name><val xsi:type="xsd:string">{payload}</val></propSet></objects></returnval></{resp}>"#
        ))
    };
    let answer: Answer = Arc::new(move |method: &str, req: &str| {
        let m = m2.load(Ordering::SeqCst);
        if m == 0 {
            return None;
        }
        let (size, cap) = if m == 1 { (4 << 20, 60) } else { (10, 1200) };
        let payload = "A".repeat(size);
        match method {
            "RetrievePropertiesEx" if req.contains("traverseView") => {
                Some(page(Some(0), &payload, "RetrievePropertiesExResponse"))
            }
            "ContinueRetrievePropertiesEx" => {
                let n = s2.fetch_add(1, Ordering::SeqCst) + 1;
                let next = if n < cap { Some(n) } else { None };
                Some(page(next, &payload, "ContinueRetrievePropertiesExResponse"))
            }
            _ => None,
        }
    });
    let e = hostile_esx("", answer, Arc::new(|_: &str, _: &str, r: String| r));
    for (m, limit, what) in [(1usize, 33usize, "MiB"), (2, 1000, "pages")] {
        mode.store(m, Ordering::SeqCst);
        served.store(0, Ordering::SeqCst);
        let err = fail(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
        let n = served.load(Ordering::SeqCst);
        assert!(n <= limit, "affa took {n} continuation pages (mode {m}): {err}");
        assert!(err.contains("property retrieval") && err.contains(what), "{err}");
    }
    assert_eq!(e.host.count("CreateSnapshot_Task"), 0);
    mode.store(0, Ordering::SeqCst);
    ok(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    let _ = (&e.sshd, &e.sim, &e.work);
}

#[test]
fn special_files_a_host_backed_up_give_a_samba_share_user_nothing_of_the_backup_server() {
    // Review of the Samba shares: a job without chunkFiles was shared as RootDir/JOB itself, with
    // `force user = root`. smbd (4.17) opens a device node it is asked for (O_RDONLY|O_NONBLOCK
    // after an O_PATH lookup): a host that backed up a block device with the major and minor of
    // the backup server's disk gave its share users that disk, every other job's archives (a
    // client reading past the size 0 smbd reports got the loop device's bytes). Now the share's
    // path is a bind mount of RootDir/JOB, read-only, nodev, nosuid, noexec.
    if !is_root() {
        eprintln!("skipped: smbd and the device nodes need root");
        return;
    }
    let mut sshd = Sshd::shared();
    let smbd = common::smb::start_smbd();
    let affa = Affa::new();
    let _mounts = common::smb::ShareMounts(affa.state.join("lock/samba-mounts"));
    let global = fs::read_to_string(affa.conf.join("00-global.conf")).unwrap();
    affa.write_conf(
        "00-global.conf",
        &format!(
            "{global}sambaConfDir={s}/samba\nsmbConf={}\n",
            smbd.dir.path().join("smb.conf").display(),
            s = affa.state.display()
        ),
    );
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let data = src.path().join("data");
    fs::create_dir_all(data.join("sub")).unwrap();
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(data.join("sub/blob.bin"), &blob).unwrap();
    // The secret lives next to RootDir, never inside it.
    let planted = common::smb::plant_specials(&data, &affa.tmp.path().join("outside"));
    affa.write_conf(
        "web.conf",
        &affa.ssh_job("web", &sshd, &format!("Include={}\nSambaShare=yes\nSambaValidUser=root\n", data.display())),
    );
    ok(&affa.send_key(&mut sshd, "web"));
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    // The archive holds what the host sent (else the test proves nothing).
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rel = data.strip_prefix("/").unwrap();
    let arch = affa.job_dir("web").join("scheduled.0").join(rel);
    let ft = |n: &str| fs::symlink_metadata(arch.join(n)).unwrap().file_type();
    assert!(
        ft("zero").is_char_device() && ft("fifo").is_fifo() && ft("sock").is_socket() && ft("root-link").is_symlink()
    );
    if planted.disk.is_some() {
        assert!(ft("disk").is_block_device());
    }
    assert_eq!(fs::symlink_metadata(arch.join("suid")).unwrap().mode() & 0o7777, 0o4755);

    let out = ok(&affa.affa(&["--samba-shares"]));
    assert!(out.starts_with("Samba shares: web"), "{out}");
    let o = common::smb::smbclient_until_ok(&smbd, "web", "ls scheduled.0/*");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let watch: Vec<PathBuf> = planted.devices.iter().map(|d| arch.join(d)).collect();
    let share_rel = format!("scheduled.0/{}", rel.display());
    planted.assert_the_share_gives_nothing_of_the_server(
        &smbd,
        "web",
        &share_rel,
        &data,
        &watch,
        &affa.tmp.path().join("got"),
    );
    let o = common::smb::smbclient(
        &smbd,
        "web",
        &format!("get {share_rel}/sub/blob.bin {}/blob", affa.tmp.path().display()),
    );
    assert!(o.status.success() && fs::read(affa.tmp.path().join("blob")).unwrap() == blob);
    // The share's path is that mount, never RootDir/JOB.
    let mp = affa.state.join("lock/samba-mounts/web");
    let share = fs::read_to_string(affa.state.join("samba/affa-job-web.conf")).unwrap();
    assert!(share.contains(&format!("\tpath = {}\n", mp.display())), "{share}");
    let mount_opts = |mp: &Path| {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .rfind(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
            .map(|l| l.split(' ').nth(5).unwrap().to_string())
    };
    let opts = mount_opts(&mp).expect("the share's mount");
    assert!(["ro", "nodev", "nosuid", "noexec"].iter().all(|o| opts.split(',').any(|x| x == *o)), "{opts}");
    // RootDir/JOB replaced by a copy (an archive moved to another disk and back): the next
    // --samba-shares binds the new directory, the share shows what is there now.
    let job = affa.job_dir("web");
    let old = affa.root.join("web.old");
    fs::rename(&job, &old).unwrap();
    assert!(std::process::Command::new("cp").arg("-a").arg(&old).arg(&job).status().unwrap().success());
    fs::write(job.join("scheduled.0/after-the-move.txt"), "moved\n").unwrap();
    ok(&affa.affa(&["--samba-shares"]));
    assert_eq!(fs::metadata(&mp).unwrap().ino(), fs::metadata(&job).unwrap().ino());
    let got = affa.tmp.path().join("after");
    let o = common::smb::smbclient(&smbd, "web", &format!("get scheduled.0/after-the-move.txt {}", got.display()));
    assert!(o.status.success() && fs::read(&got).unwrap() == b"moved\n", "{}", String::from_utf8_lossy(&o.stdout));
    // No longer shared: the mount goes with the share.
    affa.write_conf(
        "web.conf",
        &affa.ssh_job("web", &sshd, &format!("Include={}\nSambaValidUser=root\n", data.display())),
    );
    let out = ok(&affa.affa(&["--samba-shares"]));
    assert!(out.contains("removed: web"), "{out}");
    assert_eq!(mount_opts(&mp), None, "the mount of the share is still there");
    assert!(!mp.exists());
    drop(sshd);
}
