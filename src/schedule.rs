//! Scheduling: the cron file, the day's schedule, resuming interrupted jobs, retries.
//! (Stub: being written.)

use crate::archive::Level;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Result;
use crate::run::{RunOptions, RunSummary};

/// `--make-cronjobs`: write the cron file; returns a one-line summary.
pub fn make_cronjobs(_cfg: &Config) -> Result<String> {
    bail!("--make-cronjobs is not implemented yet")
}

/// `--show-schedule [--all]`: the day drawn as text.
pub fn show_schedule(_cfg: &Config, _all: bool) -> Result<String> {
    bail!("--show-schedule is not implemented yet")
}

/// `--resume-interrupted`: start every interrupted job with resumeAfterBoot=yes.
pub fn resume_interrupted(_cfg: &Config, _clock: &dyn Clock) -> Result<String> {
    bail!("--resume-interrupted is not implemented yet")
}

/// `--kill JOB --resume=SECS`: run the job again after SECS seconds (detached).
pub fn resume_later(_cfg: &Config, _job: &str, _secs: u64) -> Result<String> {
    bail!("--resume is not implemented yet")
}

/// `--run JOB [LEVEL]`: one run, with the error mail on failure, the success mail per
/// chattyOnSuccess, and (when `retry` is set, as under cron) RetryAttempts re-runs RetryAfter
/// seconds apart.
pub fn run_job(cfg: &Config, job: &str, clock: &dyn Clock, opts: RunOptions, _retry: bool) -> Result<RunSummary> {
    let _ = Level::Scheduled;
    crate::run::run(cfg, job, clock, opts)
}
