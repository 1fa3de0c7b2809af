//! Options common to every sink type: `rate_limit` ("50/s", "600/m", "3600/h") and
//! `concurrency` (deliveries in flight at once), parsed once when routes.toml is loaded.
//!
//! They are enforced by [`Limited`], a [`Sink`] around the sink built from its table, so that
//! both delivery modes honour them the same way: a delivery first takes one of `concurrency`
//! slots, then waits for its turn in the rate, then goes out. A retry is a delivery like any
//! other (it waits its turn too).
//!
//! The rate is a GCRA ("leaky bucket as a meter"): deliveries are spaced `period / count`
//! apart, with a burst of at most one second's worth (at least one) after the sink was idle.
//! Over any stretch of time `t`, at most `burst + rate × t` deliveries start. A turn is
//! reserved when a delivery asks for it, so waiting deliveries go out in the order they asked.

use super::{BoxFuture, Sink, SinkError};
use crate::event::Envelope;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The largest `concurrency` accepted.
pub const MAX_CONCURRENCY: usize = 1024;

/// `rate_limit`: at most `count` deliveries per `period` (a `count` of 0 counts as 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

/// Why a `rate_limit` or `concurrency` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("invalid rate {0:?}: write a count per unit, e.g. \"50/s\", \"600/m\" or \"3600/h\"")]
    Rate(String),
    #[error("the count of {0:?} must be at least 1 (remove `rate_limit` for no limit)")]
    ZeroRate(String),
    #[error("must be between 1 and {MAX_CONCURRENCY}, not {0}")]
    Concurrency(i64),
}

impl std::str::FromStr for RateLimit {
    type Err = LimitError;

    fn from_str(text: &str) -> Result<Self, LimitError> {
        let bad = || LimitError::Rate(text.to_owned());
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(LimitError::ZeroRate(text.to_owned()));
        }
        Ok(RateLimit { count, period })
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl RateLimit {
    /// Time between two deliveries at the steady rate.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }

    /// Deliveries that may start at once after an idle time: one second's worth, at least one.
    pub fn burst(&self) -> u32 {
        let per_second = u64::from(self.count) * 1000 / (self.period.as_millis() as u64).max(1);
        per_second.clamp(1, u64::from(self.count.max(1))) as u32
    }
}

/// A sink's `rate_limit` and `concurrency` (both optional; the default is no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rate_limit: Option<RateLimit>,
    pub concurrency: Option<usize>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.rate_limit.is_none() && self.concurrency.is_none()
    }

    /// A checked `concurrency` value.
    pub fn concurrency_value(n: i64) -> Result<usize, LimitError> {
        usize::try_from(n).ok().filter(|n| (1..=MAX_CONCURRENCY).contains(n)).ok_or(LimitError::Concurrency(n))
    }

    /// `sink` itself when there is no limit, else `sink` behind the limits.
    pub fn wrap(&self, sink: Arc<dyn Sink>) -> Arc<dyn Sink> {
        if self.is_none() {
            return sink;
        }
        Arc::new(Limited {
            inner: sink,
            slots: self.concurrency.map(|n| (n, Semaphore::new(n))),
            pacer: self.rate_limit.map(Pacer::new),
        })
    }

    /// How `check` prints them: `, rate limit 50/s, concurrency 4` (empty without limits).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(r) = self.rate_limit {
            out.push_str(&format!(", rate limit {r}"));
        }
        if let Some(c) = self.concurrency {
            out.push_str(&format!(", concurrency {c}"));
        }
        out
    }
}

/// The turns of a rate limit (GCRA).
struct Pacer {
    interval: Duration,
    /// How far ahead of now the schedule may run: `(burst - 1) × interval`.
    tolerance: Duration,
    /// When the next delivery would be due at the steady rate ("theoretical arrival time").
    tat: Mutex<Option<Instant>>,
}

impl Pacer {
    fn new(rate: RateLimit) -> Self {
        let interval = rate.interval();
        Pacer { interval, tolerance: interval * (rate.burst() - 1), tat: Mutex::new(None) }
    }

    /// Reserves the next turn and waits for it.
    async fn turn(&self) {
        let go = {
            let now = Instant::now();
            let mut tat = self.tat.lock().expect("pacer lock");
            let base = tat.map_or(now, |t| t.max(now));
            *tat = Some(base + self.interval);
            base.checked_sub(self.tolerance).map_or(now, |g| g.max(now))
        };
        tokio::time::sleep_until(go).await;
    }
}

/// A sink behind its `rate_limit` and `concurrency`.
pub struct Limited {
    inner: Arc<dyn Sink>,
    slots: Option<(usize, Semaphore)>,
    pacer: Option<Pacer>,
}

// A method added to `Sink` with a default must be forwarded (or deliberately overridden) here
// too (with the default, a limited sink would silently lose the inner sink's own): the lint makes
// clippy (`-D warnings` in CI) refuse an impl that leaves one out.
#[deny(clippy::missing_trait_methods)]
impl Sink for Limited {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            // The semaphore is never closed; without a permit the delivery would still be
            // correct, only not limited.
            let _slot = match &self.slots {
                Some((_, s)) => s.acquire().await.ok(),
                None => None,
            };
            if let Some(p) = &self.pacer {
                p.turn().await;
            }
            self.inner.deliver(env).await
        })
    }

    /// A round within `concurrency` takes its slots together and goes to the inner sink as
    /// one round (a file sink's one group). With a `rate_limit`, each delivery waits its own
    /// turn: they go out one by one, as [`Sink::deliver`] does.
    fn deliver_many<'a>(&'a self, envs: &'a [&'a Envelope]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        let fits = match &self.slots {
            Some((n, _)) => envs.len() <= *n,
            None => true,
        };
        if self.pacer.is_some() || !fits {
            return Box::pin(futures_util::future::join_all(envs.iter().map(|env| super::deliver_in_span(self, env))));
        }
        Box::pin(async move {
            let _slots = match &self.slots {
                Some((_, s)) => s.acquire_many(envs.len() as u32).await.ok(),
                None => None,
            };
            self.inner.deliver_many(envs).await
        })
    }

    fn is_up(&self) -> bool {
        self.inner.is_up()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.flush(timeout)
    }

    fn concurrency(&self) -> Option<usize> {
        self.slots.as_ref().map(|(n, _)| *n)
    }

    // Every other method of `Sink` is the inner sink's: a default here would silently drop
    // the sink's own setting (its `ordering`, say) whenever a limit is set.
    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.inner.ordering()
    }

    fn round(&self) -> Option<usize> {
        self.inner.round()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn rates_parse_and_print_as_written() {
        let r: RateLimit = "50/s".parse().unwrap();
        assert_eq!(
            (r.count, r.period, r.interval(), r.burst()),
            (50, Duration::from_secs(1), Duration::from_millis(20), 50)
        );
        let r: RateLimit = "600/m".parse().unwrap();
        assert_eq!((r.interval(), r.burst(), r.to_string()), (Duration::from_millis(100), 10, "600/m".to_owned()));
        let r: RateLimit = " 5 / h ".parse().unwrap();
        assert_eq!((r.burst(), r.to_string()), (1, "5/h".to_owned()));
        for bad in ["50", "50/d", "/s", "x/s", "-1/s", "1.5/s", ""] {
            assert_eq!(bad.parse::<RateLimit>(), Err(LimitError::Rate(bad.to_owned())), "{bad}");
        }
        assert!(matches!("0/s".parse::<RateLimit>(), Err(LimitError::ZeroRate(_))));
        assert_eq!(Limits::concurrency_value(0), Err(LimitError::Concurrency(0)));
        assert_eq!(Limits::concurrency_value(4), Ok(4));
        assert!(Limits::concurrency_value(1 << 40).is_err());
    }

    struct Counting {
        now: AtomicUsize,
        max: AtomicUsize,
        done: AtomicUsize,
    }

    impl Sink for Counting {
        fn name(&self) -> &str {
            "c"
        }
        fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                self.done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    #[test]
    fn a_limited_sink_keeps_the_inner_sinks_ordering() {
        struct Ordered;
        impl Sink for Ordered {
            fn name(&self) -> &str {
                "o"
            }
            fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
                Box::pin(async { Ok(()) })
            }
            fn ordering(&self) -> crate::sinks::SinkOrdering {
                crate::sinks::SinkOrdering::Conversation
            }
        }
        let limits = Limits { rate_limit: Some("20/s".parse().unwrap()), concurrency: Some(2) };
        let sink = limits.wrap(Arc::new(Ordered));
        assert_eq!(sink.ordering(), crate::sinks::SinkOrdering::Conversation);
        assert_eq!(sink.concurrency(), Some(2));
    }

    fn envelope() -> Envelope {
        let body = br#"{"type":"payment"}"#;
        let ev = crate::event::normalise(body, None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(ev, bytes::Bytes::from_static(body))
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_lets_a_burst_through_then_spaces_deliveries_evenly() {
        let inner = Arc::new(Counting { now: 0.into(), max: 0.into(), done: 0.into() });
        let limits = Limits { rate_limit: Some("20/s".parse().unwrap()), concurrency: None };
        let sink = limits.wrap(inner.clone());
        let env = envelope();
        let started = Instant::now();
        futures_util::future::join_all((0..60).map(|_| sink.deliver(&env))).await;
        // 20 at once, then 40 more 50 ms apart; each takes 10 ms.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(2010) && took < Duration::from_millis(2100), "{took:?}");
        assert_eq!(inner.done.load(Ordering::SeqCst), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_bounds_the_deliveries_in_flight() {
        let inner = Arc::new(Counting { now: 0.into(), max: 0.into(), done: 0.into() });
        let sink = Limits { rate_limit: None, concurrency: Some(3) }.wrap(inner.clone());
        assert_eq!(sink.concurrency(), Some(3));
        let env = envelope();
        futures_util::future::join_all((0..20).map(|_| sink.deliver(&env))).await;
        assert_eq!((inner.max.load(Ordering::SeqCst), inner.done.load(Ordering::SeqCst)), (3, 20));
    }
}
