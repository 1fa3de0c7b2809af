//! `file` sink: JSON Lines, one event a line, written and flushed per delivery.
//! The path may be a template (`var/{type}.jsonl`); each rendered value is one safe path
//! component.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: String,
    #[serde(default)]
    pub format: Format,
    /// fsync after each line (slower; the default flushes to the OS, which survives a
    /// crash of the process but not of the host).
    #[serde(default)]
    pub fsync: bool,
}

impl FileConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if self.path.trim().is_empty() {
            errs.push(("path".into(), "must not be empty".into()));
        }
        check_template(&mut errs, "path", &self.path, Escape::PathSegment);
        errs
    }
}

const MAX_OPEN_FILES: usize = 64;

pub struct FileSink {
    name: String,
    path: Template,
    format: Format,
    fsync: bool,
    files: Mutex<HashMap<PathBuf, tokio::fs::File>>,
}

impl FileSink {
    pub fn new(name: &str, c: &FileConfig) -> Result<Self, SinkError> {
        let path = Template::parse(&c.path, Escape::PathSegment).map_err(|e| SinkError::permanent(e.to_string()))?;
        Ok(FileSink {
            name: name.to_owned(),
            path,
            format: c.format,
            fsync: c.fsync,
            files: Mutex::new(HashMap::new()),
        })
    }

    async fn open(path: &Path) -> std::io::Result<tokio::fs::File> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::OpenOptions::new().create(true).append(true).open(path).await
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let path = PathBuf::from(self.path.render(&env.event));
            let mut line = self.format.encode(env).to_vec();
            if self.format == Format::Raw {
                // A raw body may be pretty-printed; JSON Lines needs one line.
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                    line = serde_json::to_vec(&v).unwrap_or(line);
                }
            }
            line.push(b'\n');
            let mut files = self.files.lock().await;
            if !files.contains_key(&path) {
                if files.len() >= MAX_OPEN_FILES {
                    // A templated path can name many files; keep the descriptor count bounded.
                    files.clear();
                }
                let f = Self::open(&path)
                    .await
                    .map_err(|e| SinkError::retryable(format!("open {}: {e}", path.display())))?;
                files.insert(path.clone(), f);
            }
            let f = files.get_mut(&path).expect("inserted above");
            let res = async {
                f.write_all(&line).await?;
                f.flush().await?;
                if self.fsync {
                    f.sync_data().await?;
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = res {
                // Reopen next time (the file may have been rotated or the disk remounted).
                files.remove(&path);
                return Err(SinkError::retryable(format!("write {}: {e}", path.display())));
            }
            Ok(())
        })
    }
}
