//! The ESXi simulator harness (harness/esxi-sim: govmomi's simulator plus delta disks on
//! snapshot, a "running VM" writer, faults, a control API), started per test. Its datastores are
//! directories in the test's temp dir, which the test sshd serves at the same absolute paths,
//! exactly as an ESXi host serves /vmfs/volumes over ssh.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

pub const USER: &str = "affa";
/// XML-special characters on purpose: the SOAP client must escape them.
pub const PASS: &str = "s3cret&<pw>";

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("harness/esxi-sim")
}

fn newest_source(dir: &Path) -> SystemTime {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "go"))
                .filter_map(|e| e.metadata().ok()?.modified().ok())
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The simulator binary, built (once per test binary) if missing or older than its sources.
pub fn sim_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = harness_dir();
        let bin = dir.join("esxi-sim");
        let fresh =
            std::fs::metadata(&bin).and_then(|m| m.modified()).map(|t| t >= newest_source(&dir)).unwrap_or(false);
        if fresh {
            return Ok(bin);
        }
        // Build to a private name, then rename: several test binaries may build at once.
        let tmp = format!("esxi-sim.build-{}", std::process::id());
        let out = Command::new("go")
            .args(["build", "-o", &tmp, "."])
            .current_dir(&dir)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .output()
            .map_err(|e| {
                format!(
                    "cannot run `go build` in {} ({e}); install golang-go and golang-github-vmware-govmomi-dev",
                    dir.display()
                )
            })?;
        if !out.status.success() {
            return Err(format!("building {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::rename(dir.join(&tmp), &bin).map_err(|e| e.to_string())?;
        Ok(bin)
    })
    .clone()
    .unwrap_or_else(|e| panic!("ESXi simulator unavailable: {e}"))
}

/// A running simulator; it exits when dropped.
pub struct Sim {
    child: Child,
    stdin: Option<ChildStdin>,
    pub dir: PathBuf,
    pub port: u16,
    pub thumbprint: String,
    pub control: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_str(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad start line {line}: {e}"));
    v[key].as_str().unwrap_or("").to_string()
}

/// A VM of the spec: name, power, disks as (datastore, size).
pub struct VmSpec {
    pub name: String,
    pub power_on: bool,
    pub disks: Vec<(String, u64)>,
}

impl Sim {
    /// Start with datastores (name, dir) and VMs; `extra` is appended to the JSON spec
    /// (e.g. `,"free_license":true`).
    pub fn start(work: &Path, datastores: &[(&str, &Path)], vms: &[VmSpec], extra: &str) -> Sim {
        let bin = sim_binary();
        std::fs::create_dir_all(work).unwrap();
        let ds: Vec<String> =
            datastores.iter().map(|(n, d)| format!(r#"{{"name":"{n}","dir":"{}"}}"#, d.display())).collect();
        let vm: Vec<String> = vms
            .iter()
            .map(|v| {
                let disks: Vec<String> =
                    v.disks.iter().map(|(d, s)| format!(r#"{{"datastore":"{d}","size_bytes":{s}}}"#)).collect();
                format!(
                    r#"{{"name":"{}","power_on":{},"disks":[{}],"no_tools":false}}"#,
                    v.name,
                    v.power_on,
                    disks.join(",")
                )
            })
            .collect();
        let spec = format!(
            r#"{{"user":"{USER}","password":"{PASS}","hash_on_snapshot":true,"datastores":[{}],"vms":[{}]{extra}}}"#,
            ds.join(","),
            vm.join(",")
        );
        let spec_path = work.join("spec.json");
        std::fs::write(&spec_path, spec).unwrap();
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&spec_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(work.join("sim.log")).unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            let _ = child.kill();
            panic!(
                "esxi-sim printed no start line; its log:\n{}",
                std::fs::read_to_string(work.join("sim.log")).unwrap_or_default()
            );
        }
        let url = json_str(&line, "url");
        let port: u16 = url.rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap();
        Sim {
            child,
            stdin,
            dir: work.to_path_buf(),
            port,
            thumbprint: json_str(&line, "thumbprint"),
            control: json_str(&line, "control"),
        }
    }

    pub fn post(&self, path_query: &str) -> String {
        ureq::post(&format!("{}{path_query}", self.control))
            .send_string("")
            .unwrap_or_else(|e| panic!("control {path_query}: {e}"))
            .into_string()
            .unwrap()
    }

    pub fn post_bytes(&self, path_query: &str, body: &[u8]) -> String {
        ureq::post(&format!("{}{path_query}", self.control))
            .send_bytes(body)
            .unwrap_or_else(|e| panic!("control {path_query}: {e}"))
            .into_string()
            .unwrap()
    }

    pub fn state(&self) -> serde_json::Value {
        let s = ureq::get(&format!("{}/state", self.control)).call().unwrap().into_string().unwrap();
        serde_json::from_str(&s).unwrap()
    }

    /// Names of the snapshots of a VM.
    pub fn snapshots(&self, vm: &str) -> Vec<String> {
        let st = self.state();
        let mut out = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            if let Some(a) = v.as_array() {
                for s in a {
                    if let Some(n) = s["name"].as_str() {
                        out.push(n.to_string());
                    }
                    walk(&s["children"], out);
                }
            }
        }
        for v in st["vms"].as_array().unwrap() {
            if v["name"] == vm {
                walk(&v["snapshots"], &mut out);
            }
        }
        out
    }
}
