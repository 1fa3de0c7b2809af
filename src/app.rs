//! Wiring for `serve`: builds the shared [`State`], binds both listeners, handles signals
//! (SIGTERM/SIGINT: drain and exit; SIGHUP: reload routes.toml) and talks to systemd.

use crate::auth::Verifier;
use crate::config::{ConfigError, DeliveryMode, Loaded};
use crate::delivery::{direct::Direct, Delivery};
use crate::event::{BodyError, NormaliseOptions};
use crate::jsonl::{body_fields, JsonlFile};
use crate::routes::Routes;
use crate::server::{self, error::RequestError};
use crate::shutdown::Shutdown;
use crate::sinks::Sink;
use http::HeaderName;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Routes and the sinks they name, swapped whole on reload.
pub struct RouteTable {
    pub routes: Routes,
    pub sinks: HashMap<String, Arc<dyn Sink>>,
}

impl RouteTable {
    /// Builds the sinks of `routes`, reusing those of `previous` whose configuration did not
    /// change (so a reload does not reconnect to every broker).
    pub fn build(routes: Routes, previous: Option<&RouteTable>) -> Result<RouteTable, ConfigError> {
        let mut sinks = HashMap::new();
        let mut errs = Vec::new();
        for (name, cfg) in &routes.sinks {
            let reused = previous
                .and_then(|p| (p.routes.sinks.get(name) == Some(cfg)).then(|| p.sinks.get(name).cloned()).flatten());
            match reused.map(Ok).unwrap_or_else(|| cfg.build(name)) {
                Ok(s) => {
                    crate::metrics::register_sink(name);
                    sinks.insert(name.clone(), s);
                }
                Err(e) => errs.push(crate::config::Diagnostic::new(format!("sinks.{name}"), e.message)),
            }
        }
        if errs.is_empty() {
            Ok(RouteTable { routes, sinks })
        } else {
            Err(ConfigError(errs))
        }
    }
}

pub struct State {
    pub path: String,
    pub auth_header: HeaderName,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub verifier: Verifier,
    pub normalise: NormaliseOptions,
    pub delivery: Arc<dyn Delivery>,
    pub metrics: PrometheusHandle,
    routes_file: PathBuf,
    table: RwLock<Arc<RouteTable>>,
    rejected: JsonlFile,
    ready: AtomicBool,
}

impl State {
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.read().expect("route table lock").clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.delivery.is_ready()
    }

    /// Keeps a refused body, with the reason, so that nothing is lost. If even that fails,
    /// the sender is told to retry.
    pub async fn reject(
        &self,
        body: &[u8],
        err: &BodyError,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), RequestError> {
        crate::metrics::rejected(err.reason());
        let (text, hex) = body_fields(body);
        let mut record = json!({
            "receivedAt": crate::event::format_time(at),
            "reason": err.reason(),
            "error": err.to_string(),
        });
        match (text, hex) {
            (Some(t), _) => record["body"] = t.into(),
            (None, Some(h)) => record["bodyHex"] = h.into(),
            _ => {}
        }
        self.rejected.append(&record).await.map_err(|e| {
            tracing::error!(file = %self.rejected.path().display(), error = %e, "cannot record a rejected body");
            RequestError::Unavailable {
                reason: "cannot record the rejected body".into(),
                retry_after: Duration::from_secs(30),
            }
        })
    }

    /// Sets gauges that are read rather than counted (sink up/down).
    pub fn refresh_gauges(&self) {
        for (name, sink) in &self.table().sinks {
            crate::metrics::sink_up(name, sink.is_up());
        }
    }

    /// SIGHUP: reload routes.toml; an invalid file is refused and the old routes stay.
    pub fn reload_routes(&self) -> Result<(), ConfigError> {
        let current = self.table();
        let result = Routes::load(&self.routes_file).and_then(|r| RouteTable::build(r, Some(&current)));
        match result {
            Ok(table) => {
                self.delivery.sinks_changed(&table.sinks);
                let (routes, sinks) = (table.routes.routes.len(), table.sinks.len());
                *self.table.write().expect("route table lock") = Arc::new(table);
                crate::metrics::config_reload(true);
                tracing::info!(file = %self.routes_file.display(), routes, sinks, "routes reloaded");
                Ok(())
            }
            Err(e) => {
                crate::metrics::config_reload(false);
                tracing::error!(file = %self.routes_file.display(), error = %e, "routes reload refused; the previous routes stay in force");
                Err(e)
            }
        }
    }
}

/// What `check` validates: everything `serve` would refuse to start with, without
/// connecting anywhere.
pub fn check(loaded: &Loaded) -> Result<Routes, ConfigError> {
    Routes::load(&loaded.config.routes_file)
}

/// Everything `serve` needs before binding: a startup failure here is a configuration error.
pub fn prepare(loaded: &Loaded) -> Result<(Routes, RouteTable), ConfigError> {
    let routes = check(loaded)?;
    let table = RouteTable::build(routes.clone(), None)?;
    Ok((routes, table))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Runtime(String),
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn serve(loaded: Loaded) -> Result<(), ServeError> {
    let cfg = &loaded.config;
    let metrics = crate::metrics::install();
    let bind = |addr| async move { TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source }) };
    let shown = |l: &TcpListener| l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());

    // The admin listener comes first, so that probes see 503 (not a refused connection)
    // while routes, sinks and the spool are being opened.
    let admin = Arc::new(server::admin::Admin::new(metrics.clone(), cfg.auth.disabled));
    let admin_listener = bind(cfg.admin.listen).await?;
    let admin_addr = shown(&admin_listener);
    let shutdown = Shutdown::new(cfg.delivery.shutdown_timeout);
    // The admin listener outlives the webhook listener: probes read 503 while stopping.
    let admin_stop = CancellationToken::new();
    let a = admin.clone();
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        Duration::from_secs(5),
        admin_stop.clone(),
        shutdown.clone(),
        move |req| server::admin::handle(a.clone(), req),
    ));

    let (_, table) = prepare(&loaded)?;
    let delivery: Arc<dyn Delivery> = match cfg.delivery.mode {
        DeliveryMode::Direct => Arc::new(Direct::new(&cfg.delivery)),
        DeliveryMode::Spool => crate::delivery::spool::open(&cfg.delivery, &table.sinks)
            .await
            .map_err(|e| ServeError::Runtime(e.to_string()))?,
    };
    let state = Arc::new(State {
        path: cfg.server.path.clone(),
        auth_header: HeaderName::from_bytes(cfg.auth.header.as_bytes()).expect("validated at load"),
        max_body_bytes: cfg.server.max_body_bytes,
        request_timeout: cfg.server.request_timeout,
        verifier: Verifier::new(&loaded),
        normalise: loaded.normalise.clone(),
        delivery,
        metrics,
        routes_file: cfg.routes_file.clone(),
        table: RwLock::new(Arc::new(table)),
        rejected: JsonlFile::rotated(cfg.delivery.rejected_file(), cfg.delivery.max_rejected_bytes),
        ready: AtomicBool::new(false),
    });
    state.refresh_gauges();
    if state.verifier.is_disabled() {
        tracing::warn!("auth.disabled = true: webhooks are NOT authenticated; use this only for local experiments");
    }

    let hook = bind(cfg.server.listen).await?;
    let hook_addr = shown(&hook);
    let s = state.clone();
    let hook_task = tokio::spawn(server::serve(
        hook,
        cfg.server.request_timeout,
        shutdown.child_token(),
        shutdown.clone(),
        move |req| server::webhook::handle(s.clone(), req),
    ));

    state.ready.store(true, Ordering::Release);
    admin.set_state(state.clone());
    // Machine-readable line for tests and wrappers that bind to port 0.
    tracing::info!(webhook = %hook_addr, admin = %admin_addr, path = %cfg.server.path, mode = ?cfg.delivery.mode, "webio-router ready");
    crate::notify::ready();
    let watchdog = crate::notify::spawn_watchdog();

    wait_for_shutdown(&state).await;

    // One deadline for every phase below (SPEC §10): each runs until it, never longer.
    shutdown.trigger();
    let deadline = shutdown.deadline();
    tracing::info!(timeout = ?cfg.delivery.shutdown_timeout, "shutting down: refusing new work, finishing in-flight requests");
    crate::notify::stopping();
    state.ready.store(false, Ordering::Release);
    let _ = tokio::time::timeout_at(deadline, hook_task).await;
    state.delivery.shutdown(deadline).await;
    let sinks: Vec<_> = state.table().sinks.values().cloned().collect();
    let left = shutdown.remaining();
    let _ =
        tokio::time::timeout_at(deadline, futures_util::future::join_all(sinks.iter().map(|s| s.flush(left)))).await;
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_millis(500), admin_task).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_shutdown(state: &State) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                crate::notify::reloading();
                let _ = state.reload_routes();
                crate::notify::ready();
            }
        }
    }
}
