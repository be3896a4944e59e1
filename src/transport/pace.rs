//! `BandwidthLimit` for the agent's session: the bytes affa reads from (backup) and writes to
//! (restore) the agent's ssh are paced to at most the limit, as rsync's `--bwlimit` paces rsync.
//!
//! Owns: the pacing arithmetic (a virtual clock: each byte is due `1/rate` s after the previous
//! one; a transfer that fell behind, such as after the agent hashed unchanged data for a while,
//! may catch up by at most [`BURST`], never by the whole idle time). Must never: busy-wait, or
//! sleep while a read is pending (the agent's idle watchdog times reads, not pauses), write a
//! chunk's frame in one burst (writes go out in slices of 50 ms at the rate), or go on sleeping
//! once a signal arrived.
//!
//! Pacing the reader is enough to pace the link: while affa sleeps, ssh's channel window and the
//! TCP window fill and the agent blocks on its writes (the link carries at most the limit plus
//! those windows once).

use std::time::{Duration, Instant};

/// The most a paced stream may catch up after it fell behind.
pub const BURST: Duration = Duration::from_millis(250);

/// Paces a byte stream to `rate` bytes per second.
#[derive(Debug)]
pub struct Pace {
    rate: u64,
    /// When the bytes counted so far are due.
    due: Instant,
}

impl Pace {
    /// A pace for `BandwidthLimit` (KiB/s, rsync's unit); None for 0 (no limit).
    pub fn kib_per_s(limit: u64) -> Option<Pace> {
        (limit > 0).then(|| Pace { rate: limit.saturating_mul(1024), due: Instant::now() })
    }

    /// How long to wait after `n` more bytes at `now` so that the stream keeps the rate.
    pub fn delay(&mut self, n: usize, now: Instant) -> Duration {
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = self.due.max(earliest);
        let secs = n as f64 / self.rate as f64;
        self.due = start + Duration::from_secs_f64(secs.min(86_400.0));
        self.due.saturating_duration_since(now)
    }

    /// The most bytes to write at once: 50 ms at the rate (at least 4 KiB), so that what is
    /// written goes out paced, never as one frame-sized burst.
    pub fn slice(&self) -> usize {
        usize::try_from(self.rate / 20).unwrap_or(usize::MAX).max(4096)
    }

    /// Count `n` bytes just read and sleep as long as the rate asks.
    pub fn after(&mut self, n: usize) {
        let d = self.delay(n, Instant::now());
        sleep(d);
    }

    /// Count `n` bytes about to be written and sleep until they are due.
    pub fn before(&mut self, n: usize) {
        let d = self.delay(n, Instant::now());
        // The bytes are due at the end of the wait for them; written then, they keep the rate
        // (less what the first write of a transfer may take early: one slice).
        sleep(d);
    }
}

/// Sleep `d`, in slices of at most 100 ms, ending early once a signal arrived (the run is being
/// stopped: `--kill` must not wait for a slow limit's pause).
fn sleep(d: Duration) {
    let end = Instant::now() + d.min(Duration::from_secs(86_400));
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || crate::interrupt::interrupted() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_stream_is_held_to_the_rate() {
        let t0 = Instant::now();
        let mut p = Pace { rate: 1000, due: t0 };
        // 10 writes of 100 bytes at once: the last is due 1 s later.
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = p.delay(100, t0);
        }
        assert_eq!(last, Duration::from_secs(1));
        // Keeping pace (each write when due): no wait beyond the bytes' own time.
        let now = t0 + Duration::from_secs(1);
        assert_eq!(p.delay(500, now), Duration::from_millis(500));
    }

    #[test]
    fn an_idle_stream_catches_up_by_the_burst_only() {
        let t0 = Instant::now();
        let mut p = Pace { rate: 1000, due: t0 };
        // 10 s idle, then 1000 bytes: they may come 250 ms early, not 10 s.
        let now = t0 + Duration::from_secs(10);
        assert_eq!(p.delay(1000, now), Duration::from_millis(750));
        assert_eq!(p.delay(1000, now), Duration::from_millis(1750));
    }

    #[test]
    fn writes_are_sliced_to_50_ms_at_the_rate() {
        assert_eq!(Pace::kib_per_s(2000).unwrap().slice(), 2000 * 1024 / 20);
        assert_eq!(Pace::kib_per_s(1).unwrap().slice(), 4096);
    }

    #[test]
    fn zero_is_no_limit_and_huge_values_do_not_overflow() {
        assert!(Pace::kib_per_s(0).is_none());
        let mut p = Pace::kib_per_s(u64::MAX).unwrap();
        let now = p.due;
        assert!(p.delay(usize::MAX, now) <= Duration::from_secs(1));
        let mut p = Pace::kib_per_s(1).unwrap();
        let now = p.due;
        assert_eq!(p.delay(usize::MAX, now), Duration::from_secs(86_400), "a day at most per call");
        let mut slow = Pace::kib_per_s(1).unwrap();
        let now = slow.due;
        assert_eq!(slow.delay(2048, now), Duration::from_secs(2));
    }
}
