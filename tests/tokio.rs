//! The loop driven by a tokio runtime: volume transfers and raw streams as
//! `AsyncRead`/`AsyncBufRead`/`AsyncWrite`, against a private libvirtd with a real `dir` pool.
//!
//! Each test registers the process-wide event loop itself, so run them one process
//! each (cargo-nextest). The same binary also drives the loop from a thread of its
//! own, without tokio ([`the_loop_runs_on_its_own_thread_in_the_same_binary`]).
//!
//! The main tests run on both a `current_thread` runtime and a `multi_thread` one
//! with two workers ([`on_both_runtimes`]).

mod support;

use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use support::daemon::PrivateDaemon;
use support::pool::{
    self, allocated, assert_sparse_stats, data_extents, file_is, pattern, same_content,
    sparse_file, sparse_source, DirPool, KIB, MIB,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout};
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt_reactor::tokio::{AsyncStream, Handle};
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, VolumeRange};
use virt_reactor::{DrainReport, Error, LifecycleKind, Reactor, Received, Stream};

/// How many transfers run at once in the concurrency tests.
const CONCURRENT: usize = 64;
/// Deadline of one batch of transfers, or of one long transfer.
const BATCH_LIMIT: Duration = Duration::from_secs(60);
/// How long the driver may take to stop and drain at the end of a test.
const DRIVER_LIMIT: Duration = Duration::from_secs(10);
/// The bound: after `kill -9`, every pending read and write has failed
/// within this time.
const FAIL_WITHIN: Duration = Duration::from_secs(2);
/// How long one lifecycle event may take (the first define also probes QEMU).
const EVENT_LIMIT: Duration = Duration::from_secs(30);
/// How long fd count and slab size may take to come back after drops.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Generates, for each `body("pool") => current, multi;`, a `current_thread` and a
/// `multi_thread` (2 workers) test that run `body` on a [`Bed`] with a pool named
/// `pool`, then finish the bed.
macro_rules! on_both_runtimes {
    ($($body:ident($pool:literal) => $current:ident, $multi:ident;)*) => {$(
        #[tokio::test(flavor = "current_thread")]
        async fn $current() {
            Bed::run($pool, async |bed| $body(bed).await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $multi() {
            Bed::run($pool, async |bed| $body(bed).await).await;
        }
    )*};
}

on_both_runtimes! {
    concurrent_downloads_arrive_intact("downloads") =>
        sixty_four_concurrent_async_downloads_arrive_intact,
        sixty_four_concurrent_async_downloads_arrive_intact_multi_thread;
    concurrent_uploads_arrive_intact("uploads") =>
        sixty_four_concurrent_async_uploads_arrive_intact,
        sixty_four_concurrent_async_uploads_arrive_intact_multi_thread;
    sparse_round_trip_keeps_its_holes("sparse") =>
        a_sparse_async_round_trip_keeps_its_holes,
        a_sparse_async_round_trip_keeps_its_holes_multi_thread;
    killing_the_daemon_fails_pending_reads_and_writes("loss") =>
        kill_of_the_daemon_fails_every_pending_read_and_write_within_2s,
        kill_of_the_daemon_fails_every_pending_read_and_write_within_2s_multi_thread;
    lifecycle_events_arrive_as_a_stream("events") =>
        lifecycle_events_arrive_as_a_futures_stream,
        lifecycle_events_arrive_as_a_futures_stream_multi_thread;
    dropped_futures_free_everything("drops") =>
        futures_dropped_mid_transfer_return_fds_and_slab_to_the_start,
        futures_dropped_mid_transfer_return_fds_and_slab_to_the_start_multi_thread;
    dropped_read_futures_lose_no_byte("cancel-read") =>
        dropped_read_futures_lose_no_byte_current_thread,
        dropped_read_futures_lose_no_byte_multi_thread;
    dropped_write_futures_lose_no_byte("cancel-write") =>
        dropped_write_futures_lose_no_byte_current_thread,
        dropped_write_futures_lose_no_byte_multi_thread;
}

/// A test's world: the driver running as a task, a private daemon with a `dir`
/// pool, a connection opened after the registration, and a directory for files.
struct Bed {
    handle: Handle,
    driver: JoinHandle<virt_reactor::Result<DrainReport>>,
    pool: DirPool,
    conn: Connect,
    out: PathBuf,
    daemon: PrivateDaemon,
}

impl Bed {
    /// Registers the loop (once per process), spawns its driver, starts a daemon
    /// and a pool named `pool`.
    async fn start(pool: &str) -> Bed {
        virt::error::clear_error_callback();
        let (handle, driver) = virt_reactor::tokio::register().expect("register the loop");
        let driver = tokio::spawn(driver.run());
        let daemon = PrivateDaemon::start().expect("start a private libvirtd");
        let conn = {
            let uri = daemon.uri("qemu");
            handle
                .blocking(move || virt_reactor::connect(&uri))
                .await
                .expect("blocking pool")
                .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log_tail(30)))
        };
        let pool = DirPool::create(&daemon, &conn, pool);
        let out = daemon.root().join("out");
        std::fs::create_dir(&out).expect("create the output directory");
        Bed {
            handle,
            driver,
            pool,
            conn,
            out,
            daemon,
        }
    }

    /// Runs `body` on a new bed with a pool named `pool`, then finishes the bed
    /// (what `body` held is dropped by then).
    async fn run(pool: &str, body: impl AsyncFnOnce(&mut Bed)) {
        let mut bed = Bed::start(pool).await;
        body(&mut bed).await;
        bed.finish().await;
    }

    /// `out/name`.
    fn out(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Streams in the reactor right now.
    async fn streams(&self) -> usize {
        reactor_len(&self.handle).await
    }

    /// Checks that the `raw` streams just opened are all in the reactor at once.
    async fn assert_at_once(&self, raw: usize) {
        let running = self.streams().await;
        assert!(
            running >= raw,
            "the {raw} raw streams are all in the reactor at once (saw {running})"
        );
    }

    /// Closes the connection (drop every `StorageVol` and stream first), stops the
    /// driver and checks that it drained: libvirt removed all it had registered.
    async fn finish(self) {
        let Bed {
            handle,
            driver,
            pool,
            conn,
            daemon,
            ..
        } = self;
        drop(pool);
        drop(conn);
        handle.stop();
        timeout(DRIVER_LIMIT, driver)
            .await
            .expect("the driver ends")
            .expect("driver task")
            .expect("the driver stops and drains cleanly");
        drop(daemon);
    }
}

async fn reactor_len(handle: &Handle) -> usize {
    handle
        .with_reactor(|reactor| reactor.len())
        .await
        .expect("the driver runs")
}

/// Volume sizes between 2 and 4 MiB, none a multiple of libvirt's 256 KiB packets.
fn size_of(i: usize) -> usize {
    (2 * MIB + (i as u64) * 32 * KIB + 4099 * i as u64 % 4096 + 1) as usize
}

/// A new stream on `conn` attached by `attach` (on the blocking pool), handed to
/// the driver as an `AsyncStream`.
async fn open_stream(
    handle: &Handle,
    conn: &Connect,
    attach: impl FnOnce(&virt::stream::Stream) -> Result<(), virt::error::Error> + Send + 'static,
) -> AsyncStream {
    let conn = conn.clone();
    let stream = handle
        .blocking(move || {
            let mut stream = Stream::new(&conn)?;
            stream.with_virt(attach)?;
            Ok::<_, Error>(stream)
        })
        .await
        .expect("blocking pool")
        .expect("open and attach a stream");
    handle
        .stream(stream)
        .await
        .expect("hand the stream to the driver")
}

/// Which way a volume stream goes.
#[derive(Clone, Copy)]
enum Way {
    Download,
    Upload,
}

impl Bed {
    /// An `AsyncStream` moving `length` bytes of `vol` from its start, `way`.
    async fn volume_stream(
        &self,
        vol: &StorageVol,
        way: Way,
        length: u64,
        sparse: bool,
    ) -> AsyncStream {
        let vol = vol.clone();
        open_stream(&self.handle, &self.conn, move |s| match way {
            Way::Download => {
                let flags = if sparse {
                    virt::sys::VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
                } else {
                    0
                };
                vol.download(s, 0, length, flags)
            }
            Way::Upload => {
                let flags = if sparse {
                    virt::sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
                } else {
                    0
                };
                vol.upload(s, 0, length, flags)
            }
        })
        .await
    }
}

/// `Handle::download` of `vol` into `file`, or `Handle::upload` of `file` into
/// `vol`, as `way` says.
async fn transfer(
    handle: &Handle,
    way: Way,
    vol: &StorageVol,
    file: &Path,
    range: VolumeRange,
    progress: impl FnMut(TransferStats) + Send + 'static,
) -> virt_reactor::Result<TransferStats> {
    let (vol, file) = (vol.clone(), file.to_owned());
    match way {
        Way::Download => handle.download(vol, file, range, progress).await,
        Way::Upload => handle.upload(vol, file, range, progress).await,
    }
}

/// Waits for every task of `set` within `limit`, re-raising a task's panic.
async fn join_all<T: 'static>(set: &mut JoinSet<T>, limit: Duration, what: &str) -> Vec<T> {
    let all = async {
        let mut results = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(result) => results.push(result),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("{what}: task failed: {e}"),
            }
        }
        results
    };
    timeout(limit, all)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// The latest progress a transfer reported, and a callback that records it.
fn progress_probe() -> (Arc<AtomicU64>, impl FnMut(TransferStats) + Send + 'static) {
    let position = Arc::new(AtomicU64::new(0));
    let probe = Arc::clone(&position);
    (position, move |stats: TransferStats| {
        probe.store(stats.position(), Ordering::Relaxed);
    })
}

// ---------------------------------------------------------------------------------
// Smoke test
// ---------------------------------------------------------------------------------

/// A volume read through an `AsyncStream` arrives byte for byte, and writing one
/// through another lands byte for byte.
#[tokio::test(flavor = "current_thread")]
async fn a_volume_round_trips_through_async_streams() {
    let bed = Bed::start("tokio").await;
    let data = pattern(7, (3 * MIB + 123) as usize);
    let source = bed.pool.volume_with("source", &data);
    let target = bed.pool.create_volume("target", data.len() as u64);

    let mut download = bed
        .volume_stream(&source, Way::Download, data.len() as u64, false)
        .await;
    let mut got = Vec::new();
    download
        .read_to_end(&mut got)
        .await
        .expect("read to the end");
    assert!(
        got == data,
        "downloaded {} bytes, expected {}",
        got.len(),
        data.len()
    );

    // Again, through AsyncBufRead mixed with AsyncRead: a read that ends inside a
    // chunk, chunks lent in place and consumed in parts, reads from a lent chunk.
    let mut again = bed
        .volume_stream(&source, Way::Download, data.len() as u64, false)
        .await;
    let mut got = vec![0u8; 1000];
    let n = again.read(&mut got).await.expect("read");
    got.truncate(n);
    let mut turn = 0;
    loop {
        let chunk = again.fill_buf().await.expect("fill_buf");
        if chunk.is_empty() {
            break;
        }
        let take = if turn % 2 == 0 {
            chunk.len()
        } else {
            chunk.len().min(4321)
        };
        got.extend_from_slice(&chunk[..take]);
        again.consume(take);
        if turn % 3 == 2 {
            let mut buf = [0u8; 777];
            let n = again.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        turn += 1;
    }
    assert!(
        got == data,
        "downloaded {} bytes through fill_buf, expected {}",
        got.len(),
        data.len()
    );
    drop(again);

    let mut upload = bed
        .volume_stream(&target, Way::Upload, data.len() as u64, false)
        .await;
    upload.write_all(&data).await.expect("write");
    upload.shutdown().await.expect("finish");
    assert!(
        file_is(&bed.pool.path_of("target"), &data),
        "uploaded bytes differ"
    );

    let stats = bed
        .handle
        .download(
            source.clone(),
            bed.out("copy"),
            VolumeRange::default(),
            |_| {},
        )
        .await
        .expect("download helper");
    assert_eq!(stats.data_bytes, data.len() as u64);

    drop((download, upload, source, target));
    bed.finish().await;
}

// ---------------------------------------------------------------------------------
// 1. 64 concurrent downloads and uploads
// ---------------------------------------------------------------------------------

/// [`CONCURRENT`] downloads at once, each of a different size: half through
/// `Handle::download` into files, half read from raw `AsyncStream`s, all in one
/// `JoinSet`. The raw streams are all open (in the reactor) before any is read, so
/// at least half run at once whatever the scheduling. Each arrives byte for byte;
/// the helper's progress ends at the volume's size.
async fn concurrent_downloads_arrive_intact(bed: &Bed) {
    let mut set = JoinSet::new();
    let mut raw = Vec::new();
    for i in 0..CONCURRENT {
        let data = pattern(1000 + i as u64, size_of(i));
        let vol = bed.pool.volume_with(&format!("vol{i}"), &data);
        if i % 2 == 0 {
            let handle = bed.handle.clone();
            let file = bed.out(&format!("file{i}"));
            set.spawn(async move {
                let (position, progress) = progress_probe();
                let stats = handle
                    .download(vol, file.clone(), VolumeRange::default(), progress)
                    .await
                    .unwrap_or_else(|e| panic!("download {i}: {e}"));
                assert_eq!(stats.data_bytes, data.len() as u64, "download {i}: bytes");
                assert_eq!((stats.holes, stats.hole_bytes), (0, 0), "download {i}");
                assert_eq!(
                    position.load(Ordering::Relaxed),
                    data.len() as u64,
                    "download {i}: last progress"
                );
                assert!(file_is(&file, &data), "download {i}: file content differs");
                assert!(pool::parts_of(&file).is_empty(), "download {i}: .part left");
            });
        } else {
            let stream = bed
                .volume_stream(&vol, Way::Download, data.len() as u64, false)
                .await;
            raw.push((i, stream, data, vol));
        }
    }
    // Unread, a raw stream stops at the driver's buffer limit: it cannot end yet.
    bed.assert_at_once(raw.len()).await;
    for (i, mut stream, data, vol) in raw {
        set.spawn(async move {
            let mut got = Vec::with_capacity(data.len());
            stream
                .read_to_end(&mut got)
                .await
                .unwrap_or_else(|e| panic!("raw download {i}: {e}"));
            assert_eq!(got.len(), data.len(), "raw download {i}: length");
            assert!(got == data, "raw download {i}: content differs");
            drop(vol);
        });
    }
    join_all(&mut set, BATCH_LIMIT, "concurrent downloads").await;
    assert_eq!(bed.streams().await, 0, "every stream has left the reactor");
}

/// [`CONCURRENT`] uploads at once: half through `Handle::upload` from files, half
/// written into raw `AsyncStream`s (`write_all`, or `write_owned` in pieces of
/// 100 KiB to 400 KiB, then `shutdown`), all in one
/// `JoinSet`; the raw streams are all open before any is written. Every volume ends
/// up holding exactly its bytes.
async fn concurrent_uploads_arrive_intact(bed: &Bed) {
    let mut set = JoinSet::new();
    let mut expected = Vec::new();
    let mut raw = Vec::new();
    for i in 0..CONCURRENT {
        let data = pattern(2000 + i as u64, size_of(i));
        let vol = bed
            .pool
            .create_volume(&format!("vol{i}"), data.len() as u64);
        if i % 2 == 0 {
            let file = bed.out(&format!("file{i}"));
            std::fs::write(&file, &data).expect("write a source file");
            let handle = bed.handle.clone();
            let length = data.len() as u64;
            set.spawn(async move {
                let (position, progress) = progress_probe();
                let stats = handle
                    .upload(vol, file, VolumeRange::default(), progress)
                    .await
                    .unwrap_or_else(|e| panic!("upload {i}: {e}"));
                assert_eq!(stats.data_bytes, length, "upload {i}: bytes");
                assert_eq!(position.load(Ordering::Relaxed), length, "upload {i}");
            });
        } else {
            let stream = bed
                .volume_stream(&vol, Way::Upload, data.len() as u64, false)
                .await;
            raw.push((i, stream, data.clone(), vol));
        }
        expected.push(data);
    }
    // Not written to, a raw stream cannot end yet.
    bed.assert_at_once(raw.len()).await;
    for (i, mut stream, data, vol) in raw {
        set.spawn(async move {
            if i % 4 == 1 {
                stream
                    .write_all(&data)
                    .await
                    .unwrap_or_else(|e| panic!("raw upload {i}: write: {e}"));
            } else {
                // Whole buffers, some longer than a packet; each one handed back
                // is filled again.
                let mut buf = Vec::new();
                let mut sent = 0;
                while sent < data.len() {
                    let end = data
                        .len()
                        .min(sent + (100 + 37 * (sent % 9)) * KIB as usize);
                    buf.clear();
                    buf.extend_from_slice(&data[sent..end]);
                    buf = stream
                        .write_owned(buf)
                        .await
                        .unwrap_or_else(|e| panic!("raw upload {i}: write_owned: {e}"));
                    sent = end;
                }
            }
            stream
                .shutdown()
                .await
                .unwrap_or_else(|e| panic!("raw upload {i}: finish: {e}"));
            drop(vol);
        });
    }
    join_all(&mut set, BATCH_LIMIT, "concurrent uploads").await;
    for (i, data) in expected.iter().enumerate() {
        assert!(
            file_is(&bed.pool.path_of(&format!("vol{i}")), data),
            "upload {i}: the volume's content differs"
        );
    }
    assert_eq!(bed.streams().await, 0, "every stream has left the reactor");
}

// ---------------------------------------------------------------------------------
// 2. A sparse round trip keeps its holes
// ---------------------------------------------------------------------------------

/// The sparse source: 64 MiB with data at both ends and in the middle, so that each
/// hole is bounded by data and the length is carried by data.
const SPARSE_LEN: u64 = 64 * MIB;

fn sparse_layout() -> [(u64, u64); 3] {
    [
        (0, MIB),
        (20 * MIB, 2 * MIB + 12 * KIB),
        (SPARSE_LEN - MIB, MIB),
    ]
}

/// Checks that `copy` is `source` byte for byte, with holes where `layout` has
/// none of its data, occupying about its data.
fn assert_sparse_copy(what: &str, copy: &Path, source: &Path, layout: &[(u64, u64)], data: u64) {
    assert_eq!(
        std::fs::metadata(copy).expect("stat the copy").len(),
        SPARSE_LEN,
        "{what}: length"
    );
    assert_eq!(data_extents(copy), layout, "{what}: holes stayed holes");
    let used = allocated(copy);
    assert!(
        (data..=data + MIB).contains(&used),
        "{what}: occupies about its data ({data} bytes), not {SPARSE_LEN}: {used} bytes"
    );
    assert!(same_content(copy, source), "{what}: content differs");
}

/// Sparse round trips through the async path, both ways:
/// - raw streams: the source's extents written with `write_all` and its holes with
///   `write_hole` into a sparse upload; read back with `read_sparse` from a sparse
///   download into a file written with seeks;
/// - the helpers: `Handle::upload` and `Handle::download` with `sparse: true`.
///
/// Each volume and each copy has the source's data extents and holes, and the same
/// bytes; exactly two holes travel each way.
async fn sparse_round_trip_keeps_its_holes(bed: &Bed) {
    let source = bed.out("source.img");
    let layout = sparse_layout();
    let (data_len, hole_len) = sparse_source(&source, SPARSE_LEN, &layout);

    // Raw streams: upload with write_hole.
    let raw_vol = bed.pool.create_volume("raw.img", SPARSE_LEN);
    let mut upload = bed
        .volume_stream(&raw_vol, Way::Upload, SPARSE_LEN, true)
        .await;
    let mut at = 0;
    let mut holes_sent = 0;
    for &(offset, len) in &layout {
        if offset > at {
            upload.write_hole(offset - at).await.expect("write a hole");
            holes_sent += 1;
        }
        let bytes = pool::read_range(&source, offset, len);
        upload.write_all(&bytes).await.expect("write data");
        at = offset + len;
    }
    assert_eq!(at, SPARSE_LEN, "the layout ends with data");
    upload.shutdown().await.expect("finish the sparse upload");
    drop(upload);
    assert_eq!(holes_sent, 2);
    let raw_file = bed.pool.path_of("raw.img");
    assert_eq!(
        data_extents(&raw_file),
        layout,
        "raw upload: the volume got data where it belongs and holes elsewhere"
    );
    assert!(
        allocated(&raw_file) <= data_len + MIB,
        "raw upload: the volume stays sparse ({} bytes allocated)",
        allocated(&raw_file)
    );

    // Raw streams: download with read_sparse, into a file written with seeks.
    let mut download = bed
        .volume_stream(&raw_vol, Way::Download, SPARSE_LEN, true)
        .await;
    let copy = bed.out("raw-copy.img");
    let mut file = std::fs::File::create(&copy).expect("create the copy");
    let mut buf = vec![0; 256 * KIB as usize];
    let (mut data_got, mut holes_got, mut hole_bytes_got) = (0, 0, 0);
    loop {
        match download.read_sparse(&mut buf).await.expect("read_sparse") {
            Received::Data(0) => break,
            Received::Data(n) => {
                file.write_all(&buf[..n]).expect("write to the copy");
                data_got += n as u64;
            }
            Received::Hole(length) => {
                file.seek(SeekFrom::Current(length as i64))
                    .expect("seek over a hole");
                holes_got += 1;
                hole_bytes_got += length;
            }
        }
    }
    let end = file.stream_position().expect("position");
    file.set_len(end).expect("set the copy's length");
    drop(file);
    drop(download);
    assert_eq!(
        (data_got, holes_got, hole_bytes_got),
        (data_len, 2, hole_len),
        "raw download: data bytes, holes, hole bytes"
    );
    assert_sparse_copy("raw download", &copy, &source, &layout, data_len);

    // The helpers.
    let sparse = VolumeRange {
        sparse: true,
        ..VolumeRange::default()
    };
    let helper_vol = bed.pool.create_volume("helper.img", SPARSE_LEN);
    let helper_copy = bed.out("helper-copy.img");
    // The upload of the source, then the download of what it wrote.
    for way in [Way::Upload, Way::Download] {
        let (what, file) = match way {
            Way::Upload => ("upload helper", &source),
            Way::Download => ("download helper", &helper_copy),
        };
        let stats = transfer(&bed.handle, way, &helper_vol, file, sparse, |_| {})
            .await
            .unwrap_or_else(|e| panic!("sparse {what}: {e:?}"));
        assert_sparse_stats(what, &stats, data_len, hole_len);
        match way {
            Way::Upload => {
                let helper_file = bed.pool.path_of("helper.img");
                assert_eq!(data_extents(&helper_file), layout, "upload helper: holes");
            }
            Way::Download => assert_sparse_copy(what, file, &source, &layout, data_len),
        }
    }
}

// ---------------------------------------------------------------------------------
// 3. kill -9 of the daemon
// ---------------------------------------------------------------------------------

/// Big enough that no transfer is near its end when the daemon dies (sparse
/// volumes: no disk space; the daemon reads zeros).
const BIG: u64 = 256 * MIB;
/// Each transfer has moved at least this much before the kill.
const PROGRESS: u64 = 4 * MIB;

/// What ended one transfer of the kill test.
#[derive(Debug)]
enum Ended {
    /// A read or write failed with this.
    Io(io::Error),
    /// A helper's future resolved with this.
    Helper(virt_reactor::Result<TransferStats>),
}

/// `kill -9` of the daemon while raw streams are reading and writing (each task
/// loops on `read` or `write` until one fails, so a read or write is pending or
/// about to be at the kill) and while helper downloads and uploads run: every read,
/// write and helper fails with `Error::ConnectionClosed` within 2 s of the kill,
/// the connection's close stream says so, and nothing hangs: the streams leave the
/// reactor and the driver still drains cleanly.
async fn killing_the_daemon_fails_pending_reads_and_writes(bed: &mut Bed) {
    const READERS: usize = 4;
    const WRITERS: usize = 4;
    const HELPERS: usize = 2;
    let mut closes = bed
        .handle
        .close_events(&bed.conn)
        .await
        .expect("subscribe to the connection's close");
    let tasks = READERS + WRITERS + 2 * HELPERS;
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..tasks).map(|_| AtomicU64::new(0)).collect());
    let mut set = JoinSet::new();
    let mut vols = Vec::new();
    let chunk = Arc::new(pattern(5, 256 * KIB as usize));
    // The helpers' uploads read 8 MiB of data, then a hole (zeros) to the end.
    let source = bed.out("source");
    sparse_file(&source, BIG, &[(0, &pattern(6, 8 * MIB as usize))]);
    for i in 0..tasks {
        let vol = bed.pool.create_volume(&format!("big{i}"), BIG);
        let progress = Arc::clone(&progress);
        let handle = bed.handle.clone();
        if i < READERS {
            let mut stream = bed.volume_stream(&vol, Way::Download, BIG, false).await;
            set.spawn(async move {
                let mut buf = vec![0; 64 * KIB as usize];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => panic!("reader {i}: the stream ended"),
                        Ok(n) => progress[i].fetch_add(n as u64, Ordering::Relaxed),
                        Err(e) => return (i, Ended::Io(e)),
                    };
                }
            });
        } else if i < READERS + WRITERS {
            let mut stream = bed.volume_stream(&vol, Way::Upload, BIG, false).await;
            let chunk = Arc::clone(&chunk);
            set.spawn(async move {
                loop {
                    match stream.write(&chunk).await {
                        Ok(0) => panic!("writer {i}: wrote nothing"),
                        Ok(n) => progress[i].fetch_add(n as u64, Ordering::Relaxed),
                        Err(e) => return (i, Ended::Io(e)),
                    };
                }
            });
        } else {
            let (way, file) = match i < READERS + WRITERS + HELPERS {
                true => (Way::Download, bed.out(&format!("big{i}"))),
                false => (Way::Upload, source.clone()),
            };
            let vol = vol.clone();
            set.spawn(async move {
                let probe = Arc::clone(&progress);
                let result = transfer(
                    &handle,
                    way,
                    &vol,
                    &file,
                    VolumeRange::default(),
                    move |stats| {
                        probe[i].store(stats.position(), Ordering::Relaxed);
                    },
                )
                .await;
                (i, Ended::Helper(result))
            });
        }
        vols.push(vol);
    }

    let deadline = Instant::now() + BATCH_LIMIT;
    while !progress
        .iter()
        .all(|moved| moved.load(Ordering::Relaxed) >= PROGRESS)
    {
        assert!(
            Instant::now() < deadline,
            "not every transfer moved {PROGRESS} bytes within {BATCH_LIMIT:?}: {progress:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
    for (i, moved) in progress.iter().enumerate() {
        let moved = moved.load(Ordering::Relaxed);
        assert!(
            moved < BIG / 2,
            "transfer {i} is mid-flight at the kill (precondition): {moved} bytes moved"
        );
    }
    assert_eq!(
        bed.streams().await,
        tasks,
        "every transfer runs at the kill"
    );

    bed.daemon.kill();
    let killed_at = Instant::now();
    let ended = timeout(FAIL_WITHIN, async {
        let mut ended = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(result) => ended.push((result, killed_at.elapsed())),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        ended
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {tasks} transfers still pending {FAIL_WITHIN:?} after the kill",
            set.len()
        )
    });
    assert_eq!(ended.len(), tasks);
    for ((i, end), after) in ended {
        eprintln!("transfer {i} ended {after:?} after the kill: {end:?}");
        let error = match end {
            Ended::Io(e) => Error::from(e),
            Ended::Helper(Ok(stats)) => panic!("helper {i} completed after the kill: {stats:?}"),
            Ended::Helper(Err(e)) => e,
        };
        assert!(
            matches!(error, Error::ConnectionClosed { .. }),
            "transfer {i}: expected ConnectionClosed, got {error:?} ({error})"
        );
    }
    let reason = timeout(FAIL_WITHIN, closes.next())
        .await
        .expect("the close stream hears of the kill");
    assert!(reason.is_some(), "the close stream reports a reason");

    // Nothing is left in the reactor; the driver drains once the connection is gone.
    let deadline = Instant::now() + SETTLE_LIMIT;
    while bed.streams().await != 0 {
        assert!(Instant::now() < deadline, "streams left after the kill");
        sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------
// 4. Futures dropped mid-transfer
// ---------------------------------------------------------------------------------

/// How many file descriptors this process has open, and what they are.
fn open_fds() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .map(|entry| {
            let path = entry.expect("an fd entry").path();
            let target = std::fs::read_link(&path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".to_owned());
            format!("{} -> {target}", path.display())
        })
        .collect()
}

/// Streams and futures dropped mid-transfer, in every way a task can drop them:
/// - `AsyncStream`s dropped after partial reads, and unread;
/// - read futures dropped while pending (`select!` with a 1 ms sleep, and
///   `now_or_never`), then their streams;
/// - `write_all` futures of uploads dropped mid-way, then their streams;
/// - a `shutdown()` future dropped, then its stream;
/// - a `Handle::download` and a `Handle::upload` future dropped mid-way, and a
///   `Handle::download` dropped after one poll (their transfers run to their end in
///   the driver, as documented: the files appear); one never polled starts nothing.
///
/// Afterwards the process's fd count and the reactor's slab size return to what
/// they were before the first stream (within a bounded settle loop).
async fn dropped_futures_free_everything(bed: &Bed) {
    const LEN: usize = 8 * MIB as usize;
    let data = pattern(40, LEN);
    let vols: Vec<StorageVol> = (0..6)
        .map(|i| bed.pool.volume_with(&format!("src{i}"), &data))
        .collect();
    let targets: Vec<StorageVol> = (0..6)
        .map(|i| bed.pool.create_volume(&format!("dst{i}"), LEN as u64))
        .collect();
    let upload_source = bed.out("upload-source");
    std::fs::write(&upload_source, &data).expect("write the upload's source");
    let helper_file = bed.out("helper-download");

    let fds_before = open_fds();
    assert_eq!(bed.streams().await, 0, "no stream before (precondition)");
    let len = LEN as u64;
    let handle = &bed.handle;

    // Streams dropped after partial reads, and one never read.
    for vol in &vols[..2] {
        let mut stream = bed.volume_stream(vol, Way::Download, len, false).await;
        let mut some = vec![0; 100 * KIB as usize];
        stream.read_exact(&mut some).await.expect("read a bit");
        assert!(some == data[..some.len()], "the first bytes");
        drop(stream);
    }
    drop(bed.volume_stream(&vols[2], Way::Download, len, false).await);

    // Pending read futures dropped, then their streams.
    for vol in &vols[3..5] {
        let mut stream = bed.volume_stream(vol, Way::Download, len, false).await;
        let mut buf = vec![0; 64 * KIB as usize];
        // Polled once and dropped, whether or not bytes had arrived.
        if let Some(read) = stream.read(&mut buf).now_or_never() {
            read.expect("read");
        }
        for _ in 0..5 {
            tokio::select! {
                read = stream.read(&mut buf) => { read.expect("read"); }
                () = sleep(Duration::from_millis(1)) => {}
            }
        }
        drop(stream);
    }

    // write_all futures dropped mid-way, then their streams; a dropped shutdown.
    for (i, vol) in targets[..3].iter().enumerate() {
        let mut stream = bed.volume_stream(vol, Way::Upload, len, false).await;
        tokio::select! {
            written = stream.write_all(&data) => {
                written.expect("write");
                if i == 2 {
                    // A shutdown future dropped too, before or after it is under way.
                    let _ = stream.shutdown().now_or_never();
                }
            }
            () = sleep(Duration::from_millis(5)) => {}
        }
        drop(stream);
    }
    let mut stream = bed
        .volume_stream(&targets[3], Way::Upload, len, false)
        .await;
    stream
        .write_all(&data[..MIB as usize])
        .await
        .expect("write");
    assert!(
        stream.shutdown().now_or_never().is_none(),
        "a shutdown with 1 MiB of 8 left is pending"
    );
    drop(stream);

    // Helper futures dropped mid-way (and one never polled).
    tokio::select! {
        done = handle.download(vols[5].clone(), helper_file.clone(), VolumeRange::default(), |_| {}) => {
            done.expect("download helper");
        }
        () = sleep(Duration::from_millis(5)) => {}
    }
    tokio::select! {
        done = handle.upload(targets[4].clone(), upload_source.clone(), VolumeRange::default(), |_| {}) => {
            done.expect("upload helper");
        }
        () = sleep(Duration::from_millis(5)) => {}
    }
    let polled_once = bed.out("polled-once");
    assert!(
        handle
            .download(
                vols[1].clone(),
                polled_once.clone(),
                VolumeRange::default(),
                |_| {}
            )
            .now_or_never()
            .is_none(),
        "a download helper is pending after one poll"
    );
    drop(handle.download(
        vols[0].clone(),
        bed.out("never"),
        VolumeRange::default(),
        |_| {},
    ));

    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let (fds, streams) = (open_fds(), bed.streams().await);
        if fds.len() == fds_before.len() && streams == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back to the start within {SETTLE_LIMIT:?}: {streams} stream(s) in the \
             reactor, {} fds (before: {})\nnow: {fds:#?}\nbefore: {fds_before:#?}",
            fds.len(),
            fds_before.len()
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert!(
        file_is(&helper_file, &data),
        "a dropped Handle::download still runs to its end"
    );
    assert!(
        file_is(&bed.pool.path_of("dst4"), &data),
        "a dropped Handle::upload still runs to its end"
    );
    assert!(
        file_is(&polled_once, &data),
        "a Handle::download dropped after one poll still runs to its end"
    );
    assert!(
        !bed.out("never").exists(),
        "a helper future never polled starts nothing"
    );
}

// ---------------------------------------------------------------------------------
// 7. Cancellation: dropping a read or write future loses no byte
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// Domain lifecycle events as a futures Stream
// ---------------------------------------------------------------------------------

/// Defining and undefining a domain on the daemon: `Handle::lifecycle_events`
/// yields both events, in order, through `futures_core::Stream`; dropping the stream
/// unsubscribes (the driver still drains at the end).
async fn lifecycle_events_arrive_as_a_stream(bed: &Bed) {
    const NAME: &str = "tokio-events";
    let mut events = bed
        .handle
        .lifecycle_events(&bed.conn)
        .await
        .expect("subscribe");
    let conn = bed.conn.clone();
    let domain = bed
        .handle
        .blocking(move || {
            conn.define_domain_xml(&format!(
                "<domain type='qemu'><name>{NAME}</name><memory unit='MiB'>32</memory>\
                 <os><type arch='x86_64'>hvm</type></os></domain>"
            ))
        })
        .await
        .expect("blocking pool")
        .expect("define the domain");
    let mut next = async || {
        timeout(EVENT_LIMIT, StreamExt::next(&mut events))
            .await
            .expect("an event in time")
            .expect("the subscription goes on")
    };
    let defined = next().await;
    assert_eq!(
        (defined.domain.as_str(), defined.kind),
        (NAME, LifecycleKind::Defined)
    );
    bed.handle
        .blocking(move || domain.undefine())
        .await
        .expect("blocking pool")
        .expect("undefine the domain");
    let undefined = next().await;
    assert_eq!(
        (undefined.domain.as_str(), undefined.kind),
        (NAME, LifecycleKind::Undefined)
    );
}

/// Polls `op` in one of three ways that may drop it before it completes, chosen by
/// `i`: once (`now_or_never`), against `yield_now`, or against a 1 ms sleep. `None`
/// when it was dropped.
async fn race<T>(i: usize, op: impl std::future::Future<Output = T>) -> Option<T> {
    match i % 3 {
        0 => {
            let done = op.now_or_never();
            if done.is_none() {
                tokio::task::yield_now().await;
            }
            done
        }
        1 => tokio::select! {
            done = op => Some(done),
            () = tokio::task::yield_now() => None,
        },
        _ => tokio::select! {
            done = op => Some(done),
            () = sleep(Duration::from_millis(1)) => None,
        },
    }
}

/// A download read through futures that are dropped over and over (`select!` of
/// each `read` or `fill_buf` with a 1 ms sleep or with `yield_now`, and
/// `now_or_never`), with buffer sizes and `consume` counts that cut libvirt's
/// packets anywhere, and once a read into no room: the bytes assembled from the
/// reads that completed are exactly the volume's.
async fn dropped_read_futures_lose_no_byte(bed: &Bed) {
    let data = pattern(50, (16 * MIB + 777) as usize);
    let vol = bed.pool.volume_with("vol", &data);
    let mut stream = bed
        .volume_stream(&vol, Way::Download, data.len() as u64, false)
        .await;
    let (got, dropped) = timeout(BATCH_LIMIT, async {
        let mut got = Vec::with_capacity(data.len());
        let mut dropped = 0u64;
        let mut buf = vec![0; 70_000];
        for i in 1usize.. {
            if i == 3 {
                // An empty buffer reads nothing and ends nothing.
                let empty = stream.read(&mut []).await.expect("read into no room");
                assert_eq!(empty, 0, "a read into no room");
            }
            let size = 1 + (i * 7919) % buf.len();
            if i % 5 == 4 {
                // In place: part of what fill_buf lends is consumed, the rest read
                // by the next calls.
                let Some(filled) = race(i, stream.fill_buf()).await else {
                    dropped += 1;
                    continue;
                };
                let filled = filled.expect("fill_buf");
                if filled.is_empty() {
                    break;
                }
                let n = size.min(filled.len());
                got.extend_from_slice(&filled[..n]);
                stream.consume(n);
                continue;
            }
            let Some(read) = race(i, stream.read(&mut buf[..size])).await else {
                dropped += 1;
                continue;
            };
            match read.expect("read") {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        (got, dropped)
    })
    .await
    .expect("the download ends");
    eprintln!("{dropped} read futures dropped");
    assert!(dropped > 0, "some read futures were dropped (precondition)");
    assert_eq!(got.len(), data.len(), "bytes assembled");
    assert!(got == data, "the bytes assembled differ");
}

/// An upload written through futures that are dropped over and over: each `write`
/// (or, every fourth, `write_owned` of a copy) is raced against a 1 ms sleep or
/// `yield_now`, or polled once; what a dropped write did not report taken (a
/// dropped `write_owned`: none of its buffer) is written again. The volume holds
/// exactly the bytes.
async fn dropped_write_futures_lose_no_byte(bed: &Bed) {
    let data = pattern(60, (16 * MIB + 333) as usize);
    let vol = bed.pool.create_volume("vol", data.len() as u64);
    let mut stream = bed
        .volume_stream(&vol, Way::Upload, data.len() as u64, false)
        .await;
    let dropped = timeout(BATCH_LIMIT, async {
        let mut sent = 0;
        let mut dropped = 0u64;
        let mut i = 0usize;
        while sent < data.len() {
            i += 1;
            let end = data
                .len()
                .min(sent + 1 + (i * 104_729) % (300 * KIB as usize));
            if i % 4 == 0 {
                let Some(write) = race(i, stream.write_owned(data[sent..end].to_vec())).await
                else {
                    dropped += 1;
                    continue;
                };
                write.expect("write_owned");
                sent = end;
                continue;
            }
            let Some(write) = race(i, stream.write(&data[sent..end])).await else {
                dropped += 1;
                continue;
            };
            sent += write.expect("write");
        }
        stream.shutdown().await.expect("finish");
        dropped
    })
    .await
    .expect("the upload ends");
    eprintln!("{dropped} write futures dropped");
    assert!(
        dropped > 0,
        "some write futures were dropped (precondition)"
    );
    assert!(
        file_is(&bed.pool.path_of("vol"), &data),
        "the volume's bytes differ"
    );
}

// ---------------------------------------------------------------------------------
// 5. The loop on its own thread, in the same binary
// ---------------------------------------------------------------------------------

/// The same binary drives the loop from a plain thread, without tokio: registration
/// is once per process, and nextest gives this test a process of its own.
/// `Reactor::register` + `run` on a std thread; a `volume::download` started
/// through the reactor's handle arrives byte for byte, its end is told on the loop
/// thread, and the loop stops and drains.
#[test]
fn the_loop_runs_on_its_own_thread_in_the_same_binary() {
    virt::error::clear_error_callback();
    let mut reactor = Reactor::<()>::register().expect("register the loop");
    let handle = reactor.handle();
    let thread = std::thread::spawn(move || {
        let loop_thread = std::thread::current().id();
        reactor.run(&mut ())?;
        reactor
            .shutdown(support::pool::DRAIN_TIMEOUT, &mut ())
            .map(|report| (report, loop_thread))
    });
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let conn = support::pool::connect(&daemon);
    let pool = DirPool::create(&daemon, &conn, "thread");
    let data = pattern(80, (3 * MIB + 99) as usize);
    let vol = pool.volume_with("vol", &data);
    let file = daemon.root().join("copy");

    let (tx, rx) = std::sync::mpsc::channel();
    let target = file.clone();
    let download_vol = vol.clone();
    handle
        .execute(move |reactor, ()| {
            let ended = tx.clone();
            let started = volume::download(
                reactor,
                &download_vol,
                &target,
                VolumeRange::default(),
                |(), _| {},
                move |(), result| {
                    let _ = ended.send((result, std::thread::current().id()));
                },
            );
            if let Err(e) = started {
                let _ = tx.send((Err(e), std::thread::current().id()));
            }
        })
        .expect("the loop is there");
    let (result, ended_on) = rx.recv_timeout(BATCH_LIMIT).expect("the download ends");
    let stats = result.expect("the download succeeds");
    assert_eq!(stats.data_bytes, data.len() as u64);
    assert!(file_is(&file, &data), "downloaded bytes differ");

    drop((vol, pool, conn));
    handle.stop();
    let (_, loop_thread) = thread
        .join()
        .expect("the loop thread")
        .expect("the loop runs and drains cleanly");
    assert_eq!(ended_on, loop_thread, "the end is told on the loop thread");
    drop(daemon);
}
