//! `[ingest]`: the SFTP-hook inbox (README, "SFTP hooks"). The poller is [`crate::ingest`];
//! this file holds the settings, so that loading a configuration needs nothing of it.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `[ingest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// `""`: off.
    pub dir: PathBuf,
    #[serde(with = "crate::config::duration")]
    pub poll: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { dir: PathBuf::new(), poll: Duration::from_secs(1) }
    }
}

impl IngestConfig {
    pub fn enabled(&self) -> bool {
        !self.dir.as_os_str().is_empty()
    }

    /// Problems as `ingest.<key>: …` messages.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.poll.is_zero() {
            errs.push("ingest.poll: must be greater than 0".into());
        }
        errs
    }
}
