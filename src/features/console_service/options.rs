//! What the service serves, and how.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::dir::default_dir;
use super::logfile::LogOptions;
use crate::event_loop::connect::KeepAlive;
use crate::features::supervisor::{Backoff, Endpoint};

/// What the service serves, and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServiceOptions {
    /// The libvirt connections whose guests are served, one per host. With several,
    /// consoles are named `LABEL/NAME`.
    pub connections: Vec<Endpoint>,
    /// Keepalive on remote connections: how a frozen daemon is noticed.
    pub keepalive: KeepAlive,
    /// The waits between attempts to connect again after a connection was lost.
    pub backoff: Backoff,
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
    /// The defaults for `connections`: every domain, sockets in [`default_dir`],
    /// 64 KiB of scrollback, no log, 1 MiB per viewer, no TCP, no web, signals
    /// handled, [`KeepAlive::DEFAULT`] and [`Backoff::DEFAULT`].
    pub fn new(connections: Vec<Endpoint>) -> Self {
        ServiceOptions {
            connections,
            keepalive: KeepAlive::DEFAULT,
            backoff: Backoff::DEFAULT,
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
