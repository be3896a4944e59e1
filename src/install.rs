//! `affa --install`: binary, /etc/affa with sample jobs, state dirs, cron file, logrotate. (Stub.)

use crate::error::Result;

/// Options of `--install`.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Install under this root instead of / (tests, packaging).
    pub prefix: Option<std::path::PathBuf>,
}

pub fn install(_opts: &InstallOptions) -> Result<String> {
    bail!("--install is not implemented yet")
}
