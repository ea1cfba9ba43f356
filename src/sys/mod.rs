//! The C boundary: every `unsafe` block and every `extern "C"` function of the crate.
//!
//! Nothing outside this module names `virt::sys`, and nothing here calls up into the
//! layers above: they hand this layer values (an [`event_impl::EventImpl`], boxed
//! closures with their free callbacks) and it hands libvirt's calls back to them.
//!
//! - [`event_impl`]: the six functions registered with `virEventRegisterImpl`, and
//!   the crate's only static (libvirt's event API passes no context pointer);
//! - [`async_fd`] (feature `tokio`): the loop's epoll fd registered with tokio;
//! - [`callback`]: libvirt's `(callback, opaque)` pairs, made callable and `Send`;
//! - [`closure`]: Rust closures as callbacks on libvirt's loop (`virEventAddHandle` and
//!   `virEventAddTimeout`), freed by their own free callback;
//! - [`connection`]: Rust closures as domain lifecycle and close callbacks;
//! - [`opaque`]: Rust values as libvirt opaques, dropped by libvirt's free callback;
//! - [`stream`]: raw streams, with a closure as their event callback's opaque;
//! - [`file`]: `lseek` with `SEEK_DATA`/`SEEK_HOLE` for sparse files;
//! - [`panic`]: catching panics so none unwinds into C;
//! - [`epoll`]: level-triggered registrations in mio's epoll instance.
//! - [`thread`]: the calling thread's identity, for the loop-thread checks.
#![allow(unsafe_code)]

#[cfg(feature = "tokio")]
pub(crate) mod async_fd;
pub(crate) mod callback;
pub(crate) mod closure;
pub(crate) mod connection;
pub(crate) mod epoll;
pub(crate) mod event_impl;
pub(crate) mod file;
pub(crate) mod flags;
pub(crate) mod opaque;
pub(crate) mod panic;
pub(crate) mod stream;
pub(crate) mod thread;
