//! Where news for the reactor waits until its next turn: stream events and
//! connection losses from libvirt's callbacks, domain events, and results from
//! the lanes and worker threads.
//!
//! libvirt's callbacks run inside libvirt (on the loop thread, during an iteration),
//! where calling back into the same stream could deadlock and where the reactor's
//! slab is not reachable. They only record what happened here; the reactor takes
//! the lot after the iteration and calls handlers with nothing of libvirt's on the
//! stack. Each reactor has its own inbox: every callback's opaque carries a handle
//! on it with its key, so nothing here is process-wide.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virt::connect::Connect;

use super::token::StreamToken;
use crate::event_loop::driver::Waker;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleEvent};
use crate::vocab::interest::Readiness;
use crate::vocab::sync::lock;

/// What happened since the reactor last looked.
#[derive(Default)]
pub(crate) struct News {
    /// Stream events, in arrival order.
    pub(crate) streams: Vec<(StreamToken, Readiness)>,
    /// Connections libvirt closed, by connection key.
    pub(crate) closed: Vec<(usize, CloseReason)>,
    /// Domain lifecycle events, by subscription.
    pub(crate) lifecycle: Vec<(u64, LifecycleEvent)>,
    /// Streams whose outbox went from empty to non-empty.
    pub(crate) flush: Vec<StreamToken>,
    /// Sends a lane could not make.
    pub(crate) send_failed: Vec<(StreamToken, Error)>,
    /// Finishes and aborts a lane completed, with libvirt's result.
    pub(crate) ended: Vec<(StreamToken, Result<()>)>,
    /// Lifecycle trampoline slots freed by a deregistration off the loop, by
    /// connection key.
    pub(crate) released: Vec<(usize, usize)>,
    /// Remote lifecycle registrations the daemon answered: subscription, its
    /// connection and slot, libvirt's callback id.
    pub(crate) registered: Vec<(u64, Connect, usize, Result<i32>)>,
    /// Panics on worker threads, to return from the reactor's `run_once`.
    pub(crate) panics: Vec<Error>,
}

impl News {
    fn is_empty(&self) -> bool {
        self.streams.is_empty()
            && self.closed.is_empty()
            && self.lifecycle.is_empty()
            && self.flush.is_empty()
            && self.send_failed.is_empty()
            && self.ended.is_empty()
            && self.released.is_empty()
            && self.registered.is_empty()
            && self.panics.is_empty()
    }
}

/// One reactor's inbox, shared with the callbacks and threads that write to it.
pub(crate) struct Inbox {
    news: Mutex<News>,
    /// Set under the lock whenever something is recorded: lets the loop skip the
    /// lock on the many iterations that bring no news.
    has_news: AtomicBool,
    waker: Waker,
}

impl Inbox {
    pub(crate) fn new(waker: Waker) -> Arc<Inbox> {
        Arc::new(Inbox {
            news: Mutex::new(News::default()),
            has_news: AtomicBool::new(false),
            waker,
        })
    }

    /// Records news from a callback running on the loop thread, which reads the
    /// inbox right after the iteration: no wake-up needed.
    pub(crate) fn record(&self, f: impl FnOnce(&mut News)) {
        let mut news = lock(&self.news);
        f(&mut news);
        self.has_news.store(true, Ordering::Release);
    }

    /// Records news from any thread and wakes the loop.
    pub(crate) fn post(&self, f: impl FnOnce(&mut News)) {
        self.record(f);
        self.waker.wake();
    }

    /// Moves everything recorded so far into `into` (which must be empty), leaving
    /// `into`'s old allocations behind for reuse.
    pub(crate) fn take(&self, into: &mut News) {
        debug_assert!(into.is_empty());
        if !self.has_news() {
            return;
        }
        let mut news = lock(&self.news);
        self.has_news.store(false, Ordering::Relaxed);
        std::mem::swap(&mut *news, into);
    }

    /// Whether news is waiting, so the next poll must not sleep.
    pub(crate) fn has_news(&self) -> bool {
        self.has_news.load(Ordering::Acquire)
    }

    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("has_news", &self.has_news())
            .finish_non_exhaustive()
    }
}
