//! `affa --mount JOB [ARCHIVE] DIR` and `affa --umount DIR`: the archives of a job as a
//! read-only FUSE file system (the `fuser` crate, mounted by the kernel's `fuse` driver).
//!
//! Owns: mounting a [`view::View`] (the logic, testable without the kernel) with the options
//! `ro,nodev,nosuid`, answering every write operation with `EROFS`, detaching once the mount is
//! ready (a child in its own process group; the parent returns when the child says the mount
//! is up, or with the child's error), ending cleanly on SIGTERM / SIGINT / SIGHUP (unmount; lazy
//! when a file is still open, the open files keep reading until closed) and on an unmount from
//! outside, and `--umount`, which unmounts only an affa mount. Must never: write to RootDir,
//! unmount a file system that is not an affa mount, or print (the caller gets errors; the
//! detach protocol writes one line to the parent's pipe, [`detached_ready`]).

pub mod view;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::config::Config;
use crate::error::{IoContext, Result};
use crate::{archive, chunk, interrupt};
use view::{Attr, Kind, View};

/// The subtype of the mount (`fuse.affa` when mounted through fusermount3; a mount made by
/// root directly shows `fuse` with the source `affa:JOB`).
pub const SUBTYPE: &str = "affa";
/// The environment variable that tells a detached child to report readiness on its stdout.
pub const READY_ENV: &str = "AFFA_MOUNT_READY";
/// How long the kernel may cache names and attributes (archives change only by rotation).
const TTL: Duration = Duration::from_secs(1);

struct Fs(View);

fn ts((s, n): (i64, u32)) -> std::time::SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, n.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let kind = match a.kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: ts(a.atime),
        mtime: ts(a.mtime),
        ctime: ts(a.ctime),
        crtime: ts(a.mtime),
        kind,
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.0.open(ino.0, write) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.0.readdir(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let kind = file_attr(&Attr {
                        ino: e.ino,
                        kind: e.kind,
                        size: 0,
                        blocks: 0,
                        perm: 0,
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        atime: (0, 0),
                        mtime: (0, 0),
                        ctime: (0, 0),
                    })
                    .kind;
                    if reply.add(INodeNo(e.ino), offset + i as u64 + 1, kind, &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.0.releasedir(fh.0);
        reply.ok();
    }

    // Every operation that would change the archive: refused (the mount is also `ro`).
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

/// The directory a mount shows and how: (path, whole job).
fn source(cfg: &Config, job: &str, archive_name: Option<&str>) -> Result<(PathBuf, bool, PathBuf)> {
    let j = cfg.job(job)?;
    let job_dir = j.job_dir();
    let pool = j.root_dir().join(chunk::POOL_DIR);
    match archive_name {
        Some(name) => Ok((archive::find(&job_dir, job, name)?.path, false, pool)),
        None => {
            if !job_dir.is_dir() {
                crate::bail!("job {job} has no archives yet ({} does not exist)", job_dir.display());
            }
            Ok((job_dir, true, pool))
        }
    }
}

/// Mount the archives of `job` (or its archive `archive_name`) at `dir` and serve until it is
/// unmounted or a signal (SIGTERM, SIGINT, SIGHUP) ends it. `ready` is called once the mount
/// is usable.
pub fn mount(cfg: &Config, job: &str, archive_name: Option<&str>, dir: &Path, ready: impl FnOnce()) -> Result<()> {
    // The job's AutomountDevice, mounted and held for the mount's life: a run ending meanwhile
    // leaves it mounted; the disk is unmounted when this mount ends (as after a run).
    let _disk = crate::automount::mount_for_command(cfg.job(job)?, &cfg.lock_dir())?;
    let (src, whole_job, pool) = source(cfg, job, archive_name)?;
    let md = std::fs::metadata(dir).ctx(|| format!("--mount: cannot use {} as the mount point", dir.display()))?;
    if !md.is_dir() {
        crate::bail!("--mount: {} is not a directory (the mount point must be one)", dir.display());
    }
    let log = std::sync::Mutex::new(crate::joblog::JobLog::new(&cfg.log_dir(), job, Default::default()));
    let log = Box::new(move |line: &str| {
        if let Ok(l) = log.lock() {
            l.error(line);
        }
    });
    let view = View::new(job, &src, whole_job, pool.is_dir().then_some(pool.as_path()), log)
        .ctx(|| format!("cannot open {}", src.display()))?;
    view.start_read_ahead(2);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName(format!("affa:{job}")),
        MountOption::Subtype(SUBTYPE.to_string()),
    ];
    config.n_threads = Some(4);
    interrupt::install();
    let session = fuser::Session::new(Fs(view), dir, &config).ctx(|| format!("cannot mount {}", dir.display()))?;
    let bg = session.spawn().ctx(|| format!("cannot serve the mount {}", dir.display()))?;
    ready();
    let mut unmounted = false;
    while !bg.guard.is_finished() {
        if interrupt::interrupted() && !unmounted {
            unmounted = true;
            // A file still open: detach (lazy); the open files read on until they are closed.
            if let Err(e) = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::empty()) {
                if e != rustix::io::Errno::INVAL {
                    let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bg.join().ctx(|| format!("the mount {} ended with an error", dir.display()))
}

/// Start `exe args... --foreground` as a detached child (own process group, cwd `/`, no
/// terminal) and wait until it says the mount is ready; its error otherwise.
pub fn spawn_detached(exe: &Path, args: &[std::ffi::OsString]) -> Result<()> {
    let mut child = Command::new(exe)
        .args(args)
        .arg("--foreground")
        .env(READY_ENV, "1")
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot start {}", exe.display()))?;
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(());
    }
    let mut e = String::new();
    let _ = child.stderr.take().expect("piped").read_to_string(&mut e);
    let _ = child.wait();
    let last = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("the mount process ended without a reason");
    crate::bail!("{}", last.strip_prefix("affa: error: ").unwrap_or(last))
}

/// In a detached child: tell the parent the mount is ready (one line on stdout, the pipe), then
/// point stdout and stderr at /dev/null so nothing blocks on a parent that is gone.
pub fn detached_ready() {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = out.write_all(b"ready\n");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
}

/// The mount points of affa mounts: FUSE mounts by root whose source is `affa:JOB` (as
/// /proc/self/mountinfo shows them).
pub fn affa_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(parse_mountinfo_line).filter(is_affa).map(|m| m.0).collect()
}

/// (mount point, file-system type, source, super options) of one mountinfo line.
fn parse_mountinfo_line(l: &str) -> Option<(PathBuf, String, String, String)> {
    let f: Vec<&str> = l.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-")?;
    let (fstype, src, opts) = (f.get(sep + 1)?, f.get(sep + 2)?, f.get(sep + 3).unwrap_or(&""));
    Some((PathBuf::from(unescape_octal(f.get(4)?)), fstype.to_string(), src.to_string(), opts.to_string()))
}

fn is_affa((_, fstype, src, opts): &(PathBuf, String, String, String)) -> bool {
    (fstype == "fuse" || fstype == "fuse.affa") && src.starts_with("affa:") && opts.split(',').any(|o| o == "user_id=0")
}

/// A mountinfo path (`\NNN` escapes decoded, as `automount` reads them).
fn unescape_octal(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(crate::automount::unescape_bytes(s))
}

/// `--umount DIR`: unmount the affa mount at `dir` (only an affa mount). With a file still open
/// the mount is detached (lazy): it ends when the last open file is closed.
pub fn umount(dir: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(dir).ctx(|| format!("--umount: cannot find {}", dir.display()))?;
    if !affa_mounts().contains(&abs) {
        crate::bail!("--umount: {} is not an affa mount (see /proc/mounts)", abs.display());
    }
    match rustix::mount::unmount(&abs, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => Ok(format!("{} unmounted", abs.display())),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(&abs, rustix::mount::UnmountFlags::DETACH)
                .map_err(std::io::Error::from)
                .ctx(|| format!("cannot unmount {}", abs.display()))?;
            Ok(format!("{} detached: a file there is still open; the mount ends when it is closed", abs.display()))
        }
        Err(e) => Err(std::io::Error::from(e)).ctx(|| format!("cannot unmount {}", abs.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let l = "36 35 0:31 / /mnt/a\\040b ro,nosuid,nodev - fuse affa:web ro,user_id=0,group_id=0";
        let m = parse_mountinfo_line(l).unwrap();
        assert_eq!(m.0, PathBuf::from("/mnt/a b"));
        assert!(is_affa(&m));
        let other = "36 35 0:31 / /mnt/b rw - fuse.sshfs affa:web rw,user_id=1000";
        assert!(!is_affa(&parse_mountinfo_line(other).unwrap()));
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }
}
