//! Logs: `logDir/JOB.log` per job and `logDir/affa-GLOBAL-LOGFILE.log`, one timestamped line per
//! event; the same lines (and the run's phases) go to whoever watches (crate::observer).
//!
//! Owns: where messages go, and bounding what is kept of a long stream of lines ([`LineTail`]).
//! Must never: print (a terminal is the observer's business), write a secret (callers pass
//! messages that never contain passwords), write a control character a host sent (a newline
//! would forge log lines, an escape sequence would act on a terminal: they are escaped), or keep
//! a run's lines in memory without a bound.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::observer::{Phase, Watch};

pub const GLOBAL_LOG: &str = "affa-GLOBAL-LOGFILE.log";

/// A job's log. Lines also go to the observer of the command (an interactive run).
pub struct JobLog {
    path: Option<PathBuf>,
    global: Option<PathBuf>,
    job: String,
    pub watch: Watch,
}

impl JobLog {
    pub fn new(log_dir: &Path, job: &str, watch: Watch) -> JobLog {
        let ok = fs::create_dir_all(log_dir).is_ok();
        JobLog {
            path: ok.then(|| log_dir.join(format!("{job}.log"))),
            global: ok.then(|| log_dir.join(GLOBAL_LOG)),
            job: job.to_string(),
            watch,
        }
    }

    /// A log that writes nowhere (tests, dry runs).
    pub fn memory(job: &str) -> JobLog {
        JobLog { path: None, global: None, job: job.into(), watch: Watch::nobody() }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn write(&self, level: &str, msg: &str) {
        let ts = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
        let pid = std::process::id();
        if let Some(p) = &self.path {
            append(p, &format!("{ts} [{pid}] {level}{msg}"));
        }
        if let Some(g) = &self.global {
            append(g, &format!("{ts} [{pid}] {}: {level}{msg}", self.job));
        }
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        let msg = crate::untrusted::escape_controls(msg.as_ref());
        self.write("", &msg);
        self.watch.message(false, &msg);
    }
    pub fn warn(&self, msg: impl AsRef<str>) {
        let msg = crate::untrusted::escape_controls(msg.as_ref());
        self.write("WARNING: ", &msg);
        self.watch.message(true, &msg);
    }
    /// A line for the log only (rsync's command line): too much for a person watching.
    pub fn detail(&self, msg: impl AsRef<str>) {
        self.write("", &crate::untrusted::escape_controls(msg.as_ref()));
    }
    /// A new phase of the run: a log line, and its own line for the person watching.
    pub fn phase(&self, p: Phase) {
        let text = p.to_string();
        self.write("", &crate::untrusted::escape_controls(&text));
        self.watch.phase(&p);
    }
    /// Errors are logged; the caller decides how to show them (main prints the final one).
    pub fn error(&self, msg: impl AsRef<str>) {
        self.write("ERROR: ", &crate::untrusted::escape_controls(msg.as_ref()));
    }
}

/// Longest line kept by a [`LineTail`] (longer ones are cut, marked with `...`).
pub const MAX_LINE: usize = 2000;

/// The first `head` and the last `tail` lines of a stream of any length, each at most
/// [`MAX_LINE`] bytes, and how many were left out between them: memory stays bounded whatever
/// a host prints.
#[derive(Debug, Clone)]
pub struct LineTail {
    head: usize,
    tail: usize,
    first: Vec<String>,
    last: VecDeque<String>,
    omitted: u64,
}

impl LineTail {
    pub fn new(head: usize, tail: usize) -> LineTail {
        LineTail { head, tail, first: Vec::new(), last: VecDeque::new(), omitted: 0 }
    }

    pub fn push(&mut self, line: &str) {
        let line = if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}...", &line[..cut])
        } else {
            line.to_string()
        };
        if self.first.len() < self.head {
            self.first.push(line);
            return;
        }
        if self.last.len() == self.tail && (self.last.pop_front().is_some() || self.tail == 0) {
            self.omitted += 1;
        }
        if self.tail > 0 {
            self.last.push_back(line);
        }
    }

    /// Lines left out between the first and the last ones.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    /// The lines kept, with one line saying how many were left out where they were.
    pub fn lines(&self) -> Vec<String> {
        let mut v = self.first.clone();
        if self.omitted > 0 {
            v.push(format!("[... {} line(s) left out here; the log file has them all ...]", self.omitted));
        }
        v.extend(self.last.iter().cloned());
        v
    }
}

/// The lines of a file from byte `offset` on, as a [`LineTail`] (read as a stream: the file may
/// be far larger than memory allows).
pub fn lines_since(path: &Path, offset: u64, head: usize, tail: usize) -> std::io::Result<LineTail> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut r = std::io::BufReader::new(f);
    let mut t = LineTail::new(head, tail);
    let mut buf = Vec::new();
    while read_line_bounded(&mut r, &mut buf)? {
        let s = String::from_utf8_lossy(&buf);
        t.push(s.trim_end_matches(['\n', '\r']));
    }
    Ok(t)
}

/// Read one line into `buf` (cleared first), keeping at most [`MAX_LINE`] + 1 bytes of it; the
/// rest of a longer line is read and dropped. False at the end of the input.
pub fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    use std::io::Read;
    buf.clear();
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() != Some(&b'\n') && n > MAX_LINE {
        let mut rest = Vec::new();
        loop {
            rest.clear();
            let m = r.by_ref().take(1 << 16).read_until(b'\n', &mut rest)?;
            if m == 0 || rest.last() == Some(&b'\n') {
                break;
            }
        }
    }
    Ok(true)
}

fn append(path: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// The last `n` lines of a log file (read as a stream).
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let t = lines_since(path, 0, 0, n)?;
    Ok(t.last.into_iter().collect())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_tail_keeps_head_and_tail() {
        let mut t = LineTail::new(2, 3);
        for i in 0..1000 {
            t.push(&format!("l{i}"));
        }
        assert_eq!(t.omitted(), 995);
        let v = t.lines();
        assert_eq!(v.len(), 6);
        assert_eq!((v[0].as_str(), v[1].as_str(), v[5].as_str()), ("l0", "l1", "l999"));
        assert!(v[2].contains("995 line(s) left out"));
        let mut short = LineTail::new(2, 3);
        short.push("a");
        short.push(&"x".repeat(5000));
        assert_eq!(short.lines().len(), 2);
        assert!(short.lines()[1].len() < MAX_LINE + 10);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        fs::write(&p, format!("skip\n{}\nb\nc\n", "y".repeat(100_000))).unwrap();
        let t = lines_since(&p, 5, 1, 1).unwrap();
        assert_eq!(t.lines().len(), 3);
        assert!(t.lines()[0].starts_with("yyy") && t.lines()[0].len() < MAX_LINE + 10);
        assert_eq!(t.lines()[2], "c");
        assert_eq!(tail(&p, 2).unwrap(), ["b", "c"]);
    }
}
