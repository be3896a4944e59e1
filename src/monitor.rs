//! Monitoring: `--nrpe` (a Nagios/NRPE plugin: one line, perfdata after `|`, exit 0 OK,
//! 1 WARNING, 2 CRITICAL, 3 UNKNOWN) and `--metrics` (the Prometheus text format for
//! node_exporter's textfile collector, written atomically to metricsFile).
//!
//! Owns: the health rules (CRITICAL: an interrupted job, or no successful run within NRPEtrigger
//! hours, or none at all; WARNING: the free space of RootDir is below the last backup's size
//! times the DiskSpaceWarn factor) and the metric names. Must never: change anything but
//! metricsFile, or fail a backup run because metrics could not be written.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{NaiveDateTime, TimeZone};

use crate::archive::{self, Level};
use crate::clock::Clock;
use crate::config::{Config, Job};
use crate::cron::effective_enabled;
use crate::error::{IoContext, Result};
use crate::report::Report;
use crate::transport::rsync;

/// What monitoring needs to know about one job.
#[derive(Debug, Clone, Default)]
pub struct JobState {
    /// Date of the newest valid archive (the last successful run).
    pub last_success: Option<NaiveDateTime>,
    /// The report of that archive.
    pub report: Option<Report>,
    /// Archives per level (Level as index).
    pub counts: [usize; 5],
    pub running: Option<i32>,
    pub interrupted: bool,
}

pub fn job_state(cfg: &Config, job: &Job) -> Result<JobState> {
    let dir = job.job_dir();
    let all = archive::list(&dir)?;
    let mut st = JobState::default();
    for a in &all {
        st.counts[a.level as usize] += 1;
    }
    if let Some(a) = archive::newest_valid(&dir)? {
        st.last_success =
            a.report.as_ref().and_then(|r| r.date()).and_then(|d| NaiveDateTime::parse_from_str(d, "%Y%m%d%H%M").ok());
        st.report = a.report;
    }
    st.running = crate::lock::holder(&cfg.lock_dir(), &job.name);
    st.interrupted = st.running.is_none() && dir.join(archive::RUNNING).exists();
    Ok(st)
}

/// The DiskSpaceWarn rule of run.rs: free space of RootDir below the last backup's size times
/// 1 (strict), 0.5 (normal), 0.1 (risky). Some(message) when it applies.
fn disk_space_low(job: &Job, st: &JobState) -> Option<String> {
    let size = st.report.as_ref().and_then(|r| r.num("TotalFileSize"))?;
    let avail_kib = disk_space_warning(job, size)?;
    Some(format!("disk space low: {} MiB free, last backup {} MiB", avail_kib / 1024, size / 1048576))
}

/// The DiskSpaceWarn rule (the backup's warning and the monitor's both): RootDir's free space
/// is low when it is below the last backup's size (`strict`), half of it (`normal`) or a tenth
/// (`risky`). The free KiB when it is low; None when it is not, the setting is `none` (or
/// unknown), or the free space cannot be read.
pub fn disk_space_warning(job: &Job, last_backup_bytes: u64) -> Option<u64> {
    let factor = job.disk_space_warn.factor()?;
    let (_, avail_kib) = rsync::df(&job.root_dir())?;
    ((avail_kib as f64) * 1024.0 < last_backup_bytes as f64 * factor).then_some(avail_kib)
}

/// `--nrpe [JOB...]`: the plugin's one line and its exit code (0 OK, 1 WARNING, 2 CRITICAL,
/// 3 UNKNOWN). Without job names every enabled job is checked; named jobs are checked whatever
/// their status. NRPEtrigger=0 turns the age check of a job off; a negative NRPEtrigger (Affa
/// 3's way) leaves the job out of monitoring.
pub fn nrpe(cfg: &Config, jobs: &[String], clock: &dyn Clock) -> Result<(String, i32)> {
    let selected: Vec<&Job> = if jobs.is_empty() {
        cfg.all_jobs().into_iter().filter(|j| effective_enabled(cfg, j)).collect()
    } else {
        let mut v = Vec::new();
        for n in jobs {
            match cfg.broken.get(n.as_str()).map(|b| &b.partial).ok_or(()).or_else(|_| cfg.job(n)) {
                Ok(j) => v.push(j),
                Err(e) => return Ok((format!("UNKNOWN: {e}"), 3)),
            }
        }
        v
    };
    let selected: Vec<&Job> = selected.into_iter().filter(|j| j.nrpe_trigger.is_some()).collect();
    let now = clock.now();
    let (mut crit, mut warn, mut perf) = (Vec::new(), Vec::new(), Vec::new());
    let (mut exec_secs, mut size_bytes) = (0u64, 0u64);
    for job in &selected {
        if cfg.broken.contains_key(&job.name) {
            // Its runs fail until the configuration is fixed: as critical as a failed run.
            crit.push(format!("{} (configuration error)", job.name));
            perf.push(format!("'{}_age'=U", job.name));
            continue;
        }
        let st = match job_state(cfg, job) {
            Ok(s) => s,
            // That job's archives cannot be read (EIO, a file in its directory's place): it
            // is critical, the other jobs are still checked.
            Err(e) => {
                crit.push(format!("{} (cannot read its archives: {e})", job.name));
                perf.push(format!("'{}_age'=U", job.name));
                continue;
            }
        };
        let trigger = job.nrpe_trigger.unwrap_or(0) * 3600;
        if let Some(r) = &st.report {
            exec_secs += r.num("ExecutionTime").unwrap_or(0);
            size_bytes += r.num("TotalFileSize").unwrap_or(0);
        }
        let age = st.last_success.map(|t| (now - t).num_seconds().max(0) as u64);
        if st.interrupted {
            crit.push(format!("{} (interrupted)", job.name));
        } else if trigger > 0 {
            match age {
                None => crit.push(format!("{} (no successful run)", job.name)),
                Some(a) if a > trigger => {
                    crit.push(format!("{} (last success {:.1} h ago)", job.name, a as f64 / 3600.0))
                }
                _ => {}
            }
        }
        if let Some(w) = disk_space_low(job, &st) {
            warn.push(format!("{} ({w})", job.name));
        }
        let crit_s = if trigger > 0 { trigger.to_string() } else { String::new() };
        match age {
            Some(a) => perf.push(format!("'{}_age'={a}s;;{crit_s};0;", job.name)),
            None => perf.push(format!("'{}_age'=U", job.name)),
        }
    }
    // Affa 3's perfdata first, labels and units as it wrote them (existing graphs go on), then
    // the age of each job.
    let (min, gib) = (exec_secs as f64 / 60.0, size_bytes as f64 / 1024.0 / 1024.0 / 1024.0);
    let affa3 = if selected.len() == 1 {
        format!("Execution Time={min:.1}min;;;; Size={gib:.3}GByte;;;;")
    } else {
        let total = cfg.all_jobs().iter().filter(|j| j.nrpe_trigger.is_some()).count();
        format!(
            "Jobs failed={};;;; Jobs total={total};;;; Jobs checked={};;;; Total Execution Time={min:.1}min;;;; Total Size={gib:.3}GByte;;;;",
            crit.len(),
            selected.len()
        )
    };
    perf.insert(0, affa3);
    let perf = format!(" | {}", perf.join(" "));
    // Errors of no job (a header affa could not read, e.g. `[web server]`): the job it was
    // meant to be is unknown, so it is in no list above, and its backups may have stopped.
    let orphans = cfg.problems_of_no_job();
    if jobs.is_empty() && !orphans.is_empty() {
        crit.push(format!("{} configuration error(s) outside any job (affa --configcheck)", orphans.len()));
    }
    let (line, code) = if !crit.is_empty() {
        let mut l = format!("CRITICAL: Failed jobs: {}", crit.join(", "));
        if !warn.is_empty() {
            l.push_str(&format!("; warnings: {}", warn.join(", ")));
        }
        (l, 2)
    } else if !warn.is_empty() {
        (format!("WARNING: {}", warn.join(", ")), 1)
    } else if selected.is_empty() {
        ("OK: no job to check (none enabled, or NRPEtrigger < 0)".to_string(), 0)
    } else {
        let names: Vec<&str> = selected.iter().map(|j| j.name.as_str()).collect();
        (format!("OK: {} job(s) backed up in time: {}", selected.len(), names.join(", ")), 0)
    };
    Ok((line + &perf, code))
}

/// The jobs NRPE checks one by one (Affa 3's `--_jobsnrpe`): enabled, NRPEtrigger >= 0.
pub fn nrpe_jobs(cfg: &Config) -> Vec<&Job> {
    cfg.all_jobs().into_iter().filter(|j| effective_enabled(cfg, j) && j.nrpe_trigger.is_some()).collect()
}

/// The nrpe.cfg that `--init-nrpe` extends: nrpeConfig, else Affa 3's two places.
fn nrpe_cfg(cfg: &Config) -> Option<PathBuf> {
    if let Some(set) = &cfg.settings.nrpe_config {
        return Some(set.clone());
    }
    ["/etc/nagios/nrpe.cfg", "/etc/icinga/nrpe.cfg"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The NRPE command file: Affa 3's commands (`sudo` as in Affa 3: NRPE runs as its own user
/// and the archives are root's; see docs/OPERATIONS.md for the sudoers line).
pub fn nrpe_config_text(cfg: &Config) -> String {
    let affa = crate::cron::affa_command(cfg, &crate::cron::absolute(&cfg.dir));
    let mut s = String::from("# written by affa --init-nrpe (and --_jobsnrpe); nrpe.cfg includes it\n");
    s.push_str(&format!("command[check_affa]=sudo {affa} --nrpe\n"));
    s.push_str(&format!("command[affa_jobsnrpe]=sudo {affa} --_jobsnrpe\n"));
    s.push_str(&format!("command[affa_diskusagenrpe]=sudo {affa} --disk-usage --csv\n"));
    for j in nrpe_jobs(cfg) {
        s.push_str(&format!("command[check_affa_{n}]=sudo {affa} --nrpe {n}\n", n = j.name));
    }
    s
}

/// `--init-nrpe`: write `affa-nrpe.cfg` next to nrpe.cfg, include it from nrpe.cfg (once), and
/// run nrpeRestart when either file changed. Err when NRPE is not installed.
pub fn init_nrpe(cfg: &Config) -> Result<String> {
    let Some(main) = nrpe_cfg(cfg) else {
        bail!("NRPE is not installed on this server (no /etc/nagios/nrpe.cfg or /etc/icinga/nrpe.cfg); set nrpeConfig in [GlobalAffaConfig] to its nrpe.cfg");
    };
    let own = main.with_file_name("affa-nrpe.cfg");
    let text = nrpe_config_text(cfg);
    let mut changed = Vec::new();
    if fs::read_to_string(&own).ok().as_deref() != Some(text.as_str()) {
        crate::fsutil::write_file(&own, &text, 0o644)?;
        changed.push(format!("{} written", own.display()));
    }
    let include = format!("include={}", own.display());
    let old = fs::read_to_string(&main).ctx(|| format!("cannot read {}", main.display()))?;
    let mut new: String = old.lines().filter(|l| l.trim() != include).map(|l| format!("{l}\n")).collect();
    new.push_str(&include);
    new.push('\n');
    if new != old {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&main).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        crate::fsutil::write_file(&main, &new, mode)?;
        changed.push(format!("{} includes it", main.display()));
    }
    if changed.is_empty() {
        return Ok(format!("{} is up to date", own.display()));
    }
    let restart = &cfg.settings.nrpe_restart;
    if !restart.is_empty() {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(restart)
            .stdin(std::process::Stdio::null())
            .output()
            .ctx(|| format!("cannot run nrpeRestart '{restart}'"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{}; but nrpeRestart '{restart}' failed (exit {}): {}",
                changed.join(", "),
                out.status.code().unwrap_or(-1),
                err.lines().next().unwrap_or("").trim()
            );
        }
        changed.push(format!("NRPE restarted ({restart})"));
    }
    Ok(changed.join("; "))
}

fn epoch(t: NaiveDateTime) -> Option<i64> {
    chrono::Local.from_local_datetime(&t).earliest().map(|d| d.timestamp())
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Bytes and files in a chunk pool (apparent sizes).
fn pool_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    for f in crate::fsutil::walk_files(dir).unwrap_or_default() {
        if let Ok(m) = fs::symlink_metadata(&f) {
            bytes += m.len();
            files += 1;
        }
    }
    (bytes, files)
}

struct Family {
    name: &'static str,
    help: &'static str,
    samples: Vec<(String, String)>,
}

/// Where the pool samples of the last `--metrics` are kept (`lockDir/.metrics-pool`: one line
/// `BYTES FILES ROOTDIR` per pool), for the refresh after a run.
fn pool_cache(cfg: &Config) -> PathBuf {
    cfg.lock_dir().join(".metrics-pool")
}

/// How old remembered pool counts may be before the refresh after a run counts again (when the
/// `--metrics` cron line is missing, the figures would otherwise never move).
const POOL_CACHE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

fn read_pool_cache(cfg: &Config) -> Vec<(PathBuf, (u64, u64))> {
    let path = pool_cache(cfg);
    let fresh = fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age <= POOL_CACHE_MAX_AGE);
    if !fresh {
        return Vec::new();
    }
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            let (b, f, r) = (w.next()?.parse().ok()?, w.next()?.parse().ok()?, w.next()?);
            Some((PathBuf::from(r), (b, f)))
        })
        .collect()
}

/// The metrics in Prometheus text format (the chunk pools walked for their size).
pub fn metrics_text(cfg: &Config, clock: &dyn Clock) -> Result<String> {
    metrics_text_with(cfg, clock, true)
}

/// `walk_pools`: count every pool entry (`--metrics`, from cron, off the backups' path; the
/// counts are remembered in [`pool_cache`]) or take the counts `--metrics` remembered (the
/// refresh after a run: its cost must not grow with the pool; a pool not remembered yet is
/// walked once).
fn metrics_text_with(cfg: &Config, clock: &dyn Clock, walk_pools: bool) -> Result<String> {
    let remembered = if walk_pools { Vec::new() } else { read_pool_cache(cfg) };
    let mut walked: Vec<(PathBuf, (u64, u64))> = Vec::new();
    let fam = |name, help| Family { name, help, samples: Vec::new() };
    let mut enabled = fam("affa_job_enabled", "1 if the job runs from cron");
    let mut last =
        fam("affa_last_success_timestamp_seconds", "Unix time of the newest valid archive (the last successful run)");
    let mut dur = fam("affa_last_duration_seconds", "ExecutionTime of the last successful run");
    let mut recv = fam("affa_last_bytes_received", "TotalBytesReceived of the last successful run");
    let mut size = fam("affa_last_total_file_size_bytes", "TotalFileSize of the last successful run");
    let mut arch = fam("affa_archives", "Number of archives per level");
    let mut running = fam("affa_running", "1 while the job runs");
    let mut interrupted = fam("affa_interrupted", "1 if the job's last transfer was interrupted and not resumed yet");
    let mut job_error = fam(
        "affa_job_error",
        "1 if the job's configuration has errors or its archives cannot be read (it does not run, or cannot be checked)",
    );
    let mut pool = fam("affa_pool_size_bytes", "Bytes in the chunk pool RootDir/.affa-pool");
    let mut pool_files = fam("affa_pool_files", "Files in the chunk pool RootDir/.affa-pool");
    let mut avail = fam("affa_rootdir_avail_bytes", "Free bytes on the file system of RootDir");
    let mut used = fam("affa_rootdir_used_bytes", "Used bytes on the file system of RootDir");
    let mut gen = fam("affa_metrics_generated_timestamp_seconds", "Unix time this file was written");
    let mut roots: Vec<PathBuf> = Vec::new();
    // Every job, a broken one too: its series vanishing would resolve an alert instead of
    // firing one; one job whose archives cannot be read does not keep the others' metrics out.
    for job in cfg.all_jobs() {
        let l = format!("job=\"{}\"", label(&job.name));
        let st = match cfg.broken.contains_key(&job.name) {
            true => None,
            false => job_state(cfg, job).ok(),
        };
        job_error.samples.push((l.clone(), (st.is_none() as u8).to_string()));
        let Some(st) = st else { continue };
        enabled.samples.push((l.clone(), (effective_enabled(cfg, job) as u8).to_string()));
        if let Some(t) = st.last_success.and_then(epoch) {
            last.samples.push((l.clone(), t.to_string()));
        }
        if let Some(r) = &st.report {
            for (f, k) in [(&mut dur, "ExecutionTime"), (&mut recv, "TotalBytesReceived"), (&mut size, "TotalFileSize")]
            {
                if let Some(v) = r.num(k) {
                    f.samples.push((l.clone(), v.to_string()));
                }
            }
        }
        for lv in Level::ALL {
            arch.samples.push((format!("{l},level=\"{}\"", lv.name()), st.counts[lv as usize].to_string()));
        }
        running.samples.push((l.clone(), (st.running.is_some() as u8).to_string()));
        interrupted.samples.push((l.clone(), (st.interrupted as u8).to_string()));
        if !roots.contains(&job.root_dir()) {
            roots.push(job.root_dir());
        }
    }
    roots.sort();
    for r in &roots {
        let l = format!("root_dir=\"{}\"", label(&r.to_string_lossy()));
        let p = r.join(crate::chunk::POOL_DIR);
        if p.is_dir() {
            let (b, f) = match remembered.iter().find(|(root, _)| root == r) {
                Some((_, v)) => *v,
                None => {
                    let v = pool_size(&p);
                    walked.push((r.clone(), v));
                    v
                }
            };
            pool.samples.push((l.clone(), b.to_string()));
            pool_files.samples.push((l.clone(), f.to_string()));
        }
        if let Some((u, a)) = rsync::df(r) {
            used.samples.push((l.clone(), (u * 1024).to_string()));
            avail.samples.push((l.clone(), (a * 1024).to_string()));
        }
    }
    if !walked.is_empty() {
        let mut all = remembered;
        all.retain(|(root, _)| !walked.iter().any(|(w, _)| w == root));
        all.extend(walked);
        let text: String = all
            .iter()
            .filter(|(r, _)| r.to_str().is_some_and(|s| !s.contains('\n')))
            .map(|(r, (b, f))| format!("{b} {f} {}\n", r.display()))
            .collect();
        // A cache: without it the next refresh walks again.
        let _ = crate::fsutil::write_file(&pool_cache(cfg), &text, 0o600);
    }
    if let Some(t) = epoch(clock.now()) {
        gen.samples.push((String::new(), t.to_string()));
    }
    let mut out = String::new();
    for f in [enabled, last, dur, recv, size, arch, running, interrupted, job_error, pool, pool_files, avail, used, gen]
    {
        if f.samples.is_empty() {
            continue;
        }
        out.push_str(&format!("# HELP {} {}\n# TYPE {} gauge\n", f.name, f.help, f.name));
        for (l, v) in f.samples {
            if l.is_empty() {
                out.push_str(&format!("{} {v}\n", f.name));
            } else {
                out.push_str(&format!("{}{{{l}}} {v}\n", f.name));
            }
        }
    }
    Ok(out)
}

/// `--metrics`: write the Prometheus textfile (creating its directory); returns a one-line summary.
pub fn write_metrics(cfg: &Config, clock: &dyn Clock) -> Result<String> {
    write_metrics_with(cfg, clock, true)
}

fn write_metrics_with(cfg: &Config, clock: &dyn Clock, walk_pools: bool) -> Result<String> {
    let path = cfg.settings.metrics_file.clone();
    let text = metrics_text_with(cfg, clock, walk_pools)?;
    crate::fsutil::write_file(&path, &text, 0o644)?;
    let n = text.lines().filter(|l| !l.starts_with('#')).count();
    Ok(format!("{} written: {n} samples", path.display()))
}

/// After a run: rewrite metricsFile if its directory exists (node_exporter is set up), with the
/// pool sizes the last `--metrics` counted (counting every pool entry after every run made a
/// run's cost grow with the pool; the cron line of `--metrics` refreshes them every 10
/// minutes; counts older than an hour are counted again); errors are ignored (that cron line
/// reports them).
pub fn refresh_metrics(cfg: &Config, clock: &dyn Clock) {
    let path = cfg.settings.metrics_file.clone();
    if path.parent().is_some_and(|p| p.is_dir()) {
        let _ = write_metrics_with(cfg, clock, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap()
    }

    /// Archive `name` of `job` under `root`, with a report of `keys`.
    fn archive(root: &Path, job: &str, name: &str, keys: &[(&str, &str)]) {
        let dir = root.join(job).join(name);
        fs::create_dir_all(&dir).unwrap();
        let mut r = Report::default();
        for (k, v) in keys {
            r.set(k, v);
        }
        r.write(&dir).unwrap();
    }

    /// At 2026-03-02 12:00: fresh (backed up 2 h ago, 2 GiB in 90 s), stale (28 h ago), intr (a
    /// transfer interrupted after a backup 3 h ago; NRPEtrigger=48), noage (2 days ago,
    /// NRPEtrigger=0), off (disabled, never run), quiet (NRPEtrigger=-1), broken (a bad value);
    /// a chunk pool of 2 files, 15 bytes.
    fn setup() -> (tempfile::TempDir, Config) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("backup");
        let g = [("ExecutionTime", "90"), ("TotalFileSize", "2147483648"), ("TotalBytesReceived", "4096")];
        archive(&root, "fresh", "scheduled.0", &[&[("Date", "202603021000")][..], &g].concat());
        archive(
            &root,
            "fresh",
            "daily.0",
            &[("Date", "202603011000"), ("ExecutionTime", "30"), ("TotalFileSize", "1000")],
        );
        archive(
            &root,
            "stale",
            "scheduled.0",
            &[("Date", "202603010800"), ("ExecutionTime", "30"), ("TotalFileSize", "1073741824")],
        );
        archive(&root, "intr", "scheduled.0", &[("Date", "202603020900")]);
        fs::create_dir_all(root.join("intr").join(archive::RUNNING)).unwrap();
        archive(&root, "noage", "scheduled.0", &[("Date", "202602281200")]);
        fs::create_dir_all(root.join(".affa-pool/ab")).unwrap();
        fs::write(root.join(".affa-pool/ab/c1"), [1u8; 10]).unwrap();
        fs::write(root.join(".affa-pool/ab/c2"), [2u8; 5]).unwrap();
        let text = format!(
            "[GlobalAffaConfig]\nRootDir={}\nlockDir={}/lock\nDiskSpaceWarn=none\n\
             [fresh]\nremoteHostName=a\n[stale]\nremoteHostName=b\n[intr]\nremoteHostName=c\nNRPEtrigger=48\n\
             [noage]\nremoteHostName=d\nNRPEtrigger=0\n[off]\nremoteHostName=e\nstatus=disabled\n\
             [quiet]\nremoteHostName=f\nNRPEtrigger=-1\n[broken]\nremoteHostName=g\ndailyKeep=lots\n",
            root.display(),
            t.path().display()
        );
        let cfg = Config::parse(t.path(), &[(t.path().join("t.conf"), text)]).unwrap();
        assert_eq!(cfg.broken.keys().collect::<Vec<_>>(), ["broken"]);
        (t, cfg)
    }

    fn nrpe_of(cfg: &Config, jobs: &[&str]) -> (String, i32) {
        let jobs: Vec<String> = jobs.iter().map(|j| j.to_string()).collect();
        nrpe(cfg, &jobs, &FixedClock(at("2026-03-02 12:00"))).unwrap()
    }

    /// A section header affa cannot read (the job it was meant to be is unknown): the check of
    /// all jobs is critical, not OK without it.
    #[test]
    fn an_unreadable_section_header_makes_the_check_of_all_jobs_critical() {
        let t = tempfile::tempdir().unwrap();
        let text = format!(
            "[GlobalAffaConfig]\nRootDir={}\nDiskSpaceWarn=none\n[web server]\nremoteHostName=a\nNRPEtrigger=0\n",
            t.path().display()
        );
        let cfg = Config::parse(t.path(), &[(t.path().join("t.conf"), text)]).unwrap();
        let (line, code) = nrpe_of(&cfg, &[]);
        assert!(
            line.starts_with("CRITICAL: Failed jobs: 1 configuration error(s) outside any job (affa --configcheck) |"),
            "{line}"
        );
        assert_eq!(code, 2);
    }

    /// One job whose archives cannot be read (a file in its directory's place): that job is
    /// critical, the others are still checked (not UNKNOWN for all).
    #[test]
    fn a_job_whose_archives_cannot_be_read_is_critical_alone() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("odd"), b"not a directory").unwrap();
        archive(t.path(), "fresh", "scheduled.0", &[("Date", "202603021000")]);
        let text = format!(
            "[GlobalAffaConfig]\nRootDir={}\nDiskSpaceWarn=none\n[odd]\nremoteHostName=a\n[fresh]\nremoteHostName=b\n",
            t.path().display()
        );
        let cfg = Config::parse(t.path(), &[(t.path().join("t.conf"), text)]).unwrap();
        let (line, code) = nrpe_of(&cfg, &[]);
        assert!(line.starts_with("CRITICAL: Failed jobs: odd (cannot read its archives: "), "{line}");
        assert!(line.contains("'fresh_age'=7200s"), "{line}");
        assert_eq!(code, 2);
        let st = crate::commands::status(&cfg, &FixedClock(at("2026-03-02 12:00")), false, true).unwrap();
        assert!(st.contains("cannot read its archives") && st.contains("fresh") && st.contains("job odd: "), "{st}");
        // --list-archives lists the other job and names the unreadable one (it stopped at it).
        for csv in [false, true] {
            let l = crate::commands::list_archives(&cfg, &[], csv).unwrap();
            assert!(l.text.contains("fresh") && l.text.contains("2026"), "{}", l.text);
            assert!(!l.text.contains("odd"), "{}", l.text);
            assert_eq!(l.unreadable.len(), 1);
            assert!(l.unreadable[0].starts_with("job odd: cannot read its archives: "), "{:?}", l.unreadable);
        }
        // --metrics still writes every job's series, the unreadable one as an error.
        let m = metrics_text(&cfg, &FixedClock(at("2026-03-02 12:00"))).unwrap();
        assert!(
            m.contains("affa_job_error{job=\"odd\"} 1\n") && m.contains("affa_job_error{job=\"fresh\"} 0\n"),
            "{m}"
        );
        assert!(m.contains("affa_last_success_timestamp_seconds{job=\"fresh\"}"), "{m}");
        // The status mail is still made, with both jobs in it.
        let body = crate::commands::status_text(&cfg, &FixedClock(at("2026-03-02 12:00"))).unwrap();
        assert!(body.contains("job odd: cannot read its archives: ") && body.contains("fresh"), "{body}");
    }

    #[test]
    fn the_nrpe_line_of_each_job_and_of_all() {
        let (_t, cfg) = setup();
        let one = |age: &str| format!("Execution Time=0.0min;;;; Size=0.000GByte;;;; {age}");
        assert_eq!(
            nrpe_of(&cfg, &["fresh"]),
            (
                "OK: 1 job(s) backed up in time: fresh | Execution Time=1.5min;;;; Size=2.000GByte;;;; 'fresh_age'=7200s;;86400;0;"
                    .into(),
                0
            )
        );
        assert_eq!(
            nrpe_of(&cfg, &["stale"]),
            (
                "CRITICAL: Failed jobs: stale (last success 28.0 h ago) | Execution Time=0.5min;;;; Size=1.000GByte;;;; 'stale_age'=100800s;;86400;0;"
                    .into(),
                2
            )
        );
        assert_eq!(
            nrpe_of(&cfg, &["intr"]),
            (format!("CRITICAL: Failed jobs: intr (interrupted) | {}", one("'intr_age'=10800s;;172800;0;")), 2)
        );
        // NRPEtrigger=0: no age limit (an empty critical threshold in the perfdata).
        assert_eq!(
            nrpe_of(&cfg, &["noage"]),
            (format!("OK: 1 job(s) backed up in time: noage | {}", one("'noage_age'=172800s;;;0;")), 0)
        );
        // Named, a disabled job is checked.
        assert_eq!(
            nrpe_of(&cfg, &["off"]),
            (format!("CRITICAL: Failed jobs: off (no successful run) | {}", one("'off_age'=U")), 2)
        );
        assert_eq!(
            nrpe_of(&cfg, &["broken"]),
            (format!("CRITICAL: Failed jobs: broken (configuration error) | {}", one("'broken_age'=U")), 2)
        );
        assert_eq!(
            nrpe_of(&cfg, &["quiet"]),
            (
                "OK: no job to check (none enabled, or NRPEtrigger < 0) | Jobs failed=0;;;; Jobs total=6;;;; Jobs checked=0;;;; Total Execution Time=0.0min;;;; Total Size=0.000GByte;;;;"
                    .into(),
                0
            )
        );
        let (line, code) = nrpe_of(&cfg, &["nosuch"]);
        assert!(line.starts_with("UNKNOWN: no job named 'nosuch'"), "{line}");
        assert_eq!(code, 3);
        // Every enabled job with NRPEtrigger >= 0, in name order; Affa 3's totals first.
        assert_eq!(
            nrpe_of(&cfg, &[]),
            (
                "CRITICAL: Failed jobs: broken (configuration error), intr (interrupted), stale (last success 28.0 h ago) | \
                 Jobs failed=3;;;; Jobs total=6;;;; Jobs checked=5;;;; Total Execution Time=2.0min;;;; Total Size=3.000GByte;;;; \
                 'broken_age'=U 'fresh_age'=7200s;;86400;0; 'intr_age'=10800s;;172800;0; 'noage_age'=172800s;;;0; 'stale_age'=100800s;;86400;0;"
                    .into(),
                2
            )
        );
        assert_eq!(
            nrpe_jobs(&cfg).iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["broken", "fresh", "intr", "noage", "stale"]
        );
    }

    #[test]
    fn too_little_free_space_for_the_next_backup_is_a_warning() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("backup");
        // A last backup of 10^18 bytes: no file system here has that much free.
        archive(&root, "big", "scheduled.0", &[("Date", "202603021100"), ("TotalFileSize", "1000000000000000000")]);
        let text = format!(
            "[GlobalAffaConfig]\nRootDir={}\nlockDir={}/lock\n[big]\nremoteHostName=a\n",
            root.display(),
            t.path().display()
        );
        let cfg = Config::parse(t.path(), &[(t.path().join("t.conf"), text)]).unwrap();
        let (line, code) = nrpe_of(&cfg, &["big"]);
        assert_eq!(code, 1, "{line}");
        assert!(line.starts_with("WARNING: big (disk space low: "), "{line}");
        assert!(
            line.ends_with(" MiB free, last backup 953674316406 MiB) | Execution Time=0.0min;;;; Size=931322574.615GByte;;;; 'big_age'=3600s;;86400;0;"),
            "{line}"
        );
    }

    #[test]
    /// The refresh after a run does not count the pool again (its cost would grow with the
    /// pool): it takes what the last `--metrics` counted; `--metrics` counts again.
    fn the_refresh_after_a_run_reuses_the_pool_counts_of_the_last_metrics() {
        let (t, cfg) = setup();
        let clock = FixedClock(at("2026-03-02 12:00"));
        let root = t.path().join("backup");
        let sample = |text: &str, name: &str| -> String {
            let l = text.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("{text}"));
            l.rsplit(' ').next().unwrap().to_string()
        };
        assert_eq!(sample(&metrics_text(&cfg, &clock).unwrap(), "affa_pool_files"), "2");
        fs::write(root.join(".affa-pool/ab/c3"), [3u8; 100]).unwrap();
        let refreshed = metrics_text_with(&cfg, &clock, false).unwrap();
        assert_eq!(
            (sample(&refreshed, "affa_pool_files"), sample(&refreshed, "affa_pool_size_bytes")),
            ("2".into(), "15".into())
        );
        let counted = metrics_text(&cfg, &clock).unwrap();
        assert_eq!(
            (sample(&counted, "affa_pool_files"), sample(&counted, "affa_pool_size_bytes")),
            ("3".into(), "115".into())
        );
        // Without remembered counts (a first refresh), the pool is counted once.
        fs::remove_file(pool_cache(&cfg)).unwrap();
        fs::write(root.join(".affa-pool/ab/c4"), [4u8; 1000]).unwrap();
        assert_eq!(sample(&metrics_text_with(&cfg, &clock, false).unwrap(), "affa_pool_files"), "4");
        assert!(pool_cache(&cfg).is_file());
        // Counts older than an hour (no `--metrics` cron line) are counted again.
        fs::write(root.join(".affa-pool/ab/c5"), [5u8; 1]).unwrap();
        assert_eq!(sample(&metrics_text_with(&cfg, &clock, false).unwrap(), "affa_pool_files"), "4");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
        fs::File::options().write(true).open(pool_cache(&cfg)).unwrap().set_modified(old).unwrap();
        assert_eq!(sample(&metrics_text_with(&cfg, &clock, false).unwrap(), "affa_pool_files"), "5");
    }

    #[test]
    fn the_metrics_text_of_every_job() {
        let (t, cfg) = setup();
        let text = metrics_text(&cfg, &FixedClock(at("2026-03-02 12:00"))).unwrap();
        let root = t.path().join("backup");
        // The file system figures of RootDir vary: present, in bytes; the rest is exact.
        let fs_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("affa_rootdir_")).collect();
        assert_eq!(fs_lines.len(), 2, "{text}");
        for (l, name) in fs_lines.iter().zip(["affa_rootdir_avail_bytes", "affa_rootdir_used_bytes"]) {
            let v =
                l.strip_prefix(&format!("{name}{{root_dir=\"{}\"}} ", root.display())).unwrap_or_else(|| panic!("{l}"));
            assert!(v.parse::<u64>().is_ok_and(|v| v % 1024 == 0), "{l}");
        }
        let ts = |s: &str| chrono::Local.from_local_datetime(&at(s)).unwrap().timestamp();
        let jobs = ["fresh", "intr", "noage", "off", "quiet", "stale"];
        let per_job = |f: &dyn Fn(&str) -> &'static str| -> String {
            jobs.iter().map(|j| format!("{{job=\"{j}\"}} {}\n", f(j))).collect::<String>()
        };
        let family = |name: &str, help: &str, samples: String| -> String {
            let lines: String = samples.lines().map(|s| format!("{name}{s}\n")).collect();
            format!("# HELP {name} {help}\n# TYPE {name} gauge\n{lines}")
        };
        let mut archives = String::new();
        for j in jobs {
            for l in Level::ALL {
                let n = match (j, l) {
                    ("fresh", Level::Scheduled | Level::Daily) | ("intr" | "noage" | "stale", Level::Scheduled) => 1,
                    _ => 0,
                };
                archives.push_str(&format!("{{job=\"{j}\",level=\"{}\"}} {n}\n", l.name()));
            }
        }
        let want = [
            family("affa_job_enabled", "1 if the job runs from cron", per_job(&|j| if j == "off" { "0" } else { "1" })),
            family(
                "affa_last_success_timestamp_seconds",
                "Unix time of the newest valid archive (the last successful run)",
                format!(
                    "{{job=\"fresh\"}} {}\n{{job=\"intr\"}} {}\n{{job=\"noage\"}} {}\n{{job=\"stale\"}} {}\n",
                    ts("2026-03-02 10:00"),
                    ts("2026-03-02 09:00"),
                    ts("2026-02-28 12:00"),
                    ts("2026-03-01 08:00")
                ),
            ),
            family("affa_last_duration_seconds", "ExecutionTime of the last successful run", "{job=\"fresh\"} 90\n{job=\"stale\"} 30\n".into()),
            family("affa_last_bytes_received", "TotalBytesReceived of the last successful run", "{job=\"fresh\"} 4096\n".into()),
            family(
                "affa_last_total_file_size_bytes",
                "TotalFileSize of the last successful run",
                "{job=\"fresh\"} 2147483648\n{job=\"stale\"} 1073741824\n".into(),
            ),
            family("affa_archives", "Number of archives per level", archives),
            family("affa_running", "1 while the job runs", per_job(&|_| "0")),
            family(
                "affa_interrupted",
                "1 if the job's last transfer was interrupted and not resumed yet",
                per_job(&|j| if j == "intr" { "1" } else { "0" }),
            ),
            // The job with configuration errors too (its series vanishing would resolve an alert).
            family(
                "affa_job_error",
                "1 if the job's configuration has errors or its archives cannot be read (it does not run, or cannot be checked)",
                format!("{{job=\"broken\"}} 1\n{}", per_job(&|_| "0")),
            ),
            family("affa_pool_size_bytes", "Bytes in the chunk pool RootDir/.affa-pool", format!("{{root_dir=\"{}\"}} 15\n", root.display())),
            family("affa_pool_files", "Files in the chunk pool RootDir/.affa-pool", format!("{{root_dir=\"{}\"}} 2\n", root.display())),
            "# HELP affa_rootdir_avail_bytes Free bytes on the file system of RootDir\n# TYPE affa_rootdir_avail_bytes gauge\n".into(),
            "# HELP affa_rootdir_used_bytes Used bytes on the file system of RootDir\n# TYPE affa_rootdir_used_bytes gauge\n".into(),
            format!(
                "# HELP affa_metrics_generated_timestamp_seconds Unix time this file was written\n\
                 # TYPE affa_metrics_generated_timestamp_seconds gauge\naffa_metrics_generated_timestamp_seconds {}\n",
                ts("2026-03-02 12:00")
            ),
        ]
        .concat();
        let without_fs: String =
            text.lines().filter(|l| !l.starts_with("affa_rootdir_")).map(|l| format!("{l}\n")).collect();
        assert_eq!(without_fs, want);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label("/srv/affa"), "/srv/affa");
    }
}
