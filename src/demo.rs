//! The embedded demo: a few simulated policy tests served in-process.
//!
//! `--demo` starts [`crate::simulator`] on a loopback port with these tests
//! and points the real client at it, so that the exporter can be tried, and
//! its dashboards filled, without a Cloudflare account. The counts drift a
//! little on every poll so that graphs move.

use crate::config::{AccountId, PolicyTest, PolicyTestId};
use crate::simulator::{SimOptions, SimTest, Simulator, DEMO_TOKEN};

/// The account all demo tests belong to.
pub const DEMO_ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";

/// One demo test: name, id, users, approved ‰, blocked ‰, missing-status every n-th.
type DemoTest = (&'static str, &'static str, u64, u64, u64, Option<u64>);

/// The demo tests.
const DEMO_TESTS: [DemoTest; 3] = [
    (
        "contractors",
        "f1a8b3c9d4e5f6789a0b1c2d3e4f5678a9b0c1d2e3f4a5b67890c1d2e3f4b5a6",
        5_234,
        700,
        250,
        None,
    ),
    (
        "employees",
        "0b7d2c4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b8c",
        812,
        900,
        80,
        None,
    ),
    (
        "legacy-idp",
        "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d",
        230,
        500,
        300,
        Some(23),
    ),
];

/// Starts the demo simulator and returns it with the tests to poll.
pub async fn start() -> std::io::Result<(Simulator, Vec<PolicyTest>)> {
    let simulator = Simulator::start(SimOptions::default()).await?;
    let mut tests = Vec::new();

    for (seed, (name, id, users, approved, blocked, missing)) in DEMO_TESTS.iter().enumerate() {
        let mut sim = SimTest::new(DEMO_ACCOUNT, id, *users);
        sim.approved_per_mille = *approved;
        sim.blocked_per_mille = *blocked;
        sim.missing_status_every = *missing;
        sim.seed = seed as u64 + 11;
        sim.drift = true;
        simulator.add_test(sim);

        let account =
            AccountId::try_from(DEMO_ACCOUNT.to_owned()).map_err(std::io::Error::other)?;
        let id = PolicyTestId::try_from((*id).to_owned()).map_err(std::io::Error::other)?;
        tests.push(PolicyTest::new(account, id, Some((*name).to_owned())));
    }
    Ok((simulator, tests))
}

/// The token the demo client sends to its own simulator.
pub fn token() -> &'static str {
    DEMO_TOKEN
}
