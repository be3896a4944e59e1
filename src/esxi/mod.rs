//! ESXi hot backup: the vSphere SOAP client (login, find the VM, read its layout, snapshot
//! create/remove, RegisterVM) and the helpers around it.
//!
//! Owns: everything said to an ESXi host's `/sdk` endpoint, certificate pinning for it, and the
//! naming of affa's snapshots (`BEXI-<job>-<YYYYmmddHHMMSS>`). Must never: send credentials
//! before the host's certificate matched the pinned thumbprint, print a password, or panic on
//! what a host sends. Copying files (rsync) and the backup procedure live elsewhere
//! (`backup.rs`, `vimcmd.rs`).

pub mod backup;
pub mod chain;
pub mod client;
pub mod model;
pub mod soap;
pub mod tls;

pub use client::{Client, ConnectOptions, Password};
pub use model::{
    host_path, split_ds_path, url_to_host_path, About, Datastore, Disk, DiskBacking, LayoutFile, MoRef, PowerState,
    ServiceContent, SnapshotTree, TaskInfo, TaskState, VmFiles, VmLayout,
};
pub use tls::{fetch_thumbprint, Thumbprint};

/// Every snapshot affa makes has a name starting with this.
pub const SNAPSHOT_PREFIX: &str = "BEXI-";

/// `BEXI-<job>-<YYYYmmddHHMMSS>` for a snapshot taken at `at`.
pub fn snapshot_name(job: &str, at: chrono::NaiveDateTime) -> String {
    format!("{SNAPSHOT_PREFIX}{job}-{}", at.format("%Y%m%d%H%M%S"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_names() {
        let t = chrono::NaiveDate::from_ymd_opt(2024, 3, 2).unwrap().and_hms_opt(3, 4, 5).unwrap();
        assert_eq!(super::snapshot_name("esxi-myvm", t), "BEXI-esxi-myvm-20240302030405");
    }
}
