//! Configuration: built-in defaults < TOML file < `WEBIO_ROUTER_*` environment (figment),
//! unknown keys refused, validated once by [`Config::load`] (which `check` runs too).

pub mod custom_values;
pub mod dedup_store;
pub mod ingest;
pub mod suggest;

use crate::event::NormaliseOptions;
pub use custom_values::CustomValuesConfig;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
pub use ingest::IngestConfig;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use suggest::did_you_mean;

pub const DEFAULT_CONFIG_FILE: &str = "webio-router.toml";
pub const ENV_PREFIX: &str = "WEBIO_ROUTER_";
pub const MIN_SECRET_BYTES: usize = 32;

/// A configuration problem, printed as `source: message` (with `line:col` when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub source: String,
    pub line: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some((l, c)) => write!(f, "{}:{}:{}: {}", self.source, l, c, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl Diagnostic {
    pub fn new(source: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic { source: source.into(), line: None, message: message.into() }
    }

    /// A diagnostic pointing at byte `offset` of `text`.
    pub fn at(source: impl Into<String>, text: &str, offset: usize, message: impl Into<String>) -> Self {
        Diagnostic { source: source.into(), line: Some(line_col(text, offset)), message: message.into() }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary_compat(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// "unknown key `lisen`: did you mean `listen`? (known keys: `listen`, `path`)".
pub fn unknown_message(what: &str, name: &str, candidates: &[&str], known: &str) -> String {
    let hint = did_you_mean(name, candidates.iter().copied()).map(|c| format!(": did you mean `{c}`?"));
    let list = candidates.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    match (hint, candidates.is_empty()) {
        (Some(h), _) => format!("unknown {what} `{name}`{h} ({known}: {list})"),
        (None, false) => format!("unknown {what} `{name}` ({known}: {list})"),
        (None, true) => format!("unknown {what} `{name}`"),
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" and "unknown variant `x`,
/// expected …" in the words of a configuration file, with a "did you mean"; any other
/// message is returned as it is.
pub fn explain_serde_message(msg: &str) -> String {
    let (what, known, rest) = if let Some(rest) = msg.strip_prefix("unknown field `") {
        ("key", "known keys", rest)
    } else if let Some(rest) = msg.strip_prefix("unknown variant `") {
        ("value", "one of", rest)
    } else {
        return msg.to_owned();
    };
    let Some((name, tail)) = rest.split_once('`') else { return msg.to_owned() };
    // The expected names are the backquoted words after the name.
    let candidates: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    unknown_message(what, name, &candidates, known)
}

/// Several diagnostics at once: `check` reports them all, not just the first.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Diagnostic>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl From<Diagnostic> for ConfigError {
    fn from(d: Diagnostic) -> Self {
        ConfigError(vec![d])
    }
}

/// An HMAC secret. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted, {} bytes])", self.0.len())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The environment provider reads `WEBIO_ROUTER_AUTH__SECRETS=[1234…]` as numbers.
        Ok(Secret(stringish(d)?.into_bytes()))
    }
}

/// `auth.secrets`: a list, or one secret on its own (`WEBIO_ROUTER_AUTH__SECRETS=…`). A value
/// of the wrong type is refused without echoing it: serde's messages quote the value.
fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Secret),
        Many(Vec<Secret>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => Ok(vec![s]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom("must be a list of strings (value not shown: it holds secrets)")),
    }
}

/// A string that may have been written as a number or a boolean (environment values are
/// parsed as TOML values, so `ORGANISATION_ID=42` arrives as an integer).
fn stringish<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Uint(u64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Uint(u) => u.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

/// Deserialises a duration string (`"250ms"`, `"10s"`, `"5m"`); a bare number is refused with
/// the string it probably meant. For `#[serde(deserialize_with = …)]` outside this module.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration::deserialize(d)
}

pub(crate) mod duration {
    use serde::de::{Error, Unexpected, Visitor};
    use serde::Deserializer;
    use std::fmt;
    use std::time::Duration;

    /// A duration is a string with a unit. A bare number is refused with the string it
    /// probably meant (`retry_max = 30` → write `"30s"`), not a bare "expected a string".
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    fn no_unit<E: Error>(n: impl fmt::Display) -> E {
        E::custom(format!(
            "{n} is not a duration: write \"{n}s\" (a string with a unit, e.g. \"250ms\", \"10s\", \"5m\")"
        ))
    }

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration string such as \"250ms\", \"10s\" or \"5m\"")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Duration, E> {
            if let Ok(n) = s.trim().parse::<f64>() {
                return Err(no_unit(n));
            }
            humantime::parse_duration(s.trim())
                .map_err(|e| E::custom(format!("invalid duration {s:?} ({e}); write e.g. \"250ms\", \"10s\", \"5m\"")))
        }

        fn visit_i64<E: Error>(self, n: i64) -> Result<Duration, E> {
            Err(no_unit(n))
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<Duration, E> {
            Err(no_unit(n))
        }

        fn visit_f64<E: Error>(self, n: f64) -> Result<Duration, E> {
            Err(no_unit(n))
        }

        fn visit_bool<E: Error>(self, b: bool) -> Result<Duration, E> {
            Err(E::invalid_type(Unexpected::Bool(b), &self))
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub routes_file: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub normalise: NormaliseConfig,
    pub delivery: DeliveryConfig,
    pub log: LogConfig,
    pub custom_values: CustomValuesConfig,
    pub ingest: IngestConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            routes_file: PathBuf::from("routes.toml"),
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            normalise: NormaliseConfig::default(),
            delivery: DeliveryConfig::default(),
            log: LogConfig::default(),
            custom_values: CustomValuesConfig::default(),
            ingest: IngestConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub path: String,
    pub max_body_bytes: usize,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// PEM certificate chain (the server's certificate first); with `tls_key_file`, the
    /// webhook listener speaks HTTPS only. Re-read on SIGHUP.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            path: "/webhooks/webio".into(),
            max_body_bytes: 262_144,
            request_timeout: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl ServerConfig {
    /// The certificate and key files when TLS is on (both set and not empty).
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        Some((non_empty_path(&self.tls_cert_file)?, non_empty_path(&self.tls_key_file)?))
    }

    fn validate_tls(&self) -> Option<String> {
        match (non_empty_path(&self.tls_cert_file), non_empty_path(&self.tls_key_file)) {
            (Some(cert), Some(key)) => crate::server::tls::load(cert, key).err().map(|e| e.to_string()),
            (Some(_), None) => {
                Some("server.tls_key_file: not set; server.tls_cert_file needs it (both or neither)".into())
            }
            (None, Some(_)) => {
                Some("server.tls_cert_file: not set; server.tls_key_file needs it (both or neither)".into())
            }
            (None, None) => None,
        }
    }
}

/// An optional path, unset when empty (so that an environment variable can clear it).
fn non_empty_path(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|p| !p.as_os_str().is_empty())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The control socket (Unix, mode 0600); empty disables it.
    pub control_socket: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: ([127, 0, 0, 1], 9095).into(), control_socket: PathBuf::from("var/control.sock") }
    }
}

impl AdminConfig {
    /// The control socket's path, unless disabled.
    pub fn control_socket(&self) -> Option<&Path> {
        Some(self.control_socket.as_path()).filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    HS256,
    HS384,
    HS512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub header: String,
    #[serde(deserialize_with = "secret_list")]
    pub secrets: Vec<Secret>,
    pub secret_files: Vec<PathBuf>,
    pub algorithms: Vec<Algorithm>,
    #[serde(deserialize_with = "stringish")]
    pub organisation_id: String,
    pub organisation_claim: String,
    #[serde(with = "duration")]
    pub leeway: Duration,
    pub disabled: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            header: "x-webio-token".into(),
            secrets: Vec::new(),
            secret_files: Vec::new(),
            algorithms: vec![Algorithm::HS256],
            organisation_id: String::new(),
            organisation_claim: "organisationId".into(),
            leeway: Duration::from_secs(60),
            disabled: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormaliseConfig {
    pub source_timezone: String,
    pub legacy_send_status_codes: Vec<i64>,
}

impl Default for NormaliseConfig {
    fn default() -> Self {
        NormaliseConfig { source_timezone: "UTC".into(), legacy_send_status_codes: vec![1] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    Spool,
    Direct,
}

impl DeliveryMode {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Spool => "spool",
            DeliveryMode::Direct => "direct",
        }
    }
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store's URL; `Debug` hides its password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl StoreUrl {
    /// The URL with its password replaced by `hidden`, for messages.
    pub fn redacted(&self) -> String {
        match url::Url::parse(self.0.trim()) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("hidden"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "(not a URL; not shown)".into(),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub mode: DeliveryMode,
    pub spool_dir: PathBuf,
    pub max_spool_bytes: u64,
    #[serde(with = "duration")]
    pub retry_initial: Duration,
    #[serde(with = "duration")]
    pub retry_max: Duration,
    pub max_attempts: u32,
    pub dead_letter_file: PathBuf,
    /// `rejected.jsonl` is rotated to `rejected.jsonl.1` before it grows past this.
    pub max_rejected_bytes: u64,
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// A Redis URL (`redis://[:password@]host:port[/db]`, or `redis+unix:///path`) whose
    /// keys share the dedup window between replicas; unset or empty: each replica's own
    /// window only. Never logged (it may hold a password).
    pub dedup_store: Option<StoreUrl>,
    /// PEM CA certificates that a `rediss://` `dedup_store` is verified against instead of the
    /// public roots (a private CA).
    pub dedup_store_ca_file: Option<PathBuf>,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// SIGTERM waits, within `shutdown_timeout`, until the spool is empty (for a spool that
    /// does not outlive the process, such as a pod's `emptyDir`).
    pub drain_on_shutdown: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::Spool,
            spool_dir: PathBuf::from("var/spool"),
            max_spool_bytes: 1 << 30,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            max_attempts: 20,
            dead_letter_file: PathBuf::from("var/dead-letter.jsonl"),
            max_rejected_bytes: 64 << 20,
            dedup_window: Duration::from_secs(600),
            dedup_store: None,
            dedup_store_ca_file: None,
            shutdown_timeout: Duration::from_secs(20),
            drain_on_shutdown: false,
        }
    }
}

impl DeliveryConfig {
    /// The shared dedup store's URL, unless unset, empty or `"local"` (each replica's own
    /// window, kept in the spool: the default).
    pub fn dedup_store(&self) -> Option<&str> {
        self.dedup_store.as_ref().map(|u| u.0.trim()).filter(|u| !u.is_empty() && *u != "local")
    }

    /// Refused bodies go next to the dead-letter file.
    pub fn rejected_file(&self) -> PathBuf {
        self.dead_letter_file
            .parent()
            .map(|p| p.join("rejected.jsonl"))
            .unwrap_or_else(|| PathBuf::from("rejected.jsonl"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

/// Where the configuration came from, for `check`'s summary and diagnostics.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The TOML file used, if any.
    pub file: Option<PathBuf>,
    /// Secrets from `auth.secrets` then `auth.secret_files`, in order (index 0 signs tokens).
    pub secrets: Vec<Secret>,
    pub normalise: NormaliseOptions,
}

/// Only `SECTION__KEY` names and `ROUTES_FILE` are ours: Kubernetes injects service links such
/// as `WEBIO_ROUTER_PORT=tcp://…` for a Service named webio-router. `key` is without the prefix.
fn is_config_variable(key: &str) -> bool {
    key.contains("__") || key.eq_ignore_ascii_case("routes_file")
}

/// figment reads an environment value as TOML when it parses and as a plain string when it
/// does not, so `WEBIO_ROUTER_AUTH__SECRET_FILES='["/a"'` (a missing bracket) would silently
/// become the string `["/a"`. A value that starts like a TOML list, table or quoted string
/// must parse. The value is never echoed: it may be a secret.
fn check_environment_syntax(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<(), ConfigError> {
    let mut errs = Vec::new();
    for (name, value) in vars {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else { continue };
        let Some(key) =
            name.get(ENV_PREFIX.len()..).filter(|_| name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX))
        else {
            continue;
        };
        if !is_config_variable(key) || key.eq_ignore_ascii_case("auth__organisation_id") {
            continue;
        }
        let v = value.trim();
        let (what, example) = match v.chars().next() {
            Some('[') => ("a TOML list", r#"["/run/secrets/jwt"] or [1, 2]"#),
            Some('{') => ("a TOML inline table", r#"{ key = "value" }"#),
            Some('"') => ("a quoted string", r#""text""#),
            _ => continue,
        };
        // figment falls back to the raw text when it cannot parse a value.
        let parsed: figment::value::Value = v.parse().unwrap_or_else(|never| match never {});
        if matches!(&parsed, figment::value::Value::String(_, s) if s == v) {
            errs.push(Diagnostic::new(
                format!("environment {name}"),
                format!("the value starts like {what} but does not parse (value not shown); write e.g. {example}"),
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(errs))
    }
}

/// figment's error kinds in the words of a configuration (its own wording nests backquotes:
/// "expected `one of `listen`, `path``").
fn figment_message(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(name, expected) => unknown_message("key", name, expected, "known keys"),
        Kind::UnknownVariant(name, expected) => unknown_message("value", name, expected, "one of"),
        Kind::Message(m) => explain_serde_message(m),
        other => other.to_string(),
    }
}

/// What a command needs of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Everything `serve` needs, secrets included (`serve`, `check`, `token`).
    Serve,
    /// Routing only (`explain`, `test`): no secret is read or required, so that a routes
    /// file can be tested in its owner's CI, which has no JWT secret.
    Routing,
}

impl Config {
    /// Loads and validates. `path` is `--config`; without it `webio-router.toml` in the
    /// working directory is used when it exists.
    pub fn load(path: Option<&Path>, routes_override: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::load_for(path, routes_override, Purpose::Serve)
    }

    pub fn load_for(
        path: Option<&Path>,
        routes_override: Option<&Path>,
        purpose: Purpose,
    ) -> Result<Loaded, ConfigError> {
        let file = match path {
            Some(p) if !p.is_file() => {
                return Err(Diagnostic::new(p.display().to_string(), "config file not found or not a file").into())
            }
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
        };
        let mut figment = Figment::new();
        if let Some(file) = &file {
            let source = file.display().to_string();
            let text = std::fs::read_to_string(file)
                .map_err(|e| Diagnostic::new(source.clone(), format!("cannot read: {e}")))?;
            // Parsing with `toml` first gives line:col for syntax errors and unknown keys.
            if let Err(e) = toml::from_str::<Config>(&text) {
                let msg = explain_serde_message(e.message());
                return Err(match e.span() {
                    Some(span) => Diagnostic::at(source, &text, span.start, msg),
                    None => Diagnostic::new(source, msg),
                }
                .into());
            }
            figment = figment.merge(Toml::string(&text));
        }
        check_environment_syntax(std::env::vars_os())?;
        figment = figment.merge(Env::prefixed(ENV_PREFIX).filter(|k| is_config_variable(k.as_str())).split("__"));
        let mut config: Config = figment.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| {
                        let key = e.path.join(".");
                        let from_env = e.metadata.as_ref().is_some_and(|m| m.name.contains("environment"));
                        let source = if from_env {
                            // `auth.algorithms.0` comes from WEBIO_ROUTER_AUTH__ALGORITHMS: drop list indices.
                            let var: Vec<String> = e
                                .path
                                .iter()
                                .take_while(|p| !p.bytes().all(|b| b.is_ascii_digit()))
                                .map(|p| p.to_uppercase())
                                .collect();
                            format!("environment {ENV_PREFIX}{}", var.join("__"))
                        } else {
                            file.as_ref().map_or("configuration".into(), |f| f.display().to_string())
                        };
                        let message = figment_message(&e.kind);
                        Diagnostic::new(source, if key.is_empty() { message } else { format!("{key}: {message}") })
                    })
                    .collect(),
            )
        })?;
        // figment reads environment values as TOML-ish values, so `0042` would become 42:
        // an organisation id is an identifier, taken verbatim.
        if let Ok(raw) = std::env::var(format!("{ENV_PREFIX}AUTH__ORGANISATION_ID")) {
            config.auth.organisation_id = raw.trim().trim_matches('"').to_owned();
        }
        if let Some(r) = routes_override {
            config.routes_file = r.to_path_buf();
        }
        let source = file.as_ref().map_or("configuration".to_owned(), |f| f.display().to_string());
        config.validate(&source, purpose).map(|(secrets, normalise)| Loaded { config, file, secrets, normalise })
    }

    /// The settings a SIGHUP does not apply (everything but `auth` and `routes_file`), as
    /// text, to tell an operator that a changed file needs a restart.
    pub fn restart_settings(&self) -> String {
        // The certificate files are re-read on SIGHUP (paths included); only turning TLS on or
        // off needs a restart.
        let server = ServerConfig {
            tls_cert_file: self.server.tls_files().map(|_| PathBuf::from("(on)")),
            tls_key_file: None,
            ..self.server.clone()
        };
        format!("{:?} {:?} {:?} {:?} {:?}", server, self.admin, self.normalise, self.delivery, self.log)
    }

    /// The secrets of `auth.secrets` then `auth.secret_files`, in order (index 0 signs
    /// tokens), each problem reported through `err` (never with the secret in it).
    fn secrets(&self, err: &mut impl FnMut(String)) -> Vec<Secret> {
        let mut secrets = self.auth.secrets.clone();
        for (i, s) in self.auth.secrets.iter().enumerate() {
            if s.expose().len() < MIN_SECRET_BYTES {
                err(format!(
                    "auth.secrets[{i}]: secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                    s.expose().len()
                ));
            }
        }
        for f in &self.auth.secret_files {
            match std::fs::read(f) {
                Ok(mut bytes) => {
                    // Files written by `echo` or editors end in a newline that is not part of the secret.
                    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        bytes.pop();
                    }
                    if bytes.len() < MIN_SECRET_BYTES {
                        err(format!(
                            "auth.secret_files: {}: secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                            f.display(),
                            bytes.len()
                        ));
                    }
                    secrets.push(Secret::new(bytes));
                }
                Err(e) => err(format!("auth.secret_files: cannot read {}: {e}", f.display())),
            }
        }
        // An unreadable secret file is reported above already.
        if secrets.is_empty() && !self.auth.disabled && self.auth.secret_files.is_empty() {
            err("auth: no secret configured (auth.secrets or auth.secret_files); set auth.disabled = true only for local experiments".into());
        }
        secrets
    }

    /// Reads the secrets again (inline and files), for a reload: what `serve` would refuse
    /// to start with is refused here too.
    pub fn load_secrets(&self, source: &str) -> Result<Vec<Secret>, ConfigError> {
        let mut errs = Vec::new();
        let secrets = self.secrets(&mut |m| errs.push(Diagnostic::new(source, m)));
        if errs.is_empty() {
            Ok(secrets)
        } else {
            Err(ConfigError(errs))
        }
    }

    fn validate(&self, source: &str, purpose: Purpose) -> Result<(Vec<Secret>, NormaliseOptions), ConfigError> {
        let mut errs = Vec::new();
        let mut err = |m: String| errs.push(Diagnostic::new(source, m));
        let mut secrets = Vec::new();
        if purpose == Purpose::Serve {
            secrets = self.secrets(&mut err);
        }
        if self.auth.algorithms.is_empty() {
            err("auth.algorithms: at least one of HS256, HS384, HS512 is required".into());
        }
        if http::HeaderName::from_bytes(self.auth.header.as_bytes()).is_err() {
            err(format!("auth.header: {:?} is not a valid HTTP header name", self.auth.header));
        }
        if self.auth.organisation_claim.is_empty() {
            err("auth.organisation_claim: must not be empty".into());
        }
        if !self.server.path.starts_with('/') {
            err(format!("server.path: {:?} must start with /", self.server.path));
        }
        if self.server.max_body_bytes == 0 {
            err("server.max_body_bytes: must be greater than 0".into());
        }
        if self.server.request_timeout.is_zero() {
            err("server.request_timeout: must be greater than 0".into());
        }
        if let Some(e) = self.server.validate_tls() {
            err(e);
        }
        if self.server.listen == self.admin.listen && self.server.listen.port() != 0 {
            err(format!("admin.listen: {} is also server.listen", self.admin.listen));
        }
        let tz = match self.normalise.source_timezone.parse::<chrono_tz::Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                err(format!(
                    "normalise.source_timezone: unknown time zone {:?} (use an IANA name like \"Europe/London\")",
                    self.normalise.source_timezone
                ));
                chrono_tz::Tz::UTC
            }
        };
        let d = &self.delivery;
        if d.retry_initial.is_zero() || d.retry_initial > d.retry_max {
            err("delivery.retry_initial: must be greater than 0 and at most delivery.retry_max".into());
        }
        if d.max_attempts == 0 {
            err("delivery.max_attempts: must be at least 1".into());
        }
        if d.max_spool_bytes == 0 {
            err("delivery.max_spool_bytes: must be greater than 0".into());
        }
        if d.max_rejected_bytes == 0 {
            err("delivery.max_rejected_bytes: must be greater than 0".into());
        }
        if let Some(e) = d.dedup_store().and_then(|url| dedup_store::check_url(url).err()) {
            err(format!("delivery.dedup_store: {e}"));
        }
        if let Err(e) = dedup_store::read_ca(d.dedup_store().unwrap_or(""), d.dedup_store_ca_file.as_deref()) {
            err(format!("delivery.dedup_store_ca_file: {e}"));
        }
        if self.custom_values.enabled() {
            self.custom_values.validate().into_iter().for_each(&mut err);
        }
        self.ingest.validate().into_iter().for_each(&mut err);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            err(format!("log.level: {:?} is not a level or filter (error, warn, info, debug, trace)", self.log.level));
        }
        if errs.is_empty() {
            Ok((
                secrets,
                NormaliseOptions {
                    source_timezone: tz,
                    legacy_send_status_codes: self.normalise.legacy_send_status_codes.clone(),
                },
            ))
        } else {
            Err(ConfigError(errs))
        }
    }
}

#[cfg(test)]
mod tests;
