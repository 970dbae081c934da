//! The exporter end to end: the real binary walks simulated policy tests over
//! HTTP and the scrape carries exactly the right numbers.

mod common;

use std::time::Duration;

use common::{sim_test, simulator, write_config, Exporter, Samples, ACCOUNT};

const BIG: &str = "b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b16b";
const SMALL: &str = "5a11-5a11";
const RUNNING: &str = "processing-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_page_walk_is_scraped_with_exact_values() {
    // A test of several thousand users, on pages the server caps at 700 when
    // 1000 are asked, with every 50th user missing its status; a tiny test;
    // and a test still processing.
    let sim = simulator().await;
    let mut big = sim_test(BIG, 4_321);
    big.page_cap = Some(700);
    big.missing_status_every = Some(50);
    sim.add_test(big.clone());
    sim.add_test(sim_test(SMALL, 3));
    let mut running = sim_test(RUNNING, 2_000);
    running.state = "processing".to_owned();
    running.percent_processed = 40;
    sim.add_test(running);

    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(
        dir.path(),
        &[
            (BIG, Some("contractors")),
            (SMALL, None),
            (RUNNING, Some("running")),
        ],
    );
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);

    // The big test: every status exact, the missing ones under "unknown".
    let [approved, blocked, error, missing] = big.counts();
    assert_eq!(approved + blocked + error + missing, 4_321);
    assert_eq!(missing, 86);
    let users = |status| {
        s.test(
            "cloudflare_access_policy_test_users",
            BIG,
            "contractors",
            &[("status", status)],
        )
    };
    assert_eq!(users("approved"), Some(approved as f64));
    assert_eq!(users("blocked"), Some(blocked as f64));
    assert_eq!(users("error"), Some(error as f64));
    assert_eq!(users("unknown"), Some(missing as f64));

    // The status endpoint counts missing-status users as errored, so the
    // per-status tally disagrees while the totals agree: published, flagged.
    let reported = |status| {
        s.test(
            "cloudflare_access_policy_test_reported_users",
            BIG,
            "contractors",
            &[("status", status)],
        )
    };
    assert_eq!(reported("approved"), Some(approved as f64));
    assert_eq!(reported("blocked"), Some(blocked as f64));
    assert_eq!(reported("error"), Some((error + missing) as f64));
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_tally_mismatch",
            BIG,
            "contractors",
            &[]
        ),
        Some(1.0)
    );

    // 4,321 users on 700-user pages: 7 pages and the empty 8th.
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_walk_pages",
            BIG,
            "contractors",
            &[]
        ),
        Some(8.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_poll_success",
            BIG,
            "contractors",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_processed_ratio",
            BIG,
            "contractors",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_state",
            BIG,
            "contractors",
            &[("state", "complete")]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_state",
            BIG,
            "contractors",
            &[("state", "processing")]
        ),
        Some(0.0)
    );
    let walk_seconds = s
        .test(
            "cloudflare_access_policy_test_walk_duration_seconds",
            BIG,
            "contractors",
            &[],
        )
        .expect("duration");
    assert!(walk_seconds > 0.0 && walk_seconds < 10.0, "{walk_seconds}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last = s
        .test(
            "cloudflare_access_policy_test_last_success_timestamp_seconds",
            BIG,
            "contractors",
            &[],
        )
        .expect("timestamp");
    assert!((now - last).abs() < 30.0, "{now} vs {last}");

    // The small test, named by its id; zeros are exported too.
    let [sa, sb, se, _] = sim_test(SMALL, 3).counts();
    let small = |status| {
        s.test(
            "cloudflare_access_policy_test_users",
            SMALL,
            SMALL,
            &[("status", status)],
        )
    };
    assert_eq!(small("approved"), Some(sa as f64));
    assert_eq!(small("blocked"), Some(sb as f64));
    assert_eq!(small("error"), Some(se as f64));
    assert_eq!(small("unknown"), Some(0.0));
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_tally_mismatch",
            SMALL,
            SMALL,
            &[]
        ),
        Some(0.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_walk_pages",
            SMALL,
            SMALL,
            &[]
        ),
        Some(2.0)
    );

    // The processing test: progress and state, no tally.
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_processed_ratio",
            RUNNING,
            "running",
            &[]
        ),
        Some(0.4)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_state",
            RUNNING,
            "running",
            &[("state", "processing")]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_poll_success",
            RUNNING,
            "running",
            &[]
        ),
        Some(1.0)
    );
    assert!(s
        .matching(
            "cloudflare_access_policy_test_users",
            &[("policy_test_id", RUNNING)]
        )
        .is_empty());
    assert!(s
        .matching(
            "cloudflare_access_policy_test_walk_pages",
            &[("policy_test_id", RUNNING)]
        )
        .is_empty());

    // Requests: 3 status reads, 8 + 2 user pages, nothing else.
    assert_eq!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "status"), ("outcome", "success")]
        ),
        Some(3.0)
    );
    assert_eq!(
        s.get(
            "cloudflare_access_api_requests_total",
            &[("endpoint", "users"), ("outcome", "success")]
        ),
        Some(10.0)
    );
    assert_eq!(sim.requests().len(), 13);
    assert!(sim
        .requests()
        .iter()
        .all(|r| r.authorized && r.status == 200));
    assert!(sim
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/users"))
        .all(|r| r.query.contains("per_page=1000")));

    // Exporter-level series.
    assert_eq!(
        s.get("cloudflare_access_exporter_poll_cycles_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        s.get(
            "cloudflare_access_exporter_config_last_reload_successful",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.matching(
            "cloudflare_access_exporter_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .len(),
        1
    );
    assert_eq!(
        s.get("cloudflare_access_api_throttled_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        s.get("cloudflare_access_api_budget_requests", &[]),
        Some(600.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_key_authenticates_and_endpoints_answer() {
    let sim = cloudflare_access_exporter::simulator::Simulator::start(
        cloudflare_access_exporter::simulator::SimOptions {
            token: None,
            key: Some(("ops@example.com".to_owned(), "global-key-123".to_owned())),
            ..Default::default()
        },
    )
    .await
    .expect("simulator");
    sim.add_test(sim_test(SMALL, 3));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(SMALL, Some("<b>key & co</b>"))]);
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "global-key-123\n").expect("key file");
    let url = sim.url();
    let exporter = Exporter::start(
        &[
            "--config.file",
            config.to_str().expect("path"),
            "--cloudflare.api-url",
            &url,
            "--cloudflare.api-key-file",
            key_file.to_str().expect("path"),
        ],
        &[("CLOUDFLARE_API_EMAIL", "ops@example.com")],
    )
    .await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);
    let client = common::http();

    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_poll_success",
            SMALL,
            "<b>key & co</b>",
            &[]
        ),
        Some(1.0)
    );
    assert!(sim.requests().iter().all(|r| r.authorized));

    let landing = client.get(exporter.url("/")).send().await.expect("landing");
    assert_eq!(landing.status(), 200);
    let html = landing.text().await.expect("html");
    assert!(html.contains("Cloudflare Access Exporter"));
    assert!(html.contains(env!("CARGO_PKG_VERSION")));
    assert!(html.contains("href=\"/metrics\""));
    assert!(html.contains("&lt;b&gt;key &amp; co&lt;/b&gt;"), "{html}");
    assert!(html.contains(ACCOUNT) && html.contains(SMALL));
    assert!(!html.contains("global-key-123"));

    let metrics = client
        .get(exporter.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(
        metrics.headers()["content-type"].to_str().expect("ascii"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let missing = client.get(exporter.url("/nope")).send().await.expect("404");
    assert_eq!(missing.status(), 404);
    // Only the exact telemetry path serves the exposition, as in Go's exporters.
    for path in ["/metrics/", "/metrics/x"] {
        let near = client.get(exporter.url(path)).send().await.expect("404");
        assert_eq!(near.status(), 404, "{path}");
    }
    let get_reload = client
        .get(exporter.url("/-/reload"))
        .send()
        .await
        .expect("405");
    assert_eq!(get_reload.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_cycle_but_healthy_does_not() {
    let sim = simulator().await;
    sim.add_test(sim_test(SMALL, 3));
    sim.set_latency(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(SMALL, None)]);
    let exporter = Exporter::against(&sim, &config, &[]).await;
    let client = common::http();

    let ready = client
        .get(exporter.url("/-/ready"))
        .send()
        .await
        .expect("ready");
    let healthy = client
        .get(exporter.url("/-/healthy"))
        .send()
        .await
        .expect("healthy");
    assert_eq!(ready.status(), 503);
    assert_eq!(healthy.status(), 200);

    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_poll_success",
            SMALL,
            SMALL,
            &[]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_its_three_tests() {
    let exporter = Exporter::start(&["--demo"], &[]).await;
    exporter.wait_ready().await;
    let s = Samples::parse(&exporter.scrape().await);

    for name in ["contractors", "employees", "legacy-idp"] {
        let series = s.matching("cloudflare_access_policy_test_users", &[("name", name)]);
        assert_eq!(series.len(), 4, "{name}: {series:?}");
        let success = s.matching(
            "cloudflare_access_policy_test_poll_success",
            &[("name", name)],
        );
        assert_eq!(success.len(), 1);
        assert_eq!(success[0].1, 1.0, "{name}");
    }
    let contractors: f64 = s
        .matching(
            "cloudflare_access_policy_test_users",
            &[("name", "contractors")],
        )
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(contractors > 5_000.0, "{contractors}");
    let unknown = s.matching(
        "cloudflare_access_policy_test_users",
        &[("name", "legacy-idp"), ("status", "unknown")],
    );
    assert_eq!(unknown[0].1, 10.0);
    let pages = s.matching(
        "cloudflare_access_policy_test_walk_pages",
        &[("name", "contractors")],
    );
    assert!(pages[0].1 >= 3.0, "{pages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_is_gzip_compressed_when_prometheus_asks() {
    let sim = simulator().await;
    sim.add_test(sim_test(SMALL, 3));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(SMALL, None)]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let client = common::http();

    let plain = exporter.scrape().await;
    let zipped = client
        .get(exporter.url("/metrics"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("scrape");
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    assert_eq!(zipped.headers()["vary"], "Accept-Encoding");
    let body = zipped.bytes().await.expect("body");
    assert!(
        body.len() * 3 < plain.len(),
        "{} vs {}",
        body.len(),
        plain.len()
    );
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
        .expect("gunzip");
    assert_eq!(text, plain);
}
