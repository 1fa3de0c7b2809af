//! `delivery.dedup_store`: the dedup window shared between replicas through Redis
//! (127.0.0.1:6379; `.ci/run` starts it). Each test sends bodies with a random tag, so that
//! its event ids (hashes of the content) are its own, whatever else uses the same Redis.

use crate::helpers::{dead_addr, router, Capture};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const REDIS: &str = "127.0.0.1:6379";

fn body(tag: &str) -> Vec<u8> {
    crate::helpers::spool::payload(tag, 1).into_bytes()
}

fn tag() -> String {
    format!("{:016x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

/// One command to the shared Redis (127.0.0.1:6379), its raw RESP answer.
fn redis(args: &[&str]) -> String {
    assert!(TcpStream::connect(REDIS).is_ok(), "Redis must answer on {REDIS} (.ci/run starts it)");
    redis_at(6379, args)
}

fn routes(sink: &Capture) -> String {
    format!("[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"crm\"]\n", sink.url("/events"))
}

fn config(store: &str) -> String {
    format!("dedup_store = \"{store}\"\n")
}

/// A replica in spool mode (the default; the base test config says direct).
fn spooled(store: &str, sink: &Capture) -> crate::helpers::Router {
    router(&config(store), &routes(sink)).env("WEBIO_ROUTER_DELIVERY__MODE", "spool").spawn()
}

#[test]
fn a_second_router_sharing_redis_answers_duplicate_for_the_same_webhook() {
    assert!(redis(&["PING"]).starts_with("+PONG"), "Redis must run on {REDIS}");
    let sink = Capture::start(200);
    let store = format!("redis://{REDIS}");
    let a = spooled(&store, &sink);
    let b = spooled(&store, &sink);
    let t = tag();
    let first = a.post(&body(&t));
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert!(redis(&["GET", &format!("webio-router:dedup:{id}")]).starts_with("$1\r\nt"), "the key says taken");
    let ttl: i64 =
        redis(&["PTTL", &format!("webio-router:dedup:{id}")]).trim().trim_start_matches(':').parse().unwrap();
    assert!(ttl > 590_000 && ttl <= 600_000, "the key lives for the dedup window: {ttl} ms");

    let second = b.post(&body(&t));
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.json()["status"], "duplicate");
    assert_eq!(second.json()["id"], id.as_str());
    assert_eq!(b.metric("webio_router_duplicates_total"), 1.0);
    sink.wait_for(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.received().len(), 1, "delivered once for both replicas");
    assert_eq!(a.metric("webio_router_dedup_store_errors_total"), 0.0);
    assert_eq!(b.metric("webio_router_dedup_store_errors_total"), 0.0);

    // Another webhook is new on the second replica too.
    let other = b.post(&body(&tag()));
    assert_eq!(other.status, 202, "{}", other.body);
}

#[test]
fn a_refused_webhook_leaves_no_key_so_the_retry_is_taken_on_another_replica() {
    // Direct mode with a failing sink: the webhook is refused (503), and Webio's retry lands
    // on a replica whose sink works.
    let down = Capture::start(503);
    let up = Capture::start(200);
    let store = format!("redis://{REDIS}");
    let a = router(&config(&store), &routes(&down)).spawn();
    let b = router(&config(&store), &routes(&up)).spawn();
    let t = tag();
    let refused = a.post(&body(&t));
    assert_eq!(refused.status, 503, "{}", refused.body);
    let retry = b.post(&body(&t));
    assert_eq!(retry.status, 202, "not a false duplicate: {}", retry.body);
    assert_eq!(up.wait_for(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn with_redis_unreachable_webhooks_are_taken_and_the_error_counter_rises() {
    let sink = Capture::start(200);
    let dead = dead_addr();
    let store = format!("redis://{}", dead.addr);
    let r = spooled(&store, &sink);
    assert_eq!(r.metric("webio_router_dedup_store_errors_total"), 0.0, "pre-registered at 0");
    let t = tag();
    let first = r.post(&body(&t));
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(r.metric("webio_router_dedup_store_errors_total") >= 1.0, "{}", r.metrics());
    // The local window still answers.
    let again = r.post(&body(&t));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["status"], "duplicate");
    let other = r.post(&body(&tag()));
    assert_eq!(other.status, 202, "{}", other.body);
    assert!(r.metric("webio_router_dedup_store_errors_total") >= 2.0);
    r.wait_log("dedup store: Redis is unavailable", Duration::from_secs(20));
    assert!(!r.log_text().contains(&store), "the URL is never logged");
}

#[test]
fn a_webhook_another_replica_is_taking_right_now_gets_503_then_is_taken_once_it_was_refused() {
    let sink = Capture::start(200);
    let store = format!("redis://{REDIS}");
    let a = spooled(&store, &sink);
    let b = spooled(&store, &sink);
    let t = tag();
    let first = a.post(&body(&t));
    assert_eq!(first.status, 202, "{}", first.body);
    let key = format!("webio-router:dedup:{}", first.json()["id"].as_str().unwrap());
    // As if a replica had claimed it and not committed it yet.
    assert!(redis(&["SET", &key, "p", "PX", "30000"]).starts_with("+OK"));
    let busy = b.post(&body(&t));
    assert_eq!(busy.status, 503, "not a duplicate while it may still be refused: {}", busy.body);
    assert_eq!(busy.header("retry-after"), Some("2"));
    // That replica refused it: the key is gone, and the retry is taken.
    redis(&["DEL", &key]);
    let retry = b.post(&body(&t));
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert!(redis(&["GET", &key]).starts_with("$1\r\nt"), "taken for the window");
}

/// A Redis of the test's own on a free port (so that it can be stopped and started again).
struct OwnRedis {
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    /// On a port that was free a moment before; another one if someone took it meanwhile.
    fn start_on_a_free_port() -> OwnRedis {
        for _ in 0..5 {
            // Released just before redis-server binds it: the one unavoidable window.
            let port = dead_addr().port();
            if let Some(own) = OwnRedis::try_start(port) {
                return own;
            }
        }
        panic!("redis-server found no free port in 5 tries");
    }

    /// Again on `port` (after [`OwnRedis::stop`]): `None` if the port was taken meanwhile.
    fn try_start(port: u16) -> Option<OwnRedis> {
        // A name of its own to tell it from whatever else may listen there (nothing is saved).
        let name = format!("own-{}.rdb", fastrand_u64());
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dbfilename", &name])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is required (.ci/run installs it)");
        let up = std::time::Instant::now();
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return None; // could not bind
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                assert!(redis_at(port, &["CONFIG", "GET", "dbfilename"]).contains(&name), "another server on {port}");
                return Some(OwnRedis { port, child });
            }
            assert!(up.elapsed() < Duration::from_secs(10), "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_redis_that_goes_away_and_comes_back_never_refuses_a_webhook() {
    let own = OwnRedis::start_on_a_free_port();
    let port = own.port;
    let sink = Capture::start(200);
    let r = spooled(&format!("redis://127.0.0.1:{port}"), &sink);
    let errors = || r.metric("webio_router_dedup_store_errors_total");
    // Connected (in the background): the first webhooks go through Redis.
    crate::helpers::wait_until("connected to Redis", Duration::from_secs(20), || {
        r.log_text().contains("dedup store: connected to Redis")
    });
    assert_eq!(r.post(&body(&tag())).status, 202);
    assert_eq!(errors(), 0.0);

    own.stop();
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let a = r.post(&body(&tag()));
        assert_eq!(a.status, 202, "Redis down never refuses a webhook: {}", a.body);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "bounded waits: {:?}", started.elapsed());
    assert!(errors() >= 1.0);

    // Back: the window is shared again.
    let own = OwnRedis::try_start(port).unwrap_or_else(|| panic!("port {port} was taken while Redis was down"));
    let t = tag();
    crate::helpers::wait_until("the window shared again", Duration::from_secs(30), || {
        let a = r.post(&body(&format!("{t}-{}", fastrand_u64())));
        assert!(a.status == 202, "{}", a.body);
        let keys = redis_at(port, &["DBSIZE"]);
        keys.trim().trim_start_matches(':').parse::<u64>().unwrap_or(0) > 0
    });
    drop(own);
}

#[test]
fn a_redis_that_does_not_answer_costs_a_bounded_wait_and_never_refuses() {
    // Accepts connections, never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            h.lock().unwrap().push(conn);
        }
    });
    let sink = Capture::start(200);
    let r = spooled(&format!("redis://127.0.0.1:{port}"), &sink);
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let a = r.post(&body(&tag()));
        assert_eq!(a.status, 202, "{}", a.body);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "bounded waits: {:?}", started.elapsed());
    assert!(r.metric("webio_router_dedup_store_errors_total") >= 3.0);
}

/// One Redis command in RESP to 127.0.0.1:`port`, its raw answer.
fn redis_at(port: u16, args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `webio-router check` on `config` with `sink`'s routes: (exit code, stdout + stderr).
fn check(config: &str, sink: &Capture) -> (Option<i32>, String) {
    let (dir, cfg, _) = router(config, &routes(sink)).write();
    let out = std::process::Command::new(crate::helpers::bin())
        .args(["--config", cfg.to_str().unwrap(), "check"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn check_names_the_shared_window_without_its_password() {
    let sink = Capture::start(200);
    let (code, text) = check(&config("redis://:hunter2-secret@redis.example:6380/3"), &sink);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("shared through redis://:hidden@redis.example:6380/3"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// The local Redis behind TLS: a TLS-terminating proxy whose certificate (for 127.0.0.1 and
/// localhost) is signed by a CA of the test's own.
struct TlsRedis {
    proxy: crate::helpers::brokers::Proxy,
    ca: crate::helpers::tls::TestCa,
    _runtime: tokio::runtime::Runtime,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ca = crate::helpers::tls::TestCa::new();
        let proxy =
            runtime.block_on(crate::helpers::brokers::Proxy::start_tls(REDIS.parse().unwrap(), ca.server.clone()));
        TlsRedis { proxy, ca, _runtime: runtime }
    }

    fn url(&self) -> String {
        format!("rediss://{}", self.proxy.addr)
    }

    fn sessions(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.proxy.stats().sessions.load(SeqCst), self.proxy.stats().failed.load(SeqCst))
    }
}

#[test]
fn replicas_share_the_window_through_rediss_verified_against_a_private_ca() {
    assert!(redis(&["PING"]).starts_with("+PONG"), "Redis must run on {REDIS}");
    let tls = TlsRedis::start();
    let sink = Capture::start(200);
    let config = format!("{}dedup_store_ca_file = \"{}\"\n", config(&tls.url()), tls.ca.ca_file.display());
    let spawn = || router(&config, &routes(&sink)).env("WEBIO_ROUTER_DELIVERY__MODE", "spool").spawn();
    let (a, b) = (spawn(), spawn());
    for r in [&a, &b] {
        r.wait_log("dedup store: connected to Redis", Duration::from_secs(20));
    }
    let t = tag();
    let first = a.post(&body(&t));
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert!(redis(&["GET", &format!("webio-router:dedup:{id}")]).starts_with("$1\r\nt"), "set through TLS");
    let second = b.post(&body(&t));
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.json()["status"], "duplicate");
    let (sessions, failed) = tls.sessions();
    assert!(sessions >= 2, "both replicas talk to Redis through TLS: {sessions}");
    assert_eq!(failed, 0);
    assert_eq!(a.metric("webio_router_dedup_store_errors_total"), 0.0);
    assert_eq!(b.metric("webio_router_dedup_store_errors_total"), 0.0);
}

#[test]
fn a_rediss_store_whose_certificate_is_not_trusted_is_refused_and_never_refuses_a_webhook() {
    let tls = TlsRedis::start();
    let sink = Capture::start(200);
    // No dedup_store_ca_file: the public roots do not know the test's CA.
    let r = spooled(&tls.url(), &sink);
    r.wait_log("dedup store: Redis is unavailable", Duration::from_secs(20));
    let t = tag();
    let first = r.post(&body(&t));
    assert_eq!(first.status, 202, "{}", first.body);
    let again = r.post(&body(&t));
    assert_eq!(again.json()["status"], "duplicate", "the local window answers: {}", again.body);
    let (sessions, failed) = tls.sessions();
    assert_eq!(sessions, 0, "no session with an untrusted server");
    assert!(failed > 0);
    assert!(r.metric("webio_router_dedup_store_errors_total") >= 1.0);
    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert!(redis(&["GET", &format!("webio-router:dedup:{id}")]).starts_with("$-1"), "nothing reached Redis");
}

#[test]
fn check_refuses_a_dedup_store_ca_file_without_rediss_and_one_that_is_not_pem() {
    let sink = Capture::start(200);
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    for (store, file, expected) in [
        ("redis://127.0.0.1:6379", dir.path().join("missing.pem"), "missing.pem"),
        ("rediss://127.0.0.1:6379", not_pem.clone(), "no PEM certificate"),
    ] {
        let (code, text) = check(&format!("{}dedup_store_ca_file = \"{}\"\n", config(store), file.display()), &sink);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("delivery.dedup_store_ca_file") && text.contains(expected), "{text}");
    }
    let tls = TlsRedis::start();
    let ca = tls.ca.ca_file.display();
    let (code, text) = check(&format!("{}dedup_store_ca_file = \"{ca}\"\n", config("redis://127.0.0.1:6379")), &sink);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("only used with a rediss:// URL"), "{text}");
}
