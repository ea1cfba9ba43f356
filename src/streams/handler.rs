//! What the reactor calls: the [`StreamHandler`] trait, and what it hands and expects.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::stream::Stream;
use super::token::StreamToken;
use crate::vocab::error::Error;
use crate::vocab::interest::{Interest, Readiness};

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

/// Handles the events of one stream, with `&mut` access to the application's state
/// `S` (what the reactor's `run` was given). Runs on the loop thread, never inside
/// libvirt.
///
/// A handler that panics is dropped without being called again; see
/// [`Reactor`](crate::Reactor#panics).
pub trait StreamHandler<S> {
    /// The stream is ready: READABLE (data, end of stream or an error is pending),
    /// WRITABLE, and on local streams also ERROR or HANGUP. Read or write until
    /// `WouldBlock`, or as much as is fair to other streams (events are
    /// level-triggered: unconsumed readiness is reported again next iteration).
    fn ready(&mut self, state: &mut S, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow;

    /// The stream has left the reactor. Called exactly once, last (not after a
    /// panic).
    fn closed(&mut self, state: &mut S, end: StreamEnd) {
        let _ = state;
        if let StreamEnd::Failed(e) = end {
            log::warn!("stream failed: {e}");
        }
    }
}

/// The stream being handled, and what the handler may change about it. It derefs
/// to the [`Stream`], so `cx.read(..)` and `cx.write(..)` work on it.
pub struct StreamCtx<'a> {
    pub(crate) stream: &'a mut Stream,
    pub(crate) token: StreamToken,
    pub(crate) interest: Interest,
    /// The reactor's buffer, lent for the call: receives land there and go straight
    /// to their sink, so receiving streams need no buffer each.
    pub(crate) scratch: &'a mut Vec<u8>,
}

impl StreamCtx<'_> {
    /// This stream's token.
    pub fn token(&self) -> StreamToken {
        self.token
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
}

impl Deref for StreamCtx<'_> {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        self.stream
    }
}

impl DerefMut for StreamCtx<'_> {
    fn deref_mut(&mut self) -> &mut Stream {
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
pub fn handler_fn<S, F>(f: F) -> impl StreamHandler<S>
where
    F: FnMut(&mut S, &mut StreamCtx<'_>, Readiness) -> Flow,
{
    struct FnHandler<F>(F);

    impl<S, F> StreamHandler<S> for FnHandler<F>
    where
        F: FnMut(&mut S, &mut StreamCtx<'_>, Readiness) -> Flow,
    {
        fn ready(&mut self, state: &mut S, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
            (self.0)(state, cx, readiness)
        }
    }

    FnHandler(f)
}
