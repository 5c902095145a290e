"""A DWP batch streams through ``iter_file`` with flat memory: 30,000 rows here (what a window
early and one late in the file need to show it), 100,000 in ``referral-broker bench batch``,
which times them through ``send`` and samples RSS.

Tracing every allocation of 200,000 record conversions would take minutes, so memory is traced
in windows of rows, early and late in each of the two passes: a reader that kept anything per
row would show that window's rows still allocated at its end. Throughput is printed (run with
``-s`` to see it).
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import time
import tracemalloc
import uuid
from pathlib import Path

from referral_broker import adapters
from referral_broker.schemas.synth import synthetic_referrals

ROWS = 30_000
WINDOW = 2_000
WINDOW_STARTS = (10_000, ROWS - 2 * WINDOW)
# A DWP record is several kilobytes as Python objects: a window's rows kept would be megabytes.
MAX_KEPT_PER_WINDOW = 256 * 1024
MAX_WINDOW_PEAK = 4 * 1024 * 1024
NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def write_batch(path: Path, rows: int) -> None:
    """``rows`` valid DWP rows: 500 synthetic households repeated, each row with its own id."""
    adapter = adapters.get_adapter("dwp")
    records = [
        {**r, "referrer": {**r["referrer"], "partner": "dwp"}} for r in synthetic_referrals(500, seed=42)
    ]
    out = io.StringIO()
    adapter.render(records, out)
    header, *lines = out.getvalue().splitlines(keepends=True)
    assert header.startswith("REFERRAL_ID,")
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(header)
        for number in range(rows):
            line = lines[number % len(lines)]
            handle.write(str(uuid.uuid4()) + line[36:])


# The one thing kept per record on purpose: the (id, version) index that refuses a repeated
# referral, 24 bytes a record in one buffer; measured apart, so a buffer resize inside a window
# does not hide (or pass for) a leak.
REPEATS_INDEX = str(Path(adapters.file_verbs.__file__))


class Windows:
    """Traces allocations over windows of rows; records what each window left allocated."""

    def __init__(self) -> None:
        self.kept: list[int] = []
        self.peaks: list[int] = []

    def at(self, row: int) -> None:
        if row in WINDOW_STARTS:
            tracemalloc.start()
        elif row - WINDOW in WINDOW_STARTS:
            gc.collect()  # garbage in reference cycles is not kept, only not yet collected
            _, peak = tracemalloc.get_traced_memory()
            traces = tracemalloc.take_snapshot().statistics("filename")
            tracemalloc.stop()
            self.kept.append(sum(t.size for t in traces if t.traceback[0].filename != REPEATS_INDEX))
            self.peaks.append(peak)


def test_a_30k_row_dwp_batch_streams_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "dwp-batch.csv"
    write_batch(path, ROWS)
    size_mb = path.stat().st_size / 1e6

    checking = Windows()
    started = time.perf_counter()
    stream = adapters.iter_file("dwp", path, now=NOW, on_checked=checking.at)
    checked = time.perf_counter()
    assert stream.total == ROWS and stream.rejected == []

    sending = Windows()
    count = 0
    for parsed in stream:
        count += 1
        sending.at(count)
        assert parsed.ok
    finished = time.perf_counter()
    assert count == ROWS

    for windows in (checking, sending):
        assert len(windows.kept) == len(WINDOW_STARTS)
        assert max(windows.kept) < MAX_KEPT_PER_WINDOW, windows.kept
        assert max(windows.peaks) < MAX_WINDOW_PEAK, windows.peaks
    first, second = checked - started, finished - checked
    print(
        f"\nDWP {ROWS} rows ({size_mb:.0f} MB): check pass {ROWS / first:,.0f} rows/s (parse + validate), "
        f"second pass {ROWS / second:,.0f} rows/s, whole iter_file {ROWS / (first + second):,.0f} rows/s; "
        f"kept per {WINDOW}-row window {max(checking.kept + sending.kept) / 1024:.0f} KiB, "
        f"window peak {max(checking.peaks + sending.peaks) / 1024:.0f} KiB"
    )
