//! Time, injected.
//!
//! Owns: "what time is it" for every decision that depends on dates (archive promotion, report
//! dates, schedules). Must never: be bypassed by a direct `Local::now()` elsewhere in the library,
//! or rotation across days, weeks, months and years could not be tested without waiting.
//!
//! The binary uses [`SystemClock`]. A build with the `test-hooks` cargo feature (the tests' and
//! the benchmark's; never `cargo build --release`) reads `AFFA_FAKE_NOW=YYYY-mm-ddTHH:MM:SS`
//! (local time) instead: that is how the command-line tests move through 800 days in seconds.

use chrono::{Local, NaiveDateTime};

use crate::error::{Error, Result};

pub trait Clock: Send + Sync {
    /// The current local wall-clock time.
    fn now(&self) -> NaiveDateTime;
}

/// The machine's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> NaiveDateTime {
        Local::now().naive_local()
    }
}

/// A clock that always says the same time (tests, `AFFA_FAKE_NOW`).
pub struct FixedClock(pub NaiveDateTime);

impl Clock for FixedClock {
    fn now(&self) -> NaiveDateTime {
        self.0
    }
}

pub const FAKE_NOW_ENV: &str = "AFFA_FAKE_NOW";

/// Parse `YYYY-mm-ddTHH:MM:SS` (or with a space instead of `T`).
pub fn parse_time(s: &str) -> Result<NaiveDateTime> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S"))
        .map_err(|_| Error::new(format!("bad time '{s}': expected YYYY-mm-ddTHH:MM:SS")))
}

/// The clock the binary uses: the system's, or (only in a build with the `test-hooks` cargo
/// feature, the tests' and the benchmark's, never a release build) the fixed time from
/// `AFFA_FAKE_NOW`.
#[cfg(feature = "test-hooks")]
pub fn from_env() -> Result<Box<dyn Clock>> {
    match std::env::var(FAKE_NOW_ENV) {
        Ok(v) if !v.is_empty() => Ok(Box::new(FixedClock(parse_time(&v).map_err(|e| e.context(FAKE_NOW_ENV))?))),
        _ => Ok(Box::new(SystemClock)),
    }
}

/// The clock the binary uses: the system's (`AFFA_FAKE_NOW` is read only by a build with the
/// `test-hooks` cargo feature).
#[cfg(not(feature = "test-hooks"))]
pub fn from_env() -> Result<Box<dyn Clock>> {
    Ok(Box::new(SystemClock))
}
