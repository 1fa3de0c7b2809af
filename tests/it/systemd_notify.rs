//! `Type=notify`: READY=1 is sent only once both listeners accept connections (with a
//! STATUS= line naming them), and STOPPING=1 on shutdown.

use crate::helpers::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The `STATUS=` line sent with READY=1 names the bound addresses.
fn status_addr(msg: &str, what: &str) -> std::net::SocketAddr {
    let status = msg.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("no STATUS in {msg}"));
    let after = status.split(&format!("{what} on ")).nth(1).unwrap_or_else(|| panic!("no {what} in {status}"));
    after.split(|c: char| c == ',' || c.is_whitespace()).next().unwrap().parse().unwrap()
}

#[test]
fn ready_is_notified_after_the_listeners_are_bound_and_stopping_on_sigterm() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    // Not waiting for the log line: the notification alone must mean "ready".
    let mut r = router("", "[sinks.a]\ntype = \"file\"\npath = \"{dir}/a.jsonl\"\n[[routes]]\nto = [\"a\"]\n")
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .start();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // At the moment READY arrives, both listeners already answer and the daemon is ready.
    let (webhook, admin) = (status_addr(&msg, "webhooks"), status_addr(&msg, "admin"));
    assert_eq!(get(admin, "/readyz").status, 200);
    assert_eq!(post(webhook, br#"{"type":"payment"}"#).status, 202);

    r.signal("TERM");
    let n = sock.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(r.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", r.log_text());
}

#[test]
fn the_watchdog_is_pinged_when_systemd_asks_for_it() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // WATCHDOG_PID must name the process; without it sd-notify accepts any.
    let _r = router("", "[sinks.a]\ntype = \"file\"\npath = \"{dir}/a.jsonl\"\n[[routes]]\nto = [\"a\"]\n")
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "200000")
        .spawn();
    let mut buf = [0u8; 512];
    let mut saw = false;
    for _ in 0..10 {
        let n = sock.recv(&mut buf).expect("a notification");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            saw = true;
            break;
        }
    }
    assert!(saw, "no WATCHDOG=1 ping");
}
