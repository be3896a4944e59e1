//! A backup disk mounted for the run (Affa 3's `AutomountDevice`, `AutomountPoint`,
//! `AutomountOptions`, `AutoUnmount`): typically a USB disk holding RootDir.
//!
//! Owns: before a run, when the device is not mounted at the point, `mkdir -p` the point (0700)
//! and `mount OPTIONS DEVICE POINT` (a failure fails the run); after the run, whatever its
//! outcome, `umount -l POINT` when AutoUnmount=yes and affa mounted it. `--disk-usage` mounts the
//! same way for the moment it reads the free space, and the commands that change a job's
//! archives (`--cleanup`, `--delete-job`, `--rename-job`, `--move-archive`) for their time.
//! Must never: unmount a filesystem affa did not mount, or mount over a point where something
//! else is mounted (mount(8) refuses nothing there, so affa checks first).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::config::Job;
use crate::error::Result;
use crate::joblog::JobLog;

/// A filesystem affa mounted; unmounted (lazily, as Affa 3) when dropped if AutoUnmount=yes.
pub struct Mounted<'a> {
    point: PathBuf,
    unmount: bool,
    log: Option<&'a JobLog>,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if !self.unmount {
            return;
        }
        let res = Command::new("umount").arg("-l").arg(&self.point).stdin(Stdio::null()).output();
        let msg = match res {
            Ok(o) if o.status.success() => format!("Unmounted {}", self.point.display()),
            Ok(o) => format!(
                "cannot unmount {}: {}",
                self.point.display(),
                String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("").trim()
            ),
            Err(e) => format!("cannot run umount: {e}"),
        };
        if let Some(l) = self.log {
            l.info(msg);
        }
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

/// What is mounted at `point`: its source device, canonical (a `/dev/disk/by-label/...` or
/// `/dev/mapper/...` link resolved), or None.
pub fn mounted_at(point: &Path) -> Option<PathBuf> {
    let point = fs::canonicalize(point).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on a point is the one in use.
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mp = unescape(left.split(' ').nth(4)?);
        if Path::new(&mp) != point {
            return None;
        }
        let src = unescape(right.split(' ').nth(1)?);
        Some(fs::canonicalize(&src).unwrap_or_else(|_| PathBuf::from(src)))
    })
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

/// Is `device` mounted at `point`?
pub fn is_mounted(device: &str, point: &Path) -> bool {
    let link = match device.split_once('=') {
        Some(("LABEL", l)) => format!("/dev/disk/by-label/{l}"),
        Some(("UUID", u)) => format!("/dev/disk/by-uuid/{u}"),
        _ => device.to_string(),
    };
    let dev = fs::canonicalize(&link).unwrap_or_else(|_| PathBuf::from(device));
    mounted_at(point).is_some_and(|d| d == dev)
}

/// Mount the job's AutomountDevice at AutomountPoint unless it is mounted there already.
/// None when the job has no automount or the device was mounted already.
pub fn mount<'a>(job: &Job, log: Option<&'a JobLog>) -> Result<Option<Mounted<'a>>> {
    let Some(a) = &job.automount else {
        return Ok(None);
    };
    let dev = a.device.as_str();
    let point = PathBuf::from(a.point.to_string_lossy().trim_end_matches('/'));
    if is_mounted(dev, &point) {
        return Ok(None);
    }
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
        // mount may have mounted before it was stopped: that is undone as after a run.
        drop(is_mounted(dev, &point).then_some(Mounted { point: point.clone(), unmount: a.unmount, log }));
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
    Ok(Some(Mounted { point, unmount: a.unmount, log }))
}

/// The job's disk mounted for a command that changes its archives (`--cleanup`, `--delete-job`,
/// `--rename-job`, `--move-archive`, an ESXi restore's mark in another job of the VM):
/// unmounted when the guard drops if affa mounted it and AutoUnmount=yes, as after a run; a
/// disk that cannot be mounted fails the command before it does anything (it changed the
/// configuration alone: the archives stayed on the disk under the old name, for the next job of
/// that name to take over and rotate away).
pub fn mount_for_command(job: &Job) -> Result<Option<Mounted<'static>>> {
    mount(job, None)
}

/// Run `f` with the job's disk mounted (Affa 3's `--disk-usage`): unmounted after, if affa
/// mounted it, whatever AutoUnmount says. Without automount, just `f`.
pub fn with_mounted<T>(job: &Job, f: impl FnOnce() -> T) -> T {
    let m = mount(job, None).ok().flatten().map(|mut m| {
        m.unmount = true;
        m
    });
    let r = f();
    drop(m);
    r
}
