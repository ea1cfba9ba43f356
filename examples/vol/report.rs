//! What `vol` tells: the kinds of failure and their exit codes, and progress as bars
//! or as JSON lines on standard error.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{MultiProgress, ProgressBar};
use serde_json::{json, Value};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt_reactor::Error;

use crate::volumes::bar;

/// Why a transfer, or the run, failed; each has its exit code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Failure {
    /// The daemon refused or broke the transfer (and anything not below).
    Transfer,
    Arguments,
    /// An upload failed part way: its volume holds some of the new bytes.
    PartlyWritten,
    /// No connection, or it was lost and did not come back in time.
    Connection,
    /// The volume or the pool does not exist.
    NotFound,
    /// A local file could not be read, created or written, or is in the way.
    LocalIo,
    /// The volume read back after an upload has another checksum.
    Checksum,
}

impl Failure {
    pub fn code(self) -> u8 {
        match self {
            Failure::Transfer => 1,
            Failure::Arguments => 2,
            Failure::PartlyWritten => 3,
            Failure::Connection => 4,
            Failure::NotFound => 5,
            Failure::LocalIo => 6,
            Failure::Checksum => 7,
        }
    }

    /// Its name in JSON lines.
    pub fn kind(self) -> &'static str {
        match self {
            Failure::Transfer => "transfer",
            Failure::Arguments => "arguments",
            Failure::PartlyWritten => "partly-written",
            Failure::Connection => "connection",
            Failure::NotFound => "not-found",
            Failure::LocalIo => "local-io",
            Failure::Checksum => "checksum",
        }
    }

    /// Of several, the one the run exits with: a volume that may hold wrong data
    /// first, then what the user must fix before trying again.
    pub fn worst(self, other: Failure) -> Failure {
        const ORDER: [Failure; 7] = [
            Failure::Checksum,
            Failure::PartlyWritten,
            Failure::Connection,
            Failure::NotFound,
            Failure::LocalIo,
            Failure::Transfer,
            Failure::Arguments,
        ];
        let rank = |f| ORDER.iter().position(|o| *o == f);
        if rank(other) < rank(self) {
            other
        } else {
            self
        }
    }

    /// The kind of an error that ended a transfer (a lost connection is decided by
    /// the caller, who knows the host).
    pub fn of(e: &Error) -> Failure {
        match e {
            Error::ConnectionClosed { .. } => Failure::Connection,
            Error::Libvirt(e)
                if matches!(
                    e.code(),
                    Enum::Known(ErrorNumber::NoStoragePool | ErrorNumber::NoStorageVolume)
                ) =>
            {
                Failure::NotFound
            }
            Error::Io(_) | Error::DestinationExists { .. } => Failure::LocalIo,
            _ => Failure::Transfer,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Bars,
    Json,
}

/// How far a transfer is, as [`Display`] shows it.
pub struct Position<'a> {
    pub name: &'a str,
    /// Bytes of the range done (a resumed prefix included).
    pub done: u64,
    pub total: u64,
    /// Bytes this process moved, and since when: the rate.
    pub moved: u64,
    pub since: Instant,
}

impl Position<'_> {
    fn json(&self, state: &str) -> Value {
        let seconds = self.since.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            (self.moved as f64 / seconds) as u64
        } else {
            0
        };
        json!({
            "transfer": self.name,
            "state": state,
            "done": self.done,
            "total": self.total,
            "rate": rate,
        })
    }
}

/// How a transfer ended, for its last line.
pub struct End<'a> {
    pub failure: Option<(Failure, &'a str)>,
    pub checksum: Option<(&'static str, &'a str)>,
    pub resumed_from: u64,
}

/// Progress as bars (on standard error, through indicatif) or JSON lines.
pub enum Display {
    Bars {
        // The bars draw through it.
        _multi: MultiProgress,
        total: ProgressBar,
        bars: Vec<ProgressBar>,
    },
    Json {
        /// When each transfer's last progress line went out.
        last: Vec<Option<Instant>>,
    },
}

/// At most one progress line per transfer in this time.
const JSON_EVERY: Duration = Duration::from_millis(200);

impl Display {
    pub fn new(mode: Mode, names: &[String]) -> Display {
        match mode {
            Mode::Bars => {
                let multi = MultiProgress::new();
                let total = multi.add(bar("total"));
                let bars = names.iter().map(|name| multi.add(bar(name))).collect();
                Display::Bars {
                    _multi: multi,
                    total,
                    bars,
                }
            }
            Mode::Json => Display::Json {
                last: vec![None; names.len()],
            },
        }
    }

    /// Transfer `index` has a size.
    pub fn sized(&mut self, index: usize, previous: u64, total: u64) {
        if let Display::Bars {
            total: all, bars, ..
        } = self
        {
            bars[index].set_length(total);
            all.set_length(all.length().unwrap_or(0) - previous + total);
        }
    }

    /// Transfer `index` moved on from `before` bytes done.
    pub fn progress(&mut self, index: usize, before: u64, at: &Position) {
        match self {
            Display::Bars { total, bars, .. } => {
                total.set_position(total.position() + at.done - before.min(at.done));
                bars[index].set_position(at.done);
            }
            Display::Json { last } => {
                if last[index].is_some_and(|t| t.elapsed() < JSON_EVERY) {
                    return;
                }
                last[index] = Some(Instant::now());
                eprintln!("{}", at.json("running"));
            }
        }
    }

    /// Transfer `index` is in another state: `comparing`, `resumed`, `waiting`,
    /// `verifying`; `detail` is added to the line.
    pub fn state(&mut self, index: usize, at: &Position, state: &str, detail: Value) {
        match self {
            Display::Bars { bars, .. } => {
                let message = match detail.as_object().and_then(|d| d.values().next()) {
                    Some(value) => format!("{state} ({value})"),
                    None => state.to_owned(),
                };
                bars[index].set_message(message);
            }
            Display::Json { .. } => {
                let mut line = at.json(state);
                if let (Some(line), Some(detail)) = (line.as_object_mut(), detail.as_object()) {
                    line.extend(detail.clone());
                }
                eprintln!("{line}");
            }
        }
    }

    /// Transfer `index` ended.
    pub fn end(&mut self, index: usize, at: &Position, end: End) {
        match self {
            Display::Bars { bars, .. } => match end.failure {
                None => bars[index].finish_with_message("done"),
                Some((_, error)) => bars[index].abandon_with_message(format!("failed: {error}")),
            },
            Display::Json { .. } => {
                let mut line = at.json("ended");
                line["outcome"] = json!(if end.failure.is_some() {
                    "failed"
                } else {
                    "ok"
                });
                line["resumed_from"] = json!(end.resumed_from);
                line["checksum"] = json!(end.checksum.map(|(_, hex)| hex));
                line["algorithm"] = json!(end.checksum.map(|(name, _)| name));
                line["error_kind"] = json!(end.failure.map(|(f, _)| f.kind()));
                line["error"] = json!(end.failure.map(|(_, e)| e));
                eprintln!("{line}");
            }
        }
    }

    pub fn finish(&self) {
        if let Display::Bars { total, .. } = self {
            total.finish();
        }
    }
}
