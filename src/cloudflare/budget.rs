//! The client-side request budget that keeps the exporter within Cloudflare's
//! rate limit.
//!
//! Cloudflare allows 1200 requests per 5 minutes per token, shared with every
//! other user of the token, and blocks the token for 5 minutes once that is
//! exceeded. The budget is a token bucket refilled evenly over the window, so
//! the exporter never spends more than its share however many tests it walks.
//! Two signals from Cloudflare tighten it further: the `Ratelimit` header
//! (`r=` requests left, `t=` seconds to reset) caps the bucket and closes it
//! when few requests are left, and a 429 closes it until `Retry-After` has
//! passed. While the budget is closed nothing is sent.
//!
//! The bucket is shared by every test; it does not reserve a whole walk's
//! requests up front, so two tests that both find enough room may together
//! wait for refills. The waiting is paced, never a burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Requests left to other users of the token: below this many remaining in
/// Cloudflare's window, the exporter waits for the window to reset.
pub const RATELIMIT_RESERVE: u64 = 50;

/// Cloudflare's rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(300);

/// The longest a `Retry-After` is obeyed. Cloudflare blocks a throttled
/// token for five minutes; a longer value comes from a misbehaving proxy, and
/// obeying it as sent (or a date years ahead) would stop polling for good.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A token bucket of requests, shared by every walk.
#[derive(Debug)]
pub struct RequestBudget {
    /// Requests allowed per [`WINDOW`].
    capacity: f64,

    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled_at: Instant,
    closed_until: Option<Instant>,
}

impl RequestBudget {
    /// A full budget of `per_window` requests per five minutes.
    pub fn new(per_window: u32) -> RequestBudget {
        let capacity = f64::from(per_window.max(1));
        RequestBudget {
            capacity,
            state: Mutex::new(State {
                tokens: capacity,
                refilled_at: Instant::now(),
                closed_until: None,
            }),
        }
    }

    /// Requests allowed per window.
    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Whole requests that may be sent right now.
    pub fn available(&self) -> u64 {
        let mut state = self.lock();
        let now = Instant::now();
        self.refill(&mut state, now);
        match state.closed_until {
            Some(until) if until > now => 0,
            _ => state.tokens.floor() as u64,
        }
    }

    /// When the budget was closed by Cloudflare, the instant it opens again.
    pub fn closed_until(&self) -> Option<Instant> {
        let state = self.lock();
        state.closed_until.filter(|until| *until > Instant::now())
    }

    /// Waits until one request may be sent, and spends it.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut state = self.lock();
                let now = Instant::now();
                self.refill(&mut state, now);
                match state.closed_until {
                    Some(until) if until > now => until - now,
                    _ if state.tokens >= 1.0 => {
                        state.tokens -= 1.0;
                        return;
                    }
                    _ => Duration::from_secs_f64((1.0 - state.tokens) / self.rate()),
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Closes the budget for `wait` from now: nothing is sent before then.
    /// A later close than one already in force extends it; an earlier one
    /// does not shorten it.
    pub fn close_for(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_RETRY_AFTER);
        let mut state = self.lock();
        if state.closed_until.is_none_or(|current| current < until) {
            state.closed_until = Some(until);
        }
    }

    /// Takes in Cloudflare's own count of what is left in its window. The
    /// bucket never holds more than Cloudflare would still accept (less the
    /// reserve), and closes until the reset when the reserve is reached.
    pub fn observe_ratelimit(&self, limit: RateLimit) {
        {
            let mut state = self.lock();
            let allowed = limit.remaining.saturating_sub(RATELIMIT_RESERVE) as f64;
            if state.tokens > allowed {
                state.tokens = allowed;
            }
        }

        if limit.remaining <= RATELIMIT_RESERVE {
            self.close_for(limit.reset);
        }
    }

    fn rate(&self) -> f64 {
        self.capacity / WINDOW.as_secs_f64()
    }

    fn refill(&self, state: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(state.refilled_at);
        state.tokens = (state.tokens + elapsed.as_secs_f64() * self.rate()).min(self.capacity);
        state.refilled_at = now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the bucket in a state
        // worse than slightly off counts, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a `Ratelimit` header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests left in the current window (`r=`).
    pub remaining: u64,
    /// Time until the window resets (`t=`), at most one [`WINDOW`]: a window
    /// cannot reset later than its own length from now.
    pub reset: Duration,
}

impl RateLimit {
    /// Parses `"default";r=1187;t=243`. With several list members, the
    /// tightest one wins. `None` when no member has both `r` and `t`.
    pub fn parse(header: &str) -> Option<RateLimit> {
        header
            .split(',')
            .filter_map(|member| {
                let mut remaining = None;
                let mut reset = None;
                for param in member.split(';').skip(1) {
                    let (key, value) = param.trim().split_once('=')?;
                    let value: u64 = value.trim().parse().ok()?;
                    match key.trim() {
                        "r" => remaining = Some(value),
                        "t" => reset = Some(Duration::from_secs(value).min(WINDOW)),
                        _ => {}
                    }
                }
                Some(RateLimit {
                    remaining: remaining?,
                    reset: reset?,
                })
            })
            .min_by_key(|limit| limit.remaining)
    }
}

/// Reads a `Retry-After` value: delay seconds or an HTTP date. A missing,
/// zero or unreadable value gives `fallback`, because Cloudflare blocks the
/// token for minutes once throttled and "0" has been seen in the wild. The
/// result is at most [`MAX_RETRY_AFTER`].
pub fn retry_after(header: Option<&str>, fallback: Duration) -> Duration {
    let Some(value) = header.map(str::trim) else {
        return fallback;
    };
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => match httpdate::parse_http_date(value) {
            Ok(at) => at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            Err(_) => Duration::ZERO,
        },
    };
    if delay.is_zero() {
        fallback.min(MAX_RETRY_AFTER)
    } else {
        delay.min(MAX_RETRY_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cloudflare_ratelimit_header() {
        let limit = RateLimit::parse(r#""default";r=1187;t=243"#).expect("parses");

        assert_eq!(limit.remaining, 1187);
        assert_eq!(limit.reset, Duration::from_secs(243));
        assert_eq!(
            RateLimit::parse(r#""a";r=10;t=5, "b";r=3;t=60"#).map(|l| l.remaining),
            Some(3)
        );
        assert_eq!(RateLimit::parse("garbage"), None);
        assert_eq!(RateLimit::parse(r#""default";r=x;t=1"#), None);
        assert_eq!(
            RateLimit::parse(r#""default";r=0;t=18446744073709551615"#).map(|l| l.reset),
            Some(WINDOW)
        );
    }

    #[test]
    fn retry_after_never_means_now() {
        let fallback = Duration::from_secs(300);

        assert_eq!(retry_after(Some("117"), fallback), Duration::from_secs(117));
        assert_eq!(retry_after(Some("0"), fallback), fallback);
        assert_eq!(retry_after(None, fallback), fallback);
        assert_eq!(retry_after(Some("soon"), fallback), fallback);
        assert_eq!(
            retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), fallback),
            fallback
        );
        assert_eq!(
            retry_after(Some("18446744073709551615"), fallback),
            MAX_RETRY_AFTER
        );
        assert_eq!(
            retry_after(Some("Fri, 01 Jan 9999 00:00:00 GMT"), fallback),
            MAX_RETRY_AFTER
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_close_is_capped_not_a_panic() {
        let budget = RequestBudget::new(600);
        let start = Instant::now();

        budget.close_for(Duration::MAX);
        budget.observe_ratelimit(RateLimit {
            remaining: 0,
            reset: Duration::MAX,
        });

        let opens = budget.closed_until().expect("closed");
        assert_eq!(opens - start, MAX_RETRY_AFTER);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_paces_requests_once_spent() {
        let budget = RequestBudget::new(300);
        let start = Instant::now();

        for _ in 0..300 {
            budget.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(10));
        assert_eq!(budget.available(), 0);

        budget.acquire().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(990), "{waited:?}");
        assert!(waited <= Duration::from_millis(1100), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn closed_budget_sends_nothing_until_it_opens() {
        let budget = RequestBudget::new(600);
        let start = Instant::now();
        budget.close_for(Duration::from_secs(30));

        assert_eq!(budget.available(), 0);
        budget.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn low_ratelimit_remaining_closes_until_reset() {
        let budget = RequestBudget::new(600);
        budget.observe_ratelimit(RateLimit {
            remaining: 200,
            reset: Duration::from_secs(100),
        });
        assert_eq!(budget.available(), 150);

        budget.observe_ratelimit(RateLimit {
            remaining: RATELIMIT_RESERVE,
            reset: Duration::from_secs(100),
        });
        assert_eq!(budget.available(), 0);
        assert!(budget.closed_until().is_some());
    }
}
