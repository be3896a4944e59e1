//! The results: every measured run, their medians, the targets, BENCHMARKS.md and
//! benchmarks.json.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::gen::Composition;
use crate::json::J;
use crate::measure::{median, Cost};
use crate::systems::{human_cs, Backup};
use crate::{human, Args};

/// The CBT row's id (issue 14's targets).
const CBT: &str = "agentcbt";

/// Kept across runs: everything in BENCHMARKS.md after this line is hand-written analysis.
pub const ANALYSIS_MARK: &str =
    "<!-- analysis: everything below this line is kept when affa-bench rewrites the file -->";

#[derive(Clone, Debug, Default)]
pub struct Rec {
    pub phase: String,
    pub system: String,
    pub rep: u32,
    pub vm: String,
    pub disk: u64,
    pub cost: Cost,
    pub bytes_ssh: Option<u64>,
    pub growth: Option<i64>,
    pub store_after: Option<u64>,
    pub extra: Vec<(String, f64)>,
    pub verified: Option<bool>,
}

impl Rec {
    pub fn new(phase: &str, system: &str, rep: u32, vm: &str, disk: u64) -> Rec {
        Rec { phase: phase.into(), system: system.into(), rep, vm: vm.into(), disk, ..Default::default() }
    }
    pub fn ceiling(phase: &str, rep: u32, wall: f64, disk: u64) -> Rec {
        let mut r = Rec::new(phase, "ceiling", rep, "vm1", disk);
        r.cost.wall = wall;
        r
    }
    pub fn backup(phase: &str, system: &str, rep: u32, vm: &str, disk: u64, b: &Backup) -> Rec {
        let mut r = Rec::new(phase, system, rep, vm, disk);
        r.cost = b.cost.clone();
        r.bytes_ssh = b.bytes_ssh;
        r.growth = Some(b.growth);
        r.store_after = Some(b.store_after);
        r.extra = b.extra.clone();
        r
    }
    fn json(&self) -> J {
        let mut o = J::obj();
        o.set("phase", self.phase.as_str())
            .set("system", self.system.as_str())
            .set("rep", self.rep)
            .set("vm", self.vm.as_str())
            .set("disk_bytes", self.disk)
            .set("wall_s", self.cost.wall)
            .set("cpu_local_s", self.cost.cpu_local)
            .set("cpu_remote_s", self.cost.cpu_remote)
            .set("peak_rss_kib", self.cost.maxrss_kib)
            .set("agent_peak_rss_kib", self.cost.agent_rss_kib)
            .set("bytes_over_ssh", self.bytes_ssh)
            .set("store_growth_bytes", self.growth)
            .set("store_after_bytes", self.store_after)
            .set("verified", self.verified);
        for (k, v) in &self.extra {
            o.set(k, *v);
        }
        o
    }
}

/// Medians of one (phase, system).
#[derive(Clone, Debug)]
pub struct Sum {
    pub n: usize,
    pub wall: f64,
    pub cpu: f64,
    pub cpu_remote: f64,
    pub rss_kib: u64,
    /// The largest sampled peak RSS of affa-agent on the host (0: no agent ran).
    pub agent_rss_kib: u64,
    pub bytes: Option<f64>,
    pub growth: Option<f64>,
    pub store_last: Option<u64>,
    pub disk: u64,
    pub staging: Option<f64>,
}

pub struct Machine {
    pub nproc: usize,
    pub mem: String,
    pub cpu: String,
    pub kernel: String,
    pub disk: String,
    pub load_start: String,
    pub load_end: String,
    pub date_start: String,
    pub date_end: String,
}

pub struct Results {
    pub cmdline: String,
    pub size: u64,
    pub nsize: u64,
    pub msize: u64,
    pub default_cs: u64,
    pub study: Vec<u64>,
    pub reps: u32,
    pub nights: u32,
    pub seed: u64,
    pub systems: Vec<(String, String, bool)>,
    pub recs: Vec<Rec>,
    pub composition: Option<Composition>,
    pub changed: Vec<(String, u32, u64)>,
    pub compressed_full: Option<(u64, f64)>,
    pub nightly_compressed: Option<(u64, f64)>,
    pub nightly_final: Vec<(String, u64, u64)>,
    pub store_sizes_a: Vec<(String, u64)>,
    pub machine: Machine,
    pub tools: Vec<(String, String)>,
    pub total_wall: f64,
    /// Scenarios that failed (their rows are missing).
    pub errors: Vec<String>,
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// zstd -1 size of a file (the "one compressed full copy").
pub fn zstd1_size(p: &Path) -> std::io::Result<u64> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut enc = zstd::stream::write::Encoder::new(Count(0), 1)?;
    let mut f = File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut enc, &buf[..n])?;
    }
    Ok(enc.finish()?.0)
}

fn mb(b: f64) -> String {
    if b.abs() >= 100e6 {
        format!("{:.0}", b / 1e6)
    } else if b.abs() >= 10e6 {
        format!("{:.1}", b / 1e6)
    } else {
        format!("{:.2}", b / 1e6)
    }
}

/// Peak RSS in MiB: the largest local process, and the agent on the host where one ran.
fn rss_txt(s: &Sum) -> String {
    if s.agent_rss_kib > 0 {
        format!("{} + agent {}", s.rss_kib / 1024, s.agent_rss_kib / 1024)
    } else {
        format!("{}", s.rss_kib / 1024)
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

impl Results {
    #[allow(clippy::too_many_arguments)]
    pub fn new(args: &Args, size: u64, nsize: u64, msize: u64, default_cs: u64, study: &[u64], data: &Path) -> Results {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let cmdline = format!("cargo run --release -p affa-bench --bin affa-bench -- {}", argv.join(" "));
        let mut tools = vec![
            (
                "affa".to_string(),
                match &args.affa_bin {
                    Some(p) => format!(
                        "{} (binary given with --affa-bin: {})",
                        crate::env::version_of(&p.display().to_string(), &["--version"]),
                        p.display()
                    ),
                    None => format!(
                        "{} (built from git {})",
                        env!("CARGO_PKG_VERSION"),
                        sh(&format!(
                            "git -C {} describe --always --dirty 2>/dev/null",
                            crate::env::manifest_dir().display()
                        ))
                    ),
                },
            ),
            (
                "affa-bench".to_string(),
                format!(
                    "git {}",
                    sh(&format!(
                        "git -C {} describe --always --dirty 2>/dev/null",
                        crate::env::manifest_dir().display()
                    ))
                ),
            ),
            ("rsync".into(), crate::env::version_of("rsync", &["--version"])),
            ("ssh".into(), crate::env::version_of("ssh", &["-V"])),
            ("borg".into(), crate::env::version_of("borg", &["--version"])),
            ("restic".into(), crate::env::version_of("restic", &["version"])),
            ("rclone (offsite)".into(), crate::env::version_of("rclone", &["version"])),
            ("ceph (offsite)".into(), crate::env::version_of("ceph", &["--version"])),
            ("go (simulator)".into(), crate::env::version_of("go", &["version"])),
            ("rustc".into(), crate::env::version_of("rustc", &["--version"])),
        ];
        tools.push((
            "govmomi (simulator)".into(),
            sh("dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null"),
        ));
        let disk = sh(&format!(
            "df -hT {} | tail -1 | awk '{{print $1\" \"$2\", \"$3\" total, \"$5\" free\"}}'",
            data.display()
        ));
        let machine = Machine {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            mem: sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo"),
            cpu: sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            kernel: sh("uname -r"),
            disk,
            load_start: String::new(),
            load_end: String::new(),
            date_start: String::new(),
            date_end: String::new(),
        };
        Results {
            cmdline,
            size,
            nsize,
            msize,
            default_cs,
            study: study.to_vec(),
            reps: args.reps,
            nights: args.nights,
            seed: args.seed,
            systems: Vec::new(),
            recs: Vec::new(),
            composition: None,
            changed: Vec::new(),
            compressed_full: None,
            nightly_compressed: None,
            nightly_final: Vec::new(),
            store_sizes_a: Vec::new(),
            machine,
            tools,
            total_wall: 0.0,
            errors: Vec::new(),
        }
    }

    pub fn machine_start(&mut self) {
        self.machine.load_start = sh("uptime");
        self.machine.date_start = sh("date -u '+%Y-%m-%d %H:%M:%S UTC'");
    }
    pub fn machine_end(&mut self) {
        self.machine.load_end = sh("uptime");
        self.machine.date_end = sh("date -u '+%Y-%m-%d %H:%M:%S UTC'");
    }

    pub fn add(&mut self, r: Rec) {
        self.recs.push(r);
    }

    fn label(&self, id: &str) -> String {
        self.systems.iter().find(|s| s.0 == id).map(|s| s.1.clone()).unwrap_or(id.to_string())
    }

    fn main_ids(&self) -> Vec<String> {
        self.systems.iter().filter(|s| !s.2).map(|s| s.0.clone()).collect()
    }

    pub fn chunk_id(cs: u64) -> String {
        format!("chunk{}", human_cs(cs).to_lowercase())
    }

    /// The main affa row: chunked through the agent.
    fn def(&self) -> String {
        "agent".into()
    }

    pub fn sum_where(&self, phase: &str, sys: &str, pred: impl Fn(&Rec) -> bool) -> Option<Sum> {
        let rs: Vec<&Rec> = self.recs.iter().filter(|r| r.phase == phase && r.system == sys && pred(r)).collect();
        if rs.is_empty() {
            return None;
        }
        let med = |f: &dyn Fn(&Rec) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).collect();
            if v.is_empty() {
                None
            } else {
                Some(median(&v))
            }
        };
        Some(Sum {
            n: rs.len(),
            wall: med(&|r| Some(r.cost.wall)).unwrap(),
            cpu: med(&|r| Some(r.cost.cpu_local + r.cost.cpu_remote)).unwrap(),
            cpu_remote: med(&|r| Some(r.cost.cpu_remote)).unwrap(),
            rss_kib: rs.iter().map(|r| r.cost.maxrss_kib).max().unwrap_or(0),
            agent_rss_kib: rs.iter().map(|r| r.cost.agent_rss_kib).max().unwrap_or(0),
            bytes: med(&|r| r.bytes_ssh.map(|b| b as f64)),
            growth: med(&|r| r.growth.map(|g| g as f64)),
            store_last: rs.last().and_then(|r| r.store_after),
            disk: rs[0].disk,
            staging: med(&|r| r.extra.iter().find(|(k, _)| k == "staging_bytes").map(|(_, v)| *v)),
        })
    }

    /// Median of an extra figure of (phase, system).
    pub fn extra_med(&self, phase: &str, sys: &str, key: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .recs
            .iter()
            .filter(|r| r.phase == phase && r.system == sys && (phase != "nightly" || r.rep > 0))
            .filter_map(|r| r.extra.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
            .collect();
        if v.is_empty() {
            None
        } else {
            Some(median(&v))
        }
    }

    pub fn sum(&self, phase: &str, sys: &str) -> Option<Sum> {
        self.sum_where(phase, sys, |_| true)
    }

    fn ceiling(&self, phase: &str) -> Option<f64> {
        let v: Vec<f64> = self.recs.iter().filter(|r| r.phase == phase).map(|r| r.cost.wall).collect();
        if v.is_empty() {
            None
        } else {
            Some(median(&v))
        }
    }

    fn nights(&self, sys: &str) -> Option<Sum> {
        self.sum_where("nightly", sys, |r| r.rep > 0)
    }

    fn nightly_store(&self, sys: &str) -> Option<(u64, u64)> {
        self.nightly_final.iter().find(|x| x.0 == sys).map(|x| (x.1, x.2))
    }

    /// Where a backup's time and bytes went, measured: wall split by the timed rsync wrapper,
    /// CPU local/remote, bytes over ssh, what the agent read, what the pool got.
    fn why_backup(&self, phase: &str, sys: &str) -> String {
        let Some(s) = (if phase == "nightly" { self.nights(sys) } else { self.sum(phase, sys) }) else {
            return String::new();
        };
        let e = |k: &str| self.extra_med(phase, sys, k);
        let mut t = format!("{sys}: {:.1} s", s.wall);
        if let (Some(b), Some(r), Some(a)) = (e("before_first_rsync_s"), e("rsync_s"), e("after_last_rsync_s")) {
            t.push_str(&format!(
                " = {b:.1} s before the first rsync (check, vSphere login, snapshot) + {r:.1} s in rsync + {:.1} s between ({}snapshot removal) + {a:.1} s after",
                (s.wall - b - r - a).max(0.0),
                if sys.starts_with("agent") { "agent transfer, chunking, " } else { "chunking, " }
            ));
        }
        t.push_str(&format!(", CPU {:.1} s local + {:.1} s remote", s.cpu - s.cpu_remote, s.cpu_remote));
        if let Some(b) = s.bytes {
            t.push_str(&format!(", {} MB over ssh", mb(b)));
        }
        if let Some(r) = e("agent_source_read") {
            t.push_str(&format!(", the agent read {} MB on the host", mb(r)));
        }
        if let Some(p) = e("pool_bytes_added") {
            t.push_str(&format!(", {} MB added to the pool", mb(p)));
        }
        if let Some(m) = e("archive_meta_bytes") {
            t.push_str(&format!(", archive metadata {} MB", mb(m)));
        }
        t
    }

    fn why_other(&self, phase: &str, sys: &str) -> String {
        let Some(s) = (if phase == "nightly" { self.nights(sys) } else { self.sum(phase, sys) }) else {
            return String::new();
        };
        format!("{sys}: {:.1} s, CPU {:.1} s, reads the image locally", s.wall, s.cpu)
    }

    /// The targets of issues 13 and 16, for the agent row: (target, measured, met, cause of a miss).
    pub fn targets(&self) -> Vec<(String, String, Option<bool>, String)> {
        let mut t = Vec::new();
        let d = self.def();
        let size = self.size as f64;
        let cause = |met: bool, how: String| if met { String::new() } else { how };
        let store_of = |phase: &str, sys: &str| -> Option<f64> {
            match phase {
                "full" => self.sum("full", sys)?.store_last.map(|x| x as f64),
                "nightly" => self.nightly_store(sys).map(|x| x.0 as f64),
                _ => self.sum(phase, sys)?.growth,
            }
        };
        // Wall against borg's.
        for (phase, what, bound) in [("full", "full backup", 0.7), ("clustered", "1% clustered incremental", 0.5)] {
            if let (Some(a), Some(b)) = (self.sum(phase, &d), self.sum(phase, "borg")) {
                let x = a.wall / b.wall;
                let met = x <= bound;
                t.push((
                    format!("{what}: wall <= {bound}x borg's"),
                    format!("{:.1} s vs {:.1} s = {x:.2}x", a.wall, b.wall),
                    Some(met),
                    cause(met, format!("{}; {}", self.why_backup(phase, &d), self.why_other(phase, "borg"))),
                ));
            }
        }
        // Store against borg's and restic's.
        for (phase, what, kind, others) in [
            ("full", "full backup", "store", &["borg"][..]),
            ("clustered", "1% clustered incremental", "store growth", &["borg", "restic"][..]),
            ("nightly", "nights of 0.5%", "store after the last night", &["borg", "restic"][..]),
        ] {
            let what = if phase == "nightly" { format!("{} {what}", self.nights) } else { what.to_string() };
            let Some(mine) = store_of(phase, &d) else { continue };
            for other in others {
                let Some(theirs) = store_of(phase, other) else { continue };
                let met = mine <= theirs;
                t.push((
                    format!("{what}: {kind} <= {other}'s"),
                    format!("{} MB vs {} MB = {:.2}x", mb(mine), mb(theirs), mine / theirs),
                    Some(met),
                    cause(
                        met,
                        format!(
                            "{} MB more; {}",
                            mb(mine - theirs),
                            if phase == "full" || phase == "clustered" {
                                self.why_backup(phase, &d)
                            } else {
                                format!(
                                    "median growth per night {} MB vs {} MB",
                                    self.nights(&d).and_then(|n| n.growth).map(mb).unwrap_or("-".into()),
                                    self.nights(other).and_then(|n| n.growth).map(mb).unwrap_or("-".into())
                                )
                            }
                        ),
                    ),
                ));
            }
        }
        // Restore to the host through the agent.
        if let (Some(r), Some(cat)) = (self.sum("restore-host", &d), self.ceiling("ssh-cat-write")) {
            let x = cat / r.wall;
            let met = x >= 0.8;
            t.push((
                "restore to the host through the agent, new target: speed >= 0.8x `ssh HOST 'cat > file'`".into(),
                format!("{:.0} MB/s vs {:.0} MB/s = {x:.2}x", size / r.wall / 1e6, size / cat / 1e6),
                Some(met),
                cause(
                    met,
                    format!(
                        "{:.1} s vs {:.1} s; affa CPU {:.1} s local + {:.1} s remote, {} MB of chunks sent{}",
                        r.wall,
                        cat,
                        r.cpu - r.cpu_remote,
                        r.cpu_remote,
                        r.bytes.map(mb).unwrap_or("-".into()),
                        self.restore_split("restore-host", &d)
                    ),
                ),
            ));
        }
        if let Some(r) = self.sum("restore-host-1pct", &d) {
            let sent = r.bytes.unwrap_or(f64::NAN);
            let pct = sent / size * 100.0;
            let met = pct <= 2.0;
            t.push((
                "restore over a target differing by 1%: bytes sent <= 2% of the disk".into(),
                format!("{} MB = {pct:.2}% ({:.1} s)", mb(sent), r.wall),
                Some(met),
                cause(met, format!("{} MB of chunks sent{}", mb(sent), self.restore_split("restore-host-1pct", &d))),
            ));
        }
        t.extend(self.cbt_targets());
        // Memory: affa (largest local process) + the agent on the host.
        let rss = |phases: &[&str]| {
            self.recs
                .iter()
                .filter(|r| r.system == d && phases.contains(&r.phase.as_str()))
                .map(|r| (r.cost.maxrss_kib + r.cost.agent_rss_kib, r.cost.maxrss_kib, r.cost.agent_rss_kib))
                .max()
        };
        for (phases, disk) in [
            (
                &["full", "clustered", "scattered", "clone", "restore", "restore-host", "restore-host-1pct"][..],
                self.size,
            ),
            (&["memory-full"][..], self.msize),
        ] {
            if let Some((k, a, g)) = rss(phases) {
                let met = k < 256 * 1024;
                t.push((
                    format!("peak RSS affa + agent < 256 MiB ({} disk)", human(disk)),
                    format!("{} MiB (affa {} + agent {})", k / 1024, a / 1024, g / 1024),
                    Some(met),
                    cause(met, format!("{} MiB over", (k / 1024).saturating_sub(256))),
                ));
            }
        }
        // The mount (issue 16).
        if let (Some(m), Some(u)) = (self.sum("mount-seq", &d), self.sum("unchunk-null", &d)) {
            let x = u.wall / m.wall;
            let met = x >= 0.7;
            t.push((
                "sequential read through the mount >= 0.7x `affa --unchunk` (to tmpfs)".into(),
                format!("{:.0} MB/s vs {:.0} MB/s = {x:.2}x", size / m.wall / 1e6, size / u.wall / 1e6),
                Some(met),
                cause(
                    met,
                    format!(
                        "mount {:.1} s (one reader), unchunk {:.1} s with CPU {:.1} s (parallel chunk workers)",
                        m.wall, u.wall, u.cpu
                    ),
                ),
            ));
        }
        t
    }

    /// Bytes written by the change before run `rep` of `phase` (0: none recorded).
    fn changed_of(&self, phase: &str, rep: u32) -> u64 {
        self.changed.iter().find(|c| c.0 == phase && c.1 == rep).map_or(0, |c| c.2)
    }

    /// An extra figure of one run.
    fn extra_of(r: &Rec, key: &str) -> Option<f64> {
        r.extra.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Median wall of the scaling row's CBT incrementals of `vm` and its disk size.
    fn scaling(&self, vm: &str) -> Option<(Sum, u64)> {
        let s = self.sum_where("cbt-scaling", CBT, |r| r.vm == vm)?;
        let d = s.disk;
        Some((s, d))
    }

    /// Issue 14's targets, for the CBT row: (target, measured, met, cause of a miss).
    fn cbt_targets(&self) -> Vec<(String, String, Option<bool>, String)> {
        let mut t = Vec::new();
        let cause = |met: bool, how: String| if met { String::new() } else { how };
        if let (Some(a), Some(b)) = (self.sum("clustered", CBT), self.sum("clustered", "borg")) {
            let x = a.wall / b.wall;
            let met = x <= 0.2;
            t.push((
                "1% clustered incremental with CBT: wall <= 0.2x borg's".into(),
                format!("{:.1} s vs {:.1} s = {x:.2}x", a.wall, b.wall),
                Some(met),
                cause(met, format!("{}; {}", self.why_backup("clustered", CBT), self.why_other("clustered", "borg"))),
            ));
        }
        // The worst run: every CBT incremental of the 1% clustered change.
        let runs: Vec<(f64, u64)> = self
            .recs
            .iter()
            .filter(|r| r.phase == "clustered" && r.system == CBT)
            .filter_map(|r| Some((Self::extra_of(r, "host_bytes_read")?, self.changed_of("clustered", r.rep))))
            .filter(|(_, c)| *c > 0)
            .collect();
        if let Some(&(h, c)) = runs.iter().max_by(|a, b| (a.0 / a.1 as f64).total_cmp(&(b.0 / b.1 as f64))) {
            let x = h / c as f64;
            let met = x <= 2.0;
            t.push((
                "1% clustered incremental with CBT: bytes read on the host <= 2x the changed bytes".into(),
                format!("{} MB read vs {} MB changed = {x:.2}x (worst of {} runs)", mb(h), mb(c as f64), runs.len()),
                Some(met),
                cause(
                    met,
                    format!(
                        "the agent reads whole chunks ({}) around each changed 1 MiB extent (4 KiB-aligned, so most span two chunks)",
                        human_cs(self.default_cs)
                    ),
                ),
            ));
        }
        if let (Some((a, da)), Some((b, db))) = (self.scaling("vm1"), self.scaling("vm5")) {
            let x = (a.wall - b.wall).abs() / a.wall.min(b.wall);
            let met = x < 0.2;
            t.push((
                "CBT incremental, same changed bytes: wall on a 4x bigger disk differs by < 20%".into(),
                format!("{:.1} s ({}) vs {:.1} s ({}) = {:.0}%", a.wall, human(da), b.wall, human(db), x * 100.0),
                Some(met),
                cause(
                    met,
                    format!("{}: {}; {}: {}", human(da), self.why_scaling("vm1"), human(db), self.why_scaling("vm5")),
                ),
            ));
        }
        t
    }

    /// Where a scaling run's time went (the report's split, medians).
    fn why_scaling(&self, vm: &str) -> String {
        let rs: Vec<&Rec> =
            self.recs.iter().filter(|r| r.phase == "cbt-scaling" && r.system == CBT && r.vm == vm).collect();
        let med = |k: &str| {
            let v: Vec<f64> = rs.iter().filter_map(|r| Self::extra_of(r, k)).collect();
            (!v.is_empty()).then(|| median(&v))
        };
        let f = |k: &str| med(k).map_or("-".to_string(), |x| format!("{x:.1} s"));
        format!(
            "before the first rsync {}, rsync {}, between (agent, chunking, snapshot removal) {}, after {}, host read {} MB",
            f("before_first_rsync_s"),
            f("rsync_s"),
            f("between_disk_and_config_rsync_s"),
            f("after_last_rsync_s"),
            med("host_bytes_read").map(mb).unwrap_or("-".into())
        )
    }

    /// Changed Block Tracking (issue 14): every incremental of the CBT row beside the agent
    /// row's full pass, with the bytes read on the host; then the scaling row.
    fn cbt_md(&self, o: &mut String) {
        let d = self.def();
        let runs: Vec<&Rec> = self
            .recs
            .iter()
            .filter(|r| r.system == CBT && ["clustered", "scattered"].contains(&r.phase.as_str()))
            .collect();
        if !runs.is_empty() {
            o.push_str(&format!(
                "## Changed Block Tracking: every incremental ({} = {}; {} = {}, a full agent pass)\n\n",
                CBT,
                self.label(CBT),
                d,
                self.label(&d)
            ));
            o.push_str("| scenario | run | changed MB | CBT wall s | CBT host read MB | host read / changed | agent wall s | agent host read MB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in runs {
                let changed = self.changed_of(&r.phase, r.rep) as f64;
                let host = Self::extra_of(r, "host_bytes_read");
                let other = self.recs.iter().find(|x| x.phase == r.phase && x.rep == r.rep && x.system == d);
                o.push_str(&format!(
                    "| {} | {} | {} | {:.1} | {} | {} | {} | {} |\n",
                    r.phase,
                    r.rep,
                    mb(changed),
                    r.cost.wall,
                    host.map(mb).unwrap_or("-".into()),
                    host.map(|h| format!("{:.2}x", h / changed)).unwrap_or("-".into()),
                    other.map(|x| format!("{:.1}", x.cost.wall)).unwrap_or("-".into()),
                    other.and_then(|x| Self::extra_of(x, "host_bytes_read")).map(mb).unwrap_or("-".into())
                ));
            }
            o.push_str("\nEvery CBT incremental was checked to have read its disk through CBT (`ESXiDiskRead0=cbt ...` in the archive's report); a fallback to a full pass stops the bench.\n\n");
        }
        let rows: Vec<(Sum, u64)> = ["vm1", "vm5"].iter().filter_map(|vm| self.scaling(vm)).collect();
        if !rows.is_empty() {
            let changed = self.changed.iter().find(|c| c.0.starts_with("cbt-scaling-")).map_or(0, |c| c.2);
            o.push_str(&format!(
                "## Changed Block Tracking: the same change on a bigger disk ({} MiB clustered, median of {})\n\n| disk | CBT incremental wall s | host read MB | runs |\n|---|---:|---:|---:|\n",
                changed >> 20,
                self.recs.iter().filter(|r| r.phase == "cbt-scaling" && r.system == CBT && r.vm == "vm1").count()
            ));
            for (vm, (s, disk)) in ["vm1", "vm5"].iter().zip(rows) {
                let host: Vec<f64> = self
                    .recs
                    .iter()
                    .filter(|r| r.phase == "cbt-scaling" && r.system == CBT && r.vm == *vm)
                    .filter_map(|r| Self::extra_of(r, "host_bytes_read"))
                    .collect();
                o.push_str(&format!(
                    "| {} | {:.1} | {} | {} |\n",
                    human(disk),
                    s.wall,
                    if host.is_empty() { "-".into() } else { mb(median(&host)) },
                    s.n
                ));
            }
            o.push('\n');
        }
    }

    /// Where a restore's time went, from the job log's timestamps (" (...)" or empty).
    fn restore_split(&self, phase: &str, sys: &str) -> String {
        let v: Vec<String> = ["before_agent_s", "agent_s", "after_agent_s"]
            .iter()
            .zip([
                "before the agent started (plan, local check of every chunk, rsync of the other files)",
                "agent transfer",
                "after it (sha256 check on the host)",
            ])
            .filter_map(|(k, what)| self.extra_med(phase, sys, k).map(|x| format!("{what} {x:.1} s")))
            .collect();
        if v.is_empty() {
            String::new()
        } else {
            format!(" ({})", v.join(", "))
        }
    }

    fn backup_table(&self, out: &mut String, phase: &str, ids: &[String], full: bool) {
        let rs = self.sum(phase, "rsync");
        out.push_str(&format!(
            "| system | wall s | vs rsync | MB over ssh | {} | peak RSS MiB | CPU s (local+remote) | runs |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            if full { "store MB (% of disk)" } else { "store growth MB (% of disk)" }
        ));
        for id in ids {
            let Some(s) = self.sum(phase, id) else { continue };
            let store = if full { s.store_last.map(|x| x as f64) } else { s.growth };
            let mut store_txt =
                store.map(|b| format!("{} ({:.2}%)", mb(b), b / s.disk as f64 * 100.0)).unwrap_or("-".into());
            if full {
                if let Some(st) = s.staging {
                    store_txt.push_str(&format!(", of which staging {}", mb(st)));
                }
            }
            out.push_str(&format!(
                "| {} | {:.1} | {} | {} | {} | {} | {:.1} ({:.1}+{:.1}) | {} |\n",
                self.label(id),
                s.wall,
                rs.as_ref().map(|r| ratio(s.wall, r.wall)).unwrap_or("-".into()),
                s.bytes.map(mb).unwrap_or("- (local read)".into()),
                store_txt,
                rss_txt(&s),
                s.cpu,
                s.cpu - s.cpu_remote,
                s.cpu_remote,
                s.n
            ));
        }
    }

    /// Restore to the host through the agent (issue 13) against `ssh HOST 'cat > file'`.
    fn restore_host_md(&self, o: &mut String) {
        let Some(cat) = self.ceiling("ssh-cat-write") else { return };
        let size = self.size as f64;
        o.push_str(&format!(
            "## Restore of the disk to the host (`affa --full-restore JOB --to-dir NEW`, store cold, median of {})\n\n",
            self.reps
        ));
        o.push_str("| system | target | wall s | MB/s | vs `ssh HOST 'cat > file' < disk` | chunk MB sent | peak RSS MiB | CPU s (local+remote) | where the time went (job log, s) |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
        o.push_str(&format!(
            "| `ssh <affa's options> HOST 'cat > file' < disk` | new file | {cat:.1} | {:.0} | 1.00x | {} (all of it) | - | - | - |\n",
            size / cat / 1e6,
            mb(size)
        ));
        for id in self.main_ids() {
            for (ph, target) in
                [("restore-host", "new directory"), ("restore-host-1pct", "the restored disk with 1% changed")]
            {
                let Some(s) = self.sum(ph, &id) else { continue };
                let e = |k: &str| self.extra_med(ph, &id, k).map(|v| format!("{v:.0}")).unwrap_or("-".into());
                o.push_str(&format!(
                    "| {} | {target} | {:.1} | {:.0} | {} | {} | {} | {:.1} ({:.1}+{:.1}) | before the agent {} / agent {} / after {} |\n",
                    self.label(&id),
                    s.wall,
                    size / s.wall / 1e6,
                    ratio(cat, s.wall),
                    s.bytes.map(mb).unwrap_or("-".into()),
                    rss_txt(&s),
                    s.cpu,
                    s.cpu - s.cpu_remote,
                    s.cpu_remote,
                    e("before_agent_s"),
                    e("agent_s"),
                    e("after_agent_s")
                ));
            }
        }
        o.push_str("\nThe whole VM is restored beside the original (disk, descriptor, .vmx, config files), not registered; every restored disk was compared with the source (BLAKE3). Before the agent: the plan, the local check of every chunk and the whole-file hash, the rsync of the plain files; after it: affa's check of every restored file (sha256sum on the host). Chunk MB sent: the job log's \"chunks sent\" bytes (compressed chunks the host lacked).\n\n");
    }

    /// One offsite record's extra figure.
    fn off(&self, phase: &str, sys: &str, key: &str) -> Option<f64> {
        self.extra_med(phase, sys, key)
    }

    /// Offsite copies to the RADOS Gateway (issue 19): no target, ratios to restic.
    fn offsite_md(&self, o: &mut String) {
        const ROWS: [(&str, &str); 3] = [
            (
                "affa-offsite",
                "`affa --offsite JOB` (the agent system's archive: encrypted chunks the bucket lacks, then the index)",
            ),
            ("restic-s3", "`restic backup` of the VM directory to the s3 repository (reads the disk itself)"),
            ("rclone-pool", "`rclone sync` of affa's pool directory (.affa-pool: unencrypted, no manifests)"),
        ];
        if self.sum("offsite-full", "affa-offsite").is_none() && self.sum("offsite-incr", "affa-offsite").is_none() {
            return;
        }
        let mbo = |v: Option<f64>| v.map(mb).unwrap_or("-".into());
        o.push_str(&format!(
            "## Offsite copy to a RADOS Gateway ({} disk; Ceph 16 single node on 127.0.0.1, bluestore OSD on a sparse file; one run each)

",
            human(self.size)
        ));
        o.push_str("No target (issue 19 asks for the comparison): ratios to restic. Bytes: the bucket's growth (`radosgw-admin bucket stats`) and what the gateway received and sent (its usage log: object bodies and listings, not HTTP headers); both exact. Wall times are single runs on a machine shared with other builds: noisy.\n\n");
        o.push_str("| upload | how | wall s | vs restic | bucket growth MB (objects) | vs restic | MB received by the gateway | requests |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
        for (ph, what) in
            [("offsite-full", "first archive (full backup)"), ("offsite-incr", "1% clustered incremental")]
        {
            let rs = self.sum(ph, "restic-s3");
            let rb = self.off(ph, "restic-s3", "bucket_bytes_added");
            if let Some(run) = self.sum(&format!("{ph}-run"), "affa-offsite") {
                o.push_str(&format!(
                    "| {what} | (before it: the local `affa --run` that made the archive) | {:.1} | {} | - | - | - | - |\n",
                    run.wall,
                    rs.as_ref().map(|r| ratio(run.wall, r.wall)).unwrap_or("-".into())
                ));
            }
            for (id, how) in ROWS {
                let Some(s) = self.sum(ph, id) else { continue };
                let b = self.off(ph, id, "bucket_bytes_added");
                o.push_str(&format!(
                    "| {what} | {how} | {:.1} | {} | {} ({}) | {} | {} | {} |\n",
                    s.wall,
                    rs.as_ref().map(|r| ratio(s.wall, r.wall)).unwrap_or("-".into()),
                    mbo(b),
                    self.off(ph, id, "bucket_objects_added").map(|x| format!("{x:.0}")).unwrap_or("-".into()),
                    match (b, rb) {
                        (Some(b), Some(r)) => ratio(b, r),
                        _ => "-".into(),
                    },
                    mbo(self.off(ph, id, "gateway_bytes_received")),
                    self.off(ph, id, "gateway_requests").map(|x| format!("{x:.0}")).unwrap_or("-".into())
                ));
                if id != "affa-offsite" {
                    continue;
                }
                if let Some(run) = self.sum(&format!("{ph}-run"), "affa-offsite") {
                    o.push_str(&format!(
                        "| {what} | `affa --run` + `affa --offsite`: what replaces `restic backup` to the bucket | {:.1} | {} | - | - | - | - |\n",
                        run.wall + s.wall,
                        rs.as_ref().map(|r| ratio(run.wall + s.wall, r.wall)).unwrap_or("-".into())
                    ));
                }
            }
        }
        let rs = self.sum("offsite-restore", "restic-s3");
        if rs.is_some() || self.sum("offsite-restore", "affa-offsite").is_some() {
            o.push_str(&format!(
                "\nRestore of the newest disk from the bucket to a new local directory (median of {}; the first repetition compared with the source, BLAKE3):\n\n| restore | wall s | MB/s | vs restic | MB sent by the gateway | requests |\n|---|---:|---:|---:|---:|---:|\n",
                self.reps
            ));
            for (id, how) in [
                ("affa-offsite", "`affa --unchunk JOB DATE --from-offsite --to DIR` (every object opened and checked, the file's BLAKE3, fsync)"),
                ("restic-s3", "`restic restore latest --include NAME` (writes the zeros: no --sparse in 0.14)"),
            ] {
                let Some(s) = self.sum("offsite-restore", id) else { continue };
                o.push_str(&format!(
                    "| {how} | {:.1} | {:.0} | {} | {} | {} |\n",
                    s.wall,
                    self.size as f64 / s.wall / 1e6,
                    rs.as_ref().map(|r| ratio(s.wall, r.wall)).unwrap_or("-".into()),
                    mbo(self.off("offsite-restore", id, "gateway_bytes_sent")),
                    self.off("offsite-restore", id, "gateway_requests").map(|x| format!("{x:.0}")).unwrap_or("-".into())
                ));
            }
        }
        o.push_str("\nrclone copies the pool only: a copy restorable by affa would also need each archive's manifests and files (small), and it is not encrypted (rclone's crypt remote would add that). restic reads and chunks the disk itself in its upload; affa's upload starts from the chunks its `--run` made (hence the sum row). rclone compares size and modification time: a HEAD request per object the bucket already has.\n\n");
    }

    /// Reading through the mount (issue 16).
    fn mount_md(&self, o: &mut String) {
        let d = self.def();
        let (Some(m), Some(u)) = (self.sum("mount-seq", &d), self.sum("unchunk-null", &d)) else { return };
        let size = self.size as f64;
        o.push_str(&format!(
            "## Reading the chunked disk through `affa --mount` (store cold, a fresh mount, median of {})\n\n",
            self.reps
        ));
        o.push_str("| read | wall s | MB/s | vs unchunk |\n|---|---:|---:|---:|\n");
        o.push_str(&format!(
            "| `affa --unchunk` to a tmpfs (/dev/shm; checks every chunk and the whole-file BLAKE3) | {:.1} | {:.0} | 1.00x |\n",
            u.wall,
            size / u.wall / 1e6
        ));
        o.push_str(&format!(
            "| sequential read of the mounted -flat.vmdk, 1 MiB reads | {:.1} | {:.0} | {} |\n\n",
            m.wall,
            size / m.wall / 1e6,
            ratio(u.wall, m.wall)
        ));
        let n = self.extra_med("mount-random-cold", &d, "reads").unwrap_or(0.0);
        if n > 0.0 {
            o.push_str(&format!(
                "Random 4 KiB reads at {n:.0} seeded 4 KiB-aligned offsets (one reader):\n\n| pass | median ms | p99 ms | max ms |\n|---|---:|---:|---:|\n"
            ));
            for pass in ["cold", "warm"] {
                let ph = format!("mount-random-{pass}");
                let e = |k: &str| self.extra_med(&ph, &d, k).map(|v| format!("{:.3}", v * 1e3)).unwrap_or("-".into());
                let what =
                    if pass == "cold" { "cold (store evicted, fresh mount)" } else { "warm (the same offsets again)" };
                o.push_str(&format!("| {what} | {} | {} | {} |\n", e("median_s"), e("p99_s"), e("max_s")));
            }
            o.push('\n');
        }
    }

    pub fn markdown(&self, old: &str) -> String {
        let mut o = String::new();
        let d = self.def();
        let main = self.main_ids();
        o.push_str("# Benchmarks: affa vs rsync --link-dest, borg and restic\n\n");
        o.push_str("Written by `affa-bench` (crates/bench); every figure is also in `benchmarks.json`. How it measures: docs/BENCHMARKS-METHOD.md.\n\n");
        o.push_str(&format!("Command: `{}`  \n", self.cmdline.trim()));
        o.push_str(&format!(
            "Run: {} to {} ({:.0} min)  \n",
            self.machine.date_start,
            self.machine.date_end,
            self.total_wall / 60.0
        ));
        o.push_str(&format!(
            "Machine: {} cores ({}), {} RAM, kernel {}, data on {}  \nLoad: at start `{}`; at end `{}`\n\n",
            self.machine.nproc,
            self.machine.cpu.trim(),
            self.machine.mem,
            self.machine.kernel,
            self.machine.disk,
            self.machine.load_start,
            self.machine.load_end
        ));
        o.push_str("Tools: ");
        o.push_str(&self.tools.iter().map(|(k, v)| format!("{k}: `{v}`")).collect::<Vec<_>>().join("; "));
        o.push_str("\n\n");
        if let Some(c) = &self.composition {
            o.push_str(&format!(
                "Data: one generated VM disk of {} (seed {}): {} zeros (holes, as on a thin disk), {} random, {} text-like, in 4 KiB-aligned segments of 64 KiB to 4 MiB.",
                human(self.size), self.seed, human(c.zero), human(c.random), human(c.text)
            ));
            if let Some((cz, _)) = self.compressed_full {
                o.push_str(&format!(
                    " zstd -1 of the whole image: {} MB ({:.2}x).",
                    mb(cz as f64),
                    self.size as f64 / cz as f64
                ));
            }
            o.push_str("\n\n");
        }
        o.push_str("Systems: affa runs an ESXi job against the simulator harness (harness/esxi-sim) through a private sshd on 127.0.0.1: snapshot, the frozen disk (chunked: through affa-agent on the host, `chunkTransport=auto`, the default, checked in every run's report; or `chunkTransport=rsync`: rsync into the staging copy, then chunking; Affa 3: rsync), snapshot removal, config files. `rsyncCompress=no` for every affa job (loopback). rsync: `rsync -a --hard-links --numeric-ids --sparse --link-dest=PREV` of the VM directory over the same ssh (same options and key as affa). borg 1.2 (`-e none`, `--compression zstd,1`, `--chunker-params fixed,4194304` as borg recommends for VM images) and restic 0.14 (repository version 2, compression auto) read the image directly from the datastore directory, without ssh and without a snapshot. Before every timed run the source and the store are dropped from the page cache; every wall time includes a final `sync`.\n\n");

        // Ceilings
        if let (Some(lr), Some(sc), Some(sw)) =
            (self.ceiling("local-read-cold"), self.ceiling("ssh-cat-cold"), self.ceiling("ssh-cat-warm"))
        {
            let s = self.size as f64;
            o.push_str(&format!(
                "## Ceilings (same run, median of {})\n\n| path | s | MB/s |\n|---|---:|---:|\n| local read of the image, cold | {lr:.2} | {:.0} |\n| `ssh ... cat image > /dev/null`, cold | {sc:.2} | {:.0} |\n| same, image in the page cache | {sw:.2} | {:.0} |\n\n",
                self.reps, s / lr / 1e6, s / sc / 1e6, s / sw / 1e6
            ));
        }
        let pct = |phase: &str| -> String {
            let v: Vec<u64> = self.changed.iter().filter(|c| c.0 == phase).map(|c| c.2).collect();
            v.first()
                .map(|&b| {
                    if b >= 1 << 20 {
                        format!("{} MiB written per run", b >> 20)
                    } else {
                        format!("{} KiB written per run", b >> 10)
                    }
                })
                .unwrap_or_default()
        };
        o.push_str(&format!("## Full backup ({} disk)\n\n", human(self.size)));
        self.backup_table(&mut o, "full", &main, true);
        o.push_str(&format!(
            "\n## Incremental: 1% of the disk changed as clustered 1 MiB extents ({})\n\n",
            pct("clustered")
        ));
        self.backup_table(&mut o, "clustered", &main, false);
        o.push_str(&format!("\n## Incremental: 0.1% changed as scattered 4 KiB blocks ({})\n\n", pct("scattered")));
        self.backup_table(&mut o, "scattered", &main, false);
        o.push_str(&format!(
            "\n## A second VM cloned from the first with 5% divergence ({}; one run, same store)\n\n",
            pct("clone")
        ));
        self.backup_table(&mut o, "clone", &main, false);
        o.push_str("\nThe plain-copy systems (affa without chunkFiles, rsync) keep a full copy per version; the bench deletes their older versions after measuring each growth (else the disk fills), so their store sizes are sums of measured growths.\n\n");

        // Restore
        if self.sum("restore", &d).is_some() {
            let lr = self.ceiling("local-read-cold");
            o.push_str(&format!(
                "## Restore of the newest version of the disk to a local directory (store cold, median of {})\n\n",
                self.reps
            ));
            o.push_str("| system | wall s | MB/s | vs cold read of the plain file | peak RSS MiB | CPU s | how |\n|---|---:|---:|---:|---:|---:|---|\n");
            for id in main.iter() {
                let Some(s) = self.sum("restore", id) else { continue };
                let sp = self.size as f64 / s.wall;
                let how = match id.as_str() {
                    "plain" | "rsync" => "cp --sparse=always",
                    "borg" => "borg extract --sparse",
                    "restic" => "restic restore (writes the zeros: no --sparse in 0.14)",
                    _ => "affa --unchunk (checks every chunk and the whole-file BLAKE3, fsync)",
                };
                o.push_str(&format!(
                    "| {} | {:.1} | {:.0} | {} | {} | {:.1} | {how} |\n",
                    self.label(id),
                    s.wall,
                    sp / 1e6,
                    lr.map(|l| ratio(sp, self.size as f64 / l)).unwrap_or("-".into()),
                    s.rss_kib / 1024,
                    s.cpu
                ));
            }
            o.push_str("\nEvery restored file was compared with the source (BLAKE3) on the first repetition.\n\n");
        }
        self.cbt_md(&mut o);
        self.restore_host_md(&mut o);
        self.mount_md(&mut o);
        self.offsite_md(&mut o);

        // Nights
        if !self.nightly_final.is_empty() {
            let cz = self.nightly_compressed.map(|x| x.0 as f64).unwrap_or(f64::NAN);
            o.push_str(&format!(
                "## {} nightly runs of 0.5% clustered change ({} disk{}; store after the full backup and {} nights)\n\n",
                self.nights,
                human(self.nsize),
                if self.nsize < self.size { ", smaller than the main size to fit the time" } else { "" },
                self.nights
            ));
            o.push_str(&format!("One compressed full copy (zstd -1 of the final image): {} MB.\n\n", mb(cz)));
            o.push_str("| system | store after MB | vs compressed full copy | of which staging MB | median nightly wall s | median growth per night MB | MB over ssh per night | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
            let mut ids = main.clone();
            ids.extend(self.systems.iter().filter(|s| s.2).map(|s| s.0.clone()));
            for id in ids {
                let (Some((store, staging)), Some(n)) = (self.nightly_store(&id), self.nights(&id)) else { continue };
                o.push_str(&format!(
                    "| {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
                    self.label(&id),
                    mb(store as f64),
                    ratio(store as f64, cz),
                    if staging > 0 { mb(staging as f64) } else { "-".into() },
                    n.wall,
                    n.growth.map(mb).unwrap_or("-".into()),
                    n.bytes.map(mb).unwrap_or("-".into()),
                    n.rss_kib / 1024
                ));
            }
            o.push('\n');
        }

        // The proposed fixes, measured
        let tuned: Vec<String> =
            self.systems.iter().filter(|s| s.0.starts_with("tuned")).map(|s| s.0.clone()).collect();
        if !tuned.is_empty() {
            let mut ids = vec![d.clone()];
            ids.extend(tuned.iter().cloned());
            ids.extend(["rsync".to_string(), "borg".to_string(), "restic".to_string()]);
            for (ph, what) in [
                ("full", "full backup"),
                ("clustered", "1% clustered"),
                ("scattered", "0.1% scattered"),
                ("clone", "clone 5%"),
            ] {
                if self.sum(ph, &d).is_none() {
                    continue;
                }
                o.push_str(&format!("## Proposed fixes applied from outside affa: {what}\n\n"));
                self.backup_table(&mut o, ph, &ids, ph == "full");
                o.push('\n');
            }
        }

        // Chunk-size study
        if self.study.len() > 1 {
            o.push_str("## Chunk-size study (affa ESXi job, chunkFiles=*-flat.vmdk)\n\n");
            o.push_str("| chunkSize | full wall s | full store MB (staging excluded) | 1% clustered: wall s / growth MB / MB over ssh | 0.1% scattered: wall s / growth MB / MB over ssh | clone: growth MB | restore s | nights: store after MB | pool files / links per archive after the full | archive metadata MB (manifest + link dirs) | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for &cs in &self.study {
                let id = Self::chunk_id(cs);
                let f = self.sum("full", &id);
                let c = self.sum("clustered", &id);
                let s = self.sum("scattered", &id);
                let cl = self.sum("clone", &id);
                let r = self.sum("restore", &id);
                let trip = |x: &Option<Sum>| {
                    x.as_ref()
                        .map(|x| {
                            format!(
                                "{:.1} / {} / {}",
                                x.wall,
                                x.growth.map(mb).unwrap_or("-".into()),
                                x.bytes.map(mb).unwrap_or("-".into())
                            )
                        })
                        .unwrap_or("-".into())
                };
                let rss = self.recs.iter().filter(|r| r.system == id).map(|r| r.cost.maxrss_kib).max().unwrap_or(0);
                o.push_str(&format!(
                    "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    human_cs(cs),
                    if cs == self.default_cs { " (current default)" } else { "" },
                    f.as_ref().map(|x| format!("{:.1}", x.wall)).unwrap_or("-".into()),
                    f.as_ref()
                        .map(|x| mb(x.store_last.unwrap_or(0) as f64 - x.staging.unwrap_or(0.0)))
                        .unwrap_or("-".into()),
                    trip(&c),
                    trip(&s),
                    cl.and_then(|x| x.growth).map(mb).unwrap_or("-".into()),
                    r.map(|x| format!("{:.1}", x.wall)).unwrap_or("-".into()),
                    self.nightly_store(&id).map(|x| mb(x.0 as f64)).unwrap_or("-".into()),
                    match (
                        self.extra_med("full", &id, "pool_files"),
                        self.extra_med("full", &id, "archive_chunk_links")
                    ) {
                        (Some(p), Some(l)) => format!("{p:.0} / {l:.0}"),
                        _ => "-".into(),
                    },
                    self.extra_med("full", &id, "archive_meta_bytes").map(mb).unwrap_or("-".into()),
                    rss / 1024
                ));
            }
            o.push('\n');
        }

        // Memory
        let mem: Vec<&Rec> = self.recs.iter().filter(|r| r.phase.starts_with("memory")).collect();
        if !mem.is_empty() {
            o.push_str(&format!("## Peak memory at {} (affa through the agent only, chunkSize={})\n\n| run | wall s | peak RSS MiB (largest local process: affa, rsync or ssh) | peak RSS MiB of affa-agent on the host | MB over ssh | store growth MB |\n|---|---:|---:|---:|---:|---:|\n", human(self.msize), human_cs(self.default_cs)));
            for r in mem {
                o.push_str(&format!(
                    "| {} | {:.1} | {} | {} | {} | {} |\n",
                    r.phase,
                    r.cost.wall,
                    r.cost.maxrss_kib / 1024,
                    r.cost.agent_rss_kib / 1024,
                    r.bytes_ssh.map(|b| mb(b as f64)).unwrap_or("-".into()),
                    r.growth.map(|g| mb(g as f64)).unwrap_or("-".into())
                ));
            }
            o.push('\n');
        }

        // Where affa's wall time goes
        o.push_str("## Where affa's wall time goes (medians, s)\n\nFrom the timed rsync wrapper affa runs as `localRsyncBinary`: before the first rsync = connection check, vSphere login, layout, snapshot; rsync = every rsync transfer (disk descriptor, config files; without the agent also the disk); between the last two rsyncs = chunking + snapshot removal (+ layout query); through the agent the disk is read, sent and chunked between the descriptor's and the config files' rsync, so that column holds the agent's whole transfer; after = rotation, pool sweep, the final sync.\n\n| system | scenario | wall | before first rsync | rsync | between the last two rsyncs (agent transfer or chunking, + snapshot removal) | after last rsync |\n|---|---|---:|---:|---:|---:|---:|\n");
        let mut ids: Vec<String> = self
            .systems
            .iter()
            .filter(|s| {
                s.0.starts_with("agent") || s.0.starts_with("chunk") || s.0.starts_with("tuned") || s.0 == "plain"
            })
            .map(|s| s.0.clone())
            .collect();
        ids.sort_by_key(|i| (i != &d, i != "plain", i.clone()));
        for id in &ids {
            for ph in ["full", "clustered", "scattered", "clone", "nightly"] {
                let Some(s) = (if ph == "nightly" { self.nights(id) } else { self.sum(ph, id) }) else { continue };
                let e = |k: &str| self.extra_med(ph, id, k).map(|v| format!("{v:.2}")).unwrap_or("-".into());
                o.push_str(&format!(
                    "| {} | {ph} | {:.2} | {} | {} | {} | {} |\n",
                    self.label(id),
                    s.wall,
                    e("before_first_rsync_s"),
                    e("rsync_s"),
                    e("between_disk_and_config_rsync_s"),
                    e("after_last_rsync_s")
                ));
            }
        }
        o.push('\n');

        // Targets
        o.push_str(&format!(
            "## Targets of issues 13, 14 and 16 ({} run, affa = {}; CBT rows: {})\n\n| target | measured | result |\n|---|---|---|\n",
            human(self.size),
            self.label(&d),
            self.label(CBT)
        ));
        for e in &self.errors {
            o.push_str(&format!(
                "| (scenario failed, no figure) | {} | **MISS** |\n",
                e.replace('\n', " ").replace('|', "/")
            ));
        }
        for (t, m, met, g) in self.targets() {
            let mark = match met {
                Some(true) => "PASS".to_string(),
                Some(false) => format!("**MISS**: {g}"),
                None => "-".into(),
            };
            o.push_str(&format!("| {t} | {m} | {mark} |\n"));
        }
        o.push('\n');
        o.push_str(ANALYSIS_MARK);
        o.push('\n');
        if let Some(i) = old.find(ANALYSIS_MARK) {
            o.push_str(old[i + ANALYSIS_MARK.len()..].trim_start_matches('\n'));
        }
        o
    }

    pub fn json(&self) -> J {
        let mut root = J::obj();
        root.set("command", self.cmdline.as_str());
        let mut p = J::obj();
        p.set("size_bytes", self.size)
            .set("nightly_size_bytes", self.nsize)
            .set("memory_check_size_bytes", self.msize)
            .set("default_chunk_size", self.default_cs)
            .set("chunk_sizes", J::Arr(self.study.iter().map(|&c| J::from(c)).collect()))
            .set("reps", self.reps)
            .set("nights", self.nights)
            .set("seed", self.seed)
            .set("total_wall_s", self.total_wall);
        root.set("parameters", p);
        let mut m = J::obj();
        m.set("nproc", self.machine.nproc as u64)
            .set("memory", self.machine.mem.as_str())
            .set("cpu", self.machine.cpu.trim())
            .set("kernel", self.machine.kernel.as_str())
            .set("disk", self.machine.disk.as_str())
            .set("uptime_start", self.machine.load_start.as_str())
            .set("uptime_end", self.machine.load_end.as_str())
            .set("start", self.machine.date_start.as_str())
            .set("end", self.machine.date_end.as_str());
        root.set("machine", m);
        let mut t = J::obj();
        for (k, v) in &self.tools {
            t.set(k, v.as_str());
        }
        root.set("tools", t);
        root.set(
            "systems",
            J::Arr(
                self.systems
                    .iter()
                    .map(|(id, l, s)| {
                        let mut o = J::obj();
                        o.set("id", id.as_str()).set("label", l.as_str()).set("study_only", *s);
                        o
                    })
                    .collect(),
            ),
        );
        if let Some(c) = &self.composition {
            let mut o = J::obj();
            o.set("zero_bytes", c.zero).set("random_bytes", c.random).set("text_bytes", c.text);
            o.set("zstd1_bytes", self.compressed_full.map(|x| x.0));
            root.set("image", o);
        }
        root.set(
            "changes",
            J::Arr(
                self.changed
                    .iter()
                    .map(|(p, r, b)| {
                        let mut o = J::obj();
                        o.set("phase", p.as_str()).set("rep", *r).set("bytes_written", *b);
                        o
                    })
                    .collect(),
            ),
        );
        let mut sums = Vec::new();
        let phases = [
            "full",
            "clustered",
            "scattered",
            "clone",
            "restore",
            "restore-host",
            "restore-host-1pct",
            "unchunk-null",
            "mount-seq",
            "cbt-scaling-full",
            "nightly",
            "memory-full",
        ];
        for ph in phases {
            for (id, _, _) in &self.systems {
                let s = if ph == "nightly" { self.nights(id) } else { self.sum(ph, id) };
                if let Some(s) = s {
                    let mut o = J::obj();
                    o.set("phase", if ph == "nightly" { "nightly (nights 1..N)" } else { ph })
                        .set("system", id.as_str())
                        .set("runs", s.n as u64)
                        .set("median_wall_s", s.wall)
                        .set("median_cpu_s", s.cpu)
                        .set("max_peak_rss_kib", s.rss_kib)
                        .set("max_agent_peak_rss_kib", s.agent_rss_kib)
                        .set("median_bytes_over_ssh", s.bytes)
                        .set("median_store_growth_bytes", s.growth)
                        .set("store_after_bytes", s.store_last);
                    sums.push(o);
                }
            }
        }
        root.set("medians", J::Arr(sums));
        let mut cs = J::obj();
        for vm in ["vm1", "vm5"] {
            if let Some((s, disk)) = self.scaling(vm) {
                let mut o = J::obj();
                o.set("disk_bytes", disk).set("runs", s.n as u64).set("median_wall_s", s.wall);
                cs.set(vm, o);
            }
        }
        root.set("cbt_scaling", cs);
        let mut ce = J::obj();
        for ph in ["local-read-cold", "ssh-cat-cold", "ssh-cat-warm", "ssh-cat-write"] {
            if let Some(w) = self.ceiling(ph) {
                let mut o = J::obj();
                o.set("median_s", w).set("bytes_per_s", self.size as f64 / w);
                ce.set(ph, o);
            }
        }
        root.set("ceilings", ce);
        let mut n = J::obj();
        n.set("compressed_full_copy_bytes", self.nightly_compressed.map(|x| x.0));
        for (id, store, staging) in &self.nightly_final {
            let mut o = J::obj();
            o.set("store_after_bytes", *store).set("staging_bytes", *staging);
            n.set(id, o);
        }
        root.set("nightly", n);
        root.set(
            "targets",
            J::Arr(
                self.targets()
                    .into_iter()
                    .map(|(t, m, met, g)| {
                        let mut o = J::obj();
                        o.set("target", t).set("measured", m).set("met", met).set("gap", g);
                        o
                    })
                    .collect(),
            ),
        );
        root.set("runs", J::Arr(self.recs.iter().map(|r| r.json()).collect()));
        root
    }
}
