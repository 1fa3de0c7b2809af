//! `routes.toml`: named sinks and ordered routes. Parsing keeps source spans so every
//! problem is reported as `file:line:col: message`; matching is pure and allocation-light.

use crate::config::{ConfigError, Diagnostic};
use crate::event::{is_field, Event, FieldValue};
use crate::sinks::SinkConfig;
use crate::template::expand_env;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

/// A sink table with a span for each key, so option errors point at their line.
type RawSink = Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    sinks: BTreeMap<Spanned<String>, RawSink>,
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
    pub routes: Vec<Route>,
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
        let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => Diagnostic::at(source, text, span.start, e.message().to_owned()),
            None => Diagnostic::new(source, e.message().to_owned()),
        })?;
        let mut errs = Vec::new();
        let at = |offset: usize, msg: String| Diagnostic::at(source, text, offset, msg);

        let mut sinks = BTreeMap::new();
        // Sinks already reported as invalid: routes naming them are not reported again.
        let mut broken = Vec::new();
        for (name, table) in raw.sinks {
            let (name_span, name) = (name.span(), name.into_inner());
            let mut value = toml::Table::new();
            let mut key_spans = BTreeMap::new();
            let mut expanded = true;
            let table = table.into_inner();
            let sink_type = table.iter().find(|(k, _)| k.get_ref() == "type").and_then(|(_, v)| v.get_ref().as_str());
            let templates = crate::sinks::template_options(sink_type.unwrap_or(""));
            for (k, v) in table {
                let (span, key) = (v.span(), k.into_inner());
                let mut v = v.into_inner();
                // A value from the environment is data, never template syntax: braces in an API
                // key must neither break the load nor be echoed in a template error.
                let literal = |name: &str| {
                    let value = env(name)?;
                    Some(if templates.contains(&key.as_str()) {
                        value.replace('{', "{{").replace('}', "}}")
                    } else {
                        value
                    })
                };
                if let Err(e) = expand_value(&mut v, &literal) {
                    errs.push(at(span.start, format!("sinks.{name}.{key}: {e}")));
                    expanded = false;
                }
                key_spans.insert(key.clone(), span.start);
                value.insert(key, v);
            }
            if !expanded {
                // Already reported; validating the unexpanded text would only add noise.
                broken.push(name);
                continue;
            }
            match toml::Value::Table(value).try_into::<SinkConfig>() {
                Ok(cfg) => {
                    for (key, msg) in cfg.validate() {
                        let top = key.split('.').next().unwrap_or(&key);
                        let offset = key_spans.get(top).copied().unwrap_or(name_span.start);
                        errs.push(at(offset, format!("sinks.{name}.{key}: {msg}")));
                    }
                    sinks.insert(name, cfg);
                }
                Err(e) => {
                    // An option's own error starts with its name (`timeout: …`): point at it.
                    let msg = e.message();
                    match msg.split_once(": ").and_then(|(key, rest)| Some((key, rest, key_spans.get(key)?))) {
                        Some((key, rest, offset)) => errs.push(at(*offset, format!("sinks.{name}.{key}: {rest}"))),
                        None => errs.push(at(name_span.start, format!("sinks.{name}: {msg}"))),
                    }
                    broken.push(name);
                }
            }
        }

        let mut routes = Vec::new();
        for (i, route) in raw.routes.into_iter().enumerate() {
            let span = route.span();
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
                        errs.push(at(fspan.start, format!("routes[{i}] ({name}): unknown field {field:?} in `when` (use a normalised field name or extra.<name>)")));
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
                if !sinks.contains_key(s)
                    && !errs.iter().any(|d: &Diagnostic| d.message.starts_with(&format!("sinks.{s}:")))
                {
                    errs.push(at(
                        to_span.start,
                        format!("routes[{i}] ({name}): sink {s:?} is not defined under [sinks]"),
                    ));
                }
            }
            let _ = span;
            routes.push(Route { name, when, to, stop: r.stop });
        }
        if errs.is_empty() {
            Ok(Routes { sinks, routes })
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

fn expand_value(
    v: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), crate::template::TemplateError> {
    match v {
        toml::Value::String(s) => *s = expand_env(s, env)?,
        toml::Value::Array(a) => a.iter_mut().try_for_each(|v| expand_value(v, env))?,
        toml::Value::Table(t) => t.iter_mut().try_for_each(|(_, v)| expand_value(v, env))?,
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

fn patterns(v: toml::Value) -> Result<Vec<Pattern>, String> {
    fn one(v: toml::Value) -> Result<Pattern, String> {
        match v {
            toml::Value::String(s) => Ok(Pattern::Text(s)),
            toml::Value::Integer(i) => Ok(Pattern::Int(i)),
            toml::Value::Boolean(b) => Ok(Pattern::Bool(b)),
            other => Err(format!("{} is not a string, integer or boolean", other.type_str())),
        }
    }
    match v {
        toml::Value::Array(items) if items.is_empty() => Err("an empty list matches nothing".into()),
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
