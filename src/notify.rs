//! Mail: error mails, success mails, the status mail, the mail test. (Stub: being written.)

use crate::clock::Clock;
use crate::config::Config;
use crate::error::Result;

/// `--mailtest JOB`
pub fn mailtest(_cfg: &Config, _job: &str) -> Result<String> {
    bail!("--mailtest is not implemented yet")
}

/// `--send-status`
pub fn send_status(_cfg: &Config, _clock: &dyn Clock) -> Result<String> {
    bail!("--send-status is not implemented yet")
}
