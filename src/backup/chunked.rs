//! Chunked files in a run: read by affa-agent on the source straight into the pool
//! (`chunkTransport` auto/agent, no staging copy), or their plain staging copies under
//! `RootDir/JOB/.staging/`, updated in place by rsync's delta transfer, then chunked into
//! `scheduled.running`. (Reading chunked archives back, `--unchunk` and `--verify`, and the pool
//! sweep are in `maintenance.rs`.)
//!
//! Owns: which files are chunked (`chunkFiles`, one rsync filter set for both transports), the
//! choice of transport and its fallback, the staging copies, the chunk numbers in the report.
//! Must never: transfer a chunked file whole when an older copy exists (a missing staging copy
//! is rebuilt from the newest archive first), chunk into anything but `scheduled.running`, fall
//! back to rsync after an agent backup has started (a failure then fails the run), or turn a
//! name the host lists into a local path other than through `crate::untrusted`.

use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::archive;
use crate::backup::ctx::{check_rsync, disk_full, Ctx, RunSummary, STAGING};
use crate::chunk::{self, Pool};
use crate::config::typed::ChunkTransport;
use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::observer::Phase;
use crate::report::Report;
use crate::transport::rsync::{self, Source};
use crate::transport::{agent, SshTarget};
use crate::untrusted::SafeRelPath;

/// `chunkFiles` as a matcher over archive-relative paths. Like rsync patterns, a pattern
/// without `/` matches the file name, one with `/` the whole path.
pub fn matcher(job: &Job) -> Result<Option<GlobSet>> {
    let pats = &job.chunk.files;
    if pats.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in pats {
        let pat = if p.contains('/') { p.trim_start_matches('/').to_string() } else { format!("**/{p}") };
        let g =
            Glob::new(&pat).map_err(|e| Error::config(format!("chunkFiles pattern '{p}' of job {}: {e}", job.name)))?;
        b.add(g);
    }
    Ok(Some(b.build().map_err(|e| Error::config(format!("chunkFiles of job {}: {e}", job.name)))?))
}

/// rsync `--exclude` patterns that keep chunked files out of the main transfer.
pub fn rsync_excludes(job: &Job) -> Vec<String> {
    job.chunk.files.clone()
}

/// Totals of the chunking of one run, written into the report.
#[derive(Debug, Default, Clone)]
pub struct ChunkTotals {
    pub files: u64,
    pub logical: u64,
    pub added: u64,
    pub new_chunks: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub repaired: u64,
}

impl ChunkTotals {
    pub fn add(&mut self, s: &chunk::ChunkStats) {
        self.files += 1;
        self.logical += s.logical_size;
        self.added += s.added_bytes;
        self.new_chunks += s.new_chunks;
        self.chunks += s.chunks;
        self.zero_chunks += s.zero_chunks;
        self.repaired += s.repaired_chunks;
    }
    pub fn write(&self, r: &mut Report) {
        if self.files == 0 {
            return;
        }
        r.set("ChunkFiles", self.files);
        r.set("ChunkLogicalSize", self.logical);
        r.set("ChunkPoolBytesAdded", self.added);
        r.set("ChunkCount", self.chunks);
        r.set("ChunkNew", self.new_chunks);
        r.set("ChunkZero", self.zero_chunks);
        if self.repaired > 0 {
            r.set("ChunkRepaired", self.repaired);
        }
        r.set("DedupRatio", format!("{:.1}", self.logical as f64 / self.added.max(1) as f64));
    }
}

/// The staging copy of an archive-relative path.
pub fn staging_path(ctx: &Ctx, rel: &Path) -> PathBuf {
    ctx.job_dir.join(STAGING).join(rel)
}

/// The manifest of `rel` in the newest of the given archives that has one.
fn previous_manifest(link_dirs: &[PathBuf], rel: &Path) -> Option<(PathBuf, chunk::Manifest)> {
    link_dirs.iter().find_map(|a| {
        let mp = chunk::recorded_manifest(a, rel)?;
        chunk::read_manifest(&mp).ok().map(|m| (a.clone(), m))
    })
}

/// Make sure the staging copy of `rel` exists if any earlier archive holds the file, so rsync
/// sends only what changed.
pub fn ensure_staging(ctx: &Ctx, rel: &Path, link_dirs: &[PathBuf]) -> Result<PathBuf> {
    let st = staging_path(ctx, rel);
    if fs::symlink_metadata(&st).is_ok() {
        return Ok(st);
    }
    if let Some((arch, _)) = previous_manifest(link_dirs, rel) {
        ctx.log.info(format!("rebuilding the staging copy of {} from {}", rel.display(), arch.display()));
        if let Some(d) = st.parent() {
            fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
        }
        let mp = chunk::manifest_path(&arch, rel);
        if let Err(e) = chunk::unchunk_file(&arch, &mp, &st, None) {
            // A damaged earlier archive must not stop today's backup: transfer in full.
            ctx.log
                .warn(format!("cannot rebuild the staging copy of {} ({e}); it is transferred in full", rel.display()));
        }
    }
    Ok(st)
}

/// Chunk the staging copy of `rel` into `running`.
pub fn chunk_into(
    ctx: &Ctx,
    running: &Path,
    rel: &Path,
    link_dirs: &[PathBuf],
    totals: &mut ChunkTotals,
) -> Result<()> {
    let st = staging_path(ctx, rel);
    let pool = Pool::open(&ctx.job.root_dir())?;
    let set = ctx.job.chunk.settings.clone();
    let prev = previous_manifest(link_dirs, rel).map(|(_, m)| m);
    let size = fs::symlink_metadata(&st).map(|m| m.len()).unwrap_or(0);
    let bar = ctx.log.watch.meter("chunking", Some(size));
    let cb = |n: u64| {
        bar.set(n);
        crate::interrupt::crash_point("chunk-progress");
    };
    let stats = match chunk::chunk_file(&pool, &set, &st, running, rel, prev.as_ref(), Some(&cb)) {
        Ok(s) => s,
        Err(e) if e.is_disk_full() => return Err(disk_full(ctx, e.message()).with_source(e)),
        Err(e) => return Err(e),
    };
    drop(bar);
    if stats.replaced_source_file {
        ctx.log.warn(format!(
            "the source's own file {}{} has the name of the manifest of the chunked file {}: it is not in the archive (the manifest took its place)",
            rel.display(),
            chunk::MANIFEST_SUFFIX,
            rel.display()
        ));
    }
    ctx.log.info(format!(
        "chunked {}: {} in {} chunks, {} new, {} added to the pool",
        rel.display(),
        crate::fmt::human(stats.logical_size),
        stats.chunks,
        stats.new_chunks,
        crate::fmt::human(stats.added_bytes)
    ));
    totals.add(&stats);
    Ok(())
}

/// How this run reads its chunked files (`chunkTransport`), in the report: `ChunkTransport`
/// (`agent` or `rsync`) and, after a fallback, `ChunkTransportNote` (the reason).
fn report_transport(report: &mut Report, via: ChunkTransport, note: Option<&str>) {
    report.set("ChunkTransport", via.name());
    if let Some(n) = note {
        report.set("ChunkTransportNote", n);
    }
}

/// The agent could not be used: `chunkTransport=agent` fails with `why`; `auto` warns once
/// (the reason and the fix) and the run goes on through rsync and the staging copy.
fn agent_unavailable(ctx: &Ctx, why: &str, report: &mut Report, summary: &mut RunSummary) -> Result<()> {
    if ctx.job.chunk.transport == ChunkTransport::Agent {
        bail!(Remote, "job {} (chunkTransport=agent): {why}", ctx.job.name);
    }
    let w = format!("chunked files go through rsync and the staging copy this run: {why}");
    ctx.log.warn(&w);
    summary.warnings.push(w);
    report_transport(report, ChunkTransport::Rsync, Some(why));
    Ok(())
}

/// Start the agent on the job's host (installing or replacing it first), per `chunkTransport`:
/// None = use rsync and the staging copy (`rsync`, or `auto` where the agent cannot run, with
/// the warning). `datastore_dir`: an ESXi job's datastore of the VM's .vmx (the default place).
pub fn open_agent(
    ctx: &Ctx,
    t: &SshTarget,
    datastore_dir: Option<&str>,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<Option<agent::Session>> {
    if ctx.job.chunk.transport == ChunkTransport::Rsync {
        report_transport(report, ChunkTransport::Rsync, None);
        return Ok(None);
    }
    let path = agent::remote_path(ctx.job, datastore_dir);
    let local = agent::local_binary(ctx.cfg);
    let idle = std::time::Duration::from_secs(ctx.job.rsync.timeout);
    let started = agent::start(t, &path, &local, idle);
    if crate::interrupt::interrupted() {
        // A signal stopped ssh during the handshake or the install: not a broken agent.
        if let Ok(agent::Started::Ready(s)) = started {
            s.stop();
        }
        bail!(Interrupted, "starting affa-agent interrupted by {}", crate::interrupt::signal_name());
    }
    match started? {
        agent::Started::Ready(s) => {
            ctx.log.info(format!("affa-agent {} at {}", s.agent.software, s.label));
            report_transport(report, ChunkTransport::Agent, None);
            Ok(Some(*s))
        }
        agent::Started::Unavailable(u) => {
            agent_unavailable(ctx, &u.to_string(), report, summary)?;
            Ok(None)
        }
    }
}

/// One run's agent session and what it did: chunk totals, bytes the agent read on the source,
/// frame bytes received from it, the files that vanished before it read them.
pub struct AgentRun {
    pub session: Option<agent::Session>,
    pub totals: ChunkTotals,
    pub read: u64,
    pub received: u64,
    /// Archive-relative paths (shown safely) of the files that did not exist when the agent
    /// opened them (only where `may_vanish` allows it: see [`backup_via_agent`]).
    pub vanished: Vec<String>,
    /// A file missing when the agent opens it is a warning (a Linux job's files, as rsync's
    /// "vanished file"), not a failure (an ESXi job's frozen disks: a VM is never archived
    /// without one).
    pub may_vanish: bool,
    /// Whether the session was told which chunks are the job's own (agentDedupScope=job).
    scoped: bool,
}

impl AgentRun {
    pub fn new(session: agent::Session, may_vanish: bool) -> AgentRun {
        AgentRun {
            session: Some(session),
            totals: ChunkTotals::default(),
            read: 0,
            received: 0,
            vanished: Vec::new(),
            may_vanish,
            scoped: false,
        }
    }

    /// `BYE`, and the numbers into the report (`ChunkVanished`, `ChunkVanishedFiles`: the files
    /// that vanished before the agent read them).
    pub fn finish(mut self, r: &mut Report) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.finish()?;
        }
        self.totals.write(r);
        r.set("ChunkSourceBytesRead", self.read);
        r.set("ChunkBytesReceived", self.received);
        if !self.vanished.is_empty() {
            r.set("ChunkVanished", self.vanished.len());
            // Names the host chose: at most 64 KiB of them in the report (the log has all).
            let mut list = String::new();
            for (i, f) in self.vanished.iter().enumerate() {
                if list.len() + f.len() > 64 << 10 {
                    list.push_str(&format!(" and {} more", self.vanished.len() - i));
                    break;
                }
                if i > 0 {
                    list.push_str(", ");
                }
                list.push_str(f);
            }
            r.set("ChunkVanishedFiles", list);
        }
        Ok(())
    }

    /// Stop the agent (an error or a signal elsewhere).
    pub fn stop(&mut self) {
        if let Some(s) = self.session.take() {
            s.stop();
        }
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Back up `remote` on the host through the agent into `running` as `rel`, against the file's
/// manifest in `link_dirs` (or, `ranged`, only the chunk ranges given, the rest carried from
/// that previous manifest: Changed Block Tracking). On an error the session is stopped and the
/// error is one line naming
/// host and file (no manifest was written for it; earlier archives are untouched).
/// With `run.may_vanish`, a file that no longer exists when the agent opens it (it vanished
/// after the listing) is, as rsync's "vanished file", a warning (the archive lacks it,
/// `run.vanished` names it, the session goes on); otherwise it fails the run like any other fault. A file
/// that vanishes, changes or cannot be read once the read began always fails the run.
pub fn backup_via_agent(
    ctx: &Ctx,
    run: &mut AgentRun,
    remote: &Path,
    running: &Path,
    rel: &Path,
    link_dirs: &[PathBuf],
    ranged: Option<(&chunk::Manifest, &[(u64, u64)])>,
) -> Result<chunk::remote::RemoteStats> {
    let session = &mut run.session;
    let Some(s) = session.as_mut() else { bail!("internal: no agent session") };
    if !run.scoped && !ctx.job.chunk.dedup_across_jobs {
        // The host may skip only the chunks of this job's own archives (docs/SECURITY.md): the
        // run's basis first, then every other archive of the job.
        let mut archives = link_dirs.to_vec();
        archives.extend(archive::list(&ctx.job_dir)?.into_iter().map(|a| a.path).filter(|p| !link_dirs.contains(p)));
        s.agent.limit_known(archives);
        run.scoped = true;
    }
    let pool = Pool::open(&ctx.job.root_dir())?;
    let set = &ctx.job.chunk.settings;
    let res = match ranged {
        Some((prev, ranges)) => {
            chunk::remote::backup_file_ranged(&mut s.agent, &pool, set, remote, running, rel, prev, ranges)
        }
        None => {
            let prev = previous_manifest(link_dirs, rel).map(|(_, m)| m);
            chunk::remote::backup_file(&mut s.agent, &pool, set, remote, running, rel, prev.as_ref())
        }
    };
    let stats = match res {
        Ok(st) => st,
        Err(e) if run.may_vanish && chunk::remote::source_vanished(&e) => {
            let name = crate::untrusted::shown(&rel.to_string_lossy());
            ctx.log.warn(format!(
                "{}:{} vanished before affa-agent read it: it is not in this archive ({e})",
                ctx.job.host,
                crate::untrusted::shown(&remote.to_string_lossy())
            ));
            run.vanished.push(name);
            return Ok(chunk::remote::RemoteStats::default());
        }
        Err(e) => {
            let s = session.take().expect("checked above");
            if crate::interrupt::interrupted() {
                // The signal stopped the agent's ssh (interrupt.rs): that is why the read ended.
                s.stop();
                bail!(
                    Interrupted,
                    "the agent backup of {} interrupted by {}; no manifest was written for it, earlier archives are untouched",
                    rel.display(),
                    crate::interrupt::signal_name()
                );
            }
            let host = ctx.job.host.clone();
            let timed_out = s.timed_out();
            let writing = s.timed_out_writing();
            let stderr = s.stop();
            let mut more = if stderr.is_empty() { String::new() } else { format!(" (agent: {stderr})") };
            if writing {
                more.push_str(&format!(
                    " (the agent read nothing affa sent for {} s and was stopped: rsyncTimeout)",
                    ctx.job.rsync.timeout
                ));
            } else if timed_out {
                more.push_str(&format!(
                    " (the agent sent nothing for {} s and was stopped: rsyncTimeout)",
                    ctx.job.rsync.timeout
                ));
            }
            if e.is_disk_full() {
                return Err(disk_full(ctx, e.message()).with_source(e));
            }
            bail!(
                Remote,
                "the agent backup of {host}:{} failed: {e}{more}; no manifest was written for {}, earlier archives are untouched",
                remote.display(),
                rel.display()
            );
        }
    };
    if stats.chunk.replaced_source_file {
        ctx.log.warn(format!(
            "the source's own file {}{} has the name of the manifest of the chunked file {}: it is not in the archive (the manifest took its place)",
            rel.display(),
            chunk::MANIFEST_SUFFIX,
            rel.display()
        ));
    }
    ctx.log.info(format!(
        "chunked {} through the agent: {} in {} chunks, {} new, {} received, {} added to the pool",
        rel.display(),
        crate::fmt::human(stats.chunk.logical_size),
        stats.chunk.chunks,
        stats.chunk.new_chunks,
        crate::fmt::human(stats.bytes_received),
        crate::fmt::human(stats.chunk.added_bytes)
    ));
    run.totals.add(&stats.chunk);
    run.read = run.read.saturating_add(stats.source_bytes_read);
    run.received = run.received.saturating_add(stats.bytes_received);
    Ok(stats)
}

/// After a run whose chunked files all went through the agent: the staging copies an earlier
/// rsync-path run left are removed (the space back; a later fallback rebuilds them).
pub fn remove_staging(ctx: &Ctx) {
    let st = ctx.job_dir.join(STAGING);
    if fs::symlink_metadata(&st).is_ok() {
        match fs::remove_dir_all(&st) {
            Ok(()) => ctx.log.info(format!("removed the staging copies in {} (the agent needs none)", st.display())),
            Err(e) => ctx.log.warn(format!("cannot remove {}: {e}", st.display())),
        }
    }
}

/// The rsync filter and options of the chunked files' transfer into staging: the same set
/// selects the files the agent reads.
fn chunk_transfer_args(job: &Job, source: &Source) -> rsync::Args {
    let mut args = rsync::Args::new(job, source);
    args.opts([
        "--stats",
        "--relative",
        "--inplace",
        "--sparse",
        "--no-whole-file",
        "--delete-during",
        "--delete-excluded",
        "--prune-empty-dirs",
    ]);
    // Chunking opens what lands in staging: never a symlink, device or fifo there (rsync skips
    // them, and --delete-during removes an older staging copy of such a name).
    args.opts(rsync::REGULAR_FILES_ONLY);
    for p in &job.excludes {
        args.opt(format!("--exclude={p}"));
    }
    args.opt("--include=*/");
    for p in &job.chunk.files {
        args.opt(format!("--include={p}"));
    }
    args.opt("--exclude=*");
    args
}

/// The source's files that match chunkFiles, archive-relative (by the path-safety rule), from
/// an rsync dry run with the staging transfer's filter set. `Ok(Err(why))`: rsync cannot name
/// them exactly (the agent is not usable this run).
fn list_chunked(
    ctx: &Ctx,
    source: &Source,
    sources: &[String],
    summary: &mut RunSummary,
) -> Result<std::result::Result<Vec<SafeRelPath>, String>> {
    let job = ctx.job;
    let empty = ctx.job_dir.join(format!(".agent-list-{}", std::process::id()));
    let _ = fs::remove_dir_all(&empty);
    crate::fsutil::create_private_dir(&empty)?;
    let mut args = chunk_transfer_args(job, source);
    args.opt("--dry-run");
    args.opts(rsync::itemize_args());
    args.from(source, sources).to(format!("{}/", empty.display()));
    ctx.log.phase(Phase::Copying { what: "the list of files to chunk".into(), n: 2, of: 2 });
    let res = rsync::run(job, &args, &ctx.log, &crate::observer::Watch::nobody());
    let _ = fs::remove_dir_all(&empty);
    let res = res?;
    check_rsync(ctx, &res, "listing the chunked files", summary)?;
    // A count, not the text of the line that says so: a host's file could be named like it.
    if res.stdout_omitted > 0 {
        return Ok(Err(format!("more chunked files than affa lists in one run (rsync listed over {} lines)", 1000)));
    }
    let mut out = Vec::new();
    for name in rsync::regular_files(&res.stdout) {
        if name.contains("\\#") {
            return Ok(Err(format!(
                "rsync cannot name the chunked file \"{}\" exactly (an unusual character)",
                crate::untrusted::shown(&name)
            )));
        }
        out.push(SafeRelPath::new("a chunked file's path", &name)?);
    }
    Ok(Ok(out))
}

/// The chunked files of an ordinary job through the agent (no staging copy): None when the
/// agent is not used this run (the caller takes the rsync path).
fn transfer_chunked_agent(
    ctx: &Ctx,
    t: &SshTarget,
    source: &Source,
    sources: &[String],
    running: &Path,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<Option<()>> {
    if ctx.job.chunk.transport == ChunkTransport::Rsync {
        report_transport(report, ChunkTransport::Rsync, None);
        return Ok(None);
    }
    // rsync names a file below a `/./` cut relative to the cut, not to `/`: the host path the
    // agent would open could not be rebuilt from that name (another file, or none).
    let cut = sources.iter().find(|s| s.contains("/./"));
    let listed = match cut {
        Some(s) => Ok(Err(format!("the source path {s} has a /./ cut, whose files rsync names relative to it"))),
        None => list_chunked(ctx, source, sources, summary),
    };
    let files = match listed? {
        Ok(f) => f,
        Err(why) => {
            agent_unavailable(ctx, &why, report, summary)?;
            return Ok(None);
        }
    };
    if files.is_empty() {
        // Nothing to read: no ssh session, no agent (and no staging copy to keep).
        ctx.log.info("no file of the source matches chunkFiles: affa-agent is not started");
        remove_staging(ctx);
        return Ok(Some(()));
    }
    let mut run = match open_agent(ctx, t, None, report, summary)? {
        Some(s) => AgentRun::new(s, true),
        None => return Ok(None),
    };
    let link_dirs: Vec<PathBuf> = archive::newest_valid(&ctx.job_dir)?.map(|a| vec![a.path]).unwrap_or_default();
    for (i, rel) in files.iter().enumerate() {
        if crate::interrupt::interrupted() {
            run.stop();
            bail!(Interrupted, "interrupted by {}", crate::interrupt::signal_name());
        }
        ctx.log.phase(Phase::Chunking { file: rel.as_str().to_string(), n: i + 1, of: files.len() });
        let remote = Path::new("/").join(rel.as_path());
        backup_via_agent(ctx, &mut run, &remote, running, rel.as_path(), &link_dirs, None)?;
        crate::interrupt::crash_point("chunked");
    }
    if !run.vanished.is_empty() {
        // As rsync's exit 24: the run succeeds, with a warning naming the files.
        summary.warnings.push(format!(
            "chunked file(s) vanished before affa-agent read them, not in this archive: {}",
            run.vanished.join(", ")
        ));
    }
    run.finish(report)?;
    remove_staging(ctx);
    Ok(Some(()))
}

/// Transfer the chunked files of an ordinary job: through the agent over ssh (`chunkTransport`
/// auto or agent), else into staging by rsync and chunked from there into `running`.
/// `sources` are the paths of the main transfer (the job's; an SME job's backup set first):
/// the chunked files are looked for in exactly those, which the main transfer excluded them
/// from.
pub fn transfer_chunked(
    ctx: &Ctx,
    source: &Source,
    sources: &[String],
    running: &Path,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<()> {
    if let Source::Ssh(t) = source {
        if transfer_chunked_agent(ctx, t, source, sources, running, report, summary)?.is_some() {
            return Ok(());
        }
    }
    let staging = ctx.job_dir.join(STAGING);
    crate::fsutil::create_private_dir(&staging)?;
    let link_dirs: Vec<PathBuf> = archive::newest_valid(&ctx.job_dir)?.map(|a| vec![a.path]).unwrap_or_default();
    // Rebuild missing staging copies from the newest archive first.
    if let Some(newest) = link_dirs.first() {
        for rel in chunk::chunked_files(newest)? {
            ensure_staging(ctx, &rel, &link_dirs)?;
        }
    }
    let job = ctx.job;
    let mut args = chunk_transfer_args(job, source);
    args.from(source, sources).to(format!("{}/", staging.display()));
    ctx.log.phase(Phase::Copying { what: "the files to chunk".into(), n: 2, of: 2 });
    let res = rsync::run(job, &args, &ctx.log, &ctx.log.watch)?;
    check_rsync(ctx, &res, "the transfer of the chunked files", summary)?;
    let mut totals = ChunkTotals::default();
    let files = crate::fsutil::walk_files(&staging)?;
    for (i, f) in files.iter().enumerate() {
        let rel = f.strip_prefix(&staging).unwrap().to_path_buf();
        ctx.log.phase(Phase::Chunking { file: rel.display().to_string(), n: i + 1, of: files.len() });
        chunk_into(ctx, running, &rel, &link_dirs, &mut totals)?;
        crate::interrupt::crash_point("chunked");
    }
    for (k, v) in crate::report::parse_rsync_stats(&res.stdout) {
        if let (Some(a), Ok(b)) = (report.num(&k), v.parse::<u64>()) {
            report.set(&k, a + b);
        }
    }
    totals.write(report);
    Ok(())
}

/// In the job dir while a run deletes archives and until its sweep is done: a run that finds it
/// was killed in between (the deleted archives' chunk lists are gone) and sweeps the whole pool.
pub const SWEEP_PENDING: &str = ".affa-sweep-pending";

/// After rotation: delete what the run leaves behind (the archives rotation moved to the trash,
/// the resume dir of an earlier interrupted run) and remove the pool entries that only those
/// linked. The sweep looks only at the chunks the deleted trees linked (its cost follows the
/// deletions, not the pool); a run killed between its deletions and the end of its sweep
/// leaves [`SWEEP_PENDING`], and the next run sweeps the whole pool. Orphans made by other
/// means (an archive deleted by hand) are `affa --cleanup`'s, which sweeps the whole pool.
pub fn delete_and_sweep(ctx: &Ctx) -> Result<()> {
    delete_and_sweep_of(ctx, true)
}

/// [`delete_and_sweep`] of the trash only (a promotion-only run: the resume dir of an
/// interrupted transfer stays for the next scheduled run).
pub fn delete_trash_and_sweep(ctx: &Ctx) -> Result<()> {
    delete_and_sweep_of(ctx, false)
}

fn delete_and_sweep_of(ctx: &Ctx, resume_too: bool) -> Result<()> {
    let root = ctx.job.root_dir();
    let pooled = !ctx.job.chunk.files.is_empty() || root.join(chunk::POOL_DIR).is_dir();
    let marker = ctx.job_dir.join(SWEEP_PENDING);
    let pending = fs::symlink_metadata(&marker).is_ok();
    let mut ids = Vec::new();
    if pooled && !pending {
        let trash = ctx.job_dir.join(archive::TRASH);
        let mut trees: Vec<PathBuf> = fs::read_dir(&trash).into_iter().flatten().flatten().map(|e| e.path()).collect();
        if resume_too {
            trees.push(ctx.job_dir.join(archive::RESUME));
        }
        for t in trees.iter().filter(|t| t.is_dir() && !t.is_symlink()) {
            ids.extend(chunk::linked_ids(t));
        }
        if !ids.is_empty() {
            fs::write(&marker, b"").ctx(|| format!("cannot write {}", marker.display()))?;
            fs::File::open(&ctx.job_dir)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("cannot fsync {}", ctx.job_dir.display()))?;
        }
    }
    archive::empty_trash(&ctx.job_dir)?;
    if resume_too {
        archive::remove_tree(&ctx.job_dir.join(archive::RESUME))?;
    }
    crate::interrupt::crash_point("before-sweep");
    if !pooled || !root.join(chunk::POOL_DIR).is_dir() {
        let _ = fs::remove_file(&marker);
        return Ok(());
    }
    let s = if pending {
        ctx.log.info("an earlier run was stopped before its pool sweep ended: sweeping the whole pool");
        crate::maintenance::sweep_pool(&root)?
    } else {
        crate::maintenance::sweep_pool_of(&root, &ids)?
    };
    if fs::symlink_metadata(&marker).is_ok() {
        fs::remove_file(&marker).ctx(|| format!("cannot remove {}", marker.display()))?;
    }
    if !s.is_empty() {
        ctx.log.info(s);
    }
    Ok(())
}
