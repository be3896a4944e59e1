//! Test fixtures: a real OpenSSH sshd on 127.0.0.1 (a free high port, its own host key and
//! authorized-keys file in a temp dir), and an affa configuration whose state directories all
//! live in temp dirs. Nothing here touches the machine's own sshd or /root/.ssh.
#![allow(dead_code)]

pub mod esx;
pub mod host_input;
pub mod hostile_esx;
pub mod sim;
pub mod smb;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().expect("id");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

/// A private sshd. Dropping it stops it.
pub struct Sshd {
    pub dir: TempDir,
    pub port: u16,
    pub user: String,
    child: Option<Child>,
    /// The file affa's --send-key writes to (the job's RemoteAuthorizedKeysFile).
    pub authorized_keys: PathBuf,
    /// A key the "administrator" holds, standing in for the password typed at --send-key.
    pub bootstrap_key: PathBuf,
    agent: Option<(Child, PathBuf)>,
}

impl Sshd {
    pub fn start() -> Sshd {
        Sshd::start_with("")
    }

    /// An sshd with extra sshd_config lines (e.g. `SetEnv PATH=...` for the sessions).
    pub fn start_with(extra_config: &str) -> Sshd {
        let dir = tempfile::Builder::new().prefix("affa-sshd").tempdir().unwrap();
        keygen(&dir.path().join("host_ed25519"));
        let bootstrap_key = dir.path().join("bootstrap");
        keygen(&bootstrap_key);
        fs::copy(bootstrap_key.with_extension("pub"), dir.path().join("bootstrap_keys")).unwrap();
        let authorized_keys = dir.path().join("authorized_keys");
        let mut s = Sshd { port: 0, user: whoami(), child: None, authorized_keys, bootstrap_key, agent: None, dir };
        s.launch(extra_config);
        s
    }

    fn launch(&mut self, extra_config: &str) {
        let d = self.dir.path();
        let cfg = format!(
            "Port 0\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys {d}/bootstrap_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\nLogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 50\nSubsystem sftp internal-sftp\n{extra_config}",
            d = d.display()
        );
        fs::write(d.join("sshd_config"), cfg).unwrap();
        if is_root() {
            let _ = fs::create_dir_all("/run/sshd");
        }
        self.port = 0;
        self.launch_on(free_port());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart on the same port with the same host key.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch_on(port);
    }

    fn launch_on(&mut self, port: u16) {
        let d = self.dir.path().to_path_buf();
        let cfg = fs::read_to_string(d.join("sshd_config")).unwrap();
        let cfg = cfg.replace(&format!("Port {}", self.port), &format!("Port {port}"));
        fs::write(d.join("sshd_config"), cfg).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("cannot start /usr/sbin/sshd (install openssh-server)");
        self.child = Some(child);
        self.port = port;
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sshd did not start: {}",
                fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The host is "replaced": a new host key, same address.
    pub fn change_host_key(&mut self) {
        self.stop();
        let hk = self.dir.path().join("host_ed25519");
        fs::remove_file(&hk).unwrap();
        fs::remove_file(hk.with_extension("pub")).unwrap();
        keygen(&hk);
        let port = self.port;
        self.launch_on(port);
    }

    /// An ssh-agent holding the bootstrap key: SSH_AUTH_SOCK for `affa --send-key`.
    pub fn agent_socket(&mut self) -> PathBuf {
        if let Some((_, s)) = &self.agent {
            return s.clone();
        }
        let sock = self.dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(5), "ssh-agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket file appears before the agent accepts connections: retry a little.
        let mut added = false;
        for _ in 0..50 {
            let st = Command::new("ssh-add")
                .arg("-q")
                .arg(&self.bootstrap_key)
                .env("SSH_AUTH_SOCK", &sock)
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                added = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(added, "ssh-add failed");
        self.agent = Some((child, sock.clone()));
        sock
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if let Some((mut c, _)) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn is_root() -> bool {
    unsafe { libc_geteuid() == 0 }
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
                "[GlobalAffaConfig]\nlockDir={s}/lock\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nRootDir={r}\n",
                s = a.state.display(),
                r = a.root.display()
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
