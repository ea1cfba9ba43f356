//! `virt-console`: one console of `virt-consoled`, interactive, like `virsh console`.
//!
//! ```text
//! virt-console [--dir DIR | --tcp ADDR --token-file F] [-e KEY] [--force] [--read-only] NAME
//! ```
//!
//! The terminal is in raw mode while it runs, so every key goes to the guest, and is
//! restored on every way out: the escape key (Ctrl-] unless `-e` says otherwise)
//! quits at once, and so does `~.` at the start of a line; the other `~` commands
//! (`~?` lists them) send the service's in-band commands. Exit status: 0 when you
//! quit (or input ends), 1 when the service closed the connection, 2 when it could
//! not connect, 128 + N on signal N.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;
use rustix::event::{poll, PollFd, PollFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::{flag, low_level::pipe};
use virt_reactor::console_service::{default_dir, COMMAND};

/// The prefix of the service's notices (`\r\n[virt-consoled] TEXT\r\n`).
const NOTICE: &[u8] = b"[virt-consoled] ";

#[derive(Parser, Debug)]
#[command(
    about = "Attach to one console of virt-consoled, like `virsh console`",
    after_help = "At the start of a line, ~. quits and ~? lists the other ~ commands."
)]
struct Args {
    /// The service's socket directory [default: $XDG_RUNTIME_DIR/virt-consoled, or
    /// /run/virt-consoled as root].
    #[arg(long, value_name = "DIR", conflicts_with = "tcp")]
    dir: Option<PathBuf>,
    /// Connect to the service's loopback TCP port instead (with --token-file).
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    tcp: Option<String>,
    /// The file that holds the service's token, on its first line.
    #[arg(long, value_name = "FILE", requires = "tcp")]
    token_file: Option<PathBuf>,
    /// The key that quits at once, as ^X.
    #[arg(short, long = "escape", value_name = "KEY", default_value = "^]", value_parser = EscapeKey::parse)]
    escape: EscapeKey,
    /// Take the write role from every other viewer after connecting.
    #[arg(long, conflicts_with = "read_only")]
    force: bool,
    /// Only watch: become read-only and send no keyboard input (~W asks to write).
    #[arg(long)]
    read_only: bool,
    /// No ~ commands: a ~ at the start of a line is sent like any other key.
    #[arg(long)]
    no_tilde: bool,
    /// The console: its guest's name.
    name: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_name(&args.name) {
        eprintln!("virt-console: {e}");
        return ExitCode::from(2);
    }
    let conn = match connect(&args) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("virt-console: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args, conn) {
        Ok(End::Quit) => {
            println!();
            ExitCode::SUCCESS
        }
        Ok(End::Closed { reason, midline }) => {
            let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
            let newline = if midline { "\n" } else { "" };
            eprintln!(
                "{newline}virt-console: {}: the service closed the connection{why}",
                args.name
            );
            ExitCode::from(1)
        }
        Ok(End::Signal(signal)) => ExitCode::from(128 + signal),
        Err(e) => {
            eprintln!("\nvirt-console: {}: {e}", args.name);
            ExitCode::from(1)
        }
    }
}

/// The name goes into a file name and into the TCP token line.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.contains('/')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?}: not a console name"));
    }
    Ok(())
}

/// A connection to the service: a Unix or a TCP stream.
trait Socket: Read + Write + AsFd {}
impl<T: Read + Write + AsFd> Socket for T {}

/// Connects (and, over TCP, authenticates); the socket is non-blocking after.
fn connect(args: &Args) -> Result<Box<dyn Socket>, String> {
    let hint = |e: io::Error| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            format!(
                "{e}; is virt-consoled running, with a console {}?",
                args.name
            )
        }
        _ => e.to_string(),
    };
    if let (Some(addr), Some(token_file)) = (&args.tcp, &args.token_file) {
        let text = fs::read_to_string(token_file)
            .map_err(|e| format!("token file {}: {e}", token_file.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(format!(
                "token file {}: no token on its first line",
                token_file.display()
            ));
        }
        let mut stream = TcpStream::connect(addr.as_str())
            .map_err(|e| format!("cannot connect to {addr}: {}", hint(e)))?;
        stream
            .write_all(format!("{token} {}\n", args.name).as_bytes())
            .and_then(|()| stream.set_nonblocking(true))
            .map_err(|e| format!("{addr}: {e}"))?;
        return Ok(Box::new(stream));
    }
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let path = dir.join(format!("{}.sock", args.name));
    let stream = UnixStream::connect(&path)
        .map_err(|e| format!("cannot connect to {}: {}", path.display(), hint(e)))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Box::new(stream))
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The escape key, `~.`, or the end of input.
    Quit,
    /// The service closed the connection, with the notice it sent last, if that was
    /// the last thing it sent; `midline` when the output did not end a line.
    Closed {
        reason: Option<String>,
        midline: bool,
    },
    /// SIGHUP, SIGINT or SIGTERM.
    Signal(u8),
}

/// Copies the keyboard to the service and the service to the terminal, on this
/// thread, until one of the ways out.
fn run(args: &Args, mut conn: Box<dyn Socket>) -> io::Result<End> {
    let signals = Signals::catch()?;
    let _raw = RawMode::enable()?;
    let mut input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut stdout = io::stdout().lock();
    let mut keys = Keys::new(args.escape, !args.no_tilde, args.read_only);
    let mut outbox = Vec::new();
    if args.force {
        outbox.extend(command("take"));
    }
    if args.read_only {
        outbox.extend(command("ro"));
    }
    let mut input_open = true;
    let mut tail = Tail::default();
    let mut buf = vec![0; 16 * 1024];
    loop {
        if !input_open && outbox.is_empty() {
            return Ok(End::Quit);
        }
        let stdin = io::stdin();
        let conn_flags = if outbox.is_empty() {
            PollFlags::IN
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        let mut fds = [
            PollFd::new(&signals.wake, PollFlags::IN),
            PollFd::from_borrowed_fd(conn.as_fd(), conn_flags),
            PollFd::new(&stdin, PollFlags::IN),
        ];
        // Once input has ended, stdin is left out: a hung-up terminal stays readable.
        let watched = if input_open { fds.len() } else { fds.len() - 1 };
        match poll(&mut fds[..watched], None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let [sig, net, key] = fds.map(|fd| fd.revents());
        if !sig.is_empty() {
            return Ok(End::Signal(signals.caught()));
        }
        if !net.is_empty() {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(tail.end()),
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                    tail.push(&buf[..n]);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(tail.end()),
                Err(e) => return Err(e),
            }
            if net.contains(PollFlags::OUT) {
                match conn.write(&outbox) {
                    Ok(n) => drop(outbox.drain(..n)),
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted => {}
                    // The service is gone: reading tells how it ended.
                    Err(_) => outbox.clear(),
                }
            }
        }
        if !key.is_empty() {
            let typed = match input.read(&mut buf) {
                Ok(n) => &buf[..n],
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // EIO: the terminal hung up.
                Err(_) => &[][..],
            };
            if typed.is_empty() {
                input_open = false;
            }
            for step in keys.feed(typed) {
                match step {
                    Step::Send(bytes) => outbox.extend(bytes),
                    Step::Help => {
                        stdout.write_all(keys.help().as_bytes())?;
                        stdout.flush()?;
                    }
                    Step::Quit => {
                        // What was typed before goes, if it can without waiting.
                        let _ = conn.write(&outbox);
                        return Ok(End::Quit);
                    }
                }
            }
        }
    }
}

/// The bytes of in-band command `name`.
fn command(name: &str) -> Vec<u8> {
    let mut bytes = vec![COMMAND];
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(b'\n');
    bytes
}

/// The last bytes the service sent: at its end, they tell why.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    const KEEP: usize = 1024;

    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        let excess = self.0.len().saturating_sub(Self::KEEP);
        self.0.drain(..excess);
    }

    fn end(&self) -> End {
        let text = self.0.strip_suffix(b"\r\n").unwrap_or(&self.0);
        let line = text.rsplit(|&b| b == b'\n').next().unwrap_or_default();
        End::Closed {
            reason: line
                .strip_prefix(NOTICE)
                .map(|reason| String::from_utf8_lossy(reason).trim_end().to_owned()),
            midline: !self.0.is_empty() && !self.0.ends_with(b"\n"),
        }
    }
}

/// The escape key: a control character, written `^X`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct EscapeKey(u8);

impl EscapeKey {
    fn parse(text: &str) -> Result<EscapeKey, String> {
        let key = match text.as_bytes() {
            [b'^', c @ (b'@'..=b'_' | b'a'..=b'z')] => c.to_ascii_uppercase() ^ 0x40,
            _ => {
                return Err(format!(
                    "{text:?}: write the key as ^ and a letter or one of @[\\]^_, as ^]"
                ))
            }
        };
        match key {
            0x1b => Err("^[ (Esc) starts the arrow and function keys".to_owned()),
            b'\r' => Err("^M is the Enter key".to_owned()),
            _ => Ok(EscapeKey(key)),
        }
    }
}

impl fmt::Display for EscapeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "^{}", char::from(self.0 ^ 0x40))
    }
}

/// What typed bytes come to.
#[derive(Debug, PartialEq)]
enum Step {
    /// Bytes for the service.
    Send(Vec<u8>),
    /// `~?`: show the `~` commands.
    Help,
    /// The escape key or `~.`.
    Quit,
}

/// Turns keyboard bytes into what is sent, ssh's way: `~` at the start of a line
/// begins a command.
#[derive(Debug)]
struct Keys {
    escape: EscapeKey,
    tilde: bool,
    /// Keyboard input is dropped (commands still go).
    read_only: bool,
    line_start: bool,
    /// A `~` at the start of a line was typed: the next byte says what it means.
    pending: bool,
}

impl Keys {
    fn new(escape: EscapeKey, tilde: bool, read_only: bool) -> Keys {
        Keys {
            escape,
            tilde,
            read_only,
            line_start: true,
            pending: false,
        }
    }

    fn feed(&mut self, typed: &[u8]) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut send = Vec::new();
        for &byte in typed {
            if byte == self.escape.0 {
                break_off(&mut steps, &mut send);
                steps.push(Step::Quit);
                return steps;
            }
            if !self.pending {
                if self.tilde && self.line_start && byte == b'~' {
                    self.pending = true;
                } else {
                    self.key(byte, &mut send);
                }
                continue;
            }
            self.pending = false;
            // A command leaves the line start where it was, as in ssh.
            let name = match byte {
                b'.' => {
                    break_off(&mut steps, &mut send);
                    steps.push(Step::Quit);
                    return steps;
                }
                b'?' => {
                    break_off(&mut steps, &mut send);
                    steps.push(Step::Help);
                    continue;
                }
                b'B' => "break",
                b'T' => "take",
                b'W' => "rw",
                b'R' => "ro",
                b'V' => "who",
                other => {
                    // `~~` is one `~`; `~` before anything else is sent with it.
                    self.key(b'~', &mut send);
                    if other != b'~' {
                        self.key(other, &mut send);
                    }
                    continue;
                }
            };
            match name {
                "ro" => self.read_only = true,
                "rw" | "take" => self.read_only = false,
                _ => {}
            }
            send.extend(command(name));
        }
        break_off(&mut steps, &mut send);
        steps
    }

    /// One typed byte that is not a command.
    fn key(&mut self, byte: u8, send: &mut Vec<u8>) {
        self.line_start = byte == b'\r' || byte == b'\n';
        if self.read_only {
            return;
        }
        if byte == COMMAND {
            send.push(COMMAND); // a literal 0x1d, as the protocol escapes it
        }
        send.push(byte);
    }

    fn help(&self) -> String {
        let mut text = format!("\r\n{} quits at once.\r\n", self.escape);
        if self.tilde {
            text.push_str(
                "At the start of a line:\r\n\
                 ~.  quit\r\n\
                 ~B  send a break\r\n\
                 ~T  take the write role from every other viewer\r\n\
                 ~W  ask for the write role\r\n\
                 ~R  become read-only\r\n\
                 ~V  list the console's viewers\r\n\
                 ~?  this help\r\n\
                 ~~  send a ~\r\n",
            );
        }
        text
    }
}

/// Moves the bytes gathered so far into a [`Step::Send`].
fn break_off(steps: &mut Vec<Step>, send: &mut Vec<u8>) {
    if !send.is_empty() {
        steps.push(Step::Send(std::mem::take(send)));
    }
}

/// SIGHUP, SIGINT and SIGTERM, caught: the last one's number, and a socket that
/// becomes readable when one comes.
struct Signals {
    caught: Arc<AtomicUsize>,
    wake: UnixStream,
}

impl Signals {
    fn catch() -> io::Result<Signals> {
        let caught = Arc::new(AtomicUsize::new(0));
        let (wake, waker) = UnixStream::pair()?;
        for signal in [SIGHUP, SIGINT, SIGTERM] {
            // The number first, so that it is there when the wake-up is.
            flag::register_usize(signal, Arc::clone(&caught), signal as usize)?;
            pipe::register(signal, waker.try_clone()?)?;
        }
        Ok(Signals { caught, wake })
    }

    fn caught(&self) -> u8 {
        self.caught.load(Ordering::SeqCst) as u8
    }
}

/// The terminal in raw mode, restored when this is dropped (when `run` returns: the
/// user quit, the service closed, a signal came, an error) or by a panic hook.
struct RawMode;

impl RawMode {
    /// Raw mode, when stdin is a terminal.
    fn enable() -> io::Result<Option<RawMode>> {
        if !io::stdin().is_terminal() {
            return Ok(None);
        }
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        crossterm::terminal::enable_raw_mode()?;
        Ok(Some(RawMode))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    // Nothing is left to do when it fails: the terminal is gone.
    let _ = crossterm::terminal::disable_raw_mode();
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTRL_BRACKET: EscapeKey = EscapeKey(0x1d);

    fn keys() -> Keys {
        Keys::new(CTRL_BRACKET, true, false)
    }

    fn sent(text: &[u8]) -> Step {
        Step::Send(text.to_vec())
    }

    #[test]
    fn escape_keys_parse_as_control_characters() {
        assert_eq!(EscapeKey::parse("^]"), Ok(EscapeKey(0x1d)));
        assert_eq!(EscapeKey::parse("^X"), Ok(EscapeKey(0x18)));
        assert_eq!(EscapeKey::parse("^x"), Ok(EscapeKey(0x18)));
        assert_eq!(EscapeKey::parse("^@"), Ok(EscapeKey(0)));
        assert_eq!(EscapeKey::parse("^_"), Ok(EscapeKey(0x1f)));
        for bad in ["", "^", "]", "^]]", "^1", "^~", "x", "^[", "^M", "^m"] {
            assert!(EscapeKey::parse(bad).is_err(), "{bad:?} is refused");
        }
        assert_eq!(EscapeKey(0x1d).to_string(), "^]");
        assert_eq!(EscapeKey(0x18).to_string(), "^X");
    }

    #[test]
    fn plain_keys_go_through_and_the_escape_key_quits_at_once() {
        let mut keys = keys();
        assert_eq!(keys.feed(b"ls -l\r"), [sent(b"ls -l\r")]);
        assert_eq!(keys.feed(b"ab\x1dcd"), [sent(b"ab"), Step::Quit]);
    }

    #[test]
    fn tilde_commands_work_at_the_start_of_a_line_only() {
        let mut keys = keys();
        assert_eq!(keys.feed(b"~B"), [sent(b"\x1dbreak\n")]);
        // Still at the start of the line after a command.
        assert_eq!(keys.feed(b"~T~W~V"), [sent(b"\x1dtake\n\x1drw\n\x1dwho\n")]);
        assert_eq!(keys.feed(b"a~B"), [sent(b"a~B")]);
        assert_eq!(keys.feed(b"\r~R"), [sent(b"\r\x1dro\n")]);
        assert_eq!(keys.feed(b"\n~?x"), [Step::Help]); // read-only since ~R
        assert_eq!(keys.feed(b"\n~."), [Step::Quit]);
    }

    #[test]
    fn a_tilde_command_may_span_reads() {
        let mut keys = keys();
        assert_eq!(keys.feed(b"~"), []);
        assert_eq!(keys.feed(b"B"), [sent(b"\x1dbreak\n")]);
        assert_eq!(keys.feed(b"~"), []);
        assert_eq!(keys.feed(b"\x1d"), [Step::Quit]);
    }

    #[test]
    fn other_tildes_are_sent() {
        let mut keys = keys();
        assert_eq!(keys.feed(b"~~x"), [sent(b"~x")]);
        // `~~` sent a character: the line has begun.
        assert_eq!(keys.feed(b"~."), [sent(b"~.")]);
        assert_eq!(keys.feed(b"\r~x~."), [sent(b"\r~x~.")]);
        assert_eq!(keys.feed(b"\r~\r~."), [sent(b"\r~\r"), Step::Quit]);
    }

    #[test]
    fn help_comes_between_what_is_sent() {
        let mut keys = keys();
        assert_eq!(keys.feed(b"a\r~?b"), [sent(b"a\r"), Step::Help, sent(b"b")]);
        assert!(keys.help().contains("~B  send a break\r\n"));
        assert!(keys.help().starts_with("\r\n^] quits at once."));
    }

    #[test]
    fn no_tilde_sends_tildes() {
        let mut keys = Keys::new(CTRL_BRACKET, false, false);
        assert_eq!(keys.feed(b"~.~B"), [sent(b"~.~B")]);
        assert_eq!(keys.feed(b"\x1d"), [Step::Quit]);
        assert!(!keys.help().contains('~'));
    }

    #[test]
    fn read_only_sends_commands_only_until_write_is_asked_for() {
        let mut keys = Keys::new(CTRL_BRACKET, true, true);
        assert_eq!(keys.feed(b"rm -rf /\r"), []);
        assert_eq!(keys.feed(b"~Bls\r"), [sent(b"\x1dbreak\n")]);
        assert_eq!(keys.feed(b"~Wls\r"), [sent(b"\x1drw\nls\r")]);
        assert_eq!(keys.feed(b"~Rls\r"), [sent(b"\x1dro\n")]);
        assert_eq!(keys.feed(b"~Tls\r"), [sent(b"\x1dtake\nls\r")]);
        assert_eq!(keys.feed(b"\x1d"), [Step::Quit]);
    }

    #[test]
    fn with_another_escape_key_a_typed_command_byte_is_doubled() {
        let mut keys = Keys::new(EscapeKey(0x18), true, false);
        assert_eq!(keys.feed(b"a\x1db"), [sent(b"a\x1d\x1db")]);
        assert_eq!(keys.feed(b"\x18"), [Step::Quit]);
        assert!(keys.help().starts_with("\r\n^X quits at once."));
    }

    #[test]
    fn the_reason_is_the_notice_sent_last() {
        let mut tail = Tail::default();
        tail.push(b"\r\n[virt-consoled] viewer 1: read-write\r\nlogin: ");
        assert!(matches!(
            tail.end(),
            End::Closed {
                reason: None,
                midline: true
            }
        ));
        tail.push(b"\r\n[virt-consoled] console ended: guest gone\r\n");
        match tail.end() {
            End::Closed { reason, midline } => {
                assert_eq!(reason.as_deref(), Some("console ended: guest gone"));
                assert!(!midline);
            }
            other => panic!("{other:?}"),
        }
        tail.push(&[b'x'; 2000]);
        assert_eq!(tail.0.len(), Tail::KEEP);
    }

    #[test]
    fn names_that_cannot_be_a_socket_or_a_token_line_are_refused() {
        assert!(check_name("tb-1").is_ok());
        for bad in ["", "a/b", "a b", "a\nb", "../x"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
