//! Restore: put an archive back on its host (ordinary jobs) or an ESXi VM back on a host.
//! (Stub: being written.)

use std::io::Write;

use crate::config::Config;
use crate::error::Result;

/// Options of `--full-restore`.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Archive name (`scheduled.0`, `daily.3`); None = the newest valid archive.
    pub archive: Option<String>,
    /// `--preserve-newer=yes|no` (default yes): do not overwrite files newer on the target.
    pub preserve_newer: bool,
    /// `--delete=yes|no` (default no): delete files on the target that are not in the archive.
    pub delete: bool,
    /// ESXi: restore into another directory on the datastore.
    pub to_dir: Option<String>,
    /// ESXi: restore onto another datastore.
    pub to_datastore: Option<String>,
    /// ESXi: another host (a host name, or the name of another job whose host settings to use).
    pub to_host: Option<String>,
    pub to_user: Option<String>,
    pub to_password_file: Option<std::path::PathBuf>,
    pub to_thumbprint: Option<String>,
    pub to_ssh_port: Option<u16>,
    /// ESXi: register the restored .vmx under this name.
    pub register: Option<String>,
    pub dry_run: bool,
    pub yes: bool,
    pub interactive: bool,
}

/// `affa --full-restore JOB [ARCHIVE] [options]`
pub fn full_restore(_cfg: &Config, _job: &str, _opts: &RestoreOptions, _out: &mut dyn Write) -> Result<()> {
    bail!("--full-restore is not implemented yet")
}
