//! Your own fds and timers on libvirt's event loop, with Rust closures.
//!
//! [`Watch`] and [`Timer`] register through libvirt's public `virEventAddHandle` and
//! `virEventAddTimeout`, so they share the loop with libvirt's own sockets and timers.
//! The closure is owned by the registration and dropped by its free callback; a panic
//! inside it is caught, logged and returned by the loop's `run`.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::error::Result;
use crate::ffi::closure;
use crate::interest::{Interest, Readiness};

/// A watch on a file descriptor. Removed when dropped.
#[derive(Debug)]
#[must_use = "the watch is removed when dropped"]
pub struct Watch {
    id: i32,
}

/// A periodic timer. Removed when dropped.
#[derive(Debug)]
#[must_use = "the timer is removed when dropped"]
pub struct Timer {
    id: i32,
}

impl Watch {
    /// Calls `f(watch_id, fd, readiness)` while `fd` is ready for `interest` (level
    /// triggered: again on every iteration until the condition is consumed). ERROR
    /// and HANGUP are reported even when not asked for.
    ///
    /// The fd is borrowed: keep it open until the watch is removed.
    ///
    /// # Errors
    ///
    /// libvirt's error if no event implementation is registered or the fd cannot be
    /// polled.
    #[doc(alias = "virEventAddHandle")]
    pub fn add<F>(fd: RawFd, interest: Interest, f: F) -> Result<Watch>
    where
        F: FnMut(i32, RawFd, Readiness) + Send + 'static,
    {
        closure::add_handle(fd, interest, Box::new(f)).map(|id| Watch { id })
    }

    /// libvirt's id for this watch.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// Changes what the watch asks for; [`Interest::NONE`] pauses it completely.
    #[doc(alias = "virEventUpdateHandle")]
    pub fn set_interest(&self, interest: Interest) {
        closure::update_handle(self.id, interest);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !closure::remove_handle(self.id) {
            log::warn!("watch {} was already removed", self.id);
        }
    }
}

impl Timer {
    /// Calls `f(timer_id)` every `period` (`Duration::ZERO`: on every loop iteration),
    /// or never while `period` is `None`.
    ///
    /// # Errors
    ///
    /// libvirt's error if no event implementation is registered.
    #[doc(alias = "virEventAddTimeout")]
    pub fn add<F>(period: Option<Duration>, f: F) -> Result<Timer>
    where
        F: FnMut(i32) + Send + 'static,
    {
        closure::add_timer(frequency(period), Box::new(f)).map(|id| Timer { id })
    }

    /// libvirt's id for this timer.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// Re-arms the timer from now with a new period, or disables it with `None`.
    #[doc(alias = "virEventUpdateTimeout")]
    pub fn set_period(&self, period: Option<Duration>) {
        closure::update_timer(self.id, frequency(period));
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if !closure::remove_timer(self.id) {
            log::warn!("timer {} was already removed", self.id);
        }
    }
}

/// libvirt's frequency: milliseconds, or -1 for "disabled".
/// libvirt's timer frequency: whole milliseconds, rounded up as mio rounds poll
/// timeouts (0 means every iteration, so 500 µs must not become 0); -1 disabled.
fn frequency(period: Option<Duration>) -> i32 {
    period.map_or(-1, |p| {
        i32::try_from(p.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    })
}
