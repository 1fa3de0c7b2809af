//! Helpers shared by the broker-sink integration tests: events, a retrying delivery loop and
//! a TCP proxy that a test can cut and restore.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::AbortHandle;
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

/// A TCP proxy on 127.0.0.1 in front of `upstream`. `cut` closes every proxied connection and
/// stops listening (new connections are refused); `restore` listens again on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy { addr: listener.local_addr().unwrap(), upstream, tasks: Arc::default() };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (upstream, tasks) = (self.upstream, self.tasks.clone());
        let tasks2 = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks2.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Drops the listener and every proxied connection.
    pub async fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        // Let the aborted tasks drop their sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(128).unwrap());
    }
}
