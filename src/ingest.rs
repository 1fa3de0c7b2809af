//! `[ingest]`: Webio's SFTP hooks (README "Custom Value Requests and SFTP hooks"). Webio can write webhook calls as JSON files into
//! the organisation's SFTP folder; with `ingest.dir` set, a task of the app polls that folder
//! and feeds every `*.json` file through the same [`State::route`] as a POST.
//!
//! - A file holds one call (an object) or several (an array of objects); each must be a
//!   webhook call (an object with a string `type`), or the whole file is moved to `rejected/`
//!   with a log line and nothing of it is routed.
//! - Organisation id: `auth.organisation_id` (there is no token). Ids are computed as for a
//!   POST, so the same call arriving both ways is a duplicate inside the dedup window.
//! - A file moves to `done/` only once every event is taken (durably spooled, or confirmed in
//!   direct mode). When delivery refuses, the file stays and is tried again at the next poll
//!   (its already-taken events are then acknowledged as duplicates). Moves fsync both
//!   directories, so a crash never brings back a finished file nor loses one.
//! - A file is read only once complete: renamed (or linked) into place after its last write —
//!   its inode change time is then later than its modification time — or unchanged in size
//!   and modification time across one poll interval. Dot-files, partial names (`*.tmp`,
//!   `*.part`, `*.filepart`), empty files, symlinks and directories are left alone.

use crate::config::ingest::IngestConfig;
use crate::event::{normalise, BodyError, Event, NormaliseOptions};
use crate::state::State;
use bytes::Bytes;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A larger file is rejected unread (Webio writes one call, or a few, per file).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why a file is not webhook calls (it goes to `rejected/`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("file is not valid JSON: {0}")]
    NotJson(String),
    #[error("file is neither a webhook call (a JSON object) nor an array of them")]
    NotCalls,
    #[error("call {index}: {error}")]
    Call { index: usize, error: BodyError },
    #[error("call {index} is larger than {max} bytes (server.max_body_bytes)")]
    CallTooLarge { index: usize, max: usize },
    #[error("file is larger than {0} bytes")]
    TooLarge(u64),
}

/// Normalises every call of a file, or refuses the whole file. Each event keeps its call's
/// bytes exactly as written, as a POSTed event keeps its body.
pub fn parse_calls(
    bytes: &[u8],
    organisation_id: Option<&str>,
    opts: &NormaliseOptions,
    max_call_bytes: usize,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<(Event, Bytes)>, FileError> {
    // Editors on Windows may start a UTF-8 file with a byte order mark.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let whole: &RawValue = serde_json::from_slice(bytes).map_err(|e| FileError::NotJson(e.to_string()))?;
    let calls: Vec<&RawValue> = match whole.get().as_bytes().first() {
        Some(b'{') => vec![whole],
        Some(b'[') => serde_json::from_str(whole.get()).map_err(|e| FileError::NotJson(e.to_string()))?,
        _ => return Err(FileError::NotCalls),
    };
    calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            let raw = call.get().as_bytes();
            if raw.len() > max_call_bytes {
                return Err(FileError::CallTooLarge { index, max: max_call_bytes });
            }
            let event = normalise(raw, organisation_id.map(str::to_owned), opts, received_at)
                .map_err(|error| FileError::Call { index, error })?;
            Ok((event, Bytes::copy_from_slice(raw)))
        })
        .collect()
}

/// The inbox and its two sub-folders, created at start.
pub struct Inbox {
    dir: PathBuf,
    done: PathBuf,
    rejected: PathBuf,
    poll: Duration,
    organisation_id: Option<String>,
    max_call_bytes: usize,
}

/// What a file looked like at one poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

struct Candidate {
    name: OsString,
    path: PathBuf,
    stamp: Stamp,
    /// Its inode changed after its last write: renamed or linked into place.
    placed: bool,
}

/// What became of a file this poll.
enum Outcome {
    /// Moved to `done/` or `rejected/`.
    Moved,
    /// Still in the inbox: looked at again next poll.
    Stays,
}

impl Inbox {
    /// Creates `dir`, `dir/done` and `dir/rejected` when missing.
    pub fn open(cfg: &IngestConfig, organisation_id: Option<String>, max_call_bytes: usize) -> io::Result<Inbox> {
        let dir = cfg.dir.clone();
        let (done, rejected) = (dir.join("done"), dir.join("rejected"));
        for d in [&dir, &done, &rejected] {
            fs::create_dir_all(d)?;
        }
        crate::metrics::register_ingest();
        Ok(Inbox { dir, done, rejected, poll: cfg.poll, organisation_id, max_call_bytes })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Polls until `stop` is cancelled. A file being handled is finished first (its events are
    /// taken one by one; the app bounds this by the shutdown deadline).
    pub async fn run(self, state: Arc<State>, stop: CancellationToken) {
        tracing::info!(dir = %self.dir.display(), poll = ?self.poll, organisation_id = self.organisation_id.as_deref().unwrap_or(""), "watching the SFTP-hook folder");
        if self.organisation_id.is_none() {
            tracing::warn!("ingest: auth.organisation_id is empty, so ingested events carry no organisation id (and differ in id from POSTed ones whose token names one)");
        }
        let mut seen: HashMap<OsString, Stamp> = HashMap::new();
        let mut scan_failed = false;
        loop {
            let dir = self.dir.clone();
            match tokio::task::spawn_blocking(move || scan(&dir)).await {
                Ok(Ok(found)) => {
                    scan_failed = false;
                    let mut next = HashMap::new();
                    for c in found {
                        let complete = c.placed || seen.get(&c.name) == Some(&c.stamp);
                        if complete && c.stamp.len > 0 {
                            if stop.is_cancelled() {
                                return;
                            }
                            let span = tracing::info_span!("ingest", file = %c.name.to_string_lossy(), event_id = tracing::field::Empty);
                            if let Outcome::Moved = self.ingest(&state, &c).instrument(span).await {
                                continue;
                            }
                        }
                        next.insert(c.name, c.stamp);
                    }
                    seen = next;
                }
                Ok(Err(e)) => {
                    // Logged once per failure streak, not at every poll.
                    if !scan_failed {
                        tracing::error!(dir = %self.dir.display(), error = %e, "ingest: cannot list the SFTP-hook folder");
                    }
                    scan_failed = true;
                }
                Err(e) => tracing::error!(error = %e, "ingest: folder scan panicked"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One complete file: parse it whole, hand its events on, then move it.
    async fn ingest(&self, state: &State, c: &Candidate) -> Outcome {
        let bytes = if c.stamp.len > MAX_FILE_BYTES {
            Err(FileError::TooLarge(MAX_FILE_BYTES))
        } else {
            match tokio::fs::read(&c.path).await {
                // Changed since it was listed: not complete after all.
                Ok(b) if b.len() as u64 != c.stamp.len => return Outcome::Stays,
                Ok(b) => Ok(b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::Moved,
                Err(e) => {
                    tracing::warn!(error = %e, "ingest: cannot read the file; trying again at the next poll");
                    return Outcome::Stays;
                }
            }
        };
        let received_at = chrono::Utc::now();
        let parsed = bytes.and_then(|b| {
            parse_calls(&b, self.organisation_id.as_deref(), &state.normalise, self.max_call_bytes, received_at)
        });
        let calls = match parsed {
            Ok(calls) => calls,
            Err(e) => {
                let moved = self.move_to(c, &self.rejected).await;
                if moved {
                    crate::metrics::ingested_file("rejected");
                    tracing::warn!(reason = %e, "ingest: file is not webhook calls; moved to rejected/");
                }
                return if moved { Outcome::Moved } else { Outcome::Stays };
            }
        };
        let (mut new, mut duplicates) = (0usize, 0usize);
        let total = calls.len();
        for (event, raw) in calls {
            match state.route(event, raw).await {
                Ok(crate::state::Taken::Accepted { .. }) => new += 1,
                Ok(crate::state::Taken::Duplicate) => duplicates += 1,
                Err(refused) => {
                    tracing::warn!(reason = %refused, taken = new + duplicates, events = total, "ingest: delivery refused; the file stays and is tried again at the next poll");
                    return Outcome::Stays;
                }
            }
        }
        if !self.move_to(c, &self.done).await {
            return Outcome::Stays;
        }
        crate::metrics::ingested_file("ok");
        tracing::info!(events = total, new, duplicates, "ingested a SFTP-hook file; moved to done/");
        Outcome::Moved
    }

    /// Moves the file into `to` durably; false (logged) when it could not.
    async fn move_to(&self, c: &Candidate, to: &Path) -> bool {
        let (from, to, inbox) = (c.path.clone(), to.to_path_buf(), self.dir.clone());
        match tokio::task::spawn_blocking(move || move_durably(&from, &inbox, &to)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "ingest: cannot move the file out of the inbox; trying again at the next poll");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "ingest: file move panicked");
                false
            }
        }
    }
}

/// The `*.json` regular files of `dir`, oldest first (by modification time, then name).
fn scan(dir: &Path) -> io::Result<Vec<Candidate>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !wanted(&name) {
            continue;
        }
        // `symlink_metadata`: a link is not followed out of the folder.
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let mtime = (meta.mtime(), meta.mtime_nsec());
        let placed = (meta.ctime(), meta.ctime_nsec()) > mtime;
        found.push(Candidate { path: entry.path(), name, stamp: Stamp { len: meta.len(), mtime }, placed });
    }
    found.sort_by(|a, b| (a.stamp.mtime, &a.name).cmp(&(b.stamp.mtime, &b.name)));
    Ok(found)
}

/// `*.json`, not a dot-file, not a partial upload name.
fn wanted(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else { return false };
    let partial = [".tmp", ".part", ".filepart"].iter().any(|s| name.ends_with(s));
    !name.starts_with('.') && !partial && name.len() > ".json".len() && name.ends_with(".json")
}

/// Renames `file` (in `inbox`) into `to` without replacing a file already there (`name.1.json`,
/// `name.2.json`, …), then fsyncs both directories so that the move survives a crash.
fn move_durably(file: &Path, inbox: &Path, to: &Path) -> io::Result<PathBuf> {
    let name = file.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    let mut target = to.join(name);
    let stem = Path::new(name).file_stem().unwrap_or(name).to_string_lossy().into_owned();
    let mut n = 1;
    // Only this task writes into done/ and rejected/, so checking first is enough.
    while target.symlink_metadata().is_ok() {
        target = to.join(format!("{stem}.{n}.json"));
        n += 1;
    }
    fs::rename(file, &target)?;
    fs::File::open(to)?.sync_all()?;
    fs::File::open(inbox)?.sync_all()?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(Event, Bytes)>, FileError> {
        parse_calls(text.as_bytes(), Some("42"), &NormaliseOptions::default(), 1000, chrono::Utc::now())
    }

    #[test]
    fn a_file_holds_one_call_or_an_array_of_calls_each_kept_byte_for_byte() {
        let one = parse("\u{feff}{\"type\":\"payment\", \"b\": 1}\n").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0.organisation_id.as_deref(), Some("42"));
        assert_eq!(&one[0].1[..], br#"{"type":"payment", "b": 1}"#);
        let many = parse(r#"[ {"type":"payment","z":1,"a":2}, {"type":"inboundMessage"} ]"#).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(&many[0].1[..], br#"{"type":"payment","z":1,"a":2}"#, "the call's own bytes, key order kept");
        assert_eq!(many[1].0.event_type, "inboundMessage");
        assert!(parse("[]").unwrap().is_empty());
    }

    #[test]
    fn the_same_call_gets_the_same_id_by_file_as_by_post() {
        let body = br#"{"type":"messageStatusUpdate","conversationId":"1","communicationActionId":"2"}"#;
        let posted = normalise(body, Some("42".into()), &NormaliseOptions::default(), chrono::Utc::now()).unwrap();
        let filed = parse(&format!("[{}]", std::str::from_utf8(body).unwrap())).unwrap();
        assert_eq!(filed[0].0.id, posted.id);
    }

    #[test]
    fn files_that_are_not_webhook_calls_are_refused_whole() {
        assert!(matches!(parse("not json"), Err(FileError::NotJson(_))));
        assert!(matches!(parse(r#"{"type":"payment"} trailing"#), Err(FileError::NotJson(_))));
        assert_eq!(parse("\"text\"").unwrap_err(), FileError::NotCalls);
        assert_eq!(parse("42").unwrap_err(), FileError::NotCalls);
        assert_eq!(
            parse(r#"[{"type":"payment"}, 3]"#).unwrap_err(),
            FileError::Call { index: 1, error: BodyError::NotObject }
        );
        assert_eq!(
            parse(r#"[{"type":"payment"}, {"type":7}]"#).unwrap_err(),
            FileError::Call { index: 1, error: BodyError::TypeNotString }
        );
        assert_eq!(
            parse(r#"{"nottype":"payment"}"#).unwrap_err(),
            FileError::Call { index: 0, error: BodyError::MissingType }
        );
        let big = format!(r#"{{"type":"payment","pad":"{}"}}"#, "x".repeat(1000));
        assert_eq!(parse(&big).unwrap_err(), FileError::CallTooLarge { index: 0, max: 1000 });
    }

    #[test]
    fn only_complete_looking_json_names_are_candidates() {
        for yes in ["a.json", "2024-01-01T00-00-00_42.json"] {
            assert!(wanted(yes.as_ref()), "{yes}");
        }
        for no in [".a.json", "a.json.part", "a.json.tmp", "a.json.filepart", "a.txt", ".json", "a.JSON.part"] {
            assert!(!wanted(no.as_ref()), "{no}");
        }
    }

    #[test]
    fn moves_never_replace_a_file_already_there() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        fs::create_dir(&done).unwrap();
        for round in 0..3 {
            let f = d.path().join("a.json");
            fs::write(&f, format!("{round}")).unwrap();
            move_durably(&f, d.path(), &done).unwrap();
        }
        let mut names: Vec<_> = fs::read_dir(&done).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["a.1.json", "a.2.json", "a.json"]);
        assert_eq!(fs::read_to_string(done.join("a.json")).unwrap(), "0");
    }

    #[tokio::test]
    async fn a_renamed_file_counts_as_placed_and_one_written_in_place_does_not() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("in-place.json"), "{}").unwrap();
        fs::write(d.path().join("upload.json.part"), "{}").unwrap();
        // The rename must fall in a later tick of the file system's clock than the write to be
        // told apart: wait until a fresh write is stamped later.
        let written = fs::metadata(d.path().join("upload.json.part")).unwrap();
        let probe = d.path().join(".probe");
        loop {
            fs::write(&probe, "").unwrap();
            let m = fs::metadata(&probe).unwrap();
            if (m.mtime(), m.mtime_nsec()) > (written.mtime(), written.mtime_nsec()) {
                break;
            }
        }
        fs::rename(d.path().join("upload.json.part"), d.path().join("upload.json")).unwrap();
        let found = scan(d.path()).unwrap();
        let placed: HashMap<_, _> = found.iter().map(|c| (c.name.to_string_lossy().into_owned(), c.placed)).collect();
        assert_eq!(placed.get("in-place.json"), Some(&false));
        assert_eq!(placed.get("upload.json"), Some(&true));
    }
}
