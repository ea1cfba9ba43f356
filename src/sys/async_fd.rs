//! The loop's epoll fd registered with tokio (feature `tokio`).
//!
//! `AsyncFd::register` is `unsafe` because tokio cannot know how long a raw fd stays
//! open. So tokio gets its own duplicate of the fd, which it owns: the same epoll
//! instance, open exactly as long as the `AsyncFd`.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// Registers a duplicate of `fd` (open for the duration of the call) with the
/// current tokio runtime, for readability.
pub(crate) fn register(fd: RawFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the caller's fd is open during this call; only a duplicate is kept.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: `owned` is an open fd owned by the AsyncFd from here on, so it stays
    // open and the same file for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}
