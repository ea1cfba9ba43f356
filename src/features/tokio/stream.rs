//! [`AsyncStream`]: a reactor stream seen from async code. Reads receive from
//! libvirt in the reading task itself, woken by the stream's callback; writes go
//! through a bounded queue that a handler inside the driver drains.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::streams::handler::{Flow, StreamCtx, StreamEnd, StreamHandler};
use crate::streams::reactor::{Reactor, ReactorHandle};
use crate::streams::stream::{Received, Receiver, Stream};
use crate::streams::token::StreamToken;
use crate::vocab::error::{Error, Result};
use crate::vocab::interest::{Interest, Readiness};
use crate::vocab::sync::lock;

/// Bytes written and not handed to libvirt yet, at most: beyond, writes are
/// `Pending`. One packet: the connection's sender thread holds the packets before it,
/// so an upload keeps three buffers in flight (the writer's, this one, the lane's),
/// where a deeper queue only held more memory and faulted more pages in.
const TX_LIMIT: usize = PACKET;
/// libvirt's largest packet: what one read or write moves at most.
const PACKET: usize = 256 * 1024;
/// Bytes one writable event sends at most, so that one stream cannot hold the
/// driver from the others.
const SEND_BUDGET: usize = 1024 * 1024;
/// Data buffers kept for reuse per stream, at most (see `Inner::spare`).
const SPARE: usize = 2;

/// A libvirt stream as `AsyncRead + AsyncWrite`, driven by the tokio
/// [`Driver`](super::Driver).
///
/// - Reads receive from libvirt directly into the caller's buffer (`AsyncRead`), or
///   into the stream's own buffer, lent in place (`AsyncBufRead`: `fill_buf` /
///   `consume`); the driver only wakes the reading task. Nothing is received that
///   is not read: backpressure holds end to end (libvirt's queue fills, and the
///   daemon stops sending). `Ok(0)` is the end of the stream, told only once libvirt
///   has confirmed it (`virStreamFinish`). A sparse stream's holes read as zeros, or
///   as holes through [`read_sparse`](Self::read_sparse).
/// - Writes queue up to 256 KiB, and are `Pending` beyond: backpressure holds.
///   [`write_owned`](Self::write_owned) queues a buffer without the copy
///   `AsyncWrite` makes, and [`write_hole`](Self::write_hole) a hole. `shutdown()`
///   sends what is queued, finishes the stream, and resolves with libvirt's answer.
/// - Dropping a stream that was not finished aborts it; the driver frees its slab
///   entry, libvirt's callback and its reference.
///
/// # Cancellation
///
/// No byte is lost by dropping a read or write future. A read receives bytes only in
/// the poll that returns them; a write puts bytes in only when it returns their
/// count (`write_owned`: when it resolves), and those bytes are sent (unless the
/// stream is aborted or fails). Dropping a `shutdown()` future leaves the finish
/// under way.
pub struct AsyncStream {
    shared: Arc<Shared>,
    token: StreamToken,
    reactor: ReactorHandle<()>,
    receiver: Receiver,
    buffers: Arc<ReceiveBuffers>,
    /// What `poll_fill_buf` received, unread from `held_start` to `held_end`: a
    /// buffer of `buffers` while it holds bytes, else empty.
    held: Vec<u8>,
    held_start: usize,
    held_end: usize,
}

enum Chunk {
    Data(Vec<u8>),
    Hole(u64),
}

/// How the stream's receiving stands, between the reader and the driver.
#[derive(Default)]
enum Receiving {
    /// libvirt is asked for READABLE, which wakes the reader.
    #[default]
    On,
    /// Not asked: the event came while no reader waited, and, level-triggered, it
    /// would come again at every turn until the reader has read what there is.
    Paused,
    /// The reader met the end (`Ok`) or a failure: the driver ends the stream with
    /// it (taken then).
    Over(Option<Result<()>>),
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    receiving: Receiving,
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
    /// Sent data buffers, for the next writes: a stream in full flow then allocates
    /// nothing (a fresh 256 KiB buffer is an `mmap` and its page faults each time).
    spare: Vec<Vec<u8>>,
}

/// Receive buffers shared by the streams of one driver. A stream holds one only
/// while it lends received bytes (`fill_buf` until they are consumed) and then gives
/// it back, so that the next stream to receive writes into memory still in the
/// cache, as the mio path's handlers do with the reactor's one scratch buffer.
#[derive(Default)]
pub(super) struct ReceiveBuffers(Mutex<Vec<Vec<u8>>>);

/// Receive buffers kept for reuse, at most.
const KEPT: usize = 4;

impl std::fmt::Debug for ReceiveBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveBuffers")
            .field("kept", &lock(&self.0).len())
            .finish()
    }
}

impl ReceiveBuffers {
    fn take(&self) -> Vec<u8> {
        lock(&self.0).pop().unwrap_or_else(|| vec![0; PACKET])
    }

    fn give(&self, buf: Vec<u8>) {
        let mut kept = lock(&self.0);
        if kept.len() < KEPT {
            kept.push(buf);
        }
    }
}

/// Keeps `buf` in `spare` for reuse if it is a full-size buffer and there is room.
fn recycle(spare: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spare.len() < SPARE && (PACKET / 2..=PACKET).contains(&buf.capacity()) {
        spare.push(buf);
    }
}

impl Inner {
    /// What the driver's handler asks libvirt for now.
    fn interest(&self) -> Interest {
        let mut interest = Interest::NONE;
        if matches!(self.receiving, Receiving::On) {
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
        buffers: Arc<ReceiveBuffers>,
        stream: Stream,
    ) -> Result<AsyncStream> {
        let shared = Arc::new(Shared::default());
        let receiver = stream.receiver();
        let bridge = Bridge {
            shared: Arc::clone(&shared),
            recycling: false,
        };
        let token = reactor.insert(stream, Interest::READABLE, bridge)?;
        Ok(AsyncStream {
            shared,
            token,
            reactor: handle,
            receiver,
            buffers,
            held: Vec::new(),
            held_start: 0,
            held_end: 0,
        })
    }

    /// Asks the driver to act on what the stream's tasks changed: end the stream the
    /// reader saw end or fail, or bring the handler's interest up to date (more to
    /// write, reading again, a finish).
    fn kick(&self) {
        let (token, shared) = (self.token, Arc::clone(&self.shared));
        let _ = self.reactor.execute(move |reactor, ()| {
            let mut inner = lock(&shared.inner);
            let over = match &mut inner.receiving {
                Receiving::Over(over) => over.take(),
                _ => None,
            };
            let interest = inner.interest();
            drop(inner);
            // Gone already when the stream ended meanwhile: nothing to do.
            let _ = match over {
                Some(Ok(())) => reactor.finish(token, &mut ()),
                Some(Err(e)) => reactor.fail(token, e, &mut ()),
                None => reactor.set_interest(token, interest),
            };
        });
    }

    /// Reads data, stopping at holes: `Received::Hole(n)` for a hole of `n` bytes
    /// (of a stream opened for sparse download), `Received::Data(0)` at the end.
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
        std::future::poll_fn(|cx| self.poll_put(cx, &mut Put::Hole(length)).map_ok(drop)).await
    }

    /// Queues all of `buf` as it is, without the copy `AsyncWrite` makes, once there is
    /// room; resolves with a buffer to fill next: one this stream has sent, when there
    /// is one (its old bytes still in it, to overwrite: no allocation, no zeroing),
    /// else an empty one. A buffer of up to 256 KiB (libvirt's packet) goes to
    /// libvirt whole; a longer one in pieces.
    ///
    /// Dropped before it resolves, it has queued nothing (and drops `buf`).
    ///
    /// # Errors
    ///
    /// As for writes.
    pub async fn write_owned(&mut self, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        if buf.is_empty() {
            return Ok(buf);
        }
        let mut put = Put::Owned(Some(buf));
        std::future::poll_fn(|cx| self.poll_put(cx, &mut put)).await?;
        match put {
            Put::Owned(Some(next)) => Ok(next),
            _ => Ok(Vec::new()),
        }
    }

    /// The bytes `poll_fill_buf` received and `consume` has not taken yet.
    fn held(&self) -> &[u8] {
        &self.held[self.held_start..self.held_end]
    }

    /// Marks `n` more held bytes read; the buffer goes back once all are.
    fn consume_held(&mut self, n: usize) {
        self.held_start = self.held_end.min(self.held_start + n);
        if self.held_start == self.held_end && !self.held.is_empty() {
            self.buffers.give(std::mem::take(&mut self.held));
        }
    }

    /// Receives into `buf` (a hole as zeros, or as `Received::Hole` when `holes`),
    /// or, when libvirt has nothing yet, waits to be woken by the stream's callback.
    fn poll_take(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
        holes: bool,
    ) -> Poll<io::Result<Received>> {
        if buf.is_empty() {
            // libvirt would answer 0, which is its end of stream.
            return Poll::Ready(Ok(Received::Data(0)));
        }
        if self.held_start < self.held_end {
            let n = buf.len().min(self.held_end - self.held_start);
            buf[..n].copy_from_slice(&self.held()[..n]);
            self.consume_held(n);
            return Poll::Ready(Ok(Received::Data(n)));
        }
        {
            let mut inner = lock(&self.shared.inner);
            match inner.ended() {
                Some(Ok(())) => return Poll::Ready(Ok(Received::Data(0))),
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {}
            }
            if matches!(inner.receiving, Receiving::Over(_)) {
                // Told the driver already: wait for libvirt's answer.
                inner.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        let over = match self.receiver.read(buf, holes) {
            Ok(Received::Data(0)) => Ok(()),
            Ok(received) => return Poll::Ready(Ok(received)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut inner = lock(&self.shared.inner);
                inner.reader = Some(cx.waker().clone());
                // Read all there was: libvirt may wake the reader again.
                let resume = matches!(inner.receiving, Receiving::Paused);
                if resume {
                    inner.receiving = Receiving::On;
                }
                drop(inner);
                if resume {
                    self.kick();
                }
                return Poll::Pending;
            }
            Err(e) => Err(Error::from(e)),
        };
        // The end, or a failure: the driver finishes (fails) the stream, and the
        // reader hears how that went.
        let mut inner = lock(&self.shared.inner);
        inner.receiving = Receiving::Over(Some(over));
        inner.reader = Some(cx.waker().clone());
        drop(inner);
        self.kick();
        Poll::Pending
    }

    /// Queues data (as much as fits, or a whole owned buffer) or a hole; returns the
    /// data bytes taken. An owned buffer taken is replaced by one to fill next.
    fn poll_put(&self, cx: &Context<'_>, put: &mut Put<'_>) -> Poll<io::Result<usize>> {
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
        let (chunk, taken) = match put {
            Put::Copy(data) => {
                // At most a packet: a whole chunk then goes on without a copy.
                let n = data.len().min(room).min(PACKET);
                // Into a recycled buffer, copied without the lock: the driver only
                // ever takes from the queue, so the room can only grow meanwhile (and
                // there is one writer: `&mut self`).
                let mut buf = inner.spare.pop().unwrap_or_default();
                drop(inner);
                buf.clear();
                buf.extend_from_slice(&data[..n]);
                inner = lock(&self.shared.inner);
                (Chunk::Data(buf), n)
            }
            Put::Owned(slot) => {
                let buf = slot.take().unwrap_or_default();
                *slot = Some(inner.spare.pop().unwrap_or_default());
                let n = buf.len();
                (Chunk::Data(buf), n)
            }
            Put::Hole(length) => (Chunk::Hole(*length), 0),
        };
        inner.tx_bytes += taken;
        let was_empty = inner.tx.is_empty();
        inner.tx.push_back(chunk);
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
        match self.get_mut().poll_take(cx, unfilled, false) {
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

/// Reads in place: `poll_fill_buf` receives into the stream's own buffer (up to
/// 256 KiB; a hole as zeros) and lends it, without the copy into the caller's
/// buffer that `AsyncRead` makes.
impl AsyncBufRead for AsyncStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.held_start == this.held_end {
            let mut buf = this.buffers.take();
            match this.poll_take(cx, &mut buf, false) {
                Poll::Ready(Ok(Received::Data(n))) if n > 0 => {
                    (this.held, this.held_start, this.held_end) = (buf, 0, n);
                }
                // The end (nothing held), a failure, or nothing yet.
                taken => {
                    this.buffers.give(buf);
                    return taken.map_ok(|_| &[][..]);
                }
            }
        }
        Poll::Ready(Ok(this.held()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().consume_held(amt);
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
        self.poll_put(cx, &mut Put::Copy(buf))
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

/// What `AsyncStream::poll_put` queues.
enum Put<'a> {
    /// Copied, as much as fits.
    Copy(&'a [u8]),
    /// Taken whole, and replaced by the buffer to fill next.
    Owned(Option<Vec<u8>>),
    Hole(u64),
}

/// What the handler sends next.
enum Next {
    Hole(u64),
    /// The front chunk's buffer, taken out of the queue while it is sent (its place
    /// in the queue stays, empty), and where its unsent bytes start.
    Data(Vec<u8>, usize),
}

/// The handler inside the driver: wakes the reader, and sends what the writer
/// queued. It never holds the stream's lock across a call into libvirt.
struct Bridge {
    shared: Arc<Shared>,
    /// The stream's lane (if it has one) gives the chunks it sent back to `spare`.
    recycling: bool,
}

impl Bridge {
    /// Readable (or an error or hang-up to read): wakes the reader, which receives.
    /// With none waiting, READABLE is let go of until the reader has read all there
    /// is, so that the event does not come back at every turn meanwhile.
    fn readable(&mut self) {
        let mut inner = lock(&self.shared.inner);
        match inner.reader.take() {
            Some(reader) => reader.wake(),
            None => {
                if matches!(inner.receiving, Receiving::On) {
                    inner.receiving = Receiving::Paused;
                }
            }
        }
    }

    /// Sends from `tx` up to the budget or until the stream would block; finishes
    /// once `tx` is empty after a shutdown.
    fn send(&mut self, stream: &mut Stream) -> Result<Flow> {
        if !self.recycling {
            self.recycling = true;
            if let Some(lane) = stream.lane() {
                // The chunks `write_owned` hands over come back once sent, for the
                // next writes: an upload then allocates (and faults in) no fresh
                // 256 KiB buffer per chunk.
                let shared = Arc::downgrade(&self.shared);
                lane.set_recycle(Arc::new(move |buf| {
                    if let Some(shared) = shared.upgrade() {
                        recycle(&mut lock(&shared.inner).spare, buf);
                    }
                }));
            }
        }
        let mut moved = 0;
        while moved < SEND_BUDGET {
            // Taken out (not copied), so that no lock is held while libvirt is
            // called; only this handler takes from `tx`, so the chunk's place waits.
            let mut next = {
                let mut inner = lock(&self.shared.inner);
                let (shutdown, offset) = (inner.shutdown, inner.tx_offset);
                match inner.tx.front_mut() {
                    None if shutdown => return Ok(Flow::Finish),
                    None => break,
                    Some(Chunk::Hole(length)) => Next::Hole(*length),
                    Some(Chunk::Data(data)) => Next::Data(std::mem::take(data), offset),
                }
            };
            let len = match &next {
                Next::Data(data, _) => data.len(),
                Next::Hole(_) => 0,
            };
            let sent = match &mut next {
                Next::Hole(length) => stream.write_hole(*length).map(|()| 0),
                // A whole chunk goes to a remote stream's sender thread as it is:
                // the copy AsyncWrite forces (from the caller's buffer) stays the
                // only one.
                Next::Data(data, 0) => match stream.write_owned(data) {
                    Ok(true) => Ok(len),
                    Ok(false) => stream.write(&data[..len.min(PACKET)]),
                    Err(e) => Err(e),
                },
                Next::Data(data, offset) => {
                    let end = len.min(*offset + PACKET);
                    stream.write(&data[*offset..end])
                }
            };
            let mut inner = lock(&self.shared.inner);
            let Inner {
                tx,
                tx_bytes,
                tx_offset,
                spare,
                ..
            } = &mut *inner;
            // The chunk's buffer back in its place, or, sent in full, recycled.
            let done = match next {
                Next::Hole(_) => sent.is_ok(),
                Next::Data(data, offset) => {
                    let n = *sent.as_ref().unwrap_or(&0);
                    let done = offset + n == len;
                    match tx.front_mut() {
                        Some(Chunk::Data(slot)) if !done => *slot = data,
                        _ => recycle(spare, data),
                    }
                    *tx_bytes -= n;
                    *tx_offset = if done { 0 } else { offset + n };
                    moved += n;
                    done
                }
            };
            if done {
                tx.pop_front();
            }
            match sent {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
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
        if readiness.is_readable() || readiness.is_error() || readiness.is_hangup() {
            self.readable();
        }
        let mut flow = Ok(Flow::Continue);
        if readiness.is_writable() {
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
