//! SME Server hosts (`SMEServer=yes`, `RPMCheck=yes`, `Watchdog=yes`), as Affa 3 handles them.
//!
//! Owns: around the transfer of an SME Server host, in Affa 3's order: the watchdog installed on
//! the host, the `pre-backup` event (it dumps the databases into the tree that is backed up),
//! the host's package list, SME's standard backup set added to the sources; after the post-job
//! scripts, the `post-backup` event and the comparison of the package lists. Must never: take a
//! path from the host that could leave the archive (the host's backup-set entries are checked),
//! or let a failing mail change the outcome of a run.
//!
//! The events are run by the scripts `scriptDir/SME/signal-pre-backup` and `signal-post-backup`
//! when they exist (Affa 3 shipped them), else by built-in ones that call `signal-event` (found
//! on the host's PATH, then in /sbin/e-smith). A script runs on the host as every remote script
//! does (copied to a temp file, run, removed); with `remoteHostName=localhost` it runs here.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::backup::ctx::{Ctx, RunSummary};
use crate::backup::scripts::{remote_script, run_logged};
use crate::error::{IoContext, Result};
use crate::transport::shell_quote;

/// Affa 3's `signal-pre-backup`: SME's pre-backup event, which dumps the databases.
const PRE_BACKUP: &str = "#!/bin/sh\n# affa (SMEServer=yes): SME Server's pre-backup event, which dumps the databases\nPATH=$PATH:/sbin/e-smith\nexec signal-event pre-backup desktop\n";
/// Affa 3's `signal-post-backup`.
const POST_BACKUP: &str =
    "#!/bin/sh\n# affa (SMEServer=yes): SME Server's post-backup event\nPATH=$PATH:/sbin/e-smith\nexec signal-event post-backup\n";

/// SME Server's standard backup set (esmith::Backup's restore list), which Affa 3 adds to the
/// sources of an SME job, with `/etc/affa`; the host's `/etc/backup-data.d/*.include` entries
/// (contribs) are added too. Only the paths that exist on the host are used.
pub const SME_BACKUP_SET: &[&str] = &[
    "/home/e-smith",
    "/etc/e-smith/templates-custom",
    "/etc/e-smith/templates-user-custom",
    "/etc/ssh",
    "/root",
    "/etc/sudoers",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/samba/secrets.tdb",
    "/etc/samba/smbpasswd",
    "/etc/affa",
];

/// Where the host's package list is written before the transfer (inside the backup set).
pub const RPM_LIST: &str = "/home/e-smith/db/affa-rpmlist";

fn sme(ctx: &Ctx) -> bool {
    ctx.job.sme.is_some()
}

fn local(ctx: &Ctx) -> bool {
    ctx.job.local
}

/// SMEServer=yes with Watchdog=yes, RPMCheck=yes.
fn watchdog(job: &crate::config::Job) -> bool {
    job.sme.is_some_and(|s| s.watchdog)
}
fn rpm_check(ctx: &Ctx) -> bool {
    ctx.job.sme.is_some_and(|s| s.rpm_check)
}

/// Run one of the SME scripts (`SME/NAME` of scriptDir, else the built-in `body`) on the host.
fn run_sme_script(ctx: &Ctx, name: &str, builtin: &str) -> Result<Vec<u8>> {
    let rel = format!("SME/{name}");
    let file = ctx.cfg.script_dir().join(&rel);
    let body = if file.is_file() {
        fs::read(&file).ctx(|| format!("cannot read {}", file.display()))?
    } else {
        builtin.as_bytes().to_vec()
    };
    match ctx.source() {
        Some(t) => remote_script(ctx, &t, &rel, &body),
        None => {
            ctx.log.info(format!("Executing script {rel}"));
            let (host, job) = (ctx.job.host.as_str(), ctx.job.name.as_str());
            let mut c;
            if file.is_file() {
                c = Command::new(&file);
                c.arg(host).arg(job).arg("");
            } else {
                c = Command::new("/bin/sh");
                c.args(["-s", "--", host, job]);
            }
            let input: &[u8] = if file.is_file() { &[] } else { &body };
            run_logged(ctx, c, input, &format!("cannot run {rel}"), |code| {
                format!("{rel} of job {} failed with exit {code}", ctx.job.name)
            })
        }
    }
}

/// Before the transfer (after the pre-job scripts): the watchdog, the pre-backup event, the
/// package list. A failure fails the run.
pub fn before_transfer(ctx: &Ctx) -> Result<()> {
    if !sme(ctx) {
        return Ok(());
    }
    if watchdog(ctx.job) && !local(ctx) {
        install_watchdog(ctx)?;
    }
    run_sme_script(ctx, "signal-pre-backup", PRE_BACKUP)?;
    if rpm_check(ctx) && !local(ctx) {
        ctx.log.info(format!("writing the list of installed packages on {} ({RPM_LIST})", ctx.job.host));
        run_sme_script(ctx, "rpm-list", &rpm_list_script(Some(RPM_LIST)))?;
    }
    Ok(())
}

/// After the post-job scripts: the post-backup event, then the package comparison.
pub fn after_run(ctx: &Ctx, summary: &mut RunSummary) -> Result<()> {
    if !sme(ctx) {
        return Ok(());
    }
    run_sme_script(ctx, "signal-post-backup", POST_BACKUP)?;
    if rpm_check(ctx) && !local(ctx) {
        compare_rpm_lists(ctx, summary);
    }
    Ok(())
}

/// The source paths of the transfer: the job's; for an SME job, Affa 3's: SME's backup set
/// (the paths of it that exist on the host) followed by the job's `Include` paths.
pub fn sources(ctx: &Ctx) -> Result<Vec<String>> {
    if !sme(ctx) {
        return Ok(ctx.job.sources.clone());
    }
    let mut list: Vec<String> = SME_BACKUP_SET.iter().map(|s| s.to_string()).collect();
    let probe = format!(
        "for p in {} $(cat /etc/backup-data.d/*.include 2>/dev/null); do [ -e \"$p\" ] && printf '%s\\n' \"$p\"; done; exit 0",
        list.iter().map(|p| shell_quote(p)).collect::<Vec<_>>().join(" ")
    );
    let out = match ctx.source() {
        Some(t) => t.run_ok(&probe, "listing SME Server's backup set")?,
        None => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(&probe);
            let what = "listing SME Server's backup set";
            let out = crate::transport::output_within(c, None, ctx.job.scripts.timeout, what, "scriptTimeout")?;
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    list.clear();
    for l in out.lines().take(1000) {
        // What the host names must stay a plain absolute path inside the archive.
        let ok = l.starts_with('/')
            && l.len() < 4096
            && !l.chars().any(|c| c.is_control())
            && !l.split('/').any(|c| c == "..");
        if ok && !list.iter().any(|x| x == l) {
            list.push(l.to_string());
        } else if !ok {
            ctx.log.warn(format!("ignoring the backup-set entry {l:?} of the host: not a plain absolute path"));
        }
    }
    for p in &ctx.job.include_paths {
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
    if list.is_empty() {
        list = ctx.job.sources.clone();
    }
    ctx.log.info(format!("SMEServer=yes: backing up {}", list.join(" ")));
    Ok(list)
}

/// A script that writes the installed packages as `NAME VERSION-RELEASE` lines, sorted (Affa 3's
/// `affa-rpmlist.sh` reduced `yum list installed` to the same), to `to` or to stdout.
fn rpm_list_script(to: Option<&str>) -> String {
    let list = "rpm -qa --qf '%{NAME} %{VERSION}-%{RELEASE}\\n' | LC_ALL=C sort";
    match to {
        Some(f) => format!(
            "#!/bin/sh\nPATH=$PATH:/bin:/usr/bin\nset -e\numask 022\nmkdir -p {d}\n{list} > {f}.affa-tmp\nmv {f}.affa-tmp {f}\n",
            d = shell_quote(&Path::new(f).parent().unwrap_or(Path::new("/")).to_string_lossy()),
            f = shell_quote(f)
        ),
        None => format!("#!/bin/sh\n{list}\n"),
    }
}

/// `NAME VERSION` lines -> (name, version) pairs.
fn parse_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
        })
        .collect()
}

/// Affa 3's compareRPMLists: the host's list (in the new archive) against this server's;
/// packages missing here or of another version go to `RootDir/JOB/rpms-missing.txt`, mailed
/// once per distinct list (a `.md5-rpms-missing-HASH` marker). Problems are warnings.
fn compare_rpm_lists(ctx: &Ctx, summary: &mut RunSummary) {
    let archived = ctx.job_dir.join("scheduled.0").join(RPM_LIST.trim_start_matches('/'));
    let remote = match fs::symlink_metadata(&archived) {
        Ok(m) if m.is_file() && m.len() < 16 << 20 => fs::read_to_string(&archived).unwrap_or_default(),
        _ => {
            let w = format!("RPMCheck: the archive has no package list of the host ({RPM_LIST})");
            ctx.log.warn(&w);
            summary.warnings.push(w);
            return;
        }
    };
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(rpm_list_script(None));
    let what = "listing this server's packages";
    let local = crate::transport::output_within(c, None, ctx.job.scripts.timeout, what, "scriptTimeout");
    let local = match local {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            ctx.log.info(
                "RPMCheck: this backup server has no rpm database to compare with; the host's package list is in the archive",
            );
            return;
        }
    };
    let here: std::collections::HashMap<String, String> = parse_list(&local).into_iter().collect();
    let (mut missing, mut other) = (Vec::new(), Vec::new());
    let mut h = blake3::Hasher::new();
    for (name, ver) in parse_list(&remote) {
        match here.get(&name) {
            None => missing.push(format!("{name}-{ver}")),
            Some(v) if *v != ver => other.push(format!("{name}-{ver}")),
            _ => continue,
        }
        h.update(format!("{name}-{ver}\n").as_bytes());
    }
    let host = &ctx.job.host;
    let mut text = String::new();
    if !missing.is_empty() {
        text.push_str(&format!(
            "* \n* The following packages are installed on {host},\n* but they are missing on this backup host:\n* \n{}\n",
            missing.join("\n")
        ));
    }
    if !other.is_empty() {
        text.push_str(&format!("\n* \n* The following packages are installed on both,\n* the source {host} and on this backup host,\n* but the version does not match:\n* \n{}\n", other.join("\n")));
    }
    let marker = ctx.job_dir.join(format!(".md5-rpms-missing-{}", &h.finalize().to_hex()[..32]));
    if marker.exists() {
        return;
    }
    let file = ctx.job_dir.join("rpms-missing.txt");
    if let Err(e) = crate::fsutil::write_atomic(&file, text.as_bytes(), crate::fsutil::Perm::Mode(0o644)) {
        ctx.log.warn(format!("RPMCheck: {e}"));
        return;
    }
    ctx.log.info(format!(
        "RPMCheck: {} missing, {} of another version: {}",
        missing.len(),
        other.len(),
        file.display()
    ));
    if !text.is_empty() {
        let subject = format!("affa: packages of {host} missing on the backup server {}", crate::notify::hostname());
        match crate::notify::send(ctx.cfg, &crate::notify::recipients(ctx.job), &subject, &text) {
            Ok(how) => ctx.log.info(format!("RPM check message sent {how}")),
            Err(e) => ctx.log.warn(format!("cannot send the RPM check message: {e}")),
        }
    }
    if let Ok(rd) = fs::read_dir(&ctx.job_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".md5-rpms-missing-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::write(&marker, format!("hash of the content of {}\n", file.display()));
}

/// Seconds from now to the job's next scheduled start (one day when it has none).
fn to_next_run(ctx: &Ctx) -> i64 {
    use chrono::Timelike;
    let now = ctx.clock.now();
    let mins = (now.hour() * 60 + now.minute()) as i64;
    ctx.job
        .schedule
        .iter()
        .map(|&(h, m)| {
            let d = (h * 60 + m) as i64 - mins;
            if d <= 0 {
                d + 1440
            } else {
                d
            }
        })
        .min()
        .map(|d| d * 60 - now.second() as i64)
        .unwrap_or(86400)
}

/// Affa 3's watchdog: a script in the host's watchdogDir (`/etc/cron.hourly`) named
/// `affa-watchdog-JOB-BACKUPIP` (the backup server's address as the host sees it, as Affa 3
/// named it), replaced by every run, with a trigger time = now + the time to the next scheduled
/// run + 600 s. If the hourly cron finds the trigger passed (no run replaced it in time), the
/// host mails the job's recipients "Scheduled affa job 'JOB' did not run on BACKUPHOST", renames
/// the script `...-reminder`, and reminds daily at the trigger's hour until the next run. Each
/// run removes the `-reminder` first. POSIX sh and sendmail: any host with cron carries it.
fn install_watchdog(ctx: &Ctx) -> Result<()> {
    let Some(t) = ctx.source() else { return Ok(()) };
    let dt = to_next_run(ctx) + 600;
    let now = ctx.clock.now();
    let trigger = (now + chrono::Duration::seconds(dt)).format("%Y%m%d%H%M").to_string();
    ctx.log.info(format!("Installing the watchdog on {} (trigger {trigger}, in {dt} s)", t.host));
    let recipients = crate::notify::recipients(ctx.job).join(", ");
    let watchdog = format!(
        "#!/bin/sh\n# affa watchdog of the job {job} of the backup server {backup}: replaced by every backup run;\n\
         # if none replaced it by {trigger}, it mails {to}, then reminds daily.\n\
         PATH=$PATH:/usr/sbin:/usr/lib:/sbin\nTRIGGER={trigger}\nJOB={qjob}\nTO={qto}\nBACKUPHOST={qbackup}\nSCHEDULED={qsched}\n\
         now=$(date +%Y%m%d%H%M)\n[ \"$now\" -lt \"$TRIGGER\" ] && exit 0\n\
         hour=$(printf %s \"$TRIGGER\" | cut -c9-10)\n\
         mail() {{\n  {{\n    printf 'To: %s\\nSubject: Error: %sScheduled affa job %s did not run on %s\\n\\n' \"$TO\" \"$1\" \"'$JOB'\" \"$BACKUPHOST\"\n\
         \x20   printf 'The backup job %s scheduled on %s did not run.\\n' \"'$JOB'\" \"$SCHEDULED\"\n\
         \x20   printf 'Please check and fix the affa configuration on %s.\\n' \"$BACKUPHOST\"\n\
         \x20   printf 'A reminder is sent daily at %s:00 while the error continues.\\n\\n' \"$hour\"\n\
         \x20   printf 'Remove the file %s-reminder to stop the reminders.\\n' \"${{0%-reminder}}\"\n\
         \x20 }} | sendmail -t -i\n}}\n\
         case \"$0\" in\n  *-reminder) [ \"$(date +%H)\" = \"$hour\" ] && [ $((now - TRIGGER)) -gt 1200 ] && mail '(Reminder) ' ;;\n\
         \x20 *) mail '' && mv \"$0\" \"$0-reminder\" ;;\nesac\nexit 0\n",
        job = ctx.job.name,
        backup = crate::notify::hostname(),
        to = recipients,
        qjob = shell_quote(&ctx.job.name),
        qto = shell_quote(&recipients),
        qbackup = shell_quote(&crate::notify::hostname()),
        qsched = shell_quote(&now.format("%a %b %e %H:%M:%S %Y").to_string()),
    );
    let dir = &ctx.cfg.settings.watchdog_dir;
    let installer = format!(
        "#!/bin/sh\nset -e\nip=${{SSH_CLIENT%% *}}\nname={d}/affa-watchdog-{j}-${{ip:-unknown}}\nrm -f \"$name-reminder\"\nmkdir -p {d}\numask 077\n\
         cat > \"$name.affa-tmp\" <<'AFFA_WATCHDOG_END'\n{watchdog}AFFA_WATCHDOG_END\nchmod 700 \"$name.affa-tmp\"\nmv \"$name.affa-tmp\" \"$name\"\n",
        d = shell_quote(dir),
        j = ctx.job.name,
    );
    remote_script(ctx, &t, "watchdog", installer.as_bytes()).map(|_| ())
}

/// `--mailtest JOB` of a job with the watchdog (Affa 3): the host sends a test mail the way its
/// watchdog would, so a host that cannot mail is found before it matters. None without watchdog.
pub fn watchdog_mailtest(cfg: &crate::config::Config, job: &crate::config::Job) -> Result<Option<String>> {
    if !watchdog(job) || job.local {
        return Ok(None);
    }
    let t = crate::transport::SshTarget::from_job(job, cfg);
    let to = crate::notify::recipients(job).join(", ");
    let mail = format!(
        "To: {to}\nSubject: affa watchdog test mail from {host} for job {j}\n\n\
         The affa watchdog of job {j} (backup server {backup}) can send mail from {host}.\n",
        host = job.host,
        j = job.name,
        backup = crate::notify::hostname()
    );
    let cmd = format!("PATH=$PATH:/usr/sbin:/usr/lib:/sbin; printf '%s' {} | sendmail -t -i", shell_quote(&mail));
    t.run_ok(&cmd, "the watchdog test mail")?;
    Ok(Some(format!("watchdog test mail of job {} sent by {} to {to}", job.name, job.host)))
}
