//! Shared helpers for the integration tests.
//!
//! Use from a test file with `mod support;` and then `support::daemon::PrivateDaemon`.
#![allow(dead_code)]

pub mod consoles;
pub mod daemon;
pub mod hosts;
pub mod loop_thread;
pub mod pool;
pub mod raw;
pub mod vol;

pub use raw::lock;
