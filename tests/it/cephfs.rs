//! A RootDir shared on CephFS by two affa "servers" (issue 19): two affa setups with their own
//! config dirs and lock dirs, each reaching the same CephFS through its own ceph-fuse client
//! (common::ceph). Runs on both sides dedup against one chunk pool while the other side's runs
//! and a sweep loop remove orphaned pool entries; one run is killed with -9; every archive
//! verifies; a job running on one server is refused on the other, naming host and pid.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::ceph::Ceph;
use common::*;

const MB: usize = 1 << 20;
const KEEP1: &str = "scheduledKeep=1\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n";

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut v);
    v
}

fn job(name: &str, src: &Path, root: &Path, extra: &str) -> String {
    format!(
        "[{name}]\nremoteHostName=localhost\nInclude={}\nchunkFiles=*.img\nchunkSize=256K\nRootDir={}\nsharedRootDir=yes\n{extra}",
        src.display(),
        root.display()
    )
}

/// `affa --verify JOB --all` succeeds for each job (every chunk of every archive read and checked).
fn verify_all(a: &Affa, jobs: &[&str]) {
    for j in jobs {
        ok(&a.affa(&["--verify", j, "--all"]));
    }
}

#[test]
fn two_servers_on_one_cephfs_share_chunks_while_sweeping_and_a_killed_run_loses_nothing() {
    let ceph = Ceph::shared();
    let m = ceph.cephfs_mounts(&["srv-a", "srv-b"]);
    let (root_a, root_b) = (m[0].join("root"), m[1].join("root"));
    fs::create_dir_all(&root_a).unwrap();
    assert!(root_b.is_dir(), "the two mounts do not show one file system");
    let (a, b) = (Affa::new(), Affa::new());
    let src = tempfile::Builder::new().prefix("affa-cephfs-src").tempdir().unwrap();
    let (s1, s2, s3) = (src.path().join("vm1"), src.path().join("vm2"), src.path().join("idle"));
    for d in [&s1, &s2, &s3] {
        fs::create_dir_all(d).unwrap();
    }
    // Two data sets: each run of vm1 (server a) and vm2 (server b) alternates between them, out
    // of phase, so every rotation orphans the pool entries the other server's run links next.
    let data = [random(1, 4 * MB), random(2, 4 * MB)];
    let scripts = a.state.join("scripts");
    fs::create_dir_all(&scripts).unwrap();
    let hold = a.state.join("hold");
    fs::write(scripts.join("hold.sh"), format!("#!/bin/sh\n[ -e '{}' ] && sleep 60\nexit 0\n", hold.display()))
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(scripts.join("hold.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    a.write_conf("jobs.conf", &job("vm1", &s1, &root_a, &format!("{KEEP1}preJobCommand=hold.sh\n")));
    b.write_conf(
        "jobs.conf",
        &format!(
            "{}\n{}\n{}",
            job("vm2", &s2, &root_b, KEEP1),
            job("idle", &s3, &root_b, ""),
            job("vm1", &s1, &root_b, KEEP1)
        ),
    );

    let stop = AtomicBool::new(false);
    let rounds = 6;
    let run = |who: &Affa, name: &'static str, dir: &Path, phase: usize| {
        for i in 0..rounds {
            fs::write(dir.join("disk.img"), &data[(i + phase) % 2]).unwrap();
            ok(&who.affa_at(&format!("2026-06-01T{:02}:00:00", i + 1), &["--run", name]));
            ok(&who.affa(&["--verify", name, "--all"]));
        }
    };
    std::thread::scope(|sc| {
        let sweeper = sc.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                // Job idle has no archive: --cleanup only sweeps the pool (and takes no lock).
                ok(&b.affa(&["--cleanup", "idle", "--yes"]));
                n += 1;
            }
            n
        });
        let ta = sc.spawn(|| run(&a, "vm1", &s1, 0));
        let tb = sc.spawn(|| run(&b, "vm2", &s2, 1));
        ta.join().unwrap();
        tb.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        let sweeps = sweeper.join().unwrap();
        assert!(sweeps >= 2, "only {sweeps} sweep(s) raced the runs");
    });
    verify_all(&a, &["vm1"]);
    verify_all(&b, &["vm2"]);

    // A run of vm1 on server a holds the job (its preJobCommand waits): server b's run of vm1
    // is refused, naming a's host and pid, and touches nothing.
    fs::write(&hold, "").unwrap();
    let mut held = a.cmd().args(["--run", "vm1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let h = wait_for(Duration::from_secs(120), "server a's run to take the shared lock", || {
        assert!(
            held.try_wait().unwrap().is_none(),
            "server a's run ended: {:?}",
            fs::read_dir(a.state.join("log"))
                .map(|d| d.flatten().map(|e| fs::read_to_string(e.path()).unwrap_or_default()).collect::<Vec<_>>())
        );
        affa::shared_lock::holder(&root_a, "vm1").filter(|h| h.pid.is_some())
    });
    assert_eq!(h.pid, Some(held.id() as i32));
    let before = tree_hashes(&root_b.join("vm1"));
    let e = fail(&b.affa(&["--run", "vm1"]));
    let want = format!("job vm1 is already running on host {} (pid {}; heartbeat ", h.host, held.id());
    assert!(e.contains(&want), "{e}");
    assert_eq!(tree_hashes(&root_b.join("vm1")), before, "the refused run changed the archives");
    // Server b's --status shows the run on server a; its --kill refuses to signal a's process
    // (a pid of another machine) and says where to run it; a's run goes on.
    let st = ok(&b.affa(&["--status"]));
    let line = st.lines().find(|l| l.starts_with("vm1 ")).unwrap_or_else(|| panic!("{st}"));
    assert!(line.contains(&format!("running on {} (pid {})", h.host, held.id())), "{st}");
    let csv = ok(&b.affa(&["--status", "--csv"]));
    let row: Vec<&str> =
        csv.lines().find(|l| l.starts_with("vm1;")).unwrap_or_else(|| panic!("{csv}")).split(';').collect();
    assert_eq!((row[8], row[9]), ("0", format!("running on {} (pid {})", h.host, held.id()).as_str()), "{csv}");
    let e = fail(&b.affa(&["--kill", "vm1"]));
    assert!(e.contains(&format!("job vm1 is running on {} (pid {}), not on this server", h.host, held.id())), "{e}");
    assert!(held.try_wait().unwrap().is_none(), "server b's --kill stopped server a's run");
    // kill -9 of server a's run: the flock goes with the process, server b takes the job over.
    held.kill().unwrap();
    held.wait().unwrap();
    fs::remove_file(&hold).unwrap();

    // kill -9 in the middle of chunking: a bigger image, killed once its first links exist.
    fs::write(s1.join("disk.img"), random(3, 48 * MB)).unwrap();
    let mut run = a.cmd().args(["--run", "vm1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let chunks = root_a.join("vm1/scheduled.running/.affa-chunks");
    wait_until(Duration::from_secs(60), "the run to link its first chunks", || {
        fs::read_dir(&chunks).map(|mut d| d.next().is_some()).unwrap_or(false)
    });
    run.kill().unwrap();
    run.wait().unwrap();
    ok(&b.affa(&["--run", "vm1"]));
    verify_all(&b, &["vm1", "vm2"]);
    verify_all(&a, &["vm1"]);
    let rel = s1.strip_prefix("/").unwrap().join("disk.img");
    ok(&b.affa(&["--unchunk", "vm1", "scheduled.0", "--to", b.tmp.path().join("un").to_str().unwrap()]));
    assert_eq!(
        blake3::hash(&fs::read(b.tmp.path().join("un").join(&rel)).unwrap()),
        blake3::hash(&random(3, 48 * MB)),
        "the archive server b made after the kill does not hold the image"
    );
}

/// A server that loses the cluster mid-run (its ceph-fuse client stopped: the MDS hears nothing
/// more from it) keeps its job locked until the MDS evicts the dead client (`session_autoclose`,
/// 30 s in the fixture): the other server's run waits for that, then runs the job, and its
/// archive verifies. affa never breaks the lock itself.
#[test]
fn a_dead_servers_lock_holds_until_ceph_evicts_it_then_another_server_runs_the_job() {
    let ceph = Ceph::shared();
    let m = ceph.cephfs_mounts(&["dead-a", "dead-b"]);
    let (root_a, root_b) = (m[0].join("root-dead"), m[1].join("root-dead"));
    fs::create_dir_all(&root_a).unwrap();
    let (a, b) = (Affa::new(), Affa::new());
    let src = tempfile::Builder::new().prefix("affa-cephfs-src").tempdir().unwrap();
    let s = src.path().join("vm");
    fs::create_dir_all(&s).unwrap();
    fs::write(s.join("disk.img"), random(7, 2 * MB)).unwrap();
    let scripts = a.state.join("scripts");
    fs::create_dir_all(&scripts).unwrap();
    fs::write(scripts.join("hold.sh"), "#!/bin/sh\nsleep 600\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(scripts.join("hold.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    a.write_conf("jobs.conf", &job("vm", &s, &root_a, "preJobCommand=hold.sh\n"));
    b.write_conf("jobs.conf", &job("vm", &s, &root_b, ""));
    let mut held = a.cmd().args(["--run", "vm"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let h = wait_for(Duration::from_secs(30), "server a's run to take the shared lock", || {
        affa::shared_lock::holder(&root_b, "vm").filter(|h| h.pid.is_some())
    });
    assert_eq!(h.pid, Some(held.id() as i32));
    // Server a is cut off from the cluster (its client stopped: no more messages, no closed
    // connection, as when the power goes or the network is cut); its affa process lives on.
    let client = ceph.client_pid("dead-a");
    signal(client, rustix::process::Signal::STOP);
    // Server b's run waits: CephFS blocks it on the lock file, whose capabilities the silent
    // client holds, until the MDS evicts that client (and with it its flock); then it runs.
    let t0 = std::time::Instant::now();
    ok(&b.affa(&["--run", "vm"]));
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(15), "server b ran the job after {waited:?}, before any eviction");
    assert!(held.try_wait().unwrap().is_none(), "server a's run ended: the test shows nothing");
    verify_all(&b, &["vm"]);
    signal(client, rustix::process::Signal::KILL);
    let script = descendants(held.id());
    held.kill().unwrap();
    held.wait().unwrap();
    for p in script {
        signal(p, rustix::process::Signal::KILL);
    }
    let _ = std::process::Command::new("umount").arg("-l").arg(&m[0]).status();
}
