//! libvirt's default event loop (`virEventRegisterDefaultImpl` +
//! `virEventRunDefaultImpl`) as the loop under a reactor, for benchmarks that
//! compare the two loops under the same stream code. Behind the `default-loop`
//! feature.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::watch::{Timer, Watch};
use crate::sys::event_impl;
use crate::vocab::error::{Error, Result};
use crate::vocab::interest::Interest;

/// libvirt's default event loop, driven one `virEventRunDefaultImpl` at a time.
///
/// libvirt's loop has no public wake-up, so a socketpair watched on the loop itself
/// serves as one: a byte written to it makes the loop's poll return.
pub(crate) struct DefaultLoop {
    pub(crate) wake: Arc<DefaultWake>,
    _watch: Watch,
}

pub(crate) struct DefaultWake {
    tx: UnixStream,
    /// A wake-up byte is on its way and not yet drained: further wakes may skip.
    pending: AtomicBool,
    pub(crate) stop: AtomicBool,
}

impl DefaultWake {
    pub(crate) fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer already wakes the loop.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

impl DefaultLoop {
    /// `virEventRegisterDefaultImpl`, once per process, and the wake-up watch.
    pub(crate) fn register() -> Result<DefaultLoop> {
        event_impl::register_default()?;
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

    pub(crate) fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
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
