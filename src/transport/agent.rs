//! affa-agent on the source host: where it lives, its deployment, a session over the job's ssh
//! (docs/PROTOCOL.md, "Deployment").
//!
//! Owns: the agent's remote path (`remoteAgentPath` or the derived default), the local agent
//! binary (`agentBinary`), starting `ssh ... DEST 'exec PATH --serve'` with exactly the options of
//! rsync's ssh (known_hosts checked, the child dies with affa), the hash check of the handshake,
//! installing the agent (temp file + rename, mode 0700) and telling why an agent cannot run
//! ([`Unavailable`]: the reason and the fix). Must never: run an agent whose hash is not the
//! local binary's (a stale one is replaced first), leave a half-copied agent at the path it
//! runs from, accept a new host key, or show the host's stderr other than as one escaped line.

use std::fmt;
use std::io::Read;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{die_with_parent, read_bounded, shell_quote, SshTarget};
use crate::chunk::remote::Agent;
use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};

/// The name of the agent's binary (installed, and next to affa).
pub const AGENT_NAME: &str = "affa-agent";
/// The default of `agentBinary` (the package's place).
pub const DEFAULT_LOCAL: &str = "/usr/lib/affa/affa-agent";

/// The local static agent affa installs: `agentBinary`; when that is the default and does not
/// exist, `affa-agent` next to the running affa executable.
pub fn local_binary(cfg: &Config) -> PathBuf {
    let set = cfg.settings.agent_binary.clone();
    if set != Path::new(DEFAULT_LOCAL) || set.exists() {
        return set;
    }
    std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(AGENT_NAME))).unwrap_or(set)
}

/// Where the agent lives on the job's source: `remoteAgentPath`, else for an ESXi job
/// `<datastore of the VM's .vmx>/.affa/affa-agent` (`datastore_dir`: the datastore's path on the
/// host, e.g. `/vmfs/volumes/datastore1`; /tmp on ESXi is a ramdisk), else
/// `.affa/affa-agent` in the remote user's home.
pub fn remote_path(job: &Job, datastore_dir: Option<&str>) -> String {
    if let Some(p) = &job.chunk.remote_agent_path {
        return p.clone();
    }
    match datastore_dir {
        Some(d) => format!("{}/.affa/{AGENT_NAME}", d.trim_end_matches('/')),
        None => format!(".affa/{AGENT_NAME}"),
    }
}

/// Why the agent cannot run on a host, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: String,
    pub fix: String,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; fix: {}", self.reason, self.fix)
    }
}

const FIX_RSYNC: &str = "set chunkTransport=rsync for this job";

/// Classify why `path` did not run on `host`, from ssh's exit code and stderr (the host's text:
/// shown escaped, one line).
pub fn classify(host: &str, path: &str, code: Option<i32>, stderr: &str) -> Unavailable {
    recognise(host, path, code, stderr).unwrap_or_else(|| {
        let line = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message");
        Unavailable {
            reason: format!(
                "affa-agent cannot run at {host}:{path} (exit {}): {}",
                code.map_or("-".into(), |c| c.to_string()),
                crate::untrusted::shown(line)
            ),
            fix: format!("check the host, or {FIX_RSYNC}"),
        }
    })
}

/// [`classify`] for the causes it knows (by the shell's or the kernel's message); None for
/// any other failure.
fn recognise(host: &str, path: &str, code: Option<i32>, stderr: &str) -> Option<Unavailable> {
    let line = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message");
    let line = crate::untrusted::shown(line);
    let at = format!("affa-agent cannot run at {host}:{path}");
    Some(if stderr.contains("Operation not permitted") {
        Unavailable {
            reason: format!("{at}: the host refuses binaries not installed as packages (ESXi execInstalledOnly: {line})"),
            fix: format!("on the host run 'esxcli system settings kernel set -s execInstalledOnly -v FALSE' and reboot, or set remoteAgentPath= to a place that allows exec, or {FIX_RSYNC}"),
        }
    } else if stderr.contains("cannot execute binary file") || stderr.contains("Exec format error") {
        Unavailable {
            reason: format!(
                "{at}: the host cannot run an x86_64 Linux binary (another architecture or system: {line})"
            ),
            fix: FIX_RSYNC.to_string(),
        }
    } else if code == Some(126) || stderr.contains("Permission denied") {
        Unavailable {
            reason: format!("{at}: execution is not permitted there (a noexec mount? {line})"),
            fix: format!("set remoteAgentPath= to a place that allows exec, or {FIX_RSYNC}"),
        }
    } else {
        return None;
    })
}

/// A running agent: the ssh child and the protocol session over its pipes. End it with
/// [`finish`](Self::finish) or [`stop`](Self::stop).
pub struct Session {
    child: Child,
    stderr: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
    pub agent: Agent<Watched, Paced>,
    watchdog: Watchdog,
    /// `HOST:PATH`, for messages.
    pub label: String,
    /// A SIGTERM/SIGINT to affa stops ssh, so the agent's read ends mid-disk (the run then
    /// removes its snapshot and fails as interrupted).
    _stop: crate::interrupt::StopOnSignal,
}

impl Session {
    /// Whether the watchdog stopped the agent: it sent nothing for the idle limit.
    pub fn timed_out(&self) -> bool {
        self.watchdog.state.fired.load(Ordering::SeqCst)
    }

    /// Whether the watchdog stopped the agent because it read nothing of what affa sent for the
    /// idle limit (a write to it waited that long).
    pub fn timed_out_writing(&self) -> bool {
        self.watchdog.state.fired_writing.load(Ordering::SeqCst)
    }

    /// The ssh child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `BYE`, then wait for ssh to end.
    pub fn finish(self) -> Result<()> {
        let Session { mut child, stderr, agent, label, watchdog, _stop } = self;
        let r = agent.bye();
        watchdog.end();
        // The agent ends after BYE; ssh with it. Never wait on a wedged host for long.
        let _ = super::wait_until(&mut child, Duration::from_secs(30), "ssh");
        let _ = child.kill();
        let _ = child.wait();
        // Reaped: never signalled again (its pid may be reused).
        drop(_stop);
        let text = collect(stderr);
        r.map_err(|e| with_stderr(e, &label, &text))
    }

    /// Stop the agent (after an error): kill ssh, return the first line it wrote on stderr,
    /// escaped (empty when none).
    pub fn stop(self) -> String {
        let Session { mut child, stderr, agent, watchdog, _stop, .. } = self;
        watchdog.end();
        drop(agent);
        let _ = child.kill();
        let _ = child.wait();
        drop(_stop);
        first_line(&collect(stderr))
    }
}

/// Read ssh's stderr on a thread; [`collect`] takes what it read.
fn read_stderr(e: std::process::ChildStderr) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_bounded(e));
    });
    rx
}

/// ssh's stderr once ssh ended, waiting at most 2 s for its end: a session through the run's
/// shared connection (`super::mux`) has its stderr held by the master until the host closes the
/// channel, which a stalled agent never does (the master closes it when the run ends).
fn collect(stderr: Option<std::sync::mpsc::Receiver<Vec<u8>>>) -> Vec<u8> {
    stderr.and_then(|r| r.recv_timeout(Duration::from_secs(2)).ok()).unwrap_or_default()
}

fn first_line(b: &[u8]) -> String {
    let t = String::from_utf8_lossy(b);
    t.lines().map(str::trim).find(|l| !l.is_empty()).map(crate::untrusted::shown).unwrap_or_default()
}

fn with_stderr(e: Error, label: &str, stderr: &[u8]) -> Error {
    let l = first_line(stderr);
    if l.is_empty() {
        e
    } else {
        Error::of(e.kind(), format!("{e} (stderr of {label}: {l})"))
    }
}

/// The agent's stdout, watched: while a read waits longer than the idle limit, the watchdog
/// kills ssh (a host whose agent stalls must not hold the run, or a VM on its snapshot). Paced
/// to `BandwidthLimit` (after each read, never during one).
pub struct Watched {
    inner: ChildStdout,
    state: Arc<WatchState>,
    pace: Option<super::pace::Pace>,
}

/// The agent's stdin, paced to `BandwidthLimit` (what a restore sends), and watched like its
/// stdout: a write that waits longer than the idle limit (an agent that stopped reading while it
/// goes on sending, until the pipes and ssh's window are full) has the watchdog kill ssh too.
pub struct Paced {
    inner: ChildStdin,
    state: Arc<WatchState>,
    pace: Option<super::pace::Pace>,
}

impl Paced {
    fn watched_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = self.state.base.elapsed().as_millis() as u64;
        self.state.write_since.store(now.max(1), Ordering::SeqCst);
        // At most 64 KiB a call: a blocking pipe write returns only when all of it is taken, so
        // the wait the watchdog measures is that of some progress, not of a whole 2 MiB frame
        // on a slow link.
        let r = self.inner.write(&buf[..buf.len().min(64 << 10)]);
        self.state.write_since.store(0, Ordering::SeqCst);
        r
    }
}

impl Write for Paced {
    /// Paced before the bytes go out, at most [`pace::Pace::slice`] bytes at a time: a frame of
    /// a chunk (up to 16 MiB) is never written in one burst.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(p) = self.pace.as_mut().filter(|_| !buf.is_empty()) else { return self.watched_write(buf) };
        let part = buf.len().min(p.slice());
        p.before(part);
        self.watched_write(&buf[..part])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct WatchState {
    base: Instant,
    /// Milliseconds after `base` at which the pending read began; 0: no read pending.
    since: AtomicU64,
    /// The same for the pending write to the agent's stdin.
    write_since: AtomicU64,
    done: AtomicBool,
    fired: AtomicBool,
    /// Fired by a write that waited (the agent stopped reading), not by a read.
    fired_writing: AtomicBool,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let now = self.state.base.elapsed().as_millis() as u64;
        self.state.since.store(now.max(1), Ordering::SeqCst);
        let r = self.inner.read(buf);
        self.state.since.store(0, Ordering::SeqCst);
        if let (Ok(n), Some(p)) = (&r, &mut self.pace) {
            p.after(*n);
        }
        r
    }
}

struct Watchdog {
    state: Arc<WatchState>,
}

impl Watchdog {
    /// Watch `pid` (ssh, its own process group leader is not needed: ssh's death closes the
    /// agent's stdin). `idle` zero: no limit.
    fn start(pid: u32, idle: Duration) -> (Watchdog, Arc<WatchState>) {
        let state = Arc::new(WatchState {
            base: Instant::now(),
            since: AtomicU64::new(0),
            write_since: AtomicU64::new(0),
            done: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            fired_writing: AtomicBool::new(false),
        });
        if !idle.is_zero() {
            let st = state.clone();
            std::thread::spawn(move || {
                while !st.done.load(Ordering::SeqCst) {
                    let now = st.base.elapsed().as_millis() as u64;
                    let stuck = |t: &AtomicU64| {
                        let since = t.load(Ordering::SeqCst);
                        since != 0 && now.saturating_sub(since) > idle.as_millis() as u64
                    };
                    let writing = stuck(&st.write_since);
                    if stuck(&st.since) || writing {
                        st.fired_writing.store(writing, Ordering::SeqCst);
                        st.fired.store(true, Ordering::SeqCst);
                        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        (Watchdog { state: state.clone() }, state)
    }

    fn end(&self) {
        self.state.done.store(true, Ordering::SeqCst);
    }
}

/// Start `ssh ... DEST 'exec PATH --serve'` with rsync's ssh options.
fn spawn(t: &SshTarget, path: &str) -> Result<Child> {
    let mut c = Command::new(&t.ssh_bin);
    c.args(t.options())
        .args(["-o".to_string(), format!("ConnectTimeout={}", t.connect_timeout)])
        .arg(t.destination())
        .arg(format!("exec {} --serve", shell_quote(path)));
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    super::ssh_env(&mut c);
    die_with_parent(&mut c);
    c.spawn().ctx(|| format!("cannot run {}", t.ssh_bin))
}

/// The result of one attempt to start the agent.
enum Attempt {
    Ready(Box<Session>),
    /// The handshake failed: ssh's exit code and stderr.
    Failed(Option<i32>, String),
}

fn attempt(t: &SshTarget, path: &str, idle: Duration) -> Result<Attempt> {
    let mut child = spawn(t, path)?;
    let stop = crate::interrupt::stop_on_signal(child.id());
    let err = child.stderr.take().map(read_stderr);
    let (out, inp) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let label = format!("{}:{path}", t.host);
    let (watchdog, state) = Watchdog::start(child.id(), idle);
    let (rx, tx) = (super::pace::Pace::kib_per_s(t.bwlimit), super::pace::Pace::kib_per_s(t.bwlimit));
    let paced = Paced { inner: inp, state: state.clone(), pace: tx };
    match Agent::connect(Watched { inner: out, state, pace: rx }, paced, &label) {
        Ok(agent) => Ok(Attempt::Ready(Box::new(Session { child, stderr: err, agent, label, watchdog, _stop: stop }))),
        Err(handshake) => {
            watchdog.end();
            // Its pipes are closed: the child ends (or is stopped after a while).
            let status = match super::wait_until(&mut child, t.short_limit(), "ssh") {
                Ok(Some(s)) => s.code(),
                _ => {
                    let _ = child.kill();
                    child.wait().ok().and_then(|s| s.code())
                }
            };
            // ssh's stderr tells why the agent did not start; when it is silent (a banner or
            // another program on stdout), the handshake's own error does ("not an affa agent:
            // the stream starts with ...").
            let text = String::from_utf8_lossy(&collect(err)).into_owned();
            let text = if text.trim().is_empty() { handshake.to_string() } else { text };
            Ok(Attempt::Failed(status, text))
        }
    }
}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 8];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::new(format!("cannot get random bytes: {e}")))?;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The local agent's bytes, or why there are none.
fn local_bytes(local: &Path) -> std::result::Result<Vec<u8>, Unavailable> {
    std::fs::read(local).map_err(|e| Unavailable {
        reason: format!("no local affa-agent to install: cannot read {} ({e})", local.display()),
        fix: format!("install affa's static agent there or set agentBinary= in [GlobalAffaConfig], or {FIX_RSYNC}"),
    })
}

/// Copy the local agent to `path` on the host: into `DIR/.affa-agent.tmp-<random>` (umask 077),
/// chmod 0700, then `mv -f` over `path` (a half-copied agent never runs).
fn deploy(t: &SshTarget, path: &str, bytes: Vec<u8>) -> Result<std::result::Result<(), Unavailable>> {
    let dir = match Path::new(path).parent().map(|d| d.to_string_lossy().into_owned()) {
        Some(d) if !d.is_empty() => d,
        _ => ".".to_string(),
    };
    let tmp = format!("{dir}/.affa-agent.tmp-{}", random_hex()?);
    let (d, tq, p) = (shell_quote(&dir), shell_quote(&tmp), shell_quote(path));
    let remote = format!(
        "umask 077; mkdir -p {d} && cat > {tq} && chmod 0700 {tq} && mv -f {tq} {p} && echo AFFA-AGENT-OK || {{ rm -f {tq}; exit 1; }}"
    );
    // The copy may take a while on a slow link: a generous limit, never none.
    let limit = t.short_limit().max(Duration::from_secs(600));
    let out = t.run_within(&remote, Some(bytes), limit, "ConnectionCheckTimeout", "installing affa-agent")?;
    if String::from_utf8_lossy(&out.stdout).contains("AFFA-AGENT-OK") {
        return Ok(Ok(()));
    }
    let line = first_line(&out.stderr);
    Ok(Err(Unavailable {
        reason: format!("cannot install affa-agent at {}:{path}: {line}", t.host),
        fix: format!("set remoteAgentPath= to a writable place that allows exec, or {FIX_RSYNC}"),
    }))
}

/// What [`start`] found.
pub enum Started {
    Ready(Box<Session>),
    Unavailable(Unavailable),
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    Installed,
    UpToDate,
}

/// Start the agent at `path` on the job's host; a missing or stale one (its hash is not the
/// local binary's) is installed from `local` first. `Err` is a failure of ssh itself (the
/// connection, the host key); an agent that cannot run there is [`Started::Unavailable`].
/// `idle`: the longest a read from the agent may wait (the job's rsyncTimeout; zero: none).
pub fn start(t: &SshTarget, path: &str, local: &Path, idle: Duration) -> Result<Started> {
    start_inner(t, path, local, idle).map(|(s, _)| s)
}

fn start_inner(t: &SshTarget, path: &str, local: &Path, idle: Duration) -> Result<(Started, Installed)> {
    let bytes = match local_bytes(local) {
        Ok(b) => b,
        Err(u) => return Ok((Started::Unavailable(u), Installed::UpToDate)),
    };
    let want = *blake3::hash(&bytes).as_bytes();
    let first = match attempt(t, path, idle)? {
        Attempt::Ready(s) if s.agent.exe_hash == want => return Ok((Started::Ready(s), Installed::UpToDate)),
        Attempt::Ready(s) => {
            let _ = s.finish();
            None
        }
        Attempt::Failed(Some(255), err) => return Err(t.connection_error(&err)),
        Attempt::Failed(code, err) => Some((code, err)),
    };
    // A signal stopped ssh: not a missing agent (the caller reports the interruption).
    if crate::interrupt::interrupted() {
        let (code, err) = first.unwrap_or((None, String::new()));
        return Ok((Started::Unavailable(classify(&t.host, path, code, &err)), Installed::UpToDate));
    }
    // Missing, stale or broken: install, then try once more.
    if let Err(u) = deploy(t, path, bytes)? {
        // Nothing could be installed: the first attempt's failure tells more when there was one.
        return Ok((
            Started::Unavailable(first.map_or(u.clone(), |(c, e)| pick(t, path, c, &e, u))),
            Installed::UpToDate,
        ));
    }
    match attempt(t, path, idle)? {
        Attempt::Ready(s) if s.agent.exe_hash == want => Ok((Started::Ready(s), Installed::Installed)),
        Attempt::Ready(s) => {
            let _ = s.finish();
            Ok((
                Started::Unavailable(Unavailable {
                    reason: format!(
                        "the affa-agent installed at {}:{path} reports another executable hash than {}",
                        t.host,
                        local.display()
                    ),
                    fix: format!("check what runs at that path on the host, or {FIX_RSYNC}"),
                }),
                Installed::Installed,
            ))
        }
        Attempt::Failed(Some(255), err) => Err(t.connection_error(&err)),
        Attempt::Failed(code, err) => {
            Ok((Started::Unavailable(classify(&t.host, path, code, &err)), Installed::Installed))
        }
    }
}

/// When the install failed after a failed start: a recognised reason of the start, else the
/// install's failure.
fn pick(t: &SshTarget, path: &str, code: Option<i32>, err: &str, install: Unavailable) -> Unavailable {
    recognise(&t.host, path, code, err).unwrap_or(install)
}

/// `--install-agent`: make sure the agent at `path` is the local one (installing it when it is
/// missing or stale) and that it runs.
pub fn install(t: &SshTarget, path: &str, local: &Path) -> Result<std::result::Result<Installed, Unavailable>> {
    Ok(match start_inner(t, path, local, t.short_limit())? {
        (Started::Ready(s), how) => {
            s.finish()?;
            Ok(how)
        }
        (Started::Unavailable(u), _) => Err(u),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's remote path: remoteAgentPath, else derived (the remote user's home; an ESXi
    /// job's datastore).
    #[test]
    fn the_remote_path_is_derived_when_remote_agent_path_is_empty() {
        let dir = Path::new("/nonexistent-affa-test/etc");
        let text = "[a]\nremoteHostName=h\n[b]\nremoteHostName=h\nremoteAgentPath=/srv/x/affa-agent\n";
        let c = Config::parse(dir, &[(dir.join("t.conf"), text.to_string())]).unwrap();
        let (a, b) = (c.job("a").unwrap(), c.job("b").unwrap());
        assert_eq!(remote_path(a, None), ".affa/affa-agent");
        assert_eq!(remote_path(a, Some("/vmfs/volumes/datastore1/")), "/vmfs/volumes/datastore1/.affa/affa-agent");
        assert_eq!(remote_path(b, Some("/vmfs/volumes/ds")), "/srv/x/affa-agent");
    }

    /// An agent that stops reading what affa sends (while it could go on sending, so that no
    /// read ever waits): the write that blocks is stopped by the watchdog, not waited on forever.
    #[test]
    fn a_write_the_agent_never_reads_is_stopped_by_the_watchdog() {
        let mut child = Command::new("sleep").arg("60").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let (watchdog, state) = Watchdog::start(child.id(), Duration::from_secs(1));
        let mut w = Paced { inner: child.stdin.take().unwrap(), state, pace: None };
        let t = Instant::now();
        let block = vec![0u8; 1 << 20];
        let mut r = Ok(());
        for _ in 0..64 {
            r = w.write_all(&block);
            if r.is_err() {
                break;
            }
        }
        assert!(r.is_err(), "64 MiB went into a pipe nobody reads");
        assert!(t.elapsed() < Duration::from_secs(10), "the write waited {:?}", t.elapsed());
        assert!(watchdog.state.fired.load(Ordering::SeqCst) && watchdog.state.fired_writing.load(Ordering::SeqCst));
        watchdog.end();
        let _ = child.wait();
    }

    #[test]
    fn classify_names_reason_and_fix() {
        let u = classify("h", "/p/affa-agent", Some(126), "sh: /p/affa-agent: Operation not permitted\n");
        assert!(u.reason.contains("execInstalledOnly"), "{u}");
        assert!(u.fix.contains("esxcli system settings kernel set -s execInstalledOnly -v FALSE"), "{u}");
        let u = classify("h", "/p/a", Some(126), "bash: line 1: /p/a: Permission denied\n");
        assert!(u.reason.contains("noexec"), "{u}");
        assert!(u.fix.contains("remoteAgentPath"), "{u}");
        let u = classify("h", "/p/a", Some(126), "bash: /p/a: cannot execute binary file: Exec format error");
        assert!(u.reason.contains("architecture"), "{u}");
        let u = classify("h", "/p/a", Some(1), "evil\x1b[31m\nsecond");
        assert!(!u.to_string().contains('\x1b') && !u.to_string().contains('\n'), "{u}");
    }
}
