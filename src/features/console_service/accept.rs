//! Accepting connections from anyone on the machine without being exhausted by them.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

/// Connections accepted per listener and loop iteration, so that a flood of them
/// cannot keep the loop from serving (and reaping) the viewers it has.
pub(crate) const ACCEPT_BUDGET: usize = 32;
/// At most one log line per this, for what a hostile peer can repeat at will.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A descriptor held in reserve. Out of descriptors (EMFILE, ENFILE), accept leaves
/// the connection in the backlog, and the edge-triggered listener would not report
/// it again: giving this one up lets the connection be accepted and closed at once.
#[derive(Debug)]
pub(crate) struct Reserve {
    file: Option<fs::File>,
    shed: u64,
    log: Quiet,
}

impl Reserve {
    pub(crate) fn new() -> io::Result<Reserve> {
        Ok(Reserve {
            file: Some(fs::File::open("/dev/null")?),
            shed: 0,
            log: Quiet::default(),
        })
    }

    /// No descriptor is held in reserve: none was free at the last try.
    pub(crate) fn starved(&self) -> bool {
        self.file.is_none()
    }

    /// Reopens the reserve if an earlier attempt found no descriptor free.
    pub(crate) fn refill(&mut self) {
        if self.file.is_none() {
            self.file = fs::File::open("/dev/null").ok();
        }
    }

    /// Gives up the reserve for `accept`, which accepts and closes one connection.
    /// Returns false when there is nothing to shed or no descriptor came free.
    pub(crate) fn shed(&mut self, what: &str, accept: impl FnOnce() -> io::Result<()>) -> bool {
        if self.file.take().is_none() {
            return false;
        }
        let accepted = accept();
        self.refill();
        match accepted {
            Ok(()) => {
                self.shed += 1;
                let shed = self.shed;
                self.log.warn(|| {
                    format!(
                        "{what}: out of file descriptors; closed {shed} new connection(s) so far"
                    )
                });
                true
            }
            Err(_) => false,
        }
    }
}

/// Accept errors about one connection only: go on with the next.
pub(crate) fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// Whether an accept failed for want of a descriptor.
pub(crate) fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Logs at most once per [`LOG_EVERY`], saying how many lines it held back.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Quiet {
    pub(crate) fn warn(&mut self, line: impl FnOnce() -> String) {
        if self.last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.held += 1;
            return;
        }
        self.last = Some(Instant::now());
        match std::mem::take(&mut self.held) {
            0 => log::warn!("{}", line()),
            held => log::warn!("{} ({held} similar lines held back)", line()),
        }
    }
}
