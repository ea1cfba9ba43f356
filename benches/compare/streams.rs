//! Scenarios 1 and 3: volume downloads and uploads through the reactor, every byte
//! checked.
//!
//! Both loops run the very same code: `virt_reactor::transfer::{recv_all,
//! send_all}` handlers (the ones `virt_reactor::volume` uses, with their default
//! budgets per readiness event: 256 KiB sent, 2 MiB received) inserted into a
//! `Reactor`, which is
//! `Reactor::register()` or `Reactor::register_default_loop()`. The data never touches a
//! file on the client: downloads are checked byte by byte as they arrive, uploads
//! are generated on the fly and the parent checks the volume files afterwards, so the
//! client's CPU is the loop, libvirt's client library and the check.

use std::io;
use std::time::{Duration, Instant};

use virt::storage_vol::StorageVol;
use virt_reactor::transfer;
use virt_reactor::{handler_fn, Flow, Interest, Stream};

use crate::report::{figure, Figure, Results};
use crate::setup::{Env, POOL, SOURCE};
use crate::{data, run_case, sys, Case, Figures, Opts, Params, MIB};

pub(crate) const S1_STREAMS: [usize; 4] = [1, 4, 16, 64];
/// The scenario 1 cases the async path (`loop=tokio`) runs too.
pub(crate) const TOKIO_STREAMS: [usize; 2] = [1, 16];
pub(crate) const S3_IDLE: &[usize] = &[0, 500, 1000, 2000];
const S3_IDLE_QUICK: &[usize] = &[0, 100];
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

const THROUGHPUT: [Figure; 9] = [
    figure("mibps", "aggregate MiB/s"),
    figure("cpu_per_gib", "client CPU s/GiB"),
    figure("daemon_cpu_per_gib", "daemon CPU s/GiB"),
    figure("iterations_per_gib", "loop iterations per GiB"),
    figure("maxrss_mib", "peak RSS MiB"),
    figure("sys_per_gib", "client system CPU s/GiB (part of it)"),
    figure("minflt_per_gib", "client minor page faults per GiB"),
    figure("nvcsw_per_gib", "client voluntary context switches per GiB"),
    figure(
        "nivcsw_per_gib",
        "client involuntary context switches per GiB",
    ),
];

/// Under `--perf-stat`, what perf counted in the measured part.
const PERF_FIGURES: [Figure; 6] = [
    figure("perf_task_clock_ms_per_gib", "perf: task clock ms per GiB"),
    figure("perf_syscalls_per_gib", "perf: client syscalls per GiB"),
    figure(
        "perf_context_switches_per_gib",
        "perf: client context switches per GiB",
    ),
    figure(
        "perf_page_faults_per_gib",
        "perf: client page faults per GiB",
    ),
    figure(
        "perf_instructions_per_gib",
        "perf: client instructions per GiB",
    ),
    figure("perf_cycles_per_gib", "perf: client cycles per GiB"),
];

fn throughput_figures() -> Vec<Figure> {
    let mut figures = THROUGHPUT.to_vec();
    if crate::PERF_STAT.load(std::sync::atomic::Ordering::Relaxed) {
        figures.extend(PERF_FIGURES);
    }
    figures
}

pub(crate) fn s1_label(dir: &str, n: usize, big: bool) -> String {
    if big {
        format!("{dir} {n}×64 MiB")
    } else {
        format!("{dir} N={n}")
    }
}

pub(crate) fn s3_label(k: usize) -> String {
    format!("K={k}")
}

/// Scenario 1: N concurrent streams, 512 MiB in all, both ways; and 64 × 64 MiB.
pub(crate) fn scenario1(opts: &Opts, env: &Env, results: &mut Results) {
    let total = env.source_size;
    let big_len = if opts.quick { 4 * MIB } else { 64 * MIB };
    let mut configs: Vec<(usize, u64, bool)> = S1_STREAMS
        .iter()
        .map(|&n| (n, total / n as u64, false))
        .collect();
    configs.push((64, big_len, true));
    for &(n, len, big) in &configs {
        for i in 0..n {
            env.create_volume(&upload_volume(n, big, i), len);
        }
    }
    let runs = |big: bool| {
        if big {
            opts.big_runs.unwrap_or(opts.runs)
        } else {
            opts.runs
        }
    };
    for dir in ["download", "upload"] {
        for &(n, len, big) in &configs {
            let args = |len: u64| {
                let mut args = vec![
                    format!("uri={}", env.uri),
                    format!("dir={dir}"),
                    format!("streams={n}"),
                    format!("len={len}"),
                    format!("source_size={}", env.source_size),
                    "idle=0".to_owned(),
                ];
                if dir == "upload" {
                    args.push(format!("prefix={}", upload_prefix(n, big)));
                }
                args
            };
            let upload = dir == "upload";
            let tokio = !big && TOKIO_STREAMS.contains(&n);
            run_case(
                Case {
                    // The async path at N=1 and N=16 (asyncpath::transfer).
                    tokio,
                    before: upload.then(|| {
                        Box::new(move || {
                            for i in 0..n {
                                env.clear_volume(&upload_volume(n, big, i));
                            }
                        }) as Box<dyn Fn()>
                    }),
                    after: upload.then(|| {
                        Box::new(move || {
                            for i in 0..n {
                                env.check_volume(&upload_volume(n, big, i), i as u64 * len, len)?;
                            }
                            Ok(())
                        }) as Box<dyn Fn() -> Result<(), String>>
                    }),
                    // Under callgrind (`--instructions`): 1/8 and 1/2 of the
                    // volume, so that 3/8 of it (192 MiB) is counted.
                    instructions: tokio.then(|| (args(len / 8), args(len / 2))),
                    ..Case::new(
                        "Scenario 1: throughput and client CPU",
                        s1_label(dir, n, big),
                        "transfer",
                        args(len),
                        throughput_figures(),
                        runs(big),
                    )
                },
                results,
            );
        }
    }
}

/// Scenario 3: one download of the whole source volume while K other streams are
/// open and idle.
pub(crate) fn scenario3(opts: &Opts, env: &Env, results: &mut Results) {
    let ks = if opts.quick { S3_IDLE_QUICK } else { S3_IDLE };
    for &k in ks {
        run_case(
            Case::new(
                "Scenario 3: one download among K idle streams",
                s3_label(k),
                "transfer",
                vec![
                    format!("uri={}", env.uri),
                    "dir=download".to_owned(),
                    "streams=1".to_owned(),
                    format!("len={}", env.source_size),
                    format!("source_size={}", env.source_size),
                    format!("idle={k}"),
                ],
                THROUGHPUT[..4].to_vec(),
                opts.runs,
            ),
            results,
        );
    }
}

fn upload_prefix(n: usize, big: bool) -> String {
    if big {
        format!("big{n}")
    } else {
        format!("up{n}")
    }
}

fn upload_volume(n: usize, big: bool, i: usize) -> String {
    format!("{}-{i}", upload_prefix(n, big))
}

/// Opens `count` idle streams into the reactor: uploads that send nothing, waiting
/// for READABLE, which never comes. Each is a remote stream with its (disabled)
/// event timer in the loop, like any stream between two bursts.
pub(crate) fn open_idle_streams<S>(
    reactor: &mut virt_reactor::Reactor<S>,
    conn: &virt::connect::Connect,
    count: usize,
) {
    if count == 0 {
        return;
    }
    let pool = conn.lookup_storage_pool_by_name(POOL).expect("pool");
    let vol = pool
        .lookup_storage_vol_by_name("idle")
        .expect("idle volume");
    for i in 0..count {
        let mut stream = Stream::new(conn).expect("stream");
        stream
            .with_virt(|virt_stream| vol.upload(virt_stream, 0, MIB, 0))
            .unwrap_or_else(|e| panic!("idle upload {i}: {e}"));
        reactor
            .insert(
                stream,
                Interest::READABLE,
                handler_fn(|_: &mut S, _, _| Flow::Continue),
            )
            .expect("insert an idle stream");
    }
}

/// How each transfer ended: its data bytes, or the error (the state the transfers'
/// `on_end` callbacks get).
type Outcomes = Vec<Option<Result<u64, String>>>;

/// The child: `streams` concurrent transfers of `len` bytes each, `idle` idle streams
/// beside them.
pub(crate) fn transfer(p: &Params) -> Figures {
    let mut reactor = p.kind.reactor::<Outcomes>();
    let conn = p.kind.connect(p.str("uri"));
    let (n, len, idle): (usize, u64, usize) = (p.num("streams"), p.num("len"), p.num("idle"));
    let source_size: u64 = p.num("source_size");
    let download = p.str("dir") == "download";
    let pool = conn.lookup_storage_pool_by_name(POOL).expect("pool");
    let mut outcomes: Outcomes = vec![None; n];
    open_idle_streams(&mut reactor, &conn, idle);
    // Let the idle streams' setup traffic settle.
    for _ in 0..10 {
        reactor
            .run_once(Some(Duration::ZERO), &mut outcomes)
            .expect("iteration");
    }
    let volumes: Vec<StorageVol> = if download {
        vec![pool
            .lookup_storage_vol_by_name(SOURCE)
            .expect("source volume")]
    } else {
        (0..n)
            .map(|i| {
                let name = format!("{}-{i}", p.str("prefix"));
                pool.lookup_storage_vol_by_name(&name)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            })
            .collect()
    };
    sys::perf_counting(true);
    let usage_before = sys::Usage::now();
    let started = Instant::now();
    for i in 0..n {
        let mut stream = Stream::new(&conn).expect("stream");
        let base = i as u64 * len;
        let t = if download {
            let offset = base % source_size;
            stream
                .with_virt(|virt_stream| volumes[0].download(virt_stream, offset, len, 0))
                .expect("virStorageVolDownload");
            let mut position = offset;
            transfer::recv_all(move |bytes| {
                if !data::check(position, bytes) {
                    return Err(io::Error::other(format!("wrong bytes at {position}")));
                }
                position += bytes.len() as u64;
                Ok(())
            })
        } else {
            stream
                .with_virt(|virt_stream| volumes[i].upload(virt_stream, 0, len, 0))
                .expect("virStorageVolUpload");
            let mut sent = 0;
            transfer::send_all(move |buf| {
                let want = buf.len().min((len - sent) as usize);
                data::fill(base + sent, &mut buf[..want]);
                sent += want as u64;
                Ok(want)
            })
        };
        let t = t.on_end(move |outcomes: &mut Outcomes, result| {
            outcomes[i] = Some(
                result
                    .map(|stats| stats.data_bytes)
                    .map_err(|e| e.to_string()),
            );
        });
        let interest = t.interest();
        reactor.insert(stream, interest, t).expect("insert");
    }
    // Counts the checks of the condition, as the figure always has.
    let mut iterations = 0u64;
    loop {
        iterations += 1;
        if reactor.len() <= idle {
            break;
        }
        reactor
            .run_once(None, &mut outcomes)
            .expect("run the transfers");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let usage = sys::Usage::now() - usage_before;
    sys::perf_counting(false);

    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Some(Ok(bytes)) if *bytes == len => {}
            other => panic!("transfer {i}: {other:?} (expected {len} bytes)"),
        }
    }
    let bytes = n as f64 * len as f64;
    let mut figures = transfer_figures(bytes, elapsed, usage);
    figures.push(("iterations_per_gib", iterations as f64 / (bytes / GIB)));
    drop((volumes, pool, conn));
    let _ = reactor.shutdown(Duration::from_secs(5), &mut outcomes);
    figures
}

/// A transfer run's figures: throughput, client CPU per GiB, peak RSS, volume, and
/// what `getrusage` counted per GiB (page faults, context switches).
pub(crate) fn transfer_figures(bytes: f64, elapsed: f64, usage: sys::Usage) -> Figures {
    let gib = bytes / GIB;
    vec![
        ("mibps", bytes / MIB as f64 / elapsed),
        ("cpu_per_gib", usage.cpu.as_secs_f64() / gib),
        ("sys_per_gib", usage.sys.as_secs_f64() / gib),
        ("maxrss_mib", sys::max_rss_kib() as f64 / 1024.0),
        ("gib", gib),
        ("minflt_per_gib", usage.minflt as f64 / gib),
        ("nvcsw_per_gib", usage.nvcsw as f64 / gib),
        ("nivcsw_per_gib", usage.nivcsw as f64 / gib),
    ]
}
