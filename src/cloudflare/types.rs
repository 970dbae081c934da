//! The shapes of Cloudflare's policy-test responses, decoded leniently.
//!
//! Every response comes in Cloudflare's envelope (`success`, `errors`,
//! `messages`, `result`). The status endpoint's result is small and decoded
//! into [`PolicyTestStatus`]. A user page is never held as a list of users:
//! it is tallied while it is decoded ([`PageTally`]), so a page of a thousand
//! users allocates nothing per user. Unknown fields, nulls and unknown status
//! strings never fail a decode; they are counted as `unknown`.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::tally::{Tally, UserStatus};

/// Cloudflare's response envelope around a `result`.
#[derive(Debug, Deserialize)]
pub struct Envelope<T> {
    /// `true` for data; `false` (even with HTTP 200) means `errors` explains why.
    #[serde(default)]
    pub success: Option<bool>,

    /// Coded errors; present on failures, empty on success.
    #[serde(default, deserialize_with = "lenient_messages")]
    pub errors: Vec<ApiMessage>,

    /// The payload; `null` on failures.
    #[serde(default = "Option::default")]
    pub result: Option<T>,
}

/// One entry of an envelope's `errors` array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiMessage {
    /// Cloudflare's numeric error code (0 when it was missing or not a number).
    pub code: i64,

    /// Cloudflare's message, as sent.
    pub message: String,
}

impl fmt::Display for ApiMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

/// Decodes an `errors` array without failing on odd entries: a code that is a
/// string or missing becomes 0, a message that is missing becomes empty.
fn lenient_messages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ApiMessage>, D::Error> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        code: serde_json::Value,
        #[serde(default)]
        message: serde_json::Value,
    }

    let raw: Option<Vec<Option<Raw>>> = Option::deserialize(d)?;
    let messages = raw
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .map(|r| ApiMessage {
            code: match &r.code {
                serde_json::Value::Number(n) => n.as_i64().unwrap_or(0),
                serde_json::Value::String(s) => s.trim().parse().unwrap_or(0),
                _ => 0,
            },
            message: shorten(match r.message {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            }),
        })
        .take(MAX_MESSAGES)
        .collect();
    Ok(messages)
}

/// The most of Cloudflare's error messages kept from one answer.
const MAX_MESSAGES: usize = 8;

/// The most characters of one error message kept, so that a log line stays
/// a line whatever an answer holds.
const MAX_MESSAGE_CHARS: usize = 200;

/// `message` cut to [`MAX_MESSAGE_CHARS`], marked with `…` when cut.
fn shorten(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// The state of a policy test, as the status endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestState {
    /// Cloudflare is still evaluating users; counts are partial.
    Processing,
    /// Every user was evaluated; the result no longer changes.
    Complete,
    /// Cloudflare gave up before evaluating every user; counts are partial.
    ExceededTime,
    /// The test was blocked by Cloudflare; counts are partial.
    Blocked,
    /// A state this exporter does not know, or none at all.
    Unknown,
}

impl TestState {
    /// Every state, in the order the `state` label values are exported.
    pub const ALL: [TestState; 5] = [
        TestState::Processing,
        TestState::Complete,
        TestState::ExceededTime,
        TestState::Blocked,
        TestState::Unknown,
    ];

    /// Cloudflare's own word for the state, used as the `state` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TestState::Processing => "processing",
            TestState::Complete => "complete",
            TestState::ExceededTime => "exceeded time",
            TestState::Blocked => "blocked",
            TestState::Unknown => "unknown",
        }
    }

    fn from_api(s: &str) -> TestState {
        match s {
            "processing" => TestState::Processing,
            "complete" => TestState::Complete,
            "exceeded time" => TestState::ExceededTime,
            "blocked" => TestState::Blocked,
            _ => TestState::Unknown,
        }
    }
}

impl fmt::Display for TestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TestState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Option<serde_json::Value> = Option::deserialize(d)?;
        Ok(match raw {
            Some(serde_json::Value::String(s)) => TestState::from_api(&s),
            _ => TestState::Unknown,
        })
    }
}

/// The result of `GET .../policy-tests/{id}`: the test's state and counts.
///
/// Every field is optional in Cloudflare's spec. Counts that are negative or
/// not whole numbers are treated as absent rather than trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PolicyTestStatus {
    /// The state; `None` when the field was missing.
    #[serde(default)]
    pub status: Option<TestState>,

    /// Users in the account's user base.
    #[serde(default, deserialize_with = "lenient_count")]
    pub total_users: Option<u64>,

    /// Percentage (0–100) of the user base evaluated so far.
    #[serde(default, deserialize_with = "lenient_count")]
    pub percent_users_processed: Option<u64>,

    /// Processed users the policy approved.
    #[serde(default, deserialize_with = "lenient_count")]
    pub users_approved: Option<u64>,

    /// Processed users the policy blocked.
    #[serde(default, deserialize_with = "lenient_count")]
    pub users_blocked: Option<u64>,

    /// Processed users whose evaluation failed.
    #[serde(default, deserialize_with = "lenient_count")]
    pub users_errored: Option<u64>,
}

impl PolicyTestStatus {
    /// The state, `Unknown` when Cloudflare did not say.
    pub fn state(&self) -> TestState {
        self.status.unwrap_or(TestState::Unknown)
    }

    /// The sum of the three reported counts, when all three were reported
    /// and their sum is a number (counts near `u64::MAX` are not).
    pub fn reported_sum(&self) -> Option<u64> {
        self.users_approved?
            .checked_add(self.users_blocked?)?
            .checked_add(self.users_errored?)
    }
}

fn lenient_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let raw: Option<serde_json::Value> = Option::deserialize(d)?;
    Ok(raw.and_then(|v| v.as_u64()))
}

/// A user page, tallied while it is decoded.
///
/// `users` is how many entries the page held (what decides whether the page
/// was empty); `tally` counts them by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageTally {
    /// Entries on the page, whatever their shape.
    pub users: u64,

    /// The entries counted by their `status`.
    pub tally: Tally,
}

impl<'de> Deserialize<'de> for PageTally {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(PageVisitor)
    }
}

struct PageVisitor;

impl<'de> Visitor<'de> for PageVisitor {
    type Value = PageTally;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of users")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PageTally, A::Error> {
        let mut page = PageTally::default();
        while let Some(user) = seq.next_element::<UserEntry>()? {
            page.users += 1;
            page.tally.add(user.0);
        }
        Ok(page)
    }
}

/// The visitor methods for JSON values that carry no status (null, booleans,
/// numbers, arrays), each giving `$unknown`: a lenient decoder counts an odd
/// value as unknown instead of failing the page.
macro_rules! anything_else_is_unknown {
    ($unknown:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($unknown)
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($unknown)
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($unknown)
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($unknown)
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($unknown)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($unknown)
        }
    };
}

/// One element of a user page, reduced to its status. Anything that is not
/// an object with a known `status` string counts as `Unknown`.
struct UserEntry(UserStatus);

impl<'de> Deserialize<'de> for UserEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UserEntryVisitor)
    }
}

struct UserEntryVisitor;

impl<'de> Visitor<'de> for UserEntryVisitor {
    type Value = UserEntry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a user object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UserEntry, A::Error> {
        let mut status = UserStatus::Unknown;
        while let Some(field) = map.next_key::<UserField>()? {
            match field {
                UserField::Status => status = map.next_value::<StatusValue>()?.0,
                UserField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(UserEntry(status))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<UserEntry, E> {
        Ok(UserEntry(UserStatus::Unknown))
    }

    anything_else_is_unknown!(UserEntry(UserStatus::Unknown));
}

/// A key of a user object: only `status` matters.
enum UserField {
    Status,
    Other,
}

impl<'de> Deserialize<'de> for UserField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = UserField;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<UserField, E> {
                Ok(if key == "status" {
                    UserField::Status
                } else {
                    UserField::Other
                })
            }
        }

        d.deserialize_identifier(KeyVisitor)
    }
}

/// The value of a user's `status`, whatever JSON type it came as.
struct StatusValue(UserStatus);

impl<'de> Deserialize<'de> for StatusValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = StatusValue;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<StatusValue, E> {
                Ok(StatusValue(UserStatus::from_api(s)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StatusValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(StatusValue(UserStatus::Unknown))
            }

            anything_else_is_unknown!(StatusValue(UserStatus::Unknown));
        }

        d.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(json: &str) -> Envelope<PageTally> {
        serde_json::from_str(json).expect("page decodes")
    }

    #[test]
    fn user_page_fixture_tallies_each_status() {
        let env = page(include_str!(
            "../../tests/data/users.page-1.per_page-3.json"
        ));
        let got = env.result.expect("result present");

        assert_eq!(env.success, Some(true));
        assert_eq!(got.users, 3);
        assert_eq!(got.tally.approved, 1);
        assert_eq!(got.tally.blocked, 1);
        assert_eq!(got.tally.error, 1);
        assert_eq!(got.tally.unknown, 0);
    }

    #[test]
    fn long_and_many_error_messages_are_kept_short() {
        let errors: Vec<String> = (0..50)
            .map(|i| format!(r#"{{"code":{i},"message":"{}"}}"#, "é".repeat(5000)))
            .collect();
        let json = format!(r#"{{"success":false,"errors":[{}]}}"#, errors.join(","));

        let env: Envelope<PageTally> = serde_json::from_str(&json).expect("decodes");

        assert_eq!(env.errors.len(), MAX_MESSAGES);
        assert_eq!(env.errors[7].code, 7);
        assert_eq!(env.errors[0].message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(env.errors[0].message.ends_with('…'));
    }

    #[test]
    fn partial_and_empty_fixture_pages() {
        let partial = page(include_str!(
            "../../tests/data/users.page-2.per_page-3.partial.json"
        ));
        let empty = page(include_str!(
            "../../tests/data/users.page-3.per_page-3.empty.json"
        ));

        assert_eq!(partial.result.expect("result").users, 2);
        assert_eq!(empty.result.expect("result").users, 0);
    }

    #[test]
    fn page_with_result_info_still_decodes() {
        let env = page(include_str!(
            "../../tests/data/users.page-1.with-result_info.HYPOTHETICAL.json"
        ));

        assert!(env.result.expect("result").users > 0);
    }

    #[test]
    fn odd_users_count_as_unknown() {
        let env = page(
            r#"{"success":true,"errors":[],"messages":[],"result":[
                {"id":"a","status":"approved","extra":{"nested":[1,2]}},
                {"id":"b"},
                {"id":"c","status":null},
                {"id":"d","status":"success"},
                {"id":"e","status":7},
                null,
                "x",
                {"status":"bl\u006fcked"}
            ]}"#,
        );
        let got = env.result.expect("result");

        assert_eq!(got.users, 8);
        assert_eq!(got.tally.approved, 1);
        assert_eq!(got.tally.blocked, 1);
        assert_eq!(got.tally.unknown, 6);
    }

    #[test]
    fn status_fixtures_decode() {
        let complete: Envelope<PolicyTestStatus> = serde_json::from_str(include_str!(
            "../../tests/data/policy-test.status.complete.json"
        ))
        .expect("decodes");
        let processing: Envelope<PolicyTestStatus> = serde_json::from_str(include_str!(
            "../../tests/data/policy-test.status.processing.json"
        ))
        .expect("decodes");
        let exceeded: Envelope<PolicyTestStatus> = serde_json::from_str(include_str!(
            "../../tests/data/policy-test.status.exceeded-time.json"
        ))
        .expect("decodes");
        let status = complete.result.expect("result");

        assert_eq!(status.state(), TestState::Complete);
        assert_eq!(status.total_users, Some(1200));
        assert_eq!(status.users_approved, Some(900));
        assert_eq!(status.users_blocked, Some(280));
        assert_eq!(status.users_errored, Some(20));
        assert_eq!(status.reported_sum(), Some(1200));
        assert_eq!(
            processing.result.expect("result").state(),
            TestState::Processing
        );
        assert_eq!(
            exceeded.result.expect("result").state(),
            TestState::ExceededTime
        );
    }

    #[test]
    fn error_fixtures_decode_codes() {
        let cases = [
            (
                include_str!("../../tests/data/error.403.authentication-10000.json"),
                10000,
            ),
            (
                include_str!("../../tests/data/error.429.rate-limited-971.json"),
                971,
            ),
            (
                include_str!("../../tests/data/error.400.failure-envelope.spec-example.json"),
                7003,
            ),
            (
                include_str!("../../tests/data/error.400.invalid-request-headers-6003.json"),
                6003,
            ),
            (
                include_str!("../../tests/data/error.400.missing-auth-headers-9106.json"),
                9106,
            ),
        ];

        for (json, code) in cases {
            let env: Envelope<PageTally> = serde_json::from_str(json).expect("decodes");
            assert_eq!(env.success, Some(false));
            assert_eq!(env.errors[0].code, code);
            assert!(env.result.is_none());
        }
    }

    #[test]
    fn negative_counts_are_absent() {
        let env: Envelope<PolicyTestStatus> = serde_json::from_str(
            r#"{"success":true,"errors":[],"result":{"status":"complete","total_users":-4,"users_approved":1.5}}"#,
        )
        .expect("decodes");
        let status = env.result.expect("result");

        assert_eq!(status.total_users, None);
        assert_eq!(status.users_approved, None);
        assert_eq!(status.reported_sum(), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One user entry as JSON text, and the status it must count as.
        fn user_entry() -> impl Strategy<Value = (String, UserStatus)> {
            prop_oneof![
                Just((
                    r#"{"id":"x","status":"approved"}"#.to_owned(),
                    UserStatus::Approved
                )),
                Just((
                    r#"{"status":"blocked","name":null}"#.to_owned(),
                    UserStatus::Blocked
                )),
                Just((
                    r#"{"email":"e@x","status":"error","extra":[1,{"a":2}]}"#.to_owned(),
                    UserStatus::Error
                )),
                Just((r#"{"status":null}"#.to_owned(), UserStatus::Unknown)),
                Just(("null".to_owned(), UserStatus::Unknown)),
                Just(("{}".to_owned(), UserStatus::Unknown)),
                "[a-z]{0,12}"
                    .prop_map(|s| (format!(r#"{{"status":"{s}"}}"#), UserStatus::from_api(&s))),
                any::<i64>().prop_map(|n| (format!(r#"{{"status":{n}}}"#), UserStatus::Unknown)),
            ]
        }

        proptest! {
            #[test]
            fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let _ = serde_json::from_slice::<Envelope<PageTally>>(&bytes);
                let _ = serde_json::from_slice::<Envelope<PolicyTestStatus>>(&bytes);
            }

            #[test]
            fn decoder_never_panics_on_mutated_pages(
                cut in 0usize..400,
                flip in 0usize..400,
                byte in any::<u8>(),
            ) {
                let mut page = include_bytes!("../../tests/data/users.page-1.per_page-3.json").to_vec();
                let at = flip % page.len();
                page[at] = byte;
                page.truncate(page.len() - cut.min(page.len()));
                let _ = serde_json::from_slice::<Envelope<PageTally>>(&page);
            }

            #[test]
            fn every_entry_is_counted_once_by_its_status(entries in proptest::collection::vec(user_entry(), 0..300)) {
                let body = format!(
                    r#"{{"success":true,"errors":[],"messages":[],"result":[{}]}}"#,
                    entries.iter().map(|(json, _)| json.as_str()).collect::<Vec<_>>().join(",")
                );
                let page = serde_json::from_str::<Envelope<PageTally>>(&body)
                    .expect("decodes")
                    .result
                    .expect("result");
                let mut expected = Tally::default();
                for (_, status) in &entries {
                    expected.add(*status);
                }

                prop_assert_eq!(page.users, entries.len() as u64);
                prop_assert_eq!(page.tally, expected);
            }
        }
    }
}
