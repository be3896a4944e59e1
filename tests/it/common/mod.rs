//! Test fixtures: a real OpenSSH sshd on 127.0.0.1 (a free high port, its own host key and
//! authorized-keys files in a temp dir), and an affa configuration whose state directories all
//! live in temp dirs. Nothing here touches the machine's own sshd or /root/.ssh.
//!
//! Owns: what every area of the tests shares: [`Sshd::shared`] (one sshd per test process, each
//! user with an authorized-keys file of its own), [`Sshd::start`] (a private one, for a test that
//! stops, restarts or reconfigures its sshd), [`Daemon`] (a server a test starts ends with the
//! test process, however that ends), [`wait_until`] (waiting on a condition with a deadline).
//! Must never: let one test see another's keys or files, leave a process or a temp dir behind,
//! or wait a fixed time for something that can be watched.
#![allow(dead_code)]

pub mod ceph;
pub mod esx;
pub mod host_input;
pub mod hostile_esx;
pub mod s3_front;
pub mod sim;
pub mod smb;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

// ---------------------------------------------------------------- waiting

/// Check `f` until it gives a value, at first every millisecond, then less often, at least every
/// `every`; None when `deadline` passed first.
pub fn poll<T>(deadline: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1).min(every);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(every);
    }
}

/// Run `cmd` (stdout and stderr captured), which must end within `secs` seconds: killed, and
/// the test failed, otherwise. Its output and how long it took.
pub fn output_within(mut cmd: Command, secs: u64) -> (Output, Duration) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not end within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    (child.wait_with_output().unwrap(), took)
}

/// Wait until `f` gives a value and return it; panic naming `what` when `deadline` passes first.
pub fn wait_for<T>(deadline: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll(deadline, Duration::from_millis(50), f)
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// Wait until `cond` holds; panic naming `what` when `deadline` passes first.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(deadline, what, || cond().then_some(()))
}

/// Wait until `cond` holds, checking it every `every` (a loop that samples something while it
/// waits); panic naming `what` when `deadline` passes first.
pub fn sample_until(deadline: Duration, every: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(every);
    }
}

// ---------------------------------------------------------------- processes

/// Processes whose parent is `pid`: (pid, command name), from /proc.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
        let Some((head, tail)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map(|x| x.1).unwrap_or("").to_string();
        let ppid: u32 = tail.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        if ppid == pid {
            v.push((e.file_name().to_string_lossy().parse().unwrap_or(0), comm));
        }
    }
    v
}

/// Every descendant of `pid` (pid list), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
        let Some((_, tail)) = stat.rsplit_once(')') else { continue };
        let pp: u32 = tail.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        parent.insert(p, pp);
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut q = p;
            for _ in 0..64 {
                if q == pid {
                    return true;
                }
                match parent.get(&q) {
                    Some(&x) if x != 0 => q = x,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Bytes read so far (`rchar` of /proc/PID/io: files and pipes) by the processes named `name`
/// among the descendants of `pid`: how far a transfer by `pid`'s rsync has come.
pub fn bytes_read_by(pid: u32, name: &str) -> u64 {
    descendants(pid)
        .into_iter()
        .filter(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == name))
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/io")).ok())
        .filter_map(|io| io.lines().find_map(|l| l.strip_prefix("rchar:")).and_then(|v| v.trim().parse::<u64>().ok()))
        .sum()
}

/// Send `sig` to the process `pid` (a child of the test, or a process it watched).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).expect("a pid"), sig);
}

/// Is `pid` a live process (not gone, not a zombie)?
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, t)| t.split_whitespace().next()).is_some_and(|s| s != "Z"),
        Err(_) => false,
    }
}

/// affa's library run in the test process (tests/it/rotation.rs calls `affa::run::run`) installs
/// affa's SIGINT/SIGTERM/SIGHUP handlers, which only set a flag: the test process would then
/// outlive a Ctrl-C on the terminal. This keeps the signals' default action as well.
pub fn keep_default_signal_actions() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let always = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            signal_hook::flag::register_conditional_default(sig, always).expect("signal handler");
        }
    });
}

/// The `sh` a [`Daemon`] runs under: it starts the server (`"$@"`), waits for end-of-file on its
/// stdin, then stops the server, waits for it and removes the directory `$DAEMON_REMOVE` (if
/// set). Also on a signal to the group.
const DAEMON_SH: &str = r#""$@" </dev/null &
p=$!
stop() { kill "$p" 2>/dev/null; wait "$p"; [ -z "$DAEMON_REMOVE" ] || rm -rf -- "$DAEMON_REMOVE"; exit 0; }
trap stop INT TERM HUP
read -r _
stop
"#;

/// A server process a test started (sshd, ssh-agent, smbd, an SMTP server, an rsync daemon). It
/// runs under a small `sh` whose stdin only this process holds: it stops when the handle is
/// dropped or [`Daemon::stop`]ped, and when the test process ends in any way (end of the run, a
/// panic, SIGKILL: the pipe closes). It has a process group of its own, so a Ctrl-C on the
/// terminal stops the test process, and the daemon with it, rather than the daemon alone.
pub struct Daemon {
    sh: Child,
}

impl Daemon {
    /// Start `cmd` (its program, arguments and environment) with stdout and stderr appended to
    /// `log`.
    pub fn start(cmd: &Command, log: &Path) -> Daemon {
        Daemon::start_removing(cmd, log, None)
    }

    /// As [`Daemon::start`]; once it has stopped, `remove` (a shared fixture's temp dir, which no
    /// Drop removes) is deleted.
    pub fn start_removing(cmd: &Command, log: &Path, remove: Option<&Path>) -> Daemon {
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c").arg(DAEMON_SH).arg("sh").arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            sh.current_dir(d);
        }
        sh.env("DAEMON_REMOVE", remove.map(Path::as_os_str).unwrap_or(OsStr::new("")));
        let out = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        sh.stdin(Stdio::piped()).stdout(out.try_clone().unwrap()).stderr(out).process_group(0);
        let sh = sh.spawn().unwrap_or_else(|e| panic!("cannot start /bin/sh for {:?}: {e}", cmd.get_program()));
        Daemon { sh }
    }

    /// Stop the server and wait until it is gone.
    pub fn stop(&mut self) {
        drop(self.sh.stdin.take());
        let _ = self.sh.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until a server accepts connections on 127.0.0.1:`port`; after `deadline`, panic naming
/// `what` with the server's `log`.
pub fn wait_listening(port: u16, deadline: Duration, what: &str, log: &Path) {
    let up =
        poll(deadline, Duration::from_millis(50), || TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()));
    assert!(up.is_some(), "{what} did not start: {}", fs::read_to_string(log).unwrap_or_default());
}

/// Remove `dir` when the test process ends (a shared fixture's temp dir, which no Drop removes:
/// statics are never dropped), by a small `sh` that waits for end-of-file on its stdin.
pub fn remove_at_exit(dir: &Path) {
    // The cleaner is never waited for: it outlives this process.
    static CLEANER: LazyLock<Mutex<Child>> = LazyLock::new(|| {
        let c = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"set --; while IFS= read -r d; do set -- "$@" "$d"; done; rm -rf -- "$@""#)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("/bin/sh");
        Mutex::new(c)
    });
    let mut c = CLEANER.lock().unwrap_or_else(|e| e.into_inner());
    writeln!(c.stdin.as_mut().unwrap(), "{}", dir.display()).unwrap();
}

// ---------------------------------------------------------------- sshd

pub fn whoami() -> String {
    static NAME: LazyLock<String> = LazyLock::new(|| {
        let out = Command::new("id").arg("-un").output().expect("id");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    });
    NAME.clone()
}

/// A free port on 127.0.0.1, never one this process handed out before (tests run in parallel
/// threads: two of them must not get the same port between its release here and its use).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(p) {
            return p;
        }
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (install openssh-client)");
    assert!(st.success());
}

/// The authorized-keys files of the shared sshd: one per test that uses it at the same time.
const SHARED_KEY_FILES: usize = 64;

/// A sshd's directory: its host key, the "administrator's" bootstrap key (authorized by
/// `bootstrap_keys`), and the sshd_config read by [`launch_sshd`], which also authorizes the keys
/// in the files `key_files` names (given the directory).
fn sshd_dir(prefix: &str, key_files: impl Fn(&Path) -> Vec<PathBuf>, extra_config: &str) -> TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("host_ed25519"));
    keygen(&d.join("bootstrap"));
    fs::copy(d.join("bootstrap.pub"), d.join("bootstrap_keys")).unwrap();
    let files: Vec<String> =
        std::iter::once(d.join("bootstrap_keys")).chain(key_files(d)).map(|p| p.display().to_string()).collect();
    // `extra_config` first: sshd takes the first value of a keyword (a test's `LogLevel INFO`
    // wins over the default `LogLevel ERROR`).
    let cfg = format!(
        "{extra_config}ListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {}\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\nLogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 50\nSubsystem sftp internal-sftp\n",
        files.join(" "),
        d = d.display()
    );
    fs::write(d.join("sshd_config"), cfg).unwrap();
    if is_root() {
        let _ = fs::create_dir_all("/run/sshd");
    }
    dir
}

/// Start the sshd of `dir` on `port` and wait until it accepts connections.
fn launch_sshd(dir: &Path, port: u16, remove: Option<&Path>) -> Daemon {
    let mut c = Command::new("/usr/sbin/sshd");
    c.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config")).arg("-o").arg(format!("Port={port}"));
    let log = dir.join("sshd.log");
    let daemon = Daemon::start_removing(&c, &log, remove);
    wait_listening(port, Duration::from_secs(10), "sshd (install openssh-server)", &log);
    daemon
}

/// An ssh-agent holding `key`; returns it and its socket.
fn start_agent(dir: &Path, key: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("agent.sock");
    let mut c = Command::new("ssh-agent");
    c.arg("-D").arg("-a").arg(&sock);
    let agent = Daemon::start(&c, &dir.join("agent.log"));
    // The socket file appears before the agent accepts connections: ssh-add until it takes it.
    wait_until(Duration::from_secs(10), "ssh-agent to take the bootstrap key (ssh-add)", || {
        sock.exists()
            && Command::new("ssh-add")
                .arg("-q")
                .arg(key)
                .env("SSH_AUTH_SOCK", &sock)
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
    });
    (agent, sock)
}

/// The sshd the tests share, one per test process (started at its first use, stopped and its
/// directory removed when the process ends), with an ssh-agent holding its bootstrap key.
struct SharedSshd {
    dir: PathBuf,
    port: u16,
    agent_sock: PathBuf,
    /// Which of the authorized-keys files `dir/keys/N` are in use.
    in_use: Mutex<[bool; SHARED_KEY_FILES]>,
    _daemons: (Daemon, Daemon),
}

static SHARED_SSHD: LazyLock<SharedSshd> = LazyLock::new(|| {
    let keys = |d: &Path| (0..SHARED_KEY_FILES).map(|i| d.join(format!("keys/{i}"))).collect();
    let dir = sshd_dir("affa-sshd-shared", keys, "").keep();
    fs::create_dir(dir.join("keys")).unwrap();
    let port = free_port();
    let sshd = launch_sshd(&dir, port, Some(&dir));
    let (agent, agent_sock) = start_agent(&dir, &dir.join("bootstrap"));
    SharedSshd { dir, port, agent_sock, in_use: Mutex::new([false; SHARED_KEY_FILES]), _daemons: (agent, sshd) }
});

/// A private sshd ([`Sshd::start`]): its directory, its server, its agent.
/// (Fields drop in this order: the processes stop before their directory goes.)
struct OwnSshd {
    daemon: Option<Daemon>,
    agent: Option<(Daemon, PathBuf)>,
    dir: TempDir,
}

/// A sshd on 127.0.0.1 for one test: a private one ([`Sshd::start`]) or the shared one
/// ([`Sshd::shared`]). Dropping it stops a private one and gives back the shared one's
/// authorized-keys file.
pub struct Sshd {
    pub port: u16,
    pub user: String,
    /// The file affa's --send-key writes to (the job's RemoteAuthorizedKeysFile): the test's own,
    /// also on the shared sshd.
    pub authorized_keys: PathBuf,
    /// A key the "administrator" holds, standing in for the password typed at --send-key.
    pub bootstrap_key: PathBuf,
    own: Option<OwnSshd>,
    /// The shared sshd's authorized-keys file this test holds.
    slot: Option<usize>,
}

impl Sshd {
    /// The shared sshd, with an authorized-keys file of this test's own (empty at first). For
    /// every test that does not stop, restart or reconfigure its sshd.
    pub fn shared() -> Sshd {
        let s = &*SHARED_SSHD;
        let slot = {
            let mut used = s.in_use.lock().unwrap_or_else(|e| e.into_inner());
            let i = used
                .iter()
                .position(|u| !u)
                .unwrap_or_else(|| panic!("more than {SHARED_KEY_FILES} tests use the shared sshd at once"));
            used[i] = true;
            i
        };
        let authorized_keys = s.dir.join(format!("keys/{slot}"));
        let _ = fs::remove_file(&authorized_keys);
        Sshd {
            port: s.port,
            user: whoami(),
            authorized_keys,
            bootstrap_key: s.dir.join("bootstrap"),
            own: None,
            slot: Some(slot),
        }
    }

    /// A private sshd, for a test that stops, restarts or changes it.
    pub fn start() -> Sshd {
        Sshd::start_with("")
    }

    /// A private sshd with extra sshd_config lines (e.g. `SetEnv PATH=...` for the sessions).
    pub fn start_with(extra_config: &str) -> Sshd {
        let (user, port) = (whoami(), free_port());
        let dir = sshd_dir("affa-sshd", |d| vec![d.join("authorized_keys")], extra_config);
        let d = dir.path().to_path_buf();
        let daemon = launch_sshd(&d, port, None);
        Sshd {
            port,
            user,
            authorized_keys: d.join("authorized_keys"),
            bootstrap_key: d.join("bootstrap"),
            own: Some(OwnSshd { daemon: Some(daemon), agent: None, dir }),
            slot: None,
        }
    }

    fn own(&mut self, what: &str) -> &mut OwnSshd {
        self.own
            .as_mut()
            .unwrap_or_else(|| panic!("{what}: the shared sshd is not changed; this test needs Sshd::start()"))
    }

    pub fn stop(&mut self) {
        if let Some(d) = self.own("stop").daemon.take() {
            drop(d);
        }
    }

    /// Restart on the same port with the same host key.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let o = self.own("restart");
        o.daemon = Some(launch_sshd(o.dir.path(), port, None));
    }

    /// The host is "replaced": a new host key, same address.
    pub fn change_host_key(&mut self) {
        self.stop();
        let port = self.port;
        let o = self.own("change_host_key");
        let hk = o.dir.path().join("host_ed25519");
        fs::remove_file(&hk).unwrap();
        fs::remove_file(hk.with_extension("pub")).unwrap();
        keygen(&hk);
        o.daemon = Some(launch_sshd(o.dir.path(), port, None));
    }

    /// The log of a private sshd (its stderr: `sshd -e`).
    pub fn log(&self) -> PathBuf {
        self.own.as_ref().expect("the log of a private sshd (Sshd::start_with)").dir.path().join("sshd.log")
    }

    /// How many logins (key exchange and public-key authentication: `Accepted publickey`) the
    /// private sshd logged; it needs `LogLevel INFO` (`Sshd::start_with("LogLevel INFO\n")`).
    pub fn logins(&self) -> usize {
        fs::read_to_string(self.log()).unwrap_or_default().lines().filter(|l| l.contains("Accepted publickey")).count()
    }

    /// An ssh-agent holding the bootstrap key: SSH_AUTH_SOCK for `affa --send-key`.
    pub fn agent_socket(&mut self) -> PathBuf {
        let key = self.bootstrap_key.clone();
        match self.own.as_mut() {
            None => SHARED_SSHD.agent_sock.clone(),
            Some(o) => {
                if o.agent.is_none() {
                    o.agent = Some(start_agent(o.dir.path(), &key));
                }
                o.agent.as_ref().unwrap().1.clone()
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let _ = fs::remove_file(&self.authorized_keys);
            SHARED_SSHD.in_use.lock().unwrap_or_else(|e| e.into_inner())[i] = false;
        }
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The statically linked affa-agent (scripts/build-agent.sh; scripts/test.sh builds it before
/// the tests, and it is built here once when it is missing).
pub fn static_agent() -> PathBuf {
    static AGENT: LazyLock<PathBuf> = LazyLock::new(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = root.join("target/x86_64-unknown-linux-gnu/release/affa-agent");
        if !p.exists() {
            let st = Command::new(root.join("scripts/build-agent.sh")).stdout(Stdio::null()).status().unwrap();
            assert!(st.success() && p.exists(), "scripts/build-agent.sh did not build {}", p.display());
        }
        p
    });
    AGENT.clone()
}

/// An affa setup: config dir, RootDir, state dirs, all in one temp dir.
pub struct Affa {
    pub tmp: TempDir,
    pub conf: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
}

impl Affa {
    pub fn new() -> Affa {
        let tmp = tempfile::Builder::new().prefix("affa-test").tempdir().unwrap();
        let conf = tmp.path().join("etc");
        let root = tmp.path().join("backup");
        let state = tmp.path().join("state");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&state).unwrap();
        let a = Affa { tmp, conf, root, state };
        a.write_conf(
            "00-global.conf",
            &format!(
                "[GlobalAffaConfig]\nlockDir={s}/lock\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nRootDir={r}\nagentBinary={g}\n",
                s = a.state.display(),
                r = a.root.display(),
                g = static_agent().display()
            ),
        );
        a
    }

    pub fn write_conf(&self, name: &str, text: &str) {
        let p = self.conf.join(name);
        fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A job section pulling from the sshd.
    pub fn ssh_job(&self, name: &str, sshd: &Sshd, extra: &str) -> String {
        format!(
            "[{name}]\nremoteHostName=127.0.0.1\nsshPort={}\nremoteUser={}\nRemoteAuthorizedKeysFile={}\nrsyncCompress=no\nConnectionCheckTimeout=10\n{extra}",
            sshd.port,
            sshd.user,
            sshd.authorized_keys.display()
        )
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_affa"));
        c.arg("--config-dir")
            .arg(&self.conf)
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("AFFA_FAKE_NOW")
            .stdin(Stdio::null());
        c
    }

    pub fn affa(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    pub fn affa_at(&self, now: &str, args: &[&str]) -> Output {
        self.cmd().env("AFFA_FAKE_NOW", now).args(args).output().unwrap()
    }

    /// `affa --send-key JOB` authenticated by the sshd's bootstrap key in an agent.
    pub fn send_key(&self, sshd: &mut Sshd, job: &str) -> Output {
        let sock = sshd.agent_socket();
        self.cmd().env("SSH_AUTH_SOCK", sock).args(["--send-key", job]).output().unwrap()
    }

    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join(job)
    }
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "affa failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn fail(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "affa should have failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "panic: {e}");
    e
}

/// BLAKE3 of every file under a dir (relative path -> hash), for "byte-identical to before".
pub fn tree_hashes(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    fn walk(base: &Path, d: &Path, m: &mut std::collections::BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type().unwrap();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if ft.is_dir() {
                walk(base, &p, m);
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                m.insert(rel, blake3::hash(&data).to_hex().to_string());
            } else if ft.is_symlink() {
                m.insert(rel, format!("-> {}", fs::read_link(&p).unwrap().display()));
            }
        }
    }
    if dir.exists() {
        walk(dir, dir, &mut m);
    }
    m
}

pub fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).unwrap().ino()
}

/// Names of the archive directories of a job dir, sorted.
pub fn archive_names(job_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(job_dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| affa::archive::parse_archive_name(n).is_some())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
