//! Group-commit workload of the webio-router spool, on redb and on fjall.
//!
//! P producer threads each submit a ~1 KiB event and wait until it is durable (like a
//! webhook waiting for its 202). One writer thread takes everything queued, writes it in one
//! durable transaction (event + one pending (sink, seq) key + a dedup key), removes the
//! previous batch (as if the sink had delivered it), commits with fsync, then answers every
//! waiter. Prints appends/s, commits/s, appends per commit and p50/p99 latency.

use std::sync::mpsc;
use std::time::{Duration, Instant};

type Reply = mpsc::SyncSender<()>;

trait Store: Send {
    /// Writes `batch` events (starting at `first_seq`) and removes `delete`, durably.
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>], delete: &[u64]);
}

struct Redb {
    db: redb::Database,
}

const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
const PENDING: redb::TableDefinition<(&str, u64), u32> = redb::TableDefinition::new("pending");
const DEDUP: redb::TableDefinition<(u64, u128), ()> = redb::TableDefinition::new("dedup");

impl Store for Redb {
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>], delete: &[u64]) {
        let tx = self.db.begin_write().unwrap();
        {
            let mut ev = tx.open_table(EVENTS).unwrap();
            let mut pe = tx.open_table(PENDING).unwrap();
            let mut de = tx.open_table(DEDUP).unwrap();
            for (i, v) in batch.iter().enumerate() {
                let seq = first_seq + i as u64;
                ev.insert(seq, v.as_slice()).unwrap();
                pe.insert(("archive", seq), 0).unwrap();
                de.insert((seq, seq as u128 * 7919), ()).unwrap();
            }
            for seq in delete {
                ev.remove(*seq).unwrap();
                pe.remove(("archive", *seq)).unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

struct Fjall {
    db: fjall::Database,
    events: fjall::Keyspace,
    pending: fjall::Keyspace,
    dedup: fjall::Keyspace,
}

impl Store for Fjall {
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>], delete: &[u64]) {
        let mut b = self.db.batch().durability(Some(fjall::PersistMode::SyncData));
        for (i, v) in batch.iter().enumerate() {
            let seq = first_seq + i as u64;
            b.insert(&self.events, seq.to_be_bytes(), v.as_slice());
            let mut pk = b"archive\0".to_vec();
            pk.extend_from_slice(&seq.to_be_bytes());
            b.insert(&self.pending, pk, 0u32.to_be_bytes());
            let mut dk = seq.to_be_bytes().to_vec();
            dk.extend_from_slice(&(seq as u128 * 7919).to_be_bytes());
            b.insert(&self.dedup, dk, []);
        }
        for seq in delete {
            b.remove(&self.events, seq.to_be_bytes());
            let mut pk = b"archive\0".to_vec();
            pk.extend_from_slice(&seq.to_be_bytes());
            b.remove(&self.pending, pk);
        }
        b.commit().unwrap();
    }
}

fn run(name: &str, mut store: Box<dyn Store>, producers: usize, secs: u64) {
    let (tx, rx) = mpsc::sync_channel::<(Vec<u8>, Reply)>(4096);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for p in 0..producers {
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut ev = format!("{{\"producer\":{p},\"n\":{n},\"body\":\"").into_bytes();
                ev.resize(1000, b'x');
                ev.extend_from_slice(b"\"}");
                let (rtx, rrx) = mpsc::sync_channel(1);
                let t = Instant::now();
                tx.send((ev, rtx)).unwrap();
                rrx.recv().unwrap();
                lat.push(t.elapsed());
                n += 1;
            }
            lat
        }));
    }
    drop(tx);
    let started = Instant::now();
    let (mut seq, mut commits, mut appends) = (0u64, 0u64, 0u64);
    let mut prev: Vec<u64> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let data: Vec<Vec<u8>> = batch.iter().map(|(d, _)| d.clone()).collect();
        store.commit(seq, &data, &prev);
        prev = (seq..seq + data.len() as u64).collect();
        seq += data.len() as u64;
        commits += 1;
        appends += data.len() as u64;
        for (_, r) in batch {
            let _ = r.send(());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    lat.sort();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "| {name} | {producers} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} |",
        appends as f64 / elapsed,
        commits as f64 / elapsed,
        appends as f64 / commits as f64,
        pct(0.5),
        pct(0.99)
    );
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: store-compare DIR [SECONDS]");
    let secs: u64 = std::env::args().nth(2).map_or(5, |s| s.parse().unwrap());
    println!("| store | producers | appends/s | commits/s | appends/commit | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for producers in [1, 16, 64] {
        let d = std::path::Path::new(&dir).join(format!("redb-{producers}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let db = redb::Database::create(d.join("spool.redb")).unwrap();
        run("redb 4", Box::new(Redb { db }), producers, secs);

        let d = std::path::Path::new(&dir).join(format!("fjall-{producers}"));
        let _ = std::fs::remove_dir_all(&d);
        let db = fjall::Database::builder(&d).open().unwrap();
        let ks = |n: &str| db.keyspace(n, fjall::KeyspaceCreateOptions::default).unwrap();
        let (events, pending, dedup) = (ks("events"), ks("pending"), ks("dedup"));
        run("fjall 3", Box::new(Fjall { db, events, pending, dedup }), producers, secs);
    }
}
