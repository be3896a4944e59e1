//! SIGINT / SIGTERM during a run.
//!
//! Owns: noticing the signal and stopping the child (rsync, ssh) that is running, so the run can
//! clean up (remove an ESXi snapshot, keep `scheduled.running` for resume) and fail with a clear
//! message. Must never: exit the process from the signal handler, skipping that cleanup.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

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
                    if pid > 0 {
                        unsafe { libc::kill(pid, libc::SIGTERM) };
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

/// Record the child to stop on a signal (0 = none).
pub fn set_child(pid: u32) {
    CHILD.store(pid as i32, Ordering::SeqCst);
    if pid > 0 && interrupted() {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
}
