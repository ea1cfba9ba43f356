//! The FFI boundary: every `unsafe` block and every `extern "C"` function of the crate.
//!
//! Nothing outside this module names `virt::sys`. Each submodule turns one kind of C
//! contract into safe Rust:
//!
//! - [`event_impl`]: the six functions registered with `virEventRegisterImpl`, which
//!   forward to the safe engine;
//! - [`callback`]: libvirt's `(callback, opaque)` pairs, made callable and `Send`;
//! - [`closure`]: Rust closures as callbacks on libvirt's loop (`virEventAddHandle` and
//!   `virEventAddTimeout`), freed by their own free callback;
//! - [`connection_events`]: Rust closures as domain lifecycle and close callbacks;
//! - [`opaque`]: Rust values as libvirt opaques, dropped by libvirt's free callback;
//! - [`stream`]: raw streams, with the token as their event callback's opaque;
//! - [`file`]: `lseek` with `SEEK_DATA`/`SEEK_HOLE` for sparse files;
//! - [`panic`]: catching panics so none unwinds into C;
//! - [`fork`]: noting forks, so a forked child cannot drive the parent's epoll;
//! - [`epoll`]: level-triggered registrations in mio's epoll instance.
#![allow(unsafe_code)]

pub(crate) mod callback;
pub(crate) mod closure;
pub(crate) mod connection_events;
pub(crate) mod epoll;
pub(crate) mod event_impl;
pub(crate) mod file;
pub(crate) mod fork;
pub(crate) mod opaque;
pub(crate) mod panic;
pub(crate) mod stream;
