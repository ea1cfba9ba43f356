//! The handle table: libvirt's fd watches, and the one epoll registration per fd that
//! serves all the watches sharing it.
//!
//! epoll refuses a second registration of the same fd, while libvirt allows several
//! watches on one fd. So each fd has one [`FdEntry`] registered with the union of its
//! enabled watches' interests, and readiness is fanned out to each watch, masked by
//! what that watch asked for. ERROR and HANGUP go to every enabled watch.
//!
//! Registrations are level-triggered ([`crate::sys::epoll`]), as libvirt's watches
//! are, in the epoll instance mio polls.

use std::io;
use std::os::fd::RawFd;

use mio::{Interest as MioInterest, Registry, Token};
use rustc_hash::FxHashMap;

use super::ids::IdAllocator;
use crate::sys::callback::{FreeCallback, HandleCallback};
use crate::sys::epoll;
use crate::vocab::interest::{Interest, Readiness};

/// One libvirt watch.
pub(super) struct Watch {
    pub(super) fd: RawFd,
    /// What libvirt asked for; NONE means disabled (not polled at all).
    pub(super) interest: Interest,
    pub(super) callback: HandleCallback,
    pub(super) free: Option<FreeCallback>,
}

/// One fd as mio sees it.
struct FdEntry {
    /// Watch ids on this fd, in registration order (dispatch follows it).
    watches: Vec<i32>,
    /// What the fd is registered for in epoll, `None` when it is not registered.
    registered: Option<MioInterest>,
    /// Bumped on every fresh registration, so events from an older one are dropped.
    generation: u32,
}

/// A watch that is due a callback: copied out of the table so the lock can be released.
#[derive(Clone, Copy)]
pub(crate) struct ReadyWatch {
    pub(crate) id: i32,
    pub(crate) fd: RawFd,
    pub(crate) readiness: Readiness,
}

#[derive(Default)]
pub(super) struct HandleTable {
    watches: FxHashMap<i32, Watch>,
    fds: FxHashMap<RawFd, FdEntry>,
    ids: IdAllocator,
    next_generation: u32,
}

impl HandleTable {
    pub(super) fn len(&self) -> usize {
        self.watches.len()
    }

    pub(super) fn enabled(&self) -> usize {
        self.watches
            .values()
            .filter(|w| !w.interest.is_empty())
            .count()
    }

    pub(super) fn add(
        &mut self,
        registry: &Registry,
        fd: RawFd,
        interest: Interest,
        callback: HandleCallback,
        free: Option<FreeCallback>,
    ) -> io::Result<i32> {
        let id = self.ids.next(|id| self.watches.contains_key(&id));
        let watch = Watch {
            fd,
            interest,
            callback,
            free,
        };
        self.watches.insert(id, watch);
        let entry = self.fds.entry(fd).or_insert_with(|| FdEntry {
            watches: Vec::new(),
            registered: None,
            generation: 0,
        });
        entry.watches.push(id);
        if let Err(e) = self.sync_fd(registry, fd) {
            self.take(registry, id);
            return Err(e);
        }
        Ok(id)
    }

    /// Sets a watch's interest. Returns false for an unknown id.
    pub(super) fn update(&mut self, registry: &Registry, id: i32, interest: Interest) -> bool {
        let Some(watch) = self.watches.get_mut(&id) else {
            return false;
        };
        watch.interest = interest;
        let fd = watch.fd;
        if let Err(e) = self.sync_fd(registry, fd) {
            log::warn!("watch {id}: cannot poll fd {fd}: {e}");
        }
        true
    }

    /// Removes a watch and gives it back (its free callback still to run).
    pub(super) fn take(&mut self, registry: &Registry, id: i32) -> Option<Watch> {
        let watch = self.watches.remove(&id)?;
        let entry = self
            .fds
            .get_mut(&watch.fd)
            .expect("every watch has an fd entry");
        entry.watches.retain(|&w| w != id);
        if entry.watches.is_empty() {
            let entry = self.fds.remove(&watch.fd).expect("present");
            if entry.registered.is_some() {
                // The owner may already have closed the fd; epoll then forgot it itself.
                if let Err(e) = epoll::deregister(registry, watch.fd) {
                    log::debug!("fd {}: deregister: {e} (already closed?)", watch.fd);
                }
            }
        } else if let Err(e) = self.sync_fd(registry, watch.fd) {
            log::warn!("fd {}: cannot update polling: {e}", watch.fd);
        }
        Some(watch)
    }

    pub(super) fn callback(&self, id: i32) -> Option<(HandleCallback, Interest)> {
        self.watches.get(&id).map(|w| (w.callback, w.interest))
    }

    /// Appends the watches an epoll event makes due, masked per watch.
    pub(super) fn collect_ready(
        &self,
        token: Token,
        readiness: Readiness,
        out: &mut Vec<ReadyWatch>,
    ) {
        let (fd, generation) = decode(token);
        let Some(entry) = self.fds.get(&fd) else {
            return;
        };
        if generation.is_some_and(|g| g != entry.generation) || entry.registered.is_none() {
            return; // a stale event from a registration that no longer exists
        }
        for &id in &entry.watches {
            let watch = &self.watches[&id];
            let readiness = readiness.for_watch(watch.interest);
            if !readiness.is_empty() {
                out.push(ReadyWatch { id, fd, readiness });
            }
        }
    }

    /// Makes epoll's registration of `fd` match the union of its enabled watches.
    fn sync_fd(&mut self, registry: &Registry, fd: RawFd) -> io::Result<()> {
        let entry = self.fds.get_mut(&fd).expect("fd entry exists");
        let union = entry
            .watches
            .iter()
            .fold(Interest::NONE, |acc, id| acc | self.watches[id].interest);
        let wanted = mio_interest(union);
        match (entry.registered, wanted) {
            (None, None) => Ok(()),
            (Some(_), None) => {
                entry.registered = None;
                epoll::deregister(registry, fd).or_else(ignore_closed)
            }
            (Some(_), Some(interest)) => {
                let token = encode(fd, entry.generation);
                match epoll::reregister(registry, fd, token, interest) {
                    Ok(()) => {
                        entry.registered = Some(interest);
                        Ok(())
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        entry.registered = None;
                        self.sync_fd(registry, fd)
                    }
                    Err(e) => Err(e),
                }
            }
            (None, Some(interest)) => {
                self.next_generation = self.next_generation.wrapping_add(1);
                entry.generation = self.next_generation;
                let token = encode(fd, entry.generation);
                match epoll::register(registry, fd, token, interest) {
                    // Someone registered this fd number outside our bookkeeping (a
                    // closed-then-reused fd): take the registration over.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        epoll::reregister(registry, fd, token, interest)
                    }
                    other => other,
                }?;
                entry.registered = Some(interest);
                Ok(())
            }
        }
    }
}

fn ignore_closed(e: io::Error) -> io::Result<()> {
    match e.raw_os_error() {
        Some(libc::EBADF) | Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    }
}

/// The mio interest for libvirt event bits; `None` means "do not poll at all".
///
/// A watch that asks only for ERROR or HANGUP is registered for PRIORITY: epoll always
/// reports EPOLLERR and EPOLLHUP, and mio cannot express an empty interest.
fn mio_interest(interest: Interest) -> Option<MioInterest> {
    match (interest.is_readable(), interest.is_writable()) {
        (true, true) => Some(MioInterest::READABLE | MioInterest::WRITABLE),
        (true, false) => Some(MioInterest::READABLE),
        (false, true) => Some(MioInterest::WRITABLE),
        (false, false) if !interest.is_empty() => Some(MioInterest::PRIORITY),
        (false, false) => None,
    }
}

/// A token carries the fd (32 bits) and, where `usize` has 64 bits, the registration
/// generation above it. On narrower targets it carries the fd alone, and events of
/// an older registration are told apart only by it having been deregistered.
fn encode(fd: RawFd, generation: u32) -> Token {
    let raw = pack(usize::BITS, fd, generation);
    Token(usize::try_from(raw).expect("packed for usize's width"))
}

/// The fd and, where the token has room for it, the generation.
fn decode(token: Token) -> (RawFd, Option<u32>) {
    unpack(
        usize::BITS,
        u64::try_from(token.0).expect("usize has at most 64 bits"),
    )
}

/// A token's bits for a `usize` of `width` bits.
fn pack(width: u32, fd: RawFd, generation: u32) -> u64 {
    let fd = u64::from(fd.unsigned_abs());
    if width >= 64 {
        fd | (u64::from(generation) << 32)
    } else {
        fd
    }
}

fn unpack(width: u32, raw: u64) -> (RawFd, Option<u32>) {
    let fd = RawFd::try_from(raw & u64::from(u32::MAX)).unwrap_or(RawFd::MAX);
    let generation = (width >= 64).then(|| u32::try_from(raw >> 32).unwrap_or(u32::MAX));
    (fd, generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for (fd, generation) in [(0, 1), (7, u32::MAX), (i32::MAX, 12345)] {
            assert_eq!(decode(encode(fd, generation)), (fd, Some(generation)));
        }
    }

    /// The old encoding shifted a `usize` by 32, which panics (debug) or loses the
    /// fd (release) where `usize` has 32 bits. Both widths are checked here, on
    /// whatever this host is.
    #[test]
    fn tokens_fit_a_32_bit_usize_and_keep_the_fd() {
        for (fd, generation) in [(0, 1), (7, u32::MAX), (i32::MAX, 12345)] {
            let narrow = pack(32, fd, generation);
            assert!(narrow <= u64::from(u32::MAX), "fits a 32-bit usize");
            assert_eq!(unpack(32, narrow), (fd, None));
            assert_eq!(unpack(64, pack(64, fd, generation)), (fd, Some(generation)));
        }
    }

    #[test]
    fn interest_union_maps_to_mio() {
        let from = Interest::from_raw;
        assert_eq!(mio_interest(from(0)), None);
        assert_eq!(mio_interest(from(1)), Some(MioInterest::READABLE));
        assert_eq!(mio_interest(from(2)), Some(MioInterest::WRITABLE));
        assert_eq!(
            mio_interest(from(3)),
            Some(MioInterest::READABLE | MioInterest::WRITABLE)
        );
        assert_eq!(mio_interest(from(8)), Some(MioInterest::PRIORITY));
        assert_eq!(mio_interest(from(4 | 1)), Some(MioInterest::READABLE));
    }
}
