//! The backup engine end to end: a real sshd and rsync on 127.0.0.1, the affa binary.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn source_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::create_dir_all(root.join("home/u/docs")).unwrap();
    fs::write(root.join("etc/app/app.conf"), "port=80\n").unwrap();
    fs::write(root.join("home/u/docs/a.txt"), "alpha\n").unwrap();
    fs::write(root.join("home/u/docs/b.txt"), "bravo\n").unwrap();
    fs::write(root.join("home/u/big.bin"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("docs/a.txt", root.join("home/u/link")).unwrap();
}

struct Setup {
    sshd: Sshd,
    affa: Affa,
    src: tempfile::TempDir,
}

/// The job `web` on the shared sshd.
fn setup(extra: &str) -> Setup {
    setup_on(Sshd::shared(), extra)
}

/// The job `web` on `sshd` (a private one for a test that changes its sshd).
fn setup_on(mut sshd: Sshd, extra: &str) -> Setup {
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    source_tree(src.path());
    let inc = format!("Include={}/etc\nInclude={}/home\n{extra}", src.path().display(), src.path().display());
    affa.write_conf("web.conf", &affa.ssh_job("web", &sshd, &inc));
    let out = ok(&affa.send_key(&mut sshd, "web"));
    assert!(out.contains("key installed"), "{out}");
    Setup { sshd, affa, src }
}

fn archived(s: &Setup, archive: &str, rel: &str) -> std::path::PathBuf {
    s.affa.job_dir("web").join(archive).join(s.src.path().strip_prefix("/").unwrap()).join(rel)
}

/// `--move-archive` to another file system (a tmpfs): every archive arrives whole, an unchanged
/// file still shares one inode between the two archives, nothing of the copy's temporary name
/// is left, and the original is gone only after. New RootDirs that would not read back as
/// themselves, or that lie inside a job's archives, are refused before anything moves.
#[test]
fn move_archive_across_file_systems_keeps_every_archive_and_its_links() {
    let s = setup("scheduledKeep=3\n");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&s.affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    let job_dir = s.affa.job_dir("web");
    let before = tree_hashes(&job_dir);
    let conf_before = fs::read(s.affa.conf.join("web.conf")).unwrap();
    let newroot = s.affa.tmp.path().join("newroot");
    fs::create_dir_all(&newroot).unwrap();
    // Refused: nothing moves, the file is unchanged.
    let nr = newroot.to_str().unwrap();
    fs::write(s.affa.tmp.path().join("afile"), "x").unwrap();
    let afile = s.affa.tmp.path().join("afile");
    for (bad, why) in [
        (format!("{nr} "), "white space"),
        (format!("{nr} #2"), "comment"),
        (format!("{nr}/../newroot"), "'..'"),
        ("relative/dir".to_string(), "absolute path"),
        (afile.to_str().unwrap().to_string(), "not a directory"),
        (format!("{nr}/missing"), "does not exist"),
        (job_dir.join("scheduled.0").to_str().unwrap().to_string(), "inside the archives of job web"),
    ] {
        let e = fail(&s.affa.affa(&["--move-archive", "web", &bad, "--yes"]));
        assert!(e.contains("new RootDir '") && e.contains(why), "{bad:?}: {e}");
        assert_eq!(fs::read(s.affa.conf.join("web.conf")).unwrap(), conf_before);
        assert_eq!(tree_hashes(&job_dir), before);
    }
    let mounted = Command::new("mount").args(["-t", "tmpfs", "affa-test-newroot"]).arg(&newroot).status().unwrap();
    assert!(mounted.success(), "mount -t tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _m = Umount(newroot.clone());
    ok(&s.affa.affa(&["--move-archive", "web", nr, "--yes"]));
    assert!(!job_dir.exists(), "the original is still there");
    let moved = newroot.join("web");
    assert_eq!(tree_hashes(&moved), before, "the archives differ after the move");
    let rel = s.src.path().strip_prefix("/").unwrap().join("home/u/docs/a.txt");
    assert_eq!(
        inode(&moved.join("scheduled.0").join(&rel)),
        inode(&moved.join("scheduled.1").join(&rel)),
        "an unchanged file no longer shares its inode between the archives"
    );
    let left: Vec<String> =
        fs::read_dir(&newroot).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(left, ["web"], "{left:?}");
    assert!(fs::read_to_string(s.affa.conf.join("web.conf")).unwrap().contains(&format!("RootDir={nr}\n")));
    // The next run links to the moved archives.
    ok(&s.affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    assert_eq!(inode(&moved.join("scheduled.0").join(&rel)), inode(&moved.join("scheduled.1").join(&rel)));
}

#[test]
fn send_key_installs_once_and_revoke_removes_exactly_our_line() {
    let mut s = setup("");
    // A line of someone else's must survive.
    let mut keys = fs::read_to_string(&s.sshd.authorized_keys).unwrap();
    assert_eq!(keys.lines().count(), 1, "{keys}");
    keys.push_str("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyOtherKeyOtherKeyOtherKeyOther other@host\n");
    fs::write(&s.sshd.authorized_keys, &keys).unwrap();
    ok(&s.affa.send_key(&mut s.sshd, "web"));
    assert_eq!(fs::read_to_string(&s.sshd.authorized_keys).unwrap().lines().count(), 2, "key appended twice");
    let ours = fs::read_to_string(s.affa.state.join("ssh/id_ed25519_affa.pub")).unwrap();
    assert!(ours.starts_with("ssh-ed25519 "));
    ok(&s.affa.affa(&["--check-connections", "web"]));
    ok(&s.affa.affa(&["--revoke-key", "web"]));
    let left = fs::read_to_string(&s.sshd.authorized_keys).unwrap();
    assert_eq!(left, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyOtherKeyOtherKeyOtherKeyOther other@host\n");
    let e = fail(&s.affa.affa(&["--check-connections", "web"]));
    assert!(e.contains("connection check failed for: web"), "{e}");
}

#[test]
fn backups_link_unchanged_files_and_drop_deleted_ones() {
    let s = setup("scheduledKeep=3\n");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let a = archived(&s, "scheduled.0", "home/u/docs/a.txt");
    assert_eq!(fs::read_to_string(&a).unwrap(), "alpha\n");
    assert_eq!(fs::read_link(archived(&s, "scheduled.0", "home/u/link")).unwrap(), Path::new("docs/a.txt"));
    let report = fs::read_to_string(s.affa.job_dir("web").join("scheduled.0/.AFFA3-REPORT")).unwrap();
    assert!(report.contains("Date=202603021000"), "{report}");
    assert!(report.contains("ExitStatus=0"));
    assert!(report.contains("NumberOfFiles="));
    assert!(s.affa.job_dir("web").join("scheduled.0/.web-setup.ini").exists());
    let first = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));

    // Change one file, delete another.
    fs::write(s.src.path().join("home/u/docs/b.txt"), "bravo two\n").unwrap();
    fs::remove_file(s.src.path().join("etc/app/app.conf")).unwrap();
    ok(&s.affa.affa_at("2026-03-02T14:00:00", &["--run", "web"]));
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0", "scheduled.1"]);
    // Unchanged: the same inode as in the previous archive. Changed: a new one.
    assert_eq!(
        inode(&archived(&s, "scheduled.0", "home/u/docs/a.txt")),
        inode(&archived(&s, "scheduled.1", "home/u/docs/a.txt"))
    );
    assert_eq!(
        inode(&archived(&s, "scheduled.0", "home/u/big.bin")),
        inode(&archived(&s, "scheduled.1", "home/u/big.bin"))
    );
    assert_ne!(
        inode(&archived(&s, "scheduled.0", "home/u/docs/b.txt")),
        inode(&archived(&s, "scheduled.1", "home/u/docs/b.txt"))
    );
    assert_eq!(fs::read_to_string(archived(&s, "scheduled.0", "home/u/docs/b.txt")).unwrap(), "bravo two\n");
    // Deleted: gone from the new archive only.
    assert!(!archived(&s, "scheduled.0", "etc/app/app.conf").exists());
    assert!(archived(&s, "scheduled.1", "etc/app/app.conf").exists());
    // The first archive is byte-identical to what it was (apart from nothing).
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.1")), first);

    let list = ok(&s.affa.affa(&["--list-archives", "web"]));
    // Affa 3's layout (issue 15): the weekday before the date.
    assert!(list.contains("| S 0  | Mon 2026-03-02 14:00"), "{list}");
    assert!(list.contains("| S 1  | Mon 2026-03-02 10:00"), "{list}");
    let csv = ok(&s.affa.affa(&["--list", "--csv"]));
    // Affa 3's columns first (index as 5 digits), the job after them (issue 15).
    assert!(csv.lines().nth(1).unwrap().starts_with("scheduled;00001;202603021000;"), "{csv}");
    assert!(csv.lines().nth(2).unwrap().starts_with("scheduled;00000;202603021400;"), "{csv}");
    assert_eq!(csv.lines().nth(1).unwrap().split(';').nth(16), Some("web"), "{csv}");
    let st = ok(&s.affa.affa_at("2026-03-02T15:00:00", &["--status"]));
    assert!(st.contains("web") && st.contains("14:00") && st.contains(" 2, 0, 0, 0, 0"), "{st}");
    let log = ok(&s.affa.affa(&["--log-tail", "web"]));
    assert!(log.contains("Completed job web scheduled"), "{log}");
}

#[test]
fn changed_host_key_stops_the_run_before_anything_moves() {
    let mut s = setup_on(Sshd::start(), "");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let before = tree_hashes(&s.affa.job_dir("web"));
    s.sshd.change_host_key();
    let e = fail(&s.affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    assert!(e.contains("host key of 127.0.0.1") && e.contains("has CHANGED"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(tree_hashes(&s.affa.job_dir("web")), before);
    // --send-key does not silently accept the new key either.
    let e = fail(&s.affa.send_key(&mut s.sshd, "web"));
    assert!(e.contains("CHANGED"), "{e}");
}

#[test]
fn wrong_remote_path_fails_and_leaves_archives_alone() {
    let s = setup("");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let before = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    let ino = inode(&archived(&s, "scheduled.0", "home/u/docs/a.txt"));
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job("web", &s.sshd, &format!("Include={}/home\nInclude=/no/such/dir\n", s.src.path().display())),
    );
    let e = fail(&s.affa.affa_at("2026-03-03T10:00:00", &["--run", "web"]));
    assert!(e.contains("rsync failed with exit 23") && e.contains("/no/such/dir"), "{e}");
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), before);
    assert_eq!(inode(&archived(&s, "scheduled.0", "home/u/docs/a.txt")), ino);
    assert!(s.affa.job_dir("web").join("scheduled.running").exists());
    // No daily promotion happened on the failed run of a new day.
    assert!(!s.affa.job_dir("web").join("daily.0").exists());
}

#[test]
fn bad_config_is_one_line_naming_file_line_key() {
    let s = setup("");
    // A configuration error stops its own job only (issue 15): --run of that job fails with
    // the one line, --configcheck reports it, every other job and command works.
    s.affa.write_conf("bad.conf", "[db]\nremoteHostName=x\nstatus=enbabled\n");
    let e = fail(&s.affa.affa(&["--run", "db"]));
    let f = s.affa.conf.join("bad.conf");
    assert_eq!(
        e.trim(),
        format!("affa: error: {}:3: key 'status' has the value 'enbabled', expected enabled or disabled", f.display())
    );
    s.affa.write_conf("bad.conf", "[db]\nremoteHostName=x\nTimeSchedule=2561\n");
    let e = fail(&s.affa.affa(&["--configcheck"]));
    assert!(e.contains("bad.conf:3: key 'TimeSchedule' has the value '2561'"), "{e}");
    s.affa.write_conf("bad.conf", "[db]\nremoteHostName=x\ndailyKeep=lots\n");
    assert!(fail(&s.affa.affa(&["--configcheck"])).contains("expected a whole number"));
    ok(&s.affa.affa(&["--status"]));
    s.affa.write_conf("bad.conf", "[db]\nRootDir=/x\n");
    assert!(fail(&s.affa.affa(&["--run", "db"])).contains("has no remoteHostName"));
    s.affa.write_conf("bad.conf", "[d b]\nremoteHostName=x\n");
    assert!(fail(&s.affa.affa(&["--configcheck"])).contains("job name 'd b' is not valid"));
    s.affa.write_conf("bad.conf", "[web]\nremoteHostName=x\n");
    assert!(fail(&s.affa.affa(&["--run", "web"])).contains("section [web] is defined twice"));
    s.affa.write_conf("bad.conf", "[db]\nremoteHostname=x\nremotUser=root\n");
    assert!(
        fail(&s.affa.affa(&["--run", "db"])).contains("unknown key 'remotUser' in [db] (did you mean 'remoteUser'?)")
    );
    fs::remove_file(f).unwrap();
    ok(&s.affa.affa(&["--configcheck"]));
    assert!(fail(&s.affa.affa(&["--run", "nosuchjob"])).contains("no job named 'nosuchjob'"));
    assert!(fail(&s.affa.affa(&["--run", "web", "hourly"])).contains("unknown level 'hourly'"));
}

#[test]
fn missing_root_dir_is_an_error_not_a_new_directory() {
    let s = setup("");
    let gone = s.affa.tmp.path().join("unmounted");
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job(
            "web",
            &s.sshd,
            &format!("Include={}/home\nRootDir={}\n", s.src.path().display(), gone.display()),
        ),
    );
    let e = fail(&s.affa.affa(&["--run", "web"]));
    assert!(e.contains("RootDir") && e.contains("does not exist"), "{e}");
    assert!(!gone.exists());
}

#[test]
fn second_run_is_refused_naming_the_pid_and_kill_9_resumes() {
    let s = setup("");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let before = tree_hashes(&s.affa.job_dir("web").join("scheduled.0"));
    // A large new file, sent slowly, so the run is still in rsync when we look.
    let big = s.src.path().join("home/u/large.img");
    let data: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(&big, &data).unwrap();
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job(
            "web",
            &s.sshd,
            &format!(
                "Include={}/etc\nInclude={}/home\nBandwidthLimit=2000\n",
                s.src.path().display(),
                s.src.path().display()
            ),
        ),
    );
    let mut child = s.affa.cmd().env("AFFA_FAKE_NOW", "2026-03-02T11:00:00").args(["--run", "web"]).spawn().unwrap();
    let running = s.affa.job_dir("web").join("scheduled.running");
    wait_until(Duration::from_secs(30), "more than 2 MiB of large.img to arrive", || {
        walk_find(&running, "large.img").is_some_and(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0) > 2 << 20)
    });
    let e = fail(&s.affa.affa(&["--run", "web"]));
    assert!(e.contains(&format!("job web is already running (pid {})", child.id())), "{e}");
    // kill -9 in the middle of the rsync of the large file. rsync dies with affa; its receiver
    // and ssh (rsync's own children) finish the file they are writing, then end too.
    let run = descendants(child.id());
    signal(child.id(), rustix::process::Signal::KILL);
    child.wait().unwrap();
    wait_until(Duration::from_secs(60), "the killed run's rsync receiver and ssh to end", || {
        run.iter().all(|&p| !alive(p))
    });
    assert!(running.exists());
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("scheduled.0")), before);
    let st = ok(&s.affa.affa(&["--status"]));
    assert!(st.contains("interrupted"), "{st}");
    // The next run resumes and completes; the earlier archive is untouched.
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job(
            "web",
            &s.sshd,
            &format!("Include={}/etc\nInclude={}/home\n", s.src.path().display(), s.src.path().display()),
        ),
    );
    ok(&s.affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    // scheduledKeep=1: the first run of the day promoted the earlier archive to daily.0, by
    // renaming it: its content is what it was.
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["daily.0", "scheduled.0"]);
    assert_eq!(tree_hashes(&s.affa.job_dir("web").join("daily.0")), before);
    let got = fs::read(archived(&s, "scheduled.0", "home/u/large.img")).unwrap();
    assert!(got == data, "resumed file differs");
    assert!(!running.exists());
    assert!(!s.affa.job_dir("web").join(".scheduled.resume").exists());
}

/// `kill -9` of affa stops rsync (its direct child, `PR_SET_PDEATHSIG`), but rsync's own forked
/// receiver goes on writing into `scheduled.running` for a while. A run started at once must
/// stop those leftovers before it touches the archives, say so, and resume cleanly.
/// Start a run of `web` that copies a 24 MiB file slowly, kill -9 affa once more than 2 MiB
/// arrived; returns the file's bytes and the run's processes still alive right after the kill.
fn kill_a_run_mid_transfer(s: &Setup, extra: &str) -> (Vec<u8>, Vec<u32>) {
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let big = s.src.path().join("home/u/large.img");
    let data: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    fs::write(&big, &data).unwrap();
    s.affa.write_conf("web.conf", &web_conf(s, &format!("BandwidthLimit=2000\n{extra}")));
    let mut child = s.affa.cmd().env("AFFA_FAKE_NOW", "2026-03-02T11:00:00").args(["--run", "web"]).spawn().unwrap();
    let running = s.affa.job_dir("web").join("scheduled.running");
    wait_until(Duration::from_secs(30), "more than 2 MiB of large.img to arrive", || {
        walk_find(&running, "large.img").is_some_and(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0) > 2 << 20)
    });
    let run = descendants(child.id());
    signal(child.id(), rustix::process::Signal::KILL);
    child.wait().unwrap();
    s.affa.write_conf("web.conf", &web_conf(s, extra));
    (data, run.iter().copied().filter(|&p| alive(p)).collect())
}

fn web_conf(s: &Setup, extra: &str) -> String {
    s.affa.ssh_job(
        "web",
        &s.sshd,
        &format!("Include={}/etc\nInclude={}/home\n{extra}", s.src.path().display(), s.src.path().display()),
    )
}

/// The next run after a kill -9 resumes the transfer into an archive identical to the source.
fn next_run_resumes(s: &Setup, data: &[u8]) {
    ok(&s.affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    let got = fs::read(archived(s, "scheduled.0", "home/u/large.img")).unwrap();
    assert!(got == data, "resumed file differs");
    assert!(!s.affa.job_dir("web").join("scheduled.running").exists());
}

/// Without a shared connection (an ssh that cannot be a ControlMaster: each session connects on
/// its own), rsync's own ssh keeps its connection when affa is killed and the receiver writes
/// on into scheduled.running: the next run stops it before it resumes.
#[test]
fn the_next_run_stops_what_a_killed_run_left_writing() {
    let s = setup("");
    let wrapper = s.affa.tmp.path().join("ssh-no-master");
    fs::write(
        &wrapper,
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = ControlMaster=yes ] && { echo 'no master here' >&2; exit 255; }; done\nexec ssh \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let (data, left) = kill_a_run_mid_transfer(&s, &format!("localSSHBinary={}\n", wrapper.display()));
    assert!(!left.is_empty(), "the killed run left no process (rsync's receiver was expected to outlive it)");
    next_run_resumes(&s, &data);
    let log = ok(&s.affa.affa(&["--log-tail", "web"]));
    assert!(log.contains("stopped processes left by an earlier, killed run of job web (pids "), "{log}");
    let still: Vec<u32> = left.iter().copied().filter(|&p| alive(p)).collect();
    assert!(still.is_empty(), "processes of the killed run still alive after the next run: {still:?}");
}

/// With the run's shared ssh connection, a kill -9 of affa takes the connection with it (the
/// master dies with affa): rsync's session through it ends and nothing of the killed run goes
/// on writing into scheduled.running; the next run resumes.
#[test]
fn a_killed_run_leaves_nothing_writing_through_its_shared_connection() {
    let s = setup("");
    let (data, left) = kill_a_run_mid_transfer(&s, "");
    // At 2000 KB/s, the rest of the file would take more than 10 s to arrive.
    wait_until(Duration::from_secs(5), "the killed run's processes to end on their own", || {
        left.iter().all(|&p| !alive(p))
    });
    let running = s.affa.job_dir("web").join("scheduled.running");
    let size = || walk_find(&running, "large.img").and_then(|p| fs::metadata(p).ok()).map(|m| m.len());
    let before = size();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(size(), before, "large.img still grows after the killed run's processes ended");
    assert!(before.is_some_and(|n| n < data.len() as u64), "the transfer was not cut: {before:?}");
    next_run_resumes(&s, &data);
    let log = ok(&s.affa.affa(&["--log-tail", "web"]));
    assert!(!log.contains("stopped processes left by an earlier, killed run"), "{log}");
}

fn walk_find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() && !p.is_symlink() {
            if let Some(f) = walk_find(&p, name) {
                return Some(f);
            }
        }
    }
    None
}

#[test]
fn full_root_dir_fails_cleanly_and_the_next_run_succeeds() {
    assert!(is_root(), "this test mounts a small tmpfs and must run as root (as CI does)");
    let s = setup("");
    let small = s.affa.tmp.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(st.success(), "mount tmpfs failed");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(small.clone());
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job(
            "web",
            &s.sshd,
            &format!("Include={}/etc\nRootDir={}\nDiskSpaceWarn=none\n", s.src.path().display(), small.display()),
        ),
    );
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let before = tree_hashes(&small.join("web/scheduled.0"));
    fs::write(s.src.path().join("etc/app/huge.bin"), vec![1u8; 3 << 20]).unwrap();
    let e = fail(&s.affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    assert!(e.contains("rsync failed"), "{e}");
    assert_eq!(archive_names(&small.join("web")), ["scheduled.0"]);
    assert_eq!(tree_hashes(&small.join("web/scheduled.0")), before);
    fs::remove_file(s.src.path().join("etc/app/huge.bin")).unwrap();
    fs::write(s.src.path().join("etc/app/new.conf"), "x=1\n").unwrap();
    ok(&s.affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    assert!(small
        .join("web/scheduled.0")
        .join(s.src.path().strip_prefix("/").unwrap())
        .join("etc/app/new.conf")
        .exists());
}

#[test]
fn maintenance_commands_ask_and_act() {
    let s = setup("scheduledKeep=2\n");
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&s.affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    // Lower the keep: --cleanup lists what it would delete and needs 'proceed' or --yes.
    s.affa.write_conf(
        "web.conf",
        &s.affa.ssh_job("web", &s.sshd, &format!("Include={}/home\nscheduledKeep=1\n", s.src.path().display())),
    );
    let e = fail(&s.affa.affa(&["--cleanup", "web"]));
    assert!(e.contains("scheduled.1") && e.contains("--yes"), "{e}");
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0", "scheduled.1"]);
    ok(&s.affa.affa(&["--cleanup", "web", "--yes"]));
    assert_eq!(archive_names(&s.affa.job_dir("web")), ["scheduled.0"]);
    // A job renamed to the global section's name would be a second [GlobalAffaConfig] (or one
    // that looks like it): every job would stop. Refused, nothing changed.
    let conf_before = fs::read(s.affa.conf.join("web.conf")).unwrap();
    for bad in ["GlobalAffaConfig", "globalaffaconfig"] {
        let e = fail(&s.affa.affa(&["--rename-job", "web", bad]));
        assert!(e.contains(&format!("new job name '{bad}' is not valid")) && e.contains("not GlobalAffaConfig"), "{e}");
        assert_eq!(fs::read(s.affa.conf.join("web.conf")).unwrap(), conf_before);
        assert!(s.affa.job_dir("web").join("scheduled.0").is_dir() && !s.affa.job_dir(bad).exists());
    }
    // Rename, then move the archive, then delete.
    ok(&s.affa.affa(&["--rename-job", "web", "www"]));
    assert!(s.affa.job_dir("www").join("scheduled.0").is_dir());
    ok(&s.affa.affa(&["--check-connections", "www"]));
    let newroot = s.affa.tmp.path().join("newroot");
    fs::create_dir_all(&newroot).unwrap();
    ok(&s.affa.affa(&["--move-archive", "www", newroot.to_str().unwrap(), "--yes"]));
    assert!(newroot.join("www/scheduled.0").is_dir());
    ok(&s.affa.affa_at("2026-03-02T12:00:00", &["--run", "www"]));
    assert_eq!(archive_names(&newroot.join("www")), ["scheduled.0"]);
    ok(&s.affa.affa(&["--delete-job", "www", "--yes"]));
    assert!(!newroot.join("www").exists());
    assert!(fail(&s.affa.affa(&["--list-archives", "www"])).contains("no job named 'www'"));
    let d = ok(&s.affa.affa(&["--disk-usage", "--csv"]));
    assert!(d.starts_with("RootDir;RootDirFilesystemAvail;RootDirFilesystemUsed\n"), "{d}");
}
