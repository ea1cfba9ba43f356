//! One viewer of a console: its connection, role, output queue, and the parser that
//! separates its console input from in-band commands.

use std::collections::VecDeque;
use std::io;

use super::transport::Transport;

/// The byte that starts an in-band command (Ctrl-]); doubled, it is sent as itself.
pub const COMMAND: u8 = 0x1d;
/// Longest in-band command line.
const COMMAND_MAX: usize = 64;

/// What a viewer may do with the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    ReadWrite,
    ReadOnly,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::ReadWrite => "rw",
            Role::ReadOnly => "ro",
        }
    }
}

/// An in-band command, parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    ReadWrite,
    ReadOnly,
    Take,
    Kick(u64),
    Break,
    Who,
    Help,
    /// Not understood: the viewer is told.
    Unknown(String),
}

impl Command {
    fn parse(line: &[u8]) -> Command {
        let text = String::from_utf8_lossy(line);
        let mut words = text.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("rw"), None, _) => Command::ReadWrite,
            (Some("ro"), None, _) => Command::ReadOnly,
            (Some("take"), None, _) => Command::Take,
            (Some("kick"), Some(id), None) => match id.parse() {
                Ok(id) => Command::Kick(id),
                Err(_) => Command::Unknown(text.trim().to_owned()),
            },
            (Some("break"), None, _) => Command::Break,
            (Some("who"), None, _) => Command::Who,
            (Some("help"), None, _) => Command::Help,
            _ => Command::Unknown(text.trim().to_owned()),
        }
    }
}

pub(crate) const HELP: &str = "commands (Ctrl-] then the word, then Enter): rw, ro, take, \
                               kick N, break, who, help; Ctrl-] Ctrl-] sends Ctrl-]";

/// A piece of what a viewer sent, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    Input(Vec<u8>),
    Command(Command),
}

/// Splits what a viewer sends into console input and commands.
#[derive(Debug, Default)]
enum Parser {
    #[default]
    Input,
    /// After [`COMMAND`]: the command line so far.
    Command(Vec<u8>),
    /// The command line grew too long; skip to its end.
    Overlong,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut input = Vec::new();
        let command = |input: &mut Vec<u8>, pieces: &mut Vec<Piece>, command| {
            if !input.is_empty() {
                pieces.push(Piece::Input(std::mem::take(input)));
            }
            pieces.push(Piece::Command(command));
        };
        for &byte in bytes {
            let line_end = byte == b'\r' || byte == b'\n';
            match self {
                Parser::Input if byte == COMMAND => *self = Parser::Command(Vec::new()),
                Parser::Input => input.push(byte),
                Parser::Command(line) if line.is_empty() && byte == COMMAND => {
                    input.push(COMMAND);
                    *self = Parser::Input;
                }
                Parser::Command(line) if line_end => {
                    command(&mut input, &mut pieces, Command::parse(line));
                    *self = Parser::Input;
                }
                Parser::Command(line) if line.len() >= COMMAND_MAX => *self = Parser::Overlong,
                Parser::Command(line) => line.push(byte),
                Parser::Overlong if line_end => {
                    command(
                        &mut input,
                        &mut pieces,
                        Command::Unknown("(too long)".into()),
                    );
                    *self = Parser::Input;
                }
                Parser::Overlong => {}
            }
        }
        if !input.is_empty() {
            pieces.push(Piece::Input(input));
        }
        pieces
    }
}

/// Why a viewer is cut off.
#[derive(Debug)]
pub(crate) enum Cut {
    /// Fell more than its buffer behind.
    TooSlow(usize),
    /// Writing failed (it went away).
    Gone(io::Error),
}

/// Bytes on their way to a peer, bounded by whoever queues them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<u8>,
    pub(crate) sent: u64,
}

impl Outbox {
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Writes what is queued until `transport` would block.
    pub(crate) fn flush(&mut self, transport: &mut dyn Transport) -> io::Result<()> {
        while !self.queue.is_empty() {
            let (front, _) = self.queue.as_slices();
            let len = front.len();
            let n = write_some(transport, front)?;
            self.queue.drain(..n);
            self.sent += n as u64;
            if n < len {
                break; // it would block
            }
        }
        match io::Write::flush(transport) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes `bytes` as far as `transport` takes them now (straight from `bytes`
    /// when nothing waits before them) and queues the rest.
    pub(crate) fn send(&mut self, bytes: &[u8], transport: &mut dyn Transport) -> io::Result<()> {
        let n = if self.queue.is_empty() {
            write_some(transport, bytes)?
        } else {
            0
        };
        self.sent += n as u64;
        self.queue.extend(&bytes[n..]);
        self.flush(transport)
    }
}

/// Writes from `bytes` until all went or `transport` would block; how much went.
fn write_some(transport: &mut dyn Transport, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match io::Write::write(transport, &bytes[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

pub(crate) struct Viewer {
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) id: u64,
    /// For logs and status: `unix#N`, `tcp#N ADDR`, `web#N ADDR`.
    pub(crate) peer: String,
    pub(crate) console: String,
    pub(crate) role: Role,
    /// Output not yet written, bounded by the viewer buffer.
    pub(crate) out: Outbox,
    /// Console input read but not yet taken by the console.
    pub(crate) input: Vec<u8>,
    parser: Parser,
    /// The viewer stopped sending; it still gets output.
    pub(crate) read_closed: bool,
    /// Told once that its input is ignored while read-only.
    pub(crate) told_read_only: bool,
}

impl Viewer {
    pub(crate) fn new(transport: Box<dyn Transport>, id: u64, peer: String, console: &str) -> Self {
        Viewer {
            transport,
            id,
            peer,
            console: console.to_owned(),
            role: Role::ReadWrite,
            out: Outbox::default(),
            input: Vec::new(),
            parser: Parser::default(),
            read_closed: false,
            told_read_only: false,
        }
    }

    /// Splits bytes the viewer sent into console input and commands, in order.
    pub(crate) fn received(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.parser.feed(bytes)
    }

    /// Writes what is queued until the connection would block.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.out.flush(&mut *self.transport)
    }

    /// Sends `bytes` now as far as the connection takes them and queues the rest,
    /// up to `limit` bytes.
    pub(crate) fn send(&mut self, bytes: &[u8], limit: usize) -> Result<(), Cut> {
        self.out
            .send(bytes, &mut *self.transport)
            .map_err(Cut::Gone)?;
        if self.out.len() > limit {
            return Err(Cut::TooSlow(self.out.len()));
        }
        Ok(())
    }
}

/// How the service's own lines look to a viewer.
pub(crate) fn notice(text: &str) -> String {
    format!("\r\n[virt-consoled] {text}\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut parser = Parser::default();
        chunks.iter().flat_map(|chunk| parser.feed(chunk)).collect()
    }

    #[test]
    fn input_passes_and_commands_are_taken_out() {
        let pieces = parse(&[b"ls\r\x1dta", b"ke\nmore\x1d\x1d!\x1dkick 7\r"]);
        assert_eq!(
            pieces,
            vec![
                Piece::Input(b"ls\r".to_vec()),
                Piece::Command(Command::Take),
                Piece::Input(b"more\x1d!".to_vec()),
                Piece::Command(Command::Kick(7)),
            ]
        );
    }

    #[test]
    fn bad_and_overlong_commands_are_unknown() {
        let long = [b'x'; 200];
        let pieces = parse(&[b"\x1dfly\n\x1d", &long, b"\nok"]);
        assert_eq!(
            pieces,
            vec![
                Piece::Command(Command::Unknown("fly".into())),
                Piece::Command(Command::Unknown("(too long)".into())),
                Piece::Input(b"ok".to_vec()),
            ]
        );
    }
}
