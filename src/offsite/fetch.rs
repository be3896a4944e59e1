//! Restore straight from the offsite bucket (`affa --full-restore JOB [ARCHIVE] --from-offsite`,
//! docs/RESTORE.md "Restore from the offsite bucket"): the archive's plain files (the small files,
//! the manifests, the report, the VM record) are rebuilt from their chunk objects
//! (`offsiteParallel` files at a time) in a private staging directory that the restore reads as the archive, and the chunks of its chunked files
//! (the disks) are read from the bucket through [`BucketChunks`] as the restore needs them: the
//! chunked files are never copied to this box first.
//!
//! `affa --unchunk JOB ARCHIVE --from-offsite` writes the same files, chunked ones rebuilt, to a
//! new directory that is kept.
//!
//! Owns: choosing the offsite archive a restore names, the staging directory (made private,
//! removed when the restore ends), writing the plain files there, and the chunk source of the
//! bucket. Must never: trust the index (it comes from the bucket): write outside the staging
//! directory (paths checked by `index.rs`, every parent a real directory made here, never a
//! symbolic link followed), write more plain bytes than the filesystem has free, keep a plain
//! file whose chunks did not open under their names and hash to their ids, or hand on a chunk
//! object it did not open (the restore code decodes and hashes every chunk before it is used).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::archive::{self, Archive};
use crate::chunk::{self, ChunkId, ChunkRef, ChunkSource, ProblemKind};
use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::observer::Watch;

use super::crypt::Keys;
use super::index::{escape, Entry, Index};
use super::s3::Store;

/// The largest sealed chunk object read: a chunk file and the seal's header and tag.
const MAX_SEALED_CHUNK: u64 = chunk::MAX_CHUNK_FILE_LEN + 64;

/// The chunk objects of a bucket prefix, read as a restore asks for them (GET, opened under
/// their names with the key; the reader decodes and checks each against its id).
pub struct BucketChunks {
    store: Store,
    keys: Keys,
}

impl ChunkSource for BucketChunks {
    fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
        let name = self.keys.chunk_name(id);
        match self.store.get_at_most(&name, MAX_SEALED_CHUNK) {
            Ok(None) => Err(ProblemKind::Missing),
            Err(e) => Err(ProblemKind::Damaged(format!("cannot be read: {e}"))),
            Ok(Some(sealed)) => match self.keys.open(&name, &sealed) {
                Ok(plain) => {
                    *raw = plain;
                    Ok(())
                }
                Err(why) => Err(ProblemKind::Damaged(why)),
            },
        }
    }

    fn place(&self, id: &ChunkId) -> Option<String> {
        Some(format!("offsite object {}", self.keys.chunk_name(id)))
    }
}

/// An offsite archive ready to restore from: its plain files in staging, its chunks in the
/// bucket. The staging directory is removed when this is dropped.
pub struct Fetched {
    /// The staging copy of the archive's plain files (no `.affa-chunks/`).
    pub archive: Archive,
    pub chunks: BucketChunks,
    /// `s3://BUCKET/PREFIX`.
    pub shown: String,
    /// The offsite archive's Date.
    pub date: String,
    /// What is removed when this is dropped (the staging directory; none for `--unchunk`'s).
    staging: Option<PathBuf>,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Some(s) = &self.staging {
            let _ = archive::remove_tree(s);
        }
    }
}

/// The offsite archive `name` of the job (its Date, or the name it had when it was uploaded
/// when only one has that name), or the newest.
fn choose(idxs: Vec<Index>, job: &str, name: Option<&str>, shown: &str) -> Result<Index> {
    let listed = |v: &[Index]| v.iter().map(|i| format!("{} (Date {})", i.archive, i.date)).collect::<Vec<_>>();
    let all = listed(&idxs);
    let Some(n) = name else {
        return idxs
            .into_iter()
            .last()
            .ok_or_else(|| Error::new(format!("job {job} has no offsite archive in {shown}")));
    };
    let by_date: Vec<Index> = idxs.iter().filter(|i| i.date == n).cloned().collect();
    let mut found = if by_date.is_empty() { idxs.into_iter().filter(|i| i.archive == n).collect() } else { by_date };
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "job {job} has no offsite archive '{n}' in {shown}; expected the Date or the name of one of: {}",
            if all.is_empty() { "none".to_string() } else { all.join(", ") }
        ),
        _ => bail!(
            "job {job} has {} offsite archives named '{n}' in {shown}: {}; name one by its Date",
            found.len(),
            listed(&found).join(", ")
        ),
    }
}

/// Open the job's bucket prefix (a wrong key is refused), choose the offsite archive and write
/// its plain files to a private staging directory in the job's directory.
pub fn fetch(job: &Job, name: Option<&str>, watch: &Watch) -> Result<Fetched> {
    fetch_to(job, name, None, watch)
}

/// [`fetch`], into the new directory `to` (kept) when given.
fn fetch_to(job: &Job, name: Option<&str>, to: Option<&Path>, watch: &Watch) -> Result<Fetched> {
    let (store, keys, _) = super::open(job, false, false, &crate::clock::SystemClock)?;
    let shown = store.shown.clone();
    let super::Indexes { good, bad, .. } = super::indexes(&store, &keys, &job.name)?;
    if good.is_empty() && !bad.is_empty() {
        bail!(Damaged, "job {} has no offsite archive that opens in {shown}: {}", job.name, bad.join("; "));
    }
    let idx = choose(good, &job.name, name, &shown)?;
    let label = format!("offsite archive {} (Date {})", idx.archive, idx.date);
    let (level, index) = archive::parse_archive_name(&idx.archive).ok_or_else(|| {
        Error::damaged(format!("{label} in {shown}: its index names the archive '{}'; expected LEVEL.N", idx.archive))
    })?;
    let (staging, root) = match to {
        None => {
            let staging = job.job_dir().join(format!(".offsite-restore.{}", std::process::id()));
            let _ = archive::remove_tree(&staging);
            crate::fsutil::create_private_dir(&staging)?;
            let root = staging.join(format!("{}.{index}", level.name()));
            (staging, root)
        }
        Some(d) => {
            if fs::symlink_metadata(d).is_ok() {
                bail!("--to {} exists; expected a new directory for the offsite archive's files", d.display());
            }
            if let Some(p) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(p).ctx(|| format!("cannot create {}", p.display()))?;
            }
            (d.to_path_buf(), d.to_path_buf())
        }
    };
    // Until it is complete, the directory goes when this is dropped (an error on the way).
    let mut fetched = Fetched {
        archive: Archive { level, index, path: root.clone(), report: None },
        chunks: BucketChunks { store, keys },
        shown,
        date: idx.date.clone(),
        staging: Some(staging),
    };
    fs::DirBuilder::new().mode(0o700).create(&root).ctx(|| format!("cannot create {}", root.display()))?;
    let parallel = super::settings(job)?.parallel as usize;
    write_plain(&fetched.chunks, &idx, &root, &label, parallel, watch)?;
    // The report is the archive's id: the plain files are those of the archive uploaded.
    let report = root.join(crate::report::REPORT_FILE);
    let ok = fs::read(&report).map(|d| blake3::hash(&d).to_hex().to_string() == idx.id).unwrap_or(false);
    fetched.archive.report = crate::report::Report::read(&root);
    if !ok || fetched.archive.report.is_none() {
        bail!(
            Damaged,
            "{label} in {}: its {} does not match the archive id its index names; expected the report uploaded with it",
            fetched.shown,
            crate::report::REPORT_FILE
        );
    }
    Ok(fetched)
}

/// `affa --unchunk JOB ARCHIVE --from-offsite [--to DIR]`: the offsite archive (its Date, or a
/// name only one has) as files in a new directory (default `RootDir/JOB/unchunked/offsite-ARCHIVE`):
/// its plain files, and its chunked files rebuilt from the bucket's chunks (sparse, every chunk
/// and the whole file checked) in place of their manifests. On an error the directory is removed.
pub fn unchunk(cfg: &crate::config::Config, job: &str, name: &str, to: Option<&Path>, watch: &Watch) -> Result<String> {
    let j = cfg.job(job)?;
    let dest =
        to.map(Path::to_path_buf).unwrap_or_else(|| j.job_dir().join("unchunked").join(format!("offsite-{name}")));
    let mut f = fetch_to(j, Some(name), Some(&dest), watch)?;
    let root = f.archive.path.clone();
    let label = format!("offsite archive {} (Date {})", f.archive.name(), f.date);
    let mut out = String::new();
    for rel in chunk::chunked_files(&root)? {
        parents(&root, &rel, &label)?;
        let mp = chunk::manifest_path(&root, &rel);
        let m = chunk::read_manifest(&mp)?;
        let bar = watch.meter(format!("unchunk {}", rel.display()), Some(m.size));
        let cb = |n: u64| bar.set(n);
        let file = root.join(&rel);
        chunk::unchunk_file_from(&f.chunks, &mp, &file, Some(&cb))?;
        drop(bar);
        fs::remove_file(&mp).ctx(|| format!("cannot remove {}", mp.display()))?;
        out.push_str(&format!("{} ({}), verified\n", file.display(), crate::fmt::human(m.size)));
    }
    let _ = fs::remove_file(root.join(chunk::INDEX_FILE));
    out.push_str(&format!("{label} of job {job} from {}: its files are in {}\n", f.shown, root.display()));
    f.staging = None;
    Ok(out)
}

/// Free bytes for an unprivileged writer on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot read the free space of {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Make the parent directories of `rel` below `root` (mode 0700 until their own entry sets
/// theirs): each must be a real directory, never a symbolic link or a file.
fn parents(root: &Path, rel: &Path, label: &str) -> Result<()> {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => bail!(Damaged, "{label}: {} lies below an entry that is not a directory", rel.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o700).create(&p).ctx(|| format!("cannot create {}", p.display()))?
            }
            Err(e) => return Err(e).ctx(|| format!("cannot read {}", p.display())),
        }
    }
    Ok(())
}

/// Owner (when root), then mode and mtime, of the entry at `p` (not following a link).
fn set_meta(p: &Path, mode: Option<u32>, uid: u32, gid: u32, mtime: i64) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid, CWD};
    if rustix::process::geteuid().is_root() {
        rustix::fs::chownat(CWD, p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)?;
    }
    if let Some(m) = mode {
        rustix::fs::chmodat(CWD, p, Mode::from_raw_mode(m), AtFlags::empty())?;
    }
    let t = Timespec { tv_sec: mtime, tv_nsec: 0 };
    rustix::fs::utimensat(CWD, p, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Write the directories, plain files and links of the index below `root`: the directories and
/// links first (in the index's order, parents before children), then the files, `parallel` at a
/// time (offsiteParallel: many small files cost one request each).
fn write_plain(
    src: &BucketChunks,
    idx: &Index,
    root: &Path,
    label: &str,
    parallel: usize,
    watch: &Watch,
) -> Result<()> {
    let total: u64 = idx.entries.iter().map(|e| if let Entry::File { size, .. } = e { *size } else { 0 }).sum();
    let free = free_bytes(root)?;
    if total > free {
        bail!(
            "{label}: its plain files take {} and {} has {} free; expected room for them (the chunked files are read from the bucket, not copied)",
            crate::fmt::human(total),
            root.display(),
            crate::fmt::human(free)
        );
    }
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for e in &idx.entries {
        let path = match e {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Link { path, .. } => path,
        };
        let rel = Path::new(OsStr::from_bytes(path));
        if rel.components().next().is_some_and(|c| c.as_os_str() == chunk::ARCHIVE_CHUNK_DIR) {
            bail!(
                Damaged,
                "{label}: its index lists {}; expected no entry of the archive's {}",
                escape(path),
                chunk::ARCHIVE_CHUNK_DIR
            );
        }
        parents(root, rel, label)?;
        let p = root.join(rel);
        let twice = || Error::damaged(format!("{label}: its index lists {} twice", escape(path)));
        match e {
            Entry::Dir { mode, uid, gid, mtime, .. } => {
                match fs::DirBuilder::new().mode(0o700).create(&p) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) => {}
                    Err(_) => return Err(twice()),
                }
                dirs.push((p, *mode, *uid, *gid, *mtime));
            }
            Entry::Link { uid, gid, mtime, target, .. } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &p).map_err(|_| twice())?;
                set_meta(&p, None, *uid, *gid, *mtime)
                    .ctx(|| format!("cannot set the owner or time of {}", p.display()))?;
            }
            Entry::File { .. } => {
                // Made now (create_new, no link followed), in the index's order: an entry below
                // it, or listed twice, is refused here as before; its bytes come below.
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&p)
                    .map_err(|_| twice())?;
                files.push((e, p, f));
            }
        }
    }
    let bar = watch.meter(format!("fetching the plain files of {label}"), Some(total));
    // The senders take files from one list; the first error stops them (the others finish the
    // file they are on); their progress comes back here (the meter is this thread's).
    let next = std::sync::Mutex::new(files.into_iter());
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::scope(|sc| {
        for _ in 0..parallel.max(1) {
            let (next, failed, tx) = (&next, &failed, tx.clone());
            sc.spawn(move || loop {
                if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let Some((e, p, f)) = next.lock().ok().and_then(|mut n| n.next()) else { break };
                if let Err(err) = write_file(src, idx, e, &p, f, label, &|n| {
                    let _ = tx.send(n);
                }) {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(err);
                    }
                    break;
                }
            });
        }
        drop(tx);
        for n in rx {
            bar.inc(n);
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    drop(bar);
    // Directories last, deepest first: their mode may forbid writing, their mtime changes
    // with each entry made in them.
    for (p, mode, uid, gid, mtime) in dirs.into_iter().rev() {
        set_meta(&p, Some(mode), uid, gid, mtime)
            .ctx(|| format!("cannot set the owner, mode or time of {}", p.display()))?;
    }
    Ok(())
}

/// The bytes of the plain file entry `e`, made at `p` (open as `f`), from its chunk objects,
/// each checked against its id before it is written; then its owner, mode and time.
fn write_file(
    src: &BucketChunks,
    idx: &Index,
    e: &Entry,
    p: &Path,
    f: fs::File,
    label: &str,
    done: &dyn Fn(u64),
) -> Result<()> {
    let Entry::File { mode, uid, gid, mtime, size, chunks, path } = e else { return Ok(()) };
    let (mut raw, mut plain) = (Vec::new(), Vec::new());
    let cs = idx.chunk_size as u64;
    for (i, c) in chunks.iter().enumerate() {
        let off = i as u64 * cs;
        let len = size.saturating_sub(off).min(cs) as usize;
        if let ChunkRef::Stored(id) = c {
            let r = src.read(id, &mut raw).and_then(|()| {
                chunk::decode_chunk_file(&raw, &mut plain).map_err(ProblemKind::Damaged)?;
                if plain.len() != len || blake3::hash(&plain).as_bytes() != id {
                    return Err(ProblemKind::Damaged("does not hash to its chunk id".into()));
                }
                Ok(())
            });
            if let Err(k) = r {
                let why = match k {
                    ProblemKind::Missing => "is missing".to_string(),
                    ProblemKind::Damaged(w) => format!("is damaged: {w}"),
                };
                bail!(
                    Damaged,
                    "{label}: object {} (chunk {}) of {} {why}; restore stopped before anything was sent to the target",
                    src.keys.chunk_name(id),
                    chunk::id_hex(id),
                    escape(path)
                );
            }
            f.write_all_at(&plain, off).ctx(|| format!("cannot write {}", p.display()))?;
        }
        done(len as u64);
    }
    f.set_len(*size).ctx(|| format!("cannot write {}", p.display()))?;
    drop(f);
    set_meta(p, Some(*mode), *uid, *gid, *mtime)
        .ctx(|| format!("cannot set the owner, mode or time of {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(archive: &str, date: &str) -> Index {
        Index {
            job: "web".into(),
            archive: archive.into(),
            date: date.into(),
            id: "00".repeat(32),
            uploaded: "x".into(),
            chunk_size: 1 << 20,
            entries: Vec::new(),
            chunked: Vec::new(),
        }
    }

    #[test]
    fn an_offsite_archive_is_chosen_by_date_or_by_a_name_only_one_has() {
        let all = || {
            vec![idx("scheduled.0", "202612010100"), idx("daily.0", "202612020100"), idx("scheduled.0", "202612030100")]
        };
        let s = "s3://b/p";
        assert_eq!(choose(all(), "web", None, s).unwrap().date, "202612030100", "the newest");
        assert_eq!(choose(all(), "web", Some("202612010100"), s).unwrap().date, "202612010100");
        assert_eq!(choose(all(), "web", Some("daily.0"), s).unwrap().date, "202612020100");
        let e = choose(all(), "web", Some("scheduled.0"), s).unwrap_err().to_string();
        assert!(e.contains("2 offsite archives named 'scheduled.0'") && e.contains("name one by its Date"), "{e}");
        let e = choose(all(), "web", Some("weekly.1"), s).unwrap_err().to_string();
        assert!(
            e.contains("no offsite archive 'weekly.1' in s3://b/p") && e.contains("daily.0 (Date 202612020100)"),
            "{e}"
        );
        assert!(choose(Vec::new(), "web", None, s).unwrap_err().to_string().contains("has no offsite archive"));
    }

    #[test]
    fn an_entry_below_a_link_or_a_file_is_refused_and_nothing_is_made_outside() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        fs::write(root.join("f"), "x").unwrap();
        for rel in ["l/x", "l/a/b", "f/x"] {
            let e = parents(&root, Path::new(rel), "offsite archive x").unwrap_err().to_string();
            assert!(e.contains("not a directory") && e.contains(rel), "{e}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing made through the link");
        parents(&root, Path::new("d/e/f"), "x").unwrap();
        assert!(fs::symlink_metadata(root.join("d/e")).unwrap().is_dir());
    }
}
