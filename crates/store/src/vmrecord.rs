//! The VM record of an ESXi archive: `.affa-esxi.ini` (docs/FORMAT.md, VM record format 3).
//!
//! Owns: the file's name, its format and its one typed form [`VmRecord`]: backup (affa's
//! `backup::vm`) writes it with [`VmRecord::to_text`], restore reads it with [`VmRecord::parse`].
//! Must never: write a value that would add a line (a control character: a newline would add
//! keys), panic or grow without bound on what it reads, or trust what it reads (an archive's
//! files came from a disk that a host's data shares: every name and path read here is checked by
//! its user with `untrusted::SafeRelPath` before use).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::untrusted::{ini_value, shown};

/// The VM record's file name, at the root of an ESXi job's archive.
pub const ESXI_INI: &str = ".affa-esxi.ini";

/// The format this affa writes. It reads formats 1 to 3 (3 added each disk's Changed Block
/// Tracking identity and how the run read it).
pub const FORMAT: u32 = 3;

/// The largest record [`VmRecord::parse`] reads: a reader reads at most one byte more.
pub const MAX_LEN: usize = 1 << 20;

/// The most snapshots, datastores, disks, or links of one disk, a record may list.
const MAX_ITEMS: usize = 4096;

/// What backup knew of the VM it archived: `[VM]` and the sections after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// 1 (written before affa archived chains: no snapshots, no links) or 2.
    pub format: u32,
    pub name: String,
    /// `[datastore] dir/name.vmx`, as the host named it.
    pub vmx_path: String,
    pub host: String,
    /// affa's snapshot of the run (removed before the record was written).
    pub snapshot: String,
    /// The VM's own snapshots, depth first.
    pub snapshots: Vec<SnapshotRec>,
    pub datastores: Vec<DatastoreRec>,
    pub disks: Vec<DiskRec>,
}

/// `[Snapshot.N]`: a snapshot of the VM's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRec {
    pub name: String,
    /// The host's snapshot id (empty in the record when the host sent none).
    pub id: Option<i64>,
    /// The parent's id; none for a root.
    pub parent: Option<i64>,
    /// createTime as the host sent it.
    pub created: String,
    /// The `.vmsn`, as an archive path.
    pub data: Option<PathBuf>,
    /// The `.vmem` of a memory snapshot, as an archive path.
    pub memory: Option<PathBuf>,
}

/// `[Datastore.N]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreRec {
    pub name: String,
    /// The datastore's path on the host (`/vmfs/volumes/<uuid>/`).
    pub url: String,
}

/// `[Disk.N]`: a virtual disk; its top link first (what the `.vmx` names), then its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRec {
    pub label: String,
    /// The datastore of the top link.
    pub datastore: String,
    /// The top link's descriptor, as an archive path.
    pub descriptor: PathBuf,
    /// The top link's (first) extent, as an archive path.
    pub extent: PathBuf,
    /// Whether that extent is stored as chunks.
    pub chunked: bool,
    /// Capacity in bytes.
    pub size: u64,
    /// `[Disk.N.Link.K]`, base first (empty in format 1).
    pub links: Vec<LinkRec>,
    /// The disk's Changed Block Tracking identity and how this run read it (format 3; all
    /// unknown in older records).
    pub run: DiskRun,
}

/// How a run read a disk: by Changed Block Tracking, in a full pass, or through rsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Only the chunks CBT named were read; the others were carried from the previous archive.
    Cbt,
    /// The agent read the whole disk (`reason` says why CBT was not used, if it could have been).
    Full,
    /// rsync (a file not chunked, or `chunkTransport` rsync / its fallback).
    Rsync,
}

impl ReadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Cbt => "cbt",
            ReadMode::Full => "full",
            ReadMode::Rsync => "rsync",
        }
    }
}

/// `[Disk.N]`'s format 3 keys: what the next run's CBT needs, and what this run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskRun {
    /// The virtual device's key (QueryChangedDiskAreas names the disk by it).
    pub device_key: Option<i32>,
    /// `backing.uuid` of the disk as the snapshot froze it.
    pub uuid: Option<String>,
    /// `backing.changeId` as the snapshot froze it; none when tracking was off.
    pub change_id: Option<String>,
    pub read: Option<ReadMode>,
    /// Why a full pass rather than CBT (one line), when CBT was wanted.
    pub reason: Option<String>,
    /// Bytes read on the host for this disk, and bytes received from it.
    pub host_bytes_read: Option<u64>,
    pub bytes_sent: Option<u64>,
    /// CBT runs since the last full (or verify) pass of this disk: 0 after a full pass.
    pub cbt_runs: u32,
}

/// `[Disk.N.Link.K]`: one link of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRec {
    pub descriptor: PathBuf,
    /// Each extent (archive path) and whether it is stored as chunks.
    pub extents: Vec<(PathBuf, bool)>,
}

impl VmRecord {
    /// The record as affa writes it (format 2, sections and keys in the documented order).
    /// Refuses a value with a control character: a newline would add keys.
    pub fn to_text(&self) -> Result<String> {
        if self.format != FORMAT {
            bail!("cannot write VM record format {}: this affa writes format {FORMAT}", self.format);
        }
        let mut w = Writer(String::new());
        w.0.push_str("[VM]\n");
        w.put("Format", "VM record format", &FORMAT.to_string())?;
        w.put("Name", "VM name", &self.name)?;
        w.put("VmxPath", "vmx path", &self.vmx_path)?;
        w.put("Host", "ESXi host name", &self.host)?;
        w.put("Snapshot", "snapshot name", &self.snapshot)?;
        let id = |i: Option<i64>| i.map(|n| n.to_string()).unwrap_or_default();
        for (i, s) in self.snapshots.iter().enumerate() {
            w.section(&format!("Snapshot.{i}"));
            w.put("Name", "snapshot name", &s.name)?;
            w.put("Id", "snapshot id", &id(s.id))?;
            w.put("Parent", "snapshot id", &id(s.parent))?;
            w.put("Created", "snapshot time", &s.created)?;
            for (k, f) in [("Data", &s.data), ("Memory", &s.memory)] {
                if let Some(f) = f {
                    w.path(k, f)?;
                }
            }
        }
        for (i, d) in self.datastores.iter().enumerate() {
            w.section(&format!("Datastore.{i}"));
            w.put("Name", "datastore name", &d.name)?;
            w.put("Url", "datastore path", &d.url)?;
        }
        for (i, d) in self.disks.iter().enumerate() {
            w.section(&format!("Disk.{i}"));
            w.put("Label", "disk label", &d.label)?;
            w.put("Datastore", "datastore name", &d.datastore)?;
            w.path("Descriptor", &d.descriptor)?;
            w.path("Extent", &d.extent)?;
            w.put("Chunked", "", yes_no(d.chunked))?;
            w.put("Size", "", &d.size.to_string())?;
            w.put("Links", "", &d.links.len().to_string())?;
            let r = &d.run;
            if let Some(k) = r.device_key {
                w.put("DeviceKey", "", &k.to_string())?;
            }
            for (k, what, v) in [
                ("Uuid", "disk UUID", &r.uuid),
                ("ChangeId", "changeId", &r.change_id),
                ("ReadReason", "reason", &r.reason),
            ] {
                if let Some(v) = v {
                    w.put(k, what, v)?;
                }
            }
            if let Some(m) = r.read {
                w.put("Read", "", m.as_str())?;
            }
            for (k, v) in [("HostBytesRead", r.host_bytes_read), ("BytesSent", r.bytes_sent)] {
                if let Some(v) = v {
                    w.put(k, "", &v.to_string())?;
                }
            }
            if r.cbt_runs > 0 {
                w.put("CbtRuns", "", &r.cbt_runs.to_string())?;
            }
            for (k, l) in d.links.iter().enumerate() {
                w.section(&format!("Disk.{i}.Link.{k}"));
                w.path("Descriptor", &l.descriptor)?;
                for (j, (e, chunked)) in l.extents.iter().enumerate() {
                    let n = if j == 0 { String::new() } else { format!(".{j}") };
                    w.path(&format!("Extent{n}"), e)?;
                    w.put(&format!("Chunked{n}"), "", yes_no(*chunked))?;
                }
            }
        }
        Ok(w.0)
    }

    /// Read a record (formats 1 and 2). Hostile input: a missing, repeated, unknown or malformed
    /// key or section is a one-line error naming it; nothing here makes a path safe to use.
    pub fn parse(text: &str) -> Result<VmRecord> {
        if text.len() > MAX_LEN {
            bail!("the VM record is larger than {MAX_LEN} bytes: affa writes none that large");
        }
        let mut vm = None;
        let mut snapshots = BTreeMap::new();
        let mut datastores = BTreeMap::new();
        let mut disks: BTreeMap<usize, (DiskRec, Option<usize>)> = BTreeMap::new();
        let mut links = BTreeMap::new();
        for mut s in sections(text)? {
            match kind(&s.name) {
                Some(Kind::Vm) => vm = Some(vm_section(&mut s)?),
                Some(Kind::Snapshot(i)) => {
                    snapshots.insert(i, snapshot_section(&mut s)?);
                }
                Some(Kind::Datastore(i)) => {
                    datastores.insert(i, DatastoreRec { name: s.take("Name")?, url: s.take("Url")? });
                }
                Some(Kind::Disk(i)) => {
                    disks.insert(i, disk_section(&mut s)?);
                }
                Some(Kind::Link(i, k)) => {
                    links.insert((i, k), link_section(&mut s)?);
                }
                None => bail!(
                    "[{}]: unknown section; a VM record has [VM], [Snapshot.N], [Datastore.N], [Disk.N] and [Disk.N.Link.K]",
                    shown(&s.name)
                ),
            }
            s.done()?;
        }
        let Some((format, name, vmx_path, host, snapshot)) = vm else {
            bail!("no [VM] section: not a VM record");
        };
        let mut rec = VmRecord {
            format,
            name,
            vmx_path,
            host,
            snapshot,
            snapshots: snapshots.into_values().collect(),
            datastores: datastores.into_values().collect(),
            disks: Vec::new(),
        };
        for (i, (mut d, n)) in disks {
            let n = match n {
                Some(n) => n,
                None if format >= 2 => bail!("[Disk.{i}] has no Links (expected the number of links of its chain)"),
                None => 0,
            };
            for k in 0..n {
                let Some(l) = links.remove(&(i, k)) else {
                    bail!("[Disk.{i}] has Links={n} but there is no [Disk.{i}.Link.{k}]");
                };
                d.links.push(l);
            }
            rec.disks.push(d);
        }
        if let Some((i, k)) = links.into_keys().next() {
            bail!("[Disk.{i}.Link.{k}]: no [Disk.{i}] with more than {k} Links");
        }
        Ok(rec)
    }

    /// Every archive path the record lists, each once, in record order: the snapshots' files,
    /// each disk's top descriptor and extent and every link's. Untrusted: check before use.
    pub fn files(&self) -> Vec<&Path> {
        let snaps = self.snapshots.iter().flat_map(|s| s.data.iter().chain(&s.memory));
        let disks = self.disks.iter().flat_map(|d| {
            [&d.descriptor, &d.extent].into_iter().chain(
                d.links.iter().flat_map(|l| std::iter::once(&l.descriptor).chain(l.extents.iter().map(|(e, _)| e))),
            )
        });
        let mut seen = BTreeSet::new();
        snaps.chain(disks).map(PathBuf::as_path).filter(|p| seen.insert(*p)).collect()
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

struct Writer(String);

impl Writer {
    fn section(&mut self, name: &str) {
        self.0.push_str(&format!("\n[{name}]\n"));
    }
    /// `key=value`; `what` names a value that came from the host or the configuration.
    fn put(&mut self, key: &str, what: &str, v: &str) -> Result<()> {
        let v = ini_value(if what.is_empty() { key } else { what }, v)?;
        self.0.push_str(&format!("{key}={v}\n"));
        Ok(())
    }
    fn path(&mut self, key: &str, p: &Path) -> Result<()> {
        let Some(v) = p.to_str() else {
            bail!("refusing archive path {} for {key}: not UTF-8", shown(&p.to_string_lossy()));
        };
        self.put(key, "archive path", v)
    }
}

/// One `[name]` and its keys, in the order of the text.
struct Section {
    name: String,
    keys: BTreeMap<String, String>,
}

fn sections(text: &str) -> Result<Vec<Section>> {
    let mut out: Vec<Section> = Vec::new();
    let mut names = BTreeSet::new();
    for (n, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if !names.insert(name) {
                bail!("[{}] appears twice", shown(name));
            }
            out.push(Section { name: name.to_string(), keys: BTreeMap::new() });
        } else if let Some((k, v)) = raw.split_once('=') {
            let k = k.trim();
            let Some(s) = out.last_mut() else {
                bail!("line {}: {}= before any [section]", n + 1, shown(k));
            };
            if s.keys.insert(k.to_string(), v.to_string()).is_some() {
                bail!("[{}] has {} twice", shown(&s.name), shown(k));
            }
        } else {
            bail!("line {}: \"{}\" is neither a [section] nor a key=value", n + 1, shown(raw));
        }
    }
    Ok(out)
}

impl Section {
    /// A key's value, removed from the section; none if absent.
    fn take_opt(&mut self, key: &str) -> Result<Option<String>> {
        let Some(v) = self.keys.remove(key) else { return Ok(None) };
        if v.chars().any(char::is_control) {
            bail!("[{}] {key}=\"{}\": a control character (affa writes none)", self.name, shown(&v));
        }
        Ok(Some(v))
    }
    fn take(&mut self, key: &str) -> Result<String> {
        match self.take_opt(key)? {
            Some(v) => Ok(v),
            None => bail!("[{}] has no {key}", self.name),
        }
    }
    /// An archive path: not empty (not checked for safety: its user does that).
    fn path_opt(&mut self, key: &str) -> Result<Option<PathBuf>> {
        match self.take_opt(key)? {
            Some(v) if v.is_empty() => bail!("[{}] {key}=: expected an archive path", self.name),
            v => Ok(v.map(PathBuf::from)),
        }
    }
    fn path(&mut self, key: &str) -> Result<PathBuf> {
        match self.path_opt(key)? {
            Some(p) => Ok(p),
            None => bail!("[{}] has no {key} (expected an archive path)", self.name),
        }
    }
    fn number<T: std::str::FromStr>(&mut self, key: &str, expected: &str) -> Result<Option<T>> {
        let Some(v) = self.take_opt(key)? else { return Ok(None) };
        let ok = !v.is_empty()
            && v.len() <= 20
            && v.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'));
        match v.parse().ok().filter(|_| ok) {
            Some(n) => Ok(Some(n)),
            None => bail!("[{}] {key}=\"{}\": expected {expected}", self.name, shown(&v)),
        }
    }
    fn yes_no(&mut self, key: &str) -> Result<bool> {
        match self.take(key)?.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            v => bail!("[{}] {key}=\"{}\": expected yes or no", self.name, shown(v)),
        }
    }
    /// An id, empty for none.
    fn id(&mut self, key: &str) -> Result<Option<i64>> {
        if self.keys.get(key).is_some_and(String::is_empty) {
            self.keys.remove(key);
            return Ok(None);
        }
        match self.number(key, "a snapshot id (a number) or nothing")? {
            Some(n) => Ok(Some(n)),
            None => bail!("[{}] has no {key}", self.name),
        }
    }
    /// No key left that the section's reader did not take.
    fn done(self) -> Result<()> {
        match self.keys.into_keys().next() {
            Some(k) => bail!("[{}] has the unknown key {}", self.name, shown(&k)),
            None => Ok(()),
        }
    }
}

enum Kind {
    Vm,
    Snapshot(usize),
    Datastore(usize),
    Disk(usize),
    Link(usize, usize),
}

/// An index: digits, no leading zero, below `MAX_ITEMS`.
fn index(s: &str) -> Option<usize> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !digits || s.len() > 5 {
        return None;
    }
    s.parse().ok().filter(|&n| n < MAX_ITEMS)
}

fn kind(name: &str) -> Option<Kind> {
    if name == "VM" {
        return Some(Kind::Vm);
    }
    if let Some(i) = name.strip_prefix("Snapshot.") {
        return index(i).map(Kind::Snapshot);
    }
    if let Some(i) = name.strip_prefix("Datastore.") {
        return index(i).map(Kind::Datastore);
    }
    let rest = name.strip_prefix("Disk.")?;
    match rest.split_once(".Link.") {
        None => index(rest).map(Kind::Disk),
        Some((i, k)) => Some(Kind::Link(index(i)?, index(k)?)),
    }
}

fn vm_section(s: &mut Section) -> Result<(u32, String, String, String, String)> {
    let format = match s.number::<u32>("Format", "a VM record format (1 to 3)")? {
        None => 1,
        Some(f @ 1..=FORMAT) => f,
        Some(f) if f > FORMAT => {
            bail!("[VM] Format={f}: this VM record was written by a newer affa; this one reads formats up to {FORMAT}")
        }
        Some(f) => bail!("[VM] Format={f}: expected a VM record format (1 to 3)"),
    };
    Ok((format, s.take("Name")?, s.take("VmxPath")?, s.take("Host")?, s.take("Snapshot")?))
}

fn snapshot_section(s: &mut Section) -> Result<SnapshotRec> {
    Ok(SnapshotRec {
        name: s.take("Name")?,
        id: s.id("Id")?,
        parent: s.id("Parent")?,
        created: s.take("Created")?,
        data: s.path_opt("Data")?,
        memory: s.path_opt("Memory")?,
    })
}

/// A disk and its `Links` (absent in format 1).
fn disk_section(s: &mut Section) -> Result<(DiskRec, Option<usize>)> {
    let disk = DiskRec {
        label: s.take("Label")?,
        datastore: s.take("Datastore")?,
        descriptor: s.path("Descriptor")?,
        extent: s.path("Extent")?,
        chunked: s.yes_no("Chunked")?,
        size: match s.number("Size", "the disk's capacity in bytes")? {
            Some(n) => n,
            None => bail!("[{}] has no Size (expected the disk's capacity in bytes)", s.name),
        },
        links: Vec::new(),
        run: DiskRun {
            device_key: s.number("DeviceKey", "a device key (a number)")?,
            uuid: s.take_opt("Uuid")?,
            change_id: s.take_opt("ChangeId")?,
            read: match s.take_opt("Read")?.as_deref() {
                None => None,
                Some("cbt") => Some(ReadMode::Cbt),
                Some("full") => Some(ReadMode::Full),
                Some("rsync") => Some(ReadMode::Rsync),
                Some(v) => bail!("[{}] Read=\"{}\": expected cbt, full or rsync", s.name, shown(v)),
            },
            reason: s.take_opt("ReadReason")?,
            host_bytes_read: s.number("HostBytesRead", "a number of bytes")?,
            bytes_sent: s.number("BytesSent", "a number of bytes")?,
            cbt_runs: s.number("CbtRuns", "a number of runs")?.unwrap_or(0),
        },
    };
    let links = s.number::<usize>("Links", &format!("the number of links of the disk's chain (1 to {MAX_ITEMS})"))?;
    if let Some(n) = links.filter(|n| !(1..=MAX_ITEMS).contains(n)) {
        bail!("[{}] Links={n}: expected the number of links of the disk's chain (1 to {MAX_ITEMS})", s.name);
    }
    Ok((disk, links))
}

fn link_section(s: &mut Section) -> Result<LinkRec> {
    let mut l = LinkRec { descriptor: s.path("Descriptor")?, extents: vec![(s.path("Extent")?, s.yes_no("Chunked")?)] };
    for j in 1..MAX_ITEMS {
        let Some(e) = s.path_opt(&format!("Extent.{j}"))? else { break };
        l.extents.push((e, s.yes_no(&format!("Chunked.{j}"))?));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with two snapshots of its own (one with memory) and two disks on two datastores,
    /// the second a flat disk of two extents.
    fn sample() -> VmRecord {
        let p = |s: &str| PathBuf::from(format!("vmfs/volumes/{s}"));
        VmRecord {
            format: FORMAT,
            name: "web 01".into(),
            vmx_path: "[datastore1] web01/web01.vmx".into(),
            host: "esx1.example.com".into(),
            snapshot: "BEXI-web-20260501100000".into(),
            snapshots: vec![
                SnapshotRec {
                    name: "before upgrade".into(),
                    id: Some(1),
                    parent: None,
                    created: "2026-05-01T10:00:00Z".into(),
                    data: Some(p("datastore1/web01/web01-Snapshot1.vmsn")),
                    memory: None,
                },
                SnapshotRec {
                    name: "after = upgrade".into(),
                    id: Some(2),
                    parent: Some(1),
                    created: "2026-05-02T10:00:00Z".into(),
                    data: Some(p("datastore1/web01/web01-Snapshot2.vmsn")),
                    memory: Some(p("datastore1/web01/web01-Snapshot2.vmem")),
                },
            ],
            datastores: vec![
                DatastoreRec { name: "datastore1".into(), url: "/vmfs/volumes/5f1c-a/".into() },
                DatastoreRec { name: "ds2".into(), url: "/vmfs/volumes/5f1c-b/".into() },
            ],
            disks: vec![
                DiskRec {
                    label: "Hard disk 1".into(),
                    datastore: "datastore1".into(),
                    descriptor: p("datastore1/web01/web01-000002.vmdk"),
                    extent: p("datastore1/web01/web01-000002-delta.vmdk"),
                    chunked: false,
                    size: 17179869184,
                    links: vec![
                        LinkRec {
                            descriptor: p("datastore1/web01/web01.vmdk"),
                            extents: vec![(p("datastore1/web01/web01-flat.vmdk"), true)],
                        },
                        LinkRec {
                            descriptor: p("datastore1/web01/web01-000001.vmdk"),
                            extents: vec![(p("datastore1/web01/web01-000001-delta.vmdk"), false)],
                        },
                        LinkRec {
                            descriptor: p("datastore1/web01/web01-000002.vmdk"),
                            extents: vec![(p("datastore1/web01/web01-000002-delta.vmdk"), false)],
                        },
                    ],
                    run: DiskRun::default(),
                },
                DiskRec {
                    label: "Hard disk 2".into(),
                    datastore: "ds2".into(),
                    descriptor: p("ds2/web01/web01_1.vmdk"),
                    extent: p("ds2/web01/web01_1-s001.vmdk"),
                    chunked: true,
                    size: 4194304,
                    links: vec![LinkRec {
                        descriptor: p("ds2/web01/web01_1.vmdk"),
                        extents: vec![
                            (p("ds2/web01/web01_1-s001.vmdk"), true),
                            (p("ds2/web01/web01_1-s002.vmdk"), false),
                        ],
                    }],
                    run: DiskRun::default(),
                },
            ],
        }
    }

    /// What backup's hand-built format! text (before this module owned the record) wrote for
    /// `sample()`: archives and docs/FORMAT.md stay valid.
    const SAMPLE_TEXT: &str = "[VM]
Format=2
Name=web 01
VmxPath=[datastore1] web01/web01.vmx
Host=esx1.example.com
Snapshot=BEXI-web-20260501100000

[Snapshot.0]
Name=before upgrade
Id=1
Parent=
Created=2026-05-01T10:00:00Z
Data=vmfs/volumes/datastore1/web01/web01-Snapshot1.vmsn

[Snapshot.1]
Name=after = upgrade
Id=2
Parent=1
Created=2026-05-02T10:00:00Z
Data=vmfs/volumes/datastore1/web01/web01-Snapshot2.vmsn
Memory=vmfs/volumes/datastore1/web01/web01-Snapshot2.vmem

[Datastore.0]
Name=datastore1
Url=/vmfs/volumes/5f1c-a/

[Datastore.1]
Name=ds2
Url=/vmfs/volumes/5f1c-b/

[Disk.0]
Label=Hard disk 1
Datastore=datastore1
Descriptor=vmfs/volumes/datastore1/web01/web01-000002.vmdk
Extent=vmfs/volumes/datastore1/web01/web01-000002-delta.vmdk
Chunked=no
Size=17179869184
Links=3

[Disk.0.Link.0]
Descriptor=vmfs/volumes/datastore1/web01/web01.vmdk
Extent=vmfs/volumes/datastore1/web01/web01-flat.vmdk
Chunked=yes

[Disk.0.Link.1]
Descriptor=vmfs/volumes/datastore1/web01/web01-000001.vmdk
Extent=vmfs/volumes/datastore1/web01/web01-000001-delta.vmdk
Chunked=no

[Disk.0.Link.2]
Descriptor=vmfs/volumes/datastore1/web01/web01-000002.vmdk
Extent=vmfs/volumes/datastore1/web01/web01-000002-delta.vmdk
Chunked=no

[Disk.1]
Label=Hard disk 2
Datastore=ds2
Descriptor=vmfs/volumes/ds2/web01/web01_1.vmdk
Extent=vmfs/volumes/ds2/web01/web01_1-s001.vmdk
Chunked=yes
Size=4194304
Links=1

[Disk.1.Link.0]
Descriptor=vmfs/volumes/ds2/web01/web01_1.vmdk
Extent=vmfs/volumes/ds2/web01/web01_1-s001.vmdk
Chunked=yes
Extent.1=vmfs/volumes/ds2/web01/web01_1-s002.vmdk
Chunked.1=no
";

    /// A format 1 record, as affa wrote it before it archived chains.
    const FORMAT1_TEXT: &str = "[VM]
Name=vm1
VmxPath=[datastore1] vm1/vm1.vmx
Host=h
Snapshot=BEXI-esx-20260101000000

[Datastore.0]
Name=datastore1
Url=/vmfs/volumes/a/

[Disk.0]
Label=Hard disk 1
Datastore=datastore1
Descriptor=vmfs/volumes/datastore1/vm1/vm1.vmdk
Extent=vmfs/volumes/datastore1/vm1/vm1-flat.vmdk
Chunked=yes
Size=4194304
";

    fn err(text: &str) -> String {
        VmRecord::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn writes_the_format_2_text_byte_for_byte() {
        // Format 3 without CBT keys is format 2's text but for the number.
        assert_eq!(sample().to_text().unwrap(), SAMPLE_TEXT.replacen("Format=2", "Format=3", 1));
    }

    #[test]
    fn format_3_records_each_disks_cbt_identity_and_how_it_was_read() {
        let mut r = sample();
        r.disks[1].run = DiskRun {
            device_key: Some(2001),
            uuid: Some("6000C29a-1b2c".into()),
            change_id: Some("52 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8/12".into()),
            read: Some(ReadMode::Full),
            reason: Some("verify pass (every 7 runs)".into()),
            host_bytes_read: Some(4194304),
            bytes_sent: Some(123456),
            cbt_runs: 3,
        };
        r.disks[0].run.read = Some(ReadMode::Rsync);
        let text = r.to_text().unwrap();
        assert!(text.contains(
            "Links=1\nDeviceKey=2001\nUuid=6000C29a-1b2c\nChangeId=52 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8/12\n\
             ReadReason=verify pass (every 7 runs)\nRead=full\nHostBytesRead=4194304\nBytesSent=123456\nCbtRuns=3\n"
        ), "{text}");
        assert_eq!(VmRecord::parse(&text).unwrap(), r);
        assert!(err(&text.replacen("Read=full", "Read=fast", 1))
            .contains("[Disk.1] Read=\"fast\": expected cbt, full or rsync"));
        assert!(err(&text.replacen("DeviceKey=2001", "DeviceKey=x", 1)).contains("[Disk.1] DeviceKey=\"x\""));
        // A changeId from a hostile host cannot add keys.
        r.disks[1].run.change_id = Some("1\nCbtRuns=0".into());
        assert!(r.to_text().unwrap_err().to_string().contains("changeId"));
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(VmRecord::parse(&r.to_text().unwrap()).unwrap(), r);
        assert_eq!(VmRecord::parse(SAMPLE_TEXT).unwrap(), VmRecord { format: 2, ..r.clone() });
        // Without snapshots, a snapshot without an id, a value with spaces at its ends.
        let mut r = sample();
        r.snapshots.truncate(1);
        r.snapshots[0].id = None;
        r.snapshots[0].data = None;
        r.name = " vm ".into();
        r.datastores.clear();
        assert_eq!(VmRecord::parse(&r.to_text().unwrap()).unwrap(), r);
        r.snapshots.clear();
        r.disks.clear();
        assert_eq!(VmRecord::parse(&r.to_text().unwrap()).unwrap(), r);
    }

    #[test]
    fn reads_format_1() {
        let r = VmRecord::parse(FORMAT1_TEXT).unwrap();
        assert_eq!((r.format, r.name.as_str(), r.vmx_path.as_str()), (1, "vm1", "[datastore1] vm1/vm1.vmx"));
        assert_eq!(r.datastores, vec![DatastoreRec { name: "datastore1".into(), url: "/vmfs/volumes/a/".into() }]);
        assert_eq!(r.disks.len(), 1);
        assert!(r.disks[0].links.is_empty() && r.disks[0].chunked && r.disks[0].size == 4194304);
        assert_eq!(
            r.files(),
            vec![
                Path::new("vmfs/volumes/datastore1/vm1/vm1.vmdk"),
                Path::new("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk")
            ]
        );
        // affa writes format 3 only.
        assert!(r.to_text().unwrap_err().to_string().contains("writes format 3"));
    }

    #[test]
    fn lists_every_archived_file_once() {
        let files: Vec<String> = sample().files().iter().map(|p| p.display().to_string()).collect();
        let want = [
            "datastore1/web01/web01-Snapshot1.vmsn",
            "datastore1/web01/web01-Snapshot2.vmsn",
            "datastore1/web01/web01-Snapshot2.vmem",
            "datastore1/web01/web01-000002.vmdk",
            "datastore1/web01/web01-000002-delta.vmdk",
            "datastore1/web01/web01.vmdk",
            "datastore1/web01/web01-flat.vmdk",
            "datastore1/web01/web01-000001.vmdk",
            "datastore1/web01/web01-000001-delta.vmdk",
            "ds2/web01/web01_1.vmdk",
            "ds2/web01/web01_1-s001.vmdk",
            "ds2/web01/web01_1-s002.vmdk",
        ];
        assert_eq!(files, want.map(|f| format!("vmfs/volumes/{f}")));
    }

    #[test]
    fn refuses_to_write_a_control_character() {
        // A newline in a host's name would add keys (or sections) to the record.
        let mut r = sample();
        r.name = "vm1\n[Datastore.9]\nName=planted".into();
        let e = r.to_text().unwrap_err().to_string();
        assert!(e.contains("VM name") && e.contains("control character") && !e.contains('\n'), "{e}");
        let mut r = sample();
        r.disks[1].label = "disk\r".into();
        assert!(r.to_text().unwrap_err().to_string().contains("disk label"));
        let mut r = sample();
        r.snapshots[1].created = "\u{1b}[2J".into();
        assert!(r.to_text().unwrap_err().to_string().contains("snapshot time"));
        let mut r = sample();
        r.disks[0].links[1].extents[0].0 = PathBuf::from("vmfs/volumes/ds/a\nChunked=no");
        assert!(r.to_text().unwrap_err().to_string().contains("archive path"));
        let mut r = sample();
        r.datastores[0].url = "/vmfs/volumes/x\n".into();
        assert!(r.to_text().unwrap_err().to_string().contains("datastore path"));
    }

    #[test]
    fn refuses_malformed_records_naming_the_key() {
        assert!(err("").contains("no [VM] section"));
        assert!(err(&SAMPLE_TEXT.replacen("[VM]", "[Vm]", 1)).contains("[Vm]: unknown section"));
        let e = err(&SAMPLE_TEXT.replacen("Format=2", "Format=4", 1));
        assert!(e.contains("Format=4") && e.contains("newer affa") && e.contains("formats up to 3"), "{e}");
        assert!(err(&SAMPLE_TEXT.replacen("Format=2", "Format=two", 1)).contains("[VM] Format=\"two\": expected"));
        assert!(err(&SAMPLE_TEXT.replacen("Format=2", "Format=0", 1)).contains("[VM] Format=0"));
        let e = err(&SAMPLE_TEXT.replacen("Size=4194304", "Size=4M", 1));
        assert_eq!(e, "[Disk.1] Size=\"4M\": expected the disk's capacity in bytes");
        assert!(err(&SAMPLE_TEXT.replacen("Size=4194304", "Size=-1", 1)).contains("[Disk.1] Size=\"-1\""));
        assert!(err(&SAMPLE_TEXT.replacen("Size=4194304\n", "", 1)).contains("[Disk.1] has no Size"));
        assert!(err(&SAMPLE_TEXT.replacen("VmxPath=", "VmxPat=", 1)).contains("[VM] has no VmxPath"));
        assert!(err(&SAMPLE_TEXT.replacen("Links=3\n", "", 1)).contains("[Disk.0] has no Links"));
        assert!(err(&SAMPLE_TEXT.replacen("Links=3", "Links=4", 1)).contains("no [Disk.0.Link.3]"));
        assert!(err(&SAMPLE_TEXT.replacen("Links=3", "Links=2", 1)).contains("[Disk.0.Link.2]: no [Disk.0]"));
        assert!(err(&SAMPLE_TEXT.replacen("Links=3", "Links=99999999999", 1)).contains("[Disk.0] Links="));
        assert!(err(&SAMPLE_TEXT.replacen("Links=1", "Links=0", 1)).contains("[Disk.1] Links=0"));
        assert!(err(&SAMPLE_TEXT.replacen("Chunked=yes", "Chunked=1", 1)).contains("expected yes or no"));
        assert!(err(&SAMPLE_TEXT.replacen("Chunked.1=no\n", "", 1)).contains("[Disk.1.Link.0] has no Chunked.1"));
        assert!(err(&SAMPLE_TEXT.replacen("Id=2", "Id=x", 1)).contains("[Snapshot.1] Id=\"x\""));
        assert!(err(&SAMPLE_TEXT.replacen("Data=", "Data=\n; ", 1)).contains("[Snapshot.0] Data=: expected"));
        assert!(err(&SAMPLE_TEXT.replacen("Name=web", "Name=web\u{1b}]0;x", 1)).contains("control character"));
        assert!(err(&format!("{SAMPLE_TEXT}Label=x\n")).contains("[Disk.1.Link.0] has the unknown key Label"));
        assert!(err(&format!("{SAMPLE_TEXT}\n[Disk.1]\n")).contains("[Disk.1] appears twice"));
        assert!(err(&format!("{SAMPLE_TEXT}\n[Disk.01]\n")).contains("[Disk.01]: unknown section"));
        assert!(err(&format!("{SAMPLE_TEXT}\n[Disk.5000]\n")).contains("unknown section"));
        assert!(err(&format!("{SAMPLE_TEXT}Descriptor=a\n")).contains("[Disk.1.Link.0] has Descriptor twice"));
        assert!(err(&format!("{SAMPLE_TEXT}garbage\n")).contains("line 70: \"garbage\" is neither"));
        assert!(err(&format!("Name=x\n{SAMPLE_TEXT}")).contains("line 1: Name= before any [section]"));
        assert!(err(&"x".repeat(MAX_LEN + 1)).contains("larger than"));
        // Every message is one line, escaped.
        let e = err(&SAMPLE_TEXT.replacen("Size=4194304", "Size=\u{1b}[2J\r", 1));
        assert!(!e.chars().any(char::is_control), "{e:?}");
    }

    #[test]
    fn reads_comments_blank_lines_and_crlf() {
        let text = format!(
            "; written by affa\r\n{}",
            SAMPLE_TEXT.replace('\n', "\r\n").replace("\r\n\r\n", "\r\n  \r\n# x\r\n")
        );
        assert_eq!(VmRecord::parse(&text).unwrap(), VmRecord { format: 2, ..sample() });
    }
}
