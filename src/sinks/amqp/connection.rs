//! The connection task of an `amqp` sink: connect (TLS for `amqps://`), open a channel in
//! publisher-confirm mode, declare the exchange, serve until the connection or the channel is
//! lost, back off, reconnect; until the sink is dropped.
//!
//! The live channel is published through a `watch` (`None` while reconnecting), so a
//! delivery never waits for the connection longer than the sink allows.

use super::confirms::{self, Pending};
use futures_util::StreamExt;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connect, Connection, ConnectionProperties, ExchangeKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Mutex, Notify};

/// State shared between the sink and its connection task.
pub(super) struct Shared {
    pub name: String,
    /// The live channel, `None` while (re)connecting.
    pub live: watch::Sender<Option<Live>>,
    pub up: AtomicBool,
    /// A delivery saw a channel error: the connection task should look at the connection now.
    pub kick: Notify,
}

#[derive(Clone)]
pub(super) struct Live {
    pub channel: Channel,
    pub connection: lapin::ConnectionStatus,
    /// Held only while handing one publish's frames to lapin, so that delivery tags (assigned
    /// by lapin at publish time) follow the order in which the frames go out.
    pub publish: Arc<Mutex<()>>,
    pub confirms: mpsc::UnboundedSender<Pending>,
}

/// What the connection task needs to (re)connect.
pub(super) struct ConnectParams {
    pub uri: AMQPUri,
    /// Extra trust anchors (PEM) for `amqps://`; the public roots are always trusted.
    pub tls: OwnedTLSConfig,
    pub exchange: ShortString,
    pub kind: ExchangeKind,
    pub declare: bool,
    pub reconnect_max: Duration,
}

impl Shared {
    pub fn new(name: &str) -> Shared {
        Shared {
            name: name.to_owned(),
            live: watch::Sender::new(None),
            up: AtomicBool::new(false),
            kick: Notify::new(),
        }
    }

    fn set_live(&self, live: Option<Live>) {
        let up = live.is_some();
        self.live.send_replace(live);
        if self.up.swap(up, Ordering::AcqRel) != up {
            crate::metrics::sink_up(&self.name, up);
        }
    }
}

/// Exponential backoff from 200 ms up to `max`, with jitter (50–100 % of the step).
fn backoff(failures: u32, max: Duration) -> Duration {
    let step = Duration::from_millis(200).saturating_mul(1 << failures.saturating_sub(1).min(16)).min(max);
    step.mul_f64(0.5 + fastrand::f64() * 0.5)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection task: connect, serve until the connection or channel is lost, back off,
/// reconnect; until `closed` fires (the sink was dropped).
pub(super) async fn supervise(shared: Arc<Shared>, params: ConnectParams, mut closed: watch::Receiver<()>) {
    let name = shared.name.clone();
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&name, &params)) => r,
            _ = closed.changed() => return,
        };
        match attempt {
            Ok(Ok((connection, live))) => {
                failures = 0;
                let channel = live.channel.clone();
                shared.set_live(Some(live));
                tracing::info!(sink = %name, host = %params.uri.authority.host, port = params.uri.authority.port, "connected to the AMQP broker");
                let reason = tokio::select! {
                    reason = wait_until_lost(&shared, &connection, &channel) => reason,
                    _ = closed.changed() => {
                        // The sink is gone (a reload may already run its successor under the
                        // same name): no metric from here on.
                        shared.live.send_replace(None);
                        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "OK".into())).await;
                        return;
                    }
                };
                shared.set_live(None);
                tracing::warn!(sink = %name, %reason, "AMQP connection lost; reconnecting");
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "OK".into())).await;
            }
            Ok(Err(e)) => tracing::warn!(sink = %name, error = %e, "cannot connect to the AMQP broker"),
            Err(_) => tracing::warn!(sink = %name, "connecting to the AMQP broker timed out"),
        }
        failures = failures.saturating_add(1);
        let delay = backoff(failures, params.reconnect_max);
        tracing::debug!(sink = %name, delay = ?delay, "next AMQP connection attempt");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closed.changed() => return,
        }
    }
}

async fn connect(name: &str, p: &ConnectParams) -> Result<(Connection, Live), lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(format!("webio-router/{name}").into());
    let runtime = lapin::runtime::default_runtime()?;
    let connection = p.uri.clone().connect_with_config(properties, p.tls.clone(), runtime).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    if p.declare {
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel.exchange_declare(p.exchange.clone(), p.kind.clone(), options, FieldTable::default()).await?;
    }
    let (confirms, rx) = mpsc::unbounded_channel();
    let publish = Arc::new(Mutex::new(()));
    tokio::spawn(confirms::collect(rx, publish.clone()));
    let live = Live { channel, connection: connection.status().clone(), publish, confirms };
    Ok((connection, live))
}

/// Resolves when the connection or the channel is no longer usable; says why.
async fn wait_until_lost(shared: &Shared, connection: &Connection, channel: &Channel) -> String {
    let mut events = connection.events_listener();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => return e.to_string(),
                None => return "connection closed".into(),
                Some(_) => {}
            },
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !connection.status().connected() {
            return "connection closed".into();
        }
        if !channel.status().connected() {
            return "channel closed".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_up_to_the_cap_with_jitter() {
        let max = Duration::from_secs(10);
        let first = backoff(1, max);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200), "{first:?}");
        for n in [10, 20, 40, u32::MAX] {
            let d = backoff(n, max);
            assert!(d >= Duration::from_secs(5) && d <= max, "{n}: {d:?}");
        }
    }
}
