//! Opening connections in the right order (after the event loop is registered), with
//! keepalive on, so that a frozen daemon is noticed.

use std::time::Duration;

use virt::connect::Connect;

use crate::sys::event_impl::{self, Registered};
use crate::vocab::error::{Error, Result};

/// Client keepalive of a remote connection ([`connect_with`]): a ping after
/// `interval` without traffic from the daemon, and the connection closed as lost
/// after `count` unanswered pings, about `interval × (count + 1)` after the daemon
/// stopped answering.
///
/// Without it a frozen daemon (stopped, deadlocked, its host gone) is never noticed:
/// every call on the connection, and every stream on it, waits for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    /// Idle time before a ping; whole seconds, at least one.
    pub interval: Duration,
    /// Unanswered pings before the connection is closed.
    pub count: u32,
}

impl KeepAlive {
    /// What [`connect`] sets: a ping after 5 s, lost after 3 unanswered (about 20 s).
    pub const DEFAULT: KeepAlive = KeepAlive {
        interval: Duration::from_secs(5),
        count: 3,
    };
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive::DEFAULT
    }
}

/// Opens a libvirt connection with [`KeepAlive::DEFAULT`]: see [`connect_with`].
///
/// # Errors
///
/// As [`connect_with`].
#[doc(alias = "virConnectOpen")]
pub fn connect(uri: &str) -> Result<Connect> {
    connect_with(uri, Some(KeepAlive::DEFAULT))
}

/// Opens a libvirt connection, refusing to do so before [`crate::Reactor::register`],
/// with client keepalive as given (`None`: off, and a frozen daemon is never noticed).
///
/// libvirt wires a connection's socket and keepalive into the event implementation
/// that is registered when the connection opens. A connection opened earlier gets no
/// events, and its keepalive cannot work, so the wrong order is an error here.
///
/// Keepalive is chosen here because libvirt ignores a later `virConnectSetKeepAlive`
/// once keepalive runs. It runs on the loop: while nothing runs the loop, a
/// connection can be closed as lost although its daemon is fine. In-process drivers
/// (`test:///`, `qemu:///embed`) have no peer to lose and get none.
///
/// # Errors
///
/// [`Error::NotRegistered`] before registration; libvirt's error if the open fails
/// (a bad URI, no daemon at the socket, refused authentication) or keepalive cannot
/// be set (an interval under one second).
#[doc(alias = "virConnectOpen")]
#[doc(alias = "virConnectSetKeepAlive")]
pub fn connect_with(uri: &str, keepalive: Option<KeepAlive>) -> Result<Connect> {
    if event_impl::registered() == Registered::Nothing {
        return Err(Error::NotRegistered);
    }
    let conn = Connect::open(Some(uri)).map_err(Error::Libvirt)?;
    if let Some(keepalive) = keepalive.filter(|_| is_remote(&conn)) {
        let interval = i32::try_from(keepalive.interval.as_secs()).unwrap_or(i32::MAX);
        conn.set_keep_alive(interval, keepalive.count)
            .map_err(Error::Libvirt)?;
    }
    Ok(conn)
}

/// Whether `conn` talks to a daemon (through libvirt's remote driver), so that its
/// calls can wait on the network. Only `test:///` and the `…:///embed` drivers run
/// inside the process.
pub(crate) fn is_remote(conn: &Connect) -> bool {
    conn.uri().map_or(true, |uri| is_remote_uri(&uri))
}

fn is_remote_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return true;
    };
    if scheme.contains('+') {
        return true; // an explicit transport: unix, tcp, ssh, tls, ...
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !authority.is_empty() {
        return true; // a host name always goes through the remote driver
    }
    let path = path.split(['?', '#']).next().unwrap_or_default();
    !(scheme == "test" || path == "embed")
}

#[cfg(test)]
mod tests {
    use super::is_remote_uri;

    #[test]
    fn in_process_drivers_are_told_apart_from_remote_ones() {
        for uri in [
            "test:///default",
            "test:///tmp/node.xml",
            "qemu:///embed?root=/tmp/x",
            "ch:///embed?root=/r",
        ] {
            assert!(!is_remote_uri(uri), "{uri}");
        }
        for uri in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///session?socket=/tmp/s",
            "test+unix:///default?socket=/tmp/s",
            "qemu+ssh://host/system",
            "test://host/default",
            "lxc:///",
            "garbage",
        ] {
            assert!(is_remote_uri(uri), "{uri}");
        }
    }
}
