//! The command line. `main.rs` calls [`main`]; each subcommand is a small function here.
//! Exit codes: 0 ok, 2 bad configuration or usage, 1 runtime failure.

use crate::config::{Config, ConfigError, DeliveryMode, Loaded, Purpose};
use crate::event::normalise;
use crate::routes::Routes;
use clap::{CommandFactory, Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "webio-router",
    version,
    about = "Receives Webio webhooks, authenticates, normalises and routes them."
)]
pub struct Cli {
    /// Configuration file (default: webio-router.toml in the working directory, if present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Routes file (overrides `routes_file`).
    #[arg(long, global = true, value_name = "PATH")]
    pub routes: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Validate configuration and routes, print a summary.
    Check,
    /// Print an HS256/384/512 token signed with the first configured secret, for curl.
    Token {
        /// Organisation id claim (default: auth.organisation_id).
        #[arg(long, value_name = "ID")]
        org: Option<String>,
        /// Lifetime, e.g. 1h, 30m; "0" for a token without `exp`, like Webio's.
        #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Ttl,
    },
    /// Show the normalised event and its routes for a payload file (`-` = stdin); sends nothing.
    Explain {
        /// A Webio webhook body (JSON), or `-` to read it from stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Organisation id, as if from the token (default: auth.organisation_id).
        #[arg(long, value_name = "ID")]
        org: Option<String>,
    },
    /// Run routing test cases against the configured routes; exit 1 when one fails.
    Test {
        /// Test files (TOML, `[[cases]]` with a payload and the routes and sinks it must reach).
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions {
        /// The shell the script is for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Re-inject dead letters (a dead-letter JSON Lines file) into the spool: through the
    /// control socket while the daemon runs, or into the spool file while it is stopped.
    Replay {
        /// A dead-letter file (JSON Lines, as written to delivery.dead_letter_file).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Deliver every line to this sink instead of the one recorded in the line.
        #[arg(long, value_name = "NAME")]
        sink: Option<String>,
    },
    #[command(flatten)]
    Control(Control),
    /// Inspect or rescue the spool file; run it while the daemon is stopped.
    Spool {
        #[command(subcommand)]
        action: SpoolAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum SpoolAction {
    /// Check the spool: integrity, pending deliveries per sink, the oldest, the size (exit 0 healthy, 1 damaged).
    Check,
    /// Move a damaged spool aside and copy every readable pending record into a fresh one.
    Salvage,
}

/// Operator commands that go through a running daemon's control socket.
#[derive(Subcommand, Debug)]
pub enum Control {
    /// Show every sink: type, up, paused, pending, age of the oldest pending event, last error.
    Sinks {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop delivering to SINK; its events wait in the spool (survives a restart).
    Pause {
        /// A sink named in routes.toml.
        #[arg(value_name = "SINK")]
        sink: String,
    },
    /// Deliver to SINK again, backlog first.
    Resume {
        /// A sink named in routes.toml.
        #[arg(value_name = "SINK")]
        sink: String,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if matches!(
        cli.command,
        Some(
            Command::Check
                | Command::Token { .. }
                | Command::Explain { .. }
                | Command::Test { .. }
                | Command::Spool { .. }
        )
    ) {
        end_quietly_on_a_closed_pipe();
    }
    run(cli)
}

/// A command whose output is piped into `head` (`explain … | head`) ends quietly when the
/// reader goes away, as Unix tools do, instead of panicking on "Broken pipe": SIGPIPE gets its
/// default action back (Rust's runtime ignores it). Only for commands that print and exit: the
/// daemon keeps it ignored, so that a client hanging up never kills it, and the commands that
/// talk to the control socket keep it ignored, so that they report a daemon that went away.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: called before any other thread exists; it only resets one signal's disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(2)
}

pub fn run(cli: Cli) -> ExitCode {
    let command = cli.command.unwrap_or(Command::Serve);
    // Completions need no configuration at all; explain and test need the routes, not the
    // secrets (a routes file is tested in CI, where there is no JWT secret).
    let purpose = match &command {
        Command::Completions { shell } => return completions(*shell),
        Command::Explain { .. } | Command::Test { .. } => Purpose::Routing,
        _ => Purpose::Serve,
    };
    let loaded = match Config::load_for(cli.config.as_deref(), cli.routes.as_deref(), purpose) {
        Ok(l) => l,
        Err(e) => return config_error(&e),
    };
    match command {
        Command::Serve => serve(loaded),
        Command::Check => check(&loaded),
        Command::Token { org, ttl } => token(&loaded, org, ttl),
        Command::Explain { file, org } => explain(&loaded, &file, org),
        Command::Test { files } => test(&loaded, &files),
        Command::Completions { .. } => unreachable!("answered above"),
        Command::Replay { file, sink } => replay(&loaded, &file, sink.as_deref()),
        Command::Control(c) => control(&loaded, c),
        Command::Spool { action } => spool(&loaded, action),
    }
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "webio-router", &mut script);
    match std::io::stdout().write_all(&script) {
        // `completions bash | head` closes the pipe early: not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("completions: cannot write: {e}");
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

fn serve(loaded: Loaded) -> ExitCode {
    crate::logging::init(&loaded.config.log);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(worker_threads(loaded.config.delivery.mode));
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(crate::app::serve(loaded));
    // `serve` returns once the shutdown deadline is met or passed; a blocking task still
    // running then (a write stuck on a dead network filesystem, say) must not hold the exit:
    // dropping the runtime would wait for it without bound.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(crate::app::ServeError::Config(e)) => config_error(&e),
        // Logged once, on stderr like every log line (the journal, `kubectl logs`).
        Err(e) => {
            tracing::error!(error = %e, "webio-router stopped");
            ExitCode::from(1)
        }
    }
}

/// Async worker threads: `TOKIO_WORKER_THREADS` when set, else [`default_worker_threads`].
fn worker_threads(mode: DeliveryMode) -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    default_worker_threads(mode, std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One async worker per core, in both modes. In direct mode the request path is the work, and
/// with a single worker on two cores shared with the load generator, that worker was preempted
/// about once every four requests with nobody to take its connections over, and the load
/// generator ran dry and slept three times as often as against bare hyper, on the same cores
/// (docs/performance.md, "Request path, fourth round"). Spool mode left a core to its writer
/// thread until the sixth round: with the pipelined syncs the writer mostly waits, and a second
/// worker on two cores hands it bigger batches (a third fewer `fdatasync`s and frames per
/// event, ~22 % less writer CPU per event, ~8 % less CPU per event in all; docs/performance.md,
/// "Spool, sixth round").
fn default_worker_threads(mode: DeliveryMode, cores: usize) -> usize {
    match mode {
        DeliveryMode::Direct | DeliveryMode::Spool => cores.max(1),
    }
}

fn check(loaded: &Loaded) -> ExitCode {
    let routes = match crate::app::check(loaded) {
        Ok(r) => r,
        Err(e) => return config_error(&e),
    };
    let c = &loaded.config;
    println!(
        "config: {}",
        loaded.file.as_ref().map_or("built-in defaults + environment".into(), |f| f.display().to_string())
    );
    let scheme = if c.server.tls_files().is_some() { "https" } else { "http" };
    println!(
        "webhooks: POST {scheme}://{}{} (max body {} bytes, timeout {:?})",
        c.server.listen, c.server.path, c.server.max_body_bytes, c.server.request_timeout
    );
    if let Some((cert, key)) = c.server.tls_files() {
        println!("tls: certificate {}, key {} (HTTPS only; re-read on SIGHUP)", cert.display(), key.display());
    }
    println!("admin: http://{}/metrics, /healthz, /readyz", c.admin.listen);
    if c.auth.disabled {
        println!("auth: DISABLED (local experiments only)");
    } else {
        let algs: Vec<_> = c.auth.algorithms.iter().map(|a| a.as_str()).collect();
        let org = if c.auth.organisation_id.is_empty() {
            "any organisation".to_owned()
        } else {
            format!("organisation {}", c.auth.organisation_id)
        };
        println!("auth: header {}, {} secret(s), {}, {}", c.auth.header, loaded.secrets.len(), algs.join("/"), org);
    }
    println!("delivery: {}, dead letters {}", c.delivery.mode, c.delivery.dead_letter_file.display());
    if let Some(store) = c.delivery.dedup_store.as_ref().filter(|_| c.delivery.dedup_store().is_some()) {
        println!("dedup window: {:?}, shared through {}", c.delivery.dedup_window, store.redacted());
    }
    if c.custom_values.enabled() {
        let cv = &c.custom_values;
        println!(
            "custom values: GET {} -> {} (timeout {:?}, cache {:?}, {} header(s))",
            c.server.path,
            cv.upstream,
            cv.timeout,
            cv.cache_ttl,
            cv.headers.len()
        );
    }
    if c.ingest.enabled() {
        println!("ingest: {} every {:?} (done/, rejected/ beside it)", c.ingest.dir.display(), c.ingest.poll);
    }
    println!("routes: {} ({} sinks, {} routes)", c.routes_file.display(), routes.sinks.len(), routes.routes.len());
    for (name, sink) in &routes.sinks {
        let limits = routes.limits.get(name).map_or(String::new(), |l| l.describe());
        let ordering = match sink.ordering() {
            crate::sinks::SinkOrdering::None => String::new(),
            o => format!(", ordering {}", o.as_str()),
        };
        println!("  sink {name}: {} (format {}{limits}{ordering})", sink.type_name(), sink.format().as_str());
    }
    for r in &routes.routes {
        let when = if r.when.is_empty() {
            "every event".to_owned()
        } else {
            r.when.iter().map(|c| c.field.as_str()).collect::<Vec<_>>().join(", ")
        };
        println!("  route {}: {} -> {}{}", r.name, when, r.to.join(", "), if r.stop { " (stop)" } else { "" });
    }
    println!("ok");
    ExitCode::SUCCESS
}

/// `--ttl`: a lifetime, or none (`0`) for a token without `exp`.
#[derive(Debug, Clone, Copy)]
pub struct Ttl(Option<Duration>);

/// A `--ttl` that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("not a duration: write e.g. 1h, 30m or 90s, or 0 for a token without `exp`")]
pub struct TtlError;

fn parse_ttl(text: &str) -> Result<Ttl, TtlError> {
    match text.trim() {
        "0" | "none" => Ok(Ttl(None)),
        t => humantime::parse_duration(t).map(|d| Ttl(Some(d))).map_err(|_| TtlError),
    }
}

fn token(loaded: &Loaded, org: Option<String>, Ttl(ttl): Ttl) -> ExitCode {
    let auth = &loaded.config.auth;
    let Some(secret) = loaded.secrets.first() else {
        eprintln!("token: no secret configured (auth.secrets or auth.secret_files)");
        return ExitCode::from(2);
    };
    let org = org.or_else(|| Some(auth.organisation_id.clone()).filter(|o| !o.is_empty()));
    let alg = auth.algorithms.first().copied().unwrap_or(crate::config::Algorithm::HS256);
    println!("{}", crate::auth::sign(secret.expose(), alg, org.as_deref(), &auth.organisation_claim, ttl));
    ExitCode::SUCCESS
}

fn read_input(file: &Path) -> std::io::Result<Vec<u8>> {
    if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(file)
    }
}

/// The organisation a payload is normalised with: `--org`, else `auth.organisation_id`.
fn organisation(loaded: &Loaded, org: Option<String>) -> Option<String> {
    org.or_else(|| Some(loaded.config.auth.organisation_id.clone())).filter(|o| !o.is_empty())
}

fn explain(loaded: &Loaded, file: &Path, org: Option<String>) -> ExitCode {
    let routes = match Routes::load(&loaded.config.routes_file) {
        Ok(r) => r,
        Err(e) => return config_error(&e),
    };
    let body = match read_input(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("explain: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let event = match normalise(&body, organisation(loaded, org), &loaded.normalise, chrono::Utc::now()) {
        Ok(ev) => ev,
        Err(e) => {
            eprintln!("explain: the router would refuse this body with 400: {e}");
            return ExitCode::from(1);
        }
    };
    let matched = routes.matching(&event);
    let sinks: Vec<_> = matched
        .sinks
        .iter()
        .map(|s| {
            let limits = routes.limits.get(*s).copied().unwrap_or_default();
            let cfg = routes.sinks.get(*s);
            serde_json::json!({
                "name": s,
                "type": cfg.map(|c| c.type_name()),
                "rate_limit": limits.rate_limit.map(|r| r.to_string()),
                "concurrency": limits.concurrency,
                "ordering": cfg.map(|c| c.ordering().as_str()),
            })
        })
        .collect();
    let out = serde_json::json!({"event": event, "routes": matched.routes, "sinks": sinks});
    println!("{}", serde_json::to_string_pretty(&out).expect("JSON values serialise"));
    ExitCode::SUCCESS
}

/// `test`: every file is checked before any case runs (a bad file: exit 2); then each case
/// prints `ok` or `FAIL` with what it expected and what happened (any failure: exit 1).
fn test(loaded: &Loaded, files: &[PathBuf]) -> ExitCode {
    let routes = match Routes::load(&loaded.config.routes_file) {
        Ok(r) => r,
        Err(e) => return config_error(&e),
    };
    let org = organisation(loaded, None);
    let mut suites = Vec::new();
    let mut bad = false;
    for file in files {
        match crate::routes::cases::load(file, &routes, &loaded.normalise, org.as_deref()) {
            Ok(cases) => suites.push((file, cases)),
            Err(e) => {
                eprintln!("{e}");
                bad = true;
            }
        }
    }
    if bad {
        return ExitCode::from(2);
    }
    let (mut passed, mut failed) = (0, 0);
    for (file, cases) in &suites {
        for case in cases {
            let mismatches = case.run(&routes);
            let place = format!("{}:{}", file.display(), case.line);
            if mismatches.is_empty() {
                passed += 1;
                println!("ok    {place}: {}", case.name);
            } else {
                failed += 1;
                println!("FAIL  {place}: {}", case.name);
                for m in mismatches {
                    println!("      {}: expected {}, actual {}", m.what, m.expected, m.actual);
                }
            }
        }
    }
    println!(
        "\n{} case(s) against {}: {passed} passed, {failed} failed",
        passed + failed,
        loaded.config.routes_file.display()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The control socket of the configuration, when it is enabled.
fn control_socket(loaded: &Loaded) -> Result<&Path, crate::control::ControlError> {
    loaded.config.admin.control_socket().ok_or(crate::control::ControlError::Disabled)
}

/// `sinks`, `pause`, `resume`: through the running daemon's control socket.
fn control(loaded: &Loaded, command: Control) -> ExitCode {
    use crate::control::{call, Request, Response};
    let path = match control_socket(loaded) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (request, json) = match &command {
        Control::Sinks { json } => (Request::Sinks, *json),
        Control::Pause { sink } => (Request::Pause { sink: sink.clone() }, false),
        Control::Resume { sink } => (Request::Resume { sink: sink.clone() }, false),
    };
    match call(path, &request, None) {
        Err(e) => {
            eprintln!("{e} (is webio-router running with this configuration?)");
            ExitCode::from(1)
        }
        Ok(Response::Error { error }) => {
            eprintln!("{error}");
            ExitCode::from(1)
        }
        Ok(Response::Ok { sinks, .. }) => {
            match (&command, sinks) {
                (Control::Sinks { .. }, Some(sinks)) if json => {
                    let doc = serde_json::json!({ "sinks": sinks });
                    println!("{}", serde_json::to_string_pretty(&doc).expect("JSON values serialise"));
                }
                (Control::Sinks { .. }, Some(sinks)) => print_sinks(&sinks),
                (Control::Pause { sink }, _) => println!("paused {sink}: its events wait in the spool"),
                (Control::Resume { sink }, _) => println!("resumed {sink}"),
                _ => {}
            }
            ExitCode::SUCCESS
        }
    }
}

fn print_sinks(sinks: &[crate::control::SinkStatus]) {
    println!("{:<20} {:<6} {:<5} {:<7} {:>9} {:>10}  LAST ERROR", "SINK", "TYPE", "UP", "PAUSED", "PENDING", "OLDEST");
    for s in sinks {
        let oldest = s.oldest_pending_seconds.map_or("-".to_owned(), |a| {
            humantime::format_duration(std::time::Duration::from_secs(a as u64)).to_string()
        });
        println!(
            "{:<20} {:<6} {:<5} {:<7} {:>9} {:>10}  {}",
            s.name,
            s.sink_type.as_deref().unwrap_or("-"),
            if s.up { "yes" } else { "no" },
            if s.paused { "yes" } else { "no" },
            s.pending,
            oldest,
            s.last_error.as_deref().unwrap_or("-")
        );
    }
}

/// `replay` while the daemon runs: the lines go through the control socket.
fn replay_online(path: &Path, file: &Path, sink: Option<&str>) -> ExitCode {
    use crate::control::{call, Request, Response};
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("replay: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match call(path, &Request::Replay { sink: sink.map(str::to_owned) }, Some(&mut f)) {
        Err(e) => {
            eprintln!("replay: {e}");
            ExitCode::from(1)
        }
        Ok(Response::Error { error }) => {
            eprintln!("replay: {error}");
            ExitCode::from(1)
        }
        Ok(Response::Ok { replay, .. }) => {
            let r = replay.unwrap_or_default();
            let n: u64 = r.injected.values().sum();
            let per: Vec<_> = r.injected.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!("replayed {n} dead letter(s) through the running daemon ({})", per.join(", "));
            println!("skipped {} already pending", r.already_pending);
            for (line, why) in &r.skipped {
                eprintln!("{}:{line}: skipped: {why}", file.display());
            }
            if n > 0 {
                println!("move {} aside so that the same letters are not replayed twice", file.display());
            }
            if r.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `replay`: dead letters back into the spool, through the daemon when it runs, else into
/// the spool file (see `spool::replay`). Exit 1 when a line was skipped.
fn replay(loaded: &Loaded, file: &Path, sink: Option<&str>) -> ExitCode {
    let c = &loaded.config;
    if let Some(path) = c.admin.control_socket().filter(|p| crate::control::daemon_answers(p)) {
        return replay_online(path, file, sink);
    }
    if c.delivery.mode != crate::config::DeliveryMode::Spool {
        eprintln!("replay: delivery.mode is \"direct\": there is no spool to replay into");
        return ExitCode::from(2);
    }
    let routes = match Routes::load(&c.routes_file) {
        Ok(r) => r,
        Err(e) => return config_error(&e),
    };
    let known: std::collections::BTreeSet<String> = routes.sinks.keys().cloned().collect();
    if let Some(s) = sink.filter(|s| !known.contains(*s)) {
        eprintln!("replay: --sink {s}: no such sink in {}", c.routes_file.display());
        return ExitCode::from(2);
    }
    let mut bar = crate::delivery::spool::replay::Progress::new();
    let result = crate::delivery::spool::replay::replay(&c.delivery, &known, file, sink, &mut |d, t| bar.update(d, t));
    bar.finish();
    match result {
        Ok(r) => {
            let n: u64 = r.injected.values().sum();
            let per: Vec<_> = r.injected.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!("replayed {n} dead letter(s) into {} ({})", r.spool.display(), per.join(", "));
            println!("{} delivery(ies) pending; they go out at the next start", r.pending_after);
            for (line, why) in &r.skipped {
                eprintln!("{}:{line}: skipped: {why}", file.display());
            }
            if n > 0 {
                println!("move {} aside so that the same letters are not replayed twice", file.display());
            }
            if r.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(crate::delivery::spool::replay::ReplayError::Read { path, source }) => {
            eprintln!("replay: cannot read {}: {source}", path.display());
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("replay: {e}");
            ExitCode::from(1)
        }
    }
}

/// `spool check` / `spool salvage` (see `spool::offline`). Exit 0 healthy or salvaged, 1
/// damaged or failed, 2 when the spool is in use or there is none (direct mode).
fn spool(loaded: &Loaded, action: SpoolAction) -> ExitCode {
    use crate::delivery::spool::{offline, SpoolError};
    let c = &loaded.config;
    if c.delivery.mode != crate::config::DeliveryMode::Spool {
        eprintln!("spool: delivery.mode is \"direct\": there is no spool");
        return ExitCode::from(2);
    }
    let refused = |e: &dyn std::fmt::Display, in_use: bool| {
        eprintln!("{e}");
        ExitCode::from(if in_use { 2 } else { 1 })
    };
    match action {
        SpoolAction::Check => match offline::check(&c.delivery) {
            Ok(r) if r.absent => {
                println!("spool {}: none yet (nothing pending)", r.path.display());
                ExitCode::SUCCESS
            }
            Ok(r) => {
                let state = if r.healthy() { "healthy" } else { "damaged" };
                println!("spool {}: {state}", r.path.display());
                println!("size: {} bytes ({} events, {} bytes of event data)", r.size, r.events, r.event_bytes);
                println!("pending deliveries: {}", r.pending.values().sum::<u64>());
                let paused = |sink: &String| if r.paused.contains(sink) { " (paused)" } else { "" };
                for (sink, n) in &r.pending {
                    println!("  {sink}: {n}{}", paused(sink));
                }
                for sink in r.paused.iter().filter(|s| !r.pending.contains_key(*s)) {
                    println!("  {sink}: 0 (paused)");
                }
                if let Some((sink, id, at)) = &r.oldest {
                    println!("oldest pending: event {id} received {at} (sink {sink})");
                }
                println!("dedup ids inside the window: {}", r.dedup_ids);
                if r.wal_events > 0 {
                    println!(
                        "write-ahead file: {} events not yet checkpointed (accepted; the next start writes them into the spool)",
                        r.wal_events
                    );
                }
                if r.wal_done + r.wal_attempts > 0 {
                    println!(
                        "write-ahead file: {} deliveries and {} attempt counts not yet checkpointed (the next start records them in the spool)",
                        r.wal_done, r.wal_attempts
                    );
                }
                if let Some(at) = r.wal_torn {
                    println!(
                        "write-ahead file: a torn frame at byte {at}, after {} intact frame(s) (a batch that was never acknowledged; the next start drops it)",
                        r.wal_frames
                    );
                }
                if r.healthy() {
                    return ExitCode::SUCCESS;
                }
                println!("damaged records: {} (never delivered: each goes to the dead-letter file as stored when its sink reaches it)", r.damaged.len());
                for (seq, why) in r.damaged.iter().take(20) {
                    println!("  seq {seq}: {why}");
                }
                println!("`webio-router spool salvage` moves the file aside and keeps every readable record");
                ExitCode::from(1)
            }
            Err(e) => refused(&e, matches!(e, SpoolError::InUse { .. })),
        },
        SpoolAction::Salvage => {
            let routes = match Routes::load(&c.routes_file) {
                Ok(r) => r,
                Err(e) => return config_error(&e),
            };
            let route = |ev: &crate::event::Event| -> Vec<String> {
                routes.matching(ev).sinks.into_iter().map(str::to_owned).collect()
            };
            match offline::salvage(&c.delivery, &route) {
                Ok(r) => {
                    match &r.moved_to {
                        Some(p) => println!("moved the old spool aside to {}", p.display()),
                        None => println!("there was no spool file to move aside"),
                    }
                    if let Some(p) = &r.wal_moved_to {
                        println!(
                            "moved the write-ahead file aside to {} ({} of its events saved{}{})",
                            p.display(),
                            r.wal_saved,
                            if r.wal_done > 0 {
                                format!("; {} deliveries it records as done not queued again", r.wal_done)
                            } else {
                                String::new()
                            },
                            if r.wal_torn { "; a torn last frame dropped" } else { "" }
                        );
                    }
                    if let Some(e) = &r.index_error {
                        println!("the old file's index could not be read: {e}");
                    }
                    if r.source == offline::Source::Scan {
                        println!("its bytes were scanned for intact records instead: they are queued for the sinks their routes match now; some may have been delivered already and will be delivered again (sinks dedupe by event id)");
                    }
                    let per: Vec<_> = r.pairs.iter().map(|(s, n)| format!("{s}: {n}")).collect();
                    println!(
                        "saved {} event(s) into a fresh spool {} ({})",
                        r.saved,
                        r.fresh.display(),
                        per.join(", ")
                    );
                    if r.damaged > 0 {
                        println!(
                            "could not save {} damaged record(s): written as stored to {}",
                            r.damaged,
                            c.delivery.dead_letter_file.display()
                        );
                    }
                    if r.lost > 0 {
                        println!("could not save {} pending delivery(ies): their event rows are unreadable", r.lost);
                    }
                    if r.unrouted > 0 {
                        println!(
                            "not queued: {} event(s) that no route in {} matches now",
                            r.unrouted,
                            c.routes_file.display()
                        );
                    }
                    if !r.paused.is_empty() {
                        println!("still paused (webio-router resume NAME): {}", r.paused.join(", "));
                    }
                    println!("the next start delivers what was saved");
                    ExitCode::SUCCESS
                }
                Err(offline::SalvageError::Spool(e)) => refused(&e, matches!(e, SpoolError::InUse { .. })),
                Err(e) => refused(&e, false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn every_argument_of_every_command_has_help_text() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str()) {
                    missing.push(format!("{} {}", cmd.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn every_mode_runs_one_async_worker_per_core() {
        use super::default_worker_threads;
        use crate::config::DeliveryMode::{Direct, Spool};
        assert_eq!(default_worker_threads(Direct, 2), 2);
        assert_eq!(default_worker_threads(Direct, 8), 8);
        assert_eq!(default_worker_threads(Direct, 1), 1);
        assert_eq!(default_worker_threads(Direct, 0), 1);
        assert_eq!(default_worker_threads(Spool, 2), 2);
        assert_eq!(default_worker_threads(Spool, 8), 8);
        assert_eq!(default_worker_threads(Spool, 1), 1);
        assert_eq!(default_worker_threads(Spool, 0), 1);
    }
}
