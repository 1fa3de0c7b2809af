//! The re-delivery window: an event id seen within `dedup_window` is a duplicate.
//! In memory here; the spool persists its entries (table `dedup`, written in the same
//! transaction as the event) and loads them back at start, so the window survives restarts.
//! [`store`]: the window shared between replicas through Redis (`delivery.dedup_store`).

pub mod store;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct Dedup {
    window_ms: u64,
    seen: Mutex<Seen>,
}

/// Ids remembered at most: 7/8 of 2^17, the most a table of 2^17 slots holds (4 MiB; 191 new
/// events a second for the default 10-minute window). Beyond it the oldest tenth is forgotten
/// early: a re-delivery of one of those is then delivered again, which at-least-once allows;
/// memory stays bounded whatever the request rate × `dedup_window`.
pub const MAX_ENTRIES: usize = 114_688;

struct Seen {
    map: HashMap<u128, u64>,
    last_prune: u64,
}

impl Seen {
    fn evict_oldest(&mut self) {
        let mut times: Vec<u64> = self.map.values().copied().collect();
        let cut = times.len() / 10;
        let (_, threshold, _) = times.select_nth_unstable(cut);
        let threshold = *threshold;
        self.map.retain(|_, t| *t > threshold);
    }
}

/// The compact key of an event id (the spool stores it).
pub fn key(id: &str) -> u128 {
    u128::from_str_radix(id, 16).unwrap_or_else(|_| {
        // Ids are 32 hex digits; anything else still gets a stable key.
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(id.as_bytes());
        u128::from_be_bytes(d[..16].try_into().expect("16 bytes"))
    })
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        // Sized for the cap at once when dedup is on: growing by doubling would hold the old and
        // the new table together (1.5× the memory) at each step. Only the table's control bytes
        // (~256 KiB) are touched up front; slots become resident as ids arrive.
        let map = if window.is_zero() { HashMap::new() } else { HashMap::with_capacity(MAX_ENTRIES) };
        Dedup { window_ms: window.as_millis() as u64, seen: Mutex::new(Seen { map, last_prune: 0 }) }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Was `id` recorded less than a window ago?
    pub fn contains(&self, id: &str) -> bool {
        self.contains_at(id, now_millis())
    }

    pub fn contains_at(&self, id: &str, now: u64) -> bool {
        let seen = self.seen.lock().expect("dedup lock");
        seen.map.get(&key(id)).is_some_and(|t| now.saturating_sub(*t) < self.window_ms)
    }

    /// Records `id` as seen at `at` (unix millis).
    pub fn record_at(&self, id: &str, at: u64) {
        self.record_key_at(key(id), at)
    }

    /// Records an id by its [`key`] (entries loaded back from the spool).
    pub fn record_key_at(&self, k: u128, at: u64) {
        let mut seen = self.seen.lock().expect("dedup lock");
        let at = seen.map.get(&k).map_or(at, |t| (*t).max(at));
        seen.map.insert(k, at);
        // Prune at most once per tenth of a window, so the map holds about one window of ids.
        if at.saturating_sub(seen.last_prune) > self.window_ms / 10 {
            let window = self.window_ms;
            seen.map.retain(|_, t| at.saturating_sub(*t) < window);
            seen.last_prune = at;
        }
        if seen.map.len() >= MAX_ENTRIES {
            seen.evict_oldest();
        }
    }

    pub fn record(&self, id: &str) {
        self.record_at(id, now_millis())
    }

    pub fn len(&self) -> usize {
        self.seen.lock().expect("dedup lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_duplicates_only_inside_the_window() {
        let d = Dedup::new(Duration::from_secs(10));
        let id = "0123456789abcdef0123456789abcdef";
        assert!(!d.contains_at(id, 1_000));
        d.record_at(id, 1_000);
        assert!(d.contains_at(id, 1_000));
        assert!(d.contains_at(id, 10_999));
        assert!(!d.contains_at(id, 11_000));
        assert!(!d.contains_at("ffffffffffffffffffffffffffffffff", 1_000));
    }

    #[test]
    fn the_number_of_remembered_ids_is_bounded_and_the_newest_stay() {
        let d = Dedup::new(Duration::from_secs(3600));
        let id = |i: usize| format!("{i:032x}");
        for i in 0..MAX_ENTRIES + 10 {
            d.record_at(&id(i), 1_000 + i as u64);
        }
        assert!(d.len() < MAX_ENTRIES, "{}", d.len());
        let now = 1_000 + MAX_ENTRIES as u64 + 10;
        assert!(d.contains_at(&id(MAX_ENTRIES + 9), now), "the newest id is still a duplicate");
        assert!(!d.contains_at(&id(0), now), "the oldest was forgotten first");
    }

    #[test]
    fn old_entries_are_pruned() {
        let d = Dedup::new(Duration::from_secs(10));
        d.record_at("00000000000000000000000000000001", 1_000);
        d.record_at("00000000000000000000000000000002", 30_000);
        assert_eq!(d.len(), 1);
    }
}
