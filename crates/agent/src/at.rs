//! Paths on the host, opened relative to directory descriptors: the `*at` system calls the
//! backup and the restore use, and [`open_dir`], the walk to the directory of a file the agent
//! reads or writes as root on a host whose users are not trusted.
//!
//! Owns: the walk from `/` one component at a time with `O_NOFOLLOW`, a symlink on the way
//! followed only when root owns it (ESXi's `/vmfs/volumes/<datastore name>` is root's link to
//! the volume) or the user the agent runs as, at most [`MAX_LINKS`] of them. A user who owns a directory on the way could
//! otherwise replace it with a symlink to `/etc` between affa's checks and the agent's open:
//! the restore would write (or the backup read) as root through it. Must never: follow a
//! symlink that neither root nor the agent's user owns, or open a fifo or device in a
//! directory's place (nor wait on one).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};

/// Symlinks followed in one walk at most (as the kernel's limit).
pub const MAX_LINKS: usize = 40;

pub fn cstr(b: &[u8]) -> CString {
    // Paths from affa hold no NUL (checked when decoded); names derived from them neither.
    CString::new(b).unwrap_or_default()
}

/// `openat(dir, name, flags, mode)` as a `File` (`O_CLOEXEC` added).
pub fn openat(dir: &File, name: &[u8], flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(name);
    // SAFETY: openat(2) with a valid descriptor and a NUL-terminated name that outlives the call;
    // the descriptor it returns is owned by the new File alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned by anything else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: &File, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name);
    // SAFETY: a zeroed `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat(2) writes only into `st`; the name is NUL-terminated and outlives the call.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `readlinkat(dir, name)`.
fn readlink_at(dir: &File, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(name);
    let mut buf = vec![0u8; 4096];
    // SAFETY: readlinkat(2) writes at most `buf.len()` bytes into `buf`; the name is
    // NUL-terminated and outlives the call.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // A target that fills the buffer may be cut: refused rather than followed half.
    if n as usize >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn open_root() -> io::Result<File> {
    let c = cstr(b"/");
    // SAFETY: open(2) of a NUL-terminated constant path; the descriptor is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is not owned by anything else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Open the directory `path` (absolute), following only root's symlinks (and the agent's
/// user's) on the way (see the module's comment). Errors: `NotFound` for a missing component, `ENOTDIR` for a component
/// that is neither a directory nor a symlink, `PermissionDenied` naming a symlink root does not
/// own, `ELOOP` past [`MAX_LINKS`].
pub fn open_dir(path: &[u8]) -> io::Result<File> {
    if path.first() != Some(&b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path"));
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let mut dir = open_root()?;
    // Components still to walk, the next one last; `shown` is the path walked so far.
    let mut todo: Vec<Vec<u8>> = path.split(|&b| b == b'/').rev().map(<[u8]>::to_vec).collect();
    let mut shown: Vec<u8> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c.is_empty() || c == b"." {
            continue;
        }
        // A directory the agent may pass but not list (0711, an agent that is not root):
        // walked through with O_PATH; the last one is opened for reading below.
        let opened = match openat(&dir, &c, flags, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => openat(&dir, &c, libc::O_PATH | flags, 0),
            r => r,
        };
        match opened {
            Ok(d) => {
                dir = d;
                shown.push(b'/');
                shown.extend_from_slice(&c);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                let st = lstat_at(&dir, &c)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
                }
                let mut link = shown.clone();
                link.push(b'/');
                link.extend_from_slice(&c);
                // SAFETY: geteuid(2) cannot fail.
                let me = unsafe { libc::geteuid() };
                if st.st_uid != 0 && st.st_uid != me {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is a symlink owned by uid {}, not root: not followed (a user of the host could point it anywhere)",
                            String::from_utf8_lossy(&link),
                            st.st_uid
                        ),
                    ));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = readlink_at(&dir, &c)?;
                if target.first() == Some(&b'/') {
                    dir = open_root()?;
                    shown.clear();
                }
                todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
            }
            Err(e) => return Err(e),
        }
    }
    // The directory itself is read and written through this descriptor: a real open (an O_PATH
    // one of a directory the agent may not list fails here, as it did before the walk).
    openat(&dir, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino(f: &File) -> u64 {
        f.metadata().unwrap().ino()
    }

    #[test]
    fn walks_root_symlinks_and_refuses_others() {
        let t = tempfile::tempdir().unwrap();
        let p = |s: &str| t.path().join(s);
        std::fs::create_dir_all(p("real/sub")).unwrap();
        std::fs::create_dir_all(p("elsewhere")).unwrap();
        std::os::unix::fs::symlink(p("real"), p("abs")).unwrap();
        std::os::unix::fs::symlink("real/sub", p("rel")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", p("real/up")).unwrap();
        let open = |s: &str| open_dir(p(s).as_os_str().as_encoded_bytes());
        let real = std::fs::File::open(p("real/sub")).unwrap();
        let am_root = rustix_uid() == 0;
        if am_root {
            assert_eq!(ino(&open("abs/sub").unwrap()), ino(&real));
            assert_eq!(ino(&open("rel").unwrap()), ino(&real));
            assert_eq!(ino(&open("real/up").unwrap()), ino(&File::open(p("elsewhere")).unwrap()));
            assert_eq!(ino(&open("real/./sub/..").unwrap()), ino(&File::open(p("real")).unwrap()));
            // A user's symlink: refused, naming it.
            std::os::unix::fs::symlink(p("elsewhere"), p("users")).unwrap();
            let c = cstr(p("users").as_os_str().as_encoded_bytes());
            // SAFETY: lchown(2) of a NUL-terminated path.
            assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
            let e = open("users").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("users is a symlink owned by uid 65534"), "{e}");
        } else {
            // Not root: the symlinks made here are the agent's own user's: followed.
            assert_eq!(ino(&open("abs/sub").unwrap()), ino(&real));
        }
        // A file or a fifo in a directory's place; a missing directory; a loop.
        std::fs::write(p("file"), b"x").unwrap();
        assert_eq!(open("file/x").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(open("missing/x").unwrap_err().kind(), io::ErrorKind::NotFound);
        let fifo = cstr(p("fifo").as_os_str().as_encoded_bytes());
        // SAFETY: mkfifo(3) of a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(open("fifo").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        if am_root {
            std::os::unix::fs::symlink("loop", p("loop")).unwrap();
            assert_eq!(open("loop").unwrap_err().raw_os_error(), Some(libc::ELOOP));
        }
        assert_eq!(open_dir(b"relative").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    fn rustix_uid() -> u32 {
        // SAFETY: getuid(2) cannot fail.
        unsafe { libc::getuid() }
    }
}
