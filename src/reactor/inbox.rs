//! Where libvirt's stream and close callbacks leave their news for the reactor.
//!
//! Those callbacks run inside libvirt (on the loop thread, during an iteration), where
//! calling back into the same stream could deadlock and where the reactor's slab is
//! not reachable. They only record `(token, events)` or `(connection, reason)` here;
//! the reactor takes the lot after the iteration and calls handlers with nothing of
//! libvirt's on the stack. The stream callback's opaque is a token, not an address,
//! so the inbox is process-wide, like libvirt's event registration itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::connection_events::CloseReason;

#[derive(Default)]
pub(crate) struct Inbox {
    /// `(stream token, libvirt event bits)`, in arrival order.
    pub(crate) streams: Vec<(usize, i32)>,
    /// `(connection key, why it closed)`.
    pub(crate) closed: Vec<(usize, CloseReason)>,
}

static INBOX: Mutex<Inbox> = Mutex::new(Inbox {
    streams: Vec::new(),
    closed: Vec::new(),
});

/// Set, under the lock, whenever something is recorded: lets the loop skip the lock
/// on the many iterations that bring no stream news.
static NEWS: AtomicBool = AtomicBool::new(false);

fn inbox() -> std::sync::MutexGuard<'static, Inbox> {
    INBOX.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Called by the stream event trampoline.
pub(crate) fn stream_ready(token: usize, events: i32) {
    let mut inbox = inbox();
    inbox.streams.push((token, events));
    NEWS.store(true, Ordering::Release);
}

/// Called by a connection's close watch.
pub(crate) fn connection_closed(connection: usize, reason: CloseReason) {
    let mut inbox = inbox();
    inbox.closed.push((connection, reason));
    NEWS.store(true, Ordering::Release);
}

/// Moves everything recorded so far into `into` (whose vectors must be empty),
/// leaving `into`'s old allocations behind for reuse.
pub(crate) fn take(into: &mut Inbox) {
    if !has_news() {
        return;
    }
    let mut inbox = inbox();
    NEWS.store(false, Ordering::Relaxed);
    std::mem::swap(&mut inbox.streams, &mut into.streams);
    std::mem::swap(&mut inbox.closed, &mut into.closed);
}

/// Whether news is waiting, so the next poll must not sleep.
pub(crate) fn has_news() -> bool {
    NEWS.load(Ordering::Acquire)
}
