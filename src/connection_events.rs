//! A connection's events, delivered through the loop to Rust closures: domain
//! lifecycle events ([`DomainEventSubscription`]) and the connection closing
//! ([`CloseWatch`]).
//!
//! libvirt queues both and calls them from the event loop, so nothing arrives while
//! the loop is not running. The closures run on the loop thread; a panic inside one is
//! caught, logged and returned by the loop's `run`.
//!
//! Both guards keep their own reference to the connection and must be dropped (or
//! cancelled) before the connection is closed: libvirt holds the connection open for
//! as long as a callback is registered on it, and `drain` would wait for it.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use virt::connect::Connect;

use crate::error::Result;
use crate::ffi::connection_events as ffi;

/// What happened to a domain: libvirt's `virDomainEventType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LifecycleKind {
    /// Defined, or its definition updated.
    Defined,
    /// Its definition removed.
    Undefined,
    /// Started running.
    Started,
    /// Paused.
    Suspended,
    /// Unpaused.
    Resumed,
    /// Stopped running.
    Stopped,
    /// The guest shut down (the domain may still run until it is stopped).
    Shutdown,
    /// Suspended by guest power management.
    PmSuspended,
    /// The guest crashed.
    Crashed,
    /// A kind this crate does not know, with libvirt's number.
    Other(i32),
}

/// One domain lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LifecycleEvent {
    /// The domain's name.
    pub domain: String,
    /// What happened.
    pub kind: LifecycleKind,
    /// Why, in libvirt's per-kind detail enum (e.g. `VIR_DOMAIN_EVENT_STARTED_BOOTED`);
    /// see [`detail_name`](Self::detail_name).
    pub detail: i32,
}

/// Why libvirt closed a connection: its `virConnectCloseReason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// A read or write on the socket failed.
    Error,
    /// The other end closed the socket.
    Eof,
    /// The peer stopped answering keepalive messages.
    Keepalive,
    /// The client closed the connection.
    Client,
    /// A reason this crate does not know, with libvirt's number.
    Other(i32),
}

impl LifecycleKind {
    /// From libvirt's `virDomainEventType` number.
    pub fn from_raw(raw: i32) -> LifecycleKind {
        match raw {
            0 => LifecycleKind::Defined,
            1 => LifecycleKind::Undefined,
            2 => LifecycleKind::Started,
            3 => LifecycleKind::Suspended,
            4 => LifecycleKind::Resumed,
            5 => LifecycleKind::Stopped,
            6 => LifecycleKind::Shutdown,
            7 => LifecycleKind::PmSuspended,
            8 => LifecycleKind::Crashed,
            other => LifecycleKind::Other(other),
        }
    }

    /// libvirt's `virDomainEventType` number.
    pub fn to_raw(self) -> i32 {
        match self {
            LifecycleKind::Defined => 0,
            LifecycleKind::Undefined => 1,
            LifecycleKind::Started => 2,
            LifecycleKind::Suspended => 3,
            LifecycleKind::Resumed => 4,
            LifecycleKind::Stopped => 5,
            LifecycleKind::Shutdown => 6,
            LifecycleKind::PmSuspended => 7,
            LifecycleKind::Crashed => 8,
            LifecycleKind::Other(raw) => raw,
        }
    }

    /// Names of this kind's details, indexed by libvirt's detail number.
    fn detail_names(self) -> &'static [&'static str] {
        match self {
            LifecycleKind::Defined => &["Added", "Updated", "Renamed", "FromSnapshot"],
            LifecycleKind::Undefined => &["Removed", "Renamed"],
            LifecycleKind::Started => &[
                "Booted",
                "Migrated",
                "Restored",
                "FromSnapshot",
                "Wakeup",
                "Recreated",
            ],
            LifecycleKind::Suspended => &[
                "Paused",
                "Migrated",
                "IoError",
                "Watchdog",
                "Restored",
                "FromSnapshot",
                "ApiError",
                "Postcopy",
                "PostcopyFailed",
            ],
            LifecycleKind::Resumed => &[
                "Unpaused",
                "Migrated",
                "FromSnapshot",
                "Postcopy",
                "PostcopyFailed",
            ],
            LifecycleKind::Stopped => &[
                "Shutdown",
                "Destroyed",
                "Crashed",
                "Migrated",
                "Saved",
                "Failed",
                "FromSnapshot",
                "Recreated",
            ],
            LifecycleKind::Shutdown => &["Finished", "Guest", "Host"],
            LifecycleKind::PmSuspended => &["Memory", "Disk"],
            LifecycleKind::Crashed => &["Panicked", "Crashloaded"],
            LifecycleKind::Other(_) => &[],
        }
    }
}

impl fmt::Display for LifecycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LifecycleKind::Defined => f.write_str("Defined"),
            LifecycleKind::Undefined => f.write_str("Undefined"),
            LifecycleKind::Started => f.write_str("Started"),
            LifecycleKind::Suspended => f.write_str("Suspended"),
            LifecycleKind::Resumed => f.write_str("Resumed"),
            LifecycleKind::Stopped => f.write_str("Stopped"),
            LifecycleKind::Shutdown => f.write_str("Shutdown"),
            LifecycleKind::PmSuspended => f.write_str("PMSuspended"),
            LifecycleKind::Crashed => f.write_str("Crashed"),
            LifecycleKind::Other(raw) => write!(f, "event {raw}"),
        }
    }
}

impl LifecycleEvent {
    /// The detail's name, such as `"Booted"` for a [`LifecycleKind::Started`] event,
    /// or `None` for a detail this crate does not know.
    pub fn detail_name(&self) -> Option<&'static str> {
        let index = usize::try_from(self.detail).ok()?;
        self.kind.detail_names().get(index).copied()
    }
}

impl fmt::Display for LifecycleEvent {
    /// `test-demo: Started (Booted)`, or the detail's number when it has no name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (", self.domain, self.kind)?;
        match self.detail_name() {
            Some(name) => f.write_str(name)?,
            None => write!(f, "{}", self.detail)?,
        }
        f.write_str(")")
    }
}

impl CloseReason {
    /// From libvirt's `virConnectCloseReason` number.
    pub fn from_raw(raw: i32) -> CloseReason {
        match raw {
            0 => CloseReason::Error,
            1 => CloseReason::Eof,
            2 => CloseReason::Keepalive,
            3 => CloseReason::Client,
            other => CloseReason::Other(other),
        }
    }

    /// libvirt's `virConnectCloseReason` number.
    pub fn to_raw(self) -> i32 {
        match self {
            CloseReason::Error => 0,
            CloseReason::Eof => 1,
            CloseReason::Keepalive => 2,
            CloseReason::Client => 3,
            CloseReason::Other(raw) => raw,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Error => f.write_str("socket error"),
            CloseReason::Eof => f.write_str("end of file"),
            CloseReason::Keepalive => f.write_str("keepalive timeout"),
            CloseReason::Client => f.write_str("closed by the client"),
            CloseReason::Other(raw) => write!(f, "reason {raw}"),
        }
    }
}

/// A subscription to a connection's domain lifecycle events. Deregistered when
/// dropped.
#[must_use = "the subscription is deregistered when dropped"]
pub struct DomainEventSubscription {
    conn: Connect,
    registration: ffi::LifecycleRegistration,
    registered: bool,
}

impl DomainEventSubscription {
    /// Calls `f` on the loop thread with each lifecycle event of every domain on
    /// `conn`, in the order libvirt queued them.
    ///
    /// `f` is dropped when the subscription goes: at once, or after the event being
    /// delivered. It is dropped inside libvirt, so it must not own libvirt objects
    /// (a `Connect`, a `Domain`).
    ///
    /// A connection holds up to 32 lifecycle subscriptions at a time.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriptionLimit`](crate::Error::SubscriptionLimit) beyond that;
    /// libvirt's error, e.g. when no event loop is registered or the driver has no
    /// domain events.
    #[doc(alias = "virConnectDomainEventRegisterAny")]
    pub fn lifecycle<F>(conn: &Connect, f: F) -> Result<DomainEventSubscription>
    where
        F: FnMut(LifecycleEvent) + Send + 'static,
    {
        let registration = ffi::register_lifecycle(conn, Box::new(f))?;
        Ok(DomainEventSubscription {
            conn: conn.clone(),
            registration,
            registered: true,
        })
    }

    /// libvirt's callback id.
    pub fn id(&self) -> i32 {
        self.registration.id
    }

    /// Deregisters now and reports failure, which dropping only logs.
    ///
    /// # Errors
    ///
    /// libvirt's error, e.g. when the connection to a remote daemon is already gone.
    #[doc(alias = "virConnectDomainEventDeregisterAny")]
    pub fn cancel(mut self) -> Result<()> {
        self.registered = false;
        ffi::deregister_lifecycle(&self.conn, self.registration)
    }
}

impl Drop for DomainEventSubscription {
    fn drop(&mut self) {
        if self.registered {
            if let Err(e) = ffi::deregister_lifecycle(&self.conn, self.registration) {
                log::warn!("cannot deregister domain event callback {}: {e}", self.id());
            }
        }
    }
}

impl fmt::Debug for DomainEventSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainEventSubscription")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// The closure a close watch calls at most once, until the watch goes.
type CloseSlot = Arc<Mutex<Option<Box<dyn FnOnce(CloseReason) + Send>>>>;

/// The connection's close callback: tells when libvirt closed the connection and why.
/// Unregistered when dropped.
///
/// libvirt keeps one close callback per connection; drivers without a persistent
/// connection (such as `test:///`) accept one and never call it. A remote connection
/// with streams in a [`Reactor`](crate::Reactor) has the reactor's, which fails those
/// streams when the connection is lost. Registering and unregistering are calls to
/// the daemon on a remote connection: not for the loop thread.
#[must_use = "the close callback is unregistered when dropped"]
pub struct CloseWatch {
    conn: Connect,
    slot: CloseSlot,
    registered: bool,
}

impl CloseWatch {
    /// Calls `f` on the loop thread when libvirt closes `conn` for any reason but
    /// [`Connect`] being dropped: the socket failed, the daemon went away or stopped
    /// answering keepalive messages.
    ///
    /// `f` must not drop this watch: libvirt calls it holding the lock that
    /// unregistering takes. `f` is dropped by the time the watch is.
    ///
    /// # Errors
    ///
    /// libvirt's error, e.g. when `conn` already has a close callback.
    #[doc(alias = "virConnectRegisterCloseCallback")]
    pub fn new<F>(conn: &Connect, f: F) -> Result<CloseWatch>
    where
        F: FnOnce(CloseReason) + Send + 'static,
    {
        let slot: CloseSlot = Arc::new(Mutex::new(Some(Box::new(f))));
        // libvirt's copy only reaches through the slot: drivers that ignore close
        // callbacks never free it, and then only the empty slot leaks, not `f`.
        let libvirt_slot = Arc::clone(&slot);
        ffi::register_close(
            conn,
            Box::new(move |reason| {
                let f = take(&libvirt_slot);
                match f {
                    Some(f) => f(reason),
                    None => log::debug!("connection closed ({reason}) after its watch went"),
                }
            }),
        )?;
        Ok(CloseWatch {
            conn: conn.clone(),
            slot,
            registered: true,
        })
    }

    /// Unregisters now and reports failure, which dropping only logs.
    ///
    /// # Errors
    ///
    /// libvirt's error.
    #[doc(alias = "virConnectUnregisterCloseCallback")]
    pub fn cancel(mut self) -> Result<()> {
        self.registered = false;
        let unregistered = ffi::unregister_close(&self.conn);
        drop(take(&self.slot));
        unregistered
    }
}

fn take(slot: &CloseSlot) -> Option<Box<dyn FnOnce(CloseReason) + Send>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

impl Drop for CloseWatch {
    fn drop(&mut self) {
        if self.registered {
            if let Err(e) = ffi::unregister_close(&self.conn) {
                log::warn!("cannot unregister the close callback: {e}");
            }
            drop(take(&self.slot));
        }
    }
}

impl fmt::Debug for CloseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let armed = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("CloseWatch")
            .field("armed", &armed)
            .finish_non_exhaustive()
    }
}
