//! [`AsyncStream`]: a reactor stream seen from async code, through two bounded
//! buffers that a handler inside the driver fills and drains.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::streams::handler::{Flow, StreamCtx, StreamEnd, StreamHandler};
use crate::streams::reactor::{Reactor, ReactorHandle};
use crate::streams::stream::{Received, Stream};
use crate::streams::token::StreamToken;
use crate::vocab::error::{Error, Result};
use crate::vocab::interest::{Interest, Readiness};
use crate::vocab::sync::lock;

/// Bytes received and not read yet, at most: beyond, the driver stops reading the
/// stream until the reader catches up (libvirt's own queue then fills, and the
/// daemon stops sending: backpressure end to end).
const RX_LIMIT: usize = 512 * 1024;
/// Bytes written and not sent yet, at most: beyond, writes are `Pending`.
const TX_LIMIT: usize = 512 * 1024;
/// libvirt's largest packet: what one read or write moves at most.
const PACKET: usize = 256 * 1024;
/// Bytes one readiness event moves at most, so that one stream cannot hold the
/// driver from the others.
const BUDGET: usize = 1024 * 1024;

/// A libvirt stream as `AsyncRead + AsyncWrite`, driven by the tokio
/// [`Driver`](super::Driver).
///
/// - Reads take what the driver has received; `Ok(0)` is the end of the stream, told
///   only once libvirt has confirmed it (`virStreamFinish`). A sparse stream's holes
///   read as zeros, or as holes through [`read_sparse`](Self::read_sparse).
/// - Writes queue up to 512 KiB, and are `Pending` beyond: backpressure holds.
///   [`write_hole`](Self::write_hole) queues a hole. `shutdown()` sends what is
///   queued, finishes the stream, and resolves with libvirt's answer.
/// - Dropping a stream that was not finished aborts it; the driver frees its slab
///   entry, libvirt's callback and its reference.
///
/// # Cancellation
///
/// No byte is lost by dropping a read or write future. A read takes bytes out of the
/// stream's buffer only when it returns them; a write puts bytes in only when it
/// returns their count, and those bytes are sent (unless the stream is aborted or
/// fails). Dropping a `shutdown()` future leaves the finish under way.
pub struct AsyncStream {
    shared: Arc<Shared>,
    token: StreamToken,
    reactor: ReactorHandle<()>,
}

enum Chunk {
    Data(Vec<u8>),
    Hole(u64),
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    rx: VecDeque<Chunk>,
    /// Data bytes in `rx`, and where the front chunk's data starts.
    rx_bytes: usize,
    rx_offset: usize,
    /// The driver stopped reading because `rx` was full.
    rx_paused: bool,
    reader: Option<Waker>,
    tx: VecDeque<Chunk>,
    tx_bytes: usize,
    tx_offset: usize,
    writer: Option<Waker>,
    /// Finish once `tx` is sent.
    shutdown: bool,
    /// How the stream ended, once it has.
    end: Option<Result<()>>,
    closer: Option<Waker>,
}

impl Inner {
    /// What the driver's handler asks libvirt for now.
    fn interest(&self) -> Interest {
        let mut interest = Interest::NONE;
        if !self.rx_paused {
            interest |= Interest::READABLE;
        }
        if !self.tx.is_empty() || self.shutdown {
            interest |= Interest::WRITABLE;
        }
        interest
    }

    fn wake_all(&mut self) {
        for waker in [self.reader.take(), self.writer.take(), self.closer.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }

    /// The stream's end as an `io::Error` (a copy: reader and writer both hear it).
    fn ended(&self) -> Option<io::Result<()>> {
        self.end
            .as_ref()
            .map(|end| end.clone().map_err(io::Error::from))
    }
}

impl AsyncStream {
    /// Inserts `stream` into `reactor` with the handler that serves it.
    pub(super) fn insert(
        reactor: &mut Reactor<()>,
        handle: ReactorHandle<()>,
        stream: Stream,
        sparse: bool,
    ) -> Result<AsyncStream> {
        let shared = Arc::new(Shared::default());
        let bridge = Bridge {
            shared: Arc::clone(&shared),
            buf: vec![0; PACKET],
            sparse,
        };
        let token = reactor.insert(stream, Interest::READABLE, bridge)?;
        Ok(AsyncStream {
            shared,
            token,
            reactor: handle,
        })
    }

    /// Asks the driver to bring the handler's interest up to date (more to write,
    /// room to read again, a finish).
    fn kick(&self) {
        let (token, shared) = (self.token, Arc::clone(&self.shared));
        let _ = self.reactor.execute(move |reactor, ()| {
            let interest = lock(&shared.inner).interest();
            // Gone already when the stream ended meanwhile: nothing to update.
            let _ = reactor.set_interest(token, interest);
        });
    }

    /// Reads data, stopping at holes: `Received::Hole(n)` for a hole of `n` bytes
    /// (of a stream inserted as sparse), `Received::Data(0)` at the end.
    ///
    /// # Errors
    ///
    /// The stream's failure: libvirt's error, or [`Error::ConnectionClosed`].
    pub async fn read_sparse(&mut self, buf: &mut [u8]) -> io::Result<Received> {
        std::future::poll_fn(|cx| self.poll_take(cx, buf, true)).await
    }

    /// Queues a hole of `length` bytes (a stream opened for sparse upload).
    ///
    /// # Errors
    ///
    /// As for writes.
    pub async fn write_hole(&mut self, length: u64) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_put(cx, Chunk::Hole(length)).map_ok(drop)).await
    }

    /// Takes what was received into `buf`: a hole as zeros, or as
    /// `Received::Hole` when `holes`.
    fn poll_take(
        &self,
        cx: &Context<'_>,
        buf: &mut [u8],
        holes: bool,
    ) -> Poll<io::Result<Received>> {
        let mut inner = lock(&self.shared.inner);
        let Inner {
            rx,
            rx_bytes,
            rx_offset,
            ..
        } = &mut *inner;
        let taken = match rx.front_mut() {
            None => None,
            Some(Chunk::Hole(length)) if holes => {
                let length = *length;
                rx.pop_front();
                Some(Received::Hole(length))
            }
            Some(Chunk::Hole(length)) => {
                let n = buf
                    .len()
                    .min(usize::try_from(*length).unwrap_or(usize::MAX));
                buf[..n].fill(0);
                *length -= n as u64;
                if *length == 0 {
                    rx.pop_front();
                }
                Some(Received::Data(n))
            }
            Some(Chunk::Data(data)) => {
                let n = buf.len().min(data.len() - *rx_offset);
                buf[..n].copy_from_slice(&data[*rx_offset..*rx_offset + n]);
                if *rx_offset + n == data.len() {
                    rx.pop_front();
                    *rx_offset = 0;
                } else {
                    *rx_offset += n;
                }
                *rx_bytes -= n;
                Some(Received::Data(n))
            }
        };
        if let Some(received) = taken {
            let resume = inner.rx_paused && inner.rx_bytes <= RX_LIMIT / 2;
            if resume {
                inner.rx_paused = false;
            }
            drop(inner);
            if resume {
                self.kick();
            }
            return Poll::Ready(Ok(received));
        }
        match inner.ended() {
            Some(Ok(())) => Poll::Ready(Ok(Received::Data(0))),
            Some(Err(e)) => Poll::Ready(Err(e)),
            None => {
                inner.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Queues `chunk` (data: as much as fits); returns the bytes taken.
    fn poll_put(&self, cx: &Context<'_>, chunk: Chunk) -> Poll<io::Result<usize>> {
        let mut inner = lock(&self.shared.inner);
        if let Some(end) = inner.ended() {
            return Poll::Ready(Err(end
                .err()
                .unwrap_or_else(|| io::Error::from(Error::StreamClosed))));
        }
        if inner.shutdown {
            return Poll::Ready(Err(io::Error::from(Error::StreamClosed)));
        }
        let room = TX_LIMIT.saturating_sub(inner.tx_bytes);
        if room == 0 {
            inner.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let was_empty = inner.tx.is_empty();
        let taken = match chunk {
            Chunk::Data(mut data) => {
                data.truncate(room);
                let n = data.len();
                inner.tx_bytes += n;
                inner.tx.push_back(Chunk::Data(data));
                n
            }
            hole @ Chunk::Hole(_) => {
                inner.tx.push_back(hole);
                0
            }
        };
        drop(inner);
        if was_empty {
            self.kick();
        }
        Poll::Ready(Ok(taken))
    }
}

impl AsyncRead for AsyncStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        match self.poll_take(cx, unfilled, false) {
            Poll::Ready(Ok(Received::Data(n))) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(Received::Hole(_))) => unreachable!("holes read as zeros here"),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for AsyncStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let fits = buf.len().min(TX_LIMIT);
        self.poll_put(cx, Chunk::Data(buf[..fits].to_vec()))
    }

    /// Ready once everything written so far has been handed to libvirt.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.shared.inner);
        if inner.tx.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(end) = inner.ended() {
            return Poll::Ready(end.and(Err(io::Error::from(Error::StreamClosed))));
        }
        inner.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Sends what is queued, finishes the stream (`virStreamFinish`) and resolves
    /// with libvirt's answer.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.shared.inner);
        if let Some(end) = inner.ended() {
            return Poll::Ready(end);
        }
        inner.closer = Some(cx.waker().clone());
        let first = !inner.shutdown;
        inner.shutdown = true;
        drop(inner);
        if first {
            self.kick();
        }
        Poll::Pending
    }
}

impl Drop for AsyncStream {
    fn drop(&mut self) {
        if lock(&self.shared.inner).end.is_some() {
            return;
        }
        let token = self.token;
        // Aborted on the driver; an unanswered abort of a remote stream runs on its
        // connection's sender thread.
        let _ = self.reactor.execute(move |reactor, state| {
            let _ = reactor.abort(token, state);
        });
    }
}

impl std::fmt::Debug for AsyncStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncStream")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// What the handler sends next.
enum Next {
    Hole(u64),
    /// This many bytes, copied into the handler's buffer.
    Data(usize),
}

/// The handler inside the driver: moves bytes between the stream and the buffers.
/// It never holds the buffers' lock across a call into libvirt.
struct Bridge {
    shared: Arc<Shared>,
    buf: Vec<u8>,
    sparse: bool,
}

impl Bridge {
    /// Receives into `rx` up to the budget or until `rx` is full.
    fn receive(&mut self, stream: &mut Stream) -> Result<Flow> {
        let mut moved = 0;
        while moved < BUDGET {
            if lock(&self.shared.inner).rx_bytes >= RX_LIMIT {
                lock(&self.shared.inner).rx_paused = true;
                break;
            }
            let got = if self.sparse {
                stream.read_sparse(&mut self.buf)
            } else {
                stream.read(&mut self.buf).map(Received::Data)
            };
            let chunk = match got {
                Ok(Received::Data(0)) => return Ok(Flow::Finish),
                Ok(Received::Data(n)) => {
                    moved += n;
                    Chunk::Data(self.buf[..n].to_vec())
                }
                Ok(Received::Hole(length)) => Chunk::Hole(length),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            let mut inner = lock(&self.shared.inner);
            if let Chunk::Data(data) = &chunk {
                inner.rx_bytes += data.len();
            }
            inner.rx.push_back(chunk);
            if let Some(reader) = inner.reader.take() {
                reader.wake();
            }
        }
        Ok(Flow::Continue)
    }

    /// Sends from `tx` up to the budget or until the stream would block; finishes
    /// once `tx` is empty after a shutdown.
    fn send(&mut self, stream: &mut Stream) -> Result<Flow> {
        let mut moved = 0;
        while moved < BUDGET {
            // Copied out, so that no lock is held while libvirt is called.
            let next = {
                let inner = lock(&self.shared.inner);
                match inner.tx.front() {
                    None if inner.shutdown => return Ok(Flow::Finish),
                    None => break,
                    Some(Chunk::Hole(length)) => Next::Hole(*length),
                    Some(Chunk::Data(data)) => {
                        let rest = &data[inner.tx_offset..];
                        let n = rest.len().min(self.buf.len());
                        self.buf[..n].copy_from_slice(&rest[..n]);
                        Next::Data(n)
                    }
                }
            };
            let sent = match next {
                Next::Hole(length) => stream.write_hole(length).map(|()| None),
                Next::Data(n) => stream.write(&self.buf[..n]).map(Some),
            };
            let sent = match sent {
                Ok(sent) => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            let mut inner = lock(&self.shared.inner);
            match sent {
                None => {
                    inner.tx.pop_front();
                }
                Some(n) => {
                    moved += n;
                    inner.tx_bytes -= n;
                    inner.tx_offset += n;
                    let done = matches!(inner.tx.front(), Some(Chunk::Data(d)) if d.len() == inner.tx_offset);
                    if done {
                        inner.tx.pop_front();
                        inner.tx_offset = 0;
                    }
                }
            }
            if let Some(writer) = inner.writer.take() {
                writer.wake();
            }
        }
        Ok(Flow::Continue)
    }
}

/// A handler dropped without hearing its end (the driver ended, or the handler
/// panicked) still ends its stream for the async side: nobody waits forever.
impl Drop for Bridge {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared.inner);
        if inner.end.is_none() {
            inner.end = Some(Err(Error::ReactorGone));
            inner.wake_all();
        }
    }
}

impl StreamHandler<()> for Bridge {
    fn ready(&mut self, (): &mut (), cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let mut flow = Ok(Flow::Continue);
        if readiness.is_readable() || readiness.is_error() || readiness.is_hangup() {
            flow = self.receive(cx);
        }
        if matches!(flow, Ok(Flow::Continue)) && readiness.is_writable() {
            flow = self.send(cx);
        }
        match flow {
            Ok(Flow::Continue) => {
                let interest = lock(&self.shared.inner).interest();
                cx.set_interest(interest);
                Flow::Continue
            }
            Ok(flow) => flow,
            Err(e) => Flow::Fail(e),
        }
    }

    fn closed(&mut self, (): &mut (), end: StreamEnd) {
        let end = match end {
            StreamEnd::Finished => Ok(()),
            StreamEnd::Failed(e) => Err(e),
            StreamEnd::Aborted | StreamEnd::Removed(_) => Err(Error::Aborted),
        };
        let mut inner = lock(&self.shared.inner);
        inner.end = Some(end);
        inner.wake_all();
    }
}
