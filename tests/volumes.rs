//! Volume transfers through `virt_reactor::volume` against a private libvirtd with a
//! real `dir` pool: many at once on one reactor, sparse round trips, resumable
//! downloads and read-back comparisons.
//!
//! Each test registers the process-wide event loop itself: run under cargo-nextest
//! (one process per test).

mod support;

use std::io;
use std::path::Path;
use std::time::Duration;

use support::pool::{
    allocated, assert_sparse_stats, data_extents, file_is, parts_of, pattern, read_range,
    sparse_source, Bed, Tracker, KIB, MIB,
};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, VolumeRange};
use virt_reactor::Error;

/// How many transfers run at once in the concurrency tests.
const CONCURRENT: usize = 64;
/// Time limit of one batch of transfers (they take about a second).
const BATCH_LIMIT: Duration = Duration::from_secs(60);

/// Volume sizes between 2 and 4 MiB, none a multiple of libvirt's 256 KiB packets.
fn size_of(i: usize) -> usize {
    (2 * MIB + (i as u64) * 32 * KIB + 4099 * i as u64 % 4096 + 1) as usize
}

/// Which way the concurrency tests move their bytes.
#[derive(Clone, Copy)]
enum Way {
    Download,
    Upload,
}

#[test]
fn sixty_four_concurrent_downloads_arrive_intact() {
    concurrent_transfers_arrive_intact(Way::Download);
}

#[test]
fn sixty_four_concurrent_uploads_arrive_intact() {
    concurrent_transfers_arrive_intact(Way::Upload);
}

/// [`CONCURRENT`] transfers `way` on one reactor at once, each of a different size:
/// every one arrives whole, without holes.
fn concurrent_transfers_arrive_intact(way: Way) {
    let (name, seed) = match way {
        Way::Download => ("download", 1000),
        Way::Upload => ("upload", 2000),
    };
    let mut bed = Bed::start(&format!("{name}s"));
    let mut expected = Vec::new();
    let mut vols = Vec::new();
    for i in 0..CONCURRENT {
        let data = pattern(seed + i as u64, size_of(i));
        let vol = format!("vol{i}");
        vols.push(match way {
            Way::Download => bed.pool.volume_with(&vol, &data),
            Way::Upload => {
                std::fs::write(bed.out(&format!("file{i}")), &data).expect("write a source file");
                bed.pool.create_volume(&vol, data.len() as u64)
            }
        });
        expected.push(data);
    }

    for (i, vol) in vols.iter().enumerate() {
        let file = bed.out(&format!("file{i}"));
        let started = match way {
            Way::Download => bed.download(vol, &file),
            Way::Upload => bed.upload(vol, &file),
        };
        let (index, _) = started.unwrap_or_else(|e| panic!("start {name} {i}: {e}"));
        assert_eq!(index, i);
    }
    assert_eq!(bed.reactor.len(), CONCURRENT, "all {name}s run at once");
    bed.drive(BATCH_LIMIT, &format!("{CONCURRENT} {name}s"), |r, _| {
        r.is_empty()
    });

    for (i, data) in expected.iter().enumerate() {
        let stats = bed.state.ok(i);
        assert_eq!(
            stats.data_bytes,
            data.len() as u64,
            "{name} {i}: bytes reported"
        );
        assert_eq!((stats.holes, stats.hole_bytes), (0, 0), "{name} {i}");
        match way {
            Way::Download => {
                let file = bed.out(&format!("file{i}"));
                assert!(file_is(&file, data), "download {i}: content differs");
                assert!(parts_of(&file).is_empty());
            }
            Way::Upload => {
                let volume_file = bed.pool.path_of(&format!("vol{i}"));
                assert!(
                    file_is(&volume_file, data),
                    "upload {i}: volume content differs"
                );
            }
        }
    }
    drop(vols);
    bed.finish();
}

/// A 1 GiB file with three data extents and two holes: 1 MiB at 0, 2 MiB at 300 MiB,
/// and 1 MiB that ends exactly at 1 GiB. Data at both ends means each hole is
/// bounded by data, so both directions must report exactly two holes, and the file
/// length is carried by data rather than by a final `set_len`; the trailing-hole
/// case is covered by the `vol --sparse` test in `tests/vol_example.rs`.
const SPARSE_LEN: u64 = 1024 * MIB;

#[test]
fn sparse_round_trip_of_a_gibibyte_keeps_its_holes() {
    let mut bed = Bed::start("sparse");
    let layout = [(0, MIB), (300 * MIB, 2 * MIB), (SPARSE_LEN - MIB, MIB)];
    let source = bed.out("source.img");
    let (data_len, hole_len) = sparse_source(&source, SPARSE_LEN, &layout);

    let vol = bed.pool.create_volume("sparse.img", SPARSE_LEN);
    let volume_file = bed.pool.path_of("sparse.img");
    assert!(
        allocated(&volume_file) < MIB,
        "a volume created with allocation 0 is sparse"
    );
    let sparse = VolumeRange {
        sparse: true,
        ..VolumeRange::default()
    };

    let (up, _) = bed
        .state
        .upload(&mut bed.reactor, &vol, &source, sparse)
        .expect("start the sparse upload");
    bed.drive(BATCH_LIMIT, "sparse upload", |r, _| r.is_empty());
    let stats = bed.state.ok(up);
    assert_sparse_stats("upload", &stats, data_len, hole_len);
    assert_eq!(
        data_extents(&volume_file),
        layout.to_vec(),
        "the volume got the data where it belongs, and holes elsewhere"
    );
    assert!(
        allocated(&volume_file) <= data_len + MIB,
        "the volume stays sparse: {} bytes allocated",
        allocated(&volume_file)
    );

    let copy = bed.out("copy.img");
    let (down, _) = bed
        .state
        .download(&mut bed.reactor, &vol, &copy, sparse)
        .expect("start the sparse download");
    bed.drive(BATCH_LIMIT, "sparse download", |r, _| r.is_empty());
    let stats = bed.state.ok(down);
    assert_sparse_stats("download", &stats, data_len, hole_len);
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), SPARSE_LEN);
    assert_eq!(data_extents(&copy), layout.to_vec(), "holes preserved");
    let used = allocated(&copy);
    assert!(
        (data_len..=data_len + MIB).contains(&used),
        "the copy occupies about its data ({data_len} bytes), not 1 GiB: {used} bytes"
    );
    // Same length, same data extents and the same bytes in them: byte-identical,
    // since a hole reads as zeros. (Reading all of 1 GiB in an unoptimised test
    // build takes seconds.)
    for &(offset, len) in &layout {
        assert_eq!(
            read_range(&copy, offset, len),
            read_range(&source, offset, len),
            "the copy's data at {offset}"
        );
    }

    drop(vol);
    bed.finish();
}

/// libvirt's error inside one of ours.
fn libvirt_code(e: &Error) -> ErrorNumber {
    match e.libvirt().map(|e| e.code()) {
        Some(Enum::Known(code)) => code,
        _ => panic!("expected a libvirt error, got {e:?}"),
    }
}

/// `on_progress` of a transfer that must never start.
fn no_progress(_: &mut Tracker, _: TransferStats) {}

/// `on_end` of a transfer that must never start.
fn never_ends(_: &mut Tracker, result: virt_reactor::Result<TransferStats>) {
    panic!("a transfer that never started ended: {result:?}");
}

#[test]
fn bad_input_fails_clearly_and_disturbs_nothing() {
    let mut bed = Bed::start("bad");
    const LEN: usize = 32 * MIB as usize;
    let data = pattern(4000, LEN);
    let vol = bed.pool.volume_with("background", &data);
    let background_file = bed.out("background");
    let (background, background_token) = bed
        .download(&vol, &background_file)
        .expect("start the background download");
    bed.drive(BATCH_LIMIT, "background progress", |_, tracker| {
        tracker.position(background) > 0
    });
    // After each case: the background transfer is untouched and still running.
    let still_running = |bed: &mut Bed, case: &str| {
        bed.run_once(Some(Duration::ZERO))
            .unwrap_or_else(|e| panic!("{case}: run_once: {e}"));
        assert!(
            !bed.state.is_ended(background) && bed.reactor.contains(background_token),
            "{case}: the background transfer is in flight (precondition)"
        );
        assert_eq!(bed.reactor.len(), 1, "{case}: nothing else was inserted");
    };
    let nothing_at = |file: &Path, case: &str| {
        assert!(!file.exists(), "{case}: left {}", file.display());
        let parts = parts_of(file);
        assert!(parts.is_empty(), "{case}: left {parts:?}");
    };

    // A missing pool.
    let e = bed
        .conn
        .lookup_storage_pool_by_name("no-such-pool")
        .expect_err("look up a missing pool");
    assert_eq!(e.code(), Enum::Known(ErrorNumber::NoStoragePool), "{e}");
    assert!(e.message().contains("no-such-pool"), "{}", e.message());
    still_running(&mut bed, "missing pool");

    // A missing volume: the lookup fails, and so does a download of a volume that
    // was deleted after it was looked up.
    let e = bed
        .pool
        .pool
        .lookup_storage_vol_by_name("no-such-vol")
        .expect_err("look up a missing volume");
    assert_eq!(e.code(), Enum::Known(ErrorNumber::NoStorageVolume), "{e}");
    let doomed = bed.pool.volume_with("doomed", &pattern(4001, 4096));
    doomed.delete(0).expect("delete the volume");
    let file = bed.out("doomed");
    let e = volume::download(
        &mut bed.reactor,
        &doomed,
        &file,
        VolumeRange::default(),
        no_progress,
        never_ends,
    )
    .expect_err("download a deleted volume");
    assert_eq!(libvirt_code(&e), ErrorNumber::NoStorageVolume, "{e}");
    nothing_at(&file, "missing volume");
    still_running(&mut bed, "missing volume");

    // An output path in a directory that does not exist.
    let file = bed.out("no-such-dir").join("file");
    let e = volume::download(
        &mut bed.reactor,
        &vol,
        &file,
        VolumeRange::default(),
        no_progress,
        never_ends,
    )
    .expect_err("download into a missing directory");
    match &e {
        Error::Io(io) => {
            assert_eq!(io.kind(), io::ErrorKind::NotFound, "{io}");
            assert!(
                io.to_string().contains(&file.display().to_string()),
                "the error names the path: {io}"
            );
        }
        e => panic!("expected Error::Io, got {e:?}"),
    }
    nothing_at(&file, "unwritable output");
    still_running(&mut bed, "unwritable output");

    // An upload bigger than the volume, from its start and from an offset.
    let small_data = pattern(4002, 2 * MIB as usize);
    let small = bed.pool.volume_with("small", &small_data);
    let source = bed.out("too-big");
    std::fs::write(&source, pattern(4003, 2 * MIB as usize + 1)).unwrap();
    let e = volume::upload(
        &mut bed.reactor,
        &small,
        &source,
        VolumeRange::default(),
        no_progress,
        never_ends,
    )
    .expect_err("upload more than the volume holds");
    assert!(
        matches!(e, Error::VolumeTooSmall { needed, capacity }
            if needed == 2 * MIB + 1 && capacity == 2 * MIB),
        "{e:?}"
    );
    let at_offset = VolumeRange {
        offset: MIB + MIB / 2,
        length: MIB,
        ..VolumeRange::default()
    };
    let e = volume::upload(
        &mut bed.reactor,
        &small,
        &source,
        at_offset,
        no_progress,
        never_ends,
    )
    .expect_err("upload past the volume's end");
    assert!(
        matches!(e, Error::VolumeTooSmall { needed, capacity }
            if needed == 2 * MIB + MIB / 2 && capacity == 2 * MIB),
        "{e:?}"
    );
    assert!(
        file_is(&bed.pool.path_of("small"), &small_data),
        "the volume is untouched"
    );
    still_running(&mut bed, "upload too big");

    // A download that fails half way leaves neither FILE nor its `.part`.
    let file = bed.out("interrupted");
    let (interrupted, token) = bed.download(&vol, &file).expect("start a download");
    bed.drive(BATCH_LIMIT, "a second download moves", |_, tracker| {
        tracker.position(interrupted) > 0
    });
    assert_eq!(parts_of(&file).len(), 1, "its .part while it runs");
    assert!(
        !bed.state.is_ended(interrupted),
        "mid-flight (precondition)"
    );
    bed.reactor.abort(token, &mut bed.state).expect("abort it");
    // A remote stream's abort waits for the daemon's answer, off the loop.
    bed.drive(BATCH_LIMIT, "the abort", |_, tracker| {
        tracker.is_ended(interrupted)
    });
    bed.state.with(interrupted, |t| {
        assert!(matches!(t.end, Some(Err(Error::Aborted))), "{:?}", t.end);
    });
    nothing_at(&file, "interrupted download");
    still_running(&mut bed, "interrupted download");

    bed.drive(BATCH_LIMIT, "the background transfer", |r, _| r.is_empty());
    assert_eq!(bed.state.ok(background).data_bytes, LEN as u64);
    assert!(file_is(&background_file, &data), "the background content");

    drop((vol, doomed, small));
    bed.finish();
}

/// Two downloads into one FILE on one reactor: each writes its own `.part` (before,
/// both wrote one `FILE.part`, and the file matched neither volume). The first to
/// finish takes the name; the second is refused rather than replace it.
#[test]
fn two_downloads_into_one_file_never_mix() {
    let mut bed = Bed::start("same");
    let (one, two) = (
        pattern(6000, 3 * MIB as usize),
        pattern(6001, 3 * MIB as usize),
    );
    let vols = [
        bed.pool.volume_with("one", &one),
        bed.pool.volume_with("two", &two),
    ];
    let file = bed.out("same");
    for vol in &vols {
        bed.download(vol, &file).expect("start a download");
    }
    assert_eq!(parts_of(&file).len(), 2, "one .part each");
    bed.drive(BATCH_LIMIT, "two downloads", |r, _| r.is_empty());
    let tracker = &bed.state;

    let ends: Vec<bool> = (0..2)
        .map(|i| tracker.with(i, |t| matches!(t.end, Some(Ok(_)))))
        .collect();
    assert_eq!(
        ends.iter().filter(|ok| **ok).count(),
        1,
        "exactly one download succeeds"
    );
    let winner = ends.iter().position(|ok| *ok).unwrap();
    tracker.with(1 - winner, |t| match &t.end {
        Some(Err(Error::DestinationExists { path, kind })) => {
            assert_eq!((path.as_path(), *kind), (file.as_path(), "regular file"));
        }
        other => panic!("the other download: {other:?}"),
    });
    assert!(
        file_is(&file, [&one, &two][winner]),
        "the file is the successful download's volume"
    );
    assert!(parts_of(&file).is_empty(), "no .part left");
    drop(vols);
    bed.finish();
}

/// A download range past the volume's end is refused before anything starts,
/// with a typed error (before, libvirt sent nothing and an empty file was "ok").
#[test]
fn a_download_range_past_the_end_is_refused() {
    let mut bed = Bed::start("range");
    let vol = bed
        .pool
        .volume_with("four", &pattern(6100, 4 * MIB as usize));
    let file = bed.out("four");
    let cases = [
        (999_999_999, 0),
        (4 * MIB, 0),
        (3 * MIB, 2 * MIB),
        (0, 4 * MIB + 1),
    ];
    for (offset, length) in cases {
        let range = VolumeRange {
            offset,
            length,
            ..VolumeRange::default()
        };
        let e = bed
            .state
            .download(&mut bed.reactor, &vol, &file, range)
            .expect_err("a range past the end");
        assert!(
            matches!(e, Error::OutOfRange { offset: o, length: l, size }
                if (o, l, size) == (offset, length, 4 * MIB)),
            "{offset}+{length}: {e:?}"
        );
        assert!(!file.exists() && parts_of(&file).is_empty());
    }
    assert!(bed.reactor.is_empty(), "nothing started");
    // The last bytes exactly are a valid range.
    let range = VolumeRange {
        offset: 4 * MIB - 10,
        ..VolumeRange::default()
    };
    let (index, _) = bed
        .state
        .download(&mut bed.reactor, &vol, &file, range)
        .expect("the last 10 bytes");
    bed.drive(BATCH_LIMIT, "10 bytes", |r, _| r.is_empty());
    assert_eq!(bed.state.ok(index).data_bytes, 10);
    drop(vol);
    bed.finish();
}

/// A tap that hashes what it sees, for the resume tests.
#[derive(Clone, Default)]
struct Sha(std::sync::Arc<std::sync::Mutex<sha2::Sha256>>);

impl volume::Tap for Sha {
    fn data(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut *self.0.lock().unwrap(), bytes);
    }

    fn hole(&mut self, length: u64) {
        self.data(&vec![0; length as usize]);
    }
}

impl Sha {
    fn of(bytes: &[u8]) -> Vec<u8> {
        <sha2::Sha256 as sha2::Digest>::digest(bytes).to_vec()
    }

    fn value(&self) -> Vec<u8> {
        sha2::Digest::finalize(self.0.lock().unwrap().clone()).to_vec()
    }
}

/// `compare` finds the first byte where a volume differs from a file, a hole of
/// the volume matching the file's zeros, and its tap sees just the prefix that
/// matched; with and without sparse streams.
#[test]
fn compare_finds_where_a_volume_first_differs_from_a_file() {
    let mut bed = Bed::start("compare");
    const LEN: usize = 4 * MIB as usize;
    let vol = bed.pool.create_volume("v", LEN as u64);
    let data = pattern(4100, MIB as usize);
    support::pool::write_at(&bed.pool.path_of("v"), MIB, &data);
    let mut same = vec![0; LEN];
    same[MIB as usize..2 * MIB as usize].copy_from_slice(&data);
    let differs_at = 3 * MIB as usize + 12345;
    let mut other = same.clone();
    other[differs_at] = 1;
    let (same_file, other_file) = (bed.out("same"), bed.out("other"));
    std::fs::write(&same_file, &same).unwrap();
    std::fs::write(&other_file, &other).unwrap();

    for sparse in [false, true] {
        for (file, expected) in [(&other_file, differs_at), (&same_file, LEN)] {
            let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
            let tap = Sha::default();
            let range = VolumeRange {
                sparse,
                ..VolumeRange::default()
            };
            let end = std::sync::Arc::clone(&slot);
            volume::compare(
                &mut bed.reactor,
                &vol,
                file,
                range,
                Some(Box::new(tap.clone())),
                move |_: &mut Tracker, matched| *end.lock().unwrap() = Some(matched),
            )
            .expect("start the comparison");
            bed.drive(BATCH_LIMIT, "compare", |_, _| {
                slot.lock().unwrap().is_some()
            });
            let matched = slot.lock().unwrap().take().unwrap().expect("compared");
            assert_eq!(matched, expected as u64, "sparse: {sparse}");
            assert_eq!(
                tap.value(),
                Sha::of(&same[..expected]),
                "the tap saw the prefix"
            );
        }
    }

    drop(vol);
    bed.finish();
}

/// A resumable download continues `FILE.part` from its length, and its tap sees
/// the whole range, the part on disk first; while it runs, another download of the
/// same FILE is refused.
#[test]
fn a_resumable_download_continues_its_part_which_it_locks() {
    let mut bed = Bed::start("resume");
    let data = pattern(4200, 3 * MIB as usize + 5);
    let vol = bed.pool.volume_with("v", &data);
    let file = bed.out("v");
    let part = bed.out("v.part");
    let on_disk = MIB as usize + 7;
    std::fs::write(&part, &data[..on_disk]).unwrap();

    let tap = Sha::default();
    let target = |resume| volume::Target::Resumable {
        path: file.clone(),
        resume,
    };
    let index = bed.state.as_mut().len();
    let started = bed
        .state
        .download_with(
            &mut bed.reactor,
            &vol,
            target(true),
            VolumeRange::default(),
            Some(Box::new(tap.clone())),
        )
        .expect("resume the download");
    assert_eq!(started.resumed_from, on_disk as u64);
    let e = volume::download_with(
        &mut bed.reactor,
        &vol,
        target(false),
        VolumeRange::default(),
        None,
        no_progress,
        never_ends,
    )
    .expect_err("a second download into the same .part");
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock),
        "{e:?}"
    );
    bed.drive(BATCH_LIMIT, "resumed download", |_, t| t.all_ended());
    let stats = bed.state.ok(index);
    assert_eq!(
        stats.position(),
        (data.len() - on_disk) as u64,
        "only the rest"
    );
    assert!(file_is(&file, &data), "byte-exact");
    assert!(!part.exists(), "the .part became the file");
    assert_eq!(tap.value(), Sha::of(&data), "the tap saw all of it");

    drop(vol);
    bed.finish();
}

/// A sparse download resumed from a `.part` that has holes keeps every hole, and
/// its tap sees the holes on disk as zeros.
#[test]
fn a_resumed_sparse_download_keeps_its_holes() {
    let mut bed = Bed::start("sparse-resume");
    const LEN: u64 = 8 * MIB;
    let layout = [(MIB, MIB), (5 * MIB, MIB)];
    let vol = bed.pool.create_volume("v", LEN);
    let volume_file = bed.pool.path_of("v");
    for (i, &(offset, len)) in layout.iter().enumerate() {
        support::pool::write_at(
            &volume_file,
            offset,
            &pattern(4300 + i as u64, len as usize),
        );
    }
    let whole = read_range(&volume_file, 0, LEN);
    let file = bed.out("v");
    // What an earlier download left: a hole, the first extent, a hole.
    let first = &whole[MIB as usize..2 * MIB as usize];
    support::pool::sparse_file(&bed.out("v.part"), 3 * MIB, &[(MIB, first)]);

    let tap = Sha::default();
    let target = volume::Target::Resumable {
        path: file.clone(),
        resume: true,
    };
    let sparse = VolumeRange {
        sparse: true,
        ..VolumeRange::default()
    };
    let index = bed.state.as_mut().len();
    let started = bed
        .state
        .download_with(
            &mut bed.reactor,
            &vol,
            target,
            sparse,
            Some(Box::new(tap.clone())),
        )
        .expect("resume the download");
    assert_eq!(started.resumed_from, 3 * MIB);
    bed.drive(BATCH_LIMIT, "resumed sparse download", |_, t| t.all_ended());
    assert_eq!(
        bed.state.ok(index).data_bytes,
        MIB,
        "only the second extent"
    );
    assert_eq!(data_extents(&file), layout.to_vec(), "holes kept");
    assert!(file_is(&file, &whole), "byte-exact");
    assert_eq!(tap.value(), Sha::of(&whole), "the tap saw all of it");

    drop(vol);
    bed.finish();
}
