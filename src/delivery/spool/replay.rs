//! `webio-router replay FILE [--sink NAME]`: puts dead letters back into the spool as new
//! pending work, for the sink recorded in each line or for `--sink`.
//!
//! [`replay`] opens the spool file itself, so it runs while the daemon is stopped: redb locks
//! the file, and a running daemon makes it fail with "in use" rather than race it (the CLI
//! goes through the control socket then, see [`super::operate`]). The next start delivers
//! what was replayed. Replayed events skip the dedup window on purpose. [`parse_line`] reads
//! a line for both.

use super::dead::{DeadLetter, LetterError};
use super::store::{self, SpoolError, StoreError};
use crate::config::DeliveryConfig;
use crate::event::Envelope;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Lines per transaction.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("spool {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Where the letters went.
    pub spool: PathBuf,
    /// Re-injected (event, sink) pairs, by sink.
    pub injected: BTreeMap<String, u64>,
    /// Lines not re-injected: (line number, why).
    pub skipped: Vec<(usize, String)>,
    /// Pending pairs in the spool afterwards (for every sink).
    pub pending_after: u64,
}

/// Replays `file` into the spool of `cfg`. `known` are the sinks of routes.toml; a line whose
/// sink is not among them is skipped (use `only` to redirect). `progress(bytes read, total)`.
pub fn replay(
    cfg: &DeliveryConfig,
    known: &BTreeSet<String>,
    file: &Path,
    only: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    let read_err = |source| ReplayError::Read { path: file.to_owned(), source };
    let f = std::fs::File::open(file).map_err(read_err)?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let (db, path) = store::open_db(&cfg.spool_dir)?;
    let write_err = |source: StoreError| ReplayError::Write { path: path.clone(), source };
    let mut next = store::next_seq(&db).map_err(write_err)?;
    let mut report = ReplayReport { spool: path.clone(), ..Default::default() };
    let mut batch: Vec<(Vec<u8>, Vec<String>)> = Vec::new();
    let mut read = 0u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(read_err)?;
        read += line.len() as u64 + 1;
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, only, known) {
            Ok((sink, env)) => {
                *report.injected.entry(sink.clone()).or_default() += 1;
                batch.push((store::encode(&env), vec![sink]));
            }
            Err(e) => report.skipped.push((n, e.to_string())),
        }
        if batch.len() >= BATCH {
            next = super::writer::append_offline(&db, next, &batch).map_err(write_err)?;
            batch.clear();
            progress(read.min(total), total);
        }
    }
    if !batch.is_empty() {
        super::writer::append_offline(&db, next, &batch).map_err(write_err)?;
    }
    progress(total, total);
    report.pending_after = store::pending_len(&db).map_err(write_err)?;
    Ok(report)
}

/// Why one dead-letter line is not replayed.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("not a dead letter: {0}")]
    NotALetter(#[source] serde_json::Error),
    #[error("sink {0:?} is not in routes.toml (use --sink NAME)")]
    UnknownSink(String),
    #[error("the event's content does not match its id (edited by hand?); it would not be delivered")]
    Edited,
    #[error(transparent)]
    Letter(#[from] LetterError),
}

/// One dead-letter line: the sink it goes to (`only`, else its own, which must be among
/// `known`) and the event to deliver. Shared by the offline replay and the running spool's.
pub fn parse_line(line: &str, only: Option<&str>, known: &BTreeSet<String>) -> Result<(String, Envelope), LineError> {
    let letter: DeadLetter = serde_json::from_str(line).map_err(LineError::NotALetter)?;
    let sink = only.unwrap_or(&letter.sink).to_owned();
    if !known.contains(&sink) {
        return Err(LineError::UnknownSink(sink));
    }
    let env = letter.envelope()?;
    // Sinks take the id as an idempotency key, and the spool checks it when it reads the
    // record back: an event edited by hand would be dead-lettered as damaged.
    if crate::event::event_id(&env.event) != env.event.id {
        return Err(LineError::Edited);
    }
    Ok((sink, env))
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
pub struct Progress {
    on: bool,
    drawn: bool,
}

impl Progress {
    pub fn new() -> Self {
        Progress { on: std::io::stderr().is_terminal(), drawn: false }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.on || total == 0 {
            return;
        }
        const WIDTH: u64 = 40;
        let filled = (done.min(total) * WIDTH / total) as usize;
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH as usize - filled));
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\rreplay [{bar}] {:>3}%", done.min(total) * 100 / total);
        let _ = err.flush();
        self.drawn = true;
    }

    pub fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
