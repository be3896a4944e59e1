//! Samba shares of job archives (`SambaShare=yes`). (Stub.)

use crate::config::Config;
use crate::error::Result;

/// Write the include files for every job with SambaShare=yes, load them into smb.conf, reload.
pub fn update_shares(_cfg: &Config) -> Result<String> {
    bail!("Samba shares are not implemented yet")
}
