//! The offsite rows (issue 19): a throwaway single-node Ceph with its RADOS Gateway (S3) that the
//! bench starts itself (`ceph_up.sh`, copied from the tests' fixture), and the three ways of
//! getting a backup there, measured on the same gateway: `affa --offsite` of the agent system's
//! archives (encrypted chunks, only what the bucket lacks), `restic backup` of the VM directory
//! to an s3 repository, and `rclone sync` of affa's pool directory. Then restores from the
//! bucket: `affa --unchunk JOB DATE --from-offsite --to DIR` against `restic restore`.
//!
//! Owns: the gateway's lifetime (a supervising `sh` whose stdin only the bench holds: when the
//! bench ends, however it ends, every daemon is killed and the cluster dir removed), the bench's
//! S3 user, the buckets (one per tool), and the byte counts read from the gateway
//! (`radosgw-admin bucket stats`: what the bucket holds; `radosgw-admin usage show`: the bytes the
//! gateway received and sent, and the requests, per bucket). Must never: touch the machine's own
//! Ceph, leave a daemon behind, or report a figure the gateway did not give (a missing count is
//! shown as missing).

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::free_port;
use crate::measure::{self, Cost, Remote};

pub const ACCESS: &str = "BENCHACCESS";
pub const SECRET: &str = "BENCHSECRET";

/// What the offsite phase needs besides the bench's other tools: (package, a file it installs).
pub const NEEDS: &[(&str, &str)] = &[
    ("ceph-mon", "/usr/bin/ceph-mon"),
    ("ceph-mgr", "/usr/bin/ceph-mgr"),
    ("ceph-osd", "/usr/bin/ceph-osd"),
    ("radosgw", "/usr/bin/radosgw"),
    ("ceph-common", "/usr/bin/radosgw-admin"),
    ("rclone", "/usr/bin/rclone"),
];

/// Stop with the apt-get line when something the offsite phase needs is missing.
pub fn check_prerequisites() -> Result<(), String> {
    crate::env::check_packages(NEEDS, "the offsite phase needs", "or skip the phase with --skip offsite ")
}

/// The single-node Ceph and its gateway; stopped (every daemon killed, the dir removed) when
/// dropped.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub started_in: f64,
    dir: PathBuf,
    sh: Child,
    stdin: Option<ChildStdin>,
}

impl Gateway {
    /// Start the cluster in `dir` (removed first) with a bluestore OSD on a sparse file of
    /// `block` bytes.
    pub fn start(dir: &Path, block: u64) -> Result<Gateway, String> {
        let t0 = Instant::now();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let script = dir.join("ceph_up.sh");
        fs::write(&script, include_str!("ceph_up.sh")).map_err(|e| e.to_string())?;
        let d = dir.join("c");
        let (mon, rgw) = (free_port(), free_port());
        let uuid = || fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default().trim().to_string();
        let log = dir.join("up.log");
        let out = fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut c = Command::new("/bin/sh");
        c.arg(&script)
            .arg(&d)
            .arg(mon.to_string())
            .arg(rgw.to_string())
            .arg(uuid())
            .arg(uuid())
            .arg(block.to_string())
            .stdin(Stdio::piped())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .process_group(0);
        let mut sh = c.spawn().map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdin = sh.stdin.take();
        let mut g = Gateway { endpoint: format!("http://127.0.0.1:{rgw}"), started_in: 0.0, dir: d.clone(), sh, stdin };
        let why = |what: &str| {
            format!(
                "the bench's Ceph cluster {what}: {}{}",
                fs::read_to_string(&log).unwrap_or_default(),
                fs::read_to_string(d.join("log/setup.log")).unwrap_or_default()
            )
        };
        loop {
            if d.join("ready").exists() {
                break;
            }
            if d.join("failed").exists() {
                return Err(why("did not start"));
            }
            if t0.elapsed() > Duration::from_secs(180) {
                return Err(why("was not up after 180 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The gateway answering (an anonymous GET of the service: 200 with an empty bucket list).
        let addr = format!("127.0.0.1:{rgw}");
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(240) {
                return Err(why("gateway did not answer"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        g.started_in = t0.elapsed().as_secs_f64();
        Ok(g)
    }

    fn admin(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("radosgw-admin")
            .arg("-c")
            .arg(self.dir.join("ceph.conf"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run radosgw-admin: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "radosgw-admin {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `bucket` holds: (bytes, objects) of its `rgw.main` usage (`radosgw-admin bucket
    /// stats`; a bucket without objects has none: 0, 0).
    pub fn bucket_stats(&self, bucket: &str) -> Result<(u64, u64), String> {
        let text = self.admin(&["bucket", "stats", &format!("--bucket={bucket}")])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("radosgw-admin bucket stats {bucket}: {e}: {text}"))?;
        let main = &v["usage"]["rgw.main"];
        Ok((main["size"].as_u64().unwrap_or(0), main["num_objects"].as_u64().unwrap_or(0)))
    }

    /// The gateway's usage log for `bucket`, summed over every category and hour: (bytes it
    /// received, bytes it sent, requests). Flushed every second (ceph_up.sh): read until two
    /// reads 1.5 s apart agree.
    pub fn usage(&self, bucket: &str) -> Result<(u64, u64, u64), String> {
        let read = || -> Result<(u64, u64, u64), String> {
            let text = self.admin(&["usage", "show", "--uid=bench", "--show-log-sum=false"])?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("radosgw-admin usage show: {e}: {text}"))?;
            let (mut rx, mut tx, mut ops) = (0, 0, 0);
            for e in v["entries"].as_array().into_iter().flatten() {
                for b in e["buckets"].as_array().into_iter().flatten() {
                    if b["bucket"].as_str() != Some(bucket) {
                        continue;
                    }
                    for c in b["categories"].as_array().into_iter().flatten() {
                        rx += c["bytes_received"].as_u64().unwrap_or(0);
                        tx += c["bytes_sent"].as_u64().unwrap_or(0);
                        ops += c["ops"].as_u64().unwrap_or(0);
                    }
                }
            }
            Ok((rx, tx, ops))
        };
        let mut last = read()?;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1500));
            let now = read()?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// The env of rclone's remote `bench:` (an s3 remote on this gateway, from environment
    /// variables only: no config file is read or written).
    pub fn rclone_env(&self, c: &mut Command, cfg: &Path) {
        // An AWS_CA_BUNDLE of the environment makes rclone's S3 client fail before any request
        // ("unable to load custom CA bundle"); the gateway is plain http on 127.0.0.1.
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", cfg)
            .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
            .env("RCLONE_CONFIG_BENCH_PROVIDER", "Ceph")
            .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", ACCESS)
            .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET)
            .env("RCLONE_CONFIG_BENCH_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1");
    }

    /// restic's s3 backend on this gateway.
    pub fn restic_env(&self, c: &mut Command) {
        c.env_remove("AWS_CA_BUNDLE")
            .env("AWS_ACCESS_KEY_ID", ACCESS)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_DEFAULT_REGION", "us-east-1");
    }

    /// A new empty bucket (through rclone; not timed).
    pub fn make_bucket(&self, bucket: &str, work: &Path) -> Result<(), String> {
        let mut c = Command::new("rclone");
        c.args(["mkdir", &format!("bench:{bucket}")]);
        self.rclone_env(&mut c, &work.join("rclone.conf"));
        measure::run(&mut c, &work.join(format!("mkbucket-{bucket}.log")), Remote(None)).map(|_| ())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // End of file on the script's stdin: it kills every daemon and removes the cluster dir.
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let _ = self.sh.wait();
    }
}

/// One measured upload or restore against the gateway: the cost, and what the gateway counted.
pub struct Moved {
    pub cost: Cost,
    /// Growth of the bucket's stored bytes and objects (`bucket stats`).
    pub stored: i64,
    pub objects: i64,
    /// Bytes the gateway received and sent, requests (usage log; None when it gave none).
    pub received: Option<u64>,
    pub sent: Option<u64>,
    pub requests: Option<u64>,
}

impl Moved {
    pub fn extra(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("bucket_bytes_added".into(), self.stored as f64),
            ("bucket_objects_added".into(), self.objects as f64),
        ];
        for (k, x) in [
            ("gateway_bytes_received", self.received),
            ("gateway_bytes_sent", self.sent),
            ("gateway_requests", self.requests),
        ] {
            if let Some(x) = x {
                v.push((k.to_string(), x as f64));
            }
        }
        v
    }
}

/// Run `c` (log to `log`), measuring what bucket `bucket` got and what the gateway counted.
pub fn measured(g: &Gateway, bucket: &str, c: &mut Command, log: &Path) -> Result<Moved, String> {
    let (b0, o0) = g.bucket_stats(bucket)?;
    let u0 = g.usage(bucket).ok();
    let cost = measure::run(c, log, Remote(None))?;
    let (b1, o1) = g.bucket_stats(bucket)?;
    let u1 = g.usage(bucket).ok();
    let d = |f: fn(&(u64, u64, u64)) -> u64| match (&u0, &u1) {
        (Some(a), Some(b)) => Some(f(b).saturating_sub(f(a))),
        _ => None,
    };
    Ok(Moved {
        cost,
        stored: b1 as i64 - b0 as i64,
        objects: o1 as i64 - o0 as i64,
        received: d(|u| u.0),
        sent: d(|u| u.1),
        requests: d(|u| u.2),
    })
}
