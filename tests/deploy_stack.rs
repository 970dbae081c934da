//! The deploy files against the real stack: Debian's Prometheus scrapes a
//! `--demo` exporter with `deploy/prometheus/alerts.yml` loaded, every
//! dashboard and alert-rule expression runs on what it scraped, and an alert
//! travels through Debian's Alertmanager to a webhook.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use common::stack::{ensure, prometheus, Daemon};
use common::{Exporter, ACCOUNT};

const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const TALLY_MISMATCH: &str = "CloudflareAccessPolicyTestTallyMismatch";
const LEGACY_IDP_ID: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";

/// The exporter's flags in these tests. Polling every 2 s sends about 14
/// requests per cycle (3 statuses and 11 user pages), which would use up the
/// default budget of 600 requests per 5 minutes within a minute and a half;
/// the deferrals that followed would make CloudflareAccessPolicyTestPollsDeferred
/// pending. The budget is raised so that the demo stays healthy. (The demo's
/// simulator itself allows 1200 requests per 5 minutes, about 170 s of this
/// polling: more than any test here runs.)
const EXPORTER_ARGS: [&str; 5] = [
    "--demo",
    "--poll.interval",
    "2s",
    "--cloudflare.request-budget",
    "100000",
];

/// Runs one of the expression scripts of tests/deploy and returns its lines.
fn expressions(script: &str) -> Vec<String> {
    let output = Command::new("python3")
        .arg(format!(
            "{}/tests/deploy/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<String> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!lines.is_empty(), "{script} printed nothing");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rule_expressions_run_against_real_prometheus() {
    let dashboard = expressions("dashboard_exprs.py");
    let rules = expressions("rule_exprs.py");
    let exporter = Exporter::start(&EXPORTER_ARGS, &[]).await;
    exporter.wait_ready().await;
    let prometheus = prometheus(exporter.port, Some(ALERTS), None).await;

    // Rate and increase windows need two samples of a counter that has
    // moved: wait for a few scrapes and two finished poll cycles in them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrapes = prometheus
            .query("count_over_time(cloudflare_access_exporter_poll_cycles_total[5m])")
            .await;
        let cycles = prometheus
            .query("increase(cloudflare_access_exporter_poll_cycles_total[5m])")
            .await;
        let value = |v: &[Value]| -> f64 {
            v.first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0)
        };
        if value(&scrapes) >= 3.0 && value(&cycles) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never collected enough samples\n{}\n{}",
            prometheus.logs(),
            exporter.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every dashboard expression succeeds and returns data; an empty result
    // is retried (series can appear a scrape late), an error is not.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<&String> = dashboard.iter().collect();
    loop {
        let mut still_empty = Vec::new();
        for expr in empty {
            if prometheus.query(expr).await.is_empty() {
                still_empty.push(expr);
            }
        }
        empty = still_empty;
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard expressions without data after 60 s:\n  {}\n{}",
            empty
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            exporter.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Every rule expression succeeds. On the healthy demo only the tally
    // mismatch of legacy-idp holds; the exporter is up, so the down rule
    // returns nothing.
    let mut non_empty = Vec::new();
    for expr in &rules {
        let result = prometheus.query(expr).await;
        if !result.is_empty() {
            non_empty.push((expr.clone(), result));
        }
    }
    assert_eq!(non_empty.len(), 1, "rules with results: {non_empty:#?}");
    let (expr, result) = &non_empty[0];
    assert!(
        expr.starts_with("cloudflare_access_policy_test_tally_mismatch == 1"),
        "{expr}"
    );
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(result[0]["metric"]["name"], "legacy-idp");
    assert_eq!(result[0]["metric"]["policy_test_id"], LEGACY_IDP_ID);
    assert_eq!(result[0]["metric"]["account_id"], ACCOUNT);

    // Prometheus loaded the rule file: every rule, evaluated without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let loaded = loop {
        let answer = prometheus.get("/api/v1/rules", &[]).await;
        let loaded: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if loaded.len() == rules.len() && loaded.iter().all(|r| r["health"] == "ok") {
            break loaded;
        }
        assert!(
            Instant::now() < deadline,
            "rules not loaded or unhealthy: {answer}\n{}",
            prometheus.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let names: BTreeSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names.len(), rules.len(), "{names:?}");
    assert!(names.contains(TALLY_MISMATCH), "{names:?}");

    // With the real `for:` of 15 minutes, the mismatch is pending, and it is
    // the only active alert.
    let alerts = prometheus.get("/api/v1/alerts", &[]).await;
    let active = alerts["data"]["alerts"].as_array().expect("alerts");
    assert_eq!(active.len(), 1, "{alerts}");
    assert_eq!(active[0]["labels"]["alertname"], TALLY_MISMATCH);
    assert_eq!(active[0]["labels"]["name"], "legacy-idp");
    assert_eq!(active[0]["state"], "pending");
}

/// A webhook receiver: records the body of every POST, answers 200.
struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Webhook {
    async fn start() -> Webhook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let port = listener.local_addr().expect("addr").port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let recorded = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let recorded = recorded.clone();
                    async move {
                        let post = req.method() == hyper::Method::POST;
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if post {
                            recorded
                                .lock()
                                .expect("lock")
                                .push(String::from_utf8_lossy(&body).into_owned());
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"ok\n",
                        ))))
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Webhook { port, bodies, task }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().expect("lock").clone()
    }
}

/// alerts.yml with the `for:` of one alert replaced by `duration`.
fn with_for(rules: &str, alert: &str, duration: &str) -> String {
    let start = rules
        .find(&format!("- alert: {alert}\n"))
        .unwrap_or_else(|| panic!("no alert {alert} in alerts.yml"));
    let end = rules[start + 1..]
        .find("- alert: ")
        .map_or(rules.len(), |i| start + 1 + i);
    let rule = &rules[start..end];
    let for_lines: Vec<&str> = rule
        .lines()
        .filter(|l| l.trim_start().starts_with("for: "))
        .collect();
    assert_eq!(for_lines.len(), 1, "one `for:` in {rule}");
    let indent = &for_lines[0][..for_lines[0].len() - for_lines[0].trim_start().len()];
    let shortened = rule.replacen(for_lines[0], &format!("{indent}for: {duration}"), 1);
    format!("{}{shortened}{}", &rules[..start], &rules[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_routes_through_real_alertmanager_to_a_webhook() {
    ensure("prometheus-alertmanager", "alertmanager");
    let webhook = Webhook::start().await;

    let alertmanager_config = format!(
        "route:\n  receiver: webhook\n  group_by: [alertname, account_id, policy_test_id]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: webhook\n    webhook_configs:\n      - url: 'http://127.0.0.1:{}/alerts'\n        send_resolved: false\n",
        webhook.port
    );
    let alertmanager = Daemon::start(
        "alertmanager",
        "prometheus-alertmanager",
        &[("alertmanager.yml", alertmanager_config)],
        |dir, port| {
            vec![
                format!("--config.file={}", dir.join("alertmanager.yml").display()),
                format!("--storage.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                // No clustering: no gossip port, no waiting for peers.
                "--cluster.listen-address=".to_owned(),
            ]
        },
    )
    .await;

    // The real rules, but CloudflareAccessPolicyTestTallyMismatch has
    // `for: 15m` in alerts.yml; this test-only copy shortens it to 2s so that
    // the alert fires within the test. Everything else is unchanged.
    let original = std::fs::read_to_string(ALERTS).expect("alerts.yml");
    let rules = with_for(&original, TALLY_MISMATCH, "2s");
    assert_ne!(rules, original);
    assert!(rules.contains("    for: 2s\n"));
    assert_eq!(
        rules.matches("for: ").count(),
        original.matches("for: ").count()
    );
    let rules_dir = tempfile::tempdir().expect("dir");
    let rules_path = rules_dir.path().join("alerts.yml");
    std::fs::write(&rules_path, rules).expect("write rules");

    let exporter = Exporter::start(&EXPORTER_ARGS, &[]).await;
    exporter.wait_ready().await;
    let prometheus = prometheus(
        exporter.port,
        Some(rules_path.to_str().expect("utf-8 path")),
        Some(alertmanager.port),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let (payload, alert) = 'found: loop {
        for body in webhook.bodies() {
            let payload: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {body}"));
            let alerts = payload["alerts"].as_array().cloned().unwrap_or_default();
            if let Some(alert) = alerts
                .into_iter()
                .find(|a| a["labels"]["alertname"] == TALLY_MISMATCH)
            {
                break 'found (payload, alert);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {TALLY_MISMATCH} at the webhook after 90 s; received {:?}\nPrometheus alerts: {}\n{}\n{}",
            webhook.bodies(),
            prometheus.get("/api/v1/alerts", &[]).await,
            prometheus.logs(),
            alertmanager.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    assert_eq!(payload["status"], "firing", "{payload}");
    assert_eq!(payload["receiver"], "webhook", "{payload}");
    assert_eq!(payload["version"], "4", "{payload}");
    assert_eq!(alert["status"], "firing", "{alert}");
    let labels = &alert["labels"];
    assert_eq!(labels["name"], "legacy-idp", "{alert}");
    assert_eq!(labels["policy_test_id"], LEGACY_IDP_ID, "{alert}");
    assert_eq!(labels["account_id"], ACCOUNT, "{alert}");
    assert_eq!(labels["job"], "cloudflare-access-exporter", "{alert}");
    let severity = labels["severity"].as_str().unwrap_or_default();
    assert!(!severity.is_empty(), "no severity: {alert}");
    assert!(
        original.contains(&format!("severity: {severity}\n")),
        "severity {severity} is not one alerts.yml sets"
    );
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{alert}"
    );
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("legacy-idp") && d.contains(LEGACY_IDP_ID)),
        "templated description: {alert}"
    );

    // Only legacy-idp mismatches: no other test ever reached the webhook
    // under this alert.
    for body in webhook.bodies() {
        let payload: Value = serde_json::from_str(&body).expect("JSON");
        for alert in payload["alerts"].as_array().into_iter().flatten() {
            if alert["labels"]["alertname"] == TALLY_MISMATCH {
                assert_eq!(alert["labels"]["name"], "legacy-idp", "{alert}");
            }
        }
    }
}
