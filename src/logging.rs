//! Log setup: text or one JSON object per line, on stderr. `RUST_LOG` overrides `log.level`.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// lapin logs every message the broker returns (`basic.return`: unroutable) at WARN with its
/// whole body, payload bytes included; the AMQP sink reports each one itself (the
/// delivery's error, with the routing key and no payload). Kept to errors unless `RUST_LOG`
/// says otherwise.
const QUIET: &str = "lapin::returned_messages=error";

/// The filter: `RUST_LOG` as it is when set, else `log.level` (or `info`) with [`QUIET`].
pub fn filter(cfg: &LogConfig) -> EnvFilter {
    if let Ok(f) = EnvFilter::try_from_default_env() {
        return f;
    }
    let f = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    match QUIET.parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    }
}

pub fn init(cfg: &LogConfig) {
    let filter = filter(cfg);
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // `try_init` fails only if a subscriber is already set (tests); keep that one.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A returned message's WARN line from lapin (with the payload) stays out of the log at
    /// the default level; other WARN lines, lapin's included, stay in.
    #[test]
    fn lapins_returned_message_lines_are_kept_out_at_the_default_level() {
        if std::env::var_os("RUST_LOG").is_some() {
            return; // the operator's filter is taken as it is
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter(&LogConfig { format: LogFormat::Text, level: "info".into() }))
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(target: "lapin::returned_messages", "Server returned us a message: payload-bytes");
            tracing::warn!(target: "lapin::channel", "a lapin warning");
            tracing::warn!("our own warning");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains("payload-bytes"), "{out}");
        assert!(out.contains("a lapin warning") && out.contains("our own warning"), "{out}");
    }
}
