//! affa-agent over a real ssh connection (a private sshd on 127.0.0.1 with its own keys, started
//! here): the static binary, the handshake, backups into a real pool rebuilt by the store, the
//! faults of a file changing mid-read, corrupt frames and a version mismatch.

use affa_agent_proto::{self as proto, ChunkKind, FaultKind, FrameReader, FrameWriter, Msg};
use affa_store::chunk::remote::{backup_file, Agent};
use affa_store::chunk::{self, Compression, Pool, Settings};
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
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
    let expected_stored = data_chunks.len() as u64 + 1;
    assert_eq!(st.chunk.chunks, CHUNKS as u64 + 1);
    assert_eq!(st.chunk.zero_chunks, CHUNKS as u64 + 1 - expected_stored);
    assert_eq!(st.data_frames, expected_stored);
    assert_eq!(st.chunk.new_chunks, expected_stored);
    // Holes are not read: only the data chunks and chunk 60 (written zeros).
    assert!(st.source_bytes_read <= (data_chunks.len() as u64 + 2) * CS as u64, "{}", st.source_bytes_read);
    // The text halves compress: the wire carried the compressed chunk files.
    assert!(st.bytes_received < expected_stored * CS as u64 * 3 / 4, "{}", st.bytes_received);
    let out = t.path().join("rebuilt1");
    let m1 = chunk::unchunk_file(&a1, &st.chunk.manifest_path, &out, None).unwrap();
    assert_eq!(file_hash(&out), file_hash(&src));
    assert_eq!(m1.file_hash, file_hash(&src));

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
    assert_eq!(file_hash(&out), m1.file_hash);
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
