//! The backup of one file (docs/PROTOCOL.md, "Backup of one file"): the request, the read, the
//! chunk reports, the answers, the chunk data, the end or a fault.
//!
//! Owns: reading the file once (one reader thread, holes skipped), hashing and compressing on
//! worker threads, the in-order reports and the window of unanswered chunks, the checks that the
//! file did not change. Must never: hold more than `inflight` + `window` chunks (+ one per worker)
//! in memory, read a chunk twice, or report a chunk for an index it did not read.

use crate::encode::{Encoder, ENC_LZ4, ENC_ZSTD};
use crate::{flush, next_in_request, Fatal, In, Out};
use affa_agent_proto::{Backup, ChunkKind, End, FaultKind, Msg, Opened, MAX_WINDOW};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::Mutex;

const MIN_CHUNK: u32 = 256 << 10;
const MAX_CHUNK: u32 = 16 << 20;
/// Largest file size (as the manifest's limit).
const MAX_SIZE: u64 = 1 << 50;

struct Fault(FaultKind, u64, String);

/// What a worker made of one chunk.
enum Done {
    Zero,
    /// Same id as the previous manifest: the raw bytes, compressed only if asked for.
    Same(Vec<u8>),
    /// Changed: its id and its chunk file bytes (compressed by the worker).
    Hash([u8; 32], Vec<u8>),
}

/// From the reader to the in-order consumer.
enum Item {
    Chunk(u64, Receiver<Result<Done, Fault>>),
    Fault(Fault),
    /// The read is over: whole-file hash (None when ranged), bytes read.
    Eof(Option<[u8; 32]>, u64),
}

struct Job {
    idx: u64,
    data: Option<Vec<u8>>,
    reply: Sender<Result<Done, Fault>>,
}

/// Serve one `BACKUP` request (its first frame already read). Faults are sent to affa and end
/// the request; only session-level failures are returned.
pub fn run(req: Backup, rx: &In, out: &mut Out) -> Result<(), Fatal> {
    // The rest of the request: PREV frames, RANGES frames, START.
    let mut prev: Vec<Option<[u8; 32]>> = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    loop {
        match next_in_request(rx)? {
            Msg::Prev { start, entries } => {
                if start != prev.len() as u64 || prev.len() as u64 + entries.len() as u64 > req.prev_count {
                    return Err(Fatal::protocol(format!(
                        "PREV from {start} with {} entries: expected entries from {} of {}",
                        entries.len(),
                        prev.len(),
                        req.prev_count
                    )));
                }
                prev.extend(entries);
            }
            Msg::Ranges(rs) => {
                if !req.ranged {
                    return Err(Fatal::protocol("RANGES in a request that is not ranged"));
                }
                for (s, e) in rs {
                    let after_last = ranges.last().is_none_or(|&(_, le)| s > le);
                    if s >= e || !after_last {
                        return Err(Fatal::protocol(format!(
                            "range [{s}, {e}) is empty, unsorted, overlapping or adjacent"
                        )));
                    }
                    ranges.push((s, e));
                }
            }
            Msg::Start => break,
            // Stale answers of a faulted request may still arrive.
            Msg::Answer { .. } => {}
            m => return Err(Fatal::protocol(format!("unexpected {} in a BACKUP request", m.name()))),
        }
    }
    match backup(&req, &prev, &ranges, rx, out)? {
        Ok(()) => Ok(()),
        Err(Fault(kind, offset, message)) => {
            out.send(&Msg::Fault { kind, offset, message })?;
            Ok(())
        }
    }
}

fn check_request(req: &Backup, prev: &[Option<[u8; 32]>]) -> Result<(), String> {
    let cs = req.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
        return Err(format!("chunk size {cs}: expected a power of two from 256K to 16M"));
    }
    match (req.compression, req.level) {
        (0, 0) | (ENC_LZ4, 0) => {}
        (ENC_ZSTD, 1..=19) => {}
        (c, l) => return Err(format!("compression {c} level {l}: expected 0/0 (none), 1/1..19 (zstd), 2/0 (lz4)")),
    }
    if prev.len() as u64 != req.prev_count {
        return Err(format!("START after {} of {} previous entries", prev.len(), req.prev_count));
    }
    Ok(())
}

/// Open the file to read: its directory through `crate::at::open_dir` (only root's symlinks
/// followed on the way), the file itself never through a symlink, a fifo never waited on.
fn open(path: &Path) -> Result<File, Fault> {
    let bytes = path.as_os_str().as_bytes();
    let cut = bytes.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let (dir, name) = (if cut == 0 { &b"/"[..] } else { &bytes[..cut] }, &bytes[cut + 1..]);
    let vanished = || Fault(FaultKind::Vanished, 0, format!("{}: no such file", path.display()));
    let d = crate::at::open_dir(dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => vanished(),
        _ => Fault(FaultKind::Open, 0, format!("cannot open {}: {e}", path.display())),
    })?;
    let f = crate::at::openat(&d, name, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ENOENT) => vanished(),
            // O_NOFOLLOW: the file itself is a symlink.
            Some(libc::ELOOP) => Fault(FaultKind::NotRegular, 0, format!("{}: is a symlink", path.display())),
            _ => Fault(FaultKind::Open, 0, format!("cannot open {}: {e}", path.display())),
        }
    })?;
    let m = f.metadata().map_err(|e| Fault(FaultKind::Open, 0, format!("cannot stat {}: {e}", path.display())))?;
    if !m.is_file() {
        return Err(Fault(FaultKind::NotRegular, 0, format!("{}: not a regular file", path.display())));
    }
    Ok(f)
}

fn backup(
    req: &Backup,
    prev: &[Option<[u8; 32]>],
    ranges: &[(u64, u64)],
    rx: &In,
    out: &mut Out,
) -> Result<Result<(), Fault>, Fatal> {
    if let Err(m) = check_request(req, prev) {
        return Ok(Err(Fault(FaultKind::BadRequest, 0, m)));
    }
    let path = Path::new(OsStr::from_bytes(&req.path));
    let file = match open(path) {
        Ok(f) => f,
        Err(f) => return Ok(Err(f)),
    };
    let m0 = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Ok(Err(Fault(FaultKind::Open, 0, format!("cannot stat {}: {e}", path.display())))),
    };
    let size = m0.len();
    if size > MAX_SIZE {
        return Ok(Err(Fault(FaultKind::BadRequest, 0, format!("{}: {size} bytes, above 2^50", path.display()))));
    }
    let cs = req.chunk_size as u64;
    let window = ((32u64 << 20) / cs).clamp(2, MAX_WINDOW as u64) as usize;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let workers = cores.min(((96u64 << 20) / (2 * cs)).max(1) as usize).max(1);
    let inflight = (((32u64 << 20) / cs) as usize).clamp(2, 4 * workers);
    out.send(&Msg::Opened(Opened {
        size,
        mode: m0.mode() & 0o7777,
        uid: m0.uid(),
        gid: m0.gid(),
        mtime: (m0.mtime(), m0.mtime_nsec() as u32),
        atime: (m0.atime(), m0.atime_nsec() as u32),
        window: window as u32,
    }))?;
    #[cfg(target_os = "linux")]
    // SAFETY: posix_fadvise(2) only reads the descriptor of `file`, open for the whole call.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    let count = size.div_ceil(cs);
    let indices: Box<dyn Iterator<Item = u64> + Send> = if req.ranged {
        Box::new(ranges.iter().flat_map(move |&(s, e)| s.min(count)..e.min(count)))
    } else {
        Box::new(0..count)
    };

    let (item_tx, item_rx) = sync_channel::<Item>(inflight);
    let (job_tx, job_rx) = sync_channel::<Job>(1);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        // The reader: sequential, holes skipped.
        let file = &file;
        s.spawn(move || {
            let item = read_all(file, path, size, cs, req.ranged, indices, &job_tx, &item_tx);
            let _ = item_tx.send(item);
        });
        for _ in 0..workers {
            let job_rx = &job_rx;
            s.spawn(move || {
                let mut enc = None;
                loop {
                    let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { break };
                    let r = work(job.idx, job.data, prev, req, &mut enc);
                    let _ = job.reply.send(r);
                }
            });
        }
        consume(item_rx, req, rx, out, window, path, m0)
    })
}

#[allow(clippy::too_many_arguments)]
fn read_all(
    file: &File,
    path: &Path,
    size: u64,
    cs: u64,
    ranged: bool,
    indices: Box<dyn Iterator<Item = u64> + Send + '_>,
    job_tx: &std::sync::mpsc::SyncSender<Job>,
    item_tx: &std::sync::mpsc::SyncSender<Item>,
) -> Item {
    let mut hasher = (!ranged).then(blake3::Hasher::new);
    let zeros = vec![0u8; cs.min(size.max(1)) as usize];
    let fd = file.as_raw_fd();
    let mut bytes_read = 0u64;
    for idx in indices {
        let off = idx * cs;
        let len = (size - off).min(cs) as usize;
        // SAFETY: lseek(2) on the descriptor of `file`, which outlives this function.
        let data_at = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        let hole = if data_at < 0 {
            // ENXIO: no data after `off`. EINVAL: no SEEK_DATA here, read everything.
            io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
        } else {
            data_at as u64 >= off + len as u64
        };
        let data = if hole {
            if let Some(h) = hasher.as_mut() {
                h.update(&zeros[..len]);
            }
            None
        } else {
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                match file.read_at(&mut buf[got..], off + got as u64) {
                    Ok(0) => {
                        let at = off + got as u64;
                        return Item::Fault(Fault(
                            FaultKind::Shrank,
                            at,
                            format!("{} ended at offset {at}, its size was {size}", path.display()),
                        ));
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let at = off + got as u64;
                        return Item::Fault(Fault(
                            FaultKind::Read,
                            at,
                            format!("cannot read {} at offset {at}: {e}", path.display()),
                        ));
                    }
                }
            }
            bytes_read += len as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            Some(buf)
        };
        let (reply, result) = channel();
        // The consumer stopped (a fault, affa gone): stop reading.
        if item_tx.send(Item::Chunk(idx, result)).is_err() || job_tx.send(Job { idx, data, reply }).is_err() {
            return Item::Eof(None, bytes_read);
        }
    }
    Item::Eof(hasher.map(|h| *h.finalize().as_bytes()), bytes_read)
}

fn work(
    idx: u64,
    data: Option<Vec<u8>>,
    prev: &[Option<[u8; 32]>],
    req: &Backup,
    enc: &mut Option<Encoder>,
) -> Result<Done, Fault> {
    let Some(data) = data else { return Ok(Done::Zero) };
    if data.iter().all(|&b| b == 0) {
        return Ok(Done::Zero);
    }
    let id = *blake3::hash(&data).as_bytes();
    if prev.get(idx as usize) == Some(&Some(id)) {
        return Ok(Done::Same(data));
    }
    let mut blob = Vec::new();
    encode(enc, req, &data, &mut blob, idx)?;
    Ok(Done::Hash(id, blob))
}

fn encode(enc: &mut Option<Encoder>, req: &Backup, data: &[u8], blob: &mut Vec<u8>, idx: u64) -> Result<(), Fault> {
    let internal = |e: io::Error| Fault(FaultKind::Internal, idx * req.chunk_size as u64, format!("compression: {e}"));
    if enc.is_none() {
        *enc = Some(Encoder::new(req.compression, req.level).map_err(internal)?);
    }
    enc.as_mut().map(|e| e.encode(data, blob)).unwrap_or(Ok(())).map_err(internal)
}

/// Waiting for affa's answer to the oldest unanswered chunk.
enum Pending {
    Same(Vec<u8>),
    Hash(Vec<u8>),
}

fn consume(
    items: Receiver<Item>,
    req: &Backup,
    rx: &In,
    out: &mut Out,
    window: usize,
    path: &Path,
    m0: std::fs::Metadata,
) -> Result<Result<(), Fault>, Fatal> {
    let mut pending: VecDeque<(u64, Pending)> = VecDeque::new();
    let mut sent = 0u64;
    let mut enc = None;
    let mut answer = |pending: &mut VecDeque<(u64, Pending)>, out: &mut Out| -> Result<Result<(), Fault>, Fatal> {
        flush(out)?;
        let (index, need) = match next_in_request(rx)? {
            Msg::Answer { index, need } => (index, need),
            m => return Err(Fatal::protocol(format!("expected ANSWER, received {}", m.name()))),
        };
        let Some((idx, p)) = pending.pop_front() else {
            return Err(Fatal::protocol(format!("ANSWER for chunk {index}, no chunk awaits one")));
        };
        if idx != index {
            return Err(Fatal::protocol(format!("ANSWER for chunk {index}, expected chunk {idx}")));
        }
        if need {
            let blob = match p {
                Pending::Hash(b) => b,
                Pending::Same(data) => {
                    let mut b = Vec::new();
                    if let Err(f) = encode(&mut enc, req, &data, &mut b, idx) {
                        return Ok(Err(f));
                    }
                    b
                }
            };
            out.send_noflush(&Msg::Data { index: idx, blob })?;
            sent += 1;
        }
        Ok(Ok(()))
    };
    loop {
        if crate::affa_gone() {
            // affa died or the link was cut: stop reading now (the session ends, exit 1).
            return Err(affa_agent_proto::Error::Eof.into());
        }
        let item = match items.try_recv() {
            Ok(i) => i,
            Err(_) => {
                flush(out)?;
                match items.recv() {
                    Ok(i) => i,
                    Err(_) => return Ok(Err(Fault(FaultKind::Internal, 0, "the reader thread died".into()))),
                }
            }
        };
        match item {
            Item::Chunk(idx, r) => {
                let done = match r.recv() {
                    Ok(Ok(d)) => d,
                    Ok(Err(f)) => return Ok(Err(f)),
                    Err(_) => return Ok(Err(Fault(FaultKind::Internal, 0, "a worker thread died".into()))),
                };
                let (kind, p) = match done {
                    Done::Zero => (ChunkKind::Zero, None),
                    Done::Same(d) => (ChunkKind::Same, Some(Pending::Same(d))),
                    Done::Hash(id, b) => (ChunkKind::Hash(id), Some(Pending::Hash(b))),
                };
                out.send_noflush(&Msg::Chunk { index: idx, kind })?;
                if let Some(p) = p {
                    pending.push_back((idx, p));
                }
                while pending.len() >= window {
                    if let Err(f) = answer(&mut pending, out)? {
                        return Ok(Err(f));
                    }
                }
            }
            Item::Fault(f) => return Ok(Err(f)),
            Item::Eof(file_hash, bytes_read) => {
                while !pending.is_empty() {
                    if let Err(f) = answer(&mut pending, out)? {
                        return Ok(Err(f));
                    }
                }
                if let Err(f) = unchanged(path, &m0) {
                    return Ok(Err(f));
                }
                out.send(&Msg::End(End {
                    size: m0.len(),
                    mtime: (m0.mtime(), m0.mtime_nsec() as u32),
                    file_hash: if req.ranged { None } else { file_hash },
                    bytes_read,
                    chunks_sent: sent,
                }))?;
                return Ok(Ok(()));
            }
        }
    }
}

/// The file read is still the file at `path`, same size and mtime as when it was opened.
fn unchanged(path: &Path, m0: &std::fs::Metadata) -> Result<(), Fault> {
    let now = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Fault(FaultKind::Vanished, 0, format!("{} vanished while it was read", path.display())))
        }
        Err(e) => return Err(Fault(FaultKind::Open, 0, format!("cannot stat {}: {e}", path.display()))),
    };
    if now.dev() != m0.dev() || now.ino() != m0.ino() {
        return Err(Fault(FaultKind::Replaced, 0, format!("{} was replaced while it was read", path.display())));
    }
    if now.len() > m0.len() {
        return Err(Fault(
            FaultKind::Grew,
            m0.len(),
            format!("{} grew from {} to {} bytes while it was read", path.display(), m0.len(), now.len()),
        ));
    }
    if now.len() < m0.len() {
        return Err(Fault(
            FaultKind::Shrank,
            now.len(),
            format!("{} shrank from {} to {} bytes while it was read", path.display(), m0.len(), now.len()),
        ));
    }
    if now.mtime() != m0.mtime() || now.mtime_nsec() != m0.mtime_nsec() {
        return Err(Fault(FaultKind::Modified, 0, format!("{} was modified while it was read", path.display())));
    }
    Ok(())
}
