//! The one way affa replaces a file: a temp file in the same directory, created exclusively
//! (`O_EXCL|O_NOFOLLOW|O_CLOEXEC`) under an unpredictable name with its final mode from the
//! start, written, fsynced, renamed over the destination, the directory fsynced.
//!
//! Owns: writing a whole file (reports, journals, manifests, configuration edits, the cron file,
//! the Samba includes, the metrics text file, installed files) so that a reader sees the old
//! contents or the new, never a part. Must never: follow a symlink (a planted temp name cannot be
//! followed: the name is random and created exclusively; a symlink at the destination is
//! refused, not written through), make the contents readable by anyone the final mode does not
//! allow even for a moment (no chmod after the fact), or leave its temp file behind on failure.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{IoContext, Result};

/// The mode of the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Exactly this mode (e.g. 0o600 for anything holding a secret, 0o644 for the cron file).
    Mode(u32),
    /// The existing file's mode and owner (a configuration edit), or this mode for a new file.
    KeepOr(u32),
}

/// Replace `path` with `data` atomically (see the module header). The directory must exist.
pub fn write_atomic(path: &Path, data: &[u8], perm: Perm) -> Result<()> {
    write_atomic_with(path, perm, |f| f.write_all(data))
}

/// [`write_atomic`] with the contents written by `fill` into the (already private) temp file.
pub(crate) fn write_atomic_with(path: &Path, perm: Perm, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let Some(name) = path.file_name() else {
        bail!("cannot write {}: it does not name a file", path.display());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dirfd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(io::Error::from)
        .ctx(|| format!("cannot write {}: cannot open its directory", path.display()))?;
    let existing = match rustix::fs::statat(&dirfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st),
        Err(rustix::io::Errno::NOENT) => None,
        Err(e) => return Err(io::Error::from(e)).ctx(|| format!("cannot write {}", path.display())),
    };
    if let Some(st) = &existing {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => bail!(
                "{} is a symbolic link; affa does not write through it (remove it, then run again)",
                path.display()
            ),
            _ => bail!("{} exists and is not a regular file; expected a file affa may replace", path.display()),
        }
    }
    let (mode, owner) = match (perm, &existing) {
        (Perm::KeepOr(_), Some(st)) => (st.st_mode & 0o777, Some((st.st_uid, st.st_gid))),
        (Perm::KeepOr(m) | Perm::Mode(m), _) => (m & 0o777, None),
    };
    let (tmp, fd) = create_temp(&dirfd, &name.to_string_lossy(), mode)
        .ctx(|| format!("cannot write {}: cannot create a temp file in {}", path.display(), dir.display()))?;
    let res = (|| -> io::Result<()> {
        if let Some((uid, gid)) = owner {
            if rustix::process::geteuid().is_root() {
                let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
                rustix::fs::fchown(&fd, Some(u), Some(g))?;
            }
        }
        // Created with the owner bits only; now exactly the final mode (umask does not apply).
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        let mut f = File::from(fd);
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        rustix::fs::renameat(&dirfd, &tmp, &dirfd, name)?;
        rustix::fs::fsync(&dirfd)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = rustix::fs::unlinkat(&dirfd, &tmp, AtFlags::empty());
    }
    res.ctx(|| format!("cannot write {}", path.display()))
}

/// A new file `.NAME.affa-RANDOM` in `dir`, created exclusively with the owner bits of `mode`.
fn create_temp(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<(String, OwnedFd)> {
    let short: String = name.chars().take(100).collect();
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..16 {
        let tmp = format!(".{short}.affa-{}", random_hex()?);
        match rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(mode & 0o700)) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(rustix::io::Errno::EXIST) => last = io::Error::from(rustix::io::Errno::EXIST),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

/// 12 random bytes as 24 hex digits (a name no other process can guess).
pub fn random_hex() -> io::Result<String> {
    let mut b = [0u8; 12];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Flush every file of the file system that holds `dir` to disk (`syncfs(2)`), and report a
/// write-back error the kernel recorded for it since (Linux 5.8 and later): what rsync wrote
/// (it never fsyncs) is durable once this returns.
/// (The kernel reports a write-back error to descriptors opened before it: open `dir` before
/// the writes, and call [`sync_filesystem_of`], to see theirs.)
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx(|| format!("cannot open {}", dir.display()))?;
    sync_filesystem_of(&f, dir)
}

/// [`sync_filesystem`] through a descriptor opened earlier (`shown` names it in the error).
pub fn sync_filesystem_of(f: &File, shown: &Path) -> Result<()> {
    rustix::fs::syncfs(f)
        .map_err(io::Error::from)
        .ctx(|| format!("cannot flush the file system of {} to disk (syncfs)", shown.display()))
}

/// Create `dir` (and its parents) with mode 0700 when it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Every regular file under a directory (symlinks are not followed), sorted; a directory that
/// does not exist has none.
pub fn walk_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    walk_files_but(dir, &[])
}

/// [`walk_files`], not entering the directories named in `skip` (paths as `dir.join(...)` gives
/// them).
pub fn walk_files_but(dir: &Path, skip: &[&Path]) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(|| format!("cannot read {}", d.display())),
        };
        for e in rd {
            let e = e.ctx(|| format!("cannot read {}", d.display()))?;
            let ft = e.file_type().ctx(|| format!("cannot stat {}", e.path().display()))?;
            if ft.is_dir() {
                let p = e.path();
                if !skip.contains(&p.as_path()) {
                    stack.push(p);
                }
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Write `text` to `path` atomically with the given mode, creating the parent directory.
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
    }
    write_atomic(path, text.as_bytes(), Perm::Mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_temp_file_is_private_from_its_creation_and_nothing_else_appears() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("esx.conf");
        fs::write(&p, "ESXiPassword=old\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let mut seen = Vec::new();
        write_atomic_with(&p, Perm::KeepOr(0o644), |f| {
            // While the secret is being written: every file in the directory is private.
            assert_eq!(f.metadata()?.mode() & 0o7777, 0o600);
            for e in fs::read_dir(d.path())? {
                let e = e?;
                seen.push(e.file_name().to_string_lossy().into_owned());
                assert_eq!(mode(&e.path()) & 0o077, 0, "{} is readable by others", e.path().display());
            }
            f.write_all(b"ESXiPassword=new\n")
        })
        .unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let tmp = seen.iter().find(|n| *n != "esx.conf").unwrap();
        assert!(tmp.starts_with(".esx.conf.affa-") && tmp.len() == ".esx.conf.affa-".len() + 24, "{tmp}");
        assert_eq!(fs::read_to_string(&p).unwrap(), "ESXiPassword=new\n");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "temp file left behind");
    }

    #[test]
    fn modes_are_kept_or_given_exactly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"1", Perm::KeepOr(0o600)).unwrap();
        assert_eq!(mode(&p), 0o600);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"2", Perm::KeepOr(0o600)).unwrap();
        assert_eq!(mode(&p), 0o640);
        write_atomic(&p, b"3", Perm::Mode(0o644)).unwrap();
        assert_eq!((mode(&p), fs::read(&p).unwrap()), (0o644, b"3".to_vec()));
        // The mode is set on the descriptor: the umask (022 here) does not narrow it.
        write_atomic(&p, b"4", Perm::Mode(0o755)).unwrap();
        assert_eq!(mode(&p), 0o755);
    }

    #[test]
    fn a_symlink_at_the_destination_is_refused_and_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let p = d.path().join("affa.prom");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = write_atomic(&p, b"metrics", Perm::Mode(0o644)).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{} is a symbolic link; affa does not write through it (remove it, then run again)", p.display())
        );
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        fs::remove_file(&p).unwrap();
        fs::create_dir(&p).unwrap();
        let e = write_atomic(&p, b"metrics", Perm::Mode(0o644)).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, "old").unwrap();
        let e = write_atomic_with(&p, Perm::Mode(0o600), |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, format!("cannot write {}: disk full", p.display()));
        assert_eq!(fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        let e = write_atomic(&d.path().join("no/such/dir/f"), b"x", Perm::Mode(0o600)).unwrap_err().to_string();
        assert!(e.contains("cannot open its directory"), "{e}");
    }
}
