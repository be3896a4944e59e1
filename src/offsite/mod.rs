//! Offsite copies (issue 19): `affa --offsite JOB [ARCHIVE]` copies an archive, encrypted, to an
//! S3 bucket prefix (`offsiteTarget`) and then applies the job's offsite keeps; `affa
//! --offsite-verify JOB` checks every object of the job's offsite archives; `affa --list-archives
//! --offsite` lists them; `affa --offsite-cleanup JOB` removes the chunk objects no archive of
//! the prefix references. The bucket layout, the key file, the index and the markers of running
//! uploads and cleanups are docs/FORMAT.md "Offsite bucket layout, version 1".
//!
//! Owns: what an upload sends and in which order (chunks, then the archive index last: an
//! archive is offsite only when its index exists), which archive is copied, the bucket marker
//! that refuses a wrong key, the marker of a running upload or cleanup (rewritten by a thread of
//! its own while the run lasts, whatever request the run waits on), which offsite archives the
//! keeps remove (their indexes only), what a cleanup removes, and what verify reports. Must
//! never: send a byte that is not sealed (no file or job name, no plaintext), write an index
//! before every chunk it names is stored, upload a chunk of the archive that does not hash to its
//! id, make a new key beside objects an old key sealed, remove a chunk object while an upload may
//! rely on it (an upload's live marker, an index that does not open, an object younger than
//! offsiteCleanupGrace), let its own marker go stale while it runs, remove an object it does not
//! know, use a listed name of a shape the layout does not define as an object's name (it is left
//! alone and reported), change anything under RootDir, or print (the new key goes back to main).

mod crypt;
pub mod fetch;
mod index;
mod retention;
mod s3;
mod tls;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::archive::{self, Archive};
use crate::chunk::{self, ChunkId, ChunkRef};
use crate::clock::Clock;
use crate::config::typed::Offsite;
use crate::config::{Config, Job};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fmt::human;
use crate::observer::Watch;

use crypt::Keys;
use index::{Entry, Index};
use s3::{Listed, Store};

/// The bucket marker's name and plaintext.
const MARKER: &str = "affa-offsite";
const MARKER_TEXT: &[u8] = b"affa-offsite-bucket 1\n";

/// How often a running upload or cleanup rewrites its marker, and the age at which a marker
/// counts as left by a run that died (docs/FORMAT.md "Markers of running uploads and cleanups").
const MARKER_REFRESH: Duration = Duration::from_secs(600);
const MARKER_STALE_SECS: i64 = 3600;

/// The bucket marker is read whole only up to this size (it is a few dozen bytes).
const MAX_MARKER: u64 = 4096;
/// The largest sealed chunk object read: a chunk file and the seal's header and tag.
pub(crate) const MAX_SEALED_CHUNK: u64 = chunk::MAX_CHUNK_FILE_LEN + 64;

/// [`MARKER_REFRESH`]; a test build may shorten it with `AFFA_TEST_OFFSITE_MARKER_REFRESH`
/// (seconds).
fn marker_refresh() -> Duration {
    #[cfg(feature = "test-hooks")]
    if let Some(n) = std::env::var("AFFA_TEST_OFFSITE_MARKER_REFRESH").ok().and_then(|v| v.parse::<u64>().ok()) {
        return Duration::from_secs(n.max(1));
    }
    MARKER_REFRESH
}

/// The marker `lock/KIND-...` of this upload or cleanup: written when it starts, rewritten
/// every [`MARKER_REFRESH`] by a thread of its own for as long as this lives (through a
/// listing of millions of names, a long index PUT, a request waiting on its deadline: the
/// marker never depends on how long one request takes), removed when it ends (also on an
/// error; a killed run leaves it, stale after [`MARKER_STALE_SECS`], replaced by the next run
/// of the same host and job).
struct Running<'a> {
    store: &'a Store,
    name: String,
    /// Dropping it stops the heartbeat.
    stop: Option<mpsc::Sender<()>>,
    beat: Option<std::thread::JoinHandle<()>>,
    /// The first rewrite that failed (after its retries).
    failed: Arc<Mutex<Option<Error>>>,
}

impl<'a> Running<'a> {
    fn start(store: &'a Store, keys: &Keys, kind: &str, parts: &[&[u8]]) -> Result<Running<'a>> {
        let name = keys.marker_name(kind, parts);
        let sealed = keys.seal(&name, format!("affa-offsite-{kind} 1\n").as_bytes())?;
        store.put(&name, &sealed)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let failed = Arc::new(Mutex::new(None));
        let (s, n, f, every) = (store.clone(), name.clone(), failed.clone(), marker_refresh());
        let beat = std::thread::spawn(move || {
            // Until `stop` is dropped (Disconnected); each rewrite ends within its deadlines.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if let Err(e) = s.put(&n, &sealed) {
                    if let Ok(mut f) = f.lock() {
                        f.get_or_insert(e);
                    }
                }
            }
        });
        Ok(Running { store, name, stop: Some(stop), beat: Some(beat), failed })
    }

    /// An error once a rewrite of the marker failed: a cleanup could soon take the marker for
    /// a dead run's, so an upload stops before its index and a cleanup before it removes more.
    fn check(&self) -> Result<()> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The other markers of the prefix that are not stale (names and their age), and the stale
    /// ones; a marker whose time the bucket did not send as RFC 3339 counts as live.
    fn others(&self) -> Result<Markers> {
        let (all, now) = self.store.list_dated("lock/")?;
        let (all, foreign) = split_listing(all);
        let (mut live, mut stale) = (Vec::new(), Vec::new());
        for m in all.into_iter().filter(|m| m.name != self.name) {
            match m.modified.map(|t| (now - t).num_seconds()) {
                Some(age) if age >= MARKER_STALE_SECS => stale.push(m.name),
                age => live.push((m.name, age.unwrap_or(0).max(0))),
            }
        }
        Ok(Markers { live, stale, foreign })
    }
}

/// The other markers of a prefix: the live ones with their age in seconds, the stale ones, and
/// the names below `lock/` that are no marker's.
struct Markers {
    live: Vec<(String, i64)>,
    stale: Vec<String>,
    foreign: Vec<String>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // The heartbeat first (a rewrite under way ends within its deadlines), so that no
        // rewrite follows the removal.
        drop(self.stop.take());
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
        // Best effort: a marker left behind only delays a cleanup until it is stale.
        // One attempt: after a failed upload the gateway may be gone.
        let _ = self.store.delete_once(&self.name);
    }
}

/// A key made by this command: shown once by the caller, kept nowhere else.
pub struct NewKey {
    pub file: PathBuf,
    /// The key file's text.
    pub text: String,
}

/// What `--offsite` did.
pub struct Uploaded {
    pub text: String,
    pub new_key: Option<NewKey>,
}

/// What `--offsite-verify` found: its report, and the archives with a missing or damaged object.
pub struct Verified {
    pub text: String,
    pub damaged: Vec<String>,
}

fn settings(job: &Job) -> Result<&Offsite> {
    job.offsite.as_ref().ok_or_else(|| {
        Error::config(format!(
            "job {} has no offsiteTarget; expected offsiteTarget=s3://BUCKET/PREFIX in its section (README \"Offsite copies\")",
            job.name
        ))
    })
}

/// The job's bucket prefix and keys. A key file that does not exist is made (and returned to be
/// shown) only when `may_create` and the prefix holds no object; the bucket marker is opened
/// (or, on an empty prefix and only for an upload, `uploading`, written) so that a wrong key is
/// refused before anything is sent. A restore, verify, list or cleanup writes nothing here.
fn open(job: &Job, may_create: bool, uploading: bool, clock: &dyn Clock) -> Result<(Store, Keys, Option<NewKey>)> {
    let off = settings(job)?;
    let store = Store::open(off, &job.name)?;
    let kf = &off.key_file;
    let mut new_key = None;
    let master = match crypt::read_key(kf, &job.name)? {
        Some(k) => k,
        None => {
            if !may_create {
                bail!(
                    Config,
                    "offsiteKeyFile {} of job {} does not exist; expected the key that sealed {} (a first affa --offsite by hand makes it)",
                    kf.display(),
                    job.name,
                    store.shown
                );
            }
            if !store.list("", Some(1))?.is_empty() {
                bail!(Config,
                    "offsiteKeyFile {} of job {} does not exist but {} holds objects; expected the key file that sealed them (put your copy back; a new key could not read them)",
                    kf.display(), job.name, store.shown
                );
            }
            let (k, text) = crypt::create_key(kf, &clock.now().format("%Y-%m-%dT%H:%M:%S").to_string())?;
            new_key = Some(NewKey { file: kf.clone(), text });
            k
        }
    };
    let keys = Keys::new(&master);
    match store.get_at_most(MARKER, MAX_MARKER)? {
        Some(sealed) => {
            if keys.open(MARKER, &sealed).ok().as_deref() != Some(MARKER_TEXT) {
                bail!(Config,
                    "offsiteKeyFile {} of job {} does not open {} (its marker object {MARKER} does not decrypt); expected the key file that sealed it",
                    kf.display(), job.name, store.shown
                );
            }
        }
        None => {
            if !store.list("", Some(1))?.is_empty() {
                bail!("{} holds objects but no {MARKER} marker; expected a prefix used only by affa --offsite (or an empty one)", store.shown);
            }
            if uploading {
                store.put(MARKER, &keys.seal(MARKER, MARKER_TEXT)?)?;
            }
        }
    }
    Ok((store, keys, new_key))
}

/// Whether `name` (below the prefix) has a shape the layout defines (docs/FORMAT.md "Object
/// names"; hex lowercase): the bucket marker, `c/<64 hex>`, `i/<32 hex>/<64 hex>`,
/// `lock/upload-<32 hex>`, `lock/cleanup-<32 hex>`. Any other name in a listing was put there by
/// someone else: never read, removed or otherwise used as an object's name.
fn layout_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let parts: Vec<&str> = name.split('/').collect();
    match parts[..] {
        [m] => m == MARKER,
        ["c", h] => hex(h, 64),
        ["i", j, a] => hex(j, 32) && hex(a, 64),
        ["lock", m] => m.strip_prefix("upload-").or_else(|| m.strip_prefix("cleanup-")).is_some_and(|h| hex(h, 32)),
        _ => false,
    }
}

/// A listed name for a message: escaped (it is the bucket's), at most 120 characters.
pub(crate) fn shown_name(name: &str) -> String {
    let e = index::escape(name.as_bytes());
    if e.len() > 120 {
        format!("{}...", &e[..120])
    } else {
        e
    }
}

/// A listing split into the objects of the layout's names and the names of the others (left
/// alone: [`layout_name`]).
fn split_listing(all: Vec<Listed>) -> (Vec<Listed>, Vec<String>) {
    let (ours, foreign): (Vec<Listed>, Vec<Listed>) = all.into_iter().partition(|o| layout_name(&o.name));
    (ours, foreign.into_iter().map(|o| o.name).collect())
}

/// The line that reports the objects of names the layout does not define (at most 5 named).
fn foreign_line(shown: &str, foreign: &[String]) -> String {
    let mut named: Vec<String> = foreign.iter().take(5).map(|n| shown_name(n)).collect();
    if foreign.len() > 5 {
        named.push(format!("and {} more", foreign.len() - 5));
    }
    format!(
        "{shown}: {} object(s) of names affa does not write left alone (put there by someone else?): {}\n",
        foreign.len(),
        named.join(", ")
    )
}

/// The names of the chunk objects the prefix holds (one LIST of `c/`: one request per 1000
/// objects, where a HEAD per chunk would cost one request per chunk; it also finds the chunks a
/// cut upload left).
fn chunks_present(store: &Store) -> Result<HashSet<String>> {
    Ok(store.list("c/", None)?.into_iter().filter(|n| layout_name(n)).collect())
}

/// The object `name` of `size` bytes (as listed) that is an index: at most [`s3::MAX_OBJECT`]
/// bytes, read within the deadline of its size.
fn get_index(store: &Store, name: &str, size: u64) -> Result<Option<Vec<u8>>> {
    store.get_at_most(name, size.min(s3::MAX_OBJECT))
}

/// An archive's id: BLAKE3 of its report, hex.
fn archive_id(a: &Archive) -> Result<String> {
    let p = a.path.join(crate::report::REPORT_FILE);
    let data = fs::read(&p).ctx(|| format!("cannot read {}", p.display()))?;
    Ok(blake3::hash(&data).to_hex().to_string())
}

/// Everything under an archive but its `.affa-chunks/`, parents before children, by name.
fn walk(root: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    fn rec(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) -> Result<()> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .ctx(|| format!("cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .ctx(|| format!("cannot read {}", dir.display()))?;
        names.sort();
        for n in names {
            if rel.as_os_str().is_empty() && n == chunk::ARCHIVE_CHUNK_DIR {
                continue;
            }
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).ctx(|| format!("cannot read {}", p.display()))?;
            let is_dir = md.is_dir();
            out.push((r.clone(), md));
            if is_dir {
                rec(root, &r, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    rec(root, Path::new(""), &mut out)?;
    Ok(out)
}

/// Counts of an upload.
#[derive(Default)]
struct Sent {
    objects: u64,
    bytes: u64,
    present: u64,
}

/// The upload of one archive: the bucket's chunk names, what was sent.
struct Upload<'a> {
    store: &'a Store,
    keys: &'a Keys,
    running: &'a Running<'a>,
    /// The chunk objects the bucket held when the upload started.
    have: HashSet<String>,
    /// The chunk objects of the archive handled so far (each counted, and sent, once).
    handled: HashSet<String>,
    sent: Sent,
    /// offsiteParallel > 1: the senders' queue (None: each object is sent here).
    queue: Option<std::sync::mpsc::SyncSender<(String, Vec<u8>)>>,
    /// The first error of a sender.
    failed: &'a std::sync::Mutex<Option<Error>>,
}

impl Upload<'_> {
    /// Store the chunk `id` (its chunk file `blob`, made by `blob` only when needed) unless the
    /// bucket has it.
    fn chunk(&mut self, id: &ChunkId, blob: impl FnOnce() -> Result<Vec<u8>>) -> Result<()> {
        self.running.check()?;
        let name = self.keys.chunk_name(id);
        // A chunk the archive uses more than once is counted once: "already there" is the
        // chunk objects of the archive the bucket held before this upload.
        if !self.handled.insert(name.clone()) {
            return Ok(());
        }
        if self.have.contains(&name) {
            self.sent.present += 1;
            return Ok(());
        }
        let sealed = self.keys.seal(&name, &blob()?)?;
        self.sent.objects += 1;
        self.sent.bytes += sealed.len() as u64;
        match &self.queue {
            None => {
                self.store.put(&name, &sealed)?;
                crate::interrupt::crash_point("offsite-chunk-uploaded");
            }
            Some(q) => {
                if self.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    bail!("an offsite sender failed");
                }
                q.send((name.clone(), sealed)).map_err(|_| Error::new("the offsite senders stopped"))?;
            }
        }
        Ok(())
    }
}

/// Read up to `buf.len()` bytes (fewer only at the end of the file).
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A plain file of the archive, split into chunks that are stored unless the bucket has them.
fn plain_file(up: &mut Upload<'_>, path: &Path, settings: &chunk::Settings) -> Result<(u64, Vec<ChunkRef>)> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; settings.chunk_size as usize];
    let mut enc = chunk::ChunkEncoder::new(settings.compression).ctx(|| "cannot start the compressor".into())?;
    let (mut size, mut refs) = (0u64, Vec::new());
    loop {
        let n = read_full(&mut f, &mut buf).ctx(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        let piece = &buf[..n];
        if piece.iter().all(|&b| b == 0) {
            refs.push(ChunkRef::Zero);
        } else {
            let id: ChunkId = *blake3::hash(piece).as_bytes();
            up.chunk(&id, || {
                let mut out = Vec::new();
                enc.encode(piece, &mut out).ctx(|| format!("cannot compress {}", path.display()))?;
                Ok(out)
            })?;
            refs.push(ChunkRef::Stored(id));
        }
        if n < buf.len() {
            break;
        }
    }
    Ok((size, refs))
}

/// A chunk of a chunked file, from the archive's own `.affa-chunks/`, checked (decoded, length
/// and BLAKE3) before it is sent.
fn archive_chunk(root: &Path, id: &ChunkId, file: &Path) -> Result<Vec<u8>> {
    let hex = chunk::id_hex(id);
    let p = root.join(chunk::ARCHIVE_CHUNK_DIR).join(&hex[..2]).join(&hex);
    let blob = fs::read(&p).ctx(|| format!("cannot read chunk {hex} of {}", file.display()))?;
    let mut plain = Vec::new();
    let ok = chunk::decode_chunk_file(&blob, &mut plain).is_ok() && blake3::hash(&plain).as_bytes() == id;
    if !ok {
        return Err(Error::damaged(format!(
            "chunk {hex} of {} in {} is damaged; nothing of this archive is offsite yet (affa --verify names the damage)",
            file.display(),
            root.display()
        )));
    }
    Ok(blob)
}

fn pick(job: &Job, name: Option<&str>) -> Result<Archive> {
    let a = match name {
        Some(n) => archive::find(&job.job_dir(), &job.name, n)?,
        None => archive::newest_valid(&job.job_dir())?
            .ok_or_else(|| Error::new(format!("job {} has no complete archive to copy offsite", job.name)))?,
    };
    if !a.valid() {
        bail!("archive {} of job {} is not complete (no report); expected a complete archive", a.name(), job.name);
    }
    Ok(a)
}

/// What an upload collects while it sends the chunks: the index's entries, the chunks of the
/// chunked files, the count of special files skipped.
type Collected = (Vec<Entry>, Vec<ChunkId>, u64);

/// Send the chunks of the archive `a` the bucket lacks (plain files cut in chunks, then the
/// chunks of its chunked files) and collect what its index lists.
fn collect(up: &mut Upload<'_>, a: &Archive, chunking: &chunk::Settings, watch: &Watch) -> Result<Collected> {
    let mut entries = Vec::new();
    let mut skipped = 0u64;
    let items = walk(&a.path)?;
    let bar = watch.meter(format!("offsite {}", a.name()), Some(items.len() as u64));
    for (i, (rel, md)) in items.iter().enumerate() {
        bar.set(i as u64);
        let path = rel.as_os_str().as_bytes().to_vec();
        let (mode, uid, gid, mtime) = (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime());
        let ft = md.file_type();
        if ft.is_dir() {
            entries.push(Entry::Dir { mode, uid, gid, mtime, path });
        } else if ft.is_symlink() {
            let p = a.path.join(rel);
            let target = fs::read_link(&p).ctx(|| format!("cannot read {}", p.display()))?;
            entries.push(Entry::Link { uid, gid, mtime, path, target: target.as_os_str().as_bytes().to_vec() });
        } else if ft.is_file() {
            let (size, chunks) = plain_file(up, &a.path.join(rel), chunking)?;
            entries.push(Entry::File { mode, uid, gid, mtime, size, path, chunks });
        } else {
            skipped += 1;
        }
    }
    drop(bar);
    let mut chunked = Vec::new();
    let mut seen = HashSet::new();
    for file in chunk::chunked_files(&a.path)? {
        let m = chunk::read_manifest(&chunk::manifest_path(&a.path, &file))?;
        for c in &m.chunks {
            if let ChunkRef::Stored(id) = c {
                if seen.insert(*id) {
                    up.chunk(id, || archive_chunk(&a.path, id, &file))?;
                    chunked.push(*id);
                }
            }
        }
    }
    Ok((entries, chunked, skipped))
}

/// `affa --offsite JOB [ARCHIVE]`: copy the archive (default the newest complete one) to the
/// job's bucket prefix: the chunks the bucket lacks, then its index.
pub fn upload(
    cfg: &Config,
    job_name: &str,
    archive_name: Option<&str>,
    clock: &dyn Clock,
    watch: &Watch,
) -> Result<Uploaded> {
    let job = cfg.job(job_name)?;
    settings(job)?;
    // No rotation renames the archive while it is read.
    let _lock = crate::lock::acquire(&cfg.lock_dir(), job_name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir())?;
    upload_held(job, archive_name, true, clock, watch)
}

/// offsiteAfterRun=yes: copy the run's new archive `scheduled.0`; the run holds the job's lock.
/// No key is made here (a run's output is a log, not a person): the first `--offsite` by hand
/// makes it and shows it.
pub fn upload_after_run(job: &Job, clock: &dyn Clock, watch: &Watch) -> Result<Uploaded> {
    upload_held(job, Some("scheduled.0"), false, clock, watch)
}

/// An upload while the job's lock is held.
fn upload_held(
    job: &Job,
    archive_name: Option<&str>,
    may_create: bool,
    clock: &dyn Clock,
    watch: &Watch,
) -> Result<Uploaded> {
    let job_name = job.name.as_str();
    let a = pick(job, archive_name)?;
    let date = a.report.as_ref().and_then(|r| r.date()).unwrap_or("").to_string();
    let (store, keys, new_key) = open(job, may_create, true, clock)?;
    let id = archive_id(&a)?;
    let index_name = keys.index_name(job_name, &id);
    let head = format!("{job_name} {} (Date {date})", a.name());
    if store.exists(&index_name)? {
        let mut text = format!("{head}: already offsite in {}\n", store.shown);
        text.push_str(&retain(&store, &keys, job, &id)?);
        return Ok(Uploaded { text, new_key });
    }
    // The marker first, then the look for a cleanup's: of an upload and a cleanup that start
    // together, at least one sees the other's marker (docs/FORMAT.md).
    let host = crate::notify::hostname();
    let running = Running::start(&store, &keys, "upload", &[host.as_bytes(), job_name.as_bytes()])?;
    crate::interrupt::crash_point("offsite-upload-marked");
    if let Some((m, age)) = running.others()?.live.into_iter().find(|(m, _)| m.starts_with("lock/cleanup-")) {
        bail!(
            "{}: an affa --offsite-cleanup is running (its marker {m} was written {age} s ago); nothing of {} was uploaded: run --offsite again when it is done",
            store.shown,
            a.name()
        );
    }
    // Its marker is kept fresh (its heartbeat) through a listing of millions of objects: a
    // cleanup starting meanwhile must see this upload live, or it could remove chunks it found
    // present.
    let have = chunks_present(&store)?;
    let chunking = &job.chunk.settings;
    // offsiteParallel > 1: the chunk objects go through a bounded queue to that many senders;
    // the index is written only after every sender is done and none failed.
    let parallel = settings(job)?.parallel.max(1) as usize;
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Vec<u8>)>(parallel * 2);
    let rx = std::sync::Mutex::new(rx);
    let collected = std::thread::scope(|sc| {
        if parallel > 1 {
            let (rx, store, failed) = (&rx, &store, &failed);
            for _ in 0..parallel {
                sc.spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok((name, sealed))) = next else { break };
                    if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                        continue;
                    }
                    match store.put(&name, &sealed) {
                        Ok(()) => crate::interrupt::crash_point("offsite-chunk-uploaded"),
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                        }
                    }
                });
            }
        }
        let mut up = Upload {
            store: &store,
            keys: &keys,
            running: &running,
            have,
            handled: HashSet::new(),
            sent: Sent::default(),
            queue: (parallel > 1).then_some(tx),
            failed: &failed,
        };
        let r = collect(&mut up, &a, chunking, watch);
        let Upload { sent, .. } = up;
        r.map(|(entries, chunked, skipped)| (entries, chunked, skipped, sent))
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    let (entries, chunked, skipped, s) = collected?;
    let idx = Index {
        job: job_name.to_string(),
        archive: a.name(),
        date: date.clone(),
        id,
        uploaded: clock.now().format("%Y-%m-%dT%H:%M:%S").to_string(),
        chunk_size: chunking.chunk_size,
        entries,
        chunked,
    };
    let sealed = keys.seal(&index_name, &idx.to_bytes())?;
    // The marker was live until now (a failed rewrite stops here, not after the index); the
    // heartbeat keeps it so through the index's PUT, however long it takes.
    running.check()?;
    store.put(&index_name, &sealed)?;
    drop(running);
    let mut text = format!(
        "{head}: offsite in {}: {} object(s) uploaded ({}), {} chunk(s) already there, {} entries\n",
        store.shown,
        s.objects + 1,
        human(s.bytes + sealed.len() as u64),
        s.present,
        idx.entries.len()
    );
    if skipped > 0 {
        text.push_str(&format!("{head}: {skipped} special file(s) (devices, fifos, sockets) not copied\n"));
    }
    text.push_str(&retain(&store, &keys, job, &idx.id)?);
    Ok(Uploaded { text, new_key })
}

/// A job's offsite archives: those that open (by date), and why the others do not.
struct Indexes {
    good: Vec<Index>,
    /// The object names of `good`.
    names: Vec<String>,
    bad: Vec<String>,
    /// The names below the job's `i/` that are no index's (left alone).
    foreign: Vec<String>,
}

/// The job's offsite archives, opened and checked.
fn indexes(store: &Store, keys: &Keys, job: &str) -> Result<Indexes> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let (listed, foreign): (Vec<Listed>, Vec<Listed>) =
        store.list_objects(&keys.job_dir(job))?.into_iter().partition(|o| layout_name(&o.name));
    let foreign = foreign.into_iter().map(|o| o.name).collect();
    for Listed { name, size, .. } in listed {
        let sealed = match get_index(store, &name, size) {
            Ok(Some(s)) => s,
            Ok(None) => {
                bad.push(format!("index {name}: vanished while it was read"));
                continue;
            }
            // Larger than the listing said, or than any index: not one.
            Err(e) if e.kind() == ErrorKind::Damaged => {
                bad.push(format!("index {name}: {e}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        let idx = keys
            .open(&name, &sealed)
            .map_err(|e| Error::damaged(format!("offsite index {name} {e}")))
            .and_then(|plain| Index::parse(&plain, &name));
        match idx {
            Ok(i) if i.job == job => good.push((i, name)),
            Ok(i) => bad.push(format!("index {name}: names job '{}', expected '{job}'", i.job)),
            Err(e) => bad.push(e.to_string()),
        }
    }
    good.sort_by(|(a, _), (b, _)| (&a.date, &a.uploaded).cmp(&(&b.date, &b.uploaded)));
    let (good, names) = good.into_iter().unzip();
    Ok(Indexes { good, names, bad, foreign })
}

/// `affa --offsite-verify JOB`: every chunk of every offsite archive of the job is present,
/// opens under its name, decodes and hashes to its id; each missing or damaged object is named
/// with the archive and a file that uses it.
pub fn verify(cfg: &Config, job_name: &str, clock: &dyn Clock, watch: &Watch) -> Result<Verified> {
    let job = cfg.job(job_name)?;
    let (store, keys, _) = open(job, false, false, clock)?;
    let Indexes { good: idxs, bad: bad_idx, foreign, .. } = indexes(&store, &keys, job_name)?;
    let mut out = String::new();
    if !foreign.is_empty() {
        out.push_str(&foreign_line(&store.shown, &foreign));
    }
    let mut damaged = Vec::new();
    for b in &bad_idx {
        out.push_str(&format!("{b}\n"));
        damaged.push(b.split(':').next().unwrap_or("").to_string());
    }
    if idxs.is_empty() && bad_idx.is_empty() {
        bail!("job {job_name} has no offsite archive in {}", store.shown);
    }
    let have = chunks_present(&store)?;
    // Each object is checked once, whichever archives use it.
    let mut checked: BTreeMap<ChunkId, Option<String>> = BTreeMap::new();
    let mut plain = Vec::new();
    for idx in &idxs {
        let label = format!("{} (Date {})", idx.archive, idx.date);
        let uses = idx.chunk_uses();
        let bar = watch.meter(format!("offsite-verify {label}"), Some(uses.len() as u64));
        let mut problems = Vec::new();
        for (i, (id, file)) in uses.iter().enumerate() {
            bar.set(i as u64);
            let result = match checked.get(id) {
                Some(r) => r.clone(),
                None => {
                    let name = keys.chunk_name(id);
                    let r = if !have.contains(&name) {
                        Some("missing".to_string())
                    } else {
                        let got = match store.get_at_most(&name, MAX_SEALED_CHUNK) {
                            Err(e) if e.kind() == ErrorKind::Damaged => Err(format!("damaged: {e}")),
                            r => Ok(r?),
                        };
                        match got {
                            Err(why) => Some(why),
                            Ok(None) => Some("missing".to_string()),
                            Ok(Some(sealed)) => match keys.open(&name, &sealed) {
                                Err(e) => Some(format!("damaged: {e}")),
                                Ok(blob) => match chunk::decode_chunk_file(&blob, &mut plain) {
                                    Err(e) => Some(format!("damaged: {e}")),
                                    Ok(()) if blake3::hash(&plain).as_bytes() != id => {
                                        Some("damaged: does not hash to its chunk id".to_string())
                                    }
                                    Ok(()) => None,
                                },
                            },
                        }
                    };
                    checked.insert(*id, r.clone());
                    r
                }
            };
            if let Some(why) = result {
                problems.push(format!(
                    "{label}: object {} (chunk {}) {why}; affects {file}\n",
                    keys.chunk_name(id),
                    chunk::id_hex(id)
                ));
            }
        }
        drop(bar);
        if problems.is_empty() {
            out.push_str(&format!("{label}: OK ({} chunk(s) checked)\n", uses.len()));
        } else {
            damaged.push(idx.archive.clone());
            for p in problems {
                out.push_str(&p);
            }
        }
    }
    Ok(Verified { text: out, damaged })
}

/// `affa --list-archives --offsite [JOB...]`: the offsite archives of the jobs with an
/// offsiteTarget (all when none are named), oldest first.
pub fn list(cfg: &Config, jobs: &[String], clock: &dyn Clock) -> Result<Listing> {
    let mut out = Listing::default();
    let sel = cfg.select(jobs);
    // A broken job that has (or, named, may have) an offsite copy: named, the others listed.
    for (name, partial, e) in &sel.errors {
        if jobs.is_empty() && !partial.is_some_and(|j| j.offsite.is_some()) {
            continue;
        }
        out.failed.push(format!("job {name}: {e}"));
    }
    for job in sel.jobs {
        if job.offsite.is_none() && jobs.is_empty() {
            continue;
        }
        // One job whose bucket cannot be read (a key, the network) does not hide the others.
        let opened = open(job, false, false, clock)
            .and_then(|(store, keys, _)| indexes(&store, &keys, &job.name).map(|i| (store, i)));
        let (store, Indexes { good: idxs, bad, foreign, .. }) = match opened {
            Ok(x) => x,
            Err(e) => {
                out.failed.push(format!("job {}: {e}", job.name));
                continue;
            }
        };
        out.text.push_str(&format!("Job {} offsite in {}: {} archive(s)\n", job.name, store.shown, idxs.len()));
        for i in &idxs {
            out.text.push_str(&format!(
                "  {}  Date {}  uploaded {}  {} entries\n",
                i.archive,
                i.date,
                i.uploaded,
                i.entries.len()
            ));
        }
        for b in bad {
            out.text.push_str(&format!("  {b}\n"));
        }
        if !foreign.is_empty() {
            out.text.push_str(&format!("  {}", foreign_line(&store.shown, &foreign)));
        }
    }
    Ok(out)
}

/// What `--list-archives --offsite` found: the listing, and one line per job it could not list.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub text: String,
    pub failed: Vec<String>,
}

/// The job's offsite keeps (offsiteScheduledKeep ... offsiteYearlyKeep) applied to its offsite
/// archives after an upload: the index of each archive they do not keep is removed (it is no
/// longer listed; its chunks stay until `--offsite-cleanup` finds them unreferenced). The
/// archive `just` (its id) is kept whatever the keeps say. Indexes that do not open are left.
fn retain(store: &Store, keys: &Keys, job: &Job, just: &str) -> Result<String> {
    let off = settings(job)?;
    let Indexes { good, names, .. } = indexes(store, keys, &job.name)?;
    let dates: Vec<&str> = good.iter().map(|i| i.date.as_str()).collect();
    let kept = retention::kept(&dates, off.keeps);
    let mut out = String::new();
    let mut removed = 0;
    for ((idx, name), keep) in good.iter().zip(&names).zip(kept) {
        if keep || idx.id == just {
            continue;
        }
        store.delete(name)?;
        crate::interrupt::crash_point("offsite-index-removed");
        removed += 1;
        out.push_str(&format!(
            "{} {} (Date {}): removed from {} by the offsite keeps (its chunks go with --offsite-cleanup once no archive uses them)\n",
            job.name, idx.archive, idx.date, store.shown
        ));
    }
    if removed > 0 {
        out.push_str(&format!(
            "{}: {} offsite archive(s) kept ({})\n",
            job.name,
            good.len() - removed,
            retention::describe(off.keeps)
        ));
    }
    Ok(out)
}

/// `affa --offsite-cleanup JOB`: remove the chunk objects of the job's bucket prefix that no
/// offsite archive of the prefix (of any job sharing it) references and that are older than
/// offsiteCleanupGrace on the bucket's clock. Nothing is removed while another upload or
/// cleanup of the prefix runs (its marker is live) or when an index does not open.
pub fn cleanup(cfg: &Config, job_name: &str, clock: &dyn Clock, watch: &Watch) -> Result<String> {
    let job = cfg.job(job_name)?;
    let off = settings(job)?;
    let grace = off.cleanup_grace_hours;
    let (store, keys, _) = open(job, false, false, clock)?;
    if !store.exists(MARKER)? {
        // An empty prefix (no upload wrote its marker): nothing to remove, and no marker of
        // this cleanup left there (a prefix with objects but no bucket marker is refused).
        return Ok(format!("{}: no offsite objects; nothing removed\n", store.shown));
    }
    let host = crate::notify::hostname();
    let me = Running::start(&store, &keys, "cleanup", &[host.as_bytes()])?;
    crate::interrupt::crash_point("offsite-cleanup-marked");
    let Markers { live, stale, mut foreign } = me.others()?;
    if let Some((m, age)) = live.first() {
        let what = if m.starts_with("lock/upload-") { "an affa --offsite upload" } else { "another --offsite-cleanup" };
        return Ok(format!(
            "{}: {what} is running (its marker {m} was written {age} s ago); nothing removed: run --offsite-cleanup again when it is done (a marker older than {} min counts as left by a run that died)\n",
            store.shown,
            MARKER_STALE_SECS / 60
        ));
    }
    // Every index of the prefix, whichever job: one that does not open could reference any chunk.
    let mut referenced = HashSet::new();
    let (index_objects, other): (Vec<Listed>, Vec<Listed>) =
        store.list_objects("i/")?.into_iter().partition(|o| layout_name(&o.name));
    foreign.extend(other.into_iter().map(|o| o.name));
    let index_names: Vec<String> = index_objects.iter().map(|o| o.name.clone()).collect();
    for Listed { name, size, .. } in &index_objects {
        me.check()?;
        let sealed = match get_index(&store, name, *size) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) if e.kind() == ErrorKind::Damaged => bail!(
                Damaged,
                "{e}; nothing removed (an index that does not open could reference any object: remove it or put the right one back)"
            ),
            Err(e) => return Err(e),
        };
        let idx = keys
            .open(name, &sealed)
            .map_err(|e| format!("does not open: {e}"))
            .and_then(|plain| Index::parse(&plain, name).map_err(|e| e.to_string()));
        match idx {
            Ok(i) => referenced.extend(i.chunk_uses().into_iter().map(|(id, _)| keys.chunk_name(&id))),
            Err(e) => bail!(
                Damaged,
                "{}: offsite index {name}: {e}; nothing removed (an index that does not open could reference any object: remove it or put the right one back)",
                store.shown
            ),
        }
    }
    let (chunks, now) = store.list_dated("c/")?;
    let (chunks, other) = split_listing(chunks);
    foreign.extend(other);
    // An upload that started while the indexes and chunks were listed: its index is not among
    // those read, and the chunks it reuses may look unreferenced. Nothing removed then.
    if let Some((m, age)) = me.others()?.live.into_iter().find(|(m, _)| m.starts_with("lock/upload-")) {
        return Ok(format!(
            "{}: an affa --offsite upload started while this cleanup listed the bucket (its marker {m} was written {age} s ago); nothing removed: run --offsite-cleanup again when it is done\n",
            store.shown
        ));
    }
    let bar = watch.meter(format!("offsite-cleanup {}", store.shown), Some(chunks.len() as u64));
    let (mut removed, mut bytes, mut young, mut used) = (0u64, 0u64, 0u64, 0u64);
    for (i, c) in chunks.iter().enumerate() {
        bar.set(i as u64);
        me.check()?;
        if referenced.contains(&c.name) {
            used += 1;
            continue;
        }
        let old = c.modified.is_some_and(|t| (now - t).num_seconds() >= grace as i64 * 3600);
        if !old {
            young += 1;
            continue;
        }
        store.delete(&c.name)?;
        crate::interrupt::crash_point("offsite-chunk-removed");
        removed += 1;
        bytes += c.size;
    }
    drop(bar);
    for m in &stale {
        store.delete(m)?;
    }
    let mut text = format!(
        "{}: {removed} unreferenced chunk object(s) removed ({}); {used} kept for {} offsite archive(s)",
        store.shown,
        human(bytes),
        index_names.len()
    );
    if young > 0 {
        text.push_str(&format!("; {young} unreferenced one(s) younger than offsiteCleanupGrace={grace} h kept"));
    }
    text.push('\n');
    if !stale.is_empty() {
        text.push_str(&format!(
            "{}: {} marker(s) of runs that died removed: {}\n",
            store.shown,
            stale.len(),
            stale.join(", ")
        ));
    }
    if !foreign.is_empty() {
        text.push_str(&foreign_line(&store.shown, &foreign));
    }
    Ok(text)
}
