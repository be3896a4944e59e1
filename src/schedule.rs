//! Scheduled runs: a cron run with its retries and mails (`--run`, through [`run_job`]), and
//! resuming interrupted jobs (`--resume-interrupted`, `--kill --resume=SECS`). The cron file
//! itself is `cron.rs`.
//!
//! Owns: the retry loop around `backup::run`; when a mail is sent for a run. Must never: retry
//! or mail a run that was stopped on purpose (SIGTERM/SIGINT from `--kill`, killAt or a
//! shutdown: the next run or `--resume-interrupted` resumes it), or let a failing mail change
//! the outcome of a run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::archive;
use crate::backup::{RunOptions, RunSummary};
use crate::clock::Clock;
use crate::config::{BrokenJob, Config, Job};
use crate::cron::{absolute, effective_enabled};
use crate::error::{ErrorKind, IoContext, Result};
use crate::joblog::JobLog;
use crate::observer::Watch;

/// The affa binary to start again: the running one, else affaBinary.
fn self_binary(cfg: &Config) -> PathBuf {
    std::env::current_exe().ok().filter(|p| p.is_file()).unwrap_or_else(|| cfg.settings.affa_binary.clone())
}

/// Start `affa --config-dir DIR --silent --run JOB` as a detached process (own session, no
/// terminal, output discarded; the run logs to its job log and mails), after `delay` seconds.
fn spawn_run(cfg: &Config, job: &str, delay: u64) -> Result<u32> {
    let bin = self_binary(cfg);
    let args: Vec<String> = vec![
        "--config-dir".into(),
        absolute(&cfg.dir).to_string_lossy().into_owned(),
        "--silent".into(),
        "--run".into(),
        job.into(),
    ];
    let mut c = if delay > 0 {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(format!("sleep {delay} && exec \"$0\" \"$@\"")).arg(&bin).args(&args);
        c
    } else {
        let mut c = Command::new(&bin);
        c.args(&args);
        c
    };
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls setsid(2),
    // which is async-signal-safe, allocates nothing and takes no lock.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = c.spawn().ctx(|| format!("cannot start {}", bin.display()))?;
    Ok(child.id())
}

/// `--resume-interrupted`: start every job whose transfer was interrupted (RootDir/JOB/
/// scheduled.running exists, the job is not running) and that has resumeAfterBoot=yes and is
/// enabled. Each is started as its own detached background process, all at once (as cron would
/// start them), so one long job does not delay the others.
pub fn resume_interrupted(cfg: &Config) -> Result<Resumed> {
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    // An interrupted job whose configuration broke since: named, not started.
    for b in cfg.broken.values() {
        // Only one that would have been resumed (enabled, resumeAfterBoot=yes, as read).
        if b.partial.job_dir().join(archive::RUNNING).exists()
            && effective_enabled(cfg, &b.partial)
            && b.partial.resume_after_boot
            && crate::lock::holder(&cfg.lock_dir(), &b.name).is_none()
        {
            failed.push(format!("job {} was interrupted; not resumed: {}", b.name, b.error()));
        }
    }
    for job in cfg.jobs.values() {
        if !job.job_dir().join(archive::RUNNING).exists() || !effective_enabled(cfg, job) {
            continue;
        }
        if let Some(pid) = crate::lock::holder(&cfg.lock_dir(), &job.name) {
            lines.push(format!("job {} is running (pid {pid})", job.name));
            continue;
        }
        if !job.resume_after_boot {
            lines.push(format!("job {} was interrupted; not resumed (resumeAfterBoot=no)", job.name));
            continue;
        }
        let pid = match spawn_run(cfg, &job.name, 0) {
            Ok(p) => p,
            Err(e) => {
                // The others are started all the same.
                failed.push(format!("job {} was interrupted; it could not be started: {e}", job.name));
                continue;
            }
        };
        JobLog::new(&cfg.log_dir(), &job.name, Watch::nobody())
            .info(format!("--resume-interrupted: resuming the interrupted job {} (pid {pid})", job.name));
        lines.push(format!("job {} resumed in the background (pid {pid})", job.name));
    }
    if lines.is_empty() && failed.is_empty() {
        lines.push("no interrupted jobs to resume".into());
    }
    Ok(Resumed { text: lines.join("\n"), failed })
}

/// What `--resume-interrupted` did: one line per interrupted job, and one per job it could not
/// resume (a broken configuration, a start that failed).
#[derive(Debug, Clone)]
pub struct Resumed {
    pub text: String,
    pub failed: Vec<String>,
}

/// `--kill JOB --resume=SECS`: run the job again after SECS seconds (detached).
pub fn resume_later(cfg: &Config, job: &str, secs: u64) -> Result<String> {
    cfg.job(job)?;
    let pid = spawn_run(cfg, job, secs)?;
    JobLog::new(&cfg.log_dir(), job, Watch::nobody())
        .info(format!("--kill --resume={secs}: job {job} runs again in {secs} s (pid {pid})"));
    Ok(format!("job {job} runs again in {secs} s (pid {pid})"))
}

fn log_len(p: Option<&Path>) -> u64 {
    p.and_then(|p| fs::metadata(p).ok()).map(|m| m.len()).unwrap_or(0)
}

/// Lines of a run's log a mail quotes: the first and the last ones, with a line saying how many
/// are left out between them (a host that floods rsync's stderr cannot make a mail of hundreds
/// of megabytes).
pub const MAIL_LOG_LINES: (usize, usize) = (200, 300);

/// The lines appended to the job's log since `offset` (read as a stream; at most
/// [`MAIL_LOG_LINES`] kept).
fn log_since(p: Option<&Path>, offset: u64) -> Vec<String> {
    let Some(p) = p else { return Vec::new() };
    crate::joblog::lines_since(p, offset, MAIL_LOG_LINES.0, MAIL_LOG_LINES.1).map(|t| t.lines()).unwrap_or_default()
}

/// Sleep `secs`, waking early when the process is told to stop.
fn pause(secs: u64) {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until && !crate::interrupt::interrupted() {
        std::thread::sleep(Duration::from_millis(100).min(until - std::time::Instant::now()));
    }
}

/// Why a failure of this kind is not worth a retry (waiting does not change it), or None.
fn not_retried(kind: ErrorKind) -> Option<&'static str> {
    match kind {
        ErrorKind::Config => Some("the configuration must be fixed first"),
        ErrorKind::DiskFull => Some("RootDir's disk is full; a retry would fill it again"),
        ErrorKind::Damaged => Some("stored data is damaged; run --verify and repair first"),
        _ => None,
    }
}

/// `--run JOB [LEVEL]`: one run, with the mails, and (when `retry` is set, as under cron with
/// `--silent`) RetryAttempts re-runs RetryAfter seconds apart after a failure of the transfer,
/// the connection or a pre/post-job script. A failure that waiting does not change (a
/// configuration error, a full RootDir, damaged stored data: [`not_retried`]) is not retried.
///
/// Mails: a failed sequence (every attempt failed) sends exactly one error mail, after the last
/// attempt, with the log lines of all attempts. RetryNotification=yes adds a short notice after
/// each failed attempt that is retried, and a success mail when a retry succeeds. A run stopped
/// by a signal is neither retried nor mailed. A run with warnings sends a warning mail; a
/// success sends a mail while chattyOnSuccess > 0 and writes the count, less one, back to the
/// job's configuration file.
pub fn run_job(cfg: &Config, job: &str, clock: &dyn Clock, opts: RunOptions, retry: bool) -> Result<RunSummary> {
    if let Some(b) = cfg.broken.get(job) {
        return config_failure(cfg, b, clock, opts);
    }
    let j = cfg.job(job)?;
    let note = JobLog::new(&cfg.log_dir(), job, opts.watch.clone());
    let log_path = note.path().map(Path::to_path_buf);
    let lp = log_path.as_deref();
    let start = log_len(lp);
    let retries = if retry { j.retry.attempts } else { 0 };
    let after = j.retry.after;
    let total = retries + 1;
    let mut notified = false;
    let mut attempt = 1;
    let result = loop {
        let res = crate::backup::run(cfg, job, clock, opts.clone());
        match res {
            Ok(s) => break Ok(s),
            Err(e) if crate::interrupt::interrupted() => break Err(e),
            Err(e) if attempt < total && not_retried(e.kind()).is_some() => {
                let why = not_retried(e.kind()).unwrap_or_default();
                note.info(format!("attempt {attempt} of {total} failed; not retried: {why}"));
                match crate::notify::error_mail(cfg, j, e.message(), attempt, lp, &log_since(lp, start)) {
                    Ok(how) => note.info(format!("error mail sent {how}")),
                    Err(me) => note.warn(format!("cannot send the error mail: {me}")),
                }
                break Err(e);
            }
            Err(e) if attempt < total => {
                note.info(format!("attempt {attempt} of {total} failed; retry {attempt} of {retries} in {after} s"));
                if j.mail.retry_notification {
                    match crate::notify::retry_notice(cfg, j, e.message(), attempt, total, after) {
                        Ok(_) => notified = true,
                        Err(me) => note.warn(format!("cannot send the retry notice: {me}")),
                    }
                }
                pause(after);
                if crate::interrupt::interrupted() {
                    break Err(e);
                }
                attempt += 1;
            }
            Err(e) => {
                match crate::notify::error_mail(cfg, j, e.message(), attempt, lp, &log_since(lp, start)) {
                    Ok(how) => note.info(format!("error mail sent {how}")),
                    Err(me) => note.warn(format!("cannot send the error mail: {me}")),
                }
                break Err(e);
            }
        }
    };
    if let Ok(s) = &result {
        after_success(cfg, j, s, &note, lp, start, attempt, notified);
    }
    crate::monitor::refresh_metrics(cfg, clock);
    result
}

/// `--run` of a job whose configuration has errors: the run fails as any failed run does (its
/// log, its error mail to the recipients its section names or the global ones, the metrics),
/// without retries (the configuration does not change by waiting); the other jobs are not
/// concerned.
fn config_failure(cfg: &Config, b: &BrokenJob, clock: &dyn Clock, opts: RunOptions) -> Result<RunSummary> {
    let log = JobLog::new(&cfg.log_dir(), &b.name, opts.watch.clone());
    let lp = log.path().map(Path::to_path_buf);
    let start = log_len(lp.as_deref());
    log.error(format!("job {} cannot run: its configuration has {} error(s)", b.name, b.errors.len()));
    for e in &b.errors {
        log.error(e);
    }
    let err = b.error();
    let lines = log_since(lp.as_deref(), start);
    match crate::notify::error_mail(cfg, &b.partial, err.message(), 1, lp.as_deref(), &lines) {
        Ok(how) => log.info(format!("error mail sent {how}")),
        Err(me) => log.warn(format!("cannot send the error mail: {me}")),
    }
    crate::monitor::refresh_metrics(cfg, clock);
    Err(err)
}

#[allow(clippy::too_many_arguments)]
fn after_success(
    cfg: &Config,
    j: &Job,
    s: &RunSummary,
    note: &JobLog,
    lp: Option<&Path>,
    start: u64,
    attempt: u32,
    notified: bool,
) {
    if !s.warnings.is_empty() {
        match crate::notify::warning_mail(cfg, j, &s.warnings, lp, &log_since(lp, start)) {
            Ok(how) => note.info(format!("warning mail sent {how}")),
            Err(me) => note.warn(format!("cannot send the warning mail: {me}")),
        }
    }
    let chatty = j.mail.chatty_on_success;
    if chatty > 0 || notified {
        let extra = if attempt > 1 { format!("It succeeded at attempt {attempt}.") } else { String::new() };
        match crate::notify::success_mail(cfg, j, s.archive.as_deref(), &extra, lp, &log_since(lp, start)) {
            Ok(how) => {
                note.info(format!("success mail sent {how}"));
                if chatty > 0 {
                    if let Err(e) = crate::config::edit::set_key(j, "chattyOnSuccess", &(chatty - 1).to_string()) {
                        note.warn(format!("cannot write chattyOnSuccess={}: {e}", chatty - 1));
                    }
                }
            }
            Err(me) => note.warn(format!("cannot send the success mail: {me}")),
        }
    }
}
