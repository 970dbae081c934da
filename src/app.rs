//! Wiring: from parsed flags to a running exporter, and its orderly end.
//!
//! The steps run in the order the data flows: logging, the source of tests
//! (config file or demo), credentials, metrics and the request budget, the
//! client, the poller, then the listeners. Bad input is reported before
//! anything starts, with exit status 2. SIGHUP and `POST /-/reload` reload
//! the config; SIGTERM and SIGINT stop the listeners and end the process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, warn};

use crate::cli::{Args, LogFormat};
use crate::cloudflare::{Client, ClientOptions, RequestBudget};
use crate::config::{Config, PolicyTest, ReloadError};
use crate::credentials::{CredentialSources, Credentials, Secret};
use crate::metrics::Metrics;
use crate::poll::{PollOptions, Poller};
use crate::server::{self, ServerState};
use crate::simulator::Simulator;
use crate::walk::WalkOptions;
use crate::webconfig::WebConfig;

/// Exit status for bad flags, config or credentials.
const EXIT_USAGE: u8 = 2;

/// Requests Cloudflare allows one token per 5 minutes.
const CLOUDFLARE_REQUESTS_PER_WINDOW: u32 = 1200;

/// Time the listeners get to stop once a termination signal arrived.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Sets up logging to standard error.
pub fn init_logging(args: &Args) {
    let filter = tracing_subscriber::EnvFilter::new(args.log_level.as_filter());
    match args.log_format {
        LogFormat::Logfmt => {
            let subscriber = tracing_logfmt::builder()
                .with_span_name(false)
                .with_span_path(false)
                .subscriber_builder()
                .with_writer(std::io::stderr)
                .with_env_filter(filter)
                .finish();
            let _ = tracing::subscriber::set_global_default(subscriber);
        }
        LogFormat::Json => {
            let _ = tracing_subscriber::fmt()
                .json()
                .with_writer(std::io::stderr)
                .with_env_filter(filter)
                .with_current_span(false)
                .try_init();
        }
    }
}

/// Where the tests come from, and what it takes to reload them.
enum TestSource {
    File(PathBuf),
    Demo(Simulator),
}

/// Runs the exporter until a termination signal.
pub async fn run(args: Args) -> ExitCode {
    // The source of tests: the demo simulator, or the config file.
    if args.demo && args.config_file.is_some() {
        return usage("--demo runs its own simulated tests and takes no --config.file");
    }
    let (source, tests) = if args.demo {
        let ignored = demo_ignores(&args);
        if !ignored.is_empty() {
            warn!(ignored = ignored.join(", "), "--demo talks to its own simulated API with its own token; these settings are not used");
        }
        match crate::demo::start().await {
            Ok((simulator, tests)) => (TestSource::Demo(simulator), tests),
            Err(e) => {
                error!(cause = %e, "cannot start the demo simulator");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let Some(path) = args.config_file.clone() else {
            return usage("--config.file is required (or --demo to run the embedded demo)");
        };
        match Config::load(&path) {
            Ok(config) => (TestSource::File(path), config.policy_tests),
            Err(e) => return usage(&e.to_string()),
        }
    };

    // Credentials, and the API they are for.
    let (credentials, api_url) = match &source {
        TestSource::Demo(simulator) => (
            Credentials::Token(Secret::new(crate::demo::token().to_owned())),
            simulator.url(),
        ),
        TestSource::File(_) => {
            let resolved = credential_sources(&args)
                .and_then(|sources| Credentials::resolve(&sources).map_err(|e| e.to_string()));
            match resolved {
                Ok(credentials) => (credentials, args.api_url.clone()),
                Err(e) => return usage(&e),
            }
        }
    };

    let web = match &args.web_config_file {
        Some(path) => match WebConfig::load(path) {
            Ok(web) => Some(Arc::new(web)),
            Err(e) => return usage(&e.to_string()),
        },
        None => None,
    };
    if let Err(e) = check_telemetry_path(&args.telemetry_path) {
        return usage(&e);
    }
    if let Some(addr) = duplicate(&args.listen_addresses) {
        return usage(&format!("--web.listen-address {addr} is given twice"));
    }
    if !args.demo && args.request_budget > CLOUDFLARE_REQUESTS_PER_WINDOW {
        warn!(
            budget = args.request_budget,
            cloudflare_allows = CLOUDFLARE_REQUESTS_PER_WINDOW,
            "--cloudflare.request-budget is above what Cloudflare allows a token per 5 minutes; expect throttling"
        );
    }

    // Metrics, budget and client.
    let metrics = match Metrics::new(u64::from(args.request_budget)) {
        Ok(metrics) => Arc::new(metrics),
        Err(e) => {
            error!(cause = %e, "cannot set up metrics");
            return ExitCode::FAILURE;
        }
    };
    let budget = Arc::new(RequestBudget::new(args.request_budget));
    let client = Client::new(
        ClientOptions {
            api_url,
            credentials,
            connect_timeout: args.connect_timeout,
            request_timeout: args.request_timeout,
            max_retries: args.max_retries,
            throttle_backoff: args.throttle_backoff,
            retry_base: args.retry_backoff,
        },
        budget,
        metrics.api.clone(),
    );
    let client = match client {
        Ok(client) => client,
        Err(e) => return usage(&e.to_string()),
    };

    if args.config_check {
        let plural = if tests.len() == 1 { "" } else { "s" };
        println!(
            "configuration is valid: {} policy test{plural}",
            tests.len()
        );
        return ExitCode::SUCCESS;
    }

    metrics.set_tests(&tests);
    metrics.config_loaded(true);
    metrics.render();
    let (tests_tx, tests_rx) = watch::channel(Arc::new(tests));

    // The listeners, before the first poll, so that health answers at once.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (reload_tx, mut reload_rx) = mpsc::channel::<server::ReloadRequest>(4);
    let state = Arc::new(ServerState {
        metrics: metrics.clone(),
        telemetry_path: args.telemetry_path.clone(),
        ready: ready_rx,
        tests: tests_rx.clone(),
        reload: reload_tx,
        web,
    });
    let mut listeners = Vec::new();
    for addr in &args.listen_addresses {
        match TcpListener::bind(addr).await {
            Ok(listener) => listeners.push((addr, listener)),
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let tls = state
        .web
        .as_ref()
        .is_some_and(|w| w.tls_acceptor().is_some());
    let mut servers = Vec::new();
    for (addr, listener) in listeners {
        info!(address = %addr, tls, "listening");
        servers.push(tokio::spawn(server::serve(
            listener,
            state.clone(),
            shutdown_rx.clone(),
        )));
    }

    // The poller.
    let wake = Arc::new(Notify::new());
    let interval = args.poll_interval.unwrap_or(if args.demo {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(300)
    });
    let poller = Poller::new(
        client,
        metrics.clone(),
        PollOptions {
            interval,
            concurrency: usize::from(args.poll_concurrency),
            walk: WalkOptions {
                per_page: args.per_page,
                concurrency: usize::from(args.walk_concurrency),
            },
        },
        tests_rx,
        ready_tx,
        wake.clone(),
    );
    let mut poller = tokio::spawn(poller.run());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        demo = args.demo,
        interval = %humantime::format_duration(interval),
        tests = tests_tx.borrow().len(),
        "exporter started"
    );

    // Signals and reloads, until told to stop.
    let (Ok(mut hangup), Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = reload(&source, &tests_tx, &metrics, &wake);
            }
            Some(reply) = reload_rx.recv() => {
                let _ = reply.send(reload(&source, &tests_tx, &metrics, &wake));
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            ended = &mut poller => {
                // The poller runs until aborted: ending means it panicked.
                // Serving frozen numbers as if healthy would be worse than
                // exiting for the supervisor to restart.
                error!(cause = ?ended.err(), "the poller stopped; exiting");
                let _ = shutdown_tx.send(true);
                return ExitCode::FAILURE;
            }
        }
    }

    // Stop: no new connections, no new requests to Cloudflare.
    info!("shutting down");
    poller.abort();
    let _ = shutdown_tx.send(true);
    let stopped =
        tokio::time::timeout(SHUTDOWN_GRACE, futures_util::future::join_all(servers)).await;
    if stopped.is_err() {
        warn!("listeners did not stop in time");
    }
    ExitCode::SUCCESS
}

/// Reloads the config file: a good one replaces the tests (series of removed
/// tests disappear, the others keep their values); a bad one is refused and
/// the running config stays. Falls short: credentials and the web config are
/// read at start-up only, so a rotated token needs a restart.
fn reload(
    source: &TestSource,
    tests: &watch::Sender<Arc<Vec<PolicyTest>>>,
    metrics: &Metrics,
    wake: &Notify,
) -> Result<(), ReloadError> {
    let path = match source {
        TestSource::File(path) => path,
        TestSource::Demo(_) => {
            info!("reload requested; the demo has no config file, nothing reloaded");
            return Err(ReloadError::NoConfigFile);
        }
    };

    match Config::load(path) {
        Ok(config) => {
            metrics.set_tests(&config.policy_tests);
            metrics.config_loaded(true);
            metrics.render();
            info!(tests = config.policy_tests.len(), "configuration reloaded");
            tests.send_replace(Arc::new(config.policy_tests));
            wake.notify_one();
            Ok(())
        }
        Err(e) => {
            metrics.config_loaded(false);
            metrics.render();
            error!(cause = %e, "configuration reload failed; the previous configuration stays in use");
            Err(e.into())
        }
    }
}

fn credential_sources(args: &Args) -> Result<CredentialSources, String> {
    // An empty variable counts as unset, as in a shell; one that is not
    // UTF-8 cannot be a token or key.
    let secret_env = |name: &str| match std::env::var(name) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Ok(Some(Secret::new(v))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    };
    Ok(CredentialSources {
        token_env: secret_env("CLOUDFLARE_API_TOKEN")?,
        token_file: args.api_token_file.clone(),
        email: args.api_email.clone(),
        key_env: secret_env("CLOUDFLARE_API_KEY")?,
        key_file: args.api_key_file.clone(),
    })
}

/// The Cloudflare settings `--demo` does not use, by flag or variable name
/// (never their values).
fn demo_ignores(args: &Args) -> Vec<&'static str> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    [
        (
            "--cloudflare.api-url",
            args.api_url != crate::cli::DEFAULT_API_URL,
        ),
        ("--cloudflare.api-token-file", args.api_token_file.is_some()),
        ("--cloudflare.api-key-file", args.api_key_file.is_some()),
        ("--cloudflare.api-email", args.api_email.is_some()),
        ("CLOUDFLARE_API_TOKEN", set("CLOUDFLARE_API_TOKEN")),
        ("CLOUDFLARE_API_KEY", set("CLOUDFLARE_API_KEY")),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
}

/// A telemetry path must be a plain absolute path that no other endpoint
/// uses, and that a client reaches as written: no empty, `.` or `..`
/// segments, which clients and proxies normalise away.
fn check_telemetry_path(path: &str) -> Result<(), String> {
    let plain = path.starts_with('/')
        && path.len() > 1
        && !path.starts_with("/-/")
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
        && path[1..]
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "--web.telemetry-path {path:?} must be an absolute path without spaces, query, fragment, empty, . or .. segments, other than / and not under /-/"
        ))
    }
}

fn duplicate<T: PartialEq + Copy>(items: &[T]) -> Option<T> {
    items
        .iter()
        .enumerate()
        .find(|(i, a)| items[..*i].contains(a))
        .map(|(_, a)| *a)
}

/// Reports bad input on standard error, once, and gives exit status 2.
fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}
