//! The HTTP server: `/metrics`, health, readiness, reload and the landing page.
//!
//! Scrapes are served from the exposition cached by [`crate::metrics`], so a
//! scrape never waits on Cloudflare or on a poll. Health does not depend on
//! Cloudflare either: `/-/healthy` answers 200 while the process serves, and
//! `/-/ready` once the first poll cycle has finished, whatever its outcome.
//! TLS and basic auth come from [`crate::webconfig`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::{PolicyTest, ReloadError};
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::webconfig::WebConfig;

/// How long open connections get to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(3);

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a first failed accept (as in Go's net/http server).
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);

/// The longest pause between two failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A reload request: the outcome is sent back on the channel.
pub type ReloadRequest = oneshot::Sender<Result<(), ReloadError>>;

/// What the handlers share.
#[derive(Debug)]
pub struct ServerState {
    /// The metrics and their cached exposition.
    pub metrics: Arc<Metrics>,
    /// Where the exposition is served (`--web.telemetry-path`).
    pub telemetry_path: String,
    /// True once the first poll cycle has finished.
    pub ready: watch::Receiver<bool>,
    /// The configured tests, for the landing page.
    pub tests: watch::Receiver<Arc<Vec<PolicyTest>>>,
    /// Where `POST /-/reload` sends its request.
    pub reload: mpsc::Sender<ReloadRequest>,
    /// TLS and basic auth, from `--web.config.file`.
    pub web: Option<Arc<WebConfig>>,
}

/// Serves on `listener` until `shutdown` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let tls = state.web.as_ref().and_then(|web| web.tls_acceptor());
    let mut backoff = AcceptBackoff::default();

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // When file descriptors run out, the error repeats
                    // until a connection closes: wait, longer each time,
                    // rather than spin and log on every turn.
                    let pause = backoff.failed();
                    warn!(
                        cause = %e,
                        retry_in = %humantime::format_duration(pause),
                        "accept failed"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = stopped(&mut shutdown) => break,
                    }
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        backoff.succeeded();
        let _ = stream.set_nodelay(true);

        let handler_state = state.clone();
        let service = service_fn(move |req| {
            let state = handler_state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req).await) }
        });
        let watcher = graceful.watcher();
        let tls = tls.clone();

        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let conn =
                                http1_builder().serve_connection(TokioIo::new(stream), service);
                            let _ = watcher.watch(conn).await;
                        }
                        Ok(Err(e)) => debug!(cause = %e, "TLS handshake failed"),
                        Err(_) => debug!("TLS handshake timed out"),
                    }
                }
                None => {
                    let conn = http1_builder().serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => info!("connections still open after the drain period; closing them"),
    }
}

/// The pause after each failed accept: 5 ms, doubling to at most 1 s, and
/// back to 5 ms after an accept succeeds. One warning is logged per pause,
/// so a lasting failure logs at most once a second.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// The last pause, while accepts keep failing.
    pause: Option<Duration>,
}

impl AcceptBackoff {
    /// Records a failed accept and returns how long to wait before the next.
    fn failed(&mut self) -> Duration {
        let pause = match self.pause {
            None => ACCEPT_BACKOFF_FIRST,
            Some(last) => (last * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.pause = Some(pause);
        pause
    }

    /// Records an accepted connection: the next failure starts over.
    fn succeeded(&mut self) {
        self.pause = None;
    }
}

/// HTTP/1 settings for every connection: a slow client cannot hold a
/// connection open by never finishing its headers. Public so that the
/// benchmark's bare server (`examples/static_body.rs`) uses the same.
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

type Body = Full<Bytes>;

async fn handle(state: &ServerState, req: Request<Incoming>) -> Response<Body> {
    if let Some(web) = &state.web {
        if !web.authorized(req.headers()).await {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(header::WWW_AUTHENTICATE, "Basic")
                .body(Body::from("Unauthorized\n"))
                .unwrap_or_default();
        }
    }

    match route(req.method(), req.uri().path(), &state.telemetry_path) {
        Route::Metrics => scrape(state, req.headers()),
        Route::MetricsWrongMethod => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "This endpoint requires a GET request\n",
        ),
        Route::Healthy => text(StatusCode::OK, "Healthy\n"),
        Route::Ready => {
            let ready = *state.ready.borrow();
            if ready {
                text(StatusCode::OK, "Ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Not ready: the first poll cycle has not finished\n",
                )
            }
        }
        Route::Reload => reload(state).await,
        Route::ReloadWrongMethod => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "This endpoint requires a POST request\n",
        ),
        Route::Landing => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Body::from(landing_page(state)))
            .unwrap_or_default(),
        Route::NotFound => text(StatusCode::NOT_FOUND, "Not found\n"),
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    MetricsWrongMethod,
    Healthy,
    Ready,
    Reload,
    ReloadWrongMethod,
    Landing,
    NotFound,
}

/// Routes by exact path, as Go's exporters do: `/metrics/` is not
/// `/metrics`, and no path is matched by prefix.
fn route(method: &Method, path: &str, telemetry_path: &str) -> Route {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        p if p == telemetry_path && read => Route::Metrics,
        p if p == telemetry_path => Route::MetricsWrongMethod,
        "/-/healthy" if read => Route::Healthy,
        "/-/ready" if read => Route::Ready,
        "/-/reload" if method == Method::POST => Route::Reload,
        "/-/reload" => Route::ReloadWrongMethod,
        "/" if read => Route::Landing,
        _ => Route::NotFound,
    }
}

/// Serves the cached exposition, gzip-compressed when the client accepts it.
fn scrape(state: &ServerState, headers: &http::HeaderMap) -> Response<Body> {
    let exposition = state.metrics.cached();
    let response = Response::builder()
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .header(header::VARY, "Accept-Encoding");
    let response = if accepts_gzip(headers) {
        response
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::new(exposition.gzip))
    } else {
        response.body(Body::new(exposition.text))
    };
    response.unwrap_or_default()
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, with a q-value
/// other than 0).
fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

async fn reload(state: &ServerState) -> Response<Body> {
    let (reply, outcome) = oneshot::channel();
    if state.reload.send(reply).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match outcome.await {
        Ok(Ok(())) => text(StatusCode::OK, "configuration reloaded\n"),
        Ok(Err(message)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("failed to reload config: {message}\n"),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body.to_owned()))
        .unwrap_or_default()
}

fn landing_page(state: &ServerState) -> String {
    let tests = state.tests.borrow().clone();
    let mut rows = String::new();
    for test in tests.iter() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>\n",
            escape(test.name()),
            escape(test.account_id.as_str()),
            escape(test.id.as_str()),
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"3\">No policy tests configured.</td></tr>\n");
    }
    let path = escape(&state.telemetry_path);

    format!(
        "<!DOCTYPE html>
<html>
<head><meta charset=\"utf-8\"><title>Cloudflare Access Exporter</title></head>
<body>
<h1>Cloudflare Access Exporter</h1>
<p>Version {version}. Exports Cloudflare Access policy test results as Prometheus metrics.</p>
<p><a href=\"{path}\">Metrics</a> &middot; <a href=\"/-/healthy\">Health</a> &middot; <a href=\"/-/ready\">Readiness</a></p>
<h2>Policy tests</h2>
<table>
<tr><th>Name</th><th>Account</th><th>Policy test</th></tr>
{rows}</table>
</body>
</html>
",
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_used_only_when_accepted() {
        let headers = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, value.parse().expect("header"));
            h
        };

        assert!(accepts_gzip(&headers("gzip")));
        assert!(accepts_gzip(&headers("deflate, GZIP;q=0.5")));
        assert!(accepts_gzip(&headers("*")));
        assert!(!accepts_gzip(&headers("gzip;q=0")));
        assert!(!accepts_gzip(&headers("identity")));
        assert!(!accepts_gzip(&http::HeaderMap::new()));
    }

    #[test]
    fn only_the_exact_telemetry_path_serves_metrics() {
        let get = Method::GET;

        assert_eq!(route(&get, "/metrics", "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::HEAD, "/metrics", "/metrics"), Route::Metrics);
        for path in [
            "/metrics/",
            "/metrics//",
            "//metrics",
            "/Metrics",
            "/metrics/x",
        ] {
            assert_eq!(route(&get, path, "/metrics"), Route::NotFound, "{path}");
        }
        assert_eq!(route(&get, "/custom/path", "/custom/path"), Route::Metrics);
        assert_eq!(route(&get, "/metrics", "/custom/path"), Route::NotFound);
        assert_eq!(
            route(&Method::POST, "/metrics", "/metrics"),
            Route::MetricsWrongMethod
        );
    }

    #[test]
    fn other_endpoints_route_by_exact_path_and_method() {
        let get = Method::GET;

        assert_eq!(route(&get, "/", "/metrics"), Route::Landing);
        assert_eq!(route(&get, "/-/healthy", "/metrics"), Route::Healthy);
        assert_eq!(route(&get, "/-/healthy/", "/metrics"), Route::NotFound);
        assert_eq!(route(&get, "/-/ready", "/metrics"), Route::Ready);
        assert_eq!(route(&Method::POST, "/-/reload", "/metrics"), Route::Reload);
        assert_eq!(
            route(&get, "/-/reload", "/metrics"),
            Route::ReloadWrongMethod
        );
        assert_eq!(route(&Method::POST, "/", "/metrics"), Route::NotFound);
    }

    #[test]
    fn accept_backoff_doubles_from_5ms_to_1s_and_resets_on_success() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u64> = (0..10)
            .map(|_| backoff.failed().as_millis() as u64)
            .collect();

        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(5));
        assert_eq!(backoff.failed(), Duration::from_millis(10));
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
