//! affa: rotating, hard-linked, deduplicated backups pulled over ssh + rsync, with hot backup of
//! running VMware ESXi virtual machines. A re-implementation of Affa 3 (SME Server).
//!
//! The library holds all logic; `main.rs` only parses the command line and dispatches.

#[macro_use]
pub mod error;
pub mod archive;
pub mod automount;
pub mod chunk;
pub mod clock;
pub mod commands;
pub mod config;
pub mod esxi;
pub mod fsutil;
pub mod install;
pub mod interrupt;
pub mod joblog;
pub mod lock;
pub mod monitor;
pub mod notify;
pub mod observer;
pub mod report;
pub mod restore;
pub mod run;
pub mod samba;
pub mod schedule;
pub mod sme;
pub mod staging;
pub mod transport;
pub mod untrusted;

pub use error::{Error, Result};
