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
//! use std::time::Duration;
//! use virt_reactor::{Flow, Interest, Reactor, Stream, StreamCtx, Readiness};
//!
//! fn main() -> virt_reactor::Result<()> {
//!     // 1. Register first, once per process, before any connection is opened.
//!     let mut reactor = Reactor::<Vec<u8>>::register()?;
//!
//!     // 2. Open a connection and a stream; attach it with the `virt` call that takes
//!     //    one (a console, a volume download, ...).
//!     let conn = virt_reactor::connect("test:///default")?;
//!     let pool = conn.lookup_storage_pool_by_name("default-pool")?;
//!     let vol = pool.lookup_storage_vol_by_name("disk")?;
//!     let mut stream = Stream::new(&conn)?;
//!     stream.with_virt(|s| vol.download(s, 0, 0, 0))?;
//!
//!     // 3. Handlers get `&mut` access to the state passed to `run_once`.
//!     let mut buf = vec![0; 64 * 1024];
//!     reactor.insert(stream, Interest::READABLE, virt_reactor::handler_fn(
//!         move |got: &mut Vec<u8>, cx: &mut StreamCtx<'_>, _: Readiness| {
//!             use std::io::Read;
//!             match cx.read(&mut buf) {
//!                 Ok(0) => Flow::Finish,
//!                 Ok(n) => { got.extend_from_slice(&buf[..n]); Flow::Continue }
//!                 Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Flow::Continue,
//!                 Err(e) => Flow::Fail(e.into()),
//!             }
//!         },
//!     ))?;
//!     let mut received = Vec::new();
//!     while !reactor.is_empty() {
//!         reactor.run_once(Some(Duration::from_millis(100)), &mut received)?;
//!     }
//!     println!("downloaded {} bytes", received.len());
//!     Ok(())
//! }
//! ```
//!
//! ## Async (tokio)
//!
//! With the feature `tokio`, `virt_reactor::tokio::register()` drives the same loop
//! from a tokio runtime (`current_thread` or `multi_thread`): a `Driver` future to
//! spawn, a `Handle` for blocking calls on the blocking pool, and streams, consoles
//! and volume transfers as `AsyncRead`/`AsyncWrite` and futures. That module's
//! documentation opens with an async quick start; `examples/tokio_consoles.rs` and
//! `examples/tokio_vol.rs` show it at work.
//!
//! ## Layers
//!
//! Each layer uses only the ones before it (`tests/layers.rs` checks this):
//!
//! 1. `vocab`: event bits ([`Interest`], [`Readiness`]), the [`Error`] type, and what
//!    libvirt reports ([`LifecycleEvent`], [`CloseReason`]);
//! 2. `sys`: the C boundary, every `unsafe` block and `extern "C"` function;
//! 3. `engine`: the handle and timer tables behind libvirt's six event functions;
//! 4. `event_loop`: the mio loop, [`Watch`] and [`Timer`], [`connect`];
//! 5. `streams`: [`Stream`], the [`Reactor`] slab with its handlers, [`transfer`]s;
//! 6. `features`: [`volume`] transfers, [`console`]s, and (feature `testbed`) the
//!    tiny test guests.
//!
//! See `docs/architecture.md` for threads, locks and dispatch order, and
//! `docs/contract.md` for each rule of libvirt's contract and the test that proves it.
//!
//! ## Cargo features
//!
//! - `default-loop` (off): [`Reactor::register_default_loop`], libvirt's own poll loop
//!   under the same reactor, for benchmarks that compare the two loops.
//! - `testbed` (off): `virt_reactor::testbed`, the tiny TCG guests the tests and
//!   examples boot.
//! - `tokio` (off): `virt_reactor::tokio`, the loop driven from a tokio runtime,
//!   streams as `AsyncRead`/`AsyncWrite`.
//! - `console-service` (off): `virt_reactor::console_service` and its programs,
//!   `virt-consoled` and its interactive client `virt-console`.

#![doc(test(attr(deny(warnings))))]

mod engine;
mod event_loop;
mod features;
mod streams;
mod sys;
mod vocab;

pub use engine::LoopStats;
pub use event_loop::connect::{connect, connect_with, KeepAlive};
pub use event_loop::watch::{Timer, Watch};
pub use event_loop::DrainReport;
#[cfg(feature = "console-service")]
pub use features::console_service;
#[cfg(feature = "testbed")]
pub use features::testbed;
#[cfg(feature = "tokio")]
pub use features::tokio;
pub use features::{console, supervisor, volume};
pub use streams::handler::{handler_fn, Flow, StreamCtx, StreamEnd, StreamHandler};
pub use streams::reactor::{Reactor, ReactorHandle, SubscriptionId, DEFAULT_OUTBOX_CAPACITY};
pub use streams::stream::{Received, Stream};
pub use streams::token::StreamToken;
pub use streams::transfer;
pub use streams::writer::StreamWriter;
pub use vocab::error::{Error, LibvirtError, Result};
pub use vocab::events::{CloseReason, LifecycleEvent, LifecycleKind};
pub use vocab::interest::{Interest, Readiness};
