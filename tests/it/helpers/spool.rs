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

/// A port with nothing listening on it (connection refused), reusable later by a sink.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// The HTTP sink

/// An HTTP endpoint answering every request with `status` (and `Retry-After` when set).
/// Records the event id of every request it answered with 2xx.
pub struct SinkServer {
    pub port: u16,
    status: Arc<AtomicU16>,
    retry_after: Arc<Mutex<Option<String>>>,
    received: Arc<Mutex<Vec<String>>>,
    attempts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SinkServer {
    pub fn start(status: u16) -> SinkServer {
        Self::start_on(0, status)
    }

    /// Listens on `port` (0: any free port).
    pub fn start_on(port: u16, status: u16) -> SinkServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind sink");
        let port = listener.local_addr().unwrap().port();
        let s = SinkServer {
            port,
            status: Arc::new(AtomicU16::new(status)),
            retry_after: Arc::default(),
            received: Arc::default(),
            attempts: Arc::default(),
            stop: Arc::default(),
        };
        let (status, retry_after, received, attempts, stop) =
            (s.status.clone(), s.retry_after.clone(), s.received.clone(), s.attempts.clone(), s.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (status, retry_after, received, attempts) =
                    (status.clone(), retry_after.clone(), received.clone(), attempts.clone());
                std::thread::spawn(move || serve_conn(conn, &status, &retry_after, &received, &attempts));
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
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    // One request per connection (we answer `Connection: close`).
    let Some((head, body)) = read_request(&mut conn) else { return };
    attempts.fetch_add(1, Ordering::AcqRel);
    let code = status.load(Ordering::Acquire);
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

fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
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
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("routes.toml"), routes).unwrap();
        let config = format!(
            r#"routes_file = "{routes}"

[server]
listen = "127.0.0.1:0"
path = "/webhooks/webio"

[admin]
listen = "127.0.0.1:0"

[auth]
secrets = ["{SECRET}"]
organisation_id = "42"

[delivery]
mode = "spool"
spool_dir = "{spool}"
dead_letter_file = "{dead}"
retry_initial = "50ms"
retry_max = "500ms"
max_attempts = 1000
shutdown_timeout = "3s"
{delivery}

[log]
format = "json"
level = "info"
"#,
            routes = d.join("routes.toml").display(),
            spool = d.join("spool").display(),
            dead = d.join("dead-letter.jsonl").display(),
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

fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    crate::helpers::ready_addr(line, key)
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
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "router did not stop after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
