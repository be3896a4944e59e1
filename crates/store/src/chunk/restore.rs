//! Reading archives back: rebuilding files (sparse), streaming them, verifying archives, listing
//! manifests, usage numbers, and evicting damaged pool entries.
//!
//! Owns: everything that reads `ARCHIVE/.affa-chunks/` and manifests. Uses only the archive
//! (never the pool) to rebuild, so a copied archive is self-contained. Must never: leave a
//! rebuilt file under its final name unless every chunk and the whole-file hash verified,
//! write zeros where a hole will do, trust a manifest or chunk file (both are untrusted input),
//! or modify an archive.

use super::blob;
use super::manifest::{ChunkRef, Manifest, MANIFEST_SUFFIX};
use super::pipeline;
use super::pool::{self, archive_entry, Pool, ARCHIVE_CHUNK_DIR};
use super::source::{self, ArchiveChunks, ChunkSource};
use super::{id_hex, is_zero, ChunkId, Progress};
use crate::error::{Error, IoContext, Result};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest manifest file accepted (2 GiB: [`super::MAX_CHUNKS`] chunks at least).
const MAX_MANIFEST: u64 = super::MAX_MANIFEST_LEN;
/// Granularity of holes punched inside non-zero chunks when rebuilding.
const BLOCK: usize = 4096;

/// Read and parse a manifest file.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let f = crate::untrusted::open_regular(path).ctx(|| format!("cannot open manifest {}", path.display()))?;
    let mut data = Vec::new();
    f.take(MAX_MANIFEST + 1).read_to_end(&mut data).ctx(|| format!("cannot read manifest {}", path.display()))?;
    if data.len() as u64 > MAX_MANIFEST {
        crate::bail!(Damaged, "manifest {} is larger than 2 GiB", path.display());
    }
    Manifest::parse(&data).map_err(|e| e.context(path.display()))
}

/// What is wrong with a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not in the archive's `.affa-chunks/`.
    Missing,
    /// Present but does not decode, has the wrong length, or hashes wrong.
    Damaged(String),
}

/// Load chunk `id` from the archive, decode it and check its length and hash.
fn load_chunk(
    archive_root: &Path,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    load_chunk_file(&archive_entry(archive_root, id), id, len, raw, out)
}

/// Load the chunk file `p` of chunk `id` into `raw`, decode it into `out` and check its length
/// and hash.
pub(super) fn load_chunk_file(
    p: &Path,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    match pool::read_blob(p, raw) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ProblemKind::Missing),
        Err(e) => return Err(ProblemKind::Damaged(format!("cannot read: {e}"))),
    }
    check_blob(id, len, raw, out)
}

/// Read chunk `id` from `dir`, an open chunk directory (an archive's `.affa-chunks/`, or the
/// pool), decode it into `out` and check its length (`len`) and BLAKE3. For a reader that opens
/// the directory once and keeps it: a mounted archive that a rotation renames stays readable.
pub fn load_chunk_at(
    dir: &File,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    let f = open_chunk_at(dir, id)?;
    load_chunk_from(&f, id, len, raw, out)
}

/// Open the entry of chunk `id` in the chunk directory `dir` (without following a symlink; it
/// must be a regular file). Holding it keeps the chunk readable after its names are removed.
pub fn open_chunk_at(dir: &File, id: &ChunkId) -> std::result::Result<File, ProblemKind> {
    use rustix::fs::{Mode, OFlags};
    let rel = pool::chunk_rel(id);
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let f = match rustix::fs::openat(dir, &rel, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Err(ProblemKind::Missing),
        Err(e) => return Err(ProblemKind::Damaged(format!("cannot open: {}", io::Error::from(e)))),
    };
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(f),
        Ok(_) => Err(ProblemKind::Damaged("not a regular file".into())),
        Err(e) => Err(ProblemKind::Damaged(format!("cannot stat: {e}"))),
    }
}

/// Read chunk `id` from its open chunk file `f` (positioned reads: `f` may be shared between
/// threads), decode it into `out` and check its length (`len`) and BLAKE3.
pub fn load_chunk_from(
    f: &File,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    let max = blob::HEADER_LEN as u64 + super::MAX_CHUNK_SIZE as u64 + (1 << 20);
    let size = match f.metadata() {
        Ok(m) if m.len() <= max => m.len() as usize,
        Ok(_) => return Err(ProblemKind::Damaged("larger than a chunk file can be".into())),
        Err(e) => return Err(ProblemKind::Damaged(format!("cannot stat: {e}"))),
    };
    raw.clear();
    raw.resize(size, 0);
    if let Err(e) = f.read_exact_at(raw, 0) {
        return Err(ProblemKind::Damaged(format!("cannot read: {e}")));
    }
    check_blob(id, len, raw, out)
}

/// Decode a chunk file's bytes and check the length and hash against the manifest's.
pub(super) fn check_blob(
    id: &ChunkId,
    len: usize,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    blob::decode(raw, out).map_err(ProblemKind::Damaged)?;
    if out.len() != len {
        return Err(ProblemKind::Damaged(format!("length {} where {} was expected", out.len(), len)));
    }
    if blake3::hash(out).as_bytes() != id {
        return Err(ProblemKind::Damaged("content does not match its hash".into()));
    }
    Ok(())
}

pub(super) fn chunk_error(id: &ChunkId, what: &Path, k: ProblemKind) -> Error {
    match k {
        ProblemKind::Missing => Error::damaged(format!("chunk {} of {} is missing", id_hex(id), what.display())),
        ProblemKind::Damaged(why) => {
            Error::damaged(format!("chunk {} of {} is damaged: {why}", id_hex(id), what.display()))
        }
    }
}

fn workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8)
}

/// The most reads a source may ask to run at once ([`ChunkSource::parallel`]).
const MAX_SOURCE_READERS: usize = 64;

/// Fetch every chunk of `m` in parallel (`src.parallel()` readers, else [`workers`]), in
/// manifest order, delivering them in order to `sink` as `(index, Some(bytes))` or
/// `(index, None)` for zero chunks. At most `inflight` chunks are between the readers and
/// `sink`: 64 MiB of chunks, at least one more than the readers and at most 4 per reader (so
/// memory stays below about 4 x readers x the chunk size, twice that counting the raw buffers).
fn for_each_chunk(
    src: &dyn ChunkSource,
    m: &Manifest,
    label: &Path,
    mut sink: impl FnMut(usize, Option<&[u8]>) -> Result<()>,
) -> Result<()> {
    let w = src.parallel().map(|n| n.clamp(1, MAX_SOURCE_READERS)).unwrap_or_else(workers);
    let inflight = (((64u64 << 20) / m.chunk_size as u64) as usize).clamp(w + 1, 4 * w);
    let bufs: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    pipeline::run(
        w,
        inflight,
        |emit: &mut dyn FnMut(usize) -> Result<()>| {
            for i in 0..m.chunks.len() {
                emit(i)?;
            }
            Ok(())
        },
        |i: usize| -> Result<(usize, Option<Vec<u8>>)> {
            match m.chunks[i] {
                ChunkRef::Zero => Ok((i, None)),
                ChunkRef::Stored(id) => {
                    let mut raw = bufs.lock().unwrap().pop().unwrap_or_default();
                    let mut out = Vec::new();
                    let r = source::load(src, &id, m.chunk_len(i), &mut raw, &mut out);
                    bufs.lock().unwrap().push(raw);
                    r.map_err(|k| source::source_error(src, &id, label, k))?;
                    Ok((i, Some(out)))
                }
            }
        },
        |(i, d): (usize, Option<Vec<u8>>)| sink(i, d.as_deref()),
    )
}

/// Rebuild the file described by `manifest_path` (in the archive `archive_root`) at `dest`:
/// sparse (zero chunks and zero 4 KiB blocks become holes), every chunk hash and the whole-file
/// hash checked, mode, mtime/atime and (when running as root) owner restored. Written to a
/// temp name next to `dest` and renamed only when everything verified; on error nothing is
/// left behind and an existing `dest` is untouched. Returns the manifest.
pub fn unchunk_file(archive_root: &Path, manifest_path: &Path, dest: &Path, progress: Progress) -> Result<Manifest> {
    unchunk_file_from(&ArchiveChunks(archive_root), manifest_path, dest, progress)
}

/// [`unchunk_file`] for a file made to stay on the backup server (`--unchunk`): the manifest's
/// set-uid, set-gid and sticky bits are never given to it, not even for a moment.
pub fn unchunk_file_without_set_id(
    archive_root: &Path,
    manifest_path: &Path,
    dest: &Path,
    progress: Progress,
) -> Result<Manifest> {
    unchunk_masked(&ArchiveChunks(archive_root), manifest_path, dest, progress, 0o777)
}

/// [`unchunk_file`] with the chunks read from `src` (checked as from the archive).
pub fn unchunk_file_from(
    src: &dyn ChunkSource,
    manifest_path: &Path,
    dest: &Path,
    progress: Progress,
) -> Result<Manifest> {
    unchunk_masked(src, manifest_path, dest, progress, 0o7777)
}

/// [`unchunk_file_from`], the file's mode the manifest's `& mode_mask`.
fn unchunk_masked(
    src: &dyn ChunkSource,
    manifest_path: &Path,
    dest: &Path,
    progress: Progress,
    mode_mask: u32,
) -> Result<Manifest> {
    let m = read_manifest(manifest_path)?;
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dest.file_name().ok_or_else(|| Error::new(format!("invalid destination {}", dest.display())))?;
    let tmp = dir.join(format!(".{}.affa-tmp-{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> Result<()> {
        let _ = fs::remove_file(&tmp);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .ctx(|| format!("cannot create {}", tmp.display()))?;
        let mut hasher = blake3::Hasher::new();
        let zeros = vec![0u8; m.chunk_size as usize];
        let mut done = 0u64;
        for_each_chunk(src, &m, manifest_path, |i, d| {
            let off = i as u64 * m.chunk_size as u64;
            let len = m.chunk_len(i);
            match d {
                None => {
                    hasher.update(&zeros[..len]);
                }
                Some(d) => {
                    hasher.update(d);
                    write_sparse(&f, d, off).ctx(|| format!("cannot write {}", tmp.display()))?;
                }
            }
            done += len as u64;
            if let Some(cb) = progress {
                cb(done);
            }
            Ok(())
        })?;
        if m.file_hash.is_some_and(|h| hasher.finalize().as_bytes() != &h) {
            crate::bail!(Damaged, "{}: the rebuilt file does not match its recorded BLAKE3", manifest_path.display());
        }
        f.set_len(m.size).ctx(|| format!("cannot set the size of {}", tmp.display()))?;
        apply_meta(&f, &m, mode_mask).ctx(|| format!("cannot set owner, mode or times of {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("cannot fsync {}", tmp.display()))?;
        fs::rename(&tmp, dest).ctx(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        pool::fsync_dir(dir)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(m)
}

/// pwrite `d` at `off`, skipping 4 KiB blocks that are all zero (they stay holes).
fn write_sparse(f: &File, d: &[u8], off: u64) -> io::Result<()> {
    let mut i = 0;
    while i < d.len() {
        let end = (i + BLOCK).min(d.len());
        if is_zero(&d[i..end]) {
            i = end;
            continue;
        }
        let start = i;
        let mut j = end;
        while j < d.len() {
            let e = (j + BLOCK).min(d.len());
            if is_zero(&d[j..e]) {
                break;
            }
            j = e;
        }
        f.write_all_at(&d[start..j], off + start as u64)?;
        i = j;
    }
    Ok(())
}

fn apply_meta(f: &File, m: &Manifest, mode_mask: u32) -> io::Result<()> {
    use rustix::fs::{Gid, Mode, Timespec, Timestamps, Uid};
    if rustix::process::geteuid().is_root() {
        // An id of -1 leaves it unchanged, as chown(2) does.
        let uid = (m.uid != u32::MAX).then(|| Uid::from_raw(m.uid));
        let gid = (m.gid != u32::MAX).then(|| Gid::from_raw(m.gid));
        rustix::fs::fchown(f, uid, gid)?;
    }
    // After chown (which clears set-id bits).
    rustix::fs::fchmod(f, Mode::from_raw_mode(m.mode & mode_mask))?;
    let ts = |t: Option<(i64, u32)>| match t {
        Some((s, n)) => Timespec { tv_sec: s, tv_nsec: n.into() },
        None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
    };
    rustix::fs::futimens(f, &Timestamps { last_access: ts(m.atime), last_modification: ts(Some(m.mtime)) })?;
    Ok(())
}

/// Write the file described by `m` (from the archive `archive_root`) to `out` in order, zeros
/// included, checking every chunk (in parallel). The whole-file hash is checked at the end: on
/// an error, bytes already written must be discarded by the caller. `label` names the file in
/// error messages. Returns the bytes written.
pub fn stream_file(
    archive_root: &Path,
    m: &Manifest,
    label: &Path,
    out: &mut dyn Write,
    progress: Progress,
) -> Result<u64> {
    stream_file_from(&ArchiveChunks(archive_root), m, label, out, progress)
}

/// [`stream_file`] with the chunks read from `src` (checked as from the archive).
pub fn stream_file_from(
    src: &dyn ChunkSource,
    m: &Manifest,
    label: &Path,
    out: &mut dyn Write,
    progress: Progress,
) -> Result<u64> {
    let mut hasher = blake3::Hasher::new();
    let zeros = vec![0u8; m.chunk_size as usize];
    let mut done = 0u64;
    for_each_chunk(src, m, label, |i, d| {
        let d = d.unwrap_or(&zeros[..m.chunk_len(i)]);
        hasher.update(d);
        out.write_all(d).ctx(|| format!("cannot write {}", label.display()))?;
        done += d.len() as u64;
        if let Some(cb) = progress {
            cb(done);
        }
        Ok(())
    })?;
    if m.file_hash.is_some_and(|h| hasher.finalize().as_bytes() != &h) {
        crate::bail!(Damaged, "{}: the rebuilt file does not match its recorded BLAKE3", label.display());
    }
    Ok(done)
}

/// The BLAKE3 of the whole file of `m` (in the archive `archive_root`), computed from its
/// chunks, each decoded and checked against its id (a CBT-derived manifest records none).
pub fn whole_file_hash(archive_root: &Path, m: &Manifest, label: &Path) -> Result<[u8; 32]> {
    whole_file_hash_from(&ArchiveChunks(archive_root), m, label)
}

/// [`whole_file_hash`] with the chunks read from `src`.
pub fn whole_file_hash_from(src: &dyn ChunkSource, m: &Manifest, label: &Path) -> Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let zeros = vec![0u8; m.chunk_size as usize];
    for_each_chunk(src, m, label, |i, d| {
        hasher.update(d.unwrap_or(&zeros[..m.chunk_len(i)]));
        Ok(())
    })?;
    Ok(*hasher.finalize().as_bytes())
}

/// A sequential `Read` over a chunked file (single-threaded; `stream_file` is the parallel
/// alternative). Every chunk is checked; a bad chunk or a whole-file hash mismatch at the end
/// is an `InvalidData` error naming the chunk and file.
pub struct ChunkReader {
    root: PathBuf,
    label: PathBuf,
    m: Manifest,
    next: usize,
    cur: Vec<u8>,
    pos: usize,
    raw: Vec<u8>,
    hasher: blake3::Hasher,
    finished: bool,
}

impl ChunkReader {
    /// Open the file of `manifest_path` in archive `archive_root`.
    pub fn open(archive_root: &Path, manifest_path: &Path) -> Result<ChunkReader> {
        let m = read_manifest(manifest_path)?;
        Ok(ChunkReader::new(archive_root, m, manifest_path))
    }

    pub fn new(archive_root: &Path, m: Manifest, label: &Path) -> ChunkReader {
        ChunkReader {
            root: archive_root.to_path_buf(),
            label: label.to_path_buf(),
            m,
            next: 0,
            cur: Vec::new(),
            pos: 0,
            raw: Vec::new(),
            hasher: blake3::Hasher::new(),
            finished: false,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.m
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.next == self.m.chunks.len() {
                if !self.finished {
                    if self.m.file_hash.is_some_and(|h| self.hasher.finalize().as_bytes() != &h) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            Error::damaged(format!(
                                "{}: the rebuilt file does not match its recorded BLAKE3",
                                self.label.display()
                            )),
                        ));
                    }
                    self.finished = true;
                }
                return Ok(0);
            }
            let i = self.next;
            let len = self.m.chunk_len(i);
            match self.m.chunks[i] {
                ChunkRef::Zero => {
                    self.cur.clear();
                    self.cur.resize(len, 0);
                }
                ChunkRef::Stored(id) => {
                    load_chunk(&self.root, &id, len, &mut self.raw, &mut self.cur)
                        .map_err(|k| io::Error::new(io::ErrorKind::InvalidData, chunk_error(&id, &self.label, k)))?;
                }
            }
            self.hasher.update(&self.cur);
            self.next += 1;
            self.pos = 0;
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// All manifests of an archive (full paths, sorted): those its index (`.affa-manifests`) lists;
/// in an archive without an index (older than it) every `*.affa-manifest` file, found without
/// following symlinks and skipping the archive's `.affa-chunks/`.
pub fn list_manifests(archive_root: &Path) -> Result<Vec<PathBuf>> {
    Ok(chunked_files(archive_root)?.iter().map(|f| super::manifest_path(archive_root, f)).collect())
}

/// The chunked files of an archive, archive-relative, sorted: those its index lists, or in an
/// archive without an index every `*.affa-manifest` file less the suffix.
pub fn chunked_files(archive_root: &Path) -> Result<Vec<PathBuf>> {
    if let Some(files) = super::index::read(archive_root)? {
        return Ok(files);
    }
    Ok(walk_manifests(archive_root)?.iter().map(|m| file_of(archive_root, m)).collect())
}

/// The manifest of `rel` in an archive, if `rel` is chunked there (recorded in its index; in an
/// archive without an index, if the manifest file exists).
pub fn recorded_manifest(archive_root: &Path, rel: &Path) -> Option<PathBuf> {
    let mp = super::manifest_path(archive_root, rel);
    match super::index::read(archive_root) {
        Ok(Some(files)) => files.binary_search_by(|f| f.as_path().cmp(rel)).is_ok().then_some(mp),
        Ok(None) => fs::symlink_metadata(&mp).is_ok_and(|m| m.is_file()).then_some(mp),
        Err(_) => None,
    }
}

/// Every `*.affa-manifest` file of an archive without an index.
fn walk_manifests(archive_root: &Path) -> Result<Vec<PathBuf>> {
    let chunks = archive_root.join(ARCHIVE_CHUNK_DIR);
    let mut out = crate::fsutil::walk_files_but(archive_root, &[&chunks])?;
    out.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(MANIFEST_SUFFIX)));
    Ok(out)
}

/// The archive-relative path of the file a manifest describes.
fn file_of(archive_root: &Path, manifest_path: &Path) -> PathBuf {
    let rel = manifest_path.strip_prefix(archive_root).unwrap_or(manifest_path);
    let s = rel.to_string_lossy();
    PathBuf::from(s.strip_suffix(MANIFEST_SUFFIX).unwrap_or(&s).to_string())
}

/// One damaged or missing chunk and the files (archive-relative) that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProblem {
    pub id: String,
    pub kind: ProblemKind,
    pub files: Vec<PathBuf>,
}

/// Result of `verify_archive`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Manifests found.
    pub manifests: u64,
    /// Distinct chunks read and checked.
    pub chunks_checked: u64,
    /// Stored (compressed) bytes read.
    pub bytes_read: u64,
    /// Sum of the files' sizes.
    pub logical_bytes: u64,
    /// Damaged or missing chunks, with the files they affect.
    pub problems: Vec<ChunkProblem>,
    /// Manifests that cannot be read or parsed: (archive-relative manifest path, error).
    pub bad_manifests: Vec<(PathBuf, String)>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.bad_manifests.is_empty()
    }
    /// Archive-relative paths of every file that cannot be rebuilt.
    pub fn damaged_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.problems.iter().flat_map(|p| p.files.iter().cloned()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Check every chunk every manifest of the archive references (each distinct chunk once, in
/// parallel): present, decodes, right length, right hash. `progress` gets the stored bytes
/// read so far. The whole-file hashes are not recomputed (the chunk lists are protected by the
/// manifests' checksums; `unchunk_file` checks the whole-file hash).
pub fn verify_archive(archive_root: &Path, progress: Progress) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    let mut files: Vec<PathBuf> = Vec::new();
    // id -> (expected length, indices into `files`)
    let mut need: BTreeMap<ChunkId, (usize, Vec<usize>)> = BTreeMap::new();
    let mut conflicts: Vec<(ChunkId, usize)> = Vec::new();
    for mp in list_manifests(archive_root)? {
        rep.manifests += 1;
        let rel = mp.strip_prefix(archive_root).unwrap_or(&mp).to_path_buf();
        let m = match read_manifest(&mp) {
            Ok(m) => m,
            Err(e) => {
                rep.bad_manifests.push((rel, e.to_string()));
                continue;
            }
        };
        rep.logical_bytes += m.size;
        let fi = files.len();
        files.push(file_of(archive_root, &mp));
        for (i, c) in m.chunks.iter().enumerate() {
            if let ChunkRef::Stored(id) = c {
                let len = m.chunk_len(i);
                let e = need.entry(*id).or_insert((len, Vec::new()));
                if e.0 != len {
                    conflicts.push((*id, fi));
                }
                if e.1.last() != Some(&fi) {
                    e.1.push(fi);
                }
            }
        }
    }
    let ids: Vec<(ChunkId, usize)> = need.iter().map(|(id, (len, _))| (*id, *len)).collect();
    let mut read = 0u64;
    let mut found: BTreeMap<ChunkId, ProblemKind> = BTreeMap::new();
    pipeline::run(
        workers(),
        workers() * 2,
        |emit: &mut dyn FnMut((ChunkId, usize)) -> Result<()>| {
            for x in &ids {
                emit(*x)?;
            }
            Ok(())
        },
        |(id, len): (ChunkId, usize)| -> Result<(ChunkId, u64, Option<ProblemKind>)> {
            let (mut raw, mut out) = (Vec::new(), Vec::new());
            let r = load_chunk(archive_root, &id, len, &mut raw, &mut out);
            Ok((id, raw.len() as u64, r.err()))
        },
        |(id, n, p): (ChunkId, u64, Option<ProblemKind>)| {
            rep.chunks_checked += 1;
            read += n;
            if let Some(p) = p {
                found.insert(id, p);
            }
            if let Some(cb) = progress {
                cb(read);
            }
            Ok(())
        },
    )?;
    rep.bytes_read = read;
    for (id, fi) in conflicts {
        found
            .entry(id)
            .or_insert_with(|| ProblemKind::Damaged(format!("listed with a wrong length in {}", files[fi].display())));
    }
    for (id, kind) in found {
        let fs_: Vec<PathBuf> = need[&id].1.iter().map(|&i| files[i].clone()).collect();
        rep.problems.push(ChunkProblem { id: id_hex(&id), kind, files: fs_ });
    }
    Ok(rep)
}

/// Space numbers of one archive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveUsage {
    /// Chunked files (manifests that parse).
    pub files: u64,
    /// Sum of their sizes.
    pub logical_bytes: u64,
    /// Of which in zero chunks (not stored).
    pub zero_bytes: u64,
    /// Stored (compressed) bytes of all chunks the archive links.
    pub stored_bytes: u64,
    /// Stored bytes of chunks no other archive links (link count <= 2: this archive and the
    /// pool): about what deleting this archive and sweeping frees.
    pub exclusive_bytes: u64,
    /// Bytes the archive's chunking added to the pool (from the manifests).
    pub added_bytes: u64,
}

impl ArchiveUsage {
    /// logical / stored (1.0 when nothing is stored).
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// Compute the space numbers of an archive (reads manifests and stats chunk links; no chunk
/// data is read). Unreadable manifests are skipped (`verify_archive` reports them).
pub fn archive_usage(archive_root: &Path) -> Result<ArchiveUsage> {
    let mut u = ArchiveUsage::default();
    for mp in list_manifests(archive_root)? {
        let Ok(m) = read_manifest(&mp) else { continue };
        u.files += 1;
        u.logical_bytes += m.size;
        u.added_bytes += m.added_bytes;
        for (i, c) in m.chunks.iter().enumerate() {
            if *c == ChunkRef::Zero {
                u.zero_bytes += m.chunk_len(i) as u64;
            }
        }
    }
    let cdir = archive_root.join(ARCHIVE_CHUNK_DIR);
    if let Ok(rd) = fs::read_dir(&cdir) {
        for fan in rd.flatten() {
            let Ok(rd2) = fs::read_dir(fan.path()) else { continue };
            for e in rd2.flatten() {
                if let Ok(md) = fs::symlink_metadata(e.path()) {
                    if md.is_file() && e.file_name().to_str().and_then(super::parse_id).is_some() {
                        u.stored_bytes += md.len();
                        if md.nlink() <= 2 {
                            u.exclusive_bytes += md.len();
                        }
                    }
                }
            }
        }
    }
    Ok(u)
}

/// Remove from the pool the entries of the chunks `report` found damaged, when the pool's own
/// copy is damaged too (decode + hash), so that the next `chunk_file` of that data stores them
/// afresh even where it would otherwise trust the previous manifest. Returns how many entries
/// were removed. Archives keep their (damaged) links; they are not modified.
pub fn evict_damaged(pool: &Pool, report: &VerifyReport) -> Result<u64> {
    let mut n = 0;
    let (mut raw, mut out) = (Vec::new(), Vec::new());
    for p in &report.problems {
        let Some(id) = super::parse_id(&p.id) else { continue };
        let entry = pool.entry(&id);
        // The inode judged, and only it removed (a backup may have put a good copy in its place
        // since); an error that says nothing of its bytes (out of descriptors, a network file
        // system's hiccup) keeps it; gone already (a sweep) is not an error.
        let Ok(md) = fs::symlink_metadata(&entry) else { continue };
        let good = match pool::read_blob(&entry, &mut raw) {
            Ok(()) => blob::decode(&raw, &mut out).is_ok() && blake3::hash(&out).as_bytes() == &id,
            // Out of descriptors, a network file system's hiccup: says nothing of the bytes.
            Err(e) if super::transient_io(&e) => true,
            // Too large, not a regular file, a media or checksum error: damage.
            Err(_) => false,
        };
        let same = fs::symlink_metadata(&entry).is_ok_and(|m| m.ino() == md.ino() && m.dev() == md.dev());
        if !good && same && !md.is_dir() {
            match fs::remove_file(&entry) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx(|| format!("cannot remove {}", entry.display())),
            }
        }
    }
    Ok(n)
}
