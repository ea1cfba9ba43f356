//! The web front-end's connections: the page, the console list and WebSocket
//! upgrades that become viewers, one accepted TCP connection at a time, driven by
//! readiness on the service's mio poll and never blocking.
//!
//! A [`WebConn`] reads one request head (`httparse`, at most [`MAX_HEAD`] bytes) and
//! answers it: a compiled-in asset, `/api/consoles` (Bearer token), or `/ws/NAME`,
//! a WebSocket upgrade whose token rides in `Sec-WebSocket-Protocol` (a browser
//! cannot set other headers on a WebSocket). Plain answers close the connection;
//! an upgrade turns it into a [`WebSocketTransport`] with [`WebConn::into_viewer`].
//!
//! The caller drops a connection that is still [`WebStep::Pending`] at its
//! [`WebConn::deadline`], so a client that trickles its head, or never reads the
//! answer, holds a socket for [`REQUEST_TIMEOUT`] at most.

use std::borrow::Cow;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use percent_encoding::percent_decode_str;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Bytes, Message, WebSocket};

use super::transport::Transport;

/// The largest request head taken; a longer one is answered 431.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may take to send its request and take the answer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WebSocket message (and frame) a viewer may send.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// The largest frame sent to a viewer: also the most a transport holds unsent.
const MAX_OUT_FRAME: usize = 16 * 1024;
/// Header lines beyond this many are answered 431 too.
const MAX_HEADERS: usize = 32;
/// What a closed connection still reads before closing anyway (see `State::Drain`).
const MAX_DRAIN: usize = 64 * 1024;
/// The WebSocket subprotocol: the client offers it next to `token.TOKEN`.
const PROTOCOL: &[u8] = b"virt-consoled";
const TOKEN_PREFIX: &[u8] = b"token.";

/// Self only: no inline script, no other origin. xterm.js's DOM renderer sets its
/// colours and cell sizes through `<style>` elements and style attributes, hence
/// `'unsafe-inline'` for styles (never for scripts).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The page, by path: content type and bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("/", HTML, INDEX),
    ("/index.html", HTML, INDEX),
    ("/app.js", JS, include_bytes!("../../../assets/web/app.js")),
    (
        "/app.css",
        CSS,
        include_bytes!("../../../assets/web/app.css"),
    ),
    (
        "/xterm.js",
        JS,
        include_bytes!("../../../assets/web/xterm/xterm.js"),
    ),
    (
        "/xterm.css",
        CSS,
        include_bytes!("../../../assets/web/xterm/xterm.css"),
    ),
    (
        "/addon-fit.js",
        JS,
        include_bytes!("../../../assets/web/xterm/addon-fit.js"),
    ),
];
const INDEX: &[u8] = include_bytes!("../../../assets/web/index.html");
const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// What the service answers with: the token check and its consoles.
pub(crate) trait Site {
    /// Whether `given` is the service's token (compared in constant time).
    fn token_ok(&self, given: &[u8]) -> bool;
    /// The body of `GET /api/consoles`: `[{"name":..,"state":..,"viewers":N}]`.
    fn consoles_json(&self) -> String;
    /// Whether a viewer may attach to a console of this name.
    fn has_console(&self, name: &str) -> bool;
}

/// Where a connection stands after [`WebConn::ready`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WebStep {
    /// Waiting for the socket: keep it registered until its deadline.
    Pending,
    /// Answered, refused, failed or left: deregister and drop the connection.
    Closed,
    /// The upgrade is answered: [`WebConn::into_viewer`] gives the viewer of `console`.
    Upgraded {
        /// The console's name, percent-decoded.
        console: String,
    },
}

/// One accepted TCP connection of the web front-end.
#[derive(Debug)]
pub(crate) struct WebConn {
    stream: TcpStream,
    peer: SocketAddr,
    started: Instant,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Reading the request head: what came so far.
    Head(Vec<u8>),
    /// Writing the answer, then doing `then`.
    Answer {
        out: Outgoing,
        then: Then,
    },
    /// Answered and the write side shut: reading what the peer still sends (up to
    /// [`MAX_DRAIN`]) before closing, as closing with unread input sends a reset that
    /// can destroy the answer in flight. `usize` is what was read so far.
    Drain(usize),
    /// The 101 is out; `rest` is what the client sent after its head.
    Upgraded {
        console: String,
        rest: Vec<u8>,
    },
    Done,
}

#[derive(Debug)]
enum Then {
    Close,
    Upgrade { console: String, rest: Vec<u8> },
}

/// An answer being written: its head, then its body.
#[derive(Debug)]
struct Outgoing {
    /// The status line's code and text, for the log.
    status: &'static str,
    head: Vec<u8>,
    body: Cow<'static, [u8]>,
    sent: usize,
}

impl WebConn {
    /// A connection just accepted; register [`source`](Self::source) for
    /// READABLE | WRITABLE and call [`ready`](Self::ready) on its events.
    pub(crate) fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            started: Instant::now(),
            state: State::Head(Vec::new()),
        }
    }

    /// The socket, to register and deregister.
    pub(crate) fn source(&mut self) -> &mut dyn mio::event::Source {
        &mut self.stream
    }

    /// When to drop the connection if it is still [`WebStep::Pending`].
    pub(crate) fn deadline(&self) -> Instant {
        self.started + REQUEST_TIMEOUT
    }

    /// Reads and writes as far as the socket allows; call it on every event.
    pub(crate) fn ready(&mut self, site: &dyn Site) -> WebStep {
        loop {
            match self.advance(site) {
                Ok(Some(step)) => return step,
                Ok(None) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return WebStep::Pending,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    log::debug!("web {}: {err}", self.peer);
                    self.state = State::Done;
                    return WebStep::Closed;
                }
            }
        }
    }

    /// The viewer, once [`ready`](Self::ready) said [`WebStep::Upgraded`]; `None`
    /// before. Reregister its source (it is this connection's socket) and read it
    /// at once: input the client sent with its head is inside already, and no edge
    /// will announce it.
    pub(crate) fn into_viewer(self) -> Option<WebSocketTransport> {
        match self.state {
            State::Upgraded { rest, .. } => Some(WebSocketTransport::new(self.stream, rest)),
            _ => None,
        }
    }

    /// One step: `Some` when the caller must be told something, `None` to go on.
    fn advance(&mut self, site: &dyn Site) -> io::Result<Option<WebStep>> {
        match &mut self.state {
            State::Head(head) => {
                let Some((out, then)) = answer(head, site, self.peer) else {
                    // httparse wants more: `head` is below MAX_HEAD here.
                    let mut chunk = [0; 4096];
                    let room = chunk.len().min(MAX_HEAD - head.len());
                    let n = self.stream.read(&mut chunk[..room])?;
                    if n == 0 {
                        self.state = State::Done;
                        return Ok(Some(WebStep::Closed));
                    }
                    head.extend_from_slice(&chunk[..n]);
                    return Ok(None);
                };
                self.state = State::Answer { out, then };
            }
            State::Answer { out, then } => {
                out.write_to(&mut self.stream)?;
                self.state = match std::mem::replace(then, Then::Close) {
                    Then::Close => {
                        self.stream.shutdown(Shutdown::Write)?;
                        State::Drain(0)
                    }
                    Then::Upgrade { console, rest } => State::Upgraded { console, rest },
                };
            }
            State::Drain(drained) => {
                let mut chunk = [0; 4096];
                let n = self.stream.read(&mut chunk)?;
                *drained += n;
                if n == 0 || *drained > MAX_DRAIN {
                    self.state = State::Done;
                    return Ok(Some(WebStep::Closed));
                }
            }
            State::Upgraded { console, .. } => {
                return Ok(Some(WebStep::Upgraded {
                    console: console.clone(),
                }))
            }
            State::Done => return Ok(Some(WebStep::Closed)),
        }
        Ok(None)
    }
}

impl Outgoing {
    fn new(status: &'static str, headers: &[(&str, &str)], body: Cow<'static, [u8]>) -> Self {
        let mut head = format!("HTTP/1.1 {status}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !status.starts_with("101") {
            head.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\
                 Content-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\n\
                 Referrer-Policy: no-referrer\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        Self {
            status,
            head: head.into_bytes(),
            body,
            sent: 0,
        }
    }

    /// A short plain-text answer, for errors.
    fn text(status: &'static str, headers: &[(&str, &str)]) -> Self {
        let body = format!("{status}\n").into_bytes();
        let mut all = vec![("Content-Type", "text/plain; charset=utf-8")];
        all.extend_from_slice(headers);
        Self::new(status, &all, body.into())
    }

    /// Writes until all is out (Ok) or the socket is full (WouldBlock).
    fn write_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        while self.sent < self.head.len() + self.body.len() {
            let head = self.head.get(self.sent..).unwrap_or_default();
            let body = &self.body[self.sent.saturating_sub(self.head.len())..];
            match w.write_vectored(&[IoSlice::new(head), IoSlice::new(body)])? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => self.sent += n,
            }
        }
        Ok(())
    }
}

/// The answer to the head read so far, or `None` while it is incomplete.
fn answer(head: &[u8], site: &dyn Site, peer: SocketAddr) -> Option<(Outgoing, Then)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let out = match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => return None,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            Outgoing::text("431 Request Header Fields Too Large", &[])
        }
        Err(_) => Outgoing::text("400 Bad Request", &[]),
        Ok(httparse::Status::Complete(len)) => match route(&req, site) {
            Ok(Route::Answer(out)) | Err(out) => out,
            Ok(Route::Upgrade { out, console }) => {
                log::debug!("web {peer}: viewer of {console:?}");
                let rest = head[len..].to_vec();
                return Some((out, Then::Upgrade { console, rest }));
            }
        },
    };
    // No token is ever in the path: they ride in headers.
    let path = req.path.unwrap_or("-");
    if out.status.starts_with('2') {
        log::debug!("web {peer}: {} {path:.100}", out.status);
    } else {
        log::info!("web {peer}: {} {path:.100}", out.status);
    }
    Some((out, Then::Close))
}

enum Route {
    Answer(Outgoing),
    Upgrade { out: Outgoing, console: String },
}

/// A complete request's answer; `Err` for a refusal.
fn route(req: &httparse::Request<'_, '_>, site: &dyn Site) -> Result<Route, Outgoing> {
    if req.method != Some("GET") {
        return Err(Outgoing::text(
            "405 Method Not Allowed",
            &[("Allow", "GET")],
        ));
    }
    let path = req.path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    if path == "/api/consoles" {
        let token = header(req, "Authorization").and_then(bearer);
        if !token.is_some_and(|token| site.token_ok(token)) {
            return Err(unauthorized());
        }
        let body = site.consoles_json().into_bytes();
        let json = [("Content-Type", "application/json")];
        return Ok(Route::Answer(Outgoing::new("200 OK", &json, body.into())));
    }
    if let Some(name) = path.strip_prefix("/ws/") {
        return upgrade(req, name, site);
    }
    match ASSETS.iter().find(|(asset, ..)| *asset == path) {
        Some((_, content_type, body)) => Ok(Route::Answer(Outgoing::new(
            "200 OK",
            &[("Content-Type", content_type)],
            Cow::Borrowed(body),
        ))),
        None => Err(Outgoing::text("404 Not Found", &[])),
    }
}

/// `GET /ws/NAME`: checks the handshake, the token, then the console.
fn upgrade(
    req: &httparse::Request<'_, '_>,
    name: &str,
    site: &dyn Site,
) -> Result<Route, Outgoing> {
    let upgrade = list(req, "Upgrade").any(|t| t.eq_ignore_ascii_case(b"websocket"));
    let connection = list(req, "Connection").any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if !upgrade || !connection {
        let headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")];
        return Err(Outgoing::text("426 Upgrade Required", &headers));
    }
    if header(req, "Sec-WebSocket-Version") != Some(&b"13"[..]) {
        return Err(Outgoing::text(
            "426 Upgrade Required",
            &[("Sec-WebSocket-Version", "13")],
        ));
    }
    let Some(key) = header(req, "Sec-WebSocket-Key").filter(|key| !key.is_empty()) else {
        return Err(Outgoing::text("400 Bad Request", &[]));
    };
    let token = list(req, "Sec-WebSocket-Protocol").find_map(|t| t.strip_prefix(TOKEN_PREFIX));
    if !token.is_some_and(|token| site.token_ok(token)) {
        return Err(unauthorized());
    }
    if !list(req, "Sec-WebSocket-Protocol").any(|t| t == PROTOCOL) {
        return Err(Outgoing::text("400 Bad Request", &[]));
    }
    let console = match percent_decode_str(name).decode_utf8() {
        Ok(console) if !console.is_empty() => console.into_owned(),
        _ => return Err(Outgoing::text("400 Bad Request", &[])),
    };
    if !site.has_console(&console) {
        return Err(Outgoing::text("404 Not Found", &[]));
    }
    let accept = tungstenite::handshake::derive_accept_key(key);
    let headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.as_str()),
        ("Sec-WebSocket-Protocol", "virt-consoled"),
    ];
    let out = Outgoing::new("101 Switching Protocols", &headers, Cow::Borrowed(&[]));
    Ok(Route::Upgrade { out, console })
}

fn unauthorized() -> Outgoing {
    Outgoing::text("401 Unauthorized", &[("WWW-Authenticate", "Bearer")])
}

/// The first header of this name.
fn header<'h>(req: &httparse::Request<'_, 'h>, name: &str) -> Option<&'h [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The comma-separated items of every header of this name.
fn list<'a, 'h: 'a>(
    req: &'a httparse::Request<'_, 'h>,
    name: &'a str,
) -> impl Iterator<Item = &'h [u8]> + 'a {
    req.headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// A viewer on a WebSocket: binary frames both ways (text frames from the viewer
/// are taken as UTF-8 input too); pings are answered, closes replied to.
///
/// Backpressure stays with the caller: `write` puts one frame of at most 16 KiB in
/// tungstenite's buffer, and while any of it is unsent the next `write` flushes
/// first and says WouldBlock when that blocks. So a viewer that does not read holds
/// one frame here, and the rest stays in the caller's queue, where it is counted.
#[derive(Debug)]
pub(crate) struct WebSocketTransport {
    ws: WebSocket<TcpStream>,
    /// The rest of the last message received, not read yet.
    input: Bytes,
    /// Part of a frame is still in tungstenite's buffer.
    unsent: bool,
    /// The code of the close frame sent when this is dropped.
    close: CloseCode,
}

impl WebSocketTransport {
    fn new(stream: TcpStream, rest: Vec<u8>) -> Self {
        let config = WebSocketConfig::default()
            // Grows to the frame being read; many idle viewers stay small.
            .read_buffer_size(4096)
            // Every frame goes to the socket at once; see the type's doc.
            .write_buffer_size(0)
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        Self {
            ws: WebSocket::from_partially_read(stream, rest, Role::Server, Some(config)),
            input: Bytes::new(),
            unsent: false,
            close: CloseCode::Normal,
        }
    }
}

impl io::Read for WebSocketTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.input.is_empty() {
            match self.ws.read() {
                Ok(Message::Binary(data)) => self.input = data,
                Ok(Message::Text(text)) => self.input = text.into(),
                // The end: tungstenite has queued the reply; flush or drop sends it.
                Ok(Message::Close(_))
                | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(0)
                }
                // Pongs for pings are queued and sent by the next read or flush.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(err) => return Err(self.failed(err)),
            }
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = self.input.slice(n..);
        Ok(n)
    }
}

impl io::Write for WebSocketTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.unsent {
            self.flush()?;
        }
        let n = buf.len().min(MAX_OUT_FRAME);
        if n == 0 {
            return Ok(0);
        }
        match self
            .ws
            .write(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
        {
            Ok(()) => {}
            // The frame is in the buffer all the same.
            Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                self.unsent = true;
            }
            Err(err) => return Err(self.failed(err)),
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.ws.flush() {
            Ok(()) => {
                self.unsent = false;
                Ok(())
            }
            Err(err) => Err(self.failed(err)),
        }
    }
}

impl Transport for WebSocketTransport {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        self.ws.get_mut()
    }

    fn kind(&self) -> &'static str {
        "web"
    }
}

impl WebSocketTransport {
    /// The io::Error for a tungstenite one, noting the close code it deserves.
    fn failed(&mut self, err: tungstenite::Error) -> io::Error {
        use tungstenite::error::ProtocolError;
        use tungstenite::Error;
        let err = match err {
            Error::Io(err) => return err,
            err => err,
        };
        let kind = match &err {
            Error::ConnectionClosed
            | Error::AlreadyClosed
            | Error::Protocol(ProtocolError::SendAfterClosing) => io::ErrorKind::BrokenPipe,
            Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                io::ErrorKind::UnexpectedEof
            }
            Error::Capacity(_) => {
                self.close = CloseCode::Size;
                io::ErrorKind::InvalidData
            }
            Error::Utf8(_) => {
                self.close = CloseCode::Invalid;
                io::ErrorKind::InvalidData
            }
            _ => {
                self.close = CloseCode::Protocol;
                io::ErrorKind::InvalidData
            }
        };
        io::Error::new(kind, err)
    }
}

impl Drop for WebSocketTransport {
    fn drop(&mut self) {
        // Best effort and never blocking: tell the browser why, before the TCP close.
        let frame = CloseFrame {
            code: self.close,
            reason: "".into(),
        };
        if let Err(err) = self.ws.close(Some(frame)) {
            log::trace!("web: close frame not sent: {err}");
        }
    }
}
