//! Cloudflare credentials: an API token, or a legacy email and Global API key.
//!
//! Secrets are held in [`Secret`], whose `Debug` and `Display` print
//! `[redacted]`, and are sent only as HTTP headers marked sensitive, so no log
//! line, error message or panic can carry them. A secret file must be a
//! regular file (a symlink to one, as in a Kubernetes secret mount, is fine).

use std::fmt;
use std::path::{Path, PathBuf};

use http::HeaderValue;

use crate::input_file::{self, InputFileError};

/// The longest token or key accepted (Cloudflare's are about 40 characters).
const MAX_SECRET: usize = 1024;

/// The largest secret file read: the longest secret with room for the
/// whitespace around it that is dropped. A larger file cannot hold a valid
/// secret, so it is refused without being read to the end.
const MAX_SECRET_FILE: u64 = 4 * MAX_SECRET as u64;

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for building a header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How the exporter authenticates to Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: Bearer <token>`; needs "Access: Policy Test Read".
    Token(Secret),

    /// `X-Auth-Email` and `X-Auth-Key` (the Global API key).
    Key {
        /// The account email the key belongs to.
        email: String,
        /// The Global API key.
        key: Secret,
    },
}

/// What is wrong with the credentials given.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Neither a token nor a key was given.
    #[error("no Cloudflare credentials: set CLOUDFLARE_API_TOKEN or --cloudflare.api-token-file (or CLOUDFLARE_API_EMAIL with CLOUDFLARE_API_KEY or --cloudflare.api-key-file)")]
    Missing,

    /// Both schemes were given; which one to use would be a guess.
    #[error("both an API token and an API key were given: use one of CLOUDFLARE_API_TOKEN/--cloudflare.api-token-file or CLOUDFLARE_API_KEY/--cloudflare.api-key-file")]
    Both,

    /// A secret was given both in the environment and as a file.
    #[error("the {what} was given twice: use {env} or {flag}, not both")]
    Twice {
        /// Which secret.
        what: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// Its file flag.
        flag: &'static str,
    },

    /// A key without the email it belongs to.
    #[error("an API key needs CLOUDFLARE_API_EMAIL (or --cloudflare.api-email)")]
    KeyWithoutEmail,

    /// An email without a key.
    #[error(
        "CLOUDFLARE_API_EMAIL was given without CLOUDFLARE_API_KEY or --cloudflare.api-key-file"
    )]
    EmailWithoutKey,

    /// The email given with a key is not one email address.
    #[error("CLOUDFLARE_API_EMAIL (--cloudflare.api-email) is not an email address: it must have text on both sides of a single '@', and no whitespace or control characters")]
    MalformedEmail,

    /// A secret file could not be read.
    #[error("cannot read {what} file {path} ({flag}): {source}")]
    Read {
        /// Which secret: "API token" or "API key".
        what: &'static str,
        /// The file named by the flag, as [`shown_secret_path`] shows it.
        path: String,
        /// The flag that named it.
        flag: &'static str,
        /// Why it failed.
        source: InputFileError,
    },

    /// A secret is empty, holds whitespace, or has characters an HTTP
    /// header cannot carry.
    #[error("the {what} from {source_name} is empty, too long, or has whitespace or characters other than printable ASCII")]
    Malformed {
        /// Which secret.
        what: &'static str,
        /// Where it came from (environment variable or file), never its value.
        source_name: String,
    },
}

/// The raw inputs, as clap and the environment provide them.
#[derive(Debug, Default, Clone)]
pub struct CredentialSources {
    /// `CLOUDFLARE_API_TOKEN`.
    pub token_env: Option<Secret>,
    /// `--cloudflare.api-token-file`.
    pub token_file: Option<PathBuf>,
    /// `CLOUDFLARE_API_EMAIL` / `--cloudflare.api-email`.
    pub email: Option<String>,
    /// `CLOUDFLARE_API_KEY`.
    pub key_env: Option<Secret>,
    /// `--cloudflare.api-key-file`.
    pub key_file: Option<PathBuf>,
}

impl Credentials {
    /// Resolves the sources into one scheme, reading secret files.
    ///
    /// An email given beside a token is not used (only the Global API key
    /// goes with an email); that is logged as a warning, once per call.
    pub fn resolve(sources: &CredentialSources) -> Result<Credentials, CredentialsError> {
        let token = one_source(
            "API token",
            ("CLOUDFLARE_API_TOKEN", &sources.token_env),
            ("--cloudflare.api-token-file", &sources.token_file),
        )?;
        let key = one_source(
            "API key",
            ("CLOUDFLARE_API_KEY", &sources.key_env),
            ("--cloudflare.api-key-file", &sources.key_file),
        )?;
        let email = sources.email.as_ref().filter(|e| !e.trim().is_empty());

        match (token, key, email) {
            (Some(_), Some(_), _) => Err(CredentialsError::Both),
            (Some(token), None, email) => {
                if email.is_some() {
                    tracing::warn!(
                        variable = "CLOUDFLARE_API_EMAIL",
                        "CLOUDFLARE_API_EMAIL (--cloudflare.api-email) is ignored: an API token is used, and only the Global API key goes with an email"
                    );
                }
                Ok(Credentials::Token(token))
            }
            (None, Some(key), Some(email)) => Ok(Credentials::Key {
                email: checked_email(email)?,
                key,
            }),
            (None, Some(_), None) => Err(CredentialsError::KeyWithoutEmail),
            (None, None, Some(_)) => Err(CredentialsError::EmailWithoutKey),
            (None, None, None) => Err(CredentialsError::Missing),
        }
    }

    /// The headers that carry these credentials, marked sensitive so that the
    /// HTTP stack never prints their values.
    pub fn headers(&self) -> Result<http::HeaderMap, CredentialsError> {
        let mut headers = http::HeaderMap::new();
        match self {
            Credentials::Token(token) => {
                let value = sensitive("API token", format!("Bearer {}", token.expose()))?;
                headers.insert(http::header::AUTHORIZATION, value);
            }
            Credentials::Key { email, key } => {
                let email =
                    HeaderValue::from_str(email).map_err(|_| CredentialsError::Malformed {
                        what: "API email",
                        source_name: "CLOUDFLARE_API_EMAIL".to_owned(),
                    })?;
                headers.insert("x-auth-email", email);
                headers.insert("x-auth-key", sensitive("API key", key.expose().to_owned())?);
            }
        }
        Ok(headers)
    }
}

/// The secret from its environment variable or its file, when one of them
/// is given; both is an error.
fn one_source(
    what: &'static str,
    (env, from_env): (&'static str, &Option<Secret>),
    (flag, from_file): (&'static str, &Option<PathBuf>),
) -> Result<Option<Secret>, CredentialsError> {
    match (from_env, from_file) {
        (Some(_), Some(_)) => Err(CredentialsError::Twice { what, env, flag }),
        (Some(secret), None) => checked(what, env.to_owned(), secret.expose().to_owned()).map(Some),
        (None, Some(path)) => read_secret(what, flag, path).map(Some),
        (None, None) => Ok(None),
    }
}

fn sensitive(what: &'static str, value: String) -> Result<HeaderValue, CredentialsError> {
    let mut header = HeaderValue::from_str(&value).map_err(|_| CredentialsError::Malformed {
        what,
        source_name: "the configured source".to_owned(),
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// A secret file's path for an error message. A value with no `/` that is
/// long enough to be a token or key and names no file is most likely the
/// secret itself, given where its path belongs: it is not shown.
fn shown_secret_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    let looks_like_a_secret = !text.contains('/') && text.chars().count() >= 20 && !path.exists();
    if looks_like_a_secret {
        "(not shown: the value given is no file and may be the secret itself; give the path of a file that holds it)".to_owned()
    } else {
        text.into_owned()
    }
}

/// Reads a secret file, dropping the trailing newline editors and `echo` add.
fn read_secret(
    what: &'static str,
    flag: &'static str,
    path: &Path,
) -> Result<Secret, CredentialsError> {
    let text = input_file::read_to_string(path, MAX_SECRET_FILE).map_err(|source| {
        CredentialsError::Read {
            what,
            path: shown_secret_path(path),
            flag,
            source,
        }
    })?;
    checked(what, path.display().to_string(), text)
}

/// The email of the Global API key, without the whitespace around it: one
/// address, with text on both sides of a single `@`.
fn checked_email(email: &str) -> Result<String, CredentialsError> {
    let email = email.trim();
    let well_formed = match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty() && !domain.contains('@'),
        None => false,
    };
    let clean = !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if well_formed && clean {
        Ok(email.to_owned())
    } else {
        Err(CredentialsError::MalformedEmail)
    }
}

fn checked(
    what: &'static str,
    source_name: String,
    value: String,
) -> Result<Secret, CredentialsError> {
    // Editors and `echo` add a trailing newline, copy and paste adds spaces:
    // neither is part of a token or key, and whitespace inside one is not
    // either.
    // Cloudflare's tokens and keys are short printable ASCII.
    let value = value.trim().to_owned();
    let valid = !value.is_empty()
        && value.len() <= MAX_SECRET
        && value.bytes().all(|b| b.is_ascii_graphic())
        && HeaderValue::from_str(&value).is_ok();
    if valid {
        Ok(Secret::new(value))
    } else {
        Err(CredentialsError::Malformed { what, source_name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn secret(s: &str) -> Option<Secret> {
        Some(Secret::new(s.to_owned()))
    }

    #[test]
    fn token_file_loses_its_trailing_newline() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "tok-123").expect("write");
        let creds = Credentials::resolve(&CredentialSources {
            token_file: Some(file.path().to_owned()),
            ..Default::default()
        })
        .expect("valid");

        assert_eq!(creds, Credentials::Token(Secret::new("tok-123".to_owned())));
        let headers = creds.headers().expect("headers");
        let auth = &headers[http::header::AUTHORIZATION];
        assert_eq!(auth.to_str().expect("ascii"), "Bearer tok-123");
        assert!(auth.is_sensitive());
    }

    #[test]
    fn a_token_given_where_its_file_belongs_is_not_echoed() {
        let token = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_x";
        let err = Credentials::resolve(&CredentialSources {
            token_file: Some(PathBuf::from(token)),
            ..Default::default()
        })
        .expect_err("no such file")
        .to_string();
        let missing = Credentials::resolve(&CredentialSources {
            token_file: Some(PathBuf::from("/run/secrets/cf-token-missing")),
            ..Default::default()
        })
        .expect_err("no such file")
        .to_string();

        assert!(!err.contains(token), "{err}");
        assert!(err.contains("--cloudflare.api-token-file"), "{err}");
        assert!(err.contains("may be the secret itself"), "{err}");
        assert!(
            missing.contains("/run/secrets/cf-token-missing"),
            "{missing}"
        );
    }

    #[test]
    fn email_beside_a_key_must_be_one_address() {
        let with_key = |email: &str| {
            Credentials::resolve(&CredentialSources {
                key_env: secret("key-zzz8"),
                email: Some(email.to_owned()),
                ..Default::default()
            })
        };

        assert_eq!(
            with_key(" ops@example.com\n").expect("valid"),
            Credentials::Key {
                email: "ops@example.com".to_owned(),
                key: Secret::new("key-zzz8".to_owned()),
            }
        );
        for bad in [
            "ops",
            "@example.com",
            "ops@",
            "ops@example@com",
            "ops @example.com",
            "ops@exam\tple.com",
            "ops\u{7}@example.com",
        ] {
            let err = with_key(bad).expect_err(bad).to_string();
            assert_eq!(
                err,
                "CLOUDFLARE_API_EMAIL (--cloudflare.api-email) is not an email address: it must have text on both sides of a single '@', and no whitespace or control characters",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn email_beside_a_token_is_not_used() {
        let creds = Credentials::resolve(&CredentialSources {
            token_env: secret("tok"),
            email: Some("not an email".to_owned()),
            ..Default::default()
        });

        assert_eq!(
            creds.expect("valid"),
            Credentials::Token(Secret::new("tok".to_owned()))
        );
    }

    #[test]
    fn secret_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().expect("dir");
        let big = dir.path().join("token");
        std::fs::write(&big, "t".repeat(5000)).expect("write");
        let read = |token_file: &Path| {
            Credentials::resolve(&CredentialSources {
                token_file: Some(token_file.to_owned()),
                ..Default::default()
            })
            .expect_err("refused")
            .to_string()
        };

        assert_eq!(
            read(dir.path()),
            format!(
                "cannot read API token file {} (--cloudflare.api-token-file): it is a directory, not a regular file",
                dir.path().display()
            )
        );
        assert_eq!(
            read(Path::new("/dev/zero")),
            "cannot read API token file /dev/zero (--cloudflare.api-token-file): it is a character device, not a regular file"
        );
        assert!(
            read(&big).ends_with("(--cloudflare.api-token-file): it is larger than 4 KiB"),
            "{}",
            read(&big)
        );
        let key = Credentials::resolve(&CredentialSources {
            key_file: Some(dir.path().to_owned()),
            email: Some("ops@example.com".to_owned()),
            ..Default::default()
        })
        .expect_err("refused")
        .to_string();
        assert!(
            key.starts_with("cannot read API key file")
                && key.contains("(--cloudflare.api-key-file): it is a directory"),
            "{key}"
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let creds = Credentials::Key {
            email: "a@example.com".to_owned(),
            key: Secret::new("supersecretkey".to_owned()),
        };
        let printed = format!("{creds:?} {:?}", creds.headers().expect("headers"));

        assert!(!printed.contains("supersecretkey"), "{printed}");
        assert!(printed.contains("a@example.com"));
    }

    #[test]
    fn conflicting_or_missing_sources_are_rejected() {
        let both = Credentials::resolve(&CredentialSources {
            token_env: secret("t"),
            key_env: secret("k"),
            email: Some("a@example.com".to_owned()),
            ..Default::default()
        });
        let none = Credentials::resolve(&CredentialSources::default());
        let no_email = Credentials::resolve(&CredentialSources {
            key_env: secret("k"),
            ..Default::default()
        });
        let unreadable = Credentials::resolve(&CredentialSources {
            token_file: Some(PathBuf::from("/nonexistent/token")),
            ..Default::default()
        });
        let empty = Credentials::resolve(&CredentialSources {
            token_env: secret("\n"),
            ..Default::default()
        });
        let spaced = Credentials::resolve(&CredentialSources {
            token_env: secret("  tok en \n"),
            ..Default::default()
        });
        let non_ascii = Credentials::resolve(&CredentialSources {
            token_env: secret("tökén"),
            ..Default::default()
        });
        let huge = Credentials::resolve(&CredentialSources {
            token_env: Some(Secret::new("t".repeat(2000))),
            ..Default::default()
        });
        let padded = Credentials::resolve(&CredentialSources {
            token_env: secret("  token\r\n\n"),
            ..Default::default()
        });
        let twice = Credentials::resolve(&CredentialSources {
            key_env: secret("k"),
            key_file: Some(PathBuf::from("/k")),
            email: Some("a@example.com".to_owned()),
            ..Default::default()
        });

        assert!(matches!(both, Err(CredentialsError::Both)));
        assert!(matches!(none, Err(CredentialsError::Missing)));
        assert!(matches!(no_email, Err(CredentialsError::KeyWithoutEmail)));
        let unreadable = unreadable.expect_err("unreadable").to_string();
        assert!(unreadable.contains("/nonexistent/token"), "{unreadable}");
        assert!(matches!(empty, Err(CredentialsError::Malformed { .. })));
        assert!(matches!(spaced, Err(CredentialsError::Malformed { .. })));
        assert!(matches!(non_ascii, Err(CredentialsError::Malformed { .. })));
        assert!(matches!(huge, Err(CredentialsError::Malformed { .. })));
        assert_eq!(
            padded.expect("valid"),
            Credentials::Token(Secret::new("token".to_owned()))
        );
        let twice = twice.expect_err("twice").to_string();
        assert!(
            twice.contains("CLOUDFLARE_API_KEY or --cloudflare.api-key-file"),
            "{twice}"
        );
    }
}
