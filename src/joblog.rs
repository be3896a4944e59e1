//! Logs: `logDir/JOB.log` per job and `logDir/affa-GLOBAL-LOGFILE.log`, one timestamped line per
//! event, and what an interactive user sees on the terminal.
//!
//! Owns: where messages go. Must never: print anything but errors when not interactive (cron),
//! or write a secret (callers pass messages that never contain passwords).

use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const GLOBAL_LOG: &str = "affa-GLOBAL-LOGFILE.log";

/// A job's log. Lines also go to stderr when `echo` is set (an interactive run).
pub struct JobLog {
    path: Option<PathBuf>,
    global: Option<PathBuf>,
    job: String,
    pub echo: bool,
    /// Every line written, so a failure mail or report can quote the run's log.
    pub lines: Mutex<Vec<String>>,
}

impl JobLog {
    pub fn new(log_dir: &Path, job: &str, echo: bool) -> JobLog {
        let ok = fs::create_dir_all(log_dir).is_ok();
        JobLog {
            path: ok.then(|| log_dir.join(format!("{job}.log"))),
            global: ok.then(|| log_dir.join(GLOBAL_LOG)),
            job: job.to_string(),
            echo,
            lines: Mutex::new(Vec::new()),
        }
    }

    /// A log that only collects lines (tests, dry runs).
    pub fn memory(job: &str) -> JobLog {
        JobLog { path: None, global: None, job: job.into(), echo: false, lines: Mutex::new(Vec::new()) }
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
        if self.echo {
            crate::joblog::clear_progress();
            eprintln!("{}", msg.as_ref());
        }
    }
    pub fn warn(&self, msg: impl AsRef<str>) {
        self.write("WARNING: ", msg.as_ref());
        if self.echo {
            crate::joblog::clear_progress();
            eprintln!("WARNING: {}", msg.as_ref());
        }
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

/// Is the user watching (stderr is a terminal)?
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

/// Erase a progress line before printing a message over it.
pub fn clear_progress() {
    if interactive() {
        eprint!("\r\x1b[K");
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let text = fs::read_to_string(path)?;
    let lines: Vec<String> = text.lines().map(|s| s.to_string()).collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}

/// A byte progress bar on a terminal; hidden otherwise (under cron, in tests).
pub fn progress_bar(interactive: bool, total: u64, label: &str) -> indicatif::ProgressBar {
    if !interactive {
        return indicatif::ProgressBar::hidden();
    }
    let bar = if total > 0 { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::new_spinner() };
    let style = if total > 0 {
        indicatif::ProgressStyle::with_template("{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
    } else {
        indicatif::ProgressStyle::with_template("{msg} {bytes} {binary_bytes_per_sec}")
    };
    if let Ok(s) = style {
        bar.set_style(s);
    }
    bar.set_message(label.to_string());
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}
