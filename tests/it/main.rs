//! The integration tests: one crate, so that rdkafka, lapin and the rest are linked once.
//!
//! Each module tests one part of the contract; `helpers` holds what they share (signed
//! tokens, the router on port 0, capture servers, broker set-up, waits).

#![allow(dead_code)]

mod helpers;

mod amqp;
mod api;
mod cli;
mod deploy_metrics;
mod hostile;
mod kafka;
mod spool_edges;
mod spool_faults;
mod systemd_notify;
