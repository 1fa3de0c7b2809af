//! What the writer accepted since the last checkpoint, in memory: the **memtable**.
//!
//! A batch is made durable by its frame in the write-ahead file ([`super::wal`]); its effects
//! (new events with their records and sinks, pending rows, dedup rows, bookkeeping) are kept
//! here and reach redb only at the checkpoint, in its one commit (made durable behind the
//! webhooks, [`super::behind`]). An event every sink
//! has delivered before the checkpoint never reaches redb at all: its insert and its removal
//! cancel here. Bookkeeping of rows redb already holds (events older than the last checkpoint)
//! waits here too and is applied in the checkpoint's commit.
//!
//! Everything here is also in the frames of the current generation, which replay at open (and
//! in the writer's heal) writes to redb: the memtable is never the only copy of what was
//! acknowledged.
//!
//! Readers (the drains reading work back beyond their memory window, `replay`'s "already
//! pending" check, `sinks`) see redb and the memtable together: [`Snapshot`] takes redb's read
//! snapshot and copies what it needs of the memtable under the memtable's lock, and the writer
//! holds that lock across the checkpoint's commit and the memtable's clearing, so a reader
//! sees either the old redb with the memtable or the new redb without it — never neither.
//! Every seq of the memtable is above every seq the snapshot's redb holds.

use super::store::{self, Op as _, StoreError, EVENTS, PENDING};
use super::wal::Bookkeeping;
use super::Shared;
use redb::ReadableDatabase as _;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::MutexGuard;

/// One event accepted since the last checkpoint.
pub(crate) struct MemEvent {
    pub rec: Vec<u8>,
    /// The sinks it is still pending for (the request's own list, moved here: no copy).
    pub sinks: Vec<String>,
    /// The attempts made so far for each of `sinks`, in the same order; empty while every one
    /// is 0 (most events are delivered at the first attempt: no allocation for them).
    pub attempts: Vec<u32>,
}

impl MemEvent {
    /// `sinks[i]`'s attempts so far.
    fn attempts_of(&self, i: usize) -> u32 {
        self.attempts.get(i).copied().unwrap_or(0)
    }

    /// The sinks it is pending for, with their attempts.
    fn pending(&self) -> impl Iterator<Item = (&str, u32)> {
        self.sinks.iter().enumerate().map(|(i, s)| (s.as_str(), self.attempts_of(i)))
    }

    /// Not pending for `sink` any more.
    fn done(&mut self, sink: &str) {
        while let Some(i) = self.sinks.iter().position(|s| s == sink) {
            self.sinks.remove(i);
            if i < self.attempts.len() {
                self.attempts.remove(i);
            }
        }
    }

    /// `sink`'s attempts so far are `n` (when it is pending for it).
    fn set_attempts(&mut self, sink: &str, n: u32) {
        if let Some(i) = self.sinks.iter().position(|s| s == sink) {
            if self.attempts.len() < self.sinks.len() {
                self.attempts.resize(self.sinks.len(), 0);
            }
            self.attempts[i] = n;
        }
    }
}

#[derive(Default)]
pub(crate) struct Memtable {
    pub events: BTreeMap<u64, MemEvent>,
    /// Dedup rows: (accepted at, first seq of the batch, ids).
    pub dedup: Vec<(u64, u64, Vec<u128>)>,
    /// Bookkeeping of rows redb holds (seqs below the last checkpoint), in order.
    pub book: Vec<Bookkeeping>,
}

impl Memtable {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.dedup.is_empty() && self.book.is_empty()
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.dedup.clear();
        self.book.clear();
    }

    /// A new event, pending for `sinks` (no attempt made yet).
    pub fn insert(&mut self, seq: u64, rec: Vec<u8>, sinks: Vec<String>) {
        self.events.insert(seq, MemEvent { rec, sinks, attempts: Vec::new() });
    }

    /// Applies `book`: to the events held here at once (returns the bytes of the events it
    /// frees: their last sink is done), the rest is kept for redb's rows. Idempotent like
    /// [`super::wal::apply_book`]: a missing row stays missing, an attempt count never
    /// re-creates one.
    pub fn apply_book(&mut self, book: Vec<Bookkeeping>) -> u64 {
        let mut freed = 0u64;
        for op in book {
            match op {
                Bookkeeping::Done { sink, seqs } => {
                    let mut rest = Vec::new();
                    for seq in seqs {
                        let Some(ev) = self.events.get_mut(&seq) else {
                            rest.push(seq);
                            continue;
                        };
                        ev.done(&sink);
                        if ev.sinks.is_empty() {
                            if let Some(ev) = self.events.remove(&seq) {
                                freed += ev.rec.len() as u64;
                            }
                        }
                    }
                    if !rest.is_empty() {
                        self.book.push(Bookkeeping::Done { sink, seqs: rest });
                    }
                }
                Bookkeeping::Attempts { sink, items } => {
                    let mut rest = Vec::new();
                    for (seq, n) in items {
                        let Some(ev) = self.events.get_mut(&seq) else {
                            rest.push((seq, n));
                            continue;
                        };
                        ev.set_attempts(&sink, n);
                    }
                    if !rest.is_empty() {
                        self.book.push(Bookkeeping::Attempts { sink, items: rest });
                    }
                }
            }
        }
        freed
    }

    /// Writes it all into the checkpoint's transaction: events and their pending rows, dedup
    /// rows, then the bookkeeping of redb's rows (returns the bytes that frees).
    pub fn write(&self, tx: &redb::WriteTransaction, names: &BTreeSet<String>) -> Result<u64, StoreError> {
        let mut events = tx.open_table(EVENTS).op("open events")?;
        let mut pending = tx.open_table(PENDING).op("open pending")?;
        for (seq, ev) in &self.events {
            events.insert(*seq, ev.rec.as_slice()).op("write event")?;
            for (sink, attempts) in ev.pending() {
                pending.insert((sink, *seq), attempts).op("write pending")?;
            }
        }
        // One dedup row for all the batches (not one per batch: at half rate that was ~2,000
        // rows a second, most of the checkpoint's work), keyed by the newest batch's time
        // (its ids then leave the window at a restart up to one checkpoint later than their
        // own time would say: never sooner) and the first batch's first seq.
        if let (Some((_, first, _)), Some(at)) = (self.dedup.first(), self.dedup.iter().map(|d| d.0).max()) {
            let mut dedup = tx.open_table(store::DEDUP_BATCHES).op("open dedup")?;
            let ids: Vec<u128> = self.dedup.iter().flat_map(|d| d.2.iter().copied()).collect();
            dedup.insert((at, *first), store::dedup_batch(&ids).as_slice()).op("write dedup")?;
        }
        if self.book.is_empty() {
            return Ok(0);
        }
        super::wal::apply_book(&mut events, &mut pending, names, &self.book)
    }

    fn pending_of<'a>(&'a self, sink: &'a str, after: Option<u64>) -> impl Iterator<Item = (u64, &'a MemEvent, u32)> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        self.events.range(start..).filter_map(move |(seq, ev)| {
            ev.pending().find(|(s, _)| *s == sink).map(|(_, attempts)| (*seq, ev, attempts))
        })
    }
}

/// A consistent view of redb and the memtable (see the module's comment).
pub(crate) struct Snapshot<'a> {
    pub tx: redb::ReadTransaction,
    pub mem: MutexGuard<'a, Memtable>,
}

impl<'a> Snapshot<'a> {
    /// Redb's read snapshot, taken under the memtable's lock (held until [`Snapshot`] drops:
    /// copy what is needed and drop it soon; the writer waits for it).
    pub fn take(shared: &'a Shared, db: &redb::Database) -> Result<Snapshot<'a>, StoreError> {
        let mem = shared.mem();
        let tx = super::guard::catch(|| db.begin_read().op("begin read"))??;
        Ok(Snapshot { tx, mem })
    }
}

/// Up to `limit` pending (seq, attempts) of `sink` with seq > `after`, in seq order: redb's
/// rows, then the memtable's (all newer).
pub fn load_pending(
    shared: &Shared,
    sink: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, u32)>, StoreError> {
    if after == Some(u64::MAX) {
        return Ok(Vec::new());
    }
    let db = shared.db()?;
    let (tx, newer) = {
        let snap = Snapshot::take(shared, &db)?;
        let newer: Vec<(u64, u32)> = snap.mem.pending_of(sink, after).take(limit).map(|(s, _, a)| (s, a)).collect();
        (snap.tx, newer)
    };
    let mut out = super::guard::catch(|| store::load_pending_in(&tx, sink, after, limit))??;
    let room = limit.saturating_sub(out.len());
    out.extend(newer.into_iter().take(room));
    Ok(out)
}

/// The stored record of each seq of `must` (`None` when it is gone), then of `ahead` while
/// their total stays within `budget` bytes (see [`store::load_events`]), from the memtable
/// or redb.
pub fn load_events(
    shared: &Shared,
    must: &[u64],
    ahead: &[u64],
    budget: u64,
) -> Result<Vec<store::Loaded>, StoreError> {
    let db = shared.db()?;
    let (tx, mut held) = {
        let snap = Snapshot::take(shared, &db)?;
        let held: HashMap<u64, Vec<u8>> = must
            .iter()
            .chain(ahead)
            .filter_map(|seq| snap.mem.events.get(seq).map(|ev| (*seq, ev.rec.clone())))
            .collect();
        (snap.tx, held)
    };
    if held.is_empty() {
        return super::guard::catch(|| store::load_events_in(&tx, must, ahead, budget))?;
    }
    super::guard::catch(|| {
        let events = tx.open_table(EVENTS).op("open events")?;
        let mut out = Vec::with_capacity(must.len() + ahead.len());
        for seq in must {
            let rec = match held.remove(seq) {
                Some(rec) => Some(rec),
                None => events.get(*seq).op("read events")?.map(|v| v.value().to_vec()),
            };
            out.push((*seq, rec));
        }
        let mut used = 0u64;
        for seq in ahead {
            let rec = match held.remove(seq) {
                Some(rec) => rec,
                None => match events.get(*seq).op("read events")? {
                    Some(v) => v.value().to_vec(),
                    None => continue,
                },
            };
            used += super::record::weight(&rec);
            if used > budget {
                break;
            }
            out.push((*seq, Some(rec)));
        }
        Ok(out)
    })?
}

/// The stored record of `sink`'s oldest pending event (lowest seq), if any.
pub fn oldest_pending(shared: &Shared, sink: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let db = shared.db()?;
    let (tx, newest) = {
        let snap = Snapshot::take(shared, &db)?;
        let first = snap.mem.pending_of(sink, None).next().map(|(_, ev, _)| ev.rec.clone());
        (snap.tx, first)
    };
    match super::guard::catch(|| store::oldest_pending_in(&tx, sink))?? {
        Some(rec) => Ok(Some(rec)),
        None => Ok(newest),
    }
}

/// The event ids pending for `sink` (records that cannot be read are left out).
pub fn pending_ids(shared: &Shared, sink: &str) -> Result<HashSet<String>, StoreError> {
    let db = shared.db()?;
    let (tx, mut ids) = {
        let snap = Snapshot::take(shared, &db)?;
        let ids: HashSet<String> =
            snap.mem.pending_of(sink, None).filter_map(|(_, ev, _)| super::record::stored_id(&ev.rec)).collect();
        (snap.tx, ids)
    };
    ids.extend(super::guard::catch(|| store::pending_ids_in(&tx, sink))??);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTable as _;
    use std::sync::Arc;

    fn done(sink: &str, seqs: &[u64]) -> Bookkeeping {
        Bookkeeping::Done { sink: Arc::from(sink), seqs: seqs.to_vec() }
    }

    #[test]
    fn an_event_every_sink_has_done_leaves_the_memtable_and_other_rows_wait_for_redb() {
        let mut m = Memtable::default();
        m.insert(10, vec![1; 100], vec!["a".into(), "b".into()]);
        m.insert(11, vec![2; 50], vec!["a".into()]);
        assert_eq!(m.apply_book(vec![done("a", &[3, 10, 11])]), 50);
        assert!(m.events.contains_key(&10) && !m.events.contains_key(&11));
        assert_eq!(m.book, vec![done("a", &[3])], "seq 3 is redb's: applied at the checkpoint");
        m.apply_book(vec![Bookkeeping::Attempts { sink: Arc::from("b"), items: vec![(10, 4), (11, 2), (2, 1)] }]);
        assert_eq!(m.events[&10].pending().collect::<Vec<_>>(), vec![("b", 4)]);
        assert_eq!(m.book.len(), 2);
        assert_eq!(m.apply_book(vec![done("b", &[10]), done("b", &[10])]), 100, "twice is harmless");
        assert!(m.events.is_empty());
        assert_eq!(m.pending_of("b", None).count(), 0);
    }

    #[test]
    fn each_sinks_attempts_stay_with_it_when_another_sink_finishes_and_reach_redb_at_the_checkpoint() {
        // The sinks' list is the request's own, the attempts are kept beside it only once one
        // is made: a sink that finishes takes its count with it, the others keep theirs.
        let mut m = Memtable::default();
        m.insert(5, vec![7; 10], vec!["a".into(), "b".into(), "c".into()]);
        m.insert(6, vec![8; 10], vec!["b".into()]);
        let attempts =
            |sink: &str, items: &[(u64, u32)]| Bookkeeping::Attempts { sink: Arc::from(sink), items: items.to_vec() };
        m.apply_book(vec![attempts("c", &[(5, 3)]), attempts("a", &[(5, 1)]), attempts("x", &[(5, 9)])]);
        assert_eq!(m.events[&5].pending().collect::<Vec<_>>(), vec![("a", 1), ("b", 0), ("c", 3)]);
        assert_eq!(m.events[&6].pending().collect::<Vec<_>>(), vec![("b", 0)], "no count made: none kept");
        assert!(m.events[&6].attempts.is_empty());
        assert_eq!(m.apply_book(vec![done("a", &[5])]), 0);
        assert_eq!(m.events[&5].pending().collect::<Vec<_>>(), vec![("b", 0), ("c", 3)]);
        m.apply_book(vec![attempts("b", &[(5, 2), (6, 4)])]);
        assert_eq!(m.pending_of("b", None).map(|(s, _, a)| (s, a)).collect::<Vec<_>>(), vec![(5, 2), (6, 4)]);
        assert_eq!(m.pending_of("c", Some(5)).count(), 0);

        let dir = tempfile::tempdir().unwrap();
        let (db, _) = store::open_db(dir.path()).unwrap();
        let tx = db.begin_write().unwrap();
        m.write(&tx, &BTreeSet::new()).unwrap();
        tx.commit().unwrap();
        let tx = db.begin_read().unwrap();
        let pending = tx.open_table(PENDING).unwrap();
        let mut rows: Vec<(String, u64, u32)> = pending
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value().0.to_owned(), k.value().1, v.value())
            })
            .collect();
        rows.sort();
        assert_eq!(rows, vec![("b".into(), 5, 2), ("b".into(), 6, 4), ("c".into(), 5, 3)]);
    }
}
