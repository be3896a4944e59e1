//! An ESXi job ready to run: the simulator harness with vm1 (disk 0 on datastore1, disk 1 on
//! ds2) and a second VM, the shared sshd serving the datastores at the same paths, and an affa
//! configuration whose key and certificate fingerprint `--send-key` has installed and pinned.
#![allow(dead_code)]

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::sim::{Sim, VmSpec, PASS, USER};
use super::{ok, Affa, Sshd};

pub const MB: u64 = 1 << 20;

/// A sparse file of `size` with pseudo-random data (a third of it text-like) in `regions`.
pub fn fill(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    for &(off, len) in regions {
        let mut buf = vec![0u8; len as usize];
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        for (i, b) in buf.iter_mut().enumerate().take((len / 3) as usize) {
            *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
        }
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

pub fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Esx {
    pub sshd: Sshd,
    pub affa: Affa,
    pub sim: Sim,
    pub work: tempfile::TempDir,
    pub ds1: PathBuf,
    pub ds2: PathBuf,
    pub pwfile: PathBuf,
}

impl Esx {
    /// vm1: disk 0 of `big` bytes (data at the start, middle and end), disk 1 of 4 MiB with data
    /// in `disk1_regions`; job `esx` with `extra_conf`; `sim_extra` appended to the simulator spec.
    pub fn start(big: u64, disk1_regions: &[(u64, u64)], extra_conf: &str, sim_extra: &str) -> Esx {
        Esx::start_on(Sshd::shared(), big, disk1_regions, extra_conf, sim_extra)
    }

    /// [`Esx::start`] with the test's own sshd (e.g. one that logs every login).
    pub fn start_on(mut sshd: Sshd, big: u64, disk1_regions: &[(u64, u64)], extra_conf: &str, sim_extra: &str) -> Esx {
        let work = tempfile::Builder::new().prefix("affa-esx").tempdir().unwrap();
        let ds1 = work.path().join("vmfs-ds1");
        let ds2 = work.path().join("vmfs-ds2");
        fill(&ds1.join("vm1/vm1-flat.vmdk"), big, &[(0, 2 * MB), (big / 2, 3 * MB), (big - MB, MB)], 7);
        fill(&ds2.join("vm1/vm1_1-flat.vmdk"), 4 * MB, disk1_regions, 11);
        let sim = Sim::start(
            &work.path().join("sim"),
            &[("datastore1", &ds1), ("ds2", &ds2)],
            &[
                VmSpec {
                    name: "vm1".into(),
                    power_on: true,
                    disks: vec![("datastore1".into(), big), ("ds2".into(), 4 * MB)],
                },
                VmSpec { name: "other".into(), power_on: false, disks: vec![("datastore1".into(), MB)] },
            ],
            sim_extra,
        );
        let affa = Affa::new();
        let pwfile = affa.state.join("esx.pw");
        fs::write(&pwfile, format!("{PASS}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).unwrap();
        let conf = affa.ssh_job(
            "esx",
            &sshd,
            &format!(
                "ESXi=yes\nESXiVMName=vm1\nESXiUsername={USER}\nESXiPasswordFile={}\nESXiHost=127.0.0.1\nESXiPort={}\nremoteRsyncBinary=/usr/bin/rsync\nESXiTaskTimeout=20\n{extra_conf}",
                pwfile.display(),
                sim.port
            ),
        );
        affa.write_conf("esx.conf", &conf);
        let sock = sshd.agent_socket();
        let out = affa.cmd().env("SSH_AUTH_SOCK", sock).args(["--send-key", "esx", "--yes"]).output().unwrap();
        let text = ok(&out);
        assert!(text.contains(&sim.thumbprint), "send-key must show the fingerprint: {text}");
        let conf_now = fs::read_to_string(affa.conf.join("esx.conf")).unwrap();
        assert!(conf_now.contains(&format!("ESXiThumbprint={}", sim.thumbprint)), "{conf_now}");
        Esx { sshd, affa, sim, work, ds1, ds2, pwfile }
    }

    /// The simulator's record of a VM.
    pub fn vm_state(&self, name: &str) -> serde_json::Value {
        self.sim.state()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
            .clone()
    }

    /// SHA-256 of vm1's flat disks as they were at the last snapshot.
    pub fn frozen(&self) -> Vec<String> {
        self.vm_state("vm1")["last_snapshot_base_flat_sha256"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}
