//! The streams layer: [`Stream`](stream::Stream), the [`Reactor`](reactor::Reactor)
//! slab with its handlers, the per-connection sender threads (lanes), and whole-stream
//! [`transfer`]s.

pub(crate) mod handler;
pub(crate) mod inbox;
pub(crate) mod lane;
pub(crate) mod reactor;
pub(crate) mod stream;
pub(crate) mod token;
pub mod transfer;
pub(crate) mod writer;
