//! The cluster-wide job lock of a RootDir shared by several backup servers (`sharedRootDir=yes`,
//! e.g. on CephFS): `RootDir/.affa-locks/JOB`, an `flock(2)` held for the whole run in addition
//! to the local lock of `lockDir` (src/lock.rs), with the holder's host, pid, start and heartbeat
//! written inside (docs/FORMAT.md "Shared RootDir lock file").
//!
//! Owns: "is this job running on some server sharing the RootDir, and where". CephFS (ceph-fuse
//! and the kernel client) keeps flocks in its MDS, so they hold across clients; a lock whose
//! process died is released by the dying process's client at once, and the lock of a server that
//! died or lost the cluster is released when the MDS evicts its session (`session_autoclose`,
//! 300 s by default), which also blocklists that client so it cannot write into RootDir any
//! more. Must never: break a lock whose flock is held (a heartbeat going stale is reported, not
//! acted on: a hung server that is not fenced may still write), follow a symlink or truncate a
//! file it did not create (the checks of src/lock.rs: `O_NOFOLLOW`, no `O_TRUNC`, a directory
//! and files of the running user that no one else can write), or trust what the file says for
//! anything but the refusal's message.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;

use crate::error::{Error, IoContext, Result};

/// The directory of the shared locks, under RootDir.
pub const LOCK_DIR: &str = ".affa-locks";
/// How often the holder rewrites its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A heartbeat older than this is called stale in the refusal (the holder is probably dead or cut
/// off; its lock goes away when Ceph evicts its session).
pub const STALE: Duration = Duration::from_secs(90);
/// The first line of the lock file: the format and its version.
const MAGIC: &str = "affa-shared-lock 1";

/// A held shared lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct SharedLock {
    file: File,
    pub path: PathBuf,
    /// Dropping it stops the heartbeat thread.
    stop: Option<mpsc::Sender<()>>,
    beat: Option<std::thread::JoinHandle<()>>,
}

/// What a lock file says about its holder (only for messages: another server wrote it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    pub host: String,
    pub pid: Option<i32>,
    pub heartbeat: Option<u64>,
}

pub fn lock_path(root_dir: &Path, job: &str) -> PathBuf {
    root_dir.join(LOCK_DIR).join(job)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn content(host: &str, pid: u32, started: u64, beat: u64) -> String {
    format!("{MAGIC}\nhost {host}\npid {pid}\nstarted {started}\nheartbeat {beat}\n")
}

/// Write `text` over the whole file (it only grows or keeps its length between beats: the
/// fields are fixed but for the heartbeat's digits, so a reader sees an old or a new value).
fn write_all(file: &File, text: &str) -> std::io::Result<()> {
    file.write_all_at(text.as_bytes(), 0)?;
    file.set_len(text.len() as u64)
}

/// A host name as shown in a message: printable ASCII without spaces, at most 64 characters.
fn shown_host(s: &str) -> String {
    let h: String = s.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
    if h.is_empty() {
        "unknown".into()
    } else {
        h
    }
}

/// Parse a lock file's text (at most its first 4 KiB).
pub fn parse(text: &str) -> Holder {
    let mut h = Holder::default();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "host" => h.host = shown_host(v),
            "pid" => h.pid = v.trim().parse().ok(),
            "heartbeat" => h.heartbeat = v.trim().parse().ok(),
            _ => {}
        }
    }
    if h.host.is_empty() {
        h.host = "unknown".into();
    }
    h
}

fn read_holder(file: &mut File) -> Holder {
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    buf.truncate(n);
    parse(&String::from_utf8_lossy(&buf))
}

/// How long a busy lock is tried again before the run is refused: a probe ([`holder`], by
/// another server's `--status` or a test) holds the flock for an instant, and on a cluster file
/// system the release of a run that just ended can reach the MDS a moment after the next run of
/// the job starts. A run still going holds it for minutes: it is refused after this.
const BUSY_GRACE: Duration = Duration::from_secs(3);

/// Try the flock until `grace` has passed.
fn flock_within(file: &File, grace: Duration) -> bool {
    let until = std::time::Instant::now() + grace;
    loop {
        if rustix::fs::flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Take the shared lock of `job` in `root_dir` (which must exist), or fail naming the host and
/// the pid that hold it (after [`BUSY_GRACE`] of tries).
pub fn acquire(root_dir: &Path, job: &str) -> Result<SharedLock> {
    if !root_dir.is_dir() {
        bail!("RootDir {} of job {job} does not exist; create it (sharedRootDir=yes: the shared file system mounted there)", root_dir.display());
    }
    let dir_path = root_dir.join(LOCK_DIR);
    let path = lock_path(root_dir, job);
    let gone = |what: &str| Error::new(format!("{what} {} vanished while it was opened", path.display()));
    let dir = crate::lock::open_dir(&dir_path, true)?.ok_or_else(|| gone("the directory of shared lock file"))?;
    let (mut file, _) = crate::lock::open_file(&dir, &path, job, true)?.ok_or_else(|| gone("shared lock file"))?;
    if !flock_within(&file, BUSY_GRACE) {
        let h = read_holder(&mut file);
        let pid = h.pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        let age = h.heartbeat.map(|b| now().saturating_sub(b));
        let beat = match age {
            Some(a) if a > STALE.as_secs() => format!(
                "; its last heartbeat is {a} s old: if host {} is down, Ceph evicts its session after session_autoclose (300 s by default) and the lock is free again, or evict it now (docs/OPERATIONS.md, \"A RootDir shared on CephFS\")",
                h.host
            ),
            Some(a) => format!("; heartbeat {a} s ago"),
            None => String::new(),
        };
        bail!(
            "job {job} is already running on host {} (pid {pid}{beat}); each job runs on one server at a time (shared lock file {})",
            h.host,
            path.display()
        );
    }
    let (host, pid, started) = (shown_host(&crate::notify::hostname()), std::process::id(), now());
    write_all(&file, &content(&host, pid, started, started))
        .ctx(|| format!("cannot write shared lock file {}", path.display()))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let beat_file = file.try_clone().ctx(|| format!("cannot open shared lock file {}", path.display()))?;
    let beat = std::thread::Builder::new()
        .name("affa-heartbeat".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
                let _ = write_all(&beat_file, &content(&host, pid, started, now()));
            }
        })
        .ctx(|| "cannot start the shared lock's heartbeat thread".to_string())?;
    Ok(SharedLock { file, path, stop: Some(stop), beat: Some(beat) })
}

/// Take the shared lock of a job when its RootDir is shared (`sharedRootDir=yes`).
pub fn acquire_for(job: &crate::config::Job) -> Result<Option<SharedLock>> {
    if !job.shared_root_dir {
        return Ok(None);
    }
    acquire(&job.root_dir(), &job.name).map(Some)
}

/// Who holds the shared lock of `job`, if anyone (a probe: takes and drops the flock when free).
pub fn holder(root_dir: &Path, job: &str) -> Option<Holder> {
    let path = lock_path(root_dir, job);
    let dir = crate::lock::open_dir(&root_dir.join(LOCK_DIR), false).ok().flatten()?;
    let (mut file, _) = crate::lock::open_file(&dir, &path, job, false).ok().flatten()?;
    if rustix::fs::flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok() {
        return None;
    }
    Some(read_holder(&mut file))
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
        let _ = self.file.set_len(0);
        let _ = rustix::fs::flock(self.file.as_fd(), FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_host_and_pid_and_the_file_is_emptied_on_release() {
        let d = tempfile::tempdir().unwrap();
        let l = acquire(d.path(), "job").unwrap();
        let text = std::fs::read_to_string(lock_path(d.path(), "job")).unwrap();
        assert!(text.starts_with("affa-shared-lock 1\nhost "), "{text}");
        let h = holder(d.path(), "job").unwrap();
        assert_eq!(h.pid, Some(std::process::id() as i32));
        let e = acquire(d.path(), "job").unwrap_err().to_string();
        let host = shown_host(&crate::notify::hostname());
        assert!(
            e.starts_with(&format!(
                "job job is already running on host {host} (pid {}; heartbeat ",
                std::process::id()
            )),
            "{e}"
        );
        drop(l);
        assert_eq!(holder(d.path(), "job"), None);
        assert_eq!(std::fs::read_to_string(lock_path(d.path(), "job")).unwrap(), "");
        drop(acquire(d.path(), "job").unwrap());
    }

    /// A probe (`holder`: another server's status, a test waiting for a run) holds the flock for
    /// an instant; a run starting in that instant must not be refused (the CephFS test's run
    /// was: "already running on host unknown (pid unknown)").
    #[test]
    fn a_probe_never_makes_a_starting_run_fail() {
        let d = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let refused: Vec<String> = std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = holder(d.path(), "job");
                }
            });
            let refused = (0..200).filter_map(|_| acquire(d.path(), "job").err().map(|e| e.to_string())).collect();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            refused
        });
        assert!(refused.is_empty(), "{} of 200 runs refused, first: {}", refused.len(), refused[0]);
    }

    #[test]
    fn a_stale_heartbeat_is_named_and_hostile_text_is_tamed() {
        let h = parse("affa-shared-lock 1\nhost evil\u{1b}[2J host\npid 77\nheartbeat 5\n");
        assert_eq!(h, Holder { host: "evil[2Jhost".into(), pid: Some(77), heartbeat: Some(5) });
        assert_eq!(parse("garbage").host, "unknown");
        // A holder whose heartbeat stopped long ago: named, with the way out; the lock is kept.
        let d = tempfile::tempdir().unwrap();
        let l = acquire(d.path(), "job").unwrap();
        std::fs::write(lock_path(d.path(), "job"), "affa-shared-lock 1\nhost deadbox\npid 4242\nheartbeat 1000\n")
            .unwrap();
        let e = acquire(d.path(), "job").unwrap_err().to_string();
        assert!(e.starts_with("job job is already running on host deadbox (pid 4242; its last heartbeat is "), "{e}");
        assert!(e.contains("s old: if host deadbox is down, Ceph evicts its session after session_autoclose"), "{e}");
        assert_eq!(holder(d.path(), "job").unwrap().pid, Some(4242));
        drop(l);
        // A lock file whose symlink points elsewhere is refused and the target left alone.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(LOCK_DIR)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path().join(LOCK_DIR), std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, lock_path(d.path(), "job")).unwrap();
        let e = acquire(d.path(), "job").unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
