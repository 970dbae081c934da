//! A standalone simulated Cloudflare policy-test API, for load and
//! performance runs (`scripts/perf.sh`) and for trying the exporter by hand.
//!
//! ```text
//! cargo run --release --example simulator -- \
//!     --listen 127.0.0.1:0 --tests 3 --users 100000,1000000,1000 --latency 50ms
//! ```
//!
//! It prints its base URL (what the exporter takes as `--cloudflare.api-url`)
//! as the first line of standard output, then serves until SIGTERM or SIGINT.
//! The tests are complete and belong to `--account`; test `i` (from 0) has
//! the id `format!("{i:08x}")` followed by 56 fixed hex digits (see
//! [`test_id`]), so a script can write a matching config without asking. The
//! accepted API token is `--token` (the demo token by default).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use cloudflare_access_exporter::simulator::{SimOptions, SimTest, Simulator, DEMO_TOKEN};

/// The 56 hex digits every test id ends with.
const ID_SUFFIX: &str = "5eed0f1a8b3c9d4e5f6789a0b1c2d3e4f5678a9b0c1d2e3f4a5b6789";

/// Serves simulated Cloudflare policy tests on loopback until killed.
#[derive(Debug, Parser)]
#[command(name = "simulator", about, long_about = None)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Number of policy tests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tests: u32,

    /// Users per test; a comma-separated list gives test i the i-th value,
    /// and the tests past the list the last one.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    users: Vec<u64>,

    /// Delay added to every request.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,

    /// Requests allowed per rate-limit window before 429.
    #[arg(long, default_value_t = 1200)]
    quota: u64,

    /// The rate-limit window.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    window: Duration,

    /// Serve at most this many users a page, whatever `per_page` asks.
    #[arg(long)]
    page_cap: Option<u64>,

    /// Account owning every test (32 hex characters).
    #[arg(long, default_value = "023e105f4ecef8ad9ca31a8372d0c353")]
    account: String,

    /// The accepted API token.
    #[arg(long, default_value = DEMO_TOKEN)]
    token: String,
}

/// The id of test `index`: 8 hex digits of the index, then [`ID_SUFFIX`]
/// (64 hex digits in all, as Cloudflare's ids are).
fn test_id(index: u32) -> String {
    format!("{index:08x}{ID_SUFFIX}")
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.users.is_empty() {
        eprintln!("error: --users needs at least one value");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> ExitCode {
    let options = SimOptions {
        token: Some(args.token.clone()),
        key: None,
        quota: args.quota,
        window: args.window,
        latency: args.latency,
        record_requests: false,
    };
    let simulator = match Simulator::start_on(args.listen, options).await {
        Ok(simulator) => simulator,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };

    let last = args.users.last().copied().unwrap_or(0);
    for index in 0..args.tests {
        let users = args.users.get(index as usize).copied().unwrap_or(last);
        let mut test = SimTest::new(&args.account, &test_id(index), users);
        test.seed = u64::from(index) + 1;
        test.page_cap = args.page_cap;
        simulator.add_test(test);
    }

    // The URL first and alone on its line, for scripts that wait for it.
    println!("{}", simulator.url());
    eprintln!(
        "simulator: {} tests of account {} (ids {}..{}), users {:?}, latency {:?}, quota {} per {:?}",
        args.tests,
        args.account,
        test_id(0),
        test_id(args.tests - 1),
        args.users,
        args.latency,
        args.quota,
        args.window,
    );

    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("error: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    drop(simulator);
    ExitCode::SUCCESS
}
