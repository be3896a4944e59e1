//! One run of a job: the pipeline from lock to unlock.
//!
//! Owns: the order of a run (lock, connection check, pre-job scripts, transfer into
//! `scheduled.running`, report and setup copy, promotion and rotation, post-job scripts, the
//! disk-space warning, unlock), and finishing what a crashed run left (its rotation journal, a
//! reported but unrotated `scheduled.running`) before anything else. Must never: rename, delete or alter an existing archive when the
//! run fails (promotion therefore happens after a successful transfer, which gives the same
//! archive set as Affa's order, promotion first), or name an incomplete transfer `scheduled.0`.

pub mod cbt;
pub mod chunked;
pub mod ctx;
pub mod host;
pub mod scripts;
pub mod sme;
pub mod vm;

pub use ctx::{Ctx, RunOptions, RunSummary};
use host::transfer_files;
use scripts::run_scripts;

use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::archive::{self, DoneDates, Level, RUNNING};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Result;
use crate::joblog::JobLog;
use crate::lock;
use crate::observer::Phase;
use crate::report::Report;
use crate::transport::rsync;

/// Run a job at a level. `scheduled` transfers a new archive; the other levels only promote.
pub fn run(cfg: &Config, job_name: &str, clock: &dyn Clock, opts: RunOptions) -> Result<RunSummary> {
    let job = cfg.job(job_name)?;
    crate::interrupt::install();
    let log = JobLog::new(&cfg.log_dir(), job_name, opts.watch);
    let ctx = Ctx {
        cfg,
        job,
        clock,
        log,
        started: Instant::now(),
        job_dir: job.job_dir(),
        extra_sources: Default::default(),
        ssh_control: Default::default(),
        root_fd: Default::default(),
    };
    ctx.log.info(format!("Starting job {} {} ({})", job_name, opts.level.name(), job.host));
    let res = run_locked(&ctx, opts.level);
    match &res {
        Ok(_) => ctx.log.info(format!("Completed job {} {}", job_name, opts.level.name())),
        Err(e) => ctx.log.error(format!("job {job_name} failed: {e}")),
    }
    res
}

fn run_locked(ctx: &Ctx, level: Level) -> Result<RunSummary> {
    let held = lock::acquire(&ctx.cfg.lock_dir(), &ctx.job.name)?;
    if !held.stopped_leftovers.is_empty() {
        let pids: Vec<String> = held.stopped_leftovers.iter().map(|p| p.to_string()).collect();
        ctx.log.warn(format!(
            "stopped processes left by an earlier, killed run of job {} (pids {}) before touching its archives",
            ctx.job.name,
            pids.join(", ")
        ));
    }
    // AutomountDevice: the backup disk, mounted for the run (and unmounted when this is dropped).
    let _mounted = crate::automount::mount(ctx.job, &ctx.cfg.lock_dir(), Some(&ctx.log))?;
    let root = ctx.job.root_dir();
    if !root.is_dir() {
        bail!(
            "RootDir {} of job {} does not exist (is the backup disk mounted?); create it or fix RootDir",
            root.display(),
            ctx.job.name
        );
    }
    if let Ok(f) = fs::File::open(&root) {
        let _ = ctx.root_fd.set(f);
    }
    // sharedRootDir=yes: no other server runs this job (taken after the local lock, so a run
    // refused here has touched nothing).
    let _shared = crate::shared_lock::acquire_for(ctx.job)?;
    crate::fsutil::create_private_dir(&ctx.job_dir)?;
    finish_interrupted_rotation(ctx)?;
    if level != Level::Scheduled {
        let mut summary = RunSummary::default();
        promote(ctx, level, &mut summary)?;
        // The archive a promotion pushed out: deleted, and the pool entries only it linked.
        crate::backup::chunked::delete_trash_and_sweep(ctx)?;
        return Ok(summary);
    }
    // rsyncdMode=yes: the source is an rsync daemon (its password file lives for this run).
    let daemon = match ctx.job.rsyncd {
        Some(_) => Some(crate::transport::rsyncd::Daemon::for_job(ctx.job, &ctx.job_dir)?),
        None => None,
    };
    if let Some(d) = &daemon {
        ctx.log.info(format!("Checking the rsync daemon connection to {}", d.url));
        d.check(ctx.job)?;
    }
    // Every ssh session of the run (the check, remote commands, rsync, the agent) shares one
    // connection: one key exchange and login per run (stopped at the end of the run, on every
    // path: the guard's drop).
    let mut ssh_conn = SharedSsh { ctx, master: None };
    if let (None, Some(t)) = (&daemon, ctx.source()) {
        ctx.log.phase(Phase::Connecting(t.destination()));
        ssh_conn.start(&t);
        ctx.source().unwrap_or(t).check_connection()?;
    }
    run_scripts(ctx, "preJobCommand", &ctx.job.scripts.pre, &ctx.job.scripts.pre_remote)?;
    crate::backup::sme::before_transfer(ctx)?;
    let mut summary = RunSummary::default();
    let running = ctx.job_dir.join(RUNNING);
    let mut report = Report::default();
    if ctx.job.esxi() {
        crate::backup::vm::transfer(ctx, &running, &mut report, &mut summary)?;
    } else {
        transfer_files(ctx, &running, &mut report, &mut summary, daemon.as_ref())?;
    }
    finish_report(ctx, &running, &mut report)?;
    crate::interrupt::crash_point("report-written");

    // The transfer is complete and has its report: now, and only now, archives move.
    ctx.log.phase(Phase::Rotating);
    rotate(ctx, ctx.clock.now(), &mut summary)?;
    summary.archive = Some(ctx.job_dir.join("scheduled.0"));
    crate::interrupt::crash_point("rotated");
    crate::backup::chunked::delete_and_sweep(ctx)?;
    crate::interrupt::crash_point("swept");

    run_scripts(ctx, "postJobCommand", &ctx.job.scripts.post, &ctx.job.scripts.post_remote)?;
    crate::backup::sme::after_run(ctx, &mut summary)?;
    drop(ssh_conn);
    disk_space_warning(ctx, &report, &mut summary);
    if summary.failure.is_none() {
        offsite_after_run(ctx, &mut summary);
    }
    summary.report = report;
    if let Some(f) = summary.failure.take() {
        // The archive is made and rotated in; the run fails all the same (mail, NRPE).
        bail!(Remote, "{f}");
    }
    Ok(summary)
}

/// The run's ssh ControlMaster (`crate::transport::mux`), published in `ctx.ssh_control`
/// while it lives; dropping this stops it.
struct SharedSsh<'a> {
    ctx: &'a Ctx<'a>,
    master: Option<crate::transport::mux::Master>,
}

impl SharedSsh<'_> {
    /// Start the master; without one (logged), every session connects on its own.
    fn start(&mut self, t: &crate::transport::SshTarget) {
        match crate::transport::mux::Master::start(t, &self.ctx.cfg.lock_dir()) {
            Ok(m) => {
                self.ctx.log.info(format!(
                    "ssh: one connection to {} for the run's sessions (connected in {} ms)",
                    t.destination(),
                    m.started_in.as_millis()
                ));
                *self.ctx.ssh_control.borrow_mut() = Some(m.socket().to_path_buf());
                self.master = Some(m);
            }
            // Not a warning: when the host is unreachable the connection check that follows
            // fails with the cause (one error, not a warning and then the same error); when
            // only the master cannot start, the run works as before and the log says why.
            Err(why) => self.ctx.log.info(format!(
                "ssh: no shared connection to {} ({why}); each ssh session of the run connects on its own",
                t.destination()
            )),
        }
    }
}

impl Drop for SharedSsh<'_> {
    fn drop(&mut self) {
        *self.ctx.ssh_control.borrow_mut() = None;
        if let Some(why) = self.master.take().and_then(|m| m.stop()) {
            self.ctx.log.warn(format!(
                "ssh: the shared connection ended during the run ({why}); the sessions after it connected on their own"
            ));
        }
    }
}

fn stamp(ctx: &Ctx) -> String {
    ctx.clock.now().format("%Y%m%d%H%M%S").to_string()
}

fn log_moves(ctx: &Ctx, moved: &[String]) {
    for m in moved {
        ctx.log.info(format!("rotate: {m}"));
    }
}

/// The rotation after a transfer made at `now`: the promotions due, then `scheduled`.
fn rotate(ctx: &Ctx, now: chrono::NaiveDateTime, summary: &mut RunSummary) -> Result<()> {
    let dd = DoneDates::read(&ctx.job_dir);
    let s0_valid = Report::read(&ctx.job_dir.join("scheduled.0")).is_some();
    for l in [Level::Yearly, Level::Monthly, Level::Weekly, Level::Daily] {
        if s0_valid && dd.get(l) != l.period(now) && ctx.job.keep(l) > 0 {
            promote_at(ctx, l, now, summary)?;
        }
    }
    let moved = archive::shift(&ctx.job_dir, Level::Scheduled, ctx.keeps(), &stamp(ctx))?;
    // The transfer became scheduled.0, or the run did not make an archive: never "Completed"
    // with the old scheduled.0.
    if fs::symlink_metadata(ctx.job_dir.join(RUNNING)).is_ok() {
        bail!(
            "the new transfer in {} was not rotated in (its report is not the one affa recorded as complete); the next run resumes it",
            ctx.job_dir.join(RUNNING).display()
        );
    }
    archive::clear_running_complete(&ctx.job_dir)?;
    log_moves(ctx, &moved);
    summary.rotated.extend(moved);
    Ok(())
}

fn promote(ctx: &Ctx, level: Level, summary: &mut RunSummary) -> Result<()> {
    promote_at(ctx, level, ctx.clock.now(), summary)
}

/// Rotate one promotion level and record the period in `.doneDates`, both in one journaled
/// step (archive::JOURNAL): a crash in between neither skips the promotion nor repeats it.
fn promote_at(ctx: &Ctx, level: Level, now: chrono::NaiveDateTime, summary: &mut RunSummary) -> Result<()> {
    crate::interrupt::crash_point("promote");
    let mut dd = DoneDates::read(&ctx.job_dir);
    dd.values[level as usize] = level.period(now);
    let done = if level != Level::Scheduled { Some(&dd) } else { None };
    let moved = archive::shift_recording(&ctx.job_dir, level, ctx.keeps(), &stamp(ctx), done)?;
    log_moves(ctx, &moved);
    summary.rotated.extend(moved);
    Ok(())
}

/// First the rotation journal of a crashed run is replayed. Then: a `scheduled.running` whose
/// report affa recorded as complete (archive::RUNNING_COMPLETE, outside the transferred tree) is
/// a complete transfer whose rotation a crash cut short (the report is written last, after
/// everything else): give it its name now, before anything else happens, instead of treating it
/// as an interrupted transfer. A report without that record is never believed.
fn finish_interrupted_rotation(ctx: &Ctx) -> Result<()> {
    let replayed = archive::recover(&ctx.job_dir)?;
    if !replayed.is_empty() {
        ctx.log.warn("finishing a rotation that was interrupted (rotation journal)");
        log_moves(ctx, &replayed);
    }
    let Some(r) = archive::running_report(&ctx.job_dir) else {
        if fs::symlink_metadata(ctx.job_dir.join(RUNNING).join(crate::report::REPORT_FILE)).is_ok() {
            ctx.log.warn("scheduled.running holds a report that affa did not record as complete (an interrupted transfer, or a file the source planted): it is not trusted, the transfer is resumed");
        }
        return Ok(());
    };
    ctx.log.warn("scheduled.running holds a complete transfer whose rotation was interrupted: rotating it in now");
    // Rotate as the crashed run would have: with the promotions due at its own time.
    let when = r
        .date()
        .and_then(|d| chrono::NaiveDateTime::parse_from_str(d, "%Y%m%d%H%M").ok())
        .unwrap_or_else(|| ctx.clock.now());
    let mut summary = RunSummary::default();
    rotate(ctx, when, &mut summary)?;
    // What the archives it pushed out linked is swept too (FORMAT.md: the pending marker, then
    // the deletion), not left in the pool with no archive to name it.
    chunked::delete_trash_and_sweep(ctx)?;
    Ok(())
}

/// Write `.JOB-setup.ini` and the report (last: it is what makes the archive valid).
pub fn finish_report(ctx: &Ctx, running: &Path, report: &mut Report) -> Result<()> {
    let now = ctx.clock.now();
    // Affa 3's keys in Affa 3's order (Date, ExecutionTime, rsync's statistics, the RootDir
    // figures, ExitStatus, Dedup), then affa's own.
    let affa_own = |k: &str| ["Chunk", "ESXi", "DedupRatio", "Warning"].iter().any(|p| k.starts_with(p));
    let mut r = Report::default();
    r.set("Date", now.format("%Y%m%d%H%M").to_string());
    r.set("ExecutionTime", ctx.started.elapsed().as_secs());
    // The run's own values are affa's alone: never taken from what the transfer collected.
    let run_own = |k: &str| ["Date", "ExecutionTime", "ExitStatus", "AffaVersion", "Dedup"].contains(&k);
    for (k, v) in report.values.iter().filter(|(k, _)| !run_own(k) && !affa_own(k)) {
        r.set(k, v);
    }
    if let Some((used, avail)) = rsync::df(&ctx.job.root_dir()) {
        r.set("RootDirFilesystemUsed", used);
        r.set("RootDirFilesystemAvail", avail);
        r.set("RootDirFilesystemUsage", format!("{:.1}", used as f64 * 100.0 / (used + avail).max(1) as f64));
    }
    r.set("ExitStatus", report.get("ExitStatus").unwrap_or("0"));
    r.set("Dedup", "no");
    for (k, v) in report.values.iter().filter(|(k, _)| affa_own(k)) {
        r.set(k, v);
    }
    r.set("AffaVersion", env!("CARGO_PKG_VERSION"));
    let mut setup = format!("; Created on {}\n{}", now.format("%a %b %e %H:%M:%S %Y"), ctx.job.to_ini());
    for s in ctx.extra_sources.borrow().iter() {
        setup.push_str(&format!("Include={s}\n"));
    }
    // Everything the transfer wrote on disk before the report makes the archive valid: rsync
    // never fsyncs, and after a power cut a valid-looking archive of empty files (delayed
    // allocation), while rotation has deleted the oldest good one, would be worse than none.
    match ctx.root_fd.get() {
        Some(f) => crate::fsutil::sync_filesystem_of(f, &ctx.job.root_dir())?,
        None => crate::fsutil::sync_filesystem(running)?,
    }
    crate::fsutil::write_atomic(
        &running.join(format!(".{}-setup.ini", ctx.job.name)),
        setup.as_bytes(),
        crate::fsutil::Perm::Mode(0o600),
    )?;
    crate::interrupt::crash_point("setup-written");
    crate::chunk::index::ensure(running)?;
    r.write(running)?;
    archive::mark_running_complete(&ctx.job_dir)?;
    *report = r;
    Ok(())
}

/// offsiteAfterRun=yes: the new archive goes offsite while the run still holds the job's lock.
/// A failed upload is a warning of the run (its mail says so); the archive is complete and
/// rotated in before, and an upload only reads it.
fn offsite_after_run(ctx: &Ctx, summary: &mut RunSummary) {
    if !ctx.job.offsite.as_ref().is_some_and(|o| o.after_run) {
        return;
    }
    ctx.log.info(format!("offsiteAfterRun: copying scheduled.0 of job {} offsite", ctx.job.name));
    match crate::offsite::upload_after_run(ctx.job, ctx.clock, &ctx.log.watch) {
        Ok(up) => {
            for l in up.text.lines() {
                ctx.log.info(format!("offsite: {l}"));
            }
            summary.offsite = Some(up.text);
        }
        Err(e) => {
            let w = format!(
                "the archive is complete, but its offsite copy (offsiteAfterRun=yes) failed: {e}; affa --offsite {} retries it",
                ctx.job.name
            );
            ctx.log.warn(&w);
            summary.warnings.push(w);
        }
    }
}

/// Affa's DiskSpaceWarn: warn when the free space is below the last backup's size times
/// 1 (strict), 0.5 (normal) or 0.1 (risky).
fn disk_space_warning(ctx: &Ctx, report: &Report, summary: &mut RunSummary) {
    let size = report.num("TotalFileSize").unwrap_or(0);
    if let Some(avail_kib) = crate::monitor::disk_space_warning(ctx.job, size) {
        let w = format!(
            "disk space is low on {}: {} MiB free, the last backup of {} was {} MiB (DiskSpaceWarn={})",
            ctx.job.root_dir().display(),
            avail_kib / 1024,
            ctx.job.name,
            size / 1048576,
            ctx.job.disk_space_warn.name()
        );
        ctx.log.warn(&w);
        summary.warnings.push(w);
    }
}
