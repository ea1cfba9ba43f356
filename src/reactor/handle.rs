//! Reaching the reactor from other threads: [`ReactorHandle`] sends commands over a
//! crossbeam channel and wakes the loop; [`StreamWriter`] queues bytes for a stream
//! through a bounded buffer.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{Receiver, Sender};

use super::driver::Waker;
use super::handler::{StreamHandler, StreamToken};
use super::Reactor;
use crate::error::{Error, Result};
use crate::interest::Interest;
use crate::stream::Stream;

pub(crate) type Job = Box<dyn FnOnce(&mut Reactor) + Send>;

/// A command for the reactor, sent from any thread.
pub(crate) enum Command {
    /// Run a closure on the loop thread with the reactor.
    Execute(Job),
    SetInterest(StreamToken, Interest),
    /// A stream's outbox went from empty to non-empty.
    Flush(StreamToken),
    /// A stream's lane failed to send (see `lane`).
    SendFailed(StreamToken, Error),
    /// A stream's lane finished or aborted it, with libvirt's result.
    Ended(StreamToken, Result<()>),
}

/// A `Send + Clone` handle on a [`Reactor`]: insert streams, change interest, run
/// closures on the loop thread, and stop the loop, from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(crate) commands: Sender<Command>,
    pub(crate) waker: Waker,
}

impl ReactorHandle {
    pub(super) fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::ReactorGone)?;
        self.waker.wake();
        Ok(())
    }

    /// Runs `f` with the reactor on the loop thread, at its next iteration.
    ///
    /// # Errors
    ///
    /// [`Error::ReactorGone`] if the reactor was dropped.
    pub fn execute<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&mut Reactor) + Send + 'static,
    {
        self.send(Command::Execute(Box::new(f)))
    }

    /// Inserts a stream from another thread. The token (or the insertion error)
    /// arrives on the returned channel once the loop has run the insertion.
    ///
    /// # Errors
    ///
    /// [`Error::ReactorGone`] if the reactor was dropped.
    pub fn insert<H>(
        &self,
        stream: Stream,
        interest: Interest,
        handler: H,
    ) -> Result<Receiver<Result<StreamToken>>>
    where
        H: StreamHandler + Send + 'static,
    {
        let (reply, token) = crossbeam_channel::bounded(1);
        self.execute(move |reactor| {
            let _ = reply.send(reactor.insert(stream, interest, handler));
        })?;
        Ok(token)
    }

    /// Runs blocking libvirt work on a worker thread, then `then` with its result on
    /// the loop thread.
    ///
    /// This is the pattern for calls that wait for replies which arrive through the
    /// loop itself: with an in-process driver such as `qemu:///embed`, creating a
    /// domain waits for QEMU's monitor, whose socket is a watch on this loop, so the
    /// call must not run on the loop thread. The worker makes the call (for example
    /// creates the domain and opens its console into a new [`Stream`]), and `then`
    /// hands the result to the reactor.
    ///
    /// # Errors
    ///
    /// The worker thread cannot be spawned.
    pub fn spawn_blocking<T, W, F>(&self, work: W, then: F) -> Result<()>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
        F: FnOnce(&mut Reactor, T) + Send + 'static,
    {
        let handle = self.clone();
        std::thread::Builder::new()
            .name("virt-reactor-blocking".into())
            .spawn(move || {
                let result = work();
                if handle
                    .execute(move |reactor| then(reactor, result))
                    .is_err()
                {
                    log::warn!("blocking work finished after the reactor was dropped");
                }
            })
            .map(drop)
            .map_err(Error::Io)
    }

    /// Changes what a stream's handler is told about.
    ///
    /// # Errors
    ///
    /// [`Error::ReactorGone`] if the reactor was dropped; a stale token is logged by
    /// the loop.
    pub fn set_interest(&self, token: StreamToken, interest: Interest) -> Result<()> {
        self.send(Command::SetInterest(token, interest))
    }

    /// Interrupts a loop sleeping in poll, e.g. after queueing work it should notice.
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Makes [`Reactor::run`] return after its current iteration.
    pub fn stop(&self) {
        self.waker.stop();
    }
}

impl fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReactorHandle { .. }")
    }
}

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
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
    pub(crate) handle: ReactorHandle,
}

impl StreamWriter {
    /// Queues all of `data`, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::StreamClosed`] once the stream has left the reactor (bytes queued
    /// before that may not have been sent); [`Error::ReactorGone`].
    pub fn write_all(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let mut state = self.outbox.lock();
            while !state.closed && state.bytes.len() >= self.outbox.capacity {
                state = self
                    .outbox
                    .space
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
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
            self.handle.send(Command::Flush(self.token))?;
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
