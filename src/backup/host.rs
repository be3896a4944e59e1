//! The transfer of a host's files (an ordinary job): rsync into `scheduled.running`, then the
//! chunked files, and how `scheduled.running` is prepared for any transfer.
//!
//! Owns: the rsync arguments of an ordinary job's transfer and the `--link-dest` bases. Must
//! never: write into an interrupted transfer (it may share inodes with earlier archives: it is
//! renamed to `.scheduled.resume` and used as a basis), or rotate anything.

use std::fs;
use std::path::{Path, PathBuf};

use crate::archive::{self, RESUME};
use crate::backup::ctx::{check_rsync, Ctx, RunSummary};
use crate::error::{IoContext, Result};
use crate::observer::Phase;
use crate::report::Report;
use crate::transport::rsync::{self, Source};

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
        if resume.join(crate::chunk::ARCHIVE_CHUNK_DIR).is_dir() {
            // The pool entries only this older resume dir linked: found by the whole-pool
            // sweep the end of the next successful run does (the marker survives a crash).
            let marker = ctx.job_dir.join(crate::backup::chunked::SWEEP_PENDING);
            fs::write(&marker, b"").ctx(|| format!("cannot write {}", marker.display()))?;
        }
        archive::remove_tree(&resume)?;
        fs::rename(running, &resume).ctx(|| format!("cannot rename {} to {}", running.display(), resume.display()))?;
        let _ = fs::remove_file(resume.join(crate::report::REPORT_FILE));
    }
    crate::fsutil::create_private_dir(running)?;
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

/// The ordinary transfer: rsync the job's sources into `scheduled.running`.
pub fn transfer_files(
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
    if job.rsync.inplace {
        args.opt("--inplace");
    }
    for l in &link {
        args.opt(format!("--link-dest={}", l.display()));
    }
    // affa's own files at the archive root: a source's files of those names never land there
    // (first: rsync applies the first rule that matches, and an Include pattern such as `.*`
    // must not let them in).
    args.opts(archive::reserved_excludes(&job.name));
    for p in &job.include_patterns {
        args.opt(format!("--include={p}"));
    }
    for p in &job.excludes {
        args.opt(format!("--exclude={p}"));
    }
    let chunk_patterns = crate::backup::chunked::rsync_excludes(job);
    for p in &chunk_patterns {
        args.opt(format!("--exclude={p}"));
    }
    args.configured(&job.rsync.options);
    let sources = crate::backup::sme::sources(ctx)?;
    if sources != job.sources {
        *ctx.extra_sources.borrow_mut() = sources.iter().filter(|s| !job.sources.contains(s)).cloned().collect();
    }
    args.from(&source, &sources).to(format!("{}/", running.display()));
    let steps = if chunk_patterns.is_empty() { 1 } else { 2 };
    ctx.log.phase(Phase::Copying { what: format!("the files of {}", job.host), n: 1, of: steps });
    let res = rsync::run(job, &args, &ctx.log, &ctx.log.watch)?;
    check_rsync(ctx, &res, "the transfer", summary)?;
    report.add_rsync_stats(&res.stdout);
    report.set("ExitStatus", res.code);
    if !chunk_patterns.is_empty() {
        crate::backup::chunked::transfer_chunked(ctx, &source, &sources, running, report, summary)?;
    }
    Ok(())
}
