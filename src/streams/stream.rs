//! [`Stream`]: a non-blocking libvirt stream that is `io::Read` and `io::Write`.
//!
//! libvirt's return codes become Rust values at this edge: -2 is
//! [`io::ErrorKind::WouldBlock`] (never an error to give up on), 0 from a read is
//! the end of the stream, -3 is a hole of a sparse stream, and -1 is libvirt's error,
//! carried inside the `io::Error` as [`crate::Error::Libvirt`] (`?` into the crate's
//! [`Result`](crate::Result) unwraps it again).

use std::fmt;
use std::io;

use virt::connect::Connect;

use super::lane::{LaneStream, Then};
use crate::event_loop::connect::is_remote;
use crate::sys::connection::connection_key;
use crate::sys::stream::RawStream;
use crate::vocab::error::{Error, Result};

/// A `VIR_STREAM_NONBLOCK` stream.
///
/// Attach it to what it carries with the `virt` call that takes a stream (through
/// [`Stream::with_virt`]), then hand it to a [`Reactor`](crate::Reactor). Reads and
/// writes are `io::Read` and `io::Write`, non-blocking. Dropping a stream that is
/// neither finished nor aborted aborts it; dropping never panics.
///
/// # Sends on remote connections
///
/// libvirt's remote client never answers a send with -2: it waits until the packet
/// is on the socket, however long the daemon takes to read it. Once a stream of a
/// remote connection is in a [`Reactor`](crate::Reactor), its sends, holes, finish
/// and abort go through its connection's sender thread instead: [`send`](Self::send)
/// queues up to two packets and answers `WouldBlock` beyond, so the loop thread
/// never waits for the daemon. Outside a reactor, and on in-process drivers
/// (`test:///`, `qemu:///embed`), the calls go straight to libvirt.
pub struct Stream {
    raw: RawStream,
    /// `None` only while dropping, when a lane takes it to close off the loop.
    conn: Option<Connect>,
    remote: bool,
    active: bool,
    lane: Option<LaneStream>,
}

/// What one sparse-aware read got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes of data were written to the buffer; 0 is the end of the
    /// stream, as with `io::Read`.
    Data(usize),
    /// The stream is at a hole of this many bytes (already consumed).
    Hole(u64),
}

impl Stream {
    /// A new non-blocking stream on `conn`.
    ///
    /// # Errors
    ///
    /// libvirt's error (for example a closed connection).
    #[doc(alias = "virStreamNew")]
    pub fn new(conn: &Connect) -> Result<Stream> {
        Ok(Stream {
            raw: RawStream::new_nonblocking(conn)?,
            conn: Some(conn.clone()),
            remote: is_remote(conn),
            active: true,
            lane: None,
        })
    }

    /// The connection the stream belongs to.
    pub fn connection(&self) -> &Connect {
        self.conn.as_ref().expect("the connection stays until drop")
    }

    /// Calls `f` with a `virt` handle on this stream, to attach it with the `virt`
    /// call that takes one: `StorageVol::download`, `Domain::open_console`, ...
    ///
    /// It takes `&mut self`, which only the stream's owner has: a stream inside a
    /// [`Reactor`](crate::Reactor) cannot be reached this way, so its event callback
    /// cannot be taken from under the reactor.
    pub fn with_virt<R>(&mut self, f: impl FnOnce(&virt::stream::Stream) -> R) -> R {
        self.raw.with_virt(f)
    }

    /// Reads data, stopping at holes: a hole is reported (and consumed) as
    /// [`Received::Hole`] instead of being read as zeros. `Data(0)` is the end.
    ///
    /// # Errors
    ///
    /// As for `io::Read::read`.
    #[doc(alias = "virStreamRecvFlags")]
    #[doc(alias = "virStreamRecvHole")]
    pub fn read_sparse(&mut self, buf: &mut [u8]) -> io::Result<Received> {
        receive(&self.raw, buf, true)
    }

    /// Writes a hole of `length` bytes.
    ///
    /// # Errors
    ///
    /// `WouldBlock` when a remote stream's queue is full; libvirt's error, e.g. when
    /// the stream was not opened for sparse transfer.
    #[doc(alias = "virStreamSendHole")]
    pub fn write_hole(&mut self, length: u64) -> io::Result<()> {
        if let Some(lane) = &self.lane {
            return lane.send_hole(length);
        }
        Ok(self.raw.send_hole(length)?)
    }

    /// Completes the transfer: confirms that every byte arrived. Remove any event
    /// callback first (the reactor does). On a remote connection this waits for the
    /// daemon's answer (and for queued sends): the reactor's [`Flow::Finish`](crate::Flow)
    /// does not.
    ///
    /// # Errors
    ///
    /// libvirt's error: the transfer failed on the other side.
    #[doc(alias = "virStreamFinish")]
    pub fn finish(&mut self) -> io::Result<()> {
        Ok(self.end(false)?)
    }

    /// Abandons the transfer. On a remote connection this waits for the daemon's
    /// answer: the reactor's [`Flow::Abort`](crate::Flow) does not.
    ///
    /// # Errors
    ///
    /// libvirt's error (the stream is then unusable anyway).
    #[doc(alias = "virStreamAbort")]
    pub fn abort(&mut self) -> io::Result<()> {
        Ok(self.end(true)?)
    }

    fn end(&mut self, abort: bool) -> Result<()> {
        self.active = false;
        let Some(lane) = &self.lane else {
            return if abort {
                self.raw.abort()
            } else {
                self.raw.finish()
            };
        };
        let (reply, result) = crossbeam_channel::bounded(1);
        lane.end(abort, Then::Reply(reply));
        result.recv().unwrap_or(Err(Error::StreamClosed))
    }

    /// Neither finished nor aborted yet.
    pub fn is_active(&self) -> bool {
        self.active
    }

    pub(crate) fn raw(&self) -> &RawStream {
        &self.raw
    }

    /// Identifies the connection, to group streams by it.
    pub(crate) fn connection_key(&self) -> usize {
        connection_key(self.connection())
    }

    /// Whether libvirt's client may block in this stream's sends (see the type's docs).
    pub(crate) fn is_remote(&self) -> bool {
        self.remote
    }

    pub(crate) fn lane(&self) -> Option<&LaneStream> {
        self.lane.as_ref()
    }

    pub(crate) fn set_lane(&mut self, lane: LaneStream) {
        self.lane = Some(lane);
    }

    /// Hands the stream's end to its lane (which must exist): `then` hears the
    /// result, and gets the stream to drop off the loop.
    pub(crate) fn end_on_lane(mut self, abort: bool, then: impl FnOnce(Box<dyn Send>) -> Then) {
        self.active = false;
        let lane = self.lane.take().expect("a laned stream");
        lane.end(abort, then(Box::new(self)));
    }

    /// Hands `data` whole to the stream's sender thread without a copy, when the
    /// stream has one (a remote stream in a reactor) with room for all of it: true
    /// then, and `data` is left empty. False, with nothing taken, otherwise.
    pub(crate) fn write_owned(&mut self, data: &mut Vec<u8>) -> io::Result<bool> {
        match &self.lane {
            Some(lane) => lane.send_owned(data),
            None => Ok(false),
        }
    }

    fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(lane) = &self.lane {
            return lane.send(buf);
        }
        match self.raw.send(buf) {
            n if n >= 0 => Ok(n as usize),
            -2 => Err(io::ErrorKind::WouldBlock.into()),
            _ => Err(libvirt_io_error()),
        }
    }

    /// Another reference to the stream, to receive on from any thread.
    pub(crate) fn receiver(&self) -> Receiver {
        Receiver(self.raw.new_ref())
    }
}

/// Receives on a stream from outside the loop (libvirt's receives are thread-safe
/// and, on a NONBLOCK stream, never wait, remote or not), while the stream itself
/// is in a reactor. Holds a reference of its own, released when dropped.
pub(crate) struct Receiver(RawStream);

impl Receiver {
    /// As [`Stream::read_sparse`] when `holes`; else holes read as zeros.
    pub(crate) fn read(&self, buf: &mut [u8], holes: bool) -> io::Result<Received> {
        receive(&self.0, buf, holes)
    }
}

/// One receive, libvirt's codes as values: `Data(0)` the end, `WouldBlock` for -2,
/// a hole for -3 (asked for with `holes` only).
fn receive(raw: &RawStream, buf: &mut [u8], holes: bool) -> io::Result<Received> {
    match raw.recv(buf, holes) {
        n if n >= 0 => Ok(Received::Data(n as usize)),
        -2 => Err(io::ErrorKind::WouldBlock.into()),
        -3 if holes => Ok(Received::Hole(raw.recv_hole()?)),
        _ => Err(libvirt_io_error()),
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        match &self.lane {
            // Off the loop: the abort waits for the daemon, and so may the close of
            // the connection if this was its last reference.
            Some(lane) => lane.end(true, Then::Release(self.conn.take())),
            None => {
                let aborted = self.raw.abort();
                if let Err(e) = aborted {
                    log::debug!("aborting a dropped stream: {e}");
                }
            }
        }
    }
}

/// Reads up to `buf.len()` bytes; `Ok(0)` is the end of the stream. Holes of a
/// sparse stream read as zeros. `WouldBlock` when no data is pending.
impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match receive(&self.raw, buf, false)? {
            Received::Data(n) => Ok(n),
            Received::Hole(_) => unreachable!("holes read as zeros without STOP_AT_HOLE"),
        }
    }
}

/// Writes up to `buf.len()` bytes. `WouldBlock` when the stream cannot take data
/// now. `flush` does nothing: [`Stream::finish`] confirms delivery.
impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_now(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

fn libvirt_io_error() -> io::Error {
    io::Error::other(Error::last_libvirt())
}
