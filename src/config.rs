//! The configuration file: which policy tests to poll.
//!
//! The file is YAML with one key, `policy_tests`. Everything that can be
//! checked without calling Cloudflare is checked here, so that a bad file is
//! rejected with the field and line at fault before anything is polled or
//! replaced. Credentials are not part of this file; see [`crate::credentials`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What went wrong reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config.file`.
        path: PathBuf,
        /// Why the read failed.
        source: std::io::Error,
    },

    /// The YAML is malformed, has an unknown key or a value of the wrong form.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config.file`.
        path: PathBuf,
        /// The parser's message, with the line and column at fault.
        message: String,
    },

    /// The same test is listed twice.
    #[error("invalid config file {path}: policy_tests[{index}]: duplicate of policy_tests[{first}] (account_id {account_id}, id {id})")]
    Duplicate {
        /// The file named by `--config.file`.
        path: PathBuf,
        /// Position of the repeat.
        index: usize,
        /// Position of the first listing.
        first: usize,
        /// The repeated account.
        account_id: String,
        /// The repeated test id.
        id: String,
    },
}

/// The configuration file as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The tests to poll, in file order.
    pub policy_tests: Vec<PolicyTest>,
}

/// One policy test to poll: where it lives and what to call it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTest {
    /// The Cloudflare account that owns the test.
    pub account_id: AccountId,

    /// The test's id, as returned when it was started.
    pub id: PolicyTestId,

    /// The `name` label; the id when not given.
    #[serde(default, deserialize_with = "label_name")]
    name: Option<String>,
}

/// The longest `name` accepted: a label value, not a document.
const MAX_NAME: usize = 128;

fn label_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name: Option<String> = Option::deserialize(d)?;
    match name {
        Some(name) if name.trim().is_empty() => Err(serde::de::Error::custom(
            "name must not be empty (leave it out to use the id)",
        )),
        Some(name) if name.chars().count() > MAX_NAME => Err(serde::de::Error::custom(format!(
            "name must be at most {MAX_NAME} characters"
        ))),
        Some(name) if name.chars().any(char::is_control) => Err(serde::de::Error::custom(
            "name must not contain control characters",
        )),
        name => Ok(name),
    }
}

impl PolicyTest {
    /// A test with an explicit name (used by the demo and tests).
    pub fn new(account_id: AccountId, id: PolicyTestId, name: Option<String>) -> PolicyTest {
        PolicyTest {
            account_id,
            id,
            name,
        }
    }

    /// The `name` label value.
    pub fn name(&self) -> &str {
        match &self.name {
            Some(name) => name,
            None => self.id.as_str(),
        }
    }
}

impl fmt::Display for PolicyTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.account_id, self.id)
    }
}

/// A Cloudflare account id: 32 hexadecimal characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct AccountId(String);

impl AccountId {
    /// The id as Cloudflare spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountId {
    type Error = String;

    fn try_from(s: String) -> Result<AccountId, String> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(AccountId(s))
        } else {
            Err(format!(
                "account_id must be 32 hexadecimal characters, got {:?}",
                truncate(&s)
            ))
        }
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A policy test id: up to 64 characters of letters, digits and dashes (the
/// spec calls it a UUID and shows 64 hex characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct PolicyTestId(String);

impl PolicyTestId {
    /// The id as Cloudflare spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PolicyTestId {
    type Error = String;

    fn try_from(s: String) -> Result<PolicyTestId, String> {
        let well_formed = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if well_formed {
            Ok(PolicyTestId(s))
        } else {
            Err(format!(
                "id must be 1 to 64 letters, digits or dashes, got {:?}",
                truncate(&s)
            ))
        }
    }
}

impl fmt::Display for PolicyTestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    policy_tests: Vec<PolicyTest>,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Checks the YAML `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };

        let raw: Option<RawConfig> =
            serde_saphyr::from_str(text).map_err(|e| parse_error(one_line(&e.to_string())))?;
        let raw = raw.ok_or_else(|| parse_error("the file is empty".to_owned()))?;

        let mut seen: Vec<(&AccountId, &PolicyTestId)> = Vec::new();
        let mut index_of = HashSet::new();
        for (index, test) in raw.policy_tests.iter().enumerate() {
            let key = (&test.account_id, &test.id);
            if !index_of.insert(key) {
                let first = seen.iter().position(|k| *k == key).unwrap_or(0);
                return Err(ConfigError::Duplicate {
                    path: path.to_owned(),
                    index,
                    first,
                    account_id: test.account_id.to_string(),
                    id: test.id.to_string(),
                });
            }
            seen.push(key);
        }

        if raw.policy_tests.is_empty() {
            tracing::warn!(path = %path.display(), "policy_tests is empty: nothing will be polled");
        }
        Ok(Config {
            policy_tests: raw.policy_tests,
        })
    }
}

/// The YAML parser renders errors over several lines with a source snippet;
/// operators get its first line, which holds the line, column and cause.
pub(crate) fn one_line(message: &str) -> String {
    let first = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unreadable YAML");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";
    const TEST_ID: &str = "f1a8b3c9d4e5f6789a0b1c2d3e4f5678a9b0c1d2e3f4a5b67890c1d2e3f4b5a6";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("config.yml"), text)
    }

    #[test]
    fn reads_tests_with_and_without_names() {
        let config = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: {TEST_ID}\n    name: contractors\n  - account_id: {ACCOUNT}\n    id: abc-123\n"
        ))
        .expect("valid");

        assert_eq!(config.policy_tests.len(), 2);
        assert_eq!(config.policy_tests[0].name(), "contractors");
        assert_eq!(config.policy_tests[1].name(), "abc-123");
        assert_eq!(config.policy_tests[0].account_id.as_str(), ACCOUNT);
    }

    #[test]
    fn bad_account_id_names_the_field_and_line() {
        let err = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n  - account_id: xyz\n    id: b\n"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(err.contains("account_id must be 32 hexadecimal"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n    nmae: typo\n"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(err.contains("nmae"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn missing_account_id_is_named() {
        let err = parse("policy_tests:\n  - id: a\n")
            .expect_err("invalid")
            .to_string();

        assert!(err.contains("account_id"), "{err}");
    }

    #[test]
    fn duplicate_tests_are_rejected() {
        let err = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n  - account_id: {ACCOUNT}\n    id: b\n  - account_id: {ACCOUNT}\n    id: a\n    name: again\n"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(
            err.contains("policy_tests[2]: duplicate of policy_tests[0]"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_and_empty_file_are_errors() {
        let malformed = parse("policy_tests: [\n").expect_err("invalid").to_string();
        let empty = parse("").expect_err("invalid").to_string();

        assert!(malformed.contains("config.yml"), "{malformed}");
        assert!(empty.contains("empty"), "{empty}");
    }

    #[test]
    fn policy_tests_key_is_required_but_may_be_empty() {
        let missing = parse("{}\n").expect_err("invalid").to_string();
        let empty = parse("policy_tests: []\n").expect("valid");

        assert!(missing.contains("policy_tests"), "{missing}");
        assert!(empty.policy_tests.is_empty());
    }

    #[test]
    fn bad_names_are_rejected() {
        for (name, why) in [
            ("\"\"", "must not be empty"),
            (&"x".repeat(129), "at most 128"),
            ("\"a\\nb\"", "control characters"),
        ] {
            let err = parse(&format!(
                "policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n    name: {name}\n"
            ))
            .expect_err("invalid")
            .to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("line 4"), "{err}");
        }
    }

    #[test]
    fn bad_test_id_is_rejected() {
        let err = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: \"../../etc\"\n"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(err.contains("id must be"), "{err}");
    }
}
