//! What `console_mux` and the tests share: where the consoles come from (a
//! daemon, or the embedded driver in a private root), the testbed guests they boot,
//! and destroying those guests at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use virt::connect::Connect;
use virt_reactor::console::{ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::testbed::{self, GuestMode, Testbed};
use virt_reactor::{Reactor, ReactorHandle};

/// The connection, the consoles, their events, and the guests this run booted.
pub struct Session<S: 'static> {
    pub conn: Connect,
    pub mux: ConsoleMux<S>,
    pub events: Receiver<ConsoleEvent>,
    pub booted: Vec<String>,
}

/// The state that hears how many guests the end destroyed.
pub trait Destroyed {
    fn destroyed(&mut self) -> &mut Option<usize>;
}

/// What the set-up needs: `uri`, or else the embedded driver in `root`, which gets
/// `guests` testbed guests.
pub struct SetUp {
    pub uri: Option<String>,
    pub root: Option<PathBuf>,
    pub guests: usize,
    pub testbed: PathBuf,
    pub options: ConsoleOptions,
}

impl SetUp {
    /// Connects on a worker thread (with the embedded driver, opening waits for
    /// replies that come through the loop), then on the loop thread makes the
    /// consoles and boots the testbed guests of an embedded run. `then` gets the
    /// session and its URI there; a daemon's domains are the caller's to attach.
    pub fn start<S: 'static>(
        self,
        handle: &ReactorHandle<S>,
        then: impl FnOnce(&mut Reactor<S>, &mut S, Result<(Session<S>, String), String>)
            + Send
            + 'static,
    ) -> virt_reactor::Result<()> {
        handle.spawn_blocking(
            move || {
                let connected = self.connect();
                (self, connected)
            },
            |reactor, state, (setup, connected)| {
                let session = connected.and_then(|(uri, conn)| {
                    let session = setup.consoles(reactor, conn)?;
                    Ok((session, uri))
                });
                then(reactor, state, session);
            },
        )
    }

    fn connect(&self) -> Result<(String, Connect), String> {
        let uri = match (&self.uri, &self.root) {
            (Some(uri), _) => uri.clone(),
            (None, Some(root)) => testbed::embed_root(root)
                .map_err(|e| format!("embedded driver in {}: {e}", root.display()))?,
            (None, None) => unreachable!("no URI means an embedded root"),
        };
        let conn = virt_reactor::connect(&uri).map_err(|e| format!("{uri}: {e}"))?;
        Ok((uri, conn))
    }

    /// On the loop thread: the consoles, and the guests of an embedded run (each
    /// runs once its console is attached).
    fn consoles<S: 'static>(
        self,
        reactor: &mut Reactor<S>,
        conn: Connect,
    ) -> Result<Session<S>, String> {
        let (mux, events) =
            ConsoleMux::new(reactor, &conn, self.options).map_err(|e| format!("consoles: {e}"))?;
        let mut booted = Vec::new();
        if self.uri.is_none() {
            let testbed = Testbed::open(&self.testbed).map_err(|e| e.to_string())?;
            for i in 1..=self.guests {
                let name = format!("tb-{i}");
                mux.boot(&name, &testbed.guest_xml(&name, GuestMode::Plain))
                    .map_err(|e| format!("{name}: {e}"))?;
                booted.push(name);
            }
        }
        Ok(Session {
            conn,
            mux,
            events,
            booted,
        })
    }
}

impl<S: Destroyed + 'static> Session<S> {
    /// At the end, once the consoles are detached: destroys the guests this run
    /// booted on a worker thread (destroy waits on QEMU's monitor, which the loop
    /// serves), and runs the loop until that is done and libvirt has answered every
    /// console's end, for `grace` at most. `event` gets the consoles' last events.
    /// Returns how many guests were destroyed.
    pub fn end(
        self,
        reactor: &mut Reactor<S>,
        state: &mut S,
        grace: Duration,
        mut event: impl FnMut(&ConsoleEvent),
    ) -> virt_reactor::Result<usize> {
        let Session {
            conn,
            mux,
            events,
            booted,
        } = self;
        reactor.handle().spawn_blocking(
            move || {
                let destroyed = testbed::destroy(&conn, &booted);
                drop((mux, conn));
                destroyed
            },
            |_, state: &mut S, destroyed| *state.destroyed() = Some(destroyed),
        )?;
        let deadline = Instant::now() + grace;
        let mut destroyed = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            reactor.run_once(Some(left.min(Duration::from_millis(100))), state)?;
            for console_event in events.try_iter() {
                event(&console_event);
            }
            destroyed = destroyed.or(state.destroyed().take());
            if let (Some(destroyed), true) = (destroyed, reactor.is_empty()) {
                return Ok(destroyed);
            }
            if left.is_zero() {
                return Err(virt_reactor::Error::TimedOut);
            }
        }
    }
}
