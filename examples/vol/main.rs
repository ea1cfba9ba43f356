//! Uploads or downloads many storage volumes at once, on one thread, from one or
//! several hosts, resuming what a lost connection cut off.
//!
//! ```text
//! vol download --uri [LABEL=]URI... --pool POOL VOL FILE [VOL FILE ...] [OPTIONS]
//! vol upload   --uri [LABEL=]URI... --pool POOL VOL FILE [VOL FILE ...] [OPTIONS]
//!   --sparse --offset N --length N --force --resume --checksum sha256|blake3
//!   --verify --progress bars|json --retry-for DURATION
//! ```
//!
//! Every transfer runs on one reactor; progress shows per transfer and in total, as
//! bars or (`--progress json`) as one JSON object per line on standard error. Each
//! failure names its volume and reason, and the others carry on. With several
//! `--uri`, each volume is named `LABEL/VOL`, and a host's failure touches only its
//! own transfers.
//!
//! FILE `-` is standard output (download) or standard input (upload), for a single
//! transfer; all messages then go to standard error. An upload from a pipe needs
//! `--length`.
//!
//! A download writes `FILE.part` and gives it its name once complete; a failed one
//! leaves the `.part`, which `--resume` continues from its length (without it, it
//! starts over). `--resume` on an upload reads the volume back, finds where it first
//! differs from FILE (a hole matches zeros), and uploads from there. A download
//! never writes over anything that exists unless `--force` is given; then a regular
//! file is replaced once complete, a device or FIFO is written through, and a
//! symbolic link is followed. A directory is always refused.
//!
//! `--checksum` computes a digest of the range as it flows (a resumed prefix
//! included, read from the `.part` or from the volume), prints it as `HEX  NAME` on
//! standard error (in the last JSON line with `--progress json`) and adds it to the
//! report. `--verify` (uploads; sha256 unless
//! `--checksum` says otherwise) reads the volume back afterwards and compares the
//! digests.
//!
//! A connection lost mid-transfer is tried again for `--retry-for` (default 0: not
//! at all); once back, each of its transfers resumes from its offset (a download to
//! standard output from what it wrote; an upload from standard input cannot).
//!
//! Exit code: 0 all transfers succeeded; 1 a transfer failed in the daemon (or
//! otherwise); 2 bad arguments, nothing transferred; 3 an upload failed part way,
//! so its volume is partly written (the summary names each such volume); 4 no
//! connection, or it was lost and not back in time; 5 volume or pool not found;
//! 6 local I/O error (a file that cannot be read or written, or is in the way);
//! 7 checksum mismatch after an upload. When transfers fail in different ways, the
//! first of 7, 3, 4, 5, 6, 1 is the code. `docs/vol.md` is the manual.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use virt::storage_vol::StorageVol;
use virt_reactor::supervisor::Endpoint;
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, Origin, Target, VolumeRange};
use virt_reactor::{CloseReason, Error, Reactor};

mod checksum;
mod hosts;
mod report;
#[path = "../common/volumes.rs"]
mod volumes;

use checksum::{Algorithm, Digest};
use hosts::{Change, Host};
use report::{Display, End, Failure, Mode, Position};
use volumes::Direction;

#[derive(Parser)]
#[command(about = "Upload or download many libvirt storage volumes at once, on one thread")]
struct Args {
    /// download (volume -> file) or upload (file -> volume)
    direction: Direction,
    /// libvirt connection, `[LABEL=]URI`; repeat for several hosts
    #[arg(long, required = true, value_name = "[LABEL=]URI")]
    uri: Vec<String>,
    /// storage pool holding the volumes (on every host)
    #[arg(long)]
    pool: String,
    /// keep holes as holes, both ways
    #[arg(long)]
    sparse: bool,
    /// byte offset in each volume
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// bytes per transfer (0: to the end of the volume, or the whole file)
    #[arg(long, default_value_t = 0)]
    length: u64,
    /// download over an existing FILE: replace a regular file, write through a
    /// device or FIFO, follow a symbolic link
    #[arg(long)]
    force: bool,
    /// continue a download from FILE.part, an upload from where the volume first
    /// differs from FILE
    #[arg(long)]
    resume: bool,
    /// a digest of the data as it flows
    #[arg(long, value_name = "ALGORITHM")]
    checksum: Option<Algorithm>,
    /// uploads: read the volume back and compare digests
    #[arg(long)]
    verify: bool,
    /// how progress shows on standard error
    #[arg(long, default_value = "bars")]
    progress: Mode,
    /// how long to wait for a lost connection to come back (e.g. 30s)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    retry_for: Duration,
    /// VOL FILE pairs
    #[arg(required = true, num_args = 2.., value_name = "VOL FILE")]
    pairs: Vec<String>,
}

/// A local end of a transfer.
enum Local {
    Path(PathBuf),
    /// Standard output or input.
    Std,
}

/// Where a transfer is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// To start (again: resuming).
    Ready {
        resume: bool,
    },
    /// An upload's volume is read back to find where to resume.
    Comparing,
    Transferring,
    /// An uploaded volume is read back for its digest.
    Verifying,
    /// Its connection is lost, and may come back.
    Waiting,
    Ended,
}

/// What a transfer's stream said at its end, for [`advance`] to act on.
enum Step {
    Compared(virt_reactor::Result<u64>),
    Transferred(virt_reactor::Result<TransferStats>),
    ReadBack(virt_reactor::Result<TransferStats>),
}

/// One transfer, as the reactor's state holds it.
struct Job {
    name: String,
    host: usize,
    vol: String,
    local: Local,
    phase: Phase,
    step: Option<Step>,
    total: u64,
    /// Where the current stream starts in the range.
    base: u64,
    /// The current stream's totals so far.
    stats: TransferStats,
    /// Bytes moved by this process (for the rate), and since when.
    moved: u64,
    since: Instant,
    resumed_from: u64,
    /// An upload stream took bytes: the volume may hold some of them.
    sent_any: bool,
    /// The digest of the range, as it flows.
    digest: Option<Digest>,
    /// An uploaded volume's digest, read back.
    check: Option<Digest>,
    /// The digest, once complete.
    checksum: Option<String>,
    upload: bool,
    /// The host's connection the current stream runs on.
    generation: u32,
    outcome: Option<Result<(), (Failure, String)>>,
}

impl Job {
    fn done(&self) -> u64 {
        self.base + self.stats.position()
    }

    fn position(&self) -> Position<'_> {
        Position {
            name: &self.name,
            done: self.done(),
            total: self.total,
            moved: self.moved,
            since: self.since,
        }
    }
}

/// The reactor's state.
struct State {
    jobs: Vec<Job>,
    display: Display,
}

impl State {
    fn state(&mut self, index: usize, state: &str, detail: serde_json::Value) {
        let job = &self.jobs[index];
        self.display.state(index, &job.position(), state, detail);
    }
}

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    let args = Args::parse();
    let endpoints = Endpoint::parse_all(args.uri.iter().map(String::as_str));
    let checked = endpoints.map_err(|e| e.to_string()).and_then(|endpoints| {
        check_arguments(&args)?;
        let jobs = jobs(&args, &endpoints)?;
        Ok((endpoints, jobs))
    });
    let (endpoints, jobs) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            eprintln!("vol: {e}");
            return ExitCode::from(Failure::Arguments.code());
        }
    };
    match run(&args, endpoints, jobs) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vol: {e}");
            ExitCode::from(Failure::Transfer.code())
        }
    }
}

fn check_arguments(args: &Args) -> Result<(), String> {
    if args.pairs.len() % 2 != 0 {
        return Err("arguments must be VOL FILE pairs".to_owned());
    }
    let stdio = args.pairs.chunks(2).filter(|pair| pair[1] == "-").count();
    if stdio > 0 && args.pairs.len() > 2 {
        return Err("- (standard input or output) is for a single transfer".to_owned());
    }
    if stdio > 0 && args.resume && args.direction == Direction::Upload {
        return Err("--resume reads the source again: not standard input".to_owned());
    }
    if args.verify && args.direction == Direction::Download {
        return Err("--verify is for uploads".to_owned());
    }
    check_duplicates(args)
}

/// The transfers, each with its host.
fn jobs(args: &Args, endpoints: &[Endpoint]) -> Result<Vec<Job>, String> {
    let several = endpoints.len() > 1;
    args.pairs
        .chunks(2)
        .map(|pair| {
            let (name, file) = (&pair[0], &pair[1]);
            let (host, vol) = match name.split_once('/') {
                Some((label, vol)) if several => {
                    let host = endpoints.iter().position(|e| e.label == label);
                    let host = host.ok_or_else(|| format!("{name}: no --uri labelled {label}"))?;
                    (host, vol.to_owned())
                }
                _ if several => return Err(format!("{name}: name a volume as LABEL/VOL")),
                _ => (0, name.clone()),
            };
            Ok(Job {
                name: name.clone(),
                host,
                vol,
                local: match file.as_str() {
                    "-" => Local::Std,
                    file => Local::Path(PathBuf::from(file)),
                },
                phase: Phase::Ready {
                    resume: args.resume,
                },
                step: None,
                total: 0,
                base: 0,
                stats: TransferStats::default(),
                moved: 0,
                since: Instant::now(),
                resumed_from: 0,
                sent_any: false,
                digest: None,
                check: None,
                checksum: None,
                upload: args.direction == Direction::Upload,
                generation: 0,
                outcome: None,
            })
        })
        .collect()
}

/// Refuses two downloads into one file (they would clobber each other) and two
/// uploads into one volume (they would interleave).
fn check_duplicates(args: &Args) -> Result<(), String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut inodes: HashMap<(u64, u64), &str> = HashMap::new();
    for pair in args.pairs.chunks(2) {
        let (vol, file) = (pair[0].as_str(), pair[1].as_str());
        let (key, inode, what) = match args.direction {
            Direction::Download => {
                let (path, inode) = destination_key(Path::new(file));
                (path.display().to_string(), inode, file)
            }
            Direction::Upload => (vol.to_owned(), None, vol),
        };
        let earlier = inode
            .and_then(|inode| inodes.insert(inode, vol))
            .or_else(|| seen.insert(key, vol));
        if let Some(earlier) = earlier {
            return Err(match args.direction {
                Direction::Download => {
                    format!("{what} is the destination of both {earlier} and {vol}")
                }
                Direction::Upload => format!("volume {what} is given twice"),
            });
        }
    }
    Ok(())
}

/// The destination's directory, resolved, with its name; and the file it names if
/// it exists (through a link, as `--force` would write through it).
fn destination_key(file: &Path) -> (PathBuf, Option<(u64, u64)>) {
    let inode = std::fs::metadata(file).ok().map(|m| (m.dev(), m.ino()));
    let path = match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .join(name)
        }
        _ => file.to_path_buf(),
    };
    (path, inode)
}

/// Runs every transfer to its end and reports; returns the exit code.
fn run(args: &Args, endpoints: Vec<Endpoint>, jobs: Vec<Job>) -> virt_reactor::Result<u8> {
    let mut reactor = Reactor::register()?;
    let names: Vec<String> = jobs.iter().map(|job| job.name.clone()).collect();
    let mut state = State {
        jobs,
        display: Display::new(args.progress, &names),
    };
    let mut hosts = Vec::new();
    for endpoint in endpoints {
        hosts.push(Host::start(&mut reactor, endpoint, args.retry_for)?);
    }
    let started = Instant::now();

    loop {
        for index in 0..state.jobs.len() {
            if advance(args, &mut state, &mut hosts, &mut reactor, index) {
                // A start's blocking calls let libvirt queue every active stream's
                // packets; they are taken before the next start adds more.
                reactor.run_once(Some(Duration::ZERO), &mut state)?;
            }
        }
        if state.jobs.iter().all(|job| job.phase == Phase::Ended) {
            break;
        }
        let pending = state.jobs.iter().any(|job| {
            job.step.is_some()
                || (matches!(job.phase, Phase::Ready { .. }) && !hosts[job.host].is_opening())
        });
        if !pending {
            // Hosts being waited for are checked against their deadline.
            let waiting = hosts.iter().any(|h| h.is_opening() || h.is_down());
            let timeout = waiting.then_some(Duration::from_millis(100));
            reactor.run_once(timeout, &mut state)?;
        }
        for (index, host) in hosts.iter_mut().enumerate() {
            if let Some(change) = host.poll(&mut reactor, &args.pool) {
                changed(args, &mut state, index, change);
            }
        }
    }
    state.display.finish();
    let code = summary(args, &state, started.elapsed().as_secs_f64());
    for host in &mut hosts {
        host.stop(&mut reactor);
    }
    drop(hosts);
    let code = match reactor.shutdown(Duration::from_secs(5), &mut state) {
        Ok(_) => code,
        Err(e) => {
            // The transfers are settled and reported; their code says more than this.
            eprintln!("vol: shutting down: {e}");
            code.max(Failure::Transfer.code())
        }
    };
    Ok(code)
}

/// Host `host` is up (again): its waiting transfers resume; or it is gone: they
/// fail, and so do those that never started.
fn changed(args: &Args, state: &mut State, host: usize, change: Change) {
    let waiting = |job: &Job| job.phase == Phase::Waiting;
    match change {
        Change::Up => {
            for job in jobs_of(state, host, waiting) {
                state.jobs[job].phase = Phase::Ready { resume: true };
            }
        }
        Change::Gone(e) => {
            let idle = |job: &Job| waiting(job) || matches!(job.phase, Phase::Ready { .. });
            for job in jobs_of(state, host, idle) {
                let failure = match (state.jobs[job].sent_any, Failure::of(&e)) {
                    (true, _) => Failure::PartlyWritten,
                    (false, Failure::NotFound) => Failure::NotFound,
                    (false, _) => Failure::Connection,
                };
                end(args, state, job, Err((failure, e.to_string())));
            }
        }
    }
}

/// The transfers on host `host` that `pick` picks.
fn jobs_of(state: &State, host: usize, pick: impl Fn(&Job) -> bool) -> Vec<usize> {
    let jobs = state.jobs.iter().enumerate();
    jobs.filter(|(_, job)| job.host == host && pick(job))
        .map(|(index, _)| index)
        .collect()
}

/// Takes transfer `index` a step on: starts what is ready, acts on how a stream
/// ended. Returns whether it tried to start a stream.
fn advance(
    args: &Args,
    state: &mut State,
    hosts: &mut [Host<State>],
    reactor: &mut Reactor<State>,
    index: usize,
) -> bool {
    let job = &mut state.jobs[index];
    let host = job.host;
    let result = match (job.phase, job.step.take()) {
        (Phase::Ready { .. }, _) if hosts[host].is_opening() => return false,
        (Phase::Ready { resume }, _) => start(args, state, &hosts[host], reactor, index, resume),
        (_, None) => return false,
        (_, Some(Step::Compared(matched))) => {
            matched.and_then(|from| upload_from(args, state, &hosts[host], reactor, index, from))
        }
        (_, Some(Step::Transferred(Ok(stats)))) => {
            job.stats = stats;
            if !(args.verify && job.done() > 0) {
                end(args, state, index, Ok(()));
                return false;
            }
            read_back(args, state, &hosts[host], reactor, index)
        }
        (_, Some(Step::ReadBack(Ok(_)))) => {
            verified(args, state, index);
            return false;
        }
        (_, Some(Step::Transferred(Err(e)) | Step::ReadBack(Err(e)))) => {
            failed(args, state, &mut hosts[host], index, e);
            return false;
        }
    };
    if let Err(e) = result {
        failed(args, state, &mut hosts[host], index, e);
    }
    true
}

/// The digest of this run, if any.
fn algorithm(args: &Args) -> Option<Algorithm> {
    args.checksum.or(args.verify.then_some(Algorithm::Sha256))
}

fn range(args: &Args) -> VolumeRange {
    VolumeRange {
        offset: args.offset,
        length: args.length,
        sparse: args.sparse,
        force: args.force,
    }
}

/// Transfer `index`'s volume on its host.
fn volume(state: &State, host: &Host<State>, index: usize) -> virt_reactor::Result<StorageVol> {
    let pool = host.pool().ok_or(Error::ConnectionClosed {
        reason: CloseReason::Client,
    })?;
    Ok(pool.lookup_storage_vol_by_name(&state.jobs[index].vol)?)
}

/// Starts transfer `index`; `resume`: continue what is on disk or on the volume.
fn start(
    args: &Args,
    state: &mut State,
    host: &Host<State>,
    reactor: &mut Reactor<State>,
    index: usize,
    resume: bool,
) -> virt_reactor::Result<()> {
    state.jobs[index].generation = host.generation;
    let vol = volume(state, host, index)?;
    // For progress: a source's size as it looks (the upload checks it again).
    let total = match (args.length, args.direction, &state.jobs[index].local) {
        (0, Direction::Download, _) => vol.info()?.capacity.saturating_sub(args.offset),
        (0, Direction::Upload, Local::Path(path)) => std::fs::metadata(path).map_or(0, |m| m.len()),
        (0, Direction::Upload, Local::Std) => {
            File::from(std::io::stdin().as_fd().try_clone_to_owned()?)
                .metadata()
                .map_or(0, |m| m.len())
        }
        (length, ..) => length,
    };
    let job = &mut state.jobs[index];
    state.display.sized(index, job.total, total);
    job.total = total;
    // What went out before a loss (standard output cannot be read again).
    let done = job.done();
    job.stats = TransferStats::default();
    let continued = match (&job.local, resume, args.direction) {
        // What went out is out: the digest goes on from there.
        (Local::Std, true, Direction::Download) => job.digest.clone(),
        _ => algorithm(args).map(Digest::new),
    };
    job.digest = continued;
    let tap = tap(&job.digest);
    match (args.direction, &job.local) {
        (Direction::Download, local) => {
            let mut range = range(args);
            let target = match local {
                Local::Path(path) => Target::Resumable {
                    path: path.clone(),
                    resume,
                },
                Local::Std => {
                    let file = std::io::stdout().as_fd().try_clone_to_owned()?;
                    if resume {
                        job.base = done;
                        if done == total {
                            // All of it went out; only libvirt's last word was lost.
                            job.phase = Phase::Transferring;
                            job.step = Some(Step::Transferred(Ok(TransferStats::default())));
                            return Ok(());
                        }
                        range.offset += done;
                        range.length = total - done;
                    }
                    Target::Writer {
                        file: File::from(file),
                        name: PathBuf::from("-"),
                    }
                }
            };
            let started = volume::download_with(
                reactor,
                &vol,
                target,
                range,
                tap,
                on_progress(index),
                step(index, Step::Transferred),
            )?;
            let job = &mut state.jobs[index];
            job.phase = Phase::Transferring;
            if let Local::Path(_) = job.local {
                job.base = started.resumed_from;
            }
            if job.base > 0 {
                job.resumed_from = job.base;
                let detail = json!({ "resumed_from": job.base });
                state.state(index, "resumed", detail);
            }
            Ok(())
        }
        (Direction::Upload, Local::Path(path)) if resume => {
            volume::compare(
                reactor,
                &vol,
                path,
                range(args),
                tap,
                step(index, Step::Compared),
            )?;
            job.phase = Phase::Comparing;
            state.state(index, "comparing", json!({}));
            Ok(())
        }
        (Direction::Upload, _) => upload_from(args, state, host, reactor, index, 0),
    }
}

/// Uploads transfer `index` from byte `from` of its source, which the volume holds
/// up to there.
fn upload_from(
    args: &Args,
    state: &mut State,
    host: &Host<State>,
    reactor: &mut Reactor<State>,
    index: usize,
    from: u64,
) -> virt_reactor::Result<()> {
    let job = &mut state.jobs[index];
    job.base = from;
    job.phase = Phase::Transferring;
    if from > 0 {
        job.resumed_from = from;
        state.state(index, "resumed", json!({ "resumed_from": from }));
    }
    let job = &mut state.jobs[index];
    if from > 0 && from == job.total {
        // The volume holds it all already.
        job.step = Some(Step::Transferred(Ok(TransferStats::default())));
        return Ok(());
    }
    let origin = match &job.local {
        Local::Path(path) => Origin::Path(path.clone()),
        Local::Std => Origin::Reader {
            file: File::from(std::io::stdin().as_fd().try_clone_to_owned()?),
            name: PathBuf::from("-"),
        },
    };
    let tap = tap(&job.digest);
    let vol = volume(state, host, index)?;
    volume::upload_with(
        reactor,
        &vol,
        origin,
        range(args),
        from,
        tap,
        on_progress(index),
        step(index, Step::Transferred),
    )?;
    Ok(())
}

/// Reads uploaded volume `index` back for its digest.
fn read_back(
    args: &Args,
    state: &mut State,
    host: &Host<State>,
    reactor: &mut Reactor<State>,
    index: usize,
) -> virt_reactor::Result<()> {
    let vol = volume(state, host, index)?;
    let job = &mut state.jobs[index];
    let digest = algorithm(args).map(Digest::new);
    job.check = digest.clone();
    // All that was uploaded: a device's size shows only as it is read.
    let range = VolumeRange {
        length: job.done(),
        ..range(args)
    };
    let tap = tap(&digest);
    volume::download_with(
        reactor,
        &vol,
        Target::Nowhere,
        range,
        tap,
        |_: &mut State, _| {},
        step(index, Step::ReadBack),
    )?;
    job.phase = Phase::Verifying;
    state.state(index, "verifying", json!({}));
    Ok(())
}

/// Compares what was sent with what was read back.
fn verified(args: &Args, state: &mut State, index: usize) {
    let job = &state.jobs[index];
    let sent = job.digest.as_ref().map(Digest::hex);
    let read = job.check.as_ref().map(Digest::hex);
    let outcome = match (sent, read) {
        (Some(sent), Some(read)) if sent != read => {
            let name = algorithm(args).map_or("", Algorithm::name);
            let error = format!("read back, the volume's {name} is {read}, not {sent}");
            Err((Failure::Checksum, error))
        }
        _ => Ok(()),
    };
    end(args, state, index, outcome);
}

/// `digest` as a transfer's tap.
fn tap(digest: &Option<Digest>) -> Option<Box<dyn volume::Tap>> {
    digest.clone().map(|d| Box::new(d) as Box<dyn volume::Tap>)
}

/// The end of one of transfer `index`'s streams, as the step `as_step` makes of it.
fn step<T: 'static>(
    index: usize,
    as_step: fn(virt_reactor::Result<T>) -> Step,
) -> impl FnOnce(&mut State, virt_reactor::Result<T>) + Send + 'static {
    move |state, result| state.jobs[index].step = Some(as_step(result))
}

/// Moves transfer `index` along.
fn on_progress(index: usize) -> impl FnMut(&mut State, TransferStats) + Send + 'static {
    move |state, stats| {
        let job = &mut state.jobs[index];
        let before = job.done();
        job.moved += stats.position() - job.stats.position();
        job.stats = stats;
        job.sent_any |= job.upload && stats.position() > 0;
        state.display.progress(index, before, &job.position());
    }
}

/// Transfer `index` failed with `e`: a lost connection waits for its host to come
/// back (when `--retry-for` allows), anything else ends it.
fn failed(args: &Args, state: &mut State, host: &mut Host<State>, index: usize, e: Error) {
    let job = &mut state.jobs[index];
    let ours = job.generation == host.generation;
    let lost = matches!(e, Error::ConnectionClosed { .. }) || (ours && host.is_lost());
    if lost {
        if ours {
            host.lost();
        }
        let resumable = !(job.upload && matches!(job.local, Local::Std));
        if resumable && host.may_return() {
            // Its host is back already if another transfer saw the loss first.
            job.phase = match ours {
                true => Phase::Waiting,
                false => Phase::Ready { resume: true },
            };
            state.state(index, "waiting", json!({ "error": e.to_string() }));
            return;
        }
    }
    let failure = match (lost, job.upload && job.sent_any) {
        (_, true) => Failure::PartlyWritten,
        (true, false) => Failure::Connection,
        (false, false) => Failure::of(&e),
    };
    let hint = match (&e, &job.local) {
        (Error::DestinationExists { kind, .. }, _) if *kind != "directory" => {
            " (--force writes over it)"
        }
        (_, Local::Path(_)) if lost && !job.upload => "; its .part is kept for --resume",
        _ => "",
    };
    end(args, state, index, Err((failure, format!("{e}{hint}"))));
}

/// Transfer `index` ended so.
fn end(args: &Args, state: &mut State, index: usize, outcome: Result<(), (Failure, String)>) {
    let job = &mut state.jobs[index];
    job.phase = Phase::Ended;
    let checksum = match (&outcome, &job.digest, algorithm(args)) {
        (Ok(()), Some(digest), Some(algorithm)) => Some((algorithm.name(), digest.hex())),
        _ => None,
    };
    if let (Some((_, hex)), Mode::Bars) = (&checksum, args.progress) {
        eprintln!("{hex}  {}", job.name);
    }
    let failure = outcome.as_ref().err().map(|(f, e)| (*f, e.as_str()));
    let end = End {
        failure,
        checksum: checksum.as_ref().map(|(name, hex)| (*name, hex.as_str())),
        resumed_from: job.resumed_from,
    };
    state.display.end(index, &job.position(), end);
    job.checksum = checksum.map(|(_, hex)| hex);
    job.outcome = Some(outcome);
}

/// Prints the report (on standard output, unless it carries the data) and returns
/// the exit code.
fn summary(args: &Args, state: &State, elapsed: f64) -> u8 {
    let data_on_stdout = args.direction == Direction::Download
        && state.jobs.iter().any(|job| matches!(job.local, Local::Std));
    let mut out: Box<dyn Write> = match (data_on_stdout, args.progress) {
        (false, _) => Box::new(std::io::stdout()),
        (true, Mode::Bars) => Box::new(std::io::stderr()),
        // Standard error carries JSON lines only: the last ones say it all.
        (true, Mode::Json) => Box::new(std::io::sink()),
    };
    let mut worst: Option<Failure> = None;
    let mut bytes = 0;
    let mut partly_written = Vec::new();
    for job in &state.jobs {
        bytes += job.moved;
        let line = match &job.outcome {
            Some(Ok(())) => {
                let stats = job.stats;
                let mut line = format!(
                    "{}: ok, {} data bytes, {} hole(s) of {} bytes",
                    job.name, stats.data_bytes, stats.holes, stats.hole_bytes
                );
                if job.resumed_from > 0 {
                    line += &format!(", resumed from byte {}", job.resumed_from);
                }
                if let (Some(hex), Some(algorithm)) = (&job.checksum, algorithm(args)) {
                    line += &format!(", {} {hex}", algorithm.name());
                }
                if args.verify {
                    line += ", verified";
                }
                line
            }
            Some(Err((failure, error))) => {
                worst = Some(worst.map_or(*failure, |w| w.worst(*failure)));
                match failure {
                    Failure::PartlyWritten => {
                        partly_written.push(job.name.as_str());
                        format!(
                            "{}: failed: {error}; volume PARTLY WRITTEN: {} byte(s) from offset {} were sent",
                            job.name,
                            job.done(),
                            args.offset
                        )
                    }
                    _ => format!("{}: failed: {error}", job.name),
                }
            }
            None => unreachable!("the loop ends when every transfer has"),
        };
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{} transfer(s), {:.1} MiB in {elapsed:.2} s ({:.1} MiB/s)",
        state.jobs.len(),
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / elapsed
    );
    if !partly_written.is_empty() {
        let _ = writeln!(
            out,
            "{} volume(s) partly written: {}",
            partly_written.len(),
            partly_written.join(", ")
        );
    }
    worst.map_or(0, Failure::code)
}
