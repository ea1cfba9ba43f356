//! The libvirt connections the service serves, one per host, each supervised: lost,
//! it is opened again with backoff, and its consoles are attached again.
//!
//! With one connection a console is named after its domain; with several, `LABEL/NAME`,
//! the label naming the host.

use std::time::Instant;

use crossbeam_channel::Receiver;
use virt::connect::Connect;

use super::libvirt::Libvirt;
use super::status::HostStatus;
use crate::features::console::{ConsoleEvent, ConsoleMux, ConsoleOptions};
use crate::features::supervisor::{ConnectionEvent, Endpoint, Supervisor, SupervisorOptions};
use crate::streams::reactor::Reactor;
use crate::vocab::error::Result;

/// Every host, by index.
#[derive(Default)]
pub(crate) struct Hosts {
    hosts: Vec<Host>,
}

pub(crate) struct Host {
    pub(crate) endpoint: Endpoint,
    supervisor: Supervisor<Libvirt>,
    events: Receiver<ConnectionEvent>,
    /// The open connection and its consoles; `None` while down.
    pub(crate) session: Option<Session>,
    link: Link,
}

/// A connection and its consoles.
pub(crate) struct Session {
    pub(crate) conn: Connect,
    pub(crate) mux: ConsoleMux<Libvirt>,
    pub(crate) events: Receiver<ConsoleEvent>,
}

enum Link {
    Connecting,
    Up {
        since: Instant,
        reconnects: u32,
    },
    Down {
        reason: String,
        since: Instant,
        attempt: u32,
        reconnects: u32,
    },
}

/// What became of a host's connection, for the server to act on.
pub(crate) enum Change {
    /// Open (again): list its domains and attach.
    Up { host: usize },
    /// Lost: its consoles ended.
    Down { host: usize, why: String },
    /// The first connection failed: the service cannot start.
    Failed { why: String },
}

impl Hosts {
    /// Supervises a connection to each of `endpoints`; domain lifecycle events arrive
    /// in the reactor's state with the host's index.
    pub(crate) fn start(
        reactor: &mut Reactor<Libvirt>,
        endpoints: &[Endpoint],
        template: &SupervisorOptions,
    ) -> Result<Hosts> {
        let mut hosts = Vec::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let mut options = template.clone();
            options.uri.clone_from(&endpoint.uri);
            let (supervisor, events) = Supervisor::start(reactor, options)?;
            // Subscribed before the connection is announced, so it is live by then.
            supervisor.subscribe_lifecycle(reactor, move |libvirt: &mut Libvirt, event| {
                libvirt
                    .lifecycle
                    .push((index, event.domain.clone(), event.kind));
            })?;
            hosts.push(Host {
                endpoint: endpoint.clone(),
                supervisor,
                events,
                session: None,
                link: Link::Connecting,
            });
        }
        Ok(Hosts { hosts })
    }

    /// The console name of `domain` on host `host`.
    pub(crate) fn key(&self, host: usize, domain: &str) -> String {
        match (&self.hosts[..], self.hosts.get(host)) {
            ([_], _) | (_, None) => domain.to_owned(),
            (_, Some(h)) => format!("{}/{domain}", h.endpoint.label),
        }
    }

    /// The host and domain a console name stands for.
    pub(crate) fn locate<'a>(&self, key: &'a str) -> Option<(usize, &'a str)> {
        if let [_] = &self.hosts[..] {
            return Some((0, key));
        }
        let (label, domain) = key.split_once('/')?;
        let host = self.hosts.iter().position(|h| h.endpoint.label == label)?;
        Some((host, domain))
    }

    /// Why the console `key` ended when its connection was lost for `reason`.
    pub(crate) fn lost(&self, key: &str, reason: &str) -> String {
        let label = self
            .locate(key)
            .map_or("libvirt", |(host, _)| &self.hosts[host].endpoint.label);
        lost(label, reason)
    }

    pub(crate) fn get(&self, host: usize) -> Option<&Host> {
        self.hosts.get(host)
    }

    /// The session of the host `key` is on, and the domain it names.
    pub(crate) fn session_of<'a>(&self, key: &'a str) -> Option<(&Session, &'a str)> {
        let (host, domain) = self.locate(key)?;
        Some((self.hosts[host].session.as_ref()?, domain))
    }

    /// Hosts with an open connection.
    pub(crate) fn sessions(&self) -> impl Iterator<Item = (usize, &Session)> {
        self.hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some((i, h.session.as_ref()?)))
    }

    /// Takes in what the supervisors reported, on the loop thread.
    pub(crate) fn changes(
        &mut self,
        reactor: &mut Reactor<Libvirt>,
        console_options: &ConsoleOptions,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for (index, host) in self.hosts.iter_mut().enumerate() {
            let label = host.endpoint.label.clone();
            for event in host.events.try_iter().collect::<Vec<_>>() {
                match event {
                    ConnectionEvent::Connected { conn }
                    | ConnectionEvent::Reconnected { conn, .. } => {
                        let reconnects = match host.link {
                            Link::Connecting => 0,
                            Link::Up { reconnects, .. } | Link::Down { reconnects, .. } => {
                                reconnects + 1
                            }
                        };
                        match ConsoleMux::new(reactor, &conn, console_options.clone()) {
                            Ok((mux, events)) => {
                                log::info!("{label}: connected to {}", host.endpoint.uri);
                                host.session = Some(Session { conn, mux, events });
                                host.link = Link::Up {
                                    since: Instant::now(),
                                    reconnects,
                                };
                                changes.push(Change::Up { host: index });
                            }
                            Err(e) => log::error!("{label}: consoles: {e}"),
                        }
                    }
                    ConnectionEvent::Lost { reason } => {
                        log::warn!("{label}: connection lost ({reason}); reconnecting");
                        host.session = None;
                        let reconnects = match host.link {
                            Link::Up { reconnects, .. } | Link::Down { reconnects, .. } => {
                                reconnects
                            }
                            Link::Connecting => 0,
                        };
                        host.link = Link::Down {
                            reason: reason.to_string(),
                            since: Instant::now(),
                            attempt: 0,
                            reconnects,
                        };
                        changes.push(Change::Down {
                            host: index,
                            why: lost(&label, &reason.to_string()),
                        });
                    }
                    ConnectionEvent::Reconnecting {
                        attempt: next,
                        delay,
                        error,
                    } => {
                        if let Some(e) = &error {
                            log::info!("{label}: attempt {} failed: {e}", next - 1);
                        }
                        log::debug!("{label}: attempt {next} in {delay:?}");
                        if let Link::Down { attempt, .. } = &mut host.link {
                            *attempt = next;
                        }
                    }
                    ConnectionEvent::GaveUp { error } => changes.push(Change::Failed {
                        why: format!("{}: {error}", host.endpoint.uri),
                    }),
                }
            }
        }
        changes
    }

    /// Stops every supervisor and detaches every console; on the loop thread.
    pub(crate) fn stop(&mut self, reactor: &mut Reactor<Libvirt>, libvirt: &mut Libvirt) {
        for host in &mut self.hosts {
            host.supervisor.stop(reactor);
            if let Some(session) = &host.session {
                session.mux.detach_all(reactor, libvirt);
            }
        }
    }

    /// Drops every session: call after the consoles' last events were taken.
    pub(crate) fn close(&mut self) {
        for host in &mut self.hosts {
            host.session = None;
        }
    }

    pub(crate) fn status(&self) -> Vec<HostStatus> {
        self.hosts
            .iter()
            .map(|host| {
                let (state, since, attempt, reason, reconnects) = match &host.link {
                    Link::Connecting => ("connecting", None, 0, None, 0),
                    Link::Up { since, reconnects } => {
                        ("connected", Some(since), 0, None, *reconnects)
                    }
                    Link::Down {
                        reason,
                        since,
                        attempt,
                        reconnects,
                    } => (
                        "reconnecting",
                        Some(since),
                        *attempt,
                        Some(reason.clone()),
                        *reconnects,
                    ),
                };
                HostStatus {
                    label: host.endpoint.label.clone(),
                    uri: host.endpoint.uri.clone(),
                    state: state.to_owned(),
                    for_secs: since.map_or(0.0, |s| s.elapsed().as_secs_f64()),
                    attempt,
                    lost: reason,
                    reconnects,
                }
            })
            .collect()
    }
}

fn lost(label: &str, reason: &str) -> String {
    format!("connection to {label} lost ({reason}); reconnecting")
}
