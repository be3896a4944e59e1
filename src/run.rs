//! One run of a job: the pipeline from lock to unlock.
//!
//! Owns: the order of a run (lock, connection check, pre-job scripts, transfer into
//! `scheduled.running`, report and setup copy, promotion and rotation, post-job scripts, the
//! disk-space warning, unlock), and finishing what a crashed run left (its rotation journal, a
//! reported but unrotated `scheduled.running`) before anything else. Must never: rename, delete or alter an existing archive when the
//! run fails (promotion therefore happens after a successful transfer, which gives the same
//! archive set as Affa's order, promotion first), or name an incomplete transfer `scheduled.0`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::archive::{self, DoneDates, Keeps, Level, RESUME, RUNNING};
use crate::clock::Clock;
use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};
use crate::joblog::JobLog;
use crate::lock;
use crate::observer::{Phase, Watch};
use crate::report::Report;
use crate::transport::rsync::{self, Outcome, Source};
use crate::transport::{die_with_parent, shell_quote, SshTarget};

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
    /// The new archive's report (empty for a promotion-only run).
    pub report: Report,
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
}

impl Ctx<'_> {
    pub fn source(&self) -> Option<SshTarget> {
        if self.job.get("remoteHostName") == "localhost" {
            None
        } else {
            Some(SshTarget::from_job(self.job, self.cfg))
        }
    }
    pub fn keeps(&self) -> Keeps {
        Keeps(Level::ALL.map(|l| self.job.keep(l)))
    }
}

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
    };
    ctx.log.info(format!("Starting job {} {} ({})", job_name, opts.level.name(), job.get("remoteHostName")));
    let res = run_locked(&ctx, opts.level);
    match &res {
        Ok(_) => ctx.log.info(format!("Completed job {} {}", job_name, opts.level.name())),
        Err(e) => ctx.log.error(format!("job {job_name} failed: {e}")),
    }
    res
}

fn run_locked(ctx: &Ctx, level: Level) -> Result<RunSummary> {
    let _lock = lock::acquire(&ctx.cfg.lock_dir(), &ctx.job.name)?;
    // AutomountDevice: the backup disk, mounted for the run (and unmounted when this is dropped).
    let _mounted = crate::automount::mount(ctx.job, Some(&ctx.log))?;
    let root = ctx.job.root_dir();
    if !root.is_dir() {
        bail!(
            "RootDir {} of job {} does not exist (is the backup disk mounted?); create it or fix RootDir",
            root.display(),
            ctx.job.name
        );
    }
    create_private_dir(&ctx.job_dir)?;
    finish_interrupted_rotation(ctx)?;
    if level != Level::Scheduled {
        let mut summary = RunSummary::default();
        promote(ctx, level, &mut summary)?;
        archive::empty_trash(&ctx.job_dir)?;
        return Ok(summary);
    }
    // rsyncdMode=yes: the source is an rsync daemon (its password file lives for this run).
    let daemon = match ctx.job.flag("rsyncdMode") {
        true => Some(crate::transport::rsyncd::Daemon::for_job(ctx.job, &ctx.job_dir)?),
        false => None,
    };
    if let Some(d) = &daemon {
        ctx.log.info(format!("Checking the rsync daemon connection to {}", d.url));
        d.check(ctx.job)?;
    } else if let Some(t) = ctx.source() {
        ctx.log.phase(Phase::Connecting(t.destination()));
        t.check_connection()?;
    }
    run_scripts(ctx, "preJobCommand", "preJobCommandRemote")?;
    crate::sme::before_transfer(ctx)?;
    let mut summary = RunSummary::default();
    let running = ctx.job_dir.join(RUNNING);
    let mut report = Report::default();
    if ctx.job.esxi() {
        crate::esxi::backup::transfer(ctx, &running, &mut report, &mut summary)?;
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
    archive::empty_trash(&ctx.job_dir)?;
    archive::remove_tree(&ctx.job_dir.join(RESUME))?;
    crate::interrupt::crash_point("before-sweep");
    crate::staging::sweep_after_rotation(ctx)?;
    crate::interrupt::crash_point("swept");

    run_scripts(ctx, "postJobCommand", "postJobCommandRemote")?;
    crate::sme::after_run(ctx, &mut summary)?;
    disk_space_warning(ctx, &report, &mut summary);
    summary.report = report;
    Ok(summary)
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
    archive::empty_trash(&ctx.job_dir)?;
    Ok(())
}

pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Prepare `scheduled.running` for a transfer and return the `--link-dest` dirs.
///
/// An interrupted transfer is never written into again: it may hold hard links to files of
/// earlier archives, and rsync updating such a file in place (or just its times and modes)
/// would alter that archive. It is renamed to `.scheduled.resume` and used as the first
/// `--link-dest` basis instead, so what it already holds is not transferred again.
pub fn prepare_running(ctx: &Ctx, running: &Path) -> Result<Vec<PathBuf>> {
    let resume = ctx.job_dir.join(RESUME);
    archive::clear_running_complete(&ctx.job_dir)?;
    if running.exists() {
        ctx.log.info("resuming the interrupted transfer in scheduled.running");
        archive::remove_tree(&resume)?;
        fs::rename(running, &resume).ctx(|| format!("cannot rename {} to {}", running.display(), resume.display()))?;
        let _ = fs::remove_file(resume.join(crate::report::REPORT_FILE));
    }
    create_private_dir(running)?;
    let mut link = Vec::new();
    if resume.is_dir() {
        link.push(resume);
    }
    if let Some(a) = archive::newest_valid(&ctx.job_dir)? {
        ctx.log.info(format!("link destination: {}", a.name()));
        link.push(a.path);
    }
    Ok(link)
}

/// Interpret an rsync result: success, success with a warning, or the run's error.
pub fn check_rsync(ctx: &Ctx, res: &rsync::RsyncResult, what: &str, summary: &mut RunSummary) -> Result<()> {
    if crate::interrupt::interrupted() {
        bail!(
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
        Outcome::Failure(f) if res.errors.iter().any(|e| e.contains("No space left on device")) => {
            // What filled the disk is of no use to a resumed run: give the space back.
            let running = ctx.job_dir.join(RUNNING);
            let _ = archive::remove_tree(&running);
            let _ = archive::remove_tree(&ctx.job_dir.join(RESUME));
            crate::staging::give_space_back(ctx);
            Err(Error::new(format!(
                "{what}: {f}: the disk of RootDir {} is full; the incomplete transfer was deleted to give the space back, earlier archives are untouched",
                ctx.job.root_dir().display()
            )))
        }
        Outcome::Failure(f) => {
            let detail = res.first_error().map(|e| format!(" ({e})")).unwrap_or_default();
            Err(Error::new(format!(
                "{what}: {f}{detail}; earlier archives are untouched, scheduled.running is kept for the next run"
            )))
        }
    }
}

/// The ordinary transfer: rsync the job's sources into `scheduled.running`.
fn transfer_files(
    ctx: &Ctx,
    running: &Path,
    report: &mut Report,
    summary: &mut RunSummary,
    daemon: Option<&crate::transport::rsyncd::Daemon>,
) -> Result<()> {
    let job = ctx.job;
    let link = prepare_running(ctx, running)?;
    let target = ctx.source();
    let source = match (&target, daemon) {
        (_, Some(d)) => Source::Daemon(d),
        (Some(t), None) => Source::Ssh(t),
        (None, None) => Source::Local,
    };
    let mut args = rsync::Args::new(job, &source);
    args.opts(["--stats", "--delete-during", "--delete-excluded", "--relative", "--partial"]);
    if job.flag("rsync--inplace") {
        args.opt("--inplace");
    }
    for l in &link {
        args.opt(format!("--link-dest={}", l.display()));
    }
    for p in job.include_patterns() {
        args.opt(format!("--include={p}"));
    }
    for p in job.get_all("Exclude") {
        args.opt(format!("--exclude={p}"));
    }
    let chunk_patterns = crate::staging::rsync_excludes(job);
    for p in &chunk_patterns {
        args.opt(format!("--exclude={p}"));
    }
    // affa's own files at the archive root: a source's files of those names never land there.
    args.opts(archive::reserved_excludes(&job.name));
    args.configured(job.get("rsyncOptions"));
    let sources = crate::sme::sources(ctx)?;
    if sources != job.sources() {
        *ctx.extra_sources.borrow_mut() = sources.iter().filter(|s| !job.sources().contains(s)).cloned().collect();
    }
    args.from(&source, &sources).to(format!("{}/", running.display()));
    let steps = if chunk_patterns.is_empty() { 1 } else { 2 };
    ctx.log.phase(Phase::Copying { what: format!("the files of {}", job.get("remoteHostName")), n: 1, of: steps });
    let res = rsync::run(job, &args, &ctx.log, &ctx.log.watch)?;
    check_rsync(ctx, &res, "the transfer", summary)?;
    report.add_rsync_stats(&res.stdout);
    report.set("ExitStatus", res.code);
    if !chunk_patterns.is_empty() {
        crate::staging::transfer_chunked(ctx, &source, running, report, summary)?;
    }
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
    for (k, v) in report.values.iter().filter(|(k, _)| k != "ExitStatus" && !affa_own(k)) {
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

/// Pre/post-job scripts, all of them in alphabetical order of name, local ones called as
/// `SCRIPT HOST JOB 'SSHCMD'`, remote ones copied into a private directory that `mktemp -d`
/// makes on the source and run there; each ends within scriptTimeout seconds or is stopped.
fn run_scripts(ctx: &Ctx, local_key: &str, remote_key: &str) -> Result<()> {
    let mut all: Vec<(String, bool)> = ctx.job.get_all(local_key).iter().map(|s| (s.clone(), false)).collect();
    all.extend(ctx.job.get_all(remote_key).iter().map(|s| (s.clone(), true)));
    all.sort();
    for (name, remote) in all {
        if name.contains("..") || name.starts_with('/') {
            bail!(
                "{local_key} '{name}' of job {}: expected a script name inside {}",
                ctx.job.name,
                ctx.cfg.script_dir().display()
            );
        }
        let script = ctx.cfg.script_dir().join(&name);
        if !script.is_file() {
            bail!("script {} of job {} does not exist or is not a file", script.display(), ctx.job.name);
        }
        let target = ctx.source();
        let host = ctx.job.get("remoteHostName");
        match (remote, target) {
            (true, Some(t)) => {
                let body = fs::read(&script).ctx(|| format!("cannot read {}", script.display()))?;
                remote_script(ctx, &t, &name, &body)?;
            }
            (_, target) => {
                ctx.log.info(format!("Executing script {name}"));
                let sshcmd =
                    target.as_ref().map(|t| format!("{} {}", t.ssh_bin, t.options().join(" "))).unwrap_or_default();
                let mut c = Command::new(&script);
                c.arg(host).arg(&ctx.job.name).arg(sshcmd);
                run_logged(ctx, c, &[], &format!("cannot run script {}", script.display()), |code| {
                    format!("script {name} of job {} failed with exit {code}", ctx.job.name)
                })?;
            }
        }
    }
    Ok(())
}

/// Run a command with `input` on its stdin and its output in the log, within `scriptTimeout`
/// (the whole process group is killed past it); returns its stdout. A non-zero exit is the
/// error `failed(exit code)`.
pub(crate) fn run_logged(
    ctx: &Ctx,
    mut c: Command,
    input: &[u8],
    cannot: &str,
    failed: impl Fn(i32) -> String,
) -> Result<Vec<u8>> {
    let limit = std::time::Duration::from_secs(ctx.job.num("scriptTimeout"));
    die_with_parent(&mut c);
    let what = cannot.strip_prefix("cannot run ").unwrap_or(cannot);
    let out = crate::transport::output_within(c, Some(input.to_vec()), limit, what, "scriptTimeout")?;
    log_output(ctx, &out.stdout, &out.stderr);
    if !out.status.success() {
        bail!("{}", failed(out.status.code().unwrap_or(-1)));
    }
    Ok(out.stdout)
}

/// Affa's way to run a script on the source host, run as `SCRIPT HOST JOB` within
/// `scriptTimeout`. It goes into a private directory made atomically on the host (mktemp -d,
/// mode 0700): no predictable name in /tmp that a user of the host could plant a symlink at.
/// Returns its stdout.
pub(crate) fn remote_script(ctx: &Ctx, t: &SshTarget, name: &str, body: &[u8]) -> Result<Vec<u8>> {
    let host = ctx.job.get("remoteHostName");
    ctx.log.info(format!("Executing script {name} on {host}"));
    let limit = std::time::Duration::from_secs(ctx.job.num("scriptTimeout"));
    let remote_cmd = format!(
        "umask 077; d=$(mktemp -d /tmp/affa-XXXXXXXXXX) || exit 125; cat > \"$d/script\" && chmod 700 \"$d/script\" && \"$d/script\" {h} {j}; rc=$?; rm -rf \"$d\"; exit $rc",
        h = shell_quote(host),
        j = shell_quote(&ctx.job.name)
    );
    let out =
        t.run_within(&remote_cmd, Some(body.to_vec()), limit, "scriptTimeout", &format!("remote script {name}"))?;
    log_output(ctx, &out.stdout, &out.stderr);
    if !out.status.success() {
        bail!("remote script {name} failed on {host} with exit {}", out.status.code().unwrap_or(-1));
    }
    Ok(out.stdout)
}

fn log_output(ctx: &Ctx, stdout: &[u8], stderr: &[u8]) {
    for l in String::from_utf8_lossy(stdout).lines().chain(String::from_utf8_lossy(stderr).lines()) {
        ctx.log.info(format!("  {l}"));
    }
}

/// Affa's DiskSpaceWarn: warn when the free space is below the last backup's size times
/// 1 (strict), 0.5 (normal) or 0.1 (risky).
fn disk_space_warning(ctx: &Ctx, report: &Report, summary: &mut RunSummary) {
    let factor = match ctx.job.get("DiskSpaceWarn") {
        "strict" => 1.0,
        "normal" => 0.5,
        "risky" => 0.1,
        _ => return,
    };
    let size = report.num("TotalFileSize").unwrap_or(0) as f64;
    if let Some((_, avail_kib)) = rsync::df(&ctx.job.root_dir()) {
        if (avail_kib as f64) * 1024.0 < size * factor {
            let w = format!(
                "disk space is low on {}: {} MiB free, the last backup of {} was {} MiB (DiskSpaceWarn={})",
                ctx.job.root_dir().display(),
                avail_kib / 1024,
                ctx.job.name,
                (size / 1048576.0) as u64,
                ctx.job.get("DiskSpaceWarn")
            );
            ctx.log.warn(&w);
            summary.warnings.push(w);
        }
    }
}
