//! Reactor semantics with real libvirt streams (storage volume downloads and uploads
//! against a private libvirtd with a `dir` pool): a handler that removes itself,
//! streams inserted from other threads, the slab growing under running transfers,
//! stale tokens, `StreamWriter` flow control, and a panicking handler.
//!
//! Each test registers the process-wide event loop itself: run under cargo-nextest
//! (one process per test).

mod support;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use support::pool::{drive, file_is, pattern, Bed, Tracker, KIB, MIB};
use virt::storage_vol::StorageVol;
use virt_reactor::{
    Error, Flow, Interest, Readiness, Stream, StreamCtx, StreamEnd, StreamHandler, StreamToken,
};

/// Time limit for one phase of a test; the transfers involved take well under a second.
const LIMIT: Duration = Duration::from_secs(60);

/// Bytes a [`Reader`] takes per event at most.
const READ_BUDGET: usize = MIB as usize;

/// How a stream left the reactor, as seen by a [`Reader`] or [`Idle`] handler.
#[derive(Debug)]
enum Ended {
    Finished,
    Aborted,
    /// The error's text (shown by `Debug` in assertion messages).
    Failed(#[allow(dead_code)] String),
    Removed(Stream),
}

/// What a handler saw, shared with the test (handlers may live on other threads).
#[derive(Debug, Default)]
struct Record {
    bytes: Vec<u8>,
    /// Calls of `ready`.
    readies: u64,
    /// Calls of `closed`.
    closes: u32,
    end: Option<Ended>,
}

type Shared = Arc<Mutex<Record>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Record> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_finished(shared: &Shared) -> bool {
    matches!(lock(shared).end, Some(Ended::Finished))
}

fn has_ended(shared: &Shared) -> bool {
    lock(shared).end.is_some()
}

/// Reads a stream to its end into a [`Record`]; with `remove_after`, hands the
/// stream back with [`Flow::Remove`] once it has that many bytes.
struct Reader {
    shared: Shared,
    buf: Vec<u8>,
    remove_after: Option<usize>,
}

impl Reader {
    fn new(shared: &Shared) -> Reader {
        Reader {
            shared: Arc::clone(shared),
            buf: vec![0; 256 * KIB as usize],
            remove_after: None,
        }
    }
}

impl StreamHandler for Reader {
    fn ready(&mut self, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let mut record = lock(&self.shared);
        record.readies += 1;
        assert!(
            readiness.is_readable(),
            "a download only asked for READABLE"
        );
        // At most a budget per event, so streams move in step; readiness is level-
        // triggered, so what is left is reported again next iteration.
        let mut moved = 0;
        while moved < READ_BUDGET {
            match cx.recv(&mut self.buf) {
                Ok(0) => return Flow::Finish,
                Ok(n) => {
                    moved += n;
                    record.bytes.extend_from_slice(&self.buf[..n]);
                    if self.remove_after.is_some_and(|at| record.bytes.len() >= at) {
                        return Flow::Remove;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Continue,
                Err(e) => return Flow::Fail(Error::Io(e)),
            }
        }
        Flow::Continue
    }

    fn closed(&mut self, end: StreamEnd) {
        let mut record = lock(&self.shared);
        record.closes += 1;
        record.end = Some(ended(end));
    }
}

/// Does nothing; inserted with [`Interest::NONE`] it should never be called but to
/// be told its end.
struct Idle(Shared);

impl StreamHandler for Idle {
    fn ready(&mut self, _cx: &mut StreamCtx<'_>, _readiness: Readiness) -> Flow {
        lock(&self.0).readies += 1;
        Flow::Continue
    }

    fn closed(&mut self, end: StreamEnd) {
        let mut record = lock(&self.0);
        record.closes += 1;
        record.end = Some(ended(end));
    }
}

fn ended(end: StreamEnd) -> Ended {
    match end {
        StreamEnd::Finished => Ended::Finished,
        StreamEnd::Aborted => Ended::Aborted,
        StreamEnd::Failed(e) => Ended::Failed(e.to_string()),
        StreamEnd::Removed(stream) => Ended::Removed(stream),
        other => panic!("unexpected end {other:?}"),
    }
}

/// A new non-blocking stream downloading all of `vol`.
fn download_stream(bed: &Bed, vol: &StorageVol) -> Stream {
    let stream = Stream::new(&bed.conn).expect("new stream");
    vol.download(&stream.to_virt(), 0, 0, 0)
        .expect("attach the stream to a download");
    stream
}

/// The slab key of a token, from its `Debug` form `StreamToken(KEYvGENERATION)`.
fn key_and_generation(token: StreamToken) -> (u32, u32) {
    let text = format!("{token:?}");
    let inner = text
        .strip_prefix("StreamToken(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected token format {text}"));
    let (key, generation) = inner.split_once('v').expect("KEYvGEN");
    (key.parse().unwrap(), generation.parse().unwrap())
}

#[test]
fn a_handler_that_removes_itself_gets_its_stream_back_and_no_more_events() {
    let mut bed = Bed::start("remove");
    const LEN: usize = 32 * MIB as usize;
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pattern(10 + i, LEN)).collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();

    let records: Vec<Shared> = (0..4).map(|_| Shared::default()).collect();
    let mut tokens = Vec::new();
    for (i, vol) in vols.iter().enumerate() {
        let mut reader = Reader::new(&records[i]);
        if i == 0 {
            reader.remove_after = Some(MIB as usize);
        }
        let stream = download_stream(&bed, vol);
        tokens.push(
            bed.reactor
                .insert(stream, Interest::READABLE, reader)
                .expect("insert"),
        );
    }

    drive(
        &mut bed.reactor,
        LIMIT,
        "the first stream removes itself",
        |_| has_ended(&records[0]),
    );
    let (removed, readies_at_removal, bytes_at_removal) = {
        let mut record = lock(&records[0]);
        assert_eq!(record.closes, 1);
        let Some(Ended::Removed(stream)) = record.end.take() else {
            panic!("expected StreamEnd::Removed, got {:?}", record.end);
        };
        (stream, record.readies, record.bytes.len())
    };
    assert!(bytes_at_removal >= MIB as usize && bytes_at_removal < LEN);
    assert!(!bed.reactor.contains(tokens[0]));
    assert!(matches!(
        bed.reactor.set_interest(tokens[0], Interest::READABLE),
        Err(Error::InvalidToken)
    ));
    for record in &records[1..] {
        assert!(
            !has_ended(record),
            "the other streams are still running when the first leaves (precondition)"
        );
    }

    // The others complete, while the removed stream (data still pending on it, so
    // libvirt would report it READABLE) is held here, outside the reactor.
    drive(&mut bed.reactor, LIMIT, "the other streams", |r| {
        r.is_empty()
    });
    for i in 1..4 {
        assert!(
            is_finished(&records[i]),
            "stream {i}: {:?}",
            lock(&records[i]).end
        );
        assert_eq!(lock(&records[i]).closes, 1);
        assert!(
            lock(&records[i]).bytes == contents[i],
            "stream {i}: content"
        );
    }
    for _ in 0..5 {
        bed.reactor
            .run_once(Some(Duration::from_millis(20)))
            .expect("run_once");
    }
    assert_eq!(
        lock(&records[0]).readies,
        readies_at_removal,
        "the removed stream's handler was called after it left"
    );
    assert_eq!(lock(&records[0]).bytes.len(), bytes_at_removal);

    // The stream handed back is alive: insert it again and read the rest.
    let token = bed
        .reactor
        .insert(removed, Interest::READABLE, Reader::new(&records[0]))
        .expect("insert the removed stream again");
    drive(&mut bed.reactor, LIMIT, "the re-inserted stream", |r| {
        !r.contains(token) && has_ended(&records[0])
    });
    assert!(is_finished(&records[0]), "{:?}", lock(&records[0]).end);
    assert!(
        lock(&records[0]).bytes == contents[0],
        "the two halves make up the volume"
    );

    drop(vols);
    bed.finish();
}

#[test]
fn streams_inserted_from_other_threads_complete() {
    let mut bed = Bed::start("threads");
    const THREADS: usize = 4;
    let contents: Vec<Vec<u8>> = (0..THREADS)
        .map(|i| pattern(20 + i as u64, 3 * MIB as usize + i))
        .collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();
    let records: Vec<Shared> = (0..THREADS).map(|_| Shared::default()).collect();

    let loop_thread = thread::current().id();
    let workers: Vec<_> = vols
        .iter()
        .zip(&records)
        .map(|(vol, record)| {
            let (conn, vol, handle) = (bed.conn.clone(), vol.clone(), bed.reactor.handle());
            let record = Arc::clone(record);
            thread::spawn(move || {
                assert_ne!(thread::current().id(), loop_thread);
                // Created and attached on this thread, handed over to the loop.
                let stream = Stream::new(&conn).expect("new stream");
                vol.download(&stream.to_virt(), 0, 0, 0)
                    .expect("attach the stream to a download");
                let reply = handle
                    .insert(stream, Interest::READABLE, Reader::new(&record))
                    .expect("the reactor is there");
                reply
                    .recv_timeout(LIMIT)
                    .expect("the loop answers the insertion")
                    .expect("the insertion succeeds")
            })
        })
        .collect();

    drive(
        &mut bed.reactor,
        LIMIT,
        "streams from other threads",
        |_| records.iter().all(has_ended),
    );
    let tokens: Vec<StreamToken> = workers
        .into_iter()
        .map(|w| w.join().expect("worker thread"))
        .collect();
    for (i, record) in records.iter().enumerate() {
        assert!(is_finished(record), "stream {i}: {:?}", lock(record).end);
        assert!(lock(record).bytes == contents[i], "stream {i}: content");
        assert!(!bed.reactor.contains(tokens[i]));
    }
    let mut distinct = tokens.clone();
    distinct.sort_by_key(|t| key_and_generation(*t));
    distinct.dedup();
    assert_eq!(distinct.len(), THREADS, "every insertion got its own token");
    assert!(bed.reactor.is_empty());

    drop(vols);
    bed.finish();
}

/// Idle streams inserted while the first transfers run: enough to make the slab
/// reallocate several times (it starts empty and doubles).
const IDLE_STREAMS: usize = 600;
const INSERT_BATCH: usize = 50;
/// Loop iterations allowed in one second of `run_once(200 ms)` when nothing is due:
/// about 5 when the loop sleeps, thousands when it spins.
const IDLE_ITERATIONS: u32 = 15;

/// How many `run_once(200 ms)` iterations fit in `span`.
fn iterations_in(reactor: &mut virt_reactor::Reactor, span: Duration) -> u32 {
    let end = Instant::now() + span;
    let mut iterations = 0;
    while Instant::now() < end {
        reactor
            .run_once(Some(Duration::from_millis(200)))
            .expect("run_once");
        iterations += 1;
    }
    iterations
}

#[test]
fn running_transfers_survive_the_slab_growing_under_them() {
    let mut bed = Bed::start("grow");
    const RUNNING: usize = 4;
    const LEN: usize = 32 * MIB as usize;
    let contents: Vec<Vec<u8>> = (0..RUNNING).map(|i| pattern(30 + i as u64, LEN)).collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();
    let tiny = bed.pool.volume_with("tiny", &pattern(39, 4096));

    let tracker = Tracker::default();
    for (i, vol) in vols.iter().enumerate() {
        let file = bed.out(&format!("file{i}"));
        let (index, _) = bed
            .download(&tracker, vol, &file)
            .expect("start a download");
        assert_eq!(index, i);
    }
    drive(
        &mut bed.reactor,
        LIMIT,
        "every transfer has started",
        |_| (0..RUNNING).all(|i| tracker.position(i) > 0),
    );

    let idle: Vec<Shared> = (0..IDLE_STREAMS).map(|_| Shared::default()).collect();
    let mut idle_tokens = Vec::new();
    for batch in idle.chunks(INSERT_BATCH) {
        for record in batch {
            let stream = download_stream(&bed, &tiny);
            idle_tokens.push(
                bed.reactor
                    .insert(stream, Interest::NONE, Idle(Arc::clone(record)))
                    .expect("insert an idle stream"),
            );
        }
        // Let the transfers move between reallocations.
        bed.reactor
            .run_once(Some(Duration::ZERO))
            .expect("run_once");
    }
    assert_eq!(bed.reactor.len(), RUNNING + IDLE_STREAMS);
    for i in 0..RUNNING {
        assert!(
            !tracker.is_ended(i) && tracker.position(i) < LEN as u64,
            "transfer {i} is still mid-flight after the slab grew (precondition)"
        );
    }

    drive(&mut bed.reactor, LIMIT, "the running transfers", |_| {
        tracker.all_ended()
    });
    for (i, data) in contents.iter().enumerate() {
        assert_eq!(tracker.ok(i).data_bytes, LEN as u64);
        assert!(
            file_is(&bed.out(&format!("file{i}")), data),
            "transfer {i}: content"
        );
    }

    assert_eq!(bed.reactor.len(), IDLE_STREAMS);
    // Data is pending on every idle stream, but nobody asked for it: libvirt must
    // not be told to report it, or the loop would wake for it on every iteration.
    let iterations = iterations_in(&mut bed.reactor, Duration::from_secs(1));
    assert!(
        iterations <= IDLE_ITERATIONS,
        "{iterations} iterations in 1 s with only uninterested streams left"
    );
    for token in &idle_tokens {
        bed.reactor.abort(*token).expect("abort an idle stream");
    }
    // A remote stream's abort waits for the daemon's answer, off the loop.
    drive(&mut bed.reactor, LIMIT, "the aborts", |r| r.is_empty());
    for (i, record) in idle.iter().enumerate() {
        let record = lock(record);
        assert_eq!(
            record.readies, 0,
            "idle stream {i} was called without interest"
        );
        assert_eq!(record.closes, 1, "idle stream {i}");
        assert!(
            matches!(record.end, Some(Ended::Aborted)),
            "idle stream {i}"
        );
    }

    drop((vols, tiny));
    bed.finish();
}

#[test]
fn stale_tokens_are_refused_and_never_reach_a_new_stream() {
    let mut bed = Bed::start("stale");
    let small = pattern(40, 256 * KIB as usize);
    let big = pattern(41, 32 * MIB as usize);
    let small_vol = bed.pool.volume_with("small", &small);
    let big_vol = bed.pool.volume_with("big", &big);

    let first = Shared::default();
    let stream = download_stream(&bed, &small_vol);
    let old = bed
        .reactor
        .insert(stream, Interest::READABLE, Reader::new(&first))
        .expect("insert");
    drive(&mut bed.reactor, LIMIT, "the first stream", |r| {
        r.is_empty()
    });
    assert!(is_finished(&first) && lock(&first).bytes == small);

    // A finished stream's token, its slot empty.
    assert!(!bed.reactor.contains(old));
    let refused = |reactor: &mut virt_reactor::Reactor, token: StreamToken| {
        assert!(matches!(
            reactor.set_interest(token, Interest::NONE),
            Err(Error::InvalidToken)
        ));
        assert!(matches!(reactor.finish(token), Err(Error::InvalidToken)));
        assert!(matches!(reactor.abort(token), Err(Error::InvalidToken)));
        assert!(matches!(reactor.remove(token), Err(Error::InvalidToken)));
        assert!(matches!(
            reactor.writer(token, 1024),
            Err(Error::InvalidToken)
        ));
    };
    refused(&mut bed.reactor, old);

    // The slot is reused by a new stream: same key, new generation.
    let second = Shared::default();
    let stream = download_stream(&bed, &big_vol);
    let new = bed
        .reactor
        .insert(stream, Interest::READABLE, Reader::new(&second))
        .expect("insert");
    let ((old_key, old_gen), (new_key, new_gen)) =
        (key_and_generation(old), key_and_generation(new));
    assert_eq!(old_key, new_key, "the slab reuses the vacated slot");
    assert_ne!(old_gen, new_gen);
    assert_ne!(old, new);
    assert!(bed.reactor.contains(new) && !bed.reactor.contains(old));

    drive(
        &mut bed.reactor,
        LIMIT,
        "the second stream has started",
        |_| !lock(&second).bytes.is_empty(),
    );
    assert!(!has_ended(&second), "mid-flight (precondition)");
    // Each of these would stall (NONE), end early (finish), abort or take the new
    // stream if the old token reached it.
    refused(&mut bed.reactor, old);
    bed.reactor
        .handle()
        .set_interest(old, Interest::NONE)
        .expect("the command is queued");
    drive(&mut bed.reactor, LIMIT, "the second stream", |r| {
        r.is_empty()
    });
    let record = lock(&second);
    assert!(
        matches!(record.end, Some(Ended::Finished)),
        "{:?}",
        record.end
    );
    assert_eq!(record.closes, 1);
    assert!(record.bytes == big, "the new stream got all of its data");
    drop(record);

    drop((small_vol, big_vol));
    bed.finish();
}

#[test]
fn a_stream_writer_blocks_while_full_and_the_loop_finishes_the_upload() {
    let mut bed = Bed::start("writer");
    const LEN: usize = 8 * MIB as usize;
    const CAPACITY: usize = 64 * KIB as usize;
    const PIECE: usize = MIB as usize;
    let data = pattern(50, LEN);
    let vol = bed.pool.create_volume("written", LEN as u64);

    let stream = Stream::new(&bed.conn).expect("new stream");
    vol.upload(&stream.to_virt(), 0, LEN as u64, 0)
        .expect("attach the stream to an upload");
    let record = Shared::default();
    // No interest of its own: only the writer's bytes make the reactor ask for
    // WRITABLE.
    let token = bed
        .reactor
        .insert(stream, Interest::NONE, Idle(Arc::clone(&record)))
        .expect("insert");
    let writer = bed.reactor.writer(token, CAPACITY).expect("writer");
    let handle = bed.reactor.handle();

    let source = data.clone();
    let producer = thread::spawn(move || {
        let mut most_pending = 0;
        for piece in source.chunks(PIECE) {
            // 1 MiB into a 64 KiB queue: this returns only once the loop has sent
            // all but what fits.
            writer.write_all(piece).expect("write_all");
            most_pending = most_pending.max(writer.pending());
        }
        let deadline = Instant::now() + LIMIT;
        while writer.pending() > 0 {
            assert!(Instant::now() < deadline, "the queue never drained");
            thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        handle
            .execute(move |r| {
                let _ = tx.send(r.finish(token).map_err(|e| e.to_string()));
            })
            .expect("the reactor is there");
        let finished = rx.recv_timeout(LIMIT).expect("the loop ran the job");
        let late = writer.write_all(b"late");
        (most_pending, finished, late)
    });

    drive(&mut bed.reactor, LIMIT, "the written upload", |_| {
        has_ended(&record)
    });
    let (most_pending, finished, late) = producer.join().expect("producer thread");
    assert!(
        matches!(late, Err(Error::StreamClosed)),
        "writing to a finished stream: {late:?}"
    );
    assert!(
        most_pending <= CAPACITY,
        "write_all returned with {most_pending} bytes queued, more than the {CAPACITY} bound"
    );
    assert_eq!(finished, Ok(()), "finish from the loop thread");
    let record = lock(&record);
    assert!(
        matches!(record.end, Some(Ended::Finished)),
        "{:?}",
        record.end
    );
    assert_eq!(
        record.readies, 0,
        "WRITABLE for the outbox is not the handler's"
    );
    drop(record);
    assert!(!bed.reactor.contains(token));
    assert!(
        file_is(&bed.pool.path_of("written"), &data),
        "the volume holds what was written"
    );

    drop(vol);
    bed.finish();
}

/// Panics on its first event; tells whether it was dropped or told its end.
struct Panicker {
    dropped: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}

impl StreamHandler for Panicker {
    fn ready(&mut self, _cx: &mut StreamCtx<'_>, _readiness: Readiness) -> Flow {
        panic!("handler boom");
    }

    fn closed(&mut self, _end: StreamEnd) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Panicker {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_panicking_handler_aborts_only_its_stream() {
    let mut bed = Bed::start("panic");
    let data = pattern(60, 32 * MIB as usize);
    let vol = bed.pool.volume_with("vol", &data);

    let tracker = Tracker::default();
    let file = bed.out("file");
    let (other, _) = bed
        .download(&tracker, &vol, &file)
        .expect("start the download");
    let (dropped, closed) = (Arc::default(), Arc::default());
    let stream = download_stream(&bed, &vol);
    let token = bed
        .reactor
        .insert(
            stream,
            Interest::READABLE,
            Panicker {
                dropped: Arc::clone(&dropped),
                closed: Arc::clone(&closed),
            },
        )
        .expect("insert");

    let deadline = Instant::now() + LIMIT;
    let mut errors = Vec::new();
    while !tracker.is_ended(other) {
        assert!(Instant::now() < deadline, "the other transfer did not end");
        if let Err(e) = bed.reactor.run_once(Some(Duration::from_millis(100))) {
            errors.push((e, tracker.is_ended(other)));
        }
    }
    assert_eq!(errors.len(), 1, "exactly one error: {errors:?}");
    let (error, other_was_done) = errors.pop().unwrap();
    match &error {
        Error::CallbackPanicked { origin, message } => {
            assert_eq!(message, "handler boom");
            assert!(origin.contains(&format!("{token:?}")), "origin {origin:?}");
        }
        e => panic!("expected CallbackPanicked, got {e:?}"),
    }
    assert!(
        !other_was_done,
        "the panic came while the other transfer ran"
    );
    assert!(!bed.reactor.contains(token), "the panicked stream left");
    assert!(dropped.load(Ordering::SeqCst), "its handler was dropped");
    assert!(
        !closed.load(Ordering::SeqCst),
        "a panicked handler is not called again"
    );
    assert_eq!(tracker.ok(other).data_bytes, data.len() as u64);
    assert!(file_is(&file, &data), "the other transfer's content");
    // `finish` drains the loop to idle: the aborted stream's libvirt callback (a
    // timer on the loop) is gone too.
    drop(vol);
    bed.finish();
}

/// A stream taken out of the reactor and held keeps its connection's sender thread
/// alive after the connection's last stream in the reactor ended; a new stream of
/// that connection revives the same sender thread instead of waiting for it to end
/// (which it would not, while the stream is held), so the new stream finishes.
#[test]
fn a_stream_held_outside_the_reactor_stalls_no_new_stream_of_its_connection() {
    const LEN: usize = 2 * MIB as usize;
    let mut bed = Bed::start("held");
    let held_vol = bed.pool.volume_with("held", &pattern(11, LEN));
    let record: Shared = Arc::default();
    let mut reader = Reader::new(&record);
    reader.remove_after = Some(1);
    bed.reactor
        .insert(download_stream(&bed, &held_vol), Interest::READABLE, reader)
        .expect("insert");
    drive(&mut bed.reactor, LIMIT, "the stream removes itself", |r| {
        r.is_empty()
    });
    let Some(Ended::Removed(held)) = lock(&record).end.take() else {
        panic!("expected StreamEnd::Removed, got {:?}", lock(&record).end);
    };

    let data = pattern(12, LEN);
    let vol = bed.pool.volume_with("after", &data);
    let file = bed.out("after");
    let tracker = Tracker::default();
    let (index, _) = bed
        .download(&tracker, &vol, &file)
        .expect("start a download");
    drive(&mut bed.reactor, LIMIT, "a new download finishes", |_| {
        tracker.is_ended(index)
    });
    assert_eq!(tracker.ok(index).data_bytes, LEN as u64);
    assert!(file_is(&file, &data), "the download arrived intact");

    drop(held);
    drop((held_vol, vol));
    bed.finish();
}
