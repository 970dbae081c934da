//! The exporter's metrics and the cached exposition.
//!
//! Every series the exporter serves is registered here. Values are set when
//! a poll finishes, and the exposition is rendered then, once, and kept as
//! bytes: a scrape only copies a reference to them. Which tests exist is
//! owned here too, so that a test removed from the config loses all of its
//! series at once and a poll that finishes after the removal cannot bring
//! them back.

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::cloudflare::{Endpoint, FailureReason, Outcome, PolicyTestStatus, TestState};
use crate::config::PolicyTest;
use crate::tally::UserStatus;
use crate::walk::Walk;

/// The `Content-Type` of the exposition: the classic text format. Falls
/// short: OpenMetrics is not offered (the `prometheus` crate has no encoder
/// for it), so a scraper asking for it gets this format, correctly labelled.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Cloudflare error codes given their own `code` label value; every other
/// code is counted as `other`, so the label stays bounded.
const KNOWN_ERROR_CODES: [i64; 11] = [
    971, 1000, 6003, 6103, 6111, 7000, 7003, 9106, 9109, 10000, 10429,
];

const TEST_LABELS: [&str; 3] = ["account_id", "policy_test_id", "name"];

/// Counters and gauges about requests, shared with the Cloudflare client.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    throttled: IntCounter,
    /// Label-less, so that it is absent until a `Ratelimit` header has been
    /// seen rather than a 0 that reads as "window spent".
    ratelimit_remaining: IntGaugeVec,
    budget_remaining: IntGauge,
}

impl ApiMetrics {
    /// Counts one request attempt by endpoint and outcome.
    pub fn request(&self, endpoint: Endpoint, outcome: Outcome) {
        self.requests
            .with_label_values(&[endpoint.as_str(), outcome.as_str()])
            .inc();
    }

    /// Counts one Cloudflare error code.
    pub fn error_code(&self, code: i64) {
        let label = if KNOWN_ERROR_CODES.contains(&code) {
            code.to_string()
        } else {
            "other".to_owned()
        };
        self.errors.with_label_values(&[&label]).inc();
    }

    /// Counts one 429.
    pub fn throttled(&self) {
        self.throttled.inc();
    }

    /// Records `r=` of the last `Ratelimit` header.
    pub fn ratelimit_remaining(&self, remaining: u64) {
        self.ratelimit_remaining
            .with_label_values(&[] as &[&str])
            .set(clamp(remaining));
    }

    /// Records what is left of the client-side budget.
    pub fn budget_remaining(&self, remaining: u64) {
        self.budget_remaining.set(clamp(remaining));
    }

    /// What the budget gauge holds now.
    pub fn budget_remaining_value(&self) -> u64 {
        u64::try_from(self.budget_remaining.get()).unwrap_or(0)
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Every metric of the exporter, and the rendered exposition.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,

    users: IntGaugeVec,
    reported_users: IntGaugeVec,
    processed_ratio: GaugeVec,
    state: IntGaugeVec,
    tally_mismatch: IntGaugeVec,
    poll_success: IntGaugeVec,
    last_success: GaugeVec,
    walk_duration: GaugeVec,
    walk_pages: IntGaugeVec,
    poll_failures: IntCounterVec,
    deferrals: IntCounterVec,

    /// Request-level metrics, handed to the client.
    pub api: ApiMetrics,

    reload_successful: IntGauge,
    reload_timestamp: Gauge,
    cycle_duration: Gauge,
    cycles: IntCounter,

    /// The tests whose series may exist.
    tests: Mutex<HashSet<PolicyTest>>,

    exposition: RwLock<Exposition>,
}

/// A rendered exposition, plain and gzip-compressed (Prometheus asks for
/// gzip on every scrape; compressing once per render instead of once per
/// scrape keeps scrapes cheap).
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// The text format.
    pub text: Bytes,
    /// The same bytes, gzip-compressed.
    pub gzip: Bytes,
}

/// Why the metrics could not be registered (a programming error, but one
/// reported rather than panicked on).
#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Registers every metric. `budget` is the configured requests per window.
    pub fn new(budget: u64) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let cached = " Cached: set when a poll finishes, not at scrape time.";
        let rendered =
            " Cached: as of the last render, at most a second old while a poll cycle runs.";

        let users = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_users",
                format!("Users in the last complete, consistent walk of the policy test's user pages, by result.{cached}"),
            ),
            &["account_id", "policy_test_id", "name", "status"],
        )?;
        let reported_users = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_reported_users",
                format!(
                    "Users by result as the policy test's status endpoint reports them.{cached}"
                ),
            ),
            &["account_id", "policy_test_id", "name", "status"],
        )?;
        let processed_ratio = GaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_processed_ratio",
                format!("Share of the user base the policy test has evaluated (0-1).{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let state = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_state",
                format!("1 for the policy test's state as the status endpoint reports it, 0 for the others.{cached}"),
            ),
            &["account_id", "policy_test_id", "name", "state"],
        )?;
        let tally_mismatch = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_tally_mismatch",
                format!("1 when the last walk's per-status tally disagreed with the counts Cloudflare reports.{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let poll_success = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_poll_success",
                format!("1 if the last poll of the policy test succeeded, 0 if it failed.{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let last_success = GaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_last_success_timestamp_seconds",
                format!("Unix time of the policy test's last successful poll.{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let walk_duration = GaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_walk_duration_seconds",
                format!(
                    "Duration of the policy test's last successful walk of its user pages.{cached}"
                ),
            ),
            &TEST_LABELS,
        )?;
        let walk_pages = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_policy_test_walk_pages",
                format!("User pages fetched by the policy test's last successful walk, the final empty page included.{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let poll_failures = IntCounterVec::new(
            Opts::new(
                "cloudflare_access_policy_test_poll_failures_total",
                format!("Failed polls of the policy test, by reason.{cached}"),
            ),
            &["account_id", "policy_test_id", "name", "reason"],
        )?;
        let deferrals = IntCounterVec::new(
            Opts::new(
                "cloudflare_access_policy_test_deferrals_total",
                format!("Walks of the policy test deferred to the next cycle because the request budget could not fit them.{cached}"),
            ),
            &TEST_LABELS,
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "cloudflare_access_api_requests_total",
                format!("Requests sent to the Cloudflare API, by endpoint and outcome.{rendered}"),
            ),
            &["endpoint", "outcome"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cloudflare_access_api_errors_total",
                format!("Cloudflare error codes received in response envelopes; codes outside a known set are counted as \"other\".{rendered}"),
            ),
            &["code"],
        )?;
        let throttled = IntCounter::new(
            "cloudflare_access_api_throttled_total",
            format!(
                "HTTP 429 answers (and rate-limit error codes) received from Cloudflare.{rendered}"
            ),
        )?;
        let ratelimit_remaining = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_api_ratelimit_remaining_requests",
                format!("Requests left in Cloudflare's rate-limit window, from the last Ratelimit header seen; absent until one is seen.{rendered}"),
            ),
            &[],
        )?;
        let budget_remaining = IntGauge::new(
            "cloudflare_access_api_budget_remaining_requests",
            format!("Requests left in the exporter's own request budget.{rendered}"),
        )?;
        let budget_requests = IntGauge::new(
            "cloudflare_access_api_budget_requests",
            "The exporter's request budget per 5-minute window.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "cloudflare_access_exporter_build_info",
                "A metric with a constant '1' value labeled by version, revision and rustc version.",
            ),
            &["version", "revision", "rustc"],
        )?;
        let reload_successful = IntGauge::new(
            "cloudflare_access_exporter_config_last_reload_successful",
            "1 if the last configuration load succeeded.",
        )?;
        let reload_timestamp = Gauge::new(
            "cloudflare_access_exporter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
        )?;
        let cycle_duration = Gauge::new(
            "cloudflare_access_exporter_poll_cycle_duration_seconds",
            format!("Duration of the last poll cycle over every configured policy test.{cached}"),
        )?;
        let cycles = IntCounter::new(
            "cloudflare_access_exporter_poll_cycles_total",
            format!("Poll cycles finished.{cached}"),
        )?;

        for collector in [
            Box::new(users.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reported_users.clone()),
            Box::new(processed_ratio.clone()),
            Box::new(state.clone()),
            Box::new(tally_mismatch.clone()),
            Box::new(poll_success.clone()),
            Box::new(last_success.clone()),
            Box::new(walk_duration.clone()),
            Box::new(walk_pages.clone()),
            Box::new(poll_failures.clone()),
            Box::new(deferrals.clone()),
            Box::new(requests.clone()),
            Box::new(errors.clone()),
            Box::new(throttled.clone()),
            Box::new(ratelimit_remaining.clone()),
            Box::new(budget_remaining.clone()),
            Box::new(budget_requests.clone()),
            Box::new(build_info.clone()),
            Box::new(reload_successful.clone()),
            Box::new(reload_timestamp.clone()),
            Box::new(cycle_duration.clone()),
            Box::new(cycles.clone()),
        ] {
            registry.register(collector)?;
        }

        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                env!("CLOUDFLARE_ACCESS_EXPORTER_REVISION"),
                env!("CLOUDFLARE_ACCESS_EXPORTER_RUSTC"),
            ])
            .set(1);
        budget_requests.set(clamp(budget));
        budget_remaining.set(clamp(budget));
        for endpoint in [Endpoint::Status, Endpoint::Users] {
            for outcome in Outcome::ALL {
                requests.with_label_values(&[endpoint.as_str(), outcome.as_str()]);
            }
        }
        for code in KNOWN_ERROR_CODES {
            errors.with_label_values(&[&code.to_string()]);
        }
        errors.with_label_values(&["other"]);

        let metrics = Metrics {
            registry,
            users,
            reported_users,
            processed_ratio,
            state,
            tally_mismatch,
            poll_success,
            last_success,
            walk_duration,
            walk_pages,
            poll_failures,
            deferrals,
            api: ApiMetrics {
                requests,
                errors,
                throttled,
                ratelimit_remaining,
                budget_remaining,
            },
            reload_successful,
            reload_timestamp,
            cycle_duration,
            cycles,
            tests: Mutex::new(HashSet::new()),
            exposition: RwLock::new(Exposition::default()),
        };
        metrics.render();
        Ok(metrics)
    }

    /// Makes `tests` the set of tests with series: new ones get their
    /// counters at zero, removed ones lose every series.
    pub fn set_tests(&self, tests: &[PolicyTest]) {
        let mut known = self.lock_tests();
        let wanted: HashSet<PolicyTest> = tests.iter().cloned().collect();

        for gone in known.difference(&wanted) {
            self.remove_series(gone);
        }
        for new in wanted.difference(&known) {
            let l = labels(new);
            for reason in FailureReason::ALL {
                self.poll_failures
                    .with_label_values(&[l[0], l[1], l[2], reason.as_str()]);
            }
            self.deferrals.with_label_values(&l);
        }
        *known = wanted;
    }

    /// Records the status endpoint's answer for `test`.
    pub fn publish_status(&self, test: &PolicyTest, status: &PolicyTestStatus) {
        let known = self.lock_tests();
        if !known.contains(test) {
            return;
        }
        let l = labels(test);

        let current = status.state();
        for state in TestState::ALL {
            self.state
                .with_label_values(&[l[0], l[1], l[2], state.as_str()])
                .set(i64::from(state == current));
        }
        let reported = [
            (UserStatus::Approved, status.users_approved),
            (UserStatus::Blocked, status.users_blocked),
            (UserStatus::Error, status.users_errored),
        ];
        // A count Cloudflare did not report is absent, not zero.
        for (user_status, count) in reported {
            let labels = [l[0], l[1], l[2], user_status.as_str()];
            match count {
                Some(count) => self
                    .reported_users
                    .with_label_values(&labels)
                    .set(clamp(count)),
                None => {
                    let _ = self.reported_users.remove_label_values(&labels);
                }
            }
        }
        match status.percent_users_processed {
            Some(percent) => self
                .processed_ratio
                .with_label_values(&l)
                .set(percent.min(100) as f64 / 100.0),
            None => {
                let _ = self.processed_ratio.remove_label_values(&l);
            }
        }
    }

    /// Records a successful poll of `test`: with `walk`, its tally is now
    /// the published one; without, the test was not complete and only its
    /// status was read.
    pub fn publish_success(&self, test: &PolicyTest, walk: Option<&Walk>) {
        let known = self.lock_tests();
        if !known.contains(test) {
            return;
        }
        let l = labels(test);

        if let Some(walk) = walk {
            for status in UserStatus::ALL {
                self.users
                    .with_label_values(&[l[0], l[1], l[2], status.as_str()])
                    .set(clamp(walk.tally.get(status)));
            }
            self.tally_mismatch
                .with_label_values(&l)
                .set(i64::from(walk.mismatch));
            self.walk_duration
                .with_label_values(&l)
                .set(walk.duration.as_secs_f64());
            self.walk_pages.with_label_values(&l).set(clamp(walk.pages));
        }
        self.poll_success.with_label_values(&l).set(1);
        self.last_success.with_label_values(&l).set(unix_now());
    }

    /// Records a failed poll of `test`; its published tally is left as it was.
    pub fn publish_failure(&self, test: &PolicyTest, reason: FailureReason) {
        let known = self.lock_tests();
        if !known.contains(test) {
            return;
        }
        let l = labels(test);

        self.poll_success.with_label_values(&l).set(0);
        self.poll_failures
            .with_label_values(&[l[0], l[1], l[2], reason.as_str()])
            .inc();
    }

    /// Records that `test`'s walk was deferred for lack of budget.
    pub fn publish_deferral(&self, test: &PolicyTest) {
        let known = self.lock_tests();
        if known.contains(test) {
            self.deferrals.with_label_values(&labels(test)).inc();
        }
    }

    /// Records the end of a poll cycle.
    pub fn cycle_finished(&self, duration: std::time::Duration) {
        self.cycle_duration.set(duration.as_secs_f64());
        self.cycles.inc();
    }

    /// Records the outcome of a configuration (re)load.
    pub fn config_loaded(&self, ok: bool) {
        self.reload_successful.set(i64::from(ok));
        if ok {
            self.reload_timestamp.set(unix_now());
        }
    }

    /// Renders the exposition, compresses it, and keeps both for scrapes.
    pub fn render(&self) {
        let previous = self.cached();
        let mut buffer = Vec::with_capacity(previous.text.len() + 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buffer) {
            // The text encoder fails only on invalid metric names, which are
            // fixed above; keep the previous exposition rather than serve
            // half of one.
            tracing::error!(cause = %e, "cannot render the exposition");
            return;
        }
        let gzip = match gzip(&buffer) {
            Ok(gzip) => gzip,
            Err(e) => {
                tracing::error!(cause = %e, "cannot compress the exposition");
                return;
            }
        };

        let mut cached = self.exposition.write().unwrap_or_else(|p| p.into_inner());
        *cached = Exposition {
            text: Bytes::from(buffer),
            gzip: Bytes::from(gzip),
        };
    }

    /// The last rendered exposition, as text.
    pub fn exposition(&self) -> Bytes {
        self.cached().text
    }

    /// The last rendered exposition, both encodings.
    pub fn cached(&self) -> Exposition {
        self.exposition
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn remove_series(&self, test: &PolicyTest) {
        let l = labels(test);

        for status in UserStatus::ALL {
            let _ = self
                .users
                .remove_label_values(&[l[0], l[1], l[2], status.as_str()]);
            let _ = self
                .reported_users
                .remove_label_values(&[l[0], l[1], l[2], status.as_str()]);
        }
        for state in TestState::ALL {
            let _ = self
                .state
                .remove_label_values(&[l[0], l[1], l[2], state.as_str()]);
        }
        for reason in FailureReason::ALL {
            let _ = self
                .poll_failures
                .remove_label_values(&[l[0], l[1], l[2], reason.as_str()]);
        }
        let _ = self.processed_ratio.remove_label_values(&l);
        let _ = self.tally_mismatch.remove_label_values(&l);
        let _ = self.poll_success.remove_label_values(&l);
        let _ = self.last_success.remove_label_values(&l);
        let _ = self.walk_duration.remove_label_values(&l);
        let _ = self.walk_pages.remove_label_values(&l);
        let _ = self.deferrals.remove_label_values(&l);
    }

    fn lock_tests(&self) -> std::sync::MutexGuard<'_, HashSet<PolicyTest>> {
        self.tests.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn gzip(text: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;

    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    encoder.write_all(text)?;
    encoder.finish()
}

fn labels(test: &PolicyTest) -> [&str; 3] {
    [test.account_id.as_str(), test.id.as_str(), test.name()]
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountId, PolicyTestId};
    use crate::tally::Tally;

    fn test(id: &str) -> PolicyTest {
        PolicyTest::new(
            AccountId::try_from("023e105f4ecef8ad9ca31a8372d0c353".to_owned()).expect("account"),
            PolicyTestId::try_from(id.to_owned()).expect("id"),
            None,
        )
    }

    fn rendered(metrics: &Metrics) -> String {
        metrics.render();
        String::from_utf8(metrics.exposition().to_vec()).expect("utf-8")
    }

    #[test]
    fn counts_cloudflare_did_not_report_are_absent_not_zero() {
        let metrics = Metrics::new(600).expect("metrics");
        let a = test("a");
        metrics.set_tests(std::slice::from_ref(&a));
        let mut status = PolicyTestStatus {
            status: Some(TestState::Complete),
            users_approved: Some(7),
            users_blocked: Some(2),
            users_errored: Some(1),
            percent_users_processed: Some(100),
            ..Default::default()
        };
        metrics.publish_status(&a, &status);
        let before = rendered(&metrics);
        status.users_blocked = None;
        status.percent_users_processed = None;
        metrics.publish_status(&a, &status);
        let after = rendered(&metrics);

        assert!(
            before.contains(r#"name="a",policy_test_id="a",status="blocked"} 2"#),
            "{before}"
        );
        assert!(before.contains("cloudflare_access_policy_test_processed_ratio{"));
        assert!(!after.contains(r#"status="blocked"} 2"#), "{after}");
        assert!(after.contains(r#"name="a",policy_test_id="a",status="approved"} 7"#));
        assert!(!after.contains("cloudflare_access_policy_test_processed_ratio{"));
    }

    #[test]
    fn removed_tests_lose_every_series_and_late_polls_are_ignored() {
        let metrics = Metrics::new(600).expect("metrics");
        let (a, b) = (test("a"), test("b"));
        metrics.set_tests(&[a.clone(), b.clone()]);
        let walk = Walk {
            tally: Tally {
                approved: 3,
                blocked: 1,
                error: 0,
                unknown: 0,
            },
            pages: 2,
            duration: std::time::Duration::from_millis(5),
            mismatch: false,
        };
        metrics.publish_success(&a, Some(&walk));
        metrics.publish_success(&b, Some(&walk));
        metrics.set_tests(std::slice::from_ref(&a));
        metrics.publish_success(&b, Some(&walk));
        metrics.publish_failure(&b, FailureReason::Transport);
        let text = rendered(&metrics);

        assert!(
            text.contains(r#"policy_test_id="a",status="approved"} 3"#),
            "{text}"
        );
        assert!(!text.contains(r#"policy_test_id="b""#), "{text}");
    }

    #[test]
    fn a_failure_keeps_the_published_tally() {
        let metrics = Metrics::new(600).expect("metrics");
        let a = test("a");
        metrics.set_tests(std::slice::from_ref(&a));
        let walk = Walk {
            tally: Tally {
                approved: 5,
                ..Default::default()
            },
            pages: 1,
            duration: std::time::Duration::ZERO,
            mismatch: true,
        };
        metrics.publish_success(&a, Some(&walk));
        metrics.publish_failure(&a, FailureReason::InconsistentWalk);
        let text = rendered(&metrics);

        assert!(
            text.contains(r#"policy_test_id="a",status="approved"} 5"#),
            "{text}"
        );
        assert!(text.contains(r#"cloudflare_access_policy_test_poll_success{account_id="023e105f4ecef8ad9ca31a8372d0c353",name="a",policy_test_id="a"} 0"#), "{text}");
        assert!(
            text.contains(r#"policy_test_id="a",reason="inconsistent_walk"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"cloudflare_access_policy_test_tally_mismatch{account_id="023e105f4ecef8ad9ca31a8372d0c353",name="a",policy_test_id="a"} 1"#));
    }
}
