//! The one error type of the library.
//!
//! Owns: turning every failure into a single line a sysadmin can act on (what, where, what was
//! expected), and saying what kind of failure it is ([`ErrorKind`]) so callers decide on the
//! kind, never on the message text. Must never: carry a backtrace to the user, or hold a secret
//! (passwords are never formatted into an error).

use std::fmt;
use std::io;
use std::sync::Arc;

/// What kind of failure an [`Error`] is. Callers branch on this, never on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The configuration (or a command-line value) is wrong: fix it and run again.
    Config,
    /// A file system affa writes to is full (ENOSPC).
    DiskFull,
    /// A signal (SIGINT, SIGTERM, SIGHUP) stopped the work.
    Interrupted,
    /// The other side failed or refused: ssh, rsync on the source, the ESXi host.
    Remote,
    /// Stored data is damaged: a chunk or manifest fails its check.
    Damaged,
    /// Any other I/O failure, with the kind the operating system gave.
    Io(io::ErrorKind),
    /// Everything else.
    Other,
}

impl ErrorKind {
    /// The kind of an io error: ENOSPC is [`ErrorKind::DiskFull`], an io error that carries an
    /// [`Error`] (a `Read` implementation's failure) has that error's kind, the rest keep their
    /// io kind.
    pub fn of_io(e: &io::Error) -> ErrorKind {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
            inner.kind
        } else if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull {
            ErrorKind::DiskFull
        } else {
            ErrorKind::Io(e.kind())
        }
    }
}

/// A failure with a one-line, user-facing message, a kind and (optionally) the error it came
/// from. The message already contains the source's text: [`fmt::Display`] shows the message only.
#[derive(Debug, Clone)]
pub struct Error {
    msg: String,
    kind: ErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of kind [`ErrorKind::Other`].
    pub fn new(msg: impl Into<String>) -> Self {
        Error { msg: msg.into(), kind: ErrorKind::Other, source: None }
    }
    /// An error of the given kind.
    pub fn of(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error { msg: msg.into(), kind, source: None }
    }
    /// A configuration error ([`ErrorKind::Config`]).
    pub fn config(msg: impl Into<String>) -> Self {
        Error::of(ErrorKind::Config, msg)
    }
    /// A failure of the other side ([`ErrorKind::Remote`]).
    pub fn remote(msg: impl Into<String>) -> Self {
        Error::of(ErrorKind::Remote, msg)
    }
    /// Damaged stored data ([`ErrorKind::Damaged`]).
    pub fn damaged(msg: impl Into<String>) -> Self {
        Error::of(ErrorKind::Damaged, msg)
    }
    /// Work stopped by a signal ([`ErrorKind::Interrupted`]).
    pub fn interrupted(msg: impl Into<String>) -> Self {
        Error::of(ErrorKind::Interrupted, msg)
    }
    /// `msg` caused by the io error `e`: the kind is `e`'s ([`ErrorKind::of_io`]), `e` the source.
    /// The message is used as given (it usually ends with `e`'s text already).
    pub fn io(msg: impl Into<String>, e: io::Error) -> Self {
        Error { msg: msg.into(), kind: ErrorKind::of_io(&e), source: Some(Arc::new(e)) }
    }
    pub fn message(&self) -> &str {
        &self.msg
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn is_disk_full(&self) -> bool {
        self.kind == ErrorKind::DiskFull
    }
    /// The same error with another kind.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }
    /// The same error, caused by `source` (the message is unchanged).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    /// Prefix the message with context ("while doing X: ..."); kind and source are kept.
    pub fn context(self, ctx: impl fmt::Display) -> Self {
        Error { msg: format!("{ctx}: {}", self.msg), ..self }
    }
}

/// Two errors are equal when message and kind are (the source is not compared).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.msg == other.msg && self.kind == other.kind
    }
}
impl Eq for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::io(e.to_string(), e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand: `bail!("format", args)` returns an `Error` of kind [`ErrorKind::Other`];
/// `bail!(Config, "format", args)` one of the named [`ErrorKind`] (Config, Remote, Damaged,
/// Interrupted, DiskFull).
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)+) => {
        return Err($crate::error::Error::of($crate::error::ErrorKind::$kind, format!($($arg)+)))
    };
    ($($arg:tt)*) => { return Err($crate::error::Error::new(format!($($arg)*))) };
}

/// Attach a path to an io error: "cannot read /x/y: No such file or directory". The error keeps
/// the io error's kind ([`ErrorKind::of_io`]) and has it as its source.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(format!("{}: {}", what(), e), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn io_errors_keep_their_kind_message_and_source() {
        let e: Error = io::Error::from_raw_os_error(libc::ENOENT).into();
        assert_eq!(e.kind(), ErrorKind::Io(io::ErrorKind::NotFound));
        assert_eq!(e.message(), io::Error::from_raw_os_error(libc::ENOENT).to_string());
        let src = e.source().expect("a source").downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(src.raw_os_error(), Some(libc::ENOENT));

        let r: std::result::Result<(), io::Error> = Err(io::Error::from_raw_os_error(libc::EACCES));
        let e = r.ctx(|| "cannot read /x/y".into()).unwrap_err();
        assert_eq!(e.message(), "cannot read /x/y: Permission denied (os error 13)");
        assert_eq!(e.kind(), ErrorKind::Io(io::ErrorKind::PermissionDenied));
        // Context keeps kind and source.
        let e = e.context("job web");
        assert_eq!(e.message(), "job web: cannot read /x/y: Permission denied (os error 13)");
        assert_eq!(e.kind(), ErrorKind::Io(io::ErrorKind::PermissionDenied));
        assert!(e.source().is_some());
    }

    #[test]
    fn enospc_is_disk_full() {
        let r: std::result::Result<(), io::Error> = Err(io::Error::from_raw_os_error(libc::ENOSPC));
        let e = r.ctx(|| "cannot write /r/x".into()).unwrap_err();
        assert!(e.is_disk_full(), "{e:?}");
        assert_eq!(e.message(), "cannot write /r/x: No space left on device (os error 28)");
        assert!(Error::from(io::Error::from(io::ErrorKind::StorageFull)).is_disk_full());
        assert!(!Error::from(io::Error::from_raw_os_error(libc::EIO)).is_disk_full());
    }

    #[test]
    fn an_error_carried_through_io_keeps_its_kind_and_message() {
        let io = io::Error::new(io::ErrorKind::InvalidData, Error::damaged("chunk 00ab of x is damaged"));
        let e = Err::<(), _>(io).ctx(|| "cannot read x".into()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Damaged);
        assert_eq!(e.message(), "cannot read x: chunk 00ab of x is damaged");
    }

    /// A real ENOSPC from a 1 MiB tmpfs (needs root, as the test runs do; skipped otherwise).
    #[test]
    fn a_full_tmpfs_gives_disk_full() {
        use std::io::Write;
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: cannot mount a tmpfs; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount a tmpfs (no CAP_SYS_ADMIN?); skipped");
            return;
        }
        let p = dir.path().join("big");
        let res = (|| -> Result<()> {
            let mut f = std::fs::File::create(&p).ctx(|| format!("cannot create {}", p.display()))?;
            let block = vec![7u8; 64 << 10];
            for _ in 0..64 {
                f.write_all(&block).ctx(|| format!("cannot write {}", p.display()))?;
            }
            f.sync_all().ctx(|| format!("cannot sync {}", p.display()))?;
            Ok(())
        })();
        let _ = std::process::Command::new("umount").arg("-l").arg(dir.path()).status();
        let e = res.expect_err("4 MiB fit into a 1 MiB tmpfs");
        assert!(e.is_disk_full(), "{e:?}");
        assert!(e.message().starts_with(&format!("cannot write {}: ", p.display())), "{e}");
    }

    #[test]
    fn kinds_by_constructor_and_bail() {
        fn cfg() -> Result<()> {
            bail!(Config, "job {}: bad key", "web");
        }
        fn plain() -> Result<()> {
            bail!("plain {}", 1);
        }
        let e = cfg().unwrap_err();
        assert_eq!((e.kind(), e.message()), (ErrorKind::Config, "job web: bad key"));
        let e = plain().unwrap_err();
        assert_eq!((e.kind(), e.message()), (ErrorKind::Other, "plain 1"));
        assert_eq!(Error::remote("x").kind(), ErrorKind::Remote);
        assert_eq!(Error::damaged("x").kind(), ErrorKind::Damaged);
        assert_eq!(Error::interrupted("x").kind(), ErrorKind::Interrupted);
        assert_eq!(Error::new("x").with_kind(ErrorKind::Config).context("y").kind(), ErrorKind::Config);
    }
}
