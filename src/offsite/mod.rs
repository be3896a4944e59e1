//! Offsite copies (issue 19, first slice): `affa --offsite JOB [ARCHIVE]` copies an archive,
//! encrypted, to an S3 bucket prefix (`offsiteTarget`); `affa --offsite-verify JOB` checks every
//! object of the job's offsite archives; `affa --list-archives --offsite` lists them. The bucket
//! layout, the key file and the index are docs/FORMAT.md "Offsite bucket layout, version 1".
//!
//! Owns: what an upload sends and in which order (chunks, then the archive index last: an
//! archive is offsite only when its index exists), which archive is copied, the bucket marker
//! that refuses a wrong key, and what verify reports. Must never: send a byte that is not sealed
//! (no file or job name, no plaintext), write an index before every chunk it names is stored,
//! upload a chunk of the archive that does not hash to its id, make a new key beside objects an
//! old key sealed, change anything under RootDir, or print (the new key goes back to main).

mod crypt;
mod index;
mod s3;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::archive::{self, Archive};
use crate::chunk::{self, ChunkId, ChunkRef};
use crate::clock::Clock;
use crate::config::typed::Offsite;
use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};
use crate::fmt::human;
use crate::observer::Watch;

use crypt::Keys;
use index::{Entry, Index};
use s3::Store;

/// The bucket marker's name and plaintext.
const MARKER: &str = "affa-offsite";
const MARKER_TEXT: &[u8] = b"affa-offsite-bucket 1\n";

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
/// (or, on an empty prefix, written) so that a wrong key is refused before anything is sent.
fn open(job: &Job, may_create: bool, clock: &dyn Clock) -> Result<(Store, Keys, Option<NewKey>)> {
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
                    "offsiteKeyFile {} of job {} does not exist; expected the key that sealed {}",
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
    match store.get(MARKER)? {
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
            store.put(MARKER, &keys.seal(MARKER, MARKER_TEXT)?)?;
        }
    }
    Ok((store, keys, new_key))
}

/// The names of the chunk objects the prefix holds (one LIST of `c/`: one request per 1000
/// objects, where a HEAD per chunk would cost one request per chunk; it also finds the chunks a
/// cut upload left).
fn chunks_present(store: &Store) -> Result<HashSet<String>> {
    Ok(store.list("c/", None)?.into_iter().collect())
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
    have: HashSet<String>,
    sent: Sent,
}

impl Upload<'_> {
    /// Store the chunk `id` (its chunk file `blob`, made by `blob` only when needed) unless the
    /// bucket has it.
    fn chunk(&mut self, id: &ChunkId, blob: impl FnOnce() -> Result<Vec<u8>>) -> Result<()> {
        let name = self.keys.chunk_name(id);
        if self.have.contains(&name) {
            self.sent.present += 1;
            return Ok(());
        }
        let sealed = self.keys.seal(&name, &blob()?)?;
        self.store.put(&name, &sealed)?;
        crate::interrupt::crash_point("offsite-chunk-uploaded");
        self.sent.objects += 1;
        self.sent.bytes += sealed.len() as u64;
        self.have.insert(name);
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
    let a = pick(job, archive_name)?;
    let date = a.report.as_ref().and_then(|r| r.date()).unwrap_or("").to_string();
    let (store, keys, new_key) = open(job, true, clock)?;
    let id = archive_id(&a)?;
    let index_name = keys.index_name(job_name, &id);
    let head = format!("{job_name} {} (Date {date})", a.name());
    if store.exists(&index_name)? {
        let text = format!("{head}: already offsite in {}\n", store.shown);
        return Ok(Uploaded { text, new_key });
    }
    let mut up = Upload { store: &store, keys: &keys, have: chunks_present(&store)?, sent: Sent::default() };
    let chunking = &job.chunk.settings;
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
            let (size, chunks) = plain_file(&mut up, &a.path.join(rel), chunking)?;
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
    store.put(&index_name, &sealed)?;
    let s = &up.sent;
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
    Ok(Uploaded { text, new_key })
}

/// A job's offsite archives: those that open (by date), and why the others do not.
struct Indexes {
    good: Vec<Index>,
    bad: Vec<String>,
}

/// The job's offsite archives, opened and checked.
fn indexes(store: &Store, keys: &Keys, job: &str) -> Result<Indexes> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for name in store.list(&keys.job_dir(job), None)? {
        let Some(sealed) = store.get(&name)? else {
            bad.push(format!("index {name}: vanished while it was read"));
            continue;
        };
        let idx = keys
            .open(&name, &sealed)
            .map_err(|e| Error::damaged(format!("offsite index {name} {e}")))
            .and_then(|plain| Index::parse(&plain, &name));
        match idx {
            Ok(i) if i.job == job => good.push(i),
            Ok(i) => bad.push(format!("index {name}: names job '{}', expected '{job}'", i.job)),
            Err(e) => bad.push(e.to_string()),
        }
    }
    good.sort_by(|a, b| (&a.date, &a.uploaded).cmp(&(&b.date, &b.uploaded)));
    Ok(Indexes { good, bad })
}

/// `affa --offsite-verify JOB`: every chunk of every offsite archive of the job is present,
/// opens under its name, decodes and hashes to its id; each missing or damaged object is named
/// with the archive and a file that uses it.
pub fn verify(cfg: &Config, job_name: &str, clock: &dyn Clock, watch: &Watch) -> Result<Verified> {
    let job = cfg.job(job_name)?;
    let (store, keys, _) = open(job, false, clock)?;
    let Indexes { good: idxs, bad: bad_idx } = indexes(&store, &keys, job_name)?;
    let mut out = String::new();
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
                        match store.get(&name)? {
                            None => Some("missing".to_string()),
                            Some(sealed) => match keys.open(&name, &sealed) {
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
pub fn list(cfg: &Config, jobs: &[String], clock: &dyn Clock) -> Result<String> {
    let mut out = String::new();
    for job in crate::commands::select(cfg, jobs)? {
        if job.offsite.is_none() && jobs.is_empty() {
            continue;
        }
        let (store, keys, _) = open(job, false, clock)?;
        let Indexes { good: idxs, bad } = indexes(&store, &keys, &job.name)?;
        out.push_str(&format!("Job {} offsite in {}: {} archive(s)\n", job.name, store.shown, idxs.len()));
        for i in &idxs {
            out.push_str(&format!(
                "  {}  Date {}  uploaded {}  {} entries\n",
                i.archive,
                i.date,
                i.uploaded,
                i.entries.len()
            ));
        }
        for b in bad {
            out.push_str(&format!("  {b}\n"));
        }
    }
    Ok(out)
}
