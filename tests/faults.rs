//! The exporter under faults: each test drives the real binary against the
//! simulated API with one fault injected, and checks that no wrong number is
//! published, that stale numbers stay and are marked, and that the exporter
//! keeps running.

mod common;

use std::time::{Duration, Instant};

use cloudflare_access_exporter::simulator::{Fault, SimOptions, Simulator, Target};
use common::{sim_test, simulator, write_config, Exporter, Samples};

const A: &str = "aaaa-0001";
const B: &str = "bbbb-0002";

/// Flags that keep fault tests fast: quick retries, a short cycle.
const FAST: [&str; 6] = [
    "--cloudflare.retry-backoff",
    "10ms",
    "--poll.interval",
    "1s",
    "--cloudflare.request-timeout",
    "2s",
];

fn users(s: &Samples, id: &str, status: &str) -> Option<f64> {
    s.test(
        "cloudflare_access_policy_test_users",
        id,
        id,
        &[("status", status)],
    )
}

fn success(s: &Samples, id: &str) -> Option<f64> {
    s.test("cloudflare_access_policy_test_poll_success", id, id, &[])
}

fn failures(s: &Samples, id: &str, reason: &str) -> f64 {
    s.test(
        "cloudflare_access_policy_test_poll_failures_total",
        id,
        id,
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Starts two tests A (1,500 users) and B (800), waits for a first good
/// cycle, then changes A's users so that a publish of anything new would
/// show. Returns the simulator, the exporter and A's first counts.
async fn two_tests_after_a_good_cycle(
    extra: &[&str],
) -> (Simulator, Exporter, [u64; 4], tempfile::TempDir) {
    let sim = simulator().await;
    sim.add_test(sim_test(A, 1_500));
    sim.add_test(sim_test(B, 800));
    let first = sim.test(common::ACCOUNT, A).expect("test").counts();
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None), (B, None)]);
    let mut args = FAST.to_vec();
    args.extend_from_slice(extra);
    let exporter = Exporter::against(&sim, &config, &args).await;
    exporter
        .wait_for("first good cycle", Duration::from_secs(20), |s| {
            success(s, A) == Some(1.0) && success(s, B) == Some(1.0)
        })
        .await;
    sim.update_test(common::ACCOUNT, A, |t| t.seed = 99);
    (sim, exporter, first, dir)
}

/// Asserts A still shows its first counts and is marked failed by `reason`,
/// while B keeps succeeding.
async fn assert_stale_and_marked(exporter: &Exporter, first: [u64; 4], reason: &str) -> Samples {
    let s = exporter
        .wait_for(reason, Duration::from_secs(30), |s| {
            failures(s, A, reason) >= 1.0
        })
        .await;
    assert_eq!(success(&s, A), Some(0.0), "A should be marked failed");
    assert_eq!(users(&s, A, "approved"), Some(first[0] as f64));
    assert_eq!(users(&s, A, "blocked"), Some(first[1] as f64));
    assert_eq!(users(&s, A, "error"), Some(first[2] as f64));
    assert_eq!(success(&s, B), Some(1.0), "B is unaffected");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_502_from_a_proxy_keeps_previous_values() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(Target::Page(2), Some(A), 1_000, Fault::html(502));

    let s = assert_stale_and_marked(&exporter, first, "http_error").await;
    assert!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "users"), ("outcome", "http_error")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );
    assert!(
        exporter.logs().contains("502 Bad Gateway"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_5xx_is_retried_with_backoff_then_succeeds() {
    let (sim, exporter, _, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(
        Target::Page(1),
        Some(A),
        2,
        Fault::api_error(503, 10013, "Service unavailable"),
    );
    let new = sim.test(common::ACCOUNT, A).expect("test").counts();

    let s = exporter
        .wait_for(
            "retried walk publishes the new counts",
            Duration::from_secs(20),
            |s| users(s, A, "approved") == Some(new[0] as f64),
        )
        .await;
    assert_eq!(success(&s, A), Some(1.0));
    assert_eq!(failures(&s, A, "api_error"), 0.0);
    assert_eq!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "users"), ("outcome", "api_error")]
        ),
        Some(2.0)
    );
    assert_eq!(
        s.get("cloudflare_access_api_errors_total", &[("code", "other")]),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_json_5xx_keeps_previous_values() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(
        Target::Users,
        Some(A),
        1_000,
        Fault::api_error(500, 10001, "Internal server error"),
    );

    let s = assert_stale_and_marked(&exporter, first, "api_error").await;
    // Each failed poll tried the page 1 + 3 retries times.
    assert!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "users"), ("outcome", "api_error")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_a_decode_failure_not_data() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(Target::Page(1), Some(A), 1_000, Fault::Truncate);

    assert_stale_and_marked(&exporter, first, "decode").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_response_times_out() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(
        Target::Status,
        Some(A),
        1_000,
        Fault::Stall(Duration::from_secs(5)),
    );

    let s = assert_stale_and_marked(&exporter, first, "transport").await;
    assert!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "status"), ("outcome", "transport")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_is_a_transport_failure() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(Target::Page(2), Some(A), 1_000, Fault::Close);

    assert_stale_and_marked(&exporter, first, "transport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_false_with_http_200_is_a_failure_counted_by_code() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(
        Target::Status,
        Some(A),
        1_000,
        Fault::api_error(200, 7000, "No route for that URI"),
    );

    let s = assert_stale_and_marked(&exporter, first, "api_error").await;
    assert!(
        s.get("cloudflare_access_api_errors_total", &[("code", "7000")])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        exporter.logs().contains("7000 No route for that URI"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_token_is_logged_with_its_cause_and_polling_goes_on() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.inject(
        Target::Status,
        Some(A),
        1_000,
        Fault::api_error(403, 10000, "Authentication error"),
    );

    let s = assert_stale_and_marked(&exporter, first, "unauthorized").await;
    assert!(
        s.get("cloudflare_access_api_errors_total", &[("code", "10000")])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        exporter.logs().contains("Access: Policy Test Read"),
        "{}",
        exporter.logs()
    );
    let cycles = s
        .get("cloudflare_access_exporter_poll_cycles_total", &[])
        .expect("cycles");
    exporter
        .wait_for("more cycles", Duration::from_secs(10), |s| {
            s.get("cloudflare_access_exporter_poll_cycles_total", &[])
                .unwrap_or(0.0)
                > cycles
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_test_id_is_not_found_and_others_succeed() {
    let sim = simulator().await;
    sim.add_test(sim_test(B, 800));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[("does-not-exist", None), (B, None)]);
    let exporter = Exporter::against(&sim, &config, &FAST).await;

    let s = exporter
        .wait_for("not found", Duration::from_secs(20), |s| {
            failures(s, "does-not-exist", "not_found") >= 1.0 && success(s, B) == Some(1.0)
        })
        .await;
    assert_eq!(success(&s, "does-not-exist"), Some(0.0));
    assert!(s
        .matching(
            "cloudflare_access_policy_test_users",
            &[("policy_test_id", "does-not-exist")]
        )
        .is_empty());
    assert!(
        exporter.logs().contains("does not exist"),
        "{}",
        exporter.logs()
    );
    // A 404 is not retried: one request per cycle.
    let cycles = s
        .get("cloudflare_access_exporter_poll_cycles_total", &[])
        .expect("cycles");
    let missing = sim
        .requests()
        .iter()
        .filter(|r| r.path.contains("does-not-exist"))
        .count() as f64;
    assert!(
        missing <= cycles + 1.0,
        "{missing} requests over {cycles} cycles"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_keeps_the_exporter_up() {
    let port = common::free_port();
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let url = format!("http://127.0.0.1:{port}/client/v4");
    let mut args = vec![
        "--config.file",
        config.to_str().expect("path"),
        "--cloudflare.api-url",
        &url,
    ];
    args.extend_from_slice(&FAST);
    let exporter = Exporter::start(&args, &[("CLOUDFLARE_API_TOKEN", "t")]).await;

    exporter.wait_ready().await;
    let s = exporter
        .wait_for("transport failure", Duration::from_secs(20), |s| {
            failures(s, A, "transport") >= 1.0
        })
        .await;
    assert_eq!(success(&s, A), Some(0.0));
    assert!(s
        .matching("cloudflare_access_policy_test_users", &[])
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_never_returns_an_empty_page_is_stopped() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    sim.update_test(common::ACCOUNT, A, |t| t.never_empty = true);

    assert_stale_and_marked(&exporter, first, "too_many_pages").await;
    // 1,500 users on 1000-user pages, the last page served again and again:
    // the bound (the users plus one page) stops the walk at page 5.
    let page = |n: u64| {
        sim.requests()
            .iter()
            .filter(|r| {
                r.path.ends_with(&format!("{A}/users")) && r.query.contains(&format!("page={n}&"))
            })
            .count()
    };
    assert!(page(5) >= 1);
    assert_eq!(page(6), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_set_shifting_during_the_walk_is_not_published() {
    let (sim, exporter, first, _dir) = two_tests_after_a_good_cycle(&[]).await;
    // From page 2 on every page starts one user early: one user is counted
    // twice; the total no longer matches Cloudflare's count.
    sim.update_test(common::ACCOUNT, A, |t| t.shift_from_page = Some(2));

    assert_stale_and_marked(&exporter, first, "inconsistent_walk").await;
    assert!(
        exporter
            .logs()
            .contains("found 1501 users but the test reports 1500"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_states_are_exported_without_a_tally() {
    let sim = simulator().await;
    for (id, state) in [
        ("t-processing", "processing"),
        ("t-exceeded", "exceeded time"),
        ("t-blocked", "blocked"),
        ("t-odd", "paused"),
    ] {
        let mut test = sim_test(id, 900);
        test.state = state.to_owned();
        test.percent_processed = 30;
        sim.add_test(test);
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(
        dir.path(),
        &[
            ("t-processing", None),
            ("t-exceeded", None),
            ("t-blocked", None),
            ("t-odd", None),
        ],
    );
    let exporter = Exporter::against(&sim, &config, &FAST).await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);

    for (id, state) in [
        ("t-processing", "processing"),
        ("t-exceeded", "exceeded time"),
        ("t-blocked", "blocked"),
        ("t-odd", "unknown"),
    ] {
        assert_eq!(
            s.test(
                "cloudflare_access_policy_test_state",
                id,
                id,
                &[("state", state)]
            ),
            Some(1.0),
            "{id}"
        );
        let states: f64 = s
            .matching(
                "cloudflare_access_policy_test_state",
                &[("policy_test_id", id)],
            )
            .iter()
            .map(|(_, v)| v)
            .sum();
        assert_eq!(states, 1.0, "{id}: exactly one state is 1");
        assert_eq!(
            s.test("cloudflare_access_policy_test_processed_ratio", id, id, &[]),
            Some(0.3)
        );
        assert!(
            s.matching(
                "cloudflare_access_policy_test_users",
                &[("policy_test_id", id)]
            )
            .is_empty(),
            "{id}"
        );
    }
    assert_eq!(
        sim.requests()
            .iter()
            .filter(|r| r.path.ends_with("/users"))
            .count(),
        0,
        "no test was walked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_sends_nothing_before_retry_after_then_finishes() {
    let sim = simulator().await;
    sim.add_test(sim_test(A, 10_000));
    sim.inject(Target::Page(3), Some(A), 1, Fault::throttle(Some("2")));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let exporter = Exporter::against(
        &sim,
        &config,
        &["--poll.interval", "1h", "--walk.concurrency", "1"],
    )
    .await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);

    // A 10,000-user test costs 1 status + 10 pages + the empty 11th = 12;
    // the throttled page is asked once more: 13.
    let requests = sim.requests();
    assert_eq!(requests.len(), 13);
    let throttled = requests
        .iter()
        .position(|r| r.status == 429)
        .expect("a 429");
    let gap = requests[throttled + 1].at - requests[throttled].at;
    assert!(gap >= Duration::from_secs(2), "sent again after {gap:?}");
    assert_eq!(
        s.get("cloudflare_access_api_throttled_total", &[]),
        Some(1.0)
    );
    assert_eq!(success(&s, A), Some(1.0));
    assert_eq!(
        s.test("cloudflare_access_policy_test_walk_pages", A, A, &[]),
        Some(11.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_without_retry_after_backs_off_anyway() {
    for retry_after in [None, Some("0")] {
        let sim = simulator().await;
        sim.add_test(sim_test(A, 100));
        sim.inject(Target::Status, Some(A), 1, Fault::throttle(retry_after));
        let dir = tempfile::tempdir().expect("dir");
        let config = write_config(dir.path(), &[(A, None)]);
        let exporter = Exporter::against(
            &sim,
            &config,
            &[
                "--poll.interval",
                "1h",
                "--cloudflare.throttle-backoff",
                "3s",
            ],
        )
        .await;
        exporter.wait_ready().await;

        let requests = sim.requests();
        assert_eq!(requests[0].status, 429);
        let gap = requests[1].at - requests[0].at;
        assert!(
            gap >= Duration::from_secs(3),
            "{retry_after:?}: sent again after {gap:?}"
        );
        let s = Samples::parse(&exporter.scrape().await);
        assert_eq!(success(&s, A), Some(1.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_ratelimit_remaining_stops_before_the_quota_is_spent() {
    // Cloudflare's quota here is 56. Each cycle costs 3 requests (status,
    // page 1, the empty page 2); after 6, Cloudflare says 50 remain, the
    // reserve left to other users of the token, and the exporter sends
    // nothing more until the window resets: it never meets a 429.
    let sim = Simulator::start(SimOptions {
        quota: 56,
        ..Default::default()
    })
    .await
    .expect("simulator");
    sim.add_test(sim_test(A, 500));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1s"]).await;
    let s = exporter
        .wait_for("ratelimit gauge", Duration::from_secs(10), |s| {
            s.get("cloudflare_access_api_ratelimit_remaining_requests", &[]) == Some(50.0)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let requests = sim.requests();
    assert_eq!(requests.len(), 6, "{requests:?}");
    assert!(requests.iter().all(|r| r.status == 200));
    assert_eq!(success(&s, A), Some(1.0));
    let s = Samples::parse(&exporter.scrape().await);
    assert_eq!(
        s.get("cloudflare_access_api_budget_remaining_requests", &[]),
        Some(0.0)
    );
    assert_eq!(
        s.get("cloudflare_access_api_throttled_total", &[]),
        Some(0.0)
    );
    assert!(
        exporter.logs().contains("nearly spent"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_that_does_not_fit_the_budget_is_deferred() {
    // Budget 10: test A (5,000 users) costs 1 + 6; test B then needs 6 more
    // than the 2 or 3 left and is deferred, with a log line and a count.
    let sim = simulator().await;
    sim.add_test(sim_test(A, 5_000));
    sim.add_test(sim_test(B, 5_000));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None), (B, None)]);
    let exporter = Exporter::against(
        &sim,
        &config,
        &[
            "--poll.interval",
            "1h",
            "--poll.concurrency",
            "1",
            "--cloudflare.request-budget",
            "10",
        ],
    )
    .await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);

    let deferred: Vec<f64> = [A, B]
        .iter()
        .map(|id| {
            s.test("cloudflare_access_policy_test_deferrals_total", id, id, &[])
                .expect("deferrals")
        })
        .collect();
    assert_eq!(deferred.iter().sum::<f64>(), 1.0, "{deferred:?}");
    assert_eq!(sim.requests().len(), 8);
    assert!(
        exporter.logs().contains("deferred to the next cycle"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_larger_than_the_budget_is_spread_not_refused() {
    // Budget 3 per 5 minutes and a 3-page test (5 requests): the walk
    // spends the budget, then waits for refills (one every 100 s), so within
    // a few seconds exactly 3 requests have been sent.
    let sim = simulator().await;
    sim.add_test(sim_test(A, 3_000));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let exporter = Exporter::against(
        &sim,
        &config,
        &["--poll.interval", "1h", "--cloudflare.request-budget", "3"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_eq!(sim.requests().len(), 3);
    assert!(
        exporter
            .logs()
            .contains("spreading it over several budget windows"),
        "{}",
        exporter.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_walk_exits_promptly_with_status_zero() {
    let sim = simulator().await;
    sim.add_test(sim_test(A, 50_000));
    sim.set_latency(Duration::from_millis(500));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let mut exporter = Exporter::against(&sim, &config, &["--walk.concurrency", "1"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim.requests().iter().any(|r| r.path.ends_with("/users")) {
        assert!(Instant::now() < deadline, "walk never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    exporter.signal("TERM");
    let exit = exporter.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(exit.code(), Some(0), "{}", exporter.logs());
    assert!(common::http()
        .get(exporter.url("/-/healthy"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_with_status_zero() {
    let mut exporter = Exporter::start(&["--demo"], &[]).await;

    exporter.signal("INT");
    let exit = exporter.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(exit.code(), Some(0), "{}", exporter.logs());
}
