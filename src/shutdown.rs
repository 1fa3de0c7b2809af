//! One shutdown, one deadline (README "Delivery").
//!
//! [`Shutdown`] is the cancellation tree of the daemon (tokio-util's `CancellationToken`)
//! plus the single deadline that every phase of a stop shares: from the signal, draining
//! requests, waiting for the spool, flushing sinks and closing the spool together take at
//! most `delivery.shutdown_timeout`. A phase never gets a timeout of its own; it runs until
//! [`Shutdown::deadline`], so a slow early phase leaves less time to the later ones instead
//! of adding to the total.

use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Shutdown {
    token: CancellationToken,
    deadline: Arc<OnceLock<Instant>>,
    timeout: Duration,
}

impl Shutdown {
    /// A shutdown whose phases share `timeout` once triggered.
    pub fn new(timeout: Duration) -> Self {
        Shutdown { token: CancellationToken::new(), deadline: Arc::default(), timeout }
    }

    /// Starts the shutdown (idempotent): fixes the deadline, then cancels every child token.
    pub fn trigger(&self) {
        self.deadline.get_or_init(|| Instant::now() + self.timeout);
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once [`Shutdown::trigger`] was called.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// When the whole shutdown must be over; before the trigger, `timeout` from now.
    pub fn deadline(&self) -> Instant {
        self.deadline.get().copied().unwrap_or_else(|| Instant::now() + self.timeout)
    }

    /// Time left until [`Shutdown::deadline`].
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// A token cancelled with this shutdown (or on its own, for a part that stops early).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// The root token (cancelled by [`Shutdown::trigger`]).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_fixed_by_the_first_trigger_and_shared_by_every_phase() {
        let s = Shutdown::new(Duration::from_secs(20));
        assert!(!s.is_triggered());
        s.trigger();
        let first = s.deadline();
        tokio::time::advance(Duration::from_secs(5)).await;
        s.trigger();
        assert_eq!(s.deadline(), first, "a second signal does not move the deadline");
        assert_eq!(s.remaining(), Duration::from_secs(15));
        assert!(s.child_token().is_cancelled());
        s.triggered().await;
    }
}
