#!/usr/bin/env bash
# Installs the outside tools the test suite drives, when they are missing:
#   prometheus  -> Debian's prometheus (prometheus, promtool)
#   alertmanager -> Debian's prometheus-alertmanager (alertmanager, amtool)
#   prism       -> @stainless-api/prism-cli from npm, into .tools/prism
#   wrk         -> Debian's wrk
# Usage: scripts/ensure-tools.sh [prometheus] [alertmanager] [prism] [wrk]
# With no argument, everything. Safe to run again: present tools are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(prometheus alertmanager prism wrk)

for tool in "${want[@]}"; do
  case "$tool" in
    prometheus)
      command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus ;;
    alertmanager)
      command -v prometheus-alertmanager >/dev/null || [ -x /usr/bin/prometheus-alertmanager ] || apt_install prometheus-alertmanager ;;
    wrk)
      command -v wrk >/dev/null || apt_install wrk ;;
    prism)
      if [ ! -x .tools/prism/node_modules/.bin/prism ]; then
        mkdir -p .tools/prism
        (cd .tools/prism && [ -f package.json ] || npm init -y >/dev/null)
        (cd .tools/prism && npm install --no-audit --no-fund --silent @stainless-api/prism-cli@5.15.0 >/dev/null)
      fi ;;
    *) echo "unknown tool: $tool" >&2; exit 2 ;;
  esac
done
