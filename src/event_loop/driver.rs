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
//! object: there are exactly two loops libvirt can run here, and only ours can be
//! embedded. libvirt's default loop is behind the `default-loop` feature.

use std::os::fd::{AsRawFd, RawFd};
#[cfg(feature = "default-loop")]
use std::sync::atomic::Ordering;
#[cfg(feature = "default-loop")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "default-loop")]
use super::default_loop::{DefaultLoop, DefaultWake};
use super::{DrainReport, EventLoop, LoopHandle};
use crate::engine::{LoopStats, LoopThreadGuard};
use crate::vocab::error::Result;

#[cfg(feature = "default-loop")]
/// Iterations `shutdown` runs on libvirt's default loop, which tells nothing about
/// what is still registered: its cleanup phase frees removed watches and timers in
/// the same iteration, so a few are plenty.
const DEFAULT_DRAIN_ITERATIONS: u64 = 4;

/// The loop under a reactor.
pub(crate) enum Driver {
    /// virt-reactor's mio loop.
    Ours(EventLoop),
    /// libvirt's default poll(2) loop.
    #[cfg(feature = "default-loop")]
    Default(DefaultLoop),
}

/// Wakes (or stops) the loop under a reactor from any thread.
#[derive(Clone)]
pub(crate) enum Waker {
    Ours(LoopHandle),
    #[cfg(feature = "default-loop")]
    Default(Arc<DefaultWake>),
}

impl Driver {
    pub(crate) fn waker(&self) -> Waker {
        match self {
            Driver::Ours(event_loop) => Waker::Ours(event_loop.handle()),
            #[cfg(feature = "default-loop")]
            Driver::Default(default) => Waker::Default(Arc::clone(&default.wake)),
        }
    }

    pub(crate) fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        match self {
            Driver::Ours(event_loop) => event_loop.run_once(timeout),
            #[cfg(feature = "default-loop")]
            Driver::Default(default) => default.run_once(timeout),
        }
    }

    pub(crate) fn take_stop_request(&self) -> bool {
        match self {
            Driver::Ours(event_loop) => event_loop.take_stop_request(),
            #[cfg(feature = "default-loop")]
            Driver::Default(default) => default.wake.stop.swap(false, Ordering::AcqRel),
        }
    }

    pub(crate) fn next_timeout(&self) -> Option<Duration> {
        match self {
            Driver::Ours(event_loop) => event_loop.next_timeout(),
            // Not embeddable: libvirt's loop polls on its own.
            #[cfg(feature = "default-loop")]
            Driver::Default(_) => Some(Duration::ZERO),
        }
    }

    /// What libvirt has registered now; all zeros on libvirt's default loop, which
    /// does not tell.
    pub(crate) fn stats(&self) -> LoopStats {
        match self {
            Driver::Ours(event_loop) => event_loop.stats(),
            #[cfg(feature = "default-loop")]
            Driver::Default(_) => LoopStats::default(),
        }
    }

    /// The fd to register in an embedding `mio::Poll` (the loop's epoll fd), if it
    /// can be embedded.
    pub(crate) fn embeddable(&self) -> std::io::Result<RawFd> {
        match self {
            Driver::Ours(event_loop) => Ok(event_loop.as_raw_fd()),
            #[cfg(feature = "default-loop")]
            Driver::Default(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "libvirt's default event loop cannot be embedded in a mio::Poll",
            )),
        }
    }

    /// Marks this thread as the loop's for a whole reactor iteration, handlers
    /// included.
    pub(crate) fn enter_loop_thread(&self) -> Option<LoopThreadGuard> {
        match self {
            Driver::Ours(event_loop) => Some(event_loop.enter_loop_thread()),
            #[cfg(feature = "default-loop")]
            Driver::Default(_) => None,
        }
    }

    pub(crate) fn drain(&mut self, timeout: Duration) -> Result<DrainReport> {
        match self {
            Driver::Ours(event_loop) => event_loop.drain(timeout),
            #[cfg(feature = "default-loop")]
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
    /// Whether the calling thread is running an iteration of this loop now (never
    /// known on libvirt's default loop).
    pub(crate) fn is_loop_thread(&self) -> bool {
        match self {
            Waker::Ours(handle) => handle.is_loop_thread(),
            #[cfg(feature = "default-loop")]
            Waker::Default(_) => false,
        }
    }

    pub(crate) fn wake(&self) {
        match self {
            Waker::Ours(handle) => handle.wake(),
            #[cfg(feature = "default-loop")]
            Waker::Default(wake) => wake.wake(),
        }
    }

    pub(crate) fn stop(&self) {
        match self {
            Waker::Ours(handle) => handle.stop(),
            #[cfg(feature = "default-loop")]
            Waker::Default(wake) => {
                wake.stop.store(true, Ordering::Release);
                wake.wake();
            }
        }
    }
}
