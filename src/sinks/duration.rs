//! Durations in sink tables (`"250ms"`, `"10s"`, `"5m"`), parsed once when `routes.toml` is
//! loaded: a sink option holds a [`Duration`], never text that might not parse later.
//!
//! Use as `#[serde(with = "crate::sinks::duration")]` on a `Duration` field.

use serde::Deserializer;
use std::time::Duration;

/// The configuration's own duration reader: the same messages (a bare `5` is refused with
/// "write \"5s\"") in both files.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    crate::config::deserialize_duration(d)
}

/// The one parser, with the message a user sees in `check` (the value, why, an example).
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}); write e.g. \"250ms\", \"10s\", \"5m\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_what_to_write() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m 30s"), Ok(Duration::from_secs(90)));
        let err = parse("soon").unwrap_err();
        assert!(err.contains("\"soon\"") && err.contains("\"10s\""), "{err}");
        assert!(parse("10").is_err(), "a unit is required");
    }
}
