//! affa-store: what is on the backup disk, and nothing about how it got there.
//!
//! Owns: the chunk pool and the manifests of chunked files ([`chunk`]), the archive set of a job
//! and its rotation ([`archive`]), and the records an archive holds: its report ([`report`]) and
//! the VM record of an ESXi archive ([`vmrecord`]). The formats are written down in
//! docs/FORMAT.md with their versions. Must never: know of jobs' configuration, hosts, ssh or
//! rsync; print or read stdin.

#[macro_use]
extern crate affa_core;

use affa_core::{bail, error, fsutil, interrupt, untrusted};

pub mod archive;
pub mod chunk;
pub mod report;
pub mod vmrecord;
