#!/usr/bin/env bash
# Prepare a fresh clone: virtual environment, the package with its test extras, Kafka's jars,
# the GOV.UK Frontend assets and (for the browser tests) Debian's Chromium. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
# The browser tests run /usr/bin/chromium (tests/test_inbox_fixtures.py) and fail, never skip,
# without it; WITH_BROWSER=0 is for demo-only machines.
if [[ "${WITH_BROWSER:-1}" == 1 && ! -x /usr/bin/chromium ]]; then need_apt+=(chromium); fi
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: please install: ${need_apt[*]} (needs root)" >&2; exit 1; fi
  echo "setup: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then "$PY" -m venv .venv; fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ ! -f $stamp ]]; then
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # The editable build warns that folders named like the package may shadow it: that is the
  # package-dir layout working as designed (tests/test_packaging.py), so the notice is hushed.
  PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
# Kafka's jars into the user's cache folder (once per version), then the inbox's front end.
.venv/bin/python -c "from referral_broker.config import load_settings; from referral_broker.cluster.runtime import LocalBroker; LocalBroker(load_settings()).ensure_jars()"
if .venv/bin/referral-broker inbox --help >/dev/null 2>&1; then .venv/bin/referral-broker inbox setup >/dev/null; fi
