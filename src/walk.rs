//! Walking one policy test: every user page, tallied, then cross-checked.
//!
//! A walk starts after the status endpoint has said the test is `complete`
//! and how many users it holds. Page 1 is read alone; its length tells the
//! page size the server really uses (it may cap pages below `per_page`), and
//! with the user count that gives the number of pages. Those pages, and the
//! one after them that should come back empty, are then fetched concurrently,
//! within a bound, and tallied in page order as they arrive. A walk ends only
//! on an empty page: a short page is not proof of the end. If the expected
//! empty page is not empty, the walk carries on one page at a time.
//!
//! The user count also bounds the walk: once more users have been seen than
//! the test holds plus one page, the server is repeating itself without end
//! and the walk stops with an error. (The page of slack lets a walk that
//! merely saw a user twice, because the result set shifted, reach its empty
//! page and be refused for what it is: inconsistent.) A finished walk whose
//! total differs from the reported total missed or repeated users and is
//! refused; one whose per-status counts differ from the reported ones is
//! kept, and flagged.
//!
//! Where test ids come from is not this module's concern; see [`crate::poll`].

use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cloudflare::{ApiError, Client, FailureReason, PageTally, PolicyTestStatus};
use crate::config::PolicyTest;
use crate::tally::Tally;

/// The largest page Cloudflare serves for this endpoint.
pub const MAX_PER_PAGE: u32 = 1000;

/// How walks are run.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// `per_page` asked of the users endpoint.
    pub per_page: u32,
    /// Pages in flight at once within one walk.
    pub concurrency: usize,
}

impl Default for WalkOptions {
    fn default() -> WalkOptions {
        WalkOptions {
            per_page: MAX_PER_PAGE,
            concurrency: 4,
        }
    }
}

/// A finished, consistent walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Users by status.
    pub tally: Tally,
    /// Pages fetched, the final empty one included.
    pub pages: u64,
    /// How long the pages took.
    pub duration: Duration,
    /// Whether the per-status tally differs from the counts the status
    /// endpoint reported (the totals agree, or the walk would be refused).
    pub mismatch: bool,
}

/// Why a walk was not published.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// A page request failed after its retries.
    #[error("page {page}: {source}")]
    Page {
        /// The page that failed.
        page: u64,
        /// The request's error.
        source: ApiError,
    },

    /// More users came back than the test holds: the server never returned
    /// an empty page, or repeated users.
    #[error(
        "walk stopped after {pages} pages: {seen} users seen but the test holds at most {bound}"
    )]
    TooManyPages {
        /// Pages read before stopping.
        pages: u64,
        /// Users seen on them.
        seen: u64,
        /// The most users the status endpoint allows.
        bound: u64,
    },

    /// The walk's total differs from the reported total: users were missed
    /// or counted twice (the result set may have shifted during the walk).
    #[error("walk found {walked} users but the test reports {reported}: not published")]
    Inconsistent {
        /// Users counted over all pages.
        walked: u64,
        /// approved + blocked + errored, as reported.
        reported: u64,
    },

    /// The status endpoint gave no count to bound or check the walk with.
    #[error("the status endpoint reported no user counts; the walk cannot be bounded")]
    NoCounts,
}

impl WalkError {
    /// The failure reason this error is counted under.
    pub fn reason(&self) -> FailureReason {
        match self {
            WalkError::Page { source, .. } => source.reason(),
            WalkError::TooManyPages { .. } => FailureReason::TooManyPages,
            WalkError::Inconsistent { .. } => FailureReason::InconsistentWalk,
            WalkError::NoCounts => FailureReason::Decode,
        }
    }
}

/// The most users a complete test can hold, from its status.
pub fn user_bound(status: &PolicyTestStatus) -> Option<u64> {
    match (status.total_users, status.reported_sum()) {
        (Some(total), Some(sum)) => Some(total.max(sum)),
        (total, sum) => total.or(sum),
    }
}

/// Requests a walk of a test with `users` users is expected to cost, with
/// pages of `per_page` users. It is an estimate made before the walk: a
/// server that caps pages below `per_page` (seen only on page 1) costs more.
pub fn expected_requests(users: u64, per_page: u32) -> u64 {
    users.div_ceil(u64::from(per_page.max(1))).saturating_add(1)
}

/// Walks every user page of `test`, whose status said it is complete.
pub async fn walk(
    client: &Client,
    test: &PolicyTest,
    status: &PolicyTestStatus,
    options: WalkOptions,
) -> Result<Walk, WalkError> {
    let bound = user_bound(status).ok_or(WalkError::NoCounts)?;
    let started = Instant::now();
    let mut progress = Progress::new(bound);

    // Page 1 alone: it tells the page size the server really uses.
    let first = fetch(client, test, 1, options.per_page).await?;
    progress.slack = first.users;
    progress.add(&first)?;
    if first.users > 0 {
        let page_size = first.users;
        let last_full = bound.div_ceil(page_size).max(1);

        // The pages the count says exist, and the empty one after them.
        let empty = last_full.saturating_add(1);
        let mut ended = concurrent(client, test, 2, empty, options, &mut progress).await?;

        // The server returned more than the count allows for: carry on one
        // page at a time until an empty page or the bound.
        let mut page = empty.saturating_add(1);
        while !ended {
            let next = fetch(client, test, page, options.per_page).await?;
            ended = progress.add(&next)?;
            page = page.saturating_add(1);
        }
    }

    let walk = Walk {
        tally: progress.tally,
        pages: progress.pages,
        duration: started.elapsed(),
        mismatch: false,
    };
    cross_check(test, status, walk)
}

/// Fetches pages `from..=to`, up to `options.concurrency` at once, tallying
/// them in page order. Returns whether an empty page ended the walk.
async fn concurrent(
    client: &Client,
    test: &PolicyTest,
    from: u64,
    to: u64,
    options: WalkOptions,
    progress: &mut Progress,
) -> Result<bool, WalkError> {
    let mut pages = stream::iter(from..=to)
        .map(|page| fetch(client, test, page, options.per_page))
        .buffered(options.concurrency.max(1));

    while let Some(page) = pages.try_next().await? {
        if progress.add(&page)? {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn fetch(
    client: &Client,
    test: &PolicyTest,
    page: u64,
    per_page: u32,
) -> Result<PageTally, WalkError> {
    let tally = client
        .users_page(test, page, per_page)
        .await
        .map_err(|source| WalkError::Page { page, source })?;
    debug!(policy_test = %test, page, users = tally.users, "user page");
    Ok(tally)
}

/// The running count of a walk.
struct Progress {
    bound: u64,
    /// Users past the bound tolerated before stopping: one page.
    slack: u64,
    pages: u64,
    seen: u64,
    tally: Tally,
}

impl Progress {
    fn new(bound: u64) -> Progress {
        Progress {
            bound,
            slack: 0,
            pages: 0,
            seen: 0,
            tally: Tally::default(),
        }
    }

    /// Adds a page; `true` when it was the empty page that ends the walk.
    fn add(&mut self, page: &PageTally) -> Result<bool, WalkError> {
        self.pages += 1;
        if page.users == 0 {
            return Ok(true);
        }
        self.seen = self.seen.saturating_add(page.users);
        self.tally += page.tally;
        if self.seen > self.bound.saturating_add(self.slack) {
            return Err(WalkError::TooManyPages {
                pages: self.pages,
                seen: self.seen,
                bound: self.bound,
            });
        }
        Ok(false)
    }
}

/// Compares the walk with the status endpoint's counts.
fn cross_check(
    test: &PolicyTest,
    status: &PolicyTestStatus,
    mut walk: Walk,
) -> Result<Walk, WalkError> {
    let reported = status.reported_sum().or(status.total_users).unwrap_or(0);
    let walked = walk.tally.total();
    if walked != reported {
        return Err(WalkError::Inconsistent { walked, reported });
    }

    let per_status = [
        (walk.tally.approved, status.users_approved),
        (walk.tally.blocked, status.users_blocked),
        (walk.tally.error, status.users_errored),
    ];
    walk.mismatch = per_status
        .iter()
        .any(|(walked, reported)| reported.is_some_and(|r| r != *walked));
    if walk.mismatch {
        warn!(
            policy_test = %test,
            name = test.name(),
            walked_approved = walk.tally.approved,
            walked_blocked = walk.tally.blocked,
            walked_error = walk.tally.error,
            walked_unknown = walk.tally.unknown,
            reported_approved = status.users_approved,
            reported_blocked = status.users_blocked,
            reported_errored = status.users_errored,
            "tally disagrees with the counts Cloudflare reports"
        );
    }
    Ok(walk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(approved: u64, blocked: u64, errored: u64) -> PolicyTestStatus {
        PolicyTestStatus {
            total_users: Some(approved + blocked + errored),
            users_approved: Some(approved),
            users_blocked: Some(blocked),
            users_errored: Some(errored),
            ..Default::default()
        }
    }

    #[test]
    fn bound_takes_the_larger_count() {
        let mut s = status(5, 3, 2);
        s.total_users = Some(12);

        assert_eq!(user_bound(&s), Some(12));
        assert_eq!(user_bound(&PolicyTestStatus::default()), None);
        assert_eq!(expected_requests(10_000, 1000), 11);
        assert_eq!(expected_requests(10_001, 1000), 12);
        assert_eq!(expected_requests(0, 1000), 1);
        assert_eq!(expected_requests(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn counts_near_the_top_of_u64_do_not_wrap() {
        let huge = PolicyTestStatus {
            users_approved: Some(u64::MAX),
            users_blocked: Some(1),
            users_errored: Some(1),
            ..Default::default()
        };

        assert_eq!(huge.reported_sum(), None);
        assert_eq!(user_bound(&huge), None);

        let mut progress = Progress::new(u64::MAX);
        progress.slack = u64::MAX;
        let page = PageTally {
            users: u64::MAX,
            tally: Tally {
                approved: u64::MAX,
                ..Default::default()
            },
        };
        assert!(!progress.add(&page).expect("within the bound"));
        assert!(!progress.add(&page).expect("saturates, no wrap"));
        assert_eq!(progress.tally.approved, u64::MAX);
        assert_eq!(progress.tally.total(), u64::MAX);
    }

    #[test]
    fn progress_stops_past_the_bound() {
        let mut progress = Progress::new(3);
        progress.slack = 1;
        let page = PageTally {
            users: 2,
            tally: Tally {
                approved: 2,
                ..Default::default()
            },
        };

        assert!(!progress.add(&page).expect("within bound"));
        assert!(!progress.add(&page).expect("within the slack"));
        let err = progress.add(&page).expect_err("past bound");
        assert!(matches!(
            err,
            WalkError::TooManyPages {
                pages: 3,
                seen: 6,
                bound: 3
            }
        ));
        assert!(progress.add(&PageTally::default()).expect("empty page"));
    }
}
