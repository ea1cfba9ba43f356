//! Storage volume upload and download on the reactor, sparse-aware, many at once.
//!
//! A download into a new FILE writes to a private `FILE.<pid>-<n>.part`, created
//! exclusively, and gives it its name only once libvirt confirmed the transfer
//! (`virStreamFinish`): a failed or interrupted download never leaves a file that
//! looks complete, two downloads never share a `.part`, and a name taken meanwhile
//! is not replaced. Whatever is already at FILE is left alone unless
//! [`VolumeRange::force`] asks otherwise; a directory always is. In sparse mode
//! holes travel as holes both ways: the file gets them by seeking (and a final
//! `set_len`), an upload finds them with `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Both directions check the range against the volume before they start, and count
//! the bytes: a source that ends early, or a volume that sends fewer bytes than
//! asked, fails the transfer.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use virt::storage_vol::StorageVol;

use crate::streams::reactor::Reactor;
use crate::streams::stream::Stream;
use crate::streams::token::StreamToken;
use crate::streams::transfer::{self, Transfer, TransferStats};
use crate::sys::file::{next_data, next_hole};
use crate::sys::flags::{VOL_DOWNLOAD_SPARSE, VOL_GET_PHYSICAL, VOL_UPLOAD_SPARSE};
use crate::vocab::error::{Error, Result};

/// Which part of the volume, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeRange {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes to transfer; 0 means up to the end (download) or the whole file (upload).
    pub length: u64,
    /// Keep holes as holes (`VIR_STORAGE_VOL_*_SPARSE_STREAM`).
    pub sparse: bool,
    /// Download over something that exists: a regular file is replaced once the
    /// download is complete; a device or FIFO is written through, never replaced
    /// (holes are written as zeros, a FIFO's open waits for its reader, and a failed
    /// download leaves what it wrote); a symbolic link is followed to what it names,
    /// which is treated the same way. A directory is always refused. Without it,
    /// anything at the destination is refused with [`Error::DestinationExists`].
    pub force: bool,
}

/// Starts downloading `vol` into the file at `path` on `reactor`. `on_progress`
/// hears each step that moved bytes, `on_end` the totals once libvirt confirmed the
/// transfer and the file is in place, or the error that ended it (a short transfer
/// included); both get the application's state.
///
/// # Errors
///
/// [`Error::OutOfRange`] when the range reaches past the volume's end;
/// [`Error::DestinationExists`] when something is at `path` and `range.force` does
/// not allow writing over it; the file cannot be created, or libvirt refuses the
/// download (a missing volume). Nothing is left behind then.
#[doc(alias = "virStorageVolDownload")]
pub fn download<S: 'static>(
    reactor: &mut Reactor<S>,
    vol: &StorageVol,
    path: &Path,
    range: VolumeRange,
    on_progress: impl FnMut(&mut S, TransferStats) + Send + 'static,
    on_end: impl FnOnce(&mut S, Result<TransferStats>) + Send + 'static,
) -> Result<StreamToken> {
    // The physical size is what a download streams (for raw volumes, the capacity);
    // a driver without the flag gives the capacity.
    let size = match vol.info_flags(VOL_GET_PHYSICAL) {
        Ok(info) => info.allocation,
        Err(_) => vol.info()?.capacity,
    };
    let length = download_length(range, size)?;
    let sink = Destination::open(path, range.force)?;
    let stream = match open_stream(vol, |stream, vol| {
        // Always a definite length: libvirt then never sends more than was checked.
        let flags = if range.sparse { VOL_DOWNLOAD_SPARSE } else { 0 };
        vol.download(stream, range.offset, length, flags)
    }) {
        Ok(stream) => stream,
        Err(e) => {
            sink.discard();
            return Err(e);
        }
    };
    let transfer = Transfer::receive(Download { sink, length }, range.sparse);
    insert(reactor, stream, transfer, on_progress, on_end)
}

/// The bytes to download: the range must lie inside the volume's `size` bytes.
fn download_length(range: VolumeRange, size: u64) -> Result<u64> {
    let out_of_range = Error::OutOfRange {
        offset: range.offset,
        length: range.length,
        size,
    };
    let Some(available) = size.checked_sub(range.offset) else {
        return Err(out_of_range);
    };
    match range.length {
        // An empty range at the very end is a mistake, not a download.
        0 if available == 0 && range.offset > 0 => Err(out_of_range),
        0 => Ok(available),
        length if length > available => Err(out_of_range),
        length => Ok(length),
    }
}

/// Starts uploading the file at `path` into `vol` on `reactor`, with the same
/// callbacks as [`download`].
///
/// A regular file or block device is read from its start; anything else (a pipe, a
/// character device) is read as a plain stream, which needs `range.length`, and
/// blocks the loop while it waits for data. Exactly `range.length` bytes are sent
/// (the whole file when 0): a source that ends before fails the transfer.
///
/// # Errors
///
/// The file cannot be read, holds fewer bytes than `range.length`, or its size is
/// unknown and no length was given; it holds more than the volume from
/// `range.offset` on ([`Error::VolumeTooSmall`]), or libvirt refuses the upload (a
/// missing volume).
#[doc(alias = "virStorageVolUpload")]
pub fn upload<S: 'static>(
    reactor: &mut Reactor<S>,
    vol: &StorageVol,
    path: &Path,
    range: VolumeRange,
    on_progress: impl FnMut(&mut S, TransferStats) + Send + 'static,
    on_end: impl FnOnce(&mut S, Result<TransferStats>) + Send + 'static,
) -> Result<StreamToken> {
    let source = Source::open(path, range.length)?;
    let length = source.end;
    let capacity = vol.info()?.capacity;
    if range.offset.saturating_add(length) > capacity {
        return Err(Error::VolumeTooSmall {
            needed: range.offset.saturating_add(length),
            capacity,
        });
    }
    let stream = open_stream(vol, |stream, vol| {
        let flags = if range.sparse { VOL_UPLOAD_SPARSE } else { 0 };
        vol.upload(stream, range.offset, length, flags)
    })?;
    let transfer = Transfer::send(source, range.sparse);
    insert(reactor, stream, transfer, on_progress, on_end)
}

/// A new stream on `vol`'s connection, attached by `attach`.
fn open_stream(
    vol: &StorageVol,
    attach: impl FnOnce(
        &virt::stream::Stream,
        &StorageVol,
    ) -> std::result::Result<(), virt::error::Error>,
) -> Result<Stream> {
    let conn = vol.connect()?;
    let mut stream = Stream::new(&conn)?;
    stream.with_virt(|virt_stream| attach(virt_stream, vol))?;
    Ok(stream)
}

fn insert<S: 'static>(
    reactor: &mut Reactor<S>,
    stream: Stream,
    transfer: Transfer<S>,
    on_progress: impl FnMut(&mut S, TransferStats) + Send + 'static,
    on_end: impl FnOnce(&mut S, Result<TransferStats>) + Send + 'static,
) -> Result<StreamToken> {
    let interest = transfer.interest();
    reactor.insert(
        stream,
        interest,
        transfer.on_progress(on_progress).on_end(on_end),
    )
}

/// A download's sink, with the bytes the volume must send.
struct Download {
    sink: Destination,
    length: u64,
}

impl transfer::Sink for Download {
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.data(bytes)
    }

    fn hole(&mut self, length: u64) -> io::Result<()> {
        self.sink.hole(length)
    }

    fn complete(&mut self, stats: &TransferStats) -> Result<()> {
        let length = self.length;
        if stats.position() != length {
            return Err(file_error(
                self.sink.path(),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the volume sent {} of {length} bytes", stats.position()),
                ),
            ));
        }
        self.sink.complete(stats)
    }

    fn discard(&mut self) {
        self.sink.discard();
    }
}

/// What a download writes into.
enum Destination {
    /// A new file under a private name, given `path` once complete; `replace`: a
    /// regular file at `path` is replaced (`force`).
    Part {
        file: File,
        part: PathBuf,
        path: PathBuf,
        replace: bool,
    },
    /// An existing device or FIFO, written through in place (`force`); `sync`: a
    /// block device, flushed at the end.
    Through {
        file: File,
        path: PathBuf,
        sync: bool,
    },
}

impl Destination {
    fn open(path: &Path, force: bool) -> Result<Destination> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Destination::part(path, false),
            Err(e) => return Err(file_error(path, e)),
        };
        let kind = kind_of(meta.file_type());
        let refused = || Error::DestinationExists {
            path: path.to_path_buf(),
            kind,
        };
        let file_type = meta.file_type();
        if file_type.is_dir() || !force {
            Err(refused())
        } else if file_type.is_symlink() {
            // What it names gets the same treatment; a canonical path has no links.
            let target = fs::canonicalize(path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    file_error(path, io::Error::new(e.kind(), "a symbolic link to nothing"))
                }
                _ => file_error(path, e),
            })?;
            Destination::open(&target, force)
        } else if file_type.is_file() {
            Destination::part(path, true)
        } else if is_device_or_fifo(file_type) {
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| file_error(path, e))?;
            // What was opened must still be what was checked.
            let opened = file
                .metadata()
                .map_err(|e| file_error(path, e))?
                .file_type();
            if !is_device_or_fifo(opened) {
                return Err(Error::DestinationExists {
                    path: path.to_path_buf(),
                    kind: kind_of(opened),
                });
            }
            Ok(Destination::Through {
                file,
                path: path.to_path_buf(),
                sync: opened.is_block_device(),
            })
        } else {
            Err(refused()) // a socket
        }
    }

    /// Creates this download's own `.part` next to `path`.
    fn part(path: &Path, replace: bool) -> Result<Destination> {
        let name = path.file_name().ok_or_else(|| {
            file_error(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        for attempt in 0u64.. {
            let mut part_name = name.to_owned();
            part_name.push(format!(".{}-{stamp:x}-{attempt}.part", std::process::id()));
            let part = path.with_file_name(part_name);
            // O_EXCL: a leftover of an earlier process with this pid is not reused.
            match OpenOptions::new().write(true).create_new(true).open(&part) {
                Ok(file) => {
                    return Ok(Destination::Part {
                        file,
                        part,
                        path: path.to_path_buf(),
                        replace,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(file_error(path, e)),
            }
        }
        unreachable!("some attempt finds a free name")
    }

    fn path(&self) -> &Path {
        match self {
            Destination::Part { path, .. } | Destination::Through { path, .. } => path,
        }
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Destination::Part { file, .. } | Destination::Through { file, .. } => {
                file.write_all(bytes)
            }
        }
        .map_err(|e| with_path(self.path(), e))
    }

    fn hole(&mut self, length: u64) -> io::Result<()> {
        let written = match self {
            Destination::Part { file, .. } => {
                let offset = i64::try_from(length).map_err(|_| io::ErrorKind::InvalidInput)?;
                file.seek(SeekFrom::Current(offset)).map(drop)
            }
            // A device keeps what it held where the hole is: write the zeros.
            Destination::Through { file, .. } => {
                io::copy(&mut io::repeat(0).take(length), file).map(drop)
            }
        };
        written.map_err(|e| with_path(self.path(), e))
    }

    /// Sizes the file (trailing holes included), syncs it and gives it its name.
    fn complete(&self, stats: &TransferStats) -> Result<()> {
        let size = stats.position();
        let (file, part, path, replace) = match self {
            Destination::Part {
                file,
                part,
                path,
                replace,
            } => (file, part, path, *replace),
            Destination::Through { file, path, sync } => {
                return match sync {
                    true => file.sync_all().map_err(|e| file_error(path, e)),
                    false => Ok(()),
                };
            }
        };
        file.set_len(size).map_err(|e| file_error(part, e))?;
        file.sync_all().map_err(|e| file_error(part, e))?;
        let taken = |path: &Path| -> Result<()> {
            match fs::symlink_metadata(path) {
                Ok(meta) if replace && meta.is_file() => Ok(()),
                Ok(meta) => Err(Error::DestinationExists {
                    path: path.to_path_buf(),
                    kind: kind_of(meta.file_type()),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(file_error(path, e)),
            }
        };
        if !replace {
            // A link, unlike a rename, fails if the name was taken meanwhile.
            match fs::hard_link(part, path) {
                Ok(()) => {
                    if let Err(e) = fs::remove_file(part) {
                        log::warn!("{}: {e}", part.display());
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => taken(path)?,
                // No hard links on this filesystem: check, then rename.
                Err(_) => {}
            }
        }
        taken(path)?;
        fs::rename(part, path).map_err(|e| file_error(path, e))
    }

    /// Removes what this download created.
    fn discard(&self) {
        if let Destination::Part { part, .. } = self {
            let _ = fs::remove_file(part);
        }
    }
}

fn is_device_or_fifo(file_type: FileType) -> bool {
    file_type.is_char_device() || file_type.is_block_device() || file_type.is_fifo()
}

/// What a file is, for messages.
fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_fifo() {
        "FIFO"
    } else {
        "socket"
    }
}

/// The part of the source an upload sends: `[0, end)`.
struct Source {
    file: File,
    path: PathBuf,
    kind: SourceKind,
    position: u64,
    end: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    /// A regular file: positioned reads, holes found with `SEEK_DATA`/`SEEK_HOLE`.
    File,
    /// A block device: positioned reads, all data.
    Device,
    /// A pipe or character device: read as it comes, all data.
    Stream,
}

impl transfer::Source for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_data(buf)
    }

    fn section(&mut self) -> io::Result<(bool, u64)> {
        self.next_section()
    }

    fn skip(&mut self, length: u64) -> io::Result<()> {
        self.skip_hole(length)
    }
}

impl Source {
    /// Opens the source of an upload of `length` bytes (0: all of it).
    fn open(path: &Path, length: u64) -> Result<Source> {
        let error = |e| file_error(path, e);
        let invalid = |message: String| error(io::Error::new(io::ErrorKind::InvalidInput, message));
        let file = File::open(path).map_err(error)?;
        let meta = file.metadata().map_err(error)?;
        let file_type = meta.file_type();
        let (kind, size) = if file_type.is_file() {
            (SourceKind::File, Some(meta.len()))
        } else if file_type.is_block_device() {
            let size = (&file).seek(SeekFrom::End(0)).map_err(error)?;
            (SourceKind::Device, Some(size))
        } else if file_type.is_dir() {
            return Err(invalid("a directory, not something to upload".to_owned()));
        } else {
            (SourceKind::Stream, None)
        };
        let end = match (size, length) {
            (Some(size), 0) => size,
            (Some(size), length) if length > size => {
                return Err(error(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("holds {size} bytes, fewer than the {length} to upload"),
                )))
            }
            (Some(_), length) => length,
            (None, 0) => {
                return Err(invalid(format!(
                    "a {} has no size: give the length to upload",
                    kind_of(file_type)
                )))
            }
            (None, length) => length,
        };
        Ok(Source {
            file,
            path: path.to_path_buf(),
            kind,
            position: 0,
            end,
        })
    }

    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.position).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            // Positioned reads where possible: `section` probes with
            // lseek(SEEK_DATA/SEEK_HOLE), which moves the file offset.
            let read = match self.kind {
                SourceKind::Stream => (&self.file).read(&mut buf[..want]),
                SourceKind::File | SourceKind::Device => {
                    self.file.read_at(&mut buf[..want], self.position)
                }
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                read => break read.map_err(|e| with_path(&self.path, e))?,
            }
        };
        if n == 0 {
            // 0 means the end of the transfer to it: an early end must fail it.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: ended after {} of {} bytes",
                    self.path.display(),
                    self.position,
                    self.end
                ),
            ));
        }
        self.position += n as u64;
        Ok(n)
    }

    /// Where the source is: `(true, n)` n bytes of data, `(false, n)` a hole of n
    /// bytes, `(_, 0)` the end.
    fn next_section(&mut self) -> io::Result<(bool, u64)> {
        self.probe().map_err(|e| with_path(&self.path, e))
    }

    fn probe(&mut self) -> io::Result<(bool, u64)> {
        if self.position >= self.end {
            return Ok((false, 0));
        }
        if self.kind != SourceKind::File {
            return Ok((true, self.end - self.position));
        }
        let data = match next_data(&self.file, self.position)? {
            Some(data) => data.min(self.end),
            // No data up to the end of the file: a file that shrank is short.
            None if self.file.metadata()?.len() < self.end => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("shrank below {} bytes", self.end),
                ))
            }
            None => self.end,
        };
        if data > self.position {
            return Ok((false, data - self.position));
        }
        let hole = next_hole(&self.file, self.position)?.min(self.end);
        Ok((true, hole - self.position))
    }

    fn skip_hole(&mut self, length: u64) -> io::Result<()> {
        self.position += length;
        Ok(())
    }
}

fn file_error(path: &Path, e: io::Error) -> Error {
    Error::Io(with_path(path, e))
}

/// `e`, its message starting with the path it is about.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
