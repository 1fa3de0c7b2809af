//! Every metric name, and the one helper that emits each. Label values are bounded:
//! never a conversation id, a token or a raw payload value.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

pub const REQUESTS: &str = "webio_router_requests_total";
pub const REQUEST_DURATION: &str = "webio_router_request_duration_seconds";
pub const EVENTS: &str = "webio_router_events_total";
pub const AUTH_FAILURES: &str = "webio_router_auth_failures_total";
pub const AUTH_SECRET_USED: &str = "webio_router_auth_secret_used_total";
pub const UNROUTED: &str = "webio_router_unrouted_total";
pub const DUPLICATES: &str = "webio_router_duplicates_total";
pub const REJECTED: &str = "webio_router_rejected_total";
pub const DELIVERIES: &str = "webio_router_deliveries_total";
pub const DELIVERY_DURATION: &str = "webio_router_delivery_duration_seconds";
pub const SPOOL_PENDING: &str = "webio_router_spool_pending";
pub const SPOOL_BYTES: &str = "webio_router_spool_bytes";
pub const SPOOL_FLUSHES: &str = "webio_router_spool_flushes_total";
pub const SPOOL_APPENDS: &str = "webio_router_spool_appends_total";
pub const SPOOL_WRITE_ERRORS: &str = "webio_router_spool_write_errors_total";
pub const SPOOL_WAL_BYTES: &str = "webio_router_spool_wal_bytes";
pub const SINK_UP: &str = "webio_router_sink_up";
pub const BUILD_INFO: &str = "webio_router_build_info";
pub const CONFIG_RELOADS: &str = "webio_router_config_reloads_total";
pub const SINK_PAUSED: &str = "webio_router_sink_paused";
pub const CUSTOM_VALUE_REQUESTS: &str = "webio_router_custom_value_requests_total";
pub const INGESTED_FILES: &str = "webio_router_ingested_files_total";
pub const CONNECTIONS_OPEN: &str = "webio_router_connections_open";
pub const CONNECTIONS_SHED: &str = "webio_router_connections_shed_total";
pub const DEDUP_STORE_ERRORS: &str = "webio_router_dedup_store_errors_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "webio_router_tls_handshake_failures_total";

/// Every metric the daemon exports (deploy artefacts are checked against this list).
pub const NAMES: &[&str] = &[
    REQUESTS,
    REQUEST_DURATION,
    EVENTS,
    AUTH_FAILURES,
    AUTH_SECRET_USED,
    UNROUTED,
    DUPLICATES,
    REJECTED,
    DELIVERIES,
    DELIVERY_DURATION,
    SPOOL_PENDING,
    SPOOL_BYTES,
    SPOOL_FLUSHES,
    SPOOL_APPENDS,
    SPOOL_WRITE_ERRORS,
    SPOOL_WAL_BYTES,
    SINK_UP,
    BUILD_INFO,
    CONFIG_RELOADS,
    SINK_PAUSED,
    CUSTOM_VALUE_REQUESTS,
    INGESTED_FILES,
    CONNECTIONS_OPEN,
    CONNECTIONS_SHED,
    DEDUP_STORE_ERRORS,
    TLS_HANDSHAKE_FAILURES,
];

/// The histograms among [`NAMES`] (exported with `_bucket`, `_sum`, `_count`).
pub const HISTOGRAMS: &[&str] = &[REQUEST_DURATION, DELIVERY_DURATION];

/// Event types that get their own label value; anything else is counted as `other`
/// so that a hostile sender cannot grow the label set.
const KNOWN_TYPES: &[&str] = &[
    "inboundMessage",
    "messageSend",
    "messageStatusUpdate",
    "payment",
    "setStatus",
    "conversationClosed",
    "moveToQueue",
    "conversationAssignment",
];

/// The label value of an event type: itself when known, else `other`.
pub fn type_label(t: &str) -> &'static str {
    KNOWN_TYPES.iter().find(|k| **k == t).copied().unwrap_or("other")
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // The recorder keeps every histogram sample until upkeep (or a scrape) folds them
            // into buckets: without it, a daemon nobody scrapes grows by 8 bytes per sample,
            // two samples per request. Upkeep every 5 s bounds that (as the exporter's own
            // `install` does).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            // Fails only when another recorder is installed (tests); rendering still works.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            preregister();
            handle
        })
        .clone()
}

/// `rejected_total` reasons: every value of `BodyError::reason`.
const REJECT_REASONS: &[&str] = &["not_json", "not_object", "missing_type", "type_not_string", "empty_type"];

/// Every family is on `/metrics` from the start, its known label values at zero: a dashboard
/// shows 0 rather than "no data", and `increase()` sees the first event instead of a series
/// that appears already at 1. Families labelled by sink start with each sink
/// ([`register_sink`]); those of an optional feature with the feature
/// ([`register_custom_values`], [`register_ingest`]).
fn preregister() {
    for status in STATUSES {
        counter!(REQUESTS, "status" => status.to_string()).absolute(0);
    }
    // A histogram is exported once it has a handle, with every bucket at 0.
    let _ = histogram!(REQUEST_DURATION);
    for t in KNOWN_TYPES.iter().copied().chain(["other"]) {
        for shape in ["legacy", "current"] {
            counter!(EVENTS, "type" => t, "shape" => shape).absolute(0);
        }
        counter!(UNROUTED, "type" => t).absolute(0);
    }
    for reason in crate::auth::REASONS {
        counter!(AUTH_FAILURES, "reason" => *reason).absolute(0);
    }
    // Index 0 is the secret every configuration has; later ones appear with their first use.
    counter!(AUTH_SECRET_USED, "index" => "0").absolute(0);
    counter!(DUPLICATES).absolute(0);
    for reason in REJECT_REASONS {
        counter!(REJECTED, "reason" => *reason).absolute(0);
    }
    gauge!(SPOOL_BYTES).set(0.0);
    counter!(SPOOL_FLUSHES).absolute(0);
    counter!(SPOOL_APPENDS).absolute(0);
    counter!(SPOOL_WRITE_ERRORS).absolute(0);
    gauge!(SPOOL_WAL_BYTES).set(0.0);
    counter!(DEDUP_STORE_ERRORS).absolute(0);
    counter!(TLS_HANDSHAKE_FAILURES).absolute(0);
    gauge!(CONNECTIONS_OPEN).set(0.0);
    for state in ["no_request", "idle", "new"] {
        counter!(CONNECTIONS_SHED, "state" => state).absolute(0);
    }
    for outcome in ["ok", "error"] {
        counter!(CONFIG_RELOADS, "outcome" => outcome).absolute(0);
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

fn describe() {
    describe_counter!(REQUESTS, "Webhook requests answered, by HTTP status.");
    describe_histogram!(REQUEST_DURATION, "Time to answer a webhook request.");
    describe_counter!(EVENTS, "Accepted events, by type and payload shape.");
    describe_counter!(AUTH_FAILURES, "Requests refused by the JWT check, by reason class.");
    describe_counter!(AUTH_SECRET_USED, "Tokens verified, by index of the secret that verified them.");
    describe_counter!(UNROUTED, "Accepted events that matched no route, by type.");
    describe_counter!(DUPLICATES, "Re-deliveries acknowledged inside the dedup window.");
    describe_counter!(REJECTED, "Authenticated bodies refused with 400, by reason.");
    describe_counter!(DELIVERIES, "Delivery attempts, by sink and outcome (ok, retry, dead).");
    describe_histogram!(DELIVERY_DURATION, "Time of one delivery attempt, by sink.");
    describe_gauge!(SPOOL_PENDING, "(event, sink) pairs waiting in the spool, by sink.");
    describe_gauge!(SPOOL_BYTES, "Bytes of event data held in the spool.");
    describe_counter!(SPOOL_FLUSHES, "Batches made durable: write-ahead appends and checkpoints (one fdatasync each).");
    describe_gauge!(SPOOL_WAL_BYTES, "Bytes in the spool's write-ahead file since its last checkpoint.");
    describe_counter!(SPOOL_APPENDS, "Events appended to the spool.");
    describe_counter!(SPOOL_WRITE_ERRORS, "Spool commits that failed (full disk, I/O error).");
    describe_counter!(
        DEDUP_STORE_ERRORS,
        "Shared dedup store (Redis) calls that failed, timed out or were skipped while it was down; the local window was used."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes on the webhook listener that failed (bad or untrusted client hello, protocol or cipher mismatch)."
    );
    describe_gauge!(SINK_UP, "1 when the sink's connection is up, 0 when it is down.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which build runs.");
    describe_counter!(CONFIG_RELOADS, "Configuration reloads (secrets and routes.toml, on SIGHUP), by outcome.");
    describe_gauge!(SINK_PAUSED, "1 while the sink is paused (webio-router pause), else 0.");
    describe_counter!(
        CUSTOM_VALUE_REQUESTS,
        "Custom Value Requests answered, by outcome (ok, cached, error, timeout)."
    );
    describe_counter!(INGESTED_FILES, "SFTP-hook files taken from the inbox, by outcome (ok, rejected).");
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Open HTTP connections, both listeners together (bounded below the descriptor limit)."
    );
    describe_counter!(
        CONNECTIONS_SHED,
        "Connections closed at the bound to make room, by state: no_request, idle, or new (refused: all busy)."
    );
}

/// Creates the series of a sink at zero, so that `increase()` sees its first failure and
/// dashboards list the sink before its first delivery.
pub fn register_sink(sink: &str) {
    for outcome in ["ok", "retry", "dead"] {
        counter!(DELIVERIES, "sink" => sink.to_owned(), "outcome" => outcome).absolute(0);
    }
    let _ = histogram!(DELIVERY_DURATION, "sink" => sink.to_owned());
    gauge!(SINK_PAUSED, "sink" => sink.to_owned()).increment(0.0);
}

// Per-request metrics keep their handles: building a labelled key and looking it up in the
// registry on every request costs allocations and hashing. A handle is cached only once the
// recorder is installed (a handle made before would stay a no-op) and is made on first use,
// so series still appear when first counted, as before.

/// HTTP statuses the webhook listener answers; others take the uncached path.
const STATUSES: [u16; 12] = [200, 202, 400, 401, 404, 405, 408, 413, 500, 502, 503, 504];
static REQUEST_COUNTERS: [OnceLock<Counter>; STATUSES.len()] = [const { OnceLock::new() }; STATUSES.len()];
static REQUEST_HISTOGRAM: OnceLock<Histogram> = OnceLock::new();
/// `(type, shape)` pairs: KNOWN_TYPES then `other`, times legacy/current.
static EVENT_COUNTERS: [OnceLock<Counter>; (KNOWN_TYPES.len() + 1) * 2] =
    [const { OnceLock::new() }; (KNOWN_TYPES.len() + 1) * 2];
static SECRET_COUNTERS: [OnceLock<Counter>; 8] = [const { OnceLock::new() }; 8];
/// By type: KNOWN_TYPES then `other`.
static UNROUTED_COUNTERS: [OnceLock<Counter>; KNOWN_TYPES.len() + 1] =
    [const { OnceLock::new() }; KNOWN_TYPES.len() + 1];
static DUPLICATE_COUNTER: OnceLock<Counter> = OnceLock::new();

fn installed() -> bool {
    HANDLE.get().is_some()
}

pub fn request(status: u16, elapsed: Duration) {
    let make = || counter!(REQUESTS, "status" => status.to_string());
    match STATUSES.iter().position(|s| *s == status) {
        Some(i) if installed() => REQUEST_COUNTERS[i].get_or_init(make).increment(1),
        _ => make().increment(1),
    }
    let make = || histogram!(REQUEST_DURATION);
    if installed() {
        REQUEST_HISTOGRAM.get_or_init(make).record(elapsed.as_secs_f64());
    } else {
        make().record(elapsed.as_secs_f64());
    }
}

pub fn event(event_type: &str, shape: &'static str) {
    let label = type_label(event_type);
    let make = || counter!(EVENTS, "type" => label, "shape" => shape);
    let t = KNOWN_TYPES.iter().position(|k| *k == label).unwrap_or(KNOWN_TYPES.len());
    let slot = match shape {
        "legacy" => Some(t * 2),
        "current" => Some(t * 2 + 1),
        _ => None,
    };
    match slot {
        Some(i) if installed() => EVENT_COUNTERS[i].get_or_init(make).increment(1),
        _ => make().increment(1),
    }
}

pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

pub fn auth_secret_used(index: usize) {
    let make = || counter!(AUTH_SECRET_USED, "index" => index.to_string());
    match SECRET_COUNTERS.get(index) {
        Some(slot) if installed() => slot.get_or_init(make).increment(1),
        _ => make().increment(1),
    }
}

pub fn unrouted(event_type: &str) {
    let label = type_label(event_type);
    let make = || counter!(UNROUTED, "type" => label);
    let t = KNOWN_TYPES.iter().position(|k| *k == label).unwrap_or(KNOWN_TYPES.len());
    if installed() {
        UNROUTED_COUNTERS[t].get_or_init(make).increment(1);
    } else {
        make().increment(1);
    }
}

pub fn duplicate() {
    let make = || counter!(DUPLICATES);
    if installed() {
        DUPLICATE_COUNTER.get_or_init(make).increment(1);
    } else {
        make().increment(1);
    }
}

static DEDUP_STORE_ERROR_COUNTER: OnceLock<Counter> = OnceLock::new();

/// One shared dedup store call that could not be made or answered.
pub fn dedup_store_error() {
    let make = || counter!(DEDUP_STORE_ERRORS);
    if installed() {
        DEDUP_STORE_ERROR_COUNTER.get_or_init(make).increment(1);
    } else {
        make().increment(1);
    }
}

pub fn rejected(reason: &'static str) {
    counter!(REJECTED, "reason" => reason).increment(1);
}

/// The per-sink series, by sink name (sinks are few and named in routes.toml).
struct SinkSeries {
    ok: Counter,
    retry: Counter,
    dead: Counter,
    duration: Histogram,
    /// Made on first use: direct mode has no spool, so no such series.
    pending: OnceLock<Gauge>,
}

static SINK_SERIES: OnceLock<RwLock<HashMap<Arc<str>, Arc<SinkSeries>>>> = OnceLock::new();

/// Per thread, the series of the last few sinks looked up: the spool writer sets a sink's
/// pending gauge for every event it queues, and the shared map's lock and string hash were a
/// measurable part of its time (docs/performance.md, "The spool writer, seventh round").
/// Entries are never replaced in [`SINK_SERIES`], so a copy here never goes stale.
const RECENT_SERIES: usize = 4;

thread_local! {
    static RECENT: std::cell::RefCell<Vec<(Arc<str>, Arc<SinkSeries>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cached handles of `sink`'s series, once the recorder is installed.
fn sink_series(sink: &str) -> Option<Arc<SinkSeries>> {
    if !installed() {
        return None;
    }
    let hit = RECENT.with(|r| r.borrow().iter().find(|(name, _)| **name == *sink).map(|(_, s)| s.clone()));
    if hit.is_some() {
        return hit;
    }
    let series = shared_sink_series(sink);
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() >= RECENT_SERIES {
            r.remove(0);
        }
        r.push((Arc::from(sink), series.clone()));
    });
    Some(series)
}

/// `sink`'s series from the process-wide map (made on first use).
fn shared_sink_series(sink: &str) -> Arc<SinkSeries> {
    let map = SINK_SERIES.get_or_init(Default::default);
    if let Some(s) = map.read().expect("sink series lock").get(sink) {
        return s.clone();
    }
    let name = sink.to_owned();
    let series = Arc::new(SinkSeries {
        ok: counter!(DELIVERIES, "sink" => name.clone(), "outcome" => "ok"),
        retry: counter!(DELIVERIES, "sink" => name.clone(), "outcome" => "retry"),
        dead: counter!(DELIVERIES, "sink" => name.clone(), "outcome" => "dead"),
        duration: histogram!(DELIVERY_DURATION, "sink" => name),
        pending: OnceLock::new(),
    });
    map.write().expect("sink series lock").entry(Arc::from(sink)).or_insert(series).clone()
}

/// Outcome of one delivery attempt: `ok`, `retry` or `dead`.
pub fn delivery(sink: &str, outcome: &'static str, elapsed: Duration) {
    deliveries(sink, outcome, elapsed, 1);
}

/// [`delivery`] for `n` deliveries of one round that ended alike (a spool drain's confirmed
/// ones): the sink's series looked up once, not per event.
pub fn deliveries(sink: &str, outcome: &'static str, elapsed: Duration, n: usize) {
    if n == 0 {
        return;
    }
    match sink_series(sink) {
        Some(s) => {
            match outcome {
                "ok" => &s.ok,
                "retry" => &s.retry,
                _ => &s.dead,
            }
            .increment(n as u64);
            s.duration.record_many(elapsed.as_secs_f64(), n);
        }
        None => {
            counter!(DELIVERIES, "sink" => sink.to_owned(), "outcome" => outcome).increment(n as u64);
            histogram!(DELIVERY_DURATION, "sink" => sink.to_owned()).record_many(elapsed.as_secs_f64(), n);
        }
    }
}

pub fn spool_pending(sink: &str, pending: u64) {
    match sink_series(sink) {
        Some(s) => s.pending.get_or_init(|| gauge!(SPOOL_PENDING, "sink" => sink.to_owned())).set(pending as f64),
        None => gauge!(SPOOL_PENDING, "sink" => sink.to_owned()).set(pending as f64),
    }
}

// The spool writer's series, set once or twice per batch: handles kept as the request path's
// are (a `gauge!` or `counter!` builds the key and looks it up in the recorder's registry
// each time: ~0.3 µs per event of the writer's CPU, docs/performance.md "The spool writer,
// seventh round").
static SPOOL_BYTES_GAUGE: OnceLock<Gauge> = OnceLock::new();
static SPOOL_WAL_BYTES_GAUGE: OnceLock<Gauge> = OnceLock::new();
static SPOOL_FLUSHES_COUNTER: OnceLock<Counter> = OnceLock::new();
static SPOOL_APPENDS_COUNTER: OnceLock<Counter> = OnceLock::new();

/// `slot`'s handle once the recorder is installed (made on first use); before, a new handle
/// each time (it reaches whichever recorder is current, as the macros do).
fn cached<T: Clone>(slot: &'static OnceLock<T>, make: impl FnOnce() -> T, f: impl FnOnce(&T)) {
    if installed() {
        f(slot.get_or_init(make));
    } else {
        f(&make());
    }
}

pub fn spool_bytes(bytes: u64) {
    cached(&SPOOL_BYTES_GAUGE, || gauge!(SPOOL_BYTES), |g| g.set(bytes as f64));
}

/// Bytes in the spool's write-ahead file since its last checkpoint.
pub fn spool_wal_bytes(bytes: u64) {
    cached(&SPOOL_WAL_BYTES_GAUGE, || gauge!(SPOOL_WAL_BYTES), |g| g.set(bytes as f64));
}

/// One durable commit that made `appends` events durable at once (group commit).
pub fn spool_flush(appends: u64) {
    cached(&SPOOL_FLUSHES_COUNTER, || counter!(SPOOL_FLUSHES), |c| c.increment(1));
    cached(&SPOOL_APPENDS_COUNTER, || counter!(SPOOL_APPENDS), |c| c.increment(appends));
}

/// One spool commit that failed (full disk, I/O error).
pub fn spool_write_error() {
    counter!(SPOOL_WRITE_ERRORS).increment(1);
}

pub fn sink_up(sink: &str, up: bool) {
    gauge!(SINK_UP, "sink" => sink.to_owned()).set(if up { 1.0 } else { 0.0 });
}

pub fn sink_paused(sink: &str, paused: bool) {
    gauge!(SINK_PAUSED, "sink" => sink.to_owned()).set(if paused { 1.0 } else { 0.0 });
}

const CUSTOM_VALUE_OUTCOMES: [&str; 4] = ["ok", "cached", "error", "timeout"];
const INGEST_OUTCOMES: [&str; 2] = ["ok", "rejected"];

/// Creates the Custom Value counters at zero (when the feature is on).
pub fn register_custom_values() {
    for outcome in CUSTOM_VALUE_OUTCOMES {
        counter!(CUSTOM_VALUE_REQUESTS, "outcome" => outcome).absolute(0);
    }
}

/// One Custom Value Request: `ok`, `cached`, `error` or `timeout`.
pub fn custom_value_request(outcome: &'static str) {
    counter!(CUSTOM_VALUE_REQUESTS, "outcome" => outcome).increment(1);
}

/// Creates the ingest counters at zero (when the feature is on).
pub fn register_ingest() {
    for outcome in INGEST_OUTCOMES {
        counter!(INGESTED_FILES, "outcome" => outcome).absolute(0);
    }
}

/// One SFTP-hook file moved out of the inbox: `ok` or `rejected`.
pub fn ingested_file(outcome: &'static str) {
    counter!(INGESTED_FILES, "outcome" => outcome).increment(1);
}

pub fn config_reload(ok: bool) {
    counter!(CONFIG_RELOADS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

static CONNECTIONS_GAUGE: OnceLock<Gauge> = OnceLock::new();

pub fn connections_open(open: usize) {
    let make = || gauge!(CONNECTIONS_OPEN);
    if installed() {
        CONNECTIONS_GAUGE.get_or_init(make).set(open as f64);
    } else {
        make().set(open as f64);
    }
}

/// A TLS handshake on the webhook listener failed.
pub fn tls_handshake_failed() {
    counter!(TLS_HANDSHAKE_FAILURES).increment(1);
}

/// One connection closed to make room; `state` is `no_request`, `idle` or `new`.
pub fn connection_shed(state: &'static str) {
    counter!(CONNECTIONS_SHED, "state" => state).increment(1);
}

#[cfg(test)]
mod tests {
    use super::REJECT_REASONS;

    #[test]
    fn every_reason_a_body_is_rejected_for_is_preregistered() {
        let opts = crate::event::NormaliseOptions::default();
        let mut seen = std::collections::BTreeSet::new();
        for body in [&b"nope"[..], b"[]", b"{}", br#"{"type":1}"#, br#"{"type":""}"#] {
            let e = crate::event::normalise(body, None, &opts, chrono::Utc::now()).unwrap_err();
            assert!(REJECT_REASONS.contains(&e.reason()), "{} is not preregistered", e.reason());
            seen.insert(e.reason());
        }
        assert_eq!(seen.len(), REJECT_REASONS.len(), "a preregistered reason is never used: {seen:?}");
    }
}
