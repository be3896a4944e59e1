//! affa-vsphere: the vSphere SOAP client (login, find the VM, read its layout, snapshot
//! create/remove, RegisterVM, Changed Block Tracking), the model of what a host answers, and VMware's disk chains.
//!
//! Owns: everything said to an ESXi host's `/sdk` endpoint, certificate pinning for it, and the
//! naming of affa's snapshots (`BEXI-<job>-<YYYYmmddHHMMSS>`) and which ones are a job's own.
//! Must never: send credentials before the host's certificate matched the pinned thumbprint,
//! print a password, or panic on what a host sends; know of jobs, runs, archives or
//! configuration files (affa's `backup::vm` holds the backup procedure, `restore::esxi` the restore).

extern crate affa_core;

use affa_core::{error, untrusted};

pub mod cbt;
pub mod chain;
pub mod client;
pub mod model;
pub mod soap;
pub mod tls;

pub use cbt::{CbtState, FrozenDisk};
pub use client::{Client, ConnectOptions, Password};
pub use model::{
    host_path, split_ds_path, url_to_host_path, About, Datastore, Disk, DiskBacking, LayoutFile, MoRef, PowerState,
    ServiceContent, SnapshotTree, TaskInfo, TaskState, VmFiles, VmLayout,
};
pub use soap::{fault_of, Fault};
pub use tls::{fetch_thumbprint, Thumbprint};

/// Every snapshot affa makes has a name starting with this.
pub const SNAPSHOT_PREFIX: &str = "BEXI-";

/// `BEXI-<job>-<YYYYmmddHHMMSS>` for a snapshot taken at `at`.
pub fn snapshot_name(job: &str, at: chrono::NaiveDateTime) -> String {
    format!("{SNAPSHOT_PREFIX}{job}-{}", at.format("%Y%m%d%H%M%S"))
}

/// Whether `name` is a snapshot affa made for `job`: exactly `BEXI-<job>-<14 digits>`. A
/// snapshot of another job or another backup server's job of another name never matches, also
/// when one job name starts with the other (`BEXI-web-` does not match `BEXI-web-2-...`: after
/// `BEXI-<job>-` exactly 14 digits must follow), nor does one a person made.
pub fn is_snapshot_of(job: &str, name: &str) -> bool {
    name.strip_prefix(SNAPSHOT_PREFIX)
        .and_then(|r| r.strip_prefix(job))
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|t| t.len() == 14 && t.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_names() {
        let t = chrono::NaiveDate::from_ymd_opt(2024, 3, 2).unwrap().and_hms_opt(3, 4, 5).unwrap();
        assert_eq!(super::snapshot_name("esxi-myvm", t), "BEXI-esxi-myvm-20240302030405");
        assert!(super::is_snapshot_of("esxi-myvm", &super::snapshot_name("esxi-myvm", t)));
        for other in [
            "BEXI-esxi-20240302030405",
            "BEXI-esxi-myvm-2-20240302030405",
            "BEXI-esxi-myvm-2024030203040",
            "BEXI-esxi-myvm-202403020304055",
            "BEXI-esxi-myvm-2024030203040x",
            "BEXI-esxi-myvm",
            "before upgrade",
        ] {
            assert!(!super::is_snapshot_of("esxi-myvm", other), "{other}");
        }
    }
}
