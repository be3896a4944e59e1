//! The `affa` command: parse Affa's long options into one action (`cli`), dispatch it to the
//! library with one `match`, print what it returns and the one-line error. No logic lives here;
//! what a terminal shows is drawn by `render`.

mod cli;
mod docs;
mod render;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use affa::config::{self, Config};
use affa::{commands, Result};

use cli::{Action, Archives, Invocation};

/// The soft limit of open files raised towards the hard one (at most 65536): removing an
/// archive walks its tree with one descriptor per directory level, and a host can send a tree
/// deeper than cron's soft limit of 1024 (every run would then fail to empty the trash).
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let want = l.maximum.map_or(65536, |m| m.min(65536));
    if l.current.is_some_and(|c| c < want) {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: l.maximum });
    }
}

fn main() -> ExitCode {
    raise_open_files_limit();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let ui = render::Terminal::new(cli.silent);
    let inv = match cli::action(cli) {
        Ok(i) => i,
        Err(u) => {
            ui.fail(&u.0);
            return ExitCode::from(2);
        }
    };
    // A command's output may quote what a host sent (names, reports): control characters other
    // than newline and tab are escaped on the way to the terminal.
    let mut out = affa::untrusted::TerminalSafe::new(std::io::stdout());
    match dispatch(inv, &ui, &mut out) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            ui.error(&e);
            ExitCode::from(1)
        }
    }
}

/// Write a command's text to stdout now (a later step of the same action may still fail).
fn print(out: &mut dyn Write, s: impl AsRef<str>) {
    let _ = out.write_all(s.as_ref().as_bytes());
    let _ = out.flush();
}

/// The configuration, read only by the actions that need one.
struct Env {
    config_dir: Option<std::path::PathBuf>,
    debug: bool,
}

impl Env {
    fn config(&self) -> Result<Config> {
        let mut cfg = Config::load(&config::config_dir(self.config_dir.as_deref()))?;
        if self.debug {
            cfg.force_debug();
        }
        Ok(cfg)
    }
}

fn clock() -> Result<Box<dyn affa::clock::Clock>> {
    affa::clock::from_env()
}

/// Do what `inv` asks: its text goes to `out` as it comes, the exit code is returned (0, or
/// what --configcheck and --nrpe report); an error is the caller's to print.
fn dispatch(inv: Invocation, ui: &Arc<render::Terminal>, out: &mut dyn Write) -> Result<u8> {
    let Invocation { action, yes, silent, debug, config_dir } = inv;
    let watch = ui.watch();
    let env = Env { config_dir, debug };
    match action {
        Action::ShowDefaultConfig => print(out, config::default_config_text()),
        Action::ShowProperty { key } => {
            print(out, config::describe_key(&key)? + "\n");
            // Then each job's value (Affa 3), when there is a configuration to read.
            if let Ok(cfg) = env.config() {
                print(out, format!("\n{}", config::property_values(&cfg, &key)?));
            }
        }
        Action::ShortHelp => print(out, cli::short_help()),
        Action::Rise { undo } => affa::bail!(
            "--{} is not supported: it turned an SME Server backup box into the server it backs up; restore the host with affa --full-restore JOB instead",
            if undo { "undo-rise" } else { "rise" }
        ),
        Action::Install { prefix, agent } => {
            let opts = affa::install::InstallOptions { prefix, agent, generated: docs::generated() };
            print(out, affa::install::install(&opts)? + "\n")
        }
        Action::Setup => {
            let dir = config::config_dir(env.config_dir.as_deref());
            print(out, affa::install::setup(&dir)? + "\n")
        }
        Action::Run { job, level } => {
            let cfg = env.config()?;
            let clock = clock()?;
            let s = affa::schedule::run_job(
                &cfg,
                &job,
                clock.as_ref(),
                affa::backup::RunOptions { level, watch: watch.clone() },
                silent,
            )?;
            ui.summary(&job, &s);
        }
        Action::ConfigCheck => {
            let cfg = env.config()?;
            let (report, errors) = commands::configcheck(&cfg);
            print(out, report);
            for e in &errors {
                eprintln!("affa: error: {e}");
            }
            return Ok(if errors.is_empty() { 0 } else { 1 });
        }
        Action::ListArchives { jobs, csv } => {
            let listing = commands::list_archives(&env.config()?, &jobs, csv)?;
            print(out, listing.text);
            if !listing.unreadable.is_empty() {
                for l in &listing.unreadable {
                    eprintln!("affa: error: {l}");
                }
                return Ok(1);
            }
        }
        Action::Status { csv, all } => {
            let cfg = env.config()?;
            print(out, commands::status(&cfg, clock()?.as_ref(), csv, all)?)
        }
        Action::SendKey { jobs } => commands::send_keys(&env.config()?, &jobs, out, yes, &watch)?,
        Action::InstallAgent { jobs } => commands::install_agents(&env.config()?, &jobs, out)?,
        Action::RevokeKey { job } => print(out, commands::revoke_key(&env.config()?, &job)? + "\n"),
        Action::CheckConnections { jobs } => commands::check_connections(&env.config()?, &jobs, out)?,
        Action::Cleanup { job } => print(out, commands::cleanup(&env.config()?, &job, yes, &watch)? + "\n"),
        Action::DeleteJob { job, revoke_key } => {
            print(out, commands::delete_job(&env.config()?, &job, yes, revoke_key, &watch)? + "\n")
        }
        Action::RenameJob { job, new } => print(out, commands::rename_job(&env.config()?, &job, &new)? + "\n"),
        Action::MoveArchive { job, root } => {
            print(out, commands::move_archive(&env.config()?, &job, &root, yes, &watch)? + "\n")
        }
        Action::Kill { job, resume } => {
            let cfg = env.config()?;
            print(out, commands::kill(&cfg, &job)? + "\n");
            if let Some(secs) = resume {
                print(out, affa::schedule::resume_later(&cfg, &job, secs)? + "\n");
            }
        }
        Action::KillAll => {
            // Every running job is stopped: one that cannot be (its lock file names another
            // process) is named at the end, after the others.
            let cfg = env.config()?;
            let mut failed = Vec::new();
            // A job whose configuration broke while it runs is stopped too.
            for job in cfg.all_jobs().iter().map(|j| &j.name) {
                if affa::lock::holder(&cfg.lock_dir(), job).is_some() {
                    match commands::kill(&cfg, job) {
                        Ok(line) => print(out, line + "\n"),
                        Err(e) => {
                            eprintln!("affa: error: {e}");
                            failed.push(job.clone());
                        }
                    }
                }
            }
            if !failed.is_empty() {
                affa::bail!("--killall could not stop: {}", failed.join(", "));
            }
        }
        Action::LogTail { job } => print(out, commands::log_tail(&env.config()?, job.as_deref())?),
        Action::DiskUsage { csv } => print(out, commands::disk_usage(&env.config()?, csv)?),
        Action::Unchunk { job, archive, to, from_offsite: true } => {
            print(out, affa::offsite::fetch::unchunk(&env.config()?, &job, &archive, to.as_deref(), &watch)?)
        }
        Action::Unchunk { job, archive, to, from_offsite: false } => print(
            out,
            affa::maintenance::unchunk_command(&env.config()?, &job, &archive, to.as_deref(), &watch)?,
        ),
        Action::Verify { job, archives } => {
            let (name, all) = match &archives {
                Archives::Newest => (None, false),
                Archives::Named(n) => (Some(n.as_str()), false),
                Archives::All => (None, true),
            };
            let v = affa::maintenance::verify_command(&env.config()?, &job, name, all, &watch)?;
            print(out, v.text);
            if !v.damaged.is_empty() {
                affa::bail!("verify of job {job} found damage in: {}", v.damaged.join(", "));
            }
        }
        Action::Scrub { all } => {
            let v = affa::maintenance::scrub_command(&env.config()?, all, clock()?.as_ref(), &watch)?;
            print(out, v.text.clone());
            for l in &v.failed {
                eprintln!("affa: error: {l}");
            }
            if v.damaged > 0 {
                // The lines naming them, in the error too: under cron (--silent) only stderr is seen.
                let lines: Vec<&str> = v.text.lines().filter(|l| l.starts_with("chunk ")).collect();
                affa::bail!("scrub found {} damaged chunk(s) in the pool: {}", v.damaged, lines.join("; "));
            }
            if !v.failed.is_empty() {
                return Ok(1);
            }
        }
        Action::Offsite { job, archive } => {
            let up = affa::offsite::upload(&env.config()?, &job, archive.as_deref(), clock()?.as_ref(), &watch)?;
            if let Some(k) = &up.new_key {
                ui.new_offsite_key(&k.file, &k.text);
            }
            print(out, up.text);
        }
        Action::OffsiteVerify { job } => {
            let v = affa::offsite::verify(&env.config()?, &job, clock()?.as_ref(), &watch)?;
            print(out, v.text);
            if !v.damaged.is_empty() {
                affa::bail!("offsite verify of job {job} found missing or damaged objects in: {}", v.damaged.join(", "));
            }
        }
        Action::OffsiteCleanup { job } => {
            print(out, affa::offsite::cleanup(&env.config()?, &job, clock()?.as_ref(), &watch)?)
        }
        Action::ListOffsite { jobs } => {
            let l = affa::offsite::list(&env.config()?, &jobs, clock()?.as_ref())?;
            print(out, l.text);
            if !l.failed.is_empty() {
                for f in &l.failed {
                    eprintln!("affa: error: {f}");
                }
                return Ok(1);
            }
        }
        Action::FullRestore { job, restore: r } => {
            let opts = affa::restore::RestoreOptions {
                archive: r.archive,
                preserve_newer: r.preserve_newer,
                delete: r.delete,
                to_dir: r.to_dir,
                to_datastore: r.to_datastore,
                to_host: r.to_host,
                to_user: r.to_user,
                to_password_file: r.to_password_file,
                to_thumbprint: r.to_thumbprint,
                to_ssh_port: r.to_ssh_port,
                register: r.register,
                dry_run: r.dry_run,
                from_offsite: r.from_offsite,
                yes,
                watch: watch.clone(),
            };
            affa::restore::full_restore(&env.config()?, &job, &opts, out)?;
        }
        Action::MakeCronjobs => {
            let w = affa::cron::make_cronjobs(&env.config()?)?;
            print(out, w.text + "\n");
            if let Some(p) = w.samba_problem {
                affa::bail!("{p}");
            }
        }
        Action::ShowSchedule { all } => {
            let s = affa::cron::show_schedule(&env.config()?, all)?;
            print(out, s.text);
            if !s.unreadable.is_empty() {
                for l in &s.unreadable {
                    eprintln!("affa: error: {l}");
                }
                return Ok(1);
            }
        }
        Action::ResumeInterrupted => {
            let cfg = env.config()?;
            let r = affa::schedule::resume_interrupted(&cfg)?;
            if !r.text.is_empty() {
                print(out, r.text + "\n");
            }
            if !r.failed.is_empty() {
                for l in &r.failed {
                    eprintln!("affa: error: {l}");
                }
                return Ok(1);
            }
        }
        Action::MailTest { job } => print(out, commands::mailtest(&env.config()?, &job)? + "\n"),
        Action::SendStatus => {
            let cfg = env.config()?;
            print(out, commands::send_status(&cfg, clock()?.as_ref())? + "\n")
        }
        Action::Nrpe { jobs } => {
            // A configuration that stops every job is the plugin's CRITICAL, not affa's exit 1
            // (which NRPE shows as WARNING).
            let cfg = match env.config() {
                Ok(c) => c,
                Err(e) => {
                    print(out, format!("CRITICAL: configuration: {e}\n"));
                    return Ok(2);
                }
            };
            let (line, code) = affa::monitor::nrpe(&cfg, &jobs, clock()?.as_ref())?;
            print(out, line + "\n");
            return Ok(code as u8);
        }
        Action::Metrics => {
            let cfg = env.config()?;
            print(out, affa::monitor::write_metrics(&cfg, clock()?.as_ref())? + "\n")
        }
        Action::SambaShares => {
            let cfg = env.config()?;
            print(out, affa::samba::update_shares(&cfg)? + "\n");
        }
        Action::Mount { job, archive, dir, foreground } => {
            let cfg = env.config()?;
            if foreground {
                // A detached child (below) tells its parent when the mount is ready.
                let child = std::env::var_os(affa::mount::READY_ENV).is_some();
                affa::mount::mount(&cfg, &job, archive.as_deref(), &dir, || {
                    if child {
                        affa::mount::detached_ready()
                    }
                })?;
            } else {
                let abs = |p: &std::path::Path| {
                    std::fs::canonicalize(p)
                        .map_err(|e| affa::Error::new(format!("--mount: cannot use {}: {e}", p.display())))
                };
                let mut args: Vec<std::ffi::OsString> = vec!["--mount".into(), job.into()];
                args.extend(archive.map(Into::into));
                args.push(abs(&dir)?.into());
                if let Some(c) = &env.config_dir {
                    args.extend(["--config-dir".into(), abs(c)?.into()]);
                }
                if debug {
                    args.push("--debug".into());
                }
                let exe = std::env::current_exe().map_err(|e| affa::Error::new(format!("cannot find affa itself: {e}")))?;
                affa::mount::spawn_detached(&exe, &args)?;
            }
        }
        Action::Umount { dir } => print(out, affa::mount::umount(&dir)? + "\n"),
        // Internal, every 15 minutes from cron: silent unless it fails (Affa 3's shipped cron
        // line has no --silent).
        Action::CronUpdate => {
            // The cron file is written; shares that could not be updated are this run's error
            // (cron mails it), not a silent success.
            if let Some(p) = affa::cron::cron_update(&env.config()?)?.and_then(|w| w.samba_problem) {
                affa::bail!("{p}");
            }
        }
        Action::JobNames => print(out, commands::job_names(&env.config()?)),
        // Internal: the SMTP session of a mail, in the child `notify::send` starts and kills at
        // the mail's deadline. Its lines (each step, `sent`), then an error, on stdout for the
        // parent.
        Action::SmtpSession => {
            let r = affa::notify::smtp_session(&mut std::io::stdin().lock(), &mut |l| print(out, format!("{l}\n")));
            if let Err(e) = r {
                print(out, format!("error {}\n", e.message().replace('\n', "; ")));
                return Ok(1);
            }
        }
        Action::ShowConfigPathes { jobs, csv } => {
            print(out, commands::show_config_pathes(&env.config()?, &jobs, csv)?)
        }
        Action::InitNrpe => print(out, affa::monitor::init_nrpe(&env.config()?)? + "\n"),
        // Affa 3: the monitored jobs and #OK, and the NRPE files brought up to date.
        Action::JobsNrpe => {
            let cfg = env.config()?;
            match affa::monitor::init_nrpe(&cfg) {
                Ok(_) => {
                    let names: String =
                        affa::monitor::nrpe_jobs(&cfg).iter().map(|j| format!("{}\n", j.name)).collect();
                    print(out, names + "#OK\n");
                }
                Err(e) => {
                    print(out, "# NRPE is not installed on the Affa server\n");
                    return Err(e);
                }
            }
        }
    }
    Ok(0)
}
