//! Restore of an ESXi VM: the archive's `vmfs/volumes/<datastore>/<dir>/...` files back to
//! datastore directories on the job's host (or `--to-host`, `--to-datastore`, `--to-dir`), with
//! chunked disks rebuilt locally first and sent with rsync's delta transfer (`--inplace
//! --no-whole-file --sparse`: sparse stays sparse, only changed blocks cross the network when an
//! older copy is still on the host) or through affa-agent, the `.vmx` disk paths rewritten for
//! the new place, every file checked with `sha256sum` on the host (but a disk the agent wrote:
//! the agent checked it as written), then `RegisterVM_Task` for `--register NAME`.
//!
//! Owns: the mapping of archived VM files to target paths and the refusals around it. Must
//! never: send a name (from the archive, the options or the host's listing) that the one
//! path-safety rule (`crate::untrusted`) refuses, follow a link or open a fifo or device below
//! the archive's `vmfs/volumes/` (the archive is the host's: a link there could name the backup
//! server's own files; such an archive is refused, naming the entry, before the host is
//! contacted), write to a datastore directory that a powered-on VM uses, register a name that
//! exists, write anything before the user confirmed and every chunked disk was rebuilt and
//! verified, or send the ESXi password before the host's certificate matched its pin (the
//! client checks).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::vmrefs;
use super::{
    check_remote, rebuild_all, report_check, run_rsync, send_through_agent, sha256_file, target_agent, verify_all,
    Chunked, Ctx, Endpoint, Expect, Plan, Staging,
};
use crate::backup::vm::connect_options;
use crate::chunk::{self, MANIFEST_SUFFIX};
use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::esxi::{self, Client, ConnectOptions, Password, PowerState};
use crate::transport::{rsync, shell_quote, SshTarget};
use crate::untrusted::{SafeName, SafeRelPath};
use crate::vmrecord::{self, VmRecord, ESXI_INI};

/// The target host: API client, ssh endpoint, and the job whose rsync settings apply.
struct Target<'a> {
    client: Client,
    ep: Endpoint,
    rsync_job: &'a Job,
    label: String,
    /// The API host and port, as a job names them (ESXiHost, ESXiPort).
    api: (String, u16),
}

fn connect_target<'a>(ctx: &Ctx<'a>) -> Result<Target<'a>> {
    let o = ctx.opts;
    let (job, ssh, mut copts, user, pw): (&Job, SshTarget, ConnectOptions, String, Password) = match o
        .to_host
        .as_deref()
    {
        None => {
            let j = ctx.job;
            (
                j,
                SshTarget::from_job(j, ctx.cfg),
                connect_options(j),
                j.esxi_settings()?.user.clone(),
                Password::new(j.esxi_password()?),
            )
        }
        Some(h) if ctx.cfg.jobs.contains_key(h) => {
            let j = &ctx.cfg.jobs[h];
            if !j.esxi() {
                bail!("--to-host {h}: job {h} is not an ESXi job; give an ESXi job or a host name with --to-user, --to-password-file and --to-thumbprint");
            }
            (
                j,
                SshTarget::from_job(j, ctx.cfg),
                connect_options(j),
                j.esxi_settings()?.user.clone(),
                Password::new(j.esxi_password()?),
            )
        }
        Some(h) => {
            let (host, port) = match h.rsplit_once(':') {
                Some((a, p)) if p.parse::<u16>().is_ok() && !a.contains(':') => (a.to_string(), p.parse().unwrap()),
                _ => (h.to_string(), 443),
            };
            let mut c = connect_options(ctx.job);
            c.host = host.clone();
            c.port = port;
            c.job = None;
            c.thumbprint = match o.to_thumbprint.as_deref() {
                Some(t) => Some(crate::config::keys::normalize_thumbprint(t).ok_or_else(|| Error::new(format!("--to-thumbprint {t}: expected a SHA-256 fingerprint, 32 hex bytes")))?),
                None if c.plain_http => None,
                None => bail!("--to-host {h}: give the SHA-256 fingerprint of its certificate with --to-thumbprint (ESXi console: openssl x509 -in /etc/vmware/ssl/rui.crt -noout -fingerprint -sha256)"),
            };
            let user =
                o.to_user.clone().unwrap_or_else(|| ctx.job.esxi.as_ref().map(|e| e.user.clone()).unwrap_or_default());
            let Some(pf) = &o.to_password_file else {
                bail!("--to-host {h}: give the API password of {user} in a file (mode 0600) with --to-password-file");
            };
            let pw = read_password_file(pf)?;
            let mut ssh = SshTarget::from_job(ctx.job, ctx.cfg);
            ssh.host = host.clone();
            ssh.port = o.to_ssh_port.unwrap_or(22);
            ssh.job = host.clone();
            ssh.known_hosts = ctx.cfg.ssh_dir().join(format!("knownhosts-{host}"));
            if !ssh.known_hosts.exists() {
                bail!(
                    "no ssh host key of {host} is recorded in {}: add a job for that host, run affa --send-key on it and use --to-host JOB, or put the host's key in that file under the name {host}",
                    ssh.known_hosts.display()
                );
            }
            (ctx.job, ssh, c, user, pw)
        }
    };
    let mut ssh = ssh;
    if let (Some(p), true) = (o.to_ssh_port, o.to_host.is_some()) {
        ssh.port = p;
    }
    if copts.thumbprint.is_none() && !copts.plain_http {
        bail!("no ESXiThumbprint for ESXi host {}: run affa --send-key {} first", copts.host, job.name);
    }
    let task_timeout = job.esxi.as_ref().map_or(copts.task_timeout, |e| e.task_timeout);
    copts.task_timeout = task_timeout.max(std::time::Duration::from_secs(60));
    let label = copts.host.clone();
    let api = (copts.host.clone(), copts.port);
    let mut client = Client::connect(copts)?;
    client.login(&user, &pw)?;
    Ok(Target { client, ep: Endpoint::Ssh(ssh), rsync_job: job, label, api })
}

fn read_password_file(p: &Path) -> Result<Password> {
    use std::os::unix::fs::PermissionsExt;
    let md = fs::metadata(p).ctx(|| format!("cannot read {}", p.display()))?;
    if md.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} holds a password but group or others may read it (mode {:o}); run: chmod 600 {}",
            p.display(),
            md.permissions().mode() & 0o777,
            p.display()
        );
    }
    let s = fs::read_to_string(p).ctx(|| format!("cannot read {}", p.display()))?;
    let pw = s.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("{} is empty; expected the password on its first line", p.display());
    }
    Ok(Password::new(pw))
}

/// The VM's archived files: every file below the archive's `vmfs/volumes/` (relative to it,
/// sorted) with its size. `vmfs/volumes` and every directory below it must be real directories
/// and every other entry a regular file: a symlink (a VM's directory, a file, a manifest), fifo,
/// socket or device is refused with one line naming it and what was expected. It is the host's
/// (or planted in the archive): rsync given the archived path, the check's hash and the
/// reference walk would follow a link to the backup server's own files, block on a fifo or read
/// a device, and a file passed over would leave the restored VM without it.
fn archived_files(ctx: &Ctx) -> Result<Vec<(PathBuf, u64)>> {
    let arch = &ctx.arch;
    let cannot = || {
        format!(
            "archive {} of job {}: the VM's files cannot be restored, nothing was changed",
            arch.name(),
            ctx.job.name
        )
    };
    let vol = Path::new("vmfs/volumes");
    let base = arch.path.join(vol);
    let refused = |rel: &Path, md: &fs::Metadata, expected: &str| {
        let shown = if rel.as_os_str().is_empty() {
            base.display().to_string()
        } else {
            format!("{}/{}", base.display(), crate::untrusted::shown(&rel.to_string_lossy()))
        };
        Error::new(format!(
            "{}: {shown} is {}, expected {expected} (never followed or sent; made by the source host?)",
            cannot(),
            crate::untrusted::kind_of(md)
        ))
    };
    let md = match crate::untrusted::lstat_beneath(&arch.path, vol).map_err(|e| e.context(cannot()))? {
        Some(md) => md,
        None => return Ok(Vec::new()),
    };
    if !md.is_dir() {
        return Err(refused(Path::new(""), &md, "a directory"));
    }
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ctx(|| format!("cannot read {}", d.display()))? {
            let p = e.ctx(|| format!("cannot read {}", d.display()))?.path();
            let md = fs::symlink_metadata(&p).ctx(|| format!("cannot stat {}", p.display()))?;
            let rel = p.strip_prefix(&base).unwrap_or(&p).to_path_buf();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                out.push((rel, md.len()));
            } else {
                return Err(refused(&rel, &md, "a directory or a regular file"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One archived file and where it goes.
struct Item {
    /// Archive-relative path.
    rel: PathBuf,
    /// What to send: the archived file, or a rebuilt / rewritten copy in staging.
    local: PathBuf,
    /// Index into the target dirs.
    dir: usize,
    name: String,
    size: u64,
    chunked: bool,
    /// Where the file was on the source host: datastore and directory.
    orig_ds: String,
    orig_dir: String,
}

/// A target directory: (datastore, dir) on the host, and its host path.
struct Dir {
    ds: String,
    dir: String,
    host: String,
}

/// Chunked files up to this size are rebuilt locally even where the agent runs: descriptors
/// and other small files the reference walk reads (and may rewrite for the new place). A
/// bigger one is never read as text: a disk where a descriptor names it as an extent, refused
/// as too big where a `.vmx`, `.vmsd` or descriptor is expected (`vmrefs::walk`).
const SMALL_CHUNKED: u64 = vmrefs::MAX_READ;

pub(super) fn restore(ctx: &Ctx, out: &mut dyn Write) -> Result<()> {
    let arch = &ctx.arch;
    let ini_path = arch.path.join(ESXI_INI);
    let text = crate::untrusted::open_regular(&ini_path)
        .and_then(|f| {
            let mut t = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, vmrecord::MAX_LEN as u64 + 1), &mut t).map(|_| t)
        })
        .map_err(|_| {
            Error::new(format!("archive {} of ESXi job {} has no {ESXI_INI} describing the VM; it cannot be restored as a VM (affa --unchunk gives its files)", arch.name(), ctx.job.name))
        })?;
    let text = String::from_utf8_lossy(&text);
    let record = VmRecord::parse(&text).map_err(|e| e.context(ini_path.display()))?;
    let vm_name = record.name.clone();
    let (vmx_ds, vmx_rest) = esxi::split_ds_path(&record.vmx_path)?;
    let (vmx_dir, vmx_name) = vmx_rest.rsplit_once('/').unwrap_or(("", vmx_rest));
    let (vmx_ds, vmx_dir, vmx_name) = (vmx_ds.to_string(), vmx_dir.to_string(), vmx_name.to_string());
    // The one path-safety rule for the target names too.
    if let Some(d) = &ctx.opts.to_dir {
        SafeName::new("--to-dir", d)
            .map_err(|e| e.context("--to-dir: expected one directory name on the datastore"))?;
    }
    if let Some(d) = &ctx.opts.to_datastore {
        SafeName::new("--to-datastore", d).map_err(|e| e.context("--to-datastore: expected a datastore name"))?;
    }
    // The archived files, before the host is contacted: a link or special file among them
    // refuses the restore here.
    let files = archived_files(ctx)?;
    if files.is_empty() {
        bail!("archive {} holds no VM files under vmfs/volumes/", arch.name());
    }

    let mut t = connect_target(ctx)?;
    let res = restore_logged_in(ctx, &mut t, &record, &vm_name, (&vmx_ds, &vmx_dir, &vmx_name), files, out);
    let _ = t.client.logout();
    res
}

fn restore_logged_in(
    ctx: &Ctx,
    t: &mut Target,
    record: &VmRecord,
    vm_name: &str,
    vmx: (&str, &str, &str),
    files: Vec<(PathBuf, u64)>,
    out: &mut dyn Write,
) -> Result<()> {
    let arch = &ctx.arch;
    let o = ctx.opts;
    // Datastores of the target host.
    let mut host_ds: BTreeMap<String, String> = BTreeMap::new();
    for d in t.client.all_of_type("Datastore", &["name", "info.url"])? {
        let name = esxi::model::decode_entity_name(d.prop_text("name").unwrap_or(""));
        if let Ok(p) = esxi::url_to_host_path(d.prop_text("info.url").unwrap_or("")) {
            host_ds.insert(name, p);
        }
    }
    let ds_path_of = |ds: &str| -> Result<String> {
        host_ds.get(ds).cloned().ok_or_else(|| {
            Error::new(format!(
                "ESXi host {} has no datastore {ds}; datastores there: {}",
                t.label,
                host_ds.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    };

    // The archived files (each a regular file below real directories), grouped by directory.
    let base = arch.path.join("vmfs/volumes");
    // Chunked are only the files the archive's index lists.
    let recorded: std::collections::HashSet<PathBuf> = chunk::chunked_files(&arch.path)?.into_iter().collect();
    let staging = Staging::new(ctx.job)?;
    let mut dirs: Vec<Dir> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    let mut chunked: Vec<Chunked> = Vec::new();
    for (rel, archived_size) in files {
        let s = rel.to_string_lossy().into_owned();
        // Archive contents are not trusted: every name goes to the host by the one rule.
        SafeRelPath::new("archived file name", &s).map_err(|e| e.context(format!("archive {}", arch.name())))?;
        let mut parts = s.splitn(2, '/');
        let (Some(ds), Some(rest)) = (parts.next(), parts.next()) else { continue };
        let (dir, name) = rest.rsplit_once('/').unwrap_or(("", rest));
        let (name, is_chunked) = match name.strip_suffix(MANIFEST_SUFFIX) {
            Some(n)
                if recorded
                    .contains(&Path::new("vmfs/volumes").join(s.strip_suffix(MANIFEST_SUFFIX).unwrap_or(&s))) =>
            {
                (n.to_string(), true)
            }
            _ => (name.to_string(), false),
        };
        let tds = o.to_datastore.clone().unwrap_or_else(|| ds.to_string());
        let tdir = o.to_dir.clone().unwrap_or_else(|| dir.to_string());
        let di = match dirs.iter().position(|d| d.ds == tds && d.dir == tdir) {
            Some(i) => i,
            None => {
                let mut host = ds_path_of(&tds)?;
                if !tdir.is_empty() {
                    host = format!("{host}{tdir}");
                }
                dirs.push(Dir { ds: tds, dir: tdir, host: host.trim_end_matches('/').to_string() });
                dirs.len() - 1
            }
        };
        if items.iter().any(|i| i.dir == di && i.name == name) {
            bail!(
                "two archived files would both be restored to {}/{name}; choose the target without merging directories",
                dirs[di].host
            );
        }
        let archived = base.join(&rel);
        let (local, size) = if is_chunked {
            let m = chunk::read_manifest(&archived)?;
            let local = staging.dir.join(format!("{di}")).join(&name);
            chunked.push(Chunked {
                manifest: archived.clone(),
                local: local.clone(),
                remote: format!("{}/{name}", dirs[di].host).into(),
                size: m.size,
            });
            (local, m.size)
        } else {
            (archived.clone(), archived_size)
        };
        items.push(Item {
            rel: PathBuf::from("vmfs/volumes").join(&rel),
            local,
            dir: di,
            name,
            size,
            chunked: is_chunked,
            orig_ds: ds.to_string(),
            orig_dir: dir.to_string(),
        });
    }
    let (vmx_ds, vmx_dir, vmx_name) = vmx;
    // By the .vmx itself: a target directory records only the first source directory put into
    // it (with --to-dir, `vm/sub` or `o` may come before `vm`).
    let vmx_target = items
        .iter()
        .find(|it| it.orig_ds == vmx_ds && it.orig_dir == vmx_dir && it.name == vmx_name)
        .map(|it| it.dir)
        .ok_or_else(|| {
            Error::new(format!(
                "archive {} does not hold the VM's configuration file [{vmx_ds}] {vmx_dir}/{vmx_name}",
                arch.name()
            ))
        })?;
    let new_vmx_path = {
        let d = &dirs[vmx_target];
        if d.dir.is_empty() {
            format!("[{}] {vmx_name}", d.ds)
        } else {
            format!("[{}] {}/{vmx_name}", d.ds, d.dir)
        }
    };

    // Refusals: a powered-on VM using a target directory; --register with a name in use or a
    // .vmx that is already registered.
    let target_dirs: Vec<String> = dirs
        .iter()
        .map(|d| if d.dir.is_empty() { format!("[{}]", d.ds) } else { format!("[{}] {}", d.ds, d.dir) })
        .collect();
    let mut registered_as = None;
    let mut names = Vec::new();
    // The VMs whose files the restore writes over (their directory, or their .vmx).
    let mut overwritten = Vec::new();
    for v in t.client.all_of_type("VirtualMachine", &["name", "config.files.vmPathName", "runtime.powerState"])? {
        let name = esxi::model::decode_entity_name(v.prop_text("name").unwrap_or(""));
        let path = v.prop_text("config.files.vmPathName").unwrap_or("").to_string();
        let power = PowerState::parse(v.prop_text("runtime.powerState").unwrap_or(""));
        let vdir = match path.rsplit_once('/') {
            Some((d, _)) => d.to_string(),
            None => path.split(']').next().map(|s| format!("{s}]")).unwrap_or_default(),
        };
        if target_dirs.contains(&vdir) || path == new_vmx_path {
            if power == PowerState::PoweredOn {
                bail!("VM {name} on ESXi host {} uses {vdir} and is powered on; power it off (or restore elsewhere with --to-dir) before restoring over its files; nothing was changed", t.label);
            }
            // Its memory state would resume onto disks of another time.
            if power == PowerState::Suspended {
                bail!("VM {name} on ESXi host {} uses {vdir} and is suspended; power it off (which discards its suspended state) or restore elsewhere with --to-dir before restoring over its files; nothing was changed", t.label);
            }
            if path == new_vmx_path {
                registered_as = Some(name.clone());
            }
            overwritten.push(name.clone());
        }
        names.push(name);
    }
    if let Some(n) = &o.register {
        if n.is_empty() || n.contains('\n') {
            bail!("--register: expected a VM name");
        }
        if names.iter().any(|x| x == n) {
            bail!("a VM named {n} already exists on ESXi host {}; choose another name for --register; nothing was changed", t.label);
        }
        if let Some(r) = &registered_as {
            bail!("{new_vmx_path} is already registered as VM {r} on ESXi host {}; restore a copy with --to-dir NAME to register it under {n}; nothing was changed", t.label);
        }
    }

    // What is on the host now.
    t.ep.sh("echo ok", "checking the ssh connection")?;
    let mut script = String::new();
    for (i, d) in dirs.iter().enumerate() {
        script.push_str(&format!(
            "d={}; if [ -d \"$d\" ]; then for f in \"$d\"/* \"$d\"/.[!.]*; do [ -f \"$f\" ] && echo \"{i} $(stat -c %s \"$f\") ${{f##*/}}\"; done; fi; true\n",
            shell_quote(&d.host)
        ));
    }
    let listing = t.ep.sh(&script, "listing the target directories")?;
    let mut existing: BTreeMap<(usize, String), u64> = BTreeMap::new();
    for l in listing.lines() {
        let mut w = l.splitn(3, ' ');
        if let (Some(i), Some(sz), Some(n)) = (w.next(), w.next(), w.next()) {
            // Names the host lists are used for the plan and --delete: plain names only.
            if let (Ok(i), Ok(sz), Ok(_)) = (i.parse::<usize>(), sz.parse::<u64>(), SafeName::new("file name", n)) {
                // Only the directories asked for (a name with a newline splits into lines).
                if i >= dirs.len() {
                    continue;
                }
                existing.insert((i, n.to_string()), sz);
            }
        }
    }

    let date = arch.report.as_ref().and_then(|r| r.date()).map(crate::fmt::show_date).unwrap_or_default();
    let _ = writeln!(
        out,
        "Restore of VM {vm_name} (job {}) from archive {} ({date}) to ESXi host {} ({}):",
        ctx.job.name,
        arch.name(),
        t.label,
        t.ep.describe()
    );
    let mut plan = Plan::default();
    // Big chunked files go through the agent unless the job says rsync (small ones, the
    // descriptors, are rebuilt here either way).
    let by_agent_plan = ctx.job.chunk.transport != crate::config::typed::ChunkTransport::Rsync;
    for it in &items {
        let d = &dirs[it.dir];
        let what = match (it.chunked, by_agent_plan && it.size > SMALL_CHUNKED) {
            (true, false) => " (rebuilt from chunks)",
            (true, true) => " (from chunks, through affa-agent where it runs)",
            _ => "",
        };
        let line = format!("{}/{} <- {}{what}, {} bytes", d.host, it.name, it.rel.display(), it.size);
        let _ = writeln!(out, "  [{}] {}/{}: {}", d.ds, d.dir, it.name, line);
        if existing.contains_key(&(it.dir, it.name.clone())) {
            plan.overwrite.push(format!("{}/{}", d.host, it.name));
        } else {
            plan.create.push(format!("{}/{}", d.host, it.name));
        }
    }
    let extras: Vec<(usize, String)> =
        existing.keys().filter(|(i, n)| !items.iter().any(|it| it.dir == *i && &it.name == n)).cloned().collect();
    if o.delete {
        plan.delete = extras.iter().map(|(i, n)| format!("{}/{n}", dirs[*i].host)).collect();
    }
    let _ = writeln!(out, "changes on {}:", t.label);
    let _ = plan.show(out);
    if !o.delete && !extras.is_empty() {
        let _ = writeln!(out, "  left as they are (not in the archive; --delete=yes removes them): {}", extras.len());
    }
    match (&o.register, &registered_as) {
        (Some(n), _) => {
            let _ = writeln!(out, "then register {new_vmx_path} as VM {n}");
        }
        (None, Some(r)) => {
            let _ = writeln!(
                out,
                "{new_vmx_path} is registered as VM {r} (powered off); it uses the restored files at its next power-on"
            );
        }
        (None, None) => {
            let _ = writeln!(out, "{new_vmx_path} is not registered; add --register NAME to register it");
        }
    }
    if o.dry_run {
        let _ = writeln!(out, "dry run: nothing was changed");
        return Ok(());
    }
    let _ = out.flush();
    crate::observer::confirm(
        &o.watch,
        &format!(
            "This writes {} file(s) of VM {vm_name} to ESXi host {}, overwriting {}{}",
            items.len(),
            t.label,
            plan.overwrite.len(),
            if plan.delete.is_empty() { String::new() } else { format!(" and DELETING {}", plan.delete.len()) }
        ),
        "proceed",
        o.yes,
    )?;
    // Before anything is written on the host (below, after the checks): the next backups do
    // not trust CBT across this restore (its writes are not tracked; crate::backup::cbt::RESTORED): this job's, and those
    // of every job that backs up a VM whose files this restore writes over on this host (a
    // second job of the same VM, e.g. a weekly one to another RootDir, or the job of the VM a
    // --to-host restore lands on).
    // The other jobs' locks are taken first (a refusal then marks nothing) and held until the
    // restore ends (a backup of theirs meanwhile would be dated after the mark, and trusted),
    // their disks mounted for the mark.
    let mut held = Vec::new();
    for j in ctx.cfg.all_jobs() {
        let same_vm = j.esxi.as_ref().is_some_and(|e| {
            e.host.eq_ignore_ascii_case(&t.api.0) && e.port == t.api.1 && overwritten.contains(&e.vm_name)
        });
        if !same_vm || j.name == ctx.job.name {
            continue;
        }
        let vm = j.esxi.as_ref().map_or("", |e| e.vm_name.as_str());
        let lock = crate::lock::acquire(&ctx.cfg.lock_dir(), &j.name).map_err(|e| {
            e.context(format!(
                "job {} backs up VM {vm} too and its lock could not be taken (is it running?); nothing was written on the host",
                j.name
            ))
        })?;
        match crate::automount::mount_for_command(j, &ctx.cfg.lock_dir()) {
            Ok(disk) => held.push((j, vm, lock, disk)),
            // Its backup disk is away: the restore is not refused for it, but its next run must
            // not trust CBT, and only the user can see to that.
            Err(e) => {
                let w = format!(
                    "job {} backs up VM {vm} too, but its AutomountDevice could not be mounted ({e}): run its next backup once with ESXiCBT=no, or it may carry what this restore replaced",
                    j.name
                );
                ctx.log.warn(&w);
                let _ = writeln!(out, "warning: {w}");
            }
        }
    }

    // Everything local first: the small chunked files (descriptors, which the reference walk
    // reads and may rewrite) rebuilt here, the VM checked whole, the absolute paths of the
    // .vmx, .vmsd and descriptors rewritten for the new place; then every chunk of the chunked
    // disks verified (rebuilt in staging where no agent runs on the target). A refusal of the
    // check comes before the agent is started (or installed) on the target.
    let (big, small): (Vec<Chunked>, Vec<Chunked>) = chunked.iter().cloned().partition(|c| c.size > SMALL_CHUNKED);
    rebuild_all(ctx, &small)?;
    let orig_urls: Vec<(String, String)> = record.datastores.iter().map(|d| (d.name.clone(), d.url.clone())).collect();
    // The chunked disks (by their archived size: a rewrite below may change a descriptor's).
    let disks: Vec<bool> = items.iter().map(|it| it.chunked && it.size > SMALL_CHUNKED).collect();
    let vm_files: Vec<vmrefs::VmFile> = items
        .iter()
        .zip(&disks)
        .map(|(it, &disk)| vmrefs::VmFile {
            ds: it.orig_ds.clone(),
            dir: it.orig_dir.clone(),
            name: it.name.clone(),
            local: it.local.clone(),
            disk,
        })
        .collect();
    // A .vmx, .vmsd or descriptor the check cannot read whole stops the restore (it could name
    // what the check would not see).
    let unchecked = |e: String| {
        Error::new(format!(
            "archive {} cannot be checked as VM {vm_name}: {e}; nothing was written to {}",
            arch.name(),
            t.label
        ))
    };
    // Source directory -> its target directory (datastore, dir, host path).
    let moved: Vec<Moved> = items
        .iter()
        .map(|it| {
            let d = &dirs[it.dir];
            Moved {
                orig: (it.orig_ds.clone(), it.orig_dir.clone()),
                ds: d.ds.clone(),
                dir: d.dir.clone(),
                host: d.host.clone(),
            }
        })
        .collect();
    let walk = vmrefs::walk(&vm_files, (vmx_ds, vmx_dir, vmx_name), &orig_urls).map_err(unchecked)?;
    let mut missing = walk.missing;
    // The files the record lists, as `ds/dir/file` below `vmfs/volumes/`.
    for p in record.files().into_iter().filter_map(|p| p.to_str()?.strip_prefix("vmfs/volumes/")) {
        let (ds, rest) = p.split_once('/').unwrap_or(("", p));
        let (dir, name) = rest.rsplit_once('/').unwrap_or(("", rest));
        if !vm_files.iter().any(|f| f.ds == ds && f.dir == dir && f.name == name) {
            missing.push(format!("{name} (listed in {ESXI_INI} as vmfs/volumes/{p})"));
        }
    }
    if !missing.is_empty() {
        bail!(
            "archive {} does not hold the whole VM {vm_name}: {} {} missing; the restored VM would not start, so nothing was written to {}",
            arch.name(),
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            t.label
        );
    }
    for i in walk.config {
        let it = &mut items[i];
        // Read or rewritten, never skipped: a file left as it was may name the original VM's
        // disks (a copy beside it would write into them).
        let text = vmrefs::read_config(&it.name, &it.local).map_err(unchecked)?;
        let (from, to) = ((it.orig_ds.as_str(), it.orig_dir.as_str()), (&dirs[it.dir].ds, &dirs[it.dir].dir));
        let new = vmrefs::rewrite_paths(&text, &|v| new_reference(v, from, (to.0, to.1), &orig_urls, &moved))
            .map_err(|e| Error::new(format!("{} of VM {vm_name}: {e}; nothing was written to {}", it.name, t.label)))?;
        let Some(new) = new else { continue };
        let p = staging.dir.join(format!("{}", it.dir)).join(&it.name);
        fs::create_dir_all(p.parent().unwrap()).ctx(|| format!("cannot create {}", p.parent().unwrap().display()))?;
        if p != it.local {
            // The archived file read just now (a regular file, never a link followed).
            let md = fs::symlink_metadata(&it.local).ctx(|| format!("cannot stat {}", it.local.display()))?;
            fs::write(&p, &new).ctx(|| format!("cannot write {}", p.display()))?;
            fs::set_permissions(&p, md.permissions()).ctx(|| format!("cannot chmod {}", p.display()))?;
        } else {
            fs::write(&p, &new).ctx(|| format!("cannot write {}", p.display()))?;
        }
        ctx.log.info(format!("rewrote the disk paths of {} for the new place", it.name));
        it.local = p;
        it.size = new.len() as u64;
    }
    // The same walk over the files as they will be on the target: every name the restored
    // .vmx, .vmsd and descriptors give is among the restored files, at its new place (a name
    // left pointing at the original VM's files, or at none, stops the restore here).
    let target_files: Vec<vmrefs::VmFile> = items
        .iter()
        .zip(&disks)
        .map(|(it, &disk)| vmrefs::VmFile {
            ds: dirs[it.dir].ds.clone(),
            dir: dirs[it.dir].dir.clone(),
            name: it.name.clone(),
            local: it.local.clone(),
            disk,
        })
        .collect();
    let mut target_urls: Vec<(String, String)> = Vec::new();
    for d in &dirs {
        if !target_urls.iter().any(|(n, _)| n == &d.ds) {
            target_urls.push((d.ds.clone(), ds_path_of(&d.ds)?));
        }
    }
    let vd = &dirs[vmx_target];
    let after = vmrefs::walk(&target_files, (&vd.ds, &vd.dir, vmx_name), &target_urls).map_err(unchecked)?;
    if !after.missing.is_empty() {
        bail!(
            "VM {vm_name} restored to {}: its files would not find {} at the new place; nothing was written to {}",
            new_vmx_path,
            after.missing.join(", "),
            t.label
        );
    }
    // The agent is kept on the datastore of the first chunked disk (a datastore survives a
    // reboot of the host).
    let agent_ds = match chunked.first() {
        Some(c) => items.iter().find(|it| it.local == c.local).map(|it| ds_path_of(&dirs[it.dir].ds)).transpose()?,
        None => None,
    };
    let agent = target_agent(ctx, &t.ep, agent_ds.as_deref(), &chunked, out)?;
    // With the agent, the big files (disk extents) go through it; else they are rebuilt here.
    let (through_agent, rebuilt) = if agent.is_some() { (big, Vec::new()) } else { (Vec::new(), big) };
    verify_all(ctx, &through_agent, out)?;
    rebuild_all(ctx, &rebuilt)?;
    let by_agent = |it: &Item| through_agent.iter().any(|c| c.local == it.local);

    // The VM is checked whole and every chunk verified or rebuilt: the marks now, right before
    // the first VM file is written on the host (a refused restore marks nothing: the next
    // backups keep their CBT; the agent installed above is no VM file).
    crate::backup::cbt::mark_restored(&ctx.job.job_dir())?;
    for (j, vm, _, _) in &held {
        crate::backup::cbt::mark_restored(&j.job_dir())
            .map_err(|e| e.context(format!("job {} backs up VM {vm} too", j.name)))?;
    }

    // Send.
    let mkdirs: String = dirs.iter().map(|d| format!("mkdir -p {}\n", shell_quote(&d.host))).collect();
    t.ep.sh(&mkdirs, "creating the target directories")?;
    let mut sent = 0u64;
    for (i, d) in dirs.iter().enumerate() {
        let mut a = rsync::Args::new(t.rsync_job, &t.ep.source());
        // --ignore-times: by content, not size and time (as the restore to a host).
        a.opts(["--inplace", "--no-whole-file", "--sparse", "--stats", "--ignore-times"]);
        // Every source is a regular file (archived_files, or rebuilt and rewritten in staging):
        // anything else put in its place since is skipped, never followed (the check then
        // finds the file missing or different).
        a.opts(rsync::REGULAR_FILES_ONLY);
        // Chunked disks restored by the agent are not in rsync's part.
        let mine: Vec<&Item> = items.iter().filter(|it| it.dir == i && !by_agent(it)).collect();
        // rsync names the destination after the source's base name: send the ones whose local
        // name differs one by one.
        let (same, renamed): (Vec<&&Item>, Vec<&&Item>) =
            mine.iter().partition(|it| it.local.file_name().map(|n| n.to_string_lossy() == it.name).unwrap_or(false));
        if !same.is_empty() {
            let mut a = a.clone();
            a.from_local(same.iter().map(|it| it.local.display().to_string()));
            a.to(t.ep.dest(format!("{}/", d.host)));
            let r = run_rsync(ctx, t.rsync_job, &a, &format!("copying to {}", d.host), true)?;
            sent += bytes_sent(&r.stdout);
        }
        for it in renamed {
            let mut a = a.clone();
            a.from_local([it.local.display().to_string()]).to(t.ep.dest(format!("{}/{}", d.host, it.name)));
            let r = run_rsync(ctx, t.rsync_job, &a, &format!("copying {}", it.name), true)?;
            sent += bytes_sent(&r.stdout);
        }
    }
    if let Some(session) = agent {
        // A VM is restored whole, as the rsync part above does it (no --update): a disk the VM
        // wrote since the archive (newer, as every running VM's disk is) is rolled back too, or
        // the restored configuration would meet a disk of another time.
        let (s, _) = send_through_agent(ctx, session, &through_agent, false)?;
        sent += s;
    }
    if o.delete && !extras.is_empty() {
        let rm: String =
            extras.iter().map(|(i, n)| format!("rm -f {}\n", shell_quote(&format!("{}/{n}", dirs[*i].host)))).collect();
        t.ep.sh(&rm, "deleting files not in the archive")?;
    }
    let total: u64 = items.iter().map(|i| i.size).sum();
    let _ = writeln!(
        out,
        "copied {} file(s) of VM {vm_name} ({total} bytes) to {}: {sent} bytes sent ({})",
        items.len(),
        t.label,
        if through_agent.is_empty() {
            "rsync delta transfer"
        } else {
            "rsync delta transfer; chunked disks through affa-agent, each checked by it as written"
        }
    );
    ctx.log.info(format!("copied {} file(s), {total} bytes, {sent} bytes sent", items.len()));

    // Check: every file on the host against the archive, but the disks the agent wrote (it
    // checked the whole-file BLAKE3 of the bytes it wrote before renaming each into place).
    let checked_here: Vec<&Item> = items.iter().filter(|it| !by_agent(it)).collect();
    let bar = o.watch.meter("hashing the archive", Some(checked_here.iter().map(|i| i.size).sum()));
    let mut expect = Vec::new();
    for it in checked_here {
        let (sha256, size) = sha256_file(&it.local, Some(&bar))?;
        expect.push(Expect { remote: format!("{}/{}", dirs[it.dir].host, it.name).into(), size, sha256, mtime: 0 });
    }
    drop(bar);
    let mut checked = check_remote(&t.ep, &expect, false)?;
    checked.ok += through_agent.len();
    report_check(ctx, &checked, out)?;

    if let Some(n) = &o.register {
        let vm = t.client.register_vm(&new_vmx_path, Some(n))?;
        let _ = writeln!(out, "registered {new_vmx_path} as VM {n} ({}) on ESXi host {}", vm.value, t.label);
        ctx.log.info(format!("registered {new_vmx_path} as VM {n} ({})", vm.value));
    }
    Ok(())
}

/// A source directory of the VM and where the restore puts its files.
struct Moved {
    /// Datastore and directory on the source host.
    orig: (String, String),
    ds: String,
    dir: String,
    /// The target directory's host path.
    host: String,
}

/// The name a restored `.vmx`, `.vmsd` or descriptor (from `from`, restored to `to`: datastore
/// and directory) must give for what it named as `v` on the source host: None when `v` stays
/// right (a relative name that finds the same file at the new place, or a name in a directory
/// the archive holds nothing of), else the name's target host path (the lookup is by directory:
/// an ISO the archive lacks, in the VM's own directory, is pointed at the copy's directory too). Relative names count: `--to-dir` puts the
/// VM's directories into one, so `../other/d.vmdk` would name the original VM's disk.
fn new_reference(
    v: &str,
    from: (&str, &str),
    to: (&str, &str),
    orig_urls: &[(String, String)],
    moved: &[Moved],
) -> Option<String> {
    let (ds, dir, file) = vmrefs::resolve(v, from.0, from.1, orig_urls)?;
    let m = moved.iter().find(|m| m.orig.0 == ds && m.orig.1 == dir)?;
    if !v.starts_with('/') && vmrefs::resolve(v, to.0, to.1, &[]) == Some((m.ds.clone(), m.dir.clone(), file.clone())) {
        return None;
    }
    let new = format!("{}/{file}", m.host);
    (new != v).then_some(new)
}

/// rsync --stats: "Total bytes sent: N".
pub(super) fn bytes_sent(stdout: &str) -> u64 {
    crate::report::parse_rsync_stats(stdout)
        .into_iter()
        .find(|(k, _)| k == "TotalBytesSent")
        .and_then(|(_, v)| v.replace(',', "").parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(orig: (&str, &str), ds: &str, dir: &str, host: &str) -> Moved {
        Moved { orig: (orig.0.into(), orig.1.into()), ds: ds.into(), dir: dir.into(), host: host.into() }
    }

    /// `--to-dir copy`: the VM's directories vm (ds1), o (ds1) and vm (ds2) each land in `copy`.
    #[test]
    fn references_follow_the_files_to_the_new_place() {
        let urls =
            vec![("ds1".to_string(), "/vmfs/volumes/u1".to_string()), ("ds2".into(), "/vmfs/volumes/u2/".into())];
        let moved = vec![
            m(("ds1", "vm"), "ds1", "copy", "/vmfs/volumes/u1/copy"),
            m(("ds1", "o"), "ds1", "copy", "/vmfs/volumes/u1/copy"),
            m(("ds2", "vm"), "ds2", "copy", "/vmfs/volumes/u2/copy"),
        ];
        let r = |v: &str| new_reference(v, ("ds1", "vm"), ("ds1", "copy"), &urls, &moved);
        // Beside it before and after: kept.
        assert_eq!(r("vm-000001.vmdk"), None);
        // Relative across directories: it would name the original's disk (or nothing).
        assert_eq!(r("../o/a.vmdk").as_deref(), Some("/vmfs/volumes/u1/copy/a.vmdk"));
        // Absolute, by url or by name: the target's.
        assert_eq!(r("/vmfs/volumes/u2/vm/d.vmdk").as_deref(), Some("/vmfs/volumes/u2/copy/d.vmdk"));
        assert_eq!(r("/vmfs/volumes/ds2/vm/d.vmdk").as_deref(), Some("/vmfs/volumes/u2/copy/d.vmdk"));
        // What the archive does not hold (an ISO elsewhere), or what leaves the datastores: kept.
        assert_eq!(r("/vmfs/volumes/u1/iso/x.iso"), None);
        assert_eq!(r("../../../etc/x.vmdk"), None);
        // A relative name into a subdirectory restored elsewhere.
        let moved2 = vec![m(("ds1", "vm"), "ds1", "copy", "/h/copy"), m(("ds1", "vm/sub"), "ds1", "copy", "/h/copy")];
        assert_eq!(
            new_reference("sub/b.vmdk", ("ds1", "vm"), ("ds1", "copy"), &urls, &moved2).as_deref(),
            Some("/h/copy/b.vmdk")
        );
        // In place: nothing changes but an absolute path by url becomes the target's path.
        let same = vec![m(("ds1", "vm"), "ds1", "vm", "/vmfs/volumes/u1/vm")];
        let r = |v: &str| new_reference(v, ("ds1", "vm"), ("ds1", "vm"), &urls, &same);
        assert_eq!(r("a.vmdk"), None);
        assert_eq!(r("/vmfs/volumes/u1/vm/a.vmdk"), None);
        assert_eq!(r("/vmfs/volumes/ds1/vm/a.vmdk").as_deref(), Some("/vmfs/volumes/u1/vm/a.vmdk"));
    }
}
