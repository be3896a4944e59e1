//! Samba shares of job archives (`SambaShare=yes`): a read-only share named after the job, for
//! the users in SambaValidUser, whose path is never RootDir/JOB itself but a mount of it at
//! `lockDir/samba-mounts/JOB` that no device node can be opened through: for a job without
//! chunkFiles a bind mount of RootDir/JOB, read-only, `nodev`, `nosuid`, `noexec`; for a job with
//! chunkFiles its archives mounted by `affa --mount` (chunked files as plain files; the FUSE
//! mount is `ro,nodev,nosuid`). smbd serves the share as root (`force user = root`), and every
//! archive holds what a host sent: a device node with the major and minor of the backup
//! server's own disk, opened by smbd on a share user's read, would give that disk (every other
//! job's archives); on these mounts the kernel refuses the open (`EACCES`).
//!
//! Owns: the files under sambaConfDir — one include file per shared job
//! (`affa-job-JOB.conf`) and `affa-shares.conf`, which includes them — and the single
//! `include = SAMBACONFDIR/affa-shares.conf` line in smbConf (added once, never duplicated);
//! the mounts under `lockDir/samba-mounts` (made when a share needs one, made again when the
//! job directory they show is no longer RootDir/JOB, unmounted when the job is no longer
//! shared); then asking Samba to reload (`smbcontrol all reload-config`, `systemctl reload smbd`
//! as a fallback for the system's smb.conf). Must never: change any other line of smbConf, make
//! a share writable, point a share at a directory that is not such a mount (a device node a host
//! backed up must never be openable through a share), unmount anything outside
//! `lockDir/samba-mounts`, or show the chunk store internals (`.affa-chunks`, manifests, the
//! trash, an interrupted transfer's resume dir) through a share.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::config::{Config, Job};
use crate::error::{IoContext, Result};

pub const SHARES_FILE: &str = "affa-shares.conf";
const JOB_PREFIX: &str = "affa-job-";
/// The per-mount options every share's mount must have (as /proc/self/mountinfo names them).
const SHARE_MOUNT_OPTIONS: [&str; 3] = ["ro", "nodev", "nosuid"];

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

/// The share definition of one job: its path is the job's mount point ([`mount_point`]).
pub fn share_text(cfg: &Config, job: &Job) -> String {
    share_at(job, &mount_point(cfg, job))
}

/// The directory of the shares' mounts (affa's own: in the checked lockDir, mode 0700).
fn mounts_dir(cfg: &Config) -> PathBuf {
    cfg.lock_dir().join("samba-mounts")
}

/// Where the archives of a job are mounted for its share, and the share's path: RootDir/JOB
/// bound read-only, nodev, nosuid, noexec, or (a job with chunkFiles) its archives mounted by
/// `affa --mount`, where Samba shows each chunked file as the plain file it was (a VM's
/// `-flat.vmdk`).
pub fn mount_point(cfg: &Config, job: &Job) -> PathBuf {
    mounts_dir(cfg).join(&job.name)
}

fn chunked(job: &Job) -> bool {
    !job.chunk.files.is_empty()
}

/// Make `dir` ready to be a share's mount point: lockDir checked (made by affa's user, 0700,
/// not a symlink: lock::open_dir, so no other user can have put a symlink on the way that
/// would send the root-only view, and the share smbd serves as root, somewhere else),
/// `lockDir/samba-mounts` private, a dead affa mount there detached, `dir` a real directory.
/// Returns its resolved path (/proc/self/mountinfo names that one: lockDir may be below a
/// symlink, /var/lock).
fn prepare_point(cfg: &Config, job: &Job, dir: &Path) -> Result<PathBuf> {
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
    fs::canonicalize(dir).ctx(|| format!("cannot resolve {}", dir.display()))
}

/// What is mounted on top at a resolved path, as /proc/self/mountinfo shows it.
struct OnTop {
    /// The per-mount options (`ro`, `nodev`, ...).
    options: Vec<String>,
    /// An affa FUSE mount (`affa --mount`: source `affa:JOB`).
    affa: bool,
}

impl OnTop {
    fn is_safe_share_mount(&self) -> bool {
        SHARE_MOUNT_OPTIONS.iter().all(|o| self.options.iter().any(|x| x == o))
    }
}

fn mount_on_top(real: &Path) -> Option<OnTop> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on a point is the one in use.
    text.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let mp = PathBuf::from(OsString::from_vec(crate::automount::unescape_bytes(f.get(4)?)));
        if mp != real {
            return None;
        }
        let options = f.get(5)?.split(',').map(String::from).collect();
        let r: Vec<&str> = right.split(' ').collect();
        let affa = r.first().is_some_and(|t| *t == "fuse" || *t == "fuse.affa")
            && r.get(1).is_some_and(|s| s.starts_with("affa:"));
        Some(OnTop { options, affa })
    })
}

/// Unmount everything mounted at `real` (a mount point below `lockDir/samba-mounts`, resolved;
/// several mounts when stacked). A mount still in use (a file open through it) is detached: it
/// ends when the last one is closed.
fn unmount_all(real: &Path) -> Result<()> {
    for _ in 0..16 {
        if mount_on_top(real).is_none() {
            return Ok(());
        }
        let r = match rustix::mount::unmount(real, UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(real, UnmountFlags::DETACH),
            r => r,
        };
        r.map_err(std::io::Error::from).ctx(|| format!("cannot unmount {}", real.display()))?;
    }
    bail!("cannot unmount {}: something is mounted there again and again", real.display())
}

/// RootDir/JOB, opened without following a symlink there (affa made it). Made as a run makes it
/// (mode 0700) when RootDir is there; a job with an AutomountDevice only while its disk is
/// mounted (otherwise the share would show, and keep showing, the empty directory below).
fn open_job_dir(job: &Job) -> Result<OwnedFd> {
    if let Some(a) = &job.automount {
        let point = PathBuf::from(a.point.to_string_lossy().trim_end_matches('/'));
        if !crate::automount::is_mounted(&a.device, &point) {
            bail!(
                "its AutomountDevice {} is not mounted at {}; run affa --samba-shares while it is (AutoUnmount=no keeps it mounted)",
                a.device,
                point.display()
            );
        }
    }
    let root = job.root_dir();
    if !root.is_dir() {
        bail!("RootDir {} does not exist (is the backup disk mounted?)", root.display());
    }
    let dir = job.job_dir();
    crate::fsutil::create_private_dir(&dir)?;
    rustix::fs::open(&dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot open {} (not a directory: a symbolic link?)", dir.display()))
}

/// Bind RootDir/JOB at `dir` read-only, nodev, nosuid and noexec, unless it is bound there so
/// already. Anything else there (a bind of a job directory that was moved or renamed since, the
/// job's `affa --mount` from when it had chunkFiles) is unmounted first.
fn ensure_bound(cfg: &Config, job: &Job, dir: &Path) -> Result<()> {
    let real = prepare_point(cfg, job, dir)?;
    let src = open_job_dir(job)?;
    let st = rustix::fs::fstat(&src)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot stat {}", job.job_dir().display()))?;
    let want = (st.st_dev, st.st_ino);
    if let Some(top) = mount_on_top(&real) {
        let shows = rustix::fs::stat(&real).ok().map(|s| (s.st_dev, s.st_ino));
        if !top.affa && top.is_safe_share_mount() && shows == Some(want) {
            return Ok(());
        }
        unmount_all(&real)?;
    }
    // A bind mount takes its flags only from a remount after it (mount(2) ignores them with
    // MS_BIND), so RootDir/JOB is bound first beside the share's path, at a point Samba does not
    // serve, made read-only, nodev, nosuid and noexec there, and only then bound from there to
    // the share's path: a bind copies the flags of the mount it binds, so the share's path never
    // shows the archives without them, not even for a moment.
    let parent = real.parent().unwrap_or(&real).to_path_buf();
    let staging = parent.join(format!(".staging-{}", job.name));
    if staging.is_dir() {
        unmount_all(&staging)?;
    }
    fs::create_dir_all(&staging).ctx(|| format!("cannot create {}", staging.display()))?;
    let source = format!("/proc/self/fd/{}", src.as_raw_fd());
    let bound = rustix::mount::mount_bind(source.as_str(), &staging)
        .and_then(|()| {
            rustix::mount::mount_remount(
                &staging,
                MountFlags::BIND | MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
                "",
            )
        })
        .and_then(|()| rustix::mount::mount_bind(&staging, &real));
    let _ = unmount_all(&staging);
    let _ = fs::remove_dir(&staging);
    bound
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot bind {} at {}", job.job_dir().display(), real.display()))?;
    match mount_on_top(&real) {
        Some(top) if !top.affa && top.is_safe_share_mount() => Ok(()),
        top => {
            let _ = unmount_all(&real);
            bail!(
                "the bind mount at {} is not {} (its options: {}); not shared",
                real.display(),
                SHARE_MOUNT_OPTIONS.join(","),
                top.map(|t| t.options.join(",")).unwrap_or_else(|| "none, it is gone".into())
            )
        }
    }
}

/// Mount the archives of `job` (a job with chunkFiles) at `dir` with `affa --mount` unless an
/// affa mount is there already. Anything else there (the job's bind mount from when it had no
/// chunkFiles) is unmounted first.
fn ensure_mounted(cfg: &Config, job: &Job, dir: &Path) -> Result<()> {
    let real = prepare_point(cfg, job, dir)?;
    match mount_on_top(&real) {
        Some(top) if top.affa => return Ok(()),
        Some(_) => unmount_all(&real)?,
        None => {}
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

/// The mounts of jobs no longer shared: unmounted, their mount points removed. `keep`: the names
/// of the jobs whose shares stay. Returns what could not be undone.
fn remove_unused_mounts(cfg: &Config, keep: &[&str]) -> Vec<String> {
    let dir = mounts_dir(cfg);
    // Only below affa's own checked lockDir (a lockDir another user made could send the
    // unmounts anywhere).
    match crate::lock::open_dir(&cfg.lock_dir(), false) {
        Ok(Some(_)) => {}
        Ok(None) => return Vec::new(),
        Err(e) => return vec![format!("the shares' mounts in {} were not checked: {e}", dir.display())],
    }
    let Ok(rd) = fs::read_dir(&dir) else { return Vec::new() };
    let mut problems = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        if keep.iter().any(|k| std::ffi::OsStr::new(k) == name) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let _ = detach_dead_mount(&path);
        let real = fs::canonicalize(&path).unwrap_or(path.clone());
        match unmount_all(&real) {
            Ok(()) => {
                let _ = fs::remove_dir(&path);
            }
            Err(err) => problems.push(format!("{}: {err}", path.display())),
        }
    }
    problems
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
         \t# A mount of the archives, read-only, nodev, nosuid: no device node a host backed up opens.\n\
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
    let mut away = Vec::new();
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
        // The share's path is a mount no device node opens through: RootDir/JOB bound
        // read-only, nodev, nosuid, noexec, or (chunkFiles) the mounted view, chunked files as
        // plain files, the store hidden. A job whose archives cannot be mounted loses its share
        // (an empty mount point is no share); the other jobs' shares are written all the same,
        // and the command fails at the end.
        // A job whose backup disk (AutomountDevice) is away has no archives to show: not shared
        // until `--samba-shares` runs while the disk is mounted; its share's mount, which would
        // keep the unmounted disk in use, is removed below. Not a failure: with AutoUnmount=yes
        // (the default) that is most of the time.
        if let Some(a) = &job.automount {
            let point = PathBuf::from(a.point.to_string_lossy().trim_end_matches('/'));
            if !crate::automount::is_mounted(&a.device, &point) {
                away.push(format!(
                    "job {}: not shared while its AutomountDevice {} is not mounted at {}",
                    job.name,
                    a.device,
                    point.display()
                ));
                continue;
            }
        }
        let mp = mount_point(cfg, job);
        let mounted = if chunked(job) { ensure_mounted(cfg, job, &mp) } else { ensure_bound(cfg, job, &mp) };
        if let Err(e) = mounted {
            failed.push(format!("job {}: its archives could not be mounted: {e}", job.name));
            continue;
        }
        let text = share_at(job, &mp);
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
    // The mounts of the jobs no longer shared (their share files are gone above).
    let kept: Vec<&str> =
        keep.iter().filter_map(|n| n.strip_prefix(JOB_PREFIX).and_then(|n| n.strip_suffix(".conf"))).collect();
    for p in remove_unused_mounts(cfg, &kept) {
        failed.push(format!("a mount of a share no longer in use: {p}"));
    }

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
    for a in &away {
        out.push_str(&format!("; {a}"));
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

    fn config(text: &str) -> Config {
        let dir = Path::new("/nonexistent-affa-test/etc");
        Config::parse(dir, &[(dir.join("t.conf"), text.to_string())]).unwrap().strict().unwrap()
    }

    fn share_of(text: &str) -> String {
        let cfg = config(text);
        let job = cfg.jobs.values().next().unwrap();
        share_text(&cfg, job)
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
        let text = share_of("[GlobalAffaConfig]\nRootDir=/srv/affa\n[web]\nremoteHostName=web.example\nSambaShare=yes\nSambaValidUser=alice, bob\nSambaValidUser=carol\n");
        assert_eq!(
            text,
            "# Written by affa --samba-shares for job web (SambaShare=yes); changes are overwritten.\n\
             [web]\n\
             \tcomment = affa archives of web (web.example)\n\
             \t# A mount of the archives, read-only, nodev, nosuid: no device node a host backed up opens.\n\
             \tpath = /var/lock/affa/samba-mounts/web\n\
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
        let text = share_of("[db]\nremoteHostName=db.example\nSambaShare=yes\n");
        assert!(text.contains("\n\tvalid users = affa\n"), "{text}");
        // Never RootDir/JOB itself (a device node a host backed up would open there): its mount
        // in lockDir, for a job with chunkFiles as for one without.
        assert!(text.contains("\n\tpath = /var/lock/affa/samba-mounts/db\n"), "{text}");
        let text = share_of("[GlobalAffaConfig]\nlockDir=/run/affa-locks\n[vm]\nremoteHostName=esx.example\nSambaShare=yes\nchunkFiles=*-flat.vmdk\n");
        assert!(text.contains("\n\tpath = /run/affa-locks/samba-mounts/vm\n"), "{text}");
    }
}
