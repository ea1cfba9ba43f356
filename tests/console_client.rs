//! The `virt-console` binary under a real pseudo-terminal, against a peer that
//! speaks the service's viewer byte protocol on a Unix socket (or TCP) made here:
//! output reaches the terminal, keys reach the peer, the escape key and `~.` quit at
//! once, `~B`, `--force` and `--read-only` send their in-band commands, and the
//! terminal's mode is back as it was after every way out (quit, the service closing,
//! SIGTERM, a failed connect). Last, the whole chain: `virt-console`, `virt-consoled`,
//! a private libvirtd and a testbed guest that runs what is typed.

mod support;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::pty::openpty;
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{tcgetattr, LocalFlags, Termios};
use nix::unistd::Pid;
use support::consoles::testbed;
use support::daemon::PrivateDaemon;
use virt::connect::Connect;
use virt_reactor::testbed::{GuestMode, Guests, BANNER};

/// Generous: each wait ends as soon as what it waits for happens.
const TIMEOUT: Duration = Duration::from_secs(30);
/// A testbed guest's boot under TCG, while other tests boot theirs.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const NAME: &str = "tb-1";
const GREETING: &[u8] = b"\r\n[virt-consoled] viewer 1: read-write\r\nguest says hello\r\n";

/// A pseudo-terminal: the client gets the slave side as stdin and stdout, the test
/// reads the master side (what the terminal shows) and types into it.
struct Pty {
    /// Dropped first, so that reading the master ends (EIO) once the client is gone.
    slave: OwnedFd,
    master: File,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn open() -> Pty {
        let pty = openpty(None, None).expect("openpty");
        let master = File::from(pty.master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup the master");
        let shown = Arc::clone(&screen);
        thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                shown.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            slave: pty.slave,
            master,
            screen,
        }
    }

    fn termios(&self) -> Termios {
        tcgetattr(&self.slave).expect("tcgetattr on the slave")
    }

    fn is_raw(&self) -> bool {
        !self
            .termios()
            .local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG)
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("type into the terminal");
    }

    fn wait_for(&self, what: &[u8]) {
        self.wait_for_within(what, TIMEOUT);
    }

    fn wait_for_within(&self, what: &[u8], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen.lock().unwrap().clone();
            if screen.windows(what.len()).any(|w| w == what) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {:?}; it shows {:?}",
                String::from_utf8_lossy(what),
                String::from_utf8_lossy(&screen)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The client, its stdin and stdout on the pty, its stderr captured.
struct Client(Child);

impl Client {
    fn spawn(pty: &Pty, args: &[&str]) -> Client {
        let tty = || Stdio::from(pty.slave.try_clone().expect("dup the slave"));
        let child = Command::new(env!("CARGO_BIN_EXE_virt-console"))
            .args(args)
            .stdin(tty())
            .stdout(tty())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virt-console");
        Client(child)
    }

    /// Its exit status and what it printed on stderr.
    fn wait_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.0.try_wait().expect("wait for virt-console") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "virt-console did not exit within {TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        let pipe = self.0.stderr.as_mut().expect("piped stderr");
        pipe.read_to_string(&mut stderr).expect("read its stderr");
        (status, stderr)
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.0.id() as i32), signal).expect("signal virt-console");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A failed test must not leave it running.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The service's side of one viewer connection.
struct Peer<S> {
    stream: S,
}

impl<S: Read + Write> Peer<S> {
    /// Reads exactly `want.len()` bytes and checks that they are `want`.
    fn expect(&mut self, want: &[u8]) {
        let mut got = vec![0; want.len()];
        self.stream
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reading {:?}: {e}", String::from_utf8_lossy(want)));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "what the client sent"
        );
    }

    /// Everything else the client sends before it closes the connection.
    fn rest(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).expect("read to the end");
        rest
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the client");
    }
}

/// A socket directory holding `NAME.sock`, removed on drop.
struct SocketDir {
    path: PathBuf,
    listener: UnixListener,
}

impl SocketDir {
    fn new(test: &str) -> SocketDir {
        let path =
            std::env::temp_dir().join(format!("console-client-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create the socket directory");
        let listener =
            UnixListener::bind(path.join(format!("{NAME}.sock"))).expect("bind NAME.sock");
        SocketDir { path, listener }
    }

    fn dir(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp dir")
    }

    /// The client's connection, which it opens at its start.
    fn accept(&self) -> Peer<std::os::unix::net::UnixStream> {
        self.listener
            .set_nonblocking(true)
            .expect("non-blocking accept");
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the client never connected");
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking stream");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        Peer { stream }
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Starts a client on `NAME` in a fresh socket directory; returns once the greeting
/// is on its terminal, which is then raw.
fn attached(
    test: &str,
    extra: &[&str],
) -> (
    Pty,
    Termios,
    SocketDir,
    Client,
    Peer<std::os::unix::net::UnixStream>,
) {
    let pty = Pty::open();
    let cooked = pty.termios();
    assert!(!pty.is_raw(), "a new pty starts cooked");
    let dir = SocketDir::new(test);
    let mut args = vec!["--dir", dir.dir()];
    args.extend_from_slice(extra);
    args.push(NAME);
    let client = Client::spawn(&pty, &args);
    let mut peer = dir.accept();
    peer.send(GREETING);
    pty.wait_for(b"guest says hello\r\n");
    assert!(pty.is_raw(), "the terminal is raw while it runs");
    (pty, cooked, dir, client, peer)
}

#[test]
fn output_and_keys_flow_and_the_escape_key_quits_at_once() {
    let (mut pty, cooked, _dir, mut client, mut peer) = attached("escape", &[]);
    pty.wait_for(b"[virt-consoled] viewer 1: read-write\r\n");
    // Raw: each key goes as typed, with no Enter to wait for and no echo of its own.
    pty.type_keys(b"ls -l\r\x03\x04");
    peer.expect(b"ls -l\r\x03\x04");
    peer.send(b"total 0\r\n");
    pty.wait_for(b"total 0\r\n");

    pty.type_keys(b"\x1d"); // Ctrl-], alone: no Enter after it
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(peer.rest(), b"", "the escape key is not sent");
    assert_eq!(pty.termios(), cooked, "the terminal mode is restored");
}

#[test]
fn tilde_b_sends_a_break_and_tilde_dot_quits() {
    let (mut pty, cooked, _dir, mut client, mut peer) = attached("tilde", &[]);
    pty.type_keys(b"~B");
    peer.expect(b"\x1dbreak\n");
    pty.type_keys(b"a~B\r~~\r~?");
    peer.expect(b"a~B\r~\r");
    pty.wait_for(b"~B  send a break\r\n");
    pty.type_keys(b"~.");
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(peer.rest(), b"", "~? and ~. are not sent");
    assert_eq!(pty.termios(), cooked);
}

#[test]
fn read_only_asks_for_it_and_sends_no_keys() {
    let (mut pty, cooked, _dir, mut client, mut peer) = attached("read-only", &["--read-only"]);
    peer.expect(b"\x1dro\n");
    pty.type_keys(b"reboot\r\x1d");
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&peer.rest()),
        "",
        "a read-only client sends no keys"
    );
    assert_eq!(pty.termios(), cooked);
}

#[test]
fn sigterm_restores_the_terminal() {
    let (pty, cooked, _dir, mut client, _peer) = attached("sigterm", &[]);
    client.signal(Signal::SIGTERM);
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(128 + 15), "{stderr}");
    assert_eq!(pty.termios(), cooked);
}

#[test]
fn the_service_closing_ends_it_with_status_1_and_the_reason() {
    let (pty, cooked, _dir, mut client, mut peer) = attached("closed", &[]);
    peer.send(b"\r\n[virt-consoled] console ended: guest gone\r\n");
    drop(peer);
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "virt-console: tb-1: the service closed the connection: console ended: guest gone"
        ),
        "{stderr}"
    );
    assert_eq!(pty.termios(), cooked);
}

#[test]
fn a_missing_socket_is_named_with_status_2() {
    let pty = Pty::open();
    let cooked = pty.termios();
    let dir = SocketDir::new("missing");
    let mut client = Client::spawn(&pty, &["--dir", dir.dir(), "nosuch"]);
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(2), "{stderr}");
    let path = dir.path.join("nosuch.sock");
    assert!(
        stderr.starts_with(&format!(
            "virt-console: cannot connect to {}: ",
            path.display()
        )),
        "{stderr}"
    );
    assert_eq!(pty.termios(), cooked);
}

/// Over TCP the token line comes first; `--force` takes the write role; with `-e ^X`
/// a typed Ctrl-] is a literal byte, sent doubled, and Ctrl-X quits.
#[test]
fn tcp_token_force_and_another_escape_key() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("its address").to_string();
    let token_file =
        std::env::temp_dir().join(format!("console-client-{}-token", std::process::id()));
    std::fs::write(&token_file, "0123abcd\nignored\n").expect("write the token file");
    let pty = Pty::open();
    let cooked = pty.termios();
    let token = token_file.to_str().expect("UTF-8");
    let mut client = Client::spawn(
        &pty,
        &[
            "--tcp",
            &addr,
            "--token-file",
            token,
            "--force",
            "-e",
            "^X",
            NAME,
        ],
    );
    let (stream, _) = listener.accept().expect("the client connects");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut peer = Peer { stream };
    peer.expect(b"0123abcd tb-1\n\x1dtake\n");
    peer.send(GREETING);
    pty.wait_for(b"guest says hello\r\n");
    let mut pty = pty;
    pty.type_keys(b"a\x1db\x18");
    let (status, stderr) = client.wait_exit();
    let _ = std::fs::remove_file(&token_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(peer.rest(), b"a\x1d\x1db");
    assert_eq!(pty.termios(), cooked);
}

/// The service ends `virt-consoled` when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The real chain: a guest on a private libvirtd, `virt-consoled` serving its
/// console, `virt-console` on a terminal. The guest's shell runs what is typed
/// (`$((6*7))` comes back as 42, so the answer is not just the echo of the input),
/// `~R` and `~W` change the role and the service says so, and Ctrl-] quits at once.
#[test]
fn against_virt_consoled_and_a_real_guest() {
    virt::error::clear_error_callback();
    let testbed = testbed();
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("qemu");
    let conn = Connect::open(Some(&uri)).expect("connect to the private libvirtd");
    let guests = Guests::new();
    let name = "vc-e2e";
    guests.track(&conn, name);
    conn.create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
        .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", daemon.log_tail(30)));

    let work = std::env::temp_dir().join(format!("console-client-{}-e2e", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir(&work).expect("create the work directory");
    let dir = work.join("consoles");
    let dir_arg = dir.to_str().expect("UTF-8");
    let _service = Service(
        Command::new(env!("CARGO_BIN_EXE_virt-consoled"))
            .args(["--uri", &uri, "--dir", dir_arg, "--exit-after", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(work.join("service.stderr")).expect("its stderr"))
            .spawn()
            .expect("spawn virt-consoled"),
    );
    let socket = dir.join(format!("{name}.sock"));
    let deadline = Instant::now() + TIMEOUT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} after {TIMEOUT:?}: {}",
            socket.display(),
            std::fs::read_to_string(work.join("service.stderr")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }

    let mut pty = Pty::open();
    let cooked = pty.termios();
    let mut client = Client::spawn(&pty, &["--dir", dir_arg, name]);
    // Replayed from the scrollback, or printed live if the guest is still booting.
    pty.wait_for_within(format!("{BANNER} name={name}").as_bytes(), BOOT_TIMEOUT);
    assert!(pty.is_raw());
    pty.type_keys(b"echo answer-$((6*7))\r");
    pty.wait_for(b"answer-42");
    pty.type_keys(b"~R");
    pty.wait_for(b": read-only\r\n");
    pty.type_keys(b"~W");
    pty.wait_for(b": read-write\r\n");
    pty.type_keys(b"\x1d");
    let (status, stderr) = client.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(pty.termios(), cooked);
    let _ = std::fs::remove_dir_all(&work);
}
