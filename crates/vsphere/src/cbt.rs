//! Changed Block Tracking (CBT) calls: whether a VM's host allows it and it is on, turning it
//! on, the disks a snapshot froze (with their `changeId`), and the changed areas of a frozen
//! disk since an earlier `changeId` (QueryChangedDiskAreas, paged and checked).
//!
//! Owns: the SOAP calls `ReconfigVM_Task(changeTrackingEnabled)` and `QueryChangedDiskAreas`,
//! reading `capability.changeTrackingSupported`, `config.changeTrackingEnabled` and a snapshot's
//! `config.hardware.device`, and every check on what the host answers about changed areas
//! (sorted, not overlapping, inside the capacity and the answer's window, progressing).
//! Must never: return an extent list that does not cover every answer the host gave for the
//! whole capacity (stopping after a first, partial answer loses changes), loop without a bound
//! on a host that does not progress, or decide whether a backup uses CBT (affa's `backup::vm`
//! does; this module only reports).
//!
//! Errors: a SOAP fault of the host (an unknown or reset `changeId` is a `FileFault` or
//! `InvalidArgument` on real hosts) is [`ErrorKind::Remote`] with the fault as its source
//! ([`crate::soap::fault_of`]); an answer that fails a check is [`ErrorKind::Remote`] without a
//! fault; not reaching the host at all is [`ErrorKind::Io`].

use super::client::Client;
use super::model::{decode_entity_name, parse_disks, MoRef};
use super::soap::{elem, moref_elem, Node};
use crate::error::{Error, ErrorKind, Result};

/// Most QueryChangedDiskAreas calls for one disk. A host answers a window of the disk per call
/// (real hosts: up to a few GiB per answer); a host that keeps answering tiny windows is cut off
/// here with an error instead of being asked forever.
pub const MAX_CBT_CALLS: usize = 1 << 20;
/// Most changed extents (after merging neighbours) kept for one disk (16 bytes each in memory).
pub const MAX_CBT_EXTENTS: usize = 8 << 20;

/// What the host says about a VM's Changed Block Tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CbtState {
    /// `capability.changeTrackingSupported`: the host (licence, hardware version) allows CBT.
    pub supported: bool,
    /// `config.changeTrackingEnabled`: CBT is switched on for the VM. Tracking itself starts at
    /// the next stun (snapshot create or remove, power on) after switching it on; until then the
    /// disks have no `changeId`.
    pub enabled: bool,
}

/// One virtual disk as a snapshot froze it (from the snapshot's `config.hardware.device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenDisk {
    /// The device key (`2000`, ...), the `deviceKey` of QueryChangedDiskAreas.
    pub device_key: i32,
    /// `backing.fileName` of the snapshot's disk, `[ds] dir/x.vmdk`.
    pub file: String,
    /// `backing.uuid`, if the host sent one.
    pub uuid: Option<String>,
    /// `capacityInBytes` (or `capacityInKB` * 1024 from hosts that send only that).
    pub capacity_bytes: u64,
    /// `backing.changeId` as frozen by the snapshot; `None` when tracking is off or has not
    /// started yet.
    pub change_id: Option<String>,
}

/// One answer of QueryChangedDiskAreas (DiskChangeInfo), unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChangeInfo {
    start: u64,
    length: u64,
    areas: Vec<(u64, u64)>,
}

fn parse_u64(n: &Node, what: &str) -> std::result::Result<u64, String> {
    let t = n.child_text(what).ok_or_else(|| format!("no {what}"))?;
    t.parse::<u64>().map_err(|_| format!("{what} {:?} is not a byte count", crate::untrusted::shown(t)))
}

/// Read a DiskChangeInfo (`returnval` of QueryChangedDiskAreas).
fn parse_change_info(rv: &Node) -> std::result::Result<ChangeInfo, String> {
    let start = parse_u64(rv, "startOffset")?;
    let length = parse_u64(rv, "length")?;
    let mut areas = Vec::new();
    for a in rv.children_named("changedArea") {
        let s = parse_u64(a, "start").map_err(|e| format!("changed area: {e}"))?;
        let l = parse_u64(a, "length").map_err(|e| format!("changed area at {s}: {e}"))?;
        areas.push((s, l));
    }
    Ok(ChangeInfo { start, length, areas })
}

/// Check one answer asked from `asked` of a disk of `capacity` bytes and add its extents to
/// `out` (merging with the previous one where they touch). Returns where the next call starts.
/// `prev_end` is the end of the last extent taken so far (extents must come in order).
fn take_answer(
    info: &ChangeInfo,
    asked: u64,
    capacity: u64,
    out: &mut Vec<(u64, u64)>,
) -> std::result::Result<u64, String> {
    if info.start != asked {
        return Err(format!("answer starts at byte {} although it was asked from byte {asked}", info.start));
    }
    if info.length == 0 {
        return Err(format!("answer from byte {asked} covers 0 bytes (no progress)"));
    }
    let end = info
        .start
        .checked_add(info.length)
        .ok_or_else(|| format!("answer window {}+{} overflows", info.start, info.length))?;
    let mut prev_end = out.last().map(|&(s, l)| s + l).unwrap_or(0);
    for &(s, l) in &info.areas {
        if l == 0 {
            continue; // says nothing
        }
        let e = s.checked_add(l).ok_or_else(|| format!("changed area {s}+{l} overflows"))?;
        if s < info.start || e > end {
            return Err(format!(
                "changed area {s}+{l} lies outside the answer's window {}+{}",
                info.start, info.length
            ));
        }
        if e > capacity {
            return Err(format!("changed area {s}+{l} ends beyond the capacity of {capacity} bytes"));
        }
        if s < prev_end {
            return Err(format!(
                "changed area {s}+{l} is out of order or overlaps the one before (which ends at {prev_end})"
            ));
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => {
                if out.len() >= MAX_CBT_EXTENTS {
                    return Err(format!("more than {MAX_CBT_EXTENTS} separate changed areas"));
                }
                out.push((s, l));
            }
        }
        prev_end = e;
    }
    Ok(end)
}

impl Client {
    /// Whether the VM's host allows CBT (`capability.changeTrackingSupported`) and whether it is
    /// on (`config.changeTrackingEnabled`). A property the host leaves out counts as false.
    pub fn cbt_state(&self, vm: &MoRef) -> Result<CbtState> {
        let o = self.object_props(vm, &["capability.changeTrackingSupported", "config.changeTrackingEnabled"])?;
        let yes = |p: &str| o.prop_text(p).is_some_and(|v| v == "true" || v == "1");
        Ok(CbtState {
            supported: yes("capability.changeTrackingSupported"),
            enabled: yes("config.changeTrackingEnabled"),
        })
    }

    /// Switch CBT on: ReconfigVM_Task with `changeTrackingEnabled=true`; waits for the task.
    /// Tracking starts at the VM's next stun (the next snapshot create or remove). A host that
    /// refuses (no licence for it, snapshots present) gives the task's fault as an error.
    pub fn enable_cbt(&self, vm: &MoRef) -> Result<()> {
        let inner = format!(
            "{}<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
            moref_elem("_this", &vm.kind, &vm.value)
        );
        let resp = self.call("ReconfigVM_Task", &inner)?;
        let task = resp.child("returnval").and_then(MoRef::from_node).ok_or_else(|| {
            Error::remote(format!("ESXi host {}: ReconfigVM_Task answered without a task", self.host()))
        })?;
        self.wait_for_task(&task, &format!("ReconfigVM_Task (enable CBT) on {}", vm.value), self.task_timeout())?;
        Ok(())
    }

    /// The virtual disks as `snapshot` froze them: device key, file, uuid, capacity and the
    /// frozen `changeId`, from the snapshot's `config.hardware.device`.
    pub fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<FrozenDisk>> {
        let o = self.object_props(snapshot, &["config.hardware.device"])?;
        let ctx = |e: Error| {
            e.context(format!("snapshot {} on ESXi host {}", snapshot.value, self.host())).with_kind(ErrorKind::Remote)
        };
        let devs = o
            .prop("config.hardware.device")
            .ok_or_else(|| ctx(Error::new("the snapshot's configuration lists no devices")))?;
        let disks = parse_disks(devs).map_err(ctx)?;
        Ok(disks
            .into_iter()
            .map(|d| {
                let b = d.current();
                FrozenDisk {
                    device_key: d.key,
                    file: b.file_name.clone(),
                    uuid: b.uuid.clone(),
                    capacity_bytes: d.capacity_bytes,
                    change_id: b.change_id.clone(),
                }
            })
            .collect())
    }

    /// Every changed area of the disk since `change_id`, as (offset, length) in bytes: calls
    /// QueryChangedDiskAreas from startOffset 0 until the answers cover the capacity (one answer
    /// may stop early: call again from its startOffset+length), and checks every answer (extents
    /// sorted, not overlapping, inside the capacity and inside the answer's own range, the answer
    /// starting where asked, making progress); a check that fails is an error naming the VM, disk
    /// and the bad value. Returns merged, sorted extents.
    ///
    /// `change_id` `"*"` asks for every allocated area. The areas are as the host rounds them
    /// (real hosts: whole tracking blocks, 64 KiB or more depending on the disk's size).
    pub fn changed_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        disk: &FrozenDisk,
        change_id: &str,
    ) -> Result<Vec<(u64, u64)>> {
        let what = || {
            format!(
                "QueryChangedDiskAreas of VM {} disk {} ({}) on ESXi host {}",
                vm.value,
                disk.device_key,
                crate::untrusted::shown(&decode_entity_name(&disk.file)),
                self.host()
            )
        };
        let bad = |msg: String| Error::remote(format!("{}: {msg}", what()));
        let capacity = disk.capacity_bytes;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        let mut calls = 0usize;
        while pos < capacity {
            if calls >= MAX_CBT_CALLS {
                return Err(bad(format!(
                    "the answers did not cover the capacity of {capacity} bytes after {MAX_CBT_CALLS} calls (at byte {pos})"
                )));
            }
            calls += 1;
            let inner = format!(
                "{}{}{}{}{}",
                moref_elem("_this", &vm.kind, &vm.value),
                moref_elem("snapshot", &snapshot.kind, &snapshot.value),
                elem("deviceKey", &disk.device_key.to_string()),
                elem("startOffset", &pos.to_string()),
                elem("changeId", change_id),
            );
            let resp = self.call("QueryChangedDiskAreas", &inner)?;
            let rv =
                resp.child("returnval").ok_or_else(|| bad(format!("no answer (DiskChangeInfo) from byte {pos}")))?;
            let info = parse_change_info(rv).map_err(|e| bad(format!("answer from byte {pos}: {e}")))?;
            pos = take_answer(&info, pos, capacity, &mut out).map_err(bad)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(start: u64, length: u64, areas: &[(u64, u64)]) -> ChangeInfo {
        ChangeInfo { start, length, areas: areas.to_vec() }
    }

    #[test]
    fn answers_are_merged_across_pages() {
        let mut out = Vec::new();
        assert_eq!(take_answer(&info(0, 100, &[(0, 10), (10, 5), (50, 50)]), 0, 1000, &mut out), Ok(100));
        assert_eq!(take_answer(&info(100, 900, &[(100, 10), (500, 0), (990, 10)]), 100, 1000, &mut out), Ok(1000));
        assert_eq!(out, vec![(0, 15), (50, 60), (990, 10)]);
    }

    #[test]
    fn hostile_answers_are_refused() {
        let cases: &[(ChangeInfo, u64, &str)] = &[
            (info(10, 100, &[]), 0, "asked from byte 0"),
            (info(0, 0, &[]), 0, "no progress"),
            (info(0, 100, &[(50, 60)]), 0, "outside the answer's window"),
            (info(0, 2000, &[(990, 20)]), 0, "beyond the capacity"),
            (info(0, 100, &[(50, 10), (40, 5)]), 0, "out of order"),
            (info(0, 100, &[(50, 10), (55, 10)]), 0, "overlaps"),
            (info(1, u64::MAX, &[]), 1, "overflows"),
            (info(0, 100, &[(u64::MAX, 2)]), 0, "overflows"),
        ];
        for (i, asked, want) in cases {
            let e = take_answer(i, *asked, 1000, &mut Vec::new()).unwrap_err();
            assert!(e.contains(want), "{i:?}: {e}");
        }
    }

    #[test]
    fn change_info_parses_and_refuses_garbage() {
        let n = crate::soap::parse(
            b"<returnval><startOffset>0</startOffset><length>4096</length>\
              <changedArea><start>512</start><length>1024</length></changedArea></returnval>",
        )
        .unwrap();
        assert_eq!(parse_change_info(&n), Ok(info(0, 4096, &[(512, 1024)])));
        let n = crate::soap::parse(b"<returnval><startOffset>-1</startOffset><length>1</length></returnval>").unwrap();
        assert!(parse_change_info(&n).unwrap_err().contains("startOffset \"-1\""));
        let n = crate::soap::parse(
            b"<returnval><startOffset>0</startOffset><length>1</length><changedArea><start>1</start></changedArea></returnval>",
        )
        .unwrap();
        assert!(parse_change_info(&n).unwrap_err().contains("no length"));
    }
}
