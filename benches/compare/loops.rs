//! Scenario 2: what one loop iteration costs with many idle registrations.
//!
//! Two watches play ping-pong over a socketpair: each iteration one of them reads
//! the byte the other wrote and writes it back, so every iteration dispatches exactly
//! one callback and a round trip takes two iterations. Around them sit N idle
//! registrations: watches on both ends of N/2 quiet socketpairs, or N disabled
//! timers. The loop is driven through `Reactor::run_once`, as in every other
//! scenario, pinned to one CPU. Figures: round trips per second and µs per
//! iteration (each the median of 10 ms windows); with `--callgrind`, instructions
//! per iteration as well (stable on a noisy machine).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt_reactor::{Interest, Reactor, Timer, Watch};

use crate::report::{figure, summary, Results};
use crate::{run_case, sys, Case, Figures, Loop, Opts, Params};

pub(crate) const S2_IDLE: &[usize] = &[0, 100, 1_000, 5_000, 10_000];
const S2_IDLE_QUICK: &[usize] = &[0, 1_000];
/// Iterations counted under callgrind (after as many unmeasured ones).
const CALLGRIND_ITERATIONS: u64 = 200;

pub(crate) fn s2_label(kind: &str, n: usize) -> String {
    format!("{n} idle {kind}")
}

pub(crate) fn scenario2(opts: &Opts, results: &mut Results) {
    let idle = if opts.quick { S2_IDLE_QUICK } else { S2_IDLE };
    let seconds = if opts.quick { 0.1 } else { 0.5 };
    for kind in ["watches", "timers"] {
        for &n in idle {
            run_case(
                Case::new(
                    "Scenario 2: per-iteration cost vs idle registrations",
                    s2_label(kind, n),
                    "pingpong",
                    vec![
                        format!("kind={kind}"),
                        format!("idle={n}"),
                        format!("seconds={seconds}"),
                    ],
                    vec![
                        figure("rtt", "round trips/s"),
                        figure("us_per_iter", "µs/iteration"),
                    ],
                    opts.runs,
                ),
                results,
            );
        }
    }
    run_case(
        Case::new(
            "Scenario 2: per-iteration cost vs idle registrations",
            "busy socket, 1 byte per callback".to_owned(),
            "busy",
            Vec::new(),
            vec![figure("dispatches", "dispatches/s")],
            opts.runs,
        ),
        results,
    );
    if opts.callgrind {
        callgrind(opts, results);
    }
}

/// Instructions per iteration under callgrind: one run each (the count hardly
/// varies), ping-pong only.
fn callgrind(opts: &Opts, results: &mut Results) {
    let cases: &[(&str, usize)] = if opts.quick {
        &[("watches", 0), ("watches", 1_000)]
    } else {
        &[
            ("watches", 0),
            ("watches", 1_000),
            ("watches", 10_000),
            ("timers", 10_000),
        ]
    };
    for &(kind, n) in cases {
        let mut per = [Vec::new(), Vec::new()];
        for (i, kind_loop) in [Loop::Ours, Loop::Default].into_iter().enumerate() {
            match callgrind_run(kind_loop, kind, n, &opts.out) {
                Ok(ir) => per[i].push(ir),
                Err(e) => {
                    eprintln!("compare: callgrind: {e}");
                    return;
                }
            }
        }
        let [ours, default] = per;
        results.add(
            "Scenario 2: per-iteration cost vs idle registrations",
            &s2_label(kind, n),
            figure("ir_per_iter", "instructions/iteration (callgrind)"),
            ours,
            default,
            Vec::new(),
        );
    }
}

fn callgrind_run(kind: Loop, what: &str, n: usize, out: &std::path::Path) -> Result<f64, String> {
    let file = out.join(format!("callgrind.{}.{what}-{n}", kind.name()));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg("--toggle-collect=*measured_iterations*")
        .arg("-q")
        .arg(std::env::current_exe().expect("own path"))
        .args(["--child", "pingpong"])
        .arg(format!("loop={}", kind.name()))
        .arg(format!("kind={what}"))
        .arg(format!("idle={n}"))
        .arg(format!("fixed={CALLGRIND_ITERATIONS}"))
        .output()
        .map_err(|e| format!("valgrind: {e}"))?;
    if !status.status.success() {
        return Err(format!(
            "valgrind failed: {}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    let total = crate::callgrind_total(&file)?;
    Ok(total / CALLGRIND_ITERATIONS as f64)
}

/// The child: ping-pong among idle registrations.
pub(crate) fn pingpong(p: &Params) -> Figures {
    sys::pin_to_current_cpu();
    let mut reactor = p.kind.reactor::<()>();
    let idle: usize = p.num("idle");
    let timers_wanted = p.str("kind") == "timers";
    let mut keep = Vec::new();
    let mut watches = Vec::new();
    let mut timers = Vec::new();
    if timers_wanted {
        for _ in 0..idle {
            timers.push(Timer::add(None, |_| {}).expect("idle timer"));
        }
    } else {
        for _ in 0..idle / 2 {
            let (a, b) = UnixStream::pair().expect("socketpair (raise `ulimit -n`?)");
            for end in [&a, &b] {
                watches.push(
                    Watch::add(end.as_raw_fd(), Interest::READABLE, |_, _, _| {})
                        .expect("idle watch"),
                );
            }
            keep.push((a, b));
        }
    }

    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    let round_trips = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&round_trips);
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    let mut a_end = a.try_clone().expect("clone");
    let _ping = Watch::add(fa, Interest::READABLE, move |_, _, _| {
        let mut byte = [0u8; 1];
        if a_end.read(&mut byte).unwrap_or(0) == 1 {
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = a_end.write(&byte);
        }
    })
    .expect("ping watch");
    let mut b_end = b.try_clone().expect("clone");
    let _pong = Watch::add(fb, Interest::READABLE, move |_, _, _| {
        let mut byte = [0u8; 1];
        if b_end.read(&mut byte).unwrap_or(0) == 1 {
            let _ = b_end.write(&byte);
        }
    })
    .expect("pong watch");
    (&b).write_all(b"x").expect("serve");

    if let Some(fixed) = p.get("fixed") {
        let n: u64 = fixed.parse().expect("iterations");
        for _ in 0..n {
            reactor.run_once(None, &mut ()).expect("iteration");
        }
        measured_iterations(&mut reactor, n);
        return vec![("iterations", n as f64)];
    }
    let seconds: f64 = p.num("seconds");
    for _ in 0..100 {
        reactor.run_once(None, &mut ()).expect("iteration"); // warm up
    }
    // Windows of at least WINDOW each; the run's figure is the median window, so
    // that a moment when the VM's host takes the CPU away does not set it.
    let limit = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut per_iteration, mut per_second) = (Vec::new(), Vec::new());
    while per_iteration.len() < MIN_WINDOWS || started.elapsed() < limit {
        let trips_before = round_trips.load(Ordering::Relaxed);
        let window_start = Instant::now();
        let mut iterations = 0u64;
        while iterations < 32 || window_start.elapsed() < WINDOW {
            for _ in 0..16 {
                reactor.run_once(None, &mut ()).expect("iteration");
            }
            iterations += 16;
        }
        let elapsed = window_start.elapsed().as_secs_f64();
        let trips = round_trips.load(Ordering::Relaxed) - trips_before;
        assert!(
            trips * 2 + 2 >= iterations,
            "each iteration dispatched a ping or a pong ({trips} round trips in {iterations} iterations)"
        );
        per_iteration.push(elapsed * 1e6 / iterations as f64);
        per_second.push(trips as f64 / elapsed);
    }
    drop((timers, watches, keep));
    vec![
        ("rtt", summary(&per_second).0),
        ("us_per_iter", summary(&per_iteration).0),
    ]
}

/// The length of one measuring window of the ping-pong, and the fewest windows.
const WINDOW: Duration = Duration::from_millis(10);
const MIN_WINDOWS: usize = 5;

/// The iterations callgrind counts (`--toggle-collect`).
#[inline(never)]
fn measured_iterations(reactor: &mut Reactor<()>, n: u64) {
    for _ in 0..n {
        reactor.run_once(None, &mut ()).expect("iteration");
    }
}

/// The child: level-triggered dispatch rate on one busy socketpair (one byte read
/// per callback, so every dispatch is a re-report).
pub(crate) fn busy(p: &Params) -> Figures {
    const BYTES: u64 = 1 << 20;
    let mut reactor = p.kind.reactor::<()>();
    let (mut writer, reader) = UnixStream::pair().expect("socketpair");
    reader.set_nonblocking(true).expect("nonblocking");
    writer.set_nonblocking(true).expect("nonblocking");
    let reads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&reads);
    let fd = reader.as_raw_fd();
    let _watch = Watch::add(fd, Interest::READABLE, move |_, _, _| {
        let mut byte = [0u8; 1];
        if (&reader).read(&mut byte).unwrap_or(0) == 1 {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
    .expect("watch");
    let mut written = 0;
    let chunk = vec![0u8; 64 * 1024];
    let started = Instant::now();
    while reads.load(Ordering::Relaxed) < BYTES {
        if written < BYTES {
            written += writer
                .write(&chunk[..(BYTES - written).min(chunk.len() as u64) as usize])
                .unwrap_or(0) as u64;
        }
        reactor.run_once(None, &mut ()).expect("iteration");
    }
    vec![("dispatches", BYTES as f64 / started.elapsed().as_secs_f64())]
}
