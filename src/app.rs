//! The daemon as a value (`serve`): [`App::build`] binds both listeners and opens routes,
//! sinks and the spool; [`App::run`] serves until its [`Shutdown`] is triggered, then stops
//! within the one deadline. [`serve`] adds what only a process has: signals (SIGTERM/SIGINT
//! stop, SIGHUP reloads) and systemd notifications. Tests build an `App` on port 0 and read
//! its bound addresses instead of scraping a log line. With `[ingest]` on, the SFTP-hook
//! poller is a task of the app too: it starts with [`App::run`] and stops with the shutdown.

use crate::auth::Verifier;
use crate::config::{ConfigError, DeliveryMode, Diagnostic, Loaded};
use crate::delivery::{direct::Direct, Delivery};
use crate::ingest::Inbox;
use crate::jsonl::JsonlFile;
use crate::routes::Routes;
use crate::server;
use crate::server::admin::Admin;
use crate::server::webhook::custom_values::CustomValues;
use crate::shutdown::Shutdown;
use crate::state::{RouteTable, State};
use http::HeaderName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What `check` validates: everything `serve` would refuse to start with, without
/// connecting anywhere.
pub fn check(loaded: &Loaded) -> Result<Routes, ConfigError> {
    let routes = Routes::load(&loaded.config.routes_file)?;
    routes.check_delivery_mode(loaded.config.delivery.mode)?;
    Ok(routes)
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
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Spool(#[from] crate::delivery::spool::SpoolError),
    #[error("{0}")]
    Control(#[from] crate::control::ControlError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("ingest.dir: cannot create {dir} and its done/ and rejected/ folders: {source}")]
    Ingest { dir: std::path::PathBuf, source: std::io::Error },
    #[error("delivery.dedup_store: {0}")]
    DedupStore(#[source] crate::dedup::store::StoreUrlError),
}

/// A built daemon: both listeners bound (the admin one already serving), routes, sinks and
/// the delivery mode open. Nothing is accepted on the webhook listener before [`App::run`].
pub struct App {
    state: Arc<State>,
    webhook: TcpListener,
    webhook_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_task: JoinHandle<()>,
    admin_stop: CancellationToken,
    shutdown: Shutdown,
    mode: DeliveryMode,
    control: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
    inbox: Option<Inbox>,
}

impl App {
    /// Binds the admin listener first (probes read 503 rather than a refused connection while
    /// the rest opens), then opens routes, sinks and the spool, then binds the webhook listener.
    pub async fn build(loaded: Loaded) -> Result<App, ServeError> {
        let cfg = &loaded.config;
        let metrics = crate::metrics::install();
        let shutdown = Shutdown::new(cfg.delivery.shutdown_timeout);

        let admin = Arc::new(Admin::new(metrics.clone(), cfg.auth.disabled));
        let admin_listener = bind(cfg.admin.listen)?;
        let admin_addr = local_addr(&admin_listener, cfg.admin.listen);
        // The admin listener outlives the webhook listener: probes read 503 while stopping.
        let admin_stop = CancellationToken::new();
        let a = admin.clone();
        let admin_task = tokio::spawn(server::serve(
            admin_listener,
            Duration::from_secs(5),
            None,
            admin_stop.clone(),
            shutdown.clone(),
            move |req| server::admin::handle(a.clone(), req),
        ));
        // From here on, a failure must stop the admin listener too.
        let stop_admin = |e: ServeError| {
            admin_stop.cancel();
            e
        };

        let (_, table) = prepare(&loaded).map_err(|e| stop_admin(e.into()))?;
        let tls = webhook_tls(&loaded).map_err(|e| stop_admin(e.into()))?;
        let custom_values =
            CustomValues::new(&cfg.custom_values).map_err(|e| stop_admin(ConfigError::from(e).into()))?;
        let inbox = if cfg.ingest.enabled() {
            let org = Some(cfg.auth.organisation_id.clone()).filter(|o| !o.is_empty());
            let inbox = Inbox::open(&cfg.ingest, org, cfg.server.max_body_bytes)
                .map_err(|source| stop_admin(ServeError::Ingest { dir: cfg.ingest.dir.clone(), source }))?;
            Some(inbox)
        } else {
            None
        };
        let delivery: Arc<dyn Delivery> = match cfg.delivery.mode {
            DeliveryMode::Direct => Arc::new(Direct::new(&cfg.delivery)),
            DeliveryMode::Spool => {
                crate::delivery::spool::open(&cfg.delivery, &table.sinks).await.map_err(|e| stop_admin(e.into()))?
            }
        };
        let delivery = match cfg.delivery.dedup_store().filter(|_| !cfg.delivery.dedup_window.is_zero()) {
            None => delivery,
            Some(url) => {
                // A claimed key blocks other replicas at most this long if this one dies
                // before the event is taken (a submit lasts at most a request).
                let pending_ttl = cfg.server.request_timeout + Duration::from_secs(5);
                let store = crate::dedup::store::DedupStore::start(
                    url,
                    cfg.delivery.dedup_store_ca_file.as_deref(),
                    cfg.delivery.dedup_window,
                    pending_ttl,
                )
                .map_err(|e| stop_admin(ServeError::DedupStore(e)))?;
                Arc::new(crate::delivery::shared::SharedWindow::new(delivery, store))
            }
        };
        let state = Arc::new(State {
            path: cfg.server.path.clone(),
            auth_header: HeaderName::from_bytes(cfg.auth.header.as_bytes()).expect("validated at load"),
            max_body_bytes: cfg.server.max_body_bytes,
            request_timeout: cfg.server.request_timeout,
            verifier: RwLock::new(Arc::new(Verifier::new(&loaded))),
            config_file: loaded.file.clone(),
            normalise: loaded.normalise.clone(),
            delivery,
            metrics,
            custom_values,
            routes_file: cfg.routes_file.clone(),
            table: RwLock::new(Arc::new(table)),
            rejected: JsonlFile::rotated(cfg.delivery.rejected_file(), cfg.delivery.max_rejected_bytes),
            ready: AtomicBool::new(false),
            restart_settings: cfg.restart_settings(),
            mode: cfg.delivery.mode,
            tls,
        });
        state.refresh_gauges();
        admin.set_state(state.clone());
        if state.verifier().is_disabled() {
            tracing::warn!("auth.disabled = true: webhooks are NOT authenticated; use this only for local experiments");
        }

        let listeners = async {
            let control = match cfg.admin.control_socket() {
                Some(path) => Some((crate::control::bind(path)?, path.to_owned())),
                None => None,
            };
            Ok::<_, ServeError>((bind(cfg.server.listen)?, control))
        };
        let (webhook, control) = match listeners.await {
            Ok(l) => l,
            Err(e) => {
                // The spool is open: close it properly before giving up.
                state.delivery.shutdown(shutdown.deadline()).await;
                return Err(stop_admin(e));
            }
        };
        let webhook_addr = local_addr(&webhook, cfg.server.listen);
        let mode = cfg.delivery.mode;
        Ok(App { state, webhook, webhook_addr, admin_addr, admin_task, admin_stop, shutdown, mode, control, inbox })
    }

    /// The bound webhook listener (the real port when configured with port 0).
    pub fn webhook_addr(&self) -> SocketAddr {
        self.webhook_addr
    }

    /// The bound admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Trigger it to stop [`App::run`]; its deadline bounds the whole stop.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// What the handlers share (route reloads, readiness).
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves webhooks (and polls the SFTP-hook folder) until the shutdown is triggered; then,
    /// within its one deadline: readiness off, the listener closed and the poller stopped,
    /// in-flight requests and the file being ingested finished, the delivery mode closed (what
    /// is left stays in the spool), sinks flushed, the admin listener closed.
    pub async fn run(self) {
        let App { state, webhook, webhook_addr, admin_addr, admin_task, admin_stop, shutdown, mode, control, inbox } =
            self;
        let control_task = control.map(|(listener, path)| {
            tokio::spawn(crate::control::serve(listener, path, state.clone(), shutdown.child_token()))
        });
        let s = state.clone();
        let hook_task = tokio::spawn(server::serve(
            webhook,
            state.request_timeout,
            state.tls.clone(),
            shutdown.child_token(),
            shutdown.clone(),
            move |req| server::webhook::handle(s.clone(), req),
        ));
        let ingest_task = inbox.map(|inbox| tokio::spawn(inbox.run(state.clone(), shutdown.child_token())));
        state.ready.store(true, Ordering::Release);
        // Machine-readable line for wrappers that bind to port 0.
        tracing::info!(webhook = %webhook_addr, admin = %admin_addr, path = %state.path, mode = mode_name(mode), "webio-router ready");
        crate::notify::ready_with_status(&format!("webhooks on {webhook_addr}, admin on {admin_addr}"));

        shutdown.triggered().await;
        state.ready.store(false, Ordering::Release);
        let deadline = shutdown.deadline();
        tracing::info!(within = ?shutdown.remaining(), "shutting down: refusing new work, finishing in-flight requests");
        crate::notify::stopping();
        let ingest_done = async {
            if let Some(t) = ingest_task {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, futures_util::future::join(hook_task, ingest_done)).await;
        state.delivery.shutdown(deadline).await;
        let sinks: Vec<_> = state.table().sinks.values().cloned().collect();
        let left = shutdown.remaining();
        let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(sinks.iter().map(|s| s.flush(left))))
            .await;
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_millis(500), admin_task).await;
        if let Some(t) = control_task {
            // It stopped with the shutdown; this only waits for the socket file's removal.
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
        tracing::info!("stopped");
    }
}

/// The webhook listener's TLS, when `server.tls_cert_file` and `server.tls_key_file` are set.
fn webhook_tls(loaded: &Loaded) -> Result<Option<Arc<server::tls::Tls>>, ConfigError> {
    let Some((cert, key)) = loaded.config.server.tls_files() else { return Ok(None) };
    let source = loaded.file.as_ref().map_or("configuration".into(), |f| f.display().to_string());
    let certificate = server::tls::Certificate::load(cert, key)
        .map_err(|e| ConfigError::from(Diagnostic::new(source, e.to_string())))?;
    tracing::info!(cert_file = %cert.display(), sha256 = %certificate.fingerprint(), "webhook listener speaks HTTPS only");
    Ok(Some(Arc::new(server::tls::Tls::new(certificate))))
}

fn mode_name(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::Spool => "spool",
        DeliveryMode::Direct => "direct",
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    server::bind(addr).map_err(|source| ServeError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Runs the daemon until SIGTERM/SIGINT; SIGHUP re-reads secrets, routes.toml and the
/// webhook listener's certificate.
pub async fn serve(loaded: Loaded) -> Result<(), ServeError> {
    // Installed before anything else: a SIGHUP or SIGTERM that arrives while the daemon starts,
    // or just after it says it is ready, is handled rather than left to the default action
    // (which for SIGHUP is to die).
    let signals = Signals::install().map_err(ServeError::Signals)?;
    let app = App::build(loaded).await?;
    let shutdown = app.shutdown();
    let signals = tokio::spawn(signals.handle(app.state(), shutdown.clone()));
    let watchdog = crate::notify::spawn_watchdog();
    app.run().await;
    signals.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(())
}

/// The signals `serve` handles, registered with the runtime.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM/SIGINT trigger the shutdown; SIGHUP re-reads secrets, routes.toml and the
    /// webhook listener's certificate.
    async fn handle(mut self, state: Arc<State>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
                _ = self.hup.recv() => {
                    crate::notify::reloading();
                    let _ = state.reload();
                    crate::notify::ready();
                }
            }
        }
        shutdown.trigger();
    }
}
