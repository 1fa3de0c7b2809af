//! `dateCreated` parsing: Webio sends `2021-01-28 12:22:15.397` with no zone; ISO 8601 with
//! `T` and an offset is accepted too. Output is RFC 3339 UTC with milliseconds.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;

const NAIVE_FORMATS: &[&str] = &["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];
// `%#z` takes `+01`, `+0100` and `+01:00`: ISO 8601 allows all three.
const OFFSET_FORMATS: &[&str] = &["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"];

/// Parses a `dateCreated` value; `None` when it is not a date this module understands.
pub fn parse_date(raw: &str, zone: Tz) -> Option<DateTime<Utc>> {
    let s = raw.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    for f in OFFSET_FORMATS {
        if let Ok(dt) = DateTime::parse_from_str(s, f) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    for f in NAIVE_FORMATS {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, f) {
            // A wall-clock time skipped by a DST change does not exist: refuse it rather than
            // invent one; an ambiguous one (clocks going back) takes the earlier instant.
            return zone.from_local_datetime(&naive).earliest().map(|dt| dt.with_timezone(&Utc));
        }
    }
    None
}

pub fn format_utc(dt: DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str, zone: &str) -> Option<String> {
        parse_date(raw, zone.parse().unwrap()).map(format_utc)
    }

    #[test]
    fn zoneless_dates_are_read_in_the_source_zone() {
        assert_eq!(p("2021-01-28 12:22:15.397", "UTC").unwrap(), "2021-01-28T12:22:15.397Z");
        // London is on BST (UTC+1) in July.
        assert_eq!(p("2021-07-01 12:00:00", "Europe/London").unwrap(), "2021-07-01T11:00:00.000Z");
        assert_eq!(p("2021-07-01T12:00:00.5", "Europe/London").unwrap(), "2021-07-01T11:00:00.500Z");
    }

    #[test]
    fn iso_dates_with_an_offset_ignore_the_source_zone() {
        assert_eq!(p("2021-01-28T12:22:15.397+01:00", "Europe/Paris").unwrap(), "2021-01-28T11:22:15.397Z");
        assert_eq!(p("2021-01-28T12:22:15Z", "America/New_York").unwrap(), "2021-01-28T12:22:15.000Z");
        assert_eq!(p("2021-01-28T12:22:15.397-0500", "UTC").unwrap(), "2021-01-28T17:22:15.397Z");
    }

    #[test]
    fn nonsense_and_nonexistent_times_do_not_parse() {
        assert_eq!(p("yesterday", "UTC"), None);
        assert_eq!(p("2021-13-40 99:00:00", "UTC"), None);
        assert_eq!(p("", "UTC"), None);
        // 01:30 on the spring-forward night does not exist in London.
        assert_eq!(p("2021-03-28 01:30:00", "Europe/London"), None);
    }
}
