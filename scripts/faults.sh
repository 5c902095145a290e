#!/usr/bin/env bash
# The fault and fuzz suites alone (pytest markers `faults` and `fuzz`), then one table:
#   scenario | result | sent | delivered | refused | lost | duplicated | recovery s | seconds
#
# A test adds its own rows by appending JSON lines to the file named by
# $REFERRAL_BROKER_FAULTS_TABLE (set here), one object per scenario:
#   {"scenario": "...", "sent": N, "delivered": N, "refused": N, "lost": N, "duplicated": N,
#    "recovery_s": 1.5, "test": "<the pytest node id>"}
# (every field but "scenario" optional). A test that writes no row still gets one, from its
# pytest result and duration. Extra arguments go to pytest (e.g. -k fuzz, -x).
# Against a running cluster: KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19192 scripts/faults.sh
# The fuzz suite's size: REFERRAL_BROKER_FUZZ_SCALE (1 = 10,000 inputs; 0.05 for a quick look).
set -uo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/faults.XXXXXX")
export REFERRAL_BROKER_FAULTS_TABLE="$work/rows.jsonl"
: >"$REFERRAL_BROKER_FAULTS_TABLE"

.venv/bin/python -m pytest -m "faults or fuzz" -q -s -p no:cacheprovider \
  --junitxml="$work/junit.xml" "$@" >"$work/pytest.log" 2>&1
status=$?
# the failures in full, then pytest's summary; the whole log is kept only when something failed
sed -n '/^=* FAILURES =*$/,/^=* short test summary/p' "$work/pytest.log" | grep -v 'kafka.net.selector' | head -n 200
sed -n '/^fuzz outcomes/,/^$/p' "$work/pytest.log"  # the fuzz suite's counts by outcome
grep -E '^(FAILED|ERROR) |(passed|failed|error)[^|]* in [0-9.]+s' "$work/pytest.log"

.venv/bin/python - "$work/junit.xml" "$REFERRAL_BROKER_FAULTS_TABLE" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

junit, rows_file = Path(sys.argv[1]), Path(sys.argv[2])
results: dict[str, tuple[str, float]] = {}
if junit.exists():
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        results[name] = ("FAILED" if failed else "skipped" if skipped else "passed", float(case.get("time", 0)))
rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
covered = {row.get("test") for row in rows}
for name, (result, seconds) in results.items():
    if name not in covered:
        rows.append({"scenario": name, "test": name})
for row in rows:
    result, seconds = results.get(row.get("test", ""), ("?", None))
    row.setdefault("result", result)
    row.setdefault("seconds", seconds)

cols = [("scenario", "scenario"), ("result", "result"), ("sent", "sent"), ("delivered", "delivered"),
        ("refused", "refused"), ("lost", "lost"), ("duplicated", "duplicated"),
        ("recovery_s", "recovery s"), ("seconds", "seconds")]

def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)

table = [[cell(row.get(key)) for key, _ in cols] for row in rows]
widths = [max(len(title), *(len(r[i]) for r in table)) if table else len(title) for i, (_, title) in enumerate(cols)]
line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
print()
print(line([title for _, title in cols]))
print("-+-".join("-" * w for w in widths))
for r in table:
    print(line(r))
if not rows:
    print("(no fault or fuzz tests ran)")
PY
if [[ $status -eq 0 ]]; then rm -rf "$work"; else echo "pytest's whole output: $work/pytest.log"; fi
exit $status
