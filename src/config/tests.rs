//! Configuration (README "Configuration"): precedence, unknown keys, durations, every
//! validation rule and what the diagnostics say. Each test runs in a `figment::Jail`: its own
//! working directory and environment.

use super::*;
use figment::Jail;

const SECRET: &str = "0123456789abcdef0123456789abcdef"; // exactly 32 bytes
const SECRET2: &str = "another-secret-of-at-least-32-bytes!";

/// Loads from the jail's working directory (`webio-router.toml` when present).
fn load() -> Result<Loaded, ConfigError> {
    Config::load(None, None)
}

fn load_err() -> ConfigError {
    match load() {
        Ok(l) => panic!("expected an error, loaded {:?}", l.config),
        Err(e) => e,
    }
}

fn file(jail: &Jail, text: &str) {
    jail.create_file(DEFAULT_CONFIG_FILE, text).unwrap();
}

fn with_secret(rest: &str) -> String {
    format!("[auth]\nsecrets = [\"{SECRET}\"]\n{rest}")
}

// figment's Jail API returns its own (large) error type.
#[allow(clippy::result_large_err)]
fn jail(f: impl FnOnce(&mut Jail)) {
    Jail::expect_with(|j| {
        j.clear_env();
        f(j);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Defaults and precedence

#[test]
fn defaults_are_the_documented_ones() {
    let c = Config::default();
    assert_eq!(c.routes_file, PathBuf::from("routes.toml"));
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.server.path, "/webhooks/webio");
    assert_eq!(c.server.max_body_bytes, 262_144);
    assert_eq!(c.server.request_timeout, Duration::from_secs(10));
    assert_eq!(c.admin.listen, "127.0.0.1:9095".parse().unwrap());
    assert_eq!(c.auth.header, "x-webio-token");
    assert!(c.auth.secrets.is_empty());
    assert!(c.auth.secret_files.is_empty());
    assert_eq!(c.auth.algorithms, vec![Algorithm::HS256]);
    assert_eq!(c.auth.organisation_id, "");
    assert_eq!(c.auth.organisation_claim, "organisationId");
    assert_eq!(c.auth.leeway, Duration::from_secs(60));
    assert!(!c.auth.disabled);
    assert_eq!(c.normalise.source_timezone, "UTC");
    assert_eq!(c.normalise.legacy_send_status_codes, vec![1]);
    assert_eq!(c.delivery.mode, DeliveryMode::Spool);
    assert_eq!(c.delivery.spool_dir, PathBuf::from("var/spool"));
    assert_eq!(c.delivery.max_spool_bytes, 1_073_741_824);
    assert_eq!(c.delivery.retry_initial, Duration::from_millis(200));
    assert_eq!(c.delivery.retry_max, Duration::from_secs(30));
    assert_eq!(c.delivery.max_attempts, 20);
    assert_eq!(c.delivery.dead_letter_file, PathBuf::from("var/dead-letter.jsonl"));
    assert_eq!(c.delivery.dedup_window, Duration::from_secs(600));
    assert_eq!(c.delivery.shutdown_timeout, Duration::from_secs(20));
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.level, "info");
}

#[test]
fn without_a_file_the_defaults_plus_environment_are_used() {
    jail(|j| {
        j.set_env("WEBIO_ROUTER_AUTH__SECRETS", format!("[\"{SECRET}\"]"));
        let l = load().unwrap();
        assert_eq!(l.file, None);
        assert_eq!(l.config.server.listen, Config::default().server.listen);
        assert_eq!(l.config.delivery.dedup_window, Duration::from_secs(600));
        assert_eq!(l.secrets, vec![Secret::new(SECRET)]);
        assert_eq!(l.normalise.source_timezone, chrono_tz::Tz::UTC);
        assert_eq!(l.normalise.legacy_send_status_codes, vec![1]);
    });
}

#[test]
fn the_toml_file_overrides_the_defaults() {
    jail(|j| {
        file(
            j,
            &with_secret(
                r#"
algorithms = ["HS256", "HS512"]
organisation_id = "1234"
leeway = "5s"
[server]
listen = "0.0.0.0:9000"
max_body_bytes = 1024
[normalise]
source_timezone = "Europe/London"
legacy_send_status_codes = [1, 5]
[delivery]
mode = "direct"
retry_initial = "250ms"
dedup_window = "5m"
[log]
format = "json"
level = "debug"
"#,
            ),
        );
        let l = load().unwrap();
        assert_eq!(l.file, Some(PathBuf::from(DEFAULT_CONFIG_FILE)));
        let c = &l.config;
        assert_eq!(c.server.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.server.max_body_bytes, 1024);
        assert_eq!(c.server.path, "/webhooks/webio", "keys not in the file keep their default");
        assert_eq!(c.auth.algorithms, vec![Algorithm::HS256, Algorithm::HS512]);
        assert_eq!(c.auth.organisation_id, "1234");
        assert_eq!(c.auth.leeway, Duration::from_secs(5));
        assert_eq!(c.delivery.mode, DeliveryMode::Direct);
        assert_eq!(c.delivery.retry_initial, Duration::from_millis(250));
        assert_eq!(c.delivery.dedup_window, Duration::from_secs(300));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(l.normalise.source_timezone, chrono_tz::Tz::Europe__London);
        assert_eq!(l.normalise.legacy_send_status_codes, vec![1, 5]);
    });
}

#[test]
fn an_explicit_config_path_is_used_and_a_missing_one_is_an_error() {
    jail(|j| {
        j.create_file("elsewhere.toml", &with_secret("[server]\npath = \"/hook\"\n")).unwrap();
        // A default file that must be ignored when --config names another.
        file(j, "this is not toml");
        let l = Config::load(Some(Path::new("elsewhere.toml")), None).unwrap();
        assert_eq!(l.config.server.path, "/hook");
        assert_eq!(l.file, Some(PathBuf::from("elsewhere.toml")));

        let e = Config::load(Some(Path::new("missing.toml")), None).unwrap_err();
        assert!(e.to_string().starts_with("missing.toml: "), "{e}");
    });
}

#[test]
fn the_routes_override_replaces_routes_file() {
    jail(|j| {
        file(j, &format!("routes_file = \"a.toml\"\n{}", with_secret("")));
        assert_eq!(load().unwrap().config.routes_file, PathBuf::from("a.toml"));
        let l = Config::load(None, Some(Path::new("b.toml"))).unwrap();
        assert_eq!(l.config.routes_file, PathBuf::from("b.toml"));
    });
}

#[test]
fn environment_variables_override_the_file_with_double_underscore_nesting() {
    jail(|j| {
        file(j, &with_secret("organisation_id = \"1\"\n[server]\nlisten = \"127.0.0.1:1000\"\n"));
        j.set_env("WEBIO_ROUTER_AUTH__ORGANISATION_ID", "42");
        j.set_env("WEBIO_ROUTER_SERVER__LISTEN", "0.0.0.0:8443");
        j.set_env("WEBIO_ROUTER_AUTH__SECRETS", format!("[\"{SECRET}\", \"{SECRET2}\"]"));
        j.set_env("WEBIO_ROUTER_DELIVERY__DEDUP_WINDOW", "90s");
        j.set_env("WEBIO_ROUTER_NORMALISE__SOURCE_TIMEZONE", "Europe/London");
        j.set_env("WEBIO_ROUTER_NORMALISE__LEGACY_SEND_STATUS_CODES", "[1, 5]");
        j.set_env("WEBIO_ROUTER_AUTH__DISABLED", "false");
        j.set_env("WEBIO_ROUTER_ROUTES_FILE", "/etc/webio/routes.toml");
        let l = load().unwrap();
        assert_eq!(l.config.auth.organisation_id, "42");
        assert_eq!(l.config.server.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(l.secrets, vec![Secret::new(SECRET), Secret::new(SECRET2)]);
        assert_eq!(l.config.delivery.dedup_window, Duration::from_secs(90));
        assert_eq!(l.normalise.source_timezone, chrono_tz::Tz::Europe__London);
        assert_eq!(l.normalise.legacy_send_status_codes, vec![1, 5]);
        assert_eq!(l.config.routes_file, PathBuf::from("/etc/webio/routes.toml"));
    });
}

#[test]
fn an_organisation_id_written_as_a_toml_integer_is_text() {
    jail(|j| {
        file(j, &with_secret("organisation_id = 1234\n"));
        assert_eq!(load().unwrap().config.auth.organisation_id, "1234");
    });
}

// ---------------------------------------------------------------------------------------------
// Unknown keys

#[test]
fn an_unknown_key_in_the_file_is_an_error_with_file_line_and_column() {
    // (file text, expected line:col of the offending key, word in the message)
    let cases: &[(&str, (usize, usize), &str)] = &[
        ("nope = 1\n", (1, 1), "nope"),
        ("[server]\nlisten = \"127.0.0.1:1\"\n  tiemout = \"1s\"\n", (3, 3), "tiemout"),
        ("[auth]\nsecrets = []\nsecret = \"x\"\n", (3, 1), "secret"),
        ("[metrics]\nlisten = \"x\"\n", (1, 2), "metrics"),
    ];
    for (text, (line, col), word) in cases {
        jail(|j| {
            file(j, text);
            let e = load_err();
            assert_eq!(e.0.len(), 1, "{text:?}: {e}");
            let d = &e.0[0];
            assert_eq!(d.source, DEFAULT_CONFIG_FILE, "{text:?}");
            assert_eq!(d.line, Some((*line, *col)), "{text:?}: {e}");
            assert!(d.message.contains(word), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("webio-router.toml:{line}:{col}: ")), "{e}");
        });
    }
}

#[test]
fn a_toml_syntax_error_is_reported_with_line_and_column() {
    jail(|j| {
        file(j, "[server]\nlisten = \n");
        let e = load_err();
        assert_eq!(e.0[0].line.map(|l| l.0), Some(2), "{e}");
    });
}

#[test]
fn an_unknown_environment_key_is_an_error_naming_the_variable() {
    // (variable set, value, variable named in the message: the first unknown level)
    for (var, value, named) in [
        ("WEBIO_ROUTER_SERVER__NOPE", "1", "WEBIO_ROUTER_SERVER__NOPE"),
        ("WEBIO_ROUTER_NOPE__X", "1", "WEBIO_ROUTER_NOPE"),
        ("WEBIO_ROUTER_AUTH__SECRET", SECRET, "WEBIO_ROUTER_AUTH__SECRET"),
        ("WEBIO_ROUTER_DELIVERY__MODEE", "direct", "WEBIO_ROUTER_DELIVERY__MODEE"),
    ] {
        jail(|j| {
            file(j, &with_secret(""));
            j.set_env(var, value);
            let e = load_err();
            let text = e.to_string();
            assert!(text.starts_with(&format!("environment {named}: ")), "{var}: {text}");
            assert!(text.contains("unknown key"), "{var}: {text}");
            assert!(!text.contains(SECRET), "{var}: a value must not be echoed: {text}");
        });
    }
}

#[test]
fn kubernetes_service_link_variables_are_not_configuration() {
    // A Service named webio-router injects these into every pod of the namespace.
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_PORT", "tcp://10.0.0.1:8080");
        j.set_env("WEBIO_ROUTER_SERVICE_HOST", "10.0.0.1");
        j.set_env("WEBIO_ROUTER_PORT_8080_TCP_ADDR", "10.0.0.1");
        assert!(load().is_ok());
    });
}

#[test]
fn a_badly_typed_environment_value_is_an_error() {
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_SERVER__LISTEN", "not-an-address");
        let e = load_err();
        assert!(e.to_string().contains("WEBIO_ROUTER_SERVER__LISTEN"), "{e}");
    });
}

// ---------------------------------------------------------------------------------------------
// Durations

#[test]
fn durations_are_human_readable_strings() {
    let cases: &[(&str, Duration)] = &[
        ("250ms", Duration::from_millis(250)),
        ("10s", Duration::from_secs(10)),
        ("5m", Duration::from_secs(300)),
        ("1h", Duration::from_secs(3600)),
        ("1m 30s", Duration::from_secs(90)),
        (" 2s ", Duration::from_secs(2)),
    ];
    for (text, want) in cases {
        jail(|j| {
            file(j, &with_secret(&format!("[server]\nrequest_timeout = \"{text}\"\n")));
            assert_eq!(load().unwrap().config.server.request_timeout, *want, "{text}");
        });
    }
}

#[test]
fn a_bad_duration_is_an_error_naming_the_key() {
    for (key, section, value) in [
        ("request_timeout", "server", "\"soon\""),
        ("request_timeout", "server", "\"10\""),
        ("leeway", "auth", "\"5 parsecs\""),
        ("dedup_window", "delivery", "600"),
    ] {
        jail(|j| {
            file(j, &format!("[auth]\nsecrets = [\"{SECRET}\"]\n[{section}]\n{key} = {value}\n"));
            let e = load_err();
            assert!(e.to_string().contains(key) || e.0[0].line.is_some(), "{key} = {value}: {e}");
        });
        jail(|j| {
            file(j, &with_secret(""));
            j.set_env(
                format!("WEBIO_ROUTER_{}__{}", section.to_uppercase(), key.to_uppercase()),
                value.trim_matches('"'),
            );
            let e = load_err();
            assert!(e.to_string().contains(&key.to_uppercase()), "env {key} = {value}: {e}");
        });
    }
}

#[test]
fn zero_durations_and_inconsistent_retry_bounds_are_refused() {
    for rest in [
        "[server]\nrequest_timeout = \"0s\"\n",
        "[delivery]\nretry_initial = \"0s\"\n",
        "[delivery]\nretry_initial = \"1m\"\nretry_max = \"1s\"\n",
        "[delivery]\nmax_attempts = 0\n",
    ] {
        jail(|j| {
            file(j, &with_secret(rest));
            load_err();
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

#[test]
fn a_secret_shorter_than_32_bytes_is_refused() {
    let short = &SECRET[..31];
    jail(|j| {
        file(j, &format!("[auth]\nsecrets = [\"{SECRET}\", \"{short}\"]\n"));
        let e = load_err();
        let text = e.to_string();
        assert!(text.contains("auth.secrets[1]") && text.contains("32"), "{text}");
        assert!(!text.contains(short), "the secret itself must not be printed: {text}");
    });
    // Bytes, not characters: 11 three-byte characters are 33 bytes.
    jail(|j| {
        file(j, &format!("[auth]\nsecrets = [\"{}\"]\n", "€".repeat(11)));
        assert_eq!(load().unwrap().secrets[0].expose().len(), 33);
    });
}

#[test]
fn a_32_byte_secret_is_enough() {
    jail(|j| {
        file(j, &with_secret(""));
        assert_eq!(load().unwrap().secrets, vec![Secret::new(SECRET)]);
    });
}

#[test]
fn no_secret_while_auth_is_enabled_is_refused() {
    for text in ["", "[auth]\nsecrets = []\n", "[auth]\nsecrets = []\nsecret_files = []\ndisabled = false\n"] {
        jail(|j| {
            file(j, text);
            let e = load_err();
            assert!(e.to_string().contains("no secret"), "{text:?}: {e}");
        });
    }
}

#[test]
fn disabled_auth_needs_no_secret() {
    jail(|j| {
        file(j, "[auth]\ndisabled = true\n");
        let l = load().unwrap();
        assert!(l.config.auth.disabled);
        assert!(l.secrets.is_empty());
    });
    jail(|j| {
        j.set_env("WEBIO_ROUTER_AUTH__DISABLED", "true");
        assert!(load().unwrap().config.auth.disabled);
    });
}

#[test]
fn only_hmac_algorithms_are_allowed() {
    for (algs, ok) in [
        ("[\"HS256\"]", true),
        ("[\"HS384\"]", true),
        ("[\"HS512\", \"HS256\"]", true),
        ("[\"RS256\"]", false),
        ("[\"none\"]", false),
        ("[\"HS256\", \"none\"]", false),
        ("[\"hs256\"]", false),
        ("[\"ES256\"]", false),
        ("[]", false),
    ] {
        jail(|j| {
            file(j, &with_secret(&format!("algorithms = {algs}\n")));
            assert_eq!(load().is_ok(), ok, "{algs}");
        });
    }
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_AUTH__ALGORITHMS", "[HS256, RS256]");
        let text = load_err().to_string();
        // Named as the variable the operator set, not `…__ALGORITHMS__1`.
        assert!(text.starts_with("environment WEBIO_ROUTER_AUTH__ALGORITHMS: "), "{text}");
        assert!(text.contains("RS256"), "{text}");
    });
}

#[test]
fn an_unreadable_secret_file_is_refused_by_name() {
    jail(|j| {
        file(j, "[auth]\nsecret_files = [\"does/not/exist.key\"]\n");
        let text = load_err().to_string();
        assert!(text.contains("does/not/exist.key"), "{text}");
    });
    jail(|j| {
        j.create_dir("a-directory").unwrap();
        file(j, "[auth]\nsecret_files = [\"a-directory\"]\n");
        let text = load_err().to_string();
        assert!(text.contains("a-directory"), "{text}");
    });
}

#[test]
fn secret_files_lose_their_trailing_newline_and_follow_inline_secrets() {
    jail(|j| {
        j.create_file("lf.key", &format!("{SECRET2}\n")).unwrap();
        j.create_file("crlf.key", &format!("{SECRET}\r\n")).unwrap();
        j.create_file("bare.key", SECRET).unwrap();
        let inline = "i".repeat(40);
        file(
            j,
            &format!("[auth]\nsecrets = [\"{inline}\"]\nsecret_files = [\"lf.key\", \"crlf.key\", \"bare.key\"]\n"),
        );
        let l = load().unwrap();
        assert_eq!(
            l.secrets,
            vec![Secret::new(inline.as_str()), Secret::new(SECRET2), Secret::new(SECRET), Secret::new(SECRET)]
        );
    });
}

#[test]
fn a_secret_file_that_is_short_once_trimmed_is_refused() {
    jail(|j| {
        j.create_file("short.key", &format!("{}\n", &SECRET[..31])).unwrap();
        file(j, "[auth]\nsecret_files = [\"short.key\"]\n");
        let text = load_err().to_string();
        assert!(text.contains("short.key") && text.contains("31 bytes"), "{text}");
    });
}

#[test]
fn secret_files_alone_are_enough() {
    jail(|j| {
        j.create_file("s.key", SECRET).unwrap();
        j.set_env("WEBIO_ROUTER_AUTH__SECRET_FILES", "[\"s.key\"]");
        assert_eq!(load().unwrap().secrets, vec![Secret::new(SECRET)]);
    });
}

#[test]
fn debug_output_never_contains_a_secret() {
    jail(|j| {
        j.create_file("s.key", SECRET2).unwrap();
        file(j, &with_secret("secret_files = [\"s.key\"]\n"));
        let l = load().unwrap();
        for text in
            [format!("{l:?}"), format!("{:?}", l.config), format!("{:#?}", l.config.auth), format!("{:?}", l.secrets)]
        {
            assert!(!text.contains(SECRET) && !text.contains(SECRET2), "{text}");
            assert!(!text.contains("0123456789"), "{text}");
        }
    });
    assert_eq!(format!("{:?}", Secret::new(SECRET)), "Secret([redacted, 32 bytes])");
}

#[test]
fn all_problems_are_reported_at_once() {
    jail(|j| {
        file(
            j,
            "[auth]\nsecrets = [\"short\"]\nheader = \"bad header\"\n[normalise]\nsource_timezone = \"Mars/Olympus\"\n[log]\nlevel = \"loud=\"\n",
        );
        let e = load_err();
        assert!(e.0.len() >= 3, "{e}");
        let text = e.to_string();
        assert!(text.contains("auth.secrets[0]"), "{text}");
        assert!(text.contains("auth.header"), "{text}");
        assert!(text.contains("Mars/Olympus"), "{text}");
        assert_eq!(text.lines().count(), e.0.len());
    });
}

// ---------------------------------------------------------------------------------------------
// Other validation

#[test]
fn other_invalid_values_are_refused() {
    for rest in [
        "[server]\npath = \"no-slash\"\n",
        "[server]\nmax_body_bytes = 0\n",
        "[server]\nlisten = \"127.0.0.1:7000\"\n[admin]\nlisten = \"127.0.0.1:7000\"\n",
        "[normalise]\nsource_timezone = \"Europe/Londres\"\n",
        "[delivery]\nmode = \"bogus\"\n",
        "[delivery]\nmax_spool_bytes = 0\n",
        "[log]\nformat = \"xml\"\n",
        "organisation_claim = \"\"\n",
    ] {
        jail(|j| {
            file(j, &with_secret(rest));
            load_err();
        });
    }
}

#[test]
fn both_delivery_modes_parse() {
    for (mode, want) in [("spool", DeliveryMode::Spool), ("direct", DeliveryMode::Direct)] {
        jail(|j| {
            file(j, &with_secret(&format!("[delivery]\nmode = \"{mode}\"\n")));
            assert_eq!(load().unwrap().config.delivery.mode, want);
        });
    }
}

#[test]
fn rejected_bodies_go_next_to_the_dead_letter_file() {
    let mut d = DeliveryConfig::default();
    assert_eq!(d.rejected_file(), PathBuf::from("var/rejected.jsonl"));
    d.dead_letter_file = PathBuf::from("/srv/webio/dl.jsonl");
    assert_eq!(d.rejected_file(), PathBuf::from("/srv/webio/rejected.jsonl"));
    d.dead_letter_file = PathBuf::from("dl.jsonl");
    assert_eq!(d.rejected_file(), PathBuf::from("rejected.jsonl"));
}

// ---------------------------------------------------------------------------------------------
// Diagnostics

#[test]
fn line_col_is_one_based_and_counts_characters() {
    let text = "ab\ncdé\nf";
    let cases = [(0, (1, 1)), (1, (1, 2)), (3, (2, 1)), (5, (2, 3)), (6, (2, 3)), (8, (3, 1)), (999, (3, 2))];
    for (offset, want) in cases {
        assert_eq!(line_col(text, offset), want, "offset {offset}");
    }
}

#[test]
fn diagnostics_print_as_file_line_col_message() {
    assert_eq!(Diagnostic::at("r.toml", "a\nbc", 3, "oops").to_string(), "r.toml:2:2: oops");
    assert_eq!(Diagnostic::new("r.toml", "oops").to_string(), "r.toml: oops");
    let e = ConfigError(vec![Diagnostic::new("a", "1"), Diagnostic::new("b", "2")]);
    assert_eq!(e.to_string(), "a: 1\nb: 2");
}

#[test]
fn a_single_secret_string_is_accepted_as_a_list_of_one() {
    jail(|j| {
        j.set_env("WEBIO_ROUTER_AUTH__SECRETS", SECRET2);
        assert_eq!(load().unwrap().secrets, vec![Secret::new(SECRET2)]);
    });
    jail(|j| {
        file(j, &format!("[auth]\nsecrets = \"{SECRET2}\"\n"));
        assert_eq!(load().unwrap().secrets, vec![Secret::new(SECRET2)]);
    });
}

#[test]
fn a_wrongly_typed_secret_is_refused_without_echoing_it() {
    for text in [
        format!("[auth]\nsecrets = [{{ value = \"{SECRET2}\" }}]\n"),
        format!("[auth]\nsecrets = [[\"{SECRET2}\"]]\n"),
        format!("[auth]\nsecrets = {{ a = \"{SECRET2}\" }}\n"),
    ] {
        jail(|j| {
            file(j, &text);
            let e = load_err().to_string();
            assert!(e.starts_with("webio-router.toml:2:11: "), "{e}");
            assert!(!e.contains(SECRET2), "{e}");
        });
    }
    jail(|j| {
        j.set_env("WEBIO_ROUTER_AUTH__SECRETS", format!("{{a=\"{SECRET2}\"}}"));
        let e = load_err().to_string();
        assert!(e.contains("WEBIO_ROUTER_AUTH__SECRETS"), "{e}");
        assert!(!e.contains(SECRET2), "{e}");
    });
}

// ---------------------------------------------------------------------------------------------
// Diagnostics that say what to write

#[test]
fn a_misspelt_key_gets_a_did_you_mean_at_its_line() {
    for (text, (line, col), written, meant) in [
        ("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n", (3, 1), "lisen", Some("listen")),
        ("[delivery]\nretry_maxx = \"1s\"\n", (2, 1), "retry_maxx", Some("retry_max")),
        ("[auth]\nsecret = \"x\"\n", (2, 1), "secret", Some("secrets")),
        ("[server]\nnothing_like_it = 1\n", (2, 1), "nothing_like_it", None),
    ] {
        jail(|j| {
            file(j, text);
            let e = load_err();
            let d = &e.0[0];
            assert_eq!(d.line, Some((line, col)), "{text:?}: {e}");
            assert!(d.message.starts_with(&format!("unknown key `{written}`")), "{e}");
            match meant {
                Some(m) => assert!(d.message.contains(&format!("did you mean `{m}`?")), "{e}"),
                None => assert!(!d.message.contains("did you mean"), "{e}"),
            }
        });
    }
}

#[test]
fn an_unknown_environment_key_reads_cleanly_with_a_did_you_mean() {
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_SERVER__LISEN", "1");
        let e = load_err().to_string();
        assert!(
            e.starts_with(
                "environment WEBIO_ROUTER_SERVER__LISEN: server.lisen: unknown key `lisen`: did you mean `listen`? \
                 (known keys: `listen`, `path`, `max_body_bytes`, `request_timeout`"
            ),
            "{e}"
        );
        assert!(e.ends_with("`)") && !e.contains("``") && !e.contains("`one of"), "garbled backquotes: {e}");
    });
}

#[test]
fn a_value_in_the_wrong_case_gets_a_did_you_mean() {
    jail(|j| {
        file(j, &with_secret("[delivery]\nmode = \"Spool\"\n"));
        let e = load_err();
        assert_eq!(e.0[0].line, Some((4, 8)), "{e}");
        assert!(e.0[0].message.contains("did you mean `spool`?"), "{e}");
    });
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_LOG__FORMAT", "JSON");
        let e = load_err().to_string();
        assert!(e.contains("did you mean `json`?"), "{e}");
    });
}

#[test]
fn a_duration_written_as_a_number_says_to_write_a_string_with_a_unit() {
    for (value, want) in [("30", "write \"30s\""), ("1.5", "write \"1.5s\""), ("\"30\"", "write \"30s\"")] {
        jail(|j| {
            file(j, &with_secret(&format!("[delivery]\nretry_max = {value}\n")));
            let e = load_err();
            assert_eq!(e.0[0].line, Some((4, 13)), "{e}");
            assert!(e.0[0].message.contains(want), "{value}: {e}");
            assert!(!e.0[0].message.contains("expected a string"), "{value}: {e}");
        });
    }
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_DELIVERY__RETRY_MAX", "30");
        let e = load_err().to_string();
        assert!(e.contains("WEBIO_ROUTER_DELIVERY__RETRY_MAX") && e.contains("write \"30s\""), "{e}");
    });
    jail(|j| {
        file(j, &format!("[auth]\nsecrets = [\"{SECRET}\"]\nleeway = true\n"));
        let e = load_err().to_string();
        assert!(e.contains("a duration string such as"), "{e}");
    });
}

#[test]
fn an_environment_value_that_looks_like_toml_but_does_not_parse_is_an_error() {
    for value in [r#"["/run/secrets/a""#, r#"{ a = "#, r#""unterminated"#, r#"["a", "b"] trailing"#] {
        jail(|j| {
            file(j, &with_secret(""));
            j.set_env("WEBIO_ROUTER_AUTH__SECRET_FILES", value);
            let e = load_err();
            let text = e.to_string();
            assert!(text.starts_with("environment WEBIO_ROUTER_AUTH__SECRET_FILES: "), "{value}: {text}");
            assert!(text.contains("does not parse"), "{value}: {text}");
            assert!(!text.contains("/run/secrets/a") && !text.contains("unterminated"), "value echoed: {text}");
        });
    }
    // The same text for a string key would otherwise silently become that string.
    jail(|j| {
        file(j, &with_secret(""));
        j.set_env("WEBIO_ROUTER_AUTH__HEADER", r#"["x-token""#);
        assert!(load_err().to_string().contains("WEBIO_ROUTER_AUTH__HEADER"));
    });
}

#[test]
fn well_formed_toml_values_in_the_environment_still_work() {
    jail(|j| {
        j.create_file("secret", SECRET).unwrap();
        file(j, "");
        j.set_env("WEBIO_ROUTER_AUTH__SECRET_FILES", r#"["secret"]"#);
        j.set_env("WEBIO_ROUTER_AUTH__HEADER", r#""x-quoted""#);
        j.set_env("WEBIO_ROUTER_NORMALISE__LEGACY_SEND_STATUS_CODES", "[1, 5]");
        // Not ours: Kubernetes service links may hold anything.
        j.set_env("WEBIO_ROUTER_PORT", "[not toml");
        let l = load().unwrap();
        assert_eq!(l.secrets, vec![Secret::new(SECRET)]);
        assert_eq!(l.config.auth.header, "x-quoted");
        assert_eq!(l.config.normalise.legacy_send_status_codes, vec![1, 5]);
    });
}

#[test]
fn routing_commands_need_no_secret() {
    jail(|j| {
        file(j, "[auth]\nsecret_files = [\"/nonexistent/secret\"]\n");
        assert!(load().is_err());
        let l = Config::load_for(None, None, Purpose::Routing).unwrap();
        assert!(l.secrets.is_empty());
    });
    jail(|j| {
        // Everything else is still checked.
        file(j, "[normalise]\nsource_timezone = \"Mars/Olympus\"\n");
        assert!(Config::load_for(None, None, Purpose::Routing).is_err());
    });
}

#[test]
fn modes_and_formats_print_as_they_are_written() {
    assert_eq!(DeliveryMode::Spool.to_string(), "spool");
    assert_eq!(DeliveryMode::Direct.to_string(), "direct");
    assert_eq!(LogFormat::Json.to_string(), "json");
    assert_eq!(crate::format::Format::Cloudevents.as_str(), "cloudevents");
}

#[test]
fn did_you_mean_prefers_the_same_name_in_another_case() {
    assert_eq!(did_you_mean("statuscode", ["status", "statusCode"]), Some("statusCode"));
    assert_eq!(did_you_mean("lisen", ["listen", "path"]), Some("listen"));
    assert_eq!(did_you_mean("zzz", ["listen", "path"]), None);
}

#[test]
fn the_dedup_store_url_is_checked_and_its_password_never_shown() {
    let url = StoreUrl("redis://:hunter2@redis.example:6379/1".into());
    let shown = format!("{url:?}");
    assert!(!shown.contains("hunter2") && shown.contains("redis.example"), "{shown}");
    let d = DeliveryConfig { dedup_store: Some(StoreUrl("  ".into())), ..Default::default() };
    assert_eq!(d.dedup_store(), None, "empty means unset");
    jail(|j| {
        file(j, &with_secret("[delivery]\ndedup_store = \"local\"\n"));
        assert_eq!(load().unwrap().config.delivery.dedup_store(), None, "\"local\" is the default: no Redis");
        file(j, &with_secret("[delivery]\ndedup_store = \"http://:hunter2@h/\"\n"));
        let e = load_err().to_string();
        assert!(e.contains("delivery.dedup_store") && !e.contains("hunter2"), "{e}");
        file(j, &with_secret("[delivery]\ndedup_store = \"redis://:hunter2@h:6379/2\"\n"));
        assert_eq!(load().unwrap().config.delivery.dedup_store(), Some("redis://:hunter2@h:6379/2"));
    });
}
