//! The spool's on-disk layout, on redb (one file, `spool.redb` under `delivery.spool_dir`).
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | u64 (`format` = [`FORMAT`]) |
//! | `events` | seq (u64, assigned by the writer) | [`encode`]d event JSON + raw body |
//! | `pending` | (sink name, seq) | attempts made so far (u32) |
//! | `dedup` | (accepted at, unix ms; event id key) | () |
//!
//! An event row lives as long as at least one `pending` row names its seq. Everything that
//! changes these tables goes through one write transaction at a time (the writer thread, or
//! `replay` while the daemon is stopped); readers use snapshots.

use crate::event::{Envelope, Event};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "spool.redb";
/// Version of the layout above; a spool written by a newer layout is refused, not guessed at.
pub const FORMAT: u64 = 1;

pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub const PENDING: TableDefinition<(&str, u64), u32> = TableDefinition::new("pending");
pub const DEDUP: TableDefinition<(u64, u128), ()> = TableDefinition::new("dedup");

const RECORD_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: in use by another process (is webio-router already running with this spool_dir?)", .path.display())]
    InUse { path: PathBuf },
    #[error("spool {}: cannot create its directory: {source}", .path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("spool {}: damaged, nothing could be read ({detail}); the file was left untouched — move it aside to start with an empty spool, keep it for recovery", .path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error("spool {}: written by a newer webio-router (format {found}, this build reads {FORMAT})", .path.display())]
    NewerFormat { path: PathBuf, found: u64 },
    #[error("spool {}: {detail}", .path.display())]
    Storage { path: PathBuf, detail: String },
}

/// The encoded event row: version byte, u32 length of the event JSON, the JSON, the raw body.
pub fn encode(env: &Envelope) -> Vec<u8> {
    let json = env.json();
    let mut out = Vec::with_capacity(5 + json.len() + env.raw.len());
    out.push(RECORD_V1);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(&env.raw);
    out
}

pub fn decode(rec: &[u8]) -> Result<Envelope, String> {
    let (&version, rest) = rec.split_first().ok_or("empty record")?;
    if version != RECORD_V1 {
        return Err(format!("unknown record version {version}"));
    }
    let len = rest.get(..4).ok_or("truncated record")?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let json = rest.get(4..4 + len).ok_or("truncated record")?;
    let event: Event = serde_json::from_slice(json).map_err(|e| format!("event JSON: {e}"))?;
    let raw = bytes::Bytes::copy_from_slice(&rest[4 + len..]);
    Ok(Envelope::with_json(event, raw, bytes::Bytes::copy_from_slice(json)))
}

pub fn storage(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> SpoolError + '_ {
    move |e| SpoolError::Storage { path: path.to_owned(), detail: e.to_string() }
}

/// redb page cache size.
const CACHE_BYTES: usize = 8 << 20;

/// Opens (or creates) the spool file, taking redb's exclusive lock on it.
pub fn open_db(dir: &Path) -> Result<(Database, PathBuf), SpoolError> {
    std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir { path: dir.to_owned(), source })?;
    let path = dir.join(FILE_NAME);
    // redb caches up to 1 GiB of pages by default; the spool's working set is the recent
    // backlog, so a small cache keeps a sidecar's memory flat (see docs/performance.md).
    let db = match Database::builder().set_cache_size(CACHE_BYTES).create(&path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(SpoolError::InUse { path }),
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
            if !matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
        {
            return Err(SpoolError::Storage { path, detail: e.to_string() })
        }
        Err(e) => return Err(SpoolError::Damaged { path, detail: e.to_string() }),
    };
    let at = path.clone();
    let err = storage(&at);
    let tx = db.begin_write().map_err(|e| err(&e))?;
    {
        let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
        let found = meta.get("format").map_err(|e| err(&e))?.map(|v| v.value());
        match found {
            Some(f) if f > FORMAT => return Err(SpoolError::NewerFormat { path, found: f }),
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT).map_err(|e| err(&e))?;
            }
        }
        tx.open_table(EVENTS).map_err(|e| err(&e))?;
        tx.open_table(PENDING).map_err(|e| err(&e))?;
        tx.open_table(DEDUP).map_err(|e| err(&e))?;
    }
    tx.commit().map_err(|e| err(&e))?;
    Ok((db, path))
}

/// What a start finds in the spool.
#[derive(Debug, Default)]
pub struct Recovered {
    pub next_seq: u64,
    /// (event, sink) pairs still to deliver, by sink.
    pub pending: BTreeMap<String, u64>,
    pub events: u64,
    pub bytes: u64,
    /// Dedup entries still inside the window: (accepted at, id key).
    pub dedup: Vec<(u64, u128)>,
    /// Event rows that could not be decoded: kept in place, reported, never delivered.
    pub unreadable: Vec<u64>,
    /// Event rows no pending row refers to (left by an older bug or a manual edit).
    pub orphans: Vec<u64>,
}

/// Reads everything a start needs from one snapshot.
pub fn recover(db: &Database, path: &Path, dedup_since: u64) -> Result<Recovered, SpoolError> {
    let err = storage(path);
    let damaged = |e: &dyn std::fmt::Display| SpoolError::Damaged { path: path.to_owned(), detail: e.to_string() };
    let tx = db.begin_read().map_err(|e| err(&e))?;
    let mut r = Recovered::default();
    let pending = tx.open_table(PENDING).map_err(|e| damaged(&e))?;
    let mut referenced = std::collections::HashSet::new();
    for row in pending.iter().map_err(|e| damaged(&e))? {
        match row {
            Ok((k, _)) => {
                let (sink, seq) = k.value();
                *r.pending.entry(sink.to_owned()).or_default() += 1;
                referenced.insert(seq);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "spool: a pending row cannot be read; the rest is kept");
            }
        }
    }
    let events = tx.open_table(EVENTS).map_err(|e| damaged(&e))?;
    for row in events.iter().map_err(|e| damaged(&e))? {
        match row {
            Ok((k, v)) => {
                let seq = k.value();
                let rec = v.value();
                r.events += 1;
                r.bytes += rec.len() as u64;
                r.next_seq = r.next_seq.max(seq + 1);
                if decode(rec).is_err() {
                    r.unreadable.push(seq);
                } else if !referenced.contains(&seq) {
                    r.orphans.push(seq);
                }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "spool: an event row cannot be read; the rest is kept");
            }
        }
    }
    let dedup = tx.open_table(DEDUP).map_err(|e| damaged(&e))?;
    for (k, _) in dedup.range((dedup_since, 0u128)..).map_err(|e| damaged(&e))?.flatten() {
        r.dedup.push(k.value());
    }
    Ok(r)
}

/// The next free seq (for `replay`, which does not need a full [`recover`]).
pub fn next_seq(db: &Database, path: &Path) -> Result<u64, SpoolError> {
    let err = storage(path);
    let tx = db.begin_read().map_err(|e| err(&e))?;
    let events = tx.open_table(EVENTS).map_err(|e| err(&e))?;
    let last = events.last().map_err(|e| err(&e))?;
    Ok(last.map_or(0, |(k, _)| k.value() + 1))
}

/// Up to `limit` pending (seq, attempts) of `sink` with seq > `after`, in seq order.
pub fn load_pending(db: &Database, sink: &str, after: Option<u64>, limit: usize) -> Result<Vec<(u64, u32)>, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let pending = tx.open_table(PENDING).map_err(|e| e.to_string())?;
    let start = after.map_or(0, |a| a.saturating_add(1));
    let mut out = Vec::new();
    if after == Some(u64::MAX) {
        return Ok(out);
    }
    for row in pending.range((sink, start)..=(sink, u64::MAX)).map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        out.push((k.value().1, v.value()));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The stored record of each seq (`None` when it is gone).
pub fn load_events(db: &Database, seqs: &[u64]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let events = tx.open_table(EVENTS).map_err(|e| e.to_string())?;
    seqs.iter().map(|seq| Ok(events.get(*seq).map_err(|e| e.to_string())?.map(|v| v.value().to_vec()))).collect()
}

/// Total of pending rows (for tests and `replay`'s summary).
pub fn pending_len(db: &Database) -> Result<u64, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let pending = tx.open_table(PENDING).map_err(|e| e.to_string())?;
    pending.len().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        let body = br#"{"type":"payment","amount":3}"#;
        let ev = crate::event::normalise(body, None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(ev, bytes::Bytes::from_static(body))
    }

    #[test]
    fn records_round_trip() {
        let e = env();
        let back = decode(&encode(&e)).unwrap();
        assert_eq!(back.event, e.event);
        assert_eq!(back.raw, e.raw);
    }

    #[test]
    fn damaged_records_are_refused_not_guessed() {
        let rec = encode(&env());
        assert!(decode(&rec[..3]).is_err());
        assert!(decode(&[9, 0, 0, 0, 0]).is_err());
        let mut bad = rec.clone();
        bad[6] = b'!';
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn a_second_open_of_the_same_spool_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open_db(dir.path()).unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("spool.redb"));
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
        assert_eq!(std::fs::read(dir.path().join(FILE_NAME)).unwrap().len(), 8192, "left untouched");
    }
}
