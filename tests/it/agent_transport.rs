//! Chunked files read by affa-agent on the source (chunkTransport, issue 13), end to end over
//! the real sshd and the simulator: the default transport, deployment and replacement of a stale
//! agent, the ESXi frozen disks, the fallback where the agent cannot execute (a noexec mount),
//! an agent killed mid-backup; chunkSize changed between runs, two jobs sharing the pool, files
//! growing and shrinking between runs, affa killed mid-backup, the ssh link cut, a file growing
//! or vanishing mid-read, a file vanishing after the listing (a warning, as with rsync), a read
//! error (EIO from a damaged btrfs block), and no chunked file at all (no agent started).

use crate::common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::esx::{fill, sha256_file, Esx, MB};
use common::*;

fn report(affa: &Affa, job: &str, archive: &str) -> String {
    fs::read_to_string(affa.job_dir(job).join(archive).join(".AFFA3-REPORT")).unwrap()
}

fn num(report: &str, key: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the report:\n{report}"))
        .parse()
        .unwrap()
}

fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// Pseudo-random bytes (incompressible) over `len` at `at`.
fn scribble(path: &Path, at: u64, len: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    f.write_all(&data).unwrap();
}

/// A Linux source with `images/disk.img` (`size`, data in `regions`) and a plain file, job `web`
/// over the shared sshd with chunkFiles=*.img, the agent at `agent/affa-agent` in the test's
/// temp dir (unless `extra` sets remoteAgentPath), the key installed.
struct Linux {
    sshd: Sshd,
    affa: Affa,
    src: tempfile::TempDir,
    agent_path: PathBuf,
}

impl Linux {
    fn start(size: u64, regions: &[(u64, u64)], extra: &str) -> Linux {
        let mut sshd = Sshd::shared();
        let affa = Affa::new();
        let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
        fill(&src.path().join("images/disk.img"), size, regions, 5);
        fs::write(src.path().join("notes.txt"), "hello\n").unwrap();
        let agent_path = affa.tmp.path().join("remote/.affa/affa-agent");
        let size_key = if extra.contains("chunkSize=") { "" } else { "chunkSize=1M\n" };
        let path_key = if extra.contains("remoteAgentPath=") {
            String::new()
        } else {
            format!("remoteAgentPath={}\n", agent_path.display())
        };
        let job = affa.ssh_job(
            "web",
            &sshd,
            &format!(
                "Include={}\nchunkFiles=*.img\n{size_key}scheduledKeep=3\n{path_key}{extra}",
                src.path().display()
            ),
        );
        affa.write_conf("web.conf", &job);
        let out = affa.send_key(&mut sshd, "web");
        let text = ok(&out);
        assert!(text.contains("affa-agent"), "--send-key says nothing of the agent: {text}");
        Linux { sshd, affa, src, agent_path }
    }

    fn img(&self) -> PathBuf {
        self.src.path().join("images/disk.img")
    }

    fn in_archive(&self, archive: &str) -> PathBuf {
        self.affa.job_dir("web").join(archive).join(self.src.path().strip_prefix("/").unwrap())
    }

    /// `--unchunk` of an archive: the rebuilt image.
    fn unchunked(&self, archive: &str) -> PathBuf {
        let out = self.affa.tmp.path().join(format!("unchunked-{archive}"));
        let _ = fs::remove_dir_all(&out);
        ok(&self.affa.affa(&["--unchunk", "web", archive, "--to", out.to_str().unwrap()]));
        out.join(self.src.path().strip_prefix("/").unwrap()).join("images/disk.img")
    }
}

#[test]
fn a_chunked_linux_job_goes_through_the_agent_and_a_second_run_receives_one_chunk() {
    let s = Linux::start(24 * MB, &[(0, 6 * MB), (12 * MB, 4 * MB), (23 * MB, MB)], "");
    // Staging copies an earlier rsync-path run left: given back after the agent run.
    let staging = s.affa.job_dir("web").join(".staging");
    fs::create_dir_all(staging.join("old")).unwrap();
    fs::write(staging.join("old/disk.img"), vec![1u8; 4096]).unwrap();
    // --send-key installed the agent, mode 0700, the local binary's bytes.
    assert_eq!(hash(&s.agent_path), hash(&static_agent()));
    assert_eq!(fs::metadata(&s.agent_path).unwrap().permissions().mode() & 0o777, 0o700);
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    assert!(num(&r, "ChunkSourceBytesRead") >= 11 * MB, "{r}");
    assert!(num(&r, "ChunkBytesReceived") > 0, "{r}");
    assert!(!staging.exists(), "the staging dir is still there");
    assert!(s.in_archive("scheduled.0").join("images/disk.img.affa-manifest").exists());
    assert_eq!(fs::read_to_string(s.in_archive("scheduled.0").join("notes.txt")).unwrap(), "hello\n");
    let v1 = hash(&s.img());
    assert_eq!(hash(&s.unchunked("scheduled.0")), v1);

    // One chunk changed (1 MiB of incompressible bytes): about one chunk crosses the wire.
    scribble(&s.img(), 13 * MB, MB, 9);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    assert_eq!(num(&r, "ChunkNew"), 1, "{r}");
    let received = num(&r, "ChunkBytesReceived");
    assert!((MB..MB + MB / 4).contains(&received), "received {received} bytes for one changed 1 MiB chunk:\n{r}");
    assert!(!staging.exists());
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    assert_eq!(hash(&s.unchunked("scheduled.1")), v1);
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
    drop(s.sshd);
}

#[test]
fn a_stale_agent_is_replaced_and_install_agent_reports_it() {
    let s = Linux::start(6 * MB, &[(0, 3 * MB)], "");
    // Another build at the agent's path: it runs, but its hash is not the local binary's.
    let mut other = fs::read(static_agent()).unwrap();
    other.extend_from_slice(b"an older affa-agent");
    fs::write(&s.agent_path, &other).unwrap();
    fs::set_permissions(&s.agent_path, fs::Permissions::from_mode(0o755)).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    assert!(report(&s.affa, "web", "scheduled.0").contains("ChunkTransport=agent\n"));
    assert_eq!(hash(&s.agent_path), hash(&static_agent()), "the stale agent was not replaced");
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    // --install-agent: replaced when stale, then up to date.
    fs::write(&s.agent_path, b"#!/bin/sh\nexit 3\n").unwrap();
    let out = ok(&s.affa.affa(&["--install-agent", "web"]));
    assert!(out.contains(&format!("job web: affa-agent installed at 127.0.0.1:{}", s.agent_path.display())), "{out}");
    let out = ok(&s.affa.affa(&["--install-agent"]));
    assert!(out.contains("job web: affa-agent at 127.0.0.1:") && out.contains("is up to date"), "{out}");
    // No temp file of a deployment is left beside it.
    let left: Vec<_> = fs::read_dir(s.agent_path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("affa-agent")]);
}

#[test]
fn an_esxi_chunked_job_reads_the_frozen_disks_through_the_agent() {
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], "chunkFiles=*-flat.vmdk\nchunkSize=1M\nscheduledKeep=2\n", "");
    // --send-key pinned the certificate, then installed the agent at its default place: the
    // datastore of the VM's .vmx.
    assert_eq!(hash(&e.ds1.join(".affa/affa-agent")), hash(&static_agent()));
    e.sim.post("/writer?vm=vm1&on=1&interval_ms=2&disk=0&block=4096");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    let s0 = e.affa.job_dir("esx").join("scheduled.0");
    let r = fs::read_to_string(s0.join(".AFFA3-REPORT")).unwrap();
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    assert!(num(&r, "ChunkBytesReceived") > 0, "{r}");
    assert!(s0.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk.affa-manifest").exists());
    assert!(!e.affa.job_dir("esx").join(".staging").exists(), "a staging copy was made");
    assert!(e.sim.snapshots("vm1").is_empty(), "the snapshot is still there");
    let out = e.work.path().join("unchunked");
    ok(&e.affa.affa(&["--unchunk", "esx", "scheduled.0", "--to", out.to_str().unwrap()]));
    assert_eq!(sha256_file(&out.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&out.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk")), frozen[1]);
    ok(&e.affa.affa(&["--verify", "esx"]));
}

/// A tmpfs mounted noexec for one test, unmounted when dropped.
struct NoExec(PathBuf);

impl NoExec {
    fn mount(at: &Path) -> NoExec {
        fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "noexec,size=64m", "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "cannot mount a tmpfs at {}", at.display());
        NoExec(at.to_path_buf())
    }
}

impl Drop for NoExec {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn where_the_agent_cannot_execute_auto_falls_back_and_agent_fails() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a noexec tmpfs needs root");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("affa-noexec").tempdir().unwrap();
    let mnt = NoExec::mount(&tmp.path().join("mnt"));
    let path = mnt.0.join("affa-agent");
    let s = Linux::start(6 * MB, &[(0, 3 * MB)], &format!("remoteAgentPath={}\n", path.display()));
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let log = fs::read_to_string(s.affa.state.join("log/web.log")).unwrap();
    let warning = log.lines().find(|l| l.contains("go through rsync")).unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(warning.contains("noexec") && warning.contains("remoteAgentPath"), "{warning}");
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=rsync\n") && r.contains("ChunkTransportNote="), "{r}");
    assert!(s.affa.job_dir("web").join(".staging").exists(), "the rsync path keeps its staging copy");
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));

    // chunkTransport=agent: the run fails with one line, the archive stays as it was.
    let conf = s.affa.conf.join("web.conf");
    let text = fs::read_to_string(&conf).unwrap();
    s.affa.write_conf("web.conf", &format!("{text}chunkTransport=agent\n"));
    let before = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    scribble(&s.img(), 0, MB, 4);
    let e = fail(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    let line = e.lines().find(|l| l.contains("chunkTransport=agent")).unwrap_or_else(|| panic!("{e}"));
    assert!(line.contains("noexec"), "{line}");
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), before);
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    drop(s);
    drop(mnt);
}

#[test]
fn an_agent_killed_mid_backup_fails_the_run_and_the_next_run_succeeds() {
    // zstd:19 on incompressible data keeps the agent busy long enough to be killed.
    let s = Linux::start(24 * MB, &[(0, 2 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\n");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let first = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    scribble(&s.img(), 0, 24 * MB, 3);
    let run = s
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-06-01T21:00:00")
        .args(["--run", "web"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let agent = s.agent_path.display().to_string();
    let pid = wait_for(Duration::from_secs(60), "the agent to run", || {
        fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with(&agent) && cmd.contains("--serve")).then_some(pid)
        })
    });
    // Let it read and send a few chunks first.
    std::thread::sleep(Duration::from_millis(600));
    signal(pid, rustix::process::Signal::KILL);
    let e = fail(&run.wait_with_output().unwrap());
    let line = e.lines().find(|l| l.contains("agent backup")).unwrap_or_else(|| panic!("{e}"));
    assert!(line.contains("127.0.0.1") && line.contains("disk.img"), "{line}");
    // No manifest points at a missing chunk; the earlier archive is as it was.
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), first);
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
}

#[test]
fn a_stalled_agent_is_stopped_after_rsync_timeout() {
    let s = Linux::start(24 * MB, &[(0, 24 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\nrsyncTimeout=3\n");
    let run = s
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-06-01T21:00:00")
        .args(["--run", "web"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let agent = s.agent_path.display().to_string();
    let pid = wait_for(Duration::from_secs(60), "the agent to run", || {
        fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with(&agent) && cmd.contains("--serve")).then_some(pid)
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    // The host's agent hangs (alive, silent): the run must not wait for it forever.
    signal(pid, rustix::process::Signal::STOP);
    let t = std::time::Instant::now();
    let out = run.wait_with_output().unwrap();
    signal(pid, rustix::process::Signal::KILL);
    let e = fail(&out);
    assert!(t.elapsed() < Duration::from_secs(30), "the run waited {:?} for a stalled agent", t.elapsed());
    let line = e.lines().find(|l| l.contains("agent backup")).unwrap_or_else(|| panic!("{e}"));
    assert!(line.contains("sent nothing for 3 s") && line.contains("disk.img"), "{line}");
    assert!(archive_names(&s.affa.job_dir("web")).is_empty(), "a failed first run made an archive");
}

/// The bytes of chunks the restore sent through the agent, from its summary line.
fn chunk_bytes_sent(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.split("restored through affa-agent: ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'restored through affa-agent' line:\n{text}"))
}

/// `--full-restore` of a chunked Linux job writes the image in place through the agent: over a
/// copy that differs in one chunk only about that chunk is sent; a deleted image comes back
/// whole and sparse; a damaged chunk stops the restore before anything is written.
#[test]
fn a_chunked_file_is_restored_through_the_agent_sending_only_what_differs() {
    let s = Linux::start(24 * MB, &[(0, 6 * MB), (12 * MB, 4 * MB), (23 * MB, MB)], "");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let v1 = hash(&s.img());

    // One chunk of 24 differs on the host (older mtime: --preserve-newer keeps nothing).
    scribble(&s.img(), 13 * MB, 64 << 10, 3);
    let old = filetime_secs(&s.img(), 1_500_000_000);
    // What a restore killed earlier left (its pid is above any pid_max): removed by this one.
    let left = s.affa.job_dir("web").join(".restore-staging.4194999/home");
    fs::create_dir_all(&left).unwrap();
    fs::write(left.join("disk.img"), vec![7u8; 1 << 20]).unwrap();
    let text = ok(&s.affa.affa(&["--full-restore", "web", "--yes"]));
    assert!(text.contains("affa-agent"), "{text}");
    assert_eq!(hash(&s.img()), v1, "{text}");
    let sent = chunk_bytes_sent(&text);
    assert!(sent > 0 && sent <= MB + MB / 4, "{sent} bytes of chunks sent for one changed chunk:\n{text}");
    assert!(old != filetime_secs(&s.img(), 0), "the mtime was not restored");
    assert!(!s
        .affa
        .job_dir("web")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".restore-staging")));

    // Deleted on the host: restored whole, holes stay holes.
    fs::remove_file(s.img()).unwrap();
    let text = ok(&s.affa.affa(&["--full-restore", "web", "--yes"]));
    assert_eq!(hash(&s.img()), v1, "{text}");
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(s.img()).unwrap().blocks() * 512 < 16 * MB, "the restored image is not sparse");

    // A damaged chunk in the archive and the pool: nothing is written to the host.
    scribble(&s.img(), 0, 4096, 4);
    let before = hash(&s.img());
    let man = affa::chunk::read_manifest(&s.in_archive("scheduled.0").join("images/disk.img.affa-manifest")).unwrap();
    let affa::chunk::ChunkRef::Stored(id) = man.chunks[12] else { panic!("chunk 12 is not stored") };
    let hex = affa::chunk::id_hex(&id);
    let mut damaged = 0;
    for dir in [s.affa.job_dir("web").join("scheduled.0/.affa-chunks"), s.affa.root.join(".affa-pool")] {
        for f in walk(&dir) {
            if f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&hex)) {
                let mut b = fs::read(&f).unwrap();
                let n = b.len();
                b[n - 1] ^= 0xff;
                let _ = fs::remove_file(&f);
                fs::write(&f, &b).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0, "chunk {hex} not found");
    let e = fail(&s.affa.affa(&["--full-restore", "web", "--yes"]));
    assert!(e.contains("restore stopped before anything was sent"), "{e}");
    assert_eq!(hash(&s.img()), before, "the host's image was changed by a failed restore");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Set the mtime of `p` to `secs` (0: leave it) and return it.
fn filetime_secs(p: &Path, secs: i64) -> i64 {
    use std::os::unix::fs::MetadataExt;
    if secs != 0 {
        let f = fs::File::options().write(true).open(p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64)).unwrap();
    }
    fs::metadata(p).unwrap().mtime()
}

/// An ESXi VM restored beside the original through the agent on the target datastore: the
/// disks identical to the frozen ones, the descriptors (small chunked files) rewritten for the
/// new place, the VM registered.
#[test]
fn an_esxi_vm_is_restored_through_the_agent() {
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], "chunkFiles=*.vmdk\nchunkSize=1M\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    let text = ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-copy", "--yes"]));
    assert!(text.contains("chunked disks through affa-agent"), "{text}");
    assert_eq!(sha256_file(&e.ds1.join("vm1-copy/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&e.ds2.join("vm1-copy/vm1_1-flat.vmdk")), frozen[1]);
    let vmx = fs::read_to_string(e.ds1.join("vm1-copy/vm1.vmx")).unwrap();
    assert!(vmx.contains(&format!("{}/vm1-copy/vm1_1.vmdk", e.ds2.display())), "{vmx}");
    assert!(e.sim.snapshots("vm1-copy").is_empty());
}

/// A VM restored over its own disk that the guest wrote since the backup (newer than the
/// archive, as every running VM's disk is): the disk is rolled back too (a VM is restored whole;
/// preserve-newer is for host restores), identical to the frozen one.
#[test]
fn an_esxi_vm_restored_over_a_newer_disk_through_the_agent_is_rolled_back() {
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], "chunkFiles=*.vmdk\nchunkSize=1M\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--register", "vm1-copy", "--yes"]));
    let disk = e.ds1.join("vm1-copy/vm1-flat.vmdk");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0xa5u8; 64 << 10], 3 * MB).unwrap();
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600)).unwrap();
    }
    assert_ne!(sha256_file(&disk), frozen[0]);
    let text = ok(&e.affa.affa(&["--full-restore", "esx", "--to-dir", "vm1-copy", "--yes"]));
    assert!(text.contains("chunked disks through affa-agent"), "{text}");
    assert_eq!(sha256_file(&disk), frozen[0], "{text}");
}

// ---------------------------------------------------------------------------------------------
// Issue 13's remaining cases through the affa binary: chunkSize changed between runs, two jobs
// sharing the pool, files growing and shrinking between runs, affa killed mid-backup, the ssh
// link cut, a file vanishing after the listing, a read error, no chunked file at all.

/// The pids of the agents running from `path` (`PATH --serve`), from /proc.
fn agent_pids(path: &Path) -> Vec<u32> {
    let agent = path.display().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with(&agent) && cmd.contains("--serve") && alive(pid)).then_some(pid)
        })
        .collect()
}

/// Chunk files in RootDir's pool (its temp dir left out).
fn pool_entries(affa: &Affa) -> usize {
    walk(&affa.root.join(".affa-pool")).iter().filter(|p| !p.components().any(|c| c.as_os_str() == ".tmp")).count()
}

/// `affa --run JOB` at `now`, started in the background.
fn spawn_run(affa: &Affa, job: &str, now: &str) -> std::process::Child {
    affa.cmd()
        .env("AFFA_FAKE_NOW", now)
        .args(["--run", job])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The one-line error a failed run ends with (`affa: error: ...`).
fn last_error_line(e: &str) -> String {
    let last = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    assert!(last.starts_with("affa: error: "), "no one-line error at the end of stderr:\n{e}");
    last
}

/// Every manifest anywhere in the job's dir (archives, `scheduled.running`, the resume dir)
/// names only chunks that are there and intact.
fn no_manifest_points_at_a_missing_chunk(job_dir: &Path) {
    for d in fs::read_dir(job_dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let v = affa::chunk::verify_archive(&d, None).unwrap();
        assert!(v.is_ok(), "{}: {:?} {:?}", d.display(), v.problems, v.bad_manifests);
    }
}

/// `--unchunk JOB ARCHIVE` into a fresh dir: that dir.
fn unchunk_all(affa: &Affa, job: &str, archive: &str) -> PathBuf {
    let out = affa.tmp.path().join(format!("unchunked-{job}-{archive}"));
    let _ = fs::remove_dir_all(&out);
    ok(&affa.affa(&["--unchunk", job, archive, "--to", out.to_str().unwrap()]));
    out
}

/// The manifest of `images/disk.img` in an archive of `web`.
fn disk_manifest(s: &Linux, archive: &str) -> affa::chunk::Manifest {
    affa::chunk::read_manifest(&s.in_archive(archive).join("images/disk.img.affa-manifest")).unwrap()
}

fn stored_ids(m: &affa::chunk::Manifest) -> std::collections::BTreeSet<[u8; 32]> {
    m.chunks.iter().filter_map(|c| if let affa::chunk::ChunkRef::Stored(id) = c { Some(*id) } else { None }).collect()
}

/// Replace `key=...` in the job's config (appended when missing).
fn set_key(s: &Linux, key: &str, value: &str) {
    let conf = s.affa.conf.join("web.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let mut lines: Vec<String> =
        text.lines().filter(|l| !l.starts_with(&format!("{key}="))).map(String::from).collect();
    lines.push(format!("{key}={value}"));
    s.affa.write_conf("web.conf", &(lines.join("\n") + "\n"));
}

#[test]
fn a_chunk_size_changed_between_agent_runs_carries_nothing_from_the_old_manifest() {
    let s = Linux::start(8 * MB, &[(0, 3 * MB), (5 * MB, 2 * MB)], "");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let v1 = hash(&s.img());
    let m1 = disk_manifest(&s, "scheduled.0");
    assert_eq!(m1.chunk_size, 1 << 20);

    // 1M -> 256K, and one 64 KiB change.
    scribble(&s.img(), 5 * MB + 4096, 64 << 10, 7);
    set_key(&s, "chunkSize", "256K");
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    let m2 = disk_manifest(&s, "scheduled.0");
    assert_eq!(m2.chunk_size, 256 << 10);
    // No id of the 1M manifest was carried into the 256K one (as "same" at its index), and
    // every distinct 256K chunk of the source was new to the pool.
    let (ids1, ids2) = (stored_ids(&m1), stored_ids(&m2));
    assert_eq!(ids1.intersection(&ids2).count(), 0, "a 1 MiB chunk is named in the 256 KiB manifest");
    let data = fs::read(s.img()).unwrap();
    let distinct: std::collections::BTreeSet<[u8; 32]> =
        data.chunks(256 << 10).filter(|c| c.iter().any(|&b| b != 0)).map(|c| *blake3::hash(c).as_bytes()).collect();
    assert_eq!(ids2, distinct);
    assert_eq!(num(&r, "ChunkNew"), distinct.len() as u64, "{r}");
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    assert_eq!(hash(&s.unchunked("scheduled.1")), v1);
    ok(&s.affa.affa(&["--verify", "web", "--all"]));

    // Back to 1M: the newest manifest (256K) is of no use, but the pool still holds the first
    // run's 1 MiB chunks: only the changed one crosses the wire.
    set_key(&s, "chunkSize", "1M");
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "web"]));
    let r = report(&s.affa, "web", "scheduled.0");
    assert_eq!(num(&r, "ChunkNew"), 1, "{r}");
    assert!(num(&r, "ChunkBytesReceived") < MB + MB / 4, "{r}");
    assert_eq!(disk_manifest(&s, "scheduled.0").chunk_size, 1 << 20);
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    assert_eq!(hash(&s.unchunked("scheduled.2")), v1);
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
}

#[test]
fn two_jobs_with_mostly_identical_disks_share_the_pool_and_the_second_receives_only_what_it_lacks() {
    let mut s = Linux::start(16 * MB, &[(0, 8 * MB), (12 * MB, 4 * MB)], "");
    // A second host's copy of the same image (same bytes: same seed), one 1 MiB chunk rewritten.
    let src2 = tempfile::Builder::new().prefix("affa-src2").tempdir().unwrap();
    let img2 = src2.path().join("images/disk.img");
    fill(&img2, 16 * MB, &[(0, 8 * MB), (12 * MB, 4 * MB)], 5);
    assert_eq!(hash(&img2), hash(&s.img()));
    scribble(&img2, 3 * MB, MB, 11);
    let job = s.affa.ssh_job(
        "web2",
        &s.sshd,
        &format!(
            "Include={}\nchunkFiles=*.img\nchunkSize=1M\nremoteAgentPath={}\nagentDedupScope=pool\n",
            src2.path().display(),
            s.agent_path.display()
        ),
    );
    s.affa.write_conf("web2.conf", &job);
    ok(&s.affa.send_key(&mut s.sshd, "web2"));

    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let r1 = report(&s.affa, "web", "scheduled.0");
    // 12 data chunks, of which chunk 12 repeats chunk 0 (fill's text): stored, and sent, once.
    assert_eq!(num(&r1, "ChunkNew"), 11, "{r1}");
    ok(&s.affa.affa_at("2026-06-01T20:30:00", &["--run", "web2"]));
    let r2 = report(&s.affa, "web2", "scheduled.0");
    assert!(r2.contains("ChunkTransport=agent\n"), "{r2}");
    assert_eq!(num(&r2, "ChunkNew"), 1, "{r2}");
    let received = num(&r2, "ChunkBytesReceived");
    assert!(
        (MB..MB + MB / 4).contains(&received),
        "web2 received {received} bytes for one chunk the pool lacks:\n{r2}"
    );
    assert!(num(&r2, "ChunkSourceBytesRead") >= 12 * MB, "{r2}");

    let rel = |src: &Path| src.strip_prefix("/").unwrap().join("images/disk.img");
    assert_eq!(hash(&unchunk_all(&s.affa, "web", "scheduled.0").join(rel(s.src.path()))), hash(&s.img()));
    assert_eq!(hash(&unchunk_all(&s.affa, "web2", "scheduled.0").join(rel(src2.path()))), hash(&img2));
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
    ok(&s.affa.affa(&["--verify", "web2", "--all"]));

    // A third job, default agentDedupScope=job, same bytes as web2: its host is told nothing of
    // the other jobs' chunks (every data chunk is asked for and sent), but the pool does not
    // grow: each received chunk is linked to the pool's entry, not stored again.
    let src3 = tempfile::Builder::new().prefix("affa-src3").tempdir().unwrap();
    let img3 = src3.path().join("images/disk.img");
    fill(&img3, 16 * MB, &[(0, 8 * MB), (12 * MB, 4 * MB)], 5);
    scribble(&img3, 3 * MB, MB, 11);
    assert_eq!(hash(&img3), hash(&img2));
    let job = s.affa.ssh_job(
        "web3",
        &s.sshd,
        &format!(
            "Include={}\nchunkFiles=*.img\nchunkSize=1M\nremoteAgentPath={}\n",
            src3.path().display(),
            s.agent_path.display()
        ),
    );
    s.affa.write_conf("web3.conf", &job);
    ok(&s.affa.send_key(&mut s.sshd, "web3"));
    let pool_before = pool_entries(&s.affa);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web3"]));
    let r3 = report(&s.affa, "web3", "scheduled.0");
    assert_eq!(num(&r3, "ChunkNew"), 0, "{r3}");
    let received = num(&r3, "ChunkBytesReceived");
    assert!(
        received >= 5 * MB,
        "web3 received only {received} bytes: the pool's other chunks were answered as had:\n{r3}"
    );
    assert_eq!(pool_entries(&s.affa), pool_before, "chunks the pool held were stored again");
    assert_eq!(hash(&unchunk_all(&s.affa, "web3", "scheduled.0").join(rel(src3.path()))), hash(&img3));
    // Its second run skips its own chunks: nothing changed, nothing sent.
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "web3"]));
    let r3b = report(&s.affa, "web3", "scheduled.0");
    assert!(num(&r3b, "ChunkBytesReceived") < MB / 4, "{r3b}");
    ok(&s.affa.affa(&["--verify", "web3", "--all"]));
}

#[test]
fn files_growing_and_shrinking_between_runs_restore_with_their_sizes_and_holes() {
    use std::os::unix::fs::MetadataExt;
    // disk.img shrinks; grow.img grows, with a hole between its old end and its new data.
    let s = Linux::start(6 * MB, &[(0, 6 * MB)], "");
    let grow = s.src.path().join("images/grow.img");
    fill(&grow, 3 * MB, &[(0, 2 * MB)], 8);
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let (d1, g1) = (hash(&s.img()), hash(&grow));

    fs::OpenOptions::new().write(true).open(s.img()).unwrap().set_len(4 * MB + MB / 2).unwrap();
    fs::OpenOptions::new().write(true).open(&grow).unwrap().set_len(10 * MB).unwrap();
    scribble(&grow, 9 * MB, MB / 2, 12);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    // New: disk.img's cut last chunk, grow.img's chunk 9. The rest is known or a hole.
    assert_eq!(num(&r, "ChunkNew"), 2, "{r}");
    assert!(num(&r, "ChunkBytesReceived") < 2 * MB, "{r}");

    let out = unchunk_all(&s.affa, "web", "scheduled.0").join(s.src.path().strip_prefix("/").unwrap());
    let (disk, grown) = (out.join("images/disk.img"), out.join("images/grow.img"));
    assert_eq!(hash(&disk), hash(&s.img()));
    assert_eq!(hash(&grown), hash(&grow));
    assert_eq!(fs::metadata(&disk).unwrap().len(), 4 * MB + MB / 2);
    assert_eq!(fs::metadata(&grown).unwrap().len(), 10 * MB);
    assert!(fs::metadata(&grown).unwrap().blocks() * 512 <= 3 * MB, "the hole of grow.img was filled");
    let old = unchunk_all(&s.affa, "web", "scheduled.1").join(s.src.path().strip_prefix("/").unwrap());
    assert_eq!((hash(&old.join("images/disk.img")), hash(&old.join("images/grow.img"))), (d1, g1));
    assert_eq!(fs::metadata(old.join("images/grow.img")).unwrap().len(), 3 * MB);
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
}

/// The processes holding `marker` open (from /proc/PID/fd).
fn holders(marker: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::metadata(marker) else { return Vec::new() };
    let mut out = Vec::new();
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| fs::metadata(fd.path()).is_ok_and(|x| x.dev() == m.dev() && x.ino() == m.ino())) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn affa_killed_mid_agent_backup_leaves_no_agent_and_no_manifest_naming_a_missing_chunk() {
    // zstd:19 on incompressible data keeps the backup going long enough to be killed.
    let s = Linux::start(24 * MB, &[(0, 2 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\n");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let first = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    let marker = s.affa.state.join("lock/.children.web");
    for (i, after_chunks) in [(0u64, false), (1, true)] {
        scribble(&s.img(), 0, 24 * MB, 30 + i);
        let before = pool_entries(&s.affa);
        let mut run = spawn_run(&s.affa, "web", &format!("2026-06-0{}T20:00:00", 2 + i));
        wait_until(Duration::from_secs(60), "the agent to run", || !agent_pids(&s.agent_path).is_empty());
        if after_chunks {
            wait_until(Duration::from_secs(60), "four new chunks in the pool", || pool_entries(&s.affa) >= before + 4);
        }
        signal(run.id(), rustix::process::Signal::KILL);
        run.wait().unwrap();
        let when = if after_chunks { "after some chunks" } else { "early" };
        // affa's ssh died with it; the agent with its session.
        wait_until(Duration::from_secs(30), &format!("[{when}] affa's children to end"), || {
            holders(&marker).is_empty()
        });
        wait_until(Duration::from_secs(30), &format!("[{when}] the agent to end"), || {
            agent_pids(&s.agent_path).is_empty()
        });
        no_manifest_points_at_a_missing_chunk(&s.affa.job_dir("web"));
        ok(&s.affa.affa(&["--verify", "web", "--all"]));
        let names = archive_names(&s.affa.job_dir("web"));
        assert!(
            names.iter().any(|n| tree_hashes(&s.affa.job_dir("web").join(n)) == first),
            "[{when}] the first archive changed"
        );
        // The next run succeeds, leaves no agent running, and its archive is the source.
        ok(&s.affa.affa_at(&format!("2026-06-0{}T21:00:00", 2 + i), &["--run", "web"]));
        assert!(agent_pids(&s.agent_path).is_empty(), "[{when}] an agent is left running after the next run");
        assert!(holders(&marker).is_empty());
        assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()), "[{when}]");
        ok(&s.affa.affa(&["--verify", "web", "--all"]));
        no_manifest_points_at_a_missing_chunk(&s.affa.job_dir("web"));
    }
}

/// The parent pid of `pid` (from /proc/PID/stat).
fn ppid(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_ssh_link_cut_mid_agent_backup_fails_with_one_line_and_the_next_run_succeeds() {
    let s = Linux::start(24 * MB, &[(0, 2 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\n");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let first = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    scribble(&s.img(), 0, 24 * MB, 3);
    let before = pool_entries(&s.affa);
    let run = spawn_run(&s.affa, "web", "2026-06-01T21:00:00");
    let pid = wait_for(Duration::from_secs(60), "the agent to run", || agent_pids(&s.agent_path).first().copied());
    wait_until(Duration::from_secs(60), "two new chunks in the pool", || pool_entries(&s.affa) >= before + 2);
    // The sshd process serving the session (the agent's parent) dies: the link is cut.
    let server = ppid(pid);
    let comm = fs::read_to_string(format!("/proc/{server}/comm")).unwrap();
    assert!(comm.starts_with("sshd"), "the agent's parent is {comm}");
    signal(server, rustix::process::Signal::KILL);
    let e = fail(&run.wait_with_output().unwrap());
    let line = last_error_line(&e);
    assert!(line.contains("the agent backup of 127.0.0.1:") && line.contains("disk.img"), "{line}");
    assert!(line.contains("earlier archives are untouched"), "{line}");
    wait_until(Duration::from_secs(30), "the agent to end", || agent_pids(&s.agent_path).is_empty());
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), first);
    no_manifest_points_at_a_missing_chunk(&s.affa.job_dir("web"));
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
    assert!(agent_pids(&s.agent_path).is_empty());
}

/// Start a run, wait until the agent has stored `n` new chunks, then let `change` act on the
/// source: the failed run's one-line error.
fn change_mid_read(s: &Linux, now: &str, n: usize, change: impl FnOnce()) -> String {
    let before = pool_entries(&s.affa);
    let mut run = spawn_run(&s.affa, "web", now);
    wait_until(Duration::from_secs(120), "new chunks in the pool", || {
        if pool_entries(&s.affa) >= before + n {
            return true;
        }
        if let Ok(Some(st)) = run.try_wait() {
            let log = fs::read_to_string(s.affa.state.join("log/web.log")).unwrap_or_default();
            panic!(
                "the run ended ({st}) before {n} new chunks reached the pool ({before} before, {} now):\n{log}",
                pool_entries(&s.affa)
            );
        }
        false
    });
    change();
    last_error_line(&fail(&run.wait_with_output().unwrap()))
}

#[test]
fn a_source_file_growing_or_vanishing_mid_read_fails_the_run_with_one_line() {
    let s = Linux::start(12 * MB, &[(0, 2 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\n");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let first = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    scribble(&s.img(), 0, 12 * MB, 3);
    let line = change_mid_read(&s, "2026-06-01T21:00:00", 2, || {
        use std::io::Write;
        fs::OpenOptions::new().append(true).open(s.img()).unwrap().write_all(b"more").unwrap();
    });
    assert!(line.contains("disk.img") && line.contains("grew from 12582912 to 12582916 bytes"), "{line}");
    scribble(&s.img(), 0, 12 * MB, 4);
    let line = change_mid_read(&s, "2026-06-01T21:10:00", 2, || fs::remove_file(s.img()).unwrap());
    assert!(line.contains("disk.img") && line.contains("vanished while it was read"), "{line}");
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), first);
    no_manifest_points_at_a_missing_chunk(&s.affa.job_dir("web"));
    fill(&s.img(), 2 * MB, &[(0, MB)], 4);
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
}

#[test]
fn a_chunked_file_vanishing_after_the_listing_is_a_warning_as_with_rsync() {
    // disk.img is read first (slow: zstd:19), zz.img is removed meanwhile.
    let s = Linux::start(12 * MB, &[(0, 12 * MB)], "chunkCompression=zstd:19\nchunkSize=256K\n");
    let zz = s.src.path().join("images/zz.img");
    fill(&zz, 2 * MB, &[(0, MB)], 9);
    let run = spawn_run(&s.affa, "web", "2026-06-01T20:00:00");
    wait_until(Duration::from_secs(60), "the agent to run", || !agent_pids(&s.agent_path).is_empty());
    fs::remove_file(&zz).unwrap();
    ok(&run.wait_with_output().unwrap());
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(r.contains("ChunkTransport=agent\n"), "{r}");
    assert_eq!(num(&r, "ChunkVanished"), 1, "{r}");
    let files = r.lines().find_map(|l| l.strip_prefix("ChunkVanishedFiles=")).unwrap_or_else(|| panic!("{r}"));
    assert!(files.ends_with("images/zz.img"), "{r}");
    assert_eq!(num(&r, "ChunkFiles"), 1, "{r}");
    let log = fs::read_to_string(s.affa.state.join("log/web.log")).unwrap();
    let w = log.lines().find(|l| l.contains("vanished before affa-agent read it")).unwrap_or_else(|| panic!("{log}"));
    assert!(w.contains("zz.img"), "{w}");
    let arch = s.in_archive("scheduled.0").join("images");
    assert!(!arch.join("zz.img").exists() && !arch.join("zz.img.affa-manifest").exists());
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    ok(&s.affa.affa(&["--verify", "web", "--all"]));
}

/// A btrfs file system in a loop-mounted image at `at`, unmounted when dropped (as `NoExec`).
struct Btrfs(NoExec);

impl Btrfs {
    fn mount(image: &Path, at: &Path) -> Btrfs {
        let run = |c: &mut std::process::Command| {
            let o = c.output().unwrap();
            assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        run(std::process::Command::new("mount").args(["-o", "loop"]).arg(image).arg(at));
        Btrfs(NoExec(at.to_path_buf()))
    }

    fn unmount(self) {
        let st = std::process::Command::new("umount").arg(&self.0 .0).status().unwrap();
        assert!(st.success());
        std::mem::forget(self);
    }
}

/// A read error at the source (EIO: a btrfs data block whose checksum fails) fails the run with
/// one line naming the file and the offset; once the file is whole again the next run succeeds.
#[test]
fn a_read_error_at_the_source_fails_the_run_naming_file_and_offset() {
    if !is_root() {
        eprintln!("SKIPPED: a loop-mounted btrfs needs root");
        return;
    }
    let s = Linux::start(MB, &[(0, MB)], "chunkSize=256K\n");
    let image = s.affa.tmp.path().join("btrfs.img");
    fs::File::create(&image).unwrap().set_len(128 * MB).unwrap();
    let o = std::process::Command::new("mkfs.btrfs").arg("-q").arg(&image).output().expect("mkfs.btrfs (btrfs-progs)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The source's tree becomes the btrfs: images/disk.img, 4 MiB, a marked block at 2M + 8K.
    let marker: Vec<u8> = b"AFFA-EIO-MARKER-".repeat(256);
    let fs_ = Btrfs::mount(&image, s.src.path());
    fs::create_dir_all(s.src.path().join("images")).unwrap();
    fill(&s.img(), 4 * MB, &[(0, 4 * MB)], 6);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(s.img()).unwrap();
        f.write_all_at(&marker, 2 * MB + 8192).unwrap();
        f.sync_all().unwrap();
    }
    fs_.unmount();
    // Damage that block on the device: its checksum fails, a read of it is EIO.
    let mut dev = fs::read(&image).unwrap();
    let at = dev.windows(marker.len()).position(|w| w == &marker[..]).expect("the marked block in the image");
    dev[at..at + 16].copy_from_slice(b"XXXXXXXXXXXXXXXX");
    fs::write(&image, &dev).unwrap();
    drop(dev);
    let fs_ = Btrfs::mount(&image, s.src.path());

    let e = fail(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let line = last_error_line(&e);
    assert!(line.contains("the agent backup of 127.0.0.1:") && line.contains("images/disk.img"), "{line}");
    assert!(line.contains("Input/output error"), "{line}");
    let offset: u64 = line
        .split("read error (offset ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line}"));
    assert!((2 * MB..=2 * MB + 8192).contains(&offset), "offset {offset}: {line}");
    assert!(archive_names(&s.affa.job_dir("web")).is_empty());
    no_manifest_points_at_a_missing_chunk(&s.affa.job_dir("web"));

    // The damaged file replaced by a whole one: the next run succeeds.
    fs::remove_file(s.img()).unwrap();
    fill(&s.img(), 4 * MB, &[(0, 4 * MB)], 6);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    drop(fs_);
}

#[test]
fn no_file_matching_chunk_files_starts_no_agent() {
    let s = Linux::start(MB, &[(0, MB)], "");
    fs::remove_file(s.img()).unwrap();
    // A stale agent at the path: any start of the agent would replace it first.
    let stale = b"#!/bin/sh\nexit 3\n";
    fs::write(&s.agent_path, stale).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    assert_eq!(fs::read(&s.agent_path).unwrap(), stale, "the agent was started (and replaced)");
    let r = report(&s.affa, "web", "scheduled.0");
    assert!(!r.contains("ChunkTransport=") && !r.contains("ChunkBytesReceived="), "{r}");
    assert_eq!(fs::read_to_string(s.in_archive("scheduled.0").join("notes.txt")).unwrap(), "hello\n");
}

/// Backups no longer scrub; the daily `--scrub` does: it finds a bit flip a backup's cheap
/// check cannot see (header and length intact), takes the entry out of the pool and names the
/// archive that links it; the next backup (which trusts the same-index chunk of its previous
/// manifest) stores that chunk again, and the newest archive verifies. Days: the slices of one
/// scrubDays cycle read every entry once.
#[test]
fn the_scrub_finds_a_bit_flip_the_backup_trusts_and_the_next_run_repairs_it() {
    let s = Linux::start(12 * MB, &[(0, 6 * MB), (8 * MB, 2 * MB)], "");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "web"]));
    let man = affa::chunk::read_manifest(&s.in_archive("scheduled.0").join("images/disk.img.affa-manifest")).unwrap();
    let affa::chunk::ChunkRef::Stored(id) = man.chunks[3] else { panic!("chunk 3 is not stored") };
    let hex = affa::chunk::id_hex(&id);
    let entry = s.affa.root.join(".affa-pool").join(&hex[..2]).join(&hex);
    let entries = pool_entries(&s.affa);
    // One cycle (scrubDays=16, the default) of daily scrubs: every entry checked once, no damage.
    let mut checked = 0;
    for d in 1..=16 {
        let out = ok(&s.affa.affa_at(&format!("2026-07-{d:02}T12:00:00"), &["--scrub"]));
        let n: usize = out.split(": ").nth(1).and_then(|t| t.split(' ').next()).unwrap().parse().unwrap();
        assert!(out.contains(" 0 damaged"), "{out}");
        checked += n;
    }
    assert_eq!(checked, entries);

    // A bit flip in the middle of the entry (the archive's link is the same inode).
    let mut b = fs::read(&entry).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x01;
    fs::OpenOptions::new()
        .write(true)
        .open(&entry)
        .unwrap()
        .write_all_at(&b[n / 2..n / 2 + 1], (n / 2) as u64)
        .unwrap();
    // A backup of unchanged data does not see it (cheap check of the same-index chunk).
    ok(&s.affa.affa_at("2026-06-02T20:00:00", &["--run", "web"]));
    assert_eq!(num(&report(&s.affa, "web", "scheduled.0"), "ChunkNew"), 0);
    let e = fail(&s.affa.affa(&["--scrub", "--all"]));
    assert!(
        e.contains(&format!("chunk {hex} hashes to another id")) || e.contains(&format!("chunk {hex} does not decode")),
        "{e}"
    );
    // Both archives link it (the damaged inode is theirs).
    assert!(e.contains("web/scheduled.0") && e.matches("web/").count() == 2, "{e}");
    assert!(!entry.exists(), "the damaged entry is still in the pool");
    fail(&s.affa.affa(&["--verify", "web"]));
    // The next backup stores that chunk again; its archive verifies and rebuilds the disk.
    ok(&s.affa.affa_at("2026-06-03T20:00:00", &["--run", "web"]));
    assert_eq!(num(&report(&s.affa, "web", "scheduled.0"), "ChunkNew"), 1);
    ok(&s.affa.affa(&["--verify", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
    assert!(ok(&s.affa.affa(&["--scrub", "--all"])).contains(" 0 damaged"));
    drop(s.sshd);
}

/// `BandwidthLimit` paces the agent's session as it paces rsync, and `affa --kill` (SIGTERM)
/// during the agent's read of a disk stops the read at once: the agent's ssh is stopped, the
/// snapshot removed, the run fails as interrupted and the next run resumes. Until 2026-12-02
/// neither held: the agent's session ignored the limit, and a signal stopped only an rsync
/// child, so the read went on to the end of the disk while the VM stayed on its snapshot (and
/// `--kill` gave up after 60 s on a big disk).
#[test]
fn bandwidth_limit_paces_the_agent_and_kill_stops_its_read_mid_disk() {
    // 6 MiB of incompressible data on disk 0 and 4 MiB on disk 1: 10 chunks to send, 25 s at
    // 400 KiB/s.
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], "chunkFiles=*-flat.vmdk\nchunkSize=1M\nBandwidthLimit=400\n", "");
    let agent = e.ds1.join(".affa/affa-agent");
    let job_dir = e.affa.job_dir("esx");
    let run = spawn_run(&e.affa, "esx", "2026-05-04T21:00:00");
    wait_until(Duration::from_secs(60), "two chunks received", || pool_entries(&e.affa) >= 2);
    assert_eq!(e.sim.snapshots("vm1").len(), 1, "the read runs on the snapshot");
    let out = ok(&e.affa.affa(&["--kill", "esx"]));
    assert!(out.contains("stopped"), "{out}");
    let o = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(last_error_line(&err).contains("interrupted by SIGTERM"), "{err}");
    // Disk 0 holds 6 chunks of data: all of them received means its read went on to its end
    // (and only the check between two disks stopped the run, as before 2026-12-02).
    let received = pool_entries(&e.affa);
    assert!(received <= 4, "the read of disk 0 went on after SIGTERM: {received} chunks received");
    wait_until(Duration::from_secs(10), "the agent to end", || agent_pids(&agent).is_empty());
    assert!(e.sim.snapshots("vm1").is_empty(), "the snapshot was left: {:?}", e.sim.snapshots("vm1"));
    assert_eq!(archive_names(&job_dir), Vec::<String>::new(), "no archive made");

    // The next run resumes, paced: it cannot take less time than its bytes at the limit (the
    // pool's growth is what the agent sent, less the frames' few bytes of overhead): at least
    // 6 chunks at 1000 KiB/s, 6 s, several times what the rest of a run takes here.
    let pool_bytes =
        || walk(&e.affa.root.join(".affa-pool")).iter().map(|p| fs::metadata(p).unwrap().len()).sum::<u64>();
    let conf = e.affa.conf.join("esx.conf");
    let text = fs::read_to_string(&conf).unwrap();
    e.affa.write_conf("esx.conf", &text.replace("BandwidthLimit=400\n", "BandwidthLimit=1000\n"));
    let before = pool_bytes();
    let t = std::time::Instant::now();
    ok(&e.affa.affa_at("2026-05-04T21:10:00", &["--run", "esx"]));
    let took = t.elapsed().as_secs_f64();
    let sent = pool_bytes() - before;
    assert!(sent > 5 * MB, "the resumed run received only {sent} bytes: the check proves nothing");
    let least = sent as f64 / (1000.0 * 1024.0) - affa::transport::pace::BURST.as_secs_f64();
    assert!(took >= least, "{sent} bytes in {took:.2} s: faster than BandwidthLimit=1000 allows ({least:.2} s)");
    assert_eq!(archive_names(&job_dir), ["scheduled.0"]);
    let frozen = e.frozen();
    let out = e.work.path().join("unchunked");
    ok(&e.affa.affa(&["--unchunk", "esx", "scheduled.0", "--to", out.to_str().unwrap()]));
    assert_eq!(sha256_file(&out.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&out.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk")), frozen[1]);
}

/// The same for a Linux job's chunked file: `affa --kill` mid-read stops the agent at once, the
/// run ends as interrupted (not as a failed agent), nothing is archived, the next run works.
#[test]
fn kill_during_a_linux_agent_read_ends_the_run_as_interrupted() {
    // 2 MiB of incompressible data in 256 KiB chunks: 8 chunks, 7 s at 300 KiB/s.
    let s = Linux::start(24 * MB, &[(0, 2 * MB)], "chunkSize=256K\nBandwidthLimit=300\n");
    let run = spawn_run(&s.affa, "web", "2026-06-01T20:00:00");
    wait_until(Duration::from_secs(60), "two chunks received", || pool_entries(&s.affa) >= 2);
    let out = ok(&s.affa.affa(&["--kill", "web"]));
    assert!(out.contains("stopped"), "{out}");
    let o = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let last = last_error_line(&err);
    assert!(last.contains("interrupted by SIGTERM"), "{last}");
    assert!(!last.contains("failed"), "a signal is not an agent failure: {last}");
    assert!(pool_entries(&s.affa) < 8, "the read went on to the end of the file after SIGTERM");
    wait_until(Duration::from_secs(10), "the agent to end", || agent_pids(&s.agent_path).is_empty());
    assert!(archive_names(&s.affa.job_dir("web")).iter().all(|n| n == "scheduled.running"));
    set_key(&s, "BandwidthLimit", "0");
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "web"]));
    assert_eq!(hash(&s.unchunked("scheduled.0")), hash(&s.img()));
}
