//! Conformance with Cloudflare's own OpenAPI spec: the exporter runs against
//! the Prism mock server serving the policy-tests fragment of the spec that
//! Cloudflare's SDKs test with. Prism rejects any request that breaks the
//! spec (400 with an `sl-violations` header, logged as a violation); none of
//! the exporter's requests may be rejected. Prism never returns an empty
//! page, so every walk must also end on its own bound.
//!
//! Prism's static mode answers the status endpoint with the first value of
//! the `status` enum ("blocked"), under which nothing is walked. The test
//! serves a copy of the spec with "complete" moved first, so that walks
//! happen; nothing else in the spec is changed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Exporter, Samples};

const ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";
const TEST_ID: &str = "f1a8b3c9d4e5f6789a0b1c2d3e4f5678a9b0c1d2e3f4a5b67890c1d2e3f4b5a6";

struct Prism {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves "complete" to the front of every status enum of the spec.
fn complete_first(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => map.values_mut().for_each(complete_first),
        serde_json::Value::Array(items) => {
            let is_status_enum =
                items.iter().any(|v| v == "complete") && items.iter().any(|v| v == "processing");
            if is_status_enum {
                items.sort_by_key(|v| v != "complete");
            } else {
                items.iter_mut().for_each(complete_first);
            }
        }
        _ => {}
    }
}

fn start_prism() -> Prism {
    let root = env!("CARGO_MANIFEST_DIR");
    let prism = format!("{root}/.tools/prism/node_modules/.bin/prism");
    if !std::path::Path::new(&prism).exists() {
        let status = Command::new("bash")
            .arg(format!("{root}/scripts/ensure-tools.sh"))
            .arg("prism")
            .status()
            .expect("run ensure-tools.sh");
        assert!(status.success(), "could not install Prism");
    }

    let dir = tempfile::tempdir().expect("dir");
    let text = std::fs::read_to_string(format!(
        "{root}/tests/data/policy-tests.stainless-embedded.openapi.json"
    ))
    .expect("spec");
    let mut spec: serde_json::Value = serde_json::from_str(&text).expect("spec json");
    complete_first(&mut spec);
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");

    let port = common::free_port();
    let mut child = Command::new(&prism)
        .args(["mock", "-h", "127.0.0.1", "-p", &port.to_string()])
        .arg(&spec_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start prism");
    let log = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    let prism = Prism {
        child,
        port,
        log,
        _dir: dir,
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while !prism
        .lines()
        .iter()
        .any(|l| l.contains("Prism is listening"))
    {
        assert!(
            !prism.lines().iter().any(|l| l.contains("fatal")),
            "Prism failed: {:?}",
            prism.lines()
        );
        assert!(
            Instant::now() < deadline,
            "Prism never started: {:?}",
            prism.lines()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    prism
}

impl Prism {
    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.yml");
    std::fs::write(
        &path,
        format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {TEST_ID}\n    name: prism\n"),
    )
    .expect("config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_conform_to_cloudflares_spec_and_walks_end_against_prism() {
    let prism = start_prism();
    let dir = tempfile::tempdir().expect("dir");
    let config = config(dir.path());
    let url = format!("http://127.0.0.1:{}", prism.port);

    for (scheme, env) in [
        (
            "token",
            vec![("CLOUDFLARE_API_TOKEN", "test-token-0123456789")],
        ),
        (
            "key",
            vec![
                ("CLOUDFLARE_API_EMAIL", "user@example.com"),
                ("CLOUDFLARE_API_KEY", "144c9defac04969c7bfad8efaa8ea194"),
            ],
        ),
    ] {
        let exporter = Exporter::start(
            &[
                "--config.file",
                config.to_str().expect("path"),
                "--cloudflare.api-url",
                &url,
                "--poll.interval",
                "1h",
                "--cloudflare.retry-backoff",
                "10ms",
            ],
            &env,
        )
        .await;
        exporter.wait_ready().await;
        let s = Samples::parse(&exporter.scrape().await);
        let count = |endpoint: &str, outcome: &str| {
            s.get(
                "cloudflare_access_api_requests_total",
                &[("endpoint", endpoint), ("outcome", outcome)],
            )
            .unwrap_or(0.0)
        };

        // Prism's status: complete, 20 users, counts 5/5/5; every page holds
        // one user, forever. The walk stops past 20 users plus one page.
        assert_eq!(count("status", "success"), 1.0, "{scheme}");
        assert_eq!(count("users", "success"), 22.0, "{scheme}");
        let rejected: f64 = s
            .matching("cloudflare_access_api_requests_total", &[])
            .iter()
            .filter(|(k, _)| !k.contains("outcome=\"success\""))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(rejected, 0.0, "{scheme}: requests Prism rejected");
        assert_eq!(
            s.test(
                "cloudflare_access_policy_test_poll_failures_total",
                TEST_ID,
                "prism",
                &[("reason", "too_many_pages")]
            ),
            Some(1.0)
        );
        assert_eq!(
            s.test(
                "cloudflare_access_policy_test_state",
                TEST_ID,
                "prism",
                &[("state", "complete")]
            ),
            Some(1.0)
        );
        assert!(
            s.matching("cloudflare_access_policy_test_users", &[])
                .is_empty(),
            "{scheme}: nothing published"
        );
    }

    let lines = prism.lines();
    let violations: Vec<&String> = lines
        .iter()
        .filter(|l| l.to_lowercase().contains("violation"))
        .collect();
    assert!(
        violations.is_empty(),
        "Prism reported violations: {violations:?}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("Request received"))
            .count()
            >= 46,
        "{lines:?}"
    );
}
