//! Scenario 5: memory per idle stream, per idle watch and per active download.
//!
//! A child registers a few of each first (so that one-time allocations are in the
//! baseline), reads the counters, registers K more, runs a few iterations and reads
//! them again. Active downloads: K downloads of 32 MiB at once, the loop turned
//! after each start as `vol` does, and the counters' peak while all K run (RSS:
//! its high-water mark). Three counters: the live Rust heap (virt-reactor's own structures:
//! the slab slot, the handler, our engine's table entries; the counting allocator
//! in `sys`), every live malloc'd byte (mallinfo2: libvirt's objects too), and RSS.
//! Peak RSS during scenario 1 is in that scenario's table.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use virt::connect::Connect;
use virt_reactor::{transfer, Interest, Reactor, Stream, Watch};

use crate::report::{figure, Results};
use crate::setup::{Env, POOL, SOURCE};
use crate::streams::open_idle_streams;
use crate::{run_case, sys, Case, Figures, Opts, Params, MIB};

pub(crate) fn scenario5(opts: &Opts, env: &Env, results: &mut Results) {
    let cases = [
        (
            "idle streams",
            "streams",
            if opts.quick { 100 } else { 1_000 },
        ),
        (
            "idle watches",
            "watches",
            if opts.quick { 1_000 } else { 10_000 },
        ),
        ("active downloads", "downloads", 16),
    ];
    for (label, what, count) in cases {
        run_case(
            Case::new(
                "Scenario 5: memory per idle stream and watch",
                label.to_owned(),
                "memory",
                vec![
                    format!("uri={}", env.uri),
                    format!("what={what}"),
                    format!("count={count}"),
                    format!("len={}", (32 * MIB).min(env.source_size)),
                ],
                vec![
                    figure("rust_per", "Rust heap bytes each"),
                    figure("heap_per", "malloc'd bytes each (all)"),
                    figure("rss_per", "RSS bytes each"),
                ],
                opts.runs.min(3),
            ),
            results,
        );
    }
}

fn settle(reactor: &mut Reactor<()>) {
    for _ in 0..10 {
        reactor
            .run_once(Some(Duration::ZERO), &mut ())
            .expect("iteration");
    }
}

fn counters() -> [i64; 3] {
    [sys::rust_heap(), sys::malloc_heap(), sys::rss_bytes()]
}

pub(crate) fn measure(p: &Params) -> Figures {
    let mut reactor = p.kind.reactor::<()>();
    let count: usize = p.num("count");
    let (before, after) = match p.str("what") {
        "streams" => {
            let conn = p.kind.connect(p.str("uri"));
            open_idle_streams(&mut reactor, &conn, 16);
            settle(&mut reactor);
            let before = counters();
            open_idle_streams(&mut reactor, &conn, count);
            settle(&mut reactor);
            let after = counters();
            drop(conn);
            (before, after)
        }
        "downloads" => {
            let conn = p.kind.connect(p.str("uri"));
            // Idle streams keep what one stream of the connection brings (the
            // sender thread) in the baseline.
            open_idle_streams(&mut reactor, &conn, 16);
            settle(&mut reactor);
            let before = counters();
            let peak = active_downloads(&mut reactor, &conn, count, p.num("len"));
            drop(conn);
            (before, peak)
        }
        "watches" => {
            let mut pairs = Vec::with_capacity(count / 2 + 8);
            let mut watches = Vec::with_capacity(count + 16);
            let mut add = |pairs: &mut Vec<(UnixStream, UnixStream)>, n: usize| {
                for _ in 0..n / 2 {
                    let (a, b) = UnixStream::pair().expect("socketpair");
                    for end in [&a, &b] {
                        watches.push(
                            Watch::add(end.as_raw_fd(), Interest::READABLE, |_, _, _| {})
                                .expect("watch"),
                        );
                    }
                    pairs.push((a, b));
                }
            };
            add(&mut pairs, 16);
            settle(&mut reactor);
            let before = counters();
            add(&mut pairs, count);
            settle(&mut reactor);
            let after = counters();
            drop(watches);
            (before, after)
        }
        other => panic!("unknown memory case {other:?}"),
    };
    let per = |i: usize| (after[i] - before[i]) as f64 / count as f64;
    vec![
        ("rust_per", per(0)),
        ("heap_per", per(1)),
        ("rss_per", per(2)),
    ]
}

/// Runs `count` downloads of `len` bytes of the source volume at once, data
/// discarded; the heaps' peaks between loop turns while all of them are active,
/// and the peak RSS (the kernel's high-water mark, which also sees the peaks inside
/// a turn, when libvirt has read packets and the handlers have not yet taken them).
fn active_downloads(reactor: &mut Reactor<()>, conn: &Connect, count: usize, len: u64) -> [i64; 3] {
    let idle = reactor.len();
    let pool = conn.lookup_storage_pool_by_name(POOL).expect("pool");
    let vol = pool
        .lookup_storage_vol_by_name(SOURCE)
        .expect("source volume");
    for _ in 0..count {
        let mut stream = Stream::new(conn).expect("stream");
        stream
            .with_virt(|virt_stream| vol.download(virt_stream, 0, len, 0))
            .expect("virStorageVolDownload");
        let t = transfer::recv_all(|_| Ok(()));
        let interest = t.interest();
        reactor.insert(stream, interest, t).expect("insert");
        // As `vol`: what the start let libvirt queue is taken before the next.
        reactor
            .run_once(Some(Duration::ZERO), &mut ())
            .expect("iteration");
    }
    let mut peak = counters();
    while reactor.len() > idle {
        if reactor.len() == idle + count {
            for (peak, now) in peak.iter_mut().zip(counters()) {
                *peak = (*peak).max(now);
            }
        }
        reactor.run_once(None, &mut ()).expect("run the downloads");
    }
    peak[2] = sys::max_rss_kib() as i64 * 1024;
    peak
}
