#!/usr/bin/env python3
"""Evaluate the dashboard and the alerts against synthetic demo-mode series.

The series below are what Prometheus holds after scraping a --demo exporter
every 15 seconds for 20 minutes: the three demo tests, all complete, with
legacy-idp's missing statuses (unknown users, tally mismatch), no failed poll
and no Cloudflare error code (so cloudflare_access_api_errors_total has no
series at all). They follow the metric catalogue of the exporter; the
integration test that scrapes a real exporter checks the same expressions
against the real thing.

    python3 tests/deploy/synthetic_demo.py dashboard
        every dashboard expression returns at least one sample
    python3 tests/deploy/synthetic_demo.py alerts
        on this healthy data only CloudflareAccessPolicyTestTallyMismatch
        fires (for legacy-idp), and no other alert is pending or firing

Each mode writes a promtool unit-test file to a temporary directory and runs
`promtool test rules` on it; promtool's output is printed on failure.
"""

import pathlib
import subprocess
import sys
import tempfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ beside the sibling scripts

import dashboard_exprs  # noqa: E402  (sibling script)
import rule_exprs  # noqa: E402

ROOT = HERE.parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

SCRAPE = 'job="cloudflare-access-exporter", instance="exporter:10410"'
ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
SAMPLES = 80  # 20 minutes at 15 s
EVAL_TIME = "20m"

# name, id, users by status, reported (approved, blocked, error), mismatch, pages
TESTS = [
    (
        "contractors",
        "f1a8b3c9d4e5f6789a0b1c2d3e4f5678a9b0c1d2e3f4a5b67890c1d2e3f4b5a6",
        {"approved": 3664, "blocked": 1308, "error": 262, "unknown": 0},
        {"approved": 3664, "blocked": 1308, "error": 262},
        0,
        6,
    ),
    (
        "employees",
        "0b7d2c4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b8c",
        {"approved": 731, "blocked": 65, "error": 16, "unknown": 0},
        {"approved": 731, "blocked": 65, "error": 16},
        0,
        1,
    ),
    (
        "legacy-idp",
        "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d",
        {"approved": 110, "blocked": 64, "error": 46, "unknown": 10},
        {"approved": 115, "blocked": 69, "error": 46},
        1,
        1,
    ),
]

STATES = ["processing", "complete", "exceeded time", "blocked", "unknown"]
REASONS = [
    "api_error",
    "http_error",
    "transport",
    "decode",
    "rate_limited",
    "unauthorized",
    "not_found",
    "inconsistent_walk",
    "too_many_pages",
]


def constant(value):
    return f"{value}x{SAMPLES}"


def series():
    """Return the promtool input_series of a healthy demo exporter."""
    out = []

    def add(name, labels, values):
        selector = ", ".join([SCRAPE] + [f'{k}="{v}"' for k, v in labels.items()])
        out.append({"series": f"{name}{{{selector}}}", "values": values})

    for name, test_id, users, reported, mismatch, pages in TESTS:
        test = {"account_id": ACCOUNT, "policy_test_id": test_id, "name": name}
        for status, count in users.items():
            add("cloudflare_access_policy_test_users", {**test, "status": status}, constant(count))
        for status, count in reported.items():
            add(
                "cloudflare_access_policy_test_reported_users",
                {**test, "status": status},
                constant(count),
            )
        for state in STATES:
            add(
                "cloudflare_access_policy_test_state",
                {**test, "state": state},
                constant(int(state == "complete")),
            )
        for reason in REASONS:
            add(
                "cloudflare_access_policy_test_poll_failures_total",
                {**test, "reason": reason},
                constant(0),
            )
        add("cloudflare_access_policy_test_processed_ratio", test, constant(1))
        add("cloudflare_access_policy_test_tally_mismatch", test, constant(mismatch))
        add("cloudflare_access_policy_test_poll_success", test, constant(1))
        # Polled on every scrape: the timestamp follows the clock.
        add(
            "cloudflare_access_policy_test_last_success_timestamp_seconds",
            test,
            f"0+15x{SAMPLES}",
        )
        add("cloudflare_access_policy_test_walk_duration_seconds", test, constant(0.35))
        add("cloudflare_access_policy_test_walk_pages", test, constant(pages))
        add("cloudflare_access_policy_test_deferrals_total", test, constant(0))

    for endpoint, per_scrape in (("status", 3), ("users", 8)):
        add(
            "cloudflare_access_api_requests_total",
            {"endpoint": endpoint, "outcome": "success"},
            f"0+{per_scrape}x{SAMPLES}",
        )
    add("cloudflare_access_api_throttled_total", {}, constant(0))
    add("cloudflare_access_api_ratelimit_remaining_requests", {}, constant(1150))
    add("cloudflare_access_api_budget_remaining_requests", {}, constant(589))
    add("cloudflare_access_api_budget_requests", {}, constant(600))
    add(
        "cloudflare_access_exporter_build_info",
        {"version": "0.1.0", "revision": "abc1234", "rustc": "1.85.0"},
        constant(1),
    )
    add("cloudflare_access_exporter_config_last_reload_successful", {}, constant(1))
    add(
        "cloudflare_access_exporter_config_last_reload_success_timestamp_seconds",
        {},
        constant(0),
    )
    add("cloudflare_access_exporter_poll_cycle_duration_seconds", {}, constant(0.9))
    add("cloudflare_access_exporter_poll_cycles_total", {}, f"0+1x{SAMPLES}")
    add("up", {}, constant(1))
    return out


def dashboard_test():
    """Each dashboard expression, wrapped in absent(), must return nothing."""
    dashboard = yaml.safe_load(
        dashboard_exprs.DEFAULT.read_text(encoding="utf-8")
    )  # JSON is YAML
    tests = []
    for _title, expr in dashboard_exprs.expressions(dashboard):
        tests.append(
            {
                "expr": f"absent({dashboard_exprs.substitute(expr)})",
                "eval_time": EVAL_TIME,
                "exp_samples": [],
            }
        )
    return {"interval": "15s", "input_series": series(), "promql_expr_test": tests}


def alerts_test():
    """Only the legacy-idp tally mismatch fires on healthy demo data."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    mismatch = "CloudflareAccessPolicyTestTallyMismatch"
    quiet = [
        {"eval_time": EVAL_TIME, "alertname": name, "exp_alerts": []}
        for name, _expr in rule_exprs.rules(document)
        if name != mismatch
    ]
    # ALERTS holds every pending or firing alert: exactly one, legacy-idp's.
    legacy_id = TESTS[2][1]
    only_mismatch = {
        "expr": "count by (alertname, alertstate, policy_test_id) (ALERTS)",
        "eval_time": EVAL_TIME,
        "exp_samples": [
            {
                "labels": f'{{alertname="{mismatch}", alertstate="firing", '
                f'policy_test_id="{legacy_id}"}}',
                "value": 1,
            }
        ],
    }
    return {
        "interval": "15s",
        "input_series": series(),
        "alert_rule_test": quiet,
        "promql_expr_test": [only_mismatch],
    }


def run(mode):
    body = {"dashboard": dashboard_test, "alerts": alerts_test}[mode]()
    with tempfile.TemporaryDirectory() as tmp:
        test_file = pathlib.Path(tmp) / f"synthetic_demo_{mode}_test.yml"
        document = {
            "rule_files": [str(ALERTS)],
            "evaluation_interval": "15s",
            "tests": [{"name": f"synthetic demo: {mode}", **body}],
        }
        test_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        result = subprocess.run(
            ["promtool", "test", "rules", str(test_file)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    return result.returncode


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("dashboard", "alerts"):
        print(__doc__, file=sys.stderr)
        return 2
    return run(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
