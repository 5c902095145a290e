#!/usr/bin/env bash
# The main job: set up what is missing, then run the end-to-end demo on a local broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/referral-broker demo "$@"
