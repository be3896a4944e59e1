//! affa-agent over a real ssh connection (a private sshd on 127.0.0.1 with its own keys, started
//! here): the static binary, the handshake, backups into a real pool rebuilt by the store, the
//! faults of a file changing mid-read, corrupt frames and a version mismatch; restores through
//! the agent to new and existing targets, symlinks, a killed agent, a damaged chunk.

use affa_agent_proto::{self as proto, ChunkKind, FaultKind, FrameReader, FrameWriter, Msg};
use affa_store::chunk::remote::{backup_file, backup_file_ranged, chunk_ranges, restore_file, Agent, RestoreOptions};
use affa_store::chunk::{self, ChunkRef, Compression, Manifest, Pool, Settings};
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_affa-agent");

/// The statically linked agent, as scripts/build-agent.sh builds it (scripts/test.sh builds it
/// before the tests).
fn static_agent() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-gnu/release/affa-agent");
    assert!(p.exists(), "{} is missing: run scripts/build-agent.sh first", p.display());
    p
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status().unwrap();
    assert!(st.success());
}

/// A private sshd (modelled on tests/common/mod.rs): never the machine's own sshd or keys.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    child: Child,
}

impl Sshd {
    fn start() -> Sshd {
        let dir = tempfile::Builder::new().prefix("affa-agent-sshd").tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("client"));
        fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
                 LogLevel ERROR\nMaxStartups 100:30:200\n",
                d = d.display()
            ),
        )
        .unwrap();
        let _ = fs::create_dir_all("/run/sshd");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("cannot start /usr/sbin/sshd (install openssh-server)");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "sshd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap().trim().into();
        // The host key is checked as affa checks it: a known_hosts file of this sshd's own key.
        let host_pub = fs::read_to_string(d.join("host_ed25519.pub")).unwrap();
        fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
        Sshd { dir, port, user, child }
    }

    /// `ssh HOST COMMAND...` with piped stdin/stdout/stderr.
    fn spawn(&self, remote: &[&str]) -> Child {
        Command::new("ssh")
            .args(["-p", &self.port.to_string(), "-i"])
            .arg(self.dir.path().join("client"))
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.dir.path().join("known_hosts").display()))
            .arg(format!("{}@127.0.0.1", self.user))
            .args(remote)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn agent(&self, bin: &str) -> (Child, Agent<ChildStdout, ChildStdin>) {
        let mut c = self.spawn(&[bin, "--serve"]);
        let a = Agent::connect(c.stdout.take().unwrap(), c.stdin.take().unwrap(), "127.0.0.1:affa-agent").unwrap();
        (c, a)
    }

    fn raw(&self, bin: &str) -> (Child, FrameReader<ChildStdout>, FrameWriter<ChildStdin>) {
        let mut c = self.spawn(&[bin, "--serve"]);
        let r = FrameReader::new(c.stdout.take().unwrap());
        let w = FrameWriter::new(c.stdin.take().unwrap());
        (c, r, w)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes, half of each 4 KiB block compressible text.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for (i, b) in buf.iter_mut().enumerate() {
        if (i / 2048) % 2 == 0 {
            *b = b"affa agent test text "[i % 21];
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

fn file_hash(p: &Path) -> [u8; 32] {
    *blake3::hash(&fs::read(p).unwrap()).as_bytes()
}

fn wait_stderr(c: Child) -> (i32, String) {
    let out = c.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn static_agent_needs_no_environment() {
    let bin = static_agent();
    let out = Command::new("file").arg("-L").arg(&bin).output().expect("file (install the 'file' package)");
    let desc = String::from_utf8_lossy(&out.stdout);
    assert!(desc.contains("statically linked") || desc.contains("static-pie linked"), "{desc}");
    assert!(!desc.contains("interpreter"), "{desc}");
    let out = Command::new("env").arg("-i").arg(&bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "affa-agent 0.1.0 (protocol 1)");

    // Over ssh, with an empty environment: the handshake reports the binary's own hash.
    let sshd = Sshd::start();
    let b = bin.to_str().unwrap();
    let mut c = sshd.spawn(&["env", "-i", b, "--serve"]);
    let a = Agent::connect(c.stdout.take().unwrap(), c.stdin.take().unwrap(), "127.0.0.1").unwrap();
    assert_eq!(a.software, "affa-agent 0.1.0");
    assert_eq!(a.exe_hash, file_hash(&bin));
    a.bye().unwrap();
    let (code, err) = wait_stderr(c);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn sparse_file_backup_then_incremental_sends_only_changed_chunks() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    const CS: usize = 256 << 10;
    const CHUNKS: usize = 160; // 40 MiB
                               // Data in chunks 0..20, 50, 51 (half), 100..110 and the short last chunk; holes elsewhere;
                               // chunk 60 written with zeros (read, found zero).
    let f = fs::File::create(&src).unwrap();
    let mut buf = vec![0u8; CS];
    let data_chunks: Vec<usize> = (0..20).chain([50, 51]).chain(100..110).collect();
    for &i in &data_chunks {
        fill(&mut buf, i as u64 + 1);
        let n = if i == 51 { CS / 2 } else { CS };
        f.write_all_at(&buf[..n], (i * CS) as u64).unwrap();
    }
    f.write_all_at(&vec![0u8; CS], (60 * CS) as u64).unwrap();
    f.write_all_at(b"tail", (CHUNKS * CS) as u64).unwrap();
    drop(f);
    let size = fs::metadata(&src).unwrap().len();
    assert_eq!(size, (CHUNKS * CS) as u64 + 4);

    let root = t.path().join("root");
    let pool = Pool::open(&root).unwrap();
    let settings = Settings { chunk_size: CS as u32, compression: Compression::Zstd(1), ..Settings::default() };
    let (c, mut agent) = sshd.agent(AGENT);
    let a1 = root.join("job/daily.1");
    let rel = Path::new("vm/disk.img");
    let st = backup_file(&mut agent, &pool, &settings, &src, &a1, rel, None).unwrap();
    // Chunks with data (the tail included), and of them the distinct contents (fill's seeds 2k
    // and 2k+1 give the same bytes): each distinct chunk is sent and stored once.
    let expected_stored = data_chunks.len() as u64 + 1;
    let whole = fs::read(&src).unwrap();
    let distinct: std::collections::HashSet<[u8; 32]> =
        whole.chunks(CS).filter(|c| c.iter().any(|&b| b != 0)).map(|c| *blake3::hash(c).as_bytes()).collect();
    let distinct = distinct.len() as u64;
    assert!(distinct < expected_stored, "the test data repeats chunks");
    assert_eq!(st.chunk.chunks, CHUNKS as u64 + 1);
    assert_eq!(st.chunk.zero_chunks, CHUNKS as u64 + 1 - expected_stored);
    assert_eq!(st.data_frames, distinct);
    assert_eq!(st.chunk.new_chunks, distinct);
    // Holes are not read: only the data chunks and chunk 60 (written zeros).
    assert!(st.source_bytes_read <= (data_chunks.len() as u64 + 2) * CS as u64, "{}", st.source_bytes_read);
    // The text halves compress: the wire carried the compressed chunk files.
    assert!(st.bytes_received < expected_stored * CS as u64 * 3 / 4, "{}", st.bytes_received);
    let out = t.path().join("rebuilt1");
    let m1 = chunk::unchunk_file(&a1, &st.chunk.manifest_path, &out, None).unwrap();
    assert_eq!(file_hash(&out), file_hash(&src));
    assert_eq!(m1.file_hash, Some(file_hash(&src)));

    // Change 1% of the file (2 chunks: one in data, one in a hole), back up again.
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(b"changed!", (5 * CS + 1000) as u64).unwrap();
    f.write_all_at(b"new data in a hole", (130 * CS) as u64).unwrap();
    drop(f);
    let a2 = root.join("job/daily.0");
    let in_before = agent.bytes_in();
    let st2 = backup_file(&mut agent, &pool, &settings, &src, &a2, rel, Some(&m1)).unwrap();
    assert_eq!(st2.data_frames, 2, "{st2:?}");
    assert_eq!(st2.chunk.new_chunks, 2);
    assert_eq!(agent.bytes_in() - in_before, st2.bytes_received);
    // Two chunk files (one compressible, one mostly zeros) plus ~40 bytes a report.
    assert!(st2.bytes_received < 2 * CS as u64 + 200 * 64, "{}", st2.bytes_received);
    let out2 = t.path().join("rebuilt2");
    chunk::unchunk_file(&a2, &st2.chunk.manifest_path, &out2, None).unwrap();
    assert_eq!(file_hash(&out2), file_hash(&src));
    // The first archive still rebuilds the old content.
    chunk::unchunk_file(&a1, &st.chunk.manifest_path, &out, None).unwrap();
    assert_eq!(Some(file_hash(&out)), m1.file_hash);
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}

/// Start a backup with raw frames, read `window` reports without answering (the agent then
/// stops), let `change` act on the file, then answer everything and return the fault.
fn fault_mid_read(
    r: &mut FrameReader<ChildStdout>,
    w: &mut FrameWriter<ChildStdin>,
    path: &Path,
    change: impl FnOnce(),
) -> (FaultKind, u64, String) {
    w.send(&Msg::Backup(proto::Backup {
        path: path.to_str().unwrap().as_bytes().to_vec(),
        chunk_size: 256 << 10,
        compression: 0,
        level: 0,
        prev_count: 0,
        ranged: false,
    }))
    .unwrap();
    w.send(&Msg::Start).unwrap();
    let Msg::Opened(o) = r.expect().unwrap() else { panic!("no OPENED") };
    let mut unanswered = Vec::new();
    while unanswered.len() < o.window as usize {
        match r.expect().unwrap() {
            Msg::Chunk { index, kind: ChunkKind::Hash(_) } => unanswered.push(index),
            m => panic!("unexpected {m:?}"),
        }
    }
    change();
    for index in unanswered {
        w.send(&Msg::Answer { index, need: false }).unwrap();
    }
    loop {
        match r.expect().unwrap() {
            Msg::Chunk { index, .. } => w.send(&Msg::Answer { index, need: false }).unwrap(),
            Msg::Fault { kind, offset, message } => return (kind, offset, message),
            m => panic!("unexpected {}", m.name()),
        }
    }
}

#[test]
fn a_file_shrinking_or_growing_mid_read_is_a_fault_and_the_session_goes_on() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("big.img");
    let mut data = vec![0u8; 96 << 20];
    fill(&mut data, 7);
    fs::write(&src, &data).unwrap();
    let (c, mut r, mut w) = sshd.raw(AGENT);
    proto::handshake(&mut r, &mut w, "test", [0; 32], false).unwrap();

    let (kind, offset, msg) = fault_mid_read(&mut r, &mut w, &src, || {
        fs::OpenOptions::new().write(true).open(&src).unwrap().set_len(64 << 20).unwrap();
    });
    assert_eq!((kind, offset), (FaultKind::Shrank, 64 << 20), "{msg}");
    assert!(msg.contains("big.img") && msg.contains("67108864"), "{msg}");

    fs::write(&src, &data).unwrap();
    let (kind, offset, msg) = fault_mid_read(&mut r, &mut w, &src, || {
        let mut f = fs::OpenOptions::new().append(true).open(&src).unwrap();
        f.write_all(b"more").unwrap();
    });
    assert_eq!((kind, offset), (FaultKind::Grew, 96 << 20), "{msg}");
    assert!(msg.contains("grew from 100663296 to 100663300 bytes"), "{msg}");

    // Vanished before the request: a fault too, and the session still answers BYE.
    w.send(&Msg::Backup(proto::Backup {
        path: b"/nonexistent/affa-agent-test".to_vec(),
        chunk_size: 1 << 20,
        compression: 1,
        level: 1,
        prev_count: 0,
        ranged: false,
    }))
    .unwrap();
    w.send(&Msg::Start).unwrap();
    assert!(matches!(r.expect().unwrap(), Msg::Fault { kind: FaultKind::Vanished, .. }));
    w.send(&Msg::Bye).unwrap();
    assert_eq!(r.expect().unwrap(), Msg::Bye);
    drop(w);
    let (code, err) = wait_stderr(c);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn a_fault_through_the_client_names_the_file() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let pool = Pool::open(&t.path().join("root")).unwrap();
    let (c, mut agent) = sshd.agent(AGENT);
    let e = backup_file(
        &mut agent,
        &pool,
        &Settings::default(),
        Path::new("/nonexistent/disk.vmdk"),
        &t.path().join("root/job/daily.0"),
        Path::new("disk.vmdk"),
        None,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "127.0.0.1:affa-agent: /nonexistent/disk.vmdk: vanished (offset 0): /nonexistent/disk.vmdk: no such file"
    );
    assert!(!t.path().join("root/job/daily.0/disk.vmdk.affa-manifest").exists());
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}

#[test]
fn a_corrupt_frame_ends_the_session_with_one_line() {
    let sshd = Sshd::start();
    for garbage in [&u32::MAX.to_le_bytes()[..], &[5, 0, 0, 0, 0x7f, 1, 2, 3, 4][..], &[2, 0, 0, 0, 0x16, 9][..]] {
        let (c, mut r, mut w) = sshd.raw(AGENT);
        proto::handshake(&mut r, &mut w, "test", [0; 32], false).unwrap();
        w.get_mut().write_all(garbage).unwrap();
        w.get_mut().flush().unwrap();
        let Msg::Error { message } = r.expect().unwrap() else { panic!("no ERROR") };
        drop(w);
        let (code, err) = wait_stderr(c);
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(err.trim_end(), format!("affa-agent: {message}"));
        assert!(!err.contains("panicked"), "{err}");
    }
    // What is not an agent at all (a shell's output) is one line on affa's side.
    let mut c = sshd.spawn(&["echo", "Welcome to ESXi"]);
    let e =
        Agent::connect(c.stdout.take().unwrap(), c.stdin.take().unwrap(), "127.0.0.1:/x").err().unwrap().to_string();
    assert!(e.starts_with("agent 127.0.0.1:/x: not an affa agent protocol peer") && e.contains("Welcome"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let _ = c.wait();
}

#[test]
fn a_version_mismatch_is_one_line_on_both_ends() {
    let sshd = Sshd::start();
    let (c, mut r, mut w) = sshd.raw(AGENT);
    w.send(&Msg::Hello { version: 2, software: String::new(), exe_hash: [0; 32] }).unwrap();
    let Msg::Hello { version, software, .. } = r.expect().unwrap() else { panic!("no HELLO") };
    assert_eq!((version, software.as_str()), (1, "affa-agent 0.1.0"));
    let Msg::Error { message } = r.expect().unwrap() else { panic!("no ERROR") };
    assert_eq!(message, "protocol version 2 not supported: this side speaks version 1");
    drop(w);
    let (code, err) = wait_stderr(c);
    assert_eq!((code, err.as_str()), (2, "affa-agent: protocol version 2 not supported: this side speaks version 1\n"));
}

/// Back up `src` through the agent into a fresh archive under `root`: (archive, rel path).
fn back_up(agent: &mut Agent<ChildStdout, ChildStdin>, src: &Path, root: &Path, cs: usize) -> (PathBuf, PathBuf) {
    let pool = Pool::open(root).unwrap();
    let settings = Settings { chunk_size: cs as u32, compression: Compression::Zstd(1), ..Settings::default() };
    let archive = root.join("job/daily.0");
    let rel = PathBuf::from("vm/disk.img");
    backup_file(agent, &pool, &settings, src, &archive, &rel, None).unwrap();
    (archive, rel)
}

/// Names of restore temp files in `dir`.
fn temps(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".affa-agent-"))
        .collect();
    v.sort();
    v
}

fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
}

/// A 64 MiB file of 256 chunks (256 KiB), every chunk data.
fn full_file(p: &Path) -> Vec<u8> {
    let mut data = vec![0u8; 64 << 20];
    fill(&mut data, 99);
    fs::write(p, &data).unwrap();
    data
}

#[test]
fn restore_to_a_new_target_is_identical_sparse_with_mode_and_mtime() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    const CS: usize = 256 << 10;
    // 64 MiB, data in 8 chunks (one of them half zeros: a hole inside a chunk), the rest holes.
    let f = fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    let mut buf = vec![0u8; CS];
    for i in [0usize, 1, 2, 3, 100, 101, 200, 255] {
        fill(&mut buf, i as u64 + 3);
        if i == 100 {
            buf[CS / 2..].fill(0);
        }
        f.write_all_at(&buf, (i * CS) as u64).unwrap();
    }
    drop(f);
    fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime(&src, 1_700_000_000, 123_456_789);
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &t.path().join("root"), CS);

    let dest_dir = t.path().join("dest");
    fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("restored.img");
    let seen = std::cell::RefCell::new(Vec::new());
    let progress = |n: u64| seen.borrow_mut().push(n);
    let opts = RestoreOptions { progress: Some(&progress), ..Default::default() };
    let st = restore_file(&mut agent, &archive, &rel, &dest, &opts).unwrap();
    assert_eq!(file_hash(&dest), file_hash(&src));
    assert_eq!((st.size, st.chunks, st.zero_chunks, st.chunks_sent, st.chunks_local), (64 << 20, 256, 248, 8, 0));
    // Progress: the offset of each chunk sent, in order, then the size (a bar that moves with
    // the file, not once at its end).
    let want: Vec<u64> = [0u64, 1, 2, 3, 100, 101, 200, 255].iter().map(|i| i * CS as u64).chain([64 << 20]).collect();
    assert_eq!(*seen.borrow(), want);
    assert!(!st.compared);
    let m = fs::metadata(&dest).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
    // Holes stay holes: 7.5 chunks of data (the zero half of chunk 100 not written).
    assert!(m.blocks() * 512 <= (7 * CS + CS / 2 + 64 * 1024) as u64, "{} blocks", m.blocks());
    assert!(temps(&dest_dir).is_empty());

    // A zero-length file.
    let empty = t.path().join("empty.img");
    fs::write(&empty, b"").unwrap();
    let (archive2, rel2) = back_up(&mut agent, &empty, &t.path().join("root2"), CS);
    let dest2 = dest_dir.join("empty.img");
    let st = restore_file(&mut agent, &archive2, &rel2, &dest2, &RestoreOptions::default()).unwrap();
    assert_eq!((st.chunks, st.chunks_sent), (0, 0));
    assert_eq!(fs::metadata(&dest2).unwrap().len(), 0);

    // The parent directory must exist: a fault naming it, and the session goes on.
    let e = restore_file(&mut agent, &archive, &rel, &t.path().join("no/such/dir.img"), &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vanished") && e.contains("no/such"), "{e}");
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c), (0, String::new()));
}

#[test]
fn restore_over_a_target_differing_by_1_percent_sends_under_2_percent() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    let data = full_file(&src);
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &t.path().join("root"), 256 << 10);

    // The target: the same disk with 1% (655 KB, clustered) overwritten.
    let dest = t.path().join("target.img");
    let mut damaged = data.clone();
    let mut junk = vec![0u8; (64 << 20) / 100];
    fill(&mut junk, 12345);
    damaged[(10 << 20) + 1000..(10 << 20) + 1000 + junk.len()].copy_from_slice(&junk);
    fs::write(&dest, &damaged).unwrap();
    let st = restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions::default()).unwrap();
    assert_eq!(file_hash(&dest), file_hash(&src));
    assert!(st.compared);
    // Bytes 10 MiB + 1000 .. + 655360: chunks 40, 41, 42.
    assert_eq!(st.chunks_sent, 3, "{st:?}");
    assert_eq!(st.chunks_local, 253);
    assert_eq!(st.target_bytes_read, 64 << 20);
    // Every frame byte sent to the agent (request, manifest, chunks): at most 2% of the file.
    assert!(st.frame_bytes_out <= (64 << 20) / 50, "{st:?}");

    // Without the comparison, everything is sent; the result is the same.
    fs::write(&dest, &damaged).unwrap();
    let st = restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions { compare: false, ..Default::default() })
        .unwrap();
    assert_eq!((st.chunks_sent, st.chunks_local, st.compared), (256, 0, false));
    assert_eq!(file_hash(&dest), file_hash(&src));

    // --preserve-newer: a target newer than the archived file is left as it is; an older one
    // (or one of the same age) is restored.
    let src_mtime = fs::metadata(&src).unwrap().mtime() as u64;
    let keep = RestoreOptions { keep_newer: true, ..Default::default() };
    fs::write(&dest, &damaged).unwrap();
    set_mtime(&dest, src_mtime + 10, 0);
    let st = restore_file(&mut agent, &archive, &rel, &dest, &keep).unwrap();
    assert!(st.skipped && st.chunks_sent == 0 && st.target_bytes_read == 0, "{st:?}");
    assert_eq!(fs::read(&dest).unwrap(), damaged);
    set_mtime(&dest, src_mtime - 10, 0);
    let st = restore_file(&mut agent, &archive, &rel, &dest, &keep).unwrap();
    assert!(!st.skipped && st.chunks_sent == 3, "{st:?}");
    assert_eq!(file_hash(&dest), file_hash(&src));
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}

#[test]
fn a_symlink_target_is_replaced_not_followed_and_a_directory_is_refused() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    full_file(&src);
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &t.path().join("root"), 256 << 10);

    // The link points at a file with the same bytes but one chunk: it is not even read.
    let other = t.path().join("other.img");
    let mut almost = fs::read(&src).unwrap();
    almost[5] ^= 1;
    fs::write(&other, &almost).unwrap();
    let before = file_hash(&other);
    let dest = t.path().join("link.img");
    std::os::unix::fs::symlink(&other, &dest).unwrap();
    let st = restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions::default()).unwrap();
    assert!(!st.compared && st.chunks_sent == 256 && st.target_bytes_read == 0, "{st:?}");
    assert_eq!(file_hash(&other), before);
    assert!(fs::symlink_metadata(&dest).unwrap().is_file());
    assert_eq!(file_hash(&dest), file_hash(&src));

    // A directory (and a fifo) in the target's place: refused, left as it is, nothing created.
    let dir = t.path().join("dir.img");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("inside"), b"x").unwrap();
    let e = restore_file(&mut agent, &archive, &rel, &dir, &RestoreOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a regular file") && e.contains("dir.img"), "{e}");
    assert_eq!(fs::read(dir.join("inside")).unwrap(), b"x");
    let fifo = t.path().join("fifo.img");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = restore_file(&mut agent, &archive, &rel, &fifo, &RestoreOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // A fifo in the parent directory's place: not opened (nor waited on).
    let e = restore_file(&mut agent, &archive, &rel, &fifo.join("x.img"), &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("fifo.img is not a directory"), "{e}");
    assert!(temps(t.path()).is_empty(), "{:?}", temps(t.path()));

    // A directory on the way that a user of the host replaced with a symlink of their own (to
    // a directory of root's): the agent, root, neither writes nor reads through it. Root's own
    // symlinks (ESXi's datastore names) are followed.
    let elsewhere = t.path().join("etc-like");
    fs::create_dir(&elsewhere).unwrap();
    fs::copy(&src, elsewhere.join("disk.img")).unwrap();
    let users = t.path().join("home-imgs");
    std::os::unix::fs::symlink(&elsewhere, &users).unwrap();
    let c_users = std::ffi::CString::new(users.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: lchown(2) of a NUL-terminated path (the test runs as root, as the agent does).
    assert_eq!(unsafe { libc::lchown(c_users.as_ptr(), 65534, 65534) }, 0, "the test needs root");
    let e = restore_file(&mut agent, &archive, &rel, &users.join("new.img"), &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("home-imgs is a symlink owned by uid 65534, not root: not followed"), "{e}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 1, "a file was written through the user's symlink");
    let pool = Pool::open(&t.path().join("root")).unwrap();
    let settings = Settings { chunk_size: 256 << 10, compression: Compression::Zstd(1), ..Settings::default() };
    let e = backup_file(
        &mut agent,
        &pool,
        &settings,
        &users.join("disk.img"),
        &t.path().join("root/job/daily.1"),
        &rel,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("symlink owned by uid 65534"), "{e}");
    let roots = t.path().join("root-imgs");
    std::os::unix::fs::symlink(&elsewhere, &roots).unwrap();
    restore_file(&mut agent, &archive, &rel, &roots.join("new.img"), &RestoreOptions::default()).unwrap();
    assert_eq!(file_hash(&elsewhere.join("new.img")), file_hash(&src));
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}

/// Start a restore of `rel` to `dest` with raw frames (nothing compared: every chunk is asked
/// for) and read up to the first `RNEED`.
fn start_raw_restore(
    r: &mut FrameReader<ChildStdout>,
    w: &mut FrameWriter<ChildStdin>,
    archive: &Path,
    rel: &Path,
    dest: &Path,
) {
    let m = chunk::read_manifest(&chunk::manifest_path(archive, rel)).unwrap();
    let entries: Vec<Option<[u8; 32]>> =
        m.chunks.iter().map(|c| if let chunk::ChunkRef::Stored(id) = c { Some(*id) } else { None }).collect();
    w.send(&Msg::Restore(proto::Restore {
        path: dest.to_str().unwrap().as_bytes().to_vec(),
        size: m.size,
        chunk_size: m.chunk_size,
        mode: m.mode,
        uid: u32::MAX,
        gid: u32::MAX,
        mtime: m.mtime,
        atime: m.mtime,
        file_hash: m.file_hash.unwrap(),
        count: entries.len() as u64,
        compare: false,
        keep_newer: false,
    }))
    .unwrap();
    w.send(&Msg::RManifest { start: 0, entries }).unwrap();
    w.send(&Msg::Start).unwrap();
    assert!(matches!(r.expect().unwrap(), Msg::ROpened { compared: false, .. }));
    assert_eq!(r.expect().unwrap(), Msg::RNeed { index: 0 });
}

#[test]
fn a_killed_restore_leaves_the_target_untouched_and_the_next_restore_cleans_up() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    full_file(&src);
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &t.path().join("root"), 256 << 10);
    let dest_dir = t.path().join("dest");
    fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("disk.img");
    fs::write(&dest, b"the old target").unwrap();

    // affa going away mid-restore (its ssh killed): the agent removes its temp file itself.
    let (mut ch2, mut r2, mut w2) = sshd.raw(AGENT);
    proto::handshake(&mut r2, &mut w2, "test", [0; 32], false).unwrap();
    start_raw_restore(&mut r2, &mut w2, &archive, &rel, &dest);
    assert_eq!(temps(&dest_dir).len(), 1);
    ch2.kill().unwrap();
    let _ = ch2.wait();
    let t0 = Instant::now();
    while !temps(&dest_dir).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", temps(&dest_dir));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(&dest).unwrap(), b"the old target");

    // kill -9 of the agent mid-restore: the old target stays; its temp file is left behind.
    let pidfile = t.path().join("agent.pid");
    let script = format!("echo $$ > {}; exec {AGENT} --serve", pidfile.display());
    let mut ch = sshd.spawn(&["sh", "-c", &format!("'{script}'")]);
    let mut r = FrameReader::new(ch.stdout.take().unwrap());
    let mut w = FrameWriter::new(ch.stdin.take().unwrap());
    proto::handshake(&mut r, &mut w, "test", [0; 32], false).unwrap();
    start_raw_restore(&mut r, &mut w, &archive, &rel, &dest);
    let pid = fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    let _ = ch.wait();
    assert_eq!(fs::read(&dest).unwrap(), b"the old target");
    assert_eq!(temps(&dest_dir).len(), 1);

    // The next restore of the same target succeeds and removes the leftover.
    restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions::default()).unwrap();
    assert_eq!(file_hash(&dest), file_hash(&src));
    assert!(temps(&dest_dir).is_empty(), "{:?}", temps(&dest_dir));
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}

#[test]
fn a_damaged_chunk_fails_the_restore_naming_it_and_the_target_is_untouched() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    full_file(&src);
    let root = t.path().join("root");
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &root, 256 << 10);
    // Chunk 7's file (the archive's link and the pool entry: one inode) gets a flipped byte.
    let m = chunk::read_manifest(&chunk::manifest_path(&archive, &rel)).unwrap();
    let chunk::ChunkRef::Stored(id) = m.chunks[7] else { panic!("chunk 7 is zero") };
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let link = archive.join(".affa-chunks").join(&hex[..2]).join(&hex);
    let mut blob = fs::read(&link).unwrap();
    let n = blob.len();
    blob[n - 100] ^= 0x55;
    fs::OpenOptions::new().write(true).open(&link).unwrap().write_all_at(&blob, 0).unwrap();

    let dest_dir = t.path().join("dest");
    fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("disk.img");
    fs::write(&dest, b"the old target").unwrap();
    let pool = Pool::open(&root).unwrap();
    let e =
        restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions { pool: Some(&pool), ..Default::default() })
            .unwrap_err()
            .to_string();
    assert!(e.contains(&format!("chunk {hex}")) && e.contains("damaged") && e.contains("disk.img"), "{e}");
    assert_eq!(fs::read(&dest).unwrap(), b"the old target");
    assert!(temps(&dest_dir).is_empty(), "{:?}", temps(&dest_dir));
    // A new target is not created either, and the session is still usable.
    let e = restore_file(&mut agent, &archive, &rel, &dest_dir.join("new.img"), &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&hex), "{e}");
    assert!(!dest_dir.join("new.img").exists());
    assert!(temps(&dest_dir).is_empty());
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c), (0, String::new()));
}

/// Peak RSS (VmHWM, KiB) of a live process.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The agent's memory during a restore of 1 GiB of incompressible data, every chunk sent, then
/// every chunk compared and copied locally (docs/PROTOCOL.md "Memory"). The agent runs without
/// ssh here (its pipes directly) so that its pid is known. Slow: `--ignored`.
#[test]
#[ignore]
fn restore_memory_is_bounded() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    let mut data = vec![0u8; 1 << 30];
    let mut x = 0x9e3779b97f4a7c15u64;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    fs::write(&src, &data).unwrap();
    drop(data);
    for cs in [1usize << 20, 16 << 20] {
        let spawn = || {
            let mut c =
                Command::new(AGENT).arg("--serve").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
            let a = Agent::connect(c.stdout.take().unwrap(), c.stdin.take().unwrap(), "local").unwrap();
            (c, a)
        };
        let (mut c, mut agent) = spawn();
        let (archive, rel) = back_up(&mut agent, &src, &t.path().join(format!("root{cs}")), cs);
        agent.bye().unwrap();
        c.wait().unwrap();
        let dest = t.path().join("restored.img");
        let _ = fs::remove_file(&dest);
        for (what, compare) in [("new target", true), ("equal target", true)] {
            let (mut c, mut agent) = spawn();
            let st = restore_file(&mut agent, &archive, &rel, &dest, &RestoreOptions { compare, ..Default::default() })
                .unwrap();
            let kib = peak_rss_kib(c.id());
            eprintln!("chunk size {} MiB, {what}: agent peak RSS {} MiB ({st:?})", cs >> 20, kib >> 10);
            assert!(kib < (2 * 32 + 3 * 16 + 32) << 10, "{kib} KiB");
            agent.bye().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(file_hash(&dest), file_hash(&src));
    }
}

#[test]
fn chunk_data_that_does_not_verify_is_a_fault_and_the_target_stays() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    full_file(&src);
    let (c, mut agent) = sshd.agent(AGENT);
    let (archive, rel) = back_up(&mut agent, &src, &t.path().join("root"), 256 << 10);
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
    let dest = t.path().join("dest.img");
    fs::write(&dest, b"the old target").unwrap();
    let m = chunk::read_manifest(&chunk::manifest_path(&archive, &rel)).unwrap();
    let chunk::ChunkRef::Stored(id1) = m.chunks[1] else { panic!("zero") };
    let hex1: String = id1.iter().map(|b| format!("{b:02x}")).collect();
    let chunk1 = fs::read(archive.join(".affa-chunks").join(&hex1[..2]).join(&hex1)).unwrap();

    let (c, mut r, mut w) = sshd.raw(AGENT);
    proto::handshake(&mut r, &mut w, "test", [0; 32], false).unwrap();
    // Chunk 1's (valid) chunk file sent as chunk 0: it decodes, to the wrong bytes.
    start_raw_restore(&mut r, &mut w, &archive, &rel, &dest);
    w.send(&Msg::RData { index: 0, blob: chunk1.clone() }).unwrap();
    let (kind, offset, message) = loop {
        match r.expect().unwrap() {
            Msg::RNeed { .. } => {}
            Msg::Fault { kind, offset, message } => break (kind, offset, message),
            m => panic!("unexpected {}", m.name()),
        }
    };
    assert_eq!((kind, offset), (FaultKind::BadData, 0), "{message}");
    assert_eq!(message, "chunk 0 from affa does not match its id in the manifest");
    assert_eq!(fs::read(&dest).unwrap(), b"the old target");
    assert!(temps(t.path()).is_empty());

    // A truncated chunk file: a fault too, and the session still serves requests.
    start_raw_restore(&mut r, &mut w, &archive, &rel, &dest);
    w.send(&Msg::RData { index: 0, blob: chunk1[..chunk1.len() - 1].to_vec() }).unwrap();
    let message = loop {
        match r.expect().unwrap() {
            Msg::RNeed { .. } => {}
            Msg::Fault { kind: FaultKind::BadData, message, .. } => break message,
            m => panic!("unexpected {m:?}"),
        }
    };
    assert!(message.starts_with("chunk 0 from affa: "), "{message}");
    assert!(temps(t.path()).is_empty());

    // An RDATA for another chunk than the one asked: a protocol error, the temp file removed.
    start_raw_restore(&mut r, &mut w, &archive, &rel, &dest);
    w.send(&Msg::RData { index: 5, blob: chunk1 }).unwrap();
    let message = loop {
        match r.expect().unwrap() {
            Msg::RNeed { .. } => {}
            Msg::Error { message } => break message,
            m => panic!("unexpected {}", m.name()),
        }
    };
    assert_eq!(message, "RDATA for chunk 5, expected chunk 0");
    drop(w);
    let (code, err) = wait_stderr(c);
    assert_eq!((code, err.trim_end()), (2, "affa-agent: RDATA for chunk 5, expected chunk 0"));
    assert_eq!(fs::read(&dest).unwrap(), b"the old target");
    assert!(temps(t.path()).is_empty());
}

/// A ranged (CBT) backup: the agent reads exactly the chunks named, the others come from the
/// previous manifest, and the manifest equals the one a full pass gives (without the whole-file
/// hash: version 2). A carried chunk whose pool entry is damaged is read again; another chunk
/// size or file length is refused.
#[test]
fn ranged_backup_reads_only_the_changed_chunks() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    const CS: usize = 256 << 10;
    const CHUNKS: usize = 48;
    let f = fs::File::create(&src).unwrap();
    let mut buf = vec![0u8; CS];
    for i in (0..CHUNKS).filter(|i| i % 8 != 7) {
        fill(&mut buf, 2 * i as u64 + 100);
        f.write_all_at(&buf, (i * CS) as u64).unwrap();
    }
    f.set_len((CHUNKS * CS) as u64).unwrap();
    drop(f);
    let root = t.path().join("root");
    let pool = Pool::open(&root).unwrap();
    let settings = Settings { chunk_size: CS as u32, compression: Compression::Zstd(1), ..Settings::default() };
    let (c, mut agent) = sshd.agent(AGENT);
    let rel = Path::new("vm/disk-flat.vmdk");
    let a1 = root.join("job/daily.2");
    let m1 = chunk::read_manifest(
        &backup_file(&mut agent, &pool, &settings, &src, &a1, rel, None).unwrap().chunk.manifest_path,
    )
    .unwrap();

    // Guest writes: chunk 3, across chunks 10 and 11, into the hole of chunk 15, at the end.
    let writes: [(u64, &[u8]); 4] = [
        ((3 * CS + 17) as u64, b"three"),
        ((11 * CS - 2) as u64, b"ten-eleven"),
        ((15 * CS + 4096) as u64, b"in a hole"),
        ((CHUNKS * CS - 1) as u64, b"!"),
    ];
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    for (off, d) in writes {
        f.write_all_at(d, off).unwrap();
    }
    drop(f);
    let extents: Vec<(u64, u64)> = writes.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
    let ranges = chunk_ranges(&extents, CS as u32, (CHUNKS * CS) as u64);
    assert_eq!(ranges, vec![(3, 4), (10, 12), (15, 16), (47, 48)]);

    let a2 = root.join("job/daily.1");
    let st = backup_file_ranged(&mut agent, &pool, &settings, &src, &a2, rel, &m1, &ranges).unwrap();
    assert!(st.ranged);
    assert_eq!(st.range_chunks, 5);
    // The host read exactly the five changed chunks, and sent each (all new).
    assert_eq!(st.source_bytes_read, 5 * CS as u64, "{st:?}");
    assert_eq!(st.data_frames, 5);
    let m2 = chunk::read_manifest(&st.chunk.manifest_path).unwrap();
    assert_eq!(m2.file_hash, None);
    assert!(fs::read_to_string(&st.chunk.manifest_path).unwrap().starts_with("affa-chunk-manifest 3\n"));
    let out = t.path().join("rebuilt");
    chunk::unchunk_file(&a2, &st.chunk.manifest_path, &out, None).unwrap();
    assert_eq!(file_hash(&out), file_hash(&src));

    // A full pass gives the same manifest (but for the hash it can compute).
    let a3 = root.join("job/daily.0");
    let full = backup_file(&mut agent, &pool, &settings, &src, &a3, rel, Some(&m1)).unwrap();
    assert_eq!(full.source_bytes_read, ((CHUNKS - CHUNKS / 8 + 2) * CS) as u64);
    let m3 = chunk::read_manifest(&full.chunk.manifest_path).unwrap();
    assert_eq!(m3.file_hash, Some(file_hash(&src)));
    // (atime: the full pass read the file after the ranged one.)
    assert_eq!(Manifest { file_hash: None, atime: m2.atime, added_bytes: m2.added_bytes, ..m3.clone() }, m2);

    // The archive of the ranged backup restores through the agent (its hash computed first).
    let target = t.path().join("restored.img");
    restore_file(&mut agent, &a2, rel, &target, &RestoreOptions { compare: false, ..Default::default() }).unwrap();
    assert_eq!(file_hash(&target), file_hash(&src));

    // A damaged pool entry of a carried chunk (chunk 20) is read again from the host.
    let ChunkRef::Stored(id20) = m2.chunks[20] else { panic!("chunk 20 is data") };
    fs::OpenOptions::new().write(true).open(pool.entry(&id20)).unwrap().set_len(10).unwrap();
    let a4 = root.join("job/weekly.0");
    let st4 = backup_file_ranged(&mut agent, &pool, &settings, &src, &a4, rel, &m2, &[(3, 4)]).unwrap();
    assert_eq!((st4.range_chunks, st4.source_bytes_read, st4.data_frames), (2, 2 * CS as u64, 1), "{st4:?}");
    chunk::unchunk_file(&a4, &st4.chunk.manifest_path, &out, None).unwrap();
    assert_eq!(file_hash(&out), file_hash(&src));

    // Another chunk size is refused before anything is sent (the session stays usable).
    let other = Settings { chunk_size: 2 * CS as u32, ..settings.clone() };
    let e = backup_file_ranged(&mut agent, &pool, &other, &src, &root.join("job/x"), rel, &m2, &[(3, 4)]).unwrap_err();
    assert!(e.to_string().contains("chunk size"), "{e}");
    // Another length: refused, no manifest written.
    fs::OpenOptions::new().write(true).open(&src).unwrap().set_len((CHUNKS * CS + 5) as u64).unwrap();
    let a5 = root.join("job/monthly.0");
    let e = backup_file_ranged(&mut agent, &pool, &settings, &src, &a5, rel, &m2, &[(3, 4)]).unwrap_err();
    assert!(e.to_string().contains("a ranged backup needs the same length"), "{e}");
    assert!(!chunk::manifest_path(&a5, rel).exists());
    drop(agent);
    let _ = wait_stderr(c);
}

/// Overwrite the middle of a pool entry (its archives' links share the inode).
fn damage(pool: &Pool, id: &[u8; 32]) {
    let entry = pool.entry(id);
    let len = fs::metadata(&entry).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&entry).unwrap();
    f.write_all_at(&[0x5a; 64], len / 2).unwrap();
}

/// A damaged pool entry is counted repaired once per run, whether the job's own archives link
/// it (checked when reported, then its data asked for) or it is another job's (asked for,
/// then checked when its data comes): the run's report must not double a repair.
#[test]
fn a_damaged_pool_entry_is_repaired_and_counted_once() {
    let sshd = Sshd::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.img");
    const CS: usize = 256 << 10;
    let mut whole = vec![0u8; 24 * CS];
    for (i, c) in whole.chunks_mut(CS).enumerate() {
        fill(c, i as u64 * 2 + 1); // seeds 2k+1 only: every chunk distinct
    }
    fs::write(&src, &whole).unwrap();
    let root = t.path().join("root");
    let pool = Pool::open(&root).unwrap();
    let settings = Settings { chunk_size: CS as u32, compression: Compression::Zstd(1), ..Settings::default() };
    let rel = Path::new("vm/disk.img");
    let (c, mut agent) = sshd.agent(AGENT);

    // Job a, first run: nothing of its own yet.
    let a1 = root.join("a/daily.1");
    agent.limit_known(vec![]);
    let st1 = backup_file(&mut agent, &pool, &settings, &src, &a1, rel, None).unwrap();
    assert_eq!(st1.chunk.new_chunks, 24);
    let m1 = chunk::unchunk_file(&a1, &st1.chunk.manifest_path, &t.path().join("r1"), None).unwrap();
    let ids: Vec<[u8; 32]> = m1
        .chunks
        .iter()
        .map(|r| match r {
            ChunkRef::Stored(id) => *id,
            ChunkRef::Zero => panic!("no zero chunk in this file"),
        })
        .collect();

    // Job a again, its own chunk 3 damaged: checked when reported, asked for, stored afresh.
    damage(&pool, &ids[3]);
    let a0 = root.join("a/daily.0");
    agent.limit_known(vec![a1.clone()]);
    let st2 = backup_file(&mut agent, &pool, &settings, &src, &a0, rel, None).unwrap();
    assert_eq!(
        (st2.chunk.repaired_chunks, st2.chunk.new_chunks, st2.chunk.reused_chunks, st2.data_frames),
        (1, 1, 23, 1),
        "{st2:?}"
    );

    let rebuilt = |a: &Path, st: &affa_store::chunk::remote::RemoteStats| {
        let out = t.path().join("rebuilt");
        chunk::unchunk_file(a, &st.chunk.manifest_path, &out, None).unwrap();
        file_hash(&out)
    };
    assert_eq!(rebuilt(&a0, &st2), file_hash(&src));

    // Job b: every chunk is another job's, so all are asked for; chunk 7's entry is damaged
    // (a1's and a0's copy with it: they link the same inode).
    damage(&pool, &ids[7]);
    let b0 = root.join("b/daily.0");
    agent.limit_known(vec![]);
    let st3 = backup_file(&mut agent, &pool, &settings, &src, &b0, rel, None).unwrap();
    assert_eq!(
        (st3.chunk.repaired_chunks, st3.chunk.new_chunks, st3.chunk.reused_chunks, st3.data_frames),
        (1, 1, 23, 24),
        "{st3:?}"
    );
    // The good entries are shared, not stored twice; b0 rebuilds the file.
    let linked = |a: &Path, id: &[u8; 32]| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        fs::metadata(a.join(".affa-chunks").join(&hex[..2]).join(&hex)).unwrap().ino()
    };
    assert_eq!(linked(&b0, &ids[0]), linked(&a1, &ids[0]));
    assert_eq!(linked(&b0, &ids[3]), linked(&a0, &ids[3]));
    assert_ne!(linked(&b0, &ids[7]), linked(&a1, &ids[7]));
    assert_eq!(rebuilt(&b0, &st3), file_hash(&src));
    agent.bye().unwrap();
    assert_eq!(wait_stderr(c).0, 0);
}
