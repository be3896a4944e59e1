//! What a mount shows, without the kernel: the archives of a job (or one archive) as a read-only
//! tree, chunked files as the plain files they were, store internals hidden.
//!
//! Owns: resolving a path of the mount to the archive's file (never following a symlink: every
//! open goes through `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` below the directory
//! opened at mount time), the inode numbers, directory listings, the open files (a plain file,
//! or a chunked file's manifest and its archive's `.affa-chunks/` opened once, so a rotation that
//! renames or deletes the archive does not change what an open file reads), reading a chunked
//! file's range from the chunks it touches (each verified against its BLAKE3, zero chunks
//! without I/O), the bounded cache of decoded chunks and the read-ahead of sequential reads.
//! Must never: write to or create anything in RootDir, return bytes of a chunk that did not
//! verify (a damaged or missing chunk is `EIO` and a log line), show a manifest, the manifest
//! index, `.affa-chunks/` or affa's reports as files, or panic on what an archive holds.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::archive;
use crate::chunk::{self, ChunkId, ChunkRef, Manifest, ProblemKind, MANIFEST_SUFFIX};

/// Decoded chunks kept in memory (bytes).
pub const CACHE_BYTES: usize = 64 << 20;
/// Chunks read ahead of a sequential reader.
pub const READ_AHEAD: usize = 2;
/// Parsed manifests kept (a 500 GB disk's is 500 000 ids: 16 MB).
const MANIFESTS_KEPT: usize = 16;
/// Largest manifest accepted (as `chunk::read_manifest`).
const MAX_MANIFEST: u64 = crate::chunk::MAX_MANIFEST_LEN;

/// An errno.
pub type Errno = i32;

/// File types a mount shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// The attributes of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

/// One directory entry of a listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

/// What a path of the mount is in the archive.
enum Resolved {
    Real(std::fs::Metadata),
    Chunked(Arc<Manifest>, std::fs::Metadata),
}

/// Where an open chunked file's chunks are: its chunk files opened at open time (`pinned`:
/// the archive's hard links are then no longer needed, a rotation may delete the archive and a
/// sweep its chunks), its archive's `.affa-chunks/` (opened at open time) for a file with more
/// chunks than the open-file budget, and the pool for a chunk the archive no longer links.
struct Source {
    chunks: Option<File>,
    pool: Option<Arc<File>>,
    pinned: HashMap<ChunkId, File>,
    budget: Arc<AtomicU64>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.budget.fetch_add(self.pinned.len() as u64, Ordering::Relaxed);
    }
}

impl Source {
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ProblemKind> {
        let (mut raw, mut out) = (Vec::new(), Vec::new());
        let mut r = match (self.pinned.get(id), &self.chunks) {
            (Some(f), _) => chunk::load_chunk_from(f, id, len, &mut raw, &mut out),
            (None, Some(d)) => chunk::load_chunk_at(d, id, len, &mut raw, &mut out),
            (None, None) => Err(ProblemKind::Missing),
        };
        if r == Err(ProblemKind::Missing) {
            if let Some(p) = &self.pool {
                // Verified like any chunk: the pool holds the same bytes under the same id.
                if chunk::load_chunk_at(p, id, len, &mut raw, &mut out).is_ok() {
                    r = Ok(());
                }
            }
        }
        r.map(|()| out)
    }
}

/// A bounded LRU of decoded, verified chunks, by id.
#[derive(Default)]
struct Cache {
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
}

impl Cache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(id).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }

    fn put(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        self.tick += 1;
        if let Some(old) = self.map.insert(id, (data.clone(), self.tick)) {
            self.bytes -= old.0.len();
        }
        self.bytes += data.len();
        while self.bytes > CACHE_BYTES && self.map.len() > 1 {
            let Some((&victim, _)) = self.map.iter().min_by_key(|(_, (_, t))| *t) else { break };
            if let Some((d, _)) = self.map.remove(&victim) {
                self.bytes -= d.len();
            }
        }
    }
}

/// An open file.
enum Handle {
    Plain(File),
    Chunked {
        m: Arc<Manifest>,
        src: Arc<Source>,
        /// `ARCHIVE/path` for log lines.
        label: String,
        /// Where the previous read ended (read-ahead on sequential reads).
        last_end: AtomicU64,
    },
}

type Prefetch = (Arc<Source>, ChunkId, usize);
/// (device, inode) of a file.
type Ident = (u64, u64);
/// path -> (inode number, what it showed); inode number - 1 -> path.
type Nodes = (HashMap<PathBuf, (u64, Ident)>, Vec<PathBuf>);
type ManifestEntry = ((u64, u64, i64, i64), Arc<Manifest>);

/// The tree a mount shows.
pub struct View {
    job: String,
    /// The job directory (every archive) or the archive shown, opened at mount time.
    base: File,
    whole_job: bool,
    pool: Option<Arc<File>>,
    hidden: Vec<String>,
    /// path -> (inode number, identity of what it showed: device and inode of the file, or of
    /// a chunked file's manifest); inode number - 1 -> path. A path that shows another file
    /// after a rotation gets a new number, so the kernel never mixes the two files' cached pages.
    nodes: Mutex<Nodes>,
    /// The chunked files of each archive, by the archive directory's (device, inode).
    archives: Mutex<HashMap<Ident, Arc<BTreeSet<PathBuf>>>>,
    /// Recently parsed manifests, by (device, inode, mtime seconds, nanoseconds).
    manifests: Mutex<Vec<ManifestEntry>>,
    cache: Arc<Mutex<Cache>>,
    inflight: Arc<Mutex<HashSet<ChunkId>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    log: Box<dyn Fn(&str) + Send + Sync>,
    logged: Mutex<HashSet<ChunkId>>,
    prefetch: Mutex<Option<mpsc::Sender<Prefetch>>>,
    /// Chunk files that open files may still pin (file descriptors).
    budget: Arc<AtomicU64>,
}

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn kind_of(ft: std::fs::FileType) -> Kind {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else {
        Kind::File
    }
}

/// Open `rel` below `dir` without following any symlink and without leaving `dir`.
fn open_beneath(dir: &File, rel: &Path, flags: OFlags) -> io::Result<File> {
    let rel: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let fd = rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(fd))
}

/// `/proc/self/fd/N` of an open directory: a path that stays the directory opened, whatever is
/// renamed meanwhile.
fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

impl View {
    /// The view of `dir`: the job directory (`whole_job`: every archive is a directory) or one
    /// archive. `pool` is RootDir's `.affa-pool` when it exists; `log` gets one line per damaged
    /// or missing chunk.
    pub fn new(
        job: &str,
        dir: &Path,
        whole_job: bool,
        pool: Option<&Path>,
        log: Box<dyn Fn(&str) + Send + Sync>,
    ) -> io::Result<View> {
        let base = File::from(rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        let pool = pool.and_then(|p| {
            rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                .ok()
                .map(|fd| Arc::new(File::from(fd)))
        });
        let mut hidden = archive::reserved_names(job);
        hidden.push(".AFFA-REPORT".to_string());
        let v = View {
            job: job.to_string(),
            base,
            whole_job,
            pool,
            hidden,
            nodes: Mutex::new((HashMap::from([(PathBuf::new(), (1, (0, 0)))]), vec![PathBuf::new()])),
            archives: Mutex::default(),
            manifests: Mutex::default(),
            cache: Arc::default(),
            inflight: Arc::default(),
            handles: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            log,
            logged: Mutex::default(),
            prefetch: Mutex::new(None),
            budget: Arc::new(AtomicU64::new(pin_budget())),
        };
        Ok(v)
    }

    /// Start the read-ahead workers (a view without them reads only what is asked).
    pub fn start_read_ahead(&self, workers: usize) {
        let (tx, rx) = mpsc::channel::<Prefetch>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (rx, cache, inflight) = (rx.clone(), self.cache.clone(), self.inflight.clone());
            std::thread::spawn(move || loop {
                let job = rx.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ()));
                let Ok((src, id, len)) = job else { return };
                if let Ok(d) = src.fetch(&id, len) {
                    if let Ok(mut c) = cache.lock() {
                        c.put(id, Arc::new(d));
                    }
                }
                if let Ok(mut f) = inflight.lock() {
                    f.remove(&id);
                }
            });
        }
        *self.prefetch.lock().unwrap() = Some(tx);
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    fn path_of(&self, ino: u64) -> Result<PathBuf, Errno> {
        let n = self.nodes.lock().unwrap();
        n.1.get((ino as usize).wrapping_sub(1)).cloned().ok_or(libc::ENOENT)
    }

    /// The inode number of `rel` showing the file `ident` (None: whatever it shows now).
    fn ino_for(&self, rel: &Path, ident: Option<(u64, u64)>) -> u64 {
        if rel.as_os_str().is_empty() {
            return 1;
        }
        let mut n = self.nodes.lock().unwrap();
        if let Some(&(i, was)) = n.0.get(rel) {
            match ident {
                None => return i,
                Some(id) if id == was => return i,
                Some(_) if was == (0, 0) => {
                    n.0.insert(rel.to_path_buf(), (i, ident.unwrap()));
                    return i;
                }
                Some(_) => {}
            }
        }
        n.1.push(rel.to_path_buf());
        let i = n.1.len() as u64;
        n.0.insert(rel.to_path_buf(), (i, ident.unwrap_or((0, 0))));
        i
    }

    /// (the archive's path below `base`, the path inside the archive).
    fn split(&self, rel: &Path) -> (PathBuf, PathBuf) {
        if !self.whole_job {
            return (PathBuf::new(), rel.to_path_buf());
        }
        let mut c = rel.components();
        let first = c.next().map(|c| PathBuf::from(c.as_os_str())).unwrap_or_default();
        (first, c.as_path().to_path_buf())
    }

    /// Whether `name`, an entry of the directory `within` of an archive, is one of affa's own
    /// files (hidden): only at the root of an archive.
    fn hidden_name(&self, within_dir: &Path, name: &OsStr) -> bool {
        if !within_dir.as_os_str().is_empty() {
            return false;
        }
        let n = name.to_string_lossy();
        self.hidden.iter().any(|h| *n == **h || (n.starts_with(&format!(".{h}.tmp-")) && n.len() > h.len() + 6))
    }

    /// The chunked files of the archive at `arch` (below `base`), by the archive directory's
    /// identity (a renamed archive keeps its entry).
    fn chunked(&self, arch: &Path) -> Result<Arc<BTreeSet<PathBuf>>, Errno> {
        let d = open_beneath(&self.base, arch, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| errno(&e))?;
        let md = d.metadata().map_err(|e| errno(&e))?;
        let key = (md.dev(), md.ino());
        if let Some(s) = self.archives.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        let files = chunk::chunked_files(&fd_path(&d)).map_err(|e| {
            (self.log)(&format!("mount of job {}: {}: {e}", self.job, arch.display()));
            libc::EIO
        })?;
        let set: Arc<BTreeSet<PathBuf>> = Arc::new(files.into_iter().collect());
        self.archives.lock().unwrap().insert(key, set.clone());
        Ok(set)
    }

    fn manifest(&self, arch: &Path, within: &Path) -> Result<(Arc<Manifest>, std::fs::Metadata), Errno> {
        let mut p = arch.join(within).into_os_string();
        p.push(MANIFEST_SUFFIX);
        let f = open_beneath(&self.base, Path::new(&p), OFlags::RDONLY | OFlags::NONBLOCK).map_err(|e| errno(&e))?;
        let md = f.metadata().map_err(|e| errno(&e))?;
        if !md.is_file() || md.len() > MAX_MANIFEST {
            return Err(libc::EIO);
        }
        let key = (md.dev(), md.ino(), md.mtime(), md.mtime_nsec());
        if let Some((_, m)) = self.manifests.lock().unwrap().iter().find(|(k, _)| *k == key) {
            return Ok((m.clone(), md));
        }
        let mut data = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(&f, MAX_MANIFEST + 1), &mut data).map_err(|e| errno(&e))?;
        let m = Manifest::parse(&data).map_err(|e| {
            (self.log)(&format!("mount of job {}: {}: {e}", self.job, Path::new(&p).display()));
            libc::EIO
        })?;
        let m = Arc::new(m);
        let mut ms = self.manifests.lock().unwrap();
        if ms.len() >= MANIFESTS_KEPT {
            ms.remove(0);
        }
        ms.push((key, m.clone()));
        Ok((m, md))
    }

    fn resolve(&self, rel: &Path) -> Result<Resolved, Errno> {
        let (arch, within) = self.split(rel);
        if self.whole_job && !arch.as_os_str().is_empty() {
            let name = arch.to_string_lossy();
            if archive::parse_archive_name(&name).is_none() {
                return Err(libc::ENOENT);
            }
        }
        if let Some(name) = within.file_name() {
            let dir = within.parent().unwrap_or(Path::new(""));
            if self.hidden_name(dir, name) {
                return Err(libc::ENOENT);
            }
        }
        let in_archive = !self.whole_job || !arch.as_os_str().is_empty();
        if in_archive && !within.as_os_str().is_empty() {
            let set = self.chunked(&arch)?;
            if set.contains(&within) {
                let (m, md) = self.manifest(&arch, &within)?;
                return Ok(Resolved::Chunked(m, md));
            }
            let s = within.as_os_str().as_bytes();
            if let Some(stem) = s.strip_suffix(MANIFEST_SUFFIX.as_bytes()) {
                if set.contains(Path::new(OsStr::from_bytes(stem))) {
                    return Err(libc::ENOENT);
                }
            }
        }
        let f = open_beneath(&self.base, rel, OFlags::PATH).map_err(|e| errno(&e))?;
        let md = f.metadata().map_err(|e| errno(&e))?;
        if self.whole_job && within.as_os_str().is_empty() && !arch.as_os_str().is_empty() && !md.is_dir() {
            return Err(libc::ENOENT);
        }
        Ok(Resolved::Real(md))
    }

    fn attr(&self, ino: u64, r: &Resolved) -> Attr {
        match r {
            Resolved::Real(md) => Attr {
                ino,
                kind: kind_of(md.file_type()),
                size: md.len(),
                blocks: md.blocks(),
                perm: (md.mode() & 0o7777) as u16,
                nlink: md.nlink().min(u32::MAX as u64) as u32,
                uid: md.uid(),
                gid: md.gid(),
                rdev: md.rdev() as u32,
                atime: (md.atime(), md.atime_nsec() as u32),
                mtime: (md.mtime(), md.mtime_nsec() as u32),
                ctime: (md.ctime(), md.ctime_nsec() as u32),
            },
            Resolved::Chunked(m, md) => {
                let stored = m.chunks.iter().enumerate().filter(|(_, c)| **c != ChunkRef::Zero);
                let bytes: u64 = stored.map(|(i, _)| m.chunk_len(i) as u64).sum();
                Attr {
                    ino,
                    kind: Kind::File,
                    size: m.size,
                    blocks: bytes.div_ceil(512),
                    perm: (m.mode & 0o7777) as u16,
                    nlink: 1,
                    uid: m.uid,
                    gid: m.gid,
                    rdev: 0,
                    atime: m.atime.unwrap_or(m.mtime),
                    mtime: m.mtime,
                    ctime: (md.ctime(), md.ctime_nsec() as u32),
                }
            }
        }
    }

    /// The entry `name` of the directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
            return Err(libc::ENOENT);
        }
        let rel = self.path_of(parent)?.join(name);
        let r = self.resolve(&rel)?;
        let md = match &r {
            Resolved::Real(md) | Resolved::Chunked(_, md) => md,
        };
        Ok(self.attr(self.ino_for(&rel, Some((md.dev(), md.ino()))), &r))
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let rel = self.path_of(ino)?;
        let r = self.resolve(&rel)?;
        Ok(self.attr(ino, &r))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let rel = self.path_of(ino)?;
        match self.resolve(&rel)? {
            Resolved::Real(md) if md.file_type().is_symlink() => {}
            _ => return Err(libc::EINVAL),
        }
        let f = open_beneath(&self.base, &rel, OFlags::PATH).map_err(|e| errno(&e))?;
        let t = rustix::fs::readlinkat(&f, "", Vec::new()).map_err(|e| e.raw_os_error())?;
        Ok(t.into_bytes())
    }

    /// The listing of a directory, kept until [`View::releasedir`]; returns its handle.
    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let rel = self.path_of(ino)?;
        match self.resolve(&rel)? {
            Resolved::Real(md) if md.is_dir() => {}
            _ => return Err(libc::ENOTDIR),
        }
        let (arch, within) = self.split(&rel);
        let d = open_beneath(&self.base, &rel, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| errno(&e))?;
        let at_job = self.whole_job && arch.as_os_str().is_empty();
        let set = if at_job { Arc::default() } else { self.chunked(&arch)? };
        let parent_ino =
            if rel.as_os_str().is_empty() { 1 } else { self.ino_for(rel.parent().unwrap_or(Path::new("")), None) };
        let mut out = vec![
            DirEntry { ino, kind: Kind::Dir, name: ".".into() },
            DirEntry { ino: parent_ino, kind: Kind::Dir, name: "..".into() },
        ];
        let mut seen = HashSet::new();
        let rd = std::fs::read_dir(fd_path(&d)).map_err(|e| errno(&e))?;
        let mut names: Vec<(OsString, Kind)> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| errno(&e))?;
            let Ok(ft) = e.file_type() else { continue };
            names.push((e.file_name(), kind_of(ft)));
        }
        names.sort();
        for (name, kind) in names {
            if at_job {
                if kind != Kind::Dir || archive::parse_archive_name(&name.to_string_lossy()).is_none() {
                    continue;
                }
            } else if self.hidden_name(&within, &name) {
                continue;
            }
            let mut shown = name.clone();
            let mut kind = kind;
            let inside = within.join(&name);
            if !at_job {
                let b = name.as_bytes();
                if let Some(stem) = b.strip_suffix(MANIFEST_SUFFIX.as_bytes()) {
                    let file = within.join(OsStr::from_bytes(stem));
                    if set.contains(&file) {
                        shown = OsStr::from_bytes(stem).to_os_string();
                        kind = Kind::File;
                    }
                } else if set.contains(&inside) {
                    // A chunked file is shown once, from its manifest.
                    continue;
                }
            }
            if !seen.insert(shown.clone()) {
                continue;
            }
            let ino = self.ino_for(&rel.join(&shown), None);
            out.push(DirEntry { ino, kind, name: shown });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().unwrap().insert(fh, Arc::new(out));
        Ok(fh)
    }

    /// The entries of an open directory from `offset` on.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>, Errno> {
        let d = self.dirs.lock().unwrap().get(&fh).cloned().ok_or(libc::EBADF)?;
        Ok(d.iter().skip(offset as usize).cloned().collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().unwrap().remove(&fh);
    }

    /// Open a regular file for reading; returns its handle.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64, Errno> {
        if write {
            return Err(libc::EROFS);
        }
        let rel = self.path_of(ino)?;
        let h = match self.resolve(&rel)? {
            Resolved::Real(md) if md.is_file() => {
                let f = open_beneath(&self.base, &rel, OFlags::RDONLY | OFlags::NONBLOCK).map_err(|e| errno(&e))?;
                if !f.metadata().map_err(|e| errno(&e))?.is_file() {
                    return Err(libc::EIO);
                }
                Handle::Plain(f)
            }
            Resolved::Real(md) if md.is_dir() => return Err(libc::EISDIR),
            Resolved::Real(_) => return Err(libc::EINVAL),
            Resolved::Chunked(m, _) => {
                let (arch, within) = self.split(&rel);
                let chunks = match open_beneath(
                    &self.base,
                    &arch.join(chunk::ARCHIVE_CHUNK_DIR),
                    OFlags::RDONLY | OFlags::DIRECTORY,
                ) {
                    Ok(d) => Some(d),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(errno(&e)),
                };
                let label = if self.whole_job {
                    format!("{}/{}", arch.display(), within.display())
                } else {
                    within.display().to_string()
                };
                let pinned = self.pin(&m, chunks.as_ref());
                Handle::Chunked {
                    m,
                    src: Arc::new(Source { chunks, pool: self.pool.clone(), pinned, budget: self.budget.clone() }),
                    label,
                    last_end: AtomicU64::new(0),
                }
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(h));
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    /// Read up to `size` bytes at `offset` of an open file (fewer only at its end).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handles.lock().unwrap().get(&fh).cloned().ok_or(libc::EBADF)?;
        match &*h {
            Handle::Plain(f) => {
                let mut buf = vec![0u8; size as usize];
                let mut n = 0;
                while n < buf.len() {
                    match f.read_at(&mut buf[n..], offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(errno(&e)),
                    }
                }
                buf.truncate(n);
                Ok(buf)
            }
            Handle::Chunked { m, src, label, last_end } => {
                if offset >= m.size || size == 0 {
                    return Ok(Vec::new());
                }
                let end = (offset + size as u64).min(m.size);
                let cs = m.chunk_size as u64;
                let mut out = Vec::with_capacity((end - offset) as usize);
                let (first, last) = (offset / cs, (end - 1) / cs);
                for i in first..=last {
                    let i = i as usize;
                    let start = i as u64 * cs;
                    let (a, b) = ((offset.max(start) - start) as usize, (end.min(start + cs) - start) as usize);
                    match m.chunks[i] {
                        ChunkRef::Zero => out.resize(out.len() + (b - a), 0),
                        ChunkRef::Stored(id) => {
                            let d = self.chunk(src, &id, m.chunk_len(i), label)?;
                            out.extend_from_slice(&d[a..b]);
                        }
                    }
                }
                let sequential = last_end.swap(end, Ordering::Relaxed) == offset;
                if sequential {
                    self.read_ahead(m, src, last as usize + 1);
                }
                Ok(out)
            }
        }
    }

    fn chunk(&self, src: &Arc<Source>, id: &ChunkId, len: usize, label: &str) -> Result<Arc<Vec<u8>>, Errno> {
        if let Some(d) = self.cache.lock().unwrap().get(id) {
            return Ok(d);
        }
        match src.fetch(id, len) {
            Ok(d) => {
                let d = Arc::new(d);
                self.cache.lock().unwrap().put(*id, d.clone());
                Ok(d)
            }
            Err(k) => {
                if self.logged.lock().unwrap().insert(*id) {
                    let what = match k {
                        ProblemKind::Missing => "is missing".to_string(),
                        ProblemKind::Damaged(why) => format!("is damaged: {why}"),
                    };
                    (self.log)(&format!(
                        "mount of job {}: chunk {} of {label} {what}; reads of that range fail (EIO)",
                        self.job,
                        chunk::id_hex(id)
                    ));
                }
                Err(libc::EIO)
            }
        }
    }

    /// Open every distinct chunk of `m` when the budget of file descriptors allows it.
    fn pin(&self, m: &Manifest, chunks: Option<&File>) -> HashMap<ChunkId, File> {
        let Some(dir) = chunks else { return HashMap::new() };
        let ids: HashSet<ChunkId> =
            m.chunks.iter().filter_map(|c| if let ChunkRef::Stored(id) = c { Some(*id) } else { None }).collect();
        let n = ids.len() as u64;
        let took = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(n)).is_ok();
        if !took {
            return HashMap::new();
        }
        let pinned: HashMap<ChunkId, File> =
            ids.into_iter().filter_map(|id| chunk::open_chunk_at(dir, &id).ok().map(|f| (id, f))).collect();
        self.budget.fetch_add(n - pinned.len() as u64, Ordering::Relaxed);
        pinned
    }

    fn read_ahead(&self, m: &Manifest, src: &Arc<Source>, from: usize) {
        let tx = self.prefetch.lock().unwrap().clone();
        let Some(tx) = tx else { return };
        for i in from..(from + READ_AHEAD).min(m.chunks.len()) {
            let ChunkRef::Stored(id) = m.chunks[i] else { continue };
            if self.cache.lock().unwrap().map.contains_key(&id) || !self.inflight.lock().unwrap().insert(id) {
                continue;
            }
            let _ = tx.send((src.clone(), id, m.chunk_len(i)));
        }
    }
}

/// How many chunk files open files may hold open: the file-descriptor limit (raised to its hard
/// limit) less a reserve for everything else.
fn pin_budget() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    let cur = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    cur.saturating_sub(2048).min(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{Pool, Settings};
    use std::fs;

    /// RootDir/job/scheduled.0 with a plain file, a symlink out of the archive, a chunked file
    /// of 3 chunks (the middle one zero) and affa's own files.
    fn archive(root: &Path) -> (PathBuf, Vec<u8>) {
        let arch = root.join("job/scheduled.0");
        fs::create_dir_all(arch.join("d")).unwrap();
        fs::write(arch.join("d/plain.txt"), "plain\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", arch.join("d/link")).unwrap();
        fs::write(arch.join(".AFFA3-REPORT"), "[Report]\nDate=202601010000\n").unwrap();
        fs::write(arch.join(".job-setup.ini"), "x=1\n").unwrap();
        let cs = 256 << 10;
        let mut data: Vec<u8> = (0..3 * cs + 1000).map(|i| (i % 253) as u8).collect();
        data[cs..2 * cs].iter_mut().for_each(|b| *b = 0);
        let src = root.join("disk.img");
        fs::write(&src, &data).unwrap();
        let pool = Pool::open(root).unwrap();
        let s = Settings { chunk_size: cs as u32, ..Settings::default() };
        chunk::chunk_file(&pool, &s, &src, &arch, Path::new("d/disk.img"), None, None).unwrap();
        (arch, data)
    }

    fn names(v: &View, ino: u64) -> Vec<String> {
        let fh = v.opendir(ino).unwrap();
        let n = v.readdir(fh, 0).unwrap().into_iter().map(|e| e.name.to_string_lossy().into_owned()).collect();
        v.releasedir(fh);
        n
    }

    #[test]
    fn shows_archives_chunked_files_as_plain_and_hides_internals() {
        let t = tempfile::tempdir().unwrap();
        let (arch, data) = archive(t.path());
        fs::create_dir_all(t.path().join("job/scheduled.running")).unwrap();
        fs::create_dir_all(t.path().join("job/.AFFA-TRASH")).unwrap();
        let logged = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = logged.clone();
        let pool = t.path().join(chunk::POOL_DIR);
        let v = View::new(
            "job",
            &t.path().join("job"),
            true,
            Some(&pool),
            Box::new(move |s| l2.lock().unwrap().push(s.into())),
        )
        .unwrap();
        assert_eq!(names(&v, 1), [".", "..", "scheduled.0"]);
        let a = v.lookup(1, OsStr::new("scheduled.0")).unwrap();
        assert_eq!(names(&v, a.ino), [".", "..", "d"]);
        for hidden in [".AFFA3-REPORT", ".affa-chunks", ".affa-manifests", ".job-setup.ini"] {
            assert!(arch.join(hidden).exists(), "{hidden}");
            assert_eq!(v.lookup(a.ino, OsStr::new(hidden)), Err(libc::ENOENT), "{hidden}");
        }
        assert_eq!(v.lookup(1, OsStr::new("scheduled.running")), Err(libc::ENOENT));
        let d = v.lookup(a.ino, OsStr::new("d")).unwrap();
        assert_eq!(names(&v, d.ino), [".", "..", "disk.img", "link", "plain.txt"]);
        assert_eq!(v.lookup(d.ino, OsStr::new("disk.img.affa-manifest")), Err(libc::ENOENT));
        let f = v.lookup(d.ino, OsStr::new("disk.img")).unwrap();
        assert_eq!((f.kind, f.size), (Kind::File, data.len() as u64));
        let l = v.lookup(d.ino, OsStr::new("link")).unwrap();
        assert_eq!(l.kind, Kind::Symlink);
        assert_eq!(v.readlink(l.ino).unwrap(), b"/etc/passwd");
        // Reads across chunk borders, the zero chunk, the short last chunk, past the end.
        let fh = v.open(f.ino, false).unwrap();
        for (off, len) in [(0u64, 100u32), (200_000, 300_000), (262_144, 262_144), (786_000, 5000), (787_432, 10)] {
            let got = v.read(fh, off, len).unwrap();
            let end = (off as usize + len as usize).min(data.len());
            assert!(got[..] == data[off as usize..end], "{off}+{len}");
        }
        assert!(v.read(fh, data.len() as u64, 10).unwrap().is_empty());
        assert_eq!(v.open(f.ino, true), Err(libc::EROFS));
        // A damaged chunk: EIO and one log line naming it and the file, never other bytes.
        let m = chunk::read_manifest(&arch.join("d/disk.img.affa-manifest")).unwrap();
        let ChunkRef::Stored(id) = m.chunks[2] else { panic!() };
        let hex = chunk::id_hex(&id);
        let cf = arch.join(".affa-chunks").join(&hex[..2]).join(&hex);
        let mut b = fs::read(&cf).unwrap();
        let n = b.len() - 1;
        b[n] ^= 1;
        // A new inode (the pool's copy stays good): the archive's link is damaged.
        fs::remove_file(&cf).unwrap();
        fs::write(&cf, &b).unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l3 = lines.clone();
        let v2 = View::new("job", &arch, false, None, Box::new(move |s| l3.lock().unwrap().push(s.into()))).unwrap();
        let d2 = v2.lookup(1, OsStr::new("d")).unwrap();
        let f2 = v2.lookup(d2.ino, OsStr::new("disk.img")).unwrap();
        let fh2 = v2.open(f2.ino, false).unwrap();
        assert_eq!(v2.read(fh2, 600_000, 10), Err(libc::EIO));
        assert!(v2.read(fh2, 0, 1000).unwrap()[..] == data[..1000]);
        let log = lines.lock().unwrap().clone();
        assert!(log.iter().any(|l| l.contains(&hex) && l.contains("d/disk.img") && l.contains("damaged")), "{log:?}");
        assert!(logged.lock().unwrap().is_empty());
    }
}
