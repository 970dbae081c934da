//! The monitoring stack for tests: Prometheus and Alertmanager as real
//! processes, installed from Debian's packages when missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, http};

/// Installs Debian's `tool` package with scripts/ensure-tools.sh when
/// `binary` is not on the PATH.
pub fn ensure(binary: &str, tool: &str) {
    let present = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
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
            .arg(tool)
            .status()
            .expect("run ensure-tools.sh");
        assert!(status.success(), "could not install {tool}");
    }
}

/// A process of the stack (Prometheus, Alertmanager) with its own temporary
/// directory and log; killed on drop.
pub struct Daemon {
    name: &'static str,
    pub child: Child,
    pub port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `binary` with `args(dir, port)` and waits for `/-/ready`.
    pub async fn start(
        name: &'static str,
        binary: &str,
        files: &[(&str, String)],
        args: impl Fn(&Path, u16) -> Vec<String>,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("dir");
        for (file, text) in files {
            std::fs::write(dir.path().join(file), text).expect("write file");
        }
        let port = free_port();
        let log = dir.path().join(format!("{name}.log"));
        let child = Command::new(binary)
            .args(args(dir.path(), port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let mut daemon = Daemon {
            name,
            child,
            port,
            log,
            _dir: dir,
        };

        let client = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(daemon.url("/-/ready"))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if ready {
                return daemon;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("{name} exited with {status}:\n{}", daemon.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became ready:\n{}",
                daemon.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("--- {} log ---\n{log}", self.name)
    }

    /// `GET path` of the HTTP API, as JSON.
    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = http()
            .get(self.url(path))
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {path}: {e}", self.name));
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{} {path}: not JSON: {e}", self.name))
    }

    /// An instant query; panics unless Prometheus answers "success".
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let answer = self.get("/api/v1/query", &[("query", expr)]).await;
        assert_eq!(
            answer["status"], "success",
            "query failed: {expr}\nanswer: {answer}"
        );
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("no result array for {expr}: {answer}"))
            .clone()
    }
}

/// Starts Prometheus scraping the exporter on `target_port` every second and
/// evaluating `rules` every second, sending alerts to `alertmanager_port`.
pub async fn prometheus(
    target_port: u16,
    rules: Option<&str>,
    alertmanager_port: Option<u16>,
) -> Daemon {
    ensure("prometheus", "prometheus");
    let alerting = match alertmanager_port {
        Some(port) => format!(
            "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{port}']\n"
        ),
        None => String::new(),
    };
    let rule_files = match rules {
        Some(rules) => format!("rule_files:\n  - '{rules}'\n"),
        None => String::new(),
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         {rule_files}\
         {alerting}\
         scrape_configs:\n  - job_name: cloudflare-access-exporter\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    );
    Daemon::start(
        "prometheus",
        "prometheus",
        &[("prometheus.yml", config)],
        |dir, port| {
            vec![
                format!("--config.file={}", dir.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        },
    )
    .await
}
