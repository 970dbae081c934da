//! The exporter's web side, through the real binary: TLS and basic auth from
//! `--web.config.file`, bad web configs, log formats, the exposition's
//! content type, several listen addresses and `--config.check`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, http, run_to_end, write_config, Exporter};

/// The exact `Content-Type` of the classic text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes a self-signed certificate for localhost and 127.0.0.1 and its key
/// into `dir` with the `openssl` CLI; returns (cert, key).
///
/// The certificate is marked `CA:FALSE`: OpenSSL's default for `req -x509`
/// is `CA:TRUE`, and webpki (behind rustls, so behind reqwest) refuses a CA
/// certificate as the server's own.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_basic_auth_from_web_config() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, _key) = self_signed_cert(dir.path());
    let hash = bcrypt::hash("s3cret pass", 4).expect("bcrypt");
    let web_config = dir.path().join("web.yml");
    // The key by a relative path: relative paths are taken from the file's
    // directory.
    std::fs::write(
        &web_config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: key.pem\nbasic_auth_users:\n  prometheus: '{hash}'\n",
            cert.display()
        ),
    )
    .expect("write web config");
    let mut exporter = Exporter::spawn(
        &[
            "--demo",
            "--web.config.file",
            web_config.to_str().expect("utf-8 path"),
        ],
        &[],
    );

    cloudflare_access_exporter::install_crypto_provider();
    let pem = std::fs::read(&cert).expect("cert");
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("certificate")])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("https client");
    let base = format!("https://localhost:{}", exporter.port);
    let base_ip = format!("https://127.0.0.1:{}", exporter.port);

    exporter
        .wait_ok("answered /-/ready over HTTPS", || {
            https
                .get(format!("{base}/-/ready"))
                .basic_auth("prometheus", Some("s3cret pass"))
        })
        .await;

    // The right credentials, by name and by IP address (both in the SAN).
    for url in [format!("{base}/metrics"), format!("{base_ip}/metrics")] {
        let response = https
            .get(&url)
            .basic_auth("prometheus", Some("s3cret pass"))
            .send()
            .await
            .expect("HTTPS scrape");
        assert_eq!(response.status(), 200, "{url}");
        let body = response.text().await.expect("body");
        assert!(
            body.contains("cloudflare_access_policy_test_users{")
                && body.contains("name=\"legacy-idp\""),
            "{body}"
        );
    }

    // A wrong password, an unknown user, no credentials: 401 with a challenge.
    let wrong = https
        .get(format!("{base}/metrics"))
        .basic_auth("prometheus", Some("wrong"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    let challenge = wrong
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .expect("WWW-Authenticate")
        .to_str()
        .expect("ascii");
    assert!(challenge.starts_with("Basic"), "{challenge}");
    assert!(!wrong.text().await.expect("body").contains("cloudflare_"));

    let stranger = https
        .get(format!("{base}/metrics"))
        .basic_auth("intruder", Some("s3cret pass"))
        .send()
        .await
        .expect("request");
    assert_eq!(stranger.status(), 401);

    let anonymous = https
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous
        .headers()
        .contains_key(reqwest::header::WWW_AUTHENTICATE));

    // Health is behind basic auth as well.
    let health = https
        .get(format!("{base}/-/healthy"))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status(), 401);

    // Plain HTTP to the TLS listener gets no HTTP answer at all.
    let plain = http()
        .get(format!("http://127.0.0.1:{}/metrics", exporter.port))
        .basic_auth("prometheus", Some("s3cret pass"))
        .send()
        .await;
    match plain {
        Err(_) => {}
        Ok(response) => assert_ne!(response.status(), 200, "plain HTTP was served"),
    }

    // A client that does not trust the certificate is refused by its own
    // verifier: the server really presents the generated certificate.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only(Vec::new())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let refused = untrusting
        .get(format!("{base}/metrics"))
        .basic_auth("prometheus", Some("s3cret pass"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // The listener says it is on TLS.
    let log = exporter.logs();
    assert!(
        log.contains("message=listening") && log.contains("tls=true"),
        "{log}"
    );
}

#[test]
fn bad_web_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = self_signed_cert(dir.path());

    // An unknown key in tls_server_config (the TLS files themselves are fine).
    let unknown = dir.path().join("unknown.yml");
    std::fs::write(
        &unknown,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  cipher_soup: strong\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("write");
    // An unknown top-level key.
    let unknown_top = dir.path().join("unknown-top.yml");
    std::fs::write(&unknown_top, "http_server_config:\n  http2: true\n").expect("write");
    // A certificate file that does not exist.
    let missing = dir.path().join("missing.yml");
    std::fs::write(
        &missing,
        format!(
            "tls_server_config:\n  cert_file: does-not-exist.crt\n  key_file: {}\n",
            key.display()
        ),
    )
    .expect("write");

    for (file, expected) in [
        (&unknown, vec!["cipher_soup"]),
        (&unknown_top, vec!["http_server_config"]),
        (&missing, vec!["cert_file", "does-not-exist.crt"]),
    ] {
        let port = free_port().to_string();
        let output = run_to_end(
            &[
                "--demo",
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--web.config.file",
                file.to_str().expect("utf-8 path"),
            ],
            &[],
        );
        let stderr = &output.stderr;
        assert_eq!(output.code, Some(2), "{}: {stderr}", file.display());
        let error_line = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        for needle in expected {
            assert!(error_line.contains(needle), "{needle} not in {error_line}");
        }
        assert!(
            error_line.contains(&file.display().to_string()),
            "{error_line}"
        );
        assert!(output.stdout.is_empty());
    }
}

/// Parses one logfmt line into its key/value pairs, or says where it breaks.
fn logfmt(line: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' || c == '"' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return Err(format!("expected key= after {pairs:?}"));
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().ok_or("dangling escape")?),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated value of {key}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                if c == '"' || c == '=' {
                    return Err(format!("bare {c:?} in the value of {key}"));
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key, value));
        match chars.next() {
            None => return Ok(pairs),
            Some(' ') => {}
            Some(c) => return Err(format!("unexpected {c:?} after {pairs:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_formats_logfmt_and_json() {
    for format in ["json", "logfmt"] {
        let mut exporter = Exporter::spawn(&["--demo", "--log.format", format], &[]);
        let client = http();
        let url = format!("http://127.0.0.1:{}/-/ready", exporter.port);
        exporter.wait_ok("became ready", || client.get(&url)).await;
        // The cycle-finished line is written just after readiness flips.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exporter.logs().contains("poll cycle finished") {
            assert!(Instant::now() < deadline, "{}", exporter.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exporter.signal("TERM");
        let status = exporter.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "{format}: exit {status}");

        let log = exporter.logs();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 4, "{format}: {log}");
        let mut messages = Vec::new();
        for line in &lines {
            match format {
                "json" => {
                    let value: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    let level = value["level"].as_str().unwrap_or_else(|| panic!("{line}"));
                    assert!(
                        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
                        "{line}"
                    );
                    assert!(value["timestamp"].is_string(), "{line}");
                    let message = value["fields"]["message"]
                        .as_str()
                        .or(value["message"].as_str())
                        .unwrap_or_else(|| panic!("no message: {line}"));
                    messages.push(message.to_owned());
                }
                _ => {
                    let pairs = logfmt(line).unwrap_or_else(|e| panic!("not logfmt ({e}): {line}"));
                    assert_eq!(pairs[0].0, "ts", "{line}");
                    assert!(
                        pairs[0].1.len() >= 20 && pairs[0].1.ends_with('Z'),
                        "{line}"
                    );
                    assert_eq!(pairs[1].0, "level", "{line}");
                    assert!(
                        ["trace", "debug", "info", "warn", "error"].contains(&pairs[1].1.as_str()),
                        "{line}"
                    );
                    let message = pairs
                        .iter()
                        .find(|(k, _)| k == "message")
                        .unwrap_or_else(|| panic!("no message: {line}"));
                    messages.push(message.1.clone());
                }
            }
        }
        for expected in ["listening", "exporter started", "poll cycle finished"] {
            assert!(
                messages.iter().any(|m| m == expected),
                "{format}: no {expected:?} in {messages:?}"
            );
        }
        if format == "logfmt" {
            assert!(log.contains("message=\"poll cycle finished\""), "{log}");
        }
        assert_eq!(exporter.stdout(), "", "{format}: stdout is not empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_content_type_and_openmetrics_accept() {
    let exporter = Exporter::start(&["--demo"], &[]).await;
    exporter.wait_ready().await;
    let response = http()
        .get(exporter.url("/metrics"))
        .header(
            reqwest::header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .expect("Content-Type")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(content_type, TEXT_FORMAT);
    let body = response.text().await.expect("body");
    // Classic text format: no OpenMetrics `# EOF` trailer, counters typed
    // under their `_total` name.
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE cloudflare_access_exporter_poll_cycles_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("cloudflare_access_policy_test_users{"),
        "{body}"
    );

    // No Accept header at all: the same.
    let plain = http()
        .get(exporter.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(
        plain
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(TEXT_FORMAT.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_listen_addresses() {
    let second = free_port();
    let second_address = format!("127.0.0.1:{second}");
    let exporter = Exporter::start(&["--demo", "--web.listen-address", &second_address], &[]).await;
    assert_ne!(exporter.port, second);
    exporter.wait_ready().await;

    for port in [exporter.port, second] {
        let response = http()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("port {port}: {e}"));
        assert_eq!(response.status(), 200, "port {port}");
        let body = response.text().await.expect("body");
        let samples = common::Samples::parse(&body);
        assert_eq!(
            samples
                .matching("cloudflare_access_exporter_build_info", &[])
                .len(),
            1,
            "port {port}"
        );
        assert_eq!(
            samples
                .matching(
                    "cloudflare_access_policy_test_tally_mismatch",
                    &[("name", "legacy-idp")]
                )
                .first()
                .map(|(_, v)| *v),
            Some(1.0),
            "port {port}"
        );
    }
    let log = exporter.logs();
    for port in [exporter.port, second] {
        assert!(
            log.contains(&format!("address=127.0.0.1:{port}")),
            "no listening line for {port}: {log}"
        );
    }
}

#[test]
fn config_check_flag() {
    let dir = tempfile::tempdir().expect("dir");
    let valid = write_config(
        dir.path(),
        &[("7e57-0001", Some("contractors")), ("7e57-0002", None)],
    );
    // The "API" is a listener that must never see a connection.
    let api = TcpListener::bind("127.0.0.1:0").expect("bind");
    api.set_nonblocking(true).expect("nonblocking");
    let api_url = format!("http://{}/client/v4", api.local_addr().expect("addr"));
    // The listen address is taken: a check that tried to listen would fail.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let check = [
        "--config.check",
        "--config.file",
        valid.to_str().expect("utf-8 path"),
        "--cloudflare.api-url",
        &api_url,
        "--web.listen-address",
        &listen,
    ];
    let token = [("CLOUDFLARE_API_TOKEN", "a-token-that-is-never-sent")];

    let started = Instant::now();
    let ok = run_to_end(&check, &token);
    let (stdout, stderr) = (&ok.stdout, &ok.stderr);
    assert_eq!(ok.code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains('2'), "the test count is printed: {stdout}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A config with a malformed account id.
    let invalid = dir.path().join("invalid.yml");
    std::fs::write(
        &invalid,
        "policy_tests:\n  - account_id: not-an-account\n    id: 7e57-0001\n",
    )
    .expect("write");
    let bad = run_to_end(
        &[
            "--config.check",
            "--config.file",
            invalid.to_str().expect("utf-8 path"),
            "--cloudflare.api-url",
            &api_url,
        ],
        &token,
    );
    let (stdout, stderr) = (&bad.stdout, &bad.stderr);
    assert_eq!(bad.code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(stderr.contains("account_id"), "{stderr}");
    assert!(!stdout.contains("valid"), "{stdout}");

    // A valid config without credentials is not valid either.
    let no_token = run_to_end(
        &[
            "--config.check",
            "--config.file",
            valid.to_str().expect("utf-8 path"),
            "--cloudflare.api-url",
            &api_url,
        ],
        &[],
    );
    assert_eq!(no_token.code, Some(2));
    assert!(no_token.stderr.contains("error:"), "{}", no_token.stderr);

    match api.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("--config.check contacted the API: {other:?}"),
    }

    // Without --config.check, the same command does try to listen, and
    // fails on the taken address (before it polls): the first check could
    // have failed.
    let serve = run_to_end(&check[1..], &token);
    assert_eq!(serve.code, Some(1), "{}", serve.stderr);
    assert!(
        serve
            .stderr
            .contains(&format!("error: cannot listen on {listen}")),
        "{}",
        serve.stderr
    );
}
