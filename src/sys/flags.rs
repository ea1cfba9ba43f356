//! libvirt's flag values the upper layers pass to `virt` calls, so that only this
//! layer names `virt::sys`.

use virt::sys;

/// `VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM`.
pub(crate) const VOL_DOWNLOAD_SPARSE: u32 = sys::VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM;
/// `VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM`.
pub(crate) const VOL_UPLOAD_SPARSE: u32 = sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM;
/// `VIR_STORAGE_VOL_GET_PHYSICAL`.
pub(crate) const VOL_GET_PHYSICAL: u32 = sys::VIR_STORAGE_VOL_GET_PHYSICAL;
/// `VIR_DOMAIN_CONSOLE_FORCE`.
pub(crate) const CONSOLE_FORCE: u32 = sys::VIR_DOMAIN_CONSOLE_FORCE;
/// `VIR_DOMAIN_START_PAUSED`.
pub(crate) const DOMAIN_START_PAUSED: u32 = sys::VIR_DOMAIN_START_PAUSED;
