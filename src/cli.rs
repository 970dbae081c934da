//! Command-line flags, each also readable from an environment variable.
//!
//! Flags follow the names Prometheus exporters use (`--web.listen-address`,
//! `--config.file`, `--log.level`). Secrets are taken from the environment
//! or from files only, never from a flag value, which other users of the
//! machine could read in the process list.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Cloudflare's API, the default `--cloudflare.api-url`.
pub const DEFAULT_API_URL: &str = "https://api.cloudflare.com/client/v4";

/// The default port: above the crowded 9100–9999 range of exporters.
pub const DEFAULT_PORT: u16 = 10410;

/// Prometheus exporter for Cloudflare Access policy test results.
#[derive(Debug, Clone, Parser)]
#[command(name = "cloudflare-access-exporter", version, about, long_about = None)]
pub struct Args {
    /// Configuration file listing the policy tests to poll.
    #[arg(
        long = "config.file",
        env = "CLOUDFLARE_ACCESS_EXPORTER_CONFIG_FILE",
        value_name = "PATH"
    )]
    pub config_file: Option<PathBuf>,

    /// Validate the configuration and credentials, print the verdict and exit (0 valid, 2 invalid).
    #[arg(long = "config.check", env = "CLOUDFLARE_ACCESS_EXPORTER_CONFIG_CHECK")]
    pub config_check: bool,

    /// Address to listen on; repeat for several.
    #[arg(
        long = "web.listen-address",
        env = "CLOUDFLARE_ACCESS_EXPORTER_WEB_LISTEN_ADDRESS",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        default_value = "0.0.0.0:10410",
        value_parser = parse_listen_address
    )]
    pub listen_addresses: Vec<SocketAddr>,

    /// Path under which metrics are served.
    #[arg(
        long = "web.telemetry-path",
        env = "CLOUDFLARE_ACCESS_EXPORTER_WEB_TELEMETRY_PATH",
        default_value = "/metrics"
    )]
    pub telemetry_path: String,

    /// Web configuration file (TLS and basic auth, exporter-toolkit format).
    #[arg(
        long = "web.config.file",
        env = "CLOUDFLARE_ACCESS_EXPORTER_WEB_CONFIG_FILE",
        value_name = "PATH"
    )]
    pub web_config_file: Option<PathBuf>,

    /// Base URL of the Cloudflare API.
    #[arg(
        long = "cloudflare.api-url",
        env = "CLOUDFLARE_API_URL",
        default_value = DEFAULT_API_URL
    )]
    pub api_url: String,

    /// File holding the API token (the token may instead be given in CLOUDFLARE_API_TOKEN).
    #[arg(
        long = "cloudflare.api-token-file",
        env = "CLOUDFLARE_API_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub api_token_file: Option<PathBuf>,

    /// Email of the account whose Global API key is used (legacy scheme).
    #[arg(
        long = "cloudflare.api-email",
        env = "CLOUDFLARE_API_EMAIL",
        value_name = "EMAIL"
    )]
    pub api_email: Option<String>,

    /// File holding the Global API key (the key may instead be given in CLOUDFLARE_API_KEY).
    #[arg(
        long = "cloudflare.api-key-file",
        env = "CLOUDFLARE_API_KEY_FILE",
        value_name = "PATH"
    )]
    pub api_key_file: Option<PathBuf>,

    /// Requests the exporter may send per 5-minute window (Cloudflare allows 1200 per token, shared).
    #[arg(long = "cloudflare.request-budget", env = "CLOUDFLARE_ACCESS_EXPORTER_REQUEST_BUDGET", default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub request_budget: u32,

    /// Timeout for connecting to the API.
    #[arg(long = "cloudflare.connect-timeout", env = "CLOUDFLARE_ACCESS_EXPORTER_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub connect_timeout: Duration,

    /// Timeout for one whole request, body included.
    #[arg(long = "cloudflare.request-timeout", env = "CLOUDFLARE_ACCESS_EXPORTER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub request_timeout: Duration,

    /// Retries of a failed request within one poll (with exponential backoff and jitter).
    #[arg(
        long = "cloudflare.max-retries",
        env = "CLOUDFLARE_ACCESS_EXPORTER_MAX_RETRIES",
        default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(0..=10)
    )]
    pub max_retries: u32,

    /// First retry delay; doubles on each retry.
    #[arg(long = "cloudflare.retry-backoff", env = "CLOUDFLARE_ACCESS_EXPORTER_RETRY_BACKOFF", default_value = "500ms", value_parser = parse_backoff)]
    pub retry_backoff: Duration,

    /// How long to send nothing after a 429 without a usable Retry-After.
    #[arg(long = "cloudflare.throttle-backoff", env = "CLOUDFLARE_ACCESS_EXPORTER_THROTTLE_BACKOFF", default_value = "5m", value_parser = parse_throttle_backoff)]
    pub throttle_backoff: Duration,

    /// Time between the starts of two poll cycles [default: 5m, 15s with --demo].
    #[arg(long = "poll.interval", env = "CLOUDFLARE_ACCESS_EXPORTER_POLL_INTERVAL", value_parser = parse_interval)]
    pub poll_interval: Option<Duration>,

    /// Policy tests polled at once.
    #[arg(long = "poll.concurrency", env = "CLOUDFLARE_ACCESS_EXPORTER_POLL_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub poll_concurrency: u16,

    /// User pages fetched at once within one walk.
    #[arg(long = "walk.concurrency", env = "CLOUDFLARE_ACCESS_EXPORTER_WALK_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub walk_concurrency: u16,

    /// Users asked for per page (Cloudflare's maximum is 1000).
    #[arg(long = "walk.per-page", env = "CLOUDFLARE_ACCESS_EXPORTER_WALK_PER_PAGE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub per_page: u32,

    /// Only log messages at this level or above.
    #[arg(long = "log.level", env = "CLOUDFLARE_ACCESS_EXPORTER_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long = "log.format", env = "CLOUDFLARE_ACCESS_EXPORTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Logfmt)]
    pub log_format: LogFormat,

    /// Run against an embedded, simulated Cloudflare API (no account or credentials needed).
    #[arg(long = "demo", env = "CLOUDFLARE_ACCESS_EXPORTER_DEMO")]
    pub demo: bool,
}

/// `--log.level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Everything, including the HTTP stack's own traces.
    Trace,
    /// One line per request.
    Debug,
    /// One line per poll cycle and per walk.
    Info,
    /// Failed polls and disagreements.
    Warn,
    /// Errors only.
    Error,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// `--log.format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `key=value` pairs, as Prometheus components log.
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// Accepts `HOST:PORT` and `:PORT` (all interfaces), like Go exporters.
fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    if let Ok(addr) = full.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))
}

/// A duration within `min..=max`.
fn bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    bounded(s, Duration::from_millis(100), Duration::from_secs(600))
}

fn parse_backoff(s: &str) -> Result<Duration, String> {
    bounded(s, Duration::from_millis(1), Duration::from_secs(60))
}

fn parse_throttle_backoff(s: &str) -> Result<Duration, String> {
    bounded(s, Duration::from_secs(1), Duration::from_secs(3600))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    bounded(
        s,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_forms() {
        assert_eq!(
            parse_listen_address(":10410").expect("valid"),
            "0.0.0.0:10410".parse::<SocketAddr>().expect("literal")
        );
        assert!(parse_listen_address("127.0.0.1:1").is_ok());
        assert!(parse_listen_address("nonsense").is_err());
    }

    #[test]
    fn defaults_match_the_readme() {
        let args = Args::try_parse_from(["cloudflare-access-exporter"]).expect("parses");

        assert_eq!(args.telemetry_path, "/metrics");
        assert_eq!(args.listen_addresses[0].port(), DEFAULT_PORT);
        assert_eq!(args.request_budget, 600);
        assert_eq!(args.api_url, "https://api.cloudflare.com/client/v4");
        assert_eq!(args.poll_interval, None);
        assert!(Args::try_parse_from(["x", "--poll.interval", "10ms"]).is_err());
        assert!(Args::try_parse_from(["x", "--poll.interval", "8d"]).is_err());
        assert!(Args::try_parse_from(["x", "--poll.interval", "7d"]).is_ok());
        assert!(Args::try_parse_from(["x", "--cloudflare.request-timeout", "0s"]).is_err());
        assert!(Args::try_parse_from(["x", "--cloudflare.throttle-backoff", "0s"]).is_err());
        assert!(Args::try_parse_from(["x", "--cloudflare.max-retries", "100"]).is_err());
        assert!(Args::try_parse_from(["x", "--cloudflare.retry-backoff", "10y"]).is_err());
    }
}
