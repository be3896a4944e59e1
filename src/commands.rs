//! The actions behind the command-line options other than `--run`: lists, status, key
//! management, and the job-level maintenance commands.
//!
//! Owns: what each action prints and changes. Must never: delete or move archives without the
//! user typing `proceed` (or `--yes`), or act on a job while it is running.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::archive::{self, Keeps, Level};
use crate::clock::Clock;
use crate::config::{edit, Config, Job};
use crate::error::{IoContext, Result};
use crate::lock;
use crate::notify;
use crate::observer::{confirm, Watch};
use crate::report::Report;
use crate::transport::{self, rsync, SshTarget};

fn keeps(job: &Job) -> Keeps {
    Keeps(Level::ALL.map(|l| job.keep(l)))
}

pub use affa_core::fmt::{hms, human, show_date};

/// `--list-archives --csv`: Affa 3's 16 columns in its order and format (the level, the index
/// as 5 digits, the report's values as written, `valid` yes/no, an incomplete archive's values
/// 0, Affa 3's freedup columns), then affa's own: an ESXi archive's disks (how each was read,
/// the bytes read on the host, the bytes sent; one space-separated value per disk, disk 0
/// first). Affa 3's header line named 15 columns (`Archive:Count`, no `TotalBytesSent`); this
/// one names each column.
pub const ARCHIVES_CSV_HEADER: &str = "Archive;Count;Date;Files;Size;RootDirFilesystemAvail;RootDirFilesystemUsed;valid;TotalBytesSent;TotalBytesReceived;ExecutionTime;DedupTotalFiles;DedupReplacedFiles;DedupSavedBytes;DedupExectime;DedupDate;Job;LogicalSize;PoolBytesAdded;DedupRatio;DiskRead;DiskHostBytesRead;DiskBytesSent";

/// A report value as a CSV field: as written, `;` and line ends replaced.
fn field(r: &Report, key: &str) -> String {
    r.get(key).unwrap_or("").replace([';', '\n', '\r'], " ")
}

/// Affa 3's freedup columns: DedupTotalFiles, DedupReplacedFiles, DedupSavedBytes,
/// DedupExectime, DedupDate (the run's Date when not given); empty without DedupExectime.
fn freedup_fields(r: &Report) -> [String; 5] {
    if r.get("DedupExectime").is_none() {
        return Default::default();
    }
    let date = if r.get("DedupDate").is_some() { field(r, "DedupDate") } else { field(r, "Date") };
    [
        field(r, "DedupTotalFiles"),
        field(r, "DedupReplacedFiles"),
        field(r, "DedupSavedBytes"),
        field(r, "DedupExectime"),
        date,
    ]
}

/// What `--list-archives` found: the listing, and one line per job whose archives could not be
/// read (those jobs are left out of the listing; the others are listed all the same).
pub struct ArchiveListing {
    pub text: String,
    pub unreadable: Vec<String>,
}

/// `--list-archives [--csv] [JOB...]`
pub fn list_archives(cfg: &Config, names: &[String], csv: bool) -> Result<ArchiveListing> {
    let mut out = String::new();
    let mut unreadable = Vec::new();
    if csv {
        out.push_str(ARCHIVES_CSV_HEADER);
        out.push('\n');
    }
    let sel = cfg.select(names);
    for (name, _, e) in &sel.errors {
        unreadable.push(format!("job {name}: {e}"));
    }
    // The disks of jobs on an AutomountDevice, mounted for the listing (held to its end: the
    // jobs sharing a disk mount it once).
    let mut disks = Vec::new();
    for job in sel.jobs {
        match crate::automount::mount_for_command(job, &cfg.lock_dir()) {
            Ok(d) => disks.push(d),
            Err(e) => {
                unreadable.push(format!("job {}: {e}", job.name));
                continue;
            }
        }
        // One job whose archives cannot be read (EIO, a file in its directory's place) does not
        // hide the others' archives.
        let all = match archive::list(&job.job_dir()) {
            Ok(a) => a,
            Err(e) => {
                unreadable.push(format!("job {}: cannot read its archives: {e}", job.name));
                continue;
            }
        };
        if csv {
            for a in all.iter().rev() {
                out.push_str(&archive_csv_row(job, a));
            }
            continue;
        }
        out.push_str(&if out.is_empty() {
            format!("affa {} on {}\n", env!("CARGO_PKG_VERSION"), crate::notify::hostname())
        } else {
            "\n".into()
        });
        out.push_str(&archives_text(job, &all, keeps(job)));
    }
    Ok(ArchiveListing { text: out, unreadable })
}

/// One row of `--list-archives --csv` (see [`ARCHIVES_CSV_HEADER`]).
fn archive_csv_row(job: &Job, a: &archive::Archive) -> String {
    let r = a.report.clone().unwrap_or_default();
    let mut f: Vec<String> = vec![a.level.name().into(), format!("{:05}", a.index)];
    let affa3 = ["Date", "NumberOfFiles", "TotalFileSize", "RootDirFilesystemAvail", "RootDirFilesystemUsed"];
    let sent = ["TotalBytesSent", "TotalBytesReceived", "ExecutionTime"];
    if a.valid() {
        f.extend(affa3.iter().map(|k| field(&r, k)));
        f.push("yes".into());
        f.extend(sent.iter().map(|k| field(&r, k)));
        f.extend(freedup_fields(&r));
    } else {
        f.extend(["0"; 5].map(String::from));
        f.push("no".into());
        f.extend(["0"; 3].map(String::from));
        f.extend(["", "", "", "", ""].map(String::from));
    }
    f.push(job.name.clone());
    f.push(r.num("ChunkLogicalSize").unwrap_or(0).to_string());
    f.push(r.num("ChunkPoolBytesAdded").unwrap_or(0).to_string());
    f.push(field(&r, "DedupRatio"));
    f.extend(if a.valid() { disk_read_fields(&r) } else { Default::default() });
    f.join(";") + "\n"
}

/// The DiskRead, DiskHostBytesRead and DiskBytesSent columns: each disk's `ESXiDiskReadN`
/// (`MODE READ SENT[ (reason)]`) split into its three words, one space-separated value per disk
/// (`-` for a number not known); empty for an archive without ESXi disks.
fn disk_read_fields(r: &Report) -> [String; 3] {
    let mut cols: [Vec<String>; 3] = Default::default();
    for i in 0.. {
        let Some(v) = r.get(&format!("ESXiDiskRead{i}")) else { break };
        let head = v.split_once(" (").map_or(v, |(h, _)| h);
        let mut w = head.split(' ');
        for c in cols.iter_mut() {
            let x = w.next().filter(|x| !x.is_empty() && !x.contains([';', '\n', '\r'])).unwrap_or("-");
            c.push(x.to_string());
        }
    }
    cols.map(|c| c.join(" "))
}

/// Affa 3's `sizeUnit`: 1.2M, 312k, 12G, "  5" (bytes).
pub fn size_unit(bytes: u64) -> String {
    let b = bytes as f64;
    let (v, unit) = [(4, "T"), (3, "G"), (2, "M"), (1, "k")]
        .iter()
        .find(|(p, _)| b > 1024f64.powi(*p))
        .map(|(p, u)| (b / 1024f64.powi(*p), *u))
        .unwrap_or((b, ""));
    let short = format!("{v:.1}");
    if !unit.is_empty() && short.len() <= 3 {
        format!("{short}{unit}")
    } else {
        format!("{v:3.0}{unit}")
    }
}

/// Affa 3's `countUnit`: 9999, 12k, 10M.
pub fn count_unit(n: u64) -> String {
    for (lim, div, unit) in [(9999e9, 1e12, "T"), (9999e6, 1e9, "G"), (9999e3, 1e6, "M"), (9999e0, 1e3, "k")] {
        if n as f64 > lim {
            return format!("{}{unit}", ((n as f64 + 0.5 * div) / div) as u64);
        }
    }
    n.to_string()
}

/// Affa 3's `timeUnit`: ` 0m00s`, ` 1h05m`, `2d03h`.
pub fn time_unit(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h:2}h{m:02}m")
    } else {
        format!("{m:2}m{s:02}s")
    }
}

/// `--list-archives JOB` as Affa 3 draws it: a box with the job, description, directory,
/// host, USB disk and mail recipients, then one row per archive (level groups between rules,
/// `*` for an index beyond the Keep value): completion date with weekday, run time, freedup's
/// time and yield, files, size, sent, received; chunked jobs get affa's Logical, Added and
/// Dedup columns at the end.
fn archives_text(job: &Job, all: &[archive::Archive], k: Keeps) -> String {
    let chunked = all.iter().any(|a| a.report.as_ref().is_some_and(|r| r.get("ChunkLogicalSize").is_some()));
    let width = if chunked { 114 + 28 } else { 114 };
    let rule = format!("+{}+\n", "-".repeat(width - 2));
    let line = |t: String| format!("| {t:<w$} |\n", w = width - 4);
    let mut out = rule.clone();
    out.push_str(&line(format!("Job: {}", job.name)));
    if !job.description.is_empty() {
        out.push_str(&line(format!("Description: {}", job.description)));
    }
    out.push_str(&line(format!("Directory: {}/", job.job_dir().display())));
    let vm = job.esxi.as_ref().map(|e| format!(" (ESXi VM {})", e.vm_name)).unwrap_or_default();
    out.push_str(&line(format!("Hostname: {}{vm}", job.host)));
    if let Some(a) = &job.automount {
        out.push_str(&line(format!("AutomountDevice: {}", a.device)));
        out.push_str(&line(format!("AutomountPoint: {}", a.point.display())));
        // Shown as written (a view of the configuration, like --show-property).
        out.push_str(&line(format!("AutoUnmount: {}", job.get("AutoUnmount"))));
    }
    for (i, e) in job.mail.to.iter().enumerate() {
        out.push_str(&line(format!("{:>6} {}", if i == 0 { "Email:" } else { "" }, e.trim())));
    }
    if all.is_empty() {
        out.push_str(&rule);
        return out;
    }
    if all.iter().any(|a| a.index >= k.of(a.level)) {
        out.push_str(&line("Archives with an index greater than the Keep value are tagged with '*'".into()));
    }
    let extra =
        |l: &str, a: &str, d: &str| if chunked { format!(" {l:>7} | {a:>7} | {d:>6} |") } else { String::new() };
    out.push_str(&rule);
    out.push_str(&format!(
        "| {:<5} | {:<41} | {:>9} | {:>6} | {:>5} | {:>5} | {:>5} | {:>5} | {:>5} |{}\n",
        "Run",
        "Completion date",
        "buTime",
        "ddTime",
        "ddYld",
        "Files",
        "Size",
        "Sent",
        "Recvd",
        extra("Logical", "Added", "Dedup")
    ));
    let mut last = None;
    for a in all.iter().rev() {
        if last != Some(a.level) {
            out.push_str(&rule);
            last = Some(a.level);
        }
        let r = a.report.clone().unwrap_or_default();
        let valid = a.valid();
        let num = |key: &str| if valid { r.num(key) } else { None };
        let dash = || "-".to_string();
        let idx = format!("{}{}{:2}", if a.index >= k.of(a.level) { "*" } else { " " }, a.level.letter(), a.index);
        let date = r
            .date()
            .filter(|_| valid)
            .and_then(|d| chrono::NaiveDateTime::parse_from_str(d, "%Y%m%d%H%M").ok())
            .map(|t| t.format("%a %Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "Incomplete!".into());
        let (dd_time, dd_yield) = match (num("DedupExectime"), num("DedupSavedBytes")) {
            (Some(t), Some(b)) => (time_unit(t), size_unit(b)),
            _ => (dash(), dash()),
        };
        let human_or_dash = |key: &str| num(key).map(human).unwrap_or_else(dash);
        out.push_str(&format!(
            "|{:<5} | {:<42} | {:>9} | {:>6} | {:>5} | {:>5} | {:>5} | {:>5} | {:>5} |{}\n",
            idx,
            date,
            num("ExecutionTime").map(time_unit).unwrap_or_else(dash),
            dd_time,
            dd_yield,
            num("NumberOfFiles").filter(|n| *n > 0).map(count_unit).unwrap_or_else(dash),
            num("TotalFileSize").filter(|n| *n > 0).map(size_unit).unwrap_or_else(dash),
            num("TotalBytesSent").map(size_unit).unwrap_or_else(dash),
            num("TotalBytesReceived").map(size_unit).unwrap_or_else(dash),
            extra(
                &human_or_dash("ChunkLogicalSize"),
                &human_or_dash("ChunkPoolBytesAdded"),
                if valid { r.get("DedupRatio").unwrap_or("-") } else { "-" }
            )
        ));
        // An ESXi archive: how each disk was read (CBT, full pass, rsync), per the report.
        for i in 0.. {
            let Some(v) = r.get(&format!("ESXiDiskRead{i}")).filter(|_| valid) else { break };
            out.push_str(&line(format!("      disk {i}: {}", disk_read_text(v))));
        }
    }
    out.push_str(&rule);
    out
}

/// `ESXiDiskReadN` (`MODE READ SENT[ (reason)]`) in words: `cbt, 1.0 MiB read on the host, 300
/// KiB sent`.
fn disk_read_text(v: &str) -> String {
    let (head, reason) = match v.split_once(" (") {
        // One closing parenthesis: the reason may end with its own.
        Some((h, r)) => (h, Some(r.strip_suffix(')').unwrap_or(r))),
        None => (v, None),
    };
    let mut w = head.split(' ');
    let mode = w.next().unwrap_or("-");
    let bytes = |x: Option<&str>| x.and_then(|n| n.parse::<u64>().ok()).map(human).unwrap_or_else(|| "-".into());
    let (read, sent) = (bytes(w.next()), bytes(w.next()));
    let mut t =
        if mode == "rsync" { "rsync".to_string() } else { format!("{mode}, {read} read on the host, {sent} sent") };
    if let Some(r) = reason {
        t.push_str(&format!(" ({r})"));
    }
    t
}

/// Affa 3's process state of a job that is not cleanly idle: `running rsync` (it holds its lock
/// and one of its processes is an rsync), `waiting` (it holds its lock otherwise), `rsync
/// interrupted` (a transfer was cut short), `configuration error` (it cannot run).
pub fn process_state(cfg: &Config, job: &Job) -> Option<String> {
    if cfg.broken.contains_key(&job.name) {
        return Some("configuration error".into());
    }
    if let Some(pid) = lock::holder(&cfg.lock_dir(), &job.name) {
        return Some(if runs_rsync(pid) { "running rsync" } else { "waiting" }.into());
    }
    if let Some(h) = elsewhere(job) {
        return Some(h);
    }
    if job.job_dir().join(archive::RUNNING).exists() {
        return Some("rsync interrupted".into());
    }
    None
}

/// With `sharedRootDir=yes`, a run of the job by another server (or another affa with its own
/// lockDir) holds the cluster-wide lock and not this server's: "running on HOST (pid N)", where
/// HOST and N are what that server wrote (shown, never acted on).
fn elsewhere(job: &Job) -> Option<String> {
    if !job.shared_root_dir {
        return None;
    }
    let h = crate::shared_lock::holder(&job.root_dir(), &job.name)?;
    Some(match h.pid {
        Some(p) => format!("running on {} (pid {p})", h.host),
        None => format!("running on {}", h.host),
    })
}

/// Does a process below `pid` run rsync (read from /proc)?
fn runs_rsync(pid: i32) -> bool {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        // stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(pp) = ppid {
            children.entry(pp).or_default().push(p);
        }
    }
    let mut stack = children.get(&pid).cloned().unwrap_or_default();
    while let Some(p) = stack.pop() {
        let argv0 = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let argv0 = argv0.split(|b| *b == 0).next().unwrap_or_default();
        if argv0.rsplit(|b| *b == b'/').next().is_some_and(|n| n.starts_with(b"rsync")) {
            return true;
        }
        stack.extend(children.get(&p).cloned().unwrap_or_default());
    }
    false
}

/// The next `TimeSchedule` after now, as HH:MM.
fn next_run(job: &Job, clock: &dyn Clock) -> String {
    use chrono::Timelike;
    let now = clock.now();
    let now = (now.hour(), now.minute());
    let mut times = job.schedule.clone();
    times.sort();
    let next = times.iter().find(|t| **t > now).or(times.first());
    next.map(|(h, m)| format!("{h:02}:{m:02}")).unwrap_or_else(|| "-".into())
}

/// `--status --csv`: Affa 3's 16 columns in its order and format (rows in reverse job order,
/// `Last` 19700101000000 when never run, lockpid 0 when not running, sizes from the last
/// report), then affa's own (`ConfigError`: the first configuration error of the job).
pub const STATUS_CSV_HEADER: &str = "Job;Enabled;Last;Next;Size;RootDirFilesystemAvail;RootDirFilesystemUsed;NumberOfArchives;lockpid;ProcessState;BackupTime;DedupTotalFiles;DedupReplacedFiles;DedupSavedBytes;DedupExectime;DedupDate;ConfigError";

/// `--status [--csv] [--all]`
pub fn status(cfg: &Config, clock: &dyn Clock, csv: bool, all: bool) -> Result<String> {
    let now = clock.now();
    let mut out = String::new();
    if csv {
        out.push_str(STATUS_CSV_HEADER);
        out.push('\n');
    } else {
        out.push_str(&format!(
            "{:<20} {:>3} {:>5} {:>8} {:>5} {:>8} {:>14}\n",
            "Job", "ENA", "Last", "Time", "Next", "Size", "N of S,D,W,M,Y"
        ));
    }
    let mut jobs = cfg.all_jobs();
    if csv {
        jobs.reverse();
    }
    let mut disabled = 0;
    let mut unreadable_jobs = Vec::new();
    for job in jobs {
        let enabled = crate::cron::effective_enabled(cfg, job);
        let r = Report::read(&job.job_dir().join("scheduled.0"));
        // One job whose archives cannot be read (EIO, a file in its directory's place) is
        // shown as such; the other jobs are listed all the same.
        let (arch, unreadable) = match archive::list(&job.job_dir()) {
            Ok(a) => (a, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let count = |l: Level| arch.iter().filter(|a| a.level == l).count();
        let nof = Level::ALL.map(|l| format!("{:>2}", count(l))).join(",");
        let state =
            if unreadable.is_some() { Some("cannot read its archives".to_string()) } else { process_state(cfg, job) };
        if let Some(e) = &unreadable {
            unreadable_jobs.push(format!("job {}: {e}", job.name));
        }
        let pid = lock::holder(&cfg.lock_dir(), &job.name);
        let last_date = r.as_ref().and_then(|r| r.date().map(String::from));
        if csv {
            let rv = |k: &str| r.as_ref().and_then(|r| r.num(k)).unwrap_or(0).to_string();
            let mut f = vec![
                job.name.clone(),
                if enabled { "yes" } else { "no" }.to_string(),
                last_date.clone().unwrap_or_else(|| "19700101000000".into()),
                next_run(job, clock),
                rv("TotalFileSize"),
                rv("RootDirFilesystemAvail"),
                rv("RootDirFilesystemUsed"),
                nof,
                pid.unwrap_or(0).to_string(),
                state.clone().unwrap_or_default().replace([';', '\n', '\r'], " "),
                r.as_ref().map(|r| field(r, "ExecutionTime")).unwrap_or_default(),
            ];
            f.extend(r.as_ref().map(freedup_fields).unwrap_or_default());
            let err = cfg.broken.get(&job.name).map(|b| b.error().to_string()).or(unreadable).unwrap_or_default();
            f.push(err.replace(';', ","));
            out.push_str(&f.join(";"));
            out.push('\n');
            continue;
        }
        if !enabled && state.is_none() && !all {
            disabled += 1;
            continue;
        }
        let last = match &last_date {
            None => "never".to_string(),
            Some(d) => {
                let t = chrono::NaiveDateTime::parse_from_str(d, "%Y%m%d%H%M").ok();
                match t {
                    Some(t) if (now - t).num_hours() < 24 => t.format("%H:%M").to_string(),
                    _ if enabled => "ERROR".into(),
                    _ => "-".into(),
                }
            }
        };
        let mid = match &state {
            Some(s) => {
                let s = match pid {
                    Some(p) => format!("{s} (pid {p})"),
                    None => s.clone(),
                };
                format!("{s:<29}")
            }
            None => format!(
                "{:>5} {:>8} {:>5} {:>8}",
                last,
                r.as_ref().and_then(|r| r.num("ExecutionTime")).map(hms).unwrap_or_else(|| "-".into()),
                if enabled { next_run(job, clock) } else { "-".into() },
                r.as_ref().and_then(|r| r.num("TotalFileSize")).map(human).unwrap_or_else(|| "-".into())
            ),
        };
        out.push_str(&format!("{:<20} {:>3} {} {:>14}\n", job.name, if enabled { "yes" } else { "no" }, mid, nof));
    }
    if disabled > 0 {
        out.push_str(&format!("{disabled} disabled job(s) not listed; use --all to show them.\n"));
    }
    if !csv {
        for l in unreadable_jobs {
            out.push_str(&l);
            out.push('\n');
        }
    }
    Ok(out)
}

/// `--disk-usage [--csv]`
pub fn disk_usage(cfg: &Config, csv: bool) -> Result<String> {
    // Every job's, a broken one's too (its RootDir as read: the archives are there).
    let mut roots: Vec<String> = cfg.all_jobs().iter().map(|j| j.root_dir.display().to_string()).collect();
    roots.sort();
    roots.dedup();
    let mut out = String::new();
    if csv {
        out.push_str("RootDir;RootDirFilesystemAvail;RootDirFilesystemUsed\n");
    } else {
        out.push_str(&format!("{:>4} {:>8} {:>8}  {}\n", "Use%", "Used", "Avail", "Root Dir"));
    }
    for r in roots {
        // A RootDir on a disk mounted for the runs: mounted for the moment (as Affa 3).
        let auto =
            cfg.jobs.values().find(|j| j.automount.as_ref().is_some_and(|a| Path::new(&r).starts_with(&a.point)));
        let df = match auto.and_then(|j| j.automount.as_ref().map(|a| (j, a))) {
            Some((j, a)) => crate::automount::with_mounted(j, &cfg.lock_dir(), || {
                crate::automount::is_mounted(&a.device, &a.point).then(|| rsync::df(Path::new(&r))).flatten()
            }),
            None => rsync::df(Path::new(&r)),
        };
        if csv {
            match df {
                Some((u, a)) => out.push_str(&format!("\"{r}\";{a};{u}\n")),
                None => out.push_str(&format!("\"{r}\";-;-\n")),
            }
        } else {
            match df {
                Some((u, a)) => out.push_str(&format!(
                    "{:>3}% {:>8} {:>8}  {r}\n",
                    u * 100 / (u + a).max(1),
                    human(u * 1024),
                    human(a * 1024)
                )),
                None => out.push_str(&format!("{:>4} {:>8} {:>8}  {r} (not available)\n", "-", "-", "-")),
            }
        }
    }
    Ok(out)
}

/// `--send-key [JOB...]`
/// `--send-key [JOB...]`: without names, every enabled job (a disabled one, such as the
/// installed samples, is named and skipped). One host that cannot be reached does not keep the
/// others from their key: every job is tried, and the command fails at the end naming those
/// that failed.
pub fn send_keys(cfg: &Config, names: &[String], out: &mut dyn Write, yes: bool, watch: &Watch) -> Result<()> {
    let mut failed = Vec::new();
    let sel = cfg.select(names);
    for (name, partial, e) in sel.errors {
        // Without names, a broken job that is disabled anyway, or that needs no key (a local
        // or rsyncd source), is skipped like the others.
        if names.is_empty() && partial.is_some_and(|j| !j.enabled() || j.local || j.rsyncd.is_some()) {
            continue;
        }
        failed.push((name, e));
    }
    for job in sel.jobs {
        if job.local {
            continue;
        }
        if names.is_empty() && !job.enabled() {
            let _ = writeln!(
                out,
                "job {}: disabled (status=disabled), skipped; affa --send-key {} sends its key",
                job.name, job.name
            );
            continue;
        }
        if job.rsyncd.is_some() {
            let _ = writeln!(out, "job {}: rsyncdMode=yes, no ssh key needed", job.name);
            continue;
        }
        if let Err(e) = send_key_of(cfg, job, out, yes, watch) {
            failed.push((job.name.clone(), e));
        }
    }
    match failed.len() {
        0 => Ok(()),
        // One job: its own error, as it is (a changed host key says so).
        1 if names.len() == 1 => Err(failed.pop().unwrap().1),
        n => bail!(
            "--send-key failed for {n} job(s): {}",
            failed.iter().map(|(j, e)| format!("job {j}: {e}")).collect::<Vec<_>>().join("; ")
        ),
    }
}

fn send_key_of(cfg: &Config, job: &Job, out: &mut dyn Write, yes: bool, watch: &Watch) -> Result<()> {
    let t = SshTarget::from_job(job, cfg);
    transport::send_key(&t, &cfg.ssh_dir(), &job.ssh.authorized_keys)?;
    let _ = writeln!(
        out,
        "job {}: key installed in {} on {}; host key recorded in {}",
        job.name,
        job.ssh.authorized_keys,
        t.destination(),
        t.known_hosts.display()
    );
    if job.esxi() {
        crate::backup::vm::pin_thumbprint(job, out, yes, watch)?;
    }
    if uses_agent(job) {
        // The agent after the key; a host where it cannot run still gets its key. An ESXi
        // job's fingerprint was just pinned: the agent's place needs the API, so re-read.
        let fresh = if job.esxi() { Config::load(&cfg.dir).ok() } else { None };
        let (cfg, job) = match fresh.as_ref().and_then(|c| c.job(&job.name).ok().map(|j| (c, j))) {
            Some(cj) => cj,
            None => (cfg, job),
        };
        match install_agent(cfg, job) {
            Ok((line, false)) => {
                let _ = writeln!(out, "warning: {line}");
            }
            Ok((line, true)) => {
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                let _ = writeln!(out, "warning: job {}: affa-agent not installed: {e}", job.name);
            }
        }
    }
    if job.esxi() {
        // Whether Changed Block Tracking is available (the fingerprint is pinned by now).
        let fresh = Config::load(&cfg.dir).ok();
        let job = fresh.as_ref().and_then(|c| c.job(&job.name).ok()).unwrap_or(job);
        let _ = writeln!(out, "job {}: {}", job.name, crate::backup::vm::cbt_availability(job));
    }
    Ok(())
}

/// The jobs `--install-agent` without names handles: every job with chunkFiles over ssh whose
/// chunkTransport is not rsync.
fn uses_agent(job: &Job) -> bool {
    !job.local
        && job.rsyncd.is_none()
        && !job.chunk.files.is_empty()
        && job.chunk.transport != crate::config::typed::ChunkTransport::Rsync
}

/// Install (or check) the agent of one job: one line, and whether the agent can run there.
fn install_agent(cfg: &Config, job: &Job) -> Result<(String, bool)> {
    let t = SshTarget::from_job(job, cfg);
    let ds = if job.esxi() && job.chunk.remote_agent_path.is_none() {
        crate::backup::vm::vmx_datastore_dir(job)?
    } else {
        None
    };
    let path = transport::agent::remote_path(job, ds.as_deref());
    let local = transport::agent::local_binary(cfg);
    Ok(match transport::agent::install(&t, &path, &local)? {
        Ok(transport::agent::Installed::Installed) => {
            (format!("job {}: affa-agent installed at {}:{path}", job.name, t.host), true)
        }
        Ok(transport::agent::Installed::UpToDate) => {
            (format!("job {}: affa-agent at {}:{path} is up to date", job.name, t.host), true)
        }
        Err(u) => (format!("job {}: affa-agent unavailable: {u}", job.name), false),
    })
}

/// `--install-agent [JOB...]`: one line per job; Err when any job failed or its agent cannot
/// run.
pub fn install_agents(cfg: &Config, names: &[String], out: &mut dyn Write) -> Result<()> {
    let sel = cfg.select(names);
    let mut failed = Vec::new();
    for (name, partial, e) in &sel.errors {
        if names.is_empty() && !partial.is_some_and(uses_agent) {
            continue;
        }
        let _ = writeln!(out, "job {name}: {e}");
        failed.push(name.clone());
    }
    let jobs: Vec<&Job> = sel.jobs.into_iter().filter(|j| !names.is_empty() || uses_agent(j)).collect();
    for job in jobs {
        if job.local || job.rsyncd.is_some() {
            let _ = writeln!(out, "job {}: not an ssh source, no agent", job.name);
            continue;
        }
        match install_agent(cfg, job) {
            Ok((line, usable)) => {
                if !usable {
                    failed.push(job.name.clone());
                }
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                let _ = writeln!(out, "job {}: {e}", job.name);
                failed.push(job.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!(Remote, "the agent is not usable for job(s) {}", failed.join(", "));
    }
    Ok(())
}

/// `--revoke-key JOB`
pub fn revoke_key(cfg: &Config, name: &str) -> Result<String> {
    let job = cfg.job(name)?;
    if job.rsyncd.is_some() {
        return Ok(format!("job {name}: rsyncdMode=yes, no ssh key to remove"));
    }
    let t = SshTarget::from_job(job, cfg);
    transport::revoke_key(&t, &cfg.ssh_dir(), &job.ssh.authorized_keys)?;
    Ok(format!("job {}: affa's key removed from {} on {}", job.name, job.ssh.authorized_keys, t.destination()))
}

/// `--check-connections [JOB...]`: one line per job; Err if any failed.
pub fn check_connections(cfg: &Config, names: &[String], out: &mut dyn Write) -> Result<()> {
    let mut failed = Vec::new();
    let sel = cfg.select(names);
    for (name, _, e) in &sel.errors {
        let _ = writeln!(out, "{name:<20} FAILED: {e}");
        failed.push(name.clone());
    }
    for job in sel.jobs {
        if job.local {
            let _ = writeln!(out, "{:<20} OK (local)", job.name);
            continue;
        }
        let res = if job.rsyncd.is_some() {
            let dir = if job.job_dir().is_dir() { job.job_dir() } else { cfg.lock_dir() };
            fs::create_dir_all(&dir)
                .ctx(|| format!("cannot create {}", dir.display()))
                .and_then(|_| crate::transport::rsyncd::Daemon::for_job(job, &dir))
                .and_then(|d| d.check(job))
        } else {
            SshTarget::from_job(job, cfg).check_connection()
        };
        match res {
            Ok(()) => {
                let _ = writeln!(out, "{:<20} OK", job.name);
            }
            Err(e) => {
                let _ = writeln!(out, "{:<20} FAILED: {e}", job.name);
                failed.push(job.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("connection check failed for: {}", failed.join(", "));
    }
    Ok(())
}

/// `--cleanup JOB`: delete archives beyond the Keep values, then sweep the chunk pool.
pub fn cleanup(cfg: &Config, name: &str, yes: bool, watch: &Watch) -> Result<String> {
    let job = cfg.job(name)?;
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir())?;
    let extra = archive::beyond_keep(&job.job_dir(), keeps(job))?;
    if extra.is_empty() {
        crate::maintenance::sweep_pool(&job.root_dir())?;
        return Ok(format!("job {name}: no archives beyond the Keep values"));
    }
    let names: Vec<String> = extra.iter().map(|a| a.name()).collect();
    let what = format!("This deletes {} archive(s) of job {name}: {}", extra.len(), names.join(", "));
    confirm(watch, &what, "proceed", yes)?;
    let _l = lock::acquire(&cfg.lock_dir(), name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    for a in &extra {
        archive::remove_tree(&a.path)?;
    }
    crate::maintenance::sweep_pool(&job.root_dir())?;
    Ok(format!("job {name}: deleted {}", names.join(", ")))
}

/// `--delete-job [--revoke-key] JOB`: delete its archives and its configuration section;
/// with `revoke`, first remove affa's key from the host (a failure stops before anything is
/// deleted).
pub fn delete_job(cfg: &Config, name: &str, yes: bool, revoke: bool, watch: &Watch) -> Result<String> {
    let job = cfg.job(name)?;
    // A dead or lost disk: nothing of the job is deleted, and the way out is named.
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir()).map_err(|e| {
        e.context(format!(
            "job {name} not deleted, nor its archives (if its AutomountDevice is lost for good, delete the section [{name}] from {} by hand to remove the job; the archives on that disk stay there)",
            job.origin.file.display()
        ))
    })?;
    let dir = job.job_dir();
    confirm(
        watch,
        &format!(
            "This deletes job {name}: all its archives in {} and its section in {}{}",
            dir.display(),
            job.origin.file.display(),
            if revoke { ", after removing affa's key from its host" } else { "" }
        ),
        "proceed",
        yes,
    )?;
    let _l = lock::acquire(&cfg.lock_dir(), name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    // Before anything is changed (the host's key, the archives).
    edit::check_editable(job)?;
    let mut out = String::new();
    if revoke && !job.local {
        out = revoke_key(cfg, name)
            .map_err(|e| e.context(format!("job {name} not deleted (run without --revoke-key to delete it anyway)")))?
            + "\n";
    }
    archive::remove_tree(&dir)?;
    edit::remove_section(job)?;
    let _ = fs::remove_file(cfg.ssh_dir().join(format!("knownhosts-{name}")));
    crate::maintenance::sweep_pool(&job.root_dir())?;
    Ok(format!("{out}job {name} deleted"))
}

/// `--rename-job JOB NEW`
pub fn rename_job(cfg: &Config, name: &str, new: &str) -> Result<String> {
    let job = cfg.job(name)?;
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir())?;
    if !crate::config::valid_job_name(new) {
        bail!("new job name '{new}' is not valid; expected letters, digits, '_', '.' and '-' only (at most 64, not starting with '.' or '-'), and not {}", crate::config::GLOBAL_SECTION);
    }
    if cfg.has_job(new) {
        bail!("a job named {new} exists already");
    }
    let _l = lock::acquire(&cfg.lock_dir(), name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    let (from, to) = (job.job_dir(), job.root_dir().join(new));
    if to.exists() {
        bail!("{} exists already; not renaming", to.display());
    }
    edit::check_editable(job)?;
    if from.exists() {
        fs::rename(&from, &to).ctx(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    }
    edit::rename_section(job, new).map_err(|e| {
        e.context(format!(
            "the archives are now in {}, but the section in {} is still [{name}]: rename it to [{new}] by hand",
            to.display(),
            job.origin.file.display()
        ))
    })?;
    let (kh, kh_new) =
        (cfg.ssh_dir().join(format!("knownhosts-{name}")), cfg.ssh_dir().join(format!("knownhosts-{new}")));
    if let Ok(text) = fs::read_to_string(&kh) {
        let prefix = format!("{name} ");
        let renamed: String = text
            .lines()
            .map(|l| match l.strip_prefix(&prefix) {
                Some(rest) => format!("{new} {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        crate::fsutil::write_atomic(&kh_new, renamed.as_bytes(), crate::fsutil::Perm::Mode(0o600))?;
        let _ = fs::remove_file(&kh);
    }
    Ok(format!("job {name} renamed to {new}"))
}

/// `--move-archive JOB NEWROOTDIR`: the job's archive directory moved below another RootDir
/// (renamed on the same file system; across file systems copied, flushed to disk, put in place
/// under its name, and only then the original removed), then RootDir written to its file.
pub fn move_archive(cfg: &Config, name: &str, new_root: &str, yes: bool, watch: &Watch) -> Result<String> {
    let job = cfg.job(name)?;
    let _disk = crate::automount::mount_for_command(job, &cfg.lock_dir())?;
    check_new_root(cfg, new_root)?;
    let root = Path::new(new_root);
    let (from, to) = (job.job_dir(), root.join(name));
    let taken = || fs::symlink_metadata(&to).is_ok();
    if taken() {
        bail!("{} exists already; not moving", to.display());
    }
    let what = format!("This moves the archives of job {name} from {} to {}", from.display(), to.display());
    confirm(watch, &what, "proceed", yes)?;
    let _l = lock::acquire(&cfg.lock_dir(), name)?;
    let _shared = crate::shared_lock::acquire_for(job)?;
    edit::check_editable(job)?;
    // Again under the lock: the answer may have come much later.
    if taken() {
        bail!("{} exists already; not moving", to.display());
    }
    let mut copied = false;
    if from.exists() {
        match rename_no_replace(&from, &to) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                copy_across(&from, root, &to, name)?;
                copied = true;
            }
            Err(e) => bail!("cannot move {} to {}: {e}; nothing was moved", from.display(), to.display()),
        }
    }
    edit::set_key(job, "RootDir", new_root).map_err(|e| {
        e.context(format!(
            "the archives are now in {}{}, but {} still names the old RootDir: set RootDir={new_root} in it by hand",
            to.display(),
            if copied {
                format!(" (the original {} is still there: remove it after)", from.display())
            } else {
                String::new()
            },
            job.origin.file.display()
        ))
    })?;
    // Only once the configuration names the copy does the original go.
    if copied {
        archive::remove_tree(&from).map_err(|e| {
            e.context(format!(
                "RootDir={new_root} is written and the archives are in {}; the original {} could not be removed completely: remove it by hand",
                to.display(),
                from.display()
            ))
        })?;
    }
    Ok(format!(
        "job {name}: archives moved to {}; RootDir={new_root} written to {}",
        to.display(),
        job.origin.file.display()
    ))
}

/// The new RootDir of `--move-archive`, as the configuration will read it back: an absolute
/// directory, written so that it reads back as itself (no white space at its ends, no ` #`, no
/// control character, no `.` or `..` part), and not inside a job's archives.
fn check_new_root(cfg: &Config, new_root: &str) -> Result<()> {
    let bad = |why: &str| -> Result<()> {
        bail!(
            "new RootDir '{}' is not valid: {why}; expected the absolute path of an existing directory",
            crate::untrusted::shown(new_root)
        )
    };
    if let Err(e) = crate::config::keys::parse(crate::config::keys::Kind::AbsPath, new_root) {
        return bad(&format!("it is not {e}"));
    }
    if new_root.trim() != new_root {
        return bad("it begins or ends with white space (the configuration file would read it without)");
    }
    if new_root.contains(" #") || new_root.contains("\t#") {
        return bad("it holds ' #' (the configuration file would read the rest as a comment)");
    }
    if new_root.chars().any(char::is_control) {
        return bad("it holds a control character");
    }
    if new_root.split('/').any(|c| c == "." || c == "..") {
        return bad("it has a '.' or '..' part");
    }
    match fs::metadata(new_root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return bad("it is not a directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return bad("it does not exist (create it first)"),
        Err(e) => return bad(&format!("it cannot be read ({e})")),
    }
    // Inside a job's archive directory, the archives would be deleted with that job's
    // (--delete-job), or rotated with its own.
    let real = fs::canonicalize(new_root).ctx(|| format!("cannot resolve {new_root}"))?;
    for j in cfg.all_jobs() {
        if let Ok(d) = fs::canonicalize(j.job_dir()) {
            if real.starts_with(&d) {
                return bad(&format!("it is inside the archives of job {} ({})", j.name, d.display()));
            }
        }
    }
    Ok(())
}

/// Rename `from` to `to`, never over anything at `to`: `RENAME_NOREPLACE`, or where the file
/// system has no such flag (NFS, some FUSE file systems: EINVAL), a check that `to` is absent,
/// then a plain rename (the caller holds the job's lock).
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(std::io::Error::from(rustix::io::Errno::EXIST));
            }
            fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

/// Copy `from` to `to` on another file system: into a new directory of a name nobody else can
/// have chosen, below `root` (`.affa-move-JOB-HEX`), hard links kept (`cp -a`); flushed to
/// disk; renamed to `to` (never over anything that appeared there). A failure removes the copy
/// and leaves the original as it was; the caller removes the original once the configuration
/// names the copy. (A kill during the copy leaves `.affa-move-JOB-HEX`: a partial copy, safe
/// to remove.)
fn copy_across(from: &Path, root: &Path, to: &Path, name: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let root_fd = fs::File::open(root).ctx(|| format!("cannot open {}", root.display()))?;
    let tmp = root.join(format!(
        ".affa-move-{name}-{}",
        crate::fsutil::random_hex().ctx(|| "cannot read random bytes".to_string())?
    ));
    fs::DirBuilder::new().mode(0o700).create(&tmp).ctx(|| format!("cannot create {}", tmp.display()))?;
    let failed = |why: String| -> Result<()> {
        let _ = archive::remove_tree(&tmp);
        bail!("copying {} to {} failed: {why}; the original is untouched", from.display(), to.display())
    };
    let out = match std::process::Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(from.join("."))
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => return failed(format!("cannot run cp: {e}")),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("cp failed");
        return failed(crate::untrusted::shown(last));
    }
    if let Err(e) = crate::fsutil::sync_filesystem_of(&root_fd, root) {
        return failed(e.to_string());
    }
    if let Err(e) = rename_no_replace(&tmp, to) {
        return failed(format!("cannot rename the copy to its name: {e}"));
    }
    root_fd.sync_all().ctx(|| {
        format!(
            "the copy is complete at {}, but {} could not be flushed to disk; the original is untouched and the configuration still names it: remove the copy, or set RootDir by hand",
            to.display(),
            root.display()
        )
    })
}

/// `--kill JOB`: stop a running job (SIGTERM, so it cleans up) and wait for it. Only the affa
/// process that holds the job's lock is signalled (see [`lock::signal_holder`]).
pub fn kill(cfg: &Config, name: &str) -> Result<String> {
    // A job whose configuration broke while it runs can still be stopped.
    let job = match cfg.job(name) {
        Ok(j) => j,
        Err(e) => cfg.broken.get(name).map(|b| &b.partial).ok_or(e)?,
    };
    let pid = match lock::signal_holder(&cfg.lock_dir(), name, rustix::process::Signal::TERM)? {
        lock::Signalled::NotRunning => match elsewhere(job) {
            // Another server's process: not ours to signal.
            Some(state) => bail!("job {name} is {state}, not on this server: run affa --kill {name} there"),
            None => return Ok(format!("job {name} is not running")),
        },
        lock::Signalled::Exited(pid) => return Ok(format!("job {name} (pid {pid}) had already stopped")),
        lock::Signalled::Sent(pid) => pid,
    };
    for _ in 0..600 {
        if lock::holder(&cfg.lock_dir(), name).is_none() {
            return Ok(format!("job {name} (pid {pid}) stopped"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("job {name} (pid {pid}) was sent SIGTERM but did not stop within 60 s")
}

/// `--log-tail [JOB]`
pub fn log_tail(cfg: &Config, name: Option<&str>) -> Result<String> {
    let file = match name {
        Some(n) => {
            cfg.job(n)?;
            cfg.log_dir().join(format!("{n}.log"))
        }
        None => cfg.log_dir().join(crate::joblog::GLOBAL_LOG),
    };
    let lines = crate::joblog::tail(&file, 50).ctx(|| format!("cannot read {}", file.display()))?;
    Ok(lines.join("\n") + "\n")
}

/// `--show-config-pathes [--csv] [JOB...]`: the file that holds each job (Affa 3's format:
/// `JOB: FILE`, the name column 3 to 17 wide; CSV `job;configpath`).
pub fn show_config_pathes(cfg: &Config, names: &[String], csv: bool) -> Result<String> {
    let jobs: Vec<&Job> = if names.is_empty() {
        cfg.all_jobs()
    } else {
        let mut v = Vec::new();
        for n in names {
            match cfg.broken.get(n.as_str()) {
                Some(b) => v.push(&b.partial),
                None => v.push(cfg.job(n)?),
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    let mut out = String::new();
    if csv {
        out.push_str("job;configpath\n");
        for j in &jobs {
            out.push_str(&format!("{};{}\n", j.name, j.origin.file.display()));
        }
        return Ok(out);
    }
    let w = jobs.iter().map(|j| j.name.len()).max().unwrap_or(0).clamp(3, 17);
    for j in &jobs {
        let name = if j.name.len() > w { format!("{}..", &j.name[..w - 2]) } else { j.name.clone() };
        out.push_str(&format!("{name:<w$}: {}\n", j.origin.file.display()));
    }
    Ok(out)
}

/// `--_jobs` (bash completion): every job name, one per line.
pub fn job_names(cfg: &Config) -> String {
    cfg.all_jobs().iter().map(|j| format!("{}\n", j.name)).collect()
}

/// `--configcheck`: what is worth knowing about the working jobs (stdout) and every
/// configuration error of every file, one line each (the caller prints them on stderr and
/// exits non-zero when there is any).
pub fn configcheck(cfg: &Config) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut errors = cfg.problems.clone();
    for job in cfg.jobs.values() {
        if job.esxi() {
            if let Err(e) = job.esxi_password() {
                errors.push(e.to_string());
            }
            if job.esxi.as_ref().is_some_and(|e| e.thumbprint.is_none() && !e.plain_http) {
                out.push_str(&format!(
                    "job {}: no ESXiThumbprint yet; affa --send-key {} will show and pin it\n",
                    job.name, job.name
                ));
            }
        }
        if !job.root_dir().is_dir() {
            out.push_str(&format!("job {}: RootDir {} does not exist yet\n", job.name, job.root_dir().display()));
        }
    }
    if errors.is_empty() {
        out.push_str(&format!("configuration OK: {} job(s) in {}\n", cfg.jobs.len(), cfg.dir.display()));
    } else {
        let broken: Vec<&str> = cfg.broken.keys().map(|s| s.as_str()).collect();
        out.push_str(&format!(
            "configuration has {} error(s) in {}: {} job(s) will not run{}; the other {} job(s) run\n",
            errors.len(),
            cfg.dir.display(),
            broken.len(),
            if broken.is_empty() { String::new() } else { format!(" ({})", broken.join(", ")) },
            cfg.jobs.len()
        ));
    }
    (out, errors)
}

/// `--mailtest JOB`
pub fn mailtest(cfg: &Config, job: &str) -> Result<String> {
    let j = cfg.job(job)?;
    let subject = format!("affa: test mail for job {} on {}", j.name, notify::job_host(j));
    let body = format!(
        "This is a test mail of affa on {} for the job {} ({}).\nMail goes out via {}.\nError mails of this job go to: {}\n",
        notify::hostname(),
        j.name,
        notify::job_host(j),
        notify::route(cfg),
        notify::recipients(j).join(", ")
    );
    let how = notify::send(cfg, &notify::recipients(j), &subject, &body)?;
    let mut out = format!("test mail for job {job} sent {how}");
    if let Some(w) = crate::backup::sme::watchdog_mailtest(cfg, j)? {
        out.push_str(&format!("\n{w}"));
    }
    Ok(out)
}

/// The status report: `--status --all`, `--disk-usage` and `--list-archives` of every job.
pub fn status_text(cfg: &Config, clock: &dyn Clock) -> Result<String> {
    let mut body = format!("affa status of {} at {}\n\n", notify::hostname(), clock.now().format("%Y-%m-%d %H:%M"));
    body.push_str(&status(cfg, clock, false, true)?);
    body.push_str("\nDisk usage:\n");
    body.push_str(&disk_usage(cfg, false)?);
    body.push_str("\nArchives:\n");
    let listing = list_archives(cfg, &[], false)?;
    body.push_str(&listing.text);
    for l in &listing.unreadable {
        body.push_str(l);
        body.push('\n');
    }
    Ok(body)
}

/// `--send-status`: the status report to the EmailAddress of `[GlobalAffaConfig]` (default root).
pub fn send_status(cfg: &Config, clock: &dyn Clock) -> Result<String> {
    let body = status_text(cfg, clock)?;
    let subject = format!("affa: status of {}", notify::hostname());
    let how = notify::send(cfg, &notify::recipients(&cfg.global), &subject, &body)?;
    Ok(format!("status mail sent {how}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_read_text_keeps_a_reason_with_its_own_parentheses() {
        assert_eq!(
            super::disk_read_text("full 1048576 2048 (CBT was just switched on (tracking starts with this run's snapshot))"),
            "full, 1.0M read on the host, 2.0K sent (CBT was just switched on (tracking starts with this run's snapshot))"
        );
        assert_eq!(super::disk_read_text("cbt 0 127"), "cbt, 0B read on the host, 127B sent");
    }

    #[test]
    fn disk_read_fields_give_one_value_per_disk_in_each_column() {
        let mut r = Report::default();
        assert_eq!(super::disk_read_fields(&r), ["", "", ""]);
        r.set("ESXiDiskRead0", "cbt 524288 1200");
        r.set("ESXiDiskRead1", "full 4194304 300 (CBT was just switched on (tracking starts))");
        r.set("ESXiDiskRead2", "rsync - 77");
        assert_eq!(super::disk_read_fields(&r), ["cbt full rsync", "524288 4194304 -", "1200 300 77"]);
    }

    use super::*;
    use crate::clock::FixedClock;
    use std::path::PathBuf;

    /// `--status` says a job is enabled exactly when cron runs it: `globalStatus=enabled`
    /// overrides the job's `status=disabled` in both.
    #[test]
    fn global_status_enabled_shows_a_disabled_job_as_enabled_and_cron_runs_it() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[GlobalAffaConfig]\nglobalStatus=enabled\nlockDir={d}/lock\nlogDir={d}/log\n\n\
             [web]\nstatus=disabled\nremoteHostName=localhost\nRootDir={d}/archive\nTimeSchedule=0300\n",
            d = tmp.path().display()
        );
        let cfg = Config::parse(tmp.path(), &[(PathBuf::from("/etc/affa/t.conf"), text)]).unwrap().strict().unwrap();
        let clock = FixedClock(crate::clock::parse_time("2026-03-02T10:00:00").unwrap());
        let text = status(&cfg, &clock, false, false).unwrap();
        let line = text.lines().find(|l| l.starts_with("web ")).unwrap_or_else(|| panic!("no line for web:\n{text}"));
        assert_eq!(line.split_whitespace().nth(1), Some("yes"), "{text}");
        let csv = status(&cfg, &clock, true, false).unwrap();
        assert!(csv.lines().any(|l| l.starts_with("web;yes;")), "{csv}");
        let cron = crate::cron::cron_text(&cfg, tmp.path());
        assert!(cron.contains(" --run web\n"), "{cron}");
    }

    /// Configuration errors say so in their kind (callers never look at the message).
    #[test]
    fn configuration_errors_are_of_kind_config() {
        use crate::error::ErrorKind;
        let parse = |t: &str| Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), t.into())]);
        let cfg = parse("[web]\nremoteHostName=h\nstatus=enbabled\n").unwrap();
        let e = cfg.job("nope").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let e = cfg.strict().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert_eq!(
            e.message(),
            "/etc/affa/t.conf:3: key 'status' has the value 'enbabled', expected enabled or disabled"
        );
        let e = parse("[GlobalAffaConfig]\nsendStatus=hourly\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let e = parse("[web]\nremoteHostName=h\nESXi=yes\n").unwrap().job("web").map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    }
}
