//! What the submit path and the drain tasks hand to the writer thread. Its own module, so
//! that the queues (which send bookkeeping) and the writer (which fills the queues) do not
//! import each other.

use super::store::StoreError;
use crate::delivery::{Accepted, Refused};
use crate::event::Envelope;
use std::sync::Arc;
use tokio::sync::oneshot;

pub(crate) enum Op {
    Append(Append),
    /// A write-ahead frame's `fdatasync` ended (its result waits in the writer's sync lanes):
    /// wakes the writer to answer its batch.
    Synced,
    Book(Bookkeeping),
    Pause(Pause),
}

/// `webio-router pause` / `resume`: the `paused` table changed durably, answered once committed.
pub(crate) struct Pause {
    pub sink: String,
    pub paused: bool,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// A new event for `sinks`, answered once it is durable (or refused).
pub(crate) struct Append {
    pub rec: Vec<u8>,
    pub id: String,
    pub sinks: Vec<String>,
    pub env: Arc<Envelope>,
    /// Checked against (and recorded in) the dedup window; `false` for a replayed dead
    /// letter, which must go out again although its id was seen.
    pub dedup: bool,
    pub reply: oneshot::Sender<Result<Accepted, Refused>>,
}

/// Delivery bookkeeping (defined beside the write-ahead file, whose frames carry it).
pub(crate) use super::wal::Bookkeeping;
