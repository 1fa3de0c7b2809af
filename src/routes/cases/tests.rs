//! Routing test files: what holds, what fails (naming expected and actual), and what makes a
//! file bad (each problem at its line).

use super::*;

const ROUTES: &str = r#"
[sinks.crm]
type = "http"
url = "http://127.0.0.1:9/webio"
[sinks.archive]
type = "file"
path = "x.jsonl"
[sinks.bus]
type = "file"
path = "bus.jsonl"

[[routes]]
name = "failed-deliveries"
when = { type = "messageStatusUpdate", statusCode = [3, 4] }
to = ["crm", "bus"]

[[routes]]
name = "org-1234"
when = { organisationId = "1234" }
to = ["bus"]

[[routes]]
name = "everything"
to = ["archive"]
"#;

const FAILED: &str =
    r#"'{"type":"messageStatusUpdate","conversationId":"1","communicationActionId":"2","statusCode":"3"}'"#;

fn routes() -> Routes {
    Routes::parse("routes.toml", ROUTES, |_| None).unwrap()
}

fn parse_in(dir: &Path, text: &str) -> Result<Vec<Case>, ConfigError> {
    parse("t.toml", text, dir, &routes(), &NormaliseOptions::default(), None)
}

fn cases(text: &str) -> Vec<Case> {
    parse_in(Path::new("."), text).unwrap_or_else(|e| panic!("{text}\n-> {e}"))
}

fn bad(text: &str) -> Vec<Diagnostic> {
    match parse_in(Path::new("."), text) {
        Ok(c) => panic!("expected diagnostics for\n{text}\ngot {} cases", c.len()),
        Err(e) => e.0,
    }
}

fn run_one(text: &str) -> Vec<Mismatch> {
    let c = cases(text);
    assert_eq!(c.len(), 1);
    c[0].run(&routes())
}

#[test]
fn a_case_that_holds_has_no_mismatch() {
    let text = format!(
        "[[cases]]\nname = \"failed\"\npayload = {FAILED}\nroutes = [\"failed-deliveries\", \"everything\"]\nsinks = [\"archive\", \"bus\", \"crm\"]\n"
    );
    assert_eq!(run_one(&text), vec![]);
    assert_eq!(cases(&text)[0].line, 2);
}

#[test]
fn routes_must_match_exactly_and_in_order() {
    for expected in [r#"["everything", "failed-deliveries"]"#, r#"["failed-deliveries"]"#, "[]"] {
        let text = format!("[[cases]]\nname = \"failed\"\npayload = {FAILED}\nroutes = {expected}\n");
        let m = run_one(&text);
        assert_eq!(m.len(), 1, "{expected}: {m:?}");
        assert_eq!(m[0].what, "routes");
        assert_eq!(m[0].actual, r#"["failed-deliveries","everything"]"#);
    }
}

#[test]
fn sinks_must_be_exactly_these_in_any_order() {
    let ok = format!("[[cases]]\nname = \"x\"\npayload = {FAILED}\nsinks = [\"bus\", \"archive\", \"crm\"]\n");
    assert_eq!(run_one(&ok), vec![]);
    let missing = format!("[[cases]]\nname = \"x\"\npayload = {FAILED}\nsinks = [\"crm\", \"bus\"]\n");
    let m = run_one(&missing);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!((m[0].what.as_str(), m[0].expected.as_str()), ("sinks", r#"["crm","bus"]"#));
    assert_eq!(m[0].actual, r#"["crm","bus","archive"]"#);
}

#[test]
fn a_payload_may_be_a_table_or_a_file_relative_to_the_test_file() {
    let text = "[[cases]]\nname = \"t\"\npayload = { type = \"messageStatusUpdate\", statusCode = 4 }\nroutes = [\"failed-deliveries\", \"everything\"]\n";
    assert_eq!(run_one(text), vec![]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cases")).unwrap();
    std::fs::write(dir.path().join("cases/inbound.json"), r#"{"type":"inboundMessage"}"#).unwrap();
    let text = "[[cases]]\nname = \"f\"\npayload_file = \"cases/inbound.json\"\nroutes = [\"everything\"]\n";
    let c = parse_in(dir.path(), text).unwrap();
    assert_eq!(c[0].run(&routes()), vec![]);
}

#[test]
fn the_organisation_comes_from_the_case_else_the_default() {
    let text = "[[cases]]\nname = \"o\"\npayload = '{\"type\":\"payment\"}'\norg = 1234\nroutes = [\"org-1234\", \"everything\"]\n";
    assert_eq!(run_one(text), vec![]);
    let text = "[[cases]]\nname = \"o\"\npayload = '{\"type\":\"payment\"}'\nroutes = [\"org-1234\", \"everything\"]\n";
    let c = parse("t.toml", text, Path::new("."), &routes(), &NormaliseOptions::default(), Some("1234")).unwrap();
    assert_eq!(c[0].run(&routes()), vec![]);
    assert_eq!(run_one(text).len(), 1, "without an organisation org-1234 does not match");
}

#[test]
fn expected_event_fields_are_compared_with_the_normalised_event() {
    let text = r#"
[[cases]]
name = "legacy send"
payload = '{"type":"messageStatusUpdate","conversationId":7,"statusCode":"1","channel":"sms"}'
event = { type = "messageSend", shape = "legacy", conversationId = "7", statusCode = 1, "extra.channel" = "sms" }
"#;
    assert_eq!(run_one(text), vec![]);
    let wrong =
        text.replace("shape = \"legacy\"", "shape = \"current\"").replace("statusCode = 1", "statusCode = \"1\"");
    let m = run_one(&wrong);
    let what: Vec<_> = m.iter().map(|m| m.what.as_str()).collect();
    assert_eq!(what, ["event.shape", "event.statusCode"], "{m:?}");
    assert_eq!((m[0].expected.as_str(), m[0].actual.as_str()), ("\"current\"", "\"legacy\""));
}

#[test]
fn a_bad_file_reports_each_problem_at_its_line() {
    // (file, needle at the reported position, words in the message)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[[cases]]\nname = \"a\"\npayload = '{}'\nroutes = []\nrouts = []\n",
            "routs",
            &["unknown key `routs`", "did you mean `routes`?"],
        ),
        ("[[cases]]\nname = \"a\"\nroutes = []\n", "[[cases]]", &["`payload` or `payload_file` is required"]),
        (
            "[[cases]]\nname = \"a\"\npayload = '{\"type\":\"x\"}'\npayload_file = \"p.json\"\nroutes = []\n",
            "\"p.json\"",
            &["not both"],
        ),
        (
            "[[cases]]\nname = \"a\"\npayload_file = \"nope.json\"\nroutes = []\n",
            "\"nope.json\"",
            &["cannot read", "nope.json"],
        ),
        (
            "[[cases]]\nname = \"a\"\npayload = '{\"type\":\"x\"}'\nroutes = [\"everythin\"]\n",
            "[\"everythin\"]",
            &["no route \"everythin\"", "did you mean \"everything\"?"],
        ),
        (
            "[[cases]]\nname = \"a\"\npayload = '{\"type\":\"x\"}'\nsinks = [\"crn\"]\n",
            "[\"crn\"]",
            &["no sink \"crn\"", "did you mean \"crm\"?"],
        ),
        ("[[cases]]\nname = \"a\"\npayload = '{\"no\":\"type\"}'\nroutes = []\n", "'{\"no\"", &["refuse", "400"]),
        ("[[cases]]\nname = \"a\"\npayload = '{\"type\":\"x\"}'\n", "\"a\"", &["expects nothing"]),
        (
            "[[cases]]\nname = \"a\"\npayload = '{\"type\":\"x\"}'\nevent = { statuscode = 1 }\n",
            "statuscode",
            &["did you mean \"statusCode\"?"],
        ),
        ("[[cases]]\nname = \"a\"\npayload = 5\nroutes = []\n", "5", &["JSON text or a table"]),
    ];
    for (text, needle, words) in cases {
        let d = bad(text);
        assert_eq!(d.len(), 1, "{text}: {d:?}");
        let at = text.find(needle).unwrap();
        assert_eq!(d[0].line, Some(crate::config::line_col(text, at)), "{text}: {}", d[0]);
        assert!(d[0].to_string().starts_with("t.toml:"), "{}", d[0]);
        for w in *words {
            assert!(d[0].message.contains(w), "{text}: {w:?} missing from {}", d[0]);
        }
    }
}

#[test]
fn case_names_are_unique_and_a_file_has_cases() {
    let text = format!(
        "[[cases]]\nname = \"a\"\npayload = {FAILED}\nroutes = []\n[[cases]]\nname = \"a\"\npayload = {FAILED}\nroutes = []\n"
    );
    let d = bad(&text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].line.unwrap().0, 6);
    assert!(d[0].message.contains("already used at line 2"), "{}", d[0]);
    assert!(bad("# nothing\n")[0].message.contains("no [[cases]]"));
}
