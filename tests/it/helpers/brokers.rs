//! Helpers shared by the broker-sink integration tests: events, a retrying delivery loop and
//! a TCP proxy (plain or TLS-terminating) that a test can cut and restore.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webio_router::event::{normalise, Envelope, NormaliseOptions};
use webio_router::sinks::{Sink, SinkConfig, SinkError};

/// A normalised event built from a Webio body.
pub fn envelope(body: serde_json::Value) -> Envelope {
    let raw = serde_json::to_vec(&body).unwrap();
    let event = normalise(&raw, Some("org-1".into()), &NormaliseOptions::default(), chrono::Utc::now()).unwrap();
    Envelope::new(event, Bytes::from(raw))
}

/// The `n`th event of a run: distinct ids, a handful of conversations.
pub fn numbered(event_type: &str, n: usize) -> Envelope {
    envelope(serde_json::json!({
        "type": event_type,
        "conversationId": format!("conv-{}", n % 7),
        "communicationActionId": n,
        "body": format!("message {n}"),
    }))
}

/// A random suffix for per-test broker object names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A sink table as `routes.toml` would hold it.
pub fn sink_config(toml_text: &str) -> SinkConfig {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("bad sink table: {e}\n{toml_text}"))
}

/// Delivers `env`, retrying retryable errors (with a short pause) until it is confirmed or
/// `deadline` passes; a permanent error ends it at once. Returns the number of failed attempts.
pub async fn deliver_until_ok(sink: &dyn Sink, env: &Envelope, deadline: Instant) -> Result<u32, SinkError> {
    let mut failures = 0;
    loop {
        match sink.deliver(env).await {
            Ok(()) => return Ok(failures),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                failures += 1;
                if Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`, optionally terminating TLS. `cut` closes
/// every proxied connection and stops listening (new connections are refused), and returns
/// only once every socket of the proxy is closed; `restore` listens again on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    tls: Option<TlsAcceptor>,
    running: Mutex<Option<(CancellationToken, TaskTracker)>>,
    stats: Arc<TlsStats>,
}

/// What a TLS-terminating proxy saw.
#[derive(Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub sessions: AtomicUsize,
    /// Handshakes that failed (e.g. the client did not trust the certificate).
    pub failed: AtomicUsize,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_with(upstream, None).await
    }

    /// A proxy that terminates TLS with `server` and forwards the plaintext to `upstream`.
    pub async fn start_tls(upstream: SocketAddr, server: Arc<rustls::ServerConfig>) -> Proxy {
        Self::start_with(upstream, Some(TlsAcceptor::from(server))).await
    }

    async fn start_with(upstream: SocketAddr, tls: Option<TlsAcceptor>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            tls,
            running: Mutex::new(None),
            stats: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    pub fn stats(&self) -> &TlsStats {
        &self.stats
    }

    fn serve(&self, listener: TcpListener) {
        let (upstream, tls, stats) = (self.upstream, self.tls.clone(), self.stats.clone());
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (stop2, tracker2) = (stop.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                // `biased`: once cut, no new connection is served, even one already accepted.
                let (client, _) = tokio::select! {
                    biased;
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(c) => c,
                        Err(_) => return,
                    },
                };
                let (stop, tls, stats) = (stop2.clone(), tls.clone(), stats.clone());
                tracker2.spawn(async move {
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => {}
                        _ = forward(client, upstream, tls, &stats) => {}
                    }
                });
            }
        });
        *self.running.lock().unwrap() = Some((stop, tracker));
    }

    /// Drops the listener and every proxied connection, and waits until they are closed.
    pub async fn cut(&self) {
        let running = self.running.lock().unwrap().take();
        if let Some((stop, tracker)) = running {
            stop.cancel();
            tracker.close();
            tracker.wait().await;
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(128).unwrap());
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, tls: Option<TlsAcceptor>, stats: &TlsStats) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    match tls {
        None => {
            let mut client = client;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
        Some(acceptor) => match acceptor.accept(client).await {
            Ok(mut client) => {
                stats.sessions.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::SeqCst);
            }
        },
    }
}
