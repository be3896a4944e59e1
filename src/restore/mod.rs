//! Restore (`--full-restore`): put an archive back on its host (ordinary jobs, `host.rs`) or an
//! ESXi VM back on a host (`esxi.rs`). This file holds what both share: choosing the archive,
//! the target endpoint (ssh or local), how chunked files reach the target (through affa-agent
//! on the target, which writes each file in place and receives only the chunks it lacks; or,
//! with `chunkTransport=rsync`, a local target, or where the agent cannot run, rebuilt in a local
//! staging dir and sent with rsync's delta transfer), the plan shown before `proceed`, and the
//! check of the restored files against the archive.
//!
//! Owns: every change a restore makes on a target host. Must never: write anything to a target
//! before the user typed `proceed` (or gave `--yes`) and before every chunk of every chunked
//! file was verified locally (a damaged chunk stops the restore with the target untouched);
//! modify an archive or the chunk pool; follow a link or open a fifo or device where it reads an
//! archived file (its hash, a manifest); call a restore good whose files do not match the
//! archive.

mod esxi;
mod host;
mod vmrefs;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::archive::{self, Archive};
use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};
use crate::joblog::JobLog;
use crate::transport::rsync::{self, Outcome, Source};
use crate::transport::{die_with_parent, shell_quote_bytes, SshTarget};

/// Options of `--full-restore`.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Archive name (`scheduled.0`, `daily.3`); None = the newest valid archive.
    pub archive: Option<String>,
    /// `--preserve-newer=yes|no` (default yes): do not overwrite files newer on the target.
    pub preserve_newer: bool,
    /// `--delete=yes|no` (default no): delete files on the target that are not in the archive.
    pub delete: bool,
    /// ESXi: restore into another directory on the datastore.
    pub to_dir: Option<String>,
    /// ESXi: restore onto another datastore.
    pub to_datastore: Option<String>,
    /// ESXi: another host (a host name, or the name of another job whose host settings to use).
    pub to_host: Option<String>,
    pub to_user: Option<String>,
    pub to_password_file: Option<std::path::PathBuf>,
    pub to_thumbprint: Option<String>,
    pub to_ssh_port: Option<u16>,
    /// ESXi: register the restored .vmx under this name.
    pub register: Option<String>,
    pub dry_run: bool,
    /// `--from-offsite`: restore the job's offsite archive (by Date or name) straight from its
    /// bucket: plain files staged, chunks read from the bucket (`offsite::fetch`).
    pub from_offsite: bool,
    pub yes: bool,
    /// Who watches: progress, and the question before anything is written.
    pub watch: crate::observer::Watch,
}

/// `affa --full-restore JOB [ARCHIVE] [options]`
pub fn full_restore(cfg: &Config, job_name: &str, opts: &RestoreOptions, out: &mut dyn Write) -> Result<()> {
    let job = cfg.job(job_name)?;
    if job.rsyncd.is_some() {
        bail!(
            "job {job_name} pulls from an rsync daemon (rsyncdMode=yes), which affa does not write to; copy the files from {} (or share them with SambaShare=yes)",
            job.job_dir().join("ARCHIVE").display()
        );
    }
    if !job.esxi() {
        for (set, name) in [
            (opts.to_dir.is_some(), "--to-dir"),
            (opts.to_datastore.is_some(), "--to-datastore"),
            (opts.to_host.is_some(), "--to-host"),
            (opts.register.is_some(), "--register"),
            (opts.to_user.is_some(), "--to-user"),
            (opts.to_password_file.is_some(), "--to-password-file"),
            (opts.to_thumbprint.is_some(), "--to-thumbprint"),
            (opts.to_ssh_port.is_some(), "--to-ssh-port"),
        ] {
            if set {
                bail!("{name} is for ESXi jobs; job {job_name} is not one (ESXi=no)");
            }
        }
    }
    // A restore and a run of the same job must not overlap (the run would archive a half-restored
    // host, or rotate the archive away under us).
    let _lock = crate::lock::acquire(&cfg.lock_dir(), job_name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    // Its AutomountDevice, mounted for the restore (also from the bucket: the staging directory
    // is in the job's directory); a run of another job ending meanwhile leaves it mounted.
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir())?;
    // From the bucket: the plain files staged (removed when `fetched` is dropped), the chunks
    // read from the bucket through `source`.
    let fetched = if opts.from_offsite {
        Some(crate::offsite::fetch::fetch(job, opts.archive.as_deref(), &opts.watch)?)
    } else {
        None
    };
    let (arch, source, from) = match &fetched {
        Some(f) => (
            f.archive.clone(),
            Some(&f.chunks as &dyn crate::chunk::ChunkSource),
            format!("offsite archive {} (Date {}) in {}", f.archive.name(), f.date, f.shown),
        ),
        None => {
            let a = choose_archive(job, opts.archive.as_deref())?;
            let from = a.name();
            (a, None, from)
        }
    };
    let log = JobLog::new(&cfg.log_dir(), job_name, crate::observer::Watch::nobody());
    let ctx = Ctx { cfg, job, arch, opts, log, source, fetched: fetched.as_ref() };
    ctx.log.info(format!("Restore of job {} from {from} started", job.name));
    if fetched.is_some() {
        let _ = writeln!(
            out,
            "Reading {from}: its plain files staged here, the chunks of its chunked files read from the bucket"
        );
    }
    let res = if job.esxi() { esxi::restore(&ctx, out) } else { host::restore(&ctx, out) };
    match &res {
        Ok(()) => ctx.log.info(format!("Restore of job {} from {from} finished", job.name)),
        Err(e) => ctx.log.error(format!("restore of job {} from {from}: {e}", job.name)),
    }
    res
}

/// Everything a restore step needs.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a Config,
    pub job: &'a Job,
    pub arch: Archive,
    pub opts: &'a RestoreOptions,
    pub log: JobLog,
    /// Where the chunks of the chunked files are read (None: the archive's `.affa-chunks/`).
    pub source: Option<&'a dyn crate::chunk::ChunkSource>,
    /// A restore from the bucket: its staging and chunk source (`source` is its chunks).
    pub fetched: Option<&'a crate::offsite::fetch::Fetched>,
}

impl Ctx<'_> {
    /// The source of the chunked files' chunks.
    fn chunks(&self) -> crate::chunk::ArchiveChunks<'_> {
        crate::chunk::ArchiveChunks(&self.arch.path)
    }
}

/// The named archive (it must exist and be complete), or the newest valid one.
fn choose_archive(job: &Job, name: Option<&str>) -> Result<Archive> {
    let dir = job.job_dir();
    match name {
        Some(n) => {
            let a = archive::find(&dir, &job.name, n)?;
            if !a.valid() {
                bail!("archive {n} of job {} is incomplete (it has no {}); choose a complete one (affa --list-archives {})", job.name, crate::report::REPORT_FILE, job.name);
            }
            Ok(a)
        }
        None => archive::newest_valid(&dir)?.ok_or_else(|| {
            Error::new(format!("job {} has no complete archive in {} to restore from", job.name, dir.display()))
        }),
    }
}

/// Where restored files go: a host over ssh, or this machine (remoteHostName=localhost).
pub(crate) enum Endpoint {
    Ssh(SshTarget),
    Local,
}

impl Endpoint {
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Ssh(t) => t.destination(),
            Endpoint::Local => "localhost".into(),
        }
    }
    pub fn source(&self) -> Source<'_> {
        match self {
            Endpoint::Ssh(t) => Source::Ssh(t),
            Endpoint::Local => Source::Local,
        }
    }
    /// rsync's destination argument for `path` (its bytes as they are: a name need not be
    /// UTF-8).
    pub fn dest(&self, path: impl AsRef<OsStr>) -> OsString {
        match self {
            Endpoint::Ssh(t) => {
                let mut d = OsString::from(format!("{}:", t.destination()));
                d.push(path);
                d
            }
            Endpoint::Local => path.as_ref().to_os_string(),
        }
    }
    /// Run a POSIX sh script on the target (fed on stdin, so its length is not limited by the
    /// command line; bytes: it may quote names that are not UTF-8); returns stdout. A non-zero
    /// exit is an error quoting stderr.
    pub fn sh(&self, script: impl AsRef<[u8]>, what: &str) -> Result<String> {
        let c = match self {
            Endpoint::Ssh(t) => t.remote_command("/bin/sh -s"),
            Endpoint::Local => {
                let mut c = Command::new("/bin/sh");
                c.arg("-s");
                die_with_parent(&mut c);
                c
            }
        };
        // No time limit (a restore is interactive and may hash a large disk for hours; Ctrl-C
        // stops it), but what the host answers is bounded (transport::MAX_CAPTURE).
        let o =
            crate::transport::output_within(c, Some(script.as_ref().to_vec()), std::time::Duration::MAX, what, "none")?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        if let Endpoint::Ssh(t) = self {
            if o.status.code() == Some(255) {
                return Err(t.connection_error(&stderr));
            }
        }
        if !o.status.success() {
            let first = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
            bail!("{what} on {} failed (exit {}): {first}", self.describe(), o.status.code().unwrap_or(-1));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

/// A temp dir for rebuilt chunked files, on the archive's filesystem; removed when dropped.
pub(crate) struct Staging {
    pub dir: PathBuf,
}

/// The name of a restore's staging directory in the job's directory (`PREFIX.PID`).
const STAGING_PREFIX: &str = ".restore-staging.";

impl Staging {
    /// The caller holds the job's lock (`full_restore`): the staging directories earlier
    /// restores of the job left (killed: no drop removed them) are removed first.
    pub fn new(job: &Job) -> Result<Staging> {
        archive::remove_leftover_dirs(&job.job_dir(), STAGING_PREFIX);
        let dir = job.job_dir().join(format!("{STAGING_PREFIX}{}", std::process::id()));
        crate::fsutil::create_private_dir(&dir)?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = archive::remove_tree(&self.dir);
    }
}

/// One chunked file to restore: its manifest, where a rebuilt copy goes locally (staging path)
/// and where it goes on the target (the archived name's bytes: not necessarily UTF-8).
#[derive(Debug, Clone)]
pub(crate) struct Chunked {
    pub manifest: PathBuf,
    pub local: PathBuf,
    pub remote: PathBuf,
    pub size: u64,
}

/// The agent path: check every chunk and the whole-file BLAKE3 of each chunked file (nothing
/// is written locally) before anything is sent. A damaged or missing chunk stops here, naming
/// chunk and file. (The target is not read back afterwards: the agent checks the whole-file
/// BLAKE3 of the bytes it writes before it renames the file into place, docs/PROTOCOL.md.)
///
/// From the bucket, the chunk files checked here are kept (compressed, not the files rebuilt) in
/// the restore's staging directory until they are sent (`Fetched::keep_checked`): each chunk
/// object is downloaded once.
pub(crate) fn verify_all(ctx: &Ctx, files: &[Chunked], out: &mut dyn Write) -> Result<()> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    if let (Some(f), false) = (ctx.fetched, files.is_empty()) {
        let manifests: Vec<PathBuf> = files.iter().map(|c| c.manifest.clone()).collect();
        ctx.log.info(f.keep_checked(&manifests)?);
    }
    let bar = ctx.opts.watch.meter("checking the chunks", Some(total));
    let mut base = 0u64;
    for f in files {
        let m = crate::chunk::read_manifest(&f.manifest)?;
        let cb = |n: u64| bar.set(base + n);
        let cb: &dyn Fn(u64) = &cb;
        let own = ctx.chunks();
        let src = ctx.source.unwrap_or(&own);
        crate::chunk::stream_file_from(src, &m, &f.manifest, &mut std::io::sink(), Some(cb)).map_err(|e| {
            e.context(format!(
                "restore stopped before anything was sent to the target ({} was not changed)",
                f.remote.display()
            ))
        })?;
        base += f.size;
    }
    if let Some(f) = ctx.fetched {
        let (n, bytes, stopped) = f.kept();
        ctx.log.info(format!("{n} checked chunk(s) kept until they are sent ({} bytes)", bytes));
        if let Some(why) = stopped {
            let w = format!(
                "not every checked chunk could be kept ({why}): the others are downloaded again from the bucket when they are sent, and checked again"
            );
            ctx.log.warn(&w);
            let _ = writeln!(out, "warning: {w}");
        }
    }
    Ok(())
}

/// The affa-agent on the target that restores the chunked files, or None for the staging path:
/// `chunkTransport=rsync`, a local target, no chunked file, or (`auto`) the agent cannot run
/// there (a warning naming the reason and the fix; `chunkTransport=agent` fails instead).
/// `datastore_dir`: for an ESXi target, the datastore the agent is kept on.
pub(crate) fn target_agent(
    ctx: &Ctx,
    ep: &Endpoint,
    datastore_dir: Option<&str>,
    chunked: &[Chunked],
    out: &mut dyn Write,
) -> Result<Option<Box<crate::transport::agent::Session>>> {
    use crate::config::typed::ChunkTransport;
    use crate::transport::agent;
    let Endpoint::Ssh(t) = ep else { return Ok(None) };
    if chunked.is_empty() || ctx.job.chunk.transport == ChunkTransport::Rsync {
        return Ok(None);
    }
    let path = agent::remote_path(ctx.job, datastore_dir);
    // No idle limit: comparing a big existing target may send nothing for a long time, and a
    // restore is interactive (Ctrl-C stops it), as its other remote commands.
    match agent::start(t, &path, &agent::local_binary(ctx.cfg), std::time::Duration::ZERO)? {
        agent::Started::Ready(s) => {
            ctx.log.info(format!("restoring the chunked files through affa-agent {} at {}", s.agent.software, s.label));
            Ok(Some(s))
        }
        agent::Started::Unavailable(u) if ctx.job.chunk.transport == ChunkTransport::Agent => {
            bail!("{u} (chunkTransport=agent)")
        }
        agent::Started::Unavailable(u) => {
            let w = format!("{u}; the chunked files are rebuilt locally and sent with rsync instead");
            ctx.log.warn(&w);
            let _ = writeln!(out, "warning: {w}");
            Ok(None)
        }
    }
}

/// Restore every chunked file through the agent (each written in place on the target, only the
/// chunks it lacks sent, its whole-file hash checked by the agent before the rename). Returns
/// the chunk bytes sent and the targets left as they were because they were newer (`keep_newer`,
/// a host restore's preserve_newer; an ESXi VM is always restored whole).
pub(crate) fn send_through_agent(
    ctx: &Ctx,
    mut session: Box<crate::transport::agent::Session>,
    files: &[Chunked],
    keep_newer: bool,
) -> Result<(u64, Vec<String>)> {
    // From the bucket, every chunk comes from there (no local pool to fall back on).
    let pool = if ctx.source.is_none() { Some(crate::chunk::Pool::open(&ctx.job.root_dir())?) } else { None };
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = ctx.opts.watch.meter("restoring chunked files through affa-agent", Some(total));
    let (mut sent, mut kept, mut base) = (0u64, Vec::new(), 0u64);
    for f in files {
        let rel = f
            .manifest
            .strip_prefix(&ctx.arch.path)
            .ok()
            .and_then(|r| r.as_os_str().as_bytes().strip_suffix(crate::chunk::MANIFEST_SUFFIX.as_bytes()))
            .map(|r| PathBuf::from(OsStr::from_bytes(r)))
            .ok_or_else(|| {
                Error::new(format!("{}: not a manifest of archive {}", f.manifest.display(), ctx.arch.name()))
            })?;
        ctx.log.info(format!("restoring {} through affa-agent", f.remote.display()));
        let cb = |n: u64| bar.set(base + n);
        let opts = crate::chunk::remote::RestoreOptions {
            pool: pool.as_ref(),
            source: ctx.source,
            compare: true,
            keep_newer,
            progress: Some(&cb),
        };
        let r = crate::chunk::remote::restore_file(&mut session.agent, &ctx.arch.path, &rel, &f.remote, &opts);
        let st = match r {
            Ok(st) => st,
            Err(e) => {
                let label = session.label.clone();
                let why = session.stop();
                let why = if why.is_empty() { String::new() } else { format!(" (agent {label}: {why})") };
                return Err(e.context(format!("restoring {}{why}", f.remote.display())));
            }
        };
        base += f.size;
        bar.set(base);
        ctx.log.info(format!(
            "{}: {} of {} chunks sent ({} bytes), {} found in the existing target{}",
            f.remote.display(),
            st.chunks_sent,
            st.chunks - st.zero_chunks,
            st.bytes_sent,
            st.chunks_local,
            if st.skipped { "; the target is newer and was kept" } else { "" }
        ));
        sent += st.bytes_sent;
        if st.skipped {
            kept.push(f.remote.display().to_string());
        }
    }
    session.finish()?;
    Ok((sent, kept))
}

/// Rebuild every chunked file into staging, checking every chunk and the whole-file hash,
/// before anything is sent. A damaged or missing chunk stops here, naming chunk and file.
pub(crate) fn rebuild_all(ctx: &Ctx, files: &[Chunked]) -> Result<()> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = ctx.opts.watch.meter("rebuilding chunked files", Some(total));
    let mut base = 0u64;
    for f in files {
        if let Some(p) = f.local.parent() {
            fs::create_dir_all(p).ctx(|| format!("cannot create {}", p.display()))?;
        }
        ctx.log.info(format!("rebuilding {} from its chunks", f.remote.display()));
        let cb = |n: u64| bar.set(base + n);
        let cb: &dyn Fn(u64) = &cb;
        let own = ctx.chunks();
        let src = ctx.source.unwrap_or(&own);
        crate::chunk::unchunk_file_from(src, &f.manifest, &f.local, Some(cb)).map_err(|e| {
            e.context(format!(
                "restore stopped before anything was sent to the target ({} was not changed)",
                f.remote.display()
            ))
        })?;
        base += f.size;
    }
    Ok(())
}

/// Run rsync for the restore; a failure is an error naming what was being copied.
pub(crate) fn run_rsync(
    ctx: &Ctx,
    job: &Job,
    args: &rsync::Args,
    what: &str,
    progress: bool,
) -> Result<rsync::RsyncResult> {
    let nobody = crate::observer::Watch::nobody();
    let res = rsync::run(job, args, &ctx.log, if progress { &ctx.opts.watch } else { &nobody })?;
    if crate::interrupt::interrupted() {
        bail!(Interrupted, "{what} interrupted; the target may be partly restored: run the restore again");
    }
    match rsync::classify(res.code) {
        Outcome::Success => Ok(res),
        Outcome::Warning(w) => {
            ctx.log.warn(&w);
            Ok(res)
        }
        Outcome::Failure(f) => {
            let detail = res.first_error().map(|e| format!(" ({e})")).unwrap_or_default();
            bail!("{what}: {f}{detail}; the target may be partly restored: run the restore again")
        }
    }
}

/// The lines of an `--itemize-changes` dry run, sorted into what they would do.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub create: Vec<String>,
    pub overwrite: Vec<String>,
    pub delete: Vec<String>,
    pub other: usize,
}

impl Plan {
    /// Parse `%i %n` lines; `prefix` is put before each name (the target dir).
    pub fn add_itemized(&mut self, stdout: &str, prefix: &str) {
        for l in stdout.lines() {
            let l = l.trim_end();
            if let Some(n) = l.strip_prefix("*deleting ") {
                self.delete.push(format!("{prefix}{}", n.trim()));
                continue;
            }
            let Some((code, name)) = l.split_once(' ') else { continue };
            if code.len() < 11 || !code.is_ascii() {
                continue;
            }
            let (kind, ty) = (&code[0..1], &code[1..2]);
            let name = format!("{prefix}{name}");
            if ty == "d" {
                if code.contains('+') {
                    self.create.push(name);
                } else {
                    self.other += 1;
                }
            } else if code[2..].starts_with("+++") {
                self.create.push(name);
            } else if matches!(kind, "<" | ">" | "c" | "h") {
                self.overwrite.push(name);
            } else {
                self.other += 1;
            }
        }
    }

    pub fn show(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let list = |out: &mut dyn Write, title: &str, v: &[String]| -> std::io::Result<()> {
            if v.is_empty() {
                return Ok(());
            }
            writeln!(out, "  {title} ({}):", v.len())?;
            for n in v.iter().take(25) {
                writeln!(out, "    {n}")?;
            }
            if v.len() > 25 {
                writeln!(out, "    ... and {} more", v.len() - 25)?;
            }
            Ok(())
        };
        list(out, "overwrite", &self.overwrite)?;
        list(out, "create", &self.create)?;
        list(out, "DELETE", &self.delete)?;
        if self.other > 0 {
            writeln!(out, "  update attributes only: {} item(s)", self.other)?;
        }
        if self.overwrite.is_empty() && self.create.is_empty() && self.delete.is_empty() && self.other == 0 {
            writeln!(out, "  nothing differs from the archive")?;
        }
        Ok(())
    }
}

/// A restored file to check: where it is on the target (its name's bytes), what it must hold.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    pub remote: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub mtime: i64,
}

/// SHA-256 (hex) and size of a local regular file: an archived file (or one rebuilt from an
/// archive). A symlink, fifo or device in its place is refused, never followed or opened (the
/// archive is the host's: a link could name the backup server's own files, a fifo would block).
pub(crate) fn sha256_file(p: &Path, bar: Option<&crate::observer::Meter>) -> Result<(String, u64)> {
    use sha2::Digest;
    let mut f = crate::untrusted::open_regular(p).ctx(|| format!("cannot open {}", p.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).ctx(|| format!("cannot read {}", p.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
        if let Some(b) = bar {
            b.inc(k as u64);
        }
    }
    Ok((hex(&h.finalize()), n))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Result of checking the restored files on the target.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    pub ok: usize,
    /// Newer on the target and kept there (`--preserve-newer=yes`).
    pub kept_newer: Vec<String>,
    pub bad: Vec<String>,
}

/// Hash every expected file on the target (`sha256sum`, present on Linux and ESXi's busybox)
/// and compare with the archive's bytes.
pub(crate) fn check_remote(ep: &Endpoint, files: &[Expect], preserve_newer: bool) -> Result<Checked> {
    let mut c = Checked::default();
    for part in files.chunks(2000) {
        // The names are quoted as bytes: the script checks the very names the restore wrote.
        let mut script = b"LC_ALL=C; export LC_ALL\n".to_vec();
        for (i, e) in part.iter().enumerate() {
            script.extend_from_slice(b"p=");
            script.extend_from_slice(&shell_quote_bytes(e.remote.as_os_str().as_bytes()));
            script.extend_from_slice(format!(
                "; if [ -f \"$p\" ] && [ ! -L \"$p\" ]; then s=$(stat -c '%s %Y' \"$p\") && h=$(sha256sum < \"$p\") && echo \"{i} $s ${{h%% *}}\" || echo \"{i} unreadable\"; else echo \"{i} missing\"; fi\n"
            ).as_bytes());
        }
        let outp = ep.sh(&script, "checking the restored files")?;
        let mut seen = vec![false; part.len()];
        for l in outp.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            let Some(i) = w.first().and_then(|s| s.parse::<usize>().ok()).filter(|i| *i < part.len()) else { continue };
            seen[i] = true;
            let e = &part[i];
            let name = e.remote.display();
            match w.as_slice() {
                [_, size, mtime, hash] => {
                    let size: u64 = size.parse().unwrap_or(u64::MAX);
                    let mtime: i64 = mtime.parse().unwrap_or(0);
                    if size == e.size && hash.eq_ignore_ascii_case(&e.sha256) {
                        c.ok += 1;
                    } else if preserve_newer && mtime > e.mtime {
                        c.kept_newer.push(name.to_string());
                    } else if size != e.size {
                        c.bad.push(format!("{name}: size {size}, archive {}", e.size));
                    } else {
                        c.bad.push(format!(
                            "{name}: content differs from the archive (SHA-256 {hash}, archive {})",
                            e.sha256
                        ));
                    }
                }
                [_, what] => c.bad.push(format!("{name}: {what}")),
                _ => c.bad.push(format!("{name}: unexpected answer {l:?}")),
            }
        }
        for (i, s) in seen.iter().enumerate() {
            if !s {
                c.bad.push(format!("{}: not checked (no answer)", part[i].remote.display()));
            }
        }
    }
    Ok(c)
}

/// Print the check's result; an error when a file does not match.
pub(crate) fn report_check(ctx: &Ctx, c: &Checked, out: &mut dyn Write) -> Result<()> {
    let _ = writeln!(
        out,
        "verified {} file(s) on the target against the archive: {} match",
        c.ok + c.kept_newer.len() + c.bad.len(),
        c.ok
    );
    if !c.kept_newer.is_empty() {
        let _ = writeln!(out, "{} file(s) newer on the target were kept (--preserve-newer=yes):", c.kept_newer.len());
        for k in c.kept_newer.iter().take(25) {
            let _ = writeln!(out, "  {k}");
        }
    }
    ctx.log.info(format!("verified: {} match, {} kept newer, {} differ", c.ok, c.kept_newer.len(), c.bad.len()));
    if !c.bad.is_empty() {
        for b in &c.bad {
            ctx.log.error(format!("verify: {b}"));
        }
        let more =
            if c.bad.len() > 3 { format!(" (and {} more, see the job log)", c.bad.len() - 3) } else { String::new() };
        bail!(
            "{} restored file(s) do not match the archive: {}{more}",
            c.bad.len(),
            c.bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

/// mtime (seconds) of a local file, without following a symlink.
pub(crate) fn mtime_of(md: &fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of an archived file opens a regular file only: a link (to a backup server's
    /// file) or a fifo in its place is refused by name, never followed or opened.
    #[test]
    fn the_hash_of_an_archived_file_follows_no_link_and_opens_no_fifo() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        fs::write(&secret, b"of the backup server").unwrap();
        let (sha, n) = sha256_file(&secret, None).unwrap();
        assert_eq!((sha.len(), n), (64, 20));
        let link = t.path().join("vm.nvram");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let e = sha256_file(&link, None).unwrap_err().to_string();
        assert!(e.contains(&link.display().to_string()) && e.contains("symlink"), "{e}");
        let fifo = t.path().join("vm.log");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = sha256_file(&fifo, None).unwrap_err().to_string();
        assert!(e.contains(&fifo.display().to_string()) && e.contains("fifo"), "{e}");
    }
}
