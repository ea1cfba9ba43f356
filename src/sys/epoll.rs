//! Level-triggered registrations in mio's own epoll instance.
//!
//! mio registers every source edge-triggered (`EPOLLET`), while libvirt's watches are
//! level-triggered: a callback that leaves data unread must be called again on the
//! next iteration. Registering libvirt's fds without `EPOLLET`, in the epoll instance
//! that mio waits on, lets the kernel re-report a still-ready fd by itself, so a
//! dispatch costs no re-arm system call. mio still does the waiting, the waking and
//! the decoding of events: the flags below are the ones mio would set, minus
//! `EPOLLET`, so `mio::event::Event` reads them exactly as it reads its own.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use mio::{Interest, Registry, Token};

/// Adds `fd`, level-triggered, to the epoll instance behind `registry`.
pub(crate) fn register(
    registry: &Registry,
    fd: RawFd,
    token: Token,
    interest: Interest,
) -> io::Result<()> {
    control(registry, libc::EPOLL_CTL_ADD, fd, Some((token, interest)))
}

/// Changes the interest or token of a registered `fd`.
pub(crate) fn reregister(
    registry: &Registry,
    fd: RawFd,
    token: Token,
    interest: Interest,
) -> io::Result<()> {
    control(registry, libc::EPOLL_CTL_MOD, fd, Some((token, interest)))
}

/// Removes `fd` from the epoll instance.
pub(crate) fn deregister(registry: &Registry, fd: RawFd) -> io::Result<()> {
    control(registry, libc::EPOLL_CTL_DEL, fd, None)
}

fn control(
    registry: &Registry,
    op: libc::c_int,
    fd: RawFd,
    what: Option<(Token, Interest)>,
) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: what.map_or(0, |(_, interest)| flags(interest)),
        u64: what.map_or(0, |(token, _)| token.0 as u64),
    };
    // SAFETY: `registry` owns a valid epoll fd for the duration of the call, and
    // `event` is a live, initialized epoll_event (ignored by EPOLL_CTL_DEL). The fd
    // may be any number: epoll_ctl reports a bad one as EBADF.
    let result = unsafe { libc::epoll_ctl(registry.as_raw_fd(), op, fd, &mut event) };
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mio's flags for `interest` (mio 1.x, `sys/unix/selector/epoll.rs`), without EPOLLET.
fn flags(interest: Interest) -> u32 {
    let mut flags = 0;
    if interest.is_readable() {
        flags |= libc::EPOLLIN | libc::EPOLLRDHUP;
    }
    if interest.is_writable() {
        flags |= libc::EPOLLOUT;
    }
    if interest.is_priority() {
        flags |= libc::EPOLLPRI;
    }
    flags as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// The property the engine relies on: an fd left readable is reported by every
    /// poll, with no re-arm in between, and mio decodes the event as its own.
    #[test]
    fn a_still_ready_fd_is_reported_by_every_poll() {
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(8);
        let (a, mut b) = UnixStream::pair().unwrap();
        register(poll.registry(), a.as_raw_fd(), Token(7), Interest::READABLE).unwrap();
        b.write_all(b"unread").unwrap();
        for _ in 0..3 {
            poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
            let event = events.iter().next().expect("a level-triggered report");
            assert_eq!(event.token(), Token(7));
            assert!(event.is_readable());
        }
        deregister(poll.registry(), a.as_raw_fd()).unwrap();
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        assert!(events.is_empty(), "reported after deregister");
    }

    #[test]
    fn flags_match_mios_without_edge_triggering() {
        assert_eq!(
            flags(Interest::READABLE),
            (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
        );
        assert_eq!(flags(Interest::WRITABLE), libc::EPOLLOUT as u32);
        assert_eq!(flags(Interest::PRIORITY), libc::EPOLLPRI as u32);
        assert_eq!(
            flags(Interest::READABLE | Interest::WRITABLE) & libc::EPOLLET as u32,
            0
        );
    }
}
