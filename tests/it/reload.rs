//! SIGHUP re-reads the secrets as well as routes.toml (README "Operating it"): a secret rotated in its
//! file is in force without a restart; an invalid one is refused and the old ones stay.

use crate::helpers::*;
use std::time::Duration;

const ROUTES: &str = "[sinks.a]\ntype = \"file\"\npath = \"{dir}/a.jsonl\"\n[[routes]]\nto = [\"a\"]\n";

fn config() -> String {
    "routes_file = \"{dir}/routes.toml\"\n[auth]\nsecret_files = [\"{dir}/jwt-secret\"]\n[delivery]\nmode = \"direct\"\ndead_letter_file = \"{dir}/var/dead.jsonl\"\n".to_owned()
}

fn post_with(r: &Router, secret: &str, n: u32) -> u16 {
    let t = signed_token(secret, Some("42"));
    let body = format!(r#"{{"type":"payment","n":{n}}}"#);
    request(r.addr, "POST", PATH, &[("x-webio-token", &t)], body.as_bytes()).status
}

#[test]
fn a_secret_rotated_in_its_file_is_in_force_after_sighup_and_the_old_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt-secret"), format!("{SECRET}\n")).unwrap();
    let r = router(&config(), ROUTES).in_dir(dir).spawn();
    assert_eq!(post_with(&r, SECRET, 1), 202);
    assert_eq!(post_with(&r, SECRET2, 2), 401, "not yet rotated");

    std::fs::write(r.path("jwt-secret"), SECRET2).unwrap();
    r.signal("HUP");
    r.wait_log("configuration reloaded", Duration::from_secs(10));
    assert_eq!(post_with(&r, SECRET2, 3), 202, "the new secret is in force");
    assert_eq!(post_with(&r, SECRET, 4), 401, "the old secret is refused");
    assert_eq!(r.metric("webio_router_config_reloads_total{outcome=\"ok\"}"), 1.0);
}

#[test]
fn a_short_secret_on_sighup_is_refused_and_the_daemon_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt-secret"), SECRET).unwrap();
    let mut r = router(&config(), ROUTES).in_dir(dir).spawn();
    std::fs::write(r.path("jwt-secret"), "too-short").unwrap();
    r.signal("HUP");
    r.wait_log("reload refused", Duration::from_secs(10));
    assert!(!r.log_text().contains("too-short"), "the secret leaked into the log");
    assert_eq!(r.metric("webio_router_config_reloads_total{outcome=\"error\"}"), 1.0);
    assert!(r.child.try_wait().unwrap().is_none(), "the daemon keeps running");
    assert_eq!(post_with(&r, SECRET, 1), 202, "the old secret stays in force");
}
