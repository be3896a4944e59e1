//! affa's side of the agent protocol (docs/PROTOCOL.md): the backup of one file read by
//! `affa-agent` on the source host, straight into the pool and the archive: no staging copy, no
//! read of old data except the pool's own damage checks.
//!
//! Owns: `Agent` (a session: handshake, bye), `backup_file` and `backup_file_ranged` (the
//! request, answering the agent's chunk reports from the pool, checking and storing the chunks
//! it sends, for a ranged (CBT) backup the chunks carried from the previous manifest, the
//! manifest last; pool writes and carried links run on `chunk/writers.rs`'s threads), `chunk_ranges` (changed byte extents rounded out to the chunk grid) and `restore_file` (the manifest sent to the agent, each chunk it asks for read from
//! the archive and verified before it is sent). Must never: trust the agent (a compromised
//! host): a chunk is stored only after it decoded to the chunk's exact length and its BLAKE3
//! equals the id the manifest will name; an index, size or count outside what the agent
//! announced or asked in order is a protocol error; a manifest is written only after `END` and
//! only when every chunk it names is durably stored and linked; a chunk that does not verify is
//! never sent.

use super::blob;
use super::build::{check_rel, manifest_path};
use super::manifest::{ChunkRef, Manifest};
use super::pool::{self, Checked, Pool, ARCHIVE_CHUNK_DIR};
use super::restore::{chunk_error, load_chunk_file, read_manifest, whole_file_hash};
use super::writers;
use super::{id_hex, ChunkId, ChunkStats, Compression, Settings};
use crate::error::{Error, IoContext, Result};
use affa_agent_proto::{self as proto, shown, ChunkKind, FrameReader, FrameWriter, Msg};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A session with an agent (its stdout as `R`, its stdin as `W`: e.g. the pipes of
/// `ssh HOST affa-agent --serve`).
pub struct Agent<R: Read, W: Write> {
    r: FrameReader<R>,
    w: FrameWriter<W>,
    /// The agent's `software` string (shown safely).
    pub software: String,
    /// BLAKE3 of the agent's executable as it reported it (zeros: unknown).
    pub exe_hash: [u8; 32],
    label: String,
    /// The chunks affa may tell this agent it already has without their data (None: any chunk
    /// of the pool). See [`Agent::limit_known`].
    known: Option<JobKnown>,
}

/// A job's own chunks (agentDedupScope=job): those its archives link, and those this session
/// stored or reused.
struct JobKnown {
    archives: Vec<PathBuf>,
    session: HashSet<ChunkId>,
}

fn perr(label: &str, e: proto::Error) -> Error {
    Error::new(format!("agent {label}: {e}"))
}

impl<R: Read, W: Write> Agent<R, W> {
    /// Handshake. `label` names the agent in errors (e.g. `HOST:/path/affa-agent`).
    pub fn connect(stdout: R, stdin: W, label: &str) -> Result<Self> {
        let mut r = FrameReader::new(stdout);
        let mut w = FrameWriter::new(stdin);
        let me = concat!("affa ", env!("CARGO_PKG_VERSION"));
        let (software, exe_hash) = proto::handshake(&mut r, &mut w, me, [0; 32], false).map_err(|e| perr(label, e))?;
        Ok(Agent { r, w, software: shown(&software), exe_hash, label: label.to_string(), known: None })
    }

    /// Answer "have it" to a `hash` report only for the chunks these archives (the job's own,
    /// every one of them, the likeliest first) link in their `.affa-chunks`, and for the chunks
    /// this session stored or reused since; every other chunk is asked for, and its data
    /// stored, or linked to the pool's entry when the pool already holds it (storage is
    /// deduplicated either way). Without it, any chunk of the pool is answered as had: less
    /// traffic across jobs, but the answers tell the agent whether the pool holds a chunk of a
    /// given BLAKE3, and an agent naming a hash it learnt elsewhere would get that chunk into its
    /// archive (docs/SECURITY.md, "affa-agent on a source host"). The cost is a few `lstat`s per
    /// `hash` report the pool can answer (none for a chunk the pool lacks).
    pub fn limit_known(&mut self, archives: Vec<PathBuf>) {
        self.known = Some(JobKnown { archives, session: HashSet::new() });
    }

    /// Whether a `hash` report of `id` may be answered from the pool (`entry` its pool entry).
    fn may_know(&self, id: &ChunkId, entry: &Path) -> bool {
        let Some(k) = &self.known else { return true };
        if k.session.contains(id) {
            return true;
        }
        // A chunk the pool lacks is asked for anyway: no archive to look in.
        entry.symlink_metadata().is_ok()
            && k.archives.iter().any(|a| pool::archive_entry(a, id).symlink_metadata().is_ok())
    }

    fn now_known(&mut self, ids: impl IntoIterator<Item = ChunkId>) {
        if let Some(k) = self.known.as_mut() {
            k.session.extend(ids);
        }
    }

    /// Frame bytes received from the agent so far.
    pub fn bytes_in(&self) -> u64 {
        self.r.bytes_in
    }

    /// Frame bytes sent to the agent so far.
    pub fn bytes_out(&self) -> u64 {
        self.w.bytes_out
    }

    /// End the session cleanly (`BYE`, answered by `BYE`).
    pub fn bye(mut self) -> Result<()> {
        let label = self.label.clone();
        self.w.send(&Msg::Bye).map_err(|e| perr(&label, e))?;
        match self.recv()? {
            Msg::Bye => Ok(()),
            m => crate::bail!("agent {label}: expected BYE, received {}", m.name()),
        }
    }

    fn send(&mut self, m: &Msg) -> Result<()> {
        self.w.send_noflush(m).map_err(|e| perr(&self.label, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| perr(&self.label, e))
    }

    fn recv(&mut self) -> Result<Msg> {
        // Only the frames an agent sends are decoded: a frame of a kind only affa sends (a
        // PREV of 16 MiB decodes into ~550 MB of entries) is refused by its type first.
        use proto::ty;
        const FROM_AGENT: [u8; 11] = [
            ty::ERROR,
            ty::BYE,
            ty::OPENED,
            ty::CHUNK,
            ty::DATA,
            ty::END,
            ty::FAULT,
            ty::RNEED,
            ty::ROPENED,
            ty::RDONE,
            ty::HELLO,
        ];
        let m = match self.r.next_raw() {
            Ok(Some((t, _))) if !FROM_AGENT.contains(&t) => {
                return Err(Error::new(format!(
                    "agent {}: sent a frame of type 0x{t:02x}, which an agent never sends",
                    self.label
                )))
            }
            Ok(Some((t, body))) => Msg::decode(t, body),
            Ok(None) => Err(proto::Error::Eof),
            Err(e) => Err(e),
        };
        match m {
            Ok(Msg::Error { message }) => Err(Error::new(format!("agent {}: {}", self.label, shown(&message)))),
            Ok(m) => Ok(m),
            Err(e) => Err(perr(&self.label, e)),
        }
    }
}

/// Numbers of one `backup_file`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// As `chunk_file` counts them.
    pub chunk: ChunkStats,
    /// Chunk files the agent sent (`DATA` frames).
    pub data_frames: u64,
    /// Frame bytes received from the agent for this file.
    pub bytes_received: u64,
    /// Bytes the agent read from the source disk (holes not counted).
    pub source_bytes_read: u64,
    /// A ranged (CBT) backup: chunks the request named (the changed ones plus carried chunks
    /// whose pool entry failed its check), the others carried from the previous manifest.
    pub ranged: bool,
    pub range_chunks: u64,
}

/// The chunk-index ranges (`start..end`, sorted, merged, neither overlapping nor adjacent, as
/// the `RANGES` frame wants them) covering the byte extents `(offset, length)` of a file of
/// `size` bytes at `chunk_size`: each extent rounded out to the chunk grid, cut at the file's
/// end. Extents may come in any order and overlap; empty ones are ignored.
pub fn chunk_ranges(extents: &[(u64, u64)], chunk_size: u32, size: u64) -> Vec<(u64, u64)> {
    let cs = chunk_size as u64;
    let count = Manifest::chunk_count(size, chunk_size);
    let mut rs: Vec<(u64, u64)> = extents
        .iter()
        .filter(|&&(off, len)| len > 0 && off < size)
        .map(|&(off, len)| (off / cs, off.saturating_add(len).min(size).div_ceil(cs).min(count)))
        .collect();
    merge_ranges(&mut rs);
    rs
}

/// Sort and merge index ranges (overlapping or adjacent ones become one).
fn merge_ranges(rs: &mut Vec<(u64, u64)>) {
    rs.retain(|&(s, e)| s < e);
    rs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(rs.len());
    for &(s, e) in rs.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *rs = out;
}

/// The source of a [`backup_file`] error whose file did not exist when the agent opened it
/// (`FAULT vanished` before `OPENED`; the session stays usable): see [`source_vanished`].
#[derive(Debug, Clone, Copy)]
pub struct SourceVanished;

impl std::fmt::Display for SourceVanished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the file vanished before it was read")
    }
}

impl std::error::Error for SourceVanished {}

/// Whether `e` (from [`backup_file`]) says the file did not exist when the agent opened it: the
/// agent read nothing, nothing was written for it, and the session stays usable.
pub fn source_vanished(e: &Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<SourceVanished>())
}

fn compression_code(c: Compression) -> (u8, u8) {
    match c {
        Compression::None => (0, 0),
        Compression::Zstd(l) => (1, l.clamp(1, 19) as u8),
        Compression::Lz4 => (2, 0),
    }
}

/// Back up `remote_path` on the agent's host into the archive `archive_root` as `rel_path`
/// (manifest `archive_root/rel_path.affa-manifest`, chunk links in `.affa-chunks/`), as
/// `chunk_file` does for a local file. `previous` is the same file's manifest in the newest
/// earlier archive: the agent reports chunks unchanged against it, which get the cheap check
/// only (bit flips are the pool scrub's), and other chunks the pool already holds are verified before reuse.
/// A fault at the source (the file vanished, changed, a read error) is an error naming the
/// file; the session stays usable after it ([`source_vanished`] tells a file that did not exist
/// at the start of the read). Any other error leaves the session unusable.
pub fn backup_file<R: Read, W: Write>(
    agent: &mut Agent<R, W>,
    pool: &Pool,
    settings: &Settings,
    remote_path: &Path,
    archive_root: &Path,
    rel_path: &Path,
    previous: Option<&Manifest>,
) -> Result<RemoteStats> {
    backup_retrying(agent, archive_root, remote_path, |a, read| {
        backup(a, pool, settings, remote_path, archive_root, rel_path, previous, None, read)
    })
}

/// A ranged backup (Changed Block Tracking, docs/PROTOCOL.md "Ranged backup"): the agent reads
/// only the chunks of `ranges` (chunk indices, as `chunk_ranges` gives them); every other chunk
/// is carried from `previous`, which must have `settings.chunk_size` and the file's length (else
/// an error, no manifest: the caller fails the file's backup). A carried stored chunk whose pool entry
/// fails its cheap check is added to the ranges.
/// The manifest has no whole-file hash (version 2). Errors as `backup_file`.
#[allow(clippy::too_many_arguments)]
pub fn backup_file_ranged<R: Read, W: Write>(
    agent: &mut Agent<R, W>,
    pool: &Pool,
    settings: &Settings,
    remote_path: &Path,
    archive_root: &Path,
    rel_path: &Path,
    previous: &Manifest,
    ranges: &[(u64, u64)],
) -> Result<RemoteStats> {
    if previous.chunk_size != settings.chunk_size {
        crate::bail!(
            "{}: a ranged backup needs the previous manifest's chunk size ({}), not {}",
            remote_path.display(),
            previous.chunk_size,
            settings.chunk_size
        );
    }
    backup_retrying(agent, archive_root, remote_path, |a, read| {
        backup(a, pool, settings, remote_path, archive_root, rel_path, Some(previous), Some(ranges), read)
    })
}

/// How one request ended.
enum Attempt {
    Done(RemoteStats),
    /// Carried chunks that could not be linked (their entry vanished between its check and the
    /// link, which ran beside the agent's read): no manifest was written; the request is made
    /// again with what this one placed kept and these read from the host.
    Again(Seed),
}

/// What a request left for the next one of the same file into the same archive.
#[derive(Default)]
struct Seed {
    /// Carried chunks it could not link: read from the host this time.
    read_again: HashSet<ChunkId>,
    /// Chunks it placed (checked or stored, linked, their directories fsynced), with their
    /// entry's length: neither checked nor asked for again.
    placed: HashMap<ChunkId, u32>,
    /// Of those, the ones it stored (counted new, not reused).
    stored: HashSet<ChunkId>,
    /// Its counters: the chunk counters carry on, the transfer's are added at the end.
    stats: RemoteStats,
}

/// `again` once; once more, seeded, when carried chunks could not be linked.
fn backup_retrying<A>(
    agent: &mut A,
    archive_root: &Path,
    remote_path: &Path,
    mut again: impl FnMut(&mut A, &Seed) -> Result<Attempt>,
) -> Result<RemoteStats> {
    match again(agent, &Seed::default())? {
        Attempt::Done(st) => Ok(st),
        Attempt::Again(seed) => match again(agent, &seed)? {
            Attempt::Done(mut st) => {
                // The first request's transfer happened all the same.
                st.bytes_received += seed.stats.bytes_received;
                st.source_bytes_read += seed.stats.source_bytes_read;
                st.data_frames += seed.stats.data_frames;
                Ok(st)
            }
            Attempt::Again(seed) => crate::bail!(
                "{}: {} carried chunk(s) could not be linked into {} twice (their pool entries keep vanishing)",
                remote_path.display(),
                seed.read_again.len(),
                archive_root.join(ARCHIVE_CHUNK_DIR).display()
            ),
        },
    }
}

/// How an existing pool entry is checked before reuse.
#[derive(Clone, Copy)]
enum Check {
    /// The previous manifest names the same id at this index: the cheap check against the
    /// length it recorded, if any (`pool::cheap_check`: one lstat).
    Cheap(Option<u32>),
    /// Any other entry: read, decoded and hashed.
    Full,
}

/// Whether the pool entry of `id` can be reused as it is, and then its file length (recorded
/// in the new manifest). A damaged entry is counted in `st.repaired_chunks` (the caller stores
/// it again, and must not check it again in this run: see `failed` in `backup`).
fn trusted_entry(
    dirs: &pool::FanDirs,
    entry: &Path,
    id: &ChunkId,
    check: Check,
    st: &mut ChunkStats,
    blob_buf: &mut Vec<u8>,
    decoded: &mut Vec<u8>,
) -> Option<u32> {
    let checked = match check {
        Check::Cheap(recorded) => pool::cheap_check(Some(dirs), entry, id, recorded, blob_buf, decoded),
        Check::Full => pool::full_check(entry, id, blob_buf, decoded),
    };
    match checked {
        Checked::Good { len, verified } => {
            st.verified_chunks += verified as u64;
            Some(len)
        }
        Checked::Damaged => {
            st.repaired_chunks += 1;
            None
        }
        Checked::Missing => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn backup<R: Read, W: Write>(
    agent: &mut Agent<R, W>,
    pool: &Pool,
    settings: &Settings,
    remote_path: &Path,
    archive_root: &Path,
    rel_path: &Path,
    previous: Option<&Manifest>,
    ranges: Option<&[(u64, u64)]>,
    seed: &Seed,
) -> Result<Attempt> {
    settings.validate()?;
    check_rel(rel_path)?;
    let label = agent.label.clone();
    let what = format!("{label}: {}", remote_path.display());
    let bad = |m: String| Error::new(format!("agent {what}: {m}"));
    let cs = settings.chunk_size;
    let prev = previous.filter(|p| p.chunk_size == cs);
    let mpath = manifest_path(archive_root, rel_path);
    fs::create_dir_all(archive_root).ctx(|| format!("cannot create directory {}", archive_root.display()))?;
    crate::untrusted::create_dir_beneath(archive_root, rel_path.parent().unwrap_or(Path::new("")))?;
    crate::untrusted::create_private_dir_beneath(archive_root, Path::new(ARCHIVE_CHUNK_DIR))?;
    let in0 = agent.bytes_in();
    let mut st = RemoteStats::default();
    // An earlier request of this file (Seed): its chunk counters go on.
    st.chunk.new_chunks = seed.stats.chunk.new_chunks;
    st.chunk.added_bytes = seed.stats.chunk.added_bytes;
    st.chunk.repaired_chunks = seed.stats.chunk.repaired_chunks;
    st.chunk.verified_chunks = seed.stats.chunk.verified_chunks;
    // Every chunk checked (or stored) and linked into the archive, with its entry's length.
    let mut placed: HashMap<ChunkId, u32> = seed.placed.clone();
    // Chunks whose entry failed its check (or link) in this run: asked for, never re-checked
    // (a repair is counted once).
    let mut failed: HashSet<ChunkId> = seed.read_again.clone();
    let mut touched: HashSet<PathBuf> = HashSet::new();
    let (mut blob_buf, mut decoded) = (Vec::new(), Vec::new());
    // The reused chunks' checks (one `lstat` each) and links into the archive, here and on the
    // writer threads, through one set of open fan-out directories.
    let dirs = pool::LinkDirs::new(pool, archive_root);
    let pool_dirs = &dirs.pool;
    let mut linker = pool::Linker::new(pool, &dirs);

    // New chunk files are written and linked on the writer threads (chunk/writers.rs), the
    // carried chunks linked there while the agent reads; this loop only receives and checks.
    let ((opened, end, chunks, ranged), outcome) = writers::run(pool, archive_root, &dirs, cs, |w| {
        // A ranged backup: the chunks outside the ranges are carried (checked now, linked beside
        // the agent's read); the ones whose entry fails its check are read again.
        let mut carried: Vec<ChunkId> = Vec::new();
        let ranges: Option<Vec<(u64, u64)>> = match (ranges, prev) {
            (None, _) => None,
            (Some(_), None) => crate::bail!("{what}: a ranged backup needs a previous manifest"),
            (Some(rs), Some(p)) => {
                let count = p.chunks.len() as u64;
                let mut rs: Vec<(u64, u64)> = rs.iter().map(|&(s, e)| (s.min(count), e.min(count))).collect();
                merge_ranges(&mut rs);
                let mut extra = Vec::new();
                let mut next = rs.iter().peekable();
                for (i, c) in p.chunks.iter().enumerate() {
                    let i = i as u64;
                    while next.peek().is_some_and(|&&(_, e)| e <= i) {
                        next.next();
                    }
                    if next.peek().is_some_and(|&&(s, _)| s <= i) {
                        continue;
                    }
                    match c {
                        ChunkRef::Zero => st.chunk.zero_chunks += 1,
                        ChunkRef::Stored(id) => {
                            let ok = placed.contains_key(id) || {
                                let check = Check::Cheap(p.stored_len(i as usize));
                                let entry = pool.entry(id);
                                let len = (!failed.contains(id))
                                    .then(|| {
                                        trusted_entry(
                                            pool_dirs,
                                            &entry,
                                            id,
                                            check,
                                            &mut st.chunk,
                                            &mut blob_buf,
                                            &mut decoded,
                                        )
                                    })
                                    .flatten();
                                match len {
                                    Some(len) => {
                                        placed.insert(*id, len);
                                        carried.push(*id);
                                        true
                                    }
                                    None => {
                                        failed.insert(*id);
                                        false
                                    }
                                }
                            };
                            if ok {
                                st.chunk.reused_chunks += !seed.stored.contains(id) as u64;
                            } else {
                                extra.push((i, i + 1));
                            }
                        }
                    }
                }
                rs.extend(extra);
                merge_ranges(&mut rs);
                w.carry(std::mem::take(&mut carried))?;
                st.ranged = true;
                st.range_chunks = rs.iter().map(|&(s, e)| e - s).sum();
                Some(rs)
            }
        };

        // The request.
        let (compression, level) = compression_code(settings.compression);
        // A ranged request: the agent consults only the entries inside the ranges, so the others
        // go as tag 0 (docs/PROTOCOL.md, "Ranged backup"): the request follows the change.
        let inside = |i: usize| {
            ranges.as_ref().is_none_or(|rs| {
                let i = i as u64;
                let at = rs.partition_point(|&(_, e)| e <= i);
                rs.get(at).is_some_and(|&(s, _)| s <= i)
            })
        };
        let prev_entries: Vec<Option<ChunkId>> = prev
            .map(|p| {
                p.chunks
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c {
                        ChunkRef::Stored(id) if inside(i) => Some(*id),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        agent.send(&Msg::Backup(proto::Backup {
            path: remote_path.as_os_str().as_bytes().to_vec(),
            chunk_size: cs,
            compression,
            level,
            prev_count: prev_entries.len() as u64,
            ranged: ranges.is_some(),
        }))?;
        for (i, part) in prev_entries.chunks(proto::PREV_PER_FRAME).enumerate() {
            agent.send(&Msg::Prev { start: (i * proto::PREV_PER_FRAME) as u64, entries: part.to_vec() })?;
        }
        for part in ranges.as_deref().unwrap_or_default().chunks(proto::RANGES_PER_FRAME) {
            agent.send(&Msg::Ranges(part.to_vec()))?;
        }
        agent.send(&Msg::Start)?;
        agent.flush()?;

        let fault = |kind: proto::FaultKind, offset: u64, message: &str| {
            Error::new(format!("{what}: {} (offset {offset}): {}", kind.name(), shown(message)))
        };
        let opened = match agent.recv()? {
            Msg::Opened(o) => o,
            // Missing before the read began (it vanished after the caller listed it): marked, so
            // that a caller may treat it as rsync treats a vanished file.
            Msg::Fault { kind: kind @ proto::FaultKind::Vanished, offset, message } => {
                return Err(fault(kind, offset, &message).with_source(SourceVanished))
            }
            Msg::Fault { kind, offset, message } => return Err(fault(kind, offset, &message)),
            m => return Err(bad(format!("expected OPENED, received {}", m.name()))),
        };
        if opened.size > 1 << 50 || opened.window == 0 || opened.window > proto::MAX_WINDOW {
            return Err(bad(format!("bad OPENED (size {}, window {})", opened.size, opened.window)));
        }
        // More chunks than a manifest may list: refused before a report is read (the list of
        // reports is kept in memory, 33 bytes each, whatever size the agent claims).
        super::build::check_chunk_count(remote_path, opened.size, cs)?;
        let count = Manifest::chunk_count(opened.size, cs);
        let chunk_len = |i: u64| (opened.size - i * cs as u64).min(cs as u64) as usize;
        if let (Some(_), Some(p)) = (&ranges, prev) {
            if p.size != opened.size {
                return Err(bad(format!(
                    "the file is {} bytes, the previous manifest {}: a ranged backup needs the same length",
                    opened.size, p.size
                )));
            }
        }

        st.chunk.logical_size = opened.size;
        st.chunk.chunks = count;
        let mut asked: HashSet<ChunkId> = HashSet::new();
        // Asked for only because they are not this job's (limit_known): when their data comes, the
        // pool's entry is tried first. A chunk asked for because its entry failed its check is
        // not tried again (it was counted repaired once, and its data replaces the entry).
        let mut foreign: HashSet<ChunkId> = HashSet::new();
        // Ranged: the previous manifest's list, the ranges overwritten as the reports come.
        let mut chunks: Vec<ChunkRef> = match (&ranges, prev) {
            (Some(_), Some(p)) => p.chunks.clone(),
            _ => Vec::with_capacity(count.min(1 << 20) as usize),
        };
        let mut expect = ranges.as_deref().map(|rs| rs.iter().flat_map(|&(s, e)| s..e));
        let mut reported = 0u64;
        let mut wanted: VecDeque<(u64, ChunkId)> = VecDeque::new();
        let end = loop {
            match agent.recv()? {
                Msg::Chunk { index, kind } => {
                    let want = match &mut expect {
                        Some(it) => it.next(),
                        None => Some(reported).filter(|&i| i < count),
                    };
                    if want != Some(index) {
                        return Err(bad(format!(
                            "CHUNK {index}: expected {} of {count}",
                            want.map_or("no further chunk".to_string(), |i| format!("chunk {i}"))
                        )));
                    }
                    reported += 1;
                    let mut put = |r: ChunkRef| {
                        if ranges.is_some() {
                            chunks[index as usize] = r;
                        } else {
                            chunks.push(r);
                        }
                    };
                    let id = match kind {
                        ChunkKind::Zero => {
                            st.chunk.zero_chunks += 1;
                            put(ChunkRef::Zero);
                            continue;
                        }
                        ChunkKind::Same => match prev_entries.get(index as usize) {
                            Some(Some(id)) => *id,
                            _ => {
                                return Err(bad(format!(
                                    "CHUNK {index} 'same', but the previous manifest has no id there"
                                )))
                            }
                        },
                        ChunkKind::Hash(id) => id,
                    };
                    put(ChunkRef::Stored(id));
                    let entry = pool.entry(&id);
                    // Placed, or asked for at an earlier index (a chunk repeated within the window):
                    // linked when its data arrives, which the END check requires.
                    let usable = if placed.contains_key(&id) || asked.contains(&id) {
                        true
                    } else if failed.contains(&id) {
                        // Its entry failed in this run already (a carried chunk read again).
                        false
                    } else if matches!(kind, ChunkKind::Hash(_)) && !agent.may_know(&id, &entry) {
                        // Not this job's: its data is asked for, whatever the pool holds.
                        foreign.insert(id);
                        false
                    } else {
                        // A `hash` report (new to this index) is always fully checked; a `same`
                        // one gets the cheap check against the previous manifest's length.
                        let check = match kind {
                            ChunkKind::Same => Check::Cheap(prev.and_then(|p| p.stored_len(index as usize))),
                            _ => Check::Full,
                        };
                        let len =
                            trusted_entry(pool_dirs, &entry, &id, check, &mut st.chunk, &mut blob_buf, &mut decoded);
                        // A link that fails (entry swept meanwhile, link limit) is stored afresh.
                        match len.filter(|_| linker.link(&id).is_ok()) {
                            Some(len) => {
                                placed.insert(id, len);
                                true
                            }
                            None => {
                                failed.insert(id);
                                false
                            }
                        }
                    };
                    if usable {
                        st.chunk.reused_chunks += !seed.stored.contains(&id) as u64;
                    } else {
                        wanted.push_back((index, id));
                        asked.insert(id);
                        // An agent sends a chunk's DATA before its next report once `window`
                        // reports wait for answers: more asked and not sent is a lie, and
                        // what is asked is kept in memory.
                        if wanted.len() > opened.window as usize {
                            return Err(bad(format!(
                                "{} chunks asked for and not sent, more than the window of {} it announced",
                                wanted.len(),
                                opened.window
                            )));
                        }
                    }
                    agent.send(&Msg::Answer { index, need: !usable })?;
                    agent.flush()?;
                }
                Msg::Data { index, blob: data } => {
                    let Some((idx, id)) = wanted.pop_front() else {
                        return Err(bad(format!("DATA for chunk {index}, none was asked for")));
                    };
                    if idx != index {
                        return Err(bad(format!("DATA for chunk {index}, expected chunk {idx}")));
                    }
                    let len = chunk_len(index);
                    let hdr_ok = matches!(blob::parse_header(&data), Ok((_, raw, _)) if raw == len);
                    if !hdr_ok || blob::decode(&data, &mut decoded).is_err() || blake3::hash(&decoded).as_bytes() != &id
                    {
                        return Err(bad(format!(
                            "chunk {index} does not decode to {len} bytes with id {}",
                            id_hex(&id)
                        )));
                    }
                    st.data_frames += 1;
                    // Asked for although the pool may hold it (limit_known): the pool's entry, if
                    // it checks, is linked rather than replaced (the archives keep sharing it).
                    if foreign.remove(&id) {
                        let len = trusted_entry(
                            pool_dirs,
                            &pool.entry(&id),
                            &id,
                            Check::Full,
                            &mut st.chunk,
                            &mut blob_buf,
                            &mut decoded,
                        );
                        if let Some(len) = len.filter(|_| linker.link(&id).is_ok()) {
                            placed.insert(id, len);
                            st.chunk.reused_chunks += 1;
                            continue;
                        }
                    }
                    // Stored and linked on a writer thread; placed when it is done.
                    st.chunk.new_chunks += 1;
                    st.chunk.added_bytes += data.len() as u64;
                    w.store(id, data)?;
                }
                Msg::End(e) => break e,
                Msg::Fault { kind, offset, message } => return Err(fault(kind, offset, &message)),
                m => return Err(bad(format!("unexpected {} during a backup", m.name()))),
            }
        };
        let all_reported = match &mut expect {
            Some(it) => it.next().is_none(),
            None => reported == count,
        };
        if !all_reported || chunks.len() as u64 != count || !wanted.is_empty() {
            return Err(bad(format!(
                "END after {reported} chunk reports of {count}, {} asked for not sent",
                wanted.len()
            )));
        }
        if end.size != opened.size
            || end.mtime != opened.mtime
            || end.chunks_sent != st.data_frames
            || end.bytes_read > opened.size
        {
            return Err(bad("END disagrees with OPENED or with the chunks sent".into()));
        }
        Ok((opened, end, chunks, ranges.is_some()))
    })?;
    placed.extend(outcome.stored.iter().copied());
    touched.extend(outcome.touched);
    touched.extend(linker.touched());
    let fresh = outcome.fresh.len() as u64;
    st.chunk.new_chunks += fresh;
    st.chunk.reused_chunks = st.chunk.reused_chunks.saturating_sub(fresh);
    st.chunk.added_bytes += outcome.fresh_bytes;
    // A ranged read never saw the whole file: its manifest is CBT-derived (version 2).
    let file_hash = match (end.file_hash, ranged) {
        (_, true) => None,
        (Some(h), false) => Some(h),
        (None, false) => return Err(bad("END without the whole-file hash".into())),
    };
    st.source_bytes_read = end.bytes_read;
    st.bytes_received = agent.bytes_in() - in0;

    // Every rename and link durable (also before a request made again: what this one placed
    // is kept).
    pool::fsync_dirs(&touched)?;
    if !outcome.unlinked.is_empty() {
        // No manifest: the caller asks again, these read from the host.
        let read_again: HashSet<ChunkId> = outcome.unlinked.into_iter().collect();
        placed.retain(|id, _| !read_again.contains(id));
        let mut stored: HashSet<ChunkId> = seed.stored.clone();
        stored.extend(outcome.stored.iter().map(|&(id, _)| id).chain(outcome.fresh));
        return Ok(Attempt::Again(Seed { read_again, placed, stored, stats: st }));
    }
    // Every stored chunk the manifest names was placed in this run (carried, checked or
    // stored): its entry's length. (0, written as a version 1/2 manifest, cannot happen.)
    let stored_lens = chunks
        .iter()
        .map(|c| match c {
            ChunkRef::Zero => 0,
            ChunkRef::Stored(id) => placed.get(id).copied().unwrap_or(0),
        })
        .collect();
    let manifest = Manifest {
        size: opened.size,
        mode: opened.mode & 0o7777,
        uid: opened.uid,
        gid: opened.gid,
        mtime: opened.mtime,
        atime: Some(opened.atime),
        chunk_size: cs,
        compression: settings.compression,
        file_hash,
        added_bytes: st.chunk.added_bytes,
        chunks,
        stored_lens: Some(stored_lens),
    };
    st.chunk.replaced_source_file = super::build::place_manifest(archive_root, rel_path, &mpath, &manifest)?;
    st.chunk.manifest_path = mpath;
    agent.now_known(placed.into_keys());
    Ok(Attempt::Done(st))
}

/// Numbers of one `restore_file`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// The file's size.
    pub size: u64,
    /// Its chunks, and of them the zero chunks (holes, never sent).
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks sent to the agent (`RDATA`) and their chunk file bytes.
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Stored chunks the agent found in the existing target and copied there.
    pub chunks_local: u64,
    /// Bytes the agent read from the existing target to compare.
    pub target_bytes_read: u64,
    /// Whether the agent compared an existing regular target.
    pub compared: bool,
    /// The target was newer than the archived file and left as it is (`keep_newer`).
    pub skipped: bool,
    /// Every frame byte sent to the agent for this file (request, manifest, chunks), and
    /// received from it.
    pub frame_bytes_out: u64,
    pub frame_bytes_in: u64,
}

/// How `restore_file` restores.
#[derive(Clone, Copy)]
pub struct RestoreOptions<'a> {
    /// Where a chunk damaged in the archive may be found intact (default none).
    pub pool: Option<&'a Pool>,
    /// Where the chunks are read instead of the archive's `.affa-chunks/` (default none: the
    /// archive; `pool` is then not used). Each is checked as one from the archive.
    pub source: Option<&'a dyn super::ChunkSource>,
    /// Compare an existing regular target chunk by chunk; send only what differs (default yes).
    pub compare: bool,
    /// Leave an existing regular target newer than the archived file as it is, as rsync's
    /// `--update` (`--preserve-newer`; default no).
    pub keep_newer: bool,
    /// Called with the file offset the restore reached (the start of each chunk the agent asks
    /// for, then the size at the end; chunks the agent copies locally are not reported one by
    /// one).
    pub progress: Option<&'a dyn Fn(u64)>,
}

impl Default for RestoreOptions<'_> {
    fn default() -> Self {
        RestoreOptions { pool: None, source: None, compare: true, keep_newer: false, progress: None }
    }
}

/// Restore the chunked file `rel_path` of the archive `archive_root` (its manifest
/// `archive_root/rel_path.affa-manifest`) to `remote_target` on the agent's host
/// (docs/PROTOCOL.md, "Restore of one file"). With `opts.compare`, an existing regular target
/// is compared chunk by chunk and only the chunks it lacks are sent. Each chunk is read from the
/// archive's `.affa-chunks/` (when damaged there, from `opts.pool`'s entry), decoded and
/// hashed before it is sent: a missing or damaged chunk is an error naming it and the manifest
/// (the agent is told to abort, the target stays as it was). A fault at the agent is an error
/// naming the target; after either the session stays usable. Any other error leaves the
/// session unusable.
pub fn restore_file<R: Read, W: Write>(
    agent: &mut Agent<R, W>,
    archive_root: &Path,
    rel_path: &Path,
    remote_target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreStats> {
    check_rel(rel_path)?;
    let mpath = manifest_path(archive_root, rel_path);
    let m = read_manifest(&mpath)?;
    let what = format!("{}: {}", agent.label, remote_target.display());
    let bad = |m: String| Error::new(format!("agent {what}: {m}"));
    let fault = |kind: proto::FaultKind, offset: u64, message: &str| {
        Error::new(format!("{what}: {} (offset {offset}): {}", kind.name(), shown(message)))
    };
    // The agent checks the whole file's hash: a CBT-derived manifest has none, so it is
    // computed here from the archive's chunks (each decoded and checked).
    let file_hash = match (m.file_hash, opts.source) {
        (Some(h), _) => h,
        (None, Some(src)) => super::whole_file_hash_from(src, &m, &mpath)?,
        (None, None) => whole_file_hash(archive_root, &m, &mpath)?,
    };
    let (in0, out0) = (agent.bytes_in(), agent.bytes_out());
    let entries: Vec<Option<ChunkId>> =
        m.chunks.iter().map(|c| if let ChunkRef::Stored(id) = c { Some(*id) } else { None }).collect();
    let count = entries.len() as u64;
    let stored = entries.iter().filter(|e| e.is_some()).count() as u64;
    agent.send(&Msg::Restore(proto::Restore {
        path: remote_target.as_os_str().as_bytes().to_vec(),
        size: m.size,
        chunk_size: m.chunk_size,
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime,
        atime: m.atime.unwrap_or(m.mtime),
        file_hash,
        count,
        compare: opts.compare,
        keep_newer: opts.keep_newer,
    }))?;
    for (i, part) in entries.chunks(proto::PREV_PER_FRAME).enumerate() {
        agent.send(&Msg::RManifest { start: (i * proto::PREV_PER_FRAME) as u64, entries: part.to_vec() })?;
    }
    agent.send(&Msg::Start)?;
    agent.flush()?;

    let mut st = RestoreStats { size: m.size, chunks: count, zero_chunks: count - stored, ..RestoreStats::default() };
    match agent.recv()? {
        Msg::ROpened { window, compared } if (1..=proto::MAX_WINDOW).contains(&window) => st.compared = compared,
        Msg::RDone(d) if opts.keep_newer && d == (proto::RDone { skipped: true, ..Default::default() }) => {
            st.skipped = true;
            st.frame_bytes_out = agent.bytes_out() - out0;
            st.frame_bytes_in = agent.bytes_in() - in0;
            return Ok(st);
        }
        Msg::Fault { kind, offset, message } => return Err(fault(kind, offset, &message)),
        m => {
            return Err(bad(format!(
                "expected ROPENED with a window of 1..={}, received {}",
                proto::MAX_WINDOW,
                m.name()
            )))
        }
    }
    let (mut raw, mut decoded) = (Vec::new(), Vec::new());
    // The lowest index the next RNEED may name.
    let mut next = 0u64;
    let done = loop {
        match agent.recv()? {
            Msg::RNeed { index } => {
                let id = match entries.get(index as usize) {
                    Some(Some(id)) if index >= next => *id,
                    _ => {
                        return Err(bad(format!(
                            "RNEED for chunk {index}: expected a stored chunk from {next} of {count}"
                        )))
                    }
                };
                next = index + 1;
                if let Some(p) = opts.progress {
                    p(index.saturating_mul(m.chunk_size as u64).min(m.size));
                }
                let len = m.chunk_len(index as usize);
                let r = match opts.source {
                    Some(src) => super::source::load(src, &id, len, &mut raw, &mut decoded)
                        .map_err(|k| super::source::source_error(src, &id, &mpath, k)),
                    None => {
                        let mut r = load_chunk(archive_root, &id, len, &mut raw, &mut decoded);
                        if let (Err(_), Some(p)) = (&r, opts.pool) {
                            // A repaired copy in the pool serves as well.
                            if load_chunk_file(&p.entry(&id), &id, len, &mut raw, &mut decoded).is_ok() {
                                r = Ok(());
                            }
                        }
                        r.map_err(|k| chunk_error(&id, &mpath, k))
                    }
                };
                if let Err(e) = r {
                    abort(agent, &e.to_string(), &bad)?;
                    return Err(e);
                }
                let msg = Msg::RData { index, blob: std::mem::take(&mut raw) };
                agent.send(&msg)?;
                agent.flush()?;
                if let Msg::RData { blob, .. } = msg {
                    st.chunks_sent += 1;
                    st.bytes_sent += blob.len() as u64;
                    raw = blob;
                }
            }
            Msg::RDone(d) if !d.skipped => break d,
            Msg::Fault { kind, offset, message } => return Err(fault(kind, offset, &message)),
            m => return Err(bad(format!("unexpected {} during a restore", m.name()))),
        }
    };
    if done.chunks_received != st.chunks_sent
        || done.bytes_received != st.bytes_sent
        || done.chunks_received.checked_add(done.chunks_local) != Some(stored)
    {
        return Err(bad(format!(
            "RDONE counts {} chunks ({} bytes) received and {} local; sent {} chunks ({} bytes) of {stored} stored",
            done.chunks_received, done.bytes_received, done.chunks_local, st.chunks_sent, st.bytes_sent
        )));
    }
    if let Some(p) = opts.progress {
        p(m.size);
    }
    st.chunks_local = done.chunks_local;
    st.target_bytes_read = done.bytes_local_read;
    st.frame_bytes_out = agent.bytes_out() - out0;
    st.frame_bytes_in = agent.bytes_in() - in0;
    Ok(st)
}

/// The chunk `id` from the archive's link, decoded and checked.
fn load_chunk(
    archive_root: &Path,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), super::ProblemKind> {
    load_chunk_file(&pool::archive_entry(archive_root, id), id, len, raw, out)
}

/// Tell the agent to give up its restore (`RABORT`) and read up to its `FAULT`, so that the
/// session stays usable.
fn abort<R: Read, W: Write>(agent: &mut Agent<R, W>, why: &str, bad: &dyn Fn(String) -> Error) -> Result<()> {
    agent.send(&Msg::RAbort { message: why.to_string() })?;
    agent.flush()?;
    loop {
        match agent.recv()? {
            Msg::RNeed { .. } => {}
            Msg::Fault { .. } => return Ok(()),
            m => return Err(bad(format!("unexpected {} after RABORT", m.name()))),
        }
    }
}

#[cfg(test)]
mod tests {
    //! `restore_file` against a hostile agent: scripted frames (what a compromised host can
    //! send), never trusted. The real agent is tested over ssh in crates/agent/tests/agent.rs.
    use super::*;
    use crate::chunk::{chunk_file, Settings};
    use std::os::unix::fs::FileExt;

    fn script(ms: &[Msg]) -> Vec<u8> {
        let mut v =
            Msg::Hello { version: proto::VERSION, software: "hostile".into(), exe_hash: [0; 32] }.encode().unwrap();
        for m in ms {
            v.extend(m.encode().unwrap());
        }
        v
    }

    #[test]
    fn an_agent_asking_out_of_order_for_zero_chunks_or_lying_in_rdone_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let pool = Pool::open(&root).unwrap();
        // Chunks: data, zero, data.
        let src = t.path().join("disk.img");
        let mut data = vec![0u8; 3 * (256 << 10)];
        data[..1000].fill(7);
        data[2 * (256 << 10)..].fill(9);
        fs::write(&src, &data).unwrap();
        let settings = Settings { chunk_size: 256 << 10, ..Settings::default() };
        let archive = root.join("job/daily.0");
        let rel = Path::new("disk.img");
        chunk_file(&pool, &settings, &src, &archive, rel, None, None).unwrap();
        let target = Path::new("/target/disk.img");
        let opened = Msg::ROpened { window: 4, compared: false };
        let cases: Vec<(Vec<Msg>, &str)> = vec![
            (vec![opened.clone(), Msg::RNeed { index: 1 }], "RNEED for chunk 1: expected a stored chunk from 0 of 3"),
            (vec![opened.clone(), Msg::RNeed { index: 99 }], "RNEED for chunk 99"),
            (
                vec![opened.clone(), Msg::RNeed { index: 2 }, Msg::RNeed { index: 0 }],
                "RNEED for chunk 0: expected a stored chunk from 3 of 3",
            ),
            (
                vec![
                    opened.clone(),
                    Msg::RNeed { index: 2 },
                    Msg::RDone(proto::RDone { chunks_local: 1, ..Default::default() }),
                ],
                "RDONE counts 0 chunks (0 bytes) received and 1 local; sent 1 chunks",
            ),
            (vec![Msg::ROpened { window: 0, compared: false }], "expected ROPENED with a window of 1..=1024"),
            (vec![opened.clone(), Msg::Data { index: 0, blob: vec![1] }], "unexpected DATA during a restore"),
        ];
        for (ms, want) in cases {
            let input = script(&ms);
            let mut sent = Vec::new();
            let mut a = Agent::connect(&input[..], &mut sent, "evil").unwrap();
            let e = restore_file(&mut a, &archive, rel, target, &RestoreOptions::default()).unwrap_err().to_string();
            assert!(e.starts_with("agent evil: /target/disk.img: ") && e.contains(want), "{e} (wanted {want})");
        }

        // What affa sends for an RNEED: the archive's chunk file, unchanged.
        let input = script(&[
            opened,
            Msg::RNeed { index: 0 },
            Msg::RNeed { index: 2 },
            Msg::RDone(proto::RDone { chunks_received: 0, ..Default::default() }),
        ]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "evil").unwrap();
        assert!(restore_file(&mut a, &archive, rel, target, &RestoreOptions::default()).is_err());
        let mut r = FrameReader::new(&sent[..]);
        let mut datas = Vec::new();
        while let Some(m) = r.read_msg().unwrap() {
            if let Msg::RData { index, blob } = m {
                datas.push((index, blob));
            }
        }
        let m = read_manifest(&manifest_path(&archive, rel)).unwrap();
        let want: Vec<(u64, Vec<u8>)> = [0u64, 2]
            .iter()
            .map(|&i| {
                let ChunkRef::Stored(id) = m.chunks[i as usize] else { panic!("zero") };
                (i, fs::read(pool::archive_entry(&archive, &id)).unwrap())
            })
            .collect();
        assert_eq!(datas, want);
    }

    /// What a hostile agent can make affa hold in memory, or decode, during a backup: a claimed
    /// size of more chunks than a manifest may list, need-reports beyond the window it announced,
    /// a frame only affa sends (decoded, a 16 MiB PREV is ~550 MB), an END that read more
    /// than the file: each refused at once.
    #[test]
    fn a_backup_agent_that_claims_or_asks_beyond_its_bounds_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let pool = Pool::open(&root).unwrap();
        let settings = Settings { chunk_size: 256 << 10, ..Settings::default() };
        let opened = |size: u64, window: u32| {
            Msg::Opened(proto::Opened { size, mode: 0o644, uid: 0, gid: 0, mtime: (1, 0), atime: (1, 0), window })
        };
        let id = |i: u8| *blake3::hash(&[i]).as_bytes();
        let cases: Vec<(Vec<Msg>, &str)> = vec![
            (vec![opened(1 << 49, 4)], "more than one manifest may list"),
            (
                vec![
                    opened(10 * (256 << 10), 2),
                    Msg::Chunk { index: 0, kind: ChunkKind::Hash(id(0)) },
                    Msg::Chunk { index: 1, kind: ChunkKind::Hash(id(1)) },
                    Msg::Chunk { index: 2, kind: ChunkKind::Hash(id(2)) },
                ],
                "3 chunks asked for and not sent, more than the window of 2",
            ),
            (
                vec![opened(256 << 10, 2), Msg::Prev { start: 0, entries: vec![None; 1000] }],
                "sent a frame of type 0x11, which an agent never sends",
            ),
            (
                vec![
                    opened(256 << 10, 2),
                    Msg::Chunk { index: 0, kind: ChunkKind::Zero },
                    Msg::End(proto::End {
                        size: 256 << 10,
                        mtime: (1, 0),
                        chunks_sent: 0,
                        bytes_read: u64::MAX,
                        file_hash: Some([0; 32]),
                    }),
                ],
                "END disagrees",
            ),
        ];
        for (i, (ms, want)) in cases.into_iter().enumerate() {
            let input = script(&ms);
            let mut sent = Vec::new();
            let mut a = Agent::connect(&input[..], &mut sent, "evil").unwrap();
            let archive = root.join(format!("job/daily.{i}"));
            let e = backup_file(&mut a, &pool, &settings, Path::new("/vm/disk"), &archive, Path::new("disk"), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
            assert!(!manifest_path(&archive, Path::new("disk")).exists());
        }
    }

    /// Pool entries of text-like (compressible) chunks: chunk `i` of `n`, chunk 4 all zero.
    fn text_disk(n: usize, cs: usize) -> Vec<u8> {
        let mut data = vec![0u8; n * cs];
        for (i, c) in data.chunks_mut(cs).enumerate() {
            if i != 4 {
                let mut line = Vec::new();
                let mut j = 0;
                while line.len() < cs {
                    line.extend_from_slice(format!("chunk {i} line {j}\n").as_bytes());
                    j += 1;
                }
                c.copy_from_slice(&line[..cs]);
            }
        }
        data
    }

    fn sent_ranges(sent: &[u8]) -> Vec<(u64, u64)> {
        let mut r = FrameReader::new(sent);
        let mut out = Vec::new();
        while let Some(m) = r.read_msg().unwrap() {
            if let Msg::Ranges(rs) = m {
                out.extend(rs);
            }
        }
        out
    }

    /// The previous entries a request sent (PREV frames, in order).
    fn sent_prev(sent: &[u8]) -> Vec<Option<ChunkId>> {
        let mut r = FrameReader::new(sent);
        let mut out = Vec::new();
        while let Some(m) = r.read_msg().unwrap() {
            if let Msg::Prev { entries, .. } = m {
                out.extend(entries);
            }
        }
        out
    }

    /// A 6-chunk text disk (chunk 4 all zero, 256 KiB chunks) chunked into `root/job/daily.2`,
    /// and the frames a scripted ranged backup against it needs.
    struct Fixture {
        t: tempfile::TempDir,
        root: PathBuf,
        pool: Pool,
        data: Vec<u8>,
        settings: Settings,
        rel: &'static Path,
        a1: PathBuf,
        st1: ChunkStats,
        m1: Manifest,
    }

    impl Fixture {
        const CS: usize = 256 << 10;

        fn new() -> Fixture {
            let t = tempfile::tempdir().unwrap();
            let root = t.path().join("root");
            let pool = Pool::open(&root).unwrap();
            let data = text_disk(6, Self::CS);
            let src = t.path().join("disk.img");
            fs::write(&src, &data).unwrap();
            let settings = Settings { chunk_size: Self::CS as u32, ..Settings::default() };
            let rel = Path::new("vm/disk.img");
            let a1 = root.join("job/daily.2");
            let st1 = chunk_file(&pool, &settings, &src, &a1, rel, None, None).unwrap();
            let m1 = read_manifest(&st1.manifest_path).unwrap();
            Fixture { t, root, pool, data, settings, rel, a1, st1, m1 }
        }

        fn id(&self, i: usize) -> ChunkId {
            match self.m1.chunks[i] {
                ChunkRef::Stored(id) => id,
                ChunkRef::Zero => panic!("chunk {i} is zero"),
            }
        }

        fn blob_of(&self, i: usize) -> Vec<u8> {
            let mut out = Vec::new();
            let cs = Self::CS;
            blob::Encoder::new(self.settings.compression)
                .unwrap()
                .encode(&self.data[i * cs..(i + 1) * cs], &mut out)
                .unwrap();
            out
        }

        fn opened(&self) -> Msg {
            Msg::Opened(proto::Opened {
                size: self.data.len() as u64,
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: self.m1.mtime,
                atime: (0, 0),
                window: 8,
            })
        }

        fn end(&self, read: u64, sent: u64) -> Msg {
            Msg::End(proto::End {
                size: self.data.len() as u64,
                mtime: self.m1.mtime,
                file_hash: None,
                bytes_read: read * Self::CS as u64,
                chunks_sent: sent,
            })
        }

        fn rebuilt(&self, a: &Path, mp: &Path) -> Vec<u8> {
            let out = self.t.path().join("rebuilt");
            crate::chunk::unchunk_file(a, mp, &out, None).unwrap();
            fs::read(&out).unwrap()
        }
    }

    /// A ranged (CBT) backup checks each carried chunk with one lstat against the length the
    /// previous manifest (version 3) recorded: an entry truncated or grown is refused and read
    /// again through the agent (counted repaired once); a recorded length that lies about a
    /// good entry costs a full check of it, never a wrong trust, and the new manifest records
    /// the real length. A version 2 previous manifest (no lengths) gets the old header check,
    /// and the manifest written is version 3.
    #[test]
    fn carried_chunks_are_checked_by_their_recorded_length() {
        let f = Fixture::new();
        let (root, rel) = (&f.root, f.rel);
        let (pool, settings, m1) = (f.pool.clone(), f.settings.clone(), f.m1.clone());
        let data = f.data.clone();
        let st1 = &f.st1;
        assert!(fs::read_to_string(&st1.manifest_path).unwrap().starts_with("affa-chunk-manifest 3\n"));
        let id = |i: usize| f.id(i);
        let entry_len = |i: usize| fs::metadata(pool.entry(&id(i))).unwrap().len() as u32;
        for i in 0..6 {
            assert_eq!(m1.stored_len(i), (i != 4).then(|| entry_len(i)), "chunk {i}");
        }
        let blob_of = |i: usize| f.blob_of(i);
        let opened = f.opened();
        let end = |read: u64, sent: u64| f.end(read, sent);
        let rebuilt = |a: &Path, mp: &Path| f.rebuilt(a, mp);

        // Chunk 1's entry truncated by one byte, chunk 2's grown by one; the previous manifest
        // lies about chunk 3's length (its entry is good). Nothing changed on the host.
        let p1 = pool.entry(&id(1));
        fs::OpenOptions::new().write(true).open(&p1).unwrap().set_len(entry_len(1) as u64 - 1).unwrap();
        let p2 = pool.entry(&id(2));
        let len2 = entry_len(2) as u64;
        fs::OpenOptions::new().write(true).open(&p2).unwrap().write_all_at(b"x", len2).unwrap();
        let mut lying = m1.clone();
        lying.stored_lens.as_mut().unwrap()[3] += 1;
        let input = script(&[
            opened.clone(),
            Msg::Chunk { index: 1, kind: ChunkKind::Same },
            Msg::Chunk { index: 2, kind: ChunkKind::Same },
            Msg::Data { index: 1, blob: blob_of(1) },
            Msg::Data { index: 2, blob: blob_of(2) },
            end(2, 2),
        ]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "scripted").unwrap();
        let a2 = root.join("job/daily.1");
        let st =
            backup_file_ranged(&mut a, &pool, &settings, Path::new("/vmfs/disk.img"), &a2, rel, &lying, &[]).unwrap();
        // Only chunks 1 and 2 were asked of the host; each repair counted once; chunk 3 was
        // read fully (verified) and kept.
        assert_eq!(sent_ranges(&sent), vec![(1, 3)]);
        // The previous ids went only for the chunks inside the ranges (docs/PROTOCOL.md): the
        // request follows the change, not the disk.
        assert_eq!(sent_prev(&sent), vec![None, Some(id(1)), Some(id(2)), None, None, None]);
        let c = &st.chunk;
        assert_eq!(
            (st.range_chunks, c.repaired_chunks, c.new_chunks, c.verified_chunks, c.reused_chunks, st.data_frames),
            (2, 2, 2, 1, 3, 2),
            "{st:?}"
        );
        let m2 = read_manifest(&st.chunk.manifest_path).unwrap();
        for i in 0..6 {
            assert_eq!(m2.stored_len(i), (i != 4).then(|| entry_len(i)), "chunk {i}");
        }
        assert_eq!(m2.stored_len(3), m1.stored_len(3));
        assert_eq!(rebuilt(&a2, &st.chunk.manifest_path), data);

        // A version 2 previous manifest (no lengths): the header check finds chunk 5's zeroed
        // header (same length), the host reads it again; the new manifest is version 3.
        let mut v2 = m2.clone();
        v2.stored_lens = None;
        assert!(v2.to_bytes().starts_with(b"affa-chunk-manifest 2\n"));
        let p5 = pool.entry(&id(5));
        fs::OpenOptions::new().write(true).open(&p5).unwrap().write_all_at(&[0u8; 16], 0).unwrap();
        let input = script(&[
            opened,
            Msg::Chunk { index: 5, kind: ChunkKind::Same },
            Msg::Data { index: 5, blob: blob_of(5) },
            end(1, 1),
        ]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "scripted").unwrap();
        let a3 = root.join("job/daily.0");
        let st = backup_file_ranged(&mut a, &pool, &settings, Path::new("/vmfs/disk.img"), &a3, rel, &v2, &[]).unwrap();
        assert_eq!(sent_ranges(&sent), vec![(5, 6)]);
        assert_eq!((st.chunk.repaired_chunks, st.chunk.new_chunks, st.chunk.reused_chunks), (1, 1, 4), "{st:?}");
        assert!(fs::read_to_string(&st.chunk.manifest_path).unwrap().starts_with("affa-chunk-manifest 3\n"));
        let m3 = read_manifest(&st.chunk.manifest_path).unwrap();
        for i in 0..6 {
            assert_eq!(m3.stored_len(i), (i != 4).then(|| entry_len(i)), "chunk {i}");
        }
        assert_eq!(rebuilt(&a3, &st.chunk.manifest_path), data);
    }

    /// The chunks a ranged backup carries are linked beside the agent's read (chunk/writers.rs).
    /// An entry at the hard-link limit gets a fresh, verified copy there; an entry that vanishes
    /// between its check and its link (a sweep) makes the request be asked again, that chunk
    /// read from the host, and no manifest is written by the first request.
    #[test]
    fn carried_chunks_linked_beside_the_read_survive_the_link_limit_and_a_vanished_entry() {
        use std::os::unix::fs::MetadataExt;
        let f = Fixture::new();
        let (root, rel, a1, data) = (&f.root, f.rel, &f.a1, &f.data);
        let (settings, m1) = (f.settings.clone(), f.m1.clone());
        let mut pool = f.pool.clone();
        let id = |i: usize| f.id(i);
        let ino = |p: PathBuf| fs::metadata(p).unwrap().ino();
        let opened = f.opened();
        let end = |read: u64, sent: u64| f.end(read, sent);
        let rebuilt = |a: &Path, mp: &Path| f.rebuilt(a, mp);

        // Every entry has its pool name and a1's link: the limit of 2 is reached. Nothing
        // changed on the host; each of the 5 stored chunks gets a fresh copy.
        pool.link_limit = Some(2);
        let input = script(&[opened.clone(), end(0, 0)]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "scripted").unwrap();
        let a2 = root.join("job/daily.1");
        let st = backup_file_ranged(&mut a, &pool, &settings, Path::new("/vmfs/disk.img"), &a2, rel, &m1, &[]).unwrap();
        assert_eq!((st.chunk.new_chunks, st.chunk.reused_chunks, st.data_frames), (5, 0, 0), "{st:?}");
        assert_eq!(rebuilt(&a2, &st.chunk.manifest_path), *data);
        for i in (0..6).filter(|&i| i != 4) {
            let in_a2 = ino(pool::archive_entry(&a2, &id(i)));
            assert_ne!(in_a2, ino(pool::archive_entry(a1, &id(i))), "chunk {i}: a fresh copy");
            assert_eq!(in_a2, ino(pool.entry(&id(i))), "chunk {i}: the pool's new entry");
        }
        pool.link_limit = None;
        let m2 = read_manifest(&st.chunk.manifest_path).unwrap();

        // Chunk 2's entry vanishes just before its link: the first request ends without a
        // manifest, the second reads chunk 2 from the host.
        *pool.vanish_once.lock().unwrap() = Some(id(2));
        let blob2 = f.blob_of(2);
        let input = script(&[
            opened.clone(),
            end(0, 0),
            opened.clone(),
            Msg::Chunk { index: 2, kind: ChunkKind::Same },
            Msg::Data { index: 2, blob: blob2 },
            end(1, 1),
        ]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "scripted").unwrap();
        let a3 = root.join("job/daily.0");
        let st = backup_file_ranged(&mut a, &pool, &settings, Path::new("/vmfs/disk.img"), &a3, rel, &m2, &[]).unwrap();
        assert!(pool.vanish_once.lock().unwrap().is_none(), "the hook fired");
        assert_eq!(sent_ranges(&sent), vec![(2, 3)]);
        assert_eq!((st.chunk.new_chunks, st.data_frames, st.range_chunks), (1, 1, 1), "{st:?}");
        assert!(pool.entry(&id(2)).exists());
        assert_eq!(ino(pool::archive_entry(&a3, &id(2))), ino(pool.entry(&id(2))));
        assert_eq!(rebuilt(&a3, &st.chunk.manifest_path), *data);
        let c = &st.chunk;
        assert_eq!((c.reused_chunks, c.zero_chunks), (4, 1), "{st:?}");
        let m3 = read_manifest(&st.chunk.manifest_path).unwrap();

        // The request made again keeps what the first one stored: chunk 1 (its entry truncated:
        // read in the first request, counted repaired and new once) is neither asked for nor
        // counted again; chunk 3 vanishes before its link and is the only one the second asks. The
        // manifest's added bytes are both requests'.
        let e1 = pool.entry(&id(1));
        let len1 = fs::metadata(&e1).unwrap().len();
        fs::OpenOptions::new().write(true).open(&e1).unwrap().set_len(len1 - 1).unwrap();
        *pool.vanish_once.lock().unwrap() = Some(id(3));
        let input = script(&[
            opened.clone(),
            Msg::Chunk { index: 1, kind: ChunkKind::Same },
            Msg::Data { index: 1, blob: f.blob_of(1) },
            end(1, 1),
            opened,
            Msg::Chunk { index: 3, kind: ChunkKind::Same },
            Msg::Data { index: 3, blob: f.blob_of(3) },
            end(1, 1),
        ]);
        let mut sent = Vec::new();
        let mut a = Agent::connect(&input[..], &mut sent, "scripted").unwrap();
        let a4 = root.join("job/weekly.0");
        let st = backup_file_ranged(&mut a, &pool, &settings, Path::new("/vmfs/disk.img"), &a4, rel, &m3, &[]).unwrap();
        assert!(pool.vanish_once.lock().unwrap().is_none(), "the hook fired");
        assert_eq!(sent_ranges(&sent), vec![(1, 2), (3, 4)], "the second request asks for chunk 3 only");
        let c = &st.chunk;
        assert_eq!(
            (c.new_chunks, c.repaired_chunks, c.reused_chunks, c.zero_chunks, st.data_frames),
            (2, 1, 3, 1, 2),
            "{st:?}"
        );
        let added = fs::metadata(pool.entry(&id(1))).unwrap().len() + fs::metadata(pool.entry(&id(3))).unwrap().len();
        assert_eq!(c.added_bytes, added, "{st:?}");
        assert_eq!(read_manifest(&st.chunk.manifest_path).unwrap().added_bytes, added);
        assert_eq!(rebuilt(&a4, &st.chunk.manifest_path), *data);
    }
}
