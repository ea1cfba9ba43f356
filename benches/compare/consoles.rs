//! Scenario 4: console echo latency through `ConsoleMux`, one console or every
//! testbed guest at once, quiet or beside a 1 GiB upload on the same loop; and one
//! console beside 16 concurrent downloads (1 GiB in all) on the same loop, where each
//! receive may take `DEFAULT_RECEIVE_BUDGET` per readiness event (issue 14).
//!
//! The loop thread runs `Reactor::run`; a second thread plays the user: it sends
//! `echo mN` lines through the mux (each console's `StreamWriter`, which wakes the
//! loop) and takes the output from the mux's event channel, timing each line from
//! send to the `\nmN\r` of the guest's reply. With every guest, a round sends one
//! line to each and waits for all replies. The guests run the testbed's plain
//! read/eval loop (no shell prompt).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt_reactor::console::{ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::{transfer, Reactor, ReactorHandle, Stream};

use crate::multihost::Held;
use crate::report::{figure, Results};
use crate::scale::Scale;
use crate::setup::{Env, POOL};
use crate::{data, run_case, sys, Case, Figures, Opts, Params, MIB};

pub(crate) const UPLOAD_VOLUME: &str = "console-upload";

/// Downloads beside one console in the "+ 16 downloads" case, each of its own
/// volume (`download_volume(k)`).
const DOWNLOADS: usize = 16;

fn download_volume(k: usize) -> String {
    format!("console-download-{k}")
}

pub(crate) fn s4_label(all: bool, upload: bool) -> String {
    format!(
        "{}{}",
        if all { "every guest" } else { "one guest" },
        if upload { " + upload" } else { "" }
    )
}

pub(crate) fn scenario4(opts: &Opts, env: &mut Env, results: &mut Results) {
    let guests = env.boot_guests(&opts.testbed, opts.guests)[..opts.guests].to_vec();
    let upload_len = if opts.quick { 128 * MIB } else { 1024 * MIB };
    env.create_volume(UPLOAD_VOLUME, upload_len);
    let samples = if opts.quick { 50 } else { 300 };
    for upload in [false, true] {
        for all in [false, true] {
            let names = if all {
                guests.join(",")
            } else {
                guests[0].clone()
            };
            run_case(
                Case {
                    // The async path: AsyncStream consoles (asyncpath::latency).
                    tokio: true,
                    ..Case::new(
                        "Scenario 4: console echo latency",
                        s4_label(all, upload),
                        "console",
                        vec![
                            format!("uri={}", env.uri),
                            format!("guests={names}"),
                            format!("samples={samples}"),
                            format!("upload={}", if upload { upload_len } else { 0 }),
                        ],
                        vec![
                            figure("p50_ms", "median ms"),
                            figure("p99_ms", "p99 ms"),
                            figure("samples", "echoes timed"),
                            figure("lost", "echoes lost (5 s)"),
                            figure("upload_mibps", "upload MiB/s"),
                        ],
                        opts.runs,
                    )
                },
                results,
            );
        }
    }
    // One console beside many receiving streams: what a receive budget per event
    // costs the console's echo.
    let download_len = if opts.quick { 8 * MIB } else { 64 * MIB };
    for k in 0..DOWNLOADS {
        env.create_volume(&download_volume(k), download_len);
        env.fill_volume(&download_volume(k), 0, download_len);
    }
    run_case(
        Case::new(
            "Scenario 4: console echo latency",
            format!("one guest + {DOWNLOADS} downloads"),
            "console",
            vec![
                format!("uri={}", env.uri),
                format!("guests={}", guests[0]),
                format!("samples={samples}"),
                "upload=0".to_owned(),
                format!("downloads={DOWNLOADS}"),
                format!("download_len={download_len}"),
            ],
            vec![
                figure("p50_ms", "median ms"),
                figure("p99_ms", "p99 ms"),
                figure("samples", "echoes timed"),
                figure("lost", "echoes lost (5 s)"),
                figure("download_mibps", "downloads MiB/s (all)"),
                figure("maxrss_mib", "peak RSS MiB"),
            ],
            opts.runs,
        ),
        results,
    );
    results.note(format!(
        "Scenario 4 guests: {} testbed guests ({}), TCG, plain read/eval console.",
        guests.len(),
        guests.join(", ")
    ));
}

/// What the user thread found.
struct Measured {
    /// From the first timed round's start to the last's end.
    timed: Range<Instant>,
    latencies_ms: Vec<f64>,
    lost: usize,
    /// The upload's or the downloads' rate (all of them together).
    background_mibps: f64,
}

/// The consoles of a run by name, on one connection's mux or several.
struct Muxes {
    all: Vec<ConsoleMux<()>>,
    /// Guest name → index into `all`.
    of: HashMap<String, usize>,
}

impl Muxes {
    fn send(&self, name: &str, bytes: &[u8]) -> virt_reactor::Result<()> {
        self.all[self.of[name]].send(name, bytes)
    }
}

/// Child arguments: `uri=U[,U…]` (connections), `guests=[K:]NAME,…` (a guest on
/// connection K, 0 if not given), `samples=`, `upload=` (bytes, on connection 0);
/// optionally `downloads=N download_len=` (bytes each, on connection 0);
/// optionally `held_uri=U held=NAME,…`: consoles also held on this loop, untimed,
/// through a supervised connection (`multihost::Held`).
pub(crate) fn latency(p: &Params) -> Figures {
    let mut reactor = p.kind.reactor::<()>();
    let conns: Vec<Connect> = p.str("uri").split(',').map(|u| p.kind.connect(u)).collect();
    let placed: Vec<(usize, String)> = p
        .str("guests")
        .split(',')
        .map(|g| match g.split_once(':') {
            Some((k, name)) => (k.parse().expect("a connection index"), name.to_owned()),
            None => (0, g.to_owned()),
        })
        .collect();
    let guests: Vec<String> = placed.iter().map(|(_, name)| name.clone()).collect();
    let samples: usize = p.num("samples");
    let upload_len: u64 = p.num("upload");
    let downloads = Downloads {
        count: p
            .get("downloads")
            .map_or(0, |n| n.parse().expect("downloads=")),
        len: p
            .get("download_len")
            .map_or(0, |n| n.parse().expect("download_len=")),
    };
    let options = ConsoleOptions {
        force: true,
        ..ConsoleOptions::default()
    };
    // One mux per connection, their events merged into one channel.
    let (merged, events) = crossbeam_channel::unbounded();
    let mut all = Vec::new();
    for conn in &conns {
        let (mux, rx) = ConsoleMux::new(&mut reactor, conn, options.clone()).expect("mux");
        let merged = merged.clone();
        thread::spawn(move || rx.iter().try_for_each(|e| merged.send(e)));
        all.push(mux);
    }
    drop(merged);
    let muxes = Muxes {
        of: placed.iter().map(|(k, name)| (name.clone(), *k)).collect(),
        all,
    };
    for (k, name) in &placed {
        muxes.all[*k].attach(name).expect("attach");
    }
    // Scenario 7: other consoles on this loop, untimed, on a connection that may
    // be lost and come back.
    let held = p.get("held").map(|names| {
        let names = names.split(',').map(str::to_owned).collect();
        Held::start(&mut reactor, p.str("held_uri"), names, options.clone())
    });
    // Scenario 8: the loop's own delay and where the CPU goes, over the timed rounds.
    let scale = p.get("probe").map(|_| {
        Arc::new(Scale::start(
            &guests,
            p.get("daemon").and_then(|d| d.parse().ok()),
        ))
    });
    let handle = reactor.handle();
    let muxes = Arc::new(muxes);
    let user = {
        let (muxes, conn) = (Arc::clone(&muxes), conns[0].clone());
        let scale = scale.clone();
        thread::spawn(move || {
            // Also when the user panics (a guest gone): the child then fails at once.
            let _stop = StopOnDrop(handle.clone());
            user(
                &muxes,
                &events,
                &guests,
                (samples, upload_len, downloads),
                &conn,
                &handle,
                scale.as_deref(),
            )
        })
    };
    reactor.run(&mut ()).expect("run the loop");
    let measured = user.join().expect("user thread");
    for mux in &muxes.all {
        mux.detach_all(&mut reactor, &mut ());
    }
    if let Some(held) = &held {
        held.stop(&mut reactor);
    }
    for _ in 0..10 {
        let _ = reactor.run_once(Some(Duration::from_millis(5)), &mut ());
    }
    let (upload_mibps, download_mibps) = if downloads.count > 0 {
        (f64::NAN, measured.background_mibps)
    } else {
        (measured.background_mibps, f64::NAN)
    };
    let mut figures = echo_figures(measured.latencies_ms, measured.lost, upload_mibps);
    if downloads.count > 0 {
        figures.push(("download_mibps", download_mibps));
        // The client library queues received packets in this process.
        figures.push(("maxrss_mib", sys::max_rss_kib() as f64 / 1024.0));
    }
    if let Some(scale) = scale.and_then(Arc::into_inner) {
        figures.extend(scale.finish());
    }
    figures.extend(held.iter().flat_map(|held| held.figures(&measured.timed)));
    figures
}

/// Stops the loop when dropped.
struct StopOnDrop(ReactorHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The echo figures of a run: median and p99 latency, samples, lost echoes, and
/// the upload's rate beside them.
pub(crate) fn echo_figures(mut latencies_ms: Vec<f64>, lost: usize, upload_mibps: f64) -> Figures {
    latencies_ms.sort_by(f64::total_cmp);
    let v = latencies_ms;
    let pct = |q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    vec![
        ("p50_ms", pct(0.5)),
        ("p99_ms", pct(0.99)),
        ("samples", v.len() as f64),
        ("lost", lost as f64),
        ("upload_mibps", upload_mibps),
    ]
}

/// One guest's output, with when each piece arrived.
#[derive(Default)]
pub(crate) struct Screen {
    text: String,
    /// (end offset in `text`, arrival) of each piece.
    pieces: Vec<(usize, Instant)>,
}

impl Screen {
    pub(crate) fn push(&mut self, bytes: &[u8], at: Instant) {
        self.text.push_str(&String::from_utf8_lossy(bytes));
        self.pieces.push((self.text.len(), at));
    }

    /// When the piece completing `marker` arrived; forgets the output up to it.
    pub(crate) fn take(&mut self, marker: &str) -> Option<Instant> {
        let end = self.text.find(marker)? + marker.len();
        let at = self.pieces.iter().find(|(e, _)| *e >= end)?.1;
        self.text.drain(..end);
        self.pieces.retain(|(e, _)| *e > end);
        for piece in &mut self.pieces {
            piece.0 -= end;
        }
        Some(at)
    }
}

enum Pumped {
    Output,
    Attached(String),
    Other,
}

/// Every guest's output, fed from the mux's events.
struct Screens<'a> {
    events: &'a Receiver<ConsoleEvent>,
    screens: HashMap<String, Screen>,
}

impl Screens<'_> {
    /// Takes one event (output goes to its screen); None at `deadline`.
    fn pump(&mut self, deadline: Instant) -> Option<Pumped> {
        let left = deadline.checked_duration_since(Instant::now())?;
        match self.events.recv_timeout(left) {
            Ok(ConsoleEvent::Output { name, bytes }) => {
                let at = Instant::now();
                self.screens.entry(name).or_default().push(&bytes, at);
                Some(Pumped::Output)
            }
            Ok(ConsoleEvent::Ended { name, end }) => panic!("{name}: console ended: {end}"),
            Ok(ConsoleEvent::AttachFailed { name, error }) => {
                panic!("{name}: cannot attach: {error}")
            }
            Ok(ConsoleEvent::Attached { name }) => Some(Pumped::Attached(name)),
            Ok(_) => Some(Pumped::Other),
            Err(_) => None,
        }
    }

    /// When `marker` arrived from `name`, or None at `deadline`.
    fn wait_for(&mut self, name: &str, marker: &str, deadline: Instant) -> Option<Instant> {
        loop {
            if let Some(at) = self
                .screens
                .entry(name.to_owned())
                .or_default()
                .take(marker)
            {
                return Some(at);
            }
            self.pump(deadline)?;
        }
    }

    fn wait_attached(&mut self, names: &[String], deadline: Instant) {
        let mut waiting: Vec<&String> = names.iter().collect();
        while !waiting.is_empty() {
            match self.pump(deadline) {
                Some(Pumped::Attached(name)) => waiting.retain(|n| **n != name),
                Some(_) => {}
                None => panic!("consoles not attached in time: {waiting:?}"),
            }
        }
    }
}

/// Concurrent downloads beside the consoles: `count` volumes of `len` bytes.
#[derive(Clone, Copy)]
struct Downloads {
    count: usize,
    len: u64,
}

/// The user's side: warm up, then time `samples` echo rounds, or rounds until an
/// upload of `upload_len` bytes or the downloads end; `scale` watches the timed
/// rounds.
fn user(
    muxes: &Muxes,
    events: &Receiver<ConsoleEvent>,
    guests: &[String],
    (samples, upload_len, downloads): (usize, u64, Downloads),
    conn: &Connect,
    handle: &ReactorHandle<()>,
    scale: Option<&Scale>,
) -> Measured {
    let mut screens = Screens {
        events,
        screens: HashMap::new(),
    };
    screens.wait_attached(guests, Instant::now() + Duration::from_secs(30));
    // The first line reaches a guest only once QEMU notices the new reader (it looks
    // once a second), and a guest may still be booting.
    for name in guests {
        let mut ready = false;
        for k in 0..120 {
            muxes
                .send(name, format!("echo w{k}\n").as_bytes())
                .expect("send");
            if screens
                .wait_for(
                    name,
                    &format!("\nw{k}\r"),
                    Instant::now() + Duration::from_secs(1),
                )
                .is_some()
            {
                ready = true;
                break;
            }
        }
        assert!(ready, "{name} never echoed");
        for k in 0..5 {
            muxes
                .send(name, format!("echo v{k}\n").as_bytes())
                .expect("send");
            screens.wait_for(
                name,
                &format!("\nv{k}\r"),
                Instant::now() + Duration::from_secs(5),
            );
        }
    }

    // Bytes moved beside the consoles; rounds are timed until they are moved.
    let background = upload_len + downloads.count as u64 * downloads.len;
    let done = Arc::new(AtomicBool::new(background == 0));
    let upload_result: Arc<Mutex<Option<Result<f64, String>>>> = Arc::default();
    if upload_len > 0 {
        start_upload(handle, conn, upload_len, &done, &upload_result);
    }
    if downloads.count > 0 {
        start_downloads(handle, conn, downloads, &done, &upload_result);
    }
    let mut latencies_ms = Vec::new();
    let mut lost = 0;
    let mut rounds = 0;
    if let Some(scale) = scale {
        scale.arm();
    }
    let started = Instant::now();
    while let Some((marker, line)) = next_round(&mut rounds, samples, background, &done) {
        let sent: Vec<(&String, Instant)> = guests
            .iter()
            .map(|name| {
                let at = Instant::now();
                muxes.send(name, line.as_bytes()).expect("send");
                (name, at)
            })
            .collect();
        for (name, at) in sent {
            match screens.wait_for(name, &marker, at + Duration::from_secs(5)) {
                Some(arrived) => latencies_ms.push((arrived - at).as_secs_f64() * 1e3),
                None => lost += 1,
            }
        }
    }
    let timed = started..Instant::now();
    if let Some(scale) = scale {
        scale.disarm();
    }
    let background_mibps = if background > 0 {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done.load(Ordering::Acquire) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        match upload_result.lock().expect("result").take() {
            Some(Ok(mibps)) => mibps,
            other => panic!("upload or downloads: {other:?}"),
        }
    } else {
        f64::NAN
    };
    Measured {
        timed,
        latencies_ms,
        lost,
        background_mibps,
    }
}

/// The next echo round's output marker and input line, or `None` when the run is
/// over: the transfers beside the consoles (`background` bytes) ended, or (without
/// any) `samples` rounds were timed.
pub(crate) fn next_round(
    rounds: &mut usize,
    samples: usize,
    background: u64,
    background_done: &AtomicBool,
) -> Option<(String, String)> {
    let finished = if background > 0 {
        background_done.load(Ordering::Acquire)
    } else {
        *rounds >= samples
    };
    if finished {
        return None;
    }
    *rounds += 1;
    Some((format!("\nm{rounds}\r"), format!("echo m{rounds}\n")))
}

/// Starts uploading `len` generated bytes on the loop thread.
fn start_upload(
    handle: &ReactorHandle<()>,
    conn: &Connect,
    len: u64,
    done: &Arc<AtomicBool>,
    result: &Arc<Mutex<Option<Result<f64, String>>>>,
) {
    let (conn, done, result) = (conn.clone(), Arc::clone(done), Arc::clone(result));
    handle
        .execute(move |reactor, _| {
            let stream = volume_stream(&conn, UPLOAD_VOLUME, |vol, s| vol.upload(s, 0, len, 0));
            let started = Instant::now();
            let mut sent = 0;
            let t = transfer::send_all(move |buf| {
                let want = buf.len().min((len - sent) as usize);
                data::fill(sent, &mut buf[..want]);
                sent += want as u64;
                Ok(want)
            })
            .on_end(move |_, r| {
                let rate = r
                    .map(|stats| {
                        stats.data_bytes as f64 / MIB as f64 / started.elapsed().as_secs_f64()
                    })
                    .map_err(|e| e.to_string());
                finish(&result, &done, rate);
            });
            insert(reactor, stream, t);
        })
        .expect("reactor");
}

/// Starts `downloads.count` downloads on the loop thread, one start per loop turn
/// (as vol does); each checks what it receives. `done` once all ended, `result` their
/// rate together (or the first error).
fn start_downloads(
    handle: &ReactorHandle<()>,
    conn: &Connect,
    downloads: Downloads,
    done: &Arc<AtomicBool>,
    result: &Arc<Mutex<Option<Result<f64, String>>>>,
) {
    let started = Instant::now();
    let left = Arc::new(Mutex::new((downloads.count, None::<String>)));
    for k in 0..downloads.count {
        let (conn, done, result, left) = (
            conn.clone(),
            Arc::clone(done),
            Arc::clone(result),
            Arc::clone(&left),
        );
        let len = downloads.len;
        handle
            .execute(move |reactor, _| {
                let stream = volume_stream(&conn, &download_volume(k), |vol, s| {
                    vol.download(s, 0, len, 0)
                });
                let mut at = 0;
                let t = transfer::recv_all(move |buf| {
                    if !data::check(at, buf) {
                        return Err(std::io::Error::other(format!("bad data at {at}")));
                    }
                    at += buf.len() as u64;
                    Ok(())
                })
                .on_end(move |_, r| {
                    let mut left = left.lock().expect("downloads left");
                    left.0 -= 1;
                    match r {
                        Ok(stats) if stats.data_bytes != len => {
                            left.1
                                .get_or_insert(format!("{k}: {} bytes", stats.data_bytes));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            left.1.get_or_insert(format!("{k}: {e}"));
                        }
                    }
                    if left.0 == 0 {
                        let mib = (downloads.count as u64 * len) as f64 / MIB as f64;
                        let rate = match left.1.take() {
                            None => Ok(mib / started.elapsed().as_secs_f64()),
                            Some(e) => Err(e),
                        };
                        finish(&result, &done, rate);
                    }
                });
                insert(reactor, stream, t);
            })
            .expect("reactor");
    }
}

/// A stream on volume `name` of the bench pool, started by `start` (upload or download).
fn volume_stream(
    conn: &Connect,
    name: &str,
    start: impl FnOnce(&StorageVol, &virt::stream::Stream) -> Result<(), virt::error::Error>,
) -> Stream {
    let pool = conn.lookup_storage_pool_by_name(POOL).expect("pool");
    let vol = pool
        .lookup_storage_vol_by_name(name)
        .unwrap_or_else(|e| panic!("volume {name}: {e}"));
    let mut stream = Stream::new(conn).expect("stream");
    stream
        .with_virt(|virt_stream| start(&vol, virt_stream))
        .unwrap_or_else(|e| panic!("start the transfer of {name}: {e}"));
    stream
}

fn insert(reactor: &mut Reactor<()>, stream: Stream, t: transfer::Transfer<()>) {
    let interest = t.interest();
    reactor
        .insert(stream, interest, t)
        .expect("insert a transfer");
}

/// Hands the transfers' rate (or error) to the user thread, whose rounds end then.
fn finish(
    result: &Mutex<Option<Result<f64, String>>>,
    done: &AtomicBool,
    rate: Result<f64, String>,
) {
    *result.lock().expect("result") = Some(rate);
    done.store(true, Ordering::Release);
}
