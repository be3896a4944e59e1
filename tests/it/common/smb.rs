//! A private smbd on 127.0.0.1 (a free port, its own smb.conf, passdb and state in a temp dir),
//! with the Samba user root (password [`SMB_PASS`]); [`Smbd::add_user`] adds more. Needs root.
//! Also what the share tests share: [`ShareMounts`] (no share's mount outlives a test), and the
//! special files a hostile host backs up ([`plant_specials`]) with the check that a share user
//! gets nothing of the backup server through them ([`Planted::assert_the_share_gives_nothing_of_the_server`]).

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

/// smbclient as root, stopped (and None returned) when it has not ended within `limit`: a
/// request smbd hangs on must not hang the test.
pub fn smbclient_within(s: &Smbd, share: &str, cmd: &str, limit: Duration) -> Option<std::process::Output> {
    let mut child = Command::new("smbclient")
        .arg(format!("//127.0.0.1/{share}"))
        .args(["-p", &s.port.to_string(), "-U", &format!("root%{SMB_PASS}"), "-s"])
        .arg(s.dir.path().join("smb.conf"))
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("smbclient (apt-get install smbclient)");
    let ended = poll(limit, Duration::from_millis(50), || child.try_wait().unwrap().map(|_| ()));
    if ended.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(child.wait_with_output().unwrap())
}

/// What affa mounted for its shares below `dir` (`lockDir/samba-mounts`: bind mounts and
/// `affa --mount`s), detached when this is dropped, whatever the test did: no mount outlives
/// it (declare it after the `Affa`, so that it is dropped first).
pub struct ShareMounts(pub std::path::PathBuf);

impl Drop for ShareMounts {
    fn drop(&mut self) {
        let Ok(base) = fs::canonicalize(&self.0) else { return };
        for _ in 0..64 {
            let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let Some(mp) = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
                .rfind(|p| p.starts_with(&base) && *p != base)
            else {
                return;
            };
            let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A loop device over a file of known bytes: the stand-in for the backup server's own disk
/// (never the machine's real one). Detached when dropped.
pub struct LoopDisk {
    pub dev: String,
    pub rdev: rustix::fs::Dev,
    /// Bytes the disk holds (and nothing else on the machine does).
    pub secret: Vec<u8>,
}

impl LoopDisk {
    /// None (saying why) where no loop device can be set up.
    pub fn new(dir: &std::path::Path) -> Option<LoopDisk> {
        let secret =
            format!("BACKUP-SERVER-DISK-{}-{:?}|", std::process::id(), std::time::SystemTime::now()).into_bytes();
        let img = dir.join("server-disk.img");
        fs::write(&img, secret.repeat((1 << 20) / secret.len() + 1)).unwrap();
        let o = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&img).output().ok()?;
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() || dev.is_empty() {
            eprintln!(
                "note: no loop device ({}): the block device part is left out",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        let rdev = rustix::fs::stat(dev.as_str()).unwrap().st_rdev;
        Some(LoopDisk { dev, rdev, secret })
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// The special files a hostile host puts in what it backs up (then recreated in the archive by
/// rsync, as root): a block device with the major and minor of [`LoopDisk`] (the server's
/// "disk"), a char device 1,5 (/dev/zero's), a fifo, a socket, symlinks to a secret file made
/// outside RootDir, to `/` and up out of the archive, plus what the share must keep serving:
/// plain files, a set-uid file (the host's own data) and a symlink that stays inside.
pub struct Planted {
    /// The secret file outside RootDir, and its bytes.
    pub secret_path: std::path::PathBuf,
    pub secret: Vec<u8>,
    pub disk: Option<LoopDisk>,
    /// Device nodes planted (names in the data directory).
    pub devices: Vec<&'static str>,
}

pub fn plant_specials(data: &std::path::Path, outside: &std::path::Path) -> Planted {
    use rustix::fs::{makedev, mknodat, FileType, Mode, CWD};
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(outside).unwrap();
    let secret_path = outside.join("secret.txt");
    let secret = format!("OUTSIDE-ROOTDIR-SECRET-{}\n", std::process::id()).into_bytes();
    fs::write(&secret_path, &secret).unwrap();
    fs::write(data.join("plain.txt"), "a plain file of the host\n").unwrap();
    fs::write(data.join("suid"), "#!/bin/sh\necho a set-uid tool of the host\n").unwrap();
    fs::set_permissions(data.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    let disk = LoopDisk::new(outside);
    let mut devices = Vec::new();
    if let Some(d) = &disk {
        mknodat(CWD, data.join("disk"), FileType::BlockDevice, Mode::from_raw_mode(0o660), d.rdev).unwrap();
        devices.push("disk");
    }
    mknodat(CWD, data.join("zero"), FileType::CharacterDevice, Mode::from_raw_mode(0o666), makedev(1, 5)).unwrap();
    devices.push("zero");
    mknodat(CWD, data.join("fifo"), FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
    drop(std::os::unix::net::UnixListener::bind(data.join("sock")).unwrap());
    std::os::unix::fs::symlink(&secret_path, data.join("secret-link")).unwrap();
    std::os::unix::fs::symlink("/", data.join("root-link")).unwrap();
    std::os::unix::fs::symlink("../".repeat(40), data.join("up-link")).unwrap();
    std::os::unix::fs::symlink("plain.txt", data.join("inside-link")).unwrap();
    Planted { secret_path, secret, disk, devices }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Planted {
    /// A share user's tries, through smbclient on `share` at `rel` (the data directory's path
    /// in the share, `/`-separated), with `data` the host's directory they were backed up from
    /// and `watch` the device nodes in the archive (an open of one is seen by inotify): every
    /// request ends within 30 s; the plain files, the set-uid file and the inside symlink come
    /// byte for byte; the devices are refused at open (never opened: no IN_OPEN), the fifo and
    /// the socket give nothing, and no symlink leads out: neither the secret's nor the disk's
    /// bytes ever arrive. `got` is a scratch directory.
    pub fn assert_the_share_gives_nothing_of_the_server(
        &self,
        s: &Smbd,
        share: &str,
        rel: &str,
        data: &std::path::Path,
        watch: &[std::path::PathBuf],
        got: &std::path::Path,
    ) {
        use rustix::fs::inotify;
        fs::create_dir_all(got).unwrap();
        let ino = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).unwrap();
        for w in watch {
            assert!(fs::symlink_metadata(w).is_ok(), "{} is not in the archive", w.display());
            inotify::add_watch(&ino, w, inotify::WatchFlags::OPEN).unwrap();
        }
        let limit = Duration::from_secs(30);
        let mut n = 0;
        let mut get = |path: &str| -> (String, std::path::PathBuf) {
            n += 1;
            let local = got.join(format!("got-{n}"));
            let cmd = format!("get \"{rel}/{path}\" {}", local.display());
            let o = smbclient_within(s, share, &cmd, limit)
                .unwrap_or_else(|| panic!("smbclient {cmd}: no answer within {limit:?} (smbd hangs)"));
            (format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)), local)
        };
        // The host's own files: byte for byte (the inside link gives its target).
        for (path, from) in [("plain.txt", "plain.txt"), ("suid", "suid"), ("inside-link", "plain.txt")] {
            let (out, local) = get(path);
            let want = fs::read(data.join(from)).unwrap();
            let have = fs::read(&local).unwrap_or_else(|e| panic!("get {path}: {e}: {out}"));
            assert!(blake3::hash(&have) == blake3::hash(&want), "get {path} gave other bytes: {out}");
        }
        // Device nodes: refused at open.
        for d in &self.devices {
            let (out, local) = get(d);
            assert!(out.contains("NT_STATUS_ACCESS_DENIED"), "the device node {d} was opened by smbd: {out}");
            assert!(fs::read(&local).map(|b| b.is_empty()).unwrap_or(true), "{d} gave bytes");
        }
        // A fifo and a socket: nothing (and no hang).
        for f in ["fifo", "sock"] {
            let (out, local) = get(f);
            assert!(fs::read(&local).map(|b| b.is_empty()).unwrap_or(true), "{f} gave bytes: {out}");
        }
        // No symlink out of the share: not to the secret, not through `/`, not up.
        let secret_rel = self.secret_path.strip_prefix("/").unwrap().display().to_string();
        for path in ["secret-link".to_string(), format!("root-link/{secret_rel}"), format!("up-link/{secret_rel}")] {
            let (out, _) = get(&path);
            assert!(out.contains("NT_STATUS_"), "get {path} was not refused: {out}");
        }
        for l in ["root-link", "up-link"] {
            let o = smbclient_within(s, share, &format!("ls \"{rel}/{l}/*\""), limit).expect("smbclient ls hangs");
            let listing = String::from_utf8_lossy(&o.stdout);
            assert!(
                !listing.lines().any(|x| ["etc ", "proc ", "usr "].iter().any(|n| x.trim_start().starts_with(n))),
                "{l} lists the backup server's /: {listing}"
            );
        }
        // Whatever arrived: neither the secret's nor the disk's bytes.
        for e in fs::read_dir(got).unwrap() {
            let b = fs::read(e.unwrap().path()).unwrap();
            assert!(!contains(&b, &self.secret), "the secret outside RootDir came through the share");
            if let Some(d) = &self.disk {
                assert!(!contains(&b, &d.secret), "the server's disk came through the share");
            }
        }
        // No device node was opened (inotify reports every open of those inodes, not the
        // O_PATH lookups smbd makes first).
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut r = inotify::Reader::new(&ino, &mut buf);
        let opened = r.next().is_ok();
        assert!(!opened, "a device node in the archive was opened while the share was read");
        // smbd still serves.
        let (out, local) = get("plain.txt");
        assert_eq!(fs::read(&local).unwrap_or_default(), fs::read(data.join("plain.txt")).unwrap(), "{out}");
    }
}
