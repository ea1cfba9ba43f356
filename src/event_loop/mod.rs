//! The loop layer: [`EventLoop`] (registration with libvirt, and the iterations that
//! drive its events), [`Watch`]/[`Timer`] (your own fds and timers on libvirt's
//! loop), opening connections, and libvirt's default loop as an alternative driver.

pub(crate) mod connect;
#[cfg(feature = "default-loop")]
pub(crate) mod default_loop;
pub(crate) mod driver;
pub(crate) mod watch;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Waker};

use crate::engine::{
    self, DueTimer, Engine, LoopStats, LoopThreadGuard, ReadyWatch, Totals, WAKE_TOKEN,
};
use crate::sys::callback::FreeCallback;
use crate::sys::event_impl;
use crate::vocab::error::{Error, Result};

/// How many mio events one poll returns at most.
const EVENT_CAPACITY: usize = 1024;

/// libvirt's event loop, backed by mio: one per process, installed with
/// `virEventRegisterImpl` before the first connection is opened. The reactor drives
/// it; see [`Reactor`](crate::Reactor) for running and embedding.
pub(crate) struct EventLoop {
    poll: Poll,
    events: Events,
    engine: &'static Engine,
    ready: Vec<ReadyWatch>,
    due: Vec<DueTimer>,
    spare_frees: Vec<FreeCallback>,
    /// The last iteration dispatched a watch, whose fd may still be ready: epoll
    /// re-reports it to our own poll, but an embedding poll is not woken again.
    watches_dispatched: bool,
}

/// A `Send + Clone` handle that stops or wakes the loop from any thread.
#[derive(Clone)]
pub(crate) struct LoopHandle {
    engine: &'static Engine,
}

/// What [`EventLoop::drain`] saw while it ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Handle watches libvirt removed during the drain.
    pub handles_removed: u64,
    /// Timers libvirt removed during the drain.
    pub timers_removed: u64,
    /// Free callbacks that ran during the drain.
    pub frees_run: u64,
    /// Loop iterations the drain took.
    pub iterations: u64,
}

impl EventLoop {
    /// Registers virt-reactor as libvirt's event implementation, once per process.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] on a second call; [`Error::ForeignImplRegistered`]
    /// if another implementation (such as libvirt's default one) was registered first;
    /// [`Error::Io`] if epoll cannot be set up. After an error nothing is installed,
    /// and a retry reports the same cause.
    pub(crate) fn register() -> Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE_TOKEN)?;
        let engine = event_impl::register(engine::new(poll.registry().try_clone()?, waker))?;
        log::debug!("virt-reactor registered as libvirt's event implementation");
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(EVENT_CAPACITY),
            engine,
            ready: Vec::new(),
            due: Vec::new(),
            spare_frees: Vec::new(),
            watches_dispatched: false,
        })
    }

    /// Marks the calling thread as the loop's until the guard goes.
    pub(crate) fn enter_loop_thread(&self) -> LoopThreadGuard {
        self.engine.enter_loop_thread()
    }

    /// A handle that can stop or wake this loop from any thread.
    pub(crate) fn handle(&self) -> LoopHandle {
        LoopHandle {
            engine: self.engine,
        }
    }

    /// One iteration: poll (for at most `timeout`, or until the next timer if `None`),
    /// dispatch ready watches, fire due timers, then run deferred free callbacks.
    /// Watches go first so that a 0 ms timer their callbacks arm (libvirt's remote
    /// streams signal received data that way) fires in the same iteration, not after
    /// one more poll.
    ///
    /// # Errors
    ///
    /// A poll failure; a callback's panic ([`Error::CallbackPanicked`]), reported
    /// after the iteration completes; [`Error::WrongProcess`] after `fork`.
    pub(crate) fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        if event_impl::is_forked_child() {
            return Err(Error::WrongProcess);
        }
        let poll_timeout = self.engine.poll_timeout(timeout);
        let polled = self.poll.poll(&mut self.events, poll_timeout);
        self.engine.awake();
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => return Err(e.into()),
        }
        self.watches_dispatched = self.engine.dispatch_handles(&self.events, &mut self.ready);
        self.engine.dispatch_timers(&mut self.due);
        self.engine.run_frees(&mut self.spare_frees);
        match self.engine.take_panic() {
            Some(panic) => Err(panic),
            None => Ok(()),
        }
    }

    /// How long an embedding poll may sleep before [`dispatch`](Self::dispatch) must
    /// run again even without a readiness event: `Some(ZERO)` when work is pending
    /// (free callbacks, or watches dispatched last time whose fds may still be
    /// ready), the time to the next timer, or `None` when nothing is scheduled.
    ///
    /// Call it right before the embedding poll sleeps: from then until the next
    /// [`dispatch`](Self::dispatch), changes made by other threads wake that poll.
    pub(crate) fn next_timeout(&self) -> Option<Duration> {
        let timeout = self.engine.poll_timeout(None);
        if self.watches_dispatched {
            // libvirt's fds are level-triggered in our epoll, but the embedding poll
            // hears of them only on a new edge: one still ready after its callback
            // (data left unread) must be dispatched again without waiting.
            Some(Duration::ZERO)
        } else {
            timeout
        }
    }

    /// Consumes a pending [`LoopHandle::stop`] request.
    pub(crate) fn take_stop_request(&self) -> bool {
        self.engine.take_stop()
    }

    /// What libvirt has registered right now.
    pub(crate) fn stats(&self) -> LoopStats {
        self.engine.stats()
    }

    /// Runs the loop until libvirt has removed every watch and timer it registered and
    /// every free callback has run, or until `timeout`.
    ///
    /// Close every connection (and finish every stream) first: libvirt removes a
    /// connection's watches only when its last reference goes.
    ///
    /// # Errors
    ///
    /// [`Error::DrainTimedOut`] with what is left, or any error of
    /// [`run_once`](Self::run_once).
    pub(crate) fn drain(&mut self, timeout: Duration) -> Result<DrainReport> {
        let start = self.engine.totals();
        let deadline = Instant::now() + timeout;
        let mut iterations = 0;
        loop {
            let stats = self.stats();
            if stats.is_idle() {
                return Ok(report(start, self.engine.totals(), iterations));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::DrainTimedOut {
                    handles: stats.handles,
                    timers: stats.timers,
                    pending_frees: stats.pending_frees,
                });
            }
            self.run_once(Some((deadline - now).min(Duration::from_millis(50))))?;
            iterations += 1;
        }
    }
}

fn report(start: Totals, end: Totals, iterations: u64) -> DrainReport {
    DrainReport {
        handles_removed: end.handles_removed - start.handles_removed,
        timers_removed: end.timers_removed - start.timers_removed,
        frees_run: end.frees_run - start.frees_run,
        iterations,
    }
}

impl LoopHandle {
    /// Asks the thread running the loop to return after its current iteration.
    pub(crate) fn stop(&self) {
        self.engine.request_stop();
    }

    /// Whether the calling thread is running an iteration now.
    pub(crate) fn is_loop_thread(&self) -> bool {
        self.engine.is_loop_thread()
    }

    /// Interrupts a loop sleeping in poll, so it re-reads its timers at once.
    pub(crate) fn wake(&self) {
        self.engine.wake();
    }
}

impl AsRawFd for EventLoop {
    /// The epoll fd: readable whenever libvirt's watches, timers' wake-ups or free
    /// callbacks need the loop.
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoopHandle { .. }")
    }
}
