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
//!
//! bcrypt is slow by design, so basic auth runs it on the blocking thread
//! pool, one check at a time, and remembers the credentials that passed;
//! see [`WebConfig::authorized`].

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::input_file::{self, InputFileError};

/// The largest web config, certificate, key or CA file read.
const MAX_FILE: u64 = 1024 * 1024;

/// How many bcrypt checks run at once. Each costs tens of milliseconds of
/// CPU; one at a time leaves the other cores to scrapes however many wrong
/// passwords arrive.
const BCRYPT_AT_ONCE: usize = 1;

/// The most verified credentials remembered; past it the cache starts
/// over. bcrypt reads only the first 72 bytes of a password, so a user may
/// pass with many passwords: the bound keeps them from growing the cache.
const MAX_VERIFIED: usize = 64;

/// Salt and digest of the hash that unknown user names are checked
/// against: no password hashes to it. The cost in front of it is that of
/// the costliest configured hash, so an unknown name takes as long as a
/// known one.
const DUMMY_SALT_AND_DIGEST: &str = "8sWow4M3TfVK194sTEdSNeIvDu6KAURrUCPy0cskHpZPJMtGKmOFW";

/// The bcrypt costs the bcrypt crate accepts.
const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

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
    /// User name to bcrypt hash.
    users: HashMap<String, String>,
    /// What unknown user names are checked against.
    dummy_hash: String,
    /// Keyed hashes of credentials that already passed bcrypt, so that only
    /// the first request with them pays for it; the passwords themselves
    /// are not kept. Locked only to look up or insert, never across bcrypt.
    verified: Mutex<HashSet<u64>>,
    /// The key of those hashes, random for each process.
    hasher: RandomState,
    /// Bounds the bcrypt checks running at once to [`BCRYPT_AT_ONCE`].
    bcrypt_permits: Arc<Semaphore>,
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
        let mut highest_cost = *BCRYPT_COSTS.start();
        for (user, hash) in &users {
            let bad = |message: String| WebConfigError::User {
                path: path.to_owned(),
                user: user.clone(),
                message,
            };
            let cost = hash
                .parse::<bcrypt::HashParts>()
                .map_err(|_| bad("not a bcrypt hash".to_owned()))?
                .get_cost();
            if !BCRYPT_COSTS.contains(&cost) {
                return Err(bad(format!(
                    "bcrypt cost {cost} is outside {}..={}",
                    BCRYPT_COSTS.start(),
                    BCRYPT_COSTS.end()
                )));
            }
            highest_cost = highest_cost.max(cost);
        }

        Ok(WebConfig {
            tls,
            users,
            dummy_hash: format!("$2b${highest_cost:02}${DUMMY_SALT_AND_DIGEST}"),
            verified: Mutex::new(HashSet::new()),
            hasher: RandomState::new(),
            bcrypt_permits: Arc::new(Semaphore::new(BCRYPT_AT_ONCE)),
        })
    }

    /// The TLS acceptor, when TLS is configured.
    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.clone()
    }

    /// Whether the request may proceed: always when no users are
    /// configured, else only with valid basic-auth credentials.
    ///
    /// Credentials that pass bcrypt are remembered (at most
    /// `MAX_VERIFIED` of them, as keyed hashes), and later requests with
    /// them are let through without bcrypt: a scraper pays for bcrypt once.
    /// Wrong credentials are never remembered and pay for it on every
    /// request. bcrypt runs on the blocking thread pool, one check at a
    /// time, so wrong passwords neither hold an async worker nor take more
    /// than one core; requests with remembered credentials do not wait for
    /// them. An unknown user name is checked against a dummy hash at the
    /// highest configured cost, so the answer takes as long as for a known
    /// name with a wrong password: the time does not tell which names exist.
    pub async fn authorized(&self, headers: &http::HeaderMap) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some((user, password)) = basic_credentials(headers) else {
            return false;
        };
        let known = self.users.get(&user);
        let hash = known.unwrap_or(&self.dummy_hash).clone();

        let key = self.hasher.hash_one((&user, &password, &hash));
        if known.is_some() && self.verified().contains(&key) {
            return true;
        }

        let ok = self.bcrypt_verify(password, hash).await && known.is_some();
        if ok {
            let mut verified = self.verified();
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }

    /// Checks `password` against `hash` on the blocking pool, once a permit
    /// is free. The permit goes with the check, so a client that hangs up
    /// does not free it before bcrypt has finished.
    async fn bcrypt_verify(&self, password: String, hash: String) -> bool {
        let Ok(permit) = self.bcrypt_permits.clone().acquire_owned().await else {
            // The semaphore is never closed.
            return false;
        };
        let check = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash)
        });

        match check.await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => {
                debug!(cause = %e, "basic auth: bcrypt refused the hash");
                false
            }
            Err(e) => {
                warn!(cause = %e, "basic auth: the bcrypt check did not finish");
                false
            }
        }
    }

    /// The verified-credential cache; a panic elsewhere cannot poison it
    /// into refusing everyone.
    fn verified(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Loads a web config with one user, `prometheus`, whose password is
    /// `s3cret`, hashed at `cost`; returns it with the hash.
    fn one_user(dir: &Path, cost: u32) -> (WebConfig, String) {
        let hash = bcrypt::hash("s3cret", cost).expect("hash");
        let path = write(
            dir,
            "web.yml",
            &format!("basic_auth_users:\n  prometheus: {hash}\n"),
        );
        (WebConfig::load(&path).expect("valid"), hash)
    }

    /// Headers with basic-auth credentials `user:password`.
    fn basic(creds: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        );
        h.insert(http::header::AUTHORIZATION, value.parse().expect("header"));
        h
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_caches() {
        let dir = tempfile::tempdir().expect("dir");
        let (web, hash) = one_user(dir.path(), 4);

        assert!(web.authorized(&basic("prometheus:s3cret")).await);
        assert!(web.authorized(&basic("prometheus:s3cret")).await);
        assert_eq!(web.verified().len(), 1);
        assert!(!web.authorized(&basic("prometheus:wrong")).await);
        assert!(!web.authorized(&basic("other:s3cret")).await);
        assert!(!web.authorized(&http::HeaderMap::new()).await);
        assert_eq!(web.verified().len(), 1);
        assert!(!format!("{web:?}").contains(&hash));
    }

    #[tokio::test]
    async fn unknown_users_and_wrong_passwords_are_refused_alike() {
        let dir = tempfile::tempdir().expect("dir");
        let (web, _) = one_user(dir.path(), 5);

        for creds in [
            "prometheus:wrong",
            "prometheus:",
            "intruder:s3cret",
            "intruder:wrong",
            ":s3cret",
        ] {
            assert!(!web.authorized(&basic(creds)).await, "{creds}");
            assert!(!web.authorized(&basic(creds)).await, "{creds}, again");
        }
        assert!(web.verified().is_empty());

        // Unknown names are checked at the cost of the configured hash.
        let dummy: bcrypt::HashParts = web.dummy_hash.parse().expect("dummy");
        assert_eq!(dummy.get_cost(), 5);
        assert_eq!(bcrypt::verify("s3cret", &web.dummy_hash).ok(), Some(false));
        assert_eq!(bcrypt::verify("", &web.dummy_hash).ok(), Some(false));
    }

    #[test]
    fn bcrypt_runs_off_the_async_worker_and_holds_no_lock() {
        let dir = tempfile::tempdir().expect("dir");
        let (web, _) = one_user(dir.path(), 4);
        // One async thread and one blocking thread, which the test takes:
        // a wrong password's check can then only wait, and must not keep
        // the remembered credentials of a scraper from getting through.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .expect("runtime");
        let (release, held) = std::sync::mpsc::channel::<()>();

        let (right, wrong) = (basic("prometheus:s3cret"), basic("prometheus:wrong"));

        runtime.block_on(async {
            assert!(web.authorized(&right).await);
            let busy = tokio::task::spawn_blocking(move || held.recv());

            let wrong = web.authorized(&wrong);
            tokio::pin!(wrong);
            tokio::select! {
                biased;
                _ = &mut wrong => panic!("bcrypt ran on the async worker"),
                ok = web.authorized(&right) => assert!(ok),
            }

            release.send(()).expect("release");
            busy.await.expect("join").expect("recv");
            assert!(!wrong.await);
        });
    }

    #[test]
    fn dummy_hashes_parse_at_every_cost() {
        for cost in BCRYPT_COSTS {
            let dummy = format!("$2b${cost:02}${DUMMY_SALT_AND_DIGEST}");
            let parts: bcrypt::HashParts = dummy.parse().expect("dummy");
            assert_eq!(parts.get_cost(), cost);
        }
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
        let cost = write(
            dir.path(),
            "d.yml",
            &format!("basic_auth_users:\n  bob: $2b$03${DUMMY_SALT_AND_DIGEST}\n"),
        );

        let unknown = WebConfig::load(&unknown).expect_err("invalid").to_string();
        let missing = WebConfig::load(&missing).expect_err("invalid").to_string();
        let user = WebConfig::load(&user).expect_err("invalid").to_string();
        let cost = WebConfig::load(&cost).expect_err("invalid").to_string();

        assert!(unknown.contains("bogus"), "{unknown}");
        assert!(
            missing.contains("cert_file") && missing.contains("nope.crt"),
            "{missing}"
        );
        assert!(user.contains("basic_auth_users.alice"), "{user}");
        assert!(
            cost.ends_with("basic_auth_users.bob: bcrypt cost 3 is outside 4..=31"),
            "{cost}"
        );
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
