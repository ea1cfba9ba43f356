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
const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may take to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WebSocket message (and frame) a viewer may send.
const MAX_MESSAGE: usize = 64 * 1024;
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

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page's file at `path`: its content type and bytes, compiled in.
fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => (HTML, include_bytes!("../../../assets/web/index.html")),
        "/app.js" => (JS, include_bytes!("../../../assets/web/app.js")),
        "/app.css" => (CSS, include_bytes!("../../../assets/web/app.css")),
        "/xterm.js" => (JS, include_bytes!("../../../assets/web/xterm/xterm.js")),
        "/xterm.css" => (CSS, include_bytes!("../../../assets/web/xterm/xterm.css")),
        "/addon-fit.js" => (JS, include_bytes!("../../../assets/web/xterm/addon-fit.js")),
        _ => return None,
    })
}

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
    match asset(path) {
        Some((content_type, body)) => Ok(Route::Answer(Outgoing::new(
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::thread;

    use mio::{Events, Interest, Poll, Token};
    use tungstenite::client::IntoClientRequest;

    use super::*;

    const TOKEN: &str = "0123456789abcdef";
    /// Generous: only a broken implementation waits this long.
    const PATIENCE: Duration = Duration::from_secs(20);

    struct TestSite;

    impl Site for TestSite {
        fn token_ok(&self, given: &[u8]) -> bool {
            constant_time_eq::constant_time_eq(given, TOKEN.as_bytes())
        }
        fn consoles_json(&self) -> String {
            r#"[{"name":"alpha","state":"attached","viewers":1}]"#.to_owned()
        }
        fn has_console(&self, name: &str) -> bool {
            ["alpha", "my guest"].contains(&name)
        }
    }

    /// A loopback connection: the server's end as a `WebConn`, the client's as a
    /// blocking std socket.
    fn connect() -> (WebConn, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (WebConn::new(TcpStream::from_std(server), peer), client)
    }

    /// Waits for events on one source, failing the test after `PATIENCE`.
    struct Driver {
        poll: Poll,
        events: Events,
        until: Instant,
    }

    impl Driver {
        fn new(source: &mut dyn mio::event::Source) -> Self {
            let poll = Poll::new().unwrap();
            let interest = Interest::READABLE | Interest::WRITABLE;
            poll.registry()
                .register(source, Token(0), interest)
                .unwrap();
            Self {
                poll,
                events: Events::with_capacity(4),
                until: Instant::now() + PATIENCE,
            }
        }

        fn wait(&mut self) {
            let left = self.until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no progress in {PATIENCE:?}");
            self.poll.poll(&mut self.events, Some(left)).unwrap();
        }
    }

    /// Runs `conn` on its own thread until it is no longer pending.
    fn serve(mut conn: WebConn) -> thread::JoinHandle<(WebConn, WebStep)> {
        thread::spawn(move || {
            let mut driver = Driver::new(conn.source());
            loop {
                match conn.ready(&TestSite) {
                    WebStep::Pending => driver.wait(),
                    step => {
                        // As the service does before it registers the viewer anew.
                        driver.poll.registry().deregister(conn.source()).unwrap();
                        return (conn, step);
                    }
                }
            }
        })
    }

    /// The viewer's end, as the service would use it: sends back all it reads,
    /// until the viewer leaves (Ok) or fails (Err).
    fn echo(mut viewer: WebSocketTransport) -> io::Result<()> {
        let mut driver = Driver::new(viewer.source());
        let mut pending = Vec::new();
        let mut buf = [0; 1000];
        loop {
            loop {
                match viewer.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => return Err(err),
                }
            }
            while !pending.is_empty() {
                match viewer.write(&pending) {
                    Ok(n) => drop(pending.drain(..n)),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => return Err(err),
                }
            }
            match viewer.flush() {
                Err(err) if err.kind() != io::ErrorKind::WouldBlock => return Err(err),
                _ => driver.wait(),
            }
        }
    }

    /// Serves a connection that is to become a viewer, and echoes on it.
    fn serve_viewer(conn: WebConn) -> thread::JoinHandle<(String, io::Result<()>)> {
        let server = serve(conn);
        thread::spawn(move || {
            let (conn, step) = server.join().unwrap();
            let WebStep::Upgraded { console } = step else {
                panic!("not upgraded: {step:?}");
            };
            let viewer = conn.into_viewer().unwrap();
            assert_eq!(viewer.kind(), "web");
            (console, echo(viewer))
        })
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            let mut found = self
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name));
            found.next().map(|(_, v)| v.as_str())
        }
    }

    fn parse_reply(bytes: &[u8]) -> (Reply, usize) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = res.parse(bytes).unwrap() else {
            panic!("incomplete answer: {:?}", String::from_utf8_lossy(bytes));
        };
        let reply = Reply {
            status: res.code.unwrap(),
            headers: (res.headers.iter())
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            body: bytes[len..].to_vec(),
        };
        (reply, len)
    }

    /// Sends `request` and reads the answer to the server's close.
    fn exchange(request: &[u8]) -> Reply {
        let (conn, mut client) = connect();
        let server = serve(conn);
        client.write_all(request).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        drop(client);
        let (_, step) = server.join().unwrap();
        assert_eq!(step, WebStep::Closed);
        parse_reply(&answer).0
    }

    fn get(path: &str, headers: &str) -> Reply {
        exchange(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").as_bytes())
    }

    fn upgrade_request(path: &str, protocols: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
        )
    }

    /// A good upgrade on a raw socket: the client's end after the 101.
    fn upgraded() -> (
        std::net::TcpStream,
        thread::JoinHandle<(String, io::Result<()>)>,
    ) {
        let (conn, mut client) = connect();
        let viewer = serve_viewer(conn);
        let request = upgrade_request("/ws/alpha", &format!("virt-consoled, token.{TOKEN}"));
        client.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            client.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let (reply, _) = parse_reply(&head);
        assert_eq!(reply.status, 101);
        // RFC 6455's own example key and answer.
        let accept = reply.header("Sec-WebSocket-Accept");
        assert_eq!(accept, Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(
            reply.header("Sec-WebSocket-Protocol"),
            Some("virt-consoled")
        );
        (client, viewer)
    }

    /// A client frame (masked, as clients must) with this first byte and payload.
    fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![first];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    /// What the server sends before it closes: its close frame's code, if any.
    fn close_code(client: &mut std::net::TcpStream) -> Option<u16> {
        let mut rest = Vec::new();
        // The server may reset the connection after its close frame: keep what came.
        let _ = client.read_to_end(&mut rest);
        let frame = rest.windows(2).position(|w| w[0] == 0x88 && w[1] >= 2)?;
        Some(u16::from_be_bytes([rest[frame + 2], rest[frame + 3]]))
    }

    #[test]
    fn static_files_are_served_whole_with_strict_headers() {
        let index = get("/", "");
        assert_eq!(index.status, 200);
        assert_eq!(index.body, include_bytes!("../../../assets/web/index.html"));
        assert_eq!(index.header("Content-Type"), Some(HTML));
        assert_eq!(index.header("Cache-Control"), Some("no-store"));
        assert_eq!(index.header("Content-Security-Policy"), Some(CSP));
        assert!(CSP.contains("script-src 'self';") && CSP.contains("default-src 'none'"));
        assert_eq!(index.header("X-Content-Type-Options"), Some("nosniff"));

        // Far larger than one write: the answer goes out over several events.
        let xterm = get("/xterm.js?v=1", "");
        assert_eq!(xterm.status, 200);
        assert_eq!(xterm.header("Content-Type"), Some(JS));
        assert_eq!(
            xterm.body,
            include_bytes!("../../../assets/web/xterm/xterm.js")
        );
        let length = xterm
            .header("Content-Length")
            .unwrap()
            .parse::<usize>()
            .unwrap();
        assert_eq!(length, xterm.body.len());

        for path in ["/app.js", "/app.css", "/xterm.css", "/addon-fit.js"] {
            assert_eq!(get(path, "").status, 200, "{path}");
        }
        assert_eq!(get("/nothing-here", "").status, 404);
        assert_eq!(get("/../Cargo.toml", "").status, 404);
        let post = exchange(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((post.status, post.header("Allow")), (405, Some("GET")));
    }

    #[test]
    fn console_list_needs_the_token() {
        for headers in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: Basic MDEyMzQ1Njc4OWFiY2RlZg==\r\n",
            &format!("Authorization: Bearer {TOKEN}x\r\n"),
        ] {
            let reply = get("/api/consoles", headers);
            assert_eq!(reply.status, 401, "{headers:?}");
            assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"));
            assert!(!reply.body.starts_with(b"["));
        }
    }

    #[test]
    fn console_list_with_the_token() {
        let reply = get(
            "/api/consoles",
            &format!("authorization: bearer  {TOKEN} \r\n"),
        );
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Type"), Some("application/json"));
        assert_eq!(reply.header("Cache-Control"), Some("no-store"));
        assert_eq!(reply.body, TestSite.consoles_json().as_bytes());
    }

    #[test]
    fn websocket_viewer_echoes_pings_and_closes() {
        let (conn, client) = connect();
        let addr = client.peer_addr().unwrap();
        let viewer = serve_viewer(conn);
        let mut request = format!("ws://{addr}/ws/my%20guest")
            .into_client_request()
            .unwrap();
        let protocols = format!("virt-consoled, token.{TOKEN}");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
        // The client checks the accept key and that the server chose our protocol.
        let (mut ws, response) = tungstenite::client(request, client).unwrap();
        assert_eq!(
            response.headers()["Sec-WebSocket-Protocol"],
            "virt-consoled"
        );

        let mut all = Vec::new();
        for (i, size) in [1, 5000, MAX_MESSAGE].into_iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            ws.send(Message::Binary(payload.clone().into())).unwrap();
            all.extend(payload);
        }
        ws.send(Message::Text("text is input too\r".into()))
            .unwrap();
        all.extend_from_slice(b"text is input too\r");
        ws.send(Message::Ping(Bytes::from_static(b"are you there")))
            .unwrap();

        // Echoed as binary frames of at most MAX_OUT_FRAME bytes, in order; the pong
        // comes back among them.
        let mut echoed = Vec::new();
        let mut pong = false;
        while echoed.len() < all.len() || !pong {
            match ws.read().unwrap() {
                Message::Binary(data) => {
                    assert!(data.len() <= MAX_OUT_FRAME);
                    echoed.extend_from_slice(&data);
                }
                Message::Pong(data) => {
                    assert_eq!(&data[..], b"are you there");
                    pong = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(echoed == all, "echo differs");

        // Our close: the server replies and the viewer ends cleanly.
        ws.close(None).unwrap();
        loop {
            match ws.read() {
                Ok(Message::Close(_)) => {}
                Err(tungstenite::Error::ConnectionClosed) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let (console, end) = viewer.join().unwrap();
        assert_eq!(console, "my guest");
        end.unwrap();
    }

    #[test]
    fn input_sent_with_the_head_is_not_lost() {
        let (conn, mut client) = connect();
        let viewer = serve_viewer(conn);
        let mut request = upgrade_request("/ws/alpha", &format!("virt-consoled,token.{TOKEN}"));
        let mut bytes = request.as_bytes().to_vec();
        bytes.extend(masked_frame(0x82, b"early"));
        client.write_all(&bytes).unwrap();
        let mut answer = vec![0; 512];
        let mut got = 0;
        // The 101, then the echo: a binary frame of 5 bytes.
        while !answer[..got].ends_with(b"\x82\x05early") {
            let n = client.read(&mut answer[got..]).unwrap();
            assert_ne!(
                n,
                0,
                "closed early: {:?}",
                String::from_utf8_lossy(&answer[..got])
            );
            got += n;
        }
        assert!(answer.starts_with(b"HTTP/1.1 101 "));
        request.clear();
        client.shutdown(Shutdown::Write).unwrap();
        let (_, end) = viewer.join().unwrap();
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn upgrade_refused_without_the_token() {
        for protocols in [
            "virt-consoled".to_owned(),
            "virt-consoled, token.wrong".to_owned(),
            format!("virt-consoled, token.{TOKEN}0"),
            format!("virt-consoled, token{TOKEN}"),
        ] {
            let reply = exchange(upgrade_request("/ws/alpha", &protocols).as_bytes());
            assert_eq!(reply.status, 401, "{protocols}");
            assert_eq!(reply.header("Sec-WebSocket-Accept"), None);
        }
        // No token also hides whether the console exists.
        let reply = exchange(upgrade_request("/ws/nope", "virt-consoled").as_bytes());
        assert_eq!(reply.status, 401);
    }

    #[test]
    fn upgrade_refused_for_an_unknown_console() {
        let protocols = format!("virt-consoled, token.{TOKEN}");
        for path in ["/ws/nope", "/ws/alph", "/ws/alpha%20"] {
            let reply = exchange(upgrade_request(path, &protocols).as_bytes());
            assert_eq!(reply.status, 404, "{path}");
            assert_eq!(reply.header("Upgrade"), None);
        }
        // Good token but not our protocol, and an undecodable name.
        let reply = exchange(upgrade_request("/ws/alpha", &format!("token.{TOKEN}")).as_bytes());
        assert_eq!(reply.status, 400);
        let reply = exchange(upgrade_request("/ws/%ff", &protocols).as_bytes());
        assert_eq!(reply.status, 400);
    }

    #[test]
    fn upgrade_needs_websocket_version_13() {
        let protocols = format!("virt-consoled, token.{TOKEN}");
        let request = upgrade_request("/ws/alpha", &protocols).replace("Version: 13", "Version: 8");
        let reply = exchange(request.as_bytes());
        assert_eq!(reply.status, 426);
        assert_eq!(reply.header("Sec-WebSocket-Version"), Some("13"));
        // A plain GET of a console's path is no upgrade.
        assert_eq!(get("/ws/alpha", "").status, 426);
    }

    #[test]
    fn oversized_or_broken_heads_are_refused() {
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(exchange(long.as_bytes()).status, 431);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(get("/", &many).status, 431);
        assert_eq!(
            exchange(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").status,
            400
        );
    }

    #[test]
    fn a_client_leaving_before_its_head_ends_cleanly() {
        let (conn, mut client) = connect();
        let server = serve(conn);
        client.write_all(b"GET / HTTP/1.1\r\nHost:").unwrap();
        drop(client);
        let (conn, step) = server.join().unwrap();
        assert_eq!(step, WebStep::Closed);
        assert!(conn.into_viewer().is_none());
    }

    #[test]
    fn deadline_is_the_request_timeout_after_accept() {
        let before = Instant::now();
        let (conn, _client) = connect();
        assert!(conn.deadline() >= before + REQUEST_TIMEOUT);
        assert!(conn.deadline() <= Instant::now() + REQUEST_TIMEOUT);
    }

    #[test]
    fn garbage_after_upgrade_ends_the_viewer_with_a_protocol_close() {
        for garbage in [
            vec![0xff; 16],                      // reserved bits and opcode
            vec![0x82, 0x03, b'a', b'b', b'c'],  // unmasked, as only servers send
            masked_frame(0x89, &[b'p'; 126]),    // a ping too large for a control frame
            masked_frame(0x80, b"continuation"), // continuing nothing
        ] {
            let (mut client, viewer) = upgraded();
            client.write_all(&garbage).unwrap();
            let (_, end) = viewer.join().unwrap();
            let err = end.unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{garbage:x?}: {err}"
            );
            assert_eq!(close_code(&mut client), Some(1002), "{garbage:x?}");
        }
    }

    #[test]
    fn oversized_messages_end_the_viewer_with_a_size_close() {
        // One frame over the limit: refused on its header, before its payload.
        let (mut client, viewer) = upgraded();
        let mut header = masked_frame(0x82, &[]);
        header[1] = 0x80 | 127;
        header.splice(2..2, ((MAX_MESSAGE + 1) as u64).to_be_bytes());
        client.write_all(&header).unwrap();
        let (_, end) = viewer.join().unwrap();
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(close_code(&mut client), Some(1009));

        // Fragments that add up to more than the limit.
        let (mut client, viewer) = upgraded();
        let half = vec![b'x'; MAX_MESSAGE / 2 + 1];
        let mut frames = masked_frame(0x02, &half);
        frames.extend(masked_frame(0x80, &half));
        client.write_all(&frames).unwrap();
        let (_, end) = viewer.join().unwrap();
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(close_code(&mut client), Some(1009));
    }

    #[test]
    fn a_peer_closing_mid_frame_ends_the_viewer_with_an_error() {
        let (mut client, viewer) = upgraded();
        let frame = masked_frame(0x82, b"a frame that will never be whole");
        client.write_all(&frame[..10]).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let (_, end) = viewer.join().unwrap();
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_viewer_that_does_not_read_holds_one_frame_at_most() {
        let (conn, mut client) = connect();
        let server = serve(conn);
        let request = upgrade_request("/ws/alpha", &format!("virt-consoled, token.{TOKEN}"));
        client.write_all(request.as_bytes()).unwrap();
        let (conn, _) = server.join().unwrap();
        let mut viewer = conn.into_viewer().unwrap();

        // Fill the socket until the transport says WouldBlock: then it takes nothing
        // more, however often asked.
        let chunk = vec![b'z'; 50_000];
        let mut taken = 0;
        loop {
            match viewer.write(&chunk) {
                Ok(n) => {
                    assert!(n <= MAX_OUT_FRAME);
                    taken += n;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => panic!("{err}"),
            }
        }
        for _ in 0..3 {
            let err = viewer.write(&chunk).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        }

        // The reader catches up: everything taken arrives, as frames after the 101.
        let reader = thread::spawn(move || {
            let mut bytes = Vec::new();
            client.read_to_end(&mut bytes).unwrap();
            bytes
        });
        let mut driver = Driver::new(viewer.source());
        while let Err(err) = viewer.flush() {
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            driver.wait();
        }
        drop(viewer);
        let bytes = reader.join().unwrap();
        let (_, head) = parse_reply(&bytes);
        let mut frames = &bytes[head..];
        let mut payload = 0;
        while frames[0] == 0x82 {
            let (len, skip) = match frames[1] {
                126 => (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4),
                n => (n as usize, 2),
            };
            payload += len;
            frames = &frames[skip + len..];
        }
        assert_eq!(payload, taken);
        assert_eq!(frames[0], 0x88, "ends with our close frame");
    }
}
