//! Samba shares of job archives (`SambaShare=yes`): a read-only share named after the job, of
//! RootDir/JOB, for the users in SambaValidUser; for a job with chunkFiles, of its archives
//! mounted by `affa --mount` at `lockDir/samba-mounts/JOB` (chunked files as plain files), which
//! `--samba-shares` mounts when it is not mounted.
//!
//! Owns: the files under sambaConfDir — one include file per shared job
//! (`affa-job-JOB.conf`) and `affa-shares.conf`, which includes them — and the single
//! `include = SAMBACONFDIR/affa-shares.conf` line in smbConf (added once, never duplicated);
//! then asking Samba to reload (`smbcontrol all reload-config`, `systemctl reload smbd` as a
//! fallback for the system's smb.conf). Must never: change any other line of smbConf, make a
//! share writable, or show the chunk store internals (`.affa-chunks`, manifests, the trash, an
//! interrupted transfer's resume dir) through a share.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{Config, Job};
use crate::error::{IoContext, Result};

pub const SHARES_FILE: &str = "affa-shares.conf";
const JOB_PREFIX: &str = "affa-job-";

fn conf_dir(cfg: &Config) -> PathBuf {
    cfg.settings.samba_conf_dir.clone()
}

fn include_line(cfg: &Config) -> String {
    format!("include = {}", conf_dir(cfg).join(SHARES_FILE).display())
}

/// Are affa's Samba shares in use (a job has SambaShare=yes, or affa wrote shares before)?
pub fn in_use(cfg: &Config) -> bool {
    cfg.jobs.values().chain(cfg.broken.values().map(|b| &b.partial)).any(|j| j.samba_share)
        || conf_dir(cfg).join(SHARES_FILE).exists()
}

/// The share definition of one job.
pub fn share_text(job: &Job) -> String {
    share_at(job, &job.job_dir())
}

/// Where the archives of a job with chunked files are mounted for its share (`affa --mount`):
/// Samba then shows each chunked file as the plain file it was (a VM's `-flat.vmdk`).
pub fn mount_point(cfg: &Config, job: &Job) -> PathBuf {
    cfg.lock_dir().join("samba-mounts").join(&job.name)
}

fn chunked(job: &Job) -> bool {
    !job.chunk.files.is_empty()
}

/// Mount the archives of `job` at `dir` unless an affa mount is there already.
fn ensure_mounted(cfg: &Config, job: &Job, dir: &Path) -> Result<()> {
    // The mount points live in lockDir: checked first (made by affa's user, 0700, not a
    // symlink: lock::open_dir), so no other user can have put a symlink on the way that would
    // send the root-only view, and the share smbd serves as root, somewhere else.
    crate::lock::open_dir(&cfg.lock_dir(), true)?;
    crate::fsutil::create_private_dir(dir.parent().unwrap_or(dir))?;
    detach_dead_mount(dir)?;
    fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    for d in [dir.parent().unwrap_or(dir), dir] {
        let m = fs::symlink_metadata(d).ctx(|| format!("cannot stat {}", d.display()))?;
        if !m.is_dir() {
            bail!(
                "{} is not a directory (a symbolic link?): not mounting the archives of job {} there",
                d.display(),
                job.name
            );
        }
    }
    // /proc/self/mounts names the resolved path (lockDir may be below a symlink, /var/lock).
    let real = fs::canonicalize(dir).ctx(|| format!("cannot resolve {}", dir.display()))?;
    if crate::mount::affa_mounts().iter().any(|m| m == dir || *m == real) {
        return Ok(());
    }
    let exe = std::env::current_exe().ctx(|| "cannot find affa itself".to_string())?;
    let args: Vec<std::ffi::OsString> = vec![
        "--config-dir".into(),
        fs::canonicalize(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone()).into(),
        "--mount".into(),
        job.name.clone().into(),
        dir.into(),
    ];
    crate::mount::spawn_detached(&exe, &args)
}

/// An affa mount at `dir` whose process is gone (killed, or the machine ran out of memory):
/// every look at it fails with "Transport endpoint is not connected". It is detached, so that
/// it can be mounted again; a live mount, or anything that is not an affa mount, is left alone.
fn detach_dead_mount(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return Ok(()) };
    let Ok(real) = fs::canonicalize(parent).map(|p| p.join(name)) else { return Ok(()) };
    match fs::symlink_metadata(&real) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error()) => {}
        _ => return Ok(()),
    }
    if !crate::mount::affa_mounts().contains(&real) {
        return Ok(());
    }
    rustix::mount::unmount(&real, rustix::mount::UnmountFlags::DETACH)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot detach the dead affa mount at {}", real.display()))
}

/// Samba's own section names (case-insensitive): a job of that name is never shared.
fn reserved_section(name: &str) -> bool {
    ["global", "homes", "printers"].iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn share_at(job: &Job, path: &Path) -> String {
    // Never empty: the configuration refuses SambaShare=yes without users (an empty
    // `valid users` would open the share to every Samba user).
    let users = &job.samba_users;
    format!(
        "# Written by affa --samba-shares for job {name} (SambaShare=yes); changes are overwritten.\n\
         [{name}]\n\
         \tcomment = affa archives of {name} ({host})\n\
         \tpath = {path}\n\
         \tread only = yes\n\
         \twriteable = no\n\
         \tbrowseable = yes\n\
         \tguest ok = no\n\
         \t# Never follow a symlink out of the share (a host's archived `x -> /etc/shadow`).\n\
         \twide links = no\n\
         \tvalid users = {users}\n\
         \t# RootDir/JOB is mode 0700 and root's: the share reads as root, for valid users only.\n\
         \tforce user = root\n\
         \tveto files = /.affa-chunks/*.affa-manifest/.AFFA-TRASH/.scheduled.resume/\n",
        name = job.name,
        host = job.host,
        path = path.display(),
        users = users.join(" "),
    )
}

fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    crate::fsutil::write_file(path, text, 0o644)?;
    Ok(true)
}

/// Ask the running Samba to reload its configuration. Returns what happened.
fn reload(smb_conf: &Path) -> String {
    let st = Command::new("smbcontrol")
        .arg("-s")
        .arg(smb_conf)
        .args(["smbd", "reload-config"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if matches!(st, Ok(s) if s.success()) {
        return "Samba reloaded".into();
    }
    if smb_conf == Path::new("/etc/samba/smb.conf") {
        let st = Command::new("systemctl")
            .args(["reload", "smbd"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(st, Ok(s) if s.success()) {
            return "Samba reloaded (systemctl)".into();
        }
    }
    "Samba not reloaded (smbd is not running?); it reads the shares when it starts".into()
}

/// `--samba-shares`: write the include files of every job with SambaShare=yes, remove those of
/// jobs no longer shared, load them into smbConf, reload Samba.
pub fn update_shares(cfg: &Config) -> Result<String> {
    // A shared job whose configuration is broken keeps its share as it is (never rewritten, nor
    // removed, from what could be read of it); the other jobs' shares are brought up to date,
    // and the command fails with that job's error at the end. Every caller (--samba-shares,
    // --make-cronjobs, --_cronupdate from cron) fails with it.
    // (What could be read of one may say it is not shared, when the broken line is SambaShare
    // itself: a share file it has is kept all the same.)
    let dir = conf_dir(cfg);
    let broken: Vec<&crate::config::BrokenJob> = cfg
        .broken
        .values()
        .filter(|b| b.partial.samba_share || dir.join(format!("{JOB_PREFIX}{}.conf", b.name)).is_file())
        .collect();
    let smb_conf = cfg.settings.smb_conf.clone();
    let shared: Vec<&Job> = cfg.jobs.values().filter(|j| j.samba_share).collect();
    if shared.is_empty() && broken.is_empty() && !dir.join(SHARES_FILE).exists() {
        return Ok("no job has SambaShare=yes; Samba not touched".into());
    }
    if !smb_conf.is_file() {
        crate::bail!(
            "smbConf {} does not exist (is Samba installed?); affa's shares need it to include {}",
            smb_conf.display(),
            dir.join(SHARES_FILE).display()
        );
    }
    fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let mut changed = false;
    let mut index = String::from(
        "# Written by affa --samba-shares: one include per job with SambaShare=yes; changes are overwritten.\n",
    );
    let mut keep = Vec::new();
    let mut failed = Vec::new();
    // In name order, the broken ones among them (their share file kept, if there is one).
    let mut all: Vec<(&str, Option<&Job>)> = shared.iter().map(|j| (j.name.as_str(), Some(*j))).collect();
    all.extend(broken.iter().map(|b| (b.name.as_str(), None)));
    all.sort_by(|a, b| a.0.cmp(b.0));
    for (job_name, job) in all {
        let name = format!("{JOB_PREFIX}{job_name}.conf");
        let Some(job) = job else {
            if dir.join(&name).is_file() {
                index.push_str(&format!("include = {}\n", dir.join(&name).display()));
                keep.push(name);
            }
            continue;
        };
        if reserved_section(&job.name) {
            failed.push(format!("job {}: a share of that name would be Samba's own section [{}] (a [global] included sets `force user = root` for every share of the server); rename the job (affa --rename-job) to share it", job.name, job.name));
            continue;
        }
        let text = if chunked(job) {
            // The mounted view: chunked files as plain files, the store hidden. A job whose
            // archives cannot be mounted loses its share (an empty mount point is no share);
            // the other jobs' shares are written all the same, and the command fails at the end.
            let mp = mount_point(cfg, job);
            if let Err(e) = ensure_mounted(cfg, job, &mp) {
                failed.push(format!("job {}: its archives could not be mounted: {e}", job.name));
                continue;
            }
            share_at(job, &mp)
        } else {
            share_text(job)
        };
        changed |= write_if_changed(&dir.join(&name), &text)?;
        index.push_str(&format!("include = {}\n", dir.join(&name).display()));
        keep.push(name);
    }
    let mut removed = Vec::new();
    for e in fs::read_dir(&dir).ctx(|| format!("cannot read {}", dir.display()))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(JOB_PREFIX) && n.ends_with(".conf") && !keep.contains(&n) {
            fs::remove_file(e.path()).ctx(|| format!("cannot remove {}", e.path().display()))?;
            removed.push(n[JOB_PREFIX.len()..n.len() - 5].to_string());
            changed = true;
        }
    }
    changed |= write_if_changed(&dir.join(SHARES_FILE), &index)?;

    // The one include line in smb.conf.
    let text = fs::read_to_string(&smb_conf).ctx(|| format!("cannot read {}", smb_conf.display()))?;
    let want = include_line(cfg);
    let norm = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
    if !text.lines().any(|l| norm(l) == norm(&want)) {
        let mut t = text.clone();
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        t.push_str(&format!("# affa's archive shares (affa --samba-shares)\n{want}\n"));
        crate::fsutil::write_atomic(&smb_conf, t.as_bytes(), crate::fsutil::Perm::KeepOr(0o644))?;
        changed = true;
    }
    let names: Vec<&str> =
        shared.iter().map(|j| j.name.as_str()).filter(|n| keep.contains(&format!("{JOB_PREFIX}{n}.conf"))).collect();
    let mut out =
        if names.is_empty() { "no Samba shares".to_string() } else { format!("Samba shares: {}", names.join(", ")) };
    if !removed.is_empty() {
        out.push_str(&format!("; removed: {}", removed.join(", ")));
    }
    if changed {
        out.push_str(&format!("; {}", reload(&smb_conf)));
    } else {
        out.push_str("; unchanged");
    }
    if let Some(b) = broken.first() {
        if failed.is_empty() && broken.len() == 1 {
            return Err(b.error());
        }
        let mut all: Vec<String> = broken.iter().map(|b| format!("job {}: {}", b.name, b.error())).collect();
        all.extend(failed);
        return Err(crate::error::Error::config(format!("{out}; not updated: {}", all.join("; "))));
    }
    if !failed.is_empty() {
        crate::bail!("{out}; not shared: {}", failed.join("; "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(text: &str) -> Job {
        let dir = Path::new("/nonexistent-affa-test/etc");
        let cfg = Config::parse(dir, &[(dir.join("t.conf"), text.to_string())]).unwrap().strict().unwrap();
        cfg.jobs.into_values().next().unwrap()
    }

    #[test]
    fn samba_own_section_names_are_never_shares() {
        for n in ["global", "Homes", "PRINTERS"] {
            assert!(reserved_section(n), "{n}");
        }
        for n in ["web", "global1", "home"] {
            assert!(!reserved_section(n), "{n}");
        }
    }

    #[test]
    fn a_share_is_read_only_for_the_named_users_and_hides_the_store() {
        let j = job("[GlobalAffaConfig]\nRootDir=/srv/affa\n[web]\nremoteHostName=web.example\nSambaShare=yes\nSambaValidUser=alice, bob\nSambaValidUser=carol\n");
        assert_eq!(
            share_text(&j),
            "# Written by affa --samba-shares for job web (SambaShare=yes); changes are overwritten.\n\
             [web]\n\
             \tcomment = affa archives of web (web.example)\n\
             \tpath = /srv/affa/web\n\
             \tread only = yes\n\
             \twriteable = no\n\
             \tbrowseable = yes\n\
             \tguest ok = no\n\
             \t# Never follow a symlink out of the share (a host's archived `x -> /etc/shadow`).\n\
             \twide links = no\n\
             \tvalid users = alice bob carol\n\
             \t# RootDir/JOB is mode 0700 and root's: the share reads as root, for valid users only.\n\
             \tforce user = root\n\
             \tveto files = /.affa-chunks/*.affa-manifest/.AFFA-TRASH/.scheduled.resume/\n"
        );
        // Without SambaValidUser: the default user affa, never every user.
        let j = job("[db]\nremoteHostName=db.example\nSambaShare=yes\n");
        let text = share_text(&j);
        assert!(text.contains("\n\tvalid users = affa\n") && text.contains("\n\tpath = /var/affa/db\n"), "{text}");
    }
}
