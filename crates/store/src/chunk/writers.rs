//! Pool work taken off the receive loop of an agent backup (`chunk/remote.rs`): each new chunk
//! file written, fsynced, renamed into the pool and linked into the archive on a few threads,
//! and the chunks a ranged (CBT) backup carries from the previous archive linked on one of them
//! while the agent reads what changed.
//!
//! Why: an fsync costs a journal commit and a device flush. One after the other in the receive
//! loop they made it wait for the disk once per chunk (a 1% CBT incremental of a 4 GiB disk:
//! 82 of them, ~1 s of a 3 s run); concurrent fsyncs share commits and the loop goes on
//! receiving. Linking thousands of carried chunks (each a directory entry and an inode update
//! the journal writes) no longer comes before the agent's read: it runs beside it.
//!
//! Owns: the threads (scoped: none outlives `run`), the bound on verified chunks waiting to be
//! written (memory), collecting what each job placed. Must never: store a blob the caller did
//! not verify (the caller hands over only chunks that decoded to their id), report a chunk
//! placed before its entry is durable and linked, or hide an error (the first one is returned;
//! a carried chunk that cannot be linked is reported by id for the caller to read it again).

use super::pool::{self, Pool};
use super::ChunkId;
use crate::error::{Error, IoContext, Result};
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::Duration;

/// Writer threads (I/O bound: they mostly wait for fsync).
const THREADS: usize = 4;
/// Bytes of chunk files at most queued or being written (fewer threads for big chunks).
const QUEUED_BYTES: usize = 64 << 20;

enum Job {
    /// A verified chunk file: store it as the pool entry of the id and link it.
    Store(ChunkId, Vec<u8>),
    /// Carried chunks whose entries passed their check: link them.
    Carry(Vec<ChunkId>),
}

enum Done {
    Stored { id: ChunkId, len: u32, touched: Vec<PathBuf> },
    Carried { touched: Vec<PathBuf>, unlinked: Vec<ChunkId>, fresh: Vec<ChunkId>, fresh_bytes: u64 },
}

/// What the jobs of one `run` placed.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Stored chunks and their entry's length.
    pub stored: Vec<(ChunkId, u32)>,
    /// Directories that got new names (to be fsynced before a manifest names them).
    pub touched: HashSet<PathBuf>,
    /// Carried chunks that could not be linked (their entry vanished, or the link limit with an
    /// entry that no longer verifies): not in the archive, to be read again.
    pub unlinked: Vec<ChunkId>,
    /// Carried chunks whose entry had reached the link limit: stored again as a fresh copy, and
    /// the bytes of those copies.
    pub fresh: Vec<ChunkId>,
    pub fresh_bytes: u64,
}

/// The caller's side: hands jobs to the threads.
pub(crate) struct Handle<'a> {
    jobs: Option<SyncSender<Job>>,
    results: &'a Receiver<Result<Done>>,
    pending: usize,
    out: Outcome,
}

impl Handle<'_> {
    /// Queue a verified chunk file (blocks while the queue is full). An error of an earlier
    /// job is returned here, as soon as it is known.
    pub fn store(&mut self, id: ChunkId, blob: Vec<u8>) -> Result<()> {
        self.take_ready()?;
        self.send(Job::Store(id, blob))
    }

    /// Link carried chunks (one job, in the background).
    pub fn carry(&mut self, ids: Vec<ChunkId>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.send(Job::Carry(ids))
    }

    /// Queue a job; while the queue is full, take the results that come (an error of an earlier
    /// job is returned at once; threads that all ended are an error, never a wait forever).
    fn send(&mut self, mut job: Job) -> Result<()> {
        let ended = || Error::new("internal: the pool writer threads ended");
        let tx = self.jobs.clone().ok_or_else(|| Error::new("internal: pool writers already finished"))?;
        loop {
            match tx.try_send(job) {
                Ok(()) => {
                    self.pending += 1;
                    return Ok(());
                }
                Err(TrySendError::Full(j)) => {
                    job = j;
                    match self.results.recv_timeout(Duration::from_millis(50)) {
                        Ok(r) => {
                            self.pending -= 1;
                            self.absorb(r?);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Err(ended()),
                    }
                }
                Err(TrySendError::Disconnected(_)) => return Err(ended()),
            }
        }
    }

    fn take_ready(&mut self) -> Result<()> {
        while let Ok(r) = self.results.try_recv() {
            self.pending -= 1;
            self.absorb(r?);
        }
        Ok(())
    }

    fn absorb(&mut self, d: Done) {
        match d {
            Done::Stored { id, len, touched } => {
                self.out.stored.push((id, len));
                self.out.touched.extend(touched);
            }
            Done::Carried { touched, unlinked, fresh, fresh_bytes } => {
                self.out.touched.extend(touched);
                self.out.unlinked.extend(unlinked);
                self.out.fresh.extend(fresh);
                self.out.fresh_bytes += fresh_bytes;
            }
        }
    }

    /// Wait for every job; the first error of any.
    fn finish(mut self) -> Result<Outcome> {
        self.jobs = None;
        let mut first = None;
        while self.pending > 0 {
            match self.results.recv() {
                Ok(Ok(d)) => self.absorb(d),
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => return Err(Error::new("internal: a pool writer thread ended early")),
            }
            self.pending -= 1;
        }
        match first {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }
}

/// Run `body` with writer threads for `archive_root` beside it; when it returns, wait for
/// every job it queued. On an error of `body` the queued jobs still finish (they only store
/// verified chunks); the first error of a job, else `body`'s, is returned.
pub(crate) fn run<T>(
    pool: &Pool,
    archive_root: &Path,
    dirs: &pool::LinkDirs,
    chunk_size: u32,
    body: impl FnOnce(&mut Handle) -> Result<T>,
) -> Result<(T, Outcome)> {
    let threads = (QUEUED_BYTES / 2 / (chunk_size as usize).max(1)).clamp(1, THREADS);
    let (jtx, jrx) = sync_channel::<Job>(threads);
    let jrx = Mutex::new(jrx);
    let (rtx, rrx) = channel::<Result<Done>>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (jrx, rtx) = (&jrx, rtx.clone());
            s.spawn(move || loop {
                // The lock is released before the job runs.
                let job = jrx.lock().map_err(|_| ()).and_then(|rx| rx.recv().map_err(|_| ()));
                let Ok(job) = job else { break };
                if rtx.send(work(pool, archive_root, dirs, job)).is_err() {
                    break;
                }
            });
        }
        drop(rtx);
        let mut h = Handle { jobs: Some(jtx), results: &rrx, pending: 0, out: Outcome::default() };
        match body(&mut h) {
            Ok(t) => Ok((t, h.finish()?)),
            // The jobs queued still finish (they only store verified chunks); an error of theirs
            // wins: a writer's failure (EIO, a full disk) is never hidden behind the caller's
            // error, which may be one it would only warn about (a vanished source file).
            Err(e) => Err(h.finish().err().unwrap_or(e)),
        }
    })
}

fn work(pool: &Pool, archive_root: &Path, link_dirs: &pool::LinkDirs, job: Job) -> Result<Done> {
    match job {
        Job::Store(id, blob) => {
            let mut touched = Vec::new();
            pool.write_entry(&id, &blob, &mut touched)?;
            if let Err(e) = pool.link_into(&id, archive_root, &mut touched) {
                // The hard-link limit (or the entry swept meanwhile): a fresh copy, then link.
                pool.write_entry(&id, &blob, &mut touched)?;
                pool.link_into(&id, archive_root, &mut touched).map_err(|e2| {
                    Error::new(format!("{}: {e2} (first attempt: {e})", pool::link_failed(&id, archive_root)))
                })?;
            }
            // A chunk file is far below 4 GiB (MAX_CHUNK_SIZE and the agent's frame limit).
            Ok(Done::Stored { id, len: u32::try_from(blob.len()).unwrap_or(0), touched })
        }
        Job::Carry(ids) => {
            let (mut dirs, mut unlinked, mut fresh, mut fresh_bytes) = (HashSet::new(), Vec::new(), Vec::new(), 0);
            let (mut blob_buf, mut decoded) = (Vec::new(), Vec::new());
            let mut touched = Vec::new();
            // Thousands of links into one archive: through the open fan-out directories.
            let mut linker = pool::Linker::new(pool, link_dirs);
            for id in ids {
                dirs.extend(touched.drain(..));
                match linker.link(&id) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                        // The entry already has the filesystem's maximum of links: store a
                        // fresh copy of it (read and verified first) and link that.
                        let entry = pool.entry(&id);
                        match pool::full_check(&entry, &id, &mut blob_buf, &mut decoded) {
                            pool::Checked::Good { .. } => {
                                pool.write_entry(&id, &blob_buf, &mut touched)?;
                                match linker.link(&id) {
                                    Ok(()) => {
                                        fresh.push(id);
                                        fresh_bytes += blob_buf.len() as u64;
                                    }
                                    Err(_) => unlinked.push(id),
                                }
                            }
                            _ => unlinked.push(id),
                        }
                    }
                    // Swept between its check and this link: read again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => unlinked.push(id),
                    Err(e) => return Err(e).ctx(|| pool::link_failed(&id, archive_root)),
                }
            }
            dirs.extend(touched);
            dirs.extend(linker.touched());
            Ok(Done::Carried { touched: dirs.into_iter().collect(), unlinked, fresh, fresh_bytes })
        }
    }
}
