//! What the service needs from a viewer's connection, whatever carries it (a Unix
//! socket, loopback TCP or a WebSocket).

use std::io;

/// One viewer's byte stream, non-blocking.
pub(crate) trait Transport: Send {
    /// Input from the viewer: Ok(0) at its end, WouldBlock when nothing is there now.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Output to the viewer: how much was taken; WouldBlock when full (wait WRITABLE).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Pushes out what the transport itself buffers; Ok when nothing is left.
    fn flush(&mut self) -> io::Result<()>;
    /// The mio source to register (READABLE | WRITABLE, edge-triggered: callers read/write until WouldBlock).
    fn source(&mut self) -> &mut dyn mio::event::Source;
    /// "unix", "tcp" or "web", for status.
    fn kind(&self) -> &'static str;
}
