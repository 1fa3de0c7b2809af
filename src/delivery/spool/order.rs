//! The conversation gate of one sink with `ordering = "conversation"` (README "Ordering"):
//! what the sink's drain task consults when it picks the next events to attempt, and what
//! it tells when an event is finished.
//!
//! Invariants (the drain keeps them by calling [`Gate::pick`] only while none of the sink's
//! events is in flight, and [`Gate::release`] for every event delivered or dead-lettered):
//!
//! - At most one event per conversation is in flight or waiting for its retry: the
//!   conversation's *head*. The gate holds the conversation for the head's seq until the
//!   head is released; later events of that conversation are not picked meanwhile.
//! - The head is the conversation's lowest pending seq for this sink, because each
//!   conversation's candidates come in seq (acceptance) order: new work is appended in seq
//!   order, retried heads are put back in front (the heads of several conversations together,
//!   so the whole list need not be in seq order), and after a restart the pending rows are
//!   read back in seq order. So the
//!   order survives retries and restarts without any state of its own on disk; the gate is
//!   rebuilt from the pending rows as they are picked.
//! - A head whose attempt failed while the sink delivered others (the sink is up; this event
//!   is what fails) may wait for its retry *in the gate* ([`Gate::defer`]), so that the
//!   sink's other conversations go on meanwhile instead of the whole sink backing off. It
//!   keeps holding its conversation and goes back in front of the candidates when it is due
//!   ([`Gate::take_due`]); a deferred event is the only one of its conversation that can be
//!   attempted next.
//! - Events without a conversation id are never held and hold nothing back.
//! - A sink *without* ordering uses only the gate's deferral: its failed events wait there
//!   for their own retry (deferred with no conversation, so nothing is held) while the rest
//!   of its events go on; [`Gate::pick`] is not used for it.
//! - A candidate whose conversation is not known yet (its event not read back from the spool)
//!   is picked only alone, first, with nothing skipped before it and no head deferred: no
//!   conversation is held then, so it can break no order. (The drain reads the first
//!   candidate's event before picking, so this is for a read that failed or a damaged record.)
//! - A hold never outlives its head: if a pick finds nothing to attempt among candidates,
//!   the holds whose head is neither among them nor deferred are stale (the head left some
//!   other way) and are dropped, so a conversation can never be blocked for good. A pick from
//!   candidates of which none waits behind a deferred head never comes back empty.
//!
//! The gate does not import the queue: it sees candidates through [`Key`], so that the
//! queue (which owns the items) and the gate stay one-way.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// What the gate needs to know of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key<'a> {
    /// The event is in memory: its seq and its conversation id, if any.
    Known { seq: u64, conversation: Option<&'a str> },
    /// The event is still only on disk: its conversation is not known yet.
    Unknown,
}

/// The held conversations of one sink (conversation id → seq of its head), and the heads
/// that wait in the gate for their retry (`T`: the queue's item).
#[derive(Debug)]
pub(crate) struct Gate<T> {
    held: HashMap<String, u64>,
    /// (due, seq, item), in no particular order (at most one per conversation).
    deferred: Vec<(Instant, u64, T)>,
}

impl<T> Gate<T> {
    pub fn new() -> Gate<T> {
        Gate { held: HashMap::new(), deferred: Vec::new() }
    }

    /// Heads waiting in the gate for their retry.
    #[cfg(test)]
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// `item` (event `seq`, the head of `conversation`, which stays held) waits in the gate
    /// until `due`.
    pub fn defer(&mut self, conversation: Option<&str>, seq: u64, item: T, due: Instant) {
        if let Some(c) = conversation {
            // Held already, unless it was attempted before its conversation was known.
            self.held.entry(c.to_owned()).or_insert(seq);
        }
        self.deferred.push((due, seq, item));
    }

    /// When the next deferred head is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.deferred.iter().map(|(due, _, _)| *due).min()
    }

    /// The deferred heads due at `now`, in seq order, to go back in front of the candidates.
    pub fn take_due(&mut self, now: Instant) -> Vec<T> {
        if !self.deferred.iter().any(|(due, _, _)| *due <= now) {
            return Vec::new();
        }
        let (mut due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| d.0 <= now);
        self.deferred = rest;
        due.sort_by_key(|d| d.1);
        due.into_iter().map(|(_, _, item)| item).collect()
    }

    /// Conversations held right now (each by its head).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether `seq` of `conversation` may be attempted now; if so it is (or stays) the
    /// conversation's head.
    pub fn admit(&mut self, conversation: Option<&str>, seq: u64) -> bool {
        let Some(c) = conversation else { return true };
        match self.held.get(c) {
            Some(&head) => head == seq,
            None => {
                self.held.insert(c.to_owned(), seq);
                true
            }
        }
    }

    /// `seq` of `conversation` was delivered or dead-lettered: the conversation's next event
    /// may go. Releasing an event that is not the head changes nothing.
    pub fn release(&mut self, conversation: Option<&str>, seq: u64) {
        if let Some(c) = conversation {
            if self.held.get(c) == Some(&seq) {
                self.held.remove(c);
            }
        }
    }

    /// Forgets every hold (the sink's ordering was switched off); the deferred heads come
    /// back, in seq order, to go in front of the candidates.
    pub fn clear(&mut self) -> Vec<T> {
        self.held.clear();
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| d.1);
        deferred.into_iter().map(|(_, _, item)| item).collect()
    }

    /// Indices (ascending) of at most `n` of `items` (in seq order) that may be attempted now:
    /// the head of each conversation, every event without a conversation, and at most one
    /// event whose conversation is not known yet (see the module's invariants).
    pub fn pick(&mut self, items: &VecDeque<T>, n: usize, key: impl Fn(&T) -> Key<'_>) -> Vec<usize> {
        let picked = self.scan(items, n, &key);
        if !picked.is_empty() || items.is_empty() || n == 0 {
            return picked;
        }
        // Nothing to attempt although work waits: every candidate is held back by a head.
        // That is right for heads deferred in the gate; any other head should be among the
        // candidates (one batch at a time). Never let a hold block a conversation for good.
        let mut seqs: HashSet<u64> = self.deferred.iter().map(|d| d.1).collect();
        seqs.extend(items.iter().filter_map(|it| match key(it) {
            Key::Known { seq, .. } => Some(seq),
            Key::Unknown => None,
        }));
        let before = self.held.len();
        self.held.retain(|_, head| seqs.contains(head));
        if self.held.len() == before {
            // Everything waits behind deferred heads.
            return picked;
        }
        tracing::warn!(dropped = before - self.held.len(), "ordering: dropped holds whose event is gone");
        self.scan(items, n, &key)
    }

    fn scan(&mut self, items: &VecDeque<T>, n: usize, key: &impl Fn(&T) -> Key<'_>) -> Vec<usize> {
        let mut picked = Vec::new();
        let mut skipped = false;
        for (i, it) in items.iter().enumerate() {
            if picked.len() >= n {
                break;
            }
            match key(it) {
                Key::Known { seq, conversation } => {
                    if self.admit(conversation, seq) {
                        picked.push(i);
                    } else {
                        skipped = true;
                    }
                }
                Key::Unknown => {
                    // It may belong to a conversation picked or held back above, or deferred.
                    if picked.is_empty() && !skipped && self.deferred.is_empty() {
                        picked.push(i);
                    }
                    break;
                }
            }
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (seq, conversation); `None` seq: not known yet.
    type Cand = (u64, Option<&'static str>, bool);

    fn known(seq: u64, c: Option<&'static str>) -> Cand {
        (seq, c, true)
    }

    fn unknown(seq: u64) -> Cand {
        (seq, None, false)
    }

    fn key(c: &Cand) -> Key<'_> {
        if c.2 {
            Key::Known { seq: c.0, conversation: c.1 }
        } else {
            Key::Unknown
        }
    }

    /// Picks from `items` and returns the seqs picked, removing them (as the queue does).
    fn pick(gate: &mut Gate<Cand>, items: &mut VecDeque<Cand>, n: usize) -> Vec<u64> {
        let idx = gate.pick(items, n, key);
        let seqs = idx.iter().map(|&i| items[i].0).collect();
        for &i in idx.iter().rev() {
            items.remove(i);
        }
        seqs
    }

    #[test]
    fn one_event_per_conversation_until_it_is_released_and_others_flow_on() {
        let mut gate = Gate::new();
        let (a, b) = (Some("A"), Some("B"));
        let mut items: VecDeque<Cand> =
            [known(1, a), known(2, a), known(3, b), known(4, None), known(5, a), known(6, b), known(7, None)].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1, 3, 4, 7], "heads and events without a conversation");
        assert_eq!(gate.held(), 2);

        // 1 fails and is put back in front; 3 is delivered.
        items.push_front(known(1, a));
        gate.release(b, 3);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1, 6], "A waits for 1, B goes on");

        // 1 fails again; 6 is dead-lettered: that releases B as well.
        items.push_front(known(1, a));
        gate.release(b, 6);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1]);
        gate.release(a, 1);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![2]);
        // Releasing an event that is not the head changes nothing.
        gate.release(a, 5);
        assert!(!gate.admit(a, 5), "2 still holds A");
        gate.release(a, 2);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![5]);
        gate.release(a, 5);
        assert_eq!(gate.held(), 0);
        assert!(items.is_empty());
    }

    #[test]
    fn at_most_n_are_picked_and_the_rest_keep_their_place() {
        let mut gate = Gate::new();
        let mut items: VecDeque<Cand> = (0..10).map(|s| known(s, None)).collect();
        assert_eq!(pick(&mut gate, &mut items, 3), vec![0, 1, 2]);
        assert_eq!(items.front().map(|c| c.0), Some(3));
        // A conversation's head counts against n; a held one does not block what follows.
        let mut items: VecDeque<Cand> = [known(20, Some("A")), known(21, Some("A")), known(22, Some("B"))].into();
        assert_eq!(pick(&mut gate, &mut items, 2), vec![20, 22]);
    }

    #[test]
    fn an_event_not_read_back_yet_goes_only_alone_and_first() {
        let mut gate = Gate::new();
        let mut items: VecDeque<Cand> = [known(1, Some("A")), unknown(2), known(3, None)].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1], "it may be A's next event");
        assert_eq!(pick(&mut gate, &mut items, 16), vec![2], "first, alone");
        assert_eq!(pick(&mut gate, &mut items, 16), vec![3]);

        // A's 1 waits for its retry, 2 is held back: 3 might be A's too, so it waits as well.
        let mut gate = Gate::new();
        assert!(gate.admit(Some("A"), 1));
        let mut items: VecDeque<Cand> = [known(1, Some("A")), known(2, Some("A")), unknown(3)].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1]);
    }

    #[test]
    fn a_deferred_head_keeps_its_conversation_and_comes_back_in_front_when_due() {
        let mut gate = Gate::new();
        let (a, b) = (Some("A"), Some("B"));
        let mut items: VecDeque<Cand> = [known(1, a), known(2, b), known(3, a), known(4, b)].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1, 2]);
        // 1 failed while 2 went through: 1 waits in the gate; B goes on, A waits.
        gate.release(b, 2);
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        gate.defer(a, 1, known(1, a), later);
        assert_eq!((gate.deferred(), gate.next_due()), (1, Some(later)));
        assert_eq!(pick(&mut gate, &mut items, 16), vec![4]);
        gate.release(b, 4);
        // Only A's 3 is left, behind its deferred head: nothing to attempt, and the hold stays.
        assert_eq!(pick(&mut gate, &mut items, 16), Vec::<u64>::new());
        assert_eq!(gate.held(), 1);
        assert!(gate.take_due(now).is_empty(), "not due yet");
        for it in gate.take_due(later).into_iter().rev() {
            items.push_front(it);
        }
        assert_eq!(gate.deferred(), 0);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1]);
        gate.release(a, 1);
        assert_eq!(pick(&mut gate, &mut items, 16), vec![3]);
    }

    #[test]
    fn a_deferred_event_attempted_before_its_conversation_was_known_holds_it_too() {
        let mut gate = Gate::new();
        let mut items: VecDeque<Cand> = [unknown(1), known(2, Some("A"))].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![1]);
        // Read back, it was A's; it failed and waits.
        gate.defer(Some("A"), 1, known(1, Some("A")), Instant::now() + std::time::Duration::from_secs(60));
        assert_eq!(pick(&mut gate, &mut items, 16), Vec::<u64>::new(), "2 waits for 1");
        // Nor does an event not read back yet go while a head is deferred: it may be A's.
        let mut unread: VecDeque<Cand> = [unknown(5)].into();
        assert_eq!(pick(&mut gate, &mut unread, 16), Vec::<u64>::new());
        // Switching ordering off gives the deferred events back, in seq order.
        gate.defer(None, 0, known(0, None), Instant::now());
        let back: Vec<u64> = gate.clear().iter().map(|c| c.0).collect();
        assert_eq!(back, vec![0, 1]);
        assert_eq!((gate.held(), gate.deferred()), (0, 0));
    }

    #[test]
    fn a_hold_whose_event_is_gone_does_not_block_its_conversation_for_good() {
        let mut gate = Gate::new();
        assert!(gate.admit(Some("A"), 1));
        assert!(!gate.admit(Some("A"), 2));
        // Event 1 left without a release; only A's later events remain.
        let mut items: VecDeque<Cand> = [known(2, Some("A")), known(3, Some("A"))].into();
        assert_eq!(pick(&mut gate, &mut items, 16), vec![2]);
        assert_eq!(gate.held(), 1);
    }
}
