//! libvirt's `(callback, opaque, free)` triples, as plain values the engine can store.
//!
//! libvirt hands us C function pointers with an opaque pointer it owns. The engine
//! keeps them in its tables, copies them out under its lock, and calls them with the
//! lock released. These wrappers are the only way to call them.

use std::ffi::{c_int, c_void};

use virt::sys;

use crate::vocab::interest::Readiness;

/// A handle (fd watch) callback and its opaque data.
#[derive(Clone, Copy)]
pub(crate) struct HandleCallback {
    func: unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void),
    opaque: *mut c_void,
}

/// A timer callback and its opaque data.
#[derive(Clone, Copy)]
pub(crate) struct TimerCallback {
    func: unsafe extern "C" fn(c_int, *mut c_void),
    opaque: *mut c_void,
}

/// A free callback with the opaque it releases: runs at most once, by value.
pub(crate) struct FreeCallback {
    func: unsafe extern "C" fn(*mut c_void),
    opaque: *mut c_void,
}

// SAFETY: libvirt's event contract requires that callbacks and free callbacks may be
// invoked from the event loop thread, whichever thread registered them; the opaque is
// only ever handed back to those callbacks, never dereferenced by us.
unsafe impl Send for HandleCallback {}
// SAFETY: as above.
unsafe impl Send for TimerCallback {}
// SAFETY: as above.
unsafe impl Send for FreeCallback {}

impl HandleCallback {
    /// `None` when libvirt passed a NULL callback.
    pub(crate) fn new(func: sys::virEventHandleCallback, opaque: *mut c_void) -> Option<Self> {
        func.map(|func| HandleCallback { func, opaque })
    }

    pub(crate) fn call(self, watch: i32, fd: i32, readiness: Readiness) {
        // SAFETY: libvirt gave us this pointer pair for exactly this call shape, and
        // keeps `opaque` valid until its free callback runs, which the engine defers
        // until no dispatch is in flight.
        unsafe { (self.func)(watch, fd, readiness.to_raw(), self.opaque) }
    }
}

impl TimerCallback {
    /// `None` when libvirt passed a NULL callback.
    pub(crate) fn new(func: sys::virEventTimeoutCallback, opaque: *mut c_void) -> Option<Self> {
        func.map(|func| TimerCallback { func, opaque })
    }

    pub(crate) fn call(self, timer: i32) {
        // SAFETY: as for `HandleCallback::call`.
        unsafe { (self.func)(timer, self.opaque) }
    }
}

impl FreeCallback {
    /// `None` when libvirt passed no free callback.
    pub(crate) fn new(func: sys::virFreeCallback, opaque: *mut c_void) -> Option<Self> {
        func.map(|func| FreeCallback { func, opaque })
    }

    pub(crate) fn run(self) {
        // SAFETY: the free callback releases `opaque`; consuming `self` guarantees it
        // runs once, and the engine only runs it after the registration is removed
        // and no callback using `opaque` is running.
        unsafe { (self.func)(self.opaque) }
    }
}
