//! Storage volume upload and download on the reactor, sparse-aware, many at once.
//!
//! A download writes to `FILE.part` and renames it to `FILE` only once libvirt
//! confirmed the transfer (`virStreamFinish`), so a failed or interrupted download
//! never leaves a file that looks complete. In sparse mode holes travel as holes both
//! ways: the file gets them by seeking (and a final `set_len`), an upload finds them
//! with `SEEK_DATA`/`SEEK_HOLE`.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::error::{Error, Result};
use crate::ffi::file::{next_data, next_hole};
use crate::reactor::{Reactor, StreamToken};
use crate::stream::Stream;
use crate::transfer::{self, Transfer, TransferStats};

/// Which part of the volume, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeRange {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes to transfer; 0 means up to the end (download) or the whole file (upload).
    pub length: u64,
    /// Keep holes as holes (`VIR_STORAGE_VOL_*_SPARSE_STREAM`).
    pub sparse: bool,
}

/// What to call as a transfer goes.
pub struct Callbacks {
    /// After each step that moved bytes.
    pub progress: Box<dyn FnMut(TransferStats)>,
    /// Once, at the end.
    pub done: Box<dyn FnOnce(Result<TransferStats>)>,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Callbacks { .. }")
    }
}

/// Starts downloading `vol` into the file at `path` on `reactor`.
///
/// # Errors
///
/// The file cannot be created, or libvirt refuses the download (a missing volume, a
/// range beyond its end). Nothing is left behind then. Errors during the transfer go
/// to `callbacks.done`.
#[doc(alias = "virStorageVolDownload")]
pub fn download(
    reactor: &mut Reactor,
    conn: &Connect,
    vol: &StorageVol,
    path: &Path,
    range: VolumeRange,
    callbacks: Callbacks,
) -> Result<StreamToken> {
    let part = part_path(path);
    let file = File::create(&part).map_err(|e| file_error(&part, e))?;
    let started = start_download(reactor, conn, vol, file, path, &part, range, callbacks);
    if started.is_err() {
        let _ = fs::remove_file(&part);
    }
    started
}

#[allow(clippy::too_many_arguments)]
fn start_download(
    reactor: &mut Reactor,
    conn: &Connect,
    vol: &StorageVol,
    file: File,
    path: &Path,
    part: &Path,
    range: VolumeRange,
    callbacks: Callbacks,
) -> Result<StreamToken> {
    let stream = Stream::new(conn)?;
    let flags = if range.sparse {
        sys::VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
    } else {
        0
    };
    vol.download(&stream.to_virt(), range.offset, range.length, flags)?;

    let file = Rc::new(RefCell::new(file));
    let sink = Rc::clone(&file);
    let write = move |bytes: &[u8]| sink.borrow_mut().write_all(bytes);
    let transfer = if range.sparse {
        let holes = Rc::clone(&file);
        transfer::sparse_recv_all(write, move |length| {
            let offset = i64::try_from(length).map_err(|_| io::ErrorKind::InvalidInput)?;
            holes.borrow_mut().seek(SeekFrom::Current(offset)).map(drop)
        })
    } else {
        transfer::recv_all(write)
    };
    let (path, part) = (path.to_path_buf(), part.to_path_buf());
    let Callbacks { progress, done } = callbacks;
    let transfer = transfer.on_progress(progress).on_end(move |result| {
        let result = result.and_then(|stats| {
            complete_file(&file.borrow(), stats.position(), &part, &path).map(|()| stats)
        });
        if result.is_err() {
            let _ = fs::remove_file(&part);
        }
        done(result);
    });
    insert(reactor, stream, transfer)
}

/// Starts uploading the file at `path` into `vol` on `reactor`.
///
/// # Errors
///
/// The file cannot be read, it holds more than the volume from `range.offset` on
/// ([`Error::VolumeTooSmall`]), or libvirt refuses the upload (a missing volume). Errors during the transfer go to `callbacks.done`.
#[doc(alias = "virStorageVolUpload")]
pub fn upload(
    reactor: &mut Reactor,
    conn: &Connect,
    vol: &StorageVol,
    path: &Path,
    range: VolumeRange,
    callbacks: Callbacks,
) -> Result<StreamToken> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    let size = file.metadata().map_err(|e| file_error(path, e))?.len();
    let length = if range.length == 0 {
        size
    } else {
        range.length.min(size)
    };
    let capacity = vol.info()?.capacity;
    if range.offset.saturating_add(length) > capacity {
        return Err(Error::VolumeTooSmall {
            needed: range.offset.saturating_add(length),
            capacity,
        });
    }
    let stream = Stream::new(conn)?;
    let flags = if range.sparse {
        sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
    } else {
        0
    };
    vol.upload(&stream.to_virt(), range.offset, length, flags)?;

    let source = Rc::new(RefCell::new(Source {
        file,
        position: 0,
        end: length,
    }));
    let reader = Rc::clone(&source);
    let read = move |buf: &mut [u8]| reader.borrow_mut().read(buf);
    let transfer = if range.sparse {
        let probe = Rc::clone(&source);
        let skipper = Rc::clone(&source);
        transfer::sparse_send_all(
            read,
            move || probe.borrow_mut().section(),
            move |length| skipper.borrow_mut().skip(length),
        )
    } else {
        transfer::send_all(read)
    };
    let Callbacks { progress, done } = callbacks;
    let transfer = transfer.on_progress(progress).on_end(done);
    insert(reactor, stream, transfer)
}

fn insert(reactor: &mut Reactor, stream: Stream, transfer: Transfer) -> Result<StreamToken> {
    let interest = transfer.interest();
    reactor.insert(stream, interest, transfer)
}

/// The part of the source file an upload sends: `[0, end)`.
struct Source {
    file: File,
    position: u64,
    end: u64,
}

impl Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.position).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        // Positioned read: `section` probes with lseek(SEEK_DATA/SEEK_HOLE), which
        // moves the file offset to the end of the data section.
        let n = self.file.read_at(&mut buf[..want], self.position)?;
        self.position += n as u64;
        Ok(n)
    }

    /// Where the source is: `(true, n)` n bytes of data, `(false, n)` a hole of n
    /// bytes, `(_, 0)` the end.
    fn section(&mut self) -> io::Result<(bool, u64)> {
        if self.position >= self.end {
            return Ok((false, 0));
        }
        let data = next_data(&self.file, self.position)?
            .unwrap_or(self.end)
            .min(self.end);
        if data > self.position {
            return Ok((false, data - self.position));
        }
        let hole = next_hole(&self.file, self.position)?.min(self.end);
        Ok((true, hole - self.position))
    }

    fn skip(&mut self, length: u64) -> io::Result<()> {
        self.position += length;
        Ok(())
    }
}

/// `FILE.part`, next to `FILE`.
fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// Sizes the file (trailing holes included), syncs it and gives it its real name.
fn complete_file(file: &File, size: u64, part: &Path, path: &Path) -> Result<()> {
    file.set_len(size).map_err(|e| file_error(part, e))?;
    file.sync_all().map_err(|e| file_error(part, e))?;
    fs::rename(part, path).map_err(|e| file_error(path, e))
}

fn file_error(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
