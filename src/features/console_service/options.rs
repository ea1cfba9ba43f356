//! What the service serves, and how.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::dir::default_dir;
use super::logfile::LogOptions;

/// What the service serves, and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServiceOptions {
    /// The libvirt connection whose guests are served.
    pub uri: String,
    /// Serve only these domains; empty serves all, including those that start later.
    pub domains: Vec<String>,
    /// The sockets' directory: created mode 0700 if missing (and then removed at
    /// exit); an existing one must be a real directory of ours with mode 0700.
    pub dir: PathBuf,
    /// Bytes of output each console keeps for viewers that attach later.
    pub scrollback: usize,
    /// Keep a log per console.
    pub log: Option<LogOptions>,
    /// Output bytes a viewer may fall behind before it is cut off.
    pub viewer_buffer: usize,
    /// Also serve viewers on this loopback TCP address.
    pub tcp: Option<SocketAddr>,
    /// Serve the web page and WebSocket viewers on this loopback address.
    pub web: Option<SocketAddr>,
    /// Read the token from this file, or write a new one there (mode 0600).
    pub token_file: Option<PathBuf>,
    /// What the `break` command sends. libvirt's console streams carry bytes, so a
    /// serial line's break condition cannot be sent; empty refuses the command.
    pub break_sequence: Vec<u8>,
    /// TCP and web connections that may wait at once for their first request; one
    /// more closes the oldest.
    pub max_pending: usize,
    /// Take consoles over from other clients (`VIR_DOMAIN_CONSOLE_FORCE`).
    pub force: bool,
    /// Stop cleanly after this long.
    pub exit_after: Option<Duration>,
    /// Handle SIGINT and SIGTERM (stop) and SIGHUP (reopen the logs).
    pub signals: bool,
}

impl ServiceOptions {
    /// The defaults: every domain of `uri`, sockets in [`default_dir`], 64 KiB of
    /// scrollback, no log, 1 MiB per viewer, no TCP, no web, signals handled.
    pub fn new(uri: &str) -> Self {
        ServiceOptions {
            uri: uri.to_owned(),
            domains: Vec::new(),
            dir: default_dir(),
            scrollback: 64 * 1024,
            log: None,
            viewer_buffer: 1 << 20,
            tcp: None,
            web: None,
            token_file: None,
            break_sequence: Vec::new(),
            max_pending: 32,
            force: false,
            exit_after: None,
            signals: true,
        }
    }
}
