//! The six functions registered with `virEventRegisterImpl`, and the one static the
//! crate has: libvirt's event API passes no context pointer, so these functions can
//! only find the implementation through it.
//!
//! The implementation is the upper layer's ([`EventImpl`], the engine's tables); this
//! layer knows only the trait. The same static records which loop this process
//! registered, under one lock, so two registrations cannot race past each other's
//! checks, and a failed one leaves nothing installed.

use std::ffi::{c_int, c_void};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use virt::sys;

use super::callback::{FreeCallback, HandleCallback, TimerCallback};
use super::panic::catch;
use crate::vocab::error::{Error, Result};
use crate::vocab::interest::Interest;
use crate::vocab::sync::lock;

/// What libvirt's six event functions do; the engine implements it.
pub(crate) trait EventImpl: Sync {
    fn add_handle(
        &self,
        fd: RawFd,
        interest: Interest,
        callback: HandleCallback,
        free: Option<FreeCallback>,
    ) -> i32;
    fn update_handle(&self, watch: i32, interest: Interest);
    fn remove_handle(&self, watch: i32) -> i32;
    fn add_timeout(
        &self,
        frequency: i32,
        callback: TimerCallback,
        free: Option<FreeCallback>,
    ) -> i32;
    fn update_timeout(&self, timer: i32, frequency: i32);
    fn remove_timeout(&self, timer: i32) -> i32;
    /// A callback running on the loop panicked: report it to whoever runs the loop.
    fn report_panic(&self, origin: String, message: String);
}

/// Which event loop this process registered with libvirt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    Nothing,
    /// virt-reactor's.
    Ours,
    /// libvirt's default one (`virEventRegisterDefaultImpl`).
    #[cfg(feature = "default-loop")]
    Default,
}

struct Registry {
    /// Held for the whole of a registration.
    registered: Mutex<Registered>,
    /// Read on every call libvirt makes, so without a lock; null when nothing is
    /// installed.
    implementation: AtomicPtr<Installed>,
    /// Calls of our `add_timeout`, to see whether libvirt uses our functions.
    timeouts_added: AtomicU64,
    /// Set in a child forked after registration, which shares the parent's epoll
    /// instance (`pthread_atfork` gives its handler no context pointer either).
    forked: AtomicBool,
    watching_forks: Once,
}

static REGISTRY: Registry = Registry {
    registered: Mutex::new(Registered::Nothing),
    implementation: AtomicPtr::new(ptr::null_mut()),
    timeouts_added: AtomicU64::new(0),
    forked: AtomicBool::new(false),
    watching_forks: Once::new(),
};

/// What this process registered.
pub(crate) fn registered() -> Registered {
    *lock(&REGISTRY.registered)
}

/// An installed implementation, boxed so that one pointer holds it.
struct Installed(&'static dyn EventImpl);

/// Our implementation, once registered.
pub(crate) fn implementation() -> Option<&'static dyn EventImpl> {
    let installed = REGISTRY.implementation.load(Ordering::Acquire);
    // SAFETY: a non-null pointer comes from `install`'s `Box::into_raw`, and those
    // boxes are never freed (at most two are made in a process).
    (!installed.is_null()).then(|| unsafe { (*installed).0 })
}

fn install(implementation: Option<&'static dyn EventImpl>) {
    let installed = match implementation {
        Some(implementation) => Box::into_raw(Box::new(Installed(implementation))),
        None => ptr::null_mut(),
    };
    // The box replaced is leaked on purpose: a call in flight may still read it.
    REGISTRY.implementation.store(installed, Ordering::Release);
}

/// Registers `implementation` with `virEventRegisterImpl`, once per process, and
/// keeps it for the life of the process (libvirt keeps its registration that long).
///
/// libvirt ignores a second registration with only a warning, so a probe timer
/// checks that libvirt calls our functions; if it does not, nothing stays installed
/// (`implementation` is dropped) and the error says why: every retry says the same.
pub(crate) fn register<T: EventImpl + 'static>(implementation: Box<T>) -> Result<&'static T> {
    let mut kept = None;
    claim(Registered::Ours, || {
        // SAFETY: plain call; libvirt's global initialisation, idempotent.
        if unsafe { sys::virInitialize() } < 0 {
            return Err(Error::last_libvirt());
        }
        let leaked: &'static T = Box::leak(implementation);
        install(Some(leaked));
        // SAFETY: the six functions match libvirt's typedefs and stay valid for the
        // life of the process.
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
        let before = REGISTRY.timeouts_added.load(Ordering::SeqCst);
        // SAFETY: a disabled timer with a no-op callback and no opaque, removed at once.
        let probe = unsafe { sys::virEventAddTimeout(-1, Some(noop_timer), ptr::null_mut(), None) };
        if probe > 0 {
            // SAFETY: plain integer argument.
            unsafe { sys::virEventRemoveTimeout(probe) };
        }
        let reached_us = REGISTRY.timeouts_added.load(Ordering::SeqCst) != before;
        if probe <= 0 || !reached_us {
            install(None);
            if !reached_us {
                // SAFETY: libvirt never called our functions, and `install(None)`
                // took the only other reference away under the registration lock:
                // nothing can use the leaked box any more, so it is reclaimed.
                drop(unsafe { Box::from_raw(std::ptr::from_ref(leaked).cast_mut()) });
            }
            return Err(Error::ForeignImplRegistered);
        }
        REGISTRY.watching_forks.call_once(|| {
            // SAFETY: a plain function with no preconditions, valid for the life of
            // the process.
            if unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) } != 0 {
                log::warn!("pthread_atfork failed: use after fork will not be detected");
            }
        });
        kept = Some(leaked);
        Ok(())
    })?;
    Ok(kept.expect("set when the registration succeeded"))
}

/// Registers libvirt's default loop (`virEventRegisterDefaultImpl`), under the same
/// lock and rules as [`register`].
#[cfg(feature = "default-loop")]
pub(crate) fn register_default() -> Result<()> {
    claim(Registered::Default, || {
        // SAFETY: plain call, before any connection of ours exists.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return Err(Error::last_libvirt());
        }
        Ok(())
    })
}

/// Runs `register` under the registration lock if nothing is registered yet, and
/// records `what` when it succeeds.
fn claim(what: Registered, register: impl FnOnce() -> Result<()>) -> Result<()> {
    let mut registered = lock(&REGISTRY.registered);
    if *registered != Registered::Nothing {
        return Err(Error::AlreadyRegistered);
    }
    register()?;
    *registered = what;
    Ok(())
}

/// Whether this is a child forked after registration.
pub(crate) fn is_forked_child() -> bool {
    REGISTRY.forked.load(Ordering::Relaxed)
}

extern "C" fn in_forked_child() {
    REGISTRY.forked.store(true, Ordering::Relaxed);
}

unsafe extern "C" fn noop_timer(_timer: c_int, _opaque: *mut c_void) {}

/// Runs `f` with our implementation, or answers `missing` when there is none.
fn with_impl<R>(
    origin: impl FnOnce() -> String,
    missing: R,
    f: impl FnOnce(&dyn EventImpl) -> R,
) -> R {
    match implementation() {
        Some(implementation) => catch(origin, || f(implementation)).unwrap_or(missing),
        None => missing,
    }
}

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
    with_impl(
        || format!("addHandle(fd {fd})"),
        -1,
        |i| i.add_handle(fd, Interest::from_raw(events), callback, free),
    )
}

unsafe extern "C" fn update_handle(watch: c_int, events: c_int) {
    with_impl(
        || format!("updateHandle(watch {watch})"),
        (),
        |i| i.update_handle(watch, Interest::from_raw(events)),
    );
}

unsafe extern "C" fn remove_handle(watch: c_int) -> c_int {
    with_impl(
        || format!("removeHandle(watch {watch})"),
        -1,
        |i| i.remove_handle(watch),
    )
}

unsafe extern "C" fn add_timeout(
    frequency: c_int,
    cb: sys::virEventTimeoutCallback,
    opaque: *mut c_void,
    ff: sys::virFreeCallback,
) -> c_int {
    REGISTRY.timeouts_added.fetch_add(1, Ordering::SeqCst);
    let (Some(callback), free) = (
        TimerCallback::new(cb, opaque),
        FreeCallback::new(ff, opaque),
    ) else {
        log::warn!("virEventAddTimeout without a callback: refused");
        return -1;
    };
    with_impl(
        || "addTimeout".to_owned(),
        -1,
        |i| i.add_timeout(frequency, callback, free),
    )
}

unsafe extern "C" fn update_timeout(timer: c_int, frequency: c_int) {
    with_impl(
        || format!("updateTimeout(timer {timer})"),
        (),
        |i| i.update_timeout(timer, frequency),
    );
}

unsafe extern "C" fn remove_timeout(timer: c_int) -> c_int {
    with_impl(
        || format!("removeTimeout(timer {timer})"),
        -1,
        |i| i.remove_timeout(timer),
    )
}
