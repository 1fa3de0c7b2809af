//! The command line of SPEC §2: `check`, `token`, `explain`, flags and exit codes.

use crate::helpers::*;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const ROUTES: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"

[sinks.crm]
type = "http"
url = "http://127.0.0.1:9/webio"

[[routes]]
name = "inbound-to-crm"
when = { type = ["inboundMessage"] }
to = ["crm"]

[[routes]]
name = "everything"
to = ["archive"]
"#;

#[test]
fn check_validates_a_good_configuration_prints_a_summary_and_exits_0() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for needle in ["sink archive: file", "sink crm: http", "route inbound-to-crm", "route everything", "ok"] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    assert!(!stdout.contains(SECRET), "check printed the secret");
}

#[test]
fn check_reports_routes_errors_as_file_line_col_and_exits_2() {
    let bad = r#"
[sinks.archive]
type = "file"
path = "{dir}/{nope}.jsonl"

[[routes]]
to = ["archive", "missing"]
"#;
    let (dir, cfg, _) = router("", bad).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let routes = dir.path().join("routes.toml").display().to_string();
    assert!(stderr.contains(&format!("{routes}:4:")), "template error at line 4:\n{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(stderr.contains(&format!("{routes}:7:")), "unknown sink at line 7:\n{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
}

#[test]
fn check_refuses_bad_configuration_with_exit_2() {
    let cases: &[(&str, &str)] = &[
        ("[auth]\nsecrets = [\"short\"]\n", "at least 32"),
        ("[auth]\nsecrets = []\n", "no secret"),
        ("[auth]\nsecrets = [\"test-secret-0123456789-0123456789-abcdef\"]\nalgorithms = [\"RS256\"]\n", "RS256"),
        ("[auth]\nsecrets = [\"test-secret-0123456789-0123456789-abcdef\"]\nsecret_files = [\"/nonexistent/secret\"]\n", "/nonexistent/secret"),
        ("[auth]\nsecrets = [\"test-secret-0123456789-0123456789-abcdef\"]\nbogus = 1\n", "bogus"),
        ("[auth]\nsecrets = [\"test-secret-0123456789-0123456789-abcdef\"]\n[server]\nrequest_timeout = \"soon\"\n", "soon"),
    ];
    for (config, needle) in cases {
        let (dir, cfg, _) = router(&format!("routes_file = \"{{dir}}/routes.toml\"\n{config}"), ROUTES).write();
        let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config}: {stderr}");
        assert!(stderr.contains(needle), "{config}: {needle} missing from {stderr}");
        assert!(!stderr.contains("test-secret-0123456789"), "a secret leaked: {stderr}");
    }
    // The same refusal stops `serve`.
    let (dir, cfg, _) = router("routes_file = \"{dir}/routes.toml\"\n[auth]\nsecrets = [\"short\"]\n", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "serve"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unknown_key_in_the_config_file_is_reported_with_its_line() {
    let (dir, cfg, _) = router("[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("lisen"), "{stderr}");
    assert!(stderr.contains(&format!("{}:", cfg.display())), "{stderr}");
}

#[test]
fn environment_variables_override_the_file_and_unknown_ones_are_refused() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let c = cfg.to_str().unwrap();
    let out = run(dir.path(), &["--config", c, "check"], &[("WEBIO_ROUTER_AUTH__ORGANISATION_ID", "42")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("organisation 42"));
    let out = run(dir.path(), &["--config", c, "check"], &[("WEBIO_ROUTER_AUTH__SECRETS", "[\"too-short\"]")]);
    assert_eq!(out.status.code(), Some(2), "env secrets override the file's");
    let out = run(dir.path(), &["--config", c, "check"], &[("WEBIO_ROUTER_SERVER__NOPE", "1")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));
}

#[test]
fn the_config_file_defaults_to_webio_router_toml_in_the_working_directory() {
    let (dir, _, _) = router("", ROUTES).write();
    let out = run(dir.path(), &["check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("webio-router.toml"));
    // Without any file, built-in defaults + environment apply (here: no secret → exit 2).
    let empty = tempfile::tempdir().unwrap();
    let out = run(empty.path(), &["check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // A --config that does not exist is an error, not a silent fallback.
    let out = run(empty.path(), &["--config", "nope.toml", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn routes_flag_overrides_routes_file() {
    let (dir, cfg, _) = router("", ROUTES).write();
    std::fs::write(
        dir.path().join("other.toml"),
        "[sinks.x]\ntype = \"file\"\npath = \"x.jsonl\"\n[[routes]]\nto = [\"x\"]\n",
    )
    .unwrap();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "--routes", "other.toml", "check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sink x: file"));
}

#[test]
fn token_prints_a_jwt_the_router_accepts() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "token", "--org", "1234", "--ttl", "10m"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.required_spec_claims = ["exp".to_owned()].into();
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["organisationId"], "1234");
    let exp = data.claims["exp"].as_i64().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now + 500..=now + 700).contains(&exp), "ttl 10m");

    // And the router takes it.
    let r = router("", ROUTES).spawn();
    let resp = request(r.addr, "POST", PATH, &[("x-webio-token", &token)], br#"{"type":"payment"}"#);
    assert_eq!(resp.status, 202, "{}", resp.body);

    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "token", "--ttl", "forever"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn explain_prints_the_normalised_event_and_its_routes_and_sends_nothing() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let fixture = fixtures().join("webio/legacy-message-send.json");
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "explain", fixture.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["type"], "messageSend");
    assert_eq!(v["event"]["shape"], "legacy");
    assert_eq!(v["routes"], serde_json::json!(["everything"]));
    assert_eq!(v["sinks"][0]["name"], "archive");
    assert!(!dir.path().join("events.jsonl").exists(), "explain sent nothing");

    // From stdin.
    let mut child = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "explain", "-"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"type":"inboundMessage","conversationId":7}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["conversationId"], "7");
    assert_eq!(v["routes"], serde_json::json!(["inbound-to-crm", "everything"]));

    // A body the router would refuse.
    let bad = fixtures().join("bad/missing-type.json");
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "explain", bad.to_str().unwrap()], &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("type"));
}

#[test]
fn help_and_version_work_and_bad_usage_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    for cmd in ["serve", "check", "token", "explain"] {
        assert!(text(&out.stdout).contains(cmd), "{cmd} missing from --help");
    }
    let out = run(dir.path(), &["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(run(dir.path(), &["--bogus"], &[]).status.code(), Some(2));
    assert_eq!(run(dir.path(), &["frobnicate"], &[]).status.code(), Some(2));
}

#[test]
fn an_organisation_id_from_the_environment_is_taken_verbatim() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(
        dir.path(),
        &["--config", cfg.to_str().unwrap(), "check"],
        &[("WEBIO_ROUTER_AUTH__ORGANISATION_ID", "0042")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("organisation 0042"), "{}", text(&out.stdout));
}
