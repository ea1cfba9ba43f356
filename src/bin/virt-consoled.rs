//! `virt-consoled`: every guest console of one or more libvirt connections on one
//! thread, for many viewers, with scrollback, logs and a browser terminal.
//! Connections lost are opened again, and their consoles attached again.
//!
//! ```text
//! virt-consoled --uri [LABEL=]URI [--uri ...] [--domain NAME ...] [--dir DIR]
//!               [--log-dir DIR] [--tcp 127.0.0.1:7000] [--web 127.0.0.1:8080]
//!               [--token-file FILE] [--keepalive-interval S] [--keepalive-count N]
//! virt-consoled status [--dir DIR]      # the running service's status, as JSON
//! ```
//!
//! Viewers: `virt-console NAME`, `socat - UNIX-CONNECT:DIR/NAME.sock`, or the web
//! page whose address it prints. See the `console_service` module for the rules.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use virt_reactor::console_service::{self, default_dir, LogOptions, ServiceOptions};
use virt_reactor::supervisor::{Backoff, Endpoint};
use virt_reactor::KeepAlive;

#[derive(Parser)]
#[command(
    name = "virt-consoled",
    about = "Serve every guest console of libvirt connections from one thread",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Subcommand)]
enum Command {
    /// Print the running service's status (JSON) from its control socket.
    Status {
        /// The service's socket directory.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct Serve {
    /// A libvirt connection whose guests are served, as [LABEL=]URI; repeat for
    /// several hosts, whose consoles are then named LABEL/NAME. LABEL defaults to
    /// the URI's host.
    #[arg(
        long = "uri",
        value_name = "[LABEL=]URI",
        default_value = "qemu:///system"
    )]
    uris: Vec<String>,
    /// Seconds of silence before a keepalive ping on a remote connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = at_least_one)]
    keepalive_interval: u64,
    /// Unanswered pings after which a remote connection is lost (and reopened).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = at_least_one)]
    keepalive_count: u64,
    /// The longest wait between attempts to reconnect, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "3", value_parser = seconds)]
    reconnect_max: Duration,
    /// Serve only this domain (repeat for more); default: every domain, including
    /// those that start later.
    #[arg(long = "domain", value_name = "NAME")]
    domains: Vec<String>,
    /// Directory of the sockets; created mode 0700 if missing (and removed at exit).
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
    /// Output each console keeps for viewers that attach later.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    scrollback: usize,
    /// Keep a log per console, DIR/NAME.log.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Rotate a log once it holds this many bytes (at the next line end).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, value_parser = at_least_one)]
    log_size: u64,
    /// Rotated logs kept per console.
    #[arg(long, value_name = "N", default_value_t = 5)]
    log_keep: usize,
    /// Start every logged line with its time (UTC).
    #[arg(long)]
    timestamps: bool,
    /// Output bytes a viewer may fall behind before it is cut off.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, value_parser = at_least_one)]
    viewer_buffer: u64,
    /// Also serve viewers on this loopback TCP address; they first send "TOKEN NAME\n".
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// Serve the web terminal on this loopback address.
    #[arg(long, value_name = "ADDR")]
    web: Option<SocketAddr>,
    /// Read the token from FILE, or write a new random one there (mode 0600).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// What the `break` command sends, with \xHH escapes (e.g. "\x0f").
    #[arg(long, value_name = "BYTES", value_parser = escaped)]
    break_sequence: Option<Escaped>,
    /// TCP and web connections that may wait for their first line at once.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = at_least_one)]
    max_pending: u64,
    /// Take consoles over from other clients.
    #[arg(long)]
    force: bool,
    /// Stop cleanly after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    exit_after: Option<Duration>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Status { dir }) => status(&dir),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virt-consoled: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: Serve) -> Result<(), String> {
    let connections = Endpoint::parse_all(args.uris.iter().map(String::as_str))
        .map_err(|e| format!("--uri {e}"))?;
    let mut options = ServiceOptions::new(connections);
    options.keepalive = KeepAlive {
        interval: Duration::from_secs(args.keepalive_interval),
        count: u32::try_from(args.keepalive_count).unwrap_or(u32::MAX),
    };
    options.backoff = Backoff {
        max: args.reconnect_max,
        ..Backoff::DEFAULT
    };
    options.domains = args.domains;
    options.dir = args.dir;
    options.scrollback = args.scrollback;
    options.log = args.log_dir.map(|dir| LogOptions {
        dir,
        max_bytes: args.log_size,
        keep: args.log_keep,
        timestamps: args.timestamps,
    });
    options.viewer_buffer = usize::try_from(args.viewer_buffer).unwrap_or(usize::MAX);
    options.tcp = args.tcp;
    options.web = args.web;
    options.token_file = args.token_file;
    options.break_sequence = args.break_sequence.map(|e| e.0).unwrap_or_default();
    options.max_pending = usize::try_from(args.max_pending).unwrap_or(usize::MAX);
    options.force = args.force;
    options.exit_after = args.exit_after;
    if let Some(dir) = options.log.as_ref().map(|l| &l.dir) {
        if !dir.is_dir() {
            return Err(format!("--log-dir {}: not a directory", dir.display()));
        }
    }
    // libvirt's own error printing would duplicate ours.
    virt::error::clear_error_callback();
    console_service::run(options).map_err(|e| e.to_string())
}

fn status(dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join("control.sock");
    let fail = |e: io::Error| format!("{}: {e}", path.display());
    let mut stream = UnixStream::connect(&path).map_err(fail)?;
    stream.write_all(b"{\"cmd\":\"status\"}\n").map_err(fail)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(fail)?;
    print!("{line}");
    Ok(())
}

fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// A duration from now that a deadline can hold: finite and not negative.
fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|&d| std::time::Instant::now().checked_add(d).is_some())
        .ok_or_else(|| "not a usable number of seconds (0 or more, finite)".to_owned())
}

/// Bytes given as text with escapes.
#[derive(Clone)]
struct Escaped(Vec<u8>);

/// Bytes from text with `\xHH`, `\r`, `\n` and `\\` escapes.
fn escaped(text: &str) -> Result<Escaped, String> {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        match rest.split_first() {
            Some((b'r', tail)) => (bytes.push(b'\r'), rest = tail).1,
            Some((b'n', tail)) => (bytes.push(b'\n'), rest = tail).1,
            Some((b'\\', tail)) => (bytes.push(b'\\'), rest = tail).1,
            Some((b'x', tail)) if tail.len() >= 2 => {
                let hex = std::str::from_utf8(&tail[..2]).map_err(|e| e.to_string())?;
                let value =
                    u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape \\x{hex}"))?;
                bytes.push(value);
                rest = &tail[2..];
            }
            _ => return Err("a backslash must start \\xHH, \\r, \\n or \\\\".to_owned()),
        }
    }
    Ok(Escaped(bytes))
}
