//! Durations in sink tables (`"250ms"`, `"10s"`, `"5m"`), parsed once when `routes.toml` is
//! loaded: a sink option holds a [`Duration`], never text that might not parse later.
//!
//! Use as `#[serde(with = "crate::sinks::duration")]` on a `Duration` field.

use serde::Deserializer;
use std::time::Duration;

/// The configuration's own duration reader, so that both files say the same (the value, why,
/// an example; a bare `5` is refused with "write \"5s\"").
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    crate::config::deserialize_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error, I64Deserializer, StrDeserializer};

    fn parse(text: &str) -> Result<Duration, Error> {
        deserialize(StrDeserializer::<Error>::new(text))
    }

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_what_to_write() {
        assert_eq!(parse("250ms").ok(), Some(Duration::from_millis(250)));
        assert_eq!(parse(" 10s ").ok(), Some(Duration::from_secs(10)));
        assert_eq!(parse("1m 30s").ok(), Some(Duration::from_secs(90)));
        let err = parse("soon").unwrap_err().to_string();
        assert!(err.contains("\"soon\"") && err.contains("\"10s\""), "{err}");
        assert!(parse("10").is_err(), "a unit is required");
        let err = deserialize(I64Deserializer::<Error>::new(5)).unwrap_err().to_string();
        assert!(err.contains("write \"5s\""), "{err}");
    }
}
