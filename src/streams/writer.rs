//! Writing to a stream from other threads: [`StreamWriter`] queues bytes for a
//! stream through a bounded buffer, the reactor sends them.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::inbox::Inbox;
use super::token::StreamToken;
use crate::vocab::error::{Error, Result};
use crate::vocab::sync::{lock, wait};

/// Bytes queued for one stream, shared by its writers and the reactor.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    space: Condvar,
    capacity: usize,
}

struct OutboxState {
    bytes: VecDeque<u8>,
    /// A `Flush` command is on its way or being served.
    flush_requested: bool,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState {
                bytes: VecDeque::new(),
                flush_requested: false,
                closed: false,
            }),
            space: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        lock(&self.state)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().bytes.is_empty()
    }

    /// Copies up to `buf.len()` queued bytes into `buf`, without consuming them.
    pub(crate) fn peek(&self, buf: &mut [u8]) -> usize {
        let state = self.lock();
        let n = state.bytes.len().min(buf.len());
        for (dst, src) in buf.iter_mut().zip(state.bytes.iter()) {
            *dst = *src;
        }
        n
    }

    /// Drops `n` bytes that were sent. Returns true when the outbox is now empty; the
    /// next write then sends a new `Flush`.
    pub(crate) fn consume(&self, n: usize) -> bool {
        let mut state = self.lock();
        let n = n.min(state.bytes.len());
        state.bytes.drain(..n);
        self.space.notify_all();
        let empty = state.bytes.is_empty();
        if empty {
            state.flush_requested = false;
        }
        empty
    }

    /// Refuses further writes and wakes blocked writers.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.space.notify_all();
    }
}

/// Queues bytes for a stream from any thread; the reactor sends them when the stream
/// is writable. The queue is bounded: [`write_all`](Self::write_all) waits for room,
/// [`try_write`](Self::try_write) takes what fits.
#[derive(Clone)]
pub struct StreamWriter {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) token: StreamToken,
    pub(crate) inbox: Arc<Inbox>,
}

impl StreamWriter {
    /// Queues all of `data`, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::StreamClosed`] once the stream has left the reactor (bytes queued
    /// before that may not have been sent); [`Error::OnLoopThread`] when the queue is
    /// full and this is the loop's own thread (a handler), which would wait forever:
    /// use [`try_write`](Self::try_write) there.
    pub fn write_all(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let mut state = self.outbox.lock();
            while !state.closed && state.bytes.len() >= self.outbox.capacity {
                if self.inbox.waker().is_loop_thread() {
                    return Err(Error::OnLoopThread);
                }
                state = wait(&self.outbox.space, state);
            }
            let n = self.queue(&mut state, data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Queues as much of `data` as fits now.
    ///
    /// # Errors
    ///
    /// `WouldBlock` when the queue is full; the errors of
    /// [`write_all`](Self::write_all), as `io::Error`.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.outbox.lock();
        if !state.closed && state.bytes.len() >= self.outbox.capacity && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(self.queue(&mut state, data)?)
    }

    /// Bytes queued and not yet sent.
    pub fn pending(&self) -> usize {
        self.outbox.lock().bytes.len()
    }

    fn queue(&self, state: &mut OutboxState, data: &[u8]) -> Result<usize> {
        if state.closed {
            return Err(Error::StreamClosed);
        }
        let n = data
            .len()
            .min(self.outbox.capacity.saturating_sub(state.bytes.len()));
        state.bytes.extend(&data[..n]);
        if n > 0 && !state.flush_requested {
            state.flush_requested = true;
            let token = self.token;
            self.inbox.post(|news| news.flush.push(token));
        }
        Ok(n)
    }
}

impl fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamWriter")
            .field("token", &self.token)
            .field("pending", &self.pending())
            .finish()
    }
}
