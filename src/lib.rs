//! cloudflare-access-exporter: Cloudflare Access policy test results as
//! Prometheus metrics.
//!
//! The modules follow the data: [`config`] says which tests to poll and
//! [`credentials`] how to authenticate; [`cloudflare`] speaks to the API
//! within a request budget; [`poll`] runs the cycles and [`walk`] reads every
//! user page of one test into a [`tally`]; [`metrics`] holds the series and
//! the cached exposition that [`server`] serves. [`simulator`] is a local
//! stand-in for the API, used by [`demo`] and the tests; [`app`] wires it all.
//! [`input_file`] reads the files the operator names, within limits.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod app;
pub mod cli;
pub mod cloudflare;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod input_file;
pub mod metrics;
pub mod poll;
pub mod server;
pub mod simulator;
pub mod tally;
pub mod walk;
pub mod webconfig;

/// Makes `ring` the process-wide TLS crypto provider (the HTTP client and
/// the TLS listener both need one; the first call wins, later ones are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
