#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests drive
# (Prometheus, Alertmanager, the Prism mock server, wrk, Python checkers),
# then runs formatting and lint checks, every Rust test, and the checks of
# the deploy files, dashboards and alert rules.
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test tools (skipped when present)"
scripts/ensure-tools.sh prometheus alertmanager prism wrk

echo "== rustfmt and clippy"
cargo fmt --all -- --check
cargo clippy --release --locked --all-targets -- -D warnings

echo "== cargo test (unit, integration, Prometheus, faults, Prism conformance)"
cargo test --release --locked

echo "== deploy files, dashboards and alert rules"
bash tests/deploy/check.sh
