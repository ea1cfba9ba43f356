//! Rust closures as callbacks on libvirt's event loop, through libvirt's public
//! `virEventAddHandle` and `virEventAddTimeout`.
//!
//! Each closure is boxed; the box's address is the opaque, and our free callback drops
//! the box. So the closure lives exactly as long as libvirt's registration, whichever
//! event implementation is registered, and a failed registration drops the box here.

use std::ffi::{c_int, c_void};
use std::os::fd::RawFd;

use virt::sys;

use super::panic::catch;
use crate::interest::{Interest, Readiness};

/// The closure type behind a handle watch.
pub(crate) type HandleFn = Box<dyn FnMut(i32, RawFd, Readiness) + Send>;
/// The closure type behind a timer.
pub(crate) type TimerFn = Box<dyn FnMut(i32) + Send>;

/// Registers `f` for `fd` with libvirt's current event implementation.
pub(crate) fn add_handle(fd: RawFd, interest: Interest, f: HandleFn) -> crate::Result<i32> {
    let opaque = Box::into_raw(Box::new(f)).cast::<c_void>();
    // SAFETY: the trampoline and free function match the opaque's type; libvirt owns
    // the box from here on and releases it through `free_handle_fn`.
    let id = unsafe {
        sys::virEventAddHandle(
            fd,
            interest.to_raw(),
            Some(handle_trampoline),
            opaque,
            Some(free_handle_fn),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take the box: reclaim it.
        drop(unsafe { Box::from_raw(opaque.cast::<HandleFn>()) });
        return Err(crate::Error::last_libvirt());
    }
    Ok(id)
}

/// Registers `f` as a timer with libvirt's current event implementation.
pub(crate) fn add_timer(frequency: i32, f: TimerFn) -> crate::Result<i32> {
    let opaque = Box::into_raw(Box::new(f)).cast::<c_void>();
    // SAFETY: as in `add_handle`.
    let id = unsafe {
        sys::virEventAddTimeout(
            frequency,
            Some(timer_trampoline),
            opaque,
            Some(free_timer_fn),
        )
    };
    if id < 0 {
        // SAFETY: as in `add_handle`.
        drop(unsafe { Box::from_raw(opaque.cast::<TimerFn>()) });
        return Err(crate::Error::last_libvirt());
    }
    Ok(id)
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

unsafe extern "C" fn handle_trampoline(watch: c_int, fd: c_int, events: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `HandleFn` box registered in `add_handle`; it stays valid
    // until `free_handle_fn`, which never runs while a callback is in flight, and only
    // the loop thread calls it, so the `&mut` is unique.
    let f = unsafe { &mut *opaque.cast::<HandleFn>() };
    catch(
        || format!("handle watch {watch}"),
        || f(watch, fd, Readiness::from_raw(events)),
    );
}

unsafe extern "C" fn timer_trampoline(timer: c_int, opaque: *mut c_void) {
    // SAFETY: as in `handle_trampoline`, for the `TimerFn` box of `add_timer`.
    let f = unsafe { &mut *opaque.cast::<TimerFn>() };
    catch(|| format!("timer {timer}"), || f(timer));
}

unsafe extern "C" fn free_handle_fn(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, after the watch is gone, with our box.
    let f = unsafe { Box::from_raw(opaque.cast::<HandleFn>()) };
    catch(|| "handle watch free".to_owned(), move || drop(f));
}

unsafe extern "C" fn free_timer_fn(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, after the timer is gone, with our box.
    let f = unsafe { Box::from_raw(opaque.cast::<TimerFn>()) };
    catch(|| "timer free".to_owned(), move || drop(f));
}
