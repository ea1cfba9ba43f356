//! Raw libvirt streams: one owned reference, non-blocking calls with libvirt's return
//! codes, and the event callback: a closure the caller hands over as the opaque,
//! dropped by libvirt's free callback when the callback is removed.

use std::ffi::{c_char, c_int, c_longlong, c_void};

use virt::connect::Connect;
use virt::stream::Stream as VirtStream;
use virt::sys;

use super::opaque;
use super::panic::catch;
use crate::vocab::error::{Error, Result};
use crate::vocab::interest::{Interest, Readiness};

/// The closure behind a stream's event callback.
pub(crate) type StreamFn = Box<dyn FnMut(Readiness) + Send>;

/// One reference to a `virStreamPtr`, released exactly once when dropped.
pub(crate) struct RawStream {
    ptr: sys::virStreamPtr,
}

// SAFETY: libvirt stream objects are reference counted and internally locked; every
// call below is allowed from any thread.
unsafe impl Send for RawStream {}
// SAFETY: as above: every method takes `&self`, and libvirt locks the stream (and
// its connection) itself, so calls from several threads at once are allowed too.
unsafe impl Sync for RawStream {}

impl RawStream {
    /// `virStreamNew(conn, VIR_STREAM_NONBLOCK)`.
    pub(crate) fn new_nonblocking(conn: &Connect) -> Result<RawStream> {
        // SAFETY: `conn` is a live connection for the duration of the call.
        let ptr = unsafe { sys::virStreamNew(conn.as_ptr(), sys::VIR_STREAM_NONBLOCK) };
        if ptr.is_null() {
            return Err(Error::last_libvirt());
        }
        Ok(RawStream { ptr })
    }

    /// Another reference to the same stream, released when dropped.
    pub(crate) fn new_ref(&self) -> RawStream {
        // SAFETY: `self.ptr` is live; the reference taken here is owned by the result.
        unsafe { sys::virStreamRef(self.ptr) };
        RawStream { ptr: self.ptr }
    }

    /// Calls `f` with a `virt` handle on the same stream (its own reference, released
    /// after `f`), for the `virt` calls that attach a stream: `StorageVol::download`,
    /// `Domain::open_console`, ...
    pub(crate) fn with_virt<R>(&self, f: impl FnOnce(&VirtStream) -> R) -> R {
        // SAFETY: `self.ptr` is live; the new reference is owned by `virt`, which frees
        // it when dropped at the end of this call.
        let virt = unsafe {
            sys::virStreamRef(self.ptr);
            VirtStream::from_ptr(self.ptr)
        };
        f(&virt)
    }

    /// Returns libvirt's code: bytes sent, -1 error, -2 would block.
    pub(crate) fn send(&self, buf: &[u8]) -> i32 {
        // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
        unsafe { sys::virStreamSend(self.ptr, buf.as_ptr().cast::<c_char>(), buf.len()) }
    }

    /// Returns libvirt's code: bytes received, 0 end of stream, -1 error, -2 would
    /// block, -3 (with `stop_at_hole`) positioned at a hole.
    pub(crate) fn recv(&self, buf: &mut [u8], stop_at_hole: bool) -> i32 {
        let data = buf.as_mut_ptr().cast::<c_char>();
        if stop_at_hole {
            // SAFETY: `buf` is valid and writable for `buf.len()` bytes.
            unsafe {
                sys::virStreamRecvFlags(
                    self.ptr,
                    data,
                    buf.len(),
                    sys::VIR_STREAM_RECV_STOP_AT_HOLE,
                )
            }
        } else {
            // Plain virStreamRecv: local streams (consoles) have no RecvFlags.
            // SAFETY: as above.
            unsafe { sys::virStreamRecv(self.ptr, data, buf.len()) }
        }
    }

    /// The length of the hole the stream is positioned at.
    pub(crate) fn recv_hole(&self) -> Result<u64> {
        let mut length: c_longlong = 0;
        // SAFETY: `length` is a valid out-pointer for the call.
        if unsafe { sys::virStreamRecvHole(self.ptr, &mut length, 0) } < 0 {
            return Err(Error::last_libvirt());
        }
        Ok(u64::try_from(length).unwrap_or(0))
    }

    pub(crate) fn send_hole(&self, length: u64) -> Result<()> {
        let length = c_longlong::try_from(length).unwrap_or(c_longlong::MAX);
        // SAFETY: plain arguments on a live stream.
        check(unsafe { sys::virStreamSendHole(self.ptr, length, 0) })
    }

    /// Registers the stream's one event callback: `f` hears each event.
    pub(crate) fn add_callback(&self, interest: Interest, f: StreamFn) -> Result<()> {
        opaque::register(f, |opaque, free| {
            // SAFETY: the trampoline matches the opaque's type; libvirt owns the box
            // from here on and releases it through `free`.
            unsafe {
                sys::virStreamEventAddCallback(
                    self.ptr,
                    interest.to_raw(),
                    Some(stream_event),
                    opaque,
                    free,
                )
            }
        })
        .map(drop)
    }

    pub(crate) fn update_callback(&self, interest: Interest) -> Result<()> {
        // SAFETY: plain arguments on a live stream.
        check(unsafe { sys::virStreamEventUpdateCallback(self.ptr, interest.to_raw()) })
    }

    pub(crate) fn remove_callback(&self) -> Result<()> {
        // SAFETY: plain argument on a live stream.
        check(unsafe { sys::virStreamEventRemoveCallback(self.ptr) })
    }

    pub(crate) fn finish(&self) -> Result<()> {
        // SAFETY: plain argument on a live stream.
        check(unsafe { sys::virStreamFinish(self.ptr) })
    }

    pub(crate) fn abort(&self) -> Result<()> {
        // SAFETY: plain argument on a live stream.
        check(unsafe { sys::virStreamAbort(self.ptr) })
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        // SAFETY: we own exactly one reference, released here once.
        if unsafe { sys::virStreamFree(self.ptr) } < 0 {
            log::warn!("virStreamFree failed: {}", Error::last_libvirt());
        }
    }
}

fn check(code: c_int) -> Result<()> {
    if code < 0 {
        Err(Error::last_libvirt())
    } else {
        Ok(())
    }
}

unsafe extern "C" fn stream_event(_stream: sys::virStreamPtr, events: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `StreamFn` box of `add_callback`; libvirt calls it on
    // the loop thread only, never concurrently, and frees it only after removal.
    let f = unsafe { opaque::value_mut::<StreamFn>(opaque) };
    catch(
        || "stream event callback".to_owned(),
        || f(Readiness::from_raw(events)),
    );
}
