//! Opening connections in the right order: after the event loop is registered.

use virt::connect::Connect;

use crate::engine;
use crate::error::{Error, Result};

/// Opens a libvirt connection, refusing to do so before [`crate::EventLoop::register`].
///
/// libvirt wires a connection's socket and keepalive into the event implementation
/// that is registered when the connection opens. A connection opened earlier gets no
/// events, and its keepalive cannot work, so the wrong order is an error here.
///
/// # Errors
///
/// [`Error::NotRegistered`] before registration; libvirt's error if the open fails
/// (a bad URI, no daemon at the socket, refused authentication).
#[doc(alias = "virConnectOpen")]
pub fn connect(uri: &str) -> Result<Connect> {
    if engine::get().is_none() {
        return Err(Error::NotRegistered);
    }
    Connect::open(Some(uri)).map_err(Error::Libvirt)
}
