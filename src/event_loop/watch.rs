//! Your own fds and timers on libvirt's event loop, with Rust closures.
//!
//! [`Watch`] and [`Timer`] register through libvirt's public `virEventAddHandle` and
//! `virEventAddTimeout`, so they share the loop with libvirt's own sockets and timers.
//! The closure is owned by the registration and dropped by its free callback, on the
//! loop after dispatch. A panic inside it is caught and returned by the reactor's
//! `run_once`; the closure is never called again (its watch or timer stays
//! registered, doing nothing, until dropped).

use std::os::fd::RawFd;
use std::time::Duration;

use std::panic::{self, AssertUnwindSafe};

use crate::sys::closure;
use crate::sys::event_impl;
use crate::sys::panic::payload_message;
use crate::vocab::error::Result;
use crate::vocab::interest::{Interest, Readiness};

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
        let mut f = once_panicked(f, move |f: &mut F, args: (i32, RawFd, Readiness)| {
            f(args.0, args.1, args.2);
        });
        closure::add_handle(
            fd,
            interest,
            Box::new(move |watch, fd, readiness| f((watch, fd, readiness))),
        )
        .map(|id| Watch { id })
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
        let f = once_panicked(f, move |f: &mut F, timer: i32| f(timer));
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

/// libvirt's timer frequency: whole milliseconds, rounded up as mio rounds poll
/// timeouts (0 means every iteration, so 500 µs must not become 0); -1 disabled.
fn frequency(period: Option<Duration>) -> i32 {
    period.map_or(-1, |p| {
        i32::try_from(p.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    })
}

/// Wraps a callback libvirt calls so that a panic inside it is caught and reported
/// to the loop's runner, and the callback is dropped and never called again: its
/// state may be half-updated.
fn once_panicked<F, A>(f: F, call: impl Fn(&mut F, A)) -> impl FnMut(A)
where
    F: Send,
{
    let mut f = Some(f);
    move |args: A| {
        let Some(inner) = f.as_mut() else {
            return;
        };
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| call(inner, args))) {
            let message = payload_message(payload.as_ref());
            log::error!("a callback on the loop panicked: {message}; it is disabled");
            if let Some(implementation) = event_impl::implementation() {
                implementation.report_panic("callback on the loop".to_owned(), message);
            }
            // Dropped here, on the loop thread, outside any libvirt call.
            drop(f.take());
        }
    }
}
