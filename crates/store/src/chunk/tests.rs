//! End-to-end tests of the chunk store: round trips (property test), holes, dedup across
//! versions and files, sweep after `rm -rf`, `cp -a` self-containment, damage detection and
//! repair, garbage manifests, the hard-link limit, and crash safety under SIGKILL.
//!
//! Owns: nothing outside the temp directories it creates. Must never: depend on test order or
//! on files outside its temp directories.

use super::*;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const K: u32 = 1024;

fn rnd_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

struct Env {
    t: tempfile::TempDir,
    root: PathBuf,
    pool: Pool,
}

fn env() -> Env {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let pool = Pool::open(&root).unwrap();
    Env { t, root, pool }
}

impl Env {
    fn archive(&self, job: &str, name: &str) -> PathBuf {
        let p = self.root.join(job).join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
    fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.t.path().join("staging").join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        p
    }
    fn out(&self, name: &str) -> PathBuf {
        let d = self.t.path().join("out");
        fs::create_dir_all(&d).unwrap();
        d.join(name)
    }
}

fn settings(cs: u32) -> Settings {
    Settings { chunk_size: cs, compression: Compression::Zstd(1), threads: 0 }
}

fn chunk(e: &Env, s: &Settings, src: &Path, arch: &Path, rel: &str, prev: Option<&Manifest>) -> ChunkStats {
    chunk_file(&e.pool, s, src, arch, Path::new(rel), prev, None).unwrap()
}

fn rebuild(e: &Env, arch: &Path, rel: &str) -> Vec<u8> {
    let out = e.out("rebuilt");
    let _ = fs::remove_file(&out);
    unchunk_file(arch, &manifest_path(arch, Path::new(rel)), &out, None).unwrap();
    fs::read(&out).unwrap()
}

fn pool_entries(pool: &Pool) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    for fan in fs::read_dir(pool.dir()).unwrap().flatten() {
        if fan.file_name().len() != 2 {
            continue;
        }
        for e in fs::read_dir(fan.path()).unwrap().flatten() {
            v.push((e.path(), e.metadata().unwrap().len()));
        }
    }
    v.sort();
    v
}

fn pool_bytes(pool: &Pool) -> u64 {
    pool_entries(pool).iter().map(|x| x.1).sum()
}

/// Data ranges of a file per SEEK_DATA / SEEK_HOLE.
fn data_ranges(p: &Path) -> Vec<(u64, u64)> {
    let f = fs::File::open(p).unwrap();
    let size = f.metadata().unwrap().len();
    let mut v = Vec::new();
    let mut off = 0u64;
    while off < size {
        let Ok(d) = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(off)) else { break };
        let h = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(d)).unwrap();
        v.push((d, h));
        off = h;
    }
    v
}

fn overlaps(ranges: &[(u64, u64)], a: u64, b: u64) -> bool {
    ranges.iter().any(|&(s, e)| s < b && a < e)
}

#[derive(Debug, Clone)]
enum Seg {
    Hole(usize),
    Zeros(usize),
    Random(u64, usize),
    Repeat(u8, usize),
    Copy(usize), // repeats the first bytes of the file so far
}

fn build_file(path: &Path, segs: &[Seg]) -> Vec<u8> {
    let f = fs::File::create(path).unwrap();
    let mut all: Vec<u8> = Vec::new();
    for s in segs {
        let off = all.len() as u64;
        let bytes = match s {
            Seg::Hole(n) => {
                all.resize(all.len() + n, 0);
                continue;
            }
            Seg::Zeros(n) => vec![0u8; *n],
            Seg::Random(seed, n) => rnd_bytes(*seed, *n),
            Seg::Repeat(b, n) => vec![*b; *n],
            Seg::Copy(n) => all.iter().cycle().take(if all.is_empty() { 0 } else { *n }).copied().collect(),
        };
        f.write_all_at(&bytes, off).unwrap();
        all.extend_from_slice(&bytes);
    }
    f.set_len(all.len() as u64).unwrap();
    f.sync_all().unwrap();
    all
}

fn check_roundtrip(e: &Env, s: &Settings, segs: &[Seg], tag: &str) {
    let src = e.t.path().join(format!("src-{tag}"));
    let data = build_file(&src, segs);
    fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
    let arch = e.archive("job", tag);
    let st = chunk(e, s, &src, &arch, "d/vm.img", None);
    let cs = s.chunk_size as usize;
    assert_eq!(st.logical_size, data.len() as u64);
    assert_eq!(st.chunks as usize, data.len().div_ceil(cs));
    let zero_chunks = data.chunks(cs).filter(|c| c.iter().all(|&b| b == 0)).count();
    assert_eq!(st.zero_chunks as usize, zero_chunks);

    let mp = manifest_path(&arch, Path::new("d/vm.img"));
    let out = e.out(tag);
    let m = unchunk_file(&arch, &mp, &out, None).unwrap();
    let back = fs::read(&out).unwrap();
    assert!(back == data, "content differs ({} vs {} bytes)", back.len(), data.len());
    let (ms, mo) = (fs::metadata(&src).unwrap(), fs::metadata(&out).unwrap());
    assert_eq!(mo.mode() & 0o7777, 0o640);
    assert_eq!((mo.mtime(), mo.mtime_nsec()), (ms.mtime(), ms.mtime_nsec()));
    assert_eq!(m.size, data.len() as u64);
    // Holes stay holes: no data in any all-zero chunk, and never more blocks than the source.
    let ranges = data_ranges(&out);
    for (i, c) in data.chunks(cs).enumerate() {
        if c.iter().all(|&b| b == 0) {
            assert!(!overlaps(&ranges, (i * cs) as u64, (i * cs + c.len()) as u64), "zero chunk {i} has data");
        }
    }
    assert!(mo.blocks() <= ms.blocks(), "rebuilt uses {} blocks, source {}", mo.blocks(), ms.blocks());
    // The other two readers agree.
    let mut v = Vec::new();
    stream_file(&arch, &m, &mp, &mut v, None).unwrap();
    assert!(v == data);
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut ChunkReader::open(&arch, &mp).unwrap(), &mut v).unwrap();
    assert!(v == data);
    assert!(verify_archive(&arch, None).unwrap().is_ok());
}

#[test]
fn edge_sizes_roundtrip() {
    let e = env();
    let s = settings(256 * K);
    let cs = 256 * 1024usize;
    for (i, n) in [0usize, 1, cs - 1, cs, cs + 1, 3 * cs + 17].iter().enumerate() {
        check_roundtrip(&e, &s, &[Seg::Random(i as u64, *n)], &format!("r{i}"));
    }
    check_roundtrip(&e, &s, &[Seg::Zeros(5 * cs + 3)], "zeros");
    check_roundtrip(&e, &s, &[Seg::Hole(8 * cs), Seg::Random(9, 100), Seg::Hole(3 * cs)], "sparse");
    check_roundtrip(&e, &s, &[Seg::Repeat(0xff, 6 * cs)], "repeat");
    // Repeated non-zero chunks are stored once.
    let before = pool_entries(&e.pool).len();
    check_roundtrip(&e, &s, &[Seg::Random(77, cs), Seg::Copy(7 * cs)], "dupes");
    assert_eq!(pool_entries(&e.pool).len(), before + 1);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn seg() -> impl Strategy<Value = Seg> {
        let len = prop_oneof![0usize..5000, 0usize..600_000];
        prop_oneof![
            len.clone().prop_map(Seg::Hole),
            len.clone().prop_map(Seg::Zeros),
            (any::<u64>(), len.clone()).prop_map(|(s, n)| Seg::Random(s, n)),
            (any::<u8>(), len.clone()).prop_map(|(b, n)| Seg::Repeat(b, n)),
            len.prop_map(Seg::Copy),
        ]
    }

    proptest! {
        // No regression files: they would land outside src/chunk.
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn files_roundtrip(segs in proptest::collection::vec(seg(), 0..8), comp in 0..3u8) {
            let e = env();
            let mut s = settings(256 * K);
            s.compression = [Compression::None, Compression::Lz4, Compression::Zstd(3)][comp as usize];
            check_roundtrip(&e, &s, &segs, "p");
        }
    }
}

#[test]
fn second_version_adds_only_changed_chunks() {
    let e = env();
    let s = settings(1024 * K);
    let mib = 1usize << 20;
    let v1 = rnd_bytes(1, 64 * mib);
    let mut v2 = v1.clone();
    // 1% changed: three clustered extents of ~218 KiB.
    let mut touched = std::collections::BTreeSet::new();
    for start in [5 * mib + 1000, 30 * mib + 900 * 1024, 50 * mib] {
        let n = 64 * mib / 100 / 3;
        v2[start..start + n].copy_from_slice(&rnd_bytes(start as u64, n));
        touched.insert(start / mib);
        touched.insert((start + n - 1) / mib);
    }
    let a1 = e.archive("vm", "scheduled.1");
    let a2 = e.archive("vm", "scheduled.0");
    let src = e.put("disk.vmdk", &v1);
    let st1 = chunk(&e, &s, &src, &a1, "vmfs/disk.vmdk", None);
    assert_eq!(st1.new_chunks, 64);
    assert_eq!(pool_bytes(&e.pool), st1.added_bytes);
    let size1 = pool_bytes(&e.pool);
    let m1 = read_manifest(&st1.manifest_path).unwrap();
    fs::write(&src, &v2).unwrap();
    let st2 = chunk(&e, &s, &src, &a2, "vmfs/disk.vmdk", Some(&m1));
    assert_eq!(st2.new_chunks as usize, touched.len(), "{st2:?}");
    assert_eq!(st2.reused_chunks as usize, 64 - touched.len());
    assert_eq!(st2.verified_chunks, 0, "same-index chunks are trusted");
    let grown = pool_bytes(&e.pool) - size1;
    assert_eq!(grown, st2.added_bytes);
    assert!(grown <= (touched.len() * (mib + 64)) as u64, "pool grew by {grown}");
    // Both archives verify and rebuild exactly.
    assert!(verify_archive(&a1, None).unwrap().is_ok());
    assert!(verify_archive(&a2, None).unwrap().is_ok());
    assert!(rebuild(&e, &a1, "vmfs/disk.vmdk") == v1);
    assert!(rebuild(&e, &a2, "vmfs/disk.vmdk") == v2);
    let u = archive_usage(&a2).unwrap();
    assert_eq!(u.logical_bytes, v2.len() as u64);
    assert_eq!(u.added_bytes, st2.added_bytes);
    assert_eq!(u.exclusive_bytes, st2.added_bytes);
    assert!(u.dedup_ratio() > 0.9);
}

#[test]
fn files_of_one_image_share_chunks_across_jobs() {
    let e = env();
    let s = settings(256 * K);
    let img = rnd_bytes(5, 3 * 1024 * 1024 + 5);
    let a = e.put("a.img", &img);
    let b = e.put("b.img", &img);
    let st1 = chunk(&e, &s, &a, &e.archive("job1", "scheduled.0"), "a.img", None);
    let grown = pool_bytes(&e.pool);
    let st2 = chunk(&e, &s, &b, &e.archive("job2", "scheduled.0"), "x/b.img", None);
    assert_eq!(st1.new_chunks, 13);
    assert_eq!(st2.new_chunks, 0);
    assert_eq!(st2.added_bytes, 0);
    assert_eq!(st2.verified_chunks, 13, "chunks not in the previous manifest are verified");
    assert_eq!(pool_bytes(&e.pool), grown);
}

#[test]
fn rm_rf_then_sweep_frees_exactly_the_unshared_chunks() {
    let e = env();
    let s = settings(256 * K);
    let cs = 256 * 1024;
    let shared = rnd_bytes(1, 4 * cs);
    let mut x = shared.clone();
    x.extend(rnd_bytes(2, 3 * cs)); // 3 chunks only in x
    let mut y = shared.clone();
    y.extend(rnd_bytes(3, 2 * cs)); // 2 chunks only in y
    let a1 = e.archive("j", "daily.1");
    let a2 = e.archive("j", "daily.0");
    let sx = chunk(&e, &s, &e.put("x", &x), &a1, "x", None);
    chunk(&e, &s, &e.put("y", &y), &a2, "y", None);
    assert_eq!(pool_entries(&e.pool).len(), 9);
    let only_x: u64 = {
        let m = read_manifest(&sx.manifest_path).unwrap();
        m.chunks[4..]
            .iter()
            .map(|c| match c {
                ChunkRef::Stored(id) => fs::metadata(e.pool.entry(id)).unwrap().len(),
                ChunkRef::Zero => 0,
            })
            .sum()
    };
    let nothing = sweep(&e.pool).unwrap();
    assert_eq!((nothing.removed_chunks, nothing.freed_bytes, nothing.kept_chunks), (0, 0, 9));
    fs::remove_dir_all(&a1).unwrap();
    let st = sweep(&e.pool).unwrap();
    assert_eq!(st.removed_chunks, 3);
    assert_eq!(st.freed_bytes, only_x);
    assert_eq!(st.kept_chunks, 6);
    assert!(rebuild(&e, &a2, "y") == y);
    fs::remove_dir_all(&a2).unwrap();
    assert_eq!(sweep(&e.pool).unwrap().removed_chunks, 6);
    assert!(pool_entries(&e.pool).is_empty());
}

/// The sweep of a run looks only at what its deletions linked: the archive's own unshared
/// chunks are freed, a chunk another archive still links is kept, and an orphan the deleted
/// archive never linked is left for the full sweep.
#[test]
fn sweep_some_frees_exactly_the_deleted_archives_unshared_chunks() {
    let e = env();
    let s = settings(256 * K);
    let cs = 256 * 1024;
    let shared = rnd_bytes(11, 4 * cs);
    let mut x = shared.clone();
    x.extend(rnd_bytes(12, 3 * cs)); // 3 chunks only in x
    let a1 = e.archive("j", "daily.1");
    let a2 = e.archive("j", "daily.0");
    chunk(&e, &s, &e.put("x", &x), &a1, "x", None);
    chunk(&e, &s, &e.put("y", &shared), &a2, "y", None);
    // An orphan no archive links (left by something else): not this sweep's business.
    let stray = e.pool.entry(blake3::hash(b"stray").as_bytes());
    fs::create_dir_all(stray.parent().unwrap()).unwrap();
    fs::write(&stray, b"x").unwrap();
    let ids = linked_ids(&a1);
    assert_eq!(ids.len(), 7, "x links 7 distinct chunks");
    assert!(linked_ids(&e.t.path().join("nowhere")).is_empty());
    fs::remove_dir_all(&a1).unwrap();
    let st = sweep_some(&e.pool, &ids).unwrap();
    assert_eq!((st.removed_chunks, st.kept_chunks), (3, 4));
    assert!(stray.exists(), "sweep_some removed an entry it was not given");
    assert!(rebuild(&e, &a2, "y") == shared);
    // Given twice, an id is looked at once; a missing entry is no error.
    let again = sweep_some(&e.pool, &[ids.clone(), ids].concat()).unwrap();
    assert_eq!((again.removed_chunks, again.kept_chunks), (0, 4));
    assert_eq!(sweep(&e.pool).unwrap().removed_chunks, 1, "the full sweep takes the stray");
}

/// Two sweeps at once (two jobs' rotations, or two servers sharing RootDir): an entry the other
/// sweep removed first is not an error, and together they remove every orphan exactly once.
#[test]
fn concurrent_sweeps_never_fail_on_an_entry_the_other_removed() {
    let e = env();
    let n: u64 = 3000;
    for i in 0..n {
        let h = blake3::hash(&i.to_le_bytes()).to_hex().to_string();
        let d = e.pool.dir().join(&h[..2]);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(&h), b"x").unwrap();
    }
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| sweep(&e.pool))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut removed = 0;
    for r in results {
        removed += r.unwrap_or_else(|e| panic!("a sweep failed: {e}")).removed_chunks;
    }
    assert_eq!(removed, n);
    assert!(pool_entries(&e.pool).is_empty());
}

#[test]
fn copied_archive_rebuilds_without_the_pool() {
    let e = env();
    let s = settings(256 * K);
    let data = build_file(&e.t.path().join("src"), &[Seg::Random(4, 900_000), Seg::Hole(600_000), Seg::Random(5, 10)]);
    let a = e.archive("j", "scheduled.0");
    chunk(&e, &s, &e.t.path().join("src"), &a, "vm/disk-flat.vmdk", None);
    let copy = e.t.path().join("usb/scheduled.0");
    fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let ok = Command::new("cp").arg("-a").arg(&a).arg(&copy).status().unwrap();
    assert!(ok.success());
    fs::remove_dir_all(&e.root).unwrap();
    assert!(verify_archive(&copy, None).unwrap().is_ok());
    assert!(rebuild(&e, &copy, "vm/disk-flat.vmdk") == data);
    assert_eq!(list_manifests(&copy).unwrap(), vec![copy.join("vm/disk-flat.vmdk.affa-manifest")]);
}

#[test]
fn damage_is_reported_refused_and_repaired() {
    let e = env();
    let s = settings(256 * K);
    let cs = 256 * 1024;
    let data = rnd_bytes(8, 5 * cs);
    let other = rnd_bytes(8, 2 * cs); // shares chunks 0 and 1 with `data`
    let a = e.archive("j", "scheduled.0");
    let src = e.put("disk", &data);
    let st = chunk(&e, &s, &src, &a, "vm/disk", None);
    chunk(&e, &s, &e.put("other", &other), &a, "vm/other", None);
    let m = read_manifest(&st.manifest_path).unwrap();
    let id_of = |i: usize| match m.chunks[i] {
        ChunkRef::Stored(id) => id,
        ChunkRef::Zero => unreachable!(),
    };
    // Flip a byte in the pool entry of chunk 1 (the archive links the same inode) and delete
    // the archive's link of chunk 3.
    let p1 = e.pool.entry(&id_of(1));
    let f = fs::OpenOptions::new().read(true).write(true).open(&p1).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 5000).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 5000).unwrap();
    drop(f);
    fs::remove_file(a.join(ARCHIVE_CHUNK_DIR).join(&id_hex(&id_of(3))[..2]).join(id_hex(&id_of(3)))).unwrap();

    let rep = verify_archive(&a, None).unwrap();
    assert!(!rep.is_ok());
    assert_eq!(rep.problems.len(), 2, "{rep:?}");
    let p1r = rep.problems.iter().find(|p| p.id == id_hex(&id_of(1))).unwrap();
    assert!(matches!(p1r.kind, ProblemKind::Damaged(_)));
    assert_eq!(p1r.files, vec![PathBuf::from("vm/disk"), PathBuf::from("vm/other")]);
    let p3r = rep.problems.iter().find(|p| p.id == id_hex(&id_of(3))).unwrap();
    assert_eq!(p3r.kind, ProblemKind::Missing);
    assert_eq!(p3r.files, vec![PathBuf::from("vm/disk")]);
    assert_eq!(rep.damaged_files(), vec![PathBuf::from("vm/disk"), PathBuf::from("vm/other")]);

    // Unchunk refuses, names the chunk and the file, leaves nothing (and keeps an old dest).
    let out = e.out("restored");
    let err = unchunk_file(&a, &st.manifest_path, &out, None).unwrap_err();
    assert!(err.message().contains(&id_hex(&id_of(1))) || err.message().contains(&id_hex(&id_of(3))), "{err}");
    assert!(err.message().contains("vm/disk"), "{err}");
    assert_eq!(err.kind(), crate::error::ErrorKind::Damaged, "{err}");
    assert!(!out.exists());
    assert_eq!(fs::read_dir(out.parent().unwrap()).unwrap().count(), 0, "temp file left behind");
    fs::write(&out, b"old").unwrap();
    assert!(unchunk_file(&a, &st.manifest_path, &out, None).is_err());
    assert_eq!(fs::read(&out).unwrap(), b"old");
    let mut sink = Vec::new();
    let read = std::io::Read::read_to_end(&mut ChunkReader::open(&a, &st.manifest_path).unwrap(), &mut sink);
    assert_eq!(crate::error::Error::from(read.unwrap_err()).kind(), crate::error::ErrorKind::Damaged);

    // A later backup of the same data with the previous manifest: the bit flip is invisible to
    // the trusted path until verify's findings are evicted from the pool.
    assert_eq!(evict_damaged(&e.pool, &rep).unwrap(), 1);
    let a2 = e.archive("j", "scheduled.new");
    let st2 = chunk(&e, &s, &src, &a2, "vm/disk", Some(&m));
    assert_eq!(st2.new_chunks, 1, "{st2:?}");
    assert!(verify_archive(&a2, None).unwrap().is_ok());
    assert!(rebuild(&e, &a2, "vm/disk") == data);

    // Without a previous manifest, a damaged entry is found by the check before reuse.
    let p0 = e.pool.entry(&id_of(0));
    let f = fs::OpenOptions::new().read(true).write(true).open(&p0).unwrap();
    f.write_all_at(&[0xAA, 0xBB], 100).unwrap();
    drop(f);
    let a3 = e.archive("j2", "scheduled.0");
    let st3 = chunk(&e, &s, &src, &a3, "disk", None);
    assert_eq!((st3.repaired_chunks, st3.new_chunks), (1, 1), "{st3:?}");
    assert!(verify_archive(&a3, None).unwrap().is_ok());
    // Truncation is caught even on the trusted (same index) path.
    let p4 = e.pool.entry(&id_of(4));
    let len = fs::metadata(&p4).unwrap().len();
    fs::OpenOptions::new().write(true).open(&p4).unwrap().set_len(len - 10).unwrap();
    let a4 = e.archive("j2", "scheduled.next");
    let m3 = read_manifest(&st3.manifest_path).unwrap();
    let st4 = chunk(&e, &s, &src, &a4, "disk", Some(&m3));
    assert_eq!((st4.repaired_chunks, st4.new_chunks), (1, 1), "{st4:?}");
    assert!(verify_archive(&a4, None).unwrap().is_ok());
    assert!(rebuild(&e, &a4, "disk") == data);
}

#[test]
fn garbage_manifests_are_errors() {
    let e = env();
    let a = e.archive("j", "scheduled.0");
    let s = settings(256 * K);
    let st = chunk(&e, &s, &e.put("f", &rnd_bytes(1, 700_000)), &a, "f", None);
    let good = fs::read(&st.manifest_path).unwrap();
    let out = e.out("o");
    for (i, bad) in [
        good[..good.len() / 2].to_vec(),
        good[..good.len() - 1].to_vec(),
        Vec::new(),
        rnd_bytes(3, 5000),
        vec![b'\n'; 10_000],
    ]
    .iter()
    .enumerate()
    {
        // Damaged manifests of the archive: files its index lists (only those are manifests).
        let mp = a.join(format!("bad{i}.affa-manifest"));
        fs::write(&mp, bad).unwrap();
        super::index::record(&a, Path::new(&format!("bad{i}"))).unwrap();
        assert!(read_manifest(&mp).is_err());
        assert!(unchunk_file(&a, &mp, &out, None).is_err());
        assert!(!out.exists());
        assert!(ChunkReader::open(&a, &mp).is_err());
    }
    let rep = verify_archive(&a, None).unwrap();
    assert_eq!(rep.bad_manifests.len(), 5);
    assert!(rep.problems.is_empty());
    assert_eq!(archive_usage(&a).unwrap().files, 1);
}

#[test]
fn hard_link_limit_starts_a_fresh_pool_copy() {
    let mut e = env();
    e.pool.link_limit = Some(3); // pool + 2 archives
    let s = settings(256 * K);
    let data = rnd_bytes(11, 300_000); // 2 chunks
    let src = e.put("f", &data);
    let archives: Vec<PathBuf> = (0..4).map(|i| e.archive("j", &format!("daily.{i}"))).collect();
    let mut new = Vec::new();
    for a in &archives {
        new.push(chunk(&e, &s, &src, a, "f", None).new_chunks);
    }
    assert_eq!(new, vec![2, 0, 2, 0]);
    for a in &archives {
        assert!(rebuild(&e, a, "f") == data);
    }
    assert_eq!(sweep(&e.pool).unwrap().removed_chunks, 0);
    for a in &archives[2..] {
        fs::remove_dir_all(a).unwrap();
    }
    let st = sweep(&e.pool).unwrap();
    assert_eq!(st.removed_chunks, 2);
    for a in &archives[..2] {
        assert!(rebuild(&e, a, "f") == data);
    }
}

#[test]
fn progress_is_reported_and_bad_inputs_refused() {
    let e = env();
    let s = settings(256 * K);
    let data = rnd_bytes(2, 1_000_000);
    let src = e.put("f", &data);
    let a = e.archive("j", "scheduled.0");
    let seen = std::cell::RefCell::new(Vec::new());
    let cb = |n: u64| seen.borrow_mut().push(n);
    chunk_file(&e.pool, &s, &src, &a, Path::new("f"), None, Some(&cb)).unwrap();
    let v = seen.borrow().clone();
    assert!(v.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*v.last().unwrap(), 1_000_000);
    seen.borrow_mut().clear();
    unchunk_file(&a, &manifest_path(&a, Path::new("f")), &e.out("f"), Some(&cb)).unwrap();
    assert_eq!(*seen.borrow().last().unwrap(), 1_000_000);
    for rel in ["../x", "/abs", "", "a/../../b"] {
        assert!(chunk_file(&e.pool, &s, &src, &a, Path::new(rel), None, None).is_err(), "{rel}");
    }
    assert!(chunk_file(&e.pool, &s, &e.t.path().join("nope"), &a, Path::new("n"), None, None).is_err());
    let mut bad = s.clone();
    bad.chunk_size = 1000;
    assert!(chunk_file(&e.pool, &bad, &src, &a, Path::new("g"), None, None).is_err());
}

/// Child half of `sigkill_leaves_no_bad_manifest`: runs only when the parent sets the env var.
#[test]
#[ignore]
fn crash_child() {
    let Ok(dir) = std::env::var("AFFA_CHUNK_CRASH_DIR") else { return };
    let dir = PathBuf::from(dir);
    let pool = Pool::open(&dir.join("root")).unwrap();
    let mut s = settings(256 * K);
    s.compression = Compression::Zstd(19);
    s.threads = 1;
    chunk_file(&pool, &s, &dir.join("src"), &dir.join("root/j/scheduled.running"), Path::new("vm/disk"), None, None)
        .unwrap();
}

#[test]
fn sigkill_leaves_no_bad_manifest() {
    let e = env();
    let cs = 256 * 1024;
    // Compressible but not trivially: zstd -19 makes the child slow enough to kill mid-way.
    let mut data = Vec::new();
    for i in 0..48u64 {
        let mut c = rnd_bytes(i, cs / 2);
        c.extend(std::iter::repeat_n((i * 7) as u8, cs / 2));
        data.extend(c);
    }
    fs::write(e.t.path().join("src"), &data).unwrap();
    let name = format!("{}::crash_child", module_path!().split_once("::").unwrap().1);
    let arch = e.root.join("j/scheduled.running");
    let mp = manifest_path(&arch, Path::new("vm/disk"));
    let mut killed_midway = 0;
    for round in 0..6u64 {
        let target = [1usize, 5, 20, 40, 47, usize::MAX][round as usize];
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--ignored", "--test-threads=1"])
            .env("AFFA_CHUNK_CRASH_DIR", e.t.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let links = || -> usize {
            fs::read_dir(arch.join(ARCHIVE_CHUNK_DIR))
                .map(|rd| rd.flatten().map(|d| fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0)).sum())
                .unwrap_or(0)
        };
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if target != usize::MAX && links() >= target {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                if !mp.exists() {
                    killed_midway += 1;
                }
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Invariant: no manifest, or a manifest whose chunks are all present and good.
        if mp.exists() {
            let rep = verify_archive(&arch, None).unwrap();
            assert!(rep.is_ok(), "round {round}: {rep:?}");
            assert!(rebuild(&e, &arch, "vm/disk") == data);
        }
        if round < 5 && arch.exists() {
            fs::remove_dir_all(&arch).unwrap(); // the next round starts a fresh archive
        }
    }
    assert!(mp.exists(), "the last, uninterrupted run must finish");
    assert!(killed_midway >= 3, "only {killed_midway} kills landed mid-way");
    // Leftover temp files of killed runs are young, so sweep keeps them; everything verifies.
    let st = sweep(&e.pool).unwrap();
    assert_eq!(st.kept_chunks, 48);
}

#[test]
fn only_recorded_manifests_count_and_nothing_goes_through_a_symlink() {
    let e = env();
    let s = settings(256 * K);
    let a = e.archive("j", "scheduled.0");
    let data = rnd_bytes(21, 300_000);
    chunk(&e, &s, &e.put("f", &data), &a, "d/f", None);
    // What a source holding affa archives brings: a file named like a manifest, a directory
    // named like the chunk links. They are data, not store internals.
    fs::write(a.join("d/x.affa-manifest"), b"not a manifest").unwrap();
    fs::create_dir_all(a.join("d/.affa-chunks/ab")).unwrap();
    fs::write(a.join("d/.affa-chunks/ab/cd"), b"not a chunk").unwrap();
    assert_eq!(list_manifests(&a).unwrap(), vec![a.join("d/f.affa-manifest")]);
    assert_eq!(chunked_files(&a).unwrap(), vec![PathBuf::from("d/f")]);
    assert!(verify_archive(&a, None).unwrap().is_ok());
    assert!(recorded_manifest(&a, Path::new("d/x")).is_none());
    // A symlinked directory of the archive is never written through; a symlinked or special
    // source file is never read.
    let outside = e.t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, a.join("link")).unwrap();
    let err = chunk_file(&e.pool, &s, &e.put("g", &data), &a, Path::new("link/g"), None, None).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    let secret = e.put("secret", b"top secret");
    let sl = e.t.path().join("staging/sl");
    std::os::unix::fs::symlink(&secret, &sl).unwrap();
    let err = chunk_file(&e.pool, &s, &sl, &a, Path::new("sl"), None, None).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert!(!manifest_path(&a, Path::new("sl")).exists());
    // A planted temp name beside the manifest is not written through either.
    let victim = e.put("victim", b"keep");
    std::os::unix::fs::symlink(&victim, a.join(format!(".h.affa-manifest.tmp-{}", std::process::id()))).unwrap();
    chunk(&e, &s, &e.put("h", &data), &a, "h", None);
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(verify_archive(&a, None).unwrap().is_ok());
}

/// The pool scrub: `days` consecutive daily slices read every entry exactly once; a bit flip is
/// found, the entry taken out of the pool (the archive keeps its damaged link), and the next
/// backup with the previous manifest (which trusts same-index chunks after a cheap check)
/// stores that chunk afresh.
#[test]
fn the_pool_scrub_reads_every_entry_once_per_cycle_and_evicts_damage() {
    let e = env();
    let s = settings(256 * K);
    let cs = 256 * 1024;
    let data = rnd_bytes(31, 40 * cs);
    let a = e.archive("j", "daily.1");
    let src = e.put("disk", &data);
    let st = chunk(&e, &s, &src, &a, "vm/disk", None);
    let m = read_manifest(&st.manifest_path).unwrap();
    let entries = pool_entries(&e.pool).len() as u64;
    assert_eq!(entries, 40);
    // One cycle of 7 days (day numbers 20000..20007): every entry once.
    let mut checked = 0;
    for day in 20000..20007 {
        let r = scrub(&e.pool, Slice::Day { day, days: 7 }, None).unwrap();
        assert_eq!(r.checked + r.skipped, entries, "{r:?}");
        assert!(r.damaged.is_empty());
        checked += r.checked;
    }
    assert_eq!(checked, entries);
    let all = scrub(&e.pool, Slice::All, None).unwrap();
    assert_eq!((all.checked, all.skipped), (entries, 0));
    assert_eq!(all.bytes_read, pool_entries(&e.pool).iter().map(|(_, n)| n).sum::<u64>());

    // A bit flip in the payload (the header and the length stay right: the cheap check passes).
    let id = match m.chunks[9] {
        ChunkRef::Stored(id) => id,
        ChunkRef::Zero => unreachable!(),
    };
    let p = e.pool.entry(&id);
    let ino = fs::metadata(&p).unwrap().ino();
    let f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 4000).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], 4000).unwrap();
    drop(f);
    let r = scrub(&e.pool, Slice::All, None).unwrap();
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    assert_eq!((r.damaged[0].id, r.damaged[0].ino, r.damaged[0].removed), (id, ino, true));
    assert!(!p.exists(), "the damaged entry is still in the pool");
    let link = a.join(ARCHIVE_CHUNK_DIR).join(&id_hex(&id)[..2]).join(id_hex(&id));
    assert_eq!(fs::metadata(&link).unwrap().ino(), ino, "the archive's link was touched");
    // The next backup, trusting the previous manifest, stores chunk 9 again.
    let a2 = e.archive("j", "daily.0");
    let st2 = chunk(&e, &s, &src, &a2, "vm/disk", Some(&m));
    assert_eq!(st2.new_chunks, 1, "{st2:?}");
    assert!(verify_archive(&a2, None).unwrap().is_ok());
    assert!(rebuild(&e, &a2, "vm/disk") == data);
    assert!(scrub(&e.pool, Slice::All, None).unwrap().damaged.is_empty());
}

/// A chunk source other than the archive: its chunks are checked as the archive's are, and a
/// missing or damaged one is named with the place the source gives; nothing is left at `dest`.
#[test]
fn another_chunk_source_is_read_checked_and_named() {
    struct Copy {
        dir: PathBuf,
        bent: std::sync::Mutex<Option<ChunkId>>,
    }
    impl ChunkSource for Copy {
        fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
            let p = self.dir.join(id_hex(id));
            *raw = fs::read(p).map_err(|_| ProblemKind::Missing)?;
            if *self.bent.lock().unwrap() == Some(*id) {
                let n = raw.len() - 1;
                raw[n] ^= 1;
            }
            Ok(())
        }
        fn place(&self, id: &ChunkId) -> Option<String> {
            Some(format!("object X{}", &id_hex(id)[..8]))
        }
    }
    let e = env();
    let s = settings(256 * K);
    let src = e.t.path().join("disk.img");
    let data = rnd_bytes(5, 3 * 256 * K as usize + 100);
    fs::write(&src, &data).unwrap();
    let arch = e.root.join("job/daily.0");
    chunk(&e, &s, &src, &arch, "disk.img", None);
    // The copy: the archive's chunk files, one file per id, outside the archive.
    let copy = Copy { dir: e.t.path().join("copy"), bent: std::sync::Mutex::new(None) };
    fs::create_dir_all(&copy.dir).unwrap();
    let mpath = manifest_path(&arch, Path::new("disk.img"));
    let m = read_manifest(&mpath).unwrap();
    let ids: Vec<ChunkId> =
        m.chunks.iter().filter_map(|c| if let ChunkRef::Stored(id) = c { Some(*id) } else { None }).collect();
    for id in &ids {
        fs::copy(pool::archive_entry(&arch, id), copy.dir.join(id_hex(id))).unwrap();
    }
    fs::remove_dir_all(arch.join(ARCHIVE_CHUNK_DIR)).unwrap();
    let dest = e.t.path().join("out.img");
    unchunk_file_from(&copy, &mpath, &dest, None).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    let mut v = Vec::new();
    stream_file_from(&copy, &m, &mpath, &mut v, None).unwrap();
    assert_eq!(v, data);

    fs::remove_file(&dest).unwrap();
    *copy.bent.lock().unwrap() = Some(ids[1]);
    let err = unchunk_file_from(&copy, &mpath, &dest, None).unwrap_err().to_string();
    assert!(
        err.contains(&id_hex(&ids[1])) && err.contains(&format!("damaged: object X{}", &id_hex(&ids[1])[..8])),
        "{err}"
    );
    assert!(!dest.exists());
    *copy.bent.lock().unwrap() = None;
    fs::remove_file(copy.dir.join(id_hex(&ids[2]))).unwrap();
    let err = stream_file_from(&copy, &m, &mpath, &mut std::io::sink(), None).unwrap_err().to_string();
    assert!(err.contains(&format!("is missing (object X{} does not exist)", &id_hex(&ids[2])[..8])), "{err}");
}

/// A source that says how many reads may run at once ([`ChunkSource::parallel`]) gets that many
/// in flight, never more, in manifest order; the file comes out whole and in order.
#[test]
fn a_source_asking_for_more_readers_gets_them_and_the_file_stays_in_order() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Slow {
        dir: PathBuf,
        readers: Option<usize>,
        now: AtomicUsize,
        most: AtomicUsize,
    }
    impl ChunkSource for Slow {
        fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            let r = fs::read(self.dir.join(id_hex(id))).map_err(|_| ProblemKind::Missing);
            self.now.fetch_sub(1, Ordering::SeqCst);
            *raw = r?;
            Ok(())
        }
        fn parallel(&self) -> Option<usize> {
            self.readers
        }
    }
    let e = env();
    let s = settings(256 * K);
    let src = e.t.path().join("disk.img");
    let data = rnd_bytes(9, 24 * 256 * K as usize + 7);
    fs::write(&src, &data).unwrap();
    let arch = e.root.join("job/daily.0");
    chunk(&e, &s, &src, &arch, "disk.img", None);
    let dir = e.t.path().join("copy");
    fs::create_dir_all(&dir).unwrap();
    let mpath = manifest_path(&arch, Path::new("disk.img"));
    let m = read_manifest(&mpath).unwrap();
    for c in &m.chunks {
        if let ChunkRef::Stored(id) = c {
            fs::copy(pool::archive_entry(&arch, id), dir.join(id_hex(id))).unwrap();
        }
    }
    let default = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    for (readers, want) in [(Some(6), 6), (None, default)] {
        let slow = Slow { dir: dir.clone(), readers, now: AtomicUsize::new(0), most: AtomicUsize::new(0) };
        let mut v = Vec::new();
        stream_file_from(&slow, &m, &mpath, &mut v, None).unwrap();
        assert!(v == data, "{readers:?}: the file differs");
        let most = slow.most.load(Ordering::SeqCst);
        assert!(most <= want && most > want / 2, "{readers:?}: {most} reads in flight at most, expected up to {want}");
    }
}

/// The linker of many chunks into one archive (`pool::Linker`, through open fan-out
/// directories) keeps `link_into`'s rules: it creates a missing fan-out directory (mode 0700),
/// a second link of the same inode is no error, a different file under the name is replaced
/// by the pool's entry, a missing entry is `NotFound`, and a fan-out name that is a symlink
/// is refused, not followed.
#[test]
fn the_linker_links_replaces_and_refuses_like_link_into() {
    let e = env();
    let arch = e.archive("j", "a");
    fs::create_dir_all(arch.join(pool::ARCHIVE_CHUNK_DIR)).unwrap();
    let id = |n: u8| -> ChunkId { *blake3::hash(&[n]).as_bytes() };
    let (a, b) = (id(1), id(2));
    for x in [a, b] {
        e.pool.write_entry(&x, b"not a real chunk file, only linked", &mut Vec::new()).unwrap();
    }
    let ino = |p: PathBuf| fs::symlink_metadata(p).unwrap().ino();
    let dirs = pool::LinkDirs::new(&e.pool, &arch);
    let mut l = pool::Linker::new(&e.pool, &dirs);
    l.link(&a).unwrap();
    l.link(&a).unwrap();
    assert_eq!(ino(pool::archive_entry(&arch, &a)), ino(e.pool.entry(&a)));
    let fan = pool::archive_entry(&arch, &a).parent().unwrap().to_path_buf();
    assert_eq!(fs::metadata(&fan).unwrap().permissions().mode() & 0o777, 0o700);
    // Another file under b's name in the archive: replaced by the pool's inode.
    let bl = pool::archive_entry(&arch, &b);
    fs::create_dir_all(bl.parent().unwrap()).unwrap();
    fs::write(&bl, "stale").unwrap();
    l.link(&b).unwrap();
    assert_eq!(ino(bl.clone()), ino(e.pool.entry(&b)));
    let mut touched = l.touched();
    touched.sort();
    // The fan-out directories that got names, and, because the linker created a's, the
    // directory holding that new directory's name (and the archive root, for `.affa-chunks`).
    let mut want =
        vec![fan.clone(), bl.parent().unwrap().to_path_buf(), arch.join(pool::ARCHIVE_CHUNK_DIR), arch.clone()];
    want.sort();
    want.dedup();
    assert_eq!(touched, want);
    // Fan-out directories that all existed: only they are touched.
    let dirs_again = pool::LinkDirs::new(&e.pool, &arch);
    let mut again = pool::Linker::new(&e.pool, &dirs_again);
    again.link(&a).unwrap();
    assert_eq!(again.touched(), vec![fan.clone()]);
    // No entry: NotFound (the caller reads the chunk again).
    let c = id(3);
    assert_eq!(l.link(&c).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    // An entry removed from a pool fan-out directory already open (a sweep): NotFound too.
    let arch2 = e.archive("j", "b");
    fs::create_dir_all(arch2.join(pool::ARCHIVE_CHUNK_DIR)).unwrap();
    let dirs2 = pool::LinkDirs::new(&e.pool, &arch2);
    dirs2.pool.stat(&a).unwrap();
    fs::remove_file(e.pool.entry(&a)).unwrap();
    let mut l2 = pool::Linker::new(&e.pool, &dirs2);
    assert_eq!(l2.link(&a).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    assert!(!pool::archive_entry(&arch2, &a).exists());
    // A fan-out name in the archive that is a symlink (to a directory elsewhere): refused.
    let arch3 = e.archive("j", "c");
    let elsewhere = e.t.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::create_dir_all(arch3.join(pool::ARCHIVE_CHUNK_DIR)).unwrap();
    let hex = id_hex(&b);
    std::os::unix::fs::symlink(&elsewhere, arch3.join(pool::ARCHIVE_CHUNK_DIR).join(&hex[..2])).unwrap();
    let dirs3 = pool::LinkDirs::new(&e.pool, &arch3);
    let mut l3 = pool::Linker::new(&e.pool, &dirs3);
    assert!(l3.link(&b).is_err());
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "a link was made through the symlink");
}

/// A new fan-out directory's name is made durable with its entries: the directory that holds
/// it is among the directories fsynced before a manifest names the entry (pool and archive).
#[test]
fn a_new_fan_out_directory_is_fsynced_through_its_parent() {
    let e = env();
    let id = |n: u8| -> ChunkId { *blake3::hash(&[n]).as_bytes() };
    let (a, b) = (id(1), id(2));
    let pool_fan = |x: &ChunkId| e.pool.entry(x).parent().unwrap().to_path_buf();
    let mut touched = Vec::new();
    e.pool.write_entry(&a, b"only linked", &mut touched).unwrap();
    assert_eq!(touched, vec![e.pool.dir().to_path_buf(), pool_fan(&a)], "a new pool fan-out directory");
    touched.clear();
    e.pool.write_entry(&a, b"only linked", &mut touched).unwrap();
    assert_eq!(touched, vec![pool_fan(&a)], "an existing pool fan-out directory");
    e.pool.write_entry(&b, b"only linked", &mut Vec::new()).unwrap();

    let arch = e.archive("j", "a");
    let chunks = arch.join(pool::ARCHIVE_CHUNK_DIR);
    let arch_fan = |x: &ChunkId| pool::archive_entry(&arch, x).parent().unwrap().to_path_buf();
    let mut touched = Vec::new();
    e.pool.link_into(&a, &arch, &mut touched).unwrap();
    touched.sort();
    let mut want = vec![arch.clone(), chunks.clone(), arch_fan(&a)];
    want.sort();
    assert_eq!(touched, want, "link_into creating .affa-chunks and a fan-out directory");
    touched.clear();
    e.pool.link_into(&a, &arch, &mut touched).unwrap();
    assert_eq!(touched, vec![arch_fan(&a)], "link_into into an existing fan-out directory");
    if arch_fan(&a) != arch_fan(&b) {
        touched.clear();
        e.pool.link_into(&b, &arch, &mut touched).unwrap();
        touched.sort();
        let mut want = vec![arch.clone(), chunks.clone(), arch_fan(&b)];
        want.sort();
        assert_eq!(touched, want, "link_into creating a second fan-out directory");
    }
}
