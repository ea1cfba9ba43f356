//! The crate's one error type.
//!
//! Every fallible call returns [`Result<T>`]. Failures that come from libvirt keep
//! libvirt's own message, code and domain inside [`Error::Libvirt`]; everything the
//! reactor decides itself has its own variant, so callers match on kinds, not strings.

use std::fmt;
use std::io;

/// A libvirt error: its message, code and domain, as libvirt reported them.
pub type LibvirtError = virt::error::Error;

/// What can go wrong in this crate.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// libvirt reported a failure (message, code and domain are inside).
    Libvirt(LibvirtError),
    /// An operating-system call failed (epoll, eventfd, a file).
    Io(io::Error),
    /// An event implementation was already registered in this process.
    ///
    /// libvirt keeps the first registration for the life of the process and ignores
    /// later ones, so a second one is refused rather than silently lost.
    AlreadyRegistered,
    /// A connection was about to be opened before [`crate::Reactor::register`]:
    /// libvirt would then never deliver its events or keepalive through the loop.
    NotRegistered,
    /// Another event implementation (for example libvirt's default one) was registered
    /// before ours, so libvirt would never call us.
    ForeignImplRegistered,
    /// A callback running on the loop panicked. The panic was caught at the FFI
    /// boundary, the loop stayed usable, and this reports it to the caller of `run`.
    CallbackPanicked {
        /// What was running, e.g. `"handle watch 3"`.
        origin: String,
        /// The panic message, when it was a string.
        message: String,
    },
    /// `drain` gave up before libvirt removed everything it had registered.
    DrainTimedOut {
        /// Handle watches still registered.
        handles: usize,
        /// Timers still registered.
        timers: usize,
        /// Free callbacks still waiting to run.
        pending_frees: usize,
    },
    /// A connection already has as many subscriptions of one kind as it can hold.
    SubscriptionLimit {
        /// How many it can hold.
        limit: usize,
    },
    /// The loop was used from a process other than the one that registered it
    /// (after `fork`): its epoll instance is shared with the parent.
    WrongProcess,
    /// No stream in the reactor has this token (it ended, or never existed).
    InvalidToken,
    /// The reactor is gone, so a command from another thread cannot reach it.
    ReactorGone,
    /// The stream ended, so nothing more can be written to it.
    StreamClosed,
    /// The transfer was aborted before it completed.
    Aborted,
    /// Blocking work did not finish in time.
    TimedOut,
    /// A call that waits for the loop was made on the loop's own thread, where it
    /// would wait forever (e.g. [`crate::StreamWriter::write_all`] from a handler).
    OnLoopThread,
    /// A setting was refused or could not be put in place (a non-loopback address,
    /// an unusable directory or token file), or a service could not go on; the text
    /// says which and why.
    Service(String),
    /// Another client holds the domain's console (open it with `force` to take over).
    ConsoleBusy {
        /// The domain.
        domain: String,
    },
    /// No console of this domain is attached.
    NotAttached {
        /// The domain.
        domain: String,
    },
    /// An upload holds more bytes than the volume has room for.
    VolumeTooSmall {
        /// Bytes the upload needs, counted from the volume's start.
        needed: u64,
        /// The volume's capacity.
        capacity: u64,
    },
    /// A download range reaches past the end of the volume.
    OutOfRange {
        /// Where the range starts in the volume.
        offset: u64,
        /// Its length (0: to the end).
        length: u64,
        /// Bytes the volume holds (what a download of all of it streams).
        size: u64,
    },
    /// A download's destination exists and is not to be overwritten: a directory
    /// never is; anything else only when asked (`VolumeRange::force`).
    DestinationExists {
        /// The destination.
        path: std::path::PathBuf,
        /// What is there, e.g. `"symbolic link"` or `"character device"`.
        kind: &'static str,
    },
    /// libvirt closed the stream's connection (daemon gone, socket error,
    /// keepalive timeout); every stream of that connection fails with this.
    ConnectionClosed {
        /// Why libvirt closed it.
        reason: super::events::CloseReason,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The libvirt error behind this one, if any.
    pub fn libvirt(&self) -> Option<&LibvirtError> {
        match self {
            Error::Libvirt(e) => Some(e),
            _ => None,
        }
    }

    /// Reads libvirt's last error on this thread (libvirt keeps it per thread).
    pub(crate) fn last_libvirt() -> Error {
        Error::Libvirt(LibvirtError::last_error())
    }
}

/// A copy, for an end that several waiters hear (an async stream's reader and
/// writer); an `Io` error is copied as its kind and message.
impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::Libvirt(e) => Error::Libvirt(e.clone()),
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
            Error::AlreadyRegistered => Error::AlreadyRegistered,
            Error::NotRegistered => Error::NotRegistered,
            Error::ForeignImplRegistered => Error::ForeignImplRegistered,
            Error::CallbackPanicked { origin, message } => Error::CallbackPanicked {
                origin: origin.clone(),
                message: message.clone(),
            },
            Error::DrainTimedOut {
                handles,
                timers,
                pending_frees,
            } => Error::DrainTimedOut {
                handles: *handles,
                timers: *timers,
                pending_frees: *pending_frees,
            },
            Error::SubscriptionLimit { limit } => Error::SubscriptionLimit { limit: *limit },
            Error::WrongProcess => Error::WrongProcess,
            Error::InvalidToken => Error::InvalidToken,
            Error::ReactorGone => Error::ReactorGone,
            Error::StreamClosed => Error::StreamClosed,
            Error::Aborted => Error::Aborted,
            Error::TimedOut => Error::TimedOut,
            Error::OnLoopThread => Error::OnLoopThread,
            Error::Service(what) => Error::Service(what.clone()),
            Error::ConsoleBusy { domain } => Error::ConsoleBusy {
                domain: domain.clone(),
            },
            Error::NotAttached { domain } => Error::NotAttached {
                domain: domain.clone(),
            },
            Error::VolumeTooSmall { needed, capacity } => Error::VolumeTooSmall {
                needed: *needed,
                capacity: *capacity,
            },
            Error::OutOfRange {
                offset,
                length,
                size,
            } => Error::OutOfRange {
                offset: *offset,
                length: *length,
                size: *size,
            },
            Error::DestinationExists { path, kind } => Error::DestinationExists {
                path: path.clone(),
                kind,
            },
            Error::ConnectionClosed { reason } => Error::ConnectionClosed { reason: *reason },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Libvirt(e) => write!(f, "libvirt: {}", e.message()),
            Error::Io(e) => write!(f, "I/O: {e}"),
            Error::AlreadyRegistered => {
                f.write_str("an event implementation is already registered in this process")
            }
            Error::NotRegistered => f.write_str(
                "no event loop is registered: call Reactor::register() before opening a connection",
            ),
            Error::ForeignImplRegistered => f.write_str(
                "another event implementation was registered before virt-reactor's; \
                 register virt-reactor first, before opening any connection",
            ),
            Error::CallbackPanicked { origin, message } => {
                write!(f, "{origin} panicked: {message}")
            }
            Error::DrainTimedOut {
                handles,
                timers,
                pending_frees,
            } => write!(
                f,
                "drain timed out with {handles} handle(s), {timers} timer(s) and \
                 {pending_frees} free callback(s) left"
            ),
            Error::SubscriptionLimit { limit } => write!(
                f,
                "the connection already has {limit} subscriptions of this kind"
            ),
            Error::WrongProcess => {
                f.write_str("the event loop belongs to another process (used after fork)")
            }
            Error::InvalidToken => f.write_str("no stream has this token (it already ended?)"),
            Error::ReactorGone => f.write_str("the reactor is gone"),
            Error::StreamClosed => f.write_str("the stream has ended"),
            Error::Aborted => f.write_str("aborted before completion"),
            Error::TimedOut => f.write_str("timed out"),
            Error::OnLoopThread => f.write_str(
                "this call waits for the event loop and would deadlock on the loop's own thread",
            ),
            Error::Service(what) => f.write_str(what),
            Error::ConsoleBusy { domain } => write!(
                f,
                "{domain}: another client holds the console (open with force to take over)"
            ),
            Error::NotAttached { domain } => write!(f, "{domain}: no console attached"),
            Error::VolumeTooSmall { needed, capacity } => write!(
                f,
                "the upload needs {needed} bytes but the volume holds {capacity}"
            ),
            Error::OutOfRange {
                offset,
                length,
                size,
            } => {
                let end = if *length == 0 {
                    "its end".to_owned()
                } else {
                    offset.saturating_add(*length).to_string()
                };
                write!(
                    f,
                    "bytes {offset} to {end} are outside the volume, which holds {size} bytes"
                )
            }
            Error::DestinationExists { path, kind } => write!(
                f,
                "{}: a {kind} is there already; not overwritten",
                path.display()
            ),
            Error::ConnectionClosed { reason } => {
                write!(f, "the connection to libvirt was lost ({reason})")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Libvirt(e) => Some(e),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Unwraps one of ours carried inside an `io::Error` (as `Stream`'s `io::Read` and
/// `io::Write` return libvirt's errors), or wraps a plain one: `?` on a stream call
/// gives back [`Error::Libvirt`], not `Error::Io` around it.
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let inner = e.into_inner().expect("checked above");
            *inner.downcast::<Error>().expect("checked above")
        } else {
            Error::Io(e)
        }
    }
}

impl From<LibvirtError> for Error {
    fn from(e: LibvirtError) -> Self {
        Error::Libvirt(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}
