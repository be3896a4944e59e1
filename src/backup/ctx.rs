//! What every step of a run shares: the run's context, its options and its summary, how an
//! rsync result is judged, and the one clean-up when RootDir's disk is full.
//!
//! Owns: [`Ctx`], [`RunOptions`], [`RunSummary`], [`check_rsync`], [`disk_full`] and the
//! staging directory's name. Must never: depend on a step of the run (host, VM, chunked,
//! scripts, SME): they depend on it.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use crate::archive::{self, Keeps, Level, RESUME, RUNNING};
use crate::chunk;
use crate::clock::Clock;
use crate::config::{Config, Job};
use crate::error::{Error, ErrorKind, Result};
use crate::joblog::JobLog;
use crate::observer::Watch;
use crate::report::Report;
use crate::transport::rsync::{self, Outcome};
use crate::transport::SshTarget;

pub const STAGING: &str = ".staging";

/// How the run was started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub level: Level,
    /// Who watches the run (messages, phases, progress); `Watch::nobody()` under cron.
    pub watch: Watch,
}

/// What a successful run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub archive: Option<PathBuf>,
    pub rotated: Vec<String>,
    pub warnings: Vec<String>,
    /// A failure found after the archive was complete (a CBT verify pass that found CBT wrong):
    /// the archive is kept and rotated in, then the run fails with this.
    pub failure: Option<String>,
    /// The new archive's report (empty for a promotion-only run).
    pub report: Report,
    /// offsiteAfterRun=yes: what the upload of the new archive did.
    pub offsite: Option<String>,
}

impl RunSummary {
    /// The facts of a finished run for its closing summary: (label, value) lines.
    pub fn lines(&self) -> Vec<(&'static str, String)> {
        use crate::fmt::{hms, human};
        let s = self;
        let r = &s.report;
        let mut v = Vec::new();
        if let Some(a) = &s.archive {
            v.push(("archive", a.display().to_string()));
        }
        if let Some(t) = r.num("ExecutionTime") {
            v.push(("duration", hms(t)));
        }
        if let (Some(sent), Some(recvd)) = (r.num("TotalBytesSent"), r.num("TotalBytesReceived")) {
            v.push(("transferred", format!("{} received, {} sent", human(recvd), human(sent))));
        }
        if let Some(agent) = r.num("ChunkBytesReceived") {
            let read =
                r.num("ChunkSourceBytesRead").map(|b| format!(", {} read on the host", human(b))).unwrap_or_default();
            v.push(("affa-agent", format!("{} received{read}", human(agent))));
        }
        if let Some(n) = r.num("NumberOfFiles") {
            let size = r.num("TotalFileSize").map(|b| format!(", {}", human(b))).unwrap_or_default();
            v.push(("files", format!("{n}{size}")));
        }
        if let Some(added) = r.num("ChunkPoolBytesAdded") {
            let logical = r.num("ChunkLogicalSize").unwrap_or(0);
            let ratio = r.get("DedupRatio").unwrap_or("-");
            v.push((
                "pool growth",
                format!("{} for {} of chunked files (dedup ratio {ratio})", human(added), human(logical)),
            ));
        }
        if !s.rotated.is_empty() {
            v.push(("rotated", s.rotated.join("; ")));
        }
        if let Some(o) = &s.offsite {
            v.push(("offsite", o.trim_end().replace('\n', "; ")));
        }
        for w in &s.warnings {
            v.push(("warning", w.clone()));
        }
        v
    }
}

/// Everything a step of the run needs.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub job: &'a Job,
    pub clock: &'a dyn Clock,
    pub log: JobLog,
    pub started: Instant,
    pub job_dir: PathBuf,
    /// The source paths of this run's transfer, when they are not the job's own (SMEServer=yes
    /// adds SME's backup set): written into the archive's setup copy, which restore reads.
    pub extra_sources: std::cell::RefCell<Vec<String>>,
    /// The socket of the run's ssh ControlMaster while it runs (`crate::transport::mux`):
    /// [`source`](Self::source) hands it to every ssh session of the run.
    pub ssh_control: std::cell::RefCell<Option<PathBuf>>,
    /// RootDir, opened when the run starts: its `syncfs` before the report then reports a
    /// write-back error of anything the transfer wrote (the kernel reports an error to a
    /// descriptor opened before it happened, not to one opened after).
    pub root_fd: std::cell::OnceCell<std::fs::File>,
}

impl Ctx<'_> {
    pub fn source(&self) -> Option<SshTarget> {
        if self.job.local {
            None
        } else {
            Some(SshTarget::from_job(self.job, self.cfg).with_control(self.ssh_control.borrow().clone()))
        }
    }
    pub fn keeps(&self) -> Keeps {
        Keeps(Level::ALL.map(|l| self.job.keep(l)))
    }
}

/// Interpret an rsync result: success, success with a warning, or the run's error.
pub fn check_rsync(ctx: &Ctx, res: &rsync::RsyncResult, what: &str, summary: &mut RunSummary) -> Result<()> {
    if crate::interrupt::interrupted() {
        bail!(
            Interrupted,
            "{what} interrupted by {}; scheduled.running is kept and the next run resumes it",
            crate::interrupt::signal_name()
        );
    }
    match rsync::classify(res.code) {
        Outcome::Success => Ok(()),
        Outcome::Warning(w) => {
            ctx.log.warn(&w);
            summary.warnings.push(w);
            Ok(())
        }
        // rsync's own stderr, printed by the rsync that writes into RootDir (the text of a child's
        // output, not one of our errors: it has no kind to check). Its exit code alone does not
        // tell a full disk from other write failures. Only a line of the receiving side counts:
        // the sender (the host) may print anything, and this deletes the resumable transfer.
        Outcome::Failure(f) if res.errors.iter().any(|e| disk_full_line(e)) => {
            Err(disk_full(ctx, &format!("{what}: {f}")))
        }
        Outcome::Failure(f) => {
            let detail = res.first_error().map(|e| format!(" ({e})")).unwrap_or_default();
            Err(Error::remote(format!(
                "{what}: {f}{detail}; earlier archives are untouched, scheduled.running is kept for the next run"
            )))
        }
    }
}

/// A line of rsync's stderr saying that the local, receiving side found RootDir's disk full
/// (`rsync: [receiver] write failed on "...": No space left on device (28)`), not a message
/// the sending host printed (`[sender]`).
fn disk_full_line(e: &str) -> bool {
    e.contains("No space left on device") && (e.contains("[receiver]") || e.contains("[generator]"))
}

/// RootDir's disk is full (`what` says where it showed): the incomplete transfer is deleted and
/// the space this run's chunked files took is given back (see [`give_space_back`]); earlier
/// archives are untouched. Returns the run's error.
pub fn disk_full(ctx: &Ctx, what: &str) -> Error {
    // What filled the disk is of no use to a resumed run: give the space back.
    let _ = archive::remove_tree(&ctx.job_dir.join(RUNNING));
    let _ = archive::remove_tree(&ctx.job_dir.join(RESUME));
    give_space_back(ctx);
    Error::of(ErrorKind::DiskFull, format!(
        "{what}: the disk of RootDir {} is full; the incomplete transfer was deleted to give the space back, earlier archives are untouched",
        ctx.job.root_dir().display()
    ))
}

/// RootDir is full: give back what this run's chunked files took. Staging copies of files the
/// newest archive does not hold (new files, only partly transferred) are deleted, the others
/// stay as the delta basis; pool chunks that no archive links are swept. Best effort.
pub fn give_space_back(ctx: &Ctx) {
    let staging = ctx.job_dir.join(STAGING);
    if staging.is_dir() {
        let newest = archive::newest_valid(&ctx.job_dir).ok().flatten().map(|a| a.path);
        for f in crate::fsutil::walk_files(&staging).unwrap_or_default() {
            let rel = f.strip_prefix(&staging).unwrap_or(&f);
            let kept = newest.as_ref().is_some_and(|a| chunk::recorded_manifest(a, rel).is_some());
            if !kept {
                ctx.log.info(format!("disk full: deleting the partial staging copy of {}", rel.display()));
                let _ = fs::remove_file(&f);
            }
        }
    }
    if ctx.job.root_dir().join(chunk::POOL_DIR).is_dir() {
        if let Ok(s) = crate::maintenance::sweep_pool(&ctx.job.root_dir()) {
            ctx.log.info(s);
        }
    }
}
