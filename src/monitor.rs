//! Monitoring: `--nrpe` (Nagios plugin) and `--metrics` (Prometheus textfile). (Stub.)

use crate::clock::Clock;
use crate::config::Config;
use crate::error::Result;

/// `--nrpe [JOB...]`: the plugin's one line and its exit code (0 OK, 1 WARNING, 2 CRITICAL).
pub fn nrpe(_cfg: &Config, _jobs: &[String], _clock: &dyn Clock) -> Result<(String, i32)> {
    bail!("--nrpe is not implemented yet")
}

/// `--metrics`: write the Prometheus textfile; returns a one-line summary.
pub fn write_metrics(_cfg: &Config, _clock: &dyn Clock) -> Result<String> {
    bail!("--metrics is not implemented yet")
}
