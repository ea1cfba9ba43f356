//! Many guest consoles from a tokio runtime: every line a guest prints, prefixed
//! with its name (`NAME| line`, as `console_mux` prints it); every line you type,
//! sent to the guests you chose. The async counterpart of `console_mux`.
//!
//! ```text
//! tokio_consoles                                # boot 3 testbed guests, no daemon needed
//! tokio_consoles --guests 2
//! tokio_consoles --uri qemu:///system [--domain NAME ...]
//! ```
//!
//! Input: a line goes to every console; `@NAME text` to one. End of input or Ctrl-]
//! (then Enter) quits after `--linger` seconds, Ctrl-C at once: the consoles are
//! finished and the guests it booted are destroyed. It works with stdin piped.
//!
//! Each console is one task that `tokio::select!`s between the console's output,
//! the lines meant for it and a timer that prints a partial line (a prompt) nobody
//! completed; the main task `select!`s between input, Ctrl-C and the consoles'
//! ends. libvirt's loop runs as one more task, the [`Driver`]; the calls that wait
//! (connecting, creating and destroying domains, opening consoles) run on tokio's
//! blocking pool.
//!
//! As root, libvirt's embedded driver needs the `libvirt-qemu` user: run it
//! unprivileged otherwise (`scripts/main.sh` shows how, for `console_mux`).
//!
//! [`Driver`]: virt_reactor::tokio::Driver

use std::collections::BTreeMap;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[path = "common/owned_dir.rs"]
mod owned_dir;

use clap::Parser;
use owned_dir::OwnedDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use virt::connect::Connect;
use virt::domain::Domain;
use virt_reactor::console::ConsoleOptions;
use virt_reactor::testbed::{self, GuestMode, Testbed, BANNER};
use virt_reactor::tokio::{AsyncStream, Handle};

const ESCAPE: char = '\u{1d}'; // Ctrl-]
const COLORS: [&str; 6] = ["32", "36", "33", "35", "34", "31"];
/// A partial line nobody completed for this long is printed as it is.
const STALE: Duration = Duration::from_millis(300);
/// How long the consoles get to finish at the end.
const FINISH: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "Many guest consoles from a tokio runtime")]
struct Args {
    /// Attach to running domains of this connection instead of booting testbed guests.
    #[arg(long)]
    uri: Option<String>,
    /// With --uri: the domains to attach to (default: every running domain).
    #[arg(long = "domain", requires = "uri")]
    domains: Vec<String>,
    /// Testbed guests to boot (without --uri).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    guests: u16,
    /// Where the testbed kernel and initramfs are (testbed/build.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed"))]
    testbed: PathBuf,
    /// Take consoles over from other clients.
    #[arg(long)]
    force: bool,
    /// After end of input, wait this long for the guests' last output, in seconds.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    linger: f64,
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86400.0).contains(&s) => Ok(s),
        _ => Err(format!("{text}: not a number of seconds from 0 to 86400")),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokio_consoles: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the main task hears from outside: input lines, their end, Ctrl-C.
enum Input {
    Line(String),
    End,
    Interrupt,
}

async fn run(args: Args) -> Result<(), BoxError> {
    let (handle, driver) = virt_reactor::tokio::register()?;
    let driver = tokio::spawn(driver.run());
    let root = match args.uri {
        Some(_) => None,
        None => Some(OwnedDir::create(
            std::env::temp_dir().join(format!("tokio-consoles-{}", std::process::id())),
        )?),
    };

    // Ctrl-C from the start: during the set-up it is heard once the consoles are
    // up, and the guests booted meanwhile are destroyed all the same.
    let (input_tx, input) = mpsc::unbounded_channel();
    {
        let tx = input_tx.clone();
        ctrlc::set_handler(move || {
            let _ = tx.send(Input::Interrupt);
        })?;
    }
    let mut session = Session {
        handle: handle.clone(),
        conn: None,
        booted: Vec::new(),
    };
    let root_path = root.as_ref().map(|root| root.path().to_path_buf());
    let result = session.run(&args, root_path, input_tx, input).await;

    // Clean up whatever happened: the guests we booted, the connection, the driver.
    let ended = session.end().await;
    handle.stop();
    let drained = driver.await?;
    drop(root);
    result?;
    ended?;
    log::debug!("drained: {:?}", drained?);
    Ok(())
}

/// The connections and the guests this run booted, to destroy at the end.
struct Session {
    handle: Handle,
    conn: Option<Connect>,
    booted: Vec<String>,
}

impl Session {
    async fn run(
        &mut self,
        args: &Args,
        root: Option<PathBuf>,
        input_tx: mpsc::UnboundedSender<Input>,
        mut input: mpsc::UnboundedReceiver<Input>,
    ) -> Result<(), BoxError> {
        let uri = match (&args.uri, root) {
            (Some(uri), _) => uri.clone(),
            (None, Some(root)) => {
                self.handle
                    .blocking(move || {
                        testbed::embed_root(&root)
                            .map_err(|e| format!("embedded driver in {}: {e}", root.display()))
                    })
                    .await??
            }
            (None, None) => unreachable!("no URI means an embedded root"),
        };
        let conn = {
            let uri = uri.clone();
            self.handle
                .blocking(move || virt_reactor::connect(&uri).map_err(|e| format!("{uri}: {e}")))
                .await??
        };
        self.conn = Some(conn.clone());
        let options = ConsoleOptions {
            force: args.force,
            ..ConsoleOptions::default()
        };

        // The consoles, by name; booted guests are ready at their banner, running
        // domains at once.
        let mut consoles: Vec<(String, AsyncStream, bool)> = Vec::new();
        if args.uri.is_none() {
            let testbed = Testbed::open(&args.testbed)?;
            let names: Vec<String> = (1..=args.guests).map(|i| format!("tb-{i}")).collect();
            // Destroyed at the end even if booting fails halfway.
            self.booted.clone_from(&names);
            let boots = names.iter().map(|name| {
                let xml = testbed.guest_xml(name, GuestMode::Plain);
                boot(&self.handle, &conn, name.clone(), xml, options.clone())
            });
            for (name, console) in names
                .iter()
                .zip(futures_util::future::join_all(boots).await)
            {
                let console = console.map_err(|e| format!("{name}: {e}"))?;
                consoles.push((name.clone(), console, false));
            }
        } else {
            let domains = running(&self.handle, &conn, &uri, args.domains.clone()).await?;
            // `open_console` gives each remote console a connection of its own.
            for (name, domain) in domains {
                let console = self
                    .handle
                    .open_console(domain, options.clone())
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                consoles.push((name, console, true));
            }
        }

        // One task per console; the main task routes input and waits for the ends.
        let color = io::stdout().is_terminal();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<String>();
        let mut inputs: BTreeMap<String, mpsc::UnboundedSender<String>> = BTreeMap::new();
        let mut tasks = JoinSet::new();
        for (i, (name, console, ready)) in consoles.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            inputs.insert(name.clone(), tx);
            let prefix = match color {
                true => format!("\x1b[{}m{name}|\x1b[0m", COLORS[i % COLORS.len()]),
                false => format!("{name}|"),
            };
            if ready {
                let _ = ready_tx.send(name.clone());
            }
            let ready_tx = ready_tx.clone();
            tasks.spawn(async move {
                let ended = serve(console, &name, &prefix, rx, ready_tx).await;
                (name, ended)
            });
        }
        drop(ready_tx);

        let mut failed: Vec<String> = Vec::new();
        let mut waiting: Vec<String> = inputs.keys().cloned().collect();
        while !waiting.is_empty() {
            tokio::select! {
                Some(name) = ready_rx.recv() => waiting.retain(|n| *n != name),
                Some(Input::Interrupt) = input.recv() => return Err("interrupted".into()),
                Some(ended) = tasks.join_next() => {
                    let name = console_ended(ended?, &mut inputs, &mut failed);
                    waiting.retain(|n| *n != name);
                }
                else => break,
            }
        }
        if inputs.is_empty() {
            return Err("no console came up".into());
        }
        let names: Vec<String> = inputs.keys().cloned().collect();
        note(&format!(
            "{} console(s) ready: {}. A line goes to every console, @NAME text to one; Ctrl-] or end of input quits.",
            names.len(),
            names.join(", ")
        ));

        spawn_input(input_tx);
        let mut quit_at: Option<Instant> = None;
        loop {
            let linger = async {
                match quit_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(event) = input.recv() => match event {
                    Input::Line(line) => route(&line, &inputs),
                    Input::End => {
                        quit_at = Some(Instant::now() + Duration::from_secs_f64(args.linger));
                    }
                    Input::Interrupt => break,
                },
                Some(ended) = tasks.join_next() => {
                    console_ended(ended?, &mut inputs, &mut failed);
                    if inputs.is_empty() {
                        break;
                    }
                }
                () = linger => break,
            }
        }

        // Closing their input finishes the consoles; a console that does not
        // finish in time is dropped, which aborts it.
        drop(inputs);
        let finishing = async {
            while let Some(ended) = tasks.join_next().await {
                if let Ok((name, Err(e))) = ended {
                    failed.push(format!("{name}: {e}"));
                }
            }
        };
        if tokio::time::timeout(FINISH, finishing).await.is_err() {
            tasks.shutdown().await;
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(format!("console(s) failed: {}", failed.join("; ")).into()),
        }
    }

    /// Destroys the guests this run booted and closes the connection, on the
    /// blocking pool: both wait for replies that come through the driver.
    async fn end(&mut self) -> Result<(), BoxError> {
        let (Some(conn), booted) = (self.conn.take(), std::mem::take(&mut self.booted)) else {
            return Ok(());
        };
        let destroyed = self
            .handle
            .blocking(move || {
                let n = testbed::destroy(&conn, &booted);
                drop(conn);
                n
            })
            .await?;
        if destroyed > 0 {
            note(&format!("destroyed {destroyed} guest(s)"));
        }
        Ok(())
    }
}

/// Creates a testbed guest paused, opens its console, then lets it run: its first
/// output (the banner) cannot be missed.
async fn boot(
    handle: &Handle,
    conn: &Connect,
    name: String,
    xml: String,
    options: ConsoleOptions,
) -> Result<AsyncStream, BoxError> {
    let conn = conn.clone();
    let domain = handle
        .blocking(move || conn.create_domain_xml(&xml, virt::sys::VIR_DOMAIN_START_PAUSED))
        .await??;
    let console = handle.open_console(domain.clone(), options).await?;
    handle.blocking(move || domain.resume()).await??;
    log::debug!("{name}: running");
    Ok(console)
}

/// The running domains to attach to: `names`, or every running one.
async fn running(
    handle: &Handle,
    conn: &Connect,
    uri: &str,
    names: Vec<String>,
) -> Result<Vec<(String, Domain)>, BoxError> {
    let (conn, uri) = (conn.clone(), uri.to_owned());
    handle
        .blocking(move || -> Result<Vec<(String, Domain)>, BoxError> {
            let domains = if names.is_empty() {
                conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?
                    .into_iter()
                    .filter_map(|d| Some((d.name().ok()?, d)))
                    .collect()
            } else {
                let mut domains = Vec::new();
                for name in names {
                    let domain = conn
                        .lookup_domain_by_name(&name)
                        .map_err(|e| format!("{name}: {}", e.message()))?;
                    if !domain.is_active()? {
                        return Err(format!("{name}: the domain is not running").into());
                    }
                    domains.push((name, domain));
                }
                domains
            };
            if domains.is_empty() {
                return Err(format!("{uri}: no running domains").into());
            }
            Ok(domains)
        })
        .await?
}

/// One console: prints its output line by line with `prefix`, writes the lines it
/// is sent, says when it printed the banner. Finishes the console once `input`
/// closes; returns how the console ended.
async fn serve(
    mut console: AsyncStream,
    name: &str,
    prefix: &str,
    mut input: mpsc::UnboundedReceiver<String>,
    ready: mpsc::UnboundedSender<String>,
) -> virt_reactor::Result<Ended> {
    let mut buf = vec![0u8; 4096];
    let mut partial = String::new();
    let mut since = Instant::now();
    loop {
        tokio::select! {
            // Cancel-safe: a read that loses the race takes no byte.
            read = console.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    flush(prefix, &mut partial);
                    return Ok(Ended::GuestGone);
                }
                if partial.is_empty() {
                    since = Instant::now();
                }
                partial.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
                while let Some(at) = partial.find('\n') {
                    let line: String = partial.drain(..=at).collect();
                    let line = line.trim_end_matches('\n');
                    if line.contains(BANNER) {
                        let _ = ready.send(name.to_owned());
                    }
                    print_line(prefix, line);
                }
            }
            line = input.recv() => match line {
                Some(line) => console.write_all(line.as_bytes()).await?,
                None => {
                    flush(prefix, &mut partial);
                    console.shutdown().await?;
                    return Ok(Ended::Finished);
                }
            },
            () = sleep(STALE.saturating_sub(since.elapsed())), if !partial.is_empty() => {
                flush(prefix, &mut partial);
            }
        }
    }
}

/// How a console task ended.
enum Ended {
    /// Its stream ended: the guest stopped.
    GuestGone,
    /// We finished it.
    Finished,
}

fn describe(ended: &virt_reactor::Result<Ended>) -> String {
    match ended {
        Ok(Ended::GuestGone) => "guest stopped".to_owned(),
        Ok(Ended::Finished) => "console finished".to_owned(),
        Err(e) => format!("console failed: {e}"),
    }
}

/// Tells how console `name` ended, records a failure in `failed`, and routes no
/// more input to it; returns its name.
fn console_ended(
    (name, ended): (String, virt_reactor::Result<Ended>),
    inputs: &mut BTreeMap<String, mpsc::UnboundedSender<String>>,
    failed: &mut Vec<String>,
) -> String {
    note(&format!("{name}: {}", describe(&ended)));
    if let Err(e) = ended {
        failed.push(format!("{name}: {e}"));
    }
    inputs.remove(&name);
    name
}

fn flush(prefix: &str, partial: &mut String) {
    if !partial.is_empty() {
        print_line(prefix, &std::mem::take(partial));
    }
}

/// Prints one line; a closed stdout is not an error here.
fn print_line(prefix: &str, line: &str) {
    let _ = writeln!(io::stdout().lock(), "{prefix} {line}");
}

/// `@NAME text` to one console, anything else to all.
fn route(line: &str, inputs: &BTreeMap<String, mpsc::UnboundedSender<String>>) {
    let (targets, text): (Vec<&String>, &str) = match line.strip_prefix('@') {
        Some(rest) => {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            match inputs.get_key_value(name) {
                Some((name, _)) => (vec![name], text),
                None => {
                    note(&format!("no console {name}"));
                    return;
                }
            }
        }
        None => (inputs.keys().collect(), line),
    };
    for name in targets {
        let _ = inputs[name].send(format!("{text}\n"));
    }
}

/// Reads stdin on a thread of its own (a blocking read would hold the runtime's
/// shutdown) into `tx`.
fn spawn_input(tx: mpsc::UnboundedSender<Input>) {
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.contains(ESCAPE) {
                break;
            }
            if tx.send(Input::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Input::End);
    });
}

fn note(text: &str) {
    let _ = writeln!(io::stdout().lock(), "-- {text}");
}
