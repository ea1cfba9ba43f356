//! When to stop reading libvirt for a moment: while consoles print without pause.
//!
//! A guest printing flat out reaches the service as one packet per few bytes
//! (libvirtd relays each read of the guest's pty as it comes: about 16 bytes per
//! wake-up with one `yes` flooding, about 9,400 wake-ups a second; see Scenario 9 in
//! docs/benchmarks.md). Serving each packet on a wake-up of its own costs far more
//! than the bytes. So once output has kept coming for [`STREAK`], libvirt's
//! connection is left unread for [`BATCH`] after each wake-up that served output,
//! and what arrived meanwhile is served in one. An echo or a screenful is over
//! before [`STREAK`] and is served at once, as before; beside a flood, any console's
//! output waits at most [`BATCH`] more.

use std::time::{Duration, Instant};

/// How long libvirt is left unread once output streams.
pub(crate) const BATCH: Duration = Duration::from_millis(1);
/// How long output must have kept coming (no gap longer than [`GAP`]) before the
/// service batches it.
pub(crate) const STREAK: Duration = Duration::from_millis(20);
/// The longest pause between two pieces of output of one streak: two batches.
const GAP: Duration = Duration::from_millis(2);

/// Tracks the current run of output wake-ups.
#[derive(Debug, Default)]
pub(crate) struct Pacing {
    /// When the current run of output began.
    streak_start: Option<Instant>,
    /// When output was last served.
    last: Option<Instant>,
}

impl Pacing {
    /// A wake-up served output at `now`: when to read libvirt again, if it should
    /// wait.
    pub(crate) fn served_output(&mut self, now: Instant) -> Option<Instant> {
        let continues = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) <= GAP);
        if !continues {
            self.streak_start = Some(now);
        }
        self.last = Some(now);
        let start = self.streak_start.unwrap_or(now);
        (now.saturating_duration_since(start) >= STREAK).then(|| now + BATCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_batched_only_once_it_streams() {
        let t0 = Instant::now();
        let mut pacing = Pacing::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // One wake-up a millisecond: served at once until the streak is 20 ms long.
        for n in 0..20 {
            assert_eq!(pacing.served_output(ms(n)), None, "at {n} ms");
        }
        assert_eq!(pacing.served_output(ms(20)), Some(ms(21)));
        assert_eq!(pacing.served_output(ms(21)), Some(ms(22)));
    }

    #[test]
    fn a_pause_ends_the_streak() {
        let t0 = Instant::now();
        let mut pacing = Pacing::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        for n in 0..=20 {
            pacing.served_output(ms(n));
        }
        // 3 ms without output: the next piece is an echo, served at once.
        assert_eq!(pacing.served_output(ms(23)), None);
    }
}
