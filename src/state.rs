//! What the request handlers share: the route table (swapped whole on SIGHUP), the token
//! verifier, the delivery mode, readiness. Built by [`crate::app::App`]; read by the
//! listeners in [`crate::server`] and the SFTP-hook poller in [`crate::ingest`], which both
//! hand events on through [`State::route`]. [`State::sinks_status`] is what `webio-router
//! sinks` (through [`crate::control`]) and `GET /sinks` show; this module does not use the
//! control socket, which uses it.

use crate::auth::Verifier;
use crate::config::{Config, ConfigError, Diagnostic};
use crate::delivery::{Accepted, Delivery, Refused};
use crate::event::{BodyError, Envelope, Event, NormaliseOptions};
use crate::jsonl::{body_fields, JsonlFile};
use crate::routes::Routes;
use crate::server::error::RequestError;
use crate::server::webhook::custom_values::CustomValues;
use crate::sinks::Sink;
use bytes::Bytes;
use http::HeaderName;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Routes and the sinks they name, swapped whole on reload.
pub struct RouteTable {
    pub routes: Routes,
    pub sinks: HashMap<String, Arc<dyn Sink>>,
}

impl RouteTable {
    /// Builds the sinks of `routes` (behind their `rate_limit` and `concurrency`), reusing
    /// those of `previous` whose configuration did not change (so a reload does not reconnect
    /// to every broker).
    pub fn build(routes: Routes, previous: Option<&RouteTable>) -> Result<RouteTable, ConfigError> {
        let mut sinks = HashMap::new();
        let mut errs = Vec::new();
        for (name, cfg) in &routes.sinks {
            let limits = routes.limits.get(name).copied().unwrap_or_default();
            let same = |p: &&RouteTable| {
                p.routes.sinks.get(name) == Some(cfg)
                    && p.routes.limits.get(name).copied().unwrap_or_default() == limits
            };
            let reused = previous.filter(same).and_then(|p| p.sinks.get(name).cloned());
            match reused.map(Ok).unwrap_or_else(|| cfg.build(name).map(|s| limits.wrap(s))) {
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

/// One sink as `webio-router sinks` and `GET /sinks` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkStatus {
    pub name: String,
    /// `file`, `http`, `amqp`, `kafka`; `null` for a sink no longer in routes.toml that
    /// still has pending work.
    #[serde(rename = "type")]
    pub sink_type: Option<String>,
    pub up: bool,
    pub paused: bool,
    pub pending: u64,
    /// Age of the oldest pending event, in seconds.
    pub oldest_pending_seconds: Option<f64>,
    pub last_error: Option<String>,
}

/// What [`State::route`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Taken for `routes` matched routes (0: unrouted).
    Accepted { routes: usize },
    /// Same event id inside the dedup window: acknowledged, nothing re-sent.
    Duplicate,
}

pub struct State {
    pub path: String,
    pub auth_header: HeaderName,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// The token check, swapped whole when SIGHUP re-reads the secrets.
    pub(crate) verifier: RwLock<Arc<Verifier>>,
    /// The configuration file read at start (`None`: built-in defaults + environment), read
    /// again on SIGHUP for the secrets.
    pub(crate) config_file: Option<PathBuf>,
    pub normalise: NormaliseOptions,
    pub delivery: Arc<dyn Delivery>,
    pub metrics: PrometheusHandle,
    /// Custom Value Requests (`GET {path}`), when `custom_values.upstream` is set.
    pub custom_values: Option<CustomValues>,
    pub(crate) routes_file: PathBuf,
    pub(crate) table: RwLock<Arc<RouteTable>>,
    pub(crate) rejected: JsonlFile,
    pub(crate) ready: AtomicBool,
    /// What a reload cannot change, as it was at start (to warn when the file differs).
    pub(crate) restart_settings: String,
    /// The delivery mode the daemon started with (routes that need the spool are refused
    /// by a reload in direct mode).
    pub(crate) mode: crate::config::DeliveryMode,
    /// The webhook listener's TLS (`server.tls_cert_file`), whose certificate a reload swaps.
    pub tls: Option<Arc<crate::server::tls::Tls>>,
}

impl State {
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.read().expect("route table lock").clone()
    }

    pub fn verifier(&self) -> Arc<Verifier> {
        self.verifier.read().expect("verifier lock").clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.delivery.is_ready()
    }

    /// Routes a normalised event and hands it to delivery: the one step that POSTed and
    /// ingested events share, so that routing, dedup and metrics are the same for both. An
    /// event no route matches is taken (and counted as unrouted) without reaching delivery.
    pub async fn route(&self, event: Event, raw: Bytes) -> Result<Taken, Refused> {
        self.route_envelope(Envelope::new(event, raw)).await
    }

    /// [`State::route`] for an event whose envelope is made already (its JSON written once by
    /// [`crate::event::normalise_envelope`]).
    pub async fn route_envelope(&self, env: Envelope) -> Result<Taken, Refused> {
        let table = self.table();
        let event = &env.event;
        let matched = table.routes.matching(event);
        let routes = matched.routes.len();
        // Labels, not copies: the event moves on to delivery.
        let (event_type, shape) = (crate::metrics::type_label(&event.event_type), event.shape.as_str());
        if matched.sinks.is_empty() {
            crate::metrics::event(event_type, shape);
            crate::metrics::unrouted(event_type);
            tracing::debug!(event_id = %event.id, event_type = %event.event_type, "event matched no route");
            return Ok(Taken::Accepted { routes: 0 });
        }
        let sinks = matched.sinks.iter().filter_map(|s| table.sinks.get(*s).cloned()).collect();
        drop(matched);
        let id = tracing::enabled!(tracing::Level::DEBUG).then(|| event.id.clone());
        let id = id.as_deref().unwrap_or_default();
        match self.delivery.submit(env, sinks).await? {
            Accepted::New => {
                crate::metrics::event(event_type, shape);
                tracing::debug!(event_id = %id, routes, "event accepted");
                Ok(Taken::Accepted { routes })
            }
            Accepted::Duplicate => {
                crate::metrics::duplicate();
                tracing::debug!(event_id = %id, "duplicate event acknowledged");
                Ok(Taken::Duplicate)
            }
        }
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

    /// Every sink of routes.toml, and every sink the spool still holds work for, by name.
    pub fn sinks_status(&self) -> Vec<SinkStatus> {
        let table = self.table();
        let mut states = self.delivery.sink_states();
        let now = std::time::SystemTime::now();
        let mut names: Vec<String> = table.sinks.keys().chain(states.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let st = states.remove(&name).unwrap_or_default();
                SinkStatus {
                    sink_type: table.routes.sinks.get(&name).map(|c| c.type_name().to_owned()),
                    up: table.sinks.get(&name).is_some_and(|s| s.is_up()),
                    paused: st.paused,
                    pending: st.pending,
                    oldest_pending_seconds: st
                        .oldest_pending
                        .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                    last_error: st.last_error,
                    name,
                }
            })
            .collect()
    }

    /// `pause` / `resume` from the control socket.
    pub async fn set_paused(&self, sink: &str, paused: bool) -> Result<(), crate::delivery::ControlRefused> {
        let known = self.table().sinks.contains_key(sink) || self.delivery.sink_states().contains_key(sink);
        if !known {
            return Err(crate::delivery::ControlRefused::UnknownSink(sink.to_owned()));
        }
        self.delivery.set_paused(sink, paused).await?;
        crate::metrics::sink_paused(sink, paused);
        Ok(())
    }

    /// `replay` from the control socket: dead-letter lines back into the spool.
    pub async fn replay(
        &self,
        lines: Vec<String>,
        only: Option<&str>,
    ) -> Result<crate::delivery::ReplayOutcome, crate::delivery::ControlRefused> {
        let known: std::collections::BTreeSet<String> = self.table().sinks.keys().cloned().collect();
        if let Some(s) = only.filter(|s| !known.contains(*s)) {
            return Err(crate::delivery::ControlRefused::UnknownSink(s.to_owned()));
        }
        self.delivery.replay(lines, only.map(str::to_owned), known).await
    }

    /// Sets gauges that are read rather than counted (sink up/down).
    pub fn refresh_gauges(&self) {
        for (name, sink) in &self.table().sinks {
            crate::metrics::sink_up(name, sink.is_up());
        }
    }

    /// SIGHUP: re-reads the configuration's secrets (`auth.*`, inline and files), routes.toml
    /// and the webhook listener's certificate and key. All or nothing: an invalid secret,
    /// routes file or certificate is refused with a log line and what was in force stays.
    /// Other settings (listeners, spool, turning TLS on or off, …) need a restart; a change to
    /// them is logged, not applied.
    pub fn reload(&self) -> Result<(), ConfigError> {
        match self.try_reload() {
            Ok(()) => {
                crate::metrics::config_reload(true);
                Ok(())
            }
            Err(e) => {
                crate::metrics::config_reload(false);
                tracing::error!(error = %e, "reload refused; the previous secrets, routes and certificate stay in force");
                Err(e)
            }
        }
    }

    fn try_reload(&self) -> Result<(), ConfigError> {
        let loaded = Config::load(self.config_file.as_deref(), Some(&self.routes_file))?;
        // Read again here (the validation only checked them): these are the files in force.
        let certificate = match (&self.tls, loaded.config.server.tls_files()) {
            (Some(_), Some((cert, key))) => {
                let source = self.config_file.as_ref().map_or("configuration".into(), |f| f.display().to_string());
                let certificate = crate::server::tls::Certificate::load(cert, key)
                    .map_err(|e| Diagnostic::new(source, e.to_string()))?;
                Some((cert.to_owned(), certificate))
            }
            _ => None,
        };
        let current = self.table();
        let routes = Routes::load(&self.routes_file)?;
        // The mode in force is the one the daemon started with (a reload cannot change it).
        routes.check_delivery_mode(self.mode)?;
        let table = RouteTable::build(routes, Some(&current))?;
        let verifier = Verifier::new(&loaded);
        self.delivery.sinks_changed(&table.sinks);
        let (routes, sinks) = (table.routes.routes.len(), table.sinks.len());
        *self.table.write().expect("route table lock") = Arc::new(table);
        *self.verifier.write().expect("verifier lock") = Arc::new(verifier);
        tracing::info!(
            config = %self.config_file.as_ref().map_or("built-in defaults + environment".into(), |f| f.display().to_string()),
            routes_file = %self.routes_file.display(),
            secrets = loaded.secrets.len(),
            routes,
            sinks,
            "configuration reloaded (secrets and routes)"
        );
        if let (Some(tls), Some((cert_file, certificate))) = (&self.tls, certificate) {
            let sha256 = certificate.fingerprint();
            let changed = tls.replace(certificate);
            tracing::info!(
                cert_file = %cert_file.display(),
                %sha256,
                changed,
                "webhook TLS certificate in force for new connections"
            );
        }
        if loaded.config.restart_settings() != self.restart_settings {
            tracing::warn!("settings other than auth and routes changed; they take effect at the next restart");
        }
        Ok(())
    }
}
