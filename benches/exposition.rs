//! Rendering and serving the cached exposition with 100 configured tests.
//!
//! `render` gathers and text-encodes every series and gzip-compresses the
//! result; `cached` runs once per scrape and must only hand out the cached
//! bytes. Both are measured with 100 tests that each have a status and
//! a published walk, the labels shaped as real ones (32-hex account, 64-hex
//! test id, a short name).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cloudflare_access_exporter::cloudflare::{PolicyTestStatus, TestState};
use cloudflare_access_exporter::config::{AccountId, PolicyTest, PolicyTestId};
use cloudflare_access_exporter::metrics::Metrics;
use cloudflare_access_exporter::tally::Tally;
use cloudflare_access_exporter::walk::Walk;

const TESTS: usize = 100;
const ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";

fn tests() -> Vec<PolicyTest> {
    (0..TESTS)
        .map(|i| {
            let account = AccountId::try_from(ACCOUNT.to_owned()).expect("account id");
            let id = PolicyTestId::try_from(format!("{i:08x}{}", "f1a8b3c9".repeat(7)))
                .expect("test id");
            PolicyTest::new(account, id, Some(format!("policy-{i:03}")))
        })
        .collect()
}

fn populated() -> Metrics {
    let metrics = Metrics::new(600).expect("metrics register");
    let tests = tests();
    metrics.set_tests(&tests);
    metrics.config_loaded(true);
    for (i, test) in tests.iter().enumerate() {
        let users = 1000 + i as u64 * 37;
        let tally = Tally {
            approved: users * 7 / 10,
            blocked: users / 4,
            error: users - users * 7 / 10 - users / 4,
            unknown: 0,
        };
        let status = PolicyTestStatus {
            status: Some(TestState::Complete),
            total_users: Some(users),
            percent_users_processed: Some(100),
            users_approved: Some(tally.approved),
            users_blocked: Some(tally.blocked),
            users_errored: Some(tally.error),
        };
        let walk = Walk {
            tally,
            pages: users.div_ceil(1000) + 1,
            duration: Duration::from_millis(120 + i as u64),
            mismatch: false,
        };
        metrics.publish_status(test, &status);
        metrics.publish_success(test, Some(&walk));
    }
    metrics.cycle_finished(Duration::from_secs(3));
    metrics.render();
    metrics
}

fn exposition(c: &mut Criterion) {
    let metrics = populated();
    let cached = metrics.cached();
    let body = cached.text;
    let text = std::str::from_utf8(&body).expect("utf-8 exposition");
    let samples = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert!(text.contains("cloudflare_access_policy_test_walk_duration_seconds{"));
    eprintln!(
        "exposition with {TESTS} tests: {} bytes ({} gzip-compressed), {samples} samples",
        body.len(),
        cached.gzip.len()
    );

    // `render` is measured in bytes of text exposition produced; `cached`
    // (what a scrape calls) hands out reference-counted copies of the text
    // and gzip bytes, whatever their size.
    let mut group = c.benchmark_group("exposition");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("render_100_tests", |b| b.iter(|| metrics.render()));
    group.finish();

    let mut group = c.benchmark_group("exposition");
    group.throughput(Throughput::Elements(1));
    group.bench_function("cached_100_tests", |b| {
        b.iter(|| black_box(metrics.cached()))
    });
    group.finish();
}

criterion_group!(benches, exposition);
criterion_main!(benches);
