//! The two hyper listeners: webhooks ([`webhook`]) and admin ([`admin`]), sharing one
//! accept loop with connection limits, header timeouts and graceful shutdown.
//!
//! A flood of connections that send nothing useful must not starve real requests nor exhaust
//! the process's descriptors: open connections are bounded below the descriptor limit
//! ([`limits`]), a new connection at the bound takes the place of one without a request in
//! progress ([`conns`]), a connection costs next to nothing until its first request head is
//! complete ([`head`]), and the memory a flood took is given back once it ends ([`trim`]).
//! With a certificate configured, the webhook listener speaks HTTPS only ([`tls`]): the
//! handshake is one more step of a connection without a request, in its own task.

pub mod admin;
mod conns;
pub mod error;
mod head;
mod io;
pub mod limits;
mod relay;
pub mod tls;
mod trim;
pub mod webhook;

use bytes::Bytes;
use conns::{Conn, Connections, Lane};
use head::FirstHead;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use relay::WokenOnly;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub type Body = Full<Bytes>;

/// What a connection whose head did not arrive in time is told before it is closed (as hyper
/// does for later requests on a kept-alive connection).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The connections of the process (both listeners). The first listener to start raises the
/// descriptor limit, derives the bound from it and starts the memory trimming.
fn connections() -> &'static Connections {
    static CONNECTIONS: OnceLock<Connections> = OnceLock::new();
    let mut first = false;
    let conns = CONNECTIONS.get_or_init(|| {
        first = true;
        Connections::new(limits::connection_bound_at_start())
    });
    if first {
        trim::spawn(conns);
    }
    conns
}

/// Connections the kernel may hold completed for a listener before the accept loop takes them
/// (`listen(2)`'s backlog; Linux caps it at `net.core.somaxconn`, 4096 by default since 5.4).
/// Tokio's default is 128: a burst of new connections larger than that while the accept loop
/// waits for a core (a reconnect storm after a network blip, a provider's retry wave) has its
/// SYNs dropped, and each such client waits for its retransmission (1 s, then 3 s, 7 s, 15 s)
/// or gives up. As large as the bound on open connections: a full bound's worth of clients
/// can connect at once without a drop.
pub const LISTEN_BACKLOG: u32 = limits::MAX_CONNECTIONS as u32;

/// A listener on `addr` (address reuse on, as `TcpListener::bind`) with [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Sets the gauges read rather than counted (open connections); called on each scrape.
pub fn refresh_gauges() {
    crate::metrics::connections_open(connections().open());
}

/// Serves `listener` until `stop` is cancelled, then lets in-flight requests finish until
/// the shutdown's one deadline (README "Delivery"). A connection is cut when its headers take longer than
/// `header_timeout`, and when an answer cannot be written for as long (a peer that stops
/// reading); the webhook handler bounds the body time itself. Open connections (of both
/// listeners) are bounded; at the bound, a new connection takes the place of the oldest one
/// without a request in progress. With `tls`, every connection is TLS (HTTPS only); its
/// handshake and its first request head share the header timeout.
///
/// The descriptor limit is raised and the bound set when this is called (not when the future
/// first runs), so that the first listener set up does it before anything else opens files.
pub fn serve<F, Fut>(
    listener: TcpListener,
    header_timeout: Duration,
    tls: Option<Arc<tls::Tls>>,
    stop: CancellationToken,
    shutdown: crate::shutdown::Shutdown,
    handler: F,
) -> impl Future<Output = ()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let conns = connections();
    async move {
        let lane = Arc::new(Lane::default());
        let graceful = Graceful::new();
        loop {
            let (stream, _peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends (the bound leaves a reserve, but other parts of
                        // the process may use more): back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            // At the bound with every connection busy: closed at once, rather than left to
            // wait (the sender retries).
            let Some(conn) = conns.admit(&lane) else { continue };
            let _ = stream.set_nodelay(true);
            let open = Open { conns, conn };
            let (watcher, stop, handler) = (graceful.watcher(), stop.clone(), handler.clone());
            match &tls {
                None => tokio::spawn(serve_connection(stream, open, header_timeout, watcher, stop, handler)),
                // Boxed: the TLS session stays out of the plain connections' tasks.
                Some(tls) => tokio::spawn(Box::pin(serve_tls_connection(
                    stream,
                    tls.acceptor(),
                    open,
                    header_timeout,
                    watcher,
                    stop,
                    handler,
                ))),
            };
        }
        drop(listener);
        if tokio::time::timeout_at(shutdown.deadline(), graceful.shutdown()).await.is_err() {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
    }
}

/// Graceful shutdown of a listener's connections, as hyper_util's `GracefulShutdown` does it
/// (a `watch` channel: a change asks every connection to finish its request in progress and
/// close; the shutdown waits until every connection has dropped its receiver), with the
/// connection's side polled through [`WokenOnly`] rather than at every wake-up of its task.
struct Graceful {
    tx: watch::Sender<()>,
}

/// One connection's side of [`Graceful`].
struct Watcher {
    rx: watch::Receiver<()>,
}

impl Graceful {
    fn new() -> Self {
        Graceful { tx: watch::channel(()).0 }
    }

    fn watcher(&self) -> Watcher {
        Watcher { rx: self.tx.subscribe() }
    }

    /// Asks every watched connection to close after its request in progress, and completes
    /// once all of them are done.
    async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// A counted connection; it stops counting when dropped, whatever ends its task.
struct Open {
    conns: &'static Connections,
    conn: Arc<Conn>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.conns.closed(&self.conn);
    }
}

async fn serve_connection<F, Fut>(
    stream: TcpStream,
    open: Open,
    header_timeout: Duration,
    watcher: Watcher,
    stop: CancellationToken,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + header_timeout;
    let first = tokio::select! {
        first = head::read_first_head(&stream, deadline) => first,
        _ = open.conn.shed() => return,
        _ = stop.cancelled() => return,
    };
    let prefix = match after_first_head(first, &open) {
        Next::Serve(prefix) => prefix,
        Next::TimedOut => {
            let _ = stream.try_write(REQUEST_TIMEOUT);
            return;
        }
        Next::Close => return,
    };
    serve_http(stream, prefix, open, header_timeout, watcher, handler).await
}

/// [`serve_connection`] on the TLS listener: the handshake, then the first head decrypted,
/// both by the header timeout from the accept and both "without a request" (shed first).
async fn serve_tls_connection<F, Fut>(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    open: Open,
    header_timeout: Duration,
    watcher: Watcher,
    stop: CancellationToken,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + header_timeout;
    let (mut stream, first) = tokio::select! {
        r = async {
            let mut stream = match tls::handshake(acceptor, stream, deadline).await {
                Ok(stream) => stream,
                Err(tls::NoSession::Quiet) => return None,
                Err(tls::NoSession::Failed(e)) => {
                    handshake_failed(&e);
                    return None;
                }
            };
            let first = tls::read_first_head(&mut stream, deadline).await;
            Some((stream, first))
        } => match r {
            Some(r) => r,
            None => return,
        },
        _ = open.conn.shed() => return,
        _ = stop.cancelled() => return,
    };
    let prefix = match after_first_head(first, &open) {
        Next::Serve(prefix) => prefix,
        Next::TimedOut => {
            // Best effort, without waiting: the answer and the TLS close_notify if the socket
            // takes them now.
            use futures_util::FutureExt;
            use tokio::io::AsyncWriteExt;
            let _ = async {
                stream.write_all(REQUEST_TIMEOUT).await?;
                stream.shutdown().await
            }
            .now_or_never();
            return;
        }
        Next::Close => return,
    };
    serve_http(stream, prefix, open, header_timeout, watcher, handler).await
}

/// What to do once the first head is read.
enum Next {
    /// Hand the connection to hyper, these bytes first.
    Serve(Vec<u8>),
    /// Answer 408 and close: part of a head came, too slowly.
    TimedOut,
    Close,
}

fn after_first_head(first: FirstHead, open: &Open) -> Next {
    match first {
        FirstHead::Complete(prefix) => {
            // A request is in progress from now on: this connection is no longer shed.
            if open.conns.begin_request(&open.conn) {
                Next::Serve(prefix)
            } else {
                Next::Close
            }
        }
        FirstHead::Partial(prefix) => Next::Serve(prefix),
        FirstHead::TimedOut { sent_bytes: true } => Next::TimedOut,
        FirstHead::TimedOut { sent_bytes: false } | FirstHead::Closed => Next::Close,
    }
}

/// hyper on a connection whose first bytes (`prefix`) were read already.
async fn serve_http<S, F, Fut>(
    stream: S,
    prefix: Vec<u8>,
    open: Open,
    header_timeout: Duration,
    watcher: Watcher,
    handler: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let (conns, conn) = (open.conns, open.conn.clone());
    let service = service_fn(move |req| {
        let (handler, conn) = (handler.clone(), conn.clone());
        async move {
            if !conns.begin_request(&conn) {
                return Ok::<_, Infallible>(closing());
            }
            let resp = handler(req).await;
            conns.end_request(&conn);
            Ok(resp)
        }
    });
    let io = io::WriteTimeout::new(io::Replay::new(stream, prefix), header_timeout);
    // Boxed: the task of a connection still waiting for its first head stays small.
    let mut served = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(io), service),
    );
    // The two signals, polled only once they fire (not at each of the task's wake-ups).
    let mut rx = watcher.rx;
    let mut stopping = std::pin::pin!(WokenOnly::new(async move {
        let _ = rx.changed().await;
        rx
    }));
    let mut shed = std::pin::pin!(WokenOnly::new(open.conn.shed()));
    // Held until the connection is done: the listener's shutdown waits for it.
    let mut stop_guard = None;
    std::future::poll_fn(|cx| {
        if stop_guard.is_none() {
            if let Poll::Ready(rx) = stopping.as_mut().poll(cx) {
                stop_guard = Some(rx);
                served.as_mut().graceful_shutdown();
            }
        }
        if served.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Only between requests: a busy connection is never chosen.
        shed.as_mut().poll(cx)
    })
    .await;
}

/// The answer to a request that arrived on a connection just chosen to be shed.
fn closing() -> Response<Body> {
    let mut r =
        json(http::StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": "connection closed to make room"}));
    r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

/// A JSON answer.
pub fn json(status: http::StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// A failed TLS handshake: counted, and reported at `warn` at most once a minute (scanners and
/// old clients fail handshakes all day; a sender with the wrong trust store or TLS version must
/// still be seen), every one at `debug`.
fn handshake_failed(e: &std::io::Error) {
    crate::metrics::tls_handshake_failed();
    if FAILURE_WARNING.due() {
        tracing::warn!(
            error = %e,
            "TLS handshake failed (webio_router_tls_handshake_failures_total counts them all; this warning comes at most once a minute)"
        );
    } else {
        tracing::debug!(error = %e, "TLS handshake failed");
    }
}

/// When the last failed TLS handshake was reported at `warn`.
static FAILURE_WARNING: Throttle = Throttle::new(std::time::Duration::from_secs(60));

/// At most one `true` per `every` (the first call is `true`), across threads.
struct Throttle {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Throttle {
    const fn new(every: std::time::Duration) -> Throttle {
        Throttle { every, last: std::sync::Mutex::new(None) }
    }

    fn due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A burst of connections larger than tokio's default backlog (128) completes while
    /// nothing accepts (an accept loop waiting for a core): the kernel holds them all.
    /// With the default backlog, connections beyond 129 have their SYNs dropped (the
    /// `ListenOverflows` counter of `nstat`) and wait for the client's retransmission.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_connections_beyond_the_default_backlog_waits_in_the_kernel_rather_than_being_dropped() {
        limits::raise_nofile().unwrap();
        // What the kernel grants: the backlog, capped by net.core.somaxconn (old kernels: 128,
        // where this cannot tell the difference and checks the cap instead).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(128);
        let burst = somaxconn.min(1000);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Generous: a connect the kernel takes completes in well under a millisecond; a dropped
        // one would wait for the retransmission, which never succeeds since nothing accepts.
        let patience = Duration::from_secs(20);
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..burst {
            set.spawn(async move { tokio::time::timeout(patience, TcpStream::connect(addr)).await });
        }
        let mut held = Vec::new();
        let mut failed = 0;
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok(Ok(s)) => held.push(s),
                _ => failed += 1,
            }
        }
        assert_eq!(failed, 0, "{failed} of {burst} connections were not taken in {:?}", started.elapsed());
        drop(listener);
    }
}
