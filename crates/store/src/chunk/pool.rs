//! The shared chunk pool `RootDir/.affa-pool/` and the archive-side links `ARCHIVE/.affa-chunks/`.
//!
//! Owns: path layout (`<dir>/<first two hex digits>/<64 hex digits>`), durable creation of
//! pool entries (temp file in `.affa-pool/.tmp/`, fsync, rename), hard-linking entries into an
//! archive (`link_into`; `Linker` for the thousands of one backup, through open fan-out
//! directories: `FanDirs`), the checks of an existing entry before a backup reuses it
//! (`cheap_check`: one lstat against the length the previous manifest recorded; `full_check`:
//! read, decode, hash), and `sweep` (removing pool entries nobody links any more, and stale temp
//! files).
//! Must never: write into an existing chunk file (entries are immutable, replaced only by
//! rename), delete anything in the pool other than entries with link count 1 and old temp files,
//! or touch an archive's files except creating links in its `.affa-chunks/`.

use super::{id_hex, parse_id, ChunkId};
use crate::error::{IoContext, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Name of the pool directory under RootDir.
pub const POOL_DIR: &str = ".affa-pool";
/// Name of the chunk-link directory at the root of an archive.
pub const ARCHIVE_CHUNK_DIR: &str = ".affa-chunks";
/// Temp directory inside the pool (same filesystem, so rename is atomic).
const TMP_DIR: &str = ".tmp";
/// Temp files older than this are leftovers of a killed run; `sweep` removes them.
const STALE_TMP: Duration = Duration::from_secs(3600);

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A chunk pool directory.
#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
    /// Test hook: pretend the filesystem's hard-link limit is this.
    #[cfg(test)]
    pub(crate) link_limit: Option<u64>,
    /// Test hook: the entry of this chunk is removed just before its next link (a concurrent
    /// sweep between a check and the link).
    #[cfg(test)]
    pub(crate) vanish_once: std::sync::Arc<std::sync::Mutex<Option<ChunkId>>>,
}

impl Pool {
    /// The pool of a RootDir (`RootDir/.affa-pool`), created (mode 0700) if missing.
    pub fn open(root_dir: &Path) -> Result<Pool> {
        Pool::at(&root_dir.join(POOL_DIR))
    }

    /// A pool at an explicit directory, created (mode 0700) if missing.
    pub fn at(dir: &Path) -> Result<Pool> {
        let new = fs::symlink_metadata(dir).is_err();
        create_dir_0700(dir)?;
        if new {
            // The pool's own name, in its parent (RootDir), durable before anything names it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        create_dir_0700(&dir.join(TMP_DIR))?;
        Ok(Pool {
            dir: dir.to_path_buf(),
            #[cfg(test)]
            link_limit: None,
            #[cfg(test)]
            vanish_once: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the pool entry of `id`.
    pub fn entry(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(chunk_rel(id))
    }

    /// Durably store `blob` as the pool entry of `id`, replacing any existing entry (archives
    /// that link the old inode keep it). Records the fan-out directory in `touched`.
    pub(crate) fn write_entry(&self, id: &ChunkId, blob: &[u8], touched: &mut Vec<PathBuf>) -> Result<()> {
        // A RootDir shared by several servers (docs/OPERATIONS.md): another server's process
        // may have the same pid, so a name taken already is not an error, the next one is tried.
        let mut tmp = PathBuf::new();
        let mut f = None;
        for _ in 0..16 {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            tmp = self.dir.join(TMP_DIR).join(format!("{}-{}-{}", id_hex(id), std::process::id(), n));
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
                Ok(file) => {
                    f = Some(file);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).ctx(|| format!("cannot create {}", tmp.display())),
            }
        }
        let Some(mut f) = f else {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists))
                .ctx(|| format!("cannot create {}", tmp.display()));
        };
        let res = (|| -> Result<()> {
            f.write_all(blob).ctx(|| format!("cannot write {}", tmp.display()))?;
            f.sync_all().ctx(|| format!("cannot fsync {}", tmp.display()))?;
            let dest = self.entry(id);
            let parent = dest.parent().unwrap();
            if let Err(e) = fs::rename(&tmp, &dest) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(e).ctx(|| format!("cannot rename {} to {}", tmp.display(), dest.display()));
                }
                create_dir_0700(parent)?;
                fs::rename(&tmp, &dest).ctx(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
                // The new fan-out directory's own name, in the pool directory.
                touched.push(self.dir.clone());
            }
            touched.push(parent.to_path_buf());
            Ok(())
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Hard-link the pool entry of `id` into the archive. If the archive already has a
    /// different inode under that name, it is replaced by the pool's. Io errors are returned
    /// raw so the caller can react to EMLINK (link limit) and ENOENT (entry swept meanwhile).
    pub(crate) fn link_into(&self, id: &ChunkId, archive_root: &Path, touched: &mut Vec<PathBuf>) -> io::Result<()> {
        let src = self.entry(id);
        let dst = archive_entry(archive_root, id);
        #[cfg(test)]
        if self.vanish_once.lock().unwrap().take_if(|v| v == id).is_some() {
            fs::remove_file(&src)?;
        }
        #[cfg(test)]
        if let Some(limit) = self.link_limit {
            if fs::metadata(&src).map(|m| m.nlink() >= limit).unwrap_or(false) && !same_inode(&src, &dst) {
                return Err(io::Error::from_raw_os_error(libc::EMLINK));
            }
        }
        let parent = dst.parent().unwrap();
        let r = match fs::hard_link(&src, &dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && fs::metadata(&src).is_ok() => {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
                touched.extend(new_dir_parents(parent));
                fs::hard_link(&src, &dst)
            }
            r => r,
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !same_inode(&src, &dst) {
                    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
                    let tmp = parent.join(format!(".{}-{}-{}.tmp", id_hex(id), std::process::id(), n));
                    fs::hard_link(&src, &tmp)?;
                    if let Err(e) = fs::rename(&tmp, &dst) {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
        touched.push(parent.to_path_buf());
        Ok(())
    }
}

/// Open descriptors of the 256 fan-out directories below one directory (the pool, or an
/// archive's `.affa-chunks/`), so that a check or a link of a chunk resolves one path component
/// instead of the whole path (RootDir, the job, the archive...): the kernel's path walk was
/// about half of each carried chunk's `link(2)` (perf, 16 GiB CBT incremental), paid once per
/// chunk of the disk. Shared by the threads of one file's backup (at most 256 descriptors per
/// set, one set for the pool and one for the archive: far below the usual limit of 1024 open
/// files). A directory that cannot be opened is not remembered (it may be created later, e.g. by
/// `write_entry`). Opened with `O_NOFOLLOW`: a fan-out name that is not a directory is an
/// error, never followed.
pub(crate) struct FanDirs {
    base: PathBuf,
    fds: Vec<std::sync::OnceLock<rustix::fd::OwnedFd>>,
    /// Create a missing fan-out directory (an archive's, mode 0700) when it is first needed.
    create: bool,
    /// A fan-out directory was created: the names of the new directories (in `base`, and
    /// `base`'s own in its parent when it was created too) are to be made durable as well.
    created: std::sync::atomic::AtomicBool,
}

impl FanDirs {
    pub(crate) fn new(base: &Path, create: bool) -> FanDirs {
        FanDirs {
            base: base.to_path_buf(),
            fds: (0..256).map(|_| Default::default()).collect(),
            create,
            created: Default::default(),
        }
    }

    /// The descriptor of the fan-out directory of `id`.
    fn dir(&self, id: &ChunkId) -> io::Result<&rustix::fd::OwnedFd> {
        use rustix::fs::{Mode, OFlags};
        let slot = &self.fds[id[0] as usize];
        if let Some(fd) = slot.get() {
            return Ok(fd);
        }
        let path = self.base.join(&id_hex(id)[..2]);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(rustix::fs::CWD, &path, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if self.create => {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(&path)?;
                self.created.store(true, Ordering::Relaxed);
                rustix::fs::openat(rustix::fs::CWD, &path, flags, Mode::empty())?
            }
            r => r?,
        };
        // Another thread may have opened it meanwhile: then its descriptor is kept, ours closed.
        let _ = slot.set(fd);
        Ok(slot.get().expect("set above"))
    }

    /// `lstat` of the entry of `id` (not followed).
    pub(crate) fn stat(&self, id: &ChunkId) -> io::Result<rustix::fs::Stat> {
        let name = id_hex(id);
        Ok(rustix::fs::statat(self.dir(id)?, name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?)
    }
}

/// The two sets of fan-out directories of one file's backup: the pool's and the archive's.
pub(crate) struct LinkDirs {
    pub pool: FanDirs,
    archive: FanDirs,
}

impl LinkDirs {
    pub(crate) fn new(pool: &Pool, archive_root: &Path) -> LinkDirs {
        LinkDirs {
            pool: FanDirs::new(pool.dir(), false),
            archive: FanDirs::new(&archive_root.join(ARCHIVE_CHUNK_DIR), true),
        }
    }
}

/// Hard links of pool entries into one archive's `.affa-chunks/`, through [`LinkDirs`]; the
/// same rules as [`Pool::link_into`] (which it replaces for the many links of one archive): an
/// existing name of another inode is replaced by the pool's, io errors come back raw (EMLINK:
/// the link limit; ENOENT: the entry was swept meanwhile).
pub(crate) struct Linker<'a> {
    #[cfg_attr(not(test), allow(dead_code))]
    pool: &'a Pool,
    dirs: &'a LinkDirs,
    /// The archive fan-out directories (by first id byte) that got a new name.
    touched: Vec<bool>,
}

impl<'a> Linker<'a> {
    pub(crate) fn new(pool: &'a Pool, dirs: &'a LinkDirs) -> Linker<'a> {
        Linker { pool, dirs, touched: vec![false; 256] }
    }

    /// The archive fan-out directories that got a new name (to be fsynced before a manifest
    /// names their entries), and the directories that got a new fan-out directory.
    pub(crate) fn touched(&self) -> Vec<PathBuf> {
        let archive = &self.dirs.archive;
        let mut dirs: Vec<PathBuf> =
            (0..256).filter(|&i| self.touched[i]).map(|i| archive.base.join(format!("{i:02x}"))).collect();
        if archive.created.load(Ordering::Relaxed) {
            dirs.extend(new_dir_parents(&archive.base.join("00")));
        }
        dirs
    }

    pub(crate) fn link(&mut self, id: &ChunkId) -> io::Result<()> {
        use rustix::fs::AtFlags;
        #[cfg(test)]
        if self.pool.vanish_once.lock().unwrap().take_if(|v| v == id).is_some() {
            fs::remove_file(self.pool.entry(id))?;
        }
        let (from, to) = (&self.dirs.pool, &self.dirs.archive);
        let name = id_hex(id);
        let same = || -> io::Result<bool> {
            let a = from.stat(id)?;
            let b = to.stat(id)?;
            Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
        };
        #[cfg(test)]
        if let Some(limit) = self.pool.link_limit {
            if from.stat(id).map(|m| m.st_nlink >= limit).unwrap_or(false) && !same().unwrap_or(false) {
                return Err(io::Error::from_raw_os_error(libc::EMLINK));
            }
        }
        let from_dir = from.dir(id).map_err(|e| match e.kind() {
            // No fan-out directory in the pool: no entry either.
            io::ErrorKind::NotFound => io::Error::from(io::ErrorKind::NotFound),
            _ => e,
        })?;
        let to_dir = to.dir(id)?;
        match rustix::fs::linkat(from_dir, name.as_str(), to_dir, name.as_str(), AtFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                if !same()? {
                    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
                    let tmp = format!(".{name}-{}-{n}.tmp", std::process::id());
                    rustix::fs::linkat(from_dir, name.as_str(), to_dir, tmp.as_str(), AtFlags::empty())?;
                    if let Err(e) = rustix::fs::renameat(to_dir, tmp.as_str(), to_dir, name.as_str()) {
                        let _ = rustix::fs::unlinkat(to_dir, tmp.as_str(), AtFlags::empty());
                        return Err(e.into());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.touched[id[0] as usize] = true;
        Ok(())
    }
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The directories whose entries a newly created archive fan-out directory `fan` may have
/// added: `.affa-chunks/` (the fan-out's name) and the archive root (`.affa-chunks`' own name,
/// when it was created with it). A new name is durable only once its directory is fsynced;
/// file systems that commit it with the child's fsync (ext4, XFS) do not need it, POSIX does.
fn new_dir_parents(fan: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    fan.ancestors().skip(1).take(2).map(Path::to_path_buf)
}

pub(crate) fn create_dir_0700(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(e).ctx(|| format!("cannot create directory {}", dir.display())),
    }
}

use std::os::unix::fs::DirBuilderExt;

/// `ab/<hex>` for an id.
pub(crate) fn chunk_rel(id: &ChunkId) -> PathBuf {
    let h = id_hex(id);
    Path::new(&h[..2]).join(&h)
}

/// `ARCHIVE/.affa-chunks/ab/<hex>`.
pub(crate) fn archive_entry(archive_root: &Path, id: &ChunkId) -> PathBuf {
    archive_root.join(ARCHIVE_CHUNK_DIR).join(chunk_rel(id))
}

/// Read a whole chunk file, refusing anything larger than a chunk file can be.
pub(crate) fn read_blob(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    let f = crate::untrusted::open_regular(path)?;
    let max = super::blob::HEADER_LEN as u64 + super::MAX_CHUNK_SIZE as u64 + (1 << 20);
    buf.clear();
    f.take(max + 1).read_to_end(buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk file too large"));
    }
    Ok(())
}

/// The old cheap check of an entry (a version 1 or 2 previous manifest, which records no
/// length): the header parses and the file length matches it (catches truncation and a zeroed
/// or foreign file, not bit flips inside the payload). `Some(file length)` when it passes.
pub(crate) fn quick_check(path: &Path) -> io::Result<Option<u32>> {
    let mut f = crate::untrusted::open_regular(path)?;
    let mut h = [0u8; super::blob::HEADER_LEN];
    if f.read_exact(&mut h).is_err() {
        return Ok(None);
    }
    let len = f.metadata()?.len();
    Ok(match super::blob::parse_header(&h) {
        Ok((_, _, payload)) if len == (super::blob::HEADER_LEN + payload) as u64 => u32::try_from(len).ok(),
        _ => None,
    })
}

/// What checking an existing pool entry found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked {
    /// Usable as it is: its file length, and whether it was read, decoded and hashed.
    Good { len: u32, verified: bool },
    /// Damaged (or not a regular file): to be stored again.
    Damaged,
    /// No entry (never stored, swept, evicted), or it could not be opened: to be stored.
    Missing,
}

/// The full check of an entry: read, decoded, hashed against `id`.
pub(crate) fn full_check(path: &Path, id: &ChunkId, blob_buf: &mut Vec<u8>, decoded: &mut Vec<u8>) -> Checked {
    match read_blob(path, blob_buf) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Checked::Missing,
        Err(_) => Checked::Damaged,
        Ok(()) => {
            let good = super::blob::decode(blob_buf, decoded).is_ok() && blake3::hash(decoded).as_bytes() == id;
            match u32::try_from(blob_buf.len()) {
                Ok(len) if good => Checked::Good { len, verified: true },
                _ => Checked::Damaged,
            }
        }
    }
}

/// The cheap check of an entry the previous manifest names at the same index (a chunk the
/// agent reports unchanged, or a CBT backup carries over); `recorded` is the entry's length the
/// previous manifest recorded (version 3), if any.
///
/// With a recorded length: one `lstat`, no open and no read: a regular file of exactly that
/// length passes (truncation and growth fail). A length that differs is not trusted: the entry
/// gets the full check (it may be a good copy written since, e.g. after EMLINK). Without one
/// (versions 1 and 2): [`quick_check`].
///
/// Why a name that passes may be linked: the pool (mode 0700) only ever gets entries from
/// `write_entry`, whose callers checked the bytes against the id first (this process or another
/// affa sharing the RootDir). Between this check and the caller's `link_into` the name can
/// only be removed (a sweep, an eviction: the link fails with ENOENT and the chunk is stored
/// again) or replaced by another such checked write of the same chunk (a repair, a fresh copy
/// after EMLINK): the link then takes that inode, which holds the same chunk. The length the
/// caller records may then be the replaced inode's: the next run's `lstat` sees a difference
/// and reads the entry fully, so a stale length costs one read, never a wrong trust.
pub(crate) fn cheap_check(
    dirs: Option<&FanDirs>,
    path: &Path,
    id: &ChunkId,
    recorded: Option<u32>,
    blob_buf: &mut Vec<u8>,
    decoded: &mut Vec<u8>,
) -> Checked {
    let Some(want) = recorded else {
        return match quick_check(path) {
            Ok(Some(len)) => Checked::Good { len, verified: false },
            Ok(None) => Checked::Damaged,
            Err(_) => Checked::Missing,
        };
    };
    // The `lstat` through the pool's open fan-out directories when the caller keeps them
    // (`dirs`, made for the pool's directory), else by path.
    let m = match dirs {
        Some(d) => d.stat(id).map(|st| {
            let file = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
            (file, st.st_size as u64)
        }),
        None => fs::symlink_metadata(path).map(|m| (m.is_file(), m.len())),
    };
    judge_length(m, want, path, id, blob_buf, decoded)
}

/// The cheap check's verdict on an entry's `lstat` (regular file, length) against the recorded
/// length.
fn judge_length(
    m: io::Result<(bool, u64)>,
    want: u32,
    path: &Path,
    id: &ChunkId,
    blob_buf: &mut Vec<u8>,
    decoded: &mut Vec<u8>,
) -> Checked {
    match m {
        Err(_) => Checked::Missing,
        Ok((false, _)) => Checked::Damaged,
        Ok((true, len)) if len == want as u64 => Checked::Good { len: want, verified: false },
        Ok(_) => full_check(path, id, blob_buf, decoded),
    }
}

/// What `sweep` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Pool entries removed (no archive linked them).
    pub removed_chunks: u64,
    /// Bytes (file lengths) of the removed entries.
    pub freed_bytes: u64,
    /// Entries still referenced by at least one archive.
    pub kept_chunks: u64,
    /// Stale temp files removed (leftovers of killed runs).
    pub removed_temps: u64,
}

/// Remove every pool entry whose link count is 1 (no archive references it) and temp files
/// older than an hour. Run it after deleting archives (`rm -rf`). Safe against a concurrent
/// `chunk_file` (which re-stores an entry swept under its feet), but best run under the
/// RootDir lock. Reads every pool entry: [`sweep_some`] is the sweep whose cost follows what
/// was deleted.
pub fn sweep(pool: &Pool) -> Result<SweepStats> {
    let mut st = SweepStats::default();
    let dir = pool.dir();
    let rd = fs::read_dir(dir).ctx(|| format!("cannot read pool {}", dir.display()))?;
    for fan in rd {
        let fan = fan.ctx(|| format!("cannot read pool {}", dir.display()))?;
        let name = fan.file_name();
        let name = name.to_string_lossy();
        let is_fan = name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if name == TMP_DIR {
            sweep_temps(&fan.path(), &mut st)?;
            continue;
        }
        if !is_fan || !fan.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let rd = fs::read_dir(fan.path()).ctx(|| format!("cannot read {}", fan.path().display()))?;
        for e in rd {
            let e = e.ctx(|| format!("cannot read {}", fan.path().display()))?;
            let n = e.file_name();
            let Some(id) = n.to_str().and_then(parse_id) else { continue };
            if !id_hex(&id).starts_with(&*name) {
                continue;
            }
            sweep_entry(&e.path(), &mut st)?;
        }
    }
    Ok(st)
}

/// The sweep of what deleting some archives can have freed: only the pool entries of `ids`
/// (the chunks the deleted archives linked, [`linked_ids`]) and the stale temp files. The same
/// rule as [`sweep`] (an entry whose link count is 1 is removed), at a cost that follows the
/// deleted archives, not the pool. An entry that some other deletion left unreferenced, and
/// that no id here names, stays until a full [`sweep`].
pub fn sweep_some(pool: &Pool, ids: &[ChunkId]) -> Result<SweepStats> {
    let mut st = SweepStats::default();
    let tmp = pool.dir().join(TMP_DIR);
    if tmp.is_dir() {
        sweep_temps(&tmp, &mut st)?;
    }
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in &ids {
        sweep_entry(&pool.dir().join(chunk_rel(id)), &mut st)?;
    }
    Ok(st)
}

/// The chunk ids a tree made like an archive links in its `.affa-chunks/` (what may become
/// unreferenced when it is deleted). Names that are not ids under their fan-out directory, and
/// a tree without `.affa-chunks/`, give nothing; nothing is followed but directories.
pub fn linked_ids(archive_root: &Path) -> Vec<ChunkId> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(archive_root.join(ARCHIVE_CHUNK_DIR)) else { return out };
    for fan in rd.flatten() {
        let name = fan.file_name();
        let name = name.to_string_lossy();
        if name.len() != 2 || !fan.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for e in fs::read_dir(fan.path()).into_iter().flatten().flatten() {
            let n = e.file_name();
            if let Some(id) = n.to_str().and_then(parse_id).filter(|id| id_hex(id).starts_with(&*name)) {
                out.push(id);
            }
        }
    }
    out
}

/// Remove the temp files in `tmp` older than [`STALE_TMP`] (leftovers of killed runs).
fn sweep_temps(tmp: &Path, st: &mut SweepStats) -> Result<()> {
    let rd = fs::read_dir(tmp).ctx(|| format!("cannot read {}", tmp.display()))?;
    for t in rd.flatten() {
        let old = t
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > STALE_TMP);
        if old && fs::remove_file(t.path()).is_ok() {
            st.removed_temps += 1;
        }
    }
    Ok(())
}

/// Remove the pool entry `p` if no archive links it (link count 1); a missing entry or one
/// that is not a regular file is left alone.
fn sweep_entry(p: &Path, st: &mut SweepStats) -> Result<()> {
    let Ok(m) = fs::symlink_metadata(p) else { return Ok(()) };
    if !m.is_file() {
        return Ok(());
    }
    if m.nlink() == 1 {
        match fs::remove_file(p) {
            Ok(()) => {}
            // Another sweep (another job, or another server sharing RootDir) was first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx(|| format!("cannot remove {}", p.display())),
        }
        crate::interrupt::crash_point("sweep-removed");
        st.removed_chunks += 1;
        st.freed_bytes += m.len();
    } else {
        st.kept_chunks += 1;
    }
    Ok(())
}

/// The message of a failed link of chunk `id` into `archive_root`.
pub(crate) fn link_failed(id: &ChunkId, archive_root: &Path) -> String {
    format!("cannot link chunk {} into {}", id_hex(id), archive_root.join(ARCHIVE_CHUNK_DIR).display())
}

/// fsync a directory (makes renames and links in it durable).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).ctx(|| format!("cannot fsync directory {}", dir.display()))
}

/// fsync directories, several at once: each fsync waits for a journal commit and a device
/// flush, concurrent ones share them (one after the other, the 256 fan-out directories of an
/// archive took ~0.3 s here). The first error is returned.
pub(crate) fn fsync_dirs<'a>(dirs: impl IntoIterator<Item = &'a PathBuf>) -> Result<()> {
    const THREADS: usize = 8;
    let dirs: Vec<&PathBuf> = dirs.into_iter().collect();
    if dirs.len() <= 1 {
        return dirs.iter().try_for_each(|d| fsync_dir(d));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first: std::sync::Mutex<Option<crate::error::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..THREADS.min(dirs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = dirs.get(i) else { break };
                if let Err(e) = fsync_dir(d) {
                    first.lock().unwrap().get_or_insert(e);
                    break;
                }
            });
        }
    });
    match first.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
