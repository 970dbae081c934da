//! Decode-and-tally throughput of user pages.
//!
//! A user page is decoded straight into a [`PageTally`] (four counters), with
//! no per-user allocation. The target is at least 1,000,000 users per second
//! per core through decode and tally; the throughput criterion reports is
//! users per second, on one thread. A `serde_json::Value` decode of the same
//! page is measured alongside, as the allocating baseline.

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cloudflare_access_exporter::cloudflare::{Envelope, PageTally};

/// Users on a full page (Cloudflare's `per_page` maximum).
const PAGE_USERS: u64 = 1000;

/// A SplitMix64 step, for stable pseudo-random ids and statuses.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A page of `users` users in the shape the users endpoint sends:
/// `{"success":true,"errors":[],"messages":[],"result":[{"id":"<uuid>",
/// "email":"...","name":"...","status":"approved"},...]}`, with a 70/25/5
/// approved/blocked/error mix.
fn page(users: u64) -> Vec<u8> {
    let mut body = String::with_capacity(users as usize * 140 + 64);
    body.push_str(r#"{"success":true,"errors":[],"messages":[],"result":["#);
    for i in 0..users {
        if i > 0 {
            body.push(',');
        }
        let h = mix(i);
        let status = match mix(h) % 1000 {
            0..700 => "approved",
            700..950 => "blocked",
            _ => "error",
        };
        let _ = write!(
            body,
            r#"{{"id":"{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}","email":"user{i}@example.com","name":"User Number {i}","status":"{status}"}}"#,
            (h >> 32) as u32,
            (h >> 16) as u16,
            (h >> 4) as u16 & 0xfff,
            (h >> 40) as u16 & 0xfff,
            h & 0xffff_ffff_ffff,
        );
    }
    body.push_str("]}");
    body.into_bytes()
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
