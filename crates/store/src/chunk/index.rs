//! The manifest index `ARCHIVE/.affa-manifests`: the archive-relative paths of the files affa
//! stored as chunks in that archive, appended by affa as it writes each manifest.
//!
//! Owns: which files of an archive are chunked. Only a manifest the index lists is one; a
//! source file whose name ends in `.affa-manifest` (any machine that itself holds affa
//! archives) is an ordinary file of the backup, verified, listed and restored as such. An
//! archive without an index (made before it existed, docs/FORMAT.md) is read the old way, by
//! the file-name suffix. Must never: list a path that leaves the archive, or panic on any bytes
//! (the index is read back from an archive: untrusted input).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Name of the index at the root of an archive.
pub const INDEX_FILE: &str = ".affa-manifests";
/// First line of an index (version 1): then one path per entry, each ended by a NUL byte (a
/// file name may hold any other byte, newlines included).
const HEADER: &[u8] = b"affa-manifest-index 1\n";
/// Largest index accepted (256 MiB).
const MAX_INDEX: u64 = 256 << 20;

fn open_append(archive_root: &Path) -> Result<fs::File> {
    let p = archive_root.join(INDEX_FILE);
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .ctx(|| format!("cannot open {}", p.display()))?;
    if f.metadata().ctx(|| format!("cannot stat {}", p.display()))?.len() == 0 {
        f.write_all(HEADER).ctx(|| format!("cannot write {}", p.display()))?;
    }
    Ok(f)
}

/// Record `rel` (the chunked file's archive-relative path, not its manifest's) in the index of
/// `archive_root`, durably.
pub(crate) fn record(archive_root: &Path, rel: &Path) -> Result<()> {
    crate::untrusted::check_archive_rel(rel)?;
    let p = archive_root.join(INDEX_FILE);
    let mut f = open_append(archive_root)?;
    let mut entry = rel.as_os_str().as_bytes().to_vec();
    entry.push(0);
    f.write_all(&entry).ctx(|| format!("cannot write {}", p.display()))?;
    f.sync_data().ctx(|| format!("cannot fsync {}", p.display()))
}

/// Give the archive an index (an empty one when nothing in it is chunked), so that it is never
/// read the old way.
pub fn ensure(archive_root: &Path) -> Result<()> {
    let p = archive_root.join(INDEX_FILE);
    open_append(archive_root)?.sync_data().ctx(|| format!("cannot fsync {}", p.display()))
}

/// Parse an index: the chunked files, sorted, each once.
pub fn parse(data: &[u8]) -> Result<Vec<PathBuf>> {
    let body = data.strip_prefix(HEADER).ok_or_else(|| Error::damaged("not a manifest index (bad first line)"))?;
    let Some(body) = body.strip_suffix(&[0]) else {
        if body.is_empty() {
            return Ok(Vec::new());
        }
        return Err(Error::damaged("the manifest index is truncated (its last entry has no end)"));
    };
    let mut out = Vec::new();
    for e in body.split(|b| *b == 0) {
        let p = PathBuf::from(std::ffi::OsString::from_vec(e.to_vec()));
        crate::untrusted::check_archive_rel(&p).map_err(|e| e.context("manifest index"))?;
        out.push(p);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The chunked files of an archive (archive-relative, sorted, each once), or None when the
/// archive has no index. A damaged index is an error naming it.
pub fn read(archive_root: &Path) -> Result<Option<Vec<PathBuf>>> {
    let p = archive_root.join(INDEX_FILE);
    let f = match crate::untrusted::open_regular(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("cannot open {}", p.display())),
    };
    let mut data = Vec::new();
    f.take(MAX_INDEX + 1).read_to_end(&mut data).ctx(|| format!("cannot read {}", p.display()))?;
    if data.len() as u64 > MAX_INDEX {
        crate::bail!(Damaged, "{} is larger than 256 MiB", p.display());
    }
    parse(&data).map(Some).map_err(|e| e.context(p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        ensure(d.path()).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(vec![]));
        record(d.path(), Path::new("b/new\nline.img")).unwrap();
        record(d.path(), Path::new("a.img")).unwrap();
        record(d.path(), Path::new("a.img")).unwrap();
        assert!(record(d.path(), Path::new("../x")).is_err());
        let got = read(d.path()).unwrap().unwrap();
        assert_eq!(got, [PathBuf::from("a.img"), PathBuf::from("b/new\nline.img")]);
        for bad in [
            &b""[..],
            b"x\n",
            b"affa-manifest-index 1\na",
            b"affa-manifest-index 1\n../x\0",
            b"affa-manifest-index 1\n/x\0",
            b"affa-manifest-index 1\n\0",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
