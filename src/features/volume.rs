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
//!
//! To survive a lost connection: a [`Target::Resumable`] download writes a
//! predictable `FILE.part`, locked while written and kept when the download fails,
//! and continues it later from its length; [`compare`] reads a volume back to find
//! how much of an upload it holds, and [`upload_with`] sends the rest. A [`Tap`]
//! sees every byte of the range in order, a resumed prefix included, for a checksum.
//!
//! Starting a transfer makes blocking calls to the daemon (the volume's size, the
//! download or upload itself). While one waits, libvirt's client reads every packet
//! that arrives for the connection's running downloads and queues it in memory:
//! starting many at once, turn the loop once between two starts, as `vol` does, so
//! that those packets are taken before the next start adds more.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virt::storage_vol::StorageVol;

use crate::streams::reactor::Reactor;
use crate::streams::stream::Stream;
use crate::streams::token::StreamToken;
use crate::streams::transfer::{self, Transfer, TransferStats};
use crate::sys::file::{next_data, next_hole, try_lock};
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

/// Sees every byte a transfer moves, in order, as it moves: for a checksum. A hole
/// is its length of zeros.
pub trait Tap: Send + 'static {
    /// Bytes of data.
    fn data(&mut self, bytes: &[u8]);
    /// A hole of `length` bytes.
    fn hole(&mut self, length: u64);
}

/// Where a download goes ([`download_with`]).
#[derive(Debug)]
pub enum Target {
    /// A file, as [`download`] writes it: a private `.part` until complete.
    Path(PathBuf),
    /// A file written through `FILE.part` (locked while a download writes it), which
    /// a failed download leaves for a later one to resume. With `resume`, the download
    /// continues from the `.part`'s length, and the tap first sees what it holds;
    /// without, the `.part` starts over.
    Resumable {
        /// FILE.
        path: PathBuf,
        /// Continue from what the `.part` holds.
        resume: bool,
    },
    /// An open file (standard output), written through from where it is; holes are
    /// written as zeros.
    Writer {
        /// The file.
        file: File,
        /// Its name, for messages.
        name: PathBuf,
    },
    /// Only the tap sees the bytes: a read-back to check a volume.
    Nowhere,
}

/// A download that started.
#[derive(Debug)]
pub struct Started {
    /// Its stream.
    pub token: StreamToken,
    /// Bytes of the range a resumed download found on disk and does not fetch again;
    /// its progress counts from there.
    pub resumed_from: u64,
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
    let target = Target::Path(path.to_path_buf());
    download_with(reactor, vol, target, range, None, on_progress, on_end).map(|s| s.token)
}

/// [`download`] into any [`Target`], with `tap` seeing the bytes of the range in
/// order (for a resumed download, those on disk first).
///
/// # Errors
///
/// As [`download`]; a resumable `.part` another download holds is refused. A
/// resumed `.part` stays when libvirt refuses the download.
#[doc(alias = "virStorageVolDownload")]
pub fn download_with<S: 'static>(
    reactor: &mut Reactor<S>,
    vol: &StorageVol,
    target: Target,
    range: VolumeRange,
    mut tap: Option<Box<dyn Tap>>,
    on_progress: impl FnMut(&mut S, TransferStats) + Send + 'static,
    on_end: impl FnOnce(&mut S, Result<TransferStats>) + Send + 'static,
) -> Result<Started> {
    // The physical size is what a download streams (for raw volumes, the capacity);
    // a driver without the flag gives the capacity.
    let size = match vol.info_flags(VOL_GET_PHYSICAL) {
        Ok(info) => info.allocation,
        Err(_) => vol.info()?.capacity,
    };
    let length = download_length(range, size)?;
    let (mut sink, on_disk) = match target {
        Target::Path(path) => Destination::open(&path, range.force, None)?,
        Target::Resumable { path, resume } => Destination::open(&path, range.force, Some(resume))?,
        Target::Writer { file, name } => (
            Destination::Through {
                file,
                path: name,
                sync: false,
            },
            0,
        ),
        Target::Nowhere => (Destination::Nowhere, 0),
    };
    // At least one byte is fetched: a length of 0 would ask libvirt for the rest of
    // the volume.
    let start = on_disk.min(length.saturating_sub(1));
    if let Err(e) = sink.resume_at(start, tap.as_deref_mut()) {
        sink.discard();
        return Err(e);
    }
    let stream = match open_stream(vol, |stream, vol| {
        // Always a definite length: libvirt then never sends more than was checked.
        let flags = if range.sparse { VOL_DOWNLOAD_SPARSE } else { 0 };
        vol.download(stream, range.offset + start, length - start, flags)
    }) {
        Ok(stream) => stream,
        Err(e) => {
            if start == 0 {
                sink.discard();
            }
            return Err(e);
        }
    };
    let download = Download {
        sink,
        start,
        length,
        tap,
    };
    let transfer = Transfer::receive(download, range.sparse);
    let token = insert(reactor, stream, transfer, on_progress, on_end)?;
    Ok(Started {
        token,
        resumed_from: start,
    })
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

/// What an upload reads ([`upload_with`]).
#[derive(Debug)]
pub enum Origin {
    /// A file by name, as [`upload`] reads it.
    Path(PathBuf),
    /// An open file (standard input), read from where it is.
    Reader {
        /// The file.
        file: File,
        /// Its name, for messages.
        name: PathBuf,
    },
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
    let origin = Origin::Path(path.to_path_buf());
    upload_with(reactor, vol, origin, range, 0, None, on_progress, on_end)
}

/// [`upload`] from any [`Origin`], skipping its first `from` bytes, which the volume
/// holds already ([`compare`] finds them): they are neither read nor sent, and `tap`
/// sees the rest, in order. Progress counts from `from`.
///
/// # Errors
///
/// As [`upload`]; `from` is not below the length to upload, or is not 0 for a
/// source read as a stream.
#[doc(alias = "virStorageVolUpload")]
#[allow(clippy::too_many_arguments)] // upload's, and the three ways this one differs
pub fn upload_with<S: 'static>(
    reactor: &mut Reactor<S>,
    vol: &StorageVol,
    origin: Origin,
    range: VolumeRange,
    from: u64,
    tap: Option<Box<dyn Tap>>,
    on_progress: impl FnMut(&mut S, TransferStats) + Send + 'static,
    on_end: impl FnOnce(&mut S, Result<TransferStats>) + Send + 'static,
) -> Result<StreamToken> {
    let mut source = Source::open(origin, range.length)?;
    let length = source.end;
    let capacity = vol.info()?.capacity;
    if range.offset.saturating_add(length) > capacity {
        return Err(Error::VolumeTooSmall {
            needed: range.offset.saturating_add(length),
            capacity,
        });
    }
    if from > 0 && (from >= length || source.kind == SourceKind::Stream) {
        return Err(file_error(
            &source.path,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot resume at byte {from} of {length}"),
            ),
        ));
    }
    source.position = from;
    source.tap = tap;
    let stream = open_stream(vol, |stream, vol| {
        let flags = if range.sparse { VOL_UPLOAD_SPARSE } else { 0 };
        vol.upload(stream, range.offset + from, length - from, flags)
    })?;
    let transfer = Transfer::send(source, range.sparse);
    insert(reactor, stream, transfer, on_progress, on_end)
}

/// Reads `vol` back from `range.offset` over the length of the file at `path` (or
/// `range.length` bytes of it) and finds how much of the volume already holds it, a
/// hole matching zeros: `on_end` gets the length of the longest prefix that
/// matches, `tap` sees that prefix. The read-back stops at the first difference.
///
/// # Errors
///
/// As [`upload`]; the file is empty or cannot be read at an offset (a pipe).
pub fn compare<S: 'static>(
    reactor: &mut Reactor<S>,
    vol: &StorageVol,
    path: &Path,
    range: VolumeRange,
    tap: Option<Box<dyn Tap>>,
    on_end: impl FnOnce(&mut S, Result<u64>) + Send + 'static,
) -> Result<StreamToken> {
    let source = Source::open(Origin::Path(path.to_path_buf()), range.length)?;
    let length = source.end;
    if source.kind == SourceKind::Stream || length == 0 {
        return Err(file_error(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "nothing to compare at offsets"),
        ));
    }
    let capacity = vol.info()?.capacity;
    if range.offset.saturating_add(length) > capacity {
        return Err(Error::VolumeTooSmall {
            needed: range.offset.saturating_add(length),
            capacity,
        });
    }
    let stream = open_stream(vol, |stream, vol| {
        let flags = if range.sparse { VOL_DOWNLOAD_SPARSE } else { 0 };
        vol.download(stream, range.offset, length, flags)
    })?;
    let differs = Arc::new(Mutex::new(None));
    let matcher = Matcher {
        source,
        tap,
        buf: Vec::new(),
        differs: Arc::clone(&differs),
    };
    let transfer = Transfer::receive(matcher, range.sparse);
    insert(
        reactor,
        stream,
        transfer,
        |_: &mut S, _| {},
        move |state: &mut S, result: Result<TransferStats>| {
            let first_difference = *differs.lock().unwrap_or_else(|e| e.into_inner());
            let matched = match (result, first_difference) {
                (_, Some(at)) => Ok(at),
                (Ok(stats), None) => Ok(stats.position()),
                (Err(e), None) => Err(e),
            };
            on_end(state, matched);
        },
    )
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

/// A download's sink: the range is `length` bytes, from `start` on are fetched.
struct Download {
    sink: Destination,
    start: u64,
    length: u64,
    tap: Option<Box<dyn Tap>>,
}

impl transfer::Sink for Download {
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.data(bytes)?;
        if let Some(tap) = &mut self.tap {
            tap.data(bytes);
        }
        Ok(())
    }

    fn hole(&mut self, length: u64) -> io::Result<()> {
        self.sink.hole(length)?;
        if let Some(tap) = &mut self.tap {
            tap.hole(length);
        }
        Ok(())
    }

    fn complete(&mut self, stats: &TransferStats) -> Result<()> {
        let length = self.length - self.start;
        if stats.position() != length {
            return Err(file_error(
                self.sink.path(),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the volume sent {} of {length} bytes", stats.position()),
                ),
            ));
        }
        self.sink.complete(self.length)
    }

    fn discard(&mut self) {
        self.sink.discard();
        // Closes the file now: a resumable `.part`'s lock goes with it.
        self.sink = Destination::Nowhere;
    }
}

/// What a download writes into.
enum Destination {
    /// A new file under a `.part` name, given `path` once complete; `replace`: a
    /// regular file at `path` is replaced (`force`); `keep`: a failed download leaves
    /// the `.part` for another to resume.
    Part {
        file: File,
        part: PathBuf,
        path: PathBuf,
        replace: bool,
        keep: bool,
    },
    /// An existing device or FIFO, written through in place (`force`); `sync`: a
    /// block device, flushed at the end.
    Through {
        file: File,
        path: PathBuf,
        sync: bool,
    },
    /// Nothing: the tap alone sees the bytes.
    Nowhere,
}

impl Destination {
    /// The destination at `path`, and the bytes its `.part` holds already: `resume`
    /// is `None` for a private `.part`, else whether to continue a resumable one.
    fn open(path: &Path, force: bool, resume: Option<bool>) -> Result<(Destination, u64)> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Destination::part(path, false, resume)
            }
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
            Destination::open(&target, force, resume)
        } else if file_type.is_file() {
            Destination::part(path, true, resume)
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
            let through = Destination::Through {
                file,
                path: path.to_path_buf(),
                sync: opened.is_block_device(),
            };
            Ok((through, 0))
        } else {
            Err(refused()) // a socket
        }
    }

    /// Creates this download's own `.part` next to `path`, or opens `FILE.part`.
    fn part(path: &Path, replace: bool, resume: Option<bool>) -> Result<(Destination, u64)> {
        let name = path.file_name().ok_or_else(|| {
            file_error(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
        if let Some(resume) = resume {
            return Destination::resumable(path, replace, resume);
        }
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
                    let part = Destination::Part {
                        file,
                        part,
                        path: path.to_path_buf(),
                        replace,
                        keep: false,
                    };
                    return Ok((part, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(file_error(path, e)),
            }
        }
        unreachable!("some attempt finds a free name")
    }

    /// Opens and locks `FILE.part`, emptied unless `resume`; with its length.
    fn resumable(path: &Path, replace: bool, resume: bool) -> Result<(Destination, u64)> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let error = |e| file_error(&part, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(error)?;
        if !try_lock(&file).map_err(error)? {
            return Err(error(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another download is writing it",
            )));
        }
        if !resume {
            file.set_len(0).map_err(error)?;
        }
        let on_disk = file.metadata().map_err(error)?.len();
        let part = Destination::Part {
            file,
            part,
            path: path.to_path_buf(),
            replace,
            keep: true,
        };
        Ok((part, on_disk))
    }

    /// Continues after the first `start` bytes of a resumed `.part`, which `tap`
    /// sees first (holes as holes).
    fn resume_at(&mut self, start: u64, tap: Option<&mut dyn Tap>) -> Result<()> {
        let Destination::Part { file, part, .. } = self else {
            return Ok(());
        };
        let error = |e| file_error(part, e);
        file.set_len(start).map_err(error)?;
        if let Some(tap) = tap {
            // A clone shares the file offset, which the hole probes move: seek after.
            let origin = Origin::Reader {
                file: file.try_clone().map_err(error)?,
                name: part.clone(),
            };
            // Its errors name the file already.
            tap_all(Source::open(origin, start)?, tap).map_err(Error::Io)?;
        }
        file.seek(SeekFrom::Start(start)).map_err(error)?;
        Ok(())
    }

    fn path(&self) -> &Path {
        match self {
            Destination::Part { path, .. } | Destination::Through { path, .. } => path,
            Destination::Nowhere => Path::new("-"),
        }
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Destination::Part { file, .. } | Destination::Through { file, .. } => {
                file.write_all(bytes)
            }
            Destination::Nowhere => Ok(()),
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
            Destination::Nowhere => Ok(()),
        };
        written.map_err(|e| with_path(self.path(), e))
    }

    /// Sizes the file to `size` (trailing holes included), syncs it and gives it
    /// its name.
    fn complete(&self, size: u64) -> Result<()> {
        let (file, part, path, replace) = match self {
            Destination::Part {
                file,
                part,
                path,
                replace,
                ..
            } => (file, part, path, *replace),
            Destination::Through { file, path, sync } => {
                return match sync {
                    true => file.sync_all().map_err(|e| file_error(path, e)),
                    false => Ok(()),
                };
            }
            Destination::Nowhere => return Ok(()),
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

    /// Removes what this download created, unless it is kept to resume.
    fn discard(&self) {
        if let Destination::Part {
            part, keep: false, ..
        } = self
        {
            let _ = fs::remove_file(part);
        }
    }
}

/// Feeds all of `source` to `tap`, holes as holes.
fn tap_all(mut source: Source, tap: &mut dyn Tap) -> io::Result<()> {
    let mut buf = vec![0; 256 * 1024];
    loop {
        match source.next_section()? {
            (_, 0) => return Ok(()),
            (true, length) => {
                let want = buf.len().min(usize::try_from(length).unwrap_or(usize::MAX));
                let n = source.read_data(&mut buf[..want])?;
                tap.data(&buf[..n]);
            }
            (false, length) => {
                source.skip_hole(length)?;
                tap.hole(length);
            }
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
    tap: Option<Box<dyn Tap>>,
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
        let n = self.read_data(buf)?;
        if let Some(tap) = &mut self.tap {
            tap.data(&buf[..n]);
        }
        Ok(n)
    }

    fn section(&mut self) -> io::Result<(bool, u64)> {
        self.next_section()
    }

    fn skip(&mut self, length: u64) -> io::Result<()> {
        self.skip_hole(length)?;
        if let Some(tap) = &mut self.tap {
            tap.hole(length);
        }
        Ok(())
    }
}

impl Source {
    /// Opens the source of an upload of `length` bytes (0: all of it).
    fn open(origin: Origin, length: u64) -> Result<Source> {
        let (file, path) = match origin {
            Origin::Path(path) => (File::open(&path).map_err(|e| file_error(&path, e))?, path),
            Origin::Reader { file, name } => (file, name),
        };
        let path = path.as_path();
        let error = |e| file_error(path, e);
        let invalid = |message: String| error(io::Error::new(io::ErrorKind::InvalidInput, message));
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
            tap: None,
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

/// A read-back's sink: compares what arrives with the source, and stops at the first
/// difference (by failing the transfer), which it records.
struct Matcher {
    source: Source,
    tap: Option<Box<dyn Tap>>,
    buf: Vec<u8>,
    differs: Arc<Mutex<Option<u64>>>,
}

impl Matcher {
    /// Compares the next `length` bytes of the source with `bytes`, or with zeros.
    fn check(&mut self, bytes: Option<&[u8]>, length: usize) -> io::Result<()> {
        self.buf.resize(length, 0);
        let at = self.source.position;
        self.source.file.read_exact_at(&mut self.buf, at)?;
        let same = |(i, b): (usize, &u8)| *b == bytes.map_or(0, |bytes| bytes[i]);
        let matched = self.buf.iter().enumerate().take_while(|p| same(*p)).count();
        if let Some(tap) = &mut self.tap {
            match bytes {
                Some(bytes) => tap.data(&bytes[..matched]),
                None => tap.hole(matched as u64),
            }
        }
        self.source.position += matched as u64;
        if matched < length {
            let first = self.source.position;
            *self.differs.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
            return Err(io::Error::other(format!("differs at byte {first}")));
        }
        Ok(())
    }
}

impl transfer::Sink for Matcher {
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.check(Some(bytes), bytes.len())
    }

    fn hole(&mut self, mut length: u64) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        while length > 0 {
            let step = length.min(STEP);
            self.check(None, step as usize)?;
            length -= step;
        }
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
