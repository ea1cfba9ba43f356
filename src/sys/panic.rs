//! No panic may unwind into C: every `extern "C"` body runs inside [`catch`].
//!
//! This is the last line only. Upper layers catch panics of the code they call
//! themselves, where they can report them to whoever runs the loop; what reaches
//! here is logged.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

/// Runs `f`; if it panics, logs the panic and returns `None`.
///
/// `AssertUnwindSafe` is sound here: nothing of `f`'s is used after a panic.
pub(crate) fn catch<R>(origin: impl FnOnce() -> String, f: impl FnOnce() -> R) -> Option<R> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            log::error!(
                "{} panicked: {}",
                origin(),
                payload_message(payload.as_ref())
            );
            None
        }
    }
}

/// A panic's message, when it was a string.
pub(crate) fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
