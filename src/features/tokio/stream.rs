//! [`AsyncStream`]: a reactor stream seen from async code, through two bounded
//! buffers that a handler inside the driver fills and drains.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

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
/// Data buffers kept for reuse per stream, at most (see `Inner::spare`).
const SPARE: usize = 2;

/// A libvirt stream as `AsyncRead + AsyncWrite`, driven by the tokio
/// [`Driver`](super::Driver).
///
/// - Reads take what the driver has received; `Ok(0)` is the end of the stream, told
///   only once libvirt has confirmed it (`virStreamFinish`). A sparse stream's holes
///   read as zeros, or as holes through [`read_sparse`](Self::read_sparse).
///   `AsyncBufRead` (`fill_buf` / `consume`) reads the received chunks in place,
///   one copy fewer than `AsyncRead`.
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
    /// What `poll_fill_buf` took out of the receive queue, unread from
    /// `held_offset` on: a data chunk (its unread bytes still counted in
    /// `Inner::rx_bytes`, `held_counted`) or the zeros of a hole (not counted).
    held: Vec<u8>,
    held_offset: usize,
    held_counted: bool,
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
    /// Emptied data buffers of `rx` and `tx`, for the next read or write: a stream in
    /// full flow then allocates nothing (a fresh 256 KiB buffer is an `mmap` and its
    /// page faults each time).
    spare: Vec<Vec<u8>>,
}

/// Keeps `buf` in `spare` for reuse if it is a full-size buffer and there is room.
fn recycle(spare: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spare.len() < SPARE && (PACKET / 2..=TX_LIMIT).contains(&buf.capacity()) {
        spare.push(buf);
    }
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
            recycling: false,
        };
        let token = reactor.insert(stream, Interest::READABLE, bridge)?;
        Ok(AsyncStream {
            shared,
            token,
            reactor: handle,
            held: Vec::new(),
            held_offset: 0,
            held_counted: false,
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
        std::future::poll_fn(|cx| self.poll_put(cx, Put::Hole(length)).map_ok(drop)).await
    }

    /// Takes what was received into `buf`: a hole as zeros, or as
    /// `Received::Hole` when `holes`.
    fn poll_take(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
        holes: bool,
    ) -> Poll<io::Result<Received>> {
        if self.held_offset < self.held.len() {
            let n = buf.len().min(self.held.len() - self.held_offset);
            buf[..n].copy_from_slice(&self.held[self.held_offset..self.held_offset + n]);
            self.consume_held(n);
            return Poll::Ready(Ok(Received::Data(n)));
        }
        let mut inner = lock(&self.shared.inner);
        let Inner {
            rx,
            rx_bytes,
            rx_offset,
            spare,
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
                    *rx_offset = 0;
                    if let Some(Chunk::Data(data)) = rx.pop_front() {
                        recycle(spare, data);
                    }
                } else {
                    *rx_offset += n;
                }
                *rx_bytes -= n;
                Some(Received::Data(n))
            }
        };
        if let Some(received) = taken {
            self.release(inner);
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

    /// Marks `n` more bytes of `held` read; a data chunk's count frees room in the
    /// receive queue (and a paused stream resumes), and its buffer, once read,
    /// goes back for reuse.
    fn consume_held(&mut self, n: usize) {
        self.held_offset += n;
        if !self.held_counted {
            return;
        }
        let mut inner = lock(&self.shared.inner);
        inner.rx_bytes -= n;
        if self.held_offset == self.held.len() {
            recycle(&mut inner.spare, std::mem::take(&mut self.held));
            self.held_offset = 0;
            self.held_counted = false;
        }
        self.release(inner);
    }

    /// After a read freed room: a paused stream resumes once half its receive room
    /// is free (the driver is asked to take READABLE back).
    fn release(&self, mut inner: MutexGuard<'_, Inner>) {
        let resume = inner.rx_paused && inner.rx_bytes <= RX_LIMIT / 2;
        if resume {
            inner.rx_paused = false;
        }
        drop(inner);
        if resume {
            self.kick();
        }
    }

    /// Queues data (as much as fits) or a hole; returns the data bytes taken.
    fn poll_put(&self, cx: &Context<'_>, put: Put<'_>) -> Poll<io::Result<usize>> {
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
            Put::Data(data) => {
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
                inner.tx_bytes += n;
                (Chunk::Data(buf), n)
            }
            Put::Hole(length) => (Chunk::Hole(length), 0),
        };
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

/// Reads in place: `poll_fill_buf` lends the next received chunk itself (up to
/// 256 KiB; a hole as zeros), without the copy into the caller's buffer that
/// `AsyncRead` makes.
impl AsyncBufRead for AsyncStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.held_offset < this.held.len() {
            return Poll::Ready(Ok(&this.held[this.held_offset..]));
        }
        let mut inner = lock(&this.shared.inner);
        let Inner {
            rx,
            rx_offset,
            spare,
            ..
        } = &mut *inner;
        // An empty hole would read as the end.
        while matches!(rx.front(), Some(Chunk::Hole(0))) {
            rx.pop_front();
        }
        match rx.pop_front() {
            Some(Chunk::Data(data)) => {
                recycle(spare, std::mem::replace(&mut this.held, data));
                this.held_offset = std::mem::take(rx_offset);
                this.held_counted = true;
            }
            Some(Chunk::Hole(length)) => {
                let n = usize::try_from(length).map_or(PACKET, |l| l.min(PACKET));
                if length > n as u64 {
                    rx.push_front(Chunk::Hole(length - n as u64));
                }
                this.held.clear();
                this.held.resize(n, 0);
                this.held_offset = 0;
                this.held_counted = false;
            }
            None => {
                return match inner.ended() {
                    Some(Ok(())) => Poll::Ready(Ok(&[])),
                    Some(Err(e)) => Poll::Ready(Err(e)),
                    None => {
                        inner.reader = Some(cx.waker().clone());
                        Poll::Pending
                    }
                };
            }
        }
        drop(inner);
        Poll::Ready(Ok(&this.held[this.held_offset..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        let amt = amt.min(this.held.len() - this.held_offset);
        if amt > 0 {
            this.consume_held(amt);
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
        self.poll_put(cx, Put::Data(buf))
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
    Data(&'a [u8]),
    Hole(u64),
}

/// What the handler sends next.
enum Next {
    Hole(u64),
    /// The front chunk's buffer, taken out of the queue while it is sent (its place
    /// in the queue stays, empty), and where its unsent bytes start.
    Data(Vec<u8>, usize),
}

/// The handler inside the driver: moves bytes between the stream and the buffers.
/// It never holds the buffers' lock across a call into libvirt.
struct Bridge {
    shared: Arc<Shared>,
    /// What reads go into: handed over whole to `rx` when (nearly) full.
    buf: Vec<u8>,
    sparse: bool,
    /// The stream's lane (if it has one) gives the chunks it sent back to `spare`.
    recycling: bool,
}

impl Bridge {
    /// Receives into `rx` up to the budget or until `rx` is full.
    fn receive(&mut self, stream: &mut Stream) -> Result<Flow> {
        let mut moved = 0;
        while moved < BUDGET {
            {
                let mut inner = lock(&self.shared.inner);
                if inner.rx_bytes >= RX_LIMIT {
                    inner.rx_paused = true;
                    break;
                }
            }
            let got = if self.sparse {
                stream.read_sparse(&mut self.buf)
            } else {
                stream.read(&mut self.buf).map(Received::Data)
            };
            let got = match got {
                Ok(Received::Data(0)) => return Ok(Flow::Finish),
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            let mut inner = lock(&self.shared.inner);
            let chunk = match got {
                // A (nearly) full read: the buffer itself goes to `rx`, and a recycled
                // one takes its place; no copy. (Its tail is zeroed again below.)
                Received::Data(n) if n >= PACKET / 2 => {
                    let next = inner.spare.pop().unwrap_or_default();
                    let mut data = std::mem::replace(&mut self.buf, next);
                    data.truncate(n);
                    Chunk::Data(data)
                }
                Received::Data(n) => Chunk::Data(self.buf[..n].to_vec()),
                Received::Hole(length) => Chunk::Hole(length),
            };
            if let Chunk::Data(data) = &chunk {
                moved += data.len();
                inner.rx_bytes += data.len();
            }
            inner.rx.push_back(chunk);
            if let Some(reader) = inner.reader.take() {
                reader.wake();
            }
            drop(inner);
            self.buf.resize(PACKET, 0);
        }
        Ok(Flow::Continue)
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
        while moved < BUDGET {
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
