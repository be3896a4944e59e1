//! The per-job run lock: `lockDir/JOB`, an `flock(2)` held for the whole run, with the pid
//! written inside for humans and for `--kill`.
//!
//! Owns: "is this job running, and by which pid". Must never: trust the pid alone (a stale file
//! of a dead run is taken over, because the kernel drops the flock when its holder dies), or be
//! inherited by child processes (the file is opened close-on-exec).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct JobLock {
    file: File,
    pub path: PathBuf,
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).ctx(|| format!("cannot create lock directory {}", dir.display()))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(|| format!("cannot open lock file {}", path.display()))
}

fn try_flock(f: &File) -> bool {
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

pub fn lock_path(lock_dir: &Path, job: &str) -> PathBuf {
    lock_dir.join(job)
}

/// Take the lock of `job`, or fail naming the pid that holds it.
pub fn acquire(lock_dir: &Path, job: &str) -> Result<JobLock> {
    let path = lock_path(lock_dir, job);
    let mut file = open(&path)?;
    if !try_flock(&file) {
        let pid = read_pid(&mut file).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        bail!("job {job} is already running (pid {pid}); wait for it to finish or stop it with affa --kill {job} (lock file {})", path.display());
    }
    file.set_len(0).ctx(|| format!("cannot write lock file {}", path.display()))?;
    file.rewind().ok();
    writeln!(file, "{}", std::process::id()).ctx(|| format!("cannot write lock file {}", path.display()))?;
    Ok(JobLock { file, path })
}

fn read_pid(f: &mut File) -> Option<i32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid of the run holding the lock of `job`, or None if it is not running.
pub fn holder(lock_dir: &Path, job: &str) -> Option<i32> {
    let path = lock_path(lock_dir, job);
    let mut f = File::open(&path).ok()?;
    if try_flock(&f) {
        // Nobody holds it: a stale file. Our probe lock goes away with `f`.
        return None;
    }
    read_pid(&mut f)
}

impl Drop for JobLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
