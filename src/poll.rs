//! The poll loop: which tests to poll, when, and what to publish.
//!
//! A cycle polls every configured test, a few at a time. Polling a test
//! reads its status, publishes its state and reported counts, and, when the
//! test is complete and the request budget can fit the walk, walks it and
//! publishes the tally. A failed poll leaves the published tally as it was
//! and sets `poll_success` to 0. Cycles never overlap: the next one starts
//! an interval after the previous one started, or right after it ends if it
//! ran long, or early when the configuration is reloaded.
//!
//! The set of tests comes from a [`tokio::sync::watch`] channel, so where
//! test ids come from (a config file today) stays apart from how a test is
//! walked ([`crate::walk`]).
//!
//! Falls short: a complete test never changes, yet it is walked again every
//! cycle, spending requests on numbers already known. Starting fresh tests
//! on a schedule, which would make each walk count, is not built yet.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cloudflare::{Client, TestState};
use crate::config::PolicyTest;
use crate::metrics::Metrics;
use crate::walk::{self, WalkOptions};

/// How often the exposition is re-rendered while a cycle runs.
const RENDER_EVERY: Duration = Duration::from_secs(1);

/// How often the request budget's gauge is checked between cycles.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How the poller runs.
#[derive(Debug, Clone, Copy)]
pub struct PollOptions {
    /// Time from the start of one cycle to the start of the next.
    pub interval: Duration,
    /// Tests polled at once.
    pub concurrency: usize,
    /// How each test is walked.
    pub walk: WalkOptions,
}

/// The poll loop and what it needs.
#[derive(Debug)]
pub struct Poller {
    client: Client,
    metrics: Arc<Metrics>,
    options: PollOptions,
    tests: watch::Receiver<Arc<Vec<PolicyTest>>>,
    ready: watch::Sender<bool>,
    wake: Arc<Notify>,
}

/// What a poll of one test came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollResult {
    Walked,
    NotComplete,
    Deferred,
    Failed,
    Removed,
}

impl Poller {
    /// A poller over the tests sent on `tests`. `ready` turns true after the
    /// first cycle; `wake` starts a cycle early (after a reload).
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        options: PollOptions,
        tests: watch::Receiver<Arc<Vec<PolicyTest>>>,
        ready: watch::Sender<bool>,
        wake: Arc<Notify>,
    ) -> Poller {
        Poller {
            client,
            metrics,
            options,
            tests,
            ready,
            wake,
        }
    }

    /// Runs cycles until the task is dropped.
    pub async fn run(self) {
        loop {
            let started = Instant::now();
            self.cycle_rendering().await;
            self.ready.send_replace(true);

            self.idle_until(started + self.options.interval).await;
        }
    }

    /// Waits for `next` or a wake-up. The request budget refills meanwhile,
    /// so its gauge is checked every [`IDLE_CHECK_EVERY`] and the exposition
    /// re-rendered when the gauge moved; nothing else changes between cycles.
    async fn idle_until(&self, next: Instant) {
        let mut checks = tokio::time::interval(IDLE_CHECK_EVERY);
        checks.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => return,
                _ = self.wake.notified() => return,
                _ = checks.tick() => {
                    let available = self.client.budget().available();
                    if self.metrics.api.budget_remaining_value() != available {
                        self.render().await;
                    }
                }
            }
        }
    }

    /// Runs a cycle, re-rendering the exposition every [`RENDER_EVERY`]
    /// while it lasts and once at its end. A test's values therefore appear
    /// within a second of its poll finishing, request and rate-limit metrics
    /// stay current during a long or throttled walk, and a cycle of many
    /// small tests costs one render a second, not one per test.
    async fn cycle_rendering(&self) {
        let cycle = self.cycle();
        tokio::pin!(cycle);
        let mut ticks = tokio::time::interval(RENDER_EVERY);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = &mut cycle => return,
                _ = ticks.tick() => self.render().await,
            }
        }
    }

    /// Polls every configured test once.
    pub async fn cycle(&self) {
        let tests = self.tests.borrow().clone();
        let started = Instant::now();

        let results: Vec<PollResult> = stream::iter(tests.iter().cloned())
            .map(|test| async move { self.poll(&test).await })
            .buffer_unordered(self.options.concurrency.max(1))
            .collect()
            .await;

        let count = |r: PollResult| results.iter().filter(|x| **x == r).count();
        let elapsed = started.elapsed();
        self.metrics.cycle_finished(elapsed);
        self.render().await;
        info!(
            tests = tests.len(),
            walked = count(PollResult::Walked),
            not_complete = count(PollResult::NotComplete),
            deferred = count(PollResult::Deferred),
            failed = count(PollResult::Failed),
            elapsed = ?elapsed,
            "poll cycle finished"
        );
    }

    /// Renders the exposition on a blocking thread, so that the runtime's
    /// workers keep answering scrapes meanwhile.
    async fn render(&self) {
        self.metrics
            .api
            .budget_remaining(self.client.budget().available());
        let metrics = self.metrics.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || metrics.render()).await {
            warn!(cause = %e, "rendering the exposition failed");
        }
    }

    async fn poll(&self, test: &PolicyTest) -> PollResult {
        // A reload during the cycle may have removed the test: spend no
        // requests on it.
        if !self.tests.borrow().contains(test) {
            return PollResult::Removed;
        }

        let status = match self.client.status(test).await {
            Ok(status) => status,
            Err(e) => {
                warn!(policy_test = %test, name = test.name(), reason = e.reason().as_str(), status = e.status(), cf_code = e.first_code(), hint = e.hint(), cause = %e, "poll failed");
                self.metrics.publish_failure(test, e.reason());
                return PollResult::Failed;
            }
        };
        self.metrics.publish_status(test, &status);

        if status.state() != TestState::Complete {
            debug!(policy_test = %test, name = test.name(), state = %status.state(), percent_processed = status.percent_users_processed, "policy test not complete; not walked");
            self.metrics.publish_success(test, None);
            return PollResult::NotComplete;
        }

        // A walk that fits in a full budget but not in what is left now waits
        // for the next cycle; one larger than a full budget is walked anyway,
        // paced by the budget over several windows.
        let cost = walk::user_bound(&status)
            .map(|users| walk::expected_requests(users, self.options.walk.per_page))
            .unwrap_or(1);
        let budget = self.client.budget();
        let available = budget.available();
        if cost > available && cost <= budget.capacity() {
            warn!(policy_test = %test, name = test.name(), needed = cost, available, "request budget cannot fit this walk now; deferred to the next cycle");
            self.metrics.publish_deferral(test);
            return PollResult::Deferred;
        }
        if cost > budget.capacity() {
            info!(policy_test = %test, name = test.name(), needed = cost, budget = budget.capacity(), "walk is larger than the request budget; spreading it over several budget windows");
        }

        match walk::walk(&self.client, test, &status, self.options.walk).await {
            Ok(walk) => {
                debug!(policy_test = %test, name = test.name(), approved = walk.tally.approved, blocked = walk.tally.blocked, error = walk.tally.error, unknown = walk.tally.unknown, pages = walk.pages, elapsed = ?walk.duration, "walk finished");
                self.metrics.publish_success(test, Some(&walk));
                PollResult::Walked
            }
            Err(e) => {
                let (page, source) = match &e {
                    walk::WalkError::Page { page, source } => (Some(*page), Some(source)),
                    _ => (None, None),
                };
                warn!(
                    policy_test = %test,
                    name = test.name(),
                    reason = e.reason().as_str(),
                    page,
                    status = source.and_then(|s| s.status()),
                    cf_code = source.and_then(|s| s.first_code()),
                    hint = source.and_then(|s| s.hint()),
                    cause = %e,
                    "walk failed; previous values kept"
                );
                self.metrics.publish_failure(test, e.reason());
                PollResult::Failed
            }
        }
    }
}
