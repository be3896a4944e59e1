//! A throwaway single-node Ceph (mon, mgr, one memstore OSD) with its RADOS Gateway (S3) on
//! 127.0.0.1 high ports, in a temp dir: the real object storage the offsite tests copy to
//! (after ../shared/reference/ceph-single-node.md). One cluster per test process
//! ([`Ceph::shared`]: it takes seconds to start); each test makes its own bucket. CephFS (an MDS
//! and ceph-fuse mounts, `cephfs_up.sh`) is added only when a test asks ([`Ceph::cephfs_mounts`]),
//! so the S3 tests do not pay for it.
//!
//! Owns: starting the cluster (`ceph_up.sh`, run under a supervising `sh` whose stdin only this
//! process holds: when the test process ends, however it ends, every daemon is killed with SIGKILL
//! and the cluster dir removed), the S3 user (TESTACCESS / TESTSECRET), and the tests' own S3
//! calls (buckets, listing, reading, damaging and planting objects). Must never: skip silently (a missing
//! package fails the test naming it), touch the machine's own Ceph, or leave a daemon behind.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::{free_port, poll, remove_at_exit};

pub const ACCESS: &str = "TESTACCESS";
pub const SECRET: &str = "TESTSECRET";
const SIGN: Duration = Duration::from_secs(600);

pub struct Ceph {
    /// `http://127.0.0.1:PORT`, the RADOS Gateway.
    pub endpoint: String,
    /// How long the cluster took to come up (HEALTH is not waited for: the gateway answering is
    /// what the tests need).
    pub started_in: Duration,
    /// The supervising `sh` (never waited for: it ends with this process).
    _sh: Mutex<Child>,
    /// The cluster dir (ceph.conf, run/ with the pid files).
    dir: PathBuf,
    /// Where the CephFS mounts are (outside the temp dir the test process removes: the
    /// supervising `sh` unmounts them first, then removes them).
    mnt: PathBuf,
    /// Serializes `cephfs_up.sh`.
    fs: Mutex<()>,
}

static SHARED: LazyLock<Result<Ceph, String>> = LazyLock::new(Ceph::start);

impl Ceph {
    /// The cluster of this test process, started by the first test that asks.
    pub fn shared() -> &'static Ceph {
        match &*SHARED {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn start() -> Result<Ceph, String> {
        let t0 = Instant::now();
        let base = tempfile::Builder::new().prefix("affa-ceph").tempdir().unwrap().keep();
        remove_at_exit(&base);
        let d = base.join("c");
        let (mon, rgw) = (free_port(), free_port());
        let uuid = || std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/common/ceph_up.sh");
        let mnt = tempfile::Builder::new().prefix("affa-cephfs").tempdir().unwrap().keep();
        let log = base.join("up.log");
        let out = std::fs::File::create(&log).unwrap();
        let sh = Command::new("/bin/sh")
            .arg(&script)
            .arg(&d)
            .arg(mon.to_string())
            .arg(rgw.to_string())
            .arg(uuid())
            .arg(uuid())
            .arg(&mnt)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let why = |what: &str| {
            let setup = std::fs::read_to_string(d.join("log/setup.log")).unwrap_or_default();
            format!(
                "the Ceph test cluster {what} (packages: apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd radosgw ceph-common): {}\n{setup}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        let done = poll(Duration::from_secs(180), Duration::from_millis(100), || {
            if d.join("ready").exists() {
                Some(true)
            } else if d.join("failed").exists() {
                Some(false)
            } else {
                None
            }
        });
        match done {
            Some(true) => {}
            Some(false) => return Err(why("did not start")),
            None => return Err(why("was not up after 180 s")),
        }
        let endpoint = format!("http://127.0.0.1:{rgw}");
        let up =
            poll(Duration::from_secs(60), Duration::from_millis(50), || ureq::get(&endpoint).call().ok().map(|_| ()));
        if up.is_none() {
            return Err(why("gateway did not answer"));
        }
        let started_in = t0.elapsed();
        eprintln!("ceph fixture: mon + mgr + memstore OSD + radosgw up in {started_in:.1?}");
        Ok(Ceph { endpoint, started_in, _sh: Mutex::new(sh), dir: d, mnt, fs: Mutex::new(()) })
    }

    /// CephFS mounted once per name, each by its own ceph-fuse client (its own MDS session:
    /// one "backup server"), at paths that all show the same file system. The MDS is started by
    /// the first test that asks. Names must be unique in the test process.
    pub fn cephfs_mounts(&self, names: &[&str]) -> Vec<PathBuf> {
        let _g = self.fs.lock().unwrap_or_else(|e| e.into_inner());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/common/cephfs_up.sh");
        let t0 = Instant::now();
        let out = Command::new("/bin/sh").arg(&script).arg(&self.dir).arg(&self.mnt).args(names).output().unwrap();
        assert!(
            out.status.success(),
            "CephFS did not come up (packages: apt-get install --no-install-recommends ceph-mds ceph-fuse): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("ceph fixture: CephFS mounted at {names:?} in {:.1?}", t0.elapsed());
        names.iter().map(|n| self.mnt.join(n)).collect()
    }

    /// The pid of the ceph-fuse client of mount `name`.
    pub fn client_pid(&self, name: &str) -> u32 {
        let p = self.dir.join(format!("run/ceph-fuse.{name}.pid"));
        std::fs::read_to_string(&p).unwrap().trim().parse().unwrap()
    }

    /// A second RADOS Gateway of this cluster on a port of its own (same user, same buckets),
    /// started: a test may stop and start it while the shared one serves the other tests.
    pub fn spare_gateway(&self) -> Gateway {
        let port = free_port();
        let mut g = Gateway { endpoint: format!("http://127.0.0.1:{port}"), port, dir: self.dir.clone(), child: None };
        g.start();
        g
    }

    fn bucket(&self, name: &str) -> Bucket {
        Bucket::new(self.endpoint.parse().unwrap(), UrlStyle::Path, name.to_string(), "us-east-1").unwrap()
    }

    /// A new empty bucket of a name no other test of this process uses.
    pub fn new_bucket(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("affa-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let b = self.bucket(&name);
        let url = b.create_bucket(&creds()).sign(SIGN);
        ureq::put(url.as_str()).send_bytes(b"").unwrap_or_else(|e| panic!("cannot create bucket {name}: {e}"));
        name
    }

    /// Every object name of `bucket` that starts with `prefix`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let b = self.bucket(bucket);
        let c = creds();
        let (mut out, mut token) = (Vec::new(), None::<String>);
        loop {
            let mut a = b.list_objects_v2(Some(&c));
            a.with_prefix(prefix);
            if let Some(t) = &token {
                a.with_continuation_token(t.clone());
            }
            let body = ureq::get(a.sign(SIGN).as_str()).call().unwrap().into_string().unwrap();
            let page = ListObjectsV2::parse_response(&body).unwrap();
            // Listed with `encoding-type=url` (rusty-s3): each key percent-encoded.
            out.extend(
                page.contents
                    .into_iter()
                    .map(|c| percent_encoding::percent_decode_str(&c.key).decode_utf8_lossy().into_owned()),
            );
            token = page.next_continuation_token;
            if token.is_none() {
                out.sort();
                return out;
            }
        }
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let b = self.bucket(bucket);
        let url = b.get_object(Some(&creds()), key).sign(SIGN);
        let mut v = Vec::new();
        ureq::get(url.as_str()).call().unwrap().into_reader().read_to_end(&mut v).unwrap();
        v
    }

    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let b = self.bucket(bucket);
        let url = b.put_object(Some(&creds()), key).sign(SIGN);
        ureq::put(url.as_str()).send_bytes(data).unwrap();
    }

    pub fn delete(&self, bucket: &str, key: &str) {
        let b = self.bucket(bucket);
        let url = b.delete_object(Some(&creds()), key).sign(SIGN);
        ureq::delete(url.as_str()).call().unwrap();
    }
}

impl Ceph {
    /// PUT `data` at the path `/BUCKET/KEY` sent exactly as given (`..` and `.` parts kept, as a
    /// client that does not remove dot segments sends it: the gateway stores the key as it is),
    /// signed with AWS Signature V4 in the Authorization header (rusty-s3 signs a URL, whose
    /// dot segments the URL parser removes).
    pub fn put_as_is(&self, bucket: &str, key: &str, data: &[u8]) {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let host = self.endpoint.strip_prefix("http://").unwrap();
        let path = format!("/{bucket}/{key}");
        let now = chrono::Utc::now();
        let (stamp, day) = (now.format("%Y%m%dT%H%M%SZ").to_string(), now.format("%Y%m%d").to_string());
        let payload = hex(&Sha256::digest(data));
        let signed = "host;x-amz-content-sha256;x-amz-date";
        let canonical = format!(
            "PUT\n{path}\n\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n\n{signed}\n{payload}"
        );
        let scope = format!("{day}/us-east-1/s3/aws4_request");
        let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut k = hmac(format!("AWS4{SECRET}").as_bytes(), day.as_bytes());
        for part in ["us-east-1", "s3", "aws4_request"] {
            k = hmac(&k, part.as_bytes());
        }
        let sig = hex(&hmac(&k, to_sign.as_bytes()));
        let mut c = std::net::TcpStream::connect(host).unwrap();
        let mut req = format!(
            "PUT {path} HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: {payload}\r\nx-amz-date: {stamp}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential={ACCESS}/{scope}, SignedHeaders={signed}, Signature={sig}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        )
        .into_bytes();
        req.extend(data);
        c.write_all(&req).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "PUT {path} as is: {answer}");
    }
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(k.map(|b| b ^ 0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(k.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

fn creds() -> Credentials {
    Credentials::new(ACCESS, SECRET)
}

/// A RADOS Gateway a test stops (SIGKILL) and starts again ([`Ceph::spare_gateway`]); killed
/// when dropped (and, as every daemon naming the cluster's ceph.conf, when the test process ends).
pub struct Gateway {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    /// Start it (in the foreground, a child of this process) and wait until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the gateway on port {} runs already", self.port);
        let (d, p) = (&self.dir, self.port);
        let child = Command::new("radosgw")
            .arg("-c")
            .arg(d.join("ceph.conf"))
            .args(["-n", "client.rgw.a", "-f"])
            .arg(format!("--rgw-frontends=beast endpoint=127.0.0.1:{p}"))
            .arg(format!("--pid-file={}", d.join(format!("run/rgw.spare{p}.pid")).display()))
            .arg(format!("--admin-socket={}", d.join(format!("run/rgw.spare{p}.asok")).display()))
            .arg(format!("--log-file={}", d.join(format!("log/rgw.spare{p}.log")).display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start radosgw: {e}"));
        self.child = Some(child);
        let t0 = Instant::now();
        let up = poll(Duration::from_secs(60), Duration::from_millis(50), || {
            ureq::get(&self.endpoint).call().ok().map(|_| ())
        });
        assert!(up.is_some(), "the spare gateway on port {p} did not answer within 60 s");
        eprintln!("ceph fixture: spare gateway on port {p} up in {:.1?}", t0.elapsed());
    }

    /// Kill it (SIGKILL: no goodbye to the clients) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}
