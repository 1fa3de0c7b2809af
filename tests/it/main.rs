//! The integration tests: one crate, so that rdkafka, lapin and the rest are linked once.
//!
//! Each module tests one part of the contract; `helpers` holds what they share (signed
//! tokens, the router on port 0, capture servers, broker set-up, waits).

#![allow(dead_code)]

mod helpers;

mod amqp;
mod api;
mod broker_tls;
mod cli;
mod custom_values;
mod deploy_metrics;
mod direct_mode;
mod exact_numbers;
mod file_sink;
mod flood;
mod hostile;
mod http_sink;
mod https;
mod ingest;
mod kafka;
mod operate;
mod ordering;
mod redis;
mod reload;
mod sink_rounds;
mod spool_edges;
mod spool_faults;
mod spool_wal;
mod systemd_notify;
mod trace;
