//! `{field}` templates (rendered per event) and `${NAME}` environment expansion (at load).

use crate::event::{is_field, Event};

/// How a rendered value is made safe for the place it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As is (AMQP routing keys, header values, Kafka keys).
    None,
    /// One path component: anything but `[A-Za-z0-9._-]` becomes `_`, and no `..`, so a
    /// payload value can never climb out of the sink's directory. A null or empty value
    /// renders [`NULL_SEGMENT`], so that `{conversationId}.jsonl` never names a hidden file.
    PathSegment,
    /// Percent-encoded, for URLs.
    Url,
    /// Kafka topic names allow `[A-Za-z0-9._-]` only.
    Topic,
}

/// What a null (or empty) field renders as in a file path.
pub const NULL_SEGMENT: &str = "null";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    escape: Escape,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown field {{{0}}} in template{hint} (fields: type, shape, conversationId, … or extra.<name>)", hint = field_hint(.0))]
    UnknownField(String),
    #[error("unclosed `{{` in template")]
    Unclosed,
    #[error("unmatched `}}` in template (write `}}}}` for a literal one)")]
    Unmatched,
    #[error("environment variable {0} is not set")]
    UnsetVar(String),
    #[error("unclosed `${{` in value")]
    UnclosedVar,
}

/// ": did you mean {statusCode}?" for a near miss such as `{statuscode}`.
fn field_hint(name: &str) -> String {
    crate::config::suggest::did_you_mean(name, crate::event::FIELDS.iter().copied())
        .map_or(String::new(), |f| format!(": did you mean {{{f}}}?"))
}

impl Template {
    /// Parses `text`; `{{` and `}}` are literal braces.
    pub fn parse(text: &str, escape: Escape) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(TemplateError::Unmatched),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(TemplateError::Unclosed),
                        }
                    }
                    let name = name.trim().to_owned();
                    if !is_field(&name) {
                        return Err(TemplateError::UnknownField(name));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(name));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts, escape })
    }

    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Renders for one event; a null field renders as the empty string, except in a path
    /// segment ([`NULL_SEGMENT`]).
    pub fn render(&self, event: &Event) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Field(name) => match event.field(name).to_text() {
                    Some(v) if !(v.is_empty() && self.escape == Escape::PathSegment) => {
                        escape_into(&mut out, &v, self.escape)
                    }
                    _ if self.escape == Escape::PathSegment => out.push_str(NULL_SEGMENT),
                    _ => {}
                },
            }
        }
        out
    }
}

fn escape_into(out: &mut String, v: &str, escape: Escape) {
    match escape {
        Escape::None => out.push_str(v),
        Escape::PathSegment | Escape::Topic => {
            let start = out.len();
            out.extend(v.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }));
            if escape == Escape::PathSegment && out[start..].starts_with('.') {
                out.replace_range(start..start + 1, "_");
            }
        }
        Escape::Url => {
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
}

/// Expands `${NAME}` from the environment; `$$` is a literal `$`. Unset is an error.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').ok_or(TemplateError::UnclosedVar)?;
            let name = &r[..end];
            out.push_str(&lookup(name).ok_or_else(|| TemplateError::UnsetVar(name.to_owned()))?);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{normalise, NormaliseOptions};

    fn event() -> Event {
        let body =
            br#"{"type":"inboundMessage","conversationId":"../../etc/x y","communicationActionId":7,"tag":"a/b"}"#;
        normalise(body, Some("42".into()), &NormaliseOptions::default(), chrono::Utc::now()).unwrap()
    }

    #[test]
    fn fields_render_and_nulls_render_empty() {
        let t = Template::parse("webio.{type}.{customerUid}.{communicationActionId}", Escape::None).unwrap();
        assert_eq!(t.render(&event()), "webio.inboundMessage..7");
        assert!(!t.is_constant());
        assert!(Template::parse("plain", Escape::None).unwrap().is_constant());
    }

    #[test]
    fn path_segments_cannot_climb_out_of_the_directory() {
        let t = Template::parse("var/{conversationId}.jsonl", Escape::PathSegment).unwrap();
        assert_eq!(t.render(&event()), "var/_._.._etc_x_y.jsonl");
        let t = Template::parse("{extra.tag}", Escape::PathSegment).unwrap();
        assert_eq!(t.render(&event()), "a_b");
    }

    #[test]
    fn a_null_or_empty_field_in_a_path_renders_a_visible_placeholder() {
        let t = Template::parse("var/{customerUid}.jsonl", Escape::PathSegment).unwrap();
        assert_eq!(t.render(&event()), "var/null.jsonl");
        let body = br#"{"type":"inboundMessage","channel":""}"#;
        let ev = normalise(body, None, &NormaliseOptions::default(), chrono::Utc::now()).unwrap();
        let t = Template::parse("var/{type}/{extra.channel}{extra.missing}.jsonl", Escape::PathSegment).unwrap();
        assert_eq!(t.render(&ev), "var/inboundMessage/nullnull.jsonl");
        // Elsewhere a null stays empty.
        let t = Template::parse("webio.{customerUid}", Escape::Topic).unwrap();
        assert_eq!(t.render(&event()), "webio.");
    }

    #[test]
    fn url_values_are_percent_encoded() {
        let t = Template::parse("http://h/{conversationId}", Escape::Url).unwrap();
        assert_eq!(t.render(&event()), "http://h/..%2F..%2Fetc%2Fx%20y");
    }

    #[test]
    fn template_errors_are_reported() {
        assert_eq!(Template::parse("{nope}", Escape::None), Err(TemplateError::UnknownField("nope".into())));
        assert_eq!(Template::parse("{type", Escape::None), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("type}", Escape::None), Err(TemplateError::Unmatched));
        assert_eq!(Template::parse("{extra.}", Escape::None), Err(TemplateError::UnknownField("extra.".into())));
        assert!(Template::parse("{{literal}}", Escape::None).unwrap().is_constant());
    }

    #[test]
    fn environment_expansion() {
        let env = |k: &str| (k == "KEY").then(|| "s3cr3t".to_owned());
        assert_eq!(expand_env("a ${KEY} b $$ c $d", env).unwrap(), "a s3cr3t b $ c $d");
        assert_eq!(expand_env("${MISSING}", env), Err(TemplateError::UnsetVar("MISSING".into())));
        assert_eq!(expand_env("${KEY", env), Err(TemplateError::UnclosedVar));
    }
}
