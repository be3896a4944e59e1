//! Chunked files read by affa-agent on the source (chunkTransport, issue 13), end to end over
//! the real sshd and the simulator: the default transport, deployment and replacement of a stale
//! agent, the ESXi frozen disks, the fallback where the agent cannot execute (a noexec mount),
//! and an agent killed mid-backup.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
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
