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
    if let Some(naive) = webio_naive(s) {
        return local_to_utc(naive, zone);
    }
    parse_date_general(s, zone)
}

/// `occurredAt` from a `dateCreated` value: [`parse_date`] then [`format_utc`]. What Webio sends
/// most (`YYYY-MM-DD HH:MM:SS.mmm` read in UTC) is the same digits with `T` and `Z`: taken as
/// they are once validated, without taking the date apart and writing it again.
pub fn occurred_at(raw: &str, zone: Tz) -> Option<String> {
    let s = raw.trim();
    if zone == Tz::UTC && (s.len() == 23 || s.len() == 19) && webio_naive(s).is_some() {
        let mut out = String::with_capacity(24);
        out.push_str(&s[..10]);
        out.push('T');
        out.push_str(&s[11..]);
        out.push_str(if s.len() == 19 { ".000Z" } else { "Z" });
        return Some(out);
    }
    parse_date(s, zone).map(format_utc)
}

/// Every format, tried in order (the reference the fast path agrees with).
fn parse_date_general(s: &str, zone: Tz) -> Option<DateTime<Utc>> {
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
            return local_to_utc(naive, zone);
        }
    }
    None
}

fn local_to_utc(naive: NaiveDateTime, zone: Tz) -> Option<DateTime<Utc>> {
    // A wall-clock time skipped by a DST change does not exist: refuse it rather than
    // invent one; an ambiguous one (clocks going back) takes the earlier instant.
    zone.from_local_datetime(&naive).earliest().map(|dt| dt.with_timezone(&Utc))
}

/// Fast path for exactly what Webio sends, `YYYY-MM-DD HH:MM:SS` with an optional `.` and
/// 1–9 fraction digits, read without chrono's format-string machinery. Anything else
/// (including out-of-range fields and leap seconds) is `None` and goes the general way.
fn webio_naive(s: &str) -> Option<NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    let nanos = match &b[19..] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let n = num(20..b.len())?;
            n * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let (sec, min, hour) = (num(17..19)?, num(14..16)?, num(11..13)?);
    if sec > 59 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    Some(date.and_time(chrono::NaiveTime::from_hms_nano_opt(hour, min, sec, nanos)?))
}

/// RFC 3339 UTC with milliseconds (`2021-01-28T12:22:15.397Z`), written directly for
/// years 0–9999; chrono's formatter for anything else.
pub fn format_utc(dt: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (dt.year(), dt.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return dt.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    let mut out = [0u8; 24];
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, dt.month());
    put(8, 2, dt.day());
    put(11, 2, dt.hour());
    put(14, 2, dt.minute());
    put(17, 2, dt.second());
    put(20, 3, nanos / 1_000_000);
    for (i, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')] {
        out[i] = c;
    }
    String::from_utf8(out.to_vec()).expect("digits and ASCII punctuation")
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

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]

        /// The fast path answers exactly what the general formats answer.
        #[test]
        fn the_webio_fast_path_agrees_with_the_general_parser(
            s in "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,11})?[ Z+0-9:]{0,3}",
            zone in proptest::sample::select(&["UTC", "Europe/London", "America/New_York", "Australia/Lord_Howe"][..]),
        ) {
            let zone: Tz = zone.parse().unwrap();
            let s = s.trim();
            let fast = webio_naive(s).map(|n| local_to_utc(n, zone));
            if let Some(fast) = fast {
                proptest::prop_assert_eq!(fast, parse_date_general(s, zone), "{}", s);
            }
            proptest::prop_assert_eq!(parse_date(s, zone), parse_date_general(s, zone), "{}", s);
        }

        /// The shortcut for UTC answers what parsing and formatting answer.
        #[test]
        fn occurred_at_agrees_with_parse_then_format(
            s in " ?[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,4})? ?",
            zone in proptest::sample::select(&["UTC", "Europe/London"][..]),
        ) {
            let zone: Tz = zone.parse().unwrap();
            proptest::prop_assert_eq!(occurred_at(&s, zone), parse_date(&s, zone).map(format_utc), "{}", s);
        }

        /// The direct formatter writes what chrono writes.
        #[test]
        fn format_utc_agrees_with_chrono(secs in -70_000_000_000i64..300_000_000_000, nanos in 0u32..2_000_000_000) {
            if let Some(dt) = DateTime::from_timestamp(secs, nanos) {
                proptest::prop_assert_eq!(format_utc(dt), dt.to_rfc3339_opts(SecondsFormat::Millis, true));
            }
        }
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
