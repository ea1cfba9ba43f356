//! The six functions libvirt calls through `virEventRegisterImpl`.
//!
//! Each one converts its arguments, forwards to the engine, and returns libvirt's
//! failure value (-1) if anything panics. libvirt passes no context pointer, which is
//! why the engine is a process-wide singleton.

use std::ffi::{c_int, c_void};
use std::ptr;

use virt::sys;

use super::callback::{FreeCallback, HandleCallback, TimerCallback};
use super::panic::catch;
use crate::engine;

/// Registers our six functions with libvirt, after `virInitialize`.
pub(crate) fn register() -> crate::Result<()> {
    // SAFETY: virInitialize has no preconditions and is idempotent.
    if unsafe { sys::virInitialize() } < 0 {
        return Err(crate::Error::last_libvirt());
    }
    // SAFETY: all six are valid `extern "C"` functions with the signatures libvirt
    // declares, and they live for the whole process.
    unsafe {
        sys::virEventRegisterImpl(
            Some(add_handle),
            Some(update_handle),
            Some(remove_handle),
            Some(add_timeout),
            Some(update_timeout),
            Some(remove_timeout),
        )
    };
    Ok(())
}

/// Asks libvirt's public `virEventAddTimeout` for a disabled timer and removes it
/// again; returns the id libvirt's registered implementation gave it (-1 on failure).
pub(crate) fn probe_registered_timer() -> i32 {
    // SAFETY: a disabled timer with a valid no-op callback, no opaque and no free
    // callback; it is removed before this function returns.
    unsafe {
        let id = sys::virEventAddTimeout(-1, Some(noop_timer), ptr::null_mut(), None);
        if id > 0 {
            sys::virEventRemoveTimeout(id);
        }
        id
    }
}

unsafe extern "C" fn noop_timer(_timer: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn add_handle(
    fd: c_int,
    events: c_int,
    cb: sys::virEventHandleCallback,
    opaque: *mut c_void,
    ff: sys::virFreeCallback,
) -> c_int {
    let (Some(callback), free) = (
        HandleCallback::new(cb, opaque),
        FreeCallback::new(ff, opaque),
    ) else {
        log::warn!("virEventAddHandle(fd {fd}) without a callback: refused");
        return -1;
    };
    catch(
        || format!("addHandle(fd {fd})"),
        || engine::add_handle(fd, events, callback, free),
    )
    .unwrap_or(-1)
}

unsafe extern "C" fn update_handle(watch: c_int, events: c_int) {
    catch(
        || format!("updateHandle(watch {watch})"),
        || engine::update_handle(watch, events),
    );
}

unsafe extern "C" fn remove_handle(watch: c_int) -> c_int {
    catch(
        || format!("removeHandle(watch {watch})"),
        || engine::remove_handle(watch),
    )
    .unwrap_or(-1)
}

unsafe extern "C" fn add_timeout(
    frequency: c_int,
    cb: sys::virEventTimeoutCallback,
    opaque: *mut c_void,
    ff: sys::virFreeCallback,
) -> c_int {
    let (Some(callback), free) = (
        TimerCallback::new(cb, opaque),
        FreeCallback::new(ff, opaque),
    ) else {
        log::warn!("virEventAddTimeout without a callback: refused");
        return -1;
    };
    catch(
        || "addTimeout".to_owned(),
        || engine::add_timeout(frequency, callback, free),
    )
    .unwrap_or(-1)
}

unsafe extern "C" fn update_timeout(timer: c_int, frequency: c_int) {
    catch(
        || format!("updateTimeout(timer {timer})"),
        || engine::update_timeout(timer, frequency),
    );
}

unsafe extern "C" fn remove_timeout(timer: c_int) -> c_int {
    catch(
        || format!("removeTimeout(timer {timer})"),
        || engine::remove_timeout(timer),
    )
    .unwrap_or(-1)
}
