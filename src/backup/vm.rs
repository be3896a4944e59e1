//! The transfer step of an ESXi job, the seed's procedure: log in, find the VM, remove leftover
//! `BEXI-<job>-` snapshots of this job, check the VM's own snapshots (keep or refuse), snapshot,
//! copy the frozen disks (each disk's whole chain below our delta, `chain.rs`), remove the
//! snapshot (always), copy the configuration files, log out.
//!
//! Owns: the order of those steps and the promise that no snapshot of ours outlives the run.
//! Must never: copy the delta the running VM writes, archive a VM whose snapshot tree changed
//! while our snapshot existed, skip the snapshot removal on any error or signal, remove a
//! snapshot that is not this job's own, turn a name the host gives into a local path other than
//! through the one path-safety rule (`crate::untrusted`), or send the ESXi password before the
//! host's certificate matched the pinned fingerprint (the client checks the pin at connect,
//! before login), or let the agent read a chunked disk outside the snapshot's lifetime (its
//! session ends before the snapshot is removed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backup::cbt::{self, Plan};
use crate::backup::chunked::{self, AgentRun, ChunkTotals};
use crate::backup::ctx::{check_rsync, Ctx, RunSummary, STAGING};
use crate::backup::host::prepare_running;
use crate::config::{edit, Job};
use crate::error::{Error, Result};
use crate::esxi::soap::one_line;
use crate::esxi::{self, chain, Client, ConnectOptions, MoRef, Password, VmLayout};
use crate::observer::{Phase, Watch};
use crate::report::Report;
use crate::transport::rsync::{self, Source};
use crate::transport::{shell_quote, SshTarget};
use crate::untrusted::{SafeName, SafeRelPath};

/// The per-archive description of the VM, read by restore.
pub use crate::vmrecord::ESXI_INI;
use crate::vmrecord::{self, DatastoreRec, DiskRec, DiskRun, LinkRec, ReadMode, SnapshotRec, VmRecord};

/// This run's Changed Block Tracking: the plan of each chunked disk (by the archive path of its
/// extent), what each disk's read did, and the verify passes that found CBT wrong.
#[derive(Default)]
struct CbtRun {
    plans: std::collections::HashMap<PathBuf, Plan>,
    done: std::collections::HashMap<PathBuf, DiskRun>,
    failures: Vec<String>,
}

/// Connection settings of a job's ESXi host.
pub fn connect_options(job: &Job) -> ConnectOptions {
    let mut o = ConnectOptions::new(job.esxi.as_ref().map_or(job.host.as_str(), |e| e.host.as_str()));
    if let Some(e) = &job.esxi {
        o.port = e.port;
        o.thumbprint = e.thumbprint.clone();
        o.plain_http = e.plain_http;
        o.task_timeout = e.task_timeout;
    }
    o.job = Some(job.name.clone());
    o
}

/// Connect (certificate checked against the pin) and log in.
pub fn login(job: &Job) -> Result<Client> {
    let opts = connect_options(job);
    if opts.thumbprint.is_none() && !opts.plain_http {
        bail!("job {} has no ESXiThumbprint: run affa --send-key {} to see the certificate fingerprint of ESXi host {} and pin it", job.name, job.name, opts.host);
    }
    let mut c = Client::connect(opts)?;
    let pw = Password::new(job.esxi_password()?);
    c.login(job.esxi.as_ref().map_or("", |e| e.user.as_str()), &pw)?;
    Ok(c)
}

/// The VM id vim-cmd uses: the number of the VM's managed object id.
fn vmid(vm: &MoRef) -> String {
    vm.value.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// Snapshot create/remove, through the API or through vim-cmd over ssh (free-licence hosts).
struct Snapshots<'a> {
    client: &'a Client,
    vm: MoRef,
    vimcmd: Option<(SshTarget, String)>,
    /// Time limit of one vim-cmd call: ESXiTaskTimeout, plus the ssh connect timeout.
    limit: Duration,
}

impl Snapshots<'_> {
    fn create(&self, name: &str, memory: bool, quiesce: bool) -> Result<()> {
        let desc = "affa backup snapshot; removed when the copy is done";
        match &self.vimcmd {
            None => self.client.create_snapshot(&self.vm, name, desc, memory, quiesce).map(|_| ()),
            Some((t, bin)) => {
                let cmd = format!(
                    "{} vmsvc/snapshot.create {} {} {} {} {}",
                    shell_quote(bin),
                    vmid(&self.vm),
                    shell_quote(name),
                    shell_quote(desc),
                    memory as u8,
                    quiesce as u8
                );
                t.run_ok_within(&cmd, "vim-cmd vmsvc/snapshot.create", self.limit, "ESXiTaskTimeout").map(|_| ())
            }
        }
    }
    fn remove(&self, snap: &esxi::SnapshotTree) -> Result<()> {
        match &self.vimcmd {
            None => self.client.remove_snapshot(&snap.snapshot),
            Some((t, bin)) => {
                let id = snap.id.ok_or_else(|| Error::new(format!("snapshot {} has no id for vim-cmd", snap.name)))?;
                let cmd = format!("{} vmsvc/snapshot.remove {} {id}", shell_quote(bin), vmid(&self.vm));
                t.run_ok_within(&cmd, "vim-cmd vmsvc/snapshot.remove", self.limit, "ESXiTaskTimeout").map(|_| ())
            }
        }
    }
}

/// Files of one directory of the VM to copy: host dir, archive-relative dir, file names.
struct Group {
    host_dir: String,
    rel_dir: PathBuf,
    files: Vec<String>,
}

/// `[ds] dir/file` by the one path-safety rule (names a host gave become local paths here).
fn split_path(ds_path: &str) -> Result<(SafeName, SafeRelPath, SafeName)> {
    esxi::model::split_ds_file(ds_path)
}

/// `vmfs/volumes/<datastore>/<dir>`
fn rel_dir(ds: &SafeName, dir: &SafeRelPath) -> PathBuf {
    let mut p = PathBuf::from("vmfs/volumes").join(ds);
    if !dir.is_empty() {
        p = p.join(dir);
    }
    p
}

fn add(groups: &mut Vec<Group>, layout: &VmLayout, ds_path: &str) -> Result<()> {
    let (ds, dir, file) = split_path(ds_path)?;
    let host = layout.host_path(ds_path)?;
    let host_dir = host.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
    let rel = rel_dir(&ds, &dir);
    let file = file.as_str().to_string();
    match groups.iter_mut().find(|g| g.rel_dir == rel) {
        Some(g) => {
            if !g.files.contains(&file) {
                g.files.push(file)
            }
        }
        None => groups.push(Group { host_dir, rel_dir: rel, files: vec![file] }),
    }
    Ok(())
}

/// The ESXi transfer. Fills `report`; the caller writes it and rotates.
pub fn transfer(ctx: &Ctx, running: &Path, report: &mut Report, summary: &mut RunSummary) -> Result<()> {
    let job = ctx.job;
    let target = ctx.source().unwrap_or_else(|| SshTarget::from_job(job, ctx.cfg));
    let esxi = job.esxi_settings()?;
    let vm_name = &esxi.vm_name;
    ctx.log.phase(Phase::EsxiConnecting(connect_options(job).host));
    let mut client = login(job)?;
    crate::interrupt::crash_point("esxi-logged-in");
    let result = transfer_logged_in(ctx, &client, &target, running, report, summary);
    if let Err(e) = client.logout() {
        ctx.log.warn(format!("ESXi logout failed: {e}"));
    }
    result.map_err(|e| e.context(format!("ESXi VM {vm_name}")))
}

/// The datastore dir (on the host) of the job's VM's .vmx: the default place of the agent
/// (`--install-agent` of an ESXi job without remoteAgentPath).
pub fn vmx_datastore_dir(job: &Job) -> Result<Option<String>> {
    let mut client = login(job)?;
    let res = (|| -> Result<Option<String>> {
        let vm = client.find_vm(&job.esxi_settings()?.vm_name)?;
        let layout = client.vm_layout(&vm)?;
        let (ds, _, _) = split_path(layout.vmx_path())?;
        Ok(layout.datastores.iter().find(|d| d.name == ds.as_str()).map(|d| d.host_path.clone()))
    })();
    let _ = client.logout();
    res
}

fn transfer_logged_in(
    ctx: &Ctx,
    client: &Client,
    target: &SshTarget,
    running: &Path,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<()> {
    let job = ctx.job;
    let esxi = job.esxi_settings()?;
    let vm = client.find_vm(&esxi.vm_name)?;
    let vimcmd = esxi.vim_cmd.as_ref().map(|v| (target.clone(), v.clone()));
    let limit = esxi.task_timeout + Duration::from_secs(job.ssh.connect_timeout);
    let snaps = Snapshots { client, vm: vm.clone(), vimcmd, limit };
    let layout = client.vm_layout(&vm)?;
    report.set("ESXiVM", &layout.name);
    report.set("ESXiHost", client.host());
    report.set("ESXiPowerState", layout.power_state.as_str());

    // 2. Leftovers of a crashed run.
    let leftovers: Vec<esxi::SnapshotTree> =
        layout.all_snapshots().into_iter().filter(|s| esxi::is_snapshot_of(&job.name, &s.name)).cloned().collect();
    if !leftovers.is_empty() {
        let names: Vec<String> = leftovers.iter().map(|s| s.name.clone()).collect();
        for s in leftovers.iter().rev() {
            ctx.log.warn(format!("removing snapshot {} left by an earlier run that did not finish", s.name));
            snaps.remove(s).map_err(|e| e.context(format!("cannot remove the leftover snapshot {}", s.name)))?;
        }
        report.set("ESXiLeftoverSnapshotsRemoved", names.join(" "));
        summary.warnings.push(format!("removed leftover snapshot(s) {}", names.join(", ")));
    }

    // The VM's own snapshots: archived with it (their whole chain), or refused.
    let layout = if leftovers.is_empty() { layout } else { client.vm_layout(&vm)? };
    let own = chain::own_snapshots(&layout, None);
    if !own.is_empty() {
        let list = chain::describe(&own, ctx.clock.now());
        if esxi.refuse_user_snapshots {
            bail!("the VM has snapshots of its own: {list}; ESXiUserSnapshots=refuse, so nothing was archived (remove them, or set ESXiUserSnapshots=keep to archive the VM with them)");
        }
        let w = format!("VM {} has {} snapshot(s) of its own: {list}; they are archived with it (the whole disk chain), but they cost the host space and speed: remove them when they are no longer needed", layout.name, own.len());
        ctx.log.warn(&w);
        summary.warnings.push(w);
        report.set("ESXiUserSnapshots", list);
    }
    let before = chain::tree_state(&layout, None);
    let cbt_setup = cbt::prepare(ctx, client, &vm, own.len(), &mut summary.warnings)?;
    let mut cbt_run = CbtRun::default();
    let mut frozen_disks: Vec<esxi::FrozenDisk> = Vec::new();

    // 3. The snapshot.
    let name = esxi::snapshot_name(&job.name, ctx.clock.now());
    ctx.log.phase(Phase::Snapshot(name.clone()));
    if let Err(e) = snaps.create(&name, esxi.memory, esxi.quiesce) {
        let e = e.context(format!("creating snapshot {name} failed; nothing was copied"));
        // A create that failed or ran past its time limit (a task past ESXiTaskTimeout, a
        // wedged vim-cmd session) may have made the snapshot all the same: remove it now.
        return Err(match remove_if_present(client, &snaps, &vm, &name) {
            Ok(0) => e,
            Ok(_) => {
                ctx.log.info(format!("ESXi: snapshot {name} removed after the failed create"));
                e
            }
            Err(r) => {
                ctx.log.error(format!("removing snapshot {name} after the failed create: {r}"));
                Error::of(e.kind(), format!("{e}; snapshot {name} may remain on the VM: the next run removes it"))
            }
        });
    }
    crate::interrupt::crash_point("snapshot-created");
    report.set("ESXiSnapshot", &name);
    report.set("ESXiSnapshotCreated", ctx.clock.now().format("%Y-%m-%d %H:%M:%S"));

    // 4-5. Copy the frozen disks; 6. remove the snapshot, whatever happened.
    let copied = (|| -> Result<(VmLayout, chain::Frozen)> {
        let frozen = client.vm_layout(&vm)?;
        let mut groups = Vec::new();
        for d in &frozen.disks {
            if !d.has_parent() {
                bail!("disk '{}' ({}) is not frozen by the snapshot (an independent disk?); affa will not copy a disk the VM is writing to", d.label, d.current().file_name);
            }
        }
        chain::check_unchanged(&before, &frozen, Some(&name), "while affa's snapshot was taken")?;
        let files = chain::frozen(&frozen, &name)?;
        for f in files.files() {
            add(&mut groups, &frozen, &f)?;
        }
        if let Some(setup) = &cbt_setup {
            frozen_disks = plan_cbt(ctx, client, &vm, &frozen, &files, &name, setup, &mut cbt_run)?;
        }
        // The agent's default place: the datastore of the VM's .vmx (it survives a reboot).
        let (vmx_ds, _, _) = split_path(frozen.vmx_path())?;
        let ds_dir = frozen.datastores.iter().find(|d| d.name == vmx_ds.as_str()).map(|d| d.host_path.clone());
        let copy =
            copy_groups(ctx, target, running, &groups, Some(ds_dir.as_deref()), Some(&mut cbt_run), report, summary);
        // A tree changed meanwhile is the cause of whatever else went wrong (a file vanished).
        if let Err(e) = chain::check_unchanged(&before, &client.vm_layout(&vm)?, Some(&name), "during the copy") {
            if let Err(c) = &copy {
                ctx.log.error(format!("the copy failed: {c}"));
            }
            return Err(e);
        }
        copy?;
        Ok((frozen, files))
    })();
    let removal = (|| -> Result<()> {
        crate::interrupt::crash_point("before-snapshot-removal");
        let now = client.vm_layout(&vm)?;
        let ours: Vec<esxi::SnapshotTree> =
            now.all_snapshots().into_iter().filter(|s| s.name == name).cloned().collect();
        if ours.is_empty() {
            bail!("snapshot {name} is missing from the VM's snapshot tree");
        }
        for s in &ours {
            ctx.log.phase(Phase::RemovingSnapshot(name.clone()));
            snaps.remove(s)?;
        }
        crate::interrupt::crash_point("snapshot-removed");
        Ok(())
    })();
    if client.relogins() > 0 {
        ctx.log.info(format!(
            "ESXi: the API session had expired (the host drops a session idle for its timeout, 30 minutes by default); logged in again {} time(s)",
            client.relogins()
        ));
    }
    match (&copied, &removal) {
        (_, Err(e)) => {
            let msg = format!("removing snapshot {name} FAILED: {e}; the VM still runs on its snapshot delta; the next run removes it (or remove it in the vSphere client)");
            ctx.log.error(&msg);
            if let Err(c) = &copied {
                ctx.log.error(format!("the copy failed too: {c}"));
            }
            return Err(Error::of(e.kind(), msg));
        }
        (Err(_), Ok(())) => ctx.log.info(format!("ESXi: snapshot {name} removed after the failed copy")),
        _ => {}
    }
    report.set("ESXiSnapshotRemoved", ctx.clock.now().format("%Y-%m-%d %H:%M:%S"));
    let (frozen, files) = copied?;

    // 7. The configuration files, now that they describe the VM without the snapshot.
    let after = client.vm_layout(&vm)?;
    chain::check_unchanged(&before, &after, None, "while affa's snapshot was removed")?;
    let mut conf = Vec::new();
    let vmx = after.vmx_path().to_string();
    add(&mut conf, &after, &vmx)?;
    let kinds = ["config", "extendedConfig", "snapshotList", "nvram"];
    for f in after.layout_files.iter().filter(|f| kinds.contains(&f.kind.as_str())) {
        // A "configuration file" named like a chunked disk's manifest would replace the
        // manifest the disk step wrote (the index names it): never copied.
        if f.name.ends_with(crate::chunk::MANIFEST_SUFFIX) {
            let w = format!(
                "the host lists {} as a configuration file of the VM; a name ending in {} is affa's, not copied",
                one_line(&f.name),
                crate::chunk::MANIFEST_SUFFIX
            );
            ctx.log.warn(&w);
            summary.warnings.push(w);
            continue;
        }
        add(&mut conf, &after, &f.name)?;
    }
    let stem = vmx.strip_suffix(".vmx").unwrap_or(&vmx).to_string();
    for ext in ["vmxf", "vmsd", "nvram"] {
        add(&mut conf, &after, &format!("{stem}.{ext}"))?;
    }
    ctx.log.phase(Phase::CopyingConfig);
    copy_groups(ctx, target, running, &conf, None, None, report, summary)?;
    crate::interrupt::crash_point("config-copied");
    chain::check_unchanged(&before, &client.vm_layout(&vm)?, None, "while its configuration files were copied")?;

    // 8. What the archive holds, for the report and for restore (docs/FORMAT.md, format 2). The
    // record refuses a value with a control character: a newline would add keys.
    let arch = |p: &str| -> Result<PathBuf> {
        let (ds, dir, file) = split_path(p)?;
        Ok(rel_dir(&ds, &dir).join(file))
    };
    let arch_opt = |p: &Option<String>| p.as_deref().map(arch).transpose();
    let mut record = VmRecord {
        format: vmrecord::FORMAT,
        name: after.name.clone(),
        vmx_path: vmx.clone(),
        host: client.host().to_string(),
        snapshot: name.clone(),
        snapshots: Vec::new(),
        datastores: Vec::new(),
        disks: Vec::new(),
    };
    for s in &files.own {
        record.snapshots.push(SnapshotRec {
            name: one_line(&s.tree.name),
            id: s.tree.id,
            parent: s.parent.as_ref().and_then(|p| p.id),
            created: one_line(&s.tree.create_time),
            data: arch_opt(&s.data)?,
            memory: arch_opt(&s.memory)?,
        });
    }
    for ds in &frozen.datastores {
        record.datastores.push(DatastoreRec { name: ds.name.clone(), url: ds.host_path.clone() });
    }
    let matcher = chunked::matcher(job)?;
    let chunked = |p: &Path| matcher.as_ref().is_some_and(|m| m.is_match(p));
    for (d, links) in frozen.disks.iter().zip(&files.chains) {
        // The top link is what the restored .vmx names once affa's snapshot is gone.
        let Some(top) = links.last() else { continue };
        let (ds, _, _) = split_path(&top.descriptor)?;
        let ext_rel = arch(top.extents.first().map(String::as_str).unwrap_or(""))?;
        let mut run = cbt_run.done.remove(&ext_rel).unwrap_or_default();
        if run.read.is_none() {
            run.read = Some(ReadMode::Rsync);
        }
        if let Some(fd) = frozen_disks.iter().find(|f| f.device_key == d.key) {
            run.device_key = Some(fd.device_key);
            run.uuid = fd.uuid.as_deref().map(one_line);
            run.change_id = fd.change_id.as_deref().map(one_line);
        }
        let mut disk = DiskRec {
            label: d.label.clone(),
            datastore: ds.to_string(),
            descriptor: arch(&top.descriptor)?,
            chunked: chunked(&ext_rel),
            extent: ext_rel,
            size: d.capacity_bytes,
            links: Vec::new(),
            run,
        };
        for l in links {
            let extents = l.extents.iter().map(|e| arch(e).map(|e| (e.clone(), chunked(&e)))).collect::<Result<_>>()?;
            disk.links.push(LinkRec { descriptor: arch(&l.descriptor)?, extents });
        }
        let i = record.disks.len();
        report.set(&format!("ESXiDisk{i}"), format!("{} {} {}", d.label, disk.extent.display(), d.capacity_bytes));
        report.set(&format!("ESXiDiskRead{i}"), cbt::report_value(&disk));
        record.disks.push(disk);
    }
    let text = record.to_text()?;
    crate::fsutil::write_atomic(&running.join(ESXI_INI), text.as_bytes(), crate::fsutil::Perm::Mode(0o600))?;
    crate::interrupt::crash_point("esxi-ini-written");
    if !cbt_run.failures.is_empty() {
        // The archive keeps the full passes' manifests; the run still fails, loudly.
        summary.failure = Some(format!("CBT verify pass: {}", cbt_run.failures.join("; ")));
    }
    Ok(())
}

/// After the snapshot: the frozen disks (device key, UUID, changeId) and the plan of each
/// chunked disk's extent. `ESXiCBT=yes` fails when the snapshot's disks cannot be read.
#[allow(clippy::too_many_arguments)]
fn plan_cbt(
    ctx: &Ctx,
    client: &Client,
    vm: &MoRef,
    frozen: &VmLayout,
    files: &chain::Frozen,
    name: &str,
    setup: &cbt::Setup,
    out: &mut CbtRun,
) -> Result<Vec<esxi::FrozenDisk>> {
    let Some(snap) = frozen.all_snapshots().into_iter().find(|s| s.name == name).map(|s| s.snapshot.clone()) else {
        bail!("snapshot {name} is missing from the VM's snapshot tree");
    };
    let disks = match client.snapshot_disks(&snap) {
        Ok(d) => d,
        Err(e) if ctx.job.esxi.as_ref().is_some_and(|e| e.cbt == crate::config::typed::Cbt::Yes) => {
            return Err(e.context("ESXiCBT=yes: cannot read the snapshot's disks"))
        }
        Err(e) => {
            ctx.log.warn(format!("cannot read the disks of snapshot {name} for CBT ({e}): full passes"));
            return Ok(Vec::new());
        }
    };
    let prev = cbt::Previous::load(&ctx.job_dir)?;
    let matcher = chunked::matcher(ctx.job)?;
    for (d, links) in frozen.disks.iter().zip(&files.chains) {
        let Some(fd) = disks.iter().find(|f| f.device_key == d.key) else { continue };
        let Some(ext) = links.last().and_then(|l| l.extents.first()) else { continue };
        let (ds, dir, file) = split_path(ext)?;
        let rel = rel_dir(&ds, &dir).join(file);
        if !matcher.as_ref().is_some_and(|m| m.is_match(&rel)) {
            continue;
        }
        let one_extent = links.len() == 1 && links[0].extents.len() == 1;
        let plan = cbt::plan_disk(ctx, setup, client, vm, &snap, fd, if one_extent { 1 } else { 2 }, &rel, &prev);
        match &plan {
            Plan::Cbt { ranges, .. } => {
                let n: u64 = ranges.iter().map(|&(s, e)| e - s).sum();
                ctx.log.info(format!("{}: CBT names {n} changed chunk(s)", rel.display()));
            }
            Plan::Verify { .. } => {
                ctx.log.info(format!("{}: CBT verify pass (a full read, compared with CBT)", rel.display()))
            }
            Plan::Full(Some(why)) => ctx.log.info(format!("{}: full pass: {why}", rel.display())),
            Plan::Full(None) => {}
        }
        out.plans.insert(rel, plan);
    }
    Ok(disks)
}

/// Remove every snapshot named `name` of the VM, if there is one; returns how many.
fn remove_if_present(client: &Client, snaps: &Snapshots, vm: &MoRef, name: &str) -> Result<usize> {
    let now = client.vm_layout(vm)?;
    let ours: Vec<esxi::SnapshotTree> = now.all_snapshots().into_iter().filter(|s| s.name == name).cloned().collect();
    for s in &ours {
        snaps.remove(s)?;
    }
    Ok(ours.len())
}

/// rsync each group's files from the host into `running`; chunked files through the agent (no
/// staging) or through staging. `disks`: Some(the datastore dir of the VM's .vmx, the agent's
/// default place) when the groups are the frozen disks, None for the configuration files.
#[allow(clippy::too_many_arguments)]
fn copy_groups(
    ctx: &Ctx,
    target: &SshTarget,
    running: &Path,
    groups: &[Group],
    disks: Option<Option<&str>>,
    mut cbt_run: Option<&mut CbtRun>,
    report: &mut Report,
    summary: &mut RunSummary,
) -> Result<()> {
    let job = ctx.job;
    let agent_ds = disks.flatten();
    let disks = disks.is_some();
    let link_dirs = if disks { prepare_running(ctx, running)? } else { link_dirs_now(ctx)? };
    let matcher = chunked::matcher(job)?;
    let source = Source::Ssh(target);
    let mut totals = ChunkTotals::default();
    let is_chunked = |g: &Group, f: &String| disks && matcher.as_ref().is_some_and(|m| m.is_match(g.rel_dir.join(f)));
    let to_chunk = groups.iter().map(|g| g.files.iter().filter(|f| is_chunked(g, f)).count()).sum::<usize>();
    let mut chunking = 0;
    // The agent, when it reads this run's chunked disks (one session for all of them).
    let mut agent = if to_chunk > 0 {
        chunked::open_agent(ctx, target, agent_ds, report, summary)?.map(|s| AgentRun::new(s, false))
    } else {
        None
    };
    for (i, g) in groups.iter().enumerate() {
        if disks {
            ctx.log.phase(Phase::Copying {
                what: format!("the disks in {}", g.rel_dir.display()),
                n: i + 1,
                of: groups.len(),
            });
        }
        let (mut plain, mut chunked) = (Vec::new(), Vec::new());
        for f in &g.files {
            if is_chunked(g, f) {
                chunked.push(f.clone());
            } else {
                plain.push(f.clone());
            }
        }
        let dest = crate::untrusted::create_dir_beneath(running, &g.rel_dir)?;
        let plain_args = (!plain.is_empty()).then(|| {
            let mut args = rsync::Args::new(job, &source);
            args.opts(["--stats", "--sparse", "--partial"]);
            // A VM's files are regular files: a symlink, device or FIFO the host puts among them
            // is left out, with a warning (the ESXi restore refuses an archive holding one).
            args.opts(rsync::REGULAR_FILES_ONLY);
            args.opts(rsync::itemize_args());
            if !disks {
                args.opt("--ignore-missing-args");
            }
            for l in &link_dirs {
                args.opt(format!("--link-dest={}", l.join(&g.rel_dir).display()));
            }
            let paths: Vec<String> = plain.iter().map(|f| format!("{}/{f}", g.host_dir)).collect();
            args.from(&source, &paths).to(format!("{}/", dest.display()));
            args
        });
        let what = format!("copying {}", g.rel_dir.display());
        let agent_reads = !chunked.is_empty() && agent.is_some();
        // A host file named like a chunked file's manifest gives way to the manifest: it must be
        // in place before the manifest is written (which replaces it), so such a group copies
        // its plain files first, as every group did before the copy ran beside the read.
        let named_like_a_manifest = plain.iter().any(|p| {
            p.strip_suffix(crate::chunk::MANIFEST_SUFFIX).is_some_and(|stem| chunked.iter().any(|c| c == stem))
        });
        let beside = agent_reads && !named_like_a_manifest;
        if let (Some(args), false) = (&plain_args, beside) {
            let res = rsync::run(job, args, &ctx.log, &ctx.log.watch)?;
            check_rsync(ctx, &res, &what, summary)?;
            warn_not_regular(ctx, g, &plain, disks, &res.stdout, summary);
            crate::interrupt::crash_point("copied");
            add_stats(report, &res.stdout);
        }
        if let (true, Some(run)) = (agent_reads, agent.as_mut()) {
            // Unless copied above, the plain files (the disks' descriptors: a few small files)
            // are copied by rsync beside the agent's read, so its start-up (rsync, an ssh
            // session, the host's rsync) overlaps the transfer instead of adding to the run and
            // to the snapshot's life. Its progress is not shown (the read's is). A copy that
            // fails stops the read at once (the agent's ssh is killed through a pidfd taken
            // while it runs, so never another process) and its error is the run's; a signal
            // makes the run's error "interrupted"; else a failed read's error is the run's.
            let copy_args = plain_args.as_ref().filter(|_| beside);
            let agent_ssh = run
                .session
                .as_ref()
                .and_then(|s| rustix::process::Pid::from_raw(s.pid() as i32))
                .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
            let (copied, read) = std::thread::scope(|s| {
                let log = &ctx.log;
                let agent_ssh = &agent_ssh;
                let copy = copy_args.map(|args| {
                    s.spawn(move || {
                        let r = rsync::run(job, args, log, &crate::observer::Watch::nobody());
                        let failed = r
                            .as_ref()
                            .map_or(true, |res| matches!(rsync::classify(res.code), rsync::Outcome::Failure(_)));
                        if let (true, false, Some(fd)) = (failed, crate::interrupt::interrupted(), agent_ssh) {
                            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
                        }
                        r
                    })
                });
                let read = (|| -> Result<()> {
                    for f in &chunked {
                        if crate::interrupt::interrupted() {
                            run.stop();
                            bail!(Interrupted, "interrupted by {}", crate::interrupt::signal_name());
                        }
                        chunking += 1;
                        let file = g.rel_dir.join(f).display().to_string();
                        ctx.log.phase(Phase::Chunking { file, n: chunking, of: to_chunk });
                        let remote = PathBuf::from(format!("{}/{f}", g.host_dir));
                        // A frozen disk that vanished fails the run: a VM is never archived without one.
                        let rel = g.rel_dir.join(f);
                        let plan = cbt_run.as_ref().and_then(|c| c.plans.get(&rel)).cloned();
                        let ranged = match &plan {
                            Some(Plan::Cbt { prev, ranges, .. }) => Some((prev, ranges.as_slice())),
                            _ => None,
                        };
                        let st = chunked::backup_via_agent(ctx, run, &remote, running, &rel, &link_dirs, ranged)?;
                        if let Some(c) = cbt_run.as_deref_mut() {
                            cbt_outcome(ctx, c, &rel, plan, &st)?;
                        }
                        crate::interrupt::crash_point("chunked");
                    }
                    Ok(())
                })();
                let copied = copy.map(|h| {
                    h.join().unwrap_or_else(|_| Err(Error::new(format!("{what}: the rsync thread panicked"))))
                });
                (copied, read)
            });
            if crate::interrupt::interrupted() {
                bail!(
                    Interrupted,
                    "{what} interrupted by {}; scheduled.running is kept and the next run resumes it",
                    crate::interrupt::signal_name()
                );
            }
            let copied = copied.map(|r| {
                r.and_then(|res| {
                    check_rsync(ctx, &res, &what, summary)?;
                    warn_not_regular(ctx, g, &plain, disks, &res.stdout, summary);
                    add_stats(report, &res.stdout);
                    Ok(())
                })
            });
            match (copied, read) {
                (Some(Err(c)), Err(e)) => {
                    ctx.log.error(format!("the agent's read ended with: {e}"));
                    return Err(c);
                }
                (Some(Err(c)), Ok(())) => return Err(c),
                (_, Err(e)) => return Err(e),
                (Some(Ok(())), Ok(())) => crate::interrupt::crash_point("copied"),
                (None, Ok(())) => {}
            }
        } else if !chunked.is_empty() {
            crate::fsutil::create_private_dir(&ctx.job_dir.join(STAGING))?;
            let sdir = crate::untrusted::create_dir_beneath(&ctx.job_dir.join(STAGING), &g.rel_dir)?;
            for f in &chunked {
                chunked::ensure_staging(ctx, &g.rel_dir.join(f), &link_dirs)?;
            }
            let mut args = rsync::Args::new(job, &source);
            args.opts(["--stats", "--inplace", "--sparse", "--no-whole-file", "--partial"]);
            // Never a symlink, device or fifo where a disk extent belongs; rsync skips those
            // (exit 0), so every file must be listed as a regular file it sent or found current.
            args.opts(rsync::REGULAR_FILES_ONLY);
            args.opts(rsync::itemize_args());
            let paths: Vec<String> = chunked.iter().map(|f| format!("{}/{f}", g.host_dir)).collect();
            args.from(&source, &paths).to(format!("{}/", sdir.display()));
            let res = rsync::run(job, &args, &ctx.log, &ctx.log.watch)?;
            check_rsync(ctx, &res, &format!("copying {} (chunked)", g.rel_dir.display()), summary)?;
            let seen = rsync::regular_files(&res.stdout);
            if let Some(f) = chunked.iter().find(|f| !seen.contains(f.as_str())) {
                bail!(
                    "{}/{f} on the host is not a regular file (a symlink, device or fifo where a disk extent belongs); refusing to archive it or an older copy",
                    g.host_dir
                );
            }
            crate::interrupt::crash_point("staged");
            add_stats(report, &res.stdout);
            for f in &chunked {
                if crate::interrupt::interrupted() {
                    bail!(Interrupted, "interrupted by {}", crate::interrupt::signal_name());
                }
                chunking += 1;
                let file = g.rel_dir.join(f).display().to_string();
                ctx.log.phase(Phase::Chunking { file, n: chunking, of: to_chunk });
                chunked::chunk_into(ctx, running, &g.rel_dir.join(f), &link_dirs, &mut totals)?;
                crate::interrupt::crash_point("chunked");
            }
        }
    }
    match agent {
        Some(run) => {
            run.finish(report)?;
            chunked::remove_staging(ctx);
        }
        None => totals.write(report),
    }
    Ok(())
}

/// What one chunked disk's read did, for the record; a verify pass compared with CBT.
fn cbt_outcome(
    ctx: &Ctx,
    c: &mut CbtRun,
    rel: &Path,
    plan: Option<Plan>,
    st: &crate::chunk::remote::RemoteStats,
) -> Result<()> {
    let mut run = DiskRun {
        read: Some(if st.ranged { ReadMode::Cbt } else { ReadMode::Full }),
        host_bytes_read: Some(st.source_bytes_read),
        bytes_sent: Some(st.bytes_received),
        ..DiskRun::default()
    };
    match plan {
        Some(Plan::Cbt { runs, .. }) => run.cbt_runs = runs,
        Some(Plan::Full(why)) => run.reason = why,
        Some(Plan::Verify { prev, ranges }) => {
            run.reason = Some("verify pass (ESXiCBTVerifyEvery)".into());
            let full = crate::chunk::read_manifest(&st.chunk.manifest_path)?;
            match cbt::verify(&prev, &ranges, &full) {
                Ok(()) => ctx.log.info(format!("{}: the verify pass agrees with CBT", rel.display())),
                Err(why) => {
                    let msg = format!("{}: CBT lost changes: {why}; this archive holds the full pass (right), and every next run of this disk is a verify pass (a full read) until one agrees with CBT: reset change tracking on the VM (switch it off and on, VMware's remedy for lost changes) or set ESXiCBT=no", rel.display());
                    ctx.log.error(&msg);
                    c.failures.push(msg);
                    // A host whose tracking lost changes once is not trusted on the nights
                    // between verify passes: the next run verifies again (a reset of tracking
                    // changes the changeId's UUID part: a plain full pass, then CBT afresh).
                    let every = ctx.job.esxi.as_ref().map_or(0, |e| e.cbt_verify_every);
                    run.cbt_runs = every.saturating_sub(1);
                }
            }
        }
        None => {}
    }
    c.done.insert(rel.to_path_buf(), run);
    Ok(())
}

/// The link-dest dirs for the second copy step (scheduled.running is already prepared).
fn link_dirs_now(ctx: &Ctx) -> Result<Vec<PathBuf>> {
    Ok(crate::archive::newest_valid(&ctx.job_dir)?.map(|a| vec![a.path]).unwrap_or_default())
}

/// The plain files of group `g` that rsync did not copy because they are not regular files on
/// the host: a warning each (the run goes on; the archive holds the VM's regular files only).
/// `disks`: the disks' groups, where every file named must be there (rsync fails on a missing
/// one); among the configuration files a missing one is no news.
fn warn_not_regular(ctx: &Ctx, g: &Group, plain: &[String], disks: bool, stdout: &str, summary: &mut RunSummary) {
    let (copied, skipped) = (rsync::regular_files(stdout), rsync::skipped_non_regular(stdout));
    for f in plain.iter().filter(|f| !copied.contains(f.as_str()) && (disks || skipped.contains(f.as_str()))) {
        let w = format!(
            "{}/{f} on the host is not a regular file (a symlink, device, FIFO or directory): not archived; the VM's other files are",
            g.host_dir
        );
        ctx.log.warn(&w);
        summary.warnings.push(w);
    }
}

/// Sum rsync statistics of several transfers into the report.
fn add_stats(report: &mut Report, out: &str) {
    for (k, v) in crate::report::parse_rsync_stats(out) {
        let v: u64 = v.parse().unwrap_or(0);
        let sum = report.num(&k).unwrap_or(0) + v;
        report.set(&k, sum);
    }
    report.set("ExitStatus", 0);
}

/// `--send-key`: whether the job's VM can use Changed Block Tracking, one line.
pub fn cbt_availability(job: &Job) -> String {
    let esxi = match job.esxi_settings() {
        Ok(e) => e,
        Err(e) => return format!("Changed Block Tracking: unknown ({e})"),
    };
    if esxi.cbt == crate::config::typed::Cbt::No {
        return "Changed Block Tracking: not used (ESXiCBT=no)".into();
    }
    if esxi.vim_cmd.is_some() {
        return "Changed Block Tracking: not available in ESXiSnapshotMode=vim-cmd".into();
    }
    let state = login(job).and_then(|mut c| {
        let r = c.find_vm(&esxi.vm_name).and_then(|vm| c.cbt_state(&vm));
        let _ = c.logout();
        r
    });
    match state {
        Ok(s) if !s.supported => {
            "Changed Block Tracking: not supported by the host for this VM (licence or virtual hardware version): full passes".into()
        }
        Ok(s) if s.enabled => "Changed Block Tracking: available (on)".into(),
        Ok(_) => "Changed Block Tracking: available (off: the next run switches it on)".into(),
        Err(e) => format!("Changed Block Tracking: unknown ({e})"),
    }
}

/// `--send-key` on an ESXi job: show the host's certificate fingerprint, have the user confirm
/// it, write it into the job's config as ESXiThumbprint. A fingerprint already pinned must match.
pub fn pin_thumbprint(job: &Job, out: &mut dyn Write, yes: bool, watch: &Watch) -> Result<()> {
    let o = connect_options(job);
    if o.plain_http {
        let _ = writeln!(out, "job {}: ESXiProtocol=http, no certificate to pin", job.name);
        return Ok(());
    }
    let seen = esxi::fetch_thumbprint(&o.host, o.port, Duration::from_secs(30))?;
    let seen_n = crate::config::keys::normalize_thumbprint(&seen).unwrap_or(seen.clone());
    match &o.thumbprint {
        Some(p) if *p == seen_n => {
            let _ = writeln!(out, "job {}: certificate of ESXi host {} matches the pinned fingerprint", job.name, o.host);
            Ok(())
        }
        Some(p) => bail!(
            "certificate of ESXi host {} has fingerprint {seen_n}, expected {p} (job config key ESXiThumbprint): the host was reinstalled or someone is intercepting; if the change is expected, delete ESXiThumbprint from {} and run affa --send-key {} again",
            o.host, job.origin.file.display(), job.name
        ),
        None => {
            let _ = writeln!(out, "job {}: ESXi host {}:{} presents a certificate with SHA-256 fingerprint\n  {seen_n}", job.name, o.host, o.port);
            crate::observer::confirm(watch, &format!("Compare it with the host's (ESXi console: openssl x509 -in /etc/vmware/ssl/rui.crt -noout -fingerprint -sha256). Pin it for job {}?", job.name), "yes", yes)?;
            edit::set_key(job, "ESXiThumbprint", &seen_n)?;
            let _ = writeln!(out, "job {}: ESXiThumbprint={seen_n} written to {}", job.name, job.origin.file.display());
            Ok(())
        }
    }
}
