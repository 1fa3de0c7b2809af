//! The control socket (`admin.control_socket`, README "Operating it"): the one way to change a running
//! daemon. Nothing that changes state is served over TCP; the admin listener only reads.
//!
//! A Unix socket created with mode 0600 (only the daemon's user, and root, may connect) and
//! removed at exit. One request per connection: a JSON line, optionally followed by a body
//! (the dead-letter lines of a `replay`) until the client shuts down its write half; one JSON
//! line answers.
//!
//! The CLI (`sinks`, `pause`, `resume`, `replay`) talks to it with [`call`], finding the
//! socket through the same `--config` as the daemon.

use crate::state::State;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every sink's status.
    Sinks,
    Pause {
        sink: String,
    },
    Resume {
        sink: String,
    },
    /// Re-inject the dead-letter lines that follow the request (for `sink`, or each line's own).
    Replay {
        sink: Option<String>,
    },
}

pub use crate::delivery::ReplayOutcome;
pub use crate::state::SinkStatus;

/// The answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum Response {
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sinks: Option<Vec<SinkStatus>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replay: Option<ReplayOutcome>,
    },
    Error {
        error: String,
    },
}

impl Response {
    fn ok() -> Self {
        Response::Ok { sinks: None, replay: None }
    }
    fn error(e: impl std::fmt::Display) -> Self {
        Response::Error { error: e.to_string() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon answers on the control socket {}: {source}", .path.display())]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("control socket {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("control socket {}: the daemon's answer is not understood: {source}", .path.display())]
    Answer { path: PathBuf, source: serde_json::Error },
    #[error("control socket {} is in use by another running daemon", .path.display())]
    InUse { path: PathBuf },
    #[error("control socket is disabled (admin.control_socket = \"\")")]
    Disabled,
}

/// Binds the socket with mode 0600. A socket file left by a daemon that died is replaced; one
/// that a live daemon answers on is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse { path: path.to_owned() });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // The umask narrows the mode from the start, so there is no moment where others may
    // connect; the chmod afterwards states it whatever the umask was.
    // SAFETY: umask only changes this process's file-creation mask; it is restored at once.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves `listener` until `stop` fires, then removes the socket file.
pub async fn serve(listener: UnixListener, path: PathBuf, state: Arc<State>, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.cancelled() => break,
        };
        match conn {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state).await {
                        tracing::warn!(error = %e, "control socket: a request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

/// Largest replay body taken through the socket (dead-letter files larger than this are
/// replayed in parts, or while the daemon is stopped).
const MAX_REPLAY_BYTES: usize = 256 << 20;

async fn handle(stream: UnixStream, state: &State) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let answer = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::error(format!("bad request: {e}")),
        Ok(Request::Sinks) => Response::Ok { sinks: Some(state.sinks_status()), replay: None },
        Ok(Request::Pause { sink }) => match state.set_paused(&sink, true).await {
            Ok(()) => {
                tracing::info!(sink = %sink, "sink paused (control socket)");
                Response::ok()
            }
            Err(e) => Response::error(e),
        },
        Ok(Request::Resume { sink }) => match state.set_paused(&sink, false).await {
            Ok(()) => {
                tracing::info!(sink = %sink, "sink resumed (control socket)");
                Response::ok()
            }
            Err(e) => Response::error(e),
        },
        Ok(Request::Replay { sink }) => {
            let mut lines = Vec::new();
            let mut total = 0usize;
            let mut buf = String::new();
            let mut too_large = false;
            loop {
                buf.clear();
                if reader.read_line(&mut buf).await? == 0 {
                    break;
                }
                total += buf.len();
                if total > MAX_REPLAY_BYTES {
                    too_large = true;
                    break;
                }
                lines.push(buf.trim_end_matches(['\n', '\r']).to_owned());
            }
            if too_large {
                Response::error(format!(
                    "replay body over {} MiB: split the file, or replay while the daemon is stopped",
                    MAX_REPLAY_BYTES >> 20
                ))
            } else {
                match state.replay(lines, sink.as_deref()).await {
                    Ok(outcome) => {
                        let n: u64 = outcome.injected.values().sum();
                        tracing::info!(
                            injected = n,
                            already_pending = outcome.already_pending,
                            skipped = outcome.skipped.len(),
                            "dead letters replayed (control socket)"
                        );
                        Response::Ok { sinks: None, replay: Some(outcome) }
                    }
                    Err(e) => Response::error(e),
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends `request` (and `body`, for a replay) to the daemon on `path`; blocking, for the CLI.
pub fn call(path: &Path, request: &Request, body: Option<&mut dyn Read>) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io { path: path.to_owned(), source };
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| ControlError::Unreachable { path: path.to_owned(), source })?;
    let mut line = serde_json::to_vec(request).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    if let Some(body) = body {
        std::io::copy(body, &mut stream).map_err(io)?;
    }
    stream.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(answer.trim()).map_err(|source| ControlError::Answer { path: path.to_owned(), source })
}

/// Whether a daemon answers on `path` (the CLI then goes through it rather than the spool file).
pub fn daemon_answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_json_line_each() {
        let r = serde_json::to_string(&Request::Pause { sink: "crm".into() }).unwrap();
        assert_eq!(r, r#"{"cmd":"pause","sink":"crm"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"sinks"}"#).unwrap(), Request::Sinks);
        let a = serde_json::to_string(&Response::error("no such sink")).unwrap();
        assert_eq!(a, r#"{"status":"error","error":"no such sink"}"#);
    }

    #[test]
    fn the_socket_is_created_0600_and_a_live_one_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(matches!(bind(&path), Err(ControlError::InUse { .. })));
            drop(listener);
            // A stale file (nobody listening) is replaced.
            let _again = bind(&path).unwrap();
        });
    }
}
