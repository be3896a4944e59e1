//! `affa --mount` / `--umount` over the real kernel FUSE driver: a chunked job backed up over the
//! shared sshd, mounted, read back byte for byte; internals hidden, writes refused, a rotation
//! while a file is open, unmount and SIGTERM, a damaged chunk, and the single-file-out-of-a-VM-
//! disk recipe of docs/RESTORE.md (loop device, partition, ext4). Skipped, saying why, where
//! /dev/fuse is missing or the tests do not run as root.

use crate::common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MB: u64 = 1 << 20;

fn unavailable() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse is missing (no FUSE on this machine)");
        return true;
    }
    if !is_root() {
        eprintln!("skipped: FUSE mounts need root here");
        return true;
    }
    false
}

/// Mixed disk-like bytes: zeros, random, text, 1 MiB aligned.
fn image(path: &Path, size: u64, seed: u64) {
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; MB as usize];
    for i in 0..size / MB {
        match next() % 3 {
            0 => continue,
            1 => buf.iter_mut().for_each(|b| *b = next() as u8),
            _ => buf.iter_mut().enumerate().for_each(|(k, b)| *b = b"affa mount test line\n"[k % 21]),
        }
        f.seek(SeekFrom::Start(i * MB)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

fn mounted(dir: &Path) -> bool {
    let t = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_str().unwrap().replace(' ', "\\040");
    t.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains(" - fuse affa:"))
}

/// The pid of the `affa --mount ... DIR --foreground` process serving `dir`.
fn server_pid(dir: &Path) -> Option<u32> {
    let want = dir.as_os_str().to_str().unwrap();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(c) = fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        if args.contains(&&b"--mount"[..]) && args.contains(&want.as_bytes()) && args.contains(&&b"--foreground"[..]) {
            return Some(pid);
        }
    }
    None
}

/// A mount that is undone (lazily) when the test ends, whatever happens.
struct Mnt(PathBuf);

impl Drop for Mnt {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

struct Setup {
    sshd: Sshd,
    affa: Affa,
    src: tempfile::TempDir,
    /// The source tree's path inside an archive.
    rel: PathBuf,
}

fn setup(extra: &str) -> Setup {
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    let d = src.path();
    fs::create_dir_all(d.join("images")).unwrap();
    fs::create_dir_all(d.join("etc/deep")).unwrap();
    fs::write(d.join("notes.txt"), "hello\n").unwrap();
    fs::write(d.join("etc/deep/conf"), "a=1\n").unwrap();
    fs::set_permissions(d.join("etc/deep/conf"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
    image(&d.join("images/disk.img"), 24 * MB, 7);
    fs::set_permissions(d.join("images/disk.img"), fs::Permissions::from_mode(0o600)).unwrap();
    // Sparse: 8 MiB with one written MiB in the middle.
    let f = fs::File::create(d.join("images/sparse.img")).unwrap();
    f.set_len(8 * MB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; MB as usize], 3 * MB).unwrap();
    affa.write_conf(
        "vm.conf",
        &affa.ssh_job(
            "vm",
            &sshd,
            &format!(
                "Include={}\nchunkFiles=*.img\nchunkSize=1M\nscheduledKeep=2\ndailyKeep=0\nweeklyKeep=0\nmonthlyKeep=0\nyearlyKeep=0\nremoteAgentPath={}\n{extra}",
                d.display(),
                // The agent (the default chunkTransport) inside the test's temp dir, never in
                // the home of the user the tests run as.
                affa.tmp.path().join("remote/.affa/affa-agent").display()
            ),
        ),
    );
    ok(&affa.send_key(&mut sshd, "vm"));
    let rel = d.strip_prefix("/").unwrap().to_path_buf();
    Setup { sshd, affa, src, rel }
}

/// `affa --mount ARGS... DIR` (detached); the mount is there when it returns.
fn mount(s: &Setup, args: &[&str], name: &str) -> Mnt {
    let dir = s.affa.tmp.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    let mut a = vec!["--mount"];
    a.extend_from_slice(args);
    a.push(dir.to_str().unwrap());
    ok(&s.affa.affa(&a));
    assert!(mounted(&dir), "affa --mount returned before {} was mounted", dir.display());
    Mnt(dir)
}

fn hash(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

fn erofs(r: std::io::Result<impl Sized>, what: &str) {
    match r {
        Ok(_) => panic!("{what} succeeded on the read-only mount"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
    }
}

#[test]
fn a_mounted_job_shows_every_archive_and_every_file_as_it_was() {
    if unavailable() {
        return;
    }
    let s = setup("");
    let img = s.src.path().join("images/disk.img");
    let v1 = hash(&img);
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let mut f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(5 * MB)).unwrap();
    f.write_all(&vec![0xa5; MB as usize]).unwrap();
    drop(f);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "vm"]));
    // Errors of the detached mount come back as one line, and nothing is mounted.
    let dir = s.affa.tmp.path().join("mnt");
    fs::create_dir_all(&dir).unwrap();
    let e = fail(&s.affa.affa(&["--mount", "vm", "daily.9", dir.to_str().unwrap()]));
    assert!(e.trim_end().lines().count() == 1 && e.contains("job vm has no archive 'daily.9'"), "{e}");
    let e = fail(&s.affa.affa(&["--mount", "vm", s.affa.tmp.path().join("nodir").to_str().unwrap()]));
    assert!(e.contains("nodir"), "{e}");
    assert!(!mounted(&dir));
    let m = mount(&s, &["vm"], "mnt");
    // The archives, by their exact names, and nothing else of the job directory.
    let mut names: Vec<String> =
        fs::read_dir(&m.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["scheduled.0", "scheduled.1"]);
    // Every file of the newest archive is the source's, by hash (chunked ones included), and
    // the symlink is shown as a symlink with its target.
    let tree = m.0.join("scheduled.0").join(&s.rel);
    assert_eq!(tree_hashes(&tree), tree_hashes(s.src.path()));
    assert_eq!(hash(&m.0.join("scheduled.1").join(&s.rel).join("images/disk.img")), v1);
    assert_ne!(v1, hash(&img));
    assert_eq!(fs::read_link(tree.join("link")).unwrap(), Path::new("/etc/passwd"));
    // Sizes, modes and times of the chunked files are the source's.
    for f in ["images/disk.img", "images/sparse.img", "etc/deep/conf"] {
        let (a, b) = (fs::metadata(tree.join(f)).unwrap(), fs::metadata(s.src.path().join(f)).unwrap());
        assert_eq!((a.len(), a.mode() & 0o7777, a.mtime()), (b.len(), b.mode() & 0o7777, b.mtime()), "{f}");
    }
    let sparse = fs::read(tree.join("images/sparse.img")).unwrap();
    assert!(sparse[..3 * MB as usize].iter().all(|b| *b == 0) && sparse[4 * MB as usize..].iter().all(|b| *b == 0));
    assert!(sparse[3 * MB as usize..4 * MB as usize].iter().all(|b| *b == 0x5a));
    // Store internals are not visible anywhere.
    let root: Vec<String> =
        fs::read_dir(m.0.join("scheduled.0")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    for hidden in [".AFFA3-REPORT", ".affa-chunks", ".affa-manifests", ".vm-setup.ini"] {
        assert!(!root.iter().any(|n| n == hidden), "{hidden} is visible: {root:?}");
        assert!(fs::symlink_metadata(m.0.join("scheduled.0").join(hidden)).is_err(), "{hidden} can be looked up");
    }
    assert!(fs::symlink_metadata(tree.join("images/disk.img.affa-manifest")).is_err());
    assert!(tree_hashes(&m.0).keys().all(|k| !k.contains(".affa-manifest") && !k.contains(".affa-chunks")));
    // Read-only: writes, creates, unlinks, renames, chmod fail with EROFS.
    erofs(fs::OpenOptions::new().write(true).open(tree.join("notes.txt")), "open for writing");
    erofs(fs::OpenOptions::new().write(true).open(tree.join("images/disk.img")), "open a chunked file for writing");
    erofs(fs::write(tree.join("new"), "x"), "create");
    erofs(fs::remove_file(tree.join("notes.txt")), "unlink");
    erofs(fs::create_dir(tree.join("d")), "mkdir");
    erofs(fs::rename(tree.join("notes.txt"), tree.join("n2")), "rename");
    erofs(fs::set_permissions(tree.join("notes.txt"), fs::Permissions::from_mode(0o777)), "chmod");
    // --umount ends it: the mount point is gone from the mount table and the server exits.
    let pid = server_pid(&m.0).expect("the mount's server process");
    let out = ok(&s.affa.affa(&["--umount", m.0.to_str().unwrap()]));
    assert!(out.contains("unmounted"), "{out}");
    assert!(!mounted(&m.0));
    wait_until(Duration::from_secs(10), "the mount's server to exit", || !alive(pid));
    // --umount refuses what is not an affa mount.
    let e = fail(&s.affa.affa(&["--umount", m.0.to_str().unwrap()]));
    assert!(e.contains("is not an affa mount"), "{e}");
    drop(s.sshd);
}

#[test]
fn an_open_file_reads_the_same_bytes_while_a_rotation_deletes_its_archive() {
    if unavailable() {
        return;
    }
    let s = setup("");
    let img = s.src.path().join("images/disk.img");
    let v1 = fs::read(&img).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let scribble = |seed: u8| {
        let mut f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
        let data: Vec<u8> = (0..16 * MB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        f.write_all(&data).unwrap();
    };
    scribble(1);
    ok(&s.affa.affa_at("2026-06-01T21:00:00", &["--run", "vm"]));
    let m = mount(&s, &["vm"], "mnt");
    let p = m.0.join("scheduled.1").join(&s.rel).join("images/disk.img");
    let mut open = fs::File::open(&p).unwrap();
    let mut got = vec![0u8; 2 * MB as usize];
    open.read_exact(&mut got).unwrap();
    // A third run: scheduled.1 (the open file's archive) is rotated out and deleted, the
    // chunks only it used are swept from the pool.
    let ids = |a: &str| -> std::collections::BTreeSet<String> {
        let mp = s.affa.job_dir("vm").join(a).join(&s.rel).join("images/disk.img.affa-manifest");
        let m = affa::chunk::read_manifest(&mp).unwrap();
        m.chunks
            .iter()
            .filter_map(
                |c| if let affa::chunk::ChunkRef::Stored(id) = c { Some(affa::chunk::id_hex(id)) } else { None },
            )
            .collect()
    };
    let only_old: Vec<String> = ids("scheduled.1").difference(&ids("scheduled.0")).cloned().collect();
    assert!(!only_old.is_empty());
    scribble(2);
    ok(&s.affa.affa_at("2026-06-01T22:00:00", &["--run", "vm"]));
    assert_eq!(archive_names(&s.affa.job_dir("vm")), ["scheduled.0", "scheduled.1"]);
    for id in &only_old {
        let p = s.affa.root.join(".affa-pool").join(&id[..2]).join(id);
        assert!(!p.exists(), "chunk {id} of the deleted archive is still in the pool");
    }
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    got.extend(rest);
    assert!(got == v1, "the open file read other bytes after the rotation");
    // The mount follows the rotation: scheduled.1 is now the second run's archive.
    wait_until(Duration::from_secs(10), "the mount to show the rotated archives", || {
        let mut n: Vec<String> =
            fs::read_dir(&m.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        n.sort();
        n == ["scheduled.0", "scheduled.1"]
            && fs::read(m.0.join("scheduled.0").join(&s.rel).join("images/disk.img")).ok() == fs::read(&img).ok()
    });
    // SIGTERM with a reader still open: the mount leaves the mount table at once, the reader
    // reads on to the end, and the server exits when it closes.
    let pid = server_pid(&m.0).expect("the mount's server process");
    let mut reader = fs::File::open(m.0.join("scheduled.0").join(&s.rel).join("notes.txt")).unwrap();
    signal(pid, rustix::process::Signal::TERM);
    wait_until(Duration::from_secs(10), "SIGTERM to unmount", || !mounted(&m.0));
    let mut t = String::new();
    reader.read_to_string(&mut t).unwrap();
    assert_eq!(t, "hello\n");
    drop(reader);
    drop(open);
    wait_until(Duration::from_secs(10), "the mount's server to exit after SIGTERM", || !alive(pid));
    drop(s.sshd);
}

#[test]
fn a_damaged_chunk_is_eio_and_a_log_line_never_other_bytes() {
    if unavailable() {
        return;
    }
    let s = setup("");
    let img = s.src.path().join("images/disk.img");
    let want = fs::read(&img).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let arch = s.affa.job_dir("vm").join("scheduled.0");
    let man = affa::chunk::read_manifest(&arch.join(&s.rel).join("images/disk.img.affa-manifest")).unwrap();
    let (bad, id) = man
        .chunks
        .iter()
        .enumerate()
        .find_map(|(i, c)| if let affa::chunk::ChunkRef::Stored(id) = c { Some((i, *id)) } else { None })
        .unwrap();
    let hex = affa::chunk::id_hex(&id);
    let cf = arch.join(".affa-chunks").join(&hex[..2]).join(&hex);
    let mut data = fs::read(&cf).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0x01;
    fs::write(&cf, &data).unwrap();
    let m = mount(&s, &["vm", "scheduled.0"], "mnt");
    let p = m.0.join(&s.rel).join("images/disk.img");
    let f = fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, bad as u64 * MB + 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Every other chunk reads right.
    for i in (0..24u64).filter(|i| *i != bad as u64) {
        let mut b = vec![0u8; MB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, i * MB).unwrap();
        assert!(b[..] == want[(i * MB) as usize..((i + 1) * MB) as usize], "chunk {i} differs");
    }
    let log = fs::read_to_string(s.affa.state.join("log/vm.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains(&hex) && l.contains("images/disk.img") && l.contains("damaged")),
        "no log line names the chunk and the file:\n{log}"
    );
    ok(&s.affa.affa(&["--umount", m.0.to_str().unwrap()]));
    drop(s.sshd);
}

/// Holes are holes: the zero chunks of a sparse disk read as zeros with no chunk behind them
/// (the only stored chunk is damaged, and only its range fails).
#[test]
fn the_holes_of_a_sparse_disk_read_as_zeros_without_any_chunk() {
    if unavailable() {
        return;
    }
    let s = setup("");
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let arch = s.affa.job_dir("vm").join("scheduled.0");
    let man = affa::chunk::read_manifest(&arch.join(&s.rel).join("images/sparse.img.affa-manifest")).unwrap();
    assert_eq!(man.chunks.len(), 8);
    let stored: Vec<(usize, [u8; 32])> = man
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| if let affa::chunk::ChunkRef::Stored(id) = c { Some((i, *id)) } else { None })
        .collect();
    assert_eq!(stored.len(), 1, "only the written MiB is stored: {:?}", man.chunks);
    let (data_index, id) = stored[0];
    assert_eq!(data_index, 3);
    // Damage the one chunk (its archive link and the pool entry are the same inode).
    let hex = affa::chunk::id_hex(&id);
    let cf = arch.join(".affa-chunks").join(&hex[..2]).join(&hex);
    let mut data = fs::read(&cf).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0x01;
    fs::write(&cf, &data).unwrap();
    let m = mount(&s, &["vm", "scheduled.0"], "mnt");
    let f = fs::File::open(m.0.join(&s.rel).join("images/sparse.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8 * MB);
    for i in 0..8u64 {
        let mut b = vec![0xffu8; MB as usize];
        let r = std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, i * MB);
        if i == 3 {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO), "the damaged chunk");
        } else {
            r.unwrap_or_else(|e| panic!("hole at MiB {i} not readable: {e}"));
            assert!(b.iter().all(|&x| x == 0), "hole at MiB {i} is not zeros");
        }
    }
    drop(f);
    ok(&s.affa.affa(&["--umount", m.0.to_str().unwrap()]));
    drop(s.sshd);
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_single_file_comes_out_of_a_vm_disk_by_the_restore_recipe() {
    if unavailable() {
        return;
    }
    for tool in ["sfdisk", "mkfs.ext4", "losetup", "partx"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            panic!("{tool} is missing: scripts/test.sh installs fdisk, e2fsprogs and util-linux");
        }
    }
    let s = setup("");
    // A VM disk: a partition table and one ext4 partition holding known files.
    let files = s.affa.tmp.path().join("fsroot");
    fs::create_dir_all(files.join("home/alice")).unwrap();
    let secret: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(files.join("home/alice/report.odt"), &secret).unwrap();
    let part = s.affa.tmp.path().join("part.img");
    fs::File::create(&part).unwrap().set_len(30 * MB).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&files).arg(&part));
    let disk = s.src.path().join("images/vm-flat.img");
    fs::File::create(&disk).unwrap().set_len(32 * MB).unwrap();
    let mut sf = Command::new("sfdisk");
    sf.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(&disk).stdin(std::process::Stdio::piped());
    let mut child = sf.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"label: dos\nstart=2048, size=61440, type=83\n").unwrap();
    assert!(child.wait().unwrap().success());
    let p = fs::read(&part).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&fs::OpenOptions::new().write(true).open(&disk).unwrap(), &p, MB).unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    // The recipe: mount the archive, loop the plain disk the mount shows (read-only), add its
    // partitions, mount the partition read-only, copy the file.
    let m = mount(&s, &["vm", "scheduled.0"], "mnt");
    let shown = m.0.join(&s.rel).join("images/vm-flat.img");
    let dev = run(Command::new("losetup").args(["--find", "--show", "--read-only", "--partscan"]).arg(&shown));
    let dev = dev.trim().to_string();
    struct Loop(String, PathBuf);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.1, rustix::mount::UnmountFlags::DETACH);
            let _ = Command::new("partx").args(["-d", &self.0]).output();
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let fsdir = s.affa.tmp.path().join("fs");
    fs::create_dir_all(&fsdir).unwrap();
    let lp = Loop(dev.clone(), fsdir.clone());
    let p1 = format!("{dev}p1");
    if !Path::new(&p1).exists() {
        // This kernel does not read MBR tables: util-linux adds the partitions itself.
        run(Command::new("partx").args(["-a", &dev]));
    }
    wait_until(Duration::from_secs(10), "the partition device", || Path::new(&p1).exists());
    run(Command::new("mount").args(["-o", "ro,noload", &p1]).arg(&fsdir));
    let out = s.affa.tmp.path().join("report.odt");
    fs::copy(fsdir.join("home/alice/report.odt"), &out).unwrap();
    assert!(fs::read(&out).unwrap() == secret, "the file copied out of the VM disk differs");
    drop(lp);
    ok(&s.affa.affa(&["--umount", m.0.to_str().unwrap()]));
    drop(s.sshd);
}

#[test]
fn the_samba_share_of_a_chunked_job_serves_the_mounted_view() {
    if unavailable() {
        return;
    }
    let smbd = common::smb::start_smbd();
    let s = setup("SambaShare=yes\nSambaValidUser=root\n");
    fs::write(
        s.affa.conf.join("00-global.conf"),
        format!(
            "[GlobalAffaConfig]\nlockDir={st}/lock\nlogDir={st}/log\nsshDir={st}/ssh\nscriptDir={st}/scripts\nRootDir={r}\n\
             cronFile={st}/cron.d/affa\nsambaConfDir={st}/samba\nsmbConf={}\n",
            smbd.dir.path().join("smb.conf").display(),
            st = s.affa.state.display(),
            r = s.affa.root.display()
        ),
    )
    .unwrap();
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let out = ok(&s.affa.affa(&["--samba-shares"]));
    assert!(out.starts_with("Samba shares: vm"), "{out}");
    let mp = s.affa.state.join("lock/samba-mounts/vm");
    let _m = Mnt(mp.clone());
    assert!(mounted(&mp), "--samba-shares did not mount the archives for the share");
    let share = fs::read_to_string(s.affa.state.join("samba/affa-job-vm.conf")).unwrap();
    assert!(share.contains(&format!("\tpath = {}\n", mp.display())), "{share}");
    // A second call keeps the one mount.
    ok(&s.affa.affa(&["--samba-shares"]));
    let t = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(t.lines().filter(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap())).count(), 1);
    // The mount's process killed (an OOM kill): the mount point answers ENOTCONN; the next
    // --samba-shares detaches the dead mount and mounts the archives again.
    let pid = server_pid(&mp).expect("the mount's process");
    signal(pid, rustix::process::Signal::KILL);
    let dead = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        fs::metadata(&mp).err().and_then(|e| e.raw_os_error()) == Some(rustix::io::Errno::NOTCONN.raw_os_error())
    });
    assert!(dead, "the killed mount did not answer ENOTCONN");
    let out = ok(&s.affa.affa(&["--samba-shares"]));
    assert!(out.starts_with("Samba shares: vm"), "{out}");
    assert!(fs::read_dir(&mp).is_ok(), "the share's mount point still does not answer");
    let t = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(t.lines().filter(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap())).count(), 1, "{t}");
    // The chunked disk comes through the share byte-identical; the store does not show.
    let got = s.affa.tmp.path().join("got.img");
    let rel = s.rel.join("images/disk.img");
    let o =
        common::smb::smbclient_until_ok(&smbd, "vm", &format!("get scheduled.0/{} {}", rel.display(), got.display()));
    assert!(
        o.status.success(),
        "smbclient get: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(hash(&got), hash(&s.src.path().join("images/disk.img")));
    let o = common::smb::smbclient(&smbd, "vm", "ls scheduled.0/*");
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !listing.contains(".affa-chunks") && !listing.contains(".AFFA3-REPORT"), "{listing}");
    ok(&s.affa.affa(&["--umount", mp.to_str().unwrap()]));
    drop(s.sshd);
}

/// The mounted view a chunked job's share serves, and what a share user gets of the special
/// files a hostile host backed up: the mount shows device nodes, a fifo and a socket as what
/// they are, but it is `nodev` and `nosuid` (the kernel refuses to open a device node there, even
/// for root, so smbd's open is refused); no symlink leads out of the share.
#[test]
fn the_share_of_a_chunked_job_gives_nothing_of_the_server_through_special_files() {
    if unavailable() {
        return;
    }
    let smbd = common::smb::start_smbd();
    let s = setup("SambaShare=yes\nSambaValidUser=root\n");
    let _mounts = common::smb::ShareMounts(s.affa.state.join("lock/samba-mounts"));
    fs::write(
        s.affa.conf.join("00-global.conf"),
        format!(
            "[GlobalAffaConfig]\nlockDir={st}/lock\nlogDir={st}/log\nsshDir={st}/ssh\nscriptDir={st}/scripts\nRootDir={r}\n\
             cronFile={st}/cron.d/affa\nsambaConfDir={st}/samba\nsmbConf={}\n",
            smbd.dir.path().join("smb.conf").display(),
            st = s.affa.state.display(),
            r = s.affa.root.display()
        ),
    )
    .unwrap();
    let data = s.src.path().join("specials");
    fs::create_dir_all(&data).unwrap();
    let planted = common::smb::plant_specials(&data, &s.affa.tmp.path().join("outside"));
    ok(&s.affa.affa_at("2026-06-01T20:00:00", &["--run", "vm"]));
    let arch = s.affa.job_dir("vm").join("scheduled.0").join(&s.rel).join("specials");
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(arch.join("zero")).unwrap().file_type().is_char_device(), "not backed up");
    let out = ok(&s.affa.affa(&["--samba-shares"]));
    assert!(out.starts_with("Samba shares: vm"), "{out}");
    let mp = s.affa.state.join("lock/samba-mounts/vm");
    let _m = Mnt(mp.clone());
    // The mount shows them as what they are, and refuses to open a device node even for root.
    let shown = mp.join("scheduled.0").join(&s.rel).join("specials");
    let ft = |n: &str| fs::symlink_metadata(shown.join(n)).unwrap().file_type();
    assert!(ft("zero").is_char_device() && ft("fifo").is_fifo() && ft("sock").is_socket());
    for d in &planted.devices {
        let e = fs::File::open(shown.join(d)).expect_err("a device node opened through the mount");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{d}: {e}");
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap())).expect("the share's mount");
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    assert!(["ro", "nodev", "nosuid"].iter().all(|o| opts.contains(o)), "{line}");
    let o = common::smb::smbclient_until_ok(&smbd, "vm", "ls scheduled.0/*");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let watch: Vec<PathBuf> = planted.devices.iter().map(|d| arch.join(d)).collect();
    planted.assert_the_share_gives_nothing_of_the_server(
        &smbd,
        "vm",
        &format!("scheduled.0/{}/specials", s.rel.display()),
        &data,
        &watch,
        &s.affa.tmp.path().join("got"),
    );
    ok(&s.affa.affa(&["--umount", mp.to_str().unwrap()]));
    drop(s.sshd);
}

/// An ESXi job with chunked disks (read on the host by the agent): the mounted `-flat.vmdk`s are
/// the frozen disks byte for byte, also read by two readers at once.
#[test]
fn the_mounted_flat_vmdk_of_an_esxi_job_is_the_frozen_disk() {
    if unavailable() {
        return;
    }
    use common::esx::{sha256_file, Esx};
    let e = Esx::start(24 * MB, &[(0, 4 * MB)], "chunkFiles=*-flat.vmdk\nchunkSize=1M\n", "");
    ok(&e.affa.affa_at("2026-05-04T21:00:00", &["--run", "esx"]));
    let frozen = e.frozen();
    let dir = e.affa.tmp.path().join("esx-mnt");
    fs::create_dir_all(&dir).unwrap();
    ok(&e.affa.affa(&["--mount", "esx", "scheduled.0", dir.to_str().unwrap()]));
    let _m = Mnt(dir.clone());
    let d0 = dir.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk");
    let d1 = dir.join("vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk");
    assert_eq!(fs::metadata(&d0).unwrap().len(), 24 * MB);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let p = d0.clone();
            std::thread::spawn(move || sha256_file(&p))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), frozen[0], "a parallel reader got other bytes");
    }
    assert_eq!(sha256_file(&d1), frozen[1]);
    assert!(!dir.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk.affa-manifest").exists());
    ok(&e.affa.affa(&["--umount", dir.to_str().unwrap()]));
    wait_until(Duration::from_secs(10), "the mount to end", || !mounted(&dir));
}
