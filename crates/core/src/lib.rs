//! affa-core: the leaf helpers every layer of affa uses, and nothing else.
//!
//! Owns: the error type ([`error`]), the one secure atomic writer and private directories
//! ([`fsutil`]), the checks on names and paths a host sends ([`untrusted`]), SIGINT/SIGTERM and
//! the test crash hook ([`interrupt`]), `key=value` lines ([`keyvalue`]), the injected clock ([`clock`]) and how sizes, durations and
//! dates are shown ([`fmt`]). Must never: depend on another affa crate, know of jobs, archives or
//! hosts, print, or read stdin.

#[macro_use]
pub mod error;
pub mod clock;
pub mod fmt;
pub mod fsutil;
pub mod interrupt;
pub mod keyvalue;
pub mod untrusted;

pub use error::{Error, Result};

/// This machine's host name (the backup server's), "localhost" when the kernel has none.
pub fn hostname() -> String {
    let uts = rustix::system::uname();
    let h = uts.nodename().to_string_lossy().trim().to_string();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}
