//! Restore of an ordinary job: rsync the archive's source paths back to the host over the job's
//! ssh (or locally for remoteHostName=localhost); chunked files written in place by affa-agent on
//! the host (only the chunks the existing file lacks are sent), or, where there is no agent,
//! rebuilt locally and sent with rsync's delta transfer; then every restored file checked
//! against the archive.
//!
//! Owns: the rsync command lines of a host restore. Must never: send affa's own files (the
//! reserved names at the archive root, the manifests its index lists), take a source's own
//! `*.affa-manifest` file for a manifest (it is restored as the file it is), delete outside the
//! restored source paths, let `--delete` remove a file that is about to be rebuilt from
//! chunks (those are protected in the main pass), name a file by anything but its archived
//! bytes (a name need not be UTF-8: a lossy rendering would protect, exclude, write or check
//! another file), or read through a symlink in the archive (every directory on the way to a
//! source path or a manifest is checked to be a real one: rsync and the check's walk would
//! follow a link to the backup server's own files).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::{
    check_remote, rebuild_all, report_check, run_rsync, send_through_agent, sha256_file, target_agent, verify_all,
    Chunked, Ctx, Endpoint, Expect, Plan, Staging,
};
use crate::chunk::{self, MANIFEST_SUFFIX};
use crate::error::{IoContext, Result};
use crate::transport::rsync;
use crate::transport::SshTarget;

pub(super) fn restore(ctx: &Ctx, out: &mut dyn Write) -> Result<()> {
    let job = ctx.job;
    let arch = &ctx.arch;
    let ep = if job.local { Endpoint::Local } else { Endpoint::Ssh(SshTarget::from_job(job, ctx.cfg)) };
    let (sources, missing) = archived_sources(ctx)?;
    if sources.is_empty() {
        bail!(
            "archive {} of job {} holds none of the job's source paths ({})",
            arch.name(),
            job.name,
            missing.join(", ")
        );
    }
    // Chunked files under the restored paths.
    let staging = Staging::new(job)?;
    // Only the files the archive's index lists are chunked: a source file named
    // `x.affa-manifest` is an ordinary file and is restored as one.
    let mut chunked = Vec::new();
    for rel in chunk::chunked_files(&arch.path)? {
        let m = chunk::manifest_path(&arch.path, &rel);
        // The name's bytes as archived (not necessarily UTF-8) all the way to the target.
        let abs = Path::new("/").join(&rel);
        if !sources.iter().any(|s| under(&abs, s)) {
            continue;
        }
        // Its manifest is read through the directories on the way: real ones only.
        let mut mrel = rel.clone().into_os_string();
        mrel.push(MANIFEST_SUFFIX);
        beneath_archive(ctx, &abs, Path::new(&mrel))?;
        let man = chunk::read_manifest(&m)?;
        chunked.push(Chunked { manifest: m, local: staging.dir.join(&rel), remote: abs, size: man.size });
    }

    let date = arch.report.as_ref().and_then(|r| r.date()).map(crate::fmt::show_date).unwrap_or_default();
    let _ = writeln!(out, "Restore of job {} from archive {} ({date}) to {}:", job.name, arch.name(), ep.describe());
    for s in &sources {
        let _ = writeln!(out, "  {s}");
    }
    for s in &missing {
        let _ = writeln!(out, "  {s} (not in the archive: skipped)");
    }
    let _ = writeln!(
        out,
        "options: --preserve-newer={} --delete={}",
        if ctx.opts.preserve_newer { "yes" } else { "no" },
        if ctx.opts.delete { "yes" } else { "no" }
    );
    if let Endpoint::Ssh(t) = &ep {
        t.check_connection()?;
    }

    // What would change: rsync's own dry run of the real command.
    let main = main_args(ctx, &ep, &sources, &chunked);
    let mut dry = main.clone();
    dry.opts(["--dry-run", "--out-format=%i %n"]);
    let res = run_rsync(ctx, job, &dry, "listing what the restore changes", false)?;
    let mut plan = Plan::default();
    plan.add_itemized(&res.stdout, "/");
    let _ = writeln!(out, "changes on {}:", ep.describe());
    let _ = plan.show(out);
    if !chunked.is_empty() {
        let how = if job.local || job.chunk.transport == crate::config::typed::ChunkTransport::Rsync {
            "rebuilt from chunks and written with rsync's delta transfer"
        } else {
            "written in place by affa-agent on the host, only the chunks it lacks sent (where it cannot run: rebuilt from chunks and written with rsync's delta transfer)"
        };
        let _ = writeln!(out, "  {how} ({}):", chunked.len());
        for c in &chunked {
            let _ = writeln!(out, "    {} ({} bytes)", c.remote.display(), c.size);
        }
    }
    if ctx.opts.dry_run {
        let _ = writeln!(out, "dry run: nothing was changed");
        return Ok(());
    }
    let _ = out.flush();
    crate::observer::confirm(
        &ctx.opts.watch,
        &format!(
            "This overwrites {} file(s){} on {} with the contents of archive {}",
            plan.overwrite.len() + chunked.len(),
            if plan.delete.is_empty() { String::new() } else { format!(" and DELETES {}", plan.delete.len()) },
            ep.describe(),
            arch.name()
        ),
        "proceed",
        ctx.opts.yes,
    )?;

    // Every chunk of every chunked file is verified before anything is written to the host:
    // by the agent path without a local copy, by the staging path while it rebuilds the file.
    let agent = target_agent(ctx, &ep, None, &chunked, out)?;
    // Chunked files the agent restored (checked by it as written), and of them the ones newer
    // on the target that it kept (--preserve-newer); None: the staging path.
    let mut through_agent: Option<Vec<String>> = None;
    match agent {
        Some(session) => {
            verify_all(ctx, &chunked, out)?;
            ctx.log.info(format!("restoring {} to {}", arch.name(), ep.describe()));
            // The plain files first: they create the directories the agent writes into.
            run_rsync(ctx, job, &main, "the restore", true)?;
            let (sent, kept) = send_through_agent(ctx, session, &chunked, ctx.opts.preserve_newer)?;
            let total: u64 = chunked.iter().map(|c| c.size).sum();
            let _ = writeln!(
                out,
                "chunked files: {} file(s), {total} bytes, restored through affa-agent: {sent} bytes of chunks sent; each checked by the agent as written (whole-file BLAKE3)",
                chunked.len()
            );
            through_agent = Some(kept);
        }
        None => {
            rebuild_all(ctx, &chunked)?;
            ctx.log.info(format!("restoring {} to {}", arch.name(), ep.describe()));
            run_rsync(ctx, job, &main, "the restore", true)?;
            for c in &chunked {
                let mut a = rsync::Args::new(job, &ep.source());
                a.opts(["--inplace", "--no-whole-file", "--sparse", "--ignore-times"]);
                if ctx.opts.preserve_newer {
                    a.opt("--update");
                }
                a.from_local([&c.local]).to(ep.dest(&c.remote));
                run_rsync(ctx, job, &a, &format!("sending {}", c.remote.display()), true)?;
            }
        }
    }
    let _ = writeln!(out, "restored {} to {}", arch.name(), ep.describe());

    // Check every restored file against the archive (those the agent wrote, it checked).
    let expect = expected_files(ctx, &sources, if through_agent.is_some() { &[] } else { &chunked })?;
    let mut checked = check_remote(&ep, &expect, ctx.opts.preserve_newer)?;
    if let Some(kept) = through_agent {
        checked.ok += chunked.len() - kept.len();
        checked.kept_newer.extend(kept);
    }
    report_check(ctx, &checked, out)
}

/// Is `path` the source `src` or inside it? (Compared as bytes: `path` need not be UTF-8.)
fn under(path: &Path, src: &str) -> bool {
    let (p, s) = (path.as_os_str().as_bytes(), src.trim_end_matches('/').as_bytes());
    s.is_empty() || p == s || p.strip_prefix(s).is_some_and(|r| r.starts_with(b"/"))
}

/// The source paths the archive was made from (its `.JOB-setup.ini`, else the job's current
/// ones), split into those present in the archive and those missing. A source below an entry
/// of the archive that is not a real directory (a symlink the host backed up: `data ->
/// /root`) is refused: rsync, given `ARCHIVE/./data/x`, and the check's walk would follow it
/// and read the backup server's own files.
fn archived_sources(ctx: &Ctx) -> Result<(Vec<String>, Vec<String>)> {
    let setup = ctx.arch.path.join(format!(".{}-setup.ini", ctx.job.name));
    let text = crate::untrusted::open_regular(&setup).and_then(|f| {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, 1 << 20), &mut t).map(|_| t)
    });
    let mut srcs: Vec<String> = text
        .map(|t| {
            t.lines()
                .filter_map(|l| l.trim().strip_prefix("Include="))
                .map(|v| v.trim().to_string())
                .filter(|v| v.starts_with('/'))
                .collect()
        })
        .unwrap_or_default();
    if srcs.is_empty() {
        srcs = ctx.job.sources.clone();
    }
    let mut have = Vec::new();
    let mut missing = Vec::new();
    for s in srcs {
        // No '/' at either end: `lstat("data/")` would follow a symlink `data` (Include is free
        // text, `Include=/data/` is common), and so would rsync's source `ARCHIVE/./data/`.
        // Nor a '.' or empty part anywhere (`/data/x/.` would follow `x` the same way).
        let parts: Vec<&str> = s.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        let s = format!("/{}", parts.join("/"));
        let rel = s.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            missing.push(s);
            continue;
        }
        if beneath_archive(ctx, &s, Path::new(rel))?.is_some() {
            have.push(s);
        } else {
            missing.push(s);
        }
    }
    Ok((have, missing))
}

/// `lstat` of `rel` in the archive, every directory on the way checked to be a real one (never
/// followed); an error naming `what` (the path on the target) otherwise.
fn beneath_archive(ctx: &Ctx, what: impl AsRef<Path>, rel: &Path) -> Result<Option<fs::Metadata>> {
    crate::untrusted::lstat_beneath(&ctx.arch.path, rel).map_err(|e| {
        e.context(format!(
            "archive {} of job {}: {} cannot be restored, nothing was changed",
            ctx.arch.name(),
            ctx.job.name,
            what.as_ref().display()
        ))
    })
}

/// The main rsync: the archive's source paths to `/` on the target, `--relative`.
fn main_args(ctx: &Ctx, ep: &Endpoint, sources: &[String], chunked: &[Chunked]) -> rsync::Args {
    let job = ctx.job;
    let mut a = rsync::Args::new(job, &ep.source());
    a.opt("--relative");
    // Every file is compared by content (`--checksum`), not by size and time: a file changed on
    // the target with its size and time kept (damage, or a program that keeps the time) is
    // restored too (the quick check skipped it, and the check after the restore found it
    // differing). Not `--ignore-times`: the dry run that shows what will be overwritten uses
    // these arguments, and would list every file.
    a.opt("--checksum");
    for c in chunked {
        // --delete must not remove what the chunk pass writes next; the manifest is affa's.
        // rsync matches the rules against the names' bytes: they are given as bytes.
        let mut manifest = c.remote.clone().into_os_string();
        manifest.push(MANIFEST_SUFFIX);
        a.opt(rule("--filter=P ", &c.remote));
        a.opt(rule("--exclude=", &manifest));
    }
    a.opts(crate::archive::reserved_excludes(&job.name));
    if ctx.opts.preserve_newer {
        a.opt("--update");
    }
    if ctx.opts.delete {
        a.opt("--delete");
    }
    a.from_local(sources.iter().map(|s| format!("{}/./{}", ctx.arch.path.display(), s.trim_start_matches('/'))));
    a.to(ep.dest("/"));
    a
}

/// The rsync option `opt` followed by a pattern that matches the path `p` (its bytes) only.
fn rule(opt: &str, p: impl AsRef<OsStr>) -> OsString {
    let mut r = opt.as_bytes().to_vec();
    r.extend(rsync_literal(p.as_ref().as_bytes()));
    OsString::from_vec(r)
}

/// Escape rsync's wildcard characters so a path matches only itself. rsync reads a backslash as
/// an escape only in a pattern that holds a wildcard (`*?[`): a backslash of the name becomes
/// the class `[\\]`, which is one, so the other escapes count whatever the name holds.
fn rsync_literal(p: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(p.len());
    for &c in p {
        match c {
            b'*' | b'?' | b'[' => s.extend_from_slice(&[b'\\', c]),
            b'\\' => s.extend_from_slice(b"[\\\\]"),
            _ => s.push(c),
        }
    }
    s
}

/// Every regular file restored, with the hash of its archived bytes.
fn expected_files(ctx: &Ctx, sources: &[String], chunked: &[Chunked]) -> Result<Vec<Expect>> {
    let root = &ctx.arch.path;
    let mut files: Vec<(PathBuf, PathBuf, i64)> = Vec::new();
    let mut total = 0u64;
    let manifests: std::collections::HashSet<PathBuf> = chunk::list_manifests(root)?.into_iter().collect();
    let reserved = crate::archive::reserved_names(&ctx.job.name);
    for s in sources {
        // Every directory on the way to a source was checked to be a real one (archived_sources);
        // below it, the walk follows no link.
        let start = root.join(s.trim_start_matches('/'));
        walk(root, &start, &mut files, &mut total, &(&manifests, &reserved))?;
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    files.dedup_by(|a, b| a.1 == b.1);
    total += chunked.iter().map(|c| c.size).sum::<u64>();
    let bar = ctx.opts.watch.meter("hashing the archive", Some(total));
    let mut out = Vec::new();
    for (local, remote, mtime) in files {
        let (sha256, size) = sha256_file(&local, Some(&bar))?;
        out.push(Expect { remote, size, sha256, mtime });
    }
    for c in chunked {
        let (sha256, size) = sha256_file(&c.local, Some(&bar))?;
        let mtime = chunk::read_manifest(&c.manifest)?.mtime.0;
        out.push(Expect { remote: c.remote.clone(), size, sha256, mtime });
    }
    drop(bar);
    Ok(out)
}

/// affa's own files of an archive: its recorded manifests, its reserved root names.
type Own<'a> = (&'a std::collections::HashSet<PathBuf>, &'a Vec<String>);

fn walk(root: &Path, p: &Path, out: &mut Vec<(PathBuf, PathBuf, i64)>, total: &mut u64, own: &Own) -> Result<()> {
    let md = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    // Names as bytes: a file whose name is not UTF-8 is checked under that very name.
    let rel = p.strip_prefix(root).unwrap_or(p);
    let at_root = rel.components().count() == 1;
    if own.0.contains(p) || (at_root && own.1.iter().any(|n| rel.as_os_str() == OsStr::new(n))) {
        return Ok(());
    }
    if md.is_dir() {
        for e in fs::read_dir(p).ctx(|| format!("cannot read {}", p.display()))? {
            let e = e.ctx(|| format!("cannot read {}", p.display()))?;
            walk(root, &e.path(), out, total, own)?;
        }
    } else if md.is_file() {
        *total += md.len();
        out.push((p.to_path_buf(), Path::new("/").join(rel), super::mtime_of(&md)));
    }
    Ok(())
}
