//! `affa --install [--prefix DIR] [--agent FILE]`: the running binary to PREFIX/usr/sbin/affa,
//! the static agent to PREFIX/usr/lib/affa/affa-agent, the man pages and shell completions the
//! binary makes from its command line, PREFIX/etc/affa with a commented global file and two
//! sample jobs (a Linux host, an ESXi VM; both `status=disabled` and valid for `affa
//! --configcheck`), the logrotate snippet, the tmpfiles.d entry of the lock directory, then [`setup`]: the state directories and the cron
//! file. The Debian and RPM packages are built from a PREFIX install (scripts/build-packages.sh)
//! and their postinst runs `affa --_setup`, so a package and a source install are the same files.
//!
//! Owns: the layout of an installation. Must never: overwrite an existing configuration file
//! (the samples and the global file are written only when absent), install an agent that is not
//! statically linked (it would not run on an ESXi host), or write outside PREFIX. Files that
//! affa generates (the cron file, the logrotate snippet, man pages, completions) are rewritten;
//! paths written *into* files are the installed system's paths (/etc/affa, /usr/sbin/affa), not
//! PREFIX's, so a PREFIX install can be packaged.

use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_CONFIG_DIR};
use crate::error::{IoContext, Result};

/// Options of `--install`.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Install under this root instead of / (tests, packaging).
    pub prefix: Option<std::path::PathBuf>,
    /// The static agent to install (`--agent FILE`); None: `affa-agent` next to the running
    /// affa, skipped (and said so) when it is missing or dynamically linked.
    pub agent: Option<PathBuf>,
    /// The files the binary makes from its own definitions (man pages, completions).
    pub generated: Vec<Generated>,
}

/// A file made by the affa binary from its command line and key table: where it is installed
/// (an absolute path on the installed system) and its bytes. Installed mode 0644.
#[derive(Debug, Clone)]
pub struct Generated {
    pub path: &'static str,
    pub data: Vec<u8>,
}

/// Where the installed affa lives (cron lines name it: `affaBinary`'s default).
pub const BINARY_PATH: &str = "/usr/sbin/affa";
/// Where the static agent is installed: `agentBinary`'s default.
pub const AGENT_PATH: &str = crate::transport::agent::DEFAULT_LOCAL;
/// The logrotate snippet.
pub const LOGROTATE_PATH: &str = "/etc/logrotate.d/affa";
/// The tmpfiles.d entry that makes the default lock directory at boot, as root, 0700 (docs/SECURITY-local.md).
pub const TMPFILES_PATH: &str = "/usr/lib/tmpfiles.d/affa.conf";
/// Its text: `lockDir`'s default, /var/lock/affa, is /run/lock/affa, in a tmpfs emptied at boot and
/// writable by every user; made by systemd-tmpfiles before any user can log in, it is root's,
/// so a local user cannot take the name first (affa would then refuse every run).
pub const TMPFILES_TEXT: &str = "# affa's lock directory (lockDir's default, /var/lock/affa), made at boot before any user can\n# take the name in the world-writable /run/lock (written by affa --install).\nd /run/lock/affa 0700 root root -\n";

pub const GLOBAL_SAMPLE: &str = "# affa global settings; every key: affa --show-default-config
# A value here is the default of every job; a job's own section overrides it.
[GlobalAffaConfig]
# Mail: SMTP server (empty = the local sendmail)
#smtpHost=mail.example.com
#smtpPort=25
#smtpTLS=starttls
#smtpUser=
#smtpPassword=
#mailFrom=affa@backup.example.com
#EmailAddress=admin@example.com
# Status mail: daily, weekly, monthly or never
#sendStatus=weekly
# enabled/disabled overrides every job's status; jobs = each job's own status
#globalStatus=jobs
#RootDir=/var/affa
";

pub const LINUX_SAMPLE: &str = "# Sample job: a Linux host backed up over ssh + rsync.
# Copy this file to JOBNAME.conf, rename the section, set status=enabled, then run:
#   affa --send-key JOBNAME && affa --run JOBNAME && affa --make-cronjobs
[example-linux]
# disabled: a sample does not run until you enable it
status=disabled
Description=sample Linux host
remoteHostName=host.example.com
remoteUser=root
sshPort=22
# what to back up (one line each); none = /
Include=/etc
Include=/home
Include=/root
Include=/var/lib
Exclude=/var/lib/mysql
Exclude=*.tmp
# when (HHMM, one line each), and how many archives per level to keep
TimeSchedule=2230
scheduledKeep=1
dailyKeep=7
weeklyKeep=4
monthlyKeep=12
yearlyKeep=2
# mail on failure; retries from cron
EmailAddress=root
RetryAttempts=4
RetryAfter=600
RetryNotification=no
chattyOnSuccess=0
# --nrpe: CRITICAL after this many hours without a successful run
NRPEtrigger=26
DiskSpaceWarn=strict
# stop a run that is still going at 07:00, resume it at 20:00
#killAt=0700
#resumeKilledAt=2000
# read-only Samba share of the archives (affa --samba-shares)
SambaShare=no
#SambaValidUser=affa
";

pub const ESXI_SAMPLE: &str =
    "# Sample job: hot backup of a running VMware ESXi VM (snapshot through the vSphere API, the
# VM's files pulled over ssh + rsync). Copy this file to JOBNAME.conf (mode 0600: it holds a
# password), rename the section, set status=enabled, then run:
#   affa --send-key JOBNAME   (installs the ssh key, pins ESXiThumbprint)
#   affa --run JOBNAME && affa --make-cronjobs
[example-esxi]
status=disabled
Description=sample ESXi VM
ESXi=yes
remoteHostName=esxi.example.com
remoteUser=root
ESXiVMName=example-vm
ESXiUsername=affa-backup
# the API password; better: ESXiPasswordFile=/etc/affa/JOBNAME.password (mode 0600)
ESXiPassword=change-me
#ESXiThumbprint=
ESXiSnapshotQuiesce=no
# a VM with snapshots of its own is archived with its whole chain (refuse: fail the run instead)
ESXiUserSnapshots=keep
# big disk images as compressed, deduplicated chunks: base disks and snapshot deltas
chunkFiles=*-flat.vmdk
chunkFiles=*-delta.vmdk
chunkFiles=*-sesparse.vmdk
chunkCompression=zstd:1
TimeSchedule=0130
dailyKeep=7
weeklyKeep=4
monthlyKeep=6
yearlyKeep=1
EmailAddress=root
RetryAttempts=2
RetryAfter=1800
NRPEtrigger=26
";

fn under(prefix: &Path, abs: &str) -> PathBuf {
    prefix.join(abs.trim_start_matches('/'))
}

/// The logrotate snippet for the job logs and the global log.
pub fn logrotate_text(log_dir: &str) -> String {
    format!(
        "# affa's logs (written by affa --install)\n{log_dir}/*.log {{\n\tweekly\n\trotate 8\n\tcompress\n\tdelaycompress\n\tmissingok\n\tnotifempty\n\tcreate 0640 root root\n}}\n"
    )
}

/// The mount points `/etc/fstab` names (other than `/`, swap and `none`) that are not in
/// `mounted`.
fn unmounted_fstab_points(fstab: &str, mounted: &[PathBuf]) -> Vec<PathBuf> {
    fstab
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with('/') && *p != "/")
        .map(|p| {
            use std::os::unix::ffi::OsStringExt;
            PathBuf::from(std::ffi::OsString::from_vec(crate::automount::unescape_bytes(p)))
        })
        .filter(|p| !mounted.contains(p))
        .collect()
}

fn mkdir(p: &Path, mode: u32, done: &mut Vec<String>) -> Result<()> {
    if !p.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(mode).create(p).ctx(|| format!("cannot create {}", p.display()))?;
        done.push(format!("created {}", p.display()));
    }
    Ok(())
}

fn new_file(p: &Path, text: &str, mode: u32, done: &mut Vec<String>) -> Result<()> {
    if p.exists() {
        done.push(format!("kept {}", p.display()));
        return Ok(());
    }
    crate::fsutil::write_file(p, text, mode)?;
    done.push(format!("wrote {}", p.display()));
    Ok(())
}

/// Write `data` to `path` (parents created 0755), replacing it by rename.
fn install_file(path: &Path, data: &[u8], mode: u32, done: &mut Vec<String>) -> Result<()> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
    }
    crate::fsutil::write_atomic(path, data, crate::fsutil::Perm::Mode(mode))?;
    done.push(format!("installed {}", path.display()));
    Ok(())
}

/// Why `data` is not a statically linked ELF executable (None: it is one). An ELF file that
/// names a program interpreter (`PT_INTERP`) is dynamically linked: it would not run on a host
/// without that loader and libraries (an ESXi host).
pub fn not_static_elf(data: &[u8]) -> Option<&'static str> {
    if data.len() < 0x34 || &data[..4] != b"\x7fELF" {
        return Some("is not an ELF executable");
    }
    let (wide, big) = match (data[4], data[5]) {
        (1, 1) => (false, false),
        (1, 2) => (false, true),
        (2, 1) => (true, false),
        (2, 2) => (true, true),
        _ => return Some("is not an ELF executable"),
    };
    let num = |off: usize, len: usize| -> Option<u64> {
        let b = data.get(off..off + len)?;
        Some(if big {
            b.iter().fold(0, |n, &x| n << 8 | u64::from(x))
        } else {
            b.iter().rev().fold(0, |n, &x| n << 8 | u64::from(x))
        })
    };
    let (phoff, phentsize, phnum) =
        if wide { (num(0x20, 8), num(0x36, 2), num(0x38, 2)) } else { (num(0x1c, 4), num(0x2a, 2), num(0x2c, 2)) };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return Some("is not an ELF executable");
    };
    for i in 0..phnum {
        let Some(off) = usize::try_from(phoff + i * phentsize).ok() else {
            return Some("is not an ELF executable");
        };
        match num(off, 4) {
            None => return Some("is not an ELF executable"),
            Some(3) => return Some("is dynamically linked (build the static agent: scripts/build-agent.sh)"),
            Some(_) => {}
        }
    }
    None
}

/// The static agent to PREFIX/usr/lib/affa/affa-agent.
fn install_agent(prefix: &Path, agent: Option<&Path>, done: &mut Vec<String>) -> Result<()> {
    let dest = under(prefix, AGENT_PATH);
    let (src, asked) = match agent {
        Some(a) => (a.to_path_buf(), true),
        None => {
            let exe = std::env::current_exe().ctx(|| "cannot find the running affa binary".to_string())?;
            (exe.with_file_name(crate::transport::agent::AGENT_NAME), false)
        }
    };
    if fs::canonicalize(&src).ok().is_some_and(|s| fs::canonicalize(&dest).ok() == Some(s)) {
        return Ok(());
    }
    let why = match fs::read(&src) {
        Ok(data) => match not_static_elf(&data) {
            None => return install_file(&dest, &data, 0o755, done),
            Some(why) => why.to_string(),
        },
        Err(e) => format!("cannot be read: {e}"),
    };
    if asked {
        crate::bail!("--agent {}: {why}", src.display());
    }
    // Run again from the installed affa (no agent next to it), or from a build tree without the
    // static agent: the one installed before stays.
    if dest.is_file() {
        done.push(format!("kept {}", dest.display()));
        return Ok(());
    }
    done.push(format!(
        "affa-agent not installed: {} {why}; install it with affa --install --agent FILE (until then chunked files are read over rsync)",
        src.display()
    ));
    Ok(())
}

pub fn install(opts: &InstallOptions) -> Result<String> {
    let prefix = opts.prefix.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut done = Vec::new();

    // The binary (replaced: an upgrade; by rename, so a running affa is not disturbed).
    let exe = std::env::current_exe().ctx(|| "cannot find the running affa binary".to_string())?;
    let bin = under(&prefix, BINARY_PATH);
    if fs::canonicalize(&exe).ok() != fs::canonicalize(&bin).ok() {
        let data = fs::read(&exe).ctx(|| format!("cannot read {}", exe.display()))?;
        install_file(&bin, &data, 0o755, &mut done)?;
    }
    install_agent(&prefix, opts.agent.as_deref(), &mut done)?;
    for g in &opts.generated {
        install_file(&under(&prefix, g.path), &g.data, 0o644, &mut done)?;
    }

    // Configuration: never overwritten.
    let etc = under(&prefix, DEFAULT_CONFIG_DIR);
    mkdir(&etc, 0o700, &mut done)?;
    new_file(&etc.join("00-global.conf"), GLOBAL_SAMPLE, 0o600, &mut done)?;
    new_file(&etc.join("example-linux.conf"), LINUX_SAMPLE, 0o600, &mut done)?;
    new_file(&etc.join("example-esxi.conf"), ESXI_SAMPLE, 0o600, &mut done)?;

    let cfg = setup_under(&prefix, &etc, Path::new(DEFAULT_CONFIG_DIR), &mut done)?;
    let lr = under(&prefix, LOGROTATE_PATH);
    crate::fsutil::write_file(&lr, &logrotate_text(&cfg.settings.log_dir.to_string_lossy()), 0o644)?;
    done.push(format!("wrote {}", lr.display()));
    install_file(&under(&prefix, TMPFILES_PATH), TMPFILES_TEXT.as_bytes(), 0o644, &mut done)?;
    done.push(format!(
        "next: edit a copy of {}/example-linux.conf, then affa --send-key JOB, affa --run JOB, affa --make-cronjobs",
        DEFAULT_CONFIG_DIR
    ));
    Ok(done.join("\n"))
}

/// `affa --_setup` (the packages' postinst, after every install and upgrade): what the
/// configuration in `config_dir` needs on this machine: the configuration and script
/// directories, the log, lock and archive directories (created when missing, never changed),
/// and the cron file (rewritten from the configuration: its schedule is the jobs').
pub fn setup(config_dir: &Path) -> Result<String> {
    let mut done = Vec::new();
    setup_under(Path::new("/"), config_dir, config_dir, &mut done)?;
    Ok(done.join("\n"))
}

/// [`setup`] under `prefix`: `etc` is the configuration directory here, `installed_etc` the one
/// the cron daemon will see. Returns the configuration read.
fn setup_under(prefix: &Path, etc: &Path, installed_etc: &Path, done: &mut Vec<String>) -> Result<Config> {
    mkdir(etc, 0o700, done)?;
    // The configuration as installed (an existing one included) decides the rest.
    let cfg = Config::load(etc).map_err(|e| e.context("the installed configuration"))?;
    let g = &cfg.settings;
    mkdir(&under(prefix, &g.script_dir.to_string_lossy()), 0o700, done)?;
    mkdir(&under(prefix, &g.log_dir.to_string_lossy()), 0o750, done)?;
    mkdir(&under(prefix, &g.lock_dir.to_string_lossy()), 0o700, done)?;
    let mut roots: Vec<String> = cfg.jobs.values().map(|j| j.root_dir.to_string_lossy().into_owned()).collect();
    roots.push(cfg.global.root_dir.to_string_lossy().into_owned());
    roots.sort();
    roots.dedup();
    // A RootDir on a backup disk that is not mounted now (an upgrade while it is away) is never
    // made on the disk below: the next run would pass its "is the disk mounted?" check and fill
    // the root file system, and the archives would hide under the disk once it is back.
    let mounted = crate::automount::mount_points();
    let mut away: Vec<PathBuf> = cfg
        .jobs
        .values()
        .filter_map(|j| j.automount.as_ref().map(|a| a.point.clone()))
        .filter(|p| !mounted.contains(p) && !fs::canonicalize(p).is_ok_and(|c| mounted.contains(&c)))
        .collect();
    if prefix == Path::new("/") {
        let fstab = fs::read_to_string("/etc/fstab").unwrap_or_default();
        away.extend(unmounted_fstab_points(&fstab, &mounted));
    }
    let mut failed = Vec::new();
    for r in roots {
        let dir = under(prefix, &r);
        if dir.is_dir() {
            continue;
        }
        if let Some(p) = away.iter().find(|p| Path::new(&r).starts_with(p)) {
            done.push(format!(
                "RootDir {r} not created: {} is where a disk is mounted (fstab or AutomountPoint) and it is not mounted now; mount it, then mkdir -m 0700 {r}",
                p.display()
            ));
            continue;
        }
        // One RootDir that cannot be made (a file in its way, a read-only mount) does not stop
        // the others, nor the cron file (a package upgrade would leave new jobs unscheduled).
        if let Err(e) = mkdir(&dir, 0o700, done) {
            failed.push(format!("RootDir {r} not created: {e}"));
        }
    }
    let cron = under(prefix, &g.cron_file.to_string_lossy());
    crate::fsutil::write_file(&cron, &crate::cron::cron_text(&cfg, installed_etc), 0o644)?;
    done.push(format!("wrote {}", cron.display()));
    if !failed.is_empty() {
        crate::bail!(
            "{}; the other directories were made and the cron file {} was written",
            failed.join("; "),
            cron.display()
        );
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_mount_points_not_mounted_now() {
        let fstab = "# /etc/fstab\nUUID=1 / ext4 defaults 0 1\nUUID=2 /mnt/backup ext4 noauto 0 2\n\
                     /dev/sdb1 /srv/usb\\040disk ext4 defaults 0 2\nUUID=3 none swap sw 0 0\n/dev/sdc1 /home ext4 defaults 0 2\n";
        let mounted = [PathBuf::from("/"), PathBuf::from("/home")];
        assert_eq!(
            unmounted_fstab_points(fstab, &mounted),
            [PathBuf::from("/mnt/backup"), PathBuf::from("/srv/usb disk")]
        );
    }

    /// The README's configuration examples, as a new user copies them beside what the package
    /// installed (00-global.conf and the samples), make a configuration without any error: a
    /// second [GlobalAffaConfig] stopped every job, and a `# comment` after a value became part
    /// of it (a chunkFiles glob matching nothing: the disks silently not chunked).
    #[test]
    fn the_readme_examples_beside_the_installed_files_are_a_valid_configuration() {
        let readme = include_str!("../README.md");
        let dir = Path::new("/etc/affa");
        let mut globals = Vec::new();
        let mut jobs = vec![
            (dir.join("example-linux.conf"), LINUX_SAMPLE.to_string()),
            (dir.join("example-esxi.conf"), ESXI_SAMPLE.to_string()),
        ];
        for block in readme.split("```ini\n").skip(1) {
            let block = block.split("```").next().unwrap();
            let first = block.lines().next().unwrap_or("");
            for l in block.lines().filter(|l| !l.trim_start().starts_with('#')) {
                assert!(!l.contains(" #") && !l.contains("\t#"), "README: a comment after a value: {l}");
            }
            if block.lines().any(|l| l.trim() == "...") {
                // A fragment of a job ("[web]\n...\nkey=value"): its lines are checked above.
                continue;
            }
            if let Some(name) = first.strip_prefix("# /etc/affa/").filter(|n| !n.starts_with("00-global.conf")) {
                let name = name.split_whitespace().next().unwrap();
                jobs.push((dir.join(name), block.to_string()));
            } else if !block.lines().any(|l| l.starts_with('[')) {
                // Keys the README says to set in 00-global.conf's [GlobalAffaConfig].
                globals.push(block.to_string());
            } else {
                panic!("README: an ini example that is neither a job file nor global keys:\n{block}");
            }
        }
        assert!(globals.len() >= 2 && jobs.len() >= 4, "the README's examples were not found");
        // Each set of global keys is one machine's choice (a local RootDir, or a shared one).
        for g in globals {
            let mut texts = jobs.clone();
            texts.push((dir.join("00-global.conf"), format!("{GLOBAL_SAMPLE}{g}")));
            let cfg = Config::parse(dir, &texts).unwrap();
            assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
            assert!(cfg.jobs.contains_key("web") && cfg.jobs.contains_key("esxi-mail"), "{:?}", cfg.jobs.keys());
        }
    }
}
