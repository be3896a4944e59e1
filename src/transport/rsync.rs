//! rsync: the command line (Affa 3's flags), running it with progress, and its exit codes.
//!
//! Owns: how rsync is called and what its exit status means. Must never: call a partial
//! transfer a success (exit 23 is a failure, unlike Affa 3; only 24, "files vanished", is a
//! success with a warning).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::Job;
use crate::error::{IoContext, Result};
use crate::joblog::JobLog;
use crate::transport::{die_with_parent, SshTarget};

/// What an rsync exit status means for the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Success, with a warning for the log and the report.
    Warning(String),
    Failure(String),
}

pub fn classify(code: i32) -> Outcome {
    match code {
        0 => Outcome::Success,
        24 => Outcome::Warning("some source files vanished during the transfer (rsync exit 24)".into()),
        _ => Outcome::Failure(format!("rsync failed with exit {code}: {}", meaning(code))),
    }
}

/// rsync(1)'s EXIT VALUES.
pub fn meaning(code: i32) -> &'static str {
    match code {
        1 => "syntax or usage error",
        2 => "protocol incompatibility",
        3 => "errors selecting input/output files or directories",
        4 => "requested action not supported",
        5 => "error starting client-server protocol",
        10 => "error in socket I/O",
        11 => "error in file I/O (is the disk full?)",
        12 => "error in rsync protocol data stream (connection lost?)",
        13 => "errors with program diagnostics",
        14 => "error in IPC code",
        20 => "received SIGUSR1 or SIGINT",
        21 => "some error returned by waitpid()",
        22 => "error allocating core memory buffers",
        23 => "partial transfer due to error (some files were not copied)",
        24 => "partial transfer due to vanished source files",
        25 => "the --max-delete limit stopped deletions",
        30 => "timeout in data send/receive",
        35 => "timeout waiting for daemon connection",
        255 => "ssh connection failed",
        -1 => "killed by a signal",
        _ => "unknown error",
    }
}

/// Where to pull from: a remote host over ssh, a local path (remoteHostName=localhost), or an
/// rsync daemon (rsyncdMode=yes).
pub enum Source<'a> {
    Ssh(&'a SshTarget),
    Local,
    Daemon(&'a crate::transport::rsyncd::Daemon),
}

/// The common flags of every transfer (Affa 3's, minus `--ignore-errors` semantics that hide
/// failures: errors still fail the run through the exit code).
pub fn base_args(job: &Job, source: &Source) -> Vec<String> {
    let mut a: Vec<String> = vec!["--archive".into(), "--hard-links".into(), "--numeric-ids".into()];
    let bw = job.num("BandwidthLimit");
    if bw > 0 {
        a.push(format!("--bwlimit={bw}"));
    }
    let mw = job.num("rsync--modify-window");
    if mw > 0 {
        a.push(format!("--modify-window={mw}"));
    }
    let to = job.num("rsyncTimeout");
    if to > 0 {
        a.push(format!("--timeout={to}"));
    }
    if let Source::Ssh(t) = source {
        if job.flag("rsyncCompress") {
            a.push("--compress".into());
        }
        let mut remote = job.remote_rsync();
        let nice = job.int("remoteNice");
        if nice != 0 {
            remote = format!("{} -n {nice} {remote}", job.get("remoteNiceBinary"));
        }
        a.push(format!("--rsync-path={remote}"));
        a.push(format!("--rsh={}", t.rsh()));
    }
    if let Source::Daemon(d) = source {
        if job.flag("rsyncCompress") {
            a.push("--compress".into());
        }
        a.extend(d.args());
    }
    a
}

/// The local rsync program and its leading args (nice, when localNice is not 0).
pub fn program(job: &Job) -> (String, Vec<String>) {
    let nice = job.int("localNice");
    if nice != 0 {
        (
            job.get("localNiceBinary").to_string(),
            vec!["-n".into(), nice.to_string(), job.get("localRsyncBinary").to_string()],
        )
    } else {
        (job.get("localRsyncBinary").to_string(), vec![])
    }
}

/// A source path argument: `user@host:/path` for the first, `:/path` for the next ones.
pub fn source_args(source: &Source, paths: &[String]) -> Vec<String> {
    match source {
        Source::Local => paths.to_vec(),
        Source::Daemon(d) => paths.iter().map(|p| d.source(p)).collect(),
        Source::Ssh(t) => paths
            .iter()
            .enumerate()
            .map(|(i, p)| if i == 0 { format!("{}:{p}", t.destination()) } else { format!(":{p}") })
            .collect(),
    }
}

/// The result of one rsync.
#[derive(Debug)]
pub struct RsyncResult {
    pub code: i32,
    pub stdout: String,
    /// stderr lines (also written to the log).
    pub errors: Vec<String>,
}

impl RsyncResult {
    /// The first error line rsync printed, for the one-line failure message.
    pub fn first_error(&self) -> Option<&str> {
        self.errors.iter().map(|s| s.as_str()).find(|l| !l.trim().is_empty())
    }
}

/// Run rsync; stderr lines go to the log as they come; on a terminal `--info=progress2` is
/// shown as one updating line.
pub fn run(job: &Job, args: &[String], log: &JobLog, progress: bool) -> Result<RsyncResult> {
    let (prog, lead) = program(job);
    let mut cmd = Command::new(&prog);
    cmd.args(&lead).args(args);
    if progress {
        cmd.arg("--info=progress2");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    log.info(format!("running: {} {}", prog, redact_args(&lead, args)));
    let mut child = cmd.spawn().ctx(|| format!("cannot run {prog}"))?;
    crate::interrupt::set_child(child.id());
    let stderr = child.stderr.take().unwrap();
    let err_thread =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(|l| l.ok()).collect::<Vec<String>>());
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if progress && is_progress_line(&line) {
                    let s = String::from_utf8_lossy(&line);
                    eprint!("\r\x1b[K{}", s.trim());
                } else {
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    out.extend_from_slice(&line);
    if progress {
        crate::joblog::clear_progress();
    }
    let status = child.wait().ctx(|| format!("cannot wait for {prog}"))?;
    crate::interrupt::set_child(0);
    let errors = err_thread.join().unwrap_or_default();
    for e in &errors {
        log.warn(format!("rsync: {e}"));
    }
    Ok(RsyncResult { code: status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out).into_owned(), errors })
}

fn is_progress_line(l: &[u8]) -> bool {
    let s = String::from_utf8_lossy(l);
    let s = s.trim();
    s.contains('%') && (s.contains("B/s") || s.contains("to-chk") || s.contains("xfr#"))
}

/// The command line for the log (it holds no secrets, but keep it on one line).
fn redact_args(lead: &[String], args: &[String]) -> String {
    lead.iter().chain(args).map(|a| a.replace('\n', " ")).collect::<Vec<_>>().join(" ")
}

/// Free and used space (KiB) of the filesystem holding `path`.
pub fn df(path: &Path) -> Option<(u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let bs = s.f_frsize as u64;
    let used = (s.f_blocks as u64 - s.f_bfree as u64) * bs / 1024;
    let avail = s.f_bavail as u64 * bs / 1024;
    Some((used, avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_0_and_24_succeed() {
        assert_eq!(classify(0), Outcome::Success);
        assert!(matches!(classify(24), Outcome::Warning(_)));
        assert!(matches!(classify(23), Outcome::Failure(m) if m.contains("partial transfer")));
        assert!(matches!(classify(11), Outcome::Failure(_)));
        assert!(matches!(classify(-1), Outcome::Failure(_)));
    }
}
