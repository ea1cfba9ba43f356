//! A single-threaded daemon that owns its `mio::Poll` and drives libvirt's events
//! from it: its own Unix socket and libvirt share one thread.
//!
//! Clients that connect to the socket receive every domain lifecycle event as a line.
//! With no `--uri` it uses libvirt's in-process test driver and, so that there is
//! something to see, steps a test domain through its lifecycle once a second:
//!
//! ```text
//! cargo run --example embedded -- --socket /tmp/events.sock
//! socat - UNIX-CONNECT:/tmp/events.sock        # in another terminal
//! ```
//!
//! `--socket PATH` replaces only a stale socket (one nobody listens on): anything
//! else there (a file, a directory, a live socket) is an error and left alone. At
//! exit the socket goes, if it is still the one this run made.
//!
//! The embedding pattern is three calls: register the `Reactor` on the daemon's
//! registry, `next_timeout()` to cap the daemon's poll timeout, and
//! `dispatch(&mut state)` after every poll.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use virt::connect::Connect;
use virt::domain::Domain;
use virt_reactor::{LifecycleEvent, Reactor};

const LIBVIRT: Token = Token(0);
const LISTENER: Token = Token(1);
const FIRST_CLIENT: usize = 2;

const DEMO_XML: &str = "<domain type='test'><name>embedded-demo</name>\
                        <memory unit='MiB'>16</memory><os><type>hvm</type></os></domain>";

#[derive(Parser)]
#[command(about = "A single-threaded daemon: its own socket and libvirt's events on one mio::Poll")]
struct Args {
    /// Where clients connect.
    #[arg(long, default_value = "/tmp/virt-reactor-events.sock")]
    socket: PathBuf,
    /// Watch this connection instead of stepping a demo domain on test:///default.
    #[arg(long)]
    uri: Option<String>,
    /// Exit after this many demo steps (default: run until killed).
    #[arg(long)]
    steps: Option<usize>,
}

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embedded: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);

    // libvirt's loop is one more source on our poll.
    let mut libvirt = Reactor::register()?;
    poll.registry()
        .register(&mut libvirt, LIBVIRT, Interest::READABLE)?;

    let (mut listener, _socket) = OwnSocket::bind(&args.socket)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", args.socket.display());

    let conn = virt_reactor::connect(args.uri.as_deref().unwrap_or("test:///default"))?;
    // The subscription's handler runs inside dispatch(); it queues lines in the state.
    let mut lines: Vec<String> = Vec::new();
    let subscription =
        libvirt.subscribe_lifecycle(&conn, |lines: &mut Vec<String>, event: &LifecycleEvent| {
            lines.push(format!("{event}\n"));
        })?;

    let mut clients: HashMap<Token, UnixStream> = HashMap::new();
    let mut next_client = FIRST_CLIENT;
    let mut demo = args.uri.is_none().then(|| Demo::new(&conn));
    let mut steps = 0;

    while args.steps.is_none_or(|max| steps < max) {
        let until_step = demo
            .as_ref()
            .map(|d| d.next_step.saturating_duration_since(Instant::now()));
        let timeout = min(libvirt.next_timeout(), until_step);
        poll.poll(&mut events, timeout)?;
        // After every poll, not only when LIBVIRT fired: a due libvirt timer makes no
        // fd readable, it only ends the poll's timeout.
        libvirt.dispatch(&mut lines)?;
        for event in events.iter() {
            match event.token() {
                LIBVIRT => {} // dispatched above
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let token = Token(next_client);
                            next_client += 1;
                            poll.registry()
                                .register(&mut stream, token, Interest::READABLE)?;
                            clients.insert(token, stream);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                },
                // A client spoke or hung up; this daemon only talks, so any readiness
                // other than more data means it is gone.
                token => {
                    if event.is_read_closed() || event.is_error() {
                        clients.remove(&token);
                    }
                }
            }
        }
        if let Some(demo) = demo.as_mut() {
            if Instant::now() >= demo.next_step {
                demo.step()?;
                steps += 1;
            }
        }
        for line in lines.drain(..) {
            print!("{line}");
            // A client that cannot take a line now is dropped rather than allowed to
            // block the thread that also runs libvirt.
            clients.retain(|_, client| client.write_all(line.as_bytes()).is_ok());
        }
    }

    libvirt.unsubscribe(subscription)?;
    drop(demo);
    drop(conn);
    let report = libvirt.shutdown(Duration::from_secs(5), &mut lines)?;
    println!("drained: {report:?}");
    Ok(())
}

/// The socket file this run made; removed when dropped, if it is still that file.
struct OwnSocket {
    path: PathBuf,
    /// Device and inode.
    id: (u64, u64),
}

impl OwnSocket {
    /// Binds `path` (mode 0600), replacing only a stale socket there.
    fn bind(path: &Path) -> Result<(UnixListener, OwnSocket), String> {
        let fail = |why: String| format!("--socket {}: {why}", path.display());
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // Stale only if nobody accepts on it.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(fail("another process listens on it".into())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        fs::remove_file(path).map_err(|e| fail(e.to_string()))?;
                    }
                    Err(e) => return Err(fail(format!("exists, and connecting to it: {e}"))),
                }
            }
            Ok(_) => return Err(fail("exists and is not a socket; not replacing it".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
        let meta = fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
        let socket = OwnSocket {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(e.to_string()))?;
        Ok((listener, socket))
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn min(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Steps a test-driver domain through its lifecycle, one step a second.
struct Demo {
    conn: Connect,
    domain: Option<Domain>,
    step: usize,
    next_step: Instant,
}

impl Demo {
    fn new(conn: &Connect) -> Demo {
        Demo {
            conn: conn.clone(),
            domain: None,
            step: 0,
            next_step: Instant::now(),
        }
    }

    /// The test driver is in-process and never waits on the loop, so these blocking
    /// calls are safe on the loop's own thread.
    fn step(&mut self) -> Result<(), virt::error::Error> {
        match (self.step % 6, &self.domain) {
            (0, _) => self.domain = Some(self.conn.define_domain_xml(DEMO_XML)?),
            (1, Some(d)) => d.create().map(drop)?,
            (2, Some(d)) => d.suspend().map(drop)?,
            (3, Some(d)) => d.resume().map(drop)?,
            (4, Some(d)) => d.destroy()?,
            (5, Some(d)) => {
                d.undefine()?;
                self.domain = None;
            }
            _ => {}
        }
        self.step += 1;
        self.next_step = Instant::now() + Duration::from_secs(1);
        Ok(())
    }
}
