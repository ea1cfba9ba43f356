//! Rust values handed to libvirt as a registration's opaque pointer.
//!
//! The value is boxed and the box's address is the opaque; the free callback libvirt
//! calls when the registration goes drops the box. So the value lives exactly as long
//! as libvirt's registration, and a failed registration drops it here.
//!
//! libvirt may call a free callback inside its own locks, so upper layers hand over
//! only values whose drop calls nothing of libvirt's (a closure around an inbox
//! handle and a key); what they own for longer stays with them.

use std::ffi::{c_int, c_void};

use virt::sys;

use super::panic::catch;

/// Boxes `value` and passes the box to `register` as the opaque, with the free
/// callback that drops it. `register` makes the libvirt call and returns its result;
/// a negative result means libvirt did not take the box, so it is dropped here and
/// libvirt's error is returned.
pub(crate) fn register<T: Send + 'static>(
    value: T,
    register: impl FnOnce(*mut c_void, sys::virFreeCallback) -> c_int,
) -> crate::vocab::error::Result<c_int> {
    let opaque = Box::into_raw(Box::new(value)).cast::<c_void>();
    let id = register(opaque, Some(free_boxed::<T>));
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take the box: reclaim it.
        drop(unsafe { Box::from_raw(opaque.cast::<T>()) });
        return Err(crate::vocab::error::Error::last_libvirt());
    }
    Ok(id)
}

/// The value behind an opaque made by [`register`].
///
/// # Safety
///
/// `opaque` must come from `register::<T>`, its free callback must not have run, and
/// no other reference to the value may exist while the returned one lives.
pub(crate) unsafe fn value_mut<'a, T>(opaque: *mut c_void) -> &'a mut T {
    // SAFETY: the caller guarantees a live, unaliased box of `T`.
    unsafe { &mut *opaque.cast::<T>() }
}

unsafe extern "C" fn free_boxed<T>(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, after the registration is gone, with our box.
    let value = unsafe { Box::from_raw(opaque.cast::<T>()) };
    catch(
        || format!("free of {}", std::any::type_name::<T>()),
        move || drop(value),
    );
}
