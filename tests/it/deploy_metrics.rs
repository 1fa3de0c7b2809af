//! The deployment artefacts in `deploy/` stay in step with the daemon: the Prometheus rules
//! and the Grafana dashboard only use metrics the daemon exports, the systemd unit keeps the
//! properties README "Deployment" promises, and the example configurations use only known keys.
//!
//! The syntax of each artefact is checked by its own tool in `deploy/check.sh`
//! (promtool, yamllint, kubernetes-validate, systemd-analyze); this file checks what those
//! tools cannot know about.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use webio_router::metrics::{HISTOGRAMS, NAMES};

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/webio-router.json";
const UNIT: &str = "deploy/systemd/webio-router.service";
const SYSTEMD_CONFIG: &str = "deploy/systemd/webio-router.toml";
const CONFIGMAP: &str = "deploy/kubernetes/configmap.yaml";
const DEPLOYMENT: &str = "deploy/kubernetes/deployment.yaml";
const GATEWAY_CONFIGMAP: &str = "deploy/kubernetes/gateway/configmap.yaml";
const GATEWAY_STATEFULSET: &str = "deploy/kubernetes/gateway/statefulset.yaml";

fn repo_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn is_metric_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric a series name belongs to: `_bucket`, `_sum` and `_count` are removed only
/// when what is left is one of the exported histograms.
fn metric_of(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return base;
            }
        }
    }
    series
}

/// Every `webio_router_…` identifier in `text` (the whole identifier, so that a name with
/// a stray character is reported rather than silently cut short), with the text after it.
fn series_in(text: &str) -> Vec<(&str, &str)> {
    const PREFIX: &str = "webio_router_";
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let preceded_by_name_char = rest[..at].chars().next_back().is_some_and(is_metric_name_char);
        let tail = &rest[at..];
        let len = tail.find(|c: char| !is_metric_name_char(c)).unwrap_or(tail.len());
        if !preceded_by_name_char {
            found.push((&tail[..len], &tail[len..]));
        }
        rest = &tail[len..];
    }
    found
}

/// The metrics named in `text`.
fn metrics_in(text: &str, found: &mut BTreeSet<String>) {
    for (series, _) in series_in(text) {
        found.insert(metric_of(series).to_string());
    }
}

fn metrics_in_alerts() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    metrics_in(&repo_file(ALERTS), &mut found);
    found
}

/// Walks every key and string of the dashboard JSON (queries, variables, annotations).
fn collect_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                out.push(key.clone());
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

fn dashboard_strings() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"));
    let mut strings = Vec::new();
    collect_strings(&dashboard, &mut strings);
    strings
}

fn metrics_in_dashboard() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for s in dashboard_strings() {
        metrics_in(&s, &mut found);
    }
    found
}

fn not_exported(used: &BTreeSet<String>) -> Vec<&str> {
    used.iter().map(String::as_str).filter(|name| !NAMES.contains(name)).collect()
}

#[test]
fn every_metric_the_alerts_use_is_exported() {
    let used = metrics_in_alerts();
    for expected in [
        "webio_router_auth_failures_total",
        "webio_router_deliveries_total",
        "webio_router_spool_pending",
        "webio_router_sink_up",
        "webio_router_spool_write_errors_total",
        "webio_router_sink_paused",
        "webio_router_dedup_store_errors_total",
    ] {
        assert!(used.contains(expected), "{ALERTS} no longer alerts on {expected}");
    }
    let unknown = not_exported(&used);
    assert!(unknown.is_empty(), "{ALERTS} uses metrics the daemon does not export: {unknown:?}");
}

#[test]
fn every_metric_the_dashboard_uses_is_exported() {
    let used = metrics_in_dashboard();
    assert!(!used.is_empty(), "{DASHBOARD} queries no webio_router_ metric");
    let unknown = not_exported(&used);
    assert!(unknown.is_empty(), "{DASHBOARD} uses metrics the daemon does not export: {unknown:?}");
}

#[test]
fn every_exported_metric_is_on_the_dashboard() {
    let used = metrics_in_dashboard();
    let missing: Vec<&str> = NAMES.iter().copied().filter(|name| !used.contains(*name)).collect();
    assert!(missing.is_empty(), "{DASHBOARD} shows nothing of {missing:?}: add a panel");
}

#[test]
fn histogram_series_are_only_read_from_histograms() {
    // `_bucket` on a counter would be stripped by nothing and reported above; this makes
    // sure the suffix handling itself does what the other tests rely on.
    assert_eq!(metric_of("webio_router_request_duration_seconds_bucket"), "webio_router_request_duration_seconds");
    assert_eq!(metric_of("webio_router_requests_total_count"), "webio_router_requests_total_count");
    let mut found = BTreeSet::new();
    metrics_in("rate(x_webio_router_nope[5m]) + webio_router_sink_up2 + webio_router_sink_up", &mut found);
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(found, ["webio_router_sink_up", "webio_router_sink_up2"]);
}

/// The labels of each metric (README "Metrics", src/metrics.rs). Selectors may also filter on
/// the target labels Prometheus adds.
const LABELS: &[(&str, &[&str])] = &[
    ("webio_router_requests_total", &["status"]),
    ("webio_router_request_duration_seconds", &[]),
    ("webio_router_events_total", &["type", "shape"]),
    ("webio_router_auth_failures_total", &["reason"]),
    ("webio_router_auth_secret_used_total", &["index"]),
    ("webio_router_unrouted_total", &["type"]),
    ("webio_router_duplicates_total", &[]),
    ("webio_router_rejected_total", &["reason"]),
    ("webio_router_deliveries_total", &["sink", "outcome"]),
    ("webio_router_delivery_duration_seconds", &["sink"]),
    ("webio_router_spool_pending", &["sink"]),
    ("webio_router_spool_bytes", &[]),
    ("webio_router_spool_wal_bytes", &[]),
    ("webio_router_spool_flushes_total", &[]),
    ("webio_router_spool_appends_total", &[]),
    ("webio_router_spool_write_errors_total", &[]),
    ("webio_router_sink_up", &["sink"]),
    ("webio_router_sink_paused", &["sink"]),
    ("webio_router_build_info", &["version"]),
    ("webio_router_config_reloads_total", &["outcome"]),
    ("webio_router_custom_value_requests_total", &["outcome"]),
    ("webio_router_ingested_files_total", &["outcome"]),
    ("webio_router_connections_open", &[]),
    ("webio_router_connections_shed_total", &["state"]),
    ("webio_router_dedup_store_errors_total", &[]),
    ("webio_router_tls_handshake_failures_total", &[]),
];
const TARGET_LABELS: &[&str] = &["job", "instance", "namespace", "pod", "container", "service"];

/// The only values some labels take.
const VALUES: &[(&str, &str, &[&str])] = &[
    ("webio_router_deliveries_total", "outcome", &["ok", "retry", "dead"]),
    ("webio_router_config_reloads_total", "outcome", &["ok", "error"]),
    ("webio_router_custom_value_requests_total", "outcome", &["ok", "cached", "error", "timeout"]),
    ("webio_router_ingested_files_total", "outcome", &["ok", "rejected"]),
    (
        "webio_router_auth_failures_total",
        "reason",
        &["missing", "malformed", "bad_signature", "expired", "not_yet_valid", "algorithm", "organisation"],
    ),
    ("webio_router_events_total", "shape", &["legacy", "current"]),
    ("webio_router_connections_shed_total", "state", &["no_request", "idle", "new"]),
];

/// The `label op "value"` matchers of the selector at the start of `text`, if there is one.
fn matchers(text: &str) -> Vec<(String, String, String)> {
    let Some(inner) = text.strip_prefix('{') else { return Vec::new() };
    let mut chars = inner.chars().peekable();
    let mut found = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        if chars.next_if_eq(&'}').is_some() || chars.peek().is_none() {
            return found;
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut op = String::new();
        while let Some(c) = chars.next_if(|c| matches!(c, '=' | '!' | '~')) {
            op.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        assert!(chars.next_if_eq(&'"').is_some(), "cannot read the selector {text:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        found.push((name, op, value));
    }
}

#[test]
fn selector_matchers_are_read_with_their_operators() {
    let m = |n: &str, o: &str, v: &str| (n.to_string(), o.to_string(), v.to_string());
    assert_eq!(
        matchers(r#"{job=~"$job", outcome="dead",status!~"5..", x = "a\"b"}[5m])"#),
        [m("job", "=~", "$job"), m("outcome", "=", "dead"), m("status", "!~", "5.."), m("x", "=", "a\"b")]
    );
    assert!(matchers("[5m]").is_empty());
    assert!(matchers("{}").is_empty());
}

#[test]
fn selectors_in_the_alerts_and_dashboard_use_real_labels_and_values() {
    let mut texts = dashboard_strings();
    texts.push(repo_file(ALERTS));
    let mut checked = 0;
    for text in &texts {
        for (series, after) in series_in(text) {
            let metric = metric_of(series);
            let Some((_, labels)) = LABELS.iter().find(|(m, _)| *m == metric) else {
                panic!("{metric} is missing from LABELS in this test")
            };
            for (label, op, value) in matchers(after) {
                checked += 1;
                let known = labels.contains(&label.as_str())
                    || TARGET_LABELS.contains(&label.as_str())
                    || (label == "le" && series.ends_with("_bucket"));
                assert!(
                    known,
                    "{series} has no label {label:?}: {series}{}",
                    after.chars().take(80).collect::<String>()
                );
                let Some((_, _, allowed)) = VALUES.iter().find(|(m, l, _)| *m == metric && *l == label) else {
                    continue;
                };
                // An exact value, or a regex that is a plain alternation (a|b): each must exist.
                let plain = value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
                if op == "=" || (op == "=~" && plain) {
                    for v in value.split('|') {
                        assert!(allowed.contains(&v), "{metric}{{{label}}} is never {v:?}: it is one of {allowed:?}");
                    }
                }
            }
        }
    }
    assert!(checked > 0, "no label matcher found: the selector parsing is broken");
}

/// `Key=value` settings of one section of a systemd unit, comments and blank lines skipped.
fn unit_settings(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut in_section = false;
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
            continue;
        }
        if in_section {
            if let Some((key, value)) = line.split_once('=') {
                settings.push((key.trim().to_string(), value.trim().to_string()));
            }
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

#[test]
fn the_systemd_unit_is_a_notify_service_with_a_dynamic_user_state_and_a_credential() {
    let service = unit_settings(&repo_file(UNIT), "Service");
    assert_eq!(setting(&service, "Type"), ["notify"]);
    assert_eq!(setting(&service, "DynamicUser"), ["yes"]);
    assert_eq!(setting(&service, "StateDirectory"), ["webio-router"]);
    assert_eq!(setting(&service, "ConfigurationDirectory"), ["webio-router"]);
    assert_eq!(setting(&service, "LoadCredential"), ["jwt-secret:/etc/webio-router/jwt-secret"]);
    let environment = setting(&service, "Environment");
    assert!(
        environment.iter().any(|e| e.contains(r#"WEBIO_ROUTER_AUTH__SECRET_FILES=["%d/jwt-secret"]"#)),
        "the unit must point auth.secret_files at the credential: {environment:?}"
    );
    let exec_start = setting(&service, "ExecStart");
    assert_eq!(exec_start.len(), 1, "one ExecStart=");
    assert!(exec_start[0].ends_with(" serve"), "ExecStart= runs the daemon: {}", exec_start[0]);
    assert!(!setting(&service, "WatchdogSec").is_empty(), "the daemon pings the watchdog");
}

/// Seconds in a duration such as `20s`, `"45s"`, `2m` or `45`.
fn seconds(duration: &str) -> u64 {
    let d = duration.trim().trim_matches('"');
    let (number, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("not a duration: {duration:?}"));
    match unit {
        "" | "s" => n,
        "m" | "min" => n * 60,
        other => panic!("unexpected unit {other:?} in {duration:?}"),
    }
}

/// The value of the first `key = value` (TOML) or `key: value` (YAML) line.
fn value_of<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(str::trim)
        .find_map(|line| {
            let rest = line.strip_prefix(key)?.trim_start();
            rest.strip_prefix('=').or_else(|| rest.strip_prefix(':')).map(|v| v.split('#').next().unwrap().trim())
        })
        .unwrap_or_else(|| panic!("no {key} found"))
}

#[test]
fn systemd_and_kubernetes_wait_longer_than_the_shutdown_timeout() {
    let unit = unit_settings(&repo_file(UNIT), "Service");
    let stop = seconds(setting(&unit, "TimeoutStopSec")[0]);
    let shutdown = seconds(value_of(&repo_file(SYSTEMD_CONFIG), "shutdown_timeout"));
    assert!(stop > shutdown, "TimeoutStopSec={stop}s must exceed shutdown_timeout={shutdown}s");

    let grace = seconds(value_of(&repo_file(DEPLOYMENT), "terminationGracePeriodSeconds"));
    let shutdown = seconds(value_of(&repo_file(CONFIGMAP), "shutdown_timeout"));
    assert!(grace > shutdown, "terminationGracePeriodSeconds={grace} must exceed shutdown_timeout={shutdown}s");

    let grace = seconds(value_of(&repo_file(GATEWAY_STATEFULSET), "terminationGracePeriodSeconds"));
    let shutdown = seconds(value_of(&repo_file(GATEWAY_CONFIGMAP), "shutdown_timeout"));
    assert!(
        grace > shutdown,
        "gateway: terminationGracePeriodSeconds={grace} must exceed shutdown_timeout={shutdown}s"
    );
}

/// README "Configuration": every key the configuration file accepts, by table ("" = top level).
const CONFIG_KEYS: &[(&str, &[&str])] = &[
    ("", &["routes_file"]),
    ("server", &["listen", "path", "max_body_bytes", "request_timeout"]),
    ("admin", &["listen"]),
    (
        "auth",
        &[
            "header",
            "secrets",
            "secret_files",
            "algorithms",
            "organisation_id",
            "organisation_claim",
            "leeway",
            "disabled",
        ],
    ),
    ("normalise", &["source_timezone", "legacy_send_status_codes"]),
    (
        "delivery",
        &[
            "mode",
            "spool_dir",
            "max_spool_bytes",
            "retry_initial",
            "retry_max",
            "max_attempts",
            "dead_letter_file",
            "dedup_window",
            "dedup_store",
            "shutdown_timeout",
            "drain_on_shutdown",
        ],
    ),
    ("log", &["format", "level"]),
];

/// Unknown keys stop the daemon, so an example configuration with a typo would not start.
fn assert_known_keys(origin: &str, toml: &str) {
    let mut table = String::new();
    for (number, line) in toml.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.trim().to_string();
            assert!(CONFIG_KEYS.iter().any(|(t, _)| *t == table), "{origin}:{}: unknown table [{table}]", number + 1);
            continue;
        }
        let key = line.split('=').next().unwrap().trim();
        let known = CONFIG_KEYS.iter().any(|(t, keys)| *t == table && keys.contains(&key));
        assert!(known, "{origin}:{}: unknown key {key:?} in [{table}]", number + 1);
    }
}

/// The `webio-router.toml: |` block of the `ConfigMap`, without its indentation.
fn configmap_config() -> String {
    configmap_config_of(CONFIGMAP)
}

fn configmap_config_of(path: &str) -> String {
    let configmap = repo_file(path);
    let lines = configmap.lines().skip_while(|l| l.trim() != "webio-router.toml: |").skip(1);
    let mut block = String::new();
    for line in lines {
        if !line.trim().is_empty() && !line.starts_with("    ") {
            break;
        }
        block.push_str(line.strip_prefix("    ").unwrap_or(""));
        block.push('\n');
    }
    assert!(block.contains("[delivery]"), "{path} has no webio-router.toml block");
    block
}

#[test]
fn the_sidecar_whose_spool_is_an_empty_dir_drains_it_on_shutdown() {
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    assert!(deployment.contains("emptyDir:"), "the sidecar's spool volume is an emptyDir");
    let config: toml::Table = toml::from_str(&configmap_config()).unwrap();
    assert_eq!(
        config["delivery"].get("drain_on_shutdown").and_then(|v| v.as_bool()),
        Some(true),
        "a spool on an emptyDir vanishes with the pod: the sidecar must set drain_on_shutdown"
    );
}

#[test]
fn the_example_configurations_use_only_known_keys() {
    assert_known_keys(SYSTEMD_CONFIG, &repo_file(SYSTEMD_CONFIG));
    assert_known_keys(CONFIGMAP, &configmap_config());
    assert_known_keys(GATEWAY_CONFIGMAP, &configmap_config_of(GATEWAY_CONFIGMAP));
}

/// A router in spool mode with one sink and the optional features on (their families exist
/// only with them), as a fresh deployment starts.
fn fresh_router() -> crate::helpers::Router {
    let config = r#"
routes_file = "{dir}/routes.toml"
[auth]
secrets = ["test-secret-0123456789-0123456789-abcdef"]
[delivery]
mode = "spool"
spool_dir = "{dir}/spool"
dead_letter_file = "{dir}/var/dead-letter.jsonl"
[custom_values]
upstream = "http://127.0.0.1:9/values"
[ingest]
dir = "{dir}/inbox"
"#;
    let routes = "[sinks.archive]\ntype = \"file\"\npath = \"{dir}/events.jsonl\"\n[[routes]]\nto = [\"archive\"]\n";
    crate::helpers::router(config, routes).spawn()
}

#[test]
fn a_fresh_router_exports_every_metric_family_before_any_traffic() {
    let r = fresh_router();
    let text = crate::helpers::get(r.admin, "/metrics").body;
    for name in NAMES {
        assert!(text.contains(&format!("# TYPE {name} ")), "no # TYPE line for {name}:\n{text}");
        let sample = if HISTOGRAMS.contains(name) { format!("{name}_count") } else { name.to_string() };
        let has_sample = text
            .lines()
            .any(|l| l.strip_prefix(&sample).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')));
        assert!(has_sample, "no sample of {name} before any traffic:\n{text}");
    }
    // Known label values start at zero, so that increase() sees the first one.
    for series in [
        r#"webio_router_requests_total{status="202"} 0"#,
        r#"webio_router_requests_total{status="401"} 0"#,
        r#"webio_router_events_total{type="messageStatusUpdate",shape="legacy"} 0"#,
        r#"webio_router_events_total{type="other",shape="current"} 0"#,
        r#"webio_router_unrouted_total{type="inboundMessage"} 0"#,
        "webio_router_duplicates_total 0",
        r#"webio_router_config_reloads_total{outcome="ok"} 0"#,
        r#"webio_router_config_reloads_total{outcome="error"} 0"#,
        r#"webio_router_rejected_total{reason="not_json"} 0"#,
        "webio_router_request_duration_seconds_count 0",
        r#"webio_router_deliveries_total{sink="archive",outcome="dead"} 0"#,
        r#"webio_router_delivery_duration_seconds_count{sink="archive"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == series), "{series} missing:\n{text}");
    }
    crate::helpers::promtool_check_metrics(&text);
}
