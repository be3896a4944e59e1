//! SIGINT / SIGTERM during a run.
//!
//! Owns: noticing the signal and stopping the child (rsync, ssh) that is running, so the run can
//! clean up (remove an ESXi snapshot, keep `scheduled.running` for resume) and fail with a clear
//! message. Must never: exit the process from the signal handler, skipping that cleanup.
//!
//! Also the fault tests' crash hook [`crash_point`]: in a build with the `test-hooks` cargo
//! feature (the test run's, never a release build), `AFFA_TEST_CRASH_AT=STEP[:N]` makes affa
//! `SIGKILL` itself the N-th time a run reaches the named step (docs/RELIABILITY.md lists the
//! steps). Read once; a no-op when unset. Without the feature the hook is not compiled at all.

#[cfg(feature = "test-hooks")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;
#[cfg(feature = "test-hooks")]
use std::sync::OnceLock;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static CHILD: AtomicI32 = AtomicI32::new(0);
static INIT: Once = Once::new();

/// Install the handlers (idempotent).
pub fn install() {
    INIT.call_once(|| {
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) {
            std::thread::spawn(move || {
                for sig in signals.forever() {
                    SIGNAL.store(sig, Ordering::SeqCst);
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    let pid = CHILD.load(Ordering::SeqCst);
                    stop_child(pid);
                }
            });
        }
    });
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// "SIGTERM", "SIGINT"...
pub fn signal_name() -> &'static str {
    match SIGNAL.load(Ordering::SeqCst) {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Record the child to stop on a signal (0 = none).
pub fn set_child(pid: u32) {
    CHILD.store(pid as i32, Ordering::SeqCst);
    if interrupted() {
        stop_child(pid as i32);
    }
}

/// SIGTERM to the recorded child (a pid > 0 that affa started itself; 0 = none).
fn stop_child(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid).filter(|_| pid > 0) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
}

/// Test hook (fault tests only, `test-hooks` builds): with `AFFA_TEST_CRASH_AT=STEP` or `STEP:N`
/// in the environment, the N-th (default first) call with that `step` kills the process with
/// SIGKILL, exactly like `kill -9` at that point of the run. The variable is read once.
#[cfg(feature = "test-hooks")]
pub fn crash_point(step: &str) {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("AFFA_TEST_CRASH_AT").ok()?;
        let (s, n) = match v.rsplit_once(':') {
            Some((s, n)) if n.parse::<u64>().is_ok() => (s.to_string(), n.parse().unwrap()),
            _ => (v.clone(), 1),
        };
        Some((s, n.max(1)))
    });
    if let Some((s, n)) = spec {
        if s == step && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        }
    }
}

/// The crash hook of a build without the `test-hooks` feature (every release build): nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_point(_step: &str) {}

#[cfg(test)]
mod tests {
    /// A build without `test-hooks` (what `cargo build --release` installs) ignores the variable:
    /// with the hook compiled in, this test process would be killed here.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn the_default_build_ignores_affa_test_crash_at() {
        std::env::set_var("AFFA_TEST_CRASH_AT", "unit-test-step");
        super::crash_point("unit-test-step");
        super::crash_point("unit-test-step");
        std::env::remove_var("AFFA_TEST_CRASH_AT");
    }
}
