//! The bench's world: what it needs installed, the affa binary and the simulator it builds, a
//! private sshd (as the tests' fixture: own port, host key, authorized keys), an ssh-agent for
//! `affa --send-key`, and the ESXi simulator serving the bench's datastore (and taking the guest
//! writes that change its VMs' disks between runs, so that its Changed Block Tracking sees them).

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub const SIM_USER: &str = "affa";
pub const SIM_PASS: &str = "bench-Pw-1";

/// Debian packages the bench needs, with a command that proves each is there.
pub const NEEDS: &[(&str, &str)] = &[
    ("rsync", "/usr/bin/rsync"),
    ("openssh-server", "/usr/sbin/sshd"),
    ("openssh-client", "/usr/bin/ssh-agent"),
    ("borgbackup", "/usr/bin/borg"),
    ("restic", "/usr/bin/restic"),
    ("golang-go", "/usr/bin/go"),
    ("golang-github-vmware-govmomi-dev", "/usr/share/gocode/src/github.com/vmware/govmomi"),
];

/// Stop with the apt-get line when something is missing.
pub fn check_prerequisites() -> Result<(), String> {
    check_packages(NEEDS, "affa-bench needs", "")
}

/// Err naming the packages of `needs` (package, a file it installs) that are missing, with the
/// apt-get line; `who` starts the message, `hint` ends it.
pub fn check_packages(needs: &[(&str, &str)], who: &str, hint: &str) -> Result<(), String> {
    let missing: Vec<&str> = needs.iter().filter(|(_, p)| !Path::new(p).exists()).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{who} these Debian packages, which are not installed: {}\ninstall them with:\n  sudo apt-get install -y --no-install-recommends {}\n{hint}(nothing was installed or changed)",
        missing.join(", "),
        missing.join(" ")
    ))
}

fn pdeathsig(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2), which
    // is async-signal-safe, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// First line of a command's output (stdout, else stderr).
pub fn version_of(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(o) => {
            let s = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&s).lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not found".into(),
    }
}

/// The repository's root (this crate lives in crates/bench).
pub fn manifest_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    d.parent().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or(d)
}

/// `cargo build --release --bin affa --features test-hooks` (the runs set `AFFA_FAKE_NOW`); the
/// binary lands next to this one.
pub fn build_affa() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let mut c = Command::new(&cargo);
    c.args(["build", "--bin", "affa", "--features", "test-hooks", "--quiet"]).current_dir(manifest_dir());
    if profile_release {
        c.arg("--release");
    } else {
        eprintln!("affa-bench: warning: not built with --release; numbers of a debug affa are meaningless");
    }
    // The target dir of this binary (CARGO_TARGET_DIR or ./target).
    if let Some(t) = dir.parent() {
        c.env("CARGO_TARGET_DIR", t);
    }
    let st = c.status().map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !st.success() {
        return Err("cargo build --release --bin affa failed".into());
    }
    let bin = dir.join("affa");
    if !bin.exists() {
        return Err(format!("{} missing after the build", bin.display()));
    }
    Ok(bin)
}

/// The static affa-agent: `scripts/build-agent.sh` (its own target dir); prints its path.
pub fn build_agent() -> Result<PathBuf, String> {
    let out = Command::new(manifest_dir().join("scripts/build-agent.sh"))
        .current_dir(manifest_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/build-agent.sh: {e}"))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.is_file() {
        return Err("scripts/build-agent.sh failed".into());
    }
    Ok(path)
}

/// Build the simulator (harness/esxi-sim) into the target dir unless up to date.
pub fn build_sim() -> Result<PathBuf, String> {
    let src = manifest_dir().join("harness/esxi-sim");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().unwrap().join("esxi-sim-bench");
    let newest = fs::read_dir(&src)
        .map_err(|e| format!("{}: {e}", src.display()))?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "go"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if fs::metadata(&bin).and_then(|m| m.modified()).map(|t| t >= newest).unwrap_or(false) {
        return Ok(bin);
    }
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .output()
        .map_err(|e| format!("cannot run go build: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the simulator failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(bin)
}

fn keygen(path: &Path) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err("ssh-keygen failed".into())
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Key exchanges an ESXi 8 host's sshd offers (Broadcom KB 326844, "Couldn't agree a key
/// exchange algorithm on ESXi or vCenter").
const ESXI_KEX: &str =
    "ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512";
/// Ciphers: "SSH supports only 256-bit and 128-bit AES ciphers" (vSphere 8 Security guide).
const ESXI_SSH_CIPHERS: &str = "aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr";
/// MACs: the SHA-2 HMACs of a FIPS-mode sshd (ESXi runs its sshd in FIPS mode; the exact list
/// is an assumption).
const ESXI_MACS: &str = "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha2-256,hmac-sha2-512";

/// A private sshd on 127.0.0.1 offering what an ESXi 8 host's does; stopped when dropped.
pub struct Sshd {
    pub port: u16,
    pub user: String,
    pub authorized_keys: PathBuf,
    child: Child,
    agent: Option<Child>,
    pub agent_sock: PathBuf,
}

impl Sshd {
    pub fn start(dir: &Path) -> Result<Sshd, String> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        // The host key an ESXi host makes at first boot: ECDSA nistp256 (vSphere Security guide).
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f"])
            .arg(dir.join("host_ecdsa"))
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("ssh-keygen: {e}"))?;
        if !st.success() {
            return Err("ssh-keygen of the host key failed".into());
        }
        let boot = dir.join("bootstrap");
        keygen(&boot)?;
        fs::copy(boot.with_extension("pub"), dir.join("bootstrap_keys")).map_err(|e| e.to_string())?;
        let authorized_keys = dir.join("authorized_keys");
        let _ = fs::remove_file(&authorized_keys);
        let port = free_port();
        let d = dir.display();
        // SHLVL=1: bash (root's login shell here) runs ~/.bashrc for each command sshd starts
        // unless it is a nested shell; this machine's runs pyenv's init (0.15-0.2 s a session).
        // An ESXi host's busybox sh runs no rc file for a command (docs/BENCHMARKS-METHOD.md).
        // The algorithms an ESXi 8 host's sshd offers (docs/BENCHMARKS-METHOD.md): key exchange
        // as Broadcom KB 326844 lists them, AES ciphers only (vSphere Security guide), SHA-2
        // MACs (its FIPS mode; the list is not published).
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ecdsa\nPidFile {d}/sshd.pid\n\
             KexAlgorithms {ESXI_KEX}\nCiphers {ESXI_SSH_CIPHERS}\nMACs {ESXI_MACS}\n\
             AuthorizedKeysFile {d}/authorized_keys {d}/bootstrap_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\nLogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 50\n\
             SetEnv SHLVL=1\n"
        );
        fs::write(dir.join("sshd_config"), cfg).map_err(|e| e.to_string())?;
        if rustix::process::geteuid().is_root() {
            let _ = fs::create_dir_all("/run/sshd");
        }
        let mut c = Command::new("/usr/sbin/sshd");
        c.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config")).stdin(Stdio::null()).stdout(Stdio::null());
        c.stderr(fs::File::create(dir.join("sshd.log")).map_err(|e| e.to_string())?);
        pdeathsig(&mut c);
        let child = c.spawn().map_err(|e| format!("cannot start sshd: {e}"))?;
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "sshd did not start: {}",
                    fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // An agent holding the bootstrap key, standing in for the password typed at --send-key.
        let sock = dir.join("agent.sock");
        let _ = fs::remove_file(&sock);
        let mut a = Command::new("ssh-agent");
        a.arg("-D").arg("-a").arg(&sock).stdout(Stdio::null()).stderr(Stdio::null());
        pdeathsig(&mut a);
        let agent = a.spawn().map_err(|e| format!("ssh-agent: {e}"))?;
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(5) {
                return Err("ssh-agent did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let st = Command::new("ssh-add")
            .arg("-q")
            .arg(&boot)
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("ssh-add failed".into());
        }
        let user = String::from_utf8_lossy(&Command::new("id").arg("-un").output().map_err(|e| e.to_string())?.stdout)
            .trim()
            .to_string();
        Ok(Sshd { port, user, authorized_keys, child, agent: Some(agent), agent_sock: sock })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

/// One VM of the simulator: its name and disk size (one disk on datastore1).
pub struct VmDef {
    pub name: String,
    pub size: u64,
}

/// The simulator; exits when dropped (its stdin closes).
pub struct Sim {
    child: Child,
    stdin: Option<ChildStdin>,
    pub port: u16,
    /// host:port of its control API (plain HTTP).
    control: String,
}

impl Sim {
    pub fn start(bin: &Path, work: &Path, ds: &Path, vms: &[VmDef]) -> Result<Sim, String> {
        fs::create_dir_all(work).map_err(|e| e.to_string())?;
        let vm: Vec<String> = vms
            .iter()
            .map(|v| format!(r#"{{"name":"{}","power_on":true,"disks":[{{"datastore":"datastore1","size_bytes":{}}}],"no_tools":false}}"#, v.name, v.size))
            .collect();
        let spec = format!(
            r#"{{"user":"{SIM_USER}","password":"{SIM_PASS}","hash_on_snapshot":false,"datastores":[{{"name":"datastore1","dir":"{}"}}],"vms":[{}]}}"#,
            ds.display(),
            vm.join(",")
        );
        let spec_path = work.join("spec.json");
        fs::write(&spec_path, spec).map_err(|e| e.to_string())?;
        let mut c = Command::new(bin);
        c.arg("--config").arg(&spec_path).stdin(Stdio::piped()).stdout(Stdio::piped());
        c.stderr(fs::File::create(work.join("sim.log")).map_err(|e| e.to_string())?);
        pdeathsig(&mut c);
        let mut child = c.spawn().map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).map_err(|e| e.to_string())?;
        let field = |k: &str| -> String {
            let pat = format!("\"{k}\":\"");
            line.find(&pat)
                .map(|i| line[i + pat.len()..].split('"').next().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        let url = field("url");
        let port = url.rsplit(':').next().and_then(|p| p.split('/').next()).and_then(|p| p.parse().ok());
        let control = field("control").trim_start_matches("http://").to_string();
        let (Some(port), false) = (port, control.is_empty()) else {
            let _ = child.kill();
            return Err(format!(
                "the simulator did not start: {}",
                fs::read_to_string(work.join("sim.log")).unwrap_or_default()
            ));
        };
        Ok(Sim { child, stdin, port, control })
    }

    /// `POST PATH_AND_QUERY` to the control API with `body`; the answer's body (status 200 only).
    fn post(&self, path: &str, body: &[u8]) -> io::Result<String> {
        let mut s = TcpStream::connect(&self.control)?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.control,
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out);
        let (status, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
        let body = rest.split_once("\r\n\r\n").map_or("", |x| x.1);
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(io::Error::other(format!("simulator POST {path}: {status}: {}", body.trim())));
        }
        Ok(body.to_string())
    }

    /// A guest write of `buf` at `off` on disk 0 of `vm` (`POST /write`): the simulator writes it
    /// to the base flat file (no snapshot exists between runs) and its Changed Block Tracking
    /// records the extent. Fails unless it answers that all bytes went to `VM-flat.vmdk`.
    pub fn guest_write(&self, vm: &str, off: u64, buf: &[u8]) -> io::Result<()> {
        let path = format!("/write?vm={vm}&disk=0&offset={off}");
        let ans = self.post(&path, buf)?;
        let compact: String = ans.chars().filter(|c| !c.is_whitespace()).collect();
        let flat = format!("\"file\":\"{vm}-flat.vmdk\"");
        let written = [",", "}"].iter().any(|e| compact.contains(&format!("\"written\":{}{e}", buf.len())));
        if !written || !compact.contains(&flat) {
            return Err(io::Error::other(format!(
                "simulator POST {path}: answered {} where {} bytes to {vm}-flat.vmdk were expected",
                ans.trim(),
                buf.len()
            )));
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The affa configuration of the bench: a global section and one ESXi job per (system, VM).
pub struct AffaConf {
    pub bin: PathBuf,
    pub conf: PathBuf,
    pub state: PathBuf,
}

impl AffaConf {
    /// `agent`: the static affa-agent the chunked jobs deploy to the host (global `agentBinary`).
    pub fn new(bin: &Path, agent: &Path, dir: &Path) -> Result<AffaConf, String> {
        let conf = dir.join("etc");
        let state = dir.join("state");
        // Bench-owned: known hosts, keys and logs of an earlier run must not leak in.
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(&conf).map_err(|e| e.to_string())?;
        fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        let a = AffaConf { bin: bin.to_path_buf(), conf, state };
        let s = a.state.display();
        a.write(
            "00-global.conf",
            &format!(
                "[GlobalAffaConfig]\nlockDir={s}/lock\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nagentBinary={}\n",
                agent.display()
            ),
        )?;
        // localRsyncBinary of the bench's jobs: rsync itself, timed (start, end, exit code appended
        // to $AFFA_BENCH_RSYNC_LOG) so affa's wall time splits into rsync and the rest.
        let wrapper = a.rsync_wrapper();
        fs::write(
            &wrapper,
            "#!/bin/sh\ns=$(date +%s.%N)\n/usr/bin/rsync \"$@\"\nrc=$?\n[ -n \"$AFFA_BENCH_RSYNC_LOG\" ] && echo \"$s $(date +%s.%N) $rc\" >> \"$AFFA_BENCH_RSYNC_LOG\"\nexit $rc\n",
        )
        .map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        }
        // The proposed fixes, applied from outside affa for the "tuned" system: ssh connection
        // sharing (one handshake per run instead of one per rsync), and --sparse for the
        // in-place staging transfer (rsync >= 3.1.3 punches holes with --inplace).
        let st = a.state.display().to_string();
        fs::write(
            a.state.join("ssh-mux"),
            format!("#!/bin/sh\nexec ssh -o ControlMaster=auto -o ControlPath={st}/cm-%C -o ControlPersist=2 \"$@\"\n"),
        )
        .map_err(|e| e.to_string())?;
        fs::write(
            a.state.join("rsync-timed-sparse"),
            format!("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --inplace ] && set -- --sparse \"$@\" && break; done\nexec {} \"$@\"\n", wrapper.display()),
        )
        .map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            for n in ["ssh-mux", "rsync-timed-sparse"] {
                fs::set_permissions(a.state.join(n), fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
            }
        }
        let pw = a.state.join("esx.pw");
        fs::write(&pw, format!("{SIM_PASS}\n")).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        Ok(a)
    }

    /// The job's log file (logDir/JOB.log).
    pub fn job_log(&self, job: &str) -> PathBuf {
        self.state.join("log").join(format!("{job}.log"))
    }

    pub fn rsync_wrapper(&self) -> PathBuf {
        self.state.join("rsync-timed")
    }

    pub fn write(&self, name: &str, text: &str) -> Result<(), String> {
        let p = self.conf.join(name);
        fs::write(&p, text).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())
    }

    /// Add lines to the config file `name` (written by [`AffaConf::write`]).
    pub fn append(&self, name: &str, text: &str) -> Result<(), String> {
        let p = self.conf.join(name);
        let mut all = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        all.push_str(text);
        self.write(name, &all)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config-dir").arg(&self.conf).env_remove("SSH_AUTH_SOCK").env_remove("AFFA_FAKE_NOW");
        c
    }

    /// An ESXi job for `vm` in `root`; `chunk` = Some((chunkSize, chunkTransport)) for
    /// chunkFiles=*-flat.vmdk; `cbt`: `ESXiCBT=yes` (with `ESXiCBTVerifyEvery=0`: every
    /// incremental is a CBT run), else `ESXiCBT=no` (the default `auto` would switch CBT on in
    /// the simulator and the rows without it would silently change).
    #[allow(clippy::too_many_arguments)] // the bench job table: one parameter per column
    pub fn add_job(
        &self,
        job: &str,
        vm: &str,
        root: &Path,
        chunk: Option<(&str, &str)>,
        tuned: bool,
        cbt: bool,
        sshd: &Sshd,
        sim: &Sim,
    ) -> Result<(), String> {
        let mut chunk = match chunk {
            Some((cs, via)) => format!("chunkFiles=*-flat.vmdk\nchunkSize={cs}\nchunkTransport={via}\n"),
            None => String::new(),
        };
        chunk.push_str(if cbt { "ESXiCBT=yes\nESXiCBTVerifyEvery=0\n" } else { "ESXiCBT=no\n" });
        let mut rsync_bin = self.rsync_wrapper();
        if tuned {
            chunk.push_str(&format!("localSSHBinary={}\n", self.state.join("ssh-mux").display()));
            rsync_bin = self.state.join("rsync-timed-sparse");
        }
        let text = format!(
            "[{job}]\nremoteHostName=127.0.0.1\nsshPort={}\nremoteUser={}\nRemoteAuthorizedKeysFile={}\nrsyncCompress=no\n\
             ConnectionCheckTimeout=10\nRootDir={}\nscheduledKeep=1000\nDiskSpaceWarn=none\nESXi=yes\nESXiVMName={vm}\n\
             ESXiUsername={SIM_USER}\nESXiPasswordFile={}\nESXiHost=127.0.0.1\nESXiPort={}\nremoteRsyncBinary=/usr/bin/rsync\n\
             ESXiTaskTimeout=600\nlocalRsyncBinary={}\n{chunk}",
            sshd.port,
            sshd.user,
            sshd.authorized_keys.display(),
            root.display(),
            self.state.join("esx.pw").display(),
            sim.port,
            rsync_bin.display()
        );
        self.write(&format!("{job}.conf"), &text)?;
        let out = self
            .cmd()
            .env("SSH_AUTH_SOCK", &sshd.agent_sock)
            .args(["--send-key", job, "--yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "affa --send-key {job} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// ssh options of a job after --send-key (the ones affa itself uses).
    pub fn ssh_args(&self, job: &str, sshd: &Sshd) -> Vec<String> {
        let ssh = self.state.join("ssh");
        vec![
            "-p".into(),
            sshd.port.to_string(),
            "-o".into(),
            format!("HostKeyAlias={job}"),
            "-o".into(),
            format!("UserKnownHostsFile={}", ssh.join(format!("knownhosts-{job}")).display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("IdentityFile={}", ssh.join("id_ed25519_affa").display()),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }
}
