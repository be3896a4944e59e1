//! ssh to the source host: options, the per-job known-hosts file, the key, remote commands.
//!
//! Owns: every ssh command line affa builds (a run's sessions share one connection: [`mux`]),
//! the time limits of remote and local commands ([`output_within`], [`finish_within`]), and the
//! deadline of a network exchange that moves a known number of bytes ([`deadline`]: a mail, a
//! request to the offsite bucket). Must never: use `StrictHostKeyChecking=no`, accept a new host
//! key except during `--send-key`'s first contact, let a child ssh/rsync outlive an affa that was
//! killed (children get `PR_SET_PDEATHSIG`), or wait on a remote command without a time limit
//! during a run (a wedged host must not hold the job's lock, nor keep a VM on its snapshot).

pub mod agent;
pub mod mux;
pub mod pace;
pub mod rsync;
pub mod rsyncd;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};

/// Everything needed to reach a job's source host over ssh.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub job: String,
    pub host: String,
    pub user: String,
    pub port: u16,
    pub ssh_bin: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub connect_timeout: u64,
    pub debug: bool,
    /// The run's ControlMaster socket ([`mux::Master`]): every session goes through its
    /// connection (and connects on its own when it is gone).
    pub control: Option<PathBuf>,
    /// `BandwidthLimit` (KiB/s, 0 = none): paces the agent's session ([`pace`]); rsync gets it
    /// as `--bwlimit`.
    pub bwlimit: u64,
    /// The host is an ESXi host (an ESXi job): ssh is asked for [`ESXI_CIPHERS`].
    pub esxi: bool,
}

/// The ciphers affa asks ssh for on an ESXi host, AES-GCM first. An ESXi host offers AES only
/// (vSphere Security guide: "SSH supports only 256-bit and 128-bit AES ciphers"), and among
/// those OpenSSH's default order takes AES-CTR with a separate MAC, which moves a disk at
/// about two thirds of AES-GCM's rate (an authenticated cipher with hardware support on every
/// CPU ESXi runs on; 300 against 196 MB/s through one ssh stream on the bench machine).
/// Listing only what the host offers loses nothing; other jobs keep ssh's own choice (their
/// hosts may lack AES instructions, where ChaCha20, OpenSSH's first choice, is the fast one).
pub const ESXI_CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// The private key affa uses for every job.
pub fn key_path(ssh_dir: &Path) -> PathBuf {
    ssh_dir.join("id_ed25519_affa")
}

/// glibc's malloc settings for the ssh processes affa starts (the run's master, the agent's
/// session, remote commands): fixed thresholds instead of glibc's dynamic ones.
///
/// OpenSSH grows and shrinks its packet and channel buffers as data passes; with glibc's default
/// (dynamic) mmap threshold those buffers are mapped and unmapped over and over, and each new
/// mapping is faulted in and zeroed page by page. Measured on the bench (BENCHMARKS.md): the
/// master that forwarded the 47 MB of a CBT incremental made 128 `munmap`s of 260 MB in all, was
/// the busiest process of the run, 38% of its time in page faults; with these settings the run
/// took 1.2 s instead of 1.5 s. Only the allocator's policy changes: ssh's options, checks and
/// behaviour are the same; a libc other than glibc ignores the variable (and glibc itself does
/// for set-user-ID programs). A `GLIBC_TUNABLES` in affa's own environment is left as it is.
pub const SSH_MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864";

/// Give an ssh command [`SSH_MALLOC_TUNABLES`], unless affa's environment sets its own.
pub fn ssh_env(cmd: &mut Command) {
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", SSH_MALLOC_TUNABLES);
    }
}

/// Make a child die with affa (a `kill -9` of affa must not leave an rsync writing on): it gets
/// `PR_SET_PDEATHSIG`, and it inherits the run's children marker (`crate::lock`), so that what
/// it forks itself and outlives a killed affa (rsync's receiver) is found and stopped by the
/// job's next run.
pub fn die_with_parent(cmd: &mut Command) {
    let marker = crate::lock::inheritable_marker();
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2) and
    // fcntl(2) on an fd number read before the fork, both async-signal-safe; it allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if marker >= 0 {
                libc::fcntl(marker, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
}

/// Most bytes of a child's stdout and of its stderr kept by [`output_within`]; the rest is read
/// and dropped (a host cannot fill the backup server's memory through a remote command).
pub const MAX_CAPTURE: usize = 1 << 20;

/// The least rate at which the bytes of a network exchange must move (a mail handed to the SMTP
/// server or to sendmail, a request to the offsite bucket): its [`deadline`] grants one second
/// per this many bytes (256 KiB/s, about 2 Mbit/s) on top of the floor its key sets.
pub const LEAST_RATE: u64 = 256 << 10;

/// The overall deadline of an exchange that moves `bytes`: `floor` (mailTimeout,
/// offsiteTimeout) plus one second per [`LEAST_RATE`] bytes. It bounds the whole exchange, not
/// the pause between two bytes: a server that trickles a byte now and then cannot stretch it.
pub fn deadline(floor: Duration, bytes: u64) -> Duration {
    floor.saturating_add(Duration::from_secs(bytes.div_ceil(LEAST_RATE)))
}

/// `r` read to its end, at most [`MAX_CAPTURE`] bytes of it kept (the rest is read and dropped).
fn read_bounded(r: impl std::io::Read) -> Vec<u8> {
    let kept = std::sync::Mutex::new(Vec::new());
    read_into(r, &kept);
    kept.into_inner().unwrap_or_default()
}

/// Read `r` to its end into `kept`, keeping at most [`MAX_CAPTURE`] bytes (the rest is read and
/// dropped); `kept` can be looked at while this runs.
fn read_into(mut r: impl std::io::Read, kept: &std::sync::Mutex<Vec<u8>>) {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Ok(mut k) = kept.lock() else { break };
                let room = MAX_CAPTURE.saturating_sub(k.len());
                k.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// What [`finish_within`] saw of a child: its exit status (None: it was still running at the
/// limit and was killed), and what it wrote to its stdout and stderr, when they were piped (at
/// most [`MAX_CAPTURE`] bytes of each; of a killed child, what it wrote until then).
pub struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A pipe of a child read to its end by a thread of its own, into a buffer.
struct Captured {
    kept: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Captured {
    fn start(r: impl std::io::Read + Send + 'static) -> Captured {
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let k = kept.clone();
        Captured { kept, reader: std::thread::spawn(move || read_into(r, &k)) }
    }

    fn take(c: Option<Captured>) -> Vec<u8> {
        c.and_then(|c| c.kept.lock().ok().map(|mut k| std::mem::take(&mut *k))).unwrap_or_default()
    }
}

/// Let the `child` that was just spawned (stdin piped when `input` is given, stdout and stderr
/// piped or not, in a process group of its own: `process_group(0)`) run for at most `limit`:
/// feed it `input`, capture its output, wait. Past the limit the child and its process group
/// are killed (`status` None). A SIGTERM to affa stops the child too. Once the child has
/// exited, its pipes are read until they close, but not past the limit: a process it left in
/// the background holding them open is not waited for.
pub fn finish_within(mut child: Child, input: Option<Vec<u8>>, limit: Duration, what: &str) -> Result<Finished> {
    use std::io::Write;
    let until = Instant::now().checked_add(limit);
    let pid = child.id();
    let _stop = crate::interrupt::stop_on_signal(pid);
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
        // Its own thread: a child that never reads must not block this one (its death, at
        // the limit at the latest, ends the write with EPIPE).
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let out = child.stdout.take().map(Captured::start);
    let err = child.stderr.take().map(Captured::start);
    let status = wait_until(&mut child, limit, what)?;
    if status.is_none() {
        // The whole process group this child leads (process_group(0)).
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // Reaped: never signalled again (its pid may be reused where there are no pidfds).
    drop(_stop);
    // The pipes close when the child and its group are gone; what it wrote is all read then.
    // A killed child's pipes get one more second; a process outside its group keeping them
    // open is not waited for past the limit.
    let until = match (status, until) {
        (None, _) => Some(Instant::now() + Duration::from_secs(1)),
        (Some(_), u) => u,
    };
    let mut pause = Duration::from_millis(1);
    while ![&out, &err].iter().all(|c| c.as_ref().is_none_or(|c| c.reader.is_finished())) {
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    Ok(Finished { status, stdout: Captured::take(out), stderr: Captured::take(err) })
}

/// Run `cmd` for at most `limit`, feeding `input` on its stdin, capturing stdout and stderr (at
/// most [`MAX_CAPTURE`] bytes each). Past the limit the child and its process group are killed
/// and the error names `what`, the seconds and the job key `key` that sets them. A SIGTERM to
/// affa stops the child too.
pub fn output_within(
    mut cmd: Command,
    input: Option<Vec<u8>>,
    limit: Duration,
    what: &str,
    key: &str,
) -> Result<Output> {
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    let child = cmd.spawn().ctx(|| format!("cannot start {what}"))?;
    let f = finish_within(child, input, limit, what)?;
    let Some(status) = f.status else {
        crate::bail!(
            Remote,
            "{what} did not finish within {} s and was stopped (the limit is the job key {key})",
            limit.as_secs()
        );
    };
    Ok(Output { status, stdout: f.stdout, stderr: f.stderr })
}

/// Wait until `child` exits (its status) or `limit` passes (None; the child runs on). The
/// exit is seen at once: the wait sleeps in poll(2) on the child's pidfd, which becomes readable
/// when it exits (a short remote command is seen done the moment it is; polling every 20 ms cost
/// 10 ms a wait on average, three waits a run). Without pidfds (Linux < 5.3) it polls, from 1 ms
/// up to every 20 ms. The pidfd is opened before the child is reaped, so it names that child.
pub fn wait_until(child: &mut Child, limit: Duration, what: &str) -> Result<Option<ExitStatus>> {
    // A limit too far away for an Instant (a "no limit" value) waits without one.
    let deadline = Instant::now().checked_add(limit);
    let pidfd = rustix::process::Pid::from_raw(child.id() as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let mut pause = Duration::from_millis(1);
    let mut sleep_instead = false;
    loop {
        if let Some(st) = child.try_wait().ctx(|| format!("cannot wait for {what}"))? {
            return Ok(Some(st));
        }
        // Polls and sleeps are cut at a day: the loop looks again after one.
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(86_400),
        };
        if left.is_zero() {
            return Ok(None);
        }
        let left = left.min(Duration::from_secs(86_400));
        match &pidfd {
            // Once the pidfd said "exited" while the child cannot be reaped yet (a tracer such
            // as strace holds it back), poll(2) would return at once forever: sleep instead.
            Some(fd) if !sleep_instead => {
                let ts = rustix::event::Timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as _ };
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                match rustix::event::poll(&mut fds, Some(&ts)) {
                    Ok(n) if n > 0 => sleep_instead = true,
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    // Any other error: poll by sleeping (the deadline stays in force).
                    Err(_) => sleep_instead = true,
                }
            }
            _ => {
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Quote a word for a POSIX shell (the remote side of ssh).
pub fn shell_quote(s: &str) -> String {
    // Only ASCII is added around the words: the quoted text is UTF-8 as `s` is.
    String::from_utf8(shell_quote_bytes(s.as_bytes())).expect("quoting keeps UTF-8")
}

/// Quote a word of any bytes (a file name need not be UTF-8) for a POSIX shell.
pub fn shell_quote_bytes(s: &[u8]) -> Vec<u8> {
    if !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(b)) {
        return s.to_vec();
    }
    let mut q = vec![b'\''];
    for &b in s {
        if b == b'\'' {
            q.extend_from_slice(b"'\\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

impl SshTarget {
    pub fn from_job(job: &Job, cfg: &Config) -> SshTarget {
        let ssh_dir = cfg.ssh_dir();
        SshTarget {
            job: job.name.clone(),
            host: job.host.clone(),
            user: job.ssh.user.clone(),
            port: job.ssh.port,
            ssh_bin: job.ssh.ssh_bin.clone(),
            key: key_path(&ssh_dir),
            known_hosts: ssh_dir.join(format!("knownhosts-{}", job.name)),
            connect_timeout: job.ssh.connect_timeout,
            debug: job.debug,
            control: None,
            bwlimit: job.rsync.bwlimit,
            esxi: job.esxi(),
        }
    }

    /// The same target, its sessions sharing the run's connection `control` (None: each
    /// session connects on its own).
    pub fn with_control(mut self, control: Option<PathBuf>) -> SshTarget {
        self.control = control;
        self
    }

    pub fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// Options of every connection after `--send-key`: our key only, no password prompt, and
    /// the host key must be the one recorded for this job.
    pub fn options(&self) -> Vec<String> {
        let mut o = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-o".into(),
            format!("HostKeyAlias={}", self.job),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "CheckHostIP=no".into(),
            "-o".into(),
            format!("IdentityFile={}", self.key.display()),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "PasswordAuthentication=no".into(),
            "-o".into(),
            "ServerAliveInterval=30".into(),
            "-o".into(),
            "ServerAliveCountMax=4".into(),
            "-o".into(),
            "HashKnownHosts=no".into(),
            "-o".into(),
            if self.debug { "LogLevel=DEBUG1".into() } else { "LogLevel=ERROR".into() },
        ];
        if self.esxi {
            o.extend(["-o".into(), format!("Ciphers={ESXI_CIPHERS}")]);
        }
        // A session, never a master of its own. A master that died during the run (the host
        // dropped the connection, a kill) leaves its socket refusing: such a session would print
        // "Control socket connect(...): Connection refused" before connecting directly, a line
        // that then reads as the cause of a later error. Only a socket that accepts is used.
        if let Some(p) = self.control.as_ref().filter(|p| std::os::unix::net::UnixStream::connect(p).is_ok()) {
            o.extend(["-o".into(), "ControlMaster=no".into(), "-o".into(), format!("ControlPath={}", p.display())]);
        }
        o
    }

    /// The `--rsh` value for rsync (rsync splits it on spaces and honours quotes).
    pub fn rsh(&self) -> String {
        let mut parts = vec![self.ssh_bin.clone()];
        parts.extend(self.options());
        parts.iter().map(|p| if p.contains(' ') { format!("'{p}'") } else { p.clone() }).collect::<Vec<_>>().join(" ")
    }

    fn command(&self, extra: &[String], remote: &str) -> Command {
        let mut c = Command::new(&self.ssh_bin);
        c.args(self.options()).args(extra).arg(self.destination()).arg(remote);
        c.stdin(Stdio::null());
        ssh_env(&mut c);
        die_with_parent(&mut c);
        c
    }

    /// The ssh command running `remote` on the host (for callers that feed it or time it).
    pub fn remote_command(&self, remote: &str) -> Command {
        self.command(&["-o".into(), format!("ConnectTimeout={}", self.connect_timeout)], remote)
    }

    /// The overall time limit of a short remote command (the connection check, removing the
    /// key): twice ConnectionCheckTimeout, the ssh connect timeout.
    pub fn short_limit(&self) -> Duration {
        Duration::from_secs(2 * self.connect_timeout.max(1))
    }

    /// Run a short remote shell command (at most [`short_limit`](Self::short_limit)); a failed
    /// connection becomes a clear error.
    pub fn run(&self, remote: &str) -> Result<Output> {
        let what = remote.split_whitespace().next().unwrap_or("").to_string();
        self.run_within(remote, None, self.short_limit(), "ConnectionCheckTimeout", &what)
    }

    /// Run a remote shell command with `input` on its stdin for at most `limit` (`key` is the
    /// job key that sets it and `what` names the command, for the message); a failed
    /// connection becomes a clear error.
    pub fn run_within(
        &self,
        remote: &str,
        input: Option<Vec<u8>>,
        limit: Duration,
        key: &str,
        what: &str,
    ) -> Result<Output> {
        let c = self.remote_command(remote);
        let out = output_within(c, input, limit, &format!("{what} on {}", self.host), key)?;
        if out.status.code() == Some(255) {
            return Err(self.connection_error(&String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out)
    }

    /// Like [`run`](Self::run), but a non-zero exit is an error quoting the remote's stderr.
    pub fn run_ok(&self, remote: &str, what: &str) -> Result<String> {
        self.run_ok_within(remote, what, self.short_limit(), "ConnectionCheckTimeout")
    }

    /// Like [`run_within`](Self::run_within) without input, a non-zero exit an error quoting
    /// the remote's stderr.
    pub fn run_ok_within(&self, remote: &str, what: &str, limit: Duration, key: &str) -> Result<String> {
        let out = self.run_within(remote, None, limit, key, what)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            bail!(Remote, "{what} on {} failed (exit {}): {first}", self.host, out.status.code().unwrap_or(-1));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pre-run check: can we log in with our key, and is the host who we think it is?
    pub fn check_connection(&self) -> Result<()> {
        let out = self.run("echo OK")?;
        if String::from_utf8_lossy(&out.stdout).trim() != "OK" {
            bail!(
                Remote,
                "ssh to {} (job {}) did not answer OK: {}",
                self.destination(),
                self.job,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn known(&self) -> bool {
        let alias = format!("{} ", self.job);
        std::fs::read_to_string(&self.known_hosts).map(|t| t.lines().any(|l| l.starts_with(&alias))).unwrap_or(false)
    }

    /// Turn ssh's stderr of a failed connection into one line that says what to do.
    pub fn connection_error(&self, stderr: &str) -> Error {
        let dest = format!("{}:{} (job {})", self.host, self.port, self.job);
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || (stderr.contains("Host key verification failed") && self.known())
        {
            return Error::remote(format!(
                "the host key of {dest} has CHANGED since it was recorded in {}: the host was replaced or someone is intercepting the connection; nothing was sent. If the change is expected, delete the line '{} ...' from that file and run affa --send-key {}",
                self.known_hosts.display(), self.job, self.job
            ));
        }
        if stderr.contains("Host key verification failed") {
            return Error::remote(format!(
                "no host key is recorded for {dest} in {}; run affa --send-key {} first",
                self.known_hosts.display(),
                self.job
            ));
        }
        if stderr.contains("Permission denied") {
            return Error::remote(format!(
                "ssh login to {} at {dest} with key {} was refused; run affa --send-key {}",
                self.user,
                self.key.display(),
                self.job
            ));
        }
        let first = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no answer");
        Error::remote(format!("cannot connect to {dest}: {first}"))
    }
}

/// Create affa's ed25519 key if there is none; return the public key line.
pub fn ensure_key(ssh_dir: &Path) -> Result<String> {
    let key = key_path(ssh_dir);
    let public = key.with_extension("pub");
    if !key.exists() {
        // 0700 from its creation (no moment in which it is open to others).
        crate::fsutil::create_private_dir(ssh_dir)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(ssh_dir, std::fs::Permissions::from_mode(0o700));
        let host = hostname();
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("affa@{host}"), "-f"])
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .ctx(|| "cannot run ssh-keygen".to_string())?;
        if !out.status.success() {
            bail!("ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    let line = std::fs::read_to_string(&public).ctx(|| format!("cannot read {}", public.display()))?;
    Ok(line.trim().to_string())
}

pub use affa_core::hostname;

/// `--send-key`: install our public key once in the remote authorized-keys file and record the
/// host key. The first contact accepts a new host key (and may ask for a password); a host key
/// already recorded must match.
pub fn send_key(t: &SshTarget, ssh_dir: &Path, authorized_keys: &str) -> Result<()> {
    let pubkey = ensure_key(ssh_dir)?;
    let f = shell_quote(authorized_keys);
    let k = shell_quote(&pubkey);
    let remote = format!(
        "umask 077; f={f}; d=$(dirname \"$f\"); mkdir -p \"$d\" && touch \"$f\" && (grep -qxF {k} \"$f\" || echo {k} >> \"$f\") && chmod 600 \"$f\" && echo AFFA-KEY-OK"
    );
    let first = !t.known();
    let mut c = Command::new(&t.ssh_bin);
    c.args(["-p", &t.port.to_string()])
        .args(["-o", &format!("HostKeyAlias={}", t.job)])
        .args(["-o", &format!("UserKnownHostsFile={}", t.known_hosts.display())])
        .args(["-o", if first { "StrictHostKeyChecking=accept-new" } else { "StrictHostKeyChecking=yes" }])
        .args(["-o", "CheckHostIP=no"])
        .args(["-o", "HashKnownHosts=no"])
        .args(["-o", "LogLevel=ERROR"])
        .args(["-o", &format!("ConnectTimeout={}", t.connect_timeout)])
        .args(["-o", &format!("IdentityFile={}", t.key.display())])
        .arg(t.destination())
        .arg(remote);
    die_with_parent(&mut c);
    let out = c.stderr(Stdio::piped()).output().ctx(|| format!("cannot run {}", t.ssh_bin))?;
    if out.status.code() == Some(255) {
        return Err(t.connection_error(&String::from_utf8_lossy(&out.stderr)));
    }
    if !String::from_utf8_lossy(&out.stdout).contains("AFFA-KEY-OK") {
        bail!(
            Remote,
            "could not install the key in {authorized_keys} on {}: {}",
            t.host,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Prove it: a connection with the strict options must now work.
    t.check_connection()
}

/// `--revoke-key`: remove exactly our key line from the remote authorized-keys file.
pub fn revoke_key(t: &SshTarget, ssh_dir: &Path, authorized_keys: &str) -> Result<()> {
    let public = key_path(ssh_dir).with_extension("pub");
    let pubkey = std::fs::read_to_string(&public).ctx(|| format!("cannot read {}", public.display()))?;
    let f = shell_quote(authorized_keys);
    let k = shell_quote(pubkey.trim());
    let remote = format!(
        "f={f}; [ -f \"$f\" ] || exit 0; grep -vxF {k} \"$f\" > \"$f.affa-tmp\"; cat \"$f.affa-tmp\" > \"$f\" && rm -f \"$f.affa-tmp\" && echo AFFA-REVOKED"
    );
    let out = t.run_ok(&remote, "removing the key")?;
    if !out.contains("AFFA-REVOKED") && !out.is_empty() {
        bail!(Remote, "could not remove the key from {authorized_keys} on {}", t.host);
    }
    Ok(())
}

/// The local rsync program and its leading args (nice, when localNice is not 0).
pub fn rsync_program(job: &Job) -> (String, Vec<String>) {
    let r = &job.rsync;
    if r.local_nice != 0 {
        (r.local_nice_bin.clone(), vec!["-n".into(), r.local_nice.to_string(), r.local_rsync_bin.clone()])
    } else {
        (r.local_rsync_bin.clone(), vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(control: Option<PathBuf>) -> SshTarget {
        SshTarget {
            job: "web".into(),
            host: "127.0.0.1".into(),
            user: "root".into(),
            port: 22,
            ssh_bin: "ssh".into(),
            key: "/k".into(),
            known_hosts: "/kh".into(),
            connect_timeout: 5,
            debug: false,
            control,
            bwlimit: 0,
            esxi: false,
        }
    }

    /// An ESXi host offers AES only: affa asks for AES-GCM first there (OpenSSH's own order
    /// would take AES-CTR with a MAC); other hosts keep ssh's choice.
    #[test]
    fn esxi_hosts_are_asked_for_aes_gcm_first() {
        let cipher_opts =
            |t: &SshTarget| -> Vec<String> { t.options().into_iter().filter(|o| o.starts_with("Ciphers=")).collect() };
        assert!(cipher_opts(&target(None)).is_empty());
        let esxi = SshTarget { esxi: true, ..target(None) };
        assert_eq!(cipher_opts(&esxi), [format!("Ciphers={ESXI_CIPHERS}")]);
        assert!(ESXI_CIPHERS.starts_with("aes128-gcm@openssh.com,"));
        assert!(ESXI_CIPHERS.split(',').all(|c| c.starts_with("aes")), "only what an ESXi host offers");
    }

    /// Sessions go through the run's master only while its socket accepts: a master that died
    /// (its socket left refusing, or gone) is not named, so ssh prints no "Control socket
    /// connect" line that a later error would take for its cause.
    #[test]
    fn only_a_socket_that_accepts_is_shared() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s");
        let named = |t: &SshTarget| t.options().iter().any(|o| o.starts_with("ControlPath="));
        assert!(!named(&target(Some(sock.clone()))), "a missing socket");
        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = target(Some(sock.clone()));
        assert!(named(&t) && t.options().contains(&"ControlMaster=no".to_string()), "a live socket: {:?}", t.options());
        assert!(t.rsh().contains(&format!("ControlPath={}", sock.display())));
        drop(live);
        assert!(sock.exists(), "the socket file stays, as after a killed master");
        assert!(!named(&target(Some(sock))), "a socket that refuses");
        assert!(!named(&target(None)));
    }
}
