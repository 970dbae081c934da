//! Counting users by their policy-test result.
//!
//! A [`Tally`] is four counters. Pages are tallied as they are decoded and
//! the page tallies are summed into the walk's tally, so no user is ever kept.

use std::ops::AddAssign;

/// A user's result in a policy test, as the users endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserStatus {
    /// The policy would let the user in.
    Approved,
    /// The policy would keep the user out.
    Blocked,
    /// Cloudflare could not evaluate the policy for the user.
    Error,
    /// The status was missing or not one of the three above.
    Unknown,
}

impl UserStatus {
    /// Every status, in the order the `status` label values are exported.
    pub const ALL: [UserStatus; 4] = [
        UserStatus::Approved,
        UserStatus::Blocked,
        UserStatus::Error,
        UserStatus::Unknown,
    ];

    /// The `status` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Approved => "approved",
            UserStatus::Blocked => "blocked",
            UserStatus::Error => "error",
            UserStatus::Unknown => "unknown",
        }
    }

    /// Maps Cloudflare's per-user word to a status; anything else is unknown.
    pub fn from_api(s: &str) -> UserStatus {
        match s {
            "approved" => UserStatus::Approved,
            "blocked" => UserStatus::Blocked,
            "error" => UserStatus::Error,
            _ => UserStatus::Unknown,
        }
    }
}

/// Users counted by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Users the policy approved.
    pub approved: u64,
    /// Users the policy blocked.
    pub blocked: u64,
    /// Users whose evaluation failed.
    pub error: u64,
    /// Users with a missing or unrecognised status.
    pub unknown: u64,
}

impl Tally {
    /// Counts one user.
    #[inline]
    pub fn add(&mut self, status: UserStatus) {
        match status {
            UserStatus::Approved => self.approved += 1,
            UserStatus::Blocked => self.blocked += 1,
            UserStatus::Error => self.error += 1,
            UserStatus::Unknown => self.unknown += 1,
        }
    }

    /// The count for one status.
    pub fn get(&self, status: UserStatus) -> u64 {
        match status {
            UserStatus::Approved => self.approved,
            UserStatus::Blocked => self.blocked,
            UserStatus::Error => self.error,
            UserStatus::Unknown => self.unknown,
        }
    }

    /// All users counted, whatever their status.
    pub fn total(&self) -> u64 {
        self.approved
            .saturating_add(self.blocked)
            .saturating_add(self.error)
            .saturating_add(self.unknown)
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        // Saturating: counts come from outside, and a wrapped sum would
        // pass for a real one.
        self.approved = self.approved.saturating_add(other.approved);
        self.blocked = self.blocked.saturating_add(other.blocked);
        self.error = self.error.saturating_add(other.error);
        self.unknown = self.unknown.saturating_add(other.unknown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_by_status() {
        let mut a = Tally::default();
        for s in ["approved", "approved", "blocked", "error", "fail", ""] {
            a.add(UserStatus::from_api(s));
        }
        let mut b = Tally {
            approved: 10,
            blocked: 0,
            error: 1,
            unknown: 0,
        };
        b += a;

        assert_eq!(a.get(UserStatus::Approved), 2);
        assert_eq!(a.get(UserStatus::Unknown), 2);
        assert_eq!(a.total(), 6);
        assert_eq!(b.approved, 12);
        assert_eq!(b.error, 2);
        assert_eq!(b.total(), 17);
    }
}
