//! Knowing, without a system call per loop iteration, whether this process is a
//! child forked after the loop was registered (its epoll instance is the parent's).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static FORKED: AtomicBool = AtomicBool::new(false);
static WATCHING: Once = Once::new();

/// Starts noting forks (`pthread_atfork`); idempotent.
pub(crate) fn watch() {
    WATCHING.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic, which is
        // async-signal-safe as a fork child handler must be.
        if unsafe { libc::pthread_atfork(None, None, Some(in_child)) } != 0 {
            log::warn!("pthread_atfork failed: use after fork will not be detected");
        }
    });
}

/// Whether this process was forked after [`watch`] from the one that called it.
pub(crate) fn is_child() -> bool {
    FORKED.load(Ordering::Relaxed)
}

extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
}
