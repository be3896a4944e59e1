//! Logs: `logDir/JOB.log` per job and `logDir/affa-GLOBAL-LOGFILE.log`, one timestamped line per
//! event; the same lines (and the run's phases) go to whoever watches (crate::observer).
//!
//! Owns: where messages go. Must never: print (a terminal is the observer's business), or write
//! a secret (callers pass messages that never contain passwords).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::observer::{Phase, Watch};

pub const GLOBAL_LOG: &str = "affa-GLOBAL-LOGFILE.log";

/// A job's log. Lines also go to the observer of the command (an interactive run).
pub struct JobLog {
    path: Option<PathBuf>,
    global: Option<PathBuf>,
    job: String,
    pub watch: Watch,
    /// Every line written, so a failure mail or report can quote the run's log.
    pub lines: Mutex<Vec<String>>,
}

impl JobLog {
    pub fn new(log_dir: &Path, job: &str, watch: Watch) -> JobLog {
        let ok = fs::create_dir_all(log_dir).is_ok();
        JobLog {
            path: ok.then(|| log_dir.join(format!("{job}.log"))),
            global: ok.then(|| log_dir.join(GLOBAL_LOG)),
            job: job.to_string(),
            watch,
            lines: Mutex::new(Vec::new()),
        }
    }

    /// A log that only collects lines (tests, dry runs).
    pub fn memory(job: &str) -> JobLog {
        JobLog { path: None, global: None, job: job.into(), watch: Watch::nobody(), lines: Mutex::new(Vec::new()) }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn write(&self, level: &str, msg: &str) {
        let ts = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
        let pid = std::process::id();
        let line = format!("{ts} [{pid}] {level}{msg}");
        if let Some(p) = &self.path {
            append(p, &line);
        }
        if let Some(g) = &self.global {
            append(g, &format!("{ts} [{pid}] {}: {level}{msg}", self.job));
        }
        self.lines.lock().unwrap().push(line);
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        self.write("", msg.as_ref());
        self.watch.message(false, msg.as_ref());
    }
    pub fn warn(&self, msg: impl AsRef<str>) {
        self.write("WARNING: ", msg.as_ref());
        self.watch.message(true, msg.as_ref());
    }
    /// A line for the log only (rsync's command line): too much for a person watching.
    pub fn detail(&self, msg: impl AsRef<str>) {
        self.write("", msg.as_ref());
    }
    /// A new phase of the run: a log line, and its own line for the person watching.
    pub fn phase(&self, p: Phase) {
        self.write("", &p.to_string());
        self.watch.phase(&p);
    }
    /// Errors are logged; the caller decides how to show them (main prints the final one).
    pub fn error(&self, msg: impl AsRef<str>) {
        self.write("ERROR: ", msg.as_ref());
    }
}

fn append(path: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let text = fs::read_to_string(path)?;
    let lines: Vec<String> = text.lines().map(|s| s.to_string()).collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}
