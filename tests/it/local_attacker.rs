//! A local user against the backup server (issue 11, the local half; docs/SECURITY-local.md).
//! The tests run as root, as affa does; the attacker is `nobody`, who prepares what a local user
//! can prepare (the lock directory in the world-writable /run/lock, symlinks and pids in it, a
//! metrics directory it owns, a Samba login) with `setpriv`, then root runs the real binary.
//! Each test asserts what the attacker wanted did not happen: no file outside affa's own is
//! truncated or rewritten, no process of someone else is signalled, no secret is readable by
//! others at any moment, no archive is readable through Samba by a user not named.

use crate::common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::smb::{smbclient_as, smbclient_until_ok, start_smbd};
use common::*;

const NOBODY_UID: u32 = 65534;

/// `sh -c SCRIPT` as the local user `nobody`.
fn nobody(script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/bin/sh", "-c", script]);
    c
}

fn as_nobody(script: &str) {
    let o = nobody(script).output().expect("setpriv (util-linux)");
    assert!(o.status.success(), "as nobody: {script}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A test setup that `nobody` can reach: the temp dirs world-traversable, a world-writable
/// sticky `shared` directory standing in for /run/lock, lockDir = shared/affa, one local job.
struct Box_ {
    a: Affa,
    src: tempfile::TempDir,
    shared: PathBuf,
    lock_dir: PathBuf,
    victim: PathBuf,
}

fn setup(global_extra: &str, job_extra: &str) -> Option<Box_> {
    if !is_root() {
        eprintln!("skipped: the local-attacker tests need root (affa runs as root; nobody is the attacker)");
        return None;
    }
    let a = Affa::new();
    for d in [a.tmp.path(), &a.state] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let shared = a.state.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let lock_dir = shared.join("affa");
    a.write_conf(
        "00-global.conf",
        &format!(
            "[GlobalAffaConfig]\nlockDir={}\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nRootDir={r}\n\
             cronFile={s}/cron.d/affa\nmetricsFile={s}/nodir/affa.prom\nsendmailBinary=/bin/true\n{global_extra}",
            lock_dir.display(),
            s = a.state.display(),
            r = a.root.display()
        ),
    );
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::create_dir_all(src.path().join("data")).unwrap();
    fs::write(src.path().join("data/hello.txt"), "hello from affa\n").unwrap();
    a.write_conf(
        "jobs.conf",
        &format!("[web]\nremoteHostName=localhost\nInclude={}/data\n{job_extra}", src.path().display()),
    );
    // A root file the attacker wants changed (the stand-in for /etc/shadow).
    let victim = a.tmp.path().join("victim");
    fs::write(&victim, "root's precious file\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    Some(Box_ { a, src, shared, lock_dir, victim })
}

impl Box_ {
    fn assert_victim_untouched(&self) {
        assert_eq!(fs::read_to_string(&self.victim).unwrap(), "root's precious file\n", "the victim file was written");
        let m = fs::metadata(&self.victim).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, 0), "the victim file was chmodded or chowned");
    }
}

/// The whole stderr is one line, `affa: error: ...`; returns it.
fn one_line_error(o: &Output) -> String {
    let e = fail(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error:\n{e}");
    assert!(lines[0].starts_with("affa: error: "), "{e}");
    lines[0].to_string()
}

/// `cmd` with every signal it can block blocked (perl's sigprocmask, then exec): a signal sent to
/// it stays pending, so whether it was signalled can be read at once ([`assert_alive`]).
fn blocking_signals(cmd: &Command) -> Command {
    let mut c = Command::new("perl");
    c.args(["-MPOSIX", "-e", "sigprocmask(SIG_BLOCK, POSIX::SigSet->new(1 .. 31)) or die; exec @ARGV or die"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

/// A process the attacker would like root to kill (root's, so nobody cannot kill it itself);
/// killed when dropped.
struct Bystander(Child);

impl Bystander {
    fn start() -> Bystander {
        let mut sleep = Command::new("sleep");
        sleep.arg("300");
        Bystander(blocking_signals(&sleep).spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `c` (started by [`blocking_signals`]) is running and no signal was sent to it: a signal sent
/// by what has already returned would be pending now.
fn assert_alive(c: &mut Child, what: &str) {
    assert!(c.try_wait().unwrap().is_none(), "{what}");
    let status = fs::read_to_string(format!("/proc/{}/status", c.id())).unwrap();
    for k in ["SigPnd:", "ShdPnd:"] {
        let v = status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_else(|| panic!("no {k} in {status}")).trim();
        assert_eq!(u64::from_str_radix(v, 16).unwrap(), 0, "{what} ({k} {v})");
    }
    assert!(alive(c.id()), "{what}");
}

/// `flock(1)` holding the flock of `file` until its stdin closes, run by `cmd` (as nobody, or
/// root); waits until the lock is taken.
fn hold_flock(mut cmd: Command, file: &Path) -> Child {
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    wait_until(Duration::from_secs(10), &format!("the flock of {} to be taken", file.display()), || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("flock(1) on {} exited: {st}", file.display());
        }
        let st = Command::new("flock").args(["-n", "-E", "99"]).arg(file).arg("true").status().unwrap();
        st.code() == Some(99)
    });
    child
}

fn release(mut c: Child) {
    drop(c.stdin.take());
    let _ = c.wait();
}

// ---------------------------------------------------------------- the lock directory

#[test]
fn a_lock_directory_made_by_a_local_user_is_refused_and_its_symlink_not_followed() {
    let Some(b) = setup("", "") else { return };
    // The attacker gets there first (after a reboot /run/lock is empty) and points the job's
    // lock file at a root file: the old code opened it and truncated it to write its pid.
    as_nobody(&format!("mkdir {d} && ln -s {v} {d}/web", d = b.lock_dir.display(), v = b.victim.display()));
    let e = one_line_error(&b.a.affa(&["--run", "web"]));
    assert_eq!(
        e,
        format!(
            "affa: error: lock directory {} is owned by uid {NOBODY_UID}, not by uid 0 running affa; expected a \
             directory that affa creates itself, owned by the user running affa, mode 0700 (another user made it: \
             remove it and run again)",
            b.lock_dir.display()
        )
    );
    b.assert_victim_untouched();
    assert!(!b.a.job_dir("web").join("scheduled.0").exists(), "the job ran");
    // What the attacker made is left as it is (never chowned or chmodded into shape).
    let m = fs::symlink_metadata(&b.lock_dir).unwrap();
    assert_eq!((m.uid(), m.is_dir()), (NOBODY_UID, true));
    assert!(fs::symlink_metadata(b.lock_dir.join("web")).unwrap().file_type().is_symlink());
    // Every command that takes the lock refuses the same way.
    let e = one_line_error(&b.a.affa(&["--rename-job", "web", "web2"]));
    assert!(e.contains(&format!("lock directory {} is owned by uid {NOBODY_UID}", b.lock_dir.display())), "{e}");
    b.assert_victim_untouched();

    // Once root removes it, affa makes its own: root's, 0700, and the job runs.
    fs::remove_dir_all(&b.lock_dir).unwrap();
    ok(&b.a.affa(&["--run", "web"]));
    let m = fs::symlink_metadata(&b.lock_dir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777, m.is_dir()), (0, 0o700, true));
    assert!(b.a.job_dir("web").join("scheduled.0/.AFFA3-REPORT").is_file());
}

#[test]
fn a_symlinked_or_world_writable_lock_directory_is_refused() {
    let Some(b) = setup("", "") else { return };
    // A symlink to a directory the attacker owns.
    let theirs = b.shared.join("theirs");
    as_nobody(&format!("mkdir {t} && chmod 700 {t} && ln -s {t} {d}", t = theirs.display(), d = b.lock_dir.display()));
    let e = one_line_error(&b.a.affa(&["--run", "web"]));
    assert!(
        e.starts_with(&format!("affa: error: lock directory {} is a symbolic link; expected", b.lock_dir.display())),
        "{e}"
    );
    assert_eq!(fs::read_dir(&theirs).unwrap().count(), 0, "affa wrote into the symlinked directory");
    assert!(!b.a.job_dir("web").join("scheduled.0").exists());
    // Root's own directory, but writable by everyone: anything in it may be planted.
    fs::remove_file(&b.lock_dir).unwrap();
    fs::create_dir(&b.lock_dir).unwrap();
    fs::set_permissions(&b.lock_dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let e = one_line_error(&b.a.affa(&["--run", "web"]));
    assert!(
        e.contains(&format!("lock directory {} can be written by others (mode 1777)", b.lock_dir.display())),
        "{e}"
    );
    assert_eq!(fs::metadata(&b.lock_dir).unwrap().mode() & 0o7777, 0o1777, "affa changed what it refused");
    assert!(!b.a.job_dir("web").join("scheduled.0").exists());
}

#[test]
fn kill_never_signals_a_pid_planted_by_a_local_user() {
    let Some(b) = setup("", "killAt=0300\n") else { return };
    let mut victim = Bystander::start();
    // The attacker's lock file names root's process, and the attacker holds its flock, so the
    // job looks running: the old --kill (and the killAt cron line) sent SIGTERM to that pid.
    let file = b.lock_dir.join("web");
    as_nobody(&format!("mkdir {d} && echo {} > {f}", victim.pid(), d = b.lock_dir.display(), f = file.display()));
    let holder = hold_flock(nobody(&format!("exec flock -o {} -c 'read x'", file.display())), &file);
    // As typed, and as the cron line (`--silent --kill JOB`) runs it.
    for args in [&["--kill", "web"][..], &["--silent", "--kill", "web"][..]] {
        let t = Instant::now();
        let e = one_line_error(&b.a.affa(args));
        assert!(e.contains(&format!("lock directory {} is owned by uid {NOBODY_UID}", b.lock_dir.display())), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "--kill waited for a process it must not have signalled");
        assert_alive(&mut victim.0, "--kill signalled the pid the attacker planted");
    }
    let out = ok(&b.a.affa(&["--killall"]));
    assert!(!out.contains("stopped"), "{out}");
    assert_alive(&mut victim.0, "--killall signalled the pid the attacker planted");
    release(holder);
}

#[test]
fn kill_signals_only_the_affa_process_that_holds_the_lock() {
    let Some(b) = setup("", "") else { return };
    // affa's own lock directory (made by a run), then a lock file that names a process that is
    // not the lock's holder, or a holder that is not affa: e.g. a corrupted file, or a pid reused.
    ok(&b.a.affa(&["--run", "web"]));
    let file = b.lock_dir.join("web");
    let mut victim = Bystander::start();
    let mut c = Command::new("flock");
    c.arg("-o").arg(&file).args(["-c", "read x"]);
    let holder = hold_flock(blocking_signals(&c), &file);
    let holder_pid = holder.id();
    fs::write(&file, format!("{}\n", victim.pid())).unwrap();
    let e = one_line_error(&b.a.affa(&["--kill", "web"]));
    assert_eq!(
        e,
        format!(
            "affa: error: lock file {} names pid {v}, but the lock is held by pid {holder_pid}; not signalling pid {v}",
            file.display(),
            v = victim.pid()
        )
    );
    fs::write(&file, format!("{holder_pid}\n")).unwrap();
    let e = one_line_error(&b.a.affa(&["--kill", "web"]));
    assert!(
        e.starts_with(&format!("affa: error: pid {holder_pid} (lock file {}) runs /", file.display()))
            && e.ends_with("flock, not affa; not signalling it"),
        "{e}"
    );
    assert_alive(&mut victim.0, "--kill signalled a process that is not the lock's holder");
    let mut holder = holder;
    assert_alive(&mut holder, "--kill signalled a lock holder that is not affa");
    release(holder);
}

#[test]
fn kill_stops_a_running_job_and_says_what_happened() {
    let Some(b) = setup("", "preJobCommand=slow.sh\n") else { return };
    let scripts = b.a.state.join("scripts");
    fs::create_dir_all(&scripts).unwrap();
    fs::write(scripts.join("slow.sh"), "#!/bin/sh\nsleep 2\n").unwrap();
    fs::set_permissions(scripts.join("slow.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut run = b.a.cmd().args(["--run", "web"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until(Duration::from_secs(20), "the run to take its lock", || {
        affa::lock::holder(&b.lock_dir, "web").is_some()
    });
    assert_eq!(affa::lock::holder(&b.lock_dir, "web"), Some(run.id() as i32));
    let out = ok(&b.a.affa(&["--kill", "web"]));
    assert_eq!(out, format!("job web (pid {}) stopped\n", run.id()));
    let st = run.wait().unwrap();
    assert!(!st.success(), "the killed run reported success");
    assert!(!b.a.job_dir("web").join("scheduled.0").exists(), "the killed run made an archive");
    assert_eq!(ok(&b.a.affa(&["--kill", "web"])), "job web is not running\n");
}

// ---------------------------------------------------------------- the atomic writer

/// The pids the next processes will get (from the last one given, wrapping at pid_max).
fn next_pids(n: u32) -> Vec<u32> {
    let read = |p: &str| fs::read_to_string(p).unwrap().trim().parse::<u32>().unwrap();
    let (last, max) = (read("/proc/sys/kernel/ns_last_pid"), read("/proc/sys/kernel/pid_max"));
    (1..=n).map(|i| if last + i < max { last + i } else { 300 + (last + i - max) }).collect()
}

#[test]
fn the_metrics_writer_follows_no_symlink_planted_in_the_metrics_directory() {
    let Some(b) = setup("", "") else { return };
    // node_exporter's textfile directory belongs to its own user (here nobody).
    let prom_dir = b.a.state.join("prom");
    fs::create_dir(&prom_dir).unwrap();
    fs::set_permissions(&prom_dir, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&prom_dir, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
    let prom = prom_dir.join("affa.prom");
    let g = fs::read_to_string(b.a.conf.join("00-global.conf")).unwrap();
    b.a.write_conf(
        "00-global.conf",
        &g.replace(&format!("{}/nodir/affa.prom", b.a.state.display()), &prom.to_string_lossy()),
    );

    // The old writer's temp name was `.affa.prom.tmp-PID`: the attacker plants it, as a symlink
    // to a root file, for the pids the next processes get.
    let pids = next_pids(3000);
    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    as_nobody(&format!(
        "exec perl -e 'for (@ARGV) {{ symlink(\"{v}\", \"{d}/.affa.prom.tmp-$_\") or die \"$!\" }}' {}",
        list.join(" "),
        v = b.victim.display(),
        d = prom_dir.display()
    ));
    let planted = fs::read_dir(&prom_dir).unwrap().count();
    assert_eq!(planted, 3000);
    let out = ok(&b.a.affa(&["--metrics"]));
    assert!(out.contains(&prom.display().to_string()), "{out}");
    b.assert_victim_untouched();
    let m = fs::symlink_metadata(&prom).unwrap();
    assert!(m.file_type().is_file(), "affa.prom is not a regular file");
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o644));
    assert!(fs::read_to_string(&prom).unwrap().contains("affa_"), "no metrics written");
    // Nothing else appeared (no temp file left behind), nothing planted was used.
    assert_eq!(fs::read_dir(&prom_dir).unwrap().count(), planted + 1);

    // A symlink at the destination itself: refused, not written through (nor replaced).
    fs::remove_file(&prom).unwrap();
    as_nobody(&format!("ln -s {} {}", b.victim.display(), prom.display()));
    let e = one_line_error(&b.a.affa(&["--metrics"]));
    assert_eq!(
        e,
        format!(
            "affa: error: {} is a symbolic link; affa does not write through it (remove it, then run again)",
            prom.display()
        )
    );
    b.assert_victim_untouched();
    // After a run, the metrics refresh does not write through it either (and the run succeeds).
    ok(&b.a.affa(&["--run", "web"]));
    b.assert_victim_untouched();
    assert!(fs::symlink_metadata(&prom).unwrap().file_type().is_symlink());
}

/// The modes of the files created in `dir` while `f` runs, each taken the moment inotify
/// reports its creation (None: it was gone before it could be looked at). The watcher blocks in
/// read(2), woken by each creation; the creation of [`STOP`] once `f` is done ends it.
fn modes_of_created_files(dir: &Path, f: impl FnOnce()) -> Vec<(String, Option<u32>)> {
    use rustix::fs::inotify;
    const STOP: &str = ".inotify-watch-done";
    /// Ends the watch when `f` is done, also when it panics.
    struct Done(PathBuf);
    impl Drop for Done {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, "");
        }
    }
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, dir, inotify::WatchFlags::CREATE).unwrap();
    let dir2 = dir.to_path_buf();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut r = inotify::Reader::new(&fd, &mut buf);
        loop {
            let ev = r.next().unwrap_or_else(|e| panic!("inotify: {e}"));
            if let Some(n) = ev.file_name() {
                let n = n.to_string_lossy().into_owned();
                if n == STOP {
                    return seen;
                }
                let mode = fs::symlink_metadata(dir2.join(&n)).ok().map(|m| m.mode() & 0o7777);
                seen.push((n, mode));
            }
        }
    });
    {
        let _done = Done(dir.join(STOP));
        f();
    }
    let seen = watcher.join().unwrap();
    fs::remove_file(dir.join(STOP)).unwrap();
    seen
}

#[test]
fn a_config_rewrite_never_makes_the_file_readable_by_others() {
    let Some(b) = setup("", "") else { return };
    // A configuration directory others may list (e.g. /etc/affa made 0755 by hand), and a job
    // file holding the ESXi password, 0600. Big, so the rewrite takes a while.
    fs::set_permissions(&b.a.conf, fs::Permissions::from_mode(0o755)).unwrap();
    let jobs = b.a.conf.join("jobs.conf");
    let mut text = fs::read_to_string(&jobs).unwrap();
    text.push_str("# ESXiPassword=hunter2 (the secret of this file)\n");
    text.push_str(&"# padding so that writing the file takes a moment\n".repeat(400_000));
    b.a.write_conf("jobs.conf", &text);
    assert_eq!(fs::metadata(&jobs).unwrap().mode() & 0o7777, 0o600);

    let mut names = ("web", "web2");
    let mut observed = Vec::new();
    for _ in 0..5 {
        let seen = modes_of_created_files(&b.a.conf, || {
            ok(&b.a.affa(&["--rename-job", names.0, names.1]));
        });
        for (n, mode) in &seen {
            if let Some(m) = mode {
                assert_eq!(m & 0o077, 0, "{n} was created with mode {m:04o}: readable by others during the rewrite");
                observed.push(n.clone());
            }
        }
        let m = fs::metadata(&jobs).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, 0), "the rewritten file is not 0600 root");
        assert!(fs::read_to_string(&jobs).unwrap().contains(&format!("[{}]\n", names.1)));
        names = (names.1, names.0);
        if !observed.is_empty() {
            break;
        }
    }
    assert!(!observed.is_empty(), "no temp file of the rewrite was ever seen: the test proves nothing");
    // Only jobs.conf is left: no temp file.
    let left: Vec<String> =
        fs::read_dir(&b.a.conf).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

// ---------------------------------------------------------------- Samba

#[test]
fn an_empty_samba_valid_user_is_refused_so_no_other_samba_user_reads_the_archives() {
    let Some(b) = setup("", "") else { return };
    let smbd = start_smbd();
    let _mounts = common::smb::ShareMounts(b.a.state.join("shared/affa/samba-mounts"));
    smbd.add_user("nobody", "nobody-Smb-pw1");
    let smb_conf = smbd.dir.path().join("smb.conf");
    let g = fs::read_to_string(b.a.conf.join("00-global.conf")).unwrap();
    b.a.write_conf(
        "00-global.conf",
        &format!("{g}sambaConfDir={}/samba\nsmbConf={}\n", b.a.state.display(), smb_conf.display()),
    );
    let job = |users: &str| {
        format!(
            "[web]\nremoteHostName=localhost\nInclude={}/data\nSambaShare=yes\nSambaValidUser={users}\n",
            b.src.path().display()
        )
    };
    b.a.write_conf("jobs.conf", &job("root"));
    ok(&b.a.affa(&["--run", "web"]));
    let rel = b.src.path().strip_prefix("/").unwrap().join("data/hello.txt");
    let get = format!("get scheduled.0/{} {}/got.txt", rel.display(), b.a.tmp.path().display());

    // Named users only: root reads, the other Samba user nobody is denied.
    ok(&b.a.affa(&["--samba-shares"]));
    let o = smbclient_until_ok(&smbd, "web", &get);
    assert!(o.status.success(), "root cannot read its share: {}", String::from_utf8_lossy(&o.stdout));
    let o = smbclient_as(&smbd, "nobody", "nobody-Smb-pw1", "web", &get);
    assert!(!o.status.success(), "nobody read the archive of a share for root only");

    // An empty SambaValidUser would be `valid users =`: every Samba user, reading as root.
    b.a.write_conf("jobs.conf", &job(""));
    let samba_before = (tree_hashes(&b.a.state.join("samba")), fs::read(&smb_conf).unwrap());
    let e = one_line_error(&b.a.affa(&["--samba-shares"]));
    assert_eq!(
        e,
        format!(
            "affa: error: {}:1: job [web] has SambaShare=yes but SambaValidUser is empty; expected the Samba users \
             allowed to read its archives (e.g. SambaValidUser=affa): the share reads every archive as root, so it \
             is never opened to all users",
            b.a.conf.join("jobs.conf").display()
        )
    );
    let share = fs::read_to_string(b.a.state.join("samba/affa-job-web.conf")).unwrap();
    assert!(share.contains("\tvalid users = root\n"), "the share file was changed: {share}");
    // Nothing Samba reads changed (so there is nothing for smbd to reload and let nobody in).
    let samba_now = (tree_hashes(&b.a.state.join("samba")), fs::read(&smb_conf).unwrap());
    assert!(samba_now == samba_before, "the refused --samba-shares changed Samba's configuration");
    let o = smbclient_as(&smbd, "nobody", "nobody-Smb-pw1", "web", &get);
    assert!(!o.status.success(), "nobody read the archive after SambaValidUser was emptied");
    // The run is refused too (the configuration is wrong), and nothing else changed.
    let e = one_line_error(&b.a.affa(&["--run", "web"]));
    assert!(e.contains("SambaValidUser is empty"), "{e}");
    // --make-cronjobs writes the cron file and fails on the shares (it said what it wrote and
    // exited 0, the Samba problem a line of its output).
    let cron = b.a.state.join("cron.d/affa");
    let o = b.a.affa(&["--make-cronjobs"]);
    let e = one_line_error(&o);
    assert!(e.starts_with("affa: error: Samba shares not updated: ") && e.contains("SambaValidUser is empty"), "{e}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("{} written: ", cron.display())));
    // --_cronupdate from cron (silent unless it fails): the same error, where cron mails it
    // (it dropped the line). The cron file is made older than the configuration to be rewritten.
    let st = Command::new("touch").args(["-d", "2001-01-01"]).arg(&cron).status().unwrap();
    assert!(st.success());
    let e = one_line_error(&b.a.affa(&["--silent", "--_cronupdate"]));
    assert!(e.starts_with("affa: error: Samba shares not updated: ") && e.contains("SambaValidUser is empty"), "{e}");
    assert!(fs::metadata(&cron).unwrap().modified().unwrap() > std::time::SystemTime::now() - Duration::from_secs(600));
    // A second shared job is shared all the same while web is broken (web's share kept as it
    // was); the command fails with web's error.
    let web_share = fs::read_to_string(b.a.state.join("samba/affa-job-web.conf")).unwrap();
    b.a.write_conf(
        "jobs.conf",
        &format!(
            "{}[db]\nremoteHostName=localhost\nInclude={}/data\nSambaShare=yes\nSambaValidUser=root\n",
            job(""),
            b.src.path().display()
        ),
    );
    let e = one_line_error(&b.a.affa(&["--samba-shares"]));
    assert!(e.contains("job [web] has SambaShare=yes but SambaValidUser is empty"), "{e}");
    assert!(b.a.state.join("samba/affa-job-db.conf").is_file(), "the working job was not shared");
    assert_eq!(fs::read_to_string(b.a.state.join("samba/affa-job-web.conf")).unwrap(), web_share);
    let index = fs::read_to_string(b.a.state.join("samba/affa-shares.conf")).unwrap();
    assert!(index.contains("affa-job-db.conf") && index.contains("affa-job-web.conf"), "{index}");
}
