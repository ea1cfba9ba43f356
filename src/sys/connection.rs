//! Rust closures as a connection's event callbacks: domain lifecycle events
//! (`virConnectDomainEventRegisterAny`) and the close callback
//! (`virConnectRegisterCloseCallback`).
//!
//! Each closure is the registration's opaque (see [`super::opaque`]). libvirt calls
//! lifecycle callbacks from the timer that flushes its event queue, and the close
//! callback from the connection's socket watch or keepalive timer: both on the loop.

use std::ffi::{c_int, c_void, CStr};
use std::{mem, ptr};

use virt::connect::Connect;
use virt::sys;

use super::opaque;
use super::panic::catch;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleEvent, LifecycleKind};

/// The closure behind a lifecycle subscription.
pub(crate) type LifecycleFn = Box<dyn FnMut(LifecycleEvent) + Send>;
/// The closure behind a close watch.
pub(crate) type CloseFn = Box<dyn FnMut(CloseReason) + Send>;

/// `virConnectDomainEventCallback`, the lifecycle shape of the generic callback.
type LifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
/// `virConnectDomainEventGenericCallback`, what the register call is declared with.
type GenericCallback = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// How many lifecycle subscriptions one connection may have at a time.
pub(crate) const LIFECYCLE_SLOTS: usize = 32;

macro_rules! lifecycle_trampolines {
    ($($slot:literal)*) => {
        [$(lifecycle_trampoline::<$slot> as LifecycleCallback),*]
    };
}

/// libvirt refuses to register the same function twice for one event on one
/// connection ("event callback already tracked"), so each live subscription on a
/// connection gets a trampoline of its own, by slot; the caller keeps track of
/// which slots of a connection are taken.
const LIFECYCLE_TRAMPOLINES: [LifecycleCallback; LIFECYCLE_SLOTS] = lifecycle_trampolines![
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
];

/// Subscribes `f` to lifecycle events of every domain on `conn`, through the
/// trampoline of `slot` (below [`LIFECYCLE_SLOTS`], not in use on `conn`). Returns
/// libvirt's callback id.
pub(crate) fn register_lifecycle(conn: &Connect, slot: usize, f: LifecycleFn) -> Result<i32> {
    // SAFETY: what C's VIR_DOMAIN_EVENT_CALLBACK does: for VIR_DOMAIN_EVENT_ID_LIFECYCLE
    // libvirt casts the pointer back and calls it with the lifecycle signature.
    let generic = unsafe {
        mem::transmute::<LifecycleCallback, GenericCallback>(LIFECYCLE_TRAMPOLINES[slot])
    };
    opaque::register(f, |opaque, free| {
        // SAFETY: `conn` is a live connection for the whole call; NULL means every
        // domain; the trampoline matches the opaque's type, and libvirt owns the box
        // from here on and releases it through `free`.
        unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(generic),
                opaque,
                free,
            )
        }
    })
}

/// Removes a subscription; libvirt frees its closure now, or right after the
/// dispatch in flight.
pub(crate) fn deregister_lifecycle(conn: &Connect, id: i32) -> Result<()> {
    // SAFETY: `conn` is live; an unknown id is reported as an error.
    if unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) } < 0 {
        return Err(Error::last_libvirt());
    }
    Ok(())
}

/// Identifies a connection (as a map key): its address, only ever compared.
pub(crate) fn connection_key(conn: &Connect) -> usize {
    // SAFETY: only the address is read, as a map key.
    unsafe { conn.as_ptr() as usize }
}

/// Registers `f` as the close callback of `conn` (libvirt allows one per connection).
pub(crate) fn register_close(conn: &Connect, f: CloseFn) -> Result<()> {
    opaque::register(f, |opaque, free| {
        // SAFETY: as in `register_lifecycle`, with the close callback's own signature.
        unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(close_trampoline),
                opaque,
                free,
            )
        }
    })
    .map(drop)
}

/// Unregisters the close callback of `conn`; libvirt frees its closure, if it kept it.
pub(crate) fn unregister_close(conn: &Connect) -> Result<()> {
    // SAFETY: `conn` is live; libvirt compares the pointer with the registered one.
    if unsafe { sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(close_trampoline)) } < 0
    {
        return Err(Error::last_libvirt());
    }
    Ok(())
}

unsafe extern "C" fn lifecycle_trampoline<const SLOT: usize>(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `LifecycleFn` box of `register_lifecycle`. libvirt calls
    // it only from its event-queue flush, one event at a time on the loop thread, and
    // defers the free callback of a subscription removed meanwhile until the flush ends.
    let f = unsafe { opaque::value_mut::<LifecycleFn>(opaque) };
    let event = LifecycleEvent {
        // SAFETY: `dom` is valid for this call.
        domain: unsafe { domain_name(dom) },
        kind: LifecycleKind::from_raw(event),
        detail,
    };
    // Naming SLOT also keeps the trampolines' bodies distinct, so the compiler
    // cannot merge them into one address.
    catch(
        || format!("domain lifecycle callback (slot {SLOT})"),
        move || f(event),
    );
    0 // ignored by libvirt
}

/// Copies the name of `dom`.
///
/// # Safety
///
/// `dom` must be a valid domain pointer.
unsafe fn domain_name(dom: sys::virDomainPtr) -> String {
    // SAFETY: the caller guarantees `dom`; the name lives as long as `dom` does.
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() {
        log::warn!("lifecycle event for a domain without a name");
        return String::new();
    }
    // SAFETY: non-NULL and NUL-terminated, owned by `dom`.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

unsafe extern "C" fn close_trampoline(
    _conn: sys::virConnectPtr,
    reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the `CloseFn` box of `register_close`. libvirt calls it and
    // then frees it under the connection's close-callback lock, so calls never overlap.
    let f = unsafe { opaque::value_mut::<CloseFn>(opaque) };
    catch(
        || format!("close callback (reason {reason})"),
        || f(CloseReason::from_raw(reason)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_trampolines_are_distinct_functions() {
        let mut addresses: Vec<usize> = LIFECYCLE_TRAMPOLINES.iter().map(|f| *f as usize).collect();
        addresses.sort_unstable();
        addresses.dedup();
        assert_eq!(addresses.len(), LIFECYCLE_SLOTS);
    }
}
