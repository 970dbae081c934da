//! Bad input from the operator, reloads, and secrets: each case drives the
//! real binary.

mod common;

use std::process::Command;
use std::time::Duration;

use cloudflare_access_exporter::simulator::{SimOptions, Simulator};
use common::{sim_test, simulator, write_config, Exporter, Finished, Samples, ACCOUNT};

const A: &str = "aaaa-0001";
const B: &str = "bbbb-0002";

/// Runs the binary to its end with a listen address before `args` (a
/// second one there is then a duplicate).
fn run(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let args = [&["--web.listen-address", "127.0.0.1:1"], args].concat();
    common::run_to_end(&args, env)
}

#[test]
fn bad_input_exits_2_with_one_message_naming_the_fault() {
    let dir = tempfile::tempdir().expect("dir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let good = file(
        "good.yml",
        &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {A}\n"),
    );
    let token = [("CLOUDFLARE_API_TOKEN", "tok-zzz9")];
    let key = |email| {
        vec![
            ("CLOUDFLARE_API_EMAIL", email),
            ("CLOUDFLARE_API_KEY", "key-zzz8"),
        ]
    };
    // Nothing ever writes to this FIFO: a read of it would never end.
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let fifo = fifo.to_str().expect("utf-8").to_owned();
    let a_dir = dir.path().to_str().expect("utf-8").to_owned();
    let mut bomb = format!("policy_tests:\n  - &t {{account_id: {ACCOUNT}, id: {A}}}\n");
    bomb.push_str(&"  - *t\n".repeat(150));

    // (what, flags, environment, what stderr must say)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("malformed YAML", vec!["--config.file".into(), file("m.yml", "policy_tests: [\n  - {account_id: x\n")], token.to_vec(), vec!["m.yml", "line"]),
        ("unknown key", vec!["--config.file".into(), file("u.yml", &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {A}\n    nmae: x\n"))], token.to_vec(), vec!["nmae", "line 4"]),
        ("unknown top-level key", vec!["--config.file".into(), file("t.yml", "policy_test: []\n")], token.to_vec(), vec!["policy_test", "line 1"]),
        ("missing account_id", vec!["--config.file".into(), file("a.yml", &format!("policy_tests:\n  - id: {A}\n"))], token.to_vec(), vec!["account_id", "line 2"]),
        ("account id not 32 hex", vec!["--config.file".into(), file("h.yml", &format!("policy_tests:\n  - account_id: 023e105f\n    id: {A}\n"))], token.to_vec(), vec!["account_id must be 32 hexadecimal", "line 2"]),
        ("duplicate tests", vec!["--config.file".into(), file("d.yml", &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {A}\n  - account_id: {ACCOUNT}\n    id: {A}\n"))], token.to_vec(), vec!["policy_tests[1]: duplicate of policy_tests[0]"]),
        ("missing config file", vec!["--config.file".into(), "/nonexistent/config.yml".into()], token.to_vec(), vec!["/nonexistent/config.yml"]),
        ("no config at all", vec![], token.to_vec(), vec!["--config.file is required"]),
        ("unreadable token file", vec!["--config.file".into(), good.clone(), "--cloudflare.api-token-file".into(), "/nonexistent/token".into()], vec![], vec!["cannot read API token file /nonexistent/token"]),
        ("token and key", vec!["--config.file".into(), good.clone()], vec![("CLOUDFLARE_API_TOKEN", "tok-zzz9"), ("CLOUDFLARE_API_EMAIL", "a@example.com"), ("CLOUDFLARE_API_KEY", "key-zzz8")], vec!["both an API token and an API key"]),
        ("no credentials", vec!["--config.file".into(), good.clone()], vec![], vec!["no Cloudflare credentials"]),
        ("key without email", vec!["--config.file".into(), good.clone()], vec![("CLOUDFLARE_API_KEY", "key-zzz8")], vec!["CLOUDFLARE_API_EMAIL"]),
        ("bad api url", vec!["--config.file".into(), good.clone(), "--cloudflare.api-url".into(), "ftp://x".into()], token.to_vec(), vec!["--cloudflare.api-url"]),
        ("api url with a query", vec!["--config.file".into(), good.clone(), "--cloudflare.api-url".into(), "https://api.cloudflare.com/client/v4?x=1".into()], token.to_vec(), vec!["--cloudflare.api-url", "query"]),
        ("api url with a password", vec!["--config.file".into(), good.clone(), "--cloudflare.api-url".into(), "https://u:pw-zzz7@api.cloudflare.com/client/v4".into()], token.to_vec(), vec!["--cloudflare.api-url", "user name or password"]),
        ("clear-text api url off loopback", vec!["--config.file".into(), good.clone(), "--cloudflare.api-url".into(), "http://api.cloudflare.com/client/v4".into()], token.to_vec(), vec!["--cloudflare.api-url", "unencrypted"]),
        ("poll interval of five months", vec!["--config.file".into(), good.clone(), "--poll.interval".into(), "5M".into()], token.to_vec(), vec!["--poll.interval", "between 1s and 7days"]),
        ("telemetry path with a dot-dot segment", vec!["--config.file".into(), good.clone(), "--web.telemetry-path".into(), "/a/../metrics".into()], token.to_vec(), vec!["--web.telemetry-path", ".."]),
        (
            "telemetry path with a space",
            vec!["--config.file".into(), good.clone(), "--web.telemetry-path".into(), "/a b".into()],
            token.to_vec(),
            vec!["--web.telemetry-path"],
        ),
        (
            "listen address twice",
            vec!["--config.file".into(), good.clone(), "--web.listen-address".into(), "127.0.0.1:1".into()],
            token.to_vec(),
            vec!["127.0.0.1:1 is given twice"],
        ),
        (
            "empty name",
            vec!["--config.file".into(), file("n.yml", &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {A}\n    name: ''\n"))],
            token.to_vec(),
            vec!["name must not be empty", "line 4"],
        ),
        (
            "demo with a config file",
            vec!["--demo".into(), "--config.file".into(), good.clone()],
            vec![],
            vec!["--demo", "--config.file"],
        ),
        (
            "token with whitespace inside",
            vec!["--config.file".into(), good.clone()],
            vec![("CLOUDFLARE_API_TOKEN", "tok zzz9")],
            vec!["CLOUDFLARE_API_TOKEN", "whitespace"],
        ),
        ("bad interval", vec!["--poll.interval".into(), "soon".into()], token.to_vec(), vec!["--poll.interval"]),
        ("tests not a list", vec!["--config.file".into(), file("l.yml", "policy_tests: 5\n")], token.to_vec(), vec!["l.yml: line 1 column 15: policy_tests: expected a list"]),
        ("id a list", vec!["--config.file".into(), file("i.yml", &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: [1, 2]\n"))], token.to_vec(), vec!["i.yml: line 3 column 9: policy_tests[0].id: expected a string"]),
        ("name a mapping", vec!["--config.file".into(), file("nm.yml", &format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: {A}\n    name: {{a: 1}}\n"))], token.to_vec(), vec!["nm.yml: line 4 column 11: policy_tests[0].name: expected a string"]),
        ("alias bomb", vec!["--config.file".into(), file("bomb.yml", &bomb)], token.to_vec(), vec!["bomb.yml: line 153 column 1: the YAML is too large or too complex for this file: too many aliases"]),
        ("config file a FIFO", vec!["--config.file".into(), fifo.clone()], token.to_vec(), vec!["cannot read config file", "/fifo (--config.file): it is a named pipe (FIFO), not a regular file"]),
        ("config file a directory", vec!["--config.file".into(), a_dir.clone()], token.to_vec(), vec!["(--config.file): it is a directory, not a regular file"]),
        ("config file /dev/zero", vec!["--config.file".into(), "/dev/zero".into()], token.to_vec(), vec!["/dev/zero (--config.file): it is a character device"]),
        ("token file a FIFO", vec!["--config.file".into(), good.clone(), "--cloudflare.api-token-file".into(), fifo.clone()], vec![], vec!["cannot read API token file", "/fifo (--cloudflare.api-token-file): it is a named pipe (FIFO)"]),
        ("token file /dev/zero", vec!["--config.file".into(), good.clone(), "--cloudflare.api-token-file".into(), "/dev/zero".into()], vec![], vec!["/dev/zero (--cloudflare.api-token-file): it is a character device"]),
        ("key file a directory", vec!["--config.file".into(), good.clone(), "--cloudflare.api-key-file".into(), a_dir.clone()], vec![("CLOUDFLARE_API_EMAIL", "ops@example.com")], vec!["(--cloudflare.api-key-file): it is a directory"]),
        ("web config file a FIFO", vec!["--config.file".into(), good.clone(), "--web.config.file".into(), fifo.clone()], token.to_vec(), vec!["cannot read web config file", "/fifo (--web.config.file): it is a named pipe (FIFO)"]),
        ("email without an @", vec!["--config.file".into(), good.clone()], key("ops.example.com"), vec!["CLOUDFLARE_API_EMAIL (--cloudflare.api-email) is not an email address"]),
        ("email with two @", vec!["--config.file".into(), good.clone()], key("ops@x@example.com"), vec!["CLOUDFLARE_API_EMAIL", "not an email address"]),
        ("email with a space", vec!["--config.file".into(), good.clone()], key("ops @example.com"), vec!["CLOUDFLARE_API_EMAIL", "not an email address"]),
    ];

    for (what, args, env, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let Finished {
            code,
            stdout,
            stderr,
        } = run(&args, &env);
        assert_eq!(code, Some(2), "{what}: stderr {stderr}");
        assert!(stdout.is_empty(), "{what}: stdout {stdout}");
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "{what}: {needle:?} not in {stderr}"
            );
        }
        assert!(stderr.starts_with("error: "), "{what}: {stderr}");
        assert_eq!(
            stderr.matches("error: ").count(),
            1,
            "{what}: one message, got {stderr}"
        );
        assert!(!stderr.contains("zzz"), "{what}: a secret in {stderr}");
    }
}

#[tokio::test]
async fn demo_names_the_cloudflare_settings_it_does_not_use() {
    let exporter = Exporter::start(
        &[
            "--demo",
            "--cloudflare.api-url",
            "https://example.com/client/v4",
            "--cloudflare.api-token-file",
            "/run/secrets/zzz-token",
        ],
        &[("CLOUDFLARE_API_KEY", "key-zzz8")],
    )
    .await;
    exporter.wait_ready().await;

    let logs = exporter.logs();
    // One warning at start-up (the demo's legacy-idp then warns of its
    // tally mismatch, by design).
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("level=warn") && l.contains("target=cloudflare_access_exporter::app")
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains(
            r#"ignored="--cloudflare.api-url, --cloudflare.api-token-file, CLOUDFLARE_API_KEY""#
        ),
        "{logs}"
    );
    assert!(!logs.contains("zzz"), "a value in {logs}");

    // The demo still serves its own tests.
    let samples = Samples::parse(&exporter.scrape().await);
    let success = samples.matching(
        "cloudflare_access_policy_test_poll_success",
        &[("name", "contractors")],
    );
    assert_eq!(success.len(), 1, "{success:?}");
    assert_eq!(success[0].1, 1.0);
}

#[test]
fn email_beside_a_token_is_ignored_with_one_warning() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let config = config.to_str().expect("path");

    let Finished {
        code,
        stdout,
        stderr,
    } = run(
        &["--config.check", "--config.file", config],
        &[
            ("CLOUDFLARE_API_TOKEN", "tok-zzz9"),
            ("CLOUDFLARE_API_EMAIL", "ops@example.com"),
        ],
    );

    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "configuration is valid: 1 policy test");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("level=warn"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(
            "CLOUDFLARE_API_EMAIL (--cloudflare.api-email) is ignored: an API token is used"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("zzz"), "a secret in {stderr}");

    // Without the email, no warning.
    let Finished { code, stderr, .. } = run(
        &["--config.check", "--config.file", config],
        &[("CLOUDFLARE_API_TOKEN", "tok-zzz9")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("level=warn"), "{stderr}");
}

#[test]
fn config_check_validates_without_polling() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None), (B, Some("b"))]);
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").expect("token");

    let Finished { code, stdout, .. } = run(
        &[
            "--config.check",
            "--config.file",
            config.to_str().expect("path"),
            "--cloudflare.api-token-file",
            token.to_str().expect("path"),
            "--cloudflare.api-url",
            "http://127.0.0.1:1/client/v4",
        ],
        &[],
    );
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), "configuration is valid: 2 policy tests");

    // An empty variable counts as unset, beside the file.
    let Finished { code, stderr, .. } = run(
        &[
            "--config.check",
            "--config.file",
            config.to_str().expect("path"),
            "--cloudflare.api-token-file",
            token.to_str().expect("path"),
        ],
        &[("CLOUDFLARE_API_TOKEN", ""), ("CLOUDFLARE_API_KEY", "")],
    );
    assert_eq!(code, Some(0), "{stderr}");

    std::fs::write(&config, "policy_tests: nope\n").expect("rewrite");
    let Finished {
        code,
        stdout,
        stderr,
    } = run(
        &[
            "--config.check",
            "--config.file",
            config.to_str().expect("path"),
        ],
        &[("CLOUDFLARE_API_TOKEN", "t")],
    );
    assert_eq!(code, Some(2));
    assert!(stdout.is_empty());
    assert!(stderr.starts_with("error: invalid config file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_values_of_tests_that_stay_and_drops_removed_ones() {
    let sim = simulator().await;
    sim.add_test(sim_test(A, 1_200));
    sim.add_test(sim_test(B, 700));
    sim.add_test(sim_test("cccc-0003", 300));
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None), (B, None)]);
    let exporter = Exporter::against(&sim, &config, &["--poll.interval", "1h"]).await;
    exporter.wait_ready().await;
    let before = Samples::parse(&exporter.scrape().await);
    let a_approved = before
        .test(
            "cloudflare_access_policy_test_users",
            A,
            A,
            &[("status", "approved")],
        )
        .expect("A");
    let a_last = before
        .test(
            "cloudflare_access_policy_test_last_success_timestamp_seconds",
            A,
            A,
            &[],
        )
        .expect("A ts");

    // A good config over HTTP: B removed, C added; A keeps its values until
    // its next poll, which must not fail.
    sim.set_latency(Duration::from_millis(1500));
    write_config(dir.path(), &[(A, None), ("cccc-0003", None)]);
    let response = common::http()
        .post(exporter.url("/-/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(response.status(), 200);
    let s = Samples::parse(&exporter.scrape().await);
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_users",
            A,
            A,
            &[("status", "approved")]
        ),
        Some(a_approved)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_last_success_timestamp_seconds",
            A,
            A,
            &[]
        ),
        Some(a_last)
    );
    assert!(s
        .matching(
            "cloudflare_access_policy_test_poll_success",
            &[("policy_test_id", B)]
        )
        .is_empty());
    assert!(s
        .matching(
            "cloudflare_access_policy_test_poll_failures_total",
            &[("policy_test_id", B)]
        )
        .is_empty());
    assert_eq!(
        s.get(
            "cloudflare_access_exporter_config_last_reload_successful",
            &[]
        ),
        Some(1.0)
    );
    sim.set_latency(Duration::ZERO);
    exporter
        .wait_for("C polled after the reload", Duration::from_secs(20), |s| {
            s.test(
                "cloudflare_access_policy_test_poll_success",
                "cccc-0003",
                "cccc-0003",
                &[],
            ) == Some(1.0)
        })
        .await;

    // A bad config over HTTP is refused, the old one keeps running.
    std::fs::write(
        &config,
        "policy_tests:\n  - account_id: nothex\n    id: x\n",
    )
    .expect("write");
    let response = common::http()
        .post(exporter.url("/-/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(response.status(), 500);
    let body = response.text().await.expect("body");
    assert!(body.contains("account_id must be 32 hexadecimal"), "{body}");
    let s = Samples::parse(&exporter.scrape().await);
    assert_eq!(
        s.get(
            "cloudflare_access_exporter_config_last_reload_successful",
            &[]
        ),
        Some(0.0)
    );
    assert_eq!(
        s.test("cloudflare_access_policy_test_poll_success", A, A, &[]),
        Some(1.0)
    );
    assert_eq!(
        s.test(
            "cloudflare_access_policy_test_poll_success",
            "cccc-0003",
            "cccc-0003",
            &[]
        ),
        Some(1.0)
    );

    // SIGHUP with a good config again: B comes back, C goes.
    write_config(dir.path(), &[(A, None), (B, None)]);
    exporter.signal("HUP");
    let s = exporter
        .wait_for("SIGHUP reload", Duration::from_secs(20), |s| {
            s.get(
                "cloudflare_access_exporter_config_last_reload_successful",
                &[],
            ) == Some(1.0)
                && s.test("cloudflare_access_policy_test_poll_success", B, B, &[]) == Some(1.0)
        })
        .await;
    assert!(s
        .matching(
            "cloudflare_access_policy_test_users",
            &[("policy_test_id", "cccc-0003")]
        )
        .is_empty());
}

/// What an exporter shows of itself once ready: its logs, a scrape and the
/// landing page.
async fn shown(exporter: &Exporter) -> [(&'static str, String); 3] {
    exporter.wait_ready().await;
    let scrape = exporter.scrape().await;
    let landing = common::http()
        .get(exporter.url("/"))
        .send()
        .await
        .expect("landing")
        .text()
        .await
        .expect("html");
    [
        ("logs", exporter.logs()),
        ("metrics", scrape),
        ("landing page", landing),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_metrics_pages_or_errors() {
    const TOKEN: &str = "sekrit-token-5f0c2a9e";
    const KEY: &str = "sekrit-key-q7zv";
    const EMAIL: &str = "ops@example.com";
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &[(A, None)]);
    let config = config.to_str().expect("path");

    // The token scheme. The simulator refuses this token (403, code
    // 10000), so the failure paths are logged too; at trace level the HTTP
    // stack logs everything.
    let sim = simulator().await;
    sim.add_test(sim_test(A, 1_200));
    let url = sim.url();
    let exporter = Exporter::start(
        &[
            "--config.file",
            config,
            "--cloudflare.api-url",
            &url,
            "--log.level",
            "trace",
            "--cloudflare.retry-backoff",
            "10ms",
        ],
        &[("CLOUDFLARE_API_TOKEN", TOKEN)],
    )
    .await;
    let shown_with_token = shown(&exporter).await;

    let logs = &shown_with_token[0].1;
    assert!(
        logs.contains("level=trace target=hyper"),
        "trace logging is on"
    );
    assert!(logs.contains("Access: Policy Test Read"));
    for (what, text) in &shown_with_token {
        assert!(!text.contains(TOKEN), "token in {what}");
        assert!(!text.contains("5f0c2a9e"), "token part in {what}");
    }

    // The key scheme, alone: an email and a key file. The simulator takes
    // this key, so the requests carrying it succeed, and the success paths
    // are logged at trace level.
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key");
    let sim = Simulator::start(SimOptions {
        token: None,
        key: Some((EMAIL.to_owned(), KEY.to_owned())),
        ..SimOptions::default()
    })
    .await
    .expect("simulator");
    sim.add_test(sim_test(A, 1_200));
    let url = sim.url();
    let exporter = Exporter::start(
        &[
            "--config.file",
            config,
            "--cloudflare.api-url",
            &url,
            "--cloudflare.api-key-file",
            key_file.to_str().expect("path"),
            "--log.level",
            "trace",
        ],
        &[("CLOUDFLARE_API_EMAIL", EMAIL)],
    )
    .await;
    let shown_with_key = shown(&exporter).await;

    assert!(
        shown_with_key[0].1.contains("level=trace target=hyper"),
        "trace logging is on"
    );
    let scrape = Samples::parse(&shown_with_key[1].1);
    assert_eq!(
        scrape.test("cloudflare_access_policy_test_poll_success", A, A, &[]),
        Some(1.0),
        "the key was sent and taken: {}",
        shown_with_key[0].1
    );
    assert!(sim.requests().iter().all(|r| r.authorized));
    for (what, text) in &shown_with_key {
        assert!(!text.contains(KEY), "key in {what}");
        assert!(!text.contains("q7zv"), "key part in {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_removed_by_a_reload_are_not_polled_by_the_running_cycle() {
    // Twenty tests polled one at a time, 300 ms a request: a cycle takes
    // over 12 s. A reload 1 s in keeps only the first test; the cycle must
    // not go on to poll the others (a poll under way may finish its walk:
    // three requests, under 1.5 s).
    let sim = simulator().await;
    let ids: Vec<String> = (0..20).map(|i| format!("t-{i:02}")).collect();
    for id in &ids {
        sim.add_test(sim_test(id, 10));
    }
    sim.set_latency(Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("dir");
    let all: Vec<(&str, Option<&str>)> = ids.iter().map(|id| (id.as_str(), None)).collect();
    let config = write_config(dir.path(), &all);
    let exporter = Exporter::against(
        &sim,
        &config,
        &["--poll.concurrency", "1", "--poll.interval", "1h"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    write_config(dir.path(), &all[..1]);
    let response = common::http()
        .post(exporter.url("/-/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(response.status(), 200);
    let reloaded = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let late: Vec<String> = sim
        .requests()
        .iter()
        .filter(|r| r.at.into_std() > reloaded + Duration::from_millis(1500))
        .filter(|r| !r.path.contains("/t-00"))
        .map(|r| r.path.clone())
        .collect();
    assert!(late.is_empty(), "removed tests still polled: {late:?}");
    assert!(
        sim.requests()
            .iter()
            .filter(|r| !r.path.contains("/t-00"))
            .count()
            >= 1
    );
}
