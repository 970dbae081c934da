//! The configuration file: which policy tests to poll.
//!
//! The file is YAML with one key, `policy_tests`. Everything that can be
//! checked without calling Cloudflare is checked here, so that a bad file is
//! rejected with the field and line at fault before anything is polled or
//! replaced. Credentials are not part of this file; see [`crate::credentials`].
//! The YAML reading itself, with its one-line errors, is shared with the web
//! config file ([`crate::webconfig`]).

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::MessageFormatter as _;

use crate::input_file::{self, InputFileError};

/// The largest config file read: a list of thousands of tests fits.
const MAX_FILE: u64 = 1024 * 1024;

/// Why a reload (SIGHUP or `POST /-/reload`) changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The demo's tests are built in; there is no file to read again.
    #[error("the demo has no config file; nothing was reloaded")]
    NoConfigFile,

    /// The file could not be read or is invalid; the running config stays.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What went wrong reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all: missing, unreadable, not a
    /// regular file, too large, or not UTF-8.
    #[error("cannot read config file {path} (--config.file): {source}")]
    Read {
        /// The file named by `--config.file`.
        path: PathBuf,
        /// Why the read failed.
        source: InputFileError,
    },

    /// The YAML is malformed, has an unknown key or a value of the wrong form.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config.file`.
        path: PathBuf,
        /// One line: the line and column, the field at fault, and the cause.
        message: String,
    },

    /// The same test is listed twice. Falls short: the repeat is named by
    /// its position in `policy_tests`, not by its line in the file.
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
    /// Reads and checks the file at `path`, a regular file of at most 1 MiB.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            input_file::read_to_string(path, MAX_FILE).map_err(|source| ConfigError::Read {
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

        let raw: Option<RawConfig> = parse_yaml(text).map_err(parse_error)?;
        let raw = raw.ok_or_else(|| parse_error("the file is empty".to_owned()))?;

        // Ids are hexadecimal or UUIDs, which do not change with case:
        // `ABC` and `abc` are the same test.
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut index_of = HashSet::new();
        for (index, test) in raw.policy_tests.iter().enumerate() {
            let key = (
                test.account_id.to_string().to_ascii_lowercase(),
                test.id.to_string().to_ascii_lowercase(),
            );
            if !index_of.insert(key.clone()) {
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

/// Parses the YAML `text` into `T`.
///
/// An error is one line: the line and column, the field at fault
/// (`policy_tests[0].id`) when the fault is inside the document, and the
/// cause, in words meant for an operator rather than the parser's own
/// multi-line report with a source snippet.
pub(crate) fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    // The path of the value being read is recorded by wrapping the
    // deserializer, since the parser's errors carry a position only.
    let mut field = None;
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = Some(e.path().to_string());
            e.into_inner()
        })
    });

    parsed.map_err(|e| describe_yaml_error(&e, field.as_deref()))
}

/// Renders a parser error on one line, without Rust debug text.
fn describe_yaml_error(err: &serde_saphyr::Error, field: Option<&str>) -> String {
    let mut message = String::new();
    if let Some(at) = err.location().filter(|at| at.line() > 0) {
        let _ = write!(message, "line {} column {}: ", at.line(), at.column());
    }
    // The root of the document has the path ".", which names nothing.
    if let Some(field) = field.filter(|f| !f.is_empty() && *f != ".") {
        let _ = write!(message, "{field}: ");
    }
    message.push_str(&yaml_cause(err));

    // Values quoted in the cause could hold line breaks or terminal escapes.
    let mut one_line = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            one_line.extend(c.escape_default());
        } else {
            one_line.push(c);
        }
    }
    one_line
}

/// The cause of a parser error, without its position.
fn yaml_cause(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error;

    // The error of an aliased value and the source snippet are wrappers
    // around the error itself.
    let mut inner = err;
    while let Error::WithSnippet { error, .. } | Error::AliasError { error, .. } = inner {
        inner = error;
    }

    match inner {
        Error::Budget { breach, .. } => format!(
            "the YAML is too large or too complex for this file: {}",
            budget_breach(breach)
        ),
        Error::AliasReplayCounterOverflow { .. }
        | Error::AliasReplayLimitExceeded { .. }
        | Error::AliasExpansionLimitExceeded { .. }
        | Error::AliasReplayStackDepthExceeded { .. } => {
            "the YAML is too large or too complex for this file: its aliases expand too far"
                .to_owned()
        }
        Error::Unexpected { expected, .. } => format!("expected {}", yaml_kind(expected)),
        other => serde_saphyr::UserMessageFormatter
            .format_message(other)
            .into_owned(),
    }
}

/// Which of the parser's limits a document broke, in words.
fn budget_breach(breach: &BudgetBreach) -> &'static str {
    match breach {
        BudgetBreach::Aliases { .. }
        | BudgetBreach::AliasAnchorRatio { .. }
        | BudgetBreach::RecordedAnchorEvents { .. }
        | BudgetBreach::RecordedAnchorBytes { .. } => "too many aliases",
        BudgetBreach::Anchors { .. } => "too many anchors",
        BudgetBreach::Depth { .. } => "nested too deeply",
        BudgetBreach::Events { .. } | BudgetBreach::Nodes { .. } => "too many values",
        BudgetBreach::ScalarBytes { .. } => "too much text",
        BudgetBreach::Documents { .. } => "too many documents",
        BudgetBreach::MergeKeys { .. } => "too many merge keys",
        _ => "a parser limit was exceeded",
    }
}

/// The YAML node the parser expected, as a YAML user names it.
fn yaml_kind(expected: &str) -> &str {
    match expected {
        "sequence start" => "a list",
        "mapping start" => "a mapping",
        "string scalar" => "a string",
        other => other,
    }
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

        assert_eq!(
            err,
            "invalid config file config.yml: line 4 column 17: policy_tests[1].account_id: account_id must be 32 hexadecimal characters, got \"xyz\""
        );
    }

    #[test]
    fn values_of_the_wrong_type_name_the_field_and_line() {
        let cases = [
            (
                "policy_tests: 5\n".to_owned(),
                "line 1 column 15: policy_tests: expected a list",
            ),
            (
                "policy_tests:\n  - 7\n".to_owned(),
                "line 2 column 5: policy_tests[0]: expected a mapping",
            ),
            (
                format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: [1, 2]\n"),
                "line 3 column 9: policy_tests[0].id: expected a string",
            ),
            (
                format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n    name: {{a: 1}}\n"),
                "line 4 column 11: policy_tests[0].name: expected a string",
            ),
            (
                format!("policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n  - account_id: {ACCOUNT}\n    id: ~\n"),
                "line 5 column 9: policy_tests[1].id: null is not allowed here",
            ),
        ];

        for (text, expected) in cases {
            let err = parse(&text).expect_err("invalid").to_string();
            assert_eq!(err, format!("invalid config file config.yml: {expected}"));
        }
    }

    #[test]
    fn alias_bomb_is_refused_in_one_clean_line() {
        // One anchored test repeated through 150 aliases: the parser refuses
        // documents with far more aliases than anchors.
        let mut text = format!("policy_tests:\n  - &t {{account_id: {ACCOUNT}, id: a}}\n");
        for _ in 0..150 {
            text.push_str("  - *t\n");
        }

        let err = parse(&text).expect_err("refused").to_string();

        assert_eq!(
            err,
            "invalid config file config.yml: line 153 column 1: the YAML is too large or too complex for this file: too many aliases"
        );
    }

    #[test]
    fn load_refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("dir");

        let err = Config::load(dir.path()).expect_err("directory").to_string();

        assert_eq!(
            err,
            format!(
                "cannot read config file {} (--config.file): it is a directory, not a regular file",
                dir.path().display()
            )
        );
        let err = Config::load(Path::new("/dev/zero"))
            .expect_err("device")
            .to_string();
        assert!(
            err.contains("/dev/zero (--config.file): it is a character device"),
            "{err}"
        );
    }

    #[test]
    fn load_refuses_files_over_1_mib() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("config.yml");
        let mut text = "policy_tests: []\n".to_owned();
        text.push_str(&"#".repeat(1024 * 1024));
        std::fs::write(&path, text).expect("write");

        let err = Config::load(&path).expect_err("too large").to_string();

        assert!(
            err.ends_with("(--config.file): it is larger than 1 MiB"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse(&format!(
            "policy_tests:\n  - account_id: {ACCOUNT}\n    id: a\n    nmae: typo\n"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(
            err.contains("policy_tests[0].nmae: unknown field `nmae`"),
            "{err}"
        );
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn missing_account_id_is_named() {
        let err = parse("policy_tests:\n  - id: a\n")
            .expect_err("invalid")
            .to_string();

        assert!(
            err.ends_with("policy_tests[0]: missing field `account_id`"),
            "{err}"
        );
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
    fn duplicates_differing_only_in_case_are_rejected() {
        let upper = ACCOUNT.to_ascii_uppercase();
        let err = parse(&format!(
            "policy_tests:
  - account_id: {ACCOUNT}
    id: abc
  - account_id: {upper}
    id: ABC
"
        ))
        .expect_err("invalid")
        .to_string();

        assert!(
            err.contains("policy_tests[1]: duplicate of policy_tests[0]"),
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
