//! Helpers for the spool fault tests: the real router binary in a temp dir, a tiny HTTP sink
//! whose answers the test controls, and plain-socket webhook posts. Everything is blocking
//! std code, so a test reads top to bottom.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const SECRET: &str = "spool-fault-tests-secret-0123456789abcdef";

pub fn token() -> String {
    webio_router::auth::sign(
        SECRET.as_bytes(),
        webio_router::config::Algorithm::HS256,
        Some("42"),
        "organisationId",
        None,
    )
}

/// A distinct inbound message (distinct body, so a distinct event id).
pub fn payload(tag: &str, n: usize) -> String {
    format!(
        r#"{{"type":"inboundMessage","conversationId":"{tag}-{n}","communicationActionId":"{n}","body":"hello {tag} {n}","dateCreated":"2021-01-28 12:22:15.397"}}"#
    )
}

/// Polls `f` until it is true; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A port with nothing listening on it (connection refused), kept for a sink started later.
///
/// The port stays reserved by a socket that is bound but not listening: connections to it are
/// refused, yet no other socket can be given the port meanwhile (neither a listener bound to
/// port 0 nor an outgoing connection's ephemeral port), which a port found free and released
/// could be. [`SinkServer::start_on`] turns that same socket into the sink's listener.
pub struct ReservedPort {
    fd: std::os::fd::OwnedFd,
    pub port: u16,
}

impl ReservedPort {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn listen(self) -> TcpListener {
        use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
        // SAFETY: `fd` is a bound TCP socket this value owns; `listen` only changes its state,
        // and `from_raw_fd` takes over the ownership that `into_raw_fd` gives up.
        unsafe {
            assert_eq!(libc::listen(self.fd.as_raw_fd(), 128), 0, "listen: {}", std::io::Error::last_os_error());
            TcpListener::from_raw_fd(self.fd.into_raw_fd())
        }
    }
}

pub fn free_port() -> ReservedPort {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: plain socket calls on a descriptor created here and owned by `OwnedFd` at once.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd.as_raw_fd(), &addr as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut blen = len;
        let rc =
            libc::getsockname(fd.as_raw_fd(), &mut bound as *mut libc::sockaddr_in as *mut libc::sockaddr, &mut blen);
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        ReservedPort { fd, port: u16::from_be(bound.sin_port) }
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP sink

/// A [`SinkServer`] status: read the request, never answer.
pub const HANG: u16 = 0;

/// An HTTP endpoint answering every request with `status` (and `Retry-After` when set).
/// Records the event id of every request it answered with 2xx.
pub struct SinkServer {
    pub port: u16,
    status: Arc<AtomicU16>,
    retry_after: Arc<Mutex<Option<String>>>,
    received: Arc<Mutex<Vec<String>>>,
    attempts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Requests read and not answered yet, the most ever seen at once, and how long each
    /// answer is held back (ms).
    flight: Arc<Flight>,
}

#[derive(Default)]
struct Flight {
    now: AtomicU64,
    max: AtomicU64,
    delay_ms: AtomicU64,
}

impl SinkServer {
    pub fn start(status: u16) -> SinkServer {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind sink"), status)
    }

    /// Listens on a port reserved by [`free_port`] (where a router may already be sending).
    pub fn start_on(port: ReservedPort, status: u16) -> SinkServer {
        Self::serve(port.listen(), status)
    }

    /// An endpoint that reads each request and never answers ([`HANG`]).
    pub fn hanging() -> SinkServer {
        Self::start(HANG)
    }

    fn serve(listener: TcpListener, status: u16) -> SinkServer {
        let port = listener.local_addr().unwrap().port();
        let s = SinkServer {
            port,
            status: Arc::new(AtomicU16::new(status)),
            retry_after: Arc::default(),
            received: Arc::default(),
            attempts: Arc::default(),
            stop: Arc::default(),
            flight: Arc::default(),
        };
        let (status, retry_after, received, attempts, stop) =
            (s.status.clone(), s.retry_after.clone(), s.received.clone(), s.attempts.clone(), s.stop.clone());
        let flight = s.flight.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (status, retry_after, received, attempts, flight) =
                    (status.clone(), retry_after.clone(), received.clone(), attempts.clone(), flight.clone());
                std::thread::spawn(move || serve_conn(conn, &status, &retry_after, &received, &attempts, &flight));
            }
        });
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Release);
    }

    pub fn set_retry_after(&self, v: Option<&str>) {
        *self.retry_after.lock().unwrap() = v.map(str::to_owned);
    }

    /// Event ids answered with 2xx, in arrival order (duplicates included).
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    pub fn received_set(&self) -> BTreeSet<String> {
        self.received().into_iter().collect()
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Holds each answer back `ms` milliseconds (so that deliveries overlap when they may).
    pub fn set_delay_ms(&self, ms: u64) {
        self.flight.delay_ms.store(ms, Ordering::Release);
    }

    /// The most requests it ever held at once (read, not yet answered).
    pub fn max_in_flight(&self) -> u64 {
        self.flight.max.load(Ordering::Acquire)
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_conn(
    mut conn: TcpStream,
    status: &AtomicU16,
    retry_after: &Mutex<Option<String>>,
    received: &Mutex<Vec<String>>,
    attempts: &AtomicU64,
    flight: &Flight,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    // One request per connection (we answer `Connection: close`).
    let Some((head, body)) = read_request(&mut conn) else { return };
    attempts.fetch_add(1, Ordering::AcqRel);
    let now = flight.now.fetch_add(1, Ordering::AcqRel) + 1;
    flight.max.fetch_max(now, Ordering::AcqRel);
    std::thread::sleep(Duration::from_millis(flight.delay_ms.load(Ordering::Acquire)));
    // Out of flight before the answer leaves: the client may send the next one at once.
    flight.now.fetch_sub(1, Ordering::AcqRel);
    let code = status.load(Ordering::Acquire);
    if code == HANG {
        // Hold the connection without a word until the client gives up (or a status is set).
        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
        let mut byte = [0u8; 1];
        while status.load(Ordering::Acquire) == HANG {
            match conn.read(&mut byte) {
                Ok(0) => return,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                _ => return,
            }
        }
        return;
    }
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-webio-event-id:").or_else(|| l.strip_prefix("X-Webio-Event-Id:")))
        .map(|v| v.trim().to_owned())
        .or_else(|| serde_json::from_slice::<serde_json::Value>(&body).ok()?.get("id")?.as_str().map(str::to_owned));
    if (200..300).contains(&code) {
        if let Some(id) = id {
            received.lock().unwrap().push(id);
        }
    }
    let extra = match &*retry_after.lock().unwrap() {
        Some(v) if code >= 400 => format!("retry-after: {v}\r\n"),
        _ => String::new(),
    };
    let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n");
    let _ = conn.write_all(resp.as_bytes());
}

/// One request (`Content-Length` framed): its head, lowercased, and its body.
pub fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

// ---------------------------------------------------------------------------------------------
// Webhook requests

pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        let name = format!("{}:", name.to_lowercase());
        self.head.lines().find_map(|l| l.to_lowercase().strip_prefix(&name).map(|v| v.trim().to_owned()))
    }

    /// The `id` of a 202/200 answer.
    pub fn id(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON: {}", self.body));
        v["id"].as_str().unwrap_or_else(|| panic!("no id in {}", self.body)).to_owned()
    }
}

pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let r = crate::helpers::request(addr, method, path, headers, body);
    let head = r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("\r\n");
    Answer { status: r.status, head, body: r.body }
}

// ---------------------------------------------------------------------------------------------
// The router

/// A test directory: config, routes, spool, dead letters.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// `routes` is the whole routes.toml; `delivery` extra lines for `[delivery]`.
    pub fn new(routes: &str, delivery: &str) -> Setup {
        Self::with(routes, delivery, "", None)
    }

    /// Like [`Setup::new`], with extra `[server]` lines and the spool somewhere else
    /// (e.g. on a small tmpfs).
    pub fn with(routes: &str, delivery: &str, server: &str, spool_dir: Option<&Path>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let spool = spool_dir.map_or_else(|| d.join("spool"), Path::to_owned);
        std::fs::write(d.join("routes.toml"), routes).unwrap();
        let config = format!(
            r#"routes_file = "{routes}"

[server]
listen = "127.0.0.1:0"
path = "/webhooks/webio"
{server}

[admin]
listen = "127.0.0.1:0"

[auth]
secrets = ["{SECRET}"]
organisation_id = "42"

[delivery]
mode = "spool"
spool_dir = "{spool}"
dead_letter_file = "{dead}"
{delivery}

[log]
format = "json"
level = "info"
"#,
            routes = d.join("routes.toml").display(),
            spool = spool.display(),
            dead = d.join("dead-letter.jsonl").display(),
            delivery = with_defaults(delivery),
        );
        std::fs::write(d.join("webio-router.toml"), config).unwrap();
        Setup { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_webio-router"));
        cmd.arg("--config").arg(self.path("webio-router.toml")).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("WEBIO_ROUTER_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Starts the router and waits for its ready line.
    pub fn start(&self) -> Router {
        self.try_start().unwrap_or_else(|log| panic!("router did not start:\n{log}"))
    }

    /// Starts the router; `Err(stderr)` when it exits before being ready.
    pub fn try_start(&self) -> Result<Router, String> {
        let mut child =
            self.command().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("webio-router ready") {
                    let _ = tx.send((addr_after(&line, "webhook"), addr_after(&line, "admin")));
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((Some(hook), Some(admin))) = rx.recv_timeout(Duration::from_millis(50)) {
                return Ok(Router { child, hook, admin, log });
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("exited with {status}\n{}", log.lock().unwrap()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("no ready line in 30 s\n{}", log.lock().unwrap()));
            }
        }
    }

    /// Runs a subcommand to completion: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command().args(args).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("dead-letter.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
            .collect()
    }
}

/// `delivery` lines plus the test defaults it does not set itself (fast retries, a short
/// shutdown), so that a test can override any of them.
fn with_defaults(delivery: &str) -> String {
    const DEFAULTS: &[(&str, &str)] = &[
        ("retry_initial", "\"50ms\""),
        ("retry_max", "\"500ms\""),
        ("max_attempts", "1000"),
        ("shutdown_timeout", "\"3s\""),
    ];
    let set: Vec<&str> = delivery.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k.trim()).collect();
    let mut out = delivery.trim().to_owned();
    for (k, v) in DEFAULTS.iter().filter(|(k, _)| !set.contains(k)) {
        out.push_str(&format!("\n{k} = {v}"));
    }
    out
}

fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    crate::helpers::ready_addr(line, key)
}

/// Posts `n` distinct events tagged `tag`; each must be answered 202. Their ids.
pub fn post_all(router: &Router, tag: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let a = router.post(&payload(tag, i));
            assert_eq!(a.status, 202, "{}", a.body);
            a.id()
        })
        .collect()
}

pub struct Router {
    pub child: Child,
    pub hook: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Router {
    pub fn post(&self, body: &str) -> Answer {
        let token = token();
        http(
            self.hook,
            "POST",
            "/webhooks/webio",
            &[("x-webio-token", &token), ("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics", &[], b"").body
    }

    /// A sample's value from /metrics, e.g. `webio_router_spool_pending{sink="a"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(mut self) {
        self.kill9_in_place();
    }

    /// SIGKILL, keeping the value (to be replaced by the next start).
    pub fn kill9_in_place(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_timed().0
    }

    /// SIGTERM, wait for the exit, and how long it took from the signal.
    pub fn terminate_timed(mut self) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
        let deadline = sent + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, sent.elapsed());
            }
            assert!(Instant::now() < deadline, "router did not stop after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /readyz`: (status, JSON body).
    pub fn readyz(&self) -> (u16, serde_json::Value) {
        let a = http(self.admin, "GET", "/readyz", &[], b"");
        (a.status, serde_json::from_str(&a.body).unwrap_or(serde_json::Value::Null))
    }

    /// The peak resident memory of the daemon so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb * 1024
    }
}

/// Posts `body` to `addr` with a valid token; `None` when the router is not there (killed).
pub fn try_post(addr: SocketAddr, body: &str) -> Option<Answer> {
    let token = token();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "POST /webhooks/webio HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\nx-webio-token: {token}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer { status, head: head.to_owned(), body: body.to_owned() })
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// routes.toml with one HTTP sink per (name, url), every event to all of them.
pub fn http_routes(sinks: &[(&str, String)]) -> String {
    let mut s = String::new();
    for (name, url) in sinks {
        s.push_str(&format!("[sinks.{name}]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"2s\"\n\n"));
    }
    let names: Vec<_> = sinks.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    s.push_str(&format!("[[routes]]\nname = \"all\"\nto = [{}]\n", names.join(", ")));
    s
}

pub fn assert_path_exists(p: &Path) {
    assert!(p.exists(), "{} should exist", p.display());
}

/// After a full disk was freed: webhooks are taken again without a restart (each 202 joins
/// `accepted`), then five more.
pub fn accepted_again(router: &Router, accepted: &mut BTreeSet<String>, limit: Duration) {
    let mut n = 0;
    wait_for("webhooks accepted again, without a restart", limit, || {
        n += 1;
        let a = router.post(&payload("freed", n));
        (a.status == 202).then(|| accepted.insert(a.id())).is_some()
    });
    accepted.extend(post_all(router, "after", 5));
}

/// The sink `crm` comes back: every accepted event reaches it, its backlog empties, and
/// nothing was dead-lettered.
pub fn all_delivered(setup: &Setup, router: &Router, sink: &SinkServer, accepted: &BTreeSet<String>, limit: Duration) {
    sink.set_status(200);
    wait_for("every accepted event at the sink", limit, || sink.received_set().is_superset(accepted));
    wait_for("the backlog to be empty", limit, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
    assert!(setup.dead_letters().is_empty(), "{:?}", setup.dead_letters());
}
