//! The integration tests: one test binary (`cargo test --test it`), one module per area, with
//! the shared fixtures of `common` (one sshd and one simulator per test process for the tests
//! that do not change them; a test that stops, restarts or reconfigures its sshd starts its
//! own). Run one area with a filter on the module name: `cargo test --release --test it
//! engine::`.
//!
//! Owns: the end-to-end tests against real parts started by the tests themselves (sshd, rsync,
//! the vSphere simulator, SMTP, smbd on 127.0.0.1). Must never: leave a daemon running after the
//! test process ends (common's daemons stop when it does, however it ends), touch the machine's
//! own sshd, /root/.ssh or anything outside temp dirs (the SME tests' /home/e-smith is created
//! and removed under a lock), or depend on the order the tests run in.

mod common;

mod affa3;
mod agent_transport;
mod cbt;
mod cephfs;
mod chunked;
mod engine;
mod esxi;
mod esxi_client;
// The fault tests need the crash hook (`--features test-hooks`, as scripts/test.sh runs them).
#[cfg(feature = "test-hooks")]
mod faults;
mod hostile;
mod local_attacker;
mod mount;
mod offsite;
mod offsite_restore;
mod ops;
mod restore;
mod restore_esxi;
mod rotation;
mod terminal;
mod user_snapshots;
