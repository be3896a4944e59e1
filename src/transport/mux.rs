//! One ssh connection per run: an explicit ControlMaster (`ssh -M -N`) that every ssh session
//! of the run (the connection check, remote commands, rsync's `--rsh`, the agent) shares, so a
//! run pays one key exchange and one login instead of one per session.
//!
//! Owns: the master process, its control socket and the socket's private directory. Must never:
//! put the socket where another user can reach, plant or predict it (a 0700 directory of the
//! running user under the checked lock directory, or a `mkdtemp(3)` one), let the master outlive
//! the run (it is stopped when [`Master`] drops, on every path out of the run, and dies with
//! affa through `PR_SET_PDEATHSIG`), hand the master a pipe of affa's (its stdin and stdout are
//! /dev/null, its stderr a private file: a reader waiting for EOF on a pipe the master holds
//! would hang), or change what ssh checks (the master connects with exactly the job's options:
//! host key, key, port, ssh binary). When the master cannot start, the run goes on without it
//! (every session connects on its own, as before); when it dies during the run, the sessions
//! that follow connect on their own (`ControlMaster=no` falls back to a direct connection).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::transport::{die_with_parent, ssh_env, SshTarget};

/// `sun_path` holds 108 bytes; ssh binds the socket under a temporary name (the path plus a
/// dot and 16 random characters) before it renames it.
const MAX_SOCKET_PATH: usize = 107 - 17;

/// A running ControlMaster of one run. Stopped (and its directory removed) when dropped.
#[derive(Debug)]
pub struct Master {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    /// How long the master took to connect and log in.
    pub started_in: Duration,
}

/// Characters ssh and rsync's `--rsh` splitting take literally in a ControlPath (ssh expands
/// `%` tokens and a leading `~`; rsync splits on spaces).
fn plain_path(p: &Path) -> bool {
    p.to_str().is_some_and(|s| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b)))
}

/// The private directory of the socket: `lockDir/.ssh.JOB` (the lock directory is checked by
/// `crate::lock`: the running user's, writable by no one else; the run holds the job's lock, so
/// no other run of the job uses it; a leftover of a killed run is removed first), or a fresh
/// `mkdtemp` directory when that path does not fit a socket address.
fn private_dir(lock_dir: &Path, job: &str) -> std::io::Result<PathBuf> {
    let dir = lock_dir.join(format!(".ssh.{job}"));
    if plain_path(&dir) && dir.join("s").as_os_str().len() <= MAX_SOCKET_PATH {
        // Opened through the checks of the lock directory (owner, mode, no symlink).
        crate::lock::open_dir(lock_dir, false).map_err(|e| std::io::Error::other(e.to_string()))?;
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dir)?,
            Ok(_) => fs::remove_file(&dir)?,
            Err(_) => {}
        }
        rustix::fs::mkdir(&dir, rustix::fs::Mode::from_raw_mode(0o700))?;
        return Ok(dir);
    }
    let mut template = std::env::temp_dir().join("affa-ssh.XXXXXX").into_os_string().into_encoded_bytes();
    if !plain_path(Path::new(std::str::from_utf8(&template).unwrap_or(" "))) || template.len() + 2 > MAX_SOCKET_PATH {
        template = b"/tmp/affa-ssh.XXXXXX".to_vec();
    }
    template.push(0);
    // SAFETY: `template` is a NUL-terminated buffer that mkdtemp(3) rewrites in place (the six
    // X's, same length); it lives across the call and nothing else refers to it.
    let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    template.pop();
    Ok(PathBuf::from(String::from_utf8_lossy(&template).into_owned()))
}

impl Master {
    /// Connect the master for `t` (whose own control path is ignored) with its socket in a
    /// private directory (see [`private_dir`]); wait until it accepts sessions, at most the
    /// target's short limit. `Err` says why there is none (the run goes on without it).
    pub fn start(t: &SshTarget, lock_dir: &Path) -> std::result::Result<Master, String> {
        let t0 = Instant::now();
        let dir = private_dir(lock_dir, &t.job).map_err(|e| format!("cannot create its socket directory: {e}"))?;
        let socket = dir.join("s");
        let log = dir.join("log");
        let remove = |dir: &Path| {
            let _ = fs::remove_dir_all(dir);
        };
        let err = match fs::OpenOptions::new().write(true).create_new(true).open(&log) {
            Ok(f) => f,
            Err(e) => {
                remove(&dir);
                return Err(format!("cannot create {}: {e}", log.display()));
            }
        };
        let plain = SshTarget { control: None, ..t.clone() };
        let mut c = Command::new(&t.ssh_bin);
        c.args(plain.options())
            .args(["-o".to_string(), format!("ConnectTimeout={}", t.connect_timeout)])
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no"])
            .arg("-o")
            .arg(format!("ControlPath={}", socket.display()))
            .args(["-N", "-T"])
            .arg(t.destination());
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        // Not in affa's process group: a Ctrl-C on the terminal stops affa's current child, not
        // the connection the run still needs to clean up (vim-cmd's snapshot removal).
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        ssh_env(&mut c);
        die_with_parent(&mut c);
        let mut child = match c.spawn() {
            Ok(c) => c,
            Err(e) => {
                remove(&dir);
                return Err(format!("cannot run {}: {e}", t.ssh_bin));
            }
        };
        let limit = t.short_limit();
        let mut pause = Duration::from_millis(1);
        loop {
            if socket.exists() {
                return Ok(Master { child, dir, socket, started_in: t0.elapsed() });
            }
            let ended = match child.try_wait() {
                Ok(Some(st)) => Some(format!("ssh exited ({st})")),
                Ok(None) if t0.elapsed() >= limit => Some(format!("no connection within {} s", limit.as_secs())),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for ssh: {e}")),
            };
            if let Some(why) = ended {
                let _ = child.kill();
                let _ = child.wait();
                let text = fs::read_to_string(&log).unwrap_or_default();
                remove(&dir);
                let first = text.lines().map(str::trim).find(|l| !l.is_empty());
                return Err(match first {
                    Some(l) => format!("{why}: {}", crate::untrusted::shown(l)),
                    None => why,
                });
            }
            // Every 2 ms at most: the socket appears once ssh has logged in (~0.25 s here), and
            // a later look delays the whole run (a stat(2) costs microseconds).
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// The control socket, for the sessions' `ControlPath`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop the master (SIGTERM: it closes the connection and removes its socket; SIGKILL after
    /// a second) and remove the directory. Returns, when the master had ended before (the
    /// connection dropped during the run), the first line it wrote.
    pub fn stop(mut self) -> Option<String> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<String> {
        let early = match self.child.try_wait() {
            Ok(Some(st)) => {
                let text = fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                let first = text.lines().map(str::trim).find(|l| !l.is_empty()).map(crate::untrusted::shown);
                Some(first.unwrap_or_else(|| format!("ssh exited ({st})")))
            }
            _ => None,
        };
        if early.is_none() {
            if let Some(p) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            let t0 = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
            self.dir = PathBuf::new();
        }
        early
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = self.stop_inner();
        }
    }
}
