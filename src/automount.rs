//! A backup disk mounted for the run (Affa 3's `AutomountDevice`, `AutomountPoint`,
//! `AutomountOptions`, `AutoUnmount`): typically a USB disk holding RootDir, often shared by
//! several jobs.
//!
//! Owns: before a run, when the device is not mounted at the point, `mkdir -p` the point (0700)
//! and `mount OPTIONS DEVICE POINT` (a failure fails the run); after the run, whatever its
//! outcome, `umount -l POINT` when AutoUnmount=yes, affa mounted it, and no other affa process
//! uses it (the last one out unmounts it). `--disk-usage` mounts the same way for the moment it
//! reads the free space, and every other command that reads or changes a job's archives or pool
//! for its time (`--list-archives`, `--full-restore`, `--verify`, `--unchunk`, `--scrub`,
//! `--offsite`, `--mount` for the life of its mount, `--cleanup`, `--delete-job`,
//! `--rename-job`, `--move-archive`, an ESXi restore's mark): a run ending meanwhile leaves the
//! disk mounted under them.
//! Who uses a point is two lock files in the checked lock directory (`crate::lock`), named by a
//! hash of the point: `.automount.HEX`, on which every affa process using the disk holds a
//! shared `flock` for its time, and `.automount.HEX.m`, held exclusively while one process
//! decides to mount or unmount, which also records the mount affa made (its mount ID and
//! whether it is to be unmounted). Before it unmounts the disk, the Samba shares' bind mounts
//! of it (`lockDir/samba-mounts`, src/samba.rs) are detached: they would keep the lazily
//! unmounted disk in use. Must never: unmount a filesystem affa did not mount, unmount
//! one that another affa process uses (a lazy unmount under a running job sent its archive
//! writes to the directory below the mount point), or mount over a point where something else
//! is mounted (mount(8) refuses nothing there, so affa checks first).

use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use crate::config::Job;
use crate::error::{IoContext, Result};
use crate::joblog::JobLog;

/// The first line of the record in `.automount.HEX.m`.
const RECORD_MAGIC: &str = "affa-automount 1";

/// The lock files of one mount point (see the module comment).
struct PointLocks {
    users: File,
    mutex: File,
    /// The users' lock file, for messages.
    path: PathBuf,
}

impl PointLocks {
    fn open(lock_dir: &Path, point: &Path) -> Result<PointLocks> {
        // Named by the point as the kernel sees it: an alias through a symlink is the same point.
        let real = fs::canonicalize(point)
            .or_else(|_| {
                let parent = point.parent().ok_or_else(|| std::io::Error::other("no parent"))?;
                Ok::<_, std::io::Error>(fs::canonicalize(parent)?.join(point.file_name().unwrap_or_default()))
            })
            .unwrap_or_else(|_| point.to_path_buf());
        let name = format!(".automount.{}", &blake3::hash(real.as_os_str().as_bytes()).to_hex()[..16]);
        let dir = crate::lock::open_dir(lock_dir, true)?
            .ok_or_else(|| crate::error::Error::new(format!("lock directory {} is missing", lock_dir.display())))?;
        let path = lock_dir.join(&name);
        let (users, _) = crate::lock::open_file(&dir, &path, &name, true)?
            .ok_or_else(|| crate::error::Error::new(format!("cannot create lock file {}", path.display())))?;
        let mname = format!("{name}.m");
        let mpath = lock_dir.join(&mname);
        let (mutex, _) = crate::lock::open_file(&dir, &mpath, &mname, true)?
            .ok_or_else(|| crate::error::Error::new(format!("cannot create lock file {}", mpath.display())))?;
        Ok(PointLocks { users, mutex, path })
    }

    /// Take `op` (a non-blocking flock operation) on `f`, waiting for it up to `limit`; `stop`
    /// ends the wait early (a signal to affa). False when not taken.
    fn wait_flock(f: &File, op: FlockOperation, limit: Duration, stop: &dyn Fn() -> bool) -> std::io::Result<bool> {
        let t0 = Instant::now();
        loop {
            match rustix::fs::flock(f.as_fd(), op) {
                Ok(()) => return Ok(true),
                Err(Errno::AGAIN) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if stop() || t0.elapsed() >= limit {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mount affa made at this point, as recorded: (mount ID, to be unmounted).
    fn record(&self) -> Option<(u64, bool)> {
        let mut buf = [0u8; 256];
        let n = self.mutex.read_at(&mut buf, 0).ok()?;
        let s = std::str::from_utf8(&buf[..n]).ok()?;
        let mut lines = s.lines();
        if lines.next()? != RECORD_MAGIC {
            return None;
        }
        let (id, unmount) = lines.next()?.split_once(' ')?;
        Some((id.parse().ok()?, unmount == "unmount"))
    }

    fn write_record(&self, rec: Option<(u64, bool)>) -> std::io::Result<()> {
        self.mutex.set_len(0)?;
        if let Some((id, unmount)) = rec {
            let text = format!("{RECORD_MAGIC}\n{id} {}\n", if unmount { "unmount" } else { "keep" });
            self.mutex.write_all_at(text.as_bytes(), 0)?;
        }
        self.mutex.sync_all()
    }
}

/// The disk of a job, in use by this process: the users' lock is held while this lives. When it
/// drops, the disk is unmounted (lazily, as Affa 3) if the mount is the one affa made and
/// recorded to be unmounted (by a process whose job has AutoUnmount=yes, or `--disk-usage`),
/// and no other affa process uses it: the last one out acts on the record, whatever its own
/// job's AutoUnmount.
pub struct Mounted<'a> {
    point: PathBuf,
    /// lockDir: the Samba shares' mounts live in `lockDir/samba-mounts` (src/samba.rs).
    lock_dir: PathBuf,
    locks: PointLocks,
    log: Option<&'a JobLog>,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let say = |msg: String| {
            if let Some(l) = self.log {
                l.info(msg);
            }
        };
        // Another process deciding (mounting: a disk may take long to spin up) is waited for a
        // while; the disk stays mounted rather than being pulled from under it.
        match PointLocks::wait_flock(
            &self.locks.mutex,
            FlockOperation::NonBlockingLockExclusive,
            Duration::from_secs(60),
            &|| false,
        ) {
            Ok(true) => {}
            Ok(false) => {
                return say(format!(
                    "left {} mounted: another affa process is mounting or unmounting it",
                    self.point.display()
                ))
            }
            Err(e) => {
                return say(format!(
                    "left {} mounted: cannot lock {}.m: {e}",
                    self.point.display(),
                    self.locks.path.display()
                ))
            }
        }
        let current = mount_at(&self.point).map(|(id, _)| id);
        match self.locks.record() {
            Some((id, true)) if Some(id) == current => {}
            // Unmounted or mounted again by someone else meanwhile: not affa's mount any more.
            _ => return,
        }
        // The last user? (Converting the shared lock gives it up when another holds one: this
        // process is leaving anyway.)
        match rustix::fs::flock(self.locks.users.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::AGAIN) => {
                return say(format!(
                    "left {} mounted: another affa run or command uses it (the last one unmounts it)",
                    self.point.display()
                ))
            }
            Err(e) => {
                return say(format!(
                    "left {} mounted: cannot lock {}: {e}",
                    self.point.display(),
                    self.locks.path.display()
                ))
            }
        }
        // A Samba share's read-only bind of a job directory on this disk (src/samba.rs) would
        // keep the disk in use after the lazy unmount below: detached first (the share shows
        // nothing until `--samba-shares` runs while the disk is mounted, as with Affa 3, whose
        // share of the unmounted point was empty).
        for m in binds_below(&self.point, &self.lock_dir.join("samba-mounts")) {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
        let res = Command::new("umount").arg("-l").arg(&self.point).stdin(Stdio::null()).output();
        let msg = match res {
            Ok(o) if o.status.success() => {
                let _ = self.locks.write_record(None);
                format!("Unmounted {}", self.point.display())
            }
            Ok(o) => format!(
                "cannot unmount {}: {}",
                self.point.display(),
                String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("").trim()
            ),
            Err(e) => format!("cannot run umount: {e}"),
        };
        say(msg);
    }
}

/// A mountinfo field: `\040` and the other octal escapes decoded.
fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(s)).into_owned()
}

/// A mountinfo field's bytes: space, tab, newline and backslash are escaped there as `\NNN`.
pub(crate) fn unescape_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The mount on `point` now: its mount ID (unique while it stays mounted) and its source
/// device, canonical (a `/dev/disk/by-label/...` or `/dev/mapper/...` link resolved).
fn mount_at(point: &Path) -> Option<(u64, PathBuf)> {
    let point = fs::canonicalize(point).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on a point is the one in use.
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mp = unescape(left.split(' ').nth(4)?);
        if Path::new(&mp) != point {
            return None;
        }
        let id = left.split(' ').next()?.parse().ok()?;
        let src = unescape(right.split(' ').nth(1)?);
        Some((id, fs::canonicalize(&src).unwrap_or_else(|_| PathBuf::from(src))))
    })
}

/// The mounts below `dir` of the file system mounted at `point` (same device numbers).
fn binds_below(point: &Path, dir: &Path) -> Vec<PathBuf> {
    let (Ok(point), Ok(dir)) = (fs::canonicalize(point), fs::canonicalize(dir)) else { return Vec::new() };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let fields = |l: &str| -> Option<(String, PathBuf)> {
        let f: Vec<&str> = l.split(' ').collect();
        Some((f.get(2)?.to_string(), PathBuf::from(unescape(f.get(4)?))))
    };
    let Some(dev) = info.lines().rev().filter_map(fields).find(|(_, mp)| *mp == point).map(|(d, _)| d) else {
        return Vec::new();
    };
    info.lines().filter_map(fields).filter(|(d, mp)| *d == dev && mp.starts_with(&dir)).map(|(_, mp)| mp).collect()
}

/// What is mounted at `point`: its source device, canonical, or None.
pub fn mounted_at(point: &Path) -> Option<PathBuf> {
    mount_at(point).map(|(_, dev)| dev)
}

/// Every mount point now (as /proc/self/mountinfo names them).
pub fn mount_points() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            use std::os::unix::ffi::OsStringExt;
            PathBuf::from(std::ffi::OsString::from_vec(unescape_bytes(p)))
        })
        .collect()
}

/// The device node an AutomountDevice names (`LABEL=` and `UUID=` through /dev/disk).
fn device_link(device: &str) -> String {
    match device.split_once('=') {
        Some(("LABEL", l)) => format!("/dev/disk/by-label/{l}"),
        Some(("UUID", u)) => format!("/dev/disk/by-uuid/{u}"),
        _ => device.to_string(),
    }
}

/// Is `device` mounted at `point`?
pub fn is_mounted(device: &str, point: &Path) -> bool {
    let dev = fs::canonicalize(device_link(device)).unwrap_or_else(|_| PathBuf::from(device));
    mounted_at(point).is_some_and(|d| d == dev)
}

/// Is the disk `device` connected (its device node there)? A USB disk taken away (several
/// disks used in turn) is not.
pub fn is_connected(device: &str) -> bool {
    fs::metadata(device_link(device)).is_ok()
}

/// Mount the job's AutomountDevice at AutomountPoint unless it is mounted there already, and
/// hold it for this process (see [`Mounted`]). None when the job has no automount.
pub fn mount<'a>(job: &Job, lock_dir: &Path, log: Option<&'a JobLog>) -> Result<Option<Mounted<'a>>> {
    mount_as(job, lock_dir, log, None)
}

/// [`mount`], with `force_unmount` (when set) instead of AutoUnmount for a disk mounted now.
fn mount_as<'a>(
    job: &Job,
    lock_dir: &Path,
    log: Option<&'a JobLog>,
    force_unmount: Option<bool>,
) -> Result<Option<Mounted<'a>>> {
    let Some(a) = &job.automount else {
        return Ok(None);
    };
    let dev = a.device.as_str();
    let point = PathBuf::from(a.point.to_string_lossy().trim_end_matches('/'));
    let locks = PointLocks::open(lock_dir, &point)?;
    // One process at a time decides to mount or unmount the point: two runs starting together
    // mounted the disk twice, one over the other.
    // Waited for without a limit (a disk may take long to spin up in the other's mount), but
    // said in the log, and stopped by a signal to affa.
    let busy =
        !PointLocks::wait_flock(&locks.mutex, FlockOperation::NonBlockingLockExclusive, Duration::ZERO, &|| true)
            .ctx(|| format!("cannot lock {}.m", locks.path.display()))?;
    if busy {
        if let Some(l) = log {
            l.info(format!("waiting for another affa process that is mounting or unmounting {}", point.display()));
        }
    }
    let taken = !busy
        || PointLocks::wait_flock(&locks.mutex, FlockOperation::NonBlockingLockExclusive, Duration::MAX, &|| {
            crate::interrupt::interrupted()
        })
        .ctx(|| format!("cannot lock {}.m", locks.path.display()))?;
    if !taken {
        bail!(
            Interrupted,
            "waiting for another affa process to mount AutomountDevice {dev} on {} for job {} was interrupted by {}; nothing was backed up",
            point.display(),
            job.name,
            crate::interrupt::signal_name()
        );
    }
    let mounted_now = !is_mounted(dev, &point);
    if !mounted_now && rustix::fs::flock(locks.users.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok() {
        // Mounted, and no affa process uses it: a record of it is one no process of affa stands
        // behind (a killed run's, or a mount ID the kernel gave again to a mount made by hand
        // since): not trusted, the mount is taken for one affa did not make (never unmounted).
        locks.write_record(None).ctx(|| format!("cannot write {}.m", locks.path.display()))?;
        let _ = rustix::fs::flock(locks.users.as_fd(), FlockOperation::Unlock);
    }
    if mounted_now {
        if let Some(other) = mounted_at(&point) {
            bail!(
                "AutomountPoint {} of job {} holds {}, not AutomountDevice {dev}; unmount it first",
                point.display(),
                job.name,
                other.display()
            );
        }
        crate::fsutil::create_private_dir(&point)?;
        if let Some(l) = log {
            l.info(format!("Mounting {dev} to {}", point.display()));
        }
        let mut c = Command::new("mount");
        c.args(&a.options).arg(dev).arg(&point);
        // No time limit (a disk may take long to spin up), but stopped by a SIGTERM to affa.
        let out = crate::transport::output_within(c, None, Duration::MAX, "mount", "")?;
        if crate::interrupt::interrupted() {
            // mount may have mounted before it was stopped: that is undone as after a run (no
            // other process can be using it: they wait for the decision this one holds).
            if a.unmount && is_mounted(dev, &point) {
                let _ = Command::new("umount").arg("-l").arg(&point).stdin(Stdio::null()).output();
            }
            bail!(
                Interrupted,
                "mounting AutomountDevice {dev} on {} for job {} was interrupted by {}; nothing was backed up",
                point.display(),
                job.name,
                crate::interrupt::signal_name()
            );
        }
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "cannot mount AutomountDevice {dev} on {} for job {}: {}",
                point.display(),
                job.name,
                err.lines().next().unwrap_or("mount failed").trim()
            );
        }
        let unmount = force_unmount.unwrap_or(a.unmount);
        if let Some((id, _)) = mount_at(&point) {
            locks.write_record(Some((id, unmount))).ctx(|| format!("cannot write {}.m", locks.path.display()))?;
        }
    }
    // In use by this process until the guard drops. (Never blocks: the exclusive lock of the
    // users' file is only taken by a process holding the decision, which this one holds.)
    rustix::fs::flock(locks.users.as_fd(), FlockOperation::NonBlockingLockShared)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot lock {}", locks.path.display()))?;
    // The decision is released when `locks.mutex`'s lock is: now.
    let _ = rustix::fs::flock(locks.mutex.as_fd(), FlockOperation::Unlock);
    Ok(Some(Mounted { point, lock_dir: lock_dir.to_path_buf(), locks, log }))
}

/// The job's disk mounted for a command that reads or changes its archives or its pool (see the
/// module comment), held for the guard's life: a run that ends meanwhile leaves it mounted, and
/// when the guard drops it is unmounted as after a run (if no other affa process uses it). A
/// disk that cannot be mounted fails the command before it does anything: without the disk a
/// command changed the configuration alone (the archives stayed on the disk under the old name,
/// for the next job of that name to take over and rotate away), listed no archives, or wrote
/// a restore's staging below the empty mount point, on the system disk.
pub fn mount_for_command(job: &Job, lock_dir: &Path) -> Result<Option<Mounted<'static>>> {
    mount(job, lock_dir, None)
}

/// Run `f` with the job's disk mounted (Affa 3's `--disk-usage`): unmounted after, if affa
/// mounted it now, whatever AutoUnmount says (and no other affa process uses it). Without
/// automount, or when the disk cannot be mounted, just `f`.
pub fn with_mounted<T>(job: &Job, lock_dir: &Path, f: impl FnOnce() -> T) -> T {
    let m = mount_as(job, lock_dir, None, Some(true)).ok().flatten();
    let r = f();
    drop(m);
    r
}
