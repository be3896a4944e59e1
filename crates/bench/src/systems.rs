//! The systems compared: affa on an ESXi job (chunked through affa-agent, the default, with
//! `ESXiCBT=no`; the same with Changed Block Tracking, `ESXiCBT=yes`; chunked through rsync and
//! the staging copy, one per chunk size; and without chunkFiles), plain
//! `rsync --link-dest` over the same ssh, borg and restic reading the image directly. Each has a
//! store directory, a backup of a VM and a restore of its newest version; affa's chunked systems
//! also restore to the host (`--full-restore`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::{AffaConf, Sim, Sshd};
use crate::measure::{self, Cost, Remote};

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// affa ESXi job with chunkFiles=*-flat.vmdk, this chunkSize (bytes) and chunkTransport=auto:
    /// the disk goes through affa-agent (the run fails when the report says otherwise).
    Agent(u64),
    /// Agent(size) with `ESXiCBT=yes`: the first run after a reset is a full pass, every later
    /// one must read the disk through CBT (the run fails when the report says otherwise).
    AgentCbt(u64),
    /// affa ESXi job with chunkFiles=*-flat.vmdk, this chunkSize (bytes) and
    /// chunkTransport=rsync: rsync into the staging copy, then chunking.
    Chunk(u64),
    /// Chunk(size) plus the proposed fixes applied from outside: ssh ControlMaster, --sparse
    /// staging transfer.
    Tuned(u64),
    /// affa ESXi job without chunkFiles.
    Plain,
    Rsync,
    Borg,
    Restic,
}

pub struct System {
    pub id: String,
    pub label: String,
    pub kind: Kind,
    /// Where the store lives (RootDir, rsync's target, the borg/restic repo's parent).
    pub root: PathBuf,
    /// Only in the chunk-size study (not a main column of the comparison tables).
    pub study: bool,
    /// Old versions are deleted after their growth was measured (each is a full copy; the bench
    /// would run out of disk otherwise). The store size is then the sum of measured growths.
    pub prune: bool,
    /// Store bytes, accumulated from measured growths since the last reset.
    pub cum: u64,
    seq: u32,
    /// The newest version number of each VM.
    last: std::collections::HashMap<String, u32>,
}

/// One measured backup.
pub struct Backup {
    pub cost: Cost,
    pub bytes_ssh: Option<u64>,
    pub growth: i64,
    pub store_after: u64,
    /// Extra figures (affa's report: pool bytes added, staging size...).
    pub extra: Vec<(String, f64)>,
}

pub struct World<'a> {
    pub affa: &'a AffaConf,
    pub sshd: &'a Sshd,
    pub sim: &'a Sim,
    /// The datastore dir (VM dirs below it), served by the sshd at the same path.
    pub ds: PathBuf,
    pub logs: PathBuf,
    pub remote: Remote,
    /// A job whose known-hosts file plain ssh/rsync reuse.
    pub ssh_job: String,
    /// AFFA_FAKE_NOW of the next run.
    pub now: String,
}

pub fn human_cs(cs: u64) -> String {
    if cs >= 1 << 20 {
        format!("{}M", cs >> 20)
    } else {
        format!("{}K", cs >> 10)
    }
}

impl System {
    pub fn new(kind: Kind, stores: &Path, default_cs: u64, study: bool) -> System {
        let (id, label) = match &kind {
            Kind::Agent(cs) if *cs == default_cs => ("agent".into(), "affa ESXi, chunkFiles, agent (default)".into()),
            Kind::AgentCbt(cs) if *cs == default_cs => ("agentcbt".into(), "affa ESXi, chunkFiles, agent + CBT".into()),
            Kind::AgentCbt(cs) => {
                let h = human_cs(*cs);
                (format!("agentcbt{}", h.to_lowercase()), format!("affa ESXi, chunkFiles, chunkSize={h}, agent + CBT"))
            }
            Kind::Agent(cs) => {
                let h = human_cs(*cs);
                (format!("agent{}", h.to_lowercase()), format!("affa ESXi, chunkFiles, chunkSize={h}, agent"))
            }
            Kind::Chunk(cs) => {
                let h = human_cs(*cs);
                let size = if *cs == default_cs { String::new() } else { format!("chunkSize={h}, ") };
                (format!("chunk{}", h.to_lowercase()), format!("affa ESXi, chunkFiles, {size}rsync+staging"))
            }
            Kind::Tuned(cs) => (
                format!("tuned{}", human_cs(*cs).to_lowercase()),
                format!("affa ESXi, chunkSize={} + staging --sparse + ssh ControlMaster (proposed)", human_cs(*cs)),
            ),
            Kind::Plain => ("plain".into(), "affa ESXi, no chunkFiles (Affa 3)".into()),
            Kind::Rsync => ("rsync".into(), "rsync --link-dest over ssh".into()),
            Kind::Borg => ("borg".into(), "borg 1.2, local read".into()),
            Kind::Restic => ("restic".into(), "restic 0.14, local read".into()),
        };
        let prune = matches!(kind, Kind::Plain | Kind::Rsync);
        System { root: stores.join(&id), id, label, kind, study, prune, cum: 0, seq: 0, last: Default::default() }
    }

    pub fn chunked(&self) -> bool {
        matches!(self.kind, Kind::Agent(_) | Kind::AgentCbt(_) | Kind::Chunk(_) | Kind::Tuned(_))
    }

    /// The chunkTransport the report must show.
    fn transport(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Agent(_) | Kind::AgentCbt(_) => Some("agent"),
            Kind::Chunk(_) | Kind::Tuned(_) => Some("rsync"),
            _ => None,
        }
    }

    pub fn job(&self, vm: &str) -> String {
        format!("{}-{vm}", self.id)
    }

    fn repo(&self) -> PathBuf {
        self.root.join("repo")
    }

    fn tool_env(&self, c: &mut Command) {
        c.env("BORG_BASE_DIR", self.root.join("borg-base"))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_DELETE_I_KNOW_WHAT_I_AM_DOING", "YES")
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", self.root.join("restic-cache"));
    }

    /// What counts as the store.
    pub fn store_dir(&self) -> PathBuf {
        match self.kind {
            Kind::Borg | Kind::Restic => self.repo(),
            _ => self.root.clone(),
        }
    }

    pub fn store_size(&self) -> u64 {
        measure::du(&self.store_dir())
    }

    /// Delete the store and start an empty one (repository init is not timed).
    pub fn reset(&mut self, w: &World, vms: &[&str]) -> Result<(), String> {
        let _ = fs::remove_dir_all(&self.root);
        fs::create_dir_all(&self.root).map_err(|e| e.to_string())?;
        self.seq = 0;
        self.last.clear();
        match self.kind {
            Kind::Agent(cs) | Kind::AgentCbt(cs) | Kind::Chunk(cs) | Kind::Tuned(cs) => {
                let via = if matches!(self.kind, Kind::Agent(_) | Kind::AgentCbt(_)) { "auto" } else { "rsync" };
                for vm in vms {
                    w.affa.add_job(
                        &self.job(vm),
                        vm,
                        &self.root,
                        Some((&human_cs(cs), via)),
                        matches!(self.kind, Kind::Tuned(_)),
                        matches!(self.kind, Kind::AgentCbt(_)),
                        w.sshd,
                        w.sim,
                    )?;
                }
            }
            Kind::Plain => {
                for vm in vms {
                    w.affa.add_job(&self.job(vm), vm, &self.root, None, false, false, w.sshd, w.sim)?;
                }
            }
            Kind::Rsync => {}
            Kind::Borg => {
                let mut c = Command::new("borg");
                c.args(["init", "-e", "none"]).arg(self.repo());
                self.tool_env(&mut c);
                measure::run(&mut c, &w.logs.join(format!("{}-init.log", self.id)), Remote(None))?;
            }
            Kind::Restic => {
                let mut c = Command::new("restic");
                c.arg("-r").arg(self.repo()).args(["init", "--repository-version", "2"]);
                self.tool_env(&mut c);
                measure::run(&mut c, &w.logs.join(format!("{}-init.log", self.id)), Remote(None))?;
            }
        }
        self.cum = self.store_size();
        Ok(())
    }

    fn rsync_dir(&self, vm: &str) -> PathBuf {
        self.root.join(vm)
    }

    fn rsync_versions(&self, vm: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            fs::read_dir(self.rsync_dir(vm)).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Back up VM `vm` (its dir `ds/vm`); the page cache was dropped by the caller.
    pub fn backup(&mut self, w: &World, vm: &str, tag: &str) -> Result<Backup, String> {
        let before = self.store_size();
        self.seq += 1;
        let log = w.logs.join(format!("{}-{tag}-{}.log", self.id, self.seq));
        let src = w.ds.join(vm);
        let mut extra = Vec::new();
        // The CBT row's job has an archive of this VM: this run must read it through CBT.
        let want_cbt = matches!(self.kind, Kind::AgentCbt(_)) && self.last.contains_key(vm);
        let (cost, bytes) = match self.kind {
            Kind::Agent(_) | Kind::AgentCbt(_) | Kind::Chunk(_) | Kind::Tuned(_) | Kind::Plain => {
                let job = self.job(vm);
                let times = w.logs.join(format!("{}-{tag}-{}.rsync-times", self.id, self.seq));
                // The wrapper appends: only this run's spans.
                let _ = fs::remove_file(&times);
                let mut c = w.affa.cmd();
                c.env("AFFA_FAKE_NOW", &w.now).env("AFFA_BENCH_RSYNC_LOG", &times).args(["--run", &job]);
                let cost = measure::run(&mut c, &log, w.remote)?;
                // (start, end) of each rsync affa ran, in order.
                let spans: Vec<(f64, f64)> = fs::read_to_string(&times)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| {
                        let v: Vec<f64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                        (v.len() >= 2).then(|| (v[0], v[1]))
                    })
                    .collect();
                if let Some(first) = spans.first() {
                    extra.push(("rsync_s".to_string(), spans.iter().map(|(a, b)| b - a).sum::<f64>()));
                    extra.push(("before_first_rsync_s".to_string(), first.0 - cost.start));
                    // ESXi: [descriptor], disk(s), config: the gap after the disk copy is chunking +
                    // snapshot removal.
                    if spans.len() >= 2 {
                        let last = spans[spans.len() - 1];
                        let prev = spans[spans.len() - 2];
                        extra.push(("between_disk_and_config_rsync_s".to_string(), last.0 - prev.1));
                        extra.push(("after_last_rsync_s".to_string(), cost.start + cost.wall - last.1));
                    }
                }
                let rep =
                    fs::read_to_string(self.root.join(&job).join("scheduled.0/.AFFA3-REPORT")).unwrap_or_default();
                let num = |k: &str| -> Option<u64> {
                    rep.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).and_then(|v| v.trim().parse().ok())
                };
                // rsync's payload both ways, plus the agent's frames received (the requests affa
                // sends it are not counted: a few bytes per chunk).
                let bytes = match (num("TotalBytesSent"), num("TotalBytesReceived")) {
                    (Some(a), Some(b)) => Some(a + b + num("ChunkBytesReceived").unwrap_or(0)),
                    _ => None,
                };
                // The row must be what its label says: the report names the transport used.
                if let Some(want) = self.transport() {
                    let got = rep.lines().find_map(|l| l.strip_prefix("ChunkTransport=")).unwrap_or("(none)");
                    if got.trim() != want {
                        return Err(format!(
                            "{}: the report of {job} says ChunkTransport={} where this system needs {want} ({})",
                            self.id,
                            got.trim(),
                            rep.lines().find_map(|l| l.strip_prefix("ChunkTransportNote=")).unwrap_or("no note")
                        ));
                    }
                }
                for (k, key) in
                    [("agent_source_read", "ChunkSourceBytesRead"), ("agent_received", "ChunkBytesReceived")]
                {
                    if let Some(v) = num(key) {
                        extra.push((k.to_string(), v as f64));
                    }
                }
                // How each disk was read (ESXiDiskReadN = MODE HOSTBYTESREAD BYTESSENT [(reason)]).
                let reads: Vec<&str> = rep
                    .lines()
                    .filter_map(|l| l.strip_prefix("ESXiDiskRead")?.split_once('=').map(|x| x.1.trim()))
                    .collect();
                let host: Vec<u64> = reads.iter().filter_map(|r| r.split_whitespace().nth(1)?.parse().ok()).collect();
                if !host.is_empty() {
                    extra.push(("host_bytes_read".to_string(), host.iter().sum::<u64>() as f64));
                }
                if matches!(self.kind, Kind::AgentCbt(_)) {
                    let cbt = !reads.is_empty() && reads.iter().all(|r| r.split_whitespace().next() == Some("cbt"));
                    if want_cbt && !cbt {
                        return Err(format!(
                            "{}: {job}'s run fell back from CBT (report ESXiDiskRead: {}): not a CBT figure",
                            self.id,
                            if reads.is_empty() { "absent".to_string() } else { reads.join("; ") }
                        ));
                    }
                    extra.push(("read_cbt".to_string(), if cbt { 1.0 } else { 0.0 }));
                }
                if let Some(v) = num("ChunkPoolBytesAdded") {
                    extra.push(("pool_bytes_added".to_string(), v as f64));
                }
                if self.chunked() {
                    extra.push((
                        "staging_bytes".to_string(),
                        measure::du(&self.root.join(&job).join(".staging")) as f64,
                    ));
                    extra.push(("pool_files".to_string(), measure::files(&self.root.join(".affa-pool")).len() as f64));
                    let links = measure::files(&self.root.join(&job).join("scheduled.0/.affa-chunks"));
                    extra.push(("archive_chunk_links".to_string(), links.len() as f64));
                    extra.push((
                        "archive_meta_bytes".to_string(),
                        measure::meta_du(&self.root.join(&job).join("scheduled.0")) as f64,
                    ));
                }
                (cost, bytes)
            }
            Kind::Rsync => {
                let dir = self.rsync_dir(vm);
                fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let prev = self.rsync_versions(vm).last().cloned();
                let dest = dir.join(format!("{:04}", self.seq));
                let ssh = std::iter::once("ssh".to_string())
                    .chain(w.affa.ssh_args(&w.ssh_job, w.sshd))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut c = Command::new("rsync");
                c.args(["--archive", "--hard-links", "--numeric-ids", "--sparse", "--stats"])
                    .arg(format!("--rsh={ssh}"));
                if let Some(p) = prev {
                    c.arg(format!("--link-dest={}", p.display()));
                }
                c.arg(format!("{}@127.0.0.1:{}/", w.sshd.user, src.display())).arg(format!("{}/", dest.display()));
                let cost = measure::run(&mut c, &log, w.remote)?;
                let text = fs::read_to_string(&log).unwrap_or_default();
                let num = |k: &str| -> Option<u64> {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(|v| v.split_whitespace().next().unwrap_or("").replace(',', ""))
                        .and_then(|v| v.parse().ok())
                };
                let bytes = match (num("Total bytes sent:"), num("Total bytes received:")) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
                (cost, bytes)
            }
            Kind::Borg => {
                let mut c = Command::new("borg");
                c.args(["create", "--stats", "--compression", "zstd,1", "--chunker-params", "fixed,4194304"])
                    .arg(format!("{}::{vm}-{:04}", self.repo().display(), self.seq))
                    .arg(&src);
                self.tool_env(&mut c);
                (measure::run(&mut c, &log, Remote(None))?, None)
            }
            Kind::Restic => {
                let mut c = Command::new("restic");
                c.arg("-r").arg(self.repo()).args(["backup", "--host", "bench"]).arg(&src);
                self.tool_env(&mut c);
                (measure::run(&mut c, &log, Remote(None))?, None)
            }
        };
        self.last.insert(vm.to_string(), self.seq);
        let after = self.store_size();
        let growth = after as i64 - before as i64;
        self.cum = (self.cum as i64 + growth).max(0) as u64;
        Ok(Backup { cost, bytes_ssh: bytes, growth, store_after: self.cum, extra })
    }

    /// Delete every version but the newest (only for `prune` systems).
    pub fn prune_old(&self, vm: &str) {
        if !self.prune {
            return;
        }
        match self.kind {
            Kind::Plain => {
                let jd = self.root.join(self.job(vm));
                if let Ok(rd) = fs::read_dir(&jd) {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with("scheduled.") && n != "scheduled.0" {
                            let _ = fs::remove_dir_all(e.path());
                        }
                    }
                }
            }
            Kind::Rsync => {
                let v = self.rsync_versions(vm);
                for p in v.iter().take(v.len().saturating_sub(1)) {
                    let _ = fs::remove_dir_all(p);
                }
            }
            _ => {}
        }
    }

    /// Restore the newest version of `vm`'s flat disk into `out` (emptied first); returns the
    /// cost (wall includes the final sync) and the restored file.
    pub fn restore(&self, w: &World, vm: &str, out: &Path, tag: &str) -> Result<(Cost, PathBuf), String> {
        let _ = fs::remove_dir_all(out);
        fs::create_dir_all(out).map_err(|e| e.to_string())?;
        let log = w.logs.join(format!("{}-restore-{tag}.log", self.id));
        let flat = format!("{vm}-flat.vmdk");
        let rel = format!("vmfs/volumes/datastore1/{vm}/{flat}");
        measure::evict(&[&self.store_dir()]);
        let (mut c, file) = match self.kind {
            Kind::Agent(_) | Kind::AgentCbt(_) | Kind::Chunk(_) | Kind::Tuned(_) => {
                // `--unchunk --to` makes the directory itself (an existing one is refused).
                fs::remove_dir(out).map_err(|e| e.to_string())?;
                let mut c = w.affa.cmd();
                c.args(["--unchunk", &self.job(vm), "scheduled.0", "--to"]).arg(out);
                (c, out.join(&rel))
            }
            Kind::Plain => {
                let mut c = Command::new("cp");
                c.arg("--sparse=always")
                    .arg(self.root.join(self.job(vm)).join("scheduled.0").join(&rel))
                    .arg(out.join(&flat));
                (c, out.join(&flat))
            }
            Kind::Rsync => {
                let newest = self.rsync_versions(vm).last().cloned().ok_or("no rsync version")?;
                let mut c = Command::new("cp");
                c.arg("--sparse=always").arg(newest.join(&flat)).arg(out.join(&flat));
                (c, out.join(&flat))
            }
            Kind::Borg => {
                let src = w.ds.join(vm).join(&flat);
                let inner = src.strip_prefix("/").unwrap().to_path_buf();
                let mut c = Command::new("borg");
                c.args(["extract", "--sparse"])
                    .arg(format!("{}::{vm}-{:04}", self.repo().display(), self.last.get(vm).copied().unwrap_or(0)))
                    .arg(&inner)
                    .current_dir(out);
                self.tool_env(&mut c);
                (c, out.join(inner))
            }
            Kind::Restic => {
                let src = w.ds.join(vm);
                let mut c = Command::new("restic");
                c.arg("-r")
                    .arg(self.repo())
                    .args(["restore", "latest", "--host", "bench", "--path"])
                    .arg(&src)
                    .arg("--target")
                    .arg(out)
                    .args(["--include", &flat]);
                self.tool_env(&mut c);
                (c, out.join(src.strip_prefix("/").unwrap()).join(&flat))
            }
        };
        let cost = measure::run(&mut c, &log, Remote(None))?;
        Ok((cost, file))
    }

    /// `affa --full-restore JOB scheduled.0 --to-dir DIR --yes` of `vm` (chunked systems): the VM
    /// restored beside the original on the host's datastore, its chunked disk through the agent
    /// (or staging + rsync). Store cold. Returns the cost and the chunk bytes sent to the agent
    /// (the job log's "N of M chunks sent (B bytes)" lines of this restore).
    #[allow(clippy::type_complexity)] // (cost, bytes sent, phases from the log)
    pub fn restore_host(
        &self,
        w: &World,
        vm: &str,
        to_dir: &str,
        tag: &str,
    ) -> Result<(Cost, Option<u64>, Vec<(String, f64)>), String> {
        let job = self.job(vm);
        let jlog = w.affa.job_log(&job);
        let from = fs::metadata(&jlog).map(|m| m.len()).unwrap_or(0);
        measure::evict(&[&self.store_dir()]);
        let mut c = w.affa.cmd();
        c.args(["--full-restore", &job, "scheduled.0", "--to-dir", to_dir, "--yes"]);
        let cost = measure::run(&mut c, &w.logs.join(format!("{}-restore-host-{tag}.log", self.id)), w.remote)?;
        let text = fs::read(&jlog).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
        let split = log_split(&text);
        let sent: Vec<u64> = text
            .lines()
            .filter(|l| l.contains(" chunks sent ("))
            .filter_map(|l| l.split(" chunks sent (").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        Ok((cost, (!sent.is_empty()).then(|| sent.iter().sum()), split))
    }
}

/// A restore's phases from its job log (timestamps to the second): before the agent started
/// (plan, local chunk check, rsync of the plain files), the agent's transfer (to the last "chunks
/// sent" line), after it (the sha256 check on the host). Empty when the markers are missing.
fn log_split(text: &str) -> Vec<(String, f64)> {
    let ts = |l: &str| chrono::NaiveDateTime::parse_from_str(l.get(..19)?, "%Y-%m-%d %H:%M:%S").ok();
    let lines: Vec<(chrono::NaiveDateTime, &str)> = text.lines().filter_map(|l| Some((ts(l)?, l))).collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else { return Vec::new() };
    let agent = lines.iter().find(|(_, l)| l.contains("through affa-agent "));
    let sent = lines.iter().rev().find(|(_, l)| l.contains(" chunks sent ("));
    let (Some(agent), Some(sent)) = (agent, sent) else { return Vec::new() };
    let d = |a: chrono::NaiveDateTime, b: chrono::NaiveDateTime| (b - a).num_milliseconds() as f64 / 1e3;
    vec![
        ("before_agent_s".into(), d(first.0, agent.0)),
        ("agent_s".into(), d(agent.0, sent.0)),
        ("after_agent_s".into(), d(sent.0, last.0)),
    ]
}
