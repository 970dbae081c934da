//! Shared harness for the integration tests: start the real binary against a
//! simulator, scrape it over HTTP, read samples out of the exposition.

#![allow(dead_code)]

pub mod stack;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudflare_access_exporter::simulator::{SimOptions, SimTest, Simulator, DEMO_TOKEN};

pub const ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";

/// A free loopback port (racy in theory, fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An HTTP client for talking to the exporter.
pub fn http() -> reqwest::Client {
    cloudflare_access_exporter::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Writes a config file listing `(id, name)` tests of [`ACCOUNT`].
pub fn write_config(dir: &Path, tests: &[(&str, Option<&str>)]) -> PathBuf {
    let mut text = String::from("policy_tests:\n");
    for (id, name) in tests {
        text.push_str(&format!("  - account_id: {ACCOUNT}\n    id: {id}\n"));
        if let Some(name) = name {
            text.push_str(&format!("    name: {name}\n"));
        }
    }
    let path = dir.join("config.yml");
    let mut file = std::fs::File::create(&path).expect("config file");
    file.write_all(text.as_bytes()).expect("write config");
    path
}

/// A running exporter process; killed on drop.
pub struct Exporter {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exporter {
    /// Starts the binary with `args` (plus a listen address) and `env`, and
    /// waits until `/-/healthy` answers.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Exporter {
        let port = free_port();
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("exporter.log");
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudflare-access-exporter"));
        cmd.args(["--web.listen-address", &listen])
            .args(args)
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("CLOUDFLARE_API_KEY")
            .env_remove("CLOUDFLARE_API_EMAIL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn exporter");
        let exporter = Exporter {
            child,
            port,
            log,
            _dir: dir,
        };

        let client = http();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(exporter.url("/-/healthy")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "exporter did not start: {}",
                exporter.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exporter
    }

    /// Starts the binary against `sim` with the demo token and `config`.
    pub async fn against(sim: &Simulator, config: &Path, extra: &[&str]) -> Exporter {
        let mut args = vec![
            "--config.file",
            config.to_str().expect("utf-8 path"),
            "--cloudflare.api-url",
        ];
        let url = sim.url();
        args.push(&url);
        args.extend_from_slice(extra);
        Exporter::start(&args, &[("CLOUDFLARE_API_TOKEN", DEMO_TOKEN)]).await
    }

    /// Sends `signal` (like "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "could not send SIG{signal}");
    }

    /// Waits for the process to end, panicking after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "still running after {limit:?}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn scrape(&self) -> String {
        let response = http()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape");
        assert_eq!(response.status(), 200);
        response.text().await.expect("body")
    }

    /// Waits until `/-/ready` answers 200.
    pub async fn wait_ready(&self) {
        let client = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(self.url("/-/ready"))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scrapes until `check` holds for the parsed samples, or panics.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Samples) -> bool,
    ) -> Samples {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = Samples::parse(&self.scrape().await);
            if check(&samples) {
                return samples;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Samples of an exposition: `name{sorted labels}` → value.
#[derive(Debug, Default)]
pub struct Samples(pub BTreeMap<String, f64>);

impl Samples {
    pub fn parse(text: &str) -> Samples {
        let mut map = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().expect("sample value");
            let key = match series.split_once('{') {
                None => series.to_owned(),
                Some((name, labels)) => {
                    let labels = labels.trim_end_matches('}');
                    let mut pairs: Vec<&str> = split_labels(labels);
                    pairs.sort();
                    format!("{name}{{{}}}", pairs.join(","))
                }
            };
            assert!(
                map.insert(key.clone(), value).is_none(),
                "duplicate series {key}"
            );
        }
        Samples(map)
    }

    /// The value of `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        pairs.sort();
        let key = if pairs.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{}}}", pairs.join(","))
        };
        self.0.get(&key).copied()
    }

    /// Every series of `name` whose labels include `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| k == &name || k.starts_with(&format!("{name}{{")))
            .filter(|(k, _)| {
                labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The per-test value of `name` for `test` (by id), other labels given.
    pub fn test(
        &self,
        name: &str,
        id: &str,
        test_name: &str,
        extra: &[(&str, &str)],
    ) -> Option<f64> {
        let mut labels = vec![
            ("account_id", ACCOUNT),
            ("policy_test_id", id),
            ("name", test_name),
        ];
        labels.extend_from_slice(extra);
        self.get(name, &labels)
    }
}

fn split_labels(labels: &str) -> Vec<&str> {
    // Label values here never hold `",` so a split on it is safe.
    let mut out = Vec::new();
    let mut rest = labels;
    while let Some(i) = rest.find("\",") {
        out.push(&rest[..=i]);
        rest = &rest[i + 2..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// A simulator with the demo token.
pub async fn simulator() -> Simulator {
    Simulator::start(SimOptions::default())
        .await
        .expect("simulator")
}

/// A simulated complete test with a fixed mix.
pub fn sim_test(id: &str, users: u64) -> SimTest {
    SimTest::new(ACCOUNT, id, users)
}
