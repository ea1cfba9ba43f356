//! Reactor semantics with real libvirt streams (storage volume downloads and uploads
//! against a private libvirtd with a `dir` pool): a handler that removes itself,
//! streams inserted from other threads, the slab growing under running transfers,
//! stale tokens, `StreamWriter` flow control, and a panicking handler.
//!
//! Each test registers the process-wide event loop itself: run under cargo-nextest
//! (one process per test).

mod support;

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use support::pool::{file_is, pattern, Bed, Tracker, KIB, MIB};
use virt::storage_vol::StorageVol;
use virt_reactor::{
    Error, Flow, Interest, Reactor, Readiness, Stream, StreamCtx, StreamEnd, StreamHandler,
    StreamToken,
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

/// What a handler saw, in the reactor's state.
#[derive(Debug, Default)]
struct Record {
    bytes: Vec<u8>,
    /// Calls of `ready`.
    readies: u64,
    /// Calls of `closed`.
    closes: u32,
    end: Option<Ended>,
}

impl Record {
    fn is_finished(&self) -> bool {
        matches!(self.end, Some(Ended::Finished))
    }

    fn has_ended(&self) -> bool {
        self.end.is_some()
    }
}

/// The reactor's state in these tests: the volume transfers' tracks and what each
/// hand-written handler saw (handlers name their [`Record`] by index).
#[derive(Default)]
struct World {
    tracker: Tracker,
    records: Vec<Record>,
}

impl AsMut<Tracker> for World {
    fn as_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }
}

impl World {
    /// A new, empty record: its index.
    fn record(&mut self) -> usize {
        self.records.push(Record::default());
        self.records.len() - 1
    }
}

/// Reads a stream to its end into a [`Record`]; with `remove_after`, hands the
/// stream back with [`Flow::Remove`] once it has that many bytes.
struct Reader {
    record: usize,
    buf: Vec<u8>,
    remove_after: Option<usize>,
}

impl Reader {
    fn new(record: usize) -> Reader {
        Reader {
            record,
            buf: vec![0; 256 * KIB as usize],
            remove_after: None,
        }
    }
}

impl StreamHandler<World> for Reader {
    fn ready(&mut self, world: &mut World, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let record = &mut world.records[self.record];
        record.readies += 1;
        assert!(
            readiness.is_readable(),
            "a download only asked for READABLE"
        );
        // At most a budget per event, so streams move in step; readiness is level-
        // triggered, so what is left is reported again next iteration.
        let mut moved = 0;
        while moved < READ_BUDGET {
            match cx.read(&mut self.buf) {
                Ok(0) => return Flow::Finish,
                Ok(n) => {
                    moved += n;
                    record.bytes.extend_from_slice(&self.buf[..n]);
                    if self.remove_after.is_some_and(|at| record.bytes.len() >= at) {
                        return Flow::Remove;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Continue,
                Err(e) => return Flow::Fail(Error::from(e)),
            }
        }
        Flow::Continue
    }

    fn closed(&mut self, world: &mut World, end: StreamEnd) {
        let record = &mut world.records[self.record];
        record.closes += 1;
        record.end = Some(ended(end));
    }
}

/// Does nothing; inserted with [`Interest::NONE`] it should never be called but to
/// be told its end.
struct Idle(usize);

impl StreamHandler<World> for Idle {
    fn ready(&mut self, world: &mut World, _cx: &mut StreamCtx<'_>, _readiness: Readiness) -> Flow {
        world.records[self.0].readies += 1;
        Flow::Continue
    }

    fn closed(&mut self, world: &mut World, end: StreamEnd) {
        let record = &mut world.records[self.0];
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
fn download_stream(bed: &Bed<World>, vol: &StorageVol) -> Stream {
    let mut stream = Stream::new(&bed.conn).expect("new stream");
    stream
        .with_virt(|virt_stream| vol.download(virt_stream, 0, 0, 0))
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
    let mut bed = Bed::start_with("remove", World::default());
    const LEN: usize = 32 * MIB as usize;
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pattern(10 + i, LEN)).collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();

    let records: Vec<usize> = (0..4).map(|_| bed.state.record()).collect();
    let mut tokens = Vec::new();
    for (i, vol) in vols.iter().enumerate() {
        let mut reader = Reader::new(records[i]);
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

    bed.drive(LIMIT, "the first stream removes itself", |_, w| {
        w.records[records[0]].has_ended()
    });
    let (removed, readies_at_removal, bytes_at_removal) = {
        let record = &mut bed.state.records[records[0]];
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
    for &record in &records[1..] {
        assert!(
            !bed.state.records[record].has_ended(),
            "the other streams are still running when the first leaves (precondition)"
        );
    }

    // The others complete, while the removed stream (data still pending on it, so
    // libvirt would report it READABLE) is held here, outside the reactor.
    bed.drive(LIMIT, "the other streams", |r, _| r.is_empty());
    for i in 1..4 {
        let record = &bed.state.records[records[i]];
        assert!(record.is_finished(), "stream {i}: {:?}", record.end);
        assert_eq!(record.closes, 1);
        assert!(record.bytes == contents[i], "stream {i}: content");
    }
    for _ in 0..5 {
        bed.run_once(Some(Duration::from_millis(20)))
            .expect("run_once");
    }
    assert_eq!(
        bed.state.records[records[0]].readies, readies_at_removal,
        "the removed stream's handler was called after it left"
    );
    assert_eq!(bed.state.records[records[0]].bytes.len(), bytes_at_removal);

    // The stream handed back is alive: insert it again and read the rest.
    let token = bed
        .reactor
        .insert(removed, Interest::READABLE, Reader::new(records[0]))
        .expect("insert the removed stream again");
    bed.drive(LIMIT, "the re-inserted stream", |r, w| {
        !r.contains(token) && w.records[records[0]].has_ended()
    });
    let record = &bed.state.records[records[0]];
    assert!(record.is_finished(), "{:?}", record.end);
    assert!(
        record.bytes == contents[0],
        "the two halves make up the volume"
    );

    drop(vols);
    bed.finish();
}

#[test]
fn streams_inserted_from_other_threads_complete() {
    let mut bed = Bed::start_with("threads", World::default());
    const THREADS: usize = 4;
    let contents: Vec<Vec<u8>> = (0..THREADS)
        .map(|i| pattern(20 + i as u64, 3 * MIB as usize + i))
        .collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();
    let records: Vec<usize> = (0..THREADS).map(|_| bed.state.record()).collect();

    let loop_thread = thread::current().id();
    let workers: Vec<_> = vols
        .iter()
        .zip(&records)
        .map(|(vol, &record)| {
            let (conn, vol, handle) = (bed.conn.clone(), vol.clone(), bed.reactor.handle());
            thread::spawn(move || {
                assert_ne!(thread::current().id(), loop_thread);
                // Created and attached on this thread, handed over to the loop.
                let mut stream = Stream::new(&conn).expect("new stream");
                stream
                    .with_virt(|virt_stream| vol.download(virt_stream, 0, 0, 0))
                    .expect("attach the stream to a download");
                let (reply_tx, reply) = mpsc::channel();
                handle
                    .execute(move |reactor, _| {
                        let _ = reply_tx.send(reactor.insert(
                            stream,
                            Interest::READABLE,
                            Reader::new(record),
                        ));
                    })
                    .expect("the reactor is there");
                reply
                    .recv_timeout(LIMIT)
                    .expect("the loop answers the insertion")
                    .expect("the insertion succeeds")
            })
        })
        .collect();

    bed.drive(LIMIT, "streams from other threads", |_, w| {
        records.iter().all(|&r| w.records[r].has_ended())
    });
    let tokens: Vec<StreamToken> = workers
        .into_iter()
        .map(|w| w.join().expect("worker thread"))
        .collect();
    for (i, &record) in records.iter().enumerate() {
        let record = &bed.state.records[record];
        assert!(record.is_finished(), "stream {i}: {:?}", record.end);
        assert!(record.bytes == contents[i], "stream {i}: content");
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

/// How many `run_once(200 ms)` iterations of the bed's reactor fit in `span`.
fn iterations_in(bed: &mut Bed<World>, span: Duration) -> u32 {
    let end = Instant::now() + span;
    let mut iterations = 0;
    while Instant::now() < end {
        bed.run_once(Some(Duration::from_millis(200)))
            .expect("run_once");
        iterations += 1;
    }
    iterations
}

#[test]
fn running_transfers_survive_the_slab_growing_under_them() {
    let mut bed = Bed::start_with("grow", World::default());
    const RUNNING: usize = 4;
    const LEN: usize = 32 * MIB as usize;
    let contents: Vec<Vec<u8>> = (0..RUNNING).map(|i| pattern(30 + i as u64, LEN)).collect();
    let vols: Vec<StorageVol> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| bed.pool.volume_with(&format!("vol{i}"), data))
        .collect();
    let tiny = bed.pool.volume_with("tiny", &pattern(39, 4096));

    for (i, vol) in vols.iter().enumerate() {
        let file = bed.out(&format!("file{i}"));
        let (index, _) = bed.download(vol, &file).expect("start a download");
        assert_eq!(index, i);
    }
    bed.drive(LIMIT, "every transfer has started", |_, w| {
        (0..RUNNING).all(|i| w.tracker.position(i) > 0)
    });

    let idle: Vec<usize> = (0..IDLE_STREAMS).map(|_| bed.state.record()).collect();
    let mut idle_tokens = Vec::new();
    for batch in idle.chunks(INSERT_BATCH) {
        for &record in batch {
            let stream = download_stream(&bed, &tiny);
            idle_tokens.push(
                bed.reactor
                    .insert(stream, Interest::NONE, Idle(record))
                    .expect("insert an idle stream"),
            );
        }
        // Let the transfers move between reallocations.
        bed.run_once(Some(Duration::ZERO)).expect("run_once");
    }
    assert_eq!(bed.reactor.len(), RUNNING + IDLE_STREAMS);
    for i in 0..RUNNING {
        let tracker = &bed.state.tracker;
        assert!(
            !tracker.is_ended(i) && tracker.position(i) < LEN as u64,
            "transfer {i} is still mid-flight after the slab grew (precondition)"
        );
    }

    bed.drive(LIMIT, "the running transfers", |_, w| w.tracker.all_ended());
    for (i, data) in contents.iter().enumerate() {
        assert_eq!(bed.state.tracker.ok(i).data_bytes, LEN as u64);
        assert!(
            file_is(&bed.out(&format!("file{i}")), data),
            "transfer {i}: content"
        );
    }

    assert_eq!(bed.reactor.len(), IDLE_STREAMS);
    // Data is pending on every idle stream, but nobody asked for it: libvirt must
    // not be told to report it, or the loop would wake for it on every iteration.
    let iterations = iterations_in(&mut bed, Duration::from_secs(1));
    assert!(
        iterations <= IDLE_ITERATIONS,
        "{iterations} iterations in 1 s with only uninterested streams left"
    );
    for token in &idle_tokens {
        bed.reactor
            .abort(*token, &mut bed.state)
            .expect("abort an idle stream");
    }
    // A remote stream's abort waits for the daemon's answer, off the loop.
    bed.drive(LIMIT, "the aborts", |r, _| r.is_empty());
    for (i, &record) in idle.iter().enumerate() {
        let record = &bed.state.records[record];
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
    let mut bed = Bed::start_with("stale", World::default());
    let small = pattern(40, 256 * KIB as usize);
    let big = pattern(41, 32 * MIB as usize);
    let small_vol = bed.pool.volume_with("small", &small);
    let big_vol = bed.pool.volume_with("big", &big);

    let first = bed.state.record();
    let stream = download_stream(&bed, &small_vol);
    let old = bed
        .reactor
        .insert(stream, Interest::READABLE, Reader::new(first))
        .expect("insert");
    bed.drive(LIMIT, "the first stream", |r, _| r.is_empty());
    let record = &bed.state.records[first];
    assert!(record.is_finished() && record.bytes == small);

    // A finished stream's token, its slot empty.
    assert!(!bed.reactor.contains(old));
    let refused = |reactor: &mut Reactor<World>, state: &mut World, token: StreamToken| {
        assert!(matches!(
            reactor.set_interest(token, Interest::NONE),
            Err(Error::InvalidToken)
        ));
        assert!(matches!(
            reactor.finish(token, state),
            Err(Error::InvalidToken)
        ));
        assert!(matches!(
            reactor.abort(token, state),
            Err(Error::InvalidToken)
        ));
        assert!(matches!(reactor.remove(token), Err(Error::InvalidToken)));
        assert!(matches!(
            reactor.writer(token, 1024),
            Err(Error::InvalidToken)
        ));
    };
    refused(&mut bed.reactor, &mut bed.state, old);

    // The slot is reused by a new stream: same key, new generation.
    let second = bed.state.record();
    let stream = download_stream(&bed, &big_vol);
    let new = bed
        .reactor
        .insert(stream, Interest::READABLE, Reader::new(second))
        .expect("insert");
    let ((old_key, old_gen), (new_key, new_gen)) =
        (key_and_generation(old), key_and_generation(new));
    assert_eq!(old_key, new_key, "the slab reuses the vacated slot");
    assert_ne!(old_gen, new_gen);
    assert_ne!(old, new);
    assert!(bed.reactor.contains(new) && !bed.reactor.contains(old));

    bed.drive(LIMIT, "the second stream has started", |_, w| {
        !w.records[second].bytes.is_empty()
    });
    assert!(
        !bed.state.records[second].has_ended(),
        "mid-flight (precondition)"
    );
    // Each of these would stall (NONE), end early (finish), abort or take the new
    // stream if the old token reached it; also when queued from the handle (a
    // panic in the job fails the next `run_once`, and so `drive`).
    refused(&mut bed.reactor, &mut bed.state, old);
    bed.reactor
        .handle()
        .execute(move |reactor, state| refused(reactor, state, old))
        .expect("the job is queued");
    bed.drive(LIMIT, "the second stream", |r, _| r.is_empty());
    let record = &bed.state.records[second];
    assert!(
        matches!(record.end, Some(Ended::Finished)),
        "{:?}",
        record.end
    );
    assert_eq!(record.closes, 1);
    assert!(record.bytes == big, "the new stream got all of its data");

    drop((small_vol, big_vol));
    bed.finish();
}

#[test]
fn a_stream_writer_blocks_while_full_and_the_loop_finishes_the_upload() {
    let mut bed = Bed::start_with("writer", World::default());
    const LEN: usize = 8 * MIB as usize;
    const CAPACITY: usize = 64 * KIB as usize;
    const PIECE: usize = MIB as usize;
    let data = pattern(50, LEN);
    let vol = bed.pool.create_volume("written", LEN as u64);

    let mut stream = Stream::new(&bed.conn).expect("new stream");
    stream
        .with_virt(|virt_stream| vol.upload(virt_stream, 0, LEN as u64, 0))
        .expect("attach the stream to an upload");
    let record = bed.state.record();
    // No interest of its own: only the writer's bytes make the reactor ask for
    // WRITABLE.
    let token = bed
        .reactor
        .insert(stream, Interest::NONE, Idle(record))
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
            .execute(move |reactor, state| {
                let _ = tx.send(reactor.finish(token, state).map_err(|e| e.to_string()));
            })
            .expect("the reactor is there");
        let finished = rx.recv_timeout(LIMIT).expect("the loop ran the job");
        let late = writer.write_all(b"late");
        (most_pending, finished, late)
    });

    bed.drive(LIMIT, "the written upload", |_, w| {
        w.records[record].has_ended()
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
    let record = &bed.state.records[record];
    assert!(
        matches!(record.end, Some(Ended::Finished)),
        "{:?}",
        record.end
    );
    assert_eq!(
        record.readies, 0,
        "WRITABLE for the outbox is not the handler's"
    );
    assert!(!bed.reactor.contains(token));
    assert!(
        file_is(&bed.pool.path_of("written"), &data),
        "the volume holds what was written"
    );

    drop(vol);
    bed.finish();
}

/// Panics on its first event; its record tells whether it was told its end, the
/// flag whether it was dropped.
struct Panicker {
    record: usize,
    dropped: Arc<AtomicBool>,
}

impl StreamHandler<World> for Panicker {
    fn ready(
        &mut self,
        _world: &mut World,
        _cx: &mut StreamCtx<'_>,
        _readiness: Readiness,
    ) -> Flow {
        panic!("handler boom");
    }

    fn closed(&mut self, world: &mut World, _end: StreamEnd) {
        world.records[self.record].closes += 1;
    }
}

impl Drop for Panicker {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_panicking_handler_aborts_only_its_stream() {
    let mut bed = Bed::start_with("panic", World::default());
    let data = pattern(60, 32 * MIB as usize);
    let vol = bed.pool.volume_with("vol", &data);

    let dropped = Arc::new(AtomicBool::new(false));
    let record = bed.state.record();
    let stream = download_stream(&bed, &vol);
    let token = bed
        .reactor
        .insert(
            stream,
            Interest::READABLE,
            Panicker {
                record,
                dropped: Arc::clone(&dropped),
            },
        )
        .expect("insert");
    // Started second, so that its 32 MiB cannot all arrive before the panicking
    // stream's first packet.
    let file = bed.out("file");
    let (other, _) = bed.download(&vol, &file).expect("start the download");

    let deadline = Instant::now() + LIMIT;
    let mut errors = Vec::new();
    while !bed.state.tracker.is_ended(other) {
        assert!(Instant::now() < deadline, "the other transfer did not end");
        if let Err(e) = bed.run_once(Some(Duration::from_millis(100))) {
            errors.push((e, bed.state.tracker.is_ended(other)));
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
    assert_eq!(
        bed.state.records[record].closes, 0,
        "a panicked handler is not called again"
    );
    assert_eq!(bed.state.tracker.ok(other).data_bytes, data.len() as u64);
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
    let mut bed = Bed::start_with("held", World::default());
    let held_vol = bed.pool.volume_with("held", &pattern(11, LEN));
    let record = bed.state.record();
    let mut reader = Reader::new(record);
    reader.remove_after = Some(1);
    bed.reactor
        .insert(download_stream(&bed, &held_vol), Interest::READABLE, reader)
        .expect("insert");
    bed.drive(LIMIT, "the stream removes itself", |r, _| r.is_empty());
    let Some(Ended::Removed(held)) = bed.state.records[record].end.take() else {
        panic!(
            "expected StreamEnd::Removed, got {:?}",
            bed.state.records[record].end
        );
    };

    let data = pattern(12, LEN);
    let vol = bed.pool.volume_with("after", &data);
    let file = bed.out("after");
    let (index, _) = bed.download(&vol, &file).expect("start a download");
    bed.drive(LIMIT, "a new download finishes", |_, w| {
        w.tracker.is_ended(index)
    });
    assert_eq!(bed.state.tracker.ok(index).data_bytes, LEN as u64);
    assert!(file_is(&file, &data), "the download arrived intact");

    drop(held);
    drop((held_vol, vol));
    bed.finish();
}
