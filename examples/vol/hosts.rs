//! The connections `vol` works through, each a [`Supervisor`]: once lost, it is
//! opened again (with backoff, off the loop) until `--retry-for` runs out.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use virt::storage_pool::StoragePool;
use virt_reactor::supervisor::{ConnectionEvent, Endpoint, Supervisor, SupervisorOptions};
use virt_reactor::{Error, Reactor};

/// Where a host's connection is.
enum Link {
    /// The first connection is being opened.
    Opening,
    Up(StoragePool),
    /// Lost; tried again until then.
    Down {
        until: Instant,
    },
    /// For good.
    Gone,
}

/// What became of a host, for its transfers.
pub enum Change {
    /// Connected, the first time or again.
    Up,
    /// Not back in time, or the first connection failed: why.
    Gone(Error),
}

/// One connection and the pool on it.
pub struct Host<S: 'static> {
    pub endpoint: Endpoint,
    /// Counts the connections opened: a transfer knows which one it ran on.
    pub generation: u32,
    supervisor: Supervisor<S>,
    events: Receiver<ConnectionEvent>,
    link: Link,
    retry_for: Duration,
}

impl<S: 'static> Host<S> {
    /// Starts opening `endpoint`; a lost connection is retried for `retry_for`.
    pub fn start(
        reactor: &mut Reactor<S>,
        endpoint: Endpoint,
        retry_for: Duration,
    ) -> virt_reactor::Result<Host<S>> {
        let mut options = SupervisorOptions::new(&endpoint.uri);
        if retry_for.is_zero() {
            options.max_attempts = Some(0);
        }
        let (supervisor, events) = Supervisor::start(reactor, options)?;
        Ok(Host {
            endpoint,
            generation: 0,
            supervisor,
            events,
            link: Link::Opening,
            retry_for,
        })
    }

    /// Whether the first connection is still being opened.
    pub fn is_opening(&self) -> bool {
        matches!(self.link, Link::Opening)
    }

    /// The pool, while connected.
    pub fn pool(&self) -> Option<&StoragePool> {
        match &self.link {
            Link::Up(pool) => Some(pool),
            _ => None,
        }
    }

    /// Whether the connection is gone or going (a transfer's failure may be why).
    pub fn is_lost(&self) -> bool {
        !matches!(self.link, Link::Up(_))
            || self
                .supervisor
                .connection()
                .is_none_or(|conn| !conn.is_alive().unwrap_or(false))
    }

    /// Whether a lost connection may come back.
    pub fn may_return(&self) -> bool {
        !matches!(self.link, Link::Gone) && !self.retry_for.is_zero()
    }

    /// Takes in what the supervisor said since the last call, on the loop thread;
    /// `pool` is the pool to find on each new connection.
    pub fn poll(&mut self, reactor: &mut Reactor<S>, pool: &str) -> Option<Change> {
        let mut change = None;
        while let Ok(event) = self.events.try_recv() {
            change = match event {
                ConnectionEvent::Connected { conn } | ConnectionEvent::Reconnected { conn, .. } => {
                    match conn.lookup_storage_pool_by_name(pool) {
                        Ok(found) => {
                            self.generation += 1;
                            self.link = Link::Up(found);
                            Some(Change::Up)
                        }
                        Err(e) => Some(self.give_up(reactor, Error::Libvirt(e))),
                    }
                }
                ConnectionEvent::Lost { reason } => {
                    log::info!("{}: connection lost ({reason})", self.endpoint.label);
                    self.lost();
                    change
                }
                ConnectionEvent::GaveUp { error } => Some(self.give_up(reactor, error)),
                _ => change,
            };
        }
        if let Link::Down { until } = self.link {
            if Instant::now() >= until {
                let within = humantime::format_duration(self.retry_for);
                let error = format!("not back within {within} (--retry-for)");
                return Some(self.give_up(reactor, Error::Service(error)));
            }
        }
        change
    }

    /// Marks the connection lost: it is waited for `--retry-for` from now.
    pub fn lost(&mut self) {
        if let Link::Opening | Link::Up(_) = self.link {
            self.link = Link::Down {
                until: Instant::now() + self.retry_for,
            };
        }
    }

    /// Whether the connection is being waited for.
    pub fn is_down(&self) -> bool {
        matches!(self.link, Link::Down { .. })
    }

    fn give_up(&mut self, reactor: &mut Reactor<S>, error: Error) -> Change {
        self.supervisor.stop(reactor);
        self.link = Link::Gone;
        Change::Gone(error)
    }

    /// No more connections.
    pub fn stop(&mut self, reactor: &mut Reactor<S>) {
        self.supervisor.stop(reactor);
        self.link = Link::Gone;
    }
}
