//! [`EventLoop`]: registration with libvirt, and the loop that drives its events.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Poll, Waker};

use crate::engine::{self, DueTimer, Engine, LoopStats, ReadyWatch, Totals, WAKE_TOKEN};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ffi::callback::FreeCallback;

/// How many mio events one poll returns at most.
const EVENT_CAPACITY: usize = 1024;

/// Serializes registration so two threads cannot both get past the checks.
static REGISTERING: Mutex<()> = Mutex::new(());

/// libvirt's event loop, backed by mio.
///
/// There is one per process: [`EventLoop::register`] installs it with
/// `virEventRegisterImpl`, and it must happen before the first connection is opened
/// (use [`crate::connect`], which refuses to open one earlier). Then one thread drives
/// it with [`run`](Self::run), [`run_once`](Self::run_once), or from its own `mio::Poll`
/// (see [Embedding](#embedding)).
///
/// # Embedding
///
/// A single-threaded daemon that owns a `mio::Poll` registers the loop on its own
/// registry like any other source (it is readable when one of libvirt's fds is
/// ready), caps its poll timeout with [`next_timeout`](Self::next_timeout), and calls
/// [`dispatch`](Self::dispatch) after every poll, whether or not its token fired: a
/// due timer makes no fd readable, it only ends the poll's timeout. Both run on the
/// daemon's thread. The `embedded` example shows the whole pattern.
pub struct EventLoop {
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
pub struct LoopHandle {
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
    /// Registers virt-reactor as libvirt's event implementation.
    ///
    /// Call it once per process, before opening any connection.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] on a second call; [`Error::ForeignImplRegistered`]
    /// if another implementation (such as libvirt's default one) was registered first;
    /// [`Error::Io`] if epoll cannot be set up.
    #[doc(alias = "virEventRegisterImpl")]
    pub fn register() -> Result<EventLoop> {
        let _serial = REGISTERING.lock().unwrap_or_else(|e| e.into_inner());
        if engine::get().is_some() {
            return Err(Error::AlreadyRegistered);
        }
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE_TOKEN)?;
        let engine = engine::install(poll.registry().try_clone()?, waker)?;
        ffi::event_impl::register()?;
        ffi::fork::watch();
        // libvirt ignores a second registration with only a warning: find out whether
        // ours is the one it uses by watching a probe timer arrive in our table.
        let before = engine.totals().timers_removed;
        if ffi::event_impl::probe_registered_timer() <= 0
            || engine.totals().timers_removed == before
        {
            return Err(Error::ForeignImplRegistered);
        }
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

    /// A handle that can stop or wake this loop from any thread.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle {
            engine: self.engine,
        }
    }

    /// Runs until [`LoopHandle::stop`] is called.
    ///
    /// # Errors
    ///
    /// A callback panic ([`Error::CallbackPanicked`]) or a poll failure ends the run
    /// with an error; the loop stays usable and `run` may be called again.
    pub fn run(&mut self) -> Result<()> {
        loop {
            let iteration = self.run_once(None);
            // Consume a stop even when the iteration failed, so it cannot end the
            // next run early.
            let stop = self.take_stop_request();
            iteration?;
            if stop {
                return Ok(());
            }
        }
    }

    /// One iteration: poll (for at most `timeout`, or until the next timer if `None`),
    /// fire due timers, dispatch ready watches, then run deferred free callbacks.
    ///
    /// # Errors
    ///
    /// As for [`run`](Self::run); a panic is reported after the iteration completes.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        if ffi::fork::is_child() {
            return Err(Error::WrongProcess);
        }
        let _on_loop = self.engine.enter_loop_thread();
        let poll_timeout = self.engine.poll_timeout(timeout);
        let polled = self.poll.poll(&mut self.events, poll_timeout);
        self.engine.awake();
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => return Err(e.into()),
        }
        self.engine.dispatch_timers(&mut self.due);
        self.watches_dispatched = self.engine.dispatch_handles(&self.events, &mut self.ready);
        self.engine.run_frees(&mut self.spare_frees);
        match self.engine.take_panic() {
            Some(panic) => Err(panic),
            None => Ok(()),
        }
    }

    /// Dispatches whatever is ready now without blocking: for a loop embedded in
    /// another `mio::Poll`, when that poll reports this loop's token.
    ///
    /// # Errors
    ///
    /// As for [`run_once`](Self::run_once).
    pub fn dispatch(&mut self) -> Result<()> {
        self.run_once(Some(Duration::ZERO))
    }

    /// How long an embedding poll may sleep before [`dispatch`](Self::dispatch) must
    /// run again even without a readiness event: `Some(ZERO)` when work is pending
    /// (free callbacks, or watches dispatched last time whose fds may still be
    /// ready), the time to the next timer, or `None` when nothing is scheduled.
    ///
    /// Call it right before the embedding poll sleeps: from then until the next
    /// [`dispatch`](Self::dispatch), changes made by other threads wake that poll.
    pub fn next_timeout(&self) -> Option<Duration> {
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
    pub fn stats(&self) -> LoopStats {
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
    pub fn drain(&mut self, timeout: Duration) -> Result<DrainReport> {
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
    /// Makes [`EventLoop::run`] return after its current iteration. Works from any
    /// thread, including from a callback on the loop.
    pub fn stop(&self) {
        self.engine.request_stop();
    }

    /// Interrupts a loop sleeping in poll, so it re-reads its timers at once.
    pub fn wake(&self) {
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

impl mio::event::Source for EventLoop {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).deregister(registry)
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
