//! Scrubbing of a chunk pool: pool entries read back, decoded and hashed, a slice a day.
//!
//! Owns: which entries a scrub reads (day `D` of a `days`-day cycle reads the entries with
//! `id[0] % days == D % days`, so that `days` consecutive daily scrubs read every entry once,
//! with no state kept), and taking an entry that fails its check out of the pool, so that the
//! next backup of that data stores it afresh (a backup only does the cheap check of a chunk its
//! previous manifest lists at the same index: docs/FORMAT.md, "damage rule").
//! Must never: modify an entry, delete anything but an entry that failed its full check (and
//! only while the path still names the inode that failed), touch an archive (archives keep
//! their links to a damaged inode; `verify_archive` names their files), or follow a symlink.

use super::{blob, id_hex, parse_id, ChunkId, Pool, Progress};
use crate::error::{IoContext, Result};
use crate::untrusted::kind_of;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Which entries a scrub reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// Every entry.
    All,
    /// Day `day` (days since the epoch) of a cycle of `days` days (> 0).
    Day { day: u64, days: u64 },
}

impl Slice {
    /// Whether the entry of `id` belongs to this slice.
    pub fn holds(&self, id: &ChunkId) -> bool {
        match *self {
            Slice::All => true,
            Slice::Day { day, days } => days <= 1 || id[0] as u64 % days == day % days,
        }
    }
}

/// A pool entry that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub id: ChunkId,
    /// Why: "does not decode", "hashes to another id", a read error.
    pub reason: String,
    /// The damaged inode (archives that link it share it).
    pub dev: u64,
    pub ino: u64,
    /// Taken out of the pool (false: the path named another inode by then, or the removal failed).
    pub removed: bool,
}

/// What `scrub` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Entries read and checked.
    pub checked: u64,
    /// Entries of the pool outside the slice (not read).
    pub skipped: u64,
    /// Stored (compressed) bytes read.
    pub bytes_read: u64,
    pub damaged: Vec<Damaged>,
}

/// Read, decode and hash every entry of `slice`; take the damaged ones out of the pool.
/// `progress` gets the stored bytes read so far. Entries a concurrent sweep removes are
/// skipped; an entry a concurrent backup replaces by a good copy is left in place.
pub fn scrub(pool: &Pool, slice: Slice, progress: Progress) -> Result<ScrubReport> {
    let mut rep = ScrubReport::default();
    let dir = pool.dir();
    let mut fans: Vec<(String, PathBuf)> = Vec::new();
    for fan in fs::read_dir(dir).ctx(|| format!("cannot read pool {}", dir.display()))? {
        let fan = fan.ctx(|| format!("cannot read pool {}", dir.display()))?;
        let name = fan.file_name().to_string_lossy().into_owned();
        let is_fan = name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if is_fan && fan.file_type().is_ok_and(|t| t.is_dir()) {
            fans.push((name, fan.path()));
        }
    }
    fans.sort();
    let (mut raw, mut out) = (Vec::new(), Vec::new());
    let max = blob::HEADER_LEN as u64 + super::MAX_CHUNK_SIZE as u64 + (1 << 20);
    for (name, path) in fans {
        let mut names: Vec<_> = fs::read_dir(&path)
            .ctx(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            let Some(id) = n.to_str().and_then(parse_id) else { continue };
            if !id_hex(&id).starts_with(&name) {
                continue;
            }
            if !slice.holds(&id) {
                rep.skipped += 1;
                continue;
            }
            let entry = pool.entry(&id);
            // What stands at the entry's name (never followed): a backup trusts only a regular
            // file, so anything else, or a file that cannot be opened or read, is damage the
            // scrub reports; it is never skipped silently.
            let md = match fs::symlink_metadata(&entry) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // swept meanwhile
                Err(e) => {
                    rep.checked += 1;
                    let reason = format!("cannot be examined: {e}");
                    rep.damaged.push(Damaged { id, reason, dev: 0, ino: 0, removed: false });
                    continue;
                }
            };
            rep.checked += 1;
            // An error that says nothing of the entry's bytes (out of descriptors or memory, a
            // network file system's hiccup: ESTALE, ENOTCONN) is reported, the entry kept:
            // evicted, a good chunk would be stored again by the next backups beside the copy
            // the archives keep. Any other error (EIO, a file system's checksum or corruption
            // error) is damage.
            let mut transient = false;
            let mut io_reason = |what: &str, e: std::io::Error| {
                transient = super::transient_io(&e);
                Some(format!("{what}: {e}{}", if transient { " (kept: the error may pass)" } else { "" }))
            };
            let reason = match crate::untrusted::open_regular(&entry) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    rep.checked -= 1;
                    continue; // swept meanwhile
                }
                Err(_) if !md.file_type().is_file() => Some(format!("is {}, not a chunk file", kind_of(&md))),
                Err(e) => io_reason("cannot be opened", e),
                Ok(f) => {
                    raw.clear();
                    let read = f.take(max + 1).read_to_end(&mut raw);
                    rep.bytes_read += raw.len() as u64;
                    if let Some(p) = progress {
                        p(rep.bytes_read);
                    }
                    match read {
                        Err(e) => io_reason("cannot be read", e),
                        Ok(_) if raw.len() as u64 > max => Some("is larger than a chunk file can be".to_string()),
                        Ok(_) => match blob::decode(&raw, &mut out) {
                            Err(_) => Some("does not decode".to_string()),
                            Ok(_) if blake3::hash(&out).as_bytes() != &id => Some("hashes to another id".to_string()),
                            Ok(_) => None,
                        },
                    }
                }
            };
            let Some(reason) = reason else { continue };
            // Remove it only while the path still names the inode that failed (a backup may
            // have replaced it by a good copy since); a directory is left (remove_file refuses
            // it) and reported as not removed.
            let same = fs::symlink_metadata(&entry).is_ok_and(|m| m.ino() == md.ino() && m.dev() == md.dev());
            let removed = !transient && same && !md.is_dir() && fs::remove_file(&entry).is_ok();
            if removed {
                super::pool::fsync_dir(&path)?;
            }
            rep.damaged.push(Damaged { id, reason, dev: md.dev(), ino: md.ino(), removed });
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Something other than a chunk file at an entry's name (a symlink a local user or a bad
    /// restore left, a directory) is reported, never skipped: a backup would not trust it either.
    /// The symlink is removed (not what it points to); the directory is reported, left.
    #[test]
    fn what_is_not_a_chunk_file_at_an_entry_name_is_reported_never_skipped() {
        let t = tempfile::tempdir().unwrap();
        let pool = Pool::open(t.path()).unwrap();
        let (a, b) = ([0xabu8; 32], [0xcdu8; 32]);
        let target = t.path().join("elsewhere");
        fs::write(&target, b"not yours").unwrap();
        for id in [&a, &b] {
            fs::create_dir_all(pool.entry(id).parent().unwrap()).unwrap();
        }
        std::os::unix::fs::symlink(&target, pool.entry(&a)).unwrap();
        fs::create_dir(pool.entry(&b)).unwrap();
        let r = scrub(&pool, Slice::All, None).unwrap();
        assert_eq!(r.checked, 2, "{r:?}");
        assert_eq!(r.damaged.len(), 2, "{r:?}");
        let da = r.damaged.iter().find(|d| d.id == a).unwrap();
        assert_eq!((da.reason.as_str(), da.removed), ("is a symlink, not a chunk file", true));
        let db = r.damaged.iter().find(|d| d.id == b).unwrap();
        assert_eq!((db.reason.as_str(), db.removed), ("is a directory, not a chunk file", false));
        assert!(fs::symlink_metadata(pool.entry(&a)).is_err(), "the symlink is still in the pool");
        assert_eq!(fs::read(&target).unwrap(), b"not yours", "the symlink's target was touched");
        assert!(pool.entry(&b).is_dir());
    }
}
