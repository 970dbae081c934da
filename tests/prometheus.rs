//! A real Prometheus scrapes the exporter: the numbers arrive intact, and
//! `promtool check metrics` finds nothing wrong with the exposition.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sim_test, simulator, write_config, Exporter, ACCOUNT};

const TEST_ID: &str = "7e57-0001";

/// Finds Debian's prometheus and promtool, installing them when missing.
fn ensure_prometheus() {
    let present = Command::new("sh")
        .args(["-c", "command -v prometheus && command -v promtool"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !present {
        let status = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/ensure-tools.sh"
            ))
            .arg("prometheus")
            .status()
            .expect("run ensure-tools.sh");
        assert!(status.success(), "could not install prometheus");
    }
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("dir");
        let port = common::free_port();
        let config = dir.path().join("prometheus.yml");
        let mut file = std::fs::File::create(&config).expect("config");
        write!(
            file,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cloudflare-access-exporter\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        .expect("write config");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    async fn query(&self, expr: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let response = common::http()
            .get(url)
            .query(&[("query", expr)])
            .send()
            .await;
        match response {
            Ok(r) => r.json().await.unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }
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
    let prometheus = Prometheus::start(exporter.port);

    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let answer = prometheus
            .query("cloudflare_access_policy_test_users")
            .await;
        let series = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if series.len() == 4 {
            break series;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never got the series: {answer}"
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
    assert_eq!(total["data"]["result"][0]["value"][1], "2500");
    let up = prometheus
        .query("up{job=\"cloudflare-access-exporter\"}")
        .await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1");
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
    // Failures, throttles and error codes included, so that every family
    // has samples.
    let sim = simulator().await;
    sim.add_test(sim_test(TEST_ID, 1_200));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(TEST_ID, None), ("gone-missing", None)]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let exposition = exporter.scrape().await;

    assert!(
        exposition.contains("cloudflare_access_api_errors_total{code=\"7003\"} 1"),
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
