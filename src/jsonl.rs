//! Append-only JSON Lines files for what must never be lost: bodies refused with 400
//! (`rejected.jsonl`) and dead letters. Each record is written, flushed and fsynced before
//! the caller goes on.

use serde::Serialize;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

pub struct JsonlFile {
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl JsonlFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonlFile { path: path.into(), file: Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one line and makes it durable.
    pub async fn append<T: Serialize>(&self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await?;
            }
            *guard = Some(tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await?);
        }
        let f = guard.as_mut().expect("opened above");
        let res = async {
            f.write_all(&line).await?;
            f.flush().await?;
            f.sync_data().await
        }
        .await;
        if res.is_err() {
            *guard = None;
        }
        res
    }
}

/// The body as a JSON value for a record: text when it is UTF-8, hex otherwise.
pub fn body_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(body) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (None, Some(hex::encode(body))),
    }
}
