"""Reading what a partner sends and validating it, once, before anything touches Kafka.

A :class:`CheckedReferral` can only be made here, by a reader that validated the record (or, for
a native file, by the adapter's :class:`~referral_broker.adapters.FileStream`, whose first pass
validated every record of the file before its second pass yields any). The senders seal a
``CheckedReferral`` without validating it again and validate anything else: so each record is
validated exactly once per process, and no path skips it.

Nothing in this module opens a network connection: ``check_file`` reads and validates a whole
file, and only its result is handed to a sender.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import BrokerError, PartnerInputError, ValidationError
from referral_broker.parties import all_parties, format_of, party_name
from referral_broker.structured_log import get_logger

from .adapter_metrics import SEND_METRICS
from .file_pool import FilePool, workers_for

log = get_logger(__name__)

# Only the readers in this module hold this; CheckedReferral refuses to be made without it.
_READER = object()


@dataclass(frozen=True)
class CheckedReferral:
    """A canonical referral that passed validation in this process. ``record`` is plaintext."""

    record: dict[str, Any] = field(repr=False)
    referral_id: str
    version: int
    issuer: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.issuer is not _READER:
            raise TypeError("a CheckedReferral is made only by the validating readers in producers.checked")


def _checked(record: dict[str, Any]) -> CheckedReferral:
    return CheckedReferral(record, str(record["referral_id"]), int(record["version"]), _READER)


def referral_checker() -> Callable[[dict[str, Any]], CheckedReferral]:
    """A function validating one canonical referral at a time (ValidationError when invalid)
    against the schema and the parties read once, here (a fresh schema per record was some
    2 ms a referral: see ``registry.shared_schema``)."""
    from referral_broker.schemas.registry import shared_schema
    from referral_broker.schemas.validation import ensure_valid

    schema = shared_schema("referral")
    parties = all_parties()

    def check(record: dict[str, Any]) -> CheckedReferral:
        ensure_valid(record, schema, known_parties=parties)
        return _checked(record)

    return check


def check_referrals(records: Iterable[dict[str, Any]]) -> Iterator[CheckedReferral]:
    """Validate each canonical referral (ValidationError on the first invalid one)."""
    check = referral_checker()
    for record in records:
        yield check(record)


@dataclass
class CheckedFile:
    """A whole file, validated: iterate it for the good records (``total`` of them), the
    urgent referrals first (they are sent, and routed, first), the rest in file order.

    ``rejected`` lists each record left out with ``skip_invalid`` ("file: record N: path:
    reason", never a value). A large file checked by worker processes (``pool``) holds no
    record in this process: ``PartnerSender.send_checked`` has the workers seal it."""

    source: str
    total: int
    rejected: list[str]
    _records: Callable[[], Iterator[CheckedReferral]] = field(repr=False)
    pool: FilePool | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[CheckedReferral]:
        if self.pool is not None:
            raise BrokerError("a file checked by sealing workers is sealed by them: PartnerSender.send_checked")
        return self._records()

    def __len__(self) -> int:
        return self.total

    def close(self) -> None:
        """Stop the workers of a file that will not be sent after all (a no-op otherwise)."""
        if self.pool is not None:
            self.pool.close()


def check_file(
    party: str,
    path: str | Path,
    *,
    fmt: str = "native",
    skip_invalid: bool = False,
    on_checked: Callable[[int], object] | None = None,
    settings: Settings | None = None,
) -> CheckedFile:
    """Read and validate every record of a partner's file. Raises PartnerInputError (nothing to
    send) when any record is invalid, unless ``skip_invalid``. Touches no network.

    With ``settings`` (a sender's), a large native file is checked by worker processes that
    then seal it (``[send] workers``, :mod:`~referral_broker.producers.file_pool`)."""
    import time

    path = Path(path)
    party = party_name(party)
    label, started, read = (fmt if fmt == "canonical" else format_of(party) or "none"), time.monotonic(), 0

    def counted(n: int) -> None:  # records read, for the adapter metrics
        nonlocal read
        read += 1
        if on_checked is not None:
            on_checked(n)

    try:
        if fmt == "canonical":
            checked = _canonical(path, skip_invalid, counted)
        elif fmt == "native":
            checked = _native(party, path, skip_invalid, counted, settings)
        else:
            raise PartnerInputError(f"unknown format '{fmt}' (native or canonical)")
    except PartnerInputError:
        SEND_METRICS.file(label, "refused")
        raise
    finally:
        SEND_METRICS.read(label, read)
        SEND_METRICS.seconds.labels("check").observe(time.monotonic() - started)
    SEND_METRICS.file(label, "checked")
    return checked


def read_canonical_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record or None, problem) for each JSON line ``synth`` writes."""
    from referral_broker.schemas.json_form import from_json_form
    from referral_broker.schemas.registry import referral_schema

    schema = referral_schema()
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise PartnerInputError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, from_json_form(json.loads(line), schema), None
                except json.JSONDecodeError as exc:
                    yield number, None, f"not valid JSON (column {exc.colno})"
                except (ValueError, TypeError, KeyError) as exc:
                    yield number, None, f"not a canonical referral ({type(exc).__name__})"
        except UnicodeDecodeError:
            raise PartnerInputError(f"{path}: not UTF-8 text") from None


def _canonical(path: Path, skip_invalid: bool, on_checked: Callable[[int], object] | None) -> CheckedFile:
    from referral_broker.schemas.registry import referral_schema
    from referral_broker.schemas.validation import validate

    schema = referral_schema()
    parties = all_parties()
    good: list[CheckedReferral] = []
    problems: list[str] = []
    refused: list[tuple[int | None, str, str]] = []
    for number, record, problem in read_canonical_lines(path):
        found = (
            [problem]
            if problem or record is None
            else [
                f"{p.path}: {p.reason}"
                for p in validate(record, schema, record_number=number, known_parties=parties)
            ]
        )
        if found:
            problems.extend(f"{path}: record {number}: {p}" for p in found)
            refused.append((number, "", str(found[0])))
        else:
            assert record is not None
            good.append(_checked(record))
        if on_checked is not None:
            on_checked(number)
    SEND_METRICS.refused("canonical", refused)
    if problems and not skip_invalid:
        raise PartnerInputError(f"{len(problems)} problem(s), nothing sent: " + "; ".join(problems[:5]))
    return CheckedFile(str(path), len(good), problems, lambda: iter(_urgent_first(good)))


def _urgent_first(good: list[CheckedReferral]) -> list[CheckedReferral]:
    """The urgent referrals first (each the one record of its id in the file, so a referral's
    versions keep their order; at most ``URGENT_AHEAD``), then the rest in file order: as
    :class:`~referral_broker.adapters.file_verbs.FileStream` yields a native file's."""
    from referral_broker.adapters.file_verbs import URGENT_AHEAD, is_urgent

    records = Counter(c.referral_id for c in good)
    ahead = [c for c in good if is_urgent(c.record) and records[c.referral_id] == 1][:URGENT_AHEAD]
    moved = {id(c) for c in ahead}
    return ahead + [c for c in good if id(c) not in moved]


def _native(
    party: str,
    path: Path,
    skip_invalid: bool,
    on_checked: Callable[[int], object] | None,
    settings: Settings | None,
) -> CheckedFile:
    from referral_broker import adapters

    native = format_of(party)
    if native is None:
        raise PartnerInputError(f"{party} has no native format; use --format canonical")
    workers = 1 if settings is None else workers_for(settings, path)
    source: FilePool | adapters.FileStream
    try:
        if settings is not None and workers > 1:
            source = FilePool(
                native, party, path, settings, workers=workers, skip_invalid=skip_invalid, on_checked=on_checked
            )
        else:
            # The first pass validates every record; iterating converts again without validating.
            source = adapters.iter_file(native, path, skip_invalid=skip_invalid, on_checked=on_checked, urgent_first=True)
    except ValidationError as exc:
        SEND_METRICS.refused(native, ((p.record, p.path, p.reason) for p in exc.problems))
        raise PartnerInputError(f"{exc}; nothing sent") from None
    SEND_METRICS.refused(native, ((r.number, p.path, p.reason) for r in source.rejected for p in r.problems))
    rejected = [str(r) for r in source.rejected]
    if isinstance(source, FilePool):
        log.info("file checked by worker processes", workers=source.workers, count=source.total)
        return CheckedFile(str(path), source.total, rejected, lambda: iter(()), source)
    stream = source

    def records() -> Iterator[CheckedReferral]:
        for parsed in stream:
            assert parsed.record is not None
            yield _checked(parsed.record)

    return CheckedFile(str(path), stream.total, rejected, records)
