//! The write-ahead file's sync lanes: threads that `fdatasync` the file for the writer, so
//! that the writer writes the next batch's frame while the last one's sync is in flight
//! (pipelined syncs, as the file sink's; docs/spool.md, "Pipelined syncs").
//!
//! Each lane has its own open file description of the file: a failed write-back is reported
//! once to every description open when it happened, so each lane's next `fdatasync` sees it
//! (descriptions shared through `dup` would report it to one of them only, and another lane's
//! sync could succeed without the pages having reached the disk). A frame is durable once a
//! sync that started after its write succeeded; the writer answers its frames strictly in
//! order, so a later frame's sync that ends first waits for the earlier ones.

use super::ops::Op;
use std::io;
use std::path::Path;
use std::sync::mpsc;
#[cfg(test)]
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

/// Sync threads, and so frames whose sync may be in flight at once.
pub(crate) const LANES: usize = 3;

/// A sync to run: its ticket, and how to wake the writer when it ends.
struct Job {
    ticket: u64,
    /// Which of the write-ahead files (index into the paths given to [`Lanes::start`]).
    file: usize,
    wake: mpsc::Sender<Op>,
}

/// What tests make the lanes do (held syncs, failed syncs).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// Syncs wait (before they start) while this is set.
    pub hold: AtomicBool,
    /// Syncs fail while this is set.
    pub fail: AtomicBool,
}

pub(crate) struct Lanes {
    jobs: Vec<mpsc::Sender<Job>>,
    done: mpsc::Receiver<(u64, io::Result<()>)>,
    next: usize,
}

impl Lanes {
    /// Starts [`LANES`] threads, each with its own open file description of each of `paths`
    /// (the two write-ahead files).
    pub fn start(paths: &[std::path::PathBuf; 2], #[cfg(test)] faults: Arc<Faults>) -> io::Result<Lanes> {
        let (done_tx, done) = mpsc::channel();
        let mut jobs = Vec::with_capacity(LANES);
        for i in 0..LANES {
            let open = |p: &Path| std::fs::OpenOptions::new().write(true).open(p);
            let files = [open(&paths[0])?, open(&paths[1])?];
            let (tx, rx) = mpsc::channel::<Job>();
            let done_tx = done_tx.clone();
            #[cfg(test)]
            let faults = faults.clone();
            std::thread::Builder::new().name(format!("spool-sync-{i}")).spawn(move || {
                for job in rx {
                    #[cfg(test)]
                    while faults.hold.load(Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let file = &files[job.file];
                    #[cfg(test)]
                    let result = if faults.fail.load(Ordering::Acquire) {
                        Err(io::Error::other("injected sync failure"))
                    } else {
                        file.sync_data()
                    };
                    #[cfg(not(test))]
                    let result = file.sync_data();
                    if done_tx.send((job.ticket, result)).is_err() {
                        return;
                    }
                    let _ = job.wake.send(Op::Synced);
                }
            })?;
            jobs.push(tx);
        }
        Ok(Lanes { jobs, done, next: 0 })
    }

    /// Starts the sync of the frames written so far to write-ahead file `file`; its result
    /// comes with `ticket`. False when the lane is gone (no result will come).
    pub fn submit(&mut self, ticket: u64, file: usize, wake: mpsc::Sender<Op>) -> bool {
        let lane = &self.jobs[self.next % self.jobs.len()];
        self.next = self.next.wrapping_add(1);
        lane.send(Job { ticket, file, wake }).is_ok()
    }

    /// A result that came, if any.
    pub fn try_result(&self) -> Option<(u64, io::Result<()>)> {
        self.done.try_recv().ok()
    }

    /// The next result (waits for it); `None` when every lane is gone.
    pub fn result(&self) -> Option<(u64, io::Result<()>)> {
        self.done.recv().ok()
    }
}
