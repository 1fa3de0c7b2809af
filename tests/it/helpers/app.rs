//! The application in-process (zero-to-production's `spawn_app`): [`spawn_app`] writes a
//! config and routes file into a temp dir, builds [`webio_router::app::App`] on port 0 on a
//! runtime of its own, and hands back the bound addresses. Dropping the [`TestApp`] triggers
//! the shutdown and waits for it.
//!
//! Use it for anything that talks HTTP to the daemon; keep the real binary
//! ([`super::router`]) for signals, `kill -9`, restarts, exit codes and log lines. Metrics are
//! process-wide: in-process apps share one registry, so assert on metric values only against
//! the real binary.

use super::{post, read_jsonl, Response, BASE_CONFIG};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use webio_router::app::App;
use webio_router::config::Config;
use webio_router::shutdown::Shutdown;

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
}

/// `config` is appended to [`BASE_CONFIG`] unless it has its own `[auth]` or `routes_file`;
/// `{dir}` in either file is the temp dir. Listeners are always on port 0.
pub fn spawn_app(config: &str, routes: &str) -> TestApp {
    try_spawn_app(config, routes).unwrap_or_else(|e| panic!("the app did not start: {e}"))
}

/// Like [`spawn_app`], but a start-up failure is returned (its message) instead of panicking.
pub fn try_spawn_app(config: &str, routes: &str) -> Result<TestApp, String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let config = if config.contains("[auth]") || config.contains("routes_file") {
        config.replace("{dir}", &d)
    } else {
        format!("{BASE_CONFIG}\n{config}").replace("{dir}", &d)
    };
    let cfg_path = dir.path().join("webio-router.toml");
    std::fs::write(&cfg_path, config).unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes.replace("{dir}", &d)).unwrap();
    let mut loaded = Config::load(Some(&cfg_path), None).map_err(|e| e.to_string())?;
    loaded.config.server.listen = "127.0.0.1:0".parse().unwrap();
    loaded.config.admin.listen = "127.0.0.1:0".parse().unwrap();
    if loaded.config.admin.control_socket.is_relative() && !loaded.config.admin.control_socket.as_os_str().is_empty() {
        // Not in the test process's working directory, shared by every test.
        loaded.config.admin.control_socket = dir.path().join("control.sock");
    }

    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("test-app".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                match App::build(loaded).await {
                    Ok(app) => {
                        let _ = tx.send(Ok((app.webhook_addr(), app.admin_addr(), app.shutdown())));
                        app.run().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok((addr, admin, shutdown))) => Ok(TestApp { addr, admin, dir, shutdown, thread: Some(thread) }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err("the app did not start within 30 s".into()),
    }
}

impl TestApp {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn post(&self, body: &[u8]) -> Response {
        post(self.addr, body)
    }

    /// Lines of a JSON Lines file under the temp dir (empty if it does not exist).
    pub fn jsonl(&self, rel: &str) -> Vec<serde_json::Value> {
        read_jsonl(&self.path(rel))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Triggers the shutdown and waits until the app has stopped.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[test]
fn an_app_on_port_0_answers_and_stops_when_its_shutdown_fires() {
    let app = spawn_app("", "[sinks.a]\ntype = \"file\"\npath = \"{dir}/a.jsonl\"\n[[routes]]\nto = [\"a\"]\n");
    assert_ne!(app.addr.port(), 0);
    assert_eq!(app.post(br#"{"type":"payment"}"#).status, 202);
    assert_eq!(app.jsonl("a.jsonl").len(), 1);
    let addr = app.addr;
    app.stop();
    assert!(std::net::TcpStream::connect(addr).is_err(), "the listener is closed");
}
