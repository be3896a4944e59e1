//! A VM's own snapshots and disk chains, as affa's snapshot freezes them: which files make up the
//! frozen VM (every link of each disk's chain below affa's delta, with its extents, and the
//! `.vmsn` / `.vmem` and disk links of each snapshot of the VM's own), and the check that the
//! snapshot tree did not change while affa's snapshot existed.
//!
//! Owns: the list of frozen files and the comparison of snapshot trees. Must never: name a file
//! the running VM writes (a disk's current backing and its extents), trust a file name the host
//! sends without the datastore-path checks of `model.rs`, or talk to the network.

use std::collections::BTreeSet;

use super::model::{split_ds_path, LayoutDisk, SnapshotTree, VmLayout};
use super::soap::one_line;
use crate::error::{Error, Result};

/// One link of a disk's chain: its descriptor and its extents (datastore paths `[ds] dir/file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub descriptor: String,
    pub extents: Vec<String>,
}

/// A snapshot of the VM's own (not affa's), with its parent and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSnapshot {
    pub tree: SnapshotTree,
    pub parent: Option<SnapshotTree>,
    /// The `.vmsn` and, for a memory snapshot, the `.vmem` (datastore paths), when layoutEx says.
    pub data: Option<String>,
    pub memory: Option<String>,
}

/// What affa copies while its snapshot exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// Per disk of the layout (same order): the chain below affa's delta, base first. Its last
    /// link is what the VM runs on again once affa's snapshot is removed (what the `.vmx` names).
    pub chains: Vec<Vec<Link>>,
    /// The VM's own snapshots, depth first.
    pub own: Vec<OwnSnapshot>,
    /// Files of those snapshots not in `chains`: `.vmsn`, `.vmem`, and disk links of other
    /// branches of the snapshot tree.
    pub snapshot_files: Vec<String>,
}

impl Frozen {
    /// Every file to copy (datastore paths), each once.
    pub fn files(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let links = self.chains.iter().flatten();
        for f in links.flat_map(|l| std::iter::once(&l.descriptor).chain(&l.extents)).chain(&self.snapshot_files) {
            if seen.insert(f.clone()) {
                out.push(f.clone());
            }
        }
        out
    }
}

/// Every snapshot with its parent, depth first.
fn walk<'a>(
    nodes: &'a [SnapshotTree],
    parent: Option<&'a SnapshotTree>,
    out: &mut Vec<(&'a SnapshotTree, Option<&'a SnapshotTree>)>,
) {
    for n in nodes {
        out.push((n, parent));
        // Depth is bounded by the XML parser's nesting limit.
        walk(&n.children, Some(n), out);
    }
}

/// The snapshots of the VM's own: every snapshot but the one named `ours`.
pub fn own_snapshots(layout: &VmLayout, ours: Option<&str>) -> Vec<OwnSnapshot> {
    let mut all = Vec::new();
    walk(&layout.snapshots, None, &mut all);
    all.into_iter()
        .filter(|(s, _)| Some(s.name.as_str()) != ours)
        .map(|(s, p)| {
            let files = layout.layout_snapshots.iter().find(|l| l.snapshot == s.snapshot);
            let name = |k: i32| layout.layout_file(k).map(|f| f.name.clone());
            OwnSnapshot {
                tree: s.clone(),
                parent: p.cloned(),
                data: files.and_then(|f| name(f.data_key)),
                memory: files.and_then(|f| f.memory_key.and_then(name)),
            }
        })
        .collect()
}

/// `'name' (created 2026-05-01 10:00, 3 days old), ...` for the warning, the report and the log;
/// `now` is the local time of the run.
pub fn describe(own: &[OwnSnapshot], now: chrono::NaiveDateTime) -> String {
    own.iter()
        .map(|s| {
            let name = one_line(&s.tree.name);
            match s.tree.created {
                Some(c) => {
                    let local = c.with_timezone(&chrono::Local).naive_local();
                    let age = now - local;
                    let old = if age.num_days() >= 1 {
                        format!(", {} days old", age.num_days())
                    } else if age.num_hours() >= 1 {
                        format!(", {} hours old", age.num_hours())
                    } else if age.num_seconds() >= 0 {
                        ", less than an hour old".to_string()
                    } else {
                        String::new()
                    };
                    format!("'{name}' (created {}{old})", local.format("%Y-%m-%d %H:%M"))
                }
                None => format!("'{name}'"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What must stay as it was while affa's snapshot exists: the VM's own snapshots (reference,
/// name, parent), the snapshot it runs on, and each disk's chain below affa's delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeState {
    snaps: Vec<(String, String, Option<String>)>,
    current: Option<String>,
    chains: Vec<(i32, Vec<String>)>,
}

/// The tree state of `layout`, leaving out affa's snapshot `ours` (and its delta, while the VM
/// runs on it).
pub fn tree_state(layout: &VmLayout, ours: Option<&str>) -> TreeState {
    let mut all = Vec::new();
    walk(&layout.snapshots, None, &mut all);
    let ours_node = all.iter().find(|(s, _)| Some(s.name.as_str()) == ours).copied();
    let on_ours = matches!((ours_node, &layout.current_snapshot), (Some((o, _)), Some(c)) if &o.snapshot == c);
    let snaps = all
        .iter()
        .filter(|(s, _)| Some(s.name.as_str()) != ours)
        .map(|(s, p)| (s.snapshot.value.clone(), s.name.clone(), p.map(|p| p.snapshot.value.clone())))
        .collect();
    let current = match (on_ours, ours_node) {
        (true, Some((_, parent))) => parent.map(|p| p.snapshot.value.clone()),
        _ => layout.current_snapshot.as_ref().map(|c| c.value.clone()),
    };
    let chains = layout
        .disks
        .iter()
        .map(|d| {
            let skip = usize::from(on_ours && d.has_parent());
            (d.key, d.chain.iter().skip(skip).map(|b| b.file_name.clone()).collect())
        })
        .collect();
    TreeState { snaps, current, chains }
}

/// An error unless `layout` (with affa's snapshot `ours`, if it exists) shows the same tree
/// state as `before`; `when` says at which step, e.g. "during the copy".
pub fn check_unchanged(before: &TreeState, layout: &VmLayout, ours: Option<&str>, when: &str) -> Result<()> {
    let now = tree_state(layout, ours);
    if &now == before {
        return Ok(());
    }
    let names = |a: &TreeState, b: &TreeState| -> Vec<String> {
        a.snaps
            .iter()
            .filter(|s| !b.snaps.iter().any(|t| t.0 == s.0))
            .map(|s| format!("'{}'", one_line(&s.1)))
            .collect()
    };
    let (taken, deleted) = (names(&now, before), names(before, &now));
    let mut what = Vec::new();
    if !taken.is_empty() {
        what.push(format!("snapshot {} taken", taken.join(", ")));
    }
    if !deleted.is_empty() {
        what.push(format!("snapshot {} deleted", deleted.join(", ")));
    }
    if what.is_empty() && now.snaps != before.snaps {
        what.push("snapshots renamed or moved".to_string());
    }
    if what.is_empty() && now.current != before.current {
        what.push("the VM runs on another snapshot".to_string());
    }
    if what.is_empty() {
        what.push("the disk chains changed".to_string());
    }
    Err(Error::new(format!(
        "the VM's snapshot tree changed {when} ({}): an archive of it would not match the VM, so nothing was archived; the next run backs up the new state",
        what.join("; ")
    )))
}

/// The extent of a base disk: `X-flat.vmdk` beside the descriptor `X.vmdk`, or what layoutEx
/// lists as the descriptor's extent.
pub fn extent_of(layout: &VmLayout, descriptor: &str) -> String {
    let stem = descriptor.strip_suffix(".vmdk").unwrap_or(descriptor);
    let flat = format!("{stem}-flat.vmdk");
    if layout.layout_files.iter().any(|f| f.name == flat) || layout.layout_files.is_empty() {
        return flat;
    }
    layout
        .layout_files
        .iter()
        .find(|f| {
            f.kind == "diskExtent"
                && f.name.starts_with(stem)
                && f.name != descriptor
                && !f.name.contains("-delta")
                && !f.name.contains("-sesparse")
        })
        .map(|f| f.name.clone())
        .unwrap_or(flat)
}

/// The extent of a delta: `X-delta.vmdk` (VMFSSPARSE) or `X-sesparse.vmdk` (SESPARSE) beside the
/// descriptor `X.vmdk`, whichever layoutEx lists (`-delta` when it lists neither).
fn delta_extent_of(layout: &VmLayout, descriptor: &str) -> String {
    let stem = descriptor.strip_suffix(".vmdk").unwrap_or(descriptor);
    let sesparse = format!("{stem}-sesparse.vmdk");
    if layout.layout_files.iter().any(|f| f.name == sesparse) {
        return sesparse;
    }
    format!("{stem}-delta.vmdk")
}

/// The files of the link whose descriptor is `descriptor`: from the layoutEx unit that lists it,
/// else the extent beside it.
fn link(layout: &VmLayout, ld: Option<&LayoutDisk>, descriptor: &str, base: bool) -> Link {
    for unit in ld.map(|l| l.chain.as_slice()).unwrap_or_default() {
        let names: Vec<&str> = unit.iter().filter_map(|k| layout.layout_file(*k)).map(|f| f.name.as_str()).collect();
        if names.contains(&descriptor) {
            let extents: Vec<String> = names.iter().filter(|n| **n != descriptor).map(|n| n.to_string()).collect();
            if !extents.is_empty() {
                return Link { descriptor: descriptor.to_string(), extents };
            }
        }
    }
    let extent = if base { extent_of(layout, descriptor) } else { delta_extent_of(layout, descriptor) };
    Link { descriptor: descriptor.to_string(), extents: vec![extent] }
}

/// A file name must name a file: `[ds] dir/name` with a name.
fn check_file(p: &str) -> Result<()> {
    let (_, rel) = split_ds_path(p)?;
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::new(format!("refusing datastore path {:?}: it names no file", one_line(p))));
    }
    Ok(())
}

/// The files of the VM as affa's snapshot `ours` froze it. `layout` is read after the snapshot
/// was taken; the caller has checked that the VM runs on `ours` and that every disk has a delta.
pub fn frozen(layout: &VmLayout, ours: &str) -> Result<Frozen> {
    let mut chains = Vec::new();
    let mut running: BTreeSet<String> = BTreeSet::new();
    for d in &layout.disks {
        let ld = layout.layout_disks.iter().find(|l| l.key == d.key);
        let cur = link(layout, ld, &d.current().file_name, false);
        running.insert(cur.descriptor);
        running.extend(cur.extents);
        let below = &d.chain[1.min(d.chain.len())..];
        chains.push(
            below.iter().rev().enumerate().map(|(i, b)| link(layout, ld, &b.file_name, i == 0)).collect::<Vec<_>>(),
        );
    }
    let own = own_snapshots(layout, Some(ours));
    let in_chains: BTreeSet<&String> =
        chains.iter().flatten().flat_map(|l: &Link| std::iter::once(&l.descriptor).chain(&l.extents)).collect();
    let mut snapshot_files = Vec::new();
    for s in &own {
        let mut names: Vec<String> = s.data.iter().chain(&s.memory).cloned().collect();
        if let Some(ls) = layout.layout_snapshots.iter().find(|l| l.snapshot == s.tree.snapshot) {
            for k in ls.disks.iter().flat_map(|d| d.chain.iter().flatten()) {
                if let Some(f) = layout.layout_file(*k) {
                    names.push(f.name.clone());
                }
            }
        }
        for n in names {
            if !in_chains.contains(&n) && !snapshot_files.contains(&n) {
                snapshot_files.push(n);
            }
        }
    }
    let f = Frozen { chains, own, snapshot_files };
    for p in f.files() {
        check_file(&p)?;
        if running.contains(&p) {
            return Err(Error::new(format!(
                "refusing to copy {}: the VM writes to it (the host's layout names it both as frozen and as the running disk)",
                one_line(&p)
            )));
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::super::model::{Datastore, Disk, DiskBacking, LayoutFile, LayoutSnapshot, MoRef, PowerState, VmFiles};
    use super::*;

    fn snap(id: i64, name: &str, children: Vec<SnapshotTree>) -> SnapshotTree {
        SnapshotTree {
            name: name.into(),
            description: String::new(),
            snapshot: MoRef::new("VirtualMachineSnapshot", format!("s-{id}")),
            id: Some(id),
            create_time: "2026-05-01T10:00:00Z".into(),
            created: chrono::DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z")
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc)),
            quiesced: false,
            children,
        }
    }

    fn backing(f: &str) -> DiskBacking {
        DiskBacking {
            file_name: format!("[ds1] vm/{f}"),
            datastore: None,
            kind: String::new(),
            change_id: None,
            uuid: None,
        }
    }

    /// vm with its own snapshot "before upgrade" (delta vm-000001), and, with `ours`, affa's
    /// snapshot on top (delta vm-000002, the running one).
    fn layout(ours: bool) -> VmLayout {
        let names = [
            "vm.vmdk",
            "vm-flat.vmdk",
            "vm-000001.vmdk",
            "vm-000001-delta.vmdk",
            "vm-000002.vmdk",
            "vm-000002-delta.vmdk",
            "vm-Snapshot1.vmsn",
            "vm-Snapshot2.vmsn",
        ];
        let layout_files = names
            .iter()
            .enumerate()
            .map(|(i, n)| LayoutFile { key: i as i32, name: format!("[ds1] vm/{n}"), kind: String::new(), size: 0 })
            .collect();
        let mut chain = vec![backing("vm-000001.vmdk"), backing("vm.vmdk")];
        let mut units = vec![vec![0, 1], vec![2, 3]];
        let mut tree = snap(1, "before upgrade", vec![]);
        let mut current = tree.snapshot.clone();
        let mut layout_snapshots = vec![LayoutSnapshot {
            snapshot: tree.snapshot.clone(),
            data_key: 6,
            memory_key: None,
            disks: vec![LayoutDisk { key: 2000, chain: vec![vec![0, 1]] }],
        }];
        if ours {
            chain.insert(0, backing("vm-000002.vmdk"));
            units.push(vec![4, 5]);
            let o = snap(2, "BEXI-j-1", vec![]);
            current = o.snapshot.clone();
            layout_snapshots.push(LayoutSnapshot {
                snapshot: o.snapshot.clone(),
                data_key: 7,
                memory_key: None,
                disks: vec![LayoutDisk { key: 2000, chain: vec![vec![0, 1], vec![2, 3]] }],
            });
            tree.children.push(o);
        }
        VmLayout {
            moref: MoRef::new("VirtualMachine", "1"),
            name: "vm".into(),
            files: VmFiles { vm_path_name: "[ds1] vm/vm.vmx".into(), ..Default::default() },
            power_state: PowerState::PoweredOn,
            disks: vec![Disk { key: 2000, label: "Hard disk 1".into(), capacity_bytes: 1 << 20, chain }],
            current_snapshot: Some(current),
            snapshots: vec![tree],
            layout_files,
            layout_disks: vec![LayoutDisk { key: 2000, chain: units }],
            layout_snapshots,
            datastores: vec![Datastore {
                name: "ds1".into(),
                moref: MoRef::new("Datastore", "d1"),
                url: "/ds1/".into(),
                host_path: "/ds1/".into(),
            }],
        }
    }

    #[test]
    fn the_frozen_chain_is_every_link_below_ours_and_the_own_snapshots_files() {
        let l = layout(true);
        let f = frozen(&l, "BEXI-j-1").unwrap();
        let p = |n: &str| format!("[ds1] vm/{n}");
        assert_eq!(
            f.files(),
            ["vm.vmdk", "vm-flat.vmdk", "vm-000001.vmdk", "vm-000001-delta.vmdk", "vm-Snapshot1.vmsn"].map(p)
        );
        assert_eq!(f.chains[0].last().unwrap().descriptor, p("vm-000001.vmdk"));
        assert_eq!(f.own.len(), 1);
        assert_eq!(f.own[0].data.as_deref(), Some(p("vm-Snapshot1.vmsn").as_str()));
        // Without layoutEx.disk the extents are guessed beside their descriptors.
        let mut bare = l.clone();
        bare.layout_disks.clear();
        assert_eq!(frozen(&bare, "BEXI-j-1").unwrap().files(), f.files());
        // A host that names the running delta among a snapshot's files is refused.
        let mut hostile = l.clone();
        hostile.layout_snapshots[0].disks[0].chain.push(vec![4, 5]);
        let e = frozen(&hostile, "BEXI-j-1").unwrap_err().to_string();
        assert!(e.contains("refusing to copy [ds1] vm/vm-000002.vmdk: the VM writes to it"), "{e}");
        hostile.layout_files[6].name = "[ds1] vm/".into();
        assert!(frozen(&hostile, "BEXI-j-1").unwrap_err().to_string().contains("names no file"));
    }

    #[test]
    fn tree_changes_are_named() {
        let before = tree_state(&layout(false), None);
        assert_eq!(tree_state(&layout(true), Some("BEXI-j-1")), before);
        check_unchanged(&before, &layout(true), Some("BEXI-j-1"), "now").unwrap();
        // Someone took a snapshot after ours.
        let mut l = layout(true);
        l.snapshots[0].children[0].children.push(snap(3, "intruder", vec![]));
        l.current_snapshot = Some(MoRef::new("VirtualMachineSnapshot", "s-3"));
        l.disks[0].chain.insert(0, backing("vm-000003.vmdk"));
        let e = check_unchanged(&before, &l, Some("BEXI-j-1"), "during the copy").unwrap_err().to_string();
        assert!(e.contains("changed during the copy (snapshot 'intruder' taken)"), "{e}");
        // Someone deleted the VM's own snapshot (its delta merged away).
        let mut l = layout(true);
        let ours = l.snapshots[0].children.remove(0);
        l.snapshots = vec![ours];
        l.disks[0].chain.remove(1);
        let e = check_unchanged(&before, &l, Some("BEXI-j-1"), "now").unwrap_err().to_string();
        assert!(e.contains("snapshot 'before upgrade' deleted"), "{e}");
    }

    #[test]
    fn ages_in_the_warning() {
        let own = own_snapshots(&layout(true), Some("BEXI-j-1"));
        let created = own[0].tree.created.unwrap().with_timezone(&chrono::Local).naive_local();
        let d = describe(&own, created + chrono::Duration::days(3) + chrono::Duration::hours(2));
        assert_eq!(d, format!("'before upgrade' (created {}, 3 days old)", created.format("%Y-%m-%d %H:%M")));
        assert!(describe(&own, created + chrono::Duration::hours(5)).ends_with(", 5 hours old)"));
        assert!(
            describe(&own, created - chrono::Duration::hours(5)).ends_with(&format!("{})", created.format("%H:%M")))
        );
    }
}
