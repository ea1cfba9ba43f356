//! The async path (`loop=tokio`): the children of scenarios 1 and 4 on
//! `virt_reactor::tokio`, for the comparison with ours (the mio path underneath).
//!
//! Each child builds a tokio current_thread runtime, registers the loop with
//! `virt_reactor::tokio::register()` and spawns its `Driver` on that runtime: the
//! driver, libvirt's callbacks, the reactor's handlers and the benchmark's tasks all
//! share one thread (libvirt's own threads aside), as an application with a
//! current_thread runtime would have it.
//!
//! - Transfers move the bytes through raw `AsyncStream`s, checked and generated in memory exactly as the mio children do
//!   (`data::check`, `data::fill`), so that the difference is the async bridge and the
//!   runtime, not a file. (`Handle::download/upload` would write or read a file
//!   through `volume::download/upload`, i.e. the mio path's own handlers, with only a
//!   oneshot channel of async on top.) Streams are attached inside the driver
//!   (`Handle::with_reactor`), as `Handle::download` does, then handed over with
//!   `Handle::stream`; the timed part starts before the first attach, as in
//!   `streams::transfer`. Downloads read with `AsyncBufRead` (`fill_buf` /
//!   `consume`: each chunk checked in the buffer it was received into) and uploads
//!   write with `AsyncStream::write_owned` (each chunk generated in the buffer
//!   handed over), or, when the child gets `io=copy`, with `AsyncRead::read` and
//!   `AsyncWrite::write_all` (one copy more each).
//! - Consoles are `AsyncStream`s from `Handle::open_console`; one reader task per
//!   console stamps each piece of output when it reads it and hands it to the user
//!   task, which sends the `echo` lines and times them as `consoles::user` does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt_reactor::console::ConsoleOptions;
use virt_reactor::tokio::{AsyncStream, Handle};
use virt_reactor::Stream;

use crate::consoles::{echo_figures, next_round, Screen, UPLOAD_VOLUME};
use crate::setup::{POOL, SOURCE};
use crate::streams::transfer_figures;
use crate::{data, sys, Figures, Params, MIB};

/// What each read or write of a transfer moves at most (libvirt's largest packet).
const CHUNK: usize = 256 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current_thread runtime")
}

/// Registers the loop, spawns the driver, connects (on the blocking pool).
async fn start(uri: &str) -> (Handle, tokio::task::JoinHandle<()>, Connect) {
    let (handle, driver) = virt_reactor::tokio::register().expect("register the tokio driver");
    let driver = tokio::spawn(async move {
        driver.run().await.expect("the driver");
    });
    let uri = uri.to_owned();
    let conn = handle
        .blocking(move || virt_reactor::connect(&uri))
        .await
        .expect("blocking pool")
        .expect("connect");
    (handle, driver, conn)
}

/// Closes the connection, stops the driver and waits for its drain.
async fn finish(handle: Handle, driver: tokio::task::JoinHandle<()>, conn: Connect) {
    handle
        .blocking(move || drop(conn))
        .await
        .expect("close the connection");
    handle.stop();
    driver.await.expect("the driver task");
}

/// A stream on `conn`, attached by `attach` inside the driver, as an `AsyncStream`.
async fn attached<F>(handle: &Handle, conn: &Connect, attach: F) -> AsyncStream
where
    F: FnOnce(&virt::stream::Stream) -> Result<(), virt::error::Error> + Send + 'static,
{
    let conn = conn.clone();
    let stream = handle
        .with_reactor(move |_| {
            let mut stream = Stream::new(&conn).expect("stream");
            stream.with_virt(attach).map(|()| stream)
        })
        .await
        .expect("the driver")
        .expect("attach the stream");
    handle.stream(stream).await.expect("AsyncStream")
}

/// Scenario 1's child on the async path: `streams` concurrent transfers of `len`
/// bytes each, one task each.
pub(crate) fn transfer(p: &Params) -> Figures {
    runtime().block_on(transfer_async(p))
}

async fn transfer_async(p: &Params) -> Figures {
    let (n, len): (usize, u64) = (p.num("streams"), p.num("len"));
    assert_eq!(
        p.num::<usize>("idle"),
        0,
        "the async path has no idle streams"
    );
    let source_size: u64 = p.num("source_size");
    let download = p.str("dir") == "download";
    // io=copy: AsyncRead::read and AsyncWrite::write_all instead of in place.
    let copy = p.get("io") == Some("copy");
    let (handle, driver, conn) = start(p.str("uri")).await;
    let names: Vec<String> = if download {
        vec![SOURCE.to_owned()]
    } else {
        (0..n).map(|i| format!("{}-{i}", p.str("prefix"))).collect()
    };
    let volumes: Vec<StorageVol> = {
        let conn = conn.clone();
        handle
            .blocking(move || {
                let pool = conn.lookup_storage_pool_by_name(POOL).expect("pool");
                names
                    .iter()
                    .map(|name| {
                        pool.lookup_storage_vol_by_name(name)
                            .unwrap_or_else(|e| panic!("{name}: {e}"))
                    })
                    .collect()
            })
            .await
            .expect("lookups")
    };

    sys::perf_counting(true);
    let usage_before = sys::Usage::now();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (handle, conn) = (handle.clone(), conn.clone());
            let vol = volumes[if download { 0 } else { i }].clone();
            tokio::spawn(async move {
                let base = i as u64 * len;
                if download {
                    let offset = base % source_size;
                    let mut stream = attached(&handle, &conn, move |s| {
                        vol.download(s, offset, len, 0).map(drop)
                    })
                    .await;
                    let mut position = offset;
                    if copy {
                        // AsyncRead: each chunk copied into our buffer.
                        let mut buf = vec![0u8; CHUNK];
                        loop {
                            let got = stream.read(&mut buf).await.expect("read");
                            if got == 0 {
                                break;
                            }
                            assert!(
                                data::check(position, &buf[..got]),
                                "wrong bytes at {position}"
                            );
                            position += got as u64;
                        }
                    } else {
                        // AsyncBufRead: each chunk checked where it was received.
                        loop {
                            let chunk = stream.fill_buf().await.expect("read");
                            if chunk.is_empty() {
                                break;
                            }
                            let got = chunk.len();
                            assert!(data::check(position, chunk), "wrong bytes at {position}");
                            stream.consume(got);
                            position += got as u64;
                        }
                    }
                    position - offset
                } else {
                    let mut stream =
                        attached(&handle, &conn, move |s| vol.upload(s, 0, len, 0).map(drop)).await;
                    let mut buf = vec![0u8; CHUNK];
                    let mut sent = 0;
                    while sent < len {
                        let want = CHUNK.min((len - sent) as usize);
                        if copy {
                            data::fill(base + sent, &mut buf[..want]);
                            stream.write_all(&buf[..want]).await.expect("write");
                        } else {
                            // AsyncStream::write_owned: filled in the buffer that
                            // goes to libvirt, which comes back to fill again.
                            buf.resize(want, 0);
                            data::fill(base + sent, &mut buf);
                            buf = stream.write_owned(buf).await.expect("write");
                        }
                        sent += want as u64;
                    }
                    stream.shutdown().await.expect("finish the upload");
                    sent
                }
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let bytes = task.await.expect("transfer task");
        assert_eq!(bytes, len, "transfer {i}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let usage = sys::Usage::now() - usage_before;
    sys::perf_counting(false);
    let figures = transfer_figures(n as f64 * len as f64, elapsed, usage);
    drop(volumes);
    finish(handle, driver, conn).await;
    figures
}

/// Scenario 4's child on the async path.
pub(crate) fn latency(p: &Params) -> Figures {
    runtime().block_on(latency_async(p))
}

/// Output pieces of every console: (console, bytes, when read).
type Output = (usize, Vec<u8>, Instant);

/// Every console's output, fed by the reader tasks.
struct Screens {
    output: mpsc::UnboundedReceiver<Output>,
    screens: Vec<Screen>,
}

impl Screens {
    /// Takes one piece of output; None at `deadline`.
    async fn pump(&mut self, deadline: Instant) -> Option<()> {
        let piece = tokio::time::timeout_at(deadline.into(), self.output.recv()).await;
        let (i, bytes, at) = piece.ok()?.unwrap_or_else(|| panic!("a console ended"));
        self.screens[i].push(&bytes, at);
        Some(())
    }

    /// When `marker` arrived from console `i`, or None at `deadline`.
    async fn wait_for(&mut self, i: usize, marker: &str, deadline: Instant) -> Option<Instant> {
        loop {
            if let Some(at) = self.screens[i].take(marker) {
                return Some(at);
            }
            self.pump(deadline).await?;
        }
    }
}

async fn latency_async(p: &Params) -> Figures {
    let guests: Vec<String> = p.str("guests").split(',').map(str::to_owned).collect();
    let samples: usize = p.num("samples");
    let upload_len: u64 = p.num("upload");
    let (handle, driver, conn) = start(p.str("uri")).await;
    let (tx, output) = mpsc::unbounded_channel::<Output>();
    let mut writers: Vec<WriteHalf<AsyncStream>> = Vec::new();
    let mut readers = Vec::new();
    for (i, name) in guests.iter().enumerate() {
        let domain = {
            let (conn, name) = (conn.clone(), name.clone());
            handle
                .blocking(move || conn.lookup_domain_by_name(&name))
                .await
                .expect("blocking pool")
                .expect("domain")
        };
        let options = ConsoleOptions {
            force: true,
            ..ConsoleOptions::default()
        };
        let console = handle
            .open_console(domain, options)
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot attach: {e}"));
        let (mut reader, writer) = tokio::io::split(console);
        writers.push(writer);
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((i, buf[..n].to_vec(), Instant::now())).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut screens = Screens {
        output,
        screens: guests.iter().map(|_| Screen::default()).collect(),
    };

    // Warm-up, as consoles::user: QEMU notices a new reader once a second.
    for (i, name) in guests.iter().enumerate() {
        let mut ready = false;
        for k in 0..120 {
            send(&mut writers[i], &format!("echo w{k}\n")).await;
            let deadline = Instant::now() + Duration::from_secs(1);
            if screens
                .wait_for(i, &format!("\nw{k}\r"), deadline)
                .await
                .is_some()
            {
                ready = true;
                break;
            }
        }
        assert!(ready, "{name} never echoed");
        for k in 0..5 {
            send(&mut writers[i], &format!("echo v{k}\n")).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            screens.wait_for(i, &format!("\nv{k}\r"), deadline).await;
        }
    }

    let done = Arc::new(AtomicBool::new(upload_len == 0));
    let upload = (upload_len > 0).then(|| {
        let (handle, conn, done) = (handle.clone(), conn.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mibps = upload(&handle, &conn, upload_len).await;
            done.store(true, Ordering::Release);
            mibps
        })
    });
    let mut latencies_ms = Vec::new();
    let mut lost = 0;
    let mut rounds = 0;
    while let Some((marker, line)) = next_round(&mut rounds, samples, upload_len, &done) {
        let mut sent = Vec::with_capacity(guests.len());
        for writer in &mut writers {
            let at = Instant::now();
            send(writer, &line).await;
            sent.push(at);
        }
        for (i, at) in sent.into_iter().enumerate() {
            match screens
                .wait_for(i, &marker, at + Duration::from_secs(5))
                .await
            {
                Some(arrived) => latencies_ms.push((arrived - at).as_secs_f64() * 1e3),
                None => lost += 1,
            }
        }
    }
    let upload_mibps = match upload {
        Some(task) => tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("the upload in time")
            .expect("upload task"),
        None => f64::NAN,
    };

    // Dropping both halves aborts each console.
    for reader in readers {
        reader.abort();
        let _ = reader.await;
    }
    drop(writers);
    finish(handle, driver, conn).await;

    echo_figures(latencies_ms, lost, upload_mibps)
}

async fn send(writer: &mut WriteHalf<AsyncStream>, line: &str) {
    writer.write_all(line.as_bytes()).await.expect("send");
}

/// Uploads `len` generated bytes through an `AsyncStream`; MiB/s from the attach on.
async fn upload(handle: &Handle, conn: &Connect, len: u64) -> f64 {
    let vol = {
        let conn = conn.clone();
        handle
            .blocking(move || {
                conn.lookup_storage_pool_by_name(POOL)
                    .expect("pool")
                    .lookup_storage_vol_by_name(UPLOAD_VOLUME)
                    .expect("upload volume")
            })
            .await
            .expect("lookup")
    };
    let mut stream = attached(handle, conn, move |s| vol.upload(s, 0, len, 0).map(drop)).await;
    let started = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < len {
        let want = buf.len().min((len - sent) as usize);
        data::fill(sent, &mut buf[..want]);
        stream.write_all(&buf[..want]).await.expect("upload write");
        sent += want as u64;
    }
    stream.shutdown().await.expect("finish the upload");
    sent as f64 / MIB as f64 / started.elapsed().as_secs_f64()
}
