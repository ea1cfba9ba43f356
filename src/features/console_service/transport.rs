//! What the service needs of a viewer's connection, whatever carries it.

use std::io;

/// A viewer's connection: a Unix or TCP socket, or a WebSocket.
///
/// `read` gives the viewer's input (`Ok(0)` at its end, `WouldBlock` when nothing
/// is there now); `write` takes output (`WouldBlock` when full: wait for WRITABLE);
/// `flush` pushes out what the transport itself buffers (`WouldBlock` if it cannot
/// yet).
pub(crate) trait Transport: io::Read + io::Write + Send {
    /// The source to register, READABLE | WRITABLE; edge-triggered, so callers read
    /// and write until `WouldBlock`.
    fn source(&mut self) -> &mut dyn mio::event::Source;
    /// `"unix"`, `"tcp"` or `"web"`, for status.
    fn kind(&self) -> &'static str;
}

impl Transport for mio::net::UnixStream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        self
    }
    fn kind(&self) -> &'static str {
        "unix"
    }
}

impl Transport for mio::net::TcpStream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        self
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
}
