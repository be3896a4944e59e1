//! rsync: the command line (Affa 3's flags), running it with progress, and its exit codes.
//!
//! Owns: how rsync is called and what its exit status means. Must never: keep what rsync (or
//! the remote side) prints on stderr in memory without a bound, call a partial transfer a success (exit 23 is a failure, unlike Affa 3; only 24, "files vanished", is a
//! success with a warning).

use std::ffi::OsString;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::Job;
use crate::error::{IoContext, Result};
use crate::joblog::JobLog;
use crate::observer::Watch;
pub use crate::transport::rsync_program as program;
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

/// An rsync command line, assembled in one place: the options, then `--`, then the sources and
/// the destination. Options and operands are kept apart, so an option added at any time (a
/// caller's excludes, `--link-dest`, the progress flag [`run`] adds on a terminal) always lands
/// before `--`, and nothing but a source or the destination can land after it. Words are
/// bytes (`OsString`): a file name, and so a filter rule naming it, need not be UTF-8.
#[derive(Debug, Clone, Default)]
pub struct Args {
    options: Vec<OsString>,
    sources: Vec<OsString>,
    dest: Option<OsString>,
}

impl Args {
    /// The common flags of every transfer (Affa 3's, minus `--ignore-errors` semantics that
    /// hide failures: errors still fail the run through the exit code).
    pub fn new(job: &Job, source: &Source) -> Args {
        let mut a = Args::default();
        a.opts(["--archive", "--hard-links", "--numeric-ids"]);
        let bw = job.rsync.bwlimit;
        if bw > 0 {
            a.opt(format!("--bwlimit={bw}"));
        }
        let mw = job.rsync.modify_window;
        if mw > 0 {
            a.opt(format!("--modify-window={mw}"));
        }
        let to = job.rsync.timeout;
        if to > 0 {
            a.opt(format!("--timeout={to}"));
        }
        if let Source::Ssh(t) = source {
            if job.rsync.compress {
                a.opt("--compress");
            }
            let mut remote = job.rsync.remote_rsync_bin.clone();
            let nice = job.rsync.remote_nice;
            if nice != 0 {
                remote = format!("{} -n {nice} {remote}", job.rsync.remote_nice_bin);
            }
            a.opt(format!("--rsync-path={remote}"));
            a.opt(format!("--rsh={}", t.rsh()));
        }
        if let Source::Daemon(d) = source {
            if job.rsync.compress {
                a.opt("--compress");
            }
            a.opts(d.args());
        }
        a
    }

    /// Add one option (it must start with `-`: a path is an operand, see [`Args::from`]).
    pub fn opt(&mut self, o: impl Into<OsString>) -> &mut Args {
        let o = o.into();
        debug_assert!(o.as_encoded_bytes().starts_with(b"-"), "rsync option {o:?} does not start with '-'");
        self.options.push(o);
        self
    }

    pub fn opts<S: Into<OsString>>(&mut self, os: impl IntoIterator<Item = S>) -> &mut Args {
        for o in os {
            self.opt(o);
        }
        self
    }

    /// The words of the job's `rsyncOptions` (the administrator's: an option may take its value
    /// as the next word, so they are not checked one by one). They stay before `--` too.
    pub fn configured(&mut self, words: &str) -> &mut Args {
        self.options.extend(words.split_whitespace().map(OsString::from));
        self
    }

    /// Sources to pull: `user@host:/path` for the first, `:/path` for the next ones, or local
    /// paths.
    pub fn from(&mut self, source: &Source, paths: &[String]) -> &mut Args {
        self.sources.extend(source_args(source, paths).into_iter().map(OsString::from));
        self
    }

    /// Local source paths (a restore pushes from here).
    pub fn from_local<S: Into<OsString>>(&mut self, paths: impl IntoIterator<Item = S>) -> &mut Args {
        self.sources.extend(paths.into_iter().map(Into::into));
        self
    }

    /// The destination (a local path, or `user@host:/path`).
    pub fn to(&mut self, dest: impl Into<OsString>) -> &mut Args {
        self.dest = Some(dest.into());
        self
    }

    /// The argument vector: options, `--`, sources, destination.
    pub fn to_vec(&self) -> Vec<OsString> {
        let mut v = self.options.clone();
        v.push("--".into());
        v.extend(self.sources.iter().cloned());
        v.extend(self.dest.iter().cloned());
        v
    }
}

/// Flags that keep rsync from making a symlink, device or fifo in the destination (it skips
/// them on the sender, with exit 0): for transfers whose files affa opens afterwards (chunking).
pub const REGULAR_FILES_ONLY: [&str; 3] = ["--no-links", "--no-devices", "--no-specials"];

const ITEM_PREFIX: &str = "affa-item:";

/// Flags that make rsync list every file it sent or found up to date (`-ii`), for
/// [`regular_files`].
pub fn itemize_args() -> [String; 2] {
    ["-ii".to_string(), format!("--out-format={ITEM_PREFIX}%i:%n")]
}

/// The names rsync listed as regular files (`f` items) in the output of a run with
/// [`itemize_args`].
pub fn regular_files(stdout: &str) -> std::collections::BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(ITEM_PREFIX))
        .filter_map(|l| {
            let (item, name) = l.split_once(':')?;
            (item.as_bytes().get(1) == Some(&b'f')).then(|| name.to_string())
        })
        .collect()
}

/// The names rsync skipped as not regular files (`skipping non-regular file "NAME"`, on stdout,
/// with [`REGULAR_FILES_ONLY`]'s `--no-links`).
pub fn skipped_non_regular(stdout: &str) -> std::collections::BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("skipping non-regular file \"")?.strip_suffix('"'))
        .map(String::from)
        .collect()
}

/// A source path argument: `user@host:/path` for the first, `:/path` for the next ones.
fn source_args(source: &Source, paths: &[String]) -> Vec<String> {
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

/// First and last stderr lines of one rsync kept in memory (all go to the log as they come).
pub const KEPT_ERRORS: (usize, usize) = (50, 50);
/// First and last stdout lines of one rsync kept (statistics are the last 20).
const KEPT_STDOUT: usize = 1000;

/// The result of one rsync.
#[derive(Debug)]
pub struct RsyncResult {
    pub code: i32,
    pub stdout: String,
    /// How many stdout lines were left out of `stdout` (between its first and last ones).
    pub stdout_omitted: u64,
    /// The first and last stderr lines ([`KEPT_ERRORS`]; a line says how many are left out
    /// between them); every line went to the log as it came.
    pub errors: Vec<String>,
}

impl RsyncResult {
    /// The first error line rsync printed, for the one-line failure message.
    pub fn first_error(&self) -> Option<&str> {
        self.errors.iter().map(|s| s.as_str()).find(|l| !l.trim().is_empty())
    }
}

/// Run rsync; stderr lines go to the log as they come. When somebody watches `progress`, rsync
/// gets `--info=progress2` (with the other options, before `--`) and its progress goes there.
pub fn run(job: &Job, args: &Args, log: &JobLog, progress: &Watch) -> Result<RsyncResult> {
    let (prog, lead) = program(job);
    let watched = progress.is_watched();
    let mut args = args.clone();
    if watched {
        args.opt("--info=progress2");
    }
    let args = args.to_vec();
    let mut cmd = Command::new(&prog);
    cmd.args(&lead).args(&args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    log.detail(format!("running: {} {}", prog, redact_args(&lead, &args)));
    let mut child = cmd.spawn().ctx(|| format!("cannot run {prog}"))?;
    let stop = crate::interrupt::stop_on_signal(child.id());
    let stderr = child.stderr.take().unwrap();
    std::thread::scope(|scope| {
        let err_thread = scope.spawn(move || {
            // Each line to the log as it comes; only the first and last ones stay in memory.
            let mut kept = crate::joblog::LineTail::new(KEPT_ERRORS.0, KEPT_ERRORS.1);
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            while matches!(crate::joblog::read_line_bounded(&mut r, &mut buf), Ok(true)) {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                log.warn(format!("rsync: {line}"));
                kept.push(line);
            }
            kept.lines()
        });
        run_stdout(child, stop, err_thread, progress, &prog)
    })
}

fn run_stdout(
    mut child: std::process::Child,
    stop: crate::interrupt::StopOnSignal,
    err_thread: std::thread::ScopedJoinHandle<'_, Vec<String>>,
    progress: &Watch,
    prog: &str,
) -> Result<RsyncResult> {
    let watched = progress.is_watched();
    let mut stdout = child.stdout.take().unwrap();
    // Statistics come last, itemized names first: keep both ends, bounded.
    let mut out = crate::joblog::LineTail::new(KEPT_STDOUT, KEPT_STDOUT);
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let meter = watched.then(|| progress.meter("rsync", None));
    let mut total = Total::default();
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                match meter.as_ref().and_then(|m| Some((m, parse_progress(&line)?))) {
                    Some((m, (done, pct))) => m.set_with_total(done, total.update(done, pct)),
                    None => out.push(&String::from_utf8_lossy(&line)),
                }
                line.clear();
            } else if line.len() <= crate::joblog::MAX_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        out.push(&String::from_utf8_lossy(&line));
    }
    drop(meter);
    let status = child.wait().ctx(|| format!("cannot wait for {prog}"))?;
    // Reaped: never signalled again (its pid may be reused where there are no pidfds).
    drop(stop);
    let errors = err_thread.join().unwrap_or_default();
    let stdout_omitted = out.omitted();
    let mut stdout = out.lines().join("\n");
    stdout.push('\n');
    Ok(RsyncResult { code: status.code().unwrap_or(-1), stdout, stdout_omitted, errors })
}

/// A `--info=progress2` line (`  1,234,567  45%  12.34MB/s  0:00:05 (xfr#1, to-chk=0/2)`): the
/// bytes done and rsync's percentage.
fn parse_progress(l: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(l).ok()?;
    if !(s.contains("B/s") || s.contains("to-chk") || s.contains("xfr#")) {
        return None;
    }
    let mut w = s.split_whitespace();
    let done: u64 = w.next()?.replace(',', "").parse().ok()?;
    let pct: u64 = w.next()?.strip_suffix('%')?.parse().ok()?;
    Some((done, pct))
}

/// The total of a transfer, from rsync's whole percentages: each line bounds it (rsync rounds
/// down: `done / total` lies in `[pct, pct + 1)` percent), the bounds narrow as lines come, and
/// a total that grew (more files found) starts them afresh.
#[derive(Debug, Default)]
struct Total {
    lo: u64,
    hi: Option<u64>,
}

impl Total {
    fn update(&mut self, done: u64, pct: u64) -> Option<u64> {
        if pct == 0 || pct > 100 {
            return self.hi.map(|hi| (self.lo + hi) / 2);
        }
        let (lo, hi) = (done.saturating_mul(100) / (pct + 1) + 1, done.saturating_mul(100) / pct);
        let (lo, hi) = if pct == 100 { (done, done) } else { (lo, hi) };
        match self.hi {
            Some(h) if lo.max(self.lo) <= hi.min(h) => {
                self.lo = lo.max(self.lo);
                self.hi = Some(hi.min(h));
            }
            _ => {
                self.lo = lo;
                self.hi = Some(hi);
            }
        }
        self.hi.map(|hi| (self.lo + hi) / 2)
    }
}

/// The command line for the log (it holds no secrets, but keep it on one line).
fn redact_args(lead: &[String], args: &[OsString]) -> String {
    lead.iter()
        .map(|a| std::borrow::Cow::Borrowed(a.as_str()))
        .chain(args.iter().map(|a| a.to_string_lossy()))
        .map(|a| a.replace('\n', " "))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Free and used space (KiB) of the filesystem holding `path`.
pub fn df(path: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    let bs = s.f_frsize;
    let used = (s.f_blocks - s.f_bfree) * bs / 1024;
    let avail = s.f_bavail * bs / 1024;
    Some((used, avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_recognised() {
        assert_eq!(
            parse_progress(b"     33,554,432  50%   10.47MB/s    0:00:03 (xfr#1, to-chk=0/2)"),
            Some((33_554_432, 50))
        );
        assert_eq!(parse_progress(b"          0   0%    0.00kB/s    0:00:00"), Some((0, 0)));
        assert_eq!(parse_progress(b"Number of files: 3 (reg: 2, dir: 1)"), None);
        assert_eq!(parse_progress(b"Total bytes sent: 1,234"), None);
    }

    #[test]
    fn the_total_narrows_as_percentages_come() {
        let size = 50_331_648u64; // 48 MiB
        let mut t = Total::default();
        assert_eq!(t.update(0, 0), None);
        let mut last = 0;
        for done in (1..=size).step_by(1_000_003) {
            let est = t.update(done, done * 100 / size).unwrap_or(0);
            last = est;
        }
        assert!(last.abs_diff(size) < size / 200, "{last} for {size}");
        assert_eq!(t.update(size, 100), Some(size));
        // More files found: the total grows, the old bounds are dropped.
        assert_eq!(t.update(size, 50), Some((size * 100 / 51 + 1 + size * 2) / 2));
    }

    #[test]
    fn options_always_come_before_the_operands() {
        let mut a = Args::default();
        a.opt("--stats").from_local(["/a", "/b"]).to("/dest/");
        a.opt("--info=progress2").configured("--exclude x");
        assert_eq!(a.to_vec(), ["--stats", "--info=progress2", "--exclude", "x", "--", "/a", "/b", "/dest/"]);
    }

    #[test]
    fn only_0_and_24_succeed() {
        assert_eq!(classify(0), Outcome::Success);
        assert!(matches!(classify(24), Outcome::Warning(_)));
        assert!(matches!(classify(23), Outcome::Failure(m) if m.contains("partial transfer")));
        assert!(matches!(classify(11), Outcome::Failure(_)));
        assert!(matches!(classify(-1), Outcome::Failure(_)));
    }

    #[test]
    fn itemized_regular_files() {
        let out = "skipping non-regular file \"b-flat.vmdk\"\naffa-item:.f          :a-flat.vmdk\naffa-item:>f+++++++++:c d:e\naffa-item:cL+++++++++:l\nNumber of files: 2\n";
        let seen = regular_files(out);
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a-flat.vmdk", "c d:e"]);
    }
}
