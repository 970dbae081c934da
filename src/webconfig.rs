//! `--web.config.file`: TLS and basic auth in the exporter-toolkit format.
//!
//! The file has the shape Prometheus's own exporters read:
//! `tls_server_config` (`cert_file`, `key_file`, optional `client_auth_type`
//! with `client_ca_file`, `min_version`) and `basic_auth_users` (user name
//! to bcrypt hash). Relative paths are taken from the file's directory. The
//! file and the TLS files it names must be regular files of at most 1 MiB.
//!
//! Unlike the Go toolkit, the file is read once at start-up; certificates
//! are not re-read on every request, so rotating them needs a restart. The
//! `http_server_config` section and cipher-suite choices are not supported
//! and are rejected rather than ignored.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

use crate::input_file::{self, InputFileError};

/// The largest web config, certificate, key or CA file read.
const MAX_FILE: u64 = 1024 * 1024;

/// What is wrong with the web config file.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    /// The file could not be read: missing, unreadable, not a regular
    /// file, too large, or not UTF-8.
    #[error("cannot read web config file {path} (--web.config.file): {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: InputFileError,
    },
    /// The YAML is malformed or has unknown keys.
    #[error("invalid web config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// A TLS setting is wrong.
    #[error("invalid web config file {path}: tls_server_config: {message}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A basic-auth entry is wrong.
    #[error("invalid web config file {path}: basic_auth_users.{user}: {message}")]
    User {
        /// The file.
        path: PathBuf,
        /// The user at fault.
        user: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    #[serde(default)]
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    basic_auth_users: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: String,
    key_file: String,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<String>,
    #[serde(default)]
    min_version: Option<String>,
}

/// The loaded web configuration.
pub struct WebConfig {
    tls: Option<TlsAcceptor>,
    users: HashMap<String, String>,
    /// Hashes of credentials that already passed bcrypt, so that only the
    /// first request of each pays for it (bcrypt is slow by design).
    verified: Mutex<HashSet<u64>>,
    hasher: RandomState,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text =
            input_file::read_to_string(path, MAX_FILE).map_err(|source| WebConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
        let raw: Option<RawWebConfig> =
            crate::config::parse_yaml(&text).map_err(|message| WebConfigError::Parse {
                path: path.to_owned(),
                message,
            })?;
        let raw = raw.unwrap_or(RawWebConfig {
            tls_server_config: None,
            basic_auth_users: None,
        });
        let base = path.parent().unwrap_or(Path::new("."));

        let tls = match raw.tls_server_config {
            Some(tls) => Some(
                tls_acceptor(base, &tls).map_err(|message| WebConfigError::Tls {
                    path: path.to_owned(),
                    message,
                })?,
            ),
            None => None,
        };

        let users = raw.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(WebConfigError::User {
                    path: path.to_owned(),
                    user: user.clone(),
                    message: "not a bcrypt hash".to_owned(),
                });
            }
        }

        Ok(WebConfig {
            tls,
            users,
            verified: Mutex::new(HashSet::new()),
            hasher: RandomState::new(),
        })
    }

    /// The TLS acceptor, when TLS is configured.
    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.clone()
    }

    /// Whether the request may proceed: always when no users are
    /// configured, else only with valid basic-auth credentials.
    pub fn authorized(&self, headers: &http::HeaderMap) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some((user, password)) = basic_credentials(headers) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };

        let key = self.hasher.hash_one((&user, &password, hash));
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.contains(&key) {
            return true;
        }
        let ok = bcrypt::verify(&password, hash).unwrap_or(false);
        if ok {
            verified.insert(key);
        }
        ok
    }
}

fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn tls_acceptor(base: &Path, raw: &RawTls) -> Result<TlsAcceptor, String> {
    crate::install_crypto_provider();
    let resolve = |p: &str| base.join(p);

    let cert_path = resolve(&raw.cert_file);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem("cert_file", &cert_path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cert_file {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no certificate found",
            cert_path.display()
        ));
    }
    let key_path = resolve(&raw.key_file);
    let key = PrivateKeyDer::from_pem_slice(&pem("key_file", &key_path)?)
        .map_err(|e| format!("key_file {}: {e}", key_path.display()))?;

    let versions: &[&rustls::SupportedProtocolVersion] = match raw.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => {
            return Err(format!(
                "min_version {other:?} is not supported (use TLS12 or TLS13)"
            ))
        }
    };
    let builder = rustls::ServerConfig::builder_with_protocol_versions(versions);

    let auth_type = raw.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match auth_type {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let ca = raw
                .client_ca_file
                .as_deref()
                .ok_or_else(|| format!("client_auth_type {auth_type} needs client_ca_file"))?;
            let ca_path = resolve(ca);
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem("client_ca_file", &ca_path)?) {
                let cert = cert.map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if auth_type == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        other => return Err(format!("client_auth_type {other:?} is not supported (use NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert)")),
    };

    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file/key_file: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reads the PEM file named by the `field` of `tls_server_config`.
fn pem(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    input_file::read(path, MAX_FILE).map_err(|e| format!("{field} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn basic_auth_checks_bcrypt_and_caches() {
        let dir = tempfile::tempdir().expect("dir");
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let path = write(
            dir.path(),
            "web.yml",
            &format!("basic_auth_users:\n  prometheus: {hash}\n"),
        );
        let web = WebConfig::load(&path).expect("valid");
        let header = |creds: &str| {
            let mut h = http::HeaderMap::new();
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            );
            h.insert(http::header::AUTHORIZATION, value.parse().expect("header"));
            h
        };

        assert!(web.authorized(&header("prometheus:s3cret")));
        assert!(web.authorized(&header("prometheus:s3cret")));
        assert!(!web.authorized(&header("prometheus:wrong")));
        assert!(!web.authorized(&header("other:s3cret")));
        assert!(!web.authorized(&http::HeaderMap::new()));
        assert!(!format!("{web:?}").contains(&hash));
    }

    #[test]
    fn bad_files_name_the_field() {
        let dir = tempfile::tempdir().expect("dir");
        let unknown = write(
            dir.path(),
            "a.yml",
            "tls_server_config:\n  cert_file: x\n  key_file: y\n  bogus: 1\n",
        );
        let missing = write(
            dir.path(),
            "b.yml",
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
        );
        let user = write(
            dir.path(),
            "c.yml",
            "basic_auth_users:\n  alice: plaintext\n",
        );

        let unknown = WebConfig::load(&unknown).expect_err("invalid").to_string();
        let missing = WebConfig::load(&missing).expect_err("invalid").to_string();
        let user = WebConfig::load(&user).expect_err("invalid").to_string();

        assert!(unknown.contains("bogus"), "{unknown}");
        assert!(
            missing.contains("cert_file") && missing.contains("nope.crt"),
            "{missing}"
        );
        assert!(user.contains("basic_auth_users.alice"), "{user}");
    }

    #[test]
    fn values_of_the_wrong_type_name_the_field_and_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(
            dir.path(),
            "web.yml",
            "tls_server_config:\n  cert_file: [a, b]\n  key_file: y\n",
        );

        let err = WebConfig::load(&path).expect_err("invalid").to_string();

        assert_eq!(
            err,
            format!(
                "invalid web config file {}: line 2 column 14: tls_server_config.cert_file: expected a string",
                path.display()
            )
        );
    }

    #[test]
    fn files_that_are_not_regular_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let tls = write(
            dir.path(),
            "tls.yml",
            "tls_server_config:\n  cert_file: /dev/zero\n  key_file: y\n",
        );

        let web = WebConfig::load(dir.path())
            .expect_err("directory")
            .to_string();
        let cert = WebConfig::load(&tls).expect_err("device").to_string();

        assert_eq!(
            web,
            format!(
                "cannot read web config file {} (--web.config.file): it is a directory, not a regular file",
                dir.path().display()
            )
        );
        assert!(
            cert.ends_with("tls_server_config: cert_file /dev/zero: it is a character device, not a regular file"),
            "{cert}"
        );
    }
}
