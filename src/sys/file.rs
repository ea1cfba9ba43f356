//! `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`: where a sparse file's data and holes are;
//! `flock(2)`, so two downloads never share a resumable `.part`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The next data or hole boundary at or after `offset`: `whence` is `SEEK_DATA` or
/// `SEEK_HOLE`. `None` when there is no data after `offset` (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on an fd the `File` keeps open; it only moves the file offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(at as u64))
}

/// The start of the next data at or after `offset`, if any.
pub(crate) fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The start of the next hole at or after `offset` (the end of file counts as one).
pub(crate) fn next_hole(file: &File, offset: u64) -> io::Result<u64> {
    Ok(seek(file, offset, libc::SEEK_HOLE)?.unwrap_or(offset))
}

/// Takes `flock(LOCK_EX | LOCK_NB)` on `file`: false when another open file holds it.
/// The lock goes with the file's last descriptor.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd the `File` keeps open; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}
