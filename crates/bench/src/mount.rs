//! Reading a chunked disk through `affa --mount` (issue 16): a sequential read of the whole file
//! and random 4 KiB reads at seeded offsets (latency of each), on a fresh mount.
//!
//! Owns: mounting one archive of a job in a directory of the data dir (`affa --mount JOB ARCHIVE
//! DIR`, which returns once the mount is up) and unmounting it when dropped (`affa --umount`),
//! and the two read patterns. Must never: write through the mount, or leave a mount behind
//! (the drop unmounts, also on an error).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use crate::env::AffaConf;
use crate::gen::Rng;

/// One archive mounted; unmounted when dropped.
pub struct Mounted<'a> {
    affa: &'a AffaConf,
    pub dir: PathBuf,
}

impl<'a> Mounted<'a> {
    pub fn new(affa: &'a AffaConf, job: &str, archive: &str, dir: &Path) -> Result<Mounted<'a>, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let out = affa
            .cmd()
            .args(["--mount", job, archive])
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("affa --mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "affa --mount {job} {archive} {} failed: {}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Mounted { affa, dir: dir.to_path_buf() })
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = self.affa.cmd().arg("--umount").arg(&self.dir).stdin(Stdio::null()).output();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Read `p` from start to end in 1 MiB reads; returns (seconds, bytes).
pub fn sequential(p: &Path) -> std::io::Result<(f64, u64)> {
    let f = File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut n = 0u64;
    loop {
        let k = std::io::Read::read(&mut &f, &mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok((t.elapsed().as_secs_f64(), n))
}

/// The offsets of `count` random 4 KiB-aligned reads in a file of `size` bytes (seeded).
pub fn offsets(size: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut r = Rng::new(seed);
    let blocks = (size / 4096).max(1);
    (0..count).map(|_| r.below(blocks) * 4096).collect()
}

/// One 4 KiB pread at each offset, in order; the latency of each in seconds.
pub fn random_reads(p: &Path, offs: &[u64]) -> std::io::Result<Vec<f64>> {
    let f = File::open(p)?;
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::with_capacity(offs.len());
    for &o in offs {
        let t = Instant::now();
        f.read_exact_at(&mut buf, o)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok(lat)
}

/// The `q`-quantile (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}
