//! [`CloseWatch`]: a connection's close callback, for programs that want to hear
//! when libvirt closes a connection they hold without streams in a reactor (a
//! reactor's streams hear of it by themselves, as `Error::ConnectionClosed`).
//! Domain lifecycle events go through `Reactor::subscribe_lifecycle`.
//!
//! The watch keeps its own reference to the connection and must be dropped (or
//! cancelled) before the connection is closed: libvirt holds the connection open for
//! as long as a callback is registered on it, and `shutdown` would wait for it.

use std::fmt;
use std::sync::{Arc, Mutex};

use virt::connect::Connect;

use crate::event_loop::watch::once_panicked;
use crate::sys::connection as ffi;
use crate::vocab::error::Result;
use crate::vocab::events::CloseReason;
use crate::vocab::sync::lock;

/// The closure a close watch calls at most once, until the watch goes.
type CloseSlot = Arc<Mutex<Option<Box<dyn FnOnce(CloseReason) + Send>>>>;

/// The connection's close callback: tells when libvirt closed the connection and why.
/// Unregistered when dropped.
///
/// libvirt keeps one close callback per connection; drivers without a persistent
/// connection (such as `test:///`) accept one and never call it. A remote connection
/// with streams in a [`Reactor`](crate::Reactor) has the reactor's, which fails those
/// streams when the connection is lost. Registering and unregistering are calls to
/// the daemon on a remote connection: not for the loop thread.
#[must_use = "the close callback is unregistered when dropped"]
pub struct CloseWatch {
    conn: Connect,
    slot: CloseSlot,
    registered: bool,
}

impl CloseWatch {
    /// Calls `f` on the loop thread when libvirt closes `conn` for any reason but
    /// [`Connect`] being dropped: the socket failed, the daemon went away or stopped
    /// answering keepalive messages.
    ///
    /// `f` runs inside libvirt's close callback: it must not drop this watch (libvirt
    /// holds the lock that unregistering takes), and should only hand the news on
    /// (a channel, [`ReactorHandle::execute`](crate::ReactorHandle::execute)). A panic
    /// in it is returned by the reactor's next `run_once`. `f` is dropped by the time
    /// the watch is.
    ///
    /// # Errors
    ///
    /// libvirt's error, e.g. when `conn` already has a close callback.
    #[doc(alias = "virConnectRegisterCloseCallback")]
    pub fn new<F>(conn: &Connect, f: F) -> Result<CloseWatch>
    where
        F: FnOnce(CloseReason) + Send + 'static,
    {
        let slot: CloseSlot = Arc::new(Mutex::new(Some(Box::new(f))));
        // libvirt's copy only reaches through the slot: drivers that ignore close
        // callbacks never free it, and then only the empty slot leaks, not `f`.
        let libvirt_slot = Arc::clone(&slot);
        let call = once_panicked((), move |(), reason: CloseReason| {
            match take(&libvirt_slot) {
                Some(f) => f(reason),
                None => log::debug!("connection closed ({reason}) after its watch went"),
            }
        });
        ffi::register_close(conn, Box::new(call))?;
        Ok(CloseWatch {
            conn: conn.clone(),
            slot,
            registered: true,
        })
    }

    /// Unregisters now and reports failure, which dropping only logs.
    ///
    /// # Errors
    ///
    /// libvirt's error.
    #[doc(alias = "virConnectUnregisterCloseCallback")]
    pub fn cancel(mut self) -> Result<()> {
        self.registered = false;
        let unregistered = ffi::unregister_close(&self.conn);
        drop(take(&self.slot));
        unregistered
    }
}

fn take(slot: &CloseSlot) -> Option<Box<dyn FnOnce(CloseReason) + Send>> {
    lock(slot).take()
}

impl Drop for CloseWatch {
    fn drop(&mut self) {
        if self.registered {
            if let Err(e) = ffi::unregister_close(&self.conn) {
                log::warn!("cannot unregister the close callback: {e}");
            }
            drop(take(&self.slot));
        }
    }
}

impl fmt::Debug for CloseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let armed = lock(&self.slot).is_some();
        f.debug_struct("CloseWatch")
            .field("armed", &armed)
            .finish_non_exhaustive()
    }
}
