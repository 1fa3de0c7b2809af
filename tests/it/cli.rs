//! The command line (README "Command line"): `check`, `token`, `explain`, `test`,
//! `completions`, flags, exit codes and what the diagnostics say.

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
fn a_bad_token_ttl_says_what_to_write() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "token", "--ttl", "forever"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("expected number at 0"), "{stderr}");
    assert!(
        stderr.contains("forever") && stderr.contains("1h") && stderr.contains("0 for a token without"),
        "{stderr}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_a_command_quietly_not_with_a_panic() {
    let (dir, cfg, _) = router("", ROUTES).write();
    // `completions bash | head -1` and `explain … | head -1`: the reader closes its end early.
    let fixture = fixtures().join("webio/legacy-message-send.json");
    for args in
        [vec!["--config", cfg.to_str().unwrap(), "explain", fixture.to_str().unwrap()], vec!["completions", "bash"]]
    {
        let mut child = Command::new(bin())
            .args(&args)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
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

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn test_runs_the_repositorys_own_routes_test_file_and_exits_0() {
    let out = run(&repo(), &["--config", "webio-router.toml", "test", "routes.test.toml"], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.lines().filter(|l| l.starts_with("ok ")).count() >= 4, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("0 failed"), "{stdout}");
}

const CASES: &str = r#"
[[cases]]
name = "inbound goes to the CRM and the archive"
payload = '{"type":"inboundMessage","conversationId":"1"}'
routes = ["inbound-to-crm", "everything"]
sinks = ["archive", "crm"]

[[cases]]
name = "a payment goes to the archive"
payload = { type = "payment" }
routes = ["everything"]
sinks = ["archive"]
"#;

#[test]
fn test_exits_0_when_every_case_holds() {
    let (dir, cfg, _) = router("", ROUTES).write();
    std::fs::write(dir.path().join("cases.toml"), CASES).unwrap();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "test", "cases.toml"], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("ok    cases.toml:3: inbound goes to the CRM and the archive"), "{stdout}");
    assert!(stdout.contains("ok    cases.toml:9: a payment goes to the archive"), "{stdout}");
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
}

#[test]
fn test_exits_1_naming_the_failing_case_with_expected_and_actual() {
    let (dir, cfg, _) = router("", ROUTES).write();
    let wrong = CASES.replace(r#"routes = ["everything"]"#, r#"routes = ["inbound-to-crm", "everything"]"#);
    std::fs::write(dir.path().join("cases.toml"), CASES).unwrap();
    std::fs::write(dir.path().join("wrong.toml"), wrong).unwrap();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "test", "cases.toml", "wrong.toml"], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("FAIL  wrong.toml:9: a payment goes to the archive"), "{stdout}");
    assert!(stdout.contains(r#"routes: expected ["inbound-to-crm","everything"], actual ["everything"]"#), "{stdout}");
    assert!(stdout.contains("ok    wrong.toml:3: inbound goes to the CRM and the archive"), "{stdout}");
    assert!(stdout.contains("3 passed, 1 failed"), "{stdout}");
}

#[test]
fn test_exits_2_on_a_bad_file_with_its_position_and_runs_nothing() {
    let (dir, cfg, _) = router("", ROUTES).write();
    std::fs::write(dir.path().join("cases.toml"), CASES).unwrap();
    let bad = CASES.replace(r#"routes = ["everything"]"#, r#"routes = ["everythin"]"#);
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "test", "cases.toml", "bad.toml"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml:11:10: "), "{stderr}");
    assert!(stderr.contains(r#"did you mean "everything"?"#), "{stderr}");
    assert!(!text(&out.stdout).contains("ok "), "no case runs when a file is bad: {}", text(&out.stdout));
    // A file that cannot be read, and no file at all.
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "test", "missing.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("missing.toml"), "{}", text(&out.stderr));
    assert_eq!(run(dir.path(), &["--config", cfg.to_str().unwrap(), "test"], &[]).status.code(), Some(2));
}

#[test]
fn test_and_explain_need_no_secret() {
    // A routes file's own CI has no JWT secret: only the routes are loaded.
    let (dir, _, _) = router("", ROUTES).write();
    std::fs::remove_file(dir.path().join("webio-router.toml")).unwrap();
    std::fs::write(dir.path().join("cases.toml"), CASES).unwrap();
    let out = run(dir.path(), &["--routes", "routes.toml", "test", "cases.toml"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let fixture = fixtures().join("webio/legacy-message-send.json");
    let out = run(dir.path(), &["--routes", "routes.toml", "explain", fixture.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // check still requires one.
    assert_eq!(run(dir.path(), &["--routes", "routes.toml", "check"], &[]).status.code(), Some(2));
}

#[test]
fn explain_takes_the_organisation_from_org() {
    let routes =
        format!("{ROUTES}\n[[routes]]\nname = \"org-77\"\nwhen = {{ organisationId = \"77\" }}\nto = [\"crm\"]\n");
    let (dir, cfg, _) = router("", &routes).write();
    let fixture = fixtures().join("webio/current-message-send.json");
    let explain = |extra: &[&str]| {
        let mut args = vec!["--config", cfg.to_str().unwrap(), "explain", fixture.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run(dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = explain(&["--org", "77"]);
    assert_eq!(v["event"]["organisationId"], "77");
    assert_eq!(v["routes"], serde_json::json!(["everything", "org-77"]));
    let v = explain(&[]);
    assert_eq!(v["event"]["organisationId"], serde_json::Value::Null);
    assert_eq!(v["routes"], serde_json::json!(["everything"]));
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        // No configuration is needed (nor read: this directory has none, and a broken one
        // must not stop completions either).
        std::fs::write(dir.path().join("webio-router.toml"), "broken = [").unwrap();
        let out = run(dir.path(), &["completions", shell], &[]);
        let script = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        for word in ["webio-router", "explain", "test", "completions", "config", "org"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
    // The bash script is valid bash.
    let out = run(dir.path(), &["completions", "bash"], &[]);
    let path = dir.path().join("completion.bash");
    std::fs::write(&path, &out.stdout).unwrap();
    let status = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(status.success(), "bash -n rejects the completion script");
    assert_eq!(run(dir.path(), &["completions", "tcsh"], &[]).status.code(), Some(2));
}

#[test]
fn every_file_argument_has_help_text() {
    let dir = tempfile::tempdir().unwrap();
    for (cmd, help) in [
        ("explain", "A Webio webhook body"),
        ("test", "Test files"),
        ("replay", "A dead-letter file"),
        ("completions", "The shell"),
    ] {
        let out = run(dir.path(), &[cmd, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "{cmd}");
        assert!(text(&out.stdout).contains(help), "{cmd} --help:\n{}", text(&out.stdout));
    }
}

#[test]
fn check_prints_configuration_values_as_they_are_written() {
    let routes =
        "[sinks.ce]\ntype = \"file\"\npath = \"{dir}/ce.jsonl\"\nformat = \"cloudevents\"\n[[routes]]\nto = \"ce\"\n";
    let (dir, cfg, _) = router("", routes).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("delivery: direct,"), "{stdout}");
    assert!(stdout.contains("sink ce: file (format cloudevents)"), "{stdout}");
    assert!(!stdout.contains("Direct") && !stdout.contains("Cloudevents"), "{stdout}");
}

#[test]
fn a_startup_error_is_printed_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(
        dir.path(),
        &["--config", cfg.to_str().unwrap(), "serve"],
        &[("WEBIO_ROUTER_SERVER__LISTEN", &addr), ("WEBIO_ROUTER_ADMIN__LISTEN", "127.0.0.1:0")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches(&format!("cannot listen on {addr}")).count(), 1, "{stderr}");
}

#[test]
fn config_diagnostics_point_at_the_offending_key_and_say_what_to_write() {
    let base = format!("routes_file = \"{{dir}}/routes.toml\"\n[auth]\nsecrets = [\"{SECRET}\"]\n");
    let (dir, cfg, _) = router(&format!("{base}[server]\nlisen = \"x\"\n"), ROUTES).write();
    let c = cfg.to_str().unwrap();
    let out = run(dir.path(), &["--config", c, "check"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = std::fs::read_to_string(&cfg).unwrap().lines().position(|l| l.starts_with("lisen")).unwrap() + 1;
    assert!(stderr.contains(&format!("{c}:{line}:1: unknown key `lisen`: did you mean `listen`?")), "{stderr}");

    let (dir, cfg, _) = router(&format!("{base}[delivery]\nretry_max = 30\n"), ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stderr = text(&out.stderr);
    let line = std::fs::read_to_string(&cfg).unwrap().lines().position(|l| l == "retry_max = 30").unwrap() + 1;
    assert!(stderr.contains(&format!(":{line}:13: ")), "{stderr}");
    assert!(stderr.contains(r#"write "30s""#), "{stderr}");

    let (dir, cfg, _) = router("", ROUTES).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[("WEBIO_ROUTER_SERVER__LISEN", "1")]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown key `lisen`: did you mean `listen`?"), "{stderr}");
    assert!(!stderr.contains("``") && !stderr.contains("`one of"), "garbled backquotes: {stderr}");
    let out = run(
        dir.path(),
        &["--config", cfg.to_str().unwrap(), "check"],
        &[("WEBIO_ROUTER_AUTH__SECRET_FILES", r#"["/a""#)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("does not parse"), "{}", text(&out.stderr));
}

#[test]
fn routes_diagnostics_point_at_the_offending_line() {
    let routes = r#"[sinks.a]
type = "file"
path = "{dir}/a.jsonl"
fsyn = true

[sinks.b]
type = "fil"
path = "x"

[sinks.k]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "t"
[sinks.k.properties]
"compression.type" = "lz5"
"no.such.property" = 1

[[routes]]
when = { statuscode = 3 }
to = ["a"]
"#;
    let (dir, cfg, _) = router("", routes).write();
    let out = run(dir.path(), &["--config", cfg.to_str().unwrap(), "check"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = dir.path().join("routes.toml").display().to_string();
    for (line, words) in [
        (4, "did you mean `fsync`?"),
        (7, r#"did you mean "file"?"#),
        (15, "compression.type"),
        (16, "no.such.property"),
        (19, r#"did you mean "statusCode"?"#),
    ] {
        let found = stderr.lines().any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(words));
        assert!(found, "line {line} with {words:?} missing:\n{stderr}");
    }
}

/// The `webio-router.toml: |` and `routes.toml: |` blocks of the ConfigMap.
fn configmap_file(name: &str) -> String {
    let configmap = std::fs::read_to_string(repo().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let mut block = String::new();
    for line in configmap.lines().skip_while(|l| l.trim() != format!("{name}: |")).skip(1) {
        if !line.trim().is_empty() && !line.starts_with("    ") {
            break;
        }
        block.push_str(line.strip_prefix("    ").unwrap_or(""));
        block.push('\n');
    }
    assert!(!block.trim().is_empty(), "no {name} in the ConfigMap");
    block
}

#[test]
fn the_shipped_configurations_pass_check_with_the_secret_as_their_service_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    // systemd: the unit hands the secret over as a credential and points
    // auth.secret_files at it (Environment= in the unit, with %d its credentials directory).
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/webio-router.service")).unwrap();
    assert!(unit.contains(r#"Environment='WEBIO_ROUTER_AUTH__SECRET_FILES=["%d/jwt-secret"]'"#));
    let secret_files = format!(r#"["{}"]"#, secret.display());
    let out = run(
        &repo(),
        &["--config", "deploy/systemd/webio-router.toml", "--routes", "deploy/systemd/routes.toml", "check"],
        &[("WEBIO_ROUTER_AUTH__SECRET_FILES", &secret_files)],
    );
    assert_eq!(out.status.code(), Some(0), "systemd: {}", text(&out.stderr));
    // Run by root on the host without the unit's environment, check reads the file systemd
    // hands over: /etc/webio-router/jwt-secret (absent on a test machine: named in the error).
    let out = run(
        &repo(),
        &["--config", "deploy/systemd/webio-router.toml", "--routes", "deploy/systemd/routes.toml", "check"],
        &[],
    );
    assert!(text(&out.stderr).contains("/etc/webio-router/jwt-secret"), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("no secret configured"), "{}", text(&out.stderr));

    // Kubernetes: the pod's environment names the mounted Secret (deployment.yaml).
    std::fs::write(dir.path().join("webio-router.toml"), configmap_file("webio-router.toml")).unwrap();
    std::fs::write(dir.path().join("routes.toml"), configmap_file("routes.toml")).unwrap();
    let deployment = std::fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml")).unwrap();
    assert!(deployment.contains("WEBIO_ROUTER_AUTH__SECRET_FILES"));
    let out = run(
        dir.path(),
        &["--config", "webio-router.toml", "--routes", "routes.toml", "check"],
        &[("WEBIO_ROUTER_AUTH__SECRET_FILES", &secret_files)],
    );
    assert_eq!(out.status.code(), Some(0), "kubernetes: {}", text(&out.stderr));
    // The stand-in the ConfigMap's comment gives for checking a change before applying it.
    let configmap = std::fs::read_to_string(repo().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let stand_in = configmap
        .lines()
        .find_map(|l| l.trim_start_matches(['#', ' ']).strip_prefix("WEBIO_ROUTER_AUTH__SECRETS='"))
        .and_then(|rest| rest.split('\'').next())
        .expect("the ConfigMap documents a stand-in secret");
    let out = run(
        dir.path(),
        &["--config", "webio-router.toml", "--routes", "routes.toml", "check"],
        &[("WEBIO_ROUTER_AUTH__SECRETS", stand_in)],
    );
    assert_eq!(out.status.code(), Some(0), "kubernetes, stand-in secret: {}", text(&out.stderr));
}

#[test]
fn the_systemd_units_reload_runs_check_before_the_signal() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/webio-router.service")).unwrap();
    let reloads: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("ExecReload=")).collect();
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert!(reloads[0].starts_with("/usr/bin/webio-router ") && reloads[0].ends_with(" check"), "{reloads:?}");
    let exec_start = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert_eq!(
        reloads[0].trim_end_matches(" check"),
        exec_start.trim_end_matches(" serve"),
        "check reads what serve reads"
    );
    assert!(reloads[1].contains("kill -HUP $MAINPID"), "{reloads:?}");
}
