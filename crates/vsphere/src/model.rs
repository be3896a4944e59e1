//! The vSphere data affa reads, as plain Rust values, and their parsing from property-collector
//! results (ObjectContent / propSet / val trees).
//!
//! Owns: managed object references, the VM layout (disks with their backing parent chain,
//! snapshot tree, layoutEx files, datastores), task info, and the datastore-path → host-path
//! mapping. Must never: talk to the network, panic on unexpected or hostile values (a missing
//! or odd field is an error or a default, never an unwrap), or accept a path that climbs out of
//! its datastore.

use super::soap::{one_line, Node};
use crate::error::{Error, Result};
use crate::untrusted::{SafeName, SafeRelPath};

/// A managed object reference: type and id (`VirtualMachine` / `2`, `Task` / `haTask-…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> MoRef {
        MoRef { kind: kind.into(), value: value.into() }
    }
    /// Read a moref from an element with a `type` attribute.
    pub fn from_node(n: &Node) -> Option<MoRef> {
        let kind = n.type_attr.as_deref()?.trim();
        let value = n.text();
        if kind.is_empty() || value.is_empty() {
            return None;
        }
        Some(MoRef::new(kind, value))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// `about` of the service content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct About {
    pub full_name: String,
    pub api_version: String,
    pub product_line_id: String,
}

/// The parts of ServiceContent affa uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    pub about: About,
}

impl ServiceContent {
    pub fn from_node(rv: &Node) -> Result<ServiceContent> {
        let m = |name: &str| -> Result<MoRef> {
            rv.child(name).and_then(MoRef::from_node).ok_or_else(|| Error::new(format!("service content lacks {name}")))
        };
        let about = rv.child("about").map(|a| About {
            full_name: one_line(a.child_text("fullName").unwrap_or("")),
            api_version: one_line(a.child_text("apiVersion").unwrap_or("")),
            product_line_id: one_line(a.child_text("productLineId").unwrap_or("")),
        });
        Ok(ServiceContent {
            root_folder: m("rootFolder")?,
            property_collector: m("propertyCollector")?,
            view_manager: m("viewManager")?,
            session_manager: m("sessionManager")?,
            about: about.unwrap_or_default(),
        })
    }
}

/// One object of a RetrievePropertiesEx result: its moref and its (name, val) properties.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    pub obj: MoRef,
    pub props: Vec<(String, Node)>,
}

impl ObjectContent {
    pub fn prop(&self, name: &str) -> Option<&Node> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    pub fn prop_text(&self, name: &str) -> Option<&str> {
        self.prop(name).map(|v| v.text())
    }
}

/// Split a RetrieveResult (`returnval` of RetrievePropertiesEx / ContinueRetrievePropertiesEx)
/// into objects and the continuation token. A missing returnval means "no objects".
pub fn parse_retrieve_result(mut response: Node) -> Result<(Vec<ObjectContent>, Option<String>)> {
    // Taken by value: the properties' trees are moved out, not copied (a copy doubled the
    // memory of a big answer while the answer was still held).
    let Some(i) = response.children.iter().position(|c| c.name == "returnval") else {
        return Ok((Vec::new(), None));
    };
    let mut rv = response.children.swap_remove(i);
    let token = rv.child_text("token").filter(|t| !t.is_empty()).map(str::to_string);
    let mut out = Vec::new();
    for mut o in std::mem::take(&mut rv.children).into_iter().filter(|c| c.name == "objects") {
        let obj = o
            .child("obj")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::new("property result object without a reference"))?;
        let mut props = Vec::new();
        for mut p in std::mem::take(&mut o.children).into_iter().filter(|c| c.name == "propSet") {
            let name = p.child_text("name").unwrap_or("").to_string();
            if let Some(i) = p.children.iter().position(|c| c.name == "val") {
                props.push((name, p.children.swap_remove(i)));
            }
        }
        out.push(ObjectContent { obj, props });
    }
    Ok((out, token))
}

/// Decode the escaping vSphere applies to entity names (`%25`, `%2f`, `%5c`).
pub fn decode_entity_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let code = tail.get(1..3).map(|c| c.to_ascii_lowercase());
        match code.as_deref() {
            Some("25") => out.push('%'),
            Some("2f") => out.push('/'),
            Some("5c") => out.push('\\'),
            _ => {
                out.push('%');
                rest = &tail[1..];
                continue;
            }
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    out
}

/// A VM's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    PoweredOn,
    PoweredOff,
    Suspended,
    Unknown,
}

impl PowerState {
    pub fn parse(s: &str) -> PowerState {
        match s.trim() {
            "poweredOn" => PowerState::PoweredOn,
            "poweredOff" => PowerState::PoweredOff,
            "suspended" => PowerState::Suspended,
            _ => PowerState::Unknown,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::PoweredOn => "poweredOn",
            PowerState::PoweredOff => "poweredOff",
            PowerState::Suspended => "suspended",
            PowerState::Unknown => "unknown",
        }
    }
}

/// `config.files` of a VM (datastore paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFiles {
    pub vm_path_name: String,
    pub snapshot_directory: Option<String>,
    pub suspend_directory: Option<String>,
    pub log_directory: Option<String>,
}

/// One file backing of a virtual disk (one link of the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBacking {
    /// `[ds] dir/name.vmdk` (the descriptor).
    pub file_name: String,
    pub datastore: Option<MoRef>,
    /// The backing's xsi type, e.g. `VirtualDiskFlatVer2BackingInfo`, `VirtualDiskSeSparseBackingInfo`.
    pub kind: String,
    pub change_id: Option<String>,
    pub uuid: Option<String>,
}

/// A virtual disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub key: i32,
    pub label: String,
    pub capacity_bytes: u64,
    /// `chain[0]` is the current backing (a snapshot delta while a snapshot exists);
    /// each next element is the parent of the previous; the last is the base disk.
    pub chain: Vec<DiskBacking>,
}

impl Disk {
    /// The backing the VM writes to now.
    pub fn current(&self) -> &DiskBacking {
        &self.chain[0]
    }
    /// The end of the parent chain: the frozen base disk while a snapshot exists.
    pub fn base(&self) -> &DiskBacking {
        &self.chain[self.chain.len() - 1]
    }
    /// Whether the current backing is a delta on top of a parent.
    pub fn has_parent(&self) -> bool {
        self.chain.len() > 1
    }
}

/// A node of the snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTree {
    pub name: String,
    pub description: String,
    pub snapshot: MoRef,
    pub id: Option<i64>,
    /// `createTime` as the host wrote it (ISO 8601).
    pub create_time: String,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    pub quiesced: bool,
    pub children: Vec<SnapshotTree>,
}

/// A `layoutEx.file` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutFile {
    pub key: i32,
    /// `[ds] dir/file`
    pub name: String,
    /// config, nvram, snapshotData, snapshotList, diskDescriptor, diskExtent, log, swap, …
    pub kind: String,
    pub size: u64,
}

/// A `layoutEx.disk` entry, or a disk of a `layoutEx.snapshot` entry: the `layoutEx.file` keys of
/// each link of the disk's chain (descriptor and extents), base first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutDisk {
    pub key: i32,
    pub chain: Vec<Vec<i32>>,
}

/// A `layoutEx.snapshot` entry: the files of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutSnapshot {
    pub snapshot: MoRef,
    /// The `.vmsn` (layoutEx.file key).
    pub data_key: i32,
    /// The `.vmem` of a memory snapshot, if any.
    pub memory_key: Option<i32>,
    /// The disks as the snapshot froze them.
    pub disks: Vec<LayoutDisk>,
}

/// A datastore the VM uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    pub name: String,
    pub moref: MoRef,
    /// `info.url`, e.g. `ds:///vmfs/volumes/5f1c…/`.
    pub url: String,
    /// The directory on the host: `url` without `ds://`, always ending in `/`.
    pub host_path: String,
}

/// Everything affa reads about a VM before and after snapshotting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLayout {
    pub moref: MoRef,
    pub name: String,
    pub files: VmFiles,
    pub power_state: PowerState,
    pub disks: Vec<Disk>,
    pub current_snapshot: Option<MoRef>,
    pub snapshots: Vec<SnapshotTree>,
    pub layout_files: Vec<LayoutFile>,
    /// `layoutEx.disk` (empty when the host did not send it).
    pub layout_disks: Vec<LayoutDisk>,
    /// `layoutEx.snapshot` (empty when the host did not send it).
    pub layout_snapshots: Vec<LayoutSnapshot>,
    pub datastores: Vec<Datastore>,
}

impl VmLayout {
    /// `config.files.vmPathName`: `[ds] dir/name.vmx`.
    pub fn vmx_path(&self) -> &str {
        &self.files.vm_path_name
    }
    /// Map `[ds] dir/file` to its path on the host through the datastore's url.
    pub fn host_path(&self, ds_path: &str) -> Result<String> {
        host_path(&self.datastores, ds_path)
    }
    /// Every snapshot of the tree, depth first.
    pub fn all_snapshots(&self) -> Vec<&SnapshotTree> {
        let mut out = Vec::new();
        let mut stack: Vec<&SnapshotTree> = self.snapshots.iter().rev().collect();
        while let Some(s) = stack.pop() {
            out.push(s);
            stack.extend(s.children.iter().rev());
        }
        out
    }
    /// The `layoutEx.file` entry with this key.
    pub fn layout_file(&self, key: i32) -> Option<&LayoutFile> {
        self.layout_files.iter().find(|f| f.key == key)
    }
    /// Snapshots whose name starts with `prefix` (e.g. `BEXI-`).
    pub fn snapshots_named_like(&self, prefix: &str) -> Vec<&SnapshotTree> {
        self.all_snapshots().into_iter().filter(|s| s.name.starts_with(prefix)).collect()
    }
    /// Refuse a layout with names affa cannot use safely: every datastore name and every disk
    /// and configuration path by the one path-safety rule ([`split_ds_file`]), no control
    /// character in the VM name, disk labels or datastore paths (they go into `.affa-esxi.ini`
    /// and onto terminals). The client calls it on every layout it reads.
    pub fn check_names(&self) -> Result<()> {
        use crate::untrusted::ini_value;
        ini_value("VM name", &self.name)?;
        for d in &self.datastores {
            SafeName::new("datastore name", &d.name)?;
            ini_value("datastore path", &d.host_path)?;
        }
        split_ds_file(&self.files.vm_path_name)?;
        for d in &self.disks {
            ini_value("disk label", &d.label)?;
            for b in &d.chain {
                split_ds_file(&b.file_name)?;
            }
        }
        Ok(())
    }
}

/// Split `[ds] dir/file` into (`ds`, `dir/file`).
pub fn split_ds_path(p: &str) -> Result<(&str, &str)> {
    let bad = || Error::new(format!("not a datastore path: {:?}", one_line(p)));
    let rest = p.trim().strip_prefix('[').ok_or_else(bad)?;
    let end = rest.find(']').ok_or_else(bad)?;
    let ds = &rest[..end];
    let rel = rest[end + 1..].trim_start();
    if ds.is_empty() {
        return Err(bad());
    }
    Ok((ds, rel))
}

/// `[ds] dir/file` split by the one path-safety rule for names from a host
/// ([`crate::untrusted`]): the datastore name and the file name are plain names, the directory a
/// relative path of plain names (may be empty). A host cannot name a place outside its datastore,
/// here (the archive path `vmfs/volumes/<ds>/<dir>/<file>`) or on the host.
pub fn split_ds_file(p: &str) -> Result<(SafeName, SafeRelPath, SafeName)> {
    let (ds, rel) = split_ds_path(p)?;
    let ctx = |e: Error| e.context(format!("datastore path \"{}\"", crate::untrusted::shown(p)));
    let ds = SafeName::new("datastore name", ds).map_err(ctx)?;
    let (dir, file) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = SafeRelPath::new_or_empty("directory", dir).map_err(ctx)?;
    let file = SafeName::new("file name", file).map_err(ctx)?;
    Ok((ds, dir, file))
}

/// Host directory of a datastore url: strip `ds://`, ensure a trailing `/`.
pub fn url_to_host_path(url: &str) -> Result<String> {
    let p = url.trim();
    let p = p.strip_prefix("ds://").unwrap_or(p);
    if !p.starts_with('/') || p.chars().any(char::is_control) || p.split('/').any(|c| c == "..") {
        return Err(Error::new(format!("odd datastore url {:?}", one_line(url))));
    }
    let mut s = p.to_string();
    if !s.ends_with('/') {
        s.push('/');
    }
    Ok(s)
}

/// Map `[ds] dir/file` to the host path using the datastores' urls.
pub fn host_path(datastores: &[Datastore], ds_path: &str) -> Result<String> {
    let (ds, _, _) = split_ds_file(ds_path)?;
    let ds = ds.as_str();
    let rel = split_ds_path(ds_path)?.1;
    let d = datastores.iter().find(|d| d.name == ds).ok_or_else(|| {
        Error::new(format!(
            "datastore {:?} of {:?} is not among the VM's datastores ({})",
            one_line(ds),
            one_line(ds_path),
            datastores.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    Ok(format!("{}{}", d.host_path, rel))
}

fn parse_backing(b: &Node) -> Option<DiskBacking> {
    let file_name = b.child_text("fileName").filter(|s| !s.is_empty())?.to_string();
    Some(DiskBacking {
        file_name,
        datastore: b.child("datastore").and_then(MoRef::from_node),
        kind: b.xsi_type.clone().unwrap_or_default(),
        change_id: b.child_text("changeId").filter(|s| !s.is_empty()).map(str::to_string),
        uuid: b.child_text("uuid").filter(|s| !s.is_empty()).map(str::to_string),
    })
}

/// Read the VirtualDisk devices from a `config.hardware.device` value (ArrayOfVirtualDevice).
/// Disks without a file backing (RDM in physical mode has one too; raw devices without a
/// fileName) are reported as an error since they cannot be copied.
pub fn parse_disks(devices: &Node) -> Result<Vec<Disk>> {
    let mut out = Vec::new();
    for d in &devices.children {
        if d.xsi_type.as_deref() != Some("VirtualDisk") {
            continue;
        }
        let key: i32 = d
            .child_text("key")
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| Error::new("virtual disk without a device key"))?;
        let label = one_line(d.path(&["deviceInfo", "label"]).map(|n| n.text()).unwrap_or(""));
        let capacity_bytes = match d.child_text("capacityInBytes").and_then(|c| c.parse::<u64>().ok()) {
            Some(b) => b,
            None => d
                .child_text("capacityInKB")
                .and_then(|c| c.parse::<u64>().ok())
                .and_then(|kb| kb.checked_mul(1024))
                .unwrap_or(0),
        };
        let mut chain = Vec::new();
        let mut cur = d.child("backing");
        while let Some(b) = cur {
            match parse_backing(b) {
                Some(bk) => chain.push(bk),
                None => break,
            }
            cur = b.child("parent");
        }
        if chain.is_empty() {
            let what = if label.is_empty() { format!("key {key}") } else { label.clone() };
            return Err(Error::new(format!(
                "virtual disk {what} has no file backing (raw device?); it cannot be backed up"
            )));
        }
        out.push(Disk { key, label, capacity_bytes, chain });
    }
    Ok(out)
}

fn parse_snapshot_tree(n: &Node) -> Result<SnapshotTree> {
    let snapshot = n
        .child("snapshot")
        .and_then(MoRef::from_node)
        .ok_or_else(|| Error::new("snapshot tree node without a snapshot reference"))?;
    let create_time = n.child_text("createTime").unwrap_or("").to_string();
    let created = chrono::DateTime::parse_from_rfc3339(&create_time).ok().map(|t| t.with_timezone(&chrono::Utc));
    let mut children = Vec::new();
    for c in n.children_named("childSnapshotList") {
        // Recursion depth is bounded by the parser's nesting limit.
        children.push(parse_snapshot_tree(c)?);
    }
    Ok(SnapshotTree {
        name: n.child_text("name").unwrap_or("").to_string(),
        description: n.child_text("description").unwrap_or("").to_string(),
        snapshot,
        id: n.child_text("id").and_then(|i| i.parse().ok()),
        create_time,
        created,
        quiesced: n.child_text("quiesced") == Some("true"),
        children,
    })
}

/// Read a `snapshot` property value (VirtualMachineSnapshotInfo).
pub fn parse_snapshot_info(v: &Node) -> Result<(Option<MoRef>, Vec<SnapshotTree>)> {
    let current = v.child("currentSnapshot").and_then(MoRef::from_node);
    let mut roots = Vec::new();
    for r in v.children_named("rootSnapshotList") {
        roots.push(parse_snapshot_tree(r)?);
    }
    Ok((current, roots))
}

/// Read a `layoutEx.file` value (ArrayOfVirtualMachineFileLayoutExFileInfo).
pub fn parse_layout_files(v: &Node) -> Vec<LayoutFile> {
    v.children
        .iter()
        .filter_map(|f| {
            Some(LayoutFile {
                key: f.child_text("key").and_then(|k| k.parse().ok()).unwrap_or(-1),
                name: f.child_text("name")?.to_string(),
                kind: f.child_text("type").unwrap_or("").to_string(),
                size: f.child_text("size").and_then(|s| s.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

fn parse_layout_disk(d: &Node) -> Option<LayoutDisk> {
    let key = d.child_text("key")?.parse().ok()?;
    let chain = d
        .children_named("chain")
        .map(|u| u.children_named("fileKey").filter_map(|k| k.text().parse().ok()).collect())
        .collect();
    Some(LayoutDisk { key, chain })
}

/// Read a `layoutEx.disk` value (ArrayOfVirtualMachineFileLayoutExDiskLayout); entries without a
/// key are skipped.
pub fn parse_layout_disks(v: &Node) -> Vec<LayoutDisk> {
    v.children.iter().filter_map(parse_layout_disk).collect()
}

/// Read a `layoutEx.snapshot` value (ArrayOfVirtualMachineFileLayoutExSnapshotLayout); entries
/// without a snapshot reference or data key are skipped.
pub fn parse_layout_snapshots(v: &Node) -> Vec<LayoutSnapshot> {
    v.children
        .iter()
        .filter_map(|s| {
            Some(LayoutSnapshot {
                snapshot: s.child("key").and_then(MoRef::from_node)?,
                data_key: s.child_text("dataKey")?.parse().ok()?,
                memory_key: s.child_text("memoryKey").and_then(|k| k.parse().ok()).filter(|k: &i32| *k >= 0),
                disks: s.children_named("disk").filter_map(parse_layout_disk).collect(),
            })
        })
        .collect()
}

/// Read a `config.files` value.
pub fn parse_vm_files(v: &Node) -> VmFiles {
    let opt = |n: &str| v.child_text(n).filter(|s| !s.is_empty()).map(str::to_string);
    VmFiles {
        vm_path_name: v.child_text("vmPathName").unwrap_or("").to_string(),
        snapshot_directory: opt("snapshotDirectory"),
        suspend_directory: opt("suspendDirectory"),
        log_directory: opt("logDirectory"),
    }
}

/// Read an ArrayOfManagedObjectReference value.
pub fn parse_moref_array(v: &Node) -> Vec<MoRef> {
    v.children.iter().filter_map(MoRef::from_node).collect()
}

/// State of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Running,
    Success,
    Error,
}

/// The parts of TaskInfo affa uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub state: TaskState,
    /// The method name or description id (e.g. `VirtualMachine.createSnapshot`).
    pub name: String,
    /// For an error: (fault type, localized message).
    pub error: Option<(String, String)>,
    /// A moref result (the snapshot, the registered VM), if any.
    pub result: Option<MoRef>,
    pub progress: Option<u32>,
}

/// Read a Task's `info` value.
pub fn parse_task_info(v: &Node) -> Result<TaskInfo> {
    let state = match v.child_text("state") {
        Some("queued") => TaskState::Queued,
        Some("running") => TaskState::Running,
        Some("success") => TaskState::Success,
        Some("error") => TaskState::Error,
        other => return Err(Error::new(format!("task info with unknown state {:?}", one_line(other.unwrap_or(""))))),
    };
    let error = v.child("error").map(|e| {
        let kind = e.child("fault").and_then(|f| f.xsi_type.clone()).unwrap_or_else(|| "fault".to_string());
        (one_line(&kind), one_line(e.child_text("localizedMessage").unwrap_or("")))
    });
    let name = v
        .child_text("name")
        .filter(|s| !s.is_empty())
        .or_else(|| v.child_text("descriptionId"))
        .unwrap_or("")
        .to_string();
    Ok(TaskInfo {
        state,
        name: one_line(&name),
        error,
        result: v.child("result").and_then(MoRef::from_node),
        progress: v.child_text("progress").and_then(|p| p.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::super::soap::{parse_reply, Reply};
    use super::*;

    fn body(xml: &str) -> Node {
        match parse_reply(xml.as_bytes()).unwrap() {
            Reply::Ok(n) => n,
            Reply::Fault(f) => panic!("{f:?}"),
        }
    }

    const ENV_HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>"#;
    const ENV_TAIL: &str = "</soapenv:Body></soapenv:Envelope>";

    fn vm_fixture() -> String {
        format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval>
<objects><obj type="VirtualMachine">42</obj>
<propSet><name>config.files</name><val xsi:type="VirtualMachineFileInfo"><vmPathName>[datastore1] web01/web01.vmx</vmPathName><snapshotDirectory>[datastore1] web01/</snapshotDirectory><suspendDirectory>[datastore1] web01/</suspendDirectory><logDirectory>[datastore1] web01/</logDirectory></val></propSet>
<propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice">
 <VirtualDevice xsi:type="VirtualIDEController"><key>200</key><deviceInfo><label>IDE 0</label><summary>IDE 0</summary></deviceInfo><busNumber>0</busNumber></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>16,777,216 KB</summary></deviceInfo>
  <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] web01/web01-000002.vmdk</fileName><datastore type="Datastore">5f1c-ds1</datastore><backingObjectId></backingObjectId><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned><uuid>6000C29a</uuid><changeId>52 aa/7</changeId>
   <parent xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] web01/web01-000001.vmdk</fileName><datastore type="Datastore">5f1c-ds1</datastore><diskMode>persistent</diskMode>
    <parent xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] web01/web01.vmdk</fileName><datastore type="Datastore">5f1c-ds1</datastore><diskMode>persistent</diskMode><changeId>52 aa/3</changeId></parent>
   </parent>
  </backing><controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>16777216</capacityInKB><capacityInBytes>17179869184</capacityInBytes></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label></deviceInfo>
  <backing xsi:type="VirtualDiskSeSparseBackingInfo"><fileName>[fast &amp; big] web01/data.vmdk</fileName><datastore type="Datastore">5f1c-ds2</datastore></backing><capacityInKB>1024</capacityInKB></VirtualDevice>
</val></propSet>
<propSet><name>datastore</name><val xsi:type="ArrayOfManagedObjectReference"><ManagedObjectReference type="Datastore">5f1c-ds1</ManagedObjectReference><ManagedObjectReference type="Datastore">5f1c-ds2</ManagedObjectReference></val></propSet>
<propSet><name>layoutEx.file</name><val xsi:type="ArrayOfVirtualMachineFileLayoutExFileInfo">
 <VirtualMachineFileLayoutExFileInfo><key>0</key><name>[datastore1] web01/web01.vmx</name><type>config</type><size>2954</size><uniqueSize>2954</uniqueSize><accessible>true</accessible></VirtualMachineFileLayoutExFileInfo>
 <VirtualMachineFileLayoutExFileInfo><key>4</key><name>[datastore1] web01/web01-flat.vmdk</name><type>diskExtent</type><size>17179869184</size></VirtualMachineFileLayoutExFileInfo>
 <VirtualMachineFileLayoutExFileInfo><key>5</key><type>broken-no-name</type></VirtualMachineFileLayoutExFileInfo>
</val></propSet>
<propSet><name>layoutEx.disk</name><val xsi:type="ArrayOfVirtualMachineFileLayoutExDiskLayout">
 <VirtualMachineFileLayoutExDiskLayout><key>2000</key><chain><fileKey>3</fileKey><fileKey>4</fileKey></chain><chain><fileKey>6</fileKey><fileKey>7</fileKey></chain></VirtualMachineFileLayoutExDiskLayout>
 <VirtualMachineFileLayoutExDiskLayout><chain><fileKey>9</fileKey></chain></VirtualMachineFileLayoutExDiskLayout>
</val></propSet>
<propSet><name>layoutEx.snapshot</name><val xsi:type="ArrayOfVirtualMachineFileLayoutExSnapshotLayout">
 <VirtualMachineFileLayoutExSnapshotLayout><key type="VirtualMachineSnapshot">42-snapshot-1</key><dataKey>8</dataKey><memoryKey>-1</memoryKey><disk><key>2000</key><chain><fileKey>3</fileKey><fileKey>4</fileKey></chain></disk></VirtualMachineFileLayoutExSnapshotLayout>
 <VirtualMachineFileLayoutExSnapshotLayout><key type="VirtualMachineSnapshot">42-snapshot-2</key><dataKey>10</dataKey><memoryKey>11</memoryKey></VirtualMachineFileLayoutExSnapshotLayout>
 <VirtualMachineFileLayoutExSnapshotLayout><dataKey>12</dataKey></VirtualMachineFileLayoutExSnapshotLayout>
</val></propSet>
<propSet><name>name</name><val xsi:type="xsd:string">web01</val></propSet>
<propSet><name>runtime.powerState</name><val xsi:type="VirtualMachinePowerState">poweredOn</val></propSet>
<propSet><name>snapshot</name><val xsi:type="VirtualMachineSnapshotInfo"><currentSnapshot type="VirtualMachineSnapshot">42-snapshot-2</currentSnapshot>
 <rootSnapshotList><snapshot type="VirtualMachineSnapshot">42-snapshot-1</snapshot><vm type="VirtualMachine">42</vm><name>before upgrade</name><description></description><id>1</id><createTime>2024-03-01T10:00:00.123456Z</createTime><state>poweredOn</state><quiesced>false</quiesced>
  <childSnapshotList><snapshot type="VirtualMachineSnapshot">42-snapshot-2</snapshot><vm type="VirtualMachine">42</vm><name>BEXI-web-20240302030000</name><description>affa</description><id>2</id><createTime>2024-03-02T03:00:00+01:00</createTime><state>poweredOn</state><quiesced>true</quiesced></childSnapshotList>
 </rootSnapshotList></val></propSet>
</objects></returnval></RetrievePropertiesExResponse>{ENV_TAIL}"#
        )
    }

    #[test]
    fn vm_properties_with_parent_chain_and_snapshots() {
        let b = body(&vm_fixture());
        let (objs, token) = parse_retrieve_result(b).unwrap();
        assert_eq!(token, None);
        assert_eq!(objs.len(), 1);
        let o = &objs[0];
        assert_eq!(o.obj, MoRef::new("VirtualMachine", "42"));
        assert_eq!(o.prop_text("name"), Some("web01"));
        assert_eq!(PowerState::parse(o.prop_text("runtime.powerState").unwrap()), PowerState::PoweredOn);

        let files = parse_vm_files(o.prop("config.files").unwrap());
        assert_eq!(files.vm_path_name, "[datastore1] web01/web01.vmx");
        assert_eq!(files.log_directory.as_deref(), Some("[datastore1] web01/"));

        let disks = parse_disks(o.prop("config.hardware.device").unwrap()).unwrap();
        assert_eq!(disks.len(), 2);
        let d = &disks[0];
        assert_eq!((d.key, d.label.as_str(), d.capacity_bytes), (2000, "Hard disk 1", 17179869184));
        assert_eq!(d.chain.len(), 3);
        assert_eq!(d.current().file_name, "[datastore1] web01/web01-000002.vmdk");
        assert_eq!(d.current().change_id.as_deref(), Some("52 aa/7"));
        assert_eq!(d.base().file_name, "[datastore1] web01/web01.vmdk");
        assert_eq!(d.base().change_id.as_deref(), Some("52 aa/3"));
        assert_eq!(d.base().datastore, Some(MoRef::new("Datastore", "5f1c-ds1")));
        assert!(d.has_parent());
        let d2 = &disks[1];
        assert_eq!(d2.capacity_bytes, 1024 * 1024);
        assert_eq!(d2.base().file_name, "[fast & big] web01/data.vmdk");
        assert_eq!(d2.current().kind, "VirtualDiskSeSparseBackingInfo");
        assert!(!d2.has_parent());

        let (cur, roots) = parse_snapshot_info(o.prop("snapshot").unwrap()).unwrap();
        assert_eq!(cur, Some(MoRef::new("VirtualMachineSnapshot", "42-snapshot-2")));
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].name, "before upgrade");
        assert_eq!(roots[0].children.len(), 1);
        let c = &roots[0].children[0];
        assert_eq!(c.name, "BEXI-web-20240302030000");
        assert!(c.quiesced);
        assert_eq!(c.created.unwrap().to_rfc3339(), "2024-03-02T02:00:00+00:00");
        assert!(roots[0].created.is_some());

        let lf = parse_layout_files(o.prop("layoutEx.file").unwrap());
        assert_eq!(lf.len(), 2);
        assert_eq!(lf[1].kind, "diskExtent");
        assert_eq!(lf[1].size, 17179869184);

        let ds = parse_moref_array(o.prop("datastore").unwrap());
        assert_eq!(ds.len(), 2);

        let ld = parse_layout_disks(o.prop("layoutEx.disk").unwrap());
        assert_eq!(ld, vec![LayoutDisk { key: 2000, chain: vec![vec![3, 4], vec![6, 7]] }]);
        let ls = parse_layout_snapshots(o.prop("layoutEx.snapshot").unwrap());
        assert_eq!(ls.len(), 2);
        assert_eq!(ls[0].snapshot, MoRef::new("VirtualMachineSnapshot", "42-snapshot-1"));
        assert_eq!((ls[0].data_key, ls[0].memory_key), (8, None));
        assert_eq!(ls[0].disks, vec![LayoutDisk { key: 2000, chain: vec![vec![3, 4]] }]);
        assert_eq!((ls[1].data_key, ls[1].memory_key), (10, Some(11)));

        let layout = VmLayout {
            moref: o.obj.clone(),
            name: "web01".into(),
            files,
            power_state: PowerState::PoweredOn,
            disks,
            current_snapshot: cur,
            snapshots: roots,
            layout_files: lf,
            layout_disks: ld,
            layout_snapshots: ls,
            datastores: vec![
                Datastore {
                    name: "datastore1".into(),
                    moref: ds[0].clone(),
                    url: "ds:///vmfs/volumes/5f1c-ds1/".into(),
                    host_path: url_to_host_path("ds:///vmfs/volumes/5f1c-ds1/").unwrap(),
                },
                Datastore {
                    name: "fast & big".into(),
                    moref: ds[1].clone(),
                    url: "ds:///vmfs/volumes/5f1c-ds2".into(),
                    host_path: url_to_host_path("ds:///vmfs/volumes/5f1c-ds2").unwrap(),
                },
            ],
        };
        assert_eq!(layout.all_snapshots().len(), 2);
        assert_eq!(layout.snapshots_named_like("BEXI-").len(), 1);
        assert_eq!(
            layout.host_path(layout.disks[0].base().file_name.as_str()).unwrap(),
            "/vmfs/volumes/5f1c-ds1/web01/web01.vmdk"
        );
        assert_eq!(layout.host_path("[fast & big] web01/data.vmdk").unwrap(), "/vmfs/volumes/5f1c-ds2/web01/data.vmdk");
        assert!(layout.host_path("[nope] x.vmdk").unwrap_err().message().contains("datastore1"));
        assert!(layout.host_path("[datastore1] ../../etc/passwd").is_err());
        assert!(layout.host_path("datastore1 x").is_err());
    }

    /// Run every parser on whatever a (mutated) document yields; must never panic.
    fn parse_everything(xml: &[u8]) {
        let Ok(Reply::Ok(b)) = parse_reply(xml) else {
            return;
        };
        let Ok((objs, _)) = parse_retrieve_result(b) else {
            return;
        };
        for o in &objs {
            for (_, v) in &o.props {
                let _ = parse_disks(v).map(|ds| {
                    ds.iter().for_each(|d| {
                        let _ = (d.current(), d.base());
                    })
                });
                let _ = parse_snapshot_info(v);
                let _ = parse_layout_files(v);
                let _ = parse_layout_disks(v);
                let _ = parse_layout_snapshots(v);
                let _ = parse_vm_files(v);
                let _ = parse_moref_array(v);
                let _ = parse_task_info(v);
                let _ = ServiceContent::from_node(v);
                let _ = host_path(&[], v.text());
                let _ = url_to_host_path(v.text());
                let _ = decode_entity_name(v.text());
            }
        }
    }

    #[test]
    fn mutated_documents_never_panic() {
        let fx = vm_fixture().into_bytes();
        // Every truncation.
        for cut in 0..fx.len() {
            parse_everything(&fx[..cut]);
        }
        // Pseudo-random byte changes (deterministic LCG).
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        let alphabet = b"<>/&;\"'=: x0]%[\xff\xc3";
        for _ in 0..3000 {
            let mut m = fx.clone();
            for _ in 0..(1 + next() % 4) {
                let i = next() % m.len();
                match next() % 3 {
                    0 => m[i] = alphabet[next() % alphabet.len()],
                    1 => {
                        m.remove(i);
                    }
                    _ => {
                        let j = (i + next() % 200).min(m.len());
                        let chunk: Vec<u8> = m[i..j].to_vec();
                        m.splice(i..i, chunk);
                    }
                }
            }
            parse_everything(&m);
        }
    }

    #[test]
    fn ds_paths() {
        assert_eq!(split_ds_path("[ds1] a/b.vmx").unwrap(), ("ds1", "a/b.vmx"));
        assert_eq!(split_ds_path("[ds 1]a.vmx").unwrap(), ("ds 1", "a.vmx"));
        assert!(split_ds_path("[] a").is_err());
        assert!(split_ds_path("[ds a").is_err());
        assert_eq!(url_to_host_path("ds:///vmfs/volumes/abc/").unwrap(), "/vmfs/volumes/abc/");
        assert_eq!(url_to_host_path("/tmp/x").unwrap(), "/tmp/x/");
        assert!(url_to_host_path("ds://relative").is_err());
        assert!(url_to_host_path("ds:///vmfs/../etc").is_err());
    }

    #[test]
    fn tasks() {
        let running = format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">haTask-42-vim.VirtualMachine.createSnapshot-1</obj><propSet><name>info</name><val xsi:type="TaskInfo"><key>haTask-42-vim.VirtualMachine.createSnapshot-1</key><task type="Task">haTask-42-vim.VirtualMachine.createSnapshot-1</task><name>vim.VirtualMachine.createSnapshot</name><descriptionId>VirtualMachine.createSnapshot</descriptionId><entity type="VirtualMachine">42</entity><entityName>web01</entityName><state>running</state><cancelled>false</cancelled><cancelable>false</cancelable><progress>37</progress></val></propSet></objects></returnval></RetrievePropertiesExResponse>{ENV_TAIL}"#
        );
        let (o, _) = parse_retrieve_result(body(&running)).unwrap();
        let t = parse_task_info(o[0].prop("info").unwrap()).unwrap();
        assert_eq!(t.state, TaskState::Running);
        assert_eq!(t.progress, Some(37));
        assert_eq!(t.result, None);

        let ok = format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">t1</obj><propSet><name>info</name><val xsi:type="TaskInfo"><state>success</state><result xsi:type="ManagedObjectReference" type="VirtualMachineSnapshot">42-snapshot-3</result></val></propSet></objects></returnval></RetrievePropertiesExResponse>{ENV_TAIL}"#
        );
        let (o, _) = parse_retrieve_result(body(&ok)).unwrap();
        let t = parse_task_info(o[0].prop("info").unwrap()).unwrap();
        assert_eq!(t.state, TaskState::Success);
        assert_eq!(t.result, Some(MoRef::new("VirtualMachineSnapshot", "42-snapshot-3")));

        let err = format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">t1</obj><propSet><name>info</name><val xsi:type="TaskInfo"><descriptionId>VirtualMachine.createSnapshot</descriptionId><state>error</state><error><fault xsi:type="FileLocked"><file>x</file></fault><localizedMessage>Unable to access file
 since it is locked</localizedMessage></error></val></propSet></objects></returnval></RetrievePropertiesExResponse>{ENV_TAIL}"#
        );
        let (o, _) = parse_retrieve_result(body(&err)).unwrap();
        let t = parse_task_info(o[0].prop("info").unwrap()).unwrap();
        assert_eq!(t.state, TaskState::Error);
        assert_eq!(t.name, "VirtualMachine.createSnapshot");
        assert_eq!(t.error, Some(("FileLocked".to_string(), "Unable to access file since it is locked".to_string())));

        let bad = format!(
            r#"{ENV_HEAD}<X><returnval><objects><obj type="Task">t1</obj><propSet><name>info</name><val><state>weird</state></val></propSet></objects></returnval></X>{ENV_TAIL}"#
        );
        let (o, _) = parse_retrieve_result(body(&bad)).unwrap();
        assert!(parse_task_info(o[0].prop("info").unwrap()).is_err());
    }

    #[test]
    fn retrieve_result_token_and_empty() {
        let xml = format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>tok-1</token><objects><obj type="VirtualMachine">1</obj><propSet><name>name</name><val xsi:type="xsd:string">a%2fb</val></propSet></objects></returnval></RetrievePropertiesExResponse>{ENV_TAIL}"#
        );
        let (o, t) = parse_retrieve_result(body(&xml)).unwrap();
        assert_eq!(t.as_deref(), Some("tok-1"));
        assert_eq!(decode_entity_name(o[0].prop_text("name").unwrap()), "a/b");
        let empty = format!(
            r#"{ENV_HEAD}<RetrievePropertiesExResponse xmlns="urn:vim25"></RetrievePropertiesExResponse>{ENV_TAIL}"#
        );
        let (o, t) = parse_retrieve_result(body(&empty)).unwrap();
        assert!(o.is_empty() && t.is_none());
        let noref = format!(r#"{ENV_HEAD}<R><returnval><objects><obj>1</obj></objects></returnval></R>{ENV_TAIL}"#);
        assert!(parse_retrieve_result(body(&noref)).is_err());
    }

    #[test]
    fn entity_names() {
        assert_eq!(decode_entity_name("100%25 a%2Fb%5cc %zz %"), "100% a/b\\c %zz %");
        assert_eq!(decode_entity_name("é%2f"), "é/");
    }

    #[test]
    fn disk_without_file_is_an_error() {
        let xml = format!(
            r#"{ENV_HEAD}<R><v><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo><backing xsi:type="VirtualDiskRawDiskVer2BackingInfo"><descriptorFileName></descriptorFileName></backing></VirtualDevice></v></R>{ENV_TAIL}"#
        );
        let b = body(&xml);
        let e = parse_disks(b.child("v").unwrap()).unwrap_err();
        assert!(e.message().contains("Hard disk 1"), "{e}");
    }
}
