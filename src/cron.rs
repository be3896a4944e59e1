//! The cron file (`--make-cronjobs`, `--_cronupdate`) and the day's schedule
//! (`--show-schedule`): which cron lines exist and what they start.
//!
//! Owns: the cron file's text and when it is rewritten, and whether a job runs from cron
//! ([`effective_enabled`], the one rule `--status` shows too). Must never: write a half cron
//! file (it goes through the one atomic writer), or start a job whose effective status is
//! disabled.
//!
//! Cron lines (documented in docs/OPERATIONS.md):
//! - `MM HH * * * root AFFA --silent --run JOB` per TimeSchedule value of each enabled job;
//! - offsiteSchedule (a job with offsiteTarget): `MM HH * * * root AFFA --silent --offsite JOB`;
//! - killAt: `MM HH * * * root AFFA --silent --kill JOB >/dev/null`;
//! - resumeKilledAt: `MM HH * * * root test -d RootDir/JOB/scheduled.running && AFFA --silent --run JOB`
//!   (runs the job again only if its transfer was stopped: killed, crashed, rebooted);
//! - `@reboot root AFFA --silent --resume-interrupted >/dev/null`;
//! - `@reboot root AFFA --silent --samba-shares >/dev/null` when a job has SambaShare=yes (its
//!   share's path is a mount, which a reboot undoes);
//! - the status mail per sendStatus, and `--metrics` every 10 minutes when the directory of
//!   metricsFile exists;
//! - `*/15 * * * * root AFFA --silent --_cronupdate` (Affa 3's self-refresh): the file is
//!   rewritten when a configuration file is newer than it or the list of files changed (its
//!   second line holds a hash of that list), so configuration edits take effect within 15
//!   minutes.

use std::fs;
use std::path::{Path, PathBuf};

use crate::archive;
use crate::config::{Config, Job, DEFAULT_CONFIG_DIR};
use crate::error::Result;
use crate::fsutil::write_file;
use crate::transport::shell_quote;

/// Does the job run from cron? `globalStatus=enabled|disabled` overrides the job's `status`;
/// `globalStatus=jobs` (the default) leaves it to the job.
pub fn effective_enabled(cfg: &Config, job: &Job) -> bool {
    cfg.settings.status.unwrap_or(job.enabled())
}

/// A word of a cron command: quoted for the shell, and `%` escaped (cron turns an unescaped
/// `%` into a newline, and removes the backslash of `\%`).
fn cron_quote(s: &str) -> String {
    shell_quote(s).replace('%', "\\%")
}

/// The affa command as cron calls it: `affaBinary`, plus `--config-dir DIR` unless the
/// configuration lives in the default /etc/affa.
pub fn affa_command(cfg: &Config, config_dir: &Path) -> String {
    let mut c = shell_quote(&cfg.settings.affa_binary.to_string_lossy());
    if config_dir != Path::new(DEFAULT_CONFIG_DIR) {
        c.push_str(" --config-dir ");
        c.push_str(&shell_quote(&config_dir.to_string_lossy()));
    }
    c
}

/// The cron file's text for a configuration; `config_dir` is the configuration directory as
/// the cron daemon will see it.
pub fn cron_text(cfg: &Config, config_dir: &Path) -> String {
    // A `%` in a cron command would end it (cron turns it into a newline): escaped.
    let affa = affa_command(cfg, config_dir).replace('%', "\\%");
    let mut s = String::new();
    s.push_str(&format!(
        "# {}: written by affa from {}/*.conf; a change there is applied within 15 minutes (--_cronupdate), or at once by affa --make-cronjobs.\n{CONFIG_LIST_TAG}{}\n",
        cfg.settings.cron_file.display(),
        config_dir.display(),
        config_list_hash(&cfg.dir)
    ));
    s.push_str("SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    if cfg.settings.status == Some(false) {
        s.push_str("\n# globalStatus=disabled: no job runs from cron.\n");
    } else {
        for job in cfg.all_jobs() {
            if !effective_enabled(cfg, job) {
                continue;
            }
            s.push_str(&format!("\n# job {}\n", job.name));
            if cfg.broken.contains_key(&job.name) {
                s.push_str(
                    "# its configuration has errors (affa --configcheck): each start fails and mails until fixed\n",
                );
            }
            let mut seen = Vec::new();
            for &(h, m) in &job.schedule {
                if !seen.contains(&(h, m)) {
                    seen.push((h, m));
                    s.push_str(&format!("{m} {h} * * * root {affa} --silent --run {}\n", job.name));
                }
            }
            if let Some(o) = &job.offsite {
                let mut seen = Vec::new();
                for &(h, m) in &o.schedule {
                    if !seen.contains(&(h, m)) {
                        seen.push((h, m));
                        s.push_str(&format!("{m} {h} * * * root {affa} --silent --offsite {}\n", job.name));
                    }
                }
            }
            if let Some((h, m)) = job.kill_at {
                s.push_str(&format!("{m} {h} * * * root {affa} --silent --kill {} >/dev/null\n", job.name));
            }
            if let Some((h, m)) = job.resume_killed_at {
                let running = job.job_dir().join(archive::RUNNING);
                s.push_str(&format!(
                    "{m} {h} * * * root test -d {} && {affa} --silent --run {}\n",
                    cron_quote(&running.to_string_lossy()),
                    job.name
                ));
            }
        }
        s.push_str(&format!("\n# restart the jobs a shutdown interrupted (resumeAfterBoot=yes)\n@reboot root {affa} --silent --resume-interrupted >/dev/null\n"));
    }
    let when = match cfg.settings.send_status.as_str() {
        "daily" => Some("0 5 * * *"),
        "weekly" => Some("0 5 * * 0"),
        "monthly" => Some("0 5 1 * *"),
        _ => None,
    };
    if let Some(w) = when {
        s.push_str(&format!(
            "\n# status mail (sendStatus={})\n{w} root {affa} --silent --send-status >/dev/null\n",
            cfg.settings.send_status
        ));
    }
    if let (Some((h, m)), true) = (cfg.settings.scrub_time, cfg.settings.scrub_days > 0 && !cfg.jobs.is_empty()) {
        s.push_str(&format!(
            "\n# read back 1/{} of every chunk pool and check it (scrubDays, scrubTime; damage is reported on stderr)\n{m} {h} * * * root {affa} --silent --scrub >/dev/null\n",
            cfg.settings.scrub_days
        ));
    }
    let metrics = cfg.settings.metrics_file.clone();
    if metrics.parent().is_some_and(|p| p.is_dir()) {
        s.push_str(&format!(
            "\n# Prometheus textfile {}\n*/10 * * * * root {affa} --silent --metrics >/dev/null\n",
            metrics.display()
        ));
    }
    if cfg.jobs.values().any(|j| j.samba_share) {
        s.push_str(&format!(
            "\n# mount the archives of the Samba shares after a reboot (read-only, nodev, nosuid; affa --mount for chunked jobs)\n@reboot root {affa} --silent --samba-shares >/dev/null\n"
        ));
    }
    s.push_str(&format!(
        "\n# apply configuration changes (Affa 3's self-refresh)\n*/15 * * * * root {affa} --silent --_cronupdate\n"
    ));
    s
}

/// The start of the cron file's line that identifies the list of configuration files.
const CONFIG_LIST_TAG: &str = "# configuration files: ";

/// A hash of the list of configuration files (paths relative to the configuration directory):
/// a file added, removed or renamed changes it (Affa 3 kept an MD5 of the list).
fn config_list_hash(dir: &Path) -> String {
    let mut h = blake3::Hasher::new();
    for f in crate::config::config_files(dir).unwrap_or_default() {
        h.update(f.strip_prefix(dir).unwrap_or(&f).as_os_str().as_encoded_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex()[..32].to_string()
}

/// `--_cronupdate` (every 15 minutes from the cron file, as in Affa 3): rewrite the cron file
/// (and the Samba shares, as `--make-cronjobs` does) only when a configuration file is newer
/// than it or the list of configuration files changed. Returns what was done, None when the
/// file was up to date.
pub fn cron_update(cfg: &Config) -> Result<Option<CronWritten>> {
    let path = cfg.settings.cron_file.clone();
    let written = fs::metadata(&path).and_then(|m| m.modified()).ok();
    let text = fs::read_to_string(&path).unwrap_or_default();
    let listed = text.lines().find_map(|l| l.strip_prefix(CONFIG_LIST_TAG)).unwrap_or("");
    let files = crate::config::config_files(&cfg.dir)?;
    let newer = files.iter().any(|f| match (written, fs::metadata(f).and_then(|m| m.modified())) {
        (Some(w), Ok(m)) => m >= w,
        _ => true,
    });
    if !newer && listed == config_list_hash(&cfg.dir) {
        return Ok(None);
    }
    make_cronjobs(cfg).map(Some)
}

pub fn absolute(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// What `--make-cronjobs` (or `--_cronupdate`) did: its summary, and why the Samba shares could
/// not be brought up to date, if they could not (the cron file is written all the same).
#[derive(Debug, Clone)]
pub struct CronWritten {
    pub text: String,
    pub samba_problem: Option<String>,
}

/// `--make-cronjobs`: write the cron file; returns a one-line summary. When Samba shares are in
/// use (a job has SambaShare=yes, or affa wrote shares before) they are brought up to date too.
pub fn make_cronjobs(cfg: &Config) -> Result<CronWritten> {
    let path = cfg.settings.cron_file.clone();
    let text = cron_text(cfg, &absolute(&cfg.dir));
    write_file(&path, &text, 0o644)?;
    let n = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty() && !l.contains('=')).count();
    let mut out = CronWritten { text: format!("{} written: {n} cron line(s)", path.display()), samba_problem: None };
    if crate::samba::in_use(cfg) {
        match crate::samba::update_shares(cfg) {
            Ok(s) => out.text.push_str(&format!("\n{s}")),
            Err(e) => out.samba_problem = Some(format!("Samba shares not updated: {e}")),
        }
    }
    Ok(out)
}

const SLOT_MINUTES: u32 = 30;

const SLOTS: usize = (24 * 60 / SLOT_MINUTES) as usize;

/// What `--show-schedule` drew, and one line per job whose last run could not be read (its line
/// is drawn without it; the other jobs are drawn all the same).
#[derive(Debug, Clone)]
pub struct Schedule {
    pub text: String,
    pub unreadable: Vec<String>,
}

/// `--show-schedule [--all]`: the day drawn as text, one 24-hour line per job (30 minutes per
/// character): `S` a start, `=` the duration of the job's last run after it, `K` killAt, `R`
/// resumeKilledAt, `.` nothing.
pub fn show_schedule(cfg: &Config, all: bool) -> Result<Schedule> {
    let mut unreadable = Vec::new();
    let mut out = String::from(
        "Schedule of the day; one character is 30 minutes: S start, = last run time, K killAt, R resumeKilledAt\n",
    );
    let mut head = String::new();
    for h in (0..24).step_by(2) {
        head.push_str(&format!("{h:<4}"));
    }
    out.push_str(&format!("{:<24} {}\n", "", head));
    let mut hidden = 0;
    for job in cfg.jobs.values() {
        let enabled = effective_enabled(cfg, job);
        if !enabled && !all {
            hidden += 1;
            continue;
        }
        let mut line = ['.'; SLOTS];
        // One job whose archives cannot be read (EIO, a file in its directory's place) is drawn
        // without its last run, and named; it does not hide the others.
        let newest = archive::newest_valid(&job.job_dir()).unwrap_or_else(|e| {
            unreadable.push(format!("job {}: cannot read its archives: {e}", job.name));
            None
        });
        let last_secs = newest.and_then(|a| a.report.and_then(|r| r.num("ExecutionTime"))).unwrap_or(0);
        let dur_slots = (last_secs as usize).div_ceil((SLOT_MINUTES * 60) as usize);
        let mut starts = Vec::new();
        for &(h, m) in &job.schedule {
            let slot = ((h * 60 + m) / SLOT_MINUTES) as usize;
            starts.push(slot);
            starts.sort();
            for i in 1..dur_slots.max(1) {
                let k = (slot + i) % SLOTS;
                if line[k] == '.' {
                    line[k] = '=';
                }
            }
        }
        for s in &starts {
            line[*s] = 'S';
        }
        for (at, c) in [(job.kill_at, 'K'), (job.resume_killed_at, 'R')] {
            if let Some((h, m)) = at {
                line[((h * 60 + m) / SLOT_MINUTES) as usize] = c;
            }
        }
        let mut times: Vec<String> = job.schedule.iter().map(|(h, m)| format!("{h:02}:{m:02}")).collect();
        times.sort();
        let name = if enabled { job.name.clone() } else { format!("{} (disabled)", job.name) };
        let last = if last_secs > 0 { format!(" (last run {})", crate::fmt::hms(last_secs)) } else { String::new() };
        out.push_str(&format!("{:<24} {} {}{}\n", name, line.iter().collect::<String>(), times.join(" "), last));
    }
    if hidden > 0 {
        out.push_str(&format!("{hidden} disabled job(s) not shown; use --all to show them.\n"));
    }
    Ok(Schedule { text: out, unreadable })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration from `text`, whose directory does not exist: its list of files is empty
    /// (BLAKE3 of nothing), so the cron file's second line is known.
    fn config(text: &str) -> Config {
        let dir = Path::new("/nonexistent-affa-test/etc");
        Config::parse(dir, &[(dir.join("t.conf"), text.to_string())]).unwrap()
    }

    const JOBS: &str = "[web]\nremoteHostName=web.example\nTimeSchedule=0130\nTimeSchedule=1345\nTimeSchedule=0130\n\
                        killAt=0700\nresumeKilledAt=2000\n\
                        [db]\nremoteHostName=db.example\nstatus=disabled\nTimeSchedule=0300\n\
                        [vm]\nremoteHostName=esx.example\n";

    /// The file's first lines: what wrote it from where, the hash of no file, SHELL and PATH.
    fn head(file: &str, dir: &str) -> String {
        format!(
            "# {file}: written by affa from {dir}/*.conf; a change there is applied within 15 minutes (--_cronupdate), or at once by affa --make-cronjobs.\n\
             # configuration files: af1349b9f5f9a1a6a0404dea36dcc949\n\
             SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        )
    }

    /// The lines of JOBS' enabled jobs vm and web (`a` runs affa, `running` is web's transfer
    /// directory as the shell reads it), and the @reboot line after them.
    fn vm_and_web(a: &str, running: &str) -> String {
        format!(
            "\n# job vm\n30 22 * * * root {a} --silent --run vm\n\
             \n# job web\n30 1 * * * root {a} --silent --run web\n45 13 * * * root {a} --silent --run web\n\
             0 7 * * * root {a} --silent --kill web >/dev/null\n\
             0 20 * * * root test -d {running} && {a} --silent --run web\n\
             \n# restart the jobs a shutdown interrupted (resumeAfterBoot=yes)\n@reboot root {a} --silent --resume-interrupted >/dev/null\n"
        )
    }

    /// The daily pool scrub at scrubTime (default 12:00), scrubDays 16.
    fn scrub(a: &str) -> String {
        format!(
            "\n# read back 1/16 of every chunk pool and check it (scrubDays, scrubTime; damage is reported on stderr)\n0 12 * * * root {a} --silent --scrub >/dev/null\n"
        )
    }

    /// The last line: the self-refresh.
    fn refresh(a: &str) -> String {
        format!(
            "\n# apply configuration changes (Affa 3's self-refresh)\n*/15 * * * * root {a} --silent --_cronupdate\n"
        )
    }

    /// A `%` in affaBinary or RootDir: escaped (cron would cut the command there).
    #[test]
    fn a_percent_sign_is_escaped() {
        let cfg = config(&format!(
            "[GlobalAffaConfig]\nRootDir=/srv/a%1\naffaBinary=/opt/affa%d/affa\nmetricsFile=/nonexistent-affa-test/prom/affa.prom\n{JOBS}"
        ));
        let text = cron_text(&cfg, Path::new("/etc/affa"));
        assert!(text.contains(&vm_and_web("'/opt/affa\\%d/affa'", "'/srv/a\\%1/web/scheduled.running'")), "{text}");
        assert!(!text.lines().filter(|l| !l.starts_with('#')).any(|l| l.replace("\\%", "").contains('%')), "{text}");
    }

    #[test]
    fn the_cron_file_of_enabled_jobs_in_the_default_config_dir() {
        let cfg = config(&format!(
            "[GlobalAffaConfig]\nRootDir=/srv/affa\nsendStatus=daily\nmetricsFile=/nonexistent-affa-test/prom/affa.prom\n{JOBS}"
        ));
        let a = "/usr/sbin/affa";
        assert_eq!(
            cron_text(&cfg, Path::new("/etc/affa")),
            [
                head("/etc/cron.d/affa", "/etc/affa"),
                vm_and_web(a, "/srv/affa/web/scheduled.running"),
                format!("\n# status mail (sendStatus=daily)\n0 5 * * * root {a} --silent --send-status >/dev/null\n"),
                scrub(a),
                refresh(a),
            ]
            .concat()
        );
    }

    #[test]
    fn global_status_enabled_a_broken_job_metrics_and_a_quoted_config_dir() {
        let prom = tempfile::tempdir().unwrap();
        let cfg = config(&format!(
            "[GlobalAffaConfig]\nRootDir=/srv/my affa\naffaBinary=/opt/affa/bin/affa\nglobalStatus=enabled\nsendStatus=never\n\
             metricsFile={}/affa.prom\ncronFile=/etc/cron.d/backup\n{JOBS}[bad]\nremoteHostName=h\nTimeSchedule=0415\ndailyKeep=lots\n",
            prom.path().display()
        ));
        let a = "/opt/affa/bin/affa --config-dir '/srv/it'\\''s conf'";
        assert_eq!(
            cron_text(&cfg, Path::new("/srv/it's conf")),
            [
                head("/etc/cron.d/backup", "/srv/it's conf"),
                format!(
                    "\n# job bad\n# its configuration has errors (affa --configcheck): each start fails and mails until fixed\n\
                     15 4 * * * root {a} --silent --run bad\n\
                     \n# job db\n0 3 * * * root {a} --silent --run db\n"
                ),
                vm_and_web(a, "'/srv/my affa/web/scheduled.running'"),
                scrub(a),
                format!(
                    "\n# Prometheus textfile {}/affa.prom\n*/10 * * * * root {a} --silent --metrics >/dev/null\n",
                    prom.path().display()
                ),
                refresh(a),
            ]
            .concat()
        );
    }

    #[test]
    fn global_status_disabled_starts_no_job_and_keeps_the_status_mail() {
        let cfg = config(&format!(
            "[GlobalAffaConfig]\nglobalStatus=disabled\nmetricsFile=/nonexistent-affa-test/p/a.prom\n{JOBS}"
        ));
        let a = "/usr/sbin/affa --config-dir /etc/affa-test";
        assert_eq!(
            cron_text(&cfg, Path::new("/etc/affa-test")),
            [
                head("/etc/cron.d/affa", "/etc/affa-test"),
                "\n# globalStatus=disabled: no job runs from cron.\n".to_string(),
                format!("\n# status mail (sendStatus=weekly)\n0 5 * * 0 root {a} --silent --send-status >/dev/null\n"),
                scrub(a),
                refresh(a),
            ]
            .concat()
        );
        // The monthly status mail.
        let cfg = config(&format!(
            "[GlobalAffaConfig]\nsendStatus=monthly\nmetricsFile=/nonexistent-affa-test/p/a.prom\n{JOBS}"
        ));
        assert!(cron_text(&cfg, Path::new("/etc/affa")).contains(
            "\n# status mail (sendStatus=monthly)\n0 5 1 * * root /usr/sbin/affa --silent --send-status >/dev/null\n"
        ));
    }

    #[test]
    fn the_daily_scrub_follows_scrub_time_and_scrub_days_0_or_an_empty_time_turns_it_off() {
        let a = "/usr/sbin/affa";
        let text = |g: &str| cron_text(&config(&format!("[GlobalAffaConfig]\n{g}\n{JOBS}")), Path::new("/etc/affa"));
        assert!(text("scrubTime=0330\nscrubDays=30").contains(&format!(
            "\n# read back 1/30 of every chunk pool and check it (scrubDays, scrubTime; damage is reported on stderr)\n30 3 * * * root {a} --silent --scrub >/dev/null\n"
        )));
        assert!(!text("scrubDays=0").contains("--scrub"));
        assert!(!text("scrubTime=").contains("--scrub"));
        // No job, nothing to scrub.
        assert!(
            !cron_text(&config("[GlobalAffaConfig]\nRootDir=/srv/affa\n"), Path::new("/etc/affa")).contains("--scrub")
        );
    }

    #[test]
    fn offsite_schedule_starts_offsite_copies_of_jobs_with_an_offsite_target() {
        let base = "[GlobalAffaConfig]\nRootDir=/srv/affa\n[web]\nremoteHostName=h\nTimeSchedule=2230\n";
        let cfg = config(&format!(
            "{base}offsiteTarget=s3://bkt/box\noffsiteSchedule=0330\noffsiteSchedule=1200\noffsiteSchedule=0330\n"
        ));
        let text = cron_text(&cfg, Path::new("/etc/affa"));
        assert!(
            text.contains(
                "\n# job web\n30 22 * * * root /usr/sbin/affa --silent --run web\n\
                 30 3 * * * root /usr/sbin/affa --silent --offsite web\n0 12 * * * root /usr/sbin/affa --silent --offsite web\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("--offsite").count(), 2, "{text}");
        // Without offsiteTarget the key starts nothing.
        let cfg = config(&format!("{base}offsiteSchedule=0330\n"));
        assert!(!cron_text(&cfg, Path::new("/etc/affa")).contains("--offsite"));
    }

    #[test]
    fn the_mounts_of_samba_shares_are_made_again_at_boot() {
        let line = "@reboot root /usr/sbin/affa --silent --samba-shares >/dev/null\n";
        let shared = "[GlobalAffaConfig]\nRootDir=/srv/affa\n[vm]\nremoteHostName=esx.example\nSambaShare=yes\n";
        let cfg = config(&format!("{shared}chunkFiles=*-flat.vmdk\n"));
        assert_eq!(cron_text(&cfg, Path::new("/etc/affa")).matches(line).count(), 1);
        // A share without chunked files too: its path is a bind mount of RootDir/JOB (nodev),
        // which a reboot undoes as it ends affa --mount.
        assert_eq!(cron_text(&config(shared), Path::new("/etc/affa")).matches(line).count(), 1);
        // No share, no line.
        let unshared = "[GlobalAffaConfig]\nRootDir=/srv/affa\n[vm]\nremoteHostName=esx.example\n";
        assert!(!cron_text(&config(unshared), Path::new("/etc/affa")).contains("--samba-shares"));
    }
}
