//! # virt-reactor
//!
//! One thread drives many libvirt streams without blocking.
//!
//! virt-reactor implements libvirt's event loop API (`virEventRegisterImpl`) on
//! [`mio`]. libvirt's sockets, keepalive timers and stream callbacks all run on the
//! loop, level-triggered as libvirt expects, and other threads may add, change and
//! remove watches at any time.
//!
//! ## Quick start
//!
//! ```no_run
//! use std::thread;
//! use virt_reactor::EventLoop;
//!
//! fn main() -> virt_reactor::Result<()> {
//!     // 1. Register first, once per process, before any connection is opened.
//!     let mut event_loop = EventLoop::register()?;
//!     let stopper = event_loop.handle();
//!
//!     // 2. Run it on a thread of its own (or embed it in your own mio::Poll).
//!     let runner = thread::spawn(move || event_loop.run());
//!
//!     // 3. Blocking libvirt calls from other threads are fine: their replies and
//!     //    the connection's keepalive travel through the loop.
//!     let conn = virt_reactor::connect("test:///default")?;
//!     println!("connected to {}", conn.uri().map_err(virt_reactor::Error::Libvirt)?);
//!
//!     stopper.stop();
//!     runner.join().expect("loop thread")?;
//!     Ok(())
//! }
//! ```
//!
//! ## Layout
//!
//! - `ffi` (private): every `unsafe` block; the six `extern "C"` functions libvirt
//!   calls, raw streams, and the trampolines for Rust closures.
//! - `engine` (private): the handle and timer tables, deferred free callbacks.
//! - [`EventLoop`]: owns the `mio::Poll`, runs iterations, drains at shutdown.
//! - [`Watch`] / [`Timer`]: your own fds and timers on libvirt's loop.
//! - [`connection_events`]: domain lifecycle events and the connection close watch.
//! - [`Stream`], [`Reactor`], [`StreamHandler`]: non-blocking streams in a slab, each
//!   with its handler; [`transfer`] and [`volume`] move whole streams.
//! - [`console`]: many guest consoles on one reactor; [`testbed`]: the tiny guests.
//!
//! See `docs/architecture.md` for threads, locks and dispatch order, and
//! `docs/contract.md` for each rule of libvirt's contract and the test that proves it.

#![doc(test(attr(deny(warnings))))]

mod connect;
pub mod connection_events;
pub mod console;
mod engine;
mod error;
mod event_loop;
mod ffi;
mod interest;
mod reactor;
mod stream;
pub mod testbed;
pub mod transfer;
pub mod volume;
mod watch;

pub use connect::{connect, connect_with, KeepAlive};
pub use engine::LoopStats;
pub use error::{Error, LibvirtError, Result};
pub use event_loop::{DrainReport, EventLoop, LoopHandle};
pub use interest::{Interest, Readiness};
pub use reactor::{
    handler_fn, Flow, Reactor, ReactorHandle, StreamCtx, StreamEnd, StreamHandler, StreamToken,
    StreamWriter, DEFAULT_OUTBOX_CAPACITY,
};
pub use stream::{Received, Stream};
pub use watch::{Timer, Watch};
