//! `affa --install [--prefix DIR]`: the running binary to PREFIX/usr/sbin/affa, PREFIX/etc/affa
//! with a commented global file and two sample jobs (a Linux host, an ESXi VM; both
//! `status=disabled` and valid for `affa --configcheck`), the state directories, the cron file
//! and the logrotate snippet.
//!
//! Owns: the layout of an installation. Must never: overwrite an existing configuration file
//! (the samples and the global file are written only when absent), or write outside PREFIX.
//! Files that affa generates (the cron file, the logrotate snippet) are rewritten; paths written
//! *into* files are the installed system's paths (/etc/affa, /usr/sbin/affa), not PREFIX's, so
//! a PREFIX install can be packaged.

use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_CONFIG_DIR};
use crate::error::{IoContext, Result};

/// Options of `--install`.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Install under this root instead of / (tests, packaging).
    pub prefix: Option<std::path::PathBuf>,
}

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

pub fn install(opts: &InstallOptions) -> Result<String> {
    let prefix = opts.prefix.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut done = Vec::new();

    // The binary (replaced: an upgrade; by rename, so a running affa is not disturbed).
    let exe = std::env::current_exe().ctx(|| "cannot find the running affa binary".to_string())?;
    let bin = under(&prefix, "/usr/sbin/affa");
    if fs::canonicalize(&exe).ok() != fs::canonicalize(&bin).ok() {
        let data = fs::read(&exe).ctx(|| format!("cannot read {}", exe.display()))?;
        if let Some(d) = bin.parent() {
            fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
        }
        crate::fsutil::write_atomic(&bin, &data, crate::fsutil::Perm::Mode(0o755))?;
        done.push(format!("installed {}", bin.display()));
    }

    // Configuration: never overwritten.
    let etc = under(&prefix, DEFAULT_CONFIG_DIR);
    mkdir(&etc, 0o700, &mut done)?;
    mkdir(&etc.join("scripts"), 0o700, &mut done)?;
    new_file(&etc.join("00-global.conf"), GLOBAL_SAMPLE, 0o600, &mut done)?;
    new_file(&etc.join("example-linux.conf"), LINUX_SAMPLE, 0o600, &mut done)?;
    new_file(&etc.join("example-esxi.conf"), ESXI_SAMPLE, 0o600, &mut done)?;

    // The configuration as installed (an existing one included) decides the rest.
    let cfg = Config::load(&etc).map_err(|e| e.context("the installed configuration"))?;
    let g = &cfg.settings;
    let (log_dir, lock_dir) = (g.log_dir.to_string_lossy(), g.lock_dir.to_string_lossy());
    mkdir(&under(&prefix, &log_dir), 0o750, &mut done)?;
    mkdir(&under(&prefix, &lock_dir), 0o700, &mut done)?;
    let mut roots: Vec<String> = cfg.jobs.values().map(|j| j.root_dir.to_string_lossy().into_owned()).collect();
    roots.push(cfg.global.root_dir.to_string_lossy().into_owned());
    roots.sort();
    roots.dedup();
    for r in roots {
        mkdir(&under(&prefix, &r), 0o700, &mut done)?;
    }

    let cron = under(&prefix, &g.cron_file.to_string_lossy());
    crate::fsutil::write_file(&cron, &crate::cron::cron_text(&cfg, Path::new(DEFAULT_CONFIG_DIR)), 0o644)?;
    done.push(format!("wrote {}", cron.display()));
    let lr = under(&prefix, "/etc/logrotate.d/affa");
    crate::fsutil::write_file(&lr, &logrotate_text(&log_dir), 0o644)?;
    done.push(format!("wrote {}", lr.display()));
    done.push(format!(
        "next: edit a copy of {}/example-linux.conf, then affa --send-key JOB, affa --run JOB, affa --make-cronjobs",
        DEFAULT_CONFIG_DIR
    ));
    Ok(done.join("\n"))
}
