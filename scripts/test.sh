#!/usr/bin/env bash
# The test command: set up what is missing, then run the whole suite against a real Kafka
# broker (KAFKA_BOOTSTRAP_SERVERS if set, otherwise the project's own local broker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# mypy on the installed package: strict on referral_broker/ (settings in pyproject's [tool.mypy])
.venv/bin/python scripts/typecheck.py
exec .venv/bin/python -m pytest "$@"
