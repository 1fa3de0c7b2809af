//! The HTTP sink against an endpoint that answers 2xx with a huge body (README "Delivery"): the
//! answer is read up to a small limit and discarded, so memory stays bounded, and every
//! event is confirmed.

use crate::helpers::spool::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ANSWER_BYTES: usize = 64 << 20;

/// Answers every request `200` with a 64 MiB body, sent as long as the client reads it:
/// every other connection announces its length, the others stream it chunked.
struct HugeAnswers {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
}

impl HugeAnswers {
    fn start() -> HugeAnswers {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                let r = r.clone();
                std::thread::spawn(move || answer_hugely(conn, &r, n % 2 == 0));
            }
        });
        HugeAnswers { port, received }
    }

    fn received(&self) -> BTreeSet<String> {
        self.received.lock().unwrap().iter().cloned().collect()
    }
}

fn answer_hugely(conn: TcpStream, received: &Mutex<Vec<String>>, chunked: bool) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    let zeros = vec![b'0'; 64 * 1024];
    // Keep-alive: a client that reads an answer whole sends its next request here.
    loop {
        let (mut len, mut id) = (0usize, None);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if let Some(v) = line.strip_prefix("x-webio-event-id:") {
                id = Some(v.trim().to_owned());
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        received.lock().unwrap().push(id.expect("x-webio-event-id"));
        let head = if chunked {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned()
        } else {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {ANSWER_BYTES}\r\n\r\n")
        };
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        for _ in 0..ANSWER_BYTES / zeros.len() {
            let sent = if chunked {
                conn.write_all(format!("{:x}\r\n", zeros.len()).as_bytes())
                    .and_then(|()| conn.write_all(&zeros))
                    .and_then(|()| conn.write_all(b"\r\n"))
            } else {
                conn.write_all(&zeros)
            };
            if sent.is_err() {
                // The client had read enough and closed the connection.
                return;
            }
        }
        if chunked && conn.write_all(b"0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// The peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

#[test]
fn answers_of_64_mb_are_not_read_whole_and_memory_stays_under_128_mib() {
    let endpoint = HugeAnswers::start();
    let routes = http_routes(&[("big", format!("http://127.0.0.1:{}/hook", endpoint.port))]);
    let setup = Setup::new(&routes, "");
    let router = setup.start();
    let n = 64;
    let ids: BTreeSet<String> = (0..n)
        .map(|i| {
            let a = router.post(&payload("huge-answer", i));
            assert_eq!(a.status, 202, "{}", a.body);
            a.id()
        })
        .collect();
    wait_for("every event confirmed", Duration::from_secs(60), || {
        router.metric(r#"webio_router_deliveries_total{sink="big",outcome="ok"}"#) == Some(n as f64)
    });
    assert_eq!(endpoint.received(), ids);
    assert_eq!(router.metric(r#"webio_router_spool_pending{sink="big"}"#), Some(0.0));
    let peak = peak_rss(router.child.id());
    assert!(peak < 128 << 20, "peak resident memory {} MiB", peak >> 20);
}
