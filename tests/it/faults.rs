//! Fault tests (issue 8): kill -9 at every step of an ESXi run with chunked disks, the ssh link
//! cut mid-transfer, the ESXi API unreachable / answering 503 / hanging, RootDir full, a damaged
//! chunk pool, concurrent runs. Each leaves machine-checked invariants (docs/RELIABILITY.md):
//! every archive completed before the fault is still there, byte-identical (hash trees) and
//! verifies clean; no `BEXI-` snapshot is left once the next run has finished; nothing partial
//! is ever named as an archive; a failed run says why on one line.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::sim::{Sim, VmSpec, PASS, USER};
use common::*;

const MB: u64 = 1 << 20;

type Tree = BTreeMap<String, String>;

fn fill(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    for &(off, len) in regions {
        let mut buf = vec![0u8; len as usize];
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

/// Pseudo-random bytes (incompressible, so a small disk still fills a small tmpfs).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The one-line error of a failed run: the last stderr line, `affa: error: ...`.
fn one_line_error(o: &Output) -> String {
    let e = fail(o);
    let last = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    assert!(last.starts_with("affa: error: "), "no one-line error at the end of stderr:\n{e}");
    last
}

/// Every archive of a job: name -> hash tree. Also checks that each one has its report.
fn archives(job_dir: &Path) -> BTreeMap<String, Tree> {
    let mut m = BTreeMap::new();
    for n in archive_names(job_dir) {
        let p = job_dir.join(&n);
        assert!(
            p.join(".AFFA3-REPORT").is_file(),
            "{n} is named as an archive but has no report: a partial transfer was promoted"
        );
        m.insert(n, tree_hashes(&p));
    }
    m
}

/// Every tree of `before` is still one of the archives now (under whatever name rotation gave it).
fn all_kept(before: &BTreeMap<String, Tree>, now: &BTreeMap<String, Tree>, when: &str) {
    for (name, t) in before {
        assert!(
            now.values().any(|x| x == t),
            "{when}: the archive that was {name} is gone or changed; archives now: {:?}",
            now.keys().collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The ESXi setup (as tests/esxi.rs): vm1 with disk 0 on datastore1 and disk 1 on ds2.

struct Esx {
    sshd: Sshd,
    affa: Affa,
    sim: Sim,
    work: tempfile::TempDir,
}

fn esx(big: u64, extra_conf: &str, sim_extra: &str) -> Esx {
    let work = tempfile::Builder::new().prefix("affa-faults").tempdir().unwrap();
    let ds1 = work.path().join("vmfs-ds1");
    let ds2 = work.path().join("vmfs-ds2");
    fill(&ds1.join("vm1/vm1-flat.vmdk"), big, &[(0, MB), (big / 2, MB), (big - MB, MB)], 7);
    fill(&ds2.join("vm1/vm1_1-flat.vmdk"), 2 * MB, &[(0, 2 * MB)], 11);
    let sim = Sim::start(
        &work.path().join("sim"),
        &[("datastore1", &ds1), ("ds2", &ds2)],
        &[VmSpec {
            name: "vm1".into(),
            power_on: true,
            disks: vec![("datastore1".into(), big), ("ds2".into(), 2 * MB)],
        }],
        sim_extra,
    );
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let pwfile = affa.state.join("esx.pw");
    fs::write(&pwfile, format!("{PASS}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).unwrap();
    let conf = affa.ssh_job(
        "esx",
        &sshd,
        &format!(
            "ESXi=yes\nESXiVMName=vm1\nESXiUsername={USER}\nESXiPasswordFile={}\nESXiHost=127.0.0.1\nESXiPort={}\nremoteRsyncBinary=/usr/bin/rsync\n{}{extra_conf}",
            pwfile.display(),
            sim.port,
            if extra_conf.contains("ESXiTaskTimeout") { "" } else { "ESXiTaskTimeout=20\n" }
        ),
    );
    affa.write_conf("esx.conf", &conf);
    let sock = sshd.agent_socket();
    let out = affa.cmd().env("SSH_AUTH_SOCK", sock).args(["--send-key", "esx", "--yes"]).output().unwrap();
    ok(&out);
    Esx { sshd, affa, sim, work }
}

fn counter(e: &Esx, name: &str) -> u64 {
    e.sim.state()["counters"][name].as_u64().unwrap_or(0)
}

/// How many snapshot removals failed on the host (the task of a `then=fail` fault ends so).
fn removals_failed(e: &Esx) -> usize {
    let st = e.sim.state();
    st["events"]
        .as_array()
        .map(|a| a.iter().filter(|v| v["op"] == "remove" && v["result"] == "failed (injected)").count())
        .unwrap_or(0)
}

/// Wait until affa, having started the task `op` (a counter of the harness), waits on it: it
/// asks the host for the task's state after the task began.
fn wait_polling(e: &Esx, op: &str, before: u64) {
    wait_until(Duration::from_secs(60), &format!("the task {op}"), || counter(e, op) > before);
    let polls = counter(e, "soap:RetrievePropertiesEx");
    wait_until(Duration::from_secs(30), &format!("affa to wait on the task {op}"), || {
        counter(e, "soap:RetrievePropertiesEx") > polls
    });
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn kill9(child: &mut std::process::Child) -> std::process::ExitStatus {
    signal(child.id(), rustix::process::Signal::KILL);
    child.wait().unwrap()
}

/// How a run is killed.
enum Kill {
    /// AFFA_TEST_CRASH_AT (deterministic, inside the code).
    At(&'static str),
    /// While the snapshot task hangs (harness fault `hang`).
    DuringCreate,
    /// While rsync runs (found among affa's children).
    DuringRsync,
    /// While the removal task hangs, which then fails (the snapshot stays).
    DuringRemove,
    /// In the middle of the pool sweep: a first run is killed while chunking (its chunks stay
    /// in `.scheduled.resume`), the disk changes, and the resuming run, whose sweep then has
    /// those chunks to remove, is killed after the first removal.
    DuringSweep,
}

#[test]
fn kill_nine_at_every_step_of_an_esxi_run_with_chunked_disks() {
    // scheduledKeep=2 + daily promotion every run (a new day each time) and dailyKeep=60:
    // nothing ever falls off the end, so every earlier archive must survive every fault.
    let e = esx(8 * MB, "scheduledKeep=2\ndailyKeep=60\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\nchunkFiles=*-flat.vmdk\nchunkSize=256K\nchunkTransport=rsync\n", "");
    let job_dir = e.affa.job_dir("esx");
    let conf = fs::read_to_string(e.affa.conf.join("esx.conf")).unwrap();
    let mut day = 0u32;
    let mut now = || {
        day += 1;
        let d = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + chrono::Days::new(day as u64);
        d.format("%Y-%m-%dT21:00:00").to_string()
    };
    let t = now();
    ok(&e.affa.affa_at(&t, &["--run", "esx"]));
    let points = [
        Kill::At("esxi-logged-in"),
        Kill::DuringCreate,
        Kill::At("snapshot-created"),
        Kill::DuringRsync,
        Kill::At("copied:1"),
        Kill::At("staged:1"),
        Kill::At("chunk-progress:3"),
        Kill::At("chunked:1"),
        Kill::At("chunked:2"),
        Kill::At("before-snapshot-removal"),
        Kill::DuringRemove,
        Kill::At("snapshot-removed"),
        Kill::At("copied:3"),
        Kill::At("config-copied"),
        Kill::At("esxi-ini-written"),
        Kill::At("setup-written"),
        Kill::At("report-written"),
        Kill::At("promote"),
        Kill::At("rename:1"),
        Kill::At("rename:2"),
        Kill::At("rename:3"),
        Kill::At("rotated"),
        Kill::At("before-sweep"),
        Kill::DuringSweep,
        Kill::At("swept"),
    ];
    for (i, k) in points.iter().enumerate() {
        let label = match k {
            Kill::At(p) => p.to_string(),
            Kill::DuringCreate => "during snapshot creation".into(),
            Kill::DuringRsync => "during rsync".into(),
            Kill::DuringRemove => "during snapshot removal".into(),
            Kill::DuringSweep => "during the pool sweep".into(),
        };
        let before = archives(&job_dir);
        // The running VM changed a little since the last backup: new chunks to store.
        e.sim.post_bytes(
            &format!("/write?vm=vm1&disk=0&offset={}", (i as u64 % 7) * MB + 4096),
            &noise(300_000, i as u64 + 1),
        );
        // One day each, so that every run promotes the older scheduled archive to daily.
        let (t_crash, t_next) = (now(), now());
        let mut cmd = e.affa.cmd();
        cmd.env("AFFA_FAKE_NOW", &t_crash).args(["--run", "esx"]).stdout(Stdio::null()).stderr(Stdio::null());
        let status = match k {
            Kill::At(p) => {
                cmd.env("AFFA_TEST_CRASH_AT", p);
                cmd.status().unwrap()
            }
            Kill::DuringCreate => {
                e.sim.post("/fault?op=create&mode=hang&seconds=2");
                let n = counter(&e, "create_snapshot");
                let mut c = cmd.spawn().unwrap();
                wait_polling(&e, "create_snapshot", n);
                let st = kill9(&mut c);
                // The host finishes the task on its own: a leftover for the next run.
                wait_until(secs(30), "the hung snapshot to appear", || !e.sim.snapshots("vm1").is_empty());
                st
            }
            Kill::DuringRsync => {
                e.affa.write_conf("esx.conf", &format!("{conf}BandwidthLimit=1500\n"));
                let mut c = cmd.spawn().unwrap();
                let pid = c.id();
                wait_until(secs(60), "rsync to start", || children(pid).iter().any(|(_, n)| n == "rsync"));
                wait_until(secs(60), "rsync to receive data (32 KiB over ssh)", || {
                    bytes_read_by(pid, "ssh") > 32 << 10
                });
                let st = kill9(&mut c);
                e.affa.write_conf("esx.conf", &conf);
                assert!(
                    !e.sim.snapshots("vm1").is_empty(),
                    "the kill came before the snapshot: the point proves little"
                );
                st
            }
            Kill::DuringRemove => {
                e.sim.post("/fault?op=remove&mode=hang&seconds=2&then=fail");
                let n = counter(&e, "remove_snapshot");
                let failed = removals_failed(&e);
                let mut c = cmd.spawn().unwrap();
                wait_polling(&e, "remove_snapshot", n);
                let st = kill9(&mut c);
                // The host ends the hung removal on its own (failed): the snapshot stays.
                wait_until(secs(30), "the hung removal to fail on the host", || removals_failed(&e) > failed);
                st
            }
            Kill::DuringSweep => {
                let mut first = e.affa.cmd();
                first
                    .env("AFFA_FAKE_NOW", &t_crash)
                    .env("AFFA_TEST_CRASH_AT", "chunk-progress:20")
                    .args(["--run", "esx"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                assert_eq!(first.status().unwrap().signal(), Some(libc::SIGKILL));
                wait_until(secs(10), "the leftover snapshot", || !e.sim.snapshots("vm1").is_empty());
                all_kept(&before, &archives(&job_dir), &format!("[{label}] after the first crash"));
                // Overwrite what that run chunked new (this iteration's write), so its chunks
                // end up referenced by nothing but the resume dir.
                e.sim.post_bytes(
                    &format!("/write?vm=vm1&disk=0&offset={}", (i as u64 % 7) * MB),
                    &noise(2 * MB as usize, 4242),
                );
                cmd.env("AFFA_TEST_CRASH_AT", "sweep-removed");
                cmd.status().unwrap()
            }
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "[{label}] the run was not killed there (exit {status:?}): the crash point was not reached"
        );
        // Straight after the crash: nothing lost, nothing partial promoted.
        let after_crash = archives(&job_dir);
        all_kept(&before, &after_crash, &format!("[{label}] after the crash"));
        assert!(!job_dir.join("scheduled.0").exists() || job_dir.join("scheduled.0/.AFFA3-REPORT").is_file());
        // The next run succeeds and cleans up.
        let out = e.affa.affa_at(&t_next, &["--run", "esx"]);
        if !out.status.success() {
            let log = String::from_utf8_lossy(&e.affa.affa(&["--log-tail", "esx"]).stdout).into_owned();
            panic!("[{label}] the run after the crash failed: {}\nlog:\n{log}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(
            e.sim.snapshots("vm1").is_empty(),
            "[{label}] snapshot left after the next run: {:?}",
            e.sim.snapshots("vm1")
        );
        let now_a = archives(&job_dir);
        all_kept(&before, &now_a, &format!("[{label}] after the next run"));
        assert!(now_a.len() > before.len(), "[{label}] the next run added no archive");
        let v = e.affa.affa(&["--verify", "esx", "--all"]);
        assert!(
            v.status.success(),
            "[{label}] verify failed: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // The newest archive rebuilds the running disk as it was at its snapshot.
    let frozen = e.sim.state()["vms"][0]["last_snapshot_base_flat_sha256"][0].as_str().unwrap().to_string();
    let out = e.work.path().join("unchunked");
    ok(&e.affa.affa(&["--unchunk", "esx", "scheduled.0", "--to", out.to_str().unwrap()]));
    use sha2::Digest;
    let got = sha2::Sha256::digest(fs::read(out.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")).unwrap());
    assert_eq!(got.iter().map(|b| format!("{b:02x}")).collect::<String>(), frozen);
    let _ = &e.sshd;
}

#[test]
fn esxi_api_unreachable_503_and_hanging_tasks_fail_cleanly() {
    let e = esx(
        4 * MB,
        "scheduledKeep=3\nESXiTaskTimeout=2\nchunkFiles=*-flat.vmdk\nchunkSize=256K\nchunkTransport=rsync\n",
        "",
    );
    let job_dir = e.affa.job_dir("esx");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let before = archives(&job_dir);
    let conf = fs::read_to_string(e.affa.conf.join("esx.conf")).unwrap();

    // Every /sdk request answers 503.
    e.sim.post("/fault?op=all503&mode=fail");
    let err = one_line_error(&e.affa.affa_at("2026-05-04T22:00:00", &["--run", "esx"]));
    assert!(err.contains("503"), "{err}");
    e.sim.post("/fault?op=clear");
    assert_eq!(archives(&job_dir), before);

    // Nothing listens on the API port.
    let dead = free_port();
    e.affa.write_conf("esx.conf", &conf.replace(&format!("ESXiPort={}", e.sim.port), &format!("ESXiPort={dead}")));
    let err = one_line_error(&e.affa.affa_at("2026-05-04T22:10:00", &["--run", "esx"]));
    assert!(err.contains("127.0.0.1") && !err.contains(PASS), "{err}");
    e.affa.write_conf("esx.conf", &conf);
    assert_eq!(archives(&job_dir), before);

    // The snapshot task hangs past ESXiTaskTimeout and completes on the host 1 s later. affa
    // asks for a cancel (the simulator's tasks ignore it, as a snapshot creation a host will not
    // cancel), waits as long again for the task, and removes the snapshot it made: the VM is not
    // left on it until the next run.
    e.sim.post("/fault?op=create&mode=hang&seconds=3");
    let t = Instant::now();
    let err = one_line_error(&e.affa.affa_at("2026-05-04T22:15:00", &["--run", "esx"]));
    assert!(t.elapsed() < Duration::from_secs(15), "the timeout of 2 s was not honoured: {:?}", t.elapsed());
    assert!(err.contains("creating snapshot BEXI-esx-") && err.contains("did not finish within 2 s"), "{err}");
    assert!(err.contains("it ended later, after a cancel was asked"), "{err}");
    assert_eq!(archives(&job_dir), before);
    assert!(e.sim.snapshots("vm1").is_empty(), "the late snapshot was left on the VM: {:?}", e.sim.snapshots("vm1"));

    // The snapshot task outlives the second wait too (then completes on the host by itself).
    e.sim.post("/fault?op=create&mode=hang&seconds=8");
    let t = Instant::now();
    let err = one_line_error(&e.affa.affa_at("2026-05-04T22:20:00", &["--run", "esx"]));
    assert!(t.elapsed() < Duration::from_secs(15), "the timeout of 2 s was not honoured: {:?}", t.elapsed());
    assert!(err.contains("creating snapshot BEXI-esx-") && err.contains("did not finish within 2 s"), "{err}");
    assert!(err.contains("still running 2 s after a cancel was asked"), "{err}");
    assert_eq!(archives(&job_dir), before);
    wait_until(secs(20), "the hung snapshot to finish", || !e.sim.snapshots("vm1").is_empty());
    // The next run removes that leftover.
    ok(&e.affa.affa_at("2026-05-04T22:25:00", &["--run", "esx"]));
    assert!(e.sim.snapshots("vm1").is_empty(), "{:?}", e.sim.snapshots("vm1"));
    let before = archives(&job_dir);

    // The removal task hangs past the timeout: the run fails, the snapshot is named.
    e.sim.post("/fault?op=remove&mode=hang&seconds=4&then=fail");
    let failed = removals_failed(&e);
    let err = one_line_error(&e.affa.affa_at("2026-05-04T22:30:00", &["--run", "esx"]));
    assert!(err.contains("removing snapshot BEXI-esx-20260504223000 FAILED"), "{err}");
    assert_eq!(archives(&job_dir), before);
    // The host ends the hung removal on its own (failed): the snapshot stays for the next run.
    wait_until(secs(20), "the hung removal to fail on the host", || removals_failed(&e) > failed);

    // The next run removes every leftover and succeeds.
    ok(&e.affa.affa_at("2026-05-04T23:00:00", &["--run", "esx"]));
    assert!(e.sim.snapshots("vm1").is_empty(), "{:?}", e.sim.snapshots("vm1"));
    all_kept(&before, &archives(&job_dir), "after the recovery run");
    ok(&e.affa.affa(&["--verify", "esx", "--all"]));
    let _ = (&e.sshd, &e.work);
}

// ---------------------------------------------------------------------------------------------
// Ordinary jobs.

/// A local job (remoteHostName=localhost) over `src`, with chunked `*.img` files.
fn local_job(affa: &Affa, name: &str, src: &Path, extra: &str) {
    affa.write_conf(
        &format!("{name}.conf"),
        &format!(
            "[{name}]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\n{extra}",
            src.display()
        ),
    );
}

fn src_tree(dir: &Path, seed: u64) {
    fs::create_dir_all(dir.join("docs")).unwrap();
    fs::write(dir.join("docs/a.txt"), format!("alpha {seed}\n")).unwrap();
    fs::write(dir.join("docs/b.bin"), noise(100_000, seed)).unwrap();
    fill(&dir.join("disk.img"), 4 * MB, &[(0, MB), (3 * MB, 512 * 1024)], seed);
}

#[test]
fn ssh_link_cut_mid_transfer_keeps_earlier_archives_and_the_next_run_resumes() {
    let mut sshd = Sshd::start();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(src.path(), 1);
    let job = affa.ssh_job(
        "web",
        &sshd,
        &format!(
            "Include={}\nscheduledKeep=3\nchunkFiles=*.img\nchunkSize=256K\nrsyncTimeout=20\nchunkTransport=rsync\n",
            src.path().display()
        ),
    );
    affa.write_conf("web.conf", &job);
    ok(&affa.send_key(&mut sshd, "web"));
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let job_dir = affa.job_dir("web");
    let before = archives(&job_dir);
    // 6 MB of new data, sent slowly; the sshd goes away in the middle.
    fs::write(src.path().join("docs/new.bin"), noise(6 * MB as usize, 9)).unwrap();
    affa.write_conf("web.conf", &format!("{job}BandwidthLimit=1000\n"));
    let mut c = affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T11:00:00")
        .args(["--run", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = c.id();
    wait_until(secs(30), "rsync to start", || children(pid).iter().any(|(_, n)| n == "rsync"));
    wait_until(secs(30), "the transfer of new.bin to be under way (1 MiB over ssh)", || bytes_read_by(pid, "ssh") > MB);
    sshd.stop();
    // Stopping the listener leaves the established session: cut it too (the sshd children).
    for (p, n) in children(pid) {
        if n == "rsync" {
            for (q, m) in children(p) {
                if m == "ssh" {
                    signal(q, rustix::process::Signal::KILL);
                }
            }
        }
    }
    wait_until(secs(60), "affa to notice the cut link", || c.try_wait().unwrap().is_some());
    let out = c.wait_with_output().unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("earlier archives are untouched") || err.contains("connection"), "{err}");
    assert_eq!(archives(&job_dir), before, "a failed run changed the archive set");
    assert!(!job_dir.join("scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("docs/new.bin").exists());
    // The link comes back: the next run succeeds, the new file is there, the old archive intact.
    sshd.restart();
    affa.write_conf("web.conf", &job);
    ok(&affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    let now_a = archives(&job_dir);
    all_kept(&before, &now_a, "after the resumed run");
    let got =
        fs::read(job_dir.join("scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("docs/new.bin")).unwrap();
    assert!(got == noise(6 * MB as usize, 9), "new.bin differs");
    ok(&affa.affa(&["--verify", "web", "--all"]));
}

/// A small tmpfs as RootDir (root only; skipped with a note otherwise).
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("not root: the RootDir-full test needs a tmpfs mount; skipped");
            return None;
        }
        fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        if !st.success() {
            eprintln!("cannot mount a tmpfs (no CAP_SYS_ADMIN?); the RootDir-full test is skipped");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn rootdir_full_fails_cleanly_and_the_next_run_after_freeing_space_succeeds() {
    let affa = Affa::new();
    let Some(_fs) = Tmpfs::mount(&affa.root, "12m") else { return };
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(src.path(), 1);
    local_job(&affa, "web", src.path(), "scheduledKeep=2\n");
    let o = affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]);
    if !o.status.success() {
        let df = std::process::Command::new("df").arg("-k").arg(&affa.root).output().unwrap();
        panic!(
            "{}\n{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&df.stdout),
            String::from_utf8_lossy(&affa.affa(&["--log-tail", "web"]).stdout)
        );
    }
    let job_dir = affa.job_dir("web");
    let before = archives(&job_dir);
    // Plain data that does not fit.
    fs::write(src.path().join("docs/huge.bin"), noise(14 * MB as usize, 3)).unwrap();
    let err = one_line_error(&affa.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
    assert!(err.contains("is full; the incomplete transfer was deleted to give the space back"), "{err}");
    assert_eq!(archives(&job_dir), before);
    ok(&affa.affa(&["--verify", "web", "--all"]));
    fs::remove_file(src.path().join("docs/huge.bin")).unwrap();
    // A chunked file that does not fit (the staging copy or the pool fills the disk).
    fill(&src.path().join("disk2.img"), 9 * MB, &[(0, 9 * MB)], 5);
    let err = one_line_error(&affa.affa_at("2026-03-02T12:00:00", &["--run", "web"]));
    assert!(err.contains("full") || err.contains("No space left") || err.contains("os error 28"), "{err}");
    assert_eq!(archives(&job_dir), before);
    ok(&affa.affa(&["--verify", "web", "--all"]));
    // Space is freed (the big file goes away at the source): the next run succeeds.
    fs::remove_file(src.path().join("disk2.img")).unwrap();
    fs::write(src.path().join("docs/a.txt"), "alpha two\n").unwrap();
    ok(&affa.affa_at("2026-03-02T13:00:00", &["--run", "web"]));
    all_kept(&before, &archives(&job_dir), "after the run that had room");
    ok(&affa.affa(&["--verify", "web", "--all"]));
    let a = job_dir.join("scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("docs/a.txt");
    assert_eq!(fs::read_to_string(a).unwrap(), "alpha two\n");
}

#[test]
fn a_full_rootdir_is_not_retried() {
    // Waiting does not empty a disk: a scheduled run (--silent, as under cron) with retries set
    // fails once, says why it is not retried, and sends its error mail at once.
    let affa = Affa::new();
    let Some(_fs) = Tmpfs::mount(&affa.root, "12m") else { return };
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(src.path(), 1);
    fs::write(src.path().join("docs/huge.bin"), noise(14 * MB as usize, 3)).unwrap();
    local_job(&affa, "web", src.path(), "RetryAttempts=2\nRetryAfter=30\n");
    let t = Instant::now();
    let o = affa.affa_at("2026-03-02T11:00:00", &["--silent", "--run", "web"]);
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(30), "a retry waited RetryAfter");
    let log = fs::read_to_string(affa.state.join("log/web.log")).unwrap();
    assert_eq!(log.matches("Starting job web").count(), 1, "{log}");
    assert!(log.contains("attempt 1 of 3 failed; not retried: RootDir's disk is full"), "{log}");
    assert!(!archive_names(&affa.job_dir("web")).iter().any(|n| n.starts_with("scheduled.0")));
}

fn chunk_files(archive: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for fan in fs::read_dir(archive.join(".affa-chunks")).unwrap().flatten() {
        for c in fs::read_dir(fan.path()).unwrap().flatten() {
            v.push(c.path());
        }
    }
    v.sort();
    v
}

#[test]
fn pool_damage_is_named_refused_on_restore_and_not_reused() {
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(src.path(), 1);
    local_job(&affa, "web", src.path(), "scheduledKeep=10\n");
    ok(&affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let job_dir = affa.job_dir("web");
    let s0 = job_dir.join("scheduled.0");
    let rel_img = src.path().strip_prefix("/").unwrap().join("disk.img");
    let chunks = chunk_files(&s0);
    assert!(chunks.len() >= 4, "{chunks:?}");
    let id = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let restore_to = affa.tmp.path().join("restore");
    let unchunk = |archive: &str| affa.affa(&["--unchunk", "web", archive, "--to", restore_to.to_str().unwrap()]);
    let restored = restore_to.join(&rel_img);

    type Damage = Box<dyn Fn(&Path)>;
    let damage: [(&str, Damage); 3] = [
        (
            "truncated",
            Box::new(|p: &Path| {
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                let n = f.metadata().unwrap().len();
                f.set_len(n / 2).unwrap();
            }),
        ),
        (
            "flipped",
            Box::new(|p: &Path| {
                let mut d = fs::read(p).unwrap();
                let i = d.len() - 7;
                d[i] ^= 0x40;
                // Write in place: the pool entry and every archive link share the inode.
                let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all(&d).unwrap();
            }),
        ),
        (
            "deleted",
            Box::new(|p: &Path| {
                fs::remove_file(p).unwrap();
            }),
        ),
    ];
    for (hour, (k, (what, f))) in (11..).zip(damage.iter().enumerate()) {
        let victim = chunk_files(&job_dir.join("scheduled.0"))[k].clone();
        let vid = id(&victim);
        let pool_entry = affa.root.join(".affa-pool").join(&vid[..2]).join(&vid);
        f(&victim);
        if *what == "deleted" {
            let _ = fs::remove_file(&pool_entry);
        }
        // --verify names the chunk and the file.
        let v = affa.affa(&["--verify", "web"]);
        assert!(!v.status.success(), "[{what}] verify passed a damaged archive");
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(
            text.contains(&vid) && text.contains("disk.img"),
            "[{what}] verify does not name the chunk and file: {text}"
        );
        // A restore refuses to produce a wrong file.
        let _ = fs::remove_dir_all(&restore_to);
        let o = unchunk("scheduled.0");
        let err = fail(&o);
        assert!(err.contains(&vid) || err.contains("damaged") || err.contains("missing"), "[{what}] {err}");
        assert!(!restored.exists(), "[{what}] a wrong file was produced");
        // A later backup does not reuse the damaged chunk: the new archive verifies clean and
        // rebuilds the file exactly.
        ok(&affa.affa_at(&format!("2026-03-02T{hour}:00:00"), &["--run", "web"]));
        let v = affa.affa(&["--verify", "web", "scheduled.0"]);
        assert!(
            v.status.success(),
            "[{what}] the backup after the damage reused it: {}",
            String::from_utf8_lossy(&v.stdout)
        );
        let _ = fs::remove_dir_all(&restore_to);
        ok(&unchunk("scheduled.0"));
        assert!(
            fs::read(&restored).unwrap() == fs::read(src.path().join("disk.img")).unwrap(),
            "[{what}] the restored file differs"
        );
    }
    // A truncated manifest: named by verify, refused by restore.
    let m = job_dir.join("scheduled.0").join(format!("{}.affa-manifest", rel_img.display()));
    let data = fs::read(&m).unwrap();
    fs::write(&m, &data[..data.len() / 2]).unwrap();
    let v = affa.affa(&["--verify", "web"]);
    assert!(!v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("disk.img.affa-manifest"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    let _ = fs::remove_dir_all(&restore_to);
    let err = fail(&unchunk("scheduled.0"));
    assert!(err.contains("manifest"), "{err}");
    assert!(!restored.exists());
    // The next backup does not depend on it.
    ok(&affa.affa_at("2026-03-02T20:00:00", &["--run", "web"]));
    ok(&affa.affa(&["--verify", "web", "scheduled.0"]));
}

#[test]
fn two_runs_of_one_job_and_two_jobs_sharing_a_pool_at_once() {
    let affa = Affa::new();
    let s1 = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let s2 = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(s1.path(), 1);
    src_tree(s2.path(), 1); // same disk content: the two jobs share chunks
    fill(&s2.path().join("other.img"), 3 * MB, &[(0, 3 * MB)], 77);
    local_job(&affa, "one", s1.path(), "scheduledKeep=3\nBandwidthLimit=3000\n");
    local_job(&affa, "two", s2.path(), "scheduledKeep=3\n");
    // The same job twice: one runs, the other is refused with the pid, nothing is disturbed.
    let a = affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T10:00:00")
        .args(["--run", "one"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock_dir = affa.state.join("lock");
    wait_until(secs(30), "the first run of one to take its lock", || affa::lock::holder(&lock_dir, "one").is_some());
    let b = affa.affa_at("2026-03-02T10:00:00", &["--run", "one"]);
    let err = one_line_error(&b);
    assert!(err.contains("already running (pid"), "{err}");
    ok(&a.wait_with_output().unwrap());
    assert_eq!(archive_names(&affa.job_dir("one")), ["scheduled.0"]);
    // Two jobs sharing RootDir's pool, several times over, both chunking and sweeping at once.
    for (i, h) in ["11", "12", "13"].iter().enumerate() {
        fs::write(s1.path().join("docs/a.txt"), format!("round {i}\n")).unwrap();
        // A new size each round: rsync's quick check (size + mtime in seconds) sees the change.
        fill(&s2.path().join("other.img"), 3 * MB + 4096 * (i as u64 + 1), &[(0, 3 * MB)], 100 + i as u64);
        let t = format!("2026-03-02T{h}:00:00");
        let c1 = affa
            .cmd()
            .env("AFFA_FAKE_NOW", &t)
            .args(["--run", "one"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let c2 = affa
            .cmd()
            .env("AFFA_FAKE_NOW", &t)
            .args(["--run", "two"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ok(&c1.wait_with_output().unwrap());
        ok(&c2.wait_with_output().unwrap());
        ok(&affa.affa(&["--verify", "one", "--all"]));
        ok(&affa.affa(&["--verify", "two", "--all"]));
    }
    let restore_to = affa.tmp.path().join("r");
    ok(&affa.affa(&["--unchunk", "two", "scheduled.0", "--to", restore_to.to_str().unwrap()]));
    let rel = s2.path().strip_prefix("/").unwrap();
    assert!(
        fs::read(restore_to.join(rel).join("other.img")).unwrap() == fs::read(s2.path().join("other.img")).unwrap(),
        "restored other.img differs"
    );
}

#[test]
fn rotation_cut_between_two_renames_loses_no_archive() {
    // keep 3: the crash comes after scheduled.2 went to the trash and scheduled.1 moved up,
    // before scheduled.0 moved: a gap at scheduled.1. Affa's shift would now trash the old
    // scheduled.1 (now .2) as well; the fixed shift closes the gap instead.
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    src_tree(src.path(), 1);
    local_job(&affa, "web", src.path(), "scheduledKeep=3\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n");
    // Contents of different lengths: rsync's quick check (size + mtime) must see each change.
    let txt = |h: usize| "x".repeat(h) + "\n";
    for h in 10..13 {
        fs::write(src.path().join("docs/a.txt"), txt(h)).unwrap();
        ok(&affa.affa_at(&format!("2026-03-02T{h}:00:00"), &["--run", "web"]));
    }
    let job_dir = affa.job_dir("web");
    let before = archives(&job_dir);
    assert_eq!(before.len(), 3);
    fs::write(src.path().join("docs/a.txt"), txt(13)).unwrap();
    let st = affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T13:00:00")
        .env("AFFA_TEST_CRASH_AT", "rename:2")
        .args(["--run", "web"])
        .status()
        .unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert_eq!(archive_names(&job_dir), ["scheduled.0", "scheduled.2"]);
    // The report-carrying transfer is rotated in first, then today's run adds its own.
    fs::write(src.path().join("docs/a.txt"), txt(14)).unwrap();
    ok(&affa.affa_at("2026-03-02T14:00:00", &["--run", "web"]));
    let now_a = archives(&job_dir);
    assert_eq!(now_a.len(), 3);
    let a_txt = |n: &str| {
        fs::read_to_string(job_dir.join(n).join(src.path().strip_prefix("/").unwrap()).join("docs/a.txt")).unwrap()
    };
    assert_eq!([a_txt("scheduled.0"), a_txt("scheduled.1"), a_txt("scheduled.2")], [txt(14), txt(13), txt(12)]);
    ok(&affa.affa(&["--verify", "web", "--all"]));
}
