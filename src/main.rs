//! The `affa` command: parse Affa's long options, dispatch to the library, print one-line
//! errors. No logic lives here; what a terminal shows is drawn by `render`.

mod render;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, CommandFactory, FromArgMatches, Parser};

use affa::archive::Level;
use affa::config::{self, Config};
use affa::{commands, Result};

#[derive(Parser, Debug)]
#[command(
    name = "affa",
    version,
    about = "Rotating backups of Linux hosts and running ESXi VMs over ssh + rsync (Affa 3 compatible)",
    infer_long_args = true,
    group(ArgGroup::new("action").multiple(true)),
    after_help = "Any unique prefix of an option works (--list for --list-archives). Destructive actions ask you to type 'proceed'; --yes answers for scripts."
)]
struct Cli {
    /// Run a job now: JOB [scheduled|daily|weekly|monthly|yearly]
    #[arg(long, group = "action", alias = "backup")]
    run: bool,
    /// Check every configuration file and exit
    #[arg(long, group = "action")]
    configcheck: bool,
    /// List the archives of the given jobs (all when none): [JOB...]
    #[arg(long, group = "action")]
    list_archives: bool,
    /// Show the status of every job
    #[arg(long, group = "action")]
    status: bool,
    /// Install affa's ssh key on the hosts of the given jobs (all when none): [JOB...]
    #[arg(long, group = "action", alias = "send-keys")]
    send_key: bool,
    /// Remove affa's ssh key from the host of JOB
    #[arg(long, group = "action")]
    revoke_key: bool,
    /// Check the ssh connection of the given jobs (all when none): [JOB...]
    #[arg(long, group = "action")]
    check_connections: bool,
    /// Delete the archives of JOB beyond its Keep values
    #[arg(long, group = "action")]
    cleanup: bool,
    /// Delete JOB: its archives and its configuration section
    #[arg(long, group = "action")]
    delete_job: bool,
    /// Rename JOB to NEW (archives, configuration, known host)
    #[arg(long, group = "action")]
    rename_job: bool,
    /// Move the archives of JOB to a new RootDir: JOB DIR
    #[arg(long, group = "action")]
    move_archive: bool,
    /// Stop the running JOB (its ESXi snapshot is removed first)
    #[arg(long, group = "action")]
    kill: bool,
    /// Show the end of the log of JOB (or of the global log)
    #[arg(long, group = "action")]
    log_tail: bool,
    /// Show the free space of every RootDir
    #[arg(long, group = "action")]
    disk_usage: bool,
    /// Print every configuration key with its default
    #[arg(long, group = "action")]
    show_default_config: bool,
    /// Describe one configuration key: KEY
    #[arg(long, group = "action")]
    show_property: bool,
    /// Rebuild the chunked files of an archive as plain files: JOB ARCHIVE [--to DIR]
    #[arg(long, group = "action")]
    unchunk: bool,
    /// Check every chunk an archive references: JOB [ARCHIVE|--all]
    #[arg(long, group = "action")]
    verify: bool,
    /// Restore an archive (default the newest) to its host: JOB [ARCHIVE]
    #[arg(long, group = "action")]
    full_restore: bool,
    /// Write the cron file from every job's TimeSchedule, killAt, resumeKilledAt
    #[arg(long, group = "action")]
    make_cronjobs: bool,
    /// Draw the day's schedule of every enabled job
    #[arg(long, group = "action")]
    show_schedule: bool,
    /// Restart the jobs a reboot or a kill interrupted (resumeAfterBoot=yes)
    #[arg(long, group = "action")]
    resume_interrupted: bool,
    /// Stop every running job
    #[arg(long, group = "action")]
    killall: bool,
    /// Send a test mail to the recipients of JOB
    #[arg(long, group = "action")]
    mailtest: bool,
    /// Mail the status, disk usage and archive lists
    #[arg(long, group = "action")]
    send_status: bool,
    /// Nagios/NRPE plugin output and exit code for the given jobs (all when none): [JOB...]
    #[arg(long, group = "action")]
    nrpe: bool,
    /// Write the Prometheus textfile (metricsFile) for node_exporter
    #[arg(long, group = "action")]
    metrics: bool,
    /// Write the Samba share files of jobs with SambaShare=yes and reload Samba
    #[arg(long, group = "action")]
    samba_shares: bool,
    /// Install affa: /usr/sbin/affa, /etc/affa samples, state dirs, cron file, logrotate
    #[arg(long, group = "action")]
    install: bool,
    /// Show the configuration file of each job: [--csv] [JOB...]
    #[arg(long, group = "action")]
    show_config_pathes: bool,
    /// Write the NRPE command file (one check per monitored job), include it in nrpe.cfg, restart NRPE
    #[arg(long, group = "action")]
    init_nrpe: bool,
    /// Affa 3's cron file: rewrite the cron file if the configuration changed
    #[arg(long = "_cronupdate", hide = true)]
    cronupdate: bool,
    /// Affa 3's bash completion: the job names
    #[arg(long = "_jobs", hide = true)]
    jobs: bool,
    /// Affa 3's bash completion: the usage lines
    #[arg(long = "_shorthelp", hide = true)]
    shorthelp: bool,
    /// Affa 3's NRPE command: the monitored jobs, then #OK (and --init-nrpe)
    #[arg(long = "_jobsnrpe", hide = true)]
    jobsnrpe: bool,
    /// Affa 3 on SME Server only (turn this box into the backed-up server); refused
    #[arg(long, hide = true)]
    rise: bool,
    /// Affa 3 on SME Server only; refused
    #[arg(long, hide = true)]
    undo_rise: bool,

    /// Output as CSV (--list-archives, --status, --disk-usage)
    #[arg(long)]
    csv: bool,
    /// Include disabled jobs (--status); every archive (--verify)
    #[arg(long)]
    all: bool,
    /// Answer 'proceed' to every confirmation
    #[arg(long)]
    yes: bool,
    /// Print nothing but errors (as under cron)
    #[arg(long)]
    silent: bool,
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
    /// --full-restore: print what would be copied where, change nothing
    #[arg(long)]
    dry_run: bool,
    /// --install: install under this directory instead of /
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,
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
const USAGE: &[&str] = &[
    "--run JOB [scheduled|daily|weekly|monthly|yearly]",
    "--configcheck",
    "--make-cronjobs",
    "--send-key [JOB JOB ...]",
    "--check-connections [JOB JOB ...]",
    "--resume-interrupted",
    "--full-restore [--preserve-newer=no] [--delete=yes] JOB [ARCHIVE]",
    "--list-archives [--csv] [JOB JOB ...]",
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
    "--unchunk JOB ARCHIVE [--to DIR]",
    "--metrics",
    "--samba-shares",
    "--install [--prefix DIR]",
    "--version",
    "--help",
];

fn short_help() -> String {
    USAGE.iter().enumerate().map(|(i, u)| format!("{} affa {u}\n", if i == 0 { "Usage:" } else { "  or  " })).collect()
}

/// Parse the command line: one action, except `--delete-job --revoke-key` (Affa 3's pair).
fn parse() -> std::result::Result<Cli, clap::Error> {
    let m = Cli::command().try_get_matches()?;
    let cli = Cli::from_arg_matches(&m)?;
    let mut actions: Vec<String> =
        m.get_many::<clap::Id>("action").map(|ids| ids.map(|i| i.to_string()).collect()).unwrap_or_default();
    // The hidden actions (Affa 3's internal ones, and the refused --rise) are outside the group,
    // so that --help and the usage line do not show them.
    for (set, name) in [
        (cli.cronupdate, "_cronupdate"),
        (cli.jobs, "_jobs"),
        (cli.shorthelp, "_shorthelp"),
        (cli.jobsnrpe, "_jobsnrpe"),
        (cli.rise, "rise"),
        (cli.undo_rise, "undo_rise"),
    ] {
        if set {
            actions.push(name.into());
        }
    }
    if actions.is_empty() {
        return Err(Cli::command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, "no action given; affa --help lists them"));
    }
    if actions.len() > 1 && !(actions.len() == 2 && cli.delete_job && cli.revoke_key) {
        let names: Vec<String> = actions
            .iter()
            .map(|a| if a.starts_with('_') { format!("--{a}") } else { format!("--{}", a.replace('_', "-")) })
            .collect();
        return Err(Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("{} cannot be used together (one action at a time)", names.join(" and ")),
        ));
    }
    Ok(cli)
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let ui = render::Terminal::new(cli.silent);
    match dispatch(&cli, &ui) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            ui.error(&e);
            ExitCode::from(1)
        }
    }
}

fn need(args: &[String], n: usize, usage: &str) -> Result<()> {
    if args.len() < n {
        affa::bail!("missing argument; usage: affa {usage}");
    }
    if args.len() > n {
        affa::bail!("unexpected argument '{}'; usage: affa {usage}", args[n]);
    }
    Ok(())
}

/// Print a command's output; it may quote what a host sent (names, reports), so control
/// characters other than newline and tab are escaped on the way to the terminal.
fn print(s: String) {
    let mut o = affa::untrusted::TerminalSafe::new(std::io::stdout().lock());
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

fn dispatch(cli: &Cli, ui: &std::sync::Arc<render::Terminal>) -> Result<u8> {
    let a = &cli.args;
    let watch = ui.watch();
    if cli.show_default_config {
        print(config::default_config_text());
        return Ok(0);
    }
    if cli.show_property {
        need(a, 1, "--show-property KEY")?;
        print(config::describe_key(&a[0])? + "\n");
        // Then each job's value (Affa 3), when there is a configuration to read.
        if let Ok(cfg) = Config::load(&config::config_dir(cli.config_dir.as_deref())) {
            print(format!("\n{}", config::property_values(&cfg, &a[0])?));
        }
        return Ok(0);
    }
    if cli.shorthelp {
        print(short_help());
        return Ok(0);
    }
    if cli.rise || cli.undo_rise {
        affa::bail!(
            "--{} is not supported: it turned an SME Server backup box into the server it backs up; restore the host with affa --full-restore JOB instead",
            if cli.rise { "rise" } else { "undo-rise" }
        );
    }
    if cli.install {
        need(a, 0, "--install [--prefix DIR]")?;
        print(affa::install::install(&affa::install::InstallOptions { prefix: cli.prefix.clone() })? + "\n");
        return Ok(0);
    }
    let dir = config::config_dir(cli.config_dir.as_deref());
    let mut cfg = Config::load(&dir)?;
    if cli.debug {
        cfg.force_debug();
    }
    let cfg = cfg;
    let clock = affa::clock::from_env()?;
    if cli.run {
        if a.is_empty() || a.len() > 2 {
            affa::bail!("usage: affa --run JOB [scheduled|daily|weekly|monthly|yearly]");
        }
        let level = match a.get(1) {
            None => Level::Scheduled,
            Some(l) => Level::parse(l).ok_or_else(|| {
                affa::Error::new(format!("unknown level '{l}'; expected scheduled, daily, weekly, monthly or yearly"))
            })?,
        };
        let s = affa::schedule::run_job(
            &cfg,
            &a[0],
            clock.as_ref(),
            affa::backup::RunOptions { level, watch: watch.clone() },
            cli.silent,
        )?;
        ui.summary(&a[0], &s);
        return Ok(0);
    }
    let mut out = affa::untrusted::TerminalSafe::new(std::io::stdout());
    if cli.configcheck {
        let (report, errors) = commands::configcheck(&cfg);
        print(report);
        for e in &errors {
            eprintln!("affa: error: {e}");
        }
        return Ok(if errors.is_empty() { 0 } else { 1 });
    } else if cli.list_archives {
        print(commands::list_archives(&cfg, a, cli.csv)?);
    } else if cli.status {
        print(commands::status(&cfg, clock.as_ref(), cli.csv, cli.all)?);
    } else if cli.send_key {
        commands::send_keys(&cfg, a, &mut out, cli.yes, &watch)?;
    } else if cli.revoke_key && !cli.delete_job {
        need(a, 1, "--revoke-key JOB")?;
        print(commands::revoke_key(&cfg, &a[0])? + "\n");
    } else if cli.check_connections {
        commands::check_connections(&cfg, a, &mut out)?;
    } else if cli.cleanup {
        need(a, 1, "--cleanup JOB")?;
        print(commands::cleanup(&cfg, &a[0], cli.yes, &watch)? + "\n");
    } else if cli.delete_job {
        need(a, 1, "--delete-job [--revoke-key] JOB")?;
        print(commands::delete_job(&cfg, &a[0], cli.yes, cli.revoke_key, &watch)? + "\n");
    } else if cli.rename_job {
        need(a, 2, "--rename-job JOB NEW")?;
        print(commands::rename_job(&cfg, &a[0], &a[1])? + "\n");
    } else if cli.move_archive {
        need(a, 2, "--move-archive JOB DIR")?;
        print(commands::move_archive(&cfg, &a[0], &a[1], cli.yes, &watch)? + "\n");
    } else if cli.kill {
        need(a, 1, "--kill JOB [--resume=SECS]")?;
        print(commands::kill(&cfg, &a[0])? + "\n");
        if let Some(secs) = cli.resume {
            print(affa::schedule::resume_later(&cfg, &a[0], secs)? + "\n");
        }
    } else if cli.killall {
        need(a, 0, "--killall")?;
        for job in cfg.jobs.keys() {
            if affa::lock::holder(&cfg.lock_dir(), job).is_some() {
                print(commands::kill(&cfg, job)? + "\n");
            }
        }
    } else if cli.log_tail {
        if a.len() > 1 {
            affa::bail!("usage: affa --log-tail [JOB]");
        }
        print(commands::log_tail(&cfg, a.first().map(|s| s.as_str()))?);
    } else if cli.disk_usage {
        print(commands::disk_usage(&cfg, cli.csv)?);
    } else if cli.unchunk {
        need(a, 2, "--unchunk JOB ARCHIVE [--to DIR]")?;
        print(affa::maintenance::unchunk_command(&cfg, &a[0], &a[1], cli.to.as_deref(), &watch)?);
    } else if cli.verify {
        if a.is_empty() || a.len() > 2 {
            affa::bail!("usage: affa --verify JOB [ARCHIVE|--all]");
        }
        let v = affa::maintenance::verify_command(&cfg, &a[0], a.get(1).map(|s| s.as_str()), cli.all, &watch)?;
        print(v.text);
        if !v.damaged.is_empty() {
            affa::bail!("verify of job {} found damage in: {}", a[0], v.damaged.join(", "));
        }
    } else if cli.full_restore {
        if a.is_empty() || a.len() > 2 {
            affa::bail!("usage: affa --full-restore JOB [ARCHIVE] [--preserve-newer=yes|no] [--delete=yes|no] [--yes]");
        }
        let opts = affa::restore::RestoreOptions {
            archive: a.get(1).cloned(),
            preserve_newer: cli.preserve_newer.unwrap_or(true),
            delete: cli.delete.unwrap_or(false),
            to_dir: cli.to_dir.clone(),
            to_datastore: cli.to_datastore.clone(),
            to_host: cli.to_host.clone(),
            to_user: cli.to_user.clone(),
            to_password_file: cli.to_password_file.clone(),
            to_thumbprint: cli.to_thumbprint.clone(),
            to_ssh_port: cli.to_ssh_port,
            register: cli.register.clone(),
            dry_run: cli.dry_run,
            yes: cli.yes,
            watch: watch.clone(),
        };
        affa::restore::full_restore(&cfg, &a[0], &opts, &mut out)?;
    } else if cli.make_cronjobs {
        need(a, 0, "--make-cronjobs")?;
        print(affa::cron::make_cronjobs(&cfg)? + "\n");
    } else if cli.show_schedule {
        need(a, 0, "--show-schedule [--all]")?;
        print(affa::cron::show_schedule(&cfg, cli.all)?);
    } else if cli.resume_interrupted {
        need(a, 0, "--resume-interrupted")?;
        print(affa::schedule::resume_interrupted(&cfg, clock.as_ref())? + "\n");
    } else if cli.mailtest {
        need(a, 1, "--mailtest JOB")?;
        print(affa::commands::mailtest(&cfg, &a[0])? + "\n");
    } else if cli.send_status {
        need(a, 0, "--send-status")?;
        print(affa::commands::send_status(&cfg, clock.as_ref())? + "\n");
    } else if cli.nrpe {
        let (line, code) = affa::monitor::nrpe(&cfg, a, clock.as_ref())?;
        print(line + "\n");
        return Ok(code as u8);
    } else if cli.metrics {
        need(a, 0, "--metrics")?;
        print(affa::monitor::write_metrics(&cfg, clock.as_ref())? + "\n");
    } else if cli.samba_shares {
        need(a, 0, "--samba-shares")?;
        // A shared job whose configuration is broken: the command fails with that job's first
        // error before anything changes (its share is never rewritten from what could be read).
        if let Some(b) = cfg.broken.values().find(|b| b.partial.samba_share) {
            affa::bail!("{}", b.errors.first().map(String::as_str).unwrap_or("configuration error"));
        }
        print(affa::samba::update_shares(&cfg)? + "\n");
    } else if cli.cronupdate {
        // Internal, every 15 minutes from cron: silent unless it fails (Affa 3's shipped cron
        // line has no --silent).
        need(a, 0, "--_cronupdate")?;
        affa::cron::cron_update(&cfg)?;
    } else if cli.jobs {
        print(commands::job_names(&cfg));
    } else if cli.show_config_pathes {
        print(commands::show_config_pathes(&cfg, a, cli.csv)?);
    } else if cli.init_nrpe {
        need(a, 0, "--init-nrpe")?;
        print(affa::monitor::init_nrpe(&cfg)? + "\n");
    } else if cli.jobsnrpe {
        // Affa 3: the monitored jobs and #OK, and the NRPE files brought up to date.
        match affa::monitor::init_nrpe(&cfg) {
            Ok(_) => {
                let names: String = affa::monitor::nrpe_jobs(&cfg).iter().map(|j| format!("{}\n", j.name)).collect();
                print(names + "#OK\n");
            }
            Err(e) => {
                print("# NRPE is not installed on the Affa server\n".into());
                return Err(e);
            }
        }
    }
    Ok(0)
}
