//! Open connections, counted against one bound for the whole process (descriptors are a
//! process-wide resource, so both listeners share it), and shed to make room.
//!
//! Invariants:
//! - At most `bound` connections count as open. A connection stops counting the moment it is
//!   chosen to be shed (its task closes it at once) or when its task ends.
//! - Each connection is in one state: `FRESH` (no complete request head yet), `BUSY` (a
//!   request is in progress: its head has arrived and its answer is not yet handed to hyper),
//!   `IDLE` (between two requests of a keep-alive connection) or `GONE`.
//! - A new connection at the bound makes room by shedding the oldest `FRESH` connection, else
//!   the one `IDLE` longest. A `BUSY` one is never shed: a legitimate client in the middle of a
//!   request keeps its connection whatever the flood. When every connection is busy, the
//!   newcomer is refused (closed at once) rather than left waiting in the kernel's backlog,
//!   unless its listener has fewer than `LANE_FLOOR` open: so the admin listener's probes and
//!   scrapes get in even while the webhook listener is full of requests in progress (the bound
//!   is then exceeded by at most `LANE_FLOOR` per listener, which the descriptor reserve covers).
//! - The queues are ordered by the time a connection entered its state. An entry carries the
//!   state word it was queued with (a generation counter and the state); once the connection
//!   moves on, the entry is stale and skipped. Stale entries are compacted away, so a queue
//!   holds at most about twice the open connections.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const FRESH: u64 = 0;
const IDLE: u64 = 1;
const BUSY: u64 = 2;
const GONE: u64 = 3;
const STATE: u64 = 0b11;

/// The state word after a move to `state`: the generation goes up, so older queue entries
/// no longer match.
fn moved(word: u64, state: u64) -> u64 {
    ((word & !STATE).wrapping_add(STATE + 1)) | state
}

/// Why a connection was closed to make room (the `state` label of the shed counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// It had not sent a complete request head.
    NoRequest,
    /// It was a keep-alive connection between requests.
    Idle,
    /// Every connection was busy: the new one was refused.
    New,
}

impl Shed {
    pub fn label(self) -> &'static str {
        match self {
            Shed::NoRequest => "no_request",
            Shed::Idle => "idle",
            Shed::New => "new",
        }
    }
}

/// Connections a listener may always have open, even beyond the bound when nothing can be shed.
pub const LANE_FLOOR: usize = 16;

/// The connections of one listener.
#[derive(Default)]
pub struct Lane {
    open: AtomicUsize,
}

/// One open connection, shared by its task and the queues.
pub struct Conn {
    word: AtomicU64,
    shed: Notify,
    lane: Arc<Lane>,
}

impl Conn {
    /// Completes once the connection has been chosen to be shed: its task then closes it.
    pub async fn shed(&self) {
        self.shed.notified().await
    }
}

struct Queued {
    conn: Arc<Conn>,
    word: u64,
}

impl Queued {
    fn is_current(&self) -> bool {
        self.conn.word.load(Ordering::Acquire) == self.word
    }
}

#[derive(Default)]
struct Queues {
    fresh: VecDeque<Queued>,
    idle: VecDeque<Queued>,
}

fn push(queue: &mut VecDeque<Queued>, entry: Queued, open: usize) {
    queue.push_back(entry);
    if queue.len() > 2 * open + 64 {
        queue.retain(Queued::is_current);
    }
}

/// Takes the first entry of `queue` whose connection is still in the state it was queued in,
/// and marks it gone.
fn shed_first(queue: &mut VecDeque<Queued>) -> bool {
    while let Some(e) = queue.pop_front() {
        if e.conn.word.compare_exchange(e.word, moved(e.word, GONE), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            e.conn.shed.notify_one();
            return true;
        }
    }
    false
}

/// The open connections of the process.
pub struct Connections {
    bound: usize,
    open: AtomicUsize,
    /// The most open at once since memory was last given back (see `trim`).
    peak: AtomicUsize,
    queues: Mutex<Queues>,
    /// When the last "bound reached" warning was logged (one per minute at most).
    warned: Mutex<Option<Instant>>,
}

impl Connections {
    pub fn new(bound: usize) -> Self {
        Connections {
            bound: bound.max(1),
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            queues: Mutex::new(Queues::default()),
            warned: Mutex::new(None),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a connection newly accepted by `lane`'s listener, shedding another when at the
    /// bound; `None` when there is no room (every connection is busy and the listener has its
    /// floor): the caller closes the new one.
    pub fn admit(&self, lane: &Arc<Lane>) -> Option<Arc<Conn>> {
        let mut q = self.queues.lock().expect("connection queues lock");
        if self.open() >= self.bound {
            self.warn_at_bound();
            let shed = if shed_first(&mut q.fresh) {
                Some(Shed::NoRequest)
            } else if shed_first(&mut q.idle) {
                Some(Shed::Idle)
            } else {
                None
            };
            match shed {
                Some(shed) => {
                    crate::metrics::connection_shed(shed.label());
                    self.open.fetch_sub(1, Ordering::AcqRel);
                }
                None if lane.open.load(Ordering::Acquire) < LANE_FLOOR => {}
                None => {
                    crate::metrics::connection_shed(Shed::New.label());
                    return None;
                }
            }
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(open, Ordering::AcqRel);
        lane.open.fetch_add(1, Ordering::AcqRel);
        let conn = Arc::new(Conn { word: AtomicU64::new(FRESH), shed: Notify::new(), lane: lane.clone() });
        push(&mut q.fresh, Queued { conn: conn.clone(), word: FRESH }, open);
        Some(conn)
    }

    /// A request head has arrived: the connection is busy and is not shed until it answers.
    /// False when it was chosen to be shed already (it is closing).
    pub fn begin_request(&self, conn: &Conn) -> bool {
        conn.word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| match w & STATE {
                GONE => None,
                BUSY => Some(w),
                _ => Some(moved(w, BUSY)),
            })
            .is_ok()
    }

    /// The answer is handed over: the connection is idle from now on (until its next request).
    pub fn end_request(&self, conn: &Arc<Conn>) {
        let Ok(was) = conn
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w & STATE == BUSY).then(|| moved(w, IDLE)))
        else {
            return;
        };
        let word = moved(was, IDLE);
        let open = self.open();
        let mut q = self.queues.lock().expect("connection queues lock");
        push(&mut q.idle, Queued { conn: conn.clone(), word }, open);
    }

    /// The connection's task ends (whatever the reason): it no longer counts. Called once.
    pub fn closed(&self, conn: &Conn) {
        conn.lane.open.fetch_sub(1, Ordering::AcqRel);
        let was =
            conn.word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some(moved(w, GONE))).unwrap_or_else(|w| w);
        if was & STATE != GONE {
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// How many fewer connections are open now than at the peak since [`Self::forget_peak`].
    pub fn released(&self) -> usize {
        let open = self.open();
        self.peak.load(Ordering::Acquire).saturating_sub(open)
    }

    /// Counts the peak again from the connections open now (after memory was given back).
    pub fn forget_peak(&self) {
        self.peak.store(self.open(), Ordering::Release);
    }

    /// Drops the stale entries of both queues and their spare room. A stale entry keeps its
    /// connection's small shared state alive, one allocation in the middle of what the
    /// connection's task freed: left in place after a flood, they would pin one page each
    /// and keep the allocator from giving those pages back.
    pub fn compact(&self) {
        let mut q = self.queues.lock().expect("connection queues lock");
        let Queues { fresh, idle } = &mut *q;
        for queue in [fresh, idle] {
            queue.retain(Queued::is_current);
            queue.shrink_to_fit();
        }
    }

    fn warn_at_bound(&self) {
        let mut warned = self.warned.lock().expect("warned lock");
        if !matches!(*warned, Some(at) if at.elapsed() < Duration::from_secs(60)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                max_connections = self.bound,
                "open connections at the bound: closing those without a request in progress to make room (a flood of idle connections?)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane() -> Arc<Lane> {
        Arc::new(Lane::default())
    }

    /// A listener that holds its floor of connections already (elsewhere in the test).
    fn lane_past_its_floor() -> Arc<Lane> {
        Arc::new(Lane { open: AtomicUsize::new(LANE_FLOOR) })
    }

    fn is_shed(c: &Conn) -> bool {
        c.word.load(Ordering::Acquire) & STATE == GONE
    }

    #[test]
    fn below_the_bound_nothing_is_shed() {
        let c = Connections::new(3);
        let lane = lane();
        let conns: Vec<_> = (0..3).map(|_| c.admit(&lane).unwrap()).collect();
        assert_eq!(c.open(), 3);
        assert!(conns.iter().all(|x| !is_shed(x)));
    }

    #[test]
    fn at_the_bound_the_oldest_connection_without_a_request_makes_room() {
        let c = Connections::new(3);
        let lane = lane();
        let a = c.admit(&lane).unwrap();
        let b = c.admit(&lane).unwrap();
        let d = c.admit(&lane).unwrap();
        let e = c.admit(&lane).unwrap();
        assert!(is_shed(&a));
        assert!(!is_shed(&b) && !is_shed(&d) && !is_shed(&e));
        assert_eq!(c.open(), 3);
        // The shed connection's task ends later; it is not counted twice.
        c.closed(&a);
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn a_connection_with_a_request_in_progress_is_never_shed() {
        let c = Connections::new(2);
        let lane = lane_past_its_floor();
        let busy = c.admit(&lane).unwrap();
        assert!(c.begin_request(&busy));
        let fresh = c.admit(&lane).unwrap();
        let newer = c.admit(&lane).unwrap();
        assert!(!is_shed(&busy), "the busy connection was shed");
        assert!(is_shed(&fresh));
        // Every connection busy: the newcomer is refused.
        assert!(c.begin_request(&newer));
        assert!(c.admit(&lane).is_none());
        assert_eq!(c.open(), 2);
        assert!(!is_shed(&busy) && !is_shed(&newer));
    }

    #[test]
    fn connections_without_a_request_go_before_idle_keep_alive_ones_and_idle_ones_longest_idle_first() {
        let c = Connections::new(3);
        let lane = lane_past_its_floor();
        let k1 = c.admit(&lane).unwrap();
        let k2 = c.admit(&lane).unwrap();
        for k in [&k2, &k1] {
            assert!(c.begin_request(k));
            c.end_request(k);
        }
        // k2 has been idle longer than k1; f has sent no request.
        let f = c.admit(&lane).unwrap();
        let n1 = c.admit(&lane).unwrap();
        assert!(is_shed(&f) && !is_shed(&k1) && !is_shed(&k2), "the connection without a request goes first");
        assert!(c.begin_request(&n1));
        let n2 = c.admit(&lane).unwrap();
        assert!(is_shed(&k2) && !is_shed(&k1), "the one idle longest goes next");
        assert!(c.begin_request(&n2));
        let n3 = c.admit(&lane).unwrap();
        assert!(is_shed(&k1));
        assert!(c.begin_request(&n3));
        assert!(c.admit(&lane).is_none(), "every connection busy: the newcomer is refused");
        assert!(!is_shed(&n1) && !is_shed(&n2) && !is_shed(&n3));
    }

    #[test]
    fn another_listener_gets_its_few_connections_even_when_every_connection_is_busy() {
        let c = Connections::new(LANE_FLOOR);
        let (hooks, admin) = (lane(), lane());
        let busy: Vec<_> = (0..LANE_FLOOR).map(|_| c.admit(&hooks).unwrap()).collect();
        assert!(busy.iter().all(|b| c.begin_request(b)));
        assert!(c.admit(&hooks).is_none(), "the full listener's newcomer is refused");
        // A probe sends its request at once.
        let probes: Vec<_> = (0..LANE_FLOOR)
            .map(|_| {
                let p = c.admit(&admin).expect("a probe is let in");
                assert!(c.begin_request(&p));
                p
            })
            .collect();
        assert!(c.admit(&admin).is_none(), "beyond its floor, the other listener is refused too");
        assert!(busy.iter().chain(&probes).all(|x| !is_shed(x)));
        for p in &probes {
            c.closed(p);
        }
        assert_eq!(c.open(), LANE_FLOOR);
        assert_eq!(admin.open.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_connection_chosen_to_be_shed_does_not_start_a_request() {
        let c = Connections::new(1);
        let lane = lane();
        let a = c.admit(&lane).unwrap();
        let _b = c.admit(&lane).unwrap();
        assert!(!c.begin_request(&a));
    }

    #[test]
    fn a_shed_connection_is_told_even_when_it_was_not_waiting_yet() {
        let c = Connections::new(1);
        let lane = lane();
        let a = c.admit(&lane).unwrap();
        let _b = c.admit(&lane).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), a.shed()).await.expect("the shed signal was lost");
        });
    }

    #[test]
    fn closing_connections_frees_room_and_is_counted_as_released() {
        let c = Connections::new(8);
        let lane = lane();
        let conns: Vec<_> = (0..8).map(|_| c.admit(&lane).unwrap()).collect();
        for x in &conns[..6] {
            c.closed(x);
        }
        assert_eq!(c.open(), 2);
        assert_eq!(c.released(), 6);
        c.closed(&conns[6]);
        assert_eq!(c.released(), 7, "released counts from the peak until it is forgotten");
        c.forget_peak();
        assert_eq!(c.released(), 0);
        let again = c.admit(&lane).unwrap();
        assert!(!is_shed(&conns[7]) && !is_shed(&again));
    }

    #[test]
    fn stale_queue_entries_are_compacted() {
        let c = Connections::new(4);
        let lane = lane();
        let k = c.admit(&lane).unwrap();
        for _ in 0..10_000 {
            assert!(c.begin_request(&k));
            c.end_request(&k);
        }
        assert!(c.queues.lock().unwrap().idle.len() <= 2 * c.open() + 65);
        c.closed(&k);
        c.compact();
        let q = c.queues.lock().unwrap();
        assert!(q.idle.is_empty() && q.fresh.is_empty(), "closed connections stay queued");
        assert!(Arc::strong_count(&k) == 1, "the queues still hold a closed connection");
    }
}
