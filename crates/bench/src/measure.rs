//! Running one measured command: wall time (including a final sync, so deferred writeback is
//! charged to whoever wrote), CPU seconds and peak RSS of the local process tree (wait4), CPU
//! seconds of the remote side (the test sshd's reaped children), store size by `du` with hard
//! links counted once, and dropping files from the page cache before a run.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one measured run cost.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub wall: f64,
    pub cpu_local: f64,
    pub cpu_remote: f64,
    pub maxrss_kib: u64,
    /// Peak RSS (VmHWM) of affa-agent on the host, sampled every 50 ms during the run (0: none ran).
    pub agent_rss_kib: u64,
    /// Seconds since the epoch at spawn.
    pub start: f64,
}

/// The remote side: CPU of the sshd listener's reaped children (per-connection sshd and what
/// it ran), from /proc/PID/stat cutime + cstime.
#[derive(Clone, Copy)]
pub struct Remote(pub Option<u32>);

impl Remote {
    pub fn cpu(&self) -> f64 {
        let Some(pid) = self.0 else { return 0.0 };
        let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
        let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // after ") ": state is field 3; cutime is field 16, cstime 17 (1-based) -> index 13, 14
        let tick = rustix::param::clock_ticks_per_second() as f64;
        let cu: f64 = f.get(13).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let cs: f64 = f.get(14).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        (cu + cs) / tick
    }
}

/// The largest VmHWM (KiB) of the running processes named affa-agent (the agent sshd started
/// for affa; it is not our child, so wait4 does not see it).
fn agent_hwm() -> u64 {
    let mut best = 0;
    let Ok(rd) = fs::read_dir("/proc") else { return 0 };
    for e in rd.flatten() {
        let p = e.path();
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if fs::read_to_string(p.join("comm")).map(|c| c.trim() != "affa-agent").unwrap_or(true) {
            continue;
        }
        let st = fs::read_to_string(p.join("status")).unwrap_or_default();
        let hwm = st
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        best = best.max(hwm);
    }
    best
}

/// Samples [`agent_hwm`] every 50 ms until dropped; `peak()` is the largest value seen.
struct AgentSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentSampler {
    fn start() -> AgentSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(agent_hwm(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        AgentSampler { stop, peak, thread: Some(thread) }
    }

    fn peak(mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Run `cmd` to completion, stdout+stderr to `log`. Err(text) with the log's tail on failure.
/// With a remote side, the peak RSS of affa-agent on the host is sampled as well.
pub fn run(cmd: &mut Command, log: &Path, remote: Remote) -> Result<Cost, String> {
    let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let r0 = remote.cpu();
    let start =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let sampler = remote.0.map(|_| AgentSampler::start());
    let t = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain integers (all-zero is a valid value); wait4(2) writes `status`
    // and `ru`, both live locals, and reaps our own child `pid` (forgotten below so that std
    // does not wait for it again).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    std::mem::forget(child);
    rustix::fs::sync();
    let wall = t.elapsed().as_secs_f64();
    let agent_rss_kib = sampler.map(AgentSampler::peak).unwrap_or(0);
    // Let the sshd listener reap the connection's processes.
    let mut r1 = remote.cpu();
    if remote.0.is_some() {
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(25));
            let r = remote.cpu();
            if r == r1 {
                break;
            }
            r1 = r;
        }
    }
    if rc < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{:?} failed (status {status}); {}:\n{}",
            cmd.get_program(),
            log.display(),
            tail.join("\n")
        ));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Cost {
        wall,
        cpu_local: tv(ru.ru_utime) + tv(ru.ru_stime),
        cpu_remote: (r1 - r0).max(0.0),
        maxrss_kib: ru.ru_maxrss as u64,
        agent_rss_kib,
        start,
    })
}

/// Time an in-process action the same way (wall including a final sync; CPU from getrusage SELF).
pub fn time_self<T>(f: impl FnOnce() -> T) -> (T, Cost) {
    let self_cpu = || {
        // SAFETY: rusage is plain integers (all-zero is a valid value); getrusage(2) writes
        // only `ru`, a live local.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64)
    };
    let (c0, _) = self_cpu();
    let t = Instant::now();
    let v = f();
    rustix::fs::sync();
    let wall = t.elapsed().as_secs_f64();
    let (c1, rss) = self_cpu();
    (v, Cost { wall, cpu_local: c1 - c0, cpu_remote: 0.0, maxrss_kib: rss, agent_rss_kib: 0, start: 0.0 })
}

/// Every regular file under `p` (or `p` itself).
pub fn files(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&d) else { continue };
        if m.is_file() {
            out.push(d);
            continue;
        }
        if !m.is_dir() {
            continue;
        }
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Drop every file under `paths` from the page cache (after a sync, so the pages are clean):
/// the next read comes from the disk, as in a nightly run.
pub fn evict(paths: &[&Path]) {
    rustix::fs::sync();
    for p in paths {
        for f in files(p) {
            if let Ok(h) = File::open(&f) {
                let _ = rustix::fs::fadvise(&h, 0, None, rustix::fs::Advice::DontNeed);
            }
        }
    }
}

/// Wait until the disk holding `p` has been idle for `quiet` (no request in flight and no busy
/// time added, from /proc/diskstats), at most `max`; the time waited. Called after [`evict`]
/// before every timed backup: a virtual disk still absorbing the previous run's writes (its
/// cache, the host's throttle after a big full pass) served single 4 KiB requests in 55-83 ms
/// during the next incremental (block-layer trace, BENCHMARKS.md), which timed the device's
/// recovery, not the system under test. Every system gets the same wait. Without a device for
/// `p` in /proc/diskstats (tmpfs, overlay), no wait.
pub fn settle(p: &Path, quiet: Duration, max: Duration) -> Duration {
    let t0 = Instant::now();
    let Ok(dev) = fs::metadata(p).map(|m| m.dev()) else { return Duration::ZERO };
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sample = || -> Option<(u64, u64)> {
        let s = fs::read_to_string("/proc/diskstats").ok()?;
        s.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 13 && f[0] == major.to_string() && f[1] == minor.to_string())
                .then(|| Some((f[11].parse().ok()?, f[12].parse().ok()?)))
                .flatten()
        })
    };
    let Some(mut last) = sample() else { return Duration::ZERO };
    let mut idle_since = Instant::now();
    while t0.elapsed() < max {
        std::thread::sleep(Duration::from_millis(100));
        let Some(now) = sample() else { break };
        if now.0 != 0 || now.1 != last.1 {
            idle_since = Instant::now();
        }
        last = now;
        if idle_since.elapsed() >= quiet {
            break;
        }
    }
    t0.elapsed()
}

/// The probe file of [`probe_write`], in the bench's data directory (never in a directory a
/// system under test backs up).
const PROBE: &str = ".bench-latency-probe";

/// The time of one synchronous 4 KiB write (write + fdatasync of a probe file in `dir`).
fn probe_write(dir: &Path) -> Option<Duration> {
    use std::io::Write;
    let p = dir.join(PROBE);
    let t = Instant::now();
    let mut f = fs::OpenOptions::new().create(true).write(true).truncate(false).open(&p).ok()?;
    f.write_all(&[0x5a; 4096]).ok()?;
    f.sync_data().ok()?;
    Some(t.elapsed())
}

/// The disk's normal latency for [`recovered`]: the fastest of 8 probe writes, taken at the
/// start of the bench, before any image is written.
pub fn latency_baseline(dir: &Path) -> Duration {
    let min = (0..8).filter_map(|_| probe_write(dir)).min().unwrap_or(Duration::from_millis(1));
    let _ = fs::remove_file(dir.join(PROBE));
    min
}

/// Wait until synchronous writes on the disk of `dir` are back to normal: 4 probe writes in a
/// row, 250 ms apart, each within 3x `baseline` (at least 3 ms); at most `max`; the time
/// waited. Why: after the 16 GiB full pass (7.3 GB written) this machine's virtual disk looked
/// idle to the guest but answered with 4-8x its usual write latency for about 40 s (per-run
/// /proc/diskstats, 2026-12-02 04:28: the first five 16 GiB incrementals 1.9-2.3 s with writes
/// at 2.3-4.3 ms, the next two 1.33-1.37 s with writes at 0.3-0.4 ms, the 4 GiB ones 1.31-1.44 s):
/// a nightly incremental runs a day after the previous backup, not on a disk still flushing it.
pub fn recovered(dir: &Path, baseline: Duration, max: Duration) -> Duration {
    let t0 = Instant::now();
    let limit = (baseline * 3).max(Duration::from_millis(3));
    let mut good = 0;
    while t0.elapsed() < max && good < 4 {
        match probe_write(dir) {
            Some(d) if d <= limit => good += 1,
            Some(_) => good = 0,
            None => break,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = fs::remove_file(dir.join(PROBE));
    t0.elapsed()
}

/// Allocated bytes under `p`, every inode counted once (du), directories included.
pub fn du(p: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&d) else { continue };
        if seen.insert((m.dev(), m.ino())) {
            total += m.blocks() * 512;
        }
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    stack.push(e.path());
                }
            }
        }
    }
    total
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Allocated bytes of the directories and of the files without other hard links under `p`
/// (an archive's own metadata: manifests, fan-out directories of chunk links, small files).
pub fn meta_du(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&d) else { continue };
        if m.is_dir() {
            total += m.blocks() * 512;
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    stack.push(e.path());
                }
            }
        } else if m.nlink() == 1 {
            total += m.blocks() * 512;
        }
    }
    total
}

/// Read a whole file (cold: evicted first), return bytes/s.
pub fn read_speed(p: &Path) -> std::io::Result<f64> {
    evict(&[p]);
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
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// BLAKE3 of a file.
pub fn hash(p: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let f = File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = std::io::Read::read(&mut &f, &mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(h.finalize().to_hex().to_string())
}
