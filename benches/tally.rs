//! Decode-and-tally throughput of user pages.
//!
//! A user page is decoded straight into a [`PageTally`] (four counters), with
//! no per-user allocation. The target is at least 1,000,000 users per second
//! per core through decode and tally; the throughput criterion reports is
//! users per second, on one thread. A `serde_json::Value` decode of the same
//! page is measured alongside, as the allocating baseline.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cloudflare_access_exporter::cloudflare::{Envelope, PageTally};
use cloudflare_access_exporter::simulator::{users_body, SimTest};

/// Users on a full page (Cloudflare's `per_page` maximum).
const PAGE_USERS: u64 = 1000;

/// Page 1 of a test of `users` users, as the simulator serves it: the users
/// endpoint's real shape with a 70/25/5 approved/blocked/error mix.
fn page(users: u64) -> Vec<u8> {
    let test = SimTest::new("023e105f4ecef8ad9ca31a8372d0c353", "bench", users);
    users_body(&test, 1, users).into_bytes()
}

fn decode_and_tally(c: &mut Criterion) {
    let body = page(PAGE_USERS);

    // The bench is only meaningful if the page decodes to what was built.
    let check: Envelope<PageTally> = serde_json::from_slice(&body).expect("page decodes");
    let tally = check.result.expect("result present");
    assert_eq!(tally.users, PAGE_USERS);
    assert_eq!(tally.tally.total(), PAGE_USERS);
    assert_eq!(tally.tally.unknown, 0);
    eprintln!(
        "page: {} users, {} bytes ({} bytes/user); approved {} blocked {} error {}",
        PAGE_USERS,
        body.len(),
        body.len() as u64 / PAGE_USERS,
        tally.tally.approved,
        tally.tally.blocked,
        tally.tally.error,
    );

    let mut group = c.benchmark_group("decode_tally");
    group.throughput(Throughput::Elements(PAGE_USERS));
    group.bench_function("page_1000_users", |b| {
        b.iter(|| {
            let env: Envelope<PageTally> =
                serde_json::from_slice(black_box(&body)).expect("page decodes");
            black_box(env.result)
        })
    });
    group.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            let value: serde_json::Value =
                serde_json::from_slice(black_box(&body)).expect("page decodes");
            black_box(value)
        })
    });
    group.finish();
}

criterion_group!(benches, decode_and_tally);
criterion_main!(benches);
