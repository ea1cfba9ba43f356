//! No panic may unwind into C: every `extern "C"` body runs inside [`catch`].

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

/// Runs `f`; if it panics, logs the panic, reports it to the engine (so `run` can
/// surface it) and returns `None`.
///
/// `AssertUnwindSafe` is sound here: a caught panic is reported as an error and the
/// state it may have left half-updated is the caller's own closure, which the caller
/// is told about.
pub(crate) fn catch<R>(origin: impl FnOnce() -> String, f: impl FnOnce() -> R) -> Option<R> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            let origin = origin();
            let message = payload_message(payload.as_ref());
            log::error!("{origin} panicked: {message}");
            crate::engine::report_panic(origin, message);
            None
        }
    }
}

pub(crate) fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
