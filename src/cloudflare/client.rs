//! The HTTP client for Cloudflare's policy-test endpoints.
//!
//! It owns the request path: the budget is spent before each request,
//! transient failures (connection errors, timeouts, 5xx, bodies that are not
//! JSON) are retried a bounded number of times with exponential backoff and
//! jitter, a 429 closes the budget until `Retry-After` has passed, and every
//! attempt is counted by outcome. It knows nothing of walks or tallies.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cloudflare::budget::{retry_after, RateLimit, RequestBudget, RATELIMIT_RESERVE};
use crate::cloudflare::types::{ApiMessage, Envelope, PageTally, PolicyTestStatus};
use crate::config::PolicyTest;
use crate::credentials::{Credentials, CredentialsError};
use crate::metrics::ApiMetrics;

/// Cloudflare error codes that mean "slow down" even when sent with HTTP 200.
const THROTTLE_CODES: [i64; 2] = [971, 10429];

/// The largest response body read, in bytes.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The most of a body quoted in an error or a debug log.
const BODY_SNIPPET: usize = 200;

/// Which endpoint a request went to, for logs and the `endpoint` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET .../policy-tests/{id}`.
    Status,
    /// `GET .../policy-tests/{id}/users`.
    Users,
}

impl Endpoint {
    /// The `endpoint` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::Users => "users",
        }
    }
}

/// How one request attempt ended, as the `outcome` label of the request
/// counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A usable answer.
    Success,
    /// Cloudflare's envelope reported errors.
    ApiError,
    /// An error status without Cloudflare's envelope.
    HttpError,
    /// A body that could not be decoded (or was too large).
    Decode,
    /// No HTTP answer.
    Transport,
    /// Throttled by Cloudflare.
    RateLimited,
}

impl Outcome {
    /// Every outcome, for pre-initialising the counter.
    pub const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::ApiError,
        Outcome::HttpError,
        Outcome::Decode,
        Outcome::Transport,
        Outcome::RateLimited,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ApiError => "api_error",
            Outcome::HttpError => "http_error",
            Outcome::Decode => "decode",
            Outcome::Transport => "transport",
            Outcome::RateLimited => "rate_limited",
        }
    }
}

/// Why a request to Cloudflare failed, after any retries.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No HTTP answer: refused, reset, timed out.
    #[error("{endpoint} request failed: {message}")]
    Transport {
        /// The endpoint asked.
        endpoint: &'static str,
        /// reqwest's description, which never includes headers.
        message: String,
    },

    /// Cloudflare (or a proxy in front of it) answered with an error status
    /// and a body that is not Cloudflare's envelope, such as an HTML page.
    #[error("{endpoint} request answered HTTP {status}: {snippet}")]
    Http {
        /// The endpoint asked.
        endpoint: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the body, for the log.
        snippet: String,
    },

    /// Cloudflare's envelope said `success: false`.
    #[error("{endpoint} request answered HTTP {status} with Cloudflare errors: {}", join(.errors))]
    Api {
        /// The endpoint asked.
        endpoint: &'static str,
        /// The HTTP status (200 happens).
        status: u16,
        /// Cloudflare's coded errors.
        errors: Vec<ApiMessage>,
    },

    /// Cloudflare throttled the token and the retries ran out.
    #[error("{endpoint} request throttled by Cloudflare (HTTP 429); nothing is sent for {}s", .retry_after.as_secs())]
    RateLimited {
        /// The endpoint asked.
        endpoint: &'static str,
        /// How long Cloudflare asked to wait.
        retry_after: Duration,
    },

    /// A 2xx answer whose body is not a usable envelope.
    #[error("{endpoint} response could not be decoded (HTTP {status}): {message}")]
    Decode {
        /// The endpoint asked.
        endpoint: &'static str,
        /// The HTTP status.
        status: u16,
        /// What was wrong with the body.
        message: String,
    },
}

fn join(errors: &[ApiMessage]) -> String {
    if errors.is_empty() {
        return "(none given)".to_owned();
    }
    errors
        .iter()
        .map(ApiMessage::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a poll failed, as the bounded `reason` label of the failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Cloudflare's envelope reported errors.
    ApiError,
    /// An HTTP error without Cloudflare's envelope.
    HttpError,
    /// No HTTP answer.
    Transport,
    /// A body that could not be decoded.
    Decode,
    /// Throttled by Cloudflare.
    RateLimited,
    /// The credentials were refused (401/403, code 10000).
    Unauthorized,
    /// The test id does not exist (404).
    NotFound,
    /// The walk's tally disagreed with the test's reported total.
    InconsistentWalk,
    /// The server kept returning pages past the test's user count.
    TooManyPages,
}

impl FailureReason {
    /// Every reason, for pre-initialising the counter.
    pub const ALL: [FailureReason; 9] = [
        FailureReason::ApiError,
        FailureReason::HttpError,
        FailureReason::Transport,
        FailureReason::Decode,
        FailureReason::RateLimited,
        FailureReason::Unauthorized,
        FailureReason::NotFound,
        FailureReason::InconsistentWalk,
        FailureReason::TooManyPages,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ApiError => "api_error",
            FailureReason::HttpError => "http_error",
            FailureReason::Transport => "transport",
            FailureReason::Decode => "decode",
            FailureReason::RateLimited => "rate_limited",
            FailureReason::Unauthorized => "unauthorized",
            FailureReason::NotFound => "not_found",
            FailureReason::InconsistentWalk => "inconsistent_walk",
            FailureReason::TooManyPages => "too_many_pages",
        }
    }
}

impl ApiError {
    /// The failure reason this error is counted under.
    pub fn reason(&self) -> FailureReason {
        let status = match self {
            ApiError::Transport { .. } => return FailureReason::Transport,
            ApiError::RateLimited { .. } => return FailureReason::RateLimited,
            ApiError::Decode { .. } => return FailureReason::Decode,
            ApiError::Http { status, .. } | ApiError::Api { status, .. } => *status,
        };
        let codes: &[ApiMessage] = match self {
            ApiError::Api { errors, .. } => errors,
            _ => &[],
        };
        if status == 401 || status == 403 || codes.iter().any(|e| e.code == 10000) {
            FailureReason::Unauthorized
        } else if status == 404 {
            FailureReason::NotFound
        } else if matches!(self, ApiError::Api { .. }) {
            FailureReason::ApiError
        } else {
            FailureReason::HttpError
        }
    }

    /// The HTTP status of the answer, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Http { status, .. }
            | ApiError::Api { status, .. }
            | ApiError::Decode { status, .. } => Some(*status),
            ApiError::RateLimited { .. } => Some(429),
            ApiError::Transport { .. } => None,
        }
    }

    /// The first Cloudflare error code of the answer, when it had any.
    pub fn first_code(&self) -> Option<i64> {
        match self {
            ApiError::Api { errors, .. } => errors.first().map(|e| e.code),
            _ => None,
        }
    }

    /// A hint for the operator, when the error has a usual cause.
    pub fn hint(&self) -> Option<&'static str> {
        match self.reason() {
            FailureReason::Unauthorized => Some(
                "the API token is invalid or lacks the \"Access: Policy Test Read\" permission",
            ),
            FailureReason::NotFound => {
                Some("the policy test does not exist (or has expired): check the id in the config")
            }
            _ => None,
        }
    }

    /// Whether a retry inside the same cycle may succeed.
    fn retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. } | ApiError::Decode { .. } => true,
            ApiError::RateLimited { .. } => true,
            ApiError::Http { status, .. } | ApiError::Api { status, .. } => {
                *status >= 500 || *status == 408
            }
        }
    }
}

/// How the client is set up.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Base URL, like `https://api.cloudflare.com/client/v4`.
    pub api_url: String,
    /// How to authenticate.
    pub credentials: Credentials,
    /// TCP and TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout, body included.
    pub request_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The wait after a 429 that gave no usable `Retry-After`.
    pub throttle_backoff: Duration,
    /// First retry delay; doubles each retry, with jitter.
    pub retry_base: Duration,
}

/// A Cloudflare API client for the policy-test endpoints.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    budget: Arc<RequestBudget>,
    metrics: ApiMetrics,
    max_retries: u32,
    throttle_backoff: Duration,
    retry_base: Duration,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The credentials cannot be sent as headers.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The TLS stack or HTTP client failed to initialise.
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    /// `--cloudflare.api-url` is not a base URL the client can use.
    #[error("--cloudflare.api-url {shown}: {why}")]
    Url {
        /// The URL as given, with any user name and password cut out.
        shown: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Checks `--cloudflare.api-url`: an http(s) URL with a host, and nothing
/// that would be sent somewhere or some way other than the paths appended
/// to it say: no query or fragment (the paths would land inside them), no
/// user name or password (reqwest would send them instead of the token),
/// and `http://` only to this host (credentials never cross a network in
/// clear text).
fn check_api_url(given: &str) -> Result<(), ClientError> {
    let fail = |why| ClientError::Url {
        shown: shown_url(given),
        why,
    };
    let url = reqwest::Url::parse(given)
        .map_err(|_| fail("not a URL; expected one like https://api.cloudflare.com/client/v4"))?;

    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(fail("must be an http:// or https:// URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail("must not hold a user name or password; credentials come from CLOUDFLARE_API_TOKEN or the key"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(fail(
            "must not have a query (?) or fragment (#): request paths are appended to it",
        ));
    }
    if url.scheme() == "http" && !is_loopback(&url) {
        return Err(fail("would send the credentials unencrypted: use https:// (http:// is accepted for loopback addresses only)"));
    }
    Ok(())
}

/// `given` for an error message: only its scheme, host and port, since a
/// path, query, fragment or user part may hold a secret; nothing of a value
/// that has no host.
fn shown_url(given: &str) -> String {
    match reqwest::Url::parse(given) {
        Ok(url) if url.host_str().is_some() => {
            let host = url.host_str().unwrap_or_default();
            match url.port() {
                Some(port) => format!("\"{}://{host}:{port}/…\"", url.scheme()),
                None => format!("\"{}://{host}/…\"", url.scheme()),
            }
        }
        _ => "(value not shown)".to_owned(),
    }
}

/// Whether `url` names this host: `localhost` or a loopback address.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');

    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    /// Builds a client that spends `budget` and counts into `metrics`.
    pub fn new(
        options: ClientOptions,
        budget: Arc<RequestBudget>,
        metrics: ApiMetrics,
    ) -> Result<Client, ClientError> {
        let base = options.api_url.trim_end_matches('/').to_owned();
        check_api_url(&base)?;

        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .default_headers(options.credentials.headers()?)
            .user_agent(concat!(
                "cloudflare-access-exporter/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            // Credentials go to the configured host only: reqwest drops
            // `Authorization` on a redirect to another host but not
            // `X-Auth-Key`, and Cloudflare's API does not redirect.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ClientError::Build)?;

        Ok(Client {
            http,
            base,
            budget,
            metrics,
            max_retries: options.max_retries,
            throttle_backoff: options.throttle_backoff,
            retry_base: options.retry_base,
        })
    }

    /// The request budget this client spends.
    pub fn budget(&self) -> &Arc<RequestBudget> {
        &self.budget
    }

    /// Reads the test's state and counts.
    pub async fn status(&self, test: &PolicyTest) -> Result<PolicyTestStatus, ApiError> {
        let url = format!(
            "{}/accounts/{}/access/policy-tests/{}",
            self.base, test.account_id, test.id
        );
        self.get(Endpoint::Status, &url, &[]).await
    }

    /// Reads and tallies one page of the test's user results.
    pub async fn users_page(
        &self,
        test: &PolicyTest,
        page: u64,
        per_page: u32,
    ) -> Result<PageTally, ApiError> {
        let url = format!(
            "{}/accounts/{}/access/policy-tests/{}/users",
            self.base, test.account_id, test.id
        );
        let query = [
            ("page", page.to_string()),
            ("per_page", per_page.to_string()),
        ];
        self.get(Endpoint::Users, &url, &query).await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        url: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        let mut attempt = 0;
        loop {
            let result = self.attempt(endpoint, url, query).await;
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };

            if attempt >= self.max_retries || !error.retryable() {
                return Err(error);
            }
            attempt += 1;

            // A throttle already closed the budget; the next acquire waits it
            // out. Other failures back off exponentially, with full jitter.
            if !matches!(error, ApiError::RateLimited { .. }) {
                let ceiling = self.retry_base.saturating_mul(1 << attempt.min(10));
                let delay = ceiling.mul_f64(0.5 + fastrand::f64() * 0.5);
                debug!(endpoint = endpoint.as_str(), attempt, delay = ?delay, cause = %error, "retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        url: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        self.budget.acquire().await;
        self.metrics.budget_remaining(self.budget.available());

        let started = Instant::now();
        let sent = self.http.get(url).query(query).send().await;
        let response = sent.map_err(|e| self.transport(endpoint, &e))?;

        // Read what the headers say before the body consumes the response.
        let status = response.status().as_u16();
        let throttle_wait = (status == 429).then(|| {
            retry_after(
                header(response.headers(), "retry-after"),
                self.throttle_backoff,
            )
        });
        if let Some(limit) = header(response.headers(), "ratelimit").and_then(RateLimit::parse) {
            self.budget.observe_ratelimit(limit);
            self.metrics.ratelimit_remaining(limit.remaining);
            if limit.remaining <= RATELIMIT_RESERVE {
                warn!(
                    remaining = limit.remaining,
                    reset = ?limit.reset,
                    "Cloudflare's rate-limit window is nearly spent; sending nothing until it resets"
                );
            }
        }
        let body = self.read_body(endpoint, status, response).await?;
        debug!(
            endpoint = endpoint.as_str(),
            url,
            page = query.first().map(|(_, v)| v.as_str()),
            status,
            bytes = body.len(),
            elapsed = ?started.elapsed(),
            "cloudflare request"
        );

        if let Some(wait) = throttle_wait {
            // A 429 may carry Cloudflare's envelope; its codes are counted
            // as they would be with any other status.
            if let Ok(envelope) = serde_json::from_slice::<Envelope<serde::de::IgnoredAny>>(&body) {
                for e in &envelope.errors {
                    self.metrics.error_code(e.code);
                }
            }
            return Err(self.throttled(endpoint, wait));
        }

        let outcome = decode::<T>(endpoint, status, &body);
        match &outcome {
            Ok(_) => self.metrics.request(endpoint, Outcome::Success),
            Err(ApiError::Api { errors, .. }) => {
                for e in errors {
                    self.metrics.error_code(e.code);
                }
                if errors.iter().any(|e| THROTTLE_CODES.contains(&e.code)) {
                    return Err(self.throttled(endpoint, self.throttle_backoff));
                }
                self.metrics.request(endpoint, Outcome::ApiError);
            }
            Err(ApiError::Http { .. }) => self.metrics.request(endpoint, Outcome::HttpError),
            Err(_) => self.metrics.request(endpoint, Outcome::Decode),
        }
        outcome
    }

    /// Reads a body of at most [`MAX_BODY`] bytes. A 1,000-user page is
    /// about 250 KB; anything past the cap is not Cloudflare's answer and is
    /// a decode failure, not memory spent.
    async fn read_body(
        &self,
        endpoint: Endpoint,
        status: u16,
        mut response: reqwest::Response,
    ) -> Result<bytes::Bytes, ApiError> {
        let too_large = || {
            self.metrics.request(endpoint, Outcome::Decode);
            ApiError::Decode {
                endpoint: endpoint.as_str(),
                status,
                message: format!("body larger than {MAX_BODY} bytes"),
            }
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }

        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport(endpoint, &e))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// Counts a request that got no HTTP answer (or lost its body).
    fn transport(&self, endpoint: Endpoint, e: &reqwest::Error) -> ApiError {
        self.metrics.request(endpoint, Outcome::Transport);
        ApiError::Transport {
            endpoint: endpoint.as_str(),
            message: describe(e),
        }
    }

    fn throttled(&self, endpoint: Endpoint, wait: Duration) -> ApiError {
        self.budget.close_for(wait);
        self.metrics.request(endpoint, Outcome::RateLimited);
        self.metrics.throttled();
        self.metrics.budget_remaining(0);
        warn!(
            endpoint = endpoint.as_str(),
            retry_after = ?wait,
            "throttled by Cloudflare; sending nothing until Retry-After has passed"
        );
        ApiError::RateLimited {
            endpoint: endpoint.as_str(),
            retry_after: wait,
        }
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// reqwest's error text without the source chain's duplicates.
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;

    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        e.to_string()
    };
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Turns an answer into data or an error. Cloudflare's envelope wins over
/// the HTTP status: `success: false` with 200 is a failure, and an error
/// status with an envelope carries its codes.
fn decode<T: DeserializeOwned>(
    endpoint: Endpoint,
    status: u16,
    body: &[u8],
) -> Result<T, ApiError> {
    let endpoint_name = endpoint.as_str();
    let envelope = serde_json::from_slice::<Envelope<T>>(body);

    match envelope {
        Ok(env) if env.success == Some(true) && (200..300).contains(&status) => {
            env.result.ok_or_else(|| ApiError::Decode {
                endpoint: endpoint_name,
                status,
                message: "success without a result".to_owned(),
            })
        }
        Ok(env) if env.success == Some(false) || !env.errors.is_empty() => Err(ApiError::Api {
            endpoint: endpoint_name,
            status,
            errors: env.errors,
        }),
        Ok(_) if (200..300).contains(&status) => Err(ApiError::Decode {
            endpoint: endpoint_name,
            status,
            message: "envelope without success: true".to_owned(),
        }),
        Err(e) if (200..300).contains(&status) => Err(ApiError::Decode {
            endpoint: endpoint_name,
            status,
            message: e.to_string(),
        }),
        _ => Err(ApiError::Http {
            endpoint: endpoint_name,
            status,
            snippet: snippet(body),
        }),
    }
}

/// The start of a body, on one line, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_SNIPPET)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::config::{AccountId, PolicyTestId};
    use crate::credentials::Secret;
    use crate::metrics::Metrics;

    const KEY: &str = "key-that-must-stay-home-5f3a";

    fn client(api_url: &str) -> Result<Client, ClientError> {
        let metrics = Metrics::new(600).expect("metrics");
        Client::new(
            ClientOptions {
                api_url: api_url.to_owned(),
                credentials: Credentials::Key {
                    email: "ops@example.com".to_owned(),
                    key: Secret::new(KEY.to_owned()),
                },
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(10),
                max_retries: 0,
                throttle_backoff: Duration::from_secs(1),
                retry_base: Duration::from_millis(1),
            },
            Arc::new(RequestBudget::new(600)),
            metrics.api.clone(),
        )
    }

    fn policy_test() -> PolicyTest {
        PolicyTest::new(
            AccountId::try_from("023e105f4ecef8ad9ca31a8372d0c353".to_owned()).expect("account"),
            PolicyTestId::try_from("f1a8b3c9".to_owned()).expect("id"),
            None,
        )
    }

    /// A one-connection server that reads a request, writes `head` and then
    /// `body_bytes` bytes of `x`, and returns the request it read.
    async fn serve_once(
        head: String,
        body_bytes: usize,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/client/v4", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return String::new();
            };
            let mut request = vec![0u8; 8192];
            let n = socket.read(&mut request).await.unwrap_or(0);
            let _ = socket.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < body_bytes {
                let n = chunk.len().min(body_bytes - sent);
                if socket.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        (url, server)
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        for ok in [
            "https://api.cloudflare.com/client/v4",
            "http://127.0.0.1:8080/client/v4",
            "http://127.9.9.9/x",
            "http://[::1]:1/x",
            "http://LOCALHOST:1/x",
        ] {
            assert!(client(ok).is_ok(), "{ok}");
        }
        for plain in [
            "http://api.cloudflare.com/client/v4",
            "http://10.0.0.1/x",
            "http://localhost.evil.example/x",
        ] {
            let err = client(plain).expect_err(plain).to_string();
            let host = reqwest::Url::parse(plain).expect("url");
            let host = host.host_str().expect("host");
            assert!(err.contains("unencrypted") && err.contains(host), "{err}");
        }
    }

    #[test]
    fn api_urls_that_would_mangle_requests_are_refused_by_name() {
        for (url, why) in [
            ("ftp://x", "http:// or https://"),
            ("nonsense", "not a URL"),
            ("https://api.cloudflare.com/client/v4?x=SeCrEt", "query"),
            ("https://api.cloudflare.com/client/v4#SeCrEt", "fragment"),
            ("u:SeCrEt@api.cloudflare.com", "http:// or https://"),
            (
                "https://u:pw-SeCrEt@api.cloudflare.com/v4",
                "user name or password",
            ),
            ("http://u:pw-SeCrEt@127.0.0.1:1/v4", "user name or password"),
        ] {
            let err = client(url).expect_err(url).to_string();

            assert!(err.starts_with("--cloudflare.api-url "), "{err}");
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("SeCrEt"), "{err}");
        }
        let unparsable = shown_url("ht tp://u:SeCrEt@host");
        assert!(!unparsable.contains("SeCrEt"), "{unparsable}");
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_and_the_key_stays_home() {
        let elsewhere = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = format!("http://{}/steal", elsewhere.local_addr().expect("addr"));
        let head = format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n");
        let (url, server) = serve_once(head, 0).await;

        let err = client(&url)
            .expect("client")
            .status(&policy_test())
            .await
            .expect_err("a redirect is not an answer");

        assert_eq!(err.status(), Some(302));
        assert!(
            server.await.expect("server").contains(KEY),
            "the configured host got the key"
        );
        let followed = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }

    #[tokio::test]
    async fn an_oversized_body_is_a_decode_failure_not_memory() {
        for (label, head) in [
            (
                "declared",
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1),
            ),
            (
                "undeclared",
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n".to_owned(),
            ),
        ] {
            let (url, server) = serve_once(head, MAX_BODY + 1).await;

            let err = client(&url)
                .expect("client")
                .users_page(&policy_test(), 1, 1000)
                .await
                .expect_err(label);

            assert!(
                matches!(&err, ApiError::Decode { message, .. } if message.contains("larger than")),
                "{label}: {err}"
            );
            server.abort();
        }
    }

    #[test]
    fn envelope_with_success_false_is_an_error_even_with_200() {
        let body = include_bytes!("../../tests/data/error.429.rate-limited-971.json");
        let err = decode::<PageTally>(Endpoint::Users, 200, body).expect_err("failure");

        assert!(matches!(&err, ApiError::Api { status: 200, errors, .. } if errors[0].code == 971));
        assert_eq!(err.reason(), FailureReason::ApiError);
    }

    #[test]
    fn authentication_error_is_unauthorized_with_a_hint() {
        let body = include_bytes!("../../tests/data/error.403.authentication-10000.json");
        let err = decode::<PolicyTestStatus>(Endpoint::Status, 403, body).expect_err("failure");

        assert_eq!(err.reason(), FailureReason::Unauthorized);
        assert!(err
            .hint()
            .expect("hint")
            .contains("Access: Policy Test Read"));
        assert!(err.to_string().contains("10000"), "{err}");
    }

    #[test]
    fn html_from_a_proxy_is_an_http_error() {
        let err = decode::<PageTally>(
            Endpoint::Users,
            502,
            b"<html>\n<head><title>502 Bad Gateway</title></head></html>",
        )
        .expect_err("failure");

        assert!(matches!(err, ApiError::Http { status: 502, .. }));
        assert!(err.to_string().contains("502 Bad Gateway"), "{err}");
        assert!(err.retryable());
    }

    #[test]
    fn truncated_body_is_a_retryable_decode_error() {
        let err = decode::<PageTally>(Endpoint::Users, 200, br#"{"success":true,"result":[{"id""#)
            .expect_err("failure");

        assert!(matches!(err, ApiError::Decode { status: 200, .. }));
        assert!(err.retryable());
    }

    #[test]
    fn not_found_is_not_retried() {
        let err = decode::<PolicyTestStatus>(
            Endpoint::Status,
            404,
            br#"{"success":false,"errors":[{"code":7003,"message":"No route"}],"messages":[],"result":null}"#,
        )
        .expect_err("failure");

        assert_eq!(err.reason(), FailureReason::NotFound);
        assert!(!err.retryable());
    }
}
