//! The checkpoint's durable commit, behind the webhooks.
//!
//! At a checkpoint the writer commits the memtable to redb *without* durability (redb's
//! `Durability::None`: the B-trees are updated and readers see the new rows at once, nothing
//! is written back or synced), switches the write-ahead file, and hands the durable part to
//! this thread: an empty write transaction committed with `Durability::Immediate`, which
//! writes back and `fdatasync`s everything the non-durable commits before it changed (redb
//! makes them durable together). Meanwhile new frames go to the other write-ahead file and
//! webhooks are answered after their own frame's sync. Until the commit ends, the frames of
//! the file before the switch stay (after a crash, redb is back at the checkpoint before and
//! replay takes both files, see [`super::wal::live`]). One commit in flight at most: the
//! writer waits for it before the next checkpoint (the file it switches to must be covered).

use super::guard;
use super::ops::Op;
use super::store::{Op as _, StoreError};
use redb::Database;
#[cfg(test)]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What tests make the thread do, and what it did.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Hooks {
    /// Commits wait (before they start) while this is set.
    pub hold: AtomicBool,
    /// Commits fail while this is set.
    pub fail: AtomicBool,
    /// Commits handed over, and commits ended (either way).
    pub started: AtomicU64,
    pub ended: AtomicU64,
}

struct Job {
    db: Arc<Database>,
    /// To wake the writer when the commit ends (dropped then: the writer stops once every
    /// sender is gone).
    wake: Option<mpsc::Sender<Op>>,
}

/// How a commit ended, and how long it took.
pub(crate) struct Ended {
    pub result: Result<(), StoreError>,
    pub took: Duration,
}

pub(crate) struct Behind {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Ended>,
    /// When the commit in flight was handed over (`None`: none is).
    pub in_flight: Option<Instant>,
    #[cfg(test)]
    hooks: Arc<Hooks>,
}

impl Behind {
    /// Starts the thread.
    pub fn start(#[cfg(test)] hooks: Arc<Hooks>) -> std::io::Result<Behind> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        #[cfg(test)]
        let h = hooks.clone();
        std::thread::Builder::new().name("spool-checkpoint".into()).spawn(move || {
            for job in rx {
                #[cfg(test)]
                while h.hold.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let started = Instant::now();
                #[cfg(test)]
                let result = if h.fail.load(Ordering::Acquire) {
                    Err(StoreError::Io { op: "commit", source: std::io::Error::other("injected commit failure") })
                } else {
                    commit(&job.db)
                };
                #[cfg(not(test))]
                let result = commit(&job.db);
                // The handle goes before the writer hears of it (a heal closes it).
                drop(job.db);
                #[cfg(test)]
                h.ended.fetch_add(1, Ordering::AcqRel);
                if done_tx.send(Ended { result, took: started.elapsed() }).is_err() {
                    return;
                }
                if let Some(wake) = job.wake {
                    let _ = wake.send(Op::Synced);
                }
            }
        })?;
        Ok(Behind {
            jobs,
            done,
            in_flight: None,
            #[cfg(test)]
            hooks,
        })
    }

    /// Hands over the durable commit of what `db`'s non-durable commits changed. False when
    /// the thread is gone (the caller commits itself).
    pub fn submit(&mut self, db: Arc<Database>, wake: Option<mpsc::Sender<Op>>) -> bool {
        if self.jobs.send(Job { db, wake }).is_err() {
            return false;
        }
        #[cfg(test)]
        self.hooks.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight = Some(Instant::now());
        true
    }

    /// The commit in flight, if it has ended.
    pub fn try_ended(&mut self) -> Option<Ended> {
        self.in_flight?;
        let ended = self.done.try_recv().ok()?;
        self.in_flight = None;
        Some(ended)
    }

    /// Waits for the commit in flight (`None`: none was).
    pub fn wait(&mut self) -> Option<Ended> {
        self.in_flight?;
        self.in_flight = None;
        Some(self.done.recv().unwrap_or_else(|_| Ended {
            result: Err(StoreError::Io {
                op: "commit",
                source: std::io::Error::other("the checkpoint thread stopped"),
            }),
            took: Duration::ZERO,
        }))
    }
}

/// An empty durable commit: makes every non-durable commit before it durable.
fn commit(db: &Database) -> Result<(), StoreError> {
    guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        tx.commit().op("commit")?;
        Ok(())
    })?
}
