//! SIGINT / SIGTERM during a run.
//!
//! Owns: noticing the signal and stopping the children (rsync, ssh, the agent's ssh session) that
//! are running, so the run can clean up (remove an ESXi snapshot, keep `scheduled.running` for
//! resume) and fail with a clear message. Several children may run at once (the descriptor rsync
//! beside the agent's read): each is registered while it runs ([`stop_on_signal`]). Must never:
//! exit the process from the signal handler, skipping that cleanup, or signal a process affa did
//! not start (a child is signalled through its pidfd where the kernel has them, so never a process
//! that reused its pid).
//!
//! Also the fault tests' crash hook [`crash_point`]: in a build with the `test-hooks` cargo
//! feature (the test run's, never a release build), `AFFA_TEST_CRASH_AT=STEP[:N]` makes affa
//! `SIGKILL` itself the N-th time a run reaches the named step (docs/RELIABILITY.md lists the
//! steps). Read once; a no-op when unset. Without the feature the hook is not compiled at all.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
#[cfg(feature = "test-hooks")]
use std::sync::OnceLock;
use std::sync::{Mutex, Once};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static CHILDREN: Mutex<Vec<Registered>> = Mutex::new(Vec::new());
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
static INIT: Once = Once::new();

/// A running child to stop on a signal.
struct Registered {
    key: u64,
    pid: i32,
    /// Its pidfd (None where the kernel has none: then the pid).
    fd: Option<OwnedFd>,
}

fn children() -> std::sync::MutexGuard<'static, Vec<Registered>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Install the handlers (idempotent).
pub fn install() {
    INIT.call_once(|| {
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) {
            std::thread::spawn(move || {
                for sig in signals.forever() {
                    SIGNAL.store(sig, Ordering::SeqCst);
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    for c in children().iter() {
                        stop(c);
                    }
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

/// A child registered by [`stop_on_signal`]: it is stopped on a signal while this lives.
#[must_use = "the child is only stopped on a signal while this lives"]
pub struct StopOnSignal {
    key: u64,
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        children().retain(|c| c.key != self.key);
    }
}

/// Stop the child `pid` (one affa started itself) with SIGTERM if a signal arrives (or has
/// arrived) while the returned value lives (drop it when the child has ended).
pub fn stop_on_signal(pid: u32) -> StopOnSignal {
    let key = NEXT_KEY.fetch_add(1, Ordering::SeqCst);
    let pid = i32::try_from(pid).unwrap_or(0);
    let fd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    // The signal thread sets the flag before it takes the list: either it finds this child
    // there, or the flag is already set when the child is added.
    let mut list = children();
    list.push(Registered { key, pid, fd });
    if let (true, Some(c)) = (interrupted(), list.last()) {
        stop(c);
    }
    drop(list);
    StopOnSignal { key }
}

/// SIGTERM to a registered child (through its pidfd when it has one).
fn stop(c: &Registered) {
    match &c.fd {
        Some(fd) => {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::TERM);
        }
        None => {
            if let Some(p) = rustix::process::Pid::from_raw(c.pid).filter(|_| c.pid > 0) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
        }
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
