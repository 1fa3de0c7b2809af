//! The shared dedup window (`delivery.dedup_store = "redis://…"`): one Redis key per event
//! id, `webio-router:dedup:<id>`, seen by every replica that uses the same Redis.
//!
//! Invariants:
//!
//! - **Set before, confirmed after.** [`DedupStore::claim`] sets the key to *pending* (`p`)
//!   only if it is absent (`SET key p NX GET PX pending_ttl`: one round trip answers "new",
//!   "pending elsewhere" or "taken"). Once the event is safely taken (spool commit, or every
//!   sink in direct mode) [`DedupStore::confirm`] sets it to *taken* (`t`) for the whole
//!   window. A refused event's key is deleted ([`DedupStore::release`]), so Webio's retry is
//!   not a false duplicate; a replica that dies between the two leaves a pending key that
//!   expires after `pending_ttl`, never a taken one.
//! - **Never refuses a webhook.** Each call is bounded by [`TIMEOUT`]; a failure, a timeout,
//!   or a call skipped while Redis is known to be down (for [`BACKOFF`] after a failure, so
//!   that an outage does not add 200 ms to each webhook) answers [`Claim::Unavailable`]: the
//!   caller then relies on its own local window, and `webio_router_dedup_store_errors_total`
//!   counts it.
//! - **No secret in the log.** The URL may hold a password: it is never logged; an outage is
//!   logged once when it starts and once when it ends.

pub use crate::config::dedup_store::{check_url, read_ca, StoreUrlError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every key starts with this, then the event id.
pub const KEY_PREFIX: &str = "webio-router:dedup:";
/// The longest a webhook waits for Redis.
pub const TIMEOUT: Duration = Duration::from_millis(200);
/// After a failure, Redis is not asked again for this long.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// How long one connection attempt may take (in the background: no webhook waits for it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

const PENDING: &[u8] = b"p";
const TAKEN: &[u8] = b"t";

/// What Redis says about an event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had it: it is now pending for this replica, which must confirm or release it.
    New,
    /// Another request is taking it right now (here or on another replica).
    Pending,
    /// Taken inside the window: a duplicate.
    Taken,
    /// Redis did not answer in time (or is known to be down): use the local window.
    Unavailable,
}

pub struct DedupStore {
    conn: Mutex<Option<ConnectionManager>>,
    /// Redis is not asked before this instant (after a failure).
    skip_until: Mutex<Option<Instant>>,
    /// An outage is being logged (so it is logged once).
    down: AtomicBool,
    window_ms: u64,
    pending_ms: u64,
    connector: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl DedupStore {
    /// Starts connecting to `url` in the background (on the current Tokio runtime) and
    /// answers at once: until the first connection, claims are [`Claim::Unavailable`].
    /// `pending_ttl` bounds how long a claimed but unconfirmed key blocks other replicas.
    /// A `rediss://` URL is verified against the public roots, or against `ca_file`'s
    /// certificates only when it is given.
    pub fn start(
        url: &str,
        ca_file: Option<&std::path::Path>,
        window: Duration,
        pending_ttl: Duration,
    ) -> Result<Arc<DedupStore>, StoreUrlError> {
        check_url(url)?;
        let ca = read_ca(url, ca_file)?;
        if crate::config::dedup_store::is_tls(url) {
            // Before the client builds its rustls configuration, so that it takes this provider.
            crate::tls::provider();
        }
        let client = match ca {
            None => redis::Client::open(url),
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.into_bytes()) },
            ),
        }
        .map_err(StoreUrlError::Invalid)?;
        let store = Arc::new(DedupStore {
            conn: Mutex::new(None),
            skip_until: Mutex::new(None),
            down: AtomicBool::new(false),
            window_ms: window.as_millis().max(1) as u64,
            pending_ms: pending_ttl.as_millis().max(1) as u64,
            connector: Mutex::new(None),
        });
        let weak = Arc::downgrade(&store);
        let task = tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(TIMEOUT)
                .set_number_of_retries(2)
                .set_max_delay(1000);
            let mut delay = Duration::from_millis(200);
            loop {
                let attempt = tokio::time::timeout(
                    CONNECT_TIMEOUT * 2,
                    ConnectionManager::new_with_config(client.clone(), config.clone()),
                )
                .await;
                let Some(store) = weak.upgrade() else { return };
                match attempt {
                    Ok(Ok(conn)) => {
                        *store.conn.lock().expect("dedup store lock") = Some(conn);
                        if store.down.swap(false, Ordering::AcqRel) {
                            tracing::info!("dedup store: connected to Redis; the dedup window is shared again");
                        } else {
                            tracing::info!("dedup store: connected to Redis");
                        }
                        return;
                    }
                    Ok(Err(e)) => store.log_down(&e.to_string()),
                    Err(_) => store.log_down("connection attempt timed out"),
                }
                drop(store);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        });
        *store.connector.lock().expect("dedup store lock") = Some(task);
        Ok(store)
    }

    /// Stops connecting (shutdown).
    pub fn stop(&self) {
        if let Some(task) = self.connector.lock().expect("dedup store lock").take() {
            task.abort();
        }
    }

    /// The key of an event id.
    pub fn key(id: &str) -> String {
        format!("{KEY_PREFIX}{id}")
    }

    /// Marks `id` pending unless Redis knows it already (see the module doc).
    pub async fn claim(&self, id: &str) -> Claim {
        let mut cmd = redis::cmd("SET");
        cmd.arg(Self::key(id)).arg(PENDING).arg("NX").arg("GET").arg("PX").arg(self.pending_ms);
        match self.query::<Option<Vec<u8>>>(&cmd).await {
            Some(None) => Claim::New,
            Some(Some(v)) if v == PENDING => Claim::Pending,
            Some(Some(_)) => Claim::Taken,
            None => Claim::Unavailable,
        }
    }

    /// `id` is safely taken: a duplicate for the whole window, on every replica.
    pub async fn confirm(&self, id: &str) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(Self::key(id)).arg(TAKEN).arg("PX").arg(self.window_ms);
        let _ = self.query::<()>(&cmd).await;
    }

    /// `id` was refused: Webio's retry must be taken, wherever it lands.
    pub async fn release(&self, id: &str) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(Self::key(id));
        let _ = self.query::<()>(&cmd).await;
    }

    /// One command within [`TIMEOUT`]; `None` (counted) when Redis cannot answer.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let skipping = self.skip_until.lock().expect("dedup store lock").is_some_and(|t| Instant::now() < t);
        let conn = self.conn.lock().expect("dedup store lock").clone();
        let Some(mut conn) = conn.filter(|_| !skipping) else {
            crate::metrics::dedup_store_error();
            return None;
        };
        let failure = match tokio::time::timeout(TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::info!("dedup store: Redis answers again; the dedup window is shared again");
                }
                return Some(v);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", TIMEOUT.as_millis()),
        };
        crate::metrics::dedup_store_error();
        *self.skip_until.lock().expect("dedup store lock") = Some(Instant::now() + BACKOFF);
        self.log_down(&failure);
        None
    }

    fn log_down(&self, why: &str) {
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %why, "dedup store: Redis is unavailable; each replica uses its own dedup window until it is back (webhooks are still taken)");
        }
    }
}

impl Drop for DedupStore {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        assert_eq!(DedupStore::key("0af7"), "webio-router:dedup:0af7");
    }
}
