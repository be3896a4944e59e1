//! A private smbd on 127.0.0.1 (a free port, its own smb.conf, passdb and state in a temp dir),
//! with the Samba user root (password [`SMB_PASS`]); [`Smbd::add_user`] adds more. Needs root.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, poll, wait_listening, Daemon};

pub const SMB_PASS: &str = "affa-Smb-pw1";

/// (Fields drop in this order: smbd stops before its directory goes.)
pub struct Smbd {
    _daemon: Daemon,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

pub fn start_smbd() -> Smbd {
    let dir = tempfile::Builder::new().prefix("affa-smb").tempdir().unwrap();
    let d = dir.path();
    for s in ["private", "lock", "state", "cache", "pid", "ncalrpc"] {
        fs::create_dir_all(d.join(s)).unwrap();
    }
    let port = free_port();
    let conf = format!(
        "[global]\n\tworkgroup = AFFATEST\n\tserver role = standalone server\n\tsmb ports = {port}\n\
         \tinterfaces = 127.0.0.1\n\tbind interfaces only = yes\n\tdisable netbios = yes\n\
         \tprivate dir = {d}/private\n\tlock directory = {d}/lock\n\tstate directory = {d}/state\n\
         \tcache directory = {d}/cache\n\tpid directory = {d}/pid\n\tncalrpc dir = {d}/ncalrpc\n\
         \tlog file = {d}/log.%m\n\tlog level = 1\n\tpassdb backend = tdbsam:{d}/passdb.tdb\n\
         \tload printers = no\n\tprinting = bsd\n\tprintcap name = /dev/null\n\tdisable spoolss = yes\n\
         \tusershare path =\n\tmap to guest = never\n",
        d = d.display()
    );
    fs::write(d.join("smb.conf"), conf).unwrap();
    smbpasswd(d, "root", SMB_PASS);
    let mut c = Command::new("smbd");
    c.args(["--foreground", "--no-process-group"]).arg(format!("--configfile={}", d.join("smb.conf").display()));
    let log = d.join("smbd.log");
    let daemon = Daemon::start(&c, &log);
    wait_listening(port, Duration::from_secs(30), "smbd (apt-get install samba)", &log);
    Smbd { _daemon: daemon, port, dir }
}

pub fn smbclient(s: &Smbd, share: &str, cmd: &str) -> std::process::Output {
    smbclient_as(s, "root", SMB_PASS, share, cmd)
}

/// smbclient logged in as `user`.
pub fn smbclient_as(s: &Smbd, user: &str, pass: &str, share: &str, cmd: &str) -> std::process::Output {
    Command::new("smbclient")
        .arg(format!("//127.0.0.1/{share}"))
        .args(["-p", &s.port.to_string(), "-U", &format!("{user}%{pass}"), "-s"])
        .arg(s.dir.path().join("smb.conf"))
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("smbclient (apt-get install smbclient)")
}

/// smbclient as root, again until it succeeds (smbd may take a moment to pick up a reloaded
/// configuration) or 20 s have passed; the last answer.
pub fn smbclient_until_ok(s: &Smbd, share: &str, cmd: &str) -> std::process::Output {
    let mut last = None;
    let _ = poll(Duration::from_secs(20), Duration::from_millis(500), || {
        let o = smbclient(s, share, cmd);
        let done = o.status.success();
        last = Some(o);
        done.then_some(())
    });
    last.unwrap()
}

impl Smbd {
    /// Add a Samba user (an existing Unix user) with a password.
    pub fn add_user(&self, user: &str, pass: &str) {
        smbpasswd(self.dir.path(), user, pass);
    }
}

fn smbpasswd(d: &std::path::Path, user: &str, pass: &str) {
    let mut p = Command::new("smbpasswd")
        .arg("-c")
        .arg(d.join("smb.conf"))
        .args(["-a", "-s", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("smbpasswd (apt-get install samba)");
    use std::io::Write;
    p.stdin.take().unwrap().write_all(format!("{pass}\n{pass}\n").as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(o.status.success(), "smbpasswd: {}", String::from_utf8_lossy(&o.stderr));
}
