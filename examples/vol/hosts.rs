//! The connections `vol` works through, given as `[LABEL=]URI`, and their recovery
//! once lost: a new connection is tried every [`RETRY_EVERY`] until `--retry-for`
//! runs out.

use std::str::FromStr;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::storage_pool::StoragePool;

/// How often a lost connection is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// A connection as given: `[LABEL=]URI`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub label: String,
    pub uri: String,
}

impl FromStr for Endpoint {
    type Err = String;

    /// A label is what comes before the first `=`, if that holds no `:` or `/` (a
    /// URI's query has `=` too).
    fn from_str(text: &str) -> Result<Endpoint, String> {
        let (label, uri) = match text.split_once('=') {
            Some((label, uri)) if !label.contains([':', '/']) => (label.to_owned(), uri),
            _ => (label_of(text), text),
        };
        if label.is_empty() || uri.is_empty() {
            return Err(format!("{text}: expected [LABEL=]URI"));
        }
        Ok(Endpoint {
            label,
            uri: uri.to_owned(),
        })
    }
}

/// A URI's host name (with `:port`), or `local` for a URI without a host.
fn label_of(uri: &str) -> String {
    let Some((_, rest)) = uri.split_once("://") else {
        return "local".to_owned();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    match host {
        "" => "local".to_owned(),
        host => host.to_owned(),
    }
}

/// One connection and the pool on it.
pub struct Host {
    pub endpoint: Endpoint,
    /// Counts the connections opened: a transfer knows which one it ran on.
    pub generation: u32,
    pool: Option<StoragePool>,
    conn: Option<Connect>,
    /// While lost: when to stop trying, and when to try next.
    retry: Option<(Instant, Instant)>,
}

/// What became of a lost host in [`Host::recover`].
pub enum Recovery {
    Waiting,
    Back,
    GaveUp(String),
}

impl Host {
    pub fn new(endpoint: Endpoint) -> Host {
        Host {
            endpoint,
            generation: 0,
            pool: None,
            conn: None,
            retry: None,
        }
    }

    /// Opens the connection and finds the pool.
    pub fn connect(&mut self, pool: &str) -> virt_reactor::Result<()> {
        let conn = virt_reactor::connect(&self.endpoint.uri)?;
        self.generation += 1;
        let found = conn.lookup_storage_pool_by_name(pool);
        self.conn = Some(conn);
        self.pool = Some(found?);
        self.retry = None;
        Ok(())
    }

    /// The pool, while connected.
    pub fn pool(&self) -> Option<&StoragePool> {
        self.pool.as_ref()
    }

    /// Whether the connection is gone (a transfer's failure may be why).
    pub fn is_lost(&self) -> bool {
        self.retry.is_some()
            || self
                .conn
                .as_ref()
                .is_none_or(|conn| !conn.is_alive().unwrap_or(false))
    }

    /// Marks the connection lost: retried for `retry_for` from now.
    pub fn lost(&mut self, retry_for: Duration) {
        if self.retry.is_none() {
            let now = Instant::now();
            self.retry = Some((now + retry_for, now));
        }
        self.pool = None;
        self.conn = None;
    }

    /// Tries the lost connection again if it is time.
    pub fn recover(&mut self, pool: &str) -> Recovery {
        let Some((until, next)) = self.retry else {
            return Recovery::Back;
        };
        let now = Instant::now();
        if now < next {
            return Recovery::Waiting;
        }
        match self.connect(pool) {
            Ok(()) => Recovery::Back,
            Err(e) if now >= until => Recovery::GaveUp(e.to_string()),
            Err(e) => {
                log::info!("{}: {e}", self.endpoint.label);
                self.retry = Some((until, now + RETRY_EVERY));
                Recovery::Waiting
            }
        }
    }
}
