//! The features built on the reactor: consoles, volume transfers, supervised
//! connections, and the test bed's tiny guests.

pub mod console;
#[cfg(feature = "console-service")]
pub mod console_service;
pub mod supervisor;
#[cfg(feature = "testbed")]
pub mod testbed;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod volume;
