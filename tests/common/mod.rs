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

/// The exporter binary without standard input and without the Cloudflare
/// credentials of the caller's environment: a test gives its own.
pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudflare-access-exporter"));
    cmd.env_remove("CLOUDFLARE_API_TOKEN")
        .env_remove("CLOUDFLARE_API_KEY")
        .env_remove("CLOUDFLARE_API_EMAIL")
        .stdin(Stdio::null());
    cmd
}

/// How a run of the binary to its end went.
#[derive(Debug)]
pub struct Finished {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` and `env` to its end, killing it (and
/// failing) if it runs for more than 20 s.
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Finished {
    // Files rather than pipes: a full pipe cannot stall the process.
    let dir = tempfile::tempdir().expect("dir");
    let stdout = dir.path().join("stdout");
    let stderr = dir.path().join("stderr");
    let mut cmd = binary();
    cmd.args(args)
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn exporter");
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("exporter {args:?} did not exit: {}", read(&stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    Finished {
        code: status.code(),
        stdout: read(&stdout),
        stderr: read(&stderr),
    }
}

/// A running exporter process, its standard error in `log` and its
/// standard output in `stdout`; killed on drop.
pub struct Exporter {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub stdout: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exporter {
    /// Starts the binary with `args` (plus a loopback listen address) and
    /// `env`, and waits until `/-/healthy` answers.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Exporter {
        let mut exporter = Exporter::spawn(args, env);
        let client = http();
        let healthy = exporter.url("/-/healthy");
        exporter
            .wait_ok("answered /-/healthy", || client.get(&healthy))
            .await;
        exporter
    }

    /// Starts the binary with `args` (plus a loopback listen address) and
    /// `env`, without waiting for it: for a test that reaches it its own
    /// way (over TLS, with credentials).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Exporter {
        let port = free_port();
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("exporter.log");
        let stdout = dir.path().join("stdout.log");
        let mut cmd = binary();
        cmd.args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn exporter");
        Exporter {
            child,
            port,
            log,
            stdout,
            _dir: dir,
        }
    }

    /// Sends `request` (built anew each time) until it answers 200; panics
    /// if the process exits or 30 s pass first.
    pub async fn wait_ok(&mut self, what: &str, request: impl Fn() -> reqwest::RequestBuilder) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = request().send().await {
                if response.status() == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("exporter exited with {status}: {}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "exporter never {what}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    /// What the process wrote to standard error.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the process wrote to standard output.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
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
