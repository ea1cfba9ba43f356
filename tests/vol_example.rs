//! The `vol` example end to end, as a user runs it, against a private libvirtd:
//! several downloads with one missing volume among them, a sparse download, and
//! bad input: destinations that must not be replaced, sources of unknown size,
//! ranges past the end, one file for two downloads, a daemon lost mid-upload.

mod support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::pool::{allocated, data_extents, file_is, pattern, read_range, Bed, KIB, MIB};
use support::vol::{path, run_vol, vol_command, Run};
use virt::storage_vol::StorageVol;

/// Volumes `names` in the bed's pool, the i-th holding `pattern(seed + i, len)`,
/// and what they hold.
fn volumes(bed: &Bed, names: &[&str], seed: u64, len: usize) -> (Vec<StorageVol>, Vec<Vec<u8>>) {
    let data: Vec<Vec<u8>> = (0..names.len() as u64)
        .map(|i| pattern(seed + i, len))
        .collect();
    let vols = names
        .iter()
        .zip(&data)
        .map(|(name, data)| bed.pool.volume_with(name, data))
        .collect();
    (vols, data)
}

#[test]
fn vol_downloads_several_volumes_and_names_the_missing_one() {
    let bed = Bed::start("example");
    let first = pattern(5000, 3 * MIB as usize);
    let third = pattern(5002, 2 * MIB as usize + 7);
    let vols = [
        bed.pool.volume_with("first", &first),
        bed.pool.volume_with("third", &third),
    ];
    let (f1, f2, f3) = (bed.out("first"), bed.out("ghost"), bed.out("third"));

    let run = run_vol(
        &bed,
        "download",
        &["first", path(&f1), "ghost", path(&f2), "third", path(&f3)],
    );
    assert_eq!(
        run.code,
        Some(5),
        "exit code 5 when a volume is missing\n{}",
        run.all()
    );
    let ghost = run.line("ghost");
    assert!(
        ghost.starts_with("ghost: failed:") && ghost.contains("Storage volume not found"),
        "the missing volume is named with its reason: {ghost}"
    );
    assert_eq!(
        run.line("first"),
        format!(
            "first: ok, {} data bytes, 0 hole(s) of 0 bytes",
            first.len()
        )
    );
    assert_eq!(
        run.line("third"),
        format!(
            "third: ok, {} data bytes, 0 hole(s) of 0 bytes",
            third.len()
        )
    );
    assert!(file_is(&f1, &first), "first is byte-identical");
    assert!(file_is(&f3, &third), "third is byte-identical");
    assert!(!f2.exists() && !bed.out("ghost.part").exists());

    drop(vols);
    bed.finish();
}

#[test]
fn vol_sparse_download_keeps_holes() {
    let bed = Bed::start("example");
    // A leading hole, two data extents, and a trailing hole: the file's length comes
    // from the final `set_len` of the download.
    const LEN: u64 = 64 * MIB;
    let layout = [(8 * MIB, MIB), (40 * MIB, MIB)];
    let vol = bed.pool.create_volume("holey", LEN);
    let volume_file = bed.pool.path_of("holey");
    for (i, &(offset, len)) in layout.iter().enumerate() {
        support::pool::write_at(
            &volume_file,
            offset,
            &pattern(5100 + i as u64, len as usize),
        );
    }
    assert_eq!(data_extents(&volume_file), layout.to_vec(), "precondition");
    let copy = bed.out("holey");

    let run = run_vol(&bed, "download", &["--sparse", "holey", path(&copy)]);
    assert_eq!(run.code, Some(0), "vol --sparse failed\n{}", run.all());
    let data: u64 = layout.iter().map(|&(_, len)| len).sum();
    assert_eq!(
        run.line("holey"),
        format!(
            "holey: ok, {data} data bytes, 3 hole(s) of {} bytes",
            LEN - data
        )
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), LEN);
    assert_eq!(data_extents(&copy), layout.to_vec(), "holes kept");
    let used = allocated(&copy);
    assert!(
        (data..=data + MIB).contains(&used),
        "the copy occupies its data, {data} bytes, not {LEN}: {used}"
    );
    for &(offset, len) in &layout {
        assert_eq!(
            read_range(&copy, offset, len),
            read_range(&volume_file, offset, len),
            "data at {offset}"
        );
    }

    drop(vol);
    bed.finish();
}

/// A device node `name` in the output directory, like the one at /dev (`mknod`):
/// the tests write to their own nodes, never to the system's.
fn device(bed: &Bed, name: &str, major: u32, minor: u32) -> PathBuf {
    let node = bed.out(name);
    let status = Command::new("mknod")
        .arg(&node)
        .args(["c", &major.to_string(), &minor.to_string()])
        .status()
        .expect("run mknod");
    assert!(status.success(), "mknod {}", node.display());
    node
}

/// Whether `path` is still the character device `major:minor`.
fn is_char_device(path: &Path, major: u64, minor: u64) -> bool {
    let meta = fs::symlink_metadata(path).expect("stat the node");
    meta.file_type().is_char_device() && meta.rdev() == libc::makedev(major as u32, minor as u32)
}

/// The names in the output directory, sorted.
fn listing(bed: &Bed) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&bed.out)
        .expect("list the output directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Nothing is in the output directory.
fn assert_nothing_created(bed: &Bed) {
    let names = listing(bed);
    assert!(names.is_empty(), "nothing created: {names:?}");
}

/// A download target of each kind: a device, a link to a file, a directory and a
/// file, with what the link names.
struct Targets {
    full: PathBuf,
    link: PathBuf,
    linked: PathBuf,
    dir: PathBuf,
    file: PathBuf,
}

impl Targets {
    fn new(bed: &Bed) -> Targets {
        let targets = Targets {
            full: device(bed, "full", 1, 7),
            link: bed.out("link"),
            linked: bed.out("linked"),
            dir: bed.out("dir"),
            file: bed.out("file"),
        };
        fs::write(&targets.linked, b"linked").unwrap();
        std::os::unix::fs::symlink(&targets.linked, &targets.link).unwrap();
        fs::create_dir(&targets.dir).unwrap();
        fs::write(&targets.file, b"file").unwrap();
        targets
    }

    /// The link still names the same file, and the directory is still empty.
    fn assert_link_and_dir_kept(&self) {
        assert_eq!(
            fs::read_link(&self.link).unwrap(),
            self.linked,
            "the link is kept"
        );
        assert_eq!(fs::read_dir(&self.dir).unwrap().count(), 0);
    }
}

/// 4 of the issue: as root, `vol download VOL /dev/full` exited 0 and replaced the
/// device node with a regular file, and a symbolic link was replaced. Now anything
/// at the destination is refused, named with what it is, and left as it was.
#[test]
fn vol_download_leaves_devices_links_directories_and_files_alone() {
    let bed = Bed::start("example");
    let (vols, _) = volumes(&bed, &["a", "b", "c", "d"], 5200, 64 * KIB as usize);
    let t = Targets::new(&bed);
    let before = listing(&bed);

    let run = run_vol(
        &bed,
        "download",
        &[
            "a",
            path(&t.full),
            "b",
            path(&t.link),
            "c",
            path(&t.dir),
            "d",
            path(&t.file),
        ],
    );
    let all = run.all();
    assert_eq!(run.code, Some(6), "{all}");
    let hint = " (--force writes over it)";
    for (name, target, kind, hint) in [
        ("a", &t.full, "character device", hint),
        ("b", &t.link, "symbolic link", hint),
        ("c", &t.dir, "directory", ""),
        ("d", &t.file, "regular file", hint),
    ] {
        assert_eq!(
            run.line(name),
            format!(
                "{name}: failed: {}: a {kind} is there already; not overwritten{hint}",
                target.display()
            ),
            "{all}"
        );
    }
    assert!(is_char_device(&t.full, 1, 7), "the device node is kept");
    t.assert_link_and_dir_kept();
    assert_eq!(fs::read(&t.linked).unwrap(), b"linked");
    assert_eq!(fs::read(&t.file).unwrap(), b"file");
    assert_eq!(listing(&bed), before, "nothing created");

    drop(vols);
    bed.finish();
}

/// 4 of the issue, when asked with `--force`: a device is written through and stays
/// a device (a full one fails, naming the device), a link is followed and stays a
/// link, a regular file is replaced; a directory is still refused.
#[test]
fn vol_download_with_force_writes_through_devices_and_links() {
    let bed = Bed::start("example");
    let (vols, data) = volumes(
        &bed,
        &["a", "b", "c", "d", "e"],
        5300,
        64 * KIB as usize + 11,
    );
    let t = Targets::new(&bed);
    let null = device(&bed, "null", 1, 3);
    let before = listing(&bed);

    let run = run_vol(
        &bed,
        "download",
        &[
            "--force",
            "--sparse",
            "a",
            path(&null),
            "b",
            path(&t.link),
            "c",
            path(&t.file),
            "d",
            path(&t.dir),
            "e",
            path(&t.full),
        ],
    );
    let all = run.all();
    assert_eq!(run.code, Some(6), "{all}");
    for name in ["a", "b", "c"] {
        assert!(
            run.line(name).starts_with(&format!("{name}: ok, ")),
            "{all}"
        );
    }
    assert_eq!(
        run.line("d"),
        format!(
            "d: failed: {}: a directory is there already; not overwritten",
            t.dir.display()
        )
    );
    let e = run.line("e");
    assert!(
        e.starts_with(&format!("e: failed: I/O: {}: ", t.full.display()))
            && e.contains("No space left on device"),
        "{all}"
    );
    assert!(is_char_device(&null, 1, 3), "written through, not replaced");
    assert!(
        is_char_device(&t.full, 1, 7),
        "written through, not replaced"
    );
    t.assert_link_and_dir_kept();
    assert!(
        file_is(&t.linked, &data[1]),
        "what the link names is replaced"
    );
    assert!(file_is(&t.file, &data[2]), "the file is replaced");
    assert_eq!(listing(&bed), before, "nothing else created");

    drop(vols);
    bed.finish();
}

/// 5 of the issue: an upload from a character device took its size from its
/// metadata, 0, and reported `ok, 0 data bytes`. Now it sends exactly `--length`
/// bytes; without `--length`, or from a source that ends early, it fails, names
/// the source and leaves the volume as it was.
#[test]
fn vol_upload_from_a_stream_sends_exactly_the_length() {
    let bed = Bed::start("example");
    let (vols, data) = volumes(&bed, &["a", "b", "c", "d"], 5400, 64 * KIB as usize);
    let zero = device(&bed, "zero", 1, 5);
    let null = device(&bed, "null", 1, 3);
    let short = bed.out("short");
    fs::write(&short, pattern(5410, 1000)).unwrap();

    let run = run_vol(&bed, "upload", &["--length", "4096", "a", path(&zero)]);
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_eq!(
        run.line("a"),
        "a: ok, 4096 data bytes, 0 hole(s) of 0 bytes"
    );
    let mut expected = data[0].clone();
    expected[..4096].fill(0);
    assert!(file_is(&bed.pool.path_of("a"), &expected), "4096 zeros");

    let run = run_vol(&bed, "upload", &["b", path(&zero)]);
    assert_eq!(run.code, Some(6), "{}", run.all());
    assert_eq!(
        run.line("b"),
        format!(
            "b: failed: I/O: {}: a character device has no size: give the length to upload",
            zero.display()
        )
    );

    let run = run_vol(
        &bed,
        "upload",
        &["--length", "4096", "c", path(&null), "d", path(&short)],
    );
    assert_eq!(run.code, Some(6), "{}", run.all());
    assert_eq!(
        run.line("c"),
        format!(
            "c: failed: I/O: {}: ended after 0 of 4096 bytes",
            null.display()
        )
    );
    assert_eq!(
        run.line("d"),
        format!(
            "d: failed: I/O: {}: holds 1000 bytes, fewer than the 4096 to upload",
            short.display()
        )
    );
    for (i, name) in ["b", "c", "d"].iter().enumerate() {
        assert!(
            file_is(&bed.pool.path_of(name), &data[i + 1]),
            "volume {name} is untouched"
        );
    }

    drop(vols);
    bed.finish();
}

/// 5 of the issue: `--offset 999999999` past the end of a 4 MiB volume exited 0
/// with an empty file. Now it fails before anything starts, and creates nothing.
#[test]
fn vol_download_refuses_a_range_past_the_volume_end() {
    let bed = Bed::start("example");
    let vol = bed
        .pool
        .volume_with("four", &pattern(5500, 4 * MIB as usize));
    let file = bed.out("four");

    let run = run_vol(
        &bed,
        "download",
        &["--offset", "999999999", "four", path(&file)],
    );
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_eq!(
        run.line("four"),
        "four: failed: bytes 999999999 to its end are outside the volume, which holds 4194304 bytes"
    );
    assert_nothing_created(&bed);

    drop(vol);
    bed.finish();
}

/// 5 of the issue: two volumes downloaded into one FILE both reported `ok` and the
/// file matched neither. Now the run is refused before anything starts, also when
/// the two name the file differently; so are two uploads into one volume.
#[test]
fn vol_refuses_two_transfers_into_one_file_or_volume() {
    let bed = Bed::start("example");
    let (vols, data) = volumes(&bed, &["one", "two"], 5600, 64 * KIB as usize);
    let file = bed.out("same");
    let other_name = bed.out.join(".").join("same");

    let run = run_vol(
        &bed,
        "download",
        &["one", path(&file), "two", path(&other_name)],
    );
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "vol: {} is the destination of both one and two",
            other_name.display()
        )
    );
    assert_nothing_created(&bed);

    // Two uploads into one volume would interleave.
    let source = bed.out("source");
    fs::write(&source, pattern(5602, 64 * KIB as usize)).unwrap();
    let run = run_vol(
        &bed,
        "upload",
        &["one", path(&source), "one", path(&source)],
    );
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert_eq!(run.stderr.trim_end(), "vol: volume one is given twice");
    assert!(
        file_is(&bed.pool.path_of("one"), &data[0]),
        "the volume is untouched"
    );

    drop(vols);
    bed.finish();
}

/// 6 of the issue: the daemon dies while an upload is part way. The summary names
/// the volume as partly written, and the exit code (3) says so. The source is a
/// FIFO the test feeds, so the kill comes while the upload is surely in flight.
#[test]
fn vol_names_the_volume_a_lost_daemon_leaves_partly_written() {
    let mut bed = Bed::start("example");
    const LEN: usize = 4 * MIB as usize;
    let data = pattern(5700, LEN);
    let vol = bed.pool.create_volume("fed", LEN as u64);
    let volume_file = bed.pool.path_of("fed");
    let fifo = bed.out("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let length = LEN.to_string();
    let vol_process = vol_command(&bed, "upload", &["--length", &length, "fed", path(&fifo)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the vol example");

    // The first MiB now; the rest once the daemon is gone (vol may have stopped
    // reading by then: a broken pipe is expected).
    let (killed, killed_rx) = std::sync::mpsc::channel::<()>();
    let feeder = {
        let (fifo, data) = (fifo.clone(), data.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut pipe = fs::OpenOptions::new().write(true).open(&fifo)?;
            pipe.write_all(&data[..MIB as usize])?;
            let _ = killed_rx.recv();
            pipe.write_all(&data[MIB as usize..])
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = 64 * KIB;
    while read_range(&volume_file, 0, first) != data[..first as usize] {
        assert!(
            Instant::now() < deadline,
            "the upload's first bytes did not reach the volume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.daemon.kill();
    // The feeder may be gone already: vol, seeing the daemon lost, closed the FIFO
    // while the feeder still wrote the first MiB.
    let _ = killed.send(());
    let output = vol_process.wait_with_output().expect("wait for vol");
    let _ = feeder.join().expect("the feeder thread");

    let run = Run::new(&output);
    let all = run.all();
    assert_eq!(run.code, Some(3), "{all}");
    let line = run.line("fed");
    assert!(
        line.starts_with("fed: failed: the connection to libvirt was lost (")
            && line.contains("; volume PARTLY WRITTEN: "),
        "{all}"
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "1 volume(s) partly written: fed"),
        "{all}"
    );
    assert!(
        !file_is(&volume_file, &data),
        "precondition: the upload did not complete"
    );

    drop(vol);
    drop(bed);
}
