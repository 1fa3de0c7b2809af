//! Issue 11's point, issue 14: an unmapped field is kept unchanged in `extra`, numbers
//! included. A `serde_json::Value` turned `123456789012345678901234567890` into
//! `1.2345678901234568e+29`; `extra` now keeps the sender's text. Checked at a sink's output,
//! in direct mode and after the spool's record round trip (written, the process stopped, read
//! back at the next start and delivered from the stored record), in the `event` and
//! `cloudevents` formats.

use crate::helpers::spool::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// 100 digits: beyond u64 and beyond f64's precision.
const HUNDRED_DIGITS: &str =
    "1234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890";

fn body() -> String {
    format!(
        r#"{{"type":"payment","conversationId":"c-exact","amount":{HUNDRED_DIGITS},"negative":-{HUNDRED_DIGITS},"ratio":1.50,"sci":1E2,"nested":{{"n":{HUNDRED_DIGITS},"list":[{HUNDRED_DIGITS}]}}}}"#
    )
}

/// The `extra` object's text in a sink's output line (`data.extra` for CloudEvents), cut out
/// of the line as written, not parsed (a parser would round the numbers again).
fn extra_text(line: &str) -> &str {
    let at = line.find(r#""extra":"#).unwrap_or_else(|| panic!("no extra in {line}")) + r#""extra":"#.len();
    let rest = &line[at..];
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &rest[..=i];
                }
            }
            _ => {}
        }
    }
    panic!("unterminated extra in {line}")
}

fn want() -> String {
    format!(
        r#"{{"amount":{HUNDRED_DIGITS},"negative":-{HUNDRED_DIGITS},"nested":{{"n":{HUNDRED_DIGITS},"list":[{HUNDRED_DIGITS}]}},"ratio":1.50,"sci":1E2}}"#
    )
}

fn file_routes(dir: &std::path::Path, format: &str) -> String {
    format!(
        "[sinks.out]\ntype = \"file\"\npath = \"{}\"\nformat = \"{format}\"\n\n[[routes]]\nname = \"all\"\nto = [\"out\"]\n",
        dir.join("out.jsonl").display()
    )
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[test]
fn a_100_digit_integer_in_extra_reaches_a_file_sink_exactly_in_direct_mode() {
    for format in ["event", "cloudevents"] {
        let setup = Setup::new("", "");
        std::fs::write(setup.path("routes.toml"), file_routes(setup.dir.path(), format)).unwrap();
        let config = std::fs::read_to_string(setup.path("webio-router.toml")).unwrap();
        std::fs::write(setup.path("webio-router.toml"), config.replace("mode = \"spool\"", "mode = \"direct\""))
            .unwrap();
        let router = setup.start();
        let a = router.post(&body());
        assert_eq!(a.status, 202, "{}", a.body);
        let out = lines(&setup.path("out.jsonl"));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(extra_text(&out[0]), want(), "{format}: {}", out[0]);
        // Still JSON, and the same event id as before this change (an id does not depend on
        // how extra is written).
        let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert!(v.is_object());
    }
}

#[test]
fn a_100_digit_integer_in_extra_survives_the_spool_record_round_trip() {
    // First run: the sink is an HTTP endpoint nobody listens on, so the event waits in the
    // spool. Second run: the same sink name is a file sink; what it writes was read back from
    // the stored record.
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("out", port.url("/hook"))]), "");
    let router = setup.start();
    let a = router.post(&body());
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.id();
    assert!(router.terminate().success());

    std::fs::write(setup.path("routes.toml"), file_routes(setup.dir.path(), "event")).unwrap();
    let router = setup.start();
    let out = setup.path("out.jsonl");
    wait_for("the stored event at the file sink", LIMIT, || !lines(&out).is_empty());
    let line = lines(&out).remove(0);
    assert_eq!(extra_text(&line), want(), "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], id.as_str());
    drop(router);
}
