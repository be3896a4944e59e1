//! The per-job run lock: `lockDir/JOB`, an `flock(2)` held for the whole run, with the pid
//! written inside for humans.
//!
//! Owns: "is this job running, and by which pid", the lock directory (affa creates it at every
//! run, mode 0700, and uses it only if it is a real directory owned by the running user that no
//! one else can write: lockDir defaults to /run/lock/affa, a world-writable tmpfs emptied at
//! boot), and which process `--kill` may signal. Must never: follow a symlink or truncate a file
//! it did not create (lock files are opened `O_NOFOLLOW`, without `O_TRUNC`), chmod or chown what
//! another user made, trust the pid in the file alone (a stale file of a dead run is taken over,
//! because the kernel drops the flock when its holder dies; a pid is signalled only if it is > 1,
//! holds the flock according to the kernel, and is an affa process), or be inherited by child
//! processes (everything is opened close-on-exec, except the children marker below, and that
//! only in the children that the transport's `die_with_parent` prepares).
//!
//! Also the run's children marker `lockDir/.children.JOB` (a job name never starts with '.'):
//! the run holds an flock on it, and the rsync and ssh processes it starts inherit that open
//! file. `PR_SET_PDEATHSIG` stops only affa's direct child when affa is killed with `-9`; rsync's
//! own forked receiver would go on writing into `scheduled.running` for a while. The marker's
//! flock stays held as long as any such leftover lives, so the next run of the job sees it,
//! stops the leftovers (the processes holding the marker open: root's private file, only affa's
//! children inherit it) and waits for them before it touches the job's directory.
//!
//! The lock directory also holds `.ssh.JOB/`, the private directory of the run's ssh
//! ControlMaster socket (the transport's `mux.rs`, which creates and removes it; the master is
//! one of the run's children and holds the marker like them).
//!
//! And `.automount.HEX` and `.automount.HEX.m`, the users' and the decision's locks of an
//! AutomountPoint (src/automount.rs, which opens them through this module's checks).

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat, CWD};
use rustix::io::Errno;
use rustix::process::{Pid, Signal};

use crate::error::{Error, IoContext, Result};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct JobLock {
    file: File,
    pub path: PathBuf,
    /// The children marker (held with an flock; inherited by the run's rsync and ssh).
    _children: File,
    /// Processes left by an earlier, killed run of the job that this lock stopped first.
    pub stopped_leftovers: Vec<i32>,
    /// The raw fd of `_children`, published in this thread's `MARKER_FD`.
    marker: i32,
}

thread_local! {
    /// The fd of the children marker held by the run on this thread (-1: none);
    /// [`inheritable_marker`] reads it. Per thread, not per process: a run starts its children
    /// from the thread that took its lock, and two runs in one process (the test suite runs many
    /// jobs in parallel threads) must never hand one job's marker to another job's children,
    /// or the first job's next run would stop the second job's rsync as a leftover.
    static MARKER_FD: std::cell::Cell<i32> = const { std::cell::Cell::new(-1) };
}

/// The children marker fd a child of the run on this thread should inherit (-1: none). Read
/// before the fork; the child clears its close-on-exec flag (the transport's `die_with_parent`).
pub fn inheritable_marker() -> i32 {
    MARKER_FD.with(|m| m.get())
}

/// How long a new run waits for the leftovers of a killed one to end after SIGKILL.
const LEFTOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn lock_path(lock_dir: &Path, job: &str) -> PathBuf {
    lock_dir.join(job)
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

const EXPECTED_DIR: &str = "expected a directory that affa creates itself, owned by the user running affa, mode 0700";

/// The checked lock directory: a real directory (not a symlink), owned by the running user,
/// writable by no one else. With `create` it is made (mode 0700) when missing, and a directory
/// of the running user that others may only read is tightened to 0700. Without `create`, a
/// missing directory is `None`.
pub(crate) fn open_dir(lock_dir: &Path, create: bool) -> Result<Option<OwnedFd>> {
    let shown = lock_dir.display();
    if create {
        if let Some(parent) = lock_dir.parent() {
            fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
        }
        match rustix::fs::mkdirat(CWD, lock_dir, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io::Error::from(e)).ctx(|| format!("cannot create lock directory {shown}")),
        }
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(lock_dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(e) => {
            match rustix::fs::statat(CWD, lock_dir, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode))
            {
                Ok(FileType::Symlink) => {
                    bail!("lock directory {shown} is a symbolic link; {EXPECTED_DIR} (remove it and run again)")
                }
                Ok(t) if t != FileType::Directory => {
                    bail!("lock directory {shown} is not a directory; {EXPECTED_DIR} (remove it and run again)")
                }
                _ => return Err(io::Error::from(e)).ctx(|| format!("cannot open lock directory {shown}")),
            }
        }
    };
    let st = rustix::fs::fstat(&fd).map_err(io::Error::from).ctx(|| format!("cannot stat lock directory {shown}"))?;
    if st.st_uid != euid() {
        bail!("lock directory {shown} is owned by uid {}, not by uid {} running affa; {EXPECTED_DIR} (another user made it: remove it and run again)", st.st_uid, euid());
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        bail!("lock directory {shown} can be written by others (mode {mode:04o}); {EXPECTED_DIR} (remove it and run again)");
    }
    if create && mode & 0o077 != 0 {
        // Ours, and no one else could have written in it (an older affa made it 0755): tighten.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(io::Error::from)
            .ctx(|| format!("cannot chmod lock directory {shown} to 0700"))?;
    }
    Ok(Some(fd))
}

/// The lock file `job` in the checked directory: a regular file of the running user, opened
/// read-write without following a symlink and without truncating it. Without `create`, a
/// missing file is `None`.
pub(crate) fn open_file(dir: &OwnedFd, path: &Path, job: &str, create: bool) -> Result<Option<(File, Stat)>> {
    // Looked at before it is opened: a device is never opened (an open can act: a watchdog
    // device arms on open), nor a fifo waited on. (Not O_NONBLOCK: on CephFS the open of a
    // shared lock file must wait for the capabilities of a server that went silent. Nothing
    // can change between the look and the open: the directory is checked to be affa's own.)
    match rustix::fs::statat(dir, job, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
            bail!("lock file {} is a symbolic link; expected a file affa creates (remove it)", path.display())
        }
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
            bail!("lock file {} is not a regular file; expected a file affa creates (remove it)", path.display())
        }
        _ => {}
    }
    let mut flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    if create {
        flags |= OFlags::CREATE;
    }
    let fd = match rustix::fs::openat(dir, job, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(Errno::LOOP) => {
            bail!("lock file {} is a symbolic link; expected a file affa creates (remove it)", path.display())
        }
        Err(e) => return Err(io::Error::from(e)).ctx(|| format!("cannot open lock file {}", path.display())),
    };
    let st =
        rustix::fs::fstat(&fd).map_err(io::Error::from).ctx(|| format!("cannot stat lock file {}", path.display()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        bail!("lock file {} is not a regular file; expected a file affa creates (remove it)", path.display());
    }
    if st.st_uid != euid() {
        bail!(
            "lock file {} is owned by uid {}, not by uid {} running affa (remove it)",
            path.display(),
            st.st_uid,
            euid()
        );
    }
    Ok(Some((File::from(fd), st)))
}

fn try_flock(f: &File) -> bool {
    rustix::fs::flock(f.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// Take the lock of `job`, or fail naming the pid that holds it.
pub fn acquire(lock_dir: &Path, job: &str) -> Result<JobLock> {
    let path = lock_path(lock_dir, job);
    let gone = |what: &str| Error::new(format!("{what} {} vanished while it was opened", path.display()));
    let dir = open_dir(lock_dir, true)?.ok_or_else(|| gone("the directory of lock file"))?;
    let (mut file, _) = open_file(&dir, &path, job, true)?.ok_or_else(|| gone("lock file"))?;
    if !try_flock(&file) {
        let pid = read_pid(&mut file).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        bail!("job {job} is already running (pid {pid}); wait for it to finish or stop it with affa --kill {job} (lock file {})", path.display());
    }
    file.set_len(0).ctx(|| format!("cannot write lock file {}", path.display()))?;
    file.rewind().ok();
    writeln!(file, "{}", std::process::id()).ctx(|| format!("cannot write lock file {}", path.display()))?;
    let (children, stopped_leftovers) = children_marker(&dir, lock_dir, job)?;
    use std::os::fd::AsRawFd;
    let marker = children.as_raw_fd();
    MARKER_FD.with(|m| m.set(marker));
    Ok(JobLock { file, path, _children: children, stopped_leftovers, marker })
}

/// Open and flock the children marker of `job`. When its flock is held, processes of an
/// earlier run that was killed still live: each process holding the marker open is sent
/// SIGKILL, and the flock is awaited (at most [`LEFTOVER_WAIT`]).
fn children_marker(dir: &OwnedFd, lock_dir: &Path, job: &str) -> Result<(File, Vec<i32>)> {
    let name = format!(".children.{job}");
    let path = lock_dir.join(&name);
    let (file, st) = open_file(dir, &path, &name, true)?
        .ok_or_else(|| Error::new(format!("children marker {} vanished while it was opened", path.display())))?;
    // A child forked by another thread of this process holds every fd of the process for
    // the instant between its fork and its exec (close-on-exec closes the marker then): give
    // such a holder a moment before treating the holders as leftovers of a killed run.
    for _ in 0..4 {
        if try_flock(&file) {
            return Ok((file, Vec::new()));
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let me = std::process::id() as i32;
    let mut stopped = Vec::new();
    let deadline = std::time::Instant::now() + LEFTOVER_WAIT;
    loop {
        for pid in holders_of(st.st_dev, st.st_ino).into_iter().filter(|&p| p != me && p > 1) {
            if let Some(p) = Pid::from_raw(pid) {
                if rustix::process::kill_process(p, Signal::KILL).is_ok() && !stopped.contains(&pid) {
                    stopped.push(pid);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        if try_flock(&file) {
            return Ok((file, stopped));
        }
        if std::time::Instant::now() > deadline {
            let pids: Vec<String> = holders_of(st.st_dev, st.st_ino).iter().map(|p| p.to_string()).collect();
            bail!(
                "processes left by an earlier, killed run of job {job} still hold {} (pids {}) after SIGKILL; the job does not run until they end",
                path.display(),
                if pids.is_empty() { "unknown".to_string() } else { pids.join(", ") }
            );
        }
    }
}

/// The processes that have the file (dev, ino) open, from `/proc/PID/fd`.
fn holders_of(dev: u64, ino: u64) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)) {
            out.push(pid);
        }
    }
    out
}

fn read_pid(f: &mut File) -> Option<i32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.take(64).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The lock file of a running job (its flock is held), with the pid written in it.
struct Held {
    path: PathBuf,
    stat: Stat,
    pid: Option<i32>,
}

fn held(lock_dir: &Path, job: &str) -> Result<Option<Held>> {
    let path = lock_path(lock_dir, job);
    let Some(dir) = open_dir(lock_dir, false)? else { return Ok(None) };
    let Some((mut file, stat)) = open_file(&dir, &path, job, false)? else { return Ok(None) };
    if try_flock(&file) {
        // Nobody holds it: a stale file. Our probe lock goes away with `file`.
        return Ok(None);
    }
    let pid = read_pid(&mut file);
    Ok(Some(Held { path, stat, pid }))
}

/// The pid of the run holding the lock of `job`, or None if it is not running (or its lock
/// directory or file is not one affa can trust: then no run can hold it either).
pub fn holder(lock_dir: &Path, job: &str) -> Option<i32> {
    held(lock_dir, job).ok().flatten().and_then(|h| h.pid)
}

/// What [`signal_holder`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// Nobody holds the lock.
    NotRunning,
    /// The signal was delivered to this pid.
    Sent(i32),
    /// This pid held the lock but exited before the signal reached it.
    Exited(i32),
}

/// Send `sig` to the affa process that runs `job` (`--kill`). The pid written in the lock file
/// is signalled only if it is > 1, the kernel lists it as the holder of the file's flock, and
/// it runs an affa binary; anything else is an error that names the lock file and the pid.
pub fn signal_holder(lock_dir: &Path, job: &str, sig: Signal) -> Result<Signalled> {
    let Some(h) = held(lock_dir, job)? else { return Ok(Signalled::NotRunning) };
    let shown = h.path.display();
    let Some(pid) = h.pid else {
        bail!("the lock of job {job} is held but lock file {shown} names no pid; not signalling anything");
    };
    let Some(p) = Pid::from_raw(pid).filter(|_| pid > 1) else {
        bail!("lock file {shown} names pid {pid}; expected the pid of an affa process (> 1); not signalling it");
    };
    // Hold the process by a pidfd while checking it, so a recycled pid cannot be signalled.
    let pidfd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        // Gone: it had just finished (the lock is free now), or the file names a dead process
        // while another one holds the lock (then the check names that one).
        Err(Errno::SRCH) if held(lock_dir, job)?.is_none() => return Ok(Signalled::Exited(pid)),
        Err(Errno::SRCH) => return check_holder(pid, &h).map(|()| Signalled::Exited(pid)),
        Err(_) => None, // a kernel without pidfds (< 5.3): the checks below, then kill(2)
    };
    check_holder(pid, &h)?;
    let sent = match &pidfd {
        Some(fd) => rustix::process::pidfd_send_signal(fd, sig),
        None => rustix::process::kill_process(p, sig),
    };
    match sent {
        Ok(()) => Ok(Signalled::Sent(pid)),
        Err(Errno::SRCH) => Ok(Signalled::Exited(pid)),
        Err(e) => Err(Error::new(format!("cannot signal pid {pid} of job {job}: {}", io::Error::from(e)))),
    }
}

/// Is `pid` the holder of the flock of `h` according to the kernel, and an affa process?
fn check_holder(pid: i32, h: &Held) -> Result<()> {
    let shown = h.path.display();
    // /proc/locks is made in pages while other processes take and drop locks: a read may list
    // an entry twice or miss one. Read again (a few times) before deciding the pid is not the
    // holder; duplicates are dropped.
    let mut holders = Vec::new();
    for _ in 0..3 {
        let locks = fs::read_to_string("/proc/locks").ctx(|| "cannot read /proc/locks".to_string())?;
        holders =
            flock_holders(&locks, rustix::fs::major(h.stat.st_dev), rustix::fs::minor(h.stat.st_dev), h.stat.st_ino);
        holders.sort_unstable();
        holders.dedup();
        if holders.contains(&pid) {
            break;
        }
    }
    if !holders.contains(&pid) {
        let by = holders.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        bail!(
            "lock file {shown} names pid {pid}, but the lock is held by pid {}; not signalling pid {pid}",
            if by.is_empty() { "unknown".into() } else { by }
        );
    }
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ctx(|| format!("cannot read /proc/{pid}/exe"))?;
    if !is_affa_binary(&exe, pid) {
        bail!("pid {pid} (lock file {shown}) runs {}, not affa; not signalling it", exe.display());
    }
    Ok(())
}

/// The pids that hold a `FLOCK` on the inode (major, minor, ino), from `/proc/locks`.
fn flock_holders(locks: &str, major: u32, minor: u32, ino: u64) -> Vec<i32> {
    let mut out = Vec::new();
    for line in locks.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:56789 0 EOF"; waiters have "->" after the number.
        if t.len() < 6 || t[1] != "FLOCK" {
            continue;
        }
        let mut id = t[5].splitn(3, ':');
        let dev = (
            id.next().and_then(|m| u32::from_str_radix(m, 16).ok()),
            id.next().and_then(|m| u32::from_str_radix(m, 16).ok()),
        );
        let i = id.next().and_then(|i| i.parse::<u64>().ok());
        if dev == (Some(major), Some(minor)) && i == Some(ino) {
            if let Ok(pid) = t[4].parse::<i32>() {
                out.push(pid);
            }
        }
    }
    out
}

/// Is this `/proc/PID/exe` an affa binary: named `affa` (an upgrade leaves the running one
/// "(deleted)"), or the very binary running now (an installation under another name)?
fn is_affa_binary(exe: &Path, pid: i32) -> bool {
    let named_affa = exe.file_name().is_some_and(|n| n.to_string_lossy().trim_end_matches(" (deleted)") == "affa");
    let same = |a: &fs::Metadata, b: &fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    };
    named_affa
        || matches!((fs::metadata(format!("/proc/{pid}/exe")), fs::metadata("/proc/self/exe")), (Ok(a), Ok(b)) if same(&a, &b))
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Unpublish only our own marker: a lock dropped on another thread leaves that
        // thread's run alone.
        MARKER_FD.with(|m| {
            if m.get() == self.marker {
                m.set(-1)
            }
        });
        let _ = self.file.set_len(0);
        let _ = rustix::fs::flock(self.file.as_fd(), FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn second_lock_is_refused_with_pid_and_stale_file_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("job"), "999999\n").unwrap(); // stale
        let l = acquire(d.path(), "job").unwrap();
        assert_eq!(holder(d.path(), "job"), Some(std::process::id() as i32));
        // flock is per open file description: a second open in this process conflicts too.
        let e = acquire(d.path(), "job").unwrap_err().to_string();
        assert!(e.contains(&format!("already running (pid {}", std::process::id())), "{e}");
        drop(l);
        assert_eq!(holder(d.path(), "job"), None);
    }

    #[test]
    fn the_lock_directory_is_created_0700_and_an_own_0755_one_is_tightened() {
        let d = tempfile::tempdir().unwrap();
        let ld = d.path().join("run/lock/affa");
        drop(acquire(&ld, "job").unwrap());
        assert_eq!(fs::metadata(&ld).unwrap().mode() & 0o7777, 0o700);
        fs::set_permissions(&ld, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(holder(&ld, "job"), None);
        drop(acquire(&ld, "job").unwrap());
        assert_eq!(fs::metadata(&ld).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn a_fifo_or_device_at_a_lock_file_is_never_opened() {
        use rustix::fs::inotify;
        let d = tempfile::tempdir().unwrap();
        let ld = d.path().join("affa");
        fs::create_dir(&ld).unwrap();
        fs::set_permissions(&ld, fs::Permissions::from_mode(0o700)).unwrap();
        // Every open of the nodes is seen (inotify IN_OPEN): the refusal must come before one.
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        let mut nodes = vec![("job", FileType::Fifo, 0)];
        // /dev/null's numbers stand for a device (a watchdog's open would arm it).
        if rustix::process::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            nodes.push(("dev", FileType::CharacterDevice, fs::metadata("/dev/null").unwrap().rdev()));
        }
        for (name, kind, rdev) in &nodes {
            rustix::fs::mknodat(rustix::fs::CWD, ld.join(name), *kind, Mode::from_raw_mode(0o600), *rdev).unwrap();
            inotify::add_watch(&watch, ld.join(name), inotify::WatchFlags::OPEN).unwrap();
        }
        for (name, _, _) in &nodes {
            assert_eq!(holder(&ld, name), None);
            let e = acquire(&ld, name).unwrap_err().to_string();
            assert!(e.contains("is not a regular file"), "{e}");
        }
        let mut buf = [0u8; 1024];
        assert_eq!(rustix::io::read(&watch, &mut buf).err(), Some(Errno::AGAIN), "a node at a lock file was opened");
    }

    #[test]
    fn unsafe_lock_directories_and_files_are_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        let ld = d.path().join("affa");
        fs::create_dir(&ld).unwrap();
        fs::set_permissions(&ld, fs::Permissions::from_mode(0o777)).unwrap();
        let e = acquire(&ld, "job").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "lock directory {} can be written by others (mode 0777); {EXPECTED_DIR} (remove it and run again)",
                ld.display()
            )
        );
        assert_eq!(fs::metadata(&ld).unwrap().mode() & 0o7777, 0o777, "changed what it refused");
        assert!(!ld.join("job").exists());
        // The lock file a symlink: not followed, the target not truncated.
        fs::set_permissions(&ld, fs::Permissions::from_mode(0o700)).unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, ld.join("job")).unwrap();
        let e = acquire(&ld, "job").unwrap_err().to_string();
        assert!(e.starts_with(&format!("lock file {} is a symbolic link", ld.join("job").display())), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(holder(&ld, "job"), None);
        fs::remove_file(ld.join("job")).unwrap();
        fs::create_dir(ld.join("job")).unwrap();
        assert!(acquire(&ld, "job").is_err());
        // The directory a symlink to a good directory.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&ld, &link).unwrap();
        let e = acquire(&link, "other").unwrap_err().to_string();
        assert!(e.starts_with(&format!("lock directory {} is a symbolic link;", link.display())), "{e}");
        assert!(!ld.join("other").exists());
    }

    /// Two runs in one process (the test suite's threads): the children of job b must never
    /// inherit job a's marker, or a's next run would kill b's rsync as a leftover (a CI run
    /// failed so: "rsync failed with exit -1: killed by a signal").
    #[test]
    fn a_run_on_another_thread_never_hands_its_marker_to_this_runs_children() {
        let d = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (d.path().join("a"), d.path().join("b"));
        let b_lock = acquire(&b_dir, "b").unwrap();
        let b_marker = inheritable_marker();
        assert!(b_marker >= 0);
        // Job a takes its lock on another thread after b: b's thread still sees b's marker.
        let (to_a, a_rx) = std::sync::mpsc::channel::<()>();
        let (a_tx, from_a) = std::sync::mpsc::channel::<()>();
        let a_dir2 = a_dir.clone();
        let a = std::thread::spawn(move || {
            let l = acquire(&a_dir2, "a").unwrap();
            assert!(inheritable_marker() >= 0);
            a_tx.send(()).unwrap();
            a_rx.recv().unwrap();
            drop(l);
            // a's next run: must find nothing to stop.
            let again = acquire(&a_dir2, "a").unwrap();
            again.stopped_leftovers.clone()
        });
        from_a.recv().unwrap();
        assert_eq!(inheritable_marker(), b_marker, "b's thread sees another run's marker");
        let mut c = std::process::Command::new("sleep");
        c.arg("30");
        crate::transport::die_with_parent(&mut c);
        let mut child = c.spawn().unwrap();
        to_a.send(()).unwrap();
        let stopped = a.join().unwrap();
        assert!(stopped.is_empty(), "a's next run stopped {stopped:?}, b's child is {}", child.id());
        assert!(child.try_wait().unwrap().is_none(), "b's child was killed");
        let _ = child.kill();
        let _ = child.wait();
        drop(b_lock);
        assert_eq!(inheritable_marker(), -1);
    }

    #[test]
    fn proc_locks_lines_give_the_holders_of_one_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 11764 fe:00:10013267 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 11999 fe:00:10013267 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 222 fe:00:10013267 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 333 103:02:10013267 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 444 fe:00:1 0 EOF\n";
        assert_eq!(flock_holders(locks, 0xfe, 0, 10013267), vec![11764]);
        assert_eq!(flock_holders(locks, 0x103, 2, 10013267), vec![333]);
        assert!(flock_holders(locks, 1, 1, 1).is_empty());
    }

    #[test]
    fn only_an_affa_process_holding_the_flock_is_signalled() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(signal_holder(d.path(), "job", Signal::TERM).unwrap(), Signalled::NotRunning);
        drop(acquire(d.path(), "job").unwrap());
        let file = d.path().join("job");
        // Another program holds the flock (flock(1) takes it, then waits for its stdin to close).
        let mut holder_proc = std::process::Command::new("flock")
            .args(["-n", "-o"])
            .arg(&file)
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("flock (util-linux)");
        let t = std::time::Instant::now();
        while held(d.path(), "job").unwrap().is_none() {
            assert!(t.elapsed().as_secs() < 10, "flock(1) did not take the lock");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let flock_pid = holder_proc.id() as i32;
        let say = |pid: &str| fs::write(&file, format!("{pid}\n")).unwrap();
        say(&flock_pid.to_string());
        let e = signal_holder(d.path(), "job", Signal::TERM).unwrap_err().to_string();
        let want = format!("pid {flock_pid} (lock file {}) runs /", file.display());
        assert!(e.starts_with(&want) && e.ends_with("/flock, not affa; not signalling it"), "{e}");
        // Pids that are never signalled, whatever the file says (never passed to kill(2) here).
        for bad in ["1", "0", "-1", "-4242"] {
            say(bad);
            let e = signal_holder(d.path(), "job", Signal::TERM).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "lock file {} names pid {bad}; expected the pid of an affa process (> 1); not signalling it",
                    file.display()
                )
            );
        }
        // A live process that does not hold the flock (this test).
        say(&std::process::id().to_string());
        let e = signal_holder(d.path(), "job", Signal::TERM).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("but the lock is held by pid {flock_pid}; not signalling pid {}", std::process::id())),
            "{e}"
        );
        // A pid no process has.
        say("999999999");
        let e = signal_holder(d.path(), "job", Signal::TERM).unwrap_err().to_string();
        assert!(e.ends_with(&format!("but the lock is held by pid {flock_pid}; not signalling pid 999999999")), "{e}");
        say("garbage");
        let e = signal_holder(d.path(), "job", Signal::TERM).unwrap_err().to_string();
        assert!(e.contains("names no pid"), "{e}");
        assert!(holder_proc.try_wait().unwrap().is_none(), "the flock holder was signalled");
        drop(holder_proc.stdin.take());
        holder_proc.wait().unwrap();
        assert_eq!(signal_holder(d.path(), "job", Signal::TERM).unwrap(), Signalled::NotRunning);
    }
}
