//! Restore straight from the offsite bucket (`affa --full-restore JOB [ARCHIVE] --from-offsite`,
//! docs/RESTORE.md "Restore from the offsite bucket"): the archive's plain files (the small files,
//! the manifests, the report, the VM record) are rebuilt from their chunk objects
//! (`offsiteParallel` files at a time) in a private staging directory that the restore reads as
//! the archive, and the chunks of its chunked files (the disks) are read from the bucket through
//! [`BucketChunks`] as the restore needs them: the chunked files are never copied to this box
//! first.
//!
//! The chunks of a chunked file are fetched `offsiteParallel` at a time ([`ChunkSource::parallel`];
//! at its default 1, the store's default: the cores up to 8): the store's reader runs that many
//! GETs ahead of its consumer, in manifest order, and hands the chunks on in order; it holds at most about 4 x offsiteParallel chunks (decoded and raw), so
//! memory stays below 8 x offsiteParallel x chunkSize (`crates/store` restore.rs `for_each_chunk`).
//! The first missing or damaged object stops the other readers (the GETs in flight finish).
//!
//! Through affa-agent every chunk is checked before anything is sent (`verify_all`), then sent
//! as the agent asks: [`Fetched::keep_checked`] keeps each chunk file the check downloaded (the
//! opened chunk file, decoded and hashed again when it is read back) in a private directory in
//! the staging directory, so that each chunk object is downloaded once. It keeps a chunk only
//! while the filesystem keeps [`KEEP_RESERVE`] free after it; the chunks it could not keep are
//! downloaded again when sent (and said so).
//!
//! `affa --unchunk JOB ARCHIVE --from-offsite` writes the same files, chunked ones rebuilt, to a
//! new directory that is kept.
//!
//! Owns: choosing the offsite archive a restore names, the staging directory (made private,
//! removed when the restore ends), writing the plain files there, the kept chunk files, and the
//! chunk source of the bucket. Must never: trust the index (it comes from the bucket): write
//! outside the staging directory (paths checked by `index.rs`, every parent a real directory made
//! here, never a symbolic link followed), write more plain bytes than the filesystem has free,
//! keep a plain file whose chunks did not open under their names and hash to their ids, or hand
//! on a chunk object it did not open (the restore code decodes and hashes every chunk, a kept one
//! too, before it is used).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::archive::{self, Archive};
use crate::chunk::{self, ChunkId, ChunkRef, ChunkSource, ProblemKind};
use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::observer::Watch;

use super::crypt::Keys;
use super::index::{escape, Entry, Index};
use super::s3::Store;
use super::MAX_SEALED_CHUNK;

/// What a kept chunk file must leave free on the filesystem of the staging directory.
pub const KEEP_RESERVE: u64 = 256 << 20;

/// The chunk objects of a bucket prefix, read as a restore asks for them (GET, opened under
/// their names with the key; the reader decodes and checks each against its id), `parallel`
/// at a time by the store's reader.
pub struct BucketChunks {
    store: Store,
    keys: Keys,
    /// offsiteParallel.
    parallel: usize,
    /// Set by [`Fetched::keep_checked`]: where the chunks read are kept.
    keep: OnceLock<Keep>,
}

/// The chunk files kept in a restore from the bucket, by id.
struct Keep {
    dir: PathBuf,
    slots: Mutex<KeepState>,
    /// Wakes the readers waiting for a chunk another reader is fetching.
    ready: Condvar,
}

#[derive(Default)]
struct KeepState {
    /// Chunks being fetched (false) or kept in `dir` (true).
    slots: HashMap<ChunkId, bool>,
    /// Chunk files kept and their bytes.
    kept: u64,
    bytes: u64,
    /// Why keeping stopped (the filesystem filled up, a write failed): later chunks are not kept.
    stopped: Option<String>,
}

impl BucketChunks {
    /// GET and open the object of chunk `id`.
    fn get(&self, id: &ChunkId) -> std::result::Result<Vec<u8>, ProblemKind> {
        let name = self.keys.chunk_name(id);
        #[cfg(feature = "test-hooks")]
        let _counted = test_hooks::Get::start(&name);
        match self.store.get_at_most(&name, MAX_SEALED_CHUNK) {
            Ok(None) => Err(ProblemKind::Missing),
            Err(e) => Err(ProblemKind::Damaged(format!("cannot be read: {e}"))),
            Ok(Some(sealed)) => self.keys.open(&name, &sealed).map_err(ProblemKind::Damaged),
        }
    }

    /// Keep the chunk file `raw` of `id` in `k.dir` unless keeping stopped or the filesystem
    /// would keep less than [`KEEP_RESERVE`] free (keeping stops then). Whether it was kept.
    fn keep_one(k: &Keep, id: &ChunkId, raw: &[u8]) -> bool {
        if k.slots.lock().map(|s| s.stopped.is_some()).unwrap_or(true) {
            return false;
        }
        let path = k.dir.join(chunk::id_hex(id));
        let tmp = k.dir.join(format!("{}.tmp", chunk::id_hex(id)));
        let r = free_bytes(&k.dir).map_err(|e| e.to_string()).and_then(|free| {
            if free < raw.len() as u64 + KEEP_RESERVE {
                return Err(format!(
                    "{} has {} free; a kept chunk must leave {}",
                    k.dir.display(),
                    crate::fmt::human(free),
                    crate::fmt::human(KEEP_RESERVE)
                ));
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            std::io::Write::write_all(&mut f, raw).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            fs::rename(&tmp, &path).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
        });
        match r {
            Ok(()) => {
                if let Ok(mut s) = k.slots.lock() {
                    s.kept += 1;
                    s.bytes += raw.len() as u64;
                }
                true
            }
            Err(why) => {
                let _ = fs::remove_file(&tmp);
                if let Ok(mut s) = k.slots.lock() {
                    s.stopped.get_or_insert(why);
                }
                false
            }
        }
    }

    /// The chunk `id` through the kept chunks: the kept file when there is one (waiting for
    /// another reader fetching it), else fetched and kept.
    fn read_kept(&self, k: &Keep, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
        let mut s = k.slots.lock().map_err(|_| ProblemKind::Damaged("a reader failed".into()))?;
        loop {
            match s.slots.get(id) {
                Some(true) => {
                    drop(s);
                    let p = k.dir.join(chunk::id_hex(id));
                    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&p).map_err(|e| {
                        ProblemKind::Damaged(format!("was kept in {} and cannot be read: {e}", p.display()))
                    })?;
                    raw.clear();
                    std::io::Read::read_to_end(&mut std::io::Read::take(f, chunk::MAX_CHUNK_FILE_LEN + 1), raw)
                        .map_err(|e| {
                            ProblemKind::Damaged(format!("was kept in {} and cannot be read: {e}", p.display()))
                        })?;
                    return Ok(());
                }
                Some(false) => s = k.ready.wait(s).map_err(|_| ProblemKind::Damaged("a reader failed".into()))?,
                None => break,
            }
        }
        s.slots.insert(*id, false);
        drop(s);
        let r = self.get(id);
        let kept = match &r {
            Ok(plain) => Self::keep_one(k, id, plain),
            Err(_) => false,
        };
        if let Ok(mut s) = k.slots.lock() {
            if kept {
                s.slots.insert(*id, true);
            } else {
                s.slots.remove(id);
            }
        }
        k.ready.notify_all();
        *raw = r?;
        Ok(())
    }
}

impl ChunkSource for BucketChunks {
    fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
        match self.keep.get() {
            Some(k) => self.read_kept(k, id, raw),
            None => {
                *raw = self.get(id)?;
                Ok(())
            }
        }
    }

    fn place(&self, id: &ChunkId) -> Option<String> {
        Some(format!("offsite object {}", self.keys.chunk_name(id)))
    }

    /// offsiteParallel GETs at once; at its default 1, the reader's own default (the cores).
    fn parallel(&self) -> Option<usize> {
        (self.parallel > 1).then_some(self.parallel)
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

impl Fetched {
    /// From now on, keep each chunk read (after the first download) in a private directory in
    /// the staging directory, so that a restore through affa-agent, which checks every chunk of
    /// `manifests` before it sends them, downloads each chunk object once. Returns what the
    /// chunks of `manifests` take at most (their decoded size) for the log.
    pub fn keep_checked(&self, manifests: &[PathBuf]) -> Result<String> {
        let Some(staging) = &self.staging else { bail!("offsite chunks can be kept only in a restore's staging") };
        let mut seen = std::collections::HashSet::new();
        let mut need = 0u64;
        for mp in manifests {
            let m = chunk::read_manifest(mp)?;
            for (i, c) in m.chunks.iter().enumerate() {
                if let ChunkRef::Stored(id) = c {
                    if seen.insert(*id) {
                        need += m.chunk_len(i) as u64;
                    }
                }
            }
        }
        let dir = staging.join("checked-chunks");
        if self.chunks.keep.get().is_none() {
            fs::DirBuilder::new().mode(0o700).create(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
            let _ = self.chunks.keep.set(Keep { dir: dir.clone(), slots: Mutex::default(), ready: Condvar::new() });
        }
        Ok(format!(
            "each chunk checked is kept in {} until it is sent ({} chunk(s), at most {} decoded; {} free)",
            dir.display(),
            seen.len(),
            crate::fmt::human(need),
            crate::fmt::human(free_bytes(&dir)?)
        ))
    }

    /// What was kept, and why keeping stopped if it did (its later chunks are downloaded again
    /// when they are sent): (kept, bytes, why stopped).
    pub fn kept(&self) -> (u64, u64, Option<String>) {
        match self.chunks.keep.get().and_then(|k| k.slots.lock().ok()) {
            Some(s) => (s.kept, s.bytes, s.stopped.clone()),
            None => (0, 0, None),
        }
    }
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

/// The name of a restore's staging directory in the job's directory (`PREFIX.PID`).
const STAGING_PREFIX: &str = ".offsite-restore.";

/// Open the job's bucket prefix (a wrong key is refused), choose the offsite archive and write
/// its plain files to a private staging directory in the job's directory. The caller holds the
/// job's lock: the staging directory another restore of the job left (killed: no drop removed
/// it, with the chunks it kept) is removed first.
pub fn fetch(job: &Job, name: Option<&str>, watch: &Watch) -> Result<Fetched> {
    archive::remove_leftover_dirs(&job.job_dir(), STAGING_PREFIX);
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
            let staging = job.job_dir().join(format!("{STAGING_PREFIX}{}", std::process::id()));
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
    // Made here, exclusively (a --to directory that appeared since the check above is an
    // error, and never removed: it is not affa's).
    if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&root) {
        if to.is_none() {
            let _ = archive::remove_tree(&staging);
        }
        return Err(e).ctx(|| format!("cannot create {}", root.display()));
    }
    // Until it is complete, the directory goes when this is dropped (an error on the way).
    let mut fetched = Fetched {
        archive: Archive { level, index, path: root.clone(), report: None },
        chunks: BucketChunks { store, keys, parallel: 1, keep: OnceLock::new() },
        shown,
        date: idx.date.clone(),
        staging: Some(staging),
    };
    let parallel = super::settings(job)?.parallel.max(1) as usize;
    fetched.chunks.parallel = parallel;
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
    // The default target is in the job's directory: on its AutomountDevice, mounted for the
    // command. (With --to, the disk is not needed: a lost disk is what this command is for.)
    let _disk = match to {
        None => crate::automount::mount_for_command(j, &cfg.lock_dir())?,
        Some(_) => None,
    };
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

/// Counting the chunk GETs of a restore (feature `test-hooks` only).
#[cfg(feature = "test-hooks")]
mod test_hooks {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

    /// A chunk GET under way. With `AFFA_TEST_OFFSITE_GETS=FILE`, each chunk GET appends the
    /// line `NAME IN_FLIGHT` (the GETs under way, this one included) to FILE when it starts and
    /// lasts at least 50 ms (so that GETs meant to overlap do).
    pub struct Get(bool);

    impl Get {
        pub fn start(name: &str) -> Get {
            let n = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
            let Some(path) = std::env::var_os("AFFA_TEST_OFFSITE_GETS") else { return Get(false) };
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
                let _ = f.write_all(format!("{name} {n}\n").as_bytes());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            Get(true)
        }
    }

    impl Drop for Get {
        fn drop(&mut self) {
            let _ = self.0;
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
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
