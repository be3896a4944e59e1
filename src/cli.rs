//! The command line of the `affa` binary (a module of main.rs, not of the library): Affa 3's
//! long options (`affa --run JOB`, `--list-archives [--csv] [JOB...]`, `--full-restore JOB
//! [ARCHIVE] --preserve-newer=no`, the internal `--_cronupdate`, `--_jobs` ...) parsed by clap into
//! [`Cli`], then checked and turned into one typed [`Action`] by [`action`].
//!
//! Owns: the option syntax, the usage lines, every usage error (one line naming the option and
//! what was expected: a missing or extra argument, two actions, an option the action does not
//! take). Must never: read a configuration file, touch the disk or the network, or print (main
//! prints the error): an [`Action`] is only what the person asked for.

use std::path::PathBuf;

use affa::archive::Level;
use clap::Parser;

/// The command line as clap reads it: one flag per action, the options, the positional arguments.
/// [`action`] checks it and makes it an [`Action`].
#[derive(Parser, Debug)]
#[command(
    name = "affa",
    version = env!("AFFA_VERSION"),
    about = "Rotating backups of Linux hosts and running ESXi VMs over ssh + rsync (Affa 3 compatible)",
    infer_long_args = true,
    after_help = "Any unique prefix of an option works (--list for --list-archives). Destructive actions ask you to type 'proceed'; --yes answers for scripts."
)]
pub struct Cli {
    /// Run a job now: JOB [scheduled|daily|weekly|monthly|yearly]
    #[arg(long, alias = "backup")]
    run: bool,
    /// Check every configuration file and exit
    #[arg(long)]
    configcheck: bool,
    /// List the archives of the given jobs (all when none): [JOB...]
    #[arg(long)]
    list_archives: bool,
    /// Show the status of every job
    #[arg(long)]
    status: bool,
    /// Install affa's ssh key on the hosts of the given jobs (all when none): [JOB...]
    #[arg(long, alias = "send-keys")]
    send_key: bool,
    /// Install affa-agent on the hosts of the given jobs (none: every job with chunkFiles and chunkTransport not rsync): [JOB...]
    #[arg(long)]
    install_agent: bool,
    /// Remove affa's ssh key from the host of JOB
    #[arg(long)]
    revoke_key: bool,
    /// Check the ssh connection of the given jobs (all when none): [JOB...]
    #[arg(long)]
    check_connections: bool,
    /// Delete the archives of JOB beyond its Keep values
    #[arg(long)]
    cleanup: bool,
    /// Delete JOB: its archives and its configuration section
    #[arg(long)]
    delete_job: bool,
    /// Rename JOB to NEW (archives, configuration, known host)
    #[arg(long)]
    rename_job: bool,
    /// Move the archives of JOB to a new RootDir: JOB DIR
    #[arg(long)]
    move_archive: bool,
    /// Stop the running JOB (its ESXi snapshot is removed first)
    #[arg(long)]
    kill: bool,
    /// Show the end of the log of JOB (or of the global log)
    #[arg(long)]
    log_tail: bool,
    /// Show the free space of every RootDir
    #[arg(long)]
    disk_usage: bool,
    /// Print every configuration key with its default
    #[arg(long)]
    show_default_config: bool,
    /// Describe one configuration key: KEY
    #[arg(long)]
    show_property: bool,
    /// Copy an archive (default the newest) to the job's S3 bucket (offsiteTarget), encrypted: JOB [ARCHIVE]; with --list-archives: list the offsite archives
    #[arg(long)]
    offsite: bool,
    /// Check every object of the job's offsite archives: present, decrypting, hashing to its id: JOB
    #[arg(long)]
    offsite_verify: bool,
    /// Remove the bucket's chunk objects no offsite archive references, older than offsiteCleanupGrace: JOB
    #[arg(long)]
    offsite_cleanup: bool,
    /// Rebuild the chunked files of an archive as plain files: JOB ARCHIVE [--to DIR]
    #[arg(long)]
    unchunk: bool,
    /// Check every chunk an archive references: JOB [ARCHIVE|--all]
    #[arg(long)]
    verify: bool,
    /// Read back today's slice (1/scrubDays) of every chunk pool and check it; damaged chunks leave the pool: [--all]
    #[arg(long)]
    scrub: bool,
    /// Restore an archive (default the newest) to its host: JOB [ARCHIVE]
    #[arg(long)]
    full_restore: bool,
    /// Write the cron file from every job's TimeSchedule, killAt, resumeKilledAt
    #[arg(long)]
    make_cronjobs: bool,
    /// Draw the day's schedule of every enabled job
    #[arg(long)]
    show_schedule: bool,
    /// Restart the jobs a reboot or a kill interrupted (resumeAfterBoot=yes)
    #[arg(long)]
    resume_interrupted: bool,
    /// Stop every running job
    #[arg(long)]
    killall: bool,
    /// Send a test mail to the recipients of JOB
    #[arg(long)]
    mailtest: bool,
    /// Mail the status, disk usage and archive lists
    #[arg(long)]
    send_status: bool,
    /// Nagios/NRPE plugin output and exit code for the given jobs (all when none): [JOB...]
    #[arg(long)]
    nrpe: bool,
    /// Write the Prometheus textfile (metricsFile) for node_exporter
    #[arg(long)]
    metrics: bool,
    /// Write the Samba share files of jobs with SambaShare=yes and reload Samba
    #[arg(long)]
    samba_shares: bool,
    /// Install affa as the package does: /usr/sbin/affa, the agent, man pages, completion, /etc/affa samples, state dirs, cron file, logrotate
    #[arg(long)]
    install: bool,
    /// Show the configuration file of each job: [--csv] [JOB...]
    #[arg(long)]
    show_config_pathes: bool,
    /// Write the NRPE command file (one check per monitored job), include it in nrpe.cfg, restart NRPE
    #[arg(long)]
    init_nrpe: bool,
    /// Mount the archives of JOB read-only (FUSE; chunked files as plain files): JOB [ARCHIVE] DIR
    #[arg(long)]
    mount: bool,
    /// Unmount an affa mount: DIR
    #[arg(long)]
    umount: bool,
    /// Affa 3's cron file: rewrite the cron file if the configuration changed
    #[arg(long = "_cronupdate", hide = true)]
    cronupdate: bool,
    /// Affa 3's bash completion: the job names
    #[arg(long = "_jobs", hide = true)]
    jobs: bool,
    /// The package's postinst: the state directories and the cron file of the configuration
    #[arg(long = "_setup", hide = true)]
    setup: bool,
    /// Affa 3's bash completion: the usage lines
    #[arg(long = "_shorthelp", hide = true)]
    shorthelp: bool,
    /// Affa 3's NRPE command: the monitored jobs, then #OK (and --init-nrpe)
    #[arg(long = "_jobsnrpe", hide = true)]
    jobsnrpe: bool,
    /// The SMTP session of a mail, run by affa itself in a child it kills at the mail's deadline
    #[arg(long = "_smtp", hide = true)]
    smtp: bool,
    /// Affa 3 on SME Server only (turn this box into the backed-up server); refused
    #[arg(long, hide = true)]
    rise: bool,
    /// Affa 3 on SME Server only; refused
    #[arg(long, hide = true)]
    undo_rise: bool,

    /// Output as CSV (--list-archives, --status, --disk-usage)
    #[arg(long)]
    csv: bool,
    /// Include disabled jobs (--status); every archive (--verify); every pool entry (--scrub)
    #[arg(long)]
    all: bool,
    /// Answer 'proceed' to every confirmation
    #[arg(long)]
    yes: bool,
    /// Print nothing but errors (as under cron)
    #[arg(long)]
    pub silent: bool,
    /// Log verbosely, as Debug=yes in every job
    #[arg(long)]
    debug: bool,
    /// Target directory (--unchunk)
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,
    /// Re-run the killed job after SECS seconds (--kill)
    #[arg(long, value_name = "SECS")]
    resume: Option<u64>,
    /// --full-restore: keep files that are newer on the target (yes|no, default yes; ordinary jobs only, a VM is restored as one set)
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    preserve_newer: Option<bool>,
    /// --full-restore: delete files on the target that are not in the archive (yes|no, default no)
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    delete: Option<bool>,
    /// --full-restore of a VM: another directory on the datastore
    #[arg(long, value_name = "NAME")]
    to_dir: Option<String>,
    /// --full-restore of a VM: another datastore
    #[arg(long, value_name = "DS")]
    to_datastore: Option<String>,
    /// --full-restore of a VM: another ESXi host (a host name or the name of a job for that host)
    #[arg(long, value_name = "HOST|JOB")]
    to_host: Option<String>,
    /// --full-restore --to-host: the API user on that host
    #[arg(long, value_name = "USER")]
    to_user: Option<String>,
    /// --full-restore --to-host: a file (mode 0600) holding that user's password
    #[arg(long, value_name = "FILE")]
    to_password_file: Option<PathBuf>,
    /// --full-restore --to-host: SHA-256 fingerprint of that host's certificate
    #[arg(long, value_name = "SHA256")]
    to_thumbprint: Option<String>,
    /// --full-restore --to-host: ssh port of that host
    #[arg(long, value_name = "PORT")]
    to_ssh_port: Option<u16>,
    /// --full-restore of a VM: register the restored VM under NAME
    #[arg(long, value_name = "NAME")]
    register: Option<String>,
    /// --full-restore: restore the job's offsite archive (ARCHIVE: its Date or name) straight from the bucket
    #[arg(long)]
    from_offsite: bool,
    /// --full-restore: print what would be copied where, change nothing
    #[arg(long)]
    dry_run: bool,
    /// --install: install under this directory instead of /
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,
    /// --install: the static affa-agent to install (default: affa-agent next to affa)
    #[arg(long, value_name = "FILE")]
    agent: Option<PathBuf>,
    /// --mount: stay in the foreground (default: detach once the mount is ready)
    #[arg(long)]
    foreground: bool,
    /// Configuration directory (default $AFFA_CONFIG_DIR or /etc/affa)
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Job names and other arguments of the action
    #[arg(value_name = "ARGS")]
    args: Vec<String>,
}

fn yes_no(v: &str) -> std::result::Result<bool, String> {
    match v {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("'{v}' is not valid; expected yes or no")),
    }
}

/// The usage lines (`--_shorthelp`, read by Affa 3's bash completion: option in field 3, `JOB`
/// when the option takes job names).
pub const USAGE: &[&str] = &[
    "--run JOB [scheduled|daily|weekly|monthly|yearly]",
    "--configcheck",
    "--make-cronjobs",
    "--send-key [JOB JOB ...]",
    "--install-agent [JOB JOB ...]",
    "--check-connections [JOB JOB ...]",
    "--resume-interrupted",
    "--full-restore [--preserve-newer=no] [--delete=yes] [--from-offsite] JOB [ARCHIVE]",
    "--list-archives [--csv|--offsite] [JOB JOB ...]",
    "--status [--csv] [--all]",
    "--show-config-pathes [--csv] [JOB JOB ...]",
    "--show-default-config",
    "--show-schedule [--all]",
    "--show-property PROPERTY",
    "--log-tail [JOB]",
    "--send-status",
    "--disk-usage [--csv]",
    "--cleanup JOB",
    "--rename-job JOB NEWNAME",
    "--move-archive JOB NEWROOTDIR",
    "--delete-job [--revoke-key] JOB",
    "--revoke-key JOB",
    "--kill JOB [--resume=SECS]",
    "--killall",
    "--mailtest JOB",
    "--nrpe [JOB JOB ...]",
    "--init-nrpe",
    "--verify JOB [ARCHIVE|--all]",
    "--scrub [--all]",
    "--unchunk JOB ARCHIVE [--to DIR] [--from-offsite]",
    "--offsite JOB [ARCHIVE]",
    "--offsite-verify JOB",
    "--offsite-cleanup JOB",
    "--metrics",
    "--samba-shares",
    "--mount [--foreground] JOB [ARCHIVE] DIR",
    "--umount DIR",
    "--install [--prefix DIR] [--agent FILE]",
    "--version",
    "--help",
];

pub fn short_help() -> String {
    USAGE.iter().enumerate().map(|(i, u)| format!("{} affa {u}\n", if i == 0 { "Usage:" } else { "  or  " })).collect()
}

/// A usage error: one line naming the option and what it expected (exit code 2, as clap's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which archives `--verify` checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Archives {
    /// The newest complete one.
    Newest,
    Named(String),
    /// `--all`
    All,
}

/// What `--full-restore` was asked for (the command line's part of `affa::restore::RestoreOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restore {
    pub archive: Option<String>,
    pub preserve_newer: bool,
    pub delete: bool,
    pub to_dir: Option<String>,
    pub to_datastore: Option<String>,
    pub to_host: Option<String>,
    pub to_user: Option<String>,
    pub to_password_file: Option<PathBuf>,
    pub to_thumbprint: Option<String>,
    pub to_ssh_port: Option<u16>,
    pub register: Option<String>,
    pub dry_run: bool,
    pub from_offsite: bool,
}

/// One thing the person asked affa to do, with its arguments typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run {
        job: String,
        level: Level,
    },
    ConfigCheck,
    ListArchives {
        jobs: Vec<String>,
        csv: bool,
    },
    Status {
        csv: bool,
        all: bool,
    },
    SendKey {
        jobs: Vec<String>,
    },
    InstallAgent {
        jobs: Vec<String>,
    },
    RevokeKey {
        job: String,
    },
    CheckConnections {
        jobs: Vec<String>,
    },
    Cleanup {
        job: String,
    },
    DeleteJob {
        job: String,
        revoke_key: bool,
    },
    RenameJob {
        job: String,
        new: String,
    },
    MoveArchive {
        job: String,
        root: String,
    },
    Kill {
        job: String,
        resume: Option<u64>,
    },
    KillAll,
    LogTail {
        job: Option<String>,
    },
    DiskUsage {
        csv: bool,
    },
    ShowDefaultConfig,
    ShowProperty {
        key: String,
    },
    Unchunk {
        job: String,
        archive: String,
        to: Option<PathBuf>,
        /// `--from-offsite`: the offsite archive, from the bucket.
        from_offsite: bool,
    },
    Verify {
        job: String,
        archives: Archives,
    },
    /// `--scrub [--all]`
    Scrub {
        all: bool,
    },
    /// `--offsite JOB [ARCHIVE]`
    Offsite {
        job: String,
        archive: Option<String>,
    },
    /// `--offsite-verify JOB`
    OffsiteVerify {
        job: String,
    },
    /// `--offsite-cleanup JOB`
    OffsiteCleanup {
        job: String,
    },
    /// `--list-archives --offsite [JOB...]`
    ListOffsite {
        jobs: Vec<String>,
    },
    FullRestore {
        job: String,
        restore: Restore,
    },
    MakeCronjobs,
    ShowSchedule {
        all: bool,
    },
    ResumeInterrupted,
    MailTest {
        job: String,
    },
    SendStatus,
    Nrpe {
        jobs: Vec<String>,
    },
    Metrics,
    SambaShares,
    Install {
        prefix: Option<PathBuf>,
        agent: Option<PathBuf>,
    },
    ShowConfigPathes {
        jobs: Vec<String>,
        csv: bool,
    },
    InitNrpe,
    /// `--mount JOB [ARCHIVE] DIR`: the archives (or one) as a read-only file system.
    Mount {
        job: String,
        archive: Option<String>,
        dir: PathBuf,
        foreground: bool,
    },
    /// `--umount DIR`
    Umount {
        dir: PathBuf,
    },
    /// `--_cronupdate`: rewrite the cron file if the configuration changed.
    CronUpdate,
    /// `--_jobs`: the job names (bash completion).
    JobNames,
    /// `--_setup`: the state directories and the cron file (the package's postinst).
    Setup,
    /// `--_shorthelp`: the usage lines (bash completion).
    ShortHelp,
    /// `--_jobsnrpe`: the monitored jobs, then `#OK` (NRPE).
    JobsNrpe,
    /// `--_smtp`: the SMTP session of a mail (affa's own child; the mail and its settings on
    /// stdin, `notify::smtp_session`).
    SmtpSession,
    /// `--rise` / `--undo-rise` (`undo`): Affa 3 on SME Server only; refused with a way out.
    Rise {
        undo: bool,
    },
}

/// An [`Action`] and the options every action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub action: Action,
    /// `--yes`: answer 'proceed' to every confirmation.
    pub yes: bool,
    /// `--silent`: nothing but errors (cron).
    pub silent: bool,
    /// `--debug`: Debug=yes in every job.
    pub debug: bool,
    pub config_dir: Option<PathBuf>,
}

/// The usage line of `option` (from [`USAGE`]), or the option alone.
fn usage(option: &str) -> String {
    USAGE.iter().find(|u| u.split(' ').next() == Some(option)).map_or_else(|| option.to_string(), |u| u.to_string())
}

/// The positional arguments of `option`: at least `min`, at most `max`.
fn args(args: &mut Vec<String>, option: &str, min: usize, max: usize) -> Result<Vec<String>, Usage> {
    let a = std::mem::take(args);
    if a.len() < min {
        return Err(Usage(format!("{option}: missing argument; usage: affa {}", usage(option))));
    }
    if a.len() > max {
        return Err(Usage(format!("{option}: unexpected argument '{}'; usage: affa {}", a[max], usage(option))));
    }
    Ok(a)
}

/// Exactly `N` positional arguments.
fn exactly<const N: usize>(a: &mut Vec<String>, option: &str) -> Result<[String; N], Usage> {
    let v = args(a, option, N, N)?;
    Ok(v.try_into().unwrap_or_else(|_| unreachable!("args() checked the count")))
}

/// The action options given on the command line, by name, in the order of `--help`.
fn actions(c: &Cli) -> Vec<&'static str> {
    [
        (c.run, "--run"),
        (c.configcheck, "--configcheck"),
        (c.list_archives, "--list-archives"),
        (c.status, "--status"),
        (c.send_key, "--send-key"),
        (c.install_agent, "--install-agent"),
        (c.revoke_key, "--revoke-key"),
        (c.check_connections, "--check-connections"),
        (c.cleanup, "--cleanup"),
        (c.delete_job, "--delete-job"),
        (c.rename_job, "--rename-job"),
        (c.move_archive, "--move-archive"),
        (c.kill, "--kill"),
        (c.log_tail, "--log-tail"),
        (c.disk_usage, "--disk-usage"),
        (c.show_default_config, "--show-default-config"),
        (c.show_property, "--show-property"),
        (c.unchunk, "--unchunk"),
        (c.offsite, "--offsite"),
        (c.offsite_verify, "--offsite-verify"),
        (c.offsite_cleanup, "--offsite-cleanup"),
        (c.verify, "--verify"),
        (c.scrub, "--scrub"),
        (c.full_restore, "--full-restore"),
        (c.make_cronjobs, "--make-cronjobs"),
        (c.show_schedule, "--show-schedule"),
        (c.resume_interrupted, "--resume-interrupted"),
        (c.killall, "--killall"),
        (c.mailtest, "--mailtest"),
        (c.send_status, "--send-status"),
        (c.nrpe, "--nrpe"),
        (c.metrics, "--metrics"),
        (c.samba_shares, "--samba-shares"),
        (c.install, "--install"),
        (c.show_config_pathes, "--show-config-pathes"),
        (c.init_nrpe, "--init-nrpe"),
        (c.mount, "--mount"),
        (c.umount, "--umount"),
        (c.cronupdate, "--_cronupdate"),
        (c.jobs, "--_jobs"),
        (c.setup, "--_setup"),
        (c.shorthelp, "--_shorthelp"),
        (c.jobsnrpe, "--_jobsnrpe"),
        (c.smtp, "--_smtp"),
        (c.rise, "--rise"),
        (c.undo_rise, "--undo-rise"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

/// The options of one action or a few that were given and not used by the action (the first).
fn leftover(c: &Cli) -> Option<&'static str> {
    [
        (c.csv, "--csv"),
        (c.all, "--all"),
        (c.to.is_some(), "--to"),
        (c.resume.is_some(), "--resume"),
        (c.preserve_newer.is_some(), "--preserve-newer"),
        (c.delete.is_some(), "--delete"),
        (c.to_dir.is_some(), "--to-dir"),
        (c.to_datastore.is_some(), "--to-datastore"),
        (c.to_host.is_some(), "--to-host"),
        (c.to_user.is_some(), "--to-user"),
        (c.to_password_file.is_some(), "--to-password-file"),
        (c.to_thumbprint.is_some(), "--to-thumbprint"),
        (c.to_ssh_port.is_some(), "--to-ssh-port"),
        (c.register.is_some(), "--register"),
        (c.dry_run, "--dry-run"),
        (c.from_offsite, "--from-offsite"),
        (c.prefix.is_some(), "--prefix"),
        (c.agent.is_some(), "--agent"),
        (c.foreground, "--foreground"),
    ]
    .into_iter()
    .find_map(|(set, name)| set.then_some(name))
}

/// Check the parsed command line and turn it into one [`Action`]: exactly one action (or Affa 3's
/// pair `--delete-job --revoke-key`), its arguments counted and typed, and no option it does not
/// take (a `--dry-run` that an action would ignore is refused, not ignored).
pub fn action(mut c: Cli) -> Result<Invocation, Usage> {
    let given = actions(&c);
    let one = match given.as_slice() {
        [] => return Err(Usage("no action given; affa --help lists them".into())),
        [a] => *a,
        ["--revoke-key", "--delete-job"] | ["--delete-job", "--revoke-key"] => "--delete-job",
        ["--list-archives", "--offsite"] => "--list-archives --offsite",
        many => return Err(Usage(format!("{} cannot be used together (one action at a time)", many.join(" and ")))),
    };
    let a = &mut c.args;
    let action = match one {
        "--run" => {
            let v = args(a, one, 1, 2)?;
            let level = match v.get(1) {
                None => Level::Scheduled,
                Some(l) => Level::parse(l).ok_or_else(|| {
                    Usage(format!("--run: unknown level '{l}'; expected scheduled, daily, weekly, monthly or yearly"))
                })?,
            };
            Action::Run { job: v[0].clone(), level }
        }
        "--configcheck" => {
            exactly::<0>(a, one)?;
            Action::ConfigCheck
        }
        "--list-archives --offsite" => Action::ListOffsite { jobs: std::mem::take(a) },
        "--offsite" => {
            let mut v = args(a, one, 1, 2)?;
            let archive = v.get(1).cloned();
            Action::Offsite { job: v.swap_remove(0), archive }
        }
        "--offsite-verify" => {
            let [job] = exactly(a, one)?;
            Action::OffsiteVerify { job }
        }
        "--offsite-cleanup" => {
            let [job] = exactly(a, one)?;
            Action::OffsiteCleanup { job }
        }
        "--list-archives" => Action::ListArchives { jobs: std::mem::take(a), csv: std::mem::take(&mut c.csv) },
        "--status" => {
            exactly::<0>(a, one)?;
            Action::Status { csv: std::mem::take(&mut c.csv), all: std::mem::take(&mut c.all) }
        }
        "--send-key" => Action::SendKey { jobs: std::mem::take(a) },
        "--install-agent" => Action::InstallAgent { jobs: std::mem::take(a) },
        "--revoke-key" => {
            let [job] = exactly(a, one)?;
            Action::RevokeKey { job }
        }
        "--check-connections" => Action::CheckConnections { jobs: std::mem::take(a) },
        "--cleanup" => {
            let [job] = exactly(a, one)?;
            Action::Cleanup { job }
        }
        "--delete-job" => {
            let [job] = exactly(a, one)?;
            Action::DeleteJob { job, revoke_key: c.revoke_key }
        }
        "--rename-job" => {
            let [job, new] = exactly(a, one)?;
            Action::RenameJob { job, new }
        }
        "--move-archive" => {
            let [job, root] = exactly(a, one)?;
            Action::MoveArchive { job, root }
        }
        "--kill" => {
            let [job] = exactly(a, one)?;
            Action::Kill { job, resume: c.resume.take() }
        }
        "--killall" => {
            exactly::<0>(a, one)?;
            Action::KillAll
        }
        "--log-tail" => Action::LogTail { job: args(a, one, 0, 1)?.pop() },
        "--disk-usage" => {
            exactly::<0>(a, one)?;
            Action::DiskUsage { csv: std::mem::take(&mut c.csv) }
        }
        "--show-default-config" => {
            exactly::<0>(a, one)?;
            Action::ShowDefaultConfig
        }
        "--show-property" => {
            let [key] = exactly(a, one)?;
            Action::ShowProperty { key }
        }
        "--unchunk" => {
            let [job, archive] = exactly(a, one)?;
            Action::Unchunk { job, archive, to: c.to.take(), from_offsite: std::mem::take(&mut c.from_offsite) }
        }
        "--verify" => {
            let mut v = args(a, one, 1, 2)?;
            let archive = v.get(1).cloned();
            let archives = match (archive, std::mem::take(&mut c.all)) {
                (None, false) => Archives::Newest,
                (None, true) => Archives::All,
                (Some(n), false) => Archives::Named(n),
                (Some(n), true) => {
                    return Err(Usage(format!(
                        "--verify: archive {n} and --all exclude each other; usage: affa {}",
                        usage(one)
                    )))
                }
            };
            Action::Verify { job: v.swap_remove(0), archives }
        }
        "--scrub" => {
            exactly::<0>(a, one)?;
            Action::Scrub { all: std::mem::take(&mut c.all) }
        }
        "--full-restore" => {
            let mut v = args(a, one, 1, 2)?;
            if c.to_host.is_none() {
                for (set, name) in [
                    (c.to_user.is_some(), "--to-user"),
                    (c.to_password_file.is_some(), "--to-password-file"),
                    (c.to_thumbprint.is_some(), "--to-thumbprint"),
                    (c.to_ssh_port.is_some(), "--to-ssh-port"),
                ] {
                    if set {
                        return Err(Usage(format!(
                            "{name} goes with --to-host HOST (the other ESXi host it describes)"
                        )));
                    }
                }
            }
            let restore = Restore {
                archive: v.get(1).cloned(),
                preserve_newer: c.preserve_newer.take().unwrap_or(true),
                delete: c.delete.take().unwrap_or(false),
                to_dir: c.to_dir.take(),
                to_datastore: c.to_datastore.take(),
                to_host: c.to_host.take(),
                to_user: c.to_user.take(),
                to_password_file: c.to_password_file.take(),
                to_thumbprint: c.to_thumbprint.take(),
                to_ssh_port: c.to_ssh_port.take(),
                register: c.register.take(),
                dry_run: std::mem::take(&mut c.dry_run),
                from_offsite: std::mem::take(&mut c.from_offsite),
            };
            Action::FullRestore { job: v.swap_remove(0), restore }
        }
        "--make-cronjobs" => {
            exactly::<0>(a, one)?;
            Action::MakeCronjobs
        }
        "--show-schedule" => {
            exactly::<0>(a, one)?;
            Action::ShowSchedule { all: std::mem::take(&mut c.all) }
        }
        "--resume-interrupted" => {
            exactly::<0>(a, one)?;
            Action::ResumeInterrupted
        }
        "--mailtest" => {
            let [job] = exactly(a, one)?;
            Action::MailTest { job }
        }
        "--send-status" => {
            exactly::<0>(a, one)?;
            Action::SendStatus
        }
        "--nrpe" => Action::Nrpe { jobs: std::mem::take(a) },
        "--metrics" => {
            exactly::<0>(a, one)?;
            Action::Metrics
        }
        "--samba-shares" => {
            exactly::<0>(a, one)?;
            Action::SambaShares
        }
        "--install" => {
            exactly::<0>(a, one)?;
            Action::Install { prefix: c.prefix.take(), agent: c.agent.take() }
        }
        "--show-config-pathes" => Action::ShowConfigPathes { jobs: std::mem::take(a), csv: std::mem::take(&mut c.csv) },
        "--init-nrpe" => {
            exactly::<0>(a, one)?;
            Action::InitNrpe
        }
        "--mount" => {
            let mut v = args(a, one, 2, 3)?;
            let dir = PathBuf::from(v.pop().unwrap_or_default());
            let archive = (v.len() == 2).then(|| v.swap_remove(1));
            Action::Mount { job: v.swap_remove(0), archive, dir, foreground: std::mem::take(&mut c.foreground) }
        }
        "--umount" => {
            let [dir] = exactly(a, one)?;
            Action::Umount { dir: PathBuf::from(dir) }
        }
        "--_cronupdate" => {
            exactly::<0>(a, one)?;
            Action::CronUpdate
        }
        "--_setup" => {
            exactly::<0>(a, one)?;
            Action::Setup
        }
        // Called by Affa 3's bash completion and NRPE file: whatever follows is ignored, as there.
        "--_jobs" => Action::JobNames,
        "--_shorthelp" => Action::ShortHelp,
        "--_jobsnrpe" => Action::JobsNrpe,
        "--_smtp" => {
            exactly::<0>(a, one)?;
            Action::SmtpSession
        }
        "--rise" => Action::Rise { undo: false },
        "--undo-rise" => Action::Rise { undo: true },
        other => unreachable!("action {other} has no arm"),
    };
    if let Some(opt) = leftover(&c) {
        return Err(Usage(format!("{opt} does not apply to {one}; usage: affa {}", usage(one))));
    }
    Ok(Invocation { action, yes: c.yes, silent: c.silent, debug: c.debug, config_dir: c.config_dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Invocation, Usage> {
        let cli = Cli::try_parse_from(std::iter::once("affa").chain(argv.iter().copied())).expect("clap accepts it");
        action(cli)
    }

    fn act(argv: &[&str]) -> Action {
        parse(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).action
    }

    fn usage_error(argv: &[&str]) -> String {
        match parse(argv) {
            Ok(i) => panic!("{argv:?} should be a usage error, got {i:?}"),
            Err(Usage(m)) => {
                assert!(!m.contains('\n'), "one line: {m}");
                m
            }
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn each_action_from_its_argv() {
        let j = || "web".to_string();
        let cases: Vec<(&[&str], Action)> = vec![
            (&["--run", "web"], Action::Run { job: j(), level: Level::Scheduled }),
            (&["--run", "web", "weekly"], Action::Run { job: j(), level: Level::Weekly }),
            (&["--backup", "web", "daily"], Action::Run { job: j(), level: Level::Daily }),
            (&["--configcheck"], Action::ConfigCheck),
            (&["--list-archives"], Action::ListArchives { jobs: vec![], csv: false }),
            (&["--list", "--csv", "a", "b"], Action::ListArchives { jobs: s(&["a", "b"]), csv: true }),
            (&["--status", "--csv", "--all"], Action::Status { csv: true, all: true }),
            (&["--send-key", "a", "b"], Action::SendKey { jobs: s(&["a", "b"]) }),
            (&["--send-keys"], Action::SendKey { jobs: vec![] }),
            (&["--install-agent", "a"], Action::InstallAgent { jobs: s(&["a"]) }),
            (&["--revoke-key", "web"], Action::RevokeKey { job: j() }),
            (&["--check-connections"], Action::CheckConnections { jobs: vec![] }),
            (&["--cleanup", "web"], Action::Cleanup { job: j() }),
            (&["--delete-job", "web"], Action::DeleteJob { job: j(), revoke_key: false }),
            (&["--delete-job", "--revoke-key", "web"], Action::DeleteJob { job: j(), revoke_key: true }),
            (&["--revoke-key", "web", "--delete-job"], Action::DeleteJob { job: j(), revoke_key: true }),
            (&["--rename-job", "web", "www"], Action::RenameJob { job: j(), new: "www".into() }),
            (&["--move-archive", "web", "/mnt/b"], Action::MoveArchive { job: j(), root: "/mnt/b".into() }),
            (&["--kill", "web"], Action::Kill { job: j(), resume: None }),
            (&["--kill", "web", "--resume=30"], Action::Kill { job: j(), resume: Some(30) }),
            (&["--killall"], Action::KillAll),
            (&["--log-tail"], Action::LogTail { job: None }),
            (&["--log-tail", "web"], Action::LogTail { job: Some(j()) }),
            (&["--disk-usage", "--csv"], Action::DiskUsage { csv: true }),
            (&["--show-default-config"], Action::ShowDefaultConfig),
            (&["--show-property", "Include"], Action::ShowProperty { key: "Include".into() }),
            (
                &["--unchunk", "web", "daily.0", "--to", "/tmp/x"],
                Action::Unchunk { job: j(), archive: "daily.0".into(), to: Some("/tmp/x".into()), from_offsite: false },
            ),
            (&["--verify", "web"], Action::Verify { job: j(), archives: Archives::Newest }),
            (&["--verify", "web", "--all"], Action::Verify { job: j(), archives: Archives::All }),
            (&["--scrub"], Action::Scrub { all: false }),
            (&["--scrub", "--all"], Action::Scrub { all: true }),
            (
                &["--verify", "web", "scheduled.1"],
                Action::Verify { job: j(), archives: Archives::Named("scheduled.1".into()) },
            ),
            (
                &["--full-restore", "web"],
                Action::FullRestore { job: j(), restore: Restore { preserve_newer: true, ..Restore::default() } },
            ),
            (
                &["--full-restore", "web", "daily.2", "--preserve-newer=no", "--delete=yes", "--dry-run"],
                Action::FullRestore {
                    job: j(),
                    restore: Restore {
                        archive: Some("daily.2".into()),
                        preserve_newer: false,
                        delete: true,
                        dry_run: true,
                        ..Restore::default()
                    },
                },
            ),
            (
                &[
                    "--full-restore",
                    "esx",
                    "--to-host",
                    "10.0.0.9",
                    "--to-user",
                    "root",
                    "--to-password-file",
                    "/root/pw",
                    "--to-thumbprint",
                    "AB:CD",
                    "--to-ssh-port",
                    "2222",
                    "--to-dir",
                    "vm-r",
                    "--to-datastore",
                    "ds2",
                    "--register",
                    "vm-r",
                ],
                Action::FullRestore {
                    job: "esx".into(),
                    restore: Restore {
                        preserve_newer: true,
                        to_host: Some("10.0.0.9".into()),
                        to_user: Some("root".into()),
                        to_password_file: Some("/root/pw".into()),
                        to_thumbprint: Some("AB:CD".into()),
                        to_ssh_port: Some(2222),
                        to_dir: Some("vm-r".into()),
                        to_datastore: Some("ds2".into()),
                        register: Some("vm-r".into()),
                        ..Restore::default()
                    },
                },
            ),
            (&["--make-cronjobs"], Action::MakeCronjobs),
            (&["--show-schedule", "--all"], Action::ShowSchedule { all: true }),
            (&["--resume-interrupted"], Action::ResumeInterrupted),
            (&["--mailtest", "web"], Action::MailTest { job: j() }),
            (&["--send-status"], Action::SendStatus),
            (&["--nrpe", "a"], Action::Nrpe { jobs: s(&["a"]) }),
            (&["--metrics"], Action::Metrics),
            (&["--samba-shares"], Action::SambaShares),
            (&["--install", "--prefix", "/tmp/p"], Action::Install { prefix: Some("/tmp/p".into()), agent: None }),
            (&["--install", "--agent", "/tmp/a"], Action::Install { prefix: None, agent: Some("/tmp/a".into()) }),
            (&["--show-config-pathes", "--csv", "a"], Action::ShowConfigPathes { jobs: s(&["a"]), csv: true }),
            (&["--init-nrpe"], Action::InitNrpe),
            (&["--_cronupdate"], Action::CronUpdate),
            (&["--_setup"], Action::Setup),
            (&["--_jobs"], Action::JobNames),
            (&["--_shorthelp"], Action::ShortHelp),
            (&["--_jobsnrpe"], Action::JobsNrpe),
            (&["--_smtp"], Action::SmtpSession),
            (&["--rise"], Action::Rise { undo: false }),
            (&["--undo-rise"], Action::Rise { undo: true }),
        ];
        for (argv, want) in cases {
            assert_eq!(act(argv), want, "{argv:?}");
        }
    }

    #[test]
    fn global_options_go_with_every_action() {
        let i = parse(&["--silent", "--debug", "--yes", "--config-dir", "/etc/x", "--cleanup", "web"]).unwrap();
        assert_eq!(i.action, Action::Cleanup { job: "web".into() });
        assert!(i.silent && i.debug && i.yes);
        assert_eq!(i.config_dir, Some(PathBuf::from("/etc/x")));
        let i = parse(&["--status"]).unwrap();
        assert!(!i.silent && !i.debug && !i.yes && i.config_dir.is_none());
    }

    #[test]
    fn missing_and_extra_arguments_name_the_option_and_its_usage() {
        for (argv, want) in [
            (&["--run"][..], "--run: missing argument; usage: affa --run JOB [scheduled|daily|weekly|monthly|yearly]"),
            (&["--run", "a", "daily", "b"], "--run: unexpected argument 'b'; usage: affa --run JOB"),
            (&["--cleanup"], "--cleanup: missing argument; usage: affa --cleanup JOB"),
            (&["--cleanup", "a", "b"], "--cleanup: unexpected argument 'b'; usage: affa --cleanup JOB"),
            (&["--rename-job", "a"], "--rename-job: missing argument; usage: affa --rename-job JOB NEWNAME"),
            (&["--move-archive", "a", "b", "c"], "--move-archive: unexpected argument 'c'"),
            (&["--unchunk", "a"], "--unchunk: missing argument; usage: affa --unchunk JOB ARCHIVE [--to DIR]"),
            (&["--verify"], "--verify: missing argument; usage: affa --verify JOB [ARCHIVE|--all]"),
            (&["--full-restore"], "--full-restore: missing argument"),
            (&["--full-restore", "a", "b", "c"], "--full-restore: unexpected argument 'c'"),
            (
                &["--delete-job", "--revoke-key"],
                "--delete-job: missing argument; usage: affa --delete-job [--revoke-key] JOB",
            ),
            (&["--log-tail", "a", "b"], "--log-tail: unexpected argument 'b'; usage: affa --log-tail [JOB]"),
            (&["--kill"], "--kill: missing argument; usage: affa --kill JOB [--resume=SECS]"),
            (&["--mailtest"], "--mailtest: missing argument"),
            (&["--revoke-key"], "--revoke-key: missing argument"),
            (&["--show-property"], "--show-property: missing argument; usage: affa --show-property PROPERTY"),
            (&["--status", "web"], "--status: unexpected argument 'web'"),
            (&["--killall", "web"], "--killall: unexpected argument 'web'"),
            (&["--_cronupdate", "x"], "--_cronupdate: unexpected argument 'x'; usage: affa --_cronupdate"),
            (
                &["--install", "x"],
                "--install: unexpected argument 'x'; usage: affa --install [--prefix DIR] [--agent FILE]",
            ),
            (&["--_setup", "x"], "--_setup: unexpected argument 'x'; usage: affa --_setup"),
            (
                &["--run", "a", "hourly"],
                "--run: unknown level 'hourly'; expected scheduled, daily, weekly, monthly or yearly",
            ),
        ] {
            let m = usage_error(argv);
            assert!(m.starts_with(want), "{argv:?}: {m}");
        }
    }

    #[test]
    fn one_action_at_a_time() {
        assert_eq!(usage_error(&[]), "no action given; affa --help lists them");
        assert_eq!(usage_error(&["--csv", "web"]), "no action given; affa --help lists them");
        assert_eq!(
            usage_error(&["--revoke-key", "--status"]),
            "--status and --revoke-key cannot be used together (one action at a time)"
        );
        assert_eq!(
            usage_error(&["--run", "a", "--full-restore", "--_jobs"]),
            "--run and --full-restore and --_jobs cannot be used together (one action at a time)"
        );
        // Affa 3's one pair is not a conflict, but a third action is.
        assert!(usage_error(&["--delete-job", "--revoke-key", "--kill", "a"]).contains("cannot be used together"));
    }

    #[test]
    fn an_option_the_action_does_not_take_is_refused_not_ignored() {
        for (argv, want) in [
            (&["--delete-job", "web", "--dry-run"][..], "--dry-run does not apply to --delete-job"),
            (&["--cleanup", "web", "--dry-run"], "--dry-run does not apply to --cleanup"),
            (&["--run", "web", "--csv"], "--csv does not apply to --run"),
            (&["--verify", "web", "--csv"], "--csv does not apply to --verify"),
            (&["--list-archives", "--all"], "--all does not apply to --list-archives"),
            (&["--full-restore", "web", "--to", "/x"], "--to does not apply to --full-restore"),
            (&["--unchunk", "web", "daily.0", "--to-dir", "x"], "--to-dir does not apply to --unchunk"),
            (&["--cleanup", "web", "--resume=5"], "--resume does not apply to --cleanup"),
            (&["--status", "--prefix", "/p"], "--prefix does not apply to --status"),
            (&["--_setup", "--agent", "/a"], "--agent does not apply to --_setup"),
            (&["--kill", "web", "--register", "x"], "--register does not apply to --kill"),
            (&["--_jobs", "--preserve-newer=no"], "--preserve-newer does not apply to --_jobs"),
            (&["--verify", "web", "daily.0", "--all"], "--verify: archive daily.0 and --all exclude each other"),
            (&["--full-restore", "esx", "--to-thumbprint", "AB"], "--to-thumbprint goes with --to-host"),
            (&["--full-restore", "esx", "--to-ssh-port", "22"], "--to-ssh-port goes with --to-host"),
        ] {
            let m = usage_error(argv);
            assert!(m.starts_with(want), "{argv:?}: {m}");
        }
    }

    #[test]
    fn the_internal_completion_actions_ignore_what_follows_as_in_affa3() {
        assert_eq!(act(&["--_jobs", "x"]), Action::JobNames);
        assert_eq!(act(&["--_shorthelp", "affa", "li"]), Action::ShortHelp);
    }

    #[test]
    fn every_usage_line_names_an_option_clap_knows() {
        let cmd = <Cli as clap::CommandFactory>::command();
        for u in USAGE {
            let opt = u.split(' ').next().unwrap().trim_start_matches("--");
            assert!(cmd.get_arguments().any(|a| a.get_long() == Some(opt)) || opt == "version" || opt == "help", "{u}");
        }
        assert!(short_help().starts_with("Usage: affa --run JOB"));
    }

    #[test]
    fn offsite_actions() {
        let web = || "web".to_string();
        assert_eq!(act(&["--offsite", "web"]), Action::Offsite { job: web(), archive: None });
        assert_eq!(
            act(&["--offsite", "web", "daily.2"]),
            Action::Offsite { job: web(), archive: Some("daily.2".into()) }
        );
        assert_eq!(act(&["--offsite-verify", "web"]), Action::OffsiteVerify { job: web() });
        assert_eq!(act(&["--offsite-cleanup", "web"]), Action::OffsiteCleanup { job: web() });
        assert_eq!(act(&["--list-archives", "--offsite", "web"]), Action::ListOffsite { jobs: vec![web()] });
        assert_eq!(act(&["--offsite", "--list-archives"]), Action::ListOffsite { jobs: vec![] });
        assert!(
            usage_error(&["--offsite"]).starts_with("--offsite: missing argument; usage: affa --offsite JOB [ARCHIVE]")
        );
        assert!(usage_error(&["--offsite-verify", "web", "x"]).starts_with("--offsite-verify: unexpected argument 'x'"));
        assert_eq!(
            act(&["--full-restore", "web", "202612010100", "--from-offsite"]),
            Action::FullRestore {
                job: web(),
                restore: Restore {
                    archive: Some("202612010100".into()),
                    preserve_newer: true,
                    from_offsite: true,
                    ..Restore::default()
                }
            }
        );
        assert!(
            usage_error(&["--offsite", "web", "--from-offsite"]).contains("--from-offsite does not apply to --offsite")
        );
        assert!(usage_error(&["--list-archives", "--offsite", "--csv"])
            .starts_with("--csv does not apply to --list-archives --offsite"));
        assert!(usage_error(&["--offsite", "web", "--offsite-verify"]).contains("cannot be used together"));
    }

    #[test]
    fn mount_and_umount() {
        let m = |job: &str, archive: Option<&str>, dir: &str, foreground: bool| Action::Mount {
            job: job.into(),
            archive: archive.map(String::from),
            dir: PathBuf::from(dir),
            foreground,
        };
        assert_eq!(act(&["--mount", "web", "/mnt/x"]), m("web", None, "/mnt/x", false));
        assert_eq!(
            act(&["--mount", "web", "daily.3", "/mnt/x", "--foreground"]),
            m("web", Some("daily.3"), "/mnt/x", true)
        );
        assert_eq!(act(&["--umount", "/mnt/x"]), Action::Umount { dir: PathBuf::from("/mnt/x") });
        assert!(usage_error(&["--mount", "web"]).starts_with("--mount: missing argument; usage: affa --mount"));
        assert!(usage_error(&["--mount", "web", "a", "b", "c"]).starts_with("--mount: unexpected argument 'c'"));
        assert!(usage_error(&["--umount"]).starts_with("--umount: missing argument"));
        assert!(usage_error(&["--umount", "/x", "--foreground"]).starts_with("--foreground does not apply to --umount"));
    }
}
