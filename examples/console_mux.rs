//! Many guest consoles on one thread: every line a guest prints, prefixed with its
//! name; every line you type, sent to the guest you chose.
//!
//! ```text
//! console_mux                                   # boot 3 testbed guests, no daemon needed
//! console_mux --uri qemu:///system [--domain NAME ...]
//! ```
//!
//! Input: a line goes to the selected guest; `@NAME text` to one guest, `@all text`
//! to every guest, `:use NAME` selects, `:list` lists. In a terminal, lines are
//! edited with history (Up) and completion (Tab) of `@NAME` and `:use NAME`, guest
//! output appears above the prompt, and Ctrl-] quits at once. End of input, Ctrl-],
//! a signal or closing the terminal (SIGHUP) quits: the consoles are finished and
//! the guests it booted are destroyed. It works with stdin piped, so it can be
//! scripted (then a line with Ctrl-] in it quits).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

#[path = "common/consoles.rs"]
mod common;
#[path = "common/line_editor.rs"]
mod line_editor;
#[path = "common/owned_dir.rs"]
mod owned_dir;

use anstyle::{AnsiColor, Style};
use clap::Parser;
use common::{Destroyed, SetUp};
use line_editor::{Input, Screen, Typed};
use owned_dir::OwnedDir;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use virt_reactor::console::{ConsoleEnd, ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::console_service::{ConsoleLog, LogOptions};
use virt_reactor::testbed::BANNER;
use virt_reactor::{Reactor, ReactorHandle};

const COLORS: [AnsiColor; 6] = [
    AnsiColor::Green,
    AnsiColor::Cyan,
    AnsiColor::Yellow,
    AnsiColor::Magenta,
    AnsiColor::Blue,
    AnsiColor::Red,
];

#[derive(Parser)]
#[command(about = "Many guest consoles on one thread")]
struct Args {
    /// Attach to running domains of this connection instead of booting testbed guests.
    #[arg(long)]
    uri: Option<String>,
    /// With --uri: the domains to attach to (default: every running domain).
    #[arg(long = "domain", requires = "uri")]
    domains: Vec<String>,
    /// Testbed guests to boot (without --uri).
    #[arg(long, default_value_t = 3)]
    guests: usize,
    /// Where the testbed kernel and initramfs are (testbed/build.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed"))]
    testbed: PathBuf,
    /// Write each guest's output to DIR/NAME.log too.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Take consoles over from other clients.
    #[arg(long)]
    force: bool,
    /// After end of input, wait this long for the guests' last output, in seconds.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    linger: f64,
}

/// How long shutdown waits for a daemon's answers.
const DAEMON_GRACE: Duration = Duration::from_millis(500);
/// The least the final drain gets: enough for a healthy daemon's answers.
const MIN_DRAIN: Duration = Duration::from_millis(100);
/// How long shutdown waits for the guests it booted on the in-process driver.
const BOOTED_GRACE: Duration = Duration::from_secs(30);

/// A duration in seconds, as `Duration::from_secs_f64` takes it without panicking.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86400.0).contains(&s) => Ok(s),
        _ => Err(format!("{text}: not a number of seconds from 0 to 86400")),
    }
}

type Session = common::Session<Loop>;

/// The reactor's state: what the set-up, the stdin thread, signals and the shutdown
/// tell the loop (through `execute` jobs and `spawn_blocking`, on the loop thread).
#[derive(Default)]
struct Loop {
    /// The set-up's outcome, once it is known.
    setup: Option<Result<Session, String>>,
    /// When to quit: after `--linger` at end of input, now on Ctrl-] at the prompt,
    /// SIGINT, SIGTERM or SIGHUP.
    quit_at: Option<Instant>,
    /// How many guests the shutdown destroyed, once it has.
    destroyed: Option<usize>,
}

impl Destroyed for Loop {
    fn destroyed(&mut self) -> &mut Option<usize> {
        &mut self.destroyed
    }
}

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("console_mux: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Put back when `run` returns, even if the line editor is still reading then.
    let (input, screen, _terminal_mode) = line_editor::open()?;
    // Before anything starts: a bad log directory must not leave guests behind.
    let mut out = Output::new(args.log_dir.clone(), screen)?;
    let mut reactor = Reactor::<Loop>::register()?;
    let mut state = Loop::default();
    let handle = reactor.handle();
    {
        // SIGINT, SIGTERM and SIGHUP (the terminal closed) quit as cleanly as end
        // of input, without lingering: nobody may be there to read.
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let handle = handle.clone();
        thread::spawn(move || {
            for _ in signals.forever() {
                let _ = handle.execute(|_, state| state.quit_at = Some(Instant::now()));
            }
        });
    }
    let embed_root = match &args.uri {
        Some(_) => None,
        None => Some(OwnedDir::create(
            std::env::temp_dir().join(format!("console-mux-{}", std::process::id())),
        )?),
    };

    // Opening the connection and booting guests block on replies that, with the
    // in-process driver, come through the loop: so they run on worker threads
    // while this thread runs the loop. The outcome arrives in `state.setup`.
    let domains = args.domains.clone();
    SetUp {
        uri: args.uri.clone(),
        root: embed_root.as_ref().map(|root| root.path().to_path_buf()),
        guests: args.guests,
        testbed: args.testbed.clone(),
        options: ConsoleOptions {
            force: args.force,
            reopen: true,
            ..ConsoleOptions::default()
        },
    }
    .start(&handle, move |reactor, state, ready| match ready {
        // A daemon's domains are checked and attached on another worker, which
        // reports.
        Ok((session, uri)) if session.booted.is_empty() => {
            let attaching = reactor.handle().spawn_blocking(
                move || attach_running(&session, &uri, domains).map(|()| session),
                |_, state, session| state.setup = Some(session),
            );
            if let Err(e) = attaching {
                state.setup = Some(Err(e.to_string()));
            }
        }
        ready => state.setup = Some(ready.map(|(session, _)| session)),
    })?;

    let mut session: Option<Session> = None;
    let mut waiting_for: BTreeMap<String, bool> = BTreeMap::new(); // name -> banner seen
    let mut input = Some(input);
    // Consoles that failed to attach or failed later: the exit status tells.
    let mut failed: Vec<String> = Vec::new();

    let result: Result<(), String> = 'run: loop {
        if let Err(e) = reactor.run_once(Some(Duration::from_millis(100)), &mut state) {
            break Err(e.to_string()); // still clean up below
        }
        match state.setup.take() {
            Some(Ok(ready)) => {
                // Booted guests are ready at their banner; running ones once
                // their console is attached.
                for name in ready.mux.names() {
                    waiting_for.insert(name, false);
                }
                session = Some(ready);
            }
            Some(Err(e)) => break 'run Err(e),
            None => {}
        }
        let Some(Session {
            mux,
            events,
            booted,
            ..
        }) = &session
        else {
            continue;
        };
        for event in events.try_iter() {
            if let Some(name) = out.event(&event) {
                waiting_for.insert(name, true); // its banner line
            }
            match &event {
                ConsoleEvent::Attached { name } if !booted.contains(name) => {
                    waiting_for.insert(name.clone(), true);
                }
                ConsoleEvent::AttachFailed { name, error } => {
                    failed.push(format!("{name}: {error}"));
                }
                ConsoleEvent::Ended {
                    end: ConsoleEnd::ConnectionLost(reason),
                    ..
                } => {
                    // Every console ends with it, and none can come back.
                    out.flush_all();
                    break 'run Err(format!("lost the connection to libvirt ({reason})"));
                }
                ConsoleEvent::Ended {
                    name,
                    end: ConsoleEnd::Failed(error),
                } => failed.push(format!("{name}: {error}")),
                _ => {}
            }
            if let ConsoleEvent::AttachFailed { name, .. } | ConsoleEvent::Ended { name, .. } =
                &event
            {
                // A console that ended before its banner is not waited for.
                if waiting_for.get(name) == Some(&false) {
                    waiting_for.remove(name);
                }
            }
        }
        if let Some(e) = out.failed.take() {
            break Err(e);
        }
        out.flush_stale();
        if input.is_some() && !waiting_for.is_empty() && waiting_for.values().all(|seen| *seen) {
            let input = input.take().expect("checked");
            let names: Vec<String> = waiting_for.keys().cloned().collect();
            out.note(&format!(
                "{} console(s) ready: {}. Type a line for the selected guest; @NAME, @all, :use NAME, :list; {}",
                names.len(),
                names.join(", "),
                input.quit_hint()
            ));
            let linger = Duration::from_secs_f64(args.linger);
            spawn_input(input, mux.clone(), names, handle.clone(), linger);
        }
        if input.is_some() && waiting_for.is_empty() {
            // Every console failed or ended before its banner: input would never
            // start, so neither end of input nor Ctrl-] could quit.
            break Err("no console came up".to_owned());
        }
        if state.quit_at.is_some_and(|at| Instant::now() >= at) {
            break match failed.is_empty() {
                true => Ok(()),
                false => Err(format!("console(s) failed: {}", failed.join("; "))),
            };
        }
    };

    // Clean shutdown: finish the consoles on the loop, destroy what we booted off it.
    // The run's own error, if any, is the one reported; clean-up errors come after.
    // A daemon gets a short grace, so that a frozen one cannot hold the exit; guests
    // booted on the in-process driver take longer to destroy.
    let grace = if embed_root.is_some() {
        BOOTED_GRACE
    } else {
        DAEMON_GRACE
    };
    let shutting_down = Instant::now();
    let mut destroyed = Ok(0);
    if let Some(session) = session {
        session.mux.detach_all(&mut reactor, &mut state);
        destroyed = session.end(&mut reactor, &mut state, grace, |event| {
            let _ = out.event(event);
        });
        out.flush_all();
        if let Ok(n @ 1..) = destroyed {
            out.note(&format!("destroyed {n} guest(s)"));
        }
    }
    let drained = reactor.shutdown(
        grace.saturating_sub(shutting_down.elapsed()).max(MIN_DRAIN),
        &mut state,
    );
    log::debug!("drained: {drained:?}");
    let unanswered = |e: virt_reactor::Error| match e {
        virt_reactor::Error::TimedOut | virt_reactor::Error::DrainTimedOut { .. } => {
            format!("libvirt did not answer within {grace:?}; exiting without a clean close")
        }
        other => other.to_string(),
    };
    drop(embed_root);
    result?;
    destroyed.map_err(unanswered)?;
    drained.map_err(unanswered)?;
    Ok(())
}

/// On a worker thread: attaches to the running `domains` (or all), after checking
/// that each runs.
fn attach_running(session: &Session, uri: &str, domains: Vec<String>) -> Result<(), String> {
    let Session { conn, mux, .. } = session;
    let names = if domains.is_empty() {
        conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|d| d.name().ok())
            .collect()
    } else {
        domains
    };
    if names.is_empty() {
        return Err(format!("{uri}: no running domains"));
    }
    // Named domains that are missing or stopped fail now, not after "ready".
    for name in &names {
        let domain = conn
            .lookup_domain_by_name(name)
            .map_err(|e| format!("{name}: {}", e.message()))?;
        if !domain.is_active().map_err(|e| format!("{name}: {e}"))? {
            return Err(format!("{name}: the domain is not running"));
        }
    }
    for name in names {
        mux.attach(&name).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads input lines and routes them; tells the loop to quit at the end.
fn spawn_input(
    mut input: Input,
    mux: ConsoleMux<Loop>,
    names: Vec<String>,
    handle: ReactorHandle<Loop>,
    linger: Duration,
) {
    let attached = mux.clone();
    input.complete_with(move || attached.attached());
    thread::spawn(move || {
        let mut selected = names[0].clone();
        let quit_at = loop {
            let line = match input.read(&format!("{selected}> ")) {
                Typed::Line(line) => line,
                Typed::End => break Instant::now() + linger,
                Typed::Quit => break Instant::now(),
            };
            let (targets, text): (Vec<String>, &str) =
                if let Some(rest) = line.strip_prefix(":use ") {
                    let name = rest.trim();
                    if names.iter().any(|n| n == name) {
                        selected = name.to_owned();
                        println!("-- sending to {selected}");
                    } else {
                        println!("-- no guest {name}");
                    }
                    continue;
                } else if line.trim() == ":list" {
                    println!("-- guests: {} (selected: {selected})", names.join(", "));
                    continue;
                } else if let Some(rest) = line.strip_prefix("@all ") {
                    (mux.attached(), rest)
                } else if let Some(rest) = line.strip_prefix('@') {
                    let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    (vec![name.to_owned()], text)
                } else {
                    (vec![selected.clone()], line.as_str())
                };
            for name in targets {
                if let Err(e) = mux.send(&name, format!("{text}\n").as_bytes()) {
                    println!("-- {e}");
                }
            }
        };
        // Runs at the loop's next iteration: it wakes the loop.
        let _ = handle.execute(move |_, state| {
            state.quit_at.get_or_insert(quit_at);
        });
    });
}

/// Prints guest output line by line, prefixed and coloured, and logs it per guest.
struct Output {
    screen: Screen,
    color: bool,
    log_dir: Option<PathBuf>,
    /// `None`: the log could not be opened (reported through `failed`).
    logs: HashMap<String, Option<ConsoleLog>>,
    /// A log that could not be opened, naming it; the run ends with it.
    failed: Option<String>,
    partial: HashMap<String, (String, Instant)>,
    colors: HashMap<String, Style>,
}

impl Output {
    fn new(log_dir: Option<PathBuf>, screen: Screen) -> io::Result<Output> {
        if let Some(dir) = &log_dir {
            fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("log directory {}: {e}", dir.display()))
            })?;
        }
        Ok(Output {
            screen,
            // A terminal, unless NO_COLOR says otherwise (or CLICOLOR_FORCE forces it).
            color: anstream::AutoStream::choice(&io::stdout()) != anstream::ColorChoice::Never,
            log_dir,
            logs: HashMap::new(),
            failed: None,
            partial: HashMap::new(),
            colors: HashMap::new(),
        })
    }

    /// Prints an event; returns the guest's name when it printed its banner line.
    fn event(&mut self, event: &ConsoleEvent) -> Option<String> {
        let mut banner = None;
        match event {
            ConsoleEvent::Output { name, bytes } => {
                self.log(name, bytes);
                let text = String::from_utf8_lossy(bytes).replace('\r', "");
                let (buffer, since) = self
                    .partial
                    .entry(name.clone())
                    .or_insert_with(|| (String::new(), Instant::now()));
                if buffer.is_empty() {
                    *since = Instant::now();
                }
                buffer.push_str(&text);
                while let Some(at) = self.partial[name].0.find('\n') {
                    let line: String = self
                        .partial
                        .get_mut(name)
                        .expect("present")
                        .0
                        .drain(..=at)
                        .collect();
                    if line.contains(BANNER) {
                        banner = Some(name.clone());
                    }
                    self.line(name, line.trim_end_matches('\n'));
                }
            }
            ConsoleEvent::Attached { name } => self.note(&format!("{name}: console attached")),
            ConsoleEvent::AttachFailed { name, error } => {
                self.note(&format!("{name}: cannot attach: {error}"))
            }
            ConsoleEvent::Ended { name, end } => {
                self.flush(name);
                let what = match end {
                    ConsoleEnd::GuestGone => "guest stopped".to_owned(),
                    ConsoleEnd::TakenOver => "console taken over by another client".to_owned(),
                    other => other.to_string(),
                };
                self.note(&format!("{name}: {what}"));
            }
            _ => {}
        }
        banner
    }

    /// Prints partial lines nobody completed for a while (a shell prompt).
    fn flush_stale(&mut self) {
        let stale: Vec<String> = self
            .partial
            .iter()
            .filter(|(_, (text, since))| {
                !text.is_empty() && since.elapsed() > Duration::from_millis(300)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.flush(&name);
        }
    }

    fn flush_all(&mut self) {
        let names: Vec<String> = self.partial.keys().cloned().collect();
        for name in names {
            self.flush(&name);
        }
    }

    fn flush(&mut self, name: &str) {
        if let Some((text, _)) = self.partial.get_mut(name) {
            if !text.is_empty() {
                let line = std::mem::take(text);
                self.line(name, &line);
            }
        }
    }

    fn line(&mut self, name: &str, line: &str) {
        let next = Style::new().fg_color(Some(COLORS[self.colors.len() % COLORS.len()].into()));
        let style = *self.colors.entry(name.to_owned()).or_insert(next);
        self.screen.line(if self.color {
            format!("{style}{name}|{style:#} {line}")
        } else {
            format!("{name}| {line}")
        });
    }

    /// The guest's output as it came, into DIR/NAME.log (the console service's logs:
    /// rotated at 1 MiB on a line end, 5 kept).
    fn log(&mut self, name: &str, bytes: &[u8]) {
        let Some(dir) = &self.log_dir else { return };
        let failed = &mut self.failed;
        let log = self.logs.entry(name.to_owned()).or_insert_with(|| {
            let options = LogOptions {
                dir: dir.clone(),
                max_bytes: 1 << 20,
                keep: 5,
                timestamps: false,
            };
            ConsoleLog::open(name, &options)
                .map_err(|e| *failed = Some(format!("log {}/{name}.log: {e}", dir.display())))
                .ok()
        });
        if let Some(log) = log {
            log.write(bytes);
        }
    }

    fn note(&mut self, text: &str) {
        self.screen.line(format!("-- {text}"));
    }
}
