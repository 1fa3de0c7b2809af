//! webio-router: receives Webio webhooks, authenticates them, normalises them into
//! `webio.event/v1` and routes them to sinks without losing any.
//!
//! Map of the crate, in the order a request travels through it:
//!
//! - [`cli`]: the command line (`serve`, `check`, `token`, `explain`, `test`, `completions`,
//!   `sinks`, `pause`, `resume`, `replay`).
//! - [`config`]: figment configuration (defaults < TOML < `WEBIO_ROUTER_` env), validated once;
//!   the `[custom_values]`, `[ingest]` and `delivery.dedup_store` settings in its own files, so
//!   that loading a configuration needs nothing of the server, the poller or Redis.
//! - [`app`]: the daemon as a value: [`app::App::build`] binds and opens everything,
//!   [`app::App::run`] serves until its [`shutdown::Shutdown`] fires; `serve` adds signals.
//! - [`state`]: what the handlers share (route table, verifier, delivery, readiness).
//! - [`control`]: the control socket, the one way to change a running daemon (pause,
//!   resume, replay) and the status `sinks` and `GET /sinks` show.
//! - [`server`]: the hyper webhook listener, the admin listener, and the one function that
//!   maps a request error to an HTTP answer.
//!   - [`server::webhook::custom_values`]: Webio's Custom Value Request (`GET`), forwarded to
//!     an upstream and cached.
//! - [`ingest`]: the SFTP-hook folder: JSON files of webhook calls, routed like POSTs.
//! - [`auth`]: JWT verification of the `x-webio-token` header (rotation, pinned algorithms).
//! - [`event`]: normalisation of old and new Webio payloads into [`event::Event`];
//!   [`event::trace`]: the W3C `traceparent` each event carries to its sinks.
//! - [`routes`]: `routes.toml` parsing, validation with `file:line:col` diagnostics, matching;
//!   [`routes::cases`]: routing test cases (`webio-router test`).
//! - [`template`]: `{field}` templates and `${NAME}` environment expansion.
//! - [`format`]: how a sink encodes an event (`event`, `cloudevents`, `raw`).
//! - [`delivery`]: between the router and the sinks: direct delivery or the durable spool.
//!   - [`delivery::spool`]: the crash-safe on-disk spool: store, writer, per-sink queues and
//!     their gate (retries, `ordering = "conversation"`), pause and online replay, dead
//!     letters, check and salvage.
//!   - [`delivery::shared`]: either mode with the dedup window shared through Redis.
//! - [`sinks`]: one [`sinks::Sink`] trait, one module per sink type (`amqp/` and `kafka/` are
//!   folders: config, connection/confirms or callbacks); [`sinks::limit`]: `rate_limit` and
//!   `concurrency`, for every type.
//! - [`tls`]: the binary's one rustls crypto provider (ring); the webhook listener's TLS is
//!   [`server::tls`].
//! - [`dedup`]: the re-delivery window; [`dedup::store`]: its Redis side (`delivery.dedup_store`).
//! - [`jsonl`]: append-only JSON Lines files (rejected bodies, dead letters).
//! - [`metrics`]: every metric name and the helpers that emit them.
//! - [`logging`]: the tracing subscriber (text or JSON lines on stderr).
//! - [`notify`]: systemd readiness, reload and watchdog notifications.
//! - [`shutdown`]: the cancellation tree and the one shutdown deadline.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod dedup;
pub mod delivery;
pub mod event;
pub mod format;
pub mod ingest;
pub mod jsonl;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod sinks;
pub mod state;
pub mod template;
pub mod tls;
