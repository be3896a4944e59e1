//! Chunking: turn a plain staging file into pool entries, archive links and a manifest.
//!
//! Owns: `chunk_file` (reading the source in fixed chunks, skipping holes, hashing, choosing
//! between reuse / verify / store for each chunk, writing the manifest last, atomically).
//! Must never: write a manifest before every chunk it names is durably stored and linked into
//! the archive, reuse an existing pool entry without at least the cheap check (and the full
//! decode + hash check unless the previous manifest had the same id at the same index), hold
//! more than a bounded number of chunks in memory, or modify the source file.

use super::blob::Encoder;
use super::manifest::{ChunkRef, Manifest, MANIFEST_SUFFIX};
use super::pipeline;
use super::pool::{self, Checked, Pool, ARCHIVE_CHUNK_DIR};
use super::{id_hex, is_zero, ChunkId, Progress, Settings};
use crate::error::{Error, IoContext, Result};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Numbers of one `chunk_file` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Where the manifest was written.
    pub manifest_path: PathBuf,
    /// Size of the file.
    pub logical_size: u64,
    /// Number of chunks (zero chunks included).
    pub chunks: u64,
    /// All-zero chunks (recorded as `zero`, not stored).
    pub zero_chunks: u64,
    /// Chunks written to the pool by this call (new content, repairs of damaged entries, and
    /// fresh copies started because of the hard-link limit).
    pub new_chunks: u64,
    /// Compressed bytes of those (what this call added to the pool).
    pub added_bytes: u64,
    /// Non-zero chunks served by an entry already in the pool.
    pub reused_chunks: u64,
    /// Existing pool entries fully re-read, decoded and hashed before being reused.
    pub verified_chunks: u64,
    /// Existing pool entries found damaged (or truncated) and replaced.
    pub repaired_chunks: u64,
    /// A file that is not a manifest of this archive had the manifest's name (a source file
    /// named `<file>.affa-manifest` beside the chunked `<file>`): the manifest replaced it.
    pub replaced_source_file: bool,
}

#[derive(Default)]
struct Placed {
    /// The file length of the entry checked or written (recorded in the manifest).
    len: u32,
    new: bool,
    added: u64,
    verified: bool,
    repaired: bool,
}

enum Outcome {
    Zero,
    Stored(ChunkId, Placed),
}

struct Scratch {
    enc: Encoder,
    blob: Vec<u8>,
    decoded: Vec<u8>,
}

/// Check that `rel` is a plain relative path (no `..`, no root, not empty).
pub(crate) fn check_rel(rel: &Path) -> Result<()> {
    crate::untrusted::check_archive_rel(rel)
}

/// The manifest path of `rel_path` in an archive: `ARCHIVE/rel_path.affa-manifest`.
pub fn manifest_path(archive_root: &Path, rel_path: &Path) -> PathBuf {
    let mut s = archive_root.join(rel_path).into_os_string();
    s.push(MANIFEST_SUFFIX);
    PathBuf::from(s)
}

/// A file of more than [`super::MAX_CHUNKS`] chunks at this chunk size (or over 1 PiB) is
/// refused before any work: its manifest would be larger than any reader accepts.
pub fn check_chunk_count(what: &Path, size: u64, chunk_size: u32) -> Result<()> {
    let count = Manifest::chunk_count(size, chunk_size);
    if size > 1 << 50 || count > super::MAX_CHUNKS {
        crate::bail!(
            "cannot chunk {}: {size} bytes are {count} chunks of {chunk_size} bytes, more than one manifest may list ({}); set a larger chunkSize",
            what.display(),
            super::MAX_CHUNKS
        );
    }
    Ok(())
}

/// Chunk the plain file `src` into the archive `archive_root` as `rel_path` (the manifest goes
/// to `archive_root/rel_path.affa-manifest`, chunk links to `archive_root/.affa-chunks/`).
/// `previous` is the manifest of the same file in the newest earlier archive, if any: a chunk
/// it lists with the same id at the same index is reused after a cheap check only (bit flips
/// are the pool scrub's, [`super::scrub`]); every other existing pool entry is decoded and
/// hashed before reuse, and replaced when damaged. `progress` gets the bytes read so far.
pub fn chunk_file(
    pool: &Pool,
    settings: &Settings,
    src: &Path,
    archive_root: &Path,
    rel_path: &Path,
    previous: Option<&Manifest>,
    progress: Progress,
) -> Result<ChunkStats> {
    settings.validate()?;
    check_rel(rel_path)?;
    let cs = settings.chunk_size as u64;
    // The file came from a host: a symlink is not followed, a fifo or device not opened.
    let file = crate::untrusted::open_regular(src).ctx(|| format!("cannot open {}", src.display()))?;
    let meta0 = file.metadata().ctx(|| format!("cannot stat {}", src.display()))?;
    if !meta0.is_file() {
        crate::bail!("cannot chunk {}: not a regular file", src.display());
    }
    let size = meta0.len();
    let count = Manifest::chunk_count(size, settings.chunk_size);
    check_chunk_count(src, size, settings.chunk_size)?;
    let mpath = manifest_path(archive_root, rel_path);
    // The archive's directories may come from the source (rsync): none may be a symlink.
    fs::create_dir_all(archive_root).ctx(|| format!("cannot create directory {}", archive_root.display()))?;
    crate::untrusted::create_dir_beneath(archive_root, rel_path.parent().unwrap_or(Path::new("")))?;
    crate::untrusted::create_private_dir_beneath(archive_root, Path::new(ARCHIVE_CHUNK_DIR))?;
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);

    let avail = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let want = if settings.threads == 0 { avail } else { settings.threads };
    // Each worker holds up to ~3 chunk-sized buffers; keep workers' memory under ~128 MiB and
    // the chunks in flight under ~64 MiB (or workers + 1).
    let workers = want.min(((128u64 << 20) / (3 * cs)).max(1) as usize).max(1);
    let inflight = (((64u64 << 20) / cs) as usize).clamp(workers + 1, 4 * workers);
    let prev = previous.filter(|p| p.chunk_size == settings.chunk_size);

    let scratch: Mutex<Vec<Scratch>> = Mutex::new(Vec::new());
    // Each chunk this call checked (or stored) and linked, with its entry's file length.
    let placed: Mutex<HashMap<ChunkId, u32>> = Mutex::new(HashMap::new());
    let touched: Mutex<HashSet<PathBuf>> = Mutex::new(HashSet::new());
    let mut file_hash = None;
    let mut chunks: Vec<ChunkRef> = Vec::with_capacity(count.min(1 << 24) as usize);
    let mut lens: Vec<u32> = Vec::with_capacity(count.min(1 << 24) as usize);
    let mut st = ChunkStats { logical_size: size, chunks: count, ..Default::default() };
    let mut done = 0u64;

    let place = |idx: u64, id: ChunkId, data: &[u8]| -> Result<Placed> {
        let mut p = Placed::default();
        if let Some(&len) = placed.lock().unwrap().get(&id) {
            p.len = len;
            return Ok(p); // already checked and linked into this archive by this call
        }
        let mut sc = match scratch.lock().unwrap().pop() {
            Some(s) => s,
            None => Scratch {
                enc: Encoder::new(settings.compression).ctx(|| "cannot set up the compressor".to_string())?,
                blob: Vec::new(),
                decoded: Vec::new(),
            },
        };
        let entry = pool.entry(&id);
        let same_as_prev = prev.is_some_and(|m| m.chunks.get(idx as usize) == Some(&ChunkRef::Stored(id)));
        // Same id at the same index: the cheap check (one lstat against the length the
        // previous manifest recorded, pool::cheap_check); any other entry: the full check.
        let checked = match prev {
            Some(m) if same_as_prev => {
                pool::cheap_check(None, &entry, &id, m.stored_len(idx as usize), &mut sc.blob, &mut sc.decoded)
            }
            _ => pool::full_check(&entry, &id, &mut sc.blob, &mut sc.decoded),
        };
        let mut must_store = match checked {
            Checked::Good { len, verified } => {
                p.len = len;
                p.verified = verified;
                false
            }
            Checked::Damaged => {
                p.repaired = true;
                true
            }
            Checked::Missing => true,
        };
        let mut local_touched = Vec::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            if must_store {
                sc.enc.encode(data, &mut sc.blob).ctx(|| format!("cannot compress chunk {}", id_hex(&id)))?;
                pool.write_entry(&id, &sc.blob, &mut local_touched)?;
                p.new = true;
                p.added += sc.blob.len() as u64;
                // A chunk file is at most MAX_CHUNK_FILE_LEN bytes (encode never grows a chunk).
                p.len = u32::try_from(sc.blob.len()).unwrap_or(0);
            }
            match pool.link_into(&id, archive_root, &mut local_touched) {
                Ok(()) => break,
                // Hard-link limit reached: start a fresh pool copy of this chunk (the full
                // inode stays alive through the archives that link it).
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) && attempts < 3 => must_store = true,
                // The entry vanished (a concurrent sweep): store it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => must_store = true,
                Err(e) => return Err(e).ctx(|| pool::link_failed(&id, archive_root)),
            }
        }
        scratch.lock().unwrap().push(sc);
        placed.lock().unwrap().insert(id, p.len);
        touched.lock().unwrap().extend(local_touched);
        Ok(p)
    };

    pipeline::run(
        workers,
        inflight,
        |emit: &mut dyn FnMut((u64, Option<Vec<u8>>)) -> Result<()>| -> Result<()> {
            let mut hasher = blake3::Hasher::new();
            let zeros = vec![0u8; cs.min(size.max(1)) as usize];
            for idx in 0..count {
                let off = idx * cs;
                let len = (size - off).min(cs) as usize;
                // A chunk entirely inside a hole is zero without reading it.
                let hole = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(off)) {
                    Ok(data_at) => data_at >= off + len as u64,
                    Err(e) => e == rustix::io::Errno::NXIO,
                };
                if hole {
                    hasher.update(&zeros[..len]);
                    emit((idx, None))?;
                    continue;
                }
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, off).ctx(|| format!("cannot read {} at offset {off}", src.display()))?;
                hasher.update(&buf);
                emit((idx, Some(buf)))?;
            }
            let m = file.metadata().ctx(|| format!("cannot stat {}", src.display()))?;
            if m.len() != size || m.mtime() != meta0.mtime() || m.mtime_nsec() != meta0.mtime_nsec() {
                crate::bail!("{} changed while it was being chunked", src.display());
            }
            file_hash = Some(*hasher.finalize().as_bytes());
            Ok(())
        },
        |(idx, data): (u64, Option<Vec<u8>>)| -> Result<(u64, Outcome)> {
            let len = (size - idx * cs).min(cs);
            match data {
                None => Ok((len, Outcome::Zero)),
                Some(d) if is_zero(&d) => Ok((len, Outcome::Zero)),
                Some(d) => {
                    let id = *blake3::hash(&d).as_bytes();
                    Ok((len, Outcome::Stored(id, place(idx, id, &d)?)))
                }
            }
        },
        |(len, out): (u64, Outcome)| -> Result<()> {
            match out {
                Outcome::Zero => {
                    st.zero_chunks += 1;
                    chunks.push(ChunkRef::Zero);
                    lens.push(0);
                }
                Outcome::Stored(id, p) => {
                    chunks.push(ChunkRef::Stored(id));
                    lens.push(p.len);
                    st.new_chunks += p.new as u64;
                    st.added_bytes += p.added;
                    st.verified_chunks += p.verified as u64;
                    st.repaired_chunks += p.repaired as u64;
                    if !p.new {
                        st.reused_chunks += 1;
                    }
                }
            }
            done += len;
            if let Some(cb) = progress {
                cb(done);
            }
            Ok(())
        },
    )
    .map_err(|e| e.context(format!("cannot chunk {}", src.display())))?;

    let file_hash = file_hash.ok_or_else(|| Error::new("chunk reader ended early"))?;
    // Make every rename and link durable before the manifest can name them.
    pool::fsync_dirs(&touched.into_inner().unwrap())?;
    let manifest = Manifest {
        size,
        mode: meta0.mode() & 0o7777,
        uid: meta0.uid(),
        gid: meta0.gid(),
        mtime: (meta0.mtime(), meta0.mtime_nsec() as u32),
        atime: Some((meta0.atime(), meta0.atime_nsec() as u32)),
        chunk_size: settings.chunk_size,
        compression: settings.compression,
        file_hash: Some(file_hash),
        added_bytes: st.added_bytes,
        chunks,
        stored_lens: Some(lens),
    };
    st.replaced_source_file = place_manifest(archive_root, rel_path, &mpath, &manifest)?;
    st.manifest_path = mpath;
    Ok(st)
}

/// Write `manifest` durably to `mpath` and record `rel_path` in the archive's index (the last
/// step of chunking a file). Returns true when a file that is not a manifest of this archive had
/// the manifest's name (a source file the transfer brought): it gave way.
pub(crate) fn place_manifest(archive_root: &Path, rel_path: &Path, mpath: &Path, manifest: &Manifest) -> Result<bool> {
    let replaced = fs::symlink_metadata(mpath).is_ok()
        && !super::index::read(archive_root)?.is_some_and(|recorded| recorded.iter().any(|r| r == rel_path));
    if replaced && fs::symlink_metadata(mpath).is_ok_and(|m| m.file_type().is_symlink()) {
        // The secure writer refuses to replace a symlink: this one is the source's own data in
        // the archive being built, so it is unlinked (unlink never follows it).
        fs::remove_file(mpath).ctx(|| format!("cannot remove {}", mpath.display()))?;
    }
    let bytes = manifest.to_bytes();
    if bytes.len() as u64 > super::MAX_MANIFEST_LEN {
        crate::bail!(
            "the manifest of {} would be {} bytes, more than a reader accepts ({}): set a larger chunkSize",
            mpath.display(),
            bytes.len(),
            super::MAX_MANIFEST_LEN
        );
    }
    crate::fsutil::write_atomic(mpath, &bytes, crate::fsutil::Perm::Mode(0o600))?;
    super::index::record(archive_root, rel_path)?;
    Ok(replaced)
}
