//! `BandwidthLimit` for the agent's session: the bytes affa reads from (backup) and writes to
//! (restore) the agent's ssh are paced to at most the limit, as rsync's `--bwlimit` paces rsync.
//!
//! Owns: the pacing arithmetic (a virtual clock: each byte is due `1/rate` s after the previous
//! one; a transfer that fell behind, such as after the agent hashed unchanged data for a while,
//! may catch up by at most [`BURST`], never by the whole idle time). Must never: busy-wait, or
//! sleep while a read is pending (the agent's idle watchdog times reads, not pauses).
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

    /// Count `n` bytes just read or written and sleep as long as the rate asks.
    pub fn after(&mut self, n: usize) {
        let d = self.delay(n, Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
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
