//! What libvirt reports about connections and domains: [`LifecycleEvent`] and
//! [`CloseReason`], as typed values.

use std::fmt;

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
