//! The features built on the reactor: consoles, volume transfers, the connection
//! close watch, and the test bed's tiny guests.

pub mod console;
#[cfg(feature = "console-service")]
pub mod console_service;
#[cfg(feature = "testbed")]
pub mod testbed;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod volume;
