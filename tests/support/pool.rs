//! Storage helpers for the stream tests: a `dir` pool on a private daemon, volumes
//! with known content, seeded pseudo-random data, content comparison, sparse-file extents, and
//! a deadline-bounded way to drive a reactor.
//!
//! Volume files live in the pool directory inside the daemon's temp dir; the tests
//! run as root (or as the daemon's own user), so they read and fill those files
//! directly, which is much cheaper than a blocking upload for test setup.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, VolumeRange};
use virt_reactor::{Reactor, StreamToken};

use super::daemon::PrivateDaemon;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A started, persistent `dir` pool.
pub struct DirPool {
    pub pool: StoragePool,
    /// The pool's target directory (owned by the daemon's uid).
    pub dir: PathBuf,
}

impl DirPool {
    /// Defines, builds and starts a persistent `dir` pool named `name` below the
    /// daemon's root (persistent, so it survives a daemon restart).
    pub fn create(daemon: &PrivateDaemon, conn: &Connect, name: &str) -> DirPool {
        let dir = daemon.root().join("pools").join(name);
        daemon
            .create_dir("pools")
            .expect("create the pools directory");
        let xml = format!(
            "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
            dir.display()
        );
        let pool = conn
            .define_storage_pool_xml(&xml, 0)
            .unwrap_or_else(|e| panic!("define pool {name}: {e}\n{}", daemon.log_tail(30)));
        pool.build(0)
            .unwrap_or_else(|e| panic!("build pool {name}: {e}\n{}", daemon.log_tail(30)));
        pool.create(0)
            .unwrap_or_else(|e| panic!("start pool {name}: {e}\n{}", daemon.log_tail(30)));
        DirPool { pool, dir }
    }

    /// Looks up a pool created earlier, starting it if needed (after a restart).
    pub fn lookup(conn: &Connect, name: &str, dir: &Path) -> DirPool {
        let pool = conn
            .lookup_storage_pool_by_name(name)
            .unwrap_or_else(|e| panic!("look up pool {name}: {e}"));
        if !pool.is_active().expect("pool state") {
            pool.create(0).expect("start the pool");
        }
        DirPool {
            pool,
            dir: dir.to_path_buf(),
        }
    }

    /// A raw volume of `capacity` bytes with no allocation: a fully sparse file
    /// (reads as zeros) until something writes to it.
    pub fn create_volume(&self, name: &str, capacity: u64) -> StorageVol {
        let xml = format!(
            "<volume><name>{name}</name>\
             <capacity unit='bytes'>{capacity}</capacity>\
             <allocation unit='bytes'>0</allocation>\
             <target><format type='raw'/></target></volume>"
        );
        StorageVol::create_xml(&self.pool, &xml, 0)
            .unwrap_or_else(|e| panic!("create volume {name}: {e}"))
    }

    /// A volume holding exactly `data` (written straight into its file).
    pub fn volume_with(&self, name: &str, data: &[u8]) -> StorageVol {
        let vol = self.create_volume(name, data.len() as u64);
        write_at(&self.path_of(name), 0, data);
        vol
    }

    /// The file behind volume `name`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes `data` at `offset` into the existing file at `path`, keeping its owner
/// and any holes elsewhere.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(data).expect("write");
}

/// A new sparse file of `len` bytes with `extents` of data (`(offset, bytes)`).
pub fn sparse_file(path: &Path, len: u64, extents: &[(u64, &[u8])]) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(len).expect("set_len");
    drop(file);
    for (offset, data) in extents {
        write_at(path, *offset, data);
    }
}

/// A new sparse file of `len` bytes with data (patterns seeded 3000, 3001, ...) at
/// each `(offset, length)` of `layout` and holes elsewhere; checks that the
/// filesystem keeps the holes. Returns its data bytes and its hole bytes.
pub fn sparse_source(path: &Path, len: u64, layout: &[(u64, u64)]) -> (u64, u64) {
    let contents: Vec<Vec<u8>> = layout
        .iter()
        .enumerate()
        .map(|(i, &(_, extent))| pattern(3000 + i as u64, extent as usize))
        .collect();
    let extents: Vec<(u64, &[u8])> = layout
        .iter()
        .zip(&contents)
        .map(|(&(offset, _), data)| (offset, data.as_slice()))
        .collect();
    sparse_file(path, len, &extents);
    assert_eq!(
        data_extents(path),
        layout.to_vec(),
        "the test filesystem keeps holes (precondition)"
    );
    let data_len: u64 = layout.iter().map(|&(_, extent)| extent).sum();
    (data_len, len - data_len)
}

/// Checks the totals of a sparse transfer of [`sparse_source`]'s file with
/// `data_len` data bytes in three extents: those bytes, two holes, `hole_len`
/// hole bytes.
pub fn assert_sparse_stats(what: &str, stats: &TransferStats, data_len: u64, hole_len: u64) {
    assert_eq!(
        (stats.data_bytes, stats.holes, stats.hole_bytes),
        (data_len, 2, hole_len),
        "{what}: data bytes, holes, hole bytes"
    );
}

/// xorshift64*: a cheap, seeded, reproducible number source.
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Xorshift {
        // Any state but 0 works; spread small seeds over the state.
        Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Size of the random block the patterns are cut from.
const BLOCK: usize = 1 << 20;
/// Size of one piece of a pattern.
const PIECE: usize = 4096;

/// 1 MiB of xorshift output, made once. Test builds are unoptimised, where a
/// byte-by-byte generator or hash costs tens of ns per word; patterns are therefore
/// cut from this block with `memcpy`, and contents are compared with `memcmp`.
fn random_block() -> &'static [u8] {
    static BLOCK_DATA: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK_DATA.get_or_init(|| {
        let mut rng = Xorshift::new(0x5eed);
        let mut block = Vec::with_capacity(BLOCK);
        while block.len() < BLOCK {
            block.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        block
    })
}

/// `len` pseudo-random bytes for `seed`: 4 KiB pieces of the random block at
/// offsets drawn from `seed`, each stamped with `(seed, piece index)` in its first
/// 16 bytes, so no two pieces of any two patterns are alike.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let block = random_block();
    let mut rng = Xorshift::new(seed);
    let mut data = Vec::with_capacity(len);
    let mut index: u64 = 0;
    while data.len() < len {
        let at = (rng.next_u64() % (BLOCK - PIECE) as u64) as usize;
        let start = data.len();
        data.extend_from_slice(&block[at..at + PIECE]);
        let stamp = [seed.to_le_bytes(), index.to_le_bytes()].concat();
        data[start..start + 16].copy_from_slice(&stamp);
        index += 1;
    }
    data.truncate(len);
    data
}

/// Whether the file at `path` holds exactly `expected`.
pub fn file_is(path: &Path, expected: &[u8]) -> bool {
    match fs::read(path) {
        Ok(bytes) => bytes == expected,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Whether two files have the same bytes, compared piece by piece.
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    if fa.metadata().expect("stat").len() != fb.metadata().expect("stat").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0; 4 * MIB as usize], vec![0; 4 * MIB as usize]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]).expect("read") {
            0 => break,
            n => got += n,
        }
    }
    got
}

/// `len` bytes of the file at `offset`.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0; len as usize];
    file.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// Bytes the file really occupies on disk (`st_blocks` × 512, as `du` counts).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// The file's data extents as `(offset, length)`, by `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = file.metadata().expect("stat").len();
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(data) = seek(&file, at, libc::SEEK_DATA) else {
            break;
        };
        let hole = seek(&file, data, libc::SEEK_HOLE).unwrap_or(len);
        extents.push((data, hole - data));
        at = hole;
    }
    extents
}

#[allow(unsafe_code)]
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: lseek on an fd `file` keeps open; it only moves the file offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "lseek: {e}");
        return None;
    }
    Some(at as u64)
}

/// The `.part` files of downloads into `file` (`FILE.<pid>-<n>.part`), if any.
pub fn parts_of(file: &Path) -> Vec<std::path::PathBuf> {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(file.parent().unwrap()) else {
        return Vec::new();
    };
    entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            let other = path.file_name().unwrap().to_string_lossy();
            other.starts_with(&format!("{name}.")) && other.ends_with(".part")
        })
        .collect()
}

/// Runs the reactor with `state` until `done` holds, panicking after `limit`.
pub fn drive<S>(
    reactor: &mut Reactor<S>,
    state: &mut S,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&Reactor<S>, &S) -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done(reactor, state) {
        assert!(
            Instant::now() < deadline,
            "{what}: not done within {limit:?} ({} stream(s) left)",
            reactor.len()
        );
        reactor
            .run_once(Some(Duration::from_millis(100)), state)
            .unwrap_or_else(|e| panic!("{what}: run_once: {e}"));
    }
}

/// Where each transfer of a test is: the state of the reactor the transfers run on
/// (or part of it, through `AsMut<Tracker>`), filled in by their callbacks.
#[derive(Default)]
pub struct Tracker {
    tracks: Vec<Track>,
}

impl AsMut<Tracker> for Tracker {
    fn as_mut(&mut self) -> &mut Tracker {
        self
    }
}

/// One transfer's progress and end.
#[derive(Default)]
pub struct Track {
    /// Stream position after the last progress call.
    pub position: u64,
    /// Progress calls so far.
    pub steps: u64,
    /// How it ended, once it has.
    pub end: Option<virt_reactor::Result<TransferStats>>,
    /// When it ended.
    pub ended_at: Option<Instant>,
    /// How many times `on_end` was called (must end up exactly 1).
    pub ends: u32,
}

/// `on_progress` for the transfer at `index` of the state's [`Tracker`].
fn on_progress<S: AsMut<Tracker>>(index: usize) -> impl FnMut(&mut S, TransferStats) + Send {
    move |state: &mut S, stats: TransferStats| {
        let track = &mut state.as_mut().tracks[index];
        track.position = stats.position();
        track.steps += 1;
    }
}

/// `on_end` for the transfer at `index` of the state's [`Tracker`].
fn on_end<S: AsMut<Tracker>>(
    index: usize,
) -> impl FnOnce(&mut S, virt_reactor::Result<TransferStats>) + Send {
    move |state: &mut S, result| {
        let track = &mut state.as_mut().tracks[index];
        track.ends += 1;
        track.end = Some(result);
        track.ended_at = Some(Instant::now());
    }
}

impl Tracker {
    /// A track for a new transfer: its index.
    fn add(&mut self) -> usize {
        self.tracks.push(Track::default());
        self.tracks.len() - 1
    }

    /// Starts a tracked `volume::download` of `vol` into `file` on `reactor`, whose
    /// state holds this tracker: its index and token.
    pub fn download<S: AsMut<Tracker> + 'static>(
        &mut self,
        reactor: &mut Reactor<S>,
        vol: &StorageVol,
        file: &Path,
        range: VolumeRange,
    ) -> virt_reactor::Result<(usize, StreamToken)> {
        let index = self.add();
        volume::download(reactor, vol, file, range, on_progress(index), on_end(index))
            .map(|token| (index, token))
    }

    /// Starts a tracked `volume::download_with` of `range` of `vol` into `target`,
    /// with `tap`.
    pub fn download_with<S: AsMut<Tracker> + 'static>(
        &mut self,
        reactor: &mut Reactor<S>,
        vol: &StorageVol,
        target: volume::Target,
        range: VolumeRange,
        tap: Option<Box<dyn volume::Tap>>,
    ) -> virt_reactor::Result<volume::Started> {
        let index = self.add();
        volume::download_with(
            reactor,
            vol,
            target,
            range,
            tap,
            on_progress(index),
            on_end(index),
        )
    }

    /// Starts a tracked `volume::upload` of `file` into `vol`: its index and token.
    pub fn upload<S: AsMut<Tracker> + 'static>(
        &mut self,
        reactor: &mut Reactor<S>,
        vol: &StorageVol,
        file: &Path,
        range: VolumeRange,
    ) -> virt_reactor::Result<(usize, StreamToken)> {
        let index = self.add();
        volume::upload(reactor, vol, file, range, on_progress(index), on_end(index))
            .map(|token| (index, token))
    }

    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }

    /// Transfers that have ended.
    pub fn ended(&self) -> usize {
        self.tracks.iter().filter(|t| t.end.is_some()).count()
    }

    pub fn all_ended(&self) -> bool {
        self.ended() == self.len()
    }

    pub fn is_ended(&self, index: usize) -> bool {
        self.tracks[index].end.is_some()
    }

    pub fn position(&self, index: usize) -> u64 {
        self.tracks[index].position
    }

    /// Looks at one transfer's track.
    pub fn with<T>(&self, index: usize, f: impl FnOnce(&Track) -> T) -> T {
        f(&self.tracks[index])
    }

    /// The stats of a transfer that must have ended well, exactly once.
    pub fn ok(&self, index: usize) -> TransferStats {
        self.with(index, |t| {
            assert_eq!(
                t.ends, 1,
                "transfer {index}: on_end called {} times",
                t.ends
            );
            match &t.end {
                Some(Ok(stats)) => *stats,
                Some(Err(e)) => panic!("transfer {index} failed: {e}"),
                None => panic!("transfer {index} did not end"),
            }
        })
    }
}

/// A test's world: a reactor registered in this process with its state (a
/// [`Tracker`] unless the test brings its own), a private daemon with a `dir` pool,
/// a connection opened after the registration, and a directory for downloaded
/// files. Fields drop in this order if a test panics.
pub struct Bed<S: 'static = Tracker> {
    pub pool: DirPool,
    pub conn: Connect,
    pub reactor: Reactor<S>,
    /// What the reactor's handlers get, passed to every run call.
    pub state: S,
    /// Downloads go here (inside the daemon's temp dir, removed with it).
    pub out: PathBuf,
    pub daemon: PrivateDaemon,
}

/// How long a drain may take at the end of a test.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Bed {
    /// A bed whose state is a fresh [`Tracker`].
    pub fn start(pool_name: &str) -> Bed {
        Bed::start_with(pool_name, Tracker::default())
    }
}

impl<S: 'static> Bed<S> {
    /// A bed whose reactor's state is `state`.
    pub fn start_with(pool_name: &str, state: S) -> Bed<S> {
        virt::error::clear_error_callback();
        let reactor = Reactor::register().expect("register the reactor's event loop");
        let daemon = PrivateDaemon::start().expect("start a private libvirtd");
        let conn = connect(&daemon);
        let pool = DirPool::create(&daemon, &conn, pool_name);
        let out = daemon.root().join("out");
        fs::create_dir(&out).expect("create the output directory");
        Bed {
            pool,
            conn,
            reactor,
            state,
            out,
            daemon,
        }
    }

    /// `out/name`.
    pub fn out(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// One `run_once` of the reactor with the bed's state.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> virt_reactor::Result<()> {
        self.reactor.run_once(timeout, &mut self.state)
    }

    /// [`drive`] with the bed's reactor and state.
    pub fn drive(
        &mut self,
        limit: Duration,
        what: &str,
        done: impl FnMut(&Reactor<S>, &S) -> bool,
    ) {
        drive(&mut self.reactor, &mut self.state, limit, what, done);
    }

    /// Closes the connection (drop every `StorageVol` first), shuts the reactor down
    /// and checks that libvirt removed everything it had registered on the loop.
    pub fn finish(self) {
        let Bed {
            pool,
            conn,
            mut reactor,
            mut state,
            daemon,
            ..
        } = self;
        drop(pool);
        drop(conn);
        let streams = reactor.len();
        reactor
            .shutdown(DRAIN_TIMEOUT, &mut state)
            .unwrap_or_else(|e| panic!("shutdown with {streams} stream(s) left: {e}"));
        let stats = reactor.stats();
        assert!(
            stats.is_idle(),
            "the loop is not idle after shutdown: {stats:?}"
        );
        drop(daemon);
    }
}

impl<S: AsMut<Tracker> + 'static> Bed<S> {
    /// Starts a tracked download of all of `vol` into `file`: its index and token.
    pub fn download(
        &mut self,
        vol: &StorageVol,
        file: &Path,
    ) -> virt_reactor::Result<(usize, StreamToken)> {
        self.state
            .as_mut()
            .download(&mut self.reactor, vol, file, VolumeRange::default())
    }

    /// Starts a tracked upload of `file` into all of `vol`: its index and token.
    pub fn upload(
        &mut self,
        vol: &StorageVol,
        file: &Path,
    ) -> virt_reactor::Result<(usize, StreamToken)> {
        self.state
            .as_mut()
            .upload(&mut self.reactor, vol, file, VolumeRange::default())
    }
}

/// Opens a connection to the daemon's QEMU driver (after registration).
pub fn connect(daemon: &PrivateDaemon) -> Connect {
    let uri = daemon.uri("qemu");
    virt_reactor::connect(&uri)
        .unwrap_or_else(|e| panic!("open {uri}: {e}\n{}", daemon.log_tail(30)))
}
