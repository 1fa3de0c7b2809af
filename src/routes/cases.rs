//! Routing test cases, `webio-router test FILE…`: payloads with the routes and sinks they must
//! reach, so that a `routes.toml` can be tested in its owner's CI like code.
//!
//! ```toml
//! [[cases]]
//! name = "failed deliveries go to the CRM"
//! payload = '{"type":"messageStatusUpdate","conversationId":"1","communicationActionId":"2","statusCode":"3"}'
//! # or: payload_file = "cases/failed.json" (relative to this file), or payload = { type = "…", … }
//! org = "1234"                     # optional: the token's organisation (default: auth.organisation_id)
//! routes = ["failed-deliveries"]   # exactly these routes match, in this order
//! sinks = ["crm"]                  # exactly these sinks receive the event, in any order
//! event = { type = "messageStatusUpdate", statusCode = 3 }   # optional: normalised fields
//! ```
//!
//! A file is checked whole before any case runs: a case that could never hold (a route or sink
//! that does not exist, a payload the router would refuse, no expectation at all) makes the
//! file bad, reported as `file:line:col: message`. Running a case never sends anything.

use super::Routes;
use crate::config::{did_you_mean, explain_serde_message, ConfigError, Diagnostic};
use crate::event::{is_field, normalise, Event, NormaliseOptions, FIELDS};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Spanned<String>,
    payload: Option<Spanned<toml::Value>>,
    payload_file: Option<Spanned<String>>,
    org: Option<Spanned<toml::Value>>,
    routes: Option<Spanned<Vec<String>>>,
    sinks: Option<Spanned<Vec<String>>>,
    event: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
}

/// One case, checked and ready to run.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    /// 1-based line of the case's `name`.
    pub line: usize,
    pub event: Event,
    /// The routes that must match, in order (`None`: not checked).
    pub routes: Option<Vec<String>>,
    /// The sinks that must receive the event, in any order (`None`: not checked).
    pub sinks: Option<Vec<String>>,
    /// Normalised fields that must have these values.
    pub fields: Vec<(String, Value)>,
}

/// What a case expected and what the routes did, for each expectation that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `routes`, `sinks` or `event.<field>`.
    pub what: String,
    pub expected: String,
    pub actual: String,
}

impl Case {
    /// Runs the case against `routes`; an empty list means it holds.
    pub fn run(&self, routes: &Routes) -> Vec<Mismatch> {
        let matched = routes.matching(&self.event);
        let mut out = Vec::new();
        if let Some(want) = &self.routes {
            if *want != matched.routes {
                out.push(Mismatch { what: "routes".into(), expected: list(want), actual: list(&matched.routes) });
            }
        }
        if let Some(want) = &self.sinks {
            let mut w: Vec<&str> = want.iter().map(String::as_str).collect();
            let mut got = matched.sinks.clone();
            w.sort_unstable();
            got.sort_unstable();
            if w != got {
                out.push(Mismatch { what: "sinks".into(), expected: list(want), actual: list(&matched.sinks) });
            }
        }
        if !self.fields.is_empty() {
            let ev = serde_json::to_value(&self.event).expect("events serialise");
            for (field, want) in &self.fields {
                let got = match field.strip_prefix("extra.") {
                    Some(name) => ev["extra"].get(name).cloned().unwrap_or(Value::Null),
                    None => ev.get(field).cloned().unwrap_or(Value::Null),
                };
                if got != *want {
                    out.push(Mismatch {
                        what: format!("event.{field}"),
                        expected: want.to_string(),
                        actual: got.to_string(),
                    });
                }
            }
        }
        out
    }
}

fn list<S: AsRef<str>>(items: &[S]) -> String {
    serde_json::to_string(&items.iter().map(AsRef::as_ref).collect::<Vec<_>>()).expect("strings serialise")
}

/// Reads and checks a test file against `routes`. `org` is the organisation a case without
/// `org` is normalised with.
pub fn load(
    path: &Path,
    routes: &Routes,
    normalise: &NormaliseOptions,
    org: Option<&str>,
) -> Result<Vec<Case>, ConfigError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::new(source.clone(), format!("cannot read test file: {e}")))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&source, &text, base, routes, normalise, org)
}

/// Parses a test file's `text` (named `source`); `payload_file`s are relative to `base`.
pub fn parse(
    source: &str,
    text: &str,
    base: &Path,
    routes: &Routes,
    options: &NormaliseOptions,
    default_org: Option<&str>,
) -> Result<Vec<Case>, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => Diagnostic::at(source, text, span.start, explain_serde_message(e.message())),
        None => Diagnostic::new(source, explain_serde_message(e.message())),
    })?;
    let at = |offset: usize, msg: String| Diagnostic::at(source, text, offset, msg);
    let mut errs = Vec::new();
    if raw.cases.is_empty() {
        errs.push(Diagnostic::new(source, "no [[cases]] in this file"));
    }
    let route_names: Vec<&str> = routes.routes.iter().map(|r| r.name.as_str()).collect();
    let sink_names: Vec<&str> = routes.sinks.keys().map(String::as_str).collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut cases = Vec::new();
    for case in raw.cases {
        let case_span = case.span();
        let c = case.into_inner();
        let name_span = c.name.span();
        let name = c.name.into_inner();
        let line = crate::config::line_col(text, name_span.start).0;
        let here = format!("case {name:?}");
        if let Some(first) = seen.insert(name.clone(), line) {
            errs.push(at(name_span.start, format!("{here}: the name is already used at line {first}")));
        }

        let body = match (c.payload, c.payload_file) {
            (Some(_), Some(f)) => {
                errs.push(at(f.span().start, format!("{here}: give `payload` or `payload_file`, not both")));
                None
            }
            (None, None) => {
                errs.push(at(case_span.start, format!("{here}: `payload` or `payload_file` is required")));
                None
            }
            (Some(p), None) => {
                let span = p.span();
                match p.into_inner() {
                    toml::Value::String(s) => Some((s.into_bytes(), span)),
                    toml::Value::Table(t) => Some((serde_json::to_vec(&t).expect("TOML tables serialise"), span)),
                    other => {
                        errs.push(at(
                            span.start,
                            format!("{here}: `payload` is JSON text or a table, not {}", other.type_str()),
                        ));
                        None
                    }
                }
            }
            (None, Some(f)) => {
                let span = f.span();
                let file = base.join(f.into_inner());
                match std::fs::read(&file) {
                    Ok(b) => Some((b, span)),
                    Err(e) => {
                        errs.push(at(span.start, format!("{here}: cannot read {}: {e}", file.display())));
                        None
                    }
                }
            }
        };

        let org = match c.org {
            None => default_org.map(str::to_owned),
            Some(o) => match o.get_ref() {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                other => {
                    errs.push(at(o.span().start, format!("{here}: `org` is a string, not {}", other.type_str())));
                    None
                }
            },
        };

        if c.routes.is_none() && c.sinks.is_none() && c.event.is_none() {
            errs.push(at(name_span.start, format!("{here}: expects nothing; give `routes`, `sinks` or `event`")));
        }
        let mut known = |names: &Option<Spanned<Vec<String>>>, defined: &[&str], what: &str| {
            let Some(names) = names else { return };
            for n in names.get_ref() {
                if !defined.contains(&n.as_str()) {
                    let hint = did_you_mean(n, defined.iter().copied())
                        .map_or(String::new(), |d| format!(": did you mean {d:?}?"));
                    errs.push(at(names.span().start, format!("{here}: no {what} {n:?} in the routes file{hint}")));
                }
            }
        };
        known(&c.routes, &route_names, "route");
        known(&c.sinks, &sink_names, "sink");

        let mut fields = Vec::new();
        for (field, value) in c.event.unwrap_or_default() {
            let (fspan, field) = (field.span(), field.into_inner());
            if !is_field(&field) {
                let hint = did_you_mean(&field, FIELDS.iter().copied())
                    .map_or(String::new(), |d| format!(": did you mean {d:?}?"));
                errs.push(at(fspan.start, format!("{here}: event.{field}: unknown field{hint}")));
                continue;
            }
            fields.push((field, serde_json::to_value(value.into_inner()).expect("TOML values serialise")));
        }

        let Some((body, body_span)) = body else { continue };
        match normalise(&body, org, options, chrono::Utc::now()) {
            Ok(event) => cases.push(Case {
                name,
                line,
                event,
                routes: c.routes.map(Spanned::into_inner),
                sinks: c.sinks.map(Spanned::into_inner),
                fields,
            }),
            Err(e) => {
                errs.push(at(body_span.start, format!("{here}: the router would refuse this payload with 400: {e}")))
            }
        }
    }
    if errs.is_empty() {
        Ok(cases)
    } else {
        errs.sort_by_key(|d| d.line);
        Err(ConfigError(errs))
    }
}

#[cfg(test)]
mod tests;
