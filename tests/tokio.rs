//! The loop driven by a tokio runtime: volume transfers and raw streams as
//! `AsyncRead`/`AsyncBufRead`/`AsyncWrite`, against a private libvirtd.
//!
//! Each test registers the loop itself, so run them one process each (cargo-nextest).

mod support;

use std::time::Duration;

use support::daemon::PrivateDaemon;
use support::pool::{self, DirPool, MIB};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use virt_reactor::volume::VolumeRange;
use virt_reactor::Stream;

/// A volume read through an `AsyncStream` arrives byte for byte, and writing one
/// through another lands byte for byte.
#[tokio::test(flavor = "current_thread")]
async fn a_volume_round_trips_through_async_streams() {
    let (handle, driver) = virt_reactor::tokio::register().expect("register");
    let driver = tokio::spawn(driver.run());
    let daemon = PrivateDaemon::start().expect("daemon");
    let conn = {
        let uri = daemon.uri("qemu");
        handle
            .blocking(move || virt_reactor::connect(&uri))
            .await
            .expect("blocking pool")
            .expect("connect")
    };
    let dir = DirPool::create(&daemon, &conn, "tokio");
    let data = pool::pattern(7, (3 * MIB + 123) as usize);
    let source = dir.volume_with("source", &data);
    let target = dir.create_volume("target", data.len() as u64);

    let mut download = Stream::new(&conn).expect("stream");
    download
        .with_virt(|s| source.download(s, 0, data.len() as u64, 0))
        .expect("download");
    let mut download = handle.stream(download, false).await.expect("async stream");
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
    let mut again = Stream::new(&conn).expect("stream");
    again
        .with_virt(|s| source.download(s, 0, data.len() as u64, 0))
        .expect("download");
    let mut again = handle.stream(again, false).await.expect("async stream");
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

    let mut upload = Stream::new(&conn).expect("stream");
    upload
        .with_virt(|s| target.upload(s, 0, data.len() as u64, 0))
        .expect("upload");
    let mut upload = handle.stream(upload, false).await.expect("async stream");
    upload.write_all(&data).await.expect("write");
    upload.shutdown().await.expect("finish");
    assert!(
        pool::file_is(&dir.path_of("target"), &data),
        "uploaded bytes differ"
    );

    let stats = handle
        .download(
            source.clone(),
            daemon.root().join("copy"),
            VolumeRange::default(),
            |_| {},
        )
        .await
        .expect("download helper");
    assert_eq!(stats.data_bytes, data.len() as u64);

    drop((download, upload, source, target, dir, conn));
    handle.stop();
    tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the driver ends")
        .expect("driver task")
        .expect("driver");
}
