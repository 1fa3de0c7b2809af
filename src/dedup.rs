//! The re-delivery window: an event id seen within `dedup_window` is a duplicate.
//! In memory here; the spool persists its entries (table `dedup_batches`, written in the same
//! transaction as the event) and loads them back at start, so the window survives restarts.
//! [`store`]: the window shared between replicas through Redis (`delivery.dedup_store`).

pub mod store;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The hasher of the maps and sets keyed by event-id [`key`]s (the dedup window, the spool
/// writer's sets of ids in flight): std's SipHash-1-3 took ~1.5 % of the spool writer's time
/// (docs/performance.md, "The spool writer, seventh round"). A key is already the first half
/// of a SHA-256, so it needs no mixing for spread, only against an adversary who grinds ids
/// for bucket collisions: foldhash's quality hasher (the crate hashbrown itself uses; folded
/// 64×64→128-bit multiplies and a final one), seeded once per process from the OS's random
/// source. One function per process, so that every map and set of keys hashes alike. A
/// hand-written single folded multiply was tried first: with some seeds it spread keys that
/// differ in a few bits over ~1,900 of 4,096 buckets instead of ~2,600 (the test below).
#[derive(Clone)]
pub struct KeyState {
    inner: foldhash::quality::SeedableRandomState,
}

impl KeyState {
    fn with_seed(seed: u64) -> KeyState {
        KeyState {
            inner: foldhash::quality::SeedableRandomState::with_seed(seed, foldhash::SharedSeed::global_random()),
        }
    }
}

impl Default for KeyState {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        // std's RandomState is seeded from the OS's random source.
        KeyState::with_seed(*SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)))
    }
}

impl BuildHasher for KeyState {
    type Hasher = foldhash::quality::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.inner.build_hasher()
    }
}

/// A set of [`key`]s with the cheap hasher.
pub type KeySet = std::collections::HashSet<u128, KeyState>;

pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct Dedup {
    window_ms: u64,
    seen: Mutex<Seen>,
}

/// Ids remembered at most: 7/8 of 2^17, what four tables of 2^15 slots hold (3 MiB at 24
/// bytes a slot; 191 new events a second for the default 10-minute window). Beyond it the
/// oldest quarter is forgotten early: a re-delivery of one of those is then delivered again,
/// which at-least-once allows; memory stays bounded whatever the request rate × `dedup_window`.
pub const MAX_ENTRIES: usize = 114_688;

/// The ids are kept in this many generations of `MAX_ENTRIES / GENERATIONS` each: new ids go
/// to the current one; when it is full, the oldest is emptied and becomes the current one.
///
/// Why not one table with the oldest tenth evicted when full (as before): a hash table's
/// removals leave tombstones that still count against its capacity, so after a few evictions
/// an insert found it "full" and doubled it (8.25 MiB, next to the old 4 MiB while it moved:
/// a 12 MiB step in the spool's peak RSS under load, docs/performance.md "Memory"). A
/// generation is only ever emptied whole (`clear` keeps the allocation and leaves no
/// tombstone) and is rotated before it could grow, so the tables are allocated once, at
/// start, and never again.
const GENERATIONS: usize = 4;
const PER_GENERATION: usize = MAX_ENTRIES / GENERATIONS;

/// An id's [`key`] as two words: 24-byte slots instead of 32 (a `u128` is 16-aligned).
type Slot = (u64, u64);

fn slot(k: u128) -> Slot {
    ((k >> 64) as u64, k as u64)
}

#[derive(Default)]
struct Generation {
    /// Key → when it was last recorded (unix millis).
    map: HashMap<Slot, u64, KeyState>,
    /// The newest time recorded in `map` (the whole generation expires after it).
    newest: u64,
}

impl Generation {
    fn empty(&mut self) {
        self.map.clear();
        self.newest = 0;
    }

    /// No new key fits without the table growing.
    fn full(&self) -> bool {
        self.map.len() >= self.map.capacity()
    }
}

struct Seen {
    /// `gens[cur]` takes new ids; `gens[cur + 1]` (mod the length) is the oldest.
    gens: Vec<Generation>,
    cur: usize,
    last_prune: u64,
}

impl Seen {
    /// The newest time `k` was recorded, and in which generation.
    fn find(&self, k: &Slot) -> Option<(usize, u64)> {
        (0..self.gens.len())
            .map(|back| (self.cur + self.gens.len() - back) % self.gens.len())
            .find_map(|g| self.gens[g].map.get(k).map(|t| (g, *t)))
    }

    /// Records `k` at `at` (see [`Dedup::record_key_at`]); whether it was new.
    fn record(&mut self, window: u64, k: u128, at: u64) -> bool {
        if self.gens.is_empty() {
            // No window: nothing is ever a duplicate, nothing to remember.
            return true;
        }
        // At most once per tenth of a window, empty the generations whose newest id is out of
        // it, so that the tables hold about one window of ids.
        if at.saturating_sub(self.last_prune) > window / 10 {
            for g in &mut self.gens {
                if at.saturating_sub(g.newest) >= window {
                    g.empty();
                }
            }
            self.last_prune = at;
        }
        let k = slot(k);
        let mut at = at;
        let mut new = true;
        if let Some((g, t)) = self.find(&k) {
            new = at.saturating_sub(t) >= window;
            at = at.max(t);
            if g == self.cur {
                // In place: `insert` of a key already there may still grow a full table.
                let gen = &mut self.gens[g];
                if let Some(t) = gen.map.get_mut(&k) {
                    *t = at;
                }
                gen.newest = gen.newest.max(at);
                return new;
            }
            // Moves to the current generation, so that it lives as long as its newest time.
            self.gens[g].map.remove(&k);
        }
        if self.gens[self.cur].full() {
            self.rotate();
        }
        let g = &mut self.gens[self.cur];
        g.map.insert(k, at);
        g.newest = g.newest.max(at);
        new
    }

    /// Empties the oldest generation and makes it the current one.
    fn rotate(&mut self) {
        self.cur = (self.cur + 1) % self.gens.len();
        self.gens[self.cur].empty();
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
        // Sized for the cap at once when dedup is on; only the tables' control bytes (~128 KiB)
        // are touched up front, slots become resident as ids arrive.
        let gens = if window.is_zero() {
            Vec::new()
        } else {
            (0..GENERATIONS)
                .map(|_| Generation {
                    map: HashMap::with_capacity_and_hasher(PER_GENERATION, KeyState::default()),
                    newest: 0,
                })
                .collect()
        };
        Dedup { window_ms: window.as_millis() as u64, seen: Mutex::new(Seen { gens, cur: 0, last_prune: 0 }) }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Was `id` recorded less than a window ago?
    pub fn contains(&self, id: &str) -> bool {
        self.contains_at(id, now_millis())
    }

    pub fn contains_at(&self, id: &str, now: u64) -> bool {
        self.contains_key_at(key(id), now)
    }

    /// [`Dedup::contains_at`] by the id's [`key`] (for a caller that has it already).
    pub fn contains_key_at(&self, k: u128, now: u64) -> bool {
        let seen = self.seen.lock().expect("dedup lock");
        seen.find(&slot(k)).is_some_and(|(_, t)| now.saturating_sub(t) < self.window_ms)
    }

    /// Records `id` as seen at `at` (unix millis).
    pub fn record_at(&self, id: &str, at: u64) {
        self.record_key_at(key(id), at);
    }

    /// Records an id by its [`key`] (entries loaded back from the spool) — a lookup and an
    /// insert in one: answers whether it is new, i.e. was not recorded less than a window
    /// before `at` (`false`: a duplicate). Without a window nothing is remembered and every id
    /// is new.
    pub fn record_key_at(&self, k: u128, at: u64) -> bool {
        let mut seen = self.seen.lock().expect("dedup lock");
        seen.record(self.window_ms, k, at)
    }

    /// For each of `keys`, whether it was recorded less than a window before `now`, into `out`
    /// (cleared first): one lock for a whole batch (the spool writer checks a commit's ids).
    pub fn contains_keys_at(&self, keys: &[u128], now: u64, out: &mut Vec<bool>) {
        out.clear();
        let seen = self.seen.lock().expect("dedup lock");
        out.extend(
            keys.iter().map(|k| seen.find(&slot(*k)).is_some_and(|(_, t)| now.saturating_sub(t) < self.window_ms)),
        );
    }

    /// Records every one of `keys` as seen at `at`: one lock for a whole batch (the spool
    /// writer, once a commit is durable).
    pub fn record_keys_at(&self, keys: &[u128], at: u64) {
        let mut seen = self.seen.lock().expect("dedup lock");
        for k in keys {
            seen.record(self.window_ms, *k, at);
        }
    }

    pub fn record(&self, id: &str) {
        self.record_at(id, now_millis())
    }

    /// Ids remembered (each once).
    pub fn len(&self) -> usize {
        self.seen.lock().expect("dedup lock").gens.iter().map(|g| g.map.len()).sum()
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
    fn the_tables_never_grow_whatever_the_ids() {
        let d = Dedup::new(Duration::from_secs(3600));
        let capacity = |d: &Dedup| d.seen.lock().unwrap().gens.iter().map(|g| g.map.capacity()).sum::<usize>();
        let before = capacity(&d);
        assert_eq!(before, MAX_ENTRIES);
        // New ids, ids seen again (moved out of an older generation), ids loaded back.
        for i in 0..(4 * MAX_ENTRIES) as u64 {
            d.record_key_at(u128::from(i), 1_000 + i);
            if i % 3 == 0 {
                d.record_key_at(u128::from(i / 2), 1_000 + i);
            }
            assert!(d.len() <= MAX_ENTRIES, "{i}: {}", d.len());
        }
        assert_eq!(capacity(&d), before, "a table was reallocated");
        assert!(d.len() >= MAX_ENTRIES - MAX_ENTRIES / GENERATIONS, "{}", d.len());
    }

    #[test]
    fn an_id_seen_again_is_kept_as_long_as_its_newest_time() {
        let d = Dedup::new(Duration::from_secs(3600));
        let id = |i: usize| format!("{i:032x}");
        d.record_at(&id(0), 1_000);
        // Fill every generation and start over in the first one, seeing id 0 again in the second.
        for i in 1..3 * PER_GENERATION {
            if i == PER_GENERATION + 5 {
                d.record_at(&id(0), 2_000);
            }
            d.record_at(&id(i), 1_000 + i as u64);
        }
        for i in 3 * PER_GENERATION..4 * PER_GENERATION + 100 {
            d.record_at(&id(i), 1_000 + i as u64);
        }
        let now = 1_000 + 4 * PER_GENERATION as u64 + 100;
        assert!(d.contains_at(&id(0), now), "moved to the generation of its second sighting");
        assert!(!d.contains_at(&id(1), now), "its first generation is gone");
        assert!(!d.contains_at(&id(0), 2_000 + 3_600_000), "the window still ends");
        assert!(d.len() <= MAX_ENTRIES);
    }

    #[test]
    fn a_lookup_and_insert_reports_a_second_insert_of_the_same_id_as_a_duplicate() {
        let d = Dedup::new(Duration::from_secs(10));
        assert!(d.record_key_at(7, 1_000), "new");
        assert!(!d.record_key_at(7, 5_000), "a duplicate inside the window");
        assert!(!d.record_key_at(7, 14_999), "the window runs from the newest time");
        assert!(d.record_key_at(7, 30_000), "new again once the window is over");
        assert!(d.record_key_at(8, 30_000));
        let none = Dedup::new(Duration::ZERO);
        assert!(none.record_key_at(7, 1_000) && none.record_key_at(7, 1_000), "no window: always new");
    }

    #[test]
    fn a_batch_is_checked_and_recorded_as_one_id_at_a_time_would_be() {
        let d = Dedup::new(Duration::from_secs(10));
        d.record_key_at(2, 1_000);
        let mut out = vec![true; 9];
        d.contains_keys_at(&[1, 2, 3], 5_000, &mut out);
        assert_eq!(out, [false, true, false]);
        d.record_keys_at(&[1, 3], 5_000);
        d.contains_keys_at(&[1, 2, 3, 4], 11_000, &mut out);
        assert_eq!(out, [true, false, true, false], "2 was recorded at 1000 only");
        assert!(d.contains_key_at(3, 14_999) && !d.contains_key_at(3, 15_000));
    }

    #[test]
    fn the_key_hasher_is_one_function_per_process_and_spreads_keys_that_differ_in_any_bits() {
        use std::hash::BuildHasher as _;
        let (a, b) = (KeyState::default(), KeyState::default());
        let k: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        assert_eq!(a.hash_one(k), b.hash_one(k), "every map and set of keys hashes alike");
        assert_eq!(a.hash_one(slot(k)), b.hash_one(slot(k)));
        assert_ne!(a.hash_one(k), a.hash_one(k ^ 1));
        // Keys that differ only in their high word, only in their low word, or count up: the
        // bucket bits (low) and the control bits (top 7) still vary.
        // With this process's seed and with 300 others (a seed that spreads badly would make
        // this test fail now and then, as the first, hand-written hasher did).
        let seeds = (0..300u64).map(|i| KeyState::with_seed(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i));
        for state in std::iter::once(a.clone()).chain(seeds) {
            for keys in [
                (0..4096u128).map(|i| i << 64).collect::<Vec<_>>(),
                (0..4096u128).collect(),
                (0..4096u128).map(|i| i * 4096).collect(),
            ] {
                let low: std::collections::HashSet<u64> = keys.iter().map(|k| state.hash_one(*k) & 4095).collect();
                let top: std::collections::HashSet<u64> = keys.iter().map(|k| state.hash_one(*k) >> 57).collect();
                // Random hashes would fill ~2,589 of 4,096 buckets and all 128 control values.
                assert!(low.len() > 2450, "{} buckets", low.len());
                assert_eq!(top.len(), 128);
            }
        }
        // Bytes (not the keys' path) hash too, their length included.
        assert_ne!(a.hash_one("ab"), a.hash_one("ab\0"));
    }

    #[test]
    fn without_a_window_nothing_is_remembered() {
        let d = Dedup::new(Duration::ZERO);
        d.record("00000000000000000000000000000001");
        assert!(!d.contains("00000000000000000000000000000001"));
        assert!(d.is_empty());
    }

    #[test]
    fn old_entries_are_pruned() {
        let d = Dedup::new(Duration::from_secs(10));
        d.record_at("00000000000000000000000000000001", 1_000);
        d.record_at("00000000000000000000000000000002", 30_000);
        assert_eq!(d.len(), 1);
    }
}
