//! Changed Block Tracking in an ESXi run (issue 14): whether this run may use it (`ESXiCBT`,
//! the host, the transport), switching it on, and for each chunked disk the plan: read only the
//! chunks CBT names since the previous archive's `changeId`, or a full agent pass with its
//! reason; every `ESXiCBTVerifyEvery` CBT runs a verify pass (a full pass compared with what CBT
//! said).
//!
//! Owns: the decision per disk (`plan_disk`), the check of a verify pass (`verify`), the words
//! of every fallback reason. Must never: touch the VM's tracking setting with `ESXiCBT=no`,
//! switch it on while the VM has snapshots that are not affa's, use a previous changeId unless
//! the disk is the same one (device key, UUID, capacity, file, chunk size) and the previous
//! archive's manifest reads, or use CBT for a disk with snapshots of its own (a chain's delta
//! offsets are not the disk's).

use std::path::Path;

use crate::chunk::{self, remote::chunk_ranges, Manifest};
use crate::config::typed::{Cbt, ChunkTransport};
use crate::error::Result;
use crate::esxi::{Client, FrozenDisk, MoRef};
use crate::vmrecord::{DiskRec, ReadMode, VmRecord, ESXI_INI};

/// What this run may do with CBT, decided before the snapshot.
#[derive(Debug, Clone)]
pub struct Setup {
    /// CBT is on for the VM (tracking runs): disks with a usable previous changeId use it.
    pub usable: bool,
    /// Why not (host, mode, transport, just switched on): the full passes' reason.
    pub why_not: Option<String>,
}

/// Before the snapshot: `None` with `ESXiCBT=no` (nothing touched, nothing recorded as a
/// reason). With `auto`/`yes`: CBT switched on where the host supports it and it is off, unless
/// the VM has snapshots of its own (refused, with a warning). `yes` fails a run that cannot use
/// it.
pub fn prepare(
    ctx: &crate::backup::ctx::Ctx,
    client: &Client,
    vm: &MoRef,
    own_snapshots: usize,
    warnings: &mut Vec<String>,
) -> Result<Option<Setup>> {
    let job = ctx.job;
    let esxi = job.esxi_settings()?;
    if esxi.cbt == Cbt::No {
        return Ok(None);
    }
    let not = |why: String| -> Result<Option<Setup>> {
        if esxi.cbt == Cbt::Yes {
            bail!(Remote, "ESXiCBT=yes, but Changed Block Tracking cannot be used: {why}");
        }
        Ok(Some(Setup { usable: false, why_not: Some(why) }))
    };
    if esxi.vim_cmd.is_some() {
        return not("ESXiSnapshotMode=vim-cmd (the API is read-only on this host)".into());
    }
    if job.chunk.transport == ChunkTransport::Rsync {
        return not("chunkTransport=rsync (CBT needs the agent)".into());
    }
    let state = match client.cbt_state(vm) {
        Ok(s) => s,
        Err(e) => return not(format!("cannot read the VM's CBT state: {e}")),
    };
    if !state.supported {
        return not("the host does not support it for this VM (licence or virtual hardware version)".into());
    }
    if state.enabled {
        return Ok(Some(Setup { usable: true, why_not: None }));
    }
    if own_snapshots > 0 {
        let w = format!("Changed Block Tracking is off for the VM and affa does not switch it on while the VM has {own_snapshots} snapshot(s) of its own (remove them, or switch it on in the vSphere client); this run is a full pass");
        ctx.log.warn(&w);
        warnings.push(w.clone());
        return not("CBT is off and the VM has snapshots of its own".into());
    }
    if let Err(e) = client.enable_cbt(vm) {
        return not(format!("switching it on failed: {e}"));
    }
    ctx.log.info("Changed Block Tracking switched on for the VM: tracking starts with this run's snapshot, so this run is a full pass and the next ones read only what changed");
    Ok(Some(Setup {
        usable: false,
        why_not: Some("CBT was just switched on (tracking starts with this run's snapshot)".into()),
    }))
}

/// How one chunked disk is read this run.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Only `ranges` (chunk indices); the rest from `prev`.
    Cbt { prev: Manifest, ranges: Vec<(u64, u64)>, runs: u32 },
    /// A full pass, then compared with `prev` outside `ranges` (what CBT said).
    Verify { prev: Manifest, ranges: Vec<(u64, u64)> },
    /// A full pass; the reason when CBT was wanted.
    Full(Option<String>),
}

/// The previous archive's view of a disk: its record entry and its manifest.
pub struct Previous {
    pub record: Option<VmRecord>,
    pub archive: Option<std::path::PathBuf>,
    /// An ESXi restore of this job ran after that archive was made ([`RESTORED`]).
    pub restored: bool,
}

/// In the job's directory: written by an ESXi restore of the job before it writes anything on
/// the host; it holds the Date of the newest valid archive at that moment. A restore's writes
/// (through the agent or rsync, beside the hypervisor) never reach the host's change tracking,
/// which goes on in the same epoch: a CBT backup from an archive made before the restore would
/// carry chunks the restore replaced. Until an archive newer than that Date exists (made by a
/// full pass, since every disk's plan is then a full pass), no disk uses CBT.
pub const RESTORED: &str = ".affa-esxi-restored";

/// Record that a restore of the job starts now (before anything is written on the host).
pub fn mark_restored(job_dir: &Path) -> Result<()> {
    // The newest archive, or a complete transfer a crash kept from its rotation (the next run
    // rotates it in first: it was made before this restore too).
    let newest = crate::archive::newest_valid(job_dir)?;
    let rotated = newest.as_ref().and_then(|a| a.report.as_ref()).and_then(|r| r.date()).unwrap_or("0").to_string();
    let pending = crate::archive::running_report(job_dir).and_then(|r| r.date().map(String::from));
    let num = |d: &str| d.parse::<u64>().unwrap_or(0);
    let date = match pending {
        Some(p) if num(&p) > num(&rotated) => p,
        _ => rotated,
    };
    crate::fsutil::create_private_dir(job_dir)?;
    crate::fsutil::write_atomic(
        &job_dir.join(RESTORED),
        format!("restored-after={date}\n").as_bytes(),
        crate::fsutil::Perm::Mode(0o600),
    )
}

/// Whether a restore ran after the archive dated `date` (a marker that does not read: yes).
fn restored_after(job_dir: &Path, date: &str) -> bool {
    match std::fs::read_to_string(job_dir.join(RESTORED)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => true,
        Ok(t) => match t.trim().strip_prefix("restored-after=").and_then(|d| d.parse::<u64>().ok()) {
            Some(after) => date.parse::<u64>().map_or(true, |d| d <= after),
            None => true,
        },
    }
}

impl Previous {
    /// The newest valid archive's VM record (none: no archive, or a record that does not read).
    pub fn load(job_dir: &Path) -> Result<Previous> {
        let Some(a) = crate::archive::newest_valid(job_dir)? else {
            return Ok(Previous { record: None, archive: None, restored: false });
        };
        let record = std::fs::read_to_string(a.path.join(ESXI_INI)).ok().and_then(|t| VmRecord::parse(&t).ok());
        let date = a.report.as_ref().and_then(|r| r.date()).unwrap_or("0");
        let restored = restored_after(job_dir, date);
        Ok(Previous { record, archive: Some(a.path), restored })
    }
}

/// The plan of one chunked disk (`links`: the chain below affa's snapshot; `rel`: the archive
/// path of its extent).
#[allow(clippy::too_many_arguments)]
pub fn plan_disk(
    ctx: &crate::backup::ctx::Ctx,
    setup: &Setup,
    client: &Client,
    vm: &MoRef,
    snapshot: &MoRef,
    disk: &FrozenDisk,
    links: usize,
    rel: &Path,
    prev: &Previous,
) -> Plan {
    let full = |why: &str| Plan::Full(Some(why.to_string()));
    if let Some(w) = &setup.why_not {
        return full(w);
    }
    if links != 1 {
        return full("the disk has snapshots of the VM's own (a chain)");
    }
    let Some(now_id) = &disk.change_id else { return full("CBT is disabled (the frozen disk has no changeId)") };
    let (Some(record), Some(arch)) = (&prev.record, &prev.archive) else {
        return full("no previous archive with a VM record");
    };
    if prev.restored {
        return full("the VM was restored by affa after the previous archive (CBT does not see a restore's writes)");
    }
    let Some(p) = record.disks.iter().find(|d| d.run.device_key == Some(disk.device_key)) else {
        return full("no previous changeId (the disk is not in the previous archive's record)");
    };
    let Some(prev_id) = &p.run.change_id else { return full("no previous changeId") };
    if p.extent != rel {
        return full("the disk's file changed since the previous archive");
    }
    if p.run.uuid != disk.uuid {
        return full("the disk was re-created (another UUID)");
    }
    if p.size != disk.capacity_bytes {
        return Plan::Full(Some(format!("the capacity changed ({} -> {} bytes)", p.size, disk.capacity_bytes)));
    }
    if uuid_part(prev_id) != uuid_part(now_id) {
        return full("the changeId's UUID part changed (tracking was reset)");
    }
    let m = match chunk::recorded_manifest(arch, rel).map(|mp| chunk::read_manifest(&mp)) {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Plan::Full(Some(format!("the previous archive's manifest fails its check: {e}"))),
        None => return full("the previous archive has no manifest of the disk"),
    };
    if m.chunk_size != ctx.job.chunk.settings.chunk_size {
        return full("the chunk size changed");
    }
    if m.size != disk.capacity_bytes {
        return full("the previous manifest's size differs from the capacity");
    }
    let extents = match client.changed_areas(vm, snapshot, disk, prev_id) {
        Ok(x) => x,
        Err(e) => return Plan::Full(Some(format!("QueryChangedDiskAreas failed: {e}"))),
    };
    let ranges = chunk_ranges(&extents, m.chunk_size, m.size);
    let every = ctx.job.esxi.as_ref().map_or(0, |e| e.cbt_verify_every);
    let runs = p.run.cbt_runs.saturating_add(1);
    if every > 0 && runs >= every {
        Plan::Verify { prev: m, ranges }
    } else {
        Plan::Cbt { prev: m, ranges, runs }
    }
}

/// `52 xx .. xx/N` -> `52 xx .. xx`.
fn uuid_part(change_id: &str) -> &str {
    change_id.rsplit_once('/').map_or(change_id, |(u, _)| u)
}

/// A verify pass: the full pass's manifest `full` against what CBT said (every chunk outside
/// `ranges` unchanged since `prev`). Err: the indices of chunks that changed though CBT did
/// not name them (at most 8 shown).
pub fn verify(prev: &Manifest, ranges: &[(u64, u64)], full: &Manifest) -> std::result::Result<(), String> {
    if prev.size != full.size || prev.chunks.len() != full.chunks.len() {
        return Err(format!("the disk is {} bytes, the previous manifest {}", full.size, prev.size));
    }
    let mut r = ranges.iter().peekable();
    let mut missed = Vec::new();
    for (i, (a, b)) in prev.chunks.iter().zip(&full.chunks).enumerate() {
        let i = i as u64;
        while r.peek().is_some_and(|&&(_, e)| e <= i) {
            r.next();
        }
        let named = r.peek().is_some_and(|&&(s, _)| s <= i);
        if !named && a != b {
            missed.push(i);
        }
    }
    if missed.is_empty() {
        return Ok(());
    }
    let cs = full.chunk_size as u64;
    let shown: Vec<String> = missed.iter().take(8).map(|i| format!("bytes {}..{}", i * cs, (i + 1) * cs)).collect();
    Err(format!(
        "{} chunk(s) changed that CBT did not report: {}{}",
        missed.len(),
        shown.join(", "),
        if missed.len() > 8 { ", ..." } else { "" }
    ))
}

/// A disk record's `ReadMode` words for the report: `MODE READ SENT[ REASON]`.
pub fn report_value(d: &DiskRec) -> String {
    let r = &d.run;
    let mut v = format!(
        "{} {} {}",
        r.read.map_or("-", ReadMode::as_str),
        r.host_bytes_read.map_or("-".to_string(), |n| n.to_string()),
        r.bytes_sent.map_or("-".to_string(), |n| n.to_string())
    );
    if let Some(w) = &r.reason {
        v.push_str(&format!(" ({w})"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkRef;

    /// The marker covers a complete transfer a crash kept from its rotation: the next run
    /// rotates it in first, and it was made before the restore too.
    #[test]
    fn a_restore_marks_the_newest_archive_or_the_transfer_waiting_for_its_rotation() {
        let t = tempfile::tempdir().unwrap();
        let job = t.path();
        let mk = |name: &str, date: &str| {
            let p = job.join(name);
            std::fs::create_dir_all(&p).unwrap();
            let mut r = crate::report::Report::default();
            r.set("Date", date);
            r.write(&p).unwrap();
        };
        mk("scheduled.0", "202605020000");
        mark_restored(job).unwrap();
        assert!(restored_after(job, "202605020000") && !restored_after(job, "202605030000"));
        mk("scheduled.running", "202605030000");
        crate::archive::mark_running_complete(job).unwrap();
        mark_restored(job).unwrap();
        assert!(restored_after(job, "202605030000"), "the transfer waiting for its rotation is before the restore");
        assert!(!restored_after(job, "202605030100"));
    }

    #[test]
    fn verify_names_the_chunks_cbt_missed() {
        let id = |b: u8| ChunkRef::Stored([b; 32]);
        let m = |c: Vec<ChunkRef>| Manifest {
            size: c.len() as u64 * 262144,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            atime: None,
            chunk_size: 262144,
            compression: chunk::Compression::None,
            file_hash: None,
            added_bytes: 0,
            chunks: c,
            stored_lens: None,
        };
        let prev = m(vec![id(1), id(2), ChunkRef::Zero, id(4)]);
        assert_eq!(verify(&prev, &[], &prev), Ok(()));
        let full = m(vec![id(1), id(9), id(3), id(4)]);
        assert_eq!(verify(&prev, &[(1, 3)], &full), Ok(()));
        let e = verify(&prev, &[(1, 2)], &full).unwrap_err();
        assert_eq!(e, "1 chunk(s) changed that CBT did not report: bytes 524288..786432");
        assert!(verify(&prev, &[], &m(vec![id(1)])).is_err());
        assert_eq!(uuid_part("52 aa bb/17"), "52 aa bb");
    }
}
