//! Rust closures as callbacks on libvirt's event loop, through libvirt's public
//! `virEventAddHandle` and `virEventAddTimeout`.
//!
//! Each closure is the registration's opaque (see [`super::opaque`]), so it lives
//! exactly as long as libvirt's registration, whichever event implementation is
//! registered.

use std::ffi::{c_int, c_void};
use std::os::fd::RawFd;

use virt::sys;

use super::opaque;
use super::panic::catch;
use crate::vocab::error::Result;
use crate::vocab::interest::{Interest, Readiness};

/// The closure type behind a handle watch.
pub(crate) type HandleFn = Box<dyn FnMut(i32, RawFd, Readiness) + Send>;
/// The closure type behind a timer.
pub(crate) type TimerFn = Box<dyn FnMut(i32) + Send>;

/// Registers `f` for `fd` with libvirt's current event implementation.
pub(crate) fn add_handle(fd: RawFd, interest: Interest, f: HandleFn) -> Result<i32> {
    opaque::register(f, |opaque, free| {
        // SAFETY: the trampoline matches the opaque's type; libvirt owns the box from
        // here on and releases it through `free`.
        unsafe {
            sys::virEventAddHandle(fd, interest.to_raw(), Some(handle_trampoline), opaque, free)
        }
    })
}

/// Registers `f` as a timer with libvirt's current event implementation.
pub(crate) fn add_timer(frequency: i32, f: TimerFn) -> Result<i32> {
    opaque::register(f, |opaque, free| {
        // SAFETY: as in `add_handle`.
        unsafe { sys::virEventAddTimeout(frequency, Some(timer_trampoline), opaque, free) }
    })
}

pub(crate) fn update_handle(id: i32, interest: Interest) {
    // SAFETY: plain integer arguments; an unknown id is ignored by libvirt.
    unsafe { sys::virEventUpdateHandle(id, interest.to_raw()) }
}

pub(crate) fn remove_handle(id: i32) -> bool {
    // SAFETY: plain integer argument; an unknown id returns -1.
    unsafe { sys::virEventRemoveHandle(id) == 0 }
}

pub(crate) fn update_timer(id: i32, frequency: i32) {
    // SAFETY: plain integer arguments; an unknown id is ignored by libvirt.
    unsafe { sys::virEventUpdateTimeout(id, frequency) }
}

pub(crate) fn remove_timer(id: i32) -> bool {
    // SAFETY: plain integer argument; an unknown id returns -1.
    unsafe { sys::virEventRemoveTimeout(id) == 0 }
}

unsafe extern "C" fn handle_trampoline(
    watch: c_int,
    fd: c_int,
    events: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the `HandleFn` box registered in `add_handle`; it stays valid
    // until its free callback, which never runs while a callback is in flight, and only
    // the loop thread calls it, so the `&mut` is unique.
    let f = unsafe { opaque::value_mut::<HandleFn>(opaque) };
    catch(
        || format!("handle watch {watch}"),
        || f(watch, fd, Readiness::from_raw(events)),
    );
}

unsafe extern "C" fn timer_trampoline(timer: c_int, opaque: *mut c_void) {
    // SAFETY: as in `handle_trampoline`, for the `TimerFn` box of `add_timer`.
    let f = unsafe { opaque::value_mut::<TimerFn>(opaque) };
    catch(|| format!("timer {timer}"), || f(timer));
}
