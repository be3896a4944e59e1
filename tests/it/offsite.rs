//! Offsite copies to S3 (issue 19, first slice) against a real Ceph RADOS Gateway started by the
//! tests (common::ceph): an archive with a chunked file goes offsite sealed (nothing readable in
//! the bucket), the next archive sends only what the bucket lacks (counted from the bucket's
//! objects against the archives on disk), a cut upload is never listed and a rerun completes
//! it, damaged and missing objects are named by --offsite-verify, a wrong key is refused. A
//! misbehaving server in front of the gateway (common::s3_front: redirects) is refused with
//! nothing claimed done; objects someone else planted below the prefix under names that leave
//! their directory are never used as object names; a listing without end, or one that names an
//! object twice, neither hangs affa nor makes it remove an archive.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use common::ceph::{Ceph, ACCESS, SECRET};
use common::*;

const JOB: &str = "offsitejobname";
const PREFIX: &str = "backups/box1";
const CS: usize = 256 << 10;
/// Strings that must never be readable in the bucket: the disk's text, a file's name and
/// contents, the job name, the manifest format's first words.
const SECRETS: &[&str] =
    &["DISK-PLAINTEXT-MARKER", "secret-file-name-QX7", "SMALL-FILE-MARKER-contents", JOB, "affa-chunk-manifest"];

/// `len` pseudo-random (incompressible) bytes: BLAKE3's output stream of `seed`.
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut v);
    v
}

/// A source with a 2 MiB disk image (8 chunks of 256 KiB: one of text, one of zeros, six random)
/// and a small file whose name and contents are secrets.
fn source() -> tempfile::TempDir {
    let src = tempfile::Builder::new().prefix("affa-offsite-src").tempdir().unwrap();
    let d = src.path().join("data");
    fs::create_dir_all(d.join("sub")).unwrap();
    let mut img = "DISK-PLAINTEXT-MARKER 0123456789\n".repeat(CS / 33 + 1).into_bytes();
    img.truncate(CS);
    img.extend(vec![0u8; CS]);
    for i in 2..8 {
        img.extend(random(i, CS));
    }
    fs::write(d.join("disk.img"), img).unwrap();
    fs::write(d.join("sub/secret-file-name-QX7.txt"), "SMALL-FILE-MARKER-contents\n").unwrap();
    std::os::unix::fs::symlink("sub/secret-file-name-QX7.txt", d.join("link")).unwrap();
    src
}

/// An affa setup with the offsite job over `src` copying to `bucket`.
fn setup(ceph: &Ceph, src: &Path, bucket: &str) -> Affa {
    let a = Affa::new();
    let creds = a.conf.join("offsite.credentials");
    fs::write(&creds, format!("# the test user\naccessKey={ACCESS}\nsecretKey={SECRET}\n")).unwrap();
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
    a.write_conf(
        "job.conf",
        &format!(
            "[{JOB}]\nremoteHostName=localhost\nInclude={}/data\nchunkFiles=*.img\nchunkSize=256K\n\
             offsiteTarget=s3://{bucket}/{PREFIX}\noffsiteEndpoint={}\noffsiteCredentialsFile={}\noffsiteKeyFile={}\n",
            src.display(),
            ceph.endpoint,
            creds.display(),
            key_file(&a).display()
        ),
    );
    a
}

/// A new bucket, a source, the job and its first archive (2026-12-01 01:00).
fn first_archive() -> (&'static Ceph, String, tempfile::TempDir, Affa) {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = source();
    let a = setup(ceph, src.path(), &bucket);
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", JOB]));
    (ceph, bucket, src, a)
}

fn key_file(a: &Affa) -> std::path::PathBuf {
    a.conf.join("offsite.key")
}

/// The object names below the prefix that start with `sub` (`c/`, `i/`).
fn objects(ceph: &Ceph, bucket: &str, sub: &str) -> BTreeSet<String> {
    ceph.keys(bucket, &format!("{PREFIX}/{sub}")).into_iter().map(|k| k[PREFIX.len() + 1..].to_string()).collect()
}

/// The distinct chunk ids an archive needs, from the archive on disk: its `.affa-chunks/` (the
/// chunked files) and its plain files cut in 256 KiB pieces (all-zero pieces are not stored).
fn archive_chunks(archive: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    fn walk(dir: &Path, top: bool, ids: &mut BTreeSet<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if top && e.file_name() == ".affa-chunks" {
                for fan in fs::read_dir(e.path()).unwrap().flatten() {
                    for c in fs::read_dir(fan.path()).unwrap().flatten() {
                        ids.insert(c.file_name().to_string_lossy().into_owned());
                    }
                }
            } else if ft.is_dir() {
                walk(&e.path(), false, ids);
            } else if ft.is_file() {
                for piece in fs::read(e.path()).unwrap().chunks(CS) {
                    if piece.iter().any(|&b| b != 0) {
                        ids.insert(blake3::hash(piece).to_hex().to_string());
                    }
                }
            }
        }
    }
    walk(archive, true, &mut ids);
    ids
}

fn no_secret_readable(ceph: &Ceph, bucket: &str) {
    let all = ceph.keys(bucket, "");
    assert!(all.len() > 5, "{all:?}");
    for k in &all {
        let data = ceph.get(bucket, k);
        for s in SECRETS {
            assert!(!k.contains(s), "object name {k} shows {s}");
            assert!(!data.windows(s.len()).any(|w| w == s.as_bytes()), "object {k} shows '{s}' in plaintext");
        }
        assert!(!data.windows(4).any(|w| w == b"AFCK"), "object {k} holds an unsealed chunk file header");
    }
}

#[test]
fn archives_go_offsite_sealed_and_the_next_one_sends_only_what_the_bucket_lacks() {
    let t0 = Instant::now();
    let (ceph, bucket, src, a) = first_archive();

    // First upload: a new key, made and shown once, mode 0600.
    let o = a.affa_at("2026-12-01T02:00:00", &["--offsite", JOB]);
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let kf = key_file(&a);
    let key_text = fs::read_to_string(&kf).unwrap();
    assert!(key_text.starts_with("affa-offsite-key 1\ncreated 2026-12-01T02:00:00\nkey "), "{key_text}");
    assert_eq!(fs::metadata(&kf).unwrap().permissions().mode() & 0o777, 0o600);
    let key_line = key_text.lines().nth(2).unwrap();
    assert!(err.contains("a new offsite key was made") && err.contains(key_line), "{err}");
    let first = archive_chunks(&a.job_dir(JOB).join("scheduled.0"));
    let c1 = objects(ceph, &bucket, "c/");
    assert_eq!(c1.len(), first.len(), "one object per distinct chunk of the archive");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 1, "one archive index");
    assert!(
        out.contains(&format!(
            "{JOB} scheduled.0 (Date 202612010100): offsite in s3://{bucket}/{PREFIX}: {} object(s) uploaded",
            c1.len() + 1
        )),
        "{out}"
    );
    no_secret_readable(ceph, &bucket);

    // The same archive again: nothing sent.
    let again = ok(&a.affa(&["--offsite", JOB]));
    assert!(again.contains("already offsite"), "{again}");
    assert!(!String::from_utf8_lossy(&a.affa(&["--offsite", JOB]).stderr).contains("new offsite key"));
    assert_eq!(objects(ceph, &bucket, "c/"), c1);

    // 300 KiB of the disk change (two chunks) and a small file: the second archive sends only the
    // chunks the first did not have.
    let mut f = fs::OpenOptions::new().write(true).open(src.path().join("data/disk.img")).unwrap();
    f.seek(SeekFrom::Start(3 * CS as u64 + 1000)).unwrap();
    f.write_all(&random(99, 300 << 10)).unwrap();
    drop(f);
    fs::write(src.path().join("data/new.txt"), "a new file\n").unwrap();
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    let second = archive_chunks(&a.job_dir(JOB).join("scheduled.0"));
    let expected_new: BTreeSet<&String> = second.difference(&first).collect();
    assert!(expected_new.len() >= 3, "{expected_new:?}");
    let out = ok(&a.affa_at("2026-12-02T02:00:00", &["--offsite", JOB]));
    let c2 = objects(ceph, &bucket, "c/");
    assert_eq!(c2.len() - c1.len(), expected_new.len(), "only the new chunks were uploaded: {out}");
    assert!(c2.is_superset(&c1));
    assert!(out.contains(&format!("{} object(s) uploaded", expected_new.len() + 1)), "{out}");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 2);
    no_secret_readable(ceph, &bucket);

    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 2 archive(s)"), "{list}");
    let (d1, d2) = (list.find("Date 202612010100").unwrap(), list.find("Date 202612020100").unwrap());
    assert!(d1 < d2, "oldest first: {list}");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert_eq!(v.matches(": OK (").count(), 2, "{v}");
    eprintln!("offsite: two archives up and verified in {:.1?} (ceph up in {:.1?})", t0.elapsed(), ceph.started_in);
}

#[test]
fn damaged_and_missing_objects_are_named_and_a_wrong_or_open_key_is_refused() {
    let (ceph, bucket, _src, a) = first_archive();
    ok(&a.affa(&["--offsite", JOB]));
    let chunks: Vec<String> = objects(ceph, &bucket, "c/").into_iter().collect();
    let (bent, gone) = (&chunks[0], &chunks[1]);
    let mut data = ceph.get(&bucket, &format!("{PREFIX}/{bent}"));
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    ceph.put(&bucket, &format!("{PREFIX}/{bent}"), &data);
    ceph.delete(&bucket, &format!("{PREFIX}/{gone}"));
    let o = a.affa(&["--offsite-verify", JOB]);
    let e = fail(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("object {bent} ")) && out.contains("damaged"), "{out}");
    assert!(out.lines().any(|l| l.contains(&format!("object {gone} ")) && l.contains("missing")), "{out}");
    assert!(e.contains("found missing or damaged objects in: scheduled.0"), "{e}");

    // A wrong key: refused before anything is written.
    let kf = key_file(&a);
    let good = fs::read_to_string(&kf).unwrap();
    let before = ceph.keys(&bucket, "");
    fs::write(&kf, format!("affa-offsite-key 1\ncreated 2026-12-01T00:00:00\nkey {}\n", "5a".repeat(32))).unwrap();
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    for args in [&["--offsite", JOB][..], &["--offsite-verify", JOB]] {
        let e = fail(&a.affa(args));
        assert!(e.contains(&format!("offsiteKeyFile {} of job {JOB} does not open", kf.display())), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    assert_eq!(ceph.keys(&bucket, ""), before, "nothing written with a wrong key");

    // A key file others may read, and a missing one beside objects: refused, no new key.
    fs::write(&kf, &good).unwrap();
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o644)).unwrap();
    let e = fail(&a.affa(&["--offsite", JOB]));
    assert!(e.contains(&kf.display().to_string()) && e.contains("mode 644") && e.contains("chmod 600"), "{e}");
    fs::remove_file(&kf).unwrap();
    let e = fail(&a.affa(&["--offsite", JOB]));
    assert!(e.contains("does not exist but") && e.contains("holds objects"), "{e}");
    assert!(!kf.exists(), "no new key beside objects sealed with another");
    assert_eq!(ceph.keys(&bucket, ""), before);

    // A bad offsiteTarget: one line naming file, key, value and what is expected.
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &conf.replace(&format!("s3://{bucket}/"), "s3://Bad_Bucket/"));
    let e = fail(&a.affa(&["--offsite", JOB]));
    assert!(
        e.contains("job.conf")
            && e.contains("'offsiteTarget'")
            && e.contains("s3://Bad_Bucket/")
            && e.contains("expected s3://BUCKET"),
        "{e}"
    );
}

/// `--list-archives --offsite` without names: a job whose bucket cannot be read (its key no
/// longer opens its objects), listed first, is named on stderr and the next job is listed (it
/// stopped the command before the other job was listed); exit 1.
#[test]
fn a_job_whose_bucket_cannot_be_read_does_not_hide_the_other_offsite_listings() {
    let (_ceph, bucket, _src, a) = first_archive();
    ok(&a.affa(&["--offsite", JOB]));
    // A second job of the same source, to another prefix, with its own key.
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    let other_key = a.conf.join("other.key");
    let other = conf
        .replace(&format!("[{JOB}]"), "[zz-other]")
        .replace(&format!("s3://{bucket}/{PREFIX}"), &format!("s3://{bucket}/other"))
        .replace(&key_file(&a).display().to_string(), &other_key.display().to_string());
    a.write_conf("other.conf", &other);
    ok(&a.affa_at("2026-12-01T02:00:00", &["--run", "zz-other"]));
    ok(&a.affa(&["--offsite", "zz-other"]));
    // The first job's key is another one now.
    fs::write(key_file(&a), format!("affa-offsite-key 1\ncreated 2026-12-01T00:00:00\nkey {}\n", "5a".repeat(32)))
        .unwrap();
    let o = a.affa(&["--list-archives", "--offsite"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("Job zz-other offsite in ") && out.contains(": 1 archive(s)"), "{out}");
    assert!(
        err.starts_with(&format!("affa: error: job {JOB}: offsiteKeyFile ")) && err.contains("does not open"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// kill -9 of affa mid-upload (the test hook kills it right after its third chunk object): no
/// archive is listed, verify finds none, and the rerun sends only the rest.
#[cfg(feature = "test-hooks")]
#[test]
fn a_cut_upload_is_never_listed_and_the_rerun_completes_it() {
    let (ceph, bucket, _src, a) = first_archive();
    let o = a.cmd().env("AFFA_TEST_CRASH_AT", "offsite-chunk-uploaded:3").args(["--offsite", JOB]).output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "killed mid-upload: {o:?}");
    assert_eq!(objects(ceph, &bucket, "c/").len(), 3);
    assert!(objects(ceph, &bucket, "i/").is_empty(), "no index: the archive is not offsite");
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 0 archive(s)"), "{list}");
    let e = fail(&a.affa(&["--offsite-verify", JOB]));
    assert!(e.contains(&format!("job {JOB} has no offsite archive")), "{e}");

    let total = archive_chunks(&a.job_dir(JOB).join("scheduled.0")).len();
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(
        out.contains(&format!("{} object(s) uploaded ", total - 3 + 1)) && out.contains("3 chunk(s) already there"),
        "{out}"
    );
    assert_eq!(objects(ceph, &bucket, "c/").len(), total);
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
}

/// Add `lines` (KEY=VALUE) to the job's section (the only one of job.conf).
fn add_keys(a: &Affa, lines: &str) {
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &format!("{conf}{lines}"));
}

/// Change 300 KiB of the disk (two chunks) and add a small file `name`: the next archive has
/// new chunks.
fn change_source(src: &Path, seed: u64, name: &str) {
    let mut f = fs::OpenOptions::new().write(true).open(src.join("data/disk.img")).unwrap();
    f.seek(SeekFrom::Start(3 * CS as u64 + 1000)).unwrap();
    f.write_all(&random(seed, 300 << 10)).unwrap();
    drop(f);
    fs::write(src.join("data").join(name), format!("new file {seed}\n")).unwrap();
}

/// The offsite keeps remove the index of an archive they do not keep (no longer listed), never
/// a chunk; --offsite-cleanup then removes exactly the chunks no remaining archive uses, and
/// only once they are older than offsiteCleanupGrace (on the bucket's clock).
#[test]
fn the_offsite_keeps_drop_old_archives_and_cleanup_removes_only_unreferenced_old_chunks() {
    let (ceph, bucket, src, a) = first_archive();
    add_keys(
        &a,
        "offsiteScheduledKeep=1\noffsiteDailyKeep=0\noffsiteWeeklyKeep=0\noffsiteMonthlyKeep=0\noffsiteYearlyKeep=0\n",
    );
    ok(&a.affa_at("2026-12-01T02:00:00", &["--offsite", JOB]));
    let first = archive_chunks(&a.job_dir(JOB).join("scheduled.0"));
    let c1 = objects(ceph, &bucket, "c/");
    let i1 = objects(ceph, &bucket, "i/");
    assert_eq!((c1.len(), i1.len()), (first.len(), 1));

    change_source(src.path(), 7, "second.txt");
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    let second = archive_chunks(&a.job_dir(JOB).join("scheduled.0"));
    let out = ok(&a.affa_at("2026-12-02T02:00:00", &["--offsite", JOB]));
    assert!(
        out.contains(&format!(
            "{JOB} scheduled.0 (Date 202612010100): removed from s3://{bucket}/{PREFIX} by the offsite keeps"
        )),
        "{out}"
    );
    assert!(out.contains("1 offsite archive(s) kept (offsiteScheduledKeep=1 offsiteDailyKeep=0"), "{out}");
    let i2 = objects(ceph, &bucket, "i/");
    assert_eq!(i2.len(), 1);
    assert!(i2.is_disjoint(&i1), "the first archive's index is gone, the second's is there");
    let c2 = objects(ceph, &bucket, "c/");
    assert!(c2.is_superset(&c1), "the keeps never remove a chunk");
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 1 archive(s)") && list.contains("Date 202612020100"), "{list}");
    assert!(!list.contains("Date 202612010100"), "{list}");

    // Unreferenced but young (default grace 24 h): kept.
    let unused = first.difference(&second).count();
    assert!(unused >= 2, "the changed disk chunks and the old report");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(
        out.contains(&format!(
            "s3://{bucket}/{PREFIX}: 0 unreferenced chunk object(s) removed (0B); {} kept for 1 offsite archive(s); {unused} unreferenced one(s) younger than offsiteCleanupGrace=24 h kept",
            second.len()
        )),
        "{out}"
    );
    assert_eq!(objects(ceph, &bucket, "c/"), c2);

    // Grace 0: exactly the chunks of the dropped archive that the kept one does not use go.
    add_keys(&a, "offsiteCleanupGrace=0\n");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(out.contains(&format!(": {unused} unreferenced chunk object(s) removed")), "{out}");
    let c3 = objects(ceph, &bucket, "c/");
    assert_eq!(c3.len(), second.len(), "{out}");
    assert!(c3.is_subset(&c2));
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the cleanup's marker is removed");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("(Date 202612020100): OK"), "{v}");
    // Nothing left to remove.
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(out.contains(": 0 unreferenced chunk object(s) removed"), "{out}");
    assert_eq!(objects(ceph, &bucket, "c/"), c3);

    // An index that does not open (planted, or damaged): nothing removed, the index named.
    let planted = format!("i/{}/{}", "0".repeat(32), "1".repeat(64));
    ceph.put(&bucket, &format!("{PREFIX}/{planted}"), b"AFOB not a sealed index");
    ceph.delete(&bucket, &format!("{PREFIX}/{}", c3.iter().next().unwrap()));
    let e = fail(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(e.contains(&format!("offsite index {planted}: does not open")) && e.contains("nothing removed"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

/// A cleanup (grace 0: every unreferenced chunk is old enough) that meets an upload still
/// running (here: killed after its first chunk, its marker left; its chunk referenced by no
/// index yet) removes nothing; the upload then completes on the chunk it relies on. An upload
/// that meets a running cleanup (killed after writing its marker) uploads nothing; the cleanup's
/// rerun on the same host replaces the marker and removes it.
#[cfg(feature = "test-hooks")]
#[test]
fn a_cleanup_never_removes_a_chunk_a_running_upload_relies_on() {
    let (ceph, bucket, src, a) = first_archive();
    add_keys(&a, "offsiteCleanupGrace=0\n");
    ok(&a.affa_at("2026-12-01T02:00:00", &["--offsite", JOB]));
    change_source(src.path(), 8, "second.txt");
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    let (c1, i1) = (objects(ceph, &bucket, "c/"), objects(ceph, &bucket, "i/"));

    let o = a.cmd().env("AFFA_TEST_CRASH_AT", "offsite-chunk-uploaded:1").args(["--offsite", JOB]).output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "killed mid-upload: {o:?}");
    let c2 = objects(ceph, &bucket, "c/");
    assert_eq!(c2.len(), c1.len() + 1, "one chunk no index references yet");
    let markers = objects(ceph, &bucket, "lock/");
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(markers.iter().next().unwrap().starts_with("lock/upload-"), "{markers:?}");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(out.contains("an affa --offsite upload is running") && out.contains("nothing removed"), "{out}");
    assert_eq!(objects(ceph, &bucket, "c/"), c2, "the upload's chunk is still there");
    assert_eq!(objects(ceph, &bucket, "lock/"), markers, "the upload's marker stays, the cleanup's is gone");

    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains("1 chunk(s) already there") || out.contains(" chunk(s) already there"), "{out}");
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the rerun replaced the killed run's marker and removed it");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert_eq!(v.matches(": OK (").count(), 2, "{v}");
    let c3 = objects(ceph, &bucket, "c/");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(out.contains(": 0 unreferenced chunk object(s) removed"), "{out}");
    assert_eq!(objects(ceph, &bucket, "c/"), c3);

    // A cleanup killed after writing its marker: an upload meeting it sends nothing.
    let o =
        a.cmd().env("AFFA_TEST_CRASH_AT", "offsite-cleanup-marked").args(["--offsite-cleanup", JOB]).output().unwrap();
    assert_eq!(o.status.signal(), Some(9), "{o:?}");
    change_source(src.path(), 9, "third.txt");
    ok(&a.affa_at("2026-12-03T01:00:00", &["--run", JOB]));
    let i3 = objects(ceph, &bucket, "i/");
    let e = fail(&a.affa(&["--offsite", JOB]));
    assert!(
        e.contains("an affa --offsite-cleanup is running") && e.contains("nothing of scheduled.0 was uploaded"),
        "{e}"
    );
    assert_eq!((objects(ceph, &bucket, "c/"), objects(ceph, &bucket, "i/")), (c3.clone(), i3.clone()));
    let m = objects(ceph, &bucket, "lock/");
    assert!(
        m.len() == 1 && m.iter().next().unwrap().starts_with("lock/cleanup-"),
        "the upload's marker is removed: {m:?}"
    );
    ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(objects(ceph, &bucket, "lock/").is_empty());
    ok(&a.affa(&["--offsite", JOB]));
    assert_eq!(objects(ceph, &bucket, "i/").len(), i1.len() + 2);
}

/// `affa --run JOB` at `now`, which must succeed: what it wrote to the job's log.
fn run_logged(a: &Affa, now: &str) -> String {
    let log = a.state.join(format!("log/{JOB}.log"));
    let before = fs::read_to_string(&log).unwrap_or_default().len();
    ok(&a.affa_at(now, &["--run", JOB]));
    fs::read_to_string(&log).unwrap()[before..].to_string()
}

/// offsiteAfterRun=yes: each successful --run copies its archive; without a key (made only by a
/// first --offsite by hand) or with a failing bucket (a wrong secret: HTTP 403) the run succeeds
/// with a warning naming the failure, and its archive is complete and verifies.
#[test]
fn offsite_after_run_copies_each_new_archive_and_a_failed_copy_is_a_warning() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = source();
    let a = setup(ceph, src.path(), &bucket);
    add_keys(&a, "offsiteAfterRun=yes\n");
    let all = run_logged(&a, "2026-12-01T01:00:00");
    assert!(all.contains("its offsite copy (offsiteAfterRun=yes) failed") && all.contains("does not exist"), "{all}");
    assert!(!key_file(&a).exists(), "a run makes no key");
    assert!(ceph.keys(&bucket, "").is_empty());

    ok(&a.affa_at("2026-12-01T02:00:00", &["--offsite", JOB]));
    change_source(src.path(), 11, "second.txt");
    let all = run_logged(&a, "2026-12-02T01:00:00");
    assert!(
        all.contains(&format!("{JOB} scheduled.0 (Date 202612020100): offsite in s3://{bucket}/{PREFIX}")),
        "{all}"
    );
    assert!(!all.contains("failed"), "{all}");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 2);

    let creds = a.conf.join("offsite.credentials");
    let good = fs::read_to_string(&creds).unwrap();
    fs::write(&creds, good.replace(&format!("secretKey={SECRET}"), "secretKey=WRONGSECRET")).unwrap();
    change_source(src.path(), 12, "third.txt");
    let (c, i) = (objects(ceph, &bucket, "c/"), objects(ceph, &bucket, "i/"));
    let all = run_logged(&a, "2026-12-03T01:00:00");
    assert!(all.contains("its offsite copy (offsiteAfterRun=yes) failed") && all.contains("HTTP 403"), "{all}");
    assert_eq!((objects(ceph, &bucket, "c/"), objects(ceph, &bucket, "i/")), (c, i));
    let v = ok(&a.affa(&["--verify", JOB]));
    assert!(!v.is_empty());
    let list = ok(&a.affa(&["--list-archives", JOB]));
    assert!(list.contains("202612030100") || list.contains("2026-12-03"), "the new archive is there: {list}");
    fs::write(&creds, good).unwrap();
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains("(Date 202612030100): offsite in"), "{out}");
}

/// offsiteParallel=4 and offsiteBwLimit: the same objects as one sender would write (every
/// chunk, then the index), verified; the upload takes at least its bytes over the limit.
#[test]
fn parallel_uploads_send_every_chunk_and_the_bandwidth_limit_holds() {
    let (ceph, bucket, _src, a) = first_archive();
    add_keys(&a, "offsiteParallel=4\noffsiteBwLimit=512\n");
    let t0 = Instant::now();
    let out = ok(&a.affa(&["--offsite", JOB]));
    let took = t0.elapsed();
    let chunks = archive_chunks(&a.job_dir(JOB).join("scheduled.0"));
    let c = objects(ceph, &bucket, "c/");
    assert_eq!(c.len(), chunks.len(), "{out}");
    assert!(out.contains(&format!("{} object(s) uploaded", c.len() + 1)), "{out}");
    let bytes: usize = c.iter().map(|k| ceph.get(&bucket, &format!("{PREFIX}/{k}")).len()).sum();
    assert!(bytes > 1 << 20, "{bytes}");
    // The index is the last object: it is paced too, so the limit covers every byte but it.
    let floor = std::time::Duration::from_secs_f64(bytes as f64 / (512.0 * 1024.0) * 0.95);
    assert!(took >= floor, "{bytes} bytes in {took:?}: over 512 KiB/s (at least {floor:?} expected)");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
    assert!(objects(ceph, &bucket, "lock/").is_empty());
}

/// The ETag of the object `key` (HEAD through the shared gateway).
fn etag(ceph: &Ceph, bucket: &str, key: &str) -> String {
    use rusty_s3::S3Action;
    let b = rusty_s3::Bucket::new(
        ceph.endpoint.parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        bucket.to_string(),
        "us-east-1",
    )
    .unwrap();
    let c = rusty_s3::Credentials::new(ACCESS, SECRET);
    let url = b.head_object(Some(&c), key).sign(std::time::Duration::from_secs(600));
    ureq::head(url.as_str()).call().unwrap().header("ETag").unwrap().to_string()
}

/// The multipart uploads of `bucket` that were started and neither completed nor aborted
/// (ListMultipartUploads: `GET /BUCKET?uploads`): their object names.
fn open_uploads(ceph: &Ceph, bucket: &str) -> Vec<String> {
    use rusty_s3::S3Action;
    let b = rusty_s3::Bucket::new(
        ceph.endpoint.parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        bucket.to_string(),
        "us-east-1",
    )
    .unwrap();
    let c = rusty_s3::Credentials::new(ACCESS, SECRET);
    // A GET of the bucket signed with the `uploads` sub-resource (the gateway answers
    // ListMultipartUploads, which the check below makes sure of).
    let mut a = b.list_objects_v2(Some(&c));
    a.query_mut().insert("uploads", "");
    let url = a.sign(std::time::Duration::from_secs(600));
    let body = ureq::get(url.as_str()).call().map(|r| r.into_string().unwrap());
    body.ok()
        .filter(|b| b.contains("ListMultipartUploadsResult"))
        .map(|b| b.split("<Key>").skip(1).map(|k| k.split('<').next().unwrap().to_string()).collect())
        .unwrap_or_else(|| panic!("bucket {bucket}: no ListMultipartUploads answer"))
}

/// An object above the multipart threshold (lowered by the test hook to S3's smallest part,
/// 5 MiB; chunkSize=8M and an incompressible 8 MiB file: one chunk object of 8 MiB) goes up in
/// two parts (the gateway's multipart ETag `...-2`) and verifies. A part the gateway refuses
/// (the test hook: a Content-MD5 that does not match) fails the upload with the object and the
/// part named, aborts it (no upload left open, no index), and the rerun completes; the files
/// come back byte-identical with `--unchunk --from-offsite` (offsiteParallel=4).
#[cfg(feature = "test-hooks")]
#[test]
fn an_object_above_the_part_size_goes_up_in_parts_and_a_failed_part_leaves_nothing_open() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = source();
    fs::write(src.path().join("data/big.bin"), random(5, 8 << 20)).unwrap();
    let a = setup(ceph, src.path(), &bucket);
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &conf.replace("chunkSize=256K", "chunkSize=8M"));
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", JOB]));
    const PART: &str = "5242880";

    // The first run makes the key and refuses part 2.
    let o = a
        .cmd()
        .env("AFFA_TEST_OFFSITE_PART", PART)
        .env("AFFA_TEST_OFFSITE_REFUSE_PART", "2")
        .args(["--offsite", JOB])
        .output()
        .unwrap();
    let e = fail(&o);
    assert!(e.contains(&format!("s3://{bucket}/{PREFIX}: PUT c/")) && e.contains("(part 2 of 2): HTTP 400"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(open_uploads(ceph, &bucket).is_empty(), "the failed multipart upload was aborted");
    assert!(objects(ceph, &bucket, "i/").is_empty(), "no index");
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the marker is removed");

    let o = a.cmd().env("AFFA_TEST_OFFSITE_PART", PART).args(["--offsite", JOB]).output().unwrap();
    let out = ok(&o);
    let chunks = objects(ceph, &bucket, "c/");
    let multipart: Vec<&String> =
        chunks.iter().filter(|k| etag(ceph, &bucket, &format!("{PREFIX}/{k}")).ends_with("-2\"")).collect();
    assert_eq!(multipart.len(), 1, "one object of two parts: {out}");
    let big = ceph.get(&bucket, &format!("{PREFIX}/{}", multipart[0]));
    assert!(big.len() > 8 << 20, "{}", big.len());
    assert!(open_uploads(ceph, &bucket).is_empty());
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
    // Byte-identical back from the bucket (the plain files fetched 4 at a time).
    add_keys(&a, "offsiteParallel=4\n");
    let to = a.tmp.path().join("from-offsite");
    ok(&a.affa(&["--unchunk", JOB, "202612010100", "--from-offsite", "--to", to.to_str().unwrap()]));
    let back = to.join(src.path().strip_prefix("/").unwrap());
    for f in ["data/big.bin", "data/disk.img", "data/sub/secret-file-name-QX7.txt"] {
        assert!(
            fs::read(back.join(f)).unwrap() == fs::read(src.path().join(f)).unwrap(),
            "{f} back from the bucket differs"
        );
    }
}

/// offsiteParallel=4 and the gateway refusing the third chunk object (the test hook: a
/// Content-MD5 that does not match: HTTP 400 BadDigest, not retried): the other senders stop
/// (only the objects already on their way are written, of 50), no index is written,
/// the error names the object; the rerun completes.
#[cfg(feature = "test-hooks")]
#[test]
fn one_failing_parallel_sender_stops_the_others_and_no_index_is_written() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = source();
    fs::write(src.path().join("data/many.bin"), random(6, 40 * CS)).unwrap();
    let a = setup(ceph, src.path(), &bucket);
    add_keys(&a, "offsiteParallel=4\n");
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", JOB]));
    let total = archive_chunks(&a.job_dir(JOB).join("scheduled.0")).len();
    assert!(total >= 45, "{total}");
    let o = a.cmd().env("AFFA_TEST_OFFSITE_REFUSE", "3").args(["--offsite", JOB]).output().unwrap();
    let e = fail(&o);
    assert!(e.contains(&format!("s3://{bucket}/{PREFIX}: PUT c/")) && e.contains("HTTP 400 BadDigest"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let written = objects(ceph, &bucket, "c/").len();
    // PUTs started before the refusal came back complete (the refused body of 256 KiB is sent
    // first): a few rounds of the 4 senders, far from all.
    assert!(written <= 16, "{written} of {total} chunk objects written after the third was refused");
    assert!(objects(ceph, &bucket, "i/").is_empty(), "no index");
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the marker is removed");
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 0 archive(s)"), "{list}");

    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains(&format!("{} object(s) uploaded", total - written + 1)), "{written} written: {out}");
    // many.bin's first chunk is also one of disk.img's: counted once.
    assert!(out.contains(&format!(", {written} chunk(s) already there")), "{written} written: {out}");
    assert_eq!(objects(ceph, &bucket, "c/").len(), total);
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
}

/// "N chunk(s) already there" counts the archive's chunk objects the bucket held before the
/// upload, each once: a chunk the archive uses twice (two identical files, a plain file that
/// shares a chunk with a chunked one) is neither "already there" in a first upload nor counted
/// twice in a rerun.
#[test]
fn a_chunk_used_twice_in_an_archive_is_counted_once() {
    let ceph = Ceph::shared();
    let bucket = ceph.new_bucket();
    let src = source();
    // Its first chunk is chunk 2 of disk.img (the same BLAKE3 stream).
    fs::write(src.path().join("data/copy.bin"), random(2, 2 * CS)).unwrap();
    fs::write(src.path().join("data/twin-a.bin"), random(50, 3 * CS)).unwrap();
    fs::write(src.path().join("data/twin-b.bin"), random(50, 3 * CS)).unwrap();
    let a = setup(ceph, src.path(), &bucket);
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", JOB]));
    let total = archive_chunks(&a.job_dir(JOB).join("scheduled.0")).len();
    let o = a.cmd().env("AFFA_TEST_CRASH_AT", "offsite-chunk-uploaded:5").args(["--offsite", JOB]).output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "killed mid-upload: {o:?}");
    assert_eq!(objects(ceph, &bucket, "c/").len(), 5);
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(
        out.contains(&format!("{} object(s) uploaded ", total - 5 + 1)) && out.contains(", 5 chunk(s) already there"),
        "{total} chunks: {out}"
    );
    assert_eq!(objects(ceph, &bucket, "c/").len(), total);
    let fresh = ceph.new_bucket();
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &conf.replace(&format!("s3://{bucket}/"), &format!("s3://{fresh}/")));
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(
        out.contains(&format!("{} object(s) uploaded ", total + 1)) && out.contains(", 0 chunk(s) already there"),
        "{total} chunks: {out}"
    );
}

/// A restore, verify, list or cleanup never writes to a prefix: the bucket marker is written by
/// the first upload only.
#[test]
fn only_an_upload_writes_to_an_empty_prefix() {
    let (ceph, bucket, _src, a) = first_archive();
    ok(&a.affa(&["--offsite", JOB]));
    let empty = ceph.new_bucket();
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &conf.replace(&format!("s3://{bucket}/"), &format!("s3://{empty}/")));
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 0 archive(s)"), "{list}");
    let e = fail(&a.affa(&["--offsite-verify", JOB]));
    assert!(e.contains("has no offsite archive"), "{e}");
    let e = fail(&a.affa(&["--full-restore", JOB, "--from-offsite", "--yes"]));
    assert!(e.contains("has no offsite archive"), "{e}");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(out.contains("nothing removed"), "{out}");
    assert!(ceph.keys(&empty, "").is_empty(), "nothing written to the empty bucket");
    ok(&a.affa(&["--offsite", JOB]));
    assert_eq!(objects(ceph, &empty, "i/").len(), 1);
    assert!(!ceph.keys(&empty, "").is_empty());
}

/// The job's gateway (a radosgw of its own) killed mid-upload and started again within the
/// retry window: the upload completes and verifies. Killed for longer: a one-line error naming
/// the endpoint, non-zero exit, no index (the archive is not listed); the next --offsite resumes.
#[test]
fn a_gateway_back_within_the_retry_window_loses_nothing_and_a_longer_outage_fails_cleanly() {
    let ceph = Ceph::shared();
    let mut gw = ceph.spare_gateway();
    let bucket = ceph.new_bucket();
    let src = source();
    let a = setup(ceph, src.path(), &bucket);
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf("job.conf", &conf.replace(&ceph.endpoint, &gw.endpoint));
    // About 1 s per 256 KiB chunk object: the outage falls in the middle of the upload.
    add_keys(&a, "offsiteBwLimit=256\n");
    ok(&a.affa_at("2026-12-01T01:00:00", &["--run", JOB]));
    let total = archive_chunks(&a.job_dir(JOB).join("scheduled.0")).len();
    let wait_for = |n: usize| {
        poll(std::time::Duration::from_secs(120), std::time::Duration::from_millis(50), || {
            (objects(ceph, &bucket, "c/").len() >= n).then_some(())
        })
        .unwrap_or_else(|| panic!("fewer than {n} chunk objects after 120 s"));
    };
    let piped = std::process::Stdio::piped;
    let child = a.cmd().args(["--offsite", JOB]).stdout(piped()).stderr(piped()).spawn().unwrap();
    wait_for(2);
    gw.stop();
    std::thread::sleep(std::time::Duration::from_secs(2));
    gw.start();
    let o = child.wait_with_output().unwrap();
    let out = ok(&o);
    assert!(out.contains(&format!("{} object(s) uploaded", total + 1)), "{out}");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");

    // Down for longer than the retries wait (about 31 s).
    change_source(src.path(), 21, "second.txt");
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    let before = objects(ceph, &bucket, "c/").len();
    let child = a.cmd().args(["--offsite", JOB]).stdout(piped()).stderr(piped()).spawn().unwrap();
    wait_for(before + 1);
    gw.stop();
    let o = child.wait_with_output().unwrap();
    let e = fail(&o);
    assert!(
        e.contains(&format!("s3://{bucket}/{PREFIX}: PUT c/"))
            && e.contains(&format!("endpoint {}: ", gw.endpoint))
            && e.contains("(after 6 attempts)"),
        "{e}"
    );
    assert!(!e.contains("X-Amz-Signature"), "no signed URL in a message: {e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 1, "no index of the second archive");
    gw.start();
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 1 archive(s)") && !list.contains("Date 202612020100"), "{list}");
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains("(Date 202612020100): offsite in") && out.contains(" chunk(s) already there"), "{out}");
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the rerun replaced the failed run's marker and removed it");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert_eq!(v.matches(": OK (").count(), 2, "{v}");
}

/// Point the job at `endpoint` (a front before the gateway) instead of the gateway.
fn use_endpoint(a: &Affa, ceph: &Ceph, endpoint: &str) {
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf(
        "job.conf",
        &conf.replace(&format!("offsiteEndpoint={}\n", ceph.endpoint), &format!("offsiteEndpoint={endpoint}\n")),
    );
}

/// A front that answers every PUT with `308 Permanent Redirect` to the gateway (ureq followed no
/// redirect of a PUT and took the 308 for done: "N object(s) uploaded", nothing stored), then
/// one that answers every HEAD with `300 Multiple Choices` (taken for "the index exists":
/// "already offsite"). Each: the command fails on one line naming the redirect, claims nothing,
/// and the archive is not offsite; through the gateway itself the upload then goes and verifies.
#[test]
fn a_gateway_answering_with_a_redirect_fails_the_upload_and_nothing_is_claimed_offsite() {
    use common::s3_front::{Front, Response};
    let (ceph, bucket, _src, a) = first_archive();
    let gw = ceph.endpoint.clone();
    let front = Front::start(&ceph.endpoint, move |q, forward| {
        if q.method == "PUT" {
            let to = format!("{gw}{}", q.target);
            Response::new(308, &[("Location", to.as_str())], b"")
        } else {
            forward(q)
        }
    });
    use_endpoint(&a, ceph, &front.endpoint);
    let o = a.affa(&["--offsite", JOB]);
    let e = fail(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(e.contains(&format!("s3://{bucket}/{PREFIX}: PUT ")) && e.contains("HTTP 308 (a redirect"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!out.contains("uploaded") && !out.contains("offsite in"), "{out}");
    assert!(front.count("PUT") >= 1);
    assert!(ceph.keys(&bucket, "").is_empty(), "nothing stored");

    // The bucket holds the archive's chunks but not its index; HEAD answered 300.
    use_endpoint_back(&a, ceph, &front.endpoint);
    ok(&a.affa(&["--offsite", JOB]));
    let index = objects(ceph, &bucket, "i/");
    assert_eq!(index.len(), 1);
    let index = index.into_iter().next().unwrap();
    ceph.delete(&bucket, &format!("{PREFIX}/{index}"));
    let head = Front::start(
        &ceph.endpoint,
        |q, forward| {
            if q.method == "HEAD" {
                Response::new(300, &[], b"")
            } else {
                forward(q)
            }
        },
    );
    use_endpoint(&a, ceph, &head.endpoint);
    let o = a.affa(&["--offsite", JOB]);
    let e = fail(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(e.contains(&format!("s3://{bucket}/{PREFIX}: HEAD {index}: HTTP 300")), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!out.contains("already offsite"), "{out}");
    assert!(objects(ceph, &bucket, "i/").is_empty(), "the archive is not offsite");

    use_endpoint_back(&a, ceph, &head.endpoint);
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains("offsite in") && !out.contains("already offsite"), "{out}");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
}

/// Point the job back at the gateway itself.
fn use_endpoint_back(a: &Affa, ceph: &Ceph, endpoint: &str) {
    let conf = fs::read_to_string(a.conf.join("job.conf")).unwrap();
    a.write_conf(
        "job.conf",
        &conf.replace(&format!("offsiteEndpoint={endpoint}\n"), &format!("offsiteEndpoint={}\n", ceph.endpoint)),
    );
}

/// Someone else with write access to the prefix plants objects whose names leave their directory
/// (sent as is, `..` kept): `c/../i/JOB/INDEX` (the URL of that name, its dot segments removed,
/// is the archive's index) and `c/../../../../OTHER/victim` (path-style: an object of another
/// bucket). --offsite-cleanup with offsiteCleanupGrace=0 (every unreferenced chunk is old
/// enough) removes neither what they point at nor them, and names them; the archive is still
/// listed and verifies.
#[test]
fn names_planted_below_the_prefix_that_leave_their_directory_are_never_used_as_object_names() {
    let (ceph, bucket, _src, a) = first_archive();
    add_keys(&a, "offsiteCleanupGrace=0\n");
    ok(&a.affa(&["--offsite", JOB]));
    let (chunks, index) = (objects(ceph, &bucket, "c/"), objects(ceph, &bucket, "i/"));
    assert_eq!(index.len(), 1);
    let other = ceph.new_bucket();
    ceph.put(&other, "victim", b"another bucket's object");
    let planted = [format!("c/../{}", index.iter().next().unwrap()), format!("c/../../../../{other}/victim")];
    for p in &planted {
        ceph.put_as_is(&bucket, &format!("{PREFIX}/{p}"), b"planted");
    }
    let listed = objects(ceph, &bucket, "c/../");
    assert_eq!(listed, planted.iter().cloned().collect(), "the gateway keeps the names as sent");

    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert_eq!(objects(ceph, &bucket, "i/"), index, "the archive's index is still there: {out}");
    assert_eq!(ceph.keys(&other, ""), ["victim"], "the other bucket's object is still there: {out}");
    assert!(out.contains(": 0 unreferenced chunk object(s) removed"), "{out}");
    assert!(
        out.contains("2 object(s) of names affa does not write left alone")
            && planted.iter().all(|p| out.contains(p.as_str())),
        "{out}"
    );
    assert_eq!(objects(ceph, &bucket, "c/../"), listed, "what affa did not write, it does not remove");
    let c: BTreeSet<String> = objects(ceph, &bucket, "c/").into_iter().filter(|k| !k.starts_with("c/../")).collect();
    assert_eq!(c, chunks);
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 1 archive(s)"), "{list}");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
}

/// `affa ARGS` that must end within `secs` seconds (killed and failed otherwise).
fn within(a: &Affa, secs: u64, args: &[&str]) -> std::process::Output {
    let mut c = a.cmd();
    c.args(args);
    output_within(c, secs).0
}

/// A gateway (a front before the real one) whose listings never end: every ListObjectsV2 answer
/// ends with the same continuation token (and lists the same object twice), or with an empty
/// one. --offsite-cleanup (grace 0) and --offsite fail within seconds on one line naming the
/// listing, and nothing is removed. A front that lists every object twice: the offsite keeps
/// (offsiteScheduledKeep=2, two archives offsite) counted the newest archive twice and removed
/// the older one's index; now both stay.
#[test]
fn a_listing_without_end_or_with_a_name_twice_neither_hangs_nor_removes_an_archive() {
    use common::s3_front::Front;
    let (ceph, bucket, src, a) = first_archive();
    add_keys(
        &a,
        "offsiteCleanupGrace=0\noffsiteScheduledKeep=2\noffsiteDailyKeep=0\noffsiteWeeklyKeep=0\noffsiteMonthlyKeep=0\noffsiteYearlyKeep=0\n",
    );
    ok(&a.affa(&["--offsite", JOB]));
    change_source(src.path(), 31, "second.txt");
    ok(&a.affa_at("2026-12-02T01:00:00", &["--run", JOB]));
    ok(&a.affa(&["--offsite", JOB]));
    assert_eq!(objects(ceph, &bucket, "i/").len(), 2);
    let before = ceph.keys(&bucket, "");

    let chunk = format!("{PREFIX}/{}", objects(ceph, &bucket, "c/").into_iter().next().unwrap());
    for token in ["again", ""] {
        let page = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>{bucket}</Name><IsTruncated>true</IsTruncated>\
             <Contents><Key>{chunk}</Key><LastModified>2020-01-01T00:00:00.000Z</LastModified><ETag>\"x\"</ETag><Size>1</Size></Contents>\
             <Contents><Key>{chunk}</Key><LastModified>2020-01-01T00:00:00.000Z</LastModified><ETag>\"x\"</ETag><Size>1</Size></Contents>\
             <NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>"
        );
        let front = Front::start(&ceph.endpoint, move |q, forward| {
            if q.method == "GET" && q.target.contains("list-type=2") {
                let mut r = forward(q);
                r.body = page.clone().into_bytes();
                r
            } else {
                forward(q)
            }
        });
        use_endpoint(&a, ceph, &front.endpoint);
        for args in [&["--offsite-cleanup", JOB][..], &["--offsite", JOB]] {
            let e = fail(&within(&a, 60, args));
            assert!(e.contains(&format!("s3://{bucket}/{PREFIX}: LIST ")) && e.contains("page "), "{args:?}: {e}");
            let expected =
                if token.is_empty() { "an empty continuation token" } else { "a continuation token it sent before" };
            assert!(e.contains(expected), "{args:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
            assert_eq!(ceph.keys(&bucket, ""), before, "{args:?}: nothing removed, nothing left behind");
        }
        use_endpoint_back(&a, ceph, &front.endpoint);
    }

    // Every object listed twice.
    let front = Front::start(&ceph.endpoint, |q, forward| {
        let mut r = forward(q);
        if q.method == "GET" && q.target.contains("list-type=2") {
            let body = String::from_utf8(r.body.clone()).unwrap();
            let twice = body
                .split("<Contents>")
                .enumerate()
                .map(|(i, p)| match p.split_once("</Contents>") {
                    // Each whole element twice, what follows the last one (KeyCount, the end of
                    // the listing) once.
                    Some((elem, rest)) if i > 0 => {
                        format!("<Contents>{elem}</Contents><Contents>{elem}</Contents>{rest}")
                    }
                    _ => p.to_string(),
                })
                .collect::<String>();
            assert!(twice.len() > body.len() || !body.contains("<Contents>"));
            r.body = twice.into_bytes();
        }
        r
    });
    use_endpoint(&a, ceph, &front.endpoint);
    let out = ok(&a.affa(&["--offsite", JOB]));
    assert!(out.contains("already offsite") && !out.contains("removed"), "{out}");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 2, "both archives are still offsite: {out}");
    let out = ok(&a.affa(&["--offsite-cleanup", JOB]));
    assert!(
        out.contains(": 0 unreferenced chunk object(s) removed") && out.contains("for 2 offsite archive(s)"),
        "{out}"
    );
    assert_eq!(ceph.keys(&bucket, ""), before);
    use_endpoint_back(&a, ceph, &front.endpoint);
    let list = ok(&a.affa(&["--list-archives", "--offsite", JOB]));
    assert!(list.contains(": 2 archive(s)"), "{list}");
}

/// A gateway (a front before the real one) that answers a request one byte a second and never
/// ends its answer (a broken or hostile proxy): ureq's idle timeouts never fired, and a run with
/// offsiteAfterRun=yes held the job's lock for ever (every later run of the job refused: missed
/// backups). Each request now has a deadline (offsiteTimeout=2 here, plus 1 s per 256 KiB): the
/// run with its chunk PUTs trickled ends after the retries (6 attempts, 31 s apart in all) with
/// exit 0 and the warning naming the endpoint, the PUT and the deadline; its archive is
/// complete and verifies; the job's next run is not blocked and copies the archive once the
/// gateway answers. `--offsite` with the bucket marker's GET trickled fails on one line, exit 1.
#[test]
fn a_gateway_that_trickles_its_answers_holds_neither_a_run_nor_the_job_lock() {
    use common::s3_front::{Front, Response};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let (ceph, bucket, src, a) = first_archive();
    ok(&a.affa_at("2026-12-01T02:00:00", &["--offsite", JOB]));
    // 0: forward everything; 1: trickle chunk PUTs; 2: trickle the bucket marker's GET.
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let front = Front::start(&ceph.endpoint, move |q, forward| {
        let path = q.target.split('?').next().unwrap_or("");
        match m.load(Ordering::SeqCst) {
            1 if q.method == "PUT" && path.contains("/c/") => Response::trickle(),
            2 if q.method == "GET" && path.ends_with("/affa-offsite") => Response::trickle(),
            _ => forward(q),
        }
    });
    use_endpoint(&a, ceph, &front.endpoint);
    add_keys(&a, "offsiteAfterRun=yes\noffsiteTimeout=2\n");
    change_source(src.path(), 41, "second.txt");
    // Another mtime than the archived one, whatever the clock's second (rsync's quick check
    // compares size and whole-second mtime; the size is the same).
    let img = fs::OpenOptions::new().write(true).open(src.path().join("data/disk.img")).unwrap();
    img.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_041)).unwrap();
    drop(img);
    let log = a.state.join(format!("log/{JOB}.log"));
    let before = fs::read_to_string(&log).unwrap().len();

    mode.store(1, Ordering::SeqCst);
    let mut c = a.cmd();
    c.env("AFFA_FAKE_NOW", "2026-12-02T01:00:00").args(["--run", JOB]);
    let (o, took) = output_within(c, 240);
    ok(&o);
    let all = fs::read_to_string(&log).unwrap()[before..].to_string();
    // The first chunk object sent (a small file's: 2 s + 1 s; a sealed chunk of 256 KiB and a
    // little more: 2 s + 2 s), six attempts 1 to 16 s apart.
    let late = format!("endpoint {}: timed out: the request did not finish within its deadline of ", front.endpoint);
    assert!(
        all.contains("its offsite copy (offsiteAfterRun=yes) failed")
            && all.contains(&format!("s3://{bucket}/{PREFIX}: PUT c/"))
            && all.contains(&late)
            && all.contains(" s (offsiteTimeout=2 s plus 1 s per 256 KiB it moves) (after 6 attempts)"),
        "{all}"
    );
    assert!(took < std::time::Duration::from_secs(6 * 4 + 31 + 30), "the run took {took:?}");
    let s0 = a.job_dir(JOB).join("scheduled.0");
    assert!(fs::read_to_string(s0.join(".AFFA3-REPORT")).unwrap().contains("Date=202612020100"));
    ok(&a.affa(&["--verify", JOB]));
    // Its plain files as they are, its chunked disk rebuilt: the source's.
    let mut archived = tree_hashes(&s0.join(src.path().strip_prefix("/").unwrap()).join("data"));
    archived.remove("disk.img.affa-manifest").expect("the disk is chunked");
    let to = a.tmp.path().join("unchunked");
    ok(&a.affa(&["--unchunk", JOB, "scheduled.0", "--to", to.to_str().unwrap()]));
    archived.extend(tree_hashes(&to.join(src.path().strip_prefix("/").unwrap()).join("data")));
    assert_eq!(archived, tree_hashes(&src.path().join("data")), "the archive is the source");
    assert_eq!(objects(ceph, &bucket, "i/").len(), 1, "the second archive is not offsite");

    // The next run is not blocked: it runs, and copies its archive once the gateway answers.
    mode.store(0, Ordering::SeqCst);
    change_source(src.path(), 42, "third.txt");
    let all = run_logged(&a, "2026-12-03T01:00:00");
    assert!(
        all.contains(&format!("{JOB} scheduled.0 (Date 202612030100): offsite in")) && !all.contains("failed"),
        "{all}"
    );

    // --offsite by hand against a trickled GET: one line, exit 1, within the retries.
    mode.store(2, Ordering::SeqCst);
    let mut c = a.cmd();
    c.args(["--offsite", JOB, "daily.0"]);
    let (o, took) = output_within(c, 240);
    let e = fail(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains(&format!("s3://{bucket}/{PREFIX}: GET affa-offsite: endpoint {}: timed out: the request did not finish within its deadline of 3 s", front.endpoint))
            && e.contains("(after 6 attempts)"),
        "{e}"
    );
    assert!(took < std::time::Duration::from_secs(6 * 3 + 31 + 30), "--offsite took {took:?}");
    mode.store(0, Ordering::SeqCst);
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert_eq!(v.matches(": OK (").count(), 2, "{v}");
}

/// The marker of a running upload is rewritten by a thread of its own (every second here,
/// `AFFA_TEST_OFFSITE_MARKER_REFRESH`), also while the upload waits on one long request: a
/// gateway that takes its time over the index's PUT (it answers only once it has seen the
/// marker rewritten twice, at most 20 s). It was rewritten only between chunks and listing
/// pages: past an hour on one index PUT a cleanup elsewhere took it for a dead run's marker and
/// could remove chunks the index names.
#[cfg(feature = "test-hooks")]
#[test]
fn the_upload_marker_stays_fresh_through_a_long_index_put() {
    use common::s3_front::Front;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (ceph, bucket, _src, a) = first_archive();
    let rewrites = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(AtomicBool::new(false));
    let (r, d) = (rewrites.clone(), during.clone());
    let front = Front::start(&ceph.endpoint, move |q, forward| {
        let path = q.target.split('?').next().unwrap_or("");
        if q.method == "PUT" && path.contains("/lock/upload-") {
            r.fetch_add(1, Ordering::SeqCst);
        } else if q.method == "PUT" && path.contains("/i/") {
            let answer = forward(q);
            let seen = r.load(Ordering::SeqCst);
            let t0 = Instant::now();
            while r.load(Ordering::SeqCst) < seen + 2 && t0.elapsed() < std::time::Duration::from_secs(20) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            d.store(r.load(Ordering::SeqCst) >= seen + 2, Ordering::SeqCst);
            return answer;
        }
        forward(q)
    });
    use_endpoint(&a, ceph, &front.endpoint);
    let out = ok(&a.cmd().env("AFFA_TEST_OFFSITE_MARKER_REFRESH", "1").args(["--offsite", JOB]).output().unwrap());
    assert!(out.contains("offsite in"), "{out}");
    assert!(during.load(Ordering::SeqCst), "the marker was not rewritten while the index PUT lasted");
    assert!(objects(ceph, &bucket, "lock/").is_empty(), "the marker is removed at the end, no rewrite after it");
    let v = ok(&a.affa(&["--offsite-verify", JOB]));
    assert!(v.contains("scheduled.0 (Date 202612010100): OK"), "{v}");
}

/// An HTTPS endpoint that trickles its TLS handshake (one byte a second of a record that
/// announces 16 KiB): ureq set the socket's timeouts only when it connected and once per buffer,
/// while rustls reads in a loop until a whole record has arrived, so each byte within the
/// timeout kept one request alive for hours (the gateway front of the test above speaks plain
/// HTTP and could not see it). Every attempt ends at its deadline now, and the command after
/// six of them, naming the deadline.
#[test]
fn an_https_endpoint_that_trickles_its_handshake_is_held_to_the_deadline() {
    let (ceph, _bucket, _src, a) = first_archive();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let s = s.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                // A TLS handshake record header announcing 16 KiB, then a byte a second.
                let _ = conn.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    if conn.write_all(&[0x02]).is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        }
    });
    let endpoint = format!("https://127.0.0.1:{port}");
    use_endpoint(&a, ceph, &endpoint);
    add_keys(&a, "offsiteTimeout=2\n");
    let mut c = a.cmd();
    c.env("AFFA_FAKE_NOW", "2026-12-02T01:00:00").args(["--offsite", JOB]);
    let (o, took) = output_within(c, 900);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = fail(&o);
    let late = format!("endpoint {endpoint}: timed out: the request did not finish within its deadline of ");
    assert!(e.contains(&late) && e.contains("(after 6 attempts)"), "{e}");
    // Six attempts, each ended at its deadline (the first request lists the bucket: 2 s plus
    // a listing page's 8 MiB at the least rate), 1 + 2 + 4 + 8 + 16 s apart. Without the
    // connector, one attempt took 16 KiB at a byte a second: four and a half hours.
    let secs: u64 = e.split(&late).nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(secs < 60, "{e}");
    assert!(took < std::time::Duration::from_secs(6 * (secs + 3) + 31 + 30), "--offsite took {took:?}: {e}");
}
