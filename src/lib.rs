//! affa: rotating, hard-linked, deduplicated backups pulled over ssh + rsync, with hot backup of
//! running VMware ESXi virtual machines. A re-implementation of Affa 3 (SME Server).
//!
//! The library holds all logic; `main.rs` only parses the command line and dispatches.

#[macro_use]
extern crate affa_core;

pub use affa_core::{bail, clock, error, fmt, fsutil, interrupt, untrusted};
pub use affa_store::{archive, chunk, report, vmrecord};
pub use affa_vsphere as esxi;
pub mod automount;
pub mod backup;
pub mod commands;
pub mod config;
pub mod cron;
pub mod install;
pub mod joblog;
pub mod lock;
pub mod maintenance;
pub mod monitor;
pub mod mount;
pub mod notify;
pub mod observer;
pub mod offsite;
pub mod restore;
pub mod samba;
pub mod schedule;
pub mod shared_lock;
pub mod transport;

pub use error::{Error, Result};
