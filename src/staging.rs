//! Chunked files in a run: their plain staging copies under `RootDir/JOB/.staging/`, updated in
//! place by rsync's delta transfer, then chunked into `scheduled.running`; and the commands
//! that read chunked archives back (`--unchunk`, `--verify`) and the pool sweep.
//!
//! Owns: which files are chunked (`chunkFiles`), the staging copies, the chunk numbers in the
//! report. Must never: transfer a chunked file whole when an older copy exists (a missing
//! staging copy is rebuilt from the newest archive first), or chunk into anything but
//! `scheduled.running`.

use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::archive;
use crate::chunk::{self, Pool};
use crate::config::{keys, Config, Job};
use crate::error::{Error, IoContext, Result};
use crate::observer::{Phase, Watch};
use crate::report::Report;
use crate::run::{check_rsync, Ctx, RunSummary};
use crate::transport::rsync::{self, Source};

pub const STAGING: &str = ".staging";

/// The chunk settings of a job.
pub fn settings(job: &Job) -> Result<chunk::Settings> {
    let chunk_size = keys::parse_size(job.get("chunkSize")).unwrap_or(chunk::DEFAULT_CHUNK_SIZE as u64) as u32;
    let compression = chunk::parse_compression(job.get("chunkCompression"))?;
    Ok(chunk::Settings { chunk_size, compression, ..Default::default() })
}

/// `chunkFiles` as a matcher over archive-relative paths. Like rsync patterns, a pattern
/// without `/` matches the file name, one with `/` the whole path.
pub fn matcher(job: &Job) -> Result<Option<GlobSet>> {
    let pats = job.get_all("chunkFiles");
    if pats.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in pats {
        let pat = if p.contains('/') { p.trim_start_matches('/').to_string() } else { format!("**/{p}") };
        let g =
            Glob::new(&pat).map_err(|e| Error::new(format!("chunkFiles pattern '{p}' of job {}: {e}", job.name)))?;
        b.add(g);
    }
    Ok(Some(b.build().map_err(|e| Error::new(format!("chunkFiles of job {}: {e}", job.name)))?))
}

/// rsync `--exclude` patterns that keep chunked files out of the main transfer.
pub fn rsync_excludes(job: &Job) -> Vec<String> {
    job.get_all("chunkFiles").to_vec()
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
    let set = settings(ctx.job)?;
    let prev = previous_manifest(link_dirs, rel).map(|(_, m)| m);
    let size = fs::symlink_metadata(&st).map(|m| m.len()).unwrap_or(0);
    let bar = ctx.log.watch.meter("chunking", Some(size));
    let cb = |n: u64| {
        bar.set(n);
        crate::interrupt::crash_point("chunk-progress");
    };
    let stats = match chunk::chunk_file(&pool, &set, &st, running, rel, prev.as_ref(), Some(&cb)) {
        Ok(s) => s,
        Err(e) if e.to_string().contains("os error 28") => {
            let _ = archive::remove_tree(running);
            let _ = archive::remove_tree(&ctx.job_dir.join(archive::RESUME));
            give_space_back(ctx);
            bail!(
                "{e}: the disk of RootDir {} is full; the incomplete transfer was deleted to give the space back, earlier archives are untouched",
                ctx.job.root_dir().display()
            );
        }
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
        crate::commands::human(stats.logical_size),
        stats.chunks,
        stats.new_chunks,
        crate::commands::human(stats.added_bytes)
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
    crate::run::create_private_dir(&staging)?;
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
    for p in job.get_all("Exclude") {
        args.opt(format!("--exclude={p}"));
    }
    args.opt("--include=*/");
    for p in job.get_all("chunkFiles") {
        args.opt(format!("--include={p}"));
    }
    args.opt("--exclude=*");
    args.from(source, &job.sources()).to(format!("{}/", staging.display()));
    ctx.log.phase(Phase::Copying { what: "the files to chunk".into(), n: 2, of: 2 });
    let res = rsync::run(job, &args, &ctx.log, &ctx.log.watch)?;
    check_rsync(ctx, &res, "the transfer of the chunked files", summary)?;
    let mut totals = ChunkTotals::default();
    let files = walk_files(&staging)?;
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

/// Every regular file under a directory.
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(|| format!("cannot read {}", d.display())),
        };
        for e in rd {
            let e = e.ctx(|| format!("cannot read {}", d.display()))?;
            let ft = e.file_type().ctx(|| format!("cannot stat {}", e.path().display()))?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// RootDir is full: give back what this run's chunked files took. Staging copies of files the
/// newest archive does not hold (new files, only partly transferred) are deleted, the others
/// stay as the delta basis; pool chunks that no archive links are swept. Best effort.
pub fn give_space_back(ctx: &Ctx) {
    let staging = ctx.job_dir.join(STAGING);
    if staging.is_dir() {
        let newest = archive::newest_valid(&ctx.job_dir).ok().flatten().map(|a| a.path);
        for f in walk_files(&staging).unwrap_or_default() {
            let rel = f.strip_prefix(&staging).unwrap_or(&f);
            let kept = newest.as_ref().is_some_and(|a| chunk::recorded_manifest(a, rel).is_some());
            if !kept {
                ctx.log.info(format!("disk full: deleting the partial staging copy of {}", rel.display()));
                let _ = fs::remove_file(&f);
            }
        }
    }
    if ctx.job.root_dir().join(chunk::POOL_DIR).is_dir() {
        if let Ok(s) = sweep_pool(&ctx.job.root_dir()) {
            ctx.log.info(s);
        }
    }
}

/// After rotation: remove pool chunks nobody references any more.
pub fn sweep_after_rotation(ctx: &Ctx) -> Result<()> {
    if ctx.job.get_all("chunkFiles").is_empty() && !ctx.job.root_dir().join(chunk::POOL_DIR).exists() {
        return Ok(());
    }
    let s = sweep_pool(&ctx.job.root_dir())?;
    if !s.is_empty() {
        ctx.log.info(s);
    }
    Ok(())
}

/// Remove pool chunks nobody references any more (`--cleanup`, `--delete-job`, after rotation).
pub fn sweep_pool(root: &Path) -> Result<String> {
    if !root.join(chunk::POOL_DIR).is_dir() {
        return Ok(String::new());
    }
    let pool = Pool::open(root)?;
    let s = chunk::sweep(&pool)?;
    Ok(format!(
        "pool sweep: {} chunk(s) no longer used, {} freed",
        s.removed_chunks,
        crate::commands::human(s.freed_bytes)
    ))
}

/// `--unchunk JOB ARCHIVE [--to DIR]`: rebuild every chunked file of an archive as a plain
/// (sparse) file; default target `RootDir/JOB/unchunked/ARCHIVE/`.
pub fn unchunk_command(
    cfg: &Config,
    job: &str,
    archive_name: &str,
    to: Option<&Path>,
    watch: &Watch,
) -> Result<String> {
    let j = cfg.job(job)?;
    let a = archive::find(&j.job_dir(), job, archive_name)?;
    let target = to.map(Path::to_path_buf).unwrap_or_else(|| j.job_dir().join("unchunked").join(archive_name));
    let mut out = String::new();
    let files = chunk::chunked_files(&a.path)?;
    if files.is_empty() {
        return Ok(format!("archive {archive_name} of job {job} has no chunked files\n"));
    }
    for rel in files {
        let mp = chunk::manifest_path(&a.path, &rel);
        let dest = target.join(&rel);
        if let Some(d) = dest.parent() {
            fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
        }
        let m = chunk::read_manifest(&mp)?;
        let bar = watch.meter(format!("unchunk {}", rel.display()), Some(m.size));
        let cb = |n: u64| bar.set(n);
        chunk::unchunk_file(&a.path, &mp, &dest, Some(&cb))?;
        drop(bar);
        out.push_str(&format!("{} ({}), verified\n", dest.display(), crate::commands::human(m.size)));
    }
    Ok(out)
}

/// `--verify JOB [ARCHIVE|--all]`: read every chunk, check hashes, name what is damaged.
/// Damaged chunks are also taken out of the pool, so that the next backup stores them again.
pub fn verify_command(cfg: &Config, job: &str, archive_name: Option<&str>, all: bool, watch: &Watch) -> Result<String> {
    let j = cfg.job(job)?;
    let archives = if all {
        archive::list(&j.job_dir())?
    } else {
        match archive_name {
            Some(n) => vec![archive::find(&j.job_dir(), job, n)?],
            None => archive::newest_valid(&j.job_dir())?.into_iter().collect(),
        }
    };
    if archives.is_empty() {
        bail!("job {job} has no archive to verify");
    }
    let mut out = String::new();
    let mut bad = Vec::new();
    for a in &archives {
        let bar = watch.meter(format!("verify {}", a.name()), None);
        let cb = |n: u64| bar.set(n);
        let rep = chunk::verify_archive(&a.path, Some(&cb))?;
        drop(bar);
        if rep.is_ok() {
            out.push_str(&format!(
                "{}: OK ({} chunked file(s), {} chunk(s) checked)\n",
                a.name(),
                rep.manifests,
                rep.chunks_checked
            ));
            continue;
        }
        bad.push(a.name());
        for p in &rep.problems {
            let files: Vec<String> = p.files.iter().map(|f| f.display().to_string()).collect();
            out.push_str(&format!("{}: chunk {} {:?}; affects {}\n", a.name(), p.id, p.kind, files.join(", ")));
        }
        for (m, e) in &rep.bad_manifests {
            out.push_str(&format!("{}: manifest {} unreadable: {e}\n", a.name(), m.display()));
        }
        // A damaged pool entry must not be reused by the next backup as if it were good (a
        // chunk listed at the same index by the previous manifest gets only a cheap check):
        // take it out of the pool, so that the next backup of that data stores it afresh.
        if !rep.problems.is_empty() && j.root_dir().join(chunk::POOL_DIR).is_dir() {
            let n = chunk::evict_damaged(&Pool::open(&j.root_dir())?, &rep)?;
            if n > 0 {
                out.push_str(&format!(
                    "{}: {n} damaged chunk(s) removed from the pool; the next backup stores that data again\n",
                    a.name()
                ));
            }
        }
    }
    if !bad.is_empty() {
        print!("{out}");
        bail!("verify of job {job} found damage in: {}", bad.join(", "));
    }
    Ok(out)
}
