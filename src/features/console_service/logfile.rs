//! A console's durable log: every byte the guest printed, rotated by size on a line
//! boundary, optionally with a timestamp at the start of each line, and reopened on
//! request (SIGHUP, after an external rotation).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How a console's log is kept.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// The directory of the logs, `DIR/NAME.log`.
    pub dir: PathBuf,
    /// Rotate once the file has reached this many bytes, at the next line end.
    pub max_bytes: u64,
    /// Rotated files kept: `NAME.log.1` (newest) to `NAME.log.KEEP`.
    pub keep: usize,
    /// Start every line with an RFC 3339 UTC timestamp.
    pub timestamps: bool,
}

/// Bytes held in memory while the log cannot be written (disk full, directory
/// gone); beyond them bytes are counted as lost.
const HOLD_MAX: usize = 16 << 20;
/// How long a reopen asked for mid-line waits for the line's end.
const REOPEN_WAIT: Duration = Duration::from_secs(1);

/// One console's log: `DIR/NAME.log`, rotated and timestamped as [`LogOptions`]
/// say. Writes are plain file writes on the caller's thread.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    options: LogOptions,
    /// Bytes in the current file.
    size: u64,
    /// Bytes of the current line so far, timestamp included.
    line: u64,
    at_line_start: bool,
    /// A reopen asked for mid-line, and since when: it happens at the line's end,
    /// so that neither file holds a broken line.
    reopen_asked: Option<Instant>,
    /// Output not yet taken by the file: the chunk being written (one write per
    /// chunk, not per line), or more while the file cannot be written.
    held: Vec<u8>,
    pub(crate) rotations: u64,
    pub(crate) written: u64,
    pub(crate) lost: u64,
    pub(crate) last_error: Option<String>,
}

impl ConsoleLog {
    /// Opens (appending to) `DIR/NAME.log`.
    ///
    /// # Errors
    ///
    /// The file cannot be opened (or is a symbolic link).
    pub fn open(name: &str, options: &LogOptions) -> io::Result<Self> {
        let path = options.dir.join(format!("{name}.log"));
        // `LABEL/NAME` with several hosts: a subdirectory per host.
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(ConsoleLog {
            path,
            file: Some(file),
            options: options.clone(),
            size,
            line: 0,
            at_line_start: true,
            reopen_asked: None,
            held: Vec::new(),
            rotations: 0,
            written: 0,
            lost: 0,
            last_error: None,
        })
    }

    /// The current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the current file.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Appends what the guest printed, rotating after a line end once the file is
    /// full. A line longer than the whole limit is cut where it reaches it.
    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // A line that does not end (a prompt) holds the reopen back only so long.
            if self
                .reopen_asked
                .is_some_and(|at| self.at_line_start || at.elapsed() >= REOPEN_WAIT)
            {
                self.open_again();
            }
            if self.at_line_start && self.options.timestamps {
                let before = self.held.len();
                let now = humantime::format_rfc3339_millis(SystemTime::now());
                let _ = write!(self.held, "[{now}] "); // into memory: cannot fail
                let stamp = (self.held.len() - before) as u64;
                self.size += stamp;
                self.line += stamp;
            }
            let room = self.options.max_bytes.saturating_sub(self.line).max(1);
            let piece_end = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) if (at as u64) < room => at + 1,
                _ => bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX)),
            };
            let (piece, rest) = bytes.split_at(piece_end);
            self.put(piece);
            self.written += piece.len() as u64;
            bytes = rest;
            let line_ended = piece.ends_with(b"\n");
            let line_too_long = self.line >= self.options.max_bytes;
            self.at_line_start = line_ended || line_too_long;
            if self.at_line_start {
                self.line = 0;
                if self.size >= self.options.max_bytes {
                    self.rotate();
                }
            }
        }
        self.flush_held();
    }

    /// Closes and opens the file again (after an outside rotation moved it): now
    /// at a line start, else once the current line has ended.
    pub fn reopen(&mut self) {
        if self.at_line_start {
            self.open_again();
        } else {
            self.reopen_asked = Some(Instant::now());
        }
    }

    fn open_again(&mut self) {
        self.reopen_asked = None;
        self.flush_held(); // the end of the line goes where its start went
        self.file = None;
        match open_append(&self.path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((size, file)) => {
                // Held bytes were counted when they came; they go to this file.
                self.size = size + self.held.len() as u64;
                self.file = Some(file);
                self.flush_held();
            }
            Err(e) => self.failed(e),
        }
    }

    fn rotate(&mut self) {
        self.flush_held(); // into the file being rotated
        self.file = None;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..self.options.keep).rev() {
            let _ = fs::rename(numbered(n), numbered(n + 1));
        }
        let moved = if self.options.keep == 0 {
            fs::remove_file(&self.path)
        } else {
            fs::rename(&self.path, numbered(1))
        };
        if let Err(e) = moved {
            log::warn!("{}: cannot rotate: {e}", self.path.display());
        }
        self.rotations += 1;
        self.size = 0;
        self.open_again();
    }

    fn put(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.line += bytes.len() as u64;
        self.hold(bytes);
    }

    fn hold(&mut self, bytes: &[u8]) {
        let room = HOLD_MAX.saturating_sub(self.held.len());
        let kept = bytes.len().min(room);
        self.held.extend_from_slice(&bytes[..kept]);
        self.lost += (bytes.len() - kept) as u64;
    }

    fn flush_held(&mut self) {
        let Some(file) = &mut self.file else { return };
        if self.held.is_empty() {
            return;
        }
        // write_all may have written a part before failing; the rest is unknown, so
        // all of it stays.
        match file.write_all(&self.held) {
            Ok(()) => {
                self.held.clear();
                self.last_error = None;
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: io::Error) {
        let text = format!("{}: {e}", self.path.display());
        if self.last_error.as_deref() != Some(&text) {
            log::error!("log {text}; holding output until it can be written");
        }
        self.last_error = Some(text);
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, max_bytes: u64, keep: usize) -> LogOptions {
        LogOptions {
            dir: dir.to_owned(),
            max_bytes,
            keep,
            timestamps: false,
        }
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap_or_default()
    }

    #[test]
    fn rotates_on_line_ends_and_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ConsoleLog::open("g", &options(dir.path(), 64, 100)).unwrap();
        let mut all = String::new();
        for i in 0..200 {
            let line = format!("line {i:04} of the console\r\n");
            all.push_str(&line);
            // Split lines across writes, as console output arrives.
            let (a, b) = line.as_bytes().split_at(7);
            log.write(a);
            log.write(b);
        }
        assert!(log.rotations > 10, "{}", log.rotations);
        let mut joined = String::new();
        for n in (1..=log.rotations as usize).rev() {
            let part = read(dir.path(), &format!("g.log.{n}"));
            assert!(part.ends_with('\n'), "file {n} cut mid-line: {part:?}");
            assert!(part.len() < 64 + 40, "file {n} too long: {}", part.len());
            joined.push_str(&part);
        }
        joined.push_str(&read(dir.path(), "g.log"));
        assert_eq!(joined, all);
    }

    #[test]
    fn keeps_only_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ConsoleLog::open("g", &options(dir.path(), 12, 2)).unwrap();
        for i in 0..5 {
            log.write(format!("line {i} xxxx\n").as_bytes());
        }
        assert_eq!(read(dir.path(), "g.log.1"), "line 4 xxxx\n");
        assert_eq!(read(dir.path(), "g.log.2"), "line 3 xxxx\n");
        assert!(!dir.path().join("g.log.3").exists());
    }

    #[test]
    fn a_line_longer_than_the_limit_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ConsoleLog::open("g", &options(dir.path(), 8, 5)).unwrap();
        log.write(b"0123456789abcdefXYZ\n");
        assert_eq!(read(dir.path(), "g.log.2"), "01234567");
        assert_eq!(read(dir.path(), "g.log.1"), "89abcdef");
        assert_eq!(read(dir.path(), "g.log"), "XYZ\n");
    }

    #[test]
    fn timestamps_start_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), 1 << 20, 1);
        opts.timestamps = true;
        let mut log = ConsoleLog::open("g", &opts).unwrap();
        log.write(b"one\ntw");
        log.write(b"o\n");
        let text = read(dir.path(), "g.log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        for (line, body) in lines.iter().zip(["one", "two"]) {
            assert!(
                line.starts_with("[20") && line.ends_with(&format!("Z] {body}")),
                "{line:?}"
            );
        }
    }

    #[test]
    fn reopen_follows_an_outside_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ConsoleLog::open("g", &options(dir.path(), 1 << 20, 1)).unwrap();
        log.write(b"before\n");
        fs::rename(dir.path().join("g.log"), dir.path().join("moved")).unwrap();
        log.reopen();
        log.write(b"after\n");
        assert_eq!(read(dir.path(), "moved"), "before\n");
        assert_eq!(read(dir.path(), "g.log"), "after\n");
    }

    #[test]
    fn a_reopen_mid_line_waits_for_the_line_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), 1 << 20, 1);
        opts.timestamps = true;
        let mut log = ConsoleLog::open("g", &opts).unwrap();
        log.write(b"one\r");
        fs::rename(dir.path().join("g.log"), dir.path().join("moved")).unwrap();
        log.reopen();
        log.write(b"\ntwo\r\n");
        for (file, line) in [("moved", "one"), ("g.log", "two")] {
            let text = read(dir.path(), file);
            assert!(text.starts_with("[20"), "{file}: {text:?}");
            assert!(text.ends_with(&format!("] {line}\r\n")), "{file}: {text:?}");
            assert_eq!(text.lines().count(), 1, "{file}: {text:?}");
        }
    }

    #[test]
    fn holds_output_while_the_file_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        fs::create_dir(&logs).unwrap();
        let mut log = ConsoleLog::open("g", &options(&logs, 1 << 20, 1)).unwrap();
        log.write(b"one\n");
        fs::remove_file(logs.join("g.log")).unwrap();
        fs::remove_dir(&logs).unwrap();
        log.reopen(); // the directory is gone
        log.write(b"two\n");
        assert!(log.last_error.is_some());
        fs::create_dir(&logs).unwrap();
        log.reopen();
        log.write(b"three\n");
        assert_eq!(read(&logs, "g.log"), "two\nthree\n");
        assert_eq!(log.lost, 0);
    }
}
