//! The engine behind libvirt's six event functions: the handle and timer tables, the
//! deferred free queue, and the dispatch steps the loop runs.
//!
//! libvirt calls in from any thread and re-entrantly from callbacks, so all state sits
//! behind one mutex, which is never held while a libvirt or user callback runs:
//! dispatch copies what it needs out, unlocks, calls, and re-validates before the next
//! call. There is one per process, because libvirt's registration is; libvirt reaches it
//! through the C boundary's one static.

mod handles;
mod ids;
mod timers;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mio::{Registry, Token, Waker};

pub(crate) use handles::ReadyWatch;
pub(crate) use timers::DueTimer;

use crate::sys::callback::{FreeCallback, HandleCallback, TimerCallback};
use crate::sys::event_impl::EventImpl;
use crate::sys::thread;
use crate::vocab::error::Error;
use crate::vocab::interest::{Interest, Readiness};
use crate::vocab::sync::lock;
use handles::HandleTable;
use timers::TimerTable;

/// The mio token of the engine's waker.
pub(crate) const WAKE_TOKEN: Token = Token(usize::MAX);

pub(crate) struct Engine {
    state: Mutex<State>,
    registry: Registry,
    waker: Waker,
    /// True from just before the loop computes its poll timeout until poll returns;
    /// other threads wake the loop only then.
    sleeping: AtomicBool,
    stop: AtomicBool,
    panic: Mutex<Option<Error>>,
    /// Set with `panic`, so that the loop looks at the slot only after a panic.
    panicked: AtomicBool,
    /// The thread running an iteration now: changes it makes itself need no wake-up.
    /// 0 when no thread is.
    loop_thread: AtomicU64,
}

#[derive(Default)]
struct State {
    handles: HandleTable,
    timers: TimerTable,
    frees: Vec<FreeCallback>,
    totals: Totals,
    /// When the loop's poll returns by itself, as it computed its timeout last;
    /// `None`: not before an event.
    sleeps_until: Option<Instant>,
}

impl State {
    /// Whether a timer now due at `due` (`None`: disarmed) needs the sleeping loop
    /// woken: only when it is due before the loop would wake anyway. libvirt's
    /// client re-arms its keepalive timer around every call it makes off the loop
    /// thread (each packet an upload's sender thread sends); a later deadline waits
    /// for the loop's next turn.
    fn wakes_too_late_for(&self, due: Option<Instant>) -> bool {
        match (due, self.sleeps_until) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(due), Some(until)) => due < until,
        }
    }
}

/// Running totals, for drain reports and statistics.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) handles_removed: u64,
    pub(crate) timers_removed: u64,
    pub(crate) frees_run: u64,
}

/// A snapshot of what libvirt has registered.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct LoopStats {
    /// Handle watches registered.
    pub handles: usize,
    /// Of those, enabled ones (events != 0).
    pub enabled_handles: usize,
    /// Timers registered.
    pub timers: usize,
    /// Of those, armed ones (frequency >= 0).
    pub armed_timers: usize,
    /// Free callbacks waiting for the next iteration.
    pub pending_frees: usize,
}

impl LoopStats {
    /// Nothing registered and nothing left to free.
    pub fn is_idle(&self) -> bool {
        self.handles == 0 && self.timers == 0 && self.pending_frees == 0
    }
}

/// Makes an engine; registration keeps it for the life of the process.
pub(crate) fn new(registry: Registry, waker: Waker) -> Box<Engine> {
    Box::new(Engine {
        state: Mutex::new(State::default()),
        registry,
        waker,
        sleeping: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        panic: Mutex::new(None),
        panicked: AtomicBool::new(false),
        loop_thread: AtomicU64::new(0),
    })
}

impl EventImpl for Engine {
    fn add_handle(
        &self,
        fd: RawFd,
        interest: Interest,
        callback: HandleCallback,
        free: Option<FreeCallback>,
    ) -> i32 {
        let added = lock(&self.state)
            .handles
            .add(&self.registry, fd, interest, callback, free);
        match added {
            Ok(id) => {
                log::trace!("addHandle fd {fd} {interest:?} -> watch {id}");
                id
            }
            Err(e) => {
                log::warn!("addHandle fd {fd}: cannot poll it: {e}");
                -1
            }
        }
    }

    fn update_handle(&self, id: i32, interest: Interest) {
        if !lock(&self.state)
            .handles
            .update(&self.registry, id, interest)
        {
            log::debug!("updateHandle: no watch {id}");
        }
    }

    fn remove_handle(&self, id: i32) -> i32 {
        let mut state = lock(&self.state);
        let Some(watch) = state.handles.take(&self.registry, id) else {
            log::debug!("removeHandle: no watch {id}");
            return -1;
        };
        state.totals.handles_removed += 1;
        state.frees.extend(watch.free);
        drop(state);
        log::trace!("removeHandle watch {id} (fd {})", watch.fd);
        self.wake_for_change();
        0
    }

    fn add_timeout(
        &self,
        frequency: i32,
        callback: TimerCallback,
        free: Option<FreeCallback>,
    ) -> i32 {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let id = state.timers.add(frequency, callback, free, now);
        let wake = state.wakes_too_late_for(due_at(frequency, now));
        drop(state);
        log::trace!("addTimeout frequency {frequency} -> timer {id}");
        if wake {
            self.wake_for_change();
        }
        id
    }

    fn update_timeout(&self, id: i32, frequency: i32) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if !state.timers.set(id, frequency, now) {
            log::debug!("updateTimeout: no timer {id}");
            return;
        }
        let wake = state.wakes_too_late_for(due_at(frequency, now));
        drop(state);
        if wake {
            self.wake_for_change();
        }
    }

    fn remove_timeout(&self, id: i32) -> i32 {
        let mut state = lock(&self.state);
        let Some(timer) = state.timers.take(id) else {
            log::debug!("removeTimeout: no timer {id}");
            return -1;
        };
        state.totals.timers_removed += 1;
        state.frees.extend(timer.free);
        drop(state);
        log::trace!("removeTimeout timer {id}");
        self.wake_for_change();
        0
    }

    /// Keeps the first panic until the loop's caller takes it.
    fn report_panic(&self, origin: String, message: String) {
        let mut slot = lock(&self.panic);
        if slot.is_none() {
            *slot = Some(Error::CallbackPanicked { origin, message });
        }
        self.panicked.store(true, Ordering::Release);
    }
}

/// When a timer armed at `now` with `frequency` (libvirt's milliseconds; -1
/// disarmed) is due.
fn due_at(frequency: i32, now: Instant) -> Option<Instant> {
    u64::try_from(frequency)
        .ok()
        .map(|ms| now + Duration::from_millis(ms))
}

impl Engine {
    /// Wakes a loop sleeping in poll, unless the change comes from the loop itself.
    fn wake_for_change(&self) {
        if self.sleeping.load(Ordering::SeqCst) && !self.is_loop_thread() {
            self.wake();
        }
    }

    pub(crate) fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn take_stop(&self) -> bool {
        self.stop.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn take_panic(&self) -> Option<Error> {
        if !self.panicked.swap(false, Ordering::Acquire) {
            return None;
        }
        lock(&self.panic).take()
    }

    /// Marks the calling thread as the loop thread for the duration of the guard.
    /// Marks the calling thread as the one running iterations, until the guard goes.
    pub(crate) fn enter_loop_thread(&'static self) -> LoopThreadGuard {
        let previous = self.loop_thread.swap(thread::current(), Ordering::AcqRel);
        LoopThreadGuard {
            engine: self,
            previous,
        }
    }

    /// Whether the calling thread is running an iteration now.
    pub(crate) fn is_loop_thread(&self) -> bool {
        self.loop_thread.load(Ordering::Acquire) == thread::current()
    }

    /// The poll timeout: 0 while free callbacks wait, else until the next timer
    /// deadline, capped by `cap`. Marks the loop as about to sleep.
    pub(crate) fn poll_timeout(&self, cap: Option<Duration>) -> Option<Duration> {
        self.sleeping.store(true, Ordering::SeqCst);
        let mut state = lock(&self.state);
        let now = Instant::now();
        let timeout = if state.frees.is_empty() {
            let until_timer = state
                .timers
                .next_deadline()
                .map(|deadline| deadline.saturating_duration_since(now));
            match (until_timer, cap) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            Some(Duration::ZERO)
        };
        state.sleeps_until = timeout.map(|t| now + t);
        timeout
    }

    pub(crate) fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Fires every timer due now, each at most once.
    pub(crate) fn dispatch_timers(&self, due: &mut Vec<DueTimer>) {
        due.clear();
        lock(&self.state).timers.collect_due(Instant::now(), due);
        for &timer in due.iter() {
            let Some(callback) = lock(&self.state).timers.still_due(timer) else {
                continue; // removed or re-armed by an earlier callback
            };
            callback.call(timer.id);
            lock(&self.state)
                .timers
                .rearm_after_fire(timer, Instant::now());
        }
    }

    /// Calls every watch that `events` made ready. Returns whether any was due.
    ///
    /// No re-arm follows: the fds are registered level-triggered, so one left ready
    /// is reported again by the next poll.
    pub(crate) fn dispatch_handles(
        &self,
        events: &mio::Events,
        ready: &mut Vec<ReadyWatch>,
    ) -> bool {
        ready.clear();
        {
            let state = lock(&self.state);
            for event in events.iter() {
                if event.token() != WAKE_TOKEN {
                    state
                        .handles
                        .collect_ready(event.token(), Readiness::from_mio(event), ready);
                }
            }
        }
        for watch in ready.iter() {
            let Some((callback, enabled)) = lock(&self.state).handles.callback(watch.id) else {
                continue; // removed by an earlier callback of this batch
            };
            let readiness = watch.readiness.for_watch(enabled);
            if !readiness.is_empty() {
                callback.call(watch.id, watch.fd, readiness);
            }
        }
        !ready.is_empty()
    }

    /// Runs the free callbacks queued so far, with no lock held.
    pub(crate) fn run_frees(&self, spare: &mut Vec<FreeCallback>) -> usize {
        {
            let mut state = lock(&self.state);
            if state.frees.is_empty() {
                return 0;
            }
            std::mem::swap(&mut state.frees, spare);
        }
        let count = spare.len();
        for free in spare.drain(..) {
            free.run();
        }
        lock(&self.state).totals.frees_run += count as u64;
        count
    }

    pub(crate) fn stats(&self) -> LoopStats {
        let state = lock(&self.state);
        LoopStats {
            handles: state.handles.len(),
            enabled_handles: state.handles.enabled(),
            timers: state.timers.len(),
            armed_timers: state.timers.armed(),
            pending_frees: state.frees.len(),
        }
    }

    pub(crate) fn totals(&self) -> Totals {
        lock(&self.state).totals
    }
}

/// Restores the thread's loop-thread flag when dropped.
/// Restores the previous loop thread when an iteration ends.
pub(crate) struct LoopThreadGuard {
    engine: &'static Engine,
    previous: u64,
}

impl Drop for LoopThreadGuard {
    fn drop(&mut self) {
        self.engine
            .loop_thread
            .store(self.previous, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeping_loop_is_woken_only_for_a_timer_due_before_it_wakes() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let mut state = State {
            sleeps_until: Some(now + second),
            ..State::default()
        };
        assert!(state.wakes_too_late_for(due_at(0, now)));
        assert!(state.wakes_too_late_for(due_at(999, now)));
        assert!(!state.wakes_too_late_for(due_at(5000, now)));
        assert!(!state.wakes_too_late_for(due_at(-1, now)));
        state.sleeps_until = None;
        assert!(state.wakes_too_late_for(due_at(5000, now)));
        assert!(!state.wakes_too_late_for(due_at(-1, now)));
    }
}
