"""Where a benchmark's time goes: a cProfile run's own time grouped by component, and the
CPU its processes spent (from /proc).

Used by ``bench router --profile`` and ``bench batch --profile`` to show, beside a rate, what
the rest of the time is spent on (and so which lever is left). Each function's own time counts
for the first component whose test matches ``"<file>:<function>"``; a builtin (``len``,
``isinstance``, ``str.encode``, ...) that no test names counts for the functions that called it,
in proportion to the time each call edge took.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPONENTS: list[tuple[str, Callable[[str], bool]]] = [
    ("Ed25519 sign and verify (cryptography)", lambda f: "Ed25519" in f),
    (
        "AES-GCM, HPKE, hashes, randomness",
        lambda f: any(w in f for w in ("AESGCM", "hpke", "urandom", "sha256", "hashlib", "HMAC", "hmac")),
    ),
    ("waiting: flushes, commits, polls (locks, selects)", lambda f: any(w in f for w in ("acquire", "select", "epoll", "poll of"))),
    ("files: case keys, ledger, outbox (open, stat, fsync, sqlite)", lambda f: any(w in f for w in ("posix.", "sqlite3", "io.open", "_io."))),
    ("kafka-python client (records, batches, sockets)", lambda f: "/kafka/" in f or "socket" in f),
    (
        "Avro (fastavro, codec)",
        # fastavro's Cython calls are not profiled on their own: their time is their caller's
        lambda f: "fastavro" in f or any(m in f for m in ("schemas/codec.py", "schemas/union_branches.py")),
    ),
    ("validation", lambda f: "schemas/validation.py" in f),
    ("adapters (reading the partner's file)", lambda f: "/adapters/" in f or "csv" in f),
    ("sealing in Python (fields, framing, headers)", lambda f: "referral_broker/sealing/" in f),
    ("audit chain", lambda f: "audit_chain.py" in f),
    ("policy", lambda f: "referral_broker/policy/" in f),
    ("router", lambda f: "consumers/" in f),
    ("sender and outbox", lambda f: "producers/" in f),
]


def _component(filename: str, name: str) -> str | None:
    where = f"{filename}:{name}"
    return next((c for c, test in COMPONENTS if test(where)), None)


def by_component(profiler: cProfile.Profile, *, top: int = 15) -> dict[str, Any]:
    """``profiled_s`` (the sum of own times), ``components`` (name, seconds, share; largest
    first) and the ``top`` functions by own time."""
    table: dict[tuple[str, int, str], Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    own: dict[str, float] = {}
    functions: list[tuple[float, str]] = []
    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in table.items():
        functions.append((tottime, f"{Path(filename).name}:{name}" if filename != "~" else name))
        component = _component(filename, name)
        if component is None and filename == "~" and callers:
            edges = {k: v[2] for k, v in callers.items()}
            spread = sum(edges.values()) or 1.0
            for (caller_file, _l, caller_name), share in edges.items():
                c = _component(caller_file, caller_name) or "other"
                own[c] = own.get(c, 0.0) + tottime * share / spread
            continue
        own[component or "other"] = own.get(component or "other", 0.0) + tottime
    total = sum(own.values()) or 1.0
    return {
        "profiled_s": round(total, 2),
        "components": [
            {"component": c, "seconds": round(v, 3), "share": round(v / total, 3)}
            for c, v in sorted(own.items(), key=lambda kv: -kv[1])
        ],
        "top_functions": [
            {"function": name, "seconds": round(t, 3), "share": round(t / total, 3)}
            for t, name in sorted(functions, reverse=True)[:top]
        ],
    }


# -- CPU from /proc: what a benchmark's processes spent, beside its wall-clock figures ---------


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of ``pid`` so far (/proc/<pid>/stat), None when unreadable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
