//! affa: rotating, hard-linked, deduplicated backups pulled over ssh + rsync, with hot backup of
//! running VMware ESXi virtual machines. A re-implementation of Affa 3 (SME Server).
//!
//! The library holds all logic; `main.rs` only parses the command line and dispatches.

#[macro_use]
pub mod error;
pub mod clock;
pub mod config;
pub mod archive;
pub mod report;
pub mod lock;
pub mod interrupt;
pub mod joblog;
pub mod transport;
pub mod run;
pub mod chunk;
pub mod esxi;
pub mod commands;
pub mod staging;
pub mod restore;
pub mod schedule;
pub mod notify;
pub mod monitor;
pub mod samba;
pub mod install;

pub use error::{Error, Result};
