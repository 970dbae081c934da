//! A real Prometheus scrapes the exporter: the numbers arrive intact, and
//! `promtool check metrics` finds nothing wrong with the exposition.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudflare_access_exporter::simulator::{Fault, Target};
use common::stack::{ensure, prometheus};
use common::{sim_test, simulator, write_config, Exporter, ACCOUNT};

const TEST_ID: &str = "7e57-0001";

fn ensure_prometheus() {
    ensure("promtool", "prometheus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_right_user_counts() {
    ensure_prometheus();
    let sim = simulator().await;
    let mut test = sim_test(TEST_ID, 2_500);
    test.missing_status_every = Some(100);
    sim.add_test(test.clone());
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(TEST_ID, Some("contractors"))]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let prometheus = prometheus(exporter.port, None, None).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let series = prometheus
            .query("cloudflare_access_policy_test_users")
            .await;
        if series.len() == 4 {
            break series;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never got the series: {series:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let [approved, blocked, error, missing] = test.counts();
    for series in &result {
        let metric = &series["metric"];
        assert_eq!(metric["account_id"], ACCOUNT);
        assert_eq!(metric["policy_test_id"], TEST_ID);
        assert_eq!(metric["name"], "contractors");
        assert_eq!(metric["job"], "cloudflare-access-exporter");
        let value: f64 = series["value"][1]
            .as_str()
            .expect("value")
            .parse()
            .expect("number");
        let expected = match metric["status"].as_str().expect("status") {
            "approved" => approved,
            "blocked" => blocked,
            "error" => error,
            "unknown" => missing,
            other => panic!("unexpected status {other}"),
        };
        assert_eq!(value, expected as f64, "{metric}");
    }
    let total = prometheus
        .query("sum(cloudflare_access_policy_test_users)")
        .await;
    assert_eq!(total[0]["value"][1], "2500");
    let up = prometheus
        .query("up{job=\"cloudflare-access-exporter\"}")
        .await;
    assert_eq!(up[0]["value"][1], "1");
}

/// Runs `promtool check metrics` on `exposition` and returns what it printed.
fn promtool_check(exposition: &str) -> (bool, String) {
    ensure_prometheus();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("promtool output");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_wrong_with_a_real_scrape() {
    // A failed test (error code 7003) and a throttle (retried after 1 s)
    // included, so that the error and throttle families have samples.
    let sim = simulator().await;
    sim.add_test(sim_test(TEST_ID, 1_200));
    sim.inject(Target::Status, Some(TEST_ID), 1, Fault::throttle(Some("1")));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(TEST_ID, None), ("gone-missing", None)]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let exposition = exporter.scrape().await;

    assert!(
        exposition.contains("cloudflare_access_api_errors_total{code=\"7003\"} 1"),
        "{exposition}"
    );
    assert!(
        exposition.contains("cloudflare_access_api_throttled_total 1\n"),
        "{exposition}"
    );
    let (ok, printed) = promtool_check(&exposition);
    assert!(ok, "promtool failed: {printed}");
    assert_eq!(printed, "", "promtool printed: {printed}");

    // And the lint does catch a bad exposition, so the check above can fail.
    let (_, printed) =
        promtool_check("# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n");
    assert!(printed.contains("_total"), "{printed}");
}
