//! What the reactor calls: the [`StreamHandler`] trait, and what it hands and expects.

use std::fmt;
use std::ops::Deref;

use super::handle::ReactorHandle;
use crate::error::Error;
use crate::interest::{Interest, Readiness};
use crate::stream::Stream;

/// Names a stream in a [`Reactor`](super::Reactor): its slab key and that slot's
/// generation. It is the opaque libvirt hands back with each event, so a slot that is
/// reused by a newer stream never receives an older stream's events.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamToken {
    pub(crate) key: u32,
    pub(crate) generation: u32,
}

impl StreamToken {
    pub(crate) fn to_opaque(self) -> usize {
        self.key as usize | ((self.generation as usize) << 32)
    }

    pub(crate) fn from_opaque(opaque: usize) -> StreamToken {
        StreamToken {
            key: opaque as u32,
            generation: (opaque >> 32) as u32,
        }
    }
}

impl fmt::Debug for StreamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamToken({}v{})", self.key, self.generation)
    }
}

/// What a handler wants done after handling an event.
#[derive(Debug)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Remove the event callback and finish the stream (the transfer is complete).
    Finish,
    /// Remove the event callback and abort the stream.
    Abort,
    /// Abort the stream and report this error as its end.
    Fail(Error),
    /// Remove the event callback and hand the stream back, unfinished, through
    /// [`StreamHandler::closed`] as [`StreamEnd::Removed`].
    Remove,
}

/// How a stream left the reactor, told once to its handler.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamEnd {
    /// Finished: libvirt confirmed the transfer.
    Finished,
    /// Aborted at the handler's request, or because the reactor shut down.
    Aborted,
    /// It failed: finishing failed, the handler reported an error, or the
    /// connection was lost ([`Error::ConnectionClosed`]).
    Failed(Error),
    /// Taken out at the handler's request, unfinished; the handler now owns it
    /// (it may finish it, abort it, or insert it again).
    Removed(Stream),
}

/// Handles the events of one stream. Runs on the loop thread, never inside libvirt.
pub trait StreamHandler {
    /// The stream is ready: READABLE (data, end of stream or an error is pending),
    /// WRITABLE, and on local streams also ERROR or HANGUP. Read or write until
    /// `WouldBlock`, or as much as is fair to other streams (events are
    /// level-triggered: unconsumed readiness is reported again next iteration).
    fn ready(&mut self, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow;

    /// The stream has left the reactor. Called exactly once, last; except after
    /// [`ready`](Self::ready) panicked: such a handler is dropped without being
    /// called again (its stream is aborted).
    fn closed(&mut self, end: StreamEnd) {
        if let StreamEnd::Failed(e) = end {
            log::warn!("stream failed: {e}");
        }
    }
}

/// The stream being handled, and what the handler may change about it.
pub struct StreamCtx<'a> {
    pub(crate) stream: &'a Stream,
    pub(crate) token: StreamToken,
    pub(crate) interest: Interest,
    pub(crate) handle: &'a ReactorHandle,
}

impl StreamCtx<'_> {
    /// This stream's token.
    pub fn token(&self) -> StreamToken {
        self.token
    }

    /// The stream.
    pub fn stream(&self) -> &Stream {
        self.stream
    }

    /// What the handler is asking for now.
    pub fn interest(&self) -> Interest {
        self.interest
    }

    /// Changes what the handler asks for, from the next iteration on.
    /// [`Interest::NONE`] pauses the stream's events without removing it.
    pub fn set_interest(&mut self, interest: Interest) {
        self.interest = interest;
    }

    /// The reactor's cross-thread handle, e.g. to clone into another thread.
    pub fn handle(&self) -> &ReactorHandle {
        self.handle
    }
}

impl Deref for StreamCtx<'_> {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        self.stream
    }
}

impl fmt::Debug for StreamCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamCtx")
            .field("token", &self.token)
            .field("interest", &self.interest)
            .finish_non_exhaustive()
    }
}

/// A handler from a closure, for small cases; its stream's end is logged.
pub fn handler_fn<F>(f: F) -> impl StreamHandler
where
    F: FnMut(&mut StreamCtx<'_>, Readiness) -> Flow,
{
    struct FnHandler<F>(F);

    impl<F> StreamHandler for FnHandler<F>
    where
        F: FnMut(&mut StreamCtx<'_>, Readiness) -> Flow,
    {
        fn ready(&mut self, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
            (self.0)(cx, readiness)
        }
    }

    FnHandler(f)
}
