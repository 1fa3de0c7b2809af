//! An HTTP sink for the ordering tests: it answers each event by its `body` (`A1`, `B2`, …:
//! conversation letter, then rank), fails the events a test scripts, records what it
//! confirmed in order, and notes every event that arrived while an earlier event of its
//! conversation was not confirmed yet (an order violation, whatever the timing).

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Script {
    /// Body → 500 answers still to give.
    fail: HashMap<String, u32>,
    /// Body → bodies that must be confirmed before it is (500 until then).
    after: HashMap<String, Vec<String>>,
    /// Bodies confirmed (200), in order.
    confirmed: Vec<String>,
    /// Every request's body, in arrival order.
    arrived: Vec<String>,
    violations: Vec<String>,
}

pub struct ConversationSink {
    pub port: u16,
    script: Arc<Mutex<Script>>,
}

impl ConversationSink {
    pub fn start() -> ConversationSink {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind sink"))
    }

    /// Listens on `listener` (e.g. a port reserved while the sink was "down").
    pub fn serve(listener: TcpListener) -> ConversationSink {
        let port = listener.local_addr().unwrap().port();
        let script = Arc::new(Mutex::new(Script::default()));
        let s = script.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let s = s.clone();
                std::thread::spawn(move || answer(conn, &s));
            }
        });
        ConversationSink { port, script }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// `body` gets 500 `times` times before it may be confirmed.
    pub fn fail(&self, body: &str, times: u32) {
        self.script.lock().unwrap().fail.insert(body.to_owned(), times);
    }

    /// `body` is not confirmed (500) until every one of `others` is.
    pub fn after(&self, body: &str, others: &[&str]) {
        self.script.lock().unwrap().after.insert(body.to_owned(), others.iter().map(|o| o.to_string()).collect());
    }

    pub fn confirmed(&self) -> Vec<String> {
        self.script.lock().unwrap().confirmed.clone()
    }

    /// Confirmed bodies of one conversation (`'A'`), in order.
    pub fn confirmed_of(&self, conversation: char) -> Vec<String> {
        self.confirmed().into_iter().filter(|b| b.starts_with(conversation)).collect()
    }

    pub fn arrived(&self) -> Vec<String> {
        self.script.lock().unwrap().arrived.clone()
    }

    /// Requests for `body` so far.
    pub fn attempts(&self, body: &str) -> usize {
        self.arrived().iter().filter(|b| *b == body).count()
    }

    pub fn violations(&self) -> Vec<String> {
        self.script.lock().unwrap().violations.clone()
    }

    /// Waits until `n` events are confirmed; panics with what arrived after `limit`.
    pub fn wait_confirmed(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.confirmed().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} confirmed after {limit:?}; arrived: {:?}",
                self.confirmed().len(),
                self.arrived()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn answer(mut conn: TcpStream, script: &Mutex<Script>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Some((_, body)) = super::spool::read_request(&mut conn) else { return };
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = event["body"].as_str().unwrap_or_default().to_owned();
    let code = {
        let mut s = script.lock().unwrap();
        s.arrived.push(text.clone());
        // Every earlier event of the conversation must be confirmed by now.
        if let (Some(letter), Ok(rank)) = (text.chars().next(), text[1.min(text.len())..].parse::<u32>()) {
            for k in 1..rank {
                let earlier = format!("{letter}{k}");
                if !s.confirmed.contains(&earlier) {
                    let v = format!("{text} arrived before {earlier} was confirmed");
                    s.violations.push(v);
                }
            }
        }
        let waiting = s.after.get(&text).is_some_and(|others| others.iter().any(|o| !s.confirmed.contains(o)));
        let failing = match s.fail.get_mut(&text) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        if failing || waiting {
            500
        } else {
            s.confirmed.push(text);
            200
        }
    };
    let _ = conn.write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes());
}
