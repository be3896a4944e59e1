//! Chunked files in a run: their plain staging copies under `RootDir/JOB/.staging/`, updated in
//! place by rsync's delta transfer, then chunked into `scheduled.running`. (Reading chunked
//! archives back, `--unchunk` and `--verify`, and the pool sweep are in `maintenance.rs`.)
//!
//! Owns: which files are chunked (`chunkFiles`), the staging copies, the chunk numbers in the
//! report. Must never: transfer a chunked file whole when an older copy exists (a missing
//! staging copy is rebuilt from the newest archive first), or chunk into anything but
//! `scheduled.running`.

use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::archive;
use crate::backup::ctx::{check_rsync, disk_full, Ctx, RunSummary, STAGING};
use crate::chunk::{self, Pool};
use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::observer::Phase;
use crate::report::Report;
use crate::transport::rsync::{self, Source};

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

/// Transfer the chunked files of an ordinary job into staging and chunk them into `running`.
pub fn transfer_chunked(
    ctx: &Ctx,
    source: &Source,
    running: &Path,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<()> {
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
    args.from(source, &job.sources).to(format!("{}/", staging.display()));
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

/// After rotation: remove pool chunks nobody references any more.
pub fn sweep_after_rotation(ctx: &Ctx) -> Result<()> {
    if ctx.job.chunk.files.is_empty() && !ctx.job.root_dir().join(chunk::POOL_DIR).exists() {
        return Ok(());
    }
    let s = crate::maintenance::sweep_pool(&ctx.job.root_dir())?;
    if !s.is_empty() {
        ctx.log.info(s);
    }
    Ok(())
}
