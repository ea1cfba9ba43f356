//! The service's machine-readable status, and the control socket's requests.

use serde::{Deserialize, Serialize};

/// The whole service, as `{"cmd":"status"}` answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// Every libvirt connection, one per host.
    pub hosts: Vec<HostStatus>,
    /// Every console the service knows, attached or not, by name.
    pub consoles: Vec<ConsoleStatus>,
    /// Viewers cut off since the start for falling too far behind.
    pub viewers_cut: u64,
}

/// One libvirt connection.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostStatus {
    /// Its label: the prefix of its consoles' names when there are several hosts.
    pub label: String,
    /// Its URI.
    pub uri: String,
    /// `connecting`, `connected` or `reconnecting`.
    pub state: String,
    /// Seconds in that state.
    pub for_secs: f64,
    /// While reconnecting, the attempt under way or next.
    pub attempt: u32,
    /// While reconnecting, why the connection was lost.
    pub lost: Option<String>,
    /// Times it was connected again.
    pub reconnects: u32,
}

/// One console.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleStatus {
    /// The domain's name.
    pub name: String,
    /// `attached`, `opening` or `ended`.
    pub state: String,
    /// Why it ended, while it is not attached.
    pub end: Option<String>,
    /// Bytes the guest printed since the service started.
    pub output_bytes: u64,
    /// Bytes the viewers sent to the guest.
    pub input_bytes: u64,
    /// The replay ring.
    pub scrollback: ScrollbackStatus,
    /// The log, if logs are kept.
    pub log: Option<LogStatus>,
    /// Who watches.
    pub viewers: Vec<ViewerStatus>,
}

/// A console's replay ring.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScrollbackStatus {
    /// Its size.
    pub capacity: usize,
    /// Bytes in it now.
    pub used: usize,
}

/// A console's log.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogStatus {
    /// The current file.
    pub path: String,
    /// Bytes in the current file.
    pub bytes: u64,
    /// Rotations since the service started.
    pub rotations: u64,
    /// Bytes that could not be kept (the disk stayed full too long).
    pub lost_bytes: u64,
    /// The last write error, while it lasts.
    pub error: Option<String>,
}

/// One viewer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ViewerStatus {
    /// Its number, as `kick` takes it.
    pub id: u64,
    /// Where it comes from.
    pub peer: String,
    /// `unix`, `tcp` or `web`.
    pub transport: String,
    /// `rw` or `ro`.
    pub role: String,
    /// It holds the write role alone (`take`).
    pub exclusive: bool,
    /// Bytes written to it.
    pub sent_bytes: u64,
    /// Bytes waiting to be written to it.
    pub queued_bytes: usize,
}

/// A request on the control socket: one JSON object per line.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Request {
    Status,
    Kick { console: String, viewer: u64 },
}

/// The answer to anything but `status`.
#[derive(Debug, Serialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}
