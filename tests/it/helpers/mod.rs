//! Helpers for black-box tests: the real binary on port 0, signed tokens, a tiny HTTP
//! client, and a capture HTTP server whose answers a test controls.

pub mod app;
pub mod brokers;
pub mod conversation_sink;
pub mod process;
pub mod spool;
pub mod tls;
pub mod tmpfs;

pub use app::{spawn_app, TestApp};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
pub const SECRET2: &str = "rotated-secret-9876543210-9876543210-zyx";
pub const PATH: &str = "/webhooks/webio";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_webio-router")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Polls `f` until it holds; panics naming `what` after `limit`. The one way tests wait.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// An HS256 token like Webio's, for organisation `org`, without `exp`.
pub fn signed_token(secret: &str, org: Option<&str>) -> String {
    webio_router::auth::sign(secret.as_bytes(), webio_router::config::Algorithm::HS256, org, "organisationId", None)
}

pub fn token() -> String {
    signed_token(SECRET, Some("42"))
}

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) and close before reading it all.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Response { status, headers, body: body.to_owned() }
}

/// Posts `body` with a valid token.
pub fn post(addr: SocketAddr, body: &[u8]) -> Response {
    let t = token();
    request(addr, "POST", PATH, &[("x-webio-token", &t), ("content-type", "application/json")], body)
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

/// A running `webio-router serve` in its own temp directory (its process: [`Started`]).
pub struct Router {
    pub process: Started,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl std::ops::Deref for Router {
    type Target = Started;
    fn deref(&self) -> &Started {
        &self.process
    }
}

impl std::ops::DerefMut for Router {
    fn deref_mut(&mut self) -> &mut Started {
        &mut self.process
    }
}

pub struct RouterBuilder {
    config: String,
    routes: String,
    env: Vec<(String, String)>,
    dir: Option<tempfile::TempDir>,
}

/// `config` is appended to a base config (secrets, direct mode, files under the temp dir);
/// `routes` is the whole routes.toml. `{dir}` in either is replaced by the temp dir.
pub fn router(config: &str, routes: &str) -> RouterBuilder {
    RouterBuilder { config: config.to_owned(), routes: routes.to_owned(), env: Vec::new(), dir: None }
}

pub fn spawn_router(routes: &str) -> Router {
    router("", routes).spawn()
}

pub const BASE_CONFIG: &str = r#"
routes_file = "{dir}/routes.toml"
[auth]
secrets = ["test-secret-0123456789-0123456789-abcdef"]
[delivery]
mode = "direct"
spool_dir = "{dir}/spool"
dead_letter_file = "{dir}/var/dead-letter.jsonl"
"#;

impl RouterBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Reuse a directory (restart tests).
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Writes the files without starting anything.
    pub fn write(self) -> (tempfile::TempDir, PathBuf, Vec<(String, String)>) {
        let dir = self.dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let d = dir.path().display().to_string();
        let config = if self.config.contains("[auth]") || self.config.contains("routes_file") {
            self.config.replace("{dir}", &d)
        } else {
            format!("{}\n{}", BASE_CONFIG, self.config).replace("{dir}", &d)
        };
        std::fs::write(dir.path().join("webio-router.toml"), config).unwrap();
        std::fs::write(dir.path().join("routes.toml"), self.routes.replace("{dir}", &d)).unwrap();
        let cfg = dir.path().join("webio-router.toml");
        (dir, cfg, self.env)
    }

    pub fn spawn(self) -> Router {
        let started = self.start();
        let line = match started.ready.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => panic!("router did not become ready; log:\n{}", started.log.lock().unwrap().join("\n")),
        };
        let addr = field_addr(&line, "webhook=");
        let admin = field_addr(&line, "admin=");
        Router { process: started, addr, admin }
    }

    /// Starts the process without waiting for it to be ready (its log is collected as it comes).
    pub fn start(self) -> Started {
        let (dir, cfg, env) = self.write();
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(&cfg)
            .arg("serve")
            .current_dir(dir.path())
            .env("WEBIO_ROUTER_SERVER__LISTEN", "127.0.0.1:0")
            .env("WEBIO_ROUTER_ADMIN__LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn webio-router");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, ready) = mpsc::channel();
        let l = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("webio-router ready") {
                    let _ = tx.send(line.clone());
                }
                l.lock().unwrap().push(line);
            }
        });
        Started { child, dir, log, ready }
    }
}

/// A router process that may not be ready yet (see [`RouterBuilder::start`]); killed on drop.
pub struct Started {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Receives the "webio-router ready" log line.
    pub ready: mpsc::Receiver<String>,
}

impl Started {
    /// Waits until the log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
            assert!(Instant::now() < deadline, "no log line with {needle:?}; log:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "router did not exit; log:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `webhook=ADDR` (text logs) or `"webhook":"ADDR"` (JSON logs) from the ready line.
pub fn ready_addr(line: &str, name: &str) -> Option<SocketAddr> {
    let (text, json) = (format!("{name}="), format!("\"{name}\":\""));
    let start = line.find(&text).map(|i| i + text.len()).or_else(|| line.find(&json).map(|i| i + json.len()))?;
    let rest = &line[start..];
    let end = rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn field_addr(line: &str, key: &str) -> SocketAddr {
    ready_addr(line, key.trim_end_matches('=')).unwrap_or_else(|| panic!("{key} in {line}"))
}

impl Router {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn post(&self, body: &[u8]) -> Response {
        post(self.addr, body)
    }

    pub fn metrics(&self) -> String {
        get(self.admin, "/metrics").body
    }

    /// The value of one metric line (`name{labels}` exactly as rendered), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Lines of a JSON Lines file under the temp dir (empty if it does not exist).
    pub fn jsonl(&self, rel: &str) -> Vec<serde_json::Value> {
        read_jsonl(&self.path(rel))
    }
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect())
        .unwrap_or_default()
}

/// What the capture server received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Captured {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An HTTP server that records every request and answers with `status` (changeable at
/// any time), after `delay_ms`.
pub struct Capture {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Captured>>>,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
}

impl Capture {
    pub fn start(status: u16) -> Capture {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(status));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (r, s, d) = (requests.clone(), status.clone(), delay_ms.clone());
        thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let (r, s, d) = (r.clone(), s.clone(), d.clone());
                thread::spawn(move || serve_capture(conn, r, s, d));
            }
        });
        Capture { addr, requests, status, delay_ms }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve_capture(conn: TcpStream, requests: Arc<Mutex<Vec<Captured>>>, status: Arc<AtomicU16>, delay: Arc<AtomicU64>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.lock().unwrap().push(Captured { method, path, headers, body });
        // The delay is re-read while waiting, so that a test can hold an answer and release it
        // (set it to 0) at the moment it chooses.
        let held = Instant::now();
        while held.elapsed() < Duration::from_millis(delay.load(Ordering::SeqCst)) {
            thread::sleep(Duration::from_millis(5));
        }
        let st = status.load(Ordering::SeqCst);
        let answer = format!("HTTP/1.1 {st} X\r\ncontent-length: 2\r\nretry-after: 1\r\n\r\n{{}}");
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// An address on 127.0.0.1 nobody listens on (connection refused), for as long as the returned
/// guard lives: the port stays bound (without `listen`, without `SO_REUSEADDR`), so no other
/// test or process can take it meanwhile, as it could if the socket were dropped on return.
/// Hold the guard for the whole test (`let dead = dead_addr();`), not just one expression.
#[must_use = "the port is free again once the guard is dropped"]
pub fn dead_addr() -> DeadAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().ok().and_then(|a| a.as_socket()).expect("bound address");
    DeadAddr { addr, _socket: socket }
}

/// [`dead_addr`]'s guard: derefs to its address. (Not `Display`, so that `format!("{}", dead_addr())`,
/// which would free the port at once, does not compile.)
pub struct DeadAddr {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl std::ops::Deref for DeadAddr {
    type Target = SocketAddr;
    fn deref(&self) -> &SocketAddr {
        &self.addr
    }
}

/// `promtool check metrics` on a `/metrics` text: the exposition format is valid.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian package `prometheus`; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dead_addr_stays_taken_while_held_and_refuses_connections() {
    let dead = dead_addr();
    assert!(TcpListener::bind(*dead).is_err(), "nobody else may take {} while the test holds it", dead.addr);
    let refused = TcpStream::connect(*dead).expect_err("nothing listens there");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
}
