//! The restore of one file (docs/PROTOCOL.md, "Restore of one file"): the request, the target's
//! checks, the temp file beside it, the comparison with an existing target, the chunks asked
//! of affa, the sparse writes, the whole-file hash, the rename.
//!
//! Owns: the agent's write of a restored file (temp file with an unpredictable name, created
//! `O_EXCL | O_NOFOLLOW` 0600 and locked; holes kept; metadata; fsync; rename; directory fsync),
//! the removal of leftovers of killed restores, the sequential read of an existing target and
//! the window of chunks waiting in order. Must never: write to, truncate or follow the existing
//! target (it is only read, then replaced by rename), replace a directory, device, fifo or
//! socket, rename a file whose chunks or whole-file hash did not verify, leave its temp file
//! behind unless killed, or hold more than `window` chunks waiting whatever the file's size.

use crate::at::{cstr, lstat_at, openat};
use crate::encode::decode;
use crate::{flush, next_in_request, Fatal, In, Out};
use affa_agent_proto::{FaultKind, Msg, RDone, Restore, MAX_WINDOW};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};

const MIN_CHUNK: u32 = 256 << 10;
const MAX_CHUNK: u32 = 16 << 20;
/// Largest file size (as the manifest's limit).
const MAX_SIZE: u64 = 1 << 50;
/// Granularity of holes inside chunks.
const BLOCK: usize = 4096;
/// Between a target's name (cut to `NAME_KEEP` bytes) and 16 hex digits: a temp file.
const TEMP_MARK: &[u8] = b".affa-agent-";
const NAME_KEEP: usize = 200;

struct Fault(FaultKind, u64, String);

type Entry = Option<[u8; 32]>;

/// Serve one `RESTORE` request (its first frame already read). Faults are sent to affa and end
/// the request; only session-level failures are returned (the temp file is removed either way).
pub fn run(req: Restore, rx: &In, out: &mut Out) -> Result<(), Fatal> {
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        match next_in_request(rx)? {
            Msg::RManifest { start, entries: e } => {
                if start != entries.len() as u64 || entries.len() as u64 + e.len() as u64 > req.count {
                    return Err(Fatal::protocol(format!(
                        "RMANIFEST from {start} with {} entries: expected entries from {} of {}",
                        e.len(),
                        entries.len(),
                        req.count
                    )));
                }
                entries.extend(e);
            }
            Msg::Start => break,
            m => return Err(Fatal::protocol(format!("unexpected {} in a RESTORE request", m.name()))),
        }
    }
    match restore(&req, &entries, rx, out)? {
        Ok(done) => out.send(&Msg::RDone(done))?,
        Err(Fault(kind, offset, message)) => out.send(&Msg::Fault { kind, offset, message })?,
    }
    Ok(())
}

/// The target split into its directory and file name; None when it is not absolute or names no
/// file.
fn split(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.first() != Some(&b'/') {
        return None;
    }
    let cut = path.iter().rposition(|&b| b == b'/')?;
    let name = &path[cut + 1..];
    if name.is_empty() || name == b"." || name == b".." {
        return None;
    }
    Some((if cut == 0 { b"/" } else { &path[..cut] }, name))
}

fn check_request(req: &Restore, entries: &[Entry]) -> Result<(), String> {
    let cs = req.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
        return Err(format!("chunk size {cs}: expected a power of two from 256K to 16M"));
    }
    if req.size > MAX_SIZE {
        return Err(format!("size {} above 2^50", req.size));
    }
    if req.count != req.size.div_ceil(cs as u64) || entries.len() as u64 != req.count {
        return Err(format!(
            "{} manifest entries (count {}) for {} bytes at {cs}-byte chunks",
            entries.len(),
            req.count,
            req.size
        ));
    }
    if req.mode > 0o7777 {
        return Err(format!("mode {:o}: expected permission bits only", req.mode));
    }
    if split(&req.path).is_none() {
        return Err(format!("target {}: expected an absolute path naming a file", show(&req.path)));
    }
    Ok(())
}

fn show(b: &[u8]) -> String {
    Path::new(OsStr::from_bytes(b)).display().to_string()
}

fn unlink_at(dir: &File, name: &[u8]) {
    let c = cstr(name);
    // SAFETY: unlinkat(2) with a valid descriptor and a NUL-terminated name.
    unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The temp file; removed when dropped unless renamed.
struct Temp<'a> {
    dir: &'a File,
    name: Vec<u8>,
    file: File,
    shown: PathBuf,
    renamed: bool,
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if !self.renamed {
            unlink_at(self.dir, &self.name);
        }
    }
}

fn temp_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = vec![b'.'];
    p.extend_from_slice(&name[..name.len().min(NAME_KEEP)]);
    p.extend_from_slice(TEMP_MARK);
    p
}

/// 64 unpredictable bits: getrandom(2), else /dev/urandom, else (neither available) time and pid.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize || File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok() {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64) ^ ((std::process::id() as u64) << 32)
}

fn flock(f: &File, op: libc::c_int) -> bool {
    // SAFETY: flock(2) on the descriptor of `f`, open for the whole call.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

fn same_inode(a: &libc::stat, m: &std::fs::Metadata) -> bool {
    a.st_dev == m.dev() && a.st_ino == m.ino()
}

/// Remove temp files of earlier restores of this target that were killed: regular, ours, and
/// not locked by a live agent.
fn remove_leftovers(dir: &File, dir_path: &Path, name: &[u8]) {
    let prefix = temp_prefix(name);
    let Ok(rd) = std::fs::read_dir(dir_path) else { return };
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    for e in rd.flatten() {
        let n = e.file_name();
        let n = n.as_bytes();
        let Some(tail) = n.strip_prefix(&prefix[..]) else { continue };
        if tail.len() != 16 || !tail.iter().all(u8::is_ascii_hexdigit) {
            continue;
        }
        let Ok(f) = openat(dir, n, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0) else { continue };
        let Ok(m) = f.metadata() else { continue };
        if !m.is_file() || m.uid() != me || !flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            continue;
        }
        if lstat_at(dir, n).is_ok_and(|st| same_inode(&st, &m)) {
            unlink_at(dir, n);
        }
    }
}

fn create_temp<'a>(dir: &'a File, dir_path: &Path, name: &[u8]) -> Result<Temp<'a>, Fault> {
    let mut last = None;
    for _ in 0..16 {
        let mut t = temp_prefix(name);
        t.extend_from_slice(format!("{:016x}", random_u64()).as_bytes());
        let shown = dir_path.join(OsStr::from_bytes(&t));
        match openat(dir, &t, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, 0o600) {
            Ok(file) => {
                // Held while it works: a later restore removes only unlocked leftovers. Where
                // flock is not supported the leftover is simply never removed.
                flock(&file, libc::LOCK_EX | libc::LOCK_NB);
                return Ok(Temp { dir, name: t, file, shown, renamed: false });
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => last = Some(e),
            Err(e) => return Err(Fault(FaultKind::Open, 0, format!("cannot create {}: {e}", shown.display()))),
        }
    }
    let e = last.map(|e| e.to_string()).unwrap_or_default();
    Err(Fault(FaultKind::Open, 0, format!("cannot create a temp file in {}: {e}", dir_path.display())))
}

/// The existing target, when it is a regular file (opened without following a symlink).
fn open_existing(dir: &File, name: &[u8]) -> Option<(File, u64)> {
    let f = openat(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0).ok()?;
    let m = f.metadata().ok()?;
    let len = m.len();
    m.is_file().then_some((f, len))
}

/// `[off, off + len)` lies wholly in a hole of `f` (no read needed: the bytes are zeros).
fn in_hole(f: &File, off: u64, len: u64) -> bool {
    // SAFETY: lseek(2) on the descriptor of `f`, open for the whole call.
    let at = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if at < 0 {
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    at as u64 >= off + len
}

/// Read `buf.len()` bytes at `off`; false when the file ends first or a read fails.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// The comparison thread: for every stored chunk in order, the existing target's bytes at its
/// offset when they hash to its id (else None), and the bytes read. Stops reading at the first
/// short read or error; stops altogether when the receiver is gone.
fn compare(
    f: &File,
    esize: u64,
    entries: &[Entry],
    cs: u64,
    size: u64,
    tx: std::sync::mpsc::SyncSender<(Option<Vec<u8>>, u64)>,
) {
    #[cfg(target_os = "linux")]
    // SAFETY: posix_fadvise(2) only reads the descriptor of `f`, open for the whole call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    let mut readable = true;
    for (i, e) in entries.iter().enumerate() {
        let Some(id) = e else { continue };
        let off = i as u64 * cs;
        let len = (size - off).min(cs);
        let mut found = (None, 0);
        // A stored chunk is never all zero: one lying in a hole of the target cannot match.
        if readable && off + len <= esize && !in_hole(f, off, len) {
            let mut buf = vec![0u8; len as usize];
            if read_full(f, &mut buf, off) {
                found.1 = len;
                if blake3::hash(&buf).as_bytes() == id {
                    found.0 = Some(buf);
                }
            } else {
                readable = false;
            }
        }
        if tx.send(found).is_err() {
            return;
        }
    }
}

fn is_zero(d: &[u8]) -> bool {
    let mut words = d.chunks_exact(16);
    words.by_ref().all(|w| w.iter().fold(0u8, |a, &b| a | b) == 0) && words.remainder().iter().all(|&b| b == 0)
}

/// pwrite `d` at `off` in runs of non-zero 4 KiB blocks (zero blocks stay holes).
fn write_sparse(f: &File, d: &[u8], off: u64) -> Result<(), (u64, io::Error)> {
    let mut i = 0;
    while i < d.len() {
        let end = (i + BLOCK).min(d.len());
        if is_zero(&d[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < d.len() {
            let e = (j + BLOCK).min(d.len());
            if is_zero(&d[j..e]) {
                break;
            }
            j = e;
        }
        f.write_all_at(&d[i..j], off + i as u64).map_err(|e| (off + i as u64, e))?;
        i = j;
    }
    Ok(())
}

/// One chunk between the first not yet written and the newest decided.
enum Slot {
    Zero,
    Ready(Vec<u8>),
    Wait([u8; 32]),
}

fn restore(req: &Restore, entries: &[Entry], rx: &In, out: &mut Out) -> Result<Result<RDone, Fault>, Fatal> {
    if let Err(m) = check_request(req, entries) {
        return Ok(Err(Fault(FaultKind::BadRequest, 0, m)));
    }
    let (dir_b, name) = split(&req.path).unwrap_or((b"/", b"?"));
    let dir_path = Path::new(OsStr::from_bytes(dir_b));
    let target = show(&req.path);
    // O_DIRECTORY: a fifo or device in the directory's place is not opened (nor waited on);
    // only root's symlinks are followed on the way (crate::at).
    let dir = match crate::at::open_dir(dir_b) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Ok(Err(Fault(FaultKind::Open, 0, format!("{} is not a directory", dir_path.display()))))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Err(Fault(
                FaultKind::Vanished,
                0,
                format!("the directory of {target} does not exist: {}", dir_path.display()),
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() => {
            return Ok(Err(Fault(FaultKind::Open, 0, format!("the directory of {target}: {e}"))))
        }
        Err(e) => return Ok(Err(Fault(FaultKind::Open, 0, format!("cannot open {}: {e}", dir_path.display())))),
    };
    match lstat_at(&dir, name) {
        Ok(st) => {
            let t = st.st_mode & libc::S_IFMT;
            if req.keep_newer && t == libc::S_IFREG && (st.st_mtime, st.st_mtime_nsec as u32) > req.mtime {
                return Ok(Ok(RDone { skipped: true, ..RDone::default() }));
            }
            if t != libc::S_IFREG && t != libc::S_IFLNK {
                return Ok(Err(Fault(
                    FaultKind::NotRegular,
                    0,
                    format!("{target} exists and is not a regular file or a symlink: not replaced"),
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Ok(Err(Fault(FaultKind::Open, 0, format!("cannot stat {target}: {e}")))),
    }
    remove_leftovers(&dir, dir_path, name);
    let mut tmp = match create_temp(&dir, dir_path, name) {
        Ok(t) => t,
        Err(f) => return Ok(Err(f)),
    };
    let tmp_shown = tmp.shown.display().to_string();
    let werr =
        |what: &str, off: u64, e: io::Error| Fault(FaultKind::Write, off, format!("cannot {what} {tmp_shown}: {e}"));
    if let Err(e) = tmp.file.set_len(req.size) {
        return Ok(Err(werr("set the size of", 0, e)));
    }
    let existing = if req.compare { open_existing(&dir, name) } else { None };
    let cs = req.chunk_size as u64;
    let window = ((32u64 << 20) / cs).clamp(2, MAX_WINDOW as u64) as usize;
    out.send(&Msg::ROpened { window: window as u32, compared: existing.is_some() })?;

    let r = std::thread::scope(|s| {
        let cmp_rx = existing.as_ref().map(|(f, esize)| {
            let (tx, crx) = sync_channel(2);
            s.spawn(move || compare(f, *esize, entries, cs, req.size, tx));
            crx
        });
        fill(req, entries, rx, out, &tmp.file, &tmp_shown, window, cmp_rx)
    });
    let done = match r? {
        Ok(d) => d,
        Err(f) => return Ok(Err(f)),
    };

    // The metadata, then fsync, then the rename (only of the inode written).
    let f = &tmp.file;
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: fchown(2) on the descriptor of the temp file; an id of -1 leaves it.
        if let Err(e) = cvt(unsafe { libc::fchown(f.as_raw_fd(), req.uid, req.gid) }) {
            return Ok(Err(werr("set the owner of", 0, e)));
        }
    }
    // SAFETY: fchmod(2) on the descriptor of the temp file.
    if let Err(e) = cvt(unsafe { libc::fchmod(f.as_raw_fd(), req.mode as libc::mode_t) }) {
        return Ok(Err(werr("set the mode of", 0, e)));
    }
    let ts = |(s, ns): (i64, u32)| libc::timespec { tv_sec: s as libc::time_t, tv_nsec: ns as _ };
    let times = [ts(req.atime), ts(req.mtime)];
    // SAFETY: futimens(2) reads the two timespecs of `times`, alive for the call.
    if let Err(e) = cvt(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) }) {
        return Ok(Err(werr("set the times of", 0, e)));
    }
    if let Err(e) = f.sync_all() {
        return Ok(Err(werr("fsync", 0, e)));
    }
    let ours = f.metadata().is_ok_and(|m| lstat_at(&dir, &tmp.name).is_ok_and(|st| same_inode(&st, &m)));
    if !ours {
        return Ok(Err(Fault(FaultKind::Write, 0, format!("{tmp_shown} was replaced by another file: not renamed"))));
    }
    let (from, to) = (cstr(&tmp.name), cstr(name));
    // SAFETY: renameat(2) within the directory descriptor, names NUL-terminated.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if let Err(e) = cvt(r) {
        return Ok(Err(Fault(FaultKind::Write, 0, format!("cannot rename {tmp_shown} to {target}: {e}"))));
    }
    tmp.renamed = true;
    if let Err(e) = dir.sync_all() {
        return Ok(Err(Fault(FaultKind::Write, 0, format!("cannot fsync {}: {e}", dir_path.display()))));
    }
    Ok(Ok(done))
}

/// Fill the temp file chunk by chunk in order (local copies, `RNEED`/`RDATA`), hashing the
/// whole file as it goes; check that hash.
#[allow(clippy::too_many_arguments)]
fn fill(
    req: &Restore,
    entries: &[Entry],
    rx: &In,
    out: &mut Out,
    file: &File,
    shown: &str,
    window: usize,
    cmp: Option<Receiver<(Option<Vec<u8>>, u64)>>,
) -> Result<Result<RDone, Fault>, Fatal> {
    let cs = req.chunk_size as u64;
    let size = req.size;
    let len_of = |i: u64| (size - i * cs).min(cs) as usize;
    let zeros = vec![0u8; cs.min(size) as usize];
    let mut hasher = blake3::Hasher::new();
    let mut done = RDone::default();
    let mut queue: VecDeque<(u64, Slot)> = VecDeque::new();
    let mut buf = Vec::new();

    // Write and hash the chunks at the front of the queue that are decided.
    let mut drain = |queue: &mut VecDeque<(u64, Slot)>| -> Result<(), Fault> {
        while let Some((i, slot)) = queue.front() {
            let off = i * cs;
            match slot {
                Slot::Zero => {
                    hasher.update(&zeros[..len_of(*i)]);
                }
                Slot::Ready(d) => {
                    hasher.update(d);
                    write_sparse(file, d, off).map_err(|(at, e)| {
                        Fault(FaultKind::Write, at, format!("cannot write {shown} at offset {at}: {e}"))
                    })?;
                }
                Slot::Wait(_) => break,
            }
            queue.pop_front();
        }
        Ok(())
    };
    // The answer to the oldest RNEED: decoded, checked, placed.
    let mut receive =
        |queue: &mut VecDeque<(u64, Slot)>, out: &mut Out, done: &mut RDone| -> Result<Result<(), Fault>, Fatal> {
            flush(out)?;
            let (index, blob) = match next_in_request(rx)? {
                Msg::RData { index, blob } => (index, blob),
                Msg::RAbort { message } => return Ok(Err(Fault(FaultKind::Aborted, 0, message))),
                m => return Err(Fatal::protocol(format!("expected RDATA, received {}", m.name()))),
            };
            let Some((i, Slot::Wait(id))) = queue.front_mut() else {
                return Err(Fatal::protocol(format!("RDATA for chunk {index}, none was asked for")));
            };
            if *i != index {
                return Err(Fatal::protocol(format!("RDATA for chunk {index}, expected chunk {i}")));
            }
            let off = index * cs;
            let len = len_of(index);
            if let Err(e) = decode(&blob, len, &mut buf) {
                return Ok(Err(Fault(FaultKind::BadData, off, format!("chunk {index} from affa: {e}"))));
            }
            if blake3::hash(&buf).as_bytes() != id {
                return Ok(Err(Fault(
                    FaultKind::BadData,
                    off,
                    format!("chunk {index} from affa does not match its id in the manifest"),
                )));
            }
            done.chunks_received += 1;
            done.bytes_received += blob.len() as u64;
            queue.front_mut().expect("checked above").1 = Slot::Ready(std::mem::take(&mut buf));
            Ok(Ok(()))
        };

    for (i, e) in entries.iter().enumerate() {
        let i = i as u64;
        let slot = match e {
            None => Slot::Zero,
            Some(id) => {
                let local = match &cmp {
                    None => None,
                    Some(c) => {
                        let got = match c.try_recv() {
                            Err(TryRecvError::Empty) => {
                                // The RNEEDs so far reach affa while the target is read.
                                flush(out)?;
                                c.recv().ok()
                            }
                            r => r.ok(),
                        };
                        got.and_then(|(d, n)| {
                            done.bytes_local_read += n;
                            d
                        })
                    }
                };
                match local {
                    Some(d) => {
                        done.chunks_local += 1;
                        Slot::Ready(d)
                    }
                    None => {
                        out.send_noflush(&Msg::RNeed { index: i })?;
                        Slot::Wait(*id)
                    }
                }
            }
        };
        queue.push_back((i, slot));
        if let Err(f) = drain(&mut queue) {
            return Ok(Err(f));
        }
        while queue.len() >= window {
            if let Err(f) = receive(&mut queue, out, &mut done)? {
                return Ok(Err(f));
            }
            if let Err(f) = drain(&mut queue) {
                return Ok(Err(f));
            }
        }
    }
    while !queue.is_empty() {
        if let Err(f) = receive(&mut queue, out, &mut done)? {
            return Ok(Err(f));
        }
        if let Err(f) = drain(&mut queue) {
            return Ok(Err(f));
        }
    }
    if hasher.finalize().as_bytes() != &req.file_hash {
        return Ok(Err(Fault(
            FaultKind::BadData,
            size,
            format!("the restored {shown} does not match the manifest's BLAKE3: not renamed"),
        )));
    }
    Ok(Ok(done))
}
