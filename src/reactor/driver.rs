//! What runs a reactor's loop iterations: our [`EventLoop`], or libvirt's own default
//! loop (`virEventRegisterDefaultImpl` + `virEventRunDefaultImpl`).
//!
//! The reactor needs only four things from its loop: run one iteration (at most
//! `timeout` long), wake it from another thread, a stop flag, and a drain at
//! shutdown. Everything else (the slab, the inbox, handlers, outboxes, the
//! connection close watches) talks to libvirt's public stream API, which works with
//! whichever event implementation the process registered. So one [`Driver`] enum
//! with two variants swaps the loop under the same reactor code, and benchmarks
//! compare the loops, not two copies of the stream code. An enum rather than a trait
//! object: [`Reactor::event_loop`](super::Reactor::event_loop) hands out the concrete
//! [`EventLoop`], and there are exactly two loops libvirt can run here.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine;
use crate::error::{Error, Result};
use crate::event_loop::{DrainReport, EventLoop, LoopHandle};
use crate::interest::Interest;
use crate::watch::{Timer, Watch};

/// Iterations `shutdown` runs on libvirt's default loop, which tells nothing about
/// what is still registered: its cleanup phase frees removed watches and timers in
/// the same iteration, so a few are plenty.
const DEFAULT_DRAIN_ITERATIONS: u64 = 4;

/// Serializes [`DefaultLoop::register`].
static REGISTERING_DEFAULT: Mutex<bool> = Mutex::new(false);

/// The loop under a reactor.
pub(crate) enum Driver {
    /// virt-reactor's mio loop.
    Ours(EventLoop),
    /// libvirt's default poll(2) loop.
    Default(DefaultLoop),
}

/// Wakes (or stops) the loop under a reactor from any thread.
#[derive(Clone)]
pub(crate) enum Waker {
    Ours(LoopHandle),
    Default(Arc<DefaultWake>),
}

impl Driver {
    pub(crate) fn waker(&self) -> Waker {
        match self {
            Driver::Ours(event_loop) => Waker::Ours(event_loop.handle()),
            Driver::Default(default) => Waker::Default(Arc::clone(&default.wake)),
        }
    }

    pub(crate) fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        match self {
            Driver::Ours(event_loop) => event_loop.run_once(timeout),
            Driver::Default(default) => default.run_once(timeout),
        }
    }

    pub(crate) fn take_stop_request(&self) -> bool {
        match self {
            Driver::Ours(event_loop) => event_loop.take_stop_request(),
            Driver::Default(default) => default.wake.stop.swap(false, Ordering::AcqRel),
        }
    }

    pub(crate) fn next_timeout(&self) -> Option<Duration> {
        match self {
            Driver::Ours(event_loop) => event_loop.next_timeout(),
            // Not embeddable: libvirt's loop polls on its own.
            Driver::Default(_) => Some(Duration::ZERO),
        }
    }

    pub(crate) fn drain(&mut self, timeout: Duration) -> Result<DrainReport> {
        match self {
            Driver::Ours(event_loop) => event_loop.drain(timeout),
            Driver::Default(default) => {
                for _ in 0..DEFAULT_DRAIN_ITERATIONS {
                    default.run_once(Some(Duration::ZERO))?;
                }
                Ok(DrainReport {
                    iterations: DEFAULT_DRAIN_ITERATIONS,
                    ..DrainReport::default()
                })
            }
        }
    }
}

impl Waker {
    pub(crate) fn wake(&self) {
        match self {
            Waker::Ours(handle) => handle.wake(),
            Waker::Default(wake) => wake.wake(),
        }
    }

    pub(crate) fn stop(&self) {
        match self {
            Waker::Ours(handle) => handle.stop(),
            Waker::Default(wake) => {
                wake.stop.store(true, Ordering::Release);
                wake.wake();
            }
        }
    }
}

/// libvirt's default event loop, driven one `virEventRunDefaultImpl` at a time.
///
/// libvirt's loop has no public wake-up, so a socketpair watched on the loop itself
/// serves as one: a byte written to it makes the loop's poll return.
pub(crate) struct DefaultLoop {
    wake: Arc<DefaultWake>,
    _watch: Watch,
}

pub(crate) struct DefaultWake {
    tx: UnixStream,
    /// A wake-up byte is on its way and not yet drained: further wakes may skip.
    pending: AtomicBool,
    stop: AtomicBool,
}

impl DefaultWake {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer already wakes the loop.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

impl DefaultLoop {
    /// `virEventRegisterDefaultImpl`, once per process, and the wake-up watch.
    pub(crate) fn register() -> Result<DefaultLoop> {
        let mut registered = REGISTERING_DEFAULT
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *registered || engine::get().is_some() {
            return Err(Error::AlreadyRegistered);
        }
        virt::event::event_register_default_impl().map_err(Error::Libvirt)?;
        *registered = true;
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let wake = Arc::new(DefaultWake {
            tx,
            pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let drained = Arc::clone(&wake);
        let fd = rx.as_raw_fd();
        let watch = Watch::add(fd, Interest::READABLE, move |_, _, _| {
            // Drain, then clear: a wake that skipped its byte because `pending` was
            // still set is served anyway, since the reactor runs its commands right
            // after this iteration. (Clearing first could let the drain swallow a
            // byte written after the clear, leaving `pending` set with nothing to
            // read: every later wake would be skipped and the loop sleep forever.)
            let mut sink = [0u8; 64];
            while matches!((&rx).read(&mut sink), Ok(n) if n > 0) {}
            drained.pending.store(false, Ordering::Release);
        })?;
        Ok(DefaultLoop {
            wake,
            _watch: watch,
        })
    }

    fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        // libvirt's loop takes no timeout: a zero one is a wake-up sent to itself, a
        // longer one a one-shot timer.
        let _deadline = match timeout {
            Some(t) if t.is_zero() => {
                self.wake.pending.store(true, Ordering::Release);
                match (&self.wake.tx).write(&[1]) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
                None
            }
            Some(t) => Some(Timer::add(Some(t.max(Duration::from_millis(1))), |_| {})?),
            None => None,
        };
        virt::event::event_run_default_impl().map_err(Error::Libvirt)
    }
}
