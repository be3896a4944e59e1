//! affa-bench: affa measured side by side with plain rsync --link-dest, borg and restic, in
//! one run, on the same generated VM-disk-like data, and its offsite copies side by side with
//! restic's s3 backend and rclone on a RADOS Gateway it starts (offsite.rs); writes BENCHMARKS.md
//! and benchmarks.json.
//!
//! `cargo run --release -p affa-bench --bin affa-bench -- --size 4G` (see BENCHMARKS.md for what it does).
//! Installs nothing: it stops with the apt-get line when a tool is missing.

mod env;
mod gen;
mod json;
mod measure;
mod mount;
mod offsite;
mod report;
mod systems;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use env::{AffaConf, Sim, Sshd, VmDef};
use gen::Filler;
use measure::Remote;
use report::{Rec, Results};
use systems::{Kind, System, World};

#[derive(Parser, Debug)]
#[command(name = "affa-bench", about = "affa vs rsync --link-dest, borg and restic on the same generated VM disks")]
pub struct Args {
    /// Size of the VM disk image (4G; 1G for a quick run).
    #[arg(long, default_value = "4G")]
    size: String,
    /// Disk size of the thirty-nights scenario (default: the size, at most 1G).
    #[arg(long)]
    nightly_size: Option<String>,
    /// Number of simulated nightly runs.
    #[arg(long, default_value_t = 30)]
    nights: u32,
    /// Repetitions of each repeatable scenario (the tables show medians).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Chunk sizes of the chunk-size study, through rsync+staging (e.g. 256K,1M,4M; the default
    /// chunkSize is always included; default: none, the study of 2026-11-26 chose 1M).
    #[arg(long, default_value = "")]
    chunk_sizes: String,
    /// Size of the big disk of the CBT scaling row: the same clustered change (1% of --size) on
    /// the --size disk and on this one, through the CBT row (default 4 x size).
    #[arg(long)]
    cbt_scaling: Option<String>,
    /// Repetitions of the CBT scaling row's incrementals on each disk (default: --reps). Each is
    /// about a second: more of them give a median that single runs' spread moves less.
    #[arg(long)]
    scaling_reps: Option<u32>,
    /// Disk size of the affa-only peak-memory check (default 4 x size; 0 = skip).
    #[arg(long)]
    memory_check: Option<String>,
    /// Where images and stores go (default: ../bench-data next to the repository).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where BENCHMARKS.md and benchmarks.json are written (default: the repository).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Phases to skip, comma separated:
    /// ceilings,full,clustered,scattered,clone,restore,restore-host,mount,offsite,cbt-scaling,nightly,memory.
    #[arg(long, default_value = "")]
    skip: String,
    /// Only these systems, comma separated
    /// (agent,agentcbt,chunk1m,chunk256k,chunk4m,plain,rsync,borg,restic);
    /// for profiling and quick looks, the tables then lack the others.
    #[arg(long, default_value = "")]
    systems: String,
    /// Systems of the nights scenario (the plain-copy ones store a full copy per night: their
    /// growth is the same as in the incremental tables).
    #[arg(long, default_value = "agent,chunk1m,borg,restic")]
    nightly_systems: String,
    /// Chunked systems of the restore to the host (e.g. agent,chunk1m).
    #[arg(long, default_value = "agent")]
    restore_host_systems: String,
    /// Random 4 KiB reads through the mount, per pass (cold, then warm).
    #[arg(long, default_value_t = 2000)]
    mount_reads: usize,
    /// Use this affa binary instead of building one from this checkout (e.g. a build of a
    /// clean commit while the working tree is being edited).
    #[arg(long)]
    affa_bin: Option<PathBuf>,
    /// Use this static affa-agent (the jobs' agentBinary) instead of building one from this
    /// checkout with scripts/build-agent.sh.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Also run affa with this chunk size and the proposed fixes applied from outside (staging
    /// rsync with --sparse, ssh ControlMaster) in every scenario, as "tunedSIZE".
    #[arg(long)]
    tuned: Option<String>,
    /// Leave the images and stores in the data dir at the end.
    #[arg(long)]
    keep_data: bool,
}

/// A size of test data: `262144`, `256K`, `1M`, `4MiB`, `1G` -> bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size '{s}' (examples: 256M, 1G, 4G)");
    let v = s.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub fn human(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

struct Log {
    t0: Instant,
}

impl Log {
    fn say(&self, s: impl AsRef<str>) {
        let now = chrono::Utc::now().format("%H:%M:%S");
        eprintln!("[{now} +{:>5.0}s] {}", self.t0.elapsed().as_secs_f64(), s.as_ref());
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = env::check_prerequisites() {
        eprintln!("affa-bench: {e}");
        std::process::exit(2);
    }
    if let Err(e) = run(&args) {
        eprintln!("affa-bench: error: {e}");
        std::process::exit(1);
    }
}

fn free_bytes(p: &Path) -> u64 {
    affa::transport::rsync::df(p).map(|(_, a)| a * 1024).unwrap_or(0)
}

fn run(args: &Args) -> Result<(), String> {
    let log = Log { t0: Instant::now() };
    let size = parse_size(&args.size)? / (4 << 10) * (4 << 10);
    let nsize = match &args.nightly_size {
        Some(s) => parse_size(s)?,
        None => size.min(1 << 30),
    };
    let msize = match args.memory_check.as_deref() {
        Some("0") => 0,
        Some(s) => parse_size(s)?,
        None => 4 * size,
    };
    let skip: Vec<&str> = args.skip.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let on = |p: &str| !skip.contains(&p);
    if on("offsite") {
        offsite::check_prerequisites()?;
    }
    let only: Vec<&str> = args.systems.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let scaling = match &args.cbt_scaling {
        _ if !on("cbt-scaling") || !(only.is_empty() || only.contains(&"agentcbt")) => 0,
        Some(s) => parse_size(s)? / (4 << 10) * (4 << 10),
        None => 4 * size,
    };
    let default_cs = affa::config::keys::lookup("chunkSize")
        .and_then(|k| k.default.first())
        .and_then(|v| affa::chunk::parse_chunk_size(v).ok())
        .map_or(4 << 20, u64::from);
    let mut study: Vec<u64> = Vec::new();
    for s in args.chunk_sizes.split(',').filter(|s| !s.trim().is_empty()) {
        let cs = parse_size(s.trim())?;
        if !study.contains(&cs) {
            study.push(cs);
        }
    }
    if !study.contains(&default_cs) {
        study.push(default_cs);
    }
    study.sort();

    let repo = env::manifest_dir();
    let data =
        args.data_dir.clone().unwrap_or_else(|| repo.parent().unwrap_or(Path::new("/var/tmp")).join("bench-data"));
    let out_dir = args.out_dir.clone().unwrap_or_else(|| repo.clone());
    // Created now: a run of minutes must not fail at its last step for a missing directory.
    fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create --out-dir {}: {e}", out_dir.display()))?;
    if data.starts_with(&repo) {
        return Err(format!("the data dir {} is inside the repository; pass --data-dir elsewhere", data.display()));
    }
    fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    // The disk's normal write latency, before any image is written (BENCHMARKS-METHOD.md).
    let baseline = measure::latency_baseline(&data);
    // Disk: world A holds two images, three chunked stores (staging = a plain copy each), two
    // plain copies per step (pruned), borg and restic; the memory check its image + staging.
    // The offsite phase: a store of its own, the gateway's OSD (three copies of the compressed
    // disk: affa's, restic's, rclone's; about 0.45x the disk each with the generated data) and
    // one restored disk at a time.
    let offsite_need = if on("offsite") { 3 * size } else { 0 };
    // The scaling row holds both of its disks and their stores at once.
    let need = (9 * size + offsite_need).max(msize * 27 / 10).max((scaling + size) * 27 / 10).max(8 * nsize);
    let free = free_bytes(&data);
    if free < need {
        return Err(format!(
            "{} has {} free; this run needs about {} (use a smaller --size / --memory-check, or --data-dir)",
            data.display(),
            human(free),
            human(need)
        ));
    }

    log.say("building affa (release) and the ESXi simulator");
    let affa_bin = match &args.affa_bin {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => return Err(format!("--affa-bin {}: no such file", p.display())),
        None => env::build_affa()?,
    };
    let agent_bin = match &args.agent_bin {
        Some(p) if p.is_file() => fs::canonicalize(p).map_err(|e| format!("--agent-bin {}: {e}", p.display()))?,
        Some(p) => return Err(format!("--agent-bin {}: no such file", p.display())),
        None => env::build_agent()?,
    };
    let sim_bin = env::build_sim()?;
    log.say(format!("the disk's write latency (4 KiB + fdatasync): {:.2} ms", baseline.as_secs_f64() * 1000.0));

    let mut res = Results::new(args, size, nsize, msize, default_cs, &study, &data);
    res.machine_start();

    // Fresh datastore: the simulator wants the flat files only.
    let ds = data.join("ds1");
    let _ = fs::remove_dir_all(&ds);
    let stores = data.join("stores");
    let _ = fs::remove_dir_all(&stores);
    let logs = data.join("logs");
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let filler = Filler::default();
    let flat = |vm: &str| ds.join(vm).join(format!("{vm}-flat.vmdk"));
    log.say(format!("generating vm1 ({}) in {}", human(size), ds.display()));
    let (comp, gc) = measure::time_self(|| gen::generate(&flat("vm1"), size, gen::derive(args.seed, "vm1"), &filler));
    let comp = comp.map_err(|e| format!("generating vm1: {e}"))?;
    log.say(format!(
        "  {:.1} s (zero {}, random {}, text {})",
        gc.wall,
        human(comp.zero),
        human(comp.random),
        human(comp.text)
    ));
    res.composition = Some(comp);
    let mut mtime: i64 = 1_767_225_600; // 2026-01-01
    gen::set_mtime(&flat("vm1"), mtime).map_err(|e| e.to_string())?;
    let mut vms = vec![VmDef { name: "vm1".into(), size }, VmDef { name: "vm2".into(), size }];
    if on("nightly") {
        vms.push(VmDef { name: "vm3".into(), size: nsize });
    }
    if on("memory") && msize > 0 {
        vms.push(VmDef { name: "vm4".into(), size: msize });
    }
    if scaling > 0 {
        vms.push(VmDef { name: "vm5".into(), size: scaling });
    }
    for v in &vms[1..] {
        fs::create_dir_all(ds.join(&v.name)).map_err(|e| e.to_string())?;
        let f = fs::File::create(flat(&v.name)).map_err(|e| e.to_string())?;
        f.set_len(v.size / (4 << 10) * (4 << 10)).map_err(|e| e.to_string())?;
    }

    let sshd = Sshd::start(&data.join("sshd"))?;
    let sim = Sim::start(&sim_bin, &data.join("sim"), &ds, &vms)?;
    let affa = AffaConf::new(&affa_bin, &agent_bin, &data.join("affa"))?;
    let mut w = World {
        affa: &affa,
        sshd: &sshd,
        sim: &sim,
        ds: ds.clone(),
        logs: logs.clone(),
        remote: Remote(Some(sshd.pid())),
        ssh_job: String::new(),
        now: String::new(),
    };
    // A job only to hold the known-hosts file plain ssh and rsync use.
    affa.add_job("sshref", "vm1", &data.join("sshref"), None, false, false, &sshd, &sim)?;
    w.ssh_job = "sshref".into();
    let mut clock = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap().and_hms_opt(20, 0, 0).unwrap();
    let mut tick = |w: &mut World, days: i64, minutes: i64| {
        clock += chrono::Duration::days(days) + chrono::Duration::minutes(minutes);
        w.now = clock.format("%Y-%m-%dT%H:%M:%S").to_string();
    };

    let mut systems: Vec<System> = vec![System::new(Kind::Agent(default_cs), &stores, default_cs, false)];
    for k in [Kind::AgentCbt(default_cs), Kind::Chunk(default_cs), Kind::Plain, Kind::Rsync, Kind::Borg, Kind::Restic] {
        systems.push(System::new(k, &stores, default_cs, false));
    }
    for &cs in &study {
        if cs != default_cs {
            systems.push(System::new(Kind::Chunk(cs), &stores, default_cs, true));
        }
    }
    if let Some(t) = &args.tuned {
        systems.push(System::new(Kind::Tuned(parse_size(t)?), &stores, default_cs, true));
    }
    if !only.is_empty() {
        systems.retain(|s| only.contains(&s.id.as_str()));
    }
    res.systems = systems.iter().map(|s| (s.id.clone(), s.label.clone(), s.study)).collect();

    // Ceilings: a cold local read of the image and ssh cat of it, same ssh options as affa.
    if on("ceilings") {
        let f1 = flat("vm1");
        for rep in 1..=args.reps {
            let speed = measure::read_speed(&f1).map_err(|e| e.to_string())?;
            res.add(Rec::ceiling("local-read-cold", rep, size as f64 / speed, size));
            for (name, cold) in [("ssh-cat-cold", true), ("ssh-cat-warm", false)] {
                if !cold && rep > 1 {
                    continue; // the warm figure is for orientation only
                }
                if cold {
                    measure::evict(&[&f1]);
                } else {
                    let _ = measure::hash(&f1);
                }
                let mut c = std::process::Command::new("ssh");
                c.args(affa.ssh_args("sshref", &sshd))
                    .arg(format!("{}@127.0.0.1", sshd.user))
                    .arg(format!("cat {}", f1.display()));
                let cost = measure::run(&mut c, Path::new("/dev/null"), w.remote)?;
                let mut r = Rec::ceiling(name, rep, cost.wall, size);
                r.cost = cost;
                res.add(r);
            }
        }
        let med = |n: &str| {
            measure::median(&res.recs.iter().filter(|r| r.phase == n).map(|r| r.cost.wall).collect::<Vec<_>>())
        };
        log.say(format!(
            "ceilings: local read {:.0} MB/s, ssh cat cold {:.0} MB/s, warm {:.0} MB/s",
            size as f64 / med("local-read-cold") / 1e6,
            size as f64 / med("ssh-cat-cold") / 1e6,
            size as f64 / med("ssh-cat-warm") / 1e6
        ));
        let (cz, czc) = measure::time_self(|| report::zstd1_size(&f1));
        res.compressed_full = Some((cz.map_err(|e| e.to_string())?, czc.wall));
    }

    let src_dir = |vm: &str| ds.join(vm);
    let backup_all = |systems: &mut Vec<System>,
                      w: &World,
                      res: &mut Results,
                      phase: &str,
                      rep: u32,
                      vm: &str,
                      disk: u64,
                      which: &dyn Fn(&System) -> bool|
     -> Result<(), String> {
        for s in systems.iter_mut().filter(|s| which(s)) {
            measure::evict(&[&src_dir(vm), &s.store_dir()]);
            let waited = measure::settle(&src_dir(vm), Duration::from_secs(2), Duration::from_secs(60))
                + measure::recovered(&data, baseline, Duration::from_secs(120));
            if waited > Duration::from_secs(5) {
                log.say(format!(
                    "{phase} {rep} {}: waited {:.0} s for the disk to be idle and its writes back to normal",
                    s.id,
                    waited.as_secs_f64()
                ));
            }
            // The VM in the tag: the scaling row runs the same phase and rep on two VMs.
            let b = s.backup(w, vm, &format!("{phase}{rep}-{vm}"))?;
            log.say(format!(
                "{phase} {rep} {:<10} {:>7.1} s  ssh {:>9}  growth {:>9}  store {:>9}  rss {:>4} MiB  cpu {:.1}+{:.1} s",
                s.id,
                b.cost.wall,
                b.bytes_ssh.map(|x| format!("{:.1} MB", x as f64 / 1e6)).unwrap_or("-".into()),
                format!("{:.1} MB", b.growth as f64 / 1e6),
                format!("{:.1} MB", b.store_after as f64 / 1e6),
                b.cost.maxrss_kib / 1024,
                b.cost.cpu_local,
                b.cost.cpu_remote
            ));
            res.add(Rec::backup(phase, &s.id, rep, vm, disk, &b));
            s.prune_old(vm);
        }
        Ok(())
    };
    let all = |_: &System| true;
    let world_a_vms = ["vm1", "vm2"];

    if on("full") {
        for rep in 1..=args.reps {
            tick(&mut w, 0, 10);
            // The study's other chunk sizes: one full backup (their incrementals repeat).
            for s in systems.iter_mut().filter(|s| rep == args.reps || !s.study) {
                s.reset(&w, &world_a_vms)?;
            }
            backup_all(&mut systems, &w, &mut res, "full", rep, "vm1", size, &|s: &System| {
                rep == args.reps || !s.study
            })?;
        }
    } else {
        return Err("--skip full leaves the incremental scenarios without a base".into());
    }
    let change_phase = |name: &str| -> Option<(f64, bool)> {
        match name {
            "clustered" => Some((0.01, true)),
            "scattered" => Some((0.001, false)),
            _ => None,
        }
    };
    for phase in ["clustered", "scattered"] {
        if !on(phase) {
            continue;
        }
        let (frac, clustered) = change_phase(phase).unwrap();
        for rep in 1..=args.reps {
            let seed = gen::derive(args.seed, &format!("{phase}-{rep}"));
            let extent = if clustered { gen::MIB } else { 4 * gen::KIB };
            let changed = gen::change_frac(&flat("vm1"), size, frac, extent, seed, &filler, &mut via_sim(&sim, "vm1"))
                .map_err(|e| e.to_string())?;
            mtime += 3600;
            gen::set_mtime(&flat("vm1"), mtime).map_err(|e| e.to_string())?;
            res.changed.push((phase.to_string(), rep, changed));
            tick(&mut w, 0, 60);
            backup_all(&mut systems, &w, &mut res, phase, rep, "vm1", size, &all)?;
        }
    }
    if on("clone") {
        log.say("cloning vm1 to vm2 with 5% divergence");
        // vm2 has no archive yet (every system's first run of it reads it all): the copy may go
        // to the file directly; the divergence is a guest write as every change.
        gen::copy_sparse(&flat("vm1"), &flat("vm2")).map_err(|e| e.to_string())?;
        let seed = gen::derive(args.seed, "clone");
        let changed = gen::change_frac(&flat("vm2"), size, 0.05, gen::MIB, seed, &filler, &mut via_sim(&sim, "vm2"))
            .map_err(|e| e.to_string())?;
        mtime += 3600;
        gen::set_mtime(&flat("vm2"), mtime).map_err(|e| e.to_string())?;
        res.changed.push(("clone".into(), 1, changed));
        tick(&mut w, 0, 60);
        // The study's other chunk sizes skip it: their clone growth is the new staging copy plus
        // the same divergence as in the clustered scenario.
        backup_all(&mut systems, &w, &mut res, "clone", 1, "vm2", size, &|s: &System| !s.study)?;
    }
    if on("restore") {
        let want = measure::hash(&flat("vm1")).map_err(|e| e.to_string())?;
        let out = data.join("restore");
        for rep in 1..=args.reps {
            for s in systems.iter() {
                let (cost, file) = s.restore(&w, "vm1", &out, &rep.to_string())?;
                let ok = if rep == 1 { measure::hash(&file).map(|h| h == want).unwrap_or(false) } else { true };
                if !ok {
                    return Err(format!("{}: the restored {} differs from the newest vm1", s.id, file.display()));
                }
                log.say(format!(
                    "restore {rep} {:<10} {:>7.1} s  {:>6.0} MB/s  rss {:>4} MiB",
                    s.id,
                    cost.wall,
                    size as f64 / cost.wall / 1e6,
                    cost.maxrss_kib / 1024
                ));
                let mut r = Rec::new("restore", &s.id, rep, "vm1", size);
                r.cost = cost;
                r.verified = Some(rep == 1);
                res.add(r);
            }
        }
        let _ = fs::remove_dir_all(&out);
    }
    // A failure here loses only these rows (named in BENCHMARKS.md), not the run.
    if on("restore-host") {
        if let Err(e) = restore_host(args, &w, &systems, &mut res, &log, &filler, size) {
            log.say(format!("restore to the host failed: {e}"));
            res.errors.push(format!("restore to the host: {e}"));
        }
    }
    if on("mount") {
        if let Some(s) = systems.iter().find(|s| s.id == "agent") {
            if let Err(e) = mount_reads(args, &w, s, &mut res, &log, size) {
                log.say(format!("mount failed: {e}"));
                res.errors.push(format!("mount: {e}"));
            }
        }
    }
    if on("offsite") {
        // The agent system's first archive and a 1% clustered incremental, in a store of its
        // own; the change goes through the simulator as every change (vm1 is not read by the
        // phases above any more).
        let mut step = |w: &mut World, change: bool| -> Result<u64, String> {
            let mut changed = 0;
            if change {
                let seed = gen::derive(args.seed, "offsite-clustered");
                changed =
                    gen::change_frac(&flat("vm1"), size, 0.01, gen::MIB, seed, &filler, &mut via_sim(&sim, "vm1"))
                        .map_err(|e| e.to_string())?;
                mtime += 3600;
                gen::set_mtime(&flat("vm1"), mtime).map_err(|e| e.to_string())?;
            }
            tick(w, 0, 60);
            Ok(changed)
        };
        if let Err(e) = offsite_phase(args, &mut w, &mut res, &log, &stores, &data, default_cs, size, &mut step) {
            log.say(format!("offsite failed: {e}"));
            res.errors.push(format!("offsite: {e}"));
        }
        let _ = fs::remove_dir_all(stores.join("agent-offsite"));
    }
    // World A is done: free its disk.
    res.store_sizes_a = systems.iter().map(|s| (s.id.clone(), s.cum)).collect();
    for s in systems.iter() {
        let _ = fs::remove_dir_all(&s.root);
    }
    for vm in ["vm1", "vm2"] {
        if let Ok(f) = fs::OpenOptions::new().write(true).open(flat(vm)) {
            let _ = f.set_len(0);
            let _ = f.set_len(size);
        }
    }

    if scaling > 0 {
        // Issue 14's scaling row: the same clustered change (1% of --size, 1 MiB extents) on the
        // --size disk and on one of --cbt-scaling, read through CBT; each on a fresh store of its
        // own (a full pass first: CBT starts at its snapshot). Both full passes run before any
        // timed incremental, then the incrementals alternate between the two disks (4 GiB,
        // 16 GiB, 4 GiB, ...): each size meets the machine and its disk in the same states. The
        // fixed order of before (all of one size, then the other) put every 16 GiB incremental
        // right after the 16 GiB full pass, in the virtual disk's slow period (BENCHMARKS-METHOD.md).
        let pair = [("vm1", size), ("vm5", scaling)];
        let mut sys: Vec<Vec<System>> = Vec::new();
        for (vm, sz) in pair {
            log.say(format!("CBT scaling: generating {vm} ({})", human(sz)));
            gen::generate(&flat(vm), sz, gen::derive(args.seed, &format!("scaling-{vm}")), &filler)
                .map_err(|e| e.to_string())?;
            mtime += 3600;
            gen::set_mtime(&flat(vm), mtime).map_err(|e| e.to_string())?;
            let mut s =
                System::new(Kind::AgentCbt(default_cs), &stores.join(format!("scaling-{vm}")), default_cs, false);
            s.reset(&w, &[vm])?;
            sys.push(vec![s]);
        }
        for (i, (vm, sz)) in pair.iter().enumerate() {
            tick(&mut w, 0, 60);
            backup_all(&mut sys[i], &w, &mut res, "cbt-scaling-full", 1, vm, *sz, &all)?;
        }
        for rep in 1..=args.scaling_reps.unwrap_or(args.reps) {
            for (i, (vm, sz)) in pair.iter().enumerate() {
                let seed = gen::derive(args.seed, &format!("scaling-{vm}-{rep}"));
                // 1% of --size (not of this disk): the same changed bytes on both.
                let changed = gen::change_frac(&flat(vm), size, 0.01, gen::MIB, seed, &filler, &mut via_sim(&sim, vm))
                    .map_err(|e| e.to_string())?;
                mtime += 3600;
                gen::set_mtime(&flat(vm), mtime).map_err(|e| e.to_string())?;
                res.changed.push((format!("cbt-scaling-{vm}"), rep, changed));
                tick(&mut w, 0, 60);
                backup_all(&mut sys[i], &w, &mut res, "cbt-scaling", rep, vm, *sz, &all)?;
            }
        }
        for (i, (vm, sz)) in pair.iter().enumerate() {
            let _ = fs::remove_dir_all(&sys[i][0].root);
            if let Ok(f) = fs::OpenOptions::new().write(true).open(flat(vm)) {
                let _ = f.set_len(0);
                let _ = f.set_len(*sz);
            }
        }
    }

    if on("nightly") {
        log.say(format!("thirty nights: generating vm3 ({})", human(nsize)));
        gen::generate(&flat("vm3"), nsize, gen::derive(args.seed, "vm3"), &filler).map_err(|e| e.to_string())?;
        mtime += 86400;
        gen::set_mtime(&flat("vm3"), mtime).map_err(|e| e.to_string())?;
        tick(&mut w, 1, 0);
        let nsys: Vec<String> = args.nightly_systems.split(',').map(|s| s.trim().to_string()).collect();
        let in_nights = |s: &System| nsys.contains(&s.id);
        for s in systems.iter_mut().filter(|s| in_nights(s)) {
            s.reset(&w, &["vm3"])?;
        }
        backup_all(&mut systems, &w, &mut res, "nightly", 0, "vm3", nsize, &in_nights)?;
        for night in 1..=args.nights {
            let seed = gen::derive(args.seed, &format!("night-{night}"));
            let changed =
                gen::change_frac(&flat("vm3"), nsize, 0.005, gen::MIB, seed, &filler, &mut via_sim(&sim, "vm3"))
                    .map_err(|e| e.to_string())?;
            mtime += 86400;
            gen::set_mtime(&flat("vm3"), mtime).map_err(|e| e.to_string())?;
            res.changed.push(("nightly".into(), night, changed));
            tick(&mut w, 1, 0);
            backup_all(&mut systems, &w, &mut res, "nightly", night, "vm3", nsize, &in_nights)?;
        }
        res.nightly_final = systems
            .iter()
            .filter(|s| in_nights(s))
            .map(|s| {
                let staging = if s.chunked() { measure::du(&s.root.join(s.job("vm3")).join(".staging")) } else { 0 };
                (s.id.clone(), s.cum, staging)
            })
            .collect();
        let (cz, czc) = measure::time_self(|| report::zstd1_size(&flat("vm3")));
        res.nightly_compressed = Some((cz.map_err(|e| e.to_string())?, czc.wall));
        for s in systems.iter() {
            let _ = fs::remove_dir_all(&s.root);
        }
        if let Ok(f) = fs::OpenOptions::new().write(true).open(flat("vm3")) {
            let _ = f.set_len(0);
            let _ = f.set_len(nsize);
        }
    }

    if on("memory") && msize > 0 {
        log.say(format!("peak-memory check: generating vm4 ({})", human(msize)));
        gen::generate(&flat("vm4"), msize, gen::derive(args.seed, "vm4"), &filler).map_err(|e| e.to_string())?;
        mtime += 3600;
        gen::set_mtime(&flat("vm4"), mtime).map_err(|e| e.to_string())?;
        let mut mem = vec![System::new(Kind::Agent(default_cs), &stores, default_cs, false)];
        tick(&mut w, 0, 60);
        mem[0].reset(&w, &["vm4"])?;
        backup_all(&mut mem, &w, &mut res, "memory-full", 1, "vm4", msize, &all)?;
        let _ = fs::remove_dir_all(&mem[0].root);
        if let Ok(f) = fs::OpenOptions::new().write(true).open(flat("vm4")) {
            let _ = f.set_len(0);
        }
    }

    drop(sim);
    drop(sshd);
    res.machine_end();
    res.total_wall = log.t0.elapsed().as_secs_f64();
    let md_path = out_dir.join("BENCHMARKS.md");
    let old = fs::read_to_string(&md_path).unwrap_or_default();
    fs::write(&md_path, res.markdown(&old)).map_err(|e| format!("{}: {e}", md_path.display()))?;
    fs::write(out_dir.join("benchmarks.json"), res.json().to_text()).map_err(|e| e.to_string())?;
    log.say(format!("wrote {} and benchmarks.json", md_path.display()));
    if !args.keep_data {
        let _ = fs::remove_dir_all(&ds);
        let _ = fs::remove_dir_all(&stores);
    }
    Ok(())
}

/// Guest writes to disk 0 of `vm` through the simulator (`POST /write`): the datastore file
/// every system reads gets the bytes, and the simulator's Changed Block Tracking records them.
fn via_sim<'a>(sim: &'a Sim, vm: &'a str) -> impl FnMut(u64, &[u8]) -> std::io::Result<()> + 'a {
    move |off, buf| sim.guest_write(vm, off, buf)
}

/// Restore to the host (issue 13): `ssh HOST 'cat > FILE' < image` (same ssh options as affa)
/// against `affa --full-restore JOB --to-dir NEW` of each chunked system, `--reps` times into a
/// new directory; then 1% of the last restored disk is changed and the restore repeated over
/// it (only the differing chunks should go over ssh). Every restored disk is compared with the
/// source (BLAKE3).
fn restore_host(
    args: &Args,
    w: &World,
    systems: &[System],
    res: &mut Results,
    log: &Log,
    filler: &Filler,
    size: u64,
) -> Result<(), String> {
    let flat = w.ds.join("vm1/vm1-flat.vmdk");
    let want = measure::hash(&flat).map_err(|e| e.to_string())?;
    // Only what `--restore-host-systems` names (default the agent row).
    let chunked: Vec<&System> = systems
        .iter()
        .filter(|s| s.chunked() && args.restore_host_systems.split(',').any(|x| x.trim() == s.id))
        .collect();
    let check = |file: &Path, what: &str| -> Result<(), String> {
        if measure::hash(file).map_err(|e| e.to_string())? != want {
            return Err(format!("{what}: {} differs from the newest vm1", file.display()));
        }
        Ok(())
    };
    for rep in 1..=args.reps {
        let cat_dir = w.ds.join("vm1-cat");
        let _ = fs::remove_dir_all(&cat_dir);
        fs::create_dir_all(&cat_dir).map_err(|e| e.to_string())?;
        measure::evict(&[&flat]);
        let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let ssh: Vec<String> = std::iter::once("ssh".to_string())
            .chain(w.affa.ssh_args(&w.ssh_job, w.sshd))
            .chain([format!("{}@127.0.0.1", w.sshd.user), format!("cat > {}", cat_dir.join("vm1-flat.vmdk").display())])
            .map(|a| q(&a))
            .collect();
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(format!("{} < {}", ssh.join(" "), q(&flat.display().to_string())));
        let cost = measure::run(&mut c, &w.logs.join(format!("ssh-cat-write-{rep}.log")), w.remote)?;
        if rep == 1 {
            check(&cat_dir.join("vm1-flat.vmdk"), "ssh cat > file")?;
        }
        let _ = fs::remove_dir_all(&cat_dir);
        log.say(format!(
            "restore-host {rep} ssh-cat>   {:>7.1} s  {:>6.0} MB/s",
            cost.wall,
            size as f64 / cost.wall / 1e6
        ));
        let mut r = Rec::new("ssh-cat-write", "ceiling", rep, "vm1", size);
        r.cost = cost;
        res.add(r);
        for s in &chunked {
            let dir = format!("vm1-r-{}", s.id);
            let _ = fs::remove_dir_all(w.ds.join(&dir));
            let (cost, sent, split) = s.restore_host(w, "vm1", &dir, &rep.to_string())?;
            if rep == 1 {
                check(&w.ds.join(&dir).join("vm1-flat.vmdk"), &s.id)?;
            }
            log.say(format!(
                "restore-host {rep} {:<10} {:>7.1} s  {:>6.0} MB/s  sent {}  rss {} + agent {} MiB  cpu {:.1}+{:.1} s",
                s.id,
                cost.wall,
                size as f64 / cost.wall / 1e6,
                sent.map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or("-".into()),
                cost.maxrss_kib / 1024,
                cost.agent_rss_kib / 1024,
                cost.cpu_local,
                cost.cpu_remote
            ));
            let mut r = Rec::new("restore-host", &s.id, rep, "vm1", size);
            r.cost = cost;
            r.bytes_ssh = sent;
            r.verified = Some(rep == 1);
            r.extra = split;
            res.add(r);
            if rep < args.reps {
                let _ = fs::remove_dir_all(w.ds.join(&dir));
            }
        }
    }
    // Over a target that differs by 1% (clustered, as the incremental scenario).
    for s in &chunked {
        let dir = format!("vm1-r-{}", s.id);
        let target = w.ds.join(&dir).join("vm1-flat.vmdk");
        // The target is older than the archive (as a disk being rolled forward): a newer one is
        // kept by the agent under --preserve-newer's default, and the restore's check then fails.
        let old = fs::metadata(&target).map(|m| std::os::unix::fs::MetadataExt::mtime(&m)).unwrap_or(0);
        // Not a disk of a VM (no simulator behind it): written directly.
        let seed = gen::derive(args.seed, "restore-1pct");
        let mut direct = gen::direct(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let changed =
            gen::change_frac(&target, size, 0.01, gen::MIB, seed, filler, &mut direct).map_err(|e| e.to_string())?;
        gen::set_mtime(&target, old - 3600).map_err(|e| e.to_string())?;
        let (cost, sent, split) = s.restore_host(w, "vm1", &dir, "1pct")?;
        check(&target, &format!("{} over a 1% different target", s.id))?;
        log.say(format!(
            "restore-host 1% {:<10} {:>7.1} s  sent {} (target changed: {} MiB)",
            s.id,
            cost.wall,
            sent.map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or("-".into()),
            changed >> 20
        ));
        let mut r = Rec::new("restore-host-1pct", &s.id, 1, "vm1", size);
        r.cost = cost;
        r.bytes_ssh = sent;
        r.verified = Some(true);
        r.extra = split;
        r.extra.push(("target_bytes_changed".into(), changed as f64));
        res.add(r);
        let _ = fs::remove_dir_all(w.ds.join(&dir));
    }
    Ok(())
}

/// Reading the chunked disk through the mount (issue 16), `--reps` times, store cold and a
/// fresh mount each time: `affa --unchunk` into a tmpfs (/dev/shm: no disk write, the closest
/// to /dev/null `--unchunk` allows), a sequential read of the mounted file; then random 4 KiB
/// reads at seeded offsets, cold (store evicted, fresh mount) and warm (the same offsets again).
fn mount_reads(args: &Args, w: &World, s: &System, res: &mut Results, log: &Log, size: u64) -> Result<(), String> {
    let job = s.job("vm1");
    let rel = "vmfs/volumes/datastore1/vm1/vm1-flat.vmdk";
    let mnt = w.logs.parent().unwrap_or(&w.logs).join("mnt");
    for rep in 1..=args.reps {
        let shm = PathBuf::from(format!("/dev/shm/affa-bench-unchunk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&shm);
        measure::evict(&[&s.store_dir()]);
        let mut c = w.affa.cmd();
        c.args(["--unchunk", &job, "scheduled.0", "--to"]).arg(&shm);
        let cost = measure::run(&mut c, &w.logs.join(format!("unchunk-shm-{rep}.log")), measure::Remote(None));
        let _ = fs::remove_dir_all(&shm);
        let cost = cost?;
        let mut r = Rec::new("unchunk-null", &s.id, rep, "vm1", size);
        r.cost = cost.clone();
        res.add(r);

        measure::evict(&[&s.store_dir()]);
        let m = mount::Mounted::new(w.affa, &job, "scheduled.0", &mnt)?;
        let (secs, n) = mount::sequential(&m.dir.join(rel)).map_err(|e| format!("reading through the mount: {e}"))?;
        drop(m);
        if n != size {
            return Err(format!("the mount showed {n} bytes of {rel}, the disk has {size}"));
        }
        log.say(format!(
            "mount {rep}: sequential {:.1} s ({:.0} MB/s), unchunk to tmpfs {:.1} s ({:.0} MB/s)",
            secs,
            size as f64 / secs / 1e6,
            cost.wall,
            size as f64 / cost.wall / 1e6
        ));
        let mut r = Rec::new("mount-seq", &s.id, rep, "vm1", size);
        r.cost.wall = secs;
        res.add(r);
    }
    let offs = mount::offsets(size, args.mount_reads, gen::derive(args.seed, "mount-random"));
    measure::evict(&[&s.store_dir()]);
    let m = mount::Mounted::new(w.affa, &job, "scheduled.0", &mnt)?;
    for pass in ["cold", "warm"] {
        let lat =
            mount::random_reads(&m.dir.join(rel), &offs).map_err(|e| format!("reading through the mount: {e}"))?;
        let (med, p99) = (mount::quantile(&lat, 0.5), mount::quantile(&lat, 0.99));
        log.say(format!("mount random 4 KiB {pass}: median {:.3} ms, p99 {:.3} ms", med * 1e3, p99 * 1e3));
        let mut r = Rec::new(&format!("mount-random-{pass}"), &s.id, 1, "vm1", size);
        r.cost.wall = lat.iter().sum();
        r.extra = vec![
            ("reads".into(), lat.len() as f64),
            ("median_s".into(), med),
            ("p99_s".into(), p99),
            ("max_s".into(), lat.iter().cloned().fold(0.0, f64::max)),
        ];
        res.add(r);
    }
    drop(m);
    Ok(())
}

/// Offsite copies to a RADOS Gateway the bench starts (issue 19): the agent system's first
/// archive (a full backup of vm1 into a fresh store) and then a 1% clustered incremental, each
/// copied to the gateway three ways, one bucket each: `affa --offsite JOB` (encrypted chunks the
/// bucket lacks, then the archive's index), `restic backup` of the VM directory to an s3
/// repository (what a user would pick instead of affa + offsite), `rclone sync` of affa's pool
/// directory (the store copied as files: unencrypted, without the archives' manifests). Then,
/// `--reps` times, the newest disk restored from the bucket to a new local directory:
/// `affa --unchunk JOB DATE --from-offsite --to DIR` against `restic restore`; the first
/// repetition's disks are compared (BLAKE3) with vm1. One upload each (a repetition would need
/// fresh buckets and the old disk back): wall times are single runs.
#[allow(clippy::too_many_arguments)] // the phase's world: the same parameters as main's run
fn offsite_phase(
    args: &Args,
    w: &mut World,
    res: &mut Results,
    log: &Log,
    stores: &Path,
    data: &Path,
    default_cs: u64,
    size: u64,
    step: &mut dyn FnMut(&mut World, bool) -> Result<u64, String>,
) -> Result<(), String> {
    let work = data.join("offsite");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    // The OSD's sparse block file: room for the three copies and restic's packs.
    let ceph = data.join("ceph");
    let gw = offsite::Gateway::start(&ceph, (6 * size).max(10 << 30))?;
    log.say(format!(
        "offsite: Ceph (mon, mgr, bluestore OSD, radosgw) up in {:.1} s, gateway {}",
        gw.started_in, gw.endpoint
    ));
    let (b_affa, b_restic, b_rclone) = ("bench-affa", "bench-restic", "bench-rclone");
    for b in [b_affa, b_restic, b_rclone] {
        gw.make_bucket(b, &work)?;
    }
    let mut s = System::new(Kind::Agent(default_cs), stores, default_cs, false);
    s.id = "agent-offsite".into();
    s.root = stores.join("agent-offsite");
    s.reset(w, &["vm1"])?;
    let job = s.job("vm1");
    let creds = work.join("offsite.credentials");
    fs::write(&creds, format!("accessKey={}\nsecretKey={}\n", offsite::ACCESS, offsite::SECRET))
        .map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    }
    w.affa.append(
        &format!("{job}.conf"),
        &format!(
            "offsiteTarget=s3://{b_affa}/vm1\noffsiteEndpoint={}\noffsiteCredentialsFile={}\noffsiteKeyFile={}\noffsiteParallel=4\n",
            gw.endpoint,
            creds.display(),
            work.join("offsite.key").display()
        ),
    )?;
    let repo = format!("s3:{}/{b_restic}", gw.endpoint);
    let restic = |args: &[&str]| {
        let mut c = std::process::Command::new("restic");
        c.arg("-r").arg(&repo).args(args);
        c.env("RESTIC_PASSWORD", "bench").env("RESTIC_CACHE_DIR", work.join("restic-cache"));
        gw.restic_env(&mut c);
        c
    };
    measure::run(
        &mut restic(&["init", "--repository-version", "2"]),
        &w.logs.join("restic-s3-init.log"),
        Remote(None),
    )?;
    let vmdir = w.ds.join("vm1");
    let pool = s.root.join(".affa-pool");
    for (change, phase) in [(false, "offsite-full"), (true, "offsite-incr")] {
        let changed = step(w, change)?;
        if change {
            res.changed.push(("offsite".into(), 1, changed));
        }
        // The archive to copy: affa's own backup of vm1 (measured as the other backups).
        measure::evict(&[&vmdir, &s.store_dir()]);
        measure::evict(&[&ceph]);
        let b = s.backup(w, "vm1", phase)?;
        log.say(format!("{phase} affa --run {:.1} s, store growth {:.1} MB", b.cost.wall, b.growth as f64 / 1e6));
        res.add(Rec::backup(&format!("{phase}-run"), "affa-offsite", 1, "vm1", size, &b));
        let mut rows: Vec<(&str, std::process::Command, &str)> = Vec::new();
        let mut c = w.affa.cmd();
        c.args(["--offsite", &job]);
        rows.push(("affa-offsite", c, b_affa));
        rows.push(("restic-s3", restic(&["backup", "--host", "bench", &vmdir.display().to_string()]), b_restic));
        let mut c = std::process::Command::new("rclone");
        c.arg("sync").arg(&pool).arg(format!("bench:{b_rclone}/pool"));
        gw.rclone_env(&mut c, &work.join("rclone.conf"));
        rows.push(("rclone-pool", c, b_rclone));
        for (id, mut c, bucket) in rows {
            measure::evict(&[&vmdir, &s.store_dir(), &ceph]);
            let m = offsite::measured(&gw, bucket, &mut c, &w.logs.join(format!("{id}-{phase}.log")))?;
            log.say(format!(
                "{phase} {id:<13} {:>7.1} s  bucket +{:.1} MB ({} objects)  gateway received {}  requests {}",
                m.cost.wall,
                m.stored as f64 / 1e6,
                m.objects,
                m.received.map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or("-".into()),
                m.requests.map(|b| b.to_string()).unwrap_or("-".into())
            ));
            let mut r = Rec::new(phase, id, 1, "vm1", size);
            r.cost = m.cost.clone();
            r.extra = m.extra();
            if change {
                r.extra.push(("changed_bytes".into(), changed as f64));
            }
            res.add(r);
        }
    }
    // Restores of the newest disk from the bucket (the incremental's archive / snapshot).
    let date: String = w.now.chars().filter(char::is_ascii_digit).take(12).collect();
    let flat = vmdir.join("vm1-flat.vmdk");
    let want = measure::hash(&flat).map_err(|e| e.to_string())?;
    let rel_affa = "vmfs/volumes/datastore1/vm1/vm1-flat.vmdk";
    for rep in 1..=args.reps {
        let out = work.join("restore");
        let _ = fs::remove_dir_all(&out);
        let mut c = w.affa.cmd();
        c.args(["--unchunk", &job, &date, "--from-offsite", "--to"]).arg(&out);
        let mut rr = restic(&["restore", "latest", "--host", "bench", "--path"]);
        rr.arg(&vmdir).arg("--target").arg(&out).args(["--include", "vm1-flat.vmdk"]);
        let restic_file = out.join(vmdir.strip_prefix("/").unwrap_or(&vmdir)).join("vm1-flat.vmdk");
        for (id, mut c, bucket, file) in
            [("affa-offsite", c, b_affa, out.join(rel_affa)), ("restic-s3", rr, b_restic, restic_file)]
        {
            let _ = fs::remove_dir_all(&out);
            measure::evict(&[&s.store_dir(), &ceph]);
            let m = offsite::measured(&gw, bucket, &mut c, &w.logs.join(format!("{id}-offsite-restore-{rep}.log")))?;
            if rep == 1 && measure::hash(&file).map_err(|e| format!("{}: {e}", file.display()))? != want {
                return Err(format!("{id}: the disk restored from the bucket, {}, differs from vm1", file.display()));
            }
            log.say(format!(
                "offsite-restore {rep} {id:<13} {:>7.1} s  {:>6.0} MB/s  gateway sent {}  requests {}",
                m.cost.wall,
                size as f64 / m.cost.wall / 1e6,
                m.sent.map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or("-".into()),
                m.requests.map(|b| b.to_string()).unwrap_or("-".into())
            ));
            let mut r = Rec::new("offsite-restore", id, rep, "vm1", size);
            r.cost = m.cost.clone();
            r.extra = m.extra();
            r.verified = Some(rep == 1);
            res.add(r);
        }
        let _ = fs::remove_dir_all(&out);
    }
    drop(gw);
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(&ceph);
    Ok(())
}
