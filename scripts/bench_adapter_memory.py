"""Peak memory of reading a large partner file, per format: a benchmark that prints figures.

For each native format it writes a synthetic file of about ``--mb`` megabytes (the partner's
example records repeated, each with its own referral id), then, in a fresh process, runs the
check ``send`` and ``validate --as`` run (``adapters.iter_file``: the validating first pass and
the converting second pass) and reports the process's peak resident memory (``VmHWM``), the
memory just after importing the adapters, and the time. The budget is 150 MB peak for a 50 MB
file of any format.

    .venv/bin/python scripts/bench_adapter_memory.py            # every format, 50 MB each
    .venv/bin/python scripts/bench_adapter_memory.py --mb 10 --only police-json

Not a test (it takes minutes on a small machine); run it after changing how files are read.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUDGET_MB = 150


def _example_referrals(kind: str) -> list[dict[str, Any]]:
    import datetime as dt

    from referral_broker import adapters

    now = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
    return adapters.load_file(kind, adapters.example_file(kind), now=now).referrals


def _render(kind: str, fmt: str | None) -> str:
    from referral_broker import adapters

    out = io.StringIO()
    adapters.render_file(kind, _example_referrals(kind), out, fmt=fmt)
    return out.getvalue()


def _new_ids(text: str, ids: list[str]) -> str:
    for old in ids:
        text = text.replace(old, str(uuid.uuid4()))
    return text


def _ids(kind: str) -> list[str]:
    return [str(r["referral_id"]) for r in _example_referrals(kind)]


def write_json_array(kind: str, path: Path, size: int) -> None:
    items = json.loads(_render(kind, None))
    text = json.dumps(items, ensure_ascii=False)
    ids = _ids(kind)
    with path.open("w", encoding="utf-8") as out:
        out.write("[")
        written, first = 0, True
        while written < size:
            for item in json.loads(_new_ids(text, ids)):
                chunk = ("" if first else ",\n") + json.dumps(item, ensure_ascii=False)
                out.write(chunk)
                written += len(chunk)
                first = False
        out.write("]\n")


def write_csv(kind: str, path: Path, size: int, fmt: str | None = None) -> None:
    header, *rows = _render(kind, fmt).splitlines(keepends=True)
    ids = _ids(kind)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(header)
        written = 0
        while written < size:
            block = _new_ids("".join(rows), ids)
            out.write(block)
            written += len(block)


def write_fhir_json(path: Path, size: int) -> None:
    bundle = json.loads(_render("health", None))
    entries = json.dumps(bundle["entry"], ensure_ascii=False)[1:-1]
    ids = _ids("health")
    with path.open("w", encoding="utf-8") as out:
        out.write('{"resourceType": "Bundle", "type": "collection", "entry": [')
        written, first = 0, True
        while written < size:
            block = _new_ids(entries, ids + _urns(entries))
            out.write(("" if first else ",\n") + block)
            written += len(block)
            first = False
        out.write("]}\n")


def _urns(text: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"urn:uuid:([0-9a-f-]{36})", text)))


def _xml_repeat(text: str, open_tag: str, close_tag: str, path: Path, size: int, ids: list[str]) -> None:
    head, rest = text.split(open_tag, 1)
    body, tail = rest.rsplit(close_tag, 1)
    body = open_tag + body + close_tag
    with path.open("w", encoding="utf-8") as out:
        out.write(head)
        written = 0
        while written < size:
            block = _new_ids(body, ids + _urns(body))
            out.write(block)
            written += len(block)
        out.write(tail)


def write_fhir_xml(path: Path, size: int) -> None:
    text = _render("health", "xml")
    _xml_repeat(text, "<entry>", "</entry>", path, size, _ids("health"))


def write_ctf(path: Path, size: int) -> None:
    text = _render("schools", "ctf")
    _xml_repeat(text, "<Pupil>", "</Pupil>", path, size, _ids("schools"))


FORMATS: dict[str, tuple[str, str, Callable[[Path, int], None]]] = {
    "police-json": ("police", "police.json", lambda p, n: write_json_array("police", p, n)),
    "charities-json": ("charities", "charities.json", lambda p, n: write_json_array("charities", p, n)),
    "health-fhir-json": ("health", "health.json", write_fhir_json),
    "health-fhir-xml": ("health", "health.xml", write_fhir_xml),
    "schools-csv": ("schools", "schools.csv", lambda p, n: write_csv("schools", p, n)),
    "schools-ctf": ("schools", "schools.xml", write_ctf),
    "dwp-csv": ("dwp", "dwp.csv", lambda p, n: write_csv("dwp", p, n)),
}

_MEASURE = """
import datetime as dt, json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from referral_broker import adapters
base = hwm()
started = time.perf_counter()
stream = adapters.iter_file(sys.argv[1], sys.argv[2], now=dt.datetime(2025, 10, 1, tzinfo=dt.UTC))
checked = time.perf_counter()
count = sum(1 for _ in stream)
done = time.perf_counter()
print(json.dumps({"records": count, "rejected": len(stream.rejected), "import_mb": base,
                  "peak_mb": hwm(), "check_s": checked - started, "second_s": done - checked}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="file size per format, in MB")
    parser.add_argument("--only", choices=sorted(FORMATS), action="append", help="just these formats")
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    failed = False
    print(f"{'format':<18} {'file MB':>8} {'records':>8} {'import MB':>10} {'peak MB':>8} {'check s':>8} {'2nd s':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only or list(FORMATS):
            kind, file_name, write = FORMATS[name]
            path = Path(folder) / file_name
            write(path, size)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _MEASURE, kind, str(path)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                print(f"{name:<18} failed: {proc.stderr.strip().splitlines()[-1:]}")
                failed = True
                continue
            figures = json.loads(proc.stdout)
            over = figures["peak_mb"] > BUDGET_MB and args.mb >= 50
            failed |= over or figures["rejected"] > 0
            print(
                f"{name:<18} {path.stat().st_size / 1e6:>8.1f} {figures['records']:>8} "
                f"{figures['import_mb']:>10.0f} {figures['peak_mb']:>8.0f} {figures['check_s']:>8.1f} "
                f"{figures['second_s']:>7.1f}{'  OVER BUDGET' if over else ''}"
                f"{'  REJECTED ' + str(figures['rejected']) if figures['rejected'] else ''}"
                f"  ({time.perf_counter() - started:.0f} s)"
            )
            path.unlink()
    print(f"budget: {BUDGET_MB} MB peak for a 50 MB file")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
