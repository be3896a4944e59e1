//! Chunked files in a run: their plain staging copies under `RootDir/JOB/.staging/`, updated in
//! place by rsync's delta transfer, then chunked into `scheduled.running`.
//!
//! Owns: which files are chunked (`chunkFiles`), the staging copies, and the sweep of the pool
//! after rotation. Must never: let a chunked file be transferred whole when an older copy exists
//! (a missing staging copy is rebuilt from the newest archive first).

use std::path::Path;

use crate::config::Job;
use crate::error::Result;
use crate::report::Report;
use crate::run::{Ctx, RunSummary};
use crate::transport::rsync::Source;

/// rsync `--exclude` patterns that keep chunked files out of the main transfer.
pub fn rsync_excludes(job: &Job) -> Vec<String> {
    job.get_all("chunkFiles").to_vec()
}

/// Transfer the chunked files of an ordinary job into staging and chunk them into `running`.
pub fn transfer_chunked(_ctx: &Ctx, _source: &Source, _running: &Path, _report: &mut Report, _summary: &mut RunSummary) -> Result<()> {
    Ok(())
}

/// After rotation: remove pool chunks nobody references any more.
pub fn sweep_after_rotation(_ctx: &Ctx) -> Result<()> {
    Ok(())
}

/// Remove pool chunks nobody references any more (`--cleanup`, `--delete-job`).
pub fn sweep_pool(_root: &Path) -> Result<()> {
    Ok(())
}

/// `--unchunk JOB ARCHIVE [--to DIR]`
pub fn unchunk_command(_cfg: &crate::config::Config, _job: &str, _archive: &str, _to: Option<&Path>) -> Result<String> {
    crate::bail!("not implemented yet")
}

/// `--verify JOB [ARCHIVE|--all]`
pub fn verify_command(_cfg: &crate::config::Config, _job: &str, _archive: Option<&str>, _all: bool) -> Result<String> {
    crate::bail!("not implemented yet")
}
