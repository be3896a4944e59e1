//! Maintenance of a job's chunked archives: `--unchunk` (a chunked file rebuilt as a plain
//! file), `--verify` (every chunk read and checked) and the pool sweep.
//!
//! Owns: these commands' results. Must never: change an archive (verify only evicts damaged
//! chunks from the pool, so that the next backup stores them again), print or read stdin.

use std::fs;
use std::path::Path;

use crate::archive;
use crate::chunk::{self, Pool};
use crate::config::Config;
use crate::error::{IoContext, Result};
use crate::fmt::human;
use crate::observer::Watch;

/// What `--verify` found: its report lines, and the archives with damage (empty: all good).
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub text: String,
    pub damaged: Vec<String>,
}

/// Remove pool chunks nobody references any more (`--cleanup`, `--delete-job`, after rotation).
pub fn sweep_pool(root: &Path) -> Result<String> {
    if !root.join(chunk::POOL_DIR).is_dir() {
        return Ok(String::new());
    }
    let pool = Pool::open(root)?;
    Ok(swept(&chunk::sweep(&pool)?))
}

fn swept(s: &chunk::SweepStats) -> String {
    format!("pool sweep: {} chunk(s) no longer used, {} freed", s.removed_chunks, human(s.freed_bytes))
}

/// After a run deleted archives: remove the pool entries of `ids` (the chunks they linked) that
/// nothing references any more, and stale temp files; the rest of the pool is not read.
pub fn sweep_pool_of(root: &Path, ids: &[chunk::ChunkId]) -> Result<String> {
    if !root.join(chunk::POOL_DIR).is_dir() {
        return Ok(String::new());
    }
    let s = chunk::sweep_some(&Pool::open(root)?, ids)?;
    if s.removed_chunks == 0 && ids.is_empty() {
        return Ok(String::new());
    }
    Ok(swept(&s))
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
    // Its AutomountDevice, mounted for the command's time.
    let _disk = crate::automount::mount_for_command(j, &cfg.lock_dir())?;
    let a = archive::find(&j.job_dir(), job, archive_name)?;
    let target = to.map(Path::to_path_buf).unwrap_or_else(|| j.job_dir().join("unchunked").join(archive_name));
    let mut out = String::new();
    let files = chunk::chunked_files(&a.path)?;
    if files.is_empty() {
        return Ok(format!("archive {archive_name} of job {job} has no chunked files\n"));
    }
    match to {
        // A directory affa makes, root's and private (mode 0700): nobody else can have put or
        // swap anything below it (a directory others can write, such as one in /tmp, could be
        // changed between affa's look and its write). An existing one is refused, as by
        // `--unchunk --from-offsite`.
        Some(dir) => {
            use std::os::unix::fs::DirBuilderExt;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
            }
            fs::DirBuilder::new().mode(0o700).create(dir).map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    "it exists already; expected a new directory (affa makes it, mode 0700)".to_string()
                } else {
                    e.to_string()
                };
                crate::error::Error::new(format!("--unchunk --to {}: {why}", dir.display()))
            })?;
        }
        None => fs::create_dir_all(&target).ctx(|| format!("cannot create {}", target.display()))?,
    }
    let done = unchunk_into(&a.path, &target, files, watch, &mut out);
    if done.is_err() && to.is_some() {
        // The directory affa made for this command: a failed one leaves nothing behind (and
        // the same --to can be given again).
        let _ = archive::remove_tree(&target);
    }
    done.map(|()| out)
}

/// The chunked files `files` of the archive at `archive` rebuilt below `target`; one line each
/// into `out`.
fn unchunk_into(
    archive: &Path,
    target: &Path,
    files: Vec<std::path::PathBuf>,
    watch: &Watch,
    out: &mut String,
) -> Result<()> {
    for rel in files {
        let mp = chunk::manifest_path(archive, &rel);
        let dest = target.join(&rel);
        // Below the target every directory is a real one: a symlink is refused, never followed
        // (the file would be written as root wherever it points).
        crate::untrusted::create_dir_beneath(target, rel.parent().unwrap_or(Path::new("")))?;
        let m = chunk::read_manifest(&mp)?;
        let bar = watch.meter(format!("unchunk {}", rel.display()), Some(m.size));
        let cb = |n: u64| bar.set(n);
        // A host's set-uid, set-gid or sticky bit is not given to a file made on the backup
        // server (a set-uid root program a local user could run).
        chunk::unchunk_file_without_set_id(archive, &mp, &dest, Some(&cb))?;
        drop(bar);
        let note = if m.mode & 0o7000 != 0 { ", set-id and sticky bits left out" } else { "" };
        out.push_str(&format!("{} ({}), verified{note}\n", dest.display(), human(m.size)));
    }
    Ok(())
}

/// `--verify JOB [ARCHIVE|--all]`: read every chunk, check hashes, name what is damaged.
/// Damaged chunks are also taken out of the pool, so that the next backup stores them again.
pub fn verify_command(
    cfg: &Config,
    job: &str,
    archive_name: Option<&str>,
    all: bool,
    watch: &Watch,
) -> Result<Verified> {
    let j = cfg.job(job)?;
    let _disk = crate::automount::mount_for_command(j, &cfg.lock_dir())?;
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
    Ok(Verified { text: out, damaged: bad })
}

/// What `--scrub` found: its report lines, how many damaged pool entries it met, and one line per
/// pool it could not scrub (the others are scrubbed all the same).
#[derive(Debug, Clone, Default)]
pub struct Scrubbed {
    pub text: String,
    pub damaged: u64,
    pub failed: Vec<String>,
}

/// `--scrub [--all]`: read back, decode and hash today's slice of every chunk pool (the pools
/// of the RootDirs of every job; `all`, or scrubDays=0: every entry), so that each stored chunk
/// is checked once in scrubDays days, whether or not a backup still reuses it. A damaged entry
/// leaves the pool (the next backup of that data stores it again) and the archives that link
/// it are named; archives are never changed. Backups do not scrub (docs/FORMAT.md, "damage rule").
pub fn scrub_command(cfg: &Config, all: bool, clock: &dyn crate::clock::Clock, watch: &Watch) -> Result<Scrubbed> {
    use chrono::Datelike;
    use std::os::unix::fs::MetadataExt;
    let days = cfg.settings.scrub_days;
    let day = clock.now().date().num_days_from_ce().max(0) as u64;
    let slice = if all || days == 0 { chunk::Slice::All } else { chunk::Slice::Day { day, days } };
    let mut roots: Vec<std::path::PathBuf> = cfg.jobs.values().map(|j| j.root_dir()).collect();
    roots.sort();
    roots.dedup();
    let mut out = Scrubbed::default();
    for root in roots {
        // A RootDir on a job's AutomountDevice: the disk mounted for the scrub of its pool.
        let auto = cfg.jobs.values().find(|j| j.automount.as_ref().is_some_and(|a| root.starts_with(&a.point)));
        // A disk that is away (several disks used in turn) is scrubbed when it is back.
        if let Some(a) = auto.and_then(|j| j.automount.as_ref()) {
            if !crate::automount::is_connected(&a.device) && !crate::automount::is_mounted(&a.device, &a.point) {
                out.text.push_str(&format!(
                    "pool of {}: not scrubbed, its AutomountDevice {} is not connected\n",
                    root.display(),
                    a.device
                ));
                continue;
            }
        }
        let _disk = match auto.map(|j| crate::automount::mount_for_command(j, &cfg.lock_dir())) {
            Some(Err(e)) => {
                out.failed.push(format!("cannot scrub the pool of {}: {e}", root.display()));
                continue;
            }
            Some(Ok(d)) => d,
            None => None,
        };
        if !root.join(chunk::POOL_DIR).is_dir() {
            continue;
        }
        // One pool that cannot be read (a RootDir's disk gone, EIO on its directory) does not
        // stop the scrub of the others.
        let pool = match Pool::open(&root) {
            Ok(p) => p,
            Err(e) => {
                out.failed.push(format!("cannot scrub the pool of {}: {e}", root.display()));
                continue;
            }
        };
        let bar = watch.meter(format!("scrub {}", pool.dir().display()), None);
        let cb = |n: u64| bar.set(n);
        let rep = chunk::scrub(&pool, slice, Some(&cb));
        drop(bar);
        let rep = match rep {
            Ok(r) => r,
            Err(e) => {
                out.failed.push(format!("cannot scrub the pool {}: {e}", pool.dir().display()));
                continue;
            }
        };
        let which = match slice {
            chunk::Slice::All => "every entry".to_string(),
            chunk::Slice::Day { day, days } => format!("slice {} of {days}", day % days + 1),
        };
        out.text.push_str(&format!(
            "pool {} ({which}): {} chunk(s) checked, {} read, {} damaged\n",
            pool.dir().display(),
            rep.checked,
            human(rep.bytes_read),
            rep.damaged.len()
        ));
        for d in &rep.damaged {
            out.damaged += 1;
            // The archives of this RootDir that link the damaged inode.
            let hex = chunk::id_hex(&d.id);
            let mut linked = Vec::new();
            for j in cfg.jobs.values().filter(|j| j.root_dir() == root) {
                for a in archive::list(&j.job_dir()).unwrap_or_default() {
                    let l = a.path.join(chunk::ARCHIVE_CHUNK_DIR).join(&hex[..2]).join(&hex);
                    if fs::symlink_metadata(&l).is_ok_and(|m| m.ino() == d.ino && m.dev() == d.dev) {
                        linked.push(format!("{}/{}", j.name, a.name()));
                    }
                }
            }
            out.text.push_str(&format!(
                "chunk {hex} {}: {}; {}\n",
                d.reason,
                if d.removed {
                    "removed from the pool, the next backup of that data stores it again"
                } else {
                    "left in the pool (replaced meanwhile, or it could not be removed)"
                },
                if linked.is_empty() {
                    "no archive links it".to_string()
                } else {
                    format!("damaged in {} (affa --verify JOB ARCHIVE names the files)", linked.join(", "))
                }
            ));
        }
    }
    if out.text.is_empty() && out.failed.is_empty() {
        out.text.push_str("no chunk pool to scrub\n");
    }
    Ok(out)
}
