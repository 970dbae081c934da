//! A simulated Cloudflare policy-test API, served over real HTTP on loopback.
//!
//! The demo (`--demo`) and the integration tests point the real client at
//! it, so the whole request path is exercised. It serves the status and users
//! endpoints in Cloudflare's shapes, checks credentials the way Cloudflare
//! does (403 with code 10000), validates `page` and `per_page` the way
//! Cloudflare's spec does, sends `Ratelimit` headers and answers 429 past its
//! quota. Tests can tell it to cap pages, never return an empty page, shift
//! the result set during a walk, add latency, or inject faults into chosen
//! requests; it records every request it receives.
//!
//! Users are not stored: user `i` of a test gets its status from a hash of
//! `i`, the test's seed and its generation, so a test of a million users
//! costs no memory. With drift on, each status read starts a new generation
//! and the counts move a little, as in a live system.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The path prefix of the simulated API, as in Cloudflare's base URL.
pub const PREFIX: &str = "/client/v4";

/// One simulated policy test.
#[derive(Debug, Clone)]
pub struct SimTest {
    /// Owning account (32 hex characters).
    pub account_id: String,
    /// Test id.
    pub id: String,
    /// The state the status endpoint reports, in Cloudflare's words.
    pub state: String,
    /// Users in the test.
    pub users: u64,
    /// Per mille of users approved; `blocked_per_mille` blocked, the rest errored.
    pub approved_per_mille: u64,
    /// Per mille of users blocked.
    pub blocked_per_mille: u64,
    /// Every n-th user (n > 0) has no `status` field; the status endpoint
    /// counts those users as errored.
    pub missing_status_every: Option<u64>,
    /// Seeds the users' statuses.
    pub seed: u64,
    /// The server serves at most this many users a page, whatever is asked.
    pub page_cap: Option<u64>,
    /// Past the last user, serve the last page again instead of an empty one.
    pub never_empty: bool,
    /// From this page on, every page starts one user earlier, as if a user
    /// had been added at the front during the walk.
    pub shift_from_page: Option<u64>,
    /// Each status read starts a new generation with slightly different counts.
    pub drift: bool,
    /// Added to the reported approved count, to make the counts disagree.
    pub reported_approved_offset: i64,
    /// `percent_users_processed` while not complete.
    pub percent_processed: u64,
    generation: u64,
}

impl SimTest {
    /// A complete test of `users` users with a 70/25/5 mix.
    pub fn new(account_id: &str, id: &str, users: u64) -> SimTest {
        SimTest {
            account_id: account_id.to_owned(),
            id: id.to_owned(),
            state: "complete".to_owned(),
            users,
            approved_per_mille: 700,
            blocked_per_mille: 250,
            missing_status_every: None,
            seed: 1,
            page_cap: None,
            never_empty: false,
            shift_from_page: None,
            drift: false,
            reported_approved_offset: 0,
            percent_processed: 100,
            generation: 0,
        }
    }

    /// The status user `index` has in the current generation; `None` when
    /// the user has no status field.
    pub fn user_status(&self, index: u64) -> Option<&'static str> {
        if let Some(every) = self.missing_status_every.filter(|n| *n > 0) {
            if index % every == every - 1 {
                return None;
            }
        }
        let wobble = if self.drift {
            (self.generation * 7 % 41) as i64 - 20
        } else {
            0
        };
        let approved = (self.approved_per_mille as i64 + wobble).clamp(0, 1000) as u64;
        let blocked = self.blocked_per_mille.min(1000 - approved);
        let roll = mix(self.seed, index) % 1000;
        Some(if roll < approved {
            "approved"
        } else if roll < approved + blocked {
            "blocked"
        } else {
            "error"
        })
    }

    /// What the users endpoint holds now: (approved, blocked, error, missing).
    pub fn counts(&self) -> [u64; 4] {
        let mut counts = [0; 4];
        for i in 0..self.users {
            let slot = match self.user_status(i) {
                Some("approved") => 0,
                Some("blocked") => 1,
                Some(_) => 2,
                None => 3,
            };
            counts[slot] += 1;
        }
        counts
    }
}

/// A SplitMix64 step: a cheap, well-spread hash of the seed and the index.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any request.
    Any,
    /// Status requests.
    Status,
    /// Users requests, any page.
    Users,
    /// Users requests for one page.
    Page(u64),
}

/// What a fault does instead of the normal answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status, headers and body.
    Respond {
        /// HTTP status.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// The body, sent as is.
        body: String,
    },
    /// Wait this long, then answer normally.
    Stall(Duration),
    /// Close the connection without answering.
    Close,
    /// Send the normal body cut in half.
    Truncate,
}

impl Fault {
    /// Cloudflare's failure envelope with one coded error.
    pub fn api_error(status: u16, code: i64, message: &str) -> Fault {
        Fault::Respond {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: failure_body(code, message),
        }
    }

    /// An HTML error page, as a proxy in front of the API sends.
    pub fn html(status: u16) -> Fault {
        Fault::Respond {
            status,
            headers: vec![("content-type".into(), "text/html".into())],
            body: format!(
                "<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body><center><h1>{status}</h1></center><hr><center>cloudflare</center></body>\r\n</html>\r\n"
            ),
        }
    }

    /// A 429 with Cloudflare's 971 envelope and the given `Retry-After`.
    pub fn throttle(retry_after: Option<&str>) -> Fault {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(value) = retry_after {
            headers.push(("retry-after".to_owned(), value.to_owned()));
        }
        Fault::Respond {
            status: 429,
            headers,
            body: failure_body(
                971,
                "Please wait and consider throttling your request speed",
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct FaultRule {
    target: Target,
    test_id: Option<String>,
    remaining: u32,
    fault: Fault,
}

/// A request the simulator received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// When it arrived.
    pub at: Instant,
    /// The path, without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The status answered (0 when the connection was closed instead).
    pub status: u16,
    /// Whether it carried valid credentials.
    pub authorized: bool,
}

/// How the simulator checks credentials and limits requests.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The accepted API token.
    pub token: Option<String>,
    /// The accepted email and Global API key.
    pub key: Option<(String, String)>,
    /// Requests allowed per window before 429 (Cloudflare: 1200).
    pub quota: u64,
    /// The rate-limit window (Cloudflare: 300 s).
    pub window: Duration,
    /// Added to every request.
    pub latency: Duration,
    /// Keep every request for [`Simulator::requests`]; a long-running
    /// simulator (load runs) turns this off so that it does not grow.
    pub record_requests: bool,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            token: Some(DEMO_TOKEN.to_owned()),
            key: None,
            quota: 1200,
            window: Duration::from_secs(300),
            latency: Duration::ZERO,
            record_requests: true,
        }
    }
}

/// The token the demo uses against its own simulator.
pub const DEMO_TOKEN: &str = "demo-token-not-a-secret";

#[derive(Debug)]
struct State {
    options: SimOptions,
    tests: HashMap<(String, String), SimTest>,
    faults: Vec<FaultRule>,
    requests: Vec<RecordedRequest>,
    window_start: Instant,
    window_used: u64,
}

/// A running simulator. Dropping it stops the server.
#[derive(Debug)]
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Simulator {
    /// Starts serving on `127.0.0.1` at an ephemeral port.
    pub async fn start(options: SimOptions) -> std::io::Result<Simulator> {
        Simulator::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Starts serving on `addr`.
    pub async fn start_on(addr: SocketAddr, options: SimOptions) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            options,
            tests: HashMap::new(),
            faults: Vec::new(),
            requests: Vec::new(),
            window_start: Instant::now(),
            window_used: 0,
        }));

        let shared = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        Ok(Simulator {
            addr,
            state,
            server,
        })
    }

    /// The base URL to give the exporter as `--cloudflare.api-url`.
    pub fn url(&self) -> String {
        format!("http://{}{PREFIX}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds or replaces a test.
    pub fn add_test(&self, test: SimTest) {
        let mut state = self.lock();
        state
            .tests
            .insert((test.account_id.clone(), test.id.clone()), test);
    }

    /// Changes a test in place.
    pub fn update_test(&self, account_id: &str, id: &str, change: impl FnOnce(&mut SimTest)) {
        let mut state = self.lock();
        if let Some(test) = state.tests.get_mut(&(account_id.to_owned(), id.to_owned())) {
            change(test);
        }
    }

    /// A copy of a test as it is now.
    pub fn test(&self, account_id: &str, id: &str) -> Option<SimTest> {
        let state = self.lock();
        state
            .tests
            .get(&(account_id.to_owned(), id.to_owned()))
            .cloned()
    }

    /// Makes the next `times` requests that match `target` (and `test_id`,
    /// when given) answer with `fault`.
    pub fn inject(&self, target: Target, test_id: Option<&str>, times: u32, fault: Fault) {
        let mut state = self.lock();
        state.faults.push(FaultRule {
            target,
            test_id: test_id.map(str::to_owned),
            remaining: times,
            fault,
        });
    }

    /// Removes every pending fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Changes the added latency.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().options.latency = latency;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a request asked for.
enum Route {
    Status(String, String),
    Users(String, String),
}

fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix(PREFIX)?.strip_prefix("/accounts/")?;
    let mut parts = rest.split('/');
    let account = parts.next()?.to_owned();
    if parts.next()? != "access" || parts.next()? != "policy-tests" {
        return None;
    }
    let id = parts.next()?.to_owned();
    match (parts.next(), parts.next()) {
        (None, _) => Some(Route::Status(account, id)),
        (Some("users"), None) => Some(Route::Users(account, id)),
        _ => None,
    }
}

/// What the handler decided while holding the lock.
enum Plan {
    Answer(Answer),
    Close,
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
    truncate: bool,
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let plan = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        plan(&mut state, &req)
    };

    let answer = match plan {
        Plan::Close => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fault: close",
            ))
        }
        Plan::Answer(answer) => answer,
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }

    let mut body = answer.body.into_bytes();
    if answer.truncate {
        body.truncate(body.len() / 2);
    }
    let mut response = Response::builder().status(answer.status);
    let mut has_content_type = false;
    for (name, value) in &answer.headers {
        has_content_type |= name.eq_ignore_ascii_case("content-type");
        response = response.header(name, value);
    }
    if !has_content_type {
        response = response.header("content-type", "application/json");
    }
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

fn plan(state: &mut State, req: &Request<Incoming>) -> Plan {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let authorized = authorized(&state.options, req.headers());
    let delay = state.options.latency;
    let route = route(&path);

    let record = |state: &mut State, status: u16| {
        if !state.options.record_requests {
            return;
        }
        state.requests.push(RecordedRequest {
            at: Instant::now(),
            path: path.clone(),
            query: query.clone(),
            status,
            authorized,
        });
    };

    // Rate limit first, as Cloudflare does.
    let now = Instant::now();
    if now.duration_since(state.window_start) >= state.options.window {
        state.window_start = now;
        state.window_used = 0;
    }
    state.window_used += 1;
    let reset = state
        .options
        .window
        .saturating_sub(now.duration_since(state.window_start))
        .as_secs()
        .max(1);
    let remaining = state.options.quota.saturating_sub(state.window_used);
    let limit_headers = vec![
        (
            "ratelimit".to_owned(),
            format!("\"default\";r={remaining};t={reset}"),
        ),
        (
            "ratelimit-policy".to_owned(),
            format!(
                "\"default\";q={};w={}",
                state.options.quota,
                state.options.window.as_secs()
            ),
        ),
    ];
    if state.window_used > state.options.quota {
        record(state, 429);
        let mut headers = limit_headers;
        headers.push(("retry-after".to_owned(), reset.to_string()));
        return Plan::Answer(Answer {
            status: 429,
            headers,
            body: failure_body(
                971,
                "Please wait and consider throttling your request speed",
            ),
            delay,
            truncate: false,
        });
    }

    // Injected faults.
    let page = query_value(&query, "page");
    let test_id = match &route {
        Some(Route::Status(_, id)) | Some(Route::Users(_, id)) => Some(id.clone()),
        None => None,
    };
    let matching = state.faults.iter_mut().position(|rule| {
        let target_ok = match (rule.target, &route) {
            (Target::Any, _) => true,
            (Target::Status, Some(Route::Status(..))) => true,
            (Target::Users, Some(Route::Users(..))) => true,
            (Target::Page(p), Some(Route::Users(..))) => page.as_deref() == Some(&p.to_string()),
            _ => false,
        };
        let test_ok = rule.test_id.is_none() || rule.test_id == test_id;
        rule.remaining > 0 && target_ok && test_ok
    });
    let mut fault = None;
    if let Some(index) = matching {
        let rule = &mut state.faults[index];
        rule.remaining -= 1;
        fault = Some(rule.fault.clone());
        if rule.remaining == 0 {
            state.faults.remove(index);
        }
    }
    let (extra_delay, truncate) = match fault {
        Some(Fault::Close) => {
            record(state, 0);
            return Plan::Close;
        }
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => {
            record(state, status);
            let mut all = limit_headers;
            all.extend(headers);
            return Plan::Answer(Answer {
                status,
                headers: all,
                body,
                delay,
                truncate: false,
            });
        }
        Some(Fault::Stall(stall)) => (stall, false),
        Some(Fault::Truncate) => (Duration::ZERO, true),
        None => (Duration::ZERO, false),
    };

    let (status, body) = answer(state, req, route, authorized, &query);
    record(state, status);
    Plan::Answer(Answer {
        status,
        headers: limit_headers,
        body,
        delay: delay + extra_delay,
        truncate,
    })
}

fn authorized(options: &SimOptions, headers: &http::HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token_ok = match (&options.token, get("authorization")) {
        (Some(token), Some(value)) => value.strip_prefix("Bearer ") == Some(token.as_str()),
        _ => false,
    };
    let key_ok = match (&options.key, get("x-auth-email"), get("x-auth-key")) {
        (Some((email, key)), Some(e), Some(k)) => e == email && k == key,
        _ => false,
    };
    token_ok || key_ok
}

fn answer(
    state: &mut State,
    req: &Request<Incoming>,
    route: Option<Route>,
    authorized: bool,
    query: &str,
) -> (u16, String) {
    if req.method() != http::Method::GET {
        return (405, failure_body(10405, "Method not allowed"));
    }
    let Some(route) = route else {
        return (
            404,
            failure_body(7003, "Could not route to the requested URL"),
        );
    };
    if !authorized {
        return (403, failure_body(10000, "Authentication error"));
    }

    match route {
        Route::Status(account, id) => match state.tests.get_mut(&(account, id)) {
            None => (404, failure_body(7003, "Policy test not found")),
            Some(test) => {
                if test.drift {
                    test.generation += 1;
                }
                (200, status_body(test))
            }
        },
        Route::Users(account, id) => {
            let page = query_value(query, "page").unwrap_or_else(|| "1".to_owned());
            let per_page = query_value(query, "per_page").unwrap_or_else(|| "25".to_owned());
            let (Ok(page), Ok(per_page)) = (page.parse::<i64>(), per_page.parse::<i64>()) else {
                return (
                    400,
                    failure_body(10001, "page and per_page must be integers"),
                );
            };
            if per_page > 1000 {
                return (400, failure_body(10001, "per_page must be <= 1000"));
            }
            match state.tests.get(&(account, id)) {
                None => (404, failure_body(7003, "Policy test not found")),
                Some(test) => (
                    200,
                    users_body(test, page.max(1) as u64, per_page.max(1) as u64),
                ),
            }
        }
    }
}

fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

fn failure_body(code: i64, message: &str) -> String {
    serde_json::json!({
        "success": false,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": null,
    })
    .to_string()
}

fn status_body(test: &SimTest) -> String {
    let [approved, blocked, error, missing] = test.counts();
    let complete = test.state == "complete";
    let share = |n: u64| {
        if complete {
            n
        } else {
            n * test.percent_processed / 100
        }
    };
    let approved = (share(approved) as i64 + test.reported_approved_offset).max(0) as u64;
    let (blocked, errored) = (share(blocked), share(error + missing));
    let processed = approved + blocked + errored;
    let percent = |n: u64| (n * 100).checked_div(processed).unwrap_or(0);
    serde_json::json!({
        "success": true,
        "errors": [],
        "messages": [],
        "result": {
            "id": test.id,
            "status": test.state,
            "total_users": test.users,
            "percent_users_processed": if complete { 100 } else { test.percent_processed },
            "users_approved": approved,
            "users_blocked": blocked,
            "users_errored": errored,
            "percent_approved": percent(approved),
            "percent_blocked": percent(blocked),
            "percent_errored": percent(errored),
        }
    })
    .to_string()
}

/// The body the users endpoint sends for `page` of `test` with `per_page`
/// users a page (before any injected fault): the real shape, one object per
/// user with `id`, `email`, `name` and, unless the test leaves it out,
/// `status`. Public for the decode benchmark.
pub fn users_body(test: &SimTest, page: u64, per_page: u64) -> String {
    let size = test
        .page_cap
        .map_or(per_page, |cap| per_page.min(cap))
        .max(1);
    let shift = match test.shift_from_page {
        Some(from) if page >= from => 1,
        _ => 0,
    };
    let mut start = (page.saturating_sub(1).saturating_mul(size)).saturating_sub(shift);
    if test.never_empty && start >= test.users && test.users > 0 {
        start = (test.users - 1) / size * size;
    }
    let end = (start + size).min(test.users);

    let mut body = String::with_capacity(((end.saturating_sub(start)) * 130 + 64) as usize);
    body.push_str(r#"{"success":true,"errors":[],"messages":[],"result":["#);
    for i in start..end {
        if i > start {
            body.push(',');
        }
        let h = mix(test.seed ^ 0xA5A5, i);
        let _ = write!(
            body,
            r#"{{"id":"{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}","email":"user{i}@example.com","name":"User {i}""#,
            (h >> 32) as u32,
            (h >> 16) as u16,
            (h >> 4) as u16 & 0xfff,
            (h >> 40) as u16 & 0xfff,
            i
        );
        if let Some(status) = test.user_status(i) {
            let _ = write!(body, r#","status":"{status}""#);
        }
        body.push('}');
    }
    body.push_str("]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cloudflare_paths() {
        assert!(matches!(
            route("/client/v4/accounts/a/access/policy-tests/t"),
            Some(Route::Status(a, t)) if a == "a" && t == "t"
        ));
        assert!(matches!(
            route("/client/v4/accounts/a/access/policy-tests/t/users"),
            Some(Route::Users(..))
        ));
        assert!(route("/client/v4/accounts/a/access/other/t").is_none());
        assert!(route("/accounts/a/access/policy-tests/t").is_none());
    }

    #[test]
    fn pages_cover_every_user_once() {
        let mut test = SimTest::new("a", "t", 2_345);
        test.missing_status_every = Some(10);
        let counts = test.counts();
        let mut seen = [0u64; 4];
        let mut page = 1;
        loop {
            let body = users_body(&test, page, 1000);
            let value: serde_json::Value = serde_json::from_str(&body).expect("json");
            let users = value["result"].as_array().expect("array");
            if users.is_empty() {
                break;
            }
            for user in users {
                let slot = match user["status"].as_str() {
                    Some("approved") => 0,
                    Some("blocked") => 1,
                    Some(_) => 2,
                    None => 3,
                };
                seen[slot] += 1;
            }
            page += 1;
        }

        assert_eq!(page, 4);
        assert_eq!(seen, counts);
        assert_eq!(counts.iter().sum::<u64>(), 2_345);
        assert_eq!(counts[3], 234);
    }
}
