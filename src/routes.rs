//! `routes.toml`: named sinks and ordered routes. Parsing keeps source spans so every
//! problem is reported as `file:line:col: message`; matching is pure and allocation-light.

use crate::config::{did_you_mean, explain_serde_message, ConfigError, DeliveryMode, Diagnostic};
use crate::event::{is_field, Event, FieldValue, FIELDS};
use crate::sinks::limit::Limits;
use crate::sinks::{SinkConfig, SinkOrdering};
use crate::template::expand_env;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub mod cases;

/// The file's structure and its routes. Sink tables are read again from the spanned
/// document ([`DeTable`]) so that each option keeps its own position.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    #[allow(dead_code)]
    sinks: BTreeMap<String, toml::Table>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    #[serde(default)]
    when: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    to: Spanned<OneOrMany>,
    #[serde(default)]
    stop: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// One `when` value: a scalar or a list of alternatives.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// Exact text, or a glob when it contains `*`.
    Text(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub field: String,
    pub any_of: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub when: Vec<Condition>,
    pub to: Vec<String>,
    pub stop: bool,
}

/// A parsed and validated routes file.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub sinks: BTreeMap<String, SinkConfig>,
    /// `rate_limit` and `concurrency` of each sink of `sinks` (options common to every type).
    pub limits: BTreeMap<String, Limits>,
    pub routes: Vec<Route>,
    /// The file's name in diagnostics, and where each sink's `ordering` option is written
    /// (line, column), for [`Routes::check_delivery_mode`].
    source: String,
    ordering_at: BTreeMap<String, (usize, usize)>,
}

/// Which routes matched and which sinks (each once, in first-named order) get the event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matched<'a> {
    pub routes: Vec<&'a str>,
    pub sinks: Vec<&'a str>,
}

impl Routes {
    pub fn load(path: &Path) -> Result<Routes, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Diagnostic::new(source.clone(), format!("cannot read routes file: {e}")))?;
        Self::parse(&source, &text, |k| std::env::var(k).ok())
    }

    /// Parses `text` (named `source` in diagnostics); `env` resolves `${NAME}`.
    pub fn parse(source: &str, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Routes, ConfigError> {
        let toml_error = |e: toml::de::Error| match e.span() {
            Some(span) => Diagnostic::at(source, text, span.start, explain_serde_message(e.message())),
            None => Diagnostic::new(source, explain_serde_message(e.message())),
        };
        let raw: RawFile = toml::from_str(text).map_err(toml_error)?;
        let doc = DeTable::parse(text).map_err(toml_error)?;
        let mut errs = Vec::new();
        let at = |offset: usize, msg: String| Diagnostic::at(source, text, offset, msg);

        let mut sinks = BTreeMap::new();
        let mut limits = BTreeMap::new();
        let mut ordering_at = BTreeMap::new();
        // Sinks already reported as invalid: routes naming them are not reported again.
        let mut broken = Vec::new();
        let no_sinks = DeTable::new();
        let tables = doc.get_ref().get("sinks").and_then(|s| s.get_ref().as_table()).unwrap_or(&no_sinks);
        for (name, table) in tables.iter() {
            let (name_span, name) = (name.span(), name.get_ref().to_string());
            match parse_sink(&name, name_span.clone(), table.clone(), text, &env) {
                Ok((cfg, lim)) => {
                    limits.insert(name.clone(), lim);
                    let written = table.get_ref().as_table().and_then(|t| value_span(t, "ordering"));
                    if let Some(span) = written {
                        ordering_at.insert(name.clone(), crate::config::line_col(text, span.start));
                    }
                    sinks.insert(name, cfg);
                }
                Err(problems) => {
                    errs.extend(problems.into_iter().map(|(offset, msg)| at(offset, msg)));
                    broken.push(name);
                }
            }
        }

        let mut routes = Vec::new();
        for (i, route) in raw.routes.into_iter().enumerate() {
            let r = route.into_inner();
            let name = r.name.unwrap_or_else(|| format!("#{}", i + 1));
            let mut when = Vec::new();
            for (field, value) in r.when {
                let (fspan, field) = (field.span(), field.into_inner());
                let vspan = value.span();
                // An unquoted dotted key (`extra.channel = "sms"`) arrives as a nested table.
                let mut flat = Vec::new();
                flatten_when(field, value.into_inner(), &mut flat);
                for (field, value) in flat {
                    if !is_field(&field) {
                        let hint = did_you_mean(&field, FIELDS.iter().copied())
                            .map_or(String::new(), |f| format!(": did you mean {f:?}?"));
                        errs.push(at(fspan.start, format!("routes[{i}] ({name}): unknown field {field:?} in `when`{hint} (use a normalised field name or extra.<name>)")));
                        continue;
                    }
                    match patterns(value) {
                        Ok(any_of) => when.push(Condition { field, any_of }),
                        Err(m) => errs.push(at(vspan.start, format!("routes[{i}] ({name}): when.{field}: {m}"))),
                    }
                }
            }
            let to_span = r.to.span();
            let to = match r.to.into_inner() {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            if to.is_empty() {
                errs.push(at(to_span.start, format!("routes[{i}] ({name}): `to` names no sink")));
            }
            for s in &to {
                if !sinks.contains_key(s) && !broken.contains(s) {
                    let defined = tables.iter().map(|(k, _)| k.get_ref().as_ref());
                    let hint = did_you_mean(s, defined).map_or(String::new(), |d| format!(" (did you mean {d:?}?)"));
                    errs.push(at(
                        to_span.start,
                        format!("routes[{i}] ({name}): sink {s:?} is not defined under [sinks]{hint}"),
                    ));
                }
            }
            routes.push(Route { name, when, to, stop: r.stop });
        }
        if errs.is_empty() {
            Ok(Routes { sinks, limits, routes, source: source.to_owned(), ordering_at })
        } else {
            // In file order, whatever order the checks ran in.
            errs.sort_by_key(|d| d.line);
            Err(ConfigError(errs))
        }
    }

    /// `ordering` needs the spool: `delivery.mode = "direct"` keeps no queue in which a later
    /// event could wait while Webio retries an earlier one, so a sink that asks for ordering
    /// is refused there (at its option) rather than silently not ordered.
    pub fn check_delivery_mode(&self, mode: DeliveryMode) -> Result<(), ConfigError> {
        if mode != DeliveryMode::Direct {
            return Ok(());
        }
        let errs: Vec<Diagnostic> = self
            .sinks
            .iter()
            .filter(|(_, cfg)| cfg.ordering() != SinkOrdering::None)
            .map(|(name, cfg)| Diagnostic {
                source: self.source.clone(),
                line: self.ordering_at.get(name).copied(),
                message: format!(
                    "sinks.{name}.ordering: {:?} needs delivery.mode = \"spool\" (direct delivery keeps no queue in which a conversation's later events could wait for an earlier one); use the spool or remove the option",
                    cfg.ordering().as_str()
                ),
            })
            .collect();
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs))
        }
    }

    /// Routes in file order; every matching route counts until one with `stop` matched.
    pub fn matching<'a>(&'a self, ev: &Event) -> Matched<'a> {
        let mut m = Matched::default();
        for r in &self.routes {
            if r.when.iter().all(|c| c.matches(ev)) {
                m.routes.push(&r.name);
                for s in &r.to {
                    if !m.sinks.contains(&s.as_str()) {
                        m.sinks.push(s);
                    }
                }
                if r.stop {
                    break;
                }
            }
        }
        m
    }
}

/// One sink table: `${NAME}` expanded, `type` checked, options deserialised and validated.
/// Problems come back as `(byte offset, message)`, each at the option it is about.
fn parse_sink(
    name: &str,
    name_span: Range<usize>,
    mut table: Spanned<DeValue<'_>>,
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(SinkConfig, Limits), Vec<(usize, String)>> {
    let table_span = table.span();
    let DeValue::Table(options) = table.get_mut() else {
        return Err(vec![(table_span.start, format!("sinks.{name}: must be a table of options"))]);
    };
    let types = crate::sinks::TYPES.join(", ");
    let sink_type = match options.remove("type") {
        None => return Err(vec![(name_span.start, format!("sinks.{name}: missing `type` (one of {types})"))]),
        Some(t) => match t.get_ref().as_str() {
            Some(s) if crate::sinks::TYPES.contains(&s) => s.to_owned(),
            Some(s) => {
                let hint = did_you_mean(s, crate::sinks::TYPES.iter().copied())
                    .map_or(String::new(), |d| format!(": did you mean {d:?}?"));
                return Err(vec![(
                    t.span().start,
                    format!("sinks.{name}.type: unknown sink type {s:?}{hint} (one of {types})"),
                )]);
            }
            None => return Err(vec![(t.span().start, format!("sinks.{name}.type: must be a string, one of {types}"))]),
        },
    };
    // Spans of the options as written, before expansion changes any value.
    let written = options.clone();

    let mut problems = Vec::new();
    let templates = crate::sinks::template_options(&sink_type);
    for (key, value) in options.iter_mut() {
        let key = key.get_ref().to_string();
        // A value from the environment is data, never template syntax: braces in an API
        // key must neither break the load nor be echoed in a template error.
        let literal = |var: &str| {
            let value = env(var)?;
            Some(if templates.contains(&key.as_str()) { value.replace('{', "{{").replace('}', "}}") } else { value })
        };
        let span = value.span();
        if let Err(e) = expand_value(value.get_mut(), &literal) {
            problems.push((span.start, format!("sinks.{name}.{key}: {e}")));
        }
    }
    if !problems.is_empty() {
        // Validating the unexpanded text would only add noise.
        return Err(problems);
    }
    let limits = take_limits(name, options, &mut problems);
    match SinkConfig::deserialize_typed(&sink_type, ValueDeserializer::from(table)) {
        Ok(Some(cfg)) => {
            for (key, msg) in cfg.validate() {
                let offset = value_span(&written, &key).map_or(name_span.start, |s| s.start);
                problems.push((offset, format!("sinks.{name}.{key}: {msg}")));
            }
            if problems.is_empty() {
                Ok((cfg, limits))
            } else {
                Err(problems)
            }
        }
        Ok(None) => unreachable!("the type was checked above"),
        Err(e) => {
            let span = e.span().unwrap_or(name_span.clone());
            let mut msg = explain_serde_message(e.message());
            // serde quotes the value it refused; one that came from `${NAME}` may be a secret.
            if text.get(span.clone()).is_some_and(|t| t.contains("${")) {
                let expected = msg.rfind(", expected ").map_or("", |i| &msg[i..]).to_owned();
                msg = format!("invalid value from the environment (not shown){expected}");
            }
            let key = if msg.starts_with("unknown key") { None } else { key_at(&written, span.start) };
            // Some options name themselves in their message (`url: …`): say it once.
            if let Some(last) = key.as_deref().and_then(|k| k.rsplit('.').next()) {
                if let Some(rest) = msg.strip_prefix(&format!("{last}: ")) {
                    msg = rest.to_owned();
                }
            }
            let prefix = key.map_or(format!("sinks.{name}"), |k| format!("sinks.{name}.{k}"));
            Err(vec![(span.start, format!("{prefix}: {msg}"))])
        }
    }
}

/// `rate_limit` and `concurrency`, common to every sink type: taken out of the table (after
/// `${NAME}` expansion) before the rest is read as the type's own options.
fn take_limits(name: &str, options: &mut DeTable<'_>, problems: &mut Vec<(usize, String)>) -> Limits {
    let mut limits = Limits::default();
    if let Some(v) = options.remove("rate_limit") {
        let at = v.span().start;
        match v.get_ref().as_str().map(str::parse) {
            Some(Ok(rate)) => limits.rate_limit = Some(rate),
            Some(Err(e)) => problems.push((at, format!("sinks.{name}.rate_limit: {e}"))),
            None => {
                problems.push((at, format!("sinks.{name}.rate_limit: must be a string, e.g. \"50/s\" or \"600/m\"")))
            }
        }
    }
    if let Some(v) = options.remove("concurrency") {
        let at = v.span().start;
        match v.get_ref().as_integer().and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok()) {
            Some(n) => match Limits::concurrency_value(n) {
                Ok(n) => limits.concurrency = Some(n),
                Err(e) => problems.push((at, format!("sinks.{name}.concurrency: {e}"))),
            },
            None => problems.push((
                at,
                format!("sinks.{name}.concurrency: must be an integer (deliveries in flight at once), e.g. 4"),
            )),
        }
    }
    limits
}

/// The span of the value at `path` (`url`, `headers.x-api-key`, `properties.compression.type`:
/// a key may itself contain dots, so the longest key that fits is taken at each level).
fn value_span(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut best: Option<Range<usize>> = None;
    for (k, v) in table.iter() {
        let k = k.get_ref().as_ref();
        if path == k {
            return Some(v.span());
        }
        if let Some(rest) = path.strip_prefix(k).and_then(|r| r.strip_prefix('.')) {
            best = match v.get_ref().as_table() {
                Some(t) => value_span(t, rest).or(Some(v.span())),
                None => Some(v.span()),
            };
        }
    }
    best
}

/// The dotted path of the innermost option whose key or value contains `offset`.
fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    for (k, v) in table.iter() {
        let inside = |r: Range<usize>| r.contains(&offset);
        if inside(k.span()) || inside(v.span()) {
            let inner = v.get_ref().as_table().and_then(|t| key_at(t, offset));
            return Some(match inner {
                Some(i) => format!("{}.{i}", k.get_ref()),
                None => k.get_ref().to_string(),
            });
        }
    }
    None
}

fn expand_value(
    v: &mut DeValue<'_>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), crate::template::TemplateError> {
    match v {
        DeValue::String(s) => *s = std::borrow::Cow::Owned(expand_env(s, env)?),
        DeValue::Array(a) => a.iter_mut().try_for_each(|v| expand_value(v.get_mut(), env))?,
        DeValue::Table(t) => t.iter_mut().try_for_each(|(_, v)| expand_value(v.get_mut(), env))?,
        _ => {}
    }
    Ok(())
}

/// `extra = { channel = "sms" }` (what TOML makes of `extra.channel = "sms"`) → `extra.channel`.
fn flatten_when(key: String, v: toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) if !t.is_empty() => {
            for (k, v) in t {
                flatten_when(format!("{key}.{k}"), v, out);
            }
        }
        v => out.push((key, v)),
    }
}

/// Why a `when` value is not a pattern.
#[derive(Debug, thiserror::Error)]
enum PatternError {
    #[error("{0} is not a string, integer or boolean")]
    Type(&'static str),
    #[error("an empty list matches nothing")]
    Empty,
}

fn patterns(v: toml::Value) -> Result<Vec<Pattern>, PatternError> {
    fn one(v: toml::Value) -> Result<Pattern, PatternError> {
        match v {
            toml::Value::String(s) => Ok(Pattern::Text(s)),
            toml::Value::Integer(i) => Ok(Pattern::Int(i)),
            toml::Value::Boolean(b) => Ok(Pattern::Bool(b)),
            other => Err(PatternError::Type(other.type_str())),
        }
    }
    match v {
        toml::Value::Array(items) if items.is_empty() => Err(PatternError::Empty),
        toml::Value::Array(items) => items.into_iter().map(one).collect(),
        v => one(v).map(|p| vec![p]),
    }
}

impl Condition {
    pub fn matches(&self, ev: &Event) -> bool {
        let value = ev.field(&self.field);
        self.any_of.iter().any(|p| p.matches(&value))
    }
}

impl Pattern {
    fn matches(&self, value: &FieldValue<'_>) -> bool {
        match (self, value) {
            (_, FieldValue::Null) | (_, FieldValue::Json(serde_json::Value::Null)) => false,
            (Pattern::Int(i), FieldValue::Int(v)) => i == v,
            (Pattern::Int(i), FieldValue::Json(serde_json::Value::Number(n))) => n.as_i64() == Some(*i),
            (Pattern::Bool(b), FieldValue::Json(serde_json::Value::Bool(v))) => b == v,
            (Pattern::Text(p), v) => v.to_text().is_some_and(|t| glob(p, &t)),
            // An integer pattern also matches the same digits sent as text (`extra.x = 3` vs "3").
            (Pattern::Int(i), v) => v.to_text().is_some_and(|t| t == i.to_string()),
            (Pattern::Bool(b), v) => v.to_text().is_some_and(|t| t == b.to_string()),
        }
    }
}

/// `*` matches any run of characters (including none); everything else is literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == text;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests;
