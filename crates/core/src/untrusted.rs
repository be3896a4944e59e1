//! What a host sends, made safe to use on the backup server: the one rule for names and paths
//! that come from a host, opening a file a host made without following a symlink, creating
//! directories below a root without following one, and host text made harmless for a terminal,
//! a log line or an INI value. docs/SECURITY.md says where each is used.
//!
//! Owns: [`SafeName`] and [`SafeRelPath`] (built only by validation: every name a host gives
//! that affa turns into a local path, e.g. an ESXi datastore, VM directory or file name),
//! [`check_archive_rel`] (the structure rule for paths read back from an archive, whose names
//! rsync wrote and may hold any byte but `/` and NUL), [`open_regular`], [`create_dir_beneath`],
//! [`lstat_beneath`] (a path below an archive whose directories on the way are real ones),
//! [`escape_controls`], [`terminal_safe`], [`TerminalSafe`] and [`ini_value`].
//!
//! Must never: accept an empty name, `.`, `..`, a `/`, NUL or a control character in a
//! [`SafeName`]; follow a symlink where a host could have planted one; open a fifo or device a
//! host made (an open could block or have effects); panic on any input.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Longest name accepted (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Longest relative path accepted (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Why `s` is not a safe single name, if it is not.
fn name_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("it is empty")
    } else if s == "." || s == ".." {
        Some("it is '.' or '..'")
    } else if s.contains('/') {
        Some("it contains '/'")
    } else if s.contains('\0') {
        Some("it contains NUL")
    } else if s.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if s.len() > MAX_NAME {
        Some("it is longer than 255 bytes")
    } else {
        None
    }
}

/// A host's value for an error message: control characters escaped, at most 200 characters.
pub fn shown(s: &str) -> String {
    let mut e = escape_controls(s).into_owned();
    if e.chars().count() > 200 {
        e = e.chars().take(200).collect::<String>() + "...";
    }
    e
}

fn refuse(what: &str, s: &str, why: &str) -> Error {
    Error::new(format!(
        "refusing {what} \"{}\" sent by the host: {why}; expected a plain name (no '/', '.', '..', NUL or control characters)",
        shown(s)
    ))
}

/// One file or directory name a host gave, safe to join to a local directory: not empty, not
/// `.` or `..`, no `/`, NUL or control character, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SafeName(String);

impl SafeName {
    /// Validate `s`; `what` names it in the error ("datastore name").
    pub fn new(what: &str, s: &str) -> Result<SafeName> {
        match name_problem(s) {
            None => Ok(SafeName(s.to_string())),
            Some(why) => Err(refuse(what, s, why)),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<Path> for SafeName {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl std::fmt::Display for SafeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A relative path a host gave (`dir/sub`), every component a [`SafeName`]; may be empty (the
/// directory itself) only when built with [`SafeRelPath::new_or_empty`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SafeRelPath(String);

impl SafeRelPath {
    /// Validate `s` (no leading or trailing `/`, no empty component).
    pub fn new(what: &str, s: &str) -> Result<SafeRelPath> {
        if s.len() > MAX_PATH {
            return Err(refuse(what, s, "it is longer than 4096 bytes"));
        }
        if s.starts_with('/') {
            return Err(refuse(what, s, "it is an absolute path"));
        }
        for c in s.split('/') {
            if let Some(why) = name_problem(c) {
                return Err(refuse(what, s, &format!("its part \"{}\" is not a plain name: {why}", shown(c))));
            }
        }
        Ok(SafeRelPath(s.to_string()))
    }
    /// Like [`new`](Self::new), but the empty string (no directory) is accepted too.
    pub fn new_or_empty(what: &str, s: &str) -> Result<SafeRelPath> {
        if s.is_empty() {
            Ok(SafeRelPath(String::new()))
        } else {
            SafeRelPath::new(what, s)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl AsRef<Path> for SafeRelPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

/// The structure rule for a path read back from an archive or an index (names rsync wrote: any
/// byte but `/` and NUL): relative, not empty, no `.`, `..` or root component.
pub fn check_archive_rel(rel: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ok = rel.components().count() > 0
        && rel.components().all(|c| matches!(c, Component::Normal(_)))
        && !rel.as_os_str().as_bytes().contains(&0)
        && rel.as_os_str().len() <= MAX_PATH;
    if !ok {
        crate::bail!(
            "invalid path in archive \"{}\": expected a relative path without '..'",
            shown(&rel.to_string_lossy())
        );
    }
    Ok(())
}

/// Open a file a host made for reading, only if it is a regular file: a symlink is not followed
/// (`O_NOFOLLOW`), a fifo or device is not opened at all (`lstat` first, `O_NONBLOCK`), and the
/// opened file must be the one checked.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let md = fs::symlink_metadata(path)?;
    if !md.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a regular file", kind_of(&md))));
    }
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let m2 = f.metadata()?;
    if !m2.is_file() || m2.ino() != md.ino() || m2.dev() != md.dev() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the file was replaced while it was opened"));
    }
    Ok(f)
}

/// "a symlink", "a directory", ... for messages.
pub fn kind_of(md: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// `root/rel`, creating the missing directories (mode 0777 less the umask); every existing
/// component must be a real directory (a symlink a host planted is refused, never followed).
/// `root` itself is trusted.
pub fn create_dir_beneath(root: &Path, rel: &Path) -> Result<PathBuf> {
    dir_beneath(root, rel, 0o777)
}

/// [`create_dir_beneath`], creating the missing directories with mode 0700.
pub fn create_private_dir_beneath(root: &Path, rel: &Path) -> Result<PathBuf> {
    dir_beneath(root, rel, 0o700)
}

fn dir_beneath(root: &Path, rel: &Path, mode: u32) -> Result<PathBuf> {
    Ok(dirs_beneath(root, rel, Some(mode))?.unwrap_or_else(|| root.join(rel)))
}

/// `lstat` of `root/rel` where every directory on the way (each component of `rel` but the
/// last) is checked with `lstat` to be a real directory: a symlink (or file) a host planted
/// there is refused, never followed. `rel` itself may be anything, a symlink too (it is not
/// followed either). `Ok(None)`: it, or a directory on the way, does not exist. `root` itself
/// is trusted. For a path read from an archive that another program (rsync, a walk) then
/// resolves as given.
pub fn lstat_beneath(root: &Path, rel: &Path) -> Result<Option<fs::Metadata>> {
    if dirs_beneath(root, rel.parent().unwrap_or(Path::new("")), None)?.is_none() {
        return Ok(None);
    }
    let p = root.join(rel);
    match fs::symlink_metadata(&p) {
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("cannot stat {}", p.display())),
    }
}

/// `root/rel` where every component of `rel` is a real directory (`lstat`, never followed); a
/// missing one is created with mode `create`, or (None: nothing is written) ends the walk with
/// `Ok(None)`.
fn dirs_beneath(root: &Path, rel: &Path, create: Option<u32>) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    let verb = if create.is_some() { "write" } else { "read" };
    let mut p = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            crate::bail!(
                "refusing to {} \"{}\" below {}: not a plain relative path",
                if create.is_some() { "create" } else { "read" },
                shown(&rel.to_string_lossy()),
                root.display()
            );
        };
        p.push(n);
        loop {
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => break,
                Ok(md) => crate::bail!(
                    "refusing to {verb} through {}: it is {}, not a directory (made by the source host?)",
                    p.display(),
                    kind_of(&md)
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let Some(mode) = create else { return Ok(None) };
                    match fs::DirBuilder::new().mode(mode).create(&p) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e).ctx(|| format!("cannot create {}", p.display())),
                    }
                }
                Err(e) => return Err(e).ctx(|| format!("cannot stat {}", p.display())),
            }
        }
    }
    Ok(Some(p))
}

/// Every control character of `s` written as `\xNN` (or `\u{N}` above U+00FF); the rest as is.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    escape_except(s, &[])
}

/// [`escape_controls`], keeping newlines and tabs (multi-line text for a terminal).
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    escape_except(s, &['\n', '\t'])
}

/// A character that is escaped when host text is shown: the control characters, and the
/// invisible ones that change how a line is laid out (the bidirectional overrides, embeddings,
/// isolates and marks, and the line and paragraph separators): a host's name holding U+202E
/// would show another name than the one it is, and U+2028 would start a new line of a log.
pub fn is_escaped_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_except<'a>(s: &'a str, keep: &[char]) -> Cow<'a, str> {
    if !s.chars().any(|c| is_escaped_char(c) && !keep.contains(&c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_escaped_char(c) && !keep.contains(&c) {
            let n = c as u32;
            if n <= 0xff {
                out.push_str(&format!("\\x{n:02x}"));
            } else {
                out.push_str(&format!("\\u{{{n:x}}}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A host's value for an INI file affa writes (the VM record, `.affa-esxi.ini`): refused when it holds a
/// control character (a newline would inject keys or sections).
pub fn ini_value<'a>(what: &str, v: &'a str) -> Result<&'a str> {
    if v.chars().any(char::is_control) {
        crate::bail!(
            "refusing {what} \"{}\" sent by the host: it contains a control character (a newline would add lines to the VM record)",
            shown(v)
        );
    }
    Ok(v)
}

/// A writer that escapes control characters (all but newline and tab, C1 included) and the
/// invisible layout characters of [`is_escaped_char`] on their way to a terminal, so that
/// nothing a host sent can move the cursor, retitle the window, reorder or break what is shown.
pub struct TerminalSafe<W: Write> {
    inner: W,
    /// The start of a UTF-8 sequence that may be an escaped character, across writes.
    pending: Vec<u8>,
}

impl<W: Write> TerminalSafe<W> {
    pub fn new(inner: W) -> TerminalSafe<W> {
        TerminalSafe { inner, pending: Vec::new() }
    }
}

/// What the bytes of `p` are, as the start of an escaped multi-byte character.
enum Seq {
    /// The whole UTF-8 encoding of an escaped character (its code point).
    Whole(u32),
    /// The start of one.
    Start,
    /// Not an escaped character.
    No,
}

fn escaped_seq(p: &[u8]) -> Seq {
    match p {
        [0xc2, b @ 0x80..=0x9f] => Seq::Whole(*b as u32),
        [0xd8, 0x9c] => Seq::Whole(0x061c),
        [0xe2, 0x80, b @ (0x8e | 0x8f | 0xa8..=0xae)] => Seq::Whole(0x2000 + (*b as u32 - 0x80)),
        [0xe2, 0x81, b @ 0xa6..=0xa9] => Seq::Whole(0x2040 + (*b as u32 - 0x80)),
        [0xc2] | [0xd8] | [0xe2] | [0xe2, 0x80] | [0xe2, 0x81] => Seq::Start,
        _ => Seq::No,
    }
}

/// Escape `buf` (C0, DEL, C1 as UTF-8 `C2 80..9F`, and the layout characters of
/// [`is_escaped_char`]) into `out`; `pending` carries the start of such a character across calls.
pub fn escape_bytes(buf: &[u8], pending: &mut Vec<u8>, out: &mut Vec<u8>) {
    for &b in buf {
        escape_byte(b, pending, out);
    }
}

fn escape_byte(b: u8, pending: &mut Vec<u8>, out: &mut Vec<u8>) {
    pending.push(b);
    match escaped_seq(pending) {
        Seq::Whole(n) => {
            pending.clear();
            if n <= 0xff {
                out.extend_from_slice(format!("\\x{n:02x}").as_bytes());
            } else {
                out.extend_from_slice(format!("\\u{{{n:x}}}").as_bytes());
            }
        }
        Seq::Start => {}
        Seq::No if pending.len() > 1 => {
            // The bytes before `b` were not the start of an escaped character after all: they
            // go out as they are, and `b` is looked at on its own.
            pending.pop();
            out.append(pending);
            escape_byte(b, pending, out);
        }
        Seq::No => {
            pending.clear();
            match b {
                b'\n' | b'\t' => out.push(b),
                0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                _ => out.push(b),
            }
        }
    }
}

impl<W: Write> Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 8);
        escape_bytes(buf, &mut self.pending, &mut out);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.inner.write_all(&rest)?;
        }
        self.inner.flush()
    }
}

impl<W: Write> Drop for TerminalSafe<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["datastore1", "fast & big", "vm 1", "a.b", "...", "é", "-x", "x\\y"] {
            assert_eq!(SafeName::new("n", good).unwrap().as_str(), good);
        }
        for bad in ["", ".", "..", "/etc", "a/b", "a\0b", "a\nb", "\u{1b}[2J", "a\u{9b}b", &"x".repeat(256)] {
            let e = SafeName::new("datastore name", bad).unwrap_err().to_string();
            assert!(e.contains("datastore name") && !e.contains('\n') && !e.contains('\u{1b}'), "{e}");
        }
        assert_eq!(SafeRelPath::new("d", "a/b c/d").unwrap().as_str(), "a/b c/d");
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a/\n"] {
            assert!(SafeRelPath::new("d", bad).is_err(), "{bad:?}");
        }
        assert!(SafeRelPath::new_or_empty("d", "").unwrap().is_empty());
        assert!(check_archive_rel(Path::new("a/new\nline")).is_ok());
        for bad in ["", "/a", "a/../b", "..", "./a"] {
            assert!(check_archive_rel(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_controls("a\u{1b}]0;x\u{7}b\n"), "a\\x1b]0;x\\x07b\\x0a");
        assert_eq!(terminal_safe("a\tb\nc\rd\u{9b}"), "a\tb\nc\\x0dd\\x9b");
        assert!(matches!(terminal_safe("plain"), Cow::Borrowed(_)));
        let mut v = Vec::new();
        {
            let mut w = TerminalSafe::new(&mut v);
            w.write_all(b"x\x1b[31m\xc2").unwrap();
            w.write_all(b"\x9bA\xc2\xa9\n").unwrap();
        }
        assert_eq!(String::from_utf8(v).unwrap(), "x\\x1b[31m\\x9bA\u{a9}\n");
        // The invisible layout characters: a right-to-left override would show "gpj.exe" as
        // "exe.jpg"; a line separator would start a new log line.
        assert_eq!(escape_controls("a\u{202e}gpj.exe\u{2028}b\u{2067}"), "a\\u{202e}gpj.exe\\u{2028}b\\u{2067}");
        assert_eq!(shown("x\u{200f}\u{61c}y"), "x\\u{200f}\\u{61c}y");
        // ... also through the terminal writer, split anywhere across writes, while the
        // characters that share their first bytes pass ("\u{2022}" bullet, "\u{2069}"'s
        // neighbour "\u{206a}", "\u{d8}"+"\u{9c}" are not one character).
        let text = "1\u{202e}2\u{2022}3\u{2069}4\u{206a}5\u{61c}6\u{600}7\u{2029}\u{80}é";
        let want = "1\\u{202e}2\u{2022}3\\u{2069}4\u{206a}5\\u{61c}6\u{600}7\\u{2029}\\x80é";
        for split in 0..=text.len() {
            let mut v = Vec::new();
            {
                let mut w = TerminalSafe::new(&mut v);
                w.write_all(&text.as_bytes()[..split]).unwrap();
                w.write_all(&text.as_bytes()[split..]).unwrap();
            }
            assert_eq!(String::from_utf8(v).unwrap(), want, "split at {split}");
        }
        // A start byte left at the end goes out as it came.
        let mut v = Vec::new();
        TerminalSafe::new(&mut v).write_all(b"a\xe2\x80").unwrap();
        assert_eq!(v, b"a\xe2\x80");
        assert!(ini_value("VM name", "vm\n[x]").is_err());
        assert_eq!(ini_value("VM name", "vm 1 & co").unwrap(), "vm 1 & co");
    }

    #[test]
    fn files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink(d.path().join("f"), d.path().join("l")).unwrap();
        assert!(open_regular(&d.path().join("f")).is_ok());
        assert!(open_regular(&d.path().join("l")).is_err());
        assert!(open_regular(d.path()).is_err());
        let out = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(out.path(), d.path().join("link")).unwrap();
        assert!(create_dir_beneath(d.path(), Path::new("link/x")).is_err());
        assert!(create_dir_beneath(d.path(), Path::new("../x")).is_err());
        assert_eq!(create_dir_beneath(d.path(), Path::new("a/b")).unwrap(), d.path().join("a/b"));
        assert!(d.path().join("a/b").is_dir());
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn lstat_beneath_reads_through_real_directories_only_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        fs::create_dir_all(out.path().join("x")).unwrap();
        fs::write(out.path().join("x/secret"), "s").unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/f"), "x").unwrap();
        std::os::unix::fs::symlink(out.path(), d.path().join("a/link")).unwrap();
        for rel in ["a/link/x", "a/link/x/secret", "a/f/x"] {
            let e = lstat_beneath(d.path(), Path::new(rel)).unwrap_err().to_string();
            let on_the_way = d.path().join(if rel.starts_with("a/f") { "a/f" } else { "a/link" });
            assert!(e.contains(&on_the_way.display().to_string()) && e.contains("not a directory"), "{e}");
        }
        // The last component is not followed: a link is reported as one.
        assert!(lstat_beneath(d.path(), Path::new("a/link")).unwrap().unwrap().file_type().is_symlink());
        assert!(lstat_beneath(d.path(), Path::new("a/b")).unwrap().unwrap().is_dir());
        assert!(lstat_beneath(d.path(), Path::new("a/missing/x")).unwrap().is_none());
        assert!(lstat_beneath(d.path(), Path::new("a/b/missing")).unwrap().is_none());
        assert!(lstat_beneath(d.path(), Path::new("../x")).is_err());
        assert!(!d.path().join("a/missing").exists(), "nothing is created");
    }
}
