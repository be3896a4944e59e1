//! chunkFiles on ordinary jobs, end to end over the real sshd: what the pool costs, sharing
//! between jobs, the sweep after rotation, self-contained archives, damage detection.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;

const MB: u64 = 1 << 20;

/// A disk-like image: zero stretches, random stretches, text stretches, 1 MiB aligned.
fn image(path: &Path, size: u64, seed: u64) {
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut off = 0;
    let mut buf = vec![0u8; MB as usize];
    while off < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 10 {
            0..=3 => {} // zeros: a hole
            4..=6 => {
                for b in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                f.seek(SeekFrom::Start(off)).unwrap();
                f.write_all(&buf).unwrap();
            }
            _ => {
                let text = b"log line 0042: service started, all good\n";
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = text[(i + off as usize / 7) % text.len()];
                }
                f.seek(SeekFrom::Start(off)).unwrap();
                f.write_all(&buf).unwrap();
            }
        }
        off += MB;
    }
}

fn scribble(path: &Path, at: u64, len: u64, seed: u8) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    // Pseudo-random bytes: they do not compress, so the pool grows by what changed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    f.write_all(&data).unwrap();
    // A change within the second of the last run's look must still be seen by rsync's quick
    // check (size and modification time): the time is moved on by two seconds at least.
    let old = f.metadata().unwrap().modified().unwrap();
    f.set_modified(std::cmp::max(std::time::SystemTime::now(), old + std::time::Duration::from_secs(2))).unwrap();
}

fn pool_ids(root: &Path) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for d in fs::read_dir(root.join(".affa-pool")).unwrap().flatten() {
        if d.file_name().len() == 2 {
            for e in fs::read_dir(d.path()).unwrap().flatten() {
                s.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    s
}

fn pool_bytes(root: &Path) -> u64 {
    let mut n = 0;
    for d in fs::read_dir(root.join(".affa-pool")).unwrap().flatten() {
        if d.file_name().len() == 2 {
            for e in fs::read_dir(d.path()).unwrap().flatten() {
                n += e.metadata().unwrap().len();
            }
        }
    }
    n
}

/// Every chunk id the manifests of an archive reference.
fn referenced(archive: &Path) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for mp in affa::chunk::list_manifests(archive).unwrap() {
        let m = affa::chunk::read_manifest(&mp).unwrap();
        for c in &m.chunks {
            if let affa::chunk::ChunkRef::Stored(id) = c {
                s.insert(affa::chunk::id_hex(id));
            }
        }
    }
    s
}

struct Setup {
    sshd: Sshd,
    affa: Affa,
    src: tempfile::TempDir,
}

fn setup(jobs: &[(&str, &str)]) -> Setup {
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    for (name, extra) in jobs {
        let dir = src.path().join(name);
        fs::create_dir_all(dir.join("images")).unwrap();
        fs::write(dir.join("notes.txt"), "hello\n").unwrap();
        affa.write_conf(
            &format!("{name}.conf"),
            &affa.ssh_job(
                name,
                &sshd,
                &format!("Include={}\nchunkFiles=*.img\nchunkSize=1M\nchunkTransport=rsync\n{extra}", dir.display()),
            ),
        );
        ok(&affa.send_key(&mut sshd, name));
    }
    Setup { sshd, affa, src }
}

/// `--unchunk --to DIR` where others can write: DIR must be new (affa makes it, mode 0700), so
/// nothing a local user planted or swaps below it is written through (the file was written as
/// root where a symlink pointed), and a host's set-uid bit is not given to the rebuilt file (a
/// set-uid root program a local user could run).
#[test]
fn unchunk_into_a_shared_directory_follows_no_link_and_drops_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup(&[("web", "")]);
    let img = s.src.path().join("web/images/tool.img");
    image(&img, 3 << 20, 5);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o4755)).unwrap();
    ok(&s.affa.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let m = affa::chunk::read_manifest(&affa::chunk::manifest_path(
        &s.affa.job_dir("web").join("scheduled.0"),
        s.src.path().join("web/images/tool.img").strip_prefix("/").unwrap(),
    ))
    .unwrap();
    assert_eq!(m.mode & 0o7777, 0o4755, "the archive did not keep the set-uid bit: the test proves nothing");
    let shared = s.affa.tmp.path().join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    // An existing directory is refused (others may have put or may swap anything below it),
    // a name a local user took with a symlink too: nothing is written through it.
    let elsewhere = s.affa.tmp.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, shared.join("taken")).unwrap();
    for dir in [shared.clone(), shared.join("taken")] {
        let e = fail(&s.affa.affa(&["--unchunk", "web", "scheduled.0", "--to", dir.to_str().unwrap()]));
        assert!(e.contains(&format!("--unchunk --to {}: it exists already", dir.display())), "{e}");
    }
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "written through the planted link");
    let shared = shared.join("new");
    let out = ok(&s.affa.affa(&["--unchunk", "web", "scheduled.0", "--to", shared.to_str().unwrap()]));
    assert!(out.contains("verified, set-id and sticky bits left out"), "{out}");
    assert_eq!(fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, 0o700, "not a private directory");
    let rebuilt = shared.join(s.src.path().strip_prefix("/").unwrap()).join("web/images/tool.img");
    assert_eq!(fs::metadata(&rebuilt).unwrap().permissions().mode() & 0o7777, 0o755);
    assert_eq!(fs::read(&rebuilt).unwrap(), fs::read(&img).unwrap());
}

fn in_archive(s: &Setup, job: &str, archive: &str, rel: &str) -> PathBuf {
    s.affa.job_dir(job).join(archive).join(s.src.path().join(job).strip_prefix("/").unwrap()).join(rel)
}

#[test]
fn a_second_run_of_a_1g_image_adds_only_the_changed_chunks() {
    let s = setup(&[("vm", "scheduledKeep=2\n")]);
    let img = s.src.path().join("vm/images/disk.img");
    image(&img, 1024 * MB, 3);
    let v1 = blake3::hash(&fs::read(&img).unwrap());
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let m = in_archive(&s, "vm", "scheduled.0", "images/disk.img.affa-manifest");
    assert!(m.exists(), "no manifest at {}", m.display());
    assert!(!in_archive(&s, "vm", "scheduled.0", "images/disk.img").exists());
    assert_eq!(fs::read_to_string(in_archive(&s, "vm", "scheduled.0", "notes.txt")).unwrap(), "hello\n");
    let first_pool = pool_bytes(&s.affa.root);
    let first_tree = tree_hashes(&s.affa.job_dir("vm").join("scheduled.0"));
    // 1% changed, as ten clustered 1 MiB extents (random data: incompressible).
    for i in 0..10 {
        scribble(&img, (i * 97 + 5) * MB, MB, i as u8);
    }
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "vm"]));
    let growth = pool_bytes(&s.affa.root) - first_pool;
    assert!((9 * MB..=11 * MB).contains(&growth), "the pool grew by {growth} bytes for 10 MiB changed");
    let report = fs::read_to_string(s.affa.job_dir("vm").join("scheduled.0/.AFFA3-REPORT")).unwrap();
    let added: u64 = report.lines().find_map(|l| l.strip_prefix("ChunkPoolBytesAdded=")).unwrap().parse().unwrap();
    assert_eq!(added, growth, "the report's ChunkPoolBytesAdded differs from the pool's growth");
    // The first archive is untouched and still rebuilds to the first version.
    assert_eq!(tree_hashes(&s.affa.job_dir("vm").join("scheduled.1")), first_tree);
    let out = s.affa.tmp.path().join("out");
    ok(&s.affa.affa(&["--unchunk", "vm", "scheduled.1", "--to", out.to_str().unwrap()]));
    let rebuilt = out.join(s.src.path().join("vm").strip_prefix("/").unwrap()).join("images/disk.img");
    assert_eq!(blake3::hash(&fs::read(&rebuilt).unwrap()), v1);
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(&rebuilt).unwrap().blocks() * 512 < 900 * MB, "holes were not kept");
    let list = ok(&s.affa.affa(&["--list-archives", "vm"]));
    assert!(list.contains("Added") && list.contains("1.0G"), "{list}");
    drop(s.sshd);
}

#[test]
fn two_jobs_share_chunks_and_the_sweep_frees_exactly_the_unreferenced_ones() {
    let s = setup(&[("a", "scheduledKeep=1\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n"), ("b", "")]);
    let ia = s.src.path().join("a/images/disk.img");
    image(&ia, 64 * MB, 9);
    fs::copy(&ia, s.src.path().join("b/images/disk.img")).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "a"]));
    let after_a = pool_bytes(&s.affa.root);
    ok(&s.affa.affa_at("2026-06-01T20:10:00", &["--run", "b"]));
    assert_eq!(pool_bytes(&s.affa.root), after_a, "a clone of the same image stored new chunks");
    // Job a changes 8 MiB and runs again: scheduledKeep=1 drops its first archive, the sweep
    // frees what only that archive used, and nothing job b still needs.
    for i in 0..8 {
        scribble(&ia, (i * 7 + 1) * MB, MB, 100 + i as u8);
    }
    ok(&s.affa.affa_at("2026-06-01T20:20:00", &["--run", "a"]));
    let mut live = referenced(&s.affa.job_dir("a").join("scheduled.0"));
    live.extend(referenced(&s.affa.job_dir("b").join("scheduled.0")));
    assert_eq!(pool_ids(&s.affa.root), live, "the pool holds exactly the chunks some archive references");
    ok(&s.affa.affa(&["--verify", "b"]));
    ok(&s.affa.affa(&["--verify", "a"]));
}

/// A promotion-only run (`affa --run JOB daily`, Affa 3's cron line) that pushes an archive
/// out of the keep counts frees the pool entries only that archive linked, as a scheduled run
/// does; the resume dir of an interrupted transfer is not touched.
#[test]
fn a_promotion_that_drops_an_archive_frees_its_chunks() {
    let s = setup(&[("a", "scheduledKeep=1\ndailyKeep=1\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n")]);
    let img = s.src.path().join("a/images/disk.img");
    image(&img, 32 * MB, 31);
    let job = s.affa.job_dir("a");
    let exact = |what: &str| {
        let mut live = BTreeSet::new();
        for n in archive_names(&job) {
            live.extend(referenced(&job.join(n)));
        }
        assert_eq!(pool_ids(&s.affa.root), live, "{what}: the pool holds exactly the chunks the archives reference");
    };
    for (i, day) in ["2026-06-01", "2026-06-02", "2026-06-03"].iter().enumerate() {
        for k in 0..4 {
            scribble(&img, (k * 5 + 2) * MB, MB, 60 + (i as u64 * 4 + k) as u8);
        }
        // The promotion first: the scheduled run after it has none of its own to do that day.
        ok(&s.affa.affa_at(&format!("{day}T19:00:00"), &["--run", "a", "daily"]));
        if i > 0 {
            exact(&format!("after the promotion of {day}"));
        }
        ok(&s.affa.affa_at(&format!("{day}T20:00:00"), &["--run", "a"]));
        exact(&format!("after the run of {day}"));
    }
    assert_eq!(archive_names(&job), ["daily.0", "scheduled.0"], "no archive was pushed out: the test proves nothing");
}

/// The sweep after a run looks only at the chunks of the archives the run deleted; a run killed
/// after deleting them, before its sweep, leaves their chunk list nowhere: the next run sweeps
/// the whole pool, and the pool again holds exactly what the archives reference.
#[test]
fn a_run_killed_before_its_sweep_is_swept_after_by_the_next_run() {
    let keep1 = "scheduledKeep=1\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n";
    let s = setup(&[("a", keep1)]);
    let img = s.src.path().join("a/images/disk.img");
    image(&img, 32 * MB, 21);
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "a"]));
    let exact = |what: &str| {
        let live = referenced(&s.affa.job_dir("a").join("scheduled.0"));
        assert_eq!(pool_ids(&s.affa.root), live, "{what}: the pool holds exactly the chunks the archive references");
    };
    for i in 0..4 {
        scribble(&img, (i * 5 + 2) * MB, MB, 40 + i as u8);
    }
    let out = s
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-06-01T20:10:00")
        .env("AFFA_TEST_CRASH_AT", "before-sweep")
        .args(["--run", "a"])
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "the run was not killed before its sweep");
    assert!(s.affa.job_dir("a").join(".affa-sweep-pending").exists());
    assert!(
        pool_ids(&s.affa.root).len() > referenced(&s.affa.job_dir("a").join("scheduled.0")).len(),
        "the killed run left no orphan: the test proves nothing"
    );
    // Nothing changes now: the next run deletes an archive that shares every chunk with the
    // new one, so only the whole-pool sweep can find the orphans of the killed run.
    ok(&s.affa.affa_at("2026-06-01T20:20:00", &["--run", "a"]));
    exact("after the run that followed the kill");
    assert!(!s.affa.job_dir("a").join(".affa-sweep-pending").exists());
    let log = ok(&s.affa.affa(&["--log-tail", "a"]));
    assert!(log.contains("sweeping the whole pool"), "{log}");
    // And a normal run that drops an archive frees exactly its unshared chunks.
    scribble(&img, 9 * MB, 2 * MB, 77);
    ok(&s.affa.affa_at("2026-06-01T20:30:00", &["--run", "a"]));
    exact("after a normal run");
    ok(&s.affa.affa(&["--verify", "a"]));
}

/// A run killed after its report, before its rotation: the next run rotates that transfer in
/// first, and what the archive it pushes out linked alone is swept then (it was left in the pool
/// with no archive naming it: the trash was emptied without a sweep).
#[test]
fn a_rotation_finished_by_the_next_run_frees_the_chunks_it_drops() {
    let keep1 = "scheduledKeep=1\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\n";
    let s = setup(&[("a", keep1)]);
    let img = s.src.path().join("a/images/disk.img");
    image(&img, 32 * MB, 23);
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "a"]));
    for i in 0..4 {
        scribble(&img, (i * 5 + 2) * MB, MB, 50 + i as u8);
    }
    let out = s
        .affa
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-06-01T20:10:00")
        .env("AFFA_TEST_CRASH_AT", "report-written")
        .args(["--run", "a"])
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "the run was not killed after its report");
    // Nothing changes now: the next run's own rotation drops an archive that shares every chunk.
    ok(&s.affa.affa_at("2026-06-01T20:20:00", &["--run", "a"]));
    let log = ok(&s.affa.affa(&["--log-tail", "a"]));
    assert!(log.contains("rotation was interrupted: rotating it in now"), "the test proves nothing:\n{log}");
    let live = referenced(&s.affa.job_dir("a").join("scheduled.0"));
    assert_eq!(pool_ids(&s.affa.root), live, "the pool holds exactly the chunks the archive references");
}

#[test]
fn a_copied_archive_rebuilds_alone_and_damage_is_named() {
    let s = setup(&[("vm", "")]);
    let img = s.src.path().join("vm/images/disk.img");
    image(&img, 24 * MB, 5);
    let v1 = blake3::hash(&fs::read(&img).unwrap());
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    // cp -a the archive elsewhere and delete the pool: it still rebuilds.
    let copy = s.affa.tmp.path().join("copy");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(s.affa.job_dir("vm").join("scheduled.0"))
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let m = copy.join(s.src.path().join("vm").strip_prefix("/").unwrap()).join("images/disk.img.affa-manifest");
    let dest = s.affa.tmp.path().join("rebuilt.img");
    let pool = s.affa.root.join(".affa-pool");
    fs::rename(&pool, s.affa.tmp.path().join("pool-away")).unwrap();
    affa::chunk::unchunk_file(&copy, &m, &dest, None).unwrap();
    assert_eq!(blake3::hash(&fs::read(&dest).unwrap()), v1);
    fs::rename(s.affa.tmp.path().join("pool-away"), &pool).unwrap();
    // A flipped byte in one chunk, another chunk deleted: --verify names both and the file.
    let ids: Vec<String> = referenced(&s.affa.job_dir("vm").join("scheduled.0")).into_iter().collect();
    assert!(ids.len() >= 2);
    let p0 = pool.join(&ids[0][..2]).join(&ids[0]);
    let mut bytes = fs::read(&p0).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    // The pool entry and the archive's link are one inode: write in place.
    fs::OpenOptions::new().write(true).open(&p0).unwrap().write_all(&bytes).unwrap();
    let link1 = s.affa.job_dir("vm").join("scheduled.0/.affa-chunks").join(&ids[1][..2]).join(&ids[1]);
    fs::remove_file(&link1).unwrap();
    let o = s.affa.affa(&["--verify", "vm"]);
    let e = fail(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&ids[0]) && out.contains(&ids[1]) && out.contains("disk.img"), "{out}\n{e}");
    assert!(e.contains("found damage in: scheduled.0"), "{e}");
    let target = s.affa.tmp.path().join("out");
    let e = fail(&s.affa.affa(&["--unchunk", "vm", "scheduled.0", "--to", target.to_str().unwrap()]));
    assert!(e.contains(&ids[0]) || e.contains(&ids[1]), "{e}");
    let wrong = target.join(s.src.path().join("vm").strip_prefix("/").unwrap()).join("images/disk.img");
    assert!(!wrong.exists(), "--unchunk left a wrong file behind");
}
