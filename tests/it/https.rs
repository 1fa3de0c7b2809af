//! HTTPS on the webhook listener (README "Operating it", issue 12): `server.tls_cert_file` and
//! `server.tls_key_file` make the listener speak HTTPS only; the certificate is re-read on
//! SIGHUP (a bad one is refused and the old one stays); `check` refuses files that do not
//! belong together; half-open handshakes are shed like silent sockets.

use crate::helpers::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ARCHIVE: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"

[[routes]]
name = "everything"
to = ["archive"]
"#;

/// `[server]` with the certificate and key in `dir` (relative names: the real binary runs in
/// its temp dir; absolute ones for the in-process app, whose temp dir is its own).
fn tls_config(dir: &Path) -> String {
    format!(
        "[server]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
}

/// A CA of the test's own, and the trust store of a client that trusts only it.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    client: Arc<rustls::ClientConfig>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "webio-router https test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(issuer.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(webio_router::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ca { issuer, client: Arc::new(client) }
    }

    /// Writes a certificate for `localhost` and `127.0.0.1` named `cn` (and its key) to
    /// `dir/cert.pem` and `dir/key.pem`; returns the certificate.
    fn issue_into(&self, dir: &Path, cn: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A TLS connection to `addr` that checks the server's certificate against this CA. Like
    /// a real client, it offers to resume the session of its last connection.
    fn connect(&self, addr: SocketAddr) -> Https {
        Https::connect(addr, self.client.clone())
    }

    /// A TLS connection that does not offer to resume a session: a full handshake.
    fn connect_anew(&self, addr: SocketAddr) -> Https {
        let mut client = (*self.client).clone();
        client.resumption = rustls::client::Resumption::disabled();
        Https::connect(addr, Arc::new(client))
    }
}

/// A client's HTTPS connection (kept alive between requests).
struct Https(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl Https {
    fn connect(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> Https {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let conn = rustls::ClientConnection::new(client, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        Https(tls)
    }

    /// The certificate the server presented.
    fn served(&self) -> CertificateDer<'static> {
        self.0.conn.peer_certificates().expect("a certificate")[0].clone().into_owned()
    }

    /// POSTs a webhook with a valid token and reads the answer (by its content-length).
    fn post(&mut self, body: &[u8]) -> Response {
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: localhost\r\nx-webio-token: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            token(),
            body.len()
        );
        self.0.write_all(head.as_bytes()).unwrap();
        self.0.write_all(body).unwrap();
        self.0.flush().unwrap();
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            assert_eq!(self.0.read(&mut byte).expect("an answer"), 1, "closed mid-answer: {raw:?}");
            raw.push(byte[0]);
        }
        let head = parse_response(&raw);
        let len: usize = head.header("content-length").expect("content-length").parse().unwrap();
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).unwrap();
        raw.extend_from_slice(&body);
        parse_response(&raw)
    }
}

fn payload(n: u32) -> Vec<u8> {
    format!(r#"{{"type":"payment","conversationId":"c-{n}"}}"#).into_bytes()
}

#[test]
fn a_post_over_https_is_accepted_and_the_admin_listener_stays_plain_http() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let issued = ca.issue_into(certs.path(), "webio-router");
    let app = spawn_app(&tls_config(certs.path()), ARCHIVE);

    let mut https = ca.connect(app.addr);
    assert_eq!(https.served(), issued);
    let r = https.post(&payload(1));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(https.post(&payload(2)).status, 202, "a second request on the same connection");
    wait_until("both events archived", Duration::from_secs(10), || app.jsonl("var/events.jsonl").len() == 2);

    assert_eq!(get(app.admin, "/healthz").status, 200, "the admin listener speaks plain HTTP");
}

#[test]
fn plain_http_to_the_tls_listener_is_refused_and_told_to_use_https() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    ca.issue_into(certs.path(), "webio-router");
    let app = spawn_app(&tls_config(certs.path()), ARCHIVE);

    let r = post(app.addr, &payload(1));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("HTTPS"), "{}", r.body);
    // Something that is neither HTTP nor TLS is just closed.
    let mut s = TcpStream::connect(app.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"\x00\x01\x02garbage\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{answer:?}");

    assert_eq!(ca.connect(app.addr).post(&payload(2)).status, 202, "HTTPS still works");
    wait_until("the HTTPS event archived", Duration::from_secs(10), || !app.jsonl("var/events.jsonl").is_empty());
    assert_eq!(app.jsonl("var/events.jsonl").len(), 1, "the plain request was not taken");
}

#[test]
fn a_renewed_certificate_is_served_after_sighup_and_open_connections_keep_theirs() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let old = ca.issue_into(dir.path(), "webio-router 2024");
    let r = router(&tls_config(Path::new(".")), ARCHIVE).in_dir(dir).spawn();
    r.wait_log("webhook listener speaks HTTPS only", Duration::from_secs(10));

    let mut open = ca.connect(r.addr);
    assert_eq!(open.served(), old);
    assert_eq!(open.post(&payload(1)).status, 202);

    let renewed = ca.issue_into(r.dir.path(), "webio-router 2025");
    assert_ne!(renewed, old);
    assert_eq!(ca.connect_anew(r.addr).served(), old, "the new files are not read before SIGHUP");
    r.signal("HUP");
    r.wait_log("webhook TLS certificate in force", Duration::from_secs(10));

    // Offering to resume a session of the old certificate, as real clients do.
    let mut fresh = ca.connect(r.addr);
    assert_eq!(fresh.served(), renewed, "new connections get the renewed certificate");
    assert_eq!(fresh.post(&payload(2)).status, 202);
    assert_eq!(open.post(&payload(3)).status, 202, "the connection opened before the reload is not cut");
    assert_eq!(r.metric("webio_router_config_reloads_total{outcome=\"ok\"}"), 1.0);
    assert!(r.log_text().contains("changed=true"), "{}", r.log_text());
}

#[test]
fn a_bad_certificate_on_sighup_is_refused_and_the_old_one_is_still_served() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let old = ca.issue_into(dir.path(), "webio-router 2024");
    let mut r = router(&tls_config(Path::new(".")), ARCHIVE).in_dir(dir).spawn();
    r.wait_log("webhook listener speaks HTTPS only", Duration::from_secs(10));

    // A renewal gone wrong: the new certificate with the old key.
    let old_key = std::fs::read_to_string(r.path("key.pem")).unwrap();
    ca.issue_into(r.dir.path(), "webio-router 2025");
    std::fs::write(r.path("key.pem"), &old_key).unwrap();
    r.signal("HUP");
    r.wait_log("reload refused", Duration::from_secs(10));
    let log = r.log_text();
    assert!(log.contains("does not match the certificate"), "{log}");
    let key_lines: Vec<&str> = old_key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(key_lines.iter().all(|l| !log.contains(l)), "the key leaked into the log");
    assert_eq!(r.metric("webio_router_config_reloads_total{outcome=\"error\"}"), 1.0);
    assert!(r.child.try_wait().unwrap().is_none(), "the daemon keeps running");

    let mut https = ca.connect_anew(r.addr);
    assert_eq!(https.served(), old, "the old certificate stays in force");
    assert_eq!(https.post(&payload(1)).status, 202);

    // An empty certificate file: refused too.
    std::fs::write(r.path("cert.pem"), "").unwrap();
    r.signal("HUP");
    wait_until("the second reload refused", Duration::from_secs(10), || {
        r.metric("webio_router_config_reloads_total{outcome=\"error\"}") == 2.0
    });
    assert_eq!(ca.connect_anew(r.addr).served(), old);
}

impl Https {
    /// Sends `bytes`, then reads until the server closes the connection: what it answered,
    /// and how long it took to close.
    fn send_and_wait_for_close(&mut self, bytes: &[u8]) -> (String, Duration) {
        let started = Instant::now();
        self.0.write_all(bytes).unwrap();
        self.0.flush().unwrap();
        let mut answer = Vec::new();
        // A close without close_notify is an error here; what came before it is kept.
        let _ = self.0.read_to_end(&mut answer);
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    }
}

/// Well past the 1 s request timeout of the test, well below the test's patience.
const CUT_WITHIN: Duration = Duration::from_secs(8);

#[test]
fn slow_https_clients_are_cut_off_by_the_request_timeout_at_every_step() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    ca.issue_into(certs.path(), "webio-router");
    let config = tls_config(certs.path()).replace("[server]", "[server]\nrequest_timeout = \"1s\"");
    let app = spawn_app(&config, ARCHIVE);

    // Connected, nothing sent: not even a handshake.
    let mut tcp = TcpStream::connect(app.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let _ = tcp.read_to_end(&mut Vec::new());
    assert!(started.elapsed() < CUT_WITHIN, "a silent socket was kept {:?}", started.elapsed());

    // Half a handshake.
    let mut tcp = TcpStream::connect(app.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(HALF_HELLO).unwrap();
    let started = Instant::now();
    let _ = tcp.read_to_end(&mut Vec::new());
    assert!(started.elapsed() < CUT_WITHIN, "a half handshake was kept {:?}", started.elapsed());

    // Handshake done, nothing after it.
    let (answer, took) = ca.connect_anew(app.addr).send_and_wait_for_close(b"");
    assert!(took < CUT_WITHIN && answer.is_empty(), "{took:?} {answer:?}");

    // Part of a head: 408.
    let (answer, took) =
        ca.connect_anew(app.addr).send_and_wait_for_close(b"POST /webhooks/webio HTTP/1.1\r\nhost: a\r\n");
    assert!(took < CUT_WITHIN, "{took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // A whole head and part of the body: 408 from the handler's body timeout.
    let t = token();
    let head =
        format!("POST {PATH} HTTP/1.1\r\nhost: a\r\nx-webio-token: {t}\r\ncontent-length: 100\r\n\r\n{{\"type\"");
    let (answer, took) = ca.connect_anew(app.addr).send_and_wait_for_close(head.as_bytes());
    assert!(took < CUT_WITHIN, "{took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // A head that hyper takes over unfinished (larger than the pre-read): hyper's own
    // header timeout.
    let big = format!("POST {PATH} HTTP/1.1\r\nx-big: {}", "a".repeat(9000));
    let (_, took) = ca.connect_anew(app.addr).send_and_wait_for_close(big.as_bytes());
    assert!(took < CUT_WITHIN, "{took:?}");

    assert_eq!(ca.connect(app.addr).post(&payload(1)).status, 202, "a prompt client is served");
}

/// Runs `check` on `config`, with the certificate files of `dir`: exit code, stdout and stderr.
fn check(dir: &Path, config: &str) -> (i32, String, String) {
    let cfg = dir.join("webio-router.toml");
    std::fs::write(&cfg, format!("{BASE_CONFIG}\n{config}").replace("{dir}", &dir.display().to_string())).unwrap();
    std::fs::write(dir.join("routes.toml"), ARCHIVE.replace("{dir}", &dir.display().to_string())).unwrap();
    let out = std::process::Command::new(bin()).arg("--config").arg(&cfg).arg("check").output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_refuses_a_key_that_does_not_match_the_certificate_and_one_file_without_the_other() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca.issue_into(d, "webio-router");
    let (code, out, err) = check(d, &tls_config(d));
    assert_eq!(code, 0, "a matching pair passes: {err}");
    assert!(out.contains("webhooks: POST https://"), "{out}");

    let key = std::fs::read_to_string(d.join("key.pem")).unwrap();
    ca.issue_into(d, "webio-router");
    std::fs::write(d.join("key.pem"), &key).unwrap();
    let (code, _, err) = check(d, &tls_config(d));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.tls_key_file") && err.contains("does not match the certificate"), "{err}");
    assert!(key.lines().filter(|l| !l.starts_with("-----")).all(|l| !err.contains(l)), "the key leaked: {err}");

    let only_cert = format!("[server]\ntls_cert_file = \"{}\"\n", d.join("cert.pem").display());
    let (code, _, err) = check(d, &only_cert);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.tls_key_file: not set"), "{err}");
}

/// Hard descriptor limit of the daemon in the flood test: its connection bound is a few
/// hundred (the limit less its reserve), so a small flood reaches it.
const NOFILE: u64 = 512;

/// The real binary with a low descriptor limit (`RouterBuilder` has no hook for that).
fn router_with_nofile(config: &str, routes: &str, nofile: u64) -> Router {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let (dir, cfg, _) = router(config, routes).write();
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("--config")
        .arg(&cfg)
        .arg("serve")
        .current_dir(dir.path())
        .env("WEBIO_ROUTER_SERVER__LISTEN", "127.0.0.1:0")
        .env("WEBIO_ROUTER_ADMIN__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only an async-signal-safe system call between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn webio-router");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, ready) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("webio-router ready") {
                let _ = tx.send(line.clone());
            }
            l.lock().unwrap().push(line);
        }
    });
    let process = Started { child, dir, log, ready };
    let line = process.ready.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("not ready"));
    let (addr, admin) = (ready_addr(&line, "webhook").unwrap(), ready_addr(&line, "admin").unwrap());
    Router { process, addr, admin }
}

/// The first bytes of a TLS ClientHello (a handshake record header and the start of its
/// body), and then nothing: a handshake that never completes.
const HALF_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

#[test]
fn a_flood_of_half_open_tls_handshakes_does_not_keep_webhooks_out() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.issue_into(dir.path(), "webio-router");
    let config = tls_config(dir.path()).replace("[server]", "[server]\nrequest_timeout = \"60s\"");
    let r = router_with_nofile(&config, ARCHIVE, NOFILE);
    crate::helpers::process::raise_nofile();

    // More half-open handshakes than the daemon may hold open: each is accepted, and then
    // waits for the rest of its ClientHello for a minute (the header timeout).
    let mut flood = Vec::new();
    for _ in 0..NOFILE as usize {
        let Ok(mut s) = TcpStream::connect_timeout(&r.addr, Duration::from_secs(5)) else { continue };
        if s.write_all(HALF_HELLO).is_ok() {
            flood.push(s);
        }
    }
    assert!(flood.len() as u64 > NOFILE / 2, "the flood did not get through: {}", flood.len());
    wait_until("connections shed to make room", Duration::from_secs(10), || {
        r.metric("webio_router_connections_shed_total{state=\"no_request\"}") > 0.0
    });

    for n in 0..5 {
        let started = Instant::now();
        let status = ca.connect(r.addr).post(&payload(n)).status;
        assert_eq!(status, 202);
        assert!(started.elapsed() < Duration::from_secs(3), "webhook {n} took {:?}", started.elapsed());
    }
    assert_eq!(r.metric("webio_router_connections_shed_total{state=\"new\"}"), 0.0, "a webhook was refused");
    drop(flood);
}

#[test]
fn failed_tls_handshakes_are_counted_and_the_first_of_a_minute_is_logged_as_a_warning() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.issue_into(dir.path(), "webio-router");
    let r = router(&tls_config(dir.path()), ARCHIVE).spawn();
    assert_eq!(r.metric("webio_router_tls_handshake_failures_total"), 0.0);

    // A handshake record that is not a ClientHello rustls can parse: the handshake fails.
    for _ in 0..3 {
        let mut s = TcpStream::connect(r.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o']).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
    wait_until("three failed handshakes counted", Duration::from_secs(10), || {
        r.metric("webio_router_tls_handshake_failures_total") == 3.0
    });
    let log = r.log_text();
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("TLS handshake failed")).count();
    assert_eq!(warnings, 1, "one warning a minute, not one per failure:\n{log}");

    assert_eq!(ca.connect(r.addr).post(&payload(1)).status, 202, "HTTPS still works");
}
